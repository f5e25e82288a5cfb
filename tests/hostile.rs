//! Hostile traffic through the real binary (issue 19), on SQLite and on PostgreSQL: generated
//! lines mixed with what strangers put in access logs (paths of 3,500 bytes and 60 KB, NUL and
//! control characters, invalid UTF-8, years 9999 and 1970, a byte count of 2^63, 200,000
//! distinct paths and referrers). The demo must drain, count every valid line exactly, fail no
//! flush, keep its tables within `--keep-values`, keep the history before the hostile lines, and
//! dead-letter the future line with its reason.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{cluster, command, expected_counts, generated_by_binary, run_within, write_lines};
use pageviews::aggregate::dimensions::{Dimension, minute_of};
use pageviews::event::policy::MAX_RESPONSE_BYTES;
use pageviews::store::Store;

/// Values kept per dimension (and per hour) in this test.
const KEEP: u64 = 100;
/// Distinct random paths and referrers.
const DISTINCT: usize = 200_000;
/// The client of every hostile line (GB in the bundled database).
const IP: &str = "81.2.69.142";
const UA: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0";

/// A Combined line at `time` (`dd/Mon/yyyy:HH:MM:SS`).
fn line(time: &str, path: &str, bytes: &str, referrer: &str) -> Vec<u8> {
    format!("{IP} - - [{time} +0000] \"GET {path} HTTP/1.1\" 200 {bytes} \"{referrer}\" \"{UA}\"")
        .into_bytes()
}

/// What the test feeds and what it expects of it.
struct Input {
    files: Vec<std::path::PathBuf>,
    lines: u64,
    /// Valid lines: (event time as RFC 3339, response bytes as counted).
    valid: Vec<(String, u64)>,
    countries: BTreeMap<String, u64>,
    /// Valid lines with a referrer.
    with_referrer: u64,
}

