//! The relay: publishes committed outbox rows to Kafka and deletes them.
//!
//! One cycle, in one database transaction:
//!
//! 1. **Claim shards.** Lock up to [`RelayOptions::shards_per_claim`] rows of
//!    `eventops_outbox_shards` that have pending rows, `FOR UPDATE SKIP LOCKED`, in random
//!    order. Another relay skips what this one holds, so two relays never publish the same
//!    row, or two rows of one key, at once, and both make progress.
//! 2. **Read** the oldest [`RelayOptions::batch`] rows of those shards, in id order.
//! 3. **Publish** them in that order with the idempotent producer and wait for every
//!    acknowledgement.
//! 4. **Delete** the acknowledged rows and end the transaction, which frees the shards.
//!
//! A crash anywhere before step 4 ends leaves the rows in the table: they are published
//! again with the same event id (at least once). Every acknowledged row is deleted.
//!
//! A refused row (for a topic not among [`RelayOptions::topics`], or one Kafka refuses)
//! stays in the table; the failure is logged with the reason and counted, the relay backs
//! off and tries again, and the oldest pending age grows until someone fixes the cause.
//! Nothing is dropped. Later rows of the same key are held back unsent, in order, when the
//! refusal is known before sending (a topic not allowed, a record too large for the
//! producer). A refusal Kafka reports only after sending comes when later rows of the batch
//! may already be on their way: those of the same key are then delivered ahead of it, and
//! the relay logs that the key's order was broken. Rows that Kafka has not acknowledged
//! within [`RelayOptions::delivery_timeout`] stay for the next cycle, so a Kafka outage
//! never holds the shard locks (and a transaction of the business database) open long.
//!
//! Between cycles the relay waits for a `NOTIFY` on [`CHANNEL`](super::CHANNEL) (sent by
//! [`append`](super::append) and delivered by PostgreSQL at commit), or at most
//! [`RelayOptions::fallback_poll`], and it loops without waiting while it finds rows.

use std::collections::{BTreeSet, HashSet};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

use crate::idempotency::{InboxError, PostgresTimeouts};
use crate::metrics::Metrics;
use crate::postgres;

/// How a relay works; [`Default`] suits most.
#[derive(Clone, Debug, PartialEq)]
pub struct RelayOptions {
    /// Most rows one cycle publishes (default 1,000).
    pub batch: usize,
    /// Most shards one cycle holds (default 8 of the 16): leaves shards for a second relay.
    pub shards_per_claim: usize,
    /// Longest wait without a notification before looking anyway (default 10 s): covers a
    /// notification lost while the listening connection was down.
    pub fallback_poll: Duration,
    /// The topics rows may name; `None` allows any. A row for another topic is refused and
    /// kept (the operator grants Write on exactly these).
    pub topics: Option<BTreeSet<String>>,
    /// Longest back-off after a failed cycle (default 5 s; it starts at 100 ms).
    pub max_backoff: Duration,
    /// How often the pending-rows gauges are refreshed (default 5 s).
    pub gauge_interval: Duration,
    /// Apply the shipped migrations when the outbox table is missing (default `true`), or
    /// only check them.
    pub auto_migrate: bool,
    /// Bounds on connecting and on each statement.
    pub timeouts: PostgresTimeouts,
    /// Longest wait for Kafka's acknowledgements in one cycle (default 30 s); rows not
    /// acknowledged by then stay and are sent again (at least once).
    pub delivery_timeout: Duration,
    /// At shutdown, how long the relay goes on publishing what is pending (default 5 s).
    pub drain_on_shutdown: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            batch: 1_000,
            shards_per_claim: 8,
            fallback_poll: Duration::from_secs(10),
            topics: None,
            max_backoff: Duration::from_secs(5),
            gauge_interval: Duration::from_secs(5),
            auto_migrate: true,
            timeouts: PostgresTimeouts::default(),
            delivery_timeout: Duration::from_secs(30),
            drain_on_shutdown: Duration::from_secs(5),
        }
    }
}

