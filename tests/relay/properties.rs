//! Property test: any valid postback, rendered as XML and as JSON in any of the
//! spellings the aggregator uses, parses to the same envelope `data`, and that
//! `data` is exactly the generated fields under their canonical names.
//!
//! What varies: the origin (known or random), the code, which optional fields
//! are present, 0–4 content files, 0–2 unknown fields; values drawn from a
//! charset with XML's special characters and non-ASCII text. XML: tag case and
//! punctuation (`tracking-id`, `tracking_id`, `TRACKINGID`, `TrackingId`), a
//! prolog or none, a byte order mark, a `<NOTIFICATION>` wrapper, named or
//! numeric entities or CDATA, `<x/>` for empty values, white space between
//! elements, field order. JSON: key spellings, numbers for numeric-looking
//! values, `null` for absent fields, the three content shapes, a wrapper object.

use std::collections::BTreeMap;

use chrono::Utc;
use postback_relay::envelope::{parse_timestamp, Envelope};
use postback_relay::postback::{parse, Format};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{json, Map, Value};

/// The optional fields: canonical name and the words its spellings are made of.
const OPTIONAL: &[(&str, &[&str])] = &[
    ("from", &["from"]),
    ("to", &["to"]),
    ("keyword", &["keyword"]),
    ("tracking_id", &["tracking", "id"]),
    ("operator_id", &["operator", "id"]),
    ("timestamp", &["timestamp"]),
    ("message_subject", &["message", "subject"]),
    ("status", &["status"]),
];

/// How a field name is written on the wire.
#[derive(Debug, Clone, Copy)]
enum Spelling {
    LowerHyphen,   // tracking-id
    LowerSnake,    // tracking_id
    UpperHyphen,   // TRACKING-ID
    UpperSnake,    // TRACKING_ID
    TitleHyphen,   // Tracking-Id
    UpperCompact,  // TRACKINGID (folds only for known fields)
    CamelCompact,  // TrackingId (folds only for known fields)
    LegacySubject, // SUBJECT for message_subject (Sinch's legacy XML)
}

fn spell(words: &[&str], spelling: Spelling) -> String {
    let title = |w: &&str| {
        let mut chars = w.chars();
        chars.next().map_or_else(String::new, |first| {
            first.to_ascii_uppercase().to_string() + chars.as_str()
        })
    };
    match spelling {
        Spelling::LowerHyphen => words.join("-"),
        Spelling::LowerSnake => words.join("_"),
        Spelling::UpperHyphen => words.join("-").to_ascii_uppercase(),
        Spelling::UpperSnake => words.join("_").to_ascii_uppercase(),
        Spelling::TitleHyphen => words.iter().map(title).collect::<Vec<_>>().join("-"),
        Spelling::UpperCompact => words.concat().to_ascii_uppercase(),
        Spelling::CamelCompact => words.iter().map(title).collect(),
        Spelling::LegacySubject if words == ["message", "subject"] => "SUBJECT".into(),
        Spelling::LegacySubject => words.join("-"),
    }
}

fn any_spelling() -> impl Strategy<Value = Spelling> {
    select(vec![
        Spelling::LowerHyphen,
        Spelling::LowerSnake,
        Spelling::UpperHyphen,
        Spelling::UpperSnake,
        Spelling::TitleHyphen,
        Spelling::UpperCompact,
        Spelling::CamelCompact,
        Spelling::LegacySubject,
    ])
}

/// Spellings that keep the word separators: the only ones that fold for a name
/// the relay does not know (`x-foo-bar` → `x_foo_bar`, but `XFOOBAR` → `xfoobar`).
fn separated_spelling() -> impl Strategy<Value = Spelling> {
    select(vec![
        Spelling::LowerHyphen,
        Spelling::LowerSnake,
        Spelling::UpperHyphen,
        Spelling::UpperSnake,
        Spelling::TitleHyphen,
    ])
}

/// A field value: XML's special characters, quotes, non-ASCII, inner white
/// space; never leading or trailing white space (XML leaf text is trimmed).
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9 <>&\"';=:/.?#%+_éßЖ中😀\n\t-]{0,24}",
        1 => "(0|[1-9][0-9]{0,17})",
        1 => select(vec![
            "true",
            "false",
            "AT&T",
            "<b>",
            "a]]>b",
            "&amp;",
            "\"'",
            "2014-02-03T11:19:49-05:00",
            "2021-02-03T18:27:54.235957+00:00",
            "2021-02-03 18:27:54+0100",
        ])
        .prop_map(str::to_owned),
    ]
    .prop_map(|text| text.trim().to_owned())
}

