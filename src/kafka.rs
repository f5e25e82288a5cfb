//! The one place that knows topic and group names and how Kafka clients are configured.

use std::collections::HashMap;
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
    #[error("internal error: the Kafka reachability check stopped: {0}")]
    Task(String),
    #[error("cannot describe topic {topic}: {reason}")]
    Describe { topic: String, reason: String },
    #[error("invalid Kafka client setting: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
}

/// What a Kafka client is for, which decides which `-X` properties it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole {
    Consumer,
    Producer,
    /// Admin requests and metadata probes: neither consumer- nor producer-only properties.
    Admin,
}

/// Every consumer of the pipeline sets this: how long librdkafka waits before it fetches a
/// partition again once its prefetch queue is over `queued.max.messages.kbytes`. Its default,
/// 1 s, left a consumer that works through its queue faster than that idle for the rest of the
/// second, every time: the in-memory demo took 11.0 s for 1M lines with it, 5.3 s with 0 (same
/// build, back to back). 10 ms keeps the memory bound and costs nothing measurable.
pub const FETCH_QUEUE_BACKOFF: (&str, &str) = ("fetch.queue.backoff.ms", "10");

/// Every consumer of the pipeline prefetches at most 16 MiB (librdkafka's default is 64 MiB):
/// about 60,000 raw lines, a dozen batches ahead, is enough to never wait for a fetch, and the
/// resident memory then stops depending on how far the stage is behind. A stage that counts
/// slower than messages arrive otherwise holds a fuller queue the further behind it is, and
/// its memory grows with the backlog (issue 7, target 6).
pub const PREFETCH: (&str, &str) = ("queued.max.messages.kbytes", "16384");

/// Every producer of the pipeline (import, preprocess and its dead letters) compresses its
/// record batches with LZ4. Log lines and their events repeat most of their bytes (agents,
/// paths, referrers), so a batch shrinks several times over, and every copy of it costs that
/// much less: the socket, the broker's storage (the SQLite file and its write-ahead log, or the
/// memory storage's heap) and the fetches. The batches are stored and fetched as they are, so
/// only the producer compresses and only the consumer decompresses. Measured with
/// `demo --input <1,000,000 real lines> --exit-when-drained`, back to back, same build: SQLite
/// broker storage 100k -> 136k lines/s, memory storage 133k -> 150k lines/s. Kafka brokers
/// take LZ4 since 0.8; `-X compression.type=none` turns it off.
pub const COMPRESSION: (&str, &str) = ("compression.type", "lz4");

/// The group session of the preprocessors and aggregators: a member that stops heartbeating
/// (killed, or its host gone) loses its partitions after 10 s, Kafka's classic default, instead
/// of librdkafka's 45 s, during which a dead worker's partitions are counted by nobody (the
/// multi-process benchmark's SIGKILL cost about 45 s of standstill). Heartbeats go every
/// second from librdkafka's own thread, whatever the stage is doing; the benchmark's SQLite
/// demo (the broker's busiest storage) counts the session timeouts in its log: none.
/// `-X session.timeout.ms=…` overrides it.
pub const SESSION: [(&str, &str); 2] = [
    ("session.timeout.ms", "10000"),
    ("heartbeat.interval.ms", "1000"),
];

/// librdkafka's consumer-only properties (`C` in its CONFIGURATION.md, 2.12.1, global and
/// topic level).
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "group.protocol.type",
    "group.protocol",
    "group.remote.assignor",
    "coordinator.query.interval.ms",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.error.backoff.ms",
    "offset.store.method",
    "isolation.level",
    "consume_cb",
    "rebalance_cb",
    "offset_commit_cb",
    "enable.partition.eof",
    "check.crcs",
    "auto.commit.enable",
    "auto.offset.reset",
    "offset.store.path",
    "offset.store.sync.interval.ms",
    "consume.callback.max.messages",
];

