//! The aggregator's tables: counts by country, by every dimension (all time and per hour),
//! per minute, unique-visitor sketches and histograms. Their schema, what a flush adds to
//! them ([`CountsFlush`], written inside the shared flush transaction, `crate::store`) and
//! how `serve` reads them (`impl Store` below). SQL is written once for both databases
//! ([`crate::store::sql`]).

use std::collections::HashMap;

use futures::future::BoxFuture;

use crate::store::sql::{Merge, Tx, Ty, Upsert, Value, args, capped_sum};
use crate::store::{Results, Schema, SqlType, Store, StoreError, reading};

pub const SCHEMA: Schema = Schema {
    migrations: &[
        "CREATE TABLE IF NOT EXISTS country_stats (
            country_code TEXT PRIMARY KEY,
            visit_count BIGINT NOT NULL,
            updated_at TEXT NOT NULL)",
        // Every dimension's counts (crate::aggregate::dimensions): a new dimension is new
        // rows, not a new table.
        "CREATE TABLE IF NOT EXISTS dimension_counts (
            dimension TEXT NOT NULL,
            value TEXT NOT NULL,
            visits BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            humans BIGINT NOT NULL,
            PRIMARY KEY (dimension, value))",
        // The same per hour of event time (seconds since the epoch), for "the last 24 hours".
        "CREATE TABLE IF NOT EXISTS dimension_hours (
            dimension TEXT NOT NULL,
            hour BIGINT NOT NULL,
            value TEXT NOT NULL,
            visits BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            humans BIGINT NOT NULL,
            PRIMARY KEY (dimension, hour, value))",
        // Visits per minute (event time, seconds since the epoch) and country: the time series.
        "CREATE TABLE IF NOT EXISTS minute_counts (
            minute BIGINT NOT NULL,
            country_code TEXT NOT NULL,
            visits BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            humans BIGINT NOT NULL,
            PRIMARY KEY (minute, country_code))",
        // Unique visitors per day and country (`*`: all): HyperLogLog registers
        // (crate::sketch), merged at each flush, and their estimate. BYTEA is a blob to
        // SQLite as well.
        "CREATE TABLE IF NOT EXISTS unique_visitors (
            day TEXT NOT NULL,
            country_code TEXT NOT NULL,
            registers BYTEA NOT NULL,
            estimate BIGINT NOT NULL,
            PRIMARY KEY (day, country_code))",
        // Histograms (crate::sketch::bucket_of) of response sizes and request times, per
        // country and for all (`*`).
        "CREATE TABLE IF NOT EXISTS histogram_buckets (
            metric TEXT NOT NULL,
            scope TEXT NOT NULL,
            bucket INTEGER NOT NULL,
            visits BIGINT NOT NULL,
            PRIMARY KEY (metric, scope, bucket))",
        // Top-N reads of a dimension (the dashboard) and compaction (the values with the
        // fewest visits) walk this index instead of sorting every value.
        "CREATE INDEX IF NOT EXISTS dimension_counts_by_visits
            ON dimension_counts (dimension, visits DESC, value)",
    ],
    columns: &[
        (
            "country_stats",
            &[
                ("country_code", SqlType::Text),
                ("visit_count", SqlType::BigInt),
                ("updated_at", SqlType::Text),
            ],
        ),
        (
            "dimension_counts",
            &[
                ("dimension", SqlType::Text),
                ("value", SqlType::Text),
                ("visits", SqlType::BigInt),
                ("bytes", SqlType::BigInt),
                ("humans", SqlType::BigInt),
            ],
        ),
        (
            "dimension_hours",
            &[
                ("dimension", SqlType::Text),
                ("hour", SqlType::BigInt),
                ("value", SqlType::Text),
                ("visits", SqlType::BigInt),
                ("bytes", SqlType::BigInt),
                ("humans", SqlType::BigInt),
            ],
        ),
        (
            "minute_counts",
            &[
                ("minute", SqlType::BigInt),
                ("country_code", SqlType::Text),
                ("visits", SqlType::BigInt),
                ("bytes", SqlType::BigInt),
                ("humans", SqlType::BigInt),
            ],
        ),
        (
            "unique_visitors",
            &[
                ("day", SqlType::Text),
                ("country_code", SqlType::Text),
                ("registers", SqlType::Bytes),
                ("estimate", SqlType::BigInt),
            ],
        ),
        (
            "histogram_buckets",
            &[
                ("metric", SqlType::Text),
                ("scope", SqlType::Text),
                ("bucket", SqlType::Integer),
                ("visits", SqlType::BigInt),
            ],
        ),
    ],
};