/// What a relay has done, for tests and the standalone binary's log.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows Kafka acknowledged (a row published again after a crash counts again).
    pub published: AtomicU64,
    /// Rows refused (by Kafka or by [`RelayOptions::topics`]); they stay in the table.
    pub refused: AtomicU64,
    /// Cycles that claimed at least one shard.
    pub claims: AtomicU64,
}

/// The relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The outbox database: connecting, or its schema.
    #[error(transparent)]
    Database(#[from] InboxError),
}

/// Publishes the rows of one outbox table. See the [module](self) for how.
pub struct Relay {
    pool: Pool,
    url: String,
    producer: FutureProducer,
    options: RelayOptions,
    stats: Arc<RelayStats>,
    metrics: Option<Arc<Metrics>>,
}

/// What one cycle did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Cycle {
    published: usize,
    refused: usize,
}

const CLAIM: &str = "SELECT s.shard FROM eventops_outbox_shards s \
     WHERE EXISTS (SELECT 1 FROM eventops_outbox o WHERE o.shard = s.shard) \
     ORDER BY random() LIMIT $1 FOR UPDATE OF s SKIP LOCKED";
const ROWS: &str = "SELECT id, shard, topic, key, payload, header_names, header_values, event_id \
     FROM eventops_outbox WHERE shard = ANY($1) ORDER BY id LIMIT $2";
const DELETE: &str = "DELETE FROM eventops_outbox WHERE id = ANY($1)";
const GAUGES: &str = "SELECT (SELECT count(*) FROM \
         (SELECT 1 FROM eventops_outbox LIMIT 10000000) AS pending), \
     (SELECT extract(epoch FROM clock_timestamp() - created_at)::float8 \
         FROM eventops_outbox ORDER BY id LIMIT 1)";

impl Relay {
    /// A relay of the outbox in `database_url` (TLS as its `sslmode` says) publishing
    /// with `producer`, which must be idempotent (`enable.idempotence=true`) for a key's
    /// order to survive retries. Applies or checks the schema as `options` say.
    pub async fn connect(
        database_url: &str,
        producer: FutureProducer,
        options: RelayOptions,
    ) -> Result<Self, RelayError> {
        let pool = postgres::pool_with(database_url, 2, &options.timeouts)?;
        let mut client = pool.get().await.map_err(postgres::connect_error)?;
        if options.auto_migrate {
            postgres::migrate(&mut client).await?;
        } else {
            postgres::migrate::check_for(&client, super::SCHEMA_VERSION, "the outbox relay")
                .await?;
        }
        drop(client);
        Ok(Self {
            pool,
            url: database_url.to_string(),
            producer,
            options,
            stats: Arc::default(),
            metrics: None,
        })
    }

