//! The visits of a real log, computed here from its text with the definitions of
//! `docs/sessions.md`, against what a running `pageviews serve` (or `demo`) answers.
//!
//! Usage: `check_sessions LOG URL` for a Combined (or Common) log that went through
//! `pageviews demo --input LOG --exit-when-drained` into the database `URL` serves, e.g.
//!
//! ```sh
//! pageviews demo --input access.log --exit-when-drained --database sqlite:///tmp/check.db
//! pageviews serve --database sqlite:///tmp/check.db &
//! cargo run --release --example check_sessions -- access.log http://127.0.0.1:8080
//! ```
//!
//! The only rules taken from pageviews are what a page request is (the User-Agent rule of
//! the `visitor_type` panel, woothee, and the `static_path` panel's extension list) and the
//! value bound every key gets (paths over 512 bytes are cut). Prints
//! each figure on both sides; exits 1 on any difference.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};

use anyhow::{Context, bail};

const GAP: i64 = 30 * 60;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, log, url] = args.as_slice() else {
        bail!("usage: check_sessions LOG URL");
    };
    let ua = pageviews::preprocess::useragent::UaParser::new(1 << 24);
    // (address, User-Agent) → page requests (time, path).
    let mut visitors: BTreeMap<(String, String), Vec<(i64, String)>> = BTreeMap::new();
    let mut lines = 0u64;
    for line in BufReader::new(std::fs::File::open(log).with_context(|| log.clone())?).lines() {
        let line = line?;
        lines += 1;
        let Some((ip, time, path, agent)) = fields(&line) else {
            bail!("line {lines} is not a Combined line: {line}");
        };
        // Without the query string, and bounded as every value that becomes a key (a path of
        // more than 512 bytes is cut).
        let path = path.split('?').next().unwrap_or("");
        let path = pageviews::event::policy::bounded(path).into_owned();
        if ua.classify(Some(&agent)).is_bot || pageviews::aggregate::dimensions::is_static(&path) {
            continue;
        }
        visitors.entry((ip, agent)).or_default().push((time, path));
    }
    let (mut visits, mut bounces, mut pages, mut duration) = (0u64, 0u64, 0u64, 0i64);
    let mut entry: BTreeMap<String, u64> = BTreeMap::new();
    let mut exit: BTreeMap<String, u64> = BTreeMap::new();
    for (_, mut requests) in visitors {
        // Same second: by path (every request of this log is on one site).
        requests.sort();
        let mut start = 0;
        for i in 1..=requests.len() {
            if i < requests.len() && requests[i].0 - requests[i - 1].0 <= GAP {
                continue;
            }
            let visit = &requests[start..i];
            visits += 1;
            pages += visit.len() as u64;
            bounces += u64::from(visit.len() == 1);
            duration += visit[visit.len() - 1].0 - visit[0].0;
            *entry.entry(visit[0].1.clone()).or_default() += 1;
            *exit.entry(visit[visit.len() - 1].1.clone()).or_default() += 1;
            start = i;
        }
    }
    let served: serde_json::Value = serde_json::from_slice(&get(url, "/api/sessions")?)?;
    let mut differences = 0;
    let mut compare = |what: &str, here: u64, there: u64| {
        let mark = if here == there { "equal" } else { "DIFFERENT" };
        println!("{what:>24}: computed {here:>8}, served {there:>8}  {mark}");
        differences += usize::from(here != there);
    };
    let n = |k: &str| served[k].as_u64().unwrap_or(u64::MAX);
    println!("{log}: {lines} lines");
    compare("visits", visits, n("visits"));
    compare("bounces", bounces, n("bounces"));
    compare("page requests in visits", pages, n("pages"));
    let mean = served["duration"]["mean"].as_f64().unwrap_or(f64::NAN);
    compare(
        "duration sum (s)",
        duration as u64,
        (mean * n("visits") as f64).round() as u64,
    );
    compare("open visits", 0, n("open"));
    compare("late page requests", 0, n("late"));
    for (name, want) in [("entry_page", &entry), ("exit_page", &exit)] {
        let d: serde_json::Value =
            serde_json::from_slice(&get(url, &format!("/api/dimensions/{name}?limit=1000"))?)?;
        let got: BTreeMap<String, u64> = d["values"]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|v| {
                        (
                            v["value"].as_str().unwrap_or("").to_owned(),
                            v["visits"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let matching = want.iter().filter(|(k, v)| got.get(*k) == Some(v)).count();
        compare(
            &format!("{name} values"),
            want.len() as u64,
            got.len() as u64,
        );
        compare(
            &format!("{name} values equal"),
            want.len() as u64,
            matching as u64,
        );
        for (k, v) in want {
            if got.get(k) != Some(v) {
                println!("    {name} {k:?}: computed {v}, served {:?}", got.get(k));
            }
        }
    }
    if differences > 0 {
        bail!("{differences} figures differ");
    }
    println!("every figure is equal");
    Ok(())
}

/// Address, time (seconds since the epoch), path and User-Agent of a Combined line.
fn fields(line: &str) -> Option<(String, i64, String, String)> {
    let ip = line.split(' ').next()?.to_owned();
    let stamp = &line[line.find('[')? + 1..line.find(']')?];
    let time = chrono::DateTime::parse_from_str(stamp, "%d/%b/%Y:%H:%M:%S %z")
        .ok()?
        .timestamp();
    let quoted: Vec<&str> = line.split('"').collect();
    let path = quoted.get(1)?.split(' ').nth(1)?.to_owned();
    let agent = quoted.get(5).copied().unwrap_or("").to_owned();
    Some((ip, time, path, agent))
}

/// The body of `GET url+path` (HTTP/1.1, no TLS).
fn get(url: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    let host = url
        .strip_prefix("http://")
        .context("URL must start with http://")?
        .trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(host).with_context(|| host.to_owned())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header")?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{path}: {}", head.lines().next().unwrap_or(""));
    }
    let body = buf[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(&body));
    }
    Ok(body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = b.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}
