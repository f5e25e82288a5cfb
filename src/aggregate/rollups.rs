//! The filterable counts: every figure of the page per *slice* of the traffic — (site,
//! country, visitor type) — and per day (kept for all time), per hour and per minute (kept
//! as long as the time series). A filter (a range of days, a site, a country, humans or
//! bots) is a `WHERE` on these keys and a sum over the rest; unique visitors are a union of
//! the day sketches, never a sum.
//!
//! The events are keyed by country, so each aggregator owns whole countries: two aggregators
//! never write the same row in one period, and the rows stay additive. Each (dimension,
//! period, slice) keeps at most `--keep-values` values; the flush folds the rest into
//! `(other)` (the hostile-traffic bound, per key).
//!
//! The unfiltered all-time panels keep reading the running totals of [`super::tables`]
//! (one row per value instead of a sum over every day).

use std::collections::{BTreeMap, HashMap};

use crate::sketch::Hll;
use crate::store::sql::{Merge, Tx, Ty, Upsert, Value, args, capped_sum};
use crate::store::{Schema, SqlType, Store, StoreError, reading};

use super::tables::{Amount, DimensionCounts, INVALID, MinutePoint, OTHER, read_dimension};

const SLICE_COLUMNS: [(&str, SqlType); 3] = [
    ("site", SqlType::Text),
    ("country", SqlType::Text),
    ("bot", SqlType::Integer),
];

pub const SCHEMA: Schema = Schema {
    migrations: &[
        // Visits and bytes per day (`YYYY-MM-DD`, event time, UTC) and slice: the countries
        // panel, the totals and the daily time series of any filter. Kept for all time.
        "CREATE TABLE IF NOT EXISTS day_totals (
            day TEXT NOT NULL,
            site TEXT NOT NULL,
            country TEXT NOT NULL,
            bot INTEGER NOT NULL,
            visits BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            PRIMARY KEY (day, site, country, bot))",
        // The same per minute (seconds since the epoch), kept as long as the time series.
        "CREATE TABLE IF NOT EXISTS minute_totals (
            minute BIGINT NOT NULL,
            site TEXT NOT NULL,
            country TEXT NOT NULL,
            bot INTEGER NOT NULL,
            visits BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            PRIMARY KEY (minute, site, country, bot))",
        // Every dimension's values per day and slice, kept for all time.
        "CREATE TABLE IF NOT EXISTS day_values (
            dimension TEXT NOT NULL,
            day TEXT NOT NULL,
            site TEXT NOT NULL,
            country TEXT NOT NULL,
            bot INTEGER NOT NULL,
            value TEXT NOT NULL,
            visits BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            PRIMARY KEY (dimension, day, site, country, bot, value))",
        // The same per hour (seconds since the epoch), kept as long as the time series.
        "CREATE TABLE IF NOT EXISTS hour_values (
            dimension TEXT NOT NULL,
            hour BIGINT NOT NULL,
            site TEXT NOT NULL,
            country TEXT NOT NULL,
            bot INTEGER NOT NULL,
            value TEXT NOT NULL,
            visits BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            PRIMARY KEY (dimension, hour, site, country, bot, value))",
        // Per (dimension, day or hour, slice): an upper bound of the values stored (the values
        // written since its last exact count). Compaction looks only at the keys over
        // `--keep-values`, instead of counting every key's values at every flush.
        "CREATE TABLE IF NOT EXISTS day_value_slices (
            dimension TEXT NOT NULL,
            day TEXT NOT NULL,
            site TEXT NOT NULL,
            country TEXT NOT NULL,
            bot INTEGER NOT NULL,
            written BIGINT NOT NULL,
            PRIMARY KEY (dimension, day, site, country, bot))",
        "CREATE TABLE IF NOT EXISTS hour_value_slices (
            dimension TEXT NOT NULL,
            hour BIGINT NOT NULL,
            site TEXT NOT NULL,
            country TEXT NOT NULL,
            bot INTEGER NOT NULL,
            written BIGINT NOT NULL,
            PRIMARY KEY (dimension, hour, site, country, bot))",
        "CREATE INDEX IF NOT EXISTS day_value_slices_crowded ON day_value_slices (day, written)",
        "CREATE INDEX IF NOT EXISTS hour_value_slices_crowded ON hour_value_slices (hour, written)",
        // Unique-visitor sketches per day and slice (crate::sketch, compact form).
        "CREATE TABLE IF NOT EXISTS day_uniques (
            day TEXT NOT NULL,
            site TEXT NOT NULL,
            country TEXT NOT NULL,
            bot INTEGER NOT NULL,
            registers BYTEA NOT NULL,
            PRIMARY KEY (day, site, country, bot))",
        // Histogram buckets per day and slice.
        "CREATE TABLE IF NOT EXISTS day_histograms (
            metric TEXT NOT NULL,
            day TEXT NOT NULL,
            site TEXT NOT NULL,
            country TEXT NOT NULL,
            bot INTEGER NOT NULL,
            bucket INTEGER NOT NULL,
            visits BIGINT NOT NULL,
            PRIMARY KEY (metric, day, site, country, bot, bucket))",
    ],
    columns: &[
        (
            "day_totals",
            &[
                ("day", SqlType::Text),
                SLICE_COLUMNS[0],
                SLICE_COLUMNS[1],
                SLICE_COLUMNS[2],
                ("visits", SqlType::BigInt),
                ("bytes", SqlType::BigInt),
            ],
        ),
        (
            "minute_totals",
            &[
                ("minute", SqlType::BigInt),
                SLICE_COLUMNS[0],
                SLICE_COLUMNS[1],
                SLICE_COLUMNS[2],
                ("visits", SqlType::BigInt),
                ("bytes", SqlType::BigInt),
            ],
        ),
        (
            "day_values",
            &[
                ("dimension", SqlType::Text),
                ("day", SqlType::Text),
                SLICE_COLUMNS[0],
                SLICE_COLUMNS[1],
                SLICE_COLUMNS[2],
                ("value", SqlType::Text),
                ("visits", SqlType::BigInt),
                ("bytes", SqlType::BigInt),
            ],
        ),
        (
            "hour_values",
            &[
                ("dimension", SqlType::Text),
                ("hour", SqlType::BigInt),
                SLICE_COLUMNS[0],
                SLICE_COLUMNS[1],
                SLICE_COLUMNS[2],
                ("value", SqlType::Text),
                ("visits", SqlType::BigInt),
                ("bytes", SqlType::BigInt),
            ],
        ),
        (
            "day_value_slices",
            &[
                ("dimension", SqlType::Text),
                ("day", SqlType::Text),
                SLICE_COLUMNS[0],
                SLICE_COLUMNS[1],
                SLICE_COLUMNS[2],
                ("written", SqlType::BigInt),
            ],
        ),
        (
            "hour_value_slices",
            &[
                ("dimension", SqlType::Text),
                ("hour", SqlType::BigInt),
                SLICE_COLUMNS[0],
                SLICE_COLUMNS[1],
                SLICE_COLUMNS[2],
                ("written", SqlType::BigInt),
            ],
        ),
        (
            "day_uniques",
            &[
                ("day", SqlType::Text),
                SLICE_COLUMNS[0],
                SLICE_COLUMNS[1],
                SLICE_COLUMNS[2],
                ("registers", SqlType::Bytes),
            ],
        ),
        (
            "day_histograms",
            &[
                ("metric", SqlType::Text),
                ("day", SqlType::Text),
                SLICE_COLUMNS[0],
                SLICE_COLUMNS[1],
                SLICE_COLUMNS[2],
                ("bucket", SqlType::Integer),
                ("visits", SqlType::BigInt),
            ],
        ),
    ],
};

