//! The message format between the stages, in one place: `PageView`, the structured event on
//! the `page-views` topic (written by preprocess, read by aggregate and any other consumer),
//! its `source`, the headers of raw lines and dead letters, and the raw line limit.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// One visit, as JSON on the events topic (keyed by `country_code`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageView<'a> {
    /// Request time, RFC 3339 in UTC (`2024-01-01T09:00:00Z`): event time for rules and buckets.
    #[serde(borrow)]
    pub time: Cow<'a, str>,
    /// Client address as logged.
    #[serde(borrow)]
    pub ip: Cow<'a, str>,
    /// ISO 3166-1 alpha-2, `ZZ` when unknown; also the message key.
    #[serde(borrow)]
    pub country_code: Cow<'a, str>,
    #[serde(borrow)]
    pub browser: Cow<'a, str>,
    #[serde(borrow)]
    pub browser_version: Cow<'a, str>,
    #[serde(borrow)]
    pub os: Cow<'a, str>,
    /// `desktop`, `mobile`, `tablet`, `bot`, `other` or `unknown`.
    #[serde(borrow)]
    pub device: Cow<'a, str>,
    pub is_bot: bool,
    #[serde(borrow)]
    pub method: Cow<'a, str>,
    #[serde(borrow)]
    pub path: Cow<'a, str>,
    pub status: u16,
    pub bytes: u64,
    /// `None` (JSON `null`) when the log had no referrer.
    #[serde(borrow)]
    pub referrer: Option<Cow<'a, str>>,
    /// The site (virtual host) that served the request, when the log format has it; absent
    /// from the JSON otherwise.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub vhost: Option<Cow<'a, str>>,
    /// Time taken to serve the request in microseconds, when the log format has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_time_us: Option<u64>,
    /// The visitor as GoAccess counts unique visitors (same client address, day and
    /// User-Agent), as [`visitor_id`] in 16 hex digits: the aggregator's unique-visitor
    /// sketches need the User-Agent, which the event does not carry otherwise.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub visitor: Option<Cow<'a, str>>,
    /// The visitor as visits count them (same client address and User-Agent, any day), as
    /// [`client_id`] in 16 hex digits; the aggregator stores only a salted hash of it.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub client: Option<Cow<'a, str>>,
    /// The raw line the event was made from, so that a replay of the same line (after a
    /// preprocessor crash) is recognised downstream; set by the preprocessor. Last, so the
    /// aggregator finds it without parsing the event ([`source_of_event`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// Where an event's line came from: partition and offset on the raw topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Source {
    pub partition: i32,
    pub offset: i64,
}

/// The `source` of an event's JSON. The preprocessor writes it as the event's last field, read
/// here from the end without parsing the rest (the aggregator does this for every event, and
/// otherwise reads only the key). In JSON text every quote inside a string is escaped, so an
/// event ending in `,"source":{"partition":P,"offset":O}}` can only end with the field itself.
/// Events written otherwise (another producer, another field order) are parsed in full.
pub fn source_of_event(json: &[u8]) -> Option<Source> {
    // `<number><tag>`, taken off the end of `rest`.
    fn number_before<'a, T: std::str::FromStr>(
        rest: &'a [u8],
        tag: &[u8],
    ) -> Option<(&'a [u8], T)> {
        let digits = rest
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_digit() || **b == b'-')
            .count();
        let (rest, number) = rest.split_at(rest.len() - digits);
        let value = std::str::from_utf8(number).ok()?.parse().ok()?;
        Some((rest.strip_suffix(tag)?, value))
    }
    let fast = || {
        let rest = json.strip_suffix(b"}}")?;
        let (rest, offset) = number_before(rest, b",\"offset\":")?;
        let (_, partition) = number_before(rest, b",\"source\":{\"partition\":")?;
        Some(Source { partition, offset })
    };
    fast().or_else(|| {
        #[derive(Deserialize)]
        struct Partial {
            source: Option<Source>,
        }
        serde_json::from_slice::<Partial>(json).ok()?.source
    })
}

