//! The CEL rules in the CRDs, evaluated locally on table-driven cases. The API server
//! evaluates the same rules; the integration tests show that end to end.

use eventops_crds::{ConsumerGroup, EventTopic};
use serde_json::{Value, json};

fn topic(spec: Value) -> EventTopic {
    serde_json::from_value(json!({
        "apiVersion": "eventops.dev/v1alpha1", "kind": "EventTopic",
        "metadata": {"name": "orders.order.placed", "namespace": "shop"},
        "spec": spec,
    }))
    .unwrap()
}

fn group(spec: Value) -> ConsumerGroup {
    serde_json::from_value(json!({
        "apiVersion": "eventops.dev/v1alpha1", "kind": "ConsumerGroup",
        "metadata": {"name": "inventory", "namespace": "shop"},
        "spec": spec,
    }))
    .unwrap()
}

fn base_group() -> Value {
    json!({"topics": ["orders"], "template": {"image": "inventory:1"}})
}

fn with(mut base: Value, patch: Value) -> Value {
    fn merge(a: &mut Value, b: Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }
    merge(&mut base, patch);
    base
}

#[test]
fn valid_resources_pass() {
    topic(json!({"partitions": 3})).validate_cel().unwrap();
    group(base_group()).validate_cel().unwrap();
}

#[test]
fn consumer_group_names_fit_in_a_label_value() {
    let named = |name: &str| -> ConsumerGroup {
        serde_json::from_value(json!({
            "apiVersion": "eventops.dev/v1alpha1", "kind": "ConsumerGroup",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": base_group(),
        }))
        .unwrap()
    };
    named(&"a".repeat(63)).validate_cel().unwrap();
    let err = named(&"a".repeat(64))
        .validate_cel()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("63 characters") && err.contains("metadata.name"),
        "{err}"
    );
}

#[test]
fn invalid_consumer_groups_are_rejected_naming_the_field() {
    let cases = [
        (
            json!({"scaling": {"minReplicas": 5, "maxReplicas": 2}}),
            "scaling.minReplicas",
        ),
        (
            json!({"processing": {"backoff": {"initial": "1m", "max": "1s", "multiplier": 2.0}}}),
            "processing.backoff.initial",
        ),
        (
            json!({"template": {"env": [{"name": "EVENTOPS_GROUP_ID", "value": "x"}]}}),
            "template.env",
        ),
    ];
    for (patch, field) in cases {
        let err = group(with(base_group(), patch.clone()))
            .validate_cel()
            .expect_err(&format!("{patch} must be rejected"));
        assert!(err.to_string().contains(field), "{patch}: {err}");
    }
}

#[test]
fn immutable_and_monotonic_fields_are_enforced_on_update() {
    let old = topic(json!({"partitions": 3, "replicationFactor": 1}));
    let cases = [
        (
            json!({"partitions": 2, "replicationFactor": 1}),
            "spec.partitions",
        ),
        (
            json!({"partitions": 3, "replicationFactor": 2}),
            "spec.replicationFactor",
        ),
        (
            json!({"partitions": 3, "replicationFactor": 1, "topicName": "other"}),
            "spec.topicName",
        ),
    ];
    for (spec, field) in cases {
        let err = topic(spec.clone())
            .validate_cel_update(&old)
            .expect_err(&format!("{spec} must be rejected"));
        assert!(err.to_string().contains(field), "{spec}: {err}");
    }
    // Growing partitions, or naming the topic what it already is, is fine.
    topic(json!({"partitions": 6, "replicationFactor": 1}))
        .validate_cel_update(&old)
        .unwrap();
    topic(json!({"partitions": 3, "replicationFactor": 1, "topicName": "orders.order.placed"}))
        .validate_cel_update(&old)
        .unwrap();

    let old = group(base_group());
    let err = group(with(base_group(), json!({"groupId": "other"})))
        .validate_cel_update(&old)
        .unwrap_err();
    assert!(err.to_string().contains("spec.groupId"), "{err}");
}
