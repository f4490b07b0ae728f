//! The Kafka side: one admin client per operator, and the topic operations the
//! reconcilers need, in terms of [`TopicState`] rather than librdkafka types.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;

use crate::telemetry::Metrics;
use batch::Batcher;
pub use batch::Reading;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};

pub mod batch;
pub mod native;

/// How to reach Kafka: `bootstrap.servers` plus any librdkafka client properties
/// (security protocol, SASL, TLS).
#[derive(Clone, Debug, Default)]
pub struct KafkaSettings {
    /// Client properties, `bootstrap.servers` included.
    pub properties: BTreeMap<String, String>,
}

/// A failed Kafka operation, classified for conditions and retries.
#[derive(Clone, Debug, thiserror::Error)]
pub enum KafkaError {
    /// Kafka answered and refused: the request itself is wrong (bad config, replication
    /// factor larger than the cluster, not authorized). Retrying the same request fails
    /// the same way.
    #[error("Kafka refused to {op} topic {topic}: {code}{}", said(.message))]
    Refused {
        /// What was attempted.
        op: &'static str,
        /// The topic.
        topic: String,
        /// Kafka's error code.
        code: RDKafkaErrorCode,
        /// Kafka's own explanation, when it gave one.
        message: String,
    },
    /// Kafka answered that it cannot do it right now (no leader yet, controller moved,
    /// request timed out): worth retrying soon.
    #[error("Kafka could not {op} topic {topic} yet: {code}{}", said(.message))]
    Busy {
        /// What was attempted.
        op: &'static str,
        /// The topic.
        topic: String,
        /// Kafka's error code.
        code: RDKafkaErrorCode,
        /// Kafka's own explanation, when it gave one.
        message: String,
    },
    /// Kafka could not be reached or did not answer in time: worth retrying.
    #[error("Kafka is unavailable ({op} {topic}): {source}")]
    Unavailable {
        /// What was attempted.
        op: &'static str,
        /// The topic.
        topic: String,
        /// The client-side error.
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

/// `: <message>` when Kafka said more than its error code.
fn said(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

impl KafkaError {
    /// A CamelCase reason for a status condition: Kafka's own error name when Kafka
    /// refused (`InvalidReplicationFactor`, `InvalidConfig`, `TopicAuthorizationFailed`),
    /// `KafkaUnavailable` otherwise.
    pub fn reason(&self) -> String {
        match self {
            KafkaError::Refused { code, .. } | KafkaError::Busy { code, .. } => format!("{code:?}"),
            KafkaError::Unavailable { .. } => "KafkaUnavailable".into(),
        }
    }

    /// The same error, told about `topic` (one topic of a batched request).
    fn about(&self, topic: &str) -> Self {
        let mut e = self.clone();
        match &mut e {
            KafkaError::Refused { topic: t, .. }
            | KafkaError::Busy { topic: t, .. }
            | KafkaError::Unavailable { topic: t, .. } => *t = topic.to_string(),
        }
        e
    }

    /// Whether retrying soon may succeed (as opposed to waiting for a spec change).
    pub fn is_transient(&self) -> bool {
        !matches!(self, KafkaError::Refused { .. })
    }

    /// Whether the request may still have taken effect: no answer came (a timeout, a
    /// connection lost on the way). Any other answer says Kafka did nothing.
    pub fn may_have_taken_effect(&self) -> bool {
        use RDKafkaErrorCode as C;
        match self {
            KafkaError::Unavailable { .. } => true,
            KafkaError::Refused { code, .. } | KafkaError::Busy { code, .. } => matches!(
                code,
                C::RequestTimedOut
                    | C::OperationTimedOut
                    | C::TimedOutQueue
                    | C::NetworkException
                    | C::BrokerTransportFailure
            ),
        }
    }

    /// Kafka's error code, when Kafka answered.
    pub fn code(&self) -> Option<RDKafkaErrorCode> {
        match self {
            KafkaError::Refused { code, .. } | KafkaError::Busy { code, .. } => Some(*code),
            KafkaError::Unavailable { .. } => None,
        }
    }

    /// Kafka's own explanation; empty when it gave none.
    pub fn kafka_message(&self) -> &str {
        match self {
            KafkaError::Refused { message, .. } | KafkaError::Busy { message, .. } => message,
            KafkaError::Unavailable { .. } => "",
        }
    }

    /// Kafka's answer `code` to `op` on `topic`, classified.
    fn from_code(op: &'static str, topic: &str, code: RDKafkaErrorCode) -> Self {
        Self::from_answer(op, topic, code, String::new())
    }

    /// Kafka's answer `code`, with its `message`, to `op` on `topic`, classified.
    fn from_answer(op: &'static str, topic: &str, code: RDKafkaErrorCode, message: String) -> Self {
        let topic = topic.to_string();
        if is_transient_code(code) {
            KafkaError::Busy {
                op,
                topic,
                code,
                message,
            }
        } else {
            KafkaError::Refused {
                op,
                topic,
                code,
                message,
            }
        }
    }

    /// A native admin call's failure to `op` on `topic`, classified.
    fn from_native(op: &'static str, topic: &str, e: native::NativeError) -> Self {
        match e {
            native::NativeError::Kafka { code, message, .. } => {
                Self::from_answer(op, topic, code, message)
            }
            other => KafkaError::Unavailable {
                op,
                topic: topic.to_string(),
                source: Arc::new(other),
            },
        }
    }
}

/// Whether Kafka's answer `code` may go away by asking again soon (a leader moving, a
/// timeout, a throttle); otherwise asking again changes nothing until somebody acts (an
/// ACL missing, a bad request).
pub fn is_transient_code(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::NotController
            | C::RequestTimedOut
            | C::NetworkException
            | C::BrokerNotAvailable
            | C::NotEnoughReplicas
            | C::CoordinatorNotAvailable
            | C::ThrottlingQuotaExceeded
            // Metadata read just before another reconcile created it: look again.
            | C::TopicAlreadyExists
            | C::OperationTimedOut
            // librdkafka's own: no broker reachable or no answer in time.
            | C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Resolve
            | C::TimedOutQueue
            | C::WaitingForCoordinator
    )
}

/// A topic as Kafka has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicState {
    /// Number of partitions.
    pub partitions: i32,
    /// Replicas of partition 0 (every partition has the same count unless reassigned by
    /// hand).
    pub replication_factor: i32,
    /// Configs set on the topic itself, as opposed to inherited broker defaults.
    pub configs: BTreeMap<String, String>,
}

/// What to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewTopicSpec {
    /// Topic name.
    pub name: String,
    /// Partition count.
    pub partitions: i32,
    /// Replication factor; `None` takes the broker's `default.replication.factor`.
    pub replication_factor: Option<i32>,
    /// Topic configs.
    pub configs: BTreeMap<String, String>,
}

