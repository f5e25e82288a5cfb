//! The statistics database's shared part: connections, migrations, positions and the one
//! flush transaction that every result-writing consumer group uses.
//!
//! A group's results and its Kafka offsets are written in ONE transaction per flush
//! ([`flush_in`]), so after any crash the database holds results for exactly the messages
//! before the stored offsets. Offsets are compare-and-set: a flush only advances a
//! partition's offset from the value its writer read when it was assigned the partition. A
//! zombie member (revoked, but not yet aware of it) therefore cannot write results that the
//! partition's new owner will count again.
//!
//! This module knows no group. Each group keeps its tables, rows and SQL in its own folder
//! (`aggregate/tables.rs`, `alert/tables.rs`): a [`Schema`] and a [`Results`] type that the
//! flush writes inside its transaction. `crate::database` lists the schemas to open.
//!
//! SQLite (via `libsql`, the SQLite the embedded broker links) is the default for one
//! machine; PostgreSQL (`tokio-postgres` with a `deadpool` pool) runs the same statements,
//! for groups on several machines. What differs between them is in [`sql`].

mod postgres;
pub mod sql;
mod sqlite;
mod tls;

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;

pub use postgres::PostgresStore;
use sql::{Merge, Tx, Ty, Upsert, args};
pub use sqlite::SqliteStore;

/// The tables of one part of the program: statements applied at open (`IF NOT EXISTS`
/// keeps them idempotent; `ALTER TABLE t ADD COLUMN c …` is applied only where `c` is
/// missing), and the columns its statements rely on, checked at open so that a table of the
/// same name made by something else is a clear error, not a failure at the first flush.
pub struct Schema {
    pub migrations: &'static [&'static str],
    pub columns: &'static [(&'static str, &'static [(&'static str, SqlType)])],
}

