//! `tools/bench-outbox`: the runtime's outbox relay against a plain polling relay, on the
//! same PostgreSQL, broker, table and producer settings, in one run.
//!
//! For each contender, on a fresh database and fresh 6-partition topics:
//!
//! 1. **Drain.** `--events` rows committed before the relay starts; the time from its
//!    start until Kafka holds every record (the topic's end offsets).
//! 2. **Throughput.** `--writers` connections commit `--events` outbox rows (in
//!    transactions of `--per-tx` rows) as fast as they can while the relay runs; the time
//!    runs from the first commit until Kafka holds every record.
//! 3. **Latency.** One writer commits single-row transactions at `--rate` rows/s for
//!    `--seconds`; a consumer notes when each event arrives. Latency is arrival minus the
//!    moment the writer's commit returned; the first second's events are left out (the
//!    producer is still learning the new topic's partition leaders).
//!
//! The baseline is the common polling relay: every 500 ms it reads the oldest 100 rows,
//! publishes them, deletes them, and goes on with the next 100 until a read comes back
//! short (so it is not held to 100 rows per poll). The relay is [`Relay`] with its
//! defaults, woken by `LISTEN/NOTIFY`.
//!
//! A discarded warm-up round of both comes first (`--warmup false` skips it).
//!
//! Prints a table and ends with
//! `bench-outbox: relay X events/s, p99 Y ms, baseline X events/s, p99 Y ms`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use eventops_consumer_runtime::outbox::{OutboxMessage, Relay, RelayOptions, append, append_all};
use eventops_consumer_runtime::tokio_postgres::{self, NoTls};
use eventops_consumer_runtime::{Envelope, postgres};
use eventops_devenv::EnvInfo;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::oneshot;

#[derive(Parser, Debug, Clone, Copy)]
struct Args {
    /// Rows committed in the throughput run.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Concurrent writers in the throughput run.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Rows per writer transaction in the throughput run.
    #[arg(long, default_value_t = 100)]
    per_tx: usize,
    /// Rows per second in the latency run (one row per transaction).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Length of the latency run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Run a discarded warm-up round of both contenders first.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    warmup: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Relay,
    Baseline,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Relay => "eventops relay (LISTEN/NOTIFY, shards)",
            Contender::Baseline => "polling relay (500 ms, batch 100)",
        }
    }
}

struct Figures {
    drain: f64,
    throughput: f64,
    writers_rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = EnvInfo::from_env()?;
    // A warm-up round of both, discarded: a broker JVM just started compiles its hot
    // paths during the first contender's run, which would favour the second.
    if args.warmup {
        let small = Args {
            events: (args.events / 10).max(args.writers),
            seconds: 3,
            ..args
        };
        for contender in [Contender::Relay, Contender::Baseline] {
            eprintln!("bench-outbox: warm-up, {}", contender.name());
            run(&env, &small, contender).await?;
        }
    }
    let mut results = Vec::new();
    for contender in [Contender::Relay, Contender::Baseline] {
        eprintln!("bench-outbox: {}", contender.name());
        results.push((contender, run(&env, &args, contender).await?));
    }
    println!();
    println!(
        "| relay | events | events/s, writers committing | writers' rows/s | events/s, draining a backlog | latency p50 ms | p99 ms | max ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (c, f) in &results {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} |",
            c.name(),
            args.events,
            f.throughput,
            f.writers_rate,
            f.drain,
            f.p50_ms,
            f.p99_ms,
            f.max_ms
        );
    }
    let (r, b) = (&results[0].1, &results[1].1);
    println!();
    println!(
        "targets: relay >= 20000 events/s ({}), p99 <= 50 ms at {} events/s ({}); relay/baseline throughput {:.2}x",
        if r.throughput >= 20_000.0 {
            "met"
        } else {
            "NOT met"
        },
        args.rate,
        if r.p99_ms <= 50.0 { "met" } else { "NOT met" },
        r.throughput / b.throughput
    );
    println!(
        "bench-outbox: relay {:.0} events/s, p99 {:.1} ms, baseline {:.0} events/s, p99 {:.1} ms",
        r.throughput, r.p99_ms, b.throughput, b.p99_ms
    );
    Ok(())
}

