//! Where postbacks and pending deliveries live (`store`), and how much of the
//! refused bodies is kept (`quarantine`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::problems::Problems;
use super::values::{HumanDuration, SecretSource};

/// Smallest `store.pool_size`: the PostgreSQL store holds two connections
/// for its accept writers and needs room for delivery beside them (the store
/// asserts at compile time that its own need fits).
pub const MIN_POOL_SIZE: usize = 4;

/// Where postbacks and the delivery queue live: the embedded SQLite file (one
/// instance) or a PostgreSQL database shared by several instances.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Which backend keeps the queue ([Running several
    /// instances](scale-out.md)).
    #[serde(default)]
    pub backend: StoreBackend,
    /// SQLite: the database file; its directory is created when missing.
    /// Ignored with `postgres`.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// SQLite: how much an acknowledged postback survives. Ignored with
    /// `postgres` (every transaction that is acknowledged sets
    /// `synchronous_commit = on` for itself).
    #[serde(default)]
    pub sync: SyncMode,
    /// SQLite: how long a commit of the writer thread waits for a lock held by
    /// another process (a backup, an operator's sqlite3 shell) before it
    /// fails; moves from the intake journal are then tried again every
    /// 100 ms, postbacks are still acknowledged from the journal while the
    /// writer's queue has room, and `/readyz` is unready. Ignored with `postgres`.
    #[serde(default = "default_busy_timeout")]
    pub busy_timeout: HumanDuration,
    /// SQLite: `/readyz` reports unready while the store's filesystem has less
    /// free space than this, before commits start to fail (a nearly full disk
    /// can still take small commits, which would make readiness flap).
    #[serde(default = "default_min_free_bytes")]
    pub min_free_bytes: u64,
    /// PostgreSQL (required): the connection URL,
    /// `postgres://user@host:5432/dbname?options` (libpq URL or `key=value`
    /// form; several hosts with `target_session_attrs=read-write` follow a
    /// failover). Keep the password out of it. Set with `backend: sqlite`, it
    /// is an error (a forgotten `backend: postgres`).
    pub url: Option<String>,
    /// PostgreSQL: the password, read from a file or an environment variable
    /// (overrides one in the URL).
    pub password: Option<SecretSource>,
    /// PostgreSQL: connections per instance, at least 4 (two are held by the
    /// ingest writers); see [pool sizing](scale-out.md#pool-size).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// PostgreSQL: how long a claimed delivery belongs to the instance that
    /// claimed it; after that instance dies, another one takes the job when
    /// the lease ends. Must be longer than every target's `timeout`. Unset,
    /// it is `2 × timeout + 30s` per target. Ignored with `sqlite` (leases end
    /// at restart).
    pub lease: Option<HumanDuration>,
    /// PostgreSQL: bytes (bodies and envelopes) of postbacks waiting for a
    /// commit on one instance; beyond it a postback is answered 503 with
    /// `Retry-After` at once (a slow or locked database must not pile
    /// gigabytes up in memory). One postback is always let into an empty
    /// queue. Ignored with `sqlite`.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::default(),
            path: default_store_path(),
            sync: SyncMode::default(),
            busy_timeout: default_busy_timeout(),
            min_free_bytes: default_min_free_bytes(),
            url: None,
            password: None,
            pool_size: default_pool_size(),
            lease: None,
            max_queued_bytes: default_max_queued_bytes(),
        }
    }
}

/// Bounds of the quarantine (bodies the parser refused): without them every
/// distinct bad body is kept whole forever, and a sender of random bodies
/// fills the disk until real postbacks get 503.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct QuarantineConfig {
    /// Bytes of refused bodies kept whole (a running total of what the
    /// quarantine holds, both backends). Beyond it a new refused body keeps
    /// its row (hash, size, error, Content-Type, arrivals) and only its first
    /// 1 KiB, marked `truncated` (a replay refuses it). 64 MiB holds 64 bodies
    /// of the largest size (`ingest.max_body_bytes`) and thousands of
    /// real-sized ones, yet a sender of distinct random bodies can no longer
    /// fill the disk and turn real postbacks into 503s.
    #[serde(default = "default_quarantine_max_bytes")]
    pub max_bytes: u64,
    /// Refused bodies not seen again for this long (by last arrival) are
    /// deleted by the store's janitor (every minute, or every half retention
    /// when shorter). 30 days leaves an operator time to notice the
    /// `RelayInvalidPostbacks` alert, fix the parser and replay; Sinch stops
    /// retrying after ~25 minutes anyway.
    #[serde(default = "default_quarantine_retention")]
    pub retention: HumanDuration,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            max_bytes: default_quarantine_max_bytes(),
            retention: default_quarantine_retention(),
        }
    }
}

