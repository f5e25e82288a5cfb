//! The statistics database: counts and the aggregator's Kafka offsets, side by side.
//!
//! Counts and offsets are written in ONE transaction per flush, so after any crash the
//! database holds counts for exactly the messages before the stored offsets. Offsets are
//! compare-and-set: a flush only advances a partition's offset from the value its writer read
//! when it was assigned the partition. A zombie aggregator (revoked, but not yet aware of it)
//! therefore cannot write counts that the partition's new owner will count again.
//!
//! SQLite (via `libsql`, the SQLite the embedded broker links) is the default for one
//! machine; PostgreSQL (`tokio-postgres` with a `deadpool` pool) has the same schema and the
//! same flush, for aggregators on several machines.

mod postgres;
mod sqlite;
mod tls;

use std::collections::HashMap;
use std::time::Duration;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Schema, applied at open by both databases (same SQL). `IF NOT EXISTS` keeps it idempotent;
/// new versions append statements here.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS country_stats (
        country_code TEXT PRIMARY KEY,
        visit_count BIGINT NOT NULL,
        updated_at TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS consumer_offsets (
        consumer_group TEXT NOT NULL,
        topic TEXT NOT NULL,
        \"partition\" INTEGER NOT NULL,
        next_offset BIGINT NOT NULL,
        PRIMARY KEY (consumer_group, topic, \"partition\"))",
    // Per events partition, the highest raw (source) offset counted from each raw partition:
    // events replayed by a preprocessor that crashed before committing are dropped against it.
    "CREATE TABLE IF NOT EXISTS source_watermarks (
        consumer_group TEXT NOT NULL,
        topic TEXT NOT NULL,
        \"partition\" INTEGER NOT NULL,
        source_partition INTEGER NOT NULL,
        source_offset BIGINT NOT NULL,
        PRIMARY KEY (consumer_group, topic, \"partition\", source_partition))",
    // Which topics a partition's stored offset and watermarks refer to (Kafka topic ids of the
    // consumed topic and of the raw topic the watermarks count): a topic deleted and created
    // again, or a broker that starts over, has new ids and the old positions mean nothing in it.
    "CREATE TABLE IF NOT EXISTS topic_ids (
        consumer_group TEXT NOT NULL,
        topic TEXT NOT NULL,
        \"partition\" INTEGER NOT NULL,
        topic_id TEXT,
        source_topic_id TEXT,
        PRIMARY KEY (consumer_group, topic, \"partition\"))",
    // Every dimension's counts (crate::aggregate::dimensions): a new dimension is new rows,
    // not a new table.
    "CREATE TABLE IF NOT EXISTS dimension_counts (
        dimension TEXT NOT NULL,
        value TEXT NOT NULL,
        visits BIGINT NOT NULL,
        bytes BIGINT NOT NULL,
        humans BIGINT NOT NULL,
        PRIMARY KEY (dimension, value))",
    // The same per hour of event time (seconds since the epoch), for "the last 24 hours".
    "CREATE TABLE IF NOT EXISTS dimension_hours (
        dimension TEXT NOT NULL,
        hour BIGINT NOT NULL,
        value TEXT NOT NULL,
        visits BIGINT NOT NULL,
        bytes BIGINT NOT NULL,
        humans BIGINT NOT NULL,
        PRIMARY KEY (dimension, hour, value))",
    // Visits per minute (event time, seconds since the epoch) and country: the time series.
    "CREATE TABLE IF NOT EXISTS minute_counts (
        minute BIGINT NOT NULL,
        country_code TEXT NOT NULL,
        visits BIGINT NOT NULL,
        bytes BIGINT NOT NULL,
        humans BIGINT NOT NULL,
        PRIMARY KEY (minute, country_code))",
    // Unique visitors per day and country (`*`: all): HyperLogLog registers (crate::sketch),
    // merged at each flush, and their estimate. BYTEA is a blob to SQLite as well.
    "CREATE TABLE IF NOT EXISTS unique_visitors (
        day TEXT NOT NULL,
        country_code TEXT NOT NULL,
        registers BYTEA NOT NULL,
        estimate BIGINT NOT NULL,
        PRIMARY KEY (day, country_code))",
    // Histograms (crate::sketch::bucket_of) of response sizes and request times, per country
    // and for all (`*`).
    "CREATE TABLE IF NOT EXISTS histogram_buckets (
        metric TEXT NOT NULL,
        scope TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        visits BIGINT NOT NULL,
        PRIMARY KEY (metric, scope, bucket))",
    // Flushes per consumer group by duration (start to commit), a histogram for /metrics:
    // each flush adds one to the row of its bucket (`le_ms`: upper bound in milliseconds) and
    // its duration to the row's total.
    "CREATE TABLE IF NOT EXISTS flush_stats (
        consumer_group TEXT NOT NULL,
        le_ms BIGINT NOT NULL,
        flushes BIGINT NOT NULL,
        total_ms BIGINT NOT NULL,
        PRIMARY KEY (consumer_group, le_ms))",
    // Alerting groups (crate::alert): requests and server errors per window and subject (a
    // country or `*`), added by each flush like the counts.
    "CREATE TABLE IF NOT EXISTS alert_windows (
        consumer_group TEXT NOT NULL,
        window_secs BIGINT NOT NULL,
        window_start BIGINT NOT NULL,
        subject TEXT NOT NULL,
        requests BIGINT NOT NULL,
        errors BIGINT NOT NULL,
        PRIMARY KEY (consumer_group, window_secs, window_start, subject))",
    // Each partition's event-time clock (largest event time read) and since when its member has
    // been at its log end (wall clock, ms; NULL while reading): the group's watermark.
    "CREATE TABLE IF NOT EXISTS alert_clocks (
        consumer_group TEXT NOT NULL,
        topic TEXT NOT NULL,
        \"partition\" INTEGER NOT NULL,
        clock BIGINT,
        caught_up_since BIGINT,
        PRIMARY KEY (consumer_group, topic, \"partition\"))",
    // Per alerting group: windows ending at or before `closed_through` are closed (their alerts
    // written); events that came too late; the earliest event time counted.
    "CREATE TABLE IF NOT EXISTS alert_state (
        consumer_group TEXT PRIMARY KEY,
        closed_through BIGINT NOT NULL,
        late_events BIGINT NOT NULL,
        first_event_time BIGINT)",
    // The alerts of closed windows (an outbox): written when their window closes, delivered
    // from here in order, marked when delivered; an id is never written twice.
    "CREATE TABLE IF NOT EXISTS alerts (
        consumer_group TEXT NOT NULL,
        id TEXT NOT NULL,
        window_start BIGINT NOT NULL,
        payload TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        claimed_until BIGINT,
        delivered_at BIGINT,
        attempts BIGINT NOT NULL,
        last_error TEXT,
        PRIMARY KEY (consumer_group, id))",
    // Top-N reads of a dimension (the dashboard) and compaction (the values with the fewest
    // visits) walk this index instead of sorting every value.
    "CREATE INDEX IF NOT EXISTS dimension_counts_by_visits
        ON dimension_counts (dimension, visits DESC, value)",
    // Flushes that met a data error and were written with the offending values counted as
    // `(invalid)` (see FlushBatch::quarantine): for /metrics and the pipeline's health.
    "CREATE TABLE IF NOT EXISTS flush_data_errors (
        consumer_group TEXT PRIMARY KEY,
        errors BIGINT NOT NULL,
        last_error TEXT NOT NULL)",
    // Messages a group's topic no longer held when the group came to read them (deleted by
    // the broker's retention while the group was down or behind): for /metrics.
    "CREATE TABLE IF NOT EXISTS lost_messages (
        consumer_group TEXT PRIMARY KEY,
        lost BIGINT NOT NULL)",
];

/// The columns (and SQL types) the statements rely on, checked at open so that a table of the
/// same name made by something else is a clear error, not a failure at the first flush.
const EXPECTED_COLUMNS: &[(&str, &[(&str, SqlType)])] = &[
    (
        "country_stats",
        &[
            ("country_code", SqlType::Text),
            ("visit_count", SqlType::BigInt),
            ("updated_at", SqlType::Text),
        ],
    ),
    (
        "consumer_offsets",
        &[
            ("consumer_group", SqlType::Text),
            ("topic", SqlType::Text),
            ("partition", SqlType::Integer),
            ("next_offset", SqlType::BigInt),
        ],
    ),
    (
        "source_watermarks",
        &[
            ("consumer_group", SqlType::Text),
            ("topic", SqlType::Text),
            ("partition", SqlType::Integer),
            ("source_partition", SqlType::Integer),
            ("source_offset", SqlType::BigInt),
        ],
    ),
    (
        "topic_ids",
        &[
            ("consumer_group", SqlType::Text),
            ("topic", SqlType::Text),
            ("partition", SqlType::Integer),
            ("topic_id", SqlType::Text),
            ("source_topic_id", SqlType::Text),
        ],
    ),
    (
        "dimension_counts",
        &[
            ("dimension", SqlType::Text),
            ("value", SqlType::Text),
            ("visits", SqlType::BigInt),
            ("bytes", SqlType::BigInt),
            ("humans", SqlType::BigInt),
        ],
    ),
    (
        "dimension_hours",
        &[
            ("dimension", SqlType::Text),
            ("hour", SqlType::BigInt),
            ("value", SqlType::Text),
            ("visits", SqlType::BigInt),
            ("bytes", SqlType::BigInt),
            ("humans", SqlType::BigInt),
        ],
    ),
    (
        "minute_counts",
        &[
            ("minute", SqlType::BigInt),
            ("country_code", SqlType::Text),
            ("visits", SqlType::BigInt),
            ("bytes", SqlType::BigInt),
            ("humans", SqlType::BigInt),
        ],
    ),
    (
        "unique_visitors",
        &[
            ("day", SqlType::Text),
            ("country_code", SqlType::Text),
            ("registers", SqlType::Bytes),
            ("estimate", SqlType::BigInt),
        ],
    ),
    (
        "histogram_buckets",
        &[
            ("metric", SqlType::Text),
            ("scope", SqlType::Text),
            ("bucket", SqlType::Integer),
            ("visits", SqlType::BigInt),
        ],
    ),
    (
        "flush_stats",
        &[
            ("consumer_group", SqlType::Text),
            ("le_ms", SqlType::BigInt),
            ("flushes", SqlType::BigInt),
            ("total_ms", SqlType::BigInt),
        ],
    ),
    (
        "alert_windows",
        &[
            ("consumer_group", SqlType::Text),
            ("window_secs", SqlType::BigInt),
            ("window_start", SqlType::BigInt),
            ("subject", SqlType::Text),
            ("requests", SqlType::BigInt),
            ("errors", SqlType::BigInt),
        ],
    ),
    (
        "alert_clocks",
        &[
            ("consumer_group", SqlType::Text),
            ("topic", SqlType::Text),
            ("partition", SqlType::Integer),
            ("clock", SqlType::BigInt),
            ("caught_up_since", SqlType::BigInt),
        ],
    ),
    (
        "alert_state",
        &[
            ("consumer_group", SqlType::Text),
            ("closed_through", SqlType::BigInt),
            ("late_events", SqlType::BigInt),
            ("first_event_time", SqlType::BigInt),
        ],
    ),
    (
        "alerts",
        &[
            ("consumer_group", SqlType::Text),
            ("id", SqlType::Text),
            ("window_start", SqlType::BigInt),
            ("payload", SqlType::Text),
            ("created_at", SqlType::BigInt),
            ("claimed_until", SqlType::BigInt),
            ("delivered_at", SqlType::BigInt),
            ("attempts", SqlType::BigInt),
            ("last_error", SqlType::Text),
        ],
    ),
    (
        "flush_data_errors",
        &[
            ("consumer_group", SqlType::Text),
            ("errors", SqlType::BigInt),
            ("last_error", SqlType::Text),
        ],
    ),
    (
        "lost_messages",
        &[("consumer_group", SqlType::Text), ("lost", SqlType::BigInt)],
    ),
];

