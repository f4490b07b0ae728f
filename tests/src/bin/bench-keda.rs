//! EventOps' autoscaler against real KEDA (v2.21, operator + metrics adapter, through the
//! API server's aggregation layer and kube-controller-manager's HPA controller), one
//! after the other on the same worker Deployment, topic and burst. Prints figures;
//! asserts nothing about speed.
//!
//! 1. Reaction to a burst: a ConsumerGroup of `e2e-worker` pods (really running, each
//!    record takes `WORK_MS` under a per-pod lock, so one pod drains about 40 records/s)
//!    on a topic of `PARTITIONS` partitions gets `BURST` records. Scaled by (a) the EventOps
//!    operator with its defaults, (b) the same with `drainWithin`, then, with the EventOps
//!    operator stopped, by a KEDA ScaledObject on the group's Deployment with the group's
//!    own Kafka credentials (a TriggerAuthentication on the group's Secret) (c) in KEDA's
//!    defaults and (d) in its best documented configuration. For each: seconds from the
//!    burst's start to the first scale, to the needed replicas, to lag 0 (committed
//!    offsets against end offsets, read by this benchmark as the Kafka super user), the
//!    replica changes (each a rebalance of the group) and the seconds from lag 0 back to
//!    one replica.
//! 2. Memory: EventOps operator RSS with `MEMORY_GROUPS` idle ConsumerGroups (minReplicas
//!    0, one 1-partition topic each), then, that operator stopped, KEDA operator +
//!    adapter RSS with a ScaledObject (and TriggerAuthentication on the group's Secret)
//!    on each of those groups' Deployments.
//!
//! Run through `tools/bench-keda`, which builds in release mode, builds KEDA
//! (`tools/install-keda.sh`) and starts the environment.
//! `EVENTOPS_KEDA_DIR`: what `install-keda.sh` printed. `BENCH_KEDA_SCALE_IN_LIMIT`:
//! seconds to wait for the scale-in (default 420; KEDA's default HPA scale-down window is
//! 300 s). `BENCH_KEDA_GROUPS`: groups of the memory stage (default 500, 0 skips it).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventops_crds::{ConsumerGroup, EventTopic};
use eventops_operator::consumergroup::build::GROUP_LABEL;
use eventops_tests::bench::{wait_for, wait_quiet};
use eventops_tests::e2e::{Database, produce_burst};
use eventops_tests::keda::{self, KafkaTrigger, Keda};
use eventops_tests::pods::is_ready;
use eventops_tests::{ChildGuard, TestEnv, env, free_port, http_get, unique};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;

/// Partitions of the benchmark topic: the most replicas that can work.
const PARTITIONS: i32 = 6;
/// Records in the burst.
const BURST: usize = 9000;
/// EventOps' default `lagPerReplica`, also KEDA's `lagThreshold` here.
const LAG_PER_REPLICA: i64 = 1000;
/// Time each record takes in a worker (`E2E_WORK_MS`).
const WORK_MS: u64 = 20;
/// Replicas the burst needs: min(partitions, ceil(burst / lagPerReplica)).
const NEEDED: i32 = 6;
/// The ConsumerGroup (and its Deployment) of the reaction runs.
const GROUP: &str = "workers";

