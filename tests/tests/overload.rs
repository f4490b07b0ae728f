//! More reconciles come due than the operator can run: every object must still get its
//! turn. `bench-operator 10000` found 1,105 EventTopics that were never reconciled once
//! (no finalizer, no status) in 20 minutes, while the Ready ones resynced: kube's
//! scheduler holds the due reconciles over its concurrency bound in a `HashSet` and
//! starts them in the set's iteration order, so the same ones win every time.
//! Here the operator runs one reconcile at a time with a 250 ms resync; 200 Ready
//! EventTopics come due faster than it passes over them, and 30 more are applied.
//! Oracles: the objects as the API server returns them, and Kafka's TopicCommand (super
//! user, checking only).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use eventops_crds::EventTopic;
use eventops_tests::{apply, env, eventually, unique};
use futures::StreamExt;
use kube::Api;
use serde_json::json;

/// The resync interval: 200 EventTopics come due 800 times a second.
const RESYNC: Duration = Duration::from_millis(250);
/// The first wave: Ready, they resync more often than one reconcile at a time gets
/// through.
const FIRST: usize = 200;
/// The second wave, applied into that load.
const SECOND: usize = 30;

#[tokio::test(flavor = "multi_thread")]
async fn every_object_gets_its_turn_when_more_come_due_than_run() {
    let env = env().await;
    env.time_limit(Duration::from_secs(420));
    let ns = env.namespace("overload").await;
    let operator = env.start_operator_tuned(&ns, RESYNC, 1);
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let prefix = unique("overload");
    let started = Instant::now();

    apply_topics(&topics, &prefix, 0..FIRST).await;
    all_ready(&topics, FIRST, started, Duration::from_secs(180)).await;

    // Load: every Ready EventTopic comes due each second; how many run a second?
    let before = operator.metrics.reconciles("eventtopic");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rate = (operator.metrics.reconciles("eventtopic") - before) as f64 / 5.0;
    let due = FIRST as f64 / RESYNC.as_secs_f64();
    println!("{rate:.0} reconciles/s run, {due:.0}/s come due");
    assert!(
        rate > 0.0 && rate < due / 2.0,
        "the test's premise: the operator runs reconciles, far fewer than come due"
    );

    let second = Instant::now();
    apply_topics(&topics, &prefix, FIRST..FIRST + SECOND).await;
    all_ready(&topics, FIRST + SECOND, started, Duration::from_secs(90)).await;
    println!(
        "the second wave Ready {:.1}s after it was applied",
        second.elapsed().as_secs_f64()
    );

    // Kafka has every topic.
    let listed = env
        .kafka_tool("org.apache.kafka.tools.TopicCommand", &["--list"])
        .await
        .unwrap();
    for i in 0..FIRST + SECOND {
        let name = format!("{prefix}.t{i}");
        assert!(
            listed.lines().any(|l| l.trim() == name),
            "{name} is not in Kafka"
        );
    }
}

/// Applies EventTopics `t{i}` for `range`, 16 at a time (as `kubectl apply -f dir/`).
async fn apply_topics(topics: &Api<EventTopic>, prefix: &str, range: std::ops::Range<usize>) {
    futures::stream::iter(range)
        .map(|i| async move {
            apply(
                topics,
                &format!("t{i}"),
                json!({"partitions": 1, "topicName": format!("{prefix}.t{i}"),
                       "deadLetter": {"enabled": false}}),
            )
            .await
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<kube::Result<Vec<_>>>()
        .unwrap();
}

/// Waits until `n` EventTopics are Ready, printing the count as it grows.
async fn all_ready(topics: &Api<EventTopic>, n: usize, started: Instant, within: Duration) {
    let last_count = AtomicUsize::new(0);
    let last_count = &last_count;
    eventually(within, &format!("{n} EventTopics Ready"), || async move {
        let list = topics.list(&Default::default()).await.ok()?;
        let ready = list
            .items
            .iter()
            .filter(|et| {
                et.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if last_count.swap(ready, Ordering::Relaxed) != ready {
            println!(
                "{:5.1}s: {ready}/{n} Ready",
                started.elapsed().as_secs_f64()
            );
        }
        (ready == n).then_some(())
    })
    .await;
}
