//! Visits (sessions) against an oracle: generated traffic with interleaved visitors, gaps of
//! exactly the limit and one second more, several days and sites, bots and static files mixed
//! in, and lines shuffled locally (so each visitor's requests arrive out of order, through
//! several raw partitions and preprocessors). The visits, bounces, pages, durations, entry and
//! exit pages the pipeline counts equal those computed here from the line text with the
//! definitions of `src/sessions/mod.rs`:
//! - through the real binary: `demo --input FILE --exit-when-drained`, then `serve`'s
//!   `/api/sessions`, `/api/dimensions/{entry,exit}_page` and `/api/histograms/visit_duration_s`
//!   (SQLite and PostgreSQL);
//! - with one of two aggregator processes SIGKILLed mid-stream and started again (two
//!   rebalances): exact equality, the open visits having lived in the database across it.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use pageviews::preprocess::geo::BUNDLED_DB;
use pageviews::serve::api::{DimensionResponse, HistogramResponse, TimeseriesResponse};
use pageviews::serve::visits::SessionsResponse;
use pageviews::store::Store;
use rand::{Rng, SeedableRng};

const GAP: i64 = 1800;
const SITES: [&str; 3] = ["shop.example", "blog.example", "docs.example"];
const PAGES: [&str; 8] = [
    "/",
    "/pricing",
    "/blog/kafka",
    "/docs/start?lang=en",
    "/docs/start",
    "/about",
    "/search?q=x",
    "/contact",
];
const STATIC: [&str; 4] = ["/app.css", "/js/app.js", "/img/logo.PNG", "/favicon.ico"];

/// One line and what the oracle needs of it.
struct Line {
    text: Vec<u8>,
    time: i64,
    ip: String,
    ua: String,
    site: &'static str,
    path: String,
}

/// Generated traffic: `visitors` (address, User-Agent) pairs taken from `pageviews generate`
/// (real addresses of many countries, real browsers and bots), each with a few visits over
/// four days; within a visit the gaps are random, 0 (same second), the limit minus one second,
/// exactly the limit, or the limit plus one second (a new visit). Then shuffled: each line moves by up to 5 minutes of
/// event time (less than the default `--session-lateness` of 10 minutes).
fn traffic(visitors: usize, seed: u64) -> Vec<Line> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let sample = generated_by_binary(visitors as u64, seed);
    let start = chrono::NaiveDate::from_ymd_opt(2026, 4, 1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp();
    let mut lines = Vec::new();
    for (i, l) in sample.iter().enumerate() {
        let text = std::str::from_utf8(l).unwrap();
        let mut ip = text.split(' ').next().unwrap().to_owned();
        let ua = text.split('"').nth(5).unwrap().to_owned();
        // Every tenth visitor shares the previous one's address with another browser: a
        // different visitor.
        if i % 10 == 9 {
            ip = std::str::from_utf8(&sample[i - 1])
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_owned();
        }
        let mut t = start + rng.random_range(0..4 * 86_400);
        for _ in 0..rng.random_range(1..4) {
            for _ in 0..rng.random_range(1..7) {
                let path = if rng.random_bool(0.2) {
                    STATIC[rng.random_range(0..STATIC.len())]
                } else {
                    PAGES[rng.random_range(0..PAGES.len())]
                };
                let site = SITES[rng.random_range(0..SITES.len())];
                lines.push(line(t, &ip, &ua, site, path, &mut rng));
                t += match rng.random_range(0..11) {
                    0 => 0,
                    1 => GAP - 1,
                    2 => GAP,
                    3 => GAP + 1,
                    _ => rng.random_range(1..600),
                };
            }
            t += GAP + 1 + rng.random_range(0..20_000);
        }
    }
    let mut keyed: Vec<(i64, Line)> = lines
        .into_iter()
        .map(|l| (l.time + rng.random_range(0..300), l))
        .collect();
    keyed.sort_by_key(|k| k.0);
    keyed.into_iter().map(|k| k.1).collect()
}

