#!/usr/bin/env bash
# The benchmark of issue 4 in one command, on a fresh machine: builds the
# release binaries (the relay, and relay-bench: the workspace crate bench/,
# which the relay's own build never compiles) and runs every scenario.
# Arguments go to relay-bench:
#   bench/run.sh                  # all scenarios, 3 alternations each (~5 min)
#   bench/run.sh --quick          # 1 alternation, short runs (~1 min)
#   bench/run.sh --only S1,S3 --rounds 5
#   bench/run.sh --load wrk       # S1-S3 with wrk sending the requests
# Needs only the Rust toolchain and a C compiler (SQLite is bundled): the
# load generator is part of relay-bench. `--load wrk` has wrk (Debian package
# wrk) send the requests instead, to the relay and the baseline alike; this
# script installs wrk with apt-get when it is missing. Linux only (/proc for
# memory). Results: the table on stdout, JSON in target/relay-bench/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "bench/run.sh: cargo not found; install the Rust toolchain first" >&2
    exit 1
fi
wants_wrk=false
previous=
for arg in "$@"; do
    if [ "$arg" = "--load=wrk" ] || { [ "$previous" = "--load" ] && [ "$arg" = "wrk" ]; }; then
        wants_wrk=true
    fi
    previous="$arg"
done
if $wants_wrk && ! command -v wrk >/dev/null 2>&1; then
    echo "bench/run.sh: --load wrk needs wrk: installing Debian's package wrk with apt-get" >&2
    if ! { apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null; }; then
        echo "bench/run.sh: could not install wrk (Debian: apt-get install wrk); install it and run again" >&2
        exit 1
    fi
fi
cargo build --release --locked -p postback-relay --bin postback-relay -p relay-bench --bin relay-bench
exec "${CARGO_TARGET_DIR:-target}/release/relay-bench" --no-build "$@"