/// Upper bounds (ms) of the flush duration buckets; the last is +Inf.
pub const FLUSH_BUCKETS_MS: &[i64] = &[
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10_000,
    30_000,
    i64::MAX,
];

/// The bucket of a flush that took `elapsed`, and its milliseconds.
fn flush_bucket(elapsed: Duration) -> (i64, i64) {
    let ms = i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX);
    let le = FLUSH_BUCKETS_MS
        .iter()
        .copied()
        .find(|&le| ms <= le)
        .unwrap_or(i64::MAX);
    (le, ms)
}

/// A consumer group's flushes by duration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushDurations {
    pub count: u64,
    pub sum_ms: u64,
    /// (upper bound in ms, flushes in that bucket only), every bucket of
    /// [`FLUSH_BUCKETS_MS`] in order.
    pub buckets: Vec<(i64, u64)>,
    /// Flushes written after a data error, with the offending values as `(invalid)`.
    pub data_errors: u64,
    /// Messages of the group's topic deleted by the broker before the group read them.
    pub lost: u64,
}

/// The `le_ms` under which [`FLUSH_STATS`] reports a group's data errors.
const DATA_ERROR_ROW: i64 = -1;
/// The `le_ms` under which [`FLUSH_STATS`] reports a group's lost messages.
const LOST_ROW: i64 = -2;

/// Every group's flush-duration rows, and its data errors and lost messages as more rows (the
/// same SQL on both databases).
const FLUSH_STATS: &str = "SELECT consumer_group, le_ms, flushes, total_ms FROM flush_stats
     UNION ALL SELECT consumer_group, -1, errors, 0 FROM flush_data_errors
     UNION ALL SELECT consumer_group, -2, lost, 0 FROM lost_messages";

impl FlushDurations {
    /// From stored rows (le_ms, flushes, total_ms).
    fn from_rows(rows: &[(i64, u64, u64)]) -> FlushDurations {
        let (lost, rows): (Vec<&(i64, u64, u64)>, Vec<_>) =
            rows.iter().partition(|r| r.0 == LOST_ROW);
        let (errors, rows): (Vec<&(i64, u64, u64)>, Vec<_>) =
            rows.into_iter().partition(|r| r.0 == DATA_ERROR_ROW);
        FlushDurations {
            data_errors: errors.iter().map(|r| r.1).sum(),
            lost: lost.iter().map(|r| r.1).sum(),
            count: rows.iter().map(|r| r.1).sum(),
            sum_ms: rows.iter().map(|r| r.2).sum(),
            buckets: FLUSH_BUCKETS_MS
                .iter()
                .map(|&le| {
                    let n = rows.iter().filter(|r| r.0 == le).map(|r| r.1).sum();
                    (le, n)
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SqlType {
    Text,
    BigInt,
    Integer,
    Bytes,
}

impl SqlType {
    /// The type's name as SQLite's `PRAGMA table_info` reports a declared type.
    fn sqlite(self) -> &'static str {
        match self {
            SqlType::Text => "TEXT",
            SqlType::BigInt => "BIGINT",
            SqlType::Integer => "INTEGER",
            SqlType::Bytes => "BYTEA",
        }
    }
    /// The type's name in PostgreSQL's `information_schema.columns.data_type`.
    fn postgres(self) -> &'static str {
        match self {
            SqlType::Text => "text",
            SqlType::BigInt => "bigint",
            SqlType::Integer => "integer",
            SqlType::Bytes => "bytea",
        }
    }
}

/// Compares a table's columns (name → type as the database reports it) with what pageviews
/// needs; the first difference, in words.
fn schema_problem(
    table: &str,
    found: &HashMap<String, String>,
    type_name: fn(SqlType) -> &'static str,
) -> Option<String> {
    let (_, columns) = EXPECTED_COLUMNS.iter().find(|(t, _)| *t == table)?;
    for (column, ty) in columns.iter() {
        let want = type_name(*ty);
        match found.get(*column) {
            None => return Some(format!("it has no column {column}")),
            Some(have) if !have.eq_ignore_ascii_case(want) => {
                return Some(format!(
                    "its column {column} is {}, pageviews needs {}",
                    have.to_ascii_lowercase(),
                    want.to_ascii_lowercase()
                ));
            }
            Some(_) => {}
        }
    }
    None
}

/// Errors from the statistics database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL as [`crate::secrets::redact`] shows it.
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://USER@HOST:PORT/DB")]
    UnsupportedUrl(String),
    #[error("cannot open database {url}: {} (check --database / PAGEVIEWS_DATABASE)", causes(.source.as_ref()))]
    Open {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "cannot use database {url}: table {table} exists but {problem} (point --database at another database or schema, or drop the table)"
    )]
    Schema {
        url: String,
        table: String,
        problem: String,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] libsql::Error),
    #[error("database error: {}", causes(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("cannot get a database connection: {}", causes(.0))]
    Pool(#[source] deadpool_postgres::PoolError),
    #[error("the database did not answer within {0:?}")]
    Timeout(Duration),
    #[error("internal error: a database task stopped: {0}")]
    Task(String),
    #[error("unreadable row in the database: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the database refused the data itself (a value too long for an index, a
    /// number out of range, a constraint): retrying the same flush would fail the same way
    /// forever, so the caller must change what it writes (`FlushBatch::quarantine`).
    /// PostgreSQL SQLSTATE classes 22 (data exception), 23 (integrity constraint) and 54
    /// (program limit exceeded); SQLite TOOBIG, CONSTRAINT, MISMATCH and RANGE. Everything
    /// else (connections, locks, serialization failures, timeouts) is transient.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Postgres(e) => e
                .code()
                .is_some_and(|c| matches!(&c.code()[..2], "22" | "23" | "54")),
            StoreError::Sqlite(libsql::Error::SqliteFailure(code, _)) => {
                // Primary result codes (the low byte): TOOBIG 18, CONSTRAINT 19,
                // MISMATCH 20, RANGE 25.
                matches!(code & 0xff, 18 | 19 | 20 | 25)
            }
            _ => false,
        }
    }
}

/// `{table}.{column} + excluded.{column}` in an upsert, saturating at BIGINT's largest value
/// (PostgreSQL fails the statement on overflow, SQLite turns the sum into a REAL): the same
/// SQL on both databases.
pub(crate) fn saturating_add(table: &str, column: &str) -> String {
    format!(
        "CASE WHEN {table}.{column} > 9223372036854775807 - excluded.{column} \
         THEN 9223372036854775807 ELSE {table}.{column} + excluded.{column} END"
    )
}

/// An error and its sources on one line: the PostgreSQL driver's own messages ("db error",
/// "error connecting to server") only say what failed, their sources say why.
pub(crate) fn causes(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A partition's offset move in a flush: from the value the writer last saw to the next offset
/// to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetUpdate {
    pub partition: i32,
    /// What the writer believes is stored (`None`: no row yet).
    pub expected: Option<i64>,
    /// The next offset to read after this flush.
    pub next: i64,
}

/// The highest raw offset of `source_partition` counted into events partition `partition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WatermarkUpdate {
    pub partition: i32,
    pub source_partition: i32,
    pub source_offset: i64,
}

/// The Kafka topic ids that stored positions refer to (see `crate::kafka::describe_topic_ids`).
/// `None` where the broker reports none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicIdentity {
    /// The consumed topic's id (what the offsets count in).
    pub topic_id: Option<String>,
    /// The raw topic's id (what the source watermarks count in).
    pub source_topic_id: Option<String>,
}

/// Everything one flush writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushBatch {
    pub consumer_group: String,
    pub topic: String,
    /// Visits to add, per country code.
    pub increments: Vec<(String, u64)>,
    pub offsets: Vec<OffsetUpdate>,
    /// Source watermarks that moved; only for partitions in `offsets` (so they are fenced by
    /// the same compare-and-set).
    pub watermarks: Vec<WatermarkUpdate>,
    /// Partitions (of `offsets`) whose stored watermarks count in a raw topic that no longer
    /// exists: deleted before `watermarks` are written.
    pub reset_watermarks: Vec<i32>,
    /// The topics the written positions refer to, recorded for every partition in `offsets`.
    pub identity: TopicIdentity,
    /// Visits and bytes to add per (dimension, value).
    pub dimensions: Vec<DimensionIncrement>,
    /// What to add per (dimension, hour, value): the same counts by hour of event time.
    pub dimension_hours: Vec<DimensionHourIncrement>,
    /// Hours before this one are deleted from `dimension_hours` (the time series' retention).
    pub prune_hours_before: Option<i64>,
    /// Visits and bytes to add per (minute, country).
    pub minutes: Vec<MinuteIncrement>,
    /// Minutes before this one (seconds since the epoch) are deleted: the time series'
    /// retention.
    pub prune_minutes_before: Option<i64>,
    /// Unique-visitor sketches to merge into the stored ones.
    pub uniques: Vec<UniqueSketch>,
    /// Histogram bucket counts to add.
    pub histograms: Vec<HistogramIncrement>,
    /// An alerting group's flush ([`crate::alert`]); `None` for the aggregator.
    pub alert: Option<AlertFlush>,
    /// Values kept per dimension in `dimension_counts` and per dimension and hour in
    /// `dimension_hours`: the flush folds the values with the fewest visits beyond this into
    /// `(other)` for every dimension (and hour) it wrote. `None` keeps every value.
    pub keep_values: Option<u32>,
    /// Set by [`FlushBatch::quarantine`]: the data error that made this batch's values
    /// `(invalid)`, recorded in `flush_data_errors` by the same transaction.
    pub data_error: Option<String>,
    /// Messages of `topic` the group found gone from the broker (deleted by its retention
    /// before they were read) since its last flush: added to `lost_messages` by the same
    /// transaction as the offsets that moved past them, so each is counted once.
    pub lost: u64,
}

