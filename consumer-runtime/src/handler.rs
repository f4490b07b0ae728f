//! What a worker's code implements ([`Handler`] or [`TransactionalHandler`]) and what it
//! receives: the decoded [`Event`] and a [`Context`] to publish follow-up records with the
//! same correlation id.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::{CORRELATION_HEADER, Envelope, EventEnvelope};
use crate::error::{ErrorKind, HandlerError};
use crate::record::Record;

/// Handles one event. Return `Ok` when done: the offset is then committable. Errors say
/// whether a retry can help ([`HandlerError::transient`]) or not
/// ([`HandlerError::permanent`]).
///
/// A handler may be called more than once for one event (at-least-once delivery, retries);
/// with idempotency `Memory` or `Postgres` a duplicate delivery of an already processed
/// event id is skipped.
pub trait Handler: Send + Sync + 'static {
    /// Handles `event`.
    fn handle(
        &self,
        event: &Event<'_>,
        ctx: &Context<'_>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Handles one event inside a PostgreSQL transaction that also records the event id in
/// the inbox table: the handler's writes and the inbox row commit together, so a duplicate
/// delivery has its effect exactly once. Several events may share one transaction (each
/// in its own savepoint), so do not commit or roll back `tx` yourself.
pub trait TransactionalHandler: Send + Sync + 'static {
    /// Handles `event`, writing through `tx`.
    fn handle(
        &self,
        event: &Event<'_>,
        tx: &tokio_postgres::Transaction<'_>,
        ctx: &Context<'_>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A decoded event and the record it came in.
#[derive(Debug)]
pub struct Event<'a> {
    pub(crate) record: &'a Record,
    pub(crate) envelope: EventEnvelope<'a>,
}

impl<'a> Event<'a> {
    /// Event id (the idempotency key).
    pub fn id(&self) -> &str {
        &self.envelope.id
    }

    /// Event type.
    pub fn event_type(&self) -> &str {
        &self.envelope.event_type
    }

    /// Schema version of the data.
    pub fn schema_version(&self) -> u32 {
        self.envelope.schema_version
    }

    /// The correlation id: the `eventops-correlation-id` header, else the envelope's.
    pub fn correlation_id(&self) -> Option<&str> {
        correlation_id(self.record, &self.envelope)
    }

    /// When the event happened (RFC 3339), if the producer said.
    pub fn timestamp(&self) -> Option<&str> {
        self.envelope.timestamp.as_deref()
    }

    /// The data decoded into `T`; a mismatch is a permanent error.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        self.envelope
            .data_as::<T>()
            .map_err(|e| HandlerError::permanent(e).with_type_name("serde_json::Error"))
    }

    /// The data as raw JSON text (`null` when absent).
    pub fn raw_data(&self) -> &str {
        self.envelope.data.unwrap_or("null")
    }

    /// The Kafka record.
    pub fn record(&self) -> &Record {
        self.record
    }
}

pub(crate) fn correlation_id<'a>(
    record: &'a Record,
    envelope: &'a EventEnvelope<'_>,
) -> Option<&'a str> {
    record
        .header(CORRELATION_HEADER)
        .and_then(|v| std::str::from_utf8(v).ok())
        .or(envelope.correlation_id.as_deref())
}

/// What a handler gets besides the event: its attempt number and a producer that stamps
/// the event's correlation id on everything it publishes.
pub struct Context<'a> {
    pub(crate) producer: &'a FutureProducer,
    pub(crate) correlation_id: Option<&'a str>,
    pub(crate) attempt: u32,
    /// The handled record's `traceparent`, forwarded when there is no OpenTelemetry span.
    pub(crate) traceparent: Option<&'a [u8]>,
}

impl Context<'_> {
    /// The correlation id of the event being handled.
    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id
    }

    /// 1 for the first attempt, 2 for the first retry, ...
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Publishes a record with the correlation id header and the current span's W3C
    /// `traceparent` (see [`tracing_otel`](crate::tracing_otel)), and waits for the
    /// broker's acknowledgement. A failure is transient.
    pub async fn publish(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<(), HandlerError> {
        let trace = crate::tracing_otel::outgoing_headers(self.traceparent);
        let mut headers = OwnedHeaders::new_with_capacity(1 + trace.len());
        if let Some(c) = self.correlation_id {
            headers = headers.insert(Header {
                key: CORRELATION_HEADER,
                value: Some(c),
            });
        }
        for (key, value) in &trace {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(payload)
            .headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| HandlerError::transient(e))
    }

    /// Publishes an event envelope, setting its correlation id to this event's when it has
    /// none.
    pub async fn publish_event<T: Serialize>(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        mut event: Envelope<T>,
    ) -> Result<(), HandlerError> {
        if event.correlation_id.is_none() {
            event.correlation_id = self.correlation_id.map(str::to_string);
        }
        let bytes = serde_json::to_vec(&event)
            .map_err(|e| HandlerError::from_error(ErrorKind::Permanent, e))?;
        self.publish(topic, key, &bytes).await
    }

    /// Appends an event envelope to the transactional outbox through `tx` (the
    /// [`TransactionalHandler`]'s transaction), instead of publishing it now: it is
    /// published by the outbox relay after `tx` commits, and never if `tx` rolls back.
    /// Like [`publish_event`](Self::publish_event) it carries this event's correlation id
    /// (in the envelope and the header) and the `traceparent`. A database failure is
    /// transient. See [`outbox`](crate::outbox).
    pub async fn outbox_event<T: Serialize>(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        topic: &str,
        key: Option<&[u8]>,
        mut event: Envelope<T>,
    ) -> Result<(), HandlerError> {
        if event.correlation_id.is_none() {
            event.correlation_id = self.correlation_id.map(str::to_string);
        }
        let mut message = crate::outbox::OutboxMessage::event(topic, key, &event)
            .map_err(|e| HandlerError::from_error(ErrorKind::Permanent, e))?;
        if let Some(c) = &event.correlation_id {
            message = message.with_header(CORRELATION_HEADER, c.as_bytes());
        }
        for (name, value) in crate::tracing_otel::outgoing_headers(self.traceparent) {
            message = message.with_header(name, value.into_bytes());
        }
        crate::outbox::append(tx, &message)
            .await
            .map_err(HandlerError::transient)
    }
}
