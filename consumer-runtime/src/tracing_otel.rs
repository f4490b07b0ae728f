//! Distributed tracing through Kafka headers, with OpenTelemetry and W3C Trace Context.
//!
//! - Each record is processed in `info` spans carrying its correlation id, event id,
//!   topic, partition and offset (`record` around retries and dead-lettering, `event`
//!   around each handler call), so every log line the runtime or a handler writes about a
//!   record names its correlation id at the usual `info` filter.
//! - A record's `traceparent` (and `tracestate`) header makes those spans children of the
//!   producer's span; a record without one starts a new trace.
//! - [`Context::publish`](crate::Context::publish) writes the `traceparent` of the span
//!   it is called in (the handler's, or a span the handler opened inside it), so the
//!   consumer of the published record continues the same trace.
//!
//! The spans become OpenTelemetry spans through
//! [`tracing-opentelemetry`](tracing_opentelemetry): install [`init`] (logging and
//! tracing in one call) or add [`layer`] to your own subscriber. Without that layer there
//! are no OpenTelemetry spans; `publish` then forwards the incoming `traceparent` as it
//! came, so the trace still continues. [`init`]'s provider makes and propagates ids but
//! exports nothing; to send spans to a collector, build an `SdkTracerProvider` with an
//! exporter (e.g. `opentelemetry-otlp`) and pass it to [`layer`].

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

pub use opentelemetry;
pub use opentelemetry_sdk;
pub use tracing_opentelemetry;

use crate::envelope::CORRELATION_HEADER;
use crate::handler::Event;
use crate::record::Record;

/// The W3C Trace Context header with the trace id, parent span id and flags.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The W3C Trace Context header with vendor-specific trace state.
pub const TRACESTATE_HEADER: &str = "tracestate";

/// A record's headers as OpenTelemetry's propagators read them.
struct RecordHeaders<'a>(&'a Record);

impl Extractor for RecordHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.headers().map(|(k, _)| k).collect()
    }
}

/// Headers to write, as OpenTelemetry's propagators produce them.
struct OutgoingHeaders(Vec<(&'static str, String)>);

impl Injector for OutgoingHeaders {
    fn set(&mut self, key: &str, value: String) {
        let key = match key {
            TRACEPARENT_HEADER => TRACEPARENT_HEADER,
            TRACESTATE_HEADER => TRACESTATE_HEADER,
            _ => return,
        };
        if !value.is_empty() {
            self.0.push((key, value));
        }
    }
}

/// The remote span context in `record`'s `traceparent`/`tracestate` headers (an empty
/// context when it has none or they are malformed).
pub fn remote_context(record: &Record) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&RecordHeaders(record))
}

/// Makes `span` a child of `record`'s remote span, when it has one and the span is
/// recorded by the OpenTelemetry layer.
fn adopt_remote_parent(span: &Span, record: &Record) {
    if span.is_disabled() || record.header(TRACEPARENT_HEADER).is_none() {
        return;
    }
    // Fails only without the OpenTelemetry layer; the span then has no OTel side.
    let _ = span.set_parent(remote_context(record));
}

/// The span of one handler call.
pub(crate) fn event_span(event: &Event<'_>, attempt: u32) -> Span {
    let record = event.record();
    let span = tracing::info_span!(
        "event",
        correlation_id = event.correlation_id().unwrap_or(""),
        event_id = event.id(),
        event_type = event.event_type(),
        topic = record.topic(),
        partition = record.partition(),
        offset = record.offset(),
        attempt,
    );
    adopt_remote_parent(&span, record);
    span
}

/// The span around what the runtime does with a record beyond the handler call (retries,
/// retry topics, dead-lettering); `event` is `None` for a record that could not be decoded.
pub(crate) fn record_span(record: &Record, event: Option<&Event<'_>>) -> Span {
    let correlation_id = match event {
        Some(e) => e.correlation_id(),
        None => record
            .header(CORRELATION_HEADER)
            .and_then(|v| std::str::from_utf8(v).ok()),
    };
    let span = tracing::info_span!(
        "record",
        correlation_id = correlation_id.unwrap_or(""),
        event_id = event.map_or("", |e| e.id()),
        topic = record.topic(),
        partition = record.partition(),
        offset = record.offset(),
    );
    adopt_remote_parent(&span, record);
    span
}

/// The trace headers for a record published now: the current span's context when it is
/// an OpenTelemetry span, else `incoming` (the handled record's `traceparent`) as it came.
pub(crate) fn outgoing_headers(incoming: Option<&[u8]>) -> Vec<(&'static str, String)> {
    let cx = Span::current().context();
    if cx.span().span_context().is_valid() {
        let mut headers = OutgoingHeaders(Vec::with_capacity(2));
        TraceContextPropagator::new().inject_context(&cx, &mut headers);
        return headers.0;
    }
    incoming
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(|v| vec![(TRACEPARENT_HEADER, v.to_string())])
        .unwrap_or_default()
}

/// A `tracing` layer that turns spans into OpenTelemetry spans made by `provider`.
pub fn layer<S>(provider: &SdkTracerProvider) -> OpenTelemetryLayer<S, SdkTracer>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("eventops-consumer-runtime"))
}

/// Keeps the tracer provider of [`init`]; dropping it flushes and stops the exporter.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// The tracer provider, e.g. to add spans of your own.
    pub fn provider(&self) -> &SdkTracerProvider {
        &self.provider
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Why [`init`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `RUST_LOG` is malformed.
    #[error("RUST_LOG: {0}")]
    Filter(String),
    /// A global subscriber was already installed.
    #[error("a global tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Installs the global subscriber: logs to stderr filtered by `RUST_LOG` (default
/// `info`), with span fields (so the correlation id) on every line, and OpenTelemetry
/// spans propagated through Kafka headers. Keep the returned guard until the end of
/// `main`.
pub fn init() -> Result<Telemetry, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) => tracing_subscriber::EnvFilter::try_new(&v)
            .map_err(|e| TelemetryError::Filter(e.to_string()))?,
        Err(_) => tracing_subscriber::EnvFilter::new("info"),
    };
    let provider = provider()?;
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(layer(&provider))
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    Ok(Telemetry { provider })
}

/// The tracer provider: makes span ids; exports nothing.
fn provider() -> Result<SdkTracerProvider, TelemetryError> {
    Ok(SdkTracerProvider::builder().build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders};

    fn record(headers: &[(&str, &str)]) -> Record {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        Record::new("t", 0, 0, None, None, Some(h))
    }

    #[test]
    fn the_incoming_traceparent_is_read_from_the_record() {
        let r = record(&[(
            TRACEPARENT_HEADER,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        let cx = remote_context(&r);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote() && sc.is_valid());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        let none = remote_context(&record(&[(TRACEPARENT_HEADER, "garbage")]));
        assert!(!none.span().span_context().is_valid());
    }

    #[test]
    fn without_the_layer_publish_forwards_the_incoming_traceparent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            outgoing_headers(Some(tp.as_bytes())),
            vec![(TRACEPARENT_HEADER, tp.to_string())]
        );
        assert!(outgoing_headers(None).is_empty());
    }
}
