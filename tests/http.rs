//! The dashboard server under abuse, and secrets in output, through the real binary (issue 19):
//! requests whose headers never end are closed by the header timeout, the push channel's
//! subscriber cap answers 503, 1,000 subscribers stay within a stated memory bound, the access
//! token is required when set (and the page works with it), `--help` never shows a secret and
//! every error message that names a URL is redacted.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{bin, command, run_within};
use pageviews::aggregate::tables::CountsFlush;
use pageviews::store::{FlushBatch, OffsetUpdate, Store};

/// Resident memory of 1,000 subscribed pages, over the server's own before they came.
const SUBSCRIBERS_RSS_BOUND: u64 = 64 * 1024 * 1024;

/// A `serve` process over a database with a few counts; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/stats.db", dir.path().display());
    let store = Store::open(&db).await.unwrap();
    let batch = FlushBatch {
        consumer_group: "aggregators".into(),
        topic: "page-views".into(),
        results: CountsFlush {
            increments: vec![("GB".into(), 7), ("NL".into(), 3)],
            ..CountsFlush::default()
        },
        offsets: vec![OffsetUpdate {
            partition: 0,
            expected: None,
            next: 10,
        }],
        ..FlushBatch::default()
    };
    store.flush(&batch).await.unwrap();
    let addr = { std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port())) };
    let mut cmd = command(&bin(), dir.path());
    cmd.args(["serve", "--database", &db, "--brokers", "127.0.0.1:1"]);
    cmd.args(["--listen", &addr.to_string()]);
    cmd.args(extra);
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server {
        child,
        addr,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "serve did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

/// One request with `headers` (each `Name: value`); (status line, lower-case headers, body).
fn request(addr: SocketAddr, path: &str, headers: &[&str]) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("host:"))
    {
        req.push_str("Host: localhost\r\n");
    }
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (
        status.to_owned(),
        headers.to_ascii_lowercase(),
        body.to_owned(),
    )
}

/// Opens `/api/events` and reads until the response head (and, when `update`, the first
/// snapshot) arrived; the open stream.
fn subscribe(addr: SocketAddr, update: bool) -> (TcpStream, String) {
    subscribe_at(addr, "/api/events", update)
}

/// [`subscribe`] to `path` (the push channel with a filter).
fn subscribe_at(addr: SocketAddr, path: &str, update: bool) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        let head_done = text.contains("\r\n\r\n");
        let answered = head_done && !text.starts_with("HTTP/1.1 200");
        if answered || (head_done && (!update || text.contains("event: update\ndata: {"))) {
            return (s, text);
        }
        let n = s.read(&mut chunk).expect("no answer within 30 s");
        assert!(n > 0, "the stream ended: {text}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Distinct filters followed live are capped (each costs one snapshot read per flush): past
/// the cap a new filter is answered 503, a filter already followed still subscribes.
#[tokio::test]
async fn distinct_live_filters_are_capped() {
    let server = serve(&[]).await;
    let cap = pageviews::serve::live::MAX_LIVE_FILTERS;
    let _pages: Vec<TcpStream> = (0..cap)
        .map(|i| {
            let (s, text) = subscribe_at(
                server.addr,
                &format!("/api/events?site=s{i}.example"),
                false,
            );
            assert!(text.starts_with("HTTP/1.1 200"), "{i}: {text}");
            s
        })
        .collect();
    let (_, text) = subscribe_at(server.addr, "/api/events?site=another.example", false);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    let (_s, text) = subscribe_at(server.addr, "/api/events?site=s0.example", true);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // The filtered snapshot: no visits on that site.
    assert!(text.contains("\"totals\":{\"visits\":0,"), "{text}");
}

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn requests_whose_headers_never_end_are_closed() {
    let server = serve(&["--header-timeout", "1s"]).await;
    let mut open: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(server.addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: a")
                .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    for (i, s) in open.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1024];
        match s.read(&mut buf) {
            // Closed (hyper may first answer 408).
            Ok(n) => {
                let rest = String::from_utf8_lossy(&buf[..n]);
                assert!(n == 0 || rest.starts_with("HTTP/1.1 408"), "{i}: {rest}");
                if n > 0 {
                    assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "{i} still open");
                }
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{i}: {e}"),
        }
    }
    // The server still answers.
    let (status, _, _) = request(server.addr, "/healthz", &[]);
    assert_eq!(status, "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn the_subscriber_cap_answers_503() {
    let server = serve(&["--max-subscribers", "3"]).await;
    let mut pages: Vec<TcpStream> = (0..3)
        .map(|_| {
            let (s, text) = subscribe(server.addr, true);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            assert!(text.contains("\"totals\":{\"visits\":10,"), "{text}");
            s
        })
        .collect();
    let (_, text) = subscribe(server.addr, false);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 5"),
        "{text}"
    );
    // A page that leaves frees its place.
    drop(pages.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, text) = subscribe(server.addr, false);
        if text.starts_with("HTTP/1.1 200") {
            pages.push(s);
            break;
        }
        assert!(Instant::now() < deadline, "the place was not freed: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn a_thousand_subscribers_stay_within_the_memory_bound() {
    let server = serve(&[]).await;
    // Warm up: the first page makes the server read its snapshot.
    let (first, _) = subscribe(server.addr, true);
    let before = rss(server.child.id());
    let pages: Vec<TcpStream> = (0..1000)
        .map(|i| {
            let (s, text) = subscribe(server.addr, true);
            assert!(text.starts_with("HTTP/1.1 200"), "{i}: {text}");
            s
        })
        .collect();
    let after = rss(server.child.id());
    let grown = after.saturating_sub(before);
    println!("1,000 subscribers: resident {before} -> {after} bytes (+{grown})");
    assert!(
        grown < SUBSCRIBERS_RSS_BOUND,
        "1,000 subscribers grew the server by {grown} bytes"
    );
    drop(pages);
    drop(first);
}

#[tokio::test]
async fn the_token_is_required_when_set_and_the_page_works_with_it() {
    let server = serve(&["--auth-token", "s3cret-token"]).await;
    let addr = server.addr;
    let (status, headers, _) = request(addr, "/api/countries", &[]);
    assert_eq!(status, "HTTP/1.1 401 Unauthorized");
    assert!(headers.contains("www-authenticate: bearer"), "{headers}");
    let (status, _, _) = request(addr, "/api/events", &[]);
    assert_eq!(status, "HTTP/1.1 401 Unauthorized");
    let (status, _, _) = request(addr, "/api/countries", &["Authorization: Bearer wrong"]);
    assert_eq!(status, "HTTP/1.1 401 Unauthorized");
    let (status, _, body) = request(
        addr,
        "/api/countries",
        &["Authorization: Bearer s3cret-token"],
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("\"total\":10,"), "{body}");
    // A browser: the sign-in form, then the link sets a cookie and drops the token.
    let (status, _, body) = request(addr, "/", &[]);
    assert_eq!(status, "HTTP/1.1 401 Unauthorized");
    assert!(body.contains("name=\"token\""), "{body}");
    let (status, headers, _) = request(addr, "/?token=s3cret-token", &[]);
    assert_eq!(status, "HTTP/1.1 303 See Other");
    assert!(headers.contains("location: /\r\n"), "{headers}");
    let cookie = headers
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(!cookie.contains("s3cret-token"), "{cookie}");
    let cookie = format!("Cookie: {cookie}");
    let (status, headers, body) = request(addr, "/", &[&cookie]);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("<title>pageviews"), "{body}");
    assert!(
        headers.contains("content-security-policy: default-src 'none'; script-src 'sha256-"),
        "{headers}"
    );
    assert!(headers.contains("x-content-type-options: nosniff"));
    assert!(headers.contains("x-frame-options: deny"));
    for path in [
        "/api/dashboard",
        "/api/countries",
        "/api/dimensions/country",
    ] {
        let (status, _, _) = request(addr, path, &[&cookie]);
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
    }
    // Probes need no token.
    let (status, _, _) = request(addr, "/healthz", &[]);
    assert_eq!(status, "HTTP/1.1 200 OK");
    // Another name for this loopback server (DNS rebinding) is refused.
    let (status, _, _) = request(addr, "/healthz", &["Host: attacker.example"]);
    assert_eq!(status, "HTTP/1.1 421 Misdirected Request");
}

