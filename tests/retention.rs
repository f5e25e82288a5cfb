//! The embedded broker's retention through the real binary (issue 25): a broker started with
//! `--retention 20s` deletes what every stage has long read, its file stops growing, every line
//! is counted exactly, and a stage whose position the retention deleted while it was down says
//! how much it lost in one ERROR line per partition and goes on from the log start.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{command, run_within};
use pageviews::kafka::{ClientRole, EVENTS_TOPIC, KafkaSettings, RAW_TOPIC};
use pageviews::store::Store;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Lines of each of the first three imports: enough that the data, not SQLite's write-ahead
/// log (up to 1,000 pages of 4 KiB before a checkpoint), makes the file's size.
const BIG: u64 = 100_000;
/// Lines of each later import.
const LINES: u64 = 2_000;
const PARTITIONS: i32 = 2;

/// A long-running `pageviews` process with its stderr in a file.
struct Stage {
    child: Child,
    log: PathBuf,
}

impl Stage {
    fn start(dir: &Path, name: &str, args: &[&str]) -> Stage {
        let log = dir.join(format!("{name}.log"));
        let mut cmd = command(&common::bin(), &dir.join("data"));
        cmd.args(args)
            .env(
                "RUST_LOG",
                "warn,pageviews=info,tansu_storage=off,tansu_service=off",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        Stage {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    /// SIGTERM, then waits (SIGKILL after 20 s: the test then fails on its counts).
    fn stop(mut self) -> String {
        common::terminate(&self.child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sum of the numbers before `marker` on the ERROR lines of `log` that contain it.
fn lost(log: &str, marker: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("ERROR") && l.contains(marker))
        .filter_map(|l| {
            let before = &l[..l.find(marker)?];
            before.split_whitespace().last()?.parse::<u64>().ok()
        })
        .sum()
}

/// (log start, log end) of every partition of `topic`.
fn watermarks(kafka: &KafkaSettings, topic: &str) -> Vec<(i64, i64)> {
    let consumer: BaseConsumer = kafka
        .client_config(ClientRole::Consumer, &[("group.id", "retention-test")])
        .create()
        .unwrap();
    (0..PARTITIONS)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
        })
        .collect()
}

fn wait_until(what: &str, patience: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {patience:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_broker_with_retention_keeps_its_file_bounded_and_counts_every_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = common::free_port();
    let brokers = format!("127.0.0.1:{port}");
    let database = format!("sqlite://{}/stats.db", d.display());
    let broker_dir = d.join("broker");
    let broker_dir_s = broker_dir.display().to_string();
    let _broker = Stage::start(
        d,
        "broker",
        &[
            "broker",
            "--listen",
            &brokers,
            "--retention",
            "20s",
            "--data-dir",
            &broker_dir_s,
        ],
    );
    let kafka = KafkaSettings::new(brokers.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(kafka.wait_until_reachable(Duration::from_secs(30)))
        .unwrap();
    let mut topics = command(&common::bin(), &d.join("data"));
    topics.args(["--brokers", &brokers, "topics", "--partitions", "2"]);
    assert!(run_within(topics, Duration::from_secs(60)).status.success());
    let stage = |name: &str, what: &str| {
        Stage::start(
            d,
            name,
            &["--brokers", &brokers, "--database", &database, what],
        )
    };
    let pre = stage("pre-1", "preprocess");
    let agg = stage("agg-1", "aggregate");
    // The dashboard's /metrics counts the lost messages; it reads the dead letters as they
    // come (the retention deletes them too).
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let http_s = http.to_string();
    let _serve = Stage::start(
        d,
        "serve",
        &[
            "--brokers",
            &brokers,
            "--database",
            &database,
            "serve",
            "--listen",
            &http_s,
        ],
    );

    let import = |n: usize| {
        let lines = common::generated_by_binary(if n <= 3 { BIG } else { LINES }, n as u64);
        let file = d.join(format!("access-{n}.log"));
        common::write_lines(&file, &lines);
        let mut cmd = command(&common::bin(), &d.join("data"));
        cmd.args(["--brokers", &brokers, "import"]).arg(&file);
        let out = run_within(cmd, Duration::from_secs(60));
        assert!(out.status.success(), "{out:?}");
    };
    let counted = || -> u64 {
        rt.block_on(async {
            match Store::open(&database).await {
                Ok(store) => common::db_counts(&store).await.values().sum(),
                Err(_) => 0,
            }
        })
    };
    // The file and its write-ahead log.
    let size = || -> u64 {
        ["broker.db", "broker.db-wal"]
            .iter()
            .filter_map(|f| std::fs::metadata(broker_dir.join(f)).ok())
            .map(|m| m.len())
            .sum()
    };

    // Three imports 40 s apart: each is counted long before the retention (20 s, applied
    // every 5 s) deletes it.
    let mut sizes = vec![];
    for n in 1..=3u64 {
        if n > 1 {
            std::thread::sleep(Duration::from_secs(40));
        }
        import(n as usize);
        wait_until("counted", Duration::from_secs(120), || counted() == n * BIG);
        sizes.push(size());
    }
    eprintln!("broker.db and its WAL after each import: {sizes:?} bytes");
    // The first two imports' pages are free again when the third arrives (SQLite reuses
    // them): with the log, the file takes at most a quarter more than after the first import,
    // where keeping everything would take three times as much.
    assert!(
        sizes[2] <= sizes[0] + sizes[0] / 4,
        "broker.db grew with the third import: {sizes:?}"
    );
    let raw = watermarks(&kafka, RAW_TOPIC);
    assert!(
        raw.iter().all(|(low, _)| *low > 0),
        "nothing deleted: {raw:?}"
    );

    // A preprocessor down while its lines are deleted: one ERROR line per partition with how
    // many, and it goes on from the log start.
    let pre_log = pre.stop();
    assert!(!pre_log.contains("ERROR"), "{pre_log}");
    import(4);
    wait_until("raw lines deleted", Duration::from_secs(60), || {
        watermarks(&kafka, RAW_TOPIC)
            .iter()
            .all(|(low, high)| low == high)
    });
    let pre = stage("pre-2", "preprocess");
    import(5);
    wait_until(
        "counted after the preprocessor's loss",
        Duration::from_secs(60),
        || counted() == 3 * BIG + LINES,
    );

    // An aggregator down while its events are deleted: the same.
    let events_before: i64 = watermarks(&kafka, EVENTS_TOPIC).iter().map(|w| w.1).sum();
    let agg_log = agg.stop();
    assert!(!agg_log.contains("ERROR"), "{agg_log}");
    import(6);
    wait_until("events produced", Duration::from_secs(60), || {
        watermarks(&kafka, EVENTS_TOPIC)
            .iter()
            .map(|w| w.1)
            .sum::<i64>()
            == events_before + LINES as i64
    });
    wait_until("events deleted", Duration::from_secs(60), || {
        watermarks(&kafka, EVENTS_TOPIC)
            .iter()
            .all(|(low, high)| low == high)
    });
    let agg = stage("agg-2", "aggregate");
    import(7);
    wait_until(
        "counted after the aggregator's loss",
        Duration::from_secs(60),
        || counted() == 3 * BIG + 2 * LINES,
    );

    let pre_log = pre.stop();
    let agg_log = agg.stop();
    assert_eq!(
        lost(&pre_log, "raw lines of raw-page-views partition"),
        LINES,
        "{pre_log}"
    );
    assert_eq!(
        lost(&agg_log, "messages of page-views partition"),
        LINES,
        "{agg_log}"
    );
    assert_eq!(counted(), 3 * BIG + 2 * LINES);

    // Both losses in /metrics, by group and topic.
    let metric = |labels: &str| -> Option<u64> {
        let (status, _, body) = common::http_get(http, "/metrics");
        assert!(status.contains("200"), "{status}");
        let body = String::from_utf8(body).unwrap();
        let line = format!("pageviews_lost_messages_total{{{labels}}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(line.as_str())?.parse().ok())
    };
    wait_until(
        "the lost lines in /metrics",
        Duration::from_secs(30),
        || metric("group=\"preprocessors\",topic=\"raw-page-views\"") == Some(LINES),
    );
    assert_eq!(
        metric("group=\"aggregators\",topic=\"page-views\""),
        Some(LINES)
    );
}