/// KEDA's best documented configuration for a fast reaction: a short polling interval
/// (it drives activation and KEDA's own checks; the HPA controller still asks for the
/// metric on its 15 s sync period), and HPA `behavior` that scales up at once (no
/// stabilization, up to 1000% or 100 pods per 1 s) and down after 60 s, EventOps'
/// default `scaleDownStabilization`.
fn keda_best() -> serde_json::Value {
    json!({
        "pollingInterval": 5,
        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
            "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max", "policies": [
                {"type": "Percent", "value": 1000, "periodSeconds": 1},
                {"type": "Pods", "value": 100, "periodSeconds": 1},
            ]},
            "scaleDown": {"stabilizationWindowSeconds": 60, "selectPolicy": "Max", "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 15},
            ]},
        }}},
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = env().await;
    // The whole benchmark, not a test: its own hard limit (the watchdog kills everything
    // this process started and exits).
    env.time_limit(Duration::from_secs(75 * 60));
    let keda_dir = std::env::var("EVENTOPS_KEDA_DIR")
        .map_err(|_| anyhow::anyhow!("EVENTOPS_KEDA_DIR is not set (tools/bench-keda sets it)"))?;
    let scale_in_limit = Duration::from_secs(env_num("BENCH_KEDA_SCALE_IN_LIMIT", 420));
    let memory_groups = env_num("BENCH_KEDA_GROUPS", 500) as usize;
    println!("load average at start: {}", load_average());

    // `eventops`, `keda`, `memory`: the parts to run (all by default).
    let parts = std::env::var("BENCH_KEDA_PARTS").unwrap_or_else(|_| "eventops,keda,memory".into());
    let part = |p: &str| parts.split(',').any(|x| x.trim() == p);
    let keda = if part("keda") || part("memory") {
        let started = Instant::now();
        let keda = Keda::start(
            &env,
            std::path::Path::new(&keda_dir),
            &env.info.state_dir.join("bench-keda"),
        )
        .await?;
        let (kop, kad) = keda.pids();
        println!(
            "KEDA v2.21.0 running ({:.0} s to APIService Available); idle RSS: operator {} MiB, adapter {} MiB",
            started.elapsed().as_secs_f64(),
            keda::rss_kib(kop)? / 1024,
            keda::rss_kib(kad)? / 1024
        );
        Some(keda)
    } else {
        None
    };

    let ns = env.namespace("bench-keda").await;
    let bench = Bench::setup(&env, &ns).await?;
    let port = free_port();
    let mut operator = spawn_operator(&env, &ns, port)?;

    let mut runs = Vec::new();
    bench.start_group().await?;
    println!(
        "\nburst: {BURST} records over {PARTITIONS} partitions; workers take {WORK_MS} ms a record \
         (one pod at a time); lagPerReplica = lagThreshold = {LAG_PER_REPLICA}; needed: {NEEDED} replicas"
    );
    if part("eventops") {
        runs.push(bench.run("eventops defaults", scale_in_limit).await?);
        bench.patch_scaling(json!({"drainWithin": "30s"})).await?;
        runs.push(
            bench
                .run("eventops drainWithin 30s", scale_in_limit)
                .await?,
        );
    }

    // KEDA owns replicas from here: the EventOps operator is stopped (it would scale the
    // same Deployment through its scale subresource).
    operator.kill()?;
    operator.wait()?;
    drop(operator);
    let keda_runs = [("keda defaults", json!({})), ("keda best", keda_best())];
    for (name, extra) in keda_runs.into_iter().filter(|_| part("keda")) {
        let keda = keda.as_ref().expect("started for this part");
        match bench.run_keda(name, extra, scale_in_limit).await {
            Ok(run) => runs.push(run),
            Err(e) => {
                println!("  {name}: FAILED: {e:#}\n{}", keda.log_tails());
                runs.push(Run::failed(name));
            }
        }
    }

    println!(
        "\nreaction to the burst (seconds from the burst's first record; steps = replica changes = rebalances):"
    );
    println!(
        "  {:<26} {:>12} {:>12} {:>9} {:>6} {:>6} {:>5} {:>16}",
        "scaler", "first scale", "6 replicas", "lag 0", "up", "down", "peak", "lag 0 -> 1 repl."
    );
    for r in &runs {
        println!(
            "  {:<26} {:>12} {:>12} {:>9} {:>6} {:>6} {:>5} {:>16}",
            r.name,
            secs(r.first_scale),
            secs(r.target),
            secs(r.drained),
            r.up,
            r.down,
            r.peak,
            secs(r.scale_in)
        );
    }

    let (mut eventops_rss, mut keda_rss) = (None, None);
    if let Some(keda) = keda
        .as_ref()
        .filter(|_| part("memory") && memory_groups > 0)
    {
        let (e, k) = memory(&env, keda, memory_groups).await?;
        eventops_rss = Some(e);
        keda_rss = Some(k);
    }
    println!("load average at end: {}", load_average());
    let field = |r: Option<&Run>, f: fn(&Run) -> Option<f64>| secs(r.and_then(f));
    let (e, k) = (
        runs.iter().find(|r| r.name == "eventops defaults"),
        runs.iter().find(|r| r.name == "keda best"),
    );
    let rss = |v: Option<u64>| v.map_or("-".to_string(), |v| (v / 1024).to_string());
    println!(
        "bench-keda: eventops first_scale_s={} target_s={} drained_s={} steps={} rss_mib={} | keda first_scale_s={} target_s={} drained_s={} steps={} rss_mib={}",
        field(e, |r| r.first_scale),
        field(e, |r| r.target),
        field(e, |r| r.drained),
        e.map_or("-".into(), |r| (r.up + r.down).to_string()),
        rss(eventops_rss),
        field(k, |r| r.first_scale),
        field(k, |r| r.target),
        field(k, |r| r.drained),
        k.map_or("-".into(), |r| (r.up + r.down).to_string()),
        rss(keda_rss),
    );
    drop(keda);
    Ok(())
}

