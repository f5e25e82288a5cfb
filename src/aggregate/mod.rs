//! Aggregate stage: `page-views` → counts by country and by every dimension → the database,
//! one transaction per flush interval.
//!
//! A member of a result-writing consumer group ([`crate::positions`]): offsets never go to
//! Kafka but into the database, in the same transaction as the counts, so counts are exact
//! across crashes and rebalances. This module is what the aggregator counts and writes.

pub mod dimensions;
pub mod rollups;
pub mod tables;
pub mod visits;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::countries::CountryCode;
use crate::event::PageView;
use crate::kafka::{AGGREGATE_GROUP, EVENTS_TOPIC, KafkaSettings};
use crate::positions::{self, Flushed, Group, GroupMember, Pending};
use crate::store::{StateRow, Store};
use dimensions::{Counts, Dimension, Keep};

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
    /// How visits are cut and bounded (`None`: visits are not counted).
    pub visits: Option<VisitSettings>,
    /// Set (with `flush_now`) when the input ended: the next flush closes every open visit
    /// (`demo --exit-when-drained`), then clears it.
    pub close_visits: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// Visits' options ([`crate::sessions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisitSettings {
    /// `--session-gap`, seconds.
    pub gap: i64,
    /// `--lateness`, seconds.
    pub lateness: i64,
    /// `--max-open-visits`: open visits kept per aggregator (checked at each flush).
    pub max_open: usize,
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
    /// Open visits in this aggregator's partitions, as of the last flush.
    pub open_visits: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("Kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
    #[error("cannot read the visitor-key salt: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// Runs one aggregator until `shutdown`, then flushes once more and leaves the group.
pub async fn run(
    config: AggregateConfig,
    stats: Arc<AggregateStats>,
    shutdown: CancellationToken,
) -> Result<(), AggregateError> {
    let sessions = match config.visits {
        Some(v) => {
            let kafka = config.kafka.clone();
            let sources = tokio::task::spawn_blocking(move || {
                kafka.partition_count(crate::kafka::RAW_TOPIC, Duration::from_secs(10))
            })
            .await
            .ok()
            .flatten();
            if sources.is_none() {
                tracing::warn!(
                    "cannot read the partitions of {}: visits close on the raw partitions seen so far",
                    crate::kafka::RAW_TOPIC
                );
            }
            Some(crate::sessions::SessionConfig {
                gap: v.gap,
                lateness: v.lateness,
                salt: config.store.visit_salt().await?,
                sources,
            })
        }
        None => None,
    };
    let member = GroupMember::join(
        &config.kafka,
        AGGREGATE_GROUP,
        EVENTS_TOPIC,
        Counts::new(&config.dimensions, config.top_k).with_sessions(sessions),
        config.store.clone(),
        shutdown.clone(),
    )?;
    let aggregator = Aggregator {
        config,
        stats,
        buf: String::new(),
    };
    positions::consume(member, aggregator, shutdown).await;
    Ok(())
}

/// The aggregator as a [`Group`]: what it counts and what its flushes write.
struct Aggregator {
    config: AggregateConfig,
    stats: Arc<AggregateStats>,
    /// Values of a dimension that are not a slice of the event, built here without
    /// allocating.
    buf: String,
}

impl Group for Aggregator {
    type Acc = Counts;

    fn interval(&self) -> Duration {
        self.config.flush_interval
    }

    fn flush_now(&self) -> Option<Arc<Notify>> {
        self.config.flush_now.clone()
    }

    fn count(&mut self, counts: &mut Counts, m: &BorrowedMessage<'_>, country: CountryCode) {
        // Parsed only when counted (not for replays); an unreadable event still counts for
        // its country, and in `unreadable_events`.
        let event = m
            .payload()
            .and_then(|p| serde_json::from_slice::<PageView<'_>>(p).ok());
        counts.add(country, event.as_ref(), &mut self.buf);
    }

    fn duplicate(&self) {
        self.stats
            .duplicates_dropped
            .fetch_add(1, Ordering::Relaxed);
    }

    fn fill(&self, pending: &mut Pending<Counts>) {
        let retention = self
            .config
            .minute_retention
            .map(|r| i64::try_from(r.as_secs()).unwrap_or(i64::MAX));
        let mut results = std::mem::take(&mut pending.batch.results);
        let keep = Keep::now(retention, self.config.max_future, self.config.keep_values);
        dimensions::fill_batch(&mut results, pending.counts(), keep);
        pending.batch.results = results;
        // The open visits that changed and the partition's clocks, fenced with its offset.
        let mut state = Vec::new();
        for (partition, c) in pending.per_partition() {
            let Some(f) = &c.session_flush else { continue };
            state.extend(f.rows.iter().map(|(visitor, value)| StateRow {
                partition,
                key: crate::sessions::key_bytes(*visitor),
                value: value.clone(),
            }));
            if let Some(clocks) = &f.clocks {
                state.push(StateRow {
                    partition,
                    key: crate::sessions::CLOCKS_KEY.to_vec(),
                    value: Some(clocks.clone()),
                });
            }
        }
        pending.batch.state = state;
    }

    /// Closes visits outside a message: all of them when the input ended, the oldest ones
    /// beyond `--max-open-visits`.
    fn before_flush(&mut self, member: &GroupMember<Counts>) {
        let Some(settings) = self.config.visits else {
            return;
        };
        let mut tally = member.tally();
        let end = self
            .config
            .close_visits
            .as_ref()
            .is_some_and(|f| f.swap(false, Ordering::SeqCst));
        if end {
            for (_, c) in tally.accumulators_mut() {
                c.close_visits(crate::sessions::Closed::EndOfInput);
            }
        }
        let mut open: Vec<i64> = Vec::new();
        let mut total = 0usize;
        for (_, c) in tally.accumulators_mut() {
            if let Some(s) = &c.sessions {
                total += s.open();
            }
        }
        if total > settings.max_open {
            // The cut: the last request time of the (total - max)-th oldest open visit.
            for (_, c) in tally.accumulators_mut() {
                if let Some(s) = &c.sessions {
                    open.extend(s.last_times());
                }
            }
            let excess = total - settings.max_open;
            let (_, &mut cut, _) = open.select_nth_unstable(excess - 1);
            let below = open.iter().filter(|&&t| t < cut).count();
            let mut at_cut = excess - below;
            let mut closed = 0;
            for (_, c) in tally.accumulators_mut() {
                closed += c.close_visits_before(cut, &mut at_cut);
            }
            tracing::warn!(
                closed,
                max = settings.max_open,
                "--max-open-visits reached: the visits with the oldest last request were closed early"
            );
            total -= closed;
        }
        self.stats
            .open_visits
            .store(total as u64, Ordering::Relaxed);
    }

    fn flushed(&self, member: &GroupMember<Counts>, outcome: &Flushed<Counts>) {
        let stats = &self.stats;
        stats
            .recreated_topics_seen
            .store(member.recreated_topics_seen(), Ordering::Relaxed);
        match outcome {
            Flushed::Nothing => {}
            Flushed::Committed(pending) => committed(stats, pending),
            Flushed::Failed { store_error } => {
                if *store_error {
                    stats.failed_flushes.fetch_add(1, Ordering::Relaxed);
                }
            }
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
    let visits: u64 = pending
        .batch
        .results
        .increments
        .iter()
        .map(|(_, n)| n)
        .sum();
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

impl crate::positions::Accumulator for Counts {
    type Flush = tables::CountsFlush;
    fn empty_like(&self) -> Self {
        self.empty_like()
    }
    fn is_empty(&self) -> bool {
        self.is_empty()
    }
    fn merge(&mut self, other: Self) {
        self.merge(other)
    }
    /// The counts go; the open visits stay (the flush writes what changed in them).
    fn take(&mut self) -> Self {
        self.take()
    }
    fn must_flush(&self) -> bool {
        self.must_flush()
    }
    /// The open visits and clock the last flush stored for this partition.
    fn resume_from(&mut self, partition: i32, stored: &crate::store::StoredPositions) {
        if let Some(s) = &mut self.sessions {
            let rows = stored.state.get(&partition).map_or(&[][..], |r| &r[..]);
            let unreadable = s.load(rows);
            if unreadable > 0 {
                tracing::error!(
                    partition,
                    unreadable,
                    "stored open visits that cannot be read were left out"
                );
            }
            tracing::debug!(partition, open = s.open(), "open visits loaded");
        }
    }
}
