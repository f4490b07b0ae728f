//! Benchmark of the lag-based autoscaler. Prints figures; asserts nothing about speed.
//!
//! 1. Reaction time: from the end of a produced burst to the Deployment's replicas
//!    changing, with the default scaling settings; each run and the median.
//! 2. Cost per evaluation cycle with 1, 50 and 500 ConsumerGroups (or the counts given as
//!    the first argument, e.g. `1,50,500,5000`) on one broker: Kafka
//!    requests and operator CPU time, and, measured in the same run, the same for a
//!    per-group-client baseline (one Kafka client per group polling its own metadata,
//!    committed offsets and watermarks every cycle, as KEDA's Kafka scaler does),
//!    with the ratio.
//! 3. Operator RSS with the most ConsumerGroups being evaluated, and the baseline's.
//!
//! Run through `tools/bench-autoscaler`, which builds in release mode and starts the
//! environment. `bench-autoscaler baseline <prefix> <first> <end> <seconds>` is a baseline
//! process the benchmark spawns: the groups `first..end`, at most
//! [`CLIENTS_PER_PROCESS`] per process (each client holds several file descriptors and
//! threads), all running at once.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use eventops_crds::{ConsumerGroup, EventTopic};
use eventops_tests::autoscale::produce_spread;
use eventops_tests::bench::{process_usage, reconciles, settle, wait_for};
use eventops_tests::{TestEnv, env, free_port, http_get, unique};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};
use serde_json::json;

/// Runs of the reaction-time measurement.
const REACTION_RUNS: usize = 5;
/// Length of each cost measurement window.
const WINDOW: Duration = Duration::from_secs(15);
/// Baseline clients per process: 1,000 clients hold about 7,000 file descriptors.
const CLIENTS_PER_PROCESS: usize = 1000;
/// Most baseline clients run at once. With 5,000 (five processes) the kernel's OOM
/// killer stopped one at 3.6 GiB RSS on the 24 GiB machine; beyond this many, the
/// first [`BASELINE_CLIENTS`] groups run and the per-cycle figures and RSS are scaled
/// to all (each client is alike and works alone, as in the runs up to 1,000).
const BASELINE_CLIENTS: usize = 1000;
/// Group counts the cost is measured for, unless the first argument names others.
const STAGES: [usize; 3] = [1, 50, 500];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("baseline") {
        return baseline(
            &args[2],
            args[3].parse()?..args[4].parse()?,
            args[5].parse()?,
        )
        .await;
    }
    let env = env().await;
    // The test watchdog's default of 10 minutes is for tests; 5,000 groups take longer.
    env.time_limit(Duration::from_secs(60 * 60));
    let ns = env.namespace("bench-as").await;
    let port = free_port();
    let mut operator = env
        .operator_command(&ns, port)
        .args(["--no-leader-election", "--resync-interval", "5m"])
        .env("RUST_LOG", "warn")
        .spawn()?;
    while http_get(port, "/readyz").is_none_or(|(c, _)| c != 200) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = operator.id();
    let stages = match args.get(1) {
        Some(list) => list
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<usize>, _>>()
            .map_err(|e| anyhow::anyhow!("group counts like 1,50,500,5000: {e}"))?,
        None => STAGES.to_vec(),
    };
    let result = run(&env, &ns, port, pid, &stages).await;
    operator.kill()?;
    operator.wait()?;
    result
}

