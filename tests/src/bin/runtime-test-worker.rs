//! A worker process for the consumer-runtime tests that need to kill or signal a worker.
//! Configured by the contract (`EVENTOPS_*`) plus:
//! - `RUNTIME_TEST_TABLE`: table receiving one row per handler run (event id, topic,
//!   partition, offset); created by the test.
//! - `RUNTIME_TEST_MODE`: `transactional` (the row is written in the inbox transaction:
//!   exactly one row per event) or `plain` (written on its own connection: at least once).
//! - `RUNTIME_TEST_DELAY_MS`: time each handler run takes (default 0).

use std::time::Duration;

use eventops_consumer_runtime::tokio_postgres::{self, NoTls, Transaction};
use eventops_consumer_runtime::{
    Context, Event, Handler, HandlerError, ResultExt, TransactionalHandler, Worker,
};

const INSERT: &str =
    "INSERT INTO {table} (event_id, topic, partition, \"offset\") VALUES ($1, $2, $3, $4)";

struct Plain {
    client: tokio_postgres::Client,
    insert: String,
    delay: Duration,
}

impl Handler for Plain {
    async fn handle(&self, event: &Event<'_>, _ctx: &Context<'_>) -> Result<(), HandlerError> {
        tokio::time::sleep(self.delay).await;
        let r = event.record();
        self.client
            .execute(
                &self.insert,
                &[&event.id(), &r.topic(), &r.partition(), &r.offset()],
            )
            .await
            .transient()?;
        Ok(())
    }
}

struct InTransaction {
    insert: String,
    delay: Duration,
}

impl TransactionalHandler for InTransaction {
    async fn handle(
        &self,
        event: &Event<'_>,
        tx: &Transaction<'_>,
        _ctx: &Context<'_>,
    ) -> Result<(), HandlerError> {
        tokio::time::sleep(self.delay).await;
        let r = event.record();
        tx.execute(
            &self.insert,
            &[&event.id(), &r.topic(), &r.partition(), &r.offset()],
        )
        .await
        .transient()?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let table = var("RUNTIME_TEST_TABLE")?;
    let insert = INSERT.replace("{table}", &table);
    let delay = Duration::from_millis(
        std::env::var("RUNTIME_TEST_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let builder = Worker::from_env()?;
    let worker = match var("RUNTIME_TEST_MODE")?.as_str() {
        "transactional" => {
            builder
                .build_transactional(InTransaction { insert, delay })
                .await?
        }
        "plain" => {
            let (client, connection) =
                tokio_postgres::connect(&var("DATABASE_URL")?, NoTls).await?;
            tokio::spawn(connection);
            builder
                .build(Plain {
                    client,
                    insert,
                    delay,
                })
                .await?
        }
        other => {
            return Err(
                format!("RUNTIME_TEST_MODE {other:?}: expected plain or transactional").into(),
            );
        }
    };
    eprintln!("worker ready; health on {:?}", worker.health_addr());
    worker.run().await?;
    eprintln!("worker stopped cleanly");
    Ok(())
}
