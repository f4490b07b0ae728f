//! The transactional outbox: events are written to the table `eventops_outbox` in the
//! same PostgreSQL transaction as the business change they announce, and a [`Relay`]
//! publishes them to Kafka once that transaction has committed. A rolled-back transaction
//! publishes nothing; a committed one is published at least once, with its stable event
//! id, so a consumer with an inbox applies it exactly once.
//!
//! # Writing
//!
//! [`append`] adds an [`OutboxMessage`] through any `tokio-postgres` client or
//! transaction; a [`TransactionalHandler`](crate::TransactionalHandler) uses
//! [`Context::outbox_event`](crate::Context::outbox_event), which also carries the
//! handled event's correlation id and `traceparent` over:
//!
//! ```no_run
//! # async fn f(tx: &eventops_consumer_runtime::tokio_postgres::Transaction<'_>) -> Result<(), Box<dyn std::error::Error>> {
//! use eventops_consumer_runtime::Envelope;
//! use eventops_consumer_runtime::outbox::{OutboxMessage, append};
//!
//! tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 7", &[]).await?;
//! let event = Envelope::new("PaymentCaptured", 1, serde_json::json!({"account": 7}));
//! append(tx, &OutboxMessage::event("payments.captured", Some(b"7"), &event)?).await?;
//! // commit: the row and the payment become visible together; the relay publishes it.
//! # Ok(()) }
//! ```
//!
//! The table comes from the shipped migration `0002_outbox.sql` (applied with the inbox's,
//! see [`postgres`](crate::postgres)).
//!
//! # Order
//!
//! [`append`] takes a transaction-scoped advisory lock on the message's key, so two
//! transactions appending the same key take turns: for one key, the row ids follow the
//! order in which the transactions committed, and the relay publishes a key's rows in id
//! order with an idempotent producer. Two transactions that append the same two keys in
//! opposite orders can deadlock; PostgreSQL then aborts one (SQLSTATE `40P01`), which a
//! handler reports as a transient error and retries.
//!
//! # Relaying
//!
//! See [`Relay`]: woken by `LISTEN/NOTIFY` when a transaction with outbox rows commits,
//! it claims shards of the table so that two relays never publish the same row or two
//! rows of one key at once, publishes, and deletes what Kafka acknowledged.

mod relay;

pub use relay::{Relay, RelayError, RelayOptions, RelayStats};

use serde::Serialize;
use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use crate::envelope::Envelope;

/// The channel [`append`] notifies and the relay listens on.
pub const CHANNEL: &str = "eventops_outbox";

/// The schema version the outbox needs (`0002_outbox.sql`).
pub const SCHEMA_VERSION: i32 = 2;

/// How many shards the shipped schema has (rows of `eventops_outbox_shards`).
pub const SHARDS: u64 = 16;

/// `pg_advisory_xact_lock`'s first key for the per-key append lock ("eo" in ASCII), so
/// that it does not collide with other advisory locks of the application.
const KEY_LOCK_CLASS: i32 = 0x656f;

/// One record to publish, as [`append`] stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxMessage {
    /// The Kafka topic.
    pub topic: String,
    /// The record key; records of one key keep their order.
    pub key: Option<Vec<u8>>,
    /// The record value.
    pub payload: Vec<u8>,
    /// The event's stable id (the envelope's `id`): the same after any republish.
    pub event_id: String,
    /// Record headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OutboxMessage {
    /// A record of `payload` to `topic`, identified by `event_id`.
    pub fn new(topic: impl Into<String>, event_id: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            topic: topic.into(),
            key: None,
            payload,
            event_id: event_id.into(),
            headers: Vec::new(),
        }
    }

    /// An event envelope as JSON, identified by the envelope's id.
    pub fn event<T: Serialize>(
        topic: impl Into<String>,
        key: Option<&[u8]>,
        event: &Envelope<T>,
    ) -> Result<Self, serde_json::Error> {
        let mut m = Self::new(topic, event.id.clone(), serde_json::to_vec(event)?);
        m.key = key.map(<[u8]>::to_vec);
        Ok(m)
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The message's shard and the key of its append lock: both from a hash of the key
    /// (of the event id when there is no key).
    fn placement(&self) -> (i16, i32) {
        let h = fmix64(fnv1a(
            self.key.as_deref().unwrap_or(self.event_id.as_bytes()),
        ));
        ((h % SHARDS) as i16, (h >> 32) as u32 as i32)
    }
}

