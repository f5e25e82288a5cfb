//! The JSON API: one handler per panel, and the dashboard snapshot the live page is pushed.
//! Every response is read from the database, so it works whichever process aggregates.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use serde::{Deserialize, Serialize};

use super::{AppState, csv};
use crate::aggregate::dimensions::{ALL_COUNTRIES, Dimension, Metric};
use crate::aggregate::rollups::{Filter, Step, Visitors, day_of, day_start};
use crate::aggregate::tables::{DimensionCounts, MinutePoint, UniqueCount, ValueCount};
use crate::countries::country_name;
use crate::sketch::{HLL_STANDARD_ERROR, bucket_range, quantile};
use crate::store::{Store, StoreError};

/// `GET /api/countries`: the talk's table.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct CountriesResponse {
    /// Sum of all visits.
    pub total: u64,
    /// With `compare=previous`: the total of the period of the same length just before, and
    /// the change in percent (`null` when the previous period had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<f64>,
    /// The largest count (the full-width bar).
    pub max: u64,
    /// Most visits first, ties by code.
    pub countries: Vec<CountryVisits>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct CountryVisits {
    pub country_code: String,
    pub country_name: String,
    pub visits: u64,
    /// With `compare=previous`: visits in the previous period and the change in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<f64>,
}

/// The change from `before` to `now` in percent; `None` when `before` is 0.
pub fn change(now: u64, before: u64) -> Option<f64> {
    (before > 0).then(|| ((now as f64 - before as f64) / before as f64 * 1000.0).round() / 10.0)
}

/// One value of a panel (see [`ValueCount`]), with its change under `compare=previous`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ValueRow {
    pub value: String,
    pub visits: u64,
    pub bytes: u64,
    /// Visits that were not bots.
    pub humans: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<f64>,
}

impl From<ValueCount> for ValueRow {
    fn from(v: ValueCount) -> ValueRow {
        ValueRow {
            value: v.value,
            visits: v.visits,
            bytes: v.bytes,
            humans: v.humans,
            previous: None,
            change: None,
        }
    }
}

/// `GET /api/dimensions`: what can be asked for.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DimensionList {
    pub dimensions: Vec<DimensionInfo>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DimensionInfo {
    pub name: String,
    pub title: String,
}

/// `GET /api/dimensions/{name}`: one panel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DimensionResponse {
    pub name: String,
    pub title: String,
    /// The last N hours of event time (`null`: all time).
    pub hours: Option<u32>,
    /// Over all stored values, not only those listed.
    pub total_visits: u64,
    pub total_bytes: u64,
    /// Visits that were not bots.
    pub total_humans: u64,
    /// Distinct values stored (`(other)` included when present).
    pub distinct: u64,
    /// Most visits first, ties by value; at most `limit`.
    pub values: Vec<ValueRow>,
    /// With `compare=previous`: total visits of the previous period and the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_total_visits: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<f64>,
}

/// `GET /api/timeseries`: visits per minute (event time).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TimeseriesResponse {
    /// The newest minute with visits, RFC 3339 (`null` before the first flush).
    pub latest: Option<String>,
    /// The range asked for, in minutes back from `latest` (`null`: all time).
    pub minutes: Option<u32>,
    /// The country asked for (`null`: all).
    pub country: Option<String>,
    /// What one point covers: a minute, an hour or a day (see [`Step`]: a range of days
    /// gets the finest step that its length and the retention allow).
    #[serde(default)]
    pub step: Step,
    /// Oldest first; a bounded range has one point per step, zeros included.
    pub points: Vec<TimePoint>,
    /// With `compare=previous`: the previous period's points, one per point above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Vec<TimePoint>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimePoint {
    /// Start of the minute, RFC 3339.
    pub time: String,
    pub visits: u64,
    pub bytes: u64,
    pub humans: u64,
    /// Visits (sessions) whose first page request is in this step.
    #[serde(default)]
    pub sessions: u64,
}

/// `GET /api/uniques`: unique visitors (same address, day and User-Agent) per day.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UniquesResponse {
    /// One standard error of each estimate, relative (99.7 % are within three).
    pub standard_error: f64,
    /// The country asked for (`null`: all).
    pub country: Option<String>,
    /// The sum of the daily estimates over every stored day (GoAccess's total: a visitor
    /// counts once per day).
    pub total: u64,
    /// Distinct visitors over every day listed in `total`'s range (the union of the day
    /// sketches: a visitor seen on several days counts once), within the same error.
    #[serde(default)]
    pub distinct: u64,
    /// Newest first, at most `days`.
    pub days: Vec<DayVisitors>,
    /// Per country on `day` (the newest day unless asked), most first.
    pub day: Option<String>,
    pub countries: Vec<CountryVisitors>,
    /// With `compare=previous`: `total` and `distinct` of the previous period, and the
    /// change of `total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_distinct: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DayVisitors {
    pub day: String,
    pub visitors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountryVisitors {
    pub country_code: String,
    pub visitors: u64,
}

/// `GET /api/histograms/{metric}`: one histogram and its percentiles.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistogramResponse {
    pub metric: String,
    /// A country code, or `*` for all.
    pub scope: String,
    pub visits: u64,
    /// Midpoints of the buckets holding them (within 1/32 of the true value); `null` when
    /// there is no data.
    pub p50: Option<u64>,
    pub p95: Option<u64>,
    pub p99: Option<u64>,
    /// Smallest bucket first; only buckets with visits.
    pub buckets: Vec<Bucket>,
    /// With `compare=previous`: the same for the previous period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<HistogramResponse>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bucket {
    pub low: u64,
    pub high: u64,
    pub visits: u64,
}

