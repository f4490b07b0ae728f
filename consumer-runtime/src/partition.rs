//! One task per assigned partition: records arrive in offset order; the task handles them
//! (in order, or concurrently by key), retries, dead-letters, and publishes the offset up
//! to which everything is done.
//!
//! Flow control: when a task holds `max_in_flight_per_partition` records the poll loop
//! stops polling for a moment (librdkafka then stops fetching once its own bounded queue
//! is full, and keeps what it fetched); a task still full after that moment, or backing
//! off, has its partition paused. Pausing makes librdkafka drop the partition's
//! prefetched records and fetch them again on resume, so it is kept for slow partitions:
//! pausing on every full queue cut throughput to a third. The poll loop never waits long,
//! so `max.poll.interval.ms` holds.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::dead_letter::{self, Provenance};
use crate::envelope::{EnvelopeError, EventEnvelope};
use crate::error::{ErrorKind, Failure, HandlerError};
use crate::handler::Event;
use crate::metrics::{FailureLabels, TopicLabel};
use crate::offsets::OffsetTracker;
use crate::processor::{Outcome, Processor};
use crate::record::Record;
use crate::retry_topic;
use crate::worker::{Core, TopicPlan};

/// State shared between the poll loop, the partition task and the committer.
pub(crate) struct PartitionState {
    pub topic: Arc<str>,
    pub partition: i32,
    /// Next offset to commit (-1: nothing completed yet).
    pub committable: AtomicI64,
    /// Offset of the last commit the broker acknowledged (-1: none): what the broker
    /// holds, since it answers commits in the order it writes them.
    pub committed: AtomicI64,
    /// Last offset sent in a commit not known to have failed (-1: none); reset to
    /// `committed` when a commit fails, so the next round sends it again.
    sent: AtomicI64,
    in_flight: AtomicUsize,
    flow: Mutex<Flow>,
    high_water: usize,
}

#[derive(Default)]
struct Flow {
    paused: bool,
    /// Waits in progress that pause the partition (several key lanes may wait at once).
    backing_off: u32,
}

impl PartitionState {
    pub fn new(topic: Arc<str>, partition: i32, high_water: usize) -> Self {
        Self {
            topic,
            partition,
            committable: AtomicI64::new(-1),
            committed: AtomicI64::new(-1),
            sent: AtomicI64::new(-1),
            in_flight: AtomicUsize::new(0),
            flow: Mutex::new(Flow::default()),
            high_water: high_water.max(1),
        }
    }

    /// The offset to commit next, if the partition completed records past what was last
    /// sent; it counts as sent from now on.
    pub fn commit_due(&self) -> Option<i64> {
        let next = self.committable.load(Ordering::Acquire);
        (next > self.sent.load(Ordering::Acquire)).then(|| {
            self.sent.store(next, Ordering::Release);
            next
        })
    }

    /// The broker acknowledged a commit of `offset`. An acknowledgement of an offset
    /// below the one acknowledged before means an older commit was written after a newer
    /// one (librdkafka sends a commit again after a coordinator change): the broker
    /// went back, so the newer offset is sent again.
    pub fn commit_acknowledged(&self, offset: i64) {
        let before = self.committed.swap(offset, Ordering::AcqRel);
        if offset < before {
            self.sent.store(offset, Ordering::Release);
        }
    }

    /// A commit failed or was never sent: the next round sends it again.
    pub fn commit_failed(&self) {
        self.sent
            .store(self.committed.load(Ordering::Acquire), Ordering::Release);
    }

    /// The poll loop handed over `count` records.
    pub fn dispatched(&self, count: usize) {
        self.in_flight.fetch_add(count, Ordering::Relaxed);
    }

