//! The push channel: the page subscribes to `GET /api/events` (Server-Sent Events) and is
//! sent a new [`Dashboard`](super::api::Dashboard) snapshot right after each flush. Flushes
//! may happen in another process, so the server watches the database: every
//! [`POLL_INTERVAL`] it reads [`Store::flush_version`] (one cheap query) and, when it moved,
//! reads one snapshot.
//!
//! One snapshot per flush is shared by every subscriber: the watcher reads it once and
//! writes it once as an SSE frame, and each open page is sent the same bytes (a reference
//! count, not a copy). A subscriber costs its connection and nothing per flush, so 1,000 open
//! pages cost one database read per flush, not 1,000. Subscribers are capped
//! (`--max-subscribers`): beyond the cap the answer is 503 with `Retry-After`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{AppState, api};
use crate::store::Store;

/// How often the database is asked whether a flush happened.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// A database that does not answer within this is asked again at the next poll.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The push channel's shared state: the latest snapshot as one SSE frame (`None` while
/// nobody listens, so a new page never gets a stale one), and the subscribers.
#[derive(Clone)]
pub(super) struct Live {
    latest: watch::Receiver<Option<Bytes>>,
    subscribers: Arc<AtomicUsize>,
    max_subscribers: usize,
    /// Wakes the watcher when the first page subscribes (instead of waiting for its poll).
    wake: Arc<Notify>,
}

/// Starts watching the database for flushes until `shutdown`; reads only while a page listens.
pub(super) fn start(store: Store, max_subscribers: usize, shutdown: CancellationToken) -> Live {
    let (tx, rx) = watch::channel(None);
    let live = Live {
        latest: rx,
        subscribers: Arc::new(AtomicUsize::new(0)),
        max_subscribers,
        wake: Arc::new(Notify::new()),
    };
    let (subscribers, wake) = (Arc::clone(&live.subscribers), Arc::clone(&live.wake));
    tokio::spawn(async move {
        let mut seen: Option<i64> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = wake.notified() => {}
            }
            if subscribers.load(Ordering::Relaxed) == 0 {
                if seen.take().is_some() {
                    tx.send_replace(None);
                }
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
                        // serde_json escapes every line break inside strings: one data line.
                        let frame = format!("event: update\ndata: {json}\n\n");
                        tx.send_replace(Some(Bytes::from(frame)));
                    }
                    Err(err) => tracing::warn!(%err, "cannot write the dashboard snapshot"),
                },
                Ok(Ok(None)) => {}
                Ok(Err(err)) => tracing::warn!(%err, "cannot read the dashboard snapshot"),
                Err(_) => tracing::warn!("the database did not answer within {READ_TIMEOUT:?}"),
            }
        }
    });
    live
}

/// One open page; dropping it (the connection ended) frees its place under the cap.
struct Subscription(Arc<AtomicUsize>);

impl Drop for Subscription {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /api/events`: the latest snapshot at once (or as soon as the watcher has read one),
/// then one after every flush (`event: update`). The stream ends at shutdown, so an open
/// page never holds the server up.
pub(super) async fn events(State(state): State<AppState>) -> Response {
    let live = &state.live;
    let taken = live
        .subscribers
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < live.max_subscribers).then_some(n + 1)
        });
    if taken.is_err() {
        return super::guard::busy("too many pages subscribed (--max-subscribers)");
    }
    let subscription = Subscription(Arc::clone(&live.subscribers));
    live.wake.notify_one();
    let mut rx = live.latest.clone();
    // The current snapshot (if any) goes out first.
    rx.mark_changed();
    let stream = futures::stream::unfold(
        (rx, state.shutdown.clone(), subscription),
        |(mut rx, shutdown, subscription)| async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    changed = rx.changed() => changed.ok()?,
                    _ = tokio::time::sleep(KEEP_ALIVE) => {
                        let ping = Bytes::from_static(b": keep-alive\n\n");
                        return Some((Ok::<_, std::convert::Infallible>(ping), (rx, shutdown, subscription)));
                    }
                }
                let latest = rx.borrow_and_update().clone();
                if let Some(frame) = latest {
                    return Some((Ok(frame), (rx, shutdown, subscription)));
                }
            }
        },
    );
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
