//! The transactional outbox against the real PostgreSQL and broker: what a rolled-back
//! transaction publishes (nothing), a `kill -9` of the standalone relay while rows are
//! committed and not yet published, order per key with two relays sharing one table, and
//! a worker whose handler appends in its inbox transaction.
//!
//! Relays and workers run as tenants: their own SCRAM user with Write on the outbox's
//! topic (and Read on what a worker consumes), nothing else. Kafka's own tools
//! (`GetOffsetShell`) count what reached the topic.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use eventops_consumer_runtime::contract::{self, Idempotency};
use eventops_consumer_runtime::outbox::{OutboxMessage, Relay, RelayOptions, append};
use eventops_consumer_runtime::tokio_postgres::Transaction;
use eventops_consumer_runtime::{
    Context, Envelope, Event, HandlerError, TransactionalHandler, Worker,
};
use eventops_tests::pg::{connect, fresh_database};
use eventops_tests::runtime::*;
use eventops_tests::{TestEnv, env, eventually, free_port, http_get, unique, workspace_binary};
use rdkafka::Message;
use rdkafka::producer::FutureProducer;
use tokio::sync::oneshot;

const TIMEOUT: Duration = Duration::from_secs(90);

/// A tenant: a SCRAM user allowed to write `topic` and nothing else.
async fn writer_of(env: &TestEnv, topic: &str) -> (String, String) {
    let user = unique("outbox-relay");
    let password = "relay-secret".to_string();
    create_scram_user(env, &user, &password).await;
    set_acl(env, true, &user, "Write", &["--topic", topic]).await;
    (user, password)
}

/// An idempotent producer with `user`'s credentials, as a relay has.
fn tenant_producer(env: &TestEnv, (user, password): &(String, String)) -> FutureProducer {
    // Built from the broker's address and the tenant's credentials only: nothing of the
    // super user's configuration reaches the relay under test.
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.info.kafka_bootstrap)
        .set("security.protocol", "SASL_PLAINTEXT")
        .set("sasl.mechanism", &env.info.kafka_sasl_mechanism)
        .set("sasl.username", user)
        .set("sasl.password", password)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// A database with the shipped schema applied.
async fn outbox_database(
    env: &TestEnv,
) -> (String, eventops_consumer_runtime::tokio_postgres::Client) {
    let url = fresh_database(&env.info).await;
    eventops_consumer_runtime::postgres::migrate_url(&url)
        .await
        .expect("applying the shipped migrations");
    let client = connect(&url).await;
    (url, client)
}

/// A relay running in this process until the returned sender is dropped or fired.
async fn spawn_relay(
    url: &str,
    producer: FutureProducer,
    options: RelayOptions,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
    Arc<eventops_consumer_runtime::outbox::RelayStats>,
) {
    let relay = Relay::connect(url, producer, options).await.expect("relay");
    let stats = relay.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(relay.run_until(async move {
        let _ = stopped.await;
    }));
    (stop, task, stats)
}

async fn pending_rows(client: &eventops_consumer_runtime::tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM eventops_outbox", &[])
        .await
        .expect("counting outbox rows")
        .get(0)
}

