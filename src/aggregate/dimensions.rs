//! What the aggregate stage counts besides the talk's per-country table: one generic model,
//! a *dimension* being an extractor from an event to a value, counted as (dimension, value)
//! → visits and bytes. Adding a dimension is one variant here (its name, title and
//! extractor); the database stores every dimension in the same table, so no migration.
//!
//! The panels follow GoAccess 1.7 (our reference): requests, static requests, not-found
//! paths, hosts, operating systems, browsers with their major version, visit time (hour of
//! day), referring sites, status codes, countries and continents, devices, bots vs humans;
//! plus virtual hosts when the log has them.
//!
//! # Bounded memory: top-K with an "other" remainder
//! Paths, referrers and client addresses have no upper bound on distinct values. Each
//! dimension is counted per partition and per flush interval by [`TopK`], the Space-Saving
//! algorithm (Metwally et al., 2005) with at most K slots: memory is K values whatever the
//! input. A value keeps only the visits counted since it took its slot; what an evicted
//! value had, and what a new value inherits from it, goes to the value [`OTHER`]. So:
//! - every value's reported visits and bytes are a lower bound of the true ones, and the sum
//!   over values (with `(other)`) is exact;
//! - a value is under-counted in one flush interval of one partition by at most N/K visits,
//!   N being that partition's events in that interval (Space-Saving's bound on the count a
//!   new slot inherits); below K distinct values per interval every count is exact.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt;

use super::rollups::Slice;
use super::tables::{
    Amount, CountsFlush, DimensionHourIncrement, DimensionIncrement, HistogramIncrement,
    MinuteIncrement, UniqueSketch,
};
use crate::aggregate::visits::VisitTotals;
use crate::countries::{CountryCode, continent_of};
use crate::event::{PageView, policy};
use crate::sessions::{
    Closed, PageRequest, Run, SessionConfig, SessionFlush, Sessions, visitor_key,
};
use crate::sketch::{Hll, bucket_of};

/// The value under which a dimension reports what [`TopK`] could not attribute (and what
/// the store's compaction folds).
pub use super::tables::OTHER;

/// Distinct values kept per dimension, partition and flush interval by default.
pub const DEFAULT_TOP_K: usize = 1000;

/// Values kept in the database per dimension (and per dimension and hour) by default: as
/// many as one API read returns at most (`limit` ≤ 1,000), plus `(other)`.
pub const DEFAULT_KEEP_VALUES: u32 = 1000;

/// What a flush keeps (see [`fill_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// Seconds of minutes and hours kept before the newest one written; `None` keeps all.
    pub retention: Option<i64>,
    /// The latest event time (seconds since the epoch) that pruning counts from: the wall
    /// clock plus `--max-future`. An event time past it (a line dated 9999 from a producer
    /// that does not dead-letter it) never prunes the history.
    pub latest: i64,
    /// Values kept per dimension and per dimension and hour (the rest go to `(other)`).
    pub values: u32,
}

impl Keep {
    /// `retention` and `values`, with the wall clock now plus `max_future` as the latest
    /// event time.
    pub fn now(retention: Option<i64>, max_future: std::time::Duration, values: u32) -> Keep {
        let ahead = i64::try_from(max_future.as_secs()).unwrap_or(i64::MAX);
        Keep {
            retention,
            latest: chrono::Utc::now().timestamp().saturating_add(ahead),
            values,
        }
    }
}

/// One way of grouping visits. The name is what `--dimensions`, the API and the database use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    Country,
    Continent,
    Browser,
    Os,
    Device,
    VisitorType,
    Path,
    StaticPath,
    NotFound,
    Referrer,
    Status,
    StatusClass,
    Hour,
    Vhost,
    /// Client addresses: personal data, counted only when asked for.
    Host,
    /// The first and last page of each visit ([`crate::sessions`]), counting visits: counted
    /// when a visit closes, not per request.
    EntryPage,
    ExitPage,
}

impl Dimension {
    pub const ALL: [Dimension; 17] = [
        Dimension::Country,
        Dimension::Continent,
        Dimension::Browser,
        Dimension::Os,
        Dimension::Device,
        Dimension::VisitorType,
        Dimension::Path,
        Dimension::StaticPath,
        Dimension::NotFound,
        Dimension::Referrer,
        Dimension::Status,
        Dimension::StatusClass,
        Dimension::Hour,
        Dimension::Vhost,
        Dimension::Host,
        Dimension::EntryPage,
        Dimension::ExitPage,
    ];

