//! The Common and Combined Log Format parser (presets COMBINED, COMMON, VCOMBINED, VCOMMON).
//!
//! Pure code, no I/O. Tolerant the way mature analyzers are: IPv4/IPv6 or host names, `-` for
//! any field, `\"` inside quoted fields, missing referrer/user-agent (Common format), an
//! unterminated last quoted field, and extra trailing fields (nginx `$http_x_forwarded_for`).
//! What it cannot make sense of becomes a [`ParseError`] whose text goes to the dead-letter
//! topic, so a bad line is always explained, never dropped.

use std::borrow::Cow;

use chrono::{DateTime, NaiveDate, Utc};

use super::{LogLine, ParseError, bytes_of, present, split_request, status_of};

/// Parses a Common or Combined line (`line` already checked by [`super::line_text`]).
pub fn parse(line: &str) -> Result<LogLine<'_>, ParseError> {
    let mut c = Cursor { rest: line };
    let host = c.word().ok_or(ParseError::Missing("client address"))?;
    let _ident = c.word().ok_or(ParseError::Missing("ident"))?;
    let _user = c.word().ok_or(ParseError::Missing("user"))?;
    let time = c.bracketed().ok_or(ParseError::Missing("timestamp"))?;
    let time = parse_time(time).ok_or_else(|| ParseError::BadTime(time.to_owned()))?;
    let request = c.quoted().ok_or(ParseError::Missing("request line"))?;
    let status = c.word().ok_or(ParseError::Missing("status"))?;
    let status = status_of(Some(status))?;
    let bytes = bytes_of(c.word())?;
    let referrer = c.quoted().and_then(present);
    let user_agent = c.quoted().and_then(present);
    let (method, path) = split_request(request);
    Ok(LogLine {
        host: Cow::Borrowed(host),
        time,
        method,
        path,
        status,
        bytes,
        referrer,
        user_agent,
        vhost: None,
        forwarded_for: None,
        request_time_us: None,
    })
}

/// Parses a line of Apache's `vhost_combined`/`vhost_common` (`%v:%p ` before the Combined or
/// Common fields; the port is optional).
pub fn parse_vhost(line: &str) -> Result<LogLine<'_>, ParseError> {
    let line = line.trim_start_matches([' ', '\t']);
    let end = line
        .find([' ', '\t'])
        .ok_or(ParseError::Missing("client address"))?;
    let (site, rest) = line.split_at(end);
    // `host:port`, `[v6]:port` or a bare name.
    let site = match site.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => site,
    };
    let site = site.trim_start_matches('[').trim_end_matches(']');
    let mut parsed = parse(rest)?;
    parsed.vhost = present(Cow::Borrowed(site));
    Ok(parsed)
}

/// A forward-only reader over the fields of a line.
struct Cursor<'a> {
    rest: &'a str,
}

impl<'a> Cursor<'a> {
    fn skip_spaces(&mut self) {
        self.rest = self.rest.trim_start_matches([' ', '\t']);
    }

    /// A space-delimited word, `None` at the end of the line.
    fn word(&mut self) -> Option<&'a str> {
        self.skip_spaces();
        if self.rest.is_empty() {
            return None;
        }
        let end = memchr::memchr2(b' ', b'\t', self.rest.as_bytes()).unwrap_or(self.rest.len());
        let (w, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(w)
    }

    /// `[...]`; `None` if the next field is not bracketed or the bracket is never closed.
    fn bracketed(&mut self) -> Option<&'a str> {
        self.skip_spaces();
        let inner = self.rest.strip_prefix('[')?;
        let end = memchr::memchr(b']', inner.as_bytes())?;
        self.rest = &inner[end + 1..];
        Some(&inner[..end])
    }

    /// `"..."` with `\"` and `\\` unescaped. An unterminated quote runs to the end of the line
    /// (a truncated last field is still worth counting). `None` if the next field is not quoted.
    fn quoted(&mut self) -> Option<Cow<'a, str>> {
        self.skip_spaces();
        let inner = self.rest.strip_prefix('"')?;
        let (i, escaped) = super::pattern::quoted_end(inner);
        let field = &inner[..i];
        self.rest = inner.get(i + 1..).unwrap_or("");
        Some(if escaped {
            Cow::Owned(unescape(field))
        } else {
            Cow::Borrowed(field)
        })
    }
}

