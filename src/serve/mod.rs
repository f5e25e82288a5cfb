//! Serve stage: the dashboard and the JSON API, read from the statistics database.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::countries::country_name;
use crate::store::Store;

/// The dashboard page: static HTML whose script polls `/api/countries`. Every value is put
/// into the page with `textContent`, never as HTML, so nothing from a log line can inject markup.
const DASHBOARD: &str = include_str!("dashboard.html");

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source} (is another server using it? pass --listen)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
}

/// `GET /api/countries`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CountriesResponse {
    /// Sum of all visits.
    pub total: u64,
    /// The largest count (the full-width bar).
    pub max: u64,
    /// Most visits first, ties by code.
    pub countries: Vec<CountryVisits>,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CountryVisits {
    pub country_code: String,
    pub country_name: String,
    pub visits: u64,
}

/// The HTTP routes, for the server and for tests.
pub fn router(store: Store) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/api/countries", get(countries))
        .route("/healthz", get(healthz))
        .with_state(store)
}

/// Binds `listen` and serves until `shutdown`. Returns the bound address through `bound`
/// (port 0 picks a free port, which tests use).
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })
}

pub async fn run(
    listener: TcpListener,
    store: Store,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    axum::serve(listener, router(store))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn countries(State(store): State<Store>) -> Response {
    match store.country_counts().await {
        Ok(rows) => {
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
            let mut resp = Json(CountriesResponse {
                total,
                max,
                countries,
            })
            .into_response();
            resp.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            resp
        }
        Err(err) => {
            tracing::warn!(%err, "cannot read counts");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("database unavailable: {err}\n"),
            )
                .into_response()
        }
    }
}
