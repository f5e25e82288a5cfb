//! Preprocess stage: `raw-page-views` → parse, enrich → `page-views` (keyed by country) or
//! `raw-page-views-dead-letter` (with the reason).
//!
//! At-least-once, as in rust-rdkafka's `at_least_once` example: offsets are auto-committed,
//! but an offset is *stored* for commit only after every message produced for the lines before
//! it was acknowledged by the broker (idempotent producer). Each event carries its raw
//! partition/offset (`source`, inside the event: a header would be two more rows per event in
//! the SQLite broker storage) so a replay after a crash is recognisable downstream; dead
//! letters carry them in headers.
//!
//! Ordering matters for that (see [`crate::positions::tally`]): events of one raw partition
//! reach each events partition in raw-offset order. The idempotent producer keeps retries in
//! order and never times a message out; a delivery that fails anyway stops the preprocessor
//! rather than sending the event again out of order.

pub mod enrich;
pub mod geo;
pub mod useragent;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::event::{Source, headers};
use crate::format::{FormatCache, LogFormat, ParseError};
use crate::kafka::{
    ClientRole, DEAD_LETTER_TOPIC, EVENTS_TOPIC, KafkaSettings, PREPROCESS_GROUP, RAW_TOPIC,
};
use enrich::Enricher;

/// Lines handled per batch: offsets are stored once per batch, after its acknowledgements.
const MAX_BATCH: usize = 5_000;
/// Batches sent and not yet acknowledged. A preprocessor that waited for each batch's
/// acknowledgements before it read the next was bound by the broker's round trip rather than
/// by its work: 25k lines/s on the SQLite broker storage whatever the broker's speed (5,000
/// lines per ~200 ms round trip). Offsets are still stored in order, a batch only once it and
/// every batch before it are acknowledged.
const MAX_PENDING_BATCHES: usize = 4;
/// How long a batch waits to fill before it is processed anyway.
const BATCH_WAIT: Duration = Duration::from_millis(20);

/// Settings of one preprocessor.
#[derive(Clone)]
pub struct PreprocessConfig {
    pub kafka: KafkaSettings,
    pub enricher: Arc<Enricher>,
}

/// Running totals for logs, summaries and tests, shared by the preprocessors of a process.
#[derive(Debug, Default)]
pub struct PreprocessStats {
    /// Raw lines read from Kafka (lines read again after a rebalance count again).
    pub lines: AtomicU64,
    /// Events produced to `page-views` (replays count again).
    pub events: AtomicU64,
    /// Distinct lines sent to the dead-letter topic: a line dead-lettered again by the next
    /// owner of its partition after a rebalance counts once (see [`PreprocessStats::dead_letter`]).
    pub dead_letters: AtomicU64,
    /// Raw lines that the broker deleted (retention) before this group read them.
    pub lost: AtomicU64,
    /// Per raw partition, the highest offset dead-lettered.
    dead_lettered_up_to: std::sync::Mutex<HashMap<i32, i64>>,
}

impl PreprocessStats {
    /// Counts a dead letter of raw line `partition`/`offset` unless it was counted before.
    ///
    /// A line seen for the first time is above every offset of its partition handled so far:
    /// a preprocessor reads a partition in order from where it starts, and it starts at a
    /// committed offset, below which every line was handled (and acknowledged) before. So a
    /// dead letter at or below the partition's highest counted one is a replay. This keeps
    /// the count exact when several preprocessors of one process share the raw partitions and
    /// hand them over (the demo's drain check relies on it).
    pub fn dead_letter(&self, partition: i32, offset: i64) {
        let Ok(mut seen) = self.dead_lettered_up_to.lock() else {
            return;
        };
        let highest = seen.entry(partition).or_insert(-1);
        if offset > *highest {
            *highest = offset;
            self.dead_letters.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The producer gave up on a message (a fatal idempotence error: messages never time out).
    /// Producing it again would put it after later events and break the ordering the
    /// aggregator's replay detection relies on, so the preprocessor stops instead; its raw
    /// offsets were not committed, and a restarted preprocessor reads the lines again.
    #[error(
        "an event could not be delivered ({0}); stopping so that the lines are re-read in order after a restart"
    )]
    Delivery(KafkaError),
}

