//! Pure steps of the ConsumerGroup reconciler, in the order a pass takes them: validate
//! the group against the namespace policy and the other groups ([`validate`]), resolve
//! the EventTopics it names ([`resolve`]), then build the Secret and Deployment it asks
//! for ([`build`]) and the changes that make Kafka's user and ACLs match
//! ([`kafka_changes`]). No I/O here: the objects these are built from are read first.

use std::collections::BTreeSet;

use eventops_consumer_runtime::contract::TopicRoute;
use eventops_crds::{ConsumerGroup, EventTopic};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use super::build::{self, ROTATE_ANNOTATION, ROTATED_FOR_ANNOTATION, WorkerKafka};
use super::{outbox, produces};
use crate::kafka::native::AclBinding;
use crate::policy::NamespacePolicy;

/// Why a pass stops before it changes anything: the Ready condition's reason and
/// message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// `NotPermitted` or `ResourceConflict`.
    pub reason: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

/// Validate: the namespace may own the group id, and no older group of `others` (the
/// cached ConsumerGroups) has it.
pub fn validate<'a>(
    cg: &ConsumerGroup,
    policy: &NamespacePolicy,
    others: impl IntoIterator<Item = &'a ConsumerGroup>,
) -> Result<(), Refused> {
    let ns = cg.namespace().unwrap_or_default();
    if let Err(message) = policy.check(&ns, "spec.groupId", cg.kafka_group_id()) {
        return Err(Refused {
            reason: "NotPermitted",
            message,
        });
    }
    if let Some(message) = build::group_conflict(cg, others) {
        return Err(Refused {
            reason: "ResourceConflict",
            message,
        });
    }
    Ok(())
}

/// The EventTopics a group names, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// The consumed topics that resolve, with their dead-letter and retry topics.
    pub routes: Vec<TopicRoute>,
    /// The Kafka topics of `spec.outbox.topics` that resolve.
    pub outbox_topics: Vec<String>,
    /// The ACLs the group's user has once Kafka matches: on what resolved only.
    pub acls: BTreeSet<AclBinding>,
    /// Partitions of the consumed topics: what a new Deployment's replicas are capped at.
    pub partitions: i32,
    /// Every field that names a missing EventTopic, in one message, when any does: the
    /// group waits, so that one fix is not followed by another.
    pub waiting: Option<String>,
}

/// Resolves the EventTopics `cg` names (`spec.topics`, `spec.produces`,
/// `spec.outbox.topics`), looked up by `find` in its namespace.
pub fn resolve<'a>(
    cg: &ConsumerGroup,
    find: impl Fn(&str) -> Option<&'a EventTopic> + Copy,
) -> Resolved {
    let ns = cg.namespace().unwrap_or_default();
    let (routes, missing) = build::resolve_some_topics(cg, find);
    let (produced, missing_produced) = produces::resolve_some(cg, find);
    let (outbox_topics, missing_outbox) = outbox::resolve_some(cg, find);
    let mut acls = build::acls(cg, &routes);
    acls.extend(produces::acls(cg, &produced));
    acls.extend(outbox::acls(cg, &outbox_topics));
    let waiting: Vec<String> = [
        (!missing.0.is_empty()).then(|| missing.message(&ns)),
        produces::missing_message(&missing_produced, &ns),
        outbox::missing_message(&missing_outbox, &ns),
    ]
    .into_iter()
    .flatten()
    .collect();
    let partitions = cg
        .spec
        .topics
        .iter()
        .filter_map(|name| find(name))
        .map(|et| et.spec.partitions)
        .sum();
    Resolved {
        routes,
        outbox_topics,
        acls,
        partitions,
        waiting: (!waiting.is_empty()).then(|| waiting.join("; ")),
    }
}

/// The EventTopics `cg` names in the fields it resolves (`spec.topics`, `spec.produces`,
/// `spec.outbox.topics`), duplicates included.
pub fn named_event_topics(cg: &ConsumerGroup) -> impl Iterator<Item = &String> {
    (cg.spec.topics.iter())
        .chain(&cg.spec.produces)
        .chain(outbox::topic_names(cg))
}

/// How long a new group waits without a word for EventTopics applied together with it.
pub const QUIET_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The reason a quiet wait is counted under (`reconcile_waits`, not a failure).
pub const QUIET_WAIT_REASON: &str = "TopicPending";

