//! The runtime contender of `tools/bench-runtime`: the per-record work of every
//! contender (decode the `OrderPlaced` envelope and data) in a consumer-runtime
//! [`Handler`], configured from the worker env contract (`EVENTOPS_*`).
//!
//! - `bench-eventops-consumer memory`: idempotency `Memory` (the runtime checks the
//!   event id), as the comparison asks.
//! - `bench-eventops-consumer postgres`: idempotency `Postgres`; a
//!   [`TransactionalHandler`] writes each order to a table, and that row and the inbox
//!   row commit in the runtime's batched transactions (`DATABASE_URL`, which the
//!   runtime reads too).

use anyhow::{Context as _, bail};
use eventops_benchmarks::{OrderPlaced, SEEN_CAPACITY, first_record_seen};
use eventops_consumer_runtime::tokio_postgres::types::Type;
use eventops_consumer_runtime::tokio_postgres::{self, NoTls, Transaction};
use eventops_consumer_runtime::{
    Context, Event, Handler, HandlerError, Idempotency, TransactionalHandler, Worker,
};

struct Decode;

impl Handler for Decode {
    async fn handle(&self, event: &Event<'_>, _ctx: &Context<'_>) -> Result<(), HandlerError> {
        first_record_seen();
        let order: OrderPlaced = event.data()?;
        std::hint::black_box(order);
        Ok(())
    }
}

struct Record;

impl TransactionalHandler for Record {
    async fn handle(
        &self,
        event: &Event<'_>,
        tx: &Transaction<'_>,
        _ctx: &Context<'_>,
    ) -> Result<(), HandlerError> {
        first_record_seen();
        let order: OrderPlaced = event.data()?;
        // `execute_typed`: parameter types given, so one round trip (no prepare step).
        tx.execute_typed(
            "INSERT INTO bench_orders (order_id, customer_id, lines) VALUES ($1, $2, $3)",
            &[
                (&order.order_id, Type::TEXT),
                (&order.customer_id, Type::TEXT),
                (&(order.items.len() as i32), Type::INT4),
            ],
        )
        .await
        .map_err(HandlerError::transient)?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let builder = Worker::from_env()?.memory_capacity(SEEN_CAPACITY);
    let worker = match mode.as_str() {
        "memory" => {
            builder
                .idempotency(Idempotency::Memory)
                .build(Decode)
                .await?
        }
        "postgres" => {
            let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
            let (client, connection) = tokio_postgres::connect(&url, NoTls).await?;
            let connection = tokio::spawn(connection);
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS bench_orders (
                        order_id text NOT NULL, customer_id text NOT NULL, lines int NOT NULL)",
                )
                .await?;
            drop(client);
            let _ = connection.await;
            builder
                .idempotency(Idempotency::Postgres)
                .build_transactional(Record)
                .await?
        }
        other => bail!("the first argument is {other:?}; expected memory or postgres"),
    };
    worker.run().await?;
    Ok(())
}
