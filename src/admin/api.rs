//! The admin API's endpoints (docs/admin-api.md): the queue per target,
//! pauses, dead letters and the quarantine, as JSON.

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::Admin;
use crate::clock::now_ms;
use crate::delivery::fleet::PauseError;
use crate::http_server::{json_response, HttpResponse};
use crate::quarantine::{replay_body, Replayed};
use crate::store::{
    DeadLetter, DeadLetterFilter, DeadLetterId, Page, QuarantineFilter, QuarantinedBody,
    StoreError, NO_ROUTE_TARGET,
};

/// Items per page when the client does not say, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Items a replay or purge reads and writes per store call.
const CHUNK: usize = 500;
/// Largest request body (a selection of ids or hashes).
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a client may take to send that body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Examples of skipped items and per-body results kept in an answer.
const MAX_EXAMPLES: usize = 20;
const MAX_RESULTS: usize = 100;

/// A request the API refuses, with the status and the message to show.
struct Refusal(StatusCode, String);

impl From<StoreError> for Refusal {
    fn from(err: StoreError) -> Refusal {
        Refusal(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
    }
}

fn bad_request(message: impl Into<String>) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, message.into())
}

fn not_found(message: impl Into<String>) -> Refusal {
    Refusal(StatusCode::NOT_FOUND, message.into())
}

type Answer = Result<Value, Refusal>;

/// Dispatches `/api/v1/<path>`.
pub(super) async fn handle(admin: &Admin, request: Request<Incoming>, path: &str) -> HttpResponse {
    let method = request.method().clone();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let segments: Vec<String> = path
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let answer = match (&method, segments.as_slice()) {
        (&Method::GET, ["targets"]) => targets(admin).await,
        (&Method::POST, ["targets", name, "pause"]) => pause(admin, name, true).await,
        (&Method::POST, ["targets", name, "resume"]) => pause(admin, name, false).await,
        (&Method::GET, ["dead-letters"]) => list_dead_letters(admin, &query).await,
        (&Method::GET, ["dead-letters", id]) => show_dead_letter(admin, id).await,
        (&Method::POST, ["dead-letters", "replay"]) => match read_json(request).await {
            Ok(body) => replay_dead_letters(admin, body).await,
            Err(refusal) => Err(refusal),
        },
        (&Method::POST, ["dead-letters", "purge"]) => match read_json(request).await {
            Ok(body) => purge_dead_letters(admin, body).await,
            Err(refusal) => Err(refusal),
        },
        (&Method::GET, ["quarantine"]) => list_quarantine(admin, &query).await,
        (&Method::GET, ["quarantine", hash]) => show_quarantined(admin, hash).await,
        (&Method::POST, ["quarantine", "replay"]) => match read_json(request).await {
            Ok(body) => replay_quarantine(admin, body).await,
            Err(refusal) => Err(refusal),
        },
        (&Method::POST, ["quarantine", "purge"]) => match read_json(request).await {
            Ok(body) => purge_quarantine(admin, body).await,
            Err(refusal) => Err(refusal),
        },
        (_, ["targets"] | ["dead-letters" | "quarantine", ..] | ["targets", _, _]) => Err(Refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on /api/v1/{path}"),
        )),
        _ => Err(not_found(format!("no such endpoint: /api/v1/{path}"))),
    };
    match answer {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(Refusal(status, message)) => {
            if status.is_server_error() {
                tracing::error!(path = %path, error = %message, "admin API request failed");
            }
            json_response(status, &json!({ "error": message }))
        }
    }
}

async fn read_json(request: Request<Incoming>) -> Result<Value, Refusal> {
    let body = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(request.into_body(), MAX_BODY_BYTES).collect(),
    )
    .await
    .map_err(|_| bad_request("the request body took too long"))?
    .map_err(|err| bad_request(format!("cannot read the request body: {err}")))?
    .to_bytes();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&body).map_err(|err| bad_request(format!("the body is not JSON: {err}")))
}

