//! The worker: configuration ([`WorkerBuilder`]), the poll loop, rebalances, commits and
//! graceful shutdown ([`Worker::run`]).
//!
//! A dedicated thread polls the consumer and hands each record to its partition's task
//! (see the `partition` module); it waits for a full task at most 200 ms, then pauses
//! that partition, so it never blocks on a slow handler. Partition tasks publish
//! the offset up to which every record is done; a committer commits those offsets
//! asynchronously every [`commit_interval`](WorkerBuilder::commit_interval), and
//! synchronously when partitions are revoked and at shutdown. Only processed (or
//! dead-lettered) records are ever committed, and a partition's committed position
//! advances only when the broker acknowledges the commit; a refused commit is sent
//! again. One asynchronous commit is in flight at a time, so a commit librdkafka holds
//! while the group coordinator moves can never be written after a newer one.
//!
//! Every newly assigned partition starts resumed, whatever it was when it last left
//! this worker (librdkafka would keep a pause across unassign and assign).
//!
//! Failures of what the runtime owns (the PostgreSQL inbox, dead-letter and retry
//! publishes, offset commits) are never the record's fault: they use up no attempt and
//! never dead-letter. For the inbox and publishes the partition pauses and tries again
//! with back-off (at most 5 s apart) until the dependency returns; a refused commit is
//! sent again with the next round; `/readyz` fails meanwhile. A panicking handler is a
//! permanent error: the record is dead-lettered with the panic message.
//!
//! Bounded waits, each a [`WorkerBuilder`] setting:
//!
//! | setting | default | bounds |
//! |---|---|---|
//! | [`revoke_timeout`](WorkerBuilder::revoke_timeout) | 15 s | the wait for handlers when partitions are revoked or at shutdown |
//! | [`liveness_timeout`](WorkerBuilder::liveness_timeout) | 60 s | the poll loop's silence before `/healthz` fails |
//! | [`postgres_timeouts`](WorkerBuilder::postgres_timeouts) | connect 5 s, statement 30 s, pool wait 5 s | every inbox database call |
//!
//! `/readyz` passes only once the group is joined (the first assignment arrived).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Message, Statistics, TopicPartitionList};

use crate::contract::{self, ContractError, Idempotency, RetryRoute, WorkerConfig};
use crate::handler::{Handler, TransactionalHandler};
use crate::idempotency::{InboxError, MemoryStore, PostgresInbox, PostgresTimeouts};
use crate::metrics::{self, Metrics, PartitionLabels};
use crate::outbox::{Relay, RelayError, RelayOptions};
use crate::partition::{self, PartitionHandle, PartitionState};
use crate::processor::{Dedup, Plain, Processor, Transactional};
use crate::record::{BufferPool, Gathered, Record};
use crate::retry::RetryPolicy;
use tokio::sync::mpsc::UnboundedSender;