/// How much longer `cg` waits quietly (see [`QUIET_WAIT`]), if it does: it has no Ready
/// condition yet, was created less than [`QUIET_WAIT`] before `now`, and every
/// EventTopic it names exists, with those it waits for not reconciled yet (no status,
/// not being deleted). Such a group was applied together with its EventTopics: saying
/// `TopicNotFound` now would be a Warning about nothing (one status write and one Event
/// each, the largest share of a bulk apply's requests). The EventTopic's first status
/// triggers the group's next pass; one that has not come within [`QUIET_WAIT`] is told
/// as usual. A missing, refused or deleted EventTopic is told at once.
pub fn quiet_wait<'a>(
    cg: &ConsumerGroup,
    find: impl Fn(&str) -> Option<&'a EventTopic>,
    now: Timestamp,
) -> Option<std::time::Duration> {
    let told = (cg.status.iter()).any(|s| s.conditions.iter().any(|c| c.type_ == "Ready"));
    let created = cg.metadata.creation_timestamp.as_ref()?.0;
    // A creation time ahead of this clock counts as just created.
    let age = now
        .duration_since(created)
        .max(SignedDuration::ZERO)
        .unsigned_abs();
    let left = QUIET_WAIT
        .checked_sub(age)
        .filter(|l| !told && !l.is_zero())?;
    let mut pending = false;
    for name in named_event_topics(cg) {
        match find(name) {
            Some(et) if build::owns_its_topic(et) => {}
            Some(et) if et.status.is_none() && et.metadata.deletion_timestamp.is_none() => {
                pending = true;
            }
            _ => return None,
        }
    }
    pending.then_some(left)
}

/// The Secret and Deployment one pass makes the group's.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// The password of the group's Kafka user.
    pub password: String,
    /// Whether it differs from the one the Secret holds (none held counts as differing).
    pub password_changed: bool,
    /// The credentials Secret.
    pub secret: Secret,
    /// The worker Deployment, without replicas.
    pub deployment: Deployment,
    /// The replicas a Deployment created now starts with.
    pub initial_replicas: i32,
}

/// Build: the Secret and Deployment of `cg` from what resolved and the stored `secret`.
/// The Secret's password stays unless the rotation annotation asks for a new one that
/// the Secret does not answer yet, or there is none: then it is `fresh_password`.
pub fn build(
    cg: &ConsumerGroup,
    resolved: &Resolved,
    secret: Option<&Secret>,
    kafka: &WorkerKafka,
    fresh_password: String,
) -> Desired {
    let requested_rotation = cg.annotations().get(ROTATE_ANNOTATION).map(String::as_str);
    let stored = secret.and_then(|s| secret_value(s, "password"));
    let current = secret.and_then(|s| {
        let password = stored.clone()?;
        let answered = s.annotations().get(ROTATED_FOR_ANNOTATION).cloned();
        Some((password, answered))
    });
    let (password, rotation) = match current {
        Some((password, answered))
            if requested_rotation.is_none_or(|r| answered.as_deref() == Some(r)) =>
        {
            (password, answered)
        }
        _ => (fresh_password, requested_rotation.map(String::from)),
    };
    let credentials_version = build::credentials_version(&password);
    Desired {
        password_changed: stored.as_deref() != Some(&password),
        secret: build::secret(cg, kafka, &password, rotation.as_deref()),
        deployment: build::deployment(
            cg,
            &resolved.routes,
            &resolved.outbox_topics,
            kafka,
            &credentials_version,
        ),
        initial_replicas: build::initial_replicas(cg, resolved.partitions),
        password,
    }
}

/// The value of `key` in a stored Secret, as text.
pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// What Kafka's user and ACLs of a group need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaChanges {
    /// Set the user's SCRAM credentials: Kafka lacks them or the password changed.
    pub set_user: bool,
    /// ACLs to create.
    pub create: Vec<AclBinding>,
    /// ACLs EventOps made for the group that are no longer desired, to delete.
    pub delete: Vec<AclBinding>,
}

