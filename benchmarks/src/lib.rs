//! What every contender of `tools/bench-runtime` shares: the 1 KiB `OrderPlaced` event
//! the harness produces, the per-record work (decode the envelope and its data, skip a
//! recently seen event id), and the line a contender prints when its first record arrives.
//!
//! The Spring Kafka contender (`benchmarks/spring-kafka`) does the same work in Java.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Size of every produced record's value, in bytes.
pub const PAYLOAD_BYTES: usize = 1024;

/// How many recent event ids the in-memory idempotency sets of the baseline and the
/// Spring contender remember.
pub const SEEN_CAPACITY: usize = 100_000;

/// Line prefix a contender prints, with the Unix time in milliseconds, when its first
/// record reaches the handler. The harness times from there to "all offsets committed".
pub const FIRST_RECORD_LINE: &str = "FIRST_RECORD_AT_MS";

/// The benchmark's event data: an order with a few lines and a note that pads the record
/// to [`PAYLOAD_BYTES`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OrderPlaced {
    /// Order id, also the record key.
    pub order_id: String,
    /// Customer id.
    pub customer_id: String,
    /// Ordered items.
    pub items: Vec<OrderLine>,
    /// Free text; padding.
    pub note: String,
}

/// One line of an order.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    /// Stock keeping unit.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Unit price in cents.
    pub price_cents: u64,
}

/// The record key of order `i`.
pub fn order_key(i: u64) -> String {
    format!("order-{i:09}")
}

/// The JSON envelope of order `i`, exactly [`PAYLOAD_BYTES`] long.
pub fn order_payload(i: u64) -> Vec<u8> {
    let order = |note: String| OrderPlaced {
        order_id: order_key(i),
        customer_id: format!("customer-{:06}", i % 100_000),
        items: (0..3)
            .map(|n| OrderLine {
                sku: format!("sku-{:05}", (i * 7 + n) % 20_000),
                quantity: 1 + (n as u32),
                price_cents: 199 + (i % 1000) * 10 + n,
            })
            .collect(),
        note,
    };
    let envelope = |data| {
        serde_json::to_vec(&OrderEnvelope {
            id: format!("00000000-0000-4000-8000-{i:012}"),
            event_type: "OrderPlaced".into(),
            schema_version: 1,
            correlation_id: Some(format!("bench-{i}")),
            timestamp: Some("2026-11-23T00:00:00Z".into()),
            data,
        })
        .expect("an order serializes")
    };
    let unpadded = envelope(order(String::new())).len();
    let bytes = envelope(order("x".repeat(PAYLOAD_BYTES.saturating_sub(unpadded))));
    debug_assert_eq!(bytes.len(), PAYLOAD_BYTES);
    bytes
}

/// The event envelope as the contenders decode it: the fields of the runtime's envelope,
/// with `data` decoded into [`OrderPlaced`].
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderEnvelope {
    /// Event id: the idempotency key.
    pub id: String,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Data schema version.
    pub schema_version: u32,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// When it happened.
    pub timestamp: Option<String>,
    /// The order.
    pub data: OrderPlaced,
}

/// A bounded set of recently seen event ids; the oldest is forgotten first.
pub struct Seen {
    ids: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl Seen {
    /// An empty set remembering at most `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        Self {
            ids: HashSet::with_capacity(capacity),
            order: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Records `id`; false if it was already there (a duplicate delivery).
    pub fn insert(&mut self, id: &str) -> bool {
        if self.ids.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        self.ids.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }
}

/// Prints [`FIRST_RECORD_LINE`] the first time it is called in the process.
pub fn first_record_seen() {
    static SEEN: AtomicBool = AtomicBool::new(false);
    if !SEEN.swap(true, Ordering::Relaxed) {
        println!("{FIRST_RECORD_LINE} {}", unix_ms());
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_one_kib_envelopes_with_distinct_ids() {
        for i in [0, 1, 999_999, 123_456_789] {
            let bytes = order_payload(i);
            assert_eq!(bytes.len(), PAYLOAD_BYTES);
            let e: OrderEnvelope = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(e.data.order_id, order_key(i));
            assert_eq!(e.event_type, "OrderPlaced");
        }
        assert_ne!(order_payload(1), order_payload(2));
    }

    #[test]
    fn seen_forgets_the_oldest_id_first() {
        let mut seen = Seen::new(2);
        assert!(seen.insert("a"));
        assert!(!seen.insert("a"));
        assert!(seen.insert("b"));
        assert!(seen.insert("c"));
        assert!(seen.insert("a"), "a was the oldest and is forgotten");
        assert!(!seen.insert("c"));
    }
}
