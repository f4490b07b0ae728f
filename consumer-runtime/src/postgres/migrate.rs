//! The inbox schema as versioned SQL files (`consumer-runtime/migrations/NNNN_*.sql`),
//! compiled into the library, and the two ways a worker treats them at startup:
//! [`migrate`] applies the missing ones, [`check`] only verifies that they were applied.
//!
//! Each file records its own version in `eventops_migrations`, so applying it with
//! `psql -1 -f` and applying it with [`migrate`] leave the same database behind.

use tokio_postgres::{Client, GenericClient};

use crate::idempotency::InboxError;

/// One shipped schema change.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Its version: the file name's number; applied in ascending order.
    pub version: i32,
    /// The file's name in `consumer-runtime/migrations/`.
    pub file: &'static str,
    /// The file's SQL.
    pub sql: &'static str,
}

/// Every shipped migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        file: "0001_inbox.sql",
        sql: include_str!("../../migrations/0001_inbox.sql"),
    },
    Migration {
        version: 2,
        file: "0002_outbox.sql",
        sql: include_str!("../../migrations/0002_outbox.sql"),
    },
];

/// The schema version this runtime needs: the newest shipped migration's.
pub fn required_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Serialises concurrent migrations (every pod of a group starting at once):
/// `pg_advisory_xact_lock` on this key ("eventops" in ASCII).
const LOCK_KEY: i64 = 0x6576_656e_746f_7073;

/// The highest migration version recorded in the database (0 when none is).
pub async fn current_version(client: &impl GenericClient) -> Result<i32, InboxError> {
    let row = client
        .query_one("SELECT to_regclass('eventops_migrations') IS NOT NULL", &[])
        .await
        .map_err(|e| InboxError(format!("reading the inbox schema version: {e}")))?;
    if !row.get::<_, bool>(0) {
        return Ok(0);
    }
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM eventops_migrations",
            &[],
        )
        .await
        .map_err(|e| InboxError(format!("reading the inbox schema version: {e}")))?;
    Ok(row.get(0))
}

/// Applies the shipped migrations the database lacks, in one transaction under an
/// advisory lock (concurrent callers wait for each other, then find nothing to do).
/// Returns the versions it applied. Needs a role that may create tables.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, InboxError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| InboxError(format!("migrating the inbox schema: {e}")))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(|e| InboxError(format!("migrating the inbox schema: {e}")))?;
    let current = current_version(&tx).await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        tx.batch_execute(m.sql)
            .await
            .map_err(|e| InboxError(format!("applying migration {}: {e}", m.file)))?;
        applied.push(m.version);
    }
    tx.commit()
        .await
        .map_err(|e| InboxError(format!("migrating the inbox schema: {e}")))?;
    if !applied.is_empty() {
        tracing::info!(versions = ?applied, "applied inbox schema migrations");
    }
    Ok(applied)
}

/// The schema version the inbox needs (`0001_inbox.sql`).
pub const INBOX_VERSION: i32 = 1;

/// Verifies that every shipped migration was applied, without changing anything; the
/// error names the files to apply and the setting that would apply them at startup.
pub async fn check(client: &Client) -> Result<(), InboxError> {
    check_for(client, required_version(), "this runtime").await
}

/// Verifies that the migrations up to version `needed` were applied, for `component`
/// (say "the inbox"), without changing anything. A worker that only uses the inbox keeps
/// starting on a database without the outbox migration.
pub async fn check_for(client: &Client, needed: i32, component: &str) -> Result<(), InboxError> {
    let current = current_version(client).await?;
    if current >= needed {
        return Ok(());
    }
    let missing: Vec<&str> = MIGRATIONS
        .iter()
        .filter(|m| m.version > current && m.version <= needed)
        .map(|m| m.file)
        .collect();
    let found = if current == 0 {
        "the database has none of the EventOps tables".to_string()
    } else {
        format!("the EventOps schema of this database is at version {current}")
    };
    Err(InboxError(format!(
        "{found}; {component} needs schema version {needed} and auto-migration is off \
         (WorkerBuilder::postgres_auto_migrate(false) or RelayOptions::auto_migrate), so it \
         does not change the schema. Apply the shipped migration(s) {} from \
         consumer-runtime/migrations/ (psql \"$DATABASE_URL\" -1 -v ON_ERROR_STOP=1 -f \
         <file>, or eventops_consumer_runtime::postgres::migrate), or turn auto-migration on \
         to apply them at startup",
        missing.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_ordered_and_each_records_its_own_version() {
        let mut last = 0;
        for m in MIGRATIONS {
            assert!(m.version > last, "{} is out of order", m.file);
            last = m.version;
            assert!(
                m.file.starts_with(&format!("{:04}_", m.version)),
                "{} does not start with its version",
                m.file
            );
            assert!(
                m.sql.contains(&format!(
                    "INSERT INTO eventops_migrations (version, description)\n    VALUES ({},",
                    m.version
                )),
                "{} does not record its version, so psql -f and migrate() would differ",
                m.file
            );
            assert!(
                !m.sql.to_uppercase().contains("COMMIT"),
                "{}: migrate() runs it in its own transaction",
                m.file
            );
        }
        assert_eq!(required_version(), last);
    }
}
