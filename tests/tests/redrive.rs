//! `Redrive` against the real broker and API server: dead letters written by the
//! consumer runtime and by Spring Kafka's own `DeadLetterPublishingRecoverer` go back to
//! the topics they came from, filtered, each exactly once (also across a `kill -9` of the
//! operator), a dry run moves nothing, and the rate limit holds. The operator runs as its
//! own Kafka user with the documented ACLs, the workers as theirs; Kafka's own
//! `ConsoleConsumer` and `GetOffsetShell` are the oracle for what is on the topics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventops_consumer_runtime::contract::{self, TopicRoute};
use eventops_consumer_runtime::{
    Context, ErrorKind, Event, Handler, HandlerError, Worker, WorkerConfig,
};
use eventops_crds::{EventTopic, Redrive};
use eventops_tests::operator_user::OperatorUser;
use eventops_tests::runtime::{
    create_scram_user, event, produce, producer, set_acl, topic_record_count,
};
use eventops_tests::spring::run_oracle;
use eventops_tests::{ChildGuard, TestEnv, apply, env, eventually, free_port, unique, wait_ready};
use kube::Api;
use serde_json::json;
use tokio::sync::oneshot;

const TIMEOUT: Duration = Duration::from_secs(90);
const ORACLE_TIMEOUT: Duration = Duration::from_secs(600);
const DECLINED: &str = "com.shop.PaymentDeclined";
const INVALID: &str = "com.shop.AddressInvalid";

/// The order service: while `fixed` is false (the bug), every order fails permanently,
/// even-numbered ones with `PaymentDeclined`, odd ones with `AddressInvalid`; once fixed,
/// it applies each event and counts how often.
#[derive(Clone, Default)]
struct Orders {
    fixed: bool,
    applied: Arc<Mutex<BTreeMap<String, u32>>>,
}

impl Handler for Orders {
    async fn handle(&self, event: &Event<'_>, _ctx: &Context<'_>) -> Result<(), HandlerError> {
        let id = event.id().to_string();
        if !self.fixed {
            let n: u64 = id.rsplit('-').next().unwrap_or("0").parse().unwrap_or(0);
            let class = if n.is_multiple_of(2) {
                DECLINED
            } else {
                INVALID
            };
            return Err(
                HandlerError::message(ErrorKind::Permanent, "rejected").with_type_name(class)
            );
        }
        *self.applied.lock().unwrap().entry(id).or_default() += 1;
        Ok(())
    }
}

struct Setup {
    env: TestEnv,
    ns: String,
    operator_user: OperatorUser,
    redrives: Api<Redrive>,
    orders: String,
    refunds: String,
    dlt: String,
    worker_user: (String, String),
    group: String,
}

/// A namespace with EventTopics `orders` (3 partitions) and `refunds` (1), their topics,
/// and a worker user that may read both and write the orders' dead-letter topic.
async fn setup(prefix: &str) -> Setup {
    let env = env().await;
    env.time_limit(Duration::from_secs(600));
    let ns = env.namespace(prefix).await;
    let operator_user = env.create_operator_user().await;
    env.grant_operator_acls(&operator_user).await;
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let orders = unique("shop.order-placed");
    let refunds = unique("shop.refund-requested");
    // The EventTopics are made by an operator of the test's own; each test then runs the
    // operator it is about.
    {
        let operator = env.start_operator_as(Some(&ns), Some(&operator_user));
        apply(
            &topics,
            "orders",
            json!({"partitions": 3, "topicName": orders}),
        )
        .await
        .unwrap();
        apply(
            &topics,
            "refunds",
            json!({"partitions": 1, "topicName": refunds}),
        )
        .await
        .unwrap();
        wait_ready(&topics, "orders", "True").await;
        wait_ready(&topics, "refunds", "True").await;
        operator.stop().await;
    }
    let dlt = format!("{orders}.DLT");
    let group = unique("orders-service");
    let worker_user = (unique("orders-service"), unique("secret"));
    create_scram_user(&env, &worker_user.0, &worker_user.1).await;
    for (op, resource) in [
        ("Read", ["--group", group.as_str()]),
        ("Read", ["--topic", orders.as_str()]),
        ("Read", ["--topic", refunds.as_str()]),
        ("Write", ["--topic", dlt.as_str()]),
    ] {
        set_acl(&env, true, &worker_user.0, op, &resource).await;
    }
    Setup {
        redrives: Api::namespaced(env.client.clone(), &ns),
        env,
        ns,
        operator_user,
        orders,
        refunds,
        dlt,
        worker_user,
        group,
    }
}

