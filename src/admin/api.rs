//! The admin API's endpoints (docs/admin-api.md): the queue per target,
//! pauses, dead letters and the quarantine, as JSON. Each endpoint answers
//! a type of [`super::model`]; its `#[utoipa::path]` is its entry in the
//! OpenAPI document ([`super::openapi`]).

use std::collections::BTreeSet;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::kinds::{self, dead_letter, quarantined, DeadLetters, Quarantine, Walk};
use super::model::{
    text_or_base64, BodyReplay, DeadLetterDetail, DeadLetterPage, DeadLetterParams,
    DeadLetterReplay, DeadLetterSelection, ErrorBody, PageQuery, PauseState, Purged,
    QuarantinePage, QuarantineReplay, QuarantineSelection, QuarantinedDetail, ReplayOutcome,
    Skipped, TargetQueue, Targets,
};
use super::refusal::{bad_request, not_found, Refusal};
use super::Admin;
use crate::clock::now_ms;
use crate::delivery::fleet::PauseError;
use crate::http_server::{json_response, HttpResponse};
use crate::quarantine::replay_body;
use crate::store::{DeadLetterId, NO_ROUTE_TARGET};

/// Largest request body (a selection of ids or hashes).
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a client may take to send that body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Examples of skipped items and per-body results kept in an answer.
const MAX_EXAMPLES: usize = 20;
const MAX_RESULTS: usize = 100;

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
        (&Method::GET, ["openapi.json"]) => json(Ok(super::openapi::document())),
        (&Method::GET, ["targets"]) => json(targets(admin).await),
        (&Method::POST, ["targets", name, "pause"]) => json(pause(admin, name).await),
        (&Method::POST, ["targets", name, "resume"]) => json(resume(admin, name).await),
        (&Method::GET, ["dead-letters"]) => json(list_dead_letters(admin, &query).await),
        (&Method::GET, ["dead-letters", id]) => json(show_dead_letter(admin, id).await),
        (&Method::POST, ["dead-letters", "replay"]) => {
            json(async { replay_dead_letters(admin, read_json(request).await?).await }.await)
        }
        (&Method::POST, ["dead-letters", "purge"]) => {
            json(async { purge_dead_letters(admin, read_json(request).await?).await }.await)
        }
        (&Method::GET, ["quarantine"]) => json(list_quarantine(admin, &query).await),
        (&Method::GET, ["quarantine", hash]) => json(show_quarantined(admin, hash).await),
        (&Method::POST, ["quarantine", "replay"]) => {
            json(async { replay_quarantine(admin, read_json(request).await?).await }.await)
        }
        (&Method::POST, ["quarantine", "purge"]) => {
            json(async { purge_quarantine(admin, read_json(request).await?).await }.await)
        }
        (
            _,
            ["targets" | "openapi.json"] | ["dead-letters" | "quarantine", ..] | ["targets", _, _],
        ) => Err(Refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on /api/v1/{path}"),
        )),
        _ => Err(not_found(format!("no such endpoint: /api/v1/{path}"))),
    };
    match answer {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(refusal) => {
            if refusal.0.is_server_error() {
                tracing::error!(path = %path, error = %refusal.1, "admin API request failed");
            }
            refusal.response()
        }
    }
}

/// An endpoint's answer as JSON.
fn json<T: Serialize>(answer: Result<T, Refusal>) -> Result<Value, Refusal> {
    serde_json::to_value(answer?).map_err(|err| {
        Refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write the answer: {err}"),
        )
    })
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
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_slice(&body).map_err(|err| bad_request(format!("the body is not JSON: {err}")))
}

/// The queue per target: every configured target, and every name that
/// still has jobs or dead letters.
#[utoipa::path(get, path = "/api/v1/targets", tag = "targets",
    responses((status = 200, description = "The queue per target, by name", body = Targets)))]
async fn targets(admin: &Admin) -> Result<Targets, Refusal> {
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
    let targets = queues
        .into_iter()
        .map(|q| TargetQueue {
            configured: configured.contains(&q.stats.target),
            paused: admin.fleet.is_paused(&q.stats.target),
            pending: q.stats.pending,
            due: q.due,
            dead: q.stats.dead,
            oldest_pending_age_seconds: q
                .stats
                .oldest_pending_ms
                .map(|oldest| (now - oldest).max(0) as f64 / 1000.0),
            last_error: q.last_error,
            name: q.stats.target,
        })
        .collect();
    Ok(Targets { targets })
}

