//! The pure core of the preprocess stage: raw line bytes → (country, event JSON) or a reason.

use std::borrow::Cow;

use super::geo::GeoDb;
use super::useragent::UaParser;
use crate::countries::CountryCode;
use crate::event::policy::{bounded, bounded_cow, request_time_us, response_bytes};
use crate::event::{PageView, Source, client_id, rfc3339_seconds, visitor_hex, visitor_id};
use crate::format::{LogFormat, ParseError};

/// Everything needed to turn a line into an event; one per preprocessor, shared by threads.
pub struct Enricher {
    pub geo: GeoDb,
    pub user_agents: UaParser,
    /// How far ahead of the wall clock an event's time may be; later lines are
    /// dead-lettered ([`ParseError::Future`]): one line dated 9999 would otherwise become
    /// the newest minute, and every earlier minute and hour would be pruned against it.
    pub max_future: chrono::TimeDelta,
}

/// `--max-future` when not given: a day covers every time zone and clock skew.
pub const DEFAULT_MAX_FUTURE: std::time::Duration = std::time::Duration::from_secs(86_400);

/// An enriched line, ready to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enriched {
    /// The message key: all events of one country land in one partition.
    pub country: CountryCode,
    /// The `PageView` as JSON.
    pub json: Vec<u8>,
}

impl Enricher {
    pub fn new(geo: GeoDb) -> Enricher {
        Enricher {
            geo,
            user_agents: UaParser::default(),
            max_future: chrono::TimeDelta::from_std(DEFAULT_MAX_FUTURE)
                .unwrap_or(chrono::TimeDelta::MAX),
        }
    }

    /// The same, accepting event times up to `max_future` ahead of the wall clock.
    pub fn with_max_future(mut self, max_future: std::time::Duration) -> Enricher {
        self.max_future = chrono::TimeDelta::from_std(max_future).unwrap_or(chrono::TimeDelta::MAX);
        self
    }

    /// Parses and enriches one raw line of `format`. The error's text is the dead-letter
    /// reason (after the format's name).
    pub fn enrich(&self, raw: &[u8], format: &LogFormat) -> Result<Enriched, ParseError> {
        let mut json = Vec::new();
        let country = self.enrich_into(raw, format, None, &mut json)?;
        Ok(Enriched { country, json })
    }

    /// [`Enricher::enrich`] into `json` (cleared first), for a caller that reuses one buffer
    /// for every line (the producer copies the payload): no allocation per event. `source` is
    /// where the line was read (see [`PageView::source`]).
    pub fn enrich_into(
        &self,
        raw: &[u8],
        format: &LogFormat,
        source: Option<Source>,
        json: &mut Vec<u8>,
    ) -> Result<CountryCode, ParseError> {
        json.clear();
        let line = format.parse(raw)?;
        if chrono::Utc::now()
            .checked_add_signed(self.max_future)
            .is_some_and(|limit| line.time > limit)
        {
            return Err(ParseError::Future(
                rfc3339_seconds(line.time).as_str().to_owned(),
            ));
        }
        let ip = format.client_ip(&line.host, line.forwarded_for.as_deref());
        let country = self.geo.country_of(ip);
        let client = self.user_agents.classify(line.user_agent.as_deref());
        let stamp = rfc3339_seconds(line.time);
        let day = stamp.as_str().get(..10).unwrap_or("");
        let visitor = visitor_hex(visitor_id(
            ip,
            day,
            line.user_agent.as_deref().unwrap_or(""),
        ));
        let client_hex = visitor_hex(client_id(ip, line.user_agent.as_deref().unwrap_or("")));
        let view = PageView {
            time: Cow::Borrowed(stamp.as_str()),
            ip: bounded(ip),
            country_code: Cow::Borrowed(country.as_str()),
            browser: bounded(&client.browser),
            browser_version: bounded(&client.browser_version),
            os: bounded(&client.os),
            device: Cow::Borrowed(client.device),
            is_bot: client.is_bot,
            method: bounded_cow(line.method),
            path: bounded_cow(line.path),
            status: line.status,
            bytes: response_bytes(line.bytes),
            referrer: line.referrer.map(bounded_cow),
            vhost: line.vhost.map(bounded_cow),
            request_time_us: line.request_time_us.map(request_time_us),
            // Hex digits only.
            visitor: std::str::from_utf8(&visitor).ok().map(Cow::Borrowed),
            client: std::str::from_utf8(&client_hex).ok().map(Cow::Borrowed),
            source,
        };
        view.write_json(json);
        Ok(country)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn combined() -> LogFormat {
        LogFormat::combined()
    }

    #[test]
    fn enriches_to_the_documented_json() {
        let e = Enricher::new(GeoDb::bundled().unwrap());
        let line = br#"8.8.8.8 - - [10/Oct/2000:13:55:36 -0700] "GET /a?b=1 HTTP/1.1" 200 512 "https://ref.example/" "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)""#;
        let out = e.enrich(line, &combined()).unwrap();
        assert_eq!(out.country.as_str(), "US");
        assert_eq!(
            String::from_utf8(out.json).unwrap(),
            r#"{"time":"2000-10-10T20:55:36Z","ip":"8.8.8.8","country_code":"US","browser":"Googlebot","browser_version":"","os":"UNKNOWN","device":"bot","is_bot":true,"method":"GET","path":"/a?b=1","status":200,"bytes":512,"referrer":"https://ref.example/","visitor":"b77d20ad7e342e0c","client":"2c6127988844e6d9"}"#
        );
        // The client as visits know it: address and User-Agent, any day.
        assert_eq!(
            format!(
                "{:016x}",
                crate::event::client_id(
                    "8.8.8.8",
                    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
                )
            ),
            "2c6127988844e6d9"
        );
        // The visitor id: address, day and User-Agent as logged.
        assert_eq!(
            format!(
                "{:016x}",
                crate::event::visitor_id(
                    "8.8.8.8",
                    "2000-10-10",
                    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
                )
            ),
            "b77d20ad7e342e0c"
        );
        let json = e.enrich(line, &combined()).unwrap().json;
        let back: PageView<'_> = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.status, 200);
    }

    #[test]
    fn bad_lines_carry_a_reason() {
        let e = Enricher::new(GeoDb::bundled().unwrap());
        assert_eq!(
            e.enrich(b"\x00\x01\x02", &combined())
                .unwrap_err()
                .to_string(),
            "missing ident"
        );
        assert_eq!(
            e.enrich(b"\xc3\x28", &combined()).unwrap_err().to_string(),
            "invalid UTF-8 at byte 0"
        );
    }
}
