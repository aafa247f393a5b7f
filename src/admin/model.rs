//! The admin API's requests and answers (docs/admin-api.md) as types: the
//! relay serializes them, the CLI (`crate::ops`) reads them back, and
//! docs/openapi.json is generated from them, so the three cannot drift
//! apart. Every field name here is part of the wire format: renaming one
//! breaks operators' scripts (tests/admin_api_wire.rs pins them). An
//! `Option` field without `skip_serializing_if` is always there (null when
//! unknown), so the document says `required` for it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

/// Every refusal and failure of the API: `{"error": "..."}`, naming the
/// parameter at fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
}

/// `GET /api/v1/targets`: the queue of every configured target and of every
/// name that still has jobs or dead letters in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Targets {
    /// By name.
    pub targets: Vec<TargetQueue>,
}

/// One target's queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TargetQueue {
    /// The target's name (`(no route)` for postbacks no route matched).
    pub name: String,
    /// Whether the running config has this target.
    pub configured: bool,
    /// Whether its deliveries are paused; null for a name the running
    /// config does not have.
    #[schema(required = true)]
    pub paused: Option<bool>,
    /// Jobs waiting or in flight.
    pub pending: u64,
    /// Of those, the ones whose next attempt time has come.
    pub due: u64,
    /// Dead letters kept.
    pub dead: u64,
    /// Age of the oldest pending job; null when none is pending.
    #[schema(required = true)]
    pub oldest_pending_age_seconds: Option<f64>,
    /// The error of the most recent failed attempt among its pending jobs.
    #[schema(required = true)]
    pub last_error: Option<String>,
}

/// `POST /api/v1/targets/{name}/pause` and `/resume`: the target's state now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PauseState {
    /// The target's name.
    pub target: String,
    /// Whether it is paused now.
    pub paused: bool,
}

/// `GET /api/v1/dead-letters`: one page, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterPage {
    /// The page's dead letters.
    pub dead_letters: Vec<DeadLetter>,
    /// The `after` of the next page; null on the last page.
    #[schema(required = true)]
    pub next: Option<String>,
}

/// One postback × one target that was given up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetter {
    /// Its identity in the API.
    pub id: i64,
    /// The envelope id of the postback.
    pub event_id: String,
    /// The target it was given up for (`(no route)` when none matched).
    pub target: String,
    /// Why: `rejected by target`, `max attempts reached`, `max age
    /// exceeded`, `no route` or `target removed`.
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
    /// HTTP status of the last attempt, when there was an answer.
    #[schema(required = true)]
    pub last_status: Option<u16>,
    /// The last error.
    #[schema(required = true)]
    pub last_error: Option<String>,
    /// When it was given up (RFC 3339, milliseconds, UTC).
    #[schema(format = DateTime, required = true)]
    pub dead_at: Option<String>,
    /// When ingest received the postback.
    #[schema(format = DateTime, required = true)]
    pub received_at: Option<String>,
}

/// `GET /api/v1/dead-letters/{id}`: a dead letter with its postback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterDetail {
    /// The listing's fields.
    #[serde(flatten)]
    pub letter: DeadLetter,
    /// The CloudEvents JSON object its target would receive (null if the
    /// stored envelope is not JSON).
    pub envelope: Value,
    /// The Content-Type the postback came with.
    #[schema(required = true)]
    pub content_type: Option<String>,
    /// The body Sinch sent, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_body: Option<String>,
    /// The body Sinch sent, base64, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_body_base64: Option<String>,
}

/// `GET /api/v1/quarantine`: one page, oldest first arrival first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QuarantinePage {
    /// The page's bodies.
    pub quarantine: Vec<QuarantinedBody>,
    /// The `after` of the next page; null on the last page.
    #[schema(required = true)]
    pub next: Option<String>,
}

/// A body the parser refused, one per distinct body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QuarantinedBody {
    /// Hex SHA-256 of the whole body: its identity.
    pub body_hash: String,
    /// The Content-Type it came with.
    #[schema(required = true)]
    pub content_type: Option<String>,
    /// The parse error of its last arrival.
    pub error: String,
    /// Its size as received.
    pub size: u64,
    /// Only its first 1 KiB is kept (`quarantine.max_bytes` was spent).
    pub truncated: bool,
    /// First arrival.
    #[schema(format = DateTime, required = true)]
    pub first_seen: Option<String>,
    /// Last arrival.
    #[schema(format = DateTime, required = true)]
    pub last_seen: Option<String>,
    /// Arrivals (Sinch retries a 400 like any other failure).
    pub seen_count: u64,
}

/// `GET /api/v1/quarantine/{body_hash}`: one body, with the body itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QuarantinedDetail {
    /// The listing's fields.
    #[serde(flatten)]
    pub summary: QuarantinedBody,
    /// The body (its kept prefix when truncated), when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The body, base64, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

