//! The talk's alerting example, end to end: two alerting groups (webhook, e-mail) as real
//! `pageviews alert` processes against the embedded broker and SQLite, a local webhook
//! receiver (HTTP on 127.0.0.1) and a local SMTP receiver (an in-test SMTP listener).
//!
//! A 40-minute stream (event time) with a 5xx burst, a traffic spike and a country surge.
//! The webhook answers 503 for the first part: the e-mail alerts arrive meanwhile. The webhook
//! alerter is killed with SIGKILL while it fails, started again, and the webhook recovers:
//! every alert it missed arrives. Both sinks end with exactly the ids computed here from the
//! input, each once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use common::*;
use pageviews::generate::LineGenerator;
use pageviews::preprocess::PreprocessStats;
use pageviews::preprocess::geo::BUNDLED_DB;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const LATENESS_S: i64 = 30;
const RULES: &str = r#"
[[rule]]
name = "server-errors"
kind = "error_share"
above = 0.2
min_requests = 50
window = "1m"

[[rule]]
name = "traffic-spike"
kind = "spike"
factor = 3.0
baseline = 10
window = "1m"

[[rule]]
name = "country-visits"
kind = "country_visits"
country = "CN"
above = 250
window = "1m"
"#;

/// The webhook receiver: answers 503 until `healthy`, then 200, and records what it got.
#[derive(Default)]
struct Webhook {
    healthy: AtomicBool,
    refused: AtomicU64,
    /// Ids of the alerts accepted, in order, and their bodies.
    accepted: Mutex<Vec<(String, serde_json::Value)>>,
}

async fn webhook_receiver() -> (SocketAddr, Arc<Webhook>) {
    use axum::extract::State;
    use axum::http::StatusCode;
    let state = Arc::new(Webhook::default());
    async fn hook(State(s): State<Arc<Webhook>>, body: String) -> StatusCode {
        if !s.healthy.load(Ordering::SeqCst) {
            s.refused.fetch_add(1, Ordering::SeqCst);
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&body) else {
            return StatusCode::BAD_REQUEST;
        };
        let id = json["alert"]["id"].as_str().unwrap_or_default().to_owned();
        s.accepted.lock().unwrap().push((id, json));
        StatusCode::OK
    }
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, state)
}

/// One e-mail as the SMTP receiver got it.
#[derive(Debug, Clone)]
struct Mail {
    alert_id: Option<String>,
    subject: Option<String>,
    from: String,
    to: Vec<String>,
}

/// A minimal SMTP server (RFC 5321's commands as lettre sends them, no TLS, no auth).
async fn smtp_receiver() -> (SocketAddr, Arc<Mutex<Vec<Mail>>>) {
    let mails = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store = Arc::clone(&mails);
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 test ESMTP\r\n").await;
                let (mut from, mut to) = (String::new(), Vec::new());
                while let Ok(Some(line)) = lines.next_line().await {
                    let upper = line.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                        b"250 test\r\n"
                    } else if upper.starts_with("MAIL FROM:") {
                        from = line[10..].trim().to_owned();
                        b"250 OK\r\n"
                    } else if upper.starts_with("RCPT TO:") {
                        to.push(line[8..].trim().to_owned());
                        b"250 OK\r\n"
                    } else if upper == "DATA" {
                        let _ = write.write_all(b"354 end with .\r\n").await;
                        let (mut headers, mut in_headers) = (Vec::<String>::new(), true);
                        while let Ok(Some(l)) = lines.next_line().await {
                            if l == "." {
                                break;
                            }
                            if l.is_empty() {
                                in_headers = false;
                            } else if in_headers {
                                match headers.last_mut() {
                                    // A folded header continues on lines that start with space.
                                    Some(last) if l.starts_with([' ', '\t']) => last.push_str(&l),
                                    _ => headers.push(l),
                                }
                            }
                        }
                        let header = |name: &str| {
                            headers.iter().find_map(|h| {
                                let (k, v) = h.split_once(':')?;
                                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                            })
                        };
                        store.lock().unwrap().push(Mail {
                            alert_id: header("X-Pageviews-Alert-Id"),
                            subject: header("Subject"),
                            from: std::mem::take(&mut from),
                            to: std::mem::take(&mut to),
                        });
                        b"250 OK queued\r\n"
                    } else if upper == "QUIT" {
                        let _ = write.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 OK\r\n"
                    };
                    if write.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, mails)
}

