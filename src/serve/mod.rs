//! Serve stage: the dashboard and the JSON API, read from the statistics database.
//!
//! - [`api`]: one JSON handler per panel, and the snapshot of everything the page shows;
//!   every panel takes the filter (days, site, country, visitors), `compare=previous` and
//!   `format=csv`;
//! - [`csv`]: the CSV form of a panel (quoted, formula cells neutralised);
//! - [`live`]: the push channel (Server-Sent Events after each flush);
//! - [`pipeline`]: pipeline health from the brokers and the database, and `/metrics`;
//! - [`guard`]: Host check, access token, request limits, security headers;
//! - this module: the routes, the static page, the connections (bounded in number, each
//!   with a header-read timeout), binding and shutdown.

pub mod api;
pub mod csv;
pub(crate) mod guard;
pub mod live;
pub mod pipeline;
pub mod report;
pub mod visits;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::response::Html;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::kafka::KafkaSettings;
use crate::store::Store;
use std::sync::Arc;

pub use api::{
    AlertGroup, AlertRow, AlertsResponse, CountriesResponse, CountryVisits, Dashboard,
    DimensionResponse, HistogramResponse, TimeseriesResponse, UniquesResponse,
};

/// The dashboard page: static HTML whose script reads the API and listens to `/api/events`.
/// Every value is put into the page with `textContent`, never as HTML, so nothing from a log
/// line can inject markup (and the Content-Security-Policy allows no other script). Its data
/// blocks (the world map; a report's figures) go where `<!--PAGE-DATA-->` stands.
const DASHBOARD_TEMPLATE: &str = include_str!("dashboard.html");

/// The world map's country outlines (built by `scripts/world_map.py` from Natural Earth
/// 1:110m, public domain; see `data/WORLD-MAP-LICENSE`).
pub const WORLD_MAP: &str = include_str!("../../data/world-110m.json");

/// The served page: the template with the world map.
static DASHBOARD: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| page_with(&[("world-map", WORLD_MAP)]));

/// The page with JSON data blocks (`<script type="application/json" id=…>`, which no browser
/// runs and the page reads with `JSON.parse`). `<` in the JSON (only inside strings) is
/// written `\u003c`, so no value can close the block.
pub fn page_with(blocks: &[(&str, &str)]) -> String {
    let mut data = String::new();
    for (id, json) in blocks {
        data.push_str("<script type=\"application/json\" id=\"");
        data.push_str(id);
        data.push_str("\">");
        data.push_str(&json.trim_end().replace('<', "\\u003c"));
        data.push_str("</script>\n");
    }
    DASHBOARD_TEMPLATE.replacen("<!--PAGE-DATA-->", &data, 1)
}

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

/// The server's limits and access control (`serve`, `demo`; see [`crate::args::ServeArgs`]).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Every request but `/healthz` needs this token (bearer, or the cookie of `?token=`).
    pub auth_token: Option<String>,
    /// Host names accepted besides localhost and loopback addresses while bound to loopback.
    pub allowed_hosts: Vec<String>,
    /// Open connections at most; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Pages subscribed to `/api/events` at most; further ones get 503.
    pub max_subscribers: usize,
    /// Handlers running at once; further requests wait (up to the request timeout).
    pub max_requests: usize,
    /// A connection that has not sent a whole request head within this is closed (idle
    /// keep-alive connections included).
    pub header_timeout: Duration,
    /// A handler that takes longer is answered 503.
    pub request_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            auth_token: None,
            allowed_hosts: Vec::new(),
            max_connections: 2048,
            max_subscribers: 1024,
            max_requests: 64,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// What every handler reads.
#[derive(Clone)]
pub(crate) struct AppState {
    store: Store,
    /// The latest snapshot and the subscribers, for the push channel.
    live: live::Live,
    /// Ends the push streams, so that open pages do not hold a graceful shutdown up.
    shutdown: CancellationToken,
    health: Arc<pipeline::Health>,
    dead_letter_reasons: Arc<pipeline::ReasonTally>,
}

/// The HTTP routes, for the server and for tests; watches the database for flushes (and,
/// with `kafka`, the dead-letter topic) until `shutdown`. Without `kafka` the pipeline's
/// health says so and everything else works.
/// `bound` is the address the server listens on (the Host check applies on loopback).
pub fn router(
    store: Store,
    kafka: Option<KafkaSettings>,
    config: &ServeConfig,
    bound: SocketAddr,
    shutdown: CancellationToken,
) -> Router {
    let reasons = Arc::new(pipeline::ReasonTally::default());
    if let Some(k) = &kafka {
        reasons.start(k.clone(), shutdown.clone());
    }
    let guard = Arc::new(guard::Guard::new(bound, config, &DASHBOARD));
    let state = AppState {
        live: live::start(store.clone(), config.max_subscribers, shutdown.clone()),
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
        .route("/api/sessions", get(visits::handler))
        .route("/metrics", get(pipeline::metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(guard, guard::guard))
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

/// Serves until `shutdown`: at most `config.max_connections` connections at once (the next
/// waits in the listen backlog), each closed when a request head does not arrive within
/// `config.header_timeout`. At shutdown the open connections are asked to finish and given a
/// few seconds.
pub async fn run(
    listener: TcpListener,
    store: Store,
    kafka: Option<KafkaSettings>,
    config: ServeConfig,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let bound = listener.local_addr()?;
    if config.auth_token.is_none() && !bound.ip().is_loopback() {
        tracing::warn!(
            %bound,
            "the dashboard listens on a network address without --auth-token: the statistics are public to anyone who can reach it"
        );
    }
    let app = router(store, kafka, &config, bound, shutdown.clone());
    let max = config.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            s = Arc::clone(&slots).acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let (header_timeout, shutdown) = (config.header_timeout, shutdown.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(3), conn).await;
                }
            }
        });
    }
    // Every connection gives its slot back when it ends.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(4), slots.acquire_many(all)).await;
    Ok(())
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD.as_str())
}

async fn healthz() -> &'static str {
    "ok\n"
}
