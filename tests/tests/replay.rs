//! `Replay` (issue 13) against the real broker, API server, PostgreSQL and node agent:
//! the operator runs as its own Kafka user with the documented ACLs, the workers as the
//! group's own SCRAM user. Kafka's `GetOffsetShell` and `ConsumerGroupCommand` are the
//! oracles for offsets; the workers' database for what was applied.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use eventops_crds::{ConsumerGroup, EventTopic, REPLAY_HOLD_ANNOTATION, Replay};
use eventops_operator::consumergroup::build::GROUP_LABEL;
use eventops_tests::e2e::{Database, kafka_group_lag, produce_burst};
use eventops_tests::pods::{is_ready, wait_pods};
use eventops_tests::runtime::{event, producer};
use eventops_tests::{TestEnv, apply, env, eventually, unique, wait_ready};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{Api, ResourceExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);
const PARTITIONS: i32 = 3;

fn condition(rp: &Replay, type_: &str) -> Option<Condition> {
    rp.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .cloned()
}

fn phase(rp: &Replay) -> Option<String> {
    rp.status.as_ref()?.phase.clone()
}

/// Waits until Replay `name`'s condition `type_` has `status` and a message containing
/// `needle`; returns the message.
async fn wait_condition(
    api: &Api<Replay>,
    name: &str,
    type_: &str,
    status: &str,
    needle: &str,
) -> String {
    eventually(
        TIMEOUT,
        &format!("Replay {name} {type_}={status} naming {needle:?}"),
        || async {
            let c = condition(&api.get(name).await.ok()?, type_)?;
            (c.status == status && c.message.contains(needle)).then_some(c.message)
        },
    )
    .await
}

/// The offset of the first record at or after `ms` in each partition of `topic`, by
/// Kafka's own `GetOffsetShell` (the end offset where there is none).
async fn offsets_for_time(env: &TestEnv, topic: &str, ms: i64) -> Vec<(i32, i64)> {
    let out = env
        .kafka_tool(
            "org.apache.kafka.tools.GetOffsetShell",
            &["--topic", topic, "--time", &ms.to_string()],
        )
        .await
        .expect("GetOffsetShell --time");
    let mut by_time: Vec<(i32, i64)> = out
        .lines()
        .filter_map(|l| {
            let mut cols = l.rsplitn(3, ':');
            let offset = cols.next()?.trim().parse().ok()?;
            let partition = cols.next()?.trim().parse().ok()?;
            Some((partition, offset))
        })
        .collect();
    by_time.sort();
    by_time
}

