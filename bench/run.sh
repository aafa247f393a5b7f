#!/usr/bin/env bash
# The benchmark of issue 4 in one command, on a fresh machine: builds the
# release binaries (the relay and relay-bench) and runs every scenario.
# Arguments go to relay-bench:
#   bench/run.sh                  # all scenarios, 3 alternations each (~5 min)
#   bench/run.sh --quick          # 1 alternation, short runs (~1 min)
#   bench/run.sh --only S1,S3 --rounds 5
# Needs only the Rust toolchain and a C compiler (SQLite is bundled); no wrk:
# the load generator is part of relay-bench. Linux only (/proc for memory).
# Results: the table on stdout, JSON in target/relay-bench/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "bench/run.sh: cargo not found; install the Rust toolchain first" >&2
    exit 1
fi
cargo build --release --locked --bin postback-relay --bin relay-bench
exec "${CARGO_TARGET_DIR:-target}/release/relay-bench" --no-build "$@"