impl Setup {
    /// A worker of the order service's group on `topics`, as the worker's own user.
    fn worker_config(&self, topics: &[&str]) -> WorkerConfig {
        let routes: Vec<TopicRoute> = topics
            .iter()
            .map(|t| TopicRoute {
                topic: t.to_string(),
                dead_letter_topic: Some(self.dlt.clone()),
                retry_topics: Vec::new(),
            })
            .collect();
        let vars: BTreeMap<&str, String> = [
            (
                contract::KAFKA_BOOTSTRAP,
                self.env.info.kafka_bootstrap.clone(),
            ),
            (contract::KAFKA_SECURITY_PROTOCOL, "SASL_PLAINTEXT".into()),
            (
                contract::KAFKA_SASL_MECHANISM,
                self.env.info.kafka_sasl_mechanism.clone(),
            ),
            (contract::KAFKA_USERNAME, self.worker_user.0.clone()),
            (contract::KAFKA_PASSWORD, self.worker_user.1.clone()),
            (contract::GROUP_ID, self.group.clone()),
            (contract::TOPICS, serde_json::to_string(&routes).unwrap()),
            (contract::MAX_ATTEMPTS, "1".into()),
        ]
        .into_iter()
        .collect();
        WorkerConfig::from_lookup(|k| vars.get(k).cloned()).expect("a valid contract")
    }

    async fn run_worker(&self, topics: &[&str], handler: Orders) -> RunningWorker {
        let worker = Worker::builder(self.worker_config(topics))
            .health_server(false)
            .build(handler)
            .await
            .expect("building the worker");
        let (stop, rx) = oneshot::channel();
        let done = tokio::spawn(worker.run_until(async move {
            let _ = rx.await;
        }));
        RunningWorker { stop, done }
    }

    /// `n` orders `o-0`..: order `i` to partition `i % 3`.
    async fn produce_orders(&self, n: usize) {
        let p = producer(&self.env.info);
        for i in 0..n {
            let id = format!("o-{i}");
            let payload = event(&id, 1, json!({"n": i}));
            produce(&p, &self.orders, (i % 3) as i32, &id, &payload).await;
        }
    }

    /// Waits until the dead-letter topic holds `n` records (Kafka's `GetOffsetShell`).
    async fn wait_dead_letters(&self, n: i64) {
        eventually(TIMEOUT, &format!("{n} records in {}", self.dlt), || async {
            (topic_record_count(&self.env, &self.dlt).await == n).then_some(())
        })
        .await;
    }

    /// Waits until `name` is Completed; returns its status and how long it took from
    /// `since`.
    async fn wait_completed(
        &self,
        name: &str,
        since: Instant,
    ) -> (eventops_crds::RedriveStatus, Duration) {
        let status = eventually(TIMEOUT, &format!("Redrive {name} Completed"), || async {
            let status = self.redrives.get(name).await.ok()?.status?;
            (status.phase.as_deref() == Some("Completed")).then_some(status)
        })
        .await;
        (status, since.elapsed())
    }
}

struct RunningWorker {
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<Result<(), eventops_consumer_runtime::WorkerError>>,
}

impl RunningWorker {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(TIMEOUT, self.done)
            .await
            .expect("the worker stops in time")
            .unwrap()
            .expect("the worker stops cleanly");
    }
}

/// Every record of `topic`, as Kafka's own `ConsoleConsumer` reads it with
/// `read_committed`: `(key, value of eventops-redriven-from)`.
async fn console_records(env: &TestEnv, topic: &str) -> Vec<(String, Option<String>)> {
    let out = env
        .kafka_tool(
            "org.apache.kafka.tools.consumer.ConsoleConsumer",
            &[
                "--topic",
                topic,
                "--from-beginning",
                "--timeout-ms",
                "6000",
                "--isolation-level",
                "read_committed",
                "--formatter-property",
                "print.headers=true",
                "--formatter-property",
                "print.key=true",
                "--formatter-property",
                "print.value=false",
            ],
        )
        .await
        .expect("ConsoleConsumer");
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let (headers, key) = line.rsplit_once('\t').unwrap_or(("", line));
            let from = headers
                .split(',')
                .find_map(|h| h.strip_prefix("eventops-redriven-from:"))
                .map(str::to_string);
            (key.to_string(), from)
        })
        .collect()
}