/// Logs partition assignments, so an operator (and the chaos test) can see rebalances, and
/// notes where each assigned partition goes on from (its committed offset), so that the loop
/// can tell when the broker no longer had that position.
#[derive(Default)]
struct LoggingContext {
    assigned: crate::kafka::Assigned,
}

impl rdkafka::client::ClientContext for LoggingContext {}

impl rdkafka::consumer::ConsumerContext for LoggingContext {
    fn post_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        use rdkafka::consumer::Rebalance;
        let partitions = |tpl: &TopicPartitionList| -> Vec<i32> {
            tpl.elements().iter().map(|e| e.partition()).collect()
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = ?partitions(tpl), "assigned");
                // A broker round trip, once per assignment; unknown if it fails (then no loss
                // can be told for the partition's first message).
                let committed = consumer
                    .committed_offsets((*tpl).clone(), Duration::from_secs(5))
                    .ok();
                for p in partitions(tpl) {
                    let at = committed.as_ref().and_then(|c| {
                        match c.find_partition(RAW_TOPIC, p).map(|e| e.offset()) {
                            Some(rdkafka::Offset::Offset(n)) => Some(n),
                            _ => None,
                        }
                    });
                    self.assigned.assign(p, at);
                }
            }
            Rebalance::Revoke(tpl) => tracing::info!(partitions = ?partitions(tpl), "revoked"),
            Rebalance::Error(e) => tracing::warn!(%e, "rebalance error"),
        }
    }
}