/// The operator's Kafka admin connection. Cheap to clone.
#[derive(Clone)]
pub struct KafkaAdmin {
    client: Arc<AdminClient<DefaultClientContext>>,
    /// ACLs, SCRAM users and the rest librdkafka's C API has: one result thread for all.
    native: native::NativeAdmin,
    timeout: Duration,
    metrics: Arc<Metrics>,
    reads: Arc<Reads>,
}

/// The reads every reconcile makes, each coalesced across reconciles.
struct Reads {
    topics: Batcher<String, Option<TopicState>, KafkaError>,
    scram: Batcher<String, Vec<native::ScramCredential>, native::NativeError>,
    acls: Batcher<String, BTreeSet<native::AclBinding>, native::NativeError>,
}

impl Reads {
    /// The reads; [`Reading::Since`] questions are answered from snapshots up to
    /// `snapshot_age` old (none when zero).
    fn new(native: &native::NativeAdmin, metrics: &Arc<Metrics>, snapshot_age: Duration) -> Self {
        let topics = {
            let (native, metrics) = (native.clone(), metrics.clone());
            Batcher::new(
                move |names| describe_topics(native.clone(), metrics.clone(), names),
                || KafkaError::Unavailable {
                    op: "describe",
                    topic: String::new(),
                    source: Arc::new(native::NativeError::Cancelled {
                        op: "describe topics",
                    }),
                },
            )
        };
        let scram = {
            let (native, metrics) = (native.clone(), metrics.clone());
            Batcher::new(
                move |users: Vec<String>| {
                    let (native, metrics) = (native.clone(), metrics.clone());
                    async move {
                        metrics.kafka_request("DescribeUserScramCredentials");
                        let refs: Vec<&str> = users.iter().map(String::as_str).collect();
                        match native.describe_scram_users(&refs).await {
                            Ok(found) => Ok(found.into_iter().map(|(u, c)| (u, Ok(c))).collect()),
                            // One user's refusal fails the whole answer: ask user by user,
                            // so that each gets its own.
                            Err(native::NativeError::Kafka { .. }) if users.len() > 1 => {
                                let mut answers = batch::Answers::new();
                                for user in users {
                                    metrics.kafka_request("DescribeUserScramCredentials");
                                    let found = native.describe_scram_users(&[&user]).await;
                                    let creds =
                                        found.map(|mut f| f.remove(&user).unwrap_or_default());
                                    answers.insert(user, creds);
                                }
                                Ok(answers)
                            }
                            Err(e) => Err(e),
                        }
                    }
                },
                || native::NativeError::Cancelled {
                    op: "describe SCRAM credentials",
                },
            )
        };
        let acls = {
            let (native, metrics) = (native.clone(), metrics.clone());
            Batcher::new(
                move |principals: Vec<String>| {
                    let (native, metrics) = (native.clone(), metrics.clone());
                    async move {
                        metrics.kafka_request("DescribeAcls");
                        let all = native
                            .describe_acls(&native::AclFilter::literal_allow())
                            .await?;
                        let mut by_principal: batch::Answers<_, BTreeSet<_>, _> = principals
                            .into_iter()
                            .map(|p| (p, Ok(BTreeSet::new())))
                            .collect();
                        for acl in all {
                            if acl.host != "*" {
                                continue;
                            }
                            if let Some(Ok(acls)) = by_principal.get_mut(&acl.principal) {
                                acls.insert(acl);
                            }
                        }
                        Ok(by_principal)
                    }
                },
                || native::NativeError::Cancelled {
                    op: "describe ACLs",
                },
            )
        };
        Self {
            topics: topics.with_snapshots(snapshot_age),
            scram: scram.with_snapshots(snapshot_age),
            acls: acls.with_snapshots(snapshot_age),
        }
    }
}

