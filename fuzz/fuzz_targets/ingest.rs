//! The whole pure ingest path: Content-Type + body → `postback::parse` →
//! `Envelope::new` → `to_json`, checking the envelope's invariants (the ones
//! `schema/envelope.schema.json` states). Never panics.
//!
//! Input layout: the first byte picks the Content-Type (see [`content_type`]),
//! the rest is the body.

#![no_main]

use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use postback_relay::envelope::{event_type, Envelope};
use postback_relay::postback::{parse, Postback};
use serde_json::{Map, Value};

mod common;

const ID: &str = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
const SOURCE: &str = "sinch:mms";

/// Splits the input into a Content-Type (or none) and a body. Selector 7 takes
/// the Content-Type from the input itself, up to the first newline.
fn content_type(data: &[u8]) -> Option<(Option<String>, &[u8])> {
    let (&selector, rest) = data.split_first()?;
    let fixed = |ct: &str| Some((Some(ct.to_owned()), rest));
    match selector % 8 {
        0 => Some((None, rest)),
        1 => fixed("text/xml"),
        2 => fixed("application/xml; charset=utf-8"),
        3 => fixed("application/json"),
        4 => fixed("application/json; charset=UTF-8"),
        5 => fixed("text/plain"),
        6 => fixed("application/x-www-form-urlencoded"),
        _ => {
            let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
            let ct = String::from_utf8_lossy(&rest[..end]).into_owned();
            Some((Some(ct), rest.get(end + 1..).unwrap_or_default()))
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((content_type, body)) = content_type(data) else {
        return;
    };
    let result = parse(body, content_type.as_deref());
    common::check_parsed(&result, common::sniff(body));
    if let Ok(postback) = result {
        let received = Utc::now();
        let envelope = Envelope::new(&postback, ID.to_owned(), SOURCE, received);
        check_envelope(&postback, &envelope.to_json());
    }
});

fn check_envelope(postback: &Postback, bytes: &[u8]) {
    let json: Value = serde_json::from_slice(bytes).expect("the envelope re-parses");
    let envelope = json.as_object().expect("the envelope is an object");
    assert_eq!(envelope["specversion"], "1.0");
    assert_eq!(envelope["id"], ID);
    assert_eq!(envelope["source"], SOURCE);
    assert_eq!(envelope["datacontenttype"], "application/json");
    assert_eq!(envelope["type"], event_type(postback.origin()));
    assert_eq!(envelope["sourceformat"], postback.format.as_str());
    assert_eq!(
        envelope.get("subject").and_then(Value::as_str),
        postback.tracking_id()
    );
    for attribute in ["time", "receivedtime"] {
        let text = envelope[attribute].as_str().expect("a time is a string");
        assert!(
            is_utc_rfc3339(text),
            "{attribute} {text:?} is not RFC 3339 UTC"
        );
    }
    let allowed = [
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "receivedtime",
        "sourceformat",
        "data",
    ];
    assert!(envelope.keys().all(|key| allowed.contains(&key.as_str())));

    let data = envelope["data"].as_object().expect("data is an object");
    for required in ["origin", "code"] {
        let value = data[required]
            .as_str()
            .expect("origin and code are strings");
        assert!(!value.is_empty(), "data.{required} is empty");
    }
    for (key, value) in data {
        if key != "files" {
            assert!(only_strings(value), "data.{key} is {value}");
        }
    }
    check_files(data, postback);
    // Every postback field reaches the envelope unchanged.
    for (key, value) in &postback.fields {
        assert_eq!(data.get(key), Some(value), "field {key:?} lost or changed");
    }
}

/// `files`, when present, is the content list: `[{"url": "..."}, ...]`, in order.
fn check_files(data: &Map<String, Value>, postback: &Postback) {
    let Some(files) = data.get("files") else {
        assert!(postback.files.is_empty(), "content files dropped");
        return;
    };
    let files = files.as_array().expect("data.files is a list");
    assert!(!files.is_empty(), "an empty files list is left out");
    let urls: Vec<&str> = files
        .iter()
        .map(|file| {
            let file = file.as_object().expect("a file is an object");
            assert_eq!(file.len(), 1, "a file is {{url}} only: {file:?}");
            file["url"].as_str().expect("a file url is a string")
        })
        .collect();
    assert_eq!(urls, postback.files);
}

fn only_strings(value: &Value) -> bool {
    match value {
        Value::String(_) => true,
        Value::Array(items) => items.iter().all(only_strings),
        Value::Object(object) => object.values().all(only_strings),
        _ => false,
    }
}

/// `^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$`, and a real instant.
fn is_utc_rfc3339(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|part| part.iter().all(u8::is_ascii_digit))
    };
    let shape = bytes.len() >= 20
        && digits(0..4)
        && bytes[4] == b'-'
        && digits(5..7)
        && bytes[7] == b'-'
        && digits(8..10)
        && bytes[10] == b'T'
        && digits(11..13)
        && bytes[13] == b':'
        && digits(14..16)
        && bytes[16] == b':'
        && digits(17..19)
        && bytes[bytes.len() - 1] == b'Z'
        && match &bytes[19..bytes.len() - 1] {
            [] => true,
            [b'.', fraction @ ..] => {
                !fraction.is_empty() && fraction.iter().all(u8::is_ascii_digit)
            }
            _ => false,
        };
    shape && DateTime::parse_from_rfc3339(text).is_ok()
}
