//! Pipeline health, read from the brokers and the database (so it is right when every
//! stage runs as a separate process): per consumer group and partition the committed offset,
//! the log end and the lag; what flows through each stage per second; the dead letters and
//! their latest reasons; the last flush. `GET /api/pipeline` shows it, `GET /metrics` exports
//! it (with the counts) in Prometheus's text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::event::headers;
use crate::kafka::{
    AGGREGATE_GROUP, ClientRole, DEAD_LETTER_TOPIC, EVENTS_TOPIC, KafkaSettings, ObserverContext,
    PREPROCESS_GROUP, RAW_TOPIC,
};
use crate::store::{Store, StoreError};

/// A broker round trip that takes longer counts as unanswered.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(3);
/// Health is read at most this often; requests in between get the last reading.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Dead letters shown with their reasons.
const LATEST_DEAD_LETTERS: usize = 10;

/// `GET /api/pipeline`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PipelineResponse {
    /// When this was read, RFC 3339.
    pub checked_at: String,
    /// Why the brokers could not be read (`null`: they were).
    pub kafka_error: Option<String>,
    /// The same for a reader, in one plain line: which address, and what it means for the
    /// figures (`null`: the brokers were read).
    #[serde(default)]
    pub kafka_note: Option<String>,
    /// One entry per topic: its log end over all partitions and how fast it grows.
    pub topics: Vec<TopicHealth>,
    /// One entry per consumer group reading a topic.
    pub groups: Vec<GroupHealth>,
    pub dead_letters: DeadLetters,
    /// Time of the last committed flush (`null`: none yet).
    pub last_flush: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopicHealth {
    pub topic: String,
    /// What the topic means for the pipeline (lines imported, events produced, …).
    pub role: String,
    pub messages: i64,
    /// Messages per second since the previous reading (`null` on the first).
    pub per_second: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupHealth {
    pub group: String,
    pub topic: String,
    /// Where the group's positions are kept: `kafka` or `database`.
    pub positions_in: String,
    pub partitions: Vec<PartitionHealth>,
    pub lag: i64,
    /// Messages the group moved past per second since the previous reading.
    pub per_second: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionHealth {
    pub partition: i32,
    /// The next offset the group reads (`null`: nothing committed yet).
    pub committed: Option<i64>,
    pub log_end: i64,
    /// `log_end - committed` (all of the log when nothing is committed).
    pub lag: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetters {
    pub count: i64,
    /// Newest last, at most ten, with their reasons.
    pub latest: Vec<DeadLetter>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
    /// The line, cut to 200 characters.
    pub line: String,
}

/// The brokers to ask, and the last reading (for rates and to spare the brokers).
pub(super) struct Health {
    kafka: Option<KafkaSettings>,
    last: Mutex<Option<(Instant, Arc<PipelineResponse>)>>,
}

impl Health {
    pub(super) fn new(kafka: Option<KafkaSettings>) -> Health {
        Health {
            kafka,
            last: Mutex::new(None),
        }
    }

    /// The current health, read again unless the last reading is under [`MIN_REFRESH`] old.
    pub(super) async fn read(&self, store: &Store) -> Arc<PipelineResponse> {
        let previous = self.last.lock().ok().and_then(|l| l.clone());
        if let Some((at, r)) = &previous
            && at.elapsed() < MIN_REFRESH
        {
            return Arc::clone(r);
        }
        let now = Instant::now();
        let mut r = PipelineResponse {
            checked_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ..PipelineResponse::default()
        };
        let stored = store.load_positions(AGGREGATE_GROUP, EVENTS_TOPIC).await;
        // The alerting groups keep their positions in the database too.
        let mut alerters = Vec::new();
        for group in store.alert_groups().await.unwrap_or_default() {
            if let Ok(p) = store.load_positions(&group, EVENTS_TOPIC).await {
                alerters.push((group, p.offsets));
            }
        }
        r.last_flush = store.last_flush().await.unwrap_or_else(|err| {
            tracing::warn!(%err, "cannot read the last flush time");
            None
        });
        match (&self.kafka, stored) {
            (None, _) => r.kafka_error = Some("no brokers configured".into()),
            (_, Err(err)) => r.kafka_error = Some(format!("cannot read stored positions: {err}")),
            (Some(kafka), Ok(stored)) => {
                let brokers = kafka.brokers.clone();
                let kafka = kafka.clone();
                let read = tokio::task::spawn_blocking(move || {
                    from_kafka(&kafka, &stored.offsets, &alerters)
                });
                match read.await {
                    Ok(Ok((topics, groups, dead))) => {
                        r.topics = topics;
                        r.groups = groups;
                        r.dead_letters = dead;
                    }
                    Ok(Err(e)) => {
                        r.kafka_error = Some(e);
                        r.kafka_note = Some(format!(
                            "No broker answers at {}: the figures come from the database \
                             and stay exact up to the last flush; new lines, throughput, lag \
                             and dead letters show again once a broker is reachable.",
                            brokers
                        ));
                    }
                    Err(e) => r.kafka_error = Some(format!("internal error: {e}")),
                }
            }
        }
        if self.kafka.is_none() {
            r.kafka_note = Some(
                "No brokers configured (--brokers): the figures come from the database; \
                 throughput, lag and dead letters are not shown."
                    .to_owned(),
            );
        }
        if let Some((at, before)) = previous {
            let secs = now.duration_since(at).as_secs_f64();
            rates(&mut r, &before, secs);
        }
        let r = Arc::new(r);
        if let Ok(mut last) = self.last.lock() {
            *last = Some((now, Arc::clone(&r)));
        }
        r
    }
}

/// What the preprocessors and the aggregators have yet to read: the sum of their lags (from
/// the brokers and the database), or why it cannot be read. `run` waits for 0 before it
/// calls a finite input counted.
pub async fn backlog(kafka: &KafkaSettings, store: &Store) -> Result<i64, String> {
    let r = Health::new(Some(kafka.clone())).read(store).await;
    if let Some(e) = &r.kafka_error {
        return Err(e.clone());
    }
    Ok(r.groups
        .iter()
        .filter(|g| g.group == PREPROCESS_GROUP || g.group == AGGREGATE_GROUP)
        .map(|g| g.lag)
        .sum())
}

/// Per-second rates of `r` against `before`, `secs` earlier.
fn rates(r: &mut PipelineResponse, before: &PipelineResponse, secs: f64) {
    if secs <= 0.0 {
        return;
    }
    for t in &mut r.topics {
        if let Some(b) = before.topics.iter().find(|b| b.topic == t.topic) {
            t.per_second = Some((t.messages - b.messages).max(0) as f64 / secs);
        }
    }
    let consumed = |g: &GroupHealth| g.partitions.iter().filter_map(|p| p.committed).sum::<i64>();
    for g in &mut r.groups {
        if let Some(b) = before.groups.iter().find(|b| b.group == g.group) {
            g.per_second = Some((consumed(g) - consumed(b)).max(0) as f64 / secs);
        }
    }
}

type KafkaReading = (Vec<TopicHealth>, Vec<GroupHealth>, DeadLetters);

/// Log ends of the three topics, the preprocessors' committed offsets (in Kafka), the
/// aggregators' (`stored`, from the database) and the latest dead letters.
fn from_kafka(
    kafka: &KafkaSettings,
    stored: &std::collections::HashMap<i32, i64>,
    alerters: &[(String, std::collections::HashMap<i32, i64>)],
) -> Result<KafkaReading, String> {
    let consumer: BaseConsumer<ObserverContext> = kafka
        .client_config(
            ClientRole::Consumer,
            &[
                ("group.id", PREPROCESS_GROUP),
                ("enable.auto.commit", "false"),
            ],
        )
        .create_with_context(ObserverContext)
        .map_err(|e| format!("cannot create a Kafka client: {e}"))?;
    let metadata = consumer
        .fetch_metadata(None, KAFKA_TIMEOUT)
        .map_err(|e| format!("brokers did not answer: {e}"))?;
    let partitions = |topic: &str| -> Vec<i32> {
        let mut v: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        v.sort_unstable();
        v
    };
    let mut log_ends: BTreeMap<(&str, i32), (i64, i64)> = BTreeMap::new();
    for topic in [RAW_TOPIC, EVENTS_TOPIC, DEAD_LETTER_TOPIC] {
        for p in partitions(topic) {
            let w = consumer
                .fetch_watermarks(topic, p, KAFKA_TIMEOUT)
                .map_err(|e| format!("cannot read the log end of {topic}/{p}: {e}"))?;
            log_ends.insert((topic, p), w);
        }
    }
    let end = |topic: &str| -> i64 {
        log_ends
            .iter()
            .filter(|((t, _), _)| *t == topic)
            .map(|(_, w)| w.1)
            .sum()
    };
    let topics = vec![
        topic(RAW_TOPIC, "lines imported", end(RAW_TOPIC)),
        topic(EVENTS_TOPIC, "events produced", end(EVENTS_TOPIC)),
        topic(DEAD_LETTER_TOPIC, "dead letters", end(DEAD_LETTER_TOPIC)),
    ];
    let mut tpl = TopicPartitionList::new();
    for p in partitions(RAW_TOPIC) {
        tpl.add_partition(RAW_TOPIC, p);
    }
    let committed = consumer
        .committed_offsets(tpl, KAFKA_TIMEOUT)
        .map_err(|e| format!("cannot read the preprocessors' offsets: {e}"))?;
    let group = |name: &str, topic: &str, positions_in: &str, at: &dyn Fn(i32) -> Option<i64>| {
        let partitions: Vec<PartitionHealth> = partitions(topic)
            .into_iter()
            .map(|p| {
                let (low, log_end) = log_ends.get(&(topic, p)).copied().unwrap_or((0, 0));
                let committed = at(p);
                PartitionHealth {
                    partition: p,
                    committed,
                    log_end,
                    lag: (log_end - committed.unwrap_or(low)).max(0),
                }
            })
            .collect();
        GroupHealth {
            group: name.to_owned(),
            topic: topic.to_owned(),
            positions_in: positions_in.to_owned(),
            lag: partitions.iter().map(|p| p.lag).sum(),
            partitions,
            per_second: None,
        }
    };
    let mut groups = vec![
        group(PREPROCESS_GROUP, RAW_TOPIC, "kafka", &|p| {
            committed
                .find_partition(RAW_TOPIC, p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
        }),
        group(AGGREGATE_GROUP, EVENTS_TOPIC, "database", &|p| {
            stored.get(&p).copied()
        }),
    ];
    for (name, offsets) in alerters {
        groups.push(group(name, EVENTS_TOPIC, "database", &|p| {
            offsets.get(&p).copied()
        }));
    }
    let dead = DeadLetters {
        count: end(DEAD_LETTER_TOPIC),
        latest: latest_dead_letters(kafka, &log_ends),
    };
    Ok((topics, groups, dead))
}

fn topic(name: &str, role: &str, messages: i64) -> TopicHealth {
    TopicHealth {
        topic: name.to_owned(),
        role: role.to_owned(),
        messages,
        per_second: None,
    }
}

/// The newest dead letters: the last few of every partition, newest last (by offset within a
/// partition; partitions have no order between them).
fn latest_dead_letters(
    kafka: &KafkaSettings,
    log_ends: &BTreeMap<(&str, i32), (i64, i64)>,
) -> Vec<DeadLetter> {
    let mut tpl = TopicPartitionList::new();
    let mut wanted = 0usize;
    for (&(topic, p), &(low, high)) in log_ends {
        if topic == DEAD_LETTER_TOPIC && high > low {
            let from = (high - LATEST_DEAD_LETTERS as i64).max(low);
            if tpl
                .add_partition_offset(topic, p, Offset::Offset(from))
                .is_ok()
            {
                wanted += (high - from) as usize;
            }
        }
    }
    if wanted == 0 {
        return Vec::new();
    }
    let Some(consumer) = dead_letter_reader(kafka) else {
        return Vec::new();
    };
    if let Err(e) = consumer.assign(&tpl) {
        tracing::warn!(%e, "cannot read dead letters");
        return Vec::new();
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut out = Vec::new();
    while out.len() < wanted && Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let reason = reason_of(&m);
        let line: String = m
            .payload()
            .map(|p| String::from_utf8_lossy(p).chars().take(200).collect())
            .unwrap_or_default();
        out.push(DeadLetter {
            partition: m.partition(),
            offset: m.offset(),
            reason,
            line,
        });
    }
    out.sort_by_key(|d| (d.offset, d.partition));
    let skip = out.len().saturating_sub(LATEST_DEAD_LETTERS);
    out.drain(..skip);
    out
}

pub(super) async fn pipeline(State(state): State<AppState>) -> Response {
    let r = state.health.read(&state.store).await;
    super::api::fresh(&*r)
}

/// A consumer that reads the dead-letter topic by assignment (it joins no group and commits
/// nothing); `None`, with a warning, when it cannot be made.
fn dead_letter_reader(kafka: &KafkaSettings) -> Option<BaseConsumer<ObserverContext>> {
    kafka
        .client_config(
            ClientRole::Consumer,
            &[
                ("group.id", "pageviews-health"),
                ("enable.auto.commit", "false"),
            ],
        )
        .create_with_context(ObserverContext)
        .map_err(|e| tracing::warn!(%e, "cannot read the dead letters"))
        .ok()
}

/// A dead letter's reason header.
fn reason_of(m: &rdkafka::message::BorrowedMessage<'_>) -> String {
    m.headers()
        .and_then(|h| {
            h.iter()
                .find(|h| h.key == headers::REASON)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
        .unwrap_or_else(|| "(no reason given)".to_owned())
}

/// A dead-letter reason as a metric label: numbers and quoted text replaced, so that the
/// label set stays small (`COMBINED: invalid UTF-8 at byte N`).
pub fn reason_label(reason: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    let mut last_digit = false;
    let mut prev = ' ';
    for c in reason.chars() {
        let after = std::mem::replace(&mut prev, c);
        if c == '"' {
            quoted = !quoted;
            if quoted {
                out.push_str("\"…\"");
            }
            continue;
        }
        if quoted {
            continue;
        }
        // A number on its own (`byte 51`), not part of a word (`UTF-8`).
        if c.is_ascii_digit() && (last_digit || !(after.is_alphanumeric() || after == '-')) {
            if !last_digit {
                out.push('N');
            }
            last_digit = true;
            continue;
        }
        last_digit = false;
        out.push(c);
    }
    out.chars().take(100).collect()
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `GET /metrics`: the Prometheus text exposition format (0.0.4).
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    match metrics_text(&state).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("database unavailable: {err}\n"),
        )
            .into_response(),
    }
}

async fn metrics_text(state: &AppState) -> Result<String, StoreError> {
    let health = state.health.read(&state.store).await;
    let countries = state.store.country_counts().await?;
    let flushes = state.store.flush_durations().await?;
    let reasons = state.dead_letter_reasons.snapshot();
    let mut out = String::new();
    for (metric, role, help) in [
        (
            "pageviews_lines_imported_total",
            "lines imported",
            "Lines on the raw topic (its log end over all partitions).",
        ),
        (
            "pageviews_events_produced_total",
            "events produced",
            "Events on the events topic (its log end over all partitions).",
        ),
    ] {
        if let Some(t) = health.topics.iter().find(|t| t.role == role) {
            let _ = writeln!(
                out,
                "# HELP {metric} {help}\n# TYPE {metric} counter\n{metric} {}",
                t.messages
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP pageviews_dead_letters_total Dead letters by reason (numbers and quoted text in the reason replaced).\n# TYPE pageviews_dead_letters_total counter"
    );
    for (reason, n) in &reasons {
        let _ = writeln!(
            out,
            "pageviews_dead_letters_total{{reason=\"{}\"}} {n}",
            label(reason)
        );
    }
    let visits = super::visits::sessions_under(&state.store, &Default::default()).await?;
    for (metric, kind, help, n) in [
        (
            "pageviews_open_visits",
            "gauge",
            "Visitors with a visit still open, as of the aggregators' last flushes.",
            visits.open,
        ),
        (
            "pageviews_sessions_total",
            "counter",
            "Closed visits (sessions).",
            visits.visits,
        ),
        (
            "pageviews_late_page_requests_total",
            "counter",
            "Page requests later than --session-lateness, left out of visits.",
            visits.late,
        ),
        (
            "pageviews_visits_closed_early_total",
            "counter",
            "Visits closed early because --max-open-visits was reached.",
            visits.closed_early,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {metric} {help}\n# TYPE {metric} {kind}\n{metric} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP pageviews_flushes_total Committed flush transactions, by consumer group.\n# TYPE pageviews_flushes_total counter"
    );
    for (group, f) in &flushes {
        let _ = writeln!(
            out,
            "pageviews_flushes_total{{group=\"{}\"}} {}",
            label(group),
            f.count
        );
    }
    let _ = writeln!(
        out,
        "# HELP pageviews_flush_data_errors_total Flushes the database refused for their data, written again with the offending values counted as (invalid).\n# TYPE pageviews_flush_data_errors_total counter"
    );
    for (group, f) in &flushes {
        let _ = writeln!(
            out,
            "pageviews_flush_data_errors_total{{group=\"{}\"}} {}",
            label(group),
            f.data_errors
        );
    }
    let _ = writeln!(
        out,
        "# HELP pageviews_lost_messages_total Messages the broker deleted (retention) before a consumer group read them, by group and topic: never counted. The preprocessors' figure comes from the dead-letter topic, so it covers what that topic still holds.\n# TYPE pageviews_lost_messages_total counter\npageviews_lost_messages_total{{group=\"{PREPROCESS_GROUP}\",topic=\"{RAW_TOPIC}\"}} {}",
        state.dead_letter_reasons.lost()
    );
    for (group, f) in &flushes {
        let _ = writeln!(
            out,
            "pageviews_lost_messages_total{{group=\"{}\",topic=\"{EVENTS_TOPIC}\"}} {}",
            label(group),
            f.lost
        );
    }
    let _ = writeln!(
        out,
        "# HELP pageviews_flush_duration_seconds Time from a flush's start to its commit.\n# TYPE pageviews_flush_duration_seconds histogram"
    );
    for (group, f) in &flushes {
        let g = label(group);
        let mut cumulative = 0;
        for (le, n) in &f.buckets {
            cumulative += n;
            let le = if *le == i64::MAX {
                "+Inf".to_owned()
            } else {
                format!("{}", *le as f64 / 1000.0)
            };
            let _ = writeln!(
                out,
                "pageviews_flush_duration_seconds_bucket{{group=\"{g}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "pageviews_flush_duration_seconds_sum{{group=\"{g}\"}} {}",
            f.sum_ms as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "pageviews_flush_duration_seconds_count{{group=\"{g}\"}} {}",
            f.count
        );
    }
    let _ = writeln!(
        out,
        "# HELP pageviews_consumer_lag Messages not yet read by a consumer group, per partition.\n# TYPE pageviews_consumer_lag gauge"
    );
    for g in &health.groups {
        for p in &g.partitions {
            let _ = writeln!(
                out,
                "pageviews_consumer_lag{{group=\"{}\",topic=\"{}\",partition=\"{}\"}} {}",
                label(&g.group),
                label(&g.topic),
                p.partition,
                p.lag
            );
        }
    }
    let mut alert_status = Vec::new();
    for group in state.store.alert_groups().await? {
        let status = state.store.alert_status(&group).await?;
        alert_status.push((group, status));
    }
    for (metric, kind, help, value) in [
        (
            "pageviews_alerts_raised_total",
            "counter",
            "Alerts of closed windows written to the outbox, by alerting group.",
            (|s: &crate::alert::tables::AlertStatus| s.pending + s.delivered)
                as fn(&crate::alert::tables::AlertStatus) -> u64,
        ),
        (
            "pageviews_alerts_pending",
            "gauge",
            "Alerts not delivered yet (their sink is down or refuses them), by alerting group.",
            |s| s.pending,
        ),
        (
            "pageviews_alert_late_events_total",
            "counter",
            "Events that came after their window closed (see --lateness), by alerting group.",
            |s| s.late_events,
        ),
    ] {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        for (group, status) in &alert_status {
            let _ = writeln!(
                out,
                "{metric}{{group=\"{}\"}} {}",
                label(group),
                value(status)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP pageviews_visits_total Visits counted, by country.\n# TYPE pageviews_visits_total counter"
    );
    for c in &countries {
        let _ = writeln!(
            out,
            "pageviews_visits_total{{country=\"{}\"}} {}",
            label(&c.country_code),
            c.visits
        );
    }
    if let Some(e) = &health.kafka_error {
        let _ = writeln!(out, "# brokers not read: {}", e.replace('\n', " "));
    }
    Ok(out)
}

/// Dead letters by reason label, tallied by a background reader of the dead-letter topic
/// (from its start: the topic holds every dead letter the pipeline ever wrote).
#[derive(Default)]
pub(super) struct ReasonTally {
    counts: Mutex<BTreeMap<String, u64>>,
    /// Raw lines the broker deleted before the preprocessors read them: the sum of the
    /// `pv-lost` headers of the dead letters that stand for them.
    lost: std::sync::atomic::AtomicU64,
}

impl ReasonTally {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn lost(&self) -> u64 {
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the dead-letter topic until `shutdown`, counting each message's reason.
    pub(super) fn start(
        self: &Arc<Self>,
        kafka: KafkaSettings,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let tally = Arc::clone(self);
        std::thread::Builder::new()
            .name("dead-letter-tally".into())
            .spawn(move || tally.run(&kafka, &shutdown))
            .map(drop)
            .unwrap_or_else(|e| tracing::warn!(%e, "cannot start the dead-letter tally"));
    }

    fn run(&self, kafka: &KafkaSettings, shutdown: &tokio_util::sync::CancellationToken) {
        let Some(consumer) = dead_letter_reader(kafka) else {
            return;
        };
        // The partitions can appear later (topics created by another process).
        let mut assigned = 0usize;
        let mut checked = Instant::now() - Duration::from_secs(60);
        while !shutdown.is_cancelled() {
            if checked.elapsed() >= Duration::from_secs(5) {
                checked = Instant::now();
                if let Ok(m) =
                    consumer.fetch_metadata(Some(DEAD_LETTER_TOPIC), Duration::from_secs(2))
                {
                    let n = m
                        .topics()
                        .iter()
                        .find(|t| t.name() == DEAD_LETTER_TOPIC)
                        .map_or(0, |t| t.partitions().len());
                    if n > assigned {
                        let mut tpl = TopicPartitionList::new();
                        for p in assigned..n {
                            let _ = tpl.add_partition_offset(
                                DEAD_LETTER_TOPIC,
                                p as i32,
                                Offset::Beginning,
                            );
                        }
                        if consumer.incremental_assign(&tpl).is_ok() {
                            assigned = n;
                        }
                    }
                }
            }
            if assigned == 0 {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let reason = reason_label(&reason_of(&m));
                if let Ok(mut c) = self.counts.lock() {
                    *c.entry(reason).or_default() += 1;
                }
                let lost = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == headers::LOST))
                    .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<u64>().ok());
                if let Some(n) = lost {
                    self.lost.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_become_small_label_sets() {
        assert_eq!(
            reason_label("COMBINED: invalid UTF-8 at byte 51"),
            "COMBINED: invalid UTF-8 at byte N"
        );
        assert_eq!(
            reason_label("COMBINED: invalid status \"2x0\""),
            "COMBINED: invalid status \"…\""
        );
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