/// Describes `names` in two requests (DescribeTopics, then DescribeConfigs of those
/// that exist); a failure of either is every topic's, under its own name.
async fn describe_topics(
    native: native::NativeAdmin,
    metrics: Arc<Metrics>,
    names: Vec<String>,
) -> Result<batch::Answers<String, Option<TopicState>, KafkaError>, KafkaError> {
    let each = |e: KafkaError| {
        Ok(names
            .iter()
            .map(|name| (name.clone(), Err(e.about(name))))
            .collect())
    };
    metrics.kafka_request("Metadata");
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let layouts = match native.describe_topics(&refs).await {
        Ok(layouts) => layouts,
        Err(e) => return each(KafkaError::from_native("describe", "", e)),
    };
    let existing: Vec<&str> = layouts
        .iter()
        .filter(|(_, layout)| matches!(layout, Ok(Some(_))))
        .map(|(name, _)| name.as_str())
        .collect();
    let mut configs = BTreeMap::new();
    if !existing.is_empty() {
        metrics.kafka_request("DescribeConfigs");
        configs = match native.describe_topic_configs(&existing).await {
            Ok(configs) => configs,
            Err(e) => return each(KafkaError::from_native("describe configs of", "", e)),
        };
    }
    Ok(layouts
        .into_iter()
        .map(|(name, layout)| {
            let state = match layout {
                Err(e) => Err(KafkaError::from_native("describe", &name, e)),
                Ok(None) => Ok(None),
                Ok(Some(layout)) => match configs.remove(&name) {
                    Some(Ok(configs)) => Ok(Some(TopicState {
                        partitions: layout.partitions,
                        replication_factor: layout.replication_factor,
                        configs,
                    })),
                    Some(Err(e)) => Err(config_error(&name, e)),
                    None => Err(config_error(
                        &name,
                        native::NativeError::Kafka {
                            op: "describe configs of",
                            code: RDKafkaErrorCode::UnknownTopicOrPartition,
                            message: "the topic is not in Kafka's answer".into(),
                        },
                    )),
                },
            };
            (name, state)
        })
        .collect())
}

