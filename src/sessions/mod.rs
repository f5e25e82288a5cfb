//! Visits (sessions) on event time: the pure core. The aggregator owns whole countries, so
//! every request of one visitor (same address, same country) reaches one events partition and
//! one aggregator; this module keeps that partition's open visits.
//!
//! # Definitions (the README and the tests use the same)
//! - A *page request* is a human request (the `visitor_type` rule) for a path that is not a
//!   static file (the `static_path` rule), whatever its status.
//! - A *visitor* is (client address, User-Agent), known here only as a keyed hash
//!   ([`visitor_key`]).
//! - A *visit* is a visitor's page requests in event-time order until a gap of more than
//!   `--session-gap` (30 minutes). Its day, site and country are its first request's; its
//!   duration is last − first (seconds); it is a bounce with one page request; its entry page
//!   is its first request's path (no query string), its exit page its last's. Requests in the
//!   same second are ordered by path (then site), so the result does not depend on arrival
//!   order.
//!
//! # Order and lateness (the alerting windows' clocks, per raw partition)
//! Events of one visitor come through several raw partitions and preprocessors, so they
//! arrive out of order. Each raw partition is read in order by one preprocessor at a time,
//! so the events one raw partition sends to this events partition arrive in the order of
//! their lines; different raw partitions are read at different speeds. The partition keeps
//! an event-time clock per raw partition (the largest event time read from it, as an alert
//! window's clock) and its watermark is the slowest clock minus `--session-lateness` (Flink's
//! per-source watermarks), none until every raw partition has sent an event here. A page
//! request older than the watermark is *late*: it is counted as a request and in the `late`
//! counter, never in a visit (its visit may already be closed and written). Every other
//! request is merged into the visitor's open visits wherever it falls, joining two visits
//! when it fills the gap between them. A visit closes when the watermark passes its last
//! request plus the gap: no request that is not late can join it any more, so what it counts
//! is final and equals the definition.
//!
//! The watermark is this partition's own, not the group's minimum over partitions (as the
//! alerting windows use): a visitor's requests are all in this partition, so no other
//! partition's clock can hold its visits open.
//!
//! # Exactly once
//! The open visits are state that outlives a flush: each flush writes the visitors that
//! changed since the last one (`partition_state`) with the closed visits' counts, the clocks
//! and the offsets, in one transaction; a newly owned partition reloads them. Replaying the
//! events after the stored offset from the stored state closes the same visits.
//!
//! # Bounded memory
//! An open visit costs [`Run`] plus its paths and site (about 150 bytes with 30-byte paths,
//! measured by `benches/sessions.rs`). At each flush, beyond `--max-open-visits` per
//! aggregator the visits whose last request is oldest are closed early and counted in
//! `closed_early`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};

use crate::countries::CountryCode;

/// The default `--session-gap`: 30 minutes, as Google Analytics, Plausible and Matomo use.
pub const DEFAULT_GAP_SECONDS: i64 = 30 * 60;
/// The default `--max-open-visits` per aggregator.
pub const DEFAULT_MAX_OPEN_VISITS: usize = 1_000_000;

/// How visits are cut; the same for every partition of one aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// A gap longer than this (seconds) starts a new visit.
    pub gap: i64,
    /// Seconds of event time a request may arrive after the partition's clock.
    pub lateness: i64,
    /// The installation's secret key for [`visitor_key`] (`visit_salt`).
    pub salt: (u64, u64),
    /// Partitions of the raw topic (`None`: not known): the watermark waits until each has
    /// sent an event (see [`Sessions::watermark`]).
    pub sources: Option<i32>,
}

/// The stored key of a visitor: SipHash-1-3 of the event's `client` hash under the
/// installation's secret salt. The address never reaches the database; without the salt the
/// stored key cannot be matched to an address by trying them all.
pub fn visitor_key(salt: (u64, u64), client: u64) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(salt.0, salt.1);
    h.write_u64(client);
    h.finish()
}

