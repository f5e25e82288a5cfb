//! SQLite implementation of the store.
//!
//! Every operation takes a connection of its own from a small pool and runs on a blocking
//! thread: SQLite calls are synchronous (a busy database waits up to the busy timeout inside
//! them), so on an async worker they would stall every other task of that worker, the
//! in-process broker's included. With a connection per operation, `serve` never reads inside
//! an aggregator's open transaction, and two aggregators of one process never share one.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libsql::{Connection, TransactionBehavior, params};

use super::{
    CountryCount, EXPECTED_COLUMNS, FlushBatch, FlushOutcome, MIGRATIONS, SqlType, StoreError,
    StoredPositions, TopicIdentity, schema_problem,
};

/// How long a statement waits for another writer (another process's flush) to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept for reuse; more are opened when more operations run at once.
const MAX_IDLE: usize = 8;

/// A SQLite database file shared by the aggregators (writers) and `serve` (reader) of one
/// machine. WAL mode lets readers run while a flush writes.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: libsql::Database,
    /// Connections not in use; an operation takes one (or opens one) and puts it back.
    idle: Mutex<Vec<Connection>>,
}

impl Inner {
    fn connect(&self, handle: &tokio::runtime::Handle) -> Result<Connection, StoreError> {
        let conn = self.db.connect()?;
        // Several processes may share the file: wait for the lock instead of failing at once.
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Durable at every checkpoint, not every commit: a power cut may lose the last
        // flushes, but counts and offsets are lost together, so nothing is counted twice.
        handle.block_on(conn.execute("PRAGMA synchronous = NORMAL", ()))?;
        Ok(conn)
    }
}

