//! consumer-runtime under faults, against the real broker and PostgreSQL: partitions that
//! move away while paused and come back, panicking handlers, an inbox database that goes
//! away, a poll loop that blocks, and concurrency by key.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use eventops_consumer_runtime::contract::Idempotency;
use eventops_consumer_runtime::dead_letter;
use eventops_consumer_runtime::tokio_postgres::Transaction;
use eventops_consumer_runtime::{
    Context, Event, Handler, HandlerError, RetryPolicy, TransactionalHandler, Worker,
};
use eventops_tests::runtime::*;
use eventops_tests::{TestEnv, env, eventually, free_port, http_get, unique};
use rdkafka::Message;
use tokio::sync::oneshot;

const TIMEOUT: Duration = Duration::from_secs(90);

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
            .expect("the worker stops in time")
            .unwrap()
            .expect("the worker stops cleanly");
    }

    /// The sum of every sample of metric `name` (all label sets).
    fn metric(&self, name: &str) -> u64 {
        self.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
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
    let topic = unique("rtf");
    create_topics(
        &env.info,
        &[(&topic, partitions), (&format!("{topic}.DLT"), partitions)],
    )
    .await;
    (topic.clone(), unique("rtf-group"))
}

/// Produces `count` events per partition `0..partitions`, ids `<prefix>-<p>-<i>`.
async fn produce_events(env: &TestEnv, topic: &str, partitions: i32, prefix: &str, count: usize) {
    let p = producer(&env.info);
    let mut sends = Vec::new();
    for partition in 0..partitions {
        for i in 0..count {
            let (p, topic) = (p.clone(), topic.to_string());
            let id = format!("{prefix}-{partition}-{i}");
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

/// Every log line of this test binary (the runtime logs through `tracing`).
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        struct W(&'static Mutex<Vec<u8>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || W(buffer))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        buffer
    })
}

fn log_lines_containing(needle: &str) -> Vec<String> {
    String::from_utf8_lossy(&logs().lock().unwrap())
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Records every handled `(partition, offset)`; shared by several workers. Each call
/// takes `delay_ms`, which the test may change while it runs.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<BTreeMap<(i32, i64), u32>>>,
    mine: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
}

impl Handler for Recorder {
    async fn handle(&self, event: &Event<'_>, _ctx: &Context<'_>) -> Result<(), HandlerError> {
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let r = event.record();
        *self
            .seen
            .lock()
            .unwrap()
            .entry((r.partition(), r.offset()))
            .or_default() += 1;
        self.mine.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Waits until Kafka (`ConsumerGroupCommand`) reports every partition of `topic`
/// committed up to its end: lag 0.
async fn wait_for_zero_lag(env: &TestEnv, group: &str, topic: &str, partitions: i32) {
    let last = Arc::new(Mutex::new(BTreeMap::new()));
    let seen = last.clone();
    let result = tokio::time::timeout(
        TIMEOUT,
        eventually(TIMEOUT, "lag 0 on every partition", || {
            let seen = seen.clone();
            async move {
                let positions = group_positions(env, group).await;
                *seen.lock().unwrap() = positions.clone();
                let done = (0..partitions).all(|p| {
                    positions
                        .get(&(topic.to_string(), p))
                        .is_some_and(|(committed, end)| committed == end)
                });
                done.then_some(())
            }
        }),
    )
    .await;
    assert!(
        result.is_ok(),
        "lag not 0: (committed, end) per partition {:?}",
        last.lock().unwrap()
    );
}

// Fails without the resume in `Core::assigned`: the partitions that were paused when they
// moved away come back paused, and their records after the pause are never handled.
#[tokio::test(flavor = "multi_thread")]
async fn partitions_paused_for_flow_control_are_consumed_again_when_they_come_back() {
    let env = env().await;
    let partitions = 4;
    let (topic, group) = setup(&env, partitions).await;
    let first_round = 150;
    produce_events(&env, &topic, partitions, "a", first_round).await;

    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let delay = Arc::new(AtomicU64::new(50));
    let recorder = || Recorder {
        seen: seen.clone(),
        mine: Default::default(),
        delay_ms: delay.clone(),
    };
    let (a, b) = (recorder(), recorder());
    // A small in-flight bound and small batches: each partition task fills up at once,
    // its partition is paused, and it stays paused while its queue drains slowly.
    let build = |h: Recorder| {
        Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
            .health_server(false)
            .idempotency(Idempotency::None)
            .max_in_flight_per_partition(40)
            .batch_size(2)
            .build(h)
    };
    let first = start(build(a.clone()).await.unwrap());
    eventually(TIMEOUT, "the first worker's partitions full", || async {
        (a.mine.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The second worker takes half of the (paused) partitions ...
    let second = start(build(b.clone()).await.unwrap());
    eventually(TIMEOUT, "the second worker under way", || async {
        (b.mine.load(Ordering::Relaxed) >= 10).then_some(())
    })
    .await;
    // ... and gives them back when it leaves.
    second.stop().await;
    delay.store(0, Ordering::Relaxed);
    produce_events(&env, &topic, partitions, "b", 50).await;
    let total = partitions as usize * (first_round + 50);
    let handled = tokio::time::timeout(
        TIMEOUT,
        eventually(TIMEOUT, "every record handled", || async {
            (seen.lock().unwrap().len() == total).then_some(())
        }),
    )
    .await;
    let per_partition: BTreeMap<i32, usize> =
        seen.lock()
            .unwrap()
            .keys()
            .fold(BTreeMap::new(), |mut m, (p, _)| {
                *m.entry(*p).or_default() += 1;
                m
            });
    assert!(
        handled.is_ok(),
        "{} of {total} records handled; per partition {per_partition:?} (each has {})",
        seen.lock().unwrap().len(),
        first_round + 50
    );
    wait_for_zero_lag(&env, &group, &topic, partitions).await;
    first.stop().await;
}

/// Panics on events whose data says `{"panic": true}`.
#[derive(Clone, Default)]
struct Panicky {
    handled: Arc<Mutex<Vec<String>>>,
}

impl Handler for Panicky {
    async fn handle(&self, event: &Event<'_>, _ctx: &Context<'_>) -> Result<(), HandlerError> {
        #[derive(serde::Deserialize)]
        struct Data {
            #[serde(default)]
            panic: bool,
        }
        let data: Data = event.data()?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        if data.panic {
            panic!("order {} has no customer", event.id());
        }
        self.handled.lock().unwrap().push(event.id().to_string());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_dead_letters_the_record_and_its_partition_goes_on() {
    logs();
    let env = env().await;
    let (topic, group) = setup(&env, 1).await;
    let p = producer(&env.info);
    produce(
        &p,
        &topic,
        0,
        "before",
        &event("before", 1, serde_json::json!({})),
    )
    .await;
    let bad = unique("boom");
    let offset = produce(
        &p,
        &topic,
        0,
        &bad,
        &event(&bad, 1, serde_json::json!({"panic": true})),
    )
    .await;
    for id in ["after-1", "after-2"] {
        produce(&p, &topic, 0, id, &event(id, 1, serde_json::json!({}))).await;
    }
    let handler = Panicky::default();
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .build(handler.clone())
        .await
        .unwrap();
    let running = start(worker);
    let handled = tokio::time::timeout(
        TIMEOUT,
        eventually(TIMEOUT, "the records after the panic handled", || async {
            (handler.handled.lock().unwrap().len() == 3).then_some(())
        }),
    )
    .await;
    assert!(
        handled.is_ok(),
        "the partition stopped at the panic: handled only {:?}",
        handler.handled.lock().unwrap()
    );
    let dlt = read_topic(&env.info, &format!("{topic}.DLT"), 1, TIMEOUT).await;
    eventually(TIMEOUT, "everything committed", || async {
        let c = committed_offsets(&env, &group).await;
        (c.get(&(topic.clone(), 0)) == Some(&4)).then_some(())
    })
    .await;
    let panics = running.metric("eventops_worker_handler_panics_total");
    running.stop().await;

    assert_eq!(
        *handler.handled.lock().unwrap(),
        ["before", "after-1", "after-2"]
    );
    let d = &dlt[0];
    assert_eq!(d.key(), Some(bad.as_bytes()));
    let h = |name| header(d, name).unwrap_or_else(|| panic!("header {name} missing"));
    assert_eq!(
        dead_letter::decode_i64(h(dead_letter::ORIGINAL_OFFSET)),
        Some(offset)
    );
    let message = String::from_utf8_lossy(h(dead_letter::EXCEPTION_MESSAGE)).into_owned();
    assert!(
        message.contains(&format!("order {bad} has no customer")),
        "the panic message is the exception message: {message}"
    );
    assert_eq!(panics, 1, "one panic counted");
    let lines = log_lines_containing(&format!("corr-{bad}"));
    assert!(
        lines.iter().any(|l| l.contains("panic")),
        "a log line names the panic with the correlation id corr-{bad}: {lines:?}"
    );
}

/// Writes one effect row per event in the inbox transaction.
struct Effects {
    table: String,
}

impl TransactionalHandler for Effects {
    async fn handle(
        &self,
        event: &Event<'_>,
        tx: &Transaction<'_>,
        _ctx: &Context<'_>,
    ) -> Result<(), HandlerError> {
        let r = event.record();
        tx.execute(
            &format!("INSERT INTO {} VALUES ($1, $2, $3, $4)", self.table),
            &[&event.id(), &r.topic(), &r.partition(), &r.offset()],
        )
        .await
        .map_err(HandlerError::transient)?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inbox_database_outage_dead_letters_nothing_and_applies_every_event_once() {
    let env = env().await;
    let (topic, group) = setup(&env, 2).await;
    let mut pg = PrivatePostgres::start();
    let db_url = pg.url();
    let table = "effects";
    {
        let (db, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        create_effects_table(&db, table).await;
        drop(db);
        let _ = conn.await;
    }
    let port = free_port();
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .postgres_url(db_url.clone())
        .health_addr(([127, 0, 0, 1], port).into())
        .build_transactional(Effects {
            table: table.into(),
        })
        .await
        .unwrap();
    let running = start(worker);

    // A stream of 2 × 20 events a second for 30 s; PostgreSQL stops for 15 s in the middle.
    // Paced by the clock, not by the broker's acknowledgements (awaited together at the
    // end): awaiting each send in turn made the stream last 600 round trips longer, past
    // its limit on a loaded machine.
    let stream_started = std::time::Instant::now();
    let streaming = {
        let (info, topic) = (env.info.clone(), topic.clone());
        tokio::spawn(async move {
            let p = producer(&info);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut sends = Vec::with_capacity(1200);
            for i in 0..600 {
                tick.tick().await;
                for partition in 0..2 {
                    let (p, topic) = (p.clone(), topic.clone());
                    sends.push(tokio::spawn(async move {
                        let id = format!("s-{partition}-{i}");
                        let payload = event(&id, 1, serde_json::json!({}));
                        produce(&p, &topic, partition, &id, &payload).await
                    }));
                }
            }
            for send in sends {
                send.await.expect("a send of the stream");
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    let ready_before = http_get(port, "/readyz").map(|r| r.0);
    pg.stop();
    let outage = std::time::Instant::now();
    let mut not_ready_during_outage = false;
    while outage.elapsed() < Duration::from_secs(15) {
        if http_get(port, "/readyz").map(|r| r.0) == Some(503) {
            not_ready_during_outage = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    pg.resume();
    tokio::time::timeout(TIMEOUT, streaming)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the stream did not end {:?} after it started",
                stream_started.elapsed()
            )
        })
        .unwrap();
    let stream_took = stream_started.elapsed();
    let produced = 1200;
    let (db, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let applied = tokio::time::timeout(
        TIMEOUT,
        eventually(TIMEOUT, "every event applied", || async {
            let n: i64 = db
                .query_one(
                    &format!("SELECT count(DISTINCT event_id) FROM {table}"),
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (n == produced).then_some(())
        }),
    )
    .await
    .is_ok();
    let ready_after = eventually(TIMEOUT, "ready again", || async {
        (http_get(port, "/readyz")?.0 == 200).then_some(200)
    });
    let ready_after = tokio::time::timeout(TIMEOUT, ready_after).await.ok();
    let dead_lettered = topic_record_count(&env, &format!("{topic}.DLT")).await;
    wait_for_zero_lag(&env, &group, &topic, 2).await;
    running.stop().await;

    assert_eq!(
        dead_lettered, 0,
        "records dead-lettered during the database outage"
    );
    let per_id: Vec<(String, i64)> = db
        .query(
            &format!("SELECT event_id, count(*) FROM {table} GROUP BY 1 HAVING count(*) <> 1"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        per_id.is_empty(),
        "events applied more than once: {per_id:?}"
    );
    assert!(
        applied,
        "not every event was applied (the stream took {stream_took:?})"
    );
    eprintln!("the stream took {stream_took:?}");
    let inbox: i64 = db
        .query_one(
            "SELECT count(*) FROM eventops_inbox WHERE consumer_group = $1",
            &[&group],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(inbox, produced);
    assert_eq!(ready_before, Some(200), "ready before the outage");
    assert!(
        not_ready_during_outage,
        "/readyz stayed 200 during the outage"
    );
    assert_eq!(ready_after, Some(200), "ready after the outage");
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_waits_until_the_group_is_joined() {
    let env = env().await;
    let (topic, group) = setup(&env, 1).await;
    let port = free_port();
    // Nothing listens on this broker address: the worker can never join its group.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .kafka_property("bootstrap.servers", nowhere)
        .health_addr(([127, 0, 0, 1], port).into())
        .build(Recorder::default())
        .await
        .unwrap();
    let running = start(worker);
    let mut answers = Vec::new();
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        answers.push(http_get(port, "/readyz").map(|r| r.0));
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), running.stop()).await;
    assert!(
        answers.iter().all(|a| *a == Some(503)),
        "/readyz before the group was ever joined: {answers:?}"
    );

    let port = free_port();
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_addr(([127, 0, 0, 1], port).into())
        .build(Recorder::default())
        .await
        .unwrap();
    let running = start(worker);
    eventually(TIMEOUT, "ready once joined", || async {
        (http_get(port, "/readyz")?.0 == 200).then_some(())
    })
    .await;
    running.stop().await;
}

/// Blocks on every record until `release` is set (at most two minutes); counts calls.
#[derive(Clone, Default)]
struct Stuck {
    entered: Arc<AtomicUsize>,
    release: Arc<AtomicBool>,
}

impl Handler for Stuck {
    async fn handle(&self, _event: &Event<'_>, _ctx: &Context<'_>) -> Result<(), HandlerError> {
        self.entered.fetch_add(1, Ordering::Relaxed);
        for _ in 0..2400 {
            if self.release.load(Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoke_waits_for_stuck_handlers_only_until_its_timeout_and_liveness_follows_the_poll_loop()
 {
    let env = env().await;
    let (topic, group) = setup(&env, 2).await;
    produce_events(&env, &topic, 2, "s", 1).await;
    let port = free_port();
    let stuck = Stuck::default();
    let first = start(
        Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
            .idempotency(Idempotency::None)
            .health_addr(([127, 0, 0, 1], port).into())
            .revoke_timeout(Duration::from_secs(5))
            .liveness_timeout(Duration::from_millis(1500))
            .build(stuck.clone())
            .await
            .unwrap(),
    );
    eventually(
        TIMEOUT,
        "both records stuck in the first worker",
        || async { (stuck.entered.load(Ordering::Relaxed) == 2).then_some(()) },
    )
    .await;
    let live_before = http_get(port, "/healthz").map(|r| r.0);

    // A second worker joins: the first must give up a partition whose handler is stuck.
    let joined = std::time::Instant::now();
    let recorder = Recorder::default();
    let second = start(
        Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
            .idempotency(Idempotency::None)
            .health_server(false)
            .build(recorder.clone())
            .await
            .unwrap(),
    );
    let mut liveness = Vec::new();
    let mut moved_after = None;
    while joined.elapsed() < Duration::from_secs(25) {
        liveness.push(http_get(port, "/healthz").map(|r| r.0));
        if moved_after.is_none() && recorder.mine.load(Ordering::Relaxed) >= 1 {
            moved_after = Some(joined.elapsed());
        }
        if moved_after.is_some()
            && liveness.last() == Some(&Some(200))
            && liveness.contains(&Some(503))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stuck.release.store(true, Ordering::Relaxed);
    second.stop().await;
    first.stop().await;

    assert_eq!(live_before, Some(200));
    assert!(
        moved_after.is_some(),
        "the stuck partition's record did not reach the second worker within 25 s"
    );
    assert!(
        liveness.contains(&Some(503)),
        "/healthz never failed while the poll thread was blocked in the revoke: {liveness:?}"
    );
    assert_eq!(
        liveness.last(),
        Some(&Some(200)),
        "/healthz passes again once the poll loop runs: {liveness:?}"
    );
}

/// Fails `{"transient_failures": n}` events n times; tracks how many calls run at once,
/// overall and among records without a key.
#[derive(Clone, Default)]
struct Concurrent {
    active: Arc<AtomicUsize>,
    max_active: Arc<AtomicUsize>,
    keyless_active: Arc<AtomicUsize>,
    max_keyless_active: Arc<AtomicUsize>,
    attempts: Arc<Mutex<BTreeMap<String, u32>>>,
    done: Arc<Mutex<Vec<String>>>,
}

impl Handler for Concurrent {
    async fn handle(&self, event: &Event<'_>, _ctx: &Context<'_>) -> Result<(), HandlerError> {
        #[derive(serde::Deserialize)]
        struct Data {
            #[serde(default)]
            transient_failures: u32,
        }
        let data: Data = event.data()?;
        let n = {
            let mut a = self.attempts.lock().unwrap();
            let n = a.entry(event.id().to_string()).or_default();
            *n += 1;
            *n
        };
        if n <= data.transient_failures {
            return Err(HandlerError::transient(std::io::Error::other("not yet")));
        }
        let keyless = event.record().key().is_none();
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(now, Ordering::SeqCst);
        if keyless {
            let now = self.keyless_active.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_keyless_active.fetch_max(now, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if keyless {
            self.keyless_active.fetch_sub(1, Ordering::SeqCst);
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.done.lock().unwrap().push(event.id().to_string());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_by_key_runs_handlers_at_once_and_a_backing_off_key_holds_up_no_other() {
    let env = env().await;
    let (topic, group) = setup(&env, 1).await;
    let p = producer(&env.info);
    // Three failures with 1 s, 2 s and 4 s back-off: "slow" succeeds after about 7 s.
    produce(
        &p,
        &topic,
        0,
        "slow",
        &event("slow", 1, serde_json::json!({"transient_failures": 3})),
    )
    .await;
    let handler = Concurrent::default();
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .idempotency(Idempotency::None)
        .key_concurrency(4)
        .retry_policy(RetryPolicy {
            max_attempts: 4,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(4),
            multiplier: 2.0,
            jitter: 0.0,
        })
        .build(handler.clone())
        .await
        .unwrap();
    let running = start(worker);
    eventually(TIMEOUT, "slow attempted", || async {
        handler
            .attempts
            .lock()
            .unwrap()
            .contains_key("slow")
            .then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    // While "slow" backs off: 20 records of other keys and 20 without a key.
    for i in 0..20 {
        let id = format!("keyed-{i}");
        produce(
            &p,
            &topic,
            0,
            &format!("k{}", i % 10),
            &event(&id, 1, serde_json::json!({})),
        )
        .await;
    }
    for i in 0..20 {
        let id = format!("keyless-{i}");
        p.send(
            rdkafka::producer::FutureRecord::<(), [u8]>::to(&topic)
                .partition(0)
                .payload(&event(&id, 1, serde_json::json!({}))[..]),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    }
    let others = tokio::time::timeout(
        TIMEOUT,
        eventually(TIMEOUT, "the other records handled", || async {
            (handler
                .done
                .lock()
                .unwrap()
                .iter()
                .filter(|id| *id != "slow")
                .count()
                == 40)
                .then_some(started.elapsed())
        }),
    )
    .await;
    let slow_done_first = handler.done.lock().unwrap().first().cloned();
    eventually(TIMEOUT, "slow handled", || async {
        handler
            .done
            .lock()
            .unwrap()
            .contains(&"slow".to_string())
            .then_some(())
    })
    .await;
    eventually(TIMEOUT, "all committed", || async {
        let c = committed_offsets(&env, &group).await;
        (c.get(&(topic.clone(), 0)) == Some(&41)).then_some(())
    })
    .await;
    running.stop().await;

    let others = others.expect("the other records are handled");
    assert_ne!(
        slow_done_first.as_deref(),
        Some("slow"),
        "the other keys waited for the backing-off key (done after {others:?})"
    );
    assert!(
        others < Duration::from_secs(5),
        "the other keys took {others:?}"
    );
    assert_eq!(handler.attempts.lock().unwrap()["slow"], 4);
    let max = handler.max_active.load(Ordering::SeqCst);
    assert!(max > 1, "handlers never ran at once: at most {max}");
    let keyless = handler.max_keyless_active.load(Ordering::SeqCst);
    assert!(
        keyless > 1,
        "records without a key were handled one at a time (at most {keyless} at once)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_commit_is_sent_again_and_only_acknowledged_commits_count() {
    let env = env().await;
    let (topic, group) = setup(&env, 1).await;
    // The worker runs as a tenant: read on its topic and its group, nothing else.
    let user = unique("rtf-tenant");
    let password = "tenant-secret";
    create_scram_user(&env, &user, password).await;
    set_acl(&env, true, &user, "Read", &["--topic", &topic]).await;
    set_acl(&env, true, &user, "Read", &["--group", &group]).await;
    let recorder = Recorder::default();
    let running = start(
        Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
            .kafka_property("sasl.username", user.clone())
            .kafka_property("sasl.password", password)
            .health_server(false)
            .idempotency(Idempotency::None)
            .build(recorder.clone())
            .await
            .unwrap(),
    );
    produce_events(&env, &topic, 1, "before", 10).await;
    eventually(TIMEOUT, "the first ten committed", || async {
        let c = committed_offsets(&env, &group).await;
        (c.get(&(topic.clone(), 0)) == Some(&10)).then_some(())
    })
    .await;
    let acknowledged_before = running.metric("eventops_worker_offset_commits_total");

    // Without read on the group the broker refuses commits (fetching needs only the
    // topic): ten more records are handled, and their commit fails.
    set_acl(&env, false, &user, "Read", &["--group", &group]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    produce_events(&env, &topic, 1, "during", 10).await;
    eventually(TIMEOUT, "the next ten handled", || async {
        (recorder.mine.load(Ordering::Relaxed) == 20).then_some(())
    })
    .await;
    eventually(TIMEOUT, "a commit refused", || async {
        (running.metric("eventops_worker_offset_commit_failures_total") > 0).then_some(())
    })
    .await;
    let acknowledged_during = running.metric("eventops_worker_offset_commits_total");
    let committed_during = committed_offsets(&env, &group).await;

    // Read on the group again; nothing new arrives, yet the refused offset is committed.
    set_acl(&env, true, &user, "Read", &["--group", &group]).await;
    let recommitted = tokio::time::timeout(
        Duration::from_secs(30),
        eventually(
            Duration::from_secs(30),
            "the refused offset committed",
            || async {
                let c = committed_offsets(&env, &group).await;
                (c.get(&(topic.clone(), 0)) == Some(&20)).then_some(())
            },
        ),
    )
    .await
    .is_ok();
    let acknowledged_after = running.metric("eventops_worker_offset_commits_total");
    let handled = recorder.mine.load(Ordering::Relaxed);
    running.stop().await;

    assert_eq!(
        committed_during.get(&(topic.clone(), 0)),
        Some(&10),
        "the broker refused the commit"
    );
    assert!(
        recommitted,
        "the refused commit was never sent again: Kafka still has {:?}",
        committed_offsets(&env, &group).await
    );
    assert_eq!(
        handled, 20,
        "the refused offset was committed by handling records again, not by sending it again"
    );
    assert!(acknowledged_before > 0, "acknowledged commits are counted");
    assert_eq!(
        acknowledged_during, acknowledged_before,
        "refused commits are not counted as commits"
    );
    assert!(acknowledged_after > acknowledged_during);
}
