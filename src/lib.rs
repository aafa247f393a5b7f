//! postback-relay: receives Sinch MMS/SMS postbacks, commits them durably, and
//! delivers them to internal webhooks.
//!
//! The data flow, one module per step:
//!
//! ```text
//! ingest ──▶ postback ──▶ envelope ──▶ routing ──▶ store ──▶ delivery ──▶ targets
//! (HTTP)     (XML/JSON)   (CloudEvents) (YAML rules) (SQLite or (retries,   (HTTP, file)
//!                                                   PostgreSQL) dead letters)
//! ```
//!
//! Ingest gives postbacks to the store only (through `store::Committer`); the
//! store hands the jobs it committed to delivery through `store::FreshJobs`,
//! which delivery implements. `config` loads and validates everything before
//! anything starts, `relay` wires the pieces together (and gives both sides
//! the ingest `load`) and owns shutdown, `admin` serves health and `metrics`.
//! In front of ingest: `http_server` (connections, timeouts), `proxy_protocol`,
//! `tls`, and `access` (allowlist, trusted proxies, credentials).
//! docs/architecture.md has the layers; `.ci/check-layers.py` enforces them.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod envelope;
pub mod http_server;
pub mod ingest;
pub mod live;
pub mod load;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod postback;
pub mod proxy_protocol;
pub mod quarantine;
pub mod relay;
pub mod routing;
pub mod simulate;
pub mod store;
pub mod tls;
pub mod watch;
