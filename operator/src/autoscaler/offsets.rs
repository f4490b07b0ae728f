//! Committed offsets of every consumer group, read the way Burrow reads them: by
//! consuming Kafka's `__consumer_offsets` topic, where group coordinators record each
//! commit. One consumer, one stream of Fetch requests per broker, however many groups
//! there are; a commit is seen within a fetch wait of being made.
//!
//! Why not ListConsumerGroupOffsets: librdkafka's admin call accepts exactly one group
//! per request (`rd_kafka_ListConsumerGroupOffsets` refuses `list_grpoffsets_cnt != 1`),
//! so N groups would cost N OffsetFetch requests per cycle.
//!
//! Also here: [`Probe`], which tells a partition whose only "lag" is transaction markers
//! or compacted-away records from one with a real unprocessed record.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::kafka::KafkaSettings;
use crate::telemetry::Metrics;

/// Kafka's internal topic of committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// What one `__consumer_offsets` record says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OffsetRecord {
    /// `group` committed `offset` for `topic`/`partition`; `None` when the commit was
    /// deleted (group deleted, offsets expired or removed by DeleteConsumerGroupOffsets).
    Commit {
        /// Consumer group id.
        group: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// The committed offset (the next record to process), if still present.
        offset: Option<i64>,
    },
    /// Another kind of record (group membership metadata): not about offsets.
    Other,
}

/// Parses a `__consumer_offsets` record. Keys of version 0 and 1 are offset commits:
/// `version i16, group string, topic string, partition i32` (strings as `i16` length
/// and bytes). Every value version, flexible ones included, starts with `version i16,
/// offset i64`. `None` when the bytes are malformed.
pub fn parse_offset_record(key: &[u8], value: Option<&[u8]>) -> Option<OffsetRecord> {
    let mut key = Reader(key);
    if !matches!(key.i16()?, 0 | 1) {
        return Some(OffsetRecord::Other);
    }
    let group = key.string()?;
    let topic = key.string()?;
    let partition = key.i32()?;
    let offset = match value {
        None => None,
        Some(value) => {
            let mut value = Reader(value);
            value.i16()?;
            Some(value.i64()?)
        }
    };
    Some(OffsetRecord::Commit {
        group,
        topic,
        partition,
        offset,
    })
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn i16(&mut self) -> Option<i16> {
        self.take().map(i16::from_be_bytes)
    }
    fn i32(&mut self) -> Option<i32> {
        self.take().map(i32::from_be_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_be_bytes)
    }
    fn string(&mut self) -> Option<String> {
        let len = usize::try_from(self.i16()?).ok()?;
        let bytes = self.0.get(..len)?;
        self.0 = &self.0[len..];
        String::from_utf8(bytes.to_vec()).ok()
    }
}

/// Committed offsets by group, then by (topic, partition).
pub type Commits = HashMap<String, BTreeMap<(String, i32), i64>>;

#[derive(Default)]
struct Shared {
    commits: Commits,
    caught_up: bool,
    /// Why `__consumer_offsets` cannot be read right now (Kafka's error), if it cannot:
    /// the commits held are then stale, however caught up they once were.
    failure: Option<String>,
}

/// How long the reader waits after a failure before it restarts fetching from where it
/// stopped, to see whether the cause (a missing ACL, a partition without a leader) is
/// gone: librdkafka reports a fetch error once and then retries quietly, and reports no
/// recovery at all.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(3);

/// The latest committed offsets of every group, kept current by a background consumer
/// of `__consumer_offsets`. Cheap to clone.
#[derive(Clone)]
pub struct CommittedOffsets {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
}

impl CommittedOffsets {
    /// Starts reading `__consumer_offsets` from the beginning on a thread of its own,
    /// which runs until [`Self::stop`].
    pub fn start(settings: &KafkaSettings, metrics: Arc<Metrics>) -> Result<Self, KafkaError> {
        let consumer = reader_consumer(settings, metrics)?;
        let this = Self {
            shared: Arc::default(),
            stop: Arc::default(),
        };
        let (shared, stop) = (this.shared.clone(), this.stop.clone());
        std::thread::Builder::new()
            .name("offsets-reader".into())
            .spawn(move || read_loop(&consumer, &shared, &stop))
            .expect("spawning the offsets reader thread");
        Ok(this)
    }

