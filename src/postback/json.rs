//! JSON → JSON tree: serde_json does the reading; the tolerant folding (numbers
//! to strings, key spellings) happens in [`super::Postback::from_tree`].

use serde_json::Value;

use super::{Excerpt, ParseError};

/// Reads a JSON document; the error names the line and column first, so
/// cutting serde_json's message to an [`Excerpt`] never loses them.
pub(super) fn read_tree(text: &str) -> Result<Value, ParseError> {
    serde_json::from_str(text).map_err(|err| {
        let message = err.to_string();
        let position = format!(" at line {} column {}", err.line(), err.column());
        let detail = message.strip_suffix(&position).unwrap_or(&message);
        ParseError::Json(Excerpt::new(&format!(
            "at line {} column {}: {detail}",
            err.line(),
            err.column()
        )))
    })
}
