//! The outbox relay as its own process, for outboxes whose writers are not EventOps
//! workers (a web service, a batch job) or a relay deployed apart from its workers.
//! Inside a worker, `ConsumerGroup.spec.outbox` runs the same relay without this binary.
//!
//! Settings, from the environment (the same names the operator gives workers):
//!
//! - `EVENTOPS_OUTBOX_DATABASE_URL`, else `DATABASE_URL`: the database holding
//!   `eventops_outbox` (TLS by libpq's `sslmode`);
//! - `EVENTOPS_KAFKA_BOOTSTRAP`, `EVENTOPS_KAFKA_SECURITY_PROTOCOL`,
//!   `EVENTOPS_KAFKA_USERNAME`, `EVENTOPS_KAFKA_PASSWORD`, `EVENTOPS_KAFKA_SASL_MECHANISM`;
//! - `EVENTOPS_OUTBOX_TOPICS` (optional): JSON array of the topics rows may name;
//! - `EVENTOPS_OUTBOX_BATCH` (optional, default 1000): most rows one cycle publishes;
//! - `EVENTOPS_HEALTH_ADDR` (default `0.0.0.0:8080`): `/metrics`, `/healthz`, `/readyz`.
//!
//! Runs until SIGTERM or SIGINT, finishing the cycle under way.

use std::net::SocketAddr;
use std::sync::Arc;

use eventops_consumer_runtime::contract::{self, ContractError};
use eventops_consumer_runtime::metrics::{self, Metrics};
use eventops_consumer_runtime::outbox::{Relay, RelayOptions};
use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let lookup = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let url = lookup(contract::OUTBOX_DATABASE_URL)
        .or_else(|| lookup(contract::DATABASE_URL))
        .ok_or_else(|| ContractError {
            name: contract::OUTBOX_DATABASE_URL,
            problem: format!(
                "is not set and neither is {}; set one to the outbox database's postgres:// URL",
                contract::DATABASE_URL
            ),
        })?;
    let topics = match lookup(contract::OUTBOX_TOPICS) {
        None => None,
        Some(json) => Some(serde_json::from_str(&json).map_err(|e| ContractError {
            name: contract::OUTBOX_TOPICS,
            problem: format!("is not a JSON array of topic names: {e}"),
        })?),
    };
    let batch = match lookup("EVENTOPS_OUTBOX_BATCH") {
        None => RelayOptions::default().batch,
        Some(v) => v
            .parse()
            .ok()
            .filter(|b| *b > 0)
            .ok_or_else(|| ContractError {
                name: "EVENTOPS_OUTBOX_BATCH",
                problem: format!("is {v:?}; expected a whole number above 0"),
            })?,
    };
    let mut config = ClientConfig::new();
    for (k, v) in contract::kafka_properties(&lookup)? {
        config.set(k, v);
    }
    config
        .set("enable.idempotence", "true")
        .set("linger.ms", "1");
    let producer: FutureProducer = config.create()?;

    let addr: SocketAddr = lookup(contract::HEALTH_ADDR)
        .unwrap_or_else(|| "0.0.0.0:8080".into())
        .parse()
        .map_err(|e| format!("{}: {e}; expected <ip>:<port>", contract::HEALTH_ADDR))?;
    let metrics = Arc::new(Metrics::default());
    let (bound, _server) = metrics::serve(addr, metrics.clone()).await?;
    metrics.mark_ready_without_group();
    tracing::info!(metrics = %bound, "outbox relay started");

    let relay = Relay::connect(
        &url,
        producer,
        RelayOptions {
            topics,
            batch,
            ..RelayOptions::default()
        },
    )
    .await?
    .with_metrics(metrics.clone());
    relay.run_until(shutdown_signal()).await;
    tracing::info!(
        published = metrics.outbox_published(),
        "outbox relay stopped"
    );
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
