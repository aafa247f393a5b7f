//! `postback-relay health`: the container HEALTHCHECK asks the admin listener.

use std::process::Command;

use crate::common::*;

fn health(config: &std::path::Path, live: bool) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_postback-relay"));
    command.arg("health").arg("--config").arg(config);
    if live {
        command.arg("--live");
    }
    let output = command.output().expect("run the CLI");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_admin_listener() {
    let relay = start_relay("").await;
    let admin = relay.handle.as_ref().unwrap().admin_addr;
    // The config a HEALTHCHECK would read: the relay's, with its real admin port.
    let config = relay.store.path().join("health.yaml");
    std::fs::write(&config, format!("admin_listen: {admin}\n")).unwrap();
    let probe = config.clone();
    let (code, said) = tokio::task::spawn_blocking(move || health(&probe, false))
        .await
        .unwrap();
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("/readyz: 200"), "{said}");
    let probe = config.clone();
    let (code, said) = tokio::task::spawn_blocking(move || health(&probe, true))
        .await
        .unwrap();
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("/healthz: 200"), "{said}");
    let _store = relay.shutdown().await;
    let (code, said) = tokio::task::spawn_blocking(move || health(&config, false))
        .await
        .unwrap();
    assert_eq!(code, 1, "a stopped relay is not healthy: {said}");
}