/// Runs one preprocessor until `shutdown`.
pub async fn run(
    config: PreprocessConfig,
    stats: Arc<PreprocessStats>,
    shutdown: CancellationToken,
) -> Result<(), PreprocessError> {
    let consumer: StreamConsumer<LoggingContext> = config
        .kafka
        .client_config(
            ClientRole::Consumer,
            &[
                ("group.id", PREPROCESS_GROUP),
                ("enable.auto.commit", "true"),
                ("auto.commit.interval.ms", "1000"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                crate::kafka::SESSION[0],
                crate::kafka::SESSION[1],
                crate::kafka::PREFETCH,
                crate::kafka::FETCH_QUEUE_BACKOFF,
            ],
        )
        .create_with_context(LoggingContext::default())?;
    let producer: ThreadedProducer<AckContext> = config
        .kafka
        .client_config(
            ClientRole::Producer,
            &[
                ("enable.idempotence", "true"),
                // Never give up on an event (0 = no timeout): a broker that is down only delays
                // the batch, and the idempotent producer keeps every retry in order.
                ("message.timeout.ms", "0"),
                // Events are keyed by country, so one produce request carries a small batch
                // per partition, and the broker writes each batch in a transaction of its own:
                // 50 ms gathers about ten times more events per transaction than 5 ms at full
                // speed (measured on the SQLite broker storage; see the README's benchmarks),
                // for 45 ms more latency, far below the aggregator's flush interval.
                ("linger.ms", "50"),
                crate::kafka::COMPRESSION,
                ("batch.num.messages", "10000"),
                ("queue.buffering.max.messages", "200000"),
            ],
        )
        .create_with_context(AckContext::default())?;
    let settled = &producer.context().settled;
    consumer.subscribe(&[RAW_TOPIC])?;
    // A line without a `pv-format` header is COMBINED.
    let mut formats = FormatCache::new(LogFormat::combined());
    let mut batch: Vec<BorrowedMessage<'_>> = Vec::with_capacity(MAX_BATCH);
    let mut pending: VecDeque<Pending> = VecDeque::with_capacity(MAX_PENDING_BATCHES + 1);
    let mut gaps = crate::kafka::Gaps::default();
    // The batch's gaps: raw lines deleted before they were read.
    let mut lost: Vec<Lost> = Vec::new();
    let mut result = Ok(());
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // While waiting for lines, the oldest batch's acknowledgements (cancel-safe: they
            // are counted in the batch's `BatchAcks`, not in the wait).
            outcome = settle(pending.front(), settled), if !pending.is_empty() => {
                match outcome {
                    Ok(()) => {
                        if let Some(done) = pending.pop_front() {
                            store_offsets(&consumer, done.next_offsets);
                        }
                        continue;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            m = consumer.recv() => m,
        };
        match first {
            Ok(m) => {
                lost.extend(lost_before(&consumer, &mut gaps, &stats, &m));
                batch.push(m);
            }
            Err(e) => {
                tracing::warn!(%e, "consume error");
                continue;
            }
        }
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => {
                    lost.extend(lost_before(&consumer, &mut gaps, &stats, &m));
                    batch.push(m);
                }
                Ok(Err(e)) => tracing::warn!(%e, "consume error"),
                Err(_) => break,
            }
        }
        match send_batch(
            &config.enricher,
            &mut formats,
            &producer,
            &stats,
            &batch,
            &lost,
        )
        .await
        {
            Ok(sent) => pending.push_back(sent),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
        batch.clear();
        lost.clear();
        while pending.len() > MAX_PENDING_BATCHES {
            if let Err(e) = settle(pending.front(), settled).await {
                result = Err(e);
                break;
            }
            if let Some(done) = pending.pop_front() {
                store_offsets(&consumer, done.next_offsets);
            }
        }
        if result.is_err() {
            break;
        }
    }
    drop(batch);
    if result.is_ok() {
        // Store what was acknowledged, waiting a little for what is still in flight; the rest
        // is read again by the partitions' next owner (and dropped as replays downstream).
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while !pending.is_empty() {
                if settle(pending.front(), settled).await.is_err() {
                    break;
                }
                if let Some(done) = pending.pop_front() {
                    store_offsets(&consumer, done.next_offsets);
                }
            }
        })
        .await;
    }
    drop(pending);
    if result.is_err() {
        // Leave without committing more: the failed batch's lines must be read again.
        let _ = tokio::task::spawn_blocking(move || drop((consumer, producer))).await;
        return result;
    }
    // Commit what is stored and leave the group. These calls block on broker round trips, so
    // they run off the async workers (which may be serving an in-process broker).
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
            tracing::debug!(%e, "final commit failed");
        }
        drop(consumer);
        drop(producer);
    })
    .await;
    Ok(())
}

/// Raw lines of a partition that the broker deleted before this group read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lost {
    partition: i32,
    /// The first offset lost.
    from: i64,
    lines: u64,
}

/// Reports the raw lines lost before `m`: its partition's position was no longer on the
/// broker (deleted by its retention while this group was down or behind), and reading went on
/// from the log start. One ERROR line with how many, counted in [`PreprocessStats::lost`]; the
/// caller sends a dead letter for them with the batch, so that `/metrics` counts them too.
fn lost_before(
    consumer: &StreamConsumer<LoggingContext>,
    gaps: &mut crate::kafka::Gaps,
    stats: &PreprocessStats,
    m: &BorrowedMessage<'_>,
) -> Option<Lost> {
    if let Some(at) = consumer.context().assigned.take(m.partition()) {
        gaps.expect(m.partition(), at);
    }
    let (from, lines) = gaps.seen(m.partition(), m.offset())?;
    stats.lost.fetch_add(lines, Ordering::Relaxed);
    tracing::error!(
        topic = m.topic(),
        partition = m.partition(),
        from,
        to = m.offset(),
        lost = lines,
        "{lines} raw lines of {} partition {} were deleted by the broker's retention before this group read them; going on from offset {}",
        m.topic(),
        m.partition(),
        m.offset()
    );
    Some(Lost {
        partition: m.partition(),
        from,
        lines,
    })
}

