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
];

/// Errors from the statistics database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://USER@HOST:PORT/DB")]
    UnsupportedUrl(String),
    #[error("cannot open database {url}: {reason}")]
    Open { url: String, reason: String },
    #[error("database error: {0}")]
    Sqlite(#[from] libsql::Error),
    #[error("database error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("cannot get a database connection: {0}")]
    Pool(String),
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

/// Everything one flush writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushBatch {
    pub consumer_group: String,
    pub topic: String,
    /// Visits to add, per country code.
    pub increments: Vec<(String, u64)>,
    pub offsets: Vec<OffsetUpdate>,
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

    /// Stored next offsets of `topic` for `group`, by partition.
    pub async fn load_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<HashMap<i32, i64>, StoreError> {
        match self {
            Store::Sqlite(s) => s.load_offsets(group, topic).await,
            Store::Postgres(s) => s.load_offsets(group, topic).await,
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
        assert_eq!(
            store
                .flush(&batch(&[("NL", 4)], &[(0, Some(7), 11), (1, None, 3)]))
                .await
                .unwrap(),
            FlushOutcome::Committed
        );
        // A writer that still thinks offset 7 is stored is fenced off and writes nothing,
        // not even the offsets of its other partitions.
        assert_eq!(
            store
                .flush(&batch(&[("NL", 100)], &[(0, Some(7), 9), (2, None, 1)]))
                .await
                .unwrap(),
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
        assert_eq!(
            store.load_offsets("g", "t").await.unwrap(),
            HashMap::from([(0, 11), (1, 3)])
        );
        assert_eq!(
            store.load_offsets("other-group", "t").await.unwrap(),
            HashMap::new()
        );
        // Reopening keeps everything (migrations are idempotent).
        drop(store);
        let store = Store::open(url).await.unwrap();
        assert_eq!(
            store.load_offsets("g", "t").await.unwrap(),
            HashMap::from([(0, 11), (1, 3)])
        );
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