/// A time in a filter: RFC 3339 or Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TimeArg {
    /// Unix milliseconds.
    Millis(i64),
    /// RFC 3339, or Unix milliseconds as text.
    Text(String),
}

/// `POST /api/v1/dead-letters/replay` and `/purge`: exactly one of `ids`, a
/// filter (at least one of its fields) or `all`, so an empty body chooses
/// nothing rather than everything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSelection {
    /// These dead letters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<i64>,
    /// Or those of this target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Or those given up for this reason, exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Or those given up at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<TimeArg>,
    /// Or those given up at or before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<TimeArg>,
    /// Or every dead letter.
    #[serde(default, skip_serializing_if = "is_false")]
    pub all: bool,
}

// The window is not a struct shared with `DeadLetterSelection`: serde
// cannot flatten one into a type that refuses unknown fields, and both
// selections must refuse them.
/// `POST /api/v1/quarantine/replay` and `/purge`: exactly one of `hashes`,
/// a time window (at least one bound) or `all`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuarantineSelection {
    /// These bodies (full SHA-256 hex digests).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hashes: Vec<String>,
    /// Or those that last arrived at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<TimeArg>,
    /// Or those that last arrived at or before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<TimeArg>,
    /// Or every quarantined body.
    #[serde(default, skip_serializing_if = "is_false")]
    pub all: bool,
}

/// `all` is left out of a body unless it is true.
fn is_false(all: &bool) -> bool {
    !*all
}

/// `POST /api/v1/dead-letters/replay`: what was put back in the queues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterReplay {
    /// Dead letters that became jobs again.
    pub replayed: u64,
    /// Dead letters left as they were (their target is not configured,
    /// they still match no route ...).
    pub skipped: u64,
    /// Why some were skipped (at most 20).
    pub skipped_examples: Vec<Skipped>,
    /// Listed ids that are no dead letter.
    pub not_found: Vec<i64>,
}

/// A dead letter a replay left, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Skipped {
    /// The dead letter.
    pub id: i64,
    /// Why it stays.
    pub reason: String,
}

/// `POST /api/v1/quarantine/replay`: the outcome counts and, for the first
/// 100 bodies, each body's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QuarantineReplay {
    /// Parsed, routed and committed: they left the quarantine.
    pub accepted: u64,
    /// Parsed, but the postback was accepted before: they left the quarantine.
    pub duplicate: u64,
    /// Still refused by today's parser: they stay.
    pub still_invalid: u64,
    /// Only a prefix was kept, which cannot be replayed: they stay.
    pub truncated: u64,
    /// Per body (at most 100).
    pub results: Vec<BodyReplay>,
    /// Listed hashes that are not in the quarantine.
    pub not_found: Vec<String>,
}

/// What became of one replayed body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BodyReplay {
    /// The body.
    pub body_hash: String,
    /// Its outcome, under `outcome`.
    #[serde(flatten)]
    pub outcome: ReplayOutcome,
}

/// A replayed body's outcome, named by `outcome`: what the quarantine's
/// replay returns, as it is.
pub use crate::quarantine::Replayed as ReplayOutcome;

/// `POST /api/v1/dead-letters/purge` and `/api/v1/quarantine/purge`: how
/// many were deleted; `K` is how the kind's items are named (a dead letter
/// id, a body hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Purged<K> {
    /// Items deleted.
    pub purged: u64,
    /// Listed ids or hashes that were not there.
    pub not_found: Vec<K>,
}

/// The query of `GET /api/v1/dead-letters`; every parameter is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// Only this target's (e.g. `crm`, or `(no route)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Only this reason, exactly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The time window (when they were given up) and the page.
    #[serde(flatten)]
    #[param(ignore)]
    pub page: PageQuery,
}

/// The query of `GET /api/v1/quarantine` (the window is of the bodies' last
/// arrival), and the window and page of `GET /api/v1/dead-letters` (of the
/// time they were given up); every parameter is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// From this time on (RFC 3339 or Unix milliseconds), inclusive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Up to this time (RFC 3339 or Unix milliseconds), inclusive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Items per page, 1 to 1000 (default 100).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The `next` of the previous page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// The dead letters' parameters: their own, then the window and page.
pub struct DeadLetterParams;

impl IntoParams for DeadLetterParams {
    fn into_params(
        parameter_in: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
    ) -> Vec<utoipa::openapi::path::Parameter> {
        let mut params = DeadLetterQuery::into_params(&parameter_in);
        params.extend(PageQuery::into_params(parameter_in));
        params
    }
}

/// A stored body as the API shows it: text when it is UTF-8, else base64
/// (the `(text, base64)` fields of the detail answers; exactly one is set).
pub fn text_or_base64(body: &[u8]) -> (Option<String>, Option<String>) {
    use base64::Engine;
    match std::str::from_utf8(body) {
        Ok(text) => (Some(text.to_owned()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(body)),
        ),
    }
}
