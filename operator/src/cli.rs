//! `eventops-operator dlt`: the command-line front door to dead letters. `list` and `show`
//! read an EventTopic's dead-letter topic with the Kafka credentials given (never moving
//! or committing anything) and print each record's decoded provenance and exception;
//! `redrive` creates a [`Redrive`] from flags, and with `--dry-run` prints what would
//! move. `eventops-operator replay` creates a [`eventops_crds::Replay`] from flags.

use std::time::Duration;

use anyhow::{Context as _, bail};
use eventops_crds::{EventTopic, Redrive, RedriveStatus, Replay, ReplayStatus};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::RunConfig;
use crate::redrive::select::{self, DltRecord, Verdict};

/// Field manager of what the command line writes.
const CLI_MANAGER: &str = "eventops-cli";

/// `dlt` subcommands.
#[derive(clap::Subcommand)]
pub enum DltCommand {
    /// Print the records of an EventTopic's dead-letter topic: partition/offset, time,
    /// key, where each came from and why it failed.
    List {
        /// The EventTopic.
        event_topic: String,
        /// Namespace of the EventTopic.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Most records printed per partition.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Kafka connection: a user that may read the topic.
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Print one dead-letter record in full: every header, decoded where it is one of
    /// the provenance headers, and the value.
    Show {
        /// The EventTopic.
        event_topic: String,
        /// Partition of the dead-letter topic.
        partition: i32,
        /// Offset in it.
        offset: i64,
        /// Namespace of the EventTopic.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Kafka connection.
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Create a Redrive of an EventTopic's dead letters; with `--dry-run`, wait for its
    /// count and print what would move.
    Redrive(RedriveArgs),
}

/// How `dlt list` and `dlt show` reach Kafka: the same flags and variables as
/// `eventops-operator run`.
#[derive(clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap servers.
    #[arg(long, env = "EVENTOPS_KAFKA_BOOTSTRAP")]
    pub kafka_bootstrap: String,
    /// `PLAINTEXT`, `SASL_PLAINTEXT`, `SSL` or `SASL_SSL` (default: `SASL_PLAINTEXT` with a
    /// user, `PLAINTEXT` without).
    #[arg(long, env = "EVENTOPS_KAFKA_SECURITY_PROTOCOL")]
    pub kafka_security_protocol: Option<String>,
    /// SASL mechanism.
    #[arg(
        long,
        env = "EVENTOPS_KAFKA_SASL_MECHANISM",
        default_value = "SCRAM-SHA-512"
    )]
    pub kafka_sasl_mechanism: String,
    /// SASL user.
    #[arg(long, env = "EVENTOPS_KAFKA_USERNAME")]
    pub kafka_username: Option<String>,
    /// SASL password.
    #[arg(long, env = "EVENTOPS_KAFKA_PASSWORD", hide_env_values = true)]
    pub kafka_password: Option<String>,
}

impl KafkaArgs {
    fn properties(&self) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        let mut config = RunConfig::new(self.kafka_bootstrap.clone());
        config.kafka_security_protocol = self.kafka_security_protocol.clone();
        config.kafka_sasl_mechanism = self.kafka_sasl_mechanism.clone();
        config.kafka_username = self.kafka_username.clone();
        config.kafka_password = self.kafka_password.clone();
        Ok(config.kafka_settings()?.properties)
    }
}

/// Flags of `dlt redrive`, each a field of the Redrive's spec.
#[derive(clap::Args)]
pub struct RedriveArgs {
    /// The EventTopic whose dead-letter topic is read (`spec.source`).
    pub event_topic: String,
    /// Namespace of the EventTopic and the Redrive.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// Name of the Redrive (default: `<event topic>-redrive-<unix seconds>`).
    #[arg(long)]
    pub name: Option<String>,
    /// `spec.destination`: an EventTopic to send every record to.
    #[arg(long)]
    pub destination: Option<String>,
    /// `spec.filter.exceptionClass`.
    #[arg(long)]
    pub exception_class: Option<String>,
    /// `spec.filter.key`.
    #[arg(long)]
    pub key: Option<String>,
    /// `spec.filter.after` (RFC 3339).
    #[arg(long)]
    pub after: Option<String>,
    /// `spec.filter.before` (RFC 3339).
    #[arg(long)]
    pub before: Option<String>,
    /// `spec.filter.header`: `NAME` or `NAME=VALUE`.
    #[arg(long)]
    pub header: Option<String>,
    /// `spec.maxRecordsPerSecond`.
    #[arg(long)]
    pub max_records_per_second: Option<i32>,
    /// Only count, and print up to five samples of what would move.
    #[arg(long)]
    pub dry_run: bool,
    /// Wait until the redrive completes, printing its progress.
    #[arg(long)]
    pub wait: bool,
}

