//! What the filterable rollups cost (the README's cost table): generated traffic over
//! `BENCH_DAYS` days (default 7) of `BENCH_PER_DAY` events each (default 50,000), spread over
//! 1 site and over 50 sites, counted the way the aggregator counts it and flushed every
//! `BENCH_INTERVAL` events (default 10,000, one flush interval of a busy server) to a fresh
//! SQLite database, or to a fresh PostgreSQL schema with `BENCH_DATABASE=postgres`.
//!
//! Printed per site count: rows written per flush (all tables; of them, the rollups'), flush
//! time (median), database bytes per day, and the read time of a filtered dashboard
//! (`/api/dashboard`'s read: a week of one site; one country; both with `compare=previous`),
//! median of `BENCH_RUNS` (default 5). Run with `cargo bench --bench filters`.

use std::time::Instant;

use pageviews::aggregate::dimensions::{
    Counts, DEFAULT_KEEP_VALUES, DEFAULT_TOP_K, Dimension, Keep, fill_batch,
};
use pageviews::aggregate::rollups::Filter;
use pageviews::aggregate::tables::CountsFlush;
use pageviews::countries::CountryCode;
use pageviews::event::{PageView, Source};
use pageviews::format::LogFormat;
use pageviews::generate::LineGenerator;
use pageviews::preprocess::enrich::Enricher;
use pageviews::preprocess::geo::GeoDb;
use pageviews::store::{FlushBatch, OffsetUpdate, Store};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    let days = env("BENCH_DAYS", 7);
    let per_day = env("BENCH_PER_DAY", 50_000);
    let interval = env("BENCH_INTERVAL", 10_000).max(1);
    let runs = env("BENCH_RUNS", 5).max(1);
    let postgres = std::env::var("BENCH_DATABASE").as_deref() == Ok("postgres");
    let enricher = Enricher::new(GeoDb::bundled().expect("bundled GeoIP database"));
    let format = LogFormat::combined();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temporary directory");
    let first = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).expect("a day");
    println!(
        "filterable rollups: {days} days × {per_day} events, a flush every {interval} events, on {}",
        if postgres { "PostgreSQL" } else { "SQLite" }
    );
    println!(
        "{:>6} {:>12} {:>14} {:>10} {:>12} {:>14} {:>14} {:>14}",
        "sites",
        "rows/flush",
        "rollup rows",
        "flush ms",
        "bytes/day",
        "week+site ms",
        "country ms",
        "compare ms"
    );
    for sites in [1usize, 50] {
        let url = if postgres {
            runtime.block_on(pageviews::store::testing::fresh_postgres_url())
        } else {
            format!("sqlite://{}/filters-{sites}.db", dir.path().display())
        };
        let store = runtime
            .block_on(Store::open(&url))
            .expect("the database opens");
        let mut json = Vec::with_capacity(512);
        let mut rows = Vec::new();
        let mut rollup_rows = Vec::new();
        let mut flush_ms = Vec::new();
        let mut lines = LineGenerator::new(7);
        let mut offset = 0i64;
        // The offset the last flush stored (the compare-and-set's expected value).
        let mut stored: Option<i64> = None;
        let mut top: std::collections::HashMap<CountryCode, u64> = Default::default();
        for day in 0..days {
            let date = (first + chrono::Duration::days(day as i64)).to_string();
            let mut counts = Counts::new(&Dimension::defaults(), DEFAULT_TOP_K);
            let mut buf = String::new();
            for i in 0..per_day {
                let line = lines.next().expect("endless lines");
                let source = Source {
                    partition: 0,
                    offset,
                };
                enricher
                    .enrich_into(line.as_bytes(), &format, Some(source), &mut json)
                    .expect("a generated line enriches");
                let mut event: PageView<'_> = serde_json::from_slice(&json).expect("event JSON");
                // The generator's clock, moved to this day; the site by line.
                let time = format!("{date}{}", &event.time[10..]);
                event.time = time.into();
                let site = format!("site{}.example", i % sites);
                event.vhost = Some(site.into());
                let country =
                    CountryCode::parse(&event.country_code).unwrap_or(CountryCode::UNKNOWN);
                *top.entry(country).or_default() += 1;
                counts.add(country, Some(&event), &mut buf);
                offset += 1;
                if (i + 1) % interval == 0 || i + 1 == per_day {
                    let mut batch = FlushBatch {
                        consumer_group: "bench".into(),
                        topic: "page-views".into(),
                        offsets: vec![OffsetUpdate {
                            partition: 0,
                            expected: stored,
                            next: offset,
                        }],
                        ..FlushBatch::<CountsFlush>::default()
                    };
                    let keep = Keep {
                        retention: Some(7 * 86_400),
                        latest: i64::MAX,
                        values: DEFAULT_KEEP_VALUES,
                    };
                    fill_batch(&mut batch.results, std::iter::once(&counts), keep);
                    let r = &batch.results;
                    let rollups = r.rollups.days.len()
                        + r.rollups.minutes.len()
                        + r.rollups.day_values.len()
                        + r.rollups.hour_values.len()
                        + r.rollups.uniques.len()
                        + r.rollups.histograms.len();
                    rollup_rows.push(rollups as f64);
                    rows.push(
                        (rollups
                            + r.increments.len()
                            + r.dimensions.len()
                            + r.dimension_hours.len()
                            + r.minutes.len()
                            + r.uniques.len()
                            + r.histograms.len()) as f64,
                    );
                    let t = Instant::now();
                    let outcome = runtime.block_on(store.flush(&batch)).expect("the flush");
                    flush_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                    assert!(
                        matches!(outcome, pageviews::store::FlushOutcome::Committed),
                        "{outcome:?}"
                    );
                    stored = Some(offset);
                    counts = counts.empty_like();
                }
            }
        }
        let bytes = if postgres {
            runtime.block_on(postgres_bytes(&url))
        } else {
            ["", "-wal"]
                .iter()
                .map(|s| {
                    std::fs::metadata(format!("{}/filters-{sites}.db{s}", dir.path().display()))
                        .map_or(0, |m| m.len())
                })
                .sum()
        };
        let last = first + chrono::Duration::days(days as i64 - 1);
        let country = top
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(c, _)| c.as_str().to_owned());
        let week = Filter {
            from: Some(last - chrono::Duration::days(6)),
            to: Some(last),
            site: Some("site0.example".into()),
            ..Filter::default()
        };
        let one = Filter {
            country,
            ..Filter::default()
        };
        let read = |f: &Filter, compare: bool| {
            median(
                (0..runs)
                    .map(|_| {
                        let t = Instant::now();
                        runtime
                            .block_on(pageviews::serve::api::dashboard(&store, f, compare))
                            .expect("the dashboard reads");
                        t.elapsed().as_secs_f64() * 1000.0
                    })
                    .collect(),
            )
        };
        println!(
            "{:>6} {:>12.0} {:>14.0} {:>10.1} {:>12.0} {:>14.1} {:>14.1} {:>14.1}",
            sites,
            median(rows),
            median(rollup_rows),
            median(flush_ms),
            bytes as f64 / days as f64,
            read(&week, false),
            read(&one, false),
            read(&week, true),
        );
    }
}

/// Bytes of the tables and indexes of the schema the URL's `search_path` names.
async fn postgres_bytes(url: &str) -> u64 {
    let schema = url
        .split("search_path%3D")
        .nth(1)
        .unwrap_or("public")
        .to_owned();
    let base = url.split('?').next().unwrap_or(url);
    let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL");
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'",
            &[&schema],
        )
        .await
        .expect("relation sizes");
    u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)
}
