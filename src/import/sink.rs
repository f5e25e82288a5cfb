//! Where imported lines go: an idempotent producer to `raw-page-views` that counts its
//! acknowledgements (for checkpoints and progress) and keeps an optional rate limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
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
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
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
        })
    }

    /// Produces one line (already cut to size; `original_len` is its real length) of the
    /// format whose header value is `format` (`None`: unmarked, COMBINED). Returns false once
    /// shutdown was requested.
    pub fn send(&mut self, line: &[u8], original_len: usize, format: Option<&[u8]>) -> bool {
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
        let mut record = BaseRecord::<(), [u8]>::to(RAW_TOPIC).payload(line);
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
