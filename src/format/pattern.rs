//! GoAccess format strings (`%h %^[%d:%t %^] "%r" %s %b "%R" "%u"`): the language of
//! GoAccess's `--log-format`, in which most presets and every translated nginx `log_format`
//! are written.
//!
//! Reading follows GoAccess: a field runs up to the first character of the literal text that
//! follows it in the format (its delimiter); a field followed by nothing runs to the next
//! space. Fields between double quotes may contain `\"`. Literal text must match, except that
//! a space matches any run of spaces and tabs.

use std::borrow::Cow;

use super::time::TimeFormat;
use super::{FormatError, LogLine, ParseError, bytes_of, clf, present, split_request, status_of};

/// GoAccess's defaults for `--date-format`, `--time-format` and `--datetime-format`.
pub const DEFAULT_DATE: &str = "%d/%b/%Y";
pub const DEFAULT_TIME: &str = "%H:%M:%S";
pub const DEFAULT_DATETIME: &str = "%d/%b/%Y:%H:%M:%S %z";

/// What a specifier reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Host,
    /// `~h{delims}`: an X-Forwarded-For list (the delimiters only matter to GoAccess).
    ForwardedFor,
    Date,
    Time,
    DateTime,
    Vhost,
    Request,
    Method,
    Path,
    Query,
    Status,
    Bytes,
    Referrer,
    UserAgent,
    Micros,
    Seconds,
    Millis,
    Nanos,
    /// `%^` and the specifiers pageviews reads but does not keep (`%e`, `%C`, `%H`, `%K`,
    /// `%k`, `%M`).
    Ignore,
}