/// 64-bit FNV-1a: stable across builds and platforms (the shard is stored).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// MurmurHash3's 64-bit finaliser: FNV-1a alone leaves keys that differ only in their
/// last bytes (`order-1`, `order-2`) in a few shards.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Appends `message` to `eventops_outbox` through `client`, normally the transaction of
/// the business change: it is published only if that transaction commits. Takes the
/// message key's append lock until the transaction ends (see the module's "Order") and
/// notifies the relay, which PostgreSQL delivers at commit.
pub async fn append(
    client: &impl GenericClient,
    message: &OutboxMessage,
) -> Result<(), tokio_postgres::Error> {
    const SQL: &str = "WITH l AS (SELECT pg_advisory_xact_lock($1::int4, $2::int4), \
                              pg_notify('eventops_outbox', '')) \
         INSERT INTO eventops_outbox \
             (shard, topic, key, payload, header_names, header_values, event_id) \
         SELECT $3, $4, $5, $6, $7, $8, $9 FROM l";
    let (shard, lock) = message.placement();
    let names: Vec<&str> = message.headers.iter().map(|(n, _)| n.as_str()).collect();
    let values: Vec<&[u8]> = message.headers.iter().map(|(_, v)| v.as_slice()).collect();
    // Typed parameters: one round trip, no statement to prepare (any client works).
    client
        .execute_typed(
            SQL,
            &[
                (&KEY_LOCK_CLASS, Type::INT4),
                (&lock, Type::INT4),
                (&shard, Type::INT2),
                (&message.topic, Type::TEXT),
                (&message.key, Type::BYTEA),
                (&message.payload, Type::BYTEA),
                (&names, Type::TEXT_ARRAY),
                (&values, Type::BYTEA_ARRAY),
                (&message.event_id, Type::TEXT),
            ],
        )
        .await?;
    Ok(())
}

/// Appends `messages` in order through `client`, as [`append`] does each: one prepared
/// statement executed for every message, pipelined on the connection (one round trip
/// for many rows), and one notification.
pub async fn append_all(
    client: &impl GenericClient,
    messages: &[OutboxMessage],
) -> Result<(), tokio_postgres::Error> {
    const SQL: &str = "WITH l AS (SELECT pg_advisory_xact_lock($1, $2)) \
         INSERT INTO eventops_outbox \
             (shard, topic, key, payload, header_names, header_values, event_id) \
         SELECT $3, $4, $5, $6, $7, $8, $9 FROM l";
    if messages.is_empty() {
        return Ok(());
    }
    let insert = client
        .prepare_typed(
            SQL,
            &[
                Type::INT4,
                Type::INT4,
                Type::INT2,
                Type::TEXT,
                Type::BYTEA,
                Type::BYTEA,
                Type::TEXT_ARRAY,
                Type::BYTEA_ARRAY,
                Type::TEXT,
            ],
        )
        .await?;
    let rows = messages.iter().map(|m| {
        let insert = &insert;
        async move {
            let (shard, lock) = m.placement();
            let names: Vec<&str> = m.headers.iter().map(|(n, _)| n.as_str()).collect();
            let values: Vec<&[u8]> = m.headers.iter().map(|(_, v)| v.as_slice()).collect();
            client
                .execute(
                    insert,
                    &[
                        &KEY_LOCK_CLASS,
                        &lock,
                        &shard,
                        &m.topic,
                        &m.key,
                        &m.payload,
                        &names,
                        &values,
                        &m.event_id,
                    ],
                )
                .await
        }
    });
    futures::future::try_join_all(rows).await?;
    client
        .execute("SELECT pg_notify('eventops_outbox', '')", &[])
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_always_lands_in_one_shard_and_keys_spread_over_all_shards() {
        let m = |key: &str, id: &str| OutboxMessage::new("t", id, vec![]).with_key(key);
        assert_eq!(m("order-1", "a").placement(), m("order-1", "b").placement());
        let shards: std::collections::BTreeSet<i16> = (0..1_000)
            .map(|i| m(&format!("order-{i}"), "x").placement().0)
            .collect();
        assert_eq!(shards.len() as u64, SHARDS, "{shards:?}");
        assert!(shards.iter().all(|s| (0..SHARDS as i16).contains(s)));
        // Without a key the event id places the row.
        let keyless = OutboxMessage::new("t", "evt-1", vec![]);
        assert_eq!(keyless.placement(), m("evt-1", "other").placement());
    }

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // From the FNV reference (draft-eastlake-fnv): FNV-1a 64 of "" and "a".
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn an_envelope_is_stored_with_its_own_id_and_the_key() {
        let e = Envelope::new("PaymentCaptured", 1, serde_json::json!({"x": 1}));
        let m = OutboxMessage::event("payments", Some(b"k"), &e).unwrap();
        assert_eq!(m.event_id, e.id);
        assert_eq!(m.key.as_deref(), Some(&b"k"[..]));
        let back: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(back["id"], e.id.as_str());
    }
}
