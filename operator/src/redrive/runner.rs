//! The redrive loop: read a dead-letter topic up to where it ended when the redrive
//! started, and move the matching records, each exactly once.
//!
//! Exactly once comes from one Kafka transaction per batch: the moved records and the
//! redrive's own consumer offsets (the position in each dead-letter partition, with the
//! counts so far in the offset metadata) commit together or not at all. The
//! transactional id is the redrive's own, so an operator that starts again after a crash
//! fences the one before it (whose open transaction Kafka aborts) and goes on from the
//! committed position. Readers of the destination see only committed records when they
//! read with `isolation.level=read_committed` (librdkafka's default; Java's is
//! `read_uncommitted`).
//!
//! Blocking (librdkafka's transactional calls block): run it on a blocking thread.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use eventops_crds::{RedrivePartition, RedriveSample};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::select::{self, Destination, DltRecord, Filter, Verdict};

/// How long one Kafka call may take before the batch is retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most records read into one transaction.
const BATCH: usize = 10_000;
/// How long a batch waits for more records before it commits what it has.
const BATCH_WAIT: Duration = Duration::from_millis(500);
/// Samples kept for status.
pub const SAMPLES: usize = 5;

/// What to redrive.
#[derive(Clone, Debug)]
pub struct Job {
    /// Client properties: `bootstrap.servers` and the operator's credentials.
    pub properties: BTreeMap<String, String>,
    /// The redrive's consumer group, also its transactional id.
    pub group_id: String,
    /// The dead-letter topic.
    pub source_topic: String,
    /// Where each partition stops, when an earlier run already fixed it.
    pub ends: Option<BTreeMap<i32, i64>>,
    /// Which records move.
    pub filter: Filter,
    /// Where they go.
    pub destination: Destination,
    /// Count only.
    pub dry_run: bool,
    /// Most records moved per second.
    pub max_per_second: Option<u32>,
}

/// Counts in one partition, kept in its committed offset's metadata.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Records that matched the filter.
    pub matched: i64,
    /// Records moved.
    pub moved: i64,
    /// Records that matched but had nowhere to go.
    pub skipped: i64,
}

impl Counts {
    fn to_metadata(self) -> String {
        format!("m={},v={},s={}", self.matched, self.moved, self.skipped)
    }

    fn from_metadata(metadata: &str) -> Self {
        let mut counts = Counts::default();
        for part in metadata.split(',') {
            let Some((k, v)) = part.split_once('=') else {
                continue;
            };
            let Ok(v) = v.parse() else { continue };
            match k {
                "m" => counts.matched = v,
                "v" => counts.moved = v,
                "s" => counts.skipped = v,
                _ => {}
            }
        }
        counts
    }

    fn add(&mut self, other: Counts) {
        self.matched += other.matched;
        self.moved += other.moved;
        self.skipped += other.skipped;
    }
}

/// Where a redrive is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    /// Per partition: start, position, end.
    pub partitions: Vec<RedrivePartition>,
    /// Totals over the partitions.
    pub totals: Counts,
    /// A few matched records.
    pub samples: Vec<RedriveSample>,
    /// Every partition reached its end.
    pub done: bool,
    /// Why the last batch was aborted, until one commits.
    pub retrying: Option<String>,
}

/// Why a run stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The caller asked it to stop (the Redrive was deleted, the operator stops).
    #[error("cancelled")]
    Cancelled,
    /// Kafka refused or failed; the run can be started again from the committed
    /// position.
    #[error("{what}: {error}{}", .earlier.as_ref().map(|e| format!(" (Kafka said before: {e})")).unwrap_or_default())]
    Kafka {
        /// What was attempted.
        what: &'static str,
        /// Kafka's error.
        error: KafkaError,
        /// The client's last error before it, when the call only timed out: a refused
        /// FindCoordinator, for example, surfaces as a timeout of the call that needed it.
        earlier: Option<String>,
    },
}

fn kafka(what: &'static str) -> impl FnOnce(KafkaError) -> RunError {
    move |error| RunError::Kafka {
        what,
        error,
        earlier: None,
    }
}

/// A client context that remembers the client's last error (librdkafka reports some,
/// such as a refused FindCoordinator, only this way).
#[derive(Default)]
struct Remember(std::sync::Mutex<Option<String>>);

impl rdkafka::ClientContext for Remember {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "redrive consumer error");
        *self.0.lock().expect("not poisoned") = Some(format!("{error}: {reason}"));
    }
}

