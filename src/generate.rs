//! Deterministic generator of realistic Combined Log Format lines, for the demo, tests and
//! benchmarks.
//!
//! A seed fixes everything (ChaCha8): visitors (address, browser), what they request and
//! when. Visitors are drawn with a skew so that some countries lead, as on a real site.

use chrono::{DateTime, TimeDelta, Utc};

use crate::format::Preset;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/123.0.0.0 Safari/537.36 Edg/123.0.2420.81",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/122.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:124.0) Gecko/20100101 Firefox/124.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.6367.82 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/24.0 Chrome/117.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "curl/8.5.0",
];

const PATHS: &[&str] = &[
    "/",
    "/",
    "/",
    "/index.html",
    "/blog/",
    "/blog/processing-streaming-data-with-kafka",
    "/blog/rust-async",
    "/pricing",
    "/docs/getting-started",
    "/docs/api",
    "/about",
    "/static/app.js",
    "/static/style.css",
    "/favicon.ico",
    "/search?q=kafka+rebalance",
    "/api/v1/items?page=2",
    "/robots.txt",
    "/wp-login.php",
];

const REFERRERS: &[&str] = &[
    "-",
    "-",
    "-",
    "https://www.google.com/",
    "https://duckduckgo.com/",
    "https://news.ycombinator.com/",
    "https://twitter.com/",
    "https://example.com/blog/",
];

/// One simulated visitor: an address and a browser, reused across their requests.
struct Visitor {
    ip: String,
    user_agent: &'static str,
}

/// An endless, deterministic stream of log lines.
pub struct LineGenerator {
    rng: ChaCha8Rng,
    visitors: Vec<Visitor>,
    /// Timestamp of the next line (`None`: use the wall clock, for the live demo).
    clock: Option<DateTime<Utc>>,
}

/// Default start of generated timestamps: fixed, so a seed gives byte-identical output.
pub fn default_start() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_225_600, 0).unwrap_or_default() // 2026-01-01T00:00:00Z
}

impl LineGenerator {
    /// Lines with timestamps from `start`, a few milliseconds apart.
    pub fn new(seed: u64) -> LineGenerator {
        LineGenerator::with_clock(seed, Some(default_start()))
    }

    /// Lines with timestamps from `start` (tests tell inputs apart by their dates).
    pub fn starting_at(seed: u64, start: DateTime<Utc>) -> LineGenerator {
        LineGenerator::with_clock(seed, Some(start))
    }

    /// Lines stamped with the current time (the live demo).
    pub fn live(seed: u64) -> LineGenerator {
        LineGenerator::with_clock(seed, None)
    }

    fn with_clock(seed: u64, clock: Option<DateTime<Utc>>) -> LineGenerator {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let visitors = (0..5_000)
            .map(|_| Visitor {
                ip: random_ip(&mut rng),
                user_agent: USER_AGENTS[rng.random_range(0..USER_AGENTS.len())],
            })
            .collect();
        LineGenerator {
            rng,
            visitors,
            clock,
        }
    }

    /// The next line, without a newline.
    pub fn next_line(&mut self) -> String {
        // Squaring a uniform draw favours low indices: a few visitors (and so countries)
        // account for much of the traffic.
        let u: f64 = self.rng.random();
        let v =
            &self.visitors[((u * u) * self.visitors.len() as f64) as usize % self.visitors.len()];
        let time = match &mut self.clock {
            Some(t) => {
                *t += TimeDelta::milliseconds(self.rng.random_range(0..20));
                *t
            }
            None => Utc::now(),
        };
        let path = PATHS[self.rng.random_range(0..PATHS.len())];
        let status = match self.rng.random_range(0..100) {
            0..=84 => 200,
            85..=89 => 304,
            90..=94 => 404,
            95..=97 => 301,
            _ => 500,
        };
        let bytes = if status == 304 {
            0
        } else {
            self.rng.random_range(200..60_000)
        };
        let referrer = REFERRERS[self.rng.random_range(0..REFERRERS.len())];
        let method = if self.rng.random_range(0..20) == 0 {
            "POST"
        } else {
            "GET"
        };
        format!(
            "{} - - [{}] \"{method} {path} HTTP/1.1\" {status} {bytes} \"{referrer}\" \"{}\"",
            v.ip,
            time.format("%d/%b/%Y:%H:%M:%S +0000"),
            v.user_agent
        )
    }
}

impl Iterator for LineGenerator {
    type Item = String;
    fn next(&mut self) -> Option<String> {
        Some(self.next_line())
    }
}