/// Unix ms as RFC 3339 with milliseconds, UTC.
fn time(ms: i64) -> Value {
    DateTime::from_timestamp_millis(ms)
        .map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

/// A time given as RFC 3339 or Unix milliseconds.
fn parse_time(name: &str, text: &str) -> Result<i64, Refusal> {
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

/// The body as text when it is UTF-8, else base64 under `<name>_base64`.
fn body_field(object: &mut serde_json::Map<String, Value>, name: &str, body: &Bytes) {
    match std::str::from_utf8(body) {
        Ok(text) => object.insert(name.to_owned(), Value::String(text.to_owned())),
        Err(_) => object.insert(
            format!("{name}_base64"),
            Value::String(base64::engine::general_purpose::STANDARD.encode(body)),
        ),
    };
}

/// Listing parameters shared by dead letters and the quarantine.
struct Listing {
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    limit: usize,
    after: Option<String>,
    target: Option<String>,
    reason: Option<String>,
}

fn parse_listing(query: &str, allowed: &[&str]) -> Result<Listing, Refusal> {
    let mut listing = Listing {
        since_ms: None,
        until_ms: None,
        limit: DEFAULT_LIMIT,
        after: None,
        target: None,
        reason: None,
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = value.into_owned();
        if !allowed.contains(&key.as_ref()) {
            return Err(bad_request(format!(
                "unknown parameter `{key}` (known: {})",
                allowed.join(", ")
            )));
        }
        match key.as_ref() {
            "since" => listing.since_ms = Some(parse_time("since", &value)?),
            "until" => listing.until_ms = Some(parse_time("until", &value)?),
            "limit" => {
                listing.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        bad_request(format!("`limit`: must be a number from 1 to {MAX_LIMIT}"))
                    })?
            }
            "after" => listing.after = Some(value),
            "target" => listing.target = Some(value),
            "reason" => listing.reason = Some(value),
            _ => unreachable!("checked against `allowed`"),
        }
    }
    Ok(listing)
}

async fn targets(admin: &Admin) -> Answer {
    let configured = admin.fleet.targets();
    let mut queues = admin.store.queue().await?;
    for name in &configured {
        if !queues.iter().any(|q| &q.stats.target == name) {
            queues.push(crate::store::TargetQueue {
                stats: crate::store::TargetStats {
                    target: name.clone(),
                    pending: 0,
                    dead: 0,
                    oldest_pending_ms: None,
                },
                due: 0,
                last_error: None,
            });
        }
    }
    queues.sort_by(|a, b| a.stats.target.cmp(&b.stats.target));
    let now = now_ms();
    let targets: Vec<Value> = queues
        .iter()
        .map(|q| {
            json!({
                "name": q.stats.target,
                "configured": configured.contains(&q.stats.target),
                "paused": admin.fleet.is_paused(&q.stats.target),
                "pending": q.stats.pending,
                "due": q.due,
                "dead": q.stats.dead,
                "oldest_pending_age_seconds": q.stats.oldest_pending_ms
                    .map(|oldest| (now - oldest).max(0) as f64 / 1000.0),
                "last_error": q.last_error,
            })
        })
        .collect();
    Ok(json!({ "targets": targets }))
}

async fn pause(admin: &Admin, target: &str, paused: bool) -> Answer {
    match admin.fleet.set_paused(target, paused).await {
        Ok(()) => Ok(json!({ "target": target, "paused": paused })),
        Err(PauseError::UnknownTarget(name)) => Err(not_found(format!(
            "no target `{name}` in the running config"
        ))),
        Err(PauseError::Store(err)) => Err(err.into()),
    }
}

fn dead_letter_json(letter: &DeadLetter) -> serde_json::Map<String, Value> {
    let Value::Object(object) = json!({
        "id": letter.id,
        "event_id": letter.event_id,
        "target": letter.target,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "last_status": letter.last_status,
        "last_error": letter.last_error,
        "dead_at": time(letter.dead_at_ms),
        "received_at": time(letter.received_at_ms),
    }) else {
        unreachable!("json! of an object literal")
    };
    object
}

