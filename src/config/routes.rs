//! Routing rules (`routes`): which targets receive which postbacks.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::delivery::TargetConfig;
use super::problems::{suggestion, Problems};
use super::values::OneOrMany;

/// One routing rule; rules are tried in order and the first match wins
/// unless it says `continue: true`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Shown in logs and the dry-run; unset, the route is `route-N` (1-based).
    pub name: Option<String>,
    /// What the postback must look like; an empty match matches everything.
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    /// Targets that receive a matching postback (fan-out); at least one.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Keep evaluating later routes after this one matched.
    #[serde(default, rename = "continue")]
    pub continue_matching: bool,
}

/// Conditions of a route; all given conditions must hold, each is "any of"
/// one value or a list.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Keywords, compared case-insensitively.
    #[serde(default)]
    pub keyword: OneOrMany,
    /// Short codes or numbers the postback was sent to.
    #[serde(default)]
    pub to: OneOrMany,
    /// Origins such as `MMS_MO` or `MMS_MT`.
    #[serde(default)]
    pub origin: OneOrMany,
    /// Codes such as `N401` or `N102`.
    #[serde(default)]
    pub code: OneOrMany,
}

/// The name a route is known by: its own, or `route-N` (1-based).
pub fn route_name(index: usize, route: &RouteConfig) -> String {
    route
        .name
        .clone()
        .unwrap_or_else(|| format!("route-{}", index + 1))
}

/// Route names are unique, and every route names at least one target, all
/// of them defined.
pub(super) fn validate_routes(
    routes: &[RouteConfig],
    targets: &BTreeMap<String, TargetConfig>,
    problems: &mut Problems,
) {
    let mut route_names = BTreeSet::new();
    for (index, route) in routes.iter().enumerate() {
        let name = route_name(index, route);
        if !route_names.insert(name.clone()) {
            problems.add(
                format!("routes[{index}].name"),
                format!("found `{name}` a second time, expected a name used once"),
            );
        }
        if route.targets.is_empty() {
            problems.add(
                format!("routes[{index}].targets"),
                "found no target, expected at least one",
            );
        }
        for target in &route.targets {
            if !targets.contains_key(target) {
                let known: Vec<&str> = targets.keys().map(String::as_str).collect();
                problems.add(
                    format!("routes[{index}].targets"),
                    format!(
                        "found unknown target `{target}`, expected one of the defined targets ({}){}",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        },
                        suggestion(target, &known)
                    ),
                );
            }
        }
    }
}
