//! Shared helpers for the integration tests: a real embedded broker, real SQLite, real HTTP.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use pageviews::aggregate::dimensions::Dimension;
use pageviews::aggregate::{self, AggregateConfig, AggregateStats};
use pageviews::broker::{BrokerStorage, EmbeddedBroker};
use pageviews::import::{self, ImportConfig, Input};
use pageviews::kafka::KafkaSettings;
use pageviews::preprocess::enrich::Enricher;
use pageviews::preprocess::geo::{BUNDLED_DB, GeoDb};
use pageviews::preprocess::{self, PreprocessConfig, PreprocessStats};
use pageviews::store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Cluster {
    pub broker: EmbeddedBroker,
    pub kafka: KafkaSettings,
    pub store: Store,
    pub dir: tempfile::TempDir,
    pub partitions: i32,
}

pub async fn cluster(partitions: i32) -> Cluster {
    cluster_with(partitions, partitions).await
}

/// A cluster whose raw topic has `raw` partitions and whose events (and dead-letter) topics
/// have `events`.
pub async fn cluster_with(raw: i32, events: i32) -> Cluster {
    // Logs are captured per test and shown when it fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "warn,pageviews=info,tansu_storage=off,tansu_service=off".into()
            }),
        )
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(
        "127.0.0.1:0".parse().unwrap(),
        BrokerStorage::Memory,
        dir.path(),
    )
    .await
    .unwrap();
    let mut kafka = KafkaSettings::new(broker.bootstrap());
    // As a user would with -X: notice departed group members sooner than the 45 s default.
    kafka.overrides = vec![
        ("session.timeout.ms".into(), "10000".into()),
        ("heartbeat.interval.ms".into(), "1000".into()),
    ];
    kafka
        .wait_until_reachable(Duration::from_secs(20))
        .await
        .unwrap();
    if raw == events {
        kafka.create_topics(events).await.unwrap();
    } else {
        use pageviews::kafka::{DEAD_LETTER_TOPIC, EVENTS_TOPIC, RAW_TOPIC};
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", broker.bootstrap())
                .create()
                .unwrap();
        let topics = [
            NewTopic::new(RAW_TOPIC, raw, TopicReplication::Fixed(1)),
            NewTopic::new(EVENTS_TOPIC, events, TopicReplication::Fixed(1)),
            NewTopic::new(DEAD_LETTER_TOPIC, events, TopicReplication::Fixed(1)),
        ];
        for r in admin
            .create_topics(&topics, &AdminOptions::new())
            .await
            .unwrap()
        {
            r.unwrap();
        }
    }
    let store = Store::open(&format!("sqlite://{}/stats.db", dir.path().display()))
        .await
        .unwrap();
    Cluster {
        broker,
        kafka,
        store,
        dir,
        partitions: events,
    }
}

/// A stage running as a task, stoppable gracefully (cancel) or abruptly (abort).
pub struct Stage {
    pub stop: CancellationToken,
    pub handle: JoinHandle<()>,
}

