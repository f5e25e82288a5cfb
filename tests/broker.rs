//! The embedded broker as a Kafka client sees it: what our fixes to tansu promise.

use std::time::Duration;

use pageviews::broker::{BrokerStorage, EmbeddedBroker};
use pageviews::kafka::{ClientRole, KafkaSettings, RAW_TOPIC};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// After 5,000 messages produced in many record batches, the partition's high watermark (what
/// `ListOffsets` answers for the latest offset) is 5,000 on both storages. tansu 0.6.0's
/// in-memory storage answered the base offset of the last written batch plus one (see
/// vendor/tansu-storage/PATCHED.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_watermarks_count_every_message() {
    for storage in [BrokerStorage::Memory, BrokerStorage::Sqlite] {
        let dir = tempfile::tempdir().unwrap();
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), storage, dir.path())
            .await
            .unwrap();
        let kafka = KafkaSettings::new(broker.bootstrap());
        kafka
            .wait_until_reachable(Duration::from_secs(20))
            .await
            .unwrap();
        kafka.create_topics(1).await.unwrap();
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
