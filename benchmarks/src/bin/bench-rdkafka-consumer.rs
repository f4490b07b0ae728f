//! The baseline of `tools/bench-runtime`: a plain rdkafka consumer loop as a competent
//! user would write it. Auto-commit off; after each record is handled its offset is
//! stored, and stored offsets are committed asynchronously every [`COMMIT_INTERVAL`]
//! (the runtime's default commit interval). Same consumer settings as the runtime
//! ([`CONSUMER_DEFAULTS`]).
//!
//! `bench-rdkafka-consumer fetch-only` skips the per-record work (no decode, no id check):
//! the most records/s this broker and client deliver on the machine, the ceiling of
//! every contender.
//!
//! Reads its Kafka settings from the worker env contract (`EVENTOPS_*`) and runs until it
//! is stopped.

use std::time::{Duration, Instant};

use anyhow::Context;
use eventops_benchmarks::{OrderEnvelope, SEEN_CAPACITY, Seen, first_record_seen};
use eventops_consumer_runtime::CONSUMER_DEFAULTS;
use eventops_consumer_runtime::contract::WorkerConfig;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;

/// How often stored offsets are committed.
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);

fn main() -> anyhow::Result<()> {
    let config = WorkerConfig::from_env()?;
    let mut client = ClientConfig::new();
    for (k, v) in &config.kafka {
        client.set(k, v);
    }
    // Exactly the runtime's consumer settings.
    for (k, v) in CONSUMER_DEFAULTS {
        client.set(*k, *v);
    }
    let consumer: BaseConsumer = client
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .context("creating the consumer")?;
    // `fetch-only`: no per-record work at all, the upper bound of what this broker and
    // client deliver on this machine.
    let work = std::env::args().nth(1).as_deref() != Some("fetch-only");
    let topics: Vec<&str> = config.topics.iter().map(|t| t.topic.as_str()).collect();
    consumer.subscribe(&topics)?;

    let mut seen = Seen::new(SEEN_CAPACITY);
    let (mut uncommitted, mut last_commit) = (0u64, Instant::now());
    let (mut processed, mut duplicates) = (0u64, 0u64);
    let mut last_report = Instant::now();
    loop {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            first_record_seen();
            if work {
                let envelope: OrderEnvelope =
                    serde_json::from_slice(message.payload().unwrap_or_default())
                        .context("decoding an OrderPlaced envelope")?;
                if seen.insert(&envelope.id) {
                    processed += 1;
                } else {
                    duplicates += 1;
                }
            } else {
                processed += 1;
            }
            consumer.store_offset_from_message(&message)?;
            uncommitted += 1;
        }
        if uncommitted > 0 && last_commit.elapsed() >= COMMIT_INTERVAL {
            consumer.commit_consumer_state(CommitMode::Async)?;
            (uncommitted, last_commit) = (0, Instant::now());
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("processed {processed}, duplicates {duplicates}");
            last_report = Instant::now();
        }
    }
}