/// DescribeConfigs' failure for `topic`, which the DescribeTopics just before found.
/// Unknown to Kafka now means that it is being created or deleted between the two
/// requests, or that the broker answering has not learned of it yet: that passes by
/// itself, so the reconcile is retried on its back-off rather than left until the resync.
fn config_error(topic: &str, e: native::NativeError) -> KafkaError {
    const OP: &str = "describe configs of";
    match e {
        native::NativeError::Kafka {
            code: RDKafkaErrorCode::UnknownTopicOrPartition,
            message,
            ..
        } => KafkaError::Busy {
            op: OP,
            topic: topic.to_string(),
            code: RDKafkaErrorCode::UnknownTopicOrPartition,
            message,
        },
        e => KafkaError::from_native(OP, topic, e),
    }
}

impl KafkaAdmin {
    /// Connects (lazily: librdkafka dials on first use).
    pub fn new(settings: &KafkaSettings, metrics: Arc<Metrics>) -> Result<Self, RdKafkaError> {
        let mut config = ClientConfig::new();
        // rdkafka builds admin clients as producers, whose metadata requests ask the
        // broker to auto-create missing topics: describing a topic would create it with
        // broker defaults.
        config.set("allow.auto.create.topics", "false");
        for (k, v) in &settings.properties {
            config.set(k, v);
        }
        let client: Arc<AdminClient<DefaultClientContext>> = Arc::new(config.create()?);
        let timeout = Duration::from_secs(10);
        let native = native::NativeAdmin::new(client.clone(), timeout);
        Ok(Self {
            reads: Arc::new(Reads::new(&native, &metrics, Duration::ZERO)),
            native,
            client,
            timeout,
            metrics,
        })
    }

    /// Answers reads that accept an older reading ([`Reading::Since`]) from snapshots of
    /// every topic, SCRAM user and ACL principal asked about lately, taken when such a
    /// read finds none recent enough and never twice within `age / 2` (see [`batch`]).
    /// The operator uses a step of its resync grid.
    pub fn with_snapshot_age(mut self, age: Duration) -> Self {
        self.reads = Arc::new(Reads::new(&self.native, &self.metrics, age));
        self
    }

    /// ACL, SCRAM and cluster administration over the same connection.
    pub fn native(&self) -> native::NativeAdmin {
        self.native.clone()
    }

    fn options(&self) -> AdminOptions {
        AdminOptions::new()
            .request_timeout(Some(self.timeout))
            .operation_timeout(Some(self.timeout))
    }

    /// The topic's partitions, replication factor and topic-level configs, or `None` if
    /// Kafka has no such topic, as recent as `reading` asks. Concurrent calls share one
    /// DescribeTopics and one DescribeConfigs request (see [`batch`]).
    pub async fn describe_topic(
        &self,
        name: &str,
        reading: Reading,
    ) -> Result<Option<TopicState>, KafkaError> {
        self.reads.topics.get(name.to_string(), reading).await
    }