/// The reaction benchmark's objects and clients.
struct Bench<'a> {
    env: &'a TestEnv,
    ns: String,
    topic: String,
    group_id: String,
    db: Database,
    lag: Arc<LagReader>,
}

/// One scaler's reaction to the burst.
struct Run {
    name: String,
    first_scale: Option<f64>,
    target: Option<f64>,
    drained: Option<f64>,
    up: usize,
    down: usize,
    peak: i32,
    scale_in: Option<f64>,
}

impl Run {
    fn failed(name: &str) -> Self {
        Run {
            name: name.into(),
            first_scale: None,
            target: None,
            drained: None,
            up: 0,
            down: 0,
            peak: 0,
            scale_in: None,
        }
    }
}

impl<'a> Bench<'a> {
    async fn setup(env: &'a TestEnv, ns: &str) -> anyhow::Result<Self> {
        let db = Database::create(&env.info, &unique("bench_keda").replace('-', "_")).await;
        let topic = unique("bench.keda.work");
        let group_id = unique("bench-keda-workers");
        let lag = Arc::new(LagReader::new(env, &group_id, &topic)?);
        Ok(Bench {
            env,
            ns: ns.into(),
            topic,
            group_id,
            db,
            lag,
        })
    }

    /// The EventTopic and ConsumerGroup; returns once one worker is Ready and has
    /// committed on every partition (a warm-up of 10 records each).
    async fn start_group(&self) -> anyhow::Result<()> {
        let params = PatchParams::apply("bench-keda").force();
        let topics: Api<EventTopic> = Api::namespaced(self.env.client.clone(), &self.ns);
        let groups: Api<ConsumerGroup> = Api::namespaced(self.env.client.clone(), &self.ns);
        topics
            .patch(
                "work",
                &params,
                &Patch::Apply(
                    json!({"apiVersion": "eventops.dev/v1alpha1", "kind": "EventTopic",
                    "metadata": {"name": "work"},
                    "spec": {"partitions": PARTITIONS, "topicName": self.topic}}),
                ),
            )
            .await?;
        groups
            .patch(
                GROUP,
                &params,
                &Patch::Apply(
                    json!({"apiVersion": "eventops.dev/v1alpha1", "kind": "ConsumerGroup",
                    "metadata": {"name": GROUP},
                    "spec": {
                        "groupId": self.group_id, "topics": ["work"],
                        "template": {"image": "ghcr.io/eventops/e2e-worker:bench", "env": [
                            {"name": "E2E_DATABASE_URL", "value": self.db.url},
                            {"name": "E2E_WORK_MS", "value": WORK_MS.to_string()},
                        ]},
                        "scaling": {"minReplicas": 1, "maxReplicas": PARTITIONS,
                                    "lagPerReplica": LAG_PER_REPLICA},
                    }}),
                ),
            )
            .await?;
        wait_for(Duration::from_secs(180), "one worker Ready", || async {
            (self.replicas().await == Some(1) && self.ready().await == Some(1)).then_some(())
        })
        .await?;
        let n = 10 * PARTITIONS as usize;
        produce_burst(&self.env.info, &self.topic, PARTITIONS, "warm-up", n).await;
        wait_for(
            Duration::from_secs(120),
            "the warm-up records processed",
            || async { (self.lag().await == Some(0)).then_some(()) },
        )
        .await
    }

