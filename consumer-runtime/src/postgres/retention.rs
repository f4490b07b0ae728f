//! Inbox retention: a consumer group's processed ids older than a window are deleted in
//! small batches on a timer, so the inbox stops growing without one long `DELETE`.
//!
//! The pruner runs on its own connection (not one of the pool's), each batch is a
//! statement of its own, and it skips rows another transaction holds (`SKIP LOCKED`), so
//! it never makes a handler wait for a connection or a lock, and several pods of a group
//! pruning at once do not wait for each other either. An id pruned is forgotten: a
//! delivery of it after the window is handled again. Keep the window longer than any
//! redelivery can come late (at least the consumed topics' `retention.ms`).

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::GenericClient;

/// Deletes one batch: at most `limit` of `group`'s ids processed more than `older_than`
/// ago; returns how many it deleted.
pub const PRUNE_INBOX_BATCH: &str = "DELETE FROM eventops_inbox WHERE ctid = ANY(ARRAY(\
    SELECT ctid FROM eventops_inbox \
    WHERE consumer_group = $1 AND processed_at < now() - make_interval(secs => $2) \
    LIMIT $3 FOR UPDATE SKIP LOCKED))";

/// Deletes at most `limit` of `group`'s ids processed more than `older_than` ago, in one
/// statement; returns how many were deleted.
pub async fn prune_batch(
    client: &impl GenericClient,
    group: &str,
    older_than: Duration,
    limit: i64,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            PRUNE_INBOX_BATCH,
            &[&group, &older_than.as_secs_f64(), &limit],
        )
        .await
}

/// Deletes `group`'s ids older than `older_than`, batch after batch, until a batch comes
/// back short; returns the number deleted.
pub async fn prune(
    client: &impl GenericClient,
    group: &str,
    older_than: Duration,
    batch: usize,
) -> Result<u64, tokio_postgres::Error> {
    let limit = batch.max(1) as i64;
    let mut total = 0;
    loop {
        let n = prune_batch(client, group, older_than, limit).await?;
        total += n;
        if n < limit as u64 {
            return Ok(total);
        }
        // Lets the handlers' statements in between; each batch is its own transaction.
        tokio::task::yield_now().await;
    }
}

/// The pruner of a running inbox; stops when dropped.
pub(crate) struct Pruner(tokio::task::JoinHandle<()>);

impl Drop for Pruner {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts pruning `group`'s ids older than `window` every `interval` through `pool` (a
/// pool of its own, one connection). The first run comes after a random part of the
/// interval, so pods started together do not prune together.
pub(crate) fn spawn(
    pool: Pool,
    group: String,
    window: Duration,
    batch: usize,
    interval: Duration,
) -> Pruner {
    let task = tokio::spawn(async move {
        let interval = interval.max(Duration::from_millis(10));
        let first = interval.mul_f64(fastrand::f64());
        tokio::time::sleep(first).await;
        loop {
            let result = match pool.get().await {
                Ok(client) => prune(&**client, &group, window, batch)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    consumer_group = %group, pruned = n, window_s = window.as_secs(),
                    "inbox retention deleted processed ids older than the window"
                ),
                Err(e) => tracing::warn!(consumer_group = %group, error = %e,
                    "inbox retention failed; trying again at the next interval"),
            }
            tokio::time::sleep(interval).await;
        }
    });
    Pruner(task)
}