/// The value under which a flush counts what the database refused (see
/// [`FlushBatch::quarantine`]).
pub const INVALID: &str = "(invalid)";

/// The value that compaction folds values into (the same as the aggregator's top-K).
pub const OTHER: &str = "(other)";

impl FlushBatch {
    /// After a data error (`error`): counts every dimension value that may have caused it
    /// under [`INVALID`], so that the flush can be written with exact totals and no
    /// partition stalls. With `everything` false only suspicious values move (longer than
    /// 200 bytes, or not printable ASCII); with `everything` true all of them do (a second
    /// data error: the cause was not a value we can recognise). Returns how many rows moved.
    pub fn quarantine(&mut self, error: &str, everything: bool) -> usize {
        let suspicious =
            |v: &str| everything || v.len() > 200 || !v.bytes().all(|b| (0x20..0x7f).contains(&b));
        let moved = quarantine_rows(
            &mut self.dimensions,
            |d| (&mut d.value, &mut d.amount),
            |d| (d.dimension.clone(), d.value.clone()),
            suspicious,
        ) + quarantine_rows(
            &mut self.dimension_hours,
            |d| (&mut d.value, &mut d.amount),
            |d| (d.dimension.clone(), d.hour, d.value.clone()),
            suspicious,
        );
        self.data_error = Some(crate::event::policy::bounded(error).into_owned());
        moved
    }
}

/// Renames the `suspicious` values of `rows` to [`INVALID`], then merges the rows of equal
/// `key` (PostgreSQL refuses an upsert that touches one row twice), sorted by key. Returns how
/// many rows were renamed.
fn quarantine_rows<T, K: Ord>(
    rows: &mut Vec<T>,
    parts: impl Fn(&mut T) -> (&mut String, &mut Amount),
    key: impl Fn(&T) -> K,
    suspicious: impl Fn(&str) -> bool,
) -> usize {
    let mut moved = 0;
    let mut merged: std::collections::BTreeMap<K, T> = std::collections::BTreeMap::new();
    for mut r in std::mem::take(rows) {
        let (value, _) = parts(&mut r);
        if value.as_str() != INVALID && suspicious(value) {
            *value = INVALID.to_owned();
            moved += 1;
        }
        match merged.entry(key(&r)) {
            std::collections::btree_map::Entry::Occupied(mut e) => {
                let (_, amount) = parts(&mut r);
                let add = *amount;
                *parts(e.get_mut()).1 += add;
            }
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(r);
            }
        }
    }
    *rows = merged.into_values().collect();
    moved
}

/// Adds a group's lost messages (parameters: the group, how many).
const RECORD_LOST: &str = "INSERT INTO lost_messages (consumer_group, lost) VALUES (?1, ?2)
     ON CONFLICT (consumer_group) DO UPDATE SET lost = lost_messages.lost + excluded.lost";

/// Counts a flush written after a data error (parameters: the group, the error).
const RECORD_DATA_ERROR: &str =
    "INSERT INTO flush_data_errors (consumer_group, errors, last_error) VALUES (?1, 1, ?2)
     ON CONFLICT (consumer_group) DO UPDATE
     SET errors = flush_data_errors.errors + 1, last_error = excluded.last_error";

/// What a flush's compaction looks at: each dimension it wrote (hour `None`: all time) and
/// each (dimension, hour) it wrote, hours about to be pruned left out.
fn compaction_targets(batch: &FlushBatch) -> Vec<(&str, Option<i64>)> {
    let mut targets: Vec<(&str, Option<i64>)> = batch
        .dimensions
        .iter()
        .map(|d| (d.dimension.as_str(), None))
        .chain(
            batch
                .dimension_hours
                .iter()
                .filter(|d| batch.prune_hours_before.is_none_or(|b| d.hour >= b))
                .map(|d| (d.dimension.as_str(), Some(d.hour))),
        )
        .collect();
    targets.sort_unstable();
    targets.dedup();
    targets
}

/// The compaction statements (see [`FlushBatch::keep_values`]), the same on both databases
/// (`?N` placeholders; PostgreSQL's through [`dollar_params`]): the rows of one dimension (and hour) beyond the first
/// `keep` by visits, then their deletion. Parameters: the dimension, `keep`, then the hour.
fn compaction_queries(hourly: bool) -> (String, String) {
    let (table, hour) = if hourly {
        ("dimension_hours", " AND hour = ?3")
    } else {
        ("dimension_counts", "")
    };
    // `LIMIT -1` (SQLite) and `LIMIT ALL` (PostgreSQL) differ; a huge limit is the same.
    let beyond = format!(
        "FROM {table} WHERE dimension = ?1{hour} AND value <> '{OTHER}'
         ORDER BY visits DESC, value LIMIT 9223372036854775807 OFFSET ?2"
    );
    (
        format!("SELECT value, visits, bytes, humans {beyond}"),
        format!(
            "DELETE FROM {table} WHERE dimension = ?1{hour} AND value IN (SELECT value {beyond})"
        ),
    )
}

/// What an alerting group's flush writes besides its positions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertFlush {
    /// Window counts to add (those of windows already closed count as late instead).
    pub windows: Vec<crate::alert::window::WindowRow>,
    /// Every flushed partition's clock.
    pub clocks: Vec<crate::alert::window::PartitionClock>,
    /// Events the members found too late for their window.
    pub late: u64,
    /// The earliest event time in this flush.
    pub first_event: Option<i64>,
}

/// What closing windows needs besides the database's state.
#[derive(Debug, Clone)]
pub struct CloseRequest {
    pub group: String,
    pub topic: String,
    /// The topic's partition count: a partition that has not reported holds the watermark.
    pub partitions: i32,
    pub now_ms: i64,
    pub idle_ms: i64,
    /// Allowed lateness, seconds.
    pub lateness: i64,
    pub rules: Vec<crate::alert::rules::Rule>,
}

impl AlertFlush {
    /// Requests in `windows` of windows already closed at `closed_through`, each event once:
    /// only rows of the shortest window length count (the shortest window holding an event
    /// ends first, so an event late for any length is late for it).
    fn late_rows(&self, closed_through: i64) -> u64 {
        let shortest = self.windows.iter().map(|w| w.window).min();
        self.windows
            .iter()
            .filter(|w| Some(w.window) == shortest && w.subject == crate::alert::window::ALL)
            .filter(|w| w.start.saturating_add(w.window) <= closed_through)
            .map(|w| w.totals.requests)
            .sum()
    }
}

impl CloseRequest {
    /// How far before the first closing window the rules look back, plus the longest window.
    fn history(&self) -> i64 {
        let h = self.rules.iter().map(|r| r.history()).max().unwrap_or(0);
        h + self.rules.iter().map(|r| r.window).max().unwrap_or(0)
    }

    /// The group's new watermark from the stored clocks, when it passes `closed_through`.
    fn watermark(
        &self,
        clocks: &[crate::alert::window::PartitionClock],
        closed_through: i64,
    ) -> Option<i64> {
        crate::alert::window::watermark(
            clocks,
            self.partitions,
            self.now_ms,
            self.idle_ms,
            self.lateness,
        )
        .filter(|&w| w > closed_through)
    }

    /// The alerts of the windows closing when the watermark moves from `closed_through` to `w`.
    fn alerts(
        &self,
        rows: &[crate::alert::window::WindowRow],
        closed_through: i64,
        w: i64,
        first_event: Option<i64>,
    ) -> Vec<crate::alert::window::Alert> {
        crate::alert::window::evaluate(&self.rules, rows, closed_through, w, first_event)
    }
}

/// An alert waiting for delivery (or delivered), as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAlert {
    pub alert: crate::alert::window::Alert,
    pub attempts: u64,
    pub delivered: bool,
}

/// An alerting group's state, for logs, `/metrics` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertStatus {
    pub closed_through: Option<i64>,
    pub late_events: u64,
    pub pending: u64,
    pub delivered: u64,
}

/// A unique-visitor sketch of one day and country (or `*`: all countries), merged into the
/// stored one by a flush (a union: replays cannot change it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueSketch {
    /// `YYYY-MM-DD` (event time, UTC).
    pub day: String,
    pub country_code: String,
    pub sketch: crate::sketch::Hll,
}

/// Visits to add to one bucket of one histogram.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HistogramIncrement {
    /// `bytes` or `request_time_us`.
    pub metric: String,
    /// A country code, or `*` for all.
    pub scope: String,
    /// [`crate::sketch::bucket_of`] of the value.
    pub bucket: i32,
    pub count: u64,
}

/// Unique visitors of one day and country, as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UniqueCount {
    pub day: String,
    pub country_code: String,
    /// The sketch's estimate (see [`crate::sketch`] for its error).
    pub visitors: u64,
}

/// What is added up per value: visits, their bytes, and how many of them were not bots (the
/// dashboard's "hide bots" toggle).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Amount {
    pub visits: u64,
    pub bytes: u64,
    pub humans: u64,
}

impl Amount {
    /// One visit of `bytes` bytes.
    pub fn visit(bytes: u64, is_bot: bool) -> Amount {
        Amount {
            visits: 1,
            bytes,
            humans: u64::from(!is_bot),
        }
    }

    pub fn is_zero(&self) -> bool {
        self.visits == 0
    }
}

/// Saturating: a sum of hostile byte counts stops at the largest value instead of wrapping.
impl std::ops::AddAssign for Amount {
    fn add_assign(&mut self, o: Amount) {
        self.visits = self.visits.saturating_add(o.visits);
        self.bytes = self.bytes.saturating_add(o.bytes);
        self.humans = self.humans.saturating_add(o.humans);
    }
}

/// What to add to one value of one dimension.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DimensionIncrement {
    pub dimension: String,
    pub value: String,
    pub amount: Amount,
}

/// What to add to one value of one dimension in one hour.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DimensionHourIncrement {
    pub dimension: String,
    /// Start of the hour, seconds since the epoch (event time).
    pub hour: i64,
    pub value: String,
    pub amount: Amount,
}

/// What to add to one minute of one country.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MinuteIncrement {
    /// Start of the minute, seconds since the epoch (event time).
    pub minute: i64,
    pub country_code: String,
    pub amount: Amount,
}

