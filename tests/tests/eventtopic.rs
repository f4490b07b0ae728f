//! An EventTopic applied to the real API server becomes a real Kafka topic, checked with
//! Kafka's own TopicCommand.

use std::time::Duration;

use eventops_crds::EventTopic;
use eventops_tests::{OperatorHandle, TestEnv, apply, env, eventually, unique};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

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

/// Waits until the EventTopic controller has run 4 more reconciles (it resyncs every 2 s
/// in tests), so that a window in which nothing may change has seen the operator look.
async fn resyncs(operator: &OperatorHandle) {
    let before = operator.metrics.reconciles("eventtopic");
    eventually(TIMEOUT, "4 more EventTopic reconciles", || async {
        (operator.metrics.reconciles("eventtopic") >= before + 4).then_some(())
    })
    .await;
}

async fn setup(prefix: &str) -> (TestEnv, Api<EventTopic>, OperatorHandle) {
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
    eventually(TIMEOUT, "status to show what Kafka has", || async {
        let status = api.get(&topic).await.ok()?.status?;
        (status.topic_name.as_deref() == Some(topic.as_str())
            && status.partitions == Some(3)
            && status.replication_factor == Some(1))
        .then_some(())
    })
    .await;

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

    // The user is told of both topics. kube's Recorder takes a second Event of the same
    // reason about the same object for a repeat and keeps only the first note.
    let ns = api.namespace().unwrap_or_default();
    let created = eventually(TIMEOUT, "a TopicCreated Event", || async {
        let notes: Vec<String> = (env.events(ns, &topic).await.into_iter())
            .filter(|(reason, _)| reason == "TopicCreated")
            .map(|(_, note)| note)
            .collect();
        (!notes.is_empty()).then_some(notes.join("\n"))
    })
    .await;
    for name in [format!("{topic} "), format!("{topic}.DLT ")] {
        assert!(
            created.contains(&format!("created Kafka topic {name}")),
            "{created}"
        );
    }
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
    // Adopted on purpose: without the annotation the existing topic is not this
    // EventTopic's to compare at all (TopicExists).
    apply(&api, &topic, json!({"partitions": 2})).await.unwrap();
    api.patch(
        &topic,
        &PatchParams::default(),
        &annotate(eventops_crds::ADOPT_ANNOTATION, Some("true")),
    )
    .await
    .unwrap();

    // The annotation does not change the generation: a pass before it saw the topic as
    // not this EventTopic's (TopicExists, also Ready=False at generation 1).
    let message = eventually(TIMEOUT, "Ready=False NotSupported", || async {
        let c = ready_condition(&api, &topic).await?;
        (c.status == "False" && c.reason == "NotSupported").then_some(c.message)
    })
    .await;
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

/// The EventTopic's Ready condition as it stands.
async fn ready_condition(
    api: &Api<EventTopic>,
    name: &str,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let et = api.get(name).await.ok()?;
    et.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
}

async fn condition(api: &Api<EventTopic>, name: &str, type_: &str) -> Option<(String, String)> {
    let et = api.get(name).await.ok()?;
    let c = et
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status, c.reason))
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_behind_the_operators_back_are_corrected_and_reported() {
    let (env, api, operator) = setup("et-drift").await;
    let topic = unique("orders.order-cancelled");
    apply(
        &api,
        &topic,
        json!({"partitions": 2, "config": {"retention.ms": "600000"}}),
    )
    .await
    .unwrap();
    ready(&api, &topic, 1, "True").await;

    env.add_topic_configs(&topic, "retention.ms=1000,cleanup.policy=compact")
        .await;

    // retention.ms is the spec's and goes back; cleanup.policy, which the spec never
    // named, is the administrator's and stays.
    eventually(TIMEOUT, "the operator to undo the change", || async {
        let configs = env.topic_configs(&topic).await;
        (configs == ["cleanup.policy=compact", "retention.ms=600000"]).then_some(())
    })
    .await;
    let ns = api.namespace().unwrap_or_default();
    let reasons = eventually(TIMEOUT, "a DriftCorrected Event", || async {
        let reasons = env.event_reasons(ns, &topic).await;
        reasons
            .contains(&"DriftCorrected".to_string())
            .then_some(reasons)
    })
    .await;
    assert!(reasons.contains(&"TopicCreated".to_string()), "{reasons:?}");
    // Later resyncs leave the administrator's config alone for good.
    resyncs(&operator).await;
    assert_eq!(
        env.topic_configs(&topic).await,
        ["cleanup.policy=compact", "retention.ms=600000"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_topics_are_created_beside_the_dead_letter_topic() {
    let (env, api, _operator) = setup("et-retry").await;
    let topic = unique("orders.order-paid");
    apply(
        &api,
        &topic,
        json!({"partitions": 3, "retry": {"delays": ["30s", "5m"]}}),
    )
    .await
    .unwrap();
    ready(&api, &topic, 1, "True").await;
    let status = api.get(&topic).await.unwrap().status.unwrap();
    let expected = [format!("{topic}.retry-30s"), format!("{topic}.retry-5m")];
    assert_eq!(status.retry_topics, expected);
    assert_eq!(status.dead_letter_topic, Some(format!("{topic}.DLT")));
    for retry in &expected {
        let d = env.describe_topic(retry).await.unwrap();
        assert_eq!(d.partitions, 3, "{retry}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_retains_the_topic_unless_the_policy_says_delete() {
    let (env, api, _operator) = setup("et-delete").await;
    let kept = unique("orders.order-kept");
    let deleted = unique("orders.order-deleted");
    apply(&api, &kept, json!({"partitions": 1})).await.unwrap();
    apply(
        &api,
        &deleted,
        json!({"partitions": 1, "deletionPolicy": "Delete"}),
    )
    .await
    .unwrap();
    ready(&api, &kept, 1, "True").await;
    ready(&api, &deleted, 1, "True").await;
    let finalizers = api
        .get(&deleted)
        .await
        .unwrap()
        .metadata
        .finalizers
        .unwrap_or_default();
    assert_eq!(finalizers, [eventops_crds::TOPIC_FINALIZER]);
    assert_eq!(
        api.get(&kept).await.unwrap().metadata.finalizers,
        None,
        "Retain needs no finalizer"
    );

    for name in [&kept, &deleted] {
        api.delete(name, &Default::default()).await.unwrap();
    }
    for name in [&kept, &deleted] {
        eventually(TIMEOUT, &format!("EventTopic {name} gone"), || async {
            api.get_opt(name).await.unwrap().is_none().then_some(())
        })
        .await;
    }
    assert!(
        env.topic_exists(&kept).await,
        "Retain keeps the topic and its data"
    );
    assert!(env.topic_exists(&format!("{kept}.DLT")).await);
    assert!(
        !env.topic_exists(&deleted).await,
        "Delete deletes the topic"
    );
    assert!(!env.topic_exists(&format!("{deleted}.DLT")).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_release_annotation_lets_a_resource_go_when_kafka_is_gone() {
    let (env, api, operator) = setup("et-release").await;
    let name = unique("orders.order-orphaned");
    apply(
        &api,
        &name,
        json!({"partitions": 1, "deletionPolicy": "Delete"}),
    )
    .await
    .unwrap();
    // The topic exists and is this EventTopic's: deleting it must delete the topic.
    ready(&api, &name, 1, "True").await;
    assert!(
        api.get(&name).await.unwrap().metadata.finalizers.is_some(),
        "the finalizer"
    );
    let ns = api.get(&name).await.unwrap().metadata.namespace.unwrap();
    operator.stop().await;
    // Nothing listens on port 1: Kafka is gone for the next operator.
    let _operator = env.start_operator_with_kafka(&ns, "127.0.0.1:1");

    api.delete(&name, &Default::default()).await.unwrap();
    let message = eventually(TIMEOUT, "a condition saying how to let go", || async {
        let c = ready_condition(&api, &name).await?;
        c.message
            .contains(eventops_crds::RELEASE_FINALIZER_ANNOTATION)
            .then_some(c.message)
    })
    .await;
    assert!(message.contains("Kafka is unavailable"), "{message}");
    assert!(
        api.get_opt(&name).await.unwrap().is_some(),
        "held by the finalizer"
    );

    let patch =
        json!({"metadata": {"annotations": {eventops_crds::RELEASE_FINALIZER_ANNOTATION: "true"}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(TIMEOUT, "the EventTopic to go", || async {
        api.get_opt(&name).await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(
        env.topic_exists(&name).await,
        "a released topic stays in Kafka"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_paused_annotation_stops_reconciliation() {
    let (env, api, operator) = setup("et-paused").await;
    let topic = unique("orders.order-held");
    apply(&api, &topic, json!({"partitions": 2})).await.unwrap();
    ready(&api, &topic, 1, "True").await;

    let pause = json!({"metadata": {"annotations": {eventops_crds::PAUSED_ANNOTATION: "true"}}});
    api.patch(&topic, &PatchParams::default(), &Patch::Merge(&pause))
        .await
        .unwrap();
    eventually(TIMEOUT, "the Paused condition", || async {
        (condition(&api, &topic, "Paused").await? == ("True".into(), "Paused".into())).then_some(())
    })
    .await;
    // A paused EventTopic is reconciled only when it changes; an unpaused sibling keeps
    // the operator resyncing, so the window below proves the operator was running.
    let sibling = unique("orders.order-sibling");
    apply(&api, &sibling, json!({"partitions": 1}))
        .await
        .unwrap();
    ready(&api, &sibling, 1, "True").await;
    apply(&api, &topic, json!({"partitions": 4})).await.unwrap();
    // Resyncs pass without the change reaching Kafka.
    resyncs(&operator).await;
    assert_eq!(env.describe_topic(&topic).await.unwrap().partitions, 2);

    let resume = json!({"metadata": {"annotations": {eventops_crds::PAUSED_ANNOTATION: null}}});
    api.patch(&topic, &PatchParams::default(), &Patch::Merge(&resume))
        .await
        .unwrap();
    ready(&api, &topic, 2, "True").await;
    assert_eq!(env.describe_topic(&topic).await.unwrap().partitions, 4);
    assert_eq!(condition(&api, &topic, "Paused").await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_event_topics_for_one_kafka_topic_the_oldest_wins() {
    let (_env, api, _operator) = setup("et-conflict").await;
    let topic = unique("orders.order-claimed");
    // Creation timestamps have one-second resolution; on a tie the name decides, so "a-"
    // is the older either way.
    let first = format!("a-{topic}");
    let second = format!("b-{topic}");
    apply(&api, &first, json!({"partitions": 1, "topicName": topic}))
        .await
        .unwrap();
    ready(&api, &first, 1, "True").await;
    apply(&api, &second, json!({"partitions": 1, "topicName": topic}))
        .await
        .unwrap();

    let (reason, message) = ready(&api, &second, 1, "False").await;
    assert_eq!(reason, "ResourceConflict");
    assert!(
        message.contains(&first) && message.contains("spec.topicName"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        condition(&api, &first, "Ready").await,
        Some(("True".into(), "InSync".into()))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn naming_policy_is_reported_as_a_condition() {
    let (_env, api, _operator) = setup("et-naming").await;
    // Unique, and still <domain>.<aggregate>.<past-tense-verb>.
    let good = format!("{}.order.placed", unique("shop"));
    let good = good.as_str();
    let bad = unique("shop.order.place");
    apply(&api, good, json!({"partitions": 1})).await.unwrap();
    apply(&api, &bad, json!({"partitions": 1})).await.unwrap();
    ready(&api, good, 1, "True").await;
    ready(&api, &bad, 1, "True").await;
    assert_eq!(
        condition(&api, good, "NamingPolicy").await,
        Some(("True".into(), "Compliant".into()))
    );
    assert_eq!(
        condition(&api, &bad, "NamingPolicy").await,
        Some(("False".into(), "NonCompliant".into()))
    );
}

/// The Ready condition once it describes `generation`, whatever its status: (status,
/// reason, message).
async fn settled(api: &Api<EventTopic>, name: &str, generation: i64) -> (String, String, String) {
    eventually(
        TIMEOUT,
        &format!("EventTopic {name} Ready at generation {generation}"),
        || async {
            let st = api.get(name).await.ok()?.status?;
            let c = st.conditions.iter().find(|c| c.type_ == "Ready")?;
            (st.observed_generation == Some(generation)
                && c.observed_generation == Some(generation))
            .then(|| (c.status.clone(), c.reason.clone(), c.message.clone()))
        },
    )
    .await
}

fn annotate(key: &str, value: Option<&str>) -> Patch<serde_json::Value> {
    Patch::Merge(json!({"metadata": {"annotations": {key: value}}}))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_topic_that_no_event_topic_manages_is_adopted_only_when_asked() {
    let (env, api, operator) = setup("et-adopt").await;
    let topic = unique("billing.ledger.kept");
    create_by_hand(&env, &topic, &["cleanup.policy=compact", "retention.ms=-1"]).await;
    let by_hand = vec![
        "cleanup.policy=compact".to_string(),
        "retention.ms=-1".into(),
    ];
    assert_eq!(env.topic_configs(&topic).await, by_hand);

    let name = unique("ledger");
    apply(
        &api,
        &name,
        json!({"partitions": 1, "topicName": topic, "deadLetter": {"enabled": false}}),
    )
    .await
    .unwrap();
    let (status, reason, message) = settled(&api, &name, 1).await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "TopicExists"),
        "{message}; ConfigCommand now shows {:?}",
        env.topic_configs(&topic).await
    );
    assert!(
        message.contains("spec.topicName")
            && message.contains(&topic)
            && message.contains(eventops_crds::ADOPT_ANNOTATION),
        "{message}"
    );
    // Resyncs later, Kafka is still as its administrator left it.
    resyncs(&operator).await;
    assert_eq!(env.topic_configs(&topic).await, by_hand);

    api.patch(
        &name,
        &PatchParams::default(),
        &annotate(eventops_crds::ADOPT_ANNOTATION, Some("true")),
    )
    .await
    .unwrap();
    let (reason, _) = ready(&api, &name, 1, "True").await;
    assert_eq!(reason, "InSync");
    assert_eq!(
        env.topic_configs(&topic).await,
        by_hand,
        "adopting changes no config the spec does not name"
    );

    // Adopted for good: without the annotation, the topic is still this EventTopic's.
    api.patch(
        &name,
        &PatchParams::default(),
        &annotate(eventops_crds::ADOPT_ANNOTATION, None),
    )
    .await
    .unwrap();
    apply(
        &api,
        &name,
        json!({"partitions": 1, "topicName": topic, "deadLetter": {"enabled": false},
               "config": {"retention.ms": "86400000"}}),
    )
    .await
    .unwrap();
    ready(&api, &name, 2, "True").await;
    assert_eq!(
        env.topic_configs(&topic).await,
        ["cleanup.policy=compact", "retention.ms=86400000"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_dead_letter_topic_is_not_taken_and_nothing_is_created() {
    let (env, api, _operator) = setup("et-adopt-dlt").await;
    let topic = unique("billing.invoice.sent");
    let dlt = format!("{topic}.DLT");
    create_by_hand(&env, &dlt, &["retention.ms=-1"]).await;
    apply(&api, &topic, json!({"partitions": 1})).await.unwrap();
    let (status, reason, message) = settled(&api, &topic, 1).await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "TopicExists"),
        "{message}"
    );
    assert!(
        message.contains("spec.deadLetter.topicName") && message.contains(&dlt),
        "{message}"
    );
    assert!(
        !env.topic_exists(&topic).await,
        "an EventTopic that cannot have all its topics creates none"
    );
    assert_eq!(env.topic_configs(&dlt).await, ["retention.ms=-1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_the_operator_created_stay_managed_across_restarts() {
    let env = env().await;
    let ns = env.namespace("et-restart").await;
    let api: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let topic = unique("orders.order-restarted");
    let operator = env.start_operator(&ns);
    apply(
        &api,
        &topic,
        json!({"partitions": 1, "retry": {"delays": ["30s"]}}),
    )
    .await
    .unwrap();
    ready(&api, &topic, 1, "True").await;
    drop(operator);

    let _operator = env.start_operator(&ns);
    apply(
        &api,
        &topic,
        json!({"partitions": 2, "retry": {"delays": ["30s"]}, "config": {"retention.ms": "7200000"}}),
    )
    .await
    .unwrap();
    let (reason, _) = ready(&api, &topic, 2, "True").await;
    assert_eq!(reason, "InSync");
    assert_eq!(env.topic_configs(&topic).await, ["retention.ms=7200000"]);
    assert_eq!(
        env.describe_topic(&format!("{topic}.DLT"))
            .await
            .unwrap()
            .partitions,
        2
    );
    assert_eq!(
        env.describe_topic(&format!("{topic}.retry-30s"))
            .await
            .unwrap()
            .partitions,
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn configs_kafka_refuses_are_named_with_kafkas_words() {
    let (env, api, _operator) = setup("et-badconfig").await;
    // Refused before Kafka is asked: a value that cannot be right.
    let checked = unique("orders.order-checked");
    apply(
        &api,
        &checked,
        json!({"partitions": 1, "config": {"cleanup.policy": "banana"}}),
    )
    .await
    .unwrap();
    let (status, reason, message) = settled(&api, &checked, 1).await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "InvalidSpec"),
        "{message}"
    );
    assert!(
        message.contains(r#"spec.config["cleanup.policy"]"#)
            && message.contains("cleanup.policy: banana"),
        "{message}"
    );
    assert!(!env.topic_exists(&checked).await);

    // Refused by Kafka at creation: an unknown key, among valid ones.
    let created = unique("orders.order-unknown");
    apply(
        &api,
        &created,
        json!({"partitions": 1, "config": {"retention.ms": "60000", "retention.msx": "1"}}),
    )
    .await
    .unwrap();
    let (status, reason, message) = settled(&api, &created, 1).await;
    assert_eq!(status, "False", "{message}");
    assert!(
        message.contains(r#"spec.config["retention.msx"]"#) && message.contains("retention.msx: 1"),
        "{reason}: {message}"
    );
    assert!(!env.topic_exists(&created).await);

    // Refused by Kafka when altering an existing topic: the dead-letter topic's config.
    let altered = unique("orders.order-altered");
    apply(&api, &altered, json!({"partitions": 1}))
        .await
        .unwrap();
    ready(&api, &altered, 1, "True").await;
    apply(
        &api,
        &altered,
        json!({"partitions": 1, "deadLetter": {"config": {"segment.bytes": "1"}}}),
    )
    .await
    .unwrap();
    let (status, reason, message) = settled(&api, &altered, 2).await;
    assert_eq!(status, "False", "{message}");
    assert!(
        message.contains(r#"spec.deadLetter.config["segment.bytes"]"#)
            && message.contains("segment.bytes: 1")
            && message.contains(&format!("{altered}.DLT")),
        "{reason}: {message}"
    );
    assert_eq!(
        env.topic_configs(&format!("{altered}.DLT")).await,
        Vec::<String>::new()
    );
}

/// `TopicCommand --create` of `topic` with one partition and `configs`, as an
/// administrator (the super user) would.
async fn create_by_hand(env: &TestEnv, topic: &str, configs: &[&str]) {
    let mut args = vec!["--create", "--topic", topic, "--partitions", "1"];
    for c in configs {
        args.extend(["--config", c]);
    }
    env.kafka_tool("org.apache.kafka.tools.TopicCommand", &args)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_event_topic_never_takes_a_topic_another_one_manages() {
    let (env, api, operator) = setup("et-takeover").await;
    let theirs = unique("orders.order-theirs");
    // "a-" is the older either way (creation timestamps have one-second resolution).
    let older = unique("a-older");
    let younger = unique("b-younger");
    let mine = unique("orders.order-mine");
    apply(&api, &older, json!({"partitions": 1, "topicName": mine}))
        .await
        .unwrap();
    ready(&api, &older, 1, "True").await;
    apply(
        &api,
        &younger,
        json!({"partitions": 1, "topicName": theirs}),
    )
    .await
    .unwrap();
    ready(&api, &younger, 1, "True").await;
    assert_eq!(env.topic_configs(&theirs).await, Vec::<String>::new());

    // The older EventTopic names the younger one's topic as its dead-letter topic (the
    // main topic's name is immutable), even asking to adopt.
    api.patch(
        &older,
        &PatchParams::default(),
        &annotate(eventops_crds::ADOPT_ANNOTATION, Some("true")),
    )
    .await
    .unwrap();
    apply(
        &api,
        &older,
        json!({"partitions": 1, "topicName": mine,
               "deadLetter": {"topicName": theirs, "config": {"retention.ms": "1000"}}}),
    )
    .await
    .unwrap();
    let (status, reason, message) = settled(&api, &older, 2).await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "ResourceConflict"),
        "{message}; ConfigCommand shows {:?}",
        env.topic_configs(&theirs).await
    );
    assert!(
        message.contains(&younger) && message.contains(&theirs),
        "{message}"
    );
    // Resyncs later the manager still has it, untouched.
    resyncs(&operator).await;
    assert_eq!(
        condition(&api, &younger, "Ready").await,
        Some(("True".into(), "InSync".into()))
    );
    assert_eq!(env.topic_configs(&theirs).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_topic_created_by_someone_else_after_a_refused_create_is_not_taken() {
    let (env, api, operator) = setup("et-refused-claim").await;
    let topic = unique("billing.ledger.raced");
    let name = unique("ledger");
    // Kafka refuses to create it: an unknown config key.
    apply(
        &api,
        &name,
        json!({"partitions": 1, "topicName": topic, "deadLetter": {"enabled": false},
               "config": {"retention.msx": "1"}}),
    )
    .await
    .unwrap();
    let (status, _, message) = settled(&api, &name, 1).await;
    assert_eq!(status, "False", "{message}");
    assert!(!env.topic_exists(&topic).await);

    // Meanwhile an administrator creates that topic for something else.
    create_by_hand(&env, &topic, &["cleanup.policy=compact", "retention.ms=-1"]).await;
    apply(
        &api,
        &name,
        json!({"partitions": 1, "topicName": topic, "deadLetter": {"enabled": false},
               "config": {"retention.ms": "86400000"}}),
    )
    .await
    .unwrap();
    let (status, reason, message) = settled(&api, &name, 2).await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "TopicExists"),
        "{message}; ConfigCommand shows {:?}",
        env.topic_configs(&topic).await
    );
    resyncs(&operator).await;
    assert_eq!(
        env.topic_configs(&topic).await,
        ["cleanup.policy=compact", "retention.ms=-1"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn configs_an_adopted_topic_already_had_stay_when_the_spec_drops_them() {
    let (env, api, _operator) = setup("et-adopt-keys").await;
    let topic = unique("billing.ledger.adopted");
    create_by_hand(&env, &topic, &["cleanup.policy=compact", "retention.ms=-1"]).await;
    let name = unique("ledger");
    api.create(
        &Default::default(),
        &serde_json::from_value(json!({
            "apiVersion": "eventops.dev/v1alpha1", "kind": "EventTopic",
            "metadata": {"name": name,
                         "annotations": {eventops_crds::ADOPT_ANNOTATION: "true"}},
            "spec": {"partitions": 1, "topicName": topic, "deadLetter": {"enabled": false},
                     "config": {"cleanup.policy": "compact", "retention.ms": "86400000",
                                "segment.ms": "3600000"}},
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    ready(&api, &name, 1, "True").await;
    assert_eq!(
        env.topic_configs(&topic).await,
        [
            "cleanup.policy=compact",
            "retention.ms=86400000",
            "segment.ms=3600000"
        ]
    );

    // The spec drops every key: only the one EventOps added goes. The administrator's
    // keys keep their last value (deleting cleanup.policy=compact would turn the ledger
    // over to time-based deletion).
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"config": null}})),
    )
    .await
    .unwrap();
    ready(&api, &name, 2, "True").await;
    assert_eq!(
        env.topic_configs(&topic).await,
        ["cleanup.policy=compact", "retention.ms=86400000"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_status_from_before_managed_topics_never_lets_a_paused_edit_delete_a_foreign_topic() {
    let env = env().await;
    let ns = env.namespace("et-legacy").await;
    let api: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let ours = unique("orders.order-legacy");
    let foreign = unique("billing.ledger.foreign");
    let ours_dlt = format!("{ours}.DLT");
    create_by_hand(&env, &ours, &[]).await;
    create_by_hand(&env, &ours_dlt, &[]).await;
    create_by_hand(&env, &foreign, &["retention.ms=-1"]).await;

    // What an operator from before status.managedTopics left: its topics in sync, its
    // finalizer on. Then reconciliation is paused and the dead-letter topic's name edited
    // to a foreign topic.
    let name = unique("legacy");
    api.create(
        &Default::default(),
        &serde_json::from_value(json!({
            "apiVersion": "eventops.dev/v1alpha1", "kind": "EventTopic",
            "metadata": {"name": name, "finalizers": [eventops_crds::TOPIC_FINALIZER],
                         "annotations": {eventops_crds::PAUSED_ANNOTATION: "true"}},
            "spec": {"partitions": 1, "topicName": ours, "deletionPolicy": "Delete"},
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "observedGeneration": 1, "topicName": ours, "deadLetterTopic": ours_dlt,
            "partitions": 1,
            "conditions": [{"type": "Ready", "status": "True", "reason": "InSync",
                            "message": "in sync", "observedGeneration": 1,
                            "lastTransitionTime": now}],
        }})),
    )
    .await
    .unwrap();
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"deadLetter": {"topicName": foreign}}})),
    )
    .await
    .unwrap();

    let _operator = env.start_operator(&ns);
    eventually(TIMEOUT, "the paused pass", || async {
        condition(&api, &name, "Paused").await.map(|_| ())
    })
    .await;
    api.delete(&name, &Default::default()).await.unwrap();
    eventually(TIMEOUT, &format!("EventTopic {name} gone"), || async {
        api.get_opt(&name).await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(
        env.topic_exists(&foreign).await,
        "deleting the EventTopic deleted {foreign}, a topic it never managed"
    );
    assert_eq!(env.topic_configs(&foreign).await, ["retention.ms=-1"]);
    for topic in [&ours, &ours_dlt] {
        assert!(
            !env.topic_exists(topic).await,
            "deletionPolicy: Delete deletes {topic}, which it managed"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_is_corrected_again_after_a_correction_that_claimed_a_key() {
    let (env, api, _operator) = setup("et-drift-again").await;
    let topic = unique("billing.ledger.drifting");
    create_by_hand(&env, &topic, &["cleanup.policy=compact"]).await;
    let name = unique("ledger");
    api.create(
        &Default::default(),
        &serde_json::from_value(json!({
            "apiVersion": "eventops.dev/v1alpha1", "kind": "EventTopic",
            "metadata": {"name": name,
                         "annotations": {eventops_crds::ADOPT_ANNOTATION: "true"}},
            "spec": {"partitions": 1, "topicName": topic, "deadLetter": {"enabled": false},
                     "config": {"cleanup.policy": "compact", "retention.ms": "86400000"}},
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    ready(&api, &name, 1, "True").await;
    let in_spec = ["cleanup.policy=compact", "retention.ms=86400000"];
    assert_eq!(env.topic_configs(&topic).await, in_spec);

    // The administrator deletes their own key, which the spec names: the operator puts it
    // back, and from then on it is EventOps' key (a claim with nothing else changed).
    let config = |args: &[&str]| {
        let mut all = vec![
            "--alter",
            "--entity-type",
            "topics",
            "--entity-name",
            &topic,
        ];
        all.extend(args);
        let all: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        let env = &env;
        async move {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            env.kafka_tool("kafka.admin.ConfigCommand", &all)
                .await
                .unwrap();
        }
    };
    config(&["--delete-config", "cleanup.policy"]).await;
    eventually(TIMEOUT, "cleanup.policy put back", || async {
        (env.topic_configs(&topic).await == in_spec).then_some(())
    })
    .await;
    // And the next change behind its back is corrected too.
    config(&["--add-config", "retention.ms=1000"]).await;
    eventually(TIMEOUT, "retention.ms put back", || async {
        (env.topic_configs(&topic).await == in_spec).then_some(())
    })
    .await;
}
