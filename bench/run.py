#!/usr/bin/env python3
"""The performance benchmark: one command, one table (figure, value, target, ratio).

Run it with `bench/run.sh` (which builds the release binary and the bare-producer example
first). Every figure is measured in this run, on this machine, against a baseline measured in
the same run: GoAccess on the same file, or a bare rdkafka producer to the same broker.

Targets (issue 20, on top of issue 7's):
 1. demo --input <file> --exit-when-drained on the default (durable, SQLite) broker storage:
    >= 1.0x GoAccess 1.11 -j 2; no consumer session times out, /api/countries keeps answering.
 2. The same on memory storage: >= 2.0x GoAccess 1.11 -j 2.
 3. Durable / memory: >= 0.8.
 4. import into the durable broker: >= 0.8x a bare rdkafka producer sending the same lines.
 5. Nothing moves backwards: freshness (p99 import -> /api/countries <= flush interval + 1 s),
    memory flatness (preprocessor and aggregator RSS within 10% between 1M and 10M lines,
    importer RSS constant on a 2 GB input), the multi-process run with kills counts every line
    in <= 2x its memory time; the preprocess core does >= 1,000,000 lines/s on one thread.
 6. CPU-seconds per line, by stage (import, broker, preprocess, aggregate), each stage its own
    process on the durable broker.

GoAccess: the system's (Debian 1.7) and, when GOACCESS points at one, a GoAccess 1.11 binary
run with -j 1 and -j 2. Each gets a GeoIP2-layout country database (GEOIP_DB, or one written
from the bundled database by bench/geoip2_country.py when `mmdb-writer` is installed), so that
it resolves countries as pageviews does; the table says whether it had one.

Knobs (environment): BENCH_LINES (default 1,000,000), BENCH_MULTI_LINES (403,680),
BENCH_BIG_LINES (10,000,000; 0 skips the memory rows), BENCH_KEEP=1 keeps the work directory,
BENCH_ONLY=demo,multi,core,import,stages,freshness,memory (a comma-separated subset; default
all), BENCH_INPUT=<file> measures the demo rows on a real log instead of generated lines,
GOACCESS=<path to goaccess 1.11>, GEOIP_DB=<GeoIP2-Country .mmdb>.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", "/var/tmp/pageviews-target"))
BIN = str(TARGET / "release" / "pageviews")
BARE = str(TARGET / "release" / "examples" / "bare_producer")
LINES = int(os.environ.get("BENCH_LINES", "1000000"))
MULTI_LINES = int(os.environ.get("BENCH_MULTI_LINES", "403680"))
BIG_LINES = int(os.environ.get("BENCH_BIG_LINES", "10000000"))
FLUSH_S = 5.0  # the aggregator's default flush interval
ONLY = {x.strip() for x in os.environ.get("BENCH_ONLY", "").split(",") if x.strip()}


def want(section):
    return not ONLY or section in ONLY

rows = []  # (figure, value, target, ratio, met)
procs = []


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def row(figure, value, target="", ratio="", met=None):
    rows.append((figure, value, target, ratio, {True: "yes", False: "NO", None: ""}[met]))
    log(f"{figure}: {value} {ratio}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A pageviews process with its stderr in a log file."""

    def __init__(self, name, args, work, stdout=subprocess.DEVNULL):
        self.name = name
        self.log = work / f"{name}.log"
        self.popen = subprocess.Popen(
            args, stdout=stdout, stderr=open(self.log, "wb"), start_new_session=True
        )
        self.cpu_seconds = None
        procs.append(self)

    def rss_kib(self, field="VmRSS"):
        """Resident memory now (VmRSS) or its peak so far (VmHWM), in KiB."""
        try:
            status = Path(f"/proc/{self.popen.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(rf"{field}:\s+(\d+) kB", status)
        return int(m.group(1)) if m else None

    def peak_kib(self):
        return self.rss_kib("VmHWM")

    def poll(self):
        """Like Popen.poll, but reaps the process with wait4 to keep its CPU time."""
        if self.popen.returncode is None:
            pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
            if pid:
                self.popen.returncode = os.waitstatus_to_exitcode(status)
                self.cpu_seconds = usage.ru_utime + usage.ru_stime
        return self.popen.returncode

    def cpu_now(self):
        """CPU-seconds (user + system) of the running process so far, from /proc."""
        try:
            fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill9(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def stop(self):
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def text(self):
        return self.log.read_text(errors="replace")


def stop_all():
    for p in reversed(procs):
        p.stop()
    procs.clear()


def api_total(port, timeout=2.0):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/countries", timeout=timeout) as r:
            return json.load(r)["total"]
    except Exception:
        return None


def wait_until(cond, timeout, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def run_timed(args, **kw):
    t = time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, **kw)
    return time.monotonic() - t, out


class Cluster:
    """The multi-process deployment of the README: standalone broker, topics, stages."""

    def __init__(self, work, storage, database):
        self.work = work
        self.port = free_port()
        self.brokers = f"127.0.0.1:{self.port}"
        self.database = database
        self.data = work / "data"
        self.n = 0
        self.broker = Proc(
            f"broker-{storage}",
            [BIN, "--data-dir", str(self.data), "broker", "--listen", self.brokers,
             "--broker-storage", storage],
            work,
        )
        subprocess.run(self.cli("topics"), check=True, capture_output=True, timeout=60)
        self.http = free_port()
        self.serve = self.stage("serve", "--listen", f"127.0.0.1:{self.http}")
        wait_until(lambda: api_total(self.http) is not None, 30)

    def cli(self, *args):
        return [BIN, "--data-dir", str(self.data), "--brokers", self.brokers, "--database",
                self.database, *args]

    def stage(self, command, *args):
        self.n += 1
        return Proc(f"{command}-{self.n}", self.cli(command, *args), self.work)

    def total(self):
        return api_total(self.http)


def sqlite_url(work):
    return f"sqlite://{work}/pageviews.db"


def postgres_url(name):
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc",
                    f"DROP DATABASE IF EXISTS {name}"], check=True, capture_output=True)
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc",
                    f"CREATE DATABASE {name}"], check=True, capture_output=True)
    return f"postgres://postgres@127.0.0.1:5432/{name}"


