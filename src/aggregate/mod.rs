//! Aggregate stage: `page-views` → per-country counts → the database, one transaction per
//! flush interval.
//!
//! Offsets never go to Kafka: each flush stores, in the same transaction as the counts, the
//! next offset of every partition that moved. On assignment the consumer is positioned at the
//! stored offsets; on revocation un-flushed counts are dropped. Counts are therefore exact
//! across crashes and rebalances (see [`crate::store`] for how a stale owner is fenced off).

pub mod dimensions;
pub mod positions;
pub mod tally;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedHeaders, Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::countries::CountryCode;
use crate::event::{PageView, headers as event_headers};
use crate::kafka::{AGGREGATE_GROUP, ClientRole, EVENTS_TOPIC, KafkaSettings, RAW_TOPIC};
use crate::store::{FlushOutcome, Store, StoreError, StoredPositions, TopicIdentity};
use dimensions::{Counts, Dimension};
use positions::{Awaiting, Notice};
use tally::{Pending, Recorded, Source, Tally};

/// How often counts are written when not configured: the talk's 5 seconds.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// A flush that takes longer is abandoned and retried (its counts stay in memory). If it
/// commits after all, the retry's compare-and-set sees the moved offsets and re-reads them:
/// nothing is counted twice.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// The flush at shutdown gets this long; what it cannot write is re-read by the next owner.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(3);
/// Reading stored positions, topic ids or a log end: longer counts as a failed attempt
/// (retried with backoff; the partitions stay paused meanwhile).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Shared between the consume loop and the rebalance callback (both run on the task that
/// polls the consumer, so the locks are never contended).
struct Shared {
    tally: Mutex<Tally<Counts>>,
    /// Partitions assigned (or fenced off) and not yet positioned; paused meanwhile.
    awaiting: Mutex<Awaiting>,
    /// Wakes the loop when the rebalance callback added partitions to `awaiting` (the
    /// consumer then has nothing to deliver: every new partition is paused).
    wake: Notify,
}

impl Shared {
    fn tally(&self) -> MutexGuard<'_, Tally<Counts>> {
        // A poisoned lock only means a panic elsewhere; the tally itself stays consistent.
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn awaiting(&self) -> MutexGuard<'_, Awaiting> {
        self.awaiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs a blocking librdkafka call from async code without stalling the other tasks on this
/// worker (an in-process broker may be among them).
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

struct AggregatorContext {
    shared: Arc<Shared>,
}

impl ClientContext for AggregatorContext {}

impl ConsumerContext for AggregatorContext {
    /// No database or broker round trip here: the callback runs inside the consumer's poll,
    /// and anything slow in it (a hung database) would hold up the whole group's rebalance
    /// and the process's shutdown. New partitions are assigned paused; the loop reads their
    /// stored positions, seeks and resumes them (`Aggregator::position`).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                for &p in &partitions {
                    // Where it starts is decided once the stored positions are read; until
                    // then it is paused, and whatever arrives from it is not counted.
                    if let Err(e) = tpl.set_partition_offset(EVENTS_TOPIC, p, Offset::Beginning) {
                        tracing::warn!(partition = p, %e, "cannot set start offset");
                    }
                }
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(%e, "cannot pause new partitions; their early messages are skipped");
                }
                let mut awaiting = self.shared.awaiting();
                for &p in &partitions {
                    awaiting.add(p);
                }
                drop(awaiting);
                self.shared.wake.notify_one();
                tracing::info!(?partitions, "assigned");
                assigned
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let mut tally = self.shared.tally();
                let mut awaiting = self.shared.awaiting();
                for &p in &partitions {
                    tally.revoke(p);
                    awaiting.remove(p);
                }
                drop((tally, awaiting));
                tracing::info!(?partitions, "revoked; un-flushed counts dropped");
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::warn!(?other, "rebalance error; giving up the assignment");
                let mut tally = self.shared.tally();
                for p in tally.partitions() {
                    tally.revoke(p);
                }
                self.shared.awaiting().clear();
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::warn!(%e, "applying the assignment failed");
        }
    }
}

