//! W3C extended log format (IIS, CloudFront and others): space- or tab-separated fields whose
//! names come from the file's own `#Fields:` directive, which may change in the middle of a
//! file. The importer reads the directives and sends the current field list with every line.

use std::borrow::Cow;

use super::time::TimeFormat;
use super::{LogLine, ParseError, bytes_of, present, status_of};

/// IIS's default fields (also GoAccess's W3C preset): used until a `#Fields:` directive is seen.
pub const IIS_DEFAULT_FIELDS: &str = "date time s-ip cs-method cs-uri-stem cs-uri-query s-port cs-username c-ip cs(User-Agent) cs(Referer) sc-status sc-substatus sc-win32-status time-taken";

/// Amazon CloudFront standard log fields, in their documented order.
pub const CLOUDFRONT_FIELDS: &str = "date time x-edge-location sc-bytes c-ip cs-method cs(Host) cs-uri-stem sc-status cs(Referer) cs(User-Agent) cs-uri-query cs(Cookie) x-edge-result-type x-edge-request-id x-host-header cs-protocol cs-bytes time-taken x-forwarded-for ssl-protocol ssl-cipher x-edge-response-result-type cs-protocol-version fle-status fle-encrypted-fields c-port time-to-first-byte x-edge-detailed-result-type sc-content-type sc-content-len sc-range-start sc-range-end";

/// The field list of a `#Fields:` directive line, if `line` is one.
pub fn fields_directive(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?;
    let rest = text.strip_prefix("#Fields:")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    (!fields.is_empty()).then(|| fields.join(" "))
}

/// True for any directive line (`#Software:`, `#Version:`, `#Date:`, `#Fields:`, `#Remark:`).
pub fn is_directive(line: &[u8]) -> bool {
    line.first() == Some(&b'#')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Date,
    Time,
    Host,
    Method,
    Stem,
    Query,
    Status,
    Bytes,
    UserAgent,
    Referrer,
    /// With a priority: the viewer's `Host` header beats the server's own name.
    Vhost(u8),
    TimeTaken,
    ForwardedFor,
    Ignore,
}

fn field(name: &str) -> Field {
    match name.to_ascii_lowercase().as_str() {
        "date" => Field::Date,
        "time" => Field::Time,
        "c-ip" => Field::Host,
        "cs-method" => Field::Method,
        "cs-uri-stem" | "cs-uri" => Field::Stem,
        "cs-uri-query" => Field::Query,
        "sc-status" => Field::Status,
        "sc-bytes" => Field::Bytes,
        "cs(user-agent)" => Field::UserAgent,
        "cs(referer)" | "cs(referrer)" => Field::Referrer,
        "x-host-header" => Field::Vhost(3),
        "cs-host" => Field::Vhost(2),
        "cs(host)" => Field::Vhost(1),
        "s-sitename" => Field::Vhost(0),
        "time-taken" => Field::TimeTaken,
        "x-forwarded-for" | "cs(x-forwarded-for)" => Field::ForwardedFor,
        _ => Field::Ignore,
    }
}

/// A field list, compiled.
#[derive(Debug, Clone)]
pub struct W3cFields {
    fields: Vec<Field>,
}

impl W3cFields {
    pub fn new(list: &str) -> W3cFields {
        W3cFields {
            fields: list.split_whitespace().map(field).collect(),
        }
    }

    pub fn parse<'a>(&self, line: &'a str) -> Result<LogLine<'a>, ParseError> {
        if line.starts_with('#') {
            return Err(ParseError::Directive);
        }
        // CloudFront separates with tabs, IIS with single spaces (values never hold either).
        let separator = if line.contains('\t') { '\t' } else { ' ' };
        let (mut date, mut time, mut host, mut method, mut stem, mut query) =
            (None, None, None, None, None, None);
        let (mut status, mut bytes, mut ua, mut referrer, mut taken, mut xff) =
            (None, None, None, None, None, None);
        let mut vhost: Option<(u8, &str)> = None;
        // Values missing at the end are absent (CloudFront added fields over the years).
        for (f, value) in self.fields.iter().zip(line.split(separator)) {
            let slot = match f {
                Field::Date => &mut date,
                Field::Time => &mut time,
                Field::Host => &mut host,
                Field::Method => &mut method,
                Field::Stem => &mut stem,
                Field::Query => &mut query,
                Field::Status => &mut status,
                Field::Bytes => &mut bytes,
                Field::UserAgent => &mut ua,
                Field::Referrer => &mut referrer,
                Field::TimeTaken => &mut taken,
                Field::ForwardedFor => &mut xff,
                Field::Vhost(rank) => {
                    if value != "-" && !value.is_empty() && vhost.is_none_or(|(r, _)| r < *rank) {
                        vhost = Some((*rank, value));
                    }
                    continue;
                }
                Field::Ignore => continue,
            };
            *slot = Some(value);
        }
        let host = host
            .and_then(|h| present(Cow::Borrowed(h)))
            .ok_or(ParseError::Missing("client address (c-ip)"))?;
        let (date, time) = match (date, time) {
            (Some(d), Some(t)) => (d, t),
            _ => return Err(ParseError::Missing("timestamp (date and time)")),
        };
        let stamp = format!("{date} {time}");
        let at = TimeFormat::Iso
            .parse(&stamp)
            .ok_or(ParseError::BadTime(stamp))?;
        let mut path = stem
            .and_then(|p| present(Cow::Borrowed(p)))
            .ok_or(ParseError::Missing("request (cs-uri-stem)"))?;
        if let Some(q) = query.and_then(|q| present(Cow::Borrowed(q))) {
            path = Cow::Owned(format!("{path}?{q}"));
        }
        let status = status_of(status)?;
        let bytes = bytes_of(bytes)?;
        Ok(LogLine {
            host,
            time: at,
            method: Cow::Borrowed(method.filter(|m| *m != "-").unwrap_or("")),
            path,
            status,
            bytes,
            referrer: referrer.and_then(|r| present(Cow::Borrowed(r))),
            user_agent: ua.and_then(|u| present(decode(u))),
            vhost: vhost.map(|(_, v)| Cow::Borrowed(v)),
            forwarded_for: xff.and_then(|x| present(decode(x))),
            request_time_us: taken.and_then(time_taken_us),
        })
    }
}