fn message(topic: &str, key: &str, id: &str) -> OutboxMessage {
    let mut e = Envelope::new("Test", 1, serde_json::json!({ "key": key }));
    e.id = id.to_string();
    OutboxMessage::event(topic, Some(key.as_bytes()), &e).expect("serialising")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolled_back_transaction_publishes_nothing_and_a_committed_one_is_published_once() {
    let env = env().await;
    let topic = unique("outbox-rollback");
    create_topics(&env.info, &[(&topic, 3)]).await;
    let creds = writer_of(&env, &topic).await;
    let (url, mut client) = outbox_database(&env).await;

    let (stop, task, stats) =
        spawn_relay(&url, tenant_producer(&env, &creds), RelayOptions::default()).await;
    // Rolled back: three rows that must never reach Kafka.
    let tx = client.transaction().await.unwrap();
    for i in 0..3 {
        append(
            &tx,
            &message(&topic, &format!("k{i}"), &format!("rolled-back-{i}")),
        )
        .await
        .unwrap();
    }
    tx.rollback().await.unwrap();
    // Committed: two rows, published once each.
    let tx = client.transaction().await.unwrap();
    for i in 0..2 {
        append(
            &tx,
            &message(&topic, &format!("k{i}"), &format!("committed-{i}")),
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();

    let records = read_topic(&env.info, &topic, 2, TIMEOUT).await;
    eventually(TIMEOUT, "the published rows deleted", || async {
        (pending_rows(&client).await == 0).then_some(())
    })
    .await;
    // Something ran after the rollback: the relay published what committed after it, and
    // then waited with nothing to do. Kafka's own count is exactly those two.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop.send(());
    task.await.unwrap();
    assert_eq!(topic_record_count(&env, &topic).await, 2);
    let ids: BTreeSet<String> = records
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from(["committed-0".into(), "committed-1".into()])
    );
    assert_eq!(stats.published.load(Ordering::Relaxed), 2);
    assert_eq!(stats.refused.load(Ordering::Relaxed), 0);
}

/// The value of the metric line `name` (without labels) in `encoded`.
fn gauge(encoded: &str, name: &str) -> Option<f64> {
    encoded
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// An idle relay is woken by the commit (`LISTEN/NOTIFY`), not by its fallback poll,
/// here 10 minutes; and the gauges the chart's `EventOpsOutboxStalled` alert reads show
/// a row that cannot be published: pending 1, its age growing.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_relay_is_woken_by_the_commit_and_its_gauges_show_what_waits() {
    let env = env().await;
    let (topic, other) = (unique("outbox-woken"), unique("outbox-not-allowed"));
    create_topics(&env.info, &[(&topic, 1), (&other, 1)]).await;
    let creds = writer_of(&env, &topic).await;
    let (url, client) = outbox_database(&env).await;
    let options = RelayOptions {
        fallback_poll: Duration::from_secs(600),
        gauge_interval: Duration::from_millis(200),
        topics: Some(BTreeSet::from([topic.clone()])),
        ..RelayOptions::default()
    };
    let metrics = Arc::new(eventops_consumer_runtime::metrics::Metrics::default());
    let relay = Relay::connect(&url, tenant_producer(&env, &creds), options)
        .await
        .expect("relay")
        .with_metrics(metrics.clone());
    let stats = relay.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(relay.run_until(async move {
        let _ = stopped.await;
    }));
    // The relay's first cycle finds nothing; then it waits.
    append(&client, &message(&topic, "k", "first"))
        .await
        .unwrap();
    read_topic(&env.info, &topic, 1, TIMEOUT).await;
    eventually(TIMEOUT, "the first row deleted", || async {
        (pending_rows(&client).await == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Committed while it waits: on Kafka long before a 600 s poll would look.
    let committed = Instant::now();
    append(&client, &message(&topic, "k", "second"))
        .await
        .unwrap();
    read_topic(&env.info, &topic, 2, TIMEOUT).await;
    let woken_in = committed.elapsed();
    assert!(
        woken_in < Duration::from_secs(30),
        "the second row took {woken_in:?}: the relay waited for its poll, not the notification"
    );
    assert_eq!(stats.published.load(Ordering::Relaxed), 2);

    // A row it may not publish stays: the gauges say so.
    append(&client, &message(&other, "stuck", "refused"))
        .await
        .unwrap();
    let (pending, age) = eventually(TIMEOUT, "the gauges showing the waiting row", || async {
        let encoded = metrics.encode();
        let pending = gauge(&encoded, "eventops_worker_outbox_pending_rows")?;
        let age = gauge(
            &encoded,
            "eventops_worker_outbox_oldest_pending_age_seconds",
        )?;
        (pending == 1.0 && age >= 2.0).then_some((pending, age))
    })
    .await;
    let _ = stop.send(());
    task.await.unwrap();
    assert_eq!(topic_record_count(&env, &other).await, 0);
    println!("woken in {woken_in:?}; gauges: pending {pending}, oldest age {age:.1} s");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_for_a_topic_outside_the_allowed_list_stays_and_holds_back_its_key_only() {
    let env = env().await;
    let (topic, other) = (unique("outbox-allowed"), unique("outbox-refused"));
    create_topics(&env.info, &[(&topic, 1), (&other, 1)]).await;
    let creds = writer_of(&env, &topic).await;
    let (url, client) = outbox_database(&env).await;
    // The refused row first, then a row of the same key and rows of other keys.
    append(&client, &message(&other, "stuck", "refused-1"))
        .await
        .unwrap();
    append(&client, &message(&topic, "stuck", "after-refused"))
        .await
        .unwrap();
    let mut free = Vec::new();
    for i in 0..40 {
        let key = format!("free-{i}");
        append(&client, &message(&topic, &key, &format!("free-{i}")))
            .await
            .unwrap();
        free.push(key);
    }
    let options = RelayOptions {
        topics: Some(BTreeSet::from([topic.clone()])),
        shards_per_claim: 16,
        ..RelayOptions::default()
    };
    let (stop, task, stats) = spawn_relay(&url, tenant_producer(&env, &creds), options).await;
    eventually(TIMEOUT, "the refusal counted", || async {
        (stats.refused.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;
    // What stays is the refused row and the row of its key behind it; every other key
    // drains.
    let left: Vec<String> = eventually(TIMEOUT, "every other key drained", || async {
        let left: Vec<String> = client
            .query("SELECT event_id FROM eventops_outbox ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        (left.len() == 2).then_some(left)
    })
    .await;
    assert_eq!(left, ["refused-1", "after-refused"]);
    let _ = stop.send(());
    task.await.unwrap();
    assert_eq!(topic_record_count(&env, &other).await, 0);
    let published = topic_record_count(&env, &topic).await;
    assert_eq!(published, 40, "every other key's row reached Kafka, once");
    let on_topic = read_topic(&env.info, &topic, published as usize, TIMEOUT).await;
    assert!(
        on_topic.iter().all(|m| m.key() != Some(b"stuck")),
        "a row behind the refused one of its key was published"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn transactions_of_one_key_are_published_in_the_order_they_committed() {
    let env = env().await;
    let topic = unique("outbox-commit-order");
    create_topics(&env.info, &[(&topic, 3)]).await;
    let creds = writer_of(&env, &topic).await;
    let (url, client) = outbox_database(&env).await;
    // For each key: transaction "first" appends, then holds its transaction open for
    // 300 ms; "second" appends 50 ms after "first" did and commits at once. Without a
    // per-key lock "second" would commit first yet have the higher row id, and be
    // published after "first": not in commit order. The relay starts once both have
    // committed, so it cannot publish "second" in the moment before "first" commits.
    let mut rounds = Vec::new();
    for k in 0..5 {
        let (url, topic) = (url.clone(), topic.clone());
        rounds.push(tokio::spawn(async move {
            let key = format!("key-{k}");
            let mut a = connect(&url).await;
            let mut b = connect(&url).await;
            let first = async {
                let tx = a.transaction().await.unwrap();
                append(&tx, &message(&topic, &key, &format!("{key}-first")))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
                tx.commit().await.unwrap();
                Instant::now()
            };
            let second = async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let tx = b.transaction().await.unwrap();
                append(&tx, &message(&topic, &key, &format!("{key}-second")))
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                Instant::now()
            };
            let (first_at, second_at) = tokio::join!(first, second);
            let commit_order = if first_at <= second_at {
                [format!("{key}-first"), format!("{key}-second")]
            } else {
                [format!("{key}-second"), format!("{key}-first")]
            };
            (key, commit_order)
        }));
    }
    let mut expected = BTreeMap::new();
    for r in rounds {
        let (key, order) = r.await.unwrap();
        expected.insert(key, order.to_vec());
    }
    let (stop, task, _) =
        spawn_relay(&url, tenant_producer(&env, &creds), RelayOptions::default()).await;
    let records = read_topic(&env.info, &topic, 10, TIMEOUT).await;
    eventually(TIMEOUT, "the outbox emptied", || async {
        (pending_rows(&client).await == 0).then_some(())
    })
    .await;
    let _ = stop.send(());
    task.await.unwrap();
    let mut published: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &records {
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        published
            .entry(v["data"]["key"].as_str().unwrap().to_string())
            .or_default()
            .push(v["id"].as_str().unwrap().to_string());
    }
    assert_eq!(
        published, expected,
        "per key: published order against commit order"
    );
}

/// Commits `count` rows for `keys` with sequence numbers, one transaction per row, keys
/// taken in turn; returns when all are committed.
async fn write_sequences(url: &str, topic: &str, keys: &[String], count: usize) {
    let mut client = connect(url).await;
    for i in 0..count {
        let key = &keys[i % keys.len()];
        let seq = i / keys.len();
        let mut e = Envelope::new("Seq", 1, serde_json::json!({ "key": key, "seq": seq }));
        e.id = format!("{key}-{seq}");
        let tx = client.transaction().await.unwrap();
        append(
            &tx,
            &OutboxMessage::event(topic, Some(key.as_bytes()), &e).unwrap(),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_relays_share_one_table_keep_order_per_key_over_10k_events_on_6_partitions() {
    let env = env().await;
    env.time_limit(Duration::from_secs(300));
    let topic = unique("outbox-order");
    create_topics(&env.info, &[(&topic, 6)]).await;
    let creds = writer_of(&env, &topic).await;
    let (url, client) = outbox_database(&env).await;
    let (stop_a, task_a, a) =
        spawn_relay(&url, tenant_producer(&env, &creds), RelayOptions::default()).await;
    let (stop_b, task_b, b) =
        spawn_relay(&url, tenant_producer(&env, &creds), RelayOptions::default()).await;

    // Four writers, each with its own 25 keys: a key's commit order is its sequence.
    const TOTAL: usize = 10_000;
    let mut writers = Vec::new();
    for w in 0..4 {
        let keys: Vec<String> = (0..25).map(|k| format!("w{w}-key{k}")).collect();
        let (url, topic) = (url.clone(), topic.clone());
        writers.push(tokio::spawn(async move {
            write_sequences(&url, &topic, &keys, TOTAL / 4).await
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let records = read_topic(&env.info, &topic, TOTAL, TIMEOUT).await;
    eventually(TIMEOUT, "the outbox emptied", || async {
        (pending_rows(&client).await == 0).then_some(())
    })
    .await;
    let _ = (stop_a.send(()), stop_b.send(()));
    task_a.await.unwrap();
    task_b.await.unwrap();

    assert_eq!(
        topic_record_count(&env, &topic).await,
        TOTAL as i64,
        "no row published twice"
    );
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut partition_of: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
    // read_topic returns each partition's records in offset order.
    for m in &records {
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let key = v["data"]["key"].as_str().unwrap().to_string();
        partition_of
            .entry(key.clone())
            .or_default()
            .insert(m.partition());
        by_key
            .entry(key)
            .or_default()
            .push(v["data"]["seq"].as_u64().unwrap());
    }
    assert_eq!(by_key.len(), 100);
    for (key, seqs) in &by_key {
        let expected: Vec<u64> = (0..(TOTAL / 100) as u64).collect();
        assert_eq!(seqs, &expected, "key {key} out of order or incomplete");
        assert_eq!(
            partition_of[key].len(),
            1,
            "key {key} on several partitions"
        );
    }
    let used: BTreeSet<i32> = records.iter().map(|m| m.partition()).collect();
    assert_eq!(used.len(), 6, "keys spread over the 6 partitions");
    let (pa, pb) = (
        a.published.load(Ordering::Relaxed),
        b.published.load(Ordering::Relaxed),
    );
    assert_eq!(pa + pb, TOTAL as u64);
    assert!(pa > 0 && pb > 0, "both relays make progress: {pa} and {pb}");
}

/// The standalone relay binary as a tenant, with its metrics on `port`.
fn relay_process(
    env: &TestEnv,
    url: &str,
    topic: &str,
    creds: &(String, String),
    port: u16,
) -> Child {
    Command::new(workspace_binary("eventops-outbox-relay"))
        .env(contract::OUTBOX_DATABASE_URL, url)
        .env(contract::KAFKA_BOOTSTRAP, &env.info.kafka_bootstrap)
        .env(contract::KAFKA_SECURITY_PROTOCOL, "SASL_PLAINTEXT")
        .env(
            contract::KAFKA_SASL_MECHANISM,
            &env.info.kafka_sasl_mechanism,
        )
        .env(contract::KAFKA_USERNAME, &creds.0)
        .env(contract::KAFKA_PASSWORD, &creds.1)
        .env(
            contract::OUTBOX_TOPICS,
            serde_json::to_string(&[topic]).unwrap(),
        )
        .env(contract::HEALTH_ADDR, format!("127.0.0.1:{port}"))
        // Small cycles, so that a kill finds rows committed and not yet published.
        .env("EVENTOPS_OUTBOX_BATCH", "50")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("starting eventops-outbox-relay")
}

/// Kills the child with SIGKILL when dropped, so no relay outlives its test.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn published_metric(port: u16) -> Option<u64> {
    let (_, body) = http_get(port, "/metrics")?;
    body.lines()
        .find(|l| l.starts_with("eventops_worker_outbox_published_total"))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// Applies every event of `topic` once per event id, through the runtime's inbox.
struct Apply {
    table: String,
}

impl TransactionalHandler for Apply {
    async fn handle(
        &self,
        event: &Event<'_>,
        tx: &Transaction<'_>,
        _ctx: &Context<'_>,
    ) -> Result<(), HandlerError> {
        let r = event.record();
        tx.execute(
            &format!(
                "INSERT INTO {} (event_id, topic, partition, \"offset\") VALUES ($1, $2, $3, $4)",
                self.table
            ),
            &[&event.id(), &r.topic(), &r.partition(), &r.offset()],
        )
        .await
        .map_err(HandlerError::transient)?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_killed_between_commit_and_publish_loses_nothing_and_the_inbox_applies_each_once() {
    let env = env().await;
    env.time_limit(Duration::from_secs(300));
    let topic = unique("outbox-crash");
    create_topics(&env.info, &[(&topic, 3)]).await;
    let creds = writer_of(&env, &topic).await;
    let (url, client) = outbox_database(&env).await;
    let port = free_port();

    // Rows committed while no relay runs: committed, not published.
    const TOTAL: usize = 6_000;
    let keys: Vec<String> = (0..50).map(|k| format!("key{k}")).collect();
    write_sequences(&url, &topic, &keys, 2_000).await;
    let mut relay = Killed(relay_process(&env, &url, &topic, &creds, port));
    // Killed twice while it publishes and writers keep committing.
    let writer = {
        let (url, topic) = (url.clone(), topic.clone());
        let keys: Vec<String> = (0..50).map(|k| format!("later{k}")).collect();
        tokio::spawn(async move { write_sequences(&url, &topic, &keys, TOTAL - 2_000).await })
    };
    for round in 0..2 {
        eventually(TIMEOUT, "the relay publishing", || async {
            (published_metric(port).unwrap_or(0) > 200).then_some(())
        })
        .await;
        let before = pending_rows(&client).await;
        relay.0.kill().expect("kill -9 of the relay");
        relay.0.wait().unwrap();
        eprintln!("relay killed (round {round}) with {before} rows pending");
        assert!(before > 0, "the kill came after everything was published");
        relay = Killed(relay_process(&env, &url, &topic, &creds, port));
    }
    writer.await.unwrap();
    eventually(TIMEOUT, "the outbox emptied after the restarts", || async {
        (pending_rows(&client).await == 0).then_some(())
    })
    .await;
    drop(relay);

    let on_kafka = topic_record_count(&env, &topic).await;
    assert!(
        on_kafka >= TOTAL as i64,
        "{on_kafka} records for {TOTAL} events"
    );
    eprintln!(
        "{on_kafka} records on the topic for {TOTAL} events (republished after kill -9: {})",
        on_kafka - TOTAL as i64
    );

    // A consumer with the PostgreSQL inbox applies each event id exactly once.
    let group = unique("outbox-consumer");
    let table = unique("outbox_effects").replace('-', "_");
    create_effects_table(&client, &table).await;
    let reader = unique("outbox-reader");
    create_scram_user(&env, &reader, "reader-secret").await;
    set_acl(&env, true, &reader, "Read", &["--topic", &topic]).await;
    set_acl(&env, true, &reader, "Read", &["--group", &group]).await;
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .kafka_property("sasl.username", reader.clone())
        .kafka_property("sasl.password", "reader-secret")
        .health_server(false)
        .idempotency(Idempotency::Postgres)
        .postgres_url(url.clone())
        .build_transactional(Apply {
            table: table.clone(),
        })
        .await
        .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    let applied: BTreeMap<String, i64> = eventually(TIMEOUT, "every event applied", || async {
        let rows = client
            .query(
                &format!("SELECT event_id, count(*) FROM {table} GROUP BY 1"),
                &[],
            )
            .await
            .unwrap();
        (rows.len() == TOTAL).then(|| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    })
    .await;
    // Let the duplicates, if any, reach the worker too: wait until it is at the end.
    eventually(TIMEOUT, "the consumer at the end of the topic", || async {
        let p = group_positions(&env, &group).await;
        (p.len() == 3 && p.values().all(|(c, e)| c == e)).then_some(())
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let applied_again: BTreeMap<String, i64> = client
        .query(
            &format!("SELECT event_id, count(*) FROM {table} GROUP BY 1"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(applied.len(), TOTAL);
    assert!(
        applied_again.values().all(|n| *n == 1),
        "an event applied twice"
    );
    assert_eq!(applied_again.len(), TOTAL);
    eprintln!(
        "applied {TOTAL} events once each in {:?}",
        started.elapsed()
    );
}

/// Appends a `Captured` event for every event it handles, failing the first attempt
/// after appending: that attempt's transaction rolls back, and its event with it.
struct Capture {
    out: String,
    failed_once: std::sync::Mutex<BTreeSet<String>>,
}

impl TransactionalHandler for Capture {
    async fn handle(
        &self,
        event: &Event<'_>,
        tx: &Transaction<'_>,
        ctx: &Context<'_>,
    ) -> Result<(), HandlerError> {
        let mut captured = Envelope::new("Captured", 1, serde_json::json!({ "of": event.id() }));
        captured.id = format!("captured-{}", event.id());
        ctx.outbox_event(tx, &self.out, event.record().key(), captured)
            .await?;
        if self
            .failed_once
            .lock()
            .unwrap()
            .insert(event.id().to_string())
        {
            return Err(HandlerError::message(
                eventops_consumer_runtime::ErrorKind::Transient,
                "the first attempt fails after appending",
            ));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_relays_what_its_handler_appended_only_for_the_attempt_that_committed() {
    let env = env().await;
    let (input, output) = (unique("outbox-in"), unique("outbox-out"));
    create_topics(&env.info, &[(&input, 2), (&output, 2)]).await;
    // The worker's own user: Read on its input and group, Write on the outbox topic.
    let group = unique("outbox-worker");
    let user = unique("outbox-worker");
    create_scram_user(&env, &user, "worker-secret").await;
    set_acl(&env, true, &user, "Read", &["--topic", &input]).await;
    set_acl(&env, true, &user, "Read", &["--group", &group]).await;
    set_acl(&env, true, &user, "Write", &["--topic", &output]).await;
    let (url, client) = outbox_database(&env).await;

    // The relay comes from the contract, as the operator writes it.
    let mut vars: BTreeMap<String, String> = contract_vars(&env.info, &group, &[route(&input)])
        .into_iter()
        .collect();
    vars.insert(contract::KAFKA_USERNAME.into(), user.clone());
    vars.insert(contract::KAFKA_PASSWORD.into(), "worker-secret".into());
    vars.insert(contract::DATABASE_URL.into(), url.clone());
    vars.insert(
        contract::OUTBOX_TOPICS.into(),
        serde_json::to_string(&[&output]).unwrap(),
    );
    let config = eventops_consumer_runtime::WorkerConfig::from_lookup(|k| vars.get(k).cloned())
        .expect("contract");
    let worker = Worker::builder(config)
        .health_server(false)
        .build_transactional(Capture {
            out: output.clone(),
            failed_once: Default::default(),
        })
        .await
        .unwrap();
    let metrics = worker.metrics();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
    }));
    let producer = producer(&env.info);
    for i in 0..20 {
        let id = format!("order-{i}");
        produce(
            &producer,
            &input,
            i % 2,
            &id,
            &event(&id, 1, serde_json::json!({})),
        )
        .await;
    }
    // One more with a W3C traceparent: the appended event carries it on.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    producer
        .send(
            rdkafka::producer::FutureRecord::to(&input)
                .partition(0)
                .key("traced")
                .payload(&event("traced", 1, serde_json::json!({})))
                .headers(
                    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                        key: "traceparent",
                        value: Some(traceparent),
                    }),
                ),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("producing the traced record");
    let records = read_topic(&env.info, &output, 21, TIMEOUT).await;
    eventually(TIMEOUT, "the outbox emptied", || async {
        (pending_rows(&client).await == 0).then_some(())
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap().unwrap();

    let traced = records
        .iter()
        .find(|m| m.key() == Some(&b"traced"[..]))
        .expect("the traced event's Captured");
    assert_eq!(header(traced, "traceparent"), Some(traceparent.as_bytes()));
    assert_eq!(
        topic_record_count(&env, &output).await,
        21,
        "a rolled-back attempt was published"
    );
    for m in &records {
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let of = v["data"]["of"].as_str().unwrap();
        assert_eq!(v["id"], format!("captured-{of}"));
        // The correlation id of the handled event travels with the appended one.
        assert_eq!(
            header(m, eventops_consumer_runtime::CORRELATION_HEADER),
            Some(format!("corr-{of}").as_bytes())
        );
        assert_eq!(v["correlationId"], format!("corr-{of}"));
        assert_eq!(m.key(), Some(of.as_bytes()));
    }
    assert_eq!(metrics.outbox_published(), 21);
    let encoded = metrics.encode();
    assert!(
        encoded.contains("eventops_worker_outbox_published_total 21\n"),
        "{encoded}"
    );
}
