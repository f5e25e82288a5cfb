//! Alerting consumer groups: the talk's Slack and e-mail consumers. Each reads `page-views`
//! in a group of its own (`alerts-webhook`, `alerts-email`, or `--group`), so each has its own
//! position: when one sink is down the other goes on, and a member that was down catches up
//! from where its group stopped.
//!
//! A member is a result-writing group member ([`crate::positions`]), like the aggregator: it
//! counts requests and server errors per event-time window ([`window`]) and flushes them with
//! its offsets in one transaction. Closing the windows the watermark has passed writes their
//! alerts to the database (an outbox, in the same transaction as the close), and a delivery
//! task sends them from there in order ([`sink`]), retrying until each is delivered and
//! recording each delivered id. So:
//! - no alert is lost: the position only moves in the transaction that makes the window counts
//!   durable, and an alert stays in the outbox until its sink accepted it;
//! - no alert is sent twice, except in one window: a member killed after its sink accepted an
//!   alert and before the database recorded that sends it again after the restart. Receivers
//!   can dedupe by the alert's id.

pub mod rules;
pub mod sink;
pub mod tables;
pub mod window;

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::countries::CountryCode;
use crate::kafka::{EVENTS_TOPIC, KafkaSettings};
use crate::positions::{self, FLUSH_TIMEOUT, Flushed, Group, GroupMember, Pending};
use crate::store::Store;
use rules::Rule;
use sink::{DeliveryError, Sink};
use tables::{AlertFlush, CloseRequest};
use window::{PartitionClock, WindowCounts, WindowRow};

/// How long a member holds an alert it is delivering before another member may try it.
const CLAIM: Duration = Duration::from_secs(15);

/// Settings of one alerter.
pub struct AlertConfig {
    pub kafka: KafkaSettings,
    pub store: Store,
    pub rules: Vec<Rule>,
    pub sink: Arc<Sink>,
    /// The consumer group (its own offsets, windows and delivered ids).
    pub group: String,
    pub lateness: Duration,
    pub idle_timeout: Duration,
    /// Time between two flushes (window counts, offsets) and window closes
    /// (`--alert-interval`).
    pub alert_interval: Duration,
    /// An event further ahead of the wall clock than this does not move the clocks (it is
    /// counted as unreadable): one line dated 9999 would make every later event late.
    pub max_future: Duration,
}

/// Running totals for logs and tests.
#[derive(Debug, Default)]
pub struct AlertStats {
    /// Events counted into windows (flushed).
    pub events: AtomicU64,
    /// Events too late for their window, found by this member.
    pub late_events: AtomicU64,
    /// Events whose JSON or time could not be read (not counted).
    pub unreadable_events: AtomicU64,
    /// Events dropped as preprocessor replays.
    pub duplicates_dropped: AtomicU64,
    /// Alerts this member wrote to the outbox when closing windows.
    pub alerts_raised: AtomicU64,
    /// Alerts this member delivered.
    pub delivered: AtomicU64,
    /// Failed delivery attempts (each retried).
    pub failed_deliveries: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("Kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
}

/// The part of an event an alerter reads.
#[derive(serde::Deserialize)]
struct AlertEvent<'a> {
    #[serde(borrow)]
    time: Cow<'a, str>,
    status: u16,
}

/// Runs one alerter until `shutdown`: counts, flushes, closes windows; a task of its own
/// delivers.
pub async fn run(
    config: AlertConfig,
    stats: Arc<AlertStats>,
    shutdown: CancellationToken,
) -> Result<(), AlertError> {
    let lateness = i64::try_from(config.lateness.as_secs()).unwrap_or(i64::MAX);
    let member = GroupMember::join(
        &config.kafka,
        &config.group,
        EVENTS_TOPIC,
        WindowCounts::new(&config.rules, lateness),
        config.store.clone(),
        shutdown.clone(),
    )?;
    let wake_delivery = Arc::new(Notify::new());
    let delivery = tokio::spawn(deliver(
        config.store.clone(),
        Arc::clone(&config.sink),
        config.group.clone(),
        Arc::clone(&stats),
        Arc::clone(&wake_delivery),
        shutdown.clone(),
    ));
    tracing::info!(group = %config.group, rules = config.rules.len(), "alerter started");
    let alerter = Alerter {
        max_future: i64::try_from(config.max_future.as_secs()).unwrap_or(i64::MAX),
        config,
        stats,
        wake_delivery,
        partitions: None,
        shutdown: shutdown.clone(),
    };
    positions::consume(member, alerter, shutdown).await;
    // The delivery task ends with the shutdown; a delivery under way is given its timeout.
    if tokio::time::timeout(Duration::from_secs(5), delivery)
        .await
        .is_err()
    {
        tracing::warn!(
            "a delivery was still under way at shutdown; it is retried at the next start"
        );
    }
    Ok(())
}

