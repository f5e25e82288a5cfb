//! The dashboard as a person sees it: headless Chromium (Debian's `chromium` and
//! `chromium-driver`, which `.ci/run` installs) driven through ChromeDriver, against the real
//! pipeline (embedded broker, SQLite). It checks the top country, that totals grow without a
//! reload (pushed after each flush), that every panel has rows, that the lag table lists the
//! partitions, that markup in log lines reaches the page as text and runs nothing, and the
//! filters: a click on a country filters every panel, the URL reproduces the view, the
//! comparison with the previous period shows, clearing restores everything; the world map's
//! shapes carry their counts and filter on click; an alert raised while the page is open
//! appears on it. It saves a screenshot (`PAGEVIEWS_SCREENSHOT=path`, else under the target
//! directory). A second test opens a report file (`pageviews report -o report.html`) offline.

mod common;

use std::net::TcpListener as StdListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fantoccini::{Client, ClientBuilder};
use pageviews::generate::LineGenerator;
use pageviews::preprocess::PreprocessStats;
use serde_json::{Value, json};

/// Markup in the three places a log line reaches the page: the path (requests and not-found
/// panels), the referrer's host (referring sites) and a whole unparseable line (dead letters).
const EVIL_PATH: &str = "/<script>window.__pwned=1</script><img/src=x/onerror=window.__pwned=4>";
const EVIL_HOST: &str = "<img src=x onerror=window.__pwned=2>";
const EVIL_LINE: &str = "<script>window.__pwned=3</script>\"><img src=x onerror=window.__pwned=5>";

/// ChromeDriver on a free port, killed on drop.
struct Driver(Child, u16);

impl Drop for Driver {
    /// Kills chromedriver's whole process group: the Chromium it started too, even when the
    /// test failed before closing its session.
    fn drop(&mut self) {
        common::signal(-common::child_pid(&self.0), libc::SIGKILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_driver() -> Driver {
    let port = StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("chromedriver is needed (apt-get install chromium chromium-driver): {e}")
        });
    // Killed and waited for on every path (the panic below drops it).
    let driver = Driver(child, port);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return driver;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("chromedriver did not listen on port {port}");
}

async fn browser(port: u16) -> Client {
    browser_with(port, &[]).await
}

/// A session with more Chromium arguments.
async fn browser_with(port: u16, extra: &[&str]) -> Client {
    let mut args = vec![
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,2600",
    ];
    args.extend_from_slice(extra);
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": args
        }),
    );
    // Plain HTTP: chromedriver listens on loopback.
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session through chromedriver")
}