/// `GET /api/dashboard` and every push of `/api/events`: all the page shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Dashboard {
    /// Changes with every flush (see [`Store::flush_version`]).
    pub version: i64,
    /// The filter the figures are under (`null`: everything).
    #[serde(default)]
    pub filter: Option<Filter>,
    /// The oldest and newest day counted (`YYYY-MM-DD`), for the page's date presets.
    #[serde(default)]
    pub first_day: Option<String>,
    #[serde(default)]
    pub last_day: Option<String>,
    /// The sites counted, most visits first (at most [`MAX_SITES_LISTED`]).
    #[serde(default)]
    pub sites: Vec<String>,
    /// When this snapshot was read, RFC 3339.
    pub generated_at: String,
    pub totals: Totals,
    /// The talk's table, with bot-free visits where the `country` dimension is counted.
    pub countries: Vec<CountryRow>,
    /// Visits per minute over the hour up to the newest minute.
    pub timeseries: TimeseriesResponse,
    /// One panel per dimension with data, top values only.
    pub dimensions: Vec<DimensionResponse>,
    /// Percentiles (no buckets) of each metric with data: all countries, then the countries
    /// with the most visits.
    pub percentiles: Vec<HistogramResponse>,
    /// With `compare=previous`: the totals of the period of the same length just before
    /// (`previous_from`..=`previous_to`); rows and panels carry their own changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_totals: Option<Totals>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_to: Option<String>,
    /// Visits under the same filter (`null` when the database cannot say).
    #[serde(default)]
    pub sessions: Option<super::visits::SessionsResponse>,
    /// The newest alerts of every alerting group ([`DASHBOARD_ALERTS`] per group; not
    /// filtered: a rule watches all traffic or one country).
    #[serde(default)]
    pub alerts: Option<AlertsResponse>,
}

/// Alerts per alerting group in a dashboard snapshot.
pub const DASHBOARD_ALERTS: u32 = 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    pub visits: u64,
    /// From the `country` dimension (0 when it is not counted).
    pub bytes: u64,
    pub humans: u64,
    pub countries: u64,
    /// Visits per second in the newest complete minute (event time).
    pub visits_per_second: f64,
    /// Unique visitors: the sum of the daily estimates ([`UniquesResponse::total`]).
    pub unique_visitors: u64,
    /// Distinct visitors over the whole range: the union of the day sketches
    /// ([`UniquesResponse::distinct`]).
    #[serde(default)]
    pub distinct_visitors: u64,
    /// One standard error of `unique_visitors`, relative.
    pub unique_visitors_error: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CountryRow {
    pub country_code: String,
    pub country_name: String,
    pub visits: u64,
    /// `null` when the `country` dimension is not counted.
    pub humans: Option<u64>,
    /// With `compare=previous`: visits in the previous period and the change in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<f64>,
}

/// Values per panel in the dashboard snapshot.
const PANEL_ROWS: u32 = 10;
/// `limit` when not given, and its ceiling.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 1_000;
/// The longest bounded time series (a week of minutes).
const MAX_MINUTES: u32 = 7 * 24 * 60;

/// Sites listed in the dashboard snapshot (the page's site menu).
pub const MAX_SITES_LISTED: usize = 200;

/// The filter every panel takes: `from`, `to` (days, `YYYY-MM-DD`, inclusive, event time,
/// UTC), `site`, `country` and `visitors` (`humans`, `bots`, `all`). A handler extracts it
/// beside its own query.
#[derive(Debug, Default, Deserialize)]
pub(super) struct FilterQuery {
    from: Option<String>,
    to: Option<String>,
    site: Option<String>,
    country: Option<String>,
    visitors: Option<String>,
    /// `previous`: add the same figures for the period of the same length just before.
    compare: Option<String>,
    /// `csv`: the rows as CSV instead of JSON.
    format: Option<String>,
}

/// How a panel is asked for besides its filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Output {
    pub compare: bool,
    pub csv: bool,
}

impl FilterQuery {
    /// A query from its parts (`pageviews report`'s options).
    pub(super) fn of(
        from: Option<String>,
        to: Option<String>,
        site: Option<String>,
        country: Option<String>,
        visitors: Option<String>,
    ) -> FilterQuery {
        FilterQuery {
            from,
            to,
            site,
            country,
            visitors,
            compare: None,
            format: None,
        }
    }

    /// `compare` and `format`, or what is wrong with them.
    pub(super) fn output(&self) -> Result<Output, String> {
        let compare = match self.compare.as_deref() {
            None | Some("" | "none") => false,
            Some("previous") => true,
            Some(c) => return Err(format!("compare must be previous or none, not {c:?}")),
        };
        let csv = match self.format.as_deref() {
            None | Some("" | "json") => false,
            Some("csv") => true,
            Some(f) => return Err(format!("format must be json or csv, not {f:?}")),
        };
        Ok(Output { compare, csv })
    }

    /// The filter and the output, or a 400.
    #[allow(clippy::result_large_err)]
    pub(super) fn parse(&self) -> Result<(Filter, Output), Response> {
        match (self.filter(), self.output()) {
            (Ok(f), Ok(o)) => Ok((f, o)),
            (Err(e), _) | (_, Err(e)) => Err(bad_request(e)),
        }
    }

    /// The filter, or what is wrong with the query (a 400's body).
    pub(super) fn filter(&self) -> Result<Filter, String> {
        let day = |name: &str, v: &Option<String>| -> Result<Option<chrono::NaiveDate>, String> {
            match v.as_deref() {
                None | Some("") => Ok(None),
                Some(d) => chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
                    .map(Some)
                    .map_err(|_| format!("{name} must be a day YYYY-MM-DD, not {d:?}")),
            }
        };
        let (from, to) = (day("from", &self.from)?, day("to", &self.to)?);
        if let (Some(f), Some(t)) = (from, to)
            && f > t
        {
            return Err(format!("from ({f}) is after to ({t})"));
        }
        let site = match self.site.as_deref() {
            None | Some("") => None,
            Some(s) if s.len() > crate::event::policy::MAX_VALUE_BYTES => {
                return Err(format!(
                    "site is longer than {} bytes",
                    crate::event::policy::MAX_VALUE_BYTES
                ));
            }
            Some(s) => Some(s.to_owned()),
        };
        let country = match self.country.as_deref() {
            None | Some("") => None,
            Some(c) => Some(
                crate::countries::CountryCode::parse(c)
                    .ok_or_else(|| format!("country must be a two-letter code, not {c:?}"))?
                    .as_str()
                    .to_owned(),
            ),
        };
        let visitors = match self.visitors.as_deref() {
            None => Visitors::All,
            Some(v) => Visitors::parse(v)
                .ok_or_else(|| format!("visitors must be humans, bots or all, not {v:?}"))?,
        };
        Ok(Filter {
            from,
            to,
            site,
            country,
            visitors,
        })
    }
}

