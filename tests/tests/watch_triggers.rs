//! With the resync interval at an hour, every reconcile in these tests comes from a watch
//! event. The operator reacts to spec and metadata changes and to deletions, and to the
//! status changes it acts on (an EventTopic coming to own its topics, a Deployment's
//! replica count), but not to status changes alone. These tests show that nothing it
//! must react to is filtered away: a deleted Deployment is put back, so is the label
//! that the operator's watch of Deployments selects by, and a deleted EventTopic's
//! grants are revoked within seconds, not at the next resync.
//! Oracles: the objects as the API server returns them and Kafka's AclCommand (super
//! user, checking only).

use std::time::Duration;

use eventops_crds::{ConsumerGroup, EventTopic};
use eventops_tests::{apply, env, eventually, unique, wait_ready};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use serde_json::json;

/// Far below the hour-long resync interval.
const TIMEOUT: Duration = Duration::from_secs(45);

#[tokio::test(flavor = "multi_thread")]
async fn deletions_and_ownership_start_reconciles_without_a_resync() {
    let env = env().await;
    let ns = env.namespace("triggers").await;
    let _operator = env.start_operator_without_resync(&ns);
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);

    // The group is applied first: it waits for its EventTopic, and goes on when the
    // EventTopic's status says it owns its topic (a status change).
    let topic = unique("triggers.orders");
    apply(
        &groups,
        "billing",
        json!({"topics": ["orders"], "template": {"image": "worker:1"}}),
    )
    .await
    .unwrap();
    let (reason, _) = wait_ready(&groups, "billing", "False").await;
    assert_eq!(reason, "TopicNotFound");
    // deletionPolicy Retain (the default): no finalizer, so deleting it below is one
    // DELETED event, nothing else.
    apply(
        &topics,
        "orders",
        json!({"partitions": 2, "topicName": topic}),
    )
    .await
    .unwrap();
    wait_ready(&topics, "orders", "True").await;
    wait_ready(&groups, "billing", "True").await;
    let user = env.group_user(&ns, "billing").await;
    let acls = || env.acls_of(&user);
    eventually(TIMEOUT, "the group's grant on its topic", || async {
        acls()
            .await
            .contains(&format!("name={topic},"))
            .then_some(())
    })
    .await;

    // The Deployment is deleted as `kubectl delete` does (background propagation: no
    // finalizer, no deletionTimestamp first): it is put back.
    let uid = deployments.get("billing").await.unwrap().metadata.uid;
    deployments
        .delete("billing", &Default::default())
        .await
        .unwrap();
    eventually(TIMEOUT, "the Deployment put back", || async {
        let d = deployments.get_opt("billing").await.ok()??;
        (d.metadata.uid != uid).then_some(())
    })
    .await;

    // Somebody removes the group label the operator finds its Deployment by (its watch
    // then sees the Deployment go): the label is put back, and the autoscaler, which
    // reads the same cache, keeps the Deployment.
    let label = "eventops.dev/consumer-group";
    deployments
        .patch(
            "billing",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {label: null}}})),
        )
        .await
        .unwrap();
    eventually(TIMEOUT, "the group label put back", || async {
        let d = deployments.get("billing").await.ok()?;
        (d.metadata.labels?.get(label)? == "billing").then_some(())
    })
    .await;

    // The EventTopic goes: the group loses its grant on the topic and says why.
    topics.delete("orders", &Default::default()).await.unwrap();
    let (reason, message) = wait_ready(&groups, "billing", "False").await;
    assert_eq!(reason, "TopicNotFound", "{message}");
    eventually(TIMEOUT, "the grant on the topic revoked", || async {
        (!acls().await.contains(&format!("name={topic},"))).then_some(())
    })
    .await;
}