/// The value under which a flush counts what the database refused (see
/// [`CountsFlush::quarantine`]).
pub const INVALID: &str = "(invalid)";

/// The value that compaction folds values into (the same as the aggregator's top-K).
pub const OTHER: &str = "(other)";

/// What is added up per value: visits, their bytes, and how many of them were not bots (the
/// dashboard's "hide bots" toggle).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Amount {
    pub visits: u64,
    pub bytes: u64,
    pub humans: u64,
}

impl Amount {
    /// One visit of `bytes` bytes.
    pub fn visit(bytes: u64, is_bot: bool) -> Amount {
        Amount {
            visits: 1,
            bytes,
            humans: u64::from(!is_bot),
        }
    }

    pub fn is_zero(&self) -> bool {
        self.visits == 0
    }

    fn values(&self) -> [Value; 3] {
        [self.visits, self.bytes, self.humans].map(Value::from)
    }
}

/// Saturating: a sum of hostile byte counts stops at the largest value instead of wrapping.
impl std::ops::AddAssign for Amount {
    fn add_assign(&mut self, o: Amount) {
        self.visits = self.visits.saturating_add(o.visits);
        self.bytes = self.bytes.saturating_add(o.bytes);
        self.humans = self.humans.saturating_add(o.humans);
    }
}

/// What to add to one value of one dimension.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DimensionIncrement {
    pub dimension: String,
    pub value: String,
    pub amount: Amount,
}

/// What to add to one value of one dimension in one hour.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DimensionHourIncrement {
    pub dimension: String,
    /// Start of the hour, seconds since the epoch (event time).
    pub hour: i64,
    pub value: String,
    pub amount: Amount,
}

/// What to add to one minute of one country.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MinuteIncrement {
    /// Start of the minute, seconds since the epoch (event time).
    pub minute: i64,
    pub country_code: String,
    pub amount: Amount,
}

/// A unique-visitor sketch of one day and country (or `*`: all countries), merged into the
/// stored one by a flush (a union: replays cannot change it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueSketch {
    /// `YYYY-MM-DD` (event time, UTC).
    pub day: String,
    pub country_code: String,
    pub sketch: crate::sketch::Hll,
}

/// Visits to add to one bucket of one histogram.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HistogramIncrement {
    /// `bytes` or `request_time_us`.
    pub metric: String,
    /// A country code, or `*` for all.
    pub scope: String,
    /// [`crate::sketch::bucket_of`] of the value.
    pub bucket: i32,
    pub count: u64,
}

/// What an aggregator's flush adds to the counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CountsFlush {
    /// Visits to add, per country code.
    pub increments: Vec<(String, u64)>,
    /// Visits and bytes to add per (dimension, value).
    pub dimensions: Vec<DimensionIncrement>,
    /// What to add per (dimension, hour, value): the same counts by hour of event time.
    pub dimension_hours: Vec<DimensionHourIncrement>,
    /// Hours before this one are deleted from `dimension_hours` (the time series' retention).
    pub prune_hours_before: Option<i64>,
    /// Visits and bytes to add per (minute, country).
    pub minutes: Vec<MinuteIncrement>,
    /// Minutes before this one (seconds since the epoch) are deleted: the time series'
    /// retention.
    pub prune_minutes_before: Option<i64>,
    /// Unique-visitor sketches to merge into the stored ones.
    pub uniques: Vec<UniqueSketch>,
    /// Histogram bucket counts to add.
    pub histograms: Vec<HistogramIncrement>,
    /// Values kept per dimension in `dimension_counts` and per dimension and hour in
    /// `dimension_hours`: the flush folds the values with the fewest visits beyond this into
    /// `(other)` for every dimension (and hour) it wrote. `None` keeps every value.
    pub keep_values: Option<u32>,
    /// The same counts per day, hour and minute and per slice (site, country, visitor
    /// type): what filters read ([`super::rollups`]).
    pub rollups: super::rollups::Rollups,
    /// Visits closed in this flush ([`crate::sessions`]).
    pub visits: crate::aggregate::visits::VisitsFlush,
}