    /// Whether the reader has reached the end of every partition once: before that, a
    /// group may look like it has no commits when its commit is just not read yet.
    pub fn caught_up(&self) -> bool {
        self.shared.lock().expect("offsets lock").caught_up
    }

    /// Why the committed offsets cannot be read now, in Kafka's words; `None` while the
    /// reader is healthy. While `Some`, no offset it holds may be trusted.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().expect("offsets lock").failure.clone()
    }

    /// The committed offsets of `group`.
    pub fn group(&self, group: &str) -> BTreeMap<(String, i32), i64> {
        let shared = self.shared.lock().expect("offsets lock");
        shared.commits.get(group).cloned().unwrap_or_default()
    }

    /// Stops the reader thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Stores librdkafka's own count of the requests each client sent, by type, so the
/// figures are what went on the wire.
struct StatsContext {
    metrics: Arc<Metrics>,
    client: &'static str,
}

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        let mut totals: BTreeMap<String, i64> = BTreeMap::new();
        for broker in statistics.brokers.values() {
            for (request, n) in &broker.req {
                *totals.entry(request.clone()).or_default() += n;
            }
        }
        for (request, n) in totals {
            self.metrics.client_requests(self.client, &request, n);
        }
    }
}

impl ConsumerContext for StatsContext {}

fn consumer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in &settings.properties {
        config.set(k, v);
    }
    config
        // librdkafka wants a group id even for assign(); nothing joins or commits it.
        .set("group.id", "eventops-operator-lag-reader")
        // Commits made inside transactions count once the transaction commits.
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("allow.auto.create.topics", "false")
        .set("statistics.interval.ms", "1000")
        // Commits matter for scale-down, which waits a stabilization window anyway; a
        // longer long-poll keeps this at about two Fetch requests a second per broker.
        .set("fetch.wait.max.ms", "500");
    config
}

fn reader_consumer(
    settings: &KafkaSettings,
    metrics: Arc<Metrics>,
) -> Result<BaseConsumer<StatsContext>, KafkaError> {
    consumer_config(settings).create_with_context(StatsContext {
        metrics,
        client: "offsets-reader",
    })
}