/// What every result-writing group keeps: its positions and the health of its flushes.
pub const SCHEMA: Schema = Schema {
    migrations: &[
        "CREATE TABLE IF NOT EXISTS consumer_offsets (
            consumer_group TEXT NOT NULL,
            topic TEXT NOT NULL,
            \"partition\" INTEGER NOT NULL,
            next_offset BIGINT NOT NULL,
            PRIMARY KEY (consumer_group, topic, \"partition\"))",
        // Per consumed partition, the highest raw (source) offset counted from each raw
        // partition: events replayed by a preprocessor that crashed before committing are
        // dropped against it.
        "CREATE TABLE IF NOT EXISTS source_watermarks (
            consumer_group TEXT NOT NULL,
            topic TEXT NOT NULL,
            \"partition\" INTEGER NOT NULL,
            source_partition INTEGER NOT NULL,
            source_offset BIGINT NOT NULL,
            PRIMARY KEY (consumer_group, topic, \"partition\", source_partition))",
        // Which topics a partition's stored offset and watermarks refer to (Kafka topic ids
        // of the consumed topic and of the raw topic the watermarks count): a topic deleted
        // and created again, or a broker that starts over, has new ids and the old positions
        // mean nothing in it.
        "CREATE TABLE IF NOT EXISTS topic_ids (
            consumer_group TEXT NOT NULL,
            topic TEXT NOT NULL,
            \"partition\" INTEGER NOT NULL,
            topic_id TEXT,
            source_topic_id TEXT,
            PRIMARY KEY (consumer_group, topic, \"partition\"))",
        // Flushes per consumer group by duration (start to commit), a histogram for
        // /metrics: each flush adds one to the row of its bucket (`le_ms`: upper bound in
        // milliseconds) and its duration to the row's total.
        "CREATE TABLE IF NOT EXISTS flush_stats (
            consumer_group TEXT NOT NULL,
            le_ms BIGINT NOT NULL,
            flushes BIGINT NOT NULL,
            total_ms BIGINT NOT NULL,
            PRIMARY KEY (consumer_group, le_ms))",
        // Each partition's event-time clock (largest event time read) and since when its
        // member has been at its log end (wall clock, ms; NULL while reading): what a
        // group's watermark is made of. (The name is from when only alerters kept them.)
        "CREATE TABLE IF NOT EXISTS alert_clocks (
            consumer_group TEXT NOT NULL,
            topic TEXT NOT NULL,
            \"partition\" INTEGER NOT NULL,
            clock BIGINT,
            caught_up_since BIGINT,
            PRIMARY KEY (consumer_group, topic, \"partition\"))",
        // Flushes that met a data error and were written with the offending values replaced
        // (see Results::quarantine): for /metrics and the pipeline's health.
        "CREATE TABLE IF NOT EXISTS flush_data_errors (
            consumer_group TEXT PRIMARY KEY,
            errors BIGINT NOT NULL,
            last_error TEXT NOT NULL)",
        // Messages a group's topic no longer held when the group came to read them (deleted
        // by the broker's retention while the group was down or behind): for /metrics.
        "CREATE TABLE IF NOT EXISTS lost_messages (
            consumer_group TEXT PRIMARY KEY,
            lost BIGINT NOT NULL)",
        // State a group keeps per partition beyond a flush (the aggregator's open visits),
        // as opaque rows (key, value) written by the same transaction as the offsets and read
        // back when the partition is assigned.
        "CREATE TABLE IF NOT EXISTS partition_state (
            consumer_group TEXT NOT NULL,
            topic TEXT NOT NULL,
            \"partition\" INTEGER NOT NULL,
            state_key BYTEA NOT NULL,
            state_value BYTEA NOT NULL,
            PRIMARY KEY (consumer_group, topic, \"partition\", state_key))",
    ],
    columns: &[
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
            "flush_stats",
            &[
                ("consumer_group", SqlType::Text),
                ("le_ms", SqlType::BigInt),
                ("flushes", SqlType::BigInt),
                ("total_ms", SqlType::BigInt),
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
        (
            "partition_state",
            &[
                ("consumer_group", SqlType::Text),
                ("topic", SqlType::Text),
                ("partition", SqlType::Integer),
                ("state_key", SqlType::Bytes),
                ("state_value", SqlType::Bytes),
            ],
        ),
    ],
};

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
    /// Flushes written after a data error, with the offending values replaced.
    pub data_errors: u64,
    /// Messages of the group's topic deleted by the broker before the group read them.
    pub lost: u64,
}

/// The `le_ms` under which [`FLUSH_STATS`] reports a group's data errors.
const DATA_ERROR_ROW: i64 = -1;
/// The `le_ms` under which [`FLUSH_STATS`] reports a group's lost messages.
const LOST_ROW: i64 = -2;

/// Every group's flush-duration rows, and its data errors and lost messages as more rows.
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

/// A column's type as the schema check names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlType {
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
    columns: &[(&str, SqlType)],
    found: &HashMap<String, String>,
    type_name: fn(SqlType) -> &'static str,
) -> Option<String> {
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

/// The table and column of a migration `ALTER TABLE t ADD COLUMN c …`, which is applied only
/// where the column is missing (neither database has `ADD COLUMN IF NOT EXISTS` in common).
fn added_column(migration: &str) -> Option<(&str, &str)> {
    let words: Vec<&str> = migration.split_whitespace().collect();
    match words.as_slice() {
        [alter, table_kw, table, add, column_kw, column, ..]
            if alter.eq_ignore_ascii_case("ALTER")
                && table_kw.eq_ignore_ascii_case("TABLE")
                && add.eq_ignore_ascii_case("ADD")
                && column_kw.eq_ignore_ascii_case("COLUMN") =>
        {
            Some((table, column))
        }
        _ => None,
    }
}

/// Errors from the statistics database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL as [`crate::secrets::redact`] shows it.
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://USER@HOST:PORT/DB")]
    UnsupportedUrl(String),
    #[error("cannot open database {url}: {} (check --database / PAGEVIEWS_DATABASE)", crate::one_line(.source.as_ref()))]
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
    /// The database holds what this version cannot use as it is (`reason` says what to do).
    #[error("cannot use database {url}: {reason}")]
    Refused { url: String, reason: String },
    #[error("database error: {0}")]
    Sqlite(#[from] libsql::Error),
    #[error("database error: {}", crate::one_line(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("cannot get a database connection: {}", crate::one_line(.0))]
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
    /// forever, so the caller must change what it writes ([`Results::quarantine`]).
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

/// A partition's event-time clock as stored: the largest event time read, and since when
/// (wall clock, ms) its member has been at the log end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionClock {
    pub partition: i32,
    pub clock: Option<i64>,
    pub caught_up_since: Option<i64>,
}

/// Stored state rows (key, value) per partition.
pub type PartitionState = HashMap<i32, Vec<(Vec<u8>, Vec<u8>)>>;

/// One row of a partition's state (`partition_state`): set to `value`, or deleted when it is
/// `None`. Only partitions whose offsets the same flush moves (or rewrites) may have rows, so
/// they are fenced by the same compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRow {
    pub partition: i32,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// What a group writes into a flush's transaction besides its positions: its own rows, in
/// its own tables.
pub trait Results: Clone + Default + Send + Sync + 'static {
    /// Writes these results for `group` (consuming `topic`) inside the flush's transaction.
    fn write<'a>(
        &'a self,
        tx: &'a Tx<'a>,
        group: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// After a data error: replaces the values that may have caused it (all of them when
    /// `everything`) so that the flush can be written with exact totals and no partition
    /// stalls. Returns how many rows changed.
    fn quarantine(&mut self, _error: &str, _everything: bool) -> usize {
        0
    }
}

/// A group that writes nothing but its positions (tests of the positions themselves).
impl Results for () {
    fn write<'a>(
        &'a self,
        _: &'a Tx<'a>,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Everything one flush writes: the positions that every group has, and the group's results.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushBatch<R = ()> {
    pub consumer_group: String,
    pub topic: String,
    pub offsets: Vec<OffsetUpdate>,
    /// Source watermarks that moved; only for partitions in `offsets` (so they are fenced by
    /// the same compare-and-set).
    pub watermarks: Vec<WatermarkUpdate>,
    /// Partitions (of `offsets`) whose stored watermarks count in a raw topic that no longer
    /// exists: deleted before `watermarks` are written.
    pub reset_watermarks: Vec<i32>,
    /// The topics the written positions refer to, recorded for every partition in `offsets`.
    pub identity: TopicIdentity,
    /// Event-time clocks of the flushed partitions (groups that keep a watermark).
    pub clocks: Vec<PartitionClock>,
    /// State rows of the flushed partitions that changed since the last flush (see
    /// [`StateRow`]).
    pub state: Vec<StateRow>,
    /// Messages of `topic` the group found gone from the broker (deleted by its retention
    /// before they were read) since its last flush: added to `lost_messages` by the same
    /// transaction as the offsets that moved past them, so each is counted once.
    pub lost: u64,
    /// Set after [`Results::quarantine`]: the data error that made this batch's values
    /// change, recorded in `flush_data_errors` by the same transaction.
    pub data_error: Option<String>,
    /// The group's own rows.
    pub results: R,
}

impl<R: Results> FlushBatch<R> {
    /// See [`Results::quarantine`]; records `error` with the flush.
    pub fn quarantine(&mut self, error: &str, everything: bool) -> usize {
        let moved = self.results.quarantine(error, everything);
        self.data_error = Some(crate::event::policy::bounded(error).into_owned());
        moved
    }
}

/// How a flush ended when the database itself worked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Results and offsets are durable.
    Committed,
    /// Nothing was written: these partitions' stored offsets are not what the writer expected
    /// (another member moved them). The caller drops their results and re-reads the offsets.
    Conflict(Vec<i32>),
}