def geoip_db():
    """A GeoIP2-layout country database for GoAccess, or None."""
    if os.environ.get("GEOIP_DB"):
        return os.environ["GEOIP_DB"]
    cached = Path("/var/tmp/pageviews-bench-geoip2-country.mmdb")
    if not cached.exists():
        log("writing a GeoIP2-layout copy of the bundled country database (once, about 3 min)")
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "geoip2_country.py"),
                              str(cached) + ".tmp"], capture_output=True, text=True)
        if out.returncode != 0:
            log(f"  no GeoIP2 database for GoAccess: {out.stderr.strip()[-300:]}")
            return None
        os.replace(str(cached) + ".tmp", cached)
    return str(cached)


def goaccess(path, binary="goaccess", jobs=None, geoip=None):
    """Seconds GoAccess takes for `path` (COMBINED, JSON report), or None."""
    if binary == "goaccess" and shutil.which("goaccess") is None and os.geteuid() == 0:
        log("installing goaccess (apt-get)")
        subprocess.run(["apt-get", "install", "-y", "-qq", "goaccess"], capture_output=True)
    if shutil.which(binary) is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        args = [binary, str(path), "--log-format=COMBINED", "-o", f"{d}/report.json",
                "--no-progress"]
        if jobs:
            args += ["-j", str(jobs)]
        if geoip:
            args += ["--geoip-database", geoip]
        secs, out = run_timed(args)
        if out.returncode != 0:
            log(f"goaccess failed: {out.stderr[-500:]}")
            return None
        report = json.loads(Path(f"{d}/report.json").read_text())
        valid = report["general"]["valid_requests"]
        countries = len(report.get("geolocation", {}).get("data", []))
        log(f"{binary} -j {jobs}: {valid} valid requests, {countries} continents in {secs:.2f} s")
        return secs