/// One value of a dimension as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ValueCount {
    pub value: String,
    pub visits: u64,
    pub bytes: u64,
    /// Visits that were not bots.
    pub humans: u64,
}

/// The values of a dimension with the most visits, and the dimension's totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DimensionCounts {
    /// Most visits first, ties by value.
    pub values: Vec<ValueCount>,
    /// Over all values, not only those returned.
    pub total_visits: u64,
    pub total_bytes: u64,
    pub total_humans: u64,
    /// Distinct values stored.
    pub distinct: u64,
}

/// `SUM(column)` as a BIGINT that stops at the largest BIGINT instead of failing (PostgreSQL
/// raises "bigint out of range", SQLite "integer overflow"): saturated byte counts of hostile
/// lines must not make a panel unreadable. SQLite's `TOTAL` is exact below 2^53 (9 PB).
/// `sign` tells the database (`?` SQLite, `$` PostgreSQL), as in [`dimension_queries`].
fn capped_sum(column: &str, sign: char) -> String {
    if sign == '$' {
        format!("CAST(LEAST(COALESCE(SUM({column}), 0), 9223372036854775807) AS BIGINT)")
    } else {
        format!("CAST(MIN(TOTAL({column}), 9223372036854775807.0) AS BIGINT)")
    }
}

/// The two queries of [`Store::dimension_counts`] (its top values, then its totals and
/// distinct values), the same on both databases but for the placeholder sign (`?` or `$`).
/// Parameters: the dimension, then the first hour when `since`. All time reads the running
/// totals (top values through the `dimension_counts_by_visits` index, never a sort of every
/// value); a time range sums the hourly counts.
fn dimension_queries(since: bool, limit: u32, sign: char) -> (String, String) {
    let (table, hours) = if since {
        ("dimension_hours", format!("AND hour >= {sign}2"))
    } else {
        ("dimension_counts", String::new())
    };
    let filter = format!("FROM {table} WHERE dimension = {sign}1 {hours}");
    let sum = |c| capped_sum(c, sign);
    let top = if since {
        format!(
            "SELECT value, {} AS v, {}, {} {filter} GROUP BY value ORDER BY v DESC, value LIMIT {limit}",
            sum("visits"),
            sum("bytes"),
            sum("humans")
        )
    } else {
        format!(
            "SELECT value, visits, bytes, humans {filter} ORDER BY visits DESC, value LIMIT {limit}"
        )
    };
    (
        top,
        format!(
            "SELECT {}, {}, {}, COUNT(DISTINCT value) {filter}",
            sum("visits"),
            sum("bytes"),
            sum("humans")
        ),
    )
}

/// The per-minute series over all countries (parameter: the first minute).
fn minutes_query(sign: char) -> String {
    format!(
        "SELECT minute, {}, {}, {} FROM minute_counts WHERE minute >= {sign}1
         GROUP BY minute ORDER BY minute",
        capped_sum("visits", sign),
        capped_sum("bytes", sign),
        capped_sum("humans", sign)
    )
}

/// Visits in one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MinutePoint {
    /// Start of the minute, seconds since the epoch.
    pub minute: i64,
    pub visits: u64,
    pub bytes: u64,
    pub humans: u64,
}

/// Merges a stored sketch into `sketch`; one that is not ours (another size) is replaced,
/// with a warning.
fn merge_stored(sketch: &mut crate::sketch::Hll, stored: &[u8], u: &UniqueSketch) {
    match crate::sketch::Hll::from_bytes(stored) {
        Some(h) => sketch.merge(&h),
        None => tracing::warn!(
            day = %u.day,
            country = %u.country_code,
            bytes = stored.len(),
            "stored unique-visitor sketch is not readable; replaced"
        ),
    }
}

/// A stored count read back (never negative; a corrupt row reads as 0).
fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A count to add, as SQL's BIGINT.
fn sql_count(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What a consumer group stored for a topic: next offsets and source watermarks per partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredPositions {
    pub offsets: HashMap<i32, i64>,
    /// events partition → (raw partition → highest raw offset counted).
    pub watermarks: HashMap<i32, HashMap<i32, i64>>,
    /// events partition → the topics its offset and watermarks refer to (absent: written by
    /// a version that did not record them).
    pub identities: HashMap<i32, TopicIdentity>,
    /// events partition → its event-time clock (alerting groups only).
    pub event_clocks: HashMap<i32, i64>,
}

impl StoredPositions {
    pub fn offset(&self, partition: i32) -> Option<i64> {
        self.offsets.get(&partition).copied()
    }

    pub fn watermarks(&self, partition: i32) -> HashMap<i32, i64> {
        self.watermarks.get(&partition).cloned().unwrap_or_default()
    }
}

/// How a flush ended when the database itself worked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Counts and offsets are durable.
    Committed,
    /// Nothing was written: these partitions' stored offsets are not what the writer expected
    /// (another aggregator moved them). The caller drops their counts and re-reads the offsets.
    Conflict(Vec<i32>),
}

/// One row of the per-country table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CountryCount {
    pub country_code: String,
    pub visits: u64,
}

/// The database behind `--database`.
#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            return Ok(Store::Sqlite(SqliteStore::open(path).await?));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Store::Postgres(PostgresStore::open(url).await?));
        }
        Err(StoreError::UnsupportedUrl(crate::secrets::redact(url)))
    }

    /// Stored next offsets and source watermarks of `topic` for `group`.
    pub async fn load_positions(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<StoredPositions, StoreError> {
        match self {
            Store::Sqlite(s) => s.load_positions(group, topic).await,
            Store::Postgres(s) => s.load_positions(group, topic).await,
        }
    }

    /// Writes one flush atomically (see the module docs for the compare-and-set).
    pub async fn flush(&self, batch: &FlushBatch) -> Result<FlushOutcome, StoreError> {
        match self {
            Store::Sqlite(s) => s.flush(batch).await,
            Store::Postgres(s) => s.flush(batch).await,
        }
    }

    /// All countries, most visits first, then by code.
    pub async fn country_counts(&self) -> Result<Vec<CountryCount>, StoreError> {
        match self {
            Store::Sqlite(s) => s.country_counts().await,
            Store::Postgres(s) => s.country_counts().await,
        }
    }

    /// The values of `dimension` with the most visits (at most `limit`) and its totals: all
    /// time, or over the hours from `since` (seconds since the epoch) on.
    pub async fn dimension_counts(
        &self,
        dimension: &str,
        since: Option<i64>,
        limit: u32,
    ) -> Result<DimensionCounts, StoreError> {
        match self {
            Store::Sqlite(s) => s.dimension_counts(dimension, since, limit).await,
            Store::Postgres(s) => s.dimension_counts(dimension, since, limit).await,
        }
    }

    /// Visits per minute from `since` (seconds since the epoch) on, of one country or all.
    pub async fn minutes(
        &self,
        since: i64,
        country: Option<&str>,
    ) -> Result<Vec<MinutePoint>, StoreError> {
        match self {
            Store::Sqlite(s) => s.minutes(since, country).await,
            Store::Postgres(s) => s.minutes(since, country).await,
        }
    }

    /// Unique visitors per day of `country` (`*`: all), newest day first, at most `days`.
    pub async fn unique_days(
        &self,
        country: &str,
        days: u32,
    ) -> Result<Vec<UniqueCount>, StoreError> {
        match self {
            Store::Sqlite(s) => s.unique_days(country, days).await,
            Store::Postgres(s) => s.unique_days(country, days).await,
        }
    }

    /// Unique visitors of every country on `day`, most first.
    pub async fn unique_countries(&self, day: &str) -> Result<Vec<UniqueCount>, StoreError> {
        match self {
            Store::Sqlite(s) => s.unique_countries(day).await,
            Store::Postgres(s) => s.unique_countries(day).await,
        }
    }

    /// The buckets of one histogram: (bucket, visits).
    pub async fn histogram(
        &self,
        metric: &str,
        scope: &str,
    ) -> Result<Vec<(i32, u64)>, StoreError> {
        match self {
            Store::Sqlite(s) => s.histogram(metric, scope).await,
            Store::Postgres(s) => s.histogram(metric, scope).await,
        }
    }

    /// When the last flush committed (RFC 3339), if any.
    pub async fn last_flush(&self) -> Result<Option<String>, StoreError> {
        match self {
            Store::Sqlite(s) => s.last_flush().await,
            Store::Postgres(s) => s.last_flush().await,
        }
    }

    /// Every consumer group's flushes by duration.
    pub async fn flush_durations(&self) -> Result<Vec<(String, FlushDurations)>, StoreError> {
        let rows = match self {
            Store::Sqlite(s) => s.flush_stats().await?,
            Store::Postgres(s) => s.flush_stats().await?,
        };
        let mut groups: std::collections::BTreeMap<String, Vec<(i64, u64, u64)>> =
            Default::default();
        for (g, le, n, ms) in rows {
            groups.entry(g).or_default().push((le, n, ms));
        }
        Ok(groups
            .into_iter()
            .map(|(g, rows)| (g, FlushDurations::from_rows(&rows)))
            .collect())
    }

    /// A number that changes with every committed flush that moved an offset (the sum of
    /// the stored next offsets): the live page is pushed a new snapshot when it changes.
    pub async fn flush_version(&self) -> Result<i64, StoreError> {
        match self {
            Store::Sqlite(s) => s.flush_version().await,
            Store::Postgres(s) => s.flush_version().await,
        }
    }

    /// The newest minute with visits (event time), if any.
    pub async fn latest_minute(&self) -> Result<Option<i64>, StoreError> {
        match self {
            Store::Sqlite(s) => s.latest_minute().await,
            Store::Postgres(s) => s.latest_minute().await,
        }
    }

    /// Closes the windows an alerting group's watermark has passed, in one transaction: the
    /// alerts they yield are written (an id at most once) together with the new
    /// `closed_through`. Returns how many alerts were written.
    pub async fn close_windows(&self, req: &CloseRequest) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(s) => s.close_windows(req.clone()).await,
            Store::Postgres(s) => s.close_windows(req).await,
        }
    }

    /// The group's alerts not delivered yet, oldest window first (at most `limit`).
    pub async fn pending_alerts(
        &self,
        group: &str,
        limit: u32,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        self.alerts(group, true, limit).await
    }

    /// The group's alerts, delivered or not (`pending_only`), oldest window first.
    pub async fn alerts(
        &self,
        group: &str,
        pending_only: bool,
        limit: u32,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        self.list_alerts(alert_sql::LIST, group, pending_only, limit)
            .await
    }

    /// The group's newest alerts (by window), delivered or not.
    pub async fn recent_alerts(
        &self,
        group: &str,
        limit: u32,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        self.list_alerts(alert_sql::LIST_RECENT, group, false, limit)
            .await
    }

    async fn list_alerts(
        &self,
        sql: &'static str,
        group: &str,
        pending_only: bool,
        limit: u32,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        match self {
            Store::Sqlite(s) => s.alerts(sql, group, pending_only, limit).await,
            Store::Postgres(s) => s.alerts(sql, group, pending_only, limit).await,
        }
    }

    /// Takes alert `id` for delivery until `until_ms` (so that another member of the group
    /// does not send it meanwhile); false when it is delivered or another member holds it.
    pub async fn claim_alert(
        &self,
        group: &str,
        id: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        let sql = "UPDATE alerts SET claimed_until = ?3 WHERE consumer_group = ?1 AND id = ?2
                   AND delivered_at IS NULL AND (claimed_until IS NULL OR claimed_until < ?4)";
        let changed = self
            .execute_alert(sql, group, id, AlertArg::Int(until_ms), Some(now_ms))
            .await?;
        Ok(changed == 1)
    }

    /// Alert `id` was delivered at `now_ms`: it is never sent again.
    pub async fn alert_delivered(
        &self,
        group: &str,
        id: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let sql =
            "UPDATE alerts SET delivered_at = ?3, claimed_until = NULL, attempts = attempts + 1
                   WHERE consumer_group = ?1 AND id = ?2";
        self.execute_alert(sql, group, id, AlertArg::Int(now_ms), None)
            .await
            .map(drop)
    }

    /// Delivering alert `id` failed (`error`): it stays pending and is retried.
    pub async fn alert_failed(&self, group: &str, id: &str, error: &str) -> Result<(), StoreError> {
        let sql = "UPDATE alerts SET claimed_until = NULL, attempts = attempts + 1, last_error = ?3
                   WHERE consumer_group = ?1 AND id = ?2";
        self.execute_alert(sql, group, id, AlertArg::Text(error.to_owned()), None)
            .await
            .map(drop)
    }

    async fn execute_alert(
        &self,
        sql: &str,
        group: &str,
        id: &str,
        third: AlertArg,
        fourth: Option<i64>,
    ) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.execute_alert(sql, group, id, third, fourth).await,
            Store::Postgres(s) => s.execute_alert(sql, group, id, third, fourth).await,
        }
    }

    /// The alerting groups that ever flushed, by name.
    pub async fn alert_groups(&self) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Sqlite(s) => s.alert_groups().await,
            Store::Postgres(s) => s.alert_groups().await,
        }
    }

    /// An alerting group's state.
    pub async fn alert_status(&self, group: &str) -> Result<AlertStatus, StoreError> {
        match self {
            Store::Sqlite(s) => s.alert_status(group).await,
            Store::Postgres(s) => s.alert_status(group).await,
        }
    }
}