/// One page request as visits see it.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest<'a> {
    /// [`visitor_key`] of the request's visitor.
    pub visitor: u64,
    /// Event time, seconds since the epoch.
    pub time: i64,
    /// Without the query string.
    pub path: &'a str,
    pub site: &'a str,
    pub country: CountryCode,
    /// The raw partition of the request's line (-1: not known).
    pub source: i32,
}

/// A visit, open or closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Event time of the first and last page requests (seconds since the epoch).
    pub first: i64,
    pub last: i64,
    pub pages: u32,
    pub entry: Box<str>,
    pub exit: Box<str>,
    /// The first request's site and country.
    pub site: Box<str>,
    pub country: CountryCode,
}

impl Run {
    fn new(r: &PageRequest<'_>) -> Run {
        Run {
            first: r.time,
            last: r.time,
            pages: 1,
            entry: r.path.into(),
            exit: r.path.into(),
            site: r.site.into(),
            country: r.country,
        }
    }

    /// Seconds from the first to the last page request.
    pub fn duration(&self) -> i64 {
        self.last - self.first
    }

    /// Adds `o` (requests of the same visitor within the gap).
    fn absorb(&mut self, o: Run) {
        if (o.first, &*o.entry, &*o.site) < (self.first, &*self.entry, &*self.site) {
            self.first = o.first;
            self.entry = o.entry;
            self.site = o.site;
            self.country = o.country;
        }
        if (o.last, &*o.exit) > (self.last, &*self.exit) {
            self.last = o.last;
            self.exit = o.exit;
        }
        self.pages = self.pages.saturating_add(o.pages);
    }
}

/// Why a visit closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The watermark passed its last request plus the gap.
    Watermark,
    /// `--max-open-visits` was reached; it was among the oldest.
    Early,
    /// The input ended (`demo --exit-when-drained`).
    EndOfInput,
}

/// One events partition's open visits and clock.
#[derive(Debug, Clone)]
pub struct Sessions {
    pub config: SessionConfig,
    /// Per raw partition, the largest event time read from it into this partition (seconds
    /// since the epoch).
    clocks: BTreeMap<i32, i64>,
    /// `clocks` changed since the last flush.
    clocks_dirty: bool,
    /// (visitor, first request's time) → the open visit.
    open: BTreeMap<(u64, i64), Run>,
    /// (last + gap, visitor, first) of every open visit, or earlier: popped when the
    /// watermark passes it, checked against the visit, pushed again if it was extended.
    expiry: BinaryHeap<Reverse<(i64, u64, i64)>>,
    /// Visitors whose open visits changed since the last flush.
    dirty: HashSet<u64>,
    /// Visits closed and not yet counted by the caller.
    pub closed: Vec<(Run, Closed)>,
    /// Page requests older than the watermark (not in any visit), since this was created.
    pub late: u64,
}

/// What a flush writes of the open visits: the visitors that changed (encoded, or `None`
/// when they have no open visit any more) and the clock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFlush {
    pub rows: Vec<(u64, Option<Vec<u8>>)>,
    /// The clocks, encoded, when they changed (stored under [`CLOCKS_KEY`]).
    pub clocks: Option<Vec<u8>>,
}

/// The state key of a partition's clocks (visitor keys are 8 bytes long).
pub const CLOCKS_KEY: &[u8] = b"clocks";

impl Sessions {
    pub fn new(config: SessionConfig) -> Sessions {
        Sessions {
            config,
            clocks: BTreeMap::new(),
            clocks_dirty: false,
            open: BTreeMap::new(),
            expiry: BinaryHeap::new(),
            dirty: HashSet::new(),
            closed: Vec::new(),
            late: 0,
        }
    }

    /// Open visits.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// The largest event time read (seconds since the epoch).
    pub fn clock(&self) -> Option<i64> {
        self.clocks.values().copied().max()
    }

    /// Page requests older than this are late (`None`: none is). Each raw partition is read
    /// in order by one preprocessor at a time, so its events reach this partition in the
    /// order of its lines, while different raw partitions are read at different speeds (a
    /// bulk import reorders them by hours of the log's time). The watermark is therefore the
    /// slowest raw partition's clock minus the lateness (Flink's per-source watermarks), and
    /// none until every raw partition has sent an event here.
    pub fn watermark(&self) -> Option<i64> {
        if let Some(n) = self.config.sources
            && (0..n).any(|p| !self.clocks.contains_key(&p))
        {
            return None;
        }
        let slowest = self.clocks.values().copied().min()?;
        Some(slowest.saturating_sub(self.config.lateness))
    }

