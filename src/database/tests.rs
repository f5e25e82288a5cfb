use crate::aggregate::tables::*;
use crate::alert::tables::*;
use crate::store::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

fn batch(
    increments: &[(&str, u64)],
    offsets: &[(i32, Option<i64>, i64)],
) -> FlushBatch<CountsFlush> {
    FlushBatch {
        consumer_group: "g".into(),
        topic: "t".into(),
        results: CountsFlush {
            increments: increments
                .iter()
                .map(|(c, n)| ((*c).to_owned(), *n))
                .collect(),
            ..CountsFlush::default()
        },
        offsets: offsets
            .iter()
            .map(|&(partition, expected, next)| OffsetUpdate {
                partition,
                expected,
                next,
            })
            .collect(),
        ..FlushBatch::default()
    }
}

fn wm(partition: i32, source_partition: i32, source_offset: i64) -> WatermarkUpdate {
    WatermarkUpdate {
        partition,
        source_partition,
        source_offset,
    }
}

/// The contract both databases keep.
async fn flush_is_atomic_and_fenced(url: &str) {
    let store = Store::open(url).await.unwrap();
    assert_eq!(
        store
            .flush(&batch(&[("NL", 2), ("US", 5)], &[(0, None, 7)]))
            .await
            .unwrap(),
        FlushOutcome::Committed
    );
    let mut second = batch(&[("NL", 4)], &[(0, Some(7), 11), (1, None, 3)]);
    second.watermarks = vec![wm(0, 3, 500), wm(0, 4, 9), wm(1, 3, 501)];
    second.lost = 40;
    assert_eq!(store.flush(&second).await.unwrap(), FlushOutcome::Committed);
    let mut third = batch(&[], &[(0, Some(11), 12)]);
    third.watermarks = vec![wm(0, 3, 502)];
    assert_eq!(store.flush(&third).await.unwrap(), FlushOutcome::Committed);
    // A writer that still thinks offset 7 is stored is fenced off and writes nothing,
    // not even the offsets or watermarks of its other partitions.
    let mut zombie = batch(&[("NL", 100)], &[(0, Some(7), 9), (2, None, 1)]);
    zombie.watermarks = vec![wm(0, 3, 900), wm(2, 3, 900)];
    zombie.lost = 1000;
    assert_eq!(
        store.flush(&zombie).await.unwrap(),
        FlushOutcome::Conflict(vec![0])
    );
    assert_eq!(
        store
            .flush(&batch(&[("DE", 1)], &[(1, None, 1)]))
            .await
            .unwrap(),
        FlushOutcome::Conflict(vec![1])
    );
    let counts: Vec<(String, u64)> = store
        .country_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.country_code, c.visits))
        .collect();
    assert_eq!(counts, vec![("NL".to_owned(), 6), ("US".to_owned(), 5)]);
    // Lost messages are written with the offsets that moved past them, fenced alike.
    let lost = |d: Vec<(String, FlushDurations)>| -> Vec<(String, u64)> {
        d.into_iter().map(|(g, f)| (g, f.lost)).collect()
    };
    assert_eq!(
        lost(store.flush_durations().await.unwrap()),
        vec![("g".to_owned(), 40)]
    );
    let expected = StoredPositions {
        offsets: HashMap::from([(0, 12), (1, 3)]),
        watermarks: HashMap::from([
            (0, HashMap::from([(3, 502), (4, 9)])),
            (1, HashMap::from([(3, 501)])),
        ]),
        identities: HashMap::from([(0, TopicIdentity::default()), (1, TopicIdentity::default())]),
        event_clocks: HashMap::new(),
        state: HashMap::new(),
    };
    assert_eq!(store.load_positions("g", "t").await.unwrap(), expected);
    assert_eq!(
        store.load_positions("other-group", "t").await.unwrap(),
        StoredPositions::default()
    );
    // Topic ids are recorded for every partition a flush moves; a reset replaces the
    // partition's watermarks (they counted in a raw topic that is gone).
    let mut rebound = batch(&[("NL", 1)], &[(0, Some(12), 13)]);
    rebound.identity = TopicIdentity {
        topic_id: Some("new-events".into()),
        source_topic_id: Some("new-raw".into()),
    };
    rebound.reset_watermarks = vec![0];
    rebound.watermarks = vec![wm(0, 5, 3)];
    rebound.lost = 2;
    assert_eq!(
        store.flush(&rebound).await.unwrap(),
        FlushOutcome::Committed
    );
    let expected = StoredPositions {
        offsets: HashMap::from([(0, 13), (1, 3)]),
        watermarks: HashMap::from([(0, HashMap::from([(5, 3)])), (1, HashMap::from([(3, 501)]))]),
        identities: HashMap::from([
            (
                0,
                TopicIdentity {
                    topic_id: Some("new-events".into()),
                    source_topic_id: Some("new-raw".into()),
                },
            ),
            (1, TopicIdentity::default()),
        ]),
        event_clocks: HashMap::new(),
        state: HashMap::new(),
    };
    // Reopening keeps everything (migrations are idempotent).
    drop(store);
    let store = Store::open(url).await.unwrap();
    assert_eq!(store.load_positions("g", "t").await.unwrap(), expected);
    assert_eq!(
        lost(store.flush_durations().await.unwrap()),
        vec![("g".to_owned(), 42)]
    );
}

