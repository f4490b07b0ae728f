//! A ConsumerGroup applied to the real API server becomes a worker Deployment and a
//! credentials Secret, with the environment contract the consumer runtime reads.

use std::time::Duration;

use eventops_consumer_runtime::contract;
use eventops_crds::{ConsumerGroup, EventTopic};
use eventops_tests::{TestEnv, apply, env, eventually, unique, wait_ready};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

struct Setup {
    env: TestEnv,
    ns: String,
    groups: Api<ConsumerGroup>,
    topics: Api<EventTopic>,
    operator: eventops_tests::OperatorHandle,
}

async fn setup(prefix: &str) -> Setup {
    let env = env().await;
    let ns = env.namespace(prefix).await;
    let operator = env.start_operator(&ns);
    Setup {
        groups: Api::namespaced(env.client.clone(), &ns),
        topics: Api::namespaced(env.client.clone(), &ns),
        env,
        ns,
        operator,
    }
}

fn env_value(d: &Deployment, name: &str) -> Option<String> {
    let pod = d.spec.template.spec.as_ref()?;
    let env = pod.containers[0].env.as_ref()?;
    env.iter().find(|e| e.name == name)?.value.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_group_becomes_a_deployment_with_the_worker_contract() {
    let s = setup("cg-deploy").await;
    let topic = unique("orders.order-placed");
    apply(
        &s.topics,
        "orders",
        json!({"partitions": 3, "topicName": topic}),
    )
    .await
    .unwrap();
    apply(
        &s.groups,
        "inventory",
        json!({"topics": ["orders"], "template": {"image": "inventory:1", "args": ["--fast"]},
               "processing": {"maxAttempts": 5}}),
    )
    .await
    .unwrap();
    wait_ready(&s.groups, "inventory", "True").await;

    let deployments: Api<Deployment> = Api::namespaced(s.env.client.clone(), &s.ns);
    let d = deployments.get("inventory").await.unwrap();
    let owner = &d.metadata.owner_references.clone().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("ConsumerGroup", "inventory")
    );
    assert_eq!(
        env_value(&d, contract::GROUP_ID).as_deref(),
        Some("inventory")
    );
    assert_eq!(env_value(&d, contract::MAX_ATTEMPTS).as_deref(), Some("5"));
    let routes: Vec<contract::TopicRoute> =
        serde_json::from_str(&env_value(&d, contract::TOPICS).unwrap()).unwrap();
    assert_eq!(routes[0].topic, topic);
    assert_eq!(routes[0].dead_letter_topic, Some(format!("{topic}.DLT")));

    eventually(TIMEOUT, "the EventTopic to list its consumer", || async {
        let consumers = s.topics.get("orders").await.ok()?.status?.consumers;
        (consumers == ["inventory"]).then_some(())
    })
    .await;

    let secrets: Api<Secret> = Api::namespaced(s.env.client.clone(), &s.ns);
    let secret = secrets.get("inventory-kafka").await.unwrap();
    let data = secret.data.unwrap();
    let user = String::from_utf8(data["username"].0.clone()).unwrap();
    assert_eq!(user, format!("eventops.{}.inventory", s.ns));
    assert_eq!(data["password"].0.len(), 64);
    assert_eq!(
        secret.metadata.owner_references.unwrap()[0].name,
        "inventory"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_waits_for_a_missing_topic_and_recovers_when_it_appears() {
    let s = setup("cg-missing").await;
    apply(
        &s.groups,
        "payment",
        json!({"topics": ["payments"], "template": {"image": "payment:1"}}),
    )
    .await
    .unwrap();
    let (reason, message) = wait_ready(&s.groups, "payment", "False").await;
    assert_eq!(reason, "TopicNotFound");
    assert!(
        message.contains("spec.topics") && message.contains("payments"),
        "{message}"
    );

    apply(
        &s.topics,
        "payments",
        json!({"partitions": 1, "topicName": unique("payments.payment-captured")}),
    )
    .await
    .unwrap();
    wait_ready(&s.groups, "payment", "True").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resyncs_write_nothing_and_replicas_are_left_to_the_autoscaler() {
    let s = setup("cg-quiet").await;
    apply(
        &s.topics,
        "orders",
        json!({"partitions": 4, "topicName": unique("orders.order-quiet")}),
    )
    .await
    .unwrap();
    apply(
        &s.groups,
        "notify",
        json!({"topics": ["orders"], "template": {"image": "notify:1"}}),
    )
    .await
    .unwrap();
    wait_ready(&s.groups, "notify", "True").await;
    let deployments: Api<Deployment> = Api::namespaced(s.env.client.clone(), &s.ns);
    let secrets: Api<Secret> = Api::namespaced(s.env.client.clone(), &s.ns);

    // The autoscaler's move, through the scale subresource.
    let scale = json!({"spec": {"replicas": 3}});
    deployments
        .patch_scale("notify", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .unwrap();
    eventually(
        TIMEOUT,
        "status.replicas to follow the Deployment",
        || async {
            let status = s.groups.get("notify").await.ok()?.status?;
            // The autoscaler holds a count set by hand for its scale-down window.
            (status.replicas == Some(3) && status.desired_replicas == Some(3)).then_some(())
        },
    )
    .await;
    let versions = |cg: &ConsumerGroup, d: &Deployment, sec: &Secret| {
        (
            cg.metadata.resource_version.clone(),
            d.metadata.generation,
            sec.metadata.resource_version.clone(),
        )
    };
    let before = versions(
        &s.groups.get("notify").await.unwrap(),
        &deployments.get("notify").await.unwrap(),
        &secrets.get("notify-kafka").await.unwrap(),
    );
    let writes_before = s.operator.metrics.writes();
    let resyncs = |m: &eventops_operator::telemetry::Metrics| {
        (m.reconciles("eventtopic"), m.reconciles("consumergroup"))
    };
    let resyncs_before = resyncs(&s.operator.metrics);
    // Several 2-second resyncs of both EventTopic and ConsumerGroup.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let resyncs_after = resyncs(&s.operator.metrics);
    assert!(
        resyncs_after.0 > resyncs_before.0 && resyncs_after.1 > resyncs_before.1,
        "resyncs of both ran in the window: {resyncs_before:?} -> {resyncs_after:?}"
    );
    assert_eq!(
        s.operator.metrics.writes(),
        writes_before,
        "no request that changes Kubernetes or Kafka is sent:\n{}",
        s.operator.metrics.encode()
    );
    let d = deployments.get("notify").await.unwrap();
    let after = versions(
        &s.groups.get("notify").await.unwrap(),
        &d,
        &secrets.get("notify-kafka").await.unwrap(),
    );
    assert_eq!(
        before, after,
        "a resync that finds nothing to change writes nothing"
    );
    assert_eq!(d.spec.replicas, Some(3), "replicas are not fought over");
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_rotate_on_request_and_roll_the_workers() {
    let s = setup("cg-rotate").await;
    apply(
        &s.topics,
        "orders",
        json!({"partitions": 1, "topicName": unique("orders.order-rotated")}),
    )
    .await
    .unwrap();
    apply(
        &s.groups,
        "billing",
        json!({"topics": ["orders"], "template": {"image": "billing:1"}}),
    )
    .await
    .unwrap();
    wait_ready(&s.groups, "billing", "True").await;
    let secrets: Api<Secret> = Api::namespaced(s.env.client.clone(), &s.ns);
    let deployments: Api<Deployment> = Api::namespaced(s.env.client.clone(), &s.ns);
    let password = |sec: Secret| sec.data.unwrap()["password"].0.clone();
    let before = password(secrets.get("billing-kafka").await.unwrap());
    let template_version = |d: Deployment| {
        d.spec.template.metadata.unwrap().annotations.unwrap()["eventops.dev/credentials-version"]
            .clone()
    };
    let version_before = template_version(deployments.get("billing").await.unwrap());

    let rotate =
        json!({"metadata": {"annotations": {"eventops.dev/rotate-credentials": "2026-11-22"}}});
    s.groups
        .patch("billing", &PatchParams::default(), &Patch::Merge(&rotate))
        .await
        .unwrap();
    let after = eventually(TIMEOUT, "a new password", || async {
        let p = password(secrets.get("billing-kafka").await.ok()?);
        (p != before).then_some(p)
    })
    .await;
    assert_eq!(after.len(), 64);
    // The pod template follows the new password, so workers restart with it.
    let expected = eventops_operator::consumergroup::build::credentials_version(
        &String::from_utf8(after).unwrap(),
    );
    assert_ne!(expected, version_before);
    eventually(
        TIMEOUT,
        "the pod template to carry the new version",
        || async {
            let d = deployments.get("billing").await.ok()?;
            (template_version(d) == expected).then_some(())
        },
    )
    .await;
    let reasons = s.env.event_reasons(&s.ns, "billing").await;
    assert!(
        reasons.contains(&"CredentialsRotated".to_string()),
        "{reasons:?}"
    );
}

/// A Deployment and a Secret named like a group's but made by somebody else (another
/// team's, a Helm release's) are neither changed nor read: the group says which object
/// is in the way, and its Kafka user never gets the password stored there.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_never_takes_over_a_deployment_or_secret_it_does_not_control() {
    let s = setup("cg-foreign").await;
    apply(
        &s.topics,
        "orders",
        json!({"partitions": 1, "topicName": unique("orders.order-foreign")}),
    )
    .await
    .unwrap();
    // The topic first, so the group's first verdict is about the objects in its way.
    wait_ready(&s.topics, "orders", "True").await;
    let deployments: Api<Deployment> = Api::namespaced(s.env.client.clone(), &s.ns);
    let secrets: Api<Secret> = Api::namespaced(s.env.client.clone(), &s.ns);
    let params = PatchParams::apply("another-team").force();
    let foreign_deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "ledger", "labels": {"app": "ledger"}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "ledger"}},
            "template": {
                "metadata": {"labels": {"app": "ledger"}},
                "spec": {"containers": [{"name": "ledger", "image": "ledger:7"}]}
            }
        }
    });
    deployments
        .patch("ledger", &params, &Patch::Apply(&foreign_deployment))
        .await
        .unwrap();
    let foreign_password = "another-teams-password";
    let foreign_secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "ledger-kafka"},
        "stringData": {"password": foreign_password}
    });
    secrets
        .patch("ledger-kafka", &params, &Patch::Apply(&foreign_secret))
        .await
        .unwrap();

    apply(
        &s.groups,
        "ledger",
        json!({"topics": ["orders"], "template": {"image": "ledger-worker:1"}}),
    )
    .await
    .unwrap();
    let (reason, message) = wait_ready(&s.groups, "ledger", "False").await;
    assert_eq!(reason, "ResourceConflict", "{message}");
    assert!(
        message.contains(&format!("Deployment {}/ledger", s.ns)),
        "{message}"
    );

    // Neither object was touched.
    let d = deployments.get("ledger").await.unwrap();
    assert_eq!(d.metadata.owner_references, None);
    let pod = d.spec.template.spec.unwrap();
    assert_eq!(pod.containers[0].image.as_deref(), Some("ledger:7"));
    let secret = secrets.get("ledger-kafka").await.unwrap();
    assert_eq!(secret.metadata.owner_references, None);
    let data = secret.data.unwrap();
    assert_eq!(data["password"].0, foreign_password.as_bytes());
    assert_eq!(data.len(), 1, "no key was added: {:?}", data.keys());

    // The Deployment goes; the Secret is still somebody else's.
    deployments
        .delete("ledger", &Default::default())
        .await
        .unwrap();
    let message = eventually(TIMEOUT, "the conflict to name only the Secret", || async {
        let cg = s.groups.get("ledger").await.ok()?;
        let c = eventops_tests::HasConditions::conditions(&cg)
            .into_iter()
            .find(|c| c.type_ == "Ready")?;
        let deployment_named = c.message.contains(&format!("Deployment {}/ledger", s.ns));
        (c.reason == "ResourceConflict" && !deployment_named).then_some(c.message)
    })
    .await;
    assert!(
        message.contains(&format!("Secret {}/ledger-kafka", s.ns)),
        "{message}"
    );
    assert!(
        deployments.get_opt("ledger").await.unwrap().is_none(),
        "no Deployment is made while the Secret is in the way"
    );
    let data = secrets.get("ledger-kafka").await.unwrap().data.unwrap();
    assert_eq!(data["password"].0, foreign_password.as_bytes());

    // Once the Secret goes too, the group makes its own, with a fresh password.
    secrets
        .delete("ledger-kafka", &Default::default())
        .await
        .unwrap();
    wait_ready(&s.groups, "ledger", "True").await;
    let secret = secrets.get("ledger-kafka").await.unwrap();
    assert_eq!(secret.metadata.owner_references.unwrap()[0].name, "ledger");
    let password = secret.data.unwrap()["password"].0.clone();
    assert_ne!(password, foreign_password.as_bytes());
    assert_eq!(password.len(), 64);
}