    /// Reports into `metrics` (`eventops_worker_outbox_*`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Relays until `shutdown` completes; a cycle under way is finished first.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(self.url.clone(), wake.clone(), self.options.clone()));
        let gauges = self.metrics.clone().map(|m| {
            tokio::spawn(refresh_gauges(
                self.pool.clone(),
                m,
                self.options.gauge_interval,
            ))
        });
        let mut shutdown = pin!(shutdown);
        let mut backoff = Duration::ZERO;
        loop {
            if backoff > Duration::ZERO {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
            if futures::poll!(&mut shutdown).is_ready() {
                break;
            }
            // Not raced with `shutdown`: a cycle that has published deletes what it did.
            match self.cycle().await {
                Ok(c) if c.refused > 0 => backoff = self.next_backoff(backoff),
                Ok(c) if c.published > 0 => backoff = Duration::ZERO,
                Ok(_) => {
                    backoff = Duration::ZERO;
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(self.options.fallback_poll) => {}
                    }
                }
                Err(e) => {
                    backoff = self.next_backoff(backoff);
                    tracing::warn!(error = %e, retry_in = ?backoff,
                        "outbox relay: the database failed; nothing was lost, trying again");
                    if let Some(m) = &self.metrics {
                        m.dependency_failed("outbox database");
                    }
                }
            }
        }
        // What the last handlers appended goes out now rather than with the next relay.
        let deadline = tokio::time::Instant::now() + self.options.drain_on_shutdown;
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout_at(deadline, self.cycle()).await {
                Ok(Ok(c)) if c.published > 0 && c.refused == 0 => {}
                _ => break,
            }
        }
        listener.abort();
        if let Some(g) = gauges {
            g.abort();
        }
    }

    fn next_backoff(&self, current: Duration) -> Duration {
        (current * 2)
            .max(Duration::from_millis(100))
            .min(self.options.max_backoff)
    }

    /// One claim–read–publish–delete cycle (see the [module](self)).
    async fn cycle(&self) -> Result<Cycle, String> {
        let mut client = self.pool.get().await.map_err(|e| e.to_string())?;
        self.cycle_on(&mut client).await.map_err(|e| e.to_string())
    }

    async fn cycle_on(
        &self,
        client: &mut deadpool_postgres::Client,
    ) -> Result<Cycle, tokio_postgres::Error> {
        // READ COMMITTED whatever the server's default: the rows are read after the shard
        // locks are granted, so they include what the previous holder left.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
            .start()
            .await?;
        // The end of this transaction only deletes published rows: if a crash loses the
        // delete, they are published again (at least once), so it need not wait for the
        // WAL flush, which would delay the next cycle.
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .await?;
        let claim = tx.prepare_cached(CLAIM).await?;
        let shards: Vec<i16> = tx
            .query(&claim, &[&(self.options.shards_per_claim as i64)])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if shards.is_empty() {
            tx.commit().await?;
            return Ok(Cycle::default());
        }
        self.stats.claims.fetch_add(1, Ordering::Relaxed);
        let read = tx.prepare_cached(ROWS).await?;
        let rows = tx
            .query(&read, &[&shards, &(self.options.batch as i64)])
            .await?;
        let outcomes = self.publish(&rows).await;

        // Every acknowledged row is done; refused and held rows stay, in order.
        let mut done: Vec<i64> = Vec::with_capacity(rows.len());
        let mut cycle = Cycle::default();
        let mut refused_keys: HashSet<Vec<u8>> = HashSet::new();
        for (row, outcome) in rows.iter().zip(outcomes) {
            let key: Option<&[u8]> = row.get(3);
            match outcome {
                Outcome::Delivered => {
                    cycle.published += 1;
                    done.push(row.get(0));
                    if let Some(k) = key
                        && refused_keys.contains(k)
                    {
                        tracing::error!(
                            id = row.get::<_, i64>(0), topic = row.get::<_, &str>(2),
                            event_id = row.get::<_, &str>(7),
                            key = %String::from_utf8_lossy(k),
                            "outbox relay: Kafka refused an earlier row of this key after this \
                             one was sent: this row was delivered ahead of it"
                        );
                    }
                }
                Outcome::Held => {}
                Outcome::Refused(reason) => {
                    cycle.refused += 1;
                    if let Some(k) = key {
                        refused_keys.insert(k.to_vec());
                    }
                    tracing::error!(
                        id = row.get::<_, i64>(0), topic = row.get::<_, &str>(2),
                        event_id = row.get::<_, &str>(7), reason = %reason,
                        "outbox relay: a row was refused; it stays in eventops_outbox, with \
                         the later rows of its key, and is tried again"
                    );
                }
            }
        }
        let delete = tx.prepare_cached(DELETE).await?;
        tx.execute(&delete, &[&done]).await?;
        tx.commit().await?;
        self.stats
            .published
            .fetch_add(cycle.published as u64, Ordering::Relaxed);
        self.stats
            .refused
            .fetch_add(cycle.refused as u64, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.outbox_published.inc_by(cycle.published as u64);
            m.outbox_refused.inc_by(cycle.refused as u64);
        }
        Ok(cycle)
    }

    /// Sends the rows in order and waits for the acknowledgements, at most
    /// [`RelayOptions::delivery_timeout`]. A row refused before it is sent holds back the
    /// later rows of its key unsent (a row without a key holds back nothing).
    async fn publish(&self, rows: &[tokio_postgres::Row]) -> Vec<Outcome> {
        let mut held: HashSet<&[u8]> = HashSet::new();
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            let key: Option<&[u8]> = row.get(3);
            if key.is_some_and(|k| held.contains(k)) {
                pending.push(Err(None));
                continue;
            }
            match self.send(row).await {
                Ok(delivery) => pending.push(Ok(delivery)),
                Err(reason) => {
                    held.extend(key);
                    pending.push(Err(Some(reason)));
                }
            }
        }
        let deadline = tokio::time::Instant::now() + self.options.delivery_timeout;
        let mut outcomes = Vec::with_capacity(pending.len());
        for p in pending {
            outcomes.push(match p {
                Ok(delivery) => match tokio::time::timeout_at(deadline, delivery).await {
                    Ok(Ok(Ok(_))) => Outcome::Delivered,
                    Ok(Ok(Err((e, _)))) => Outcome::Refused(e.to_string()),
                    Ok(Err(_)) => Outcome::Refused("the producer was dropped".into()),
                    Err(_) => Outcome::Refused(format!(
                        "Kafka did not acknowledge it within {:?} (delivery_timeout)",
                        self.options.delivery_timeout
                    )),
                },
                Err(Some(reason)) => Outcome::Refused(reason),
                Err(None) => Outcome::Held,
            });
        }
        outcomes
    }

    /// Hands one row to the producer.
    async fn send(&self, row: &tokio_postgres::Row) -> Result<DeliveryFuture, String> {
        let topic: &str = row.get(2);
        if let Some(allowed) = &self.options.topics
            && !allowed.contains(topic)
        {
            return Err(format!(
                "topic {topic} is not one this relay may publish to ({}); add its \
                 EventTopic to the ConsumerGroup's spec.outbox.topics",
                allowed.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let key: Option<&[u8]> = row.get(3);
        let payload: Option<&[u8]> = row.get(4);
        let names: Vec<&str> = row.get(5);
        let values: Vec<&[u8]> = row.get(6);
        let mut headers = OwnedHeaders::new_with_capacity(names.len());
        for (name, value) in names.iter().zip(&values) {
            headers = headers.insert(Header {
                key: name,
                value: Some(*value),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e.to_string()),
            }
        }
    }
}

/// What became of one row in a cycle.
enum Outcome {
    /// Kafka acknowledged it.
    Delivered,
    /// Refused, with the reason.
    Refused(String),
    /// Not sent: an earlier row of its key was refused before it was sent.
    Held,
}

/// Keeps a connection that `LISTEN`s on the outbox channel and wakes the relay on every
/// notification; reconnects (and wakes the relay, which may have missed one) after a
/// failure.
async fn listen(url: String, wake: Arc<Notify>, options: RelayOptions) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match listen_once(&url, &wake, &options).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff,
                    "outbox relay: the LISTEN connection failed; polling meanwhile");
                backoff = (backoff * 2).min(options.max_backoff);
            }
        }
        wake.notify_one();
        tokio::time::sleep(backoff).await;
    }
}

