//! The push channel: the page subscribes to `GET /api/events` (Server-Sent Events) and is
//! sent a new [`Dashboard`](super::api::Dashboard) snapshot right after each flush. Flushes
//! may happen in another process, so the server watches the database: every
//! [`POLL_INTERVAL`] it reads [`Store::flush_version`] (one cheap query) and, when it moved,
//! reads one snapshot and hands it to every open page.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{AppState, api};
use crate::store::Store;

/// How often the database is asked whether a flush happened.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// A database that does not answer within this is asked again at the next poll.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The latest snapshot as JSON (`None` until the first one is read).
pub(super) type Latest = watch::Receiver<Option<Arc<String>>>;

/// Starts watching the database for flushes until `shutdown`; reads only while a page listens.
pub(super) fn start(store: Store, shutdown: CancellationToken) -> Latest {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut seen: Option<i64> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            // One receiver is the router's own; more are open pages.
            if tx.receiver_count() <= 1 {
                seen = None;
                continue;
            }
            let read = async {
                let version = store.flush_version().await?;
                if seen == Some(version) {
                    return Ok(None);
                }
                api::dashboard(&store).await.map(Some)
            };
            let snapshot = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = tokio::time::timeout(READ_TIMEOUT, read) => r,
            };
            match snapshot {
                Ok(Ok(Some(d))) => match serde_json::to_string(&d) {
                    Ok(json) => {
                        seen = Some(d.version);
                        tx.send_replace(Some(Arc::new(json)));
                    }
                    Err(err) => tracing::warn!(%err, "cannot write the dashboard snapshot"),
                },
                Ok(Ok(None)) => {}
                Ok(Err(err)) => tracing::warn!(%err, "cannot read the dashboard snapshot"),
                Err(_) => tracing::warn!("the database did not answer within {READ_TIMEOUT:?}"),
            }
        }
    });
    rx
}

/// `GET /api/events`: a snapshot at once, then one after every flush (`event: update`). The
/// stream ends at shutdown, so an open page never holds the server up.
pub(super) async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut rx = state.live.clone();
    rx.mark_unchanged();
    let first = match api::dashboard(&state.store).await {
        Ok(d) => serde_json::to_string(&d).ok(),
        Err(err) => {
            tracing::warn!(%err, "cannot read the dashboard snapshot");
            None
        }
    };
    let stream = futures::stream::unfold(
        (rx, state.shutdown.clone(), first),
        |(mut rx, shutdown, first)| async move {
            if let Some(json) = first {
                let event = Event::default().event("update").data(json);
                return Some((Ok(event), (rx, shutdown, None)));
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    changed = rx.changed() => changed.ok()?,
                }
                let latest = rx.borrow_and_update().clone();
                if let Some(json) = latest {
                    let event = Event::default().event("update").data(json.as_str());
                    return Some((Ok(event), (rx, shutdown, None)));
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