/// Runs `command`, printing to standard output.
pub async fn run(command: DltCommand) -> anyhow::Result<()> {
    match command {
        DltCommand::List {
            event_topic,
            namespace,
            limit,
            kafka,
        } => {
            let dlt = dead_letter_topic(&namespace, &event_topic).await?;
            let properties = kafka.properties()?;
            let lines =
                tokio::task::spawn_blocking(move || list(&properties, &dlt, limit)).await??;
            for line in lines {
                println!("{line}");
            }
        }
        DltCommand::Show {
            event_topic,
            partition,
            offset,
            namespace,
            kafka,
        } => {
            let dlt = dead_letter_topic(&namespace, &event_topic).await?;
            let properties = kafka.properties()?;
            let text =
                tokio::task::spawn_blocking(move || show(&properties, &dlt, partition, offset))
                    .await??;
            print!("{text}");
        }
        DltCommand::Redrive(args) => redrive(args).await?,
    }
    Ok(())
}

async fn dead_letter_topic(namespace: &str, name: &str) -> anyhow::Result<String> {
    let client = Client::try_default()
        .await
        .context("connecting to Kubernetes")?;
    let topics: Api<EventTopic> = Api::namespaced(client, namespace);
    let et = topics
        .get_opt(name)
        .await?
        .with_context(|| format!("no EventTopic {name} in namespace {namespace}"))?;
    et.dead_letter_topic_name().with_context(|| {
        format!("EventTopic {namespace}/{name} has no dead-letter topic (spec.deadLetter.enabled)")
    })
}

fn consumer(
    properties: &std::collections::BTreeMap<String, String>,
) -> anyhow::Result<BaseConsumer> {
    let mut config = rdkafka::ClientConfig::new();
    for (k, v) in properties {
        config.set(k, v);
    }
    // Assigned, never subscribed or committed: librdkafka wants a group id all the
    // same, and says when the user may not use it (see `ignorable`), which does not
    // matter here.
    Ok(config
        .set("group.id", "eventops-cli")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?)
}

/// Whether `e`, reported while reading, is the user's lack of a Group ACL for the
/// group id this reader never uses.
fn ignorable(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::GroupAuthorizationFailed)
}

/// Owned headers of a message.
fn headers_of(m: &impl Message) -> Vec<(String, Option<Vec<u8>>)> {
    m.headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}

/// Up to `limit` records of each partition of `dlt`, one line each.
fn list(
    properties: &std::collections::BTreeMap<String, String>,
    dlt: &str,
    limit: usize,
) -> anyhow::Result<Vec<String>> {
    let consumer = consumer(properties)?;
    let timeout = Duration::from_secs(30);
    let metadata = consumer.fetch_metadata(Some(dlt), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        bail!("Kafka has no topic {dlt}");
    }
    let mut tpl = TopicPartitionList::new();
    let mut remaining = std::collections::BTreeMap::new();
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(dlt, p, timeout)?;
        if high > low {
            tpl.add_partition_offset(dlt, p, Offset::Offset(low))?;
            remaining.insert(p, limit);
        }
    }
    let mut lines = vec![format!(
        "{:<14} {:<24} {:<20} {:<40} EXCEPTION",
        "PARTITION/OFF", "TIME", "KEY", "ORIGIN"
    )];
    if remaining.is_empty() {
        return Ok(lines);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + timeout;
    while !remaining.is_empty() && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                remaining.remove(&p);
            }
            Some(Err(e)) if ignorable(&e) => {}
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                let Some(left) = remaining.get_mut(&m.partition()) else {
                    continue;
                };
                let headers = headers_of(&m);
                let r = DltRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp_ms: m.timestamp().to_millis(),
                    key: m.key(),
                    headers: &headers,
                };
                let s = select::sample(&r, &Verdict::Skip);
                let time = r
                    .timestamp_ms
                    .and_then(|t| k8s_openapi::jiff::Timestamp::from_millisecond(t).ok())
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                lines.push(format!(
                    "{:<14} {:<24} {:<20} {:<40} {}: {}",
                    format!("{}/{}", r.partition, r.offset),
                    time,
                    s.key.unwrap_or_default(),
                    s.origin.unwrap_or_else(|| "?".into()),
                    s.exception.unwrap_or_else(|| "?".into()),
                    s.message.unwrap_or_default().lines().next().unwrap_or("")
                ));
                *left -= 1;
                if *left == 0 {
                    remaining.remove(&m.partition());
                }
            }
        }
    }
    Ok(lines)
}