/// An EventTopic `orders` with `spec` and a group `inventory` consuming it, both there
/// before the operator starts, the group with its finalizer already (as a restore from
/// a backup has it), so that the group's first pass goes straight to its EventTopics:
/// it comes while the EventTopic's first pass (talking to Kafka) is under way, not after
/// the finalizer's round trip.
async fn group_applied_with_its_event_topic(
    prefix: &str,
    spec: serde_json::Value,
) -> (
    TestEnv,
    String,
    Api<ConsumerGroup>,
    eventops_tests::OperatorHandle,
) {
    let env = env().await;
    let ns = env.namespace(prefix).await;
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);
    apply(&topics, "orders", spec).await.unwrap();
    let group: ConsumerGroup = serde_json::from_value(json!({
        "apiVersion": "eventops.dev/v1alpha1", "kind": "ConsumerGroup",
        "metadata": {"name": "inventory",
                     "finalizers": ["eventops.dev/delete-kafka-credentials"]},
        "spec": {"topics": ["orders"], "template": {"image": "inventory:1"}},
    }))
    .unwrap();
    groups.create(&Default::default(), &group).await.unwrap();
    let operator = env.start_operator(&ns);
    (env, ns, groups, operator)
}

/// The group's Ready condition (status and reason) once it is `status`, within 20 s: well
/// inside the minute a quiet wait lasts at most.
async fn ready_soon(groups: &Api<ConsumerGroup>, status: &str) -> (String, String) {
    eventually(
        Duration::from_secs(20),
        "the group's Ready condition",
        || async {
            let group = groups.get("inventory").await.ok()?;
            let ready = eventops_tests::HasConditions::conditions(&group)
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (ready.status == status).then_some((ready.reason, ready.message))
        },
    )
    .await
}

