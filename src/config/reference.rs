//! `docs/configuration.md`, generated from the config types' doc comments:
//! their JSON Schema (schemars) carries each field's description and default,
//! rendered here as one table per top-level key. The test fails when the
//! committed file is not what the doc comments generate, so the reference
//! cannot drift from the code.

use std::borrow::Cow;
use std::path::PathBuf;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value};

use super::values::{Cidr, HeaderKey, HeaderSetting, HumanDuration, OneOrMany, WebhookUrl};
use super::{Config, SecretSource, SigningKey};

/// A leaf value type written as a string in the file, described by `what`.
macro_rules! string_schema {
    ($type:ty, $what:literal) => {
        impl JsonSchema for $type {
            fn inline_schema() -> bool {
                true
            }
            fn schema_name() -> Cow<'static, str> {
                stringify!($type).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", "description": $what })
            }
        }
    };
}

string_schema!(HumanDuration, "a duration like `500ms`, `10s`, `5m`, `24h`");
string_schema!(Cidr, "an IP address or CIDR range");
string_schema!(WebhookUrl, "an http:// or https:// URL");
string_schema!(HeaderKey, "an HTTP header name");
string_schema!(SigningKey, "`whsec_<base64>`");

impl JsonSchema for OneOrMany {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "OneOrMany".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "anyOf": [{ "type": "string" }, { "type": "array", "items": { "type": "string" } }] })
    }
}

impl JsonSchema for HeaderSetting {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "HeaderSetting".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({ "anyOf": [{ "type": "string" }, generator.subschema_for::<SecretSource>()] })
    }
}

/// Defaults in the configuration reference are written as a user would
/// write them: the largest unit that divides the duration (`10m`, `1d`).
impl serde::Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        const UNITS: [(&str, u128); 5] = [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
            ("ms", 1),
        ];
        let millis = self.0.as_millis();
        let (unit, size) = UNITS
            .into_iter()
            .find(|(_, size)| millis % size == 0 && millis > 0)
            .unwrap_or(("s", 1_000));
        serializer.serialize_str(&format!("{}{unit}", millis / size))
    }
}

/// An empty list of ranges is shown as `[]`.
impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// An empty condition is shown as `[]`.
impl serde::Serialize for OneOrMany {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

/// Where the generated reference is committed.
fn committed_path() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
}

/// The whole reference: the config's own description, then one section per
/// top-level key with a row per leaf key. Also returns the leaf keys that
/// have no description (a field without a doc comment).
fn render() -> (String, Vec<String>) {
    let schema = schemars::schema_for!(Config);
    let root = schema.as_value();
    let defs = root
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let reference = Reference { defs };
    let mut out = String::from(
        "# Configuration reference\n\n\
         <!-- Generated from the doc comments in src/config/ by `UPDATE_DOCS=1 cargo test --lib \
         config::reference`; edit those, not this file. -->\n\n",
    );
    out.push_str(&paragraphs(text(root, "description")));
    let mut undocumented = Vec::new();
    for (key, property) in properties(root) {
        out.truncate(out.trim_end().len());
        out.push_str(&format!("\n\n## `{key}`\n\n"));
        let (inner, _) = reference.unwrap_collection(property);
        if inner.get("properties").is_some() {
            // A section: what it is for (its type's text, else the field's),
            // then its keys; a single key says it in its row.
            let about = Some(text(inner, "description"))
                .filter(|about| !about.is_empty())
                .unwrap_or(text(property, "description"));
            out.push_str(&format!("{}\n\n", paragraphs(about)));
        }
        out.push_str("| key | default | meaning |\n| --- | --- | --- |\n");
        reference.rows(key, property, true, &mut out, &mut undocumented);
    }
    (out.trim_end().to_owned() + "\n", undocumented)
}

/// The schema's shared definitions, to follow `$ref`s.
struct Reference {
    defs: Map<String, Value>,
}

