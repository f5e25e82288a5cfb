//! Serve stage: the dashboard and the JSON API, read from the statistics database.
//!
//! - [`api`]: one JSON handler per panel, and the snapshot of everything the page shows;
//! - [`live`]: the push channel (Server-Sent Events after each flush);
//! - [`pipeline`]: pipeline health from the brokers and the database, and `/metrics`;
//! - this module: the routes, the static page, binding and shutdown.

pub mod api;
pub mod live;
pub mod pipeline;

use std::net::SocketAddr;

use axum::Router;
use axum::response::Html;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::kafka::KafkaSettings;
use crate::store::Store;
use std::sync::Arc;

pub use api::{
    AlertGroup, AlertRow, AlertsResponse, CountriesResponse, CountryVisits, Dashboard,
    DimensionResponse, HistogramResponse, TimeseriesResponse, UniquesResponse,
};

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

/// What every handler reads.
#[derive(Clone)]
pub(crate) struct AppState {
    store: Store,
    /// The latest snapshot, for the push channel.
    live: live::Latest,
    /// Ends the push streams, so that open pages do not hold a graceful shutdown up.
    shutdown: CancellationToken,
    health: Arc<pipeline::Health>,
    dead_letter_reasons: Arc<pipeline::ReasonTally>,
}

/// The HTTP routes, for the server and for tests; watches the database for flushes (and,
/// with `kafka`, the dead-letter topic) until `shutdown`. Without `kafka` the pipeline's
/// health says so and everything else works.
pub fn router(store: Store, kafka: Option<KafkaSettings>, shutdown: CancellationToken) -> Router {
    let reasons = Arc::new(pipeline::ReasonTally::default());
    if let Some(k) = &kafka {
        reasons.start(k.clone(), shutdown.clone());
    }
    let state = AppState {
        live: live::start(store.clone(), shutdown.clone()),
        store,
        shutdown,
        health: Arc::new(pipeline::Health::new(kafka)),
        dead_letter_reasons: reasons,
    };
    Router::new()
        .route("/", get(dashboard))
        .route("/api/countries", get(api::countries))
        .route("/api/dimensions", get(api::dimension_list))
        .route("/api/dimensions/{name}", get(api::dimension))
        .route("/api/timeseries", get(api::timeseries))
        .route("/api/uniques", get(api::uniques))
        .route("/api/histograms/{metric}", get(api::histogram))
        .route("/api/dashboard", get(api::dashboard_json))
        .route("/api/events", get(live::events))
        .route("/api/pipeline", get(pipeline::pipeline))
        .route("/api/alerts", get(api::alerts))
        .route("/metrics", get(pipeline::metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
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
    kafka: Option<KafkaSettings>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    axum::serve(listener, router(store, kafka, shutdown.clone()))
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
