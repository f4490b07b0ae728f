//! Helpers for the end-to-end autoscaling test: the `e2e-worker` pods' database, a burst
//! of events, a sampler of what the cluster shows while the group scales (replicas,
//! ready pods, lag) and Kafka's own view of the group's lag.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventops_crds::ConsumerGroup;
use eventops_devenv::EnvInfo;
use futures::future::join_all;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use rdkafka::producer::FutureRecord;

use crate::{OperatorHandle, TestEnv};

/// A fresh PostgreSQL database for one test, with the tables `e2e-worker` writes:
/// `e2e_processed` (one row per event id: the effect, written in the inbox transaction,
/// with a `deliveries` counter) and `e2e_runs` (one row per handler run).
pub struct Database {
    /// Its URL, for the worker pods.
    pub url: String,
    /// A client on it.
    pub client: tokio_postgres::Client,
}

impl Database {
    /// Creates the database `name` and its tables.
    pub async fn create(info: &EnvInfo, name: &str) -> Self {
        let admin = crate::runtime::postgres(info).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        let (base, _) = info
            .postgres_url
            .rsplit_once('/')
            .expect("postgres_url ends in /<database>");
        let url = format!("{base}/{name}");
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {name}: {e}"));
        tokio::spawn(connection);
        client
            .batch_execute(
                "CREATE TABLE e2e_processed (event_id text PRIMARY KEY, partition int NOT NULL, \
                 \"offset\" bigint NOT NULL, pod text NOT NULL, deliveries int NOT NULL DEFAULT 1); \
                 CREATE TABLE e2e_runs (event_id text NOT NULL, pod text NOT NULL);",
            )
            .await
            .expect("creating the e2e tables");
        Self { url, client }
    }

    /// A new client on an existing test database.
    pub async fn connect(url: &str) -> Result<Self, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(Self {
            url: url.to_string(),
            client,
        })
    }

    /// Event ids with an effect.
    pub async fn processed(&self) -> BTreeSet<String> {
        self.client
            .query("SELECT event_id FROM e2e_processed", &[])
            .await
            .expect("reading e2e_processed")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Event ids whose effect was applied more than once, with the count.
    pub async fn repeated_effects(&self) -> BTreeMap<String, i32> {
        self.client
            .query(
                "SELECT event_id, deliveries FROM e2e_processed WHERE deliveries > 1",
                &[],
            )
            .await
            .expect("reading e2e_processed")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Handler runs in all, and per pod.
    pub async fn runs_per_pod(&self) -> BTreeMap<String, i64> {
        self.client
            .query("SELECT pod, count(*) FROM e2e_runs GROUP BY pod", &[])
            .await
            .expect("reading e2e_runs")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
}

/// Produces events `<prefix>-0` … `<prefix>-<n-1>` (envelopes keyed by id) round-robin
/// over `partitions` partitions of `topic`, all in flight at once; returns their ids
/// once Kafka has acknowledged every one.
pub async fn produce_burst(
    info: &EnvInfo,
    topic: &str,
    partitions: i32,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let producer = crate::runtime::producer(info);
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let payloads: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| crate::runtime::event(id, 1, serde_json::json!({"n": id})))
        .collect();
    let sends = ids
        .iter()
        .zip(&payloads)
        .enumerate()
        .map(|(i, (id, payload))| {
            producer.send(
                FutureRecord::to(topic)
                    .partition(i as i32 % partitions)
                    .key(id)
                    .payload(payload),
                Duration::from_secs(30),
            )
        });
    for result in join_all(sends).await {
        result.unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }
    ids
}

/// What the cluster showed at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Since the sampler started.
    pub at: Duration,
    /// The Deployment's `spec.replicas`.
    pub replicas: Option<i32>,
    /// Pods of the group (any phase, terminating included).
    pub pods: usize,
    /// Pods of the group whose `Ready` condition is `True`.
    pub ready: usize,
    /// The group's lag as the operator measured it last (its metric
    /// `eventops_operator_consumergroup_lag`; `status.totalLag` is refreshed only when
    /// the decision changes or every 30 s).
    pub lag: Option<i64>,
    /// The ConsumerGroup's `status.totalLag`.
    pub status_lag: Option<i64>,
}