const SECRETS: [&str; 4] = ["pw9secret", "hunter2", "S3CRETPATH", "tok3n"];

fn assert_no_secret(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what} shows {s}: {text}");
    }
}

#[test]
fn help_never_shows_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--help"][..],
        &["demo", "--help"],
        &["serve", "--help"],
        &["alert", "--help"],
        &["aggregate", "--help"],
        &["preprocess", "--help"],
    ] {
        let mut cmd = command(&bin(), dir.path());
        cmd.env(
            "PAGEVIEWS_DATABASE",
            "postgres://u:pw9secret@db.example/stats",
        )
        .env("PAGEVIEWS_SMTP", "smtp://u:hunter2@mail.example:587")
        .env(
            "PAGEVIEWS_WEBHOOK",
            "https://hooks.example/services/S3CRETPATH",
        )
        .env("PAGEVIEWS_AUTH_TOKEN", "tok3n")
        .args(args);
        let out = run_within(cmd, Duration::from_secs(30));
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage:"), "{text}");
        assert_no_secret(&format!("{args:?}"), &text);
    }
}

#[test]
fn errors_that_name_a_url_are_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"errors\"\nkind = \"error_share\"\nabove = 0.2\nwindow = \"1m\"\n",
    )
    .unwrap();
    let rules = rules.to_str().unwrap();
    let run = |args: &[&str], shown: &str| {
        let mut cmd = command(&bin(), dir.path());
        cmd.args(args);
        let out = run_within(cmd, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(shown), "{args:?}: {stderr}");
        assert_no_secret(&format!("{args:?}"), &stderr);
    };
    run(
        &[
            "serve",
            "--database",
            "postgress://u:pw9secret@db.example/stats",
        ],
        "postgress://u:***@db.example/stats",
    );
    run(
        &[
            "serve",
            "--database",
            "postgres://u:pw9secret@127.0.0.1:1/stats",
        ],
        "postgres://u:***@127.0.0.1:1/stats",
    );
    run(
        &[
            "alert",
            "--rules",
            rules,
            "--webhook",
            "ftp://hooks.example/S3CRETPATH",
        ],
        "ftp://hooks.example/***",
    );
    run(
        &[
            "alert",
            "--rules",
            rules,
            "--smtp",
            "smtp://u:hunter2@127.0.0.1:25",
            "--from",
            "a@example.com",
            "--to",
            "b@example.com",
        ],
        "no TLS",
    );
}
