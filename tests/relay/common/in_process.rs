//! A relay started in this process on ephemeral loopback ports, on this
//! binary's backend, and restarted on the same store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use postback_relay::config::Config;
use postback_relay::relay::{self, RelayHandle};

use super::{eventually, get, metric_value, TestStore};

/// A relay running in this process.
pub struct TestRelay {
    /// Its config file and store; removed when the test ends.
    pub store: TestStore,
    /// The running relay (taken by `shutdown`).
    pub handle: Option<RelayHandle>,
    /// Full URL of the postback endpoint.
    pub url: String,
    /// Base URL of the admin listener.
    pub admin: String,
}

/// Config text with ephemeral ports and an SQLite store in `dir`; `rest` adds
/// targets, routes and any other section.
pub fn config_yaml(dir: &Path, rest: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nstore:\n  path: {}\n  busy_timeout: 200ms\n  min_free_bytes: 131072\n{rest}\n",
        dir.join("relay.db").display()
    )
}

/// Starts a relay whose config is the ephemeral basics plus `rest`, on this
/// binary's backend.
pub async fn start_relay(rest: &str) -> TestRelay {
    start_relay_in(TestStore::new(), rest).await
}

/// Starts a relay on an existing store (for restarts).
pub async fn start_relay_in(store: TestStore, rest: &str) -> TestRelay {
    let path = store.write_config(rest);
    let config = Config::load(&path).unwrap_or_else(|err| panic!("test config invalid: {err}"));
    let handle = relay::start(config).await.expect("relay starts");
    TestRelay {
        url: format!("http://{}/sinch/postback", handle.ingest_addr),
        admin: format!("http://{}", handle.admin_addr),
        store,
        handle: Some(handle),
    }
}

impl TestRelay {
    /// Path of the relay's SQLite database, for looking at what it kept.
    pub fn db_path(&self) -> PathBuf {
        self.store.path().join("relay.db")
    }

    /// Gracefully stops the relay and returns its store for a restart.
    pub async fn shutdown(mut self) -> TestStore {
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(30), handle.shutdown())
                .await
                .expect("shutdown within 30 s")
                .expect("clean shutdown");
        }
        self.store
    }

    /// The value of one metric sample, e.g. `relay_dead_letters{target="a"}`.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let (status, body) = get(&format!("{}/metrics", self.admin)).await;
        assert_eq!(status, 200);
        metric_value(&body, sample)
    }

    /// Rows of a query against the relay's store (read-only with SQLite).
    pub fn query(&self, sql: &str) -> Vec<Vec<rusqlite::types::Value>> {
        self.store.query(sql)
    }

    /// Waits (up to `timeout`) until a one-integer query (`COUNT(*)` and the
    /// like) returns `expected`: what the relay keeps is moved into the
    /// store from the intake journal a few milliseconds after the 200.
    pub async fn eventually_int(&self, timeout: Duration, sql: &str, expected: i64) {
        eventually(timeout, &format!("{sql} = {expected}"), || {
            let got = self.store.query_int(sql);
            async move { (got == expected).then_some(()) }
        })
        .await
    }

    /// Runs a statement with `?1`-style parameters against the relay's store.
    pub fn execute(&self, sql: &str, params: Vec<rusqlite::types::Value>) -> u64 {
        self.store.execute(sql, params)
    }
}