async fn run(env: &EnvInfo, args: &Args, contender: Contender) -> anyhow::Result<Figures> {
    let url = fresh_database(env).await?;
    postgres::migrate_url(&url).await?;
    let producer: FutureProducer = env
        .kafka_admin_config()
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()?;
    // Drain: a backlog committed while no relay runs, then the time to publish it all.
    let drain_topic = format!(
        "bench-outbox-drain-{}-{}",
        std::process::id(),
        fastrand_u64()
    );
    create_topic(env, &drain_topic).await?;
    write(
        &url,
        &drain_topic,
        args.writers,
        args.events / args.writers,
        args.per_tx,
    )
    .await?;
    let drain_total = ((args.events / args.writers) * args.writers) as i64;
    let (stop, stopped) = oneshot::channel::<()>();
    let drain_started = Instant::now();
    let relay = match contender {
        Contender::Relay => {
            let relay = Relay::connect(&url, producer, RelayOptions::default()).await?;
            tokio::spawn(relay.run_until(async move {
                let _ = stopped.await;
            }))
        }
        Contender::Baseline => {
            let client = connect(&url).await?;
            tokio::spawn(polling_relay(client, producer, stopped))
        }
    };

    let watcher: BaseConsumer = env
        .kafka_admin_config()
        .set("group.id", "bench-outbox-watermarks")
        .create()?;
    wait_on_kafka(&watcher, &drain_topic, drain_total, drain_started).await?;
    let drained = drain_started.elapsed();
    eprintln!("  drain: a backlog of {drain_total} published in {drained:?}");

    // Throughput: writers commit while the relay runs.
    let topic = format!("bench-outbox-{}-{}", std::process::id(), fastrand_u64());
    create_topic(env, &topic).await?;
    let started = Instant::now();
    write(
        &url,
        &topic,
        args.writers,
        args.events / args.writers,
        args.per_tx,
    )
    .await?;
    let committed = started.elapsed();
    let total = ((args.events / args.writers) * args.writers) as i64;
    wait_on_kafka(&watcher, &topic, total, started).await?;
    let all_on_kafka = started.elapsed();
    eprintln!(
        "  throughput: {total} committed in {committed:?}, all on Kafka after {all_on_kafka:?}"
    );

    // Latency at a steady rate.
    let topic = format!(
        "bench-outbox-latency-{}-{}",
        std::process::id(),
        fastrand_u64()
    );
    create_topic(env, &topic).await?;
    let count = (args.rate * args.seconds) as usize;
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let reader = {
        let (env, topic, arrivals) = (env.clone(), topic.clone(), arrivals.clone());
        tokio::task::spawn_blocking(move || read_arrivals(&env, &topic, count, &arrivals))
    };
    tokio::time::sleep(Duration::from_secs(2)).await; // the reader is assigned
    let mut client = connect(&url).await?;
    let mut commits = HashMap::with_capacity(count);
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..count {
        tick.tick().await;
        let id = format!("latency-{i}");
        let tx = client.transaction().await?;
        append(&tx, &message(&topic, &id, i % 500)).await?;
        tx.commit().await?;
        commits.insert(id, Instant::now());
    }
    reader.await??;
    let _ = stop.send(());
    relay.await?;
    let arrivals = arrivals.lock().unwrap();
    // The first second is left out: the producer learns the new topic's leaders then.
    let skip = args.rate as usize;
    let mut latencies: Vec<f64> = commits
        .iter()
        .filter(|(id, _)| {
            id.strip_prefix("latency-")
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n >= skip)
        })
        .map(|(id, committed)| {
            arrivals[id]
                .saturating_duration_since(*committed)
                .as_secs_f64()
                * 1000.0
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1)];
    Ok(Figures {
        drain: drain_total as f64 / drained.as_secs_f64(),
        throughput: total as f64 / all_on_kafka.as_secs_f64(),
        writers_rate: total as f64 / committed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
    })
}

