//! Pure steps of the ConsumerGroup reconciler: resolve the consumed EventTopics and build
//! the Deployment and credentials Secret the spec asks for. No I/O here.

use std::collections::BTreeMap;

use eventops_consumer_runtime::contract::{self, RetryRoute, TopicRoute};
use eventops_crds::{ConsumerGroup, EventTopic, Idempotency};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSpec,
    PodTemplateSpec, Probe, Secret, SecretKeySelector,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::kafka::native::{AclBinding, AclOperation, AclPermission, PatternType, ResourceType};

/// Label on every object made for a ConsumerGroup, valued with its name.
pub const GROUP_LABEL: &str = "eventops.dev/consumer-group";
/// Pod template annotation that changes with the credentials, so pods restart with new ones.
pub const CREDENTIALS_VERSION_ANNOTATION: &str = "eventops.dev/credentials-version";

/// How workers reach Kafka (the operator's own settings, minus its credentials). Their
/// SASL mechanism is always SCRAM-SHA-512: the credential EventOps creates for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerKafka {
    /// `bootstrap.servers` as seen from worker pods.
    pub bootstrap: String,
    /// `security.protocol` for workers.
    pub security_protocol: String,
}

/// SASL mechanism of every group's user.
pub const WORKER_SASL_MECHANISM: &str = "SCRAM-SHA-512";

/// EventTopics the spec names that do not exist (yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingTopics(pub Vec<String>);

impl MissingTopics {
    /// The condition message: which, where, and that the group waits.
    pub fn message(&self, namespace: &str) -> String {
        format!(
            "spec.topics names EventTopic {} that does not exist in namespace {namespace} or \
             does not own its Kafka topic (see its Ready condition): waiting for it",
            self.0.join(", ")
        )
    }
}

/// The consumed topics with their dead-letter and retry topics, from the EventTopics
/// of the group's namespace that `find` looks up by name.
pub fn resolve_topics<'a>(
    cg: &ConsumerGroup,
    find: impl Fn(&str) -> Option<&'a EventTopic>,
) -> Result<Vec<TopicRoute>, MissingTopics> {
    let (routes, missing) = resolve_some_topics(cg, find);
    if missing.0.is_empty() {
        Ok(routes)
    } else {
        Err(missing)
    }
}

/// [`resolve_topics`] in part: the routes of the consumed EventTopics that resolve, and
/// those that do not. The group keeps grants only on the first: access to a topic whose
/// EventTopic is gone or no longer owns it is revoked even while the group waits.
pub fn resolve_some_topics<'a>(
    cg: &ConsumerGroup,
    find: impl Fn(&str) -> Option<&'a EventTopic>,
) -> (Vec<TopicRoute>, MissingTopics) {
    let mut routes = Vec::new();
    let mut missing = Vec::new();
    for name in &cg.spec.topics {
        match find(name) {
            // Access is granted only to topics their EventTopic owns: one not yet
            // reconciled, or refused (another EventTopic owns the Kafka topic, the spec is
            // invalid), would hand out ACLs on somebody else's topic.
            Some(et) if !owns_its_topic(et) => missing.push(name.clone()),
            None => missing.push(name.clone()),
            Some(et) => routes.push(TopicRoute {
                topic: et.kafka_topic_name().to_string(),
                dead_letter_topic: et.dead_letter_topic_name(),
                retry_topics: et
                    .retry_topic_names()
                    .into_iter()
                    .zip(&et.spec.retry.delays)
                    .map(|(topic, delay)| RetryRoute {
                        topic,
                        delay_ms: delay_ms(&delay.0),
                    })
                    .collect(),
            }),
        }
    }
    (routes, MissingTopics(missing))
}

