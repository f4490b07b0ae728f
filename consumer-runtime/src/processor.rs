//! How one event is handled with each idempotency choice: the handler call wrapped in
//! the duplicate check and, for the PostgreSQL inbox, in a transaction.

use std::time::Instant;

use tracing::Instrument;

use crate::error::HandlerError;
use crate::handler::{Context, Event, Handler, TransactionalHandler};
use crate::idempotency::{INSERT_INBOX_ROW, MemoryStore, PostgresInbox};
use crate::partition::Part;

/// What became of an event that did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The handler ran and succeeded.
    Handled,
    /// Its id was already processed; the handler did not run.
    Duplicate,
}

/// Handles events for a partition task.
pub(crate) trait Processor: Send + Sync + 'static {
    /// Whether [`first_attempts`](Self::first_attempts) handles several events as one unit.
    const BATCHED: bool;

    /// First attempts of consecutive events, in order, as one unit where that pays (one
    /// transaction). Returns results for a prefix of `events` that ends at the first
    /// failure or covers all.
    fn first_attempts<'a>(
        &'a self,
        part: &'a Part,
        events: &'a [Event<'a>],
    ) -> impl Future<Output = Vec<Result<Outcome, HandlerError>>> + Send + 'a;

    /// Attempt number `attempt` of one event.
    fn attempt<'a>(
        &'a self,
        part: &'a Part,
        event: &'a Event<'a>,
        attempt: u32,
    ) -> impl Future<Output = Result<Outcome, HandlerError>> + Send + 'a;
}

/// The span a handler call runs in: debug level, so with the usual `info` filter it is
/// disabled and costs one level check per record.
fn span(event: &Event<'_>, attempt: u32) -> tracing::Span {
    tracing::debug_span!(
        "event",
        event_id = event.id(),
        event_type = event.event_type(),
        correlation_id = event.correlation_id().unwrap_or(""),
        topic = event.record().topic(),
        partition = event.record().partition(),
        offset = event.record().offset(),
        attempt,
    )
}

/// Where a plain [`Handler`]'s duplicates are recognised.
pub(crate) enum Dedup {
    None,
    Memory(MemoryStore),
    Postgres(PostgresInbox),
}

/// A [`Handler`] with an optional duplicate check.
pub(crate) struct Plain<H> {
    pub handler: H,
    pub dedup: Dedup,
}

impl<H: Handler> Plain<H> {
    async fn once(
        &self,
        part: &Part,
        event: &Event<'_>,
        attempt: u32,
    ) -> Result<Outcome, HandlerError> {
        let mut memory_key = 0;
        match &self.dedup {
            Dedup::None => {}
            Dedup::Memory(store) => {
                memory_key = store.key(event.id());
                if store.contains_key(memory_key) {
                    return Ok(Outcome::Duplicate);
                }
            }
            Dedup::Postgres(inbox) => {
                let client = inbox.pool().get().await.map_err(HandlerError::transient)?;
                let seen = client
                    .query_opt(
                        "SELECT 1 FROM eventops_inbox WHERE consumer_group = $1 AND event_id = $2",
                        &[&inbox.group(), &event.id()],
                    )
                    .await
                    .map_err(HandlerError::transient)?;
                if seen.is_some() {
                    return Ok(Outcome::Duplicate);
                }
            }
        }
        let ctx = Context {
            producer: &part.core.producer,
            correlation_id: event.correlation_id(),
            attempt,
        };
        let started = Instant::now();
        let result = self
            .handler
            .handle(event, &ctx)
            .instrument(span(event, attempt))
            .await;
        part.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        result?;
        match &self.dedup {
            Dedup::None => {}
            Dedup::Memory(store) => {
                store.insert_key(memory_key);
            }
            Dedup::Postgres(inbox) => {
                let client = inbox.pool().get().await.map_err(HandlerError::transient)?;
                client
                    .execute(INSERT_INBOX_ROW, &[&inbox.group(), &event.id()])
                    .await
                    .map_err(HandlerError::transient)?;
            }
        }
        Ok(Outcome::Handled)
    }
}

