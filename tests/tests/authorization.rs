//! Per-group credentials and least-privilege ACLs, enforced by Kafka's real authorizer:
//! a client with group A's Secret reads A's topic and writes A's dead-letter topic, and is
//! refused everything else.

use std::time::{Duration, Instant};

use eventops_consumer_runtime::contract;
use eventops_crds::{ConsumerGroup, EventTopic};
use eventops_tests::{TestEnv, apply, env, eventually, unique, wait_ready};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct Creds {
    user: String,
    password: String,
}

fn client(env: &TestEnv, creds: &Creds) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &env.info.kafka_bootstrap)
        .set("security.protocol", "SASL_PLAINTEXT")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", &creds.user)
        .set("sasl.password", &creds.password);
    c
}

/// Consumes one record of `topic` as `group`: its payload, or the error Kafka answered.
async fn consume_one(
    env: &TestEnv,
    creds: &Creds,
    group: &str,
    topic: &str,
) -> Result<String, RDKafkaErrorCode> {
    let mut config = client(env, creds);
    config
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().expect("creating a consumer");
        consumer.subscribe(&[&topic]).expect("subscribing");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    return Ok(String::from_utf8_lossy(m.payload().unwrap_or_default()).into());
                }
                Some(Err(e)) => {
                    if let Some(code) = e.rdkafka_error_code() {
                        return Err(code);
                    }
                }
                None => {}
            }
        }
        Err(RDKafkaErrorCode::OperationTimedOut)
    })
    .await
    .unwrap()
}

/// Produces one record: Ok, or the error Kafka answered.
async fn produce(
    env: &TestEnv,
    creds: &Creds,
    topic: &str,
    payload: &str,
) -> Result<(), RDKafkaErrorCode> {
    produce_with(client(env, creds), topic, payload).await
}

/// [`produce`] with an idempotent producer, as the outbox relay uses: it asks the broker
/// for a producer id (InitProducerId) before its first record.
async fn produce_idempotent(
    env: &TestEnv,
    creds: &Creds,
    topic: &str,
    payload: &str,
) -> Result<(), RDKafkaErrorCode> {
    let mut config = client(env, creds);
    config.set("enable.idempotence", "true");
    produce_with(config, topic, payload).await
}

async fn produce_with(
    mut config: ClientConfig,
    topic: &str,
    payload: &str,
) -> Result<(), RDKafkaErrorCode> {
    config.set("message.timeout.ms", "10000");
    let (topic, payload) = (topic.to_string(), payload.to_string());
    tokio::task::spawn_blocking(move || {
        let (tx, rx) = std::sync::mpsc::channel();
        let producer: ThreadedProducer<Reporter> = config
            .create_with_context(Reporter(std::sync::Mutex::new(tx)))
            .expect("creating a producer");
        producer
            .send(BaseRecord::<(), _>::to(&topic).payload(&payload))
            .map_err(|(e, _)| e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail))?;
        producer.flush(Duration::from_secs(15)).ok();
        rx.recv_timeout(Duration::from_secs(15))
            .unwrap_or(Err(RDKafkaErrorCode::MessageTimedOut))
    })
    .await
    .unwrap()
}

/// Forwards each delivery report's outcome to the test.
struct Reporter(std::sync::Mutex<std::sync::mpsc::Sender<Result<(), RDKafkaErrorCode>>>);

impl rdkafka::ClientContext for Reporter {}
impl rdkafka::producer::ProducerContext for Reporter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        let outcome = result
            .as_ref()
            .map(drop)
            .map_err(|(e, _)| e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail));
        let _ = self.0.lock().unwrap().send(outcome);
    }
}