impl Field {
    fn of(spec: char) -> Option<Field> {
        Some(match spec {
            'h' => Field::Host,
            'd' => Field::Date,
            't' => Field::Time,
            'x' => Field::DateTime,
            'v' => Field::Vhost,
            'r' => Field::Request,
            'm' => Field::Method,
            'U' => Field::Path,
            'q' => Field::Query,
            's' => Field::Status,
            'b' => Field::Bytes,
            'R' => Field::Referrer,
            'u' => Field::UserAgent,
            'D' => Field::Micros,
            'T' => Field::Seconds,
            'L' => Field::Millis,
            'n' => Field::Nanos,
            '^' | 'e' | 'C' | 'H' | 'K' | 'k' | 'M' => Field::Ignore,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Literal(String),
    Field(Field),
    /// `%~`: skip spaces.
    SkipSpaces,
}

/// A compiled format string.
#[derive(Debug, Clone)]
pub struct Pattern {
    items: Vec<Item>,
    time: TimeFormat,
}

impl Pattern {
    /// Compiles a GoAccess format with GoAccess's three date/time options: `%x` is read with
    /// `datetime`, `%d` and `%t` with `date` and `time`.
    pub fn compile(
        format: &str,
        date: &str,
        time: &str,
        datetime: &str,
    ) -> Result<Pattern, FormatError> {
        let items = compile_items(format)?;
        let time = if items.contains(&Item::Field(Field::DateTime)) {
            // GoAccess's `%x` takes the date and time formats when no date-time one is given.
            if datetime == DEFAULT_DATETIME && (date != DEFAULT_DATE || time != DEFAULT_TIME) {
                TimeFormat::from_date_and_time(date, time)
            } else {
                TimeFormat::new(datetime)
            }
        } else {
            TimeFormat::from_date_and_time(date, time)
        };
        Ok(Pattern { items, time })
    }

    /// Compiles a format whose time is one `%x` (or `%d` and `%t`) read with `datetime`.
    pub fn compile_datetime(format: &str, datetime: &str) -> Result<Pattern, FormatError> {
        Ok(Pattern {
            items: compile_items(format)?,
            time: TimeFormat::new(datetime),
        })
    }

    pub fn parse<'a>(&self, line: &'a str) -> Result<LogLine<'a>, ParseError> {
        let mut got = Captured::default();
        let bytes = line.as_bytes();
        let mut pos = 0;
        for (i, item) in self.items.iter().enumerate() {
            match item {
                Item::Literal(text) => {
                    for ch in text.chars() {
                        if ch == ' ' {
                            while pos < bytes.len() && matches!(bytes[pos], b' ' | b'\t') {
                                pos += 1;
                            }
                        } else if line[pos..].starts_with(ch) {
                            pos += ch.len_utf8();
                        } else {
                            return Err(ParseError::Expected {
                                expected: ch,
                                at: pos,
                            });
                        }
                    }
                }
                Item::SkipSpaces => {
                    while pos < bytes.len() && bytes[pos].is_ascii_whitespace() {
                        pos += 1;
                    }
                }
                Item::Field(field) => {
                    let delimiter = match self.items.get(i + 1) {
                        Some(Item::Literal(text)) => text.chars().next(),
                        _ => None,
                    };
                    let quoted = delimiter == Some('"')
                        && matches!(i.checked_sub(1).and_then(|p| self.items.get(p)),
                            Some(Item::Literal(t)) if t.ends_with('"'));
                    let rest = &line[pos..];
                    let (end, escaped) = match delimiter {
                        None | Some(' ') => (rest.find([' ', '\t']).unwrap_or(rest.len()), false),
                        Some('"') => quoted_end(rest),
                        Some(':') if *field == Field::Host => (host_end(rest), false),
                        Some(d) => (
                            rest.find(d).ok_or(ParseError::Expected {
                                expected: d,
                                at: line.len(),
                            })?,
                            false,
                        ),
                    };
                    let value = &rest[..end];
                    let value = if escaped && quoted {
                        Cow::Owned(clf::unescape(value))
                    } else {
                        Cow::Borrowed(value)
                    };
                    got.set(*field, value);
                    pos += end;
                }
            }
        }
        got.into_line(&self.time)
    }
}

/// Where a `"`-delimited field ends (an unescaped `"`, or the end of a truncated line), and
/// whether it holds escapes.
pub(crate) fn quoted_end(rest: &str) -> (usize, bool) {
    let b = rest.as_bytes();
    let (mut i, mut escaped) = (0, false);
    // memchr2 jumps to the next quote or backslash (this runs on every quoted field).
    while let Some(at) = memchr::memchr2(b'"', b'\\', &b[i..]) {
        i += at;
        if b[i] == b'"' {
            return (i, escaped);
        }
        if i + 1 >= b.len() {
            break;
        }
        escaped = true;
        i += 2;
    }
    (b.len(), escaped)
}

/// Where `%h` ends before `:port`: the last `:` of the word, so that an IPv6 address
/// (`2001:db8::1:443`) keeps its colons; `[v6]:port` ends at the bracket.
fn host_end(rest: &str) -> usize {
    let word = &rest[..rest.find([' ', '\t']).unwrap_or(rest.len())];
    if word.starts_with('[')
        && let Some(close) = word.find(']')
    {
        return close + 1;
    }
    word.rfind(':').unwrap_or(word.len())
}

fn compile_items(format: &str) -> Result<Vec<Item>, FormatError> {
    let at = |what: String, column: usize| FormatError::At {
        what,
        column,
        text: format.to_owned(),
    };
    let mut items: Vec<Item> = Vec::new();
    let mut literal = String::new();
    let chars: Vec<char> = format.chars().collect();
    let mut i = 0;
    let push_field = |items: &mut Vec<Item>, literal: &mut String, item: Item| {
        if !literal.is_empty() {
            items.push(Item::Literal(std::mem::take(literal)));
        }
        items.push(item);
    };
    while i < chars.len() {
        match chars[i] {
            '%' => {
                let Some(&spec) = chars.get(i + 1) else {
                    return Err(at("a lone % at the end".to_owned(), i + 1));
                };
                if spec == '%' {
                    literal.push('%');
                } else if spec == '~' {
                    push_field(&mut items, &mut literal, Item::SkipSpaces);
                } else {
                    let field = Field::of(spec)
                        .ok_or_else(|| at(format!("unknown specifier %{spec}"), i + 1))?;
                    if matches!(items.last(), Some(Item::Field(_))) && literal.is_empty() {
                        return Err(at(
                            format!(
                                "%{spec} follows another field with nothing between them (where would the first end?)"
                            ),
                            i + 1,
                        ));
                    }
                    push_field(&mut items, &mut literal, Item::Field(field));
                }
                i += 2;
            }
            '~' if chars.get(i + 1) == Some(&'h') => {
                // `~h{, }`: the delimiters of the list, which we split on commas and spaces.
                let mut j = i + 2;
                if chars.get(j) == Some(&'{') {
                    while j < chars.len() && chars[j] != '}' {
                        j += 1;
                    }
                    if j == chars.len() {
                        return Err(at("~h{ without its closing }".to_owned(), i + 1));
                    }
                    j += 1;
                }
                push_field(&mut items, &mut literal, Item::Field(Field::ForwardedFor));
                i = j;
            }
            '\\' if chars.get(i + 1) == Some(&'t') => {
                literal.push('\t');
                i += 2;
            }
            c => {
                literal.push(c);
                i += 1;
            }
        }
    }
    if !literal.is_empty() {
        items.push(Item::Literal(literal));
    }
    let has = |f: Field| items.contains(&Item::Field(f));
    if !has(Field::Host) && !has(Field::ForwardedFor) {
        return Err(FormatError::Invalid(format!(
            "{format:?} has no %h (client address)"
        )));
    }
    if !has(Field::DateTime) && !has(Field::Date) {
        return Err(FormatError::Invalid(format!(
            "{format:?} has no %d or %x (date)"
        )));
    }
    if !has(Field::Request) && !has(Field::Path) {
        return Err(FormatError::Invalid(format!(
            "{format:?} has no %r or %U (request)"
        )));
    }
    Ok(items)
}

/// What a line gave for each field (the first occurrence wins, as in GoAccess).
#[derive(Default)]
struct Captured<'a> {
    host: Option<Cow<'a, str>>,
    forwarded_for: Option<Cow<'a, str>>,
    date: Option<Cow<'a, str>>,
    time: Option<Cow<'a, str>>,
    datetime: Option<Cow<'a, str>>,
    vhost: Option<Cow<'a, str>>,
    request: Option<Cow<'a, str>>,
    method: Option<Cow<'a, str>>,
    path: Option<Cow<'a, str>>,
    query: Option<Cow<'a, str>>,
    status: Option<Cow<'a, str>>,
    bytes: Option<Cow<'a, str>>,
    referrer: Option<Cow<'a, str>>,
    user_agent: Option<Cow<'a, str>>,
    duration: Option<(Field, Cow<'a, str>)>,
}

impl<'a> Captured<'a> {
    fn set(&mut self, field: Field, value: Cow<'a, str>) {
        let slot = match field {
            Field::Host => &mut self.host,
            Field::ForwardedFor => &mut self.forwarded_for,
            Field::Date => &mut self.date,
            Field::Time => &mut self.time,
            Field::DateTime => &mut self.datetime,
            Field::Vhost => &mut self.vhost,
            Field::Request => &mut self.request,
            Field::Method => &mut self.method,
            Field::Path => &mut self.path,
            Field::Query => &mut self.query,
            Field::Status => &mut self.status,
            Field::Bytes => &mut self.bytes,
            Field::Referrer => &mut self.referrer,
            Field::UserAgent => &mut self.user_agent,
            Field::Micros | Field::Seconds | Field::Millis | Field::Nanos => {
                if self.duration.is_none() {
                    self.duration = Some((field, value));
                }
                return;
            }
            Field::Ignore => return,
        };
        if slot.is_none() {
            *slot = Some(value);
        }
    }

