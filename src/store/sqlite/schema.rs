//! The SQLite schema and its migrations, and opening a connection to it.

use std::path::Path;

use rusqlite::Connection;

use super::{db_error, SqliteOptions};
use crate::config::SyncMode;
use crate::store::StoreError;

/// The schema, versioned with `PRAGMA user_version`; each entry migrates from the
/// previous version.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    id           TEXT PRIMARY KEY,
    received_at  INTEGER NOT NULL,
    envelope     BLOB NOT NULL,
    raw_body     BLOB NOT NULL,
    content_type TEXT
);
CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY,
    event_id    TEXT NOT NULL,
    target      TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    next_at     INTEGER NOT NULL,
    lease_until INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error  TEXT
);
CREATE INDEX jobs_due ON jobs (target, next_at);
CREATE INDEX jobs_event ON jobs (event_id);
CREATE TABLE dead_letters (
    id          INTEGER PRIMARY KEY,
    event_id    TEXT NOT NULL,
    target      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    last_status INTEGER,
    last_error  TEXT,
    dead_at     INTEGER NOT NULL
);
CREATE INDEX dead_letters_event ON dead_letters (event_id);
CREATE TABLE dedupe (
    key         TEXT PRIMARY KEY,
    event_id    TEXT NOT NULL,
    accepted_at INTEGER NOT NULL
);
CREATE INDEX dedupe_age ON dedupe (accepted_at);
CREATE TABLE heartbeat (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL
);
CREATE TABLE quarantine (
    body_hash    TEXT PRIMARY KEY,
    body         BLOB NOT NULL,
    content_type TEXT,
    error        TEXT NOT NULL,
    first_seen   INTEGER NOT NULL,
    last_seen    INTEGER NOT NULL,
    seen_count   INTEGER NOT NULL
);
"#,
    // Dedupe keys arrive in random order: as a rowid table plus an index,
    // every accept dirtied a table page and a random index page (8 KiB of
    // WAL per postback, which the commit's fsync then waits for). Without
    // rowid the key's b-tree is the table: one page.
    r#"
CREATE TABLE dedupe_by_key (
    key         TEXT PRIMARY KEY,
    event_id    TEXT NOT NULL,
    accepted_at INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO dedupe_by_key (key, event_id, accepted_at) SELECT key, event_id, accepted_at FROM dedupe;
DROP TABLE dedupe;
ALTER TABLE dedupe_by_key RENAME TO dedupe;
CREATE INDEX dedupe_age ON dedupe (accepted_at);
"#,
    // Operations (admin API): when a job's last attempt failed, for the
    // queue's "last error"; pauses that hold across restarts.
    r#"
ALTER TABLE jobs ADD COLUMN last_attempt_at INTEGER;
CREATE TABLE target_pauses (
    target    TEXT PRIMARY KEY,
    paused_at INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    // The intake journal (store::sqlite::intake): every record up to `seq` is moved.
    r#"
CREATE TABLE intake_moved (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO intake_moved (id, seq) VALUES (1, 0);
"#,
    // The quarantine's budget and retention: the size as received (the body
    // may be only its prefix), a running total of what it holds kept by
    // triggers (so the budget check never scans the table), and an index
    // for the retention janitor.
    r#"
ALTER TABLE quarantine ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
ALTER TABLE quarantine ADD COLUMN truncated INTEGER NOT NULL DEFAULT 0;
UPDATE quarantine SET size = length(body);
CREATE INDEX quarantine_age ON quarantine (last_seen);
CREATE TABLE quarantine_usage (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    bodies INTEGER NOT NULL,
    bytes  INTEGER NOT NULL
);
INSERT INTO quarantine_usage (id, bodies, bytes)
    SELECT 1, COUNT(*), COALESCE(SUM(length(body)), 0) FROM quarantine;
CREATE TRIGGER quarantine_added AFTER INSERT ON quarantine BEGIN
    UPDATE quarantine_usage SET bodies = bodies + 1, bytes = bytes + length(NEW.body) WHERE id = 1;
END;
CREATE TRIGGER quarantine_removed AFTER DELETE ON quarantine BEGIN
    UPDATE quarantine_usage SET bodies = bodies - 1, bytes = bytes - length(OLD.body) WHERE id = 1;
END;
CREATE TRIGGER quarantine_body_changed AFTER UPDATE OF body ON quarantine BEGIN
    UPDATE quarantine_usage SET bytes = bytes + length(NEW.body) - length(OLD.body) WHERE id = 1;
END;
"#,
];

/// Creates the directories the database lives in. With `sync: full` the
/// new ones are made durable (an fsync of each one's parent): SQLite fsyncs
/// only the database's own directory, so a power cut could otherwise take a
/// new data directory with every acknowledged postback in it.
pub(super) fn create_parent_dirs(database: &Path, sync: SyncMode) -> Result<(), StoreError> {
    let Some(dir) = database.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    std::fs::create_dir_all(dir).map_err(|err| {
        StoreError::database_from(format!("cannot create {}: {err}", dir.display()), err)
    })?;
    if sync == SyncMode::Full {
        for created in missing {
            let parent = match created.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            super::intake::sync_dir(parent)?;
        }
    }
    Ok(())
}

pub(super) fn open_connection(
    path: &Path,
    options: &SqliteOptions,
) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|err| {
        StoreError::database_from(format!("cannot open {}: {err}", path.display()), err)
    })?;
    conn.busy_timeout(options.busy_timeout).map_err(db_error)?;
    let synchronous = match options.sync {
        SyncMode::Full => "FULL",
        SyncMode::Normal => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};"
    ))
    .map_err(db_error)?;
    Ok(conn)
}

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(db_error)?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn.transaction().map_err(db_error)?;
        tx.execute_batch(sql).map_err(db_error)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", index + 1))
            .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
    }
    Ok(())
}
