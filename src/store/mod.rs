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
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SqlType {
    Text,
    BigInt,
    Integer,
}

impl SqlType {
    /// The type's name as SQLite's `PRAGMA table_info` reports a declared type.
    fn sqlite(self) -> &'static str {
        match self {
            SqlType::Text => "TEXT",
            SqlType::BigInt => "BIGINT",
            SqlType::Integer => "INTEGER",
        }
    }
    /// The type's name in PostgreSQL's `information_schema.columns.data_type`.
    fn postgres(self) -> &'static str {
        match self {
            SqlType::Text => "text",
            SqlType::BigInt => "bigint",
            SqlType::Integer => "integer",
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
        Err(StoreError::UnsupportedUrl(url.to_owned()))
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
        assert_eq!(store.flush(&second).await.unwrap(), FlushOutcome::Committed);
        let mut third = batch(&[], &[(0, Some(11), 12)]);
        third.watermarks = vec![wm(0, 3, 502)];
        assert_eq!(store.flush(&third).await.unwrap(), FlushOutcome::Committed);
        // A writer that still thinks offset 7 is stored is fenced off and writes nothing,
        // not even the offsets or watermarks of its other partitions.
        let mut zombie = batch(&[("NL", 100)], &[(0, Some(7), 9), (2, None, 1)]);
        zombie.watermarks = vec![wm(0, 3, 900), wm(2, 3, 900)];
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
        };
        // Reopening keeps everything (migrations are idempotent).
        drop(store);
        let store = Store::open(url).await.unwrap();
        assert_eq!(store.load_positions("g", "t").await.unwrap(), expected);
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

    #[tokio::test]
    async fn unknown_scheme_is_a_clear_error() {
        let err = Store::open("mysql://localhost/x").await.err().unwrap();
        assert_eq!(
            err.to_string(),
            "unsupported database URL \"mysql://localhost/x\": use sqlite://PATH or postgres://USER@HOST:PORT/DB"
        );
    }
}