    fn into_line(self, format: &TimeFormat) -> Result<LogLine<'a>, ParseError> {
        let forwarded_for = self.forwarded_for.and_then(present);
        // A format with only `~h` takes the client from the list's first address.
        let host = match (self.host.and_then(present), &forwarded_for) {
            (Some(h), _) => h,
            (None, Some(list)) => match list {
                Cow::Borrowed(l) => Cow::Borrowed(first_address(l)),
                Cow::Owned(l) => Cow::Owned(first_address(l).to_owned()),
            },
            (None, None) => return Err(ParseError::Missing("client address")),
        };
        let time_text = match (self.datetime, self.date, self.time) {
            (Some(dt), _, _) => dt,
            (None, Some(d), Some(t)) => Cow::Owned(format!("{d} {t}")),
            (None, Some(d), None) => d,
            (None, None, _) => return Err(ParseError::Missing("timestamp")),
        };
        let time = format
            .parse(&time_text)
            .ok_or_else(|| ParseError::BadTime(time_text.into_owned()))?;
        let (mut method, mut path) = match self.request {
            Some(r) => split_request(r),
            None => (Cow::Borrowed(""), Cow::Borrowed("")),
        };
        if let Some(m) = self.method.and_then(present) {
            method = m;
        }
        if let Some(p) = self.path.and_then(present) {
            path = p;
        }
        if let Some(q) = self.query.and_then(present)
            && !path.contains('?')
        {
            path = Cow::Owned(format!("{path}?{q}"));
        }
        let status = status_of(self.status.as_deref())?;
        let bytes = bytes_of(self.bytes.and_then(present).as_deref())?;
        Ok(LogLine {
            host,
            time,
            method,
            path,
            status,
            bytes,
            referrer: self.referrer.and_then(present),
            user_agent: self.user_agent.and_then(present),
            vhost: self.vhost.and_then(present),
            forwarded_for,
            request_time_us: self.duration.and_then(|(unit, v)| duration_us(unit, &v)),
        })
    }
}

fn first_address(list: &str) -> &str {
    list.split([',', ' '])
        .find(|a| !a.is_empty())
        .unwrap_or(list)
}

