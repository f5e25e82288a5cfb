//! The JSON API: one handler per panel, and the dashboard snapshot the live page is pushed.
//! Every response is read from the database, so it works whichever process aggregates.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::aggregate::dimensions::{ALL_COUNTRIES, Dimension, Metric};
use crate::aggregate::tables::{MinutePoint, UniqueCount, ValueCount};
use crate::countries::country_name;
use crate::sketch::{HLL_STANDARD_ERROR, bucket_range, quantile};
use crate::store::{Store, StoreError};

/// `GET /api/countries`: the talk's table.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountriesResponse {
    /// Sum of all visits.
    pub total: u64,
    /// The largest count (the full-width bar).
    pub max: u64,
    /// Most visits first, ties by code.
    pub countries: Vec<CountryVisits>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountryVisits {
    pub country_code: String,
    pub country_name: String,
    pub visits: u64,
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
    pub values: Vec<ValueCount>,
}

/// `GET /api/timeseries`: visits per minute (event time).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimeseriesResponse {
    /// The newest minute with visits, RFC 3339 (`null` before the first flush).
    pub latest: Option<String>,
    /// The range asked for, in minutes back from `latest` (`null`: all time).
    pub minutes: Option<u32>,
    /// The country asked for (`null`: all).
    pub country: Option<String>,
    /// Oldest first; a bounded range has one point per minute, zeros included.
    pub points: Vec<TimePoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimePoint {
    /// Start of the minute, RFC 3339.
    pub time: String,
    pub visits: u64,
    pub bytes: u64,
    pub humans: u64,
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
    /// Newest first, at most `days`.
    pub days: Vec<DayVisitors>,
    /// Per country on `day` (the newest day unless asked), most first.
    pub day: Option<String>,
    pub countries: Vec<CountryVisitors>,
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
}

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
    /// One standard error of `unique_visitors`, relative.
    pub unique_visitors_error: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountryRow {
    pub country_code: String,
    pub country_name: String,
    pub visits: u64,
    /// `null` when the `country` dimension is not counted.
    pub humans: Option<u64>,
}

/// Values per panel in the dashboard snapshot.
const PANEL_ROWS: u32 = 10;
/// `limit` when not given, and its ceiling.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 1_000;
/// The longest bounded time series (a week of minutes).
const MAX_MINUTES: u32 = 7 * 24 * 60;

/// A database error as the API reports it: 503, the reason in the body.
fn unavailable(err: StoreError) -> Response {
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

pub(super) async fn countries(State(state): State<AppState>) -> Response {
    match countries_of(&state.store).await {
        Ok(c) => fresh(c),
        Err(err) => unavailable(err),
    }
}

async fn countries_of(store: &Store) -> Result<CountriesResponse, StoreError> {
    let rows = store.country_counts().await?;
    let total = rows.iter().map(|r| r.visits).sum();
    let max = rows.iter().map(|r| r.visits).max().unwrap_or(0);
    let countries = rows
        .into_iter()
        .map(|r| CountryVisits {
            country_name: country_name(&r.country_code),
            country_code: r.country_code,
            visits: r.visits,
        })
        .collect();
    Ok(CountriesResponse {
        total,
        max,
        countries,
    })
}

/// `/api/alerts`: every alerting group's state and newest alerts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertsResponse {
    pub groups: Vec<AlertGroup>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertRow {
    #[serde(flatten)]
    pub alert: crate::alert::window::Alert,
    pub delivered: bool,
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
    let read = async {
        let mut groups = Vec::new();
        for group in state.store.alert_groups().await? {
            let status = state.store.alert_status(&group).await?;
            let alerts = state
                .store
                .recent_alerts(&group, limit)
                .await?
                .into_iter()
                .map(|a| AlertRow {
                    alert: a.alert,
                    delivered: a.delivered,
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
        Ok::<_, StoreError>(AlertsResponse { groups })
    };
    match read.await {
        Ok(r) => fresh(r),
        Err(err) => unavailable(err),
    }
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
) -> Response {
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
    match dimension_of(&state.store, d, limit, q.hours).await {
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
) -> Result<DimensionResponse, StoreError> {
    let since = match hours {
        Some(h) => store.latest_minute().await?.map(|latest| {
            let newest_hour = latest - latest.rem_euclid(3600);
            newest_hour - 3600 * (i64::from(h) - 1)
        }),
        None => None,
    };
    let c = store.dimension_counts(d.name(), since, limit).await?;
    Ok(DimensionResponse {
        name: d.name().to_owned(),
        title: d.title().to_owned(),
        hours,
        total_visits: c.total_visits,
        total_bytes: c.total_bytes,
        total_humans: c.total_humans,
        distinct: c.distinct,
        values: c.values,
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
) -> Response {
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
    match timeseries_of(&state.store, minutes, country).await {
        Ok(r) => fresh(r),
        Err(err) => unavailable(err),
    }
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
                    })
                })
                .collect()
        }
    };
    Ok(TimeseriesResponse {
        latest: latest.map(rfc3339),
        minutes,
        country,
        points,
    })
}

pub(super) async fn dashboard_json(State(state): State<AppState>) -> Response {
    match dashboard(&state.store).await {
        Ok(d) => fresh(d),
        Err(err) => unavailable(err),
    }
}

/// Everything the page shows, read in one go.
pub async fn dashboard(store: &Store) -> Result<Dashboard, StoreError> {
    let version = store.flush_version().await?;
    let countries = countries_of(store).await?;
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
        let panel = dimension_of(store, d, PANEL_ROWS, None).await?;
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
        generated_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        totals: Totals {
            visits: countries.total,
            bytes: by_country.total_bytes,
            humans: by_country.total_humans,
            countries: countries.countries.len() as u64,
            visits_per_second,
            unique_visitors,
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
            })
            .collect(),
        timeseries,
        dimensions,
        percentiles,
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
) -> Response {
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
        Ok::<_, StoreError>(UniquesResponse {
            standard_error: HLL_STANDARD_ERROR,
            country: country.clone(),
            total,
            days: all.iter().take(days as usize).map(day_row).collect(),
            day,
            countries: countries
                .into_iter()
                .map(|u| CountryVisitors {
                    country_code: u.country_code,
                    visitors: u.visitors,
                })
                .collect(),
        })
    };
    match read.await {
        Ok(r) => fresh(r),
        Err(err) => unavailable(err),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct HistogramQuery {
    country: Option<String>,
}

pub(super) async fn histogram(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<HistogramQuery>,
) -> Response {
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
    match histogram_of(&state.store, metric, &scope).await {
        Ok(r) => fresh(r),
        Err(err) => unavailable(err),
    }
}

async fn histogram_of(
    store: &Store,
    metric: Metric,
    scope: &str,
) -> Result<HistogramResponse, StoreError> {
    let buckets = store.histogram(metric.name(), scope).await?;
    Ok(HistogramResponse {
        metric: metric.name().to_owned(),
        scope: scope.to_owned(),
        visits: buckets.iter().map(|b| b.1).sum(),
        p50: quantile(&buckets, 0.50),
        p95: quantile(&buckets, 0.95),
        p99: quantile(&buckets, 0.99),
        buckets: buckets
            .iter()
            .filter(|b| b.1 > 0)
            .map(|&(b, visits)| {
                let (low, high) = bucket_range(b);
                Bucket { low, high, visits }
            })
            .collect(),
    })
}
