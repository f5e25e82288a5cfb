//! The log format of each input: the one given with `--log-format`, or the one detected from
//! the input's first lines; it goes with every line as the `pv-format` header, so files of
//! different formats can share the raw topic and one preprocessor group. W3C directives
//! (`#Fields:` …) are read here and not sent: they change the field list that the following
//! lines carry.

use std::io::{self, BufReader};
use std::path::Path;

use crate::format::detect::{self, SAMPLE_LINES};
use crate::format::{ClientIp, FormatKind, FormatSpec, MAX_LINE_BYTES, Preset, w3c};

/// The log-format options, flattened into `import` and `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct FormatArgs {
    /// The inputs' log format: auto (detected per input from its first lines), a preset
    /// (COMBINED, VCOMBINED, COMMON, VCOMMON, W3C, CLOUDFRONT, CLOUDSTORAGE, AWSALB, AWSELB,
    /// AWSS3, SQUID, CADDY, TRAEFIKCLF), JSON, a GoAccess format string ('%h %^[%d:%t %^] "%r"
    /// %s %b') or an nginx log_format ('$remote_addr - $remote_user [$time_local] ...').
    #[arg(long, default_value = "auto")]
    pub log_format: String,
    /// With a GoAccess format string: how %d reads (GoAccess's --date-format).
    #[arg(long)]
    pub date_format: Option<String>,
    /// With a GoAccess format string: how %t reads (GoAccess's --time-format).
    #[arg(long)]
    pub time_format: Option<String>,
    /// With a GoAccess format string: how %x reads (GoAccess's --datetime-format; default
    /// %d/%b/%Y:%H:%M:%S %z).
    #[arg(long)]
    pub datetime_format: Option<String>,
    /// JSON logs: where a field is, FIELD=PATH (repeatable, or comma-separated), e.g.
    /// ip=request.remote_ip,time=ts. PATH is dot-separated keys; a|b tries a then b. Fields:
    /// ip, xff, time, method, path, query, request, status, bytes, referrer, user_agent, vhost,
    /// request_time (s), request_time_ms, request_time_us, request_time_ns.
    #[arg(long, value_name = "FIELD=PATH", value_delimiter = ',', value_parser = parse_json_field)]
    pub json_field: Vec<(String, String)>,
    /// Which address is the client's: host (the logged client address), xff (the first
    /// address of X-Forwarded-For), xff:N (the N-th from the left) or xff:-N (the N-th from
    /// the right: -1 is the one your own proxy added). Needs a format with an X-Forwarded-For
    /// field; falls back to the logged address when a line has none.
    #[arg(long, default_value = "host", value_parser = parse_client_ip)]
    pub client_ip: ClientIp,
}

fn parse_json_field(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .ok_or_else(|| format!("{text:?}: expected FIELD=PATH, e.g. ip=request.remote_ip"))
}

fn parse_client_ip(text: &str) -> Result<ClientIp, String> {
    ClientIp::parse(text).map_err(|e| e.to_string())
}

impl FormatArgs {
    /// The options, with the format string checked (a malformed one is the error).
    pub fn options(&self) -> Result<FormatOptions, crate::format::FormatError> {
        let format = if self.log_format.trim().eq_ignore_ascii_case("auto") {
            None
        } else {
            Some(FormatSpec::from_option(
                &self.log_format,
                self.date_format.as_deref(),
                self.time_format.as_deref(),
                self.datetime_format.as_deref(),
                &self.json_field,
            )?)
        };
        let mut options = FormatOptions {
            format,
            client_ip: self.client_ip,
            json_fields: self.json_field.clone(),
        };
        if let Some(spec) = &mut options.format {
            spec.client_ip = self.client_ip;
        }
        Ok(options)
    }
}

/// The format options of an import.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FormatOptions {
    /// `None`: auto-detect per input.
    pub format: Option<FormatSpec>,
    pub client_ip: ClientIp,
    /// `--json-field` overrides for a detected JSON format.
    pub json_fields: Vec<(String, String)>,
}

/// The format of the input being read, and its header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFormat {
    spec: FormatSpec,
    /// `None` for plain COMBINED, which goes unmarked (see [`InputFormat::header`]).
    header: Option<Vec<u8>>,
}

impl InputFormat {
    pub fn new(spec: FormatSpec) -> InputFormat {
        let header = Self::marking(&spec);
        InputFormat { spec, header }
    }

    fn marking(spec: &FormatSpec) -> Option<Vec<u8>> {
        (*spec != FormatSpec::preset(Preset::Combined)).then(|| spec.header())
    }