/// The dead letters of 900 orders written by the runtime (450 declined, 450 invalid) and
/// of 100 refunds written by Spring Kafka go back: a dry run counts and moves nothing; a
/// redrive of the declined ones moves exactly those, once each, at most at its rate; a
/// redrive of Spring's sends them back to the refunds topic; the fixed service applies
/// each once; the rest stays; refusals name the field.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_of_the_runtime_and_of_spring_go_back_once_each() {
    // 1,000 dead letters: 900 orders by the runtime, half of them PaymentDeclined, and
    // 100 refunds by Spring Kafka.
    const ORDERS: usize = 900;
    const REFUNDS: usize = 100;
    const DECLINED_ORDERS: i64 = ORDERS as i64 / 2;
    let s = setup("redrive").await;
    // Spring Kafka dead-letters the refunds into the orders' dead-letter topic.
    let p = producer(&s.env.info);
    for i in 0..REFUNDS {
        let id = format!("r-{i}");
        produce(&p, &s.refunds, 0, &id, &event(&id, 1, json!({"n": i}))).await;
    }
    run_oracle(
        &s.env.info,
        "dead-letter",
        &[
            ("group", &unique("refund-service")),
            ("topic", &s.refunds),
            ("partition", "0"),
            ("offset", "0"),
            ("count", &REFUNDS.to_string()),
            ("dlt", &s.dlt),
            ("exception", "java.lang.IllegalStateException"),
            ("message", "refund service was down"),
        ],
        ORACLE_TIMEOUT,
    )
    .await;
    // The buggy order service dead-letters every order.
    s.produce_orders(ORDERS).await;
    let buggy = s.run_worker(&[&s.orders], Orders::default()).await;
    s.wait_dead_letters((ORDERS + REFUNDS) as i64).await;
    buggy.stop().await;

    let operator = s.env.start_operator_as(Some(&s.ns), Some(&s.operator_user));

    // Refusals name the field.
    apply(&s.redrives, "nowhere", json!({"source": "missing"}))
        .await
        .unwrap();
    apply(
        &s.redrives,
        "elsewhere",
        json!({"source": "orders", "destination": "missing"}),
    )
    .await
    .unwrap();
    for (name, reason, field) in [
        ("nowhere", "EventTopicNotFound", "spec.source"),
        ("elsewhere", "DestinationNotOwned", "spec.destination"),
    ] {
        let message = eventually(TIMEOUT, &format!("{name} refused"), || async {
            let status = s.redrives.get(name).await.ok()?.status?;
            let c = status.conditions.iter().find(|c| c.type_ == "Accepted")?;
            (c.status == "False" && c.reason == reason).then(|| c.message.clone())
        })
        .await;
        assert!(message.contains(field), "{message}");
    }

    // A dry run counts the declined orders and moves nothing.
    let orders_before = topic_record_count(&s.env, &s.orders).await;
    apply(
        &s.redrives,
        "dry",
        json!({"source": "orders", "dryRun": true,
               "filter": {"exceptionClass": "PaymentDeclined"}}),
    )
    .await
    .unwrap();
    let (dry, _) = s.wait_completed("dry", Instant::now()).await;
    assert_eq!(
        (dry.matched, dry.moved, dry.skipped),
        (DECLINED_ORDERS, DECLINED_ORDERS, 0)
    );
    assert!(!dry.samples.is_empty());
    for sample in &dry.samples {
        assert_eq!(sample.exception.as_deref(), Some(DECLINED));
        assert_eq!(sample.destination.as_deref(), Some(s.orders.as_str()));
        let origin = sample.origin.as_deref().unwrap();
        assert!(origin.starts_with(&format!("{}/", s.orders)), "{origin}");
    }
    assert_eq!(topic_record_count(&s.env, &s.orders).await, orders_before);

    // The declined orders go back, at most 150 a second.
    let since = Instant::now();
    apply(
        &s.redrives,
        "declined",
        json!({"source": "orders", "maxRecordsPerSecond": 150,
               "filter": {"exceptionClass": DECLINED}}),
    )
    .await
    .unwrap();
    let (declined, took) = s.wait_completed("declined", since).await;
    assert_eq!(
        (declined.matched, declined.moved, declined.skipped),
        (DECLINED_ORDERS, DECLINED_ORDERS, 0)
    );
    // 450 records at 150/s, a burst of 30 allowed: at least 2.8 s; measured on the
    // test's clock from the apply, so a slow start only makes it longer.
    assert!(
        took >= Duration::from_millis(2_800),
        "{DECLINED_ORDERS} records at 150/s moved in {took:?}"
    );
    // Spring's go back to the refunds topic.
    apply(
        &s.redrives,
        "refunds",
        json!({"source": "orders", "filter": {"exceptionClass": "IllegalStateException"}}),
    )
    .await
    .unwrap();
    let (refunds, _) = s.wait_completed("refunds", Instant::now()).await;
    let refunds_n = REFUNDS as i64;
    assert_eq!(
        (refunds.matched, refunds.moved, refunds.skipped),
        (refunds_n, refunds_n, 0)
    );
    operator.stop().await;

    // Kafka's view: the orders topic has the orders plus the declined ones, each once;
    // the refunds topic its refunds plus Spring's back.
    let on_orders = console_records(&s.env, &s.orders).await;
    let redriven: Vec<&(String, Option<String>)> = on_orders
        .iter()
        .filter(|(_, from)| from.is_some())
        .collect();
    assert_eq!(on_orders.len(), ORDERS + ORDERS / 2, "{on_orders:?}");
    let keys: BTreeSet<&str> = redriven.iter().map(|(k, _)| k.as_str()).collect();
    let expected: BTreeSet<String> = (0..ORDERS).step_by(2).map(|i| format!("o-{i}")).collect();
    assert_eq!(
        keys,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    let sources: BTreeSet<&Option<String>> = redriven.iter().map(|(_, f)| f).collect();
    assert_eq!(
        sources.len(),
        ORDERS / 2,
        "one redriven record per dead letter"
    );
    assert!(
        redriven
            .iter()
            .all(|(_, f)| f.as_deref().unwrap().starts_with(&format!("{}/", s.dlt)))
    );
    let on_refunds = console_records(&s.env, &s.refunds).await;
    assert_eq!(on_refunds.len(), 2 * REFUNDS, "{on_refunds:?}");
    assert_eq!(
        on_refunds.iter().filter(|(_, f)| f.is_some()).count(),
        REFUNDS
    );
    // The others stay: the dead-letter topic is as it was.
    assert_eq!(
        topic_record_count(&s.env, &s.dlt).await,
        (ORDERS + REFUNDS) as i64
    );

    // The fixed service applies each redriven order once (the refunds, redriven or not,
    // once too: the copies carry the same event ids).
    let fixed = Orders {
        fixed: true,
        ..Default::default()
    };
    let worker = s.run_worker(&[&s.orders, &s.refunds], fixed.clone()).await;
    let want: BTreeMap<String, u32> = expected
        .iter()
        .cloned()
        .chain((0..REFUNDS).map(|i| format!("r-{i}")))
        .map(|id| (id, 1))
        .collect();
    eventually(
        TIMEOUT,
        "the fixed service applied the redriven orders",
        || async { (*fixed.applied.lock().unwrap() == want).then_some(()) },
    )
    .await;
    // Nothing more comes: one more order on each partition of both topics, produced
    // after everything else, is applied, so everything before it was read.
    let mut want = want;
    for (topic, partition) in [
        (&s.orders, 0),
        (&s.orders, 1),
        (&s.orders, 2),
        (&s.refunds, 0),
    ] {
        let id = format!("last-{topic}-{partition}");
        produce(&p, topic, partition, &id, &event(&id, 1, json!({}))).await;
        want.insert(id, 1);
    }
    eventually(TIMEOUT, "the last orders applied", || async {
        (fixed.applied.lock().unwrap().len() == want.len()).then_some(())
    })
    .await;
    assert_eq!(*fixed.applied.lock().unwrap(), want);
    worker.stop().await;
}

