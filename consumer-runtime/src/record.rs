//! A consumed Kafka record, copied out of librdkafka's buffer so it can cross tasks.

use std::ops::Range;
use std::sync::{Arc, Mutex};

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
    /// The buffer holding the key and value, shared with other records of the partition
    /// polled with this one (see [`Gathered`]).
    bytes: Arc<Buffer>,
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    pub(crate) headers: Option<OwnedHeaders>,
}

/// Most bytes of keys and values of one partition's records copied into one buffer.
///
/// One allocation per buffer instead of two per record (the key and the value, allocated
/// on the poll thread and freed on a partition task's thread, which is slow in the
/// allocator). A buffer is freed when its last record is dropped, so a record that waits
/// (a key backing off while other keys go on) keeps at most this much memory alive.
const BUFFER_BYTES: usize = 16 * 1024;

/// Most empty buffers a [`BufferPool`] keeps (1 MiB).
const POOL_BUFFERS: usize = 64;

/// Buffers of [`BUFFER_BYTES`] whose records are all dropped, for the poll thread to fill
/// again: a buffer allocated on the poll thread and freed on a partition task's thread
/// cost the allocator a cross-thread free (and consolidation), and each new one fresh
/// pages to clear (together about 2% of a worker's CPU with 1 KiB records, in perf).
/// Keeps at most [`POOL_BUFFERS`] idle.
#[derive(Default)]
pub(crate) struct BufferPool(Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BUFFER_BYTES))
    }
}

/// A buffer shared by the records copied into it; back to its pool when they are gone.
#[derive(Debug)]
struct Buffer {
    bytes: Vec<u8>,
    pool: Option<Arc<BufferPool>>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BufferPool")
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool
            && self.bytes.capacity() == BUFFER_BYTES
        {
            let mut buffers = pool.0.lock().unwrap();
            if buffers.len() < POOL_BUFFERS {
                let mut bytes = std::mem::take(&mut self.bytes);
                bytes.clear();
                buffers.push(bytes);
            }
        }
    }
}

/// A polled record copied out of librdkafka, waiting for its buffer to be complete.
struct Copied {
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    timestamp_type: TimestampType,
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    headers: Option<OwnedHeaders>,
}

/// The records of one partition polled since they were last handed to its task, copied
/// into shared buffers of about [`BUFFER_BYTES`].
pub(crate) struct Gathered {
    topic: Arc<str>,
    pool: Arc<BufferPool>,
    records: Vec<Record>,
    buffer: Vec<u8>,
    in_buffer: Vec<Copied>,
}

impl Gathered {
    /// Gathers records of `topic`, whose shared name is used for every record, into
    /// buffers from `pool`.
    pub fn new(topic: Arc<str>, pool: Arc<BufferPool>) -> Self {
        Self {
            topic,
            pool,
            records: Vec::new(),
            buffer: Vec::new(),
            in_buffer: Vec::new(),
        }
    }

    /// Copies a polled message.
    pub fn push(&mut self, m: &BorrowedMessage<'_>) {
        let (key, payload) = (m.key(), m.payload());
        let size = key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len);
        if !self.buffer.is_empty() && self.buffer.len() + size > self.buffer.capacity() {
            self.seal();
        }
        if self.buffer.capacity() == 0 {
            self.buffer = if size <= BUFFER_BYTES {
                self.pool.take()
            } else {
                Vec::with_capacity(size)
            };
        }
        let mut copy = |bytes: Option<&[u8]>| {
            bytes.map(|b| {
                let start = self.buffer.len();
                self.buffer.extend_from_slice(b);
                start..self.buffer.len()
            })
        };
        let (key, payload) = (copy(key), copy(payload));
        let (timestamp_type, timestamp) = match m.timestamp() {
            rdkafka::Timestamp::NotAvailable => (TimestampType::NotAvailable, None),
            rdkafka::Timestamp::CreateTime(t) => (TimestampType::CreateTime, Some(t)),
            rdkafka::Timestamp::LogAppendTime(t) => (TimestampType::LogAppendTime, Some(t)),
        };
        self.in_buffer.push(Copied {
            partition: m.partition(),
            offset: m.offset(),
            timestamp,
            timestamp_type,
            key,
            payload,
            headers: m.headers().map(|h| h.detach()),
        });
    }

    /// The records gathered, in the order they were pushed.
    pub fn take(&mut self) -> Vec<Record> {
        self.seal();
        std::mem::take(&mut self.records)
    }

    /// Makes records of those in the current buffer; the next one starts a new buffer.
    fn seal(&mut self) {
        if self.in_buffer.is_empty() {
            return;
        }
        let mut bytes = std::mem::take(&mut self.buffer);
        if bytes.len() < bytes.capacity() / 2 {
            bytes.shrink_to_fit(); // few records this time: keep no unused buffer alive
        }
        let bytes = Arc::new(Buffer {
            bytes,
            pool: Some(self.pool.clone()),
        });
        self.records
            .extend(self.in_buffer.drain(..).map(|c| Record {
                topic: self.topic.clone(),
                partition: c.partition,
                offset: c.offset,
                timestamp: c.timestamp,
                timestamp_type: c.timestamp_type,
                bytes: bytes.clone(),
                key: c.key,
                payload: c.payload,
                headers: c.headers,
            }));
    }
}

impl Record {
    /// A record made here rather than polled.
    #[cfg(test)]
    pub(crate) fn new(
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> Self {
        let mut bytes = Vec::new();
        let mut copy = |b: Option<&[u8]>| {
            b.map(|b| {
                let start = bytes.len();
                bytes.extend_from_slice(b);
                start..bytes.len()
            })
        };
        let (key, payload) = (copy(key), copy(payload));
        Self {
            topic: topic.into(),
            partition,
            offset,
            timestamp: None,
            timestamp_type: TimestampType::NotAvailable,
            bytes: Arc::new(Buffer { bytes, pool: None }),
            key,
            payload,
            headers,
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
        self.key.clone().map(|r| &self.bytes.bytes[r])
    }

    /// Its value.
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.clone().map(|r| &self.bytes.bytes[r])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_goes_back_to_its_pool_when_its_last_record_is_dropped() {
        let pool = Arc::new(BufferPool::default());
        let mut bytes = pool.take();
        bytes.extend_from_slice(b"value");
        let shared = Arc::new(Buffer {
            bytes,
            pool: Some(pool.clone()),
        });
        let other = shared.clone();
        drop(shared);
        assert!(pool.0.lock().unwrap().is_empty(), "a record still holds it");
        drop(other);
        let reused = pool.take();
        assert!(reused.is_empty());
        assert_eq!(reused.capacity(), BUFFER_BYTES);
        assert!(pool.0.lock().unwrap().is_empty());
        // Buffers of another size (a large record's, a shrunk one) are freed, and the
        // pool keeps at most POOL_BUFFERS.
        drop(Buffer {
            bytes: Vec::with_capacity(BUFFER_BYTES * 2),
            pool: Some(pool.clone()),
        });
        assert!(pool.0.lock().unwrap().is_empty());
        for _ in 0..POOL_BUFFERS + 3 {
            drop(Buffer {
                bytes: Vec::with_capacity(BUFFER_BYTES),
                pool: Some(pool.clone()),
            });
        }
        assert_eq!(pool.0.lock().unwrap().len(), POOL_BUFFERS);
    }
}