    /// Whether the task holds `max_in_flight_per_partition` records or more while its
    /// partition is fetched (not paused): the poll loop waits for it to catch up.
    pub fn full(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) >= self.high_water
            && !self.flow.lock().unwrap().paused
    }

    /// Pauses the partition if its task is still full: it did not catch up in time, so
    /// the other partitions are fetched without it until it drains to half.
    pub fn pause_if_full(&self, core: &Core) {
        self.update_flow(core, |_| {});
    }

    fn finished(&self, core: &Core, n: usize) {
        let before = self.in_flight.fetch_sub(n, Ordering::Relaxed);
        let left = before.saturating_sub(n);
        if before >= self.high_water && left < self.high_water {
            core.room_made();
        }
        if left <= self.high_water / 2 && self.flow.lock().unwrap().paused {
            self.update_flow(core, |_| {});
        }
    }

    fn set_backing_off(&self, core: &Core, on: bool) {
        self.update_flow(core, |f| {
            if on {
                f.backing_off += 1;
            } else {
                f.backing_off = f.backing_off.saturating_sub(1);
            }
        });
    }

    /// Pauses or resumes the partition to match the queue length and back-off.
    fn update_flow(&self, core: &Core, change: impl FnOnce(&mut Flow)) {
        let mut flow = self.flow.lock().unwrap();
        change(&mut flow);
        let queued = self.in_flight.load(Ordering::Relaxed);
        let want = flow.backing_off > 0
            || queued >= self.high_water
            || (flow.paused && queued > self.high_water / 2);
        if want == flow.paused {
            return;
        }
        let Some(consumer) = core.consumer() else {
            return;
        };
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition(&self.topic, self.partition);
        let result = if want {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&tpl)
        };
        match result {
            Ok(()) => flow.paused = want,
            Err(e) => tracing::warn!(topic = %self.topic, partition = self.partition, error = %e,
                "could not {} the partition", if want { "pause" } else { "resume" }),
        }
    }
}

/// The poll loop's end of a partition task.
pub(crate) struct PartitionHandle {
    pub state: Arc<PartitionState>,
    pub records: mpsc::UnboundedSender<Vec<Record>>,
    pub stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
}

/// What a partition task's helpers need.
pub(crate) struct Part {
    pub core: Arc<Core>,
    pub state: Arc<PartitionState>,
    pub plan: Arc<TopicPlan>,
    pub metrics: PartMetrics,
    tracker: Mutex<OffsetTracker>,
    stop: watch::Receiver<bool>,
}

/// Metric handles resolved once per partition.
pub(crate) struct PartMetrics {
    pub processed: Counter,
    pub duplicates: Counter,
    pub retried: Counter,
    pub dead_lettered: Counter,
    pub transient: Counter,
    pub permanent: Counter,
    pub panics: Counter,
    pub latency: Histogram,
}

impl Part {
    pub fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn complete(&self, offset: i64) {
        if let Some(next) = self.tracker.lock().unwrap().completed(offset) {
            self.state.committable.store(next, Ordering::Release);
        }
    }

    /// Sleeps `delay` with the partition paused; `false` when stopped meanwhile.
    async fn back_off(&self, delay: Duration) -> bool {
        self.state.set_backing_off(&self.core, true);
        let go_on = self.sleep(delay).await;
        self.state.set_backing_off(&self.core, false);
        go_on
    }

    /// Sleeps `delay` before retrying a record: paused like [`back_off`](Self::back_off)
    /// when records are handled in order, but not with concurrency by key, where the
    /// other keys go on (the in-flight bound still pauses the partition if this key's
    /// records pile up).
    async fn back_off_record(&self, delay: Duration) -> bool {
        if self.core.options.key_concurrency > 1 {
            self.sleep(delay).await
        } else {
            self.back_off(delay).await
        }
    }

    /// Sleeps `delay`; `false` when stopped meanwhile.
    async fn sleep(&self, delay: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = stop.wait_for(|s| *s) => false,
        }
    }
}

/// Longest wait between two tries of a dependency that failed (the retry policy's
/// back-off, capped lower so a worker notices soon after the dependency returns).
const DEPENDENCY_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A partition waiting for a dependency of the runtime: `/readyz` fails while any exists.
struct Outage<'a>(&'a Part);

impl<'a> Outage<'a> {
    fn begin(part: &'a Part) -> Self {
        part.core
            .metrics
            .waiting_on_dependency
            .fetch_add(1, Ordering::Relaxed);
        Self(part)
    }
}