    async fn patch_scaling(&self, scaling: serde_json::Value) -> anyhow::Result<()> {
        let groups: Api<ConsumerGroup> = Api::namespaced(self.env.client.clone(), &self.ns);
        groups
            .patch(
                GROUP,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"scaling": scaling}})),
            )
            .await?;
        Ok(())
    }

    async fn replicas(&self) -> Option<i32> {
        let deployments: Api<Deployment> = Api::namespaced(self.env.client.clone(), &self.ns);
        deployments.get(GROUP).await.ok()?.spec.replicas
    }

    async fn ready(&self) -> Option<usize> {
        let pods: Api<Pod> = Api::namespaced(self.env.client.clone(), &self.ns);
        let list = pods
            .list(&ListParams::default().labels(&format!("{GROUP_LABEL}={GROUP}")))
            .await
            .ok()?;
        Some(list.items.iter().filter(|p| is_ready(p)).count())
    }

    async fn lag(&self) -> Option<i64> {
        let lag = self.lag.clone();
        tokio::task::spawn_blocking(move || lag.total())
            .await
            .ok()?
    }

    /// A KEDA run: TriggerAuthentication and ScaledObject (spec `extra` merged in), a
    /// wait until the HPA KEDA made reads the external metric, the burst, then the
    /// ScaledObject deleted and the Deployment left at one replica.
    async fn run_keda(
        &self,
        name: &str,
        extra: serde_json::Value,
        scale_in_limit: Duration,
    ) -> anyhow::Result<Run> {
        let env = self.env;
        keda::apply_json(
            env,
            &keda::trigger_authentication(&self.ns, "workers-kafka", &format!("{GROUP}-kafka")),
        )?;
        let trigger = KafkaTrigger {
            bootstrap: &env.info.kafka_bootstrap,
            group_id: &self.group_id,
            topic: &self.topic,
            lag_threshold: LAG_PER_REPLICA,
            authentication: "workers-kafka",
        };
        let so = keda::scaled_object(&self.ns, GROUP, GROUP, (1, PARTITIONS), &trigger, extra);
        keda::apply_json(env, &so)?;
        let hpa = format!("keda-hpa-{GROUP}");
        let set_up = Instant::now();
        wait_for(
            Duration::from_secs(120),
            "the HPA reading KEDA's external metric through the aggregation layer",
            || async {
                let value = keda::kubectl(
                    env,
                    &[
                        "get",
                        "hpa",
                        &hpa,
                        "-n",
                        &self.ns,
                        "-o",
                        "jsonpath={.status.currentMetrics[0].external.current.averageValue}",
                    ],
                    None,
                    None,
                )
                .ok()?;
                (!value.is_empty()).then_some(value)
            },
        )
        .await?;
        println!(
            "\n{name}: ScaledObject Ready, HPA {hpa} reads the metric ({:.0} s after the apply)",
            set_up.elapsed().as_secs_f64()
        );
        let run = self.run(name, scale_in_limit).await;
        keda::kubectl(
            env,
            &[
                "delete",
                "scaledobject",
                GROUP,
                "-n",
                &self.ns,
                "--wait=true",
                "--timeout=60s",
            ],
            None,
            None,
        )?;
        wait_for(Duration::from_secs(60), "KEDA deleting its HPA", || async {
            keda::kubectl(env, &["get", "hpa", &hpa, "-n", &self.ns], None, None)
                .is_err()
                .then_some(())
        })
        .await?;
        let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &self.ns);
        deployments
            .patch_scale(
                GROUP,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 1}})),
            )
            .await?;
        run
    }

    /// Waits for one replica and no lag, sends the burst, and samples until the lag is 0
    /// and the Deployment is back at one replica (or `scale_in_limit` after lag 0).
    async fn run(&self, name: &str, scale_in_limit: Duration) -> anyhow::Result<Run> {
        wait_for(
            Duration::from_secs(scale_in_limit.as_secs() + 120),
            "one replica, one Ready worker and no lag before the burst",
            || async {
                (self.replicas().await == Some(1)
                    && self.ready().await == Some(1)
                    && self.lag().await == Some(0))
                .then_some(())
            },
        )
        .await?;
        let sampler = Sampler::start(self);
        let t0 = sampler.now();
        // Event envelopes (the workers' runtime dead-letters anything else), ids unique
        // per run (the inbox would skip a repeated one).
        let prefix = unique("burst");
        produce_burst(&self.env.info, &self.topic, PARTITIONS, &prefix, BURST).await;
        let produced = sampler.now() - t0;
        let drained = wait_for(
            Duration::from_secs(300),
            "lag 0 after the burst",
            || async {
                let samples = sampler.samples();
                let first_lag = samples.iter().position(|s| s.lag.is_some_and(|l| l > 0))?;
                samples[first_lag..]
                    .iter()
                    .find(|s| s.lag == Some(0))
                    .map(|s| s.at)
            },
        )
        .await;
        let back = match drained {
            Ok(drained) => wait_for(scale_in_limit, "back at one replica", || async {
                sampler
                    .samples()
                    .iter()
                    .find(|s| s.at > drained && s.replicas == Some(1))
                    .map(|s| s.at)
            })
            .await
            .ok(),
            Err(_) => None,
        };
        let samples = sampler.stop();
        let rel = |at: Duration| (at - t0).as_secs_f64();
        let replicas: Vec<i32> = samples.iter().filter_map(|s| s.replicas).collect();
        let (mut up, mut down) = (0, 0);
        for w in replicas.windows(2) {
            if w[1] > w[0] {
                up += 1;
            } else if w[1] < w[0] {
                down += 1;
            }
        }
        let drained_at = drained.as_ref().ok().copied();
        let run = Run {
            name: name.into(),
            first_scale: samples
                .iter()
                .find(|s| s.replicas.is_some_and(|r| r != 1))
                .map(|s| rel(s.at)),
            target: samples
                .iter()
                .find(|s| s.replicas.is_some_and(|r| r >= NEEDED))
                .map(|s| rel(s.at)),
            drained: drained_at.map(rel),
            up,
            down,
            peak: replicas.iter().copied().max().unwrap_or(0),
            scale_in: drained_at.zip(back).map(|(d, b)| (b - d).as_secs_f64()),
        };
        println!(
            "\n{name}: burst produced in {:.2} s; timeline (on each change of replicas or Ready workers):",
            produced.as_secs_f64()
        );
        print!("{}", timeline(&samples, t0));
        if let Err(e) = drained {
            println!("  lag never reached 0: {e}");
        } else if back.is_none() {
            println!(
                "  not back at one replica within {} s of lag 0",
                scale_in_limit.as_secs()
            );
        }
        Ok(run)
    }
}

