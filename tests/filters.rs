//! Filters against an oracle: real-looking traffic on three sites, five days and many
//! countries goes through the real pipeline (embedded broker, preprocessor, aggregator) into
//! SQLite or PostgreSQL; for a grid of filters every panel's numbers equal those computed here
//! from the line text and the `.mmdb` (exact for counts, within the stated error for unique
//! visitors and percentiles).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use chrono::NaiveDate;
use common::*;
use pageviews::preprocess::geo::BUNDLED_DB;
use pageviews::serve::api::{
    CountriesResponse, Dashboard, DimensionResponse, HistogramResponse, TimeseriesResponse,
    UniquesResponse,
};
use pageviews::store::Store;

const SITES: [&str; 3] = ["shop.example", "blog.example", "docs.example"];
const DAYS: i64 = 5;

fn first_day() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 3, 1).unwrap()
}

/// One line as the oracle sees it.
#[derive(Debug, Clone)]
struct Line {
    text: Vec<u8>,
    site: &'static str,
    day: NaiveDate,
    /// Seconds since the epoch, start of the minute.
    minute: i64,
    country: String,
    bot: bool,
    path: String,
    status: u16,
    browser: String,
    bytes: u64,
    /// (address, User-Agent): with the day, a unique visitor.
    visitor: (String, String),
}

/// `pageviews generate` lines spread over three sites (vhost_combined) and five days.
fn traffic(n: u64) -> Vec<Line> {
    #[derive(serde::Deserialize)]
    struct Rec {
        country_code: Option<String>,
    }
    let reader = maxminddb::Reader::from_source(BUNDLED_DB).unwrap();
    let ua = pageviews::preprocess::useragent::UaParser::new(1 << 20);
    generated_by_binary(n, 11)
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let text = std::str::from_utf8(l).unwrap();
            let open = text.find('[').unwrap();
            let close = text.find(']').unwrap();
            // Spread over the days and their hours and minutes.
            let second = (i as u64 * 7919) % 86_400;
            let clock = &format!(
                "{:02}:{:02}:{:02}",
                second / 3600,
                second / 60 % 60,
                second % 60
            );
            let day = first_day() + chrono::Duration::days((i as i64 * 7) % DAYS);
            let stamp = format!("{}:{clock} +0000", day.format("%d/%b/%Y"));
            let site = SITES[(i * 5 / 3) % SITES.len()];
            let line = format!(
                "{site}:443 {}[{stamp}]{}",
                &text[..open],
                &text[close + 1..]
            );
            let quoted: Vec<&str> = text.split('"').collect();
            let ip = text.split(' ').next().unwrap().to_owned();
            let path = quoted[1].split(' ').nth(1).unwrap();
            let mut tail = quoted[2].split_whitespace();
            let status: u16 = tail.next().unwrap().parse().unwrap();
            let bytes: u64 = tail.next().unwrap().parse().unwrap();
            let client = ua.classify(Some(quoted[5]));
            let major = client.browser_version.split('.').next().unwrap_or("");
            let browser = if major.is_empty() {
                client.browser.clone()
            } else {
                format!("{} {major}", client.browser)
            };
            let country = ip
                .parse::<IpAddr>()
                .ok()
                .and_then(|ip| reader.lookup::<Rec>(ip).ok().flatten())
                .and_then(|r| r.country_code)
                .unwrap_or_else(|| "ZZ".to_owned());
            let time = chrono::NaiveTime::parse_from_str(clock, "%H:%M:%S").unwrap();
            let minute = day.and_time(time).and_utc().timestamp();
            Line {
                text: line.into_bytes(),
                site,
                day,
                minute: minute - minute.rem_euclid(60),
                country,
                bot: client.is_bot,
                path: path.split('?').next().unwrap().to_owned(),
                status,
                browser,
                bytes,
                visitor: (ip, quoted[5].to_owned()),
            }
        })
        .collect()
}

/// A filter as the test applies it, and as a query string.
#[derive(Debug, Clone, Default)]
struct F {
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
    site: Option<&'static str>,
    country: Option<String>,
    /// `Some(true)`: bots only; `Some(false)`: humans only.
    bots: Option<bool>,
}

impl F {
    fn keeps(&self, l: &Line) -> bool {
        self.from.is_none_or(|d| l.day >= d)
            && self.to.is_none_or(|d| l.day <= d)
            && self.site.is_none_or(|s| l.site == s)
            && self.country.as_ref().is_none_or(|c| &l.country == c)
            && self.bots.is_none_or(|b| l.bot == b)
    }