/// A `pageviews alert` process; its log goes to `log`.
fn alerter(c: &Cluster, sink: &[String], log: &Path) -> Child {
    let rules = c.dir.path().join("rules.toml");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(common::bin())
        .arg("alert")
        .arg("--brokers")
        .arg(c.broker.bootstrap())
        .arg("--database")
        .arg(format!("sqlite://{}/stats.db", c.dir.path().display()))
        .arg("--data-dir")
        .arg(c.dir.path())
        .arg("--rules")
        .arg(&rules)
        .args([
            "--lateness",
            "30s",
            "--idle-timeout",
            "1s",
            "--alert-interval",
            "500ms",
        ])
        .args([
            "-X",
            "session.timeout.ms=6000",
            "-X",
            "heartbeat.interval.ms=500",
        ])
        .args(sink)
        .env("RUST_LOG", "warn,pageviews=info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// The scenario's lines, in time order: 200 visits a minute for 40 minutes from 10:00 UTC,
/// 150 more answered 503 in minute 8, 700 more in minute 15, 300 more from `cn_ip` in
/// minute 27.
fn scenario(cn_ip: &str) -> Vec<(DateTime<Utc>, String)> {
    let start = DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let mut generator = LineGenerator::new(11);
    let mut lines = Vec::new();
    let mut add = |minute: i64, n: i64, edit: &dyn Fn(String) -> String| {
        for i in 0..n {
            let t = start + TimeDelta::minutes(minute) + TimeDelta::milliseconds(i * 60_000 / n);
            let line = generator.next_line();
            // Re-stamp the generated line with this time.
            let (head, rest) = line.split_once(" [").unwrap();
            let (_, tail) = rest.split_once("] ").unwrap();
            let stamped = format!("{head} [{}] {tail}", t.format("%d/%b/%Y:%H:%M:%S +0000"));
            lines.push((t, edit(stamped)));
        }
    };
    let keep = |l: String| l;
    let status_503 = |l: String| {
        let (head, rest) = l.split_once("HTTP/1.1\" ").unwrap();
        format!("{head}HTTP/1.1\" 503{}", &rest[3..])
    };
    let from_cn = |l: String| {
        let (_, rest) = l.split_once(' ').unwrap();
        format!("{cn_ip} {rest}")
    };
    for m in 0..40 {
        add(m, 200, &keep);
    }
    add(8, 150, &status_503);
    add(15, 700, &keep);
    add(27, 300, &from_cn);
    lines.sort_by_key(|(t, _)| *t);
    lines
}

/// The alert ids the rules must yield for `lines`, computed here from the line text (time,
/// status, country through the `.mmdb`): windows that end at or before the last event time
/// minus the lateness.
fn expected_ids(lines: &[&str]) -> BTreeSet<String> {
    #[derive(serde::Deserialize)]
    struct Rec {
        country_code: Option<String>,
    }
    let reader = maxminddb::Reader::from_source(BUNDLED_DB).unwrap();
    #[derive(Default)]
    struct Minute {
        requests: u64,
        errors: u64,
        cn: u64,
    }
    let mut minutes: BTreeMap<i64, Minute> = BTreeMap::new();
    let mut newest = i64::MIN;
    for line in lines {
        let ip: IpAddr = line.split(' ').next().unwrap().parse().unwrap();
        let stamp = &line[line.find('[').unwrap() + 1..line.find(']').unwrap()];
        let t = DateTime::parse_from_str(stamp, "%d/%b/%Y:%H:%M:%S %z")
            .unwrap()
            .timestamp();
        let status: u16 = line.split("HTTP/1.1\" ").nth(1).unwrap()[..3]
            .parse()
            .unwrap();
        let country = reader
            .lookup::<Rec>(ip)
            .ok()
            .flatten()
            .and_then(|r| r.country_code);
        let m = minutes.entry(t - t.rem_euclid(60)).or_default();
        m.requests += 1;
        m.errors += u64::from(status >= 500);
        m.cn += u64::from(country.as_deref() == Some("CN"));
        newest = newest.max(t);
    }
    let watermark = newest - LATENESS_S;
    let first = *minutes.keys().next().unwrap();
    let stamp = |t: i64| {
        DateTime::from_timestamp(t, 0)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let mut ids = BTreeSet::new();
    for (&start, m) in &minutes {
        if start + 60 > watermark {
            continue;
        }
        if m.requests >= 50 && m.errors as f64 / m.requests as f64 > 0.2 {
            ids.insert(format!("server-errors/{}", stamp(start)));
        }
        if start - 600 >= first {
            let before: u64 = (1..=10)
                .map(|k| minutes.get(&(start - 60 * k)).map_or(0, |p| p.requests))
                .sum();
            let mean = before as f64 / 10.0;
            if mean > 0.0 && m.requests as f64 > 3.0 * mean {
                ids.insert(format!("traffic-spike/{}", stamp(start)));
            }
        }
        if m.cn > 250 {
            ids.insert(format!("country-visits/{}/CN", stamp(start)));
        }
    }
    ids
}

/// An address the bundled database places in China.
fn chinese_ip() -> String {
    #[derive(serde::Deserialize)]
    struct Rec {
        country_code: Option<String>,
    }
    let reader = maxminddb::Reader::from_source(BUNDLED_DB).unwrap();
    [
        "1.0.1.1",
        "36.110.1.1",
        "101.4.1.1",
        "114.114.114.114",
        "223.5.5.5",
    ]
    .into_iter()
    .find(|ip| {
        reader
            .lookup::<Rec>(ip.parse().unwrap())
            .ok()
            .flatten()
            .and_then(|r| r.country_code)
            .as_deref()
            == Some("CN")
    })
    .expect("one of the candidates is in CN")
    .to_owned()
}

/// Waits until `got()` holds every id of `want`; panics with `what` and the logs otherwise.
async fn wait_for_ids(
    what: &str,
    want: &BTreeSet<String>,
    got: impl Fn() -> Vec<String>,
    patience: Duration,
    logs: &[&Path],
) {
    let deadline = Instant::now() + patience;
    loop {
        let have: BTreeSet<String> = got().into_iter().collect();
        if want.is_subset(&have) {
            return;
        }
        if Instant::now() > deadline {
            for log in logs {
                eprintln!(
                    "--- {}\n{}",
                    log.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            panic!(
                "{what}: still missing {:?} (have {have:?})",
                want.difference(&have)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn stop(mut child: Child) {
    common::terminate(&child);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "alerter exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "alerter did not stop within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_sink_gets_every_alert_once_through_an_outage_and_a_kill() {
    // Raw topic with ONE partition: the stream reaches every events partition in time order,
    // as live traffic does (see the README on archives); events topic with four.
    let c = cluster_with(1, 4).await;
    std::fs::write(c.dir.path().join("rules.toml"), RULES).unwrap();
    let lines = scenario(&chinese_ip());
    let split = DateTime::parse_from_rfc3339("2026-03-01T10:20:00Z").unwrap();
    let (first, second): (Vec<_>, Vec<_>) = lines.iter().partition(|(t, _)| *t < split);
    let text = |ls: &[&(DateTime<Utc>, String)]| -> Vec<String> {
        ls.iter().map(|(_, l)| l.clone()).collect()
    };
    let (first, second) = (text(&first), text(&second));
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    let want_first = expected_ids(&first.iter().map(String::as_str).collect::<Vec<_>>());
    let want_all = expected_ids(&all.iter().map(String::as_str).collect::<Vec<_>>());
    // The scenario exercises every kind, before and after the kill.
    assert_eq!(
        want_all,
        BTreeSet::from([
            "server-errors/2026-03-01T10:08:00Z".to_owned(),
            "traffic-spike/2026-03-01T10:15:00Z".to_owned(),
            "country-visits/2026-03-01T10:27:00Z/CN".to_owned(),
        ]),
        "the injected anomalies, and nothing else, alert"
    );
    assert_eq!(want_first.len(), 2);

    let (hook_addr, hook) = webhook_receiver().await;
    let (smtp_addr, mails) = smtp_receiver().await;
    let hook_log = c.dir.path().join("alert-webhook.log");
    let mail_log = c.dir.path().join("alert-email.log");
    let webhook_args = vec!["--webhook".to_owned(), format!("http://{hook_addr}/hook")];
    let email_args = vec![
        "--smtp".to_owned(),
        format!("smtp://{smtp_addr}"),
        "--from".to_owned(),
        "pageviews@example.com".to_owned(),
        "--to".to_owned(),
        "ops@example.com".to_owned(),
    ];
    let email = alerter(&c, &email_args, &mail_log);
    let webhook = alerter(&c, &webhook_args, &hook_log);
    let logs = [hook_log.as_path(), mail_log.as_path()];
    let pre = start_preprocessor(&c, Arc::new(PreprocessStats::default()));

    let as_bytes =
        |ls: &[String]| -> Vec<Vec<u8>> { ls.iter().map(|l| l.clone().into_bytes()).collect() };
    assert_eq!(import_file(&c, &as_bytes(&first)).await, first.len() as u64);
    let mail_ids = || -> Vec<String> {
        mails
            .lock()
            .unwrap()
            .iter()
            .filter_map(|m| m.alert_id.clone())
            .collect()
    };
    let hook_ids = || -> Vec<String> {
        hook.accepted
            .lock()
            .unwrap()
            .iter()
            .map(|(id, _)| id.clone())
            .collect()
    };
    // The webhook is down: e-mail goes on.
    wait_for_ids(
        "e-mail, first part",
        &want_first,
        mail_ids,
        Duration::from_secs(90),
        &logs,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while hook.refused.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the webhook alerter never tried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(hook_ids().is_empty());

    // Kill -9 the webhook alerter while it fails, start it again, let the webhook recover.
    let mut webhook = webhook;
    webhook.kill().unwrap();
    webhook.wait().unwrap();
    let webhook = alerter(&c, &webhook_args, &hook_log);
    hook.healthy.store(true, Ordering::SeqCst);
    wait_for_ids(
        "webhook, after the outage",
        &want_first,
        hook_ids,
        Duration::from_secs(90),
        &logs,
    )
    .await;

    assert_eq!(
        import_file(&c, &as_bytes(&second)).await,
        second.len() as u64
    );
    wait_for_ids(
        "e-mail, all",
        &want_all,
        mail_ids,
        Duration::from_secs(90),
        &logs,
    )
    .await;
    wait_for_ids(
        "webhook, all",
        &want_all,
        hook_ids,
        Duration::from_secs(90),
        &logs,
    )
    .await;
    // Nothing more arrives: a second look after a few flush intervals.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let want: Vec<String> = want_all.iter().cloned().collect();
    assert_eq!(sorted(mail_ids()), want, "each alert e-mailed exactly once");
    assert_eq!(sorted(hook_ids()), want, "each alert posted exactly once");

    // The message formats.
    let bodies = hook.accepted.lock().unwrap().clone();
    let (_, spike) = bodies
        .iter()
        .find(|(id, _)| id.starts_with("traffic-spike/"))
        .unwrap();
    assert_eq!(spike["alert"]["rule"], "traffic-spike");
    assert_eq!(spike["alert"]["kind"], "spike");
    assert_eq!(spike["alert"]["window_start"], "2026-03-01T10:15:00Z");
    assert_eq!(spike["alert"]["window_end"], "2026-03-01T10:16:00Z");
    assert_eq!(spike["alert"]["subject"], serde_json::Value::Null);
    assert_eq!(spike["alert"]["value"], 900.0);
    eprintln!("webhook body: {spike}");
    assert_eq!(
        spike["text"],
        "traffic-spike: 900 visits in 2026-03-01 10:15:00 to 10:16:00 UTC, 4.2x the mean of the previous 10 windows (215.0; alert above 3x)"
    );
    assert_eq!(spike["alert"]["threshold"], 645.0);
    let (_, surge) = bodies
        .iter()
        .find(|(id, _)| id.starts_with("country-visits/"))
        .unwrap();
    assert_eq!(surge["alert"]["subject"], "CN");
    assert_eq!(surge["alert"]["threshold"], 250.0);
    let mail = mails
        .lock()
        .unwrap()
        .iter()
        .find(|m| m.alert_id.as_deref() == Some("server-errors/2026-03-01T10:08:00Z"))
        .cloned()
        .unwrap();
    assert!(mail.subject.unwrap().contains("server-errors"));
    assert_eq!(mail.from, "<pageviews@example.com>");
    assert_eq!(mail.to, ["<ops@example.com>"]);

    // Both groups recorded every delivery; SIGTERM ends each alerter promptly and cleanly.
    for group in ["alerts-webhook", "alerts-email"] {
        let status = c.store.alert_status(group).await.unwrap();
        assert_eq!((status.pending, status.delivered), (0, 3), "{group}");
        assert_eq!(status.late_events, 0, "{group}");
    }
    // The alerting groups in /metrics and in the pipeline's health.
    let (addr, server) = start_server(&c).await;
    let (status, _, body) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    let metrics = String::from_utf8(body).unwrap();
    for group in ["alerts-webhook", "alerts-email"] {
        for line in [
            format!("pageviews_alerts_raised_total{{group=\"{group}\"}} 3"),
            format!("pageviews_alerts_pending{{group=\"{group}\"}} 0"),
            format!("pageviews_alert_late_events_total{{group=\"{group}\"}} 0"),
        ] {
            assert!(
                metrics.lines().any(|l| l == line),
                "{line} not in:\n{metrics}"
            );
        }
        assert!(
            metrics.contains(&format!(
                "pageviews_consumer_lag{{group=\"{group}\",topic=\"page-views\",partition=\"3\"}} 0"
            )),
            "{metrics}"
        );
    }
    // And in the API, newest window first, each delivered.
    let (status, _, body) = tokio::task::spawn_blocking(move || http_get(addr, "/api/alerts"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    let api: pageviews::serve::AlertsResponse = serde_json::from_slice(&body).unwrap();
    let names: Vec<&str> = api.groups.iter().map(|g| g.group.as_str()).collect();
    assert_eq!(names, ["alerts-email", "alerts-webhook"]);
    for g in &api.groups {
        let ids: Vec<&str> = g.alerts.iter().map(|a| a.alert.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "country-visits/2026-03-01T10:27:00Z/CN",
                "traffic-spike/2026-03-01T10:15:00Z",
                "server-errors/2026-03-01T10:08:00Z"
            ]
        );
        assert!(g.alerts.iter().all(|a| a.delivered), "{g:?}");
        assert_eq!((g.pending, g.delivered, g.late_events), (0, 3, 0));
    }
    let webhook_group = &api.groups[1];
    assert!(
        webhook_group.alerts[2].attempts >= 2,
        "the first alerts were refused before they were delivered: {webhook_group:?}"
    );
    server.stop().await;
    stop(webhook);
    stop(email);
    pre.stop().await;
}
