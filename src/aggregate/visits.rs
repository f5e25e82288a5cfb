//! What visits write and read: closed visits per day and slice (kept for all time) and per
//! minute (kept as long as the time series), the late and early-closed counters, and the
//! installation's salt. The open visits themselves are the aggregator's partition state
//! ([`crate::store::StateRow`]). Entry and exit pages are the dimensions `entry_page` and
//! `exit_page`, and durations the histogram `visit_duration_s`, in the aggregator's own
//! tables.

use crate::aggregate::rollups::{Filter, Step, Visitors, series_time};
use crate::store::sql::{Merge, Tx, Ty, Upsert, args, capped_sum};
use crate::store::{Schema, SqlType, Store, StoreError, reading};

pub const SCHEMA: Schema = Schema {
    migrations: &[
        // Closed visits per day of their first request (UTC) and slice (its site and country;
        // `bot` is always 0: visits are made of human page requests). Kept for all time.
        "CREATE TABLE IF NOT EXISTS visit_days (
            day TEXT NOT NULL,
            site TEXT NOT NULL,
            country TEXT NOT NULL,
            bot INTEGER NOT NULL,
            visits BIGINT NOT NULL,
            bounces BIGINT NOT NULL,
            pages BIGINT NOT NULL,
            duration_s BIGINT NOT NULL,
            PRIMARY KEY (day, site, country, bot))",
        // The same per minute of the first request, kept as long as the time series.
        "CREATE TABLE IF NOT EXISTS visit_minutes (
            minute BIGINT NOT NULL,
            site TEXT NOT NULL,
            country TEXT NOT NULL,
            bot INTEGER NOT NULL,
            visits BIGINT NOT NULL,
            PRIMARY KEY (minute, site, country, bot))",
        // Page requests left out of visits because they came later than --lateness, and
        // visits closed early at --max-open-visits.
        "CREATE TABLE IF NOT EXISTS visit_counters (
            counter TEXT PRIMARY KEY,
            n BIGINT NOT NULL)",
        // The installation's secret key for visitor keys (one row, made at first open).
        "CREATE TABLE IF NOT EXISTS visit_salt (
            id INTEGER PRIMARY KEY,
            k0 BIGINT NOT NULL,
            k1 BIGINT NOT NULL)",
    ],
    columns: &[
        (
            "visit_days",
            &[
                ("day", SqlType::Text),
                ("site", SqlType::Text),
                ("country", SqlType::Text),
                ("bot", SqlType::Integer),
                ("visits", SqlType::BigInt),
                ("bounces", SqlType::BigInt),
                ("pages", SqlType::BigInt),
                ("duration_s", SqlType::BigInt),
            ],
        ),
        (
            "visit_minutes",
            &[
                ("minute", SqlType::BigInt),
                ("site", SqlType::Text),
                ("country", SqlType::Text),
                ("bot", SqlType::Integer),
                ("visits", SqlType::BigInt),
            ],
        ),
        (
            "visit_counters",
            &[("counter", SqlType::Text), ("n", SqlType::BigInt)],
        ),
        (
            "visit_salt",
            &[
                ("id", SqlType::Integer),
                ("k0", SqlType::BigInt),
                ("k1", SqlType::BigInt),
            ],
        ),
    ],
};

/// Closed visits to add for one (period, site, country).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VisitTotals {
    pub visits: u64,
    pub bounces: u64,
    pub pages: u64,
    /// Sum of the durations, seconds.
    pub duration: u64,
}

impl std::ops::AddAssign for VisitTotals {
    fn add_assign(&mut self, o: VisitTotals) {
        self.visits += o.visits;
        self.bounces += o.bounces;
        self.pages += o.pages;
        self.duration = self.duration.saturating_add(o.duration);
    }
}

/// What a flush writes of the closed visits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VisitsFlush {
    /// (day `YYYY-MM-DD`, site, country) → totals.
    pub days: Vec<((String, String, String), VisitTotals)>,
    /// (minute start, site, country) → visits.
    pub minutes: Vec<((i64, String, String), u64)>,
    /// Page requests too late for their visit, and visits closed early.
    pub late: u64,
    pub closed_early: u64,
}

