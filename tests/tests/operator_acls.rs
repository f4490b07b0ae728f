//! The operator run as a platform team installs it: as its own Kafka user holding
//! exactly the ACLs the README lists (`OPERATOR_ACLS`), never the super user. It does all
//! of its work with them; without any one of them, a condition names the missing one;
//! and the lag reader, cut off from `__consumer_offsets`, says so instead of faking
//! health. Kafka's own tools are the oracle.

use std::time::{Duration, Instant};

use eventops_crds::{ConsumerGroup, EventTopic, Redrive};
use eventops_tests::operator_user::{AclResource, OPERATOR_ACLS, OperatorUser};
use eventops_tests::{
    HasConditions, OperatorHandle, TestEnv, apply, env, eventually, unique, wait_ready,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Api;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

struct Setup {
    env: TestEnv,
    ns: String,
    user: OperatorUser,
    topics: Api<EventTopic>,
    groups: Api<ConsumerGroup>,
    redrives: Api<Redrive>,
    operator: OperatorHandle,
}

/// A namespace and an operator watching it as a fresh user with exactly the
/// documented ACLs.
async fn setup(prefix: &str) -> Setup {
    let env = env().await;
    let ns = env.namespace(prefix).await;
    let user = env.create_operator_user().await;
    env.grant_operator_acls(&user).await;
    let operator = env.start_operator_as(Some(&ns), Some(&user));
    Setup {
        topics: Api::namespaced(env.client.clone(), &ns),
        groups: Api::namespaced(env.client.clone(), &ns),
        redrives: Api::namespaced(env.client.clone(), &ns),
        env,
        ns,
        user,
        operator,
    }
}

fn condition<K: HasConditions>(obj: &K, type_: &str) -> Option<Condition> {
    obj.conditions().into_iter().find(|c| c.type_ == type_)
}

/// Waits until `name`'s condition `type_` has `status` and a message containing
/// `needle`; returns the message.
async fn wait_condition<K>(
    api: &Api<K>,
    name: &str,
    type_: &str,
    status: &str,
    needle: &str,
) -> String
where
    K: HasConditions + kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let last = std::sync::Mutex::new(None::<Condition>);
    let found = tokio::time::timeout(
        TIMEOUT,
        eventually(
            TIMEOUT + Duration::from_secs(5),
            &format!("{name} {type_}={status} naming {needle:?}"),
            || async {
                let c = condition(&api.get(name).await.ok()?, type_)?;
                *last.lock().unwrap() = Some(c.clone());
                (c.status == status && c.message.contains(needle)).then_some(c.message)
            },
        ),
    )
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "{name} {type_}={status} naming {needle:?} not seen within {TIMEOUT:?}; last: {:?}",
            last.lock().unwrap()
        )
    })
}

/// One record in `topic`'s dead-letter topic, as a worker writes it (the super user
/// stands in for the worker).
async fn dead_letter(env: &TestEnv, topic: &str) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    let producer = eventops_tests::runtime::producer(&env.info);
    let headers = OwnedHeaders::new().insert(Header {
        key: "kafka_dlt-original-topic",
        value: Some(topic),
    });
    producer
        .send(
            FutureRecord::to(&format!("{topic}.DLT"))
                .key("k")
                .payload("v")
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("producing a dead letter: {e}"));
}

async fn produce(env: &TestEnv, topic: &str, partition: i32, n: usize) {
    let (info, topic) = (env.info.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        eventops_tests::autoscale::produce(&info, &topic, partition, n)
    })
    .await
    .unwrap();
}

async fn commit(env: &TestEnv, group: &str, topic: &str, partition: i32, offset: i64) {
    let (info, group, topic) = (env.info.clone(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        eventops_tests::autoscale::commit(&info, &group, &topic, partition, offset)
    })
    .await
    .unwrap();
}