impl PageView<'_> {
    /// The event as JSON, byte for byte what `serde_json::to_vec` writes, written directly:
    /// serde's serializer was a third of the preprocess core's time per line (issue 7's
    /// profile), most of it per-field machinery and escaping checks on text that has nothing
    /// to escape.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.reserve(320);
        out.extend_from_slice(b"{\"time\":");
        json_str(out, &self.time);
        out.extend_from_slice(b",\"ip\":");
        json_str(out, &self.ip);
        out.extend_from_slice(b",\"country_code\":");
        json_str(out, &self.country_code);
        out.extend_from_slice(b",\"browser\":");
        json_str(out, &self.browser);
        out.extend_from_slice(b",\"browser_version\":");
        json_str(out, &self.browser_version);
        out.extend_from_slice(b",\"os\":");
        json_str(out, &self.os);
        out.extend_from_slice(b",\"device\":");
        json_str(out, &self.device);
        out.extend_from_slice(if self.is_bot {
            b",\"is_bot\":true,\"method\":"
        } else {
            b",\"is_bot\":false,\"method\":"
        });
        json_str(out, &self.method);
        out.extend_from_slice(b",\"path\":");
        json_str(out, &self.path);
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.status).as_bytes());
        out.extend_from_slice(b",\"bytes\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.bytes).as_bytes());
        out.extend_from_slice(b",\"referrer\":");
        match &self.referrer {
            Some(r) => json_str(out, r),
            None => out.extend_from_slice(b"null"),
        }
        if let Some(v) = &self.vhost {
            out.extend_from_slice(b",\"vhost\":");
            json_str(out, v);
        }
        if let Some(t) = self.request_time_us {
            out.extend_from_slice(b",\"request_time_us\":");
            out.extend_from_slice(itoa::Buffer::new().format(t).as_bytes());
        }
        if let Some(v) = &self.visitor {
            out.extend_from_slice(b",\"visitor\":");
            json_str(out, v);
        }
        if let Some(v) = &self.client {
            out.extend_from_slice(b",\"client\":");
            json_str(out, v);
        }
        if let Some(source) = self.source {
            out.extend_from_slice(b",\"source\":{\"partition\":");
            out.extend_from_slice(itoa::Buffer::new().format(source.partition).as_bytes());
            out.extend_from_slice(b",\"offset\":");
            out.extend_from_slice(itoa::Buffer::new().format(source.offset).as_bytes());
            out.extend_from_slice(b"}");
        }
        out.push(b'}');
    }
}

/// The id of a visitor as GoAccess defines one: same client address, same day
/// (`YYYY-MM-DD`), same User-Agent. SipHash-1-3 with fixed keys: stable across versions and
/// machines, so sketches written by different processes and releases merge.
pub fn visitor_id(ip: &str, day: &str, user_agent: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x7061_6765_7669_6577, 0x7576_6973);
    for part in [ip, day, user_agent] {
        h.write(part.as_bytes());
        h.write_u8(0xff);
    }
    h.finish()
}

/// The client as visits know it: [`visitor_id`] without the day.
pub fn client_id(ip: &str, user_agent: &str) -> u64 {
    visitor_id(ip, "", user_agent)
}

