//! `EventTopic`: one Kafka topic, declared in Kubernetes.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Characters Kafka accepts in a topic name (`org.apache.kafka.common.internals.Topic`).
pub const TOPIC_NAME_PATTERN: &str = r"^[a-zA-Z0-9._-]+$";
/// Longest topic name Kafka accepts.
pub const TOPIC_NAME_MAX_LEN: usize = 249;
/// Suffix of the dead-letter topic when `deadLetter.topicName` is not set (Spring Kafka's).
pub const DEFAULT_DEAD_LETTER_SUFFIX: &str = ".DLT";
/// Annotation that stops reconciliation of a resource while it is `"true"`.
pub const PAUSED_ANNOTATION: &str = "eventops.dev/paused";
/// Annotation that lets a resource with `deletionPolicy: Delete` go without deleting its
/// Kafka topics, for when Kafka is gone for good: set it to `"true"` and the finalizer is
/// released on the next reconcile, so the resource (and its namespace) can be deleted.
pub const RELEASE_FINALIZER_ANNOTATION: &str = "eventops.dev/release-finalizer";
/// Annotation that lets an EventTopic take over Kafka topics that exist but that no
/// EventTopic manages (created by hand, by another tool, or before EventOps). Without
/// it such a topic is left alone and the EventTopic reports `TopicExists`. Once adopted,
/// a topic stays managed (recorded in `status.managedTopics`) when the annotation goes.
pub const ADOPT_ANNOTATION: &str = "eventops.dev/adopt";
/// Finalizer held by EventTopics with `deletionPolicy: Delete` until their topics are
/// deleted from Kafka.
pub const TOPIC_FINALIZER: &str = "eventops.dev/delete-kafka-topics";

/// A Kafka topic, its configuration and its dead-letter topic.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "eventops.dev",
    version = "v1alpha1",
    kind = "EventTopic",
    namespaced,
    cel,
    status = "EventTopicStatus",
    shortname = "et",
    category = "eventops",
    doc = "A Kafka topic managed by EventOps: partitions, replication, configs and its dead-letter topic.",
    printcolumn(name = "Topic", type_ = "string", json_path = ".status.topicName"),
    printcolumn(name = "Partitions", type_ = "integer", json_path = ".spec.partitions"),
    printcolumn(name = "Owner", type_ = "string", json_path = ".spec.owner", priority = 1),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].reason"#
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(
        "has(self.spec.topicName) || size(self.metadata.name) <= 249"
    ).message("metadata.name is the Kafka topic name unless spec.topicName is set, and Kafka allows at most 249 characters: set spec.topicName"),
    validation = Rule::new(
        "(has(self.spec.topicName) ? self.spec.topicName : self.metadata.name) == (has(oldSelf.spec.topicName) ? oldSelf.spec.topicName : oldSelf.metadata.name)"
    ).message("spec.topicName is immutable: Kafka cannot rename a topic; create a new EventTopic instead").reason(Reason::FieldValueInvalid).field_path(".spec.topicName"),
)]
#[serde(rename_all = "camelCase")]
pub struct EventTopicSpec {
    /// Name of the Kafka topic. Defaults to metadata.name. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    #[x_kube(validation = Rule::new("self != '.' && self != '..' && !self.startsWith('__')").message("spec.topicName cannot be '.' or '..' or start with '__' (Kafka's internal topics)"))]
    pub topic_name: Option<String>,

    /// Number of partitions. Kafka can add partitions but never remove them, so this can
    /// only grow. It also caps how many consumers of a group can share the work.
    #[schemars(range(min = 1, max = 100000))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("spec.partitions cannot be decreased: Kafka can only add partitions"))]
    pub partitions: i32,

    /// Replicas of each partition. Defaults to the broker's `default.replication.factor`.
    /// Immutable once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32767))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.replicationFactor is immutable: Kafka cannot change it in place"))]
    pub replication_factor: Option<i32>,

    /// Kafka topic configs (`retention.ms`, `cleanup.policy`, ...). Values are strings, as
    /// Kafka stores them: quote numbers (`retention.ms: "604800000"`). Configs not named
    /// here take the broker's defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,

    /// The dead-letter topic that records go to when they cannot be processed.
    #[serde(default)]
    pub dead_letter: DeadLetterSpec,

