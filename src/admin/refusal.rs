//! How the API says no (a status and `{"error": ...}`), and the times it
//! reads and writes: what every endpoint module shares.

use chrono::{DateTime, SecondsFormat};
use hyper::StatusCode;

use super::model::{ErrorBody, TimeArg};
use crate::http_server::{json_response, HttpResponse};
use crate::store::StoreError;

/// A request the API refuses, with the status and the message to show.
pub(super) struct Refusal(pub(super) StatusCode, pub(super) String);

impl From<StoreError> for Refusal {
    fn from(err: StoreError) -> Refusal {
        Refusal(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
    }
}

impl Refusal {
    /// The answer: the status and `{"error": ...}`.
    pub(super) fn response(self) -> HttpResponse {
        let body = serde_json::to_value(ErrorBody { error: self.1 }).unwrap_or_default();
        json_response(self.0, &body)
    }
}

/// 400: a bad parameter or body.
pub(super) fn bad_request(message: impl Into<String>) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, message.into())
}

/// 404: no such target, dead letter or body.
pub(super) fn not_found(message: impl Into<String>) -> Refusal {
    Refusal(StatusCode::NOT_FOUND, message.into())
}

/// Unix ms as RFC 3339 with milliseconds, UTC (None: out of range).
pub(super) fn time(ms: i64) -> Option<String> {
    DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// A time given as RFC 3339 or Unix milliseconds; `name` is the parameter.
pub(super) fn parse_time(name: &str, text: &str) -> Result<i64, Refusal> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            bad_request(format!(
                "`{name}`: {text:?} is neither an RFC 3339 time nor Unix milliseconds"
            ))
        })
}

/// An optional time of a selection body, as Unix ms.
pub(super) fn millis(name: &str, time: Option<&TimeArg>) -> Result<Option<i64>, Refusal> {
    time.map(|time| match time {
        TimeArg::Millis(ms) => Ok(*ms),
        TimeArg::Text(text) => parse_time(name, text),
    })
    .transpose()
}