impl Stage {
    pub async fn stop(self) {
        self.stop.cancel();
        self.handle.await.unwrap();
    }
    /// Kills the stage mid-flight: no final flush, in-memory counts lost.
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

/// The dashboard and API over `c`'s database and brokers, on a free port: its address, and
/// the stage that stops it.
pub async fn start_server(c: &Cluster) -> (SocketAddr, Stage) {
    let listener = pageviews::serve::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let run = pageviews::serve::run(
        listener,
        c.store.clone(),
        Some(c.kafka.clone()),
        pageviews::serve::ServeConfig::default(),
        stop.clone(),
    );
    let handle = tokio::spawn(async move { run.await.unwrap() });
    (addr, Stage { stop, handle })
}

/// Imports `lines` (written to a file in the cluster's directory) to the raw topic; the
/// number of lines imported.
pub async fn import_file(c: &Cluster, lines: &[Vec<u8>]) -> u64 {
    let path = c.dir.path().join(format!("input-{}.log", lines.len()));
    write_lines(&path, lines);
    let config = ImportConfig {
        kafka: c.kafka.clone(),
        inputs: vec![Input::File(path)],
        follow: false,
        rate: None,
        checkpoints: None,
        from_start: false,
        format: Default::default(),
    };
    import::run(config, CancellationToken::new())
        .await
        .unwrap()
        .lines
}

pub fn start_preprocessor(c: &Cluster, stats: Arc<PreprocessStats>) -> Stage {
    let enricher = Arc::new(Enricher::new(GeoDb::bundled().unwrap()));
    let config = PreprocessConfig {
        kafka: c.kafka.clone(),
        enricher,
    };
    let stop = CancellationToken::new();
    let s = stop.clone();
    let handle = tokio::spawn(async move { preprocess::run(config, stats, s).await.unwrap() });
    Stage { stop, handle }
}

pub fn start_aggregator(c: &Cluster, flush: Duration) -> (Stage, Arc<AggregateStats>) {
    let (stage, stats, _) = start_aggregator_with(
        c,
        flush,
        aggregate::VisitSettings {
            gap: 1800,
            lateness: 600,
            max_open: 1_000_000,
        },
    );
    (stage, stats)
}

/// An aggregator whose visits are cut and bounded as `visits` says; setting the flag it
/// returns closes every open visit at the next flush (the end of the input).
pub fn start_aggregator_with(
    c: &Cluster,
    flush: Duration,
    visits: aggregate::VisitSettings,
) -> (
    Stage,
    Arc<AggregateStats>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let close = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let config = AggregateConfig {
        kafka: c.kafka.clone(),
        store: c.store.clone(),
        flush_interval: flush,
        flush_now: None,
        dimensions: Dimension::ALL.to_vec(),
        // Large enough that every count of these tests is exact (the bound is unit-tested).
        top_k: 1 << 20,
        minute_retention: None,
        keep_values: 1 << 20,
        max_future: std::time::Duration::from_secs(86_400),
        visits: Some(visits),
        close_visits: Some(Arc::clone(&close)),
    };
    let stats = Arc::new(AggregateStats::default());
    let (st, stop) = (Arc::clone(&stats), CancellationToken::new());
    let s = stop.clone();
    let handle = tokio::spawn(async move { aggregate::run(config, st, s).await.unwrap() });
    (Stage { stop, handle }, stats, close)
}

/// Country per line computed independently of the pipeline: first field → mmdb → code.
pub fn expected_counts<'a>(lines: impl Iterator<Item = &'a [u8]>) -> BTreeMap<String, u64> {
    #[derive(serde::Deserialize)]
    struct Rec {
        country_code: Option<String>,
    }
    let reader = maxminddb::Reader::from_source(BUNDLED_DB).unwrap();
    let mut out = BTreeMap::new();
    for line in lines {
        let ip = std::str::from_utf8(line)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let code = ip
            .parse::<IpAddr>()
            .ok()
            .and_then(|ip| reader.lookup::<Rec>(ip).ok().flatten())
            .and_then(|r| r.country_code)
            .unwrap_or_else(|| "ZZ".to_owned());
        *out.entry(code).or_insert(0) += 1;
    }
    out
}

/// Per dimension, value → (visits, bytes, human visits).
pub type DimensionTable = BTreeMap<String, BTreeMap<String, (u64, u64, u64)>>;

/// Every dimension's counts for generated Combined lines, computed from the line text (the
/// country as in [`expected_counts`]; the User-Agent through the preprocessor's classifier,
/// which has its own tests): what the pipeline must have counted.
pub fn expected_dimensions<'a>(lines: impl Iterator<Item = &'a [u8]>) -> DimensionTable {
    let lines: Vec<&[u8]> = lines.collect();
    let countries: Vec<String> = lines
        .iter()
        .map(|l| {
            expected_counts(std::iter::once(*l))
                .into_keys()
                .next()
                .unwrap()
        })
        .collect();
    let ua = pageviews::preprocess::useragent::UaParser::new(1 << 20);
    let mut out = DimensionTable::new();
    for (line, country) in lines.iter().zip(countries) {
        let text = std::str::from_utf8(line).unwrap();
        // ip - - [dd/Mon/yyyy:HH:MM:SS +0000] "METHOD PATH PROTO" STATUS BYTES "REF" "UA"
        let quoted: Vec<&str> = text.split('"').collect();
        let ip = text.split(' ').next().unwrap();
        let hour = &text[text.find('[').unwrap() + 13..][..2];
        let path = quoted[1].split(' ').nth(1).unwrap();
        let path = path.split('?').next().unwrap();
        let mut tail = quoted[2].split_whitespace();
        let status: u16 = tail.next().unwrap().parse().unwrap();
        let bytes: u64 = tail.next().unwrap().parse().unwrap();
        let referrer = quoted[3];
        let client = ua.classify(Some(quoted[5]));
        let human = u64::from(!client.is_bot);
        let major = client.browser_version.split('.').next().unwrap_or("");
        let browser = if major.is_empty() {
            client.browser.clone()
        } else {
            format!("{} {major}", client.browser)
        };
        let is_static = [".js", ".css", ".ico", ".txt"]
            .iter()
            .any(|e| path.ends_with(e));
        let mut add = |d: &str, v: String| {
            let e = out.entry(d.to_owned()).or_default().entry(v).or_default();
            e.0 += 1;
            e.1 += bytes;
            e.2 += human;
        };
        add(
            "continent",
            pageviews::countries::continent_of(&country).to_owned(),
        );
        add("country", country);
        add("browser", browser);
        add("os", client.os.clone());
        add("device", client.device.to_owned());
        add(
            "visitor_type",
            if client.is_bot { "bot" } else { "human" }.to_owned(),
        );
        add("path", path.to_owned());
        if is_static {
            add("static_path", path.to_owned());
        }
        if status == 404 {
            add("not_found", path.to_owned());
        }
        if referrer != "-" {
            let host = referrer.split('/').nth(2).unwrap();
            add("referrer", host.to_owned());
        }
        add("status", status.to_string());
        add("status_class", format!("{}xx", status / 100));
        add("hour", hour.to_owned());
        add("host", ip.to_owned());
    }
    out
}

