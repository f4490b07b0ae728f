//! Recognising duplicate deliveries by event id.
//!
//! - [`MemoryStore`]: a bounded set of recent event ids (a ring: the oldest id is forgotten
//!   when it is full). Cheap; survives neither restarts nor rebalances to other pods.
//! - [`PostgresInbox`]: the `eventops_inbox` table (schema, TLS and retention: see
//!   [`postgres`](crate::postgres)). With a
//!   [`TransactionalHandler`](crate::TransactionalHandler) the handler's own writes and the
//!   inbox row commit in one transaction, so a duplicate delivery has its effect exactly
//!   once, across restarts and pods. A plain [`Handler`](crate::Handler) claims the id in
//!   a transaction held open while it runs: it runs to success once per id, unless the
//!   process dies between its effect and the claim's commit.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::postgres::{self, PostgresOptions, retention};

/// Claims an event id for a group; affects no row when it was already processed.
pub const INSERT_INBOX_ROW: &str = "INSERT INTO eventops_inbox (consumer_group, event_id) \
    VALUES ($1, $2) ON CONFLICT DO NOTHING";

/// Claims a batch of event ids (`$2`, a text array) for a group in one statement; returns
/// the ids that were not processed before (each once, even if the batch repeats it).
pub const CLAIM_INBOX_ROWS: &str = "INSERT INTO eventops_inbox (consumer_group, event_id) \
    SELECT $1, id FROM unnest($2::text[]) AS ids(id) ON CONFLICT DO NOTHING RETURNING event_id";

/// Releases claimed event ids (`$2`, a text array) whose handler did not run in this
/// transaction, so a later delivery handles them.
pub const RELEASE_INBOX_ROWS: &str =
    "DELETE FROM eventops_inbox WHERE consumer_group = $1 AND event_id = ANY($2::text[])";

/// Whether an event id was processed.
pub const SELECT_INBOX_ROW: &str =
    "SELECT 1 FROM eventops_inbox WHERE consumer_group = $1 AND event_id = $2";

/// A bounded in-memory set of recently processed event ids.
///
/// Ids are stored as 128-bit hashes (two independently keyed SipHashes), so the store
/// allocates nothing per event; a false duplicate needs a 128-bit collision.
pub struct MemoryStore {
    capacity: usize,
    keys: (std::hash::RandomState, std::hash::RandomState),
    inner: Mutex<Ring>,
}

struct Ring {
    set: HashSet<u128, KeyHash>,
    order: VecDeque<u128>,
}

/// Hashes the store's keys, which are already keyed SipHashes of the ids: their bits are
/// used as they are rather than hashed a third time (once per lookup, insert and removal).
/// Without the store's random keys nobody can choose ids whose keys collide.
#[derive(Clone, Copy, Default)]
struct KeyHash;

impl BuildHasher for KeyHash {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u128(&mut self, k: u128) {
        self.0 ^= (k as u64) ^ ((k >> 64) as u64);
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u128 keys are hashed here; any other input still hashes (FNV-1a).
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

impl MemoryStore {
    /// A store remembering the last `capacity` event ids (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            keys: (Default::default(), Default::default()),
            inner: Mutex::new(Ring {
                set: HashSet::with_capacity_and_hasher(capacity, KeyHash),
                order: VecDeque::with_capacity(capacity),
            }),
        }
    }

    /// The 128-bit key `id` is remembered by.
    pub(crate) fn key(&self, id: &str) -> u128 {
        let mut a = self.keys.0.build_hasher();
        a.write(id.as_bytes());
        let mut b = self.keys.1.build_hasher();
        b.write(id.as_bytes());
        (u128::from(a.finish()) << 64) | u128::from(b.finish())
    }

    /// Whether `id` was recorded as processed.
    pub fn contains(&self, id: &str) -> bool {
        self.contains_key(self.key(id))
    }

    pub(crate) fn contains_key(&self, k: u128) -> bool {
        self.inner.lock().unwrap().set.contains(&k)
    }

    /// Records `id` as processed, forgetting the oldest id when full. Returns `false` when
    /// it was already there.
    pub fn insert(&self, id: &str) -> bool {
        self.insert_key(self.key(id))
    }

    pub(crate) fn insert_key(&self, k: u128) -> bool {
        let mut ring = self.inner.lock().unwrap();
        if !ring.set.insert(k) {
            return false;
        }
        ring.order.push_back(k);
        if ring.order.len() > self.capacity
            && let Some(old) = ring.order.pop_front()
        {
            ring.set.remove(&old);
        }
        true
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().order.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The PostgreSQL inbox: a connection pool and the consumer group its rows belong to.
#[derive(Clone)]
pub struct PostgresInbox {
    pool: Pool,
    group: String,
    _pruner: Option<Arc<retention::Pruner>>,
}

/// The inbox database could not be reached or set up.
#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL inbox: {0}")]
pub struct InboxError(pub String);

/// Bounds on every wait for the inbox database, so that a database that stops
/// answering shows as a failure (the partition waits and retries) instead of a hang.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresTimeouts {
    /// Establishing a connection (default 5 s).
    pub connect: Duration,
    /// One statement, enforced by the server as `statement_timeout` (default 30 s).
    pub statement: Duration,
    /// Waiting for a free connection of the pool (default 5 s).
    pub pool_wait: Duration,
}

impl Default for PostgresTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            statement: Duration::from_secs(30),
            pool_wait: Duration::from_secs(5),
        }
    }
}

impl PostgresInbox {
    /// Connects to `url` (a `postgres://` URL or key=value string) with at most
    /// `pool_size` connections, with the default [`PostgresOptions`].
    pub async fn connect(url: &str, pool_size: usize, group: &str) -> Result<Self, InboxError> {
        Self::connect_with(url, pool_size, group, &PostgresOptions::default()).await
    }

    /// Connects to `url` with at most `pool_size` connections (TLS as its `sslmode`
    /// says, every wait bounded by `options.timeouts`), applies or checks the shipped
    /// migrations as `options` say, and starts pruning old ids when `options` set a
    /// retention window.
    pub async fn connect_with(
        url: &str,
        pool_size: usize,
        group: &str,
        options: &PostgresOptions,
    ) -> Result<Self, InboxError> {
        let pool = postgres::pool_with(url, pool_size, &options.timeouts)?;
        let mut client = pool.get().await.map_err(postgres::connect_error)?;
        if options.auto_migrate {
            postgres::migrate(&mut client).await?;
        } else {
            postgres::migrate::check_for(&client, postgres::migrate::INBOX_VERSION, "the inbox")
                .await?;
        }
        drop(client);
        let pruner = match options.retention {
            Some(window) => Some(Arc::new(retention::spawn(
                postgres::pool(url, 1)?,
                group.to_string(),
                window,
                options.retention_batch,
                options.retention_interval,
            ))),
            None => None,
        };
        Ok(Self {
            pool,
            group: group.to_string(),
            _pruner: pruner,
        })
    }

    /// The connection pool (handlers may use it for reads outside the inbox transaction).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The consumer group the inbox rows are recorded for.
    pub fn group(&self) -> &str {
        &self.group
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_remembers_a_bounded_window() {
        let s = MemoryStore::new(2);
        assert!(s.insert("a"));
        assert!(!s.insert("a"));
        assert!(s.insert("b"));
        assert!(s.contains("a"));
        assert!(s.insert("c"));
        assert!(!s.contains("a"), "the oldest id is forgotten");
        assert!(s.contains("b") && s.contains("c"));
        assert_eq!(s.len(), 2);
    }
}
