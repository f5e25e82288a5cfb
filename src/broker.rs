//! The embedded Kafka-compatible broker (tansu), run in-process on one machine.
//!
//! Real Kafka protocol on a real socket: every stage talks to it through `rdkafka` exactly as
//! it would to a Kafka cluster, so switching to `--brokers` changes nothing else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::time::Instant;

use tansu_broker::broker::Broker;
use tansu_broker::coordinator::group::administrator::Controller;
use tansu_storage::StorageContainer;
use tokio::task::JoinHandle;
use url::Url;

/// Where the embedded broker keeps messages, topics and consumer-group offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerStorage {
    /// Durable: a SQLite file `broker.db` in the data dir; survives restarts and kill -9.
    Sqlite,
    /// In memory: fastest, gone when the process ends.
    Memory,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot use data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the embedded broker on {addr}: {reason}")]
    Start { addr: SocketAddr, reason: String },
}

/// How long the embedded broker keeps records: Kafka's `retention.ms` and `retention.bytes`
/// for the topics that set neither (topics created with those configs keep their own). Both
/// storages delete whole record batches from the head of each partition and move its log start
/// (vendor/tansu-storage/PATCHED.md); a consumer whose position falls below it is told
/// OFFSET_OUT_OF_RANGE and starts again at the log start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerRetention {
    /// Record batches whose newest record is older than this go; `None` keeps them.
    pub time: Option<std::time::Duration>,
    /// Record batches go from the head while a partition holds more than this many bytes.
    pub bytes: Option<u64>,
}

impl Default for BrokerRetention {
    /// Kafka's defaults: seven days, no size limit.
    fn default() -> Self {
        Self {
            time: Some(std::time::Duration::from_secs(7 * 24 * 3600)),
            bytes: None,
        }
    }
}

/// How often the embedded broker applies its retention. Each round deletes at most a few
/// hundred record batches per partition in short transactions, so it never holds produce or
/// fetch for long; a large backlog goes over several rounds.
pub const RETENTION_INTERVAL: &str = "5s";

impl BrokerRetention {
    /// The storage URL's query: tansu's maintenance interval and our retention defaults.
    fn query(&self) -> String {
        let ms = self
            .time
            .map_or(-1, |t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
        let bytes = self
            .bytes
            .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX));
        format!(
            "maintenance_interval={RETENTION_INTERVAL}&retention_ms={ms}&retention_bytes={bytes}"
        )
    }
}

/// A running embedded broker; dropping it (or [`EmbeddedBroker::stop`]) stops it.
pub struct EmbeddedBroker {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Starts the broker on `listen` (port 0 picks a free port) and returns once it accepts
    /// connections.
    pub async fn start(
        listen: SocketAddr,
        storage: BrokerStorage,
        data_dir: &Path,
    ) -> Result<EmbeddedBroker, BrokerError> {
        Self::start_with_retention(listen, storage, data_dir, BrokerRetention::default()).await
    }

    /// [`EmbeddedBroker::start`] with `retention` for the topics that set none.
    pub async fn start_with_retention(
        listen: SocketAddr,
        storage: BrokerStorage,
        data_dir: &Path,
        retention: BrokerRetention,
    ) -> Result<EmbeddedBroker, BrokerError> {
        let addr = if listen.port() == 0 {
            free_port(listen)?
        } else {
            listen
        };
        let start_err = |reason: String| BrokerError::Start { addr, reason };
        let storage_url = match storage {
            BrokerStorage::Memory => format!("memory://tansu/?{}", retention.query()),
            BrokerStorage::Sqlite => {
                std::fs::create_dir_all(data_dir).map_err(|source| BrokerError::DataDir {
                    path: data_dir.to_owned(),
                    source,
                })?;
                let dir =
                    std::fs::canonicalize(data_dir).map_err(|source| BrokerError::DataDir {
                        path: data_dir.to_owned(),
                        source,
                    })?;
                // tansu joins the URL path onto the working directory after stripping one
                // leading '/'; a second '/' keeps the path absolute.
                let file = dir.join("broker.db");
                format!("sqlite:///{}?{}", file.display(), retention.query())
            }
        };
        let storage_url = Url::parse(&storage_url).map_err(|e| start_err(e.to_string()))?;
        let listener_url =
            Url::parse(&format!("tcp://{addr}")).map_err(|e| start_err(e.to_string()))?;
        let broker = Broker::<Controller<StorageContainer>, StorageContainer>::builder()
            .node_id(1)
            .cluster_id("pageviews")
            .incarnation_id(uuid::Uuid::new_v4())
            .advertised_listener(listener_url.clone())
            .storage(storage_url)
            .listener(listener_url)
            .silent(true)
            .build()
            .await
            .map_err(|e| start_err(e.to_string()))?;
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut broker = broker;
            // `serve` rather than `main`: `main` installs its own Ctrl-C handler, and the
            // process (not the broker) decides when to stop.
            if let Err(err) = broker.serve(started).await {
                tracing::error!(%err, "embedded broker stopped");
            }
        });
        wait_for_listener(addr).await.map_err(start_err)?;
        tracing::info!(%addr, ?storage, ?retention, "embedded broker ready");
        Ok(EmbeddedBroker { addr, task })
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn free_port(listen: SocketAddr) -> Result<SocketAddr, BrokerError> {
    std::net::TcpListener::bind(listen)
        .and_then(|l| l.local_addr())
        .map_err(|e| BrokerError::Start {
            addr: listen,
            reason: e.to_string(),
        })
}

async fn wait_for_listener(addr: SocketAddr) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..200 {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    Err(format!("not accepting connections after 5 s: {last}"))
}