impl Drop for Outage<'_> {
    fn drop(&mut self) {
        self.0
            .core
            .metrics
            .waiting_on_dependency
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The back-off after the `n`-th consecutive failure of a dependency.
fn dependency_delay(part: &Part, n: u32) -> Duration {
    part.core.options.retry.delay(n).min(DEPENDENCY_BACKOFF_MAX)
}

/// Attempt number `attempt` of `event` (`first` is its result when already tried),
/// tried again while a dependency of the runtime fails: such failures are not the
/// record's, so they use up no attempt and never dead-letter; the partition is paused
/// meanwhile and `/readyz` fails. `None` when stopped while waiting.
async fn attempt_through_outages<P: Processor>(
    part: &Part,
    processor: &P,
    event: &Event<'_>,
    attempt: u32,
    first: Option<Result<Outcome, Failure>>,
) -> Option<Result<Outcome, HandlerError>> {
    let mut result = match first {
        Some(r) => r,
        None => processor.attempt(part, event, attempt).await,
    };
    let mut outage = None;
    let mut failures = 0;
    loop {
        match result {
            Ok(outcome) => {
                if outage.is_some() {
                    tracing::info!(topic = %part.state.topic, partition = part.state.partition,
                        failures, "the dependency is back; the partition goes on");
                }
                return Some(Ok(outcome));
            }
            Err(Failure::Record(error)) => return Some(Err(error)),
            Err(Failure::Dependency(error)) => {
                failures += 1;
                outage.get_or_insert_with(|| Outage::begin(part));
                part.core.metrics.dependency_failed(error.dependency);
                let r = event.record();
                tracing::warn!(topic = %r.topic, partition = r.partition, offset = r.offset,
                    correlation_id = event.correlation_id().unwrap_or(""), %error, failures,
                    "a dependency of the runtime failed; the partition waits and tries again \
                     (no attempt is used up)");
                if !part.back_off(dependency_delay(part, failures)).await {
                    return None;
                }
                result = processor.attempt(part, event, attempt).await;
            }
        }
    }
}

/// Starts the task of one newly assigned partition.
pub(crate) fn spawn<P: Processor>(
    core: &Arc<Core>,
    processor: Arc<P>,
    topic: Arc<str>,
    partition: i32,
) -> PartitionHandle {
    let state = Arc::new(PartitionState::new(
        topic.clone(),
        partition,
        core.options.max_in_flight_per_partition,
    ));
    let (records, rx) = mpsc::unbounded_channel();
    let (stop, stop_rx) = watch::channel(false);
    let m = &core.metrics;
    let label = TopicLabel {
        topic: topic.to_string(),
    };
    let failure = |kind: ErrorKind| {
        m.failed
            .get_or_create(&FailureLabels {
                topic: topic.to_string(),
                kind: kind.as_str(),
            })
            .clone()
    };
    let metrics = PartMetrics {
        processed: m.processed.get_or_create(&label).clone(),
        duplicates: m.duplicates.get_or_create(&label).clone(),
        retried: m.retried.get_or_create(&label).clone(),
        dead_lettered: m.dead_lettered.get_or_create(&label).clone(),
        transient: failure(ErrorKind::Transient),
        permanent: failure(ErrorKind::Permanent),
        panics: m.panics.get_or_create(&label).clone(),
        latency: m.latency.get_or_create(&label).clone(),
    };
    let part = Part {
        core: core.clone(),
        state: state.clone(),
        plan: core.plan(&topic),
        metrics,
        tracker: Mutex::new(OffsetTracker::new()),
        stop: stop_rx,
    };
    let task = core.runtime.spawn(run(part, processor, rx));
    PartitionHandle {
        state,
        records,
        stop,
        task,
    }
}

async fn run<P: Processor>(
    part: Part,
    processor: Arc<P>,
    rx: mpsc::UnboundedReceiver<Vec<Record>>,
) {
    let lanes = part.core.options.key_concurrency.max(1);
    if lanes == 1 {
        in_order(&part, &*processor, rx).await;
    } else {
        by_key(&part, &*processor, rx, lanes).await;
    }
}

/// Handles the partition's records strictly in offset order, in batches.
async fn in_order<P: Processor>(
    part: &Part,
    processor: &P,
    mut rx: mpsc::UnboundedReceiver<Vec<Record>>,
) {
    let limit = part.core.options.batch_size.max(1);
    let mut batch = Vec::with_capacity(limit);
    let mut stop = part.stop.clone();
    let mut queue = std::collections::VecDeque::new();
    let mut incoming = Vec::new();
    loop {
        if queue.is_empty() {
            let n = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                n = rx.recv_many(&mut incoming, 64) => n,
            };
            if n == 0 {
                break;
            }
            for records in incoming.drain(..) {
                queue.extend(records);
            }
        }
        batch.clear();
        let n = queue.len().min(limit);
        batch.extend(queue.drain(..n));
        {
            let mut tracker = part.tracker.lock().unwrap();
            for r in &batch {
                tracker.started(r.offset);
            }
        }
        let all: Vec<&Record> = batch.iter().collect();
        lane(part, processor, &all).await;
        part.state.finished(&part.core, n);
        if part.stopped() {
            break;
        }
    }
}

