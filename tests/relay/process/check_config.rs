//! `check-config`: good files pass, bad ones are refused naming the culprit
//! and every problem at once, and the Kubernetes config maps are valid.

use std::time::Duration;

use crate::common::process::*;
use crate::common::*;

#[test]
fn check_config_accepts_good_files_and_names_the_culprit_in_bad_ones() {
    if skip_unless(
        Backend::Sqlite,
        "config checks are the same for every backend",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, yaml: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, yaml).unwrap();
        let path_text = path.display().to_string();
        let (status, stdout, stderr) = run_to_end(
            &["check-config", "--config", &path_text],
            Duration::from_secs(20),
        );
        (path_text, status, stdout, stderr)
    };

    let good = config_yaml(
        dir.path(),
        "targets:\n  inbox: {url: \"http://127.0.0.1:9/hook\"}\nroutes:\n  - targets: [inbox]\n",
    );
    let (path, status, stdout, stderr) = check("good.yaml", &good);
    assert!(status.success(), "{status}: {stderr}");
    assert!(stdout.contains("OK"), "{stdout}");
    assert!(stdout.contains(&path), "{stdout}");

    for (name, yaml, key) in [
        (
            "unknown-key.yaml",
            "ingest: {colour: red}\n",
            "ingest.colour",
        ),
        (
            "bad-duration.yaml",
            "ingest: {dedupe_window: 5 parsecs}\n",
            "ingest.dedupe_window",
        ),
        (
            "missing-target.yaml",
            "targets:\n  inbox: {url: \"http://127.0.0.1:9/\"}\nroutes:\n  - targets: [nowhere]\n",
            "routes[0].targets",
        ),
        (
            "bad-url.yaml",
            "targets:\n  x: {url: \"ftp://x\"}\n",
            "targets.x.url",
        ),
        (
            "postgres-without-url.yaml",
            "store: {backend: postgres}\n",
            "store.url",
        ),
        (
            "postgres-bad-url.yaml",
            "store: {backend: postgres, url: \"postgres://relay@db:notaport/relay\"}\n",
            "store.url",
        ),
        (
            "url-but-sqlite.yaml",
            "store: {url: \"postgres://relay@db/relay\"}\n",
            "store.url",
        ),
        (
            "postgres-password-missing.yaml",
            "store: {backend: postgres, url: \"postgres://relay@db/relay\", password: {env: RELAY_TEST_NO_SUCH_VARIABLE}}\n",
            "store.password",
        ),
        (
            "postgres-short-lease.yaml",
            "store: {backend: postgres, url: \"postgres://relay@db/relay\", lease: 5s}\ndelivery: {timeout: 10s}\n",
            "store.lease",
        ),
        (
            "unknown-backend.yaml",
            "store: {backend: mysql}\n",
            "store.backend",
        ),
    ] {
        let (path, status, stdout, stderr) = check(name, yaml);
        assert!(!status.success(), "{name} accepted: {stdout}");
        assert!(
            stderr.contains(&path),
            "{name}: file not named in {stderr:?}"
        );
        assert!(
            stderr.contains(key),
            "{name}: `{key}` not named in {stderr:?}"
        );
    }
    // A PostgreSQL store is checked without connecting; the password never shows.
    let (_, status, stdout, stderr) = check(
        "postgres.yaml",
        "store:\n  backend: postgres\n  url: \"postgres://relay:hunter2@db.internal:6432/relay\"\n  pool_size: 6\n",
    );
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stdout.contains("store postgres db.internal:6432/relay"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"), "{stdout}");

    let missing = dir.path().join("does-not-exist.yaml").display().to_string();
    let (status, stdout, stderr) = run_to_end(
        &["check-config", "--config", &missing],
        Duration::from_secs(20),
    );
    assert!(!status.success(), "missing file accepted: {stdout}");
    assert!(
        stderr.contains(&missing),
        "missing file not named: {stderr}"
    );

    // `run` refuses an invalid config before it listens on anything.
    let bad = dir.path().join("bad-run.yaml");
    std::fs::write(
        &bad,
        config_yaml(dir.path(), "targets:\n  x: {url: \"ftp://x\"}\n"),
    )
    .unwrap();
    let bad = bad.display().to_string();
    let (status, _, stderr) = run_to_end(
        &["run", "--config", &bad, "--log-format", "json"],
        Duration::from_secs(20),
    );
    assert!(!status.success(), "run started with an invalid config");
    assert!(stderr.contains("targets.x.url"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
}

/// Every problem of a file in one run, each on its own line with the file
/// and the key; an unknown key gets the closest known one.
#[test]
fn check_config_reports_every_problem_of_a_file_at_once() {
    if skip_unless(
        Backend::Sqlite,
        "config checks are the same for every backend",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many-problems.yaml");
    std::fs::write(
        &path,
        config_yaml(
            dir.path(),
            "delivery:\n  timeout: 0s\n  backoff: {initial: 20m, max: 10m}\n\
             targets:\n  inbox:\n    url: \"http://127.0.0.1:9/hook\"\n    timout: 5s\n    secret: not-a-whsec-key\n\
             \x20   headers: {X-Api-Key: {env: RELAY_TEST_NO_SUCH_VARIABLE}}\n\
             routes:\n  - targets: [inbx]\n",
        ),
    )
    .unwrap();
    let path = path.display().to_string();
    let expected = [
        ("delivery.timeout", "0s"),
        ("delivery.backoff.initial", "20m"),
        ("targets.inbox.timout", "did you mean `timeout`?"),
        ("targets.inbox.secret", "whsec_"),
        (
            "targets.inbox.headers.X-Api-Key",
            "RELAY_TEST_NO_SUCH_VARIABLE",
        ),
        ("routes[0].targets", "inbx"),
    ];
    for command in ["check-config", "run"] {
        let (status, stdout, stderr) =
            run_to_end(&[command, "--config", &path], Duration::from_secs(20));
        assert_eq!(status.code(), Some(2), "{command}: {stdout}{stderr}");
        let problems: Vec<&str> = stderr
            .lines()
            .filter(|line| line.starts_with(&format!("invalid config {path}: ")))
            .collect();
        for (key, value) in expected {
            assert!(
                problems
                    .iter()
                    .any(|line| line.contains(&format!(": {key}: ")) && line.contains(value)),
                "{command}: no line for `{key}` with `{value}` in:\n{stderr}"
            );
        }
        assert_eq!(problems.len(), expected.len(), "{command}:\n{stderr}");
        // `run` refuses before it opens the store or listens on anything.
        assert!(!stderr.contains("listening"), "{command}: {stderr}");
        assert!(
            !dir.path().join("relay.db").exists(),
            "{command} opened the store"
        );
    }
}

#[test]
fn the_kubernetes_config_maps_hold_valid_configs() {
    if skip_unless(
        Backend::Sqlite,
        "config checks are the same for every backend",
    ) {
        return;
    }
    for (variant, store) in [("postgres", "store postgres"), ("sqlite", "store sqlite")] {
        // The `relay.yaml` block of the ConfigMap, as the pods get it.
        let manifest = std::fs::read_to_string(format!(
            "{}/deploy/kubernetes/{variant}/configmap.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("read the ConfigMap");
        let yaml: String = manifest
            .lines()
            .skip_while(|line| line.trim() != "relay.yaml: |")
            .skip(1)
            .take_while(|line| line.is_empty() || line.starts_with("    "))
            .map(|line| format!("{}\n", line.get(4..).unwrap_or_default()))
            .collect();
        assert!(yaml.contains("token_file"), "{variant}: {yaml}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, &yaml).unwrap();
        // What the pod mounts from its Secrets and volumes, here.
        let token = dir.path().join("token");
        std::fs::write(&token, "a-token-from-the-secret-0123456789\n").unwrap();
        let output = relay_command(&["check-config", "--config", path.to_str().unwrap()])
            .env("POSTBACK_RELAY_DB_PASSWORD", "from-the-secret")
            .env("RELAY_ADMIN__TOKEN_FILE", &token)
            .env("RELAY_STORE__PATH", dir.path().join("relay.db"))
            .output()
            .expect("run check-config");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{variant}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains(store), "{variant}: {stdout}");
    }
}
