//! Payment: captures the payment of every `OrderPlaced` and publishes `PaymentCaptured`.
//!
//! The payment row is written in the transaction the runtime opens for its PostgreSQL
//! inbox, so it commits together with the event id: a redelivered order is charged
//! exactly once. `PaymentCaptured` is appended to the transactional outbox in that same
//! transaction, not published from inside it: it exists exactly when the payment row
//! does. The outbox relay (run by the worker when the ConsumerGroup has `spec.outbox`)
//! publishes it after the commit, with a stable event id derived from the order's.
//!
//! Settings: `DATABASE_URL` (required; in Kubernetes from a Secret through the
//! ConsumerGroup's `template.env`), `PAYMENT_WORK_MS` (simulated payment-provider call,
//! default 2 ms), `PAYMENT_CAPTURED_TOPIC` (default `payments.payment.captured`),
//! `PAYMENT_FAIL_EVERY` (default 0, off: the first attempt at about one order in n fails
//! after writing, as a provider timeout would; its transaction rolls back and the retry
//! goes through).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context as _;
use eventops_consumer_runtime::contract;
use eventops_consumer_runtime::outbox::RelayOptions;
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
    fail_every: u64,
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
        ctx.outbox_event(
            tx,
            &self.captured_topic,
            Some(order.order_id.as_bytes()),
            captured,
        )
        .await?;
        // The first attempt at every n-th order (by its id) fails; its retry goes through.
        let nth = order.order_id.bytes().map(u64::from).sum::<u64>();
        if self.fail_every > 0 && ctx.attempt() == 1 && nth.is_multiple_of(self.fail_every) {
            // Everything above rolls back: no payment row, no PaymentCaptured.
            return Err(HandlerError::message(
                ErrorKind::Transient,
                "the payment provider timed out (PAYMENT_FAIL_EVERY)",
            ));
        }
        Ok(())
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
    let fail_every = match std::env::var("PAYMENT_FAIL_EVERY") {
        Ok(v) => v.parse().with_context(|| {
            format!("PAYMENT_FAIL_EVERY is {v:?}; expected a whole number (0 turns it off)")
        })?,
        Err(_) => 0,
    };

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

    let mut worker = Worker::from_env()?;
    if std::env::var(contract::OUTBOX_TOPICS).is_err() {
        // Not configured by the operator (spec.outbox): relay the payments database's
        // outbox anyway, or PaymentCaptured would wait in it forever.
        worker = worker.outbox_relay(
            &url,
            RelayOptions {
                topics: Some(BTreeSet::from([captured_topic.clone()])),
                ..RelayOptions::default()
            },
        );
    }
    worker
        // Charging twice is not an option, whatever the ConsumerGroup says.
        .idempotency(Idempotency::Postgres) // the inbox is in DATABASE_URL's database too
        .build_transactional(Payment {
            work,
            captured_topic,
            fail_every,
        })
        .await?
        .run()
        .await?;
    Ok(())
}