impl rdkafka::consumer::ConsumerContext for Remember {}

/// [`kafka`], with the consumer's last error when the call failed for want of an
/// answer.
fn kafka_with<'a>(
    what: &'static str,
    consumer: &'a BaseConsumer<Remember>,
) -> impl FnOnce(KafkaError) -> RunError + 'a {
    move |error| {
        // Errors that came as events (a refused FindCoordinator, say) wait in the
        // consumer's queue: take them before reading the last one.
        for _ in 0..100 {
            match consumer.poll(Duration::ZERO) {
                Some(Err(e)) => {
                    *consumer.context().0.lock().expect("not poisoned") = Some(e.to_string())
                }
                Some(Ok(_)) => {}
                None => break,
            }
        }
        let earlier = consumer.context().0.lock().expect("not poisoned").clone();
        RunError::Kafka {
            what,
            error,
            earlier,
        }
    }
}

/// A dead-letter record read into a batch.
struct Owned {
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Owned {
    fn view(&self) -> DltRecord<'_> {
        DltRecord {
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.as_deref(),
            headers: &self.headers,
        }
    }
}

/// Runs `job` to its end. `report` gets the progress once the start and end of every
/// partition are known (before anything moves), after each committed batch, and at the
/// end; when it returns `false` the run stops between batches.
pub fn run(job: &Job, report: &mut dyn FnMut(&Progress) -> bool) -> Result<Progress, RunError> {
    let mut config = ClientConfig::new();
    for (k, v) in &job.properties {
        config.set(k, v);
    }
    let consumer: BaseConsumer<Remember> = config
        .clone()
        .set("group.id", &job.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create_with_context(Remember::default())
        .map_err(kafka("create the redrive's consumer"))?;

    let metadata = consumer
        .fetch_metadata(Some(&job.source_topic), CALL_TIMEOUT)
        .map_err(kafka_with(
            "read the dead-letter topic's metadata",
            &consumer,
        ))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == job.source_topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        tpl.add_partition(&job.source_topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, CALL_TIMEOUT)
        .map_err(kafka_with(
            "read the redrive's committed offsets",
            &consumer,
        ))?;

    let mut state: BTreeMap<i32, (RedrivePartition, Counts)> = BTreeMap::new();
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(&job.source_topic, p, CALL_TIMEOUT)
            .map_err(kafka_with(
                "read the dead-letter topic's offsets",
                &consumer,
            ))?;
        let end = job
            .ends
            .as_ref()
            .and_then(|e| e.get(&p).copied())
            .unwrap_or(high);
        let elem = committed.find_partition(&job.source_topic, p);
        let (position, counts) = match elem.as_ref().map(|e| (e.offset(), e.metadata())) {
            Some((Offset::Offset(o), metadata)) if !job.dry_run => {
                (o, Counts::from_metadata(metadata))
            }
            _ => (low, Counts::default()),
        };
        let start = low.min(position);
        state.insert(
            p,
            (
                RedrivePartition {
                    partition: p,
                    start,
                    position: position.max(low),
                    end,
                },
                counts,
            ),
        );
    }
    let mut samples = Vec::new();
    let progress = |state: &BTreeMap<i32, (RedrivePartition, Counts)>,
                    samples: &Vec<RedriveSample>| {
        let mut totals = Counts::default();
        for (_, c) in state.values() {
            totals.add(*c);
        }
        Progress {
            partitions: state.values().map(|(p, _)| p.clone()).collect(),
            totals,
            samples: samples.clone(),
            done: state.values().all(|(p, _)| p.position >= p.end),
            retrying: None,
        }
    };
    if !report(&progress(&state, &samples)) {
        return Err(RunError::Cancelled);
    }

    let producer: Option<BaseProducer> = if job.dry_run {
        None
    } else {
        let producer: BaseProducer = config
            .clone()
            .set("transactional.id", &job.group_id)
            .set("transaction.timeout.ms", "60000")
            .set("linger.ms", "5")
            // Java's default partitioner, for a record that does not go back to the
            // partition it came from.
            .set("partitioner", "murmur2_random")
            .create()
            .map_err(kafka("create the redrive's transactional producer"))?;
        producer
            .init_transactions(CALL_TIMEOUT)
            .map_err(kafka("initialise the redrive's transactions"))?;
        Some(producer)
    };

    let assign = |state: &BTreeMap<i32, (RedrivePartition, Counts)>| {
        let mut tpl = TopicPartitionList::new();
        for (p, (pos, _)) in state {
            if pos.position < pos.end {
                tpl.add_partition_offset(&job.source_topic, *p, Offset::Offset(pos.position))
                    .expect("a valid offset");
            }
        }
        consumer
            .assign(&tpl)
            .map_err(kafka("assign the dead-letter partitions"))
    };
    assign(&state)?;

    let started = Instant::now();
    let mut moved_this_run: u64 = 0;
    let mut consumer_error: Option<String> = None;
    let batch_limit = job
        .max_per_second
        .map_or(BATCH, |r| (r as usize / 5).clamp(1, BATCH));
    loop {
        let current = progress(&state, &samples);
        if current.done {
            report(&current);
            return Ok(current);
        }
        // Read a batch: every record up to each partition's end.
        let mut batch: Vec<Owned> = Vec::new();
        let mut read: BTreeMap<i32, i64> = BTreeMap::new();
        let deadline = Instant::now() + BATCH_WAIT;
        while batch.len() < batch_limit && Instant::now() < deadline {
            let all_read = state
                .iter()
                .all(|(p, (pos, _))| read.get(p).copied().unwrap_or(pos.position) >= pos.end);
            if all_read {
                break;
            }
            match consumer.poll(Duration::from_millis(20)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    // Everything there was is read: the end it had when the redrive
                    // started is behind (or, with an open transaction, as far as it
                    // goes); what came later is not this redrive's.
                    if let Some((pos, _)) = state.get(&p) {
                        read.insert(p, pos.end);
                    }
                }
                Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => {
                    return Err(kafka("read the dead-letter topic")(e));
                }
                Some(Err(e)) => {
                    // librdkafka retries by itself (a broker down, a coordinator not
                    // found); say so in status meanwhile.
                    tracing::debug!(group = %job.group_id, error = %e, "redrive consumer error");
                    consumer_error = Some(e.to_string());
                }
                Some(Ok(m)) => {
                    let p = m.partition();
                    let Some((pos, _)) = state.get(&p) else {
                        continue;
                    };
                    if m.offset() >= pos.end {
                        read.insert(p, pos.end);
                        continue;
                    }
                    read.insert(p, m.offset() + 1);
                    batch.push(Owned {
                        partition: p,
                        offset: m.offset(),
                        timestamp_ms: m.timestamp().to_millis(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                        headers: m
                            .headers()
                            .map(|hs| {
                                hs.iter()
                                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    });
                }
            }
        }
        if read.is_empty() {
            let mut current = current;
            current.retrying = consumer_error
                .take()
                .map(|e| format!("read the dead-letter topic: {e}"));
            if !report(&current) {
                return Err(RunError::Cancelled);
            }
            continue;
        }

        let outcome = apply_batch(
            job,
            producer.as_ref(),
            &consumer,
            &batch,
            &read,
            &state,
            &mut samples,
            |moved| {
                moved_this_run += moved;
                moved_this_run
            },
            started,
        );
        let retrying = match outcome {
            Ok(added) => {
                for (p, end) in &read {
                    if let Some((pos, counts)) = state.get_mut(p) {
                        pos.position = *end;
                        counts.add(added.get(p).copied().unwrap_or_default());
                    }
                }
                for (p, (pos, _)) in &state {
                    if pos.position >= pos.end {
                        let mut tpl = TopicPartitionList::new();
                        tpl.add_partition(&job.source_topic, *p);
                        let _ = consumer.pause(&tpl);
                    }
                }
                None
            }
            Err(e) => {
                if let RunError::Kafka {
                    error: KafkaError::Transaction(t),
                    ..
                } = &e
                    && t.is_fatal()
                {
                    // Fenced by a newer producer of the same id, or refused: this
                    // producer cannot go on; a new run starts from the committed position.
                    return Err(e);
                }
                // Nothing of the batch is committed: read it again from the position.
                tracing::warn!(group = %job.group_id, error = %e, "redrive batch aborted; retrying it");
                std::thread::sleep(Duration::from_secs(1));
                assign(&state)?;
                Some(super::explain(&e))
            }
        };
        let mut now = progress(&state, &samples);
        now.retrying = retrying;
        if !report(&now) {
            return Err(RunError::Cancelled);
        }
    }
}

/// Moves the matching records of `batch` and commits the positions `read` in one
/// transaction (or, in a dry run, only counts); returns the counts per partition.
#[allow(clippy::too_many_arguments)]
fn apply_batch(
    job: &Job,
    producer: Option<&BaseProducer>,
    consumer: &BaseConsumer<Remember>,
    batch: &[Owned],
    read: &BTreeMap<i32, i64>,
    state: &BTreeMap<i32, (RedrivePartition, Counts)>,
    samples: &mut Vec<RedriveSample>,
    mut count_moved: impl FnMut(u64) -> u64,
    started: Instant,
) -> Result<BTreeMap<i32, Counts>, RunError> {
    let mut added: BTreeMap<i32, Counts> = BTreeMap::new();
    if let Some(producer) = producer {
        producer
            .begin_transaction()
            .map_err(kafka("begin a transaction"))?;
    }
    let result = (|| {
        for r in batch {
            let view = r.view();
            let verdict = select::decide(&view, &job.filter, &job.destination);
            let counts = added.entry(r.partition).or_default();
            match &verdict {
                Verdict::NotMatched => continue,
                Verdict::Skip => counts.skipped += 1,
                Verdict::Move { .. } => counts.moved += 1,
            }
            counts.matched += 1;
            let seen = samples
                .iter()
                .any(|s| s.partition == r.partition && s.offset == r.offset);
            if samples.len() < SAMPLES && !seen {
                samples.push(select::sample(&view, &verdict));
            }
            let (Verdict::Move { topic, partition }, Some(producer)) = (&verdict, producer) else {
                continue;
            };
            if let Some(rate) = job.max_per_second {
                pace(count_moved(1), rate, started);
            }
            let mut headers = OwnedHeaders::new();
            for (key, value) in select::moved_headers(&view, &job.source_topic) {
                headers = headers.insert(Header {
                    key: &key,
                    value: value.as_deref(),
                });
            }
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).headers(headers);
            if let Some(key) = &r.key {
                record = record.key(key.as_slice());
            }
            if let Some(payload) = &r.payload {
                record = record.payload(payload.as_slice());
            }
            if let Some(p) = partition {
                record = record.partition(*p);
            }
            let mut record = record;
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((
                        KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        back,
                    )) => {
                        producer.poll(Duration::from_millis(50));
                        record = back;
                    }
                    Err((e, _)) => return Err(kafka("send a redriven record")(e)),
                }
            }
            producer.poll(Duration::ZERO);
        }
        Ok(())
    })();
    let Some(producer) = producer else {
        result?;
        return Ok(added);
    };
    let committed = result.and_then(|()| {
        let mut offsets = TopicPartitionList::new();
        for (p, (pos, counts)) in state {
            let position = read.get(p).copied().unwrap_or(pos.position);
            let mut total = *counts;
            total.add(added.get(p).copied().unwrap_or_default());
            offsets
                .add_partition_offset(&job.source_topic, *p, Offset::Offset(position))
                .expect("a valid offset");
            if let Some(mut elem) = offsets.find_partition(&job.source_topic, *p) {
                elem.set_metadata(total.to_metadata());
            }
        }
        let metadata = consumer
            .group_metadata()
            .expect("a consumer with a group id has group metadata");
        producer
            .send_offsets_to_transaction(&offsets, &metadata, CALL_TIMEOUT)
            .map_err(kafka("add the redrive's offsets to the transaction"))?;
        producer
            .commit_transaction(CALL_TIMEOUT)
            .map_err(kafka("commit the transaction"))
    });
    match committed {
        Ok(()) => Ok(added),
        Err(e) => {
            let _ = producer.abort_transaction(CALL_TIMEOUT);
            Err(e)
        }
    }
}

/// Sleeps until `moved` records are allowed at `rate` per second since `started`
/// (a burst of a fifth of a second is allowed).
fn pace(moved: u64, rate: u32, started: Instant) {
    let rate = f64::from(rate.max(1));
    let burst = (rate / 5.0).max(1.0);
    let due = (moved as f64 - burst).max(0.0) / rate;
    let elapsed = started.elapsed().as_secs_f64();
    if due > elapsed {
        std::thread::sleep(Duration::from_secs_f64(due - elapsed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_the_offset_metadata() {
        let c = Counts {
            matched: 12,
            moved: 9,
            skipped: 3,
        };
        assert_eq!(Counts::from_metadata(&c.to_metadata()), c);
        assert_eq!(Counts::from_metadata(""), Counts::default());
        assert_eq!(
            Counts::from_metadata("m=1,junk,v=x,s=2"),
            Counts {
                matched: 1,
                moved: 0,
                skipped: 2
            }
        );
    }
}