/// An alerter as a [`Group`]: what it counts, what its flushes write, and the windows it
/// closes after each flush.
struct Alerter {
    config: AlertConfig,
    stats: Arc<AlertStats>,
    wake_delivery: Arc<Notify>,
    /// Seconds an event may be ahead of the wall clock and still move the clocks.
    max_future: i64,
    /// The events topic's partition count, once known.
    partitions: Option<i32>,
    shutdown: CancellationToken,
}

impl Group for Alerter {
    type Acc = WindowCounts;

    fn interval(&self) -> Duration {
        self.config.alert_interval
    }

    fn count(&mut self, w: &mut WindowCounts, m: &BorrowedMessage<'_>, country: CountryCode) {
        let event = m
            .payload()
            .and_then(|p| serde_json::from_slice::<AlertEvent<'_>>(p).ok());
        let horizon = chrono::Utc::now()
            .timestamp()
            .saturating_add(self.max_future);
        match event.and_then(|e| Some((window::seconds_of(&e.time)?, e.status))) {
            Some((t, status)) if t <= horizon => {
                w.add(t, status, country);
            }
            _ => w.unreadable += 1,
        }
    }

    fn duplicate(&self) {
        self.stats
            .duplicates_dropped
            .fetch_add(1, Ordering::Relaxed);
    }

    fn fill(&self, pending: &mut Pending<WindowCounts>) {
        fill_batch(pending);
    }

    fn flushed(&self, _member: &GroupMember<WindowCounts>, outcome: &Flushed<WindowCounts>) {
        if let Flushed::Committed(pending) = outcome {
            let stats = &self.stats;
            let events: u64 = pending.counts().map(|c| c.events).sum();
            let (late, unreadable) = pending
                .counts()
                .fold((0, 0), |(l, u), c| (l + c.late, u + c.unreadable));
            stats.events.fetch_add(events, Ordering::Relaxed);
            stats.late_events.fetch_add(late, Ordering::Relaxed);
            stats
                .unreadable_events
                .fetch_add(unreadable, Ordering::Relaxed);
            if late > 0 {
                tracing::warn!(
                    late,
                    "events came too late for their window (see --lateness); not in any alert"
                );
            }
            if unreadable > 0 {
                tracing::warn!(
                    unreadable,
                    "events whose JSON or time could not be read were not counted"
                );
            }
        }
    }

    fn before_flush(&mut self, member: &GroupMember<WindowCounts>) {
        if self.partitions.is_none() {
            self.partitions = member.partition_count();
        }
        mark_caught_up(member, &self.shutdown);
    }

    fn after_flush<'a>(
        &'a mut self,
        _member: &'a GroupMember<WindowCounts>,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(n) = self.partitions {
                close(&self.config, n, &self.stats, &self.wake_delivery).await;
            }
        })
    }
}

