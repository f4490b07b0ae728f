//! The order-processing example: the events its services exchange and the settings its
//! workers share. The binaries:
//!
//! - `order-processing-producer`: publishes `OrderPlaced` at a steady rate, with an
//!   optional traffic spike;
//! - `order-processing-inventory`: reserves stock for each order (simulated I/O);
//! - `order-processing-payment`: captures the payment in PostgreSQL, in the same
//!   transaction as the runtime's inbox row, and publishes `PaymentCaptured`;
//! - `order-processing-notification`: tells the customer about orders and payments.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Topic of [`OrderPlaced`].
pub const ORDER_PLACED_TOPIC: &str = "orders.order.placed";
/// Topic of [`PaymentCaptured`].
pub const PAYMENT_CAPTURED_TOPIC: &str = "payments.payment.captured";
/// Event type of [`OrderPlaced`].
pub const ORDER_PLACED: &str = "OrderPlaced";
/// Event type of [`PaymentCaptured`].
pub const PAYMENT_CAPTURED: &str = "PaymentCaptured";

/// A customer placed an order. Key: the order id.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OrderPlaced {
    /// Order id.
    pub order_id: String,
    /// Customer id.
    pub customer_id: String,
    /// Ordered items.
    pub items: Vec<OrderLine>,
    /// What the customer pays, in cents.
    pub total_cents: i64,
}

/// One line of an order.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    /// Stock keeping unit.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

/// The payment of an order was captured. Key: the order id.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PaymentCaptured {
    /// Order id.
    pub order_id: String,
    /// Amount captured, in cents.
    pub amount_cents: i64,
}

/// Reads a duration in milliseconds from environment variable `name`, `default_ms` when
/// unset. Fails naming the variable when it is not a whole number.
pub fn env_millis(name: &str, default_ms: u64) -> anyhow::Result<Duration> {
    match std::env::var(name) {
        Err(_) => Ok(Duration::from_millis(default_ms)),
        Ok(v) => v.trim().parse().map(Duration::from_millis).map_err(|_| {
            anyhow::anyhow!("environment variable {name} is {v:?}; expected milliseconds as a whole number, such as {default_ms}")
        }),
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
