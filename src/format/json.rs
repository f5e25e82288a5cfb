//! JSON access logs (Caddy, Traefik, nginx `escape=json`, CDNs): one object per line, each
//! field found by a path (`request.headers.User-Agent`); a path may list alternatives
//! (`request.client_ip|request.remote_ip`), the first present wins; an array yields its first
//! element (Caddy logs headers as arrays).

use std::borrow::Cow;

use serde_json::Value;

use super::time::TimeFormat;
use super::{FormatError, LogLine, ParseError, bytes_of, split_request, status_of};

/// The fields a mapping can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Ip,
    ForwardedFor,
    Time,
    Method,
    Path,
    Query,
    Request,
    Status,
    Bytes,
    Referrer,
    UserAgent,
    Vhost,
    Seconds,
    Millis,
    Micros,
    Nanos,
}

const TARGETS: [(&str, Target); 16] = [
    ("ip", Target::Ip),
    ("xff", Target::ForwardedFor),
    ("time", Target::Time),
    ("method", Target::Method),
    ("path", Target::Path),
    ("query", Target::Query),
    ("request", Target::Request),
    ("status", Target::Status),
    ("bytes", Target::Bytes),
    ("referrer", Target::Referrer),
    ("user_agent", Target::UserAgent),
    ("vhost", Target::Vhost),
    ("request_time", Target::Seconds),
    ("request_time_ms", Target::Millis),
    ("request_time_us", Target::Micros),
    ("request_time_ns", Target::Nanos),
];

/// The default mapping: the names Caddy, Traefik and nginx JSON logs use (nginx's by its
/// variable names), so that most JSON logs need no `--json-field`.
pub const DEFAULT_FIELDS: [(&str, &str); 13] = [
    (
        "ip",
        "request.client_ip|request.remote_ip|remote_addr|ClientHost|client_ip|remote_ip|ip",
    ),
    (
        "xff",
        "request.headers.X-Forwarded-For|http_x_forwarded_for|request_X-Forwarded-For",
    ),
    (
        "time",
        "ts|time|timestamp|StartUTC|time_iso8601|time_local|@timestamp",
    ),
    (
        "method",
        "request.method|request_method|RequestMethod|method",
    ),
    ("path", "request.uri|request_uri|RequestPath|uri|path"),
    ("request", "request"),
    ("status", "status|DownstreamStatus|status_code"),
    (
        "bytes",
        "size|body_bytes_sent|bytes_sent|DownstreamContentSize|bytes",
    ),
    (
        "referrer",
        "request.headers.Referer|http_referer|request_Referer|referrer|referer",
    ),
    (
        "user_agent",
        "request.headers.User-Agent|http_user_agent|request_User-Agent|user_agent",
    ),
    ("vhost", "request.host|host|RequestHost|server_name"),
    ("request_time", "duration|request_time"),
    ("request_time_ns", "Duration"),
];

/// Caddy's fields (`CADDY`): the default mapping is a superset, but the preset names the
/// format in reasons and logs as GoAccess does.
const CADDY_FIELDS: [(&str, &str); 10] = [
    ("ip", "request.client_ip|request.remote_ip"),
    ("xff", "request.headers.X-Forwarded-For"),
    ("time", "ts"),
    ("method", "request.method"),
    ("path", "request.uri"),
    ("status", "status"),
    ("bytes", "size"),
    ("referrer", "request.headers.Referer"),
    ("user_agent", "request.headers.User-Agent"),
    ("vhost", "request.host"),
];

/// A compiled mapping: per target, the alternative paths (each a list of keys).
#[derive(Debug, Clone)]
pub struct JsonMapping {
    fields: Vec<(Target, Vec<Vec<String>>)>,
}

impl JsonMapping {
    pub fn caddy() -> JsonMapping {
        let mut m = Self::build(&CADDY_FIELDS).unwrap_or(JsonMapping { fields: Vec::new() });
        m.fields
            .push((Target::Seconds, vec![vec!["duration".to_owned()]]));
        m
    }

    /// The default mapping with the user's `--json-field` entries in place of the defaults
    /// for the fields they name.
    pub fn with_overrides(overrides: &[(String, String)]) -> Result<JsonMapping, FormatError> {
        let mut pairs: Vec<(&str, &str)> = DEFAULT_FIELDS
            .iter()
            .filter(|(name, _)| !overrides.iter().any(|(o, _)| o == name))
            .copied()
            .collect();
        pairs.extend(overrides.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        Self::build(&pairs)
    }

    fn build(pairs: &[(&str, &str)]) -> Result<JsonMapping, FormatError> {
        let mut fields = Vec::new();
        for (name, paths) in pairs {
            let target = TARGETS
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| *t)
                .ok_or_else(|| {
                    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
                    FormatError::Invalid(format!(
                        "--json-field {name}=…: unknown field {name:?} (known: {})",
                        names.join(", ")
                    ))
                })?;
            let alternatives: Vec<Vec<String>> = paths
                .split('|')
                .map(|p| p.split('.').map(str::to_owned).collect::<Vec<_>>())
                .collect();
            if alternatives.iter().flatten().any(String::is_empty) {
                return Err(FormatError::Invalid(format!(
                    "--json-field {name}={paths}: an empty key in the path"
                )));
            }
            fields.push((target, alternatives));
        }
        Ok(JsonMapping { fields })
    }