    /// What `--dimensions` counts when not given: everything but client addresses.
    pub fn defaults() -> Vec<Dimension> {
        Dimension::ALL
            .into_iter()
            .filter(|d| *d != Dimension::Host)
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Dimension::Country => "country",
            Dimension::Continent => "continent",
            Dimension::Browser => "browser",
            Dimension::Os => "os",
            Dimension::Device => "device",
            Dimension::VisitorType => "visitor_type",
            Dimension::Path => "path",
            Dimension::StaticPath => "static_path",
            Dimension::NotFound => "not_found",
            Dimension::Referrer => "referrer",
            Dimension::Status => "status",
            Dimension::StatusClass => "status_class",
            Dimension::Hour => "hour",
            Dimension::Vhost => "vhost",
            Dimension::Host => "host",
            Dimension::EntryPage => "entry_page",
            Dimension::ExitPage => "exit_page",
        }
    }

    /// The panel's title on the dashboard.
    pub fn title(self) -> &'static str {
        match self {
            Dimension::Country => "Countries",
            Dimension::Continent => "Continents",
            Dimension::Browser => "Browsers",
            Dimension::Os => "Operating systems",
            Dimension::Device => "Devices",
            Dimension::VisitorType => "Bots and humans",
            Dimension::Path => "Requested files",
            Dimension::StaticPath => "Static requests",
            Dimension::NotFound => "Not found (404)",
            Dimension::Referrer => "Referring sites",
            Dimension::Status => "Status codes",
            Dimension::StatusClass => "Status classes",
            Dimension::Hour => "Visit time (hour, UTC)",
            Dimension::Vhost => "Virtual hosts",
            Dimension::Host => "Hosts (client addresses)",
            Dimension::EntryPage => "Entry pages (visits)",
            Dimension::ExitPage => "Exit pages (visits)",
        }
    }

    pub fn parse(name: &str) -> Option<Dimension> {
        Dimension::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The dimension's value for `event` (from `country`, the event's key, for the
    /// geographic ones), or `None` when the event has none (no referrer, not a 404, …).
    /// `buf` holds values that are not a slice of the event.
    pub fn value<'a>(
        self,
        event: &'a PageView<'_>,
        country: &'a CountryCode,
        buf: &'a mut String,
    ) -> Option<&'a str> {
        use std::fmt::Write;
        match self {
            Dimension::Country => Some(country.as_str()),
            Dimension::Continent => Some(continent_of(country.as_str())),
            Dimension::Browser => {
                let major = event.browser_version.split('.').next().unwrap_or("");
                if major.is_empty() {
                    return Some(&event.browser);
                }
                buf.clear();
                let _ = write!(buf, "{} {major}", event.browser);
                Some(buf)
            }
            Dimension::Os => Some(&event.os),
            Dimension::Device => Some(&event.device),
            Dimension::VisitorType => Some(if event.is_bot { "bot" } else { "human" }),
            Dimension::Path => Some(path_of(&event.path)),
            Dimension::StaticPath => Some(path_of(&event.path)).filter(|p| is_static(p)),
            Dimension::NotFound => Some(path_of(&event.path)).filter(|_| event.status == 404),
            Dimension::Referrer => {
                let host = referrer_host(event.referrer.as_deref()?)?;
                if host.bytes().any(|b| b.is_ascii_uppercase()) {
                    buf.clear();
                    buf.push_str(host);
                    buf.make_ascii_lowercase();
                    return Some(buf);
                }
                Some(host)
            }
            Dimension::Status => {
                buf.clear();
                buf.push_str(itoa::Buffer::new().format(event.status));
                Some(buf)
            }
            Dimension::StatusClass => Some(match event.status {
                100..=199 => "1xx",
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                500..=599 => "5xx",
                _ => "other",
            }),
            Dimension::Hour => event
                .time
                .get(11..13)
                .filter(|h| h.bytes().all(|b| b.is_ascii_digit())),
            Dimension::Vhost => event.vhost.as_deref(),
            Dimension::Host => Some(&event.ip),
            // Counted per visit when it closes (Counts::count_visit).
            Dimension::EntryPage | Dimension::ExitPage => None,
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `--dimensions`: comma-separated names, `all` (everything, client addresses included) or
/// `default`.
pub fn parse_dimensions(list: &str) -> Result<Vec<Dimension>, String> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let add: Vec<Dimension> = match name {
            "all" => Dimension::ALL.to_vec(),
            "default" => Dimension::defaults(),
            other => vec![Dimension::parse(other).ok_or_else(|| {
                let names: Vec<&str> = Dimension::ALL.iter().map(|d| d.name()).collect();
                format!(
                    "unknown dimension {other:?}; known: {} (or all, default)",
                    names.join(", ")
                )
            })?],
        };
        for d in add {
            if !out.contains(&d) {
                out.push(d);
            }
        }
    }
    Ok(out)
}

/// The path without its query string (GoAccess's default: `/search?q=x` counts as `/search`).
pub(crate) fn path_of(path: &str) -> &str {
    match memchr::memchr(b'?', path.as_bytes()) {
        Some(i) => &path[..i],
        None => path,
    }
}

/// Files GoAccess counts as static requests (its default extension list, plus modern web
/// fonts and images), by extension, case-insensitively.
pub fn is_static(path: &str) -> bool {
    const EXTENSIONS: &[&str] = &[
        "css", "js", "mjs", "map", "jpg", "jpeg", "png", "gif", "ico", "svg", "webp", "avif",
        "bmp", "tif", "tiff", "woff", "woff2", "ttf", "otf", "eot", "mp3", "mp4", "ogg", "webm",
        "wav", "flac", "avi", "mpg", "mpeg", "mov", "swf", "flv", "pdf", "txt", "csv", "xml",
        "json", "zip", "gz", "tgz", "bz2", "xz", "7z", "rar", "exe", "dmg", "iso", "deb", "rpm",
        "apk", "wasm",
    ];
    let name = path.rsplit('/').next().unwrap_or(path);
    let Some((_, ext)) = name.rsplit_once('.') else {
        return false;
    };
    EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext))
}

/// The host of a referrer URL (`https://user@Example.com:8443/x` → `Example.com`); `None`
/// for an empty referrer or `-`. Without a scheme the text up to the first `/` is the host.
fn referrer_host(referrer: &str) -> Option<&str> {
    let rest = match referrer.find("://") {
        Some(i) => &referrer[i + 3..],
        None => referrer,
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let host = if host.starts_with('[') {
        // IPv6 literal: keep the brackets, drop the port.
        host.find(']').map_or(host, |i| &host[..=i])
    } else {
        host.split(':').next().unwrap_or(host)
    };
    Some(host).filter(|h| !h.is_empty() && *h != "-")
}

/// One value's counts in a [`TopK`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Counted {
    /// Counted since the value took its slot (exact, a lower bound of the true amount).
    amount: Amount,
    /// Visits inherited from the value evicted to make room (Space-Saving's error term):
    /// reported under [`OTHER`], but part of the value's priority in the sketch.
    inherited: u64,
}

/// The values of one dimension with the most visits, in at most `capacity` slots (see the
/// module docs for the error bound). Below `capacity` distinct values it is an exact count.
#[derive(Debug, Clone)]
pub struct TopK {
    capacity: usize,
    slots: Vec<(Box<str>, Counted)>,
    index: HashMap<Box<str>, usize>,
    /// Slots by their priority (visits + inherited) when last pushed; an entry whose slot has
    /// grown since is stale and pushed again when it reaches the top (a lazy min-heap).
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    /// What is not attributed to any slot's value.
    other: Amount,
}