const DAYS: Upsert = Upsert {
    table: "visit_days",
    keys: &[
        ("day", Ty::Text),
        ("site", Ty::Text),
        ("country", Ty::Text),
        ("bot", Ty::Int4),
    ],
    values: &[
        ("visits", Ty::Int8, Merge::SaturatingAdd),
        ("bounces", Ty::Int8, Merge::SaturatingAdd),
        ("pages", Ty::Int8, Merge::SaturatingAdd),
        ("duration_s", Ty::Int8, Merge::SaturatingAdd),
    ],
};

const MINUTES: Upsert = Upsert {
    table: "visit_minutes",
    keys: &[
        ("minute", Ty::Int8),
        ("site", Ty::Text),
        ("country", Ty::Text),
        ("bot", Ty::Int4),
    ],
    values: &[("visits", Ty::Int8, Merge::SaturatingAdd)],
};

const COUNTERS: Upsert = Upsert {
    table: "visit_counters",
    keys: &[("counter", Ty::Text)],
    values: &[("n", Ty::Int8, Merge::SaturatingAdd)],
};

impl VisitsFlush {
    pub fn is_empty(&self) -> bool {
        self.days.is_empty() && self.late == 0 && self.closed_early == 0
    }

    /// Writes the closed visits inside the flush's transaction; minutes before
    /// `prune_minutes_before` are deleted (the time series' retention).
    pub async fn write_in(
        &self,
        tx: &Tx<'_>,
        prune_minutes_before: Option<i64>,
    ) -> Result<(), StoreError> {
        let days = self
            .days
            .iter()
            .map(|((day, site, country), t)| {
                args![
                    day.as_str(),
                    site.as_str(),
                    country.as_str(),
                    0_i32,
                    t.visits,
                    t.bounces,
                    t.pages,
                    t.duration
                ]
            })
            .collect();
        let minutes = self
            .minutes
            .iter()
            .map(|((minute, site, country), n)| {
                args![*minute, site.as_str(), country.as_str(), 0_i32, *n]
            })
            .collect();
        let counters = [("late", self.late), ("closed_early", self.closed_early)]
            .into_iter()
            .filter(|c| c.1 > 0)
            .map(|(c, n)| args![c, n])
            .collect();
        futures::try_join!(
            tx.upsert(&DAYS, days),
            tx.upsert(&MINUTES, minutes),
            tx.upsert(&COUNTERS, counters),
        )?;
        if let Some(before) = prune_minutes_before
            && !self.minutes.is_empty()
        {
            tx.execute(
                "DELETE FROM visit_minutes WHERE minute < ?1",
                &args![before],
            )
            .await?;
        }
        Ok(())
    }

    /// Values that may have caused a data error (see `Results::quarantine`): sites longer
    /// than 200 bytes or not printable ASCII (all of them when `everything`) become
    /// `(invalid)`.
    pub fn quarantine(&mut self, suspicious: &dyn Fn(&str) -> bool) -> usize {
        let invalid = crate::aggregate::tables::INVALID;
        let mut moved = 0;
        for ((_, site, _), _) in &mut self.days {
            if suspicious(site) {
                *site = invalid.to_owned();
                moved += 1;
            }
        }
        for ((_, site, _), _) in &mut self.minutes {
            if suspicious(site) {
                *site = invalid.to_owned();
                moved += 1;
            }
        }
        // Several rows may now share a key: sum them (one statement cannot upsert a key twice).
        let mut days: std::collections::BTreeMap<(String, String, String), VisitTotals> =
            Default::default();
        for (k, t) in self.days.drain(..) {
            *days.entry(k).or_default() += t;
        }
        self.days = days.into_iter().collect();
        let mut minutes: std::collections::BTreeMap<(i64, String, String), u64> =
            Default::default();
        for (k, n) in self.minutes.drain(..) {
            *minutes.entry(k).or_default() += n;
        }
        self.minutes = minutes.into_iter().collect();
        moved
    }
}

/// Closed visits under a filter, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VisitSummary {
    pub visits: u64,
    pub bounces: u64,
    pub pages: u64,
    pub duration: u64,
}

/// The counters of [`VisitsFlush`], as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VisitCounters {
    pub late: u64,
    pub closed_early: u64,
}