/// Which records must stay in order among themselves: those of one key (by its hash;
/// keys that collide share an order), and each record without a key alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Ordered {
    Key(u64),
    Keyless(u64),
}

/// Handles the partition's records with up to `lanes` handler calls at once: the records
/// of one key in offset order, one at a time; different keys, and records without a
/// key, concurrently. A key waits only for its own records: one that is backing off
/// holds one of the `lanes`, and the other keys go on in the others.
async fn by_key<P: Processor>(
    part: &Part,
    processor: &P,
    mut rx: mpsc::UnboundedReceiver<Vec<Record>>,
    lanes: usize,
) {
    use futures::stream::{FuturesUnordered, StreamExt};
    use std::collections::{HashMap, HashSet, VecDeque};

    let limit = part.core.options.batch_size.max(1);
    // Records waiting, per order; orders with records and no call running, in turn.
    let mut queues: HashMap<Ordered, VecDeque<Record>> = HashMap::new();
    let mut ready: VecDeque<Ordered> = VecDeque::new();
    let mut busy: HashSet<Ordered> = HashSet::new();
    let mut running = FuturesUnordered::new();
    let mut stop = part.stop.clone();
    let mut incoming = Vec::new();
    let mut keyless = 0u64;
    let mut open = true;
    loop {
        while open && running.len() < lanes {
            let Some(order) = ready.pop_front() else {
                break;
            };
            let Some(queue) = queues.get_mut(&order) else {
                continue;
            };
            let n = queue.len().min(limit);
            let records: Vec<Record> = queue.drain(..n).collect();
            if queue.is_empty() {
                queues.remove(&order);
            }
            busy.insert(order);
            running.push(async move {
                let refs: Vec<&Record> = records.iter().collect();
                lane(part, processor, &refs).await;
                (order, records.len())
            });
        }
        if !open && running.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s), if open => open = false,
            Some((order, n)) = running.next(), if !running.is_empty() => {
                part.state.finished(&part.core, n);
                busy.remove(&order);
                if queues.contains_key(&order) {
                    ready.push_back(order);
                }
                if part.stopped() {
                    open = false;
                }
            }
            n = rx.recv_many(&mut incoming, 64), if open => {
                if n == 0 {
                    open = false;
                    continue;
                }
                for records in incoming.drain(..) {
                    {
                        let mut tracker = part.tracker.lock().unwrap();
                        for r in &records {
                            tracker.started(r.offset);
                        }
                    }
                    for r in records {
                        let order = match r.key() {
                            Some(k) => {
                                let mut h = part.core.key_hash.build_hasher();
                                h.write(k);
                                Ordered::Key(h.finish())
                            }
                            None => {
                                keyless = keyless.wrapping_add(1);
                                Ordered::Keyless(keyless)
                            }
                        };
                        let queue = queues.entry(order).or_default();
                        queue.push_back(r);
                        if queue.len() == 1 && !busy.contains(&order) {
                            ready.push_back(order);
                        }
                    }
                }
            }
        }
    }
}

