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

use crate::aggregate::dimensions::{self, DEFAULT_KEEP_VALUES, DEFAULT_TOP_K, Dimension};
use crate::aggregate::{AggregateConfig, VisitSettings};
use crate::broker::{BrokerRetention, BrokerStorage};
use crate::kafka::{self, KafkaSettings};
use crate::preprocess::PreprocessConfig;
use crate::preprocess::enrich::Enricher;
use crate::preprocess::geo::GeoDb;
use crate::serve::ServeConfig;
use crate::store::Store;

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Kafka bootstrap servers, HOST:PORT[,…]. `demo` starts an embedded broker without it;
    /// other commands default to 127.0.0.1:9092 (where `pageviews broker` listens).
    #[arg(long, env = "PAGEVIEWS_BROKERS", global = true)]
    pub brokers: Option<String>,
    /// Statistics database: sqlite://PATH (default sqlite://<data-dir>/pageviews.db).
    #[arg(
        long,
        env = "PAGEVIEWS_DATABASE",
        hide_env_values = true,
        global = true
    )]
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
    /// How far ahead of the wall clock an event's time may be: later lines are
    /// dead-lettered ("timestamp in the future"), and no retention, pruning or alert clock
    /// moves past the wall clock plus this.
    #[arg(long, default_value = "1day", value_parser = humantime::parse_duration, global = true)]
    pub max_future: Duration,
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

/// The embedded broker's storage and retention (`broker`, `demo`).
#[derive(Debug, Clone, Args)]
pub struct BrokerStorageArgs {
    /// Embedded broker storage: sqlite (durable file <data-dir>/broker.db) or memory (lost at
    /// exit).
    #[arg(long, value_enum, default_value_t = BrokerStorage::Sqlite)]
    pub broker_storage: BrokerStorage,
    /// How long the embedded broker keeps messages (Kafka's retention.ms, for topics that set
    /// none): older record batches are deleted from the head of each partition. `forever`
    /// keeps everything.
    #[arg(long, default_value = "7days", value_parser = parse_retention)]
    pub retention: Retention,
    /// Also keep each partition of the embedded broker under this many bytes (Kafka's
    /// retention.bytes, for topics that set none). Default: no size limit.
    #[arg(long, value_name = "BYTES")]
    pub retention_bytes: Option<u64>,
}

impl BrokerStorageArgs {
    /// The embedded broker's retention as these options set it.
    pub fn retention(&self) -> BrokerRetention {
        BrokerRetention {
            time: self.retention.0,
            bytes: self.retention_bytes,
        }
    }
}

/// A retention time, or none (`forever`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Option<Duration>);

fn parse_retention(s: &str) -> Result<Retention, String> {
    match s {
        "forever" | "none" | "unlimited" => Ok(Retention(None)),
        _ => humantime::parse_duration(s)
            .map(|d| Retention(Some(d)))
            .map_err(|e| format!("{e} (a duration such as 7days or 12h, or forever)")),
    }
}

/// Retention set on the topics when `topics` creates them (`topics`).
#[derive(Debug, Clone, Args)]
pub struct TopicRetentionArgs {
    /// retention.ms of the topics created (a duration, or forever). Default: unset, so the
    /// cluster's default applies (the embedded broker's --retention, 7 days unless set).
    #[arg(long, value_parser = parse_retention)]
    pub retention: Option<Retention>,
    /// retention.bytes of each partition of the topics created. Default: unset.
    #[arg(long, value_name = "BYTES")]
    pub retention_bytes: Option<u64>,
}