const AMOUNTS: [(&str, Ty, Merge); 3] = [
    ("visits", Ty::Int8, Merge::SaturatingAdd),
    ("bytes", Ty::Int8, Merge::SaturatingAdd),
    ("humans", Ty::Int8, Merge::SaturatingAdd),
];

const COUNTRIES: Upsert = Upsert {
    table: "country_stats",
    keys: &[("country_code", Ty::Text)],
    values: &[
        ("visit_count", Ty::Int8, Merge::Add),
        ("updated_at", Ty::Text, Merge::Replace),
    ],
};

const DIMENSIONS: Upsert = Upsert {
    table: "dimension_counts",
    keys: &[("dimension", Ty::Text), ("value", Ty::Text)],
    values: &AMOUNTS,
};

const DIMENSION_HOURS: Upsert = Upsert {
    table: "dimension_hours",
    keys: &[
        ("dimension", Ty::Text),
        ("hour", Ty::Int8),
        ("value", Ty::Text),
    ],
    values: &AMOUNTS,
};

const MINUTES: Upsert = Upsert {
    table: "minute_counts",
    keys: &[("minute", Ty::Int8), ("country_code", Ty::Text)],
    values: &AMOUNTS,
};

const HISTOGRAMS: Upsert = Upsert {
    table: "histogram_buckets",
    keys: &[
        ("metric", Ty::Text),
        ("scope", Ty::Text),
        ("bucket", Ty::Int4),
    ],
    values: &[("visits", Ty::Int8, Merge::Add)],
};

const UNIQUES: Upsert = Upsert {
    table: "unique_visitors",
    keys: &[("day", Ty::Text), ("country_code", Ty::Text)],
    values: &[
        ("registers", Ty::Bytes, Merge::Replace),
        ("estimate", Ty::Int8, Merge::Replace),
    ],
};

/// Serializes the read-merge-write of unique-visitor sketches between aggregators (two of
/// them may both add a day's first `*` sketch; without the lock the second would overwrite
/// the first's registers).
const UNIQUES_LOCK: i64 = 7061676576;

fn dimension_row(d: &DimensionIncrement) -> Vec<Value> {
    let mut r = args![d.dimension.as_str(), d.value.as_str()];
    r.extend(d.amount.values());
    r
}

fn hour_row(d: &DimensionHourIncrement) -> Vec<Value> {
    let mut r = args![d.dimension.as_str(), d.hour, d.value.as_str()];
    r.extend(d.amount.values());
    r
}

impl Results for CountsFlush {
    fn write<'a>(
        &'a self,
        tx: &'a Tx<'a>,
        _group: &'a str,
        _topic: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.write_in(tx))
    }

    /// Counts every dimension value that may have caused a data error under [`INVALID`]:
    /// with `everything` false only suspicious values move (longer than 200 bytes, or not
    /// printable ASCII); with `everything` true all of them do (a second data error: the
    /// cause was not a value we can recognise).
    fn quarantine(&mut self, _error: &str, everything: bool) -> usize {
        let suspicious =
            |v: &str| everything || v.len() > 200 || !v.bytes().all(|b| (0x20..0x7f).contains(&b));
        quarantine_rows(
            &mut self.dimensions,
            |d| (&mut d.value, &mut d.amount),
            |d| (d.dimension.clone(), d.value.clone()),
            suspicious,
        ) + quarantine_rows(
            &mut self.dimension_hours,
            |d| (&mut d.value, &mut d.amount),
            |d| (d.dimension.clone(), d.hour, d.value.clone()),
            suspicious,
        ) + self.rollups.quarantine(&suspicious)
            + self.visits.quarantine(&suspicious)
    }
}

