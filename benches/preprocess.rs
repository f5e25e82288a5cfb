//! Preprocess core throughput on one thread: parse + GeoIP + User-Agent + JSON, no Kafka.
//! Prints lines/s for the default format (COMBINED) and then per format, parse only and full,
//! on the same generated traffic written in each format (`generate::render`), so that a slow
//! format is visible. Run with `cargo bench --bench preprocess`; `BENCH_LINES` sets the
//! COMBINED sample (default 1,000,000), `BENCH_FORMAT_LINES` the others (default 200,000).

use std::time::Instant;

use pageviews::format::{FormatKind, FormatSpec, LogFormat, Preset};
use pageviews::generate::{LineGenerator, render};
use pageviews::preprocess::enrich::Enricher;
use pageviews::preprocess::geo::GeoDb;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let n = env("BENCH_LINES", 1_000_000);
    let lines: Vec<String> = LineGenerator::new(1).take(n).collect();
    let enricher = Enricher::new(GeoDb::bundled().expect("bundled GeoIP database"));
    let combined = LogFormat::combined();

    let (parse, _) = measure(&combined, None, &lines);
    report("parse only", n, parse);
    // Warm the User-Agent cache the way a long-running worker has it warm.
    measure(
        &combined,
        Some(&enricher),
        &lines[..lines.len().min(10_000)],
    );
    let (full, bytes) = measure(&combined, Some(&enricher), &lines);
    report("parse + geo + user-agent + JSON", n, full);
    println!("  (average event size {} bytes)", bytes / n.max(1));

    let m = env("BENCH_FORMAT_LINES", 200_000).min(n);
    println!("\nper format, {m} lines of the same traffic each (lines/s, 1 thread):");
    println!("{:<14} {:>12} {:>12}", "format", "parse only", "full");
    let mut formats: Vec<(String, FormatSpec, Vec<String>)> = Preset::ALL
        .iter()
        .map(|p| {
            let text = lines[..m]
                .iter()
                .map(|l| render(l, *p).expect("a generated line renders"))
                .collect();
            (p.name().to_owned(), FormatSpec::preset(*p), text)
        })
        .collect();
    let nginx = r#"$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent""#;
    formats.push((
        "nginx format".to_owned(),
        FormatSpec::from_option(nginx, None, None, None, &[]).expect("nginx format"),
        lines[..m].to_vec(),
    ));
    let caddy = formats
        .iter()
        .find(|(name, _, _)| name == "CADDY")
        .map(|(_, _, l)| l.clone())
        .unwrap_or_default();
    formats.push((
        "JSON (default)".to_owned(),
        FormatSpec {
            kind: FormatKind::Json { fields: Vec::new() },
            w3c_fields: None,
            client_ip: Default::default(),
        },
        caddy,
    ));
    for (name, spec, text) in &formats {
        let format = LogFormat::compile(spec).expect("format compiles");
        let (parse, _) = measure(&format, None, text);
        let (full, _) = measure(&format, Some(&enricher), text);
        let rate = |secs: f64| text.len() as f64 / secs;
        println!("{name:<14} {:>12.0} {:>12.0}", rate(parse), rate(full));
    }
}

/// Seconds to parse (and, with an enricher, enrich) every line; every line must parse.
fn measure(format: &LogFormat, enricher: Option<&Enricher>, lines: &[String]) -> (f64, usize) {
    let t = Instant::now();
    let (mut ok, mut bytes) = (0usize, 0usize);
    // As the preprocessor does: one event buffer, reused (the producer copies each payload).
    let mut json = Vec::with_capacity(512);
    for (i, l) in lines.iter().enumerate() {
        match enricher {
            None => ok += usize::from(format.parse(l.as_bytes()).is_ok()),
            Some(e) => {
                // The event carries its raw line's place, as in the preprocessor.
                let source = pageviews::event::Source {
                    partition: (i % 16) as i32,
                    offset: 1_000_000 + i as i64,
                };
                if e.enrich_into(l.as_bytes(), format, Some(source), &mut json)
                    .is_ok()
                {
                    ok += 1;
                    bytes += json.len();
                }
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(
        ok,
        lines.len(),
        "{}: every generated line parses",
        format.name()
    );
    (secs, bytes)
}

fn report(what: &str, n: usize, secs: f64) {
    println!(
        "{what:<34} {n} lines in {secs:.3} s = {:.0} lines/s (1 thread)",
        n as f64 / secs
    );
}