fn total_lag(cg: &ConsumerGroup) -> Option<i64> {
    cg.status.as_ref()?.total_lag
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_does_all_its_work_with_exactly_the_documented_acls() {
    let started = Instant::now();
    let s = setup("opacl-work").await;
    let topic = unique("orders.order-placed");
    apply(
        &s.topics,
        "orders",
        json!({"partitions": 1, "topicName": topic, "deletionPolicy": "Delete",
               "retry": {"delays": ["5s"]}}),
    )
    .await
    .unwrap();
    wait_ready(&s.topics, "orders", "True").await;
    let et = s.topics.get("orders").await.unwrap();
    let mut kafka_topics = vec![topic.clone(), et.dead_letter_topic_name().unwrap()];
    kafka_topics.extend(et.retry_topic_names());
    assert_eq!(kafka_topics.len(), 3, "{kafka_topics:?}");
    for t in &kafka_topics {
        assert!(s.env.topic_exists(t).await, "{t} was created");
    }

    // Alter: more partitions and a config, seen by TopicCommand.
    apply(
        &s.topics,
        "orders",
        json!({"partitions": 2, "topicName": topic, "deletionPolicy": "Delete",
               "retry": {"delays": ["5s"]}, "config": {"retention.ms": "3600000"}}),
    )
    .await
    .unwrap();
    eventually(TIMEOUT, "2 partitions and retention.ms", || async {
        let d = s.env.describe_topic(&topic).await.ok()?;
        (d.partitions == 2 && d.configs.contains(&"retention.ms=3600000".to_string())).then_some(())
    })
    .await;

    // A group: its SCRAM user, its ACLs, its lag.
    let group_id = unique("audit");
    apply(
        &s.groups,
        "audit",
        json!({"groupId": group_id, "topics": ["orders"], "template": {"image": "audit:1"},
               "scaling": {"minReplicas": 1, "maxReplicas": 1}}),
    )
    .await
    .unwrap();
    wait_ready(&s.groups, "audit", "True").await;
    let principal = format!("User:eventops.{}.audit", s.ns);
    let listed = s
        .env
        .kafka_tool(
            "org.apache.kafka.tools.AclCommand",
            &["--list", "--principal", &principal],
        )
        .await
        .unwrap();
    assert!(listed.contains(&format!("name={topic},")), "{listed}");
    let users = s
        .env
        .kafka_tool(
            "kafka.admin.ConfigCommand",
            &[
                "--describe",
                "--entity-type",
                "users",
                "--entity-name",
                &format!("eventops.{}.audit", s.ns),
            ],
        )
        .await
        .unwrap();
    assert!(users.contains("SCRAM-SHA-512"), "{users}");
    produce(&s.env, &topic, 0, 5).await;
    commit(&s.env, &group_id, &topic, 0, 2).await;
    eventually(TIMEOUT, "lag 3 measured", || async {
        let cg = s.groups.get("audit").await.ok()?;
        let measured = condition(&cg, "LagMeasured")?.status == "True";
        (measured && total_lag(&cg) == Some(3)).then_some(())
    })
    .await;

    // Deletion: the group's user and ACLs, then the topics.
    s.groups.delete("audit", &Default::default()).await.unwrap();
    eventually(TIMEOUT, "the group to go", || async {
        s.groups
            .get_opt("audit")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let listed = s
        .env
        .kafka_tool(
            "org.apache.kafka.tools.AclCommand",
            &["--list", "--principal", &principal],
        )
        .await
        .unwrap();
    assert!(!listed.contains("ALLOW"), "{listed}");
    s.topics
        .delete("orders", &Default::default())
        .await
        .unwrap();
    eventually(TIMEOUT, "the EventTopic to go", || async {
        s.topics
            .get_opt("orders")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    for t in &kafka_topics {
        assert!(!s.env.topic_exists(t).await, "{t} was deleted");
    }
    eprintln!("took {:?}", started.elapsed());
}

/// Each documented ACL removed in turn: something the operator must do fails, and a
/// condition names the missing ACL. Put back, the operator goes on by itself.
#[tokio::test(flavor = "multi_thread")]
async fn without_any_one_documented_acl_a_condition_names_it() {
    let started = Instant::now();
    let s = setup("opacl-each").await;
    let principal = s.user.principal();
    // A topic with lag and a group measuring it, for the Read row.
    let measured_topic = unique("audit.record-kept");
    apply(
        &s.topics,
        "kept",
        json!({"partitions": 1, "topicName": measured_topic}),
    )
    .await
    .unwrap();
    let group_id = unique("measured");
    apply(
        &s.groups,
        "measured",
        json!({"groupId": group_id, "topics": ["kept"], "template": {"image": "m:1"},
               "scaling": {"minReplicas": 1, "maxReplicas": 1}}),
    )
    .await
    .unwrap();
    wait_ready(&s.groups, "measured", "True").await;
    produce(&s.env, &measured_topic, 0, 2).await;
    eventually(TIMEOUT, "lag 2 measured", || async {
        let cg = s.groups.get("measured").await.ok()?;
        (total_lag(&cg) == Some(2)).then_some(())
    })
    .await;

    let mut redrives = Vec::new();
    for (i, &(resource, operation)) in OPERATOR_ACLS.iter().enumerate() {
        // A fresh EventTopic that exists before the ACL goes, for Delete, Alter and
        // AlterConfigs.
        let name = format!("t{i}");
        let topic = unique("acl.row-checked");
        apply(
            &s.topics,
            &name,
            json!({"partitions": 1, "topicName": topic, "deletionPolicy": "Delete"}),
        )
        .await
        .unwrap();
        wait_ready(&s.topics, &name, "True").await;

        s.env
            .set_acls(false, &principal, resource, &[operation])
            .await;
        let on = match resource {
            AclResource::Cluster => "on the Cluster",
            AclResource::AnyTopic => "on Topic",
            AclResource::AnyGroup => "on Group",
            AclResource::TransactionalIdPrefix(_) => "on TransactionalId",
        };
        let needle = format!("{operation} {on}");
        let message = match (resource, operation) {
            // A Redrive reads the dead-letter topic in its own group and moves the record
            // back in a transaction of its own.
            (AclResource::AnyTopic, "Write")
            | (AclResource::AnyGroup, _)
            | (AclResource::TransactionalIdPrefix(_), _) => {
                dead_letter(&s.env, &topic).await;
                let redrive = format!("r{i}");
                apply(&s.redrives, &redrive, json!({"source": name}))
                    .await
                    .unwrap();
                redrives.push(redrive.clone());
                wait_condition(&s.redrives, &redrive, "Complete", "False", &needle).await
            }
            (AclResource::Cluster, _) => {
                let group = format!("g{i}");
                apply(
                    &s.groups,
                    &group,
                    json!({"topics": [name], "template": {"image": "g:1"}}),
                )
                .await
                .unwrap();
                wait_condition(&s.groups, &group, "Ready", "False", &needle).await
            }
            (_, "Create") => {
                let fresh = format!("new{i}");
                apply(
                    &s.topics,
                    &fresh,
                    json!({"partitions": 1, "topicName": unique("acl.row-created")}),
                )
                .await
                .unwrap();
                wait_condition(&s.topics, &fresh, "Ready", "False", &needle).await
            }
            (_, "Delete") => {
                s.topics.delete(&name, &Default::default()).await.unwrap();
                wait_condition(&s.topics, &name, "Ready", "False", &needle).await
            }
            (_, "Alter") => {
                apply(
                    &s.topics,
                    &name,
                    json!({"partitions": 2, "topicName": topic, "deletionPolicy": "Delete"}),
                )
                .await
                .unwrap();
                wait_condition(&s.topics, &name, "Ready", "False", &needle).await
            }
            (_, "AlterConfigs") => {
                apply(
                    &s.topics,
                    &name,
                    json!({"partitions": 1, "topicName": topic, "deletionPolicy": "Delete",
                           "config": {"retention.ms": "7200000"}}),
                )
                .await
                .unwrap();
                // DescribeConfigs, implied by AlterConfigs, is what fails first.
                wait_condition(&s.topics, &name, "Ready", "False", "AlterConfigs").await
            }
            (_, "Read") => {
                wait_condition(
                    &s.groups,
                    "measured",
                    "LagMeasured",
                    "False",
                    "Read on Topic",
                )
                .await
            }
            other => panic!("no check for {other:?}: add one"),
        };
        eprintln!("without {operation} {on}: {message}");

        s.env
            .set_acls(true, &principal, resource, &[operation])
            .await;
    }
    // Everything recovers once the ACLs are back.
    wait_condition(&s.groups, "measured", "LagMeasured", "True", "").await;
    for redrive in &redrives {
        let moved = wait_condition(&s.redrives, redrive, "Complete", "True", "moved 1 of 1").await;
        eprintln!("{redrive}: {moved}");
    }
    for i in 0..OPERATOR_ACLS.len() {
        let name = format!("t{i}");
        if s.topics.get_opt(&name).await.unwrap().is_some() {
            wait_ready(&s.topics, &name, "True").await;
        }
    }
    wait_ready(&s.groups, "g0", "True").await;
    let took = started.elapsed();
    eprintln!("took {took:?}");
}

/// The lag reader cut off from `__consumer_offsets` (an administrator's Deny on Read):
/// `LagMeasured=False` with Kafka's error and a metric, no lag figure, no scaling on
/// stale commits; once the Deny goes, it recovers by itself and scales on real lag.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_offsets_topic_is_reported_not_taken_for_lag() {
    let s = setup("opacl-lag").await;
    let deployments: Api<Deployment> = Api::namespaced(s.env.client.clone(), &s.ns);
    let topic = unique("scale.work-queued");
    apply(
        &s.topics,
        "work",
        json!({"partitions": 2, "topicName": topic}),
    )
    .await
    .unwrap();
    let group_id = unique("workers");
    apply(
        &s.groups,
        "workers",
        json!({"groupId": group_id, "topics": ["work"], "template": {"image": "w:1"},
               "scaling": {"minReplicas": 0, "lagPerReplica": 1,
                           "scaleDownStabilization": "1s", "scaleUpInterval": "0s"}}),
    )
    .await
    .unwrap();
    wait_ready(&s.groups, "workers", "True").await;
    produce(&s.env, &topic, 0, 3).await;
    produce(&s.env, &topic, 1, 3).await;
    let replicas = || async { deployments.get("workers").await.ok()?.spec.replicas };
    eventually(TIMEOUT, "2 replicas for lag 6", || async {
        (replicas().await == Some(2)).then_some(())
    })
    .await;

    let deny = |add: bool| {
        let (env, principal) = (&s.env, s.user.principal());
        async move {
            let action = if add { "--add" } else { "--remove" };
            let mut args = vec![
                action,
                "--deny-principal",
                &principal,
                "--operation",
                "Read",
                "--topic",
                "__consumer_offsets",
            ];
            if !add {
                args.push("--force");
            }
            env.kafka_tool("org.apache.kafka.tools.AclCommand", &args)
                .await
                .unwrap();
        }
    };
    deny(true).await;
    let message = wait_condition(
        &s.groups,
        "workers",
        "LagMeasured",
        "False",
        "TopicAuthorizationFailed",
    )
    .await;
    assert!(
        message.contains("Read on Topic __consumer_offsets"),
        "{message}"
    );
    let metric = format!(
        r#"eventops_operator_consumergroup_lag_measured{{namespace="{}",consumergroup="workers"}} 0"#,
        s.ns
    );
    assert!(
        s.operator.metrics.encode().contains(&metric),
        "{}",
        s.operator.metrics.encode()
    );
    let cg = s.groups.get("workers").await.unwrap();
    assert_eq!(total_lag(&cg), None, "unknown lag is not shown as a figure");

    // Everything is processed meanwhile: a reader on stale commits would keep 2, one that
    // took unknown for zero would go to 0. Neither: replicas stay until it can measure.
    commit(&s.env, &group_id, &topic, 0, 3).await;
    commit(&s.env, &group_id, &topic, 1, 3).await;
    let writes = s.operator.metrics.writes();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            replicas().await,
            Some(2),
            "replicas unchanged while lag is unknown"
        );
    }
    assert!(
        // At most the reconciler's record of the Deployment's pod count.
        s.operator.metrics.writes() - writes <= 2,
        "a group that stays unmeasured writes nothing more:\n{}",
        s.operator.metrics.encode()
    );

    deny(false).await;
    wait_condition(&s.groups, "workers", "LagMeasured", "True", "").await;
    eventually(TIMEOUT, "0 replicas once the commits are read", || async {
        (replicas().await == Some(0)).then_some(())
    })
    .await;
    let cg = s.groups.get("workers").await.unwrap();
    assert_eq!(total_lag(&cg), Some(0));
}