impl Reference {
    /// The schema a property stands for: its `$ref` followed, an `Option`'s
    /// `null` alternative dropped.
    fn resolve<'s>(&'s self, schema: &'s Value) -> &'s Value {
        if let Some(name) = schema.get("$ref").and_then(Value::as_str) {
            let name = name.trim_start_matches("#/$defs/");
            return self.defs.get(name).map_or(schema, |def| self.resolve(def));
        }
        if let Some(alternatives) = schema.get("anyOf").and_then(Value::as_array) {
            let not_null: Vec<&Value> = alternatives
                .iter()
                .filter(|alt| alt.get("type").and_then(Value::as_str) != Some("null"))
                .collect();
            if let [only] = not_null[..] {
                return self.resolve(only);
            }
        }
        schema
    }

    /// For a map of structs (`targets`) or a list of them (`routes`): the
    /// struct's schema and how its keys are written below the collection.
    fn unwrap_collection<'s>(&'s self, schema: &'s Value) -> (&'s Value, &'static str) {
        let resolved = self.resolve(schema);
        for (field, written) in [("additionalProperties", ".NAME"), ("items", "[]")] {
            if let Some(inner) = resolved.get(field).map(|inner| self.resolve(inner)) {
                if inner.get("properties").is_some() {
                    return (inner, written);
                }
            }
        }
        (resolved, "")
    }

    /// One row per key below `path` (a section's own text is its heading's).
    fn rows(
        &self,
        path: &str,
        schema: &Value,
        section: bool,
        out: &mut String,
        undocumented: &mut Vec<String>,
    ) {
        let (inner, written) = self.unwrap_collection(schema);
        let mut meaning = paragraphs(text(schema, "description"));
        if meaning.is_empty() {
            undocumented.push(path.to_owned());
        }
        if inner.get("properties").is_some() {
            if !section {
                out.push_str(&row(path, schema, &meaning));
            }
            for (key, property) in properties(inner) {
                let below = format!("{path}{written}.{key}");
                self.rows(&below, property, false, out, undocumented);
            }
            return;
        }
        let variants: Vec<String> = inner
            .get("oneOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|variant| {
                let name = variant.get("const").and_then(Value::as_str)?;
                let about = paragraphs(text(variant, "description"));
                Some(format!("`{name}` ({})", about.trim_end_matches('.')))
            })
            .collect();
        if !variants.is_empty() {
            meaning.push_str(&format!(" One of: {}.", variants.join(", ")));
        }
        out.push_str(&row(path, schema, &meaning));
    }
}

/// One table row: the key, its default, what it means.
fn row(path: &str, schema: &Value, meaning: &str) -> String {
    format!(
        "| `{path}` | {} | {} |\n",
        default_of(schema),
        meaning.replace('|', "\\|")
    )
}

/// A schema's properties, in the order schemars keeps them.
fn properties(schema: &Value) -> impl Iterator<Item = (&String, &Value)> {
    schema
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
}

fn text<'s>(schema: &'s Value, field: &str) -> &'s str {
    schema
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim()
}

/// Doc comment lines joined: a table cell (and a section's text) is one line
/// per paragraph, paragraphs apart by a blank line.
fn paragraphs(doc: &str) -> String {
    doc.split("\n\n")
        .map(|paragraph| paragraph.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// A field's default as it would be written in the file; `—` when it has none.
fn default_of(schema: &Value) -> String {
    match schema.get("default") {
        None | Some(Value::Null) => "—".to_owned(),
        Some(Value::String(text)) => format!("`{text}`"),
        Some(other) => format!("`{other}`"),
    }
}

#[test]
fn every_config_key_has_a_doc_comment() {
    let (_, undocumented) = render();
    assert!(
        undocumented.is_empty(),
        "keys without a doc comment: {undocumented:?}"
    );
}

#[test]
fn docs_configuration_md_is_what_the_doc_comments_generate() {
    let (generated, _) = render();
    let path = committed_path();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} differs from what the config's doc comments generate: regenerate it with \
         `UPDATE_DOCS=1 cargo test --lib config::reference` and commit it",
        path.display()
    );
}