/// Whether an EventTopic has been reconciled and manages its Kafka topics, so that a
/// ConsumerGroup may be granted ACLs on them. Every name it derives (main, dead-letter
/// and retry topics) must be in `status.managedTopics`: an EventTopic the namespace
/// policy refused (`NotPermitted`), or that was refused an existing topic it may not
/// adopt (`TopicExists`), manages nothing, and naming it in `spec.topics`,
/// `spec.produces` or `spec.outbox.topics` must not reach past those rules. One being deleted does not own
/// either: its topics are about to go, and a new EventTopic may claim the name next.
pub fn owns_its_topic(et: &EventTopic) -> bool {
    let Some(status) = &et.status else {
        return false;
    };
    if et.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
    let refused = ready.is_some_and(|c| {
        matches!(
            c.reason.as_str(),
            "ResourceConflict" | "InvalidSpec" | "NotPermitted" | "TopicExists"
        )
    });
    if refused {
        return false;
    }
    match &status.managed_topics {
        Some(managed) => {
            let mut names = vec![et.kafka_topic_name().to_string()];
            names.extend(et.dead_letter_topic_name());
            names.extend(et.retry_topic_names());
            names
                .iter()
                .all(|name| managed.iter().any(|m| &m.name == name))
        }
        // A status written before managedTopics existed (an older operator): as then,
        // reconciled and not refused.
        None => ready.is_some(),
    }
}

/// If an older ConsumerGroup (anywhere) already uses `cg`'s Kafka group id, the message
/// that says which: the oldest keeps it, so no namespace can join another's group.
pub fn group_conflict<'a>(
    cg: &ConsumerGroup,
    others: impl IntoIterator<Item = &'a ConsumerGroup>,
) -> Option<String> {
    let key = |g: &ConsumerGroup| {
        (
            g.metadata.creation_timestamp.clone().map(|t| t.0),
            g.metadata.namespace.clone(),
            g.metadata.name.clone(),
        )
    };
    others
        .into_iter()
        .filter(|o| o.metadata.uid != cg.metadata.uid && o.metadata.deletion_timestamp.is_none())
        .filter(|o| o.kafka_group_id() == cg.kafka_group_id() && key(o) < key(cg))
        .map(|o| {
            format!(
                "Kafka group id {} is already used by ConsumerGroup {}/{}, created earlier: set a different spec.groupId",
                cg.kafka_group_id(),
                o.namespace().unwrap_or_default(),
                o.name_any()
            )
        })
        .next()
}

/// Whether `meta`'s controller is `cg` (a controller ownerReference to its uid): only
/// such objects are the group's to change or read.
pub fn controlled_by(cg: &ConsumerGroup, meta: &ObjectMeta) -> bool {
    let Some(uid) = cg.metadata.uid.as_deref() else {
        return false;
    };
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && r.uid == uid)
}

/// If an existing Deployment or Secret with the name the group needs is not controlled
/// by the group, the message naming each and the fix. Such an object belongs to somebody
/// else (another tool, a Helm release, a person): a forced apply would take it over and
/// reading its password would hand another team's credential to this group's user.
pub fn foreign_objects(
    cg: &ConsumerGroup,
    deployment: Option<&ObjectMeta>,
    secret: Option<&ObjectMeta>,
) -> Option<String> {
    let ns = cg.namespace().unwrap_or_default();
    let foreign: Vec<String> = [
        ("Deployment", cg.name_any(), deployment),
        ("Secret", secret_name(cg), secret),
    ]
    .into_iter()
    .filter(|(_, _, meta)| meta.is_some_and(|m| !controlled_by(cg, m)))
    .map(|(kind, name, _)| format!("{kind} {ns}/{name}"))
    .collect();
    (!foreign.is_empty()).then(|| {
        format!(
            "{} already exists and is not controlled by ConsumerGroup {ns}/{name} (no \
             controller ownerReference to it), so EventOps neither changes nor reads it: \
             delete or rename it, or rename the ConsumerGroup (metadata.name)",
            foreign.join(" and "),
            name = cg.name_any()
        )
    })
}

fn delay_ms(delay: &str) -> u64 {
    let (n, unit) = delay.split_at(delay.len().saturating_sub(1));
    let n: u64 = n.parse().unwrap_or(0);
    n * match unit {
        "h" => 3_600_000,
        "m" => 60_000,
        _ => 1_000,
    }
}

