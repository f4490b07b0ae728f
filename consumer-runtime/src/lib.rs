//! The library EventOps workers link.
//!
//! Today it holds [`contract`]: the environment variables through which the operator
//! configures every worker pod. Processing (commits after handling, retries, dead-letter
//! topics, idempotency, graceful shutdown, health and metrics) is still to be built.

pub mod contract;
