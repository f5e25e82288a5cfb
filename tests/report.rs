//! `pageviews report` through the real binary: `--input` counts a log first (and only its new
//! lines when run again), `-o` writes HTML, JSON or CSV (or stdout with `-`) with the same
//! numbers, the page's filters apply, and hostile values stay text: the HTML's data block
//! parses back to them and nothing in the log can close it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

const EVIL_PATH: &str = "/</script><script>window.__pwned=1</script><!--";
const EVIL_UA: &str = "</script><img src=x onerror=alert(1)>";

fn report(data: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = command(&bin(), data);
    cmd.arg("report").args(args);
    let out = run_within(cmd, Duration::from_secs(180));
    assert!(
        out.status.success(),
        "report {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_file(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn countries(d: &Value) -> BTreeMap<String, u64> {
    d["countries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["country_code"].as_str().unwrap().to_owned(),
                c["visits"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The report's lines: generated traffic and requests whose path and User-Agent are markup
/// meant to close the page's data block (enough of them to be in the path panel's top 10).
fn lines(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut lines = generated_by_binary(n as u64, seed);
    for i in 0..400 {
        lines.push(
            format!(
                "81.2.69.{} - - [01/Mar/2026:10:00:{:02} +0000] \"GET {EVIL_PATH} HTTP/1.1\" 200 99 \"-\" \"{EVIL_UA}\"",
                i % 200,
                i % 60
            )
            .into_bytes(),
        );
    }
    lines
}

#[test]
fn report_writes_html_json_and_csv_with_the_same_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("access.log");
    let first = lines(4_000, 31);
    write_lines(&log, &first);
    let html = dir.path().join("report.html");
    report(
        &data,
        &[
            "--input",
            log.to_str().unwrap(),
            "-o",
            html.to_str().unwrap(),
        ],
    );

    // JSON: every line counted once, per country as the .mmdb says.
    let json_path = dir.path().join("report.json");
    report(&data, &["-o", json_path.to_str().unwrap()]);
    let d = json_file(&json_path);
    let want = expected_counts(first.iter().map(Vec::as_slice));
    assert_eq!(d["totals"]["visits"], first.len() as u64);
    assert_eq!(countries(&d), want);

    // CSV: the same rows.
    let csv_path = dir.path().join("report.csv");
    report(&data, &["-o", csv_path.to_str().unwrap()]);
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut csv_countries = BTreeMap::new();
    let mut csv_total = None;
    for row in csv.lines().skip(1) {
        let cells: Vec<&str> = row.split(',').collect();
        match cells[0] {
            "total" => csv_total = Some(cells[2].parse::<u64>().unwrap()),
            "country" => {
                csv_countries.insert(cells[1].to_owned(), cells[2].parse::<u64>().unwrap());
            }
            _ => {}
        }
    }
    assert_eq!(csv_total, Some(first.len() as u64));
    assert_eq!(csv_countries, want);

    // Stdout.
    let out = report(&data, &["-o", "-", "--output-format", "json"]);
    let stdout: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stdout["totals"], d["totals"]);
    assert_eq!(countries(&stdout), want);

    // HTML: one file with its data inline; the markup from the log cannot close the data
    // block, which parses back to the same figures and the hostile values as text.
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(!page.contains("</script><script>window.__pwned"));
    assert!(!page.contains("<img src=x"));
    for external in ["<script src", "<link", "@import", "url("] {
        assert!(!page.contains(external), "the report loads {external}");
    }
    let open = "<script type=\"application/json\" id=\"report-data\">";
    let start = page.find(open).expect("the report's data block") + open.len();
    let end = start + page[start..].find("</script>").unwrap();
    let embedded: Value = serde_json::from_str(&page[start..end]).unwrap();
    assert_eq!(embedded["dashboard"]["totals"], d["totals"]);
    let paths = embedded["dashboard"]["dimensions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "path")
        .expect("the path panel")
        .clone();
    assert!(
        paths["values"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["value"] == EVIL_PATH && v["visits"] == 400),
        "{paths}"
    );

    // Filters: one country, and a range with no day counted.
    let (top, top_visits) = want.iter().max_by_key(|(_, n)| **n).unwrap();
    let us = dir.path().join("one.json");
    report(&data, &["--country", top, "-o", us.to_str().unwrap()]);
    let one = json_file(&us);
    assert_eq!(one["totals"]["visits"], *top_visits);
    assert_eq!(
        countries(&one),
        BTreeMap::from([(top.clone(), *top_visits)])
    );
    let none = dir.path().join("none.json");
    report(
        &data,
        &["--since", "2099-01-01", "-o", none.to_str().unwrap()],
    );
    assert_eq!(json_file(&none)["totals"]["visits"], 0);
    let mut cmd = command(&bin(), &data);
    cmd.args(["report", "--since", "yesterday", "-o", "-"]);
    let bad = run_within(cmd, Duration::from_secs(30));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("YYYY-MM-DD"));

    // Again on the same file: nothing counted twice. Then the log grows: only the new lines.
    report(
        &data,
        &[
            "--input",
            log.to_str().unwrap(),
            "-o",
            json_path.to_str().unwrap(),
        ],
    );
    assert_eq!(
        json_file(&json_path)["totals"]["visits"],
        first.len() as u64
    );
    let more = generated_by_binary(1_500, 32);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        for l in &more {
            f.write_all(l).unwrap();
            f.write_all(b"\n").unwrap();
        }
    }
    report(
        &data,
        &[
            "--input",
            log.to_str().unwrap(),
            "-o",
            json_path.to_str().unwrap(),
        ],
    );
    let grown = json_file(&json_path);
    assert_eq!(grown["totals"]["visits"], (first.len() + more.len()) as u64);
    assert_eq!(
        countries(&grown),
        expected_counts(first.iter().chain(&more).map(Vec::as_slice))
    );
}
