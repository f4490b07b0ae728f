//! The library EventOps workers link: at-least-once processing with offsets committed only
//! after a record is handled or dead-lettered, retries with exponential back-off and jitter,
//! Spring-Kafka-compatible dead-letter topics, non-blocking retry topics, idempotency
//! (in memory or a PostgreSQL inbox), correlation ids, graceful shutdown, and `/healthz`,
//! `/readyz` and `/metrics`.
//!
//! With idempotency `Postgres` the inbox lives in the worker's own database
//! (`DATABASE_URL`, TLS by libpq's `sslmode`); its schema is the shipped, versioned
//! migrations in `consumer-runtime/migrations/`, applied at startup unless turned off, and
//! old ids are pruned after a retention window: see [`postgres`]. Records carry W3C
//! `traceparent` headers in and out, and every log line about a record names its
//! correlation id: see [`tracing_otel`].
//!
//! A worker reads its configuration from the environment the operator writes
//! ([`contract`]), implements [`Handler`] (or [`TransactionalHandler`] for exactly-once
//! effects in PostgreSQL) and runs until SIGTERM:
//!
//! ```no_run
//! use eventops_consumer_runtime::{Context, Event, Handler, HandlerError, ResultExt, Worker};
//!
//! #[derive(serde::Deserialize)]
//! struct OrderPlaced {
//!     order_id: String,
//!     quantity: u32,
//! }
//!
//! struct Reserve;
//!
//! impl Handler for Reserve {
//!     async fn handle(&self, event: &Event<'_>, ctx: &Context<'_>) -> Result<(), HandlerError> {
//!         let order: OrderPlaced = event.data()?; // a mismatch is permanent: dead-lettered
//!         let reply = format!("{{\"orderId\":\"{}\",\"reserved\":{}}}", order.order_id, order.quantity);
//!         // Carries the event's correlation id; a failure is transient: retried.
//!         ctx.publish("inventory.reserved", Some(order.order_id.as_bytes()), reply.as_bytes()).await
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     Worker::from_env()?            // EVENTOPS_* variables, see `contract`
//!         .key_concurrency(4)        // overridable in code
//!         .build(Reserve)
//!         .await?
//!         .run()                     // until SIGTERM: finish in-flight, commit, leave
//!         .await?;
//!     Ok(())
//! }
//! ```

// One FFI call to librdkafka (`worker::commit_async`) is the only `unsafe` allowed.
#![deny(unsafe_code)]

pub mod contract;
pub mod dead_letter;
pub mod envelope;
pub mod error;
mod handler;
pub mod idempotency;
pub mod metrics;
pub mod offsets;
pub mod outbox;
mod partition;
pub mod postgres;
mod processor;
mod record;
pub mod retry;
pub mod retry_topic;
pub mod tracing_otel;
mod worker;

pub use contract::{Idempotency, WorkerConfig};
pub use envelope::{CORRELATION_HEADER, Envelope};
pub use error::{ErrorKind, HandlerError, ResultExt};
pub use handler::{Context, Event, Handler, TransactionalHandler};
pub use record::Record;
pub use retry::RetryPolicy;
pub use retry_topic::{RETRY_ATTEMPT_HEADER, RETRY_DUE_HEADER};
/// The PostgreSQL client the [`TransactionalHandler`] transaction comes from.
pub use tokio_postgres;
pub use worker::{CONSUMER_DEFAULTS, Worker, WorkerBuilder, WorkerError};
