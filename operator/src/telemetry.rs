//! Prometheus metrics and the HTTP endpoints: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

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
struct ControllerLabel {
    controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabel {
    request: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    controller: &'static str,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientRequestLabels {
    client: &'static str,
    request: String,
}

/// Labels of a ConsumerGroup's autoscaling metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    /// Namespace of the ConsumerGroup.
    pub namespace: String,
    /// Name of the ConsumerGroup.
    pub consumergroup: String,
}

/// Labels of one partition's lag.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PartitionLabels {
    /// Namespace of the ConsumerGroup.
    pub namespace: String,
    /// Name of the ConsumerGroup.
    pub consumergroup: String,
    /// Kafka topic.
    pub topic: String,
    /// Partition number.
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScaleLabels {
    direction: &'static str,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabel, Counter>,
    failures: Family<FailureLabels, Counter>,
    waits: Family<FailureLabels, Counter>,
    duration: Family<ControllerLabel, Histogram>,
    kafka_requests: Family<RequestLabel, Counter>,
    kube_writes: Family<RequestLabel, Counter>,
    writes: std::sync::atomic::AtomicU64,
    client_requests: Family<ClientRequestLabels, Gauge>,
    /// Lag of each ConsumerGroup, over all its partitions.
    pub group_lag: Family<GroupLabels, Gauge>,
    /// Lag of each partition of each ConsumerGroup.
    pub partition_lag: Family<PartitionLabels, Gauge>,
    /// Replicas the autoscaler wants for each ConsumerGroup.
    pub desired_replicas: Family<GroupLabels, Gauge>,
    /// 1 while a ConsumerGroup's lag can be measured, 0 while it cannot (committed
    /// offsets unreadable): its lag gauges are absent then, not zero.
    pub lag_measured: Family<GroupLabels, Gauge>,
    /// Records appended per second to a ConsumerGroup's partitions, as
    /// `scaling.drainWithin` counts them (only for such groups, once measured).
    pub arrival_rate: Family<GroupLabels, Gauge<f64, AtomicU64>>,
    /// Records per second one Ready worker of a ConsumerGroup processes, as
    /// `scaling.drainWithin` counts them (only for such groups, once measured).
    pub processing_rate: Family<GroupLabels, Gauge<f64, AtomicU64>>,
    scales: Family<ScaleLabels, Counter>,
    cycles: Histogram,
    cycle_count: std::sync::atomic::AtomicU64,
    /// True once this replica leads and its controllers run.
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("eventops_operator");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let waits = Family::<FailureLabels, Counter>::default();
        let duration = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that left a resource not Ready or failed, by reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_waits",
            "Reconciles that waited for another object without a status or an Event (a new \
             group for the EventTopics applied with it), by reason; not failures",
            waits.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        let kafka_requests = Family::<RequestLabel, Counter>::default();
        registry.register(
            "kafka_admin_requests",
            "Kafka admin requests sent, by request type",
            kafka_requests.clone(),
        );
        let kube_writes = Family::<RequestLabel, Counter>::default();
        registry.register(
            "kubernetes_writes",
            "Writes to the Kubernetes API (applies, status, finalizers, Events), by kind",
            kube_writes.clone(),
        );
        let client_requests = Family::<ClientRequestLabels, Gauge>::default();
        registry.register(
            "kafka_client_requests",
            "Requests sent by the operator's Kafka consumers (offsets reader, lag probe), by \
             type, as counted by librdkafka",
            client_requests.clone(),
        );
        let group_lag = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "consumergroup_lag",
            "Records not yet processed by a ConsumerGroup, over all its partitions",
            group_lag.clone(),
        );
        let partition_lag = Family::<PartitionLabels, Gauge>::default();
        registry.register(
            "consumergroup_partition_lag",
            "Records not yet processed by a ConsumerGroup in one partition",
            partition_lag.clone(),
        );
        let desired_replicas = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "consumergroup_desired_replicas",
            "Worker replicas the autoscaler wants for a ConsumerGroup",
            desired_replicas.clone(),
        );
        let lag_measured = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "consumergroup_lag_measured",
            "1 while a ConsumerGroup's lag can be measured, 0 while its committed offsets \
             cannot be read (see its LagMeasured condition)",
            lag_measured.clone(),
        );
        let arrival_rate = Family::<GroupLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "consumergroup_arrival_rate",
            "Records appended per second to a ConsumerGroup's partitions (groups with \
             scaling.drainWithin)",
            arrival_rate.clone(),
        );
        let processing_rate = Family::<GroupLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "consumergroup_processing_rate_per_replica",
            "Records per second one Ready worker of a ConsumerGroup processes, measured \
             while it had a backlog (groups with scaling.drainWithin)",
            processing_rate.clone(),
        );
        let scales = Family::<ScaleLabels, Counter>::default();
        registry.register(
            "autoscaler_scales",
            "Replica changes the autoscaler applied, by direction",
            scales.clone(),
        );
        let cycles = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "autoscaler_cycle_duration_seconds",
            "Time one autoscaler cycle (measure every group, decide, apply) took",
            cycles.clone(),
        );
        Self {
            registry,
            client_requests,
            group_lag,
            partition_lag,
            desired_replicas,
            lag_measured,
            arrival_rate,
            processing_rate,
            scales,
            cycles,
            cycle_count: Default::default(),
            reconciles,
            failures,
            waits,
            duration,
            kafka_requests,
            kube_writes,
            writes: std::sync::atomic::AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Records one reconcile of `controller` that took `took`; `failure` is the reason
    /// it did not end Ready, if it did not.
    pub fn reconciled(&self, controller: &'static str, took: Duration, failure: Option<&str>) {
        let label = ControllerLabel { controller };
        self.reconciles.get_or_create(&label).inc();
        self.duration
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if let Some(reason) = failure {
            let labels = FailureLabels {
                controller,
                reason: reason.to_string(),
            };
            self.failures.get_or_create(&labels).inc();
        }
    }

    /// Counts one reconcile of `controller` that waited quietly, for `reason`.
    pub fn waited(&self, controller: &'static str, reason: &str) {
        let labels = FailureLabels {
            controller,
            reason: reason.to_string(),
        };
        self.waits.get_or_create(&labels).inc();
    }

    /// Counts one Kafka admin request of type `request` (`CreateTopics`, `Metadata`, ...).
    pub fn kafka_request(&self, request: &'static str) {
        self.kafka_requests
            .get_or_create(&RequestLabel { request })
            .inc();
    }

    /// Counts one write to the Kubernetes API, of `kind` (`Deployment`, `status`, ...).
    pub fn kube_write(&self, kind: &'static str) {
        self.kube_writes
            .get_or_create(&RequestLabel { request: kind })
            .inc();
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the number of `request` requests a Kafka `client` of the operator has sent
    /// so far, as librdkafka counts them.
    pub fn client_requests(&self, client: &'static str, request: &str, total: i64) {
        let labels = ClientRequestLabels {
            client,
            request: request.to_string(),
        };
        self.client_requests.get_or_create(&labels).set(total);
    }

    /// Records one autoscaler cycle that took `took`.
    pub fn autoscaler_cycle(&self, took: Duration) {
        self.cycles.observe(took.as_secs_f64());
        self.cycle_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one replica change, `up` or `down`.
    pub fn scaled(&self, direction: &'static str) {
        self.scales.get_or_create(&ScaleLabels { direction }).inc();
    }

    /// Counts one Kafka request that changes something (topics, configs, ACLs, users).
    pub fn kafka_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes to Kubernetes and Kafka so far: a quiet resync adds none.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Reconciles of `controller` (`eventtopic`, `consumergroup`) run so far: a window
    /// that claims "nothing was written" must also show that something ran in it.
    pub fn reconciles(&self, controller: &'static str) -> u64 {
        self.reconciles
            .get_or_create(&ControllerLabel { controller })
            .get()
    }

    /// Autoscaler cycles run so far.
    pub fn autoscaler_cycles(&self) -> u64 {
        self.cycle_count.load(Ordering::Relaxed)
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (it leads and its
/// controllers run) on `addr` until the process ends.
pub async fn serve(addr: std::net::SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
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
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not leading, or not yet listed what it watches",
                    )
                }
            }),
        )
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_by_reason() {
        let m = Metrics::default();
        m.reconciled("eventtopic", Duration::from_millis(3), None);
        m.reconciled("eventtopic", Duration::from_millis(3), Some("NotSupported"));
        let text = m.encode();
        assert!(
            text.contains(r#"eventops_operator_reconciles_total{controller="eventtopic"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"eventops_operator_reconcile_failures_total{controller="eventtopic",reason="NotSupported"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("eventops_operator_reconcile_duration_seconds_bucket"),
            "{text}"
        );
    }
}
