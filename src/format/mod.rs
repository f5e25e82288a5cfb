//! Log formats: what a raw line means. Pure code, shared by the importer (which picks a format
//! per input and sends it with every line) and the preprocessor (which parses each line with
//! the format it came with).
//!
//! - [`FormatSpec`]: a format as a user names it (a GoAccess preset, a GoAccess or nginx format
//!   string, a JSON field mapping, a W3C field list) plus the client-address choice; it travels
//!   as the `pv-format` header of every raw message ([`FormatSpec::header`]).
//! - [`LogFormat`]: a spec compiled into a parser; [`LogFormat::parse`] turns a line into a
//!   [`LogLine`] or a [`ParseError`] whose text becomes the dead-letter reason.
//! - The parsers: [`clf`] (hand-written, for Common/Combined and their vhost variants: the
//!   common case, kept fast), [`pattern`] (GoAccess format strings, which the other presets and
//!   translated nginx `log_format`s are written in), [`w3c`] (`#Fields:`-driven), [`json`]
//!   (field mapping); [`time`] reads their timestamps; [`detect`] picks a preset from a file's
//!   first lines.

pub mod clf;
pub mod detect;
pub mod json;
pub mod nginx;
pub mod pattern;
pub mod time;
pub mod w3c;

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One parsed access-log line, whatever its format; fields borrow from the input where no
/// unescaping was needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine<'a> {
    /// The client address as logged (`%h`): an IP address, or a host name.
    pub host: Cow<'a, str>,
    /// The request time, converted to UTC.
    pub time: DateTime<Utc>,
    /// First word of the request line (`GET`); empty for a request line like `-`.
    pub method: Cow<'a, str>,
    /// The requested path with its query string (`/index.html?a=1`).
    pub path: Cow<'a, str>,
    /// The final status code; 0 when the format has none.
    pub status: u16,
    /// Response size in bytes, 0 for `-` or when the format has none.
    pub bytes: u64,
    /// `Referer` header, `None` when absent or `-`.
    pub referrer: Option<Cow<'a, str>>,
    /// `User-Agent` header, `None` when absent or `-`.
    pub user_agent: Option<Cow<'a, str>>,
    /// The virtual host (site) that served the request, when the format logs it.
    pub vhost: Option<Cow<'a, str>>,
    /// An `X-Forwarded-For` value (`client, proxy1, proxy2`), when the format logs it.
    pub forwarded_for: Option<Cow<'a, str>>,
    /// Time taken to serve the request, in microseconds, when the format logs it.
    pub request_time_us: Option<u64>,
}

/// Why a line does not fit its format. The `Display` text is the dead-letter reason (after
/// the format's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty line")]
    Empty,
    #[error("invalid UTF-8 at byte {0}")]
    InvalidUtf8(usize),
    #[error("line too long: {0} bytes")]
    TooLong(usize),
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("expected {expected:?} at byte {at}")]
    Expected { expected: char, at: usize },
    #[error("invalid timestamp {0:?}")]
    BadTime(String),
    #[error("invalid status {0:?}")]
    BadStatus(String),
    #[error("invalid byte count {0:?}")]
    BadBytes(String),
    #[error("not a JSON object: {0}")]
    BadJson(String),
    #[error("a W3C directive, not a request")]
    Directive,
    /// Further ahead of the wall clock than `--max-future` allows.
    #[error("timestamp in the future: {0}")]
    Future(String),
}

pub use crate::event::MAX_LINE_BYTES;

/// The raw line as text: length and UTF-8 checked, line end and blank lines refused.
pub fn line_text(raw: &[u8]) -> Result<&str, ParseError> {
    if raw.len() > MAX_LINE_BYTES {
        return Err(ParseError::TooLong(raw.len()));
    }
    let line = std::str::from_utf8(raw).map_err(|e| ParseError::InvalidUtf8(e.valid_up_to()))?;
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Err(ParseError::Empty);
    }
    Ok(line)
}

/// A malformed format given by the user: one line that points at the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("log format: {what} at column {column}: {text}")]
    At {
        what: String,
        /// 1-based character position in `text`.
        column: usize,
        text: String,
    },
    #[error("log format: {0}")]
    Invalid(String),
}

