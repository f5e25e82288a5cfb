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
    let kafka = with_topics(&broker).await;
    (broker, kafka)
}

/// Settings for `broker` once it answers, with our topics created (idempotent).
async fn with_topics(broker: &EmbeddedBroker) -> KafkaSettings {
    let kafka = KafkaSettings::new(broker.bootstrap());
    kafka
        .wait_until_reachable(Duration::from_secs(20))
        .await
        .unwrap();
    kafka.create_topics(1).await.unwrap();
    kafka
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

/// One message as the consumer sees it: offset, key, payload, headers (key, value).
type Seen = (
    i64,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<(String, Option<Vec<u8>>)>,
);

/// Reads `count` messages of partition 0 of the raw topic from `offset`, with small fetch
/// limits so that one partition takes many fetches.
fn read_back(kafka: &KafkaSettings, offset: i64, count: usize) -> Vec<Seen> {
    use rdkafka::Message;
    use rdkafka::message::Headers;
    let consumer: BaseConsumer = kafka
        .client_config(
            ClientRole::Consumer,
            &[
                ("group.id", "sqlite-round-trip"),
                ("fetch.max.bytes", "20000"),
                ("max.partition.fetch.bytes", "20000"),
                ("message.max.bytes", "20000"),
            ],
        )
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(RAW_TOPIC, 0, rdkafka::Offset::Offset(offset))
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while seen.len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "read {} of {count} messages from offset {offset} in 60 s",
            seen.len()
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let headers = m.headers().map_or_else(Vec::new, |h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                });
                seen.push((
                    m.offset(),
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                    headers,
                ));
            }
            Some(Err(e)) => panic!("consume error: {e}"),
            None => {}
        }
    }
    seen
}

/// What the SQLite storage's produce and fetch paths promise (see the `lite.rs` entry of
/// vendor/tansu-storage/PATCHED.md): records written in many batches come back exactly, in
/// order, with their keys and headers (several, in order, one without a value), from any
/// offset, through fetches much smaller than the partition; a record larger than the fetch
/// limit still comes back (tansu 0.6.0 returned nothing for it, for ever); and after a restart
/// on the same file everything reads the same and new records continue the offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_storage_round_trips_records_across_batches_and_restarts() {
    use rdkafka::message::{Header, OwnedHeaders};
    let dir = tempfile::tempdir().unwrap();
    let (broker, kafka) = broker_with_topics(BrokerStorage::Sqlite, dir.path()).await;
    // 2,000 records in 20 batches; every 7th has no key, every 5th no headers, one is 60 KB.
    let expected: Vec<Seen> = (0..2_000i64)
        .map(|i| {
            let key = (i % 7 != 0).then(|| format!("key-{i}").into_bytes());
            let size = if i == 1_234 {
                60_000
            } else {
                20 + (i as usize * 37) % 400
            };
            let payload = format!("{i:08}-{}", "x".repeat(size)).into_bytes();
            let headers = if i % 5 == 0 {
                vec![]
            } else {
                vec![
                    ("first".to_owned(), Some(format!("{i}").into_bytes())),
                    ("no-value".to_owned(), None),
                    ("third".to_owned(), Some(vec![0, 1, 2, (i % 256) as u8])),
                ]
            };
            (i, key, Some(payload), headers)
        })
        .collect();
    let sent = expected.clone();
    let producer_kafka = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = producer_kafka
            .client_config(
                ClientRole::Producer,
                &[("linger.ms", "50"), ("message.max.bytes", "200000")],
            )
            .create()
            .unwrap();
        for batch in sent.chunks(100) {
            for (_, key, payload, headers) in batch {
                let mut owned = OwnedHeaders::new();
                for (k, v) in headers {
                    owned = owned.insert(Header {
                        key: k,
                        value: v.as_deref(),
                    });
                }
                let mut record = BaseRecord::<[u8], [u8]>::to(RAW_TOPIC)
                    .payload(payload.as_deref().unwrap())
                    .headers(owned);
                if let Some(key) = key {
                    record = record.key(key.as_slice());
                }
                producer.send(record).unwrap();
            }
            producer.flush(Duration::from_secs(30)).unwrap();
        }
    })
    .await
    .unwrap();

    let reader = kafka.clone();
    let all = tokio::task::spawn_blocking(move || read_back(&reader, 0, 2_000))
        .await
        .unwrap();
    assert!(
        all == expected,
        "records read back differ from those produced"
    );
    let reader = kafka.clone();
    let tail = tokio::task::spawn_blocking(move || read_back(&reader, 1_230, 770))
        .await
        .unwrap();
    assert!(
        tail == expected[1_230..],
        "records read from offset 1,230 differ"
    );

    // The same file, a new broker, once the stopped one has let go of it (under load its
    // storage can hold the file's lock a little after `stop`: "database is locked").
    broker.stop();
    let mut waited = Duration::ZERO;
    let broker = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        waited += Duration::from_millis(500);
        match EmbeddedBroker::start(
            "127.0.0.1:0".parse().unwrap(),
            BrokerStorage::Sqlite,
            dir.path(),
        )
        .await
        {
            Ok(b) => break b,
            Err(e) if waited < Duration::from_secs(15) && e.to_string().contains("locked") => {}
            Err(e) => panic!("broker did not start again on its file: {e}"),
        }
    };
    let kafka = with_topics(&broker).await;
    let reader = kafka.clone();
    let (again, high, next) = tokio::task::spawn_blocking(move || {
        let again = read_back(&reader, 0, 2_000);
        let consumer: BaseConsumer = reader
            .client_config(ClientRole::Consumer, &[("group.id", "sqlite-restart")])
            .create()
            .unwrap();
        let (_, high) = consumer
            .fetch_watermarks(RAW_TOPIC, 0, Duration::from_secs(10))
            .unwrap();
        let producer: BaseProducer = reader
            .client_config(ClientRole::Producer, &[("linger.ms", "0")])
            .create()
            .unwrap();
        producer
            .send(BaseRecord::<(), str>::to(RAW_TOPIC).payload("after the restart"))
            .unwrap();
        producer.flush(Duration::from_secs(30)).unwrap();
        let next = read_back(&reader, 2_000, 1);
        (again, high, next)
    })
    .await
    .unwrap();
    assert!(again == expected, "records differ after a restart");
    assert_eq!(high, 2_000);
    assert_eq!(next[0].0, 2_000);
    assert_eq!(next[0].2.as_deref(), Some(&b"after the restart"[..]));
    broker.stop();
}

