//! Benchmark: apply N objects at once (N/2 EventTopics and N/2 ConsumerGroups) and
//! report the time until all are Ready, the operator's peak RSS and the Kafka admin
//! requests it sent; then the requests of one quiet resync interval.
//!
//! Run through `tools/bench-operator [N]`, which builds the operator in release mode and
//! starts the environment. `EVENTOPS_OPERATOR_BIN` runs another build of the operator
//! (an older commit's, for a before/after). Prints figures; asserts nothing about speed.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use eventops_crds::{ConsumerGroup, EventTopic};
use eventops_tests::bench::{api_request_breakdown, api_requests, cpu_breakdown, cpu_by_component};
use eventops_tests::{env, free_port, http_get, unique};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Api;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total: usize = std::env::args().nth(1).map_or(Ok(1000), |a| a.parse())?;
    anyhow::ensure!(
        total >= 2 && total.is_multiple_of(2),
        "N must be even: N/2 of each kind"
    );
    let n = total / 2;
    let env = env().await;
    let ns = env.namespace("bench").await;
    let port = free_port();
    let mut command = match std::env::var_os("EVENTOPS_OPERATOR_BIN") {
        Some(binary) => env.operator_command_with(binary.as_ref(), &ns, port),
        None => env.operator_command(&ns, port),
    };
    let mut operator = command
        .args(["--no-leader-election", "--resync-interval"])
        .arg(format!("{}s", RESYNC.as_secs()))
        .env("RUST_LOG", "warn")
        .spawn()?;
    while http_get(port, "/readyz").is_none_or(|(c, _)| c != 200) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);
    let prefix = unique("bench");
    let params = PatchParams::apply("bench").force();
    let cpu_before = cpu_by_component(operator.id())?;
    let api_before = api_requests(&env.client).await?;
    let started = Instant::now();
    // Apply everything at once, 32 requests in flight (as `kubectl apply -f dir/` would,
    // only faster).
    let applies = (0..n).flat_map(|i| {
        let topic = json!({"apiVersion": "eventops.dev/v1alpha1", "kind": "EventTopic",
            "metadata": {"name": format!("t{i}")},
            "spec": {"partitions": 1, "topicName": format!("{prefix}.t{i}.created")}});
        let group = json!({"apiVersion": "eventops.dev/v1alpha1", "kind": "ConsumerGroup",
            "metadata": {"name": format!("g{i}")},
            "spec": {"topics": [format!("t{i}")], "template": {"image": "worker:1"}}});
        [
            (true, format!("t{i}"), topic),
            (false, format!("g{i}"), group),
        ]
    });
    let results: Vec<kube::Result<()>> = futures::stream::iter(applies)
        .map(|(is_topic, name, obj)| {
            let (topics, groups, params) = (topics.clone(), groups.clone(), params.clone());
            async move {
                if is_topic {
                    topics
                        .patch(&name, &params, &Patch::Apply(&obj))
                        .await
                        .map(drop)
                } else {
                    groups
                        .patch(&name, &params, &Patch::Apply(&obj))
                        .await
                        .map(drop)
                }
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect::<kube::Result<Vec<()>>>()?;
    let applied = started.elapsed();
    println!(
        "applied {n} EventTopics and {n} ConsumerGroups in {:.1}s",
        applied.as_secs_f64()
    );

    // Watched, not listed: a LIST of every object each poll would load the API server
    // this benchmark measures.
    // 15 minutes, or 0.2 s per object for larger runs: a run that does not finish still
    // prints how far it got.
    let limit = Duration::from_secs(900.max(total as u64 / 5));
    // The test watchdog's default of 10 minutes is for tests: the wait above, the apply
    // and the quiet interval.
    env.time_limit(limit * 2 + RESYNC * 2);
    let deadline = Instant::now() + limit;
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    progress.tick().await;
    let (mut ready_topics, mut ready_groups) = (HashSet::new(), HashSet::new());
    let topic_events = watcher(topics.clone(), watcher::Config::default())
        .default_backoff()
        .touched_objects()
        .map(|o| {
            o.map(|t: EventTopic| (true, t.name_any(), ready(t.status.map(|s| s.conditions))))
        });
    let group_events = watcher(groups.clone(), watcher::Config::default())
        .default_backoff()
        .touched_objects()
        .map(|o| {
            o.map(|g: ConsumerGroup| (false, g.name_any(), ready(g.status.map(|s| s.conditions))))
        });
    let mut events = std::pin::pin!(futures::stream::select(topic_events, group_events));
    while ready_topics.len() < n || ready_groups.len() < n {
        tokio::select! {
            event = events.next() => {
                let (is_topic, name, is_ready) = event.ok_or_else(|| anyhow::anyhow!("watch ended"))??;
                let set = if is_topic { &mut ready_topics } else { &mut ready_groups };
                if is_ready { set.insert(name); } else { set.remove(&name); }
            }
            _ = progress.tick() => println!(
                "  {:>5.1}s: {}/{n} EventTopics and {}/{n} ConsumerGroups Ready",
                started.elapsed().as_secs_f64(), ready_topics.len(), ready_groups.len()
            ),
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let all_ready = started.elapsed();
    let cpu_ready = cpu_by_component(operator.id())?;
    let api_ready = api_requests(&env.client).await?;
    let finished = ready_topics.len() == n && ready_groups.len() == n;
    if !finished {
        println!(
            "not all Ready after {:.0}s: {}/{n} EventTopics and {}/{n} ConsumerGroups",
            limit.as_secs_f64(),
            ready_topics.len(),
            ready_groups.len()
        );
    }

    let status = std::fs::read_to_string(format!("/proc/{}/status", operator.id()))?;
    let peak_rss = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ?")
        .to_string();
    let requests = counters(port, "eventops_operator_kafka_admin_requests_total")?;
    let sent: f64 = requests.values().sum();
    let reconciles = counters(port, "eventops_operator_reconciles_total")?;
    let reconcile_seconds = counters(port, "eventops_operator_reconcile_duration_seconds_sum")?;

    // A quiet resync interval: nothing changes, every object is compared with Kafka once.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = counters(port, "eventops_operator_kafka_admin_requests_total")?;
    let reconciles_before = counters(port, "eventops_operator_reconciles_total")?;
    tokio::time::sleep(RESYNC + Duration::from_secs(5)).await;
    let after = counters(port, "eventops_operator_kafka_admin_requests_total")?;
    let reconciles_after = counters(port, "eventops_operator_reconciles_total")?;
    let quiet: BTreeMap<&String, f64> = after
        .iter()
        .map(|(k, v)| (k, v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    let quiet_total: f64 = quiet.values().sum();
    let resynced: f64 =
        reconciles_after.values().sum::<f64>() - reconciles_before.values().sum::<f64>();
    operator.kill()?;
    operator.wait()?;

    println!();
    println!(
        "objects:                 {n} EventTopics (each with a dead-letter topic) + {n} ConsumerGroups"
    );
    println!(
        "all Ready after:         {} (apply took {:.1}s)",
        ready_s(finished, all_ready),
        applied.as_secs_f64()
    );
    println!(
        "CPU until all Ready:     {} (of {:.0} s on {} cores)",
        cpu_breakdown(&cpu_before, &cpu_ready),
        all_ready.as_secs_f64() * cores() as f64,
        cores()
    );
    let (api_total, api_top) = api_request_breakdown(&api_before, &api_ready, 12);
    println!("API server requests until all Ready: {api_total} (everyone's); most: {api_top}");
    println!(
        "operator peak RSS:       {}",
        peak_rss.trim_start_matches("VmHWM:").trim()
    );
    println!(
        "Kafka admin requests:    {sent} ({:.1} per object)",
        sent / total as f64
    );
    for (kind, count) in &requests {
        println!("  {kind:<28} {count}");
    }
    for (controller, count) in &reconciles {
        let seconds = reconcile_seconds
            .get(controller)
            .copied()
            .unwrap_or(f64::NAN);
        println!(
            "reconciles to Ready:     {controller} {count}, {:.0} ms each on average",
            seconds / count * 1000.0
        );
    }
    println!(
        "one quiet resync interval ({}s, {resynced} reconciles): {quiet_total} Kafka admin requests",
        RESYNC.as_secs()
    );
    for (kind, count) in &quiet {
        println!("  {kind:<28} {count}");
    }
    let rss_mib = peak_rss
        .split_whitespace()
        .nth(1)
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0);
    println!(
        "bench-operator: N={total} ready_s={} rss_mib={rss_mib:.0} requests_per_object={:.2} quiet_requests={quiet_total}",
        ready_s(finished, all_ready),
        sent / total as f64
    );
    Ok(())
}

/// The time to all Ready, or `>T` when the run stopped waiting at T.
fn ready_s(finished: bool, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    if finished {
        format!("{secs:.1}")
    } else {
        format!(">{secs:.0}")
    }
}

/// The machine's cores.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Whether `conditions` say Ready.
fn ready(conditions: Option<Vec<Condition>>) -> bool {
    conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// How often the operator compares an unchanged object with Kafka in this run.
const RESYNC: Duration = Duration::from_secs(60);

/// The operator's counter `name`, by its first label's value.
fn counters(port: u16, name: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let (_, metrics) = http_get(port, "/metrics").ok_or_else(|| anyhow::anyhow!("no /metrics"))?;
    let prefix = format!("{name}{{");
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once(' ')?;
            let kind = labels.split('"').nth(1)?.to_string();
            Some((kind, value.parse().ok()?))
        })
        .collect())
}