const WATERMARKS: Upsert = Upsert {
    table: "source_watermarks",
    keys: &[
        ("consumer_group", Ty::Text),
        ("topic", Ty::Text),
        ("\"partition\"", Ty::Int4),
        ("source_partition", Ty::Int4),
    ],
    values: &[("source_offset", Ty::Int8, Merge::Replace)],
};

const TOPIC_IDS: Upsert = Upsert {
    table: "topic_ids",
    keys: &[
        ("consumer_group", Ty::Text),
        ("topic", Ty::Text),
        ("\"partition\"", Ty::Int4),
    ],
    values: &[
        ("topic_id", Ty::Text, Merge::KeepIfNull),
        ("source_topic_id", Ty::Text, Merge::KeepIfNull),
    ],
};

const CLOCKS: Upsert = Upsert {
    table: "alert_clocks",
    keys: &[
        ("consumer_group", Ty::Text),
        ("topic", Ty::Text),
        ("\"partition\"", Ty::Int4),
    ],
    values: &[
        ("clock", Ty::Int8, Merge::Replace),
        ("caught_up_since", Ty::Int8, Merge::Replace),
    ],
};

const STATE: Upsert = Upsert {
    table: "partition_state",
    keys: &[
        ("consumer_group", Ty::Text),
        ("topic", Ty::Text),
        ("\"partition\"", Ty::Int4),
        ("state_key", Ty::Bytes),
    ],
    values: &[("state_value", Ty::Bytes, Merge::Replace)],
};

