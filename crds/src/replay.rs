//! `Replay`: rewind a ConsumerGroup's committed offsets, safely, while it runs.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Annotation a ConsumerGroup carries while a Replay holds it: `<Replay name>/<uid>`.
/// The autoscaler leaves a held group's replicas alone, and only one Replay holds a
/// group at a time.
pub const REPLAY_HOLD_ANNOTATION: &str = "eventops.dev/replay";

/// Rewinds (or moves forward) the committed offsets of a ConsumerGroup's Kafka group:
/// the operator scales the group to 0, waits until Kafka reports it Empty, sets the
/// offsets and hands the replicas back to the autoscaler.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "eventops.dev",
    version = "v1alpha1",
    kind = "Replay",
    namespaced,
    cel,
    status = "ReplayStatus",
    shortname = "rpl",
    category = "eventops",
    doc = "Rewinds a ConsumerGroup to the earliest offsets, a time or given offsets, per topic: scaled to 0, rewound while Kafka reports the group Empty, handed back to the autoscaler.",
    printcolumn(name = "Group", type_ = "string", json_path = ".spec.consumerGroup"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Rewound", type_ = "integer", json_path = ".status.rewound"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.spec == oldSelf.spec").message("a Replay's spec cannot change once created: delete it and create a new one").reason(Reason::FieldValueForbidden).field_path(".spec"),
    validation = Rule::new("has(self.spec.from) || size(self.spec.topics) > 0").message("set spec.from (where every topic of the group restarts) or spec.topics (per topic)").field_path(".spec"),
)]
#[serde(rename_all = "camelCase")]
pub struct ReplaySpec {
    /// Name of the ConsumerGroup (in this namespace) to rewind.
    #[schemars(length(min = 1, max = 253))]
    pub consumer_group: String,

    /// Where every topic of the group restarts, unless `topics` says otherwise for it.
    /// Topics neither covers keep their offsets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<ReplayPosition>,

    /// Per topic (by EventTopic name, one of the group's `topics`): where it restarts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    #[x_kube(validation = Rule::new("self.all(t, self.exists_one(u, u.topic == t.topic))").message("spec.topics names a topic twice"))]
    pub topics: Vec<TopicReplay>,

    /// Replay even though the group remembers processed events in memory only (or not
    /// at all), so the replayed events take effect again. Not needed with
    /// `processing.idempotency: Postgres`: the inbox skips what was already applied.
    #[serde(default)]
    pub allow_duplicates: bool,
}

/// Where a topic restarts: exactly one of `earliest`, `timestamp` or `offsets`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.earliest) && self.earliest ? 1 : 0) + (has(self.timestamp) ? 1 : 0) + (has(self.offsets) ? 1 : 0) == 1").message("set exactly one of earliest: true, timestamp or offsets"))]
pub struct ReplayPosition {
    /// From the first record still stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earliest: Option<bool>,

    /// From the first record whose timestamp is at or after this time (RFC 3339), as
    /// Kafka's ListOffsets finds it; partitions with none restart at their end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Time>,

    /// From these offsets; partitions not listed keep theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub offsets: Option<Vec<PartitionOffset>>,
}

/// Where one partition restarts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PartitionOffset {
    /// The partition.
    #[schemars(range(min = 0))]
    pub partition: i32,
    /// The offset of the first record to process again.
    #[schemars(range(min = 0))]
    pub offset: i64,
}

/// Where one topic of the group restarts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TopicReplay {
    /// Name of the EventTopic, one of the group's `topics`.
    #[schemars(length(min = 1, max = 253))]
    pub topic: String,
    /// Where it restarts.
    #[serde(flatten)]
    pub position: ReplayPosition,
}

/// Progress and outcome of a Replay.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplayStatus {
    /// `Pending`, `ScalingDown` (replicas at 0, waiting for Kafka to report the group
    /// Empty), `Completed` or `Refused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,

    /// `Accepted` says whether the spec resolved and this Replay holds the group;
    /// `Complete` whether the offsets are set and the group handed back.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The Kafka group id rewound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,

    /// The Deployment's replicas when the Replay took the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_before: Option<i32>,

    /// Per partition: the committed offset before and the one set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offsets: Vec<ReplayedPartition>,

    /// Records between the new and the old committed offsets, summed over partitions:
    /// what the group reads again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewound: Option<i64>,

    /// Records between an old committed offset and a later new one, summed: passed
    /// over, never read (explicit offsets ahead of the group's position).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<i64>,

    /// When the Replay took the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,

    /// When the offsets were set and the group handed back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
}

/// One partition's offsets before and after a Replay.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplayedPartition {
    /// The Kafka topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The group's committed offset before; absent when it had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
    /// The committed offset set.
    pub after: i64,
}