    pub fn parse<'a>(&self, line: &'a str) -> Result<LogLine<'a>, ParseError> {
        let doc: Value =
            serde_json::from_str(line).map_err(|e| ParseError::BadJson(e.to_string()))?;
        if !doc.is_object() {
            return Err(ParseError::BadJson(
                "a JSON value, not an object".to_owned(),
            ));
        }
        let get = |target: Target| -> Option<&Value> {
            let (_, alternatives) = self.fields.iter().find(|(t, _)| *t == target)?;
            alternatives.iter().find_map(|path| lookup(&doc, path))
        };
        let text = |target: Target| -> Option<String> {
            match get(target)? {
                Value::String(s) if s.is_empty() || s == "-" => None,
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            }
        };
        let host = text(Target::Ip).ok_or(ParseError::Missing("client address"))?;
        let time = match get(Target::Time) {
            Some(Value::Number(n)) => epoch_text(&n.to_string()),
            Some(Value::String(s)) => parse_time_text(s),
            _ => return Err(ParseError::Missing("timestamp")),
        }
        .ok_or_else(|| {
            ParseError::BadTime(get(Target::Time).map(Value::to_string).unwrap_or_default())
        })?;
        let (mut method, mut path) = match text(Target::Request) {
            Some(r) => {
                let (m, p) = split_request(Cow::Owned(r));
                (m.into_owned(), p.into_owned())
            }
            None => (String::new(), String::new()),
        };
        if let Some(m) = text(Target::Method) {
            method = m;
        }
        if let Some(p) = text(Target::Path) {
            path = p;
        }
        if path.is_empty() {
            return Err(ParseError::Missing("request"));
        }
        if let Some(q) = text(Target::Query)
            && !path.contains('?')
        {
            path = format!("{path}?{q}");
        }
        let status = status_of(text(Target::Status).as_deref())?;
        let bytes = bytes_of(text(Target::Bytes).as_deref())?;
        let request_time_us = [
            (Target::Seconds, 1e6),
            (Target::Millis, 1e3),
            (Target::Micros, 1.0),
            (Target::Nanos, 1e-3),
        ]
        .into_iter()
        .find_map(|(t, scale)| {
            let v: f64 = text(t)?.parse().ok()?;
            let us = v * scale;
            (us.is_finite() && us >= 0.0).then(|| us.round() as u64)
        });
        Ok(LogLine {
            host: Cow::Owned(host),
            time,
            method: Cow::Owned(method),
            path: Cow::Owned(path),
            status,
            bytes,
            referrer: text(Target::Referrer).map(Cow::Owned),
            user_agent: text(Target::UserAgent).map(Cow::Owned),
            vhost: text(Target::Vhost).map(Cow::Owned),
            forwarded_for: text(Target::ForwardedFor).map(Cow::Owned),
            request_time_us,
        })
    }
}

