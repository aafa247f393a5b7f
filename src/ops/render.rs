//! How the CLI prints the API's answers for people: one aligned-table
//! renderer whose columns read typed items, `key: value` records for one
//! item, and the one-line summaries of pauses, replays and purges.

use std::fmt::Display;

use serde::Serialize;
use serde_json::Value;

use crate::admin::model::{
    BodyReplay, DeadLetter, DeadLetterDetail, DeadLetterPage, DeadLetterReplay, PauseState, Purged,
    QuarantinePage, QuarantineReplay, QuarantinedBody, QuarantinedDetail, ReplayOutcome,
    TargetQueue, Targets,
};

/// Characters of an error message kept in a table cell (the rest is `…`).
const ERROR_WIDTH: usize = 60;

/// A table column: its header, which side its cells keep to, and what an
/// item shows in it.
pub(super) struct Column<T> {
    header: &'static str,
    right: bool,
    cell: fn(&T) -> String,
}

/// A column of text, aligned left.
const fn text<T>(header: &'static str, cell: fn(&T) -> String) -> Column<T> {
    Column {
        header,
        right: false,
        cell,
    }
}

/// A column of numbers, aligned right.
const fn number<T>(header: &'static str, cell: fn(&T) -> String) -> Column<T> {
    Column {
        header,
        right: true,
        cell,
    }
}

