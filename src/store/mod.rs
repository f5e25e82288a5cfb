//! The statistics database: counts and the aggregator's Kafka offsets, side by side.
//!
//! Counts and offsets are written in ONE transaction per flush, so after any crash the
//! database holds counts for exactly the messages before the stored offsets. Offsets are
//! compare-and-set: a flush only advances a partition's offset from the value its writer read
//! when it was assigned the partition. A zombie aggregator (revoked, but not yet aware of it)
//! therefore cannot write counts that the partition's new owner will count again.
//!
//! SQLite (via `libsql`, the SQLite the embedded broker links) is the default; the enum leaves
//! room for PostgreSQL with the same schema.

mod sqlite;

use std::collections::HashMap;

pub use sqlite::SqliteStore;

/// Errors from the statistics database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL {0:?}: use sqlite://PATH (postgres:// is not supported yet)")]
    UnsupportedUrl(String),
    #[error("cannot open database {url}: {reason}")]
    Open { url: String, reason: String },
    #[error("database error: {0}")]
    Sqlite(#[from] libsql::Error),
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
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            return Ok(Store::Sqlite(SqliteStore::open(path).await?));
        }
        Err(StoreError::UnsupportedUrl(url.to_owned()))
    }

    /// Stored next offsets of `topic` for `group`, by partition.
    pub async fn load_offsets(&self, group: &str, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
        match self {
            Store::Sqlite(s) => s.load_offsets(group, topic).await,
        }
    }

    /// Writes one flush atomically (see the module docs for the compare-and-set).
    pub async fn flush(&self, batch: &FlushBatch) -> Result<FlushOutcome, StoreError> {
        match self {
            Store::Sqlite(s) => s.flush(batch).await,
        }
    }

    /// All countries, most visits first, then by code.
    pub async fn country_counts(&self) -> Result<Vec<CountryCount>, StoreError> {
        match self {
            Store::Sqlite(s) => s.country_counts().await,
        }
    }
}
