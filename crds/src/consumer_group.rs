//! `ConsumerGroup`: a Kafka consumer group and the workers that form it.

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A Go-style duration as Kubernetes writes them (`500ms`, `30s`, `5m`, `1h30m`).
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// Workers that consume EventTopics as one Kafka consumer group, with their processing
/// and scaling policies.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "eventops.dev",
    version = "v1alpha1",
    kind = "ConsumerGroup",
    namespaced,
    cel,
    status = "ConsumerGroupStatus",
    shortname = "cg",
    category = "eventops",
    doc = "Workers consuming EventTopics as one Kafka consumer group, scaled by consumer lag.",
    printcolumn(name = "Group", type_ = "string", json_path = ".status.groupId"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desiredReplicas"),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.totalLag"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 63").message("metadata.name becomes the value of the workers' app.kubernetes.io/name and eventops.dev/group labels, which Kubernetes limits to 63 characters: use a name of at most 63 characters"),
    validation = Rule::new(
        "(has(self.spec.groupId) ? self.spec.groupId : self.metadata.name) == (has(oldSelf.spec.groupId) ? oldSelf.spec.groupId : oldSelf.metadata.name)"
    ).message("spec.groupId is immutable: a new group id would start from scratch and lose the committed offsets; create a new ConsumerGroup instead").reason(Reason::FieldValueInvalid).field_path(".spec.groupId"),
)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroupSpec {
    /// Kafka consumer group id. Defaults to metadata.name. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub group_id: Option<String>,

    /// Names of the EventTopics, in this namespace, that the group consumes.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub topics: Vec<String>,

    /// Names of the EventTopics, in this namespace, that the workers publish to (for
    /// example `payment` publishing `payments.payment.captured`). The group's Kafka user
    /// is allowed to write them; no other topic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub produces: Vec<String>,

    /// The transactional outbox: events the workers' handlers append to the
    /// `eventops_outbox` table in their own database transaction are published to Kafka
    /// by a relay running inside the worker pods, with the group's Kafka user. It is a
    /// field of the group, not a resource of its own, because the rows are written in the
    /// worker's database transaction: the relay shares the worker's database, Kafka user,
    /// lifecycle and metrics endpoint. (For other setups a standalone relay binary
    /// exists.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox: Option<OutboxSpec>,

    /// The worker container that runs the group's consumers.
    pub template: WorkerTemplate,

    /// How records are processed: retries, back-off, dead-lettering, idempotency.
    #[serde(default)]
    pub processing: ProcessingPolicy,

    /// How the number of workers follows consumer lag.
    #[serde(default)]
    pub scaling: ScalingPolicy,
}

/// The outbox relay that runs inside the group's worker pods, as the group's Kafka user.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutboxSpec {
    /// Names of the EventTopics, in this namespace, that the relay publishes to. The
    /// group's Kafka user is allowed to write them (only once their EventTopic owns
    /// them); a row for any other topic stays in the table and is reported, never
    /// published.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub topics: Vec<String>,

    /// The Secret key holding the PostgreSQL URL of the database with the
    /// `eventops_outbox` table (`postgres://user:password@host/db`). When absent, the
    /// relay uses the worker's `DATABASE_URL` from `template.env`: the outbox lives in the
    /// database the handlers write to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_secret: Option<SecretKeyRef>,
}

/// A key of a Secret in the ConsumerGroup's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the ConsumerGroup's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,

    /// The key within the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The essentials of the worker's pod: EventOps fills in the rest.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkerTemplate {
    /// Container image of the worker.
    #[schemars(length(min = 1))]
    pub image: String,

    /// Entrypoint override.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,

    /// Arguments to the entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,

    /// Extra environment variables. The `EVENTOPS_*` variables are set by EventOps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.all(e, !e.name.startsWith('EVENTOPS_'))").message("template.env cannot set EVENTOPS_* variables: EventOps sets them from the spec")
    )]
    pub env: Vec<EnvVar>,

    /// CPU and memory requests and limits of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// How a worker handles each record.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProcessingPolicy {
    /// Attempts per record, the first included, before it is dead-lettered.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: i32,

    /// Back-off between attempts.
    #[serde(default)]
    pub backoff: BackoffPolicy,

    /// Send records that fail permanently, or run out of attempts, to the dead-letter
    /// topic of their EventTopic. When off, such a record stops its partition.
    #[serde(default = "default_true")]
    pub dead_letter: bool,

    /// How duplicate deliveries are recognised.
    #[serde(default)]
    pub idempotency: Idempotency,
}

impl Default for ProcessingPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            backoff: BackoffPolicy::default(),
            dead_letter: true,
            idempotency: Idempotency::default(),
        }
    }
}

/// Exponential back-off with jitter.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.initial) <= duration(self.max)").message("processing.backoff.initial must not exceed processing.backoff.max"))]
pub struct BackoffPolicy {
    /// Delay before the second attempt.
    #[serde(default = "default_backoff_initial")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub initial: Duration,

    /// Longest delay between attempts.
    #[serde(default = "default_backoff_max")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max: Duration,

    /// Factor each delay grows by.
    #[serde(default = "default_backoff_multiplier")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub multiplier: f64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
            multiplier: default_backoff_multiplier(),
        }
    }
}

/// Where a worker remembers which events it has processed.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum Idempotency {
    /// Every delivery is processed.
    None,
    /// A bounded in-memory set of recent event ids per worker.
    #[default]
    Memory,
    /// An inbox table in the worker's PostgreSQL database, written in the handler's
    /// own transaction.
    Postgres,
}