/// A value that is not blank (`origin` and `code` are required).
fn required_value() -> impl Strategy<Value = String> {
    value().prop_filter("required fields are not blank", |v| !v.is_empty())
}

#[derive(Debug, Clone)]
struct Field {
    canonical: String,
    words: Vec<String>,
    spelling: Spelling,
    value: String,
}

impl Field {
    fn wire_name(&self) -> String {
        let words: Vec<&str> = self.words.iter().map(String::as_str).collect();
        spell(&words, self.spelling)
    }
}

#[derive(Debug, Clone)]
struct Generated {
    fields: Vec<Field>,
    /// Optional fields that are absent (JSON may send them as `null`).
    absent: Vec<String>,
    files: Vec<String>,
}

fn field(canonical: &str, words: &[&str], spelling: Spelling, value: String) -> Field {
    Field {
        canonical: canonical.to_owned(),
        words: words.iter().map(|w| (*w).to_owned()).collect(),
        spelling,
        value,
    }
}

fn postback() -> impl Strategy<Value = Generated> {
    let origin = prop_oneof![
        select(vec!["MMS_MO", "MMS_MT", "SMS_MO", "SMS_MT", "mms_mo"]).prop_map(str::to_owned),
        required_value(),
    ];
    let code = prop_oneof!["[NE][0-9]{3}", required_value()];
    let optional = proptest::collection::vec(
        proptest::option::of((any_spelling(), value())),
        OPTIONAL.len(),
    );
    // Unknown fields: `x` plus one or two words, so no alias can fold them.
    let extras = proptest::collection::btree_map(
        "[a-z]{1,6}(_[a-z0-9]{1,4})?",
        (separated_spelling(), value()),
        0..3,
    );
    let files = proptest::collection::vec("https://m\\.example/[a-z0-9&<>'\"=?/é]{0,12}", 0..5);
    (
        origin,
        any_spelling(),
        code,
        any_spelling(),
        optional,
        extras,
        files,
    )
        .prop_map(
            |(origin, origin_spelling, code, code_spelling, optional, extras, files)| {
                let mut fields = vec![
                    field("origin", &["origin"], origin_spelling, origin),
                    field("code", &["code"], code_spelling, code),
                ];
                let mut absent = Vec::new();
                for ((canonical, words), choice) in OPTIONAL.iter().zip(optional) {
                    match choice {
                        Some((spelling, value)) => {
                            fields.push(field(canonical, words, spelling, value))
                        }
                        None => absent.push(canonical.to_string()),
                    }
                }
                let extras: BTreeMap<String, (Spelling, String)> = extras;
                for (name, (spelling, value)) in extras {
                    let mut words = vec!["x"];
                    words.extend(name.split('_'));
                    fields.push(field(&format!("x_{name}"), &words, spelling, value));
                }
                Generated {
                    fields,
                    absent,
                    files,
                }
            },
        )
}

// ---------------------------------------------------------------------------
// XML
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Escape {
    /// `&amp;` `&lt;` `&gt;` `&quot;` `&apos;`
    Named,
    /// `&#38;` `&#x3C;` ...
    Numeric,
    /// Only `&`, `<` and `>` (`]]>` is not allowed in text); quotes stay raw.
    Minimal,
    /// `<![CDATA[...]]>` (named entities when the value contains `]]>`).
    CData,
}

fn escape(value: &str, style: Escape) -> String {
    if let Escape::CData = style {
        if !value.contains("]]>") {
            return format!("<![CDATA[{value}]]>");
        }
        return escape(value, Escape::Named);
    }
    let mut out = String::new();
    for ch in value.chars() {
        match (style, ch) {
            (Escape::Named, '&') | (Escape::Minimal, '&') => out.push_str("&amp;"),
            (Escape::Named, '<') | (Escape::Minimal, '<') => out.push_str("&lt;"),
            (Escape::Named, '>') | (Escape::Minimal, '>') => out.push_str("&gt;"),
            (Escape::Named, '"') => out.push_str("&quot;"),
            (Escape::Named, '\'') => out.push_str("&apos;"),
            (Escape::Numeric, '&' | '<' | '>' | '"' | '\'') => {
                if (ch as u32) % 2 == 0 {
                    out.push_str(&format!("&#{};", ch as u32));
                } else {
                    out.push_str(&format!("&#x{:X};", ch as u32));
                }
            }
            _ => out.push(ch),
        }
    }
    out
}

