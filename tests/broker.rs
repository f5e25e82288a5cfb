//! The embedded broker as a Kafka client sees it: what our fixes to tansu promise.

use std::time::Duration;

mod common;

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

/// An embedded broker on `storage` with our topics, one partition each, created with the
/// topic `configs`.
async fn broker_with_configs(
    storage: BrokerStorage,
    dir: &std::path::Path,
    configs: &[(&str, &str)],
) -> (EmbeddedBroker, KafkaSettings) {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), storage, dir)
        .await
        .unwrap();
    let kafka = KafkaSettings::new(broker.bootstrap());
    kafka
        .wait_until_reachable(Duration::from_secs(20))
        .await
        .unwrap();
    let configs: Vec<(&str, String)> = configs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    kafka.create_topics_with(1, &configs).await.unwrap();
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
/// limits so that one partition takes many fetches, and every batch's CRC checked.
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
                ("check.crcs", "true"),
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

/// A new embedded broker on the SQLite file in `dir`, once a stopped one has let go of it
/// (under load its storage can hold the file's lock a little after `stop`: "database is
/// locked").
async fn restart_on_sqlite(dir: &std::path::Path) -> EmbeddedBroker {
    let mut waited = Duration::ZERO;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        waited += Duration::from_millis(500);
        match EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), BrokerStorage::Sqlite, dir)
            .await
        {
            Ok(b) => break b,
            Err(e) if waited < Duration::from_secs(15) && e.to_string().contains("locked") => {}
            Err(e) => panic!("broker did not start again on its file: {e}"),
        }
    }
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
    let broker = restart_on_sqlite(dir.path()).await;
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