/// Follows `path` from `doc`; an array on the way (or at the end) stands for its first element.
fn lookup<'v>(doc: &'v Value, path: &[String]) -> Option<&'v Value> {
    let mut v = doc;
    for key in path {
        v = first(v);
        v = match v {
            Value::Object(map) => map.get(key)?,
            Value::Array(items) => items.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    let v = first(v);
    (!v.is_null()).then_some(v)
}

fn first(v: &Value) -> &Value {
    match v {
        Value::Array(items) => items.first().unwrap_or(v),
        _ => v,
    }
}

/// An epoch number in seconds, milliseconds, microseconds or nanoseconds, told apart by size
/// (any of them for a date between 1973 and 5138).
fn epoch_guess(n: f64) -> Option<chrono::DateTime<chrono::Utc>> {
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let seconds = if n < 1e11 {
        n
    } else if n < 1e14 {
        n / 1e3
    } else if n < 1e17 {
        n / 1e6
    } else {
        n / 1e9
    };
    let whole = seconds.floor();
    let nanos = ((seconds - whole) * 1e9).round() as u32;
    chrono::DateTime::from_timestamp(whole as i64, nanos.min(999_999_999))
}

/// A timestamp string: RFC 3339, nginx's `time_local`, ISO without a zone, or an epoch number.
fn parse_time_text(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    TimeFormat::Rfc3339
        .parse(s)
        .or_else(|| TimeFormat::Clf.parse(s))
        .or_else(|| TimeFormat::Iso.parse(s))
        .or_else(|| epoch_text(s))
}

/// An epoch number as text, read exactly (a float would blur Caddy's `1646861401.5241024`),
/// its unit told by the number of integer digits as in [`epoch_guess`].
fn epoch_text(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let digits = s.split('.').next()?.len();
    let unit = match digits {
        0..=11 => TimeFormat::EpochSeconds,
        12..=14 => TimeFormat::EpochMillis,
        15..=17 => TimeFormat::EpochMicros,
        _ => return s.parse::<f64>().ok().and_then(epoch_guess),
    };
    unit.parse(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CADDY: &str = r#"{"level":"info","ts":1646861401.5241024,"logger":"http.log.access","msg":"handled request","request":{"remote_ip":"127.0.0.1","remote_port":"41342","client_ip":"203.0.113.7","proto":"HTTP/2.0","method":"GET","host":"example.com","uri":"/?x=1","headers":{"User-Agent":["curl/7.82.0"],"Accept":["*/*"]}},"bytes_read":0,"duration":0.000929675,"size":10900,"status":200,"resp_headers":{"Server":["Caddy"]}}"#;

    #[test]
    fn caddy() {
        let l = JsonMapping::caddy().parse(CADDY).unwrap();
        assert_eq!(l.host, "203.0.113.7");
        assert_eq!(l.time.to_rfc3339(), "2022-03-09T21:30:01.524102400+00:00");
        assert_eq!((l.method.as_ref(), l.path.as_ref()), ("GET", "/?x=1"));
        assert_eq!((l.status, l.bytes), (200, 10900));
        assert_eq!(l.user_agent.as_deref(), Some("curl/7.82.0"));
        assert_eq!(l.referrer, None);
        assert_eq!(l.vhost.as_deref(), Some("example.com"));
        assert_eq!(l.request_time_us, Some(930));
    }

    #[test]
    fn nginx_json_by_default_and_overrides() {
        let line = r#"{"remote_addr":"198.51.100.4","time_local":"10/Oct/2000:13:55:36 -0700","request":"POST /login HTTP/1.1","status":"302","body_bytes_sent":"0","http_referer":"-","http_user_agent":"Mozilla/5.0","request_time":"0.012"}"#;
        let l = JsonMapping::with_overrides(&[])
            .unwrap()
            .parse(line)
            .unwrap();
        assert_eq!(l.host, "198.51.100.4");
        assert_eq!(l.time.to_rfc3339(), "2000-10-10T20:55:36+00:00");
        assert_eq!((l.method.as_ref(), l.path.as_ref()), ("POST", "/login"));
        assert_eq!((l.status, l.bytes), (302, 0));
        assert_eq!(l.referrer, None);
        assert_eq!(l.request_time_us, Some(12_000));
        let m = JsonMapping::with_overrides(&[("ip".into(), "client.addr".into())]).unwrap();
        let l = m
            .parse(r#"{"client":{"addr":"192.0.2.1"},"time":"2024-01-01T00:00:00Z","path":"/","status":200}"#)
            .unwrap();
        assert_eq!(l.host, "192.0.2.1");
        let e = JsonMapping::with_overrides(&[("colour".into(), "x".into())]).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "log format: --json-field colour=…: unknown field \"colour\" (known: ip, xff, time,"
            ),
            "{e}"
        );
    }

    #[test]
    fn reasons() {
        let m = JsonMapping::caddy();
        assert_eq!(
            m.parse("[1,2]").unwrap_err(),
            ParseError::BadJson("a JSON value, not an object".into())
        );
        assert!(matches!(
            m.parse("{\"ts\":").unwrap_err(),
            ParseError::BadJson(_)
        ));
        assert_eq!(
            m.parse(r#"{"ts":1}"#).unwrap_err(),
            ParseError::Missing("client address")
        );
        assert_eq!(
            m.parse(r#"{"ts":"soon","request":{"remote_ip":"1.2.3.4"}}"#)
                .unwrap_err(),
            ParseError::BadTime("\"soon\"".into())
        );
    }

    #[test]
    fn epochs_by_size() {
        let s = |n: f64| epoch_guess(n).map(|t| t.to_rfc3339()).unwrap_or_default();
        assert_eq!(s(1_700_000_000.0), "2023-11-14T22:13:20+00:00");
        assert_eq!(s(1_700_000_000_000.0), "2023-11-14T22:13:20+00:00");
        assert_eq!(s(1_700_000_000_000_000.0), "2023-11-14T22:13:20+00:00");
        assert_eq!(s(1_700_000_000_000_000_000.0), "2023-11-14T22:13:20+00:00");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(line in "\\PC{0,120}") {
            let _ = JsonMapping::caddy().parse(&line);
        }

        #[test]
        fn never_panics_on_near_valid_lines(cut in 0usize..400, junk in "[ -~]{0,20}") {
            let mut line: String = CADDY.chars().take(cut).collect();
            line.push_str(&junk);
            let _ = JsonMapping::with_overrides(&[]).unwrap().parse(&line);
        }
    }
}