/// [`visitor_id`] as the event writes it: 16 lower-case hex digits.
pub fn visitor_hex(id: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = HEX[((id >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// A JSON string, escaped as serde_json escapes (`\"`, `\\`, `\n`-style short forms and
/// `\u00XX` for other control characters); text without any of those is copied in one go.
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // The common case, checked without a branch per byte (the fold vectorizes).
    let control = bytes.iter().fold(false, |seen, &b| seen | (b < 0x20));
    if !control && memchr::memchr2(b'"', b'\\', bytes).is_none() {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// `2024-01-01T09:00:00Z`: RFC 3339 in UTC to the second, as the event's `time` (written by
/// hand: chrono's formatter was a tenth of the preprocess core's time per line).
pub fn rfc3339_seconds(t: chrono::DateTime<chrono::Utc>) -> Stamp {
    use chrono::{Datelike, Timelike};
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return Stamp::Other(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    }
    let mut b = *b"0000-00-00T00:00:00Z";
    let mut put = |at: usize, v: u32, width: usize| {
        let mut v = v;
        for i in (0..width).rev() {
            b[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, year as u32, 4);
    put(5, t.month(), 2);
    put(8, t.day(), 2);
    put(11, t.hour(), 2);
    put(14, t.minute(), 2);
    put(17, t.second().min(59), 2);
    Stamp::Short(b)
}

/// A formatted event time, on the stack for years 0–9999.
pub enum Stamp {
    Short([u8; 20]),
    Other(String),
}

impl Stamp {
    pub fn as_str(&self) -> &str {
        match self {
            // Digits and ASCII punctuation only.
            Stamp::Short(b) => std::str::from_utf8(b).unwrap_or("0000-00-00T00:00:00Z"),
            Stamp::Other(s) => s,
        }
    }
}

/// Longest raw line accepted. Longer lines are dead-lettered: the importer cuts them to this
/// size plus one byte and says so in [`headers::TRUNCATED`], so that no message ever exceeds the
/// broker's limit and the line is still counted downstream.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The value policy: every stage passes a string from a log line through [`bounded`] before
/// it becomes a key, a row or a label, and every number through the clamps below. Log lines
/// are written by strangers: without a bound one 3,500-byte path stopped a PostgreSQL flush
/// for good (a primary-key entry is at most 2,704 bytes there), and a byte count of 2^63
/// overflowed every sum it joined.
pub mod policy {
    use std::borrow::Cow;

    /// Longest value kept, in bytes of UTF-8 (the mark included): far above any real path
    /// or host a dashboard shows, far below PostgreSQL's index entry limit.
    pub const MAX_VALUE_BYTES: usize = 512;
    /// Ends a value that was cut to [`MAX_VALUE_BYTES`], so a reader sees it was cut.
    pub const CUT_MARK: &str = "…";
    /// Largest response size counted for one request (1 TiB); larger ones count as this.
    pub const MAX_RESPONSE_BYTES: u64 = 1 << 40;
    /// Longest request time counted (one day, in microseconds).
    pub const MAX_REQUEST_TIME_US: u64 = 86_400_000_000;

    /// `value` within the policy: control characters (C0, DEL, C1; NUL included) written as
    /// `\xNN` / `\u{NNNN}` escapes, then cut on a character boundary to at most
    /// [`MAX_VALUE_BYTES`] with [`CUT_MARK`] at the end. A value already within it (nearly
    /// every one) is returned as it is, without copying.
    pub fn bounded(value: &str) -> Cow<'_, str> {
        if value.len() <= MAX_VALUE_BYTES && !has_control(value) {
            return Cow::Borrowed(value);
        }
        use std::fmt::Write;
        let limit = MAX_VALUE_BYTES - CUT_MARK.len();
        let mut out = String::with_capacity(value.len().min(MAX_VALUE_BYTES));
        for c in value.chars() {
            let before = out.len();
            match c as u32 {
                n if c.is_control() && n < 0x100 => {
                    let _ = write!(out, "\\x{n:02x}");
                }
                n if c.is_control() => {
                    let _ = write!(out, "\\u{{{n:04x}}}");
                }
                _ => out.push(c),
            }
            if out.len() > limit {
                out.truncate(before);
                out.push_str(CUT_MARK);
                return Cow::Owned(out);
            }
        }
        Cow::Owned(out)
    }

    /// Whether `value` has a control character: C0 and DEL by a scan of the bytes (the
    /// common case), C1 (U+0080–U+009F, `0xC2 0x80–0x9F` in UTF-8) only where a `0xC2` is.
    fn has_control(value: &str) -> bool {
        value
            .bytes()
            .fold(false, |seen, b| seen | (b < 0x20) | (b == 0x7f))
            || (memchr::memchr(0xc2, value.as_bytes()).is_some()
                && value.chars().any(char::is_control))
    }

    /// [`bounded`] for an owned-or-borrowed value, keeping a borrow where nothing changes.
    pub fn bounded_cow(value: Cow<'_, str>) -> Cow<'_, str> {
        match value {
            Cow::Borrowed(v) => bounded(v),
            Cow::Owned(v) => match bounded(&v) {
                Cow::Borrowed(_) => Cow::Owned(v),
                Cow::Owned(b) => Cow::Owned(b),
            },
        }
    }

    /// A response size within [`MAX_RESPONSE_BYTES`].
    pub fn response_bytes(bytes: u64) -> u64 {
        bytes.min(MAX_RESPONSE_BYTES)
    }

    /// A request time within [`MAX_REQUEST_TIME_US`].
    pub fn request_time_us(us: u64) -> u64 {
        us.min(MAX_REQUEST_TIME_US)
    }
}

/// Message headers between the stages.
pub mod headers {
    /// On a dead letter: partition of the raw line on the raw topic (decimal text). Events
    /// carry their source in the JSON instead ([`super::PageView::source`]), and were read
    /// with these headers when written by earlier versions.
    pub const SOURCE_PARTITION: &str = "pv-source-partition";
    /// On a dead letter: offset of the raw line on the raw topic (decimal text).
    pub const SOURCE_OFFSET: &str = "pv-source-offset";
    /// On a dead letter: why the line could not be parsed.
    pub const REASON: &str = "pv-reason";
    /// On a dead letter that stands for raw lines the broker deleted (retention) before the
    /// preprocessors read them, instead of one line: how many (decimal text). Its source
    /// headers give the partition and the first offset lost.
    pub const LOST: &str = "pv-lost";
    /// Set by the importer when it cut an over-long line; the value is the original length.
    pub const TRUNCATED: &str = "pv-truncated-from";
    /// Set by the importer on every raw line: its log format ([`crate::format::FormatSpec`]).
    pub const FORMAT: &str = "pv-format";
}

/// The country of an event: its key, or its payload's `country_code` if the key is missing.
pub(crate) fn country_of(
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> crate::countries::CountryCode {
    if let Some(c) = key
        .and_then(|k| std::str::from_utf8(k).ok())
        .and_then(crate::countries::CountryCode::parse)
    {
        return c;
    }
    #[derive(serde::Deserialize)]
    struct Partial<'a> {
        #[serde(borrow)]
        country_code: &'a str,
    }
    payload
        .and_then(|p| serde_json::from_slice::<Partial<'_>>(p).ok())
        .and_then(|p| crate::countries::CountryCode::parse(p.country_code))
        .unwrap_or_else(|| {
            tracing::warn!("event without a valid country key; counted as ZZ");
            crate::countries::CountryCode::UNKNOWN
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(text: &'a str, referrer: Option<&'a str>, extra: bool) -> PageView<'a> {
        PageView {
            time: Cow::Borrowed("2024-01-01T09:00:00Z"),
            ip: Cow::Borrowed(text),
            country_code: Cow::Borrowed("ZZ"),
            browser: Cow::Borrowed(text),
            browser_version: Cow::Borrowed(""),
            os: Cow::Borrowed("Linux"),
            device: Cow::Borrowed("desktop"),
            is_bot: extra,
            method: Cow::Borrowed("GET"),
            path: Cow::Borrowed(text),
            status: 404,
            bytes: u64::MAX,
            referrer: referrer.map(Cow::Borrowed),
            vhost: extra.then_some(Cow::Borrowed(text)),
            request_time_us: extra.then_some(1234),
            visitor: extra.then_some(Cow::Borrowed("00ff00ff00ff00ff")),
            client: extra.then_some(Cow::Borrowed("0123456789abcdef")),
            source: extra.then_some(Source {
                partition: 7,
                offset: i64::MAX,
            }),
        }
    }

    #[test]
    fn visitor_ids_are_stable_and_written_in_hex() {
        let id = visitor_id("1.2.3.4", "2026-01-01", "curl/8");
        assert_eq!(id, visitor_id("1.2.3.4", "2026-01-01", "curl/8"));
        assert_ne!(id, visitor_id("1.2.3.5", "2026-01-01", "curl/8"));
        assert_ne!(id, visitor_id("1.2.3.4", "2026-01-02", "curl/8"));
        assert_ne!(id, visitor_id("1.2.3.4", "2026-01-01", "curl/9"));
        // Field boundaries count: ("ab", "c") is not ("a", "bc").
        assert_ne!(visitor_id("ab", "c", ""), visitor_id("a", "bc", ""));
        assert_eq!(&visitor_hex(0x0123_4567_89ab_cdef), b"0123456789abcdef");
        assert_eq!(
            u64::from_str_radix(std::str::from_utf8(&visitor_hex(id)).unwrap(), 16).unwrap(),
            id
        );
    }

    #[test]
    fn written_json_is_what_serde_writes() {
        for text in [
            "",
            "plain /a?b=1",
            "q\"uote\\back\nnl\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}",
            "é日本🎉</script>",
        ] {
            for (referrer, extra) in [(None, false), (Some(text), true)] {
                let v = view(text, referrer, extra);
                let mut ours = Vec::new();
                v.write_json(&mut ours);
                assert_eq!(
                    String::from_utf8(ours.clone()).unwrap(),
                    serde_json::to_string(&v).unwrap()
                );
                // And back: a reader gets the event that was written, source included.
                let back: PageView<'_> = serde_json::from_slice(&ours).unwrap();
                assert_eq!(back, v);
            }
        }
    }

    #[test]
    fn the_source_is_read_back_from_any_event() {
        for text in ["", "a,\"source\":{\"partition\":1,\"offset\":2}}", "\"}}"] {
            let mut json = Vec::new();
            view(text, Some(text), true).write_json(&mut json);
            let expected = Some(Source {
                partition: 7,
                offset: i64::MAX,
            });
            assert_eq!(
                source_of_event(&json),
                expected,
                "{}",
                String::from_utf8_lossy(&json)
            );
            json.clear();
            view(text, Some(text), false).write_json(&mut json);
            assert_eq!(source_of_event(&json), None);
        }
        // Another writer's field order, and spaces.
        let other = br#"{"source": {"offset": 5, "partition": 2}, "time": "x"}"#;
        assert_eq!(
            source_of_event(other),
            Some(Source {
                partition: 2,
                offset: 5
            })
        );
        assert_eq!(source_of_event(b"not json"), None);
        assert_eq!(source_of_event(br#"{"source":{"partition":-1}}"#), None);
    }

    #[test]
    fn time_is_rfc3339_to_the_second() {
        let t = chrono::DateTime::from_timestamp(1_700_000_000, 999_000_000).unwrap();
        assert_eq!(rfc3339_seconds(t).as_str(), "2023-11-14T22:13:20Z");
        assert_eq!(
            rfc3339_seconds(t).as_str(),
            t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        let early = chrono::DateTime::from_timestamp(-62_135_596_800, 0).unwrap();
        assert_eq!(rfc3339_seconds(early).as_str(), "0001-01-01T00:00:00Z");
        let far = chrono::DateTime::from_timestamp(253_402_300_800, 0).unwrap();
        assert_eq!(rfc3339_seconds(far).as_str(), "+10000-01-01T00:00:00Z");
    }

    #[test]
    fn values_are_bounded_and_control_free() {
        use policy::*;
        assert!(matches!(
            bounded("/index.html"),
            Cow::Borrowed("/index.html")
        ));
        assert_eq!(
            bounded("a\0b\x07c\x7f\u{85}d\tе"),
            "a\\x00b\\x07c\\x7f\\x85d\\x09е"
        );
        let long = "é".repeat(2000);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_VALUE_BYTES, "{}", cut.len());
        assert!(cut.ends_with(CUT_MARK));
        assert_eq!(
            cut.trim_end_matches(CUT_MARK),
            "é".repeat((MAX_VALUE_BYTES - 3) / 2)
        );
        let exact = "a".repeat(MAX_VALUE_BYTES);
        assert!(matches!(bounded(&exact), Cow::Borrowed(_)));
        let nul = "\0".repeat(60_000);
        let cut = bounded(&nul);
        assert!(cut.len() <= MAX_VALUE_BYTES && cut.starts_with("\\x00\\x00"));
        assert_eq!(response_bytes(1 << 63), MAX_RESPONSE_BYTES);
        assert_eq!(response_bytes(512), 512);
        assert_eq!(request_time_us(u64::MAX), MAX_REQUEST_TIME_US);
    }

    proptest::proptest! {
        #[test]
        fn written_json_matches_serde_for_any_text(text in "\\PC{0,40}|[\\x00-\\x7f]{0,40}") {
            let v = view(&text, Some(&text), true);
            let mut ours = Vec::new();
            v.write_json(&mut ours);
            proptest::prop_assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&v).unwrap());
        }

        #[test]
        fn any_text_is_bounded(text in "\\PC{0,700}|[\\x00-\\x7f]{0,900}|[\\x00-\\u{9f}]{0,300}") {
            let b = policy::bounded(&text);
            proptest::prop_assert!(b.len() <= policy::MAX_VALUE_BYTES);
            proptest::prop_assert!(!b.chars().any(char::is_control));
            if text.len() <= policy::MAX_VALUE_BYTES && !text.chars().any(char::is_control) {
                proptest::prop_assert_eq!(&*b, text.as_str());
            }
        }
    }
}