/// `pageviews broker` on SQLite storage in `dir`, as its own process (so that it can be
/// killed with SIGKILL), with `extra` options, and settings for it once it answers, with our
/// topics.
async fn broker_process(
    dir: &std::path::Path,
    port: u16,
    extra: &[&str],
) -> (std::process::Child, KafkaSettings) {
    let child = std::process::Command::new(common::bin())
        .args(["broker", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--broker-storage", "sqlite"])
        .args(extra)
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn,tansu_storage=off,tansu_service=off")
        .env_remove("PAGEVIEWS_BROKERS")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let kafka = KafkaSettings::new(format!("127.0.0.1:{port}"));
    kafka
        .wait_until_reachable(Duration::from_secs(30))
        .await
        .unwrap();
    kafka.create_topics(1).await.unwrap();
    (child, kafka)
}

/// One stored row of the SQLite storage's `record_batch` table, with the fields of its
/// Kafka batch header read from the blob itself (big-endian, at the offsets of the v2 format).
#[derive(Debug)]
struct StoredBatch {
    base_offset: i64,
    last_offset: i64,
    header_base_offset: i64,
    batch_length: usize,
    last_offset_delta: i64,
    record_count: i64,
    blob_len: usize,
}

/// Every stored batch of partition 0 of the raw topic in `broker.db`, in offset order, and the
/// partition's log start and high watermark.
async fn stored_batches(file: &std::path::Path) -> (Vec<StoredBatch>, i64, i64) {
    let db = libsql::Builder::new_local(file).build().await.unwrap();
    let conn = db.connect().unwrap();
    let topition = "(select tp.id from topition tp join topic t on t.id = tp.topic \
                    where t.name = ?1 and tp.partition = 0)";
    let mut rows = conn
        .query(
            &format!(
                "select base_offset, last_offset, batch from record_batch \
                 where topition = {topition} order by base_offset"
            ),
            [RAW_TOPIC],
        )
        .await
        .unwrap();
    let mut batches = vec![];
    while let Some(row) = rows.next().await.unwrap() {
        let blob = row.get::<Vec<u8>>(2).unwrap();
        let be = |at: usize, n: usize| -> i64 {
            blob[at..at + n]
                .iter()
                .fold(0i64, |acc, b| (acc << 8) | i64::from(*b))
        };
        batches.push(StoredBatch {
            base_offset: row.get::<i64>(0).unwrap(),
            last_offset: row.get::<i64>(1).unwrap(),
            header_base_offset: be(0, 8),
            batch_length: usize::try_from(be(8, 4)).unwrap(),
            last_offset_delta: be(23, 4),
            record_count: be(57, 4),
            blob_len: blob.len(),
        });
    }
    let mut rows = conn
        .query(
            &format!("select low, high from watermark where topition = {topition}"),
            [RAW_TOPIC],
        )
        .await
        .unwrap();
    let row = rows.next().await.unwrap().unwrap();
    let low = row.get::<Option<i64>>(0).unwrap().unwrap_or(0);
    let high = row.get::<Option<i64>>(1).unwrap().unwrap_or(0);
    (batches, low, high)
}

/// The SQLite storage keeps each produced batch as one row (PATCHED.md), written in one
/// transaction with the high watermark: a broker killed with SIGKILL in the middle of a
/// stream of produce requests leaves only whole batches, contiguous from offset 0 to the high
/// watermark, each one's header agreeing with its row. After a restart every record up to the
/// high watermark reads back (CRCs checked), and new records continue the offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_during_produce_leaves_whole_batches() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let (mut child, kafka) = broker_process(dir.path(), port, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let producer = {
        let (kafka, stop, acked) = (kafka.clone(), Arc::clone(&stop), Arc::clone(&acked));
        std::thread::spawn(move || {
            let producer: BaseProducer = kafka
                .client_config(
                    ClientRole::Producer,
                    &[("linger.ms", "2"), ("message.timeout.ms", "3000")],
                )
                .create()
                .unwrap();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..500 {
                    let payload = format!("seq {seq:09} {}", "p".repeat((seq % 97) as usize));
                    if producer
                        .send(BaseRecord::<(), str>::to(RAW_TOPIC).payload(&payload))
                        .is_ok()
                    {
                        seq += 1;
                    }
                }
                if producer.flush(Duration::from_secs(3)).is_ok() {
                    acked.store(seq, Ordering::Relaxed);
                }
            }
        })
    };
    // Kill the broker once a good number of batches are in, while the producer keeps going.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < 20_000 {
        assert!(std::time::Instant::now() < deadline, "producer stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let acked_before_kill = acked.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();

    let (batches, low, high) = stored_batches(&dir.path().join("broker.db")).await;
    assert_eq!(low, 0);
    assert!(batches.len() > 10, "{} batches stored", batches.len());
    let mut next = 0;
    for b in &batches {
        assert_eq!(b.base_offset, next, "batches are contiguous: {b:?}");
        assert_eq!(b.header_base_offset, b.base_offset, "{b:?}");
        assert_eq!(b.batch_length + 12, b.blob_len, "whole batch stored: {b:?}");
        assert_eq!(b.last_offset_delta, b.last_offset - b.base_offset, "{b:?}");
        assert_eq!(b.record_count, b.last_offset_delta + 1, "{b:?}");
        next = b.last_offset + 1;
    }
    assert_eq!(high, next, "the high watermark ends the last whole batch");
    assert!(
        u64::try_from(high).unwrap() >= acked_before_kill,
        "{high} stored, {acked_before_kill} acknowledged before the kill"
    );

    let (mut child, kafka) = broker_process(dir.path(), port, &[]).await;
    let reader = kafka.clone();
    let count = usize::try_from(high).unwrap();
    let (seen, more) = tokio::task::spawn_blocking(move || {
        let seen = read_back(&reader, 0, count);
        let producer: BaseProducer = reader
            .client_config(ClientRole::Producer, &[("linger.ms", "0")])
            .create()
            .unwrap();
        producer
            .send(BaseRecord::<(), str>::to(RAW_TOPIC).payload("after the kill"))
            .unwrap();
        producer.flush(Duration::from_secs(30)).unwrap();
        let more = read_back(&reader, i64::try_from(count).unwrap(), 1);
        (seen, more)
    })
    .await
    .unwrap();
    let offsets: Vec<i64> = seen.iter().map(|s| s.0).collect();
    assert_eq!(offsets, (0..high).collect::<Vec<_>>());
    for (offset, _, payload, _) in &seen {
        let payload = String::from_utf8(payload.clone().unwrap()).unwrap();
        assert!(payload.starts_with("seq "), "offset {offset}: {payload:?}");
    }
    assert_eq!(more[0].0, high);
    assert_eq!(more[0].2.as_deref(), Some(&b"after the kill"[..]));
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A `broker.db` written before batches were stored as rows (tansu 0.6.0's layout: a row per
/// record in `record`, a row per header in `header`) is read as it is: its records come back
/// with their keys and headers, from the start and from the middle, ListOffsets answers its
/// log start and end, and new records, stored as batches, continue its offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_db_in_the_row_per_record_layout_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _) = broker_with_topics(BrokerStorage::Sqlite, dir.path()).await;
    broker.stop();
    // 500 records as 0.6.0 wrote them: every 3rd with a key, every 4th with two headers.
    let expected: Vec<Seen> = (0..500i64)
        .map(|i| {
            let key = (i % 3 == 0).then(|| format!("k{i}").into_bytes());
            let headers = if i % 4 == 0 {
                vec![
                    ("h1".to_owned(), Some(format!("v{i}").into_bytes())),
                    ("h2".to_owned(), None),
                ]
            } else {
                vec![]
            };
            (i, key, Some(format!("legacy {i}").into_bytes()), headers)
        })
        .collect();
    {
        let db = libsql::Builder::new_local(dir.path().join("broker.db"))
            .build()
            .await
            .unwrap();
        let conn = db.connect().unwrap();
        // The stopped broker may hold the file a moment longer.
        let mut rows = conn.query("pragma busy_timeout = 15000", ()).await.unwrap();
        while rows.next().await.unwrap().is_some() {}
        drop(rows);
        let mut rows = conn
            .query(
                "select tp.id from topition tp join topic t on t.id = tp.topic \
                 where t.name = ?1 and tp.partition = 0",
                [RAW_TOPIC],
            )
            .await
            .unwrap();
        let topition = rows.next().await.unwrap().unwrap().get::<i64>(0).unwrap();
        drop(rows);
        // Written now: the retention (7 days by default) keeps them.
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap();
        conn.execute("begin", ()).await.unwrap();
        for (offset, key, value, headers) in &expected {
            conn.execute(
                "insert into record (topition, offset_id, attributes, timestamp, k, v) \
                 values (?1, ?2, 0, ?3, ?4, ?5)",
                libsql::params![topition, *offset, now + offset, key.clone(), value.clone()],
            )
            .await
            .unwrap();
            for (k, v) in headers {
                conn.execute(
                    "insert into header (topition, offset_id, k, v) values (?1, ?2, ?3, ?4)",
                    libsql::params![topition, *offset, k.as_bytes().to_vec(), v.clone()],
                )
                .await
                .unwrap();
            }
        }
        conn.execute(
            "update watermark set low = 0, high = 500 where topition = ?1",
            [topition],
        )
        .await
        .unwrap();
        conn.execute("commit", ()).await.unwrap();
    }
    let broker = restart_on_sqlite(dir.path()).await;
    let kafka = with_topics(&broker).await;
    let reader = kafka.clone();
    let (all, middle, low, high, after) = tokio::task::spawn_blocking(move || {
        let all = read_back(&reader, 0, 500);
        let middle = read_back(&reader, 250, 250);
        let consumer: BaseConsumer = reader
            .client_config(ClientRole::Consumer, &[("group.id", "legacy-watermarks")])
            .create()
            .unwrap();
        let (low, high) = consumer
            .fetch_watermarks(RAW_TOPIC, 0, Duration::from_secs(10))
            .unwrap();
        let producer: BaseProducer = reader
            .client_config(ClientRole::Producer, &[("linger.ms", "20")])
            .create()
            .unwrap();
        for i in 0..100 {
            producer
                .send(BaseRecord::<(), str>::to(RAW_TOPIC).payload(&format!("new {i}")))
                .unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        let after = read_back(&reader, 450, 150);
        (all, middle, low, high, after)
    })
    .await
    .unwrap();
    assert!(all == expected, "legacy records read back differ");
    assert!(middle == expected[250..], "legacy records from 250 differ");
    assert_eq!((low, high), (0, 500));
    let offsets: Vec<i64> = after.iter().map(|s| s.0).collect();
    assert_eq!(offsets, (450..600).collect::<Vec<_>>());
    assert_eq!(after[49].2.as_deref(), Some(&b"legacy 499"[..]));
    assert_eq!(after[50].2.as_deref(), Some(&b"new 0"[..]));
    assert_eq!(after[149].2.as_deref(), Some(&b"new 99"[..]));
    broker.stop();
}

/// Produces `count` records of `size` bytes each to partition 0 of the raw topic, `per_batch`
/// to a flush (so each flush makes at least one record batch), the payload starting with its
/// index from `first`.
fn produce_records(
    kafka: &KafkaSettings,
    first: usize,
    count: usize,
    size: usize,
    per_batch: usize,
) {
    let producer: BaseProducer = kafka
        .client_config(ClientRole::Producer, &[("linger.ms", "5")])
        .create()
        .unwrap();
    for chunk in (first..first + count).collect::<Vec<_>>().chunks(per_batch) {
        for i in chunk {
            let payload = format!("{i:08} {}", "r".repeat(size.saturating_sub(9)));
            producer
                .send(
                    BaseRecord::<(), str>::to(RAW_TOPIC)
                        .partition(0)
                        .payload(&payload),
                )
                .unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }
}

/// The log start and high watermark of partition 0 of the raw topic.
fn watermarks(kafka: &KafkaSettings) -> (i64, i64) {
    let consumer: BaseConsumer = kafka
        .client_config(
            ClientRole::Consumer,
            &[("group.id", "retention-watermarks")],
        )
        .create()
        .unwrap();
    consumer
        .fetch_watermarks(RAW_TOPIC, 0, Duration::from_secs(10))
        .unwrap()
}

/// Waits up to `patience` until the log start of partition 0 reaches `at_least`.
fn wait_for_log_start(kafka: &KafkaSettings, at_least: i64, patience: Duration) -> (i64, i64) {
    let deadline = std::time::Instant::now() + patience;
    loop {
        let (low, high) = watermarks(kafka);
        if low >= at_least || std::time::Instant::now() > deadline {
            return (low, high);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Retention by time, on both storages (vendor/tansu-storage/PATCHED.md): a topic with
/// `retention.ms` of 10 s loses the batches older than that, whole, from the head of the
/// partition; its log start moves past them (ListOffsets earliest answers it); a consumer that
/// asks for a deleted offset is told the offset is out of range; the newer records are
/// untouched and read back exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_time_deletes_old_batches_and_moves_the_log_start() {
    for storage in [BrokerStorage::Memory, BrokerStorage::Sqlite] {
        let dir = tempfile::tempdir().unwrap();
        let (broker, kafka) =
            broker_with_configs(storage, dir.path(), &[("retention.ms", "10000")]).await;
        let k = kafka.clone();
        let (low, high, newer, refused) = tokio::task::spawn_blocking(move || {
            produce_records(&k, 0, 100, 200, 20);
            std::thread::sleep(Duration::from_secs(11));
            produce_records(&k, 100, 100, 200, 20);
            // Retention runs every 5 s; the newer records expire 10 s after they were written.
            let (low, high) = wait_for_log_start(&k, 100, Duration::from_secs(8));
            let newer = read_back(&k, 100, 100);
            let consumer: BaseConsumer = k
                .client_config(
                    ClientRole::Consumer,
                    &[
                        ("group.id", "below-log-start"),
                        ("auto.offset.reset", "error"),
                    ],
                )
                .create()
                .unwrap();
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition_offset(RAW_TOPIC, 0, rdkafka::Offset::Offset(10))
                .unwrap();
            consumer.assign(&tpl).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let refused = loop {
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Err(e)) => break Some(e.to_string()),
                    Some(Ok(m)) => panic!("read offset {} below the log start", {
                        use rdkafka::Message;
                        m.offset()
                    }),
                    None if std::time::Instant::now() > deadline => break None,
                    None => {}
                }
            };
            (low, high, newer, refused)
        })
        .await
        .unwrap();
        assert_eq!((low, high), (100, 200), "{storage:?}: log start and end");
        let offsets: Vec<i64> = newer.iter().map(|s| s.0).collect();
        assert_eq!(offsets, (100..200).collect::<Vec<_>>(), "{storage:?}");
        assert!(
            newer[0].2.as_deref().unwrap().starts_with(b"00000100 "),
            "{storage:?}"
        );
        let refused = refused.expect("no error for an offset below the log start");
        // librdkafka with auto.offset.reset=error reports the broker's OFFSET_OUT_OF_RANGE so.
        assert!(
            refused.contains("AutoOffsetReset"),
            "{storage:?}: {refused}"
        );
        broker.stop();
    }
}

/// Retention by size, on both storages: a topic with `retention.bytes` of 20,000 keeps each
/// partition under that bound (whole batches deleted from the head; here 40 bytes of batch
/// header come with each 20 records of 500 bytes), and what it keeps reads back exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_size_keeps_a_partition_under_its_bound() {
    for storage in [BrokerStorage::Memory, BrokerStorage::Sqlite] {
        let dir = tempfile::tempdir().unwrap();
        let (broker, kafka) = broker_with_configs(
            storage,
            dir.path(),
            &[("retention.bytes", "20000"), ("retention.ms", "-1")],
        )
        .await;
        let k = kafka.clone();
        let (low, high, kept) = tokio::task::spawn_blocking(move || {
            produce_records(&k, 0, 400, 500, 20);
            let (low, high) = wait_for_log_start(&k, 300, Duration::from_secs(12));
            let kept = read_back(&k, low, usize::try_from(high - low).unwrap());
            (low, high, kept)
        })
        .await
        .unwrap();
        assert_eq!(high, 400, "{storage:?}");
        // 20,000 bytes hold at most 40 records of 500 bytes; whole batches of 20 go.
        assert!(
            (high - low) * 500 <= 20_000 && high - low >= 20,
            "{storage:?}: {} records kept ({low}..{high})",
            high - low
        );
        let offsets: Vec<i64> = kept.iter().map(|s| s.0).collect();
        assert_eq!(offsets, (low..high).collect::<Vec<_>>(), "{storage:?}");
        assert!(
            kept[0]
                .2
                .as_deref()
                .unwrap()
                .starts_with(format!("{low:08} ").as_bytes()),
            "{storage:?}"
        );
        broker.stop();
    }
}

/// A broker on SQLite storage killed with SIGKILL while its retention deletes (a 30 kB
/// `--retention-bytes` under a stream of 1 kB records, so every round deletes) leaves a
/// readable log: the stored batches are contiguous from the log start to the high watermark,
/// the log start is the first stored batch's, and after a restart every kept record reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_during_retention_leaves_a_readable_log() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let (mut child, kafka) =
        broker_process(dir.path(), port, &["--retention-bytes", "30000"]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (kafka, stop) = (kafka.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut next = 0;
            while !stop.load(Ordering::Relaxed) {
                produce_records(&kafka, next, 50, 1000, 10);
                next += 50;
            }
        })
    };
    // Several retention rounds (every 5 s), then the kill at an arbitrary moment.
    let started = std::time::Instant::now();
    loop {
        let k = kafka.clone();
        let (low, _) = tokio::task::spawn_blocking(move || watermarks(&k))
            .await
            .unwrap();
        if low > 0 && started.elapsed() > Duration::from_secs(11) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "retention never ran"
        );
        tokio::time::sleep(Duration::from_millis(137)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let _ = producer.join();

    let (batches, low, high) = stored_batches(&dir.path().join("broker.db")).await;
    assert!(low > 0, "nothing was deleted");
    if let Some(first) = batches.first() {
        assert_eq!(
            first.base_offset, low,
            "the log start is the first stored batch's"
        );
    }
    let mut next = low;
    for b in &batches {
        assert_eq!(b.base_offset, next, "batches are contiguous: {b:?}");
        assert_eq!(b.batch_length + 12, b.blob_len, "whole batch stored: {b:?}");
        next = b.last_offset + 1;
    }
    assert_eq!(next, high, "the stored batches end at the high watermark");

    let (mut child, kafka) =
        broker_process(dir.path(), port, &["--retention-bytes", "30000"]).await;
    let k = kafka.clone();
    let (low2, kept) = tokio::task::spawn_blocking(move || {
        let (low, high) = watermarks(&k);
        (
            low,
            read_back(&k, low, usize::try_from(high - low).unwrap()),
        )
    })
    .await
    .unwrap();
    assert!(low2 >= low);
    for (i, (offset, _, payload, _)) in kept.iter().enumerate() {
        assert_eq!(*offset, low2 + i64::try_from(i).unwrap());
        assert!(
            payload
                .as_deref()
                .unwrap()
                .starts_with(format!("{offset:08} ").as_bytes())
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The retention rules of vendor/tansu-storage (`Retention`, `expired_head`), which both
/// storages apply: the storage URL's defaults, a topic's configs over them (negative: no
/// limit; not a number: the default), and only whole batches from the head go, by time or
/// while the partition is over its size.
#[test]
fn retention_rules() {
    use tansu_storage::{Retention, expired_head};
    let url = url::Url::parse("sqlite:///tmp/b.db").unwrap();
    assert_eq!(Retention::from_url(&url), Retention::default());
    assert_eq!(Retention::default().ms, Some(7 * 24 * 3600 * 1000));
    let url = url::Url::parse("memory://tansu/?retention_ms=20000&retention_bytes=100").unwrap();
    let r = Retention::from_url(&url);
    assert_eq!((r.ms, r.bytes), (Some(20_000), Some(100)));
    let unlimited = url::Url::parse("memory://tansu/?retention_ms=-1").unwrap();
    assert!(Retention::from_url(&unlimited).is_unlimited());
    let t = r.for_topic(Some("5000"), Some("-1"));
    assert_eq!((t.ms, t.bytes), (Some(5_000), None));
    let t = r.for_topic(Some("soon"), None);
    assert_eq!((t.ms, t.bytes), (Some(20_000), Some(100)));

    let by_time = Retention {
        ms: Some(1_000),
        bytes: None,
    };
    // (last offset, largest timestamp, bytes); now 10,000, so the cutoff is 9,000. The third
    // batch is younger, so the fourth (older) stays.
    let head = [
        (9, 8_000, 10),
        (19, 8_999, 10),
        (29, 9_500, 10),
        (39, 100, 10),
    ];
    assert_eq!(expired_head(&head, by_time, 10_000, 40), (2, 20));
    let by_size = Retention {
        ms: None,
        bytes: Some(25),
    };
    assert_eq!(expired_head(&head, by_size, 10_000, 40), (2, 20));
    assert_eq!(expired_head(&head, by_size, 10_000, 25), (0, 0));
    let unlimited = Retention {
        ms: None,
        bytes: None,
    };
    assert_eq!(expired_head(&head, unlimited, i64::MAX, 40), (0, 0));
}