fn prepare(dir: &Path) -> Input {
    let before = generated_by_binary(3_000, 1);
    let after = generated_by_binary(1_000, 2);
    let mut valid: Vec<(String, u64)> = Vec::new();
    let mut with_referrer = 0;
    for l in before.iter().chain(&after) {
        let text = std::str::from_utf8(l).unwrap();
        let stamp = &text[text.find('[').unwrap() + 1..][..20];
        let t = chrono::NaiveDateTime::parse_from_str(stamp, "%d/%b/%Y:%H:%M:%S").unwrap();
        let bytes: u64 = text
            .split('"')
            .nth(2)
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        valid.push((
            t.and_utc()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            bytes,
        ));
        if text.split('"').nth(3) != Some("-") {
            with_referrer += 1;
        }
    }
    let mut countries = expected_counts(before.iter().chain(&after).map(Vec::as_slice));

    // The hostile lines, all from one client at 12:00–12:59 (an hour of their own).
    let mut hostile: Vec<Vec<u8>> = Vec::new();
    let mut counted = |time: &str, bytes: u64, referrer: bool| {
        valid.push((time.to_owned(), bytes.min(MAX_RESPONSE_BYTES)));
        *countries.entry("GB".to_owned()).or_insert(0) += 1;
        with_referrer += u64::from(referrer);
    };
    hostile.push(line(
        "01/Jan/2026:12:00:00",
        &format!("/{}", "a".repeat(3_500)),
        "10",
        "-",
    ));
    counted("2026-01-01T12:00:00Z", 10, false);
    let noise: String = (0..60_000u32)
        .map(|i| char::from(b'a' + (i.wrapping_mul(2_654_435_761) >> 27) as u8 % 26))
        .collect();
    hostile.push(line(
        "01/Jan/2026:12:00:01",
        &format!("/{noise}"),
        "11",
        "-",
    ));
    counted("2026-01-01T12:00:01Z", 11, false);
    hostile.push(line("01/Jan/9999:00:00:00", "/from-the-future", "1", "-"));
    hostile.push(line("01/Jan/1970:00:00:00", "/epoch", "12", "-"));
    counted("1970-01-01T00:00:00Z", 12, false);
    for s in 2..4 {
        hostile.push(line(
            &format!("01/Jan/2026:12:00:0{s}"),
            "/huge",
            "9223372036854775808",
            "-",
        ));
        counted(&format!("2026-01-01T12:00:0{s}Z"), u64::MAX, false);
    }
    let mut invalid = line("01/Jan/2026:12:00:04", "/x", "1", "-");
    invalid.splice(60..60, [0xff, 0xfe]);
    hostile.push(invalid);
    // A control character in a Combined line (a raw BEL).
    hostile.push(line("01/Jan/2026:12:00:05", "/bell\u{7}ring", "13", "-"));
    counted("2026-01-01T12:00:05Z", 13, false);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..DISTINCT {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let time = format!("01/Jan/2026:12:{:02}:{:02}", (i / 60) % 60, i % 60);
        hostile.push(line(
            &time,
            &format!("/r/{x:016x}"),
            "100",
            &format!("https://spam-{:x}.example/p", x >> 20),
        ));
        counted(
            &format!("2026-01-01T12:{:02}:{:02}Z", (i / 60) % 60, i % 60),
            100,
            true,
        );
    }
    // NUL and other control characters, in a JSON log (escaped as JSON allows).
    let json = vec![
        format!(r#"{{"time":"2026-01-01T12:30:00Z","ip":"{IP}","method":"GET","path":"/nul\u0000byte\u0001","status":200,"size":14,"user_agent":"x\u0000y\u001b[31m"}}"#).into_bytes(),
        format!(r#"{{"time":"2026-01-01T12:30:01Z","ip":"{IP}","method":"GET","path":"/ok","status":200,"size":15,"user_agent":"{UA}","referrer":"https://ref.example/\u0007"}}"#).into_bytes(),
    ];
    counted("2026-01-01T12:30:00Z", 14, false);
    counted("2026-01-01T12:30:01Z", 15, true);

    let files = ["before.log", "hostile.log", "hostile.json", "after.log"].map(|f| dir.join(f));
    write_lines(&files[0], &before);
    write_lines(&files[1], &hostile);
    write_lines(&files[2], &json);
    write_lines(&files[3], &after);
    Input {
        files: files.to_vec(),
        lines: (before.len() + hostile.len() + json.len() + after.len()) as u64,
        valid,
        countries,
        with_referrer,
    }
}

async fn hostile_traffic(database: Option<String>) {
    let c = cluster(2).await;
    let input = prepare(c.dir.path());
    let database =
        database.unwrap_or_else(|| format!("sqlite://{}/hostile.db", c.dir.path().display()));
    let mut cmd = command(&common::bin(), &c.dir.path().join("demo"));
    cmd.args([
        "demo",
        "--brokers",
        &c.broker.bootstrap(),
        "--database",
        &database,
    ]);
    cmd.args([
        "--exit-when-drained",
        "--flush-interval",
        "1s",
        "--listen",
        "127.0.0.1:0",
    ]);
    cmd.args(["--keep-values", &KEEP.to_string(), "--input"]);
    cmd.args(&input.files);
    let out = run_within(cmd, Duration::from_secs(300));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let valid = input.valid.len() as u64;
    assert!(
        stdout.contains(&format!(
            "lines read {}, counted {valid}, dead-lettered 2",
            input.lines
        )),
        "{stdout}\n{stderr}"
    );
    // No flush failed, none met a data error.
    for bad in ["flush failed", "refused this flush", "ERROR"] {
        assert!(!stderr.contains(bad), "{bad}: {stderr}");
    }

    let store = Store::open(&database).await.unwrap();
    assert_eq!(common::db_counts(&store).await, input.countries);
    let flushes = store.flush_durations().await.unwrap();
    assert!(
        flushes.iter().all(|(_, f)| f.data_errors == 0),
        "{flushes:?}"
    );

    // Every dimension adds up to every valid line, within its bound, and the bytes of 2^63
    // counted as the clamp.
    let bytes: u64 = input
        .valid
        .iter()
        .map(|v| v.1)
        .fold(0u64, u64::saturating_add);
    for d in Dimension::defaults() {
        let counts = store.dimension_counts(d.name(), None, 1000).await.unwrap();
        assert!(
            counts.distinct <= KEEP + 1,
            "{d}: {} values",
            counts.distinct
        );
        for v in &counts.values {
            assert!(
                v.value.len() <= 512 && !v.value.chars().any(char::is_control),
                "{d}: {:?}",
                v.value
            );
        }
        let want = match d {
            Dimension::Referrer => input.with_referrer,
            Dimension::StaticPath | Dimension::NotFound | Dimension::Vhost => continue,
            // They count visits, not requests (tests/sessions.rs checks them).
            Dimension::EntryPage | Dimension::ExitPage => continue,
            _ => valid,
        };
        assert_eq!(counts.total_visits, want, "{d}");
        if d == Dimension::Status {
            assert_eq!(counts.total_bytes, bytes);
        }
        // The hour of the hostile lines is bounded too.
        let hour = store
            .dimension_counts(d.name(), Some(1_767_268_800), 1000)
            .await
            .unwrap();
        assert!(
            hour.distinct <= KEEP + 1,
            "{d} at 12:00: {} values",
            hour.distinct
        );
    }

    // The time series before (and of) the hostile lines is intact: every minute of 2026
    // exactly; the 1970 line is older than the retention and counts in the all-time tables
    // only.
    let mut minutes: BTreeMap<i64, u64> = BTreeMap::new();
    for (time, _) in &input.valid {
        let m = minute_of(time).unwrap();
        if m > 0 {
            *minutes.entry(m).or_insert(0) += 1;
        }
    }
    let stored: BTreeMap<i64, u64> = store
        .minutes(0, None)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.minute, p.visits))
        .collect();
    assert_eq!(stored, minutes);
    let hours = store
        .dimension_counts("country", Some(1_767_225_600), 1000)
        .await
        .unwrap();
    assert_eq!(hours.total_visits, valid - 1);

    // The future line and the invalid UTF-8 are dead letters, each with its reason.
    let mut reasons: Vec<String> = common::dead_letters(&c, 2)
        .await
        .into_iter()
        .map(|(reason, _)| reason)
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "COMBINED: invalid UTF-8 at byte 60",
            "COMBINED: timestamp in the future: 9999-01-01T00:00:00Z"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_traffic_on_sqlite() {
    hostile_traffic(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_traffic_on_postgres() {
    let url = pageviews::store::testing::fresh_postgres_url().await;
    hostile_traffic(Some(url)).await;
}