impl TopicRetentionArgs {
    /// Topic configs for these options.
    pub fn configs(&self) -> Vec<(&'static str, String)> {
        let mut configs = Vec::new();
        if let Some(Retention(time)) = self.retention {
            let ms = time.map_or(-1, |t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
            configs.push(("retention.ms", ms.to_string()));
        }
        if let Some(bytes) = self.retention_bytes {
            configs.push(("retention.bytes", bytes.to_string()));
        }
        configs
    }
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
    pub fn enricher(&self, common: &Common) -> anyhow::Result<Arc<Enricher>> {
        let geo = match &self.geoip {
            Some(p) => GeoDb::open(p)?,
            None => GeoDb::bundled()?,
        };
        Ok(Arc::new(
            Enricher::new(geo).with_max_future(common.max_future),
        ))
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
    /// hour, vhost, host, entry_page, exit_page (the last two count visits); `default` is
    /// all but host (client addresses are personal data), `all` includes it.
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
    /// Values kept in the database per dimension (all time) and per dimension and hour;
    /// each flush folds the values with the fewest visits beyond this into "(other)", so
    /// sums stay exact and the tables stay bounded whatever the log holds.
    #[arg(long, default_value_t = DEFAULT_KEEP_VALUES, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_values: u32,
    /// A visitor's page requests further apart than this (event time) start a new visit;
    /// 0 turns visits off.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub session_gap: Duration,
    /// How far behind the largest event time seen in its partition a page request still
    /// joins its visit (the alerters' --lateness rule, for visits); later ones are counted
    /// as late and left out of visits. A visit closes when that watermark passes its last
    /// request plus the gap.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub session_lateness: Duration,
    /// Open visits kept in memory per aggregator; beyond it, each flush closes the visits
    /// whose last request is oldest (counted as closed early).
    #[arg(long, default_value_t = crate::sessions::DEFAULT_MAX_OPEN_VISITS as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_open_visits: u64,
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
        common: &Common,
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
            keep_values: self.keep_values,
            max_future: common.max_future,
            visits: (!self.session_gap.is_zero()).then(|| VisitSettings {
                gap: seconds(self.session_gap),
                lateness: seconds(self.session_lateness),
                max_open: usize::try_from(self.max_open_visits).unwrap_or(usize::MAX),
            }),
            close_visits: None,
        }
    }
}

/// A duration in whole seconds, as event times count.
fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// The dashboard server (`serve`, `demo`).
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Dashboard address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Access token: every request but /healthz needs it, as `Authorization: Bearer TOKEN`,
    /// or in the browser through the sign-in form or a `/?token=TOKEN` link (which set a
    /// cookie). Without it, anyone who reaches --listen reads the statistics.
    #[arg(long, env = "PAGEVIEWS_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// A host name the dashboard answers to while it listens on loopback, besides localhost
    /// and loopback addresses (repeatable): other names are refused against DNS rebinding.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
    /// Open connections at most (further ones wait to be accepted).
    #[arg(long, default_value_t = ServeConfig::default().max_connections)]
    pub max_connections: usize,
    /// Pages subscribed to live updates (/api/events) at most; beyond, 503 with Retry-After.
    #[arg(long, default_value_t = ServeConfig::default().max_subscribers)]
    pub max_subscribers: usize,
    /// Requests handled at once at most (further ones wait, up to --request-timeout).
    #[arg(long, default_value_t = ServeConfig::default().max_requests)]
    pub max_requests: usize,
    /// A connection that sends no complete request head within this is closed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// A request not answered within this gets 503.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
}

impl ServeArgs {
    pub fn config(&self) -> ServeConfig {
        ServeConfig {
            auth_token: self.auth_token.clone().filter(|t| !t.is_empty()),
            allowed_hosts: self.allowed_hosts.clone(),
            max_connections: self.max_connections,
            max_subscribers: self.max_subscribers,
            max_requests: self.max_requests,
            header_timeout: self.header_timeout,
            request_timeout: self.request_timeout,
        }
    }
}