/// The benchmark's own view of a group's lag: committed offsets (OffsetFetch) against
/// end offsets, as the Kafka super user, independent of both scalers.
struct LagReader {
    consumer: BaseConsumer,
    topic: String,
}

impl LagReader {
    fn new(env: &TestEnv, group_id: &str, topic: &str) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = env
            .info
            .kafka_admin_config()
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(LagReader {
            consumer,
            topic: topic.into(),
        })
    }

    /// Total lag over the partitions; a partition without a commit counts from its
    /// log-start (the workers start from the earliest record). `None` on a Kafka error.
    fn total(&self) -> Option<i64> {
        let timeout = Duration::from_secs(5);
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition(&self.topic, p);
        }
        let committed = self.consumer.committed_offsets(tpl, timeout).ok()?;
        let mut total = 0;
        for p in 0..PARTITIONS {
            let (low, high) = self
                .consumer
                .fetch_watermarks(&self.topic, p, timeout)
                .ok()?;
            let from = committed
                .find_partition(&self.topic, p)
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0)
                .unwrap_or(low)
                .max(low);
            total += (high - from).max(0);
        }
        Some(total)
    }
}

/// One moment of the run.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    replicas: Option<i32>,
    ready: Option<usize>,
    lag: Option<i64>,
}

/// Samples the Deployment's replicas, the Ready workers and the lag every 200 ms.
struct Sampler {
    started: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(bench: &Bench<'_>) -> Self {
        let deployments: Api<Deployment> = Api::namespaced(bench.env.client.clone(), &bench.ns);
        let pods: Api<Pod> = Api::namespaced(bench.env.client.clone(), &bench.ns);
        let lag = bench.lag.clone();
        let started = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let selector = ListParams::default().labels(&format!("{GROUP_LABEL}={GROUP}"));
            loop {
                tick.tick().await;
                let at = started.elapsed();
                let lag = lag.clone();
                let (d, p, l) = tokio::join!(
                    deployments.get(GROUP),
                    pods.list(&selector),
                    tokio::task::spawn_blocking(move || lag.total()),
                );
                out.lock().unwrap().push(Sample {
                    at,
                    replicas: d.ok().and_then(|d| d.spec.replicas),
                    ready: p
                        .ok()
                        .map(|p| p.items.iter().filter(|p| is_ready(p)).count()),
                    lag: l.ok().flatten(),
                });
            }
        });
        Sampler {
            started,
            samples,
            task,
        }
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    fn stop(self) -> Vec<Sample> {
        self.task.abort();
        self.samples()
    }
}