fn read_loop(consumer: &BaseConsumer<StatsContext>, shared: &Mutex<Shared>, stop: &AtomicBool) {
    let fail = |why: String| {
        let mut shared = shared.lock().expect("offsets lock");
        if shared.failure.as_ref() != Some(&why) {
            tracing::warn!(error = %why, "cannot read {OFFSETS_TOPIC}");
        }
        shared.failure = Some(why);
    };
    // Wait for the topic: a cluster where no group ever committed has none yet.
    let partitions = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match consumer.fetch_metadata(Some(OFFSETS_TOPIC), Duration::from_secs(10)) {
            Ok(m) => match m.topics().first() {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    break t.partitions().len();
                }
                // Not there (yet): no group has committed, so there is nothing to read.
                None => shared.lock().expect("offsets lock").caught_up = true,
                Some(t) => match t.error().map(rdkafka::types::RDKafkaErrorCode::from) {
                    None | Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition) => {
                        shared.lock().expect("offsets lock").caught_up = true;
                    }
                    // Not authorized, say: unknown is not the same as empty.
                    Some(code) => fail(crate::conditions::with_permission_hint(
                        format!("{OFFSETS_TOPIC} metadata: {code:?} ({code})"),
                        "read committed offsets",
                        code,
                    )),
                },
            },
            Err(error) => fail(format!("{OFFSETS_TOPIC} metadata: {error}")),
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    // The next offset to read per partition, to restart from after a failure.
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let assign = |next: &BTreeMap<i32, i64>| {
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            let offset = next
                .get(&p)
                .map_or(Offset::Beginning, |&o| Offset::Offset(o));
            assignment
                .add_partition_offset(OFFSETS_TOPIC, p, offset)
                .expect("a valid offset");
        }
        consumer.assign(&assignment)
    };
    if let Err(error) = assign(&next) {
        tracing::error!(%error, "cannot assign {OFFSETS_TOPIC}; lag cannot be measured");
        fail(format!("assign {OFFSETS_TOPIC}: {error}"));
        return;
    }
    // Partitions read to their end since the last (re)start of fetching.
    let mut at_end = std::collections::BTreeSet::new();
    let mut retry_at: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        if retry_at.is_some_and(|at| Instant::now() >= at) {
            // A new assignment resets librdkafka's per-partition error and end-of-partition
            // memory: the error is reported again if it persists, the end again if not.
            retry_at = None;
            at_end.clear();
            if let Err(error) = assign(&next) {
                fail(format!("assign {OFFSETS_TOPIC}: {error}"));
                retry_at = Some(Instant::now() + RETRY_AFTER_FAILURE);
            }
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p)))
                if at_end.insert(p) && at_end.len() == partitions =>
            {
                let mut shared = shared.lock().expect("offsets lock");
                // Healthy again only once every partition was read to its end after the
                // restart, so no commit made meanwhile is missing.
                if retry_at.is_none() {
                    if shared.failure.take().is_some() {
                        tracing::info!("{OFFSETS_TOPIC} can be read again");
                    }
                    if !shared.caught_up {
                        tracing::info!("read every committed offset in {OFFSETS_TOPIC}");
                    }
                    shared.caught_up = true;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            // librdkafka looks up the coordinator of any group id it is given, even for a
            // consumer that only assigns: refused, that says nothing about reading.
            Some(Err(error))
                if error.rdkafka_error_code()
                    == Some(rdkafka::types::RDKafkaErrorCode::GroupAuthorizationFailed) =>
            {
                tracing::debug!(%error, "the offsets reader's group id is not authorized");
            }
            Some(Err(error)) => {
                let why = format!("reading {OFFSETS_TOPIC}: {error}");
                fail(match error.rdkafka_error_code() {
                    Some(code) => {
                        crate::conditions::with_permission_hint(why, "read committed offsets", code)
                    }
                    None => why,
                });
                retry_at.get_or_insert(Instant::now() + RETRY_AFTER_FAILURE);
            }
            Some(Ok(m)) => {
                next.insert(m.partition(), m.offset() + 1);
                let Some(key) = m.key() else { continue };
                let Some(OffsetRecord::Commit {
                    group,
                    topic,
                    partition,
                    offset,
                }) = parse_offset_record(key, m.payload())
                else {
                    continue;
                };
                let mut shared = shared.lock().expect("offsets lock");
                match offset {
                    Some(offset) => {
                        shared
                            .commits
                            .entry(group)
                            .or_default()
                            .insert((topic, partition), offset);
                    }
                    None => {
                        if let Some(g) = shared.commits.get_mut(&group) {
                            g.remove(&(topic, partition));
                        }
                    }
                }
            }
        }
    }
}

/// The `__consumer_offsets` partition that records `group`'s commits, as Kafka places
/// it: `abs(groupId.hashCode()) % partitions`, Java's `String.hashCode` over UTF-16
/// units and Kafka's `Utils.abs` (`n & 0x7fffffff`).
pub fn offsets_partition(group: &str, partitions: usize) -> i32 {
    let hash = group.encode_utf16().fold(0i32, |h, unit| {
        h.wrapping_mul(31).wrapping_add(i32::from(unit))
    });
    ((hash & 0x7fff_ffff) as usize % partitions.max(1)) as i32
}

/// Reads single partitions to see whether anything a consumer would receive lies
/// between a committed offset and the end.
pub struct Probe {
    consumer: Mutex<BaseConsumer<StatsContext>>,
}

