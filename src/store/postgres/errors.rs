//! How PostgreSQL and pool errors become [`StoreError`]s, and which of
//! them blame one postback's data rather than the database.

use tokio_postgres::error::SqlState;

use super::OP_TIMEOUT;
use crate::store::StoreError;

/// Whether the server refused the statement for its data (worth retrying the
/// items one by one) rather than because it cannot be reached or written.
pub(super) fn is_data_error(err: &tokio_postgres::Error) -> bool {
    let Some(code) = err.code() else {
        return false;
    };
    if *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::T_R_SERIALIZATION_FAILURE {
        return true;
    }
    // 21 cardinality violation, or a refusal of the data itself.
    code.code().starts_with("21") || refuses_data(err)
}

/// Whether the server refused a value it was given, so that sending the same
/// row again can never succeed: 22 data exception (a character the database
/// encoding lacks, a value out of range), 23 integrity constraint violation
/// (the dedupe conflict is expected and handled by `ON CONFLICT`, so any
/// other), 54 program limit exceeded (an index entry too large).
pub(super) fn refuses_data(err: &tokio_postgres::Error) -> bool {
    err.code()
        .is_some_and(|code| matches!(&code.code()[..2], "22" | "23" | "54"))
}

/// The message and SQLSTATE of a server error, or the whole cause chain of a
/// connection error (tokio_postgres's own message is terse).
pub(super) fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return format!(
            "PostgreSQL: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        );
    }
    let mut message = format!("PostgreSQL: {err}");
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

/// A pool that could not hand out a connection (cannot connect, all busy).
pub(super) fn pool_error(err: deadpool_postgres::PoolError) -> StoreError {
    match err {
        deadpool_postgres::PoolError::Backend(err) => {
            StoreError::database_from(describe(&err), err)
        }
        other => StoreError::database_from(format!("PostgreSQL pool: {other}"), other),
    }
}

pub(super) fn timed_out() -> StoreError {
    StoreError::database(format!(
        "PostgreSQL did not answer within {}s",
        OP_TIMEOUT.as_secs()
    ))
}
