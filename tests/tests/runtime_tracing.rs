//! The consumer runtime's tracing against the real broker: W3C `traceparent` read from
//! consumed records and written to published ones through OpenTelemetry, and the
//! correlation id on every log line about a record.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use eventops_consumer_runtime::tracing_otel::opentelemetry_sdk::trace::SdkTracerProvider;
use eventops_consumer_runtime::tracing_otel::{self, TRACEPARENT_HEADER};
use eventops_consumer_runtime::{
    CORRELATION_HEADER, Context, ErrorKind, Event, Handler, HandlerError, Worker, WorkerError,
};
use eventops_tests::runtime::*;
use eventops_tests::{env, eventually, unique};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tokio::sync::oneshot;
use tracing_subscriber::layer::SubscriberExt;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Everything the runtime logged in this test process (at `info`), as the `fmt` layer
/// wrote it.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        // Leaked: the provider must outlive every span of the process.
        let provider: &'static SdkTracerProvider =
            Box::leak(Box::new(SdkTracerProvider::builder().build()));
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("info"))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || Sink(sink.clone())),
            )
            .with(tracing_otel::layer(provider));
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        buffer
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines(containing: &str) -> Vec<String> {
    String::from_utf8_lossy(&logs().lock().unwrap())
        .lines()
        .filter(|l| l.contains(containing))
        .map(str::to_string)
        .collect()
}

/// Publishes each event's id to `out`, logs a line, and fails permanently when the data
/// says `{"fail": true}`.
struct Forward {
    out: String,
}

#[derive(serde::Deserialize)]
struct Data {
    #[serde(default)]
    fail: bool,
}

impl Handler for Forward {
    async fn handle(&self, event: &Event<'_>, ctx: &Context<'_>) -> Result<(), HandlerError> {
        let data: Data = event.data()?;
        tracing::info!("handler saw the event");
        if data.fail {
            return Err(HandlerError::message(ErrorKind::Permanent, "refused"));
        }
        ctx.publish(&self.out, None, event.id().as_bytes()).await
    }
}

async fn run_worker(
    group: &str,
    topic: &str,
    out: &str,
    until: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let info = env().await.info;
    let worker = Worker::builder(worker_config(&info, group, &[route(topic)]))
        .health_server(false)
        .build(Forward {
            out: out.to_string(),
        })
        .await?;
    worker.run_until(until).await
}

/// `(trace id, span id, flags)` of a `traceparent` value.
fn parse_traceparent(v: &[u8]) -> (String, String, String) {
    let v = std::str::from_utf8(v).expect("traceparent is text");
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {v:?}");
    assert_eq!(parts[0], "00", "version of {v:?}");
    (
        parts[1].to_string(),
        parts[2].to_string(),
        parts[3].to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn published_records_continue_the_incoming_trace_with_the_handler_span() {
    logs();
    let env = env().await;
    let topic = unique("trace");
    let out = format!("{topic}-out");
    create_topics(
        &env.info,
        &[(&topic, 1), (&format!("{topic}.DLT"), 1), (&out, 1)],
    )
    .await;
    let group = unique("trace-group");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let incoming = format!("00-{trace_id}-{parent_span}-01");
    let p = producer(&env.info);
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: TRACEPARENT_HEADER,
            value: Some(incoming.as_str()),
        })
        .insert(Header {
            key: CORRELATION_HEADER,
            value: Some("corr-traced"),
        });
    p.send(
        FutureRecord::to(&topic)
            .partition(0)
            .key("traced")
            .payload(&event("traced", 1, serde_json::json!({})))
            .headers(headers),
        TIMEOUT,
    )
    .await
    .expect("producing the traced record");
    // A record without a traceparent starts a trace of its own.
    produce(
        &p,
        &topic,
        0,
        "untraced",
        &event("untraced", 1, serde_json::json!({})),
    )
    .await;

    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn({
        let (group, topic, out) = (group.clone(), topic.clone(), out.clone());
        async move {
            run_worker(&group, &topic, &out, async move {
                let _ = stopped.await;
            })
            .await
        }
    });
    let published = read_topic(&env.info, &out, 2, TIMEOUT).await;
    let _ = stop.send(());
    tokio::time::timeout(TIMEOUT, worker)
        .await
        .expect("the worker stops")
        .unwrap()
        .expect("the worker stops cleanly");

    use rdkafka::Message;
    let by_id = |id: &str| {
        published
            .iter()
            .find(|m| m.payload() == Some(id.as_bytes()))
            .unwrap_or_else(|| panic!("{id} was not published"))
    };
    let traced = header(by_id("traced"), TRACEPARENT_HEADER).expect("a traceparent header");
    let (t, s, flags) = parse_traceparent(traced);
    assert_eq!(t, trace_id, "the same trace");
    assert_ne!(s, parent_span, "a span of its own: the handler's");
    assert_ne!(s, "0000000000000000");
    assert_eq!(flags, "01", "sampled, as the incoming record was");

    let fresh = header(by_id("untraced"), TRACEPARENT_HEADER).expect("a traceparent header");
    let (t2, s2, _) = parse_traceparent(fresh);
    assert_ne!(t2, trace_id, "a new trace");
    assert_ne!(t2, "00000000000000000000000000000000");
    assert_ne!(s2, "0000000000000000");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_log_line_about_a_record_carries_its_correlation_id() {
    logs();
    let env = env().await;
    let topic = unique("corr");
    let out = format!("{topic}-out");
    create_topics(
        &env.info,
        &[(&topic, 1), (&format!("{topic}.DLT"), 1), (&out, 1)],
    )
    .await;
    let group = unique("corr-group");
    let p = producer(&env.info);
    // `produce` sets the correlation header `corr-<key>`.
    produce(&p, &topic, 0, "ok", &event("ok", 1, serde_json::json!({}))).await;
    produce(
        &p,
        &topic,
        0,
        "bad",
        &event("bad", 1, serde_json::json!({"fail": true})),
    )
    .await;
    produce(&p, &topic, 0, "poison", b"not an envelope").await;

    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn({
        let (group, topic, out) = (group.clone(), topic.clone(), out.clone());
        async move {
            run_worker(&group, &topic, &out, async move {
                let _ = stopped.await;
            })
            .await
        }
    });
    read_topic(&env.info, &format!("{topic}.DLT"), 2, TIMEOUT).await;
    eventually(TIMEOUT, "the log lines written", || async {
        (log_lines(&topic).len() >= 4).then_some(())
    })
    .await;
    let _ = stop.send(());
    tokio::time::timeout(TIMEOUT, worker)
        .await
        .expect("the worker stops")
        .unwrap()
        .expect("the worker stops cleanly");

    let about_records: Vec<String> = log_lines(&format!("topic=\"{topic}\""))
        .into_iter()
        .chain(log_lines(&format!("topic={topic}")))
        .filter(|l| l.contains("offset"))
        .collect();
    let expect = [
        ("handler saw the event", "corr-ok"),
        ("handler saw the event", "corr-bad"),
        ("dead-lettering", "corr-bad"),
        ("poison record", "corr-poison"),
        ("dead-lettering", "corr-poison"),
    ];
    for (what, corr) in expect {
        let line = about_records
            .iter()
            .find(|l| l.contains(what) && l.contains(corr))
            .unwrap_or_else(|| {
                panic!("no {what:?} line with correlation id {corr}:\n{about_records:#?}")
            });
        assert!(line.contains(" INFO ") || line.contains(" WARN "), "{line}");
    }
    for line in &about_records {
        assert!(
            line.contains("correlation_id="),
            "a log line about a record without its correlation id: {line}"
        );
    }
}
