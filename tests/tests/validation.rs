//! A table of invalid resources: each is rejected by the real API server (schema, CEL
//! rules, strict field validation) with a message that names the field.

use eventops_tests::{env, unique};
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams, ValidationDirective};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

fn resource(kind: &str) -> ApiResource {
    let plural = format!("{}s", kind.to_lowercase());
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("eventops.dev", "v1alpha1", kind),
        &plural,
    )
}

async fn apply(
    api: &Api<DynamicObject>,
    kind: &str,
    name: &str,
    spec: &Value,
) -> Result<(), String> {
    let obj = json!({"apiVersion": "eventops.dev/v1alpha1", "kind": kind,
                     "metadata": {"name": name}, "spec": spec});
    let mut params = PatchParams::apply("test").force();
    // What `kubectl apply` does by default: unknown fields are errors, not dropped.
    params.field_validation = Some(ValidationDirective::Strict);
    api.patch(name, &params, &Patch::Apply(&obj))
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

const GROUP: fn(Value) -> Value = |extra| {
    let mut spec = json!({"topics": ["orders"], "template": {"image": "inventory:1"}});
    if let (Value::Object(s), Value::Object(e)) = (&mut spec, extra) {
        s.extend(e);
    }
    spec
};

#[tokio::test(flavor = "multi_thread")]
async fn invalid_resources_are_rejected_naming_the_field() {
    let env = env().await;
    let ns = env.namespace("invalid").await;
    let topics =
        Api::<DynamicObject>::namespaced_with(env.client.clone(), &ns, &resource("EventTopic"));
    let groups =
        Api::<DynamicObject>::namespaced_with(env.client.clone(), &ns, &resource("ConsumerGroup"));

    let topic_cases: Vec<(Value, &str)> = vec![
        (json!({"partitions": 0}), "spec.partitions"),
        (json!({}), "spec.partitions"),
        (
            json!({"partitions": 1, "topicName": "bad name!"}),
            "spec.topicName",
        ),
        (
            json!({"partitions": 1, "topicName": ".."}),
            "spec.topicName",
        ),
        (
            json!({"partitions": 1, "replicationFactor": 0}),
            "spec.replicationFactor",
        ),
        (
            json!({"partitions": 1, "retry": {"delays": ["soon"]}}),
            "spec.retry.delays",
        ),
        (
            json!({"partitions": 1, "deletionPolicy": "Purge"}),
            "spec.deletionPolicy",
        ),
        (json!({"partitions": 1, "partitons": 3}), "partitons"),
        (
            json!({"partitions": 1, "config": {"retention.ms": 1000}}),
            "spec.config",
        ),
    ];
    for (spec, field) in &topic_cases {
        let err = apply(&topics, "EventTopic", &unique("t"), spec)
            .await
            .expect_err(&spec.to_string());
        assert!(err.contains(field), "{spec}: {err}");
    }

    let group_cases: Vec<(Value, &str)> = vec![
        (
            GROUP(json!({"scaling": {"minReplicas": 4, "maxReplicas": 2}})),
            "scaling.minReplicas",
        ),
        (
            GROUP(json!({"scaling": {"minReplicas": -1}})),
            "spec.scaling.minReplicas",
        ),
        (
            GROUP(json!({"scaling": {"lagPerReplica": 0}})),
            "spec.scaling.lagPerReplica",
        ),
        (
            GROUP(json!({"processing": {"maxAttempts": 0}})),
            "spec.processing.maxAttempts",
        ),
        (
            GROUP(json!({"processing": {"idempotency": "Redis"}})),
            "spec.processing.idempotency",
        ),
        (GROUP(json!({"topics": []})), "spec.topics"),
        (GROUP(json!({"topics": ["a", "a"]})), "spec.topics"),
        (GROUP(json!({"groupId": "has space"})), "spec.groupId"),
        (json!({"topics": ["orders"]}), "spec.template"),
        (
            GROUP(
                json!({"template": {"image": "x", "env": [{"name": "EVENTOPS_GROUP_ID", "value": "y"}]}}),
            ),
            "template.env",
        ),
        (
            GROUP(json!({"scaling": {"scaleDownStabilization": "ten minutes"}})),
            "spec.scaling.scaleDownStabilization",
        ),
        (GROUP(json!({"replicas": 3})), "replicas"),
        (GROUP(json!({"outbox": {}})), "spec.outbox.topics"),
        (
            GROUP(json!({"outbox": {"topics": []}})),
            "spec.outbox.topics",
        ),
        (
            GROUP(json!({"outbox": {"topics": ["a", "a"]}})),
            "spec.outbox.topics",
        ),
        (
            GROUP(
                json!({"outbox": {"topics": ["a"], "databaseSecret": {"name": "Bad_Name", "key": "url"}}}),
            ),
            "spec.outbox.databaseSecret.name",
        ),
        (
            GROUP(json!({"outbox": {"topics": ["a"], "databaseSecret": {"name": "db"}}})),
            "spec.outbox.databaseSecret.key",
        ),
    ];
    for (spec, field) in &group_cases {
        let err = apply(&groups, "ConsumerGroup", &unique("g"), spec)
            .await
            .expect_err(&spec.to_string());
        assert!(err.contains(field), "{spec}: {err}");
    }

    // The name becomes the workers' label values, which Kubernetes limits to 63
    // characters: 64 is refused by the API server, 63 is accepted.
    let long = "g".repeat(64);
    let err = apply(&groups, "ConsumerGroup", &long, &GROUP(json!({})))
        .await
        .expect_err("a 64-character ConsumerGroup name");
    assert!(
        err.contains("metadata.name") && err.contains("63 characters"),
        "{err}"
    );
    apply(&groups, "ConsumerGroup", &long[..63], &GROUP(json!({})))
        .await
        .expect("a 63-character ConsumerGroup name");
    let outbox = json!({"outbox": {"topics": ["captured"],
                                   "databaseSecret": {"name": "payments-db", "key": "url"}}});
    apply(&groups, "ConsumerGroup", &unique("g"), &GROUP(outbox))
        .await
        .expect("a ConsumerGroup with an outbox");

    // Immutable fields, on update.
    let name = unique("immutable");
    apply(&groups, "ConsumerGroup", &name, &GROUP(json!({})))
        .await
        .unwrap();
    let err = apply(
        &groups,
        "ConsumerGroup",
        &name,
        &GROUP(json!({"groupId": "other"})),
    )
    .await
    .unwrap_err();
    assert!(err.contains("spec.groupId is immutable"), "{err}");
    let name = unique("immutable");
    apply(
        &topics,
        "EventTopic",
        &name,
        &json!({"partitions": 2, "replicationFactor": 1}),
    )
    .await
    .unwrap();
    let err = apply(
        &topics,
        "EventTopic",
        &name,
        &json!({"partitions": 2, "replicationFactor": 3}),
    )
    .await
    .unwrap_err();
    assert!(err.contains("spec.replicationFactor is immutable"), "{err}");

    // Replays: where to restart is given exactly once per topic, and never changes.
    let replays =
        Api::<DynamicObject>::namespaced_with(env.client.clone(), &ns, &resource("Replay"));
    let at = |p: Value| json!({"consumerGroup": "payments", "from": p});
    let replay_cases: Vec<(Value, &str)> = vec![
        (json!({"consumerGroup": "payments"}), "set spec.from"),
        (
            at(json!({})),
            "set exactly one of earliest: true, timestamp or offsets",
        ),
        (at(json!({"earliest": false})), "spec.from: Invalid value"),
        (
            at(json!({"earliest": true, "timestamp": "2026-01-01T00:00:00Z"})),
            "spec.from: Invalid value",
        ),
        (at(json!({"offsets": []})), "spec.from.offsets"),
        (
            at(json!({"offsets": [{"partition": -1, "offset": 0}]})),
            "spec.from.offsets[0].partition",
        ),
        (
            json!({"consumerGroup": "payments", "topics": [
                {"topic": "orders", "earliest": true},
                {"topic": "orders", "earliest": true}]}),
            "spec.topics names a topic twice",
        ),
        (
            json!({"consumerGroup": "payments", "topics": [{"topic": "orders"}]}),
            "spec.topics[0]",
        ),
        (json!({"from": {"earliest": true}}), "spec.consumerGroup"),
    ];
    for (spec, needle) in &replay_cases {
        let err = apply(&replays, "Replay", &unique("r"), spec)
            .await
            .expect_err(&format!("{spec} was accepted"));
        assert!(err.contains(needle), "{spec}: {err}");
    }
    let name = unique("replay");
    apply(&replays, "Replay", &name, &at(json!({"earliest": true})))
        .await
        .expect("a valid Replay");
    let err = apply(
        &replays,
        "Replay",
        &name,
        &at(json!({"timestamp": "2026-01-01T00:00:00Z"})),
    )
    .await
    .unwrap_err();
    assert!(err.contains("a Replay's spec cannot change"), "{err}");
}

/// Every manifest of the order-processing example, the operations ones (Redrive,
/// Replay) included, is accepted by the API server as written (a server-side dry run
/// with strict field validation): a README's worked example that the CRDs reject would
/// fail the user at 3 AM.
#[tokio::test(flavor = "multi_thread")]
async fn the_examples_manifests_are_accepted_as_written() {
    let env = env().await;
    let ns = env.namespace("examples").await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/order-processing/deploy");
    let mut files: Vec<_> = ["", "ops"]
        .iter()
        .flat_map(|sub| std::fs::read_dir(dir.join(sub)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut kinds = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let obj: Value = serde::Deserialize::deserialize(doc).unwrap();
            let kind = obj["kind"].as_str().unwrap().to_string();
            let name = obj["metadata"]["name"].as_str().unwrap().to_string();
            let api =
                Api::<DynamicObject>::namespaced_with(env.client.clone(), &ns, &resource(&kind));
            let mut params = PatchParams::apply("test").force();
            params.field_validation = Some(ValidationDirective::Strict);
            params.dry_run = true;
            api.patch(&name, &params, &Patch::Apply(&obj))
                .await
                .unwrap_or_else(|e| panic!("{} {kind}/{name}: {e}", file.display()));
            kinds.push(kind);
        }
    }
    for kind in ["EventTopic", "ConsumerGroup", "Redrive", "Replay"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {files:?}");
    }
}