const FLUSH_STAT: Upsert = Upsert {
    table: "flush_stats",
    keys: &[("consumer_group", Ty::Text), ("le_ms", Ty::Int8)],
    values: &[
        ("flushes", Ty::Int8, Merge::Add),
        ("total_ms", Ty::Int8, Merge::Add),
    ],
};

const LOST: Upsert = Upsert {
    table: "lost_messages",
    keys: &[("consumer_group", Ty::Text)],
    values: &[("lost", Ty::Int8, Merge::Add)],
};

/// Counts a flush written after a data error (parameters: the group, the error).
const RECORD_DATA_ERROR: &str =
    "INSERT INTO flush_data_errors (consumer_group, errors, last_error) VALUES (?1, 1, ?2)
     ON CONFLICT (consumer_group) DO UPDATE
     SET errors = flush_data_errors.errors + 1, last_error = excluded.last_error";

/// One flush inside `tx` (a write transaction): compare-and-set of every moved offset (any
/// conflict: nothing is written, the caller rolls back), then watermarks, topic ids, clocks,
/// the group's results, the data error, lost messages and the flush's duration.
pub async fn flush_in<R: Results>(
    tx: &Tx<'_>,
    batch: &FlushBatch<R>,
) -> Result<FlushOutcome, StoreError> {
    let started = std::time::Instant::now();
    let (group, topic) = (batch.consumer_group.as_str(), batch.topic.as_str());
    // One compare-and-set per moved partition, sent together (pipelined on PostgreSQL).
    let moved = futures::future::try_join_all(batch.offsets.iter().map(|o| async move {
        let changed = match o.expected {
            Some(expected) => {
                tx.execute(
                    "UPDATE consumer_offsets SET next_offset = ?1
                     WHERE consumer_group = ?2 AND topic = ?3 AND \"partition\" = ?4 AND next_offset = ?5",
                    &args![o.next, group, topic, o.partition, expected],
                )
                .await?
            }
            None => {
                tx.execute(
                    "INSERT INTO consumer_offsets (consumer_group, topic, \"partition\", next_offset)
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                    &args![group, topic, o.partition, o.next],
                )
                .await?
            }
        };
        Ok::<_, StoreError>((o.partition, changed))
    }))
    .await?;
    let conflicts: Vec<i32> = moved
        .into_iter()
        .filter(|&(_, changed)| changed != 1)
        .map(|(p, _)| p)
        .collect();
    if !conflicts.is_empty() {
        return Ok(FlushOutcome::Conflict(conflicts));
    }
    for &p in &batch.reset_watermarks {
        tx.execute(
            "DELETE FROM source_watermarks WHERE consumer_group = ?1 AND topic = ?2 AND \"partition\" = ?3",
            &args![group, topic, p],
        )
        .await?;
    }
    let row = |p: i32| args![group, topic, p];
    let watermarks = batch
        .watermarks
        .iter()
        .map(|w| {
            let mut r = row(w.partition);
            r.extend(args![w.source_partition, w.source_offset]);
            r
        })
        .collect();
    let id = &batch.identity;
    let topic_ids = batch
        .offsets
        .iter()
        .map(|o| {
            let mut r = row(o.partition);
            r.extend(args![id.topic_id.clone(), id.source_topic_id.clone()]);
            r
        })
        .collect();
    let clocks = batch
        .clocks
        .iter()
        .map(|c| {
            let mut r = row(c.partition);
            r.extend(args![c.clock, c.caught_up_since]);
            r
        })
        .collect();
    let (set, deleted): (Vec<&StateRow>, Vec<&StateRow>) =
        batch.state.iter().partition(|r| r.value.is_some());
    let set = set
        .into_iter()
        .map(|s| {
            let mut r = row(s.partition);
            r.extend(args![s.key.clone(), s.value.clone()]);
            r
        })
        .collect();
    // Independent tables: sent together (pipelined on PostgreSQL).
    futures::try_join!(
        tx.upsert(&WATERMARKS, watermarks),
        tx.upsert(&TOPIC_IDS, topic_ids),
        tx.upsert(&CLOCKS, clocks),
        tx.upsert(&STATE, set),
        futures::future::try_join_all(deleted.into_iter().map(|s| async move {
            tx.execute(
                "DELETE FROM partition_state WHERE consumer_group = ?1 AND topic = ?2 AND \"partition\" = ?3 AND state_key = ?4",
                &args![group, topic, s.partition, s.key.clone()],
            )
            .await
        })),
    )?;
    batch.results.write(tx, group, topic).await?;
    if let Some(error) = &batch.data_error {
        tx.execute(RECORD_DATA_ERROR, &args![group, error.as_str()])
            .await?;
    }
    if batch.lost > 0 {
        tx.upsert(&LOST, vec![args![group, batch.lost]]).await?;
    }
    let (le, ms) = flush_bucket(started.elapsed());
    tx.upsert(&FLUSH_STAT, vec![args![group, le, 1_i64, ms]])
        .await?;
    Ok(FlushOutcome::Committed)
}

