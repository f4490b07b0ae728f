//! `eventops-demo watch`: development tooling for the traffic-spike demo (`tools/sandbox`).
//!
//! Every interval it reads, for each ConsumerGroup of a namespace, the consumer lag as
//! Kafka reports it (log-end minus committed offsets, measured here with the admin
//! credentials, independently of the operator), the worker Deployment's replicas (spec
//! and ready) and the records in the dead-letter topics. It prints one line per sample,
//! keeps the samples in a CSV file, and at the end draws lag and replicas over time as
//! an SVG plot.

mod plot;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use eventops_crds::{ConsumerGroup, EventTopic};
use eventops_devenv::EnvInfo;
use k8s_openapi::api::apps::v1::Deployment;
use kube::{Api, Client, ResourceExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

/// Command-line arguments.
#[derive(Parser)]
#[command(about = "Watches consumer lag, replicas and dead-letter records; plots them")]
enum Cli {
    /// Samples until the duration is over (or until `--stop-file` exists), then plots.
    Watch(WatchArgs),
}

/// Arguments of `watch`.
#[derive(clap::Args)]
struct WatchArgs {
    /// The environment's env.json (written by `eventops-devenv up`).
    #[arg(long, env = "EVENTOPS_ENV")]
    env: PathBuf,
    /// Namespace of the ConsumerGroups and EventTopics.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Time between samples, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Longest time to watch, in seconds.
    #[arg(long, default_value_t = 300)]
    duration_secs: u64,
    /// Stop early once this file exists (the demo script creates it).
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// Where to write the samples as CSV.
    #[arg(long)]
    csv: PathBuf,
    /// Where to write the plot (SVG).
    #[arg(long)]
    svg: PathBuf,
}

/// One group at one moment.
#[derive(Clone, Debug, Default)]
pub struct GroupSample {
    /// Records not yet processed over the group's partitions.
    pub lag: i64,
    /// Replicas the Deployment asks for.
    pub replicas: i32,
    /// Replicas whose pods are Ready.
    pub ready: i32,
}

/// Everything measured at one moment.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Seconds since the watch began.
    pub t: f64,
    /// Per ConsumerGroup name.
    pub groups: BTreeMap<String, GroupSample>,
    /// Records in all dead-letter topics of the namespace.
    pub dead_lettered: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli::Watch(args) = Cli::parse();
    let info = EnvInfo::load(&args.env)?;
    let client = Client::try_default().await?;
    let groups: Api<ConsumerGroup> = Api::namespaced(client.clone(), &args.namespace);
    let topics: Api<EventTopic> = Api::namespaced(client.clone(), &args.namespace);
    let deployments: Api<Deployment> = Api::namespaced(client, &args.namespace);

    let start = Instant::now();
    let mut samples = Vec::new();
    let mut lag_readers: BTreeMap<String, BaseConsumer> = BTreeMap::new();
    let mut csv = String::from("t,group,lag,replicas,ready,dead_lettered\n");
    let mut lag_per_replica = BTreeMap::new();
    while start.elapsed() < Duration::from_secs(args.duration_secs) {
        if args.stop_file.as_ref().is_some_and(|f| f.exists()) {
            break;
        }
        let tick = Instant::now();
        let topic_list = topics.list(&Default::default()).await?.items;
        let kafka_name = |name: &str| {
            topic_list
                .iter()
                .find(|t| t.name_any() == name)
                .map(|t| t.kafka_topic_name().to_string())
        };
        let mut sample = Sample {
            t: start.elapsed().as_secs_f64(),
            ..Default::default()
        };
        for cg in groups.list(&Default::default()).await?.items {
            let name = cg.name_any();
            lag_per_replica.insert(name.clone(), cg.spec.scaling.lag_per_replica);
            let group_id = cg.kafka_group_id().to_string();
            let reader = match lag_readers.entry(group_id.clone()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(
                    info.kafka_admin_config()
                        .set("group.id", &group_id)
                        .set("enable.auto.commit", "false")
                        .create()
                        .context("creating a Kafka client to read the group's offsets")?,
                ),
            };
            let kafka_topics: Vec<String> = cg
                .spec
                .topics
                .iter()
                .filter_map(|t| kafka_name(t))
                .collect();
            let lag = tokio::task::block_in_place(|| group_lag(reader, &kafka_topics))?;
            let deployment = deployments.get_opt(&name).await?;
            let replicas = deployment
                .as_ref()
                .and_then(|d| d.spec.replicas)
                .unwrap_or(0);
            let ready = deployment
                .as_ref()
                .and_then(|d| d.status.as_ref())
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            sample.groups.insert(
                name,
                GroupSample {
                    lag,
                    replicas,
                    ready,
                },
            );
        }
        let dead_letter_topics: Vec<String> = topic_list
            .iter()
            .filter_map(|t| t.dead_letter_topic_name())
            .collect();
        if let Some(reader) = lag_readers.values().next() {
            sample.dead_lettered =
                tokio::task::block_in_place(|| records_in(reader, &dead_letter_topics))?;
        }
        print_line(&sample);
        for (name, g) in &sample.groups {
            let _ = writeln!(
                csv,
                "{:.1},{name},{},{},{},{}",
                sample.t, g.lag, g.replicas, g.ready, sample.dead_lettered
            );
        }
        samples.push(sample);
        tokio::time::sleep(Duration::from_millis(args.interval_ms).saturating_sub(tick.elapsed()))
            .await;
    }
    std::fs::write(&args.csv, csv).with_context(|| format!("writing {}", args.csv.display()))?;
    plot::draw(&samples, &args.svg)?;
    for (name, lag_per_replica) in &lag_per_replica {
        println!("{}", scale_steps(&samples, name, *lag_per_replica));
    }
    println!("samples: {}", args.csv.display());
    println!("plot:    {}", args.svg.display());
    Ok(())
}

