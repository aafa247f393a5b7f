//! Problems of a config file: collected rather than returned at the first,
//! each at its key path (`routes[0].targets`), so one run shows them all.
//!
//! Unknown keys and values of the wrong type (or that do not parse) are
//! collected by dropping each one and deserializing again (serde stops at the
//! first); the checks serde cannot express are then added one section at a
//! time by the sections' `validate`.

use figment::providers::Serialized;
use figment::value::{Dict, Value};
use figment::Figment;

use super::values::HumanDuration;
use super::Config;

/// One thing wrong with a config file: the key it concerns, written one way
/// (`routes[0].targets`, `targets.inbox.timeout`), and what was found and expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path of the offending key.
    pub key: String,
    /// The value found and what was expected instead.
    pub message: String,
}

/// A configuration that cannot be used, with the keys and the file to blame.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing or is not YAML at all.
    #[error("invalid config {file}: {message}")]
    Load {
        /// The config file given on the command line.
        file: String,
        /// What stopped the file from being read.
        message: String,
    },
    /// Keys that are unknown, of the wrong type, or that mean nothing: every
    /// one found in the file, so that one run shows them all.
    #[error("{}", render_problems(file, problems))]
    Invalid {
        /// The config file given on the command line.
        file: String,
        /// Every problem found, in the order of the file's sections.
        problems: Vec<Problem>,
    },
}

/// One line per problem, each naming the file and the key.
fn render_problems(file: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("invalid config {file}: {}: {}", p.key, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The problems of one file, collected rather than returned at the first.
#[derive(Debug, Default)]
pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// A duration that must be above zero.
    pub(super) fn positive(&mut self, key: impl Into<String>, value: HumanDuration) {
        if value.0.is_zero() {
            self.add(key, "found `0s`, expected a duration above 0 (like `10s`)");
        }
    }

    /// A count that must be at least 1.
    pub(super) fn at_least_one(&mut self, key: impl Into<String>, value: u64) {
        if value == 0 {
            self.add(key, "found `0`, expected at least 1");
        }
    }
}

/// How often a file is repaired (the offending key dropped) and deserialized
/// again to find the next structural problem: far more than a real file has.
const MAX_STRUCTURE_ROUNDS: usize = 64;

/// ` (did you mean `x`?)` when one of `known` is close to `found`, else nothing.
pub(super) fn suggestion(found: &str, known: &[&str]) -> String {
    closest(found, known)
        .map(|best| format!(": did you mean `{best}`?"))
        .unwrap_or_default()
}

/// The known name most like `found`, when one is close enough to be a typo.
fn closest<'k>(found: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|candidate| (strsim::jaro_winkler(found, candidate), *candidate))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, best)| best)
}

/// Deserializes the merged tree; on an unknown key or a value of the wrong
/// type it records the problem, drops that key and tries again, so that one
/// run reports every structural problem (serde stops at the first).
pub(super) fn extract_collecting(mut tree: Dict) -> (Option<Config>, Vec<Problem>) {
    let mut problems = Vec::new();
    for _ in 0..MAX_STRUCTURE_ROUNDS {
        let errors = match Figment::from(Serialized::defaults(&tree)).extract::<Config>() {
            Ok(config) => return (Some(config), problems),
            Err(errors) => errors,
        };
        let mut repaired = false;
        for error in errors {
            problems.push(describe_structural(&tree, &error));
            repaired |= remove_key(&mut tree, &error.path);
        }
        if !repaired {
            break;
        }
    }
    (None, problems)
}

/// One figment error as a [`Problem`] at its key path.
fn describe_structural(tree: &Dict, error: &figment::Error) -> Problem {
    use figment::error::Kind;
    let key = key_path(tree, &error.path);
    let parent = key_path(tree, &error.path[..error.path.len().saturating_sub(1)]);
    let within = if parent.is_empty() {
        "at the top level".to_owned()
    } else {
        format!("in {parent}")
    };
    let message = match &error.kind {
        Kind::UnknownField(found, expected) => format!(
            "unknown key `{found}` {within}{}",
            match closest(found, expected) {
                Some(best) => format!(": did you mean `{best}`?"),
                None => format!(" (known keys: {})", expected.join(", ")),
            }
        ),
        Kind::UnknownVariant(found, expected) => format!(
            "found `{found}`, expected one of {}{}",
            expected.join(", "),
            suggestion(found, expected)
        ),
        Kind::MissingField(field) => format!("missing key `{field}`"),
        other => other.to_string(),
    };
    Problem { key, message }
}

/// `path` written one way: map keys joined by `.`, list indices as `[i]`.
fn key_path(tree: &Dict, path: &[String]) -> String {
    let mut shown = String::new();
    let mut at: Option<&Value> = None;
    for (depth, segment) in path.iter().enumerate() {
        let next = match at {
            None => tree.get(segment),
            Some(Value::Dict(_, dict)) => dict.get(segment),
            Some(Value::Array(_, items)) => {
                segment.parse::<usize>().ok().and_then(|i| items.get(i))
            }
            Some(_) => None,
        };
        if matches!(at, Some(Value::Array(..))) {
            shown.push_str(&format!("[{segment}]"));
        } else {
            if depth > 0 {
                shown.push('.');
            }
            shown.push_str(segment);
        }
        at = next;
    }
    shown
}

/// Drops the value at `path` so that deserialization can go on past it; a
/// list element itself is never dropped (later indices would shift): false
/// when nothing could be dropped.
fn remove_key(tree: &mut Dict, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => tree.remove(last).is_some(),
        [first, rest @ ..] => tree
            .get_mut(first)
            .is_some_and(|value| remove_in(value, rest)),
    }
}

/// [`remove_key`] inside one value: a map's key, or a key inside a list's element.
fn remove_in(value: &mut Value, path: &[String]) -> bool {
    match value {
        Value::Dict(_, dict) => remove_key(dict, path),
        Value::Array(_, items) if path.len() > 1 => path[0]
            .parse::<usize>()
            .ok()
            .and_then(|index| items.get_mut(index))
            .is_some_and(|item| remove_in(item, &path[1..])),
        _ => false,
    }
}