/// How replicas follow consumer lag.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas").message("scaling.minReplicas must be less than or equal to scaling.maxReplicas"))]
pub struct ScalingPolicy {
    /// Fewest replicas; 0 lets an idle group scale to zero.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 10000))]
    pub min_replicas: i32,

    /// Most replicas. Defaults to, and is always capped by, the partition count of the
    /// consumed topics, since a replica beyond that would get no partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_replicas: Option<i32>,

    /// Lag (records not yet processed) one replica is expected to absorb.
    #[serde(default = "default_lag_per_replica")]
    #[schemars(range(min = 1))]
    pub lag_per_replica: i64,

    /// Lag at or below which a group at zero replicas stays at zero.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub activation_lag: i64,

    /// How long lag must stay low before replicas are removed: the group shrinks to the
    /// highest replica count wanted during this window.
    #[serde(default = "default_scale_down_window")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub scale_down_stabilization: Duration,

    /// Shortest time between two scale-ups. The first scale-up after a quiet period is
    /// immediate; this only stops a burst from adding replicas every second while the
    /// new workers are still starting.
    #[serde(default = "default_scale_up_interval")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub scale_up_interval: Duration,

    /// Never run more replicas than partitions that have lag: a replica assigned only
    /// drained partitions would idle.
    #[serde(default)]
    pub limit_to_partitions_with_lag: bool,

    /// Only use replica counts that divide the partition count evenly (with 12
    /// partitions: 1, 2, 3, 4, 6, 12), rounding up, so every worker gets the same share.
    #[serde(default)]
    pub even_partition_distribution: bool,

    /// A partition whose committed offset has not moved for this long while it has lag
    /// is reported as stuck (condition `LagStuck` and an Event) and no longer drives
    /// scale-up: more workers do not help a poison record or a wedged consumer.
    #[serde(default = "default_stuck_after")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub stuck_after: Duration,

    /// One-step scaling: once the group's processing rate per replica has been measured,
    /// replicas are the fewest that drain the current lag within this time while keeping
    /// up with the records arriving: the smallest n with `lag + arrivalRate × drainWithin
    /// ≤ n × processingRatePerReplica × drainWithin`, reached in one step and capped as
    /// usual (`maxReplicas`, partitions, `limitToPartitionsWithLag`,
    /// `evenPartitionDistribution`). The rates are measured from the partitions' end
    /// offsets and the group's committed offsets; until a processing rate is measured
    /// (it needs a backlog and Ready workers), `lagPerReplica` decides. Unset: only
    /// `lagPerReplica` decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub drain_within: Option<Duration>,
}

impl Default for ScalingPolicy {
    fn default() -> Self {
        Self {
            min_replicas: default_min_replicas(),
            max_replicas: None,
            lag_per_replica: default_lag_per_replica(),
            activation_lag: 0,
            scale_down_stabilization: default_scale_down_window(),
            scale_up_interval: default_scale_up_interval(),
            limit_to_partitions_with_lag: false,
            even_partition_distribution: false,
            stuck_after: default_stuck_after(),
            drain_within: None,
        }
    }
}

/// Observed state of a ConsumerGroup.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroupStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Current conditions; `Ready` says whether the group's workers, credentials and
    /// ACLs match the spec.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The Kafka consumer group id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,

    /// Worker replicas that exist now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,

    /// Worker replicas the autoscaler wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,

    /// Records produced but not yet processed, over all consumed partitions, when last
    /// written. Live figures are in the operator's Prometheus metrics: status is written
    /// when the decision changes, not every measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_lag: Option<i64>,

    /// Lag of each partition that has lag (the 32 largest), when last written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partition_lag: Vec<PartitionLag>,

    /// The autoscaler's last change of replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale: Option<ScaleRecord>,

    /// Records appended per second to the consumed partitions, as `scaling.drainWithin`
    /// counts them (the lower of the last two measurements, so a one-off burst counts as
    /// lag, not as a rate), when last written. Only with `scaling.drainWithin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrival_rate: Option<f64>,

    /// Records per second one Ready worker processes (committed-offset advance per
    /// second divided by the Ready workers, measured while there was a backlog,
    /// smoothed), when last written. Absent until measured; only with
    /// `scaling.drainWithin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processing_rate_per_replica: Option<f64>,
}

/// Lag of one partition.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PartitionLag {
    /// Kafka topic.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
    /// Records not yet processed.
    pub lag: i64,
}

/// One change of replicas by the autoscaler.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleRecord {
    /// When it was applied.
    pub time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// Replicas before.
    pub from: i32,
    /// Replicas after.
    pub to: i32,
    /// Why, with the lag (and, with `scaling.drainWithin`, the rates) that led to it.
    pub reason: String,
}

impl ConsumerGroup {
    /// The Kafka group id: `spec.groupId`, or `metadata.name` when unset.
    pub fn kafka_group_id(&self) -> &str {
        self.spec
            .group_id
            .as_deref()
            .or(self.metadata.name.as_deref())
            .unwrap_or_default()
    }
}

fn default_true() -> bool {
    true
}
fn default_max_attempts() -> i32 {
    3
}
fn default_backoff_initial() -> Duration {
    std::time::Duration::from_millis(200).into()
}
fn default_backoff_max() -> Duration {
    std::time::Duration::from_secs(30).into()
}
fn default_backoff_multiplier() -> f64 {
    2.0
}
fn default_min_replicas() -> i32 {
    1
}
fn default_lag_per_replica() -> i64 {
    1000
}
fn default_scale_down_window() -> Duration {
    std::time::Duration::from_secs(60).into()
}
fn default_scale_up_interval() -> Duration {
    std::time::Duration::from_secs(5).into()
}
fn default_stuck_after() -> Duration {
    std::time::Duration::from_secs(120).into()
}
