//! An EventTopic applied to the real API server becomes a real Kafka topic, checked with
//! Kafka's own TopicCommand.

use std::time::Duration;

use eventops_crds::EventTopic;
use eventops_tests::{TestEnv, env, eventually, unique};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

async fn apply(
    api: &Api<EventTopic>,
    name: &str,
    spec: serde_json::Value,
) -> kube::Result<EventTopic> {
    let obj = json!({
        "apiVersion": "eventops.dev/v1alpha1", "kind": "EventTopic",
        "metadata": {"name": name}, "spec": spec,
    });
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&obj),
    )
    .await
}

/// Waits until the Ready condition describes `generation` and has `status`; returns its
/// reason and message.
async fn ready(
    api: &Api<EventTopic>,
    name: &str,
    generation: i64,
    status: &str,
) -> (String, String) {
    eventually(
        TIMEOUT,
        &format!("EventTopic {name} Ready={status} at generation {generation}"),
        || async {
            let et = api.get(name).await.ok()?;
            let st = et.status?;
            let c = st.conditions.iter().find(|c| c.type_ == "Ready")?;
            (st.observed_generation == Some(generation)
                && c.observed_generation == Some(generation)
                && c.status == status)
                .then(|| (c.reason.clone(), c.message.clone()))
        },
    )
    .await
}

async fn setup(prefix: &str) -> (TestEnv, Api<EventTopic>, eventops_tests::OperatorHandle) {
    let env = env().await;
    let ns = env.namespace(prefix).await;
    let operator = env.start_operator(&ns);
    let api = Api::namespaced(env.client.clone(), &ns);
    (env, api, operator)
}

#[tokio::test(flavor = "multi_thread")]
async fn event_topic_becomes_a_kafka_topic_with_its_dead_letter_topic() {
    let (env, api, _operator) = setup("et-create").await;
    let topic = unique("orders.order-placed");
    apply(
        &api,
        &topic,
        json!({"partitions": 3, "config": {"retention.ms": "3600000", "cleanup.policy": "delete"}}),
    )
    .await
    .unwrap();

    let (reason, _) = ready(&api, &topic, 1, "True").await;
    assert_eq!(reason, "InSync");
    let status = api.get(&topic).await.unwrap().status.unwrap();
    assert_eq!(status.topic_name.as_deref(), Some(topic.as_str()));
    assert_eq!(status.partitions, Some(3));
    assert_eq!(status.replication_factor, Some(1));

    let described = env.describe_topic(&topic).await.unwrap();
    assert_eq!(described.partitions, 3);
    assert_eq!(described.replication_factor, 1);
    assert!(
        described.configs.contains(&"retention.ms=3600000".into()),
        "{described:?}"
    );
    assert!(
        described.configs.contains(&"cleanup.policy=delete".into()),
        "{described:?}"
    );

    let dlt = env.describe_topic(&format!("{topic}.DLT")).await.unwrap();
    assert_eq!(
        dlt.partitions, 3,
        "the dead-letter topic has its source's partitions"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn spec_changes_reach_kafka() {
    let (env, api, _operator) = setup("et-update").await;
    let topic = unique("payments.payment.captured");
    apply(
        &api,
        &topic,
        json!({"partitions": 2, "config": {"retention.ms": "60000"}}),
    )
    .await
    .unwrap();
    ready(&api, &topic, 1, "True").await;

    apply(
        &api,
        &topic,
        json!({"partitions": 5, "config": {"max.message.bytes": "2097152"}}),
    )
    .await
    .unwrap();
    ready(&api, &topic, 2, "True").await;

    let described = env.describe_topic(&topic).await.unwrap();
    assert_eq!(described.partitions, 5);
    assert!(
        described
            .configs
            .contains(&"max.message.bytes=2097152".into()),
        "{described:?}"
    );
    assert!(
        !described
            .configs
            .iter()
            .any(|c| c.starts_with("retention.ms=")),
        "a config removed from the spec is removed from Kafka: {described:?}"
    );
    let dlt = env.describe_topic(&format!("{topic}.DLT")).await.unwrap();
    assert_eq!(
        dlt.partitions, 5,
        "the dead-letter topic grows with its source"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_refusal_becomes_ready_false_with_kafkas_reason() {
    let (env, api, _operator) = setup("et-refused").await;
    let topic = unique("inventory.stock.reserved");
    // One broker cannot hold three replicas.
    apply(
        &api,
        &topic,
        json!({"partitions": 1, "replicationFactor": 3}),
    )
    .await
    .unwrap();

    let (reason, message) = ready(&api, &topic, 1, "False").await;
    assert_eq!(reason, "InvalidReplicationFactor");
    assert!(message.contains(&topic), "{message}");
    let listed = env
        .kafka_tool("org.apache.kafka.tools.TopicCommand", &["--list"])
        .await
        .unwrap();
    assert!(!listed.lines().any(|l| l == topic), "no topic was created");
}

#[tokio::test(flavor = "multi_thread")]
async fn topic_that_kafka_has_with_more_partitions_is_not_supported() {
    let (env, api, _operator) = setup("et-notsupported").await;
    let topic = unique("shipping.parcel.sent");
    env.kafka_tool(
        "org.apache.kafka.tools.TopicCommand",
        &["--create", "--topic", &topic, "--partitions", "4"],
    )
    .await
    .unwrap();
    apply(&api, &topic, json!({"partitions": 2})).await.unwrap();

    let (reason, message) = ready(&api, &topic, 1, "False").await;
    assert_eq!(reason, "NotSupported");
    assert!(
        message.contains("spec.partitions") && message.contains("4 or more"),
        "{message}"
    );
    assert_eq!(
        env.describe_topic(&topic).await.unwrap().partitions,
        4,
        "Kafka is left alone"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_server_rejects_invalid_topics_naming_the_field() {
    let (_env, api, _operator) = setup("et-invalid").await;
    let name = unique("bad");
    let cases = [
        (json!({"partitions": 0}), "spec.partitions"),
        (
            json!({"partitions": 1, "topicName": "has space"}),
            "spec.topicName",
        ),
        (
            json!({"partitions": 1, "replicationFactor": 0}),
            "spec.replicationFactor",
        ),
        (json!({}), "spec.partitions"),
    ];
    for (spec, field) in cases {
        let err = apply(&api, &name, spec.clone())
            .await
            .expect_err(&format!("{spec} must be rejected"));
        let kube::Error::Api(status) = err else {
            panic!("{spec}: not an API error: {err}")
        };
        assert_eq!(status.code, 422, "{spec}: {status:?}");
        assert!(status.message.contains(field), "{spec}: {}", status.message);
    }

    apply(&api, &name, json!({"partitions": 3})).await.unwrap();
    let err = apply(&api, &name, json!({"partitions": 2}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot be decreased"), "{err}");
    let err = apply(
        &api,
        &name,
        json!({"partitions": 3, "topicName": "renamed"}),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("spec.topicName is immutable"),
        "{err}"
    );
}
