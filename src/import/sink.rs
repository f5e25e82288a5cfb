//! Where imported lines go: an idempotent producer to `raw-page-views` that counts its
//! acknowledgements (for checkpoints and progress) and keeps an optional rate limit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::Message;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use super::{ImportError, ImportSummary};
use crate::event::headers;
use crate::kafka::{ClientRole, KafkaSettings, RAW_TOPIC};

/// Counts acknowledgements from librdkafka's delivery callbacks.
#[derive(Default)]
struct DeliveryCounter {
    delivered: AtomicU64,
    failed: AtomicU64,
    /// Why the first failed delivery failed (librdkafka's words), for the error message.
    first_failure: std::sync::Mutex<Option<String>>,
    /// Per partition, one past the highest offset acknowledged: once every line sent is
    /// acknowledged, no line sent later can lie below these (an import checkpoint's marks).
    next_offsets: std::sync::Mutex<BTreeMap<i32, i64>>,
}

impl DeliveryCounter {
    /// `Ok` when no delivery failed, else the count and the first reason.
    fn outcome(&self) -> Result<(), ImportError> {
        match self.failed.load(Ordering::Relaxed) {
            0 => Ok(()),
            count => Err(ImportError::Undelivered {
                count,
                reason: self
                    .first_failure
                    .lock()
                    .ok()
                    .and_then(|r| r.clone())
                    .unwrap_or_else(|| "unknown reason".to_owned()),
            }),
        }
    }
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                if let Ok(mut next) = self.next_offsets.lock() {
                    let at = next.entry(m.partition()).or_insert(0);
                    *at = (*at).max(m.offset() + 1);
                }
                self.delivered.fetch_add(1, Ordering::Relaxed)
            }
            Err((e, _)) => {
                if let Ok(mut first) = self.first_failure.lock()
                    && first.is_none()
                {
                    tracing::error!(%e, "a line could not be delivered to Kafka");
                    *first = Some(e.to_string());
                }
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Where lines are produced, with an optional rate limit; runs on a blocking thread.
pub struct LineSink {
    producer: ThreadedProducer<DeliveryCounter>,
    rate: Option<u64>,
    started: Instant,
    sent: u64,
    truncated: u64,
    shutdown: CancellationToken,
    /// Shared counter of acknowledged lines, for progress reports.
    pub acked: Arc<AtomicU64>,
    kafka: KafkaSettings,
    /// Raw partitions, learnt at the first keyed line.
    partitions: Option<i32>,
    /// The partition keyed lines go to now, how many went there, and since when.
    partition: i32,
    in_partition: u64,
    partition_since: Instant,
}

/// Keyed lines (checkpointed files) go to one partition for this many lines, then the next:
/// batches as large as the sticky partitioner makes for unkeyed lines, spread over every
/// partition.
const LINES_PER_PARTITION: u64 = 2048;

/// ... or for this long, whichever comes first: a followed log that grows slowly reaches
/// every partition within seconds (visits close on a watermark that waits for every raw
/// partition), as unkeyed lines do with the sticky partitioner's linger.
const PARTITION_LINGER: Duration = Duration::from_millis(50);

/// The key of a line from a checkpointed file: its import's stream id and the position just
/// after the line, so that a restart can tell which lines were already delivered.
pub fn line_key(stream: u64, end: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&stream.to_be_bytes());
    key[8..].copy_from_slice(&end.to_be_bytes());
    key
}

/// The (stream, end position) of a raw line's key, if it has one.
pub fn parse_line_key(key: &[u8]) -> Option<(u64, u64)> {
    let stream = u64::from_be_bytes(key.get(..8)?.try_into().ok()?);
    let end = u64::from_be_bytes(key.get(8..16)?.try_into().ok()?);
    (key.len() == 16).then_some((stream, end))
}

impl LineSink {
    pub fn new(
        kafka: &KafkaSettings,
        rate: Option<u64>,
        shutdown: CancellationToken,
    ) -> Result<LineSink, ImportError> {
        let producer = kafka
            .client_config(
                ClientRole::Producer,
                &[
                    ("enable.idempotence", "true"),
                    crate::kafka::COMPRESSION,
                    ("linger.ms", "5"),
                    ("batch.num.messages", "10000"),
                    ("queue.buffering.max.messages", "200000"),
                ],
            )
            .create_with_context(DeliveryCounter::default())?;
        Ok(LineSink {
            producer,
            rate: rate.filter(|r| *r > 0),
            started: Instant::now(),
            sent: 0,
            truncated: 0,
            shutdown,
            acked: Arc::new(AtomicU64::new(0)),
            kafka: kafka.clone(),
            partitions: None,
            partition: 0,
            in_partition: 0,
            partition_since: Instant::now(),
        })
    }

