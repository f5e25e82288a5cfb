//! SQLite implementation of the store.

use std::path::Path;
use std::time::Duration;

use libsql::{Connection, TransactionBehavior, params};

use super::{CountryCount, FlushBatch, FlushOutcome, MIGRATIONS, StoreError, StoredPositions};

/// A SQLite database file shared by the aggregators (writers) and `serve` (reader) of one
/// machine. WAL mode lets readers run while a flush writes.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    pub async fn open(path: &str) -> Result<SqliteStore, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            url: format!("sqlite://{path}"),
            reason,
        };
        if let Some(parent) = Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|e| open_err(e.to_string()))?;
        }
        let db = libsql::Builder::new_local(path)
            .build()
            .await
            .map_err(|e| open_err(e.to_string()))?;
        let conn = db.connect().map_err(|e| open_err(e.to_string()))?;
        // Several processes may share the file: wait for the lock instead of failing at once.
        conn.busy_timeout(Duration::from_secs(5))?;
        let mut rows = conn.query("PRAGMA journal_mode = WAL", ()).await?;
        while rows.next().await?.is_some() {}
        conn.execute("PRAGMA synchronous = NORMAL", ()).await?;
        for m in MIGRATIONS {
            conn.execute(m, ()).await?;
        }
        Ok(SqliteStore { conn })
    }

    pub async fn load_positions(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<StoredPositions, StoreError> {
        let mut out = StoredPositions::default();
        let mut rows = self
            .conn
            .query(
                "SELECT \"partition\", next_offset FROM consumer_offsets WHERE consumer_group = ?1 AND topic = ?2",
                params![group, topic],
            )
            .await?;
        while let Some(row) = rows.next().await? {
            out.offsets
                .insert(int32(row.get::<i64>(0)?), row.get::<i64>(1)?);
        }
        let mut rows = self
            .conn
            .query(
                "SELECT \"partition\", source_partition, source_offset FROM source_watermarks
                 WHERE consumer_group = ?1 AND topic = ?2",
                params![group, topic],
            )
            .await?;
        while let Some(row) = rows.next().await? {
            out.watermarks
                .entry(int32(row.get::<i64>(0)?))
                .or_default()
                .insert(int32(row.get::<i64>(1)?), row.get::<i64>(2)?);
        }
        Ok(out)
    }

    pub async fn flush(&self, batch: &FlushBatch) -> Result<FlushOutcome, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .await?;
        let mut conflicts = Vec::new();
        for o in &batch.offsets {
            let changed = match o.expected {
                Some(expected) => {
                    tx.execute(
                        "UPDATE consumer_offsets SET next_offset = ?1
                         WHERE consumer_group = ?2 AND topic = ?3 AND \"partition\" = ?4 AND next_offset = ?5",
                        params![o.next, batch.consumer_group.as_str(), batch.topic.as_str(), i64::from(o.partition), expected],
                    )
                    .await?
                }
                None => {
                    tx.execute(
                        "INSERT INTO consumer_offsets (consumer_group, topic, \"partition\", next_offset)
                         VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                        params![batch.consumer_group.as_str(), batch.topic.as_str(), i64::from(o.partition), o.next],
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
        for w in &batch.watermarks {
            tx.execute(
                "INSERT INTO source_watermarks (consumer_group, topic, \"partition\", source_partition, source_offset)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (consumer_group, topic, \"partition\", source_partition)
                 DO UPDATE SET source_offset = excluded.source_offset",
                params![
                    batch.consumer_group.as_str(),
                    batch.topic.as_str(),
                    i64::from(w.partition),
                    i64::from(w.source_partition),
                    w.source_offset
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

    pub async fn country_counts(&self) -> Result<Vec<CountryCount>, StoreError> {
        let mut rows = self
            .conn
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
    }
}

/// Partition numbers are written from `i32`; anything else is a corrupt row, kept out of range.
fn int32(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(-1)
}
