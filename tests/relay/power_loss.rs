//! Power loss under load: "200 means on disk" with `store.sync: full`.
//!
//! `process/` kills the relay, but a SIGKILL leaves the kernel's page cache
//! intact: it cannot tell an fsync'd postback from one that is only written.
//! Here the real binary keeps its store on `lossyfs` (tests/lossyfs), a FUSE
//! file system that loses every byte, size change and directory entry that no
//! fsync made durable. Under concurrent load, at a random moment, the power
//! is cut: the file system freezes (no write lands after the cut), the relay
//! is SIGKILLed, the unsynced state is dropped and the durable one mounted
//! again; then the relay restarts on it. After several cuts every postback
//! that was answered 200 must be delivered.
//!
//! The target is down (a closed port) while the power is cut, as when the
//! internal webhook is in trouble: every acknowledged postback must survive
//! every cut in the store, none is out of danger early by being delivered.
//! At the end the target comes back and the relay must deliver them all.
//!
//! A control run with `store.sync: normal` (fsync at checkpoints only) shows
//! the test bites: it prints how many acknowledged postbacks it lost, and
//! does not fail when it happens to lose none.
//!
//! It needs root and /dev/fuse (CI runs as root; `.ci/run` installs fuse3):
//! without them it fails and says what is missing.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::process::*;
use crate::common::*;
use lossyfs::Volume;

/// Power cuts per run.
const ROUNDS: usize = 4;
/// Load runs this long, plus up to [`JITTER_MS`], before each cut.
const MIN_RUN_MS: u64 = 300;
const JITTER_MS: u64 = 1200;
/// Retries slow enough not to flood the store while the target is down.
const SLOW_DELIVERY: &str =
    "delivery:\n  backoff: {initial: 500ms, max: 1s}\n  max_attempts: 1000\n";
/// No one listens on port 1: deliveries fail at once while the power is cut.
const DOWN: &str = "http://127.0.0.1:1/inbox";

/// What one run saw.
struct Outcome {
    acknowledged: usize,
    lost: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_postbacks_survive_power_cuts_with_sync_full() {
    let outcome = run_with_power_cuts("full", Duration::from_secs(30)).await;
    assert!(
        outcome.lost.is_empty(),
        "sync full: {} of {} acknowledged postbacks lost to power cuts, e.g. {:?}",
        outcome.lost.len(),
        outcome.acknowledged,
        &outcome.lost[..outcome.lost.len().min(5)]
    );
    println!(
        "sync full: {} acknowledged postbacks, none lost",
        outcome.acknowledged
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_with_sync_normal_loses_acknowledged_postbacks() {
    let outcome = run_with_power_cuts("normal", Duration::from_secs(10)).await;
    if outcome.lost.is_empty() {
        println!(
            "control (sync normal): no acknowledged postback lost this time ({} acknowledged): \
             the cuts fell after checkpoints",
            outcome.acknowledged
        );
    } else {
        println!(
            "control (sync normal): {} of {} acknowledged postbacks lost to power cuts, as expected",
            outcome.lost.len(),
            outcome.acknowledged
        );
    }
}

/// Runs the relay with `store.sync: <sync>` on lossyfs through [`ROUNDS`]
/// power cuts under load, then delivers with the target up and returns what
/// was acknowledged and is still missing after `deliver_within`.
async fn run_with_power_cuts(sync: &str, deliver_within: Duration) -> Outcome {
    if let Err(why) = lossyfs::prerequisites() {
        panic!("the power-loss test cannot run: {why}");
    }
    tokio::time::timeout(Duration::from_secs(90), async {
        let sink = Sink::start().await;
        let mount = tempfile::tempdir().expect("mount point");
        let outside = tempfile::tempdir().expect("config dir");
        let mut volume = tokio::task::block_in_place(|| Volume::mount(mount.path()))
            .unwrap_or_else(|err| panic!("cannot mount lossyfs: {err}"));
        // The config is outside the lossy volume; the store is on it.
        let config = outside.path().join("relay.yaml");
        let store_dir = mount.path().to_owned();
        let write_config = |target: &str| {
            let rest = format!(
                "  sync: {sync}\n{SLOW_DELIVERY}targets:\n  inbox: {{url: \"{target}\", timeout: 2s}}\n\
                 routes:\n  - targets: [inbox]\n"
            );
            std::fs::write(&config, config_yaml(&store_dir, &rest)).expect("write config");
        };
        write_config(DOWN);
        let mut random = Random::seeded();
        let mut acknowledged = BTreeMap::new();
        for round in 0..ROUNDS {
            let relay = RelayProcess::spawn(&config).await;
            let load = Load::start(&relay.url, &format!("{sync}{round}"), 4, OnFault::Stop);
            let run_for = MIN_RUN_MS + random.below(JITTER_MS);
            tokio::time::sleep(Duration::from_millis(run_for)).await;
            // Mark first, so every failure from here on is the cut's doing.
            load.expect_faults();
            tokio::task::block_in_place(|| {
                volume.freeze();
                // Not `kill()`: it waits for the exit, and a process in the
                // middle of a file request exits once the cut fails it.
                relay.signal("KILL");
                volume.power_cut()
            })
            .unwrap_or_else(|err| panic!("round {round}: power cut: {err}"));
            drop(relay);
            let sent = load.finish().await;
            assert!(sent.unexpected.is_empty(), "{:?}", sent.unexpected);
            assert!(
                !sent.acknowledged.is_empty(),
                "round {round}: nothing acknowledged"
            );
            println!(
                "sync {sync}, round {round}: power cut after {run_for} ms, {} acknowledged, \
                 {} requests cut off",
                sent.acknowledged.len(),
                sent.cut_off
            );
            acknowledged.extend(sent.acknowledged);
        }
        write_config(&sink.url("/inbox"));
        let relay = RelayProcess::spawn(&config).await;
        let (_, lost) = deliveries(&sink, &acknowledged, deliver_within).await;
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
        Outcome {
            acknowledged: acknowledged.len(),
            lost,
        }
    })
    .await
    .expect("the power-loss run ends within 90 s")
}

/// Where the cuts fall: a different run each time (the seed is printed, so
/// a failure can be told from another).
struct Random(u64);

impl Random {
    fn seeded() -> Random {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |t| t.as_nanos() as u64)
            | 1;
        println!("power cut moments: seed {seed}");
        Random(seed)
    }

    /// xorshift64: plenty for picking moments.
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}
