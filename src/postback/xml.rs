//! XML → JSON tree, with quick-xml's event reader.
//!
//! Why events rather than quick-xml's serde mode: the aggregator's tag names vary
//! in case and punctuation, fields come and go, and unknown fields must be kept;
//! a generic tree folded by [`super::Postback::from_tree`] handles all of that
//! without a struct per spelling. A leaf element becomes a string, an element
//! with children an object, repeated siblings an array. Attributes carry no
//! postback data and are ignored.
//!
//! Safety: quick-xml never expands DTD entities or fetches anything; on top of
//! that a DOCTYPE is refused outright, and nesting is bounded.

use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::Event;
use quick_xml::Reader;
use serde_json::{Map, Value};

use super::limits::MAX_DEPTH;
use super::{Excerpt, ParseError};

/// One element being read: its name, its child elements, and its text.
struct Open {
    name: String,
    children: Map<String, Value>,
    text: String,
}

impl Open {
    fn new(name: &str) -> Open {
        Open {
            name: name.to_owned(),
            children: Map::new(),
            text: String::new(),
        }
    }

    /// A leaf is its (trimmed) text; an element with children is an object.
    fn into_value(self) -> Value {
        if self.children.is_empty() {
            Value::String(self.text.trim().to_owned())
        } else {
            Value::Object(self.children)
        }
    }
}

/// Reads the document's root element into a JSON tree (the root's own name is dropped).
pub(super) fn read_tree(text: &str) -> Result<Value, ParseError> {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Open> = Vec::new();
    let mut root: Option<Value> = None;
    let err = |reader: &Reader<&[u8]>, message: String| xml_error(reader, &message);
    loop {
        let event = reader
            .read_event()
            .map_err(|e| err(&reader, e.to_string()))?;
        match event {
            Event::Start(_) | Event::Empty(_) if root.is_some() && stack.is_empty() => {
                return Err(err(&reader, "more than one root element".into()));
            }
            Event::Start(start) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(err(
                        &reader,
                        format!("nested deeper than {MAX_DEPTH} elements"),
                    ));
                }
                stack.push(Open::new(start.local_name().as_ref()));
            }
            Event::Empty(start) => {
                let open = Open::new(start.local_name().as_ref());
                close(&mut stack, &mut root, open);
            }
            Event::End(_) => {
                // quick-xml has already checked that the end tag matches.
                let open = stack
                    .pop()
                    .ok_or_else(|| err(&reader, "unexpected end tag".into()))?;
                close(&mut stack, &mut root, open);
            }
            Event::Text(text) => {
                let content = text.xml10_content();
                append_text(&mut stack, &content, &reader)?;
            }
            Event::CData(cdata) => {
                append_text(&mut stack, &cdata, &reader)?;
            }
            Event::GeneralRef(reference) => {
                let resolved = match reference
                    .resolve_char_ref()
                    .map_err(|e| err(&reader, e.to_string()))?
                {
                    Some(ch) => ch.to_string(),
                    None => resolve_predefined_entity(&reference)
                        .ok_or_else(|| {
                            err(
                                &reader,
                                format!(
                                    "unknown entity `&{};` (entities are not expanded)",
                                    &*reference
                                ),
                            )
                        })?
                        .to_owned(),
                };
                append_text(&mut stack, &resolved, &reader)?;
            }
            Event::DocType(_) => {
                return Err(err(&reader, "DOCTYPE is not allowed".into()));
            }
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(err(
            &reader,
            format!("element <{}> is not closed", stack[stack.len() - 1].name),
        ));
    }
    root.ok_or_else(|| ParseError::Xml(Excerpt::new("no root element")))
}

/// Attaches a finished element to its parent, or makes it the root.
/// Siblings are grouped under their canonical name, so `<file>` and `<FILE>`
/// (or `<tracking-id>` and `<TRACKINGID>`) repeat one field instead of one
/// silently replacing the other.
fn close(stack: &mut [Open], root: &mut Option<Value>, open: Open) {
    let name = super::canonical_name(&open.name);
    let value = open.into_value();
    match stack.last_mut() {
        None => *root = Some(value),
        Some(parent) => match parent.children.get_mut(&name) {
            None => {
                parent.children.insert(name, value);
            }
            Some(Value::Array(items)) => items.push(value),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, value]);
            }
        },
    }
}

fn append_text(stack: &mut [Open], text: &str, reader: &Reader<&[u8]>) -> Result<(), ParseError> {
    match stack.last_mut() {
        Some(open) => {
            open.text.push_str(text);
            Ok(())
        }
        None if text.trim().is_empty() => Ok(()),
        None => Err(xml_error(reader, "text outside the root element")),
    }
}

/// The error with its position first: quick-xml's message may quote a tag
/// name of any length, and the excerpt cuts it, never the position.
fn xml_error(reader: &Reader<&[u8]>, message: &str) -> ParseError {
    ParseError::Xml(Excerpt::new(&format!(
        "at byte {}: {message}",
        reader.buffer_position()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn leaves_objects_and_repeats() {
        let tree = read_tree("<p><a>1</a><b><c>x</c></b><f>u1</f><f>u2</f><e/></p>").unwrap();
        assert_eq!(
            tree,
            json!({"a": "1", "b": {"c": "x"}, "f": ["u1", "u2"], "e": ""})
        );
    }

    #[test]
    fn siblings_spelled_differently_are_one_repeated_field() {
        let tree =
            read_tree("<p><file>a</file><FILE>b</FILE><Tracking-Id>t1</Tracking-Id></p>").unwrap();
        assert_eq!(tree, json!({"file": ["a", "b"], "tracking_id": "t1"}));
    }

    #[test]
    fn entities_char_refs_and_cdata_are_text() {
        let tree = read_tree("<p><a>AT&amp;T &#x41;&#66;</a><b><![CDATA[<raw>]]></b></p>").unwrap();
        assert_eq!(tree, json!({"a": "AT&T AB", "b": "<raw>"}));
    }

    #[test]
    fn doctype_and_custom_entities_are_refused() {
        let xxe = r#"<?xml version="1.0"?><!DOCTYPE p [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><p>&xxe;</p>"#;
        assert!(matches!(read_tree(xxe), Err(ParseError::Xml(m)) if m.contains("DOCTYPE")));
        assert!(matches!(read_tree("<p>&xxe;</p>"), Err(ParseError::Xml(m)) if m.contains("xxe")));
    }

    #[test]
    fn depth_is_bounded() {
        let deep = "<a>".repeat(40) + &"</a>".repeat(40);
        assert!(matches!(read_tree(&deep), Err(ParseError::Xml(m)) if m.contains("deeper")));
    }

    #[test]
    fn broken_documents_are_errors() {
        for bad in [
            "<p><a>1</b></p>",
            "<p>",
            "<p></p><q></q>",
            "<p></p>trailing",
            "",
        ] {
            assert!(read_tree(bad).is_err(), "{bad:?} should fail");
        }
    }
}
