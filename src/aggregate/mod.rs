//! Aggregate stage: `page-views` → counts by country and by every dimension → the database,
//! one transaction per flush interval.
//!
//! A member of a result-writing consumer group ([`crate::positions`]): offsets never go to
//! Kafka but into the database, in the same transaction as the counts, so counts are exact
//! across crashes and rebalances. This module is what the aggregator counts and writes.

pub mod dimensions;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::countries::CountryCode;
use crate::event::PageView;
use crate::kafka::{AGGREGATE_GROUP, EVENTS_TOPIC, KafkaSettings};
use crate::positions::{Flushed, GroupMember, Pending, Recorded, sleep_until, source_of_message};
use crate::store::Store;
use dimensions::{Counts, Dimension, Keep};

/// How often counts are written when not configured: the talk's 5 seconds.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// A flush that takes longer is abandoned and retried (its counts stay in memory). If it
/// commits after all, the retry's compare-and-set sees the moved offsets and re-reads them:
/// nothing is counted twice.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// The flush at shutdown gets this long; what it cannot write is re-read by the next owner.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Settings of one aggregator.
#[derive(Clone)]
pub struct AggregateConfig {
    pub kafka: KafkaSettings,
    pub store: Store,
    /// Time between two flushes (one transaction each).
    pub flush_interval: Duration,
    /// Flushes now what is counted, without waiting for the interval (`demo
    /// --exit-when-drained` once every line of its finite input was preprocessed: the last
    /// counts are then written at once instead of up to a whole interval later).
    pub flush_now: Option<Arc<Notify>>,
    /// What is counted besides the per-country table ([`dimensions`]).
    pub dimensions: Vec<Dimension>,
    /// Distinct values kept per dimension, partition and flush interval (the rest is counted
    /// as `(other)`; see [`dimensions`] for the error bound).
    pub top_k: usize,
    /// Visits per minute older than this (before the newest minute written) are deleted;
    /// `None` keeps them all.
    pub minute_retention: Option<Duration>,
    /// Values kept per dimension (and per dimension and hour) in the database; the rest is
    /// folded into `(other)` by each flush.
    pub keep_values: u32,
    /// Minutes and hours are never pruned against an event time past the wall clock plus
    /// this (see [`dimensions::fill_batch`]).
    pub max_future: Duration,
}