/// librdkafka's producer-only properties (`P` in its CONFIGURATION.md, 2.12.1).
const PRODUCER_ONLY: &[&str] = &[
    "transactional.id",
    "transaction.timeout.ms",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.ms",
    "linger.ms",
    "message.send.max.retries",
    "retries",
    "queue.buffering.backpressure.threshold",
    "compression.codec",
    "compression.type",
    "compression.level",
    "batch.num.messages",
    "batch.size",
    "delivery.report.only.error",
    "dr_cb",
    "dr_msg_cb",
    "sticky.partitioning.linger.ms",
    "request.required.acks",
    "acks",
    "request.timeout.ms",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "queuing.strategy",
    "produce.offset.report",
    "partitioner",
    "partitioner_cb",
    "msg_order_cmp",
];

impl ClientRole {
    /// Whether a property (`-X key=…`) applies to clients of this role.
    pub fn accepts(self, key: &str) -> bool {
        let consumer_only = CONSUMER_ONLY.contains(&key);
        let producer_only = PRODUCER_ONLY.contains(&key);
        match self {
            ClientRole::Consumer => !producer_only,
            ClientRole::Producer => !consumer_only,
            ClientRole::Admin => !consumer_only && !producer_only,
        }
    }
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

    /// A client config with `base` settings of the calling stage, then the user's overrides
    /// that apply to a client of this `role` (librdkafka warns about every consumer property
    /// given to a producer and the other way round, so each goes only where it means something).
    pub fn client_config(&self, role: ClientRole, base: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        // librdkafka logs through `log`; keep its chatter out unless asked for.
        config.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
        for (k, v) in base {
            config.set(*k, *v);
        }
        for (k, v) in &self.overrides {
            if role.accepts(k) {
                config.set(k, v);
            }
        }
        config
    }

    /// Waits until the cluster answers a metadata request, for up to `patience`.
    ///
    /// librdkafka's complaints while it tries are not logged (a user starting the stages in
    /// any order would see a screen of them) but the last one ends up in the error.
    pub async fn wait_until_reachable(&self, patience: Duration) -> Result<(), KafkaSetupError> {
        let consumer: BaseConsumer<ProbeContext> = self
            .client_config(ClientRole::Admin, &[])
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
        .unwrap_or_else(|join| Err(KafkaSetupError::Task(join.to_string())))
    }

    /// Creates the three topics if missing (idempotent: existing topics are left as they are).
    /// The partition count of `topic` (`None`: it does not exist, or no broker answered
    /// within `timeout`). Blocking.
    pub fn partition_count(&self, topic: &str, timeout: Duration) -> Option<i32> {
        let consumer: BaseConsumer = self
            .client_config(ClientRole::Consumer, &[("group.id", "pageviews-metadata")])
            .create()
            .ok()?;
        let metadata = consumer.fetch_metadata(Some(topic), timeout).ok()?;
        let t = metadata.topics().iter().find(|t| t.name() == topic)?;
        i32::try_from(t.partitions().len()).ok().filter(|&n| n > 0)
    }

    pub async fn create_topics(&self, partitions: i32) -> Result<(), KafkaSetupError> {
        self.create_topics_with(partitions, &[]).await
    }

