#!/usr/bin/env bash
# End-to-end throughput: `demo --input <N generated lines> --exit-when-drained`, through the
# embedded broker twice (raw lines, then events), on memory and on SQLite broker storage.
# Prints the demo's summary line for each. Usage: bench/end-to-end.sh [LINES]
set -euo pipefail
cd "$(dirname "$0")/.."
lines="${1:-1000000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/pageviews-target}"
cargo build --release --locked --quiet
bin="$CARGO_TARGET_DIR/release/pageviews"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" generate --lines "$lines" --seed 1 > "$work/access.log"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; input: $lines lines, $(du -h "$work/access.log" | cut -f1)"
echo "preprocess core:"
cargo bench --locked --quiet --bench preprocess 2>/dev/null | sed 's/^/  /'
for storage in memory sqlite; do
  rm -rf "$work/data"
  printf 'demo, broker storage %-7s ' "$storage:"
  "$bin" --data-dir "$work/data" demo --input "$work/access.log" --exit-when-drained \
    --broker-storage "$storage" --listen 127.0.0.1:0 --flush-interval 1s 2>"$work/demo-$storage.log" | grep '^drained'
done