fn line(time: i64, ip: &str, ua: &str, site: &'static str, path: &str, rng: &mut impl Rng) -> Line {
    let stamp = chrono::DateTime::from_timestamp(time, 0)
        .unwrap()
        .format("%d/%b/%Y:%H:%M:%S +0000");
    let status = [200, 200, 200, 404, 301, 500][rng.random_range(0..6)];
    let text = format!(
        "{site}:443 {ip} - - [{stamp}] \"GET {path} HTTP/1.1\" {status} {} \"-\" \"{ua}\"",
        rng.random_range(100..5000)
    );
    Line {
        text: text.into_bytes(),
        time,
        ip: ip.to_owned(),
        ua: ua.to_owned(),
        site,
        path: path.to_owned(),
    }
}

/// What the oracle computes.
#[derive(Debug, Default, PartialEq)]
struct Expected {
    visits: u64,
    bounces: u64,
    pages: u64,
    durations: Vec<u64>,
    entry: BTreeMap<String, u64>,
    exit: BTreeMap<String, u64>,
    /// (day, site, country) → (visits, bounces, pages, duration sum).
    slices: Slices,
}

/// (day, site, country) → (visits, bounces, pages, duration sum).
type Slices = BTreeMap<(String, String, String), (u64, u64, u64, u64)>;
/// A visitor's page requests: (time, path, site).
type Requests = Vec<(i64, String, String)>;

/// The definitions, applied to the line text: page requests are human (the User-Agent rule)
/// and not static (the extension rule); a visitor is (address, User-Agent); requests are
/// ordered by (time, path, site) and cut at gaps over 30 minutes.
fn expected(lines: &[Line]) -> Expected {
    #[derive(serde::Deserialize)]
    struct Rec {
        country_code: Option<String>,
    }
    let reader = maxminddb::Reader::from_source(BUNDLED_DB).unwrap();
    let ua = pageviews::preprocess::useragent::UaParser::new(1 << 20);
    let is_static = |p: &str| {
        let name = p.rsplit('/').next().unwrap();
        name.rsplit_once('.').is_some_and(|(_, e)| {
            ["css", "js", "png", "ico"].contains(&e.to_ascii_lowercase().as_str())
        })
    };
    let mut by_visitor: BTreeMap<(String, String), Requests> = BTreeMap::new();
    for l in lines {
        let path = l.path.split('?').next().unwrap().to_owned();
        if ua.classify(Some(&l.ua)).is_bot || is_static(&path) {
            continue;
        }
        by_visitor
            .entry((l.ip.clone(), l.ua.clone()))
            .or_default()
            .push((l.time, path, l.site.to_owned()));
    }
    let mut e = Expected::default();
    for ((ip, _), mut requests) in by_visitor {
        let country = ip
            .parse::<IpAddr>()
            .ok()
            .and_then(|ip| reader.lookup::<Rec>(ip).ok().flatten())
            .and_then(|r| r.country_code)
            .unwrap_or_else(|| "ZZ".to_owned());
        requests.sort();
        let mut visits: Vec<Requests> = Vec::new();
        for r in requests {
            match visits.last_mut() {
                Some(v) if r.0 - v.last().unwrap().0 <= GAP => v.push(r),
                _ => visits.push(vec![r]),
            }
        }
        for v in visits {
            let (first, last) = (&v[0], v.last().unwrap());
            let duration = (last.0 - first.0) as u64;
            let pages = v.len() as u64;
            let bounce = u64::from(pages == 1);
            e.visits += 1;
            e.bounces += bounce;
            e.pages += pages;
            e.durations.push(duration);
            *e.entry.entry(first.1.clone()).or_default() += 1;
            *e.exit.entry(last.1.clone()).or_default() += 1;
            let day = chrono::DateTime::from_timestamp(first.0, 0)
                .unwrap()
                .date_naive()
                .to_string();
            let s = e
                .slices
                .entry((day, first.2.clone(), country.clone()))
                .or_default();
            *s = (s.0 + 1, s.1 + bounce, s.2 + pages, s.3 + duration);
        }
    }
    e
}