    /// Non-blocking retries: one retry topic per delay, `<topic>.retry-<delay>`, through
    /// which a failed record is re-delivered after that delay without holding up its
    /// partition (as Spring Kafka's retryable topics do).
    #[serde(default, skip_serializing_if = "RetrySpec::is_empty")]
    pub retry: RetrySpec,

    /// What deleting this EventTopic does to Kafka: `Retain` (default) keeps the topics and
    /// their data; `Delete` deletes them first.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Team or person that owns the topic's schema and producers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub owner: Option<String>,

    /// What the events on this topic mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

/// Dead-letter topic settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterSpec {
    /// Whether EventOps keeps a dead-letter topic beside this one.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Name of the dead-letter topic. Defaults to `<topic>.DLT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub topic_name: Option<String>,

    /// Kafka topic configs of the dead-letter topic.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

impl Default for DeadLetterSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            topic_name: None,
            config: BTreeMap::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// Retry topics for non-blocking retries.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Delay of each retry topic, in order (`10s`, `1m`, `10m`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub delays: Vec<RetryDelay>,
}

impl RetrySpec {
    /// Whether no retry topic is asked for.
    pub fn is_empty(&self) -> bool {
        self.delays.is_empty()
    }
}

/// A retry delay: a number and a unit, `s`, `m` or `h` (`30s`, `5m`).
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(transparent)]
pub struct RetryDelay(#[schemars(regex(pattern = r"^[1-9][0-9]{0,5}(s|m|h)$"))] pub String);

/// What happens to Kafka when an EventTopic is deleted.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum DeletionPolicy {
    /// Keep the Kafka topics and their data.
    #[default]
    Retain,
    /// Delete the Kafka topics (main, dead-letter, retry) before the resource goes.
    Delete,
}

/// Observed state of an EventTopic.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EventTopicStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Current conditions; `Ready` says whether Kafka matches the spec.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Name of the Kafka topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_name: Option<String>,

    /// Partitions the topic has in Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,

    /// Replication factor the topic has in Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<i32>,

    /// Name of the dead-letter topic, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,

    /// Names of the retry topics, in delay order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_topics: Vec<String>,

    /// ConsumerGroups in this namespace that consume this topic today.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<String>,

    /// The Kafka topics this EventTopic manages (it created or adopted them) and the
    /// configs it set on each. A topic that exists in Kafka but is not listed here is
    /// left alone unless the `eventops.dev/adopt` annotation says otherwise, and a config
    /// key is removed from Kafka only if it is listed here and no longer in the spec.
    /// Written before each change to Kafka, so it survives operator restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_topics: Option<Vec<ManagedTopic>>,
}

/// A Kafka topic an EventTopic manages.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ManagedTopic {
    /// The Kafka topic name.
    pub name: String,
    /// The config keys this EventTopic set on the topic (keys only, values are in the
    /// spec).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<String>,
}

impl EventTopic {
    /// The Kafka topic name: `spec.topicName`, or `metadata.name` when unset.
    pub fn kafka_topic_name(&self) -> &str {
        self.spec
            .topic_name
            .as_deref()
            .or(self.metadata.name.as_deref())
            .unwrap_or_default()
    }

    /// Whether the paused annotation stops reconciliation.
    pub fn is_paused(&self) -> bool {
        annotation_is_true(&self.metadata, PAUSED_ANNOTATION)
    }

    /// Names of the retry topics, in delay order.
    pub fn retry_topic_names(&self) -> Vec<String> {
        let topic = self.kafka_topic_name();
        let delays = &self.spec.retry.delays;
        delays
            .iter()
            .map(|d| format!("{topic}.retry-{}", d.0))
            .collect()
    }

    /// The dead-letter topic name, when a dead-letter topic is enabled.
    pub fn dead_letter_topic_name(&self) -> Option<String> {
        let dlt = &self.spec.dead_letter;
        dlt.enabled.then(|| {
            dlt.topic_name.clone().unwrap_or_else(|| {
                format!("{}{DEFAULT_DEAD_LETTER_SUFFIX}", self.kafka_topic_name())
            })
        })
    }
}

/// Whether `metadata.annotations[key]` is `"true"`.
pub fn annotation_is_true(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> bool {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .is_some_and(|v| v == "true")
}
