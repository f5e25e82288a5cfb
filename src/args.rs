//! Command-line options, one struct per concern, each flattened into every command that needs
//! it: a stage's standalone command (`preprocess`, `aggregate`, `serve`, `topics`, `broker`) and
//! `demo`, which runs them all. Each option is declared once, and each stage's config is built
//! in one place, so `demo` and the standalone commands cannot drift apart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::sync::Notify;

use crate::aggregate::AggregateConfig;
use crate::aggregate::dimensions::{self, DEFAULT_TOP_K, Dimension};
use crate::broker::BrokerStorage;
use crate::kafka::{self, KafkaSettings};
use crate::preprocess::PreprocessConfig;
use crate::preprocess::enrich::Enricher;
use crate::preprocess::geo::GeoDb;
use crate::store::Store;

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Kafka bootstrap servers, HOST:PORT[,…]. `demo` starts an embedded broker without it;
    /// other commands default to 127.0.0.1:9092 (where `pageviews broker` listens).
    #[arg(long, env = "PAGEVIEWS_BROKERS", global = true)]
    pub brokers: Option<String>,
    /// Statistics database: sqlite://PATH (default sqlite://<data-dir>/pageviews.db).
    #[arg(long, env = "PAGEVIEWS_DATABASE", global = true)]
    pub database: Option<String>,
    /// Where the embedded broker and the default database keep their files.
    #[arg(
        long,
        env = "PAGEVIEWS_DATA_DIR",
        default_value = "pageviews-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// librdkafka property for every Kafka client, passed unchanged (repeatable), e.g.
    /// -X security.protocol=SASL_SSL.
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = kafka::parse_override, global = true)]
    pub kafka_config: Vec<(String, String)>,
}

impl Common {
    /// Kafka settings for `brokers` (the embedded broker's address in `demo`).
    pub fn kafka(&self, brokers: &str) -> KafkaSettings {
        KafkaSettings {
            brokers: brokers.to_owned(),
            overrides: self.kafka_config.clone(),
        }
    }

    /// The `--brokers` value, or the standalone broker's default address.
    pub fn brokers_or_default(&self) -> String {
        self.brokers
            .clone()
            .unwrap_or_else(|| "127.0.0.1:9092".to_owned())
    }

    pub fn database_url(&self) -> String {
        self.database
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("pageviews.db").display()))
    }

    pub async fn open_store(&self) -> anyhow::Result<Store> {
        Ok(Store::open(&self.database_url()).await?)
    }
}

/// The embedded broker's storage (`broker`, `demo`).
#[derive(Debug, Clone, Args)]
pub struct BrokerStorageArgs {
    /// Embedded broker storage: sqlite (durable file <data-dir>/broker.db) or memory (lost at
    /// exit).
    #[arg(long, value_enum, default_value_t = BrokerStorage::Sqlite)]
    pub broker_storage: BrokerStorage,
}

/// How topics are created (`topics`, `demo`).
#[derive(Debug, Clone, Args)]
pub struct TopicArgs {
    /// Partitions per topic when the topics are created.
    #[arg(long, default_value_t = kafka::DEFAULT_PARTITIONS)]
    pub partitions: i32,
}

/// The preprocess stage (`preprocess`, `demo`).
#[derive(Debug, Clone, Args)]
pub struct PreprocessArgs {
    /// Country database (.mmdb, DB-IP or MaxMind GeoLite2/GeoIP2 Country or City layout);
    /// default: the bundled DB-IP Lite database.
    #[arg(long, env = "PAGEVIEWS_GEOIP")]
    pub geoip: Option<PathBuf>,
}

impl PreprocessArgs {
    /// The enricher (opens the country database); one per process, shared by preprocessors.
    pub fn enricher(&self) -> anyhow::Result<Arc<Enricher>> {
        let geo = match &self.geoip {
            Some(p) => GeoDb::open(p)?,
            None => GeoDb::bundled()?,
        };
        Ok(Arc::new(Enricher::new(geo)))
    }

    pub fn config(kafka: &KafkaSettings, enricher: &Arc<Enricher>) -> PreprocessConfig {
        PreprocessConfig {
            kafka: kafka.clone(),
            enricher: Arc::clone(enricher),
        }
    }
}

/// The aggregate stage (`aggregate`, `demo`).
#[derive(Debug, Clone, Args)]
pub struct AggregateArgs {
    /// Time between flushes; each flush is one transaction (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,
    /// What to count besides countries, comma-separated: country, continent, browser, os,
    /// device, visitor_type, path, static_path, not_found, referrer, status, status_class,
    /// hour, vhost, host; `default` is all but host (client addresses are personal data),
    /// `all` includes it.
    #[arg(long, default_value = "default", value_parser = parse_dimension_list)]
    pub dimensions: DimensionList,
    /// Distinct values kept per dimension, partition and flush interval; the rest is counted
    /// as "(other)" (each value's count is then low by at most events/top-k per interval).
    #[arg(long, default_value_t = DEFAULT_TOP_K)]
    pub top_k: usize,
    /// How long visits per minute are kept, before the newest minute counted (event time);
    /// 0 keeps them forever.
    #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
    pub timeseries_retention: Duration,
}

/// The dimensions `--dimensions` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DimensionList(pub Vec<Dimension>);

fn parse_dimension_list(s: &str) -> Result<DimensionList, String> {
    dimensions::parse_dimensions(s).map(DimensionList)
}

impl AggregateArgs {
    /// `flush_now`: a signal to flush before the interval is over (the demo's drain).
    pub fn config(
        &self,
        kafka: &KafkaSettings,
        store: &Store,
        flush_now: Option<Arc<Notify>>,
    ) -> AggregateConfig {
        AggregateConfig {
            kafka: kafka.clone(),
            store: store.clone(),
            flush_interval: self.flush_interval,
            flush_now,
            dimensions: self.dimensions.0.clone(),
            top_k: self.top_k,
            minute_retention: Some(self.timeseries_retention).filter(|r| !r.is_zero()),
        }
    }
}

/// The dashboard server (`serve`, `demo`).
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Dashboard address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
}
