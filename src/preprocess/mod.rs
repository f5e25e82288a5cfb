//! Preprocess stage: `raw-page-views` → parse, enrich → `page-views` (keyed by country) or
//! `raw-page-views-dead-letter` (with the reason).
//!
//! At-least-once, as in rust-rdkafka's `at_least_once` example: offsets are auto-committed,
//! but an offset is *stored* for commit only after every message produced for the lines before
//! it was acknowledged by the broker (idempotent producer). Each event carries its raw
//! partition/offset in headers so a replay after a crash is recognisable downstream.

pub mod enrich;
pub mod geo;
pub mod parse;
pub mod useragent;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::event::headers;
use crate::kafka::{DEAD_LETTER_TOPIC, EVENTS_TOPIC, KafkaSettings, PREPROCESS_GROUP, RAW_TOPIC};
use enrich::Enricher;
use parse::ParseError;

/// Lines handled per batch: offsets are stored once per batch, after its acknowledgements.
const MAX_BATCH: usize = 5_000;
/// How long a batch waits to fill before it is processed anyway.
const BATCH_WAIT: Duration = Duration::from_millis(20);

/// Settings of one preprocessor.
#[derive(Clone)]
pub struct PreprocessConfig {
    pub kafka: KafkaSettings,
    pub enricher: Arc<Enricher>,
}

/// Running totals for logs, summaries and tests.
#[derive(Debug, Default)]
pub struct PreprocessStats {
    /// Raw lines read from Kafka.
    pub lines: AtomicU64,
    /// Events produced to `page-views`.
    pub events: AtomicU64,
    /// Lines sent to the dead-letter topic.
    pub dead_letters: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// Runs one preprocessor until `shutdown`.
pub async fn run(
    config: PreprocessConfig,
    stats: Arc<PreprocessStats>,
    shutdown: CancellationToken,
) -> Result<(), PreprocessError> {
    let consumer: StreamConsumer = config
        .kafka
        .client_config(&[
            ("group.id", PREPROCESS_GROUP),
            ("enable.auto.commit", "true"),
            ("auto.commit.interval.ms", "1000"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("session.timeout.ms", "45000"),
            ("heartbeat.interval.ms", "3000"),
        ])
        .create()?;
    let producer: FutureProducer = config
        .kafka
        .client_config(&[
            ("enable.idempotence", "true"),
            ("linger.ms", "5"),
            ("batch.num.messages", "10000"),
            ("queue.buffering.max.messages", "200000"),
        ])
        .create()?;
    consumer.subscribe(&[RAW_TOPIC])?;
    let mut batch: Vec<BorrowedMessage<'_>> = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            m = consumer.recv() => m,
        };
        match first {
            Ok(m) => batch.push(m),
            Err(e) => {
                tracing::warn!(%e, "consume error");
                continue;
            }
        }
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m),
                Ok(Err(e)) => tracing::warn!(%e, "consume error"),
                Err(_) => break,
            }
        }
        let next_offsets = process_batch(&config.enricher, &producer, &stats, &batch).await;
        batch.clear();
        let mut tpl = TopicPartitionList::new();
        for (partition, next) in next_offsets {
            let _ = tpl.add_partition_offset(RAW_TOPIC, partition, Offset::Offset(next));
        }
        // Fails for partitions revoked meanwhile; their new owner re-reads those lines and
        // the aggregator recognises the replayed events by their source headers.
        if let Err(e) = consumer.store_offsets(&tpl) {
            tracing::debug!(%e, "storing offsets failed (partition revoked?)");
        }
    }
    drop(batch);
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

/// Enriches and produces a batch; returns, per partition, the next offset to commit. Returns
/// only when every produced message is acknowledged.
async fn process_batch(
    enricher: &Enricher,
    producer: &FutureProducer,
    stats: &PreprocessStats,
    batch: &[BorrowedMessage<'_>],
) -> HashMap<i32, i64> {
    let mut in_flight: VecDeque<DeliveryFuture> = VecDeque::with_capacity(batch.len());
    let mut next_offsets = HashMap::new();
    for m in batch {
        let raw = m.payload().unwrap_or(&[]);
        let truncated = m.headers().and_then(|h| header(h, headers::TRUNCATED));
        let result = match truncated.and_then(|t| std::str::from_utf8(t).ok()?.parse().ok()) {
            Some(original_len) => Err(ParseError::TooLong(original_len)),
            None => enricher.enrich(raw),
        };
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        let source = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: headers::SOURCE_PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: headers::SOURCE_OFFSET,
                value: Some(&offset),
            });
        let record = match &result {
            Ok(event) => FutureRecord::to(EVENTS_TOPIC)
                .key(event.country.as_str().as_bytes())
                .payload(event.json.as_slice())
                .headers(source),
            Err(reason) => {
                let reason = reason.to_string();
                tracing::debug!(partition = m.partition(), offset = m.offset(), %reason, "dead letter");
                FutureRecord::to(DEAD_LETTER_TOPIC)
                    .payload(raw)
                    .headers(source.insert(Header {
                        key: headers::REASON,
                        value: Some(&reason),
                    }))
            }
        };
        let delivery = send(producer, record, &mut in_flight).await;
        in_flight.push_back(delivery);
        let counter = if result.is_ok() {
            &stats.events
        } else {
            &stats.dead_letters
        };
        counter.fetch_add(1, Ordering::Relaxed);
        stats.lines.fetch_add(1, Ordering::Relaxed);
        next_offsets.insert(m.partition(), m.offset() + 1);
    }
    for delivery in in_flight {
        await_delivery(producer, delivery).await;
    }
    next_offsets
}

/// Enqueues a record; when the producer queue is full, waits for the oldest delivery first.
async fn send(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, [u8], [u8]>,
    in_flight: &mut VecDeque<DeliveryFuture>,
) -> DeliveryFuture {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return delivery,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                match in_flight.pop_front() {
                    Some(oldest) => await_delivery(producer, oldest).await,
                    None => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
            Err((e, r)) => {
                tracing::warn!(%e, "produce failed; retrying");
                record = r;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Waits for an acknowledgement; a failed delivery is produced again until it succeeds, so
/// the batch's offsets are never stored over a lost message.
async fn await_delivery(producer: &FutureProducer, delivery: DeliveryFuture) {
    let mut failed: OwnedMessage = match delivery.await {
        Ok(Ok(_)) => return,
        Ok(Err((e, msg))) => {
            tracing::warn!(%e, "delivery failed; producing again");
            msg
        }
        Err(_) => {
            tracing::error!(
                "producer dropped a delivery report; the line will be re-read after a restart"
            );
            return;
        }
    };
    loop {
        let mut record = FutureRecord::to(failed.topic());
        if let Some(k) = failed.key() {
            record = record.key(k);
        }
        if let Some(p) = failed.payload() {
            record = record.payload(p);
        }
        if let Some(h) = failed.headers() {
            record = record.headers(h.clone());
        }
        match producer.send(record, Timeout::Never).await {
            Ok(_) => return,
            Err((e, msg)) => {
                tracing::warn!(%e, "delivery failed again; retrying in 1 s");
                failed = msg;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The value of header `key`, if present.
pub fn header<'a, H: Headers>(h: &'a H, key: &str) -> Option<&'a [u8]> {
    (0..h.count()).find_map(|i| h.try_get(i).filter(|x| x.key == key).and_then(|x| x.value))
}