/// Whether the operator counted a quiet wait of a group (so that the test's order of
/// events was the one it means to test: the group's pass came first).
fn waited_quietly(operator: &eventops_tests::OperatorHandle) -> bool {
    operator
        .metrics
        .encode()
        .contains(r#"reconcile_waits_total{controller="consumergroup",reason="TopicPending"}"#)
}

/// A group applied together with its EventTopic (as `kubectl apply -f dir/` and GitOps
/// do) waits for it without a word: no `TopicNotFound` Warning about a topic that is on
/// its way, then Ready.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_applied_with_its_event_topic_waits_for_it_without_a_warning() {
    let topic = unique("orders.order-placed");
    let (env, ns, groups, operator) = group_applied_with_its_event_topic(
        "cg-quiet",
        json!({"partitions": 2, "topicName": topic}),
    )
    .await;
    ready_soon(&groups, "True").await;
    let events = eventually(TIMEOUT, "the group's InSync Event", || async {
        let events = env.events(&ns, "inventory").await;
        events.iter().any(|(r, _)| r == "InSync").then_some(events)
    })
    .await;
    assert!(
        !events.iter().any(|(reason, _)| reason == "TopicNotFound"),
        "{events:?}"
    );
    assert!(waited_quietly(&operator), "{}", operator.metrics.encode());
    assert!(
        !operator
            .metrics
            .encode()
            .contains("reconcile_failures_total{controller=\"consumergroup\""),
        "a quiet wait is no failure: {}",
        operator.metrics.encode()
    );
}

/// A quiet wait ends as soon as the EventTopic is refused (its first status), not after
/// the minute: the group then says why it waits.
#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_wait_ends_when_the_event_topic_is_refused() {
    let env = env().await;
    // A topic somebody made by hand: the EventTopic naming it is refused (TopicExists).
    let topic = unique("orders.by-hand");
    env.kafka_tool(
        "org.apache.kafka.tools.TopicCommand",
        &["--create", "--topic", &topic, "--partitions", "1"],
    )
    .await
    .unwrap();
    let (_env, _ns, groups, operator) = group_applied_with_its_event_topic(
        "cg-quiet-refused",
        json!({"partitions": 1, "topicName": topic}),
    )
    .await;
    let (reason, message) = ready_soon(&groups, "False").await;
    assert_eq!(reason, "TopicNotFound", "{message}");
    assert!(waited_quietly(&operator), "{}", operator.metrics.encode());
}
