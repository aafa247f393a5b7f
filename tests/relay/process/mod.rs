//! The real binary: crash (SIGKILL) and restart on the same store, graceful
//! shutdown (SIGTERM), `check-config`, and JSON logs. Runs on SQLite, and on
//! PostgreSQL with `RELAY_TEST_BACKEND=postgres`.
//!
//! The harness (the process guard, the load senders and their books) is in
//! `common/process.rs`, shared with the fault tests in `faults/`.

mod check_config;
mod files_and_logs;
mod reload;
mod restart;
