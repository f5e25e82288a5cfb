//! The push channel: the page subscribes to `GET /api/events` (Server-Sent Events) and is
//! sent a new [`Dashboard`](super::api::Dashboard) snapshot right after each flush. Flushes
//! may happen in another process, so the server watches the database: every
//! [`POLL_INTERVAL`] it reads [`Store::flush_version`] and the alerts' count
//! (`Store::alerts_version`: a delivery moves no offset; two cheap queries) and, when one moved,
//! reads one snapshot.
//!
//! One snapshot per flush and filter is shared by every subscriber with that filter: the
//! watcher reads it once and writes it once as an SSE frame, and each open page is sent the
//! same bytes (a reference count, not a copy). A subscriber costs its connection and nothing
//! per flush, so 1,000 open pages cost one database read per flush and filter, not 1,000.
//! Subscribers are capped (`--max-subscribers`), and so are the distinct filters followed
//! at once ([`MAX_LIVE_FILTERS`]): beyond either cap the answer is 503 with `Retry-After`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{AppState, api};
use crate::aggregate::rollups::Filter;
use crate::store::Store;

/// How often the database is asked whether a flush happened.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// A database that does not answer within this is asked again at the next poll.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Distinct filters pushed at once (one snapshot read per filter per flush); a page asking
/// for another one while this many are open gets 503.
pub const MAX_LIVE_FILTERS: usize = 32;

/// The snapshot channel of one filter.
struct Channel {
    /// The latest snapshot as one SSE frame (`None` until the first read).
    tx: watch::Sender<Option<Bytes>>,
    /// Pages listening with this filter.
    subscribers: usize,
    /// The flush and alerts versions of the snapshot sent last.
    seen: Option<(i64, i64)>,
}

/// A page's filter, and whether it compares with the previous period.
type Key = (Filter, bool);

type Channels = Arc<Mutex<HashMap<Key, Channel>>>;

/// The push channel's shared state: one channel per filter that a page listens with (none
/// while nobody listens, so a new page never gets a stale snapshot), and the subscribers.
#[derive(Clone)]
pub(super) struct Live {
    channels: Channels,
    subscribers: Arc<AtomicUsize>,
    max_subscribers: usize,
    /// Wakes the watcher when a page subscribes (instead of waiting for its poll).
    wake: Arc<Notify>,
}

/// Starts watching the database for flushes until `shutdown`; reads only while a page listens.
pub(super) fn start(store: Store, max_subscribers: usize, shutdown: CancellationToken) -> Live {
    let live = Live {
        channels: Arc::new(Mutex::new(HashMap::new())),
        subscribers: Arc::new(AtomicUsize::new(0)),
        max_subscribers,
        wake: Arc::new(Notify::new()),
    };
    let (channels, wake) = (Arc::clone(&live.channels), Arc::clone(&live.wake));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = wake.notified() => {}
            }
            if channels.lock().map_or(true, |c| c.is_empty()) {
                continue;
            }
            let version = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = tokio::time::timeout(READ_TIMEOUT, async {
                    Ok::<_, crate::store::StoreError>((store.flush_version().await?, store.alerts_version().await?))
                }) => r,
            };
            let version = match version {
                Ok(Ok(v)) => v,
                Ok(Err(err)) => {
                    tracing::warn!(%err, "cannot read the flush version");
                    continue;
                }
                Err(_) => {
                    tracing::warn!("the database did not answer within {READ_TIMEOUT:?}");
                    continue;
                }
            };
            // The filters whose pages have not seen this version, read outside the lock.
            let stale: Vec<Key> = match channels.lock() {
                Ok(c) => c
                    .iter()
                    .filter(|(_, ch)| ch.seen != Some(version))
                    .map(|(f, _)| f.clone())
                    .collect(),
                Err(_) => break,
            };
            for filter in stale {
                let snapshot = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = tokio::time::timeout(READ_TIMEOUT, api::dashboard(&store, &filter.0, filter.1)) => r,
                };
                let frame = match snapshot {
                    Ok(Ok(d)) => match serde_json::to_string(&d) {
                        // serde_json escapes every line break inside strings: one data line.
                        Ok(json) => Bytes::from(format!("event: update\ndata: {json}\n\n")),
                        Err(err) => {
                            tracing::warn!(%err, "cannot write the dashboard snapshot");
                            continue;
                        }
                    },
                    Ok(Err(err)) => {
                        tracing::warn!(%err, "cannot read the dashboard snapshot");
                        continue;
                    }
                    Err(_) => {
                        tracing::warn!("the database did not answer within {READ_TIMEOUT:?}");
                        continue;
                    }
                };
                if let Ok(mut c) = channels.lock()
                    && let Some(ch) = c.get_mut(&filter)
                {
                    ch.seen = Some(version);
                    ch.tx.send_replace(Some(frame));
                }
            }
        }
    });
    live
}

/// One open page; dropping it (the connection ended) frees its place under the cap, and its
/// filter's channel when it was the last page with it.
struct Subscription {
    subscribers: Arc<AtomicUsize>,
    channels: Channels,
    filter: Key,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.subscribers.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut c) = self.channels.lock()
            && let Some(ch) = c.get_mut(&self.filter)
        {
            ch.subscribers = ch.subscribers.saturating_sub(1);
            if ch.subscribers == 0 {
                c.remove(&self.filter);
            }
        }
    }
}

/// `GET /api/events`: the latest snapshot at once (or as soon as the watcher has read one),
/// then one after every flush (`event: update`). The stream ends at shutdown, so an open
/// page never holds the server up.
pub(super) async fn events(
    State(state): State<AppState>,
    Query(f): Query<api::FilterQuery>,
) -> Response {
    let filter = match (f.filter(), f.output()) {
        (Ok(f), Ok(o)) => (f, o.compare),
        (Err(e), _) | (_, Err(e)) => return (StatusCode::BAD_REQUEST, e + "\n").into_response(),
    };
    let live = &state.live;
    let taken = live
        .subscribers
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < live.max_subscribers).then_some(n + 1)
        });
    if taken.is_err() {
        return super::guard::busy("too many pages subscribed (--max-subscribers)");
    }
    let subscription = Subscription {
        subscribers: Arc::clone(&live.subscribers),
        channels: Arc::clone(&live.channels),
        filter: filter.clone(),
    };
    let rx = match live.channels.lock() {
        Ok(mut c) => {
            if !c.contains_key(&filter) && c.len() >= MAX_LIVE_FILTERS {
                None
            } else {
                let ch = c.entry(filter).or_insert_with(|| Channel {
                    tx: watch::channel(None).0,
                    subscribers: 0,
                    seen: None,
                });
                ch.subscribers += 1;
                Some(ch.tx.subscribe())
            }
        }
        Err(_) => None,
    };
    let Some(mut rx) = rx else {
        // Dropping `subscription` gives the place back (its filter has no channel).
        return super::guard::busy("too many different filters followed live at once");
    };
    live.wake.notify_one();
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
