//! Log formats end to end, cross-checked against GoAccess: for every preset GoAccess 1.7 also
//! reads, the same file goes through GoAccess (`-o report.json`) and through
//! `pageviews demo --exit-when-drained` (the real binary, against a real embedded broker), and
//! both must find the same number of valid requests and the same count per status code.
//!
//! All files go through one demo run, each with its format detected from its first lines, so
//! this also covers files of different formats sharing the raw topic and one preprocessor.
//! Each file's traffic is stamped on its own day, which tells its events apart on the events
//! topic.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use chrono::TimeDelta;
use pageviews::event::PageView;
use pageviews::format::Preset;
use pageviews::generate::{LineGenerator, default_start, render};
use pageviews::kafka::EVENTS_TOPIC;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

const LINES: usize = 1_000;

/// The presets GoAccess 1.7 reads: all but TRAEFIKCLF (GoAccess 1.8).
fn presets() -> Vec<Preset> {
    Preset::ALL
        .into_iter()
        .filter(|p| *p != Preset::Traefikclf)
        .collect()
}

/// The file for `preset`, its traffic on day `day` after the generator's start.
fn write_input(dir: &Path, preset: Preset, day: i64) -> std::path::PathBuf {
    let start = default_start() + TimeDelta::days(day);
    let mut out = String::new();
    if preset == Preset::W3c {
        out.push_str("#Software: Microsoft Internet Information Services 10.0\n#Version: 1.0\n");
        out.push_str(&format!(
            "#Fields: {}\n",
            pageviews::format::w3c::IIS_DEFAULT_FIELDS
        ));
    }
    let lines = LineGenerator::starting_at(40 + day as u64, start)
        // GoAccess 1.7 reads `%h:%^` up to the first colon, so it rejects load-balancer lines
        // from IPv6 clients (which pageviews reads): compare on IPv4 clients there.
        .filter(|l| {
            !matches!(preset, Preset::Awsalb | Preset::Awselb)
                || !l.split(' ').next().unwrap_or("").contains(':')
        })
        .take(LINES);
    for line in lines {
        // GoAccess 1.7's AWSELB preset reads Application Load Balancer lines (not Classic
        // ones, which only pageviews reads: see the AWSELB fixture), so the file holds those.
        let layout = match preset {
            Preset::Awselb => Preset::Awsalb,
            p => p,
        };
        let text = render(&line, layout).unwrap();
        // GoAccess 1.7's SQUID preset expects a syslog prefix; pageviews reads both layouts.
        if preset == Preset::Squid {
            out.push_str("Oct  8 11:11:49 proxy1 squid[1234]: ");
        }
        out.push_str(&text);
        out.push('\n');
    }
    let path = dir.join(format!("{}.log", preset.name()));
    std::fs::write(&path, out).unwrap();
    path
}