/// Running totals for logs, summaries and tests.
#[derive(Debug, Default)]
pub struct AggregateStats {
    /// Visits made durable by committed flushes.
    pub flushed_visits: AtomicU64,
    /// Committed flush transactions.
    pub flushes: AtomicU64,
    /// Flushes that failed (database unreachable or locked) and were retried.
    pub failed_flushes: AtomicU64,
    /// Events dropped because their raw line was already counted (preprocessor replays).
    pub duplicates_dropped: AtomicU64,
    /// Partitions whose stored positions referred to a topic that was deleted and created
    /// again (or a broker that started over): counted from the new topic's start.
    pub recreated_topics_seen: AtomicU64,
    /// Flushed events whose JSON could not be read: counted for their country (the key) only.
    pub unreadable_events: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("Kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
}

/// Runs one aggregator until `shutdown`, then flushes once more and leaves the group.
pub async fn run(
    config: AggregateConfig,
    stats: Arc<AggregateStats>,
    shutdown: CancellationToken,
) -> Result<(), AggregateError> {
    let mut member = GroupMember::join(
        &config.kafka,
        AGGREGATE_GROUP,
        EVENTS_TOPIC,
        Counts::new(&config.dimensions, config.top_k),
        // Prefetch at most 16 MiB of events (librdkafka's default is 64 MiB), as the
        // preprocessor does: an aggregator that counts slower than events arrive (every event
        // is parsed for its dimensions) otherwise holds a fuller queue the further behind it
        // is, and its memory grows with the backlog.
        &[("queued.max.messages.kbytes", "16384")],
        config.store.clone(),
        shutdown.clone(),
    )?;
    // Values of a dimension that are not a slice of the event, built here without allocating.
    let mut buf = String::new();
    let next_flush = tokio::time::sleep(config.flush_interval);
    tokio::pin!(next_flush);
    let shared = Arc::clone(&member.shared);
    loop {
        let position_due = shared.position_due();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = shared.wake.notified() => member.position().await,
            _ = sleep_until(position_due), if position_due.is_some() => member.position().await,
            _ = flush_due(next_flush.as_mut(), config.flush_now.as_deref()) => {
                let wait = if flush(&mut member, &stats, &config, FLUSH_TIMEOUT).await {
                    config.flush_interval
                } else {
                    member.backoff()
                };
                next_flush.as_mut().reset(Instant::now() + wait);
            }
            msg = member.consumer.recv() => match msg {
                Ok(m) => {
                    let country = country_of(m.key(), m.payload());
                    let source = source_of_message(&m);
                    let count = |counts: &mut Counts| {
                        // Parsed only when counted (not for replays); an unreadable event still
                        // counts for its country, and in `unreadable_events`.
                        let event = m
                            .payload()
                            .and_then(|p| serde_json::from_slice::<PageView<'_>>(p).ok());
                        counts.add(country, event.as_ref(), &mut buf);
                    };
                    if member.record(m.partition(), m.offset(), source, count)
                        == Recorded::DuplicateSource
                    {
                        stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => tracing::warn!(%e, "consume error"),
            },
        }
    }
    // Best effort, bounded: what is not flushed now is re-read by the next owner.
    flush(&mut member, &stats, &config, FINAL_FLUSH_TIMEOUT).await;
    member.leave().await;
    Ok(())
}

/// One flush of the counts, abandoned after `timeout`; true when they are durable (or there
/// was nothing to write).
async fn flush(
    member: &mut GroupMember<Counts>,
    stats: &AggregateStats,
    config: &AggregateConfig,
    timeout: Duration,
) -> bool {
    let is_final = timeout == FINAL_FLUSH_TIMEOUT;
    let retention = config
        .minute_retention
        .map(|r| i64::try_from(r.as_secs()).unwrap_or(i64::MAX));
    let outcome = member
        .flush(timeout, is_final, |pending| {
            let mut batch = std::mem::take(&mut pending.batch);
            let keep = Keep::now(retention, config.max_future, config.keep_values);
            dimensions::fill_batch(&mut batch, pending.counts(), keep);
            pending.batch = batch;
        })
        .await;
    stats
        .recreated_topics_seen
        .store(member.recreated_topics_seen, Ordering::Relaxed);
    match outcome {
        Flushed::Nothing => true,
        Flushed::Committed(pending) => {
            committed(stats, &pending);
            true
        }
        Flushed::Failed { store_error } => {
            if store_error {
                stats.failed_flushes.fetch_add(1, Ordering::Relaxed);
            }
            false
        }
    }
}

fn committed(stats: &AggregateStats, pending: &Pending<Counts>) {
    let unreadable: u64 = pending.counts().map(|c| c.unreadable).sum();
    if unreadable > 0 {
        tracing::warn!(
            unreadable,
            "events whose JSON could not be read were counted for their country only"
        );
        stats
            .unreadable_events
            .fetch_add(unreadable, Ordering::Relaxed);
    }
    let visits: u64 = pending.batch.increments.iter().map(|(_, n)| n).sum();
    stats.flushed_visits.fetch_add(visits, Ordering::Relaxed);
    stats.flushes.fetch_add(1, Ordering::Relaxed);
    let duplicates = stats.duplicates_dropped.load(Ordering::Relaxed);
    tracing::info!(
        visits,
        partitions = pending.batch.offsets.len(),
        duplicates_dropped_total = duplicates,
        "flushed"
    );
}

/// When the next flush is due: at the end of the interval, or when asked to flush now.
async fn flush_due(interval: std::pin::Pin<&mut tokio::time::Sleep>, now: Option<&Notify>) {
    match now {
        Some(now) => tokio::select! {
            _ = interval => {}
            _ = now.notified() => {}
        },
        None => interval.await,
    }
}

/// The country of an event: its key, or its payload's `country_code` if the key is missing.
pub(crate) fn country_of(key: Option<&[u8]>, payload: Option<&[u8]>) -> CountryCode {
    if let Some(c) = key
        .and_then(|k| std::str::from_utf8(k).ok())
        .and_then(CountryCode::parse)
    {
        return c;
    }
    #[derive(serde::Deserialize)]
    struct Partial<'a> {
        #[serde(borrow)]
        country_code: &'a str,
    }
    payload
        .and_then(|p| serde_json::from_slice::<Partial<'_>>(p).ok())
        .and_then(|p| CountryCode::parse(p.country_code))
        .unwrap_or_else(|| {
            tracing::warn!("event without a valid country key; counted as ZZ");
            CountryCode::UNKNOWN
        })
}