/// Exact unique visitors (address, day, User-Agent) per day of generated Combined lines.
pub fn exact_daily_visitors<'a>(lines: impl Iterator<Item = &'a [u8]>) -> BTreeMap<String, u64> {
    let mut seen: BTreeMap<String, std::collections::HashSet<(String, String)>> = BTreeMap::new();
    for line in lines {
        let text = std::str::from_utf8(line).unwrap();
        let ip = text.split(' ').next().unwrap();
        let stamp = &text[text.find('[').unwrap() + 1..][..11];
        let day = chrono::NaiveDate::parse_from_str(stamp, "%d/%b/%Y").unwrap();
        let ua = text.split('"').nth(5).unwrap();
        seen.entry(day.to_string())
            .or_default()
            .insert((ip.to_owned(), ua.to_owned()));
    }
    seen.into_iter().map(|(d, s)| (d, s.len() as u64)).collect()
}

/// Every dimension's counts as stored.
pub async fn db_dimensions(store: &Store) -> DimensionTable {
    let mut out = DimensionTable::new();
    // Entry and exit pages count visits, not requests (tests/sessions.rs checks them).
    for d in Dimension::ALL
        .into_iter()
        .filter(|d| !matches!(d, Dimension::EntryPage | Dimension::ExitPage))
    {
        let counts = store
            .dimension_counts(d.name(), None, 1 << 20)
            .await
            .unwrap();
        if counts.values.is_empty() {
            continue;
        }
        out.insert(
            d.name().to_owned(),
            counts
                .values
                .into_iter()
                .map(|v| (v.value, (v.visits, v.bytes, v.humans)))
                .collect(),
        );
    }
    out
}

pub async fn db_counts(store: &Store) -> BTreeMap<String, u64> {
    store
        .country_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.country_code, c.visits))
        .collect()
}

/// Waits until the database holds `total` visits.
pub async fn wait_for(c: &Cluster, total: u64, patience: Duration) {
    // A pipeline that stops moving fails the test after STALL with what each stage has done,
    // rather than at the end of `patience` with a bare number: a stall in CI is then diagnosable
    // from the test's output alone.
    const STALL: Duration = Duration::from_secs(90);
    let deadline = tokio::time::Instant::now() + patience;
    let (mut last, mut moved) = (0, tokio::time::Instant::now());
    loop {
        let counted = pageviews::demo::counted(&c.store).await.unwrap();
        if counted >= total {
            return;
        }
        let now = tokio::time::Instant::now();
        if counted != last {
            (last, moved) = (counted, now);
        }
        if now >= deadline || now.duration_since(moved) >= STALL {
            panic!(
                "not drained: counted {counted}/{total}, last progress {:?} ago\n{}",
                now.duration_since(moved),
                pipeline_state(c).await
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Where every partition stands: each topic's log end, the preprocessors' committed raw
/// offsets and the aggregators' stored events offsets (for a failed test's message).
pub async fn pipeline_state(c: &Cluster) -> String {
    use pageviews::kafka::{AGGREGATE_GROUP, EVENTS_TOPIC, PREPROCESS_GROUP, RAW_TOPIC};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let stored = c
        .store
        .load_positions(AGGREGATE_GROUP, EVENTS_TOPIC)
        .await
        .map(|s| s.offsets)
        .unwrap_or_default();
    let (kafka, partitions) = (c.kafka.clone(), c.partitions);
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(5);
        let consumer: BaseConsumer = match kafka
            .client_config(
                pageviews::kafka::ClientRole::Consumer,
                &[("group.id", PREPROCESS_GROUP)],
            )
            .create()
        {
            Ok(c) => c,
            Err(e) => return format!("no consumer for the diagnosis: {e}"),
        };
        let mut out = String::new();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(RAW_TOPIC, p);
        }
        let committed = consumer.committed_offsets(tpl, timeout);
        for p in 0..partitions {
            let raw_end = consumer.fetch_watermarks(RAW_TOPIC, p, timeout).map(|w| w.1);
            let raw_committed = committed
                .as_ref()
                .ok()
                .and_then(|t| t.find_partition(RAW_TOPIC, p))
                .map(|e| e.offset());
            let events_end = consumer.fetch_watermarks(EVENTS_TOPIC, p, timeout).map(|w| w.1);
            out += &format!(
                "partition {p:2}: {RAW_TOPIC} end {raw_end:?} committed {raw_committed:?} | {EVENTS_TOPIC} end {events_end:?} stored {:?}\n",
                stored.get(&p)
            );
        }
        out
    })
    .await
    .unwrap_or_else(|e| format!("diagnosis failed: {e}"))
}

pub fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for l in lines {
        f.write_all(l).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.flush().unwrap();
}

/// A plain HTTP/1.1 GET; returns (status line, headers, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8(buf[..split].to_vec()).unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
    (
        status.to_owned(),
        headers.to_ascii_lowercase(),
        buf[split + 4..].to_vec(),
    )
}

