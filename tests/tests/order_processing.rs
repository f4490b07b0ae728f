//! The order-processing example end to end: its producer and its inventory, payment and
//! notification workers run as processes against the real broker and PostgreSQL, with
//! the worker env contract as the operator would set it. Every order reaches every worker,
//! each payment is recorded exactly once, every PaymentCaptured reaches notification.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use eventops_consumer_runtime::tokio_postgres::{self, NoTls};
use eventops_devenv::EnvInfo;
use eventops_tests::{eventually, free_port, http_get, unique, workspace_binary};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// Stops the worker processes when the test ends, however it ends.
struct Processes(Vec<(&'static str, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_flow_through_inventory_payment_and_notification() {
    let info = EnvInfo::from_env().unwrap_or_else(|e| panic!("{e:#}"));
    let orders_topic = unique("orders.order.placed");
    let captured_topic = unique("payments.payment.captured");
    let admin: AdminClient<DefaultClientContext> = info.kafka_admin_config().create().unwrap();
    for r in admin
        .create_topics(
            [
                &NewTopic::new(&orders_topic, 6, TopicReplication::Fixed(1)),
                &NewTopic::new(&captured_topic, 3, TopicReplication::Fixed(1)),
            ],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }

    // The payment service's own database.
    let database = unique("payments").replace('-', "_");
    let (pg, connection) = tokio_postgres::connect(&info.postgres_url, NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    pg.batch_execute(&format!("CREATE DATABASE {database}"))
        .await
        .unwrap();
    let (base, _) = info.postgres_url.rsplit_once('/').unwrap();
    let database_url = format!("{base}/{database}");

    let groups = BTreeMap::from([
        ("inventory", unique("inventory")),
        ("payment", unique("payment")),
        ("notification", unique("notification")),
    ]);
    let worker = |name: &'static str, topics: &[&str], extra: &[(&str, &str)]| {
        let port = free_port();
        let routes: Vec<_> = topics
            .iter()
            .map(|t| serde_json::json!({"topic": t}))
            .collect();
        let child = Command::new(workspace_binary(&format!("order-processing-{name}")))
            .env("EVENTOPS_KAFKA_BOOTSTRAP", &info.kafka_bootstrap)
            .env("EVENTOPS_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
            .env("EVENTOPS_KAFKA_SASL_MECHANISM", &info.kafka_sasl_mechanism)
            .env("EVENTOPS_KAFKA_USERNAME", &info.kafka_admin_user)
            .env("EVENTOPS_KAFKA_PASSWORD", &info.kafka_admin_password)
            .env("EVENTOPS_GROUP_ID", &groups[name])
            .env(
                "EVENTOPS_TOPICS",
                serde_json::Value::from(routes).to_string(),
            )
            .env("EVENTOPS_DEAD_LETTER", "false")
            .env("EVENTOPS_HEALTH_PORT", port.to_string())
            .env("RUST_LOG", "warn")
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the {name} worker: {e}"));
        ((name, child), port)
    };
    let outbox_topics = serde_json::json!([captured_topic]).to_string();
    let (inventory, inventory_port) =
        worker("inventory", &[&orders_topic], &[("INVENTORY_WORK_MS", "2")]);
    let (payment, payment_port) = worker(
        "payment",
        &[&orders_topic],
        &[
            ("EVENTOPS_IDEMPOTENCY", "Postgres"),
            ("DATABASE_URL", &database_url),
            ("PAYMENT_CAPTURED_TOPIC", &captured_topic),
            // As the operator sets it for spec.outbox.
            ("EVENTOPS_OUTBOX_TOPICS", &outbox_topics),
            // The first attempt at about one order in 7 fails after writing the payment
            // row and appending its PaymentCaptured: the transaction rolls back and the
            // order is retried.
            ("PAYMENT_FAIL_EVERY", "7"),
        ],
    );
    let (notification, notification_port) =
        worker("notification", &[&orders_topic, &captured_topic], &[]);
    let mut workers = Processes(vec![inventory, payment, notification]);

    // 100 orders/s with a ×5 spike in the second second: 600 orders in about 2 s.
    let output = Command::new(workspace_binary("order-processing-producer"))
        .args(["--bootstrap", &info.kafka_bootstrap])
        .args(["--username", &info.kafka_admin_user])
        .args(["--password", &info.kafka_admin_password])
        .args(["--topic", &orders_topic])
        .args([
            "--rate",
            "100",
            "--spike-at",
            "1",
            "--spike-for",
            "1",
            "--spike-factor",
            "5",
        ])
        .args(["--count", "600"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("running the producer");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "producer failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("produced 600 orders"), "{stdout}");

    // What Kafka holds, read independently of the workers.
    let placed = read_all(&info, &orders_topic);
    assert_eq!(placed.len(), 600, "OrderPlaced records on {orders_topic}");
    let order_ids: BTreeSet<String> = placed
        .iter()
        .map(|v| v["data"]["orderId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order_ids.len(), 600, "distinct order ids");
    assert!(
        placed
            .iter()
            .all(|v| v["type"] == "OrderPlaced" && v["correlationId"].is_string())
    );

    // Every worker processed every order: its group's committed offsets (committed only
    // after processing) reach the end of the topic, and its metrics count 600.
    for (name, port) in [
        ("inventory", inventory_port),
        ("payment", payment_port),
        ("notification", notification_port),
    ] {
        let group = &groups[name];
        eventually(
            Duration::from_secs(90),
            &format!("{name} committing every order"),
            || async { fully_committed(&info, group, &orders_topic).then_some(()) },
        )
        .await;
        let processed = processed_metric(port, &orders_topic);
        assert_eq!(
            processed,
            Some(600),
            "{name}: records_processed for {orders_topic}"
        );
    }

    // Each payment recorded exactly once.
    let (db, connection) = tokio_postgres::connect(&database_url, NoTls).await.unwrap();
    tokio::spawn(connection);
    let rows = db
        .query("SELECT order_id, event_id FROM payments", &[])
        .await
        .unwrap();
    let paid: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let payment_events: BTreeSet<String> = rows
        .iter()
        .map(|r| format!("payment-captured-{}", r.get::<_, String>(1)))
        .collect();
    assert_eq!(paid.len(), 600, "payment rows");
    assert_eq!(
        paid.iter().cloned().collect::<BTreeSet<_>>(),
        order_ids,
        "one payment per order"
    );

    // PaymentCaptured for every order once the relay has emptied the outbox, and
    // notification consumed all of them.
    eventually(
        Duration::from_secs(60),
        "the payment outbox relayed",
        || async {
            let pending: i64 = db
                .query_one("SELECT count(*) FROM eventops_outbox", &[])
                .await
                .unwrap()
                .get(0);
            (pending == 0).then_some(())
        },
    )
    .await;
    let captured = read_all(&info, &captured_topic);
    let captured_ids: BTreeSet<String> = captured
        .iter()
        .map(|v| v["data"]["orderId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(captured_ids, order_ids, "PaymentCaptured order ids");
    assert!(captured.iter().all(|v| v["type"] == "PaymentCaptured"));
    // The outbox: every PaymentCaptured has its payment row and every payment row its
    // PaymentCaptured, once, although about one order in seven rolled back once after
    // writing both (published from inside the transaction, those would be on Kafka too).
    let captured_events: BTreeSet<String> = captured
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        captured_events, payment_events,
        "PaymentCaptured ids against payment rows"
    );
    assert_eq!(
        captured.len(),
        600,
        "PaymentCaptured records on {captured_topic}"
    );

    let notification_group = &groups["notification"];
    eventually(
        Duration::from_secs(60),
        "notification committing every PaymentCaptured",
        || async { fully_committed(&info, notification_group, &captured_topic).then_some(()) },
    )
    .await;
    assert_eq!(
        processed_metric(notification_port, &captured_topic),
        Some(captured.len() as u64),
        "notification: records_processed for {captured_topic}"
    );

    for (name, child) in &mut workers.0 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the {name} worker exited early"
        );
    }
}

/// Every record of `topic` from the beginning, as JSON.
fn read_all(info: &EnvInfo, topic: &str) -> Vec<serde_json::Value> {
    let consumer: BaseConsumer = info
        .kafka_admin_config()
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        remaining += high - low;
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while remaining > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "reading {topic}: {remaining} records missing"
        );
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            records.push(serde_json::from_slice(m.payload().unwrap()).unwrap());
            remaining -= 1;
        }
    }
    records
}

/// Whether `group` has committed the end offset of every partition of `topic`.
fn fully_committed(info: &EnvInfo, group: &str, topic: &str) -> bool {
    let consumer: BaseConsumer = info
        .kafka_admin_config()
        .set("group.id", group)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition(topic, p.id());
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    committed.elements().iter().all(|e| {
        let (_, high) = consumer
            .fetch_watermarks(topic, e.partition(), Duration::from_secs(10))
            .unwrap();
        match e.offset() {
            Offset::Offset(o) => o >= high,
            _ => high == 0,
        }
    })
}

/// The worker's `eventops_worker_records_processed` count for `topic`, from `/metrics`.
fn processed_metric(port: u16, topic: &str) -> Option<u64> {
    let (code, body) = http_get(port, "/metrics")?;
    assert_eq!(code, 200, "/metrics: {body}");
    let label = format!("topic=\"{topic}\"");
    body.lines()
        .filter(|l| l.starts_with("eventops_worker_records_processed") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .reduce(|a, b| a + b)
}