async fn list_dead_letters(admin: &Admin, query: &str) -> Answer {
    let listing = parse_listing(
        query,
        &["target", "reason", "since", "until", "limit", "after"],
    )?;
    let after = match &listing.after {
        Some(cursor) => Some(cursor.parse::<DeadLetterId>().map_err(|_| {
            bad_request(format!("`after`: {cursor:?} is not a cursor from `next`"))
        })?),
        None => None,
    };
    let filter = DeadLetterFilter {
        target: listing.target,
        reason: listing.reason,
        since_ms: listing.since_ms,
        until_ms: listing.until_ms,
    };
    // One more than asked tells whether another page follows.
    let mut letters = admin
        .store
        .list_dead_letters(
            &filter,
            &Page {
                after,
                limit: listing.limit + 1,
            },
        )
        .await?;
    let more = letters.len() > listing.limit;
    letters.truncate(listing.limit);
    let next = more
        .then(|| letters.last().map(|l| l.id.to_string()))
        .flatten();
    let items: Vec<Value> = letters
        .iter()
        .map(|l| Value::Object(dead_letter_json(l)))
        .collect();
    Ok(json!({ "dead_letters": items, "next": next }))
}

async fn show_dead_letter(admin: &Admin, id: &str) -> Answer {
    let id: DeadLetterId = id
        .parse()
        .map_err(|_| bad_request(format!("{id:?} is not a dead letter id (a number)")))?;
    let detail = admin
        .store
        .dead_letter(id)
        .await?
        .ok_or_else(|| not_found(format!("no dead letter {id}")))?;
    let mut object = dead_letter_json(&detail.letter);
    object.insert(
        "envelope".into(),
        serde_json::from_slice(&detail.envelope).unwrap_or(Value::Null),
    );
    object.insert("content_type".into(), json!(detail.content_type));
    body_field(&mut object, "raw_body", &detail.raw_body);
    Ok(Value::Object(object))
}

/// Which dead letters a replay or purge means (docs/admin-api.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterSelection {
    #[serde(default)]
    ids: Vec<DeadLetterId>,
    target: Option<String>,
    reason: Option<String>,
    since: Option<TimeArg>,
    until: Option<TimeArg>,
    #[serde(default)]
    all: bool,
}

/// Which quarantined bodies a replay or purge means.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuarantineSelection {
    #[serde(default)]
    hashes: Vec<String>,
    since: Option<TimeArg>,
    until: Option<TimeArg>,
    #[serde(default)]
    all: bool,
}

/// A time in a JSON body: RFC 3339 or Unix milliseconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TimeArg {
    Millis(i64),
    Text(String),
}

impl TimeArg {
    fn millis(&self, name: &str) -> Result<i64, Refusal> {
        match self {
            TimeArg::Millis(ms) => Ok(*ms),
            TimeArg::Text(text) => parse_time(name, text),
        }
    }
}

/// Ids (or hashes) an operator listed, handed out a chunk at a time.
struct Listed<I> {
    items: Vec<I>,
    position: usize,
}

impl<I> Listed<I> {
    fn new(items: Vec<I>) -> Listed<I> {
        Listed { items, position: 0 }
    }

    /// The next chunk, or None when all were handed out.
    fn next_chunk(&mut self) -> Option<&[I]> {
        let start = self.position.min(self.items.len());
        let end = (start + CHUNK).min(self.items.len());
        self.position = end;
        (start < end).then(|| &self.items[start..end])
    }
}

/// What a selection resolved to.
enum Chosen<I, F> {
    Ids(Listed<I>),
    Filter(F),
}

fn selection<T: serde::de::DeserializeOwned>(body: Value, what: &str) -> Result<T, Refusal> {
    serde_json::from_value(body).map_err(|err| bad_request(format!("{what}: {err}")))
}

const SAY_WHICH: &str = "say which: a list of ids/hashes, a filter, or {\"all\": true}";

fn choose_dead_letters(body: Value) -> Result<Chosen<DeadLetterId, DeadLetterFilter>, Refusal> {
    let s: DeadLetterSelection = selection(body, "dead letter selection")?;
    let filter = DeadLetterFilter {
        target: s.target,
        reason: s.reason,
        since_ms: s.since.as_ref().map(|t| t.millis("since")).transpose()?,
        until_ms: s.until.as_ref().map(|t| t.millis("until")).transpose()?,
    };
    let filtered = filter != DeadLetterFilter::default();
    match (!s.ids.is_empty(), filtered, s.all) {
        (true, false, false) => Ok(Chosen::Ids(Listed::new(s.ids))),
        (false, true, false) => Ok(Chosen::Filter(filter)),
        (false, false, true) => Ok(Chosen::Filter(filter)),
        (false, false, false) => Err(bad_request(SAY_WHICH)),
        _ => Err(bad_request(format!("give only one of them: {SAY_WHICH}"))),
    }
}

