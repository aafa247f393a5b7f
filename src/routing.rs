//! Routing: ordered YAML rules decide which targets receive a postback.
//!
//! First match wins unless the route says `continue: true` (Alertmanager's
//! convention). All conditions given in a route must hold; each condition is
//! "any of" its values. An empty match matches everything.

use crate::config::{route_name, Config};
use crate::postback::Postback;

/// One compiled route: values normalised once so matching allocates nothing.
#[derive(Debug, Clone)]
struct Route {
    name: String,
    keywords: Vec<String>,
    to: Vec<String>,
    origins: Vec<String>,
    codes: Vec<String>,
    targets: Vec<String>,
    continue_matching: bool,
}

/// The routing table of one config.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
}

/// Where a postback goes and why; `targets` is empty when no route matched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Names of the routes that matched, in order.
    pub routes: Vec<String>,
    /// Target names without repeats, in the order routes named them.
    pub targets: Vec<String>,
}

impl Router {
    /// Compiles the routes of a validated config.
    pub fn new(config: &Config) -> Router {
        let lower = |values: &[String]| {
            values
                .iter()
                .map(|v| v.trim().to_ascii_lowercase())
                .collect()
        };
        let numbers = |values: &[String]| {
            values
                .iter()
                .map(|v| normalize_number(v).to_owned())
                .collect()
        };
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(index, route)| Route {
                name: route_name(index, route),
                keywords: lower(&route.matcher.keyword.0),
                to: numbers(&route.matcher.to.0),
                origins: lower(&route.matcher.origin.0),
                codes: lower(&route.matcher.code.0),
                targets: route.targets.clone(),
                continue_matching: route.continue_matching,
            })
            .collect();
        Router { routes }
    }

    /// Decides where `postback` goes.
    pub fn route(&self, postback: &Postback) -> Decision {
        let mut decision = Decision::default();
        for route in &self.routes {
            if !route.matches(postback) {
                continue;
            }
            decision.routes.push(route.name.clone());
            for target in &route.targets {
                if !decision.targets.contains(target) {
                    decision.targets.push(target.clone());
                }
            }
            if !route.continue_matching {
                break;
            }
        }
        decision
    }
}

impl Route {
    fn matches(&self, postback: &Postback) -> bool {
        let any_ci = |wanted: &[String], value: Option<&str>| {
            wanted.is_empty()
                || value.is_some_and(|v| wanted.iter().any(|w| w.eq_ignore_ascii_case(v.trim())))
        };
        let any_number = |wanted: &[String], value: Option<&str>| {
            wanted.is_empty()
                || value.is_some_and(|v| wanted.iter().any(|w| w == normalize_number(v)))
        };
        any_ci(&self.keywords, postback.field("keyword"))
            && any_number(&self.to, postback.field("to"))
            && any_ci(&self.origins, Some(postback.origin()))
            && any_ci(&self.codes, Some(postback.code()))
    }
}

/// Numbers arrive with and without `+`; compare them without it.
fn normalize_number(number: &str) -> &str {
    number.trim().trim_start_matches('+')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postback::parse;

    fn router(yaml: &str) -> Router {
        let config: Config = figment::Figment::new()
            .merge(<figment::providers::Yaml as figment::providers::Format>::string(yaml))
            .extract()
            .unwrap();
        Router::new(&config)
    }

    fn postback(fields: &str) -> Postback {
        parse(
            format!("{{\"origin\":\"MMS_MO\",\"code\":\"N401\"{fields}}}").as_bytes(),
            None,
        )
        .unwrap()
    }

    const TABLE: &str = r#"
routes:
  - name: stop
    match: {keyword: [STOP, end]}
    targets: [optout]
  - name: shortcode
    match: {to: "+28444", origin: mms_mo}
    targets: [inbox, audit]
    continue: true
  - name: receipts
    match: {origin: MMS_MT, code: [N101, N102]}
    targets: [receipts]
  - name: everything
    targets: [audit, archive]
"#;

    #[test]
    fn first_match_wins() {
        let d = router(TABLE).route(&postback(r#","keyword":"stop","to":"28444""#));
        assert_eq!(d.routes, vec!["stop"]);
        assert_eq!(d.targets, vec!["optout"]);
    }

    #[test]
    fn continue_fans_out_without_repeating_targets() {
        let d = router(TABLE).route(&postback(r#","keyword":"hello","to":"28444""#));
        assert_eq!(d.routes, vec!["shortcode", "everything"]);
        assert_eq!(d.targets, vec!["inbox", "audit", "archive"]);
    }

    #[test]
    fn all_conditions_must_hold() {
        let r = router(TABLE);
        let receipt = parse(br#"{"origin":"MMS_MT","code":"n102"}"#, None).unwrap();
        assert_eq!(r.route(&receipt).routes, vec!["receipts"]);
        let failed = parse(br#"{"origin":"MMS_MT","code":"E101"}"#, None).unwrap();
        assert_eq!(r.route(&failed).routes, vec!["everything"]);
    }

    #[test]
    fn no_route_means_no_targets() {
        let r = router("routes:\n  - match: {code: N999}\n    targets: [x]\n");
        assert_eq!(r.route(&postback("")), Decision::default());
    }
}
