//! Timestamps as formats write them: strftime-style date/time formats as GoAccess takes them
//! (`%d/%b/%Y:%H:%M:%S %z`, `%Y-%m-%d`, `%H:%M:%S`), GoAccess's epoch forms (`%s` seconds,
//! `%*` milliseconds, `%f` microseconds) and RFC 3339. The forms real logs use most are
//! read by hand; anything else goes through chrono's strftime parser.

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeDelta, Utc};

use super::clf;

/// A compiled date-time format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeFormat {
    /// `%d/%b/%Y:%H:%M:%S %z` (Apache/nginx `time_local`).
    Clf,
    /// `%Y-%m-%d %H:%M:%S` or `%Y-%m-%dT%H:%M:%S`, with optional fraction and `Z`, taken as UTC.
    Iso,
    /// Seconds since the epoch, optionally with a fraction (`1646861401.524`).
    EpochSeconds,
    EpochMillis,
    EpochMicros,
    /// RFC 3339 / ISO 8601 with a zone (`2024-01-01T09:00:00+01:00`).
    Rfc3339,
    /// Anything else, through chrono; `zoned` when it has `%z` (otherwise the time is UTC).
    Strftime {
        format: String,
        zoned: bool,
    },
}

impl TimeFormat {
    pub fn new(format: &str) -> TimeFormat {
        match format {
            "%d/%b/%Y:%H:%M:%S %z" => TimeFormat::Clf,
            "%Y-%m-%d %H:%M:%S" | "%Y-%m-%dT%H:%M:%S" | "%Y-%m-%d %T" | "%F %T" => TimeFormat::Iso,
            "%s" => TimeFormat::EpochSeconds,
            "%*" => TimeFormat::EpochMillis,
            "%f" => TimeFormat::EpochMicros,
            "%Y-%m-%dT%H:%M:%S%:z" | "%Y-%m-%dT%H:%M:%S%z" => TimeFormat::Rfc3339,
            _ => TimeFormat::Strftime {
                format: format.to_owned(),
                zoned: format.contains("%z") || format.contains("%:z"),
            },
        }
    }

    /// The date and time formats of a GoAccess setup joined, as they are joined in the line
    /// (`%d` and `%t` are read separately and glued with a space).
    pub fn from_date_and_time(date: &str, time: &str) -> TimeFormat {
        match (date, time) {
            ("%s", _) | (_, "%s") => TimeFormat::EpochSeconds,
            ("%*", _) | (_, "%*") => TimeFormat::EpochMillis,
            ("%f", _) | (_, "%f") => TimeFormat::EpochMicros,
            _ => TimeFormat::new(&format!("{date} {time}")),
        }
    }

    pub fn parse(&self, s: &str) -> Option<DateTime<Utc>> {
        let s = s.trim();
        match self {
            TimeFormat::Clf => clf::parse_time(s),
            TimeFormat::Iso => parse_iso(s),
            TimeFormat::EpochSeconds => epoch(s, 1_000_000_000),
            TimeFormat::EpochMillis => epoch(s, 1_000_000),
            TimeFormat::EpochMicros => epoch(s, 1_000),
            TimeFormat::Rfc3339 => DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
            TimeFormat::Strftime { format, zoned } => {
                if *zoned {
                    return DateTime::parse_from_str(s, format)
                        .ok()
                        .map(|t| t.with_timezone(&Utc));
                }
                NaiveDateTime::parse_from_str(s, format)
                    .ok()
                    .or_else(|| {
                        NaiveDate::parse_from_str(s, format)
                            .ok()
                            .and_then(|d| d.and_hms_opt(0, 0, 0))
                    })
                    .map(|t| t.and_utc())
            }
        }
    }
}