    /// Per partition, one past the highest offset acknowledged so far.
    pub fn next_offsets(&self) -> BTreeMap<i32, i64> {
        self.producer
            .context()
            .next_offsets
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default()
    }

    /// The high watermark of every raw partition, from the broker.
    pub fn high_watermarks(&mut self) -> Result<BTreeMap<i32, i64>, ImportError> {
        let partitions = self.partitions()?;
        let mut marks = BTreeMap::new();
        for p in 0..partitions {
            let (_, high) = self.producer.client().fetch_watermarks(
                RAW_TOPIC,
                p,
                Timeout::After(Duration::from_secs(30)),
            )?;
            marks.insert(p, high);
        }
        Ok(marks)
    }

    fn partitions(&mut self) -> Result<i32, ImportError> {
        if let Some(n) = self.partitions {
            return Ok(n);
        }
        let n = self
            .kafka
            .partition_count(RAW_TOPIC, Duration::from_secs(30))
            .filter(|n| *n > 0)
            .ok_or(ImportError::NoPartitions(RAW_TOPIC))?;
        self.partitions = Some(n);
        Ok(n)
    }

    /// Produces one line (already cut to size; `original_len` is its real length) of the
    /// format whose header value is `format` (`None`: unmarked, COMBINED). Returns false once
    /// shutdown was requested.
    pub fn send(&mut self, line: &[u8], original_len: usize, format: Option<&[u8]>) -> bool {
        self.send_keyed(line, original_len, format, None)
    }

    /// [`LineSink::send`] with a key ([`line_key`]): the line goes to a partition chosen here
    /// (see [`LINES_PER_PARTITION`], [`PARTITION_LINGER`]) rather than by the key's hash.
    pub fn send_keyed(
        &mut self,
        line: &[u8],
        original_len: usize,
        format: Option<&[u8]>,
        key: Option<&[u8; 16]>,
    ) -> bool {
        if self.shutdown.is_cancelled() {
            return false;
        }
        if let Some(rate) = self.rate {
            let due = self.started + Duration::from_secs_f64(self.sent as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let len_text = original_len.to_string();
        let mut record = BaseRecord::<[u8], [u8]>::to(RAW_TOPIC).payload(line);
        let truncated = original_len > line.len();
        if format.is_some() || truncated {
            let mut marks = OwnedHeaders::new_with_capacity(2);
            if let Some(format) = format {
                marks = marks.insert(Header {
                    key: headers::FORMAT,
                    value: Some(format),
                });
            }
            if truncated {
                self.truncated += 1;
                marks = marks.insert(Header {
                    key: headers::TRUNCATED,
                    value: Some(&len_text),
                });
            }
            record = record.headers(marks);
        }
        if let Some(key) = key {
            let partitions = match self.partitions() {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(%e, "cannot choose a partition");
                    return false;
                }
            };
            if self.in_partition >= LINES_PER_PARTITION
                || self.partition_since.elapsed() >= PARTITION_LINGER
            {
                self.partition = (self.partition + 1) % partitions.max(1);
                self.in_partition = 0;
                self.partition_since = Instant::now();
            }
            self.in_partition += 1;
            record = record.key(&key[..]).partition(self.partition);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((e, r)) => {
                    tracing::warn!(%e, "produce failed; retrying");
                    record = r;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        self.sent += 1;
        if self.sent.is_multiple_of(1024) {
            self.acked.store(
                self.producer.context().delivered.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
        true
    }

    /// Waits until every line sent so far is acknowledged; an error if any was not.
    pub fn wait_delivered(&self) -> Result<(), ImportError> {
        let _ = self.producer.flush(Timeout::Never);
        self.producer.context().outcome()
    }

    /// Waits for every acknowledgement.
    pub fn finish(self) -> Result<ImportSummary, ImportError> {
        let _ = self.producer.flush(Timeout::Never);
        let ctx = self.producer.context();
        let lines = ctx.delivered.load(Ordering::Relaxed);
        self.acked.store(lines, Ordering::Relaxed);
        ctx.outcome()?;
        Ok(ImportSummary {
            lines,
            truncated: self.truncated,
            already_imported: 0,
            directives: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_keys_round_trip() {
        let key = line_key(0xDEAD_BEEF_0000_0001, 1 << 40);
        assert_eq!(parse_line_key(&key), Some((0xDEAD_BEEF_0000_0001, 1 << 40)));
        assert_eq!(parse_line_key(&key[..15]), None);
        assert_eq!(parse_line_key(b"sixteen bytes!!!x"), None);
    }
}
