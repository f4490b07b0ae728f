//! Publishes `OrderPlaced` events at a steady rate, optionally with a traffic spike:
//!
//! ```text
//! order-processing-producer --rate 50 --spike-at 10 --spike-for 20 --spike-factor 10
//! ```
//!
//! sends 50 orders/s, 500/s from second 10 to second 30, then 50/s again, until stopped
//! (or until `--count` orders). Kafka settings come from flags or the worker env contract
//! variables (`EVENTOPS_KAFKA_*`). Each order gets a fresh event id and correlation id,
//! carried in the envelope and in the `eventops-correlation-id` header.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use eventops_consumer_runtime::envelope::{CORRELATION_HEADER, Envelope, new_event_id};
use eventops_example_order_processing::{
    ORDER_PLACED, ORDER_PLACED_TOPIC, OrderLine, OrderPlaced, init_logging,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

#[derive(Parser)]
#[command(about = "Publishes OrderPlaced events, with an optional traffic spike")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "EVENTOPS_KAFKA_BOOTSTRAP")]
    bootstrap: String,
    /// Kafka user (SASL/SCRAM); none for an unauthenticated broker.
    #[arg(long, env = "EVENTOPS_KAFKA_USERNAME")]
    username: Option<String>,
    /// Kafka password.
    #[arg(long, env = "EVENTOPS_KAFKA_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Kafka security protocol.
    #[arg(
        long,
        env = "EVENTOPS_KAFKA_SECURITY_PROTOCOL",
        default_value = "SASL_PLAINTEXT"
    )]
    security_protocol: String,
    /// SASL mechanism.
    #[arg(
        long,
        env = "EVENTOPS_KAFKA_SASL_MECHANISM",
        default_value = "SCRAM-SHA-512"
    )]
    sasl_mechanism: String,
    /// Topic to publish to.
    #[arg(long, default_value = ORDER_PLACED_TOPIC)]
    topic: String,
    /// Orders per second outside the spike.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Stop after this many orders (default: run until stopped).
    #[arg(long)]
    count: Option<u64>,
    /// Seconds after the start when the spike begins.
    #[arg(long, requires = "spike_for")]
    spike_at: Option<u64>,
    /// How many seconds the spike lasts.
    #[arg(long, requires = "spike_at")]
    spike_for: Option<u64>,
    /// Rate multiplier during the spike.
    #[arg(long, default_value_t = 10.0)]
    spike_factor: f64,
    /// Make every Nth record undecodable (a poison message the workers dead-letter).
    #[arg(long)]
    poison_every: Option<u64>,
}

impl Args {
    /// Orders per second at `t` after the start.
    fn rate_at(&self, t: Duration) -> f64 {
        match (self.spike_at, self.spike_for) {
            (Some(at), Some(len)) if (at..at + len).contains(&t.as_secs()) => {
                self.rate * self.spike_factor
            }
            _ => self.rate,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    if args.rate <= 0.0 || args.spike_factor <= 0.0 {
        anyhow::bail!("--rate and --spike-factor must be positive numbers of orders per second");
    }
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.bootstrap)
        .set("linger.ms", "5");
    if let Some(user) = &args.username {
        let password = args
            .password
            .as_deref()
            .context("--password (or EVENTOPS_KAFKA_PASSWORD) is required with --username")?;
        config
            .set("security.protocol", &args.security_protocol)
            .set("sasl.mechanism", &args.sasl_mechanism)
            .set("sasl.username", user)
            .set("sasl.password", password);
    }
    let producer: FutureProducer = config.create().context("creating the Kafka producer")?;

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let (mut due, mut sent, mut failed) = (0.0_f64, 0_u64, 0_u64);
    let mut last = started;
    let mut in_flight = FuturesUnordered::new();
    let mut last_report = started;
    loop {
        tick.tick().await;
        let now = Instant::now();
        due += args.rate_at(now - started) * (now - last).as_secs_f64();
        last = now;
        while (sent as f64) < due && args.count.is_none_or(|c| sent < c) {
            let order = order(sent);
            let key = order.order_id.clone();
            let correlation = format!("checkout-{}", new_event_id());
            let poison = args
                .poison_every
                .is_some_and(|n| n > 0 && (sent + 1) % n == 0);
            let bytes = if poison {
                b"{not json: a corrupted order".to_vec()
            } else {
                Envelope::new(ORDER_PLACED, 1, order)
                    .with_correlation_id(correlation.clone())
                    .to_bytes()
            };
            let headers = OwnedHeaders::new().insert(Header {
                key: CORRELATION_HEADER,
                value: Some(&correlation),
            });
            let record = FutureRecord::to(&args.topic)
                .key(&key)
                .payload(&bytes)
                .headers(headers);
            let producer = producer.clone();
            // send_result queues the record now; the broker's answer is awaited below.
            match producer.send_result(record) {
                Ok(delivery) => in_flight.push(delivery),
                Err((e, _)) => {
                    tracing::warn!("queueing order {key}: {e}");
                    failed += 1;
                }
            }
            sent += 1;
        }
        while let Some(Some(result)) = futures::FutureExt::now_or_never(in_flight.next()) {
            if !matches!(result, Ok(Ok(_))) {
                failed += 1;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            tracing::info!(
                sent,
                failed,
                rate = args.rate_at(now - started),
                "producing"
            );
        }
        if args.count.is_some_and(|c| sent >= c) {
            break;
        }
    }
    while let Some(result) = in_flight.next().await {
        if !matches!(result, Ok(Ok(_))) {
            failed += 1;
        }
    }
    tracing::info!(sent, failed, "done");
    println!("produced {} orders", sent - failed);
    if failed > 0 {
        anyhow::bail!("{failed} of {sent} orders were not delivered");
    }
    Ok(())
}

/// Order number `n` of this run.
fn order(n: u64) -> OrderPlaced {
    let id = new_event_id();
    OrderPlaced {
        order_id: format!("order-{id}"),
        customer_id: format!("customer-{}", n % 1000),
        items: vec![
            OrderLine {
                sku: format!("sku-{}", n % 50),
                quantity: 1 + (n % 3) as u32,
            },
            OrderLine {
                sku: format!("sku-{}", (n * 7) % 50),
                quantity: 1,
            },
        ],
        total_cents: 1999 + (n % 100) as i64 * 100,
    }
}