fn choose_quarantine(body: Value) -> Result<Chosen<String, QuarantineFilter>, Refusal> {
    let s: QuarantineSelection = selection(body, "quarantine selection")?;
    let filter = QuarantineFilter {
        since_ms: s.since.as_ref().map(|t| t.millis("since")).transpose()?,
        until_ms: s.until.as_ref().map(|t| t.millis("until")).transpose()?,
    };
    let filtered = filter != QuarantineFilter::default();
    match (!s.hashes.is_empty(), filtered, s.all) {
        (true, false, false) => Ok(Chosen::Ids(Listed::new(s.hashes))),
        (false, true, false) | (false, false, true) => Ok(Chosen::Filter(filter)),
        (false, false, false) => Err(bad_request(SAY_WHICH)),
        _ => Err(bad_request(format!("give only one of them: {SAY_WHICH}"))),
    }
}

/// The chosen dead letters, a chunk at a time. A filter only reaches letters
/// given up before the walk began, so letters that a replay sends straight
/// back to the dead letters are not taken again.
struct DeadLetterChunks {
    chosen: Chosen<DeadLetterId, DeadLetterFilter>,
    after: Option<DeadLetterId>,
    /// A filter's walk ends at the newest dead letter when it began (ids
    /// grow), read on the first step; `Some(None)`: there were none.
    up_to: Option<Option<DeadLetterId>>,
    /// Ids asked for that are not dead letters (a typo, or gone meanwhile).
    missing: Vec<DeadLetterId>,
}

impl DeadLetterChunks {
    fn new(chosen: Chosen<DeadLetterId, DeadLetterFilter>) -> DeadLetterChunks {
        DeadLetterChunks {
            chosen,
            after: None,
            up_to: None,
            missing: Vec::new(),
        }
    }

    async fn next(&mut self, admin: &Admin) -> Result<Option<Vec<DeadLetter>>, Refusal> {
        let letters = match &mut self.chosen {
            Chosen::Ids(listed) => {
                let Some(chunk) = listed.next_chunk() else {
                    return Ok(None);
                };
                let mut letters = Vec::with_capacity(chunk.len());
                for id in chunk {
                    match admin.store.dead_letter(*id).await? {
                        Some(detail) => letters.push(detail.letter),
                        None => self.missing.push(*id),
                    }
                }
                letters
            }
            Chosen::Filter(filter) => {
                let up_to = match self.up_to {
                    Some(up_to) => up_to,
                    None => *self
                        .up_to
                        .insert(admin.store.newest_dead_letter_id().await?),
                };
                let Some(up_to) = up_to else {
                    return Ok(None);
                };
                let page = Page {
                    after: self.after,
                    limit: CHUNK,
                };
                let mut letters = admin.store.list_dead_letters(filter, &page).await?;
                letters.retain(|letter| letter.id <= up_to);
                let Some(last) = letters.last() else {
                    return Ok(None);
                };
                self.after = Some(last.id);
                letters
            }
        };
        Ok(Some(letters))
    }
}

async fn replay_dead_letters(admin: &Admin, body: Value) -> Answer {
    let chosen = choose_dead_letters(body)?;
    let configured: BTreeSet<String> = admin.fleet.targets().into_iter().collect();
    let router = admin.router.get();
    let mut replayed = 0u64;
    let mut skipped = 0u64;
    let mut examples = Vec::new();
    let mut woken = BTreeSet::new();
    let mut chunks = DeadLetterChunks::new(chosen);
    while let Some(letters) = chunks.next(admin).await? {
        let mut plan = Vec::with_capacity(letters.len());
        for letter in letters {
            let targets = if letter.target == NO_ROUTE_TARGET {
                route_again(admin, &router, letter.id).await?
            } else if configured.contains(&letter.target) {
                Ok(vec![letter.target.clone()])
            } else {
                Err(format!("target `{}` is not configured", letter.target))
            };
            match targets {
                Ok(targets) => {
                    woken.extend(targets.iter().cloned());
                    plan.push((letter.id, targets));
                }
                Err(reason) => {
                    skipped += 1;
                    if examples.len() < MAX_EXAMPLES {
                        examples.push(json!({ "id": letter.id, "reason": reason }));
                    }
                }
            }
        }
        replayed += admin.store.requeue_dead_letters(plan).await?;
    }
    for target in &woken {
        admin.fleet.wake(target);
    }
    if replayed > 0 {
        tracing::warn!(replayed, skipped, "dead letters replayed by an operator");
    }
    Ok(json!({
        "replayed": replayed,
        "skipped": skipped,
        "skipped_examples": examples,
        "not_found": chunks.missing,
    }))
}

