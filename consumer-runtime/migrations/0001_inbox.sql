-- EventOps consumer runtime: inbox schema, version 1.
--
-- Apply once per database, in one transaction, as a role that may create tables:
--
--   psql "$DATABASE_URL" -1 -v ON_ERROR_STOP=1 -f 0001_inbox.sql
--
-- or from Rust with `eventops_consumer_runtime::postgres::migrate`, or let the worker
-- apply it at startup (`WorkerBuilder::postgres_auto_migrate`, on by default).
--
-- Safe to apply again, and it adopts an `eventops_inbox` that an earlier runtime created
-- at startup (same columns). On a large existing inbox the index build blocks inserts
-- while it runs: apply it before the workers start.

-- Which of these files a database has had applied (each file records its own version).
CREATE TABLE IF NOT EXISTS eventops_migrations (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- One row per event id a consumer group has processed.
CREATE TABLE IF NOT EXISTS eventops_inbox (
    consumer_group text NOT NULL,
    event_id text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, event_id)
);

-- Retention deletes a group's oldest rows in small batches; this keeps each batch an
-- index range scan instead of a scan of the whole table.
CREATE INDEX IF NOT EXISTS eventops_inbox_processed_at
    ON eventops_inbox (consumer_group, processed_at);

INSERT INTO eventops_migrations (version, description)
    VALUES (1, 'inbox') ON CONFLICT (version) DO NOTHING;