/// `writers` connections each commit `per_writer` rows, `per_tx` to a transaction.
async fn write(
    url: &str,
    topic: &str,
    writers: usize,
    per_writer: usize,
    per_tx: usize,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (url, topic) = (url.to_string(), topic.to_string());
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&url).await?;
            let mut i = 0;
            while i < per_writer {
                let tx = client.transaction().await?;
                let n = per_tx.min(per_writer - i);
                let rows: Vec<OutboxMessage> = (i..i + n)
                    .map(|j| message(&topic, &format!("{topic}-w{w}-{j}"), j % 500))
                    .collect();
                append_all(&tx, &rows).await?;
                i += n;
                tx.commit().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Waits until `topic` holds `total` records (its end offsets), for at most 10 minutes.
async fn wait_on_kafka(
    watcher: &BaseConsumer,
    topic: &str,
    total: i64,
    started: Instant,
) -> anyhow::Result<()> {
    loop {
        let mut on_kafka = 0;
        for p in 0..6 {
            on_kafka += watcher
                .fetch_watermarks(topic, p, Duration::from_secs(10))?
                .1;
        }
        if on_kafka >= total {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "{on_kafka} of {total} records on Kafka after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A ~200-byte event envelope keyed by `key % 500`.
fn message(topic: &str, id: &str, key: usize) -> OutboxMessage {
    let mut e = Envelope::new(
        "OrderPlaced",
        1,
        serde_json::json!({"orderId": id, "customer": key, "totalCents": 1999,
                           "lines": [{"sku": "sku-1", "quantity": 2}]}),
    );
    e.id = id.to_string();
    OutboxMessage::event(topic, Some(format!("customer-{key}").as_bytes()), &e)
        .expect("serialising an envelope")
}

/// Consumes `topic` from its end until `count` events arrived, noting when each did.
fn read_arrivals(
    env: &EnvInfo,
    topic: &str,
    count: usize,
    arrivals: &Mutex<HashMap<String, Instant>>,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = env
        .kafka_admin_config()
        .set("group.id", "bench-outbox-reader")
        .set("enable.auto.commit", "false")
        // The instrument: it should add as little as it can to the latency it measures.
        .set("fetch.wait.max.ms", "1")
        // As the runtime's consumers: librdkafka otherwise waits up to 1 s between fetches
        // of a partition whose queue it considers full enough.
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..6 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen = 0;
    while seen < count {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{seen} of {count} events arrived"
        );
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            let now = Instant::now();
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
            let id = v["id"].as_str().unwrap_or_default().to_string();
            if arrivals.lock().unwrap().insert(id, now).is_none() {
                seen += 1;
            }
        }
    }
    Ok(())
}

/// The baseline: every 500 ms, batches of 100 oldest rows until a short one.
async fn polling_relay(
    client: tokio_postgres::Client,
    producer: FutureProducer,
    mut stop: oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        loop {
            let rows = client
                .query(
                    "SELECT id, topic, key, payload, header_names, header_values \
                     FROM eventops_outbox ORDER BY id LIMIT 100",
                    &[],
                )
                .await
                .expect("reading the outbox");
            let mut deliveries = Vec::with_capacity(rows.len());
            for row in &rows {
                let names: Vec<&str> = row.get(4);
                let values: Vec<&[u8]> = row.get(5);
                let mut headers = OwnedHeaders::new();
                for (k, v) in names.iter().zip(&values) {
                    headers = headers.insert(Header {
                        key: k,
                        value: Some(*v),
                    });
                }
                let key: Option<&[u8]> = row.get(2);
                let payload: Option<&[u8]> = row.get(3);
                let mut record = FutureRecord::<[u8], [u8]>::to(row.get(1)).headers(headers);
                if let Some(k) = key {
                    record = record.key(k);
                }
                if let Some(p) = payload {
                    record = record.payload(p);
                }
                // Queued now, acknowledged below: the whole batch is in flight at once.
                deliveries.push(producer.send_result(record).ok());
            }
            let mut done = Vec::with_capacity(rows.len());
            for (row, d) in rows.iter().zip(deliveries) {
                if let Some(d) = d
                    && matches!(d.await, Ok(Ok(_)))
                {
                    done.push(row.get::<_, i64>(0));
                }
            }
            client
                .execute("DELETE FROM eventops_outbox WHERE id = ANY($1)", &[&done])
                .await
                .expect("deleting published rows");
            if rows.len() < 100 {
                break;
            }
        }
    }
}

async fn fresh_database(env: &EnvInfo) -> anyhow::Result<String> {
    let name = format!("bench_outbox_{}_{}", std::process::id(), fastrand_u64());
    let admin = connect(&env.postgres_url).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let (base, _) = env
        .postgres_url
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("postgres_url ends in /<database>"))?;
    Ok(format!("{base}/{name}"))
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn create_topic(env: &EnvInfo, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = env.kafka_admin_config().create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(topic, 6, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    Ok(())
}

/// A number unlikely to repeat between runs (names of databases and topics).
fn fastrand_u64() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 & 0xffff_ffff)
        .unwrap_or(0)
}