/// The predefined formats, named as GoAccess names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Preset {
    /// NCSA Combined (Apache `combined`, nginx's default).
    Combined,
    /// Combined with a `vhost:port` first field (Apache `vhost_combined`).
    Vcombined,
    /// NCSA Common (Apache `common`).
    Common,
    /// Common with a `vhost:port` first field.
    Vcommon,
    /// W3C extended (IIS and others), driven by the file's `#Fields:` directives.
    W3c,
    /// Amazon CloudFront standard logs (tab-separated W3C fields without the directives).
    Cloudfront,
    /// Google Cloud Storage usage logs (CSV).
    Cloudstorage,
    /// AWS Classic Load Balancer (and, as GoAccess reads it, Application Load Balancer lines).
    Awselb,
    /// AWS Application Load Balancer.
    Awsalb,
    /// Amazon S3 server access logs.
    Awss3,
    /// Squid native `access.log` (also with a syslog prefix, as GoAccess reads it).
    Squid,
    /// Caddy's JSON access log.
    Caddy,
    /// Traefik's CLF access log (Combined plus request count, router, server URL and duration).
    Traefikclf,
}

impl Preset {
    pub const ALL: [Preset; 13] = [
        Preset::Combined,
        Preset::Vcombined,
        Preset::Common,
        Preset::Vcommon,
        Preset::W3c,
        Preset::Cloudfront,
        Preset::Cloudstorage,
        Preset::Awsalb,
        Preset::Awselb,
        Preset::Awss3,
        Preset::Squid,
        Preset::Caddy,
        Preset::Traefikclf,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Combined => "COMBINED",
            Preset::Vcombined => "VCOMBINED",
            Preset::Common => "COMMON",
            Preset::Vcommon => "VCOMMON",
            Preset::W3c => "W3C",
            Preset::Cloudfront => "CLOUDFRONT",
            Preset::Cloudstorage => "CLOUDSTORAGE",
            Preset::Awselb => "AWSELB",
            Preset::Awsalb => "AWSALB",
            Preset::Awss3 => "AWSS3",
            Preset::Squid => "SQUID",
            Preset::Caddy => "CADDY",
            Preset::Traefikclf => "TRAEFIKCLF",
        }
    }

    pub fn from_name(name: &str) -> Option<Preset> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a format is, as the user gave it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FormatKind {
    Preset(Preset),
    /// A GoAccess `--log-format` string with its date, time and date-time formats.
    Goaccess {
        format: String,
        date: String,
        time: String,
        datetime: String,
    },
    /// An nginx `log_format` string (`$remote_addr - $remote_user [$time_local] …`).
    Nginx(String),
    /// JSON lines; `fields` overrides the default mapping ([`json::DEFAULT_FIELDS`]) per field.
    Json {
        fields: Vec<(String, String)>,
    },
}

/// Which address is the client's: the logged one, or one of an `X-Forwarded-For` list (behind
/// a load balancer or CDN the logged address is the proxy's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClientIp {
    /// The client address field (`%h`, `c-ip`, `$remote_addr`).
    #[default]
    Host,
    /// The N-th address of `X-Forwarded-For` counted from the left (1 = the original client
    /// as the first proxy saw it), or from the right when negative (-1 = the address the last
    /// proxy added: the one a trusted proxy vouches for). Falls back to the client address
    /// when the list is absent or shorter.
    Forwarded(i32),
}

impl ClientIp {
    /// `host`, `xff` (= `xff:1`), `xff:N` or `xff:-N`.
    pub fn parse(text: &str) -> Result<ClientIp, FormatError> {
        let bad = || {
            FormatError::Invalid(format!(
                "--client-ip {text:?}: expected host, xff, xff:N (N-th address of X-Forwarded-For from the left) or xff:-N (from the right)"
            ))
        };
        match text {
            "host" => Ok(ClientIp::Host),
            "xff" => Ok(ClientIp::Forwarded(1)),
            _ => {
                let n: i32 = text
                    .strip_prefix("xff:")
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(bad)?;
                if n == 0 {
                    return Err(bad());
                }
                Ok(ClientIp::Forwarded(n))
            }
        }
    }
}

/// A format as chosen for an input: travels with each raw message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FormatSpec {
    pub kind: FormatKind,
    /// W3C only: the field list of the last `#Fields:` directive (space-separated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub w3c_fields: Option<String>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub client_ip: ClientIp,
}

fn is_default(c: &ClientIp) -> bool {
    *c == ClientIp::Host
}

/// Raw message header carrying the line's [`FormatSpec`] (a preset name, or the spec as JSON).
/// A line without it is COMBINED: `pageviews import` leaves that common case unmarked, and
/// another producer writing to the raw topic sets the header for any other format.
pub const FORMAT_HEADER: &str = crate::event::headers::FORMAT;

impl FormatSpec {
    pub fn preset(p: Preset) -> FormatSpec {
        FormatSpec {
            kind: FormatKind::Preset(p),
            w3c_fields: None,
            client_ip: ClientIp::Host,
        }
    }