/// Runs `script` in the page until it returns something truthy, for up to `patience`.
async fn until(client: &Client, script: &str, patience: Duration, what: &str) -> Value {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let v = client.execute(script, vec![]).await.unwrap();
        let truthy =
            !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
        if truthy {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still {v} after {patience:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A `pageviews alert` process, killed on drop.
struct Alerter(Child);

impl Drop for Alerter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A webhook receiver that accepts everything.
async fn webhook() -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(|| async { axum::http::StatusCode::OK }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Visits of `country` in `lines`, as the .mmdb says.
fn expected_top(lines: &[Vec<u8>], country: &str) -> u64 {
    expected_counts(lines.iter().map(Vec::as_slice))
        .get(country)
        .copied()
        .unwrap_or(0)
}

/// `12345` → `12,345`, as the page writes numbers.
fn format_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The number in an element's text (`12,345` → 12345).
fn number(v: &Value) -> u64 {
    v.as_str()
        .unwrap_or("")
        .replace(',', "")
        .parse()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_in_a_real_browser() {
    let c = cluster(4).await;
    let pre = start_preprocessor(&c, Arc::new(PreprocessStats::default()));
    let (agg, _) = start_aggregator(&c, Duration::from_millis(300));
    let (addr, server) = start_server(&c).await;

    // First batch: generated traffic, many requests carrying markup, one line that is markup.
    let mut first: Vec<Vec<u8>> = LineGenerator::new(11)
        .take(10_000)
        .map(String::into_bytes)
        .collect();
    for i in 0..1500 {
        first.push(
            format!(
                "81.2.69.{} - - [01/Jan/2026:00:00:0{} +0000] \"GET {EVIL_PATH} HTTP/1.1\" 404 99 \"https://{EVIL_HOST}/x\" \"<script>window.__pwned=6</script>\"",
                i % 200,
                i % 10
            )
            .into_bytes(),
        );
    }
    first.push(EVIL_LINE.as_bytes().to_vec());
    let good_first = first.len() as u64 - 1;
    let expected = expected_counts(first[..first.len() - 1].iter().map(Vec::as_slice));
    let top_country = expected
        .iter()
        .max_by_key(|(c, n)| (**n, std::cmp::Reverse(*c)))
        .unwrap()
        .0
        .clone();
    assert_eq!(import_file(&c, &first).await, first.len() as u64);
    wait_for(&c, good_first, Duration::from_secs(120)).await;

    let driver = start_driver();
    let client = browser(driver.1).await;
    client.goto(&format!("http://{addr}/")).await.unwrap();
    let total_of = "document.getElementById('total-visits').textContent";
    until(
        &client,
        &format!("return {total_of}.replace(/,/g, '') === '{good_first}'"),
        Duration::from_secs(30),
        "the totals show the first batch",
    )
    .await;
    let first_row = client
        .execute(
            "return document.querySelector('#rows tr').dataset.code",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(first_row, json!(top_country), "the top country comes first");

    // Every panel the aggregator counts has rows (no vhost in Combined logs).
    let panels = until(
        &client,
        "const s = [...document.querySelectorAll('section[data-dimension]')];
         return s.length >= 14 && s.every(p => p.querySelectorAll('tbody tr').length > 0)
           ? s.map(p => p.dataset.dimension).sort() : null",
        Duration::from_secs(10),
        "every dimension panel has rows",
    )
    .await;
    assert_eq!(
        panels,
        json!([
            "browser",
            "continent",
            "country",
            "device",
            "host",
            "hour",
            "not_found",
            "os",
            "path",
            "referrer",
            "static_path",
            "status",
            "status_class",
            "visitor_type"
        ])
    );
    // The pipeline-health tables come from /api/pipeline, which reads the brokers and may
    // answer after the panels: each table gets time to fill.
    for table in ["#rows", "#percentiles", "#flow tbody"] {
        until(
            &client,
            &format!("return document.querySelectorAll('{table} tr').length"),
            Duration::from_secs(30),
            &format!("{table} has rows"),
        )
        .await;
    }
    // The visits panel shows /api/sessions' figures (the visits of this hour are still open)
    // and the time series draws the visits started as a line.
    let open = until(
        &client,
        "return fetch('/api/sessions').then(r => r.json()).then(j =>
           j.open > 0 && document.getElementById('visits-open').textContent.replace(/,/g, '') === String(j.open)
             && document.getElementById('visits-count').textContent === String(j.visits)
             && document.querySelector('#timeseries polyline.sessions') !== null ? j.open : null)",
        Duration::from_secs(30),
        "the visits panel shows the open visits",
    )
    .await;
    assert!(open.as_u64().is_some_and(|n| n > 0), "{open}");
    // The panels over the last 24 hours (all of this input is in one hour): the same rows.
    let all_time = client
        .execute(
            "return [...document.querySelectorAll('section[data-dimension=\"path\"] tbody tr')].map(r => r.dataset.value + '=' + r.querySelector('.visits').textContent)",
            vec![],
        )
        .await
        .unwrap();
    client
        .execute(
            "const s = document.getElementById('panel-range'); s.value = '24'; s.dispatchEvent(new Event('change')); window.__recent = null;
             fetch('/api/dimensions/path?limit=10&hours=24').then(r => r.json()).then(j => window.__recent = j.hours)",
            vec![],
        )
        .await
        .unwrap();
    until(
        &client,
        "return window.__recent === 24 && recent !== null",
        Duration::from_secs(10),
        "the panels switched to the last 24 hours",
    )
    .await;
    let last_day = client
        .execute(
            "return [...document.querySelectorAll('section[data-dimension=\"path\"] tbody tr')].map(r => r.dataset.value + '=' + r.querySelector('.visits').textContent)",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(last_day, all_time);
    client
        .execute(
            "const s = document.getElementById('panel-range'); s.value = 'all'; s.dispatchEvent(new Event('change'));",
            vec![],
        )
        .await
        .unwrap();

    // The lag table lists every partition of both groups.
    let lag_rows = until(
        &client,
        "const r = [...document.querySelectorAll('#lag tbody tr')];
         return r.length === 8 ? r.map(t => t.dataset.group + '/' + t.dataset.partition) : null",
        Duration::from_secs(10),
        "the lag table lists the partitions",
    )
    .await;
    assert_eq!(
        lag_rows,
        json!([
            "preprocessors/0",
            "preprocessors/1",
            "preprocessors/2",
            "preprocessors/3",
            "aggregators/0",
            "aggregators/1",
            "aggregators/2",
            "aggregators/3"
        ])
    );

    // Markup from log lines is text in the DOM and ran nothing.
    let shown = |selector: &str, text: &str| {
        format!(
            "return [...document.querySelectorAll({selector:?})].some(e => e.textContent === {text:?})"
        )
    };
    let evil_path = EVIL_PATH;
    for (selector, text) in [
        ("section[data-dimension=\"path\"] td", evil_path),
        ("section[data-dimension=\"not_found\"] td", evil_path),
        ("section[data-dimension=\"referrer\"] td", EVIL_HOST),
        ("#dead td", EVIL_LINE),
    ] {
        until(
            &client,
            &shown(selector, text),
            Duration::from_secs(10),
            &format!("{text} shown as text in {selector}"),
        )
        .await;
    }
    let ran = client
        .execute(
            "return [typeof window.__pwned, document.querySelectorAll('img').length,
                     document.querySelectorAll('script').length]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        ran,
        json!(["undefined", 0, 2]),
        "injected markup ran or was parsed (the scripts are the page's and the map's data)"
    );

    // The map: the top country's shape carries its count (attribute, and the title that
    // screen readers and hovering show), and hovering writes it under the map.
    let top_visits = expected_top(&first[..first.len() - 1], &top_country);
    let shape = until(
        &client,
        &format!(
            "const p = document.querySelector('#map path[data-code=\"{top_country}\"]');
             return p && p.dataset.visits === '{top_visits}' ? p.querySelector('title').textContent : null"
        ),
        Duration::from_secs(10),
        "the top country's shape carries its count",
    )
    .await;
    let formatted = format_thousands(top_visits);
    assert!(
        shape
            .as_str()
            .unwrap()
            .contains(&format!("({top_country}): {formatted} visits")),
        "{shape}"
    );
    let hovered = client
        .execute(
            &format!(
                "const p = document.querySelector('#map path[data-code=\"{top_country}\"]');
                 p.dispatchEvent(new MouseEvent('mouseenter'));
                 return document.getElementById('map-info').textContent"
            ),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(hovered, shape, "hovering shows the count");
    assert!(
        client
            .execute(
                "return document.querySelectorAll('#map path').length",
                vec![]
            )
            .await
            .unwrap()
            .as_u64()
            .unwrap()
            > 150
    );

    // The alerts panel: an alerter started now raises an alert for the top country's
    // one-minute windows; it appears on the open page, delivered, without a reload.
    client
        .execute("window.__beforeAlerts = true", vec![])
        .await
        .unwrap();
    let hook = webhook().await;
    let rules = c.dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        format!(
            "[[rule]]\nname = \"busy-country\"\nkind = \"country_visits\"\ncountry = \"{top_country}\"\nabove = 1\nwindow = \"1m\"\n"
        ),
    )
    .unwrap();
    let _alerter = Alerter(
        Command::new(bin())
            .args(["alert", "--brokers", &c.broker.bootstrap()])
            .arg("--database")
            .arg(format!("sqlite://{}/stats.db", c.dir.path().display()))
            .arg("--data-dir")
            .arg(c.dir.path())
            .arg("--rules")
            .arg(&rules)
            .args(["--webhook", &format!("http://{hook}/hook")])
            .args([
                "--lateness",
                "5s",
                "--idle-timeout",
                "1s",
                "--alert-interval",
                "300ms",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let alert = until(
        &client,
        "return fetch('/api/alerts').then(r => r.json()).then(j => {
           const a = j.groups.flatMap(g => g.alerts).filter(a => a.delivered);
           const rows = [...document.querySelectorAll('#alerts tbody tr')];
           const row = a.length ? rows.find(r => r.dataset.id === a[0].id) : null;
           return row && row.cells[0].textContent === 'busy-country'
             && row.cells[2].textContent === a[0].subject
             && row.cells[5].textContent.startsWith('yes, ') ? a[0].id : null; })",
        Duration::from_secs(60),
        "a delivered alert is on the page",
    )
    .await;
    assert!(
        alert.as_str().unwrap().starts_with("busy-country/"),
        "{alert}"
    );
    assert_eq!(
        client
            .execute("return window.__beforeAlerts === true", vec![])
            .await
            .unwrap(),
        json!(true),
        "the alert came without a reload"
    );

    // Second batch: the totals grow on the open page, without a reload.
    let before = number(
        &client
            .execute(&format!("return {total_of}"), vec![])
            .await
            .unwrap(),
    );
    client
        .execute("window.__sameDocument = true", vec![])
        .await
        .unwrap();
    let second: Vec<Vec<u8>> = LineGenerator::new(12)
        .take(5_000)
        .map(String::into_bytes)
        .collect();
    assert_eq!(import_file(&c, &second).await, second.len() as u64);
    until(
        &client,
        &format!(
            "return {total_of}.replace(/,/g, '') === '{}'",
            before + 5_000
        ),
        Duration::from_secs(60),
        "the totals grow without a reload",
    )
    .await;
    assert_eq!(
        client
            .execute("return window.__sameDocument === true", vec![])
            .await
            .unwrap(),
        json!(true),
        "the page was not reloaded"
    );

    // Filters: clicking a country row applies it to every panel and puts it in the URL.
    let mut both = expected;
    for (code, n) in expected_counts(second.iter().map(Vec::as_slice)) {
        *both.entry(code).or_insert(0) += n;
    }
    let (code, visits) = both
        .iter()
        .find(|(c, _)| **c != top_country)
        .map(|(c, n)| (c.clone(), *n))
        .unwrap();
    client
        .execute(
            &format!("document.querySelector('#rows tr[data-code=\"{code}\"]').click()"),
            vec![],
        )
        .await
        .unwrap();
    let filtered = format!("return {total_of}.replace(/,/g, '') === '{visits}'");
    until(
        &client,
        &filtered,
        Duration::from_secs(20),
        "the total of the clicked country",
    )
    .await;
    let url = client.current_url().await.unwrap();
    assert_eq!(url.query(), Some(format!("country={code}").as_str()));
    let countries = client
        .execute(
            "return [...document.querySelectorAll('#rows tr')].map(r => r.dataset.code)",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        countries,
        json!([code]),
        "only the clicked country is listed"
    );
    // The URL reproduces the view: a reload opens on the same filter.
    client.goto(url.as_str()).await.unwrap();
    until(
        &client,
        &filtered,
        Duration::from_secs(20),
        "the view after a reload",
    )
    .await;
    assert_eq!(
        client
            .execute("return document.getElementById('f-country').value", vec![])
            .await
            .unwrap(),
        json!(code)
    );
    // Compare with the previous period: all traffic is newer, so every row is new.
    client
        .execute(
            "const c = document.getElementById('f-compare'); c.checked = true; c.dispatchEvent(new Event('change'));",
            vec![],
        )
        .await
        .unwrap();
    until(
        &client,
        "return document.getElementById('visits-change').textContent === 'new'
           && document.querySelector('#rows tr .change').textContent === 'new'",
        Duration::from_secs(20),
        "the comparison is shown",
    )
    .await;
    let url = client.current_url().await.unwrap();
    let query = url.query().unwrap_or("");
    assert!(query.contains("compare=previous") && query.contains(&format!("country={code}")));
    // Clearing the filters shows everything again.
    client
        .execute("document.getElementById('f-clear').click()", vec![])
        .await
        .unwrap();
    until(
        &client,
        &format!(
            "return {total_of}.replace(/,/g, '') === '{}'",
            before + 5_000
        ),
        Duration::from_secs(20),
        "every country after clearing",
    )
    .await;
    // A click on the map applies the country filter too.
    client
        .execute(
            &format!(
                "document.querySelector('#map path[data-code=\"{code}\"]').dispatchEvent(new MouseEvent('click', {{ bubbles: true }}))"
            ),
            vec![],
        )
        .await
        .unwrap();
    until(
        &client,
        &filtered,
        Duration::from_secs(20),
        "the total of the country clicked on the map",
    )
    .await;
    assert_eq!(
        client.current_url().await.unwrap().query(),
        Some(format!("country={code}").as_str())
    );
    client
        .execute("document.getElementById('f-clear').click()", vec![])
        .await
        .unwrap();
    until(
        &client,
        &format!(
            "return {total_of}.replace(/,/g, '') === '{}'",
            before + 5_000
        ),
        Duration::from_secs(20),
        "every country after clearing the map's filter",
    )
    .await;

    let png = client.screenshot().await.unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let path = std::env::var("PAGEVIEWS_SCREENSHOT")
        .unwrap_or_else(|_| format!("{}/dashboard.png", env!("CARGO_TARGET_TMPDIR")));
    std::fs::write(&path, &png).unwrap();
    println!("screenshot: {path}");

    client.close().await.unwrap();
    drop(driver);
    server.stop().await;
    pre.stop().await;
    agg.stop().await;
}

/// `pageviews report -o report.html` opened from disk in Chromium with no network (every
/// request goes to a proxy that is not there, loopback included): it shows the totals, the
/// countries and the map the API serves from the same database, hostile values as text, and
/// it loads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_file_opens_offline_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("access.log");
    let mut lines: Vec<Vec<u8>> = LineGenerator::new(21)
        .take(3_000)
        .map(String::into_bytes)
        .collect();
    for i in 0..300 {
        lines.push(
            format!(
                "81.2.69.{} - - [01/Jan/2026:00:00:0{} +0000] \"GET {EVIL_PATH} HTTP/1.1\" 404 99 \"https://{EVIL_HOST}/x\" \"</script><script>window.__pwned=7</script>\"",
                i % 200,
                i % 10
            )
            .into_bytes(),
        );
    }
    write_lines(&log, &lines);
    let html = dir.path().join("report.html");
    let mut cmd = command(&bin(), &data);
    cmd.args(["report", "--input"])
        .arg(&log)
        .arg("-o")
        .arg(&html);
    let out = run_within(cmd, Duration::from_secs(180));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The API over the same database.
    let store = pageviews::store::Store::open(&format!("sqlite://{}/pageviews.db", data.display()))
        .await
        .unwrap();
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
    let (_, _, body) = tokio::task::spawn_blocking(move || http_get(addr, "/api/dashboard"))
        .await
        .unwrap();
    let api: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(api["totals"]["visits"], json!(lines.len()));
    let top = api["countries"][0].clone();

    let driver = start_driver();
    let client = browser_with(
        driver.1,
        &[
            "--proxy-server=http://127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
        ],
    )
    .await;
    client
        .goto(&format!("file://{}", html.display()))
        .await
        .unwrap();
    let visits = format_thousands(api["totals"]["visits"].as_u64().unwrap());
    until(
        &client,
        &format!("return document.getElementById('total-visits').textContent === '{visits}'"),
        Duration::from_secs(20),
        "the report's total is the API's",
    )
    .await;
    let shown = client
        .execute(
            &format!(
                "const p = document.querySelector('#map path[data-code=\"{}\"]');
                 return [document.querySelectorAll('#rows tr').length,
                         document.querySelector('#rows tr').dataset.code,
                         p ? p.dataset.visits : null,
                         document.getElementById('status').textContent.startsWith('report of '),
                         getComputedStyle(document.getElementById('pipeline-panel')).display,
                         [...document.querySelectorAll('section[data-dimension=\"path\"] td')].some(e => e.textContent === {EVIL_PATH:?}),
                         [...document.querySelectorAll('section[data-dimension=\"browser\"] td')].length > 0]",
                top["country_code"].as_str().unwrap()
            ),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        shown,
        json!([
            api["countries"].as_array().unwrap().len(),
            top["country_code"],
            top["visits"].as_u64().unwrap().to_string(),
            true,
            "none",
            true,
            true
        ])
    );
    let ran = client
        .execute(
            "return [typeof window.__pwned, document.querySelectorAll('img').length,
                     document.querySelectorAll('script').length,
                     performance.getEntriesByType('resource').length]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        ran,
        json!(["undefined", 0, 3, 0]),
        "markup from the log ran, or the report loaded something"
    );
    client.close().await.unwrap();
    drop(driver);
    stop.cancel();
    let _ = server.await;
}
