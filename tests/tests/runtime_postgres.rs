//! The consumer runtime's PostgreSQL inbox against the real broker and PostgreSQL: the
//! shipped migration, retention, a plain handler's claim, and TLS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventops_consumer_runtime::contract::Idempotency;
use eventops_consumer_runtime::idempotency::PostgresInbox;
use eventops_consumer_runtime::postgres::{self, PostgresOptions, retention};
use eventops_consumer_runtime::tokio_postgres::Transaction;
use eventops_consumer_runtime::{
    Context, Event, Handler, HandlerError, TransactionalHandler, Worker, WorkerError,
};
use eventops_tests::pg::{TlsPostgres, connect, fresh_database, migration_file, psql_file};
use eventops_tests::runtime::*;
use eventops_tests::{TestEnv, env, eventually, unique};
use tokio::sync::oneshot;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A running in-process worker and the way to stop it.
struct Running {
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<Result<(), WorkerError>>,
    metrics: Arc<eventops_consumer_runtime::metrics::Metrics>,
}

impl Running {
    fn start(worker: Worker) -> Self {
        let (stop, rx) = oneshot::channel();
        let metrics = worker.metrics();
        let done = tokio::spawn(worker.run_until(async move {
            let _ = rx.await;
        }));
        Self {
            stop,
            done,
            metrics,
        }
    }

    /// The sum of the metric `name` over its labels.
    fn count(&self, name: &str) -> u64 {
        self.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Waits until `n` records were handled or skipped as duplicates.
    async fn wait_done(&self, n: u64) {
        eventually(
            TIMEOUT,
            &format!("{n} records handled or skipped"),
            || async {
                (self.count("eventops_worker_records_processed_total")
                    + self.count("eventops_worker_records_duplicate_total")
                    >= n)
                    .then_some(())
            },
        )
        .await;
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(TIMEOUT, self.done)
            .await
            .expect("the worker stops within a minute")
            .unwrap()
            .expect("the worker stops cleanly");
    }
}

async fn topic(env: &TestEnv, partitions: i32) -> (String, String) {
    let topic = unique("rtpg");
    create_topics(
        &env.info,
        &[(&topic, partitions), (&format!("{topic}.DLT"), partitions)],
    )
    .await;
    (topic, unique("rtpg-group"))
}

/// Records one row per handled event in `inbox_effects` (same transaction as the inbox).
struct Effects;

impl TransactionalHandler for Effects {
    async fn handle(
        &self,
        event: &Event<'_>,
        tx: &Transaction<'_>,
        _ctx: &Context<'_>,
    ) -> Result<(), HandlerError> {
        tx.execute("INSERT INTO inbox_effects VALUES ($1)", &[&event.id()])
            .await
            .map_err(HandlerError::transient)?;
        Ok(())
    }
}

async fn table_exists(db: &tokio_postgres::Client, table: &str) -> bool {
    db.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn without_auto_migrate_a_worker_refuses_a_database_without_the_inbox_until_the_shipped_migration_is_applied()
 {
    let env = env().await;
    let url = fresh_database(&env.info).await;
    let db = connect(&url).await;
    db.batch_execute("CREATE TABLE inbox_effects (event_id text NOT NULL)")
        .await
        .unwrap();
    let (topic, group) = topic(&env, 1).await;
    let builder = || {
        Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
            .health_server(false)
            .postgres_url(url.clone())
            .postgres_auto_migrate(false)
    };

    let refused = tokio::time::timeout(TIMEOUT, builder().build_transactional(Effects))
        .await
        .expect("build answers within a minute");
    let message = match refused {
        Err(WorkerError::Inbox(e)) => e.to_string(),
        Err(other) => panic!("expected an inbox error, got: {other}"),
        Ok(_) => panic!("a worker started without the inbox table"),
    };
    for needle in [
        "none of the EventOps tables",
        "the inbox needs schema version 1",
        "postgres_auto_migrate",
        "0001_inbox.sql",
        "psql",
    ] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from: {message}"
        );
    }
    assert!(
        !message.contains("0002_outbox.sql"),
        "the inbox does not need the outbox: {message}"
    );
    assert!(
        !table_exists(&db, "eventops_inbox").await,
        "the check changes nothing"
    );

