#!/usr/bin/env bash
# The performance benchmark of the README: builds the release binary and the bare-producer
# baseline, then runs bench/run.py, which prints one table (figure, value, target, ratio).
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth) for the multi-process rows, and GoAccess
# (installed with apt-get when missing and running as root). Knobs: see bench/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/pageviews-target}"
cargo build --release --locked --quiet --bin pageviews --example bare_producer
exec python3 bench/run.py "$@"