impl StoreConfig {
    /// What the store is, for logs and `check-config` (never a password).
    pub fn describe(&self) -> String {
        match self.backend {
            StoreBackend::Sqlite => {
                format!("sqlite {} with sync={}", self.path.display(), self.sync)
            }
            StoreBackend::Postgres => format!(
                "postgres {} with pool_size={}",
                describe_url(self.url.as_deref().unwrap_or_default()),
                self.pool_size
            ),
        }
    }
}

/// Where a PostgreSQL URL points, without its password (`host:port/dbname`):
/// what logs and `check-config` may show of `store.url`.
pub fn describe_url(url: &str) -> String {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "(invalid URL)".to_owned();
    };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            let port = config
                .get_ports()
                .get(i)
                .or(config.get_ports().first())
                .copied()
                .unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    format!(
        "{}/{}",
        hosts.join(","),
        config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("postgres")
    )
}

/// Which store backend keeps the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema, serde::Serialize))]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One SQLite file: one relay instance.
    #[default]
    Sqlite,
    /// One PostgreSQL database shared by any number of relay instances.
    Postgres,
}

impl fmt::Display for StoreBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreBackend::Sqlite => "sqlite",
            StoreBackend::Postgres => "postgres",
        })
    }
}

/// SQLite's `synchronous` setting, named for what it promises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema, serde::Serialize))]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// The intake journal is fdatasync'd before every 200: an acknowledged
    /// postback survives a power cut.
    #[default]
    Full,
    /// Written (not synced) before the 200: survives a process crash, but a
    /// power cut may lose the last acknowledged postbacks; faster.
    Normal,
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyncMode::Full => "full",
            SyncMode::Normal => "normal",
        })
    }
}

fn default_store_path() -> PathBuf {
    PathBuf::from("data/relay.db")
}
fn default_min_free_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_quarantine_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_quarantine_retention() -> HumanDuration {
    HumanDuration(Duration::from_secs(30 * 24 * 3600))
}
fn default_busy_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_pool_size() -> usize {
    10
}
fn default_max_queued_bytes() -> usize {
    64 * 1024 * 1024
}

impl StoreConfig {
    /// A PostgreSQL store needs a usable URL; a URL with the SQLite backend
    /// is most likely a forgotten `backend: postgres` (several instances, each
    /// with its own file, would not share anything). `longest_timeout` is the
    /// longest delivery timeout of any target, which a lease must outlast.
    pub(super) fn validate(&self, longest_timeout: Duration, problems: &mut Problems) {
        match self.backend {
            StoreBackend::Sqlite => {
                if self.url.is_some() {
                    problems.add(
                        "store.url",
                        "is set but `store.backend` is `sqlite`; add `backend: postgres` to use PostgreSQL",
                    );
                }
            }
            StoreBackend::Postgres => {
                match &self.url {
                    None => problems.add(
                        "store.url",
                        "`backend: postgres` needs a connection URL like \
                         `postgres://relay@db.internal:5432/relay`",
                    ),
                    // The parser's message, never the URL: it may hold a password.
                    Some(url) => match url.parse::<tokio_postgres::Config>() {
                        Err(err) => problems.add("store.url", format!("not a PostgreSQL URL: {err}")),
                        Ok(parsed)
                            if parsed.get_ssl_mode()
                                == tokio_postgres::config::SslMode::Require =>
                        {
                            problems.add(
                                "store.url",
                                "sslmode=require: TLS to PostgreSQL is not supported yet; keep the \
                                 database on a private network (sslmode=disable or prefer)",
                            )
                        }
                        Ok(_) => {}
                    },
                }
                if let Some(Err(message)) = self.password.as_ref().map(SecretSource::resolve) {
                    problems.add("store.password", message);
                }
                if self.pool_size < MIN_POOL_SIZE {
                    problems.add(
                        "store.pool_size",
                        format!(
                            "found `{}`, expected at least {MIN_POOL_SIZE}",
                            self.pool_size
                        ),
                    );
                }
                // A lease that ends while its attempt may still run would
                // hand the job to a second instance mid-delivery.
                if let Some(lease) = self.lease.filter(|lease| lease.0 <= longest_timeout) {
                    problems.add(
                        "store.lease",
                        format!(
                            "found `{}`, expected longer than the longest delivery timeout ({})",
                            humantime::format_duration(lease.0),
                            humantime::format_duration(longest_timeout)
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_described_without_their_password() {
        assert_eq!(
            describe_url("postgres://relay:s3cret@db.internal:6432/relay?sslmode=disable"),
            "db.internal:6432/relay"
        );
        assert_eq!(
            describe_url("postgres://postgres@127.0.0.1/postgres"),
            "127.0.0.1:5432/postgres"
        );
        assert_eq!(
            describe_url("host=a,b port=5432 dbname=relay user=x password=y"),
            "a:5432,b:5432/relay"
        );
        assert_eq!(describe_url("nonsense://"), "(invalid URL)");
    }
}
