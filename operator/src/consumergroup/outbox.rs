//! `spec.outbox`: the transactional outbox relay that runs inside a group's workers
//! (pure). It publishes with the group's Kafka user, so the group gets Write on exactly
//! the topics `spec.outbox.topics` names, by the rule of `spec.produces`, and the workers
//! get the contract's `EVENTOPS_OUTBOX_*` variables.

use std::collections::BTreeSet;

use eventops_consumer_runtime::contract;
use eventops_crds::{ConsumerGroup, EventTopic};
use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};

use super::produces;
use crate::kafka::native::AclBinding;

/// The field the condition messages name.
pub const TOPICS_FIELD: &str = "spec.outbox.topics";

/// The EventTopic names `spec.outbox.topics` holds (none without an outbox).
pub fn topic_names(cg: &ConsumerGroup) -> &[String] {
    cg.spec.outbox.as_ref().map_or(&[], |o| o.topics.as_slice())
}

/// The Kafka topics of the outbox's EventTopics that resolve (sorted, each once), and the
/// names of those that do not: missing, or not owning their Kafka topic.
pub fn resolve_some<'a, 'c>(
    cg: &'c ConsumerGroup,
    find: impl Fn(&str) -> Option<&'a EventTopic>,
) -> (Vec<String>, Vec<&'c str>) {
    let (topics, missing) = produces::resolve_names(topic_names(cg), find);
    let topics: BTreeSet<String> = topics.into_iter().collect();
    (topics.into_iter().collect(), missing)
}

/// The condition message for outbox EventTopics that do not resolve, if any.
pub fn missing_message(missing: &[&str], namespace: &str) -> Option<String> {
    produces::missing_message_for(TOPICS_FIELD, missing, namespace)
}

/// What the relay's idempotent producer needs on its topics: what `spec.produces` grants.
pub fn acls(cg: &ConsumerGroup, topics: &[String]) -> BTreeSet<AclBinding> {
    produces::acls(cg, topics)
}