/// The dead letter that stands for `lost` lines: no payload; the reason, how many, and where
/// the gap starts in headers.
fn lost_record(
    lost: &Lost,
    acks: Arc<BatchAcks>,
) -> BaseRecord<'static, [u8], [u8], Arc<BatchAcks>> {
    let reason = format!(
        "deleted by the broker's retention before it was read: {} lines from offset {}",
        lost.lines, lost.from
    );
    BaseRecord::with_opaque_to(DEAD_LETTER_TOPIC, acks)
        .payload(&[][..])
        .headers(
            OwnedHeaders::new_with_capacity(4)
                .insert(Header {
                    key: headers::SOURCE_PARTITION,
                    value: Some(&lost.partition.to_string()),
                })
                .insert(Header {
                    key: headers::SOURCE_OFFSET,
                    value: Some(&lost.from.to_string()),
                })
                .insert(Header {
                    key: headers::REASON,
                    value: Some(&reason),
                })
                .insert(Header {
                    key: headers::LOST,
                    value: Some(&lost.lines.to_string()),
                }),
        )
}

/// A batch sent: its acknowledgements still to come, and per raw partition the next offset to
/// store once they have all arrived.
struct Pending {
    acks: Arc<BatchAcks>,
    next_offsets: HashMap<i32, i64>,
}

/// The acknowledgements of one batch, counted by the producer's delivery callback. One shared
/// counter per batch rather than a future per event: a `FutureProducer` allocates a channel and
/// a box for every message and wakes a task for every acknowledgement, per-message overhead on
/// the preprocessor's one task (issue 7's profile of the in-memory demo).
#[derive(Default)]
struct BatchAcks {
    /// Events sent and not yet acknowledged.
    remaining: AtomicUsize,
    /// The first delivery failure, if any.
    failed: OnceLock<KafkaError>,
}

/// The producer's context: counts each delivery against its batch, and wakes the preprocessor
/// when a batch is settled (or failed).
#[derive(Default)]
struct AckContext {
    settled: Notify,
}

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Arc<BatchAcks>;

    fn delivery(&self, result: &DeliveryResult<'_>, acks: Arc<BatchAcks>) {
        let failed = match result {
            Ok(_) => false,
            Err((e, _)) => {
                let _ = acks.failed.set(e.clone());
                true
            }
        };
        if acks.remaining.fetch_sub(1, Ordering::AcqRel) == 1 || failed {
            // A permit is stored when nobody waits, so a wake-up between the waiter's check
            // and its wait is not lost.
            self.settled.notify_one();
        }
    }
}

/// Waits until every event of `pending` is acknowledged (cancel-safe: the state lives in the
/// counters). A failure is fatal (see [`PreprocessError::Delivery`]).
async fn settle(pending: Option<&Pending>, settled: &Notify) -> Result<(), PreprocessError> {
    let Some(pending) = pending else {
        return Ok(());
    };
    loop {
        if let Some(e) = pending.acks.failed.get() {
            return Err(PreprocessError::Delivery(e.clone()));
        }
        if pending.acks.remaining.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        settled.notified().await;
    }
}

/// Stores the next offsets of an acknowledged batch, for the next auto-commit.
fn store_offsets<C: Consumer<LoggingContext>>(consumer: &C, next_offsets: HashMap<i32, i64>) {
    let mut tpl = TopicPartitionList::new();
    for (partition, next) in next_offsets {
        let _ = tpl.add_partition_offset(RAW_TOPIC, partition, Offset::Offset(next));
    }
    // Fails for partitions revoked meanwhile; their new owner re-reads those lines and the
    // aggregator recognises the replayed events by their `source`.
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::debug!(%e, "storing offsets failed (partition revoked?)");
    }
}

