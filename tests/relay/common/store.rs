//! The backend the tests run on and where a test relay keeps its state:
//! a temporary directory and, with PostgreSQL, a database of its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{pg, query_db, single_int};

/// The store backend the tests run against: SQLite, unless
/// `RELAY_TEST_BACKEND=postgres` says otherwise (`.ci/run` runs the
/// store-backed modules both ways).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded SQLite store in a temporary directory.
    Sqlite,
    /// A fresh database on the tests' PostgreSQL server.
    Postgres,
}

/// The backend of this run.
pub fn backend() -> Backend {
    match std::env::var("RELAY_TEST_BACKEND").as_deref() {
        Ok("postgres") => Backend::Postgres,
        _ => Backend::Sqlite,
    }
}

/// For tests that exercise something only one backend has (an SQLite file
/// lock, a full disk under the SQLite file): true, with a note, when this
/// binary runs on another backend and the test should return at once.
pub fn skip_unless(wanted: Backend, why: &str) -> bool {
    let skip = backend() != wanted;
    if skip {
        eprintln!("skipped on {:?}: {why}", backend());
    }
    skip
}

/// Where a test relay keeps its state: a temporary directory (its config, and
/// with SQLite its database) and, with PostgreSQL, a database of its own,
/// dropped with this guard.
pub struct TestStore {
    /// Holds the config file (and the SQLite database).
    pub dir: tempfile::TempDir,
    /// The PostgreSQL database, when the backend is PostgreSQL.
    pub db: Option<pg::TestDatabase>,
    /// More `store:` keys (indented lines), e.g. `"  lease: 4s\n"`.
    pub store_extra: String,
}

impl TestStore {
    /// A store for this binary's backend.
    pub fn new() -> TestStore {
        TestStore::on(backend())
    }

    /// A store on `backend`.
    pub fn on(backend: Backend) -> TestStore {
        TestStore {
            dir: tempfile::tempdir().expect("temp dir"),
            db: (backend == Backend::Postgres).then(pg::TestDatabase::create),
            store_extra: String::new(),
        }
    }

    /// Adds `store:` keys (indented lines) to the configs it writes. A
    /// `lease` is used by PostgreSQL only: with SQLite, leases end at restart.
    pub fn with_store(mut self, extra: &str) -> TestStore {
        self.store_extra.push_str(extra);
        self
    }

    /// The temporary directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The `store:` section of the config.
    pub fn yaml(&self) -> String {
        match &self.db {
            None => format!(
                "store:\n  path: {}\n  busy_timeout: 200ms\n  min_free_bytes: 131072\n{}",
                self.dir.path().join("relay.db").display(),
                self.store_extra
            ),
            Some(db) => format!(
                "store:\n  backend: postgres\n  url: \"{}\"\n{}",
                db.url, self.store_extra
            ),
        }
    }

    /// Config text with ephemeral ports and this store; `rest` adds targets,
    /// routes and any other section.
    pub fn config_yaml(&self, rest: &str) -> String {
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{}{rest}\n",
            self.yaml()
        )
    }

    /// Writes [`TestStore::config_yaml`] to `relay.yaml` in the directory.
    pub fn write_config(&self, rest: &str) -> PathBuf {
        let path = self.dir.path().join("relay.yaml");
        std::fs::write(&path, self.config_yaml(rest)).expect("write config");
        path
    }

    /// Rows of a query against the store (read-only with SQLite; safe while
    /// relays run). Table and column names are the same on both backends.
    pub fn query(&self, sql: &str) -> Vec<Vec<rusqlite::types::Value>> {
        match &self.db {
            None => query_db(&self.dir.path().join("relay.db"), sql),
            Some(db) => db.query(sql),
        }
    }

    /// The one integer a query returns (`SELECT COUNT(*) ...`); NULL is 0.
    pub fn query_int(&self, sql: &str) -> i64 {
        single_int(sql, self.query(sql))
    }

    /// Runs a statement with `?1`-style parameters beside the relay.
    pub fn execute(&self, sql: &str, params: Vec<rusqlite::types::Value>) -> u64 {
        match &self.db {
            None => {
                let conn =
                    rusqlite::Connection::open(self.dir.path().join("relay.db")).expect("open db");
                conn.busy_timeout(Duration::from_secs(5)).unwrap();
                conn.execute(sql, rusqlite::params_from_iter(params))
                    .unwrap_or_else(|err| panic!("{sql}: {err}")) as u64
            }
            Some(db) => db.execute(sql, params),
        }
    }
}

impl Default for TestStore {
    fn default() -> Self {
        TestStore::new()
    }
}
