//! End to end against the real embedded broker and real SQLite.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pageviews::generate::LineGenerator;
use pageviews::import::{self, ImportConfig, Input};
use pageviews::preprocess::PreprocessStats;
use pageviews::serve::pipeline::PipelineResponse;
use pageviews::serve::{
    CountriesResponse, Dashboard, DimensionResponse, HistogramResponse, TimeseriesResponse,
    UniquesResponse,
};
use tokio_util::sync::CancellationToken;

fn generated(n: usize, seed: u64) -> Vec<Vec<u8>> {
    LineGenerator::new(seed)
        .take(n)
        .map(String::into_bytes)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counts_100k_lines_exactly_and_serves_them() {
    let c = cluster(16).await;
    let lines = generated(100_000, 42);
    let expected = expected_counts(lines.iter().map(Vec::as_slice));
    let pre = start_preprocessor(&c, Arc::new(PreprocessStats::default()));
    let (agg, agg_stats) = start_aggregator(&c, Duration::from_millis(500));
    assert_eq!(import_file(&c, &lines).await, 100_000);
    wait_for(&c, 100_000, Duration::from_secs(300)).await;
    // Let one more flush pass: nothing may be added beyond the input.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let counted = db_counts(&c.store).await;
    assert_eq!(counted, expected);
    assert_eq!(counted.values().sum::<u64>(), 100_000);
    // Every dimension, exactly (top-K is large enough here to hold every value).
    assert_eq!(
        db_dimensions(&c.store).await,
        expected_dimensions(lines.iter().map(Vec::as_slice))
    );
    assert!(agg_stats.flushes.load(std::sync::atomic::Ordering::Relaxed) >= 1);

    // The API and dashboard over real HTTP.
    let (addr, server) = start_server(&c).await;
    let (status, headers, body) =
        tokio::task::spawn_blocking(move || http_get(addr, "/api/countries"))
            .await
            .unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: application/json"),
        "{headers}"
    );
    let api: CountriesResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(api.total, 100_000);
    let from_api: BTreeMap<String, u64> = api
        .countries
        .iter()
        .map(|c| (c.country_code.clone(), c.visits))
        .collect();
    assert_eq!(from_api, expected);
    assert_eq!(api.max, *expected.values().max().unwrap());
    let order: Vec<(u64, &str)> = api
        .countries
        .iter()
        .map(|c| (u64::MAX - c.visits, c.country_code.as_str()))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "sorted by visits descending, then code");
    let us = api
        .countries
        .iter()
        .find(|c| c.country_code == "US")
        .unwrap();
    assert_eq!(us.country_name, "United States");
    // A dimension's panel: the top values, sorted, with the dimension's totals.
    let want = expected_dimensions(lines.iter().map(Vec::as_slice));
    let (status, _, body) =
        tokio::task::spawn_blocking(move || http_get(addr, "/api/dimensions/status?limit=3"))
            .await
            .unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    let panel: DimensionResponse = serde_json::from_slice(&body).unwrap();
    let mut top: Vec<(u64, String)> = want["status"]
        .iter()
        .map(|(v, (n, _, _))| (u64::MAX - n, v.clone()))
        .collect();
    top.sort();
    let top: Vec<(String, u64)> = top
        .into_iter()
        .take(3)
        .map(|(n, v)| (v, u64::MAX - n))
        .collect();
    let got: Vec<(String, u64)> = panel
        .values
        .iter()
        .map(|v| (v.value.clone(), v.visits))
        .collect();
    assert_eq!(got, top);
    assert_eq!(panel.total_visits, 100_000);
    assert_eq!(panel.distinct, want["status"].len() as u64);
    // The last hours: every generated line is in the first hour of 2026, so the last hour
    // holds them all; a range out of bounds is refused.
    let (_, _, body) = tokio::task::spawn_blocking(move || {
        http_get(addr, "/api/dimensions/status?limit=3&hours=1")
    })
    .await
    .unwrap();
    let hour: DimensionResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(hour.hours, Some(1));
    assert_eq!(
        (hour.values, hour.total_visits),
        (panel.values.clone(), 100_000)
    );
    let (status, _, _) =
        tokio::task::spawn_blocking(move || http_get(addr, "/api/dimensions/status?hours=0"))
            .await
            .unwrap();
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    let (status, _, body) =
        tokio::task::spawn_blocking(move || http_get(addr, "/api/dimensions/colour"))
            .await
            .unwrap();
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert!(
        String::from_utf8(body)
            .unwrap()
            .contains("known: country, continent")
    );
    // The time series: every visit in some minute; a bounded range has one point a minute.
    let (_, _, body) =
        tokio::task::spawn_blocking(move || http_get(addr, "/api/timeseries?minutes=all"))
            .await
            .unwrap();
    let all: TimeseriesResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(all.points.iter().map(|p| p.visits).sum::<u64>(), 100_000);
    let (_, _, body) =
        tokio::task::spawn_blocking(move || http_get(addr, "/api/timeseries?minutes=5&country=us"))
            .await
            .unwrap();
    let five: TimeseriesResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(five.points.len(), 5);
    assert_eq!(five.country.as_deref(), Some("US"));
    assert_eq!(five.points.last().map(|p| p.time.clone()), all.latest);
    // Unique visitors per day, within the sketch's documented error (3 standard errors) of
    // the exact distinct (address, day, User-Agent) count.
    let (_, _, body) = tokio::task::spawn_blocking(move || http_get(addr, "/api/uniques"))
        .await
        .unwrap();
    let uniques: UniquesResponse = serde_json::from_slice(&body).unwrap();
    let exact = exact_daily_visitors(lines.iter().map(Vec::as_slice));
    assert_eq!(uniques.days.len(), exact.len());
    for d in &uniques.days {
        let want = exact[&d.day] as f64;
        assert!(
            (d.visitors as f64 - want).abs() <= 3.0 * uniques.standard_error * want + 1.0,
            "{}: estimated {} of {want}",
            d.day,
            d.visitors
        );
    }
    assert_eq!(
        uniques.total,
        uniques.days.iter().map(|d| d.visitors).sum::<u64>()
    );
    // Response sizes: percentiles within 1/32 of the exact ones.
    let (_, _, body) = tokio::task::spawn_blocking(move || http_get(addr, "/api/histograms/bytes"))
        .await
        .unwrap();
    let sizes: HistogramResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(sizes.visits, 100_000);
    let mut all_bytes: Vec<u64> = Vec::new();
    for line in &lines {
        let text = std::str::from_utf8(line).unwrap();
        let tail = text.split('"').nth(2).unwrap();
        all_bytes.push(tail.split_whitespace().nth(1).unwrap().parse().unwrap());
    }
    all_bytes.sort_unstable();
    for (q, got) in [(0.5, sizes.p50), (0.95, sizes.p95), (0.99, sizes.p99)] {
        let rank = ((q * all_bytes.len() as f64).ceil() as usize).max(1);
        let exact = all_bytes[rank - 1];
        let got = got.unwrap();
        assert!(
            got.abs_diff(exact) <= exact / 32 + 1,
            "p{q}: {got} vs {exact}"
        );
    }
    // Pipeline health from the broker and the database.
    let (_, _, body) = tokio::task::spawn_blocking(move || http_get(addr, "/api/pipeline"))
        .await
        .unwrap();
    let health: PipelineResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(health.kafka_error, None);
    let topic = |name: &str| {
        health
            .topics
            .iter()
            .find(|t| t.topic == name)
            .unwrap()
            .messages
    };
    assert_eq!(topic("raw-page-views"), 100_000);
    assert_eq!(topic("page-views"), 100_000);
    let aggregators = health
        .groups
        .iter()
        .find(|g| g.group == "aggregators")
        .unwrap();
    assert_eq!(aggregators.partitions.len(), c.partitions as usize);
    assert_eq!(aggregators.lag, 0, "{aggregators:?}");
    assert!(health.last_flush.is_some());
    let (status, headers, body) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    let metrics = String::from_utf8(body).unwrap();
    for line in [
        "pageviews_lines_imported_total 100000".to_owned(),
        "pageviews_events_produced_total 100000".to_owned(),
        format!(
            "pageviews_visits_total{{country=\"US\"}} {}",
            expected["US"]
        ),
        "pageviews_consumer_lag{group=\"aggregators\",topic=\"page-views\",partition=\"0\"} 0"
            .to_owned(),
        "# TYPE pageviews_flush_duration_seconds histogram".to_owned(),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    assert!(metrics.contains("pageviews_flushes_total{group=\"aggregators\"}"));
    // The push channel sends a snapshot at once.
    let (headers, data) =
        tokio::task::spawn_blocking(move || sse_first_update(addr, "/api/events"))
            .await
            .unwrap();
    assert!(
        headers.contains("content-type: text/event-stream"),
        "{headers}"
    );
    let snapshot: Dashboard = serde_json::from_str(&data).unwrap();
    assert_eq!(snapshot.totals.visits, 100_000);
    assert_eq!(
        snapshot.totals.humans,
        want["visitor_type"].get("human").map_or(0, |h| h.0)
    );
    assert_eq!(snapshot.countries.len(), expected.len());
    assert!(snapshot.dimensions.iter().any(|d| d.name == "referrer"));
    let (status, _, body) = tokio::task::spawn_blocking(move || http_get(addr, "/"))
        .await
        .unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    let page = String::from_utf8(body).unwrap();
    assert!(page.contains("<a href=\"https://db-ip.com\">IP Geolocation by DB-IP</a>"));
    let (_, _, body) = tokio::task::spawn_blocking(move || http_get(addr, "/healthz"))
        .await
        .unwrap();
    assert_eq!(body, b"ok\n");
    server.stop().await;
    pre.stop().await;
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_counts_across_aggregator_crash_and_rebalance() {
    let c = cluster(16).await;
    let lines = generated(100_000, 7);
    let expected = expected_counts(lines.iter().map(Vec::as_slice));
    let pre = start_preprocessor(&c, Arc::new(PreprocessStats::default()));
    let (first, first_stats) = start_aggregator(&c, Duration::from_millis(300));
    let importer = {
        let path = c.dir.path().join("input.log");
        write_lines(&path, &lines);
        let config = ImportConfig {
            kafka: c.kafka.clone(),
            inputs: vec![Input::File(path)],
            follow: false,
            rate: Some(10_000),
            checkpoints: None,
            from_start: false,
            format: Default::default(),
        };
        tokio::spawn(import::run(config, CancellationToken::new()))
    };
    // Crash the first aggregator once it has flushed part of the stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while first_stats
        .flushed_visits
        .load(std::sync::atomic::Ordering::Relaxed)
        < 10_000
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "first aggregator never flushed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill().await;
    // A replacement, then a second one joining: the group rebalances while counting.
    let (second, _) = start_aggregator(&c, Duration::from_millis(300));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (third, third_stats) = start_aggregator(&c, Duration::from_millis(300));
    assert_eq!(importer.await.unwrap().unwrap().lines, 100_000);
    wait_for(&c, 100_000, Duration::from_secs(300)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(db_counts(&c.store).await, expected);
    assert_eq!(
        db_dimensions(&c.store).await,
        expected_dimensions(lines.iter().map(Vec::as_slice)),
        "every dimension exact across the crash and rebalances"
    );
    assert!(
        third_stats
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the joining aggregator got partitions"
    );
    second.stop().await;
    third.stop().await;
    pre.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_lines_are_dead_lettered_with_reasons() {
    let c = cluster(4).await;
    let good = generated(2_000, 3);
    let mut bad: Vec<Vec<u8>> = vec![
        vec![0x00, 0x9f, 0x92, 0x96, 0xff, 0x13, 0x37], // binary garbage
        b"203.0.113.9 - - [10/Oct/2000:13:5".to_vec(),  // truncated in the timestamp
        b"203.0.113.9 - - [10/Oct/2000:13:55:36 -0700] \"GET /x HT".to_vec(), // truncated request
        b"203.0.113.9 - - [10/Oct/2000:13:55:36 -0700] \"GET /\xc3\x28 HTTP/1.1\" 200 1".to_vec(), // invalid UTF-8
        vec![b'x'; 1 << 20], // a 1 MiB line
        b"".to_vec(),        // empty line
    ];
    // Each reason names the format the line was read with (detected from the file: COMBINED).
    let reasons_expected = [
        "COMBINED: invalid UTF-8 at byte 1",
        "COMBINED: missing timestamp",
        "COMBINED: missing status",
        "COMBINED: invalid UTF-8 at byte 51",
        "line too long: 1048576 bytes",
        "COMBINED: empty line",
    ];
    let mut lines = good.clone();
    for (i, b) in bad.drain(..).enumerate() {
        lines.insert(i * 300 + 1, b);
    }
    let expected = expected_counts(good.iter().map(Vec::as_slice));
    let pre_stats = Arc::new(PreprocessStats::default());
    let pre = start_preprocessor(&c, Arc::clone(&pre_stats));
    let (agg, _) = start_aggregator(&c, Duration::from_millis(300));
    assert_eq!(import_file(&c, &lines).await, 2_006);
    wait_for(&c, 2_000, Duration::from_secs(120)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while pre_stats
        .dead_letters
        .load(std::sync::atomic::Ordering::Relaxed)
        < 6
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the preprocessor never dead-lettered 6 lines"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(db_counts(&c.store).await, expected);
    assert_eq!(
        pre_stats
            .dead_letters
            .load(std::sync::atomic::Ordering::Relaxed),
        6
    );

    // Every dead letter carries its reason and the (possibly cut) original bytes.
    let mut reasons = Vec::new();
    for (reason, len) in common::dead_letters(&c, 6).await {
        if reason.starts_with("line too long") {
            assert_eq!(len, pageviews::import::MAX_LINE_BYTES + 1);
        }
        reasons.push(reason);
    }
    reasons.sort();
    let mut want: Vec<String> = reasons_expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(reasons, want);
    pre.stop().await;
    agg.stop().await;
}

/// An import stopped part-way resumes after its checkpoint: importing the same file twice
/// more counts every line exactly once, and a file that grew sends only the new lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn import_resumes_from_its_checkpoint() {
    let c = cluster(4).await;
    let lines = generated(30_000, 11);
    let path = c.dir.path().join("access.log");
    write_lines(&path, &lines[..20_000]);
    let config = |rate| ImportConfig {
        kafka: c.kafka.clone(),
        inputs: vec![Input::File(path.clone())],
        follow: false,
        rate,
        checkpoints: Some(import::checkpoint::CheckpointDir::new(
            c.dir.path().join("checkpoints"),
            &c.kafka.brokers,
            pageviews::kafka::RAW_TOPIC,
        )),
        from_start: false,
        format: Default::default(),
    };
    let pre = start_preprocessor(&c, Arc::new(PreprocessStats::default()));
    let (agg, _) = start_aggregator(&c, Duration::from_millis(300));

    // Stopped (as by Ctrl-C / SIGTERM) after about a second at 5,000 lines/s.
    let stop = CancellationToken::new();
    let first = tokio::spawn(import::run(config(Some(5_000)), stop.clone()));
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    stop.cancel();
    let first = first.await.unwrap().unwrap();
    assert!(
        first.lines > 0 && first.lines < 20_000,
        "stopped part-way: {first:?}"
    );
    let second = import::run(config(None), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(second.already_imported, first.lines);
    assert_eq!(first.lines + second.lines, 20_000);

    // The file grows (a log being written): only the new lines go out.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    for l in &lines[20_000..] {
        std::io::Write::write_all(&mut f, l).unwrap();
        std::io::Write::write_all(&mut f, b"\n").unwrap();
    }
    drop(f);
    let third = import::run(config(None), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((third.already_imported, third.lines), (20_000, 10_000));

    wait_for(&c, 30_000, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        db_counts(&c.store).await,
        expected_counts(lines.iter().map(Vec::as_slice))
    );
    pre.stop().await;
    agg.stop().await;
}

/// Another process holding SQLite's write lock at flush time only delays the counts: the
/// aggregator keeps counting, retries with backoff, and once the lock is gone writes every
/// visit exactly once (offsets move only with a committed flush).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flush_retries_while_the_database_is_locked() {
    use std::sync::atomic::Ordering::Relaxed;
    let c = cluster(4).await;
    let lines = generated(5_000, 11);
    let expected = expected_counts(lines.iter().map(Vec::as_slice));
    // The lock holder: a write transaction from a separate connection, as another process's.
    let db = libsql::Builder::new_local(c.dir.path().join("stats.db"))
        .build()
        .await
        .unwrap();
    let locker = db.connect().unwrap();
    locker.execute("BEGIN IMMEDIATE", ()).await.unwrap();

    let pre = start_preprocessor(&c, Arc::new(PreprocessStats::default()));
    let (agg, stats) = start_aggregator(&c, Duration::from_millis(300));
    assert_eq!(import_file(&c, &lines).await, 5_000);
    // Each attempt waits out the 5 s busy timeout, then fails and is retried.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while stats.failed_flushes.load(Relaxed) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed flush while the database was locked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stats.flushes.load(Relaxed),
        0,
        "a flush committed through the lock"
    );
    assert_eq!(db_counts(&c.store).await, BTreeMap::new());

    locker.execute("ROLLBACK", ()).await.unwrap();
    wait_for(&c, 5_000, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(db_counts(&c.store).await, expected);
    assert!(stats.flushes.load(Relaxed) >= 1);
    agg.stop().await;
    pre.stop().await;
}

/// Issue 8.4: a database that stops answering (here: a PostgreSQL transaction holds an
/// exclusive lock on the offsets table, so every read of it waits) holds up neither a
/// rebalance nor a shutdown. A second aggregator joins, both must read stored positions, and
/// both still stop within seconds when asked. Before, the positions were read inside the
/// rebalance callback, retried forever, and the aggregator never stopped. Once the database
/// answers again, a new aggregator counts every line exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_database_holds_up_neither_rebalance_nor_shutdown() {
    let mut c = cluster(4).await;
    let url = pageviews::store::testing::fresh_postgres_url().await;
    c.store = pageviews::store::Store::open(&url).await.unwrap();
    let (first_lines, more_lines) = (generated(3_000, 21), generated(2_000, 22));
    let expected = expected_counts(
        first_lines
            .iter()
            .chain(more_lines.iter())
            .map(Vec::as_slice),
    );
    let pre = start_preprocessor(&c, Arc::new(PreprocessStats::default()));
    let (a, _) = start_aggregator(&c, Duration::from_millis(300));
    assert_eq!(import_file(&c, &first_lines).await, 3_000);
    wait_for(&c, 3_000, Duration::from_secs(120)).await;

    let (locker, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; LOCK TABLE consumer_offsets IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let (b, _) = start_aggregator(&c, Duration::from_millis(300));
    // Long enough for the group to rebalance and both to be stuck on the database.
    tokio::time::sleep(Duration::from_secs(8)).await;
    for (name, stage) in [("joining", b), ("first", a)] {
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), stage.stop())
            .await
            .unwrap_or_else(|_| {
                panic!("the {name} aggregator did not stop with the database hung")
            });
        eprintln!("{name} aggregator stopped in {:?}", started.elapsed());
    }

    locker.batch_execute("ROLLBACK").await.unwrap();
    let (third, _) = start_aggregator(&c, Duration::from_millis(300));
    assert_eq!(import_file(&c, &more_lines).await, 2_000);
    wait_for(&c, 5_000, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(db_counts(&c.store).await, expected);
    third.stop().await;
    pre.stop().await;
}

/// Two aggregators stop one after the other (the second, the group's leader, while the group
/// is re-forming after the first left), then a third starts: it gets every partition and
/// counts every new line exactly once. tansu 0.6.0 kept the departed leader of a forming group,
/// told every later member to follow it, and the group owned no partition for good (see
/// vendor/tansu-broker/PATCHED.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_whose_leader_left_while_forming_takes_new_members() {
    let c = cluster(4).await;
    let (first_lines, more_lines) = (generated(3_000, 31), generated(2_000, 32));
    let expected = expected_counts(
        first_lines
            .iter()
            .chain(more_lines.iter())
            .map(Vec::as_slice),
    );
    let pre = start_preprocessor(&c, Arc::new(PreprocessStats::default()));
    let (a, _) = start_aggregator(&c, Duration::from_millis(300));
    assert_eq!(import_file(&c, &first_lines).await, 3_000);
    wait_for(&c, 3_000, Duration::from_secs(120)).await;
    let (b, _) = start_aggregator(&c, Duration::from_millis(300));
    // Long enough for the group to have formed with both (the first one leads it).
    tokio::time::sleep(Duration::from_secs(8)).await;
    b.stop().await;
    a.stop().await;
    let (third, stats) = start_aggregator(&c, Duration::from_millis(300));
    assert_eq!(import_file(&c, &more_lines).await, 2_000);
    wait_for(&c, 5_000, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(db_counts(&c.store).await, expected);
    assert!(stats.flushes.load(std::sync::atomic::Ordering::Relaxed) > 0);
    third.stop().await;
    pre.stop().await;
}

/// The group's leader is killed (SIGKILL: no LeaveGroup) and a new member joins before its
/// session expires, so the group re-forms with a dead leader; the members left keep trying
/// to sync until the leader's session expires. Then they must be assigned every partition and
/// count every line. tansu 0.6.0 took the SyncGroup of whichever follower arrived right when
/// the expiry was noticed as the leader's, with its empty list of assignments: every member was
/// assigned nothing, for good (the multi-process stall of issue 7; see
/// vendor/tansu-broker/PATCHED.md). The leader is the real binary, so that it can be SIGKILLed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_whose_leader_died_while_forming_assigns_every_partition() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let c = cluster(4).await;
    let lines = generated(2_000, 41);
    let expected = expected_counts(lines.iter().map(Vec::as_slice));
    let pre = start_preprocessor(&c, Arc::new(PreprocessStats::default()));
    // The first member creates the group, leads it and sets its session timeout (6 s).
    let mut leader = Command::new(common::bin())
        .args([
            "--brokers",
            &c.broker.bootstrap(),
            "--database",
            &format!("sqlite://{}/stats.db", c.dir.path().display()),
            "--data-dir",
            &c.dir.path().join("leader").display().to_string(),
            "-X",
            "session.timeout.ms=6000",
            "-X",
            "heartbeat.interval.ms=1000",
            "aggregate",
            "--flush-interval",
            "300ms",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = leader.stderr.take().unwrap();
    let (assigned_tx, assigned_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("assigned") {
                let _ = assigned_tx.send(line);
            }
        }
    });
    let first = assigned_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the leader was never assigned partitions");
    assert!(first.contains("[0, 1, 2, 3]"), "{first}");
    // A second member: the group re-forms under the same leader.
    let (b, _) = start_aggregator(&c, Duration::from_millis(300));
    assigned_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the group did not rebalance when a second member joined");
    tokio::time::sleep(Duration::from_secs(2)).await;
    leader.kill().unwrap();
    let _ = leader.wait();
    // A third member joins the group whose leader is dead.
    let (third, _) = start_aggregator(&c, Duration::from_millis(300));
    assert_eq!(import_file(&c, &lines).await, 2_000);
    wait_for(&c, 2_000, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(db_counts(&c.store).await, expected);
    third.stop().await;
    b.stop().await;
    pre.stop().await;
}
