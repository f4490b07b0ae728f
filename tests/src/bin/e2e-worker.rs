//! The worker of the end-to-end autoscaling test, run as a ConsumerGroup's pods by the
//! node agent (image `…/e2e-worker:…`). Configured by the contract (`EVENTOPS_*`, written
//! by the operator) plus:
//! - `E2E_DATABASE_URL` (required): the test's own PostgreSQL database, holding the
//!   runtime's inbox and the tables below (see `eventops_tests::e2e`).
//! - `E2E_WORK_MS`: time each record takes (default 0). A pod works on one record at a
//!   time, whatever its number of partitions, like a worker with one CPU: more pods
//!   drain a backlog faster.
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
    runs: tokio_postgres::Client,
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
        self.runs
            .execute(
                "INSERT INTO e2e_runs (event_id, pod) VALUES ($1, $2)",
                &[&event.id(), &self.pod],
            )
            .await
            .transient()?;
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
    let (runs, connection) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(connection);
    let pod = std::env::var("HOSTNAME").unwrap_or_default();
    let worker = Worker::from_env()?
        .postgres_url(url)
        .postgres_pool_size(2)
        .build_transactional(Recorder {
            runs,
            pod,
            work,
            cpu: Mutex::new(()),
        })
        .await?;
    eprintln!("e2e worker ready; health on {:?}", worker.health_addr());
    worker.run().await?;
    eprintln!("e2e worker stopped cleanly");
    Ok(())
}
