//! `GET /api/sessions`: visits ([`crate::sessions`]) under the page's filter — visits,
//! bounces, pages per visit, duration percentiles, and the visits still open.

use axum::extract::{Query, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::api::{
    FilterQuery, compared, filter_beyond_country, filtered_histogram_of, fresh, histogram_of,
    unavailable,
};
use super::csv;
use crate::aggregate::dimensions::{ALL_COUNTRIES, Metric};
use crate::aggregate::rollups::Filter;
use crate::aggregate::visits::{VisitSummary, may_have_visits};
use crate::store::{Store, StoreError};

/// Closed visits under a filter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionsResponse {
    /// The filter the figures are under (`null`: everything).
    #[serde(default)]
    pub filter: Option<Filter>,
    /// Closed visits (a visit counts on the day, site and country of its first request).
    pub visits: u64,
    /// Visits of one page request.
    pub bounces: u64,
    /// bounces / visits (0 to 1; `null` without visits).
    pub bounce_rate: Option<f64>,
    /// Page requests in those visits.
    pub pages: u64,
    pub pages_per_visit: Option<f64>,
    /// Seconds from the first to the last page request of a visit.
    pub duration: DurationStats,
    /// Visitors with a visit still open, as of the aggregators' last flushes (every filter).
    pub open: u64,
    /// Page requests that came later than `--session-lateness` and are in no visit, and
    /// visits closed early at `--max-open-visits` (all time, every filter).
    pub late: u64,
    pub closed_early: u64,
    /// With `compare=previous`: the same for the previous period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<SessionsResponse>>,
}

/// Percentiles from the `visit_duration_s` histogram (within its bucket's 1/32), and the
/// exact mean.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DurationStats {
    pub p50: Option<u64>,
    pub p95: Option<u64>,
    pub p99: Option<u64>,
    pub mean: Option<f64>,
}

/// Visits under `filter`.
pub async fn sessions_under(
    store: &Store,
    filter: &Filter,
) -> Result<SessionsResponse, StoreError> {
    let (summary, histogram) = if may_have_visits(filter) {
        let summary = store.visit_summary(filter).await?;
        let histogram = if filter_beyond_country(filter) {
            filtered_histogram_of(store, Metric::VisitDuration, filter).await?
        } else {
            let scope = filter.country.as_deref().unwrap_or(ALL_COUNTRIES);
            histogram_of(store, Metric::VisitDuration, scope).await?
        };
        (summary, Some(histogram))
    } else {
        (VisitSummary::default(), None)
    };
    let counters = store.visit_counters().await?;
    let open = store.open_visitors().await?;
    let per_visit = |n: u64| (summary.visits > 0).then(|| n as f64 / summary.visits as f64);
    Ok(SessionsResponse {
        filter: (!filter.is_everything()).then(|| filter.clone()),
        visits: summary.visits,
        bounces: summary.bounces,
        bounce_rate: per_visit(summary.bounces),
        pages: summary.pages,
        pages_per_visit: per_visit(summary.pages),
        duration: DurationStats {
            p50: histogram.as_ref().and_then(|h| h.p50),
            p95: histogram.as_ref().and_then(|h| h.p95),
            p99: histogram.as_ref().and_then(|h| h.p99),
            mean: per_visit(summary.duration),
        },
        open,
        late: counters.late,
        closed_early: counters.closed_early,
        previous: None,
    })
}

/// Visits under `filter`, with the previous period's when `compare`.
pub async fn sessions(
    store: &Store,
    filter: &Filter,
    compare: bool,
) -> Result<SessionsResponse, StoreError> {
    let out = super::api::Output {
        compare,
        csv: false,
    };
    match compared(store, filter, out).await? {
        Some((now, before)) => {
            let mut r = sessions_under(store, &now).await?;
            r.previous = Some(Box::new(sessions_under(store, &before).await?));
            Ok(r)
        }
        None => sessions_under(store, filter).await,
    }
}

pub(super) async fn handler(
    State(state): State<AppState>,
    Query(f): Query<FilterQuery>,
) -> Response {
    let (filter, out) = match f.parse() {
        Ok(p) => p,
        Err(r) => return r,
    };
    match sessions(&state.store, &filter, out.compare).await {
        Ok(r) if out.csv => {
            let cell = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_default();
            let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
            csv::response(
                "sessions",
                csv::table(
                    &[
                        "visits",
                        "bounces",
                        "bounce_rate",
                        "pages",
                        "pages_per_visit",
                        "duration_p50_s",
                        "duration_p95_s",
                        "duration_p99_s",
                        "duration_mean_s",
                        "open",
                        "late",
                        "closed_early",
                    ],
                    std::iter::once(vec![
                        r.visits.to_string(),
                        r.bounces.to_string(),
                        cell(r.bounce_rate),
                        r.pages.to_string(),
                        cell(r.pages_per_visit),
                        opt(r.duration.p50),
                        opt(r.duration.p95),
                        opt(r.duration.p99),
                        cell(r.duration.mean),
                        r.open.to_string(),
                        r.late.to_string(),
                        r.closed_early.to_string(),
                    ]),
                ),
            )
        }
        Ok(r) => fresh(r),
        Err(err) => unavailable(err),
    }
}