    // The documented way: psql, one transaction, stop at the first error.
    psql_file(&url, &migration_file("0001_inbox.sql"));
    let version: i32 = db
        .query_one("SELECT max(version) FROM eventops_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 1);

    // Only the inbox's migration: a worker that does not relay an outbox starts.
    let worker = tokio::time::timeout(TIMEOUT, builder().build_transactional(Effects))
        .await
        .unwrap()
        .expect("the worker starts once the inbox migration is applied");
    let running = Running::start(worker);
    let p = producer(&env.info);
    for i in 0..3 {
        let id = format!("m-{i}");
        produce(&p, &topic, 0, &id, &event(&id, 1, serde_json::json!({}))).await;
    }
    running.wait_done(3).await;
    running.stop().await;
    let inbox: i64 = db
        .query_one(
            "SELECT count(*) FROM eventops_inbox WHERE consumer_group = $1",
            &[&group],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(inbox, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_auto_migrations_apply_the_shipped_migration_once_and_adopt_an_old_table() {
    let env = env().await;
    let url = fresh_database(&env.info).await;
    let db = connect(&url).await;
    // What runtimes before the shipped migration created at startup, with a row in it.
    db.batch_execute(
        "CREATE TABLE eventops_inbox (consumer_group text NOT NULL, event_id text NOT NULL, \
         processed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (consumer_group, event_id)); \
         INSERT INTO eventops_inbox (consumer_group, event_id) VALUES ('g', 'old-1')",
    )
    .await
    .unwrap();

    let runs = (0..4).map(|_| postgres::migrate_url(&url));
    let results = tokio::time::timeout(TIMEOUT, futures::future::join_all(runs))
        .await
        .expect("migrations finish within a minute");
    let applied: Vec<Vec<i32>> = results.into_iter().map(|r| r.expect("migrate")).collect();
    assert_eq!(
        applied.iter().filter(|a| !a.is_empty()).count(),
        1,
        "one of four concurrent starts applies it: {applied:?}"
    );
    assert_eq!(
        applied.concat(),
        vec![1, 2],
        "the inbox and outbox migrations"
    );

    let rows: i64 = db
        .query_one("SELECT count(*) FROM eventops_inbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the old table and its rows are kept");
    let index: bool = db
        .query_one(
            "SELECT to_regclass('eventops_inbox_processed_at') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(index, "the retention index was added");
    let recorded: Vec<i32> = db
        .query("SELECT version FROM eventops_migrations ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(recorded, vec![1, 2]);
    assert!(
        postgres::check(&db).await.is_ok(),
        "a migrated database passes the check"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_prunes_old_ids_in_batches_and_keeps_recent_ones() {
    let env = env().await;
    let url = fresh_database(&env.info).await;
    postgres::migrate_url(&url).await.unwrap();
    let db = connect(&url).await;
    db.batch_execute(
        "INSERT INTO eventops_inbox (consumer_group, event_id, processed_at) \
           SELECT 'g', 'old-' || i, now() - interval '2 days' FROM generate_series(1, 2500) i; \
         INSERT INTO eventops_inbox (consumer_group, event_id) \
           SELECT 'g', 'new-' || i FROM generate_series(1, 10) i; \
         INSERT INTO eventops_inbox (consumer_group, event_id, processed_at) \
           SELECT 'other', 'old-' || i, now() - interval '2 days' FROM generate_series(1, 5) i",
    )
    .await
    .unwrap();

    let day = Duration::from_secs(24 * 3600);
    let mut batches = Vec::new();
    loop {
        let n = tokio::time::timeout(TIMEOUT, retention::prune_batch(&db, "g", day, 1000))
            .await
            .unwrap()
            .unwrap();
        batches.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(batches, vec![1000, 1000, 500, 0]);
    let left: Vec<(String, i64)> = db
        .query(
            "SELECT consumer_group, count(*) FROM eventops_inbox GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        left,
        vec![("g".to_string(), 10), ("other".to_string(), 5)],
        "recent ids and other groups' ids are kept"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_worker_prunes_its_old_inbox_ids_and_still_skips_a_recent_duplicate() {
    let env = env().await;
    let url = fresh_database(&env.info).await;
    postgres::migrate_url(&url).await.unwrap();
    let db = connect(&url).await;
    db.batch_execute("CREATE TABLE inbox_effects (event_id text NOT NULL)")
        .await
        .unwrap();
    let (topic, group) = topic(&env, 1).await;
    db.execute(
        "INSERT INTO eventops_inbox (consumer_group, event_id, processed_at) \
         SELECT $1, 'old-' || i, now() - interval '2 hours' FROM generate_series(1, 350) i",
        &[&group],
    )
    .await
    .unwrap();

    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .postgres_url(url.clone())
        .postgres_inbox_retention(Some(Duration::from_secs(3600)))
        .postgres_inbox_retention_batch(100)
        .postgres_inbox_retention_interval(Duration::from_millis(300))
        .build_transactional(Effects)
        .await
        .unwrap();
    let running = Running::start(worker);
    let p = producer(&env.info);
    produce(
        &p,
        &topic,
        0,
        "a",
        &event("recent-1", 1, serde_json::json!({})),
    )
    .await;
    running.wait_done(1).await;

    let count = |prefix: &'static str| {
        let db = &db;
        let group = group.clone();
        async move {
            db.query_one(
                "SELECT count(*) FROM eventops_inbox WHERE consumer_group = $1 AND event_id LIKE $2",
                &[&group, &format!("{prefix}%")],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    eventually(TIMEOUT, "the old ids pruned", || async {
        (count("old-").await == 0).then_some(())
    })
    .await;
    assert_eq!(count("recent-").await, 1, "the recent id is kept");

    // The same event again, within the window: recognised, not handled again.
    produce(
        &p,
        &topic,
        0,
        "a",
        &event("recent-1", 1, serde_json::json!({})),
    )
    .await;
    running.wait_done(2).await;
    assert_eq!(running.count("eventops_worker_records_duplicate_total"), 1);
    running.stop().await;
    let effects: i64 = db
        .query_one(
            "SELECT count(*) FROM inbox_effects WHERE event_id = 'recent-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(effects, 1);
}

/// A plain handler that takes a while and counts its runs per event id.
#[derive(Clone, Default)]
struct Slow {
    runs: Arc<Mutex<HashMap<String, u32>>>,
}

impl Handler for Slow {
    async fn handle(&self, event: &Event<'_>, _ctx: &Context<'_>) -> Result<(), HandlerError> {
        *self
            .runs
            .lock()
            .unwrap()
            .entry(event.id().to_string())
            .or_default() += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_handler_with_the_postgres_inbox_runs_once_per_id_when_deliveries_overlap() {
    let env = env().await;
    let (topic, group) = topic(&env, 2).await;
    // Each id on both partitions: the two partition tasks handle them at the same time.
    let p = producer(&env.info);
    let ids: Vec<String> = (0..6).map(|i| format!("{group}-{i}")).collect();
    for partition in 0..2 {
        for id in &ids {
            produce(
                &p,
                &topic,
                partition,
                id,
                &event(id, 1, serde_json::json!({})),
            )
            .await;
        }
    }
    let handler = Slow::default();
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .idempotency(Idempotency::Postgres)
        .build(handler.clone())
        .await
        .unwrap();
    let running = Running::start(worker);
    running.wait_done(12).await;
    running.stop().await;
    let runs = handler.runs.lock().unwrap().clone();
    assert_eq!(runs.len(), ids.len(), "{runs:?}");
    assert!(
        runs.values().all(|&n| n == 1),
        "each id's handler ran once, though two deliveries overlapped: {runs:?}"
    );
}

/// Connects the way a worker does and asks the server whether the session is encrypted.
async fn tls_session(url: &str) -> Result<bool, String> {
    let options = PostgresOptions {
        retention: None,
        ..PostgresOptions::default()
    };
    let inbox = tokio::time::timeout(
        TIMEOUT,
        PostgresInbox::connect_with(url, 1, "tls-test", &options),
    )
    .await
    .expect("connecting answers within a minute")
    .map_err(|e| e.to_string())?;
    let client = inbox.pool().get().await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_require_and_verify_full_connect_and_a_wrong_ca_or_host_name_is_refused() {
    let env = env().await;
    let server = tokio::task::spawn_blocking(TlsPostgres::start)
        .await
        .unwrap();
    let ca = server.ca.display().to_string();
    let other = server.other_ca.display().to_string();
    let host = TlsPostgres::HOST;

    assert_eq!(
        tls_session(&server.url("127.0.0.1", "sslmode=require")).await,
        Ok(true),
        "require: encrypted, certificate not checked"
    );
    assert_eq!(
        tls_session(&server.url(host, &format!("sslmode=verify-full sslrootcert={ca}"))).await,
        Ok(true),
        "verify-full with the right CA and name"
    );
    assert_eq!(
        tls_session(&server.url("127.0.0.1", &format!("sslmode=verify-ca sslrootcert={ca}"))).await,
        Ok(true),
        "verify-ca does not check the name"
    );

    let wrong_ca =
        tls_session(&server.url(host, &format!("sslmode=verify-full sslrootcert={other}")))
            .await
            .expect_err("verify-full with another CA is refused");
    assert!(
        wrong_ca.contains("invalid peer certificate") && wrong_ca.contains("UnknownIssuer"),
        "{wrong_ca}"
    );
    let wrong_name = tls_session(&server.url(
        "127.0.0.1",
        &format!("sslmode=verify-full sslrootcert={ca}"),
    ))
    .await
    .expect_err("verify-full with a name not in the certificate is refused");
    assert!(
        wrong_name.contains("invalid peer certificate")
            && wrong_name.contains("not valid for name \"127.0.0.1\""),
        "{wrong_name}"
    );

    // The environment's own PostgreSQL has no TLS: require must not fall back.
    let plain = format!("{}?sslmode=require", env.info.postgres_url);
    let refused = tls_session(&plain)
        .await
        .expect_err("require against a server without TLS is refused");
    assert!(refused.contains("TLS"), "{refused}");

    // A whole worker over verify-full: the inbox rows arrive through TLS.
    let url = format!(
        "postgres://postgres@{host}:{}/postgres?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={ca}",
        server.port
    );
    let (topic, group) = topic(&env, 1).await;
    let worker = Worker::builder(worker_config(&env.info, &group, &[route(&topic)]))
        .health_server(false)
        .postgres_url(url)
        .idempotency(Idempotency::Postgres)
        .build(Slow::default())
        .await
        .expect("a worker connects with verify-full");
    let running = Running::start(worker);
    produce(
        &producer(&env.info),
        &topic,
        0,
        "k",
        &event("tls-1", 1, serde_json::json!({})),
    )
    .await;
    running.wait_done(1).await;
    running.stop().await;
    let db = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        server.port
    ))
    .await;
    let rows: i64 = db
        .query_one(
            "SELECT count(*) FROM eventops_inbox WHERE consumer_group = $1",
            &[&group],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}