/// A record's decoded event, or why it is poison.
fn decode<'a>(part: &Part, record: &'a Record) -> Result<Event<'a>, EnvelopeError> {
    let envelope = EventEnvelope::parse(record.payload())?;
    let versions = &part.core.options.schema_versions;
    if !versions.contains(&envelope.schema_version) {
        return Err(EnvelopeError::UnsupportedVersion {
            event_type: envelope.event_type.to_string(),
            version: envelope.schema_version,
            min: *versions.start(),
            max: *versions.end(),
        });
    }
    Ok(Event { record, envelope })
}

/// Handles `records` (one key lane, in offset order).
async fn lane<P: Processor>(part: &Part, processor: &P, records: &[&Record]) {
    let mut run: Vec<Event<'_>> = Vec::with_capacity(records.len());
    for record in records {
        match decode(part, record) {
            Ok(event) => run.push(event),
            Err(poison) => {
                if !handle_run(part, processor, &run).await {
                    return;
                }
                run.clear();
                let error = HandlerError::permanent(poison);
                // The record's span: its log lines carry the correlation id.
                let span = crate::tracing_otel::record_span(record, None);
                span.in_scope(|| tracing::warn!(%error, "poison record"));
                if !fail(part, processor, record, None, error, 1)
                    .instrument(span)
                    .await
                {
                    return;
                }
            }
        }
    }
    handle_run(part, processor, &run).await;
}