impl Store {
    /// Makes the installation's salt for visitor keys (random) unless it exists: when the
    /// database is opened, so that an aggregator only reads it (a database another process
    /// holds locked for writing can still be read).
    pub async fn make_visit_salt(&self) -> Result<(), StoreError> {
        let (k0, k1): (u64, u64) = (rand::random(), rand::random());
        self.write(crate::store::writing(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO visit_salt (id, k0, k1) VALUES (1, ?1, ?2) ON CONFLICT (id) DO NOTHING",
                    &args![k0 as i64, k1 as i64],
                )
                .await?;
                Ok(crate::store::Done::Commit(()))
            })
        }))
        .await
    }

    /// The installation's salt for visitor keys.
    pub async fn visit_salt(&self) -> Result<(u64, u64), StoreError> {
        let read = || {
            self.read(reading(|tx| {
                Box::pin(async move {
                    match tx
                        .query_opt("SELECT k0, k1 FROM visit_salt WHERE id = 1", &[])
                        .await?
                    {
                        Some(r) => Ok(Some((r.int(0)? as u64, r.int(1)? as u64))),
                        None => Ok(None),
                    }
                })
            }))
        };
        if let Some(salt) = read().await? {
            return Ok(salt);
        }
        self.make_visit_salt().await?;
        read()
            .await?
            .ok_or_else(|| StoreError::Corrupt("visit_salt has no row".into()))
    }

    /// Closed visits under `filter` (a filter on bots finds none).
    pub async fn visit_summary(&self, filter: &Filter) -> Result<VisitSummary, StoreError> {
        let filter = filter.clone();
        self.read(reading(move |tx| {
            Box::pin(async move {
                let sum = |c| capped_sum(tx.is_postgres(), c);
                let mut params = Vec::new();
                let cond = filter.conditions("day", false, &mut params);
                let sql = format!(
                    "SELECT {}, {}, {}, {} FROM visit_days WHERE 1 = 1{cond}",
                    sum("visits"),
                    sum("bounces"),
                    sum("pages"),
                    sum("duration_s")
                );
                Ok(match tx.query_opt(&sql, &params).await? {
                    Some(r) => VisitSummary {
                        visits: r.count(0)?,
                        bounces: r.count(1)?,
                        pages: r.count(2)?,
                        duration: r.count(3)?,
                    },
                    None => VisitSummary::default(),
                })
            })
        }))
        .await
    }

    /// Visits started per step under `filter` (time → visits), from `since` (seconds) for
    /// minutes and hours.
    pub async fn visit_series(
        &self,
        filter: &Filter,
        step: Step,
        since: Option<i64>,
    ) -> Result<Vec<(i64, u64)>, StoreError> {
        let filter = filter.clone();
        self.read(reading(move |tx| {
            Box::pin(async move {
                let mut params = Vec::new();
                let (time, table, cond) =
                    filter.series_source(step, since, ["visit_days", "visit_minutes"], &mut params);
                let sql = format!(
                    "SELECT {time} AS t, {} FROM {table} WHERE 1 = 1{cond} GROUP BY t ORDER BY t",
                    capped_sum(tx.is_postgres(), "visits")
                );
                let mut out = Vec::new();
                for r in tx.query(&sql, &params).await? {
                    out.push((series_time(&r, step, table)?, r.count(1)?));
                }
                Ok(out)
            })
        }))
        .await
    }

    /// Visitors with a visit open, as the aggregators' last flushes stored them.
    pub async fn open_visitors(&self) -> Result<u64, StoreError> {
        self.read(reading(|tx| {
            Box::pin(async move {
                match tx
                    .query_opt(
                        "SELECT CAST(COUNT(*) AS BIGINT) FROM partition_state
                         WHERE consumer_group = ?1 AND state_key <> ?2",
                        &args![
                            crate::kafka::AGGREGATE_GROUP,
                            crate::sessions::CLOCKS_KEY.to_vec()
                        ],
                    )
                    .await?
                {
                    Some(r) => r.count(0),
                    None => Ok(0),
                }
            })
        }))
        .await
    }

    /// Late page requests and visits closed early, over all time.
    pub async fn visit_counters(&self) -> Result<VisitCounters, StoreError> {
        self.read(reading(|tx| {
            Box::pin(async move {
                let mut out = VisitCounters::default();
                for r in tx
                    .query("SELECT counter, n FROM visit_counters", &[])
                    .await?
                {
                    match r.text(0)?.as_str() {
                        "late" => out.late = r.count(1)?,
                        "closed_early" => out.closed_early = r.count(1)?,
                        _ => {}
                    }
                }
                Ok(out)
            })
        }))
        .await
    }
}

/// Whether `filter` can find visits at all (they are made of human requests only).
pub fn may_have_visits(filter: &Filter) -> bool {
    filter.visitors != Visitors::Bots
}
