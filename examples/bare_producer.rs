//! The baseline of the import benchmark (`bench/run.py`): a bare rdkafka producer with
//! librdkafka's default settings, sending every line of a file as one message to a topic, with
//! nothing of pageviews in between (no checkpoints, no line assembly, no rate limit).
//!
//! Usage: `bare_producer BROKERS TOPIC FILE`. Prints `bare producer: N lines in S s = R lines/s`
//! once every message is acknowledged; exits 1 if any was not.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;

/// Counts acknowledgements, so that the rate is of delivered lines.
#[derive(Default)]
struct Acks {
    delivered: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [brokers, topic, file] = args.as_slice() else {
        bail!("usage: bare_producer BROKERS TOPIC FILE");
    };
    let producer: ThreadedProducer<Acks> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create_with_context(Acks::default())
        .context("cannot create the producer")?;
    let input = File::open(file).with_context(|| format!("cannot open {file}"))?;
    let started = Instant::now();
    let mut sent = 0u64;
    for line in BufReader::with_capacity(1 << 20, input).split(b'\n') {
        let line = line.with_context(|| format!("cannot read {file}"))?;
        let mut record = BaseRecord::<(), [u8]>::to(topic).payload(&line);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("cannot send: {e}"),
            }
        }
        sent += 1;
    }
    producer
        .flush(Timeout::Never)
        .context("cannot flush the producer")?;
    let secs = started.elapsed().as_secs_f64();
    let acks = producer.context();
    let failed = acks.failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} of {sent} lines were not delivered");
    }
    let delivered = acks.delivered.load(Ordering::Relaxed);
    println!(
        "bare producer: {delivered} lines in {secs:.2} s = {:.0} lines/s",
        delivered as f64 / secs
    );
    Ok(())
}
