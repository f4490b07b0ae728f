//! Payment: captures the payment of every `OrderPlaced` and publishes `PaymentCaptured`.
//!
//! The payment row is written in the transaction the runtime opens for its PostgreSQL
//! inbox, so it commits together with the event id: a redelivered order is charged
//! exactly once. `PaymentCaptured` is published before that transaction commits; if the
//! commit then fails, the retry publishes it again with the same event id (derived from
//! the order's), so consumers with idempotency recognise the duplicate.
//!
//! Settings: `DATABASE_URL` (required; in Kubernetes from a Secret through the
//! ConsumerGroup's `template.env`), `PAYMENT_WORK_MS` (simulated payment-provider call,
//! default 2 ms), `PAYMENT_CAPTURED_TOPIC` (default `payments.payment.captured`).

use std::time::Duration;

use anyhow::Context as _;
use eventops_consumer_runtime::tokio_postgres::{self, NoTls, Transaction};
use eventops_consumer_runtime::{
    Context, Envelope, ErrorKind, Event, HandlerError, Idempotency, TransactionalHandler, Worker,
};
use eventops_example_order_processing::{
    ORDER_PLACED, OrderPlaced, PAYMENT_CAPTURED, PAYMENT_CAPTURED_TOPIC, PaymentCaptured,
    env_millis, init_logging,
};

/// The payment service's own table. No unique constraint on `order_id`: that each order
/// is charged once is the inbox's doing, and the example's test checks it.
const CREATE_PAYMENTS: &str = "CREATE TABLE IF NOT EXISTS payments (
    id bigserial PRIMARY KEY,
    order_id text NOT NULL,
    event_id text NOT NULL,
    amount_cents bigint NOT NULL,
    captured_at timestamptz NOT NULL DEFAULT now())";

struct Payment {
    work: Duration,
    captured_topic: String,
}

impl TransactionalHandler for Payment {
    async fn handle(
        &self,
        event: &Event<'_>,
        tx: &Transaction<'_>,
        ctx: &Context<'_>,
    ) -> Result<(), HandlerError> {
        if event.event_type() != ORDER_PLACED {
            return Err(HandlerError::message(
                ErrorKind::Permanent,
                format!("payment handles {ORDER_PLACED}, not {}", event.event_type()),
            ));
        }
        let order: OrderPlaced = event.data()?;
        // The payment provider's call.
        tokio::time::sleep(self.work).await;
        tx.execute(
            "INSERT INTO payments (order_id, event_id, amount_cents) VALUES ($1, $2, $3)",
            &[&order.order_id, &event.id(), &order.total_cents],
        )
        .await
        .map_err(HandlerError::transient)?;
        let mut captured = Envelope::new(
            PAYMENT_CAPTURED,
            1,
            PaymentCaptured {
                order_id: order.order_id.clone(),
                amount_cents: order.total_cents,
            },
        );
        captured.id = format!("payment-captured-{}", event.id());
        ctx.publish_event(
            &self.captured_topic,
            Some(order.order_id.as_bytes()),
            captured,
        )
        .await
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let url = std::env::var("DATABASE_URL").map_err(|_| {
        anyhow::anyhow!(
            "environment variable DATABASE_URL is not set; set it to the payments database's \
             postgres:// URL (in Kubernetes: template.env with valueFrom.secretKeyRef)"
        )
    })?;
    let work = env_millis("PAYMENT_WORK_MS", 2)?;
    let captured_topic =
        std::env::var("PAYMENT_CAPTURED_TOPIC").unwrap_or_else(|_| PAYMENT_CAPTURED_TOPIC.into());

    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .context("connecting to DATABASE_URL")?;
    let connection = tokio::spawn(connection);
    client
        .batch_execute(CREATE_PAYMENTS)
        .await
        .context("creating the payments table")?;
    drop(client);
    let _ = connection.await;

    Worker::from_env()?
        // Charging twice is not an option, whatever the ConsumerGroup says.
        .idempotency(Idempotency::Postgres) // the inbox is in DATABASE_URL's database too
        .build_transactional(Payment {
            work,
            captured_topic,
        })
        .await?
        .run()
        .await?;
    Ok(())
}
