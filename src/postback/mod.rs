//! Postback parsing: turns a Sinch body (XML or JSON, sniffed, never trusted from
//! the Content-Type alone) into one tolerant, canonical [`Postback`].
//!
//! Both formats are first read into a plain JSON tree by their own module
//! (`xml`, `json`); everything the aggregator is inconsistent about (tag case,
//! hyphens, wrappers, numbers for strings, the shape of the content list) is then
//! folded in one place, `Postback::from_tree`, so XML and JSON can never drift.

mod json;
mod xml;

use serde_json::{Map, Value};

/// The wire format a postback arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `<postback>...</postback>`
    Xml,
    /// `{"origin": ...}`
    Json,
}

impl Format {
    /// Lowercase name used in metrics labels and the envelope.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Xml => "xml",
            Format::Json => "json",
        }
    }
}

/// Why a body is not a postback. The message goes back to the sender (the
/// 400 body), into the log line and into the quarantine's `error`: every
/// part that can hold input (the body's start, a parser's message quoting a
/// tag name) is an [`Excerpt`], so a hostile body cannot make any of them long.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Zero bytes, or only white space.
    #[error("empty body")]
    Empty,
    /// Neither `<` nor `{` starts the body.
    #[error("body is neither XML nor JSON (it starts with \"{0}\")")]
    UnknownFormat(Excerpt),
    /// Postbacks are text; anything else is refused before parsing.
    #[error("body is not valid UTF-8 (invalid byte at offset {0})")]
    InvalidUtf8(usize),
    /// The XML reader gave up.
    #[error("invalid XML: {0}")]
    Xml(Excerpt),
    /// serde_json gave up.
    #[error("invalid JSON: {0}")]
    Json(Excerpt),
    /// Parsed, but the top level is not an object of fields (our own text, no input).
    #[error("{0}")]
    Shape(String),
    /// `origin` or `code` is absent or empty.
    #[error("missing required field `{0}`")]
    MissingField(&'static str),
    /// Bigger or deeper than any real postback (see [`limits`]; our own text, no input).
    #[error("{0}")]
    Limit(String),
}

/// A text that may quote the body, made safe to echo: at most
/// [`Excerpt::MAX_CHARS`] characters, control and other non-printable
/// characters escaped (`\n`, `\u{202e}`), and when cut, `…` and the text's
/// whole length in bytes. Parse errors can only be built through it, so
/// neither the 400 body nor the log line nor the quarantine's `error` can
/// carry a 20 KB tag name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excerpt(String);

impl Excerpt {
    /// Characters kept, counted after escaping: room for a parser's own
    /// message (up to ~80 characters, e.g. quick-xml's "expected `</a>`, but
    /// `</b>` was found" with its position) with short names quoted whole.
    pub const MAX_CHARS: usize = 96;

    /// The excerpt of `text`.
    pub fn new(text: &str) -> Excerpt {
        let mut out = String::new();
        let mut kept = 0;
        for (at, ch) in text.char_indices() {
            let escaped: String = if ch == ' ' || ch == '"' || ch == '\'' {
                ch.to_string()
            } else {
                ch.escape_debug().collect()
            };
            let width = escaped.chars().count();
            if kept + width > Excerpt::MAX_CHARS {
                if at < text.len() {
                    out.push_str(&format!("… ({} bytes)", text.len()));
                }
                return Excerpt(out);
            }
            kept += width;
            out.push_str(&escaped);
        }
        Excerpt(out)
    }
}

impl std::ops::Deref for Excerpt {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Excerpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Bounds no real postback comes near; they keep hostile bodies cheap.
pub mod limits {
    /// Nesting of elements or objects (root, wrapper, content, file, ...).
    pub const MAX_DEPTH: usize = 16;
    /// Fields and list items in the whole document.
    pub const MAX_VALUES: usize = 1_000;
    /// Content files of one postback (MMS carriers allow a handful).
    pub const MAX_FILES: usize = 100;
    /// Bytes of one field value (a long subject or a content URL is far below).
    pub const MAX_FIELD_BYTES: usize = 64 * 1024;
}

/// One postback with canonical field names; all scalar values are strings.
#[derive(Debug, Clone, PartialEq)]
pub struct Postback {
    /// Format it arrived in.
    pub format: Format,
    /// Every field under its canonical name (see [`canonical_name`]), including
    /// unknown ones; `content` (and a field named `files`) has been lifted into `files`.
    pub fields: Map<String, Value>,
    /// URLs of the MMS content files, in order.
    pub files: Vec<String>,
}

impl Postback {
    /// The value of a string field, if present.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(Value::as_str)
    }