fn get<T: serde::de::DeserializeOwned>(addr: SocketAddr, path: &str) -> T {
    let (status, _, body) = http_get(addr, path);
    assert!(status.contains("200"), "{path}: {status}");
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Checks the served figures against the oracle.
fn check_api(addr: SocketAddr, e: &Expected) {
    let s: SessionsResponse = get(addr, "/api/sessions");
    assert_eq!(
        (s.visits, s.bounces, s.pages, s.open, s.late, s.closed_early),
        (e.visits, e.bounces, e.pages, 0, 0, 0),
        "visits, bounces, pages, open, late, closed early"
    );
    let total: u64 = e.durations.iter().sum();
    let mean = s.duration.mean.unwrap();
    assert!(
        (mean * e.visits as f64 - total as f64).abs() < 0.5,
        "{mean}"
    );
    let rate = e.bounces as f64 / e.visits as f64;
    assert!(
        (s.bounce_rate.unwrap() - rate).abs() < 1e-12,
        "{:?}",
        s.bounce_rate
    );
    for (name, want) in [("entry_page", &e.entry), ("exit_page", &e.exit)] {
        let d: DimensionResponse = get(addr, &format!("/api/dimensions/{name}?limit=1000"));
        let got: BTreeMap<String, u64> = d
            .values
            .iter()
            .map(|v| (v.value.clone(), v.visits))
            .collect();
        assert_eq!(&got, want, "{name}");
    }
    // Every duration falls in exactly one served bucket, with the served count.
    let h: HistogramResponse = get(addr, "/api/histograms/visit_duration_s");
    assert_eq!(h.visits, e.visits);
    let mut per_bucket = vec![0u64; h.buckets.len()];
    for &d in &e.durations {
        let i = h
            .buckets
            .iter()
            .position(|b| b.low <= d && d <= b.high)
            .unwrap_or_else(|| panic!("no bucket holds a duration of {d} s: {:?}", h.buckets));
        per_bucket[i] += 1;
    }
    assert_eq!(
        per_bucket,
        h.buckets.iter().map(|b| b.visits).collect::<Vec<_>>()
    );
    // Filters: one day, one site.
    let (day, site, _) = e.slices.keys().nth(e.slices.len() / 2).unwrap().clone();
    let want: u64 = e
        .slices
        .iter()
        .filter(|((d, s, _), _)| *d == day && *s == site)
        .map(|(_, v)| v.0)
        .sum();
    let f: SessionsResponse = get(
        addr,
        &format!("/api/sessions?from={day}&to={day}&site={site}"),
    );
    assert_eq!(f.visits, want, "visits on {day} at {site}");
    let bots: SessionsResponse = get(addr, "/api/sessions?visitors=bots");
    assert_eq!(bots.visits, 0);
    // The series of visits started sums to the visits.
    let ts: TimeseriesResponse = get(addr, "/api/timeseries?minutes=all");
    assert_eq!(ts.points.iter().map(|p| p.sessions).sum::<u64>(), e.visits);
    // The gauges.
    let (_, _, metrics) = http_get(addr, "/metrics");
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("\npageviews_open_visits 0\n"), "{metrics}");
    assert!(
        metrics.contains(&format!("\npageviews_sessions_total {}\n", e.visits)),
        "{metrics}"
    );
}

/// (day, site, country) → (visits, bounces, pages, duration sum) as stored.
async fn stored_slices(store: &Store) -> Slices {
    store
        .read(pageviews::store::reading(|tx| {
            Box::pin(async move {
                let mut out = BTreeMap::new();
                for r in tx
                    .query(
                        "SELECT day, site, country, visits, bounces, pages, duration_s FROM visit_days",
                        &[],
                    )
                    .await?
                {
                    out.insert(
                        (r.text(0)?, r.text(1)?, r.text(2)?),
                        (r.count(3)?, r.count(4)?, r.count(5)?, r.count(6)?),
                    );
                }
                Ok(out)
            })
        }))
        .await
        .unwrap()
}

/// `serve` (the real binary) over `database` until dropped.
struct Server(std::process::Child, SocketAddr);