/// One record of `dlt` in full.
fn show(
    properties: &std::collections::BTreeMap<String, String>,
    dlt: &str,
    partition: i32,
    offset: i64,
) -> anyhow::Result<String> {
    let consumer = consumer(properties)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(dlt, partition, Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if m.offset() == offset => {
                let mut out = format!("{dlt}/{partition}/{offset}\n");
                let headers = headers_of(&m);
                for (name, value) in &headers {
                    let value = value.as_deref().unwrap_or_default();
                    let shown = match (name.as_str(), value.len()) {
                        (select::ORIGINAL_PARTITION, 4) => {
                            i32::from_be_bytes(value.try_into().expect("4 bytes")).to_string()
                        }
                        ("kafka_dlt-original-offset" | "kafka_dlt-original-timestamp", 8) => {
                            i64::from_be_bytes(value.try_into().expect("8 bytes")).to_string()
                        }
                        _ => String::from_utf8_lossy(value).into_owned(),
                    };
                    out.push_str(&format!("header {name}: {shown}\n"));
                }
                if let Some(key) = m.key() {
                    out.push_str(&format!("key: {}\n", String::from_utf8_lossy(key)));
                }
                let value = m.payload().map(String::from_utf8_lossy).unwrap_or_default();
                out.push_str(&format!("value: {value}\n"));
                return Ok(out);
            }
            Some(Ok(m)) if m.offset() > offset => break,
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) if ignorable(&e) => {}
            Some(Err(e)) => return Err(e.into()),
            _ => {}
        }
    }
    bail!("no record at {dlt}/{partition}/{offset}")
}

/// The Redrive the flags describe.
fn redrive_object(args: &RedriveArgs, name: &str) -> anyhow::Result<serde_json::Value> {
    let mut filter = serde_json::Map::new();
    let mut put = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            filter.insert(k.into(), v.clone().into());
        }
    };
    put("exceptionClass", &args.exception_class);
    put("key", &args.key);
    put("after", &args.after);
    put("before", &args.before);
    if let Some(h) = &args.header {
        let (name, value) = match h.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (h.as_str(), None),
        };
        filter.insert(
            "header".into(),
            serde_json::json!({"name": name, "value": value}),
        );
    }
    let mut spec = serde_json::json!({
        "source": args.event_topic,
        "dryRun": args.dry_run,
        "filter": filter,
    });
    if let Some(d) = &args.destination {
        spec["destination"] = d.clone().into();
    }
    if let Some(r) = args.max_records_per_second {
        spec["maxRecordsPerSecond"] = r.into();
    }
    Ok(serde_json::json!({
        "apiVersion": "eventops.dev/v1alpha1",
        "kind": "Redrive",
        "metadata": {"name": name, "namespace": args.namespace},
        "spec": spec,
    }))
}