/// Stops delivering to a target (it keeps queueing) until resumed; stored,
/// so it survives restarts and holds for every instance.
#[utoipa::path(post, path = "/api/v1/targets/{name}/pause", tag = "targets",
    params(("name" = String, Path, description = "The target's name in the running config")),
    responses((status = 200, description = "Paused", body = PauseState),
        (status = 404, description = "No such target in the running config", body = ErrorBody)))]
async fn pause(admin: &Admin, target: &str) -> Result<PauseState, Refusal> {
    set_paused(admin, target, true).await
}

/// Delivers to a paused target again.
#[utoipa::path(post, path = "/api/v1/targets/{name}/resume", tag = "targets",
    params(("name" = String, Path, description = "The target's name in the running config")),
    responses((status = 200, description = "Delivering", body = PauseState),
        (status = 404, description = "No such target in the running config", body = ErrorBody)))]
async fn resume(admin: &Admin, target: &str) -> Result<PauseState, Refusal> {
    set_paused(admin, target, false).await
}

async fn set_paused(admin: &Admin, target: &str, paused: bool) -> Result<PauseState, Refusal> {
    match admin.fleet.set_paused(target, paused).await {
        Ok(()) => Ok(PauseState {
            target: target.to_owned(),
            paused,
        }),
        Err(PauseError::UnknownTarget(name)) => Err(not_found(format!(
            "no target `{name}` in the running config"
        ))),
        Err(PauseError::Store(err)) => Err(err.into()),
    }
}

/// Dead letters, oldest first, a page at a time.
#[utoipa::path(get, path = "/api/v1/dead-letters", tag = "dead letters", params(DeadLetterParams),
    responses((status = 200, description = "One page", body = DeadLetterPage),
        (status = 400, description = "A bad parameter", body = ErrorBody)))]
async fn list_dead_letters(admin: &Admin, query: &str) -> Result<DeadLetterPage, Refusal> {
    kinds::list::<DeadLetters>(admin, query).await
}

/// One dead letter with the envelope its target would receive and the
/// original body.
#[utoipa::path(get, path = "/api/v1/dead-letters/{id}", tag = "dead letters",
    params(("id" = i64, Path, description = "The dead letter's id")),
    responses((status = 200, description = "The dead letter", body = DeadLetterDetail),
        (status = 400, description = "Not a number", body = ErrorBody),
        (status = 404, description = "No such dead letter", body = ErrorBody)))]
async fn show_dead_letter(admin: &Admin, id: &str) -> Result<DeadLetterDetail, Refusal> {
    let id: DeadLetterId = id
        .parse()
        .map_err(|_| bad_request(format!("{id:?} is not a dead letter id (a number)")))?;
    let detail = admin
        .store
        .dead_letter(id)
        .await?
        .ok_or_else(|| not_found(format!("no dead letter {id}")))?;
    let (raw_body, raw_body_base64) = text_or_base64(&detail.raw_body);
    Ok(DeadLetterDetail {
        letter: dead_letter(&detail.letter),
        envelope: serde_json::from_slice(&detail.envelope).unwrap_or(Value::Null),
        content_type: detail.content_type,
        raw_body,
        raw_body_base64,
    })
}

/// Puts the chosen dead letters back into their targets' queues with fresh
/// attempts; `(no route)` ones are routed again by the current routes.
#[utoipa::path(post, path = "/api/v1/dead-letters/replay", tag = "dead letters",
    request_body = DeadLetterSelection,
    responses((status = 200, description = "What was replayed", body = DeadLetterReplay),
        (status = 400, description = "A bad selection (none, or more than one way)", body = ErrorBody)))]