/// Writes a generated (Combined) line in `preset`'s layout, with the same client, time,
/// request, status, size, referrer and User-Agent (plus a vhost and a duration where the
/// layout has them), so that every format can be benchmarked and tried on the same traffic.
/// `None` for a line that is not Combined.
pub fn render(line: &str, preset: Preset) -> Option<String> {
    let l = crate::format::clf::parse(line).ok()?;
    let t = l.time;
    let (method, path, status, bytes) = (l.method.as_ref(), l.path.as_ref(), l.status, l.bytes);
    let referrer = l.referrer.as_deref().unwrap_or("-");
    let ua = l.user_agent.as_deref().unwrap_or("-");
    let ip = l.host.as_ref();
    let (stem, query) = path.split_once('?').unwrap_or((path, "-"));
    let clf_time = t.format("%d/%b/%Y:%H:%M:%S +0000");
    // A duration derived from the size, so it varies but stays deterministic.
    let ms = bytes % 900 + 1;
    Some(match preset {
        Preset::Combined => line.to_owned(),
        Preset::Common => {
            format!("{ip} - - [{clf_time}] \"{method} {path} HTTP/1.1\" {status} {bytes}")
        }
        Preset::Vcombined => format!("www.example.com:443 {line}"),
        Preset::Vcommon => format!(
            "www.example.com:443 {ip} - - [{clf_time}] \"{method} {path} HTTP/1.1\" {status} {bytes}"
        ),
        Preset::W3c => format!(
            "{} 10.0.0.5 {method} {stem} {query} 443 - {ip} {} {referrer} {status} 0 0 {ms}",
            t.format("%Y-%m-%d %H:%M:%S"),
            ua.replace(' ', "+")
        ),
        Preset::Cloudfront => [
            t.format("%Y-%m-%d").to_string(),
            t.format("%H:%M:%S").to_string(),
            "FRA56-P1".into(),
            bytes.to_string(),
            ip.into(),
            method.into(),
            "d111111abcdef8.cloudfront.net".into(),
            stem.into(),
            status.to_string(),
            referrer.into(),
            ua.replace(' ', "%20"),
            query.into(),
            "-".into(),
            "Miss".into(),
            "SOX4xwn4XV6Q4rgb7XiVGOHms_BGlTAC4KyHmureZmBNrjGdRLiNIQ==".into(),
            "www.example.com".into(),
            "https".into(),
            "120".into(),
            format!("{:.3}", ms as f64 / 1000.0),
            "-".into(),
            "TLSv1.3".into(),
            "TLS_AES_128_GCM_SHA256".into(),
            "Miss".into(),
            "HTTP/2.0".into(),
            "-".into(),
            "-".into(),
            "51234".into(),
            "0.001".into(),
            "Miss".into(),
            "text/html".into(),
            bytes.to_string(),
            "-".into(),
            "-".into(),
        ]
        .join("\t"),
        Preset::Cloudstorage => format!(
            "\"{}\",\"{ip}\",\"1\",\"\",\"{method}\",\"{path}\",\"{status}\",\"0\",\"{bytes}\",\"{}\",\"storage.googleapis.com\",\"{referrer}\",\"{ua}\",\"AAANsUmaKBTw9gqOSHDOdr10MW802XI5jlw\",\"GET_Object\",\"bucket\",\"object\"",
            t.timestamp_micros(),
            ms * 1000
        ),
        Preset::Awsalb => format!(
            "https {} app/my-lb/50dc6c495c0c9188 {}:2817 10.0.0.1:80 0.000 {:.3} 0.000 {status} {status} 34 {bytes} \"{method} https://www.example.com:443{path} HTTP/1.1\" \"{ua}\" ECDHE-RSA-AES128-GCM-SHA256 TLSv1.2 arn:aws:elasticloadbalancing:us-east-2:123456789012:targetgroup/my-targets/73e2d6bc24d8a067 \"Root=1-58337262-36d228ad5d99923122bbe354\" \"www.example.com\" \"-\" 0 {} \"forward\" \"-\" \"-\" \"10.0.0.1:80\" \"{status}\" \"-\" \"-\"",
            t.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
            ip,
            ms as f64 / 1000.0,
            t.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
        ),
        Preset::Awselb => format!(
            "{} my-loadbalancer {ip}:2817 10.0.0.1:80 0.000073 {:.6} 0.000057 {status} {status} 0 {bytes} \"{method} http://www.example.com:80{path} HTTP/1.1\" \"{ua}\" - -",
            t.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
            ms as f64 / 1000.0,
        ),
        Preset::Awss3 => format!(
            "79a59df900b949e55d96a1e698fbacedfd6e09d98eacf8f8d5218e7cd47ef2be awsexamplebucket1 [{clf_time}] {ip} arn:aws:iam::123456789012:user/alice 3E57427F3EXAMPLE REST.GET.OBJECT {} \"{method} {path} HTTP/1.1\" {status} - {bytes} {bytes} {ms} {} \"{referrer}\" \"{ua}\" - s9lzHYrFp76ZVxRcpX9+5cjAnEH2ROuNkd2BHfIa6UkFVdtjf5mKR3/eTPFvsiP/XV/VLi31234= SigV4 ECDHE-RSA-AES128-GCM-SHA256 AuthHeader awsexamplebucket1.s3.us-west-1.amazonaws.com TLSv1.2 - -",
            stem.trim_start_matches('/'),
            ms / 2,
        ),
        Preset::Squid => format!(
            "{}.{:03} {ms:>6} {ip} TCP_MISS/{status} {bytes} {method} http://www.example.com{path} - HIER_DIRECT/203.0.113.5 text/html",
            t.timestamp(),
            t.timestamp_subsec_millis()
        ),
        Preset::Caddy => {
            let ua_json = serde_json::to_string(ua).ok()?;
            let path_json = serde_json::to_string(path).ok()?;
            let referrer = if referrer == "-" {
                String::new()
            } else {
                format!(",\"Referer\":[{}]", serde_json::to_string(referrer).ok()?)
            };
            format!(
                "{{\"level\":\"info\",\"ts\":{}.{:06},\"logger\":\"http.log.access.log0\",\"msg\":\"handled request\",\"request\":{{\"remote_ip\":\"{ip}\",\"remote_port\":\"41342\",\"client_ip\":\"{ip}\",\"proto\":\"HTTP/2.0\",\"method\":\"{method}\",\"host\":\"www.example.com\",\"uri\":{path_json},\"headers\":{{\"User-Agent\":[{ua_json}]{referrer},\"Accept\":[\"*/*\"]}}}},\"bytes_read\":0,\"user_id\":\"\",\"duration\":{:.6},\"size\":{bytes},\"status\":{status},\"resp_headers\":{{\"Server\":[\"Caddy\"],\"Content-Type\":[\"text/html; charset=utf-8\"]}}}}",
                t.timestamp(),
                t.timestamp_subsec_micros(),
                ms as f64 / 1000.0
            )
        }
        Preset::Traefikclf => {
            format!("{line} 1 \"website@docker\" \"http://172.18.0.3:80\" {ms}ms")
        }
    })
}