/// The worker variables of the contract: [`contract::OUTBOX_TOPICS`] (the resolved Kafka
/// topics, a JSON array) and, when `databaseSecret` is set,
/// [`contract::OUTBOX_DATABASE_URL`] from that Secret key. None without an outbox.
pub fn env(cg: &ConsumerGroup, topics: &[String]) -> Vec<EnvVar> {
    let Some(outbox) = &cg.spec.outbox else {
        return Vec::new();
    };
    let mut env = vec![EnvVar {
        name: contract::OUTBOX_TOPICS.into(),
        value: Some(serde_json::to_string(topics).expect("topic names serialize")),
        value_from: None,
    }];
    if let Some(secret) = &outbox.database_secret {
        env.push(EnvVar {
            name: contract::OUTBOX_DATABASE_URL.into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.name.clone(),
                    key: secret.key.clone(),
                    // A worker without its outbox database must not start as if it had none.
                    optional: Some(false),
                }),
                ..Default::default()
            }),
        });
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::native::AclOperation;
    use eventops_crds::{ConsumerGroupSpec, EventTopicSpec, OutboxSpec, SecretKeyRef};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn group(outbox: Option<OutboxSpec>) -> ConsumerGroup {
        let mut cg = ConsumerGroup::new(
            "payment",
            ConsumerGroupSpec {
                group_id: None,
                topics: vec!["orders".into()],
                produces: vec![],
                outbox,
                template: Default::default(),
                processing: Default::default(),
                scaling: Default::default(),
            },
        );
        cg.metadata.namespace = Some("shop".into());
        cg
    }

    fn outbox(topics: &[&str], secret: Option<(&str, &str)>) -> Option<OutboxSpec> {
        Some(OutboxSpec {
            topics: topics.iter().map(|s| s.to_string()).collect(),
            database_secret: secret.map(|(name, key)| SecretKeyRef {
                name: name.into(),
                key: key.into(),
            }),
        })
    }

    fn topic(name: &str, kafka_name: &str, reason: &str) -> EventTopic {
        let mut et = EventTopic::new(
            name,
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
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }],
            ..Default::default()
        });
        et
    }

    #[test]
    fn outbox_topics_resolve_like_produced_ones() {
        let topics = [
            topic("refunded", "payments.payment.refunded", "InSync"),
            topic("captured", "payments.payment.captured", "InSync"),
            topic("theirs", "payments.payment.voided", "ResourceConflict"),
        ];
        let find = |n: &str| {
            topics
                .iter()
                .find(|t| t.metadata.name.as_deref() == Some(n))
        };
        // (spec.outbox.topics, resolved Kafka topics, missing EventTopics)
        let cases: [(&[&str], &[&str], &[&str]); 5] = [
            (
                &["refunded", "captured"],
                // Sorted, whatever the spec's order.
                &["payments.payment.captured", "payments.payment.refunded"],
                &[],
            ),
            (
                &["captured", "missing"],
                &["payments.payment.captured"],
                &["missing"],
            ),
            // An EventTopic that does not own its Kafka topic grants nothing.
            (&["theirs"], &[], &["theirs"]),
            (
                &["captured", "captured"],
                &["payments.payment.captured"],
                &[],
            ),
            (&[], &[], &[]),
        ];
        for (names, resolved, missing) in cases {
            let cg = group(outbox(names, None));
            let (got, not_found) = resolve_some(&cg, find);
            assert_eq!(got, resolved, "{names:?}");
            assert_eq!(not_found, missing, "{names:?}");
        }
        let cg = group(None);
        assert_eq!(resolve_some(&cg, find), (vec![], vec![]));
    }

    #[test]
    fn a_missing_outbox_topic_is_named_with_the_field() {
        assert_eq!(missing_message(&[], "shop"), None);
        let message = missing_message(&["captured", "refunded"], "shop").unwrap();
        assert!(
            message.starts_with(
                "spec.outbox.topics names EventTopic captured, refunded that does not exist in \
                 namespace shop"
            ),
            "{message}"
        );
    }

    #[test]
    fn the_relay_may_write_exactly_its_topics() {
        let cg = group(outbox(&["captured"], None));
        let granted: Vec<String> = acls(&cg, &["payments.payment.captured".to_string()])
            .iter()
            .map(|a| {
                assert_eq!(a.principal, "User:eventops.shop.payment");
                format!(
                    "{:?} {} {:?}",
                    a.resource_type, a.resource_name, a.operation
                )
            })
            .collect();
        assert_eq!(
            granted,
            [
                "Topic payments.payment.captured Write",
                "Topic payments.payment.captured Describe",
            ]
        );
        assert!(acls(&cg, &[]).is_empty());
        assert!(
            !acls(&cg, &["x".into()])
                .iter()
                .any(|a| a.operation == AclOperation::Read)
        );
    }

    #[test]
    fn the_contract_variables_follow_the_spec() {
        let topics = vec!["a.b.c".to_string(), "a.b.d".to_string()];
        let url_ref = |env: &[EnvVar]| {
            env.iter()
                .find(|e| e.name == contract::OUTBOX_DATABASE_URL)
                .map(|e| {
                    let r = e.value_from.clone().unwrap().secret_key_ref.unwrap();
                    (r.name, r.key, r.optional)
                })
        };
        // (outbox, EVENTOPS_OUTBOX_TOPICS, EVENTOPS_OUTBOX_DATABASE_URL's Secret key)
        let cases = [
            (None, None, None),
            (
                outbox(&["c", "d"], None),
                Some(r#"["a.b.c","a.b.d"]"#),
                None,
            ),
            (
                outbox(&["c", "d"], Some(("payments-db", "url"))),
                Some(r#"["a.b.c","a.b.d"]"#),
                Some(("payments-db".to_string(), "url".to_string(), Some(false))),
            ),
        ];
        for (spec, topics_json, secret) in cases {
            let env = env(&group(spec.clone()), &topics);
            let topics_var = env.iter().find(|e| e.name == contract::OUTBOX_TOPICS);
            assert_eq!(
                topics_var.and_then(|e| e.value.as_deref()),
                topics_json,
                "{spec:?}"
            );
            assert_eq!(url_ref(&env), secret, "{spec:?}");
        }
    }
}