/// Dimension and minute counts add up across flushes, are fenced with the offsets, and
/// read back sorted with their totals; old minutes are pruned.
async fn dimensions_and_minutes_add_up(url: &str) {
    let store = Store::open(url).await.unwrap();
    let amount = |visits, bytes, humans| Amount {
        visits,
        bytes,
        humans,
    };
    let dim = |d: &str, v: &str, a: Amount| DimensionIncrement {
        dimension: d.into(),
        value: v.into(),
        amount: a,
    };
    let minute = |m: i64, c: &str, a: Amount| MinuteIncrement {
        minute: m,
        country_code: c.into(),
        amount: a,
    };
    let mut first = batch(&[("NL", 3)], &[(0, None, 3)]);
    first.results.dimensions = vec![
        dim("path", "/a", amount(2, 20, 1)),
        dim("path", "/b", amount(1, 5, 1)),
        dim("status", "200", amount(3, 25, 2)),
    ];
    let hour = |h: i64, v: &str, a: Amount| DimensionHourIncrement {
        dimension: "path".into(),
        hour: h,
        value: v.into(),
        amount: a,
    };
    first.results.dimension_hours = vec![
        hour(0, "/a", amount(2, 20, 1)),
        hour(3600, "/b", amount(1, 5, 1)),
    ];
    first.results.minutes = vec![
        minute(60, "NL", amount(2, 20, 1)),
        minute(120, "NL", amount(1, 5, 1)),
    ];
    assert_eq!(store.flush(&first).await.unwrap(), FlushOutcome::Committed);
    let mut second = batch(&[("NL", 2)], &[(0, Some(3), 5)]);
    second.results.dimensions = vec![
        dim("path", "/b", amount(2, 10, 0)),
        dim("path", "(other)", amount(1, 1, 1)),
    ];
    second.results.minutes = vec![minute(180, "US", amount(2, 11, 1))];
    second.results.prune_minutes_before = Some(120);
    second.results.dimension_hours = vec![
        hour(3600, "/b", amount(2, 10, 0)),
        hour(7200, "/a", amount(1, 1, 1)),
    ];
    second.results.prune_hours_before = Some(3600);
    assert_eq!(store.flush(&second).await.unwrap(), FlushOutcome::Committed);
    // A fenced-off flush adds nothing.
    let mut zombie = batch(&[("NL", 9)], &[(0, Some(3), 9)]);
    zombie.results.dimensions = vec![dim("path", "/a", amount(9, 9, 9))];
    zombie.results.minutes = vec![minute(180, "US", amount(9, 9, 9))];
    assert_eq!(
        store.flush(&zombie).await.unwrap(),
        FlushOutcome::Conflict(vec![0])
    );
    let path = store.dimension_counts("path", None, 2).await.unwrap();
    let value = |v: &str, visits, bytes, humans| ValueCount {
        value: v.into(),
        visits,
        bytes,
        humans,
    };
    assert_eq!(
        path,
        DimensionCounts {
            values: vec![value("/b", 3, 15, 1), value("/a", 2, 20, 1)],
            total_visits: 6,
            total_bytes: 36,
            total_humans: 3,
            distinct: 3,
        }
    );
    assert_eq!(
        store.dimension_counts("nothing", None, 5).await.unwrap(),
        DimensionCounts::default()
    );
    // By hour: hour 0 pruned; from hour 7200 on only `/a`'s last visit.
    assert_eq!(
        store.dimension_counts("path", Some(0), 5).await.unwrap(),
        DimensionCounts {
            values: vec![value("/b", 3, 15, 1), value("/a", 1, 1, 1)],
            total_visits: 4,
            total_bytes: 16,
            total_humans: 2,
            distinct: 2,
        }
    );
    assert_eq!(
        store
            .dimension_counts("path", Some(7200), 5)
            .await
            .unwrap()
            .values,
        vec![value("/a", 1, 1, 1)]
    );
    let point = |minute, visits, bytes, humans| MinutePoint {
        minute,
        visits,
        bytes,
        humans,
    };
    assert_eq!(
        store.minutes(0, None).await.unwrap(),
        vec![point(120, 1, 5, 1), point(180, 2, 11, 1)],
        "minute 60 pruned"
    );
    assert_eq!(
        store.minutes(150, Some("US")).await.unwrap(),
        vec![point(180, 2, 11, 1)]
    );
    assert!(store.minutes(0, Some("DE")).await.unwrap().is_empty());
    assert_eq!(store.latest_minute().await.unwrap(), Some(180));
    assert_eq!(store.flush_version().await.unwrap(), 5);
    // Two committed flushes (the fenced one is not counted), with their durations.
    let durations = store.flush_durations().await.unwrap();
    assert_eq!(durations.len(), 1);
    assert_eq!(durations[0].0, "g");
    assert_eq!(durations[0].1.count, 2);
    assert_eq!(durations[0].1.buckets.len(), FLUSH_BUCKETS_MS.len());
    assert_eq!(durations[0].1.buckets.iter().map(|b| b.1).sum::<u64>(), 2);
    assert!(store.last_flush().await.unwrap().is_some());
}