/// A slice of the traffic: what a filter selects besides the days.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slice {
    /// The virtual host as the `vhost` dimension shows it; empty when the log has none.
    pub site: String,
    pub country: String,
    pub bot: bool,
}

impl Slice {
    fn values(&self) -> [Value; 3] {
        [
            Value::from(self.site.as_str()),
            Value::from(self.country.as_str()),
            Value::from(i64::from(self.bot)),
        ]
    }
}

/// The rows one flush adds to the rollups, each list sorted by key with one row per key
/// (PostgreSQL refuses an upsert that touches a row twice).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rollups {
    /// (day, slice) → visits and bytes.
    pub days: BTreeMap<(String, Slice), Amount>,
    /// (minute, slice) → visits and bytes.
    pub minutes: BTreeMap<(i64, Slice), Amount>,
    /// (dimension, day, slice, value) → visits and bytes.
    pub day_values: BTreeMap<(String, String, Slice, String), Amount>,
    /// (dimension, hour, slice, value) → visits and bytes.
    pub hour_values: BTreeMap<(String, i64, Slice, String), Amount>,
    /// (day, slice) → the visitors seen, merged into the stored sketch.
    pub uniques: BTreeMap<(String, Slice), Hll>,
    /// (metric, day, slice, bucket) → visits.
    pub histograms: BTreeMap<(String, String, Slice, i32), u64>,
}

const TOTALS: [(&str, Ty, Merge); 2] = [
    ("visits", Ty::Int8, Merge::SaturatingAdd),
    ("bytes", Ty::Int8, Merge::SaturatingAdd),
];

