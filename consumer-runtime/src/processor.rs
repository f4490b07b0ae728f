//! How one event is handled with each idempotency choice: the handler call wrapped in
//! the duplicate check and, for the PostgreSQL inbox, in a transaction.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use futures::FutureExt;
use tracing::Instrument;

use crate::error::{DependencyError, Failure, HandlerError, HandlerPanic};
use crate::handler::{Context, Event, Handler, TransactionalHandler};
use crate::idempotency::{CLAIM_INBOX_ROWS, MemoryStore, PostgresInbox, RELEASE_INBOX_ROWS};
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
    ) -> impl Future<Output = Vec<Result<Outcome, Failure>>> + Send + 'a;

    /// Attempt number `attempt` of one event.
    fn attempt<'a>(
        &'a self,
        part: &'a Part,
        event: &'a Event<'a>,
        attempt: u32,
    ) -> impl Future<Output = Result<Outcome, Failure>> + Send + 'a;
}

/// Runs one handler call; a panic becomes a permanent error (so the record is
/// dead-lettered with the panic message and the partition goes on), is counted, and is
/// logged with the event's correlation id.
async fn guarded(
    part: &Part,
    event: &Event<'_>,
    call: impl Future<Output = Result<(), HandlerError>>,
) -> Result<(), HandlerError> {
    match AssertUnwindSafe(call).catch_unwind().await {
        Ok(result) => result,
        Err(payload) => {
            let panic = HandlerPanic::from_payload(&*payload);
            part.metrics.panics.inc();
            let r = event.record();
            tracing::error!(
                correlation_id = event.correlation_id().unwrap_or(""),
                event_id = event.id(),
                topic = r.topic(),
                partition = r.partition(),
                offset = r.offset(),
                panic = %panic.message,
                "the handler panicked; the record is failed as a permanent error"
            );
            Err(HandlerError::permanent(panic))
        }
    }
}

/// The span a handler call runs in: `info`, with the correlation id, a child of the
/// record's `traceparent` (see [`tracing_otel`](crate::tracing_otel)).
fn span(event: &Event<'_>, attempt: u32) -> tracing::Span {
    crate::tracing_otel::event_span(event, attempt)
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
    async fn once(&self, part: &Part, event: &Event<'_>, attempt: u32) -> Result<Outcome, Failure> {
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
                // Check and record in one claim: see `postgres::claim`.
                let call = self.call(part, event, attempt);
                return crate::postgres::claim::claimed(inbox, event.id(), call).await;
            }
        }
        self.call(part, event, attempt).await?;
        if let Dedup::Memory(store) = &self.dedup {
            store.insert_key(memory_key);
        }
        Ok(Outcome::Handled)
    }

    /// The handler call, timed, in its span.
    async fn call(&self, part: &Part, event: &Event<'_>, attempt: u32) -> Result<(), HandlerError> {
        let ctx = Context {
            producer: &part.core.producer,
            correlation_id: event.correlation_id(),
            attempt,
            traceparent: event
                .record()
                .header(crate::tracing_otel::TRACEPARENT_HEADER),
        };
        let started = Instant::now();
        let result = guarded(
            part,
            event,
            self.handler
                .handle(event, &ctx)
                .instrument(span(event, attempt)),
        )
        .await;
        part.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        result
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
    ) -> Vec<Result<Outcome, Failure>> {
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
    ) -> Result<Outcome, Failure> {
        self.once(part, event, attempt).await
    }
}

/// A [`TransactionalHandler`] with the PostgreSQL inbox.
pub(crate) struct Transactional<H> {
    pub handler: H,
    pub inbox: PostgresInbox,
}

/// How one transaction of [`Transactional::claimed`] ended.
enum Batch {
    /// Results for a prefix of the events, committed.
    Done(Vec<Result<Outcome, Failure>>),
    /// The handler of event `.0` failed with `.1`: the transaction was rolled back.
    Failed(usize, HandlerError),
}

