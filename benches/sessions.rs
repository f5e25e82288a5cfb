//! What open visits cost at `BENCH_VISITORS` (default 1,000,000) concurrent visitors, each
//! with one open visit on a path of about 30 bytes (`/blog/2026/streaming-with-kafka-N`):
//! memory (resident set growth, read from /proc/self/statm), time per page request added,
//! the stored form (bytes per visitor), and the first flush that writes them all to a fresh
//! SQLite database (`BENCH_DATABASE=postgres`: a fresh PostgreSQL schema), then reading them
//! back as a newly assigned partition does. Run with `cargo bench --bench sessions`.

use std::time::Instant;

use pageviews::countries::CountryCode;
use pageviews::sessions::{PageRequest, SessionConfig, Sessions, key_bytes};
use pageviews::store::{FlushBatch, OffsetUpdate, StateRow, Store};

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let visitors: u64 = std::env::var("BENCH_VISITORS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let postgres = std::env::var("BENCH_DATABASE").as_deref() == Ok("postgres");
    let country = CountryCode::parse("DE").expect("a country");
    let paths: Vec<String> = (0..1000)
        .map(|i| format!("/blog/2026/streaming-with-kafka-{i}"))
        .collect();
    let mut s = Sessions::new(SessionConfig {
        gap: 1800,
        lateness: 600,
        salt: (1, 2),
        sources: Some(1),
    });
    let before = resident_bytes();
    let started = Instant::now();
    let t0 = 1_770_000_000;
    for v in 0..visitors {
        let r = PageRequest {
            visitor: v.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            // In time order over 25 minutes: every visit stays open.
            time: t0 + (v * 1500 / visitors) as i64,
            path: &paths[(v % 1000) as usize],
            site: "",
            country,
            source: 0,
        };
        s.add(&r);
    }
    let add = started.elapsed();
    let grown = resident_bytes().saturating_sub(before);
    println!(
        "open visits: {} concurrent visitors, {:.0} ns per page request added, resident set +{:.1} MB ({:.0} bytes per open visit)",
        s.open(),
        add.as_nanos() as f64 / visitors as f64,
        grown as f64 / 1e6,
        grown as f64 / s.open().max(1) as f64
    );
    // A second request for every visitor (a page view within its visit).
    let started = Instant::now();
    for v in 0..visitors {
        let r = PageRequest {
            visitor: v.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            time: t0 + 1500 + (v * 60 / visitors) as i64,
            path: &paths[((v + 1) % 1000) as usize],
            site: "",
            country,
            source: 0,
        };
        s.add(&r);
    }
    println!(
        "a second request per visitor: {:.0} ns each",
        started.elapsed().as_nanos() as f64 / visitors as f64
    );
    let started = Instant::now();
    let flush = s.take_flush();
    let stored: usize = flush
        .rows
        .iter()
        .map(|(_, v)| 8 + v.as_ref().map_or(0, Vec::len))
        .sum();
    println!(
        "stored form: {:.0} bytes per visitor ({:.1} MB), encoded in {:.0} ms",
        stored as f64 / flush.rows.len().max(1) as f64,
        stored as f64 / 1e6,
        started.elapsed().as_secs_f64() * 1e3
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temporary directory");
    runtime.block_on(async {
        let url = if postgres {
            pageviews::store::testing::fresh_postgres_url().await
        } else {
            format!("sqlite://{}/bench.db", dir.path().display())
        };
        let store = Store::open(&url).await.expect("database");
        let batch: FlushBatch<pageviews::aggregate::tables::CountsFlush> = FlushBatch {
            consumer_group: "aggregators".into(),
            topic: "page-views".into(),
            offsets: vec![OffsetUpdate {
                partition: 0,
                expected: None,
                next: 1,
            }],
            state: flush
                .rows
                .iter()
                .map(|(k, v)| StateRow {
                    partition: 0,
                    key: key_bytes(*k),
                    value: v.clone(),
                })
                .collect(),
            ..Default::default()
        };
        let started = Instant::now();
        store.flush(&batch).await.expect("flush");
        println!(
            "first flush writing every open visit to {}: {:.2} s",
            if postgres { "PostgreSQL" } else { "SQLite" },
            started.elapsed().as_secs_f64()
        );
        let started = Instant::now();
        let rows = store
            .load_partition_state("aggregators", "page-views", &[0])
            .await
            .expect("load");
        let mut again = Sessions::new(s.config);
        let unreadable = again.load(&rows[&0]);
        println!(
            "reloading them (a newly assigned partition): {:.2} s, {} open visits, {unreadable} unreadable",
            started.elapsed().as_secs_f64(),
            again.open()
        );
    });
}