/// Unique-visitor sketches merge with what is stored (a union: sending the same visitors
/// again changes nothing); histogram buckets add up.
async fn sketches_merge(url: &str) {
    use crate::sketch::Hll;
    let store = Store::open(url).await.unwrap();
    let sketch = |from: u64, to: u64| {
        let mut h = Hll::default();
        for i in from..to {
            h.add(crate::event::visitor_id(&i.to_string(), "d", "u"));
        }
        h
    };
    let unique = |day: &str, c: &str, h: Hll| UniqueSketch {
        day: day.into(),
        country_code: c.into(),
        sketch: h,
    };
    let hist = |scope: &str, bucket, count| HistogramIncrement {
        metric: "bytes".into(),
        scope: scope.into(),
        bucket,
        count,
    };
    let mut first = batch(&[("NL", 1)], &[(0, None, 1)]);
    first.results.uniques = vec![
        unique("2026-01-01", "NL", sketch(0, 600)),
        unique("2026-01-01", "*", sketch(0, 600)),
        unique("2026-01-02", "*", sketch(0, 10)),
    ];
    first.results.histograms = vec![hist("*", 3, 2), hist("NL", 3, 2)];
    assert_eq!(store.flush(&first).await.unwrap(), FlushOutcome::Committed);
    let mut second = batch(&[("NL", 1)], &[(0, Some(1), 2)]);
    second.results.uniques = vec![
        unique("2026-01-01", "NL", sketch(300, 1000)),
        unique("2026-01-01", "*", sketch(300, 1000)),
        unique("2026-01-01", "DE", sketch(5000, 5100)),
    ];
    second.results.histograms = vec![hist("*", 3, 1), hist("*", 40, 5)];
    assert_eq!(store.flush(&second).await.unwrap(), FlushOutcome::Committed);
    let days = store.unique_days("*", 10).await.unwrap();
    assert_eq!(
        days.iter().map(|d| d.day.as_str()).collect::<Vec<_>>(),
        vec!["2026-01-02", "2026-01-01"]
    );
    assert_eq!(days[0].visitors, 10);
    let within = |got: u64, exact: f64| (got as f64 - exact).abs() <= exact * 0.025;
    assert!(within(days[1].visitors, 1000.0), "{days:?}");
    let countries = store.unique_countries("2026-01-01").await.unwrap();
    assert_eq!(countries.len(), 2, "{countries:?}");
    assert_eq!(countries[0].country_code, "NL");
    assert!(within(countries[0].visitors, 1000.0), "{countries:?}");
    assert_eq!(countries[1].visitors, 100);
    assert_eq!(
        store.histogram("bytes", "*").await.unwrap(),
        vec![(3, 3), (40, 5)]
    );
    assert_eq!(store.histogram("bytes", "NL").await.unwrap(), vec![(3, 2)]);
    assert!(
        store
            .histogram("request_time_us", "*")
            .await
            .unwrap()
            .is_empty()
    );
}