/// A database error as the API reports it: 503, the reason in the body.
pub(super) fn unavailable(err: StoreError) -> Response {
    tracing::warn!(%err, "cannot read counts");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("database unavailable: {err}\n"),
    )
        .into_response()
}

/// JSON that must not be cached (it changes with every flush).
pub(super) fn fresh<T: Serialize>(body: T) -> Response {
    let mut resp = Json(body).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

fn bad_request(text: String) -> Response {
    (StatusCode::BAD_REQUEST, text + "\n").into_response()
}

pub(super) async fn countries(
    State(state): State<AppState>,
    Query(f): Query<FilterQuery>,
) -> Response {
    let (filter, out) = match f.parse() {
        Ok(p) => p,
        Err(r) => return r,
    };
    let store = &state.store;
    let read = async {
        let Some((now, before)) = compared(store, &filter, out).await? else {
            return countries_of(store, &filter).await;
        };
        let mut r = countries_of(store, &now).await?;
        let prev = countries_of(store, &before).await?;
        let by: HashMap<&str, u64> = prev
            .countries
            .iter()
            .map(|c| (c.country_code.as_str(), c.visits))
            .collect();
        for c in &mut r.countries {
            let p = by.get(c.country_code.as_str()).copied().unwrap_or(0);
            (c.previous, c.change) = (Some(p), change(c.visits, p));
        }
        (r.previous_total, r.change) = (Some(prev.total), change(r.total, prev.total));
        Ok(r)
    };
    match read.await {
        Ok(r) if out.csv => csv::response(
            "countries",
            csv::table(
                &[
                    "country_code",
                    "country_name",
                    "visits",
                    "previous",
                    "change",
                ],
                r.countries.iter().map(|c| {
                    vec![
                        c.country_code.clone(),
                        c.country_name.clone(),
                        c.visits.to_string(),
                        opt(c.previous),
                        opt(c.change),
                    ]
                }),
            ),
        ),
        Ok(r) => fresh(r),
        Err(err) => unavailable(err),
    }
}

/// An optional cell: empty when absent.
fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// With `compare=previous`: `filter` over its days (every day counted when it has none) and
/// the same filter over the period of the same length just before; `None` without compare
/// or before anything is counted.
pub(super) async fn compared(
    store: &Store,
    filter: &Filter,
    out: Output,
) -> Result<Option<(Filter, Filter)>, StoreError> {
    if !out.compare {
        return Ok(None);
    }
    let (first, last, _) = store.rollup_extent().await?;
    let (Some(from), Some(to)) = (filter.from.or(first), filter.to.or(last)) else {
        return Ok(None);
    };
    let length = chrono::Duration::days((to - from).num_days() + 1);
    let before = filter.with_days(from - length, from - chrono::Duration::days(1));
    Ok(Some((filter.with_days(from, to), before)))
}

/// Adds the previous period's figures to a panel.
fn compare_panel(now: &mut DimensionResponse, before: &DimensionResponse) {
    let by: HashMap<&str, u64> = before
        .values
        .iter()
        .map(|v| (v.value.as_str(), v.visits))
        .collect();
    for v in &mut now.values {
        let p = by.get(v.value.as_str()).copied().unwrap_or(0);
        (v.previous, v.change) = (Some(p), change(v.visits, p));
    }
    now.previous_total_visits = Some(before.total_visits);
    now.change = change(now.total_visits, before.total_visits);
}

async fn countries_of(store: &Store, filter: &Filter) -> Result<CountriesResponse, StoreError> {
    let rows: Vec<(String, u64)> = if filter.is_everything() {
        store
            .country_counts()
            .await?
            .into_iter()
            .map(|r| (r.country_code, r.visits))
            .collect()
    } else {
        store
            .filtered_countries(filter)
            .await?
            .into_iter()
            .map(|r| (r.country_code, r.visits))
            .collect()
    };
    let total = rows.iter().map(|r| r.1).sum();
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0);
    let countries = rows
        .into_iter()
        .map(|(code, visits)| CountryVisits {
            country_name: country_name(&code),
            country_code: code,
            visits,
            previous: None,
            change: None,
        })
        .collect();
    Ok(CountriesResponse {
        total,
        previous_total: None,
        change: None,
        max,
        countries,
    })
}