/// The group's Kafka user: one per ConsumerGroup, named after its namespace and name
/// (`.` cannot occur in either, so no two groups share a user).
pub fn kafka_user(cg: &ConsumerGroup) -> String {
    format!(
        "eventops.{}.{}",
        cg.namespace().unwrap_or_default(),
        cg.name_any()
    )
}

/// The Kafka principal of the group's user.
pub fn principal(cg: &ConsumerGroup) -> String {
    format!("User:{}", kafka_user(cg))
}

/// Least privilege: read (and describe) the consumed topics, read its own group id,
/// write (and describe) its dead-letter topics, and read and write its retry topics,
/// since a worker both re-publishes to and consumes from them. Nothing else.
pub fn acls(cg: &ConsumerGroup, routes: &[TopicRoute]) -> std::collections::BTreeSet<AclBinding> {
    let principal = principal(cg);
    let allow = |resource_type, name: &str, operation| AclBinding {
        resource_type,
        resource_name: name.to_string(),
        pattern_type: PatternType::Literal,
        principal: principal.clone(),
        host: "*".into(),
        operation,
        permission: AclPermission::Allow,
    };
    let mut acls = std::collections::BTreeSet::new();
    acls.insert(allow(
        ResourceType::Group,
        cg.kafka_group_id(),
        AclOperation::Read,
    ));
    for route in routes {
        for op in [AclOperation::Read, AclOperation::Describe] {
            acls.insert(allow(ResourceType::Topic, &route.topic, op));
        }
        if cg.spec.processing.dead_letter
            && let Some(dlt) = &route.dead_letter_topic
        {
            for op in [AclOperation::Write, AclOperation::Describe] {
                acls.insert(allow(ResourceType::Topic, dlt, op));
            }
        }
        for retry in &route.retry_topics {
            for op in [
                AclOperation::Read,
                AclOperation::Write,
                AclOperation::Describe,
            ] {
                acls.insert(allow(ResourceType::Topic, &retry.topic, op));
            }
        }
    }
    acls
}

/// Name of the Secret holding the group's Kafka credentials.
pub fn secret_name(cg: &ConsumerGroup) -> String {
    format!("{}-kafka", cg.name_any())
}

fn labels(cg: &ConsumerGroup) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), cg.name_any()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "eventops".to_string(),
        ),
        (GROUP_LABEL.to_string(), cg.name_any()),
    ])
}

fn owned_meta(cg: &ConsumerGroup, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: cg.namespace(),
        labels: Some(labels(cg)),
        owner_references: cg.controller_owner_ref(&()).map(|r| vec![r]),
        ..Default::default()
    }
}

