//! The cost of each dimension in the aggregate stage, without Kafka: for one flush interval's
//! events (default 100,000, `BENCH_EVENTS`), counted the way the aggregator counts them
//! (event JSON parsed, then `Counts::add`), then turned into the flush (`fill_batch`) and
//! written to a fresh SQLite database in one transaction (`Store::flush`).
//!
//! The baseline is `--dimensions country` (what every configuration counts: the talk's
//! table, visits per minute, unique visitors, histograms); each row adds one dimension to it,
//! and the last one is the default set. Per row: counting time per event, the memory the
//! interval's counts hold (bytes allocated and not freed, measured by a counting global
//! allocator), the rows the flush writes and the flush's time. `BENCH_RUNS` (default 3)
//! repeats each measurement; the median is printed. Run with `cargo bench --bench aggregate`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use pageviews::aggregate::dimensions::{
    Counts, DEFAULT_KEEP_VALUES, DEFAULT_TOP_K, Dimension, Keep, fill_batch,
};
use pageviews::aggregate::tables::CountsFlush;
use pageviews::countries::CountryCode;
use pageviews::event::{PageView, Source};
use pageviews::format::LogFormat;
use pageviews::generate::LineGenerator;
use pageviews::preprocess::enrich::Enricher;
use pageviews::preprocess::geo::GeoDb;
use pageviews::store::{FlushBatch, OffsetUpdate, Store};

/// Bytes allocated and not yet freed, process-wide.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as for `alloc`; `ptr` came from it with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One configuration's median figures.
struct Row {
    count_ns: f64,
    state_bytes: isize,
    rows: usize,
    flush_ms: f64,
}

fn main() {
    let n = env("BENCH_EVENTS", 100_000);
    let runs = env("BENCH_RUNS", 3).max(1);
    let enricher = Enricher::new(GeoDb::bundled().expect("bundled GeoIP database"));
    let format = LogFormat::combined();
    let mut json = Vec::with_capacity(512);
    // (key, payload) as the aggregator receives them.
    let events: Vec<(CountryCode, Vec<u8>)> = LineGenerator::new(7)
        .take(n)
        .enumerate()
        .map(|(i, line)| {
            let source = Source {
                partition: 0,
                offset: i as i64,
            };
            enricher
                .enrich_into(line.as_bytes(), &format, Some(source), &mut json)
                .expect("a generated line enriches");
            let event: PageView<'_> = serde_json::from_slice(&json).expect("event JSON");
            let country = CountryCode::parse(&event.country_code).unwrap_or(CountryCode::UNKNOWN);
            (country, json.clone())
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temporary directory");

    let mut configs: Vec<(String, Vec<Dimension>)> =
        vec![("country (baseline)".into(), vec![Dimension::Country])];
    for d in Dimension::ALL
        .into_iter()
        .filter(|d| *d != Dimension::Country)
    {
        configs.push((format!("+ {}", d.name()), vec![Dimension::Country, d]));
    }
    configs.push(("default set".into(), Dimension::defaults()));

    println!(
        "aggregate stage, one flush interval of {n} events, median of {runs} runs (1 thread; flush to a fresh SQLite database, or PostgreSQL schema with BENCH_DATABASE=postgres)"
    );
    println!(
        "{:<22} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}",
        "dimensions", "ns/event", "+ns/event", "state bytes", "+bytes", "flush rows", "flush ms"
    );
    let mut baseline: Option<(f64, isize)> = None;
    for (i, (name, dims)) in configs.iter().enumerate() {
        let mut samples = Vec::new();
        for run in 0..runs {
            // BENCH_DATABASE=postgres: a fresh schema of the local PostgreSQL per run.
            let url = if std::env::var("BENCH_DATABASE").as_deref() == Ok("postgres") {
                runtime.block_on(pageviews::store::testing::fresh_postgres_url())
            } else {
                format!("sqlite://{}/bench-{i}-{run}.db", dir.path().display())
            };
            samples.push(measure(&runtime, &url, dims, &events));
        }
        let median = |f: &dyn Fn(&Row) -> f64| {
            let mut v: Vec<f64> = samples.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let row = Row {
            count_ns: median(&|r| r.count_ns),
            state_bytes: median(&|r| r.state_bytes as f64) as isize,
            rows: samples[0].rows,
            flush_ms: median(&|r| r.flush_ms),
        };
        let (base_ns, base_bytes) = *baseline.get_or_insert((row.count_ns, row.state_bytes));
        let delta = |x: String| if i == 0 { "".to_owned() } else { x };
        println!(
            "{:<22} {:>10.0} {:>10} {:>12} {:>10} {:>10} {:>10.1}",
            name,
            row.count_ns,
            delta(format!("{:+.0}", row.count_ns - base_ns)),
            row.state_bytes,
            delta(format!("{:+}", row.state_bytes - base_bytes)),
            row.rows,
            row.flush_ms,
        );
    }
}

/// Counts `events` with `dims` as one partition's interval, then flushes them to `url`.
fn measure(
    runtime: &tokio::runtime::Runtime,
    url: &str,
    dims: &[Dimension],
    events: &[(CountryCode, Vec<u8>)],
) -> Row {
    let mut buf = String::new();
    let before = LIVE.load(Ordering::Relaxed);
    let mut counts = Counts::new(dims, DEFAULT_TOP_K);
    let t = Instant::now();
    for (country, payload) in events {
        let event = serde_json::from_slice::<PageView<'_>>(payload).ok();
        counts.add(*country, event.as_ref(), &mut buf);
    }
    let count_ns = t.elapsed().as_nanos() as f64 / events.len().max(1) as f64;
    let state_bytes = LIVE.load(Ordering::Relaxed) - before;

    let store = runtime
        .block_on(Store::open(url))
        .expect("the database opens");
    let t = Instant::now();
    let mut batch = FlushBatch {
        consumer_group: "bench".into(),
        topic: "page-views".into(),
        offsets: vec![OffsetUpdate {
            partition: 0,
            expected: None,
            next: events.len() as i64,
        }],
        ..FlushBatch::<CountsFlush>::default()
    };
    // The default compaction (--keep-values) is part of the flush's cost.
    let keep = Keep {
        retention: None,
        latest: i64::MAX,
        values: DEFAULT_KEEP_VALUES,
    };
    fill_batch(&mut batch.results, std::iter::once(&counts), keep);
    runtime
        .block_on(store.flush(&batch))
        .expect("the flush commits");
    let flush_ms = t.elapsed().as_secs_f64() * 1000.0;
    let r = &batch.results;
    let rows = r.increments.len()
        + r.dimensions.len()
        + r.dimension_hours.len()
        + r.minutes.len()
        + r.uniques.len()
        + r.histograms.len();
    Row {
        count_ns,
        state_bytes,
        rows,
        flush_ms,
    }
}