/// Lag of `reader`'s group over every partition of `topics`: log-end minus committed
/// offset; a partition without a committed offset counts from its log-start.
fn group_lag(reader: &BaseConsumer, topics: &[String]) -> anyhow::Result<i64> {
    let timeout = Duration::from_secs(5);
    let mut partitions = TopicPartitionList::new();
    for topic in topics {
        let metadata = reader.fetch_metadata(Some(topic), timeout)?;
        for t in metadata.topics() {
            for p in t.partitions() {
                partitions.add_partition(topic, p.id());
            }
        }
    }
    if partitions.count() == 0 {
        return Ok(0);
    }
    let committed = reader.committed_offsets(partitions, timeout)?;
    let mut lag = 0;
    for e in committed.elements() {
        let (low, high) = reader.fetch_watermarks(e.topic(), e.partition(), timeout)?;
        let position = match e.offset() {
            Offset::Offset(o) => o.max(low),
            _ => low,
        };
        lag += (high - position).max(0);
    }
    Ok(lag)
}

/// Records currently held by `topics` (log-end minus log-start, summed).
fn records_in(reader: &BaseConsumer, topics: &[String]) -> anyhow::Result<i64> {
    let timeout = Duration::from_secs(5);
    let mut total = 0;
    for topic in topics {
        let metadata = reader.fetch_metadata(Some(topic), timeout)?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (low, high) = reader.fetch_watermarks(topic, p.id(), timeout)?;
                total += high - low;
            }
        }
    }
    Ok(total)
}

/// One line on how `group` scaled: when its lag (as measured here) first reached one
/// replica's worth, each change of the Deployment's replicas with its time and the lag
/// then, and the upward steps. With `scaling.drainWithin` the need is to be met in one step.
fn scale_steps(samples: &[Sample], group: &str, lag_per_replica: i64) -> String {
    let series: Vec<(f64, &GroupSample)> = samples
        .iter()
        .filter_map(|s| s.groups.get(group).map(|g| (s.t, g)))
        .collect();
    let crossed = series
        .iter()
        .find(|(_, g)| g.lag >= lag_per_replica)
        .map(|(t, _)| *t);
    let mut line = format!("{group}: lag reached {lag_per_replica} (one replica's worth) ");
    match crossed {
        Some(t) => {
            let _ = write!(line, "at {t:.1}s");
        }
        None => line.push_str("never"),
    }
    let mut steps_up = 0;
    for pair in series.windows(2) {
        let ((_, before), (t, after)) = (pair[0], pair[1]);
        if after.replicas == before.replicas {
            continue;
        }
        steps_up += usize::from(after.replicas > before.replicas);
        let _ = write!(
            line,
            "; {} → {} at {t:.1}s (lag {})",
            before.replicas, after.replicas, after.lag
        );
        if let Some(c) = crossed.filter(|c| after.replicas > before.replicas && t >= *c) {
            let _ = write!(line, ", {:.1}s after", t - c);
        }
    }
    let _ = write!(line, "; {steps_up} step(s) up");
    line
}

fn print_line(sample: &Sample) {
    let mut line = format!("t={:>5.1}s", sample.t);
    for (name, g) in &sample.groups {
        let _ = write!(
            line,
            " | {name}: lag {:>6} replicas {}/{}",
            g.lag, g.ready, g.replicas
        );
    }
    let _ = write!(line, " | dead-lettered {}", sample.dead_lettered);
    println!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, lag: i64, replicas: i32) -> Sample {
        let g = GroupSample {
            lag,
            replicas,
            ready: replicas,
        };
        Sample {
            t,
            groups: [("inventory".to_string(), g)].into(),
            dead_lettered: 0,
        }
    }

    #[test]
    fn scale_steps_names_each_change_and_the_delay_after_the_lag_crossed() {
        let samples = [
            sample(0.0, 0, 1),
            sample(0.5, 300, 1),
            sample(1.0, 650, 1),
            sample(1.5, 900, 2),
            sample(2.0, 1200, 6),
            sample(9.0, 0, 1),
        ];
        assert_eq!(
            scale_steps(&samples, "inventory", 500),
            "inventory: lag reached 500 (one replica's worth) at 1.0s; 1 → 2 at 1.5s (lag 900), \
             0.5s after; 2 → 6 at 2.0s (lag 1200), 1.0s after; 6 → 1 at 9.0s (lag 0); 2 step(s) up"
        );
        assert_eq!(
            scale_steps(&samples[..1], "inventory", 500),
            "inventory: lag reached 500 (one replica's worth) never; 0 step(s) up"
        );
    }
}