    /// Adds a page request; visits it makes final are pushed to [`Sessions::closed`].
    /// Returns false when it was late (and left out).
    pub fn add(&mut self, r: &PageRequest<'_>) -> bool {
        if self.watermark().is_some_and(|w| r.time < w) {
            self.late += 1;
            return false;
        }
        let gap = self.config.gap;
        // The visitor's open visits within the gap of this request: they and it are one.
        let touching: Vec<i64> = self
            .open
            .range((r.visitor, i64::MIN)..=(r.visitor, i64::MAX))
            .filter(|(_, v)| r.time >= v.first - gap && r.time <= v.last + gap)
            .map(|(&(_, first), _)| first)
            .collect();
        let mut run = Run::new(r);
        for &first in &touching {
            if let Some(v) = self.open.remove(&(r.visitor, first)) {
                run.absorb(v);
            }
        }
        // A visit keeps its expiry entry while its first request stays: the entry is at or
        // before its real expiry and is checked when popped. Only a new key needs one (the
        // heap holds about one entry per open visit, not one per request).
        if !touching.contains(&run.first) {
            self.expiry.push(Reverse((
                run.last.saturating_add(gap),
                r.visitor,
                run.first,
            )));
        }
        self.open.insert((r.visitor, run.first), run);
        self.dirty.insert(r.visitor);
        let clock = self.clocks.entry(r.source).or_insert(r.time);
        if r.time >= *clock {
            *clock = r.time;
            self.clocks_dirty = true;
        }
        self.close_passed();
        true
    }

    /// Closes the visits the watermark has passed.
    fn close_passed(&mut self) {
        let Some(w) = self.watermark() else {
            return;
        };
        while let Some(&Reverse((expires, visitor, first))) = self.expiry.peek() {
            if expires >= w {
                break;
            }
            self.expiry.pop();
            let Some(v) = self.open.get(&(visitor, first)) else {
                continue; // merged into another visit, or closed already
            };
            let now_expires = v.last.saturating_add(self.config.gap);
            if now_expires < w {
                if let Some(v) = self.open.remove(&(visitor, first)) {
                    self.closed.push((v, Closed::Watermark));
                    self.dirty.insert(visitor);
                }
            } else {
                self.expiry.push(Reverse((now_expires, visitor, first)));
            }
        }
    }

    /// Closes every open visit (the input ended).
    pub fn close_all(&mut self, why: Closed) {
        for ((visitor, _), v) in std::mem::take(&mut self.open) {
            self.dirty.insert(visitor);
            self.closed.push((v, why));
        }
        self.expiry.clear();
    }

