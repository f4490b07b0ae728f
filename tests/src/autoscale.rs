//! Helpers for autoscaler tests and the benchmark: make lag with real records and real
//! commits, as the group's workers would, using the super user's credentials.

use std::time::Duration;

use eventops_devenv::EnvInfo;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

/// Produces `n` small records to `topic`/`partition` and waits until Kafka has them.
pub fn produce(info: &EnvInfo, topic: &str, partition: i32, n: usize) {
    produce_spread(info, topic, &[partition], n);
}

/// Produces `n` small records round-robin over `partitions` of `topic` from one
/// producer, as one burst, and waits until Kafka has them all.
pub fn produce_spread(info: &EnvInfo, topic: &str, partitions: &[i32], n: usize) {
    send_spread(&producer(info), topic, partitions, n);
}

/// A producer for [`send_spread`], so a burst can be timed without a client's start-up.
pub fn producer(info: &EnvInfo) -> ThreadedProducer<DefaultProducerContext> {
    info.kafka_admin_config()
        .set("linger.ms", "5")
        .create()
        .expect("creating a producer")
}

/// Produces `n` small records round-robin over `partitions` of `topic` with `producer`
/// (partition `partitions[i % len]` gets record `i`), and waits until Kafka has them all.
pub fn send_spread(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    partitions: &[i32],
    n: usize,
) {
    for i in 0..n {
        let payload = format!("record {i}");
        let mut record = BaseRecord::<(), _>::to(topic)
            .partition(partitions[i % partitions.len()])
            .payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r)) => {
                    assert!(
                        matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ),
                        "producing to {topic}: {e}"
                    );
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("flushing records");
}

/// Produces `n` records to `topic`/`partition` in one committed transaction: Kafka
/// appends a commit marker after them, which takes an offset of its own.
pub fn produce_in_transaction(info: &EnvInfo, topic: &str, partition: i32, n: usize) {
    let producer: ThreadedProducer<DefaultProducerContext> = info
        .kafka_admin_config()
        .set(
            "transactional.id",
            format!("eventops-test-{topic}-{partition}"),
        )
        .create()
        .expect("creating a transactional producer");
    let timeout = Duration::from_secs(30);
    producer
        .init_transactions(timeout)
        .expect("init transactions");
    producer.begin_transaction().expect("begin transaction");
    for i in 0..n {
        let payload = format!("transactional {i}");
        producer
            .send(
                BaseRecord::<(), _>::to(topic)
                    .partition(partition)
                    .payload(&payload),
            )
            .map_err(|(e, _)| e)
            .expect("producing in a transaction");
    }
    producer
        .commit_transaction(timeout)
        .expect("commit transaction");
}

/// Commits `offset` (the next record to process) for `group` on `topic`/`partition`,
/// as a worker would after processing everything before it. The group must have no
/// active members.
pub fn commit(info: &EnvInfo, group: &str, topic: &str, partition: i32, offset: i64) {
    let consumer: BaseConsumer = info
        .kafka_admin_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("creating a consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .expect("a valid offset");
    consumer
        .commit(&tpl, CommitMode::Sync)
        .unwrap_or_else(|e| panic!("committing {offset} for {group} on {topic}/{partition}: {e}"));
}

/// Commits for one group from one client, as its workers would, for simulations that
/// commit often (a client per commit costs a connection and a SCRAM exchange). The group
/// must have no active members.
pub struct Committer {
    consumer: BaseConsumer,
    group: String,
    topic: String,
}

impl Committer {
    /// A committer for `group` on `topic`.
    pub fn new(info: &EnvInfo, group: &str, topic: &str) -> Self {
        let consumer = info
            .kafka_admin_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("creating a consumer");
        Self {
            consumer,
            group: group.into(),
            topic: topic.into(),
        }
    }

    /// Commits `(partition, offset)` pairs in one request.
    pub fn commit(&self, offsets: &[(i32, i64)]) {
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in offsets {
            tpl.add_partition_offset(&self.topic, *partition, Offset::Offset(*offset))
                .expect("a valid offset");
        }
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .unwrap_or_else(|e| panic!("committing {offsets:?} for {}: {e}", self.group));
    }
}

/// Deletes the records of `topic`/`partition` before `offset` with Kafka's own
/// DeleteRecordsCommand, moving its log-start offset up.
pub async fn delete_records_before(env: &crate::TestEnv, topic: &str, partition: i32, offset: i64) {
    let file = std::env::temp_dir().join(format!("delete-records-{topic}-{partition}.json"));
    let json = serde_json::json!({
        "version": 1,
        "partitions": [{"topic": topic, "partition": partition, "offset": offset}],
    });
    std::fs::write(&file, json.to_string()).expect("writing the DeleteRecords file");
    env.kafka_tool(
        "org.apache.kafka.tools.DeleteRecordsCommand",
        &["--offset-json-file", file.to_str().unwrap()],
    )
    .await
    .expect("DeleteRecordsCommand");
}