const SLICE_KEYS: [(&str, Ty); 3] = [("site", Ty::Text), ("country", Ty::Text), ("bot", Ty::Int4)];

const DAY_TOTALS: Upsert = Upsert {
    table: "day_totals",
    keys: &[
        ("day", Ty::Text),
        SLICE_KEYS[0],
        SLICE_KEYS[1],
        SLICE_KEYS[2],
    ],
    values: &TOTALS,
};

const MINUTE_TOTALS: Upsert = Upsert {
    table: "minute_totals",
    keys: &[
        ("minute", Ty::Int8),
        SLICE_KEYS[0],
        SLICE_KEYS[1],
        SLICE_KEYS[2],
    ],
    values: &TOTALS,
};

const DAY_VALUES: Upsert = Upsert {
    table: "day_values",
    keys: &[
        ("dimension", Ty::Text),
        ("day", Ty::Text),
        SLICE_KEYS[0],
        SLICE_KEYS[1],
        SLICE_KEYS[2],
        ("value", Ty::Text),
    ],
    values: &TOTALS,
};

const HOUR_VALUES: Upsert = Upsert {
    table: "hour_values",
    keys: &[
        ("dimension", Ty::Text),
        ("hour", Ty::Int8),
        SLICE_KEYS[0],
        SLICE_KEYS[1],
        SLICE_KEYS[2],
        ("value", Ty::Text),
    ],
    values: &TOTALS,
};

const DAY_VALUE_SLICES: Upsert = Upsert {
    table: "day_value_slices",
    keys: &[
        ("dimension", Ty::Text),
        ("day", Ty::Text),
        SLICE_KEYS[0],
        SLICE_KEYS[1],
        SLICE_KEYS[2],
    ],
    values: &[("written", Ty::Int8, Merge::Add)],
};

const HOUR_VALUE_SLICES: Upsert = Upsert {
    table: "hour_value_slices",
    keys: &[
        ("dimension", Ty::Text),
        ("hour", Ty::Int8),
        SLICE_KEYS[0],
        SLICE_KEYS[1],
        SLICE_KEYS[2],
    ],
    values: &[("written", Ty::Int8, Merge::Add)],
};

const DAY_UNIQUES: Upsert = Upsert {
    table: "day_uniques",
    keys: &[
        ("day", Ty::Text),
        SLICE_KEYS[0],
        SLICE_KEYS[1],
        SLICE_KEYS[2],
    ],
    values: &[("registers", Ty::Bytes, Merge::Replace)],
};

const DAY_HISTOGRAMS: Upsert = Upsert {
    table: "day_histograms",
    keys: &[
        ("metric", Ty::Text),
        ("day", Ty::Text),
        SLICE_KEYS[0],
        SLICE_KEYS[1],
        SLICE_KEYS[2],
        ("bucket", Ty::Int4),
    ],
    values: &[("visits", Ty::Int8, Merge::Add)],
};

/// Serializes the read-merge-write of the slice sketches between aggregators (see
/// `tables::UNIQUES_LOCK`; each aggregator owns whole countries, but a rebalance can hand a
/// country over between two flushes).
const SLICE_UNIQUES_LOCK: i64 = 7061676577;

/// A row of `day_values` or `hour_values`.
fn value_row(d: &str, period: Value, s: &Slice, value: &str, a: &Amount) -> Vec<Value> {
    let mut r = vec![Value::from(d), period];
    r.extend(s.values());
    r.extend(args![value, a.visits, a.bytes]);
    r
}

/// A row of `day_totals` or `minute_totals`.
fn total_row(period: Value, s: &Slice, a: &Amount) -> Vec<Value> {
    let mut r = vec![period];
    r.extend(s.values());
    r.extend(args![a.visits, a.bytes]);
    r
}

/// Renames the values (and sites) a [`super::tables::CountsFlush::quarantine`] suspects to
/// [`INVALID`], merging rows that then share a key. Returns how many were renamed.
fn quarantine_map<K: Ord, V>(
    rows: &mut BTreeMap<K, V>,
    rename: impl Fn(&mut K) -> usize,
    add: impl Fn(&mut V, V),
) -> usize {
    let mut moved = 0;
    for (mut k, v) in std::mem::take(rows) {
        moved += rename(&mut k);
        match rows.entry(k) {
            std::collections::btree_map::Entry::Occupied(mut e) => add(e.get_mut(), v),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(v);
            }
        }
    }
    moved
}

impl Rollups {
    pub fn is_empty(&self) -> bool {
        self.days.is_empty() && self.day_values.is_empty() && self.minutes.is_empty()
    }