/// A duration in `%D` (µs), `%T` (s), `%L` (ms) or `%n` (ns), decimals allowed, in µs.
fn duration_us(unit: Field, value: &str) -> Option<u64> {
    let v: f64 = value.trim().parse().ok()?;
    let us = match unit {
        Field::Micros => v,
        Field::Seconds => v * 1e6,
        Field::Millis => v * 1e3,
        Field::Nanos => v / 1e3,
        _ => return None,
    };
    (us.is_finite() && us >= 0.0).then(|| us.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn combined() -> Pattern {
        Pattern::compile(
            r#"%h %^[%d:%t %^] "%r" %s %b "%R" "%u""#,
            DEFAULT_DATE,
            DEFAULT_TIME,
            DEFAULT_DATETIME,
        )
        .unwrap()
    }

    #[test]
    fn goaccess_combined_string() {
        let l = combined()
            .parse(r#"1.2.3.4 - frank [10/Oct/2000:13:55:36 -0700] "GET /a\"b HTTP/1.1" 200 512 "-" "curl/8""#)
            .unwrap();
        assert_eq!(l.host, "1.2.3.4");
        // GoAccess's own COMBINED string skips the zone (`%^]`): the time is taken as UTC.
        assert_eq!(l.time.to_rfc3339(), "2000-10-10T13:55:36+00:00");
        assert_eq!((l.method.as_ref(), l.path.as_ref()), ("GET", "/a\"b"));
        assert_eq!((l.status, l.bytes), (200, 512));
        assert_eq!(l.referrer, None);
        assert_eq!(l.user_agent.as_deref(), Some("curl/8"));
    }

    #[test]
    fn separate_method_path_query_and_durations() {
        let p = Pattern::compile(
            "%d %t %^ %m %U %q %^ %^ %h %u %R %s %^ %^ %L",
            "%Y-%m-%d",
            "%H:%M:%S",
            DEFAULT_DATETIME,
        )
        .unwrap();
        let l = p
            .parse("2024-01-01 00:00:02 10.0.0.5 GET /missing q=1 80 - 198.51.100.7 curl/8.0 https://example.com/ 404 0 2 3")
            .unwrap();
        assert_eq!(l.host, "198.51.100.7");
        assert_eq!(l.path, "/missing?q=1");
        assert_eq!(l.status, 404);
        assert_eq!(l.request_time_us, Some(3000));
        assert_eq!(l.referrer.as_deref(), Some("https://example.com/"));
        assert_eq!(l.time.to_rfc3339(), "2024-01-01T00:00:02+00:00");
    }

    #[test]
    fn forwarded_for_and_ipv6_with_port() {
        let p = Pattern::compile_datetime(r#"%h:%^ [%x] "%r" %s %b "~h{, }""#, DEFAULT_DATETIME)
            .unwrap();
        let l = p
            .parse(r#"2001:db8::1:443 [01/Jan/2024:00:00:00 +0000] "GET / HTTP/1.1" 200 1 "203.0.113.1, 10.0.0.1""#)
            .unwrap();
        assert_eq!(l.host, "2001:db8::1");
        assert_eq!(l.forwarded_for.as_deref(), Some("203.0.113.1, 10.0.0.1"));
    }

    #[test]
    fn errors_point_at_the_specifier() {
        let e = Pattern::compile_datetime("%h %Z [%x] \"%r\"", DEFAULT_DATETIME).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"log format: unknown specifier %Z at column 4: %h %Z [%x] "%r""#
        );
        let e = Pattern::compile_datetime("%h%^ [%x] %r", DEFAULT_DATETIME).unwrap_err();
        assert_eq!(
            e.to_string(),
            "log format: %^ follows another field with nothing between them (where would the first end?) at column 3: %h%^ [%x] %r"
        );
        let e = Pattern::compile_datetime("%h [%x] %s", DEFAULT_DATETIME).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"log format: "%h [%x] %s" has no %r or %U (request)"#
        );
        let e = Pattern::compile_datetime("%h [%x] %r %", DEFAULT_DATETIME).unwrap_err();
        assert_eq!(
            e.to_string(),
            "log format: a lone % at the end at column 12: %h [%x] %r %"
        );
    }

    #[test]
    fn mismatches_are_reasons() {
        let p = combined();
        assert_eq!(
            p.parse("1.2.3.4 - - 10/Oct/2000").unwrap_err(),
            ParseError::Expected {
                expected: '[',
                at: 23
            }
        );
        assert_eq!(
            p.parse(r#"1.2.3.4 - - [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.1" OK 1 "-" "-""#)
                .unwrap_err(),
            ParseError::BadStatus("OK".into())
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(line in "\\PC{0,120}") {
            let _ = combined().parse(&line);
        }

        #[test]
        fn never_panics_on_near_valid_lines(cut in 0usize..120, junk in "[ -~\\\\\"\\[\\]]{0,20}") {
            let valid = r#"1.2.3.4 - frank [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.1" 200 512 "-" "curl/8""#;
            let mut line = valid[..cut.min(valid.len())].to_owned();
            line.push_str(&junk);
            let _ = combined().parse(&line);
        }
    }
}