def demo(work, path, storage, lines):
    """`demo --input` with defaults; for SQLite also watches the API and the logs."""
    data = work / f"demo-{storage}"
    port = free_port()
    args = [BIN, "--data-dir", str(data), "demo", "--input", str(path), "--exit-when-drained",
            "--broker-storage", storage, "--listen", f"127.0.0.1:{port}"]
    t = time.monotonic()
    p = Proc(f"demo-{storage}", args, work, stdout=subprocess.PIPE)
    out_lines = []
    reader = threading.Thread(target=lambda: out_lines.extend(p.popen.stdout), daemon=True)
    reader.start()
    polls = failures = 0
    while p.poll() is None:
        time.sleep(1.0)
        if p.poll() is None and time.monotonic() - t > 3:
            answered = api_total(port) is not None
            # A poll that overlapped the demo's own exit (it stops its server once it has
            # printed "drained:") does not count.
            drained = any(b"drained:" in line for line in list(out_lines))
            if not answered and p.poll() is None and not drained:
                failures += 1
                log(f"  /api/countries did not answer within 2 s at {time.monotonic() - t:.1f} s")
            polls += answered or p.poll() is None
    secs = time.monotonic() - t
    reader.join(timeout=5)
    out = b"".join(out_lines).decode()
    procs.remove(p)
    cpu = p.cpu_seconds
    m = re.search(r"counted (\d+)", out)
    counted = int(m.group(1)) if m else -1
    errs = p.text()
    sesstmout = len(re.findall(r"SESSTMOUT|[Ss]ession timed out|MAXPOLL", errs))
    # Each stage (preprocessor, aggregator) is assigned its partitions once at start; every
    # further assignment is a rebalance. (Revocations are no measure: both stages revoke
    # everything when the demo leaves.)
    revoked = max(0, len(re.findall(r"pageviews::\w+: assigned", errs)) - 2)
    shutil.rmtree(data, ignore_errors=True)
    if p.popen.returncode != 0 or counted != lines:
        log(f"demo on {storage} failed (exit {p.popen.returncode}, counted {counted}); log {p.log}")
        return None
    return secs, polls, failures, sesstmout, revoked, cpu


def multi_process(work, path, lines, storage):
    """The issue's scenario: broker, 2 preprocessors, 2 aggregators on PostgreSQL, full-speed
    import; an aggregator SIGKILLed 8 s in and a preprocessor 4 s later, each replaced."""
    w = work / f"multi-{storage}"
    w.mkdir()
    c = Cluster(w, storage, postgres_url(f"pv_bench_{storage}_{os.getpid()}"))
    pre = [c.stage("preprocess"), c.stage("preprocess")]
    agg = [c.stage("aggregate"), c.stage("aggregate")]
    time.sleep(3)
    t = time.monotonic()
    c.stage("import", str(path))
    time.sleep(8)
    agg[0].kill9()
    c.stage("aggregate")
    time.sleep(4)
    pre[0].kill9()
    c.stage("preprocess")
    last = [None, time.monotonic()]

    def done():
        total = c.total()
        if total != last[0]:
            last[0], last[1] = total, time.monotonic()
        return total is not None and total >= lines

    ok = wait_until(done, 900, step=0.5)
    secs = time.monotonic() - t
    total = c.total()
    stop_all()
    if not ok:
        log(f"multi-process on {storage}: {total} of {lines} counted after {secs:.0f} s; logs in {w}")
    return (secs if ok and total == lines else None), total