    /// See [`super::tables::CountsFlush::quarantine`]: suspicious values and sites become
    /// [`INVALID`].
    pub fn quarantine(&mut self, suspicious: &dyn Fn(&str) -> bool) -> usize {
        let fix = |s: &mut String| -> usize {
            if s != INVALID && suspicious(s) {
                *s = INVALID.to_owned();
                1
            } else {
                0
            }
        };
        let add = |a: &mut Amount, b: Amount| *a += b;
        quarantine_map(&mut self.days, |k| fix(&mut k.1.site), add)
            + quarantine_map(&mut self.minutes, |k| fix(&mut k.1.site), add)
            + quarantine_map(
                &mut self.day_values,
                |k| fix(&mut k.2.site) + fix(&mut k.3),
                add,
            )
            + quarantine_map(
                &mut self.hour_values,
                |k| fix(&mut k.2.site) + fix(&mut k.3),
                add,
            )
            + quarantine_map(
                &mut self.uniques,
                |k| fix(&mut k.1.site),
                |a: &mut Hll, b| a.merge(&b),
            )
            + quarantine_map(
                &mut self.histograms,
                |k| fix(&mut k.2.site),
                |a: &mut u64, b| *a = a.saturating_add(b),
            )
    }

    /// Writes the rows, prunes the minutes and hours before the given ones, folds values
    /// beyond `keep` per (dimension, period, slice) into `(other)` and merges the sketches.
    pub(super) async fn write_in(
        &self,
        tx: &Tx<'_>,
        keep: Option<u32>,
        prune_minutes_before: Option<i64>,
        prune_hours_before: Option<i64>,
    ) -> Result<(), StoreError> {
        let histograms = self
            .histograms
            .iter()
            .map(|((m, day, s, bucket), n)| {
                let mut r = args![m.as_str(), day.as_str()];
                r.extend(s.values());
                r.extend(args![*bucket, *n]);
                r
            })
            .collect();
        futures::try_join!(
            tx.upsert(
                &DAY_TOTALS,
                self.days
                    .iter()
                    .map(|((day, s), a)| total_row(Value::from(day), s, a))
                    .collect()
            ),
            tx.upsert(
                &MINUTE_TOTALS,
                self.minutes
                    .iter()
                    .map(|((m, s), a)| total_row(Value::from(*m), s, a))
                    .collect()
            ),
            tx.upsert(
                &DAY_VALUES,
                self.day_values
                    .iter()
                    .map(|((d, day, s, v), a)| value_row(d, Value::from(day), s, v, a))
                    .collect()
            ),
            tx.upsert(
                &HOUR_VALUES,
                self.hour_values
                    .iter()
                    .map(|((d, hour, s, v), a)| value_row(d, Value::from(*hour), s, v, a))
                    .collect()
            ),
            tx.upsert(&DAY_HISTOGRAMS, histograms),
        )?;
        if let Some(before) = prune_minutes_before {
            tx.execute(
                "DELETE FROM minute_totals WHERE minute < ?1",
                &args![before],
            )
            .await?;
        }
        // Values written per key: what each key's upper bound grows by.
        let mut day_keys: BTreeMap<(&str, &str, &Slice), u64> = BTreeMap::new();
        for (d, day, s, _) in self.day_values.keys() {
            *day_keys.entry((d, day, s)).or_default() += 1;
        }
        let mut hour_keys: BTreeMap<(&str, i64, &Slice), u64> = BTreeMap::new();
        for (d, hour, s, _) in self.hour_values.keys() {
            *hour_keys.entry((d, *hour, s)).or_default() += 1;
        }
        let counter = |d: &str, period: Value, s: &Slice, n: u64| {
            let mut r = vec![Value::from(d), period];
            r.extend(s.values());
            r.push(Value::from(n));
            r
        };
        futures::try_join!(
            tx.upsert(
                &DAY_VALUE_SLICES,
                day_keys
                    .iter()
                    .map(|((d, day, s), n)| counter(d, Value::from(*day), s, *n))
                    .collect()
            ),
            tx.upsert(
                &HOUR_VALUE_SLICES,
                hour_keys
                    .iter()
                    .map(|((d, hour, s), n)| counter(d, Value::from(*hour), s, *n))
                    .collect()
            ),
        )?;
        if let Some(before) = prune_hours_before {
            tx.execute("DELETE FROM hour_values WHERE hour < ?1", &args![before])
                .await?;
            tx.execute(
                "DELETE FROM hour_value_slices WHERE hour < ?1",
                &args![before],
            )
            .await?;
        }
        if let Some(keep) = keep {
            let days = day_keys.keys().map(|(_, day, _)| Value::from(*day));
            compact(tx, Period::Day, days, keep).await?;
            let hours = hour_keys.keys().map(|(_, hour, _)| Value::from(*hour));
            compact(tx, Period::Hour, hours, keep).await?;
        }
        if !self.uniques.is_empty() {
            self.merge_uniques(tx).await?;
        }
        Ok(())
    }

