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
];

/// Errors from the statistics database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://USER@HOST:PORT/DB")]
    UnsupportedUrl(String),
    #[error("cannot open database {url}: {reason} (check --database / PAGEVIEWS_DATABASE)")]
    Open { url: String, reason: String },
    #[error("database error: {0}")]
    Sqlite(#[from] libsql::Error),
    #[error("database error: {}", causes(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("cannot get a database connection: {0}")]
    Pool(String),
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
}

/// What a consumer group stored for a topic: next offsets and source watermarks per partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredPositions {
    pub offsets: HashMap<i32, i64>,
    /// events partition → (raw partition → highest raw offset counted).
    pub watermarks: HashMap<i32, HashMap<i32, i64>>,
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
            watermarks: Vec::new(),
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
        };
        assert_eq!(store.load_positions("g", "t").await.unwrap(), expected);
        assert_eq!(
            store.load_positions("other-group", "t").await.unwrap(),
            StoredPositions::default()
        );
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

    #[tokio::test]
    async fn unknown_scheme_is_a_clear_error() {
        let err = Store::open("mysql://localhost/x").await.err().unwrap();
        assert_eq!(
            err.to_string(),
            "unsupported database URL \"mysql://localhost/x\": use sqlite://PATH or postgres://USER@HOST:PORT/DB"
        );
    }
}
