//! The config's loading and validation, through files as users write them.

use super::*;

/// Loads `yaml` from a temporary file: the config, or every problem as
/// (key, message).
fn load(yaml: &str) -> Result<Config, Vec<(String, String)>> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.yaml");
    std::fs::write(&path, yaml).unwrap();
    match Config::load(&path) {
        Ok(config) => Ok(config),
        Err(ConfigError::Invalid { file, problems }) => {
            assert_eq!(file, path.display().to_string());
            Err(problems.into_iter().map(|p| (p.key, p.message)).collect())
        }
        Err(other) => panic!("not a key problem: {other}"),
    }
}

fn problem<'p>(problems: &'p [(String, String)], key: &str) -> &'p str {
    problems
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, message)| message.as_str())
        .unwrap_or_else(|| panic!("no problem at `{key}` in {problems:#?}"))
}

#[test]
fn every_problem_of_a_file_is_reported_at_once() {
    let problems = load(
        "delivery:\n  timeout: 0s\n  concurrency: 0\n  backoff: {initial: 20m, max: 10m, multiplier: 0.5}\n\
         ingest: {max_connections: many, max_connections_per_source: 0}\n\
         quarantine: {retention: 0s}\n\
         targets:\n  inbox:\n    url: http://127.0.0.1:9/\n    timout: 5s\n    secret: hunter2\n    timeout: 0s\n    backoff: {max: 1s}\n\
         routes:\n  - targets: [inbx]\n  - targets: [inbox]\n    match: {colour: red}\n",
    )
    .unwrap_err();
    assert!(problem(&problems, "delivery.timeout").contains("0s"));
    assert!(problem(&problems, "delivery.concurrency").contains("at least 1"));
    assert!(problem(&problems, "quarantine.retention").contains("0s"));
    problem(&problems, "ingest.max_connections_per_source");
    let backoff = problem(&problems, "delivery.backoff.initial");
    assert!(
        backoff.contains("20m") && backoff.contains("10m"),
        "{backoff}"
    );
    assert!(problem(&problems, "delivery.backoff.multiplier").contains("0.5"));
    assert!(problem(&problems, "ingest.max_connections").contains("many"));
    assert_eq!(
        problem(&problems, "targets.inbox.timout"),
        "unknown key `timout` in targets.inbox: did you mean `timeout`?"
    );
    assert!(problem(&problems, "targets.inbox.secret").contains("whsec_"));
    assert!(problem(&problems, "targets.inbox.timeout").contains("0s"));
    // The override makes the target's max smaller than the global initial.
    assert!(problem(&problems, "targets.inbox.backoff.max").contains("initial"));
    assert!(problem(&problems, "routes[0].targets").contains("did you mean `inbox`?"));
    assert!(problem(&problems, "routes[1].match.colour").contains("unknown key"));
    assert_eq!(problems.len(), 13, "{problems:#?}");
}

#[test]
fn a_value_refused_for_its_type_is_not_reported_twice() {
    let problems = load("targets:\n  a: {url: \"http://127.0.0.1:9/\"}\nroutes:\n  - targets: a\n")
        .unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].0 == "routes[0].targets", "{problems:#?}");
}

#[test]
fn the_standard_webhooks_secret_and_the_shipped_config_pass() {
    load("targets:\n  inbox: {url: \"http://127.0.0.1:9/\", secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}\nroutes:\n  - targets: [inbox]\n")
        .unwrap();
    Config::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/relay.yaml"
    )))
    .unwrap();
}

#[test]
fn secret_headers_come_from_the_environment_or_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "from-a-file\n").unwrap();
    let config = load(&format!(
        "targets:\n  inbox:\n    url: http://127.0.0.1:9/\n    headers:\n      X-Team: mms\n      X-Key: {{file: {}}}\n",
        key_file.display()
    ))
    .unwrap();
    let headers: Vec<(&str, &[u8])> = config.targets["inbox"]
        .headers
        .iter()
        .map(|(name, header)| (name.0.as_str(), header.value.as_bytes()))
        .collect();
    assert_eq!(
        headers,
        [("x-key", &b"from-a-file"[..]), ("x-team", &b"mms"[..])]
    );
    // Where a secret came from is shown, never the secret.
    let shown = format!("{config:?}");
    assert!(
        shown.contains("x-key") && !shown.contains("from-a-file"),
        "{shown}"
    );

    let problems = load(
        "targets:\n  inbox:\n    url: http://127.0.0.1:9/\n    headers: {X-Api-Key: {env: RELAY_TEST_NO_SUCH_VARIABLE}}\n",
    )
    .unwrap_err();
    assert!(problem(&problems, "targets.inbox.headers.X-Api-Key")
        .contains("RELAY_TEST_NO_SUCH_VARIABLE"));
}

#[test]
fn a_target_backoff_is_checked_with_the_defaults_it_inherits() {
    let problems =
        load("targets:\n  slow: {url: \"http://127.0.0.1:9/\", backoff: {initial: 1h}}\n")
            .unwrap_err();
    assert!(problem(&problems, "targets.slow.backoff.initial").contains("1h"));
    assert_eq!(problems.len(), 1, "{problems:#?}");
}

#[test]
fn header_names_are_checked_at_their_key() {
    let problems = load(
        "targets:\n  inbox:\n    url: http://127.0.0.1:9/\n    headers: {\"Bad Name\": x, X-Ok: \"a\\nb\"}\n",
    )
    .unwrap_err();
    assert!(problem(&problems, "targets.inbox.headers.Bad Name").contains("header name"));
    assert!(problem(&problems, "targets.inbox.headers.X-Ok").contains("header value"));
    assert_eq!(problems.len(), 2, "{problems:#?}");
}

#[test]
fn a_changed_secret_changes_the_config_and_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    let yaml = format!(
        "targets:\n  inbox:\n    url: http://127.0.0.1:9/\n    secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n    headers: {{X-Key: {{file: {}}}}}\n",
        key_file.display()
    );
    std::fs::write(&key_file, "first-secret").unwrap();
    let first = load(&yaml).unwrap();
    assert_eq!(first, load(&yaml).unwrap());
    std::fs::write(&key_file, "second-secret").unwrap();
    let second = load(&yaml).unwrap();
    assert_ne!(first.targets["inbox"], second.targets["inbox"]);
    let shown = format!("{second:?}");
    assert!(
        !shown.contains("second-secret") && !shown.contains("MfKQ9r8"),
        "{shown}"
    );
}