/// `2024-01-01 09:00:00`, `2024-01-01T09:00:00`, with an optional `.fraction` and `Z`.
fn parse_iso(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b' ' | b'T') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        s.get(r)?.bytes().try_fold(0u32, |acc, d| {
            d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
        })
    };
    let date = NaiveDate::from_ymd_opt(i32::try_from(num(0..4)?).ok()?, num(5..7)?, num(8..10)?)?;
    let mut t = date.and_hms_opt(num(11..13)?, num(14..16)?, num(17..19)?)?;
    let rest = s.get(19..)?;
    let rest = rest.strip_suffix('Z').unwrap_or(rest);
    if let Some(frac) = rest.strip_prefix('.') {
        if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|d| d.is_ascii_digit()) {
            return None;
        }
        let nanos: i64 = format!("{frac:0<9}").parse().ok()?;
        t += TimeDelta::nanoseconds(nanos);
    } else if !rest.is_empty() {
        return None;
    }
    Some(t.and_utc())
}

/// An epoch count in some unit (`nanos_per_unit`), with an optional decimal fraction.
fn epoch(s: &str, nanos_per_unit: i64) -> Option<DateTime<Utc>> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() || !whole.bytes().all(|d| d.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|d| d.is_ascii_digit()) {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let mut nanos = whole.checked_mul(nanos_per_unit)?;
    if !frac.is_empty() {
        let digits = &frac[..frac.len().min(9)];
        let scale = 10i64.pow(u32::try_from(digits.len()).ok()?);
        let f: i64 = digits.parse().ok()?;
        nanos = nanos.checked_add(f.checked_mul(nanos_per_unit)? / scale)?;
    }
    let t = DateTime::from_timestamp(nanos.div_euclid(1_000_000_000), 0)?;
    Some(t + TimeDelta::nanoseconds(nanos.rem_euclid(1_000_000_000)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(f: &TimeFormat, s: &str) -> String {
        f.parse(s)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
            .unwrap_or_else(|| "none".to_owned())
    }

    #[test]
    fn the_forms_logs_use() {
        let clf = TimeFormat::new("%d/%b/%Y:%H:%M:%S %z");
        assert_eq!(
            at(&clf, "10/Oct/2000:13:55:36 -0700"),
            "2000-10-10T20:55:36Z"
        );
        let iso = TimeFormat::from_date_and_time("%Y-%m-%d", "%H:%M:%S");
        assert_eq!(iso, TimeFormat::Iso);
        assert_eq!(at(&iso, "2024-01-01 00:00:01"), "2024-01-01T00:00:01Z");
        assert_eq!(
            at(&iso, "2018-07-02T22:23:00.186641Z"),
            "2018-07-02T22:23:00.186641Z"
        );
        assert_eq!(at(&iso, "2024-13-01 00:00:01"), "none");
        let s = TimeFormat::new("%s");
        assert_eq!(
            at(&s, "1646861401.5241024"),
            "2022-03-09T21:30:01.524102400Z"
        );
        assert_eq!(at(&s, "1286536309"), "2010-10-08T11:11:49Z");
        assert_eq!(at(&s, "12x"), "none");
        assert_eq!(
            at(&TimeFormat::new("%f"), "1700000000123456"),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(
            at(&TimeFormat::new("%*"), "1700000000123"),
            "2023-11-14T22:13:20.123Z"
        );
        let rfc = TimeFormat::new("%Y-%m-%dT%H:%M:%S%:z");
        assert_eq!(
            at(&rfc, "2024-01-01T09:00:00+01:00"),
            "2024-01-01T08:00:00Z"
        );
        let other = TimeFormat::new("%d.%m.%Y %H.%M.%S");
        assert_eq!(at(&other, "31.12.2023 23.59.58"), "2023-12-31T23:59:58Z");
        let zoned = TimeFormat::new("%Y/%m/%d %H:%M:%S %z");
        assert_eq!(
            at(&zoned, "2023/12/31 23:59:58 +0200"),
            "2023-12-31T21:59:58Z"
        );
        assert_eq!(
            at(&TimeFormat::new("%Y-%m-%d"), "2023-12-31"),
            "2023-12-31T00:00:00Z"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            for f in ["%s", "%f", "%*", "%Y-%m-%d %H:%M:%S", "%d/%b/%Y:%H:%M:%S %z", "%Y-%m-%dT%H:%M:%S%:z", "%d %b %Y"] {
                let _ = TimeFormat::new(f).parse(&s);
            }
        }
    }
}