impl Server {
    fn start(database: &str, dir: &std::path::Path) -> Server {
        let port = free_port();
        let mut cmd = command(&bin(), dir);
        cmd.args(["serve", "--database", database, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let server = Server(cmd.spawn().unwrap(), addr);
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("serve did not listen on {addr}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn demo_matches_the_oracle(database: &str) {
    let lines = traffic(600, 5);
    let e = expected(&lines);
    assert!(e.visits > 1000 && e.bounces > 100, "{} visits", e.visits);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("access.log");
    write_lines(
        &input,
        &lines.iter().map(|l| l.text.clone()).collect::<Vec<_>>(),
    );
    let mut cmd = command(&bin(), dir.path());
    cmd.args([
        "demo",
        "--input",
        input.to_str().unwrap(),
        "--exit-when-drained",
        "--log-format",
        "vcombined",
        "--partitions",
        "4",
        "--preprocessors",
        "2",
        "--flush-interval",
        "300ms",
        "--top-k",
        "100000",
        "--listen",
        "127.0.0.1:0",
        "--database",
        database,
    ]);
    let out = run_within(cmd, Duration::from_secs(240));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("every open visit closed"), "{stdout}");
    let server = Server::start(database, dir.path());
    check_api(server.1, &e);
}

#[test]
fn demo_visits_match_the_definitions_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    demo_matches_the_oracle(&format!("sqlite://{}/pv.db", dir.path().display()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_visits_match_the_definitions_on_postgres() {
    let url = pageviews::store::testing::fresh_postgres_url().await;
    tokio::task::spawn_blocking(move || demo_matches_the_oracle(&url))
        .await
        .unwrap();
}

/// A child process, killed if the test ends without waiting for it.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An aggregator process (the real binary) of `c`'s brokers, counting into `database`.
fn aggregator(c: &Cluster, database: &str) -> Proc {
    let mut cmd = command(&bin(), c.dir.path());
    cmd.args([
        "aggregate",
        "--brokers",
        &c.broker.bootstrap(),
        "--database",
        database,
        "--flush-interval",
        "300ms",
        "--top-k",
        "100000",
        "-X",
        "session.timeout.ms=6000",
    ])
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(
        std::fs::File::options()
            .create(true)
            .append(true)
            .open(c.dir.path().join("aggregators.log"))
            .unwrap(),
    );
    Proc(cmd.spawn().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn visits_are_exact_when_an_aggregator_is_killed() {
    let lines = traffic(500, 9);
    let e = expected(&lines);
    let mut c = cluster_with(4, 4).await;
    let database = format!("sqlite://{}/kill.db", c.dir.path().display());
    c.store = Store::open(&database).await.unwrap();
    let texts: Vec<Vec<u8>> = lines.iter().map(|l| l.text.clone()).collect();
    let total = texts.len() as u64;
    let mut a = aggregator(&c, &database);
    let b = aggregator(&c, &database);
    // Slow the stream down so the kill lands mid-stream: import in chunks.
    let pre = start_preprocessor(&c, Default::default());
    let pre2 = start_preprocessor(&c, Default::default());
    let mut imported = 0;
    let mut killed = None;
    let mut a2 = None;
    for (i, chunk) in texts.chunks(texts.len() / 12 + 1).enumerate() {
        imported += import_file(&c, chunk).await;
        let counted = pageviews::demo::counted(&c.store).await.unwrap();
        if killed.is_none() && counted > total / 4 {
            // Some open visits are in the database now; kill -9 one aggregator.
            assert!(c.store.open_visitors().await.unwrap() > 0);
            assert!(signal(child_pid(&a.0), libc::SIGKILL));
            let _ = a.0.wait();
            killed = Some(i);
        }
        // The survivor takes the partitions over after the session timeout (6 s); then the
        // killed one comes back (a second rebalance) while lines still arrive.
        if killed.is_some_and(|k| i == k + 5) {
            a2 = Some(aggregator(&c, &database));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert_eq!(imported, total);
    let a2 = a2.expect("the stream ended before the kill and the restart");
    wait_for(&c, total, Duration::from_secs(180)).await;
    for mut child in [a2, b] {
        assert!(terminate(&child.0));
        let status = child.0.wait().unwrap();
        assert!(
            status.success(),
            "{status}: {}",
            std::fs::read_to_string(c.dir.path().join("aggregators.log")).unwrap_or_default()
        );
    }
    pre.stop().await;
    pre2.stop().await;
    let open = c.store.open_visitors().await.unwrap();
    assert!(
        open > 0,
        "visits stayed open across the kill and the rebalances"
    );
    // The input ended: a demo on the same brokers and database closes every open visit.
    let empty = c.dir.path().join("empty.log");
    std::fs::write(&empty, b"").unwrap();
    let mut cmd = command(&bin(), c.dir.path());
    cmd.args([
        "demo",
        "--brokers",
        &c.broker.bootstrap(),
        "--database",
        &database,
        "--input",
        empty.to_str().unwrap(),
        "--exit-when-drained",
        "--top-k",
        "100000",
        "--flush-interval",
        "300ms",
        "--listen",
        "127.0.0.1:0",
    ]);
    let out = run_within(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.store.open_visitors().await.unwrap(), 0);
    assert_eq!(stored_slices(&c.store).await, e.slices);
    let summary = c.store.visit_summary(&Default::default()).await.unwrap();
    assert_eq!(
        (summary.visits, summary.bounces, summary.pages),
        (e.visits, e.bounces, e.pages)
    );
    let dims = db_entry_exit(&c.store).await;
    assert_eq!(dims, (e.entry.clone(), e.exit.clone()));
    let counters = c.store.visit_counters().await.unwrap();
    assert_eq!((counters.late, counters.closed_early), (0, 0));
    let seen: HashSet<&str> = lines.iter().map(|l| l.site).collect();
    assert_eq!(seen.len(), SITES.len());
}

/// Entry and exit pages as stored.
async fn db_entry_exit(store: &Store) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let mut out = Vec::new();
    for name in ["entry_page", "exit_page"] {
        let d = store.dimension_counts(name, None, 1 << 20).await.unwrap();
        out.push(d.values.into_iter().map(|v| (v.value, v.visits)).collect());
    }
    let exit = out.pop().unwrap();
    (out.pop().unwrap(), exit)
}

/// `--max-open-visits`: beyond it each flush closes the visits whose last request is oldest.
/// With a bound of 25 the open visits stored never exceed it, visits closed early are
/// counted, and no page request is lost: once the input ends and every visit is closed, the
/// visits' pages sum to the oracle's exactly (a visit closed early and continued counts as
/// two, so there are at least as many visits).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_visits_are_bounded() {
    let lines = traffic(300, 3);
    let e = expected(&lines);
    let c = cluster(2).await;
    let texts: Vec<Vec<u8>> = lines.iter().map(|l| l.text.clone()).collect();
    let pre = start_preprocessor(&c, Default::default());
    let (agg, stats, close) = start_aggregator_with(
        &c,
        Duration::from_millis(200),
        pageviews::aggregate::VisitSettings {
            gap: GAP,
            lateness: 600,
            max_open: 25,
        },
    );
    let mut most = 0;
    for chunk in texts.chunks(texts.len() / 8 + 1) {
        import_file(&c, chunk).await;
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            most = most.max(c.store.open_visitors().await.unwrap());
        }
    }
    wait_for(&c, texts.len() as u64, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    most = most.max(c.store.open_visitors().await.unwrap());
    assert!(most > 0 && most <= 25, "{most} open visits stored");
    let in_memory = stats.open_visits.load(std::sync::atomic::Ordering::Relaxed);
    assert!(in_memory <= 25, "{in_memory} open visits in memory");
    // The input ended: close the rest.
    close.store(true, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..100 {
        if c.store.open_visitors().await.unwrap() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.store.open_visitors().await.unwrap(), 0);
    let counters = c.store.visit_counters().await.unwrap();
    assert!(counters.closed_early > 0, "{counters:?}");
    assert_eq!(counters.late, 0);
    let summary = c.store.visit_summary(&Default::default()).await.unwrap();
    assert_eq!(summary.pages, e.pages);
    assert!(summary.visits >= e.visits, "{summary:?}");
    agg.stop().await;
    pre.stop().await;
}