async fn run(env: &TestEnv, ns: &str, port: u16, pid: u32, stages: &[usize]) -> anyhow::Result<()> {
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), ns);
    let prefix = unique("bas");

    // 1. Reaction time, default scaling settings.
    println!(
        "reaction time (default settings: lagPerReplica 1000, 1 s cycle; burst of 2500 records, 1 -> 3 replicas)"
    );
    let mut reactions = Vec::new();
    for run in 0..REACTION_RUNS {
        let (t, g) = (format!("r{run}"), format!("r{run}"));
        let topic = format!("{prefix}.r{run}.created");
        apply_pair(
            &topics,
            &groups,
            &t,
            &g,
            &topic,
            4,
            &format!("{prefix}-r{run}"),
        )
        .await?;
        wait_for(
            Duration::from_secs(120),
            "the group evaluated at 1 replica",
            || async {
                let cg = groups.get(&g).await.ok()?;
                let d = deployments.get(&g).await.ok()?;
                (cg.status?.desired_replicas == Some(1) && d.spec.replicas == Some(1)).then_some(())
            },
        )
        .await?;
        let info = env.info.clone();
        let t2 = topic.clone();
        tokio::task::spawn_blocking(move || produce_spread(&info, &t2, &[0, 1, 2, 3], 2500))
            .await?;
        let burst_end = Instant::now();
        wait_for(Duration::from_secs(60), "replicas to change", || async {
            let d = deployments.get(&g).await.ok()?;
            (d.spec.replicas != Some(1)).then_some(())
        })
        .await?;
        let took = burst_end.elapsed();
        println!("  run {}: {:.0} ms", run + 1, took.as_secs_f64() * 1000.0);
        reactions.push(took);
        // Leave it for the cost stages at its own pace: not counted there.
        groups.delete(&g, &Default::default()).await?;
        topics.delete(&t, &Default::default()).await?;
    }
    reactions.sort();
    println!(
        "  median: {:.0} ms over {REACTION_RUNS} runs (target: under 2000 ms)",
        reactions[REACTION_RUNS / 2].as_secs_f64() * 1000.0
    );

    // 2. and 3. Cost per cycle by number of groups.
    println!();
    println!(
        "cost per evaluation cycle ({}s windows; Kafka requests = every request the process sent)",
        WINDOW.as_secs()
    );
    println!(
        "  {:>6} | {:>22} | {:>24} | {:>10} | {:>10}",
        "groups",
        "EventOps req / CPU ms",
        "per-group clients req / CPU ms",
        "req ratio",
        "CPU ratio"
    );
    let mut created = 0;
    let mut rss_largest = String::new();
    let mut baseline_rss = String::new();
    let largest = stages.iter().copied().max().unwrap_or(0);
    for &n in stages {
        let pairs: Vec<usize> = (created..n).collect();
        futures::stream::iter(pairs)
            .map(|i| {
                let (topics, groups, prefix) = (topics.clone(), groups.clone(), prefix.clone());
                async move {
                    apply_pair(
                        &topics,
                        &groups,
                        &format!("t{i}"),
                        &format!("g{i}"),
                        &format!("{prefix}.t{i}.created"),
                        1,
                        &format!("{prefix}-g{i}"),
                    )
                    .await
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<()>>>()?;
        created = n;
        // Listed every 5 s, not every 100 ms: a list of thousands of groups loads the
        // API server the operator shares.
        let deadline = Instant::now() + Duration::from_secs(900.max(n as u64 / 4));
        loop {
            // A failed list (the API server busy) counts as none evaluated yet.
            let evaluated = groups.list(&Default::default()).await.map_or(0, |list| {
                list.items
                    .iter()
                    .filter(|cg| {
                        cg.status
                            .as_ref()
                            .is_some_and(|s| s.desired_replicas.is_some())
                    })
                    .count()
            });
            if evaluated >= n {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{evaluated} of {n} groups evaluated when the wait ended"
            );
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        // Settle: reconciles of the new groups (each sends admin requests of its own)
        // and the Deployments' first ReplicaSets, so the window holds autoscaling only.
        // With thousands of groups the controller manager takes long over their
        // Deployments, and each change starts a reconcile: after 5 minutes the window
        // is measured anyway, and says how many reconciles ran in it.
        let quiet = settle(port, Duration::from_secs(300)).await;
        let reconciled = reconciles(port);
        let before = operator_sample(port, pid)?;
        tokio::time::sleep(WINDOW).await;
        let after = operator_sample(port, pid)?;
        let reconciled = reconciles(port) - reconciled;
        let cycles = (after.cycles - before.cycles).max(1.0);
        let ops_req = (after.requests - before.requests) / cycles;
        let ops_cpu = (after.cpu_ms - before.cpu_ms) / cycles;
        if n == largest {
            rss_largest = after.rss.clone();
        }

        let run = n.min(BASELINE_CLIENTS);
        let scale = n as f64 / run as f64;
        let parts = (0..run).step_by(CLIENTS_PER_PROCESS).map(|first| {
            let end = (first + CLIENTS_PER_PROCESS).min(run);
            let prefix = prefix.clone();
            async move {
                let out = tokio::process::Command::new(std::env::current_exe()?)
                    .args(["baseline", &prefix])
                    .args([first, end].map(|i| i.to_string()))
                    .arg(WINDOW.as_secs().to_string())
                    // A failed stage (another part's error) stops them all.
                    .kill_on_drop(true)
                    .output()
                    .await?;
                let text = String::from_utf8_lossy(&out.stdout);
                let line = text
                    .lines()
                    .find(|l| l.starts_with("BASELINE"))
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "baseline printed no result: {text}{}",
                            String::from_utf8_lossy(&out.stderr)
                        )
                    })?;
                let field = |name: &str| -> f64 {
                    line.split_whitespace()
                        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(f64::NAN)
                };
                anyhow::Ok(["requests", "cycles", "cpu_ms", "rss_kb"].map(field))
            }
        });
        let parts = futures::future::try_join_all(parts).await?;
        // Per cycle, requests and CPU add up over the processes (each ran its own cycles);
        // memory adds up; the cycle count shown is the slowest process's.
        let per_cycle = |i: usize| parts.iter().map(|p| p[i] / p[1].max(1.0)).sum::<f64>();
        let (b_req, b_cpu) = (per_cycle(0) * scale, per_cycle(2) * scale);
        let b_cycles = parts.iter().map(|p| p[1]).fold(f64::INFINITY, f64::min);
        let sampled = if run < n {
            format!(", {run} of its {n} clients run and its figures scaled by {scale:.2}")
        } else {
            String::new()
        };
        if n == largest {
            let rss_kb: f64 = parts.iter().map(|p| p[3]).sum::<f64>() * scale;
            baseline_rss = format!(
                "{:.0} MiB ({} process(es){sampled})",
                rss_kb / 1024.0,
                parts.len()
            );
        }
        println!(
            "  {n:>6} | {:>10.1} / {:>8.1} | {:>12.1} / {:>10.1} | {:>9.1}x | {:>9.1}x",
            ops_req,
            ops_cpu,
            b_req,
            b_cpu,
            b_req / ops_req,
            b_cpu / ops_cpu
        );
        println!(
            "         (EventOps: {:.0} cycles and {reconciled} reconciles in the window (quiet before it: {quiet}), by type per cycle: {}; baseline: {:.0} cycles{sampled})",
            cycles,
            after.by_type_delta(&before, cycles),
            b_cycles
        );
    }
    println!();
    println!("operator RSS with {largest} ConsumerGroups evaluated every second: {rss_largest}");
    println!("per-group-client baseline RSS with {largest} groups: {baseline_rss}");
    Ok(())
}

