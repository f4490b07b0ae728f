//! The chart's default: one operator watching every namespace. Two namespaces hold an
//! EventTopic and a ConsumerGroup of the same names; each gets its own Kafka topic,
//! group, user, Secret and ACLs, and neither sees the other's.
//!
//! A test binary of its own: an operator watching all namespaces would also reconcile
//! the namespaces of tests that run their own operator.

use eventops_crds::{ConsumerGroup, EventTopic};
use eventops_tests::{apply, env, unique, wait_ready};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn same_names_in_two_namespaces_do_not_collide() {
    let env = env().await;
    let (a, b) = (env.namespace("team-a").await, env.namespace("team-b").await);
    let _operator = env.start_operator_as(None, None);
    let mut kafka_topics = Vec::new();
    for ns in [&a, &b] {
        let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), ns);
        let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), ns);
        let topic = unique("orders.order-placed");
        apply(
            &topics,
            "orders",
            json!({"partitions": 1, "topicName": topic}),
        )
        .await
        .unwrap();
        apply(
            &groups,
            "inventory",
            json!({"groupId": format!("{ns}-inventory"), "topics": ["orders"],
                   "template": {"image": "inventory:1"}}),
        )
        .await
        .unwrap();
        kafka_topics.push(topic);
    }
    let mut passwords = Vec::new();
    for (ns, topic) in [&a, &b].into_iter().zip(&kafka_topics) {
        let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), ns);
        let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), ns);
        wait_ready(&topics, "orders", "True").await;
        wait_ready(&groups, "inventory", "True").await;
        assert!(env.topic_exists(topic).await, "{topic}");
        let cg = groups.get("inventory").await.unwrap();
        assert_eq!(cg.status.unwrap().group_id, Some(format!("{ns}-inventory")));

        let secret = Api::<Secret>::namespaced(env.client.clone(), ns)
            .get("inventory-kafka")
            .await
            .unwrap();
        let data = secret.data.unwrap();
        let user = String::from_utf8(data["username"].0.clone()).unwrap();
        assert_eq!(user, format!("eventops.{ns}.inventory"));
        passwords.push(data["password"].0.clone());

        // Kafka's AclCommand: this namespace's user reaches this namespace's topic only.
        let other = kafka_topics.iter().find(|t| *t != topic).unwrap();
        let listed = env
            .kafka_tool(
                "org.apache.kafka.tools.AclCommand",
                &["--list", "--principal", &format!("User:{user}")],
            )
            .await
            .unwrap();
        assert!(listed.contains(&format!("name={topic},")), "{listed}");
        assert!(
            listed.contains(&format!("name={ns}-inventory,")),
            "{listed}"
        );
        assert!(!listed.contains(other.as_str()), "{listed}");
    }
    assert_ne!(
        passwords[0], passwords[1],
        "each group has its own credentials"
    );
}
