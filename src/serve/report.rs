//! A report: the page's figures as one file — HTML that opens offline (the dashboard page
//! with its data, styles and scripts inline, reading nothing), or the JSON and CSV of
//! `/api/dashboard`. `pageviews report` writes it ([`crate::report`]).

use serde::Serialize;

use super::api::{self, Dashboard, FilterQuery, TimeseriesResponse};
use crate::store::{Store, StoreError};

/// What a report is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Html,
    Json,
    Csv,
}

/// The page's filter as a report's options give it.
#[derive(Debug, Clone, Default)]
pub struct ReportFilter {
    pub from: Option<String>,
    pub to: Option<String>,
    pub site: Option<String>,
    pub country: Option<String>,
    pub visitors: Option<String>,
    /// Add the period of the same length just before.
    pub compare: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0}")]
    Filter(String),
    #[error("cannot read the statistics: {0}")]
    Store(#[from] StoreError),
    #[error("cannot write the report as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// What the HTML report's page reads instead of the API.
#[derive(Debug, Serialize)]
struct ReportData<'a> {
    /// pageviews' version.
    version: &'static str,
    /// The filter, in words (`null`: everything).
    filter: Option<String>,
    dashboard: &'a Dashboard,
    /// The whole time series (the page's "all time" range).
    timeseries_all: &'a TimeseriesResponse,
}

/// The report of `store` under `filter`, as `format`.
pub async fn render(
    store: &Store,
    filter: &ReportFilter,
    format: ReportFormat,
) -> Result<String, ReportError> {
    let query = FilterQuery::of(
        filter.from.clone(),
        filter.to.clone(),
        filter.site.clone(),
        filter.country.clone(),
        filter.visitors.clone(),
    );
    let parsed = query.filter().map_err(ReportError::Filter)?;
    let dashboard = api::dashboard(store, &parsed, filter.compare).await?;
    Ok(match format {
        ReportFormat::Json => {
            let mut json = serde_json::to_string_pretty(&dashboard)?;
            json.push('\n');
            json
        }
        ReportFormat::Csv => api::dashboard_csv(&dashboard),
        ReportFormat::Html => {
            let timeseries_all = api::series_of(store, None, &parsed).await?;
            let words = describe(filter);
            let data = serde_json::to_string(&ReportData {
                version: env!("CARGO_PKG_VERSION"),
                filter: (!words.is_empty()).then_some(words),
                dashboard: &dashboard,
                timeseries_all: &timeseries_all,
            })?;
            super::page_with(&[("world-map", super::WORLD_MAP), ("report-data", &data)])
        }
    })
}

/// The filter in words, for the report's footer ("" for none).
fn describe(f: &ReportFilter) -> String {
    let mut parts = Vec::new();
    match (&f.from, &f.to) {
        (Some(a), Some(b)) => parts.push(format!("days {a} – {b}")),
        (Some(a), None) => parts.push(format!("days from {a}")),
        (None, Some(b)) => parts.push(format!("days to {b}")),
        (None, None) => {}
    }
    if let Some(s) = &f.site {
        parts.push(format!("site {s}"));
    }
    if let Some(c) = &f.country {
        parts.push(format!("country {c}"));
    }
    if let Some(v) = f.visitors.as_deref().filter(|v| *v != "all") {
        parts.push(format!("visitors: {v}"));
    }
    if f.compare {
        parts.push("compared with the previous period".to_owned());
    }
    parts.join(", ")
}