    /// The given format, or the one `sample` (the input's first lines) fits best; says which
    /// in the log.
    pub fn resolve(options: &FormatOptions, sample: &[Vec<u8>], input: &str) -> InputFormat {
        let mut spec = match &options.format {
            Some(spec) => spec.clone(),
            None => {
                let lines: Vec<&[u8]> = sample.iter().map(Vec::as_slice).collect();
                match detect::detect(&lines) {
                    Some(found) => {
                        tracing::info!(
                            input,
                            format = %found.spec,
                            parsed = found.parsed,
                            of = found.lines,
                            "log format detected (sample lines parsed)"
                        );
                        let mut spec = found.spec;
                        if let FormatKind::Json { fields } = &mut spec.kind {
                            fields.clone_from(&options.json_fields);
                        }
                        spec
                    }
                    None if sample.is_empty() => {
                        tracing::info!(
                            input,
                            "no lines to detect a log format from: reading it as COMBINED (use --log-format to choose)"
                        );
                        FormatSpec::preset(Preset::Combined)
                    }
                    None => {
                        tracing::warn!(
                            input,
                            "no known log format fits the first lines: reading them as COMBINED, lines that do not fit go to the dead-letter topic with the reason (use --log-format to choose)"
                        );
                        FormatSpec::preset(Preset::Combined)
                    }
                }
            }
        };
        spec.client_ip = options.client_ip;
        InputFormat::new(spec)
    }

    pub fn spec(&self) -> &FormatSpec {
        &self.spec
    }

    /// The `pv-format` header value for the next line; `None` for plain COMBINED (what a
    /// line without the header is, by definition of the raw topic's format). On
    /// the embedded broker's SQLite storage every header is a row of its own: a header on
    /// every line halved the import rate of the common case (`BENCH_ONLY=import`).
    pub fn header(&self) -> Option<&[u8]> {
        self.header.as_deref()
    }

    /// True when `line` is a W3C directive of a W3C input, which is taken here (a `#Fields:`
    /// line sets the field list of the lines after it) and not sent.
    pub fn directive(&mut self, line: &[u8]) -> bool {
        let w3c = matches!(
            self.spec.kind,
            FormatKind::Preset(Preset::W3c | Preset::Cloudfront)
        );
        if !w3c || !w3c::is_directive(line) {
            return false;
        }
        if let Some(fields) = w3c::fields_directive(line)
            && self.spec.w3c_fields.as_ref() != Some(&fields)
        {
            self.spec.w3c_fields = Some(fields);
            self.header = Self::marking(&self.spec);
        }
        true
    }
}

/// The first lines of a file (through gzip), for detection.
pub fn sample_file(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let file = super::open_maybe_gzip(path, &indicatif::ProgressBar::hidden())?;
    Ok(sample(&mut BufReader::new(file))?
        .into_iter()
        .map(|(line, _)| line)
        .collect())
}

/// Up to [`SAMPLE_LINES`] lines of `reader` (cut to size), each with its real length.
pub fn sample(reader: &mut impl io::BufRead) -> io::Result<Vec<(Vec<u8>, usize)>> {
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    while lines.len() < SAMPLE_LINES {
        match super::read_line_bounded(reader, &mut buf, MAX_LINE_BYTES + 1)? {
            Some(len) => lines.push((buf.clone(), len)),
            None => break,
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w3c_directives_change_the_header_and_are_not_sent() {
        let sample = vec![
            b"#Software: Microsoft Internet Information Services 10.0".to_vec(),
            b"#Fields: date time c-ip cs-uri-stem".to_vec(),
        ];
        let mut f = InputFormat::resolve(&FormatOptions::default(), &sample, "t.log");
        assert_eq!(
            String::from_utf8(f.header().unwrap().to_vec()).unwrap(),
            r#"{"kind":{"preset":"W3C"},"w3c_fields":"date time c-ip cs-uri-stem"}"#
        );
        assert!(f.directive(b"#Fields: date time c-ip cs-uri-stem sc-status"));
        assert_eq!(
            String::from_utf8(f.header().unwrap().to_vec()).unwrap(),
            r#"{"kind":{"preset":"W3C"},"w3c_fields":"date time c-ip cs-uri-stem sc-status"}"#
        );
        assert!(f.directive(b"#Date: 2024-01-01"));
        assert!(!f.directive(b"2024-01-01 00:00:00 1.2.3.4 /"));
        // Not a W3C input: a line starting with # is a line like any other.
        let mut c = InputFormat::new(FormatSpec::preset(Preset::Combined));
        assert!(!c.directive(b"#Fields: date"));
        assert_eq!(c.header(), None);
    }

    #[test]
    fn options_win_over_detection_and_client_ip_travels() {
        let options = FormatOptions {
            format: Some(FormatSpec::preset(Preset::Common)),
            client_ip: ClientIp::Forwarded(-1),
            json_fields: Vec::new(),
        };
        let f = InputFormat::resolve(&options, &[b"{}".to_vec()], "x");
        assert_eq!(
            String::from_utf8(f.header().unwrap().to_vec()).unwrap(),
            r#"{"kind":{"preset":"COMMON"},"client_ip":{"Forwarded":-1}}"#
        );
        let f = InputFormat::resolve(&FormatOptions::default(), &[b"garbage".to_vec()], "x");
        assert_eq!(f.header(), None);
    }
}