impl Probe {
    /// A read_committed consumer on the operator's connection settings.
    pub fn new(settings: &KafkaSettings, metrics: Arc<Metrics>) -> Result<Self, KafkaError> {
        let consumer = consumer_config(settings).create_with_context(StatsContext {
            metrics,
            client: "lag-probe",
        })?;
        Ok(Self {
            consumer: Mutex::new(consumer),
        })
    }

    /// Whether a read_committed consumer starting at `from` receives a record before
    /// `end`. `false` means `[from, end)` holds only transaction markers, aborted
    /// records or records compaction removed: nothing to process. Blocks for up to
    /// `timeout`; `None` when it could not tell.
    pub fn has_record(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        end: i64,
        timeout: Duration,
    ) -> Option<bool> {
        let consumer = self.consumer.lock().expect("probe lock");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(from))
            .ok()?;
        consumer.assign(&tpl).ok()?;
        let deadline = Instant::now() + timeout;
        let answer = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break None;
            }
            match consumer.poll(left) {
                Some(Ok(m)) => break Some(m.offset() < end),
                Some(Err(KafkaError::PartitionEOF(_))) => break Some(false),
                Some(Err(error)) => {
                    tracing::debug!(%error, topic, partition, "probe");
                    break None;
                }
                None => {}
            }
        };
        let _ = consumer.unassign();
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(version: i16, group: &str, topic: &str, partition: i32) -> Vec<u8> {
        let mut k = version.to_be_bytes().to_vec();
        for s in [group, topic] {
            k.extend((s.len() as i16).to_be_bytes());
            k.extend(s.as_bytes());
        }
        k.extend(partition.to_be_bytes());
        k
    }

    fn value(version: i16, offset: i64) -> Vec<u8> {
        let mut v = version.to_be_bytes().to_vec();
        v.extend(offset.to_be_bytes());
        // Whatever follows (leader epoch, metadata, timestamps) is not read.
        v.extend([0, 0, 0, 7, 0, 0]);
        v
    }

    #[test]
    fn offset_commits_of_every_version_are_read() {
        for (kv, vv) in [(0, 0), (1, 1), (1, 3), (1, 4)] {
            let k = key(kv, "billing", "orders.order.placed", 7);
            let v = value(vv, 1234);
            assert_eq!(
                parse_offset_record(&k, Some(&v)),
                Some(OffsetRecord::Commit {
                    group: "billing".into(),
                    topic: "orders.order.placed".into(),
                    partition: 7,
                    offset: Some(1234),
                }),
                "key v{kv} value v{vv}"
            );
        }
    }

    #[test]
    fn groups_map_to_the_partition_kafka_uses() {
        // "billing".hashCode() is -109829509 in Java: a negative hash.
        assert_eq!(
            offsets_partition("billing", 50),
            (-109_829_509i32 & 0x7fff_ffff) % 50
        );
        assert_eq!(offsets_partition("", 50), 0);
        assert_eq!(offsets_partition("a", 50), 97 % 50);
        assert_eq!(offsets_partition("group", 1), 0);
    }

    #[test]
    fn a_tombstone_deletes_the_commit() {
        let k = key(1, "g", "t", 0);
        assert_eq!(
            parse_offset_record(&k, None),
            Some(OffsetRecord::Commit {
                group: "g".into(),
                topic: "t".into(),
                partition: 0,
                offset: None
            })
        );
    }

    #[test]
    fn group_metadata_is_not_an_offset() {
        let mut k = 2i16.to_be_bytes().to_vec();
        k.extend([0, 1, b'g']);
        assert_eq!(
            parse_offset_record(&k, Some(&[0, 3])),
            Some(OffsetRecord::Other)
        );
    }

    #[test]
    fn truncated_records_are_refused() {
        let k = key(1, "group", "topic", 3);
        assert_eq!(parse_offset_record(&k[..k.len() - 1], None), None);
        assert_eq!(parse_offset_record(&k, Some(&[0, 3, 0, 0])), None);
        assert_eq!(parse_offset_record(&[0], None), None);
    }
}