async fn redrive(args: RedriveArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to Kubernetes")?;
    let api: Api<Redrive> = Api::namespaced(client, &args.namespace);
    let name = args.name.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        format!("{}-redrive-{now}", args.event_topic)
    });
    let object = redrive_object(&args, &name)?;
    api.patch(
        &name,
        &PatchParams::apply(CLI_MANAGER),
        &Patch::Apply(&object),
    )
    .await
    .with_context(|| format!("creating Redrive {}/{name}", args.namespace))?;
    println!("redrive.eventops.dev/{name} created");
    if !args.dry_run && !args.wait {
        return Ok(());
    }
    let mut last = None;
    loop {
        let status: RedriveStatus = api.get(&name).await?.status.unwrap_or_default();
        let refused = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Accepted" && c.status == "False");
        if let Some(c) = refused {
            bail!("{}: {}", c.reason, c.message);
        }
        let line = format!(
            "{}: matched {}, {} {}, skipped {}",
            status.phase.as_deref().unwrap_or("Pending"),
            status.matched,
            if args.dry_run { "would move" } else { "moved" },
            status.moved,
            status.skipped
        );
        if last.as_ref() != Some(&line) {
            println!("{line}");
            last = Some(line);
        }
        if status.phase.as_deref() == Some("Completed") {
            for s in &status.samples {
                println!(
                    "  {}/{} key={} from {} to {} ({})",
                    s.partition,
                    s.offset,
                    s.key.as_deref().unwrap_or(""),
                    s.origin.as_deref().unwrap_or("?"),
                    s.destination.as_deref().unwrap_or("(skipped)"),
                    s.exception.as_deref().unwrap_or("?")
                );
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Flags of `replay`, each a field of the Replay's spec.
#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The ConsumerGroup to rewind (`spec.consumerGroup`).
    pub consumer_group: String,
    /// Namespace of the ConsumerGroup and the Replay.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// Name of the Replay (default: `<consumer group>-replay-<unix seconds>`).
    #[arg(long)]
    pub name: Option<String>,
    /// `spec.from.earliest`: every topic from its first stored record.
    #[arg(
        long,
        conflicts_with = "from_time",
        required_unless_present_any = ["from_time", "offsets"]
    )]
    pub earliest: bool,
    /// `spec.from.timestamp` (RFC 3339): every topic from its first record at or after
    /// this time.
    #[arg(long)]
    pub from_time: Option<String>,
    /// `spec.topics[].offsets`: `EVENTTOPIC:PARTITION=OFFSET`, repeated; the topics named
    /// restart there instead.
    #[arg(long = "offset", value_name = "EVENTTOPIC:PARTITION=OFFSET")]
    pub offsets: Vec<String>,
    /// `spec.allowDuplicates`: replay a group without the Postgres inbox anyway.
    #[arg(long)]
    pub allow_duplicates: bool,
    /// Print the Replay instead of creating it.
    #[arg(long)]
    pub dry_run: bool,
    /// Wait until the replay completes, printing its phases and the offsets set.
    #[arg(long)]
    pub wait: bool,
}

/// The Replay the flags describe.
fn replay_object(args: &ReplayArgs, name: &str) -> anyhow::Result<serde_json::Value> {
    let mut spec = serde_json::json!({"consumerGroup": args.consumer_group});
    if args.earliest {
        spec["from"] = serde_json::json!({"earliest": true});
    }
    if let Some(t) = &args.from_time {
        spec["from"] = serde_json::json!({"timestamp": t});
    }
    let mut topics: std::collections::BTreeMap<&str, Vec<serde_json::Value>> = Default::default();
    for o in &args.offsets {
        let parsed = o.split_once(':').and_then(|(topic, rest)| {
            let (p, off) = rest.split_once('=')?;
            Some((topic, p.parse::<i32>().ok()?, off.parse::<i64>().ok()?))
        });
        let Some((topic, partition, offset)) = parsed else {
            bail!("--offset {o:?}: expected EVENTTOPIC:PARTITION=OFFSET, e.g. orders:0=42");
        };
        topics
            .entry(topic)
            .or_default()
            .push(serde_json::json!({"partition": partition, "offset": offset}));
    }
    if !topics.is_empty() {
        spec["topics"] = topics
            .into_iter()
            .map(|(topic, offsets)| serde_json::json!({"topic": topic, "offsets": offsets}))
            .collect();
    }
    if args.allow_duplicates {
        spec["allowDuplicates"] = true.into();
    }
    Ok(serde_json::json!({
        "apiVersion": "eventops.dev/v1alpha1",
        "kind": "Replay",
        "metadata": {"name": name, "namespace": args.namespace},
        "spec": spec,
    }))
}