/// An alerting group's flush, close and outbox: windows add up across flushes and
/// partitions, close once the watermark (every partition's clock) passes them, yield each
/// alert id once, count what arrives after the close as late, and deliver in order with
/// claims that keep a second member from sending the same alert.
async fn alerts_close_once_and_deliver_in_order(url: &str) {
    use crate::alert::rules::parse_rules;
    use crate::alert::window::{ALL, PartitionClock, WindowRow, WindowTotals};
    let store = Store::open(url).await.unwrap();
    let rules = parse_rules(
        "[[rule]]\nname = \"errors\"\nkind = \"error_share\"\nabove = 0.2\nmin_requests = 2\nwindow = \"1m\"\n\
         [[rule]]\nname = \"cn\"\nkind = \"country_visits\"\ncountry = \"CN\"\nabove = 2\nwindow = \"1m\"\n",
    )
    .unwrap();
    let row = |start: i64, subject: &str, requests: u64, errors: u64| WindowRow {
        window: 60,
        start,
        subject: subject.into(),
        totals: WindowTotals { requests, errors },
    };
    let clock = |partition: i32, clock: Option<i64>| PartitionClock {
        partition,
        clock,
        caught_up_since: None,
    };
    let t0 = 1_767_225_600;
    let flush = |offsets: &[(i32, Option<i64>, i64)],
                 windows: Vec<WindowRow>,
                 clocks: Vec<PartitionClock>| {
        let b = batch(&[], offsets);
        FlushBatch {
            consumer_group: "alerts".into(),
            topic: b.topic,
            offsets: b.offsets,
            clocks,
            results: AlertFlush {
                windows,
                late: 1,
                first_event: Some(t0),
            },
            ..FlushBatch::default()
        }
    };
    // Partition 0: minute 0 with 4 requests, 1 error; partition 1: 3 CN visits, 1 error.
    let first = flush(
        &[(0, None, 10), (1, None, 5)],
        vec![row(t0, ALL, 7, 2), row(t0, "CN", 3, 1), row(t0, "US", 4, 1)],
        vec![clock(0, Some(t0 + 100)), clock(1, Some(t0 + 50))],
    );
    assert_eq!(store.flush(&first).await.unwrap(), FlushOutcome::Committed);
    let positions = store.load_positions("alerts", "t").await.unwrap();
    assert_eq!(
        positions.event_clocks,
        HashMap::from([(0, t0 + 100), (1, t0 + 50)])
    );
    let req = |partitions: i32, now_ms: i64| CloseRequest {
        group: "alerts".into(),
        topic: "t".into(),
        partitions,
        now_ms,
        idle_ms: 10_000,
        lateness: 0,
        rules: rules.clone(),
    };
    // Three partitions, one never reported: nothing closes.
    assert_eq!(store.close_windows(&req(3, 0)).await.unwrap(), 0);
    // Two: the watermark is t0 + 50, minute 0 (ending t0 + 60) stays open.
    assert_eq!(store.close_windows(&req(2, 0)).await.unwrap(), 0);
    let second = flush(
        &[(1, Some(5), 8)],
        vec![
            row(t0, ALL, 1, 1),
            row(t0, "CN", 1, 1),
            row(t0 + 60, ALL, 1, 0),
        ],
        vec![clock(1, Some(t0 + 70))],
    );
    assert_eq!(store.flush(&second).await.unwrap(), FlushOutcome::Committed);
    // Minute 0: 8 requests, 3 errors (37.5%), 4 from CN: two alerts, once.
    assert_eq!(store.close_windows(&req(2, 0)).await.unwrap(), 2);
    assert_eq!(store.close_windows(&req(2, 0)).await.unwrap(), 0);
    let status = store.alert_status("alerts").await.unwrap();
    assert_eq!(
        status,
        AlertStatus {
            closed_through: Some(t0 + 70),
            late_events: 2,
            pending: 2,
            delivered: 0
        }
    );
    // Counts for the closed minute that arrive now are late, not lost silently.
    let late = flush(
        &[(0, Some(10), 11)],
        vec![row(t0, ALL, 5, 5)],
        vec![clock(0, Some(t0 + 100))],
    );
    assert_eq!(store.flush(&late).await.unwrap(), FlushOutcome::Committed);
    assert_eq!(
        store.alert_status("alerts").await.unwrap().late_events,
        2 + 1 + 5
    );
    assert_eq!(
        store.close_windows(&req(2, 0)).await.unwrap(),
        0,
        "minute 0 stays closed"
    );
    // The outbox, oldest window first, then by id.
    let pending = store.pending_alerts("alerts", 10).await.unwrap();
    let ids: Vec<&str> = pending.iter().map(|a| a.alert.id.as_str()).collect();
    assert_eq!(
        ids,
        ["cn/2026-01-01T00:00:00Z/CN", "errors/2026-01-01T00:00:00Z"]
    );
    assert_eq!(pending[0].alert.value, 4.0);
    assert_eq!(pending[1].alert.value, 0.375);
    // A claim keeps another member off until it expires; a failure releases it.
    let id = ids[0].to_owned();
    assert!(
        store
            .claim_alert("alerts", &id, 1_000, 5_000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .claim_alert("alerts", &id, 2_000, 6_000)
            .await
            .unwrap()
    );
    store.alert_failed("alerts", &id, "HTTP 503").await.unwrap();
    assert!(
        store
            .claim_alert("alerts", &id, 2_000, 6_000)
            .await
            .unwrap()
    );
    store.alert_delivered("alerts", &id, 2_500).await.unwrap();
    assert!(
        !store
            .claim_alert("alerts", &id, 9_000, 19_000)
            .await
            .unwrap(),
        "delivered: never again"
    );
    let pending = store.pending_alerts("alerts", 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].attempts, 0);
    let all = store.alerts("alerts", false, 10).await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all[0].delivered && all[0].attempts == 2);
    assert_eq!(
        store.alert_status("alerts").await.unwrap(),
        AlertStatus {
            closed_through: Some(t0 + 70),
            late_events: 8,
            pending: 1,
            delivered: 1
        }
    );
    // Another group has its own everything.
    assert_eq!(
        store.alert_status("other").await.unwrap(),
        AlertStatus::default()
    );
    // An idle partition (caught up for the idle timeout) no longer holds windows open.
    let idle = flush(
        &[(1, Some(8), 8)],
        vec![],
        vec![PartitionClock {
            partition: 1,
            clock: Some(t0 + 70),
            caught_up_since: Some(0),
        }],
    );
    assert_eq!(store.flush(&idle).await.unwrap(), FlushOutcome::Committed);
    assert_eq!(store.close_windows(&req(2, 20_000)).await.unwrap(), 0);
    assert_eq!(
        store.alert_status("alerts").await.unwrap().closed_through,
        Some(t0 + 100),
        "partition 0's clock alone"
    );
}