/// GoAccess's valid requests and count per status code for `path`. GoAccess's name for the
/// layout of our AWSELB file (Application Load Balancer lines) is AWSELB too: its AWSELB
/// preset reads ALB lines.
fn goaccess(path: &Path, preset: Preset, dir: &Path) -> (u64, BTreeMap<u16, u64>) {
    let report = dir.join(format!("{}.json", preset.name()));
    let out = Command::new("goaccess")
        .arg(path)
        .arg(format!("--log-format={}", preset.name()))
        .arg("-o")
        .arg(&report)
        .arg("--no-progress")
        .output()
        .expect("goaccess runs (apt-get install goaccess; .ci/run installs it)");
    assert!(out.status.success(), "goaccess: {out:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let valid = report["general"]["valid_requests"].as_u64().unwrap();
    let mut statuses = BTreeMap::new();
    for class in report["status_codes"]["data"].as_array().unwrap() {
        for code in class["items"].as_array().unwrap() {
            // "200 - OK: The request sent by the client was successful"
            let text = code["data"].as_str().unwrap();
            let status: u16 = text[..3].parse().unwrap_or_else(|_| panic!("{text}"));
            statuses.insert(status, code["hits"]["count"].as_u64().unwrap());
        }
    }
    (valid, statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_preset_counts_what_goaccess_counts() {
    let c = common::cluster(4).await;
    let dir = tempfile::tempdir().unwrap();
    let mut expected = BTreeMap::new();
    let mut inputs = Vec::new();
    let presets = presets();
    for (day, preset) in presets.iter().enumerate() {
        let path = write_input(dir.path(), *preset, day as i64);
        let (valid, statuses) = goaccess(&path, *preset, dir.path());
        assert_eq!(valid, LINES as u64, "GoAccess read every {preset} line");
        let date = (default_start() + TimeDelta::days(day as i64))
            .format("%Y-%m-%d")
            .to_string();
        expected.insert(date, (*preset, statuses));
        inputs.push(path);
    }

    // Where the events topic ends before the run: the events of this run come after.
    let reader: BaseConsumer = c
        .kafka
        .client_config(
            pageviews::kafka::ClientRole::Consumer,
            &[
                ("group.id", "formats-test"),
                ("enable.auto.commit", "false"),
            ],
        )
        .create()
        .unwrap();
    let ends = |reader: &BaseConsumer| -> Vec<i64> {
        (0..c.partitions)
            .map(|p| {
                reader
                    .fetch_watermarks(EVENTS_TOPIC, p, Duration::from_secs(10))
                    .unwrap()
                    .1
            })
            .collect()
    };
    let before = ends(&reader);

    let data = tempfile::tempdir().unwrap();
    let mut demo = Command::new(common::bin());
    demo.env_remove("RUST_LOG")
        .arg("--brokers")
        .arg(&c.kafka.brokers)
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "demo",
            "--exit-when-drained",
            "--listen",
            "127.0.0.1:0",
            "--input",
        ])
        .args(&inputs);
    let out = tokio::task::spawn_blocking(move || demo.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let total = LINES * presets.len();
    assert!(
        stdout.contains(&format!(
            "lines read {total}, counted {total}, dead-lettered 0"
        )),
        "{stdout}\n{stderr}"
    );
    // Each input's format was detected and said.
    for preset in ["W3C", "CADDY", "AWSALB", "VCOMBINED", "CLOUDFRONT", "SQUID"] {
        assert!(
            stderr.contains(&format!("format={preset}")),
            "no detection of {preset} in:\n{stderr}"
        );
    }

    // Count this run's events per input (its day) and status.
    let after = ends(&reader);
    let mut assignment = TopicPartitionList::new();
    for (p, offset) in before.iter().enumerate() {
        assignment
            .add_partition_offset(EVENTS_TOPIC, p as i32, Offset::Offset(*offset))
            .unwrap();
    }
    reader.assign(&assignment).unwrap();
    let wanted: i64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    assert_eq!(wanted, total as i64, "events produced by the demo");
    let mut got: BTreeMap<String, BTreeMap<u16, u64>> = BTreeMap::new();
    let mut seen = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen < wanted {
        assert!(
            std::time::Instant::now() < deadline,
            "read {seen} of {wanted} events"
        );
        let Some(m) = reader.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m.unwrap();
        if m.offset() >= after[m.partition() as usize] {
            continue;
        }
        seen += 1;
        let event: PageView<'_> = serde_json::from_slice(m.payload().unwrap()).unwrap();
        *got.entry(event.time[..10].to_owned())
            .or_default()
            .entry(event.status)
            .or_default() += 1;
    }
    for (date, (preset, statuses)) in &expected {
        assert_eq!(
            got.get(date),
            Some(statuses),
            "{preset}: status counts (pageviews vs GoAccess)"
        );
    }
    assert_eq!(got.len(), expected.len());
}

/// A W3C log whose `#Fields:` changed part-way, imported, grown and imported again: the
/// resumed import starts after its checkpoint, past the directive, and must still read the new
/// lines with the field list in force there (read while skipping what was imported).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resumed_w3c_import_keeps_the_fields_of_the_part_it_skipped() {
    use pageviews::import::{self, ImportConfig, Input};
    use pageviews::preprocess::PreprocessStats;
    use std::sync::Arc;
    use std::sync::atomic::Ordering::Relaxed;
    use tokio_util::sync::CancellationToken;

    let c = common::cluster(4).await;
    let path = c.dir.path().join("u_ex240101.log");
    let first = |i: usize| {
        format!(
            "2024-01-01 00:{:02}:{:02} 203.0.113.{} /a/{i} 200",
            i / 60,
            i % 60,
            i % 250 + 1
        )
    };
    let second = |i: usize| {
        format!(
            "2024-01-01 01:{:02}:{:02} /b/{i} 404 198.51.100.{}",
            i / 60,
            i % 60,
            i % 250 + 1
        )
    };
    let mut text = String::from(
        "#Software: Microsoft Internet Information Services 10.0\n#Fields: date time c-ip cs-uri-stem sc-status\n",
    );
    (0..100).for_each(|i| text.push_str(&(first(i) + "\n")));
    text.push_str("#Fields: date time cs-uri-stem sc-status c-ip\n");
    (0..100).for_each(|i| text.push_str(&(second(i) + "\n")));
    std::fs::write(&path, &text).unwrap();
    let config = || ImportConfig {
        kafka: c.kafka.clone(),
        inputs: vec![Input::File(path.clone())],
        follow: false,
        rate: None,
        checkpoints: Some(import::checkpoint::CheckpointDir::new(
            c.dir.path().join("checkpoints"),
            &c.kafka.brokers,
            pageviews::kafka::RAW_TOPIC,
        )),
        from_start: false,
        format: Default::default(),
    };
    let stats = Arc::new(PreprocessStats::default());
    let pre = common::start_preprocessor(&c, Arc::clone(&stats));
    let (agg, _) = common::start_aggregator(&c, Duration::from_millis(300));
    let once = import::run(config(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((once.lines, once.directives), (200, 3));

    let mut more = String::new();
    (100..150).for_each(|i| more.push_str(&(second(i) + "\n")));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, more.as_bytes()).unwrap();
    drop(f);
    let again = import::run(config(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((again.already_imported, again.lines), (200, 50));

    common::wait_for(&c, 250, Duration::from_secs(60)).await;
    assert_eq!(
        stats.dead_letters.load(Relaxed),
        0,
        "every line read with its fields"
    );
    assert_eq!(stats.events.load(Relaxed), 250);
    pre.stop().await;
    agg.stop().await;
}
