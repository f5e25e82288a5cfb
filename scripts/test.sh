#!/usr/bin/env bash
# The test command (README): unit tests, integration tests against the real embedded broker
# and SQLite. Release mode: the end-to-end tests push 100,000+ lines through Kafka twice.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --locked -- --test-threads=1 "$@"