    /// The last request times of the open visits (to choose which to close early).
    pub fn last_times(&self) -> impl Iterator<Item = i64> + '_ {
        self.open.values().map(|v| v.last)
    }

    /// Closes early the open visits whose last request is before `before`, and those at
    /// `before` while `at_before` allows; returns how many closed.
    pub fn close_older_than(&mut self, before: i64, at_before: &mut usize) -> usize {
        let keys: Vec<(u64, i64)> = self
            .open
            .iter()
            .filter(|(_, v)| {
                v.last < before
                    || (v.last == before && {
                        let take = *at_before > 0;
                        *at_before = at_before.saturating_sub(1);
                        take
                    })
            })
            .map(|(k, _)| *k)
            .collect();
        for k in &keys {
            if let Some(v) = self.open.remove(k) {
                self.dirty.insert(k.0);
                self.closed.push((v, Closed::Early));
            }
        }
        keys.len()
    }

    /// Whether a flush has anything of the open visits to write.
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// What the next flush writes: every changed visitor's open visits (or their deletion).
    pub fn take_flush(&mut self) -> SessionFlush {
        let mut rows: Vec<(u64, Option<Vec<u8>>)> = self
            .dirty
            .drain()
            .map(|visitor| {
                let runs: Vec<&Run> = self
                    .open
                    .range((visitor, i64::MIN)..=(visitor, i64::MAX))
                    .map(|(_, v)| v)
                    .collect();
                (visitor, (!runs.is_empty()).then(|| encode(&runs)))
            })
            .collect();
        rows.sort_unstable_by_key(|r| r.0);
        let clocks = std::mem::take(&mut self.clocks_dirty).then(|| {
            let mut out = vec![FORMAT];
            for (p, t) in &self.clocks {
                out.extend_from_slice(&p.to_le_bytes());
                out.extend_from_slice(&t.to_le_bytes());
            }
            out
        });
        SessionFlush { rows, clocks }
    }

    /// A flush failed: its visitors are written again by the next one (from the state as it
    /// is then).
    pub fn restore(&mut self, flush: &SessionFlush) {
        self.dirty.extend(flush.rows.iter().map(|r| r.0));
        self.clocks_dirty |= flush.clocks.is_some();
    }

    /// Loads a partition's stored open visits and clocks (on assignment). Rows that cannot
    /// be read are skipped and counted (returned).
    pub fn load(&mut self, rows: &[(Vec<u8>, Vec<u8>)]) -> usize {
        self.open.clear();
        self.expiry.clear();
        self.dirty.clear();
        self.clocks.clear();
        self.clocks_dirty = false;
        let mut unreadable = 0;
        for (key, value) in rows {
            if key == CLOCKS_KEY {
                match decode_clocks(value) {
                    Some(c) => self.clocks = c,
                    None => unreadable += 1,
                }
                continue;
            }
            let Some(visitor) = key_of(key) else {
                unreadable += 1;
                continue;
            };
            match decode(value) {
                Some(runs) => {
                    for run in runs {
                        self.expiry.push(Reverse((
                            run.last.saturating_add(self.config.gap),
                            visitor,
                            run.first,
                        )));
                        self.open.insert((visitor, run.first), run);
                    }
                }
                None => unreadable += 1,
            }
        }
        unreadable
    }
}

/// The stored key of a visitor: 8 bytes, big-endian.
pub fn key_bytes(visitor: u64) -> Vec<u8> {
    visitor.to_be_bytes().to_vec()
}

fn key_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Format of a stored visitor: version 1, then per open visit: first, last (i64 LE), pages
/// (u32 LE), country (2 bytes), entry, exit, site (u16 LE length, then UTF-8).
const FORMAT: u8 = 1;

fn encode(runs: &[&Run]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT);
    for r in runs {
        out.extend_from_slice(&r.first.to_le_bytes());
        out.extend_from_slice(&r.last.to_le_bytes());
        out.extend_from_slice(&r.pages.to_le_bytes());
        out.extend_from_slice(r.country.as_str().as_bytes());
        for s in [&r.entry, &r.exit, &r.site] {
            // The value policy bounds every text far below 64 KiB; cut at a char boundary
            // anyway.
            let mut end = s.len().min(usize::from(u16::MAX));
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            out.extend_from_slice(&(end as u16).to_le_bytes());
            out.extend_from_slice(&s.as_bytes()[..end]);
        }
    }
    out
}

fn decode_clocks(b: &[u8]) -> Option<BTreeMap<i32, i64>> {
    let (&version, rest) = b.split_first()?;
    if version != FORMAT || rest.len() % 12 != 0 {
        return None;
    }
    rest.chunks_exact(12)
        .map(|c| {
            Some((
                i32::from_le_bytes(c[..4].try_into().ok()?),
                i64::from_le_bytes(c[4..].try_into().ok()?),
            ))
        })
        .collect()
}