/// A `kill -9` of the operator in the middle of a redrive: the next operator goes on from
/// the committed position, and every dead letter is on its topic exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_killed_midway_still_moves_each_record_exactly_once() {
    let s = setup("redrive-kill").await;
    s.produce_orders(300).await;
    let buggy = s.run_worker(&[&s.orders], Orders::default()).await;
    s.wait_dead_letters(300).await;
    buggy.stop().await;

    let start = || {
        let child = s
            .env
            .operator_command(&s.ns, free_port())
            .args(["--lease-namespace", &s.ns])
            .env("EVENTOPS_KAFKA_USERNAME", &s.operator_user.user)
            .env("EVENTOPS_KAFKA_PASSWORD", &s.operator_user.password)
            .env("POD_NAME", "redrive-operator")
            .spawn()
            .expect("starting eventops-operator");
        ChildGuard(child)
    };
    let mut operator = start();
    apply(
        &s.redrives,
        "all",
        json!({"source": "orders", "maxRecordsPerSecond": 100}),
    )
    .await
    .unwrap();
    let moved_before_kill = eventually(TIMEOUT, "the redrive under way", || async {
        let moved = s.redrives.get("all").await.ok()?.status?.moved;
        (40..250).contains(&moved).then_some(moved)
    })
    .await;
    operator.0.kill().expect("kill -9");
    operator.0.wait().unwrap();
    // The killed operator held the Lease: the next one takes it once it expires.
    operator = start();
    let (status, _) = s.wait_completed("all", Instant::now()).await;
    drop(operator);
    assert_eq!(
        (status.matched, status.moved, status.skipped),
        (300, 300, 0)
    );

    let on_orders = console_records(&s.env, &s.orders).await;
    let redriven: Vec<&String> = on_orders.iter().filter_map(|(_, f)| f.as_ref()).collect();
    let unique_sources: BTreeSet<&String> = redriven.iter().copied().collect();
    assert_eq!(
        (redriven.len(), unique_sources.len()),
        (300, 300),
        "each dead letter moved once (killed after {moved_before_kill})"
    );
    assert_eq!(on_orders.len(), 600);
}