/// The alerting groups (`alert`, `demo`).
#[derive(Debug, Clone, Args)]
pub struct AlertArgs {
    /// Alert rules (TOML; see the README): error_share, spike, country_visits.
    #[arg(long, value_name = "FILE", env = "PAGEVIEWS_RULES")]
    pub rules: Option<PathBuf>,
    /// Slack-style incoming webhook: each alert is POSTed there as JSON (group
    /// alerts-webhook).
    #[arg(
        long,
        value_name = "URL",
        env = "PAGEVIEWS_WEBHOOK",
        hide_env_values = true
    )]
    pub webhook: Option<String>,
    /// SMTP server for e-mail alerts (group alerts-email): smtp://host:port,
    /// smtp://user:pass@host:port?tls=required (STARTTLS), smtps://user:pass@host:port (TLS).
    #[arg(
        long,
        value_name = "URL",
        env = "PAGEVIEWS_SMTP",
        hide_env_values = true
    )]
    pub smtp: Option<String>,
    /// Allow SMTP credentials over a connection without TLS (they cross the network in
    /// clear text).
    #[arg(long)]
    pub smtp_insecure: bool,
    /// Sender of alert e-mails.
    #[arg(long, value_name = "ADDR")]
    pub from: Option<String>,
    /// Recipient of alert e-mails (repeatable).
    #[arg(long, value_name = "ADDR")]
    pub to: Vec<String>,
    /// Consumer group of the alerter (default: alerts-webhook or alerts-email); members of
    /// one group share its partitions, its position and its delivered alerts.
    #[arg(long)]
    pub group: Option<String>,
    /// How far behind the largest event time seen a window still takes events; later ones
    /// are counted as late.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub lateness: Duration,
    /// A partition read to its log end for this long no longer holds windows open.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// How long one delivery (an HTTP POST, an e-mail) may take before it counts as failed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub delivery_timeout: Duration,
    /// Time between two flushes of an alerter (window counts and offsets, one transaction)
    /// and window closes.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub alert_interval: Duration,
}

impl AlertArgs {
    /// True when any alerting option was given.
    pub fn wanted(&self) -> bool {
        self.rules.is_some() || self.webhook.is_some() || self.smtp.is_some()
    }

    /// One alerter per sink given, checked before anything connects (the rules read, the
    /// URLs and addresses parsed); none when no alerting option was given.
    pub fn alerters(&self) -> anyhow::Result<Alerters> {
        use crate::alert::sink::{Sink, smtp::Email, webhook::Webhook};
        if !self.wanted() {
            return Ok(Alerters {
                rules: Vec::new(),
                sinks: Vec::new(),
                args: self.clone(),
            });
        }
        let Some(path) = &self.rules else {
            anyhow::bail!("alerts need a rules file: add --rules FILE");
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read the rules file {}: {e}", path.display()))?;
        let rules = crate::alert::rules::parse_rules(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut sinks = Vec::new();
        if let Some(url) = &self.webhook {
            sinks.push(Sink::Webhook(Webhook::new(url, self.delivery_timeout)?));
        }
        if let Some(url) = &self.smtp {
            let Some(from) = &self.from else {
                anyhow::bail!("e-mail alerts need a sender: add --from ADDR");
            };
            if self.to.is_empty() {
                anyhow::bail!("e-mail alerts need a recipient: add --to ADDR");
            }
            sinks.push(Sink::Email(Email::new(
                url,
                from,
                &self.to,
                self.delivery_timeout,
                self.smtp_insecure,
            )?));
        }
        if sinks.is_empty() {
            anyhow::bail!("alerts need somewhere to go: add --webhook URL or --smtp URL");
        }
        if sinks.len() > 1 && self.group.is_some() {
            anyhow::bail!(
                "--group names one group, but --webhook and --smtp are two alerters with a group each: run them as two commands"
            );
        }
        Ok(Alerters {
            rules,
            sinks,
            args: self.clone(),
        })
    }
}

/// Alerters checked by [`AlertArgs::alerters`], to be connected.
pub struct Alerters {
    rules: Vec<crate::alert::rules::Rule>,
    sinks: Vec<crate::alert::sink::Sink>,
    args: AlertArgs,
}

impl Alerters {
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// Each alerter's config, against `kafka` and `store`.
    pub fn configs(
        self,
        common: &Common,
        kafka: &KafkaSettings,
        store: &Store,
    ) -> Vec<crate::alert::AlertConfig> {
        let Alerters { rules, sinks, args } = self;
        sinks
            .into_iter()
            .map(|sink| crate::alert::AlertConfig {
                kafka: kafka.clone(),
                store: store.clone(),
                rules: rules.clone(),
                group: args
                    .group
                    .clone()
                    .unwrap_or_else(|| sink.default_group().to_owned()),
                sink: Arc::new(sink),
                lateness: args.lateness,
                idle_timeout: args.idle_timeout,
                alert_interval: args.alert_interval,
                max_future: common.max_future,
            })
            .collect()
    }
}