    /// `MMS_MO`, `MMS_MT`, `SMS_MO`, ...; always present.
    pub fn origin(&self) -> &str {
        self.field("origin").unwrap_or_default()
    }

    /// `N401`, `N102`, `E101`, ...; always present.
    pub fn code(&self) -> &str {
        self.field("code").unwrap_or_default()
    }

    /// Sinch's id for the message; N101 and N102 of one message share it.
    pub fn tracking_id(&self) -> Option<&str> {
        self.field("tracking_id").filter(|id| !id.is_empty())
    }

    /// Builds a postback from a tree produced by the XML or JSON reader.
    fn from_tree(format: Format, tree: Value) -> Result<Postback, ParseError> {
        check_limits(&tree)?;
        let Value::Object(top) = tree else {
            return Err(ParseError::Shape(
                "top level must be an object of postback fields".into(),
            ));
        };
        let mut fields = canonical_object(top);
        // One optional wrapper (`<POSTBACK><NOTIFICATION>...`): descend into it
        // when the fields are not at the top.
        if !fields.contains_key("origin") && !fields.contains_key("code") && fields.len() == 1 {
            if let Some(Value::Object(inner)) = fields.values().next() {
                fields = inner.clone();
            }
        }
        // `files` is where the envelope puts the content URLs, so a field of
        // that name can only be another spelling of `content`.
        let mut files = Vec::new();
        for name in ["content", "files"] {
            let Some(value) = fields.remove(name) else {
                continue;
            };
            match content_files(&value) {
                Some(urls) => files.extend(urls),
                // A shape we do not know: keep it rather than drop it.
                None if name == "content" => {
                    fields.insert(name.into(), value);
                }
                None => {
                    return Err(ParseError::Shape(
                        "field `files` is not a list of content file URLs".into(),
                    ))
                }
            }
        }
        if files.len() > limits::MAX_FILES {
            return Err(ParseError::Limit(format!(
                "too many content files: {} (at most {})",
                files.len(),
                limits::MAX_FILES
            )));
        }
        for required in ["origin", "code"] {
            match fields.get(required) {
                Some(Value::String(value)) if !value.trim().is_empty() => {}
                _ => return Err(ParseError::MissingField(required)),
            }
        }
        Ok(Postback {
            format,
            fields,
            files,
        })
    }
}

/// Parses a body; `content_type` is only a hint for bodies that sniffing cannot decide.
pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<Postback, ParseError> {
    let text =
        std::str::from_utf8(body).map_err(|err| ParseError::InvalidUtf8(err.valid_up_to()))?;
    let text = text.trim_start_matches('\u{feff}');
    let trimmed = text.trim_start();
    let format = match trimmed.as_bytes().first() {
        None => return Err(ParseError::Empty),
        Some(b'<') => Format::Xml,
        Some(b'{') | Some(b'[') => Format::Json,
        Some(_) => match content_type.map(str::to_ascii_lowercase) {
            // The hint only helps to name the error: a body that starts with
            // neither `<` nor `{` is neither format.
            Some(ct) if ct.contains("json") => {
                return Err(ParseError::Json(Excerpt::new(&format!(
                    "expected `{{` at the start, found \"{trimmed}"
                ))))
            }
            Some(ct) if ct.contains("xml") => {
                return Err(ParseError::Xml(Excerpt::new(&format!(
                    "expected `<` at the start, found \"{trimmed}"
                ))))
            }
            _ => return Err(ParseError::UnknownFormat(Excerpt::new(trimmed))),
        },
    };
    let tree = match format {
        Format::Xml => xml::read_tree(trimmed)?,
        Format::Json => json::read_tree(trimmed)?,
    };
    Postback::from_tree(format, tree)
}

