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

/// A shared, bounded cache in front of the parser.
pub struct UaParser {
    parser: woothee::parser::Parser,
    cache: Cache<String, Arc<Client>>,
}

/// How many distinct User-Agent strings are kept; enough for real sites' long tail.
pub const DEFAULT_CACHE_ENTRIES: usize = 20_000;

impl Default for UaParser {
    fn default() -> Self {
        UaParser::new(DEFAULT_CACHE_ENTRIES)
    }
}

impl UaParser {
    pub fn new(cache_entries: usize) -> UaParser {
        UaParser {
            parser: woothee::parser::Parser::new(),
            cache: Cache::new(cache_entries.max(1)),
        }
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
    fn cache_returns_the_same_entry() {
        let p = UaParser::new(10);
        let a = p.classify(Some("curl/8.0"));
        let b = p.classify(Some("curl/8.0"));
        assert!(Arc::ptr_eq(&a, &b));
    }
}