impl TopK {
    pub fn new(capacity: usize) -> TopK {
        TopK {
            capacity: capacity.max(1),
            slots: Vec::new(),
            index: HashMap::new(),
            heap: BinaryHeap::new(),
            other: Amount::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.other.is_zero()
    }

    /// Adds `amount` to `value`.
    pub fn add(&mut self, value: &str, amount: Amount) {
        if let Some(&i) = self.index.get(value) {
            self.slots[i].1.amount += amount;
            return;
        }
        if self.slots.len() < self.capacity {
            let i = self.slots.len();
            self.slots.push((
                value.into(),
                Counted {
                    amount,
                    inherited: 0,
                },
            ));
            self.index.insert(value.into(), i);
            self.heap.push(Reverse((amount.visits, i)));
            return;
        }
        // Full: the value takes the slot with the fewest visits, inheriting its count.
        let i = loop {
            let Some(Reverse((priority, i))) = self.heap.pop() else {
                // Unreachable with capacity ≥ 1 (every slot has an entry); count it anyway.
                self.other += amount;
                return;
            };
            let c = &self.slots[i].1;
            let now = c.amount.visits + c.inherited;
            if now == priority {
                break i;
            }
            self.heap.push(Reverse((now, i)));
        };
        let (old, c) = &mut self.slots[i];
        self.other += c.amount;
        let inherited = c.amount.visits + c.inherited;
        *c = Counted { amount, inherited };
        self.index.remove(&**old);
        *old = value.into();
        self.index.insert(value.into(), i);
        self.heap.push(Reverse((inherited + amount.visits, i)));
    }

    /// Adds everything `other` counted (a failed flush's counts, given back).
    pub fn merge(&mut self, other: TopK) {
        for (value, c) in other.slots {
            self.add(&value, c.amount);
        }
        self.other += other.other;
    }

    /// Every value with what it counted, `(other)` last when anything was not attributed.
    pub fn entries(&self) -> impl Iterator<Item = (&str, Amount)> {
        let other = (!self.other.is_zero()).then_some((OTHER, self.other));
        self.slots
            .iter()
            .filter(|(_, c)| !c.amount.is_zero())
            .map(|(v, c)| (&**v, c.amount))
            .chain(other)
    }
}

/// A value measured per visit, kept as a histogram ([`crate::sketch::bucket_of`]) per
/// country and overall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Response size.
    Bytes,
    /// Time taken to serve the request, when the log has it.
    RequestTime,
    /// A visit's duration in seconds ([`crate::sessions`]): counted per visit when it closes.
    VisitDuration,
}

impl Metric {
    pub const ALL: [Metric; 3] = [Metric::Bytes, Metric::RequestTime, Metric::VisitDuration];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Bytes => "bytes",
            Metric::RequestTime => "request_time_us",
            Metric::VisitDuration => "visit_duration_s",
        }
    }

    pub fn parse(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// The scope of the overall unique-visitor sketch and histogram rows (beside one per country).
pub use crate::countries::ALL as ALL_COUNTRIES;

/// The hour of an event whose time cannot be read: counted in the all-time values only.
pub const NO_HOUR: i64 = i64::MIN;

/// A day as the event writes it: `YYYY-MM-DD`.
type Day = [u8; 10];

/// Distinct sites counted per partition and flush interval; the visits of sites beyond it
/// count under the site `(other)` (a log whose virtual-host field is chosen by its clients
/// cannot grow the slices without bound).
pub const MAX_SITES: usize = 1000;

/// One slice of what a partition counted (see [`super::rollups`]): an index into
/// [`Counts`]' sites, the country, whether a bot.
type SliceId = u32;

/// One dimension's values per (hour, slice).
type Hourly = HashMap<(i64, SliceId), TopK>;

/// What one aggregator counts for one partition between two flushes: the talk's
/// per-country visits, and per slice of the traffic (site, country, visitor type) each
/// configured dimension per hour, visits per minute, unique visitors per day and the
/// histograms of [`Metric`] per day. The flush sums slices into the all-time panels and
/// writes them as they are into the filterable rollups.
#[derive(Debug, Clone)]
pub struct Counts {
    pub countries: HashMap<CountryCode, u64>,
    /// Sites seen (at most [`MAX_SITES`] and `(other)`), by index.
    sites: Vec<Box<str>>,
    site_index: HashMap<Box<str>, u32>,
    /// (site index, country, bot) of each slice id.
    slices: Vec<(u32, CountryCode, bool)>,
    slice_index: HashMap<(u32, CountryCode, bool), SliceId>,
    /// Per dimension, per (hour of event time (start, seconds since the epoch; [`NO_HOUR`]
    /// when the event's time cannot be read), slice), the values counted: all-time counts
    /// are their sum, the hourly ones answer "the last 24 hours", the daily ones a filter.
    dimensions: Vec<(Dimension, Hourly)>,
    top_k: usize,
    /// (minute start, seconds since the epoch; slice) → what was counted.
    minutes: HashMap<(i64, SliceId), Amount>,
    /// (day, slice) → the visitors seen.
    uniques: HashMap<(Day, SliceId), Hll>,
    /// (metric, day when readable, slice, bucket) → visits.
    histograms: HashMap<(Metric, Option<Day>, SliceId, i32), u64>,
    /// Events counted for their country only, because their JSON could not be read.
    pub unreadable: u64,
    /// The partition's open visits (`None`: visits are not counted). Outlives a flush.
    pub sessions: Option<Sessions>,
    /// (minute of the first request, slice) → closed visits.
    visits: HashMap<(i64, SliceId), VisitTotals>,
    /// What the flush writes of the open visits (set by `take`).
    pub session_flush: Option<SessionFlush>,
    /// Page requests too late for their visit, and visits closed early (`--max-open-visits`).
    pub late_requests: u64,
    pub closed_early: u64,
}

impl Default for Counts {
    fn default() -> Self {
        Counts::new(&Dimension::defaults(), DEFAULT_TOP_K)
    }
}

/// A slice as written: (site, country, bot).
type SliceKey<'a> = (&'a str, CountryCode, bool);

impl Counts {
    /// Empty counts of `dimensions`, each bounded to `top_k` values per hour and slice.
    pub fn new(dimensions: &[Dimension], top_k: usize) -> Counts {
        Counts {
            countries: HashMap::new(),
            sites: Vec::new(),
            site_index: HashMap::new(),
            slices: Vec::new(),
            slice_index: HashMap::new(),
            dimensions: dimensions.iter().map(|&d| (d, HashMap::new())).collect(),
            top_k,
            minutes: HashMap::new(),
            uniques: HashMap::new(),
            histograms: HashMap::new(),
            unreadable: 0,
            sessions: None,
            visits: HashMap::new(),
            session_flush: None,
            late_requests: 0,
            closed_early: 0,
        }
    }

    /// The same, counting visits as `config` cuts them.
    pub fn with_sessions(mut self, config: Option<SessionConfig>) -> Counts {
        self.sessions = config.map(Sessions::new);
        self
    }

    /// The same configuration, nothing counted.
    pub fn empty_like(&self) -> Counts {
        Counts::new(
            &self.dimensions.iter().map(|(d, _)| *d).collect::<Vec<_>>(),
            self.top_k,
        )
        .with_sessions(self.sessions.as_ref().map(|s| s.config))
    }

