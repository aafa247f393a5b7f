//! The admin API's JSON field names, nesting and null-versus-absent, as
//! docs/admin-api.md promises them: operators' scripts read these answers,
//! so renaming a field of `postback_relay::admin::model` must fail here.
//! Each type is written and read back.

use postback_relay::admin::model::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// `value` is written as exactly `wire`, and `wire` reads back as `value`.
fn pinned<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: T, wire: Value) {
    assert_eq!(serde_json::to_value(&value).unwrap(), wire);
    assert_eq!(serde_json::from_value::<T>(wire).unwrap(), value);
}

fn letter() -> DeadLetter {
    DeadLetter {
        id: 17,
        event_id: "01JDX".into(),
        target: "crm".into(),
        reason: "max attempts reached".into(),
        attempts: 10,
        last_status: None,
        last_error: Some("HTTP 503".into()),
        dead_at: Some("2026-11-27T13:00:00.123Z".into()),
        received_at: None,
    }
}

fn letter_json() -> Value {
    json!({"id": 17, "event_id": "01JDX", "target": "crm", "reason": "max attempts reached",
        "attempts": 10, "last_status": null, "last_error": "HTTP 503",
        "dead_at": "2026-11-27T13:00:00.123Z", "received_at": null})
}

fn body() -> QuarantinedBody {
    QuarantinedBody {
        body_hash: "9f86d0".into(),
        content_type: None,
        error: "XML: bad".into(),
        size: 812,
        truncated: false,
        first_seen: Some("2023-11-14T22:13:20.000Z".into()),
        last_seen: None,
        seen_count: 6,
    }
}

fn body_json() -> Value {
    json!({"body_hash": "9f86d0", "content_type": null, "error": "XML: bad", "size": 812,
        "truncated": false, "first_seen": "2023-11-14T22:13:20.000Z", "last_seen": null,
        "seen_count": 6})
}

#[test]
fn targets_and_pauses() {
    pinned(
        Targets {
            targets: vec![TargetQueue {
                name: "crm".into(),
                configured: true,
                paused: None,
                pending: 12,
                due: 3,
                dead: 1,
                oldest_pending_age_seconds: Some(4.2),
                last_error: None,
            }],
        },
        json!({"targets": [{"name": "crm", "configured": true, "paused": null, "pending": 12,
            "due": 3, "dead": 1, "oldest_pending_age_seconds": 4.2, "last_error": null}]}),
    );
    pinned(
        PauseState {
            target: "crm".into(),
            paused: true,
        },
        json!({"target": "crm", "paused": true}),
    );
    pinned(ErrorBody { error: "no".into() }, json!({"error": "no"}));
}

#[test]
fn dead_letters() {
    pinned(
        DeadLetterPage {
            dead_letters: vec![letter()],
            next: None,
        },
        json!({"dead_letters": [letter_json()], "next": null}),
    );
    let mut detail = letter_json();
    let extra = json!({"envelope": {"subject": "T-1"}, "content_type": "text/xml",
        "raw_body_base64": "/w=="});
    detail
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let (raw_body, raw_body_base64) = text_or_base64(&[0xff]);
    pinned(
        DeadLetterDetail {
            letter: letter(),
            envelope: json!({"subject": "T-1"}),
            content_type: Some("text/xml".into()),
            raw_body,
            raw_body_base64,
        },
        detail,
    );
    pinned(
        DeadLetterReplay {
            replayed: 2,
            skipped: 1,
            skipped_examples: vec![Skipped {
                id: 18,
                reason: "target `old` is not configured".into(),
            }],
            not_found: vec![999],
        },
        json!({"replayed": 2, "skipped": 1, "not_found": [999],
            "skipped_examples": [{"id": 18, "reason": "target `old` is not configured"}]}),
    );
    pinned(
        Purged {
            purged: 2,
            not_found: vec![7i64],
        },
        json!({"purged": 2, "not_found": [7]}),
    );
}

#[test]
fn quarantine() {
    pinned(
        QuarantinePage {
            quarantine: vec![body()],
            next: Some("1700000000000.9f86d0".into()),
        },
        json!({"quarantine": [body_json()], "next": "1700000000000.9f86d0"}),
    );
    let mut detail = body_json();
    detail["body"] = json!("<postback/>");
    pinned(
        QuarantinedDetail {
            summary: body(),
            body: Some("<postback/>".into()),
            body_base64: None,
        },
        detail,
    );
    let result = |outcome| BodyReplay {
        body_hash: "h".into(),
        outcome,
    };
    pinned(
        QuarantineReplay {
            accepted: 1,
            duplicate: 1,
            still_invalid: 1,
            truncated: 1,
            results: vec![
                result(ReplayOutcome::Accepted {
                    id: "01JD".into(),
                    targets: vec!["crm".into()],
                }),
                result(ReplayOutcome::Duplicate {
                    original_id: "01JC".into(),
                }),
                result(ReplayOutcome::StillInvalid { error: "e".into() }),
                result(ReplayOutcome::Truncated { error: "t".into() }),
            ],
            not_found: vec!["x".into()],
        },
        json!({"accepted": 1, "duplicate": 1, "still_invalid": 1, "truncated": 1,
            "not_found": ["x"], "results": [
                {"body_hash": "h", "outcome": "accepted", "id": "01JD", "targets": ["crm"]},
                {"body_hash": "h", "outcome": "duplicate", "original_id": "01JC"},
                {"body_hash": "h", "outcome": "still_invalid", "error": "e"},
                {"body_hash": "h", "outcome": "truncated", "error": "t"}]}),
    );
}

#[test]
fn selections_carry_only_what_was_chosen() {
    pinned(
        DeadLetterSelection {
            all: true,
            ..Default::default()
        },
        json!({"all": true}),
    );
    pinned(
        DeadLetterSelection {
            ids: vec![17, 18],
            ..Default::default()
        },
        json!({"ids": [17, 18]}),
    );
    pinned(
        DeadLetterSelection {
            target: Some("crm".into()),
            reason: Some("no route".into()),
            since: Some(TimeArg::Text("2026-11-27T00:00:00Z".into())),
            until: Some(TimeArg::Millis(1700000000000)),
            ..Default::default()
        },
        json!({"target": "crm", "reason": "no route", "since": "2026-11-27T00:00:00Z",
            "until": 1700000000000i64}),
    );
    pinned(
        QuarantineSelection {
            hashes: vec!["9f86d0".into()],
            ..Default::default()
        },
        json!({"hashes": ["9f86d0"]}),
    );
    pinned(
        QuarantineSelection {
            since: Some(TimeArg::Text("0".into())),
            ..Default::default()
        },
        json!({"since": "0"}),
    );
    for unknown in [
        json!({"bogus": 1}),
        json!({"hashes": ["h"], "target": "crm"}),
    ] {
        assert!(serde_json::from_value::<QuarantineSelection>(unknown).is_err());
    }
    assert!(serde_json::from_value::<DeadLetterSelection>(json!({"hashes": []})).is_err());
}
