//! Helpers for the consumer-runtime tests: worker configuration for the test broker,
//! topics, producing envelopes, reading topics back, the committed offsets as Kafka's own
//! `ConsumerGroupCommand` reports them, and PostgreSQL.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use eventops_consumer_runtime::contract::{self, TopicRoute, WorkerConfig};
use eventops_consumer_runtime::{CORRELATION_HEADER, Envelope};
use eventops_devenv::EnvInfo;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::TestEnv;

/// The contract variables a worker of `group` reading `routes` gets, with the test
/// broker's super-user credentials (as `(name, value)` pairs, to pass to a process too).
pub fn contract_vars(info: &EnvInfo, group: &str, routes: &[TopicRoute]) -> Vec<(String, String)> {
    [
        (contract::KAFKA_BOOTSTRAP, info.kafka_bootstrap.clone()),
        (contract::KAFKA_SECURITY_PROTOCOL, "SASL_PLAINTEXT".into()),
        (
            contract::KAFKA_SASL_MECHANISM,
            info.kafka_sasl_mechanism.clone(),
        ),
        (contract::KAFKA_USERNAME, info.kafka_admin_user.clone()),
        (contract::KAFKA_PASSWORD, info.kafka_admin_password.clone()),
        (contract::GROUP_ID, group.to_string()),
        (contract::TOPICS, serde_json::to_string(routes).unwrap()),
        (contract::MAX_ATTEMPTS, "4".into()),
        (contract::BACKOFF_INITIAL_MS, "50".into()),
        (contract::BACKOFF_MAX_MS, "500".into()),
        (contract::DATABASE_URL, info.postgres_url.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A [`WorkerConfig`] read through the contract from [`contract_vars`].
pub fn worker_config(info: &EnvInfo, group: &str, routes: &[TopicRoute]) -> WorkerConfig {
    let vars: BTreeMap<String, String> = contract_vars(info, group, routes).into_iter().collect();
    WorkerConfig::from_lookup(|k| vars.get(k).cloned()).expect("test contract is valid")
}

/// A route for `topic` with dead-letter topic `<topic>.DLT`.
pub fn route(topic: &str) -> TopicRoute {
    TopicRoute {
        topic: topic.to_string(),
        dead_letter_topic: Some(format!("{topic}.DLT")),
        retry_topics: Vec::new(),
    }
}

/// Creates `topics` with their partition counts (replication 1).
pub async fn create_topics(info: &EnvInfo, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> =
        info.kafka_admin_config().create().expect("admin client");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("CreateTopics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// A producer with the super user's credentials.
pub fn producer(info: &EnvInfo) -> FutureProducer {
    info.kafka_admin_config()
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// An envelope's bytes: event `id` of type `Test`, schema `version`, `data`.
pub fn event(id: &str, version: u32, data: serde_json::Value) -> Vec<u8> {
    let mut e = Envelope::new("Test", version, data).with_correlation_id(format!("corr-{id}"));
    e.id = id.to_string();
    e.to_bytes()
}

/// Produces `payload` with `key` to `partition` of `topic`, with a correlation header
/// `corr-<key>`; returns the offset.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    key: &str,
    payload: &[u8],
) -> i64 {
    let correlation = format!("corr-{key}");
    let headers = OwnedHeaders::new().insert(Header {
        key: CORRELATION_HEADER,
        value: Some(correlation.as_str()),
    });
    let delivery = producer
        .send(
            FutureRecord::to(topic)
                .partition(partition)
                .key(key)
                .payload(payload)
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    delivery.offset
}

/// Reads `topic` from the beginning (no consumer group) until `count` records arrived;
/// panics after `timeout`.
pub async fn read_topic(
    info: &EnvInfo,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let info = info.clone();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = info
            .kafka_admin_config()
            .set("group.id", "unused-by-assign")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in metadata.topics()[0].partitions() {
            tpl.add_partition_offset(&topic, p.id(), rdkafka::Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < count {
            assert!(
                Instant::now() < deadline,
                "{topic}: {} of {count} records after {timeout:?}",
                out.len()
            );
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                out.push(m.detach());
            }
        }
        out
    })
    .await
    .unwrap()
}

/// The last value of header `name` of `m`.
pub fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a [u8]> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
}

/// Committed offsets of `group` per `(topic, partition)`, as Kafka's
/// `ConsumerGroupCommand --describe` prints them (partitions without a commit are left
/// out).
pub async fn committed_offsets(env: &TestEnv, group: &str) -> BTreeMap<(String, i32), i64> {
    let out = env
        .kafka_tool(
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            &["--describe", "--group", group],
        )
        .await
        .expect("ConsumerGroupCommand --describe");
    let mut offsets = BTreeMap::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 4
            && cols[0] == group
            && let (Ok(p), Ok(o)) = (cols[2].parse::<i32>(), cols[3].parse::<i64>())
        {
            offsets.insert((cols[1].to_string(), p), o);
        }
    }
    offsets
}

/// The state (`Stable`, `Empty`, ...) and member count of `group`, from
/// `ConsumerGroupCommand --describe --state`.
pub async fn group_state(env: &TestEnv, group: &str) -> (String, usize) {
    let out = env
        .kafka_tool(
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            &["--describe", "--group", group, "--state"],
        )
        .await
        .expect("ConsumerGroupCommand --describe --state");
    out.lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.first() == Some(&group) && cols.len() >= 3).then(|| {
                let n = cols[cols.len() - 1].parse().expect("#MEMBERS is a number");
                (cols[cols.len() - 2].to_string(), n)
            })
        })
        .next()
        .unwrap_or_else(|| panic!("no state line for {group} in:\n{out}"))
}

/// A PostgreSQL client on the test database.
pub async fn postgres(info: &EnvInfo) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&info.postgres_url, tokio_postgres::NoTls)
        .await
        .expect("connecting to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// Creates the effects table the test worker writes: one row per handler run.
pub async fn create_effects_table(client: &tokio_postgres::Client, table: &str) {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (event_id text NOT NULL, topic text NOT NULL, \
             partition int NOT NULL, \"offset\" bigint NOT NULL)"
        ))
        .await
        .expect("creating the effects table");
}

/// Handler runs per `(partition, offset)` recorded in `table`.
pub async fn effects(client: &tokio_postgres::Client, table: &str) -> BTreeMap<(i32, i64), i64> {
    client
        .query(
            &format!("SELECT partition, \"offset\", count(*) FROM {table} GROUP BY 1, 2"),
            &[],
        )
        .await
        .expect("reading effects")
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect()
}