    /// What a flush takes out: the counts; the open visits stay, and what changed in them
    /// goes with the counts ([`Counts::session_flush`]).
    pub fn take(&mut self) -> Counts {
        let live = self.sessions.take();
        let mut out = std::mem::replace(self, self.empty_like());
        self.sessions = live;
        if let Some(s) = &mut self.sessions {
            out.session_flush = Some(s.take_flush());
        }
        out
    }

    /// Whether a flush must write this partition although no message moved its offset
    /// (visits were closed outside a message).
    pub fn must_flush(&self) -> bool {
        self.sessions.as_ref().is_some_and(Sessions::has_changes) || !self.visits.is_empty()
    }

    /// Closes the visits `sessions` closed: their counts go into this flush.
    fn count_closed(&mut self) {
        let Some(s) = &mut self.sessions else {
            return;
        };
        let mut closed = std::mem::take(&mut s.closed);
        for (run, why) in closed.drain(..) {
            if why == Closed::Early {
                self.closed_early += 1;
            }
            self.count_visit(&run);
        }
        if let Some(s) = &mut self.sessions {
            s.closed = closed;
        }
    }

    /// Counts one closed visit: its totals, entry and exit pages and duration.
    fn count_visit(&mut self, run: &Run) {
        let slice = self.slice(&run.site, run.country, false);
        let minute = run.first - run.first.rem_euclid(60);
        let hour = minute - minute.rem_euclid(3600);
        let duration = u64::try_from(run.duration()).unwrap_or(0);
        *self.visits.entry((minute, slice)).or_default() += VisitTotals {
            visits: 1,
            bounces: u64::from(run.pages == 1),
            pages: u64::from(run.pages),
            duration,
        };
        let top_k = self.top_k;
        let amount = Amount::visit(0, false);
        for (d, hours) in &mut self.dimensions {
            let value = match d {
                Dimension::EntryPage => &run.entry,
                Dimension::ExitPage => &run.exit,
                _ => continue,
            };
            hours
                .entry((hour, slice))
                .or_insert_with(|| TopK::new(top_k))
                .add(value, amount);
        }
        let day = super::rollups::day_of(run.first)
            .and_then(|d| Day::try_from(d.to_string().as_bytes()).ok());
        *self
            .histograms
            .entry((Metric::VisitDuration, day, slice, bucket_of(duration)))
            .or_default() += 1;
    }

    /// Closes every open visit (the input ended, or `--max-open-visits`).
    pub fn close_visits(&mut self, why: Closed) {
        if let Some(s) = &mut self.sessions {
            s.close_all(why);
        }
        self.count_closed();
    }

    /// Closes early the open visits whose last request is before `before` (and `at_before`
    /// of those at `before`); returns how many.
    pub fn close_visits_before(&mut self, before: i64, at_before: &mut usize) -> usize {
        let n = self
            .sessions
            .as_mut()
            .map_or(0, |s| s.close_older_than(before, at_before));
        self.count_closed();
        n
    }

    pub fn is_empty(&self) -> bool {
        self.countries.is_empty()
    }

    /// The id of slice (`site`, `country`, `bot`), added when new.
    fn slice(&mut self, site: &str, country: CountryCode, bot: bool) -> SliceId {
        let site = match self.site_index.get(site) {
            Some(&i) => i,
            None => {
                let name: &str = if self.sites.len() < MAX_SITES {
                    site
                } else {
                    OTHER
                };
                match self.site_index.get(name) {
                    Some(&i) => i,
                    None => {
                        let i = self.sites.len() as u32;
                        self.sites.push(name.into());
                        self.site_index.insert(name.into(), i);
                        i
                    }
                }
            }
        };
        let next = self.slices.len() as SliceId;
        *self
            .slice_index
            .entry((site, country, bot))
            .or_insert_with(|| {
                self.slices.push((site, country, bot));
                next
            })
    }