    /// The header value: a bare preset name when that says it all (the common case, short on
    /// every message), else the spec as JSON.
    pub fn header(&self) -> Vec<u8> {
        match (&self.kind, &self.w3c_fields, self.client_ip) {
            (FormatKind::Preset(p), None, ClientIp::Host) => p.name().as_bytes().to_vec(),
            _ => serde_json::to_vec(self).unwrap_or_default(),
        }
    }

    pub fn from_header(value: &[u8]) -> Result<FormatSpec, String> {
        if value.first() == Some(&b'{') {
            return serde_json::from_slice(value)
                .map_err(|e| format!("invalid format header: {e}"));
        }
        let name = std::str::from_utf8(value).map_err(|_| "invalid format header".to_owned())?;
        Preset::from_name(name)
            .map(FormatSpec::preset)
            .ok_or_else(|| format!("unknown format {name:?} in the format header"))
    }

    /// Reads a `--log-format` value: a preset name, a GoAccess format string (with the
    /// GoAccess date/time options), an nginx `log_format` string, or `JSON`. `auto` is handled
    /// by the caller.
    pub fn from_option(
        text: &str,
        date: Option<&str>,
        time: Option<&str>,
        datetime: Option<&str>,
        json_fields: &[(String, String)],
    ) -> Result<FormatSpec, FormatError> {
        let kind = if let Some(p) = Preset::from_name(text.trim()) {
            FormatKind::Preset(p)
        } else if text.trim().eq_ignore_ascii_case("json") {
            FormatKind::Json {
                fields: json_fields.to_vec(),
            }
        } else if nginx::looks_like_nginx(text) {
            FormatKind::Nginx(text.to_owned())
        } else if text.contains('%') {
            FormatKind::Goaccess {
                format: text.to_owned(),
                date: date.unwrap_or(pattern::DEFAULT_DATE).to_owned(),
                time: time.unwrap_or(pattern::DEFAULT_TIME).to_owned(),
                datetime: datetime.unwrap_or(pattern::DEFAULT_DATETIME).to_owned(),
            }
        } else {
            let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
            return Err(FormatError::Invalid(format!(
                "unknown log format {text:?}: expected auto, a preset ({}), JSON, a GoAccess format string (%h %^[%d:%t %^] \"%r\" …) or an nginx log_format ($remote_addr - $remote_user [$time_local] …)",
                names.join(", ")
            )));
        };
        if !json_fields.is_empty() && !matches!(kind, FormatKind::Json { .. }) {
            return Err(FormatError::Invalid(
                "--json-field goes with --log-format JSON (or auto)".to_owned(),
            ));
        }
        let spec = FormatSpec {
            kind,
            w3c_fields: None,
            client_ip: ClientIp::Host,
        };
        // Compile now, so a malformed format is reported before anything is imported.
        LogFormat::compile(&spec)?;
        Ok(spec)
    }
}

impl fmt::Display for FormatSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            FormatKind::Preset(p) => write!(f, "{p}")?,
            FormatKind::Goaccess { .. } => f.write_str("GoAccess format")?,
            FormatKind::Nginx(_) => f.write_str("nginx log_format")?,
            FormatKind::Json { .. } => f.write_str("JSON")?,
        }
        if let ClientIp::Forwarded(n) = self.client_ip {
            write!(f, " (client: X-Forwarded-For #{n})")?;
        }
        Ok(())
    }
}

/// How the lines of one format are parsed.
enum Parser {
    /// The hand-written Common/Combined parser; `vhost`: a `vhost[:port] ` field first.
    Clf {
        vhost: bool,
    },
    /// GoAccess-style patterns, tried in order (a preset may accept more than one layout).
    Patterns(Vec<pattern::Pattern>),
    W3c(w3c::W3cFields),
    Json(json::JsonMapping),
}

/// A compiled [`FormatSpec`].
pub struct LogFormat {
    /// Names the format in dead-letter reasons and logs.
    name: String,
    parser: Parser,
    client_ip: ClientIp,
}