async fn replay_dead_letters(admin: &Admin, body: Value) -> Result<DeadLetterReplay, Refusal> {
    let mut walk = Walk::<DeadLetters>::choose(body)?;
    let configured: BTreeSet<String> = admin.fleet.targets().into_iter().collect();
    let router = admin.router.get();
    let mut replayed = 0u64;
    let mut skipped = 0u64;
    let mut examples = Vec::new();
    let mut woken = BTreeSet::new();
    while let Some(letters) = walk.next(admin.store.as_ref()).await? {
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
                        examples.push(Skipped {
                            id: letter.id,
                            reason,
                        });
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
    Ok(DeadLetterReplay {
        replayed,
        skipped,
        skipped_examples: examples,
        not_found: walk.missing,
    })
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

/// Deletes the chosen dead letters for good.
#[utoipa::path(post, path = "/api/v1/dead-letters/purge", tag = "dead letters",
    request_body = DeadLetterSelection,
    responses((status = 200, description = "What was purged", body = Purged<i64>),
        (status = 400, description = "A bad selection (none, or more than one way)", body = ErrorBody)))]
async fn purge_dead_letters(admin: &Admin, body: Value) -> Result<Purged<i64>, Refusal> {
    kinds::purge::<DeadLetters>(admin, body).await
}

/// Quarantined bodies, oldest first arrival first, a page at a time.
#[utoipa::path(get, path = "/api/v1/quarantine", tag = "quarantine", params(PageQuery),
    responses((status = 200, description = "One page", body = QuarantinePage),
        (status = 400, description = "A bad parameter", body = ErrorBody)))]
async fn list_quarantine(admin: &Admin, query: &str) -> Result<QuarantinePage, Refusal> {
    kinds::list::<Quarantine>(admin, query).await
}

/// One quarantined body, with the body itself.
#[utoipa::path(get, path = "/api/v1/quarantine/{body_hash}", tag = "quarantine",
    params(("body_hash" = String, Path, description = "The body's SHA-256, hex")),
    responses((status = 200, description = "The body", body = QuarantinedDetail),
        (status = 404, description = "No such body", body = ErrorBody)))]
async fn show_quarantined(admin: &Admin, hash: &str) -> Result<QuarantinedDetail, Refusal> {
    let body = admin
        .store
        .quarantined(hash)
        .await?
        .ok_or_else(|| not_found(format!("no quarantined body {hash}")))?;
    let (text, base64) = text_or_base64(&body.body);
    Ok(QuarantinedDetail {
        summary: quarantined(&body),
        body: text,
        body_base64: base64,
    })
}

/// Parses the chosen bodies again with today's parser; those that parse are
/// routed and committed like new postbacks and leave the quarantine.
#[utoipa::path(post, path = "/api/v1/quarantine/replay", tag = "quarantine",
    request_body = QuarantineSelection,
    responses((status = 200, description = "What became of the bodies", body = QuarantineReplay),
        (status = 400, description = "A bad selection (none, or more than one way)", body = ErrorBody)))]
async fn replay_quarantine(admin: &Admin, body: Value) -> Result<QuarantineReplay, Refusal> {
    let mut walk = Walk::<Quarantine>::choose(body)?;
    let router = admin.router.get();
    let (mut accepted, mut duplicate, mut still_invalid, mut truncated) = (0u64, 0u64, 0u64, 0u64);
    let mut results = Vec::new();
    while let Some(bodies) = walk.next(admin.store.as_ref()).await? {
        for body in bodies {
            let outcome = replay_body(
                &admin.committer,
                admin.store.as_ref(),
                &router,
                &admin.source,
                &body,
            )
            .await?;
            *match &outcome {
                ReplayOutcome::Accepted { .. } => &mut accepted,
                ReplayOutcome::Duplicate { .. } => &mut duplicate,
                ReplayOutcome::StillInvalid { .. } => &mut still_invalid,
                ReplayOutcome::Truncated { .. } => &mut truncated,
            } += 1;
            if results.len() < MAX_RESULTS {
                results.push(BodyReplay {
                    body_hash: body.body_hash,
                    outcome,
                });
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
    Ok(QuarantineReplay {
        accepted,
        duplicate,
        still_invalid,
        truncated,
        results,
        not_found: walk.missing,
    })
}

/// Deletes the chosen quarantined bodies for good.
#[utoipa::path(post, path = "/api/v1/quarantine/purge", tag = "quarantine",
    request_body = QuarantineSelection,
    responses((status = 200, description = "What was purged", body = Purged<String>),
        (status = 400, description = "A bad selection (none, or more than one way)", body = ErrorBody)))]
async fn purge_quarantine(admin: &Admin, body: Value) -> Result<Purged<String>, Refusal> {
    kinds::purge::<Quarantine>(admin, body).await
}
