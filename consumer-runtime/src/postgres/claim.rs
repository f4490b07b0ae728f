//! How a plain [`Handler`](crate::Handler) uses the PostgreSQL inbox: the event id is
//! claimed (`INSERT ... ON CONFLICT DO NOTHING`) in a transaction that stays open while
//! the handler runs, and commits only when it succeeds.
//!
//! A second delivery of the same id meanwhile (another pod after a rebalance, another key
//! lane, another partition) blocks on the uncommitted row and then finds it: a duplicate.
//! A failed handler rolls the claim back, so the retry (or the next delivery) handles it.
//! So the handler runs to success once per id, across pods and restarts, except when the
//! process dies or the database fails after the handler's effect and before the claim
//! commits: then the event is handled again (at least once). Effects that must happen
//! exactly once belong in the inbox's transaction: use a
//! [`TransactionalHandler`](crate::TransactionalHandler).
//!
//! The claim holds a pool connection while the handler runs: give the pool
//! (`postgres_pool_size`) as many connections as handlers run at once (assigned
//! partitions × `key_concurrency`), or handlers wait for one.

use crate::error::{DependencyError, Failure, HandlerError};
use crate::idempotency::{INSERT_INBOX_ROW, PostgresInbox};
use crate::processor::Outcome;

/// Runs `handle` under a claim of `id`; a duplicate when the id was processed before.
pub(crate) async fn claimed(
    inbox: &PostgresInbox,
    id: &str,
    handle: impl Future<Output = Result<(), HandlerError>>,
) -> Result<Outcome, Failure> {
    let mut client = inbox
        .pool()
        .get()
        .await
        .map_err(inbox_error("connecting"))?;
    let insert = client
        .prepare_cached(INSERT_INBOX_ROW)
        .await
        .map_err(inbox_error("preparing the inbox claim"))?;
    let tx = client
        .transaction()
        .await
        .map_err(inbox_error("beginning the claim"))?;
    let claimed = tx
        .execute(&insert, &[&inbox.group(), &id])
        .await
        .map_err(inbox_error("claiming the event id"))?;
    if claimed == 0 {
        return Ok(Outcome::Duplicate);
    }
    // On failure (or if this future is dropped) `tx` rolls back and frees the id.
    handle.await?;
    tx.commit()
        .await
        .map_err(inbox_error("committing the claim"))?;
    Ok(Outcome::Handled)
}

/// An inbox database failure: not the record's fault. The partition waits for the
/// database and uses up no attempt (see [`Failure::Dependency`]).
fn inbox_error<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> Failure {
    move |e| Failure::Dependency(DependencyError::inbox(what, e))
}