    async fn merge_uniques(&self, tx: &Tx<'_>) -> Result<(), StoreError> {
        tx.lock_named(SLICE_UNIQUES_LOCK).await?;
        let wanted: Vec<Vec<Value>> = self
            .uniques
            .keys()
            .map(|(day, s)| {
                let mut k = args![day.as_str()];
                k.extend(s.values());
                k
            })
            .collect();
        let mut stored: HashMap<(String, Slice), Vec<u8>> = HashMap::new();
        for r in tx
            .rows_by_key("day_uniques", DAY_UNIQUES.keys, &["registers"], wanted)
            .await?
        {
            let slice = Slice {
                site: r.text(1)?,
                country: r.text(2)?,
                bot: r.int(3)? != 0,
            };
            stored.insert((r.text(0)?, slice), r.blob(4)?);
        }
        let mut rows = Vec::with_capacity(self.uniques.len());
        for (key, sketch) in &self.uniques {
            let mut sketch = sketch.clone();
            if let Some(bytes) = stored.get(key) {
                match Hll::from_bytes(bytes) {
                    Some(h) => sketch.merge(&h),
                    None => tracing::warn!(
                        day = %key.0,
                        country = %key.1.country,
                        "stored unique-visitor sketch is not readable; replaced"
                    ),
                }
            }
            let mut r = args![key.0.as_str()];
            r.extend(key.1.values());
            r.push(Value::from(sketch.to_compact_bytes()));
            rows.push(r);
        }
        tx.upsert(&DAY_UNIQUES, rows).await
    }
}

/// The period column of a value rollup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Period {
    Day,
    Hour,
}

impl Period {
    fn table(self) -> (&'static str, &'static str) {
        match self {
            Period::Day => ("day_values", "day"),
            Period::Hour => ("hour_values", "hour"),
        }
    }
}

/// Folds the values beyond the `keep` with the most visits into `(other)`, for every key
/// (dimension, period, slice) in the periods `written` whose upper bound of stored values
/// is over `keep`; their bound becomes their exact count. A key's bound grows by the values
/// each flush writes to it, so a key is counted about once every `keep` values written, not
/// at every flush.
async fn compact(
    tx: &Tx<'_>,
    period: Period,
    written: impl Iterator<Item = Value>,
    keep: u32,
) -> Result<(), StoreError> {
    let (table, col) = period.table();
    let counters = match period {
        Period::Day => "day_value_slices",
        Period::Hour => "hour_value_slices",
    };
    let (mut low, mut high): (Option<Value>, Option<Value>) = (None, None);
    for v in written {
        let lower = low.as_ref().is_none_or(|l| value_lt(&v, l));
        let higher = high.as_ref().is_none_or(|h| value_lt(h, &v));
        if lower {
            low = Some(v.clone());
        }
        if higher {
            high = Some(v);
        }
    }
    let (Some(low), Some(high)) = (low, high) else {
        return Ok(());
    };
    let crowded = tx
        .query(
            &format!(
                "SELECT dimension, {col}, site, country, bot FROM {counters}
                 WHERE {col} >= ?1 AND {col} <= ?2 AND written > ?3"
            ),
            &[low, high, Value::from(i64::from(keep))],
        )
        .await?;
    let key = format!("dimension = ?1 AND {col} = ?2 AND site = ?3 AND country = ?4 AND bot = ?5");
    let beyond = format!(
        "FROM {table} WHERE {key} AND value <> '{OTHER}'
         ORDER BY visits DESC, value LIMIT 9223372036854775807 OFFSET ?6"
    );
    let upsert = match period {
        Period::Day => &DAY_VALUES,
        Period::Hour => &HOUR_VALUES,
    };
    for r in crowded {
        let dimension = r.text(0)?;
        let at = match period {
            Period::Day => Value::from(r.text(1)?),
            Period::Hour => Value::from(r.int(1)?),
        };
        let slice = Slice {
            site: r.text(2)?,
            country: r.text(3)?,
            bot: r.int(4)? != 0,
        };
        let mut params = vec![Value::from(dimension.as_str()), at.clone()];
        params.extend(slice.values());
        let key_params = params.clone();
        params.push(Value::from(i64::from(keep)));
        let mut folded = Amount::default();
        for r in tx
            .query(&format!("SELECT visits, bytes {beyond}"), &params)
            .await?
        {
            folded += Amount {
                visits: r.count(0)?,
                bytes: r.count(1)?,
                humans: 0,
            };
        }
        if !folded.is_zero() {
            tx.execute(
                &format!("DELETE FROM {table} WHERE {key} AND value IN (SELECT value {beyond})"),
                &params,
            )
            .await?;
            let mut row = key_params.clone();
            row.extend(args![OTHER, folded.visits, folded.bytes]);
            tx.upsert(upsert, vec![row]).await?;
        }
        tx.execute(
            &format!(
                "UPDATE {counters} SET written =
                 (SELECT COUNT(*) FROM {table} WHERE {key} AND value <> '{OTHER}') WHERE {key}"
            ),
            &key_params,
        )
        .await?;
    }
    Ok(())
}