/// A consumer that starts inside a record batch (as the aggregator does after seeking to an
/// offset it stored mid-batch) reads every record from that offset on, on both storages.
/// tansu 0.6.0's object-store (memory) fetch started at the first batch whose base offset is
/// at or after the requested one, so the rest of the containing batch was skipped and its
/// records never counted (the aggregator-crash test lost 3 to 22 visits this way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_from_inside_a_batch_misses_nothing() {
    for storage in [BrokerStorage::Memory, BrokerStorage::Sqlite] {
        let dir = tempfile::tempdir().unwrap();
        let (broker, kafka) = broker_with_topics(storage, dir.path()).await;
        let writer = kafka.clone();
        tokio::task::spawn_blocking(move || {
            let producer: BaseProducer = writer
                .client_config(ClientRole::Producer, &[("linger.ms", "50")])
                .create()
                .unwrap();
            // Ten batches of 100: offsets 0-99, 100-199, ...
            for batch in 0..10 {
                for i in 0..100 {
                    let payload = format!("record {}", batch * 100 + i);
                    producer
                        .send(BaseRecord::<(), str>::to(RAW_TOPIC).payload(&payload))
                        .unwrap();
                }
                producer.flush(Duration::from_secs(30)).unwrap();
            }
        })
        .await
        .unwrap();
        for from in [0i64, 1, 150, 199, 200, 901, 999] {
            let reader = kafka.clone();
            let count = usize::try_from(1_000 - from).unwrap();
            let seen = tokio::task::spawn_blocking(move || read_back(&reader, from, count))
                .await
                .unwrap();
            let offsets: Vec<i64> = seen.iter().map(|s| s.0).collect();
            assert_eq!(
                offsets,
                (from..1_000).collect::<Vec<_>>(),
                "{storage:?}: offsets read from {from}"
            );
            let payload = seen[0].2.as_deref().unwrap();
            assert_eq!(payload, format!("record {from}").as_bytes(), "{storage:?}");
        }
        broker.stop();
    }
}