/// IIS writes spaces in values as `+`; CloudFront percent-encodes (sometimes twice) and keeps
/// `+` as it is.
fn decode(value: &str) -> Cow<'_, str> {
    if !value.contains('%') {
        return if value.contains('+') {
            Cow::Owned(value.replace('+', " "))
        } else {
            Cow::Borrowed(value)
        };
    }
    let mut text = value.to_owned();
    for _ in 0..2 {
        if !text.contains('%') {
            break;
        }
        let bytes: Vec<u8> = percent_decode(text.as_bytes());
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    Cow::Owned(text)
}

fn percent_decode(b: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// `time-taken`: IIS logs whole milliseconds, CloudFront (and the W3C draft) decimal seconds.
fn time_taken_us(v: &str) -> Option<u64> {
    let n: f64 = v.parse().ok()?;
    let us = if v.contains('.') { n * 1e6 } else { n * 1e3 };
    (us.is_finite() && us >= 0.0).then(|| us.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iis_default_fields() {
        let f = W3cFields::new(IIS_DEFAULT_FIELDS);
        let l = f
            .parse("2024-01-01 00:00:01 10.0.0.5 GET /index.html - 80 - 203.0.113.9 Mozilla/5.0+(Windows+NT+10.0;+Win64;+x64) - 200 0 0 15")
            .unwrap();
        assert_eq!(l.host, "203.0.113.9");
        assert_eq!(l.path, "/index.html");
        assert_eq!(
            l.user_agent.as_deref(),
            Some("Mozilla/5.0 (Windows NT 10.0; Win64; x64)")
        );
        assert_eq!((l.status, l.request_time_us), (200, Some(15_000)));
        assert_eq!(f.parse("#Date: 2024").unwrap_err(), ParseError::Directive);
        assert_eq!(
            f.parse("2024-01-01 00:00:01 10.0.0.5 GET").unwrap_err(),
            ParseError::Missing("client address (c-ip)")
        );
    }

    #[test]
    fn cloudfront_tabs_and_encoding() {
        let f = W3cFields::new(CLOUDFRONT_FIELDS);
        let line = "2019-12-04\t21:02:31\tLAX1-C3\t392\t192.0.2.100\tGET\td111111abcdef8.cloudfront.net\t/index.html\t200\t-\tMozilla/5.0%2520(Windows%2520NT%252010.0)\t-\t-\tHit\tSOX4xwn4XV6Q4rgb7XiVGOHms_BGlTAC4KyHmureZmBNrjGdRLiNIQ==\twww.example.com\thttps\t23\t0.001\t-\tTLSv1.2\tECDHE-RSA-AES128-GCM-SHA256\tHit\tHTTP/2.0\t-\t-\t11040\t0.001\tHit\ttext/html\t78\t-\t-";
        let l = f.parse(line).unwrap();
        assert_eq!(l.host, "192.0.2.100");
        assert_eq!(l.vhost.as_deref(), Some("www.example.com"));
        assert_eq!(
            l.user_agent.as_deref(),
            Some("Mozilla/5.0 (Windows NT 10.0)")
        );
        assert_eq!(
            (l.status, l.bytes, l.request_time_us),
            (200, 392, Some(1000))
        );
        assert_eq!(l.time.to_rfc3339(), "2019-12-04T21:02:31+00:00");
    }

    #[test]
    fn directives() {
        assert_eq!(
            fields_directive(b"#Fields: date time  c-ip\r").as_deref(),
            Some("date time c-ip")
        );
        assert_eq!(fields_directive(b"#Version: 1.0"), None);
        assert!(is_directive(b"#Software: IIS"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(line in "\\PC{0,160}", fields in "[a-z() -]{0,80}") {
            let _ = W3cFields::new(&fields).parse(&line);
            let _ = W3cFields::new(IIS_DEFAULT_FIELDS).parse(&line);
            let _ = decode(&line);
        }
    }
}
