//! The embedded broker as a Kafka client sees it: what our fixes to tansu promise.

use std::time::Duration;

use pageviews::broker::{BrokerStorage, EmbeddedBroker};
use pageviews::kafka::{ClientRole, KafkaSettings, RAW_TOPIC};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// An embedded broker on `storage` with our topics, one partition each.
async fn broker_with_topics(
    storage: BrokerStorage,
    dir: &std::path::Path,
) -> (EmbeddedBroker, KafkaSettings) {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), storage, dir)
        .await
        .unwrap();
    let kafka = KafkaSettings::new(broker.bootstrap());
    kafka
        .wait_until_reachable(Duration::from_secs(20))
        .await
        .unwrap();
    kafka.create_topics(1).await.unwrap();
    (broker, kafka)
}

/// After 5,000 messages produced in many record batches, the partition's high watermark (what
/// `ListOffsets` answers for the latest offset) is 5,000 on both storages. tansu 0.6.0's
/// in-memory storage answered the base offset of the last written batch plus one (see
/// vendor/tansu-storage/PATCHED.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_watermarks_count_every_message() {
    for storage in [BrokerStorage::Memory, BrokerStorage::Sqlite] {
        let dir = tempfile::tempdir().unwrap();
        let (broker, kafka) = broker_with_topics(storage, dir.path()).await;
        let (high, batches) = tokio::task::spawn_blocking(move || {
            let producer: BaseProducer = kafka
                .client_config(
                    ClientRole::Producer,
                    &[("linger.ms", "20"), ("batch.num.messages", "300")],
                )
                .create()
                .unwrap();
            let mut batches = 0;
            for round in 0..10 {
                for i in 0..500 {
                    let payload = format!("line {round}-{i}");
                    producer
                        .send(BaseRecord::<(), str>::to(RAW_TOPIC).payload(&payload))
                        .unwrap();
                }
                producer.flush(Duration::from_secs(30)).unwrap();
                batches += 1;
            }
            let consumer: BaseConsumer = kafka
                .client_config(ClientRole::Consumer, &[("group.id", "watermark-test")])
                .create()
                .unwrap();
            let (low, high) = consumer
                .fetch_watermarks(RAW_TOPIC, 0, Duration::from_secs(10))
                .unwrap();
            assert_eq!(low, 0, "{storage:?}");
            (high, batches)
        })
        .await
        .unwrap();
        assert!(batches >= 10);
        assert_eq!(
            high, 5_000,
            "{storage:?}: high watermark after 5,000 messages"
        );
        broker.stop();
    }
}

/// A consumer waiting on an empty partition gets a message about as soon as it is produced,
/// not after the fetch's maximum wait: ten produce-then-consume round trips with
/// `fetch.wait.max.ms=10000` each take a small part of that wait. tansu 0.6.0 slept half of
/// the remaining wait after every storage read, data or not (see
/// vendor/tansu-storage/PATCHED.md), so a round trip here took seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_answers_when_data_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, kafka) = broker_with_topics(BrokerStorage::Memory, dir.path()).await;
    let slowest = tokio::task::spawn_blocking(move || {
        use rdkafka::Message;
        let producer: BaseProducer = kafka
            .client_config(ClientRole::Producer, &[("linger.ms", "0")])
            .create()
            .unwrap();
        let consumer: BaseConsumer = kafka
            .client_config(
                ClientRole::Consumer,
                &[
                    ("group.id", "fetch-wait-test"),
                    ("auto.offset.reset", "earliest"),
                    ("fetch.wait.max.ms", "10000"),
                ],
            )
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(RAW_TOPIC, 0, rdkafka::Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let mut slowest = Duration::ZERO;
        for round in 0..10 {
            // Let the consumer settle into a waiting fetch on the empty log end.
            std::thread::sleep(Duration::from_millis(300));
            let _ = consumer.poll(Duration::ZERO);
            let payload = format!("round {round}");
            let sent = std::time::Instant::now();
            producer
                .send(BaseRecord::<(), str>::to(RAW_TOPIC).payload(&payload))
                .unwrap();
            producer.flush(Duration::from_secs(10)).unwrap();
            loop {
                match consumer.poll(Duration::from_secs(20)) {
                    Some(Ok(m)) if m.payload() == Some(payload.as_bytes()) => break,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => panic!("consume error: {e}"),
                    None => panic!("round {round}: nothing within 20 s"),
                }
            }
            slowest = slowest.max(sent.elapsed());
        }
        slowest
    })
    .await
    .unwrap();
    eprintln!("slowest produce-to-consume round trip: {slowest:?}");
    assert!(
        slowest < Duration::from_millis(2500),
        "a round trip took {slowest:?}: fetches wait out their maximum wait"
    );
    broker.stop();
}