/// What a group stored for a topic: next offsets, source watermarks, topic ids and clocks per
/// partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredPositions {
    pub offsets: HashMap<i32, i64>,
    /// events partition → (raw partition → highest raw offset counted).
    pub watermarks: HashMap<i32, HashMap<i32, i64>>,
    /// events partition → the topics its offset and watermarks refer to (absent: written by
    /// a version that did not record them).
    pub identities: HashMap<i32, TopicIdentity>,
    /// events partition → its event-time clock (groups that keep one).
    pub event_clocks: HashMap<i32, i64>,
    /// events partition → its state rows (key, value), read only for the partitions being
    /// positioned ([`Store::load_partition_state`]).
    pub state: PartitionState,
}

impl StoredPositions {
    pub fn offset(&self, partition: i32) -> Option<i64> {
        self.offsets.get(&partition).copied()
    }

    pub fn watermarks(&self, partition: i32) -> HashMap<i32, i64> {
        self.watermarks.get(&partition).cloned().unwrap_or_default()
    }
}

/// The stored clocks of `group`'s partitions of `topic`.
pub async fn clocks(
    tx: &Tx<'_>,
    group: &str,
    topic: &str,
) -> Result<Vec<PartitionClock>, StoreError> {
    tx.query(
        "SELECT \"partition\", clock, caught_up_since FROM alert_clocks
         WHERE consumer_group = ?1 AND topic = ?2",
        &args![group, topic],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(PartitionClock {
            partition: r.int32(0)?,
            clock: r.opt_int(1)?,
            caught_up_since: r.opt_int(2)?,
        })
    })
    .collect()
}

