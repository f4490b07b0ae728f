//! The namespace ownership policy end to end: the operator started with
//! `--namespace-prefixes` refuses EventTopics and ConsumerGroups naming what their
//! namespace may not own, and Kafka (asked with its own TopicCommand) is left alone.
//! Every other test runs the operator without a policy, the permissive default.

use std::time::Duration;

use eventops_crds::{ConsumerGroup, EventTopic};
use eventops_tests::{TestEnv, apply, env, eventually, unique};
use kube::Api;
use serde_json::json;
use tokio::sync::oneshot;

const TIMEOUT: Duration = Duration::from_secs(60);

/// The operator, in this process, watching `namespace` with `policy`; stops when dropped.
struct Operator {
    _stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_operator(env: &TestEnv, namespace: &str, policy: &[&str]) -> Operator {
    let mut config = eventops_operator::config::RunConfig::new(&env.info.kafka_bootstrap);
    config.kafka_username = Some(env.info.kafka_admin_user.clone());
    config.kafka_password = Some(env.info.kafka_admin_password.clone());
    config.kafka_sasl_mechanism = env.info.kafka_sasl_mechanism.clone();
    config.namespace = Some(namespace.to_string());
    config.resync_interval = Duration::from_secs(2).into();
    config.namespace_prefixes = policy
        .iter()
        .map(|e| eventops_operator::policy::parse_entry(e).unwrap())
        .collect();
    let (stop, stopped) = oneshot::channel::<()>();
    let client = env.client.clone();
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        eventops_operator::run(client, &config, Default::default(), shutdown)
            .await
            .expect("operator failed");
    });
    Operator { _stop: stop, task }
}

/// The Ready condition once it describes generation 1: (status, reason, message).
async fn settled<K>(api: &Api<K>, name: &str) -> (String, String, String)
where
    K: eventops_tests::HasConditions
        + kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    eventually(
        TIMEOUT,
        &format!("{name} Ready at generation 1"),
        || async {
            let obj = api.get(name).await.ok()?;
            let c = obj.conditions().into_iter().find(|c| c.type_ == "Ready")?;
            (c.observed_generation == Some(1)).then_some((c.status, c.reason, c.message))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn names_outside_the_namespaces_prefixes_are_refused() {
    let env = env().await;
    let ns = env.namespace("policy").await;
    // A prefix of its own, so that runs and tests never share names.
    let prefix = format!("{}.", unique("team"));
    let entry = format!("{ns}={prefix}");
    let _operator = start_operator(&env, &ns, &[&entry, "*=sandbox."]);
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);

    let allowed = format!("{prefix}orders.placed");
    apply(
        &topics,
        "allowed",
        json!({"partitions": 1, "topicName": allowed}),
    )
    .await
    .unwrap();
    let foreign = unique("billing.ledger.kept");
    apply(
        &topics,
        "foreign",
        json!({"partitions": 1, "topicName": foreign}),
    )
    .await
    .unwrap();
    let foreign_dlt = unique("billing.dead.letters");
    apply(
        &topics,
        "foreign-dlt",
        json!({"partitions": 1, "topicName": format!("{prefix}orders.paid"),
               "deadLetter": {"topicName": foreign_dlt}}),
    )
    .await
    .unwrap();

    let (status, reason, message) = settled(&topics, "allowed").await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "InSync"),
        "{message}"
    );
    assert!(env.topic_exists(&allowed).await);

    let (status, reason, message) = settled(&topics, "foreign").await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NotPermitted"),
        "{message}"
    );
    assert!(
        message.contains("spec.topicName")
            && message.contains(&foreign)
            && message.contains("namespace policy")
            && message.contains(&prefix),
        "{message}"
    );
    let (status, reason, message) = settled(&topics, "foreign-dlt").await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NotPermitted"),
        "{message}"
    );
    assert!(message.contains("spec.deadLetter.topicName"), "{message}");
    let listed = env
        .kafka_tool("org.apache.kafka.tools.TopicCommand", &["--list"])
        .await
        .unwrap();
    for refused in [&foreign, &foreign_dlt, &format!("{prefix}orders.paid")] {
        assert!(
            !listed.lines().any(|l| l == refused),
            "{refused} was created"
        );
    }

    let group_id = unique("checkout.workers");
    apply(
        &groups,
        "foreign-group",
        json!({"topics": ["allowed"], "groupId": group_id, "template": {"image": "worker:1"}}),
    )
    .await
    .unwrap();
    let (status, reason, message) = settled(&groups, "foreign-group").await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NotPermitted"),
        "{message}"
    );
    assert!(
        message.contains("spec.groupId") && message.contains(&group_id),
        "{message}"
    );
}