/// Refuses trees deeper, larger or with longer values than [`limits`] allow,
/// before any of it is copied.
fn check_limits(tree: &Value) -> Result<(), ParseError> {
    let mut values = 0usize;
    let mut stack = vec![(tree, 1usize)];
    while let Some((value, depth)) = stack.pop() {
        if depth > limits::MAX_DEPTH {
            return Err(ParseError::Limit(format!(
                "nested deeper than {} levels",
                limits::MAX_DEPTH
            )));
        }
        values += 1;
        if values > limits::MAX_VALUES {
            return Err(ParseError::Limit(format!(
                "more than {} fields",
                limits::MAX_VALUES
            )));
        }
        match value {
            Value::String(text) if text.len() > limits::MAX_FIELD_BYTES => {
                return Err(ParseError::Limit(format!(
                    "a field value is longer than {} bytes",
                    limits::MAX_FIELD_BYTES
                )));
            }
            Value::Array(items) => stack.extend(items.iter().map(|item| (item, depth + 1))),
            Value::Object(object) => {
                for (key, item) in object {
                    if key.len() > limits::MAX_FIELD_BYTES {
                        return Err(ParseError::Limit("a field name is too long".into()));
                    }
                    stack.push((item, depth + 1));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The canonical name of a field: lowercase, `-` → `_`, known aliases folded
/// (`TRACKINGID` → `tracking_id`, `subject` → `message_subject`).
pub fn canonical_name(raw: &str) -> String {
    let lower = raw.trim().to_ascii_lowercase().replace('-', "_");
    let compact: String = lower.chars().filter(|c| *c != '_').collect();
    let alias = match compact.as_str() {
        "trackingid" => "tracking_id",
        "operatorid" => "operator_id",
        "operatorname" => "operator_name",
        "messagesubject" | "subject" => "message_subject",
        "statusdetails" => "status_details",
        "mmsid" => "mms_id",
        "sentas" => "sent_as",
        "clientreference" => "client_reference",
        "campaignref" => "campaign_ref",
        "copyto" => "copy_to",
        _ => return lower,
    };
    alias.to_owned()
}

/// Canonical names for every key and strings for every scalar, recursively.
/// `null` carries no value and is dropped.
fn canonical_object(object: Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in object {
        if let Some(value) = canonical_value(value) {
            out.insert(canonical_name(&key), value);
        }
    }
    out
}

fn canonical_value(value: Value) -> Option<Value> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(b) => Value::String(b.to_string()),
        Value::Number(n) => Value::String(n.to_string()),
        Value::String(s) => Value::String(s),
        Value::Array(items) => {
            Value::Array(items.into_iter().filter_map(canonical_value).collect())
        }
        Value::Object(object) => Value::Object(canonical_object(object)),
    })
}

/// The file URLs of a `content` value in any of the shapes seen: XML's
/// `{"file": url | [url, ...]}`, JSON's `[{"file": url}, ...]`, or a plain list.
fn content_files(content: &Value) -> Option<Vec<String>> {
    fn file_of(item: &Value) -> Option<Vec<String>> {
        match item {
            Value::String(url) => Some(vec![url.clone()]),
            Value::Object(object) if object.len() == 1 => match object.get("file")? {
                Value::String(url) => Some(vec![url.clone()]),
                Value::Array(urls) => urls.iter().map(|u| u.as_str().map(str::to_owned)).collect(),
                _ => None,
            },
            _ => None,
        }
    }
    match content {
        // `<content></content>`: no files.
        Value::String(s) if s.trim().is_empty() => Some(Vec::new()),
        Value::Array(items) => {
            let mut files = Vec::new();
            for item in items {
                files.extend(file_of(item)?);
            }
            Some(files)
        }
        other => file_of(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_XML: &str = include_str!("../../tests/fixtures/seed-mo.xml");

    #[test]
    fn seed_xml_parses_with_all_fields() {
        let p = parse(SEED_XML.as_bytes(), Some("text/xml")).unwrap();
        assert_eq!(p.format, Format::Xml);
        assert_eq!(p.origin(), "MMS_MO");
        assert_eq!(p.code(), "N401");
        assert_eq!(p.tracking_id(), Some("MMS_MO_iLnCRrL6"));
        assert_eq!(p.field("operator_id"), Some("31002"));
        assert_eq!(p.field("message_subject"), Some(""));
        assert_eq!(p.files.len(), 3);
    }

    #[test]
    fn xml_and_json_of_the_same_postback_are_equal_but_for_format() {
        let json = r#"{"origin":"MMS_MO","code":"N401","from":"14082257140","to":"28444",
            "keyword":"all","tracking-id":"MMS_MO_iLnCRrL6","operator-id":31002,
            "timestamp":"2014-02-03T11:19:49-05:00","message-subject":"",
            "content":[{"file":"URL of Content Here"},{"file":"URL of Content Here"},{"file":"URL of Content Here"}]}"#;
        let from_xml = parse(SEED_XML.as_bytes(), None).unwrap();
        let from_json = parse(json.as_bytes(), None).unwrap();
        assert_eq!(from_xml.fields, from_json.fields);
        assert_eq!(from_xml.files, from_json.files);
    }

    #[test]
    fn legacy_uppercase_xml_with_wrapper_and_single_quoted_prolog() {
        let body = "<?xml version='1.0'?>\n<POSTBACK><NOTIFICATION><ORIGIN>MMS_MT</ORIGIN>\
            <CODE>N102</CODE><TRACKINGID>abc</TRACKINGID><SUBJECT>hi</SUBJECT><SPID>7</SPID>\
            </NOTIFICATION></POSTBACK>";
        let p = parse(body.as_bytes(), Some("application/xml; charset=utf-8")).unwrap();
        assert_eq!(p.origin(), "MMS_MT");
        assert_eq!(p.code(), "N102");
        assert_eq!(p.tracking_id(), Some("abc"));
        assert_eq!(p.field("message_subject"), Some("hi"));
        assert_eq!(p.field("spid"), Some("7"));
    }

    #[test]
    fn field_name_spellings_fold_to_one() {
        for spelling in [
            "tracking-id",
            "tracking_id",
            "trackingid",
            "TRACKING-ID",
            "TrackingId",
        ] {
            assert_eq!(canonical_name(spelling), "tracking_id", "{spelling}");
        }
        assert_eq!(canonical_name("status-details"), "status_details");
        assert_eq!(canonical_name("x-custom-thing"), "x_custom_thing");
    }

    #[test]
    fn unknown_fields_and_copy_to_lists_are_kept() {
        let json = r#"{"origin":"MMS_MO","code":"N401","copy-to":[{"number":14085551212},{"number":"14085551313"}],"shiny":true}"#;
        let p = parse(json.as_bytes(), None).unwrap();
        assert_eq!(
            p.fields["copy_to"],
            serde_json::json!([{"number": "14085551212"}, {"number": "14085551313"}])
        );
        assert_eq!(p.field("shiny"), Some("true"));
    }

    #[test]
    fn missing_origin_or_code_is_an_error() {
        assert_eq!(
            parse(b"<postback><code>N401</code></postback>", None),
            Err(ParseError::MissingField("origin"))
        );
        assert_eq!(
            parse(br#"{"origin":"MMS_MO","code":""}"#, None),
            Err(ParseError::MissingField("code"))
        );
    }

    #[test]
    fn garbage_is_named_clearly() {
        assert_eq!(parse(b"  \n", None), Err(ParseError::Empty));
        assert!(matches!(
            parse(b"hello", None),
            Err(ParseError::UnknownFormat(_))
        ));
        assert_eq!(parse(b"<a>\xff</a>", None), Err(ParseError::InvalidUtf8(3)));
        assert!(matches!(
            parse(b"{\"origin\":", None),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            parse(b"<postback><origin>", None),
            Err(ParseError::Xml(_))
        ));
        assert!(matches!(parse(b"[1,2]", None), Err(ParseError::Shape(_))));
    }

    #[test]
    fn an_excerpt_is_short_escaped_and_says_what_was_cut() {
        assert_eq!(&*Excerpt::new("short \"text\""), "short \"text\"");
        assert_eq!(
            &*Excerpt::new("a\nb\u{1b}[31m\u{202e}c"),
            "a\\nb\\u{1b}[31m\\u{202e}c"
        );
        let long = "x".repeat(20_000);
        let cut = Excerpt::new(&long);
        assert!(cut.starts_with(&"x".repeat(Excerpt::MAX_CHARS)));
        assert!(cut.ends_with("… (20000 bytes)"), "{cut}");
        assert!(cut.chars().count() < Excerpt::MAX_CHARS + 20);
        let exact = "y".repeat(Excerpt::MAX_CHARS);
        assert_eq!(&*Excerpt::new(&exact), exact.as_str());
    }

    #[test]
    fn parse_errors_never_echo_more_than_an_excerpt() {
        let name = "t".repeat(20 * 1024);
        let bodies = [
            format!("<postback><{name}>1</{name}x></postback>"),
            format!("<postback><{name}>1</postback>"),
            format!("<postback>&{name};</postback>"),
            format!("{{\"origin\":\"MMS_MO\",\"{name}\":1,}}"),
            format!("\u{1}{name}"),
        ];
        for body in &bodies {
            for content_type in [None, Some("application/json"), Some("text/xml")] {
                let Err(err) = parse(body.as_bytes(), content_type) else {
                    panic!("{:.40} parsed", body)
                };
                let message = err.to_string();
                assert!(
                    message.len() < 200,
                    "{} bytes: {message:.300}",
                    message.len()
                );
                assert!(!message.contains('\u{1}'), "{message}");
            }
        }
    }

    #[test]
    fn hostile_sizes_are_refused() {
        let many_files: String = (0..=limits::MAX_FILES)
            .map(|i| format!("<file>u{i}</file>"))
            .collect();
        let body = format!("<postback><origin>MMS_MO</origin><code>N401</code><content>{many_files}</content></postback>");
        assert!(
            matches!(parse(body.as_bytes(), None), Err(ParseError::Limit(m)) if m.contains("files"))
        );
        let long = "x".repeat(limits::MAX_FIELD_BYTES + 1);
        let body = format!(r#"{{"origin":"MMS_MO","code":"N401","keyword":"{long}"}}"#);
        assert!(
            matches!(parse(body.as_bytes(), None), Err(ParseError::Limit(m)) if m.contains("longer"))
        );
        let deep = format!(
            r#"{{"origin":"MMS_MO","code":"N401","x":{}1{}}}"#,
            "[".repeat(20),
            "]".repeat(20)
        );
        assert!(
            matches!(parse(deep.as_bytes(), None), Err(ParseError::Limit(m)) if m.contains("deeper"))
        );
        let wide: String = (0..limits::MAX_VALUES)
            .map(|i| format!(r#","f{i}":"v""#))
            .collect();
        let body = format!(r#"{{"origin":"MMS_MO","code":"N401"{wide}}}"#);
        assert!(
            matches!(parse(body.as_bytes(), None), Err(ParseError::Limit(m)) if m.contains("fields"))
        );
    }

    /// Found by `cargo fuzz run ingest` (fuzz/regressions/ingest/files-field-collides-with-content-list):
    /// an unknown field named `files` was kept as is, so the envelope's `data.files`
    /// was `""` instead of a list of `{url}` (or, next to `content`, overwritten).
    #[test]
    fn a_files_field_is_read_as_content_files() {
        let p = parse(br#"{"origin":"MT","code":"4","files":""}"#, None).unwrap();
        assert!(p.files.is_empty());
        assert!(!p.fields.contains_key("files"), "{:?}", p.fields);
        let p = parse(
            br#"{"origin":"MMS_MO","code":"N401","content":[{"file":"a"}],"Files":["b"]}"#,
            None,
        )
        .unwrap();
        assert_eq!(p.files, vec!["a", "b"]);
        assert!(!p.fields.contains_key("files") && !p.fields.contains_key("content"));
        let p = parse(
            b"<postback><origin>MMS_MO</origin><code>N401</code><FILES><file>c</file></FILES></postback>",
            None,
        )
        .unwrap();
        assert_eq!(p.files, vec!["c"]);
        assert!(matches!(
            parse(br#"{"origin":"MMS_MO","code":"N401","files":{"odd":"x"}}"#, None),
            Err(ParseError::Shape(m)) if m.contains("files")
        ));
    }

    #[test]
    fn content_in_other_shapes() {
        let p = parse(
            br#"{"origin":"MMS_MO","code":"N401","content":{"file":["a","b"]}}"#,
            None,
        )
        .unwrap();
        assert_eq!(p.files, vec!["a", "b"]);
        let p = parse(
            br#"{"origin":"MMS_MO","code":"N401","content":["a"]}"#,
            None,
        )
        .unwrap();
        assert_eq!(p.files, vec!["a"]);
        let p = parse(
            br#"{"origin":"MMS_MO","code":"N401","content":{"odd":"x"}}"#,
            None,
        )
        .unwrap();
        assert!(p.files.is_empty());
        assert_eq!(p.fields["content"], serde_json::json!({"odd": "x"}));
    }
}