#[derive(Debug, Clone)]
struct XmlStyle {
    prolog: &'static str,
    root: &'static str,
    wrapper: Option<&'static str>,
    separator: &'static str,
    escapes: Vec<Escape>,
    self_close_empty: bool,
    empty_content: Option<&'static str>,
    content_tags: (&'static str, &'static str),
    order: Vec<usize>,
}

fn xml_style() -> impl Strategy<Value = XmlStyle> {
    (
        select(vec![
            "",
            "<?xml version=\"1.0\"?>",
            "<?xml version='1.0' encoding='UTF-8'?>\n",
            "\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n",
            "\n<!-- from Sinch -->\n",
        ]),
        select(vec!["postback", "POSTBACK", "Postback"]),
        proptest::option::of(select(vec!["NOTIFICATION", "notification"])),
        select(vec!["", "\n", "\n    ", " "]),
        proptest::collection::vec(
            select(vec![
                Escape::Named,
                Escape::Numeric,
                Escape::Minimal,
                Escape::CData,
            ]),
            16,
        ),
        any::<bool>(),
        select(vec![None, Some("<content></content>"), Some("<CONTENT/>")]),
        select(vec![
            ("content", "file"),
            ("CONTENT", "FILE"),
            ("Content", "File"),
        ]),
        Just((0..16).collect::<Vec<usize>>()).prop_shuffle(),
    )
        .prop_map(
            |(
                prolog,
                root,
                wrapper,
                separator,
                escapes,
                self_close_empty,
                empty_content,
                content_tags,
                order,
            )| {
                XmlStyle {
                    prolog,
                    root,
                    wrapper,
                    separator,
                    escapes,
                    self_close_empty,
                    empty_content,
                    content_tags,
                    order,
                }
            },
        )
}

/// The elements of `items` in the order `order` (a permutation of 0..16) gives.
fn reorder<T: Clone>(items: &[T], order: &[usize]) -> Vec<T> {
    order
        .iter()
        .filter(|i| **i < items.len())
        .map(|i| items[*i].clone())
        .collect()
}

fn render_xml(postback: &Generated, style: &XmlStyle) -> String {
    let mut elements: Vec<String> = postback
        .fields
        .iter()
        .enumerate()
        .map(|(index, field)| {
            let name = field.wire_name();
            if field.value.is_empty() && style.self_close_empty {
                format!("<{name}/>")
            } else {
                let text = escape(&field.value, style.escapes[index % style.escapes.len()]);
                format!("<{name}>{text}</{name}>")
            }
        })
        .collect();
    if postback.files.is_empty() {
        if let Some(empty) = style.empty_content {
            elements.push(empty.to_owned());
        }
    } else {
        // One spelling per document: siblings are grouped by their exact tag.
        let (content, file) = style.content_tags;
        let files: String = postback
            .files
            .iter()
            .map(|url| format!("<{file}>{}</{file}>", escape(url, Escape::Named)))
            .collect();
        elements.push(format!("<{content}>{files}</{content}>"));
    }
    let sep = style.separator;
    let mut body = reorder(&elements, &style.order)
        .iter()
        .map(|element| format!("{sep}{element}"))
        .collect::<String>();
    if let Some(wrapper) = style.wrapper {
        body = format!("{sep}<{wrapper}>{body}{sep}</{wrapper}>");
    }
    format!(
        "{prolog}<{root}>{body}{sep}</{root}>",
        prolog = style.prolog,
        root = style.root
    )
}

// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum ContentShape {
    /// `[{"file": url}, ...]`, as Sinch sends it.
    ListOfFiles,
    /// `{"file": [url, ...]}`, the XML shape.
    FileList,
    /// `[url, ...]`
    Urls,
}

#[derive(Debug, Clone)]
struct JsonStyle {
    numbers: Vec<bool>,
    nulls: Vec<bool>,
    content: ContentShape,
    empty_content: bool,
    wrapper: bool,
    spaced: bool,
    order: Vec<usize>,
}

