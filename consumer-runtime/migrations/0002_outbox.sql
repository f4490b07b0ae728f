-- EventOps consumer runtime: outbox schema, version 2.
--
-- Apply after 0001_inbox.sql, once per database, in one transaction:
--
--   psql "$DATABASE_URL" -1 -v ON_ERROR_STOP=1 -f 0002_outbox.sql
--
-- or from Rust with `eventops_consumer_runtime::postgres::migrate` (a worker applies it at
-- startup unless `WorkerBuilder::postgres_auto_migrate(false)`).

-- Events written in the same transaction as the business change they announce; the
-- relay publishes them to Kafka and then deletes them. `id` orders them: rows of one key
-- are appended under a per-key transaction lock, so for one key `id` order is the order
-- in which the writing transactions became visible.
CREATE TABLE IF NOT EXISTS eventops_outbox (
    id bigserial PRIMARY KEY,
    -- Which of the eventops_outbox_shards rows a relay must hold to publish this row:
    -- derived from the key, so one key is only ever published by one relay at a time.
    shard smallint NOT NULL,
    topic text NOT NULL,
    key bytea,
    payload bytea,
    header_names text[] NOT NULL DEFAULT '{}',
    header_values bytea[] NOT NULL DEFAULT '{}',
    -- The event's stable id: published again after a crash, the consumer's inbox
    -- recognises it.
    event_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- A relay reads the oldest rows of the shards it holds.
CREATE INDEX IF NOT EXISTS eventops_outbox_shard_id ON eventops_outbox (shard, id);

-- One row per shard; a relay locks the rows of the shards it publishes
-- (`FOR UPDATE SKIP LOCKED`), so two relays never publish the same row, or two rows of
-- one key, at once. The lock ends with the relay's transaction, or its connection.
CREATE TABLE IF NOT EXISTS eventops_outbox_shards (
    shard smallint PRIMARY KEY
);
INSERT INTO eventops_outbox_shards (shard)
    SELECT generate_series(0, 15) ON CONFLICT (shard) DO NOTHING;

INSERT INTO eventops_migrations (version, description)
    VALUES (2, 'outbox') ON CONFLICT (version) DO NOTHING;
