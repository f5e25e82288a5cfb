//! Aggregate stage: `page-views` → per-country counts → the database, one transaction per
//! flush interval.
//!
//! Offsets never go to Kafka: each flush stores, in the same transaction as the counts, the
//! next offset of every partition that moved. On assignment the consumer is positioned at the
//! stored offsets; on revocation un-flushed counts are dropped. Counts are therefore exact
//! across crashes and rebalances (see [`crate::store`] for how a stale owner is fenced off).

pub mod tally;

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
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::countries::CountryCode;
use crate::event::headers as event_headers;
use crate::kafka::{AGGREGATE_GROUP, EVENTS_TOPIC, KafkaSettings};
use crate::store::{FlushOutcome, Store, StoreError, StoredPositions};
use tally::{Pending, Recorded, Source, Tally};

/// How often counts are written when not configured: the talk's 5 seconds.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// Settings of one aggregator.
#[derive(Clone)]
pub struct AggregateConfig {
    pub kafka: KafkaSettings,
    pub store: Store,
    /// Time between two flushes (one transaction each).
    pub flush_interval: Duration,
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
}

#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("Kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
}

/// Shared between the consume loop and the rebalance callback (both run on the task that
/// polls the consumer, so the lock is never contended).
struct Shared {
    tally: Mutex<Tally>,
    store: Store,
}

impl Shared {
    fn tally(&self) -> MutexGuard<'_, Tally> {
        // A poisoned lock only means a panic elsewhere; the tally itself stays consistent.
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stored offsets and watermarks, retried until the database answers: a partition cannot
    /// be consumed without knowing where its counted prefix ends.
    fn load_positions_blocking(&self) -> StoredPositions {
        let mut delay = Duration::from_millis(100);
        loop {
            match block_on(self.store.load_positions(AGGREGATE_GROUP, EVENTS_TOPIC)) {
                Ok(positions) => return positions,
                Err(err) => {
                    tracing::warn!(%err, "cannot read stored offsets; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Runs a future to completion from a synchronous librdkafka callback.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(fut))
        }
        _ => futures::executor::block_on(fut),
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
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let stored = self.shared.load_positions_blocking();
                let mut tally = self.shared.tally();
                for elem in tpl.elements() {
                    let p = elem.partition();
                    tally.assign(p, stored.offset(p), stored.watermarks(p));
                }
                drop(tally);
                for (p, offset) in tpl
                    .elements()
                    .iter()
                    .map(|e| (e.partition(), stored.offset(e.partition())))
                    .collect::<Vec<_>>()
                {
                    let offset = offset.map_or(Offset::Beginning, Offset::Offset);
                    if let Err(e) = tpl.set_partition_offset(EVENTS_TOPIC, p, offset) {
                        tracing::warn!(partition = p, %e, "cannot set start offset");
                    }
                }
                tracing::info!(partitions = ?tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "assigned");
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let mut tally = self.shared.tally();
                for elem in tpl.elements() {
                    tally.revoke(elem.partition());
                }
                drop(tally);
                tracing::info!(partitions = ?tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "revoked; un-flushed counts dropped");
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
        tally: Mutex::new(Tally::default()),
        store: config.store.clone(),
    });
    let consumer: StreamConsumer<AggregatorContext> = config
        .kafka
        .client_config(&[
            ("group.id", AGGREGATE_GROUP),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("session.timeout.ms", "45000"),
            ("heartbeat.interval.ms", "3000"),
        ])
        .create_with_context(AggregatorContext {
            shared: Arc::clone(&shared),
        })?;
    consumer.subscribe(&[EVENTS_TOPIC])?;
    let mut flusher = Flusher {
        shared: &shared,
        consumer: &consumer,
        stats: &stats,
        failures: 0,
    };
    let next_flush = tokio::time::sleep(config.flush_interval);
    tokio::pin!(next_flush);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = &mut next_flush => {
                let wait = if flusher.flush().await { config.flush_interval } else { flusher.backoff() };
                next_flush.as_mut().reset(Instant::now() + wait);
            }
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    let country = country_of(m.key(), m.payload());
                    let source = source_of(m.headers());
                    if shared.tally().record(m.partition(), m.offset(), country, source)
                        == Recorded::DuplicateSource
                    {
                        stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => tracing::warn!(%e, "consume error"),
            },
        }
    }
    // Best effort: what is not flushed now is re-read by the next owner.
    flusher.flush().await;
    // Leaving the group blocks on a broker round trip: keep it off the async workers.
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    Ok(())
}

/// The raw partition and offset an event was made from, if its headers say so.
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

struct Flusher<'a> {
    shared: &'a Shared,
    consumer: &'a StreamConsumer<AggregatorContext>,
    stats: &'a AggregateStats,
    failures: u32,
}

impl Flusher<'_> {
    fn backoff(&self) -> Duration {
        Duration::from_millis(250u64 << self.failures.min(7)).min(Duration::from_secs(30))
    }

    /// One flush; true when the counts are durable (or there was nothing to write).
    async fn flush(&mut self) -> bool {
        // A conflict leaves the other partitions' counts in place: flush those right away.
        for _ in 0..3 {
            let pending = self
                .shared
                .tally()
                .take_pending(AGGREGATE_GROUP, EVENTS_TOPIC);
            if pending.batch.offsets.is_empty() {
                return true;
            }
            match self.shared.store.flush(&pending.batch).await {
                Ok(FlushOutcome::Committed) => {
                    self.committed(&pending);
                    return true;
                }
                Ok(FlushOutcome::Conflict(partitions)) => {
                    self.shared.tally().restore(pending);
                    self.resync(&partitions).await;
                }
                Err(err) => {
                    self.failed(pending, &err);
                    return false;
                }
            }
        }
        false
    }

    fn committed(&mut self, pending: &Pending) {
        self.shared.tally().committed(pending);
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

    fn failed(&mut self, pending: Pending, err: &StoreError) {
        self.shared.tally().restore(pending);
        self.failures += 1;
        self.stats.failed_flushes.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%err, attempt = self.failures, retry_in = ?self.backoff(), "flush failed; counts kept in memory");
    }

    /// Another owner moved these partitions' offsets: forget our counts and continue from the
    /// stored offsets.
    async fn resync(&self, partitions: &[i32]) {
        tracing::warn!(
            ?partitions,
            "stored offsets moved by another aggregator; re-reading"
        );
        // Without the stored positions the partitions cannot be resumed safely: wait for them.
        let mut delay = Duration::from_millis(100);
        let stored = loop {
            match self
                .shared
                .store
                .load_positions(AGGREGATE_GROUP, EVENTS_TOPIC)
                .await
            {
                Ok(s) => break s,
                Err(err) => {
                    tracing::warn!(%err, retry_in = ?delay, "cannot re-read stored offsets");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        for &p in partitions {
            let offset = stored.offset(p);
            self.shared.tally().reset(p, offset, stored.watermarks(p));
            if self.shared.tally().owns(p) {
                let to = offset.map_or(Offset::Beginning, Offset::Offset);
                let seek = blocking(|| {
                    self.consumer
                        .seek(EVENTS_TOPIC, p, to, Duration::from_secs(5))
                });
                if let Err(e) = seek {
                    // Without the seek, later messages would be counted over a gap: stop
                    // counting the partition until the next rebalance instead.
                    tracing::warn!(partition = p, %e, "seek failed; partition paused until the next rebalance");
                    self.shared.tally().revoke(p);
                }
            }
        }
    }
}