/// The targets today's routes give a `(no route)` dead letter's postback.
async fn route_again(
    admin: &Admin,
    router: &crate::routing::Router,
    id: DeadLetterId,
) -> Result<Result<Vec<String>, String>, Refusal> {
    let Some(detail) = admin.store.dead_letter(id).await? else {
        return Ok(Err("gone meanwhile".into()));
    };
    Ok(
        match crate::postback::parse(&detail.raw_body, detail.content_type.as_deref()) {
            Err(err) => Err(format!("its body no longer parses: {err}")),
            Ok(postback) => {
                let targets = router.route(&postback).targets;
                if targets.is_empty() {
                    Err("it still matches no route".into())
                } else {
                    Ok(targets)
                }
            }
        },
    )
}

async fn purge_dead_letters(admin: &Admin, body: Value) -> Answer {
    let chosen = choose_dead_letters(body)?;
    let mut purged = 0u64;
    let mut chunks = DeadLetterChunks::new(chosen);
    while let Some(letters) = chunks.next(admin).await? {
        let ids: Vec<DeadLetterId> = letters.iter().map(|l| l.id).collect();
        purged += admin.store.purge_dead_letters(&ids).await?;
    }
    if purged > 0 {
        tracing::warn!(purged, "dead letters purged by an operator");
    }
    Ok(json!({ "purged": purged, "not_found": chunks.missing }))
}

fn quarantined_json(body: &QuarantinedBody) -> serde_json::Map<String, Value> {
    let Value::Object(object) = json!({
        "body_hash": body.body_hash,
        "content_type": body.content_type,
        "error": body.error,
        "size": body.size,
        "truncated": body.truncated,
        "first_seen": time(body.first_seen_ms),
        "last_seen": time(body.last_seen_ms),
        "seen_count": body.seen_count,
    }) else {
        unreachable!("json! of an object literal")
    };
    object
}

/// The quarantine cursor: `<first_seen ms>.<body hash>`.
fn quarantine_cursor(body: &QuarantinedBody) -> String {
    format!("{}.{}", body.first_seen_ms, body.body_hash)
}

async fn list_quarantine(admin: &Admin, query: &str) -> Answer {
    let listing = parse_listing(query, &["since", "until", "limit", "after"])?;
    let after = match &listing.after {
        Some(cursor) => Some(
            cursor
                .split_once('.')
                .and_then(|(ms, hash)| Some((ms.parse::<i64>().ok()?, hash.to_owned())))
                .ok_or_else(|| {
                    bad_request(format!("`after`: {cursor:?} is not a cursor from `next`"))
                })?,
        ),
        None => None,
    };
    let filter = QuarantineFilter {
        since_ms: listing.since_ms,
        until_ms: listing.until_ms,
    };
    let mut bodies = admin
        .store
        .list_quarantine(
            &filter,
            &Page {
                after,
                limit: listing.limit + 1,
            },
        )
        .await?;
    let more = bodies.len() > listing.limit;
    bodies.truncate(listing.limit);
    let next = more.then(|| bodies.last().map(quarantine_cursor)).flatten();
    let items: Vec<Value> = bodies
        .iter()
        .map(|b| Value::Object(quarantined_json(b)))
        .collect();
    Ok(json!({ "quarantine": items, "next": next }))
}

