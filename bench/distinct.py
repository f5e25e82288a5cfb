#!/usr/bin/env python3
"""Bounded tables under a flood of distinct values (issue 19): rows and dashboard latency.

For each input size N, one access log of N lines in which every line has a path and a referrer
host never seen before (a scanner, a referrer spammer) goes through
`pageviews demo --input FILE --exit-when-drained` (memory broker, SQLite statistics, default
`--keep-values`). Then this script counts the rows of the dimension tables and times
`GET /api/dashboard` against `pageviews serve` on that database. The last row runs the largest
input again without a bound (`--keep-values` and `--top-k` far above N): the shape the tables
took before, in a run long enough for every flush to add its own new values.

Run: python3 bench/distinct.py (after `cargo build --release`). Knobs: DISTINCT_SIZES
(default 100000,300000,1000000), DISTINCT_REQUESTS (default 50).
"""

import os
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

TARGET = Path(os.environ.get("CARGO_TARGET_DIR", "/var/tmp/pageviews-target"))
BIN = str(TARGET / "release" / "pageviews")
SIZES = [int(x) for x in os.environ.get("DISTINCT_SIZES", "100000,300000,1000000").split(",")]
REQUESTS = int(os.environ.get("DISTINCT_REQUESTS", "50"))


def write_input(path, n):
    """n lines, each with a new path and referrer host, spread over one day of 2026."""
    x = 0x2545F4914F6CDD1D
    mask = (1 << 64) - 1
    with open(path, "w") as f:
        for i in range(n):
            x ^= (x << 13) & mask
            x ^= x >> 7
            x ^= (x << 17) & mask
            second = i * 86400 // n
            stamp = f"01/Jan/2026:{second // 3600:02}:{second // 60 % 60:02}:{second % 60:02}"
            f.write(
                f'81.2.69.142 - - [{stamp} +0000] "GET /scan/{x:016x} HTTP/1.1" 404 120 '
                f'"https://spam-{x >> 20:x}.example/" "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0"\n'
            )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_latency(db):
    port = free_port()
    server = subprocess.Popen(
        [BIN, "serve", "--database", f"sqlite://{db}", "--brokers", "127.0.0.1:1",
         "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/dashboard"
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(url, timeout=30).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        times = []
        for _ in range(REQUESTS):
            t = time.perf_counter()
            urllib.request.urlopen(url, timeout=30).read()
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        return statistics.median(times), times[int(len(times) * 0.95) - 1]
    finally:
        server.terminate()
        server.wait()


def run(n, keep):
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        log = work / "in.log"
        write_input(log, n)
        cmd = [BIN, "demo", "--input", str(log), "--exit-when-drained", "--broker-storage",
               "memory", "--listen", "127.0.0.1:0", "--data-dir", str(work / "data")]
        if keep:
            # Unbounded, as before: no compaction, and no top-K folding within a flush either
            # (in a long run every flush adds its own new values; this run has few flushes).
            cmd += ["--keep-values", str(keep), "--top-k", str(keep)]
        t = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.time() - t
        db = work / "data" / "pageviews.db"
        con = sqlite3.connect(db)
        all_time = con.execute(
            "SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM dimension_counts GROUP BY dimension)"
        ).fetchone()[0]
        hourly = con.execute(
            "SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM dimension_hours GROUP BY dimension, hour)"
        ).fetchone()[0]
        total = con.execute("SELECT COUNT(*) FROM dimension_counts").fetchone()[0]
        total += con.execute("SELECT COUNT(*) FROM dimension_hours").fetchone()[0]
        visits = con.execute(
            "SELECT SUM(visits) FROM dimension_counts WHERE dimension = 'path'"
        ).fetchone()[0]
        con.close()
        assert visits == n, f"paths sum to {visits}, not {n}"
        median, p95 = dashboard_latency(db)
        return seconds, all_time, hourly, total, median, p95


def main():
    print("| distinct paths and referrers | --keep-values | demo s | max rows per dimension "
          "| max rows per dimension and hour | dimension rows in all | /api/dashboard median ms "
          "| p95 ms |")
    print("|---|---|---|---|---|---|---|---|")
    runs = [(n, None) for n in SIZES] + [(SIZES[-1], 100 * SIZES[-1])]
    for n, keep in runs:
        seconds, all_time, hourly, total, median, p95 = run(n, keep)
        print(f"| {n:,} | {keep if keep else 'default (1,000)'} | {seconds:.1f} | {all_time:,} "
              f"| {hourly:,} | {total:,} | {median:.1f} | {p95:.1f} |", flush=True)


if __name__ == "__main__":
    main()
