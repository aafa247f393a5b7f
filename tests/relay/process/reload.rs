//! Reloading a running relay: SIGHUP reloads the TLS certificate and the
//! routes (refusing a broken file), and a watched file reloads on change.

use std::time::Duration;

use crate::common::process::*;
use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tls_certificate() {
    use tokio::io::AsyncWriteExt;
    if skip_unless(Backend::Sqlite, "TLS reload does not involve the store") {
        return;
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let first = tls::write_certificate(dir.path());
        let config = write_config(
            dir.path(),
            &format!(
                "tls:\n  cert: {}\n  key: {}\n",
                dir.path().join("cert.pem").display(),
                dir.path().join("key.pem").display()
            ),
        );
        let relay = RelayProcess::spawn(&config).await;
        let addr: std::net::SocketAddr = relay
            .url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let post = |id: &str| {
            raw::post_bytes(
                addr,
                "/sinch/postback",
                "text/xml",
                &mo_xml(id, "all", "28444"),
            )
        };
        let mut before = tls::connect(addr, &first).await;
        before.write_all(&post("HUP-1")).await.unwrap();
        assert_eq!(
            raw::read_response(&mut before, Duration::from_secs(10))
                .await
                .status,
            200
        );

        let second = tls::write_certificate(dir.path());
        relay.signal("HUP");
        let reloaded = async {
            loop {
                if relay.log().contains("TLS certificate reloaded") {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), reloaded)
            .await
            .unwrap_or_else(|_| panic!("no reload logged:\n{}", relay.log()));
        let mut after = tls::connect(addr, &second).await;
        after.write_all(&post("HUP-2")).await.unwrap();
        assert_eq!(
            raw::read_response(&mut after, Duration::from_secs(10))
                .await
                .status,
            200
        );
        // The connection from before the reload is still served.
        before.write_all(&post("HUP-3")).await.unwrap();
        assert_eq!(
            raw::read_response(&mut before, Duration::from_secs(10))
                .await
                .status,
            200
        );
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
    })
    .await
    .expect("the SIGHUP test ends within 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_routes_and_refuses_a_broken_file() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let sink = Sink::start().await;
        let store = TestStore::new();
        let targets = format!(
            "targets:\n  a: {{url: \"{}\"}}\n  b: {{url: \"{}\"}}\n",
            sink.url("/a"),
            sink.url("/b")
        );
        let config = store.write_config(&format!("{targets}routes:\n  - targets: [a]\n"));
        let relay = RelayProcess::spawn(&config).await;
        let wait_log = |needle: &'static str| {
            let relay = &relay;
            async move {
                eventually(Duration::from_secs(10), needle, || async move {
                    relay.log().contains(needle).then_some(())
                })
                .await
            }
        };
        // A broken file: refused, the relay keeps serving with its routes.
        std::fs::write(&config, "routes: [this is not a route]\n").unwrap();
        relay.signal("HUP");
        wait_log("config reload refused").await;
        let (status, _) = post(&relay.url, None, mo_xml("HUP-R1", "all", "28444")).await;
        assert_eq!(status, 200);
        sink.wait_for("/a", 1, Duration::from_secs(10)).await;
        // A good one: applied to the next postback.
        store.write_config(&format!("{targets}routes:\n  - targets: [b]\n"));
        relay.signal("HUP");
        wait_log("config reloaded").await;
        let (status, _) = post(&relay.url, None, mo_xml("HUP-R2", "all", "28444")).await;
        assert_eq!(status, 200);
        let got = sink.wait_for("/b", 1, Duration::from_secs(10)).await;
        assert_eq!(got[0].json()["data"]["tracking_id"], "HUP-R2");
        assert_eq!(
            relay
                .metric(r#"relay_config_reloads_total{result="refused"}"#)
                .await,
            Some(1.0)
        );
        let (exit, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(exit.success(), "{}", lines.join("\n"));
    })
    .await
    .expect("within 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reloads_when_the_file_changes_even_through_a_symlink_swap() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let sink = Sink::start().await;
        let store = TestStore::new();
        let targets = format!(
            "targets:\n  a: {{url: \"{}\"}}\n  b: {{url: \"{}\"}}\n",
            sink.url("/a"),
            sink.url("/b")
        );
        // As Kubernetes mounts a ConfigMap: the file is a symlink into a
        // directory that an update replaces by swapping the link.
        let dir = store.path();
        let version = |name: &str, routes: &str| {
            let versioned = dir.join(name);
            std::fs::create_dir_all(&versioned).unwrap();
            std::fs::write(
                versioned.join("relay.yaml"),
                store.config_yaml(&format!("{targets}{routes}")),
            )
            .unwrap();
            versioned
        };
        let config = dir.join("mounted.yaml");
        let v1 = version("v1", "routes:\n  - targets: [a]\n");
        std::os::unix::fs::symlink(v1.join("relay.yaml"), &config).unwrap();
        let config_arg = config.clone();
        let relay = tokio::task::spawn_blocking(move || {
            RelayProcess::start_with(&config_arg, &["--watch"])
        })
        .await
        .unwrap();
        let reloads = |result: &'static str| {
            let relay = &relay;
            async move {
                relay
                    .metric(&format!(
                        r#"relay_config_reloads_total{{result="{result}"}}"#
                    ))
                    .await
                    .unwrap_or(0.0)
            }
        };

        let v2 = version("v2", "routes:\n  - targets: [b]\n");
        let swap = dir.join("swap.yaml");
        std::os::unix::fs::symlink(v2.join("relay.yaml"), &swap).unwrap();
        std::fs::rename(&swap, &config).unwrap();
        eventually(Duration::from_secs(10), "the swap applied", || async {
            (reloads("applied").await == 1.0).then_some(())
        })
        .await;
        let (status, _) = post(&relay.url, None, mo_xml("W-1", "all", "28444")).await;
        assert_eq!(status, 200);
        let got = sink.wait_for("/b", 1, Duration::from_secs(10)).await;
        assert_eq!(got[0].json()["data"]["tracking_id"], "W-1");

        // A broken edit in place: refused, b stays; nothing reloads while
        // the file stays the same.
        std::fs::write(v2.join("relay.yaml"), "routes: [this is not a route]\n").unwrap();
        eventually(
            Duration::from_secs(10),
            "the broken file refused",
            || async { (reloads("refused").await == 1.0).then_some(()) },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(reloads("refused").await, 1.0, "one change, one reload");
        assert_eq!(reloads("applied").await, 1.0);
        let (status, _) = post(&relay.url, None, mo_xml("W-2", "all", "28444")).await;
        assert_eq!(status, 200);
        sink.wait_for("/b", 2, Duration::from_secs(10)).await;
        assert!(sink.received_on("/a").is_empty());
        let (exit, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(exit.success(), "{}", lines.join("\n"));
    })
    .await
    .expect("within 60 s");
}