/// A public-looking address: mostly IPv4 unicast (private and reserved ranges included, as
/// real logs behind proxies have them), one in ten IPv6 from the allocated 2000::/3 block.
fn random_ip(rng: &mut ChaCha8Rng) -> String {
    if rng.random_range(0..10) == 0 {
        let head: u16 = rng.random_range(0x2001..0x2c00);
        let rest: [u16; 3] = rng.random();
        format!(
            "{head:x}:{:x}:{:x}:{:x}::{:x}",
            rest[0],
            rest[1],
            rest[2],
            rng.random::<u16>()
        )
    } else {
        let first = rng.random_range(1..224u8);
        let rest: [u8; 3] = rng.random();
        format!("{first}.{}.{}.{}", rest[0], rest[1], rest[2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{FormatSpec, LogFormat};

    /// Every rendering reads back, through its preset, as the line it came from.
    #[test]
    fn renderings_read_back_in_every_preset() {
        let combined = LogFormat::combined();
        for line in LineGenerator::new(3).take(300) {
            let want = combined.parse(line.as_bytes()).unwrap();
            for preset in Preset::ALL {
                let text = render(&line, preset).unwrap();
                let got = LogFormat::compile(&FormatSpec::preset(preset))
                    .unwrap()
                    .parse(text.as_bytes())
                    .unwrap_or_else(|e| panic!("{preset}: {e}: {text}"));
                assert_eq!(got.host, want.host, "{preset}: {text}");
                assert_eq!(
                    got.time.timestamp(),
                    want.time.timestamp(),
                    "{preset}: {text}"
                );
                assert_eq!(got.path, want.path, "{preset}: {text}");
                if matches!(preset, Preset::Awsalb | Preset::Awselb | Preset::Squid) {
                    // Absolute URLs: the host goes to the vhost.
                    assert_eq!(
                        got.vhost.as_deref(),
                        Some("www.example.com"),
                        "{preset}: {text}"
                    );
                }
                assert_eq!(got.status, want.status, "{preset}: {text}");
                // IIS's default fields have no sc-bytes.
                if preset != Preset::W3c {
                    assert_eq!(got.bytes, want.bytes, "{preset}: {text}");
                }
                assert_eq!(got.method, want.method, "{preset}: {text}");
                let plus = want.user_agent.as_deref().is_some_and(|u| u.contains('+'));
                // No User-Agent in the layout, or IIS's `+` for spaces (lossy for a `+`).
                let lossy = matches!(preset, Preset::Common | Preset::Vcommon | Preset::Squid)
                    || (preset == Preset::W3c && plus);
                if !lossy {
                    assert_eq!(got.user_agent, want.user_agent, "{preset}: {text}");
                }
            }
        }
    }

    #[test]
    fn deterministic_and_parseable() {
        let a: Vec<String> = LineGenerator::new(7).take(2_000).collect();
        let b: Vec<String> = LineGenerator::new(7).take(2_000).collect();
        assert_eq!(a, b);
        assert_ne!(a, LineGenerator::new(8).take(2_000).collect::<Vec<_>>());
        let combined = LogFormat::combined();
        for line in &a {
            combined
                .parse(line.as_bytes())
                .unwrap_or_else(|e| panic!("{line}: {e}"));
        }
        assert!(a[0].ends_with('"'), "{}", a[0]);
    }
}