/// The credentials Secret: everything a client needs, for Rust and Java clients alike.
pub fn secret(
    cg: &ConsumerGroup,
    kafka: &WorkerKafka,
    password: &str,
    rotation: Option<&str>,
) -> Secret {
    let user = kafka_user(cg);
    let jaas = format!(
        "org.apache.kafka.common.security.scram.ScramLoginModule required username=\"{user}\" password=\"{password}\";"
    );
    let mut meta = owned_meta(cg, secret_name(cg));
    if let Some(token) = rotation {
        meta.annotations = Some(BTreeMap::from([(
            ROTATED_FOR_ANNOTATION.to_string(),
            token.to_string(),
        )]));
    }
    Secret {
        metadata: meta,
        string_data: Some(BTreeMap::from([
            ("bootstrap.servers".into(), kafka.bootstrap.clone()),
            ("security.protocol".into(), kafka.security_protocol.clone()),
            ("sasl.mechanism".into(), WORKER_SASL_MECHANISM.into()),
            ("username".into(), user),
            ("password".into(), password.to_string()),
            ("sasl.jaas.config".into(), jaas),
        ])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// A version of the credentials for the pod template: changes exactly when the password
/// does, so workers restart with the new one (also when a lost Secret is recreated). A
/// 64-bit FNV-1a digest of a 256-bit random password reveals nothing usable.
pub fn credentials_version(password: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in password.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// ConsumerGroup annotation whose new value asks for new credentials.
pub const ROTATE_ANNOTATION: &str = "eventops.dev/rotate-credentials";
/// Secret annotation: the rotation request the current password answers.
pub const ROTATED_FOR_ANNOTATION: &str = "eventops.dev/rotated-for";

/// The replicas a new group's Deployment is created with: `minReplicas`, capped as the
/// autoscaler caps it (at `maxReplicas` and at `partitions`, those of the consumed
/// topics), so the autoscaler has nothing to take back on its first cycle.
pub fn initial_replicas(cg: &ConsumerGroup, partitions: i32) -> i32 {
    let scaling = &cg.spec.scaling;
    let upper = scaling.max_replicas.unwrap_or(partitions).min(partitions);
    scaling.min_replicas.min(upper).max(0)
}

/// The worker Deployment. `replicas` is deliberately absent: the autoscaler owns it
/// through the scale subresource, and a field absent from this apply is never fought over
/// (the reconciler creates the Deployment once at `minReplicas`). `outbox_topics` are the
/// Kafka topics `spec.outbox.topics` resolved to (see [`super::outbox`]).
pub fn deployment(
    cg: &ConsumerGroup,
    routes: &[TopicRoute],
    outbox_topics: &[String],
    kafka: &WorkerKafka,
    credentials_version: &str,
) -> Deployment {
    let t = &cg.spec.template;
    let p = &cg.spec.processing;
    let plain = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    };
    let from_secret = |name: &str, key: &str| EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret_name(cg),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    };
    let idempotency = match p.idempotency {
        Idempotency::None => "None",
        Idempotency::Memory => "Memory",
        Idempotency::Postgres => "Postgres",
    };
    let std_duration =
        |d: &kube::core::Duration| std::time::Duration::from(*d).as_millis().to_string();
    let mut env = vec![
        plain(contract::KAFKA_BOOTSTRAP, kafka.bootstrap.clone()),
        plain(
            contract::KAFKA_SECURITY_PROTOCOL,
            kafka.security_protocol.clone(),
        ),
        plain(contract::KAFKA_SASL_MECHANISM, WORKER_SASL_MECHANISM.into()),
        from_secret(contract::KAFKA_USERNAME, "username"),
        from_secret(contract::KAFKA_PASSWORD, "password"),
        plain(contract::GROUP_ID, cg.kafka_group_id().to_string()),
        plain(
            contract::TOPICS,
            serde_json::to_string(routes).expect("routes serialize"),
        ),
        plain(contract::MAX_ATTEMPTS, p.max_attempts.to_string()),
        plain(
            contract::BACKOFF_INITIAL_MS,
            std_duration(&p.backoff.initial),
        ),
        plain(contract::BACKOFF_MAX_MS, std_duration(&p.backoff.max)),
        plain(
            contract::BACKOFF_MULTIPLIER,
            p.backoff.multiplier.to_string(),
        ),
        plain(contract::DEAD_LETTER, p.dead_letter.to_string()),
        plain(contract::IDEMPOTENCY, idempotency.to_string()),
        plain(
            contract::HEALTH_PORT,
            contract::DEFAULT_HEALTH_PORT.to_string(),
        ),
        // Each pod's own address (the node agent gives every local pod its own loopback
        // IP), defined before the variable that expands it.
        EnvVar {
            name: contract::POD_IP.into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    api_version: Some("v1".into()),
                    field_path: "status.podIP".into(),
                }),
                ..Default::default()
            }),
        },
        plain(
            contract::HEALTH_ADDR,
            format!("$({}):{}", contract::POD_IP, contract::DEFAULT_HEALTH_PORT),
        ),
    ];
    env.extend(super::outbox::env(cg, outbox_topics));
    env.extend(t.env.iter().cloned());
    let selector = BTreeMap::from([(GROUP_LABEL.to_string(), cg.name_any())]);
    Deployment {
        metadata: owned_meta(cg, cg.name_any()),
        spec: DeploymentSpec {
            replicas: None,
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            // A new worker joins before an old one leaves: the group rebalances, but never
            // runs short while rolling.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(cg)),
                    annotations: Some(BTreeMap::from([(
                        CREDENTIALS_VERSION_ANNOTATION.to_string(),
                        credentials_version.to_string(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "worker".into(),
                        image: Some(t.image.clone()),
                        command: (!t.command.is_empty()).then(|| t.command.clone()),
                        args: (!t.args.is_empty()).then(|| t.args.clone()),
                        env: Some(env),
                        resources: t.resources.clone(),
                        ports: Some(vec![ContainerPort {
                            name: Some(HEALTH_PORT_NAME.into()),
                            container_port: contract::DEFAULT_HEALTH_PORT.into(),
                            protocol: Some("TCP".into()),
                            ..Default::default()
                        }]),
                        readiness_probe: Some(health_probe("/readyz", READINESS_PERIOD_SECONDS)),
                        liveness_probe: Some(health_probe("/healthz", 10)),
                        ..Default::default()
                    }],
                    // Time to finish in-flight records and commit after SIGTERM.
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_PERIOD_SECONDS),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        status: None,
    }
}

/// Name of the worker container's health and metrics port.
pub const HEALTH_PORT_NAME: &str = "health";
/// Seconds a worker has after SIGTERM to finish in-flight records and commit.
pub const TERMINATION_GRACE_PERIOD_SECONDS: i64 = 30;

/// Seconds between readiness probes: short, so a replica added during a spike counts as
/// Ready (and its Deployment as progressing) soon after it has joined the group.
pub const READINESS_PERIOD_SECONDS: i32 = 2;

/// An HTTP probe of the health port every `period_seconds`. Every field the API server
/// would default is set here, so the stored Deployment compares equal to the built one
/// and a resync that finds nothing changed writes nothing.
pub fn health_probe(path: &str, period_seconds: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(HEALTH_PORT_NAME.into()),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period_seconds),
        timeout_seconds: Some(1),
        success_threshold: Some(1),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventops_crds::{ConsumerGroupSpec, EventTopicSpec, RetryDelay, WorkerTemplate};

    fn group() -> ConsumerGroup {
        let mut cg = ConsumerGroup::new(
            "inventory",
            ConsumerGroupSpec {
                group_id: None,
                topics: vec!["orders".into()],
                produces: vec![],
                outbox: None,
                template: WorkerTemplate {
                    image: "inventory:1".into(),
                    ..Default::default()
                },
                processing: Default::default(),
                scaling: Default::default(),
            },
        );
        cg.metadata.namespace = Some("shop".into());
        cg.metadata.uid = Some("uid-1".into());
        cg
    }

    fn topic(name: &str, kafka_name: &str) -> EventTopic {
        let mut et = reconciled(EventTopic::new(
            name,
            EventTopicSpec {
                topic_name: Some(kafka_name.into()),
                partitions: 3,
                ..Default::default()
            },
        ));
        et.spec.retry.delays = vec![RetryDelay("30s".into())];
        et
    }

    fn with_ready(mut et: EventTopic, status: &str, reason: &str) -> EventTopic {
        et.status = Some(eventops_crds::EventTopicStatus {
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Ready".into(),
                status: status.into(),
                reason: reason.into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
            }],
            ..Default::default()
        });
        et
    }

    fn reconciled(et: EventTopic) -> EventTopic {
        with_ready(et, "True", "InSync")
    }

    #[test]
    fn only_objects_the_group_controls_are_its_own() {
        let cg = group();
        let kafka = WorkerKafka {
            bootstrap: "kafka:9092".into(),
            security_protocol: "SASL_PLAINTEXT".into(),
        };
        let ours = deployment(&cg, &[], &[], &kafka, "v1").metadata;
        let unowned = ObjectMeta::default();
        let mut other_controller = ours.clone();
        other_controller.owner_references.as_mut().unwrap()[0].uid = "uid-2".into();
        let mut owner_not_controller = ours.clone();
        owner_not_controller.owner_references.as_mut().unwrap()[0].controller = Some(false);
        assert_eq!(foreign_objects(&cg, Some(&ours), Some(&ours)), None);
        assert_eq!(foreign_objects(&cg, None, None), None);
        for meta in [&unowned, &other_controller, &owner_not_controller] {
            let message = foreign_objects(&cg, Some(meta), None).unwrap();
            assert!(
                message.starts_with("Deployment shop/inventory already exists"),
                "{message}"
            );
            let message = foreign_objects(&cg, Some(&ours), Some(meta)).unwrap();
            assert!(
                message.starts_with("Secret shop/inventory-kafka already"),
                "{message}"
            );
        }
        let both = foreign_objects(&cg, Some(&unowned), Some(&unowned)).unwrap();
        assert!(both.starts_with("Deployment shop/inventory and Secret shop/inventory-kafka"));
    }

    #[test]
    fn topics_another_event_topic_owns_are_not_granted() {
        let conflicted = with_ready(topic("orders", "theirs"), "False", "ResourceConflict");
        let err = resolve_topics(&group(), |_| Some(&conflicted)).unwrap_err();
        assert_eq!(err, MissingTopics(vec!["orders".into()]));
        let mut unreconciled = topic("orders", "theirs");
        unreconciled.status = None;
        assert!(resolve_topics(&group(), |_| Some(&unreconciled)).is_err());
        // Not ready for another reason (Kafka refused a config): still ours to consume.
        let refused = with_ready(topic("orders", "ours"), "False", "InvalidConfig");
        assert!(resolve_topics(&group(), |_| Some(&refused)).is_ok());
    }

    #[test]
    fn the_oldest_group_keeps_a_group_id() {
        let at = |s| {
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(s).unwrap(),
            ))
        };
        let mut old = group();
        old.metadata.creation_timestamp = at(100);
        let mut young = group();
        young.metadata.namespace = Some("other".into());
        young.metadata.uid = Some("uid-2".into());
        young.metadata.creation_timestamp = at(200);
        assert_eq!(group_conflict(&old, [&young]), None);
        let msg = group_conflict(&young, [&old]).unwrap();
        assert!(
            msg.contains("shop/inventory") && msg.contains("spec.groupId"),
            "{msg}"
        );
    }

    #[test]
    fn credentials_version_follows_the_password() {
        assert_eq!(credentials_version("a"), credentials_version("a"));
        assert_ne!(credentials_version("a"), credentials_version("b"));
        assert_eq!(credentials_version("a").len(), 16);
    }

    #[test]
    fn topics_resolve_to_kafka_names_with_their_dead_letter_and_retry_topics() {
        let et = topic("orders", "orders.order.placed");
        let routes = resolve_topics(&group(), |n| (n == "orders").then_some(&et)).unwrap();
        assert_eq!(
            routes,
            [TopicRoute {
                topic: "orders.order.placed".into(),
                dead_letter_topic: Some("orders.order.placed.DLT".into()),
                retry_topics: vec![RetryRoute {
                    topic: "orders.order.placed.retry-30s".into(),
                    delay_ms: 30_000
                }],
            }]
        );
    }

    #[test]
    fn missing_topics_are_named() {
        let err = resolve_topics(&group(), |_| None).unwrap_err();
        assert_eq!(err, MissingTopics(vec!["orders".into()]));
        assert!(
            err.message("shop")
                .contains("spec.topics names EventTopic orders")
        );
    }

    #[test]
    fn a_new_deployment_starts_at_min_replicas_capped_like_the_autoscaler_caps() {
        let with = |min: i32, max: Option<i32>| {
            let mut cg = group();
            cg.spec.scaling.min_replicas = min;
            cg.spec.scaling.max_replicas = max;
            cg
        };
        assert_eq!(initial_replicas(&with(0, None), 6), 0);
        assert_eq!(initial_replicas(&with(2, None), 6), 2);
        // More than the partitions: a replica beyond them would get none.
        assert_eq!(initial_replicas(&with(10, None), 2), 2);
        assert_eq!(initial_replicas(&with(3, Some(3)), 2), 2);
    }

    #[test]
    fn deployment_carries_the_contract_and_leaves_replicas_alone() {
        let kafka = WorkerKafka {
            bootstrap: "k:9092".into(),
            security_protocol: "SASL_PLAINTEXT".into(),
        };
        let routes = vec![TopicRoute {
            topic: "orders.order.placed".into(),
            dead_letter_topic: None,
            retry_topics: vec![],
        }];
        let d = deployment(&group(), &routes, &[], &kafka, "v1");
        let spec = d.spec;
        assert_eq!(spec.replicas, None);
        assert_eq!(d.metadata.owner_references.unwrap()[0].uid, "uid-1");
        let pod = spec.template.spec.unwrap();
        let env = pod.containers[0].env.clone().unwrap();
        let get = |n: &str| env.iter().find(|e| e.name == n).unwrap().clone();
        assert_eq!(get(contract::GROUP_ID).value.as_deref(), Some("inventory"));
        assert_eq!(
            get(contract::BACKOFF_INITIAL_MS).value.as_deref(),
            Some("200")
        );
        let password = get(contract::KAFKA_PASSWORD)
            .value_from
            .unwrap()
            .secret_key_ref
            .unwrap();
        assert_eq!(
            (password.name.as_str(), password.key.as_str()),
            ("inventory-kafka", "password")
        );

        // What the worker reads back is what the operator wrote.
        let lookup = |name: &str| {
            let e = env.iter().find(|e| e.name == name)?;
            e.value
                .clone()
                .or_else(|| Some(format!("from-secret:{}", e.name)))
        };
        let config = contract::WorkerConfig::from_lookup(lookup).unwrap();
        assert_eq!(config.topics, routes);

        // The health server binds the pod's own IP, defined before it is expanded.
        let position = |n: &str| env.iter().position(|e| e.name == n).unwrap();
        assert!(position(contract::POD_IP) < position(contract::HEALTH_ADDR));
        let pod_ip = get(contract::POD_IP).value_from.unwrap().field_ref.unwrap();
        assert_eq!(pod_ip.field_path, "status.podIP");
        assert_eq!(
            get(contract::HEALTH_ADDR).value.as_deref(),
            Some("$(EVENTOPS_POD_IP):8080")
        );
        let container = &pod.containers[0];
        let port = &container.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("health"), 8080)
        );
        let probe_path = |p: &Option<Probe>| {
            let http = p.as_ref().unwrap().http_get.clone().unwrap();
            assert_eq!(http.port, IntOrString::String("health".into()));
            http.path.unwrap()
        };
        assert_eq!(probe_path(&container.readiness_probe), "/readyz");
        assert_eq!(probe_path(&container.liveness_probe), "/healthz");
        assert_eq!(pod.termination_grace_period_seconds, Some(30));
        assert_eq!(
            config.kafka["sasl.username"],
            format!("from-secret:{}", contract::KAFKA_USERNAME)
        );
    }

    /// What the worker reads back of the outbox (`contract::WorkerConfig`), from the
    /// Deployment the operator builds, with a Secret reference read as `secret:name/key`.
    #[test]
    fn the_outbox_reaches_the_worker_as_the_contract_says() {
        use eventops_crds::{OutboxSpec, SecretKeyRef};
        let kafka = WorkerKafka {
            bootstrap: "k:9092".into(),
            security_protocol: "SASL_PLAINTEXT".into(),
        };
        let topics = ["payments.payment.captured".to_string()];
        let database_url = EnvVar {
            name: contract::DATABASE_URL.into(),
            value: Some("postgres://db/app".into()),
            value_from: None,
        };
        let outbox = |secret: Option<(&str, &str)>| OutboxSpec {
            topics: vec!["captured".into()],
            database_secret: secret.map(|(name, key)| SecretKeyRef {
                name: name.into(),
                key: key.into(),
            }),
        };
        // The worker's outbox (topics, database URL), or the variable it refuses.
        type Outcome<'a> = Result<Option<(&'a [String], &'a str)>, &'a str>;
        // (spec.outbox, template.env, outcome)
        let cases: [(Option<OutboxSpec>, Vec<EnvVar>, Outcome<'_>); 4] = [
            (None, vec![database_url.clone()], Ok(None)),
            (
                Some(outbox(Some(("payments-db", "url")))),
                vec![database_url.clone()],
                Ok(Some((&topics, "secret:payments-db/url"))),
            ),
            // Without databaseSecret, the worker's own database.
            (
                Some(outbox(None)),
                vec![database_url.clone()],
                Ok(Some((&topics, "postgres://db/app"))),
            ),
            (
                Some(outbox(None)),
                vec![],
                Err(contract::OUTBOX_DATABASE_URL),
            ),
        ];
        for (spec, template_env, expected) in cases {
            let mut cg = group();
            cg.spec.outbox = spec.clone();
            cg.spec.template.env = template_env;
            let d = deployment(&cg, &[], &topics, &kafka, "v1");
            let env = d.spec.template.spec.unwrap().containers[0]
                .env
                .clone()
                .unwrap();
            let lookup = |name: &str| {
                let e = env.iter().find(|e| e.name == name)?;
                e.value.clone().or_else(|| {
                    let r = e.value_from.as_ref()?.secret_key_ref.as_ref()?;
                    Some(format!("secret:{}/{}", r.name, r.key))
                })
            };
            let got = contract::WorkerConfig::from_lookup(lookup);
            match expected {
                Ok(want) => {
                    let outbox = got.unwrap().outbox;
                    let outbox = outbox
                        .as_ref()
                        .map(|o| (o.topics.as_slice(), o.database_url.as_str()));
                    assert_eq!(outbox, want, "{spec:?}");
                }
                Err(name) => assert_eq!(got.unwrap_err().name, name, "{spec:?}"),
            }
        }
    }

    #[test]
    fn acls_are_least_privilege() {
        let et = topic("orders", "orders.order.placed");
        let routes = resolve_topics(&group(), |_| Some(&et)).unwrap();
        let described: Vec<String> = acls(&group(), &routes)
            .iter()
            .map(|a| {
                assert_eq!(a.principal, "User:eventops.shop.inventory");
                format!(
                    "{:?} {} {:?}",
                    a.resource_type, a.resource_name, a.operation
                )
            })
            .collect();
        assert_eq!(
            described,
            [
                "Topic orders.order.placed Read",
                "Topic orders.order.placed Describe",
                "Topic orders.order.placed.DLT Write",
                "Topic orders.order.placed.DLT Describe",
                "Topic orders.order.placed.retry-30s Read",
                "Topic orders.order.placed.retry-30s Write",
                "Topic orders.order.placed.retry-30s Describe",
                "Group inventory Read",
            ]
        );

        let mut no_dlt = group();
        no_dlt.spec.processing.dead_letter = false;
        assert!(
            !acls(&no_dlt, &routes)
                .iter()
                .any(|a| a.resource_name.ends_with(".DLT"))
        );
    }

    #[test]
    fn kafka_user_is_unique_per_namespace_and_name() {
        assert_eq!(kafka_user(&group()), "eventops.shop.inventory");
        let s = secret(
            &group(),
            &WorkerKafka {
                bootstrap: "b".into(),
                security_protocol: "SASL_PLAINTEXT".into(),
            },
            "pw",
            None,
        );
        let data = s.string_data.unwrap();
        assert_eq!(data["username"], "eventops.shop.inventory");
        assert!(data["sasl.jaas.config"].contains("password=\"pw\""));
    }
}