/// `/api/alerts`: every alerting group's state and newest alerts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AlertsResponse {
    pub groups: Vec<AlertGroup>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AlertGroup {
    pub group: String,
    /// Windows ending at or before this (RFC 3339) are closed; `None` before the first close.
    pub closed_through: Option<String>,
    pub late_events: u64,
    pub pending: u64,
    pub delivered: u64,
    /// The newest alerts, by window.
    pub alerts: Vec<AlertRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AlertRow {
    #[serde(flatten)]
    pub alert: crate::alert::window::Alert,
    pub delivered: bool,
    /// When it was delivered, RFC 3339 (`null`: not yet).
    #[serde(default)]
    pub delivered_at: Option<String>,
    /// Delivery attempts so far (failed ones and the one that succeeded).
    pub attempts: u64,
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct AlertsQuery {
    limit: Option<u32>,
}

pub(super) async fn alerts(
    State(state): State<AppState>,
    Query(q): Query<AlertsQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    match alerts_of(&state.store, limit).await {
        Ok(r) => fresh(r),
        Err(err) => unavailable(err),
    }
}

/// The newest `limit` alerts of every alerting group, with the group's state.
pub(crate) async fn alerts_of(store: &Store, limit: u32) -> Result<AlertsResponse, StoreError> {
    let mut groups = Vec::new();
    for group in store.alert_groups().await? {
        let status = store.alert_status(&group).await?;
        let alerts = store
            .recent_alerts(&group, limit)
            .await?
            .into_iter()
            .map(|a| AlertRow {
                alert: a.alert,
                delivered: a.delivered,
                delivered_at: a.delivered_at.and_then(|ms| {
                    chrono::DateTime::from_timestamp_millis(ms)
                        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                }),
                attempts: a.attempts,
            })
            .collect();
        groups.push(AlertGroup {
            group,
            closed_through: status.closed_through.and_then(|t| {
                chrono::DateTime::from_timestamp(t, 0)
                    .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            }),
            late_events: status.late_events,
            pending: status.pending,
            delivered: status.delivered,
            alerts,
        });
    }
    Ok(AlertsResponse { groups })
}

pub(super) async fn dimension_list() -> Response {
    fresh(DimensionList {
        dimensions: Dimension::ALL
            .iter()
            .map(|d| DimensionInfo {
                name: d.name().to_owned(),
                title: d.title().to_owned(),
            })
            .collect(),
    })
}

#[derive(Debug, Deserialize)]
pub(super) struct DimensionQuery {
    limit: Option<u32>,
    /// Only the last N hours (of event time, up to the newest hour counted).
    hours: Option<u32>,
}

/// The longest "last N hours" (a week; hourly counts are kept as long as the minutes).
const MAX_HOURS: u32 = 7 * 24;

pub(super) async fn dimension(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<DimensionQuery>,
    Query(f): Query<FilterQuery>,
) -> Response {
    let (filter, out) = match f.parse() {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(d) = Dimension::parse(&name) else {
        let names: Vec<&str> = Dimension::ALL.iter().map(|d| d.name()).collect();
        return (
            StatusCode::NOT_FOUND,
            format!(
                "no dimension {name:?}; known: {} (GET /api/dimensions)\n",
                names.join(", ")
            ),
        )
            .into_response();
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    if let Some(h) = q.hours
        && !(1..=MAX_HOURS).contains(&h)
    {
        return bad_request(format!("hours must be 1..={MAX_HOURS}, not {h}"));
    }
    let store = &state.store;
    let read = async {
        let Some((now, before)) = compared(store, &filter, out).await? else {
            return dimension_of(store, d, limit, q.hours, &filter).await;
        };
        let mut r = dimension_of(store, d, limit, q.hours, &now).await?;
        // Every value of the previous period that is listed now (not only its top ones).
        let prev = dimension_of(store, d, MAX_LIMIT, q.hours, &before).await?;
        compare_panel(&mut r, &prev);
        Ok(r)
    };
    match read.await {
        Ok(r) if out.csv => csv::response(
            d.name(),
            csv::table(
                &["value", "visits", "bytes", "humans", "previous", "change"],
                r.values.iter().map(|v| {
                    vec![
                        v.value.clone(),
                        v.visits.to_string(),
                        v.bytes.to_string(),
                        v.humans.to_string(),
                        opt(v.previous),
                        opt(v.change),
                    ]
                }),
            ),
        ),
        Ok(r) => fresh(r),
        Err(err) => unavailable(err),
    }
}

/// A dimension's values: all time, or in the last `hours` hours up to the newest hour counted
/// (all time while nothing is counted yet).
async fn dimension_of(
    store: &Store,
    d: Dimension,
    limit: u32,
    hours: Option<u32>,
    filter: &Filter,
) -> Result<DimensionResponse, StoreError> {
    let since = match hours {
        Some(h) => store.latest_minute().await?.map(|latest| {
            let newest_hour = latest - latest.rem_euclid(3600);
            newest_hour - 3600 * (i64::from(h) - 1)
        }),
        None => None,
    };
    let c: DimensionCounts = if filter.is_everything() {
        store.dimension_counts(d.name(), since, limit).await?
    } else {
        store
            .filtered_dimension(d.name(), filter, since, limit)
            .await?
    };
    Ok(DimensionResponse {
        name: d.name().to_owned(),
        title: d.title().to_owned(),
        hours,
        total_visits: c.total_visits,
        total_bytes: c.total_bytes,
        total_humans: c.total_humans,
        distinct: c.distinct,
        values: c.values.into_iter().map(ValueRow::from).collect(),
        previous_total_visits: None,
        change: None,
    })
}

#[derive(Debug, Deserialize)]
pub(super) struct TimeseriesQuery {
    /// Minutes back from the newest one, or `all`.
    minutes: Option<String>,
    country: Option<String>,
}

pub(super) async fn timeseries(
    State(state): State<AppState>,
    Query(q): Query<TimeseriesQuery>,
    Query(f): Query<FilterQuery>,
) -> Response {
    let (filter, out) = match f.parse() {
        Ok(p) => p,
        Err(r) => return r,
    };
    let minutes = match q.minutes.as_deref() {
        None => Some(60),
        Some("all") => None,
        Some(n) => match n.parse::<u32>() {
            Ok(n) if (1..=MAX_MINUTES).contains(&n) => Some(n),
            _ => {
                return bad_request(format!(
                    "minutes must be 1..={MAX_MINUTES} or \"all\", not {n:?}"
                ));
            }
        },
    };
    let country = match q.country.as_deref() {
        None | Some("") => None,
        Some(c) => match crate::countries::CountryCode::parse(c) {
            Some(c) => Some(c.as_str().to_owned()),
            None => return bad_request(format!("country must be a two-letter code, not {c:?}")),
        },
    };
    let store = &state.store;
    let read = async {
        if let Some((now, before)) = compared(store, &filter, out).await? {
            let mut r = series_of(store, minutes, &now).await?;
            r.previous = Some(series_of(store, minutes, &before).await?.points);
            return Ok(r);
        }
        // All time (and any filter) is a range of days in the step that fits it.
        if minutes.is_none() || filter_beyond_country(&filter) {
            series_of(store, minutes, &filter).await
        } else {
            timeseries_of(store, minutes, country).await
        }
    };
    match read.await {
        Ok(r) if out.csv => {
            let previous = r.previous.as_deref().unwrap_or_default();
            csv::response(
                "timeseries",
                csv::table(
                    &["time", "visits", "bytes", "humans", "previous"],
                    r.points.iter().enumerate().map(|(i, p)| {
                        vec![
                            p.time.clone(),
                            p.visits.to_string(),
                            p.bytes.to_string(),
                            p.humans.to_string(),
                            opt(previous.get(i).map(|p| p.visits)),
                        ]
                    }),
                ),
            )
        }
        Ok(r) => fresh(r),
        Err(err) => unavailable(err),
    }
}

/// Whether `filter` asks for more than one country (which the per-country running totals
/// answer as they always have).
pub(super) fn filter_beyond_country(filter: &Filter) -> bool {
    !Filter {
        country: None,
        ..filter.clone()
    }
    .is_everything()
}

/// The longest range answered in hours (hourly counts are kept as long as the minutes).
const MAX_HOURLY_DAYS: i64 = 7;

/// The time series under `filter`: over its days when it has any, with the finest step the
/// range's length and the retention allow (minutes up to a day, hours up to a week, days
/// beyond); otherwise the last `minutes` minutes, as unfiltered.
pub(super) async fn series_of(
    store: &Store,
    minutes: Option<u32>,
    filter: &Filter,
) -> Result<TimeseriesResponse, StoreError> {
    let latest = store.latest_minute().await?;
    let point = |p: &MinutePoint| TimePoint {
        time: rfc3339(p.minute),
        visits: p.visits,
        bytes: p.bytes,
        humans: p.humans,
        sessions: 0,
    };
    let (first_day, last_day, oldest_minute) = store.rollup_extent().await?;
    // All time is a range too: the whole extent, in the step its length allows.
    let ranged = filter.from.is_some() || filter.to.is_some() || minutes.is_none();
    let (step, from, until, stored) = if ranged {
        let (Some(first), Some(last)) = (filter.from.or(first_day), filter.to.or(last_day)) else {
            return Ok(TimeseriesResponse {
                latest: latest.map(rfc3339),
                minutes: None,
                country: filter.country.clone(),
                step: Step::Day,
                points: Vec::new(),
                previous: None,
            });
        };
        let range = filter.with_days(first, last);
        let days = store.filtered_series(&range, Step::Day, None).await?;
        let length = (last - first).num_days() + 1;
        let fine = if length <= 1 {
            Some(Step::Minute)
        } else if length <= MAX_HOURLY_DAYS {
            Some(Step::Hour)
        } else {
            None
        };
        // Minutes and hours only where the retained minutes hold the whole range: their
        // sum equals the day totals' (retention has pruned nothing in it).
        let mut chosen = (Step::Day, days);
        if let Some(step) = fine
            && oldest_minute.is_some()
        {
            let points = store.filtered_series(&range, step, None).await?;
            let sum = |p: &[MinutePoint]| p.iter().map(|p| p.visits).sum::<u64>();
            if sum(&points) == sum(&chosen.1) {
                chosen = (step, points);
            }
        }
        (
            chosen.0,
            day_start(first),
            day_start(last) + 86_400,
            chosen.1,
        )
    } else {
        let Some(latest) = latest else {
            return Ok(TimeseriesResponse {
                latest: None,
                minutes,
                country: filter.country.clone(),
                step: Step::Minute,
                points: Vec::new(),
                previous: None,
            });
        };
        let from = latest - 60 * (i64::from(minutes.unwrap_or(60)) - 1);
        let points = store
            .filtered_series(filter, Step::Minute, Some(from))
            .await?;
        (Step::Minute, from, latest + 60, points)
    };
    let stored: HashMap<i64, MinutePoint> = stored.into_iter().map(|p| (p.minute, p)).collect();
    // Visits (sessions) started per step, beside the requests.
    let since = (step != Step::Day).then_some(from);
    let sessions: HashMap<i64, u64> = if crate::aggregate::visits::may_have_visits(filter) {
        let mut range = filter.clone();
        if let (true, Some(first), Some(last)) = (ranged, day_of(from), day_of(until - 1)) {
            range = range.with_days(first, last);
        }
        store
            .visit_series(&range, step, since)
            .await?
            .into_iter()
            .collect()
    } else {
        HashMap::new()
    };
    let points = (0..)
        .map(|i| from + step.seconds() * i)
        .take_while(|t| *t < until)
        .map(|t| {
            let mut p = stored.get(&t).map(point).unwrap_or_else(|| TimePoint {
                time: rfc3339(t),
                visits: 0,
                bytes: 0,
                humans: 0,
                sessions: 0,
            });
            p.sessions = sessions.get(&t).copied().unwrap_or(0);
            p
        })
        .collect();
    Ok(TimeseriesResponse {
        latest: latest.map(rfc3339),
        minutes: if ranged { None } else { minutes },
        country: filter.country.clone(),
        step,
        points,
        previous: None,
    })
}

fn rfc3339(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

async fn timeseries_of(
    store: &Store,
    minutes: Option<u32>,
    country: Option<String>,
) -> Result<TimeseriesResponse, StoreError> {
    let latest = store.latest_minute().await?;
    let point = |p: &MinutePoint| TimePoint {
        time: rfc3339(p.minute),
        visits: p.visits,
        bytes: p.bytes,
        humans: p.humans,
        sessions: 0,
    };
    let points = match (latest, minutes) {
        (None, _) => Vec::new(),
        (Some(_), None) => store
            .minutes(i64::MIN, country.as_deref())
            .await?
            .iter()
            .map(point)
            .collect(),
        (Some(latest), Some(n)) => {
            let from = latest - 60 * (i64::from(n) - 1);
            let stored: HashMap<i64, MinutePoint> = store
                .minutes(from, country.as_deref())
                .await?
                .into_iter()
                .map(|p| (p.minute, p))
                .collect();
            (0..i64::from(n))
                .map(|i| from + 60 * i)
                .map(|m| {
                    stored.get(&m).map(point).unwrap_or_else(|| TimePoint {
                        time: rfc3339(m),
                        visits: 0,
                        bytes: 0,
                        humans: 0,
                        sessions: 0,
                    })
                })
                .collect()
        }
    };
    Ok(TimeseriesResponse {
        latest: latest.map(rfc3339),
        minutes,
        country,
        step: Step::Minute,
        points,
        previous: None,
    })
}

pub(super) async fn dashboard_json(
    State(state): State<AppState>,
    Query(f): Query<FilterQuery>,
) -> Response {
    let (filter, out) = match f.parse() {
        Ok(p) => p,
        Err(r) => return r,
    };
    match dashboard(&state.store, &filter, out.compare).await {
        Ok(d) if out.csv => csv::response("dashboard", dashboard_csv(&d)),
        Ok(d) => fresh(d),
        Err(err) => unavailable(err),
    }
}

/// The dashboard as one CSV table: the totals, then every country and every panel's rows.
pub(super) fn dashboard_csv(d: &Dashboard) -> String {
    let mut rows = vec![vec![
        "total".to_owned(),
        String::new(),
        d.totals.visits.to_string(),
        d.totals.bytes.to_string(),
        d.totals.humans.to_string(),
        opt(d.previous_totals.as_ref().map(|t| t.visits)),
        opt(d
            .previous_totals
            .as_ref()
            .and_then(|t| change(d.totals.visits, t.visits))),
    ]];
    for c in &d.countries {
        rows.push(vec![
            "country".to_owned(),
            c.country_code.clone(),
            c.visits.to_string(),
            String::new(),
            opt(c.humans),
            opt(c.previous),
            opt(c.change),
        ]);
    }
    for p in &d.dimensions {
        for v in &p.values {
            rows.push(vec![
                p.name.clone(),
                v.value.clone(),
                v.visits.to_string(),
                v.bytes.to_string(),
                v.humans.to_string(),
                opt(v.previous),
                opt(v.change),
            ]);
        }
    }
    csv::table(
        &[
            "panel", "value", "visits", "bytes", "humans", "previous", "change",
        ],
        rows,
    )
}

/// Everything the page shows under `filter`, read in one go; with `compare`, the previous
/// period's totals and every row's change.
pub async fn dashboard(
    store: &Store,
    filter: &Filter,
    compare: bool,
) -> Result<Dashboard, StoreError> {
    let out = Output {
        compare,
        csv: false,
    };
    let Some((now, before)) = compared(store, filter, out).await? else {
        return dashboard_under(store, filter).await;
    };
    let mut d = dashboard_under(store, &now).await?;
    let prev = dashboard_under(store, &before).await?;
    let by: HashMap<&str, u64> = prev
        .countries
        .iter()
        .map(|c| (c.country_code.as_str(), c.visits))
        .collect();
    for c in &mut d.countries {
        let p = by.get(c.country_code.as_str()).copied().unwrap_or(0);
        (c.previous, c.change) = (Some(p), change(c.visits, p));
    }
    for panel in &mut d.dimensions {
        let before = match prev.dimensions.iter().find(|p| p.name == panel.name) {
            Some(p) => p.clone(),
            None => DimensionResponse {
                values: Vec::new(),
                total_visits: 0,
                ..panel.clone()
            },
        };
        compare_panel(panel, &before);
    }
    if let (Some(s), Some(p)) = (&mut d.sessions, prev.sessions) {
        s.previous = Some(Box::new(p));
    }
    d.previous_totals = Some(prev.totals);
    d.previous_from = before.from.map(|d| d.to_string());
    d.previous_to = before.to.map(|d| d.to_string());
    Ok(d)
}

/// Everything the page shows under `filter`.
async fn dashboard_under(store: &Store, filter: &Filter) -> Result<Dashboard, StoreError> {
    if filter.is_everything() {
        let mut d = dashboard_all(store).await?;
        extent(store, &mut d).await?;
        return Ok(d);
    }
    let version = store.flush_version().await?;
    let by_country = store.filtered_countries(filter).await?;
    let countries: Vec<CountryRow> = by_country
        .iter()
        .map(|c| CountryRow {
            country_code: c.country_code.clone(),
            country_name: country_name(&c.country_code),
            visits: c.visits,
            humans: Some(c.humans),
            previous: None,
            change: None,
        })
        .collect();
    let mut dimensions = Vec::new();
    for d in Dimension::ALL {
        let panel = dimension_of(store, d, PANEL_ROWS, None, filter).await?;
        if panel.distinct > 0 {
            dimensions.push(panel);
        }
    }
    let timeseries = series_of(store, Some(60), filter).await?;
    let uniques = uniques_under(store, filter, None).await?;
    let mut percentiles = Vec::new();
    for metric in Metric::ALL {
        let mut scopes: Vec<Option<&str>> = vec![None];
        if filter.country.is_none() {
            scopes.extend(
                by_country
                    .iter()
                    .take(5)
                    .map(|c| Some(c.country_code.as_str())),
            );
        }
        for scope in scopes {
            let f = Filter {
                country: scope.map(str::to_owned).or_else(|| filter.country.clone()),
                ..filter.clone()
            };
            let mut h = filtered_histogram_of(store, metric, &f).await?;
            if h.visits == 0 {
                break;
            }
            h.buckets.clear();
            percentiles.push(h);
        }
    }
    let visits_per_second = match timeseries.step {
        Step::Minute => timeseries
            .points
            .iter()
            .rev()
            .nth(1)
            .map_or(0.0, |p| p.visits as f64 / 60.0),
        _ => 0.0,
    };
    let mut d = Dashboard {
        version,
        filter: Some(filter.clone()),
        first_day: None,
        last_day: None,
        sites: Vec::new(),
        generated_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        totals: Totals {
            visits: by_country.iter().map(|c| c.visits).sum(),
            bytes: by_country
                .iter()
                .map(|c| c.bytes)
                .fold(0, u64::saturating_add),
            humans: by_country.iter().map(|c| c.humans).sum(),
            countries: by_country.len() as u64,
            visits_per_second,
            unique_visitors: uniques.total,
            distinct_visitors: uniques.distinct,
            unique_visitors_error: HLL_STANDARD_ERROR,
        },
        countries,
        timeseries,
        dimensions,
        percentiles,
        previous_totals: None,
        previous_from: None,
        previous_to: None,
        sessions: Some(super::visits::sessions_under(store, filter).await?),
        alerts: Some(alerts_of(store, DASHBOARD_ALERTS).await?),
    };
    extent(store, &mut d).await?;
    Ok(d)
}

/// The days and sites counted, for the page's filter bar.
async fn extent(store: &Store, d: &mut Dashboard) -> Result<(), StoreError> {
    let (first, last, _) = store.rollup_extent().await?;
    d.first_day = first.map(|d| d.to_string());
    d.last_day = last.map(|d| d.to_string());
    d.sites = store
        .sites()
        .await?
        .into_iter()
        .map(|(s, _)| s)
        // A log without virtual hosts counts everything under the empty site.
        .filter(|s| !s.is_empty())
        .take(MAX_SITES_LISTED)
        .collect();
    Ok(())
}

/// Everything the page shows, unfiltered: the running totals.
async fn dashboard_all(store: &Store) -> Result<Dashboard, StoreError> {
    let version = store.flush_version().await?;
    let countries = countries_of(store, &Filter::default()).await?;
    let by_country = store
        .dimension_counts(Dimension::Country.name(), None, 10_000)
        .await?;
    let humans: HashMap<&str, u64> = by_country
        .values
        .iter()
        .map(|v| (v.value.as_str(), v.humans))
        .collect();
    let counted = !by_country.values.is_empty();
    let mut dimensions = Vec::new();
    for d in Dimension::ALL {
        let panel = dimension_of(store, d, PANEL_ROWS, None, &Filter::default()).await?;
        if panel.distinct > 0 {
            dimensions.push(panel);
        }
    }
    let timeseries = timeseries_of(store, Some(60), None).await?;
    let unique_visitors = store
        .unique_days(ALL_COUNTRIES, u32::MAX)
        .await?
        .iter()
        .map(|d| d.visitors)
        .sum();
    let distinct_visitors = uniques_under(store, &Filter::default(), None)
        .await?
        .distinct;
    let mut percentiles = Vec::new();
    for metric in Metric::ALL {
        let scopes = std::iter::once(ALL_COUNTRIES).chain(
            countries
                .countries
                .iter()
                .take(5)
                .map(|c| c.country_code.as_str()),
        );
        for scope in scopes {
            let mut h = histogram_of(store, metric, scope).await?;
            if h.visits == 0 {
                break;
            }
            h.buckets.clear();
            percentiles.push(h);
        }
    }
    // The newest minute may still be filling: the rate is of the one before it.
    let visits_per_second = timeseries
        .points
        .iter()
        .rev()
        .nth(1)
        .map_or(0.0, |p| p.visits as f64 / 60.0);
    Ok(Dashboard {
        version,
        filter: None,
        first_day: None,
        last_day: None,
        sites: Vec::new(),
        generated_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        totals: Totals {
            visits: countries.total,
            bytes: by_country.total_bytes,
            humans: by_country.total_humans,
            countries: countries.countries.len() as u64,
            visits_per_second,
            unique_visitors,
            distinct_visitors,
            unique_visitors_error: HLL_STANDARD_ERROR,
        },
        countries: countries
            .countries
            .into_iter()
            .map(|c| CountryRow {
                humans: counted.then(|| humans.get(c.country_code.as_str()).copied().unwrap_or(0)),
                country_code: c.country_code,
                country_name: c.country_name,
                visits: c.visits,
                previous: None,
                change: None,
            })
            .collect(),
        timeseries,
        dimensions,
        percentiles,
        previous_totals: None,
        previous_from: None,
        previous_to: None,
        sessions: Some(super::visits::sessions_under(store, &Filter::default()).await?),
        alerts: Some(alerts_of(store, DASHBOARD_ALERTS).await?),
    })
}

#[derive(Debug, Deserialize)]
pub(super) struct UniquesQuery {
    days: Option<u32>,
    country: Option<String>,
    day: Option<String>,
}

pub(super) async fn uniques(
    State(state): State<AppState>,
    Query(q): Query<UniquesQuery>,
    Query(f): Query<FilterQuery>,
) -> Response {
    let (filter, out) = match f.parse() {
        Ok(p) => p,
        Err(r) => return r,
    };
    let country = match q.country.as_deref() {
        None | Some("") => None,
        Some(c) => match crate::countries::CountryCode::parse(c) {
            Some(c) => Some(c.as_str().to_owned()),
            None => return bad_request(format!("country must be a two-letter code, not {c:?}")),
        },
    };
    if let Some(day) = &q.day
        && chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").is_err()
    {
        return bad_request(format!("day must be YYYY-MM-DD, not {day:?}"));
    }
    let days = q.days.unwrap_or(30).clamp(1, 36_600);
    let store = &state.store;
    let filtered = async {
        let Some((now, before)) = compared(store, &filter, out).await? else {
            return uniques_under(store, &filter, q.day.as_deref()).await;
        };
        let mut r = uniques_under(store, &now, q.day.as_deref()).await?;
        let prev = uniques_under(store, &before, None).await?;
        r.previous_total = Some(prev.total);
        r.previous_distinct = Some(prev.distinct);
        r.change = change(r.total, prev.total);
        Ok(r)
    };
    let respond = |r: Result<UniquesResponse, StoreError>| match r {
        Ok(r) if out.csv => csv::response(
            "uniques",
            csv::table(
                &["day", "visitors"],
                r.days
                    .iter()
                    .map(|d| vec![d.day.clone(), d.visitors.to_string()]),
            ),
        ),
        Ok(r) => fresh(r),
        Err(err) => unavailable(err),
    };
    if out.compare || filter_beyond_country(&filter) {
        return respond(filtered.await.map(|mut r| {
            r.days.truncate(days as usize);
            r
        }));
    }
    let read = async {
        let scope = country.as_deref().unwrap_or(ALL_COUNTRIES);
        let all = state.store.unique_days(scope, u32::MAX).await?;
        let total = all.iter().map(|d| d.visitors).sum();
        let day = q.day.clone().or_else(|| all.first().map(|d| d.day.clone()));
        let countries = match &day {
            Some(d) => state.store.unique_countries(d).await?,
            None => Vec::new(),
        };
        let day_row = |u: &UniqueCount| DayVisitors {
            day: u.day.clone(),
            visitors: u.visitors,
        };
        let distinct = uniques_under(&state.store, &filter, None).await?.distinct;
        Ok::<_, StoreError>(UniquesResponse {
            standard_error: HLL_STANDARD_ERROR,
            country: country.clone(),
            total,
            distinct,
            days: all.iter().take(days as usize).map(day_row).collect(),
            day,
            countries: countries
                .into_iter()
                .map(|u| CountryVisitors {
                    country_code: u.country_code,
                    visitors: u.visitors,
                })
                .collect(),
            previous_total: None,
            previous_distinct: None,
            change: None,
        })
    };
    respond(read.await)
}

/// Unique visitors under `filter` from the day sketches of its slices: per day (newest
/// first) the union of the day's slices, their sum, the union of every day, and per country
/// on `day` (the newest unless given).
async fn uniques_under(
    store: &Store,
    filter: &Filter,
    day: Option<&str>,
) -> Result<UniquesResponse, StoreError> {
    let rows = store.filtered_uniques(filter).await?;
    let mut days: std::collections::BTreeMap<&str, crate::sketch::Hll> = Default::default();
    let mut all = crate::sketch::Hll::default();
    for (d, _, h) in &rows {
        days.entry(d.as_str()).or_default().merge(h);
        all.merge(h);
    }
    let estimate = |h: &crate::sketch::Hll| h.estimate().round() as u64;
    let listed: Vec<DayVisitors> = days
        .iter()
        .rev()
        .map(|(d, h)| DayVisitors {
            day: (*d).to_owned(),
            visitors: estimate(h),
        })
        .collect();
    let day = day
        .map(str::to_owned)
        .or_else(|| listed.first().map(|d| d.day.clone()));
    let mut countries: Vec<CountryVisitors> = rows
        .iter()
        .filter(|(d, _, _)| Some(d) == day.as_ref())
        .map(|(_, c, h)| CountryVisitors {
            country_code: c.clone(),
            visitors: estimate(h),
        })
        .collect();
    countries.sort_by(|a, b| {
        b.visitors
            .cmp(&a.visitors)
            .then_with(|| a.country_code.cmp(&b.country_code))
    });
    Ok(UniquesResponse {
        standard_error: HLL_STANDARD_ERROR,
        country: filter.country.clone(),
        total: listed.iter().map(|d| d.visitors).sum(),
        distinct: if rows.is_empty() { 0 } else { estimate(&all) },
        days: listed,
        day,
        countries,
        previous_total: None,
        previous_distinct: None,
        change: None,
    })
}

pub(super) async fn filtered_histogram_of(
    store: &Store,
    metric: Metric,
    filter: &Filter,
) -> Result<HistogramResponse, StoreError> {
    let buckets = store.filtered_histogram(metric.name(), filter).await?;
    Ok(histogram_response(
        metric,
        filter.country.as_deref().unwrap_or(ALL_COUNTRIES),
        &buckets,
    ))
}

#[derive(Debug, Deserialize)]
pub(super) struct HistogramQuery {
    country: Option<String>,
}

pub(super) async fn histogram(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<HistogramQuery>,
    Query(f): Query<FilterQuery>,
) -> Response {
    let (filter, out) = match f.parse() {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(metric) = Metric::parse(&name) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no histogram {name:?}; known: bytes, request_time_us\n"),
        )
            .into_response();
    };
    let scope = match q.country.as_deref() {
        None | Some("") => ALL_COUNTRIES.to_owned(),
        Some(c) => match crate::countries::CountryCode::parse(c) {
            Some(c) => c.as_str().to_owned(),
            None => return bad_request(format!("country must be a two-letter code, not {c:?}")),
        },
    };
    let store = &state.store;
    let read = async {
        if let Some((now, before)) = compared(store, &filter, out).await? {
            let mut r = filtered_histogram_of(store, metric, &now).await?;
            r.previous = Some(Box::new(
                filtered_histogram_of(store, metric, &before).await?,
            ));
            return Ok(r);
        }
        if filter_beyond_country(&filter) {
            filtered_histogram_of(store, metric, &filter).await
        } else {
            histogram_of(store, metric, &scope).await
        }
    };
    match read.await {
        Ok(r) if out.csv => csv::response(
            metric.name(),
            csv::table(
                &["low", "high", "visits"],
                r.buckets
                    .iter()
                    .map(|b| vec![b.low.to_string(), b.high.to_string(), b.visits.to_string()]),
            ),
        ),
        Ok(r) => fresh(r),
        Err(err) => unavailable(err),
    }
}

pub(super) async fn histogram_of(
    store: &Store,
    metric: Metric,
    scope: &str,
) -> Result<HistogramResponse, StoreError> {
    let buckets = store.histogram(metric.name(), scope).await?;
    Ok(histogram_response(metric, scope, &buckets))
}

fn histogram_response(metric: Metric, scope: &str, buckets: &[(i32, u64)]) -> HistogramResponse {
    HistogramResponse {
        metric: metric.name().to_owned(),
        scope: scope.to_owned(),
        visits: buckets.iter().map(|b| b.1).sum(),
        p50: quantile(buckets, 0.50),
        p95: quantile(buckets, 0.95),
        p99: quantile(buckets, 0.99),
        buckets: buckets
            .iter()
            .filter(|b| b.1 > 0)
            .map(|&(b, visits)| {
                let (low, high) = bucket_range(b);
                Bucket { low, high, visits }
            })
            .collect(),
        previous: None,
    }
}