/// The changes that take Kafka from `current` ACLs (those of EventOps' shape on the
/// group's principal) and `has_user` (a SCRAM-SHA-512 credential) to `desired`. Without
/// a `password_changed` (`None`: a group waiting for an EventTopic) no user is set and
/// no ACL created: the ACLs not desired are only revoked.
pub fn kafka_changes(
    desired: &BTreeSet<AclBinding>,
    current: &BTreeSet<AclBinding>,
    has_user: bool,
    password_changed: Option<bool>,
) -> KafkaChanges {
    let delete = current.difference(desired).cloned().collect();
    let Some(password_changed) = password_changed else {
        return KafkaChanges {
            delete,
            ..Default::default()
        };
    };
    KafkaChanges {
        set_user: !has_user || password_changed,
        create: desired.difference(current).cloned().collect(),
        delete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn group(annotations: serde_json::Value) -> ConsumerGroup {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "eventops.dev/v1alpha1", "kind": "ConsumerGroup",
            "metadata": {"name": "payment", "namespace": "shop", "uid": "u1",
                         "annotations": annotations},
            "spec": {"topics": ["orders", "refunds"], "produces": ["captured"],
                     "scaling": {"minReplicas": 3}, "template": {"image": "p:1"}},
        }))
        .unwrap()
    }

    /// An EventTopic that exists and owns its Kafka topic `kafka_name`.
    fn owning(name: &str, kafka_name: &str, partitions: i32) -> EventTopic {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "eventops.dev/v1alpha1", "kind": "EventTopic",
            "metadata": {"name": name, "namespace": "shop", "generation": 1},
            "spec": {"topicName": kafka_name, "partitions": partitions,
                     "deadLetter": {"enabled": false}},
            "status": {"observedGeneration": 1, "topicName": kafka_name,
                "managedTopics": [{"name": kafka_name, "configs": []}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "InSync",
                    "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z",
                    "observedGeneration": 1}]},
        }))
        .unwrap()
    }

    fn stored_secret(password: &str, rotated_for: Option<&str>) -> Secret {
        let mut s = Secret {
            data: Some(BTreeMap::from([(
                "password".to_string(),
                ByteString(password.as_bytes().to_vec()),
            )])),
            ..Default::default()
        };
        if let Some(token) = rotated_for {
            s.annotations_mut()
                .insert(ROTATED_FOR_ANNOTATION.into(), token.into());
        }
        s
    }

    fn kafka() -> WorkerKafka {
        WorkerKafka {
            bootstrap: "kafka:9092".into(),
            security_protocol: "SASL_PLAINTEXT".into(),
        }
    }

    #[test]
    fn a_group_naming_missing_event_topics_waits_with_one_message_for_all() {
        let cg = group(serde_json::json!({}));
        let orders = owning("orders", "shop.orders", 4);
        let find = |n: &str| (n == "orders").then_some(&orders);
        let resolved = resolve(&cg, find);
        assert_eq!(resolved.routes.len(), 1);
        assert_eq!(resolved.partitions, 4);
        let waiting = resolved.waiting.expect("waiting");
        assert!(waiting.contains("refunds"), "{waiting}");
        assert!(waiting.contains("spec.produces"), "{waiting}");
        assert!(waiting.contains("captured"), "{waiting}");
        // Grants only on what resolved.
        assert!(
            resolved.acls.iter().all(|a| a.resource_type
                != crate::kafka::native::ResourceType::Topic
                || a.resource_name == "shop.orders"),
            "{:?}",
            resolved.acls
        );
    }

    #[test]
    fn a_group_whose_event_topics_all_resolve_does_not_wait() {
        let cg = group(serde_json::json!({}));
        let topics = [
            owning("orders", "shop.orders", 4),
            owning("refunds", "shop.refunds", 2),
            owning("captured", "shop.captured", 1),
        ];
        let find = |n: &str| topics.iter().find(|et| et.name_any() == n);
        let resolved = resolve(&cg, find);
        assert_eq!(resolved.waiting, None);
        assert_eq!(resolved.partitions, 6, "consumed topics only");
    }

    #[test]
    fn the_stored_password_stays_until_a_rotation_asks_for_a_new_one() {
        let resolved = resolve(&group(serde_json::json!({})), |_| None);
        let fresh = || "fresh".to_string();
        // No Secret yet: the fresh password.
        let cg = group(serde_json::json!({}));
        let d = build(&cg, &resolved, None, &kafka(), fresh());
        assert_eq!((d.password.as_str(), d.password_changed), ("fresh", true));
        assert_eq!(
            d.initial_replicas, 0,
            "capped at the partitions: none resolved"
        );
        // A stored one stays.
        let stored = stored_secret("old", None);
        let d = build(&cg, &resolved, Some(&stored), &kafka(), fresh());
        assert_eq!((d.password.as_str(), d.password_changed), ("old", false));
        assert_eq!(
            d.deployment,
            build(&cg, &resolved, Some(&stored), &kafka(), "other".into()).deployment,
            "the Deployment does not depend on an unused fresh password"
        );
        // A rotation request the Secret does not answer yet: a new one, answering it.
        let rotate = group(serde_json::json!({ROTATE_ANNOTATION: "r1"}));
        let d = build(&rotate, &resolved, Some(&stored), &kafka(), fresh());
        assert_eq!((d.password.as_str(), d.password_changed), ("fresh", true));
        assert_eq!(
            d.secret.annotations().get(ROTATED_FOR_ANNOTATION),
            Some(&"r1".to_string())
        );
        // Answered already: kept.
        let answered = stored_secret("new", Some("r1"));
        let d = build(&rotate, &resolved, Some(&answered), &kafka(), fresh());
        assert_eq!((d.password.as_str(), d.password_changed), ("new", false));
    }

    fn acl(topic: &str) -> AclBinding {
        use crate::kafka::native::*;
        AclBinding {
            resource_type: ResourceType::Topic,
            resource_name: topic.into(),
            pattern_type: PatternType::Literal,
            principal: "User:u".into(),
            host: "*".into(),
            operation: AclOperation::Read,
            permission: AclPermission::Allow,
        }
    }

    #[test]
    fn kafka_changes_create_what_is_missing_and_delete_what_is_not_desired() {
        let desired = BTreeSet::from([acl("a"), acl("b")]);
        let current = BTreeSet::from([acl("b"), acl("c")]);
        let changes = kafka_changes(&desired, &current, true, Some(false));
        assert_eq!(
            changes,
            KafkaChanges {
                set_user: false,
                create: vec![acl("a")],
                delete: vec![acl("c")],
            }
        );
        assert!(kafka_changes(&desired, &current, false, Some(false)).set_user);
        assert!(kafka_changes(&desired, &current, true, Some(true)).set_user);
        // A waiting group only loses grants.
        assert_eq!(
            kafka_changes(&desired, &current, false, None),
            KafkaChanges {
                set_user: false,
                create: vec![],
                delete: vec![acl("c")],
            }
        );
    }

    #[test]
    fn a_new_group_waits_quietly_only_for_event_topics_not_reconciled_yet() {
        let created: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut cg = group(serde_json::json!({}));
        cg.metadata.creation_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(created),
        );
        let after = |secs: i64| created + k8s_openapi::jiff::SignedDuration::from_secs(secs);
        let pending = |name: &str| EventTopic {
            status: None,
            ..owning(name, name, 1)
        };
        let refused = |name: &str| {
            let mut et = owning(name, name, 1);
            let ready = &mut et.status.as_mut().unwrap().conditions[0];
            ready.status = "False".into();
            ready.reason = "TopicExists".into();
            et
        };
        let deleting = |name: &str| {
            let mut et = pending(name);
            et.metadata.deletion_timestamp = cg.metadata.creation_timestamp.clone();
            et
        };
        let wait = |cg: &ConsumerGroup, refunds: Option<EventTopic>, now: Timestamp| {
            let topics = [
                owning("orders", "orders", 3),
                owning("captured", "captured", 1),
            ];
            let refunds = refunds.as_ref();
            quiet_wait(
                cg,
                |n| {
                    topics
                        .iter()
                        .find(|t| t.name_any() == n)
                        .or(refunds.filter(|t| t.name_any() == n))
                },
                now,
            )
        };
        let secs = |s| Some(std::time::Duration::from_secs(s));
        // A creation time ahead of the operator's clock: at most the minute.
        assert_eq!(wait(&cg, Some(pending("refunds")), after(-30)), secs(60));
        // Applied together with an EventTopic not reconciled yet: quiet for the rest of
        // the minute.
        assert_eq!(wait(&cg, Some(pending("refunds")), after(5)), secs(55));
        // Told at once: every EventTopic owns its topic (nothing to wait for), one is
        // missing, refused or being deleted.
        assert_eq!(
            wait(&cg, Some(owning("refunds", "refunds", 1)), after(5)),
            None
        );
        assert_eq!(wait(&cg, None, after(5)), None);
        assert_eq!(wait(&cg, Some(refused("refunds")), after(5)), None);
        assert_eq!(wait(&cg, Some(deleting("refunds")), after(5)), None);
        // Told once the minute is over, or when the group was told anything before.
        assert_eq!(wait(&cg, Some(pending("refunds")), after(60)), None);
        cg.status = Some(
            serde_json::from_value(serde_json::json!({"conditions": [
            {"type": "Ready", "status": "False", "reason": "TopicNotFound", "message": "",
             "lastTransitionTime": "2026-01-01T00:00:01Z"}]}))
            .unwrap(),
        );
        assert_eq!(wait(&cg, Some(pending("refunds")), after(5)), None);
    }
}