async fn positions_in(
    tx: &Tx<'_>,
    group: &str,
    topic: &str,
) -> Result<StoredPositions, StoreError> {
    let mut out = StoredPositions::default();
    let key = args![group, topic];
    for r in tx
        .query(
            "SELECT \"partition\", next_offset FROM consumer_offsets WHERE consumer_group = ?1 AND topic = ?2",
            &key,
        )
        .await?
    {
        out.offsets.insert(r.int32(0)?, r.int(1)?);
    }
    for r in tx
        .query(
            "SELECT \"partition\", source_partition, source_offset FROM source_watermarks
             WHERE consumer_group = ?1 AND topic = ?2",
            &key,
        )
        .await?
    {
        out.watermarks
            .entry(r.int32(0)?)
            .or_default()
            .insert(r.int32(1)?, r.int(2)?);
    }
    for r in tx
        .query(
            "SELECT \"partition\", topic_id, source_topic_id FROM topic_ids
             WHERE consumer_group = ?1 AND topic = ?2",
            &key,
        )
        .await?
    {
        out.identities.insert(
            r.int32(0)?,
            TopicIdentity {
                topic_id: r.opt_text(1)?,
                source_topic_id: r.opt_text(2)?,
            },
        );
    }
    for c in clocks(tx, group, topic).await? {
        if let Some(clock) = c.clock {
            out.event_clocks.insert(c.partition, clock);
        }
    }
    Ok(out)
}

/// How a write transaction ends.
pub enum Done<T> {
    Commit(T),
    Rollback(T),
}

/// The database behind `--database`.
#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

/// A read of `Store::read`: given a connection, its rows.
pub type Reading<T> =
    Box<dyn for<'t> FnOnce(Tx<'t>) -> BoxFuture<'t, Result<T, StoreError>> + Send>;
/// A write of `Store::write`: given a transaction, its outcome.
pub type Writing<T> =
    Box<dyn for<'t> FnOnce(Tx<'t>) -> BoxFuture<'t, Result<Done<T>, StoreError>> + Send>;

/// Boxes a read for [`Store::read`] (the closure's signature spelled once).
pub fn reading<T, F>(f: F) -> Reading<T>
where
    F: for<'t> FnOnce(Tx<'t>) -> BoxFuture<'t, Result<T, StoreError>> + Send + 'static,
{
    Box::new(f)
}

/// Boxes a write for [`Store::write`].
pub fn writing<T, F>(f: F) -> Writing<T>
where
    F: for<'t> FnOnce(Tx<'t>) -> BoxFuture<'t, Result<Done<T>, StoreError>> + Send + 'static,
{
    Box::new(f)
}

impl Store {
    /// Opens (creating if needed) the database at `url` and applies `schemas`.
    pub async fn open_with(url: &str, schemas: &[&Schema]) -> Result<Store, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            return Ok(Store::Sqlite(SqliteStore::open(path, schemas).await?));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Store::Postgres(PostgresStore::open(url, schemas).await?));
        }
        Err(StoreError::UnsupportedUrl(crate::secrets::redact(url)))
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    /// Runs `f` on a connection of its own (outside any transaction).
    pub async fn read<T: Send + 'static>(&self, f: Reading<T>) -> Result<T, StoreError> {
        match self {
            Store::Sqlite(s) => s.read(f).await,
            Store::Postgres(s) => s.read(f).await,
        }
    }

    /// Runs `f` in a write transaction, committed or rolled back as it says; an error rolls
    /// it back.
    pub async fn write<T: Send + 'static>(&self, f: Writing<T>) -> Result<T, StoreError> {
        match self {
            Store::Sqlite(s) => s.write(f).await,
            Store::Postgres(s) => s.write(f).await,
        }
    }

    /// Stored next offsets, source watermarks, topic ids and clocks of `topic` for `group`.
    pub async fn load_positions(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<StoredPositions, StoreError> {
        let (group, topic) = (group.to_owned(), topic.to_owned());
        self.read(reading(move |tx| {
            Box::pin(async move { positions_in(&tx, &group, &topic).await })
        }))
        .await
    }

    /// The state rows (`partition_state`) of `group`'s `partitions` of `topic`.
    pub async fn load_partition_state(
        &self,
        group: &str,
        topic: &str,
        partitions: &[i32],
    ) -> Result<PartitionState, StoreError> {
        let (group, topic, partitions) = (group.to_owned(), topic.to_owned(), partitions.to_vec());
        self.read(reading(move |tx| {
            Box::pin(async move {
                let mut out: PartitionState = HashMap::new();
                for p in partitions {
                    let rows = tx
                        .query(
                            "SELECT state_key, state_value FROM partition_state
                             WHERE consumer_group = ?1 AND topic = ?2 AND \"partition\" = ?3",
                            &args![group.as_str(), topic.as_str(), p],
                        )
                        .await?;
                    let rows = rows
                        .iter()
                        .map(|r| Ok((r.blob(0)?, r.blob(1)?)))
                        .collect::<Result<Vec<_>, StoreError>>()?;
                    if !rows.is_empty() {
                        out.insert(p, rows);
                    }
                }
                Ok(out)
            })
        }))
        .await
    }

    /// Writes one flush atomically (see the module docs for the compare-and-set).
    pub async fn flush<R: Results>(
        &self,
        batch: &FlushBatch<R>,
    ) -> Result<FlushOutcome, StoreError> {
        let batch = batch.clone();
        self.write(writing(move |tx| {
            Box::pin(async move {
                Ok(match flush_in(&tx, &batch).await? {
                    FlushOutcome::Committed => Done::Commit(FlushOutcome::Committed),
                    conflict => Done::Rollback(conflict),
                })
            })
        }))
        .await
    }

    /// Every consumer group's flushes by duration.
    pub async fn flush_durations(&self) -> Result<Vec<(String, FlushDurations)>, StoreError> {
        let rows = self
            .read(reading(|tx| {
                Box::pin(async move {
                    tx.query(FLUSH_STATS, &[])
                        .await?
                        .iter()
                        .map(|r| Ok((r.text(0)?, r.int(1)?, r.count(2)?, r.count(3)?)))
                        .collect::<Result<Vec<_>, StoreError>>()
                })
            }))
            .await?;
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
        self.read(reading(|tx| {
            Box::pin(async move {
                match tx
                    .query_opt(
                        "SELECT CAST(COALESCE(SUM(next_offset), 0) AS BIGINT) FROM consumer_offsets",
                        &[],
                    )
                    .await?
                {
                    Some(r) => r.int(0),
                    None => Ok(0),
                }
            })
        }))
        .await
    }
}