/// The third parameter of an alert update.
#[derive(Debug, Clone)]
enum AlertArg {
    Int(i64),
    Text(String),
}

/// SQL written with SQLite's `?N` parameters, for PostgreSQL (`$N`).
fn dollar_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// The alert of a stored row (its JSON payload), with what the row says of its delivery.
fn stored_alert(payload: &str, attempts: i64, delivered: bool) -> Result<StoredAlert, StoreError> {
    let alert = serde_json::from_str(payload)
        .map_err(|e| StoreError::Corrupt(format!("alert payload: {e}")))?;
    Ok(StoredAlert {
        alert,
        attempts: u64::try_from(attempts).unwrap_or(0),
        delivered,
    })
}

/// SQL shared by both databases (SQLite's `?N` parameters; [`dollar_params`] for PostgreSQL).
mod alert_sql {
    pub const ENSURE_STATE: &str =
        "INSERT INTO alert_state (consumer_group, closed_through, late_events)
        VALUES (?1, ?2, 0) ON CONFLICT (consumer_group) DO NOTHING";
    pub const ADD_WINDOW: &str = "INSERT INTO alert_windows
        (consumer_group, window_secs, window_start, subject, requests, errors)
        VALUES (?1, ?2, ?3, ?4, ?5, ?6)
        ON CONFLICT (consumer_group, window_secs, window_start, subject) DO UPDATE
        SET requests = alert_windows.requests + excluded.requests,
            errors = alert_windows.errors + excluded.errors";
    pub const ADD_LATE: &str = "UPDATE alert_state SET late_events = late_events + ?2,
        first_event_time = CASE WHEN CAST(?3 AS BIGINT) IS NULL THEN first_event_time
            WHEN first_event_time IS NULL OR first_event_time > CAST(?3 AS BIGINT) THEN CAST(?3 AS BIGINT)
            ELSE first_event_time END
        WHERE consumer_group = ?1";
    pub const SET_CLOCK: &str = "INSERT INTO alert_clocks
        (consumer_group, topic, \"partition\", clock, caught_up_since) VALUES (?1, ?2, ?3, ?4, ?5)
        ON CONFLICT (consumer_group, topic, \"partition\") DO UPDATE
        SET clock = excluded.clock, caught_up_since = excluded.caught_up_since";
    pub const CLOCKS: &str = "SELECT \"partition\", clock, caught_up_since FROM alert_clocks
        WHERE consumer_group = ?1 AND topic = ?2";
    pub const WINDOWS: &str = "SELECT window_secs, window_start, subject, requests, errors
        FROM alert_windows WHERE consumer_group = ?1
        AND window_start + window_secs > ?2 AND window_start + window_secs <= ?3";
    pub const INSERT_ALERT: &str = "INSERT INTO alerts
        (consumer_group, id, window_start, payload, created_at, attempts)
        VALUES (?1, ?2, ?3, ?4, ?5, 0) ON CONFLICT (consumer_group, id) DO NOTHING";
    pub const CLOSE: &str = "UPDATE alert_state SET closed_through = ?2 WHERE consumer_group = ?1";
    pub const PRUNE: &str = "DELETE FROM alert_windows WHERE consumer_group = ?1
        AND window_start + window_secs <= ?2";
    pub const GROUPS: &str = "SELECT consumer_group FROM alert_state ORDER BY consumer_group";
    pub const STATUS: &str =
        "SELECT closed_through, late_events FROM alert_state WHERE consumer_group = ?1";
    pub const COUNTS: &str =
        "SELECT CAST(COALESCE(SUM(CASE WHEN delivered_at IS NULL THEN 1 ELSE 0 END), 0) AS BIGINT),
        CAST(COUNT(*) AS BIGINT) FROM alerts WHERE consumer_group = ?1";
    pub const LIST: &str = "SELECT payload, attempts, delivered_at IS NOT NULL FROM alerts
        WHERE consumer_group = ?1 AND (delivered_at IS NULL OR CAST(?2 AS BIGINT) = 0)
        ORDER BY window_start, id LIMIT CAST(?3 AS BIGINT)";
    pub const LIST_RECENT: &str = "SELECT payload, attempts, delivered_at IS NOT NULL FROM alerts
        WHERE consumer_group = ?1 AND (delivered_at IS NULL OR CAST(?2 AS BIGINT) = 0)
        ORDER BY window_start DESC, id LIMIT CAST(?3 AS BIGINT)";
}

/// Test helpers shared by unit and integration tests.
pub mod testing {
    /// A PostgreSQL URL whose connections use a fresh schema of their own, so tests never see
    /// each other's rows. The server comes from `PAGEVIEWS_TEST_POSTGRES` (default: the local
    /// server, database `test`).
    pub async fn fresh_postgres_url() -> String {
        let base = std::env::var("PAGEVIEWS_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {base} is needed for this test: {e}"));
        tokio::spawn(conn);
        let schema = format!("pv_test_{}", uuid::Uuid::new_v4().simple());
        client
            .execute(&format!("CREATE SCHEMA {schema}"), &[])
            .await
            .unwrap_or_else(|e| panic!("cannot create schema {schema}: {e}"));
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}options=-csearch_path%3D{schema}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn batch(increments: &[(&str, u64)], offsets: &[(i32, Option<i64>, i64)]) -> FlushBatch {
        FlushBatch {
            consumer_group: "g".into(),
            topic: "t".into(),
            increments: increments
                .iter()
                .map(|(c, n)| ((*c).to_owned(), *n))
                .collect(),
            offsets: offsets
                .iter()
                .map(|&(partition, expected, next)| OffsetUpdate {
                    partition,
                    expected,
                    next,
                })
                .collect(),
            ..FlushBatch::default()
        }
    }

    fn wm(partition: i32, source_partition: i32, source_offset: i64) -> WatermarkUpdate {
        WatermarkUpdate {
            partition,
            source_partition,
            source_offset,
        }
    }

    /// The contract both databases keep.
    async fn flush_is_atomic_and_fenced(url: &str) {
        let store = Store::open(url).await.unwrap();
        assert_eq!(
            store
                .flush(&batch(&[("NL", 2), ("US", 5)], &[(0, None, 7)]))
                .await
                .unwrap(),
            FlushOutcome::Committed
        );
        let mut second = batch(&[("NL", 4)], &[(0, Some(7), 11), (1, None, 3)]);
        second.watermarks = vec![wm(0, 3, 500), wm(0, 4, 9), wm(1, 3, 501)];
        second.lost = 40;
        assert_eq!(store.flush(&second).await.unwrap(), FlushOutcome::Committed);
        let mut third = batch(&[], &[(0, Some(11), 12)]);
        third.watermarks = vec![wm(0, 3, 502)];
        assert_eq!(store.flush(&third).await.unwrap(), FlushOutcome::Committed);
        // A writer that still thinks offset 7 is stored is fenced off and writes nothing,
        // not even the offsets or watermarks of its other partitions.
        let mut zombie = batch(&[("NL", 100)], &[(0, Some(7), 9), (2, None, 1)]);
        zombie.watermarks = vec![wm(0, 3, 900), wm(2, 3, 900)];
        zombie.lost = 1000;
        assert_eq!(
            store.flush(&zombie).await.unwrap(),
            FlushOutcome::Conflict(vec![0])
        );
        assert_eq!(
            store
                .flush(&batch(&[("DE", 1)], &[(1, None, 1)]))
                .await
                .unwrap(),
            FlushOutcome::Conflict(vec![1])
        );
        let counts: Vec<(String, u64)> = store
            .country_counts()
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.country_code, c.visits))
            .collect();
        assert_eq!(counts, vec![("NL".to_owned(), 6), ("US".to_owned(), 5)]);
        // Lost messages are written with the offsets that moved past them, fenced alike.
        let lost = |d: Vec<(String, FlushDurations)>| -> Vec<(String, u64)> {
            d.into_iter().map(|(g, f)| (g, f.lost)).collect()
        };
        assert_eq!(
            lost(store.flush_durations().await.unwrap()),
            vec![("g".to_owned(), 40)]
        );
        let expected = StoredPositions {
            offsets: HashMap::from([(0, 12), (1, 3)]),
            watermarks: HashMap::from([
                (0, HashMap::from([(3, 502), (4, 9)])),
                (1, HashMap::from([(3, 501)])),
            ]),
            identities: HashMap::from([
                (0, TopicIdentity::default()),
                (1, TopicIdentity::default()),
            ]),
            event_clocks: HashMap::new(),
        };
        assert_eq!(store.load_positions("g", "t").await.unwrap(), expected);
        assert_eq!(
            store.load_positions("other-group", "t").await.unwrap(),
            StoredPositions::default()
        );
        // Topic ids are recorded for every partition a flush moves; a reset replaces the
        // partition's watermarks (they counted in a raw topic that is gone).
        let mut rebound = batch(&[("NL", 1)], &[(0, Some(12), 13)]);
        rebound.identity = TopicIdentity {
            topic_id: Some("new-events".into()),
            source_topic_id: Some("new-raw".into()),
        };
        rebound.reset_watermarks = vec![0];
        rebound.watermarks = vec![wm(0, 5, 3)];
        rebound.lost = 2;
        assert_eq!(
            store.flush(&rebound).await.unwrap(),
            FlushOutcome::Committed
        );
        let expected = StoredPositions {
            offsets: HashMap::from([(0, 13), (1, 3)]),
            watermarks: HashMap::from([
                (0, HashMap::from([(5, 3)])),
                (1, HashMap::from([(3, 501)])),
            ]),
            identities: HashMap::from([
                (
                    0,
                    TopicIdentity {
                        topic_id: Some("new-events".into()),
                        source_topic_id: Some("new-raw".into()),
                    },
                ),
                (1, TopicIdentity::default()),
            ]),
            event_clocks: HashMap::new(),
        };
        // Reopening keeps everything (migrations are idempotent).
        drop(store);
        let store = Store::open(url).await.unwrap();
        assert_eq!(store.load_positions("g", "t").await.unwrap(), expected);
        assert_eq!(
            lost(store.flush_durations().await.unwrap()),
            vec![("g".to_owned(), 42)]
        );
    }

    /// Dimension and minute counts add up across flushes, are fenced with the offsets, and
    /// read back sorted with their totals; old minutes are pruned.
    async fn dimensions_and_minutes_add_up(url: &str) {
        let store = Store::open(url).await.unwrap();
        let amount = |visits, bytes, humans| Amount {
            visits,
            bytes,
            humans,
        };
        let dim = |d: &str, v: &str, a: Amount| DimensionIncrement {
            dimension: d.into(),
            value: v.into(),
            amount: a,
        };
        let minute = |m: i64, c: &str, a: Amount| MinuteIncrement {
            minute: m,
            country_code: c.into(),
            amount: a,
        };
        let mut first = batch(&[("NL", 3)], &[(0, None, 3)]);
        first.dimensions = vec![
            dim("path", "/a", amount(2, 20, 1)),
            dim("path", "/b", amount(1, 5, 1)),
            dim("status", "200", amount(3, 25, 2)),
        ];
        let hour = |h: i64, v: &str, a: Amount| DimensionHourIncrement {
            dimension: "path".into(),
            hour: h,
            value: v.into(),
            amount: a,
        };
        first.dimension_hours = vec![
            hour(0, "/a", amount(2, 20, 1)),
            hour(3600, "/b", amount(1, 5, 1)),
        ];
        first.minutes = vec![
            minute(60, "NL", amount(2, 20, 1)),
            minute(120, "NL", amount(1, 5, 1)),
        ];
        assert_eq!(store.flush(&first).await.unwrap(), FlushOutcome::Committed);
        let mut second = batch(&[("NL", 2)], &[(0, Some(3), 5)]);
        second.dimensions = vec![
            dim("path", "/b", amount(2, 10, 0)),
            dim("path", "(other)", amount(1, 1, 1)),
        ];
        second.minutes = vec![minute(180, "US", amount(2, 11, 1))];
        second.prune_minutes_before = Some(120);
        second.dimension_hours = vec![
            hour(3600, "/b", amount(2, 10, 0)),
            hour(7200, "/a", amount(1, 1, 1)),
        ];
        second.prune_hours_before = Some(3600);
        assert_eq!(store.flush(&second).await.unwrap(), FlushOutcome::Committed);
        // A fenced-off flush adds nothing.
        let mut zombie = batch(&[("NL", 9)], &[(0, Some(3), 9)]);
        zombie.dimensions = vec![dim("path", "/a", amount(9, 9, 9))];
        zombie.minutes = vec![minute(180, "US", amount(9, 9, 9))];
        assert_eq!(
            store.flush(&zombie).await.unwrap(),
            FlushOutcome::Conflict(vec![0])
        );
        let path = store.dimension_counts("path", None, 2).await.unwrap();
        let value = |v: &str, visits, bytes, humans| ValueCount {
            value: v.into(),
            visits,
            bytes,
            humans,
        };
        assert_eq!(
            path,
            DimensionCounts {
                values: vec![value("/b", 3, 15, 1), value("/a", 2, 20, 1)],
                total_visits: 6,
                total_bytes: 36,
                total_humans: 3,
                distinct: 3,
            }
        );
        assert_eq!(
            store.dimension_counts("nothing", None, 5).await.unwrap(),
            DimensionCounts::default()
        );
        // By hour: hour 0 pruned; from hour 7200 on only `/a`'s last visit.
        assert_eq!(
            store.dimension_counts("path", Some(0), 5).await.unwrap(),
            DimensionCounts {
                values: vec![value("/b", 3, 15, 1), value("/a", 1, 1, 1)],
                total_visits: 4,
                total_bytes: 16,
                total_humans: 2,
                distinct: 2,
            }
        );
        assert_eq!(
            store
                .dimension_counts("path", Some(7200), 5)
                .await
                .unwrap()
                .values,
            vec![value("/a", 1, 1, 1)]
        );
        let point = |minute, visits, bytes, humans| MinutePoint {
            minute,
            visits,
            bytes,
            humans,
        };
        assert_eq!(
            store.minutes(0, None).await.unwrap(),
            vec![point(120, 1, 5, 1), point(180, 2, 11, 1)],
            "minute 60 pruned"
        );
        assert_eq!(
            store.minutes(150, Some("US")).await.unwrap(),
            vec![point(180, 2, 11, 1)]
        );
        assert!(store.minutes(0, Some("DE")).await.unwrap().is_empty());
        assert_eq!(store.latest_minute().await.unwrap(), Some(180));
        assert_eq!(store.flush_version().await.unwrap(), 5);
        // Two committed flushes (the fenced one is not counted), with their durations.
        let durations = store.flush_durations().await.unwrap();
        assert_eq!(durations.len(), 1);
        assert_eq!(durations[0].0, "g");
        assert_eq!(durations[0].1.count, 2);
        assert_eq!(durations[0].1.buckets.len(), FLUSH_BUCKETS_MS.len());
        assert_eq!(durations[0].1.buckets.iter().map(|b| b.1).sum::<u64>(), 2);
        assert!(store.last_flush().await.unwrap().is_some());
    }

    /// Unique-visitor sketches merge with what is stored (a union: sending the same visitors
    /// again changes nothing); histogram buckets add up.
    async fn sketches_merge(url: &str) {
        use crate::sketch::Hll;
        let store = Store::open(url).await.unwrap();
        let sketch = |from: u64, to: u64| {
            let mut h = Hll::default();
            for i in from..to {
                h.add(crate::event::visitor_id(&i.to_string(), "d", "u"));
            }
            h
        };
        let unique = |day: &str, c: &str, h: Hll| UniqueSketch {
            day: day.into(),
            country_code: c.into(),
            sketch: h,
        };
        let hist = |scope: &str, bucket, count| HistogramIncrement {
            metric: "bytes".into(),
            scope: scope.into(),
            bucket,
            count,
        };
        let mut first = batch(&[("NL", 1)], &[(0, None, 1)]);
        first.uniques = vec![
            unique("2026-01-01", "NL", sketch(0, 600)),
            unique("2026-01-01", "*", sketch(0, 600)),
            unique("2026-01-02", "*", sketch(0, 10)),
        ];
        first.histograms = vec![hist("*", 3, 2), hist("NL", 3, 2)];
        assert_eq!(store.flush(&first).await.unwrap(), FlushOutcome::Committed);
        let mut second = batch(&[("NL", 1)], &[(0, Some(1), 2)]);
        second.uniques = vec![
            unique("2026-01-01", "NL", sketch(300, 1000)),
            unique("2026-01-01", "*", sketch(300, 1000)),
            unique("2026-01-01", "DE", sketch(5000, 5100)),
        ];
        second.histograms = vec![hist("*", 3, 1), hist("*", 40, 5)];
        assert_eq!(store.flush(&second).await.unwrap(), FlushOutcome::Committed);
        let days = store.unique_days("*", 10).await.unwrap();
        assert_eq!(
            days.iter().map(|d| d.day.as_str()).collect::<Vec<_>>(),
            vec!["2026-01-02", "2026-01-01"]
        );
        assert_eq!(days[0].visitors, 10);
        let within = |got: u64, exact: f64| (got as f64 - exact).abs() <= exact * 0.025;
        assert!(within(days[1].visitors, 1000.0), "{days:?}");
        let countries = store.unique_countries("2026-01-01").await.unwrap();
        assert_eq!(countries.len(), 2, "{countries:?}");
        assert_eq!(countries[0].country_code, "NL");
        assert!(within(countries[0].visitors, 1000.0), "{countries:?}");
        assert_eq!(countries[1].visitors, 100);
        assert_eq!(
            store.histogram("bytes", "*").await.unwrap(),
            vec![(3, 3), (40, 5)]
        );
        assert_eq!(store.histogram("bytes", "NL").await.unwrap(), vec![(3, 2)]);
        assert!(
            store
                .histogram("request_time_us", "*")
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// An alerting group's flush, close and outbox: windows add up across flushes and
    /// partitions, close once the watermark (every partition's clock) passes them, yield each
    /// alert id once, count what arrives after the close as late, and deliver in order with
    /// claims that keep a second member from sending the same alert.
    async fn alerts_close_once_and_deliver_in_order(url: &str) {
        use crate::alert::rules::parse_rules;
        use crate::alert::window::{ALL, PartitionClock, WindowRow, WindowTotals};
        let store = Store::open(url).await.unwrap();
        let rules = parse_rules(
            "[[rule]]\nname = \"errors\"\nkind = \"error_share\"\nabove = 0.2\nmin_requests = 2\nwindow = \"1m\"\n\
             [[rule]]\nname = \"cn\"\nkind = \"country_visits\"\ncountry = \"CN\"\nabove = 2\nwindow = \"1m\"\n",
        )
        .unwrap();
        let row = |start: i64, subject: &str, requests: u64, errors: u64| WindowRow {
            window: 60,
            start,
            subject: subject.into(),
            totals: WindowTotals { requests, errors },
        };
        let clock = |partition: i32, clock: Option<i64>| PartitionClock {
            partition,
            clock,
            caught_up_since: None,
        };
        let t0 = 1_767_225_600;
        let flush = |offsets: &[(i32, Option<i64>, i64)],
                     windows: Vec<WindowRow>,
                     clocks: Vec<PartitionClock>| {
            let mut b = batch(&[], offsets);
            b.consumer_group = "alerts".into();
            b.alert = Some(AlertFlush {
                windows,
                clocks,
                late: 1,
                first_event: Some(t0),
            });
            b
        };
        // Partition 0: minute 0 with 4 requests, 1 error; partition 1: 3 CN visits, 1 error.
        let first = flush(
            &[(0, None, 10), (1, None, 5)],
            vec![row(t0, ALL, 7, 2), row(t0, "CN", 3, 1), row(t0, "US", 4, 1)],
            vec![clock(0, Some(t0 + 100)), clock(1, Some(t0 + 50))],
        );
        assert_eq!(store.flush(&first).await.unwrap(), FlushOutcome::Committed);
        let positions = store.load_positions("alerts", "t").await.unwrap();
        assert_eq!(
            positions.event_clocks,
            HashMap::from([(0, t0 + 100), (1, t0 + 50)])
        );
        let req = |partitions: i32, now_ms: i64| CloseRequest {
            group: "alerts".into(),
            topic: "t".into(),
            partitions,
            now_ms,
            idle_ms: 10_000,
            lateness: 0,
            rules: rules.clone(),
        };
        // Three partitions, one never reported: nothing closes.
        assert_eq!(store.close_windows(&req(3, 0)).await.unwrap(), 0);
        // Two: the watermark is t0 + 50, minute 0 (ending t0 + 60) stays open.
        assert_eq!(store.close_windows(&req(2, 0)).await.unwrap(), 0);
        let second = flush(
            &[(1, Some(5), 8)],
            vec![
                row(t0, ALL, 1, 1),
                row(t0, "CN", 1, 1),
                row(t0 + 60, ALL, 1, 0),
            ],
            vec![clock(1, Some(t0 + 70))],
        );
        assert_eq!(store.flush(&second).await.unwrap(), FlushOutcome::Committed);
        // Minute 0: 8 requests, 3 errors (37.5%), 4 from CN: two alerts, once.
        assert_eq!(store.close_windows(&req(2, 0)).await.unwrap(), 2);
        assert_eq!(store.close_windows(&req(2, 0)).await.unwrap(), 0);
        let status = store.alert_status("alerts").await.unwrap();
        assert_eq!(
            status,
            AlertStatus {
                closed_through: Some(t0 + 70),
                late_events: 2,
                pending: 2,
                delivered: 0
            }
        );
        // Counts for the closed minute that arrive now are late, not lost silently.
        let late = flush(
            &[(0, Some(10), 11)],
            vec![row(t0, ALL, 5, 5)],
            vec![clock(0, Some(t0 + 100))],
        );
        assert_eq!(store.flush(&late).await.unwrap(), FlushOutcome::Committed);
        assert_eq!(
            store.alert_status("alerts").await.unwrap().late_events,
            2 + 1 + 5
        );
        assert_eq!(
            store.close_windows(&req(2, 0)).await.unwrap(),
            0,
            "minute 0 stays closed"
        );
        // The outbox, oldest window first, then by id.
        let pending = store.pending_alerts("alerts", 10).await.unwrap();
        let ids: Vec<&str> = pending.iter().map(|a| a.alert.id.as_str()).collect();
        assert_eq!(
            ids,
            ["cn/2026-01-01T00:00:00Z/CN", "errors/2026-01-01T00:00:00Z"]
        );
        assert_eq!(pending[0].alert.value, 4.0);
        assert_eq!(pending[1].alert.value, 0.375);
        // A claim keeps another member off until it expires; a failure releases it.
        let id = ids[0].to_owned();
        assert!(
            store
                .claim_alert("alerts", &id, 1_000, 5_000)
                .await
                .unwrap()
        );
        assert!(
            !store
                .claim_alert("alerts", &id, 2_000, 6_000)
                .await
                .unwrap()
        );
        store.alert_failed("alerts", &id, "HTTP 503").await.unwrap();
        assert!(
            store
                .claim_alert("alerts", &id, 2_000, 6_000)
                .await
                .unwrap()
        );
        store.alert_delivered("alerts", &id, 2_500).await.unwrap();
        assert!(
            !store
                .claim_alert("alerts", &id, 9_000, 19_000)
                .await
                .unwrap(),
            "delivered: never again"
        );
        let pending = store.pending_alerts("alerts", 10).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].attempts, 0);
        let all = store.alerts("alerts", false, 10).await.unwrap();
        assert_eq!(all.len(), 2);
        assert!(all[0].delivered && all[0].attempts == 2);
        assert_eq!(
            store.alert_status("alerts").await.unwrap(),
            AlertStatus {
                closed_through: Some(t0 + 70),
                late_events: 8,
                pending: 1,
                delivered: 1
            }
        );
        // Another group has its own everything.
        assert_eq!(
            store.alert_status("other").await.unwrap(),
            AlertStatus::default()
        );
        // An idle partition (caught up for the idle timeout) no longer holds windows open.
        let idle = flush(
            &[(1, Some(8), 8)],
            vec![],
            vec![PartitionClock {
                partition: 1,
                clock: Some(t0 + 70),
                caught_up_since: Some(0),
            }],
        );
        assert_eq!(store.flush(&idle).await.unwrap(), FlushOutcome::Committed);
        assert_eq!(store.close_windows(&req(2, 20_000)).await.unwrap(), 0);
        assert_eq!(
            store.alert_status("alerts").await.unwrap().closed_through,
            Some(t0 + 100),
            "partition 0's clock alone"
        );
    }

    #[tokio::test]
    async fn sqlite_alerts_close_once_and_deliver_in_order() {
        let dir = tempfile::tempdir().unwrap();
        alerts_close_once_and_deliver_in_order(&format!("sqlite://{}/s.db", dir.path().display()))
            .await;
    }

    #[tokio::test]
    async fn postgres_alerts_close_once_and_deliver_in_order() {
        alerts_close_once_and_deliver_in_order(&testing::fresh_postgres_url().await).await;
    }

    #[tokio::test]
    async fn sqlite_sketches_merge() {
        let dir = tempfile::tempdir().unwrap();
        sketches_merge(&format!("sqlite://{}/s.db", dir.path().display())).await;
    }

    #[tokio::test]
    async fn postgres_sketches_merge() {
        sketches_merge(&testing::fresh_postgres_url().await).await;
    }

    /// Hostile values at the store: tables stay within `keep_values` (the rest in `(other)`,
    /// sums exact), byte sums saturate instead of failing, and a value the database refuses
    /// (PostgreSQL: a 3,500-byte key) is a data error that `quarantine` turns into a flush
    /// that commits with exact totals.
    async fn hostile_values_are_bounded(url: &str) {
        let store = Store::open(url).await.unwrap();
        let amount = |visits, bytes| Amount {
            visits,
            bytes,
            humans: visits,
        };
        let dim = |v: String, a: Amount| DimensionIncrement {
            dimension: "path".into(),
            value: v,
            amount: a,
        };
        let hour = |v: String, a: Amount| DimensionHourIncrement {
            dimension: "path".into(),
            hour: 3600,
            value: v,
            amount: a,
        };
        // 30 values, the i-th with i+1 visits, kept to 10.
        let mut offset = 0;
        let mut expected_visits = 0;
        for round in 0..3i64 {
            let mut b = batch(
                &[("NL", 1)],
                &[(0, (round > 0).then_some(offset), offset + 1)],
            );
            offset += 1;
            b.keep_values = Some(10);
            for i in 0..10u64 {
                let n = round as u64 * 10 + i + 1;
                expected_visits += n;
                b.dimensions
                    .push(dim(format!("/v{n:02}"), amount(n, i64::MAX as u64)));
                b.dimension_hours
                    .push(hour(format!("/v{n:02}"), amount(n, 1)));
            }
            b.dimensions.sort();
            b.dimension_hours.sort();
            assert_eq!(store.flush(&b).await.unwrap(), FlushOutcome::Committed);
        }
        let path = store.dimension_counts("path", None, 1000).await.unwrap();
        assert_eq!(path.distinct, 11, "{path:?}");
        assert_eq!(path.total_visits, expected_visits);
        // The ten with the most visits are kept as they are.
        let kept: Vec<(&str, u64)> = path
            .values
            .iter()
            .map(|v| (v.value.as_str(), v.visits))
            .collect();
        let mut want: Vec<(String, u64)> =
            (21..=30).rev().map(|n| (format!("/v{n:02}"), n)).collect();
        want.insert(0, (OTHER.to_owned(), (1..=20).sum()));
        let want: Vec<(&str, u64)> = want.iter().map(|(v, n)| (v.as_str(), *n)).collect();
        assert_eq!(kept, want);
        // Every byte sum saturated at the largest BIGINT instead of failing the flush.
        assert!(
            path.values.iter().all(|v| v.bytes == i64::MAX as u64),
            "{path:?}"
        );
        let hours = store
            .dimension_counts("path", Some(3600), 1000)
            .await
            .unwrap();
        assert_eq!(hours.distinct, 11);
        assert_eq!(hours.total_visits, expected_visits);

        // A value too long for PostgreSQL's index (random, so that compression cannot shrink
        // it below 2,704 bytes): a data error, quarantined, then committed.
        let long: String = {
            use rand::{Rng, SeedableRng};
            rand::rngs::StdRng::seed_from_u64(7)
                .sample_iter(rand::distr::Alphanumeric)
                .take(6000)
                .map(char::from)
                .collect()
        };
        let mut b = batch(&[("NL", 2)], &[(0, Some(offset), offset + 1)]);
        b.dimensions = vec![
            dim("/ok".into(), amount(1, 5)),
            dim(format!("/{long}"), amount(1, 7)),
        ];
        match store.flush(&b).await {
            Ok(FlushOutcome::Committed) => assert!(url.starts_with("sqlite")),
            Ok(other) => panic!("{other:?}"),
            Err(e) => {
                assert!(url.starts_with("postgres"), "{e}");
                assert!(e.is_data_error(), "not a data error: {e}");
                assert_eq!(b.quarantine(&e.to_string(), false), 1);
                assert_eq!(store.flush(&b).await.unwrap(), FlushOutcome::Committed);
                let path = store.dimension_counts("path", None, 1000).await.unwrap();
                assert_eq!(path.total_visits, expected_visits + 2);
                let invalid = path.values.iter().find(|v| v.value == INVALID).unwrap();
                assert_eq!((invalid.visits, invalid.bytes), (1, 7));
                let flushes = store.flush_durations().await.unwrap();
                assert_eq!(flushes[0].1.data_errors, 1, "{flushes:?}");
            }
        }
        // A connection that is refused is not a data error.
        match Store::open("postgres://nobody@127.0.0.1:1/none").await {
            Err(refused) => assert!(!refused.is_data_error(), "{refused}"),
            Ok(_) => panic!("a closed port answered"),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sqlite_hostile_values_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        hostile_values_are_bounded(&format!("sqlite://{}", dir.path().join("h.db").display()))
            .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_hostile_values_are_bounded() {
        hostile_values_are_bounded(&testing::fresh_postgres_url().await).await;
    }

    #[tokio::test]
    async fn sqlite_dimensions_and_minutes_add_up() {
        let dir = tempfile::tempdir().unwrap();
        dimensions_and_minutes_add_up(&format!("sqlite://{}/s.db", dir.path().display())).await;
    }

    #[tokio::test]
    async fn postgres_dimensions_and_minutes_add_up() {
        dimensions_and_minutes_add_up(&testing::fresh_postgres_url().await).await;
    }

    #[tokio::test]
    async fn sqlite_flush_is_atomic_and_fenced() {
        let dir = tempfile::tempdir().unwrap();
        flush_is_atomic_and_fenced(&format!("sqlite://{}/s.db", dir.path().display())).await;
    }

    #[tokio::test]
    async fn postgres_flush_is_atomic_and_fenced() {
        flush_is_atomic_and_fenced(&testing::fresh_postgres_url().await).await;
    }

    /// Flushes that run at the same time (two aggregators of one process) each get their
    /// own transaction, and a reader (`serve`) never sees a flush half done: every total it
    /// reads is a whole number of flushes. With one shared connection the second BEGIN failed
    /// ("cannot start a transaction within a transaction") and readers saw partial sums.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_flushes_and_reads_do_not_share_a_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/s.db", dir.path().display()))
            .await
            .unwrap();
        // 300 countries of 1 visit each per flush: many statements, many await points.
        let codes: Vec<String> = (0..300).map(|i| format!("C{i:03}")).collect();
        let flush_of = |partition: i32, round: i64| {
            let increments: Vec<(&str, u64)> = codes.iter().map(|c| (c.as_str(), 1)).collect();
            let expected = (round > 0).then_some(round);
            batch(&increments, &[(partition, expected, round + 1)])
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (store, stop) = (store.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let total: u64 = store
                        .country_counts()
                        .await
                        .unwrap()
                        .iter()
                        .map(|c| c.visits)
                        .sum();
                    seen.push(total);
                    tokio::task::yield_now().await;
                }
                seen
            })
        };
        for round in 0..10 {
            let (a, b) = (store.clone(), store.clone());
            let (fa, fb) = (flush_of(0, round), flush_of(1, round));
            let (ra, rb) = tokio::join!(
                tokio::spawn(async move { a.flush(&fa).await }),
                tokio::spawn(async move { b.flush(&fb).await })
            );
            assert_eq!(ra.unwrap().unwrap(), FlushOutcome::Committed);
            assert_eq!(rb.unwrap().unwrap(), FlushOutcome::Committed);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = reader.await.unwrap();
        assert!(!seen.is_empty());
        for total in seen {
            assert_eq!(total % 300, 0, "a reader saw a flush half done: {total}");
        }
        assert_eq!(
            store
                .country_counts()
                .await
                .unwrap()
                .iter()
                .map(|c| c.visits)
                .sum::<u64>(),
            20 * 300
        );
    }

    /// A flush waiting for another process's write lock (up to the 5 s busy timeout) does
    /// not stall the async worker it was called from: on a single-threaded runtime a timer
    /// still fires on time.
    #[tokio::test(flavor = "current_thread")]
    async fn a_busy_sqlite_database_does_not_block_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = Store::open(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        // Another process holds the write lock.
        let other = libsql::Builder::new_local(&path).build().await.unwrap();
        let other = other.connect().unwrap();
        other.execute("BEGIN IMMEDIATE", ()).await.unwrap();
        let flushing = tokio::spawn({
            let store = store.clone();
            async move { store.flush(&batch(&[("NL", 1)], &[(0, None, 1)])).await }
        });
        let started = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let late = started.elapsed();
        assert!(
            late < Duration::from_secs(2),
            "a 100 ms timer fired after {late:?}: the flush blocked the runtime"
        );
        other.execute("COMMIT", ()).await.unwrap();
        assert_eq!(flushing.await.unwrap().unwrap(), FlushOutcome::Committed);
    }

    /// A table of ours created by something else with other column types is a one-line
    /// error at open, naming the table and the column (it was a panic at the first read).
    async fn foreign_table_is_refused(url: &str, create: &str) {
        let err = Store::open(url).await.err().expect("open must fail");
        let text = err.to_string();
        assert!(
            text.contains("table country_stats exists but its column visit_count is text, pageviews needs bigint"),
            "{text} (after {create})"
        );
        assert!(!text.contains('\n'), "{text}");
    }

    #[tokio::test]
    async fn postgres_refuses_a_table_with_other_column_types() {
        let url = testing::fresh_postgres_url().await;
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let create = "CREATE TABLE country_stats (country_code TEXT PRIMARY KEY, visit_count TEXT, updated_at TEXT)";
        client.execute(create, &[]).await.unwrap();
        client
            .execute(
                "INSERT INTO country_stats VALUES ('NL', 'many', 'today')",
                &[],
            )
            .await
            .unwrap();
        foreign_table_is_refused(&url, create).await;
    }

    #[tokio::test]
    async fn sqlite_refuses_a_table_with_other_column_types() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let db = libsql::Builder::new_local(&path).build().await.unwrap();
        let create = "CREATE TABLE country_stats (country_code TEXT PRIMARY KEY, visit_count TEXT, updated_at TEXT)";
        db.connect().unwrap().execute(create, ()).await.unwrap();
        foreign_table_is_refused(&format!("sqlite://{}", path.display()), create).await;
    }

    /// Store errors keep their causes as a `source()` chain (not flattened into a string), so
    /// a caller can tell a refused connection from a bad password.
    #[tokio::test]
    async fn open_errors_keep_their_cause_chain() {
        let err = Store::open("postgres://postgres@127.0.0.1:1/test")
            .await
            .err()
            .unwrap();
        let mut source = std::error::Error::source(&err);
        let mut refused = false;
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
            }
            source = s.source();
        }
        assert!(refused, "no io::Error in the chain of {err:?}");
    }

    #[test]
    fn quarantine_merges_what_it_renames() {
        let dim = |v: &str, visits| DimensionIncrement {
            dimension: "path".into(),
            value: v.into(),
            amount: Amount {
                visits,
                bytes: visits,
                humans: 0,
            },
        };
        let mut b = FlushBatch {
            dimensions: vec![
                dim("/ok", 1),
                dim("/\u{1}", 2),
                dim(&"x".repeat(300), 3),
                dim(INVALID, 4),
            ],
            ..FlushBatch::default()
        };
        assert_eq!(b.quarantine("index row size", false), 2);
        let rows: Vec<(&str, u64)> = b
            .dimensions
            .iter()
            .map(|d| (d.value.as_str(), d.amount.visits))
            .collect();
        assert_eq!(rows, vec![(INVALID, 9), ("/ok", 1)]);
        assert_eq!(b.data_error.as_deref(), Some("index row size"));
        assert_eq!(b.quarantine("again", true), 1);
        assert_eq!(b.dimensions.len(), 1);
        assert_eq!(b.dimensions[0].amount.visits, 10);
    }

    /// `sslmode` with the machine's PostgreSQL, which serves TLS with Debian's self-signed
    /// "snakeoil" certificate (issued for `localhost`).
    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_connections_use_tls_as_sslmode_says() {
        const ROOT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
        assert!(
            std::path::Path::new(ROOT).exists(),
            "this test needs PostgreSQL with TLS and its certificate at {ROOT} (Debian's default)"
        );
        let base = testing::fresh_postgres_url().await;
        let with = |extra: &str| format!("{base}&{extra}");
        let tls = |store: &Store| match store {
            Store::Postgres(p) => p.clone(),
            Store::Sqlite(_) => unreachable!(),
        };
        // Encrypted, certificate unchecked (libpq's `require`).
        let store = Store::open(&with("sslmode=require")).await.unwrap();
        assert!(tls(&store).uses_tls().await.unwrap());
        let store = Store::open(&with("sslmode=disable")).await.unwrap();
        assert!(!tls(&store).uses_tls().await.unwrap());
        // The chain against the given root, the name not checked.
        let store = Store::open(&with(&format!("sslmode=verify-ca&sslrootcert={ROOT}")))
            .await
            .unwrap();
        assert!(tls(&store).uses_tls().await.unwrap());
        // Chain and name: the certificate names localhost, not 127.0.0.1.
        let by_name = with(&format!("sslmode=verify-full&sslrootcert={ROOT}")).replacen(
            "@127.0.0.1:",
            "@localhost:",
            1,
        );
        let store = Store::open(&by_name).await.unwrap();
        assert!(tls(&store).uses_tls().await.unwrap());
        let by_address = with(&format!("sslmode=verify-full&sslrootcert={ROOT}"));
        match Store::open(&by_address).await {
            Err(e) => assert!(e.to_string().contains("certificate"), "{e}"),
            Ok(_) => panic!("verify-full accepted a certificate for another name"),
        }
        // Other roots (the public CAs' bundle) do not vouch for the self-signed certificate.
        let public = "/etc/ssl/certs/ca-certificates.crt";
        let others = with(&format!("sslmode=verify-full&sslrootcert={public}")).replacen(
            "@127.0.0.1:",
            "@localhost:",
            1,
        );
        match Store::open(&others).await {
            Err(e) => assert!(e.to_string().contains("certificate"), "{e}"),
            Ok(_) => panic!("verify-full trusted a certificate no given root signed"),
        }
    }

    #[tokio::test]
    async fn unknown_scheme_is_a_clear_error() {
        let err = Store::open("mysql://localhost/x").await.err().unwrap();
        assert_eq!(
            err.to_string(),
            "unsupported database URL \"mysql://localhost/x\": use sqlite://PATH or postgres://USER@HOST:PORT/DB"
        );
    }
}