fn decode(mut b: &[u8]) -> Option<Vec<Run>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = b.split_at_checked(n)?;
        *b = tail;
        Some(head)
    }
    fn text(b: &mut &[u8]) -> Option<Box<str>> {
        let n = u16::from_le_bytes(take(b, 2)?.try_into().ok()?);
        Some(std::str::from_utf8(take(b, usize::from(n))?).ok()?.into())
    }
    if take(&mut b, 1)? != [FORMAT] {
        return None;
    }
    let mut runs = Vec::new();
    while !b.is_empty() {
        let first = i64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
        let last = i64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
        let pages = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?);
        let country = CountryCode::parse(std::str::from_utf8(take(&mut b, 2)?).ok()?)?;
        let (entry, exit, site) = (text(&mut b)?, text(&mut b)?, text(&mut b)?);
        runs.push(Run {
            first,
            last,
            pages,
            entry,
            exit,
            site,
            country,
        });
    }
    Some(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAP: i64 = 1800;

    fn sessions(lateness: i64) -> Sessions {
        Sessions::new(SessionConfig {
            gap: GAP,
            lateness,
            salt: (1, 2),
            sources: None,
        })
    }

    fn req(visitor: u64, time: i64, path: &str) -> PageRequest<'_> {
        PageRequest {
            visitor,
            time,
            path,
            site: "",
            country: CountryCode::parse("NL").unwrap(),
            source: 0,
        }
    }

    /// (first, last, pages, entry, exit) of the closed visits, sorted.
    fn closed(s: &mut Sessions) -> Vec<(i64, i64, u32, String, String)> {
        let mut v: Vec<_> = s
            .closed
            .drain(..)
            .map(|(r, _)| (r.first, r.last, r.pages, r.entry.into(), r.exit.into()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_gap_of_exactly_the_limit_continues_the_visit_and_one_more_second_does_not() {
        let mut s = sessions(0);
        assert!(s.add(&req(1, 1000, "/a")));
        assert!(s.add(&req(1, 1000 + GAP, "/b"))); // exactly the gap: same visit
        assert!(s.add(&req(1, 1000 + 2 * GAP + 1, "/c"))); // one second more: a new one
        // The first visit closed when the clock passed its last request plus the gap.
        assert_eq!(
            closed(&mut s),
            vec![(1000, 1000 + GAP, 2, "/a".into(), "/b".into())]
        );
        assert_eq!(s.open(), 1);
        s.close_all(Closed::EndOfInput);
        assert_eq!(
            closed(&mut s),
            vec![(
                1000 + 2 * GAP + 1,
                1000 + 2 * GAP + 1,
                1,
                "/c".into(),
                "/c".into()
            )]
        );
    }

    #[test]
    fn out_of_order_requests_within_lateness_join_and_bridge_visits() {
        let mut s = sessions(3 * GAP);
        // Two visits 2 gaps apart, then a request in between that bridges them, then one
        // before the first that becomes the entry page.
        s.add(&req(7, 10_000, "/x"));
        s.add(&req(7, 10_000 + 2 * GAP, "/z"));
        assert_eq!(s.open(), 2);
        s.add(&req(7, 10_000 + GAP, "/y"));
        assert_eq!(s.open(), 1);
        s.add(&req(7, 10_000 - 60, "/w"));
        s.close_all(Closed::EndOfInput);
        assert_eq!(
            closed(&mut s),
            vec![(10_000 - 60, 10_000 + 2 * GAP, 4, "/w".into(), "/z".into())]
        );
        assert_eq!(s.late, 0);
    }

    #[test]
    fn requests_older_than_the_watermark_are_late_and_left_out() {
        let mut s = sessions(100);
        s.add(&req(1, 5000, "/a"));
        // Watermark 4900: 4899 is late, 4900 is not.
        assert!(!s.add(&req(2, 4899, "/late")));
        assert!(s.add(&req(3, 4900, "/ok")));
        assert_eq!(s.late, 1);
        assert_eq!(s.open(), 2);
    }

    #[test]
    fn a_visit_closes_only_when_the_watermark_passes_last_plus_gap() {
        let mut s = sessions(60);
        s.add(&req(1, 0, "/a"));
        // Clock 1860 → watermark 1800 = last + gap: still open (a request at 1800 may come).
        s.add(&req(2, GAP + 60, "/b"));
        assert!(s.closed.is_empty());
        s.add(&req(2, GAP + 61, "/b"));
        assert_eq!(closed(&mut s), vec![(0, 0, 1, "/a".into(), "/a".into())]);
    }

    #[test]
    fn requests_in_the_same_second_are_ordered_by_path() {
        for order in [["/b", "/a", "/c"], ["/c", "/b", "/a"]] {
            let mut s = sessions(0);
            for p in order {
                s.add(&req(1, 50, p));
            }
            s.close_all(Closed::EndOfInput);
            assert_eq!(closed(&mut s), vec![(50, 50, 3, "/a".into(), "/c".into())]);
        }
    }

    #[test]
    fn open_visits_reload_from_their_stored_rows() {
        let mut s = sessions(GAP);
        s.add(&req(1, 100, "/a"));
        s.add(&req(1, 200, "/b"));
        s.add(&req(2, 150, "/ü"));
        let flush = s.take_flush();
        assert_eq!(flush.rows.len(), 2);
        assert_eq!(s.clock(), Some(200));
        assert!(!s.has_changes());
        let mut rows: Vec<(Vec<u8>, Vec<u8>)> = flush
            .rows
            .iter()
            .map(|(k, v)| (key_bytes(*k), v.clone().unwrap()))
            .collect();
        rows.push((CLOCKS_KEY.to_vec(), flush.clocks.clone().unwrap()));
        let mut again = sessions(GAP);
        assert_eq!(again.load(&rows), 0);
        assert_eq!(again.clock(), Some(200));
        assert_eq!(again.open(), 2);
        // The reloaded state goes on exactly as the original.
        for x in [&mut s, &mut again] {
            x.add(&req(1, 300, "/c"));
            x.add(&req(3, 200 + 2 * GAP + GAP + 1, "/late-clock"));
        }
        assert_eq!(closed(&mut s), closed(&mut again));
        assert_eq!(s.clock(), again.clock());
        // A visitor whose visits closed is deleted by the next flush.
        let rows = again.take_flush().rows;
        assert!(rows.contains(&(1, None)), "{rows:?}");
        // Unreadable rows are skipped and counted.
        let mut bad = sessions(GAP);
        assert_eq!(
            bad.load(&[
                (vec![1, 2], vec![1]),
                (key_bytes(4), vec![1, 0, 0]),
                (CLOCKS_KEY.to_vec(), vec![1, 2])
            ]),
            3
        );
    }

    #[test]
    fn the_oldest_visits_close_early() {
        let mut s = sessions(10 * GAP);
        for v in 0..10 {
            s.add(&req(v, 1000 + v as i64, "/p"));
        }
        let mut at = 0;
        assert_eq!(s.close_older_than(1003, &mut at), 3);
        assert_eq!(s.open(), 7);
        assert!(s.closed.iter().all(|(_, why)| *why == Closed::Early));
    }

    #[test]
    fn the_watermark_is_the_slowest_raw_partitions() {
        let mut s = Sessions::new(SessionConfig {
            gap: GAP,
            lateness: 0,
            salt: (1, 2),
            sources: Some(2),
        });
        let at = |visitor, time, source| PageRequest {
            source,
            ..req(visitor, time, "/")
        };
        // Raw partition 0 runs a day ahead; until partition 1 has sent anything, nothing
        // is late and nothing closes.
        s.add(&at(1, 100_000, 0));
        s.add(&at(2, 10_000, 1));
        assert!(s.closed.is_empty());
        // Partition 1 is now the slowest: its requests of the past are not late.
        assert!(s.add(&at(3, 10_001, 1)));
        // Partition 1 moves on: visits before its clock minus the gap close.
        s.add(&at(4, 20_000, 1));
        assert_eq!(
            closed(&mut s),
            vec![
                (10_000, 10_000, 1, "/".into(), "/".into()),
                (10_001, 10_001, 1, "/".into(), "/".into())
            ]
        );
        // A request behind the slowest partition's clock is late.
        assert!(!s.add(&at(5, 19_999, 0)));
        assert_eq!(s.late, 1);
    }

    #[test]
    fn visitor_keys_depend_on_the_salt() {
        assert_eq!(visitor_key((1, 2), 99), visitor_key((1, 2), 99));
        assert_ne!(visitor_key((1, 2), 99), visitor_key((1, 3), 99));
        assert_ne!(visitor_key((1, 2), 99), visitor_key((1, 2), 98));
    }
}