    /// Slice `id` as (site, country, bot).
    fn slice_key(&self, id: SliceId) -> SliceKey<'_> {
        let (site, country, bot) = self.slices[id as usize];
        (&self.sites[site as usize], country, bot)
    }

    /// Counts one visit from `country` (the event's key); `event` is `None` when its JSON
    /// could not be read (then only the country is counted, and [`Counts::unreadable`]).
    pub fn add(&mut self, country: CountryCode, event: Option<&PageView<'_>>, buf: &mut String) {
        *self.countries.entry(country).or_insert(0) += 1;
        let Some(event) = event else {
            self.unreadable += 1;
            return;
        };
        // Events from another producer or an earlier version may not follow the value
        // policy: it is applied again where a value becomes a key.
        let amount = Amount::visit(policy::response_bytes(event.bytes), event.is_bot);
        let site = policy::bounded(event.vhost.as_deref().unwrap_or(""));
        let slice = self.slice(&site, country, event.is_bot);
        let minute = minute_of(&event.time);
        let hour = minute.map_or(NO_HOUR, |m| m - m.rem_euclid(3600));
        let top_k = self.top_k;
        for (d, hours) in &mut self.dimensions {
            if let Some(v) = d.value(event, &country, buf) {
                hours
                    .entry((hour, slice))
                    .or_insert_with(|| TopK::new(top_k))
                    .add(&policy::bounded(v), amount);
            }
        }
        if let Some(minute) = minute {
            *self.minutes.entry((minute, slice)).or_default() += amount;
        }
        let day = event
            .time
            .get(..10)
            .and_then(|d| Day::try_from(d.as_bytes()).ok());
        if let Some(day) = day {
            let id = event
                .visitor
                .as_deref()
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or_else(|| {
                    // Events written before the visitor id: the client as far as the event
                    // tells it.
                    buf.clear();
                    buf.push_str(&event.browser);
                    buf.push_str(&event.browser_version);
                    buf.push_str(&event.os);
                    let day = std::str::from_utf8(&day).unwrap_or("");
                    crate::event::visitor_id(&event.ip, day, buf)
                });
            self.uniques.entry((day, slice)).or_default().add(id);
        }
        *self
            .histograms
            .entry((Metric::Bytes, day, slice, bucket_of(amount.bytes)))
            .or_default() += 1;
        if let Some(s) = &mut self.sessions
            && !event.is_bot
            && let Some(client) = event.client.as_deref()
            && let Ok(client) = u64::from_str_radix(client, 16)
            && let Some(time) = second_of(&event.time)
        {
            let path = path_of(&event.path);
            if !is_static(path) {
                let request = PageRequest {
                    visitor: visitor_key(s.config.salt, client),
                    time,
                    path: &policy::bounded(path),
                    site: &site,
                    country,
                    source: event.source.map_or(-1, |s| s.partition),
                };
                if !s.add(&request) {
                    self.late_requests += 1;
                }
                if !s.closed.is_empty() {
                    self.count_closed();
                }
            }
        }
        if let Some(t) = event.request_time_us {
            *self
                .histograms
                .entry((
                    Metric::RequestTime,
                    day,
                    slice,
                    bucket_of(policy::request_time_us(t)),
                ))
                .or_default() += 1;
        }
    }

    /// Adds `other`'s counts (a failed flush's, given back).
    pub fn merge(&mut self, other: Counts) {
        for (c, n) in &other.countries {
            *self.countries.entry(*c).or_insert(0) += n;
        }
        let ids: Vec<SliceId> = (0..other.slices.len() as SliceId)
            .map(|id| {
                let (site, country, bot) = other.slice_key(id);
                self.slice(site, country, bot)
            })
            .collect();
        let id = |s: SliceId| ids[s as usize];
        let top_k = self.top_k;
        for (d, hours) in other.dimensions {
            let mine = match self.dimensions.iter().position(|(m, _)| *m == d) {
                Some(i) => &mut self.dimensions[i].1,
                None => {
                    self.dimensions.push((d, HashMap::new()));
                    &mut self.dimensions.last_mut().expect("just pushed").1
                }
            };
            for ((hour, s), top) in hours {
                mine.entry((hour, id(s)))
                    .or_insert_with(|| TopK::new(top_k))
                    .merge(top);
            }
        }
        for ((m, s), a) in other.minutes {
            *self.minutes.entry((m, id(s))).or_default() += a;
        }
        for ((day, s), h) in other.uniques {
            self.uniques.entry((day, id(s))).or_default().merge(&h);
        }
        for ((metric, day, s, bucket), n) in other.histograms {
            *self
                .histograms
                .entry((metric, day, id(s), bucket))
                .or_default() += n;
        }
        self.unreadable += other.unreadable;
        for ((m, s), t) in other.visits {
            *self.visits.entry((m, id(s))).or_default() += t;
        }
        if let (Some(s), Some(f)) = (&mut self.sessions, &other.session_flush) {
            s.restore(f);
        }
        self.late_requests += other.late_requests;
        self.closed_early += other.closed_early;
    }

    /// Every dimension's values per hour and slice: (dimension, hour start or [`NO_HOUR`],
    /// slice, values).
    pub fn dimensions(&self) -> impl Iterator<Item = (Dimension, i64, SliceKey<'_>, &TopK)> {
        self.dimensions.iter().flat_map(move |(d, hours)| {
            hours
                .iter()
                .map(move |((h, s), t)| (*d, *h, self.slice_key(*s), t))
        })
    }

    /// Visits per minute and slice.
    pub fn minutes(&self) -> impl Iterator<Item = (i64, SliceKey<'_>, Amount)> {
        self.minutes
            .iter()
            .map(|(&(m, s), &a)| (m, self.slice_key(s), a))
    }
}

/// The day (`YYYY-MM-DD`) of a time in seconds since the epoch.
fn day_text(seconds: i64) -> String {
    super::rollups::day_of(seconds).map_or_else(String::new, |d| d.to_string())
}

