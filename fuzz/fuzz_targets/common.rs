//! Shared by the fuzz targets: which format a body sniffs as, and the
//! invariants every parse result must satisfy.

#![allow(dead_code)]

use postback_relay::postback::{canonical_name, limits, Format, ParseError, Postback};
use serde_json::Value;

/// The format `postback::parse` will pick for `data`, or `None` when the body
/// never reaches a reader (invalid UTF-8, empty, neither `<` nor `{`/`[`).
pub fn sniff(data: &[u8]) -> Option<Format> {
    let text = std::str::from_utf8(data).ok()?;
    match text
        .trim_start_matches('\u{feff}')
        .trim_start()
        .as_bytes()
        .first()?
    {
        b'<' => Some(Format::Xml),
        b'{' | b'[' => Some(Format::Json),
        _ => None,
    }
}

/// Checks what `parse` returned; panics (a finding) when an invariant breaks.
pub fn check_parsed(result: &Result<Postback, ParseError>, expected: Option<Format>) {
    match result {
        Ok(postback) => check_postback(postback, expected),
        Err(err) => assert!(!err.to_string().is_empty(), "empty error message: {err:?}"),
    }
}

fn check_postback(postback: &Postback, expected: Option<Format>) {
    if let Some(format) = expected {
        assert_eq!(postback.format, format);
    }
    for required in ["origin", "code"] {
        match postback.fields.get(required) {
            Some(Value::String(value)) => {
                assert!(!value.trim().is_empty(), "blank `{required}` accepted")
            }
            other => panic!("`{required}` is {other:?}"),
        }
    }
    assert!(!postback.origin().is_empty() && !postback.code().is_empty());
    assert!(postback.files.len() <= limits::MAX_FILES, "too many files");
    if let Some(id) = postback.tracking_id() {
        assert!(!id.is_empty());
    }
    for (key, value) in &postback.fields {
        check_value(key, value);
    }
}

/// Keys are canonical (a fixed point of `canonical_name`) and every leaf is a string.
fn check_value(key: &str, value: &Value) {
    assert_eq!(canonical_name(key), key, "key {key:?} is not canonical");
    match value {
        Value::String(_) => {}
        Value::Array(items) => items.iter().for_each(check_leaves),
        Value::Object(object) => object.iter().for_each(|(k, v)| check_value(k, v)),
        other => panic!("field {key:?} has a non-string leaf {other:?}"),
    }
}

fn check_leaves(value: &Value) {
    match value {
        Value::String(_) => {}
        Value::Array(items) => items.iter().for_each(check_leaves),
        Value::Object(object) => object.iter().for_each(|(k, v)| check_value(k, v)),
        other => panic!("non-string leaf {other:?}"),
    }
}