impl CountsFlush {
    /// The tables' upserts are independent: they go out together (PostgreSQL pipelines them
    /// on the transaction's connection, one round trip instead of one each; SQLite runs them
    /// one after the other). What depends on them (pruning, compaction, sketches) follows.
    async fn write_in(&self, tx: &Tx<'_>) -> Result<(), StoreError> {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let countries = self
            .increments
            .iter()
            .map(|(c, n)| args![c.as_str(), *n, now.as_str()])
            .collect();
        let minutes = self
            .minutes
            .iter()
            .map(|m| {
                let mut r = args![m.minute, m.country_code.as_str()];
                r.extend(m.amount.values());
                r
            })
            .collect();
        let histograms = self
            .histograms
            .iter()
            .map(|h| args![h.metric.as_str(), h.scope.as_str(), h.bucket, h.count])
            .collect();
        futures::try_join!(
            tx.upsert(&COUNTRIES, countries),
            tx.upsert(
                &DIMENSIONS,
                self.dimensions.iter().map(dimension_row).collect()
            ),
            tx.upsert(
                &DIMENSION_HOURS,
                self.dimension_hours.iter().map(hour_row).collect()
            ),
            tx.upsert(&MINUTES, minutes),
            tx.upsert(&HISTOGRAMS, histograms),
        )?;
        if let Some(before) = self.prune_hours_before {
            tx.execute(
                "DELETE FROM dimension_hours WHERE hour < ?1",
                &args![before],
            )
            .await?;
        }
        if let Some(before) = self.prune_minutes_before {
            tx.execute(
                "DELETE FROM minute_counts WHERE minute < ?1",
                &args![before],
            )
            .await?;
        }
        if let Some(keep) = self.keep_values {
            for (d, hour) in self.compaction_targets() {
                compact(tx, d, hour, keep).await?;
            }
        }
        if !self.uniques.is_empty() {
            self.merge_uniques(tx).await?;
        }
        self.visits.write_in(tx, self.prune_minutes_before).await?;
        self.rollups
            .write_in(
                tx,
                self.keep_values,
                self.prune_minutes_before,
                self.prune_hours_before,
            )
            .await
    }

    /// Sketches merge with what is stored (read, union, write, under [`UNIQUES_LOCK`]).
    async fn merge_uniques(&self, tx: &Tx<'_>) -> Result<(), StoreError> {
        tx.lock_named(UNIQUES_LOCK).await?;
        let wanted: Vec<Vec<Value>> = self
            .uniques
            .iter()
            .map(|u| args![u.day.as_str(), u.country_code.as_str()])
            .collect();
        let mut stored: HashMap<(String, String), Vec<u8>> = HashMap::new();
        for r in tx
            .rows_by_key("unique_visitors", UNIQUES.keys, &["registers"], wanted)
            .await?
        {
            stored.insert((r.text(0)?, r.text(1)?), r.blob(2)?);
        }
        let mut rows = Vec::with_capacity(self.uniques.len());
        for u in &self.uniques {
            let mut sketch = u.sketch.clone();
            if let Some(bytes) = stored.get(&(u.day.clone(), u.country_code.clone())) {
                merge_stored(&mut sketch, bytes, u);
            }
            let estimate = sketch.estimate().round() as i64;
            rows.push(args![
                u.day.as_str(),
                u.country_code.as_str(),
                sketch.to_bytes(),
                estimate
            ]);
        }
        tx.upsert(&UNIQUES, rows).await
    }

    /// What a flush's compaction looks at: each dimension it wrote (hour `None`: all time)
    /// and each (dimension, hour) it wrote, hours about to be pruned left out.
    fn compaction_targets(&self) -> Vec<(&str, Option<i64>)> {
        let mut targets: Vec<(&str, Option<i64>)> = self
            .dimensions
            .iter()
            .map(|d| (d.dimension.as_str(), None))
            .chain(
                self.dimension_hours
                    .iter()
                    .filter(|d| self.prune_hours_before.is_none_or(|b| d.hour >= b))
                    .map(|d| (d.dimension.as_str(), Some(d.hour))),
            )
            .collect();
        targets.sort_unstable();
        targets.dedup();
        targets
    }
}