/// Produces `flow-<n>` events, one every 50 ms round-robin over the partitions, until
/// `stop` is set; returns their ids.
fn traffic(
    env: &TestEnv,
    topic: &str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let producer = producer(&env.info);
    let topic = topic.to_string();
    tokio::spawn(async move {
        let mut ids = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let id = format!("flow-{}", ids.len());
            let payload = event(&id, 1, json!({"n": id}));
            producer
                .send(
                    FutureRecord::to(&topic)
                        .partition(ids.len() as i32 % PARTITIONS)
                        .key(&id)
                        .payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .unwrap_or_else(|(e, _)| panic!("producing {id}: {e}"));
            ids.push(id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ids
    })
}

async fn duplicates(db: &Database) -> i64 {
    db.client
        .query_one(
            "SELECT COALESCE(SUM(duplicates), 0)::bigint FROM e2e_stats",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .expect("reading e2e_stats")
}

/// A replay from a time, of a group scaled out to 2 workers while events keep coming:
/// the group goes to 0, its offsets become exactly Kafka's offsets for that time, the
/// autoscaler brings the workers back, and they read again exactly the records from
/// there to where they were: the inbox recognises every one, so no effect is applied
/// twice and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_from_a_time_rereads_exactly_the_later_records_while_traffic_flows() {
    let started = Instant::now();
    let env = env().await;
    env.time_limit(Duration::from_secs(480));
    let ns = env.namespace("replay-time").await;
    let user = env.create_operator_user().await;
    env.grant_operator_acls(&user).await;
    let _operator = env.start_operator_as(Some(&ns), Some(&user));
    let db = Database::create(&env.info, &unique("replay_time").replace('-', "_")).await;
    db.client
        .batch_execute("CREATE TABLE e2e_stats (pod text PRIMARY KEY, duplicates bigint NOT NULL)")
        .await
        .expect("creating e2e_stats");

    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);
    let replays: Api<Replay> = Api::namespaced(env.client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    let topic = unique("shop.order-placed");
    apply(
        &topics,
        "orders",
        json!({"partitions": PARTITIONS, "topicName": topic}),
    )
    .await
    .unwrap();
    wait_ready(&topics, "orders", "True").await;
    let group_id = unique("read-model");
    apply(
        &groups,
        "read-model",
        json!({
            "groupId": group_id,
            "topics": ["orders"],
            "processing": {"idempotency": "Postgres"},
            "template": {
                "image": "ghcr.io/eventops/e2e-worker:test",
                "env": [
                    {"name": "E2E_DATABASE_URL", "value": db.url},
                    {"name": "E2E_STATS", "value": "1"},
                ],
            },
            "scaling": {"minReplicas": 2, "maxReplicas": PARTITIONS},
        }),
    )
    .await
    .unwrap();
    wait_ready(&groups, "read-model", "True").await;
    let selector = format!("{GROUP_LABEL}=read-model");
    wait_pods(
        &pods,
        &selector,
        Duration::from_secs(90),
        "2 workers Ready",
        |p| p.len() == 2 && p.iter().all(is_ready),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let flow = traffic(&env, &topic, stop.clone());
    let mut produced = produce_burst(&env.info, &topic, PARTITIONS, "before", 300).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let from = jiff_now_ms();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    produced.extend(produce_burst(&env.info, &topic, PARTITIONS, "after", 300).await);
    eventually(TIMEOUT, "both bursts processed", || async {
        let done = db.processed().await;
        produced.iter().all(|id| done.contains(id)).then_some(())
    })
    .await;
    let duplicates_before = duplicates(&db).await;

    let timestamp = k8s_openapi::jiff::Timestamp::from_millisecond(from).unwrap();
    let applied = Instant::now();
    apply(
        &replays,
        "rebuild",
        json!({"consumerGroup": "read-model", "from": {"timestamp": timestamp.to_string()}}),
    )
    .await
    .unwrap();
    let message = wait_condition(&replays, "rebuild", "Complete", "True", "handed back").await;
    let took = applied.elapsed();
    let rp = replays.get("rebuild").await.unwrap();
    let status = rp.status.clone().unwrap();
    assert_eq!(phase(&rp).as_deref(), Some("Completed"));
    assert_eq!(status.replicas_before, Some(2), "{status:?}");
    assert_eq!(status.group_id.as_deref(), Some(group_id.as_str()));

    // The offsets set are Kafka's own offsets for that time, on every partition.
    let set: Vec<(i32, i64)> = status
        .offsets
        .iter()
        .map(|p| (p.partition, p.after))
        .collect();
    assert!(
        status.offsets.iter().all(|p| p.topic == topic),
        "{status:?}"
    );
    assert_eq!(
        set,
        offsets_for_time(&env, &topic, from).await,
        "{status:?}"
    );
    let rewound = status.rewound.unwrap();
    let expected: i64 = status
        .offsets
        .iter()
        .map(|p| p.before.expect("committed before") - p.after)
        .sum();
    assert_eq!(rewound, expected);
    assert!(
        rewound >= 300,
        "at least the 300 events after the time were read before: {status:?}"
    );

    // The autoscaler took the group back: from the 0 the Replay left to its minimum.
    let last = eventually(
        TIMEOUT,
        "the autoscaler scaling the group up from 0",
        || async {
            let last = groups.get("read-model").await.ok()?.status?.last_scale?;
            (last.from == 0 && last.to >= 2).then_some(last)
        },
    )
    .await;
    let cg = groups.get("read-model").await.unwrap();
    assert!(
        !cg.annotations().contains_key(REPLAY_HOLD_ANNOTATION),
        "released: {:?}",
        cg.annotations()
    );
    eventually(TIMEOUT, "2 workers back", || async {
        let d = deployments.get("read-model").await.ok()?;
        (d.status?.ready_replicas == Some(2)).then_some(())
    })
    .await;

    stop.store(true, Ordering::SeqCst);
    produced.extend(flow.await.unwrap());
    eventually(TIMEOUT, "every event processed", || async {
        let done = db.processed().await;
        (produced.iter().all(|id| done.contains(id)) && done.len() == produced.len()).then_some(())
    })
    .await;
    // Exactly the rewound records were read again, each recognised by the inbox.
    let again = eventually(
        TIMEOUT,
        "the inbox to count the rewound records",
        || async {
            let again = duplicates(&db).await - duplicates_before;
            (again >= rewound).then_some(again)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = duplicates(&db).await - duplicates_before;
    assert_eq!((again, settled), (rewound, rewound), "records read again");
    assert_eq!(
        db.repeated_effects().await,
        Default::default(),
        "effects applied twice"
    );
    let lag = eventually(TIMEOUT, "Kafka reports lag 0", || async {
        let lag = kafka_group_lag(&env, &group_id, &topic).await;
        (lag.len() == PARTITIONS as usize && lag.values().all(|p| p.committed == Some(p.log_end)))
            .then_some(lag)
    })
    .await;
    println!(
        "replay: {message}; applied -> Completed in {took:.1?}; {rewound} records read again, \
         {} events in all; autoscaler {} -> {} ({}); Kafka {lag:?}; test {:.1?}",
        produced.len(),
        last.from,
        last.to,
        last.reason,
        started.elapsed()
    );
}

fn jiff_now_ms() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond()
}

/// One Replay per group at a time, and never a rewind under a member: a Replay waits
/// while the group has a member, a second Replay of the group is refused naming the
/// first, deleting a holding Replay releases the group, and a group that remembers
/// events only in memory is replayed only with `allowDuplicates`.
#[tokio::test(flavor = "multi_thread")]
async fn one_replay_per_group_never_under_a_member_and_duplicates_only_when_allowed() {
    let env = env().await;
    env.time_limit(Duration::from_secs(300));
    let ns = env.namespace("replay-guard").await;
    let user = env.create_operator_user().await;
    env.grant_operator_acls(&user).await;
    let _operator = env.start_operator_as(Some(&ns), Some(&user));
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);
    let replays: Api<Replay> = Api::namespaced(env.client.clone(), &ns);
    let topic = unique("shop.order-placed");
    apply(
        &topics,
        "orders",
        json!({"partitions": 2, "topicName": topic}),
    )
    .await
    .unwrap();
    wait_ready(&topics, "orders", "True").await;
    let group_id = unique("notifications");
    // Idempotency defaults to Memory. No workers: minReplicas 0 and no lag.
    apply(
        &groups,
        "notifications",
        json!({"groupId": group_id, "topics": ["orders"], "template": {"image": "n:1"},
               "scaling": {"minReplicas": 0, "maxReplicas": 1}}),
    )
    .await
    .unwrap();
    wait_ready(&groups, "notifications", "True").await;
    produce_burst(&env.info, &topic, 2, "n", 10).await;

    // A member of the group, committed at the end: the test, as the super user (setup).
    let member: StreamConsumer = env
        .info
        .kafka_admin_config()
        .set("group.id", &group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "latest")
        .create()
        .unwrap();
    member.subscribe(&[&topic]).unwrap();
    let member_task = {
        let member = Arc::new(member);
        let polling = member.clone();
        let task = tokio::spawn(async move {
            loop {
                let _ = tokio::time::timeout(Duration::from_millis(200), polling.recv()).await;
            }
        });
        eventually(TIMEOUT, "the member assigned both partitions", || async {
            (member.assignment().ok()?.count() == 2).then_some(())
        })
        .await;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..2 {
            tpl.add_partition_offset(&topic, p, rdkafka::Offset::Offset(5))
                .unwrap();
        }
        member
            .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
            .unwrap();
        (member, task)
    };
    let committed = |lag: &std::collections::BTreeMap<i32, eventops_tests::e2e::PartitionLag>| {
        lag.values().map(|p| p.committed).collect::<Vec<_>>()
    };
    assert_eq!(
        committed(&kafka_group_lag(&env, &group_id, &topic).await),
        vec![Some(5), Some(5)]
    );

    // Memory idempotency: refused without allowDuplicates, naming the field; no hold.
    apply(
        &replays,
        "unsafe",
        json!({"consumerGroup": "notifications", "from": {"earliest": true}}),
    )
    .await
    .unwrap();
    let refusal = wait_condition(
        &replays,
        "unsafe",
        "Accepted",
        "False",
        "spec.allowDuplicates",
    )
    .await;
    assert!(refusal.contains("Memory"), "{refusal}");
    let held = |cg: ConsumerGroup| cg.annotations().get(REPLAY_HOLD_ANNOTATION).cloned();
    assert_eq!(held(groups.get("notifications").await.unwrap()), None);

    // With allowDuplicates it holds the group, and waits while the member is there.
    apply(
        &replays,
        "first",
        json!({"consumerGroup": "notifications", "from": {"earliest": true},
               "allowDuplicates": true}),
    )
    .await
    .unwrap();
    wait_condition(&replays, "first", "Complete", "False", "1 members").await;
    let first = replays.get("first").await.unwrap();
    assert_eq!(phase(&first).as_deref(), Some("ScalingDown"));
    assert!(
        held(groups.get("notifications").await.unwrap()).is_some_and(|h| h.starts_with("first/")),
    );

    // A time in the future would skip records: refused, naming the field.
    apply(
        &replays,
        "future",
        json!({"consumerGroup": "notifications", "allowDuplicates": true,
               "from": {"timestamp": "2999-01-01T00:00:00Z"}}),
    )
    .await
    .unwrap();
    wait_condition(
        &replays,
        "future",
        "Accepted",
        "False",
        "spec.from.timestamp",
    )
    .await;

    // A second Replay of the group is refused, naming the first, for good.
    apply(
        &replays,
        "second",
        json!({"consumerGroup": "notifications",
               "topics": [{"topic": "orders", "offsets": [{"partition": 0, "offset": 1}]}],
               "allowDuplicates": true}),
    )
    .await
    .unwrap();
    let refusal = wait_condition(&replays, "second", "Accepted", "False", "Replay first").await;
    assert_eq!(
        phase(&replays.get("second").await.unwrap()).as_deref(),
        Some("Refused")
    );
    println!("second replay: {refusal}");

    // Deleting the holding Replay releases the group; a new one takes it.
    replays.delete("first", &Default::default()).await.unwrap();
    eventually(TIMEOUT, "first gone and the group released", || async {
        let gone = replays.get_opt("first").await.ok()?.is_none();
        (gone && held(groups.get("notifications").await.ok()?).is_none()).then_some(())
    })
    .await;
    // This one from the command line, which follows it to the end.
    let cli = tokio::process::Command::new(eventops_tests::workspace_binary("eventops-operator"))
        .args([
            "replay",
            "notifications",
            "--earliest",
            "--allow-duplicates",
        ])
        .args(["--name", "third", "--wait", "-n", &ns])
        .env("KUBECONFIG", &env.info.kubeconfig)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("eventops-operator replay");
    wait_condition(&replays, "third", "Complete", "False", "1 members").await;
    // Still the member's offsets: nothing was set under it.
    assert_eq!(
        committed(&kafka_group_lag(&env, &group_id, &topic).await),
        vec![Some(5), Some(5)]
    );

    // The member leaves: the Replay sets the earliest offsets, and releases the group.
    let (member, task) = member_task;
    task.abort();
    let _ = task.await;
    member.unsubscribe();
    drop(member);
    wait_condition(&replays, "third", "Complete", "True", "handed back").await;
    let out = tokio::time::timeout(TIMEOUT, cli.wait_with_output())
        .await
        .expect("the command line to return")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("eventops-operator replay printed:\n{stdout}");
    for line in [
        "replay.eventops.dev/third created",
        "ScalingDown: WaitingForEmptyGroup",
        &format!("{topic}/0: 5 -> 0"),
        &format!("{topic}/1: 5 -> 0"),
    ] {
        assert!(stdout.contains(line), "{line:?} in:\n{stdout}");
    }
    let third = replays.get("third").await.unwrap().status.unwrap();
    let offsets: Vec<(i32, Option<i64>, i64)> = third
        .offsets
        .iter()
        .map(|p| (p.partition, p.before, p.after))
        .collect();
    assert_eq!(offsets, vec![(0, Some(5), 0), (1, Some(5), 0)]);
    assert_eq!(third.rewound, Some(10));
    assert_eq!(
        committed(&kafka_group_lag(&env, &group_id, &topic).await),
        vec![Some(0), Some(0)],
        "Kafka's view of the group"
    );
    assert_eq!(held(groups.get("notifications").await.unwrap()), None);
    // A hold no live Replay has (one deleted without its finalizer running) does not
    // keep the group from its autoscaler: the ConsumerGroup controller removes it.
    groups
        .patch(
            "notifications",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"annotations": {
                REPLAY_HOLD_ANNOTATION: "ghost/0f0e6f1c-0000-0000-0000-000000000000"}}})),
        )
        .await
        .unwrap();
    eventually(TIMEOUT, "the stale hold removed", || async {
        held(groups.get("notifications").await.ok()?)
            .is_none()
            .then_some(())
    })
    .await;

    // A ConsumerGroup sharing an older one's Kafka group id is not replayed: the group
    // is the older one's.
    apply(
        &groups,
        "copycat",
        json!({"groupId": group_id, "topics": ["orders"], "template": {"image": "n:1"},
               "scaling": {"minReplicas": 0, "maxReplicas": 1}}),
    )
    .await
    .unwrap();
    apply(
        &replays,
        "takeover",
        json!({"consumerGroup": "copycat", "from": {"earliest": true}, "allowDuplicates": true}),
    )
    .await
    .unwrap();
    wait_condition(
        &replays,
        "takeover",
        "Accepted",
        "False",
        "already used by ConsumerGroup",
    )
    .await;

    // The inbox remembers event ids for 7 days (the runtime's default): a replay of a
    // Postgres group reaching records older than that is refused unless allowed.
    let archive = unique("shop.archive");
    apply(
        &topics,
        "archive",
        json!({"partitions": 1, "topicName": archive}),
    )
    .await
    .unwrap();
    wait_ready(&topics, "archive", "True").await;
    let ten_days_ago = k8s_openapi::jiff::Timestamp::now().as_millisecond() - 10 * 86_400_000;
    let payload = event("old-1", 1, json!({}));
    producer(&env.info)
        .send(
            FutureRecord::to(&archive)
                .key("old-1")
                .payload(&payload)
                .timestamp(ten_days_ago),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    apply(
        &groups,
        "ledger",
        json!({"topics": ["archive"], "template": {"image": "n:1"},
               "processing": {"idempotency": "Postgres"},
               "scaling": {"minReplicas": 0, "maxReplicas": 1}}),
    )
    .await
    .unwrap();
    apply(
        &replays,
        "too-far",
        json!({"consumerGroup": "ledger", "from": {"earliest": true}}),
    )
    .await
    .unwrap();
    let refusal = wait_condition(&replays, "too-far", "Accepted", "False", "last 7 days").await;
    assert!(
        refusal.contains("spec.from") && refusal.contains("spec.allowDuplicates"),
        "{refusal}"
    );

    // The refused ones stay refused and set nothing.
    assert_eq!(
        phase(&replays.get("second").await.unwrap()).as_deref(),
        Some("Refused")
    );
    assert_eq!(
        phase(&replays.get("unsafe").await.unwrap()).as_deref(),
        Some("Pending")
    );
}