#[tokio::test]
async fn sqlite_alerts_close_once_and_deliver_in_order() {
    let dir = tempfile::tempdir().unwrap();
    alerts_close_once_and_deliver_in_order(&format!("sqlite://{}/s.db", dir.path().display()))
        .await;
}

#[tokio::test]
async fn postgres_alerts_close_once_and_deliver_in_order() {
    alerts_close_once_and_deliver_in_order(&testing::fresh_postgres_url().await).await;
}

#[tokio::test]
async fn sqlite_sketches_merge() {
    let dir = tempfile::tempdir().unwrap();
    sketches_merge(&format!("sqlite://{}/s.db", dir.path().display())).await;
}

#[tokio::test]
async fn postgres_sketches_merge() {
    sketches_merge(&testing::fresh_postgres_url().await).await;
}

/// Hostile values at the store: tables stay within `keep_values` (the rest in `(other)`,
/// sums exact), byte sums saturate instead of failing, and a value the database refuses
/// (PostgreSQL: a 3,500-byte key) is a data error that `quarantine` turns into a flush
/// that commits with exact totals.
async fn hostile_values_are_bounded(url: &str) {
    let store = Store::open(url).await.unwrap();
    let amount = |visits, bytes| Amount {
        visits,
        bytes,
        humans: visits,
    };
    let dim = |v: String, a: Amount| DimensionIncrement {
        dimension: "path".into(),
        value: v,
        amount: a,
    };
    let hour = |v: String, a: Amount| DimensionHourIncrement {
        dimension: "path".into(),
        hour: 3600,
        value: v,
        amount: a,
    };
    // 30 values, the i-th with i+1 visits, kept to 10.
    let mut offset = 0;
    let mut expected_visits = 0;
    for round in 0..3i64 {
        let mut b = batch(
            &[("NL", 1)],
            &[(0, (round > 0).then_some(offset), offset + 1)],
        );
        offset += 1;
        b.results.keep_values = Some(10);
        for i in 0..10u64 {
            let n = round as u64 * 10 + i + 1;
            expected_visits += n;
            b.results
                .dimensions
                .push(dim(format!("/v{n:02}"), amount(n, i64::MAX as u64)));
            b.results
                .dimension_hours
                .push(hour(format!("/v{n:02}"), amount(n, 1)));
        }
        b.results.dimensions.sort();
        b.results.dimension_hours.sort();
        assert_eq!(store.flush(&b).await.unwrap(), FlushOutcome::Committed);
    }
    let path = store.dimension_counts("path", None, 1000).await.unwrap();
    assert_eq!(path.distinct, 11, "{path:?}");
    assert_eq!(path.total_visits, expected_visits);
    // The ten with the most visits are kept as they are.
    let kept: Vec<(&str, u64)> = path
        .values
        .iter()
        .map(|v| (v.value.as_str(), v.visits))
        .collect();
    let mut want: Vec<(String, u64)> = (21..=30).rev().map(|n| (format!("/v{n:02}"), n)).collect();
    want.insert(0, (OTHER.to_owned(), (1..=20).sum()));
    let want: Vec<(&str, u64)> = want.iter().map(|(v, n)| (v.as_str(), *n)).collect();
    assert_eq!(kept, want);
    // Every byte sum saturated at the largest BIGINT instead of failing the flush.
    assert!(
        path.values.iter().all(|v| v.bytes == i64::MAX as u64),
        "{path:?}"
    );
    let hours = store
        .dimension_counts("path", Some(3600), 1000)
        .await
        .unwrap();
    assert_eq!(hours.distinct, 11);
    assert_eq!(hours.total_visits, expected_visits);

    // A value too long for PostgreSQL's index (random, so that compression cannot shrink
    // it below 2,704 bytes): a data error, quarantined, then committed.
    let long: String = {
        use rand::{Rng, SeedableRng};
        rand::rngs::StdRng::seed_from_u64(7)
            .sample_iter(rand::distr::Alphanumeric)
            .take(6000)
            .map(char::from)
            .collect()
    };
    let mut b = batch(&[("NL", 2)], &[(0, Some(offset), offset + 1)]);
    b.results.dimensions = vec![
        dim("/ok".into(), amount(1, 5)),
        dim(format!("/{long}"), amount(1, 7)),
    ];
    match store.flush(&b).await {
        Ok(FlushOutcome::Committed) => assert!(url.starts_with("sqlite")),
        Ok(other) => panic!("{other:?}"),
        Err(e) => {
            assert!(url.starts_with("postgres"), "{e}");
            assert!(e.is_data_error(), "not a data error: {e}");
            assert_eq!(b.quarantine(&e.to_string(), false), 1);
            assert_eq!(store.flush(&b).await.unwrap(), FlushOutcome::Committed);
            let path = store.dimension_counts("path", None, 1000).await.unwrap();
            assert_eq!(path.total_visits, expected_visits + 2);
            let invalid = path.values.iter().find(|v| v.value == INVALID).unwrap();
            assert_eq!((invalid.visits, invalid.bytes), (1, 7));
            let flushes = store.flush_durations().await.unwrap();
            assert_eq!(flushes[0].1.data_errors, 1, "{flushes:?}");
        }
    }
    // A connection that is refused is not a data error.
    match Store::open("postgres://nobody@127.0.0.1:1/none").await {
        Err(refused) => assert!(!refused.is_data_error(), "{refused}"),
        Ok(_) => panic!("a closed port answered"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_hostile_values_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    hostile_values_are_bounded(&format!("sqlite://{}", dir.path().join("h.db").display())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_hostile_values_are_bounded() {
    hostile_values_are_bounded(&testing::fresh_postgres_url().await).await;
}

#[tokio::test]
async fn sqlite_dimensions_and_minutes_add_up() {
    let dir = tempfile::tempdir().unwrap();
    dimensions_and_minutes_add_up(&format!("sqlite://{}/s.db", dir.path().display())).await;
}

#[tokio::test]
async fn postgres_dimensions_and_minutes_add_up() {
    dimensions_and_minutes_add_up(&testing::fresh_postgres_url().await).await;
}

#[tokio::test]
async fn sqlite_flush_is_atomic_and_fenced() {
    let dir = tempfile::tempdir().unwrap();
    flush_is_atomic_and_fenced(&format!("sqlite://{}/s.db", dir.path().display())).await;
}

#[tokio::test]
async fn postgres_flush_is_atomic_and_fenced() {
    flush_is_atomic_and_fenced(&testing::fresh_postgres_url().await).await;
}

/// Flushes that run at the same time (two aggregators of one process) each get their
/// own transaction, and a reader (`serve`) never sees a flush half done: every total it
/// reads is a whole number of flushes. With one shared connection the second BEGIN failed
/// ("cannot start a transaction within a transaction") and readers saw partial sums.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_flushes_and_reads_do_not_share_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/s.db", dir.path().display()))
        .await
        .unwrap();
    // 300 countries of 1 visit each per flush: many statements, many await points.
    let codes: Vec<String> = (0..300).map(|i| format!("C{i:03}")).collect();
    let flush_of = |partition: i32, round: i64| {
        let increments: Vec<(&str, u64)> = codes.iter().map(|c| (c.as_str(), 1)).collect();
        let expected = (round > 0).then_some(round);
        batch(&increments, &[(partition, expected, round + 1)])
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, stop) = (store.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let total: u64 = store
                    .country_counts()
                    .await
                    .unwrap()
                    .iter()
                    .map(|c| c.visits)
                    .sum();
                seen.push(total);
                tokio::task::yield_now().await;
            }
            seen
        })
    };
    for round in 0..10 {
        let (a, b) = (store.clone(), store.clone());
        let (fa, fb) = (flush_of(0, round), flush_of(1, round));
        let (ra, rb) = tokio::join!(
            tokio::spawn(async move { a.flush(&fa).await }),
            tokio::spawn(async move { b.flush(&fb).await })
        );
        assert_eq!(ra.unwrap().unwrap(), FlushOutcome::Committed);
        assert_eq!(rb.unwrap().unwrap(), FlushOutcome::Committed);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = reader.await.unwrap();
    assert!(!seen.is_empty());
    for total in seen {
        assert_eq!(total % 300, 0, "a reader saw a flush half done: {total}");
    }
    assert_eq!(
        store
            .country_counts()
            .await
            .unwrap()
            .iter()
            .map(|c| c.visits)
            .sum::<u64>(),
        20 * 300
    );
}

/// A flush waiting for another process's write lock (up to the 5 s busy timeout) does
/// not stall the async worker it was called from: on a single-threaded runtime a timer
/// still fires on time.
#[tokio::test(flavor = "current_thread")]
async fn a_busy_sqlite_database_does_not_block_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    // Another process holds the write lock.
    let other = libsql::Builder::new_local(&path).build().await.unwrap();
    let other = other.connect().unwrap();
    other.execute("BEGIN IMMEDIATE", ()).await.unwrap();
    let flushing = tokio::spawn({
        let store = store.clone();
        async move { store.flush(&batch(&[("NL", 1)], &[(0, None, 1)])).await }
    });
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let late = started.elapsed();
    assert!(
        late < Duration::from_secs(2),
        "a 100 ms timer fired after {late:?}: the flush blocked the runtime"
    );
    other.execute("COMMIT", ()).await.unwrap();
    assert_eq!(flushing.await.unwrap().unwrap(), FlushOutcome::Committed);
}