/// Merges a stored sketch into `sketch`; one that is not ours (another size) is replaced,
/// with a warning.
fn merge_stored(sketch: &mut crate::sketch::Hll, stored: &[u8], u: &UniqueSketch) {
    match crate::sketch::Hll::from_bytes(stored) {
        Some(h) => sketch.merge(&h),
        None => tracing::warn!(
            day = %u.day,
            country = %u.country_code,
            bytes = stored.len(),
            "stored unique-visitor sketch is not readable; replaced"
        ),
    }
}

/// Renames the `suspicious` values of `rows` to [`INVALID`], then merges the rows of equal
/// `key` (PostgreSQL refuses an upsert that touches one row twice), sorted by key. Returns how
/// many rows were renamed.
fn quarantine_rows<T, K: Ord>(
    rows: &mut Vec<T>,
    parts: impl Fn(&mut T) -> (&mut String, &mut Amount),
    key: impl Fn(&T) -> K,
    suspicious: impl Fn(&str) -> bool,
) -> usize {
    let mut moved = 0;
    let mut merged: std::collections::BTreeMap<K, T> = std::collections::BTreeMap::new();
    for mut r in std::mem::take(rows) {
        let (value, _) = parts(&mut r);
        if value.as_str() != INVALID && suspicious(value) {
            *value = INVALID.to_owned();
            moved += 1;
        }
        match merged.entry(key(&r)) {
            std::collections::btree_map::Entry::Occupied(mut e) => {
                let (_, amount) = parts(&mut r);
                let add = *amount;
                *parts(e.get_mut()).1 += add;
            }
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(r);
            }
        }
    }
    *rows = merged.into_values().collect();
    moved
}

/// The compaction statements (see [`CountsFlush::keep_values`]): the rows of one dimension
/// (and hour) beyond the first `keep` by visits, then their deletion. Parameters: the
/// dimension, `keep`, then the hour.
fn compaction_queries(hourly: bool) -> (String, String) {
    let (table, hour) = if hourly {
        ("dimension_hours", " AND hour = ?3")
    } else {
        ("dimension_counts", "")
    };
    // `LIMIT -1` (SQLite) and `LIMIT ALL` (PostgreSQL) differ; a huge limit is the same.
    let beyond = format!(
        "FROM {table} WHERE dimension = ?1{hour} AND value <> '{OTHER}'
         ORDER BY visits DESC, value LIMIT 9223372036854775807 OFFSET ?2"
    );
    (
        format!("SELECT value, visits, bytes, humans {beyond}"),
        format!(
            "DELETE FROM {table} WHERE dimension = ?1{hour} AND value IN (SELECT value {beyond})"
        ),
    )
}

/// Folds the values of `dimension` (in `hour`, or all time) beyond the `keep` with the most
/// visits into `(other)`.
async fn compact(
    tx: &Tx<'_>,
    dimension: &str,
    hour: Option<i64>,
    keep: u32,
) -> Result<(), StoreError> {
    let (select, delete) = compaction_queries(hour.is_some());
    let mut params = args![dimension, i64::from(keep)];
    params.extend(hour.map(Value::from));
    let mut folded = Amount::default();
    for r in tx.query(&select, &params).await? {
        folded += Amount {
            visits: r.count(1)?,
            bytes: r.count(2)?,
            humans: r.count(3)?,
        };
    }
    if folded.is_zero() {
        return Ok(());
    }
    tx.execute(&delete, &params).await?;
    match hour {
        None => {
            let other = DimensionIncrement {
                dimension: dimension.to_owned(),
                value: OTHER.to_owned(),
                amount: folded,
            };
            tx.upsert(&DIMENSIONS, vec![dimension_row(&other)]).await
        }
        Some(hour) => {
            let other = DimensionHourIncrement {
                dimension: dimension.to_owned(),
                hour,
                value: OTHER.to_owned(),
                amount: folded,
            };
            tx.upsert(&DIMENSION_HOURS, vec![hour_row(&other)]).await
        }
    }
}

/// Unique visitors of one day and country, as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UniqueCount {
    pub day: String,
    pub country_code: String,
    /// The sketch's estimate (see [`crate::sketch`] for its error).
    pub visitors: u64,
}

/// One value of a dimension as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ValueCount {
    pub value: String,
    pub visits: u64,
    pub bytes: u64,
    /// Visits that were not bots.
    pub humans: u64,
}

