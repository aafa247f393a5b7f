//! `tests/ops_cli.rs` against the PostgreSQL store: the same test bodies,
//! compiled again in a test target whose name ends in `_postgres` (see
//! `common::backend`). Each test gets a database of its own on
//! `RELAY_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! dropped when it ends.

#[path = "ops_cli.rs"]
mod suite;