def preprocess_core():
    out = subprocess.run(["cargo", "bench", "--locked", "--quiet", "--bench", "preprocess"],
                         cwd=ROOT, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        log(f"  {line}")
    m = re.search(r"parse \+ geo \+ user-agent \+ JSON.*= (\d+) lines/s", out.stdout)
    return int(m.group(1)) if m else None


def import_vs_bare(work, path):
    rates = {}
    for who in ["bare", "import"]:
        w = work / f"import-{who}"
        w.mkdir()
        c_port = free_port()
        brokers = f"127.0.0.1:{c_port}"
        data = w / "data"
        Proc(f"broker-{who}", [BIN, "--data-dir", str(data), "broker", "--listen", brokers], w)
        subprocess.run([BIN, "--brokers", brokers, "topics"], check=True, capture_output=True,
                       timeout=60)
        if who == "bare":
            out = subprocess.run([BARE, brokers, "raw-page-views", str(path)], capture_output=True,
                                 text=True)
        else:
            out = subprocess.run([BIN, "--data-dir", str(data), "--brokers", brokers, "import",
                                  str(path)], capture_output=True, text=True)
        log(f"  {who}: {out.stdout.strip()} {out.stderr.strip()[-300:] if out.returncode else ''}")
        m = re.search(r"([\d.]+) lines/s", out.stdout)
        rates[who] = float(m.group(1)) if m and out.returncode == 0 else None
        stop_all()
    return rates["import"], rates["bare"]


def one_of_each(work, name, storage):
    """A standalone broker on `storage`, one preprocessor and one aggregator (SQLite), in the
    work folder `name`, settled for 3 s."""
    w = work / name
    w.mkdir()
    c = Cluster(w, storage, sqlite_url(w))
    pre = c.stage("preprocess")
    agg = c.stage("aggregate")
    time.sleep(3)
    return c, pre, agg


def stages(work, path, lines):
    """CPU-seconds of each stage over `lines` lines, each stage its own process: the broker on
    its durable (SQLite) storage, one import, one preprocessor, one aggregator on SQLite. The
    long-running stages are read from /proc once everything is counted; the importer when it
    exits. The server (`serve`) is left out: it polls nothing and answers only the bench."""
    c, pre, agg = one_of_each(work, "stages", "sqlite")
    base = {"broker": c.broker.cpu_now() or 0, "preprocess": pre.cpu_now() or 0,
            "aggregate": agg.cpu_now() or 0}
    imp = c.stage("import", str(path))
    ok = wait_until(lambda: (c.total() or 0) >= lines, 900, step=0.5)
    while imp.poll() is None:
        time.sleep(0.2)
    db = c.data / "broker.db"
    disk = sum(f.stat().st_size for f in c.data.glob("broker.db*")) if db.exists() else None
    cpu = {"import": imp.cpu_seconds or 0.0,
           "broker": (c.broker.cpu_now() or 0) - base["broker"],
           "preprocess": (pre.cpu_now() or 0) - base["preprocess"],
           "aggregate": (agg.cpu_now() or 0) - base["aggregate"]}
    total = c.total()
    stop_all()
    if not ok or total != lines:
        log(f"stages run: counted {total} of {lines}; logs in {c.work}")
        return None
    return cpu, disk


def freshness(work, path, rate=10_000):
    """Lines imported at `rate`; the time from each line's import to its count in the API.

    A line's import time is taken as the moment the import command was started plus its index
    divided by the rate: the importer's own start-up is counted as latency (an overestimate)."""
    c, _, _ = one_of_each(work, "freshness", "sqlite")
    n = sum(1 for _ in open(path, "rb"))
    samples = []
    t0 = time.monotonic()
    c.stage("import", "--rate", str(rate), str(path))
    deadline = t0 + n / rate + 60
    while time.monotonic() < deadline:
        total = c.total()
        now = time.monotonic()
        if total is not None:
            samples.append((now, total))
            if total >= n:
                break
        time.sleep(0.05)
    stop_all()
    if not samples or samples[-1][1] < n:
        return None
    latencies = []
    j = 0
    for i in range(0, n, 50):
        while samples[j][1] < i + 1:
            j += 1
        latencies.append(samples[j][0] - (t0 + i / rate))
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    return pct(0.5), pct(0.99), latencies[-1]


def memory(work, path, lines):
    """Peak RSS (VmHWM) of the preprocessor, the aggregator and the importer when 1M lines are
    counted and at the end: memory that grows with the input raises the peak. The broker runs on
    memory storage here: its own memory is not what is measured."""
    c, pre, agg = one_of_each(work, "memory", "memory")
    imp = c.stage("import", str(path))
    at_1m = None
    peak_import = 0
    imp_at_1m = None
    t = time.monotonic()
    while time.monotonic() - t < 3600:
        total = c.total() or 0
        r = imp.peak_kib()
        if r:
            peak_import = max(peak_import, r)
        if at_1m is None and total >= 1_000_000:
            at_1m = (pre.peak_kib(), agg.peak_kib())
            imp_at_1m = r
        if total >= lines:
            break
        time.sleep(0.5)
    at_end = (pre.peak_kib(), agg.peak_kib())
    total = c.total()
    stop_all()
    if total != lines or at_1m is None:
        log(f"memory run: counted {total} of {lines}; logs in {c.work}")
        return None
    return at_1m, at_end, imp_at_1m, peak_import


def main():
    work = Path(tempfile.mkdtemp(prefix="pageviews-bench-"))
    try:
        bench(work)
    finally:
        stop_all()
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work directory kept: {work}")
    print_table()


def generate(work, lines):
    path = work / f"access-{lines}.log"
    with open(path, "wb") as f:
        subprocess.run([BIN, "generate", "--lines", str(lines), "--seed", "1"], stdout=f,
                       check=True)
    return path


def bench(work):
    cpus = os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rows.append(("machine", f"{cpus} cores, {mem:.0f} GiB, {time.strftime('%Y-%m-%d')}", "", "", ""))
    path = generate(work, LINES)
    log(f"input: {LINES} generated lines, {path.stat().st_size / 2**20:.0f} MiB")
    demo_path, demo_lines = path, LINES
    if os.environ.get("BENCH_INPUT"):
        demo_path = Path(os.environ["BENCH_INPUT"])
        demo_lines = sum(1 for _ in open(demo_path, "rb"))
        rows.append(("demo input", f"{demo_path.name}, {demo_lines:,} lines", "", "", ""))
    else:
        rows.append(("demo input", f"{LINES:,} generated lines", "", "", ""))
    mem_rate = None
    if want("demo"):
        geoip = geoip_db()
        with_db = "GeoIP2 country db" if geoip else "no GeoIP db"
        ga17 = goaccess(demo_path, geoip=geoip)
        row(f"GoAccess 1.7 (Debian), COMBINED, {with_db}",
            f"{demo_lines / ga17:,.0f} lines/s ({ga17:.2f} s)" if ga17 else "not installed")
        ga_rate = None
        ga_name = "GoAccess 1.7"
        if os.environ.get("GOACCESS"):
            for jobs in (1, 2):
                secs = goaccess(demo_path, os.environ["GOACCESS"], jobs, geoip)
                row(f"GoAccess 1.11 -j {jobs}, COMBINED, {with_db}",
                    f"{demo_lines / secs:,.0f} lines/s ({secs:.2f} s)" if secs else "FAILED")
                if secs and jobs == 2:
                    ga_rate, ga_name = demo_lines / secs, "GoAccess 1.11 -j2"
        if ga_rate is None and ga17:
            ga_rate = demo_lines / ga17

        def vs(rate, target):
            ratio = rate / ga_rate if ga_rate else None
            return (f">= {target}x {ga_name}", f"{ratio:.2f}x {ga_name}" if ratio else "",
                    ratio >= target if ratio else None)

        mem = demo(work, demo_path, "memory", demo_lines)
        if mem:
            mem_rate = demo_lines / mem[0]
            row("1M demo, memory storage", f"{mem_rate:,.0f} lines/s ({mem[0]:.2f} s)",
                *vs(mem_rate, 2.0))
            if mem[5]:
                row("  its CPU", f"{mem[5]:.1f} CPU-s, {mem[5] / demo_lines * 1e6:.1f} CPU-us/line")
        else:
            row("1M demo, memory storage", "FAILED", ">= 2.0x GoAccess", "", False)

        lite = demo(work, demo_path, "sqlite", demo_lines)
        if lite:
            rate = demo_lines / lite[0]
            row("1M demo, SQLite storage (default, durable)", f"{rate:,.0f} lines/s ({lite[0]:.2f} s)",
                *vs(rate, 1.0))
            if lite[5]:
                row("  its CPU", f"{lite[5]:.1f} CPU-s, {lite[5] / demo_lines * 1e6:.1f} CPU-us/line")
            if mem_rate:
                row("  durable / memory storage", f"{rate / mem_rate:.2f}", ">= 0.8", "",
                    rate / mem_rate >= 0.8)
            row("  session timeouts, rebalances in its log", f"{lite[3]}, {lite[4]}", "0, 0", "",
                lite[3] == 0 and lite[4] == 0)
            row("  /api/countries unanswered (2 s) during it", f"{lite[2]} of {lite[1]} polls", "0",
                "", lite[2] == 0)
        else:
            row("1M demo, SQLite storage (default)", "FAILED", ">= 1.0x GoAccess", "", False)

    if want("multi"):
        multi = generate(work, MULTI_LINES)
        mp_mem, mp_mem_total = multi_process(work, multi, MULTI_LINES, "memory")
        mp_lite, mp_lite_total = multi_process(work, multi, MULTI_LINES, "sqlite")
        row("multi-process with kills, memory storage",
            f"{MULTI_LINES:,} exact in {mp_mem:.1f} s" if mp_mem else f"counted {mp_mem_total} of {MULTI_LINES}",
            "all counted", "", mp_mem is not None)
        row("multi-process with kills, SQLite storage",
            f"{MULTI_LINES:,} exact in {mp_lite:.1f} s" if mp_lite else f"counted {mp_lite_total} of {MULTI_LINES}",
            "all counted, <= 2x memory", f"{mp_lite / mp_mem:.2f}x memory" if mp_lite and mp_mem else "",
            bool(mp_lite and mp_mem and mp_lite <= 2 * mp_mem))

    if want("core"):
        core = preprocess_core()
        row("preprocess core, 1 thread", f"{core:,} lines/s" if core else "FAILED", ">= 1,000,000",
            "", bool(core and core >= 1_000_000))

    if want("import"):
        imp, bare = import_vs_bare(work, path)
        if imp and bare:
            row("import, durable (SQLite) broker", f"{imp:,.0f} lines/s", ">= 0.8x bare producer",
                f"{imp / bare:.2f}x bare ({bare:,.0f} lines/s)", imp / bare >= 0.8)
        else:
            row("import, durable (SQLite) broker", "FAILED", ">= 0.8x bare producer", "", False)

    if want("stages"):
        measured = stages(work, demo_path, demo_lines)
        if measured:
            cpu, disk = measured
            if disk:
                row("broker.db (+ WAL) per line, raw line and event", f"{disk / demo_lines:.0f} bytes",
                    "", f"{disk / 2**20:.0f} MiB for {demo_lines:,} lines")
            total = sum(cpu.values())
            for stage, secs in cpu.items():
                row(f"CPU per line: {stage}", f"{secs / demo_lines * 1e6:.2f} CPU-us ({secs:.1f} CPU-s)",
                    "", f"{secs / total:.0%} of all")
            row("CPU per line: all stages", f"{total / demo_lines * 1e6:.2f} CPU-us ({total:.1f} CPU-s)")
        else:
            row("CPU per stage", "FAILED", "", "", False)

    if want("freshness"):
        fresh = freshness(work, generate(work, 200_000))
        if fresh:
            row("freshness at 10,000 lines/s (p50, p99, max)",
                f"{fresh[0]:.2f} s, {fresh[1]:.2f} s, {fresh[2]:.2f} s",
                f"p99 <= {FLUSH_S + 1:.0f} s", "", fresh[1] <= FLUSH_S + 1)
        else:
            row("freshness at 10,000 lines/s", "FAILED", f"p99 <= {FLUSH_S + 1:.0f} s", "", False)

    if BIG_LINES and want("memory"):
        big = generate(work, BIG_LINES)
        size_gib = big.stat().st_size / 2**30
        m = memory(work, big, BIG_LINES)
        if m:
            (p1, a1), (p2, a2), i1, ipeak = m
            mib = lambda k: f"{k / 1024:.0f} MiB"
            row(f"preprocessor peak RSS, 1M -> {BIG_LINES / 1e6:.0f}M lines", f"{mib(p1)} -> {mib(p2)}",
                "within 10%", f"{p2 / p1:.2f}x", p2 <= 1.1 * p1)
            row(f"aggregator peak RSS, 1M -> {BIG_LINES / 1e6:.0f}M lines", f"{mib(a1)} -> {mib(a2)}",
                "within 10%", f"{a2 / a1:.2f}x", a2 <= 1.1 * a1)
            row(f"importer peak RSS on {size_gib:.1f} GiB, 1M lines -> end",
                f"{mib(i1)} -> {mib(ipeak)}", "constant (within 10%)", f"{ipeak / i1:.2f}x",
                ipeak <= 1.1 * i1)
        else:
            row("memory run", "FAILED", "", "", False)


def print_table():
    widths = [max(len(str(r[i])) for r in rows + [("figure", "value", "target", "ratio", "met")])
              for i in range(5)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    print(fmt.format("figure", "value", "target", "ratio", "met"))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(fmt.format(*r))


if __name__ == "__main__":
    main()