impl<H: TransactionalHandler> Transactional<H> {
    /// Handles `events` in one transaction: one statement claims every event id in the
    /// inbox (ids already there are duplicates: skipped), then the handlers of the new
    /// ones write in the same transaction, which commits their writes and inbox rows
    /// together. Returns results for a prefix ending at the first failure, or for all.
    ///
    /// No savepoint per event: when a handler fails, the transaction is rolled back and
    /// the events before the failing one go again in a new transaction, so they commit
    /// and the failing one is retried or dead-lettered alone. Their handlers then run
    /// twice; their database writes happen once (anything a handler publishes outside the
    /// transaction may be published twice, as after any crash).
    async fn in_transaction(
        &self,
        part: &Part,
        events: &[Event<'_>],
        attempt: u32,
    ) -> Vec<Result<Outcome, Failure>> {
        let mut end = events.len();
        let mut failure = None;
        loop {
            match self.claimed(part, &events[..end], attempt).await {
                Ok(Batch::Done(mut results)) => {
                    if results.len() == end
                        && let Some(e) = failure
                    {
                        results.push(Err(Failure::Record(e)));
                    }
                    return results;
                }
                Ok(Batch::Failed(0, e)) => return vec![Err(Failure::Record(e))],
                Ok(Batch::Failed(i, e)) => (end, failure) = (i, Some(e)),
                Err(e) => return vec![Err(e)],
            }
        }
    }

    /// The fast path of [`in_transaction`](Self::in_transaction): no savepoints.
    async fn claimed(
        &self,
        part: &Part,
        events: &[Event<'_>],
        attempt: u32,
    ) -> Result<Batch, Failure> {
        let mut client = self
            .inbox
            .pool()
            .get()
            .await
            .map_err(inbox_failed("connecting"))?;
        let claim = client
            .prepare_cached(CLAIM_INBOX_ROWS)
            .await
            .map_err(inbox_failed("preparing the claim"))?;
        let tx = client
            .transaction()
            .await
            .map_err(inbox_failed("beginning a transaction"))?;
        let ids: Vec<&str> = events.iter().map(|e| e.id()).collect();
        let rows = tx
            .query(&claim, &[&self.inbox.group(), &ids])
            .await
            .map_err(inbox_failed("claiming event ids"))?;
        let mut new: std::collections::HashSet<&str> =
            rows.iter().map(|r| r.get::<_, &str>(0)).collect();
        let mut out = Vec::with_capacity(events.len());
        let started = Instant::now();
        for (i, event) in events.iter().enumerate() {
            if !new.remove(event.id()) {
                out.push(Ok(Outcome::Duplicate));
            } else {
                let ctx = Context {
                    producer: &part.core.producer,
                    correlation_id: event.correlation_id(),
                    attempt,
                    traceparent: event
                        .record()
                        .header(crate::tracing_otel::TRACEPARENT_HEADER),
                };
                let handled = Instant::now();
                let result = guarded(
                    part,
                    event,
                    self.handler
                        .handle(event, &tx, &ctx)
                        .instrument(span(event, attempt)),
                )
                .await;
                part.metrics
                    .latency
                    .observe(handled.elapsed().as_secs_f64());
                if let Err(e) = result {
                    // Rolled back explicitly: when even that fails the connection is
                    // gone, and the handler most likely failed because the database went
                    // away. That is the runtime's dependency, not the record's fault.
                    if let Err(rollback) = tx.rollback().await {
                        return Err(Failure::Dependency(DependencyError::inbox(
                            "rolling back after the handler failed",
                            format!("{rollback} (the handler said: {e})"),
                        )));
                    }
                    return Ok(Batch::Failed(i, e));
                }
                out.push(Ok(Outcome::Handled));
            }
            // A transaction lasts at most a commit interval: its records only become
            // committable when it commits.
            let last = i + 1 == events.len();
            if !last && (part.stopped() || started.elapsed() >= part.core.options.commit_interval) {
                // The ids claimed for events not handled here are released in this
                // transaction, so their next delivery handles them.
                if !new.is_empty() {
                    let release = tx
                        .prepare_cached(RELEASE_INBOX_ROWS)
                        .await
                        .map_err(inbox_failed("preparing the release"))?;
                    let left: Vec<&str> = new.into_iter().collect();
                    tx.execute(&release, &[&self.inbox.group(), &left])
                        .await
                        .map_err(inbox_failed("releasing unhandled claims"))?;
                }
                break;
            }
        }
        // If the commit's outcome is unknown (the connection broke), the retry finds the
        // ids either claimed (duplicates, skipped) or not: one effect either way.
        tx.commit()
            .await
            .map_err(inbox_failed("committing the transaction"))?;
        Ok(Batch::Done(out))
    }
}

impl<H: TransactionalHandler> Processor for Transactional<H> {
    const BATCHED: bool = true;

    async fn first_attempts<'a>(
        &'a self,
        part: &'a Part,
        events: &'a [Event<'a>],
    ) -> Vec<Result<Outcome, Failure>> {
        self.in_transaction(part, events, 1).await
    }

    async fn attempt<'a>(
        &'a self,
        part: &'a Part,
        event: &'a Event<'a>,
        attempt: u32,
    ) -> Result<Outcome, Failure> {
        let mut r = self
            .in_transaction(part, std::slice::from_ref(event), attempt)
            .await;
        r.pop().unwrap_or(Ok(Outcome::Handled))
    }
}

/// Maps an inbox database error to a dependency failure while doing `what`.
fn inbox_failed<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> Failure {
    move |e| Failure::Dependency(DependencyError::inbox(what, e))
}