/// Handles consecutive decoded events; `false` when stopped before the end.
async fn handle_run<P: Processor>(part: &Part, processor: &P, events: &[Event<'_>]) -> bool {
    if part.plan.level > 0 {
        // A retry topic: each record waits for its due time, then gets one more attempt.
        for event in events {
            if !wait_until_due(part, event.record).await {
                return false;
            }
            let attempt = retry_topic::attempt(|n| event.record.header(n)).unwrap_or(2);
            let r = processor.attempt(part, event, attempt).await;
            if !settle(part, processor, event, r, attempt).await {
                return false;
            }
        }
        return true;
    }
    if !P::BATCHED {
        for event in events {
            if part.stopped() {
                return false;
            }
            let r = processor.attempt(part, event, 1).await;
            if !settle(part, processor, event, r, 1).await {
                return false;
            }
        }
        return true;
    }
    let mut rest = events;
    while !rest.is_empty() {
        if part.stopped() {
            return false;
        }
        let results = processor.first_attempts(part, rest).await;
        let done = results.len();
        for (event, r) in rest.iter().zip(results) {
            if !settle(part, processor, event, r, 1).await {
                return false;
            }
        }
        rest = &rest[done.min(rest.len())..];
    }
    true
}

/// Records a result; a failure goes through retries and dead-lettering. `false` when the
/// record is not done because the partition is stopping.
async fn settle<P: Processor>(
    part: &Part,
    processor: &P,
    event: &Event<'_>,
    result: Result<Outcome, Failure>,
    attempt: u32,
) -> bool {
    match attempt_through_outages(part, processor, event, attempt, Some(result)).await {
        None => false,
        Some(Ok(outcome)) => {
            succeeded(part, event.record, outcome);
            true
        }
        Some(Err(error)) => {
            let span = crate::tracing_otel::record_span(event.record, Some(event));
            fail(part, processor, event.record, Some(event), error, attempt)
                .instrument(span)
                .await
        }
    }
}

fn succeeded(part: &Part, record: &Record, outcome: Outcome) {
    match outcome {
        Outcome::Handled => part.metrics.processed.inc(),
        Outcome::Duplicate => part.metrics.duplicates.inc(),
    };
    part.complete(record.offset);
}

/// Retries (blocking back-off or a retry topic), then dead-letters. `false` when stopped
/// before the record was done.
async fn fail<P: Processor>(
    part: &Part,
    processor: &P,
    record: &Record,
    event: Option<&Event<'_>>,
    mut error: HandlerError,
    mut attempt: u32,
) -> bool {
    let policy = &part.core.options.retry;
    loop {
        match error.kind() {
            ErrorKind::Transient => part.metrics.transient.inc(),
            ErrorKind::Permanent => part.metrics.permanent.inc(),
        };
        if let (ErrorKind::Transient, Some(event)) = (error.kind(), event) {
            let non_blocking = !part.plan.retry_topics.is_empty();
            if non_blocking {
                if let Some(next) = part.plan.retry_topics.get(part.plan.level) {
                    part.metrics.retried.inc();
                    let due = now_ms() + next.delay_ms as i64;
                    let extra = retry_topic::retry_headers(
                        record.headers(),
                        attempt + 1,
                        due,
                        record.timestamp.unwrap_or(-1),
                    );
                    // Like Spring's retry topics: the retry record carries the failure and
                    // the main topic's record as its origin, kept along the chain.
                    let headers = republished_headers(
                        dead_letter::retry_hop_headers(
                            record.headers(),
                            &provenance(part, record),
                            &error,
                        ),
                        extra,
                    );
                    if !publish(part, &next.topic, record, headers, "retry").await {
                        return false;
                    }
                    part.complete(record.offset);
                    return true;
                }
            } else if policy.should_retry(attempt) {
                part.metrics.retried.inc();
                tracing::debug!(topic = %record.topic, offset = record.offset, attempt, %error, "retrying");
                if !part.back_off_record(policy.delay(attempt)).await {
                    return false;
                }
                attempt += 1;
                match attempt_through_outages(part, processor, event, attempt, None).await {
                    None => return false,
                    Some(Ok(outcome)) => {
                        succeeded(part, record, outcome);
                        return true;
                    }
                    Some(Err(e)) => {
                        error = e;
                        continue;
                    }
                }
            }
        }
        if part.core.options.dead_letter
            && let Some(dlt) = &part.plan.dead_letter_topic
        {
            let from = provenance(part, record);
            // A retry chain's dead-letter topic is one of its hops, as in Spring.
            let headers = if !part.plan.retry_topics.is_empty() {
                dead_letter::retry_hop_headers(record.headers(), &from, &error)
            } else {
                dead_letter::headers(record.headers(), &from, &error)
            };
            tracing::warn!(topic = %record.topic, partition = record.partition,
                offset = record.offset, attempt, %error, dead_letter_topic = %dlt, "dead-lettering");
            if !publish(part, dlt, record, headers, "dead-letter").await {
                return false;
            }
            part.metrics.dead_lettered.inc();
            part.complete(record.offset);
            return true;
        }
        // No dead-letter topic: the partition stops at this record and keeps retrying.
        tracing::error!(topic = %record.topic, partition = record.partition, offset = record.offset,
            %error, "cannot process the record and there is no dead-letter topic; the partition waits");
        if !part.back_off_record(policy.max).await {
            return false;
        }
        let Some(event) = event else {
            continue;
        };
        attempt += 1;
        match attempt_through_outages(part, processor, event, attempt, None).await {
            None => return false,
            Some(Ok(outcome)) => {
                succeeded(part, record, outcome);
                return true;
            }
            Some(Err(e)) => error = e,
        }
    }
}

fn provenance<'a>(part: &'a Part, record: &'a Record) -> Provenance<'a> {
    Provenance {
        topic: &record.topic,
        partition: record.partition,
        offset: record.offset,
        timestamp: record.timestamp,
        timestamp_type: record.timestamp_type,
        group: &part.core.group,
    }
}

/// `headers` without earlier retry headers, plus `extra`.
fn republished_headers(
    headers: Vec<(String, Option<Vec<u8>>)>,
    extra: Vec<(&str, Vec<u8>)>,
) -> Vec<(String, Option<Vec<u8>>)> {
    headers
        .into_iter()
        .filter(|(k, _)| !retry_topic::is_retry_header(k))
        .chain(extra.into_iter().map(|(k, v)| (k.to_string(), Some(v))))
        .collect()
}

/// Publishes `record`'s key and value to the same partition number of `topic` with
/// `headers`, retrying until the broker acknowledges; `false` when stopped first (the
/// source record is then not done, so its offset is not committed). When `topic` has no
/// such partition, the producer chooses one, as Spring's `checkPartition` does.
async fn publish(
    part: &Part,
    topic: &str,
    record: &Record,
    headers: Vec<(String, Option<Vec<u8>>)>,
    what: &str,
) -> bool {
    let mut owned = OwnedHeaders::new_with_capacity(headers.len());
    for (k, v) in &headers {
        owned = owned.insert(Header {
            key: k.as_str(),
            value: v.as_deref(),
        });
    }
    let mut failures = 0;
    let mut outage = None;
    let mut partition = Some(record.partition);
    loop {
        let mut out = FutureRecord::<[u8], [u8]>::to(topic).headers(owned.clone());
        if let Some(p) = partition {
            out = out.partition(p);
        }
        if let Some(k) = record.key() {
            out = out.key(k);
        }
        if let Some(p) = record.payload() {
            out = out.payload(p);
        }
        match part.core.producer.send(out, Duration::from_secs(30)).await {
            Ok(_) => return true,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::UnknownPartition), _))
                if partition.is_some() =>
            {
                tracing::warn!(
                    topic,
                    partition = record.partition,
                    "{what} topic has fewer partitions than the source; the producer chooses one"
                );
                partition = None;
            }
            Err((e, _)) => {
                // Not the record's fault: no attempt is used up, the partition waits
                // (paused, not ready) and publishes again.
                failures += 1;
                outage.get_or_insert_with(|| Outage::begin(part));
                part.core.metrics.dependency_failed(if what == "retry" {
                    "retry_publish"
                } else {
                    "dead_letter_publish"
                });
                tracing::error!(topic, source_topic = %record.topic, partition = record.partition,
                    offset = record.offset, error = %e, "{what} publish failed; the source offset stays uncommitted");
                if !part.back_off(dependency_delay(part, failures)).await {
                    return false;
                }
            }
        }
    }
}

