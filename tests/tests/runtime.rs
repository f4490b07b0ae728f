//! consumer-runtime against the real broker and PostgreSQL: duplicates, retries,
//! dead-lettering with Spring-compatible headers, poison records, correlation ids,
//! retry topics, a worker killed mid-batch, and SIGTERM during load.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventops_consumer_runtime::contract::{Idempotency, RetryRoute};
use eventops_consumer_runtime::dead_letter::{self, decode_i32, decode_i64};
use eventops_consumer_runtime::tokio_postgres::Transaction;
use eventops_consumer_runtime::{
    CORRELATION_HEADER, Context, ErrorKind, Event, Handler, HandlerError, TransactionalHandler,
    Worker,
};
use eventops_tests::runtime::*;
use eventops_tests::{TestEnv, env, eventually, unique};
use rdkafka::Message;
use tokio::sync::oneshot;

const TIMEOUT: Duration = Duration::from_secs(60);

/// What a handler does with an event: by its `data.fail` field, fail transiently for the
/// first `n` attempts, or permanently; records attempts per event id.
#[derive(Clone, Default)]
struct Scripted {
    attempts: Arc<Mutex<HashMap<String, u32>>>,
    /// When each attempt of each event id began.
    started: Arc<Mutex<HashMap<String, Vec<std::time::Instant>>>>,
    /// Publish each handled event's id to this topic.
    echo_to: Option<String>,
}

impl Scripted {
    fn attempts(&self, id: &str) -> u32 {
        self.attempts.lock().unwrap().get(id).copied().unwrap_or(0)
    }
    fn handled(&self) -> usize {
        self.attempts.lock().unwrap().len()
    }
    fn attempt_times(&self, id: &str) -> Vec<std::time::Instant> {
        self.started
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default()
    }
}

#[derive(serde::Deserialize)]
struct Script {
    #[serde(default)]
    transient_failures: u32,
    #[serde(default)]
    permanent: bool,
}

impl Handler for Scripted {
    async fn handle(&self, event: &Event<'_>, ctx: &Context<'_>) -> Result<(), HandlerError> {
        let script: Script = event.data()?;
        self.started
            .lock()
            .unwrap()
            .entry(event.id().to_string())
            .or_default()
            .push(std::time::Instant::now());
        let n = {
            let mut a = self.attempts.lock().unwrap();
            let n = a.entry(event.id().to_string()).or_default();
            *n += 1;
            *n
        };
        if script.permanent {
            return Err(
                HandlerError::message(ErrorKind::Permanent, "order total is negative")
                    .with_type_name("tests::NegativeTotal"),
            );
        }
        if n <= script.transient_failures {
            return Err(HandlerError::transient(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "inventory service timed out",
            )));
        }
        if let Some(topic) = &self.echo_to {
            ctx.publish(topic, None, event.id().as_bytes()).await?;
        }
        Ok(())
    }
}

/// A running in-process worker and the way to stop it.
struct Running {
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<Result<(), eventops_consumer_runtime::WorkerError>>,
    metrics: Arc<eventops_consumer_runtime::metrics::Metrics>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(TIMEOUT, self.done)
            .await
            .expect("the worker stops within a minute")
            .unwrap()
            .expect("the worker stops cleanly");
    }
}

fn start(worker: Worker) -> Running {
    let (stop, rx) = oneshot::channel();
    let metrics = worker.metrics();
    let done = tokio::spawn(worker.run_until(async move {
        let _ = rx.await;
    }));
    Running {
        stop,
        done,
        metrics,
    }
}

async fn setup(env: &TestEnv, partitions: i32) -> (String, String) {
    let topic = unique("rt");
    create_topics(
        &env.info,
        &[(&topic, partitions), (&format!("{topic}.DLT"), partitions)],
    )
    .await;
    (topic.clone(), unique("rt-group"))
}