async fn group_creds(env: &TestEnv, ns: &str, group: &str) -> Creds {
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), ns);
    let data = secrets
        .get(&format!("{group}-kafka"))
        .await
        .unwrap()
        .data
        .unwrap();
    let get = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    Creds {
        user: get("username"),
        password: get("password"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_groups_credentials_reach_its_topics_and_nothing_else() {
    let env = env().await;
    let ns = env.namespace("authz").await;
    let _operator = env.start_operator(&ns);
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);
    let (orders, payments) = (
        unique("orders.order-placed"),
        unique("payments.payment-captured"),
    );
    apply(
        &topics,
        "orders",
        json!({"partitions": 1, "topicName": orders}),
    )
    .await
    .unwrap();
    apply(
        &topics,
        "payments",
        json!({"partitions": 1, "topicName": payments}),
    )
    .await
    .unwrap();
    apply(
        &groups,
        "inventory",
        json!({"topics": ["orders"], "template": {"image": "inventory:1"}}),
    )
    .await
    .unwrap();
    apply(
        &groups,
        "billing",
        json!({"topics": ["payments"], "template": {"image": "billing:1"}}),
    )
    .await
    .unwrap();
    wait_ready(&groups, "inventory", "True").await;
    wait_ready(&groups, "billing", "True").await;

    let admin = Creds {
        user: env.info.kafka_admin_user.clone(),
        password: env.info.kafka_admin_password.clone(),
    };
    produce(&env, &admin, &orders, "order-1")
        .await
        .expect("the admin produces");
    let inventory = group_creds(&env, &ns, "inventory").await;

    // Allowed: its own topic, as its own group, and its dead-letter topic.
    assert_eq!(
        consume_one(&env, &inventory, "inventory", &orders).await,
        Ok("order-1".into())
    );
    assert_eq!(
        produce(&env, &inventory, &format!("{orders}.DLT"), "poison").await,
        Ok(())
    );

    // Denied: another group's topic, another group's id, writing to its source topic.
    assert_eq!(
        consume_one(&env, &inventory, "inventory", &payments).await,
        Err(RDKafkaErrorCode::TopicAuthorizationFailed)
    );
    assert_eq!(
        consume_one(&env, &inventory, "billing", &orders).await,
        Err(RDKafkaErrorCode::GroupAuthorizationFailed)
    );
    assert_eq!(
        produce(&env, &inventory, &orders, "forged").await,
        Err(RDKafkaErrorCode::TopicAuthorizationFailed)
    );

    // Kafka's own AclCommand sees exactly the derived ACLs.
    let listed = env
        .kafka_tool(
            "org.apache.kafka.tools.AclCommand",
            &["--list", "--principal", &format!("User:{}", inventory.user)],
        )
        .await
        .unwrap();
    assert!(listed.contains(&format!("name={orders},")), "{listed}");
    assert!(listed.contains(&format!("name={orders}.DLT,")), "{listed}");
    assert!(!listed.contains(&payments), "{listed}");

    // Deleting the group removes its ACLs and its user.
    groups
        .delete("inventory", &Default::default())
        .await
        .unwrap();
    eventually(TIMEOUT, "the ConsumerGroup to go", || async {
        groups
            .get_opt("inventory")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let listed = env
        .kafka_tool(
            "org.apache.kafka.tools.AclCommand",
            &["--list", "--principal", &format!("User:{}", inventory.user)],
        )
        .await
        .unwrap();
    assert!(!listed.contains("ALLOW"), "{listed}");
    let denied = consume_one(&env, &inventory, "inventory", &orders).await;
    assert!(
        matches!(
            denied,
            Err(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed)
        ),
        "{denied:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn acls_follow_the_spec_and_others_are_left_alone() {
    let env = env().await;
    let ns = env.namespace("acls").await;
    let _operator = env.start_operator(&ns);
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);
    let (orders, payments) = (
        unique("orders.order-moved"),
        unique("payments.payment-moved"),
    );
    apply(
        &topics,
        "orders",
        json!({"partitions": 1, "topicName": orders}),
    )
    .await
    .unwrap();
    apply(
        &topics,
        "payments",
        json!({"partitions": 1, "topicName": payments}),
    )
    .await
    .unwrap();
    apply(
        &groups,
        "audit",
        json!({"topics": ["orders"], "template": {"image": "audit:1"}}),
    )
    .await
    .unwrap();
    wait_ready(&groups, "audit", "True").await;
    let principal = format!("User:eventops.{ns}.audit");

    // An ACL somebody else made, on a principal EventOps does not own.
    let bystander = format!("User:{}", unique("bystander"));
    let acl_tool = |args: Vec<String>| {
        let env = &env;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            env.kafka_tool("org.apache.kafka.tools.AclCommand", &args)
                .await
                .unwrap()
        }
    };
    acl_tool(vec![
        "--add".into(),
        "--allow-principal".into(),
        bystander.clone(),
        "--operation".into(),
        "Read".into(),
        "--topic".into(),
        orders.clone(),
    ])
    .await;

    // The group moves from orders to payments: its ACLs move with it.
    apply(
        &groups,
        "audit",
        json!({"topics": ["payments"], "template": {"image": "audit:1"}}),
    )
    .await
    .unwrap();
    let listed = eventually(TIMEOUT, "ACLs to follow the spec", || async {
        let listed = acl_tool(vec![
            "--list".into(),
            "--principal".into(),
            principal.clone(),
        ])
        .await;
        (listed.contains(&format!("name={payments},"))
            && !listed.contains(&format!("name={orders},")))
        .then_some(listed)
    })
    .await;
    assert!(listed.contains(&format!("name={payments}.DLT")), "{listed}");

    let theirs = acl_tool(vec!["--list".into(), "--principal".into(), bystander]).await;
    assert!(
        theirs.contains(&format!("name={orders},")),
        "an ACL EventOps did not create survives: {theirs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_produces_to_its_produces_topics_and_no_other() {
    let env = env().await;
    let ns = env.namespace("produces").await;
    let _operator = env.start_operator(&ns);
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);
    let (orders, captured, refunded) = (
        unique("orders.order.placed"),
        unique("payments.payment.captured"),
        unique("payments.payment.refunded"),
    );
    for (name, topic) in [
        ("orders", &orders),
        ("captured", &captured),
        ("refunded", &refunded),
    ] {
        apply(&topics, name, json!({"partitions": 1, "topicName": topic}))
            .await
            .unwrap();
        wait_ready(&topics, name, "True").await;
    }
    apply(
        &groups,
        "payment",
        json!({"topics": ["orders"], "produces": ["captured", "missing"],
               "template": {"image": "payment:1"}}),
    )
    .await
    .unwrap();
    // An EventTopic that is not there: nothing is granted, the condition says which.
    let (reason, message) = wait_ready(&groups, "payment", "False").await;
    assert_eq!(reason, "TopicNotFound");
    assert!(
        message.contains("spec.produces names EventTopic missing"),
        "{message}"
    );
    apply(
        &groups,
        "payment",
        json!({"topics": ["orders"], "produces": ["captured"],
               "template": {"image": "payment:1"}}),
    )
    .await
    .unwrap();
    wait_ready(&groups, "payment", "True").await;
    let payment = group_creds(&env, &ns, "payment").await;
    assert_eq!(
        produce(&env, &payment, &captured, "captured-1").await,
        Ok(())
    );
    assert_eq!(
        produce(&env, &payment, &refunded, "forged").await,
        Err(RDKafkaErrorCode::TopicAuthorizationFailed)
    );
    assert_eq!(
        produce(&env, &payment, &orders, "forged").await,
        Err(RDKafkaErrorCode::TopicAuthorizationFailed)
    );
}

/// `spec.outbox`: the relay runs in the workers with the group's Kafka user, so the user
/// may write exactly the outbox's topics (with an idempotent producer, as the relay's
/// is) and the workers are told which topics and where the outbox database is. An
/// EventTopic the outbox names that is not there grants nothing and is named.
#[tokio::test(flavor = "multi_thread")]
async fn a_groups_outbox_relay_writes_its_outbox_topics_and_no_other() {
    let env = env().await;
    let ns = env.namespace("outbox").await;
    let _operator = env.start_operator(&ns);
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);
    let (orders, captured, refunded) = (
        unique("orders.order.placed"),
        unique("payments.payment.captured"),
        unique("payments.payment.refunded"),
    );
    for (name, topic) in [
        ("orders", &orders),
        ("captured", &captured),
        ("refunded", &refunded),
    ] {
        apply(&topics, name, json!({"partitions": 1, "topicName": topic}))
            .await
            .unwrap();
        wait_ready(&topics, name, "True").await;
    }
    // The outbox database's URL, in a Secret of the namespace (set up as the super user).
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
    let db: Secret = serde_json::from_value(json!({
        "metadata": {"name": "payments-db"},
        "stringData": {"url": "postgres://payment@db/payments"},
    }))
    .unwrap();
    secrets.create(&Default::default(), &db).await.unwrap();
    let spec = |outbox_topics: &[&str]| {
        json!({"topics": ["orders"],
               "outbox": {"topics": outbox_topics,
                          "databaseSecret": {"name": "payments-db", "key": "url"}},
               "template": {"image": "payment:1"}})
    };

    // An EventTopic that is not there: nothing is granted, the condition says which.
    apply(&groups, "payment", spec(&["captured", "missing"]))
        .await
        .unwrap();
    let (reason, message) = wait_ready(&groups, "payment", "False").await;
    assert_eq!(reason, "TopicNotFound", "{message}");
    assert!(
        message.contains("spec.outbox.topics names EventTopic missing"),
        "{message}"
    );
    let principal = format!("User:eventops.{ns}.payment");
    let listed = list_acls(&env, &principal).await;
    assert!(!listed.contains(&captured), "{listed}");

    apply(&groups, "payment", spec(&["captured"]))
        .await
        .unwrap();
    wait_ready(&groups, "payment", "True").await;
    let payment = group_creds(&env, &ns, "payment").await;
    assert_eq!(
        produce_idempotent(&env, &payment, &captured, "captured-1").await,
        Ok(())
    );
    assert_eq!(
        produce_idempotent(&env, &payment, &refunded, "forged").await,
        Err(RDKafkaErrorCode::TopicAuthorizationFailed)
    );
    assert_eq!(
        produce(&env, &payment, &orders, "forged").await,
        Err(RDKafkaErrorCode::TopicAuthorizationFailed)
    );
    // Kafka's own AclCommand: Write on the outbox topic, nothing on the other.
    let listed = list_acls(&env, &principal).await;
    assert!(
        acl_lines(&listed, &captured)
            .iter()
            .any(|l| l.contains("operation=WRITE") && l.contains("permissionType=ALLOW")),
        "{listed}"
    );
    assert!(!listed.contains(&refunded), "{listed}");

    // The workers: the topics the relay may publish to and its database, by reference.
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let d = deployments.get("payment").await.unwrap();
    let vars = d.spec.template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let var = |name: &str| vars.iter().find(|e| e.name == name).cloned();
    let outbox_topics = var(contract::OUTBOX_TOPICS).expect("EVENTOPS_OUTBOX_TOPICS");
    let outbox_topics: Vec<String> =
        serde_json::from_str(outbox_topics.value.as_deref().unwrap()).unwrap();
    assert_eq!(outbox_topics, [captured.as_str()]);
    let url = var(contract::OUTBOX_DATABASE_URL).expect("EVENTOPS_OUTBOX_DATABASE_URL");
    assert_eq!(url.value, None);
    let key = url.value_from.unwrap().secret_key_ref.unwrap();
    assert_eq!(
        (key.name.as_str(), key.key.as_str()),
        ("payments-db", "url")
    );

    // Without the outbox, the grant goes.
    apply(
        &groups,
        "payment",
        json!({"topics": ["orders"], "template": {"image": "payment:1"}}),
    )
    .await
    .unwrap();
    eventually(TIMEOUT, "the outbox grant to be revoked", || async {
        let listed = list_acls(&env, &principal).await;
        (!listed.contains(&captured)).then_some(())
    })
    .await;
    assert_eq!(
        produce_idempotent(&env, &payment, &captured, "late").await,
        Err(RDKafkaErrorCode::TopicAuthorizationFailed)
    );
}

/// The lines of an `AclCommand --list` answer under the resource named `topic`.
fn acl_lines<'a>(listed: &'a str, topic: &str) -> Vec<&'a str> {
    listed
        .split("Current ACLs for resource")
        .filter(|block| block.contains(&format!("name={topic},")))
        .flat_map(str::lines)
        .collect()
}

