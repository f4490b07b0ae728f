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

/// It runs as a Kafka user of its own with exactly the documented ACLs, as the chart
/// runs it.
async fn start_operator(env: &TestEnv, namespace: &str, policy: &[&str]) -> Operator {
    let user = env.create_operator_user().await;
    env.grant_operator_acls(&user).await;
    let mut config = eventops_operator::config::RunConfig::new(&env.info.kafka_bootstrap);
    config.kafka_username = Some(user.user);
    config.kafka_password = Some(user.password);
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
    let _operator = start_operator(&env, &ns, &[&entry, "*=sandbox."]).await;
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

/// A ConsumerGroup gets Kafka ACLs only on topics its EventTopics manage: not on a name
/// the namespace policy refused (NotPermitted), and not on an existing topic that its
/// EventTopic was refused to adopt (TopicExists). Otherwise naming a refused EventTopic
/// in `spec.topics` would reach past both rules. Oracle: Kafka's AclCommand.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_gets_no_acls_on_topics_its_event_topics_were_refused() {
    let env = env().await;
    let ns = env.namespace("policy-acls").await;
    let prefix = format!("{}.", unique("team"));
    let entry = format!("{ns}={prefix}");
    let _operator = start_operator(&env, &ns, &[&entry]).await;
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);

    let allowed = format!("{prefix}orders.placed");
    let foreign = unique("billing.ledger.kept");
    // Inside the prefix, but made by hand: nobody manages it and it is not adopted.
    let existing = format!("{prefix}ledger.by-hand");
    env.kafka_tool(
        "org.apache.kafka.tools.TopicCommand",
        &["--create", "--topic", &existing, "--partitions", "1"],
    )
    .await
    .unwrap();
    for (name, topic) in [
        ("allowed", &allowed),
        ("foreign", &foreign),
        ("existing", &existing),
    ] {
        apply(&topics, name, json!({"partitions": 1, "topicName": topic}))
            .await
            .unwrap();
    }
    assert_eq!(settled(&topics, "allowed").await.1, "InSync");
    assert_eq!(settled(&topics, "foreign").await.1, "NotPermitted");
    assert_eq!(settled(&topics, "existing").await.1, "TopicExists");

    // First a group of the allowed topic alone: it gets its user and its grants.
    let group_id = format!("{prefix}reader");
    apply(
        &groups,
        "reader",
        json!({"topics": ["allowed"], "groupId": group_id, "template": {"image": "worker:1"}}),
    )
    .await
    .unwrap();
    let user = env.group_user(&ns, "reader").await;
    let acls = || env.acls_of(&user);
    eventually(TIMEOUT, "the grants on the allowed topic", || async {
        acls()
            .await
            .contains(&format!("name={allowed},"))
            .then_some(())
    })
    .await;
    // Then it names the refused EventTopics too: it waits for them, naming them.
    apply(
        &groups,
        "reader",
        json!({"topics": ["allowed", "foreign", "existing"], "groupId": group_id,
               "template": {"image": "worker:1"}}),
    )
    .await
    .unwrap();
    let message = eventually(
        TIMEOUT,
        "the group waiting for the refused topics",
        || async {
            let cg = groups.get("reader").await.ok()?;
            let c = eventops_tests::HasConditions::conditions(&cg)
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (c.observed_generation == Some(2) && c.status == "False").then_some(c.message)
        },
    )
    .await;
    assert!(
        message.contains("foreign") && message.contains("existing"),
        "{message}"
    );
    let listed = acls().await;
    // A few more reconciles, then nothing on the refused names.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let listed = format!("{listed}\n{}", acls().await);
    for refused in [&foreign, &existing] {
        for name in [refused.to_string(), format!("{refused}.DLT")] {
            assert!(
                !listed.contains(&format!("name={name},")),
                "the group was granted ACLs on {name}, which its EventTopic was refused:\n{listed}"
            );
        }
    }
}
