//! Event-time tumbling windows, watermarks and rule evaluation: the pure core of an alerter.
//!
//! # How a window closes (the same live and when catching up)
//! - Windows are tumbling, aligned to their length in UTC, and use the log line's own time.
//! - Each events partition has a clock: the largest event time read from it. An event whose
//!   window ended at or before that clock minus the allowed lateness is *late*: it is counted
//!   in a metric, not in the window.
//! - The group's watermark is the minimum over the topic's partitions of their clock minus
//!   the lateness. A partition that has not reported yet (no member flushed it), or that has
//!   unread events but no clock, holds every window open; a partition whose member has read
//!   it to its log end for longer than the idle timeout is excluded (Flink's `withIdleness`),
//!   so one quiet partition does not hold every window open. When every partition is idle the
//!   watermark is the largest clock minus the lateness.
//! - A window closes when the watermark passes its end. Closing is recorded in the database
//!   (`closed_through`) in the same transaction as the alerts it yields, and window counts
//!   that reach the database after their window closed are counted as late there.
//!
//! A member catching up after downtime has unread events in its partitions, so none of them
//! is idle and windows close only as fast as the slowest partition is read: it sends exactly
//! the alerts it would have sent live.
//!
//! Alert ids are a function of (rule, window start, subject) only, so a replay yields the
//! same ids and a sink skips those already delivered.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::rules::{Rule, RuleKind};
use crate::countries::CountryCode;
use crate::positions::Accumulator;
use crate::store::StoredPositions;

/// The subject of the all-traffic rows (beside one per country).
pub use crate::countries::ALL;

/// Requests and server errors in one window and subject.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowTotals {
    pub requests: u64,
    /// Responses with a status of 500 or more.
    pub errors: u64,
}

impl std::ops::AddAssign for WindowTotals {
    fn add_assign(&mut self, o: WindowTotals) {
        self.requests += o.requests;
        self.errors += o.errors;
    }
}

/// (window length s, window start s, country or `None` for all traffic).
pub type WindowKey = (i64, i64, Option<CountryCode>);

/// What one alerter counted for one partition since its last flush, and the partition's
/// event-time clock (which outlives the flush).
#[derive(Debug, Clone)]
pub struct WindowCounts {
    /// The distinct window lengths of the rules, in seconds.
    sizes: Arc<[i64]>,
    /// Per-country rows are kept only when a rule looks at countries.
    per_country: bool,
    /// Allowed lateness in seconds.
    lateness: i64,
    pub windows: HashMap<WindowKey, WindowTotals>,
    /// The largest event time read from the partition (seconds since the epoch).
    pub clock: Option<i64>,
    /// Since when (ms since the epoch, wall clock) the member has been at the partition's log
    /// end without new events; `None` while it is reading.
    pub caught_up_since: Option<i64>,
    /// The earliest event time counted since the last flush.
    pub first: Option<i64>,
    /// Events read since the last flush (late ones included).
    pub events: u64,
    /// Events too late for their window, since the last flush.
    pub late: u64,
    /// Events whose JSON or time could not be read, since the last flush.
    pub unreadable: u64,
}

impl WindowCounts {
    pub fn new(rules: &[Rule], lateness: i64) -> WindowCounts {
        let mut sizes: Vec<i64> = rules.iter().map(|r| r.window).collect();
        sizes.sort_unstable();
        sizes.dedup();
        WindowCounts::empty(
            sizes.into(),
            rules
                .iter()
                .any(|r| matches!(r.kind, RuleKind::CountryVisits { .. })),
            lateness,
        )
    }

    fn empty(sizes: Arc<[i64]>, per_country: bool, lateness: i64) -> WindowCounts {
        WindowCounts {
            sizes,
            per_country,
            lateness,
            windows: HashMap::new(),
            clock: None,
            caught_up_since: None,
            first: None,
            events: 0,
            late: 0,
            unreadable: 0,
        }
    }

