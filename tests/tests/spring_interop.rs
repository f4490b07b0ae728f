//! Interoperability of the consumer runtime with Spring Kafka, with Spring Kafka 4.x's own
//! classes as the oracle (`tests/spring-oracle`, built with Maven): dead-letter records
//! byte-equal to Spring's, a dead-letter topic with fewer partitions than its source, the
//! origin of a record that went through a retry topic, and a retry chain shared with a
//! Spring `@RetryableTopic` service in both directions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use eventops_consumer_runtime::contract::{RetryRoute, TopicRoute};
use eventops_consumer_runtime::dead_letter::{self, chain, decode_i32, decode_i64};
use eventops_consumer_runtime::retry_topic::{self, SpringSuffix};
use eventops_consumer_runtime::{Context, ErrorKind, Event, Handler, HandlerError, Worker};
use eventops_tests::runtime::*;
use eventops_tests::spring::run_oracle;
use eventops_tests::{env, eventually, unique};
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use tokio::sync::oneshot;

const TIMEOUT: Duration = Duration::from_secs(60);
/// The Spring oracle's JVM start, Maven build on a cold cache included.
const ORACLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Fails every event with `kind`, as the Java listener throws `type_name(message)`.
#[derive(Clone)]
struct Fails {
    kind: ErrorKind,
    type_name: &'static str,
    message: &'static str,
    calls: Arc<AtomicU32>,
}

impl Fails {
    fn new(kind: ErrorKind, type_name: &'static str, message: &'static str) -> Self {
        Self {
            kind,
            type_name,
            message,
            calls: Arc::default(),
        }
    }
}

impl Handler for Fails {
    async fn handle(&self, _event: &Event<'_>, _ctx: &Context<'_>) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(HandlerError::message(self.kind, self.message).with_type_name(self.type_name))
    }
}

/// Runs `worker` until the returned sender fires; the handle yields its result.
fn start(
    worker: Worker,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), eventops_consumer_runtime::WorkerError>>,
) {
    let (stop, rx) = oneshot::channel();
    let done = tokio::spawn(worker.run_until(async move {
        let _ = rx.await;
    }));
    (stop, done)
}

async fn stop(
    (stop, done): (
        oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), eventops_consumer_runtime::WorkerError>>,
    ),
) {
    let _ = stop.send(());
    tokio::time::timeout(TIMEOUT, done)
        .await
        .expect("the worker stops within a minute")
        .unwrap()
        .expect("the worker stops cleanly");
}