/// Why a worker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The environment contract is incomplete or malformed.
    #[error(transparent)]
    Contract(#[from] ContractError),
    /// A setting is invalid.
    #[error("{setting}: {problem}")]
    Config {
        /// The setting (a builder method or environment variable).
        setting: &'static str,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// Kafka client creation or subscription failed.
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The PostgreSQL inbox is unusable.
    #[error(transparent)]
    Inbox(#[from] InboxError),
    /// The health server could not bind.
    #[error("health server on {addr}: {source}")]
    Health {
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The poll thread ended unexpectedly.
    #[error("the poll loop ended unexpectedly: {0}")]
    PollLoop(String),
}

/// librdkafka consumer properties a worker starts from; each can be overridden with
/// [`WorkerBuilder::kafka_property`]. `enable.auto.commit` and `enable.auto.offset.store`
/// are always `false` on top of these: offsets are committed only after processing.
///
/// - `auto.offset.reset=earliest`: a group without a committed offset starts at the
///   first record of each partition, so nothing produced before the group's first start
///   is skipped. The operator's autoscaler counts such a group's lag as end − start for
///   the same reason; override with `latest` to skip history (the autoscaler then
///   overestimates that group's lag until its first commit).
/// - `partition.assignment.strategy=cooperative-sticky`: incremental rebalances, so a
///   scaling group does not stop every partition.
/// - `queued.max.messages.kbytes=16384`: librdkafka prefetches up to 16 MiB ahead of the
///   handlers instead of its 64 MiB default. Partition tasks already hold up to
///   `max_in_flight_per_partition` records each, so a deeper prefetch only costs memory.
/// - `fetch.queue.backoff.ms=10`: when that prefetch queue is full, librdkafka checks
///   again after 10 ms rather than its default 1 s, so a consumer that catches up is not
///   left idle for most of a second (librdkafka's own advice when lowering the queue).
pub const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("auto.offset.reset", "earliest"),
    ("partition.assignment.strategy", "cooperative-sticky"),
    ("queued.max.messages.kbytes", "16384"),
    ("fetch.queue.backoff.ms", "10"),
];

/// The consumer's properties: `common` (client and security), [`CONSUMER_DEFAULTS`], the
/// worker's own properties over them, and commits only after processing.
fn consumer_config(mut c: ClientConfig, config: &WorkerConfig) -> ClientConfig {
    c.set("group.id", &config.group_id);
    for (k, v) in CONSUMER_DEFAULTS {
        c.set(*k, *v);
    }
    c.set("statistics.interval.ms", "5000");
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    // Offsets are committed only after processing, whatever was set above.
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    c
}

/// Tuning beyond the environment contract; every field has a builder method.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub retry: RetryPolicy,
    pub dead_letter: bool,
    pub idempotency: Idempotency,
    pub memory_capacity: usize,
    pub postgres_url: Option<String>,
    pub postgres_pool_size: usize,
    pub postgres: crate::postgres::PostgresOptions,
    pub key_concurrency: usize,
    pub max_in_flight_per_partition: usize,
    pub batch_size: usize,
    pub commit_interval: Duration,
    pub schema_versions: RangeInclusive<u32>,
    pub health_addr: Option<SocketAddr>,
    pub health_server: bool,
    pub revoke_timeout: Duration,
    pub liveness_timeout: Duration,
    /// The outbox relay's database URL and options, when the worker runs one.
    pub outbox: Option<(String, RelayOptions)>,
}

/// How records of one consumed topic are retried and dead-lettered.
#[derive(Debug)]
pub(crate) struct TopicPlan {
    /// 0 for a main topic; `i + 1` for its `i`-th retry topic.
    pub level: usize,
    pub retry_topics: Vec<RetryRoute>,
    pub dead_letter_topic: Option<String>,
}

/// Everything the poll loop, the partition tasks and the committer share.
pub(crate) struct Core {
    pub group: String,
    pub producer: FutureProducer,
    pub metrics: Arc<Metrics>,
    pub options: Options,
    pub runtime: tokio::runtime::Handle,
    pub key_hash: std::hash::RandomState,
    plans: HashMap<String, Arc<TopicPlan>>,
    consumer: OnceLock<Weak<BaseConsumer<Ctx>>>,
    partitions: Mutex<HashMap<String, HashMap<i32, PartitionHandle>>>,
    /// Signalled when a full partition task makes room (see [`Core::wait_for_room`]).
    room: (Mutex<()>, std::sync::Condvar),
    /// When the asynchronous commit in flight was sent (`None`: none in flight).
    commit_unanswered: Mutex<Option<std::time::Instant>>,
    /// Records polled since the last [`flush`](Core::flush), per partition.
    pending: Mutex<Vec<Pending>>,
    /// Buffers the polled records are copied into, reused.
    buffers: Arc<BufferPool>,
    #[allow(clippy::type_complexity)]
    spawn: Box<dyn Fn(&Arc<Core>, Arc<str>, i32) -> PartitionHandle + Send + Sync>,
    stopping: AtomicBool,
}

/// A partition's records polled since the last [`flush`](Core::flush).
struct Pending {
    state: Arc<PartitionState>,
    tx: UnboundedSender<Vec<Record>>,
    records: Gathered,
}

impl Core {
    pub fn consumer(&self) -> Option<Arc<BaseConsumer<Ctx>>> {
        self.consumer.get()?.upgrade()
    }

    pub fn plan(&self, topic: &str) -> Arc<TopicPlan> {
        self.plans.get(topic).cloned().unwrap_or_else(|| {
            Arc::new(TopicPlan {
                level: 0,
                retry_topics: Vec::new(),
                dead_letter_topic: None,
            })
        })
    }

    /// Stops the tasks of `partitions`, waits for their in-flight records at most
    /// [`revoke_timeout`](WorkerBuilder::revoke_timeout) (a task still running then is
    /// aborted: its unfinished records go to the next owner), and commits what they
    /// completed, synchronously. Called on the poll thread.
    fn release(&self, consumer: &BaseConsumer<Ctx>, partitions: &[(String, i32)]) {
        let handles: Vec<PartitionHandle> = {
            let mut map = self.partitions.lock().unwrap();
            partitions
                .iter()
                .filter_map(|(t, p)| map.get_mut(t.as_str())?.remove(p))
                .collect()
        };
        for h in &handles {
            let _ = h.stop.send(true);
        }
        let deadline = std::time::Instant::now() + self.options.revoke_timeout;
        let mut tpl = TopicPartitionList::new();
        for mut h in handles {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let finished = self
                .runtime
                .block_on(async { tokio::time::timeout(left, &mut h.task).await.is_ok() });
            if !finished {
                h.task.abort();
                tracing::warn!(topic = %h.state.topic, partition = h.state.partition,
                    timeout = ?self.options.revoke_timeout,
                    "the partition's handlers did not finish in time; its unfinished records \
                     go to the next owner");
            }
            let next = h.state.committable.load(Ordering::Acquire);
            if next > h.state.committed.load(Ordering::Acquire) {
                let _ = tpl.add_partition_offset(
                    &h.state.topic,
                    h.state.partition,
                    rdkafka::Offset::Offset(next),
                );
            }
        }
        if tpl.count() > 0 {
            // A synchronous commit's result is its return value (librdkafka reports it to
            // no callback); a failure is tried again while time is left (what stays
            // uncommitted is delivered again to the next owner).
            for attempt in 1.. {
                let result = consumer.commit(&tpl, CommitMode::Sync);
                self.count_commit(result.is_ok());
                match result {
                    Ok(()) => break,
                    Err(e) if attempt < 3 && std::time::Instant::now() < deadline => {
                        tracing::warn!(error = %e, attempt,
                            "committing the offsets of released partitions failed; trying again");
                        std::thread::sleep(Duration::from_millis(100 * attempt));
                    }
                    Err(e) => {
                        tracing::error!(error = %e,
                            "committing the offsets of released partitions failed; their \
                             records after the last commit are delivered again");
                        break;
                    }
                }
            }
        }
    }

    /// Commits every partition whose completed offset is past what was last sent,
    /// asynchronously. The committed position advances when the broker acknowledges
    /// ([`Ctx::commit_callback`]); a failed commit resets what was sent, so the next
    /// round sends it again.
    ///
    /// One commit is in flight at a time: librdkafka holds a commit while the group
    /// coordinator moves and sends it again later, so an older commit sent beside a
    /// newer one could be written after it and take the group's position back (seen
    /// with three brokers when the coordinator's broker stopped). A commit unanswered
    /// for [`COMMIT_ANSWER_WAIT`] counts as failed and is sent again.
    fn commit_progress(&self, consumer: &BaseConsumer<Ctx>) {
        let mut unanswered = self.commit_unanswered.lock().unwrap();
        // Committed under the lock, so a partition being released is either committed
        // here or by `release`, never after it changed owner.
        let map = self.partitions.lock().unwrap();
        if let Some(since) = *unanswered {
            if since.elapsed() < COMMIT_ANSWER_WAIT {
                return;
            }
            tracing::warn!(waited = ?since.elapsed(),
                "the last offset commit got no answer; it is sent again");
            for h in map.values().flat_map(|m| m.values()) {
                h.state.commit_failed();
            }
            *unanswered = None;
        }
        let mut tpl = TopicPartitionList::new();
        for h in map.values().flat_map(|m| m.values()) {
            if let Some(next) = h.state.commit_due() {
                let _ = tpl.add_partition_offset(
                    &h.state.topic,
                    h.state.partition,
                    rdkafka::Offset::Offset(next),
                );
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = commit_async(consumer, &tpl) {
            // Not even sent: send again next round.
            for e in tpl.elements() {
                if let Some(h) = map.get(e.topic()).and_then(|m| m.get(&e.partition())) {
                    h.state.commit_failed();
                }
            }
            self.count_commit(false);
            tracing::warn!(error = %e, "offset commit failed; it is sent again");
        } else {
            *unanswered = Some(std::time::Instant::now());
        }
    }

    /// The broker answered a commit: acknowledged offsets become the committed position;
    /// failed ones are sent again by the next [`commit_progress`](Self::commit_progress).
    fn committed(&self, result: &KafkaResult<()>, offsets: &TopicPartitionList) {
        let map = self.partitions.lock().unwrap();
        let mut failed = result.is_err();
        for e in offsets.elements() {
            let ok = result.is_ok() && e.error().is_ok();
            failed |= !ok;
            let rdkafka::Offset::Offset(offset) = e.offset() else {
                continue;
            };
            let Some(h) = map.get(e.topic()).and_then(|m| m.get(&e.partition())) else {
                continue; // released meanwhile
            };
            if ok {
                h.state.commit_acknowledged(offset);
            } else {
                h.state.commit_failed();
            }
        }
        drop(map);
        *self.commit_unanswered.lock().unwrap() = None;
        if failed {
            tracing::warn!(error = ?result.as_ref().err(), offsets = ?offsets.to_topic_map(),
                "offset commit failed; it is sent again");
        }
        self.count_commit(!failed);
    }

    /// Counts a commit the broker answered: acknowledged or failed.
    fn count_commit(&self, acknowledged: bool) {
        if acknowledged {
            self.metrics.commits.inc();
        } else {
            self.metrics.commit_failures.inc();
        }
        self.metrics
            .commit_failing
            .store(!acknowledged, Ordering::Relaxed);
    }

    /// Starts a task for each newly assigned partition and resumes the partition.
    ///
    /// librdkafka keeps an application's pause across unassign and assign: a partition
    /// paused here (flow control, back-off) when it was revoked would come back paused,
    /// and its new task (which believes it is fetched) would never get a record.
    fn assigned(&self, core: &Arc<Core>, consumer: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
        let mut resume = TopicPartitionList::with_capacity(tpl.count());
        {
            let mut map = self.partitions.lock().unwrap();
            for e in tpl.elements() {
                let topic = map.entry(e.topic().to_string()).or_default();
                if let std::collections::hash_map::Entry::Vacant(slot) = topic.entry(e.partition())
                {
                    tracing::info!(
                        topic = e.topic(),
                        partition = e.partition(),
                        "partition assigned"
                    );
                    slot.insert((self.spawn)(core, Arc::from(e.topic()), e.partition()));
                    resume.add_partition(e.topic(), e.partition());
                }
            }
        }
        if resume.count() > 0
            && let Err(e) = consumer.resume(&resume)
        {
            tracing::error!(error = %e, partitions = ?resume.to_topic_map(),
                "could not resume newly assigned partitions");
        }
        self.metrics.joined.store(true, Ordering::Relaxed);
    }

    /// Hands a polled record to its partition's task; drops it when the partition is no
    /// longer ours (it is re-delivered to the new owner from the committed offset).
    ///
    /// Records are gathered per partition and sent by [`flush`](Self::flush), once per
    /// poll burst, so a task is woken once per burst rather than once per record.
    /// librdkafka hands over a fetched batch of one partition in a row: while records of
    /// the partition gathered last come in, neither the partitions nor the gathered
    /// records are searched. That is sound because the gathered records never outlive a
    /// rebalance: [`flush`](Self::flush) runs before every one.
    fn dispatch(&self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let mut pending = self.pending.lock().unwrap();
        if let Some(p) = pending.last_mut()
            && p.state.partition == m.partition()
            && *p.state.topic == *m.topic()
        {
            p.records.push(m);
            return;
        }
        let map = self.partitions.lock().unwrap();
        let Some(h) = map.get(m.topic()).and_then(|t| t.get(&m.partition())) else {
            return;
        };
        let i = match pending.iter().position(|p| Arc::ptr_eq(&p.state, &h.state)) {
            Some(i) => i,
            None => {
                pending.push(Pending {
                    state: h.state.clone(),
                    tx: h.records.clone(),
                    records: Gathered::new(h.state.topic.clone(), self.buffers.clone()),
                });
                pending.len() - 1
            }
        };
        drop(map);
        // The partition's entry goes last, for the records of it that follow.
        let last = pending.len() - 1;
        pending.swap(i, last);
        pending[last].records.push(m);
    }

    /// Sends the gathered records to their tasks. Called after each poll burst and
    /// before any rebalance, so records always reach the task that owned their
    /// partition when they were polled.
    fn flush(&self) {
        let mut pending = self.pending.lock().unwrap();
        for mut p in pending.drain(..) {
            let records = p.records.take();
            // Counted before sending: the task may finish them before `send` returns.
            p.state.dispatched(records.len());
            let _ = p.tx.send(records);
        }
    }
}

impl Core {
    /// Waits while a fetched partition's task is full (see the `partition` module), at
    /// most [`FULL_WAIT`]; then pauses the partitions still full. Woken by
    /// [`room_made`](Self::room_made).
    fn wait_for_room(&self) {
        let started = std::time::Instant::now();
        // Held while checking, so a task that makes room after the check wakes the wait.
        let mut room = self.room.0.lock().unwrap();
        loop {
            let full: Vec<Arc<PartitionState>> = {
                let map = self.partitions.lock().unwrap();
                map.values()
                    .flat_map(|m| m.values())
                    .filter(|h| h.state.full())
                    .map(|h| h.state.clone())
                    .collect()
            };
            if full.is_empty() || self.stopping.load(Ordering::Relaxed) {
                return;
            }
            let waited = started.elapsed();
            if waited >= FULL_WAIT {
                drop(room);
                for state in full {
                    state.pause_if_full(self);
                }
                return;
            }
            room = self
                .room
                .1
                .wait_timeout(room, FULL_WAIT - waited)
                .unwrap()
                .0;
        }
    }

    /// A partition task went below its in-flight bound: wakes [`wait_for_room`](Self::wait_for_room).
    pub(crate) fn room_made(&self) {
        let _room = self.room.0.lock().unwrap();
        self.room.1.notify_one();
    }
}

/// Longest an asynchronous commit may go unanswered before it is sent again. librdkafka
/// answers every commit: one it holds for a missing coordinator fails after
/// `session.timeout.ms` (45 s by default), a request after `socket.timeout.ms` (60 s).
const COMMIT_ANSWER_WAIT: Duration = Duration::from_secs(120);

/// Longest the poll loop waits for a full partition task before pausing its partition.
const FULL_WAIT: Duration = Duration::from_millis(200);

/// Sends an asynchronous commit of `offsets` whose result comes back through the poll
/// loop as an offset-commit event, that is to [`Ctx::commit_callback`].
///
/// Not `Consumer::commit(.., CommitMode::Async)`: that calls librdkafka's
/// `rd_kafka_commit`, which reports an asynchronous commit's result only to an
/// `offset_commit_cb`, and rdkafka sets none (it uses librdkafka's event API). Every
/// result was lost: the committed position never advanced, and a commit the broker
/// refused (a rebalance in progress, a missing group ACL) was never sent again.
/// `rd_kafka_commit_queue` with the consumer's queue delivers the result as an event
/// there, where `BaseConsumer::poll` hands it to the context.
#[allow(unsafe_code)] // rdkafka has no safe call for this
fn commit_async(consumer: &BaseConsumer<Ctx>, offsets: &TopicPartitionList) -> KafkaResult<()> {
    use rdkafka::bindings as rdsys;
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is the live handle of `consumer`, borrowed for the whole call; the
    // queue reference taken here is released before returning; librdkafka copies
    // `offsets` before `rd_kafka_commit_queue` returns, and without a callback it only
    // enqueues the result on the queue.
    let err = unsafe {
        let queue = rdsys::rd_kafka_queue_get_consumer(rk);
        if queue.is_null() {
            return Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::UnknownGroup,
            ));
        }
        let err =
            rdsys::rd_kafka_commit_queue(rk, offsets.ptr(), queue, None, std::ptr::null_mut());
        rdsys::rd_kafka_queue_destroy(queue);
        err
    };
    let code = rdkafka::types::RDKafkaErrorCode::from(err);
    if code == rdkafka::types::RDKafkaErrorCode::NoError {
        Ok(())
    } else {
        Err(rdkafka::error::KafkaError::ConsumerCommit(code))
    }
}

/// The consumer's context: rebalance callbacks, commit results and statistics.
pub(crate) struct Ctx {
    core: OnceLock<Weak<Core>>,
}

impl Ctx {
    fn core(&self) -> Option<Arc<Core>> {
        self.core.get()?.upgrade()
    }
}

impl ClientContext for Ctx {
    fn stats(&self, statistics: Statistics) {
        let Some(core) = self.core() else { return };
        for (name, topic) in &statistics.topics {
            for (p, s) in &topic.partitions {
                if *p >= 0 && s.consumer_lag >= 0 {
                    core.metrics
                        .lag
                        .get_or_create(&PartitionLabels {
                            topic: name.clone(),
                            partition: *p,
                        })
                        .set(s.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Some(core) = self.core() {
            core.flush();
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            let Some(core) = self.core() else { return };
            let parts: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            tracing::info!(partitions = ?parts, "partitions revoked; finishing in-flight records");
            core.release(consumer, &parts);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                if let Some(core) = self.core() {
                    core.assigned(&core, consumer, tpl);
                }
            }
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Some(core) = self.core() {
            core.committed(&result, offsets);
        }
    }
}

/// Configures a [`Worker`]: starts from the [`WorkerConfig`] the operator wrote, and
/// every setting can be overridden in code.
pub struct WorkerBuilder {
    config: WorkerConfig,
    pub(crate) options: Options,
}

impl WorkerBuilder {
    /// Starts from `config`.
    pub fn new(config: WorkerConfig) -> Self {
        let options = Options {
            retry: RetryPolicy {
                max_attempts: config.max_attempts.max(1),
                initial: config.backoff_initial,
                max: config.backoff_max,
                multiplier: config.backoff_multiplier,
                ..RetryPolicy::default()
            },
            dead_letter: config.dead_letter,
            idempotency: config.idempotency,
            memory_capacity: 100_000,
            postgres_url: config.postgres_url.clone(),
            postgres_pool_size: 4,
            postgres: Default::default(),
            key_concurrency: 1,
            max_in_flight_per_partition: 2_000,
            batch_size: 256,
            commit_interval: Duration::from_millis(500),
            schema_versions: 0..=u32::MAX,
            health_addr: None,
            health_server: true,
            revoke_timeout: Duration::from_secs(15),
            liveness_timeout: Duration::from_secs(60),
            outbox: config.outbox.as_ref().map(|o| {
                (
                    o.database_url.clone(),
                    RelayOptions {
                        topics: Some(o.topics.iter().cloned().collect()),
                        ..RelayOptions::default()
                    },
                )
            }),
        };
        Self { config, options }
    }

    /// Sets (or overrides) a librdkafka consumer and producer property.
    pub fn kafka_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.kafka.insert(key.into(), value.into());
        self
    }

    /// Overrides the retry policy (attempts, back-off, jitter).
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.options.retry = policy;
        self
    }

    /// Whether failed records go to the dead-letter topic (`true`) or stop the
    /// partition (`false`).
    pub fn dead_letter(mut self, on: bool) -> Self {
        self.options.dead_letter = on;
        self
    }

    /// Overrides the idempotency store.
    pub fn idempotency(mut self, idempotency: Idempotency) -> Self {
        self.options.idempotency = idempotency;
        self
    }

    /// Event ids the in-memory store remembers (default 100 000).
    pub fn memory_capacity(mut self, ids: usize) -> Self {
        self.options.memory_capacity = ids;
        self
    }

    /// The PostgreSQL URL of the inbox (default: [`contract::DATABASE_URL`]).
    pub fn postgres_url(mut self, url: impl Into<String>) -> Self {
        self.options.postgres_url = Some(url.into());
        self
    }

    /// Inbox connections (default 4).
    pub fn postgres_pool_size(mut self, connections: usize) -> Self {
        self.options.postgres_pool_size = connections;
        self
    }

    /// Records of one partition handled concurrently when their keys differ (default 1:
    /// strictly in order). Records with one key always stay in order.
    pub fn key_concurrency(mut self, lanes: usize) -> Self {
        self.options.key_concurrency = lanes;
        self
    }

    /// Records a partition task may hold (default 2 000). When one holds this many, the
    /// poll loop waits for it; if it has not caught up after 200 ms its partition is
    /// paused until it is down to half. Memory: about this many records per assigned
    /// partition, plus librdkafka's prefetch (`queued.max.messages.kbytes`, see
    /// [`CONSUMER_DEFAULTS`]).
    pub fn max_in_flight_per_partition(mut self, records: usize) -> Self {
        self.options.max_in_flight_per_partition = records;
        self
    }

    /// Most records a partition task takes at once; with the PostgreSQL inbox, most
    /// records per transaction (default 256).
    pub fn batch_size(mut self, records: usize) -> Self {
        self.options.batch_size = records;
        self
    }

    /// How often completed offsets are committed (default 500 ms).
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.options.commit_interval = interval;
        self
    }

    /// The schema versions this worker understands; other versions are poison and go to
    /// the dead-letter topic (default: all).
    pub fn schema_versions(mut self, versions: RangeInclusive<u32>) -> Self {
        self.options.schema_versions = versions;
        self
    }

    /// Where the health and metrics server binds (default: [`contract::HEALTH_ADDR`],
    /// else `0.0.0.0:<HEALTH_PORT>`).
    pub fn health_addr(mut self, addr: SocketAddr) -> Self {
        self.options.health_addr = Some(addr);
        self
    }

    /// Whether to serve `/healthz`, `/readyz` and `/metrics` (default `true`).
    pub fn health_server(mut self, on: bool) -> Self {
        self.options.health_server = on;
        self
    }

    /// Longest wait, when partitions are revoked (and at shutdown), for their handlers
    /// to finish the record they are on (default 15 s). A handler still running then is
    /// cancelled and its record goes to the partition's next owner. The poll thread
    /// waits meanwhile, so keep this well below `max.poll.interval.ms` (5 min) and the
    /// [`liveness_timeout`](Self::liveness_timeout).
    pub fn revoke_timeout(mut self, timeout: Duration) -> Self {
        self.options.revoke_timeout = timeout;
        self
    }

    /// How long the poll loop may go without polling before `/healthz` fails (default
    /// 60 s), so that Kubernetes restarts a worker whose poll thread is stuck.
    pub fn liveness_timeout(mut self, timeout: Duration) -> Self {
        self.options.liveness_timeout = timeout;
        self
    }

    /// Timeouts of the PostgreSQL inbox (defaults: connect 5 s, statement 30 s, wait for
    /// a pooled connection 5 s). A timeout is a failure of the inbox, not of the record:
    /// the partition waits and tries again.
    pub fn postgres_timeouts(mut self, timeouts: PostgresTimeouts) -> Self {
        self.options.postgres.timeouts = timeouts;
        self
    }

    /// Runs an outbox relay in the worker (see [`outbox`](crate::outbox)) for the table in
    /// `database_url`, with the worker's producer and metrics. The operator's
    /// `spec.outbox` sets this through the environment; `options.auto_migrate` follows
    /// [`postgres_auto_migrate`](Self::postgres_auto_migrate).
    pub fn outbox_relay(mut self, database_url: impl Into<String>, options: RelayOptions) -> Self {
        self.options.outbox = Some((database_url.into(), options));
        self
    }

    /// Runs no outbox relay, whatever the environment says (for a worker whose relay runs
    /// as its own process).
    pub fn without_outbox_relay(mut self) -> Self {
        self.options.outbox = None;
        self
    }

    /// Builds a worker calling `handler`, with the configured idempotency (`None`,
    /// `Memory`, or `Postgres`: the event id claimed in a transaction that commits when
    /// the handler succeeds, see [`idempotency`](crate::idempotency)).
    pub async fn build<H: Handler>(self, handler: H) -> Result<Worker, WorkerError> {
        let dedup = match self.options.idempotency {
            Idempotency::None => Dedup::None,
            Idempotency::Memory => Dedup::Memory(MemoryStore::new(self.options.memory_capacity)),
            Idempotency::Postgres => Dedup::Postgres(self.inbox().await?),
        };
        self.start(Plain { handler, dedup }).await
    }

    /// Builds a worker whose handler writes in the PostgreSQL transaction that records
    /// the event in the inbox: exactly one effect per event id.
    pub async fn build_transactional<H: TransactionalHandler>(
        mut self,
        handler: H,
    ) -> Result<Worker, WorkerError> {
        self.options.idempotency = Idempotency::Postgres;
        let inbox = self.inbox().await?;
        self.start(Transactional { handler, inbox }).await
    }

    async fn inbox(&self) -> Result<PostgresInbox, WorkerError> {
        let url = self
            .options
            .postgres_url
            .as_deref()
            .ok_or(WorkerError::Config {
                setting: contract::DATABASE_URL,
                problem: "is not set but idempotency is Postgres; set it to the worker database's \
                      postgres:// URL (or call WorkerBuilder::postgres_url)"
                    .into(),
            })?;
        Ok(PostgresInbox::connect_with(
            url,
            self.options.postgres_pool_size,
            &self.config.group_id,
            &self.options.postgres,
        )
        .await?)
    }

    fn resolve_health_addr(&self) -> Result<SocketAddr, WorkerError> {
        if let Some(a) = self.options.health_addr {
            return Ok(a);
        }
        match &self.config.health_addr {
            Some(a) => a.parse().map_err(|_| WorkerError::Config {
                setting: contract::HEALTH_ADDR,
                problem: format!("is {a:?}; expected <ip>:<port> such as 10.0.0.7:8080"),
            }),
            None => Ok(SocketAddr::from(([0, 0, 0, 0], self.config.health_port))),
        }
    }

    async fn start<P: Processor>(self, processor: P) -> Result<Worker, WorkerError> {
        let o = &self.options;
        if o.schema_versions.is_empty() {
            return Err(WorkerError::Config {
                setting: "schema_versions",
                problem: "is an empty range; give the versions this worker handles, e.g. 1..=2"
                    .into(),
            });
        }
        if o.liveness_timeout <= o.revoke_timeout {
            tracing::warn!(liveness_timeout = ?o.liveness_timeout, revoke_timeout = ?o.revoke_timeout,
                "liveness_timeout is not above revoke_timeout: a slow revoke fails /healthz");
        }
        if self.config.topics.is_empty() {
            return Err(WorkerError::Config {
                setting: contract::TOPICS,
                problem: "lists no topic; add at least one {\"topic\": ...}".into(),
            });
        }
        let metrics = Arc::new(Metrics::default());
        metrics
            .liveness_timeout_ms
            .store(o.liveness_timeout.as_millis() as u64, Ordering::Relaxed);
        metrics.beat();
        let health = if o.health_server {
            let addr = self.resolve_health_addr()?;
            let (bound, task) = metrics::serve(addr, metrics.clone())
                .await
                .map_err(|source| WorkerError::Health { addr, source })?;
            Some((bound, task))
        } else {
            None
        };

        let mut plans = HashMap::new();
        let mut subscribe = Vec::new();
        for route in &self.config.topics {
            let levels = std::iter::once(route.topic.clone())
                .chain(route.retry_topics.iter().map(|r| r.topic.clone()));
            for (level, topic) in levels.enumerate() {
                subscribe.push(topic.clone());
                plans.insert(
                    topic,
                    Arc::new(TopicPlan {
                        level,
                        retry_topics: route.retry_topics.clone(),
                        dead_letter_topic: route.dead_letter_topic.clone(),
                    }),
                );
            }
        }

        let mut common = ClientConfig::new();
        for (k, v) in &self.config.kafka {
            common.set(k, v);
        }
        common.set_log_level(RDKafkaLogLevel::Warning);
        let mut producer_config = common.clone();
        producer_config
            .set("enable.idempotence", "true")
            .set("linger.ms", "5");
        let producer: FutureProducer = producer_config.create()?;

        let relay = match &o.outbox {
            Some((url, relay_options)) => {
                if let Some(inbox) = &o.postgres_url
                    && inbox != url
                {
                    tracing::warn!(
                        "the outbox relay reads a different database than DATABASE_URL: rows \
                         appended through the handler's transaction (Context::outbox_event) \
                         go to DATABASE_URL's eventops_outbox and are not relayed from there"
                    );
                }
                let relay_options = RelayOptions {
                    auto_migrate: o.postgres.auto_migrate,
                    timeouts: o.postgres.timeouts.clone(),
                    ..relay_options.clone()
                };
                let relay = Relay::connect(url, producer.clone(), relay_options)
                    .await
                    .map_err(|RelayError::Database(e)| WorkerError::Inbox(e))?;
                Some(relay.with_metrics(metrics.clone()))
            }
            None => None,
        };

        let consumer_config = consumer_config(common, &self.config);

        let processor = Arc::new(processor);
        let ctx = Ctx {
            core: OnceLock::new(),
        };
        let consumer: Arc<BaseConsumer<Ctx>> = Arc::new(consumer_config.create_with_context(ctx)?);
        let core = Arc::new(Core {
            group: self.config.group_id.clone(),
            producer,
            metrics: metrics.clone(),
            options: self.options.clone(),
            runtime: tokio::runtime::Handle::current(),
            key_hash: Default::default(),
            plans,
            consumer: OnceLock::new(),
            partitions: Mutex::new(HashMap::new()),
            commit_unanswered: Mutex::new(None),
            room: Default::default(),
            pending: Mutex::new(Vec::new()),
            buffers: Arc::default(),
            spawn: Box::new(move |core, topic, partition| {
                partition::spawn(core, processor.clone(), topic, partition)
            }),
            stopping: AtomicBool::new(false),
        });
        let _ = core.consumer.set(Arc::downgrade(&consumer));
        let _ = consumer.context().core.set(Arc::downgrade(&core));
        let topics: Vec<&str> = subscribe.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Worker {
            core,
            consumer,
            health,
            relay,
        })
    }
}

/// A configured worker, subscribed and ready to [`run`](Worker::run).
pub struct Worker {
    core: Arc<Core>,
    consumer: Arc<BaseConsumer<Ctx>>,
    health: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
    relay: Option<Relay>,
}

impl Worker {
    /// A builder from `config`.
    pub fn builder(config: WorkerConfig) -> WorkerBuilder {
        WorkerBuilder::new(config)
    }

    /// A builder from the environment contract ([`WorkerConfig::from_env`]).
    pub fn from_env() -> Result<WorkerBuilder, WorkerError> {
        Ok(WorkerBuilder::new(WorkerConfig::from_env()?))
    }

    /// The address the health and metrics server listens on, if it runs.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().map(|(a, _)| *a)
    }

    /// The worker's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.core.metrics.clone()
    }

    /// Runs until SIGTERM or SIGINT, then shuts down gracefully: stops fetching, finishes
    /// in-flight records, commits, and leaves the group.
    pub async fn run(self) -> Result<(), WorkerError> {
        self.run_until(shutdown_signal()).await
    }

    /// Runs until `shutdown` completes, then shuts down gracefully like [`run`](Self::run).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), WorkerError> {
        let Worker {
            core,
            consumer,
            health,
            relay,
        } = self;
        // The relay stops after the consumer: what the last handlers appended is
        // published before the worker exits (or, if it is killed first, by the next relay).
        let (relay_stop, relay_stopped) = tokio::sync::oneshot::channel::<()>();
        let relay = relay.map(|r| {
            tokio::spawn(r.run_until(async move {
                let _ = relay_stopped.await;
            }))
        });
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        core.metrics.beat();
        let poll_core = core.clone();
        std::thread::Builder::new()
            .name("eventops-poll".into())
            .spawn(move || {
                poll_loop(&poll_core, &consumer);
                let _ = done_tx.send(());
            })
            .map_err(|e| WorkerError::PollLoop(e.to_string()))?;
        core.metrics.ready.store(true, Ordering::Relaxed);

        let committer = {
            let core = core.clone();
            let interval = core.options.commit_interval;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if core.stopping.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Some(c) = core.consumer() {
                        core.commit_progress(&c);
                    }
                }
            })
        };

        let mut done_rx = done_rx;
        let unexpected = tokio::select! {
            _ = shutdown => false,
            _ = &mut done_rx => true,
        };
        tracing::info!("shutting down: no more fetching, finishing in-flight records");
        core.metrics.ready.store(false, Ordering::Relaxed);
        core.stopping.store(true, Ordering::Relaxed);
        core.room_made();
        if !unexpected {
            let _ = done_rx.await;
        }
        committer.abort();
        let _ = relay_stop.send(());
        if let Some(relay) = relay {
            let _ = relay.await;
        }
        let _ = rdkafka::producer::Producer::flush(&core.producer, Duration::from_secs(10));
        if let Some((_, task)) = health {
            task.abort();
        }
        tracing::info!("worker stopped");
        if unexpected {
            return Err(WorkerError::PollLoop("the poll thread stopped".into()));
        }
        Ok(())
    }
}

/// SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The poll thread: polls, dispatches, runs rebalance callbacks; at shutdown pauses
/// fetching, releases every partition (finish, commit) and closes the consumer, which
/// leaves the group.
fn poll_loop(core: &Arc<Core>, consumer: &Arc<BaseConsumer<Ctx>>) {
    const BURST: usize = 2048;
    while !core.stopping.load(Ordering::Relaxed) {
        core.metrics.beat();
        core.wait_for_room();
        match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Ok(m)) => core.dispatch(&m),
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
        }
        // Drain what librdkafka already fetched, then hand it over in one go.
        for _ in 0..BURST {
            match consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(m)) => core.dispatch(&m),
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
            }
        }
        core.flush();
    }
    core.flush();
    if let Ok(assignment) = consumer.assignment() {
        let _ = consumer.pause(&assignment);
    }
    let all: Vec<(String, i32)> = {
        let map = core.partitions.lock().unwrap();
        map.iter()
            .flat_map(|(t, ps)| ps.keys().map(move |p| (t.clone(), *p)))
            .collect()
    };
    core.release(consumer, &all);
    if let Err(e) = consumer.close_queue() {
        tracing::warn!(error = %e, "closing the consumer");
    } else {
        while !consumer.closed() {
            if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
                // Fetched after the shutdown started: not handled, not committed.
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kafka: &[(&str, &str)]) -> WorkerConfig {
        let vars = [
            (contract::KAFKA_BOOTSTRAP, "k:9092"),
            (contract::GROUP_ID, "g"),
            (contract::TOPICS, r#"[{"topic":"t"}]"#),
        ];
        let mut c = WorkerConfig::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
        .unwrap();
        for (k, v) in kafka {
            c.kafka.insert(k.to_string(), v.to_string());
        }
        c
    }

    #[test]
    fn a_new_group_starts_at_the_earliest_record_unless_overridden() {
        let c = consumer_config(ClientConfig::new(), &config(&[]));
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(c.get("group.id"), Some("g"));
        let c = consumer_config(
            ClientConfig::new(),
            &config(&[("auto.offset.reset", "latest")]),
        );
        assert_eq!(c.get("auto.offset.reset"), Some("latest"));
    }

    #[test]
    fn offsets_are_never_committed_automatically() {
        let c = consumer_config(
            ClientConfig::new(),
            &config(&[
                ("enable.auto.commit", "true"),
                ("enable.auto.offset.store", "true"),
            ]),
        );
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("10"));
    }
}
