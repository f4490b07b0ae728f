//! The worker's Prometheus metrics (prefix `eventops_worker`) and its HTTP endpoints:
//!
//! - `/healthz`: the poll loop is alive. It beats at least every few hundred
//!   milliseconds; when it has not beaten for the liveness timeout (see
//!   [`WorkerBuilder::liveness_timeout`](crate::WorkerBuilder::liveness_timeout)) the
//!   answer is 503, so Kubernetes restarts a worker whose poll thread is stuck.
//! - `/readyz`: the worker has joined its group (received its first assignment), is not
//!   shutting down, no partition is waiting for a dependency the runtime owns (the inbox
//!   database, a dead-letter or retry publish), and the last offset commit did not fail.
//! - `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

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
pub(crate) struct DependencyLabel {
    pub dependency: &'static str,
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
    pub(crate) panics: Family<TopicLabel, Counter>,
    pub(crate) dependency_failures: Family<DependencyLabel, Counter>,
    pub(crate) commits: Counter,
    pub(crate) commit_failures: Counter,
    pub(crate) outbox_published: Counter,
    pub(crate) outbox_refused: Counter,
    pub(crate) outbox_pending: Gauge,
    pub(crate) outbox_oldest_age: Gauge<f64, AtomicU64>,
    /// True while the worker consumes (running, not shutting down). `/readyz` also needs
    /// the group joined and no dependency outage; see [`Metrics::is_ready`].
    pub ready: AtomicBool,
    /// The first assignment was received.
    pub(crate) joined: AtomicBool,
    /// Partitions waiting for a dependency the runtime owns to come back.
    pub(crate) waiting_on_dependency: AtomicUsize,
    /// The last offset commit failed (cleared by the next that succeeds).
    pub(crate) commit_failing: AtomicBool,
    /// When the poll loop last beat, in milliseconds since `born`.
    heartbeat_ms: AtomicU64,
    /// Longest time without a heartbeat for `/healthz` to pass, in milliseconds.
    pub(crate) liveness_timeout_ms: AtomicU64,
    born: Instant,
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
            panics: Family::default(),
            dependency_failures: Family::default(),
            commits: Counter::default(),
            commit_failures: Counter::default(),
            outbox_published: Counter::default(),
            outbox_refused: Counter::default(),
            outbox_pending: Gauge::default(),
            outbox_oldest_age: Gauge::default(),
            ready: AtomicBool::new(false),
            joined: AtomicBool::new(false),
            waiting_on_dependency: AtomicUsize::new(0),
            commit_failing: AtomicBool::new(false),
            heartbeat_ms: AtomicU64::new(0),
            liveness_timeout_ms: AtomicU64::new(u64::MAX),
            born: Instant::now(),
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
        registry.register(
            "handler_panics",
            "Handler calls that panicked (each record is dead-lettered as a permanent error)",
            m.panics.clone(),
        );
        registry.register(
            "dependency_failures",
            "Failures of what the runtime owns (inbox database, dead-letter and retry \
             publishes); the partition waits and retries, the record is not at fault",
            m.dependency_failures.clone(),
        );
        registry.register(
            "offset_commits",
            "Offset commits the broker acknowledged",
            m.commits.clone(),
        );
        registry.register(
            "offset_commit_failures",
            "Offset commits that failed (they are sent again)",
            m.commit_failures.clone(),
        );
        registry.register(
            "outbox_published",
            "Outbox rows the relay published and Kafka acknowledged",
            m.outbox_published.clone(),
        );
        registry.register(
            "outbox_refused",
            "Outbox rows Kafka (or the relay's allowed topics) refused; they stay in the \
             table, with the later rows of their shard",
            m.outbox_refused.clone(),
        );
        registry.register(
            "outbox_pending_rows",
            "Rows in eventops_outbox not yet published (refreshed every few seconds)",
            m.outbox_pending.clone(),
        );
        registry.register(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest row in eventops_outbox (0 when it is empty)",
            m.outbox_oldest_age.clone(),
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

    /// Whether `/readyz` passes: consuming, joined, no dependency outage, commits going
    /// through.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
            && self.joined.load(Ordering::Relaxed)
            && self.waiting_on_dependency.load(Ordering::Relaxed) == 0
            && !self.commit_failing.load(Ordering::Relaxed)
    }

    /// Whether `/healthz` passes: the poll loop beat within the liveness timeout.
    pub fn is_live(&self) -> bool {
        let now = self.born.elapsed().as_millis() as u64;
        let last = self.heartbeat_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) <= self.liveness_timeout_ms.load(Ordering::Relaxed)
    }

    /// Marks a process that has no consumer group (the standalone outbox relay) ready:
    /// `/readyz` then passes while no dependency is failing.
    pub fn mark_ready_without_group(&self) {
        self.joined.store(true, Ordering::Relaxed);
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The poll loop is alive.
    pub(crate) fn beat(&self) {
        self.heartbeat_ms
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Counts a failure of `dependency`.
    pub(crate) fn dependency_failed(&self, dependency: &'static str) {
        self.dependency_failures
            .get_or_create(&DependencyLabel { dependency })
            .inc();
    }

    /// Outbox rows this process's relay published so far.
    pub fn outbox_published(&self) -> u64 {
        self.outbox_published.get()
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
/// Returns the bound address (useful with port 0). A worker does this itself; for other
/// processes of the runtime, such as the standalone outbox relay.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move { m.encode() }),
        )
        .route(
            "/healthz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if m.is_live() {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "the poll loop is stuck")
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if !m.ready.load(Ordering::Relaxed) {
                    (StatusCode::SERVICE_UNAVAILABLE, "not consuming")
                } else if !m.joined.load(Ordering::Relaxed) {
                    (StatusCode::SERVICE_UNAVAILABLE, "not in the group yet")
                } else if m.waiting_on_dependency.load(Ordering::Relaxed) > 0 {
                    (StatusCode::SERVICE_UNAVAILABLE, "waiting for a dependency")
                } else if m.commit_failing.load(Ordering::Relaxed) {
                    (StatusCode::SERVICE_UNAVAILABLE, "offset commits failing")
                } else {
                    (StatusCode::OK, "ready")
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