/// Undo the log writer's escaping of `"` and `\`; other escapes (`\xhh`) stay as written.
pub(crate) fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(ch) = chars.next() {
        if ch == '\\' {
            match chars.next() {
                Some(n @ ('"' | '\\')) => out.push(n),
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// `10/Oct/2000:13:55:36 -0700` → UTC. Hand-written: this runs for every line.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    if b.len() != 26 || b[2] != b'/' || b[6] != b'/' || b[11] != b':' || b[20] != b' ' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        s.get(r.clone())?.bytes().try_fold(0u32, |acc, d| {
            d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
        })
    };
    let day = num(0..2)?;
    let month = match s.get(3..6)? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year = num(7..11)?;
    let (h, m, sec) = (num(12..14)?, num(15..17)?, num(18..20)?);
    let sign = match b[21] {
        b'+' => 1i64,
        b'-' => -1,
        _ => return None,
    };
    let (oh, om) = (num(22..24)?, num(24..26)?);
    let local =
        NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?.and_hms_opt(h, m, sec)?;
    let offset = sign * (i64::from(oh) * 3600 + i64::from(om) * 60);
    let utc = local.and_utc() - chrono::TimeDelta::seconds(offset);
    Some(utc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{MAX_LINE_BYTES, line_text};

    fn parse_line(raw: &[u8]) -> Result<LogLine<'_>, ParseError> {
        parse(line_text(raw)?)
    }

    #[test]
    fn vhost_first() {
        let text = format!("www.example.com:443 {COMBINED}");
        let l = parse_vhost(&text).unwrap();
        assert_eq!(l.vhost.as_deref(), Some("www.example.com"));
        assert_eq!(l.host, "127.0.0.1");
        let text = format!("[2001:db8::2]:80 {COMBINED}");
        let l = parse_vhost(&text).unwrap();
        assert_eq!(l.vhost.as_deref(), Some("2001:db8::2"));
        let text = format!("site {COMBINED}");
        let l = parse_vhost(&text).unwrap();
        assert_eq!(l.vhost.as_deref(), Some("site"));
        assert_eq!(
            parse_vhost(COMBINED).unwrap_err(),
            ParseError::Missing("timestamp")
        );
    }

    const COMBINED: &str = r#"127.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif HTTP/1.0" 200 2326 "http://www.example.com/start.html" "Mozilla/4.08 [en] (Win98; I ;Nav)""#;

    #[test]
    fn combined_format() {
        let l = parse_line(COMBINED.as_bytes()).unwrap();
        assert_eq!(l.host, "127.0.0.1");
        assert_eq!(l.time.to_rfc3339(), "2000-10-10T20:55:36+00:00");
        assert_eq!(l.method, "GET");
        assert_eq!(l.path, "/apache_pb.gif");
        assert_eq!(l.status, 200);
        assert_eq!(l.bytes, 2326);
        assert_eq!(
            l.referrer.as_deref(),
            Some("http://www.example.com/start.html")
        );
        assert_eq!(
            l.user_agent.as_deref(),
            Some("Mozilla/4.08 [en] (Win98; I ;Nav)")
        );
    }

    #[test]
    fn common_format_ipv6_and_dashes() {
        let l = parse_line(
            b"2001:db8::1 - - [01/Jan/2024:00:00:00 +0000] \"POST /api HTTP/2.0\" 404 -",
        )
        .unwrap();
        assert_eq!(l.host, "2001:db8::1");
        assert_eq!(l.bytes, 0);
        assert_eq!(l.status, 404);
        assert_eq!(l.referrer, None);
        assert_eq!(l.user_agent, None);
    }

    #[test]
    fn escaped_quotes_and_unterminated_last_field() {
        let line = br#"10.0.0.1 - - [01/Jan/2024:10:00:00 +0100] "GET /a\"b HTTP/1.1" 200 5 "-" "Agent \"quoted\" \\ end"#;
        let l = parse_line(line).unwrap();
        assert_eq!(l.path, "/a\"b");
        assert_eq!(l.referrer, None);
        assert_eq!(l.user_agent.as_deref(), Some("Agent \"quoted\" \\ end"));
        assert_eq!(l.time.to_rfc3339(), "2024-01-01T09:00:00+00:00");
    }

    #[test]
    fn crlf_extra_fields_and_dash_request() {
        let l = parse_line(
            b"1.2.3.4 - - [01/Jan/2024:00:00:00 +0000] \"-\" 408 0 \"-\" \"-\" \"9.9.9.9\"\r",
        )
        .unwrap();
        assert_eq!(l.method, "");
        assert_eq!(l.path, "");
        assert_eq!(l.status, 408);
    }

    #[test]
    fn rejects_with_reasons() {
        assert_eq!(parse_line(b""), Err(ParseError::Empty));
        assert_eq!(
            parse_line(b"\xff\xfe garbage"),
            Err(ParseError::InvalidUtf8(0))
        );
        assert_eq!(
            parse_line(b"1.2.3.4 - - [10/Oct/2000:13:5"),
            Err(ParseError::Missing("timestamp"))
        );
        assert_eq!(
            parse_line(b"1.2.3.4 - - [10/Oct/2000:13:55:36 -0700] \"GET / HTT"),
            Err(ParseError::Missing("status"))
        );
        assert_eq!(
            parse_line(b"1.2.3.4 - - [99/Oct/2000:13:55:36 -0700] \"GET /\" 200 1"),
            Err(ParseError::BadTime("99/Oct/2000:13:55:36 -0700".into()))
        );
        assert_eq!(
            parse_line(b"1.2.3.4 - - [10/Oct/2000:13:55:36 -0700] \"GET /\" OK 1"),
            Err(ParseError::BadStatus("OK".into()))
        );
        assert_eq!(
            parse_line(&vec![b'a'; MAX_LINE_BYTES + 1]),
            Err(ParseError::TooLong(MAX_LINE_BYTES + 1))
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_line(&bytes);
        }

        #[test]
        fn never_panics_on_near_valid_lines(cut in 0usize..200, junk in "[ -~\\\\\"\\[\\]]{0,20}") {
            let mut line = COMBINED.as_bytes()[..cut.min(COMBINED.len())].to_vec();
            line.extend_from_slice(junk.as_bytes());
            let _ = parse_line(&line);
        }
    }
}