    /// [`KafkaSettings::create_topics`] with topic `configs` (such as `retention.ms`) on the
    /// topics it creates; topics that exist keep theirs.
    pub async fn create_topics_with(
        &self,
        partitions: i32,
        configs: &[(&str, String)],
    ) -> Result<(), KafkaSetupError> {
        let admin: AdminClient<DefaultClientContext> =
            self.client_config(ClientRole::Admin, &[]).create()?;
        let topics: Vec<NewTopic<'_>> = [RAW_TOPIC, EVENTS_TOPIC, DEAD_LETTER_TOPIC]
            .iter()
            .map(|t| {
                configs.iter().fold(
                    NewTopic::new(t, partitions, TopicReplication::Fixed(1)),
                    |topic, (k, v)| topic.set(k, v),
                )
            })
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

/// Where each partition a consumer was assigned should go on from (its committed offset, read
/// when it was assigned), for a stage that commits its offsets to Kafka: the first message
/// it then delivers shows whether the broker still had that position. Below the log start (the
/// messages deleted by retention while the group was down or behind), librdkafka starts the
/// partition again at the log start, by `auto.offset.reset`, and the difference is what was
/// lost. Filled by the rebalance callback, taken by the stage's loop ([`Gaps`]).
#[derive(Debug, Default)]
pub struct Assigned {
    any: std::sync::atomic::AtomicBool,
    at: Mutex<HashMap<i32, Option<i64>>>,
}

impl Assigned {
    /// Partition `partition` was assigned, to go on from `committed` (`None`: unknown).
    pub fn assign(&self, partition: i32, committed: Option<i64>) {
        if let Ok(mut at) = self.at.lock() {
            at.insert(partition, committed);
            self.any.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// The news of `partition`'s assignment, once: `Some(committed)` if it was assigned since.
    pub fn take(&self, partition: i32) -> Option<Option<i64>> {
        if !self.any.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let mut at = self.at.lock().ok()?;
        let news = at.remove(&partition);
        if at.is_empty() {
            self.any.store(false, std::sync::atomic::Ordering::Release);
        }
        news
    }
}

/// Gaps in the offsets a consumer reads, per partition: messages the broker no longer had
/// (deleted by retention) between the offset expected and the one delivered. Our producers
/// write no transaction markers and our topics are not compacted, so within a partition every
/// offset holds a message: a jump is a loss.
#[derive(Debug, Default)]
pub struct Gaps {
    next: HashMap<i32, i64>,
}

impl Gaps {
    /// Where `partition` should go on from now (`None`: unknown, no gap is reported for it
    /// until it has delivered a message).
    pub fn expect(&mut self, partition: i32, next: Option<i64>) {
        match next {
            Some(n) => self.next.insert(partition, n),
            None => self.next.remove(&partition),
        };
    }

    /// Records the message at `partition`/`offset`; returns the messages lost just before it,
    /// `(first lost offset, how many)`, if any. A message at or before the expected offset (a
    /// replay after a rebalance) is no gap.
    pub fn seen(&mut self, partition: i32, offset: i64) -> Option<(i64, u64)> {
        let gap = self
            .next
            .get(&partition)
            .filter(|&&next| offset > next)
            .map(|&next| (next, u64::try_from(offset - next).unwrap_or(0)));
        self.next.insert(partition, offset + 1);
        gap
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

/// The context of clients that only observe (the dashboard's lag and dead-letter readers):
/// librdkafka's complaints go to DEBUG. Whatever they cannot read shows in the answers they
/// feed (`/api/pipeline` says the brokers did not answer), and a dashboard that outlives the
/// brokers (the demo's embedded one stops first at Ctrl-C) should not log ERRORs about it.
#[derive(Default)]
pub struct ObserverContext;

impl ClientContext for ObserverContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        tracing::debug!(?level, facility, message, "librdkafka (observer)");
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka (observer)");
    }
}

impl ConsumerContext for ObserverContext {}

/// Parses `key=value` for `-X`.
pub fn parse_override(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!(
            "expected key=value (a librdkafka property), got {s:?}"
        )),
    }
}

/// A topic's identity: Kafka's topic id (a UUID, base64 as Kafka tools print it), which
/// changes when a topic is deleted and created again under the same name, or when the broker
/// starts over with new storage. `None` when the broker does not report one.
pub type TopicId = Option<String>;

/// The topic ids of `topics`, from a DescribeTopics admin request on `client`'s connection
/// (rust-rdkafka has no wrapper for it yet, so this calls librdkafka directly). Blocking: call
/// it off the async workers.
pub fn describe_topic_ids<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topics: &[&str],
    timeout: Duration,
) -> Result<HashMap<String, TopicId>, KafkaSetupError> {
    use rdkafka::bindings as rd;
    use std::ffi::{CStr, CString, c_char};
    let fail = |reason: String| KafkaSetupError::Describe {
        topic: topics.join(","),
        reason,
    };
    let names = topics
        .iter()
        .map(|t| CString::new(*t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    let mut ptrs: Vec<*const c_char> = names.iter().map(|c| c.as_ptr()).collect();
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let rk = client.native_ptr();
    // SAFETY: every object created here is destroyed before returning; the strings read from
    // the result are copied while the event that owns them is alive; `names` outlives the
    // collection made from its pointers.
    unsafe {
        let collection = rd::rd_kafka_TopicCollection_of_topic_names(ptrs.as_mut_ptr(), ptrs.len());
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
        );
        let mut errstr = [0 as c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let queue = rd::rd_kafka_queue_new(rk);
        rd::rd_kafka_DescribeTopics(rk, collection, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, timeout_ms.saturating_add(1000));
        let result = if event.is_null() {
            Err(fail("no answer in time".to_owned()))
        } else if rd::rd_kafka_event_error(event)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            Err(fail(
                CStr::from_ptr(rd::rd_kafka_event_error_string(event))
                    .to_string_lossy()
                    .into_owned(),
            ))
        } else {
            let res = rd::rd_kafka_event_DescribeTopics_result(event);
            let mut count = 0usize;
            let descriptions = rd::rd_kafka_DescribeTopics_result_topics(res, &mut count);
            let mut out = HashMap::new();
            let mut error = None;
            for i in 0..count {
                let d = *descriptions.add(i);
                let name = CStr::from_ptr(rd::rd_kafka_TopicDescription_name(d))
                    .to_string_lossy()
                    .into_owned();
                let err = rd::rd_kafka_TopicDescription_error(d);
                if !err.is_null()
                    && rd::rd_kafka_error_code(err)
                        != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                {
                    let reason = CStr::from_ptr(rd::rd_kafka_error_string(err))
                        .to_string_lossy()
                        .into_owned();
                    error = Some(KafkaSetupError::Describe {
                        topic: name,
                        reason,
                    });
                    break;
                }
                let id = rd::rd_kafka_TopicDescription_topic_id(d);
                let known = !id.is_null()
                    && (rd::rd_kafka_Uuid_most_significant_bits(id) != 0
                        || rd::rd_kafka_Uuid_least_significant_bits(id) != 0);
                let id = known.then(|| {
                    CStr::from_ptr(rd::rd_kafka_Uuid_base64str(id))
                        .to_string_lossy()
                        .into_owned()
                });
                out.insert(name, id);
            }
            match error {
                Some(e) => Err(e),
                None => Ok(out),
            }
        };
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_queue_destroy(queue);
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_TopicCollection_destroy(collection);
        drop(names);
        result
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn gaps_are_losses_and_replays_are_not() {
        let mut gaps = Gaps::default();
        // Unknown start: the first message is no gap.
        assert_eq!(gaps.seen(0, 40), None);
        assert_eq!(gaps.seen(0, 41), None);
        assert_eq!(gaps.seen(0, 45), Some((42, 3)));
        // Replayed from a lower committed offset after a rebalance: no gap.
        gaps.expect(0, Some(30));
        assert_eq!(gaps.seen(0, 30), None);
        // Assigned at committed offset 100, delivered from the log start, 250.
        gaps.expect(1, Some(100));
        assert_eq!(gaps.seen(1, 250), Some((100, 150)));
        gaps.expect(1, None);
        assert_eq!(gaps.seen(1, 900), None);
        let assigned = Assigned::default();
        assert_eq!(assigned.take(1), None);
        assigned.assign(1, Some(7));
        assigned.assign(2, None);
        assert_eq!(assigned.take(1), Some(Some(7)));
        assert_eq!(assigned.take(1), None);
        assert_eq!(assigned.take(2), Some(None));
    }

    use super::*;

    /// `-X` properties reach only the clients they apply to: a consumer setting given to a
    /// producer makes librdkafka print a configuration warning for every producer created.
    #[test]
    fn overrides_go_only_to_the_clients_they_apply_to() {
        let mut kafka = KafkaSettings::new("127.0.0.1:9092");
        kafka.overrides = vec![
            ("session.timeout.ms".into(), "10000".into()),
            ("linger.ms".into(), "50".into()),
            ("security.protocol".into(), "plaintext".into()),
        ];
        let consumer = kafka.client_config(ClientRole::Consumer, &[]);
        let producer = kafka.client_config(ClientRole::Producer, &[]);
        let admin = kafka.client_config(ClientRole::Admin, &[]);
        assert_eq!(consumer.get("session.timeout.ms"), Some("10000"));
        assert_eq!(consumer.get("linger.ms"), None);
        assert_eq!(producer.get("session.timeout.ms"), None);
        assert_eq!(producer.get("linger.ms"), Some("50"));
        assert_eq!(admin.get("session.timeout.ms"), None);
        assert_eq!(admin.get("linger.ms"), None);
        for c in [&consumer, &producer, &admin] {
            assert_eq!(c.get("security.protocol"), Some("plaintext"));
        }
    }
}