/// The values of a dimension with the most visits, and the dimension's totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DimensionCounts {
    /// Most visits first, ties by value.
    pub values: Vec<ValueCount>,
    /// Over all values, not only those returned.
    pub total_visits: u64,
    pub total_bytes: u64,
    pub total_humans: u64,
    /// Distinct values stored.
    pub distinct: u64,
}

/// Visits in one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MinutePoint {
    /// Start of the minute, seconds since the epoch.
    pub minute: i64,
    pub visits: u64,
    pub bytes: u64,
    pub humans: u64,
}

/// One row of the per-country table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CountryCount {
    pub country_code: String,
    pub visits: u64,
}

/// The two queries of [`Store::dimension_counts`] (its top values, then its totals and
/// distinct values). Parameters: the dimension, then the first hour when `since`. All time
/// reads the running totals (top values through the `dimension_counts_by_visits` index,
/// never a sort of every value); a time range sums the hourly counts.
fn dimension_queries(postgres: bool, since: bool, limit: u32) -> (String, String) {
    let (table, hours) = if since {
        ("dimension_hours", "AND hour >= ?2")
    } else {
        ("dimension_counts", "")
    };
    let filter = format!("FROM {table} WHERE dimension = ?1 {hours}");
    let sum = |c| capped_sum(postgres, c);
    let top = if since {
        format!(
            "SELECT value, {} AS v, {}, {} {filter} GROUP BY value ORDER BY v DESC, value LIMIT {limit}",
            sum("visits"),
            sum("bytes"),
            sum("humans")
        )
    } else {
        format!(
            "SELECT value, visits, bytes, humans {filter} ORDER BY visits DESC, value LIMIT {limit}"
        )
    };
    (
        top,
        format!(
            "SELECT {}, {}, {}, COUNT(DISTINCT value) {filter}",
            sum("visits"),
            sum("bytes"),
            sum("humans")
        ),
    )
}

fn unique_rows(rows: Vec<crate::store::sql::Row>) -> Result<Vec<UniqueCount>, StoreError> {
    rows.iter()
        .map(|r| {
            Ok(UniqueCount {
                day: r.text(0)?,
                country_code: r.text(1)?,
                visitors: r.count(2)?,
            })
        })
        .collect()
}

/// A panel read by its two queries: `top` (value, visits, bytes, humans per row), then
/// `totals` (visits, bytes, humans, distinct values).
pub(super) async fn read_dimension(
    tx: &Tx<'_>,
    top: &str,
    totals: &str,
    params: &[Value],
) -> Result<DimensionCounts, StoreError> {
    let mut out = DimensionCounts::default();
    for r in tx.query(top, params).await? {
        out.values.push(ValueCount {
            value: r.text(0)?,
            visits: r.count(1)?,
            bytes: r.count(2)?,
            humans: r.count(3)?,
        });
    }
    if let Some(r) = tx.query_opt(totals, params).await? {
        out.total_visits = r.count(0)?;
        out.total_bytes = r.count(1)?;
        out.total_humans = r.count(2)?;
        out.distinct = r.count(3)?;
    }
    Ok(out)
}

impl Store {
    /// All countries, most visits first, then by code.
    pub async fn country_counts(&self) -> Result<Vec<CountryCount>, StoreError> {
        self.read(reading(|tx| {
            Box::pin(async move {
                tx.query(
                    "SELECT country_code, visit_count FROM country_stats WHERE visit_count > 0
                     ORDER BY visit_count DESC, country_code",
                    &[],
                )
                .await?
                .iter()
                .map(|r| {
                    Ok(CountryCount {
                        country_code: r.text(0)?,
                        visits: r.count(1)?,
                    })
                })
                .collect()
            })
        }))
        .await
    }

    /// The values of `dimension` with the most visits (at most `limit`) and its totals: all
    /// time, or over the hours from `since` (seconds since the epoch) on.
    pub async fn dimension_counts(
        &self,
        dimension: &str,
        since: Option<i64>,
        limit: u32,
    ) -> Result<DimensionCounts, StoreError> {
        let mut params = args![dimension];
        params.extend(since.map(Value::from));
        self.read(reading(move |tx| {
            Box::pin(async move {
                let (top, totals) = dimension_queries(tx.is_postgres(), since.is_some(), limit);
                read_dimension(&tx, &top, &totals, &params).await
            })
        }))
        .await
    }

