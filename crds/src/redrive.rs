//! `Redrive`: move records from a dead-letter topic back to where they came from.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Header a redriven record carries: `<dead-letter topic>/<partition>/<offset>` of the
/// dead-letter record it was made from.
pub const REDRIVEN_FROM_HEADER: &str = "eventops-redriven-from";

/// Moves the records of an EventTopic's dead-letter topic that match a filter back to
/// their original topic (or another topic of the namespace), each exactly once.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "eventops.dev",
    version = "v1alpha1",
    kind = "Redrive",
    namespaced,
    cel,
    status = "RedriveStatus",
    shortname = "rdr",
    category = "eventops",
    doc = "Moves dead-lettered records back to their topic, each exactly once, filtered and rate-limited.",
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Matched", type_ = "integer", json_path = ".status.matched"),
    printcolumn(name = "Moved", type_ = "integer", json_path = ".status.moved"),
    printcolumn(name = "Skipped", type_ = "integer", json_path = ".status.skipped"),
    printcolumn(name = "DryRun", type_ = "boolean", json_path = ".spec.dryRun", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.spec == oldSelf.spec").message("a Redrive's spec cannot change once created: its progress is counted against it; delete it (which cancels it) and create a new one").reason(Reason::FieldValueForbidden).field_path(".spec"),
)]
#[serde(rename_all = "camelCase")]
pub struct RedriveSpec {
    /// Name of the EventTopic (in this namespace) whose dead-letter topic is read.
    #[schemars(length(min = 1, max = 253))]
    pub source: String,

    /// Name of an EventTopic (in this namespace) to send every matched record to. When
    /// not set, each record goes back to the topic its `kafka_dlt-original-topic`
    /// header names (written by the consumer runtime and by Spring Kafka alike), which
    /// must be a topic an EventTopic of this namespace owns: a record whose origin is
    /// anything else is skipped and counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,

    /// Which dead-letter records to move; all of them when not set.
    #[serde(default)]
    pub filter: RedriveFilter,

    /// Only count the matching records and show a few in `status.samples`; move nothing.
    #[serde(default)]
    pub dry_run: bool,

    /// Most records moved per second; no limit when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_records_per_second: Option<i32>,
}

/// Conditions a dead-letter record must meet, all of them, to be moved.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.after) || !has(self.before) || timestamp(self.after) < timestamp(self.before)").message("filter.after must be earlier than filter.before"))]
pub struct RedriveFilter {
    /// Only records dead-lettered at or after this time (the dead-letter record's
    /// timestamp), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Time>,

    /// Only records dead-lettered before this time, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Time>,

    /// Only records whose exception (`kafka_dlt-exception-fqcn`) or its cause
    /// (`kafka_dlt-exception-cause-fqcn`) is this class: a fully qualified name, or the
    /// simple name after the last dot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub exception_class: Option<String>,

    /// Only records with exactly this key (as UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,

    /// Only records with this header, and this value when `value` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderMatch>,
}

/// A header a record must carry.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Header value (as UTF-8); any value when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Progress and outcome of a Redrive.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RedriveStatus {
    /// `Pending`, `Running`, `Completed` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,

    /// `Accepted` says whether the spec resolved (the source and destination
    /// EventTopics exist here and own their topics); `Complete` whether it is done.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The dead-letter topic read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_topic: Option<String>,

    /// Records read that matched the filter.
    #[serde(default)]
    pub matched: i64,

    /// Matched records moved (in a dry run: that would be moved).
    #[serde(default)]
    pub moved: i64,

    /// Matched records left in place because their destination is not a topic an
    /// EventTopic of this namespace owns (or they name none).
    #[serde(default)]
    pub skipped: i64,

    /// Per partition of the dead-letter topic: where the redrive started, where it is,
    /// and where it stops (the end of the partition when it started).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<RedrivePartition>,

    /// A few matched records, for a dry run to show what would move.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<RedriveSample>,

    /// When the redrive started reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,

    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
}

/// Position of a redrive in one dead-letter partition.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RedrivePartition {
    /// Partition of the dead-letter topic.
    pub partition: i32,
    /// First offset considered.
    pub start: i64,
    /// Next offset to read (committed with the records moved before it).
    pub position: i64,
    /// The offset it stops at: the partition's end when the redrive started.
    pub end: i64,
}

/// One matched dead-letter record, as a dry run shows it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RedriveSample {
    /// Partition of the dead-letter topic.
    pub partition: i32,
    /// Offset in the dead-letter topic.
    pub offset: i64,
    /// Record key, as UTF-8 (lossy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Where it came from, `topic/partition/offset`, from its `kafka_dlt-original-*`
    /// headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Where it would go; none when it would be skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Exception class: the cause's when there is one (Spring Kafka, and the runtime
    /// as Spring does, wrap the listener's exception).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exception: Option<String>,
    /// Exception message (the first 200 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