async fn apply_pair(
    topics: &Api<EventTopic>,
    groups: &Api<ConsumerGroup>,
    topic_name: &str,
    group_name: &str,
    kafka_topic: &str,
    partitions: i32,
    group_id: &str,
) -> anyhow::Result<()> {
    let params = PatchParams::apply("bench").force();
    let topic = json!({"apiVersion": "eventops.dev/v1alpha1", "kind": "EventTopic",
        "metadata": {"name": topic_name},
        "spec": {"partitions": partitions, "topicName": kafka_topic}});
    let group = json!({"apiVersion": "eventops.dev/v1alpha1", "kind": "ConsumerGroup",
        "metadata": {"name": group_name},
        "spec": {"groupId": group_id, "topics": [topic_name], "template": {"image": "worker:1"}}});
    topics
        .patch(topic_name, &params, &Patch::Apply(&topic))
        .await?;
    groups
        .patch(group_name, &params, &Patch::Apply(&group))
        .await?;
    Ok(())
}

/// What the operator's /metrics and /proc say at one moment.
struct Sample {
    requests: f64,
    by_type: std::collections::BTreeMap<String, f64>,
    cycles: f64,
    cpu_ms: f64,
    rss: String,
}

impl Sample {
    fn by_type_delta(&self, before: &Sample, cycles: f64) -> String {
        self.by_type
            .iter()
            .map(|(k, v)| {
                (
                    k,
                    (v - before.by_type.get(k).copied().unwrap_or(0.0)) / cycles,
                )
            })
            .filter(|(_, v)| *v > 0.0)
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn operator_sample(port: u16, pid: u32) -> anyhow::Result<Sample> {
    let (_, metrics) = http_get(port, "/metrics").ok_or_else(|| anyhow::anyhow!("no /metrics"))?;
    let mut by_type = std::collections::BTreeMap::new();
    let mut cycles = 0.0;
    for line in metrics.lines() {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if line.starts_with("eventops_operator_autoscaler_cycle_duration_seconds_count") {
            cycles = value;
        } else if line.starts_with("eventops_operator_kafka_admin_requests_total{") {
            let kind = labels.split('"').nth(1).unwrap_or("?");
            *by_type.entry(format!("admin {kind}")).or_default() += value;
        } else if line.starts_with("eventops_operator_kafka_client_requests{") {
            let mut quoted = labels.split('"').skip(1).step_by(2);
            let (client, kind) = (quoted.next().unwrap_or("?"), quoted.next().unwrap_or("?"));
            *by_type.entry(format!("{client} {kind}")).or_default() += value;
        }
    }
    let (cpu_ms, rss_kb) = process_usage(pid)?;
    Ok(Sample {
        requests: by_type.values().sum(),
        by_type,
        cycles,
        cpu_ms,
        rss: format!("{:.0} MiB", rss_kb / 1024.0),
    })
}

/// One baseline client: its consumer, its group's topic, its request count.
type Client = (Arc<BaseConsumer<Counting>>, String, Arc<AtomicI64>);

/// Keeps librdkafka's request counts of one client.
struct Counting(Arc<AtomicI64>);

impl ClientContext for Counting {
    fn stats(&self, statistics: Statistics) {
        let total: i64 = statistics
            .brokers
            .values()
            .flat_map(|b| b.req.values())
            .sum();
        self.0.store(total, Ordering::Relaxed);
    }
}
impl ConsumerContext for Counting {}

/// The per-group-client baseline: one Kafka client per group, each cycle reading its
/// topic's metadata, its committed offsets (OffsetFetch) and each partition's low and
/// high watermarks (ListOffsets), as KEDA's Kafka scaler does per ScaledObject.
async fn baseline(prefix: &str, groups: Range<usize>, seconds: u64) -> anyhow::Result<()> {
    let info = eventops_devenv::EnvInfo::from_env()?;
    let mut clients = Vec::new();
    for i in groups {
        let count = Arc::new(AtomicI64::new(0));
        let consumer: BaseConsumer<Counting> = info
            .kafka_admin_config()
            .set("group.id", format!("{prefix}-g{i}"))
            .set("enable.auto.commit", "false")
            .set("statistics.interval.ms", "1000")
            .create_with_context(Counting(count.clone()))?;
        clients.push((Arc::new(consumer), format!("{prefix}.t{i}.created"), count));
    }
    let cycle = |clients: &Vec<Client>| {
        let tasks: Vec<_> = clients
            .iter()
            .map(|(c, topic, _)| {
                let (c, topic) = (c.clone(), topic.clone());
                tokio::task::spawn_blocking(move || {
                    let timeout = Duration::from_secs(10);
                    // Serves the statistics callback, as a polling client would.
                    let _ = c.poll(Duration::ZERO);
                    let Ok(md) = c.fetch_metadata(Some(&topic), timeout) else {
                        return;
                    };
                    let partitions = md.topics().first().map_or(0, |t| t.partitions().len());
                    let mut tpl = TopicPartitionList::new();
                    for p in 0..partitions as i32 {
                        tpl.add_partition(&topic, p);
                    }
                    let _ = c.committed_offsets(tpl, timeout);
                    for p in 0..partitions as i32 {
                        let _ = c.fetch_watermarks(&topic, p, timeout);
                    }
                })
            })
            .collect();
        futures::future::join_all(tasks)
    };
    // Warm up: connect and authenticate every client.
    for _ in 0..3 {
        cycle(&clients).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let total = |clients: &Vec<Client>| -> i64 {
        clients
            .iter()
            .map(|(_, _, c)| c.load(Ordering::Relaxed))
            .sum()
    };
    let pid = std::process::id();
    let (cpu0, _) = process_usage(pid)?;
    let req0 = total(&clients);
    let started = Instant::now();
    let mut cycles = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while started.elapsed() < Duration::from_secs(seconds) {
        ticker.tick().await;
        cycle(&clients).await;
        cycles += 1;
    }
    // librdkafka publishes statistics every second: wait for the last cycle's counts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (cpu1, rss) = process_usage(pid)?;
    let req1 = total(&clients);
    println!(
        "BASELINE requests={} cycles={cycles} cpu_ms={:.1} rss_kb={rss:.0}",
        req1 - req0,
        cpu1 - cpu0
    );
    Ok(())
}