    /// Counts one event at `time` (seconds since the epoch) from `country` with `status`.
    /// Returns false when it was late for some window length (and not counted there).
    pub fn add(&mut self, time: i64, status: u16, country: CountryCode) -> bool {
        let horizon = self.clock.map(|c| c - self.lateness);
        let totals = WindowTotals {
            requests: 1,
            errors: u64::from(status >= 500),
        };
        let mut on_time = true;
        for &size in self.sizes.iter() {
            let start = time - time.rem_euclid(size);
            if horizon.is_some_and(|h| start + size <= h) {
                on_time = false;
                continue;
            }
            *self.windows.entry((size, start, None)).or_default() += totals;
            if self.per_country {
                *self
                    .windows
                    .entry((size, start, Some(country)))
                    .or_default() += totals;
            }
        }
        self.events += 1;
        if !on_time {
            self.late += 1;
        }
        self.clock = Some(self.clock.map_or(time, |c| c.max(time)));
        self.first = Some(self.first.map_or(time, |f| f.min(time)));
        self.caught_up_since = None;
        on_time
    }
}

impl Accumulator for WindowCounts {
    type Flush = super::tables::AlertFlush;
    fn empty_like(&self) -> Self {
        WindowCounts::empty(Arc::clone(&self.sizes), self.per_country, self.lateness)
    }
    fn is_empty(&self) -> bool {
        self.windows.is_empty() && self.events == 0 && self.unreadable == 0
    }
    fn merge(&mut self, other: Self) {
        for (k, t) in other.windows {
            *self.windows.entry(k).or_default() += t;
        }
        self.events += other.events;
        self.late += other.late;
        self.unreadable += other.unreadable;
        self.clock = self.clock.max(other.clock);
        self.first = match (self.first, other.first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    /// The windows go; the clock stays (the flush writes a copy of it).
    fn take(&mut self) -> Self {
        let mut out = self.empty_like();
        out.windows = std::mem::take(&mut self.windows);
        out.first = self.first.take();
        out.events = std::mem::take(&mut self.events);
        out.late = std::mem::take(&mut self.late);
        out.unreadable = std::mem::take(&mut self.unreadable);
        out.clock = self.clock;
        out.caught_up_since = self.caught_up_since;
        out
    }
    /// Every owned partition reports its clock and whether it is caught up at each flush:
    /// the watermark needs every partition's.
    fn must_flush(&self) -> bool {
        true
    }
    fn resume_from(&mut self, partition: i32, stored: &StoredPositions) {
        self.clock = stored.event_clocks.get(&partition).copied();
    }
}

pub use crate::store::PartitionClock;

/// The group's watermark (see the module docs), or `None` while some partition holds every
/// window open. `partitions`: the topic's partition count; `now_ms`, `idle_ms`: wall clock.
pub fn watermark(
    clocks: &[PartitionClock],
    partitions: i32,
    now_ms: i64,
    idle_ms: i64,
    lateness: i64,
) -> Option<i64> {
    let mut active: Option<i64> = None;
    let mut newest: Option<i64> = None;
    for p in 0..partitions {
        let c = clocks.iter().find(|c| c.partition == p)?;
        let idle = c.caught_up_since.is_some_and(|s| now_ms - s >= idle_ms);
        newest = newest.max(c.clock);
        if idle {
            continue;
        }
        let clock = c.clock?;
        active = Some(active.map_or(clock, |a| a.min(clock)));
    }
    active.or(newest).map(|t| t - lateness)
}

/// One alert: what a closed window yielded for one rule and subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// `rule/window start/subject` (the subject only for per-country rules).
    pub id: String,
    pub rule: String,
    pub kind: String,
    /// RFC 3339, UTC.
    pub window_start: String,
    pub window_end: String,
    /// The country for `country_visits`; `None` for rules over all traffic.
    pub subject: Option<String>,
    pub value: f64,
    pub threshold: f64,
    /// One readable line (the webhook's `text`, the e-mail's subject).
    pub text: String,
}

/// One stored window row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRow {
    pub window: i64,
    pub start: i64,
    /// A country code or [`ALL`].
    pub subject: String,
    pub totals: WindowTotals,
}

fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| t.to_string())
}

