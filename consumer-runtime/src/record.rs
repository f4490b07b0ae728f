//! A consumed Kafka record, copied out of librdkafka's buffer so it can cross tasks.

use std::sync::Arc;

use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers, OwnedHeaders};

use crate::dead_letter::TimestampType;

/// One consumed record.
#[derive(Debug)]
pub struct Record {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) timestamp: Option<i64>,
    pub(crate) timestamp_type: TimestampType,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) headers: Option<OwnedHeaders>,
}

impl Record {
    /// Copies a polled message; `topic` is the partition's shared topic name.
    pub(crate) fn from_message(topic: Arc<str>, m: &BorrowedMessage<'_>) -> Self {
        let (timestamp_type, timestamp) = match m.timestamp() {
            rdkafka::Timestamp::NotAvailable => (TimestampType::NotAvailable, None),
            rdkafka::Timestamp::CreateTime(t) => (TimestampType::CreateTime, Some(t)),
            rdkafka::Timestamp::LogAppendTime(t) => (TimestampType::LogAppendTime, Some(t)),
        };
        Self {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            timestamp,
            timestamp_type,
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: m.headers().map(|h| h.detach()),
        }
    }

    /// Topic it was read from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partition it was read from.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Its offset.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// Its timestamp in epoch milliseconds, if it has one.
    pub fn timestamp(&self) -> Option<i64> {
        self.timestamp
    }

    /// Its key.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// Its value.
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }

    /// The last value of header `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .filter(|(k, _)| *k == name)
            .last()
            .and_then(|(_, v)| v)
    }

    /// All headers, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.headers
            .iter()
            .flat_map(|h| h.iter())
            .map(|h| (h.key, h.value))
    }
}