/// `a < b` for two values of one period column (text days or integer hours).
fn value_lt(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(a), Value::Int(b)) => a < b,
        (Value::Text(a), Value::Text(b)) => a < b,
        _ => false,
    }
}

/// Which visitors a filter keeps.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Visitors {
    #[default]
    All,
    Humans,
    Bots,
}

impl Visitors {
    pub fn parse(s: &str) -> Option<Visitors> {
        match s {
            "all" | "" => Some(Visitors::All),
            "humans" => Some(Visitors::Humans),
            "bots" => Some(Visitors::Bots),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Visitors::All => "all",
            Visitors::Humans => "humans",
            Visitors::Bots => "bots",
        }
    }
}

/// What a reader asks for: days (inclusive, event time, UTC), a site, a country, a visitor
/// type. Every part is optional; all of them combine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Filter {
    pub from: Option<chrono::NaiveDate>,
    pub to: Option<chrono::NaiveDate>,
    pub site: Option<String>,
    pub country: Option<String>,
    pub visitors: Visitors,
}

/// Start of a day, seconds since the epoch.
pub fn day_start(d: chrono::NaiveDate) -> i64 {
    d.and_hms_opt(0, 0, 0)
        .map_or(0, |t| t.and_utc().timestamp())
}

/// The day (UTC) of a time in seconds since the epoch.
pub fn day_of(seconds: i64) -> Option<chrono::NaiveDate> {
    chrono::DateTime::from_timestamp(seconds, 0).map(|t| t.date_naive())
}

impl Filter {
    /// No filter at all: the running totals answer.
    pub fn is_everything(&self) -> bool {
        *self == Filter::default()
    }

    /// The same filter over the days `from..=to`.
    pub fn with_days(&self, from: chrono::NaiveDate, to: chrono::NaiveDate) -> Filter {
        Filter {
            from: Some(from),
            to: Some(to),
            ..self.clone()
        }
    }

    /// ` AND …` conditions on the slice columns and on the period column `time` (a `day`
    /// text column, or seconds since the epoch when `seconds`), their parameters appended to
    /// `params` (numbered after those already there).
    pub(crate) fn conditions(&self, time: &str, seconds: bool, params: &mut Vec<Value>) -> String {
        let mut sql = String::new();
        let mut add = |cond: &str, v: Value| {
            params.push(v);
            sql.push_str(&format!(" AND {cond} ?{}", params.len()));
        };
        if let Some(from) = self.from {
            if seconds {
                add(&format!("{time} >="), Value::from(day_start(from)));
            } else {
                add(&format!("{time} >="), Value::from(from.to_string()));
            }
        }
        if let Some(to) = self.to {
            if seconds {
                add(&format!("{time} <"), Value::from(day_start(to) + 86_400));
            } else {
                add(&format!("{time} <="), Value::from(to.to_string()));
            }
        }
        if let Some(site) = &self.site {
            add("site =", Value::from(site.as_str()));
        }
        if let Some(country) = &self.country {
            add("country =", Value::from(country.as_str()));
        }
        match self.visitors {
            Visitors::All => {}
            Visitors::Humans => add("bot =", Value::from(0i64)),
            Visitors::Bots => add("bot =", Value::from(1i64)),
        }
        sql
    }
}