/// Notes, for each owned partition, whether this member has read it to its log end (and
/// since when): an idle partition stops holding the group's windows open.
///
/// One broker round trip per owned partition; once one fails (a broker that does not answer)
/// the rest are taken as not caught up rather than waited for, and shutdown stops it.
fn mark_caught_up(member: &GroupMember<WindowCounts>, shutdown: &CancellationToken) {
    let owned = member.tally().partitions();
    let now = now_ms();
    let mut reachable = true;
    for p in owned {
        let high = if reachable && !shutdown.is_cancelled() {
            member.log_end(p, Duration::from_secs(1)).ok()
        } else {
            None
        };
        reachable &= high.is_some();
        let mut tally = member.tally();
        let next = tally.next_offset(p);
        if let Some(acc) = tally.accumulator_mut(p) {
            match (high, next) {
                (Some(high), Some(next)) if next >= high => {
                    acc.caught_up_since.get_or_insert(now);
                }
                _ => acc.caught_up_since = None,
            }
        }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// What a flush writes: every partition's windows (summed) and clock.
fn fill_batch(pending: &mut Pending<WindowCounts>) {
    let mut windows: std::collections::HashMap<window::WindowKey, window::WindowTotals> =
        std::collections::HashMap::new();
    let mut alert = AlertFlush::default();
    let mut clocks = Vec::new();
    for (partition, c) in pending.per_partition() {
        for (k, t) in &c.windows {
            *windows.entry(*k).or_default() += *t;
        }
        clocks.push(PartitionClock {
            partition,
            clock: c.clock,
            caught_up_since: c.caught_up_since,
        });
        alert.late += c.late;
        alert.first_event = match (alert.first_event, c.first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    alert.windows = windows
        .into_iter()
        .map(|((window, start, country), totals)| WindowRow {
            window,
            start,
            subject: country.map_or_else(|| window::ALL.to_owned(), |c| c.as_str().to_owned()),
            totals,
        })
        .collect();
    alert
        .windows
        .sort_by(|a, b| (a.window, a.start, &a.subject).cmp(&(b.window, b.start, &b.subject)));
    clocks.sort_by_key(|c: &PartitionClock| c.partition);
    pending.batch.clocks = clocks;
    pending.batch.results = alert;
}

/// Closes the windows the group's watermark has passed; wakes the delivery when that raised
/// alerts. A failure is retried at the next tick (nothing is lost: the counts are stored).
async fn close(config: &AlertConfig, partitions: i32, stats: &AlertStats, wake: &Notify) {
    let req = CloseRequest {
        group: config.group.clone(),
        topic: EVENTS_TOPIC.to_owned(),
        partitions,
        now_ms: now_ms(),
        idle_ms: i64::try_from(config.idle_timeout.as_millis()).unwrap_or(i64::MAX),
        lateness: i64::try_from(config.lateness.as_secs()).unwrap_or(i64::MAX),
        rules: config.rules.clone(),
    };
    match tokio::time::timeout(FLUSH_TIMEOUT, config.store.close_windows(&req)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => {
            tracing::info!(alerts = n, group = %config.group, "windows closed; alerts raised");
            stats.alerts_raised.fetch_add(n as u64, Ordering::Relaxed);
            wake.notify_one();
        }
        Ok(Err(e)) => tracing::warn!(%e, "cannot close windows now; retrying at the next flush"),
        Err(_) => tracing::warn!("closing windows timed out; retrying at the next flush"),
    }
}

/// Delivers the group's outbox in order, until shutdown: each alert claimed, sent, and
/// recorded as delivered; a failure stops the round and is retried after a backoff (an
/// unavailable receiver: 0.5 s doubling to 10 s; a refusal: every 30 s).
async fn deliver(
    store: Store,
    sink: Arc<Sink>,
    group: String,
    stats: Arc<AlertStats>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut failures: u32 = 0;
    let mut wait = Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        wait = Duration::from_secs(5);
        let pending = match store.pending_alerts(&group, 100).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%e, "cannot read the alerts to deliver; retrying");
                continue;
            }
        };
        for stored in pending {
            if shutdown.is_cancelled() {
                return;
            }
            let alert = &stored.alert;
            let now = now_ms();
            let claim_until = now + i64::try_from(CLAIM.as_millis()).unwrap_or(60_000);
            match store.claim_alert(&group, &alert.id, now, claim_until).await {
                Ok(true) => {}
                Ok(false) => {
                    // Delivered meanwhile, or another member is sending it: look again later.
                    wait = Duration::from_secs(1);
                    break;
                }
                Err(e) => {
                    tracing::warn!(%e, "cannot claim an alert for delivery; retrying");
                    break;
                }
            }
            let sent = tokio::select! {
                r = sink.deliver(alert) => r,
                _ = shutdown.cancelled() => return,
            };
            match sent {
                Ok(()) => {
                    failures = 0;
                    stats.delivered.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(id = %alert.id, "alert delivered");
                    // Retried until recorded: an unrecorded delivery is sent again after a
                    // restart (the one duplicate receivers may see).
                    let mut backoff = Duration::from_millis(200);
                    while let Err(e) = store.alert_delivered(&group, &alert.id, now_ms()).await {
                        tracing::warn!(%e, id = %alert.id, "cannot record a delivered alert; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    stats.failed_deliveries.fetch_add(1, Ordering::Relaxed);
                    wait = match &err {
                        DeliveryError::Unavailable(_) => {
                            Duration::from_millis(500u64 << failures.min(5).saturating_sub(1))
                                .min(Duration::from_secs(10))
                        }
                        DeliveryError::Refused(_) => Duration::from_secs(30),
                    };
                    match &err {
                        DeliveryError::Unavailable(e) => tracing::warn!(
                            id = %alert.id, attempt = stored.attempts + 1, retry_in = ?wait,
                            "cannot deliver the alert: {e}; it waits and is retried"
                        ),
                        DeliveryError::Refused(e) => tracing::error!(
                            id = %alert.id, attempt = stored.attempts + 1, retry_in = ?wait,
                            "the alert was refused: {e}; it is kept and retried until the configuration is fixed"
                        ),
                    }
                    if let Err(e) = store
                        .alert_failed(&group, &alert.id, &err.to_string())
                        .await
                    {
                        tracing::warn!(%e, "cannot record a failed delivery");
                    }
                    break;
                }
            }
        }
    }
}
