//! User-Agent → browser, version, OS, device class and bot flag.
//!
//! Parsing uses `woothee` (its rules are compiled in, nothing to download) behind a bounded
//! concurrent cache: real traffic repeats a few thousand distinct User-Agent strings, so
//! almost every lookup is a hash-map hit instead of a regex scan.

use std::sync::Arc;

use quick_cache::sync::Cache;

/// What the dashboard and later dimensions need to know about a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// Browser or crawler name (`Chrome`, `Googlebot`), `UNKNOWN` when unrecognised.
    pub browser: String,
    /// Browser version as reported, empty when unknown.
    pub browser_version: String,
    /// Operating system (`Windows 10`, `Android`, `iPhone`), `UNKNOWN` when unrecognised.
    pub os: String,
    /// `desktop`, `mobile`, `tablet`, `bot`, `other` or `unknown`.
    pub device: &'static str,
    /// Crawlers and other automated clients.
    pub is_bot: bool,
}

/// A shared cache in front of the parser, bounded by bytes rather than entries: a User-Agent
/// header can be as long as a log line (64 KiB), so a bound on entries alone lets hostile
/// traffic (random long User-Agents) grow it to gigabytes.
pub struct UaParser {
    parser: woothee::parser::Parser,
    cache: Cache<String, Arc<Client>, EntryBytes>,
}

/// Bytes of cache: about 80,000 entries of a typical (~200 byte) User-Agent, far more than the
/// few thousand distinct ones real traffic repeats.
pub const DEFAULT_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// Weighs a cache entry by the heap bytes it holds (key, strings, fixed overhead).
#[derive(Debug, Clone, Copy)]
struct EntryBytes;

/// Per-entry bookkeeping beyond the strings: the `Client`, the `Arc`, the map slot.
const ENTRY_OVERHEAD: u64 = 128;

impl quick_cache::Weighter<String, Arc<Client>> for EntryBytes {
    fn weight(&self, key: &String, client: &Arc<Client>) -> u64 {
        (key.len() + client.browser.len() + client.browser_version.len() + client.os.len()) as u64
            + ENTRY_OVERHEAD
    }
}

impl Default for UaParser {
    fn default() -> Self {
        UaParser::new(DEFAULT_CACHE_BYTES)
    }
}

impl UaParser {
    /// A parser whose cache holds at most `cache_bytes` bytes of entries.
    pub fn new(cache_bytes: u64) -> UaParser {
        let cache_bytes = cache_bytes.max(ENTRY_OVERHEAD * 16);
        UaParser {
            parser: woothee::parser::Parser::new(),
            cache: Cache::with_weighter(
                usize::try_from(cache_bytes / 256)
                    .unwrap_or(usize::MAX)
                    .max(16),
                cache_bytes,
                EntryBytes,
            ),
        }
    }

    /// Bytes held by the cache now (the sum of its entries' weights).
    pub fn cached_bytes(&self) -> u64 {
        self.cache.weight()
    }

    /// Classifies a User-Agent header; `None` (header absent) is an unknown client.
    pub fn classify(&self, user_agent: Option<&str>) -> Arc<Client> {
        let ua = user_agent.unwrap_or("");
        if let Some(hit) = self.cache.get(ua) {
            return hit;
        }
        let client = Arc::new(self.parse(ua));
        self.cache.insert(ua.to_owned(), Arc::clone(&client));
        client
    }

    fn parse(&self, ua: &str) -> Client {
        let Some(r) = self.parser.parse(ua) else {
            return Client {
                browser: "UNKNOWN".into(),
                browser_version: String::new(),
                os: "UNKNOWN".into(),
                device: "unknown",
                is_bot: false,
            };
        };
        let lower_has = |needle: &str| ua.to_ascii_lowercase().contains(needle);
        let is_bot = r.category == "crawler"
            || (r.category == "UNKNOWN"
                && (lower_has("bot") || lower_has("spider") || lower_has("crawl")));
        let device = match r.category {
            _ if is_bot => "bot",
            "pc" => "desktop",
            "smartphone" if r.os == "iPad" || (r.os == "Android" && !ua.contains("Mobile")) => {
                "tablet"
            }
            "smartphone" | "mobilephone" => "mobile",
            "appliance" | "misc" => "other",
            _ => "unknown",
        };
        Client {
            browser: r.name.to_owned(),
            browser_version: if r.version == "UNKNOWN" {
                String::new()
            } else {
                r.version.to_owned()
            },
            os: r.os.to_owned(),
            device,
            is_bot,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_common_clients() {
        let p = UaParser::default();
        let chrome = p.classify(Some("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"));
        assert_eq!(
            (
                chrome.browser.as_str(),
                chrome.browser_version.as_str(),
                chrome.device,
                chrome.is_bot
            ),
            ("Chrome", "120.0.0.0", "desktop", false)
        );
        assert_eq!(chrome.os, "Windows 10");
        let iphone = p.classify(Some("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"));
        assert_eq!(
            (iphone.browser.as_str(), iphone.device),
            ("Safari", "mobile")
        );
        let ipad = p.classify(Some("Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1"));
        assert_eq!(ipad.device, "tablet");
        let bot = p.classify(Some(
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        ));
        assert_eq!(
            (bot.browser.as_str(), bot.device, bot.is_bot),
            ("Googlebot", "bot", true)
        );
        let none = p.classify(None);
        assert_eq!((none.device, none.is_bot), ("unknown", false));
    }

    #[test]
    fn cache_is_bounded_by_bytes_not_entries() {
        // 2,000 distinct 60 KB User-Agents: 120 MB if every one were kept (the old cache
        // kept 20,000 entries whatever their size: up to 1.3 GB).
        let p = UaParser::new(4 * 1024 * 1024);
        let filler = "x".repeat(60_000);
        for i in 0..2_000 {
            let ua = format!("Mozilla/5.0 (compatible; Bot{i}/1.0) {filler}");
            p.classify(Some(&ua));
        }
        let held = p.cached_bytes();
        assert!(held <= 4 * 1024 * 1024, "cache holds {held} bytes");
        assert!(held >= 60_000, "cache holds {held} bytes: nothing kept");
        // Short, common User-Agents are still cached.
        let a = p.classify(Some("curl/8.0"));
        assert!(Arc::ptr_eq(&a, &p.classify(Some("curl/8.0"))));
    }

    #[test]
    fn cache_returns_the_same_entry() {
        let p = UaParser::new(64 * 1024);
        let a = p.classify(Some("curl/8.0"));
        let b = p.classify(Some("curl/8.0"));
        assert!(Arc::ptr_eq(&a, &b));
    }
}