impl LogFormat {
    pub fn compile(spec: &FormatSpec) -> Result<LogFormat, FormatError> {
        let patterns = |list: &[(&str, &str)]| -> Result<Parser, FormatError> {
            list.iter()
                .map(|(f, dt)| pattern::Pattern::compile_datetime(f, dt))
                .collect::<Result<Vec<_>, _>>()
                .map(Parser::Patterns)
        };
        let parser = match &spec.kind {
            FormatKind::Preset(p) => match p {
                Preset::Combined | Preset::Common => Parser::Clf { vhost: false },
                Preset::Vcombined | Preset::Vcommon => Parser::Clf { vhost: true },
                Preset::W3c => Parser::W3c(w3c::W3cFields::new(
                    spec.w3c_fields
                        .as_deref()
                        .unwrap_or(w3c::IIS_DEFAULT_FIELDS),
                )),
                Preset::Cloudfront => Parser::W3c(w3c::W3cFields::new(
                    spec.w3c_fields.as_deref().unwrap_or(w3c::CLOUDFRONT_FIELDS),
                )),
                Preset::Cloudstorage => patterns(&[(
                    r#""%x","%h",%^,%^,"%m","%U","%s",%^,"%b","%D","%v","%R","%u""#,
                    "%f",
                )])?,
                Preset::Awselb => patterns(&[
                    (
                        r#"%x.%^ %^ %h:%^ %^ %^ %T %^ %s %^ %^ %b "%r" "%u""#,
                        "%Y-%m-%dT%H:%M:%S",
                    ),
                    (ALB, "%Y-%m-%dT%H:%M:%S"),
                ])?,
                Preset::Awsalb => patterns(&[(ALB, "%Y-%m-%dT%H:%M:%S")])?,
                Preset::Awss3 => patterns(&[(
                    r#"%^ %v [%x] %h %^"%r" %s %^ %b %^ %L %^ "%R" "%u""#,
                    pattern::DEFAULT_DATETIME,
                )])?,
                Preset::Squid => patterns(&[
                    ("%x.%^ %~%L %h %^/%s %b %m %U", "%s"),
                    ("%^ %^ %^ %v %^: %x.%^ %~%L %h %^/%s %b %m %U", "%s"),
                ])?,
                Preset::Caddy => Parser::Json(json::JsonMapping::caddy()),
                Preset::Traefikclf => patterns(&[(
                    r#"%h - %^ [%x] "%r" %s %b "%R" "%u" %^ "%v" "%^" %Lms"#,
                    pattern::DEFAULT_DATETIME,
                )])?,
            },
            FormatKind::Goaccess {
                format,
                date,
                time,
                datetime,
            } => Parser::Patterns(vec![pattern::Pattern::compile(
                format, date, time, datetime,
            )?]),
            FormatKind::Nginx(text) => {
                let (format, datetime) = nginx::translate(text)?;
                Parser::Patterns(vec![pattern::Pattern::compile_datetime(
                    &format, &datetime,
                )?])
            }
            FormatKind::Json { fields } => Parser::Json(json::JsonMapping::with_overrides(fields)?),
        };
        Ok(LogFormat {
            name: spec.to_string(),
            parser,
            client_ip: spec.client_ip,
        })
    }

    /// COMBINED: the default, and what a raw line without a format header is.
    pub fn combined() -> LogFormat {
        LogFormat {
            name: Preset::Combined.name().to_owned(),
            parser: Parser::Clf { vhost: false },
            client_ip: ClientIp::Host,
        }
    }

    /// The format's name, as in dead-letter reasons.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Parses one raw line (without its trailing newline; a trailing `\r` is ignored).
    pub fn parse<'a>(&self, raw: &'a [u8]) -> Result<LogLine<'a>, ParseError> {
        let mut parsed = self.parse_fields(line_text(raw)?)?;
        absolute_url_to_path(&mut parsed);
        Ok(parsed)
    }

    fn parse_fields<'a>(&self, line: &'a str) -> Result<LogLine<'a>, ParseError> {
        match &self.parser {
            Parser::Clf { vhost: false } => clf::parse(line),
            Parser::Clf { vhost: true } => clf::parse_vhost(line),
            Parser::Patterns(list) => {
                let mut first_error = None;
                for p in list {
                    match p.parse(line) {
                        Ok(l) => return Ok(l),
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
                Err(first_error.unwrap_or(ParseError::Empty))
            }
            Parser::W3c(fields) => fields.parse(line),
            Parser::Json(mapping) => mapping.parse(line),
        }
    }

    /// The client's address, per `--client-ip`: `host` or an address of `forwarded_for`.
    pub fn client_ip<'s>(&self, host: &'s str, forwarded_for: Option<&'s str>) -> &'s str {
        let ClientIp::Forwarded(n) = self.client_ip else {
            return host;
        };
        let Some(list) = forwarded_for else {
            return host;
        };
        let addresses: Vec<&str> = list
            .split([',', ' ', '"'])
            .map(str::trim)
            .filter(|a| !a.is_empty() && *a != "-")
            .collect();
        let index = if n > 0 {
            usize::try_from(n - 1).ok()
        } else {
            usize::try_from(-n)
                .ok()
                .and_then(|k| addresses.len().checked_sub(k))
        };
        index
            .and_then(|i| addresses.get(i).copied())
            .unwrap_or(host)
    }
}