/// A count to add, as SQL's BIGINT.
pub fn sql_count(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
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

    /// A schema that adds a column to a table made by an earlier version.
    const V1: Schema = Schema {
        migrations: &["CREATE TABLE IF NOT EXISTS things (id TEXT PRIMARY KEY)"],
        columns: &[("things", &[("id", SqlType::Text)])],
    };
    const V2: Schema = Schema {
        migrations: &[
            "CREATE TABLE IF NOT EXISTS things (id TEXT PRIMARY KEY)",
            "ALTER TABLE things ADD COLUMN seen BIGINT",
        ],
        columns: &[(
            "things",
            &[("id", SqlType::Text), ("seen", SqlType::BigInt)],
        )],
    };

    async fn a_column_is_added_once(url: &str) {
        Store::open_with(url, &[&SCHEMA, &V1]).await.unwrap();
        // The new version adds the column, and opening it again does not fail on it.
        for _ in 0..2 {
            let store = Store::open_with(url, &[&SCHEMA, &V2]).await.unwrap();
            let n = store
                .write(writing(|tx| {
                    Box::pin(async move {
                        tx.execute(
                            "INSERT INTO things (id, seen) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET seen = things.seen + excluded.seen",
                            &args!["a", 1_i64],
                        )
                        .await?;
                        let r = tx.query_opt("SELECT seen FROM things", &[]).await?;
                        Ok(Done::Commit(r.map(|r| r.int(0)).transpose()?))
                    })
                }))
                .await
                .unwrap();
            assert!(matches!(n, Some(1 | 2)), "{n:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sqlite_a_column_is_added_once() {
        let dir = tempfile::tempdir().unwrap();
        a_column_is_added_once(&format!("sqlite://{}/s.db", dir.path().display())).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_a_column_is_added_once() {
        a_column_is_added_once(&testing::fresh_postgres_url().await).await;
    }

    #[test]
    fn an_added_column_is_recognised() {
        assert_eq!(
            added_column("ALTER TABLE t ADD COLUMN c TEXT"),
            Some(("t", "c"))
        );
        assert_eq!(added_column("CREATE TABLE IF NOT EXISTS t (c TEXT)"), None);
    }
}