impl SqliteStore {
    pub async fn open(path: &str) -> Result<SqliteStore, StoreError> {
        let url = format!("sqlite://{path}");
        let open_err = |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
            url: url.clone(),
            source: e,
        };
        if let Some(parent) = Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|e| open_err(Box::new(e)))?;
        }
        let db = libsql::Builder::new_local(path)
            .build()
            .await
            .map_err(|e| open_err(Box::new(e)))?;
        let store = SqliteStore {
            inner: Arc::new(Inner {
                db,
                idle: Mutex::new(Vec::new()),
            }),
        };
        let columns = store
            .with_conn(|conn| async move {
                let mut rows = conn.query("PRAGMA journal_mode = WAL", ()).await?;
                while rows.next().await?.is_some() {}
                for m in MIGRATIONS {
                    conn.execute(m, ()).await?;
                }
                let mut tables = HashMap::new();
                for (table, _) in EXPECTED_COLUMNS {
                    let mut found = HashMap::new();
                    let mut rows = conn
                        .query(
                            "SELECT name, type FROM pragma_table_info(?1)",
                            params![*table],
                        )
                        .await?;
                    while let Some(row) = rows.next().await? {
                        found.insert(row.get::<String>(0)?, row.get::<String>(1)?);
                    }
                    tables.insert(*table, found);
                }
                Ok(tables)
            })
            .await
            .map_err(|e| match e {
                StoreError::Sqlite(e) => open_err(Box::new(e)),
                other => other,
            })?;
        for (table, found) in &columns {
            if let Some(problem) = schema_problem(table, found, SqlType::sqlite) {
                return Err(StoreError::Schema {
                    url,
                    table: (*table).to_owned(),
                    problem,
                });
            }
        }
        Ok(store)
    }

    /// Runs `f` with a connection of its own on a blocking thread. A connection whose
    /// operation failed is closed rather than reused (it may be inside a transaction).
    async fn with_conn<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Connection) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>>,
        T: Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let idle = inner.idle.lock().ok().and_then(|mut idle| idle.pop());
            let conn = match idle {
                Some(c) => c,
                None => inner.connect(&handle)?,
            };
            let result = handle.block_on(f(conn.clone()));
            if result.is_ok()
                && let Ok(mut idle) = inner.idle.lock()
                && idle.len() < MAX_IDLE
            {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    pub async fn load_positions(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<StoredPositions, StoreError> {
        let (group, topic) = (group.to_owned(), topic.to_owned());
        self.with_conn(move |conn| async move {
            let mut out = StoredPositions::default();
            let mut rows = conn
                .query(
                    "SELECT \"partition\", next_offset FROM consumer_offsets WHERE consumer_group = ?1 AND topic = ?2",
                    params![group.as_str(), topic.as_str()],
                )
                .await?;
            while let Some(row) = rows.next().await? {
                out.offsets
                    .insert(int32(row.get::<i64>(0)?), row.get::<i64>(1)?);
            }
            let mut rows = conn
                .query(
                    "SELECT \"partition\", source_partition, source_offset FROM source_watermarks
                     WHERE consumer_group = ?1 AND topic = ?2",
                    params![group.as_str(), topic.as_str()],
                )
                .await?;
            while let Some(row) = rows.next().await? {
                out.watermarks
                    .entry(int32(row.get::<i64>(0)?))
                    .or_default()
                    .insert(int32(row.get::<i64>(1)?), row.get::<i64>(2)?);
            }
            let mut rows = conn
                .query(
                    "SELECT \"partition\", topic_id, source_topic_id FROM topic_ids
                     WHERE consumer_group = ?1 AND topic = ?2",
                    params![group.as_str(), topic.as_str()],
                )
                .await?;
            while let Some(row) = rows.next().await? {
                out.identities.insert(
                    int32(row.get::<i64>(0)?),
                    TopicIdentity {
                        topic_id: row.get::<Option<String>>(1)?,
                        source_topic_id: row.get::<Option<String>>(2)?,
                    },
                );
            }
            Ok(out)
        })
        .await
    }

    pub async fn flush(&self, batch: &FlushBatch) -> Result<FlushOutcome, StoreError> {
        let batch = batch.clone();
        self.with_conn(move |conn| async move { flush_on(&conn, &batch).await })
            .await
    }

    pub async fn country_counts(&self) -> Result<Vec<CountryCount>, StoreError> {
        self.with_conn(|conn| async move {
            let mut rows = conn
                .query(
                    "SELECT country_code, visit_count FROM country_stats WHERE visit_count > 0
                     ORDER BY visit_count DESC, country_code",
                    (),
                )
                .await?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().await? {
                out.push(CountryCount {
                    country_code: row.get::<String>(0)?,
                    visits: u64::try_from(row.get::<i64>(1)?).unwrap_or(0),
                });
            }
            Ok(out)
        })
        .await
    }
}

/// One flush on one connection: compare-and-set of the offsets, then watermarks, topic ids
/// and counts, in one immediate (write-locked) transaction.
async fn flush_on(conn: &Connection, batch: &FlushBatch) -> Result<FlushOutcome, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .await?;
    let (group, topic) = (batch.consumer_group.as_str(), batch.topic.as_str());
    let mut conflicts = Vec::new();
    for o in &batch.offsets {
        let changed = match o.expected {
            Some(expected) => {
                tx.execute(
                    "UPDATE consumer_offsets SET next_offset = ?1
                     WHERE consumer_group = ?2 AND topic = ?3 AND \"partition\" = ?4 AND next_offset = ?5",
                    params![o.next, group, topic, i64::from(o.partition), expected],
                )
                .await?
            }
            None => {
                tx.execute(
                    "INSERT INTO consumer_offsets (consumer_group, topic, \"partition\", next_offset)
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                    params![group, topic, i64::from(o.partition), o.next],
                )
                .await?
            }
        };
        if changed != 1 {
            conflicts.push(o.partition);
        }
    }
    if !conflicts.is_empty() {
        tx.rollback().await?;
        return Ok(FlushOutcome::Conflict(conflicts));
    }
    for p in &batch.reset_watermarks {
        tx.execute(
            "DELETE FROM source_watermarks WHERE consumer_group = ?1 AND topic = ?2 AND \"partition\" = ?3",
            params![group, topic, i64::from(*p)],
        )
        .await?;
    }
    for w in &batch.watermarks {
        tx.execute(
            "INSERT INTO source_watermarks (consumer_group, topic, \"partition\", source_partition, source_offset)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (consumer_group, topic, \"partition\", source_partition)
             DO UPDATE SET source_offset = excluded.source_offset",
            params![
                group,
                topic,
                i64::from(w.partition),
                i64::from(w.source_partition),
                w.source_offset
            ],
        )
        .await?;
    }
    for o in &batch.offsets {
        tx.execute(
            "INSERT INTO topic_ids (consumer_group, topic, \"partition\", topic_id, source_topic_id)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (consumer_group, topic, \"partition\")
             DO UPDATE SET topic_id = COALESCE(excluded.topic_id, topic_ids.topic_id),
                           source_topic_id = COALESCE(excluded.source_topic_id, topic_ids.source_topic_id)",
            params![
                group,
                topic,
                i64::from(o.partition),
                batch.identity.topic_id.clone(),
                batch.identity.source_topic_id.clone()
            ],
        )
        .await?;
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for (code, n) in &batch.increments {
        tx.execute(
            "INSERT INTO country_stats (country_code, visit_count, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (country_code) DO UPDATE
             SET visit_count = country_stats.visit_count + excluded.visit_count, updated_at = excluded.updated_at",
            params![code.as_str(), i64::try_from(*n).unwrap_or(i64::MAX), now.as_str()],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(FlushOutcome::Committed)
}

/// Partition numbers are written from `i32`; anything else is a corrupt row, kept out of range.
fn int32(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(-1)
}