fn sql_name(prefix: &str) -> String {
    unique(prefix).replace('-', "_")
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_deliveries_have_one_effect_with_the_postgres_inbox() {
    let env = env().await;
    let (topic, group) = setup(&env, 2).await;
    let table = sql_name("effects");
    let db = postgres(&env.info).await;
    create_effects_table(&db, &table).await;

    struct Insert(String);
    impl TransactionalHandler for Insert {
        async fn handle(
            &self,
            event: &Event<'_>,
            tx: &Transaction<'_>,
            _ctx: &Context<'_>,
        ) -> Result<(), HandlerError> {
            let r = event.record();
            tx.execute(
                &format!("INSERT INTO {} VALUES ($1, $2, $3, $4)", self.0),
                &[&event.id(), &r.topic(), &r.partition(), &r.offset()],
            )
            .await
            .map_err(HandlerError::transient)?;
            Ok(())
        }
    }

    // 30 events, each delivered twice (on either partition), plus one delivered 3 times.
    let p = producer(&env.info);
    let mut offsets = 0;
    for round in 0..2 {
        for i in 0..30 {
            let id = format!("order-{i}");
            produce(
                &p,
                &topic,
                (i + round) % 2,
                &id,
                &event(&id, 1, serde_json::json!({})),
            )
            .await;
            offsets += 1;
        }
    }
    produce(
        &p,
        &topic,
        0,
        "order-7",
        &event("order-7", 1, serde_json::json!({})),
    )
    .await;
    offsets += 1;

    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .batch_size(16)
        .build_transactional(Insert(table.clone()))
        .await
        .unwrap();
    let running = start(worker);
    let m = running.metrics.clone();
    eventually(TIMEOUT, "every delivery handled or skipped", || async {
        let seen = m.encode();
        let n = |name: &str| {
            seen.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        };
        (n("eventops_worker_records_processed_total")
            + n("eventops_worker_records_duplicate_total")
            == offsets)
            .then_some(())
    })
    .await;
    running.stop().await;

    let rows = db
        .query(
            &format!("SELECT event_id, count(*) FROM {table} GROUP BY 1"),
            &[],
        )
        .await
        .unwrap();
    let per_id: BTreeMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(per_id.len(), 30, "{per_id:?}");
    assert!(
        per_id.values().all(|&c| c == 1),
        "one effect per event: {per_id:?}"
    );
    let inbox: i64 = db
        .query_one(
            "SELECT count(*) FROM eventops_inbox WHERE consumer_group = $1",
            &[&group],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(inbox, 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_failing_inside_an_inbox_batch_leaves_one_effect_for_the_others() {
    let env = env().await;
    let (topic, group) = setup(&env, 1).await;
    let table = sql_name("effects");
    let db = postgres(&env.info).await;
    create_effects_table(&db, &table).await;

    /// Writes its row, then fails permanently for `{"permanent": true}`: that write must
    /// be undone, and the events around it must keep exactly one row each.
    #[derive(Clone)]
    struct WriteThenMaybeFail {
        table: String,
        calls: Arc<Mutex<HashMap<String, u32>>>,
    }
    impl TransactionalHandler for WriteThenMaybeFail {
        async fn handle(
            &self,
            event: &Event<'_>,
            tx: &Transaction<'_>,
            _ctx: &Context<'_>,
        ) -> Result<(), HandlerError> {
            *self
                .calls
                .lock()
                .unwrap()
                .entry(event.id().to_string())
                .or_default() += 1;
            let script: Script = event.data()?;
            let r = event.record();
            tx.execute(
                &format!("INSERT INTO {} VALUES ($1, $2, $3, $4)", self.table),
                &[&event.id(), &r.topic(), &r.partition(), &r.offset()],
            )
            .await
            .map_err(HandlerError::transient)?;
            if script.permanent {
                return Err(HandlerError::message(
                    ErrorKind::Permanent,
                    "the order cannot be paid",
                ));
            }
            Ok(())
        }
    }

    // One partition, produced before the worker starts: the ten events share a batch,
    // with a duplicate before and after the failing one.
    let p = producer(&env.info);
    let ids = ["a", "b", "a", "c", "bad", "d", "b", "e", "f", "g"];
    for id in ids {
        let data = serde_json::json!({"permanent": id == "bad"});
        produce(&p, &topic, 0, id, &event(id, 1, data)).await;
    }
    let handler = WriteThenMaybeFail {
        table: table.clone(),
        calls: Default::default(),
    };
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .batch_size(64)
        .build_transactional(handler.clone())
        .await
        .unwrap();
    let running = start(worker);
    let dlt = read_topic(&env.info, &format!("{topic}.DLT"), 1, TIMEOUT).await;
    eventually(TIMEOUT, "every offset committed", || async {
        let c = committed_offsets(&env, &group).await;
        (c.get(&(topic.clone(), 0)) == Some(&(ids.len() as i64))).then_some(())
    })
    .await;
    running.stop().await;

    assert_eq!(dlt[0].key(), Some(&b"bad"[..]));
    let rows = db
        .query(
            &format!("SELECT event_id, count(*) FROM {table} GROUP BY 1 ORDER BY 1"),
            &[],
        )
        .await
        .unwrap();
    let per_id: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let expected: Vec<(String, i64)> = ["a", "b", "c", "d", "e", "f", "g"]
        .iter()
        .map(|id| (id.to_string(), 1))
        .collect();
    assert_eq!(
        per_id, expected,
        "one effect per good event, none for the failed one"
    );
    let inbox: Vec<String> = db
        .query(
            "SELECT event_id FROM eventops_inbox WHERE consumer_group = $1 ORDER BY 1",
            &[&group],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(inbox, ["a", "b", "c", "d", "e", "f", "g"]);
    assert_eq!(
        handler.calls.lock().unwrap().get("bad"),
        Some(&1),
        "a permanent failure is not retried"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_deliveries_are_skipped_with_the_memory_store() {
    let env = env().await;
    let (topic, group) = setup(&env, 1).await;
    let p = producer(&env.info);
    for id in ["a", "b", "a", "c", "b", "a"] {
        produce(&p, &topic, 0, id, &event(id, 1, serde_json::json!({}))).await;
    }
    let handler = Scripted::default();
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .idempotency(Idempotency::Memory)
        .build(handler.clone())
        .await
        .unwrap();
    let running = start(worker);
    let m = running.metrics.clone();
    eventually(TIMEOUT, "6 deliveries", || async {
        (m.processed(&topic) == 3
            && m.encode()
                .contains("eventops_worker_records_duplicate_total{topic=\"")
            && m.encode().lines().any(|l| {
                l.starts_with("eventops_worker_records_duplicate_total") && l.ends_with(" 3")
            }))
        .then_some(())
    })
    .await;
    running.stop().await;
    for id in ["a", "b", "c"] {
        assert_eq!(handler.attempts(id), 1, "{id} handled once");
    }
    let committed = committed_offsets(&env, &group).await;
    assert_eq!(
        committed.get(&(topic.clone(), 0)),
        Some(&6),
        "{committed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transient_failure_is_retried_then_succeeds() {
    let env = env().await;
    let (topic, group) = setup(&env, 1).await;
    let out = unique("rt-out");
    create_topics(&env.info, &[(&out, 1)]).await;
    let p = producer(&env.info);
    produce(
        &p,
        &topic,
        0,
        "flaky",
        &event("flaky", 1, serde_json::json!({"transient_failures": 2})),
    )
    .await;
    produce(
        &p,
        &topic,
        0,
        "fine",
        &event("fine", 1, serde_json::json!({})),
    )
    .await;

    let handler = Scripted {
        echo_to: Some(out.clone()),
        ..Default::default()
    };
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .build(handler.clone())
        .await
        .unwrap();
    let running = start(worker);
    // Both are published in order: the second waited for the first's retries.
    let echoed = read_topic(&env.info, &out, 2, TIMEOUT).await;
    let ids: Vec<&[u8]> = echoed.iter().map(|m| m.payload().unwrap()).collect();
    assert_eq!(ids, [&b"flaky"[..], b"fine"]);
    // The correlation id travelled from the consumed record's header to the produced one.
    assert_eq!(
        header(&echoed[0], CORRELATION_HEADER),
        Some(&b"corr-flaky"[..])
    );
    let m = running.metrics.clone();
    eventually(TIMEOUT, "offsets committed", || async {
        let c = committed_offsets(&env, &group).await;
        (c.get(&(topic.clone(), 0)) == Some(&2)).then_some(())
    })
    .await;
    running.stop().await;
    assert_eq!(handler.attempts("flaky"), 3);
    assert_eq!(handler.attempts("fine"), 1);
    assert_eq!(m.dead_lettered(&topic), 0);
    let text = m.encode();
    assert!(
        text.contains(&format!(
            "eventops_worker_records_retried_total{{topic=\"{topic}\"}} 2"
        )),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_failure_is_dead_lettered_without_retries_with_all_headers() {
    let env = env().await;
    let (topic, group) = setup(&env, 3).await;
    let p = producer(&env.info);
    let payload = event("bad-order", 1, serde_json::json!({"permanent": true}));
    let offset = produce(&p, &topic, 2, "bad-order", &payload).await;
    produce(
        &p,
        &topic,
        2,
        "next",
        &event("next", 1, serde_json::json!({})),
    )
    .await;

    let handler = Scripted::default();
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .build(handler.clone())
        .await
        .unwrap();
    let running = start(worker);
    let dlt = read_topic(&env.info, &format!("{topic}.DLT"), 1, TIMEOUT).await;
    let m = running.metrics.clone();
    eventually(TIMEOUT, "the next record handled", || async {
        (m.processed(&topic) == 1).then_some(())
    })
    .await;
    running.stop().await;

    assert_eq!(
        handler.attempts("bad-order"),
        1,
        "no retries for a permanent error"
    );
    let d = &dlt[0];
    assert_eq!(d.partition(), 2, "same partition number");
    assert_eq!(d.payload(), Some(&payload[..]));
    assert_eq!(d.key(), Some(&b"bad-order"[..]));
    let h = |name| header(d, name).unwrap_or_else(|| panic!("header {name} missing"));
    assert_eq!(h(dead_letter::ORIGINAL_TOPIC), topic.as_bytes());
    assert_eq!(decode_i32(h(dead_letter::ORIGINAL_PARTITION)), Some(2));
    assert_eq!(decode_i64(h(dead_letter::ORIGINAL_OFFSET)), Some(offset));
    assert!(decode_i64(h(dead_letter::ORIGINAL_TIMESTAMP)).unwrap() > 1_600_000_000_000);
    assert_eq!(h(dead_letter::ORIGINAL_TIMESTAMP_TYPE), b"CreateTime");
    assert_eq!(h(dead_letter::ORIGINAL_CONSUMER_GROUP), group.as_bytes());
    // As a Spring container wraps a listener's exception (tests/tests/spring_interop.rs).
    assert_eq!(
        h(dead_letter::EXCEPTION_FQCN),
        dead_letter::LISTENER_FAILED_FQCN.as_bytes()
    );
    assert_eq!(
        h(dead_letter::EXCEPTION_CAUSE_FQCN),
        b"tests::NegativeTotal"
    );
    assert_eq!(
        h(dead_letter::EXCEPTION_MESSAGE),
        b"Listener failed; order total is negative"
    );
    assert!(!h(dead_letter::EXCEPTION_STACKTRACE).is_empty());
    assert_eq!(
        h(CORRELATION_HEADER),
        b"corr-bad-order",
        "original headers are kept"
    );
    let committed = committed_offsets(&env, &group).await;
    assert_eq!(
        committed.get(&(topic.clone(), 2)),
        Some(&(offset + 2)),
        "{committed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_source_offset_stays_uncommitted_while_the_dead_letter_publish_fails() {
    let env = env().await;
    let topic = unique("rt");
    let group = unique("rt-group");
    // The dead-letter topic takes no record of this size yet: publishing there fails.
    create_topics(&env.info, &[(&topic, 3)]).await;
    let dlt_name = format!("{topic}.DLT");
    env.kafka_tool(
        "org.apache.kafka.tools.TopicCommand",
        &[
            "--create",
            "--topic",
            &dlt_name,
            "--partitions",
            "3",
            "--config",
            "max.message.bytes=64",
        ],
    )
    .await
    .unwrap();
    let p = producer(&env.info);
    produce(
        &p,
        &topic,
        2,
        "bad",
        &event("bad", 1, serde_json::json!({"permanent": true})),
    )
    .await;
    produce(
        &p,
        &topic,
        2,
        "after-bad",
        &event("after-bad", 1, serde_json::json!({})),
    )
    .await;
    produce(
        &p,
        &topic,
        0,
        "elsewhere",
        &event("elsewhere", 1, serde_json::json!({})),
    )
    .await;
    let handler = Scripted::default();
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .kafka_property("topic.metadata.refresh.interval.ms", "1000")
        .build(handler.clone())
        .await
        .unwrap();
    let running = start(worker);
    let m = running.metrics.clone();
    eventually(TIMEOUT, "partition 0 handled", || async {
        (handler.attempts("elsewhere") == 1).then_some(())
    })
    .await;
    eventually(TIMEOUT, "partition 0 committed", || async {
        let c = committed_offsets(&env, &group).await;
        (c.get(&(topic.clone(), 0)) == Some(&1)).then_some(c)
    })
    .await;
    let c = committed_offsets(&env, &group).await;
    assert_eq!(
        c.get(&(topic.clone(), 2)),
        None,
        "nothing committed on partition 2: {c:?}"
    );
    assert_eq!(handler.attempts("bad"), 1);
    assert_eq!(
        handler.attempts("after-bad"),
        0,
        "the partition waits for the dead-letter publish"
    );
    assert_eq!(m.dead_lettered(&topic), 0);

    env.add_topic_configs(&dlt_name, "max.message.bytes=1048588")
        .await;
    let dlt = read_topic(&env.info, &format!("{topic}.DLT"), 1, TIMEOUT).await;
    assert_eq!(dlt[0].partition(), 2);
    eventually(
        TIMEOUT,
        "partition 2 committed past both records",
        || async {
            let c = committed_offsets(&env, &group).await;
            (c.get(&(topic.clone(), 2)) == Some(&2)).then_some(())
        },
    )
    .await;
    running.stop().await;
    assert_eq!(
        handler.attempts("bad"),
        1,
        "dead-lettering is retried, the handler is not"
    );
    assert_eq!(handler.attempts("after-bad"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_records_are_dead_lettered_without_blocking_the_partition() {
    let env = env().await;
    let (topic, group) = setup(&env, 1).await;
    let p = producer(&env.info);
    produce(&p, &topic, 0, "garbage", b"\x00\x01 not an envelope").await;
    produce(&p, &topic, 0, "v9", &event("v9", 9, serde_json::json!({}))).await;
    for i in 0..5 {
        let id = format!("good-{i}");
        produce(&p, &topic, 0, &id, &event(&id, 2, serde_json::json!({}))).await;
    }
    let handler = Scripted::default();
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .schema_versions(1..=2)
        .build(handler.clone())
        .await
        .unwrap();
    let running = start(worker);
    let dlt = read_topic(&env.info, &format!("{topic}.DLT"), 2, TIMEOUT).await;
    let m = running.metrics.clone();
    eventually(TIMEOUT, "the good records handled", || async {
        (m.processed(&topic) == 5).then_some(())
    })
    .await;
    running.stop().await;
    assert_eq!(handler.handled(), 5, "poison never reaches the handler");
    let keys: Vec<&[u8]> = dlt.iter().map(|m| m.key().unwrap()).collect();
    assert_eq!(keys, [&b"garbage"[..], b"v9"]);
    let msg =
        |m| String::from_utf8(header(m, dead_letter::EXCEPTION_MESSAGE).unwrap().to_vec()).unwrap();
    assert!(
        msg(&dlt[0]).contains("not a JSON event envelope"),
        "{}",
        msg(&dlt[0])
    );
    assert!(msg(&dlt[1]).contains("schemaVersion 9"), "{}", msg(&dlt[1]));
    let committed = committed_offsets(&env, &group).await;
    assert_eq!(
        committed.get(&(topic.clone(), 0)),
        Some(&7),
        "{committed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_topics_redeliver_after_their_delay() {
    let env = env().await;
    let (topic, group) = setup(&env, 1).await;
    let retry = format!("{topic}-retry-0");
    create_topics(&env.info, &[(&retry, 1)]).await;
    let mut r = route(&topic);
    r.retry_topics = vec![RetryRoute {
        topic: retry.clone(),
        delay_ms: 1500,
    }];
    let p = producer(&env.info);
    produce(
        &p,
        &topic,
        0,
        "slow",
        &event("slow", 1, serde_json::json!({"transient_failures": 1})),
    )
    .await;
    produce(
        &p,
        &topic,
        0,
        "quick",
        &event("quick", 1, serde_json::json!({})),
    )
    .await;
    let handler = Scripted::default();
    let worker = Worker::builder(worker_config(&env.info, &group, &[r]))
        .health_server(false)
        .build(handler.clone())
        .await
        .unwrap();
    let running = start(worker);
    let m = running.metrics.clone();
    // "quick" is not held up by "slow" being retried.
    eventually(TIMEOUT, "quick handled", || async {
        (m.processed(&topic) == 1).then_some(())
    })
    .await;
    eventually(TIMEOUT, "slow handled from the retry topic", || async {
        (m.processed(&retry) == 1).then_some(())
    })
    .await;
    // Measured from the failed attempt, not from the worker's start (which would count
    // the group join too).
    let times = handler.attempt_times("slow");
    assert_eq!(times.len(), 2, "{times:?}");
    let waited = times[1] - times[0];
    assert!(
        waited >= Duration::from_millis(1500),
        "the retry came {waited:?} after the failure, before its 1.5 s delay"
    );
    running.stop().await;
    assert_eq!(handler.attempts("slow"), 2);
    let in_retry = read_topic(&env.info, &retry, 1, TIMEOUT).await;
    assert_eq!(
        header(
            &in_retry[0],
            eventops_consumer_runtime::RETRY_ATTEMPT_HEADER
        ),
        Some(&b"2"[..])
    );
    let committed = committed_offsets(&env, &group).await;
    assert_eq!(
        committed.get(&(topic.clone(), 0)),
        Some(&2),
        "{committed:?}"
    );
    assert_eq!(
        committed.get(&(retry.clone(), 0)),
        Some(&1),
        "{committed:?}"
    );
}

/// A worker process of the test binary.
fn worker_process(
    env: &TestEnv,
    group: &str,
    topic: &str,
    table: &str,
    mode: &str,
    delay_ms: u64,
    health_port: u16,
) -> eventops_tests::ChildGuard {
    let mut cmd =
        std::process::Command::new(eventops_tests::workspace_binary("runtime-test-worker"));
    cmd.envs(contract_vars(&env.info, group, &[route(topic)]))
        .env(
            eventops_consumer_runtime::contract::HEALTH_PORT,
            health_port.to_string(),
        )
        .env(
            eventops_consumer_runtime::contract::HEALTH_ADDR,
            format!("127.0.0.1:{health_port}"),
        )
        .env(eventops_consumer_runtime::contract::IDEMPOTENCY, "None")
        .env("RUNTIME_TEST_TABLE", table)
        .env("RUNTIME_TEST_MODE", mode)
        .env("RUNTIME_TEST_DELAY_MS", delay_ms.to_string());
    eventops_tests::ChildGuard(cmd.spawn().expect("starting runtime-test-worker"))
}

async fn produce_load(env: &TestEnv, topic: &str, per_partition: i64) {
    let p = producer(&env.info);
    let mut sends = Vec::new();
    for partition in 0..2 {
        for i in 0..per_partition {
            let id = format!("e-{partition}-{i}");
            let p = p.clone();
            let topic = topic.to_string();
            sends.push(async move {
                produce(
                    &p,
                    &topic,
                    partition,
                    &id,
                    &event(&id, 1, serde_json::json!({})),
                )
                .await
            });
        }
    }
    futures::future::join_all(sends).await;
}

async fn killed_mid_batch(mode: &str) {
    let env = env().await;
    let (topic, group) = setup(&env, 2).await;
    let table = sql_name("effects");
    let db = postgres(&env.info).await;
    create_effects_table(&db, &table).await;
    let per_partition = 200;
    produce_load(&env, &topic, per_partition).await;

    let port = eventops_tests::free_port();
    let mut first = worker_process(&env, &group, &topic, &table, mode, 50, port);
    // Mid-way: some offsets committed on both partitions, more records handled since.
    eventually(TIMEOUT, "commits on both partitions", || async {
        let c = committed_offsets(&env, &group).await;
        (c.len() == 2 && c.values().all(|&o| o > 0)).then_some(())
    })
    .await;
    first.kill().unwrap(); // SIGKILL: no shutdown, no final commit
    first.wait().unwrap();
    let at_kill = committed_offsets(&env, &group).await;
    let before = effects(&db, &table).await;
    assert!(
        before.len() < 2 * per_partition as usize,
        "killed before the end"
    );
    let committed = |p: i32| at_kill.get(&(topic.clone(), p)).copied().unwrap_or(0);
    // Handled before the kill but not committed: exactly these come again.
    let uncommitted = before.keys().filter(|(p, o)| *o >= committed(*p)).count();
    for p in 0..2 {
        for o in 0..committed(p) {
            assert!(
                before.contains_key(&(p, o)),
                "offset {p}/{o} committed but never handled"
            );
        }
    }

    let port = eventops_tests::free_port();
    let mut second = worker_process(&env, &group, &topic, &table, mode, 0, port);
    eventually(
        TIMEOUT,
        "every record handled after the restart",
        || async {
            let e = effects(&db, &table).await;
            (e.len() == 2 * per_partition as usize).then_some(())
        },
    )
    .await;
    // Let any late re-delivery show up before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = effects(&db, &table).await;
    let metrics = eventops_tests::http_get(port, "/metrics")
        .expect("/metrics")
        .1;
    second.kill().unwrap();
    second.wait().unwrap();

    for partition in 0..2 {
        for offset in 0..per_partition {
            assert!(
                after.contains_key(&(partition, offset)),
                "record {partition}/{offset} lost"
            );
        }
    }
    let duplicated: Vec<(i32, i64)> = after
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(k, _)| *k)
        .collect();
    if mode == "transactional" {
        assert!(
            duplicated.is_empty(),
            "exactly one effect with the inbox: {duplicated:?}"
        );
        let skipped: u64 = metrics
            .lines()
            .filter(|l| l.starts_with("eventops_worker_records_duplicate_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(
            skipped, uncommitted as u64,
            "re-delivered records recognised by the inbox"
        );
    } else {
        for (partition, offset) in &duplicated {
            assert!(
                *offset >= committed(*partition),
                "record {partition}/{offset} re-delivered though committed up to {}",
                committed(*partition)
            );
        }
        assert_eq!(
            duplicated.len(),
            uncommitted,
            "every handled, uncommitted record comes again, once"
        );
    }
    eprintln!(
        "{mode}: {} records handled before the kill, committed {at_kill:?}, {uncommitted} re-delivered",
        before.len(),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_batch_loses_nothing_and_redelivers_only_uncommitted_records() {
    killed_mid_batch("plain").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_batch_has_exactly_one_effect_per_event_with_the_inbox() {
    killed_mid_batch("transactional").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_load_loses_nothing_and_leaves_the_group() {
    let env = env().await;
    let (topic, group) = setup(&env, 2).await;
    let table = sql_name("effects");
    let db = postgres(&env.info).await;
    create_effects_table(&db, &table).await;
    let per_partition = 150;
    produce_load(&env, &topic, per_partition).await;

    let port = eventops_tests::free_port();
    let mut worker = worker_process(&env, &group, &topic, &table, "plain", 10, port);
    eventually(TIMEOUT, "ready", || async {
        let (code, _) = eventops_tests::http_get(port, "/readyz")?;
        (code == 200).then_some(())
    })
    .await;
    assert_eq!(
        eventops_tests::http_get(port, "/healthz").map(|r| r.0),
        Some(200)
    );
    eventually(TIMEOUT, "the worker mid-way", || async {
        let n: i64 = effects(&db, &table).await.values().sum();
        (n >= 60).then_some(())
    })
    .await;
    let metrics = eventops_tests::http_get(port, "/metrics").unwrap().1;
    for name in [
        "eventops_worker_records_processed_total",
        "eventops_worker_handler_duration_seconds_bucket",
        "eventops_worker_records_dead_lettered_total",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    let pid = worker.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "graceful exit: {status}");

    let (state, members) = group_state(&env, &group).await;
    assert_eq!(
        (state.as_str(), members),
        ("Empty", 0),
        "the worker left the group"
    );
    let committed = committed_offsets(&env, &group).await;
    let handled = effects(&db, &table).await;
    for partition in 0..2 {
        let c = committed
            .get(&(topic.clone(), partition))
            .copied()
            .unwrap_or(0);
        let last = handled
            .keys()
            .filter(|(p, _)| *p == partition)
            .map(|(_, o)| *o)
            .max();
        assert_eq!(
            last.map_or(0, |o| o + 1),
            c,
            "partition {partition}: everything handled is committed, nothing more"
        );
    }

    let mut again = worker_process(
        &env,
        &group,
        &topic,
        &table,
        "plain",
        0,
        eventops_tests::free_port(),
    );
    let after = eventually(TIMEOUT, "the rest handled after a restart", || async {
        let e = effects(&db, &table).await;
        (e.len() == 2 * per_partition as usize).then_some(e)
    })
    .await;
    again.kill().unwrap();
    again.wait().unwrap();
    let duplicated: Vec<_> = after.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        duplicated.is_empty(),
        "a graceful stop re-delivers nothing: {duplicated:?}"
    );
}

/// Records every handled `(partition, offset)`; shared by several workers.
#[derive(Clone)]
struct Recorder {
    seen: Arc<Mutex<BTreeMap<(i32, i64), u32>>>,
    mine: Arc<std::sync::atomic::AtomicUsize>,
    delay: Duration,
}

impl Handler for Recorder {
    async fn handle(&self, event: &Event<'_>, _ctx: &Context<'_>) -> Result<(), HandlerError> {
        tokio::time::sleep(self.delay).await;
        let r = event.record();
        *self
            .seen
            .lock()
            .unwrap()
            .entry((r.partition(), r.offset()))
            .or_default() += 1;
        self.mine.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn partitions_move_to_a_joining_worker_without_loss_or_redelivery() {
    let env = env().await;
    let (topic, group) = setup(&env, 4).await;
    let p = producer(&env.info);
    let per_partition = 100;
    let mut sends = Vec::new();
    for partition in 0..4 {
        for i in 0..per_partition {
            let (p, topic) = (p.clone(), topic.clone());
            sends.push(async move {
                let id = format!("m-{partition}-{i}");
                produce(
                    &p,
                    &topic,
                    partition,
                    &id,
                    &event(&id, 1, serde_json::json!({})),
                )
                .await
            });
        }
    }
    futures::future::join_all(sends).await;

    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let recorder = |delay| Recorder {
        seen: seen.clone(),
        mine: Default::default(),
        delay,
    };
    let (a, b) = (
        recorder(Duration::from_millis(100)),
        recorder(Duration::from_millis(100)),
    );
    let build = |h: Recorder| {
        Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
            .health_server(false)
            .idempotency(Idempotency::None)
            .build(h)
    };
    let first = start(build(a.clone()).await.unwrap());
    eventually(TIMEOUT, "the first worker under way", || async {
        (a.mine.load(std::sync::atomic::Ordering::Relaxed) >= 40).then_some(())
    })
    .await;
    let second = start(build(b.clone()).await.unwrap());
    eventually(TIMEOUT, "every record handled", || async {
        (seen.lock().unwrap().len() == 4 * per_partition as usize).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.stop().await;
    second.stop().await;

    let seen = seen.lock().unwrap().clone();
    let b_count = b.mine.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        b_count > 0,
        "the joining worker got partitions (cooperative rebalance)"
    );
    let again: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        again.is_empty(),
        "revoked partitions were committed up to what was handled, so nothing came twice: {again:?}"
    );
    let committed = committed_offsets(&env, &group).await;
    for partition in 0..4 {
        assert_eq!(
            committed.get(&(topic.clone(), partition)),
            Some(&per_partition)
        );
    }
}

/// Records the order in which each key's events are handled.
#[derive(Clone, Default)]
struct KeyOrder {
    order: Arc<Mutex<Vec<(String, i64)>>>,
}

impl Handler for KeyOrder {
    async fn handle(&self, event: &Event<'_>, _ctx: &Context<'_>) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let key = String::from_utf8_lossy(event.record().key().unwrap()).into_owned();
        self.order
            .lock()
            .unwrap()
            .push((key, event.record().offset()));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_by_key_keeps_each_keys_order() {
    let env = env().await;
    let (topic, group) = setup(&env, 1).await;
    let p = producer(&env.info);
    for i in 0..80 {
        let key = format!("customer-{}", i % 8);
        produce(
            &p,
            &topic,
            0,
            &key,
            &event(&format!("k{i}"), 1, serde_json::json!({})),
        )
        .await;
    }
    let handler = KeyOrder::default();
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .key_concurrency(8)
        .build(handler.clone())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let running = start(worker);
    eventually(TIMEOUT, "all handled", || async {
        (handler.order.lock().unwrap().len() == 80).then_some(())
    })
    .await;
    let took = started.elapsed();
    eventually(TIMEOUT, "all committed", || async {
        let c = committed_offsets(&env, &group).await;
        (c.get(&(topic.clone(), 0)) == Some(&80)).then_some(())
    })
    .await;
    running.stop().await;
    let order = handler.order.lock().unwrap().clone();
    let mut last: HashMap<String, i64> = HashMap::new();
    for (key, offset) in order {
        let prev = last.insert(key.clone(), offset).unwrap_or(-1);
        assert!(offset > prev, "{key}: offset {offset} handled after {prev}");
    }
    // Sequentially 80 × 20 ms = 1.6 s; eight lanes overlap the waits.
    eprintln!("80 records with 8 key lanes in {took:?}");
}