/// The `kafka_dlt-*` headers of `m`, in order.
fn dlt_headers(m: &OwnedMessage) -> Vec<(String, Vec<u8>)> {
    m.headers()
        .map(|h| {
            h.iter()
                .filter(|h| h.key.starts_with(dead_letter::PREFIX))
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

/// A Java stack trace without its frame lines (`\tat ...`, `\t... n more`), which only a
/// JVM has: the throwables' own lines remain.
fn without_frames(trace: &[u8]) -> Vec<u8> {
    let text = String::from_utf8(trace.to_vec()).expect("a UTF-8 stack trace");
    text.split_inclusive('\n')
        .filter(|l| !l.starts_with("\tat ") && !l.starts_with("\t..."))
        .collect::<String>()
        .into_bytes()
}

/// Every header of `m` (values of null headers as empty).
fn all_headers(m: &OwnedMessage) -> Vec<(String, Vec<u8>)> {
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

/// How many headers of `m` are named `name`.
fn count(m: &OwnedMessage, name: &str) -> usize {
    m.headers()
        .map_or(0, |h| h.iter().filter(|h| h.key == name).count())
}

fn show(headers: &[(String, Vec<u8>)]) -> String {
    headers
        .iter()
        .map(|(k, v)| format!("  {k} = {:?}\n", String::from_utf8_lossy(v)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letter_headers_are_byte_equal_to_spring_kafkas() {
    let env = env().await;
    let topic = unique("spring");
    let group = unique("spring-group");
    let runtime_dlt = format!("{topic}.DLT");
    let spring_dlt = format!("{topic}.spring-DLT");
    create_topics(
        &env.info,
        &[(&topic, 3), (&runtime_dlt, 3), (&spring_dlt, 3)],
    )
    .await;
    let payload = event("order-7", 1, serde_json::json!({"total": -5}));
    let offset = produce(&producer(&env.info), &topic, 1, "order-7", &payload).await;

    // The runtime dead-letters the record: its handler fails as the Java listener below.
    let handler = Fails::new(
        ErrorKind::Permanent,
        "java.lang.IllegalStateException",
        "order total is negative",
    );
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .build(handler.clone())
        .await
        .unwrap();
    let running = start(worker);
    let ours = read_topic(&env.info, &runtime_dlt, 1, TIMEOUT).await;
    stop(running).await;

    // Spring Kafka dead-letters the same source record, in the same group.
    let offset_text = offset.to_string();
    run_oracle(
        &env.info,
        "dead-letter",
        &[
            ("group", &group),
            ("topic", &topic),
            ("partition", "1"),
            ("offset", &offset_text),
            ("dlt", &spring_dlt),
            ("exception", "java.lang.IllegalStateException"),
            ("message", "order total is negative"),
        ],
        ORACLE_TIMEOUT,
    )
    .await;
    let theirs = read_topic(&env.info, &spring_dlt, 1, TIMEOUT).await;

    let (ours, theirs) = (&ours[0], &theirs[0]);
    assert_eq!(ours.partition(), theirs.partition(), "DLT partition");
    assert_eq!(ours.key(), theirs.key(), "key");
    assert_eq!(ours.payload(), theirs.payload(), "value");
    let mut spring = dlt_headers(theirs);
    for (k, v) in &mut spring {
        if k == dead_letter::EXCEPTION_STACKTRACE {
            *v = without_frames(v);
        }
    }
    let runtime = dlt_headers(ours);
    assert!(
        spring
            .iter()
            .any(|(k, _)| k == dead_letter::EXCEPTION_CAUSE_FQCN),
        "Spring writes the cause:\n{}",
        show(&spring)
    );
    assert_eq!(
        runtime,
        spring,
        "the runtime's kafka_dlt-* headers (left) differ from Spring Kafka's (right, stack frames removed)\nruntime:\n{}spring:\n{}",
        show(&runtime),
        show(&spring)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_topic_with_fewer_partitions_than_its_source_still_gets_the_record() {
    let env = env().await;
    let topic = unique("spring");
    let group = unique("spring-group");
    let dlt = format!("{topic}.DLT");
    create_topics(&env.info, &[(&topic, 3), (&dlt, 1)]).await;
    let p = producer(&env.info);
    let payload = event("bad", 1, serde_json::json!({}));
    let offset = produce(&p, &topic, 2, "bad", &payload).await;

    let handler = Fails::new(ErrorKind::Permanent, "app::Rejected", "rejected");
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .build(handler.clone())
        .await
        .unwrap();
    let running = start(worker);
    // As Spring's checkPartition: partition 2 does not exist in the DLT, so the producer
    // chooses one instead of the publish failing until the DLT grows.
    let out = read_topic(&env.info, &dlt, 1, TIMEOUT).await;
    eventually(TIMEOUT, "the source partition committed", || async {
        let c = committed_offsets(&env, &group).await;
        (c.get(&(topic.clone(), 2)) == Some(&(offset + 1))).then_some(())
    })
    .await;
    stop(running).await;
    assert_eq!(out[0].partition(), 0);
    assert_eq!(out[0].payload(), Some(&payload[..]));
    assert_eq!(
        decode_i32(header(&out[0], dead_letter::ORIGINAL_PARTITION).unwrap()),
        Some(2)
    );
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_dead_lettered_from_a_retry_topic_names_the_main_topic_as_its_origin() {
    let env = env().await;
    let topic = unique("spring");
    let group = unique("spring-group");
    let retry = format!("{topic}-retry-0");
    let dlt = format!("{topic}.DLT");
    create_topics(&env.info, &[(&topic, 3), (&retry, 3), (&dlt, 3)]).await;
    let payload = event("flaky", 1, serde_json::json!({}));
    let offset = produce(&producer(&env.info), &topic, 1, "flaky", &payload).await;

    let handler = Fails::new(ErrorKind::Transient, "app::Timeout", "inventory timed out");
    let routes = [TopicRoute {
        topic: topic.clone(),
        dead_letter_topic: Some(dlt.clone()),
        retry_topics: vec![RetryRoute {
            topic: retry.clone(),
            delay_ms: 100,
        }],
    }];
    let worker = Worker::builder(worker_config(&env.info, &group, &routes))
        .health_server(false)
        .build(handler.clone())
        .await
        .unwrap();
    let running = start(worker);
    let out = read_topic(&env.info, &dlt, 1, TIMEOUT).await;
    stop(running).await;
    assert_eq!(handler.calls.load(Ordering::SeqCst), 2, "main, then retry");

    // A retry chain's records carry the headers Spring's @RetryableTopic chains write
    // (kafka_original-*, kafka_exception-*), not the kafka_dlt-* of a plain dead letter.
    let d = &out[0];
    let h = |name| header(d, name).unwrap_or_else(|| panic!("header {name} missing"));
    assert_eq!(
        (
            String::from_utf8_lossy(h(chain::ORIGINAL_TOPIC)).into_owned(),
            decode_i32(h(chain::ORIGINAL_PARTITION)),
            decode_i64(h(chain::ORIGINAL_OFFSET)),
        ),
        (topic.clone(), Some(1), Some(offset)),
        "the origin is the main topic's record, not the retry topic's\n{}",
        show(&all_headers(d))
    );
    assert_eq!(
        count(d, chain::ORIGINAL_TOPIC),
        1,
        "one origin, not one per hop"
    );
    assert_eq!(
        count(d, chain::EXCEPTION_CAUSE_FQCN),
        1,
        "the last failure only"
    );
}

/// Fails every event transiently and notes, per delivery, the topic, the attempt number
/// the runtime gave it and when it ran.
#[derive(Clone, Default)]
struct Notes(Arc<std::sync::Mutex<Vec<(String, u32, i64)>>>);

impl Handler for Notes {
    async fn handle(&self, event: &Event<'_>, ctx: &Context<'_>) -> Result<(), HandlerError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        self.0
            .lock()
            .unwrap()
            .push((event.record().topic().to_string(), ctx.attempt(), now));
        Err(
            HandlerError::message(ErrorKind::Transient, "inventory timed out")
                .with_type_name("app::Timeout"),
        )
    }
}

/// The route of a chain named as Spring's `@RetryableTopic` names it for one back-off
/// delay of 1 s: `<topic>-retry`, `<topic>-dlt`.
fn spring_named_route(topic: &str) -> TopicRoute {
    let retry = retry_topic::spring_retry_topics(topic, &[1000], SpringSuffix::DelayValue);
    TopicRoute {
        topic: topic.to_string(),
        dead_letter_topic: Some(retry_topic::spring_dead_letter_topic(topic)),
        retry_topics: retry
            .into_iter()
            .map(|topic| RetryRoute {
                topic,
                delay_ms: 1000,
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spring_retryable_topic_service_continues_the_runtimes_retry_chain() {
    let env = env().await;
    let topic = unique("chain");
    let group = unique("chain-group");
    let (retry, dlt) = (format!("{topic}-retry"), format!("{topic}-dlt"));
    create_topics(&env.info, &[(&topic, 3), (&retry, 3), (&dlt, 3)]).await;
    let payload = event("order-9", 1, serde_json::json!({}));
    let source = producer(&env.info);
    let offset = produce(&source, &topic, 1, "order-9", &payload).await;

    // The runtime fails the record on the main topic and sends it to Spring's retry topic.
    let worker = Worker::builder(worker_config(
        &env.info,
        &group,
        &[spring_named_route(&topic)],
    ))
    .health_server(false)
    .build(Notes::default())
    .await
    .unwrap();
    let running = start(worker);
    let ours = read_topic(&env.info, &retry, 1, TIMEOUT).await;
    stop(running).await;
    let due =
        retry_topic::decode_big_integer(header(&ours[0], retry_topic::BACKOFF_TIMESTAMP).unwrap())
            .expect("a BigInteger back-off timestamp");

    // Spring's retry listener takes it from there: it reads the runtime's headers, retries
    // once more at the due time, and dead-letters it.
    let out = run_oracle(
        &env.info,
        "retry-rest",
        &[
            ("group", &group),
            ("topic", &topic),
            ("message", "still failing"),
        ],
        ORACLE_TIMEOUT,
    )
    .await;
    let received = out
        .lines()
        .find(|l| l.starts_with(&format!("RECEIVED {retry} ")))
        .unwrap_or_else(|| panic!("Spring's retry listener got nothing:\n{out}"));
    let fields: Vec<&str> = received.split_whitespace().collect();
    assert_eq!(
        (fields[4], fields[5]),
        ("attempts=2", format!("due={due}").as_str()),
        "Spring reads the runtime's attempt number and due time: {received}"
    );
    let at: i64 = fields[6].trim_start_matches("at=").parse().unwrap();
    assert!(at >= due, "Spring waited for the due time: {received}");

    // Spring's chain writes KafkaHeaders.ORIGINAL_* and EXCEPTION_* (kafka_original-*,
    // kafka_exception-*), keeps the first origin and replaces the earlier failure.
    let theirs = read_topic(&env.info, &dlt, 1, TIMEOUT).await;
    let d = &theirs[0];
    let h = |name| header(d, name).unwrap_or_else(|| panic!("header {name} missing"));
    assert_eq!(
        (
            h(chain::ORIGINAL_TOPIC),
            decode_i32(h(chain::ORIGINAL_PARTITION)),
            decode_i64(h(chain::ORIGINAL_OFFSET)),
        ),
        (topic.as_bytes(), Some(1), Some(offset)),
        "Spring's dead letter names the main topic's record, from the runtime's headers\n{}",
        show(&all_headers(d))
    );
    assert_eq!(
        count(d, chain::ORIGINAL_TOPIC),
        1,
        "{}",
        show(&all_headers(d))
    );
    assert_eq!(
        (
            h(chain::EXCEPTION_CAUSE_FQCN),
            count(d, chain::EXCEPTION_CAUSE_FQCN)
        ),
        (&b"java.lang.IllegalStateException"[..], 1),
        "Spring's failure replaced the runtime's\n{}",
        show(&all_headers(d))
    );
    assert_eq!(
        h(retry_topic::ORIGINAL_TIMESTAMP),
        header(&ours[0], retry_topic::ORIGINAL_TIMESTAMP).unwrap(),
        "the original timestamp is carried along"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_continues_a_spring_retryable_topic_services_retry_chain() {
    let env = env().await;
    let topic = unique("chain");
    let group = unique("chain-group");
    let (retry, dlt) = (format!("{topic}-retry"), format!("{topic}-dlt"));
    create_topics(&env.info, &[(&topic, 3), (&retry, 3), (&dlt, 3)]).await;
    let payload = event("order-10", 1, serde_json::json!({}));
    let offset = produce(&producer(&env.info), &topic, 1, "order-10", &payload).await;

    // Spring's service fails the record and sends it to its retry topic.
    run_oracle(
        &env.info,
        "retry-main",
        &[
            ("group", &group),
            ("topic", &topic),
            ("message", "first failure"),
        ],
        ORACLE_TIMEOUT,
    )
    .await;
    let theirs = read_topic(&env.info, &retry, 1, TIMEOUT).await;
    // Spring committed the main topic's record: the runtime joining its group starts after it.
    eventually(TIMEOUT, "Spring's commit on the main topic", || async {
        let c = committed_offsets(&env, &group).await;
        (c.get(&(topic.clone(), 1)) == Some(&(offset + 1))).then_some(())
    })
    .await;
    let due = retry_topic::decode_big_integer(
        header(&theirs[0], retry_topic::BACKOFF_TIMESTAMP).unwrap(),
    )
    .expect("Spring's back-off timestamp");

    // The runtime, on the same chain, retries it at Spring's due time with Spring's
    // attempt number, then dead-letters it to Spring's DLT.
    let notes = Notes::default();
    let worker = Worker::builder(worker_config(
        &env.info,
        &group,
        &[spring_named_route(&topic)],
    ))
    .health_server(false)
    .build(notes.clone())
    .await
    .unwrap();
    let running = start(worker);
    let ours = read_topic(&env.info, &dlt, 1, TIMEOUT).await;
    stop(running).await;

    let on_retry: Vec<(u32, i64)> = notes
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _, _)| *t == retry)
        .map(|(_, a, at)| (*a, *at))
        .collect();
    assert_eq!(on_retry.len(), 1, "{on_retry:?}");
    assert_eq!(on_retry[0].0, 2, "Spring's retry_topic-attempts is read");
    assert!(
        on_retry[0].1 >= due,
        "Spring's back-off timestamp is honoured"
    );
    let d = &ours[0];
    let h = |name| header(d, name).unwrap_or_else(|| panic!("header {name} missing"));
    assert_eq!(
        (
            h(chain::ORIGINAL_TOPIC),
            decode_i32(h(chain::ORIGINAL_PARTITION)),
            decode_i64(h(chain::ORIGINAL_OFFSET)),
        ),
        (topic.as_bytes(), Some(1), Some(offset)),
        "the runtime's dead letter names the main topic's record, from Spring's headers\n{}",
        show(&all_headers(d))
    );
    assert_eq!(
        count(d, chain::ORIGINAL_TOPIC),
        1,
        "{}",
        show(&all_headers(d))
    );
    assert_eq!(
        (
            h(chain::EXCEPTION_CAUSE_FQCN),
            count(d, chain::EXCEPTION_CAUSE_FQCN)
        ),
        (&b"app::Timeout"[..], 1),
        "the runtime's failure replaced Spring's\n{}",
        show(&all_headers(d))
    );
}