/// A table of ours created by something else with other column types is a one-line
/// error at open, naming the table and the column (it was a panic at the first read).
async fn foreign_table_is_refused(url: &str, create: &str) {
    let err = Store::open(url).await.err().expect("open must fail");
    let text = err.to_string();
    assert!(
        text.contains(
            "table country_stats exists but its column visit_count is text, pageviews needs bigint"
        ),
        "{text} (after {create})"
    );
    assert!(!text.contains('\n'), "{text}");
}

#[tokio::test]
async fn postgres_refuses_a_table_with_other_column_types() {
    let url = testing::fresh_postgres_url().await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let create = "CREATE TABLE country_stats (country_code TEXT PRIMARY KEY, visit_count TEXT, updated_at TEXT)";
    client.execute(create, &[]).await.unwrap();
    client
        .execute(
            "INSERT INTO country_stats VALUES ('NL', 'many', 'today')",
            &[],
        )
        .await
        .unwrap();
    foreign_table_is_refused(&url, create).await;
}

#[tokio::test]
async fn sqlite_refuses_a_table_with_other_column_types() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let db = libsql::Builder::new_local(&path).build().await.unwrap();
    let create = "CREATE TABLE country_stats (country_code TEXT PRIMARY KEY, visit_count TEXT, updated_at TEXT)";
    db.connect().unwrap().execute(create, ()).await.unwrap();
    foreign_table_is_refused(&format!("sqlite://{}", path.display()), create).await;
}