/// Enriches and produces a batch without waiting for its acknowledgements.
async fn send_batch(
    enricher: &Enricher,
    formats: &mut FormatCache,
    producer: &ThreadedProducer<AckContext>,
    stats: &PreprocessStats,
    batch: &[BorrowedMessage<'_>],
    lost: &[Lost],
) -> Result<Pending, PreprocessError> {
    let acks = Arc::new(BatchAcks::default());
    let mut next_offsets = HashMap::new();
    // Acknowledged with the batch, so the offsets past the gap are committed only once the
    // dead letter that reports it is written (a crash before finds the gap again).
    for l in lost {
        acks.remaining.fetch_add(1, Ordering::AcqRel);
        send(producer, lost_record(l, acks.clone())).await?;
    }
    // One event buffer for the batch: the producer copies each payload.
    let mut json = Vec::with_capacity(512);
    for m in batch {
        let raw = m.payload().unwrap_or(&[]);
        let truncated = m.headers().and_then(|h| header(h, headers::TRUNCATED));
        let result = match truncated.and_then(|t| std::str::from_utf8(t).ok()?.parse().ok()) {
            Some(original_len) => Err(ParseError::TooLong(original_len).to_string()),
            None => formats
                .get(m.headers().and_then(|h| header(h, headers::FORMAT)))
                .and_then(|format| {
                    let source = Source {
                        partition: m.partition(),
                        offset: m.offset(),
                    };
                    enricher
                        .enrich_into(raw, &format, Some(source), &mut json)
                        .map_err(|e| format!("{}: {e}", format.name()))
                }),
        };
        let record = match &result {
            Ok(country) => BaseRecord::with_opaque_to(EVENTS_TOPIC, acks.clone())
                .key(country.as_str().as_bytes())
                .payload(json.as_slice()),
            Err(reason) => {
                tracing::debug!(partition = m.partition(), offset = m.offset(), %reason, "dead letter");
                let (partition, offset) = (m.partition().to_string(), m.offset().to_string());
                BaseRecord::with_opaque_to(DEAD_LETTER_TOPIC, acks.clone())
                    .payload(raw)
                    .headers(
                        OwnedHeaders::new_with_capacity(3)
                            .insert(Header {
                                key: headers::SOURCE_PARTITION,
                                value: Some(&partition),
                            })
                            .insert(Header {
                                key: headers::SOURCE_OFFSET,
                                value: Some(&offset),
                            })
                            .insert(Header {
                                key: headers::REASON,
                                value: Some(reason),
                            }),
                    )
            }
        };
        acks.remaining.fetch_add(1, Ordering::AcqRel);
        send(producer, record).await?;
        if result.is_ok() {
            stats.events.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.dead_letter(m.partition(), m.offset());
        }
        stats.lines.fetch_add(1, Ordering::Relaxed);
        next_offsets.insert(m.partition(), m.offset() + 1);
    }
    Ok(Pending { acks, next_offsets })
}

/// Enqueues a record; when the producer queue is full, waits a little for room.
async fn send(
    producer: &ThreadedProducer<AckContext>,
    mut record: BaseRecord<'_, [u8], [u8], Arc<BatchAcks>>,
) -> Result<(), PreprocessError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(PreprocessError::Delivery(e)),
        }
    }
}

/// The value of header `key`, if present.
pub fn header<'a, H: Headers>(h: &'a H, key: &str) -> Option<&'a [u8]> {
    (0..h.count()).find_map(|i| h.try_get(i).filter(|x| x.key == key).and_then(|x| x.value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_read_again_counts_once() {
        let stats = PreprocessStats::default();
        // One owner reads partition 0 from 0; its successor starts again at committed 3 while
        // the first still finishes its batch; partition 1 is independent.
        for (partition, offset) in [
            (0, 2),
            (0, 5),
            (1, 5),
            (0, 3),
            (0, 5),
            (0, 9),
            (0, 7),
            (1, 6),
        ] {
            stats.dead_letter(partition, offset);
        }
        assert_eq!(stats.dead_letters.load(Ordering::Relaxed), 5);
    }
}