    /// The SCRAM credentials Kafka has for `user` (none if it has no such user), as
    /// recent as `reading` asks.
    /// Concurrent calls share one DescribeUserScramCredentials request.
    pub async fn scram_credentials(
        &self,
        user: &str,
        reading: Reading,
    ) -> Result<Vec<native::ScramCredential>, native::NativeError> {
        self.reads.scram.get(user.to_string(), reading).await
    }

    /// The ACLs of `principal` that have the shape EventOps gives its own (Allow,
    /// literal, any host), as recent as `reading` asks. Concurrent calls share one
    /// DescribeAcls request.
    pub async fn literal_allow_acls(
        &self,
        principal: &str,
        reading: Reading,
    ) -> Result<BTreeSet<native::AclBinding>, native::NativeError> {
        self.reads.acls.get(principal.to_string(), reading).await
    }

    /// Kafka's description of consumer group `group`: its state and members. A group
    /// Kafka does not have is described as [`native::GroupState::Dead`], not as an error.
    /// Needs Describe on the group (implied by Read).
    pub async fn describe_consumer_group(
        &self,
        group: &str,
    ) -> Result<native::GroupDescription, native::NativeError> {
        // librdkafka may ask with ConsumerGroupDescribe first (a classic group is then
        // described by DescribeGroups); counted once, as the request that answers.
        self.metrics.kafka_request("DescribeGroups");
        self.native().describe_consumer_group(group).await
    }

    /// The offsets consumer group `group` has committed, by (topic, partition): of every
    /// partition it committed on, or of `partitions` only. Partitions without a commit
    /// are left out. Needs Describe on the group (implied by Read) and on the topics.
    pub async fn list_consumer_group_offsets(
        &self,
        group: &str,
        partitions: Option<&[(String, i32)]>,
    ) -> Result<BTreeMap<(String, i32), i64>, native::NativeError> {
        self.metrics.kafka_request("OffsetFetch");
        self.native()
            .list_consumer_group_offsets(group, partitions)
            .await
    }

    /// Sets the committed offsets of consumer group `group`, `(topic, partition,
    /// offset)` each, to rewind or skip ahead; Kafka takes it only while the group has
    /// no members (see [`native::NativeAdmin::alter_consumer_group_offsets`]). Needs Read
    /// on the group and on the topics.
    pub async fn alter_consumer_group_offsets(
        &self,
        group: &str,
        offsets: &[(String, i32, i64)],
    ) -> Result<(), native::NativeError> {
        self.metrics.kafka_request("OffsetCommit");
        self.metrics.kafka_write();
        self.native()
            .alter_consumer_group_offsets(group, offsets)
            .await
    }