/// Samples a ConsumerGroup's Deployment, pods and status every 200 ms in the
/// background until [`Sampler::stop`].
pub struct Sampler {
    started: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling the group `name` in `namespace` (its pods carry `selector`), the
    /// operator's lag figures from `operator`.
    pub fn start(
        env: &TestEnv,
        operator: &OperatorHandle,
        namespace: &str,
        name: &str,
        selector: &str,
    ) -> Self {
        let metrics = operator.metrics.clone();
        let lag_line = format!(
            r#"eventops_operator_consumergroup_lag{{namespace="{namespace}",consumergroup="{name}"}} "#
        );
        let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), namespace);
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), namespace);
        let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), namespace);
        let (name, selector) = (name.to_string(), selector.to_string());
        let started = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let by_group = ListParams::default().labels(&selector);
            loop {
                tick.tick().await;
                let (d, p, g) = tokio::join!(
                    deployments.get_opt(&name),
                    pods.list(&by_group),
                    groups.get_opt(&name),
                );
                let (Ok(d), Ok(p), Ok(g)) = (d, p, g) else {
                    continue;
                };
                let sample = Sample {
                    at: started.elapsed(),
                    replicas: d.and_then(|d| d.spec.replicas),
                    pods: p.items.len(),
                    ready: p.items.iter().filter(|p| crate::pods::is_ready(p)).count(),
                    lag: metrics
                        .encode()
                        .lines()
                        .find_map(|l| l.strip_prefix(&lag_line)?.parse().ok()),
                    status_lag: g.and_then(|g| g.status?.total_lag),
                };
                out.lock().unwrap().push(sample);
            }
        });
        Self {
            started,
            samples,
            task,
        }
    }

    /// Time since the sampler started, on the samples' clock.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// The samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// Stops sampling; returns every sample.
    pub fn stop(self) -> Vec<Sample> {
        self.task.abort();
        self.samples()
    }
}

/// The samples as a compact timeline: one line per change of what was seen.
pub fn timeline(samples: &[Sample]) -> String {
    let mut out = String::from("      t    lag  replicas  pods  ready\n");
    let mut last = None;
    for s in samples {
        let seen = (s.lag, s.replicas, s.pods, s.ready);
        if last != Some(seen) {
            let show = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
            out.push_str(&format!(
                "{:>6.1}s {:>6} {:>9} {:>5} {:>6}\n",
                s.at.as_secs_f64(),
                show(s.lag),
                show(s.replicas.map(i64::from)),
                s.pods,
                s.ready
            ));
            last = Some(seen);
        }
    }
    out
}

/// One partition of a group as Kafka's `ConsumerGroupCommand --describe` prints it.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionLag {
    /// The committed offset, `None` before any commit.
    pub committed: Option<i64>,
    /// The log-end offset.
    pub log_end: i64,
}

/// The group's partitions of `topic` as Kafka's own `ConsumerGroupCommand --describe`
/// reports them (an oracle sharing no code with EventOps).
pub async fn kafka_group_lag(
    env: &TestEnv,
    group: &str,
    topic: &str,
) -> BTreeMap<i32, PartitionLag> {
    let out = env
        .kafka_tool(
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            &["--describe", "--group", group],
        )
        .await
        .expect("ConsumerGroupCommand --describe");
    out.lines()
        .filter_map(|line| {
            // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.len() >= 5 && cols[0] == group && cols[1] == topic).then_some(())?;
            Some((
                cols[2].parse().ok()?,
                PartitionLag {
                    committed: cols[3].parse().ok(),
                    log_end: cols[4].parse().ok()?,
                },
            ))
        })
        .collect()
}