async fn listen_once(url: &str, wake: &Notify, options: &RelayOptions) -> Result<(), String> {
    let (mut config, tls) = postgres::tls::parse(url).map_err(|e| e.to_string())?;
    config.connect_timeout(options.timeouts.connect);
    let connector = postgres::tls::connector(&tls).map_err(|e| e.to_string())?;
    let (client, mut connection) = config
        .connect(connector)
        .await
        .map_err(|e| postgres::connect_error(e).to_string())?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let listen = client.batch_execute("LISTEN eventops_outbox");
    let mut listen = pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            r = &mut listen, if !listening => {
                r.map_err(|e| e.to_string())?;
                listening = true;
                // Rows committed before LISTEN took effect got no notification for us.
                wake.notify_one();
            }
            m = messages.next() => match m {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Ok(()),
            },
        }
    }
}

/// Refreshes the pending-rows gauges every `interval`.
async fn refresh_gauges(pool: Pool, metrics: Arc<Metrics>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(client) = pool.get().await else {
            continue;
        };
        match client.query_one(GAUGES, &[]).await {
            Ok(row) => {
                metrics.outbox_pending.set(row.get::<_, i64>(0));
                metrics
                    .outbox_oldest_age
                    .set(row.get::<_, Option<f64>>(1).unwrap_or(0.0));
            }
            Err(e) => tracing::debug!(error = %e, "outbox relay: reading the gauges"),
        }
    }
}