impl<H: Handler> Processor for Plain<H> {
    /// One event at a time: nothing is gained by grouping, and each finished record is
    /// committable at once.
    const BATCHED: bool = false;

    async fn first_attempts<'a>(
        &'a self,
        part: &'a Part,
        events: &'a [Event<'a>],
    ) -> Vec<Result<Outcome, HandlerError>> {
        match events.first() {
            Some(event) => vec![self.once(part, event, 1).await],
            None => Vec::new(),
        }
    }

    async fn attempt<'a>(
        &'a self,
        part: &'a Part,
        event: &'a Event<'a>,
        attempt: u32,
    ) -> Result<Outcome, HandlerError> {
        self.once(part, event, attempt).await
    }
}

/// A [`TransactionalHandler`] with the PostgreSQL inbox.
pub(crate) struct Transactional<H> {
    pub handler: H,
    pub inbox: PostgresInbox,
}

impl<H: TransactionalHandler> Transactional<H> {
    /// Handles `events` in one transaction, each in a savepoint, up to the first failure.
    async fn in_transaction(
        &self,
        part: &Part,
        events: &[Event<'_>],
        attempt: u32,
    ) -> Vec<Result<Outcome, HandlerError>> {
        let fail = |e: HandlerError| vec![Err(e)];
        let mut client = match self.inbox.pool().get().await {
            Ok(c) => c,
            Err(e) => return fail(HandlerError::transient(e)),
        };
        let mut tx = match client.transaction().await {
            Ok(tx) => tx,
            Err(e) => return fail(HandlerError::transient(e)),
        };
        let mut out = Vec::with_capacity(events.len());
        let started = Instant::now();
        for event in events {
            let r = self.in_savepoint(part, &mut tx, event, attempt).await;
            let failed = r.is_err();
            out.push(r);
            // A transaction lasts at most a commit interval: its records only become
            // committable when it commits.
            if failed || part.stopped() || started.elapsed() >= part.core.options.commit_interval {
                break;
            }
        }
        match tx.commit().await {
            Ok(()) => out,
            // Nothing of this transaction happened: the first event failed.
            Err(e) => fail(HandlerError::transient(e)),
        }
    }

    async fn in_savepoint(
        &self,
        part: &Part,
        tx: &mut tokio_postgres::Transaction<'_>,
        event: &Event<'_>,
        attempt: u32,
    ) -> Result<Outcome, HandlerError> {
        let sp = tx
            .savepoint("eventops_event")
            .await
            .map_err(HandlerError::transient)?;
        let claimed = sp
            .execute(INSERT_INBOX_ROW, &[&self.inbox.group(), &event.id()])
            .await
            .map_err(HandlerError::transient)?;
        if claimed == 0 {
            sp.commit().await.map_err(HandlerError::transient)?;
            return Ok(Outcome::Duplicate);
        }
        let ctx = Context {
            producer: &part.core.producer,
            correlation_id: event.correlation_id(),
            attempt,
        };
        let started = Instant::now();
        let result = self
            .handler
            .handle(event, &sp, &ctx)
            .instrument(span(event, attempt))
            .await;
        part.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                sp.commit().await.map_err(HandlerError::transient)?;
                Ok(Outcome::Handled)
            }
            Err(e) => {
                // Undo this event's writes and its inbox row; earlier events stay.
                let _ = sp.rollback().await;
                Err(e)
            }
        }
    }
}

impl<H: TransactionalHandler> Processor for Transactional<H> {
    const BATCHED: bool = true;

    async fn first_attempts<'a>(
        &'a self,
        part: &'a Part,
        events: &'a [Event<'a>],
    ) -> Vec<Result<Outcome, HandlerError>> {
        self.in_transaction(part, events, 1).await
    }

    async fn attempt<'a>(
        &'a self,
        part: &'a Part,
        event: &'a Event<'a>,
        attempt: u32,
    ) -> Result<Outcome, HandlerError> {
        let mut r = self
            .in_transaction(part, std::slice::from_ref(event), attempt)
            .await;
        r.pop().unwrap_or(Ok(Outcome::Handled))
    }
}