    /// Every topic's partitions, as the leader broker of each partition in partition
    /// order, from one Metadata request. Re-read every autoscaler cycle so added
    /// partitions are measured at once.
    pub async fn partition_leaders(&self) -> Result<BTreeMap<String, Vec<i32>>, KafkaError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        self.metrics.kafka_request("Metadata");
        let metadata =
            tokio::task::spawn_blocking(move || client.inner().fetch_metadata(None, timeout))
                .await
                .expect("metadata task panicked")
                .map_err(|source| KafkaError::Unavailable {
                    op: "describe",
                    topic: "*".into(),
                    source: Arc::new(source),
                })?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| {
                let mut partitions: Vec<_> = t
                    .partitions()
                    .iter()
                    .map(|p| (p.id(), p.leader()))
                    .collect();
                partitions.sort();
                (
                    t.name().to_string(),
                    partitions.into_iter().map(|(_, leader)| leader).collect(),
                )
            })
            .collect())
    }

    /// The metrics requests are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Creates a topic. A refusal carries Kafka's own message.
    pub async fn create_topic(&self, spec: &NewTopicSpec) -> Result<(), KafkaError> {
        self.metrics.kafka_request("CreateTopics");
        self.metrics.kafka_write();
        self.native()
            .create_topic(
                &spec.name,
                spec.partitions,
                spec.replication_factor,
                &spec.configs,
                false,
            )
            .await
            .map_err(|e| KafkaError::from_native("create", &spec.name, e))
    }

    /// Asks Kafka whether it would create `spec`, creating nothing: Kafka's refusal, if
    /// any, in its own words.
    pub async fn validate_new_topic(&self, spec: &NewTopicSpec) -> Result<(), KafkaError> {
        self.metrics.kafka_request("CreateTopics");
        self.native()
            .create_topic(
                &spec.name,
                spec.partitions,
                spec.replication_factor,
                &spec.configs,
                true,
            )
            .await
            .map_err(|e| KafkaError::from_native("create", &spec.name, e))
    }

    /// Deletes topics; a topic Kafka does not have counts as deleted.
    pub async fn delete_topics(&self, names: &[&str]) -> Result<(), KafkaError> {
        // librdkafka refuses an empty request.
        if names.is_empty() {
            return Ok(());
        }
        self.metrics.kafka_request("DeleteTopics");
        self.metrics.kafka_write();
        let results = self
            .client
            .delete_topics(names, &self.options())
            .await
            .map_err(|source| KafkaError::Unavailable {
                op: "delete",
                topic: names.join(","),
                source: Arc::new(source),
            })?;
        for result in results {
            match result {
                Err((topic, code)) if code != RDKafkaErrorCode::UnknownTopicOrPartition => {
                    return Err(KafkaError::from_code("delete", &topic, code));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Raises the partition count of a topic to `partitions`.
    pub async fn create_partitions(&self, name: &str, partitions: i32) -> Result<(), KafkaError> {
        let new = NewPartitions::new(name, partitions as usize);
        self.metrics.kafka_request("CreatePartitions");
        self.metrics.kafka_write();
        let results = self
            .client
            .create_partitions([&new], &self.options())
            .await
            .map_err(|source| KafkaError::Unavailable {
                op: "add partitions to",
                topic: name.into(),
                source: Arc::new(source),
            })?;
        first_result("add partitions to", name, results)
    }

    /// Sets and removes the topic configs `ops` name (IncrementalAlterConfigs); configs
    /// not named, such as those an administrator set, keep their values. With
    /// `validate_only` Kafka checks the changes and makes none.
    pub async fn alter_configs(
        &self,
        name: &str,
        ops: &[native::ConfigOp],
        validate_only: bool,
    ) -> Result<(), KafkaError> {
        self.metrics.kafka_request("IncrementalAlterConfigs");
        if !validate_only {
            self.metrics.kafka_write();
        }
        self.native()
            .alter_topic_configs(name, ops, validate_only)
            .await
            .map_err(|e| KafkaError::from_native("alter configs of", name, e))
    }
}

fn first_result(
    op: &'static str,
    topic: &str,
    results: Vec<Result<String, (String, RDKafkaErrorCode)>>,
) -> Result<(), KafkaError> {
    match results.into_iter().next() {
        Some(Err((_, code))) => Err(KafkaError::from_code(op, topic, code)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(code: RDKafkaErrorCode) -> native::NativeError {
        native::NativeError::Kafka {
            op: "describe configs of",
            code,
            message: "from Kafka".into(),
        }
    }

    #[test]
    fn a_topic_unknown_to_describe_configs_is_retried_and_a_refusal_is_not() {
        let unknown = config_error("t", refusal(RDKafkaErrorCode::UnknownTopicOrPartition));
        assert!(unknown.is_transient(), "{unknown:?}");
        assert_eq!(unknown.reason(), "UnknownTopicOrPartition");
        let denied = config_error("t", refusal(RDKafkaErrorCode::TopicAuthorizationFailed));
        assert!(!denied.is_transient(), "{denied:?}");
        assert_eq!(denied.reason(), "TopicAuthorizationFailed");
    }
}