    fn query(&self) -> String {
        let mut q = Vec::new();
        if let Some(d) = self.from {
            q.push(format!("from={d}"));
        }
        if let Some(d) = self.to {
            q.push(format!("to={d}"));
        }
        if let Some(s) = self.site {
            q.push(format!("site={s}"));
        }
        if let Some(c) = &self.country {
            q.push(format!("country={c}"));
        }
        match self.bots {
            Some(true) => q.push("visitors=bots".into()),
            Some(false) => q.push("visitors=humans".into()),
            None => {}
        }
        q.join("&")
    }
}

fn get<T: serde::de::DeserializeOwned>(addr: SocketAddr, path: &str) -> T {
    let (status, _, body) = http_get(addr, path);
    assert!(
        status.contains("200"),
        "{path}: {status}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn count_by<K: Ord>(lines: &[&Line], key: impl Fn(&Line) -> K) -> BTreeMap<K, u64> {
    let mut out = BTreeMap::new();
    for l in lines {
        *out.entry(key(l)).or_insert(0) += 1;
    }
    out
}

/// Every panel under `f` against the oracle.
fn check(addr: SocketAddr, all: &[Line], f: &F) {
    let lines: Vec<&Line> = all.iter().filter(|l| f.keeps(l)).collect();
    let q = f.query();
    let ctx = format!("filter {q:?}");
    assert!(!lines.is_empty(), "{ctx}: the grid asks for traffic it has");

    // Countries.
    let countries: CountriesResponse = get(addr, &format!("/api/countries?{q}"));
    let got: BTreeMap<String, u64> = countries
        .countries
        .iter()
        .map(|c| (c.country_code.clone(), c.visits))
        .collect();
    assert_eq!(
        got,
        count_by(&lines, |l| l.country.clone()),
        "{ctx}: countries"
    );
    assert_eq!(countries.total, lines.len() as u64, "{ctx}: total");

    // Dimensions, every value.
    type Key = fn(&Line) -> String;
    let dims: [(&str, Key); 6] = [
        ("path", |l| l.path.clone()),
        ("status", |l| l.status.to_string()),
        ("browser", |l| l.browser.clone()),
        ("vhost", |l| l.site.to_owned()),
        ("country", |l| l.country.clone()),
        ("visitor_type", |l| {
            if l.bot { "bot" } else { "human" }.to_owned()
        }),
    ];
    for (name, key) in dims {
        let d: DimensionResponse = get(addr, &format!("/api/dimensions/{name}?limit=1000&{q}"));
        let got: BTreeMap<String, u64> = d
            .values
            .iter()
            .map(|v| (v.value.clone(), v.visits))
            .collect();
        assert_eq!(got, count_by(&lines, key), "{ctx}: dimension {name}");
        assert_eq!(d.total_visits, lines.len() as u64, "{ctx}: {name} total");
        let humans = lines.iter().filter(|l| !l.bot).count() as u64;
        assert_eq!(d.total_humans, humans, "{ctx}: {name} humans");
        let bytes: u64 = lines.iter().map(|l| l.bytes).sum();
        assert_eq!(d.total_bytes, bytes, "{ctx}: {name} bytes");
    }

    // The time series: per day over a range of days, per minute over one day.
    let t: TimeseriesResponse = get(addr, &format!("/api/timeseries?minutes=all&{q}"));
    let got: BTreeMap<i64, u64> = t
        .points
        .iter()
        .filter(|p| p.visits > 0)
        .map(|p| {
            let s = chrono::DateTime::parse_from_rfc3339(&p.time)
                .unwrap()
                .timestamp();
            (s, p.visits)
        })
        .collect();
    // Without days, the range is every day counted.
    let (a, b) = (
        f.from.unwrap_or(first_day()),
        f.to.unwrap_or(first_day() + chrono::Duration::days(DAYS - 1)),
    );
    let span = (b - a).num_days() + 1;
    let step = if span == 1 {
        60
    } else if span <= 7 {
        3600
    } else {
        86_400
    };
    let want = count_by(&lines, |l| l.minute - l.minute.rem_euclid(step));
    assert_eq!(got, want, "{ctx}: time series per {step} s");
    assert_eq!(
        t.points.len() as i64,
        span * 86_400 / step,
        "{ctx}: points, zeros included"
    );

    // Unique visitors: per day and over the range, within three standard errors.
    let u: UniquesResponse = get(addr, &format!("/api/uniques?days=100&{q}"));
    let mut exact: BTreeMap<String, HashSet<(String, String)>> = BTreeMap::new();
    for l in &lines {
        exact
            .entry(l.day.to_string())
            .or_default()
            .insert(l.visitor.clone());
    }
    let within = |got: u64, exact: usize, what: &str| {
        let bound = 3.0 * u.standard_error * exact as f64 + 1.0;
        assert!(
            (got as f64 - exact as f64).abs() <= bound,
            "{ctx}: {what}: {got} vs exactly {exact}"
        );
    };
    assert_eq!(u.days.len(), exact.len(), "{ctx}: days with visitors");
    for d in &u.days {
        within(
            d.visitors,
            exact[&d.day].len(),
            &format!("visitors on {}", d.day),
        );
    }
    // A visitor is (address, day, User-Agent): over several days the union counts each
    // day's visitors once.
    let distinct: usize = exact.values().map(HashSet::len).sum();
    within(u.distinct, distinct, "distinct visitors");

    // Histograms: visits exact, the median within a bucket's error.
    let h: HistogramResponse = get(addr, &format!("/api/histograms/bytes?{q}"));
    assert_eq!(h.visits, lines.len() as u64, "{ctx}: histogram visits");
    let mut sizes: Vec<u64> = lines.iter().map(|l| l.bytes).collect();
    sizes.sort_unstable();
    let median = sizes[(sizes.len() - 1) / 2];
    let p50 = h.p50.unwrap();
    assert!(
        p50.abs_diff(median) as f64 <= median as f64 / 16.0 + 1.0,
        "{ctx}: p50 {p50} vs median {median}"
    );

    // The dashboard: totals and the countries table.
    let d: Dashboard = get(addr, &format!("/api/dashboard?{q}"));
    assert_eq!(
        d.totals.visits,
        lines.len() as u64,
        "{ctx}: dashboard visits"
    );
    assert_eq!(
        d.totals.humans,
        lines.iter().filter(|l| !l.bot).count() as u64,
        "{ctx}: dashboard humans"
    );
    let got: BTreeMap<String, u64> = d
        .countries
        .iter()
        .map(|c| (c.country_code.clone(), c.visits))
        .collect();
    assert_eq!(
        got,
        count_by(&lines, |l| l.country.clone()),
        "{ctx}: dashboard countries"
    );
    assert_eq!(
        d.last_day,
        Some((first_day() + chrono::Duration::days(DAYS - 1)).to_string())
    );
    assert_eq!(d.first_day, Some(first_day().to_string()));
    // The site menu lists every site counted, whatever the filter.
    let mut sites = d.sites.clone();
    sites.sort();
    let mut all_sites = SITES.map(str::to_owned).to_vec();
    all_sites.sort();
    assert_eq!(sites, all_sites, "{ctx}: sites");
}

async fn oracle(store: Option<Store>) {
    let lines = traffic(6000);
    let mut c = cluster(3).await;
    if let Some(store) = store {
        c.store = store;
    }
    let texts: Vec<Vec<u8>> = lines.iter().map(|l| l.text.clone()).collect();
    assert_eq!(import_file(&c, &texts).await, lines.len() as u64);
    let pre = start_preprocessor(&c, Default::default());
    let (agg, _) = start_aggregator(&c, Duration::from_millis(500));
    wait_for(&c, lines.len() as u64, Duration::from_secs(120)).await;
    let (addr, server) = start_server(&c).await;

    let day = |i: i64| Some(first_day() + chrono::Duration::days(i));
    // The country with the most visits, and one with few.
    let by_country = count_by(&lines.iter().collect::<Vec<_>>(), |l| l.country.clone());
    let mut ranked: Vec<(&String, &u64)> = by_country.iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let top = ranked[0].0.clone();
    let second = ranked[1].0.clone();
    let grid = [
        F::default(),
        F {
            from: day(1),
            to: day(1),
            ..F::default()
        },
        F {
            from: day(1),
            to: day(3),
            ..F::default()
        },
        F {
            from: day(3),
            ..F::default()
        },
        F {
            site: Some("shop.example"),
            ..F::default()
        },
        F {
            country: Some(top.clone()),
            ..F::default()
        },
        F {
            bots: Some(false),
            ..F::default()
        },
        F {
            bots: Some(true),
            ..F::default()
        },
        F {
            site: Some("blog.example"),
            country: Some(second.clone()),
            ..F::default()
        },
        F {
            from: day(0),
            to: day(3),
            site: Some("docs.example"),
            country: Some(top.clone()),
            bots: Some(false),
        },
    ];
    for f in &grid {
        check(addr, &lines, f);
    }

    // A filter with no traffic answers zeros, not an error.
    let none: CountriesResponse = get(addr, "/api/countries?site=nowhere.example");
    assert_eq!((none.total, none.countries.len()), (0, 0));
    // Bad filters are 400 with the reason.
    for (q, reason) in [
        ("from=2026-13-01", "from must be a day YYYY-MM-DD"),
        ("from=2026-03-04&to=2026-03-01", "is after to"),
        ("visitors=robots", "visitors must be humans, bots or all"),
        ("country=Germany", "country must be a two-letter code"),
    ] {
        let (status, _, body) = http_get(addr, &format!("/api/dashboard?{q}"));
        assert!(status.contains("400"), "{q}: {status}");
        assert!(String::from_utf8_lossy(&body).contains(reason), "{q}");
    }

    // The live channel pushes the filtered snapshot.
    let shop = F {
        site: Some("shop.example"),
        ..F::default()
    };
    let (_, data) = sse_first_update(addr, &format!("/api/events?{}", shop.query()));
    let pushed: Dashboard = serde_json::from_str(&data).unwrap();
    let expected = lines.iter().filter(|l| shop.keeps(l)).count() as u64;
    assert_eq!(pushed.totals.visits, expected);

    server.stop().await;
    agg.stop().await;
    pre.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_panel_filtered_matches_the_oracle_on_sqlite() {
    oracle(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_panel_filtered_matches_the_oracle_on_postgres() {
    let url = pageviews::store::testing::fresh_postgres_url().await;
    oracle(Some(Store::open(&url).await.unwrap())).await;
}

/// `format=csv` through the real server: hostile values (commas, quotes, line breaks,
/// formula-leading characters) come back as the same text, formulas neutralised with a
/// leading `'`, for the all-time table and for a filter; the numbers equal the JSON's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_round_trips_hostile_values() {
    use pageviews::aggregate::rollups::Slice;
    use pageviews::aggregate::tables::{Amount, CountsFlush, DimensionIncrement};
    use pageviews::serve::csv;
    use pageviews::store::{FlushBatch, OffsetUpdate};

    let hostile = [
        "/a,b",
        "/say \"hi\"",
        "=HYPERLINK(\"http://evil.example\",\"x\")",
        "+1",
        "-2",
        "@SUM(A1)",
        "/multi\nline",
        "/plain",
    ];
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/s.db", dir.path().display()))
        .await
        .unwrap();
    let slice = Slice {
        site: "s.example".into(),
        country: "GB".into(),
        bot: false,
    };
    let mut results = CountsFlush::default();
    let mut total = 0;
    for (i, v) in hostile.iter().enumerate() {
        let visits = 10 + i as u64;
        total += visits;
        let amount = Amount {
            visits,
            bytes: 100,
            humans: visits,
        };
        results.dimensions.push(DimensionIncrement {
            dimension: "path".into(),
            value: (*v).to_owned(),
            amount,
        });
        results.rollups.day_values.insert(
            (
                "path".into(),
                "2026-03-01".into(),
                slice.clone(),
                (*v).to_owned(),
            ),
            amount,
        );
    }
    results.increments = vec![("GB".into(), total)];
    results.rollups.days.insert(
        ("2026-03-01".into(), slice.clone()),
        Amount {
            visits: total,
            bytes: 800,
            humans: total,
        },
    );
    let batch = FlushBatch {
        consumer_group: "aggregators".into(),
        topic: "page-views".into(),
        results,
        offsets: vec![OffsetUpdate {
            partition: 0,
            expected: None,
            next: 8,
        }],
        ..FlushBatch::default()
    };
    store.flush(&batch).await.unwrap();
    let listener = pageviews::serve::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(pageviews::serve::run(
        listener,
        store,
        None,
        pageviews::serve::ServeConfig::default(),
        stop.clone(),
    ));
    for query in ["", "&site=s.example&from=2026-03-01&to=2026-03-01"] {
        let path = format!("/api/dimensions/path?limit=100&format=csv{query}");
        let (status, headers, body) = tokio::task::spawn_blocking(move || http_get(addr, &path))
            .await
            .unwrap();
        assert!(status.contains("200"), "{status}");
        assert!(headers.contains("content-type: text/csv"), "{headers}");
        let rows = csv::parse(&String::from_utf8(body).unwrap());
        assert_eq!(
            rows[0],
            ["value", "visits", "bytes", "humans", "previous", "change"]
        );
        let mut got: Vec<(String, String)> = rows[1..]
            .iter()
            .map(|r| (r[0].clone(), r[1].clone()))
            .collect();
        got.sort();
        let mut want: Vec<(String, String)> = hostile
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let shown = match v.as_bytes()[0] {
                    b'=' | b'+' | b'-' | b'@' => format!("'{v}"),
                    _ => (*v).to_owned(),
                };
                (shown, (10 + i).to_string())
            })
            .collect();
        want.sort();
        assert_eq!(got, want, "query {query:?}");
    }
    stop.cancel();
    server.await.unwrap().unwrap();
}