/// Adds what `counts` (one per flushed partition) counted to `batch`, summed over
/// partitions and sorted. With a retention (seconds), minutes and hours older than that
/// before the newest one written (but never later than `keep.latest`) are deleted by the
/// same flush, and the flush keeps `keep.values` values per dimension (and per dimension,
/// period and slice in the rollups).
pub fn fill_batch<'a>(
    batch: &mut CountsFlush,
    counts: impl Iterator<Item = &'a Counts>,
    keep: Keep,
) {
    let retention = keep.retention;
    batch.keep_values = Some(keep.values);
    let mut countries: HashMap<CountryCode, u64> = HashMap::new();
    let mut values: HashMap<(Dimension, &str), Amount> = HashMap::new();
    let mut minutes: HashMap<(i64, CountryCode), Amount> = HashMap::new();
    let mut uniques: HashMap<(Day, Option<CountryCode>), Hll> = HashMap::new();
    let mut histograms: HashMap<(Metric, Option<CountryCode>, i32), u64> = HashMap::new();
    let mut hourly: HashMap<(Dimension, i64, &str), Amount> = HashMap::new();
    let r = &mut batch.rollups;
    let slice = |(site, country, bot): SliceKey<'_>| Slice {
        site: site.to_owned(),
        country: country.as_str().to_owned(),
        bot,
    };
    // Days of hours, formatted once per hour.
    let mut days: HashMap<i64, String> = HashMap::new();
    let mut visit_days: BTreeMap<(String, String, String), VisitTotals> = BTreeMap::new();
    let mut visit_minutes: BTreeMap<(i64, String, String), u64> = BTreeMap::new();
    for c in counts {
        for (&(minute, s), &t) in &c.visits {
            let (site, country, _) = c.slice_key(s);
            let hour = minute - minute.rem_euclid(3600);
            let day = days.entry(hour).or_insert_with(|| day_text(hour)).clone();
            let (site, country) = (site.to_owned(), country.as_str().to_owned());
            *visit_minutes
                .entry((minute, site.clone(), country.clone()))
                .or_default() += t.visits;
            *visit_days.entry((day, site, country)).or_default() += t;
        }
        batch.visits.late += c.late_requests;
        batch.visits.closed_early += c.closed_early;
        for (&(day, s), h) in &c.uniques {
            let (site, country, bot) = c.slice_key(s);
            // Each sketch per country, merged into the day's sketch of all countries, and
            // per slice.
            for key in [(day, Some(country)), (day, None)] {
                uniques.entry(key).or_default().merge(h);
            }
            let day = String::from_utf8_lossy(&day).into_owned();
            r.uniques
                .entry((day, slice((site, country, bot))))
                .or_default()
                .merge(h);
        }
        for (&(metric, day, s, bucket), &n) in &c.histograms {
            let (site, country, bot) = c.slice_key(s);
            for key in [(metric, Some(country), bucket), (metric, None, bucket)] {
                *histograms.entry(key).or_default() += n;
            }
            if let Some(day) = day {
                let day = String::from_utf8_lossy(&day).into_owned();
                let key = (
                    metric.name().to_owned(),
                    day,
                    slice((site, country, bot)),
                    bucket,
                );
                *r.histograms.entry(key).or_default() += n;
            }
        }
        for (&country, &n) in &c.countries {
            *countries.entry(country).or_insert(0) += n;
        }
        for (d, hour, s, top) in c.dimensions() {
            for (value, amount) in top.entries() {
                *values.entry((d, value)).or_default() += amount;
                if hour != NO_HOUR {
                    *hourly.entry((d, hour, value)).or_default() += amount;
                    let day = days.entry(hour).or_insert_with(|| day_text(hour)).clone();
                    let (name, value) = (d.name().to_owned(), value.to_owned());
                    *r.day_values
                        .entry((name.clone(), day, slice(s), value.clone()))
                        .or_default() += amount;
                    *r.hour_values
                        .entry((name, hour, slice(s), value))
                        .or_default() += amount;
                }
            }
        }
        for (minute, s, amount) in c.minutes() {
            *minutes.entry((minute, s.1)).or_default() += amount;
            let hour = minute - minute.rem_euclid(3600);
            let day = days.entry(hour).or_insert_with(|| day_text(hour)).clone();
            *r.days.entry((day, slice(s))).or_default() += amount;
            *r.minutes.entry((minute, slice(s))).or_default() += amount;
        }
    }
    batch.increments = countries
        .into_iter()
        .map(|(c, n)| (c.as_str().to_owned(), n))
        .collect();
    batch.increments.sort();
    batch.dimensions = values
        .into_iter()
        .map(|((d, value), amount)| DimensionIncrement {
            dimension: d.name().to_owned(),
            value: value.to_owned(),
            amount,
        })
        .collect();
    batch.dimensions.sort();
    batch.prune_hours_before = retention
        .zip(hourly.keys().map(|(_, h, _)| *h).max())
        .map(|(r, newest)| newest.min(keep.latest).saturating_sub(r));
    batch.dimension_hours = hourly
        .into_iter()
        .map(|((d, hour, value), amount)| DimensionHourIncrement {
            dimension: d.name().to_owned(),
            hour,
            value: value.to_owned(),
            amount,
        })
        .collect();
    batch.dimension_hours.sort();
    batch.prune_minutes_before = retention
        .zip(minutes.keys().map(|(m, _)| *m).max())
        .map(|(r, newest)| newest.min(keep.latest).saturating_sub(r));
    batch.minutes = minutes
        .into_iter()
        .map(|((minute, c), amount)| MinuteIncrement {
            minute,
            country_code: c.as_str().to_owned(),
            amount,
        })
        .collect();
    batch.minutes.sort();
    let scope = |c: Option<CountryCode>| {
        c.map_or_else(|| ALL_COUNTRIES.to_owned(), |c| c.as_str().to_owned())
    };
    batch.uniques = uniques
        .into_iter()
        .map(|((day, country), h)| UniqueSketch {
            day: String::from_utf8_lossy(&day).into_owned(),
            country_code: scope(country),
            sketch: h,
        })
        .collect();
    batch
        .uniques
        .sort_by(|a, b| (&a.day, &a.country_code).cmp(&(&b.day, &b.country_code)));
    batch.histograms = histograms
        .into_iter()
        .map(|((metric, country, bucket), count)| HistogramIncrement {
            metric: metric.name().to_owned(),
            scope: scope(country),
            bucket,
            count,
        })
        .collect();
    batch.histograms.sort();
    batch.visits.days = visit_days.into_iter().collect();
    batch.visits.minutes = visit_minutes.into_iter().collect();
}

/// The start of the minute of an RFC 3339 time, in seconds since the epoch. The events'
/// own form (`2024-01-01T09:00:00Z`, read for every event) is taken apart by position;
/// anything else goes through chrono's parser.
pub fn minute_of(time: &str) -> Option<i64> {
    second_of(time).map(|t| t - t.rem_euclid(60))
}

