//! The one place that knows topic and group names and how Kafka clients are configured.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Raw access-log lines, one per message, no key (spread round-robin by the producer).
pub const RAW_TOPIC: &str = "raw-page-views";
/// `PageView` JSON events keyed by country code.
pub const EVENTS_TOPIC: &str = "page-views";
/// Raw lines that could not be parsed, with the reason in the `pv-reason` header.
pub const DEAD_LETTER_TOPIC: &str = "raw-page-views-dead-letter";
/// Consumer group of the preprocess stage.
pub const PREPROCESS_GROUP: &str = "preprocessors";
/// Consumer group of the aggregate stage (its offsets live in the database, not in Kafka).
pub const AGGREGATE_GROUP: &str = "aggregators";
/// Partitions per topic when `topics` creates them: the upper bound of useful workers per group.
pub const DEFAULT_PARTITIONS: i32 = 16;

/// Errors talking to Kafka, phrased for the person who has to fix them.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error(
        "cannot reach Kafka at {brokers}: {detail} (is the broker running? check --brokers / PAGEVIEWS_BROKERS)"
    )]
    Unreachable {
        brokers: String,
        /// librdkafka's own account when it gave one (e.g. "Connection refused"), which says
        /// more than the request's error code.
        detail: String,
    },
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("invalid Kafka client setting: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
}

/// Connection settings shared by every Kafka client of the process.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// `-X key=value` pairs passed to librdkafka unchanged; applied last so the user wins.
    pub overrides: Vec<(String, String)>,
}

impl KafkaSettings {
    pub fn new(brokers: impl Into<String>) -> KafkaSettings {
        KafkaSettings {
            brokers: brokers.into(),
            overrides: Vec::new(),
        }
    }

    /// A client config with `base` settings of the calling stage, then the user's overrides.
    pub fn client_config(&self, base: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        // librdkafka logs through `log`; keep its chatter out unless asked for.
        config.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
        for (k, v) in base {
            config.set(*k, *v);
        }
        for (k, v) in &self.overrides {
            config.set(k, v);
        }
        config
    }

    /// Waits until the cluster answers a metadata request, for up to `patience`.
    ///
    /// librdkafka's complaints while it tries are not logged (a user starting the stages in
    /// any order would see a screen of them) but the last one ends up in the error.
    pub async fn wait_until_reachable(&self, patience: Duration) -> Result<(), KafkaSetupError> {
        let consumer: BaseConsumer<ProbeContext> = self
            .client_config(&[])
            .create_with_context(ProbeContext::default())?;
        let brokers = self.brokers.clone();
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + patience;
            loop {
                // Serves librdkafka's error events (connection refused, TLS or SASL failure)
                // to the context, which keeps the last one for the error message.
                let _ = consumer.poll(Duration::ZERO);
                match consumer.fetch_metadata(None, Duration::from_secs(2)) {
                    Ok(_) => return Ok(()),
                    Err(source) if std::time::Instant::now() >= deadline => {
                        let detail = consumer
                            .context()
                            .last_complaint()
                            .unwrap_or_else(|| source.to_string());
                        return Err(KafkaSetupError::Unreachable { brokers, detail });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        })
        .await
        .unwrap_or_else(|join| {
            Err(KafkaSetupError::CreateTopic {
                topic: String::new(),
                reason: join.to_string(),
            })
        })
    }

    /// Creates the three topics if missing (idempotent: existing topics are left as they are).
    pub async fn create_topics(&self, partitions: i32) -> Result<(), KafkaSetupError> {
        let admin: AdminClient<DefaultClientContext> = self.client_config(&[]).create()?;
        let topics: Vec<NewTopic<'_>> = [RAW_TOPIC, EVENTS_TOPIC, DEAD_LETTER_TOPIC]
            .iter()
            .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&topics, &opts)
            .await
            .map_err(|source| KafkaSetupError::Unreachable {
                brokers: self.brokers.clone(),
                detail: source.to_string(),
            })?;
        for result in results {
            match result {
                Ok(topic) => tracing::info!(topic, partitions, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(KafkaSetupError::CreateTopic {
                        topic,
                        reason: code.to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The client context of the reachability probe: keeps librdkafka's last warning or error
/// instead of logging it.
#[derive(Default)]
struct ProbeContext {
    last: Mutex<Option<String>>,
}

impl ProbeContext {
    fn remember(&self, text: String) {
        if let Ok(mut last) = self.last.lock() {
            *last = Some(text);
        }
    }
    fn last_complaint(&self) -> Option<String> {
        self.last.lock().ok().and_then(|l| l.clone())
    }
}

impl ClientContext for ProbeContext {
    fn log(&self, level: RDKafkaLogLevel, _facility: &str, message: &str) {
        if matches!(
            level,
            RDKafkaLogLevel::Emerg
                | RDKafkaLogLevel::Alert
                | RDKafkaLogLevel::Critical
                | RDKafkaLogLevel::Error
                | RDKafkaLogLevel::Warning
        ) {
            self.remember(message.to_owned());
        }
    }
    fn error(&self, error: KafkaError, reason: &str) {
        // `reason` repeats librdkafka's text; "1/1 brokers are down" follows the real cause.
        if !reason.contains("brokers are down") || self.last_complaint().is_none() {
            self.remember(if reason.is_empty() {
                error.to_string()
            } else {
                reason.to_owned()
            });
        }
    }
}

impl ConsumerContext for ProbeContext {}

/// Parses `key=value` for `-X`.
pub fn parse_override(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!(
            "expected key=value (a librdkafka property), got {s:?}"
        )),
    }
}
