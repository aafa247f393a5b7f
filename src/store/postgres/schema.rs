//! The PostgreSQL schema and its migrations, run under an advisory lock.

use std::time::Duration;

use super::errors::{describe, pool_error};
use super::{Shared, MIGRATION_LOCK};
use crate::clock::now_ms;
use crate::store::StoreError;

/// The schema, one entry per version; each migrates from the previous one.
/// Table and column names are those of the SQLite store.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    id           TEXT PRIMARY KEY,
    received_at  BIGINT NOT NULL,
    envelope     BYTEA NOT NULL,
    raw_body     BYTEA NOT NULL,
    content_type TEXT
);
CREATE TABLE jobs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    TEXT NOT NULL,
    target      TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    next_at     BIGINT NOT NULL,
    lease_until BIGINT NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error  TEXT
);
CREATE INDEX jobs_due ON jobs (target, next_at, id);
CREATE INDEX jobs_event ON jobs (event_id);
CREATE TABLE dead_letters (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    TEXT NOT NULL,
    target      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    last_status INTEGER,
    last_error  TEXT,
    dead_at     BIGINT NOT NULL
);
CREATE INDEX dead_letters_event ON dead_letters (event_id);
CREATE TABLE dedupe (
    key         TEXT PRIMARY KEY,
    event_id    TEXT NOT NULL,
    accepted_at BIGINT NOT NULL
);
CREATE INDEX dedupe_age ON dedupe (accepted_at);
CREATE TABLE heartbeat (
    id TEXT PRIMARY KEY,
    at BIGINT NOT NULL
);
CREATE TABLE quarantine (
    body_hash    TEXT PRIMARY KEY,
    body         BYTEA NOT NULL,
    content_type TEXT,
    error        TEXT NOT NULL,
    first_seen   BIGINT NOT NULL,
    last_seen    BIGINT NOT NULL,
    seen_count   BIGINT NOT NULL
);
"#,
    // Operations (admin API): when a job's last attempt failed, for the
    // queue's "last error"; pauses that hold across restarts and instances.
    r#"
ALTER TABLE jobs ADD COLUMN last_attempt_at BIGINT;
CREATE TABLE target_pauses (
    target    TEXT PRIMARY KEY,
    paused_at BIGINT NOT NULL
);
"#,
    // The quarantine's budget and retention: the size as received (the body
    // may be only its prefix), a running total of what it holds kept by a
    // trigger (so the budget check never scans the table), and an index for
    // the retention janitor.
    r#"
ALTER TABLE quarantine ADD COLUMN size BIGINT NOT NULL DEFAULT 0;
ALTER TABLE quarantine ADD COLUMN truncated BOOLEAN NOT NULL DEFAULT false;
UPDATE quarantine SET size = length(body);
CREATE INDEX quarantine_age ON quarantine (last_seen);
CREATE TABLE quarantine_usage (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    bodies BIGINT NOT NULL,
    bytes  BIGINT NOT NULL
);
INSERT INTO quarantine_usage (id, bodies, bytes)
    SELECT 1, COUNT(*), COALESCE(SUM(length(body)), 0) FROM quarantine;
CREATE FUNCTION quarantine_usage_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE quarantine_usage SET bodies = bodies + 1, bytes = bytes + length(NEW.body) WHERE id = 1;
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE quarantine_usage SET bodies = bodies - 1, bytes = bytes - length(OLD.body) WHERE id = 1;
    ELSE
        UPDATE quarantine_usage SET bytes = bytes + length(NEW.body) - length(OLD.body) WHERE id = 1;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER quarantine_usage_track AFTER INSERT OR DELETE OR UPDATE OF body ON quarantine
    FOR EACH ROW EXECUTE FUNCTION quarantine_usage_track();
"#,
];

impl Shared {
    /// Creates or migrates the schema. Instances starting at once take turns
    /// on an advisory lock held until each one's transaction ends.
    pub(super) async fn migrate(&self) -> Result<usize, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let work = async {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version    INTEGER PRIMARY KEY,
                     applied_at BIGINT NOT NULL
                 )",
            )
            .await?;
            let current: i32 = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    &[],
                )
                .await?
                .get(0);
            let current = current.max(0) as usize;
            if current > MIGRATIONS.len() {
                return Ok(Err(StoreError::database(format!(
                    "the database schema is at version {current}, newer than this relay knows \
                     ({}): run a newer relay",
                    MIGRATIONS.len()
                ))));
            }
            for (index, sql) in MIGRATIONS.iter().enumerate().skip(current) {
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    &[&(index as i32 + 1), &now_ms()],
                )
                .await?;
                tracing::info!(version = index + 1, "PostgreSQL schema migrated");
            }
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(Ok(MIGRATIONS.len()))
        };
        match tokio::time::timeout(Duration::from_secs(60), work).await {
            Ok(Ok(result)) => result,
            Ok(Err(err)) => Err(StoreError::database_from(
                format!("migrating the schema: {}", describe(&err)),
                err,
            )),
            Err(_) => Err(StoreError::database(
                "migrating the schema took over 60 s (another instance holding the migration lock?)"
                    ,
            )),
        }
    }
}