/// Store errors keep their causes as a `source()` chain (not flattened into a string), so
/// a caller can tell a refused connection from a bad password.
#[tokio::test]
async fn open_errors_keep_their_cause_chain() {
    let err = Store::open("postgres://postgres@127.0.0.1:1/test")
        .await
        .err()
        .unwrap();
    let mut source = std::error::Error::source(&err);
    let mut refused = false;
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = s.source();
    }
    assert!(refused, "no io::Error in the chain of {err:?}");
}

#[test]
fn quarantine_merges_what_it_renames() {
    let dim = |v: &str, visits| DimensionIncrement {
        dimension: "path".into(),
        value: v.into(),
        amount: Amount {
            visits,
            bytes: visits,
            humans: 0,
        },
    };
    let mut b = FlushBatch {
        results: CountsFlush {
            dimensions: vec![
                dim("/ok", 1),
                dim("/\u{1}", 2),
                dim(&"x".repeat(300), 3),
                dim(INVALID, 4),
            ],
            ..CountsFlush::default()
        },
        ..FlushBatch::default()
    };
    assert_eq!(b.quarantine("index row size", false), 2);
    let rows: Vec<(&str, u64)> = b
        .results
        .dimensions
        .iter()
        .map(|d| (d.value.as_str(), d.amount.visits))
        .collect();
    assert_eq!(rows, vec![(INVALID, 9), ("/ok", 1)]);
    assert_eq!(b.data_error.as_deref(), Some("index row size"));
    assert_eq!(b.quarantine("again", true), 1);
    assert_eq!(b.results.dimensions.len(), 1);
    assert_eq!(b.results.dimensions[0].amount.visits, 10);
}

/// `sslmode` with the machine's PostgreSQL, which serves TLS with Debian's self-signed
/// "snakeoil" certificate (issued for `localhost`).
#[tokio::test(flavor = "multi_thread")]
async fn postgres_connections_use_tls_as_sslmode_says() {
    const ROOT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    assert!(
        std::path::Path::new(ROOT).exists(),
        "this test needs PostgreSQL with TLS and its certificate at {ROOT} (Debian's default)"
    );
    let base = testing::fresh_postgres_url().await;
    let with = |extra: &str| format!("{base}&{extra}");
    let tls = |store: &Store| match store {
        Store::Postgres(p) => p.clone(),
        Store::Sqlite(_) => unreachable!(),
    };
    // Encrypted, certificate unchecked (libpq's `require`).
    let store = Store::open(&with("sslmode=require")).await.unwrap();
    assert!(tls(&store).uses_tls().await.unwrap());
    let store = Store::open(&with("sslmode=disable")).await.unwrap();
    assert!(!tls(&store).uses_tls().await.unwrap());
    // The chain against the given root, the name not checked.
    let store = Store::open(&with(&format!("sslmode=verify-ca&sslrootcert={ROOT}")))
        .await
        .unwrap();
    assert!(tls(&store).uses_tls().await.unwrap());
    // Chain and name: the certificate names localhost, not 127.0.0.1.
    let by_name = with(&format!("sslmode=verify-full&sslrootcert={ROOT}")).replacen(
        "@127.0.0.1:",
        "@localhost:",
        1,
    );
    let store = Store::open(&by_name).await.unwrap();
    assert!(tls(&store).uses_tls().await.unwrap());
    let by_address = with(&format!("sslmode=verify-full&sslrootcert={ROOT}"));
    match Store::open(&by_address).await {
        Err(e) => assert!(e.to_string().contains("certificate"), "{e}"),
        Ok(_) => panic!("verify-full accepted a certificate for another name"),
    }
    // Other roots (the public CAs' bundle) do not vouch for the self-signed certificate.
    let public = "/etc/ssl/certs/ca-certificates.crt";
    let others = with(&format!("sslmode=verify-full&sslrootcert={public}")).replacen(
        "@127.0.0.1:",
        "@localhost:",
        1,
    );
    match Store::open(&others).await {
        Err(e) => assert!(e.to_string().contains("certificate"), "{e}"),
        Ok(_) => panic!("verify-full trusted a certificate no given root signed"),
    }
}