async fn show_quarantined(admin: &Admin, hash: &str) -> Answer {
    let body = admin
        .store
        .quarantined(hash)
        .await?
        .ok_or_else(|| not_found(format!("no quarantined body {hash}")))?;
    let mut object = quarantined_json(&body);
    body_field(&mut object, "body", &body.body);
    Ok(Value::Object(object))
}

/// The chosen quarantined bodies, a chunk at a time.
struct QuarantineChunks {
    chosen: Chosen<String, QuarantineFilter>,
    after: Option<(i64, String)>,
    /// Hashes asked for that are not in the quarantine.
    missing: Vec<String>,
}

impl QuarantineChunks {
    fn new(chosen: Chosen<String, QuarantineFilter>) -> QuarantineChunks {
        QuarantineChunks {
            chosen,
            after: None,
            missing: Vec::new(),
        }
    }

    async fn next(&mut self, admin: &Admin) -> Result<Option<Vec<QuarantinedBody>>, Refusal> {
        let bodies = match &mut self.chosen {
            Chosen::Ids(listed) => {
                let Some(chunk) = listed.next_chunk() else {
                    return Ok(None);
                };
                let mut bodies = Vec::with_capacity(chunk.len());
                for hash in chunk {
                    match admin.store.quarantined(hash).await? {
                        Some(body) => bodies.push(body),
                        None => self.missing.push(hash.clone()),
                    }
                }
                bodies
            }
            Chosen::Filter(filter) => {
                let page = Page {
                    after: self.after.clone(),
                    limit: CHUNK,
                };
                let bodies = admin.store.list_quarantine(filter, &page).await?;
                let Some(last) = bodies.last() else {
                    return Ok(None);
                };
                self.after = Some((last.first_seen_ms, last.body_hash.clone()));
                bodies
            }
        };
        Ok(Some(bodies))
    }
}

async fn replay_quarantine(admin: &Admin, body: Value) -> Answer {
    let chosen = choose_quarantine(body)?;
    let router = admin.router.get();
    let (mut accepted, mut duplicate, mut still_invalid, mut truncated) = (0u64, 0u64, 0u64, 0u64);
    let mut results = Vec::new();
    let mut chunks = QuarantineChunks::new(chosen);
    while let Some(bodies) = chunks.next(admin).await? {
        for body in bodies {
            let outcome = replay_body(admin.store.as_ref(), &router, &admin.source, &body).await?;
            let mut result = json!({ "body_hash": body.body_hash });
            match outcome {
                Replayed::Accepted { id, targets } => {
                    accepted += 1;
                    for target in &targets {
                        admin.fleet.wake(target);
                    }
                    result["outcome"] = json!("accepted");
                    result["id"] = json!(id);
                    result["targets"] = json!(targets);
                }
                Replayed::Duplicate { original_id } => {
                    duplicate += 1;
                    result["outcome"] = json!("duplicate");
                    result["original_id"] = json!(original_id);
                }
                Replayed::StillInvalid { error } => {
                    still_invalid += 1;
                    result["outcome"] = json!("still_invalid");
                    result["error"] = json!(error);
                }
                Replayed::Truncated { error } => {
                    truncated += 1;
                    result["outcome"] = json!("truncated");
                    result["error"] = json!(error);
                }
            }
            if results.len() < MAX_RESULTS {
                results.push(result);
            }
        }
    }
    if accepted + duplicate > 0 {
        tracing::warn!(
            accepted,
            duplicate,
            still_invalid,
            "quarantined bodies replayed by an operator"
        );
    }
    Ok(json!({
        "accepted": accepted,
        "duplicate": duplicate,
        "still_invalid": still_invalid,
        "truncated": truncated,
        "results": results,
        "not_found": chunks.missing,
    }))
}

async fn purge_quarantine(admin: &Admin, body: Value) -> Answer {
    let chosen = choose_quarantine(body)?;
    let mut purged = 0u64;
    let mut chunks = QuarantineChunks::new(chosen);
    while let Some(bodies) = chunks.next(admin).await? {
        let hashes: Vec<String> = bodies.into_iter().map(|b| b.body_hash).collect();
        purged += admin.store.remove_quarantined(&hashes).await?;
    }
    if purged > 0 {
        tracing::warn!(purged, "quarantined bodies purged by an operator");
    }
    Ok(json!({ "purged": purged, "not_found": chunks.missing }))
}