/// The items under the headers, each column as wide as its widest cell, two
/// spaces apart.
pub(super) fn table<T>(columns: &[Column<T>], items: &[T]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| columns.iter().map(|c| (c.cell)(item)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, column)| {
            rows.iter()
                .map(|row| row[i].chars().count())
                .fold(column.header.len(), usize::max)
        })
        .collect();
    let headers: Vec<String> = columns.iter().map(|c| c.header.to_owned()).collect();
    let mut out = String::new();
    for row in std::iter::once(&headers).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(columns.iter().zip(&widths))
            .map(|(cell, (column, &width))| {
                if column.right {
                    format!("{cell:>width$}")
                } else {
                    format!("{cell:<width$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Text on one line: control characters become spaces.
fn plain(text: impl Display) -> String {
    text.to_string().replace(char::is_control, " ")
}

/// An optional value: `-` when there is none.
fn or_dash<T: Display>(value: Option<T>) -> String {
    value.map(plain).unwrap_or_else(|| "-".into())
}

/// A flag as `yes` or `no`.
fn yes_no(flag: bool) -> String {
    if flag { "yes" } else { "no" }.into()
}

/// An optional text cut to `width` characters.
fn clipped(text: Option<&str>, width: usize) -> String {
    let full = or_dash(text);
    if full.chars().count() <= width {
        return full;
    }
    let kept: String = full.chars().take(width - 1).collect();
    format!("{kept}…")
}

/// An API time (RFC 3339 with milliseconds) to the second.
fn moment(time: Option<&str>) -> String {
    time.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        })
        .unwrap_or_else(|| or_dash(time))
}

/// An age in seconds as people read it: `4.2s`, `3m10s`, `2h`, `1d3h`.
fn age(seconds: Option<f64>) -> String {
    let Some(seconds) = seconds else {
        return "-".into();
    };
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let whole = seconds as u64;
    let (count, unit, rest, rest_unit) = match whole {
        ..3600 => (whole / 60, "m", whole % 60, "s"),
        3600..86400 => (whole / 3600, "h", whole % 3600 / 60, "m"),
        _ => (whole / 86400, "d", whole % 86400 / 3600, "h"),
    };
    match rest {
        0 => format!("{count}{unit}"),
        _ => format!("{count}{unit}{rest}{rest_unit}"),
    }
}

/// The count line under a list, and the cursor of the next page if any.
fn list_footer(next: Option<&str>, count: usize, one: &str, many: &str) -> String {
    let mut footer = format!("{count} {}\n", if count == 1 { one } else { many });
    if let Some(next) = next {
        footer.push_str(&format!("more: --after {next}\n"));
    }
    footer
}

/// `targets`.
pub(super) fn targets(answer: &Targets) -> String {
    const COLUMNS: &[Column<TargetQueue>] = &[
        text("NAME", |t| match t.configured {
            false => format!("{} (not configured)", plain(&t.name)),
            true => plain(&t.name),
        }),
        text("PAUSED", |t| or_dash(t.paused.map(yes_no))),
        number("PENDING", |t| t.pending.to_string()),
        number("DUE", |t| t.due.to_string()),
        number("DEAD", |t| t.dead.to_string()),
        number("OLDEST", |t| age(t.oldest_pending_age_seconds)),
        text("LAST ERROR", |t| {
            clipped(t.last_error.as_deref(), ERROR_WIDTH)
        }),
    ];
    table(COLUMNS, &answer.targets)
}

/// `pause` and `resume`.
pub(super) fn pause_line(answer: &PauseState) -> String {
    let state = match answer.paused {
        true => "paused (it keeps queueing; `resume` to deliver again)",
        false => "delivering",
    };
    format!("{}: {state}\n", plain(&answer.target))
}

/// `dlq list`.
pub(super) fn dead_letters(answer: &DeadLetterPage) -> String {
    const COLUMNS: &[Column<DeadLetter>] = &[
        number("ID", |l| l.id.to_string()),
        text("TARGET", |l| plain(&l.target)),
        text("REASON", |l| plain(&l.reason)),
        number("ATTEMPTS", |l| l.attempts.to_string()),
        number("STATUS", |l| or_dash(l.last_status)),
        text("DEAD AT", |l| moment(l.dead_at.as_deref())),
        text("LAST ERROR", |l| {
            clipped(l.last_error.as_deref(), ERROR_WIDTH)
        }),
    ];
    let letters = &answer.dead_letters;
    table(COLUMNS, letters)
        + &list_footer(
            answer.next.as_deref(),
            letters.len(),
            "dead letter",
            "dead letters",
        )
}

/// `quarantine list`.
pub(super) fn quarantine(answer: &QuarantinePage) -> String {
    const COLUMNS: &[Column<QuarantinedBody>] = &[
        text("HASH", |b| plain(&b.body_hash)),
        text("FIRST SEEN", |b| moment(b.first_seen.as_deref())),
        text("LAST SEEN", |b| moment(b.last_seen.as_deref())),
        number("SEEN", |b| b.seen_count.to_string()),
        number("SIZE", |b| b.size.to_string()),
        // Beyond `quarantine.max_bytes` only a prefix is kept.
        text("KEPT", |b| {
            if b.truncated { "prefix" } else { "whole" }.into()
        }),
        text("CONTENT TYPE", |b| or_dash(b.content_type.as_deref())),
        text("ERROR", |b| clipped(Some(&b.error), ERROR_WIDTH)),
    ];
    let bodies = &answer.quarantine;
    table(COLUMNS, bodies)
        + &list_footer(
            answer.next.as_deref(),
            bodies.len(),
            "quarantined body",
            "quarantined bodies",
        )
}

/// `dlq replay`.
pub(super) fn dead_letters_replayed(answer: &DeadLetterReplay) -> String {
    let mut out = format!("replayed {}, skipped {}\n", answer.replayed, answer.skipped);
    for example in &answer.skipped_examples {
        out.push_str(&format!(
            "  skipped {}: {}\n",
            example.id,
            plain(&example.reason)
        ));
    }
    out + &not_found_line(&answer.not_found)
}

/// `dlq purge` and `quarantine purge`.
pub(super) fn purged<K: Display>(answer: &Purged<K>) -> String {
    format!(
        "purged {}\n{}",
        answer.purged,
        not_found_line(&answer.not_found)
    )
}

/// Ids or hashes that were asked for but are not there (a typo?).
fn not_found_line<K: Display>(missing: &[K]) -> String {
    if missing.is_empty() {
        return String::new();
    }
    let missing: Vec<String> = missing.iter().map(plain).collect();
    format!("not found: {}\n", missing.join(" "))
}

/// `quarantine replay`: the counts, then what became of each body.
pub(super) fn quarantine_replayed(answer: &QuarantineReplay) -> String {
    const COLUMNS: &[Column<BodyReplay>] = &[
        text("HASH", |r| plain(&r.body_hash)),
        text("OUTCOME", |r| outcome(&r.outcome).0.into()),
        text("DETAIL", |r| outcome(&r.outcome).1),
    ];
    let summary = format!(
        "accepted {}, duplicate {}, still invalid {}, truncated {}\n{}",
        answer.accepted,
        answer.duplicate,
        answer.still_invalid,
        answer.truncated,
        not_found_line(&answer.not_found)
    );
    if answer.results.is_empty() {
        summary
    } else {
        summary + &table(COLUMNS, &answer.results)
    }
}

/// A replayed body's outcome as the API names it, and its detail: the new
/// id and targets, the postback it duplicates, or why it still fails.
fn outcome(outcome: &ReplayOutcome) -> (&'static str, String) {
    match outcome {
        ReplayOutcome::Accepted { id, targets } => {
            let targets: Vec<String> = targets.iter().map(plain).collect();
            (
                "accepted",
                format!("id {} → {}", plain(id), targets.join(", ")),
            )
        }
        ReplayOutcome::Duplicate { original_id } => {
            ("duplicate", format!("of {}", plain(original_id)))
        }
        ReplayOutcome::StillInvalid { error } => {
            ("still_invalid", clipped(Some(error), ERROR_WIDTH))
        }
        ReplayOutcome::Truncated { error } => ("truncated", clipped(Some(error), ERROR_WIDTH)),
    }
}

/// `dlq show`.
pub(super) fn dead_letter(answer: &DeadLetterDetail) -> String {
    const FIRST: &[&str] = &[
        "id",
        "event_id",
        "target",
        "reason",
        "attempts",
        "last_status",
        "last_error",
        "dead_at",
        "received_at",
        "content_type",
    ];
    record(answer, FIRST, &["envelope", "raw_body", "raw_body_base64"])
}

/// `quarantine show`.
pub(super) fn quarantined(answer: &QuarantinedDetail) -> String {
    const FIRST: &[&str] = &[
        "body_hash",
        "content_type",
        "size",
        "truncated",
        "seen_count",
        "first_seen",
        "last_seen",
        "error",
    ];
    record(answer, FIRST, &["body", "body_base64"])
}

/// A value as a one-line field of a record.
fn field(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::Bool(flag) => yes_no(*flag),
        Value::String(text) => plain(text),
        other => other.to_string(),
    }
}

/// One answer as aligned `key: value` lines, the `first` keys in that order
/// and then any other one-line field; then each long field (`blocks`, and any
/// object or array) under its name.
fn record<T: Serialize>(answer: &T, first: &[&str], blocks: &[&str]) -> String {
    let answer = serde_json::to_value(answer).unwrap_or_default();
    let Some(object) = answer.as_object() else {
        return format!("{answer:#}\n");
    };
    let mut keys: Vec<&str> = first
        .iter()
        .copied()
        .filter(|key| object.contains_key(*key))
        .collect();
    keys.extend(
        object
            .keys()
            .map(String::as_str)
            .filter(|key| !first.contains(key)),
    );
    let (long, short): (Vec<&str>, Vec<&str>) = keys.into_iter().partition(|key| {
        blocks.contains(key) || object[*key].is_object() || object[*key].is_array()
    });
    let width = short.iter().map(|key| key.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for key in short {
        let label = format!("{key}:");
        out.push_str(&format!("{label:<width$} {}\n", field(&object[key])));
    }
    for key in long {
        match &object[key] {
            Value::String(text) => out.push_str(&format!("{key}:\n{text}\n")),
            other => out.push_str(&format!("{key}:\n{other:#}\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_people_say_them() {
        for (seconds, said) in [
            (4.23, "4.2s"),
            (190.0, "3m10s"),
            (7200.0, "2h"),
            (7260.0, "2h1m"),
            (97200.0, "1d3h"),
        ] {
            assert_eq!(age(Some(seconds)), said);
        }
        assert_eq!(age(None), "-");
    }

    #[test]
    fn tables_align_their_columns() {
        let items = [("a", 7, "x"), ("long name", 12, "-")];
        let columns: &[Column<(&str, i32, &str)>] = &[
            text("NAME", |r| r.0.into()),
            number("N", |r| r.1.to_string()),
            text("LAST", |r| r.2.into()),
        ];
        assert_eq!(
            table(columns, &items),
            "NAME        N  LAST\na           7  x\nlong name  12  -\n"
        );
    }
}
