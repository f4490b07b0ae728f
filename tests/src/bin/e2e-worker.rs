//! The worker of the end-to-end autoscaling test, run as a ConsumerGroup's pods by the
//! node agent (image `…/e2e-worker:…`). Configured by the contract (`EVENTOPS_*`, written
//! by the operator) plus:
//! - `E2E_DATABASE_URL` (required): the test's own PostgreSQL database, holding the
//!   runtime's inbox and the tables below (see `eventops_tests::e2e`).
//! - `E2E_WORK_MS`: time each record takes (default 0). A pod works on one record at a
//!   time, whatever its number of partitions, like a worker with one CPU: more pods
//!   drain a backlog faster.
//! - `E2E_STATS=1`: every 500 ms, upsert the runtime's count of records its inbox found
//!   already processed (`eventops_worker_records_duplicate_total`) into
//!   `e2e_stats (pod, duplicates)`, so a chaos test can count redeliveries the inbox
//!   absorbed (up to 500 ms of a killed pod's count is lost).
//!
//! Each handler run is logged in `e2e_runs` on its own connection (at least once: a run
//! whose transaction rolls back is logged too); the effect, a row in `e2e_processed`, is
//! written in the inbox transaction, so it exists exactly once per event id and its
//! `deliveries` counter shows any second effect.

use std::time::Duration;

use eventops_consumer_runtime::tokio_postgres::{self, NoTls, Transaction};
use eventops_consumer_runtime::{
    Context, Event, HandlerError, ResultExt, TransactionalHandler, Worker,
};
use tokio::sync::Mutex;

struct Recorder {
    /// The test database's URL, to log runs on a connection of their own.
    url: String,
    /// That connection, opened again when PostgreSQL restarted (a chaos fault).
    runs: Mutex<Option<tokio_postgres::Client>>,
    pod: String,
    work: Duration,
    cpu: Mutex<()>,
}

impl TransactionalHandler for Recorder {
    async fn handle(
        &self,
        event: &Event<'_>,
        tx: &Transaction<'_>,
        _ctx: &Context<'_>,
    ) -> Result<(), HandlerError> {
        {
            let _cpu = self.cpu.lock().await;
            tokio::time::sleep(self.work).await;
        }
        let r = event.record();
        self.log_run(event.id()).await.transient()?;
        tx.execute(
            "INSERT INTO e2e_processed (event_id, partition, \"offset\", pod) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (event_id) DO UPDATE SET deliveries = e2e_processed.deliveries + 1",
            &[&event.id(), &r.partition(), &r.offset(), &self.pod],
        )
        .await
        .transient()?;
        Ok(())
    }
}

impl Recorder {
    /// Logs one handler run in `e2e_runs`, connecting first when there is no live
    /// connection.
    async fn log_run(&self, event_id: &str) -> Result<(), tokio_postgres::Error> {
        let mut runs = self.runs.lock().await;
        if runs.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
            tokio::spawn(connection);
            *runs = Some(client);
        }
        let client = runs.as_ref().expect("connected above");
        client
            .execute(
                "INSERT INTO e2e_runs (event_id, pod) VALUES ($1, $2)",
                &[&event_id, &self.pod],
            )
            .await
            .map(drop)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("E2E_DATABASE_URL").map_err(
        |_| "E2E_DATABASE_URL is not set; set it to the test database's postgres:// URL",
    )?;
    let work = match std::env::var("E2E_WORK_MS") {
        Ok(v) => Duration::from_millis(
            v.parse()
                .map_err(|_| format!("E2E_WORK_MS is {v:?}; expected milliseconds"))?,
        ),
        Err(_) => Duration::ZERO,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let (runs, connection) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(connection);
    let pod = std::env::var("HOSTNAME").unwrap_or_default();
    let (url_for_stats, pod_for_stats) = (url.clone(), pod.clone());
    let url_for_runs = url.clone();
    let worker = Worker::from_env()?
        .postgres_url(url)
        .postgres_pool_size(2)
        .build_transactional(Recorder {
            url: url_for_runs,
            runs: Mutex::new(Some(runs)),
            pod,
            work,
            cpu: Mutex::new(()),
        })
        .await?;
    if std::env::var("E2E_STATS").is_ok_and(|v| v == "1") {
        tokio::spawn(report_stats(url_for_stats, pod_for_stats, worker.metrics()));
    }
    eprintln!("e2e worker ready; health on {:?}", worker.health_addr());
    worker.run().await?;
    eprintln!("e2e worker stopped cleanly");
    Ok(())
}

/// Keeps `e2e_stats` up to date with this pod's duplicate count (see the module docs).
async fn report_stats(
    url: String,
    pod: String,
    metrics: std::sync::Arc<eventops_consumer_runtime::metrics::Metrics>,
) {
    let mut client = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let duplicates: f64 = metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("eventops_worker_records_duplicate_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if client.is_none() {
            // The database may be down (a chaos fault): try again next round.
            if let Ok((c, connection)) = tokio_postgres::connect(&url, NoTls).await {
                tokio::spawn(connection);
                client = Some(c);
            }
        }
        let Some(c) = &client else { continue };
        let written = c
            .execute(
                "INSERT INTO e2e_stats (pod, duplicates) VALUES ($1, $2) \
                 ON CONFLICT (pod) DO UPDATE SET duplicates = EXCLUDED.duplicates",
                &[&pod, &(duplicates as i64)],
            )
            .await;
        if written.is_err() {
            client = None;
        }
    }
}