/// Creates the Replay `args` describe (or prints it), and with `--wait` follows it.
pub async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let name = args.name.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        format!("{}-replay-{now}", args.consumer_group)
    });
    let object = replay_object(&args, &name)?;
    if args.dry_run {
        println!("{}", serde_json::to_string_pretty(&object)?);
        return Ok(());
    }
    let client = Client::try_default()
        .await
        .context("connecting to Kubernetes")?;
    let api: Api<Replay> = Api::namespaced(client, &args.namespace);
    api.patch(
        &name,
        &PatchParams::apply(CLI_MANAGER),
        &Patch::Apply(&object),
    )
    .await
    .with_context(|| format!("creating Replay {}/{name}", args.namespace))?;
    println!("replay.eventops.dev/{name} created");
    if !args.wait {
        return Ok(());
    }
    let mut last = None;
    loop {
        let status: ReplayStatus = api.get(&name).await?.status.unwrap_or_default();
        let phase = status.phase.as_deref().unwrap_or("Pending");
        let message = |type_: &str| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == type_)
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        };
        if phase == "Refused" {
            let (_, reason, message) = message("Accepted").unwrap_or_default();
            bail!("{reason}: {message}");
        }
        let line = match message("Complete").or_else(|| message("Accepted")) {
            Some((_, reason, message)) => format!("{phase}: {reason}: {message}"),
            None => phase.to_string(),
        };
        if last.as_ref() != Some(&line) {
            println!("{line}");
            last = Some(line);
        }
        if phase == "Completed" {
            for p in &status.offsets {
                let before = p.before.map_or("-".to_string(), |b| b.to_string());
                println!("  {}/{}: {before} -> {}", p.topic, p.partition, p.after);
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        dlt: DltCommand,
    }

    #[test]
    fn redrive_flags_become_the_spec_fields() {
        let Cli {
            dlt: DltCommand::Redrive(args),
        } = Cli::parse_from([
            "x",
            "redrive",
            "orders",
            "-n",
            "shop",
            "--exception-class",
            "PaymentDeclined",
            "--header",
            "tenant=acme",
            "--max-records-per-second",
            "50",
            "--dry-run",
        ])
        else {
            panic!("not a redrive");
        };
        let object = redrive_object(&args, "r").unwrap();
        assert_eq!(
            object["spec"],
            serde_json::json!({
                "source": "orders",
                "dryRun": true,
                "maxRecordsPerSecond": 50,
                "filter": {"exceptionClass": "PaymentDeclined",
                           "header": {"name": "tenant", "value": "acme"}},
            })
        );
        assert_eq!(object["metadata"]["namespace"], "shop");
        // The spec is one the CRD type reads.
        let _: eventops_crds::RedriveSpec = serde_json::from_value(object["spec"].clone()).unwrap();
    }

    #[derive(clap::Parser)]
    struct ReplayCli {
        #[command(flatten)]
        replay: ReplayArgs,
    }

    #[test]
    fn replay_flags_become_the_spec_fields() {
        let parse = |args: &[&str]| {
            ReplayCli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .map(|c| replay_object(&c.replay, "r"))
        };
        let object = parse(&[
            "payments",
            "-n",
            "shop",
            "--from-time",
            "2026-12-01T10:00:00Z",
            "--offset",
            "orders:0=42",
            "--offset",
            "orders:2=7",
            "--allow-duplicates",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            object["spec"],
            serde_json::json!({
                "consumerGroup": "payments",
                "from": {"timestamp": "2026-12-01T10:00:00Z"},
                "topics": [{"topic": "orders", "offsets": [
                    {"partition": 0, "offset": 42}, {"partition": 2, "offset": 7}]}],
                "allowDuplicates": true,
            })
        );
        assert_eq!(object["metadata"]["namespace"], "shop");
        let _: eventops_crds::ReplaySpec = serde_json::from_value(object["spec"].clone()).unwrap();
        // Where to restart is required, once.
        assert!(parse(&["payments"]).is_err());
        assert!(
            parse(&[
                "payments",
                "--earliest",
                "--from-time",
                "2026-12-01T10:00:00Z"
            ])
            .is_err()
        );
        let bad = parse(&["payments", "--offset", "orders:x=1"])
            .unwrap()
            .unwrap_err();
        assert!(
            bad.to_string().contains("EVENTTOPIC:PARTITION=OFFSET"),
            "{bad}"
        );
    }
}
