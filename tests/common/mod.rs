//! Shared helpers for the integration tests: a real embedded broker, real SQLite, real HTTP.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pageviews::aggregate::{self, AggregateConfig, AggregateStats};
use pageviews::broker::{BrokerStorage, EmbeddedBroker};
use pageviews::kafka::KafkaSettings;
use pageviews::preprocess::enrich::Enricher;
use pageviews::preprocess::geo::{BUNDLED_DB, GeoDb};
use pageviews::preprocess::{self, PreprocessConfig, PreprocessStats};
use pageviews::store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Cluster {
    pub broker: EmbeddedBroker,
    pub kafka: KafkaSettings,
    pub store: Store,
    pub dir: tempfile::TempDir,
    pub partitions: i32,
}

pub async fn cluster(partitions: i32) -> Cluster {
    // Logs are captured per test and shown when it fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "warn,pageviews=info,tansu_storage=off,tansu_service=off".into()
            }),
        )
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(
        "127.0.0.1:0".parse().unwrap(),
        BrokerStorage::Memory,
        dir.path(),
    )
    .await
    .unwrap();
    let mut kafka = KafkaSettings::new(broker.bootstrap());
    // As a user would with -X: notice departed group members sooner than the 45 s default.
    kafka.overrides = vec![
        ("session.timeout.ms".into(), "10000".into()),
        ("heartbeat.interval.ms".into(), "1000".into()),
    ];
    kafka
        .wait_until_reachable(Duration::from_secs(20))
        .await
        .unwrap();
    kafka.create_topics(partitions).await.unwrap();
    let store = Store::open(&format!("sqlite://{}/stats.db", dir.path().display()))
        .await
        .unwrap();
    Cluster {
        broker,
        kafka,
        store,
        dir,
        partitions,
    }
}

/// A stage running as a task, stoppable gracefully (cancel) or abruptly (abort).
pub struct Stage {
    pub stop: CancellationToken,
    pub handle: JoinHandle<()>,
}

impl Stage {
    pub async fn stop(self) {
        self.stop.cancel();
        self.handle.await.unwrap();
    }
    /// Kills the stage mid-flight: no final flush, in-memory counts lost.
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

pub fn start_preprocessor(c: &Cluster, stats: Arc<PreprocessStats>) -> Stage {
    let enricher = Arc::new(Enricher::new(GeoDb::bundled().unwrap()));
    let config = PreprocessConfig {
        kafka: c.kafka.clone(),
        enricher,
    };
    let stop = CancellationToken::new();
    let s = stop.clone();
    let handle = tokio::spawn(async move { preprocess::run(config, stats, s).await.unwrap() });
    Stage { stop, handle }
}

pub fn start_aggregator(c: &Cluster, flush: Duration) -> (Stage, Arc<AggregateStats>) {
    let config = AggregateConfig {
        kafka: c.kafka.clone(),
        store: c.store.clone(),
        flush_interval: flush,
        flush_now: None,
    };
    let stats = Arc::new(AggregateStats::default());
    let (st, stop) = (Arc::clone(&stats), CancellationToken::new());
    let s = stop.clone();
    let handle = tokio::spawn(async move { aggregate::run(config, st, s).await.unwrap() });
    (Stage { stop, handle }, stats)
}

/// Country per line computed independently of the pipeline: first field → mmdb → code.
pub fn expected_counts<'a>(lines: impl Iterator<Item = &'a [u8]>) -> BTreeMap<String, u64> {
    #[derive(serde::Deserialize)]
    struct Rec {
        country_code: Option<String>,
    }
    let reader = maxminddb::Reader::from_source(BUNDLED_DB).unwrap();
    let mut out = BTreeMap::new();
    for line in lines {
        let ip = std::str::from_utf8(line)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let code = ip
            .parse::<IpAddr>()
            .ok()
            .and_then(|ip| reader.lookup::<Rec>(ip).ok().flatten())
            .and_then(|r| r.country_code)
            .unwrap_or_else(|| "ZZ".to_owned());
        *out.entry(code).or_insert(0) += 1;
    }
    out
}

pub async fn db_counts(store: &Store) -> BTreeMap<String, u64> {
    store
        .country_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.country_code, c.visits))
        .collect()
}

/// Waits until the database holds `total` visits.
pub async fn wait_for(c: &Cluster, total: u64, patience: Duration) {
    // A pipeline that stops moving fails the test after STALL with what each stage has done,
    // rather than at the end of `patience` with a bare number: a stall in CI is then diagnosable
    // from the test's output alone.
    const STALL: Duration = Duration::from_secs(90);
    let deadline = tokio::time::Instant::now() + patience;
    let (mut last, mut moved) = (0, tokio::time::Instant::now());
    loop {
        let counted = pageviews::demo::counted(&c.store).await.unwrap();
        if counted >= total {
            return;
        }
        let now = tokio::time::Instant::now();
        if counted != last {
            (last, moved) = (counted, now);
        }
        if now >= deadline || now.duration_since(moved) >= STALL {
            panic!(
                "not drained: counted {counted}/{total}, last progress {:?} ago\n{}",
                now.duration_since(moved),
                pipeline_state(c).await
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Where every partition stands: each topic's log end, the preprocessors' committed raw
/// offsets and the aggregators' stored events offsets (for a failed test's message).
pub async fn pipeline_state(c: &Cluster) -> String {
    use pageviews::kafka::{AGGREGATE_GROUP, EVENTS_TOPIC, PREPROCESS_GROUP, RAW_TOPIC};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let stored = c
        .store
        .load_positions(AGGREGATE_GROUP, EVENTS_TOPIC)
        .await
        .map(|s| s.offsets)
        .unwrap_or_default();
    let (kafka, partitions) = (c.kafka.clone(), c.partitions);
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(5);
        let consumer: BaseConsumer = match kafka
            .client_config(
                pageviews::kafka::ClientRole::Consumer,
                &[("group.id", PREPROCESS_GROUP)],
            )
            .create()
        {
            Ok(c) => c,
            Err(e) => return format!("no consumer for the diagnosis: {e}"),
        };
        let mut out = String::new();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(RAW_TOPIC, p);
        }
        let committed = consumer.committed_offsets(tpl, timeout);
        for p in 0..partitions {
            let raw_end = consumer.fetch_watermarks(RAW_TOPIC, p, timeout).map(|w| w.1);
            let raw_committed = committed
                .as_ref()
                .ok()
                .and_then(|t| t.find_partition(RAW_TOPIC, p))
                .map(|e| e.offset());
            let events_end = consumer.fetch_watermarks(EVENTS_TOPIC, p, timeout).map(|w| w.1);
            out += &format!(
                "partition {p:2}: {RAW_TOPIC} end {raw_end:?} committed {raw_committed:?} | {EVENTS_TOPIC} end {events_end:?} stored {:?}\n",
                stored.get(&p)
            );
        }
        out
    })
    .await
    .unwrap_or_else(|e| format!("diagnosis failed: {e}"))
}

pub fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for l in lines {
        f.write_all(l).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.flush().unwrap();
}

/// A plain HTTP/1.1 GET; returns (status line, headers, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8(buf[..split].to_vec()).unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
    (
        status.to_owned(),
        headers.to_ascii_lowercase(),
        buf[split + 4..].to_vec(),
    )
}