/// `AclCommand --list` for one principal, from Kafka's own tool.
async fn list_acls(env: &TestEnv, principal: &str) -> String {
    env.kafka_tool(
        "org.apache.kafka.tools.AclCommand",
        &["--list", "--principal", principal],
    )
    .await
    .unwrap()
}

/// A group keeps grants only on topics its EventTopics own: when one EventTopic is
/// deleted, the grants on its topics go in the next reconcile, while the group waits
/// for it. On the group's deletion only the bindings EventOps made go: an
/// administrator's Deny on the group's principal stays.
#[tokio::test(flavor = "multi_thread")]
async fn grants_on_a_lost_topic_are_revoked_and_deny_acls_survive_the_group() {
    let env = env().await;
    let ns = env.namespace("acl-lost").await;
    let _operator = env.start_operator(&ns);
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);
    let (orders, payments) = (unique("orders.order-lost"), unique("payments.payment-kept"));
    for (name, topic) in [("orders", &orders), ("payments", &payments)] {
        apply(&topics, name, json!({"partitions": 1, "topicName": topic}))
            .await
            .unwrap();
    }
    apply(
        &groups,
        "audit",
        json!({"topics": ["orders", "payments"], "template": {"image": "audit:1"}}),
    )
    .await
    .unwrap();
    wait_ready(&groups, "audit", "True").await;
    let principal = format!("User:eventops.{ns}.audit");
    let listed = list_acls(&env, &principal).await;
    assert!(listed.contains(&format!("name={orders},")), "{listed}");

    // An administrator quarantines the group from one topic.
    env.kafka_tool(
        "org.apache.kafka.tools.AclCommand",
        &[
            "--add",
            "--deny-principal",
            &principal,
            "--operation",
            "Read",
            "--topic",
            &payments,
        ],
    )
    .await
    .unwrap();

    // The orders EventTopic goes: so do the group's grants on its topics.
    topics.delete("orders", &Default::default()).await.unwrap();
    let listed = eventually(
        TIMEOUT,
        "the grants on the deleted EventTopic's topics to be revoked",
        || async {
            let listed = list_acls(&env, &principal).await;
            (!listed.contains(&format!("name={orders}"))).then_some(listed)
        },
    )
    .await;
    assert!(listed.contains(&format!("name={payments},")), "{listed}");
    assert!(
        listed.contains(&format!("name={payments}.DLT,")),
        "{listed}"
    );
    let (reason, message) = wait_ready(&groups, "audit", "False").await;
    assert_eq!(reason, "TopicNotFound", "{message}");

    // The group goes: its grants go, the administrator's Deny stays.
    groups.delete("audit", &Default::default()).await.unwrap();
    eventually(TIMEOUT, "the ConsumerGroup to go", || async {
        groups
            .get_opt("audit")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let listed = list_acls(&env, &principal).await;
    assert!(!listed.contains("ALLOW"), "{listed}");
    assert!(
        listed.contains(&format!("name={payments},")) && listed.contains("permissionType=DENY"),
        "the administrator's Deny survives: {listed}"
    );
}