/// The data of the first `update` event of a Server-Sent Events stream at `path`, and the
/// response's headers.
pub fn sse_first_update(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(start) = text.find("event: update\ndata: ") {
            let rest = &text[start + "event: update\ndata: ".len()..];
            if let Some(end) = rest.find('\n') {
                let headers = text[..text.find("\r\n\r\n").unwrap()].to_ascii_lowercase();
                return (headers, rest[..end].to_owned());
            }
        }
        let n = s.read(&mut chunk).expect("no update event within 20 s");
        assert!(n > 0, "stream ended before an update: {text}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The binary under test (`PAGEVIEWS_TEST_BIN` runs these tests against another build).
pub fn bin() -> PathBuf {
    std::env::var_os("PAGEVIEWS_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pageviews")))
}

/// A command for `program` with a clean environment (no PAGEVIEWS_* or RUST_LOG from the
/// caller) and its data in `data_dir`.
pub fn command(program: &Path, data_dir: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars() {
        if k.starts_with("PAGEVIEWS_") || k == "RUST_LOG" || k == "RUST_BACKTRACE" {
            cmd.env_remove(k);
        }
    }
    cmd.env("PAGEVIEWS_DATA_DIR", data_dir);
    cmd
}

/// Runs `cmd` to its end, killing it (and failing the test) after `patience`.
pub fn run_within(mut cmd: Command, patience: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    // Drain the pipes while waiting, so a chatty child never blocks on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + patience;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {patience:?}; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.join().unwrap()),
                String::from_utf8_lossy(&err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The first `n` dead letters on `c`'s dead-letter topic: (reason, payload length), in the
/// order read (each waited for up to 30 s).
pub async fn dead_letters(c: &Cluster, n: usize) -> Vec<(String, usize)> {
    use pageviews::kafka::{ClientRole, DEAD_LETTER_TOPIC};
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = c
        .kafka
        .client_config(
            ClientRole::Consumer,
            &[
                ("group.id", "test-dlq-reader"),
                ("auto.offset.reset", "earliest"),
            ],
        )
        .create()
        .unwrap();
    consumer.subscribe(&[DEAD_LETTER_TOPIC]).unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} dead letters within 30 s", out.len()))
            .unwrap();
        let h = m.headers().unwrap();
        let reason = pageviews::preprocess::header(h, pageviews::event::headers::REASON).unwrap();
        let reason = String::from_utf8(reason.to_vec()).unwrap();
        out.push((reason, m.payload().map_or(0, <[u8]>::len)));
    }
    out
}

/// `pageviews generate --lines N --seed S` (the real binary) as lines.
pub fn generated_by_binary(lines: u64, seed: u64) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(&bin(), dir.path());
    cmd.args([
        "generate",
        "--lines",
        &lines.to_string(),
        "--seed",
        &seed.to_string(),
    ]);
    let out = run_within(cmd, Duration::from_secs(60));
    assert!(out.status.success());
    out.stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// A TCP port free on 127.0.0.1 right now (the OS picks it; the test binds it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// Sends `signal` (`libc::SIGTERM`, `SIGINT`, `SIGKILL`) to process `pid`; a negative `pid`
/// is a process group. False when the process (group) is gone.
pub fn signal(pid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// SIGTERM to a child process: a graceful stop.
pub fn terminate(child: &std::process::Child) -> bool {
    signal(child_pid(child), libc::SIGTERM)
}

/// A child's pid as `kill(2)` takes it.
pub fn child_pid(child: &std::process::Child) -> i32 {
    i32::try_from(child.id()).expect("pid fits in i32")
}
