//! Deterministic generator of realistic Combined Log Format lines, for the demo, tests and
//! benchmarks.
//!
//! A seed fixes everything (ChaCha8): visitors (address, browser), what they request and
//! when. Visitors are drawn with a skew so that some countries lead, as on a real site.

use chrono::{DateTime, TimeDelta, Utc};
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
    use crate::preprocess::parse::parse_line;

    #[test]
    fn deterministic_and_parseable() {
        let a: Vec<String> = LineGenerator::new(7).take(2_000).collect();
        let b: Vec<String> = LineGenerator::new(7).take(2_000).collect();
        assert_eq!(a, b);
        assert_ne!(a, LineGenerator::new(8).take(2_000).collect::<Vec<_>>());
        for line in &a {
            parse_line(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
        assert!(a[0].ends_with('"'), "{}", a[0]);
    }
}