fn json_style() -> impl Strategy<Value = JsonStyle> {
    (
        proptest::collection::vec(any::<bool>(), 16),
        proptest::collection::vec(any::<bool>(), 16),
        select(vec![
            ContentShape::ListOfFiles,
            ContentShape::FileList,
            ContentShape::Urls,
        ]),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        Just((0..16).collect::<Vec<usize>>()).prop_shuffle(),
    )
        .prop_map(
            |(numbers, nulls, content, empty_content, wrapper, spaced, order)| JsonStyle {
                numbers,
                nulls,
                content,
                empty_content,
                wrapper,
                spaced,
                order,
            },
        )
}

/// True for text a JSON number writes back unchanged: `0` or up to 18 digits
/// without a leading zero (fits in a u64).
fn numeric_looking(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 18
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'))
}

fn render_json(postback: &Generated, style: &JsonStyle) -> String {
    let key = |name: &str| serde_json::to_string(name).unwrap();
    let mut entries: Vec<String> = postback
        .fields
        .iter()
        .enumerate()
        .map(|(index, field)| {
            let value = if numeric_looking(&field.value) && style.numbers[index] {
                json!(field.value.parse::<u64>().unwrap())
            } else if matches!(field.value.as_str(), "true" | "false") && style.numbers[index] {
                json!(field.value == "true")
            } else {
                json!(field.value)
            };
            format!("{}:{}", key(&field.wire_name()), value)
        })
        .collect();
    for (index, name) in postback.absent.iter().enumerate() {
        if style.nulls[index] {
            entries.push(format!("{}:null", key(&name.replace('_', "-"))));
        }
    }
    if !postback.files.is_empty() || style.empty_content {
        let files = &postback.files;
        let content = match style.content {
            ContentShape::ListOfFiles => {
                Value::Array(files.iter().map(|url| json!({"file": url})).collect())
            }
            ContentShape::FileList => json!({"file": files}),
            ContentShape::Urls => json!(files),
        };
        entries.push(format!("\"content\":{content}"));
    }
    let separator = if style.spaced { ",\n  " } else { "," };
    let body = format!("{{{}}}", reorder(&entries, &style.order).join(separator));
    if style.wrapper {
        format!("{{\"notification\": {body}}}")
    } else {
        body
    }
}

// ---------------------------------------------------------------------------
// The property
// ---------------------------------------------------------------------------

/// The envelope `data` the generated postback must produce.
fn expected_data(postback: &Generated) -> Map<String, Value> {
    let mut data: Map<String, Value> = postback
        .fields
        .iter()
        .map(|field| (field.canonical.clone(), json!(field.value)))
        .collect();
    if !postback.files.is_empty() {
        let files = postback
            .files
            .iter()
            .map(|url| json!({"url": url}))
            .collect();
        data.insert("files".into(), Value::Array(files));
    }
    data
}

/// Parses `body` and returns its envelope as JSON.
fn envelope(body: &str, content_type: &str, format: Format) -> Value {
    let postback = parse(body.as_bytes(), Some(content_type))
        .unwrap_or_else(|err| panic!("{format:?} body refused ({err}):\n{body}"));
    assert_eq!(postback.format, format);
    let envelope = Envelope::new(
        &postback,
        "01ARZ3NDEKTSV4RRFFQ69G5FAV".into(),
        "sinch:mms",
        Utc::now(),
    );
    let json: Value = serde_json::from_slice(&envelope.to_json()).unwrap();
    assert_eq!(json["sourceformat"], format.as_str());
    match postback.tracking_id() {
        Some(id) => assert_eq!(json["subject"], id),
        None => assert!(json.get("subject").is_none()),
    }
    json
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn xml_and_json_of_one_postback_give_the_same_envelope_data(
        postback in postback(),
        xml_style in xml_style(),
        json_style in json_style(),
    ) {
        let xml = render_xml(&postback, &xml_style);
        let json = render_json(&postback, &json_style);
        let from_xml = envelope(&xml, "text/xml", Format::Xml);
        let from_json = envelope(&json, "application/json", Format::Json);
        prop_assert_eq!(&from_xml["data"], &from_json["data"], "XML:\n{}\nJSON:\n{}", xml, json);
        prop_assert_eq!(
            &from_xml["data"],
            &Value::Object(expected_data(&postback)),
            "XML:\n{}",
            xml
        );
        // Sinch's timestamp, when it has one that parses, is the event time of both.
        let timestamp = from_xml["data"]["timestamp"].as_str().and_then(parse_timestamp);
        if timestamp.is_some() {
            prop_assert_eq!(&from_xml["time"], &from_json["time"]);
        }
    }
}
