#!/usr/bin/env bash
# The test command (README): unit tests, integration tests against the real embedded broker,
# SQLite and PostgreSQL, the CLI's errors, and the multi-process chaos test (about 3.5 minutes).
# Release mode: the end-to-end tests push 100,000+ lines through Kafka twice.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --locked -- --test-threads=1 "$@"