/// The compiled formats a preprocessor has met, by header value: a header is compiled once,
/// not per line. Bounded, because the header comes from the raw topic (any producer can write
/// there): past [`FormatCache::MAX`] distinct values it starts over.
pub struct FormatCache {
    /// For lines without a format header (COMBINED).
    default: std::sync::Arc<LogFormat>,
    known: std::collections::HashMap<Vec<u8>, Result<std::sync::Arc<LogFormat>, String>>,
}

impl FormatCache {
    pub const MAX: usize = 256;

    pub fn new(default: LogFormat) -> FormatCache {
        FormatCache {
            default: std::sync::Arc::new(default),
            known: std::collections::HashMap::new(),
        }
    }

    /// The format for a line with this header value (`None`: no header). An unusable header
    /// is the error, the dead-letter reason of the line.
    pub fn get(&mut self, header: Option<&[u8]>) -> Result<std::sync::Arc<LogFormat>, String> {
        let Some(value) = header else {
            return Ok(std::sync::Arc::clone(&self.default));
        };
        if let Some(known) = self.known.get(value) {
            return known.clone();
        }
        if self.known.len() >= Self::MAX {
            self.known.clear();
        }
        let compiled = FormatSpec::from_header(value).and_then(|spec| {
            LogFormat::compile(&spec)
                .map(std::sync::Arc::new)
                .map_err(|e| format!("unusable format header: {e}"))
        });
        self.known.insert(value.to_vec(), compiled.clone());
        compiled
    }
}

/// AWS Application Load Balancer (type, time, elb, client:port, target:port, three timings,
/// statuses, bytes, request, user agent, TLS, target group, trace id, domain name, …).
const ALB: &str = r#"%^ %x.%^ %^ %h:%^ %^ %^ %T %^ %s %^ %^ %b "%r" "%u" %^ %^ %^ "%^" "%v""#;

/// Proxies and load balancers (ALB, ELB, Squid) log absolute URLs (`https://site:443/a?b`):
/// the path is what follows the authority, and the site becomes the vhost if there is none.
fn absolute_url_to_path(line: &mut LogLine<'_>) {
    let (path, site) = {
        let p = line.path.as_ref();
        let Some(rest) = p
            .strip_prefix("http://")
            .or_else(|| p.strip_prefix("https://"))
        else {
            return;
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let host = match authority.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        };
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        let path = if path.starts_with('?') || path.is_empty() {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        (path, host.to_owned())
    };
    line.path = Cow::Owned(path);
    if line.vhost.is_none() && !site.is_empty() {
        line.vhost = Some(Cow::Owned(site));
    }
}

/// True when `host` is an IP address (what auto-detection rewards: a layout that puts an
/// address where the client should be).
pub fn is_ip(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok()
}

/// Splits `GET /path HTTP/1.1` into method and path, keeping unescaped text borrowed.
pub fn split_request(request: Cow<'_, str>) -> (Cow<'_, str>, Cow<'_, str>) {
    fn split(r: &str) -> (&str, &str) {
        let mut parts = r.splitn(3, ' ');
        let first = parts.next().unwrap_or("");
        match parts.next() {
            Some(path) => (first, path),
            None if first == "-" => ("", ""),
            None => ("", first),
        }
    }
    match request {
        Cow::Borrowed(r) => {
            let (m, p) = split(r);
            (Cow::Borrowed(m), Cow::Borrowed(p))
        }
        Cow::Owned(r) => {
            let (m, p) = split(&r);
            (Cow::Owned(m.to_owned()), Cow::Owned(p.to_owned()))
        }
    }
}

/// A status code (100–999); an absent field (`None`) is 0.
pub fn status_of(text: Option<&str>) -> Result<u16, ParseError> {
    let Some(s) = text else { return Ok(0) };
    s.parse::<u16>()
        .ok()
        .filter(|s| (100..=999).contains(s))
        .ok_or_else(|| ParseError::BadStatus(s.to_owned()))
}

/// A response size; an absent field (`None` or `-`) is 0.
pub fn bytes_of(text: Option<&str>) -> Result<u64, ParseError> {
    match text {
        None | Some("-") => Ok(0),
        Some(b) => b.parse().map_err(|_| ParseError::BadBytes(b.to_owned())),
    }
}

/// `None` for an absent value (`-` or empty).
pub fn present(v: Cow<'_, str>) -> Option<Cow<'_, str>> {
    (!v.is_empty() && v != "-").then_some(v)
}

#[cfg(test)]
mod tests;