/// An RFC 3339 time in seconds since the epoch (see [`minute_of`]).
pub fn second_of(time: &str) -> Option<i64> {
    let b = time.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        b.get(r)?.iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let fast = || {
        if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
            return None;
        }
        let date = chrono::NaiveDate::from_ymd_opt(
            i32::try_from(digits(0..4)?).ok()?,
            digits(5..7)?,
            digits(8..10)?,
        )?;
        if b[13] != b':' || b[16] != b':' {
            return None;
        }
        let t = date.and_hms_opt(digits(11..13)?, digits(14..16)?, digits(17..19)?)?;
        Some(t.and_utc().timestamp())
    };
    fast().or_else(|| Some(chrono::DateTime::parse_from_rfc3339(time).ok()?.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn event(path: &str, status: u16, referrer: Option<&str>) -> PageView<'static> {
        PageView {
            time: Cow::Borrowed("2026-01-01T09:05:30Z"),
            ip: Cow::Borrowed("81.2.69.142"),
            country_code: Cow::Borrowed("GB"),
            browser: Cow::Borrowed("Chrome"),
            browser_version: Cow::Borrowed("120.0.6099.71"),
            os: Cow::Borrowed("Windows"),
            device: Cow::Borrowed("desktop"),
            is_bot: false,
            method: Cow::Borrowed("GET"),
            path: Cow::Owned(path.to_owned()),
            status,
            bytes: 100,
            referrer: referrer.map(|r| Cow::Owned(r.to_owned())),
            vhost: None,
            request_time_us: None,
            visitor: None,
            client: None,
            source: None,
        }
    }

    fn values(e: &PageView<'_>) -> Vec<(&'static str, Option<String>)> {
        let cc = CountryCode::parse(&e.country_code).unwrap();
        let mut buf = String::new();
        Dimension::ALL
            .iter()
            .map(|d| (d.name(), d.value(e, &cc, &mut buf).map(str::to_owned)))
            .collect()
    }

    #[test]
    fn every_dimension_extracts_its_value() {
        let e = event(
            "/img/Logo.PNG?v=3",
            404,
            Some("https://User@Search.Example:8443/q?x=1"),
        );
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(
            values(&e),
            vec![
                ("country", s("GB")),
                ("continent", s("Europe")),
                ("browser", s("Chrome 120")),
                ("os", s("Windows")),
                ("device", s("desktop")),
                ("visitor_type", s("human")),
                ("path", s("/img/Logo.PNG")),
                ("static_path", s("/img/Logo.PNG")),
                ("not_found", s("/img/Logo.PNG")),
                ("referrer", s("search.example")),
                ("status", s("404")),
                ("status_class", s("4xx")),
                ("hour", s("09")),
                ("vhost", None),
                ("host", s("81.2.69.142")),
                // Counted per visit, when it closes.
                ("entry_page", None),
                ("exit_page", None),
            ]
        );
        let mut bot = event("/about", 200, None);
        bot.is_bot = true;
        bot.browser_version = Cow::Borrowed("");
        bot.vhost = Some(Cow::Borrowed("www.example.com"));
        let v = values(&bot);
        assert_eq!(v[2], ("browser", s("Chrome")));
        assert_eq!(v[5], ("visitor_type", s("bot")));
        assert_eq!(v[7], ("static_path", None));
        assert_eq!(v[8], ("not_found", None));
        assert_eq!(v[9], ("referrer", None));
        assert_eq!(v[13], ("vhost", s("www.example.com")));
    }

    #[test]
    fn referrer_hosts() {
        assert_eq!(referrer_host("https://a.example/x"), Some("a.example"));
        assert_eq!(
            referrer_host("http://[2001:db8::1]:80/"),
            Some("[2001:db8::1]")
        );
        assert_eq!(
            referrer_host("android-app://com.google.app"),
            Some("com.google.app")
        );
        assert_eq!(referrer_host("b.example/path"), Some("b.example"));
        assert_eq!(referrer_host("-"), None);
        assert_eq!(referrer_host(""), None);
        assert_eq!(referrer_host("https:///nohost"), None);
    }

    #[test]
    fn dimension_lists() {
        assert_eq!(
            parse_dimensions("country, path,country").unwrap(),
            vec![Dimension::Country, Dimension::Path]
        );
        assert!(
            !parse_dimensions("default")
                .unwrap()
                .contains(&Dimension::Host)
        );
        assert_eq!(parse_dimensions("all").unwrap().len(), Dimension::ALL.len());
        let err = parse_dimensions("country,colour").unwrap_err();
        assert!(
            err.starts_with("unknown dimension \"colour\"; known: country, continent"),
            "{err}"
        );
    }

    /// (value, visits, bytes), sorted.
    type Rows = Vec<(String, u64, u64)>;

    fn sorted(t: &TopK) -> Rows {
        let mut v: Vec<_> = t
            .entries()
            .map(|(k, a)| (k.to_owned(), a.visits, a.bytes))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn top_k_is_exact_below_its_capacity() {
        let mut t = TopK::new(3);
        for v in ["a", "b", "a", "c", "a", "b"] {
            t.add(v, Amount::visit(10, false));
        }
        assert_eq!(
            sorted(&t),
            vec![
                ("a".into(), 3, 30),
                ("b".into(), 2, 20),
                ("c".into(), 1, 10)
            ]
        );
    }

    /// Over capacity: the sum stays exact, each value is a lower bound within N/K of its
    /// true count, and the heavy hitters keep their slots.
    #[test]
    fn top_k_over_capacity_keeps_its_bound() {
        let k = 10;
        let mut t = TopK::new(k);
        let mut truth: HashMap<String, u64> = HashMap::new();
        let mut n = 0u64;
        // Three heavy values among a stream of distinct ones.
        for i in 0..5000u64 {
            let v = match i % 5 {
                0 => "heavy-a".to_owned(),
                1 => "heavy-b".to_owned(),
                2 if i % 3 == 0 => "heavy-c".to_owned(),
                _ => format!("rare-{i}"),
            };
            t.add(&v, Amount::visit(7, i % 2 == 0));
            *truth.entry(v).or_insert(0) += 1;
            n += 1;
        }
        let entries = sorted(&t);
        assert!(entries.len() <= k + 1);
        assert_eq!(entries.iter().map(|e| e.1).sum::<u64>(), n);
        assert_eq!(entries.iter().map(|e| e.2).sum::<u64>(), n * 7);
        for (v, visits, bytes) in &entries {
            assert_eq!(*bytes, visits * 7);
            if v != OTHER {
                let real = truth[v];
                assert!(*visits <= real, "{v}: {visits} > {real}");
                assert!(real - visits <= n / k as u64, "{v}: {visits} vs {real}");
            }
        }
        for heavy in ["heavy-a", "heavy-b", "heavy-c"] {
            assert!(
                entries.iter().any(|e| e.0 == heavy),
                "{heavy} lost its slot"
            );
        }
    }

    #[test]
    fn counts_merge_back() {
        let mut a = Counts::new(&[Dimension::Path, Dimension::Status], 10);
        let mut buf = String::new();
        let gb = CountryCode::parse("GB").unwrap();
        a.add(gb, Some(&event("/x", 200, None)), &mut buf);
        let mut b = a.empty_like();
        b.add(gb, Some(&event("/x?q", 404, None)), &mut buf);
        b.add(gb, None, &mut buf);
        a.merge(b);
        assert_eq!(a.countries[&gb], 3);
        assert_eq!(a.unreadable, 1);
        let mut dims: Vec<(Dimension, Rows)> =
            a.dimensions().map(|(d, _, _, t)| (d, sorted(t))).collect();
        dims.sort();
        assert_eq!(
            dims,
            vec![
                (Dimension::Path, vec![("/x".into(), 2, 200)]),
                (
                    Dimension::Status,
                    vec![("200".into(), 1, 100), ("404".into(), 1, 100)]
                ),
            ]
        );
        let minute = minute_of("2026-01-01T09:05:30Z").unwrap();
        assert_eq!(minute, 1_767_258_300);
        // Other RFC 3339 forms go through chrono; nonsense is no minute.
        assert_eq!(minute_of("2026-01-01T10:05:59+01:00"), Some(1_767_258_300));
        assert_eq!(minute_of("2026-01-01T09:05:00.123Z"), Some(1_767_258_300));
        assert_eq!(minute_of("2026-13-01T09:05:00Z"), None);
        assert_eq!(minute_of("yesterday"), None);
        assert_eq!(
            a.minutes().collect::<Vec<_>>(),
            vec![(
                minute,
                ("", gb, false),
                Amount {
                    visits: 2,
                    bytes: 200,
                    humans: 2
                }
            )]
        );
    }

    /// A flush sums the partitions' counts per value, `(other)` included.
    #[test]
    fn a_flush_sums_partitions() {
        let mut buf = String::new();
        let (gb, us) = (
            CountryCode::parse("GB").unwrap(),
            CountryCode::parse("US").unwrap(),
        );
        let mut p0 = Counts::new(&[Dimension::Path], 1);
        p0.add(gb, Some(&event("/a", 200, None)), &mut buf);
        p0.add(gb, Some(&event("/b", 200, None)), &mut buf);
        let mut p1 = p0.empty_like();
        p1.add(us, Some(&event("/a", 200, None)), &mut buf);
        let mut later = event("/a", 200, None);
        later.time = Cow::Borrowed("2026-01-01T10:00:00Z");
        p1.add(us, Some(&later), &mut buf);
        let mut batch = CountsFlush::default();
        let keep = Keep {
            retention: Some(3600),
            latest: i64::MAX,
            values: 10,
        };
        fill_batch(&mut batch, [&p0, &p1].into_iter(), keep);
        assert_eq!(batch.increments, vec![("GB".into(), 2), ("US".into(), 2)]);
        let dims: Vec<(&str, u64, u64)> = batch
            .dimensions
            .iter()
            .map(|d| (d.value.as_str(), d.amount.visits, d.amount.bytes))
            .collect();
        // Partition 0 had one slot: `/b` took it from `/a`, whose visit went to `(other)`.
        assert_eq!(
            dims,
            vec![("(other)", 1, 100), ("/a", 2, 200), ("/b", 1, 100)]
        );
        let nine = minute_of("2026-01-01T09:05:00Z").unwrap();
        let ten = minute_of("2026-01-01T10:00:00Z").unwrap();
        let minutes: Vec<(i64, &str, u64)> = batch
            .minutes
            .iter()
            .map(|m| (m.minute, m.country_code.as_str(), m.amount.visits))
            .collect();
        assert_eq!(
            minutes,
            vec![(nine, "GB", 2), (nine, "US", 1), (ten, "US", 1)]
        );
        assert_eq!(batch.prune_minutes_before, Some(ten - 3600));
        // The same values per hour of event time (09:00 and 10:00), each within its own top-K.
        let hours: Vec<(i64, &str, u64)> = batch
            .dimension_hours
            .iter()
            .map(|d| (d.hour, d.value.as_str(), d.amount.visits))
            .collect();
        let nine = nine - 5 * 60;
        assert_eq!(
            hours,
            vec![
                (nine, "(other)", 1),
                (nine, "/a", 1),
                (nine, "/b", 1),
                (ten, "/a", 1)
            ]
        );
        assert_eq!(batch.prune_hours_before, Some(ten - 3600));
    }

    /// The rollups keep every slice (site, country, visitor type) apart, per day, hour and
    /// minute, and each slice has its own top-K; the all-time rows are their sums.
    #[test]
    fn a_flush_writes_each_slice_apart() {
        let mut buf = String::new();
        let (gb, us) = (
            CountryCode::parse("GB").unwrap(),
            CountryCode::parse("US").unwrap(),
        );
        let on = |site: &str, path: &str, time: &'static str, bot: bool| {
            let mut e = event(path, 200, None);
            e.vhost = Some(Cow::Owned(site.to_owned()));
            e.time = Cow::Borrowed(time);
            e.is_bot = bot;
            e
        };
        let mut p0 = Counts::new(&[Dimension::Path], 1);
        p0.add(
            gb,
            Some(&on("a.example", "/x", "2026-01-01T09:05:30Z", false)),
            &mut buf,
        );
        p0.add(
            gb,
            Some(&on("b.example", "/y", "2026-01-01T09:06:00Z", false)),
            &mut buf,
        );
        p0.add(
            gb,
            Some(&on("a.example", "/x", "2026-01-02T00:00:00Z", true)),
            &mut buf,
        );
        let mut p1 = p0.empty_like();
        p1.add(
            us,
            Some(&on("a.example", "/x", "2026-01-01T23:59:59Z", false)),
            &mut buf,
        );
        let mut batch = CountsFlush::default();
        let keep = Keep {
            retention: None,
            latest: i64::MAX,
            values: 10,
        };
        fill_batch(&mut batch, [&p0, &p1].into_iter(), keep);
        let slice = |site: &str, country: &str, bot: bool| Slice {
            site: site.into(),
            country: country.into(),
            bot,
        };
        let days: Vec<(&str, &Slice, u64)> = batch
            .rollups
            .days
            .iter()
            .map(|((d, s), a)| (d.as_str(), s, a.visits))
            .collect();
        assert_eq!(
            days,
            vec![
                ("2026-01-01", &slice("a.example", "GB", false), 1),
                ("2026-01-01", &slice("a.example", "US", false), 1),
                ("2026-01-01", &slice("b.example", "GB", false), 1),
                ("2026-01-02", &slice("a.example", "GB", true), 1),
            ]
        );
        // One slot per (hour, slice): `/x` and `/y` are in different slices, so nothing
        // goes to `(other)`, unlike one top-K per hour.
        let values: Vec<(&str, &str, &str, u64)> = batch
            .rollups
            .day_values
            .iter()
            .map(|((_, d, s, v), a)| (d.as_str(), s.site.as_str(), v.as_str(), a.visits))
            .collect();
        assert_eq!(
            values,
            vec![
                ("2026-01-01", "a.example", "/x", 1),
                ("2026-01-01", "a.example", "/x", 1),
                ("2026-01-01", "b.example", "/y", 1),
                ("2026-01-02", "a.example", "/x", 1),
            ]
        );
        assert_eq!(batch.rollups.hour_values.len(), 4);
        assert_eq!(batch.rollups.minutes.len(), 4);
        assert_eq!(batch.rollups.uniques.len(), 4);
        assert_eq!(
            batch.rollups.histograms.values().sum::<u64>(),
            4,
            "one bytes bucket per visit"
        );
        let all_time: Vec<(&str, u64)> = batch
            .dimensions
            .iter()
            .map(|d| (d.value.as_str(), d.amount.visits))
            .collect();
        assert_eq!(all_time, vec![("/x", 3), ("/y", 1)]);
    }

    /// Sites beyond [`MAX_SITES`] in one interval count under `(other)`.
    #[test]
    fn sites_are_bounded() {
        let mut buf = String::new();
        let gb = CountryCode::parse("GB").unwrap();
        let mut c = Counts::new(&[], 1);
        for i in 0..MAX_SITES + 5 {
            let mut e = event("/", 200, None);
            e.vhost = Some(Cow::Owned(format!("s{i}.example")));
            c.add(gb, Some(&e), &mut buf);
        }
        assert_eq!(c.sites.len(), MAX_SITES + 1);
        let other: u64 = c
            .minutes()
            .filter(|(_, s, _)| s.0 == OTHER)
            .map(|(_, _, a)| a.visits)
            .sum();
        assert_eq!(other, 5);
    }
}
