//! `spec.produces`: the topics a group's workers publish to, and the ACLs that allow
//! exactly that (pure).

use std::collections::BTreeSet;

use eventops_crds::{ConsumerGroup, EventTopic};

use super::build::{owns_its_topic, principal};
use crate::kafka::native::{AclBinding, AclOperation, AclPermission, PatternType, ResourceType};

/// The Kafka topics of the EventTopics `spec.produces` names, looked up by `find` in
/// the group's namespace; `Err` with the condition message when one is missing or does
/// not own its Kafka topic (the same rule as for consumed topics: access is only
/// granted to a topic an EventTopic of the namespace owns).
pub fn resolve<'a>(
    cg: &ConsumerGroup,
    namespace: &str,
    find: impl Fn(&str) -> Option<&'a EventTopic>,
) -> Result<Vec<String>, String> {
    let (topics, missing) = resolve_some(cg, find);
    match missing_message(&missing, namespace) {
        None => Ok(topics),
        Some(message) => Err(message),
    }
}

/// [`resolve`] in part: the Kafka topics of the produced EventTopics that resolve, and
/// the names of those that do not.
pub fn resolve_some<'a, 'c>(
    cg: &'c ConsumerGroup,
    find: impl Fn(&str) -> Option<&'a EventTopic>,
) -> (Vec<String>, Vec<&'c str>) {
    resolve_names(&cg.spec.produces, find)
}

/// The Kafka topics of the EventTopics `names` names that resolve (exist and own their
/// topic), in the order named, and the names that do not: the rule for every field
/// that names topics a group's user may write (`spec.produces`, `spec.outbox.topics`).
pub fn resolve_names<'a, 'c>(
    names: &'c [String],
    find: impl Fn(&str) -> Option<&'a EventTopic>,
) -> (Vec<String>, Vec<&'c str>) {
    let mut topics = Vec::new();
    let mut missing = Vec::new();
    for name in names {
        match find(name) {
            Some(et) if owns_its_topic(et) => topics.push(et.kafka_topic_name().to_string()),
            _ => missing.push(name.as_str()),
        }
    }
    (topics, missing)
}

/// The condition message for produced EventTopics that do not resolve, if any.
pub fn missing_message(missing: &[&str], namespace: &str) -> Option<String> {
    missing_message_for("spec.produces", missing, namespace)
}

/// The condition message for EventTopics named in `field` that do not resolve, if any.
pub fn missing_message_for(field: &str, missing: &[&str], namespace: &str) -> Option<String> {
    (!missing.is_empty()).then(|| {
        format!(
            "{field} names EventTopic {} that does not exist in namespace {namespace} or \
             does not own its Kafka topic (see its Ready condition): waiting for it",
            missing.join(", ")
        )
    })
}

/// Write and Describe on each produced topic, for the group's principal. An idempotent
/// producer (the outbox relay's) needs nothing more on Kafka 3 and later: its producer
/// id comes with Write on a topic.
pub fn acls(cg: &ConsumerGroup, topics: &[String]) -> BTreeSet<AclBinding> {
    let principal = principal(cg);
    topics
        .iter()
        .flat_map(|topic| {
            [AclOperation::Write, AclOperation::Describe].map(|operation| AclBinding {
                resource_type: ResourceType::Topic,
                resource_name: topic.clone(),
                pattern_type: PatternType::Literal,
                principal: principal.clone(),
                host: "*".into(),
                operation,
                permission: AclPermission::Allow,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventops_crds::{ConsumerGroupSpec, EventTopicSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn group(produces: &[&str]) -> ConsumerGroup {
        let mut cg = ConsumerGroup::new(
            "payment",
            ConsumerGroupSpec {
                group_id: None,
                topics: vec!["orders".into()],
                produces: produces.iter().map(|s| s.to_string()).collect(),
                outbox: None,
                template: Default::default(),
                processing: Default::default(),
                scaling: Default::default(),
            },
        );
        cg.metadata.namespace = Some("shop".into());
        cg
    }

    fn topic(kafka_name: &str, reason: &str) -> EventTopic {
        let mut et = EventTopic::new(
            "captured",
            EventTopicSpec {
                topic_name: Some(kafka_name.into()),
                ..Default::default()
            },
        );
        et.status = Some(eventops_crds::EventTopicStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: reason.into(),
                message: String::new(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
                observed_generation: None,
            }],
            ..Default::default()
        });
        et
    }

    #[test]
    fn produced_topics_get_write_and_describe() {
        let et = topic("payments.payment.captured", "InSync");
        let cg = group(&["captured"]);
        let topics = resolve(&cg, "shop", |n| (n == "captured").then_some(&et)).unwrap();
        assert_eq!(topics, vec!["payments.payment.captured".to_string()]);
        let acls = acls(&cg, &topics);
        let ops: Vec<_> = acls.iter().map(|a| a.operation).collect();
        assert_eq!(ops, vec![AclOperation::Write, AclOperation::Describe]);
        assert!(acls.iter().all(
            |a| a.principal == principal(&cg) && a.resource_name == "payments.payment.captured"
        ));
    }

    #[test]
    fn a_topic_owned_by_nobody_here_is_not_granted() {
        let conflict = topic("payments.payment.captured", "ResourceConflict");
        let cg = group(&["captured", "refunded"]);
        let err = resolve(&cg, "shop", |n| (n == "captured").then_some(&conflict)).unwrap_err();
        assert!(
            err.contains("spec.produces names EventTopic captured, refunded"),
            "{err}"
        );
    }
}