/// The command line: `dlt list` and `dlt show` print the dead letters with their decoded
/// provenance and exception, read with the given Kafka user; `dlt redrive --dry-run`
/// creates a dry-run Redrive and prints what would move.
#[tokio::test(flavor = "multi_thread")]
async fn the_command_line_lists_shows_and_dry_runs_dead_letters() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    let s = setup("redrive-cli").await;
    let p = producer(&s.env.info);
    for i in 0..2i64 {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "kafka_dlt-original-topic",
                value: Some(s.orders.as_str()),
            })
            .insert(Header {
                key: "kafka_dlt-original-partition",
                value: Some(&1i32.to_be_bytes()[..]),
            })
            .insert(Header {
                key: "kafka_dlt-original-offset",
                value: Some(&(40 + i).to_be_bytes()[..]),
            })
            .insert(Header {
                key: "kafka_dlt-exception-fqcn",
                value: Some(DECLINED),
            })
            .insert(Header {
                key: "kafka_dlt-exception-message",
                value: Some("card expired"),
            });
        p.send(
            FutureRecord::to(&s.dlt)
                .partition(0)
                .key(&format!("o-{i}"))
                .payload("{}")
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    }
    let cli = |args: &'static [&'static str]| {
        let mut command =
            tokio::process::Command::new(eventops_tests::workspace_binary("eventops-operator"));
        command
            .arg("dlt")
            .args(args)
            .args(["-n", &s.ns])
            .env("KUBECONFIG", &s.env.info.kubeconfig)
            .env("EVENTOPS_KAFKA_BOOTSTRAP", &s.env.info.kafka_bootstrap)
            .env("EVENTOPS_KAFKA_USERNAME", &s.operator_user.user)
            .env("EVENTOPS_KAFKA_PASSWORD", &s.operator_user.password)
            .kill_on_drop(true);
        async move {
            let output = tokio::time::timeout(TIMEOUT, command.output())
                .await
                .expect("dlt finishes in time")
                .expect("running eventops-operator dlt");
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            assert!(
                output.status.success(),
                "dlt {args:?}: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            );
            stdout
        }
    };
    let listed = cli(&["list", "orders"]).await;
    let rows: Vec<&str> = listed.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{listed}");
    for (i, row) in rows.iter().enumerate() {
        assert!(row.starts_with(&format!("0/{i} ")), "{row}");
        assert!(row.contains(&format!("o-{i}")), "{row}");
        assert!(row.contains(&format!("{}/1/{}", s.orders, 40 + i)), "{row}");
        assert!(row.contains(&format!("{DECLINED}: card expired")), "{row}");
    }
    let shown = cli(&["show", "orders", "0", "1"]).await;
    assert!(
        shown.contains("header kafka_dlt-original-offset: 41"),
        "{shown}"
    );
    assert!(shown.contains("key: o-1"), "{shown}");

    let operator = s.env.start_operator_as(Some(&s.ns), Some(&s.operator_user));
    let dry = cli(&[
        "redrive",
        "orders",
        "--name",
        "cli-dry",
        "--dry-run",
        "--exception-class",
        "PaymentDeclined",
    ])
    .await;
    assert!(
        dry.contains("Completed: matched 2, would move 2, skipped 0"),
        "{dry}"
    );
    assert!(dry.contains(&format!("to {}", s.orders)), "{dry}");
    let status = s.redrives.get("cli-dry").await.unwrap().status.unwrap();
    assert_eq!((status.matched, status.moved), (2, 2));
    operator.stop().await;
    // A dry run moved nothing.
    assert_eq!(topic_record_count(&s.env, &s.orders).await, 0);
}