fn span(start: i64, end: i64) -> String {
    let f = |t: i64, fmt: &str| {
        chrono::DateTime::from_timestamp(t, 0)
            .map(|d| d.format(fmt).to_string())
            .unwrap_or_else(|| t.to_string())
    };
    format!(
        "{} to {} UTC",
        f(start, "%Y-%m-%d %H:%M:%S"),
        f(end, "%H:%M:%S")
    )
}

/// The alerts of every window that closes when the watermark moves from `closed_through`
/// to `watermark`: windows whose end is in `(closed_through, watermark]`. `rows` holds those
/// windows and, for spikes, the ones before them; `first_event` is the earliest event time
/// the group counted (no spike baseline reaches before it). Sorted by window start, then id.
pub fn evaluate(
    rules: &[Rule],
    rows: &[WindowRow],
    closed_through: i64,
    watermark: i64,
    first_event: Option<i64>,
) -> Vec<Alert> {
    let mut table: BTreeMap<(i64, i64), BTreeMap<&str, WindowTotals>> = BTreeMap::new();
    for r in rows {
        *table
            .entry((r.window, r.start))
            .or_default()
            .entry(r.subject.as_str())
            .or_default() += r.totals;
    }
    let all = |size: i64, start: i64| {
        table
            .get(&(size, start))
            .and_then(|s| s.get(ALL))
            .copied()
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for rule in rules {
        let size = rule.window;
        for (&(_, start), subjects) in table.range((size, i64::MIN)..=(size, i64::MAX)) {
            let end = start + size;
            if end <= closed_through || end > watermark {
                continue;
            }
            let window = span(start, end);
            let mut alert = |subject: Option<&str>, value: f64, threshold: f64, text: String| {
                let mut id = format!("{}/{}", rule.name, rfc3339(start));
                if let Some(s) = subject {
                    id.push('/');
                    id.push_str(s);
                }
                out.push(Alert {
                    id,
                    rule: rule.name.clone(),
                    kind: rule.kind.name().to_owned(),
                    window_start: rfc3339(start),
                    window_end: rfc3339(end),
                    subject: subject.map(str::to_owned),
                    value,
                    threshold,
                    text,
                });
            };
            let here = subjects.get(ALL).copied().unwrap_or_default();
            match &rule.kind {
                RuleKind::ErrorShare {
                    above,
                    min_requests,
                } => {
                    if here.requests == 0 || here.requests < *min_requests {
                        continue;
                    }
                    let share = here.errors as f64 / here.requests as f64;
                    if share > *above {
                        alert(
                            None,
                            share,
                            *above,
                            format!(
                                "{}: {:.1}% of {} requests failed with 5xx in {window} (above {:.1}%)",
                                rule.name,
                                share * 100.0,
                                here.requests,
                                above * 100.0
                            ),
                        );
                    }
                }
                RuleKind::Spike {
                    factor,
                    baseline,
                    min_requests,
                } => {
                    let from = start - i64::from(*baseline) * size;
                    let Some(first) = first_event else { continue };
                    if from < first - first.rem_euclid(size) || here.requests < *min_requests {
                        continue;
                    }
                    let sum: u64 = (0..i64::from(*baseline))
                        .map(|i| all(size, from + i * size).requests)
                        .sum();
                    let mean = sum as f64 / f64::from(*baseline);
                    let threshold = factor * mean;
                    if mean > 0.0 && here.requests as f64 > threshold {
                        alert(
                            None,
                            here.requests as f64,
                            threshold,
                            format!(
                                "{}: {} visits in {window}, {:.1}x the mean of the previous {baseline} windows ({mean:.1}; alert above {factor}x)",
                                rule.name,
                                here.requests,
                                here.requests as f64 / mean
                            ),
                        );
                    }
                }
                RuleKind::CountryVisits { country, above } => {
                    for (&subject, totals) in subjects {
                        if subject == ALL
                            || country.is_some_and(|c| c.as_str() != subject)
                            || totals.requests <= *above
                        {
                            continue;
                        }
                        alert(
                            Some(subject),
                            totals.requests as f64,
                            *above as f64,
                            format!(
                                "{}: {} visits from {subject} in {window} (above {above})",
                                rule.name, totals.requests
                            ),
                        );
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| (&a.window_start, &a.id).cmp(&(&b.window_start, &b.id)));
    out
}

/// Seconds since the epoch of an event's RFC 3339 time.
pub fn seconds_of(time: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(time)
        .ok()
        .map(|t| t.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::rules::parse_rules;

    fn cc(c: &str) -> CountryCode {
        CountryCode::parse(c).unwrap()
    }

    const RULES: &str = r#"
[[rule]]
name = "errors"
kind = "error_share"
above = 0.2
min_requests = 10
window = "1m"

[[rule]]
name = "spike"
kind = "spike"
factor = 3.0
baseline = 3
window = "1m"

[[rule]]
name = "cn"
kind = "country_visits"
country = "CN"
above = 5
window = "1m"
"#;

    fn rows(counts: &WindowCounts) -> Vec<WindowRow> {
        let mut v: Vec<WindowRow> = counts
            .windows
            .iter()
            .map(|(&(window, start, c), &totals)| WindowRow {
                window,
                start,
                subject: c.map_or(ALL.to_owned(), |c| c.as_str().to_owned()),
                totals,
            })
            .collect();
        v.sort_by_key(|r| (r.window, r.start, r.subject.clone()));
        v
    }

    #[test]
    fn windows_are_aligned_and_late_events_are_counted_apart() {
        let rules = parse_rules(RULES).unwrap();
        let mut w = WindowCounts::new(&rules, 30);
        assert!(w.add(125, 200, cc("US")));
        assert!(w.add(179, 503, cc("CN")));
        assert!(w.add(240, 200, cc("US")));
        // The clock is 240: windows ending at or before 210 are closed for this partition.
        assert!(w.add(181, 200, cc("US")), "window 180..240 is still open");
        assert!(
            !w.add(170, 200, cc("US")),
            "window 120..180 ended before 210"
        );
        assert_eq!(w.late, 1);
        assert_eq!(
            w.windows.get(&(60, 120, None)),
            Some(&WindowTotals {
                requests: 2,
                errors: 1
            })
        );
        assert_eq!(
            w.windows.get(&(60, 120, Some(cc("CN")))),
            Some(&WindowTotals {
                requests: 1,
                errors: 1
            })
        );
        assert_eq!(w.windows.get(&(60, 180, None)).unwrap().requests, 1);
        assert_eq!(w.windows.get(&(60, 240, None)).unwrap().requests, 1);
        // A flush takes the windows, not the clock.
        let taken = w.take();
        assert_eq!(taken.windows.len(), 7);
        assert_eq!((taken.clock, w.clock), (Some(240), Some(240)));
        assert!(w.windows.is_empty() && w.late == 0);
        assert!(!w.add(100, 200, cc("US")), "still late after the flush");
    }

    #[test]
    fn the_watermark_waits_for_every_partition_but_idle_ones() {
        let clock = |partition, clock, caught_up_since| PartitionClock {
            partition,
            clock,
            caught_up_since,
        };
        let now = 100_000;
        // A partition that never reported holds everything.
        assert_eq!(
            watermark(&[clock(0, Some(500), None)], 2, now, 10_000, 30),
            None
        );
        // The slowest reading partition decides.
        let two = [clock(0, Some(500), None), clock(1, Some(400), None)];
        assert_eq!(watermark(&two, 2, now, 10_000, 30), Some(370));
        // Unread events but no clock yet: held.
        let unread = [clock(0, Some(500), None), clock(1, None, None)];
        assert_eq!(watermark(&unread, 2, now, 10_000, 30), None);
        // Caught up, but not for the idle timeout yet: still counts.
        let recent = [clock(0, Some(500), None), clock(1, Some(400), Some(95_000))];
        assert_eq!(watermark(&recent, 2, now, 10_000, 30), Some(370));
        // Idle: excluded, with a clock or without one (an empty partition).
        for idle in [Some(400), None] {
            let quiet = [clock(0, Some(500), None), clock(1, idle, Some(80_000))];
            assert_eq!(watermark(&quiet, 2, now, 10_000, 30), Some(470));
        }
        // Everything idle: the newest clock.
        let done = [clock(0, Some(500), Some(0)), clock(1, Some(400), Some(0))];
        assert_eq!(watermark(&done, 2, now, 10_000, 30), Some(470));
        // Nothing counted anywhere.
        let empty = [clock(0, None, Some(0)), clock(1, None, Some(0))];
        assert_eq!(watermark(&empty, 2, now, 10_000, 30), None);
    }

    #[test]
    fn closed_windows_yield_their_alerts_once() {
        let rules = parse_rules(RULES).unwrap();
        let mut w = WindowCounts::new(&rules, 0);
        let minute = |m: i64| 1_767_225_600 + m * 60;
        // Minutes 0-2: 10 visits each, 1 error. Minute 3: 40 visits (a spike: 40 > 3 x 10),
        // 9 of them errors (22.5% > 20%). Minute 4: 8 visits from CN (above 5), 10 in all.
        for m in 0..3 {
            for i in 0..10 {
                w.add(minute(m) + i, if i == 0 { 500 } else { 200 }, cc("US"));
            }
        }
        for i in 0..40 {
            w.add(minute(3) + i, if i < 9 { 502 } else { 200 }, cc("US"));
        }
        for i in 0..10 {
            w.add(minute(4) + i, 200, if i < 8 { cc("CN") } else { cc("US") });
        }
        let rows = rows(&w);
        let first = Some(minute(0));
        let ids = |alerts: Vec<Alert>| alerts.into_iter().map(|a| a.id).collect::<Vec<_>>();
        // The watermark inside minute 4: minute 4 is not closed.
        let early = evaluate(&rules, &rows, i64::MIN, minute(4) + 30, first);
        assert_eq!(
            ids(early.clone()),
            vec!["errors/2026-01-01T00:03:00Z", "spike/2026-01-01T00:03:00Z"]
        );
        assert_eq!(early[1].value, 40.0);
        assert_eq!(early[1].threshold, 30.0);
        assert_eq!(
            early[0].text,
            "errors: 22.5% of 40 requests failed with 5xx in 2026-01-01 00:03:00 to 00:04:00 UTC (above 20.0%)"
        );
        // Later: only minute 4 is new.
        let later = evaluate(&rules, &rows, minute(4) + 30, minute(6), first);
        assert_eq!(ids(later.clone()), vec!["cn/2026-01-01T00:04:00Z/CN"]);
        assert_eq!(later[0].subject.as_deref(), Some("CN"));
        // No spike before `baseline` windows of history: minute 2 has only 2 behind it.
        let from_minute_1 = evaluate(&rules, &rows, i64::MIN, minute(4), Some(minute(1)));
        assert_eq!(ids(from_minute_1), vec!["errors/2026-01-01T00:03:00Z"]);
    }

    #[test]
    fn a_replayed_partition_yields_the_same_ids() {
        let rules = parse_rules(RULES).unwrap();
        let mut a = WindowCounts::new(&rules, 30);
        let mut b = WindowCounts::new(&rules, 30);
        for t in 0..600 {
            a.add(
                1_767_225_600 + t,
                if t % 3 == 0 { 500 } else { 200 },
                cc("CN"),
            );
        }
        // The same events, counted in two halves merged (a failed flush given back).
        for t in 0..300 {
            b.add(
                1_767_225_600 + t,
                if t % 3 == 0 { 500 } else { 200 },
                cc("CN"),
            );
        }
        let mut half = b.take();
        for t in 300..600 {
            half.add(
                1_767_225_600 + t,
                if t % 3 == 0 { 500 } else { 200 },
                cc("CN"),
            );
        }
        b.merge(half);
        let w = 1_767_225_600 + 600;
        assert_eq!(
            evaluate(&rules, &rows(&a), i64::MIN, w, Some(1_767_225_600)),
            evaluate(&rules, &rows(&b), i64::MIN, w, Some(1_767_225_600))
        );
        assert!(!evaluate(&rules, &rows(&a), i64::MIN, w, Some(1_767_225_600)).is_empty());
    }
}
