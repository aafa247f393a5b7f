//! The relay's integration tests: one test binary, one module per concern,
//! each driving the real thing (HTTP over loopback, a store on disk, the real
//! binary for crash tests, a real PostgreSQL server where one is concerned).
//!
//! The store-backed modules run on SQLite by default and on PostgreSQL when
//! `RELAY_TEST_BACKEND=postgres` says so (see `common/store.rs`); `.ci/run`
//! runs them both ways. `postgres` (several instances on one database) and
//! `power_loss` (a FUSE file system that forgets what was not synced) always
//! run against their own backend.

mod common;

mod admin_api;
mod admin_api_openapi;
mod admin_api_wire;
mod delivery;
mod faults;
mod hardening;
mod health_cli;
mod ingest;
mod ops_cli;
mod postgres;
mod power_loss;
mod process;
mod properties;
mod reload;
mod route_cli;
mod simulate_cli;