async fn wait_until_due(part: &Part, record: &Record) -> bool {
    let Some(due) = retry_topic::due_ms(|n| record.header(n)) else {
        return true;
    };
    let wait = due - now_ms();
    if wait <= 0 {
        return true;
    }
    part.back_off_record(Duration::from_millis(wait as u64))
        .await
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> PartitionState {
        PartitionState::new("orders".into(), 0, 10)
    }

    fn completed(s: &PartitionState, next: i64) {
        s.committable.store(next, Ordering::Release);
    }

    /// Seen in the three-broker chaos run (fault 3): while the group coordinator moved,
    /// librdkafka held two commits of partition 0 and sent them again in the opposite
    /// order. `__consumer_offsets` shows 1665 written, then 1649 after it; the worker
    /// counted 1665 as committed and never sent it again, so lag stayed above 0.
    #[test]
    fn an_older_commit_acknowledged_after_a_newer_one_is_sent_again() {
        let s = state();
        completed(&s, 1649);
        assert_eq!(s.commit_due(), Some(1649));
        completed(&s, 1665);
        assert_eq!(s.commit_due(), Some(1665));
        s.commit_acknowledged(1665);
        // Acknowledged last, so written last: the broker now holds 1649.
        s.commit_acknowledged(1649);
        assert_eq!(s.commit_due(), Some(1665));
    }

    #[test]
    fn a_failed_commit_is_sent_again_and_an_acknowledged_one_is_not() {
        let s = state();
        completed(&s, 10);
        assert_eq!(s.commit_due(), Some(10));
        assert_eq!(s.commit_due(), None, "sent, not yet answered");
        s.commit_failed();
        assert_eq!(s.commit_due(), Some(10));
        s.commit_acknowledged(10);
        assert_eq!(s.commit_due(), None);
        completed(&s, 12);
        assert_eq!(s.commit_due(), Some(12));
    }
}