/// Runs one aggregator until `shutdown`, then flushes once more and leaves the group.
pub async fn run(
    config: AggregateConfig,
    stats: Arc<AggregateStats>,
    shutdown: CancellationToken,
) -> Result<(), AggregateError> {
    let shared = Arc::new(Shared {
        tally: Mutex::new(Tally::new(Counts::new(&config.dimensions, config.top_k))),
        awaiting: Mutex::new(Awaiting::default()),
        wake: Notify::new(),
    });
    let consumer: StreamConsumer<AggregatorContext> = config
        .kafka
        .client_config(
            ClientRole::Consumer,
            &[
                ("group.id", AGGREGATE_GROUP),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                crate::kafka::SESSION[0],
                crate::kafka::SESSION[1],
                // Prefetch at most 16 MiB of events (librdkafka's default is 64 MiB), as the
                // preprocessor does: an aggregator that counts slower than events arrive
                // (every event is parsed for its dimensions) otherwise holds a fuller queue
                // the further behind it is, and its memory grows with the backlog.
                ("queued.max.messages.kbytes", "16384"),
                crate::kafka::FETCH_QUEUE_BACKOFF,
            ],
        )
        .create_with_context(AggregatorContext {
            shared: Arc::clone(&shared),
        })?;
    consumer.subscribe(&[EVENTS_TOPIC])?;
    let mut agg = Aggregator {
        shared: &shared,
        consumer: &consumer,
        store: &config.store,
        stats: &stats,
        shutdown: &shutdown,
        identity: TopicIdentity::default(),
        failures: 0,
        retention: config
            .minute_retention
            .map(|r| i64::try_from(r.as_secs()).unwrap_or(i64::MAX)),
    };
    // Values of a dimension that are not a slice of the event, built here without allocating.
    let mut buf = String::new();
    let next_flush = tokio::time::sleep(config.flush_interval);
    tokio::pin!(next_flush);
    loop {
        let position_due = shared.awaiting().due_at();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = shared.wake.notified() => agg.position().await,
            _ = sleep_until(position_due), if position_due.is_some() => agg.position().await,
            _ = flush_due(next_flush.as_mut(), config.flush_now.as_deref()) => {
                let wait = if agg.flush(FLUSH_TIMEOUT).await { config.flush_interval } else { agg.backoff() };
                next_flush.as_mut().reset(Instant::now() + wait);
            }
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    let country = country_of(m.key(), m.payload());
                    let source = m
                        .payload()
                        .and_then(crate::event::source_of_event)
                        .or_else(|| source_of(m.headers()));
                    let count = |counts: &mut Counts| {
                        // Parsed only when counted (not for replays); an unreadable event still
                        // counts for its country, and in `unreadable_events`.
                        let event = m
                            .payload()
                            .and_then(|p| serde_json::from_slice::<PageView<'_>>(p).ok());
                        counts.add(country, event.as_ref(), &mut buf);
                    };
                    let mut tally = shared.tally();
                    if let Some(next) = tally.next_offset(m.partition()).filter(|&n| m.offset() > n) {
                        // Our producers write no transaction markers and the topic is not
                        // compacted: a jump means the broker did not deliver those messages
                        // (what tansu's memory storage did before vendor/tansu-storage's
                        // fetch patch). They will not be counted; say so.
                        tracing::warn!(
                            partition = m.partition(),
                            expected = next,
                            got = m.offset(),
                            skipped = m.offset() - next,
                            "the broker skipped offsets of {EVENTS_TOPIC}; those events are not counted"
                        );
                    }
                    if tally.record(m.partition(), m.offset(), source, count)
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
    agg.flush(FINAL_FLUSH_TIMEOUT).await;
    // Leaving the group blocks on a broker round trip: keep it off the async workers, and do
    // not wait for a broker that does not answer.
    let leave = tokio::task::spawn_blocking(move || drop(consumer));
    if tokio::time::timeout(Duration::from_secs(5), leave)
        .await
        .is_err()
    {
        tracing::warn!("the broker did not confirm that this aggregator left the group");
    }
    Ok(())
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

/// `tokio::time::sleep_until` for a std `Instant` (`None`: never).
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// The raw partition and offset an event was made from, if its headers say so (events written
/// before the source moved into the event).
fn source_of(headers: Option<&BorrowedHeaders>) -> Option<Source> {
    let headers = headers?;
    let (mut partition, mut offset) = (None, None);
    for h in headers.iter() {
        let value = h.value.and_then(|v| std::str::from_utf8(v).ok());
        match h.key {
            event_headers::SOURCE_PARTITION => partition = value.and_then(|v| v.parse().ok()),
            event_headers::SOURCE_OFFSET => offset = value.and_then(|v| v.parse().ok()),
            _ => {}
        }
    }
    Some(Source {
        partition: partition?,
        offset: offset?,
    })
}

/// The country of an event: its key, or its payload's `country_code` if the key is missing.
fn country_of(key: Option<&[u8]>, payload: Option<&[u8]>) -> CountryCode {
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

/// The consume loop's state beyond the tally: what it needs to position partitions and flush.
struct Aggregator<'a> {
    shared: &'a Shared,
    consumer: &'a StreamConsumer<AggregatorContext>,
    store: &'a Store,
    stats: &'a AggregateStats,
    shutdown: &'a CancellationToken,
    /// The topic ids as last read from the broker, written with every flush.
    identity: TopicIdentity,
    /// Consecutive failed flushes, for the backoff.
    failures: u32,
    /// [`AggregateConfig::minute_retention`] in seconds.
    retention: Option<i64>,
}

/// Why positioning could not be done now (it is retried).
#[derive(Debug, thiserror::Error)]
enum PositionError {
    #[error("cannot read the stored positions: {0}")]
    Store(#[from] StoreError),
    #[error("cannot describe the topics: {0}")]
    Describe(#[from] crate::kafka::KafkaSetupError),
    #[error("cannot read the log end of partition {partition}: {source}")]
    LogEnd { partition: i32, source: KafkaError },
    #[error("shutting down")]
    Shutdown,
}

impl Aggregator<'_> {
    fn backoff(&self) -> Duration {
        Duration::from_millis(250u64 << self.failures.min(7)).min(Duration::from_secs(30))
    }

    /// Positions the partitions that wait (new or fenced off): reads the stored positions and
    /// the topics' ids, decides where each starts, seeks and resumes it. Whatever fails is
    /// retried later with backoff; nothing here waits longer than [`LOOKUP_TIMEOUT`] per step
    /// or past shutdown.
    async fn position(&mut self) {
        let due = self.shared.awaiting().take_due(std::time::Instant::now());
        if due.is_empty() {
            return;
        }
        let began = std::time::Instant::now();
        let stored = match self.lookups(&due).await {
            Ok(found) => found,
            Err(err) => {
                if !matches!(err, PositionError::Shutdown) {
                    tracing::warn!(%err, partitions = ?due, "cannot position partitions yet; retrying");
                }
                self.shared
                    .awaiting()
                    .failed(due, std::time::Instant::now());
                return;
            }
        };
        let (stored, log_ends) = stored;
        tracing::debug!(took = ?began.elapsed(), "positions, topic ids and log ends read");
        let mut failed = Vec::new();
        let mut notices: HashMap<String, Vec<i32>> = HashMap::new();
        for p in due {
            let (start, notice) =
                positions::start_of(p, &stored, &self.identity, log_ends.get(&p).copied());
            let to = match start.from {
                0 => Offset::Beginning,
                n => Offset::Offset(n),
            };
            let seek = blocking(|| self.consumer.seek(EVENTS_TOPIC, p, to, LOOKUP_TIMEOUT));
            if let Err(e) = seek {
                // Not counted until the seek works: without it, counting would go on from
                // wherever the consumer is, over a gap.
                tracing::warn!(partition = p, %e, "seek failed; retrying");
                failed.push(p);
                continue;
            }
            self.shared.tally().start(p, start);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(EVENTS_TOPIC, p);
            if let Err(e) = self.consumer.resume(&tpl) {
                tracing::warn!(partition = p, %e, "resume failed; retrying");
                self.shared.tally().revoke(p);
                failed.push(p);
                continue;
            }
            if let Some(n) = notice {
                if matches!(n, Notice::TopicRecreated { .. }) {
                    self.stats
                        .recreated_topics_seen
                        .fetch_add(1, Ordering::Relaxed);
                }
                notices.entry(describe(&n)).or_default().push(p);
            }
        }
        tracing::debug!(took = ?began.elapsed(), "partitions positioned");
        for (what, partitions) in notices {
            // Data-loss territory (or the appearance of it): ERROR, one line each.
            tracing::error!(?partitions, "{what}");
        }
        let mut awaiting = self.shared.awaiting();
        if failed.is_empty() {
            awaiting.succeeded();
        } else {
            awaiting.failed(failed, std::time::Instant::now());
        }
    }

    /// The stored positions, the topics' ids (into `self.identity`) and, for partitions with a
    /// stored offset, their log ends.
    async fn lookups(
        &mut self,
        due: &[i32],
    ) -> Result<(StoredPositions, HashMap<i32, i64>), PositionError> {
        let ids = blocking(|| {
            crate::kafka::describe_topic_ids(
                self.consumer.client(),
                &[EVENTS_TOPIC, RAW_TOPIC],
                LOOKUP_TIMEOUT,
            )
        })?;
        tracing::debug!(?ids, "topic ids");
        self.identity = TopicIdentity {
            topic_id: ids.get(EVENTS_TOPIC).cloned().flatten(),
            source_topic_id: ids.get(RAW_TOPIC).cloned().flatten(),
        };
        let load = self.store.load_positions(AGGREGATE_GROUP, EVENTS_TOPIC);
        let stored = tokio::select! {
            _ = self.shutdown.cancelled() => return Err(PositionError::Shutdown),
            r = tokio::time::timeout(LOOKUP_TIMEOUT, load) => r.unwrap_or(Err(StoreError::Timeout(LOOKUP_TIMEOUT)))?,
        };
        let mut log_ends = HashMap::new();
        for &p in due {
            let Some(offset) = stored.offset(p) else {
                continue;
            };
            if let (_, Some(Notice::TopicRecreated { .. } | Notice::SourceRecreated { .. })) =
                positions::start_of(p, &stored, &self.identity, None)
            {
                // Decided without the log end: a new topic's offsets do not compare.
                continue;
            }
            // A log end below the stored offset moves counting back to it, so it must be
            // real: ask again a few times (the embedded broker has answered with stale
            // high watermarks under load) and believe the highest answer.
            let mut high = i64::MIN;
            for attempt in 0..3 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let (_, h) = blocking(|| {
                    self.consumer
                        .fetch_watermarks(EVENTS_TOPIC, p, LOOKUP_TIMEOUT)
                })
                .map_err(|source| PositionError::LogEnd {
                    partition: p,
                    source,
                })?;
                high = high.max(h);
                if high >= offset {
                    break;
                }
            }
            log_ends.insert(p, high);
        }
        Ok((stored, log_ends))
    }

    /// One flush, abandoned after `timeout` or at shutdown; true when the counts are durable
    /// (or there was nothing to write).
    async fn flush(&mut self, timeout: Duration) -> bool {
        // A conflict leaves the other partitions' counts in place: flush those right away.
        for _ in 0..3 {
            let mut pending =
                self.shared
                    .tally()
                    .take_pending(AGGREGATE_GROUP, EVENTS_TOPIC, &self.identity);
            if pending.batch.offsets.is_empty() {
                return true;
            }
            let mut batch = std::mem::take(&mut pending.batch);
            dimensions::fill_batch(&mut batch, pending.counts(), self.retention);
            pending.batch = batch;
            let write = tokio::time::timeout(timeout, self.store.flush(&pending.batch));
            let outcome = tokio::select! {
                r = write => r.unwrap_or(Err(StoreError::Timeout(timeout))),
                // At shutdown the final flush (with its own short timeout) follows.
                _ = self.shutdown.cancelled(), if timeout != FINAL_FLUSH_TIMEOUT => {
                    self.shared.tally().restore(pending);
                    return false;
                }
            };
            match outcome {
                Ok(FlushOutcome::Committed) => {
                    self.committed(&pending);
                    return true;
                }
                Ok(FlushOutcome::Conflict(partitions)) => {
                    self.shared.tally().restore(pending);
                    self.fenced_off(&partitions);
                }
                Err(err) => {
                    self.failed(pending, &err);
                    return false;
                }
            }
        }
        false
    }

    fn committed(&mut self, pending: &Pending<Counts>) {
        self.shared.tally().committed(pending);
        let unreadable: u64 = pending.counts().map(|c| c.unreadable).sum();
        if unreadable > 0 {
            tracing::warn!(
                unreadable,
                "events whose JSON could not be read were counted for their country only"
            );
            self.stats
                .unreadable_events
                .fetch_add(unreadable, Ordering::Relaxed);
        }
        let visits: u64 = pending.batch.increments.iter().map(|(_, n)| n).sum();
        self.stats
            .flushed_visits
            .fetch_add(visits, Ordering::Relaxed);
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        if self.failures > 0 {
            tracing::info!(after_failures = self.failures, "flush succeeded again");
        }
        self.failures = 0;
        let duplicates = self.stats.duplicates_dropped.load(Ordering::Relaxed);
        tracing::info!(
            visits,
            partitions = pending.batch.offsets.len(),
            duplicates_dropped_total = duplicates,
            "flushed"
        );
    }

    fn failed(&mut self, pending: Pending<Counts>, err: &StoreError) {
        self.shared.tally().restore(pending);
        self.failures += 1;
        self.stats.failed_flushes.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%err, attempt = self.failures, retry_in = ?self.backoff(), "flush failed; counts kept in memory");
    }

    /// Another owner moved these partitions' offsets: forget our counts, pause them, and
    /// position them again from the stored offsets (as on assignment, with retries).
    fn fenced_off(&self, partitions: &[i32]) {
        tracing::warn!(
            ?partitions,
            "stored offsets moved by another aggregator; re-reading"
        );
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            self.shared.tally().revoke(p);
            tpl.add_partition(EVENTS_TOPIC, p);
        }
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(%e, "cannot pause fenced-off partitions; their messages are skipped until repositioned");
        }
        let mut awaiting = self.shared.awaiting();
        for &p in partitions {
            awaiting.add(p);
        }
    }
}

/// One line for a positioning notice: what happened and what it means for the counts.
fn describe(n: &Notice) -> String {
    match n {
        Notice::TopicRecreated { stored, now } => format!(
            "topic {EVENTS_TOPIC} is not the one the stored positions were counted in (topic id {stored}, now {now}: deleted and created again, or a broker that started over); counting the new topic from its start, on top of the counts already in the database. If it replays lines that were already counted, reset the database first"
        ),
        Notice::SourceRecreated { stored, now } => format!(
            "topic {RAW_TOPIC} was deleted and created again (topic id {stored}, now {now}): replay detection starts over for these partitions"
        ),
        Notice::BeyondLogEnd { stored, log_end } => format!(
            "the stored offset {stored} is past the log end {log_end} of {EVENTS_TOPIC} (same topic): the broker lost messages that were already counted; counting resumes at the log end"
        ),
    }
}
