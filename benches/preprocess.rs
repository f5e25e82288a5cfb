//! Preprocess core throughput on one thread: parse + GeoIP + User-Agent + JSON, no Kafka.
//! Prints lines/s; run with `cargo bench --bench preprocess`.

use std::time::Instant;

use pageviews::generate::LineGenerator;
use pageviews::preprocess::enrich::Enricher;
use pageviews::preprocess::geo::GeoDb;
use pageviews::preprocess::parse::parse_line;

fn main() {
    let n: usize = std::env::var("BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let lines: Vec<String> = LineGenerator::new(1).take(n).collect();
    let enricher = Enricher::new(GeoDb::bundled().expect("bundled GeoIP database"));

    let t = Instant::now();
    let mut ok = 0usize;
    for l in &lines {
        ok += parse_line(l.as_bytes()).is_ok() as usize;
    }
    report("parse only", n, ok, t);

    // Warm the User-Agent cache the way a long-running worker has it warm.
    for l in lines.iter().take(10_000) {
        let _ = enricher.enrich(l.as_bytes());
    }
    let t = Instant::now();
    let mut bytes = 0usize;
    let mut ok = 0usize;
    for l in &lines {
        if let Ok(e) = enricher.enrich(l.as_bytes()) {
            ok += 1;
            bytes += e.json.len();
        }
    }
    report("parse + geo + user-agent + JSON", n, ok, t);
    println!("  (average event size {} bytes)", bytes / ok.max(1));
}

fn report(what: &str, n: usize, ok: usize, t: Instant) {
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(ok, n, "every generated line parses");
    println!(
        "{what:<34} {n} lines in {secs:.3} s = {:.0} lines/s (1 thread)",
        n as f64 / secs
    );
}