/// One line per change of replicas or Ready workers, and one when the lag reaches 0.
fn timeline(samples: &[Sample], t0: Duration) -> String {
    let mut out = String::from("        t     lag  replicas  ready\n");
    let mut last = None;
    let mut was_zero = true;
    for s in samples {
        let zero = s.lag == Some(0);
        if last != Some((s.replicas, s.ready)) || (zero && !was_zero) {
            let show = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
            out.push_str(&format!(
                "  {:>6.1}s {:>7} {:>9} {:>6}\n",
                (s.at.saturating_sub(t0)).as_secs_f64(),
                show(s.lag),
                show(s.replicas.map(i64::from)),
                show(s.ready.map(|r| r as i64)),
            ));
            last = Some((s.replicas, s.ready));
        }
        if s.lag.is_some() {
            was_zero = zero;
        }
    }
    out
}

/// Memory with `n` idle groups: EventOps operator RSS, then (that operator stopped) KEDA
/// operator + adapter RSS with a ScaledObject on each group's Deployment. KiB each.
async fn memory(env: &TestEnv, keda: &Keda, n: usize) -> anyhow::Result<(u64, u64)> {
    let ns = env.namespace("bench-keda-mem").await;
    let port = free_port();
    let mut operator = spawn_operator(env, &ns, port)?;
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);
    let prefix = unique("bkm");
    println!(
        "\nmemory: {n} ConsumerGroups with minReplicas 0 (idle, no pods), one 1-partition topic each"
    );
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (topics, groups, prefix) = (topics.clone(), groups.clone(), prefix.clone());
            async move {
                let params = PatchParams::apply("bench-keda").force();
                topics
                    .patch(
                        &format!("t{i}"),
                        &params,
                        &Patch::Apply(json!({"apiVersion": "eventops.dev/v1alpha1", "kind": "EventTopic",
                            "metadata": {"name": format!("t{i}")},
                            "spec": {"partitions": 1, "topicName": format!("{prefix}.t{i}")}})),
                    )
                    .await?;
                groups
                    .patch(
                        &format!("g{i}"),
                        &params,
                        &Patch::Apply(json!({"apiVersion": "eventops.dev/v1alpha1", "kind": "ConsumerGroup",
                            "metadata": {"name": format!("g{i}")},
                            "spec": {"groupId": format!("{prefix}-g{i}"), "topics": [format!("t{i}")],
                                     "template": {"image": "ghcr.io/eventops/e2e-worker:bench"},
                                     "scaling": {"minReplicas": 0, "maxReplicas": 1,
                                                 "lagPerReplica": LAG_PER_REPLICA}}})),
                    )
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()?;
    wait_for(
        Duration::from_secs(900),
        "every group Ready and evaluated",
        || async {
            let list = groups.list(&Default::default()).await.ok()?;
            let done = list
                .items
                .iter()
                .filter(|cg| {
                    cg.status.as_ref().is_some_and(|s| {
                        s.desired_replicas.is_some()
                            && s.conditions
                                .iter()
                                .any(|c| c.type_ == "Ready" && c.status == "True")
                    })
                })
                .count();
            (done >= n).then_some(())
        },
    )
    .await?;
    wait_quiet(port).await?;
    // Evaluated every second meanwhile: RSS after 30 s more of autoscaler cycles.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let eventops_rss = keda::rss_kib(operator.id())?;
    println!(
        "  EventOps operator: {n} groups Ready and evaluated {:.0} s after the first apply; RSS {} MiB",
        started.elapsed().as_secs_f64(),
        eventops_rss / 1024
    );
    operator.kill()?;
    operator.wait()?;
    drop(operator);

    let started = Instant::now();
    let objects: Vec<serde_json::Value> = (0..n)
        .flat_map(|i| {
            let (group_id, topic) = (format!("{prefix}-g{i}"), format!("{prefix}.t{i}"));
            let (name, auth) = (format!("g{i}"), format!("g{i}-kafka"));
            let trigger = KafkaTrigger {
                bootstrap: &env.info.kafka_bootstrap,
                group_id: &group_id,
                topic: &topic,
                lag_threshold: LAG_PER_REPLICA,
                authentication: &auth,
            };
            // The group's own Secret is named like the TriggerAuthentication here.
            [
                keda::trigger_authentication(&ns, &auth, &auth),
                keda::scaled_object(&ns, &name, &name, (0, 1), &trigger, json!({})),
            ]
        })
        .collect();
    for chunk in objects.chunks(100) {
        keda::apply_json(
            env,
            &json!({"apiVersion": "v1", "kind": "List", "items": chunk}),
        )?;
    }
    let ready_count = || {
        keda::kubectl(
            env,
            &[
                "get",
                "scaledobjects",
                "-n",
                &ns,
                "-o",
                "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
            ],
            None,
            None,
        )
        .map(|out| out.lines().filter(|l| *l == "True").count())
        .unwrap_or(0)
    };
    wait_for(
        Duration::from_secs(900),
        "every ScaledObject Ready",
        || async { (ready_count() >= n).then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}:\n{}", keda.log_tails()))?;
    let ready_after = started.elapsed();
    // Two of KEDA's default 30 s polling intervals: every scaler has polled Kafka.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (kop, kad) = keda.pids();
    let (op_rss, ad_rss) = (keda::rss_kib(kop)?, keda::rss_kib(kad)?);
    println!(
        "  KEDA: {n} ScaledObjects (one TriggerAuthentication each, on the group's Secret) Ready {:.0} s after the apply; \
         RSS 60 s later: operator {} MiB + adapter {} MiB = {} MiB",
        ready_after.as_secs_f64(),
        op_rss / 1024,
        ad_rss / 1024,
        (op_rss + ad_rss) / 1024
    );
    Ok((eventops_rss, op_rss + ad_rss))
}

/// The release EventOps operator watching `ns`, metrics on `port`, once ready.
fn spawn_operator(env: &TestEnv, ns: &str, port: u16) -> anyhow::Result<ChildGuard> {
    let child = env
        .operator_command(ns, port)
        .args(["--no-leader-election", "--resync-interval", "5m"])
        .env("RUST_LOG", "warn")
        .spawn()?;
    let guard = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(240);
    while http_get(port, "/readyz").is_none_or(|(c, _)| c != 200) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the EventOps operator was not ready in 240 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(guard)
}

fn secs(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.1}"))
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