#[tokio::test]
async fn unknown_scheme_is_a_clear_error() {
    let err = Store::open("mysql://localhost/x").await.err().unwrap();
    assert_eq!(
        err.to_string(),
        "unsupported database URL \"mysql://localhost/x\": use sqlite://PATH or postgres://USER@HOST:PORT/DB"
    );
}

/// A database counted by a version without the rollups is refused at open with what to do,
/// not served with filters that silently miss its history.
async fn counts_without_rollups_are_refused(url: &str) {
    let store = Store::open(url).await.unwrap();
    let mut old = batch(&[("GB", 3)], &[(0, None, 3)]);
    old.results.dimensions = vec![DimensionIncrement {
        dimension: "path".into(),
        value: "/".into(),
        amount: Amount::visit(10, false),
    }];
    store.flush(&old).await.unwrap();
    let err = Store::open(url).await.err().expect("refused");
    let text = err.to_string();
    assert!(
        text.contains("without per-day rollups")
            && text.contains("count into a new database (--database)"),
        "{text}"
    );
    assert!(!text.contains('\n'), "one line: {text}");
}

#[tokio::test]
async fn sqlite_counts_without_rollups_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    counts_without_rollups_are_refused(&format!("sqlite://{}/s.db", dir.path().display())).await;
}

#[tokio::test]
async fn postgres_counts_without_rollups_are_refused() {
    counts_without_rollups_are_refused(&crate::store::testing::fresh_postgres_url().await).await;
}

/// The rollups keep at most `keep_values` values per (dimension, day or hour, slice), the
/// rest folded into `(other)` with exact sums, whatever the flushes write; a key under the
/// bound keeps every value.
async fn rollup_values_are_bounded_per_key(url: &str) {
    use crate::aggregate::rollups::{Filter, Slice};
    let store = Store::open(url).await.unwrap();
    let crowded = Slice {
        site: "s.example".into(),
        country: "GB".into(),
        bot: false,
    };
    let calm = Slice {
        country: "NL".into(),
        ..crowded.clone()
    };
    let hour = 1_767_225_600; // 2026-01-01T00:00:00Z
    let mut next = None;
    for round in 0..4u64 {
        let mut b = batch(&[], &[(0, next, (round as i64 + 1) * 100)]);
        next = Some((round as i64 + 1) * 100);
        b.results.keep_values = Some(100);
        for i in 0..60 {
            let value = format!("/r{round}-{i}");
            let a = Amount::visit(10, false);
            let r = &mut b.results.rollups;
            let day = "2026-01-01".to_owned();
            r.day_values.insert(
                ("path".into(), day.clone(), crowded.clone(), value.clone()),
                a,
            );
            r.hour_values
                .insert(("path".into(), hour, crowded.clone(), value.clone()), a);
            if round == 0 && i < 50 {
                r.day_values
                    .insert(("path".into(), day, calm.clone(), value), a);
            }
        }
        assert_eq!(store.flush(&b).await.unwrap(), FlushOutcome::Committed);
    }
    let day = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
    let only = |country: &str| Filter {
        from: Some(day),
        to: Some(day),
        country: Some(country.into()),
        ..Filter::default()
    };
    let gb = store
        .filtered_dimension("path", &only("GB"), None, 1000)
        .await
        .unwrap();
    assert!(gb.distinct <= 101, "{} values kept", gb.distinct);
    assert!(gb.values.iter().any(|v| v.value == OTHER));
    assert_eq!(gb.total_visits, 240, "the sum stays exact");
    let by_hour = store
        .filtered_dimension("path", &only("GB"), Some(hour), 1000)
        .await
        .unwrap();
    assert!(
        by_hour.distinct <= 101,
        "{} values kept per hour",
        by_hour.distinct
    );
    assert_eq!(by_hour.total_visits, 240);
    let nl = store
        .filtered_dimension("path", &only("NL"), None, 1000)
        .await
        .unwrap();
    assert_eq!(
        (nl.distinct, nl.total_visits),
        (50, 50),
        "a calm key keeps every value"
    );
}

#[tokio::test]
async fn sqlite_rollup_values_are_bounded_per_key() {
    let dir = tempfile::tempdir().unwrap();
    rollup_values_are_bounded_per_key(&format!("sqlite://{}/s.db", dir.path().display())).await;
}

#[tokio::test]
async fn postgres_rollup_values_are_bounded_per_key() {
    rollup_values_are_bounded_per_key(&crate::store::testing::fresh_postgres_url().await).await;
}