impl Filter {
    /// What a series in `step` reads: the period expression, the table (`tables`: the
    /// per-day one and the per-minute one) and the conditions (parameters added to
    /// `params`); minutes and hours from `since` (seconds) when given.
    pub(crate) fn series_source(
        &self,
        step: Step,
        since: Option<i64>,
        tables: [&'static str; 2],
        params: &mut Vec<Value>,
    ) -> (&'static str, &'static str, String) {
        match step {
            Step::Day => ("day", tables[0], self.conditions("day", false, params)),
            Step::Minute | Step::Hour => {
                let mut cond = self.conditions("minute", true, params);
                if let Some(since) = since {
                    params.push(Value::from(since));
                    cond.push_str(&format!(" AND minute >= ?{}", params.len()));
                }
                let time = if step == Step::Hour {
                    "minute - (minute % 3600)"
                } else {
                    "minute"
                };
                (time, tables[1], cond)
            }
        }
    }
}

/// The period of a series row (column 0, as [`Filter::series_source`] selects it) in
/// seconds since the epoch.
pub(crate) fn series_time(
    r: &crate::store::sql::Row,
    step: Step,
    table: &str,
) -> Result<i64, StoreError> {
    match step {
        Step::Day => r
            .text(0)?
            .parse::<chrono::NaiveDate>()
            .map(day_start)
            .map_err(|e| StoreError::Corrupt(format!("{table}.day: {e}"))),
        _ => r.int(0),
    }
}

/// One country's figures under a filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceCountry {
    pub country_code: String,
    pub visits: u64,
    pub humans: u64,
    pub bytes: u64,
}

/// The time series' step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    #[default]
    Minute,
    Hour,
    Day,
}

impl Step {
    pub fn seconds(self) -> i64 {
        match self {
            Step::Minute => 60,
            Step::Hour => 3600,
            Step::Day => 86_400,
        }
    }
}

/// `SUM(visits)` of the humans only.
const HUMAN_VISITS: &str = "CASE WHEN bot = 0 THEN visits ELSE 0 END";