    /// Visits per minute from `since` (seconds since the epoch) on, of one country or all.
    pub async fn minutes(
        &self,
        since: i64,
        country: Option<&str>,
    ) -> Result<Vec<MinutePoint>, StoreError> {
        let country = country.map(str::to_owned);
        self.read(reading(move |tx| {
            Box::pin(async move {
                let rows = match &country {
                    Some(c) => {
                        tx.query(
                            "SELECT minute, visits, bytes, humans FROM minute_counts
                             WHERE minute >= ?1 AND country_code = ?2 ORDER BY minute",
                            &args![since, c.as_str()],
                        )
                        .await?
                    }
                    None => {
                        let sum = |c| capped_sum(tx.is_postgres(), c);
                        let sql = format!(
                            "SELECT minute, {}, {}, {} FROM minute_counts WHERE minute >= ?1
                             GROUP BY minute ORDER BY minute",
                            sum("visits"),
                            sum("bytes"),
                            sum("humans")
                        );
                        tx.query(&sql, &args![since]).await?
                    }
                };
                rows.iter()
                    .map(|r| {
                        Ok(MinutePoint {
                            minute: r.int(0)?,
                            visits: r.count(1)?,
                            bytes: r.count(2)?,
                            humans: r.count(3)?,
                        })
                    })
                    .collect()
            })
        }))
        .await
    }

    /// Unique visitors per day of `country` (`*`: all), newest day first, at most `days`.
    pub async fn unique_days(
        &self,
        country: &str,
        days: u32,
    ) -> Result<Vec<UniqueCount>, StoreError> {
        let params = args![country, i64::from(days)];
        self.read(reading(move |tx| {
            Box::pin(async move {
                unique_rows(
                    tx.query(
                        "SELECT day, country_code, estimate FROM unique_visitors
                         WHERE country_code = ?1 ORDER BY day DESC LIMIT ?2",
                        &params,
                    )
                    .await?,
                )
            })
        }))
        .await
    }

    /// Unique visitors of every country on `day`, most first.
    pub async fn unique_countries(&self, day: &str) -> Result<Vec<UniqueCount>, StoreError> {
        let params = args![day];
        self.read(reading(move |tx| {
            Box::pin(async move {
                unique_rows(
                    tx.query(
                        "SELECT day, country_code, estimate FROM unique_visitors
                         WHERE day = ?1 AND country_code <> '*' ORDER BY estimate DESC, country_code",
                        &params,
                    )
                    .await?,
                )
            })
        }))
        .await
    }

    /// The buckets of one histogram: (bucket, visits).
    pub async fn histogram(
        &self,
        metric: &str,
        scope: &str,
    ) -> Result<Vec<(i32, u64)>, StoreError> {
        let params = args![metric, scope];
        self.read(reading(move |tx| {
            Box::pin(async move {
                tx.query(
                    "SELECT bucket, visits FROM histogram_buckets
                     WHERE metric = ?1 AND scope = ?2 ORDER BY bucket",
                    &params,
                )
                .await?
                .iter()
                .map(|r| Ok((r.int32(0)?, r.count(1)?)))
                .collect()
            })
        }))
        .await
    }

    /// When the last flush committed (RFC 3339), if any.
    pub async fn last_flush(&self) -> Result<Option<String>, StoreError> {
        self.read(reading(|tx| {
            Box::pin(async move {
                match tx
                    .query_opt("SELECT MAX(updated_at) FROM country_stats", &[])
                    .await?
                {
                    Some(r) => r.opt_text(0),
                    None => Ok(None),
                }
            })
        }))
        .await
    }

    /// The newest minute with visits (event time), if any.
    pub async fn latest_minute(&self) -> Result<Option<i64>, StoreError> {
        self.read(reading(|tx| {
            Box::pin(async move {
                match tx
                    .query_opt("SELECT MAX(minute) FROM minute_counts", &[])
                    .await?
                {
                    Some(r) => r.opt_int(0),
                    None => Ok(None),
                }
            })
        }))
        .await
    }
}
