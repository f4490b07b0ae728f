//! The PostgreSQL side of the inbox: connecting (with TLS, [`tls`]), the versioned schema
//! ([`migrate`]), retention ([`retention`]) and the settings for them
//! ([`PostgresOptions`], set through [`WorkerBuilder`]).
//!
//! # Schema: shipped migrations
//!
//! The inbox schema is `consumer-runtime/migrations/NNNN_*.sql`, each file recording its
//! version in `eventops_migrations`. At startup a worker either applies the missing ones
//! ([`WorkerBuilder::postgres_auto_migrate`]`(true)`, the default) or only checks that they
//! were applied (`false`) and refuses to start, naming the files, when they were not.
//!
//! Applying is the default because a worker then runs against an empty database and
//! upgrades the schema itself, as it always created its table, and because it is safe with
//! many pods: the migrations run in one transaction under an advisory lock. Turn it off
//! when the worker's database role should not own tables (it then needs only `SELECT`,
//! `INSERT` and `DELETE` on `eventops_inbox`) or when the schema is managed elsewhere
//! (Flyway, Liquibase, sqlx, `psql -1 -f` in a deploy job).
//!
//! # Retention
//!
//! Processed ids older than [`WorkerBuilder::postgres_inbox_retention`] (default 7 days,
//! Kafka's default `retention.ms`: a redelivery from the topic cannot be older) are
//! deleted in batches on a timer; see [`retention`].

pub(crate) mod claim;
pub mod migrate;
pub mod retention;
pub mod tls;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

pub use migrate::{MIGRATIONS, Migration, check, migrate, required_version};

use crate::idempotency::{InboxError, PostgresTimeouts};
use crate::worker::WorkerBuilder;

/// How the worker treats its inbox database beyond the URL and pool size.
#[derive(Clone, Debug, PartialEq)]
pub struct PostgresOptions {
    /// Apply missing shipped migrations at startup (`true`) or only check them.
    pub auto_migrate: bool,
    /// Processed ids older than this are pruned; `None` keeps them forever.
    pub retention: Option<Duration>,
    /// Most ids one pruning statement deletes.
    pub retention_batch: usize,
    /// How often the pruner runs.
    pub retention_interval: Duration,
    /// Bounds on connecting, each statement and waiting for a pooled connection.
    pub timeouts: PostgresTimeouts,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            auto_migrate: true,
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_batch: 1_000,
            retention_interval: Duration::from_secs(60),
            timeouts: PostgresTimeouts::default(),
        }
    }
}

/// A connection pool of at most `size` connections to `url` (a `postgres://` URL or
/// `key=value` string, with libpq's `sslmode` and `sslrootcert`, see [`tls`]).
pub fn pool(url: &str, size: usize) -> Result<Pool, InboxError> {
    pool_with(url, size, &PostgresTimeouts::default())
}

/// [`pool`] with `timeouts`: connecting, each statement (the server's
/// `statement_timeout`) and waiting for a free connection are bounded, so a database that
/// stops answering shows as a failure (the partition waits and retries) and not a hang.
pub fn pool_with(url: &str, size: usize, timeouts: &PostgresTimeouts) -> Result<Pool, InboxError> {
    let (mut config, tls) = tls::parse(url)?;
    config.connect_timeout(timeouts.connect);
    let statement = format!("-c statement_timeout={}", timeouts.statement.as_millis());
    let options = match config.get_options() {
        Some(o) if !o.is_empty() => format!("{o} {statement}"),
        _ => statement,
    };
    config.options(&options);
    let manager = Manager::from_config(
        config,
        tls::connector(&tls)?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeouts.pool_wait))
        .create_timeout(Some(timeouts.connect))
        .recycle_timeout(Some(timeouts.connect))
        .build()
        .map_err(|e| InboxError(e.to_string()))
}

/// Connects to `url` like the worker does (TLS included) and applies the missing
/// shipped migrations; returns the versions applied. For deploy jobs and tests.
pub async fn migrate_url(url: &str) -> Result<Vec<i32>, InboxError> {
    let pool = pool(url, 1)?;
    let mut client = pool.get().await.map_err(connect_error)?;
    migrate(&mut client).await
}

/// A failed connection, with the cause chain (a TLS refusal says why).
pub(crate) fn connect_error(e: impl std::error::Error) -> InboxError {
    let mut message = format!("connecting: {e}");
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    InboxError(message)
}

impl WorkerBuilder {
    /// Whether the worker applies the shipped inbox migrations it finds missing at
    /// startup (default `true`); with `false` it only checks, and refuses to start when
    /// the schema is behind. See the [`postgres`](crate::postgres) module.
    pub fn postgres_auto_migrate(mut self, on: bool) -> Self {
        self.options.postgres.auto_migrate = on;
        self
    }

    /// How long processed event ids are remembered (default 7 days); `None` keeps them
    /// forever. A delivery of an id after it was pruned is handled again.
    pub fn postgres_inbox_retention(mut self, window: Option<Duration>) -> Self {
        self.options.postgres.retention = window;
        self
    }

    /// Most ids one pruning statement deletes (default 1 000).
    pub fn postgres_inbox_retention_batch(mut self, ids: usize) -> Self {
        self.options.postgres.retention_batch = ids;
        self
    }

    /// How often old ids are pruned (default every minute).
    pub fn postgres_inbox_retention_interval(mut self, interval: Duration) -> Self {
        self.options.postgres.retention_interval = interval;
        self
    }
}
