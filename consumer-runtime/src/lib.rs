//! The library EventOps workers link.
//!
//! Planned (see the project's issues): manual commits after processing, retries with
//! back-off, error classification, dead-letter topics, an idempotency inbox in the
//! worker's own database, graceful shutdown, health, metrics and tracing. Nothing of that
//! exists yet; this crate only holds its place in the workspace.