impl Store {
    /// Visits per country under `filter`, most first, then by code.
    pub async fn filtered_countries(
        &self,
        filter: &Filter,
    ) -> Result<Vec<SliceCountry>, StoreError> {
        let filter = filter.clone();
        self.read(reading(move |tx| {
            Box::pin(async move {
                let mut params = Vec::new();
                let cond = filter.conditions("day", false, &mut params);
                let sum = |c| capped_sum(tx.is_postgres(), c);
                let sql = format!(
                    "SELECT country, {v} AS v, {h}, {b} FROM day_totals WHERE 1 = 1{cond}
                     GROUP BY country HAVING {v} > 0 ORDER BY v DESC, country",
                    v = sum("visits"),
                    h = sum(HUMAN_VISITS),
                    b = sum("bytes"),
                );
                tx.query(&sql, &params)
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(SliceCountry {
                            country_code: r.text(0)?,
                            visits: r.count(1)?,
                            humans: r.count(2)?,
                            bytes: r.count(3)?,
                        })
                    })
                    .collect()
            })
        }))
        .await
    }

    /// The values of `dimension` with the most visits under `filter` (at most `limit`) and
    /// its totals: over the filter's days, or over the hours from `since_hour` on.
    pub async fn filtered_dimension(
        &self,
        dimension: &str,
        filter: &Filter,
        since_hour: Option<i64>,
        limit: u32,
    ) -> Result<DimensionCounts, StoreError> {
        let (filter, dimension) = (filter.clone(), dimension.to_owned());
        self.read(reading(move |tx| {
            Box::pin(async move {
                let mut params = args![dimension.as_str()];
                let (table, cond) = match since_hour {
                    Some(h) => {
                        params.push(Value::from(h));
                        let cond = filter.conditions("hour", true, &mut params);
                        ("hour_values", format!(" AND hour >= ?2{cond}"))
                    }
                    None => ("day_values", filter.conditions("day", false, &mut params)),
                };
                let sum = |c| capped_sum(tx.is_postgres(), c);
                let from = format!("FROM {table} WHERE dimension = ?1{cond}");
                let top = format!(
                    "SELECT value, {} AS v, {}, {} {from} GROUP BY value
                     ORDER BY v DESC, value LIMIT {limit}",
                    sum("visits"),
                    sum("bytes"),
                    sum(HUMAN_VISITS)
                );
                let totals = format!(
                    "SELECT {}, {}, {}, COUNT(DISTINCT value) {from}",
                    sum("visits"),
                    sum("bytes"),
                    sum(HUMAN_VISITS)
                );
                read_dimension(&tx, &top, &totals, &params).await
            })
        }))
        .await
    }

    /// Visits per `step` under `filter` (minutes and hours from the retained minutes, days
    /// from the day totals), oldest first, only points with visits. `since` (seconds since
    /// the epoch) narrows minutes and hours further.
    pub async fn filtered_series(
        &self,
        filter: &Filter,
        step: Step,
        since: Option<i64>,
    ) -> Result<Vec<MinutePoint>, StoreError> {
        let filter = filter.clone();
        self.read(reading(move |tx| {
            Box::pin(async move {
                let sum = |c| capped_sum(tx.is_postgres(), c);
                let mut params = Vec::new();
                let (time, table, cond) =
                    filter.series_source(step, since, ["day_totals", "minute_totals"], &mut params);
                let sql = format!(
                    "SELECT {time} AS t, {}, {}, {} FROM {table} WHERE 1 = 1{cond}
                     GROUP BY t ORDER BY t",
                    sum("visits"),
                    sum("bytes"),
                    sum(HUMAN_VISITS)
                );
                let mut out = Vec::new();
                for r in tx.query(&sql, &params).await? {
                    let minute = series_time(&r, step, table)?;
                    out.push(MinutePoint {
                        minute,
                        visits: r.count(1)?,
                        bytes: r.count(2)?,
                        humans: r.count(3)?,
                    });
                }
                Ok(out)
            })
        }))
        .await
    }

    /// The unique-visitor sketch of each day and country under `filter` (the union of its
    /// slices'), by day then country.
    pub async fn filtered_uniques(
        &self,
        filter: &Filter,
    ) -> Result<Vec<(String, String, Hll)>, StoreError> {
        let filter = filter.clone();
        self.read(reading(move |tx| {
            Box::pin(async move {
                let mut params = Vec::new();
                let cond = filter.conditions("day", false, &mut params);
                let mut days: BTreeMap<(String, String), Hll> = BTreeMap::new();
                let sql =
                    format!("SELECT day, country, registers FROM day_uniques WHERE 1 = 1{cond}");
                for r in tx.query(&sql, &params).await? {
                    if let Some(h) = Hll::from_bytes(&r.blob(2)?) {
                        days.entry((r.text(0)?, r.text(1)?)).or_default().merge(&h);
                    }
                }
                Ok(days.into_iter().map(|((d, c), h)| (d, c, h)).collect())
            })
        }))
        .await
    }

    /// The buckets of one histogram under `filter`: (bucket, visits).
    pub async fn filtered_histogram(
        &self,
        metric: &str,
        filter: &Filter,
    ) -> Result<Vec<(i32, u64)>, StoreError> {
        let (filter, metric) = (filter.clone(), metric.to_owned());
        self.read(reading(move |tx| {
            Box::pin(async move {
                let mut params = args![metric.as_str()];
                let cond = filter.conditions("day", false, &mut params);
                let sql = format!(
                    "SELECT bucket, {} FROM day_histograms WHERE metric = ?1{cond}
                     GROUP BY bucket ORDER BY bucket",
                    capped_sum(tx.is_postgres(), "visits")
                );
                tx.query(&sql, &params)
                    .await?
                    .iter()
                    .map(|r| Ok((r.int32(0)?, r.count(1)?)))
                    .collect()
            })
        }))
        .await
    }

    /// The oldest and newest day counted, and the oldest minute still kept.
    pub async fn rollup_extent(
        &self,
    ) -> Result<
        (
            Option<chrono::NaiveDate>,
            Option<chrono::NaiveDate>,
            Option<i64>,
        ),
        StoreError,
    > {
        self.read(reading(|tx| {
            Box::pin(async move {
                let days = tx
                    .query_opt("SELECT MIN(day), MAX(day) FROM day_totals", &[])
                    .await?;
                let minute = tx
                    .query_opt("SELECT MIN(minute) FROM minute_totals", &[])
                    .await?;
                let day = |i| -> Result<Option<chrono::NaiveDate>, StoreError> {
                    Ok(match &days {
                        Some(r) => r.opt_text(i)?.and_then(|d| d.parse().ok()),
                        None => None,
                    })
                };
                Ok((
                    day(0)?,
                    day(1)?,
                    match minute {
                        Some(r) => r.opt_int(0)?,
                        None => None,
                    },
                ))
            })
        }))
        .await
    }

    /// The sites counted, most visits first.
    pub async fn sites(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.read(reading(|tx| {
            Box::pin(async move {
                let sql = format!(
                    "SELECT site, {} AS v FROM day_totals GROUP BY site ORDER BY v DESC, site",
                    capped_sum(tx.is_postgres(), "visits")
                );
                tx.query(&sql, &[])
                    .await?
                    .iter()
                    .map(|r| Ok((r.text(0)?, r.count(1)?)))
                    .collect()
            })
        }))
        .await
    }
}

/// Whether a database holds counts written before the rollups existed (they cannot be split
/// by day, site and country): such a database is refused at open with what to do.
pub async fn counted_before_rollups(tx: &Tx<'_>) -> Result<bool, StoreError> {
    let old = tx
        .query_opt(
            "SELECT EXISTS (SELECT 1 FROM dimension_counts), EXISTS (SELECT 1 FROM day_totals)",
            &[],
        )
        .await?;
    Ok(match old {
        Some(r) => r.int(0)? != 0 && r.int(1)? == 0,
        None => false,
    })
}
