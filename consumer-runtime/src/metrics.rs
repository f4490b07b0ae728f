//! The worker's Prometheus metrics (prefix `eventops_worker`) and its HTTP endpoints:
//! `/healthz` (the process answers), `/readyz` (it consumes and is not shutting down)
//! and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TopicLabel {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FailureLabels {
    pub topic: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PartitionLabels {
    pub topic: String,
    pub partition: i32,
}

/// The worker's metrics.
pub struct Metrics {
    registry: Registry,
    pub(crate) processed: Family<TopicLabel, Counter>,
    pub(crate) duplicates: Family<TopicLabel, Counter>,
    pub(crate) failed: Family<FailureLabels, Counter>,
    pub(crate) retried: Family<TopicLabel, Counter>,
    pub(crate) dead_lettered: Family<TopicLabel, Counter>,
    pub(crate) latency: Family<TopicLabel, Histogram>,
    pub(crate) lag: Family<PartitionLabels, Gauge>,
    pub(crate) commits: Counter,
    pub(crate) commit_failures: Counter,
    /// True while the worker consumes (subscribed, not shutting down).
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("eventops_worker");
        let m = Self {
            processed: Family::default(),
            duplicates: Family::default(),
            failed: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
            }),
            lag: Family::default(),
            commits: Counter::default(),
            commit_failures: Counter::default(),
            ready: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register(
            "records_processed",
            "Records handled successfully",
            m.processed.clone(),
        );
        registry.register(
            "records_duplicate",
            "Deliveries skipped because their event id was already processed",
            m.duplicates.clone(),
        );
        registry.register(
            "records_failed",
            "Failed handling attempts, by error kind",
            m.failed.clone(),
        );
        registry.register("records_retried", "Retries scheduled", m.retried.clone());
        registry.register(
            "records_dead_lettered",
            "Records published to the dead-letter topic",
            m.dead_lettered.clone(),
        );
        registry.register(
            "handler_duration_seconds",
            "Time one handler call took",
            m.latency.clone(),
        );
        registry.register(
            "consumer_lag",
            "Records between the committed offset and the end of the partition",
            m.lag.clone(),
        );
        registry.register("offset_commits", "Offset commits sent", m.commits.clone());
        registry.register(
            "offset_commit_failures",
            "Offset commits that failed",
            m.commit_failures.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Records handled successfully on `topic` so far.
    pub fn processed(&self, topic: &str) -> u64 {
        self.processed
            .get_or_create(&TopicLabel {
                topic: topic.into(),
            })
            .get()
    }

    /// Records of `topic` dead-lettered so far.
    pub fn dead_lettered(&self, topic: &str) -> u64 {
        self.dead_lettered
            .get_or_create(&TopicLabel {
                topic: topic.into(),
            })
            .get()
    }
}

/// Binds `addr` and serves `/healthz`, `/readyz` and `/metrics` in the background.
/// Returns the bound address (useful with port 0).
pub(crate) async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move { m.encode() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if m.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not consuming")
                }
            }),
        )
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health server stopped");
        }
    });
    Ok((bound, task))
}
