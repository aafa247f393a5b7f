//! JSON → JSON tree: serde_json does the reading; the tolerant folding (numbers
//! to strings, key spellings) happens in [`super::Postback::from_tree`].

use serde_json::Value;

use super::ParseError;

/// Reads a JSON document; serde_json's message names the line and column.
pub(super) fn read_tree(text: &str) -> Result<Value, ParseError> {
    serde_json::from_str(text).map_err(|err| ParseError::Json(err.to_string()))
}
