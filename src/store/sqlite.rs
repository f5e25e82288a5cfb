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
    AlertArg, AlertStatus, Amount, CloseRequest, CountryCount, DimensionCounts, EXPECTED_COLUMNS,
    FlushBatch, FlushOutcome, MIGRATIONS, MinutePoint, SqlType, StoreError, StoredAlert,
    StoredPositions, TopicIdentity, UniqueCount, ValueCount, alert_sql, count, flush_bucket,
    schema_problem, sql_count, stored_alert,
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
            let mut rows = conn
                .query(alert_sql::CLOCKS, params![group.as_str(), topic.as_str()])
                .await?;
            while let Some(row) = rows.next().await? {
                if let Some(clock) = row.get::<Option<i64>>(1)? {
                    out.event_clocks.insert(int32(row.get::<i64>(0)?), clock);
                }
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

    pub async fn dimension_counts(
        &self,
        dimension: &str,
        since: Option<i64>,
        limit: u32,
    ) -> Result<DimensionCounts, StoreError> {
        let dimension = dimension.to_owned();
        self.with_conn(move |conn| async move {
            let (top, totals) = super::dimension_queries(since.is_some(), limit, '?');
            let mut params = vec![libsql::Value::Text(dimension)];
            params.extend(since.map(libsql::Value::Integer));
            let mut out = DimensionCounts::default();
            let mut rows = conn.query(&top, params.clone()).await?;
            while let Some(row) = rows.next().await? {
                out.values.push(ValueCount {
                    value: row.get::<String>(0)?,
                    visits: count(row.get::<i64>(1)?),
                    bytes: count(row.get::<i64>(2)?),
                    humans: count(row.get::<i64>(3)?),
                });
            }
            let mut rows = conn.query(&totals, params).await?;
            if let Some(row) = rows.next().await? {
                out.total_visits = count(row.get::<i64>(0)?);
                out.total_bytes = count(row.get::<i64>(1)?);
                out.total_humans = count(row.get::<i64>(2)?);
                out.distinct = count(row.get::<i64>(3)?);
            }
            Ok(out)
        })
        .await
    }

    pub async fn minutes(
        &self,
        since: i64,
        country: Option<&str>,
    ) -> Result<Vec<MinutePoint>, StoreError> {
        let country = country.map(str::to_owned);
        self.with_conn(move |conn| async move {
            let mut rows = match &country {
                Some(c) => {
                    conn.query(
                        "SELECT minute, visits, bytes, humans FROM minute_counts
                         WHERE minute >= ?1 AND country_code = ?2 ORDER BY minute",
                        params![since, c.as_str()],
                    )
                    .await?
                }
                None => {
                    conn.query(&super::minutes_query('?'), params![since])
                        .await?
                }
            };
            let mut out = Vec::new();
            while let Some(row) = rows.next().await? {
                out.push(MinutePoint {
                    minute: row.get::<i64>(0)?,
                    visits: count(row.get::<i64>(1)?),
                    bytes: count(row.get::<i64>(2)?),
                    humans: count(row.get::<i64>(3)?),
                });
            }
            Ok(out)
        })
        .await
    }

    pub async fn unique_days(
        &self,
        country: &str,
        days: u32,
    ) -> Result<Vec<UniqueCount>, StoreError> {
        let country = country.to_owned();
        self.with_conn(move |conn| async move {
            let rows = conn
                .query(
                    "SELECT day, country_code, estimate FROM unique_visitors
                     WHERE country_code = ?1 ORDER BY day DESC LIMIT ?2",
                    params![country.as_str(), i64::from(days)],
                )
                .await?;
            unique_rows(rows).await
        })
        .await
    }

    pub async fn unique_countries(&self, day: &str) -> Result<Vec<UniqueCount>, StoreError> {
        let day = day.to_owned();
        self.with_conn(move |conn| async move {
            let rows = conn
                .query(
                    "SELECT day, country_code, estimate FROM unique_visitors
                     WHERE day = ?1 AND country_code <> '*' ORDER BY estimate DESC, country_code",
                    params![day.as_str()],
                )
                .await?;
            unique_rows(rows).await
        })
        .await
    }

    pub async fn histogram(
        &self,
        metric: &str,
        scope: &str,
    ) -> Result<Vec<(i32, u64)>, StoreError> {
        let (metric, scope) = (metric.to_owned(), scope.to_owned());
        self.with_conn(move |conn| async move {
            let mut rows = conn
                .query(
                    "SELECT bucket, visits FROM histogram_buckets
                     WHERE metric = ?1 AND scope = ?2 ORDER BY bucket",
                    params![metric.as_str(), scope.as_str()],
                )
                .await?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().await? {
                out.push((int32(row.get::<i64>(0)?), count(row.get::<i64>(1)?)));
            }
            Ok(out)
        })
        .await
    }

    pub async fn last_flush(&self) -> Result<Option<String>, StoreError> {
        self.with_conn(|conn| async move {
            let mut rows = conn
                .query("SELECT MAX(updated_at) FROM country_stats", ())
                .await?;
            match rows.next().await? {
                Some(row) => Ok(row.get::<Option<String>>(0)?),
                None => Ok(None),
            }
        })
        .await
    }

    pub async fn flush_stats(&self) -> Result<Vec<(String, i64, u64, u64)>, StoreError> {
        self.with_conn(|conn| async move {
            let mut rows = conn.query(super::FLUSH_STATS, ()).await?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().await? {
                out.push((
                    row.get::<String>(0)?,
                    row.get::<i64>(1)?,
                    count(row.get::<i64>(2)?),
                    count(row.get::<i64>(3)?),
                ));
            }
            Ok(out)
        })
        .await
    }

    pub async fn flush_version(&self) -> Result<i64, StoreError> {
        self.with_conn(|conn| async move {
            let mut rows = conn
                .query(
                    "SELECT CAST(COALESCE(SUM(next_offset), 0) AS BIGINT) FROM consumer_offsets",
                    (),
                )
                .await?;
            match rows.next().await? {
                Some(row) => Ok(row.get::<i64>(0)?),
                None => Ok(0),
            }
        })
        .await
    }

    pub async fn close_windows(&self, req: CloseRequest) -> Result<usize, StoreError> {
        use crate::alert::window::{PartitionClock, WindowRow, WindowTotals};
        use libsql::Value::{Integer, Text};
        self.with_conn(move |conn| async move {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .await?;
            let group = req.group.as_str();
            tx.execute(alert_sql::ENSURE_STATE, params![group, i64::MIN])
                .await?;
            let mut rows = tx
                .query(
                    "SELECT closed_through, first_event_time FROM alert_state WHERE consumer_group = ?1",
                    params![group],
                )
                .await?;
            let (closed_through, first) = match rows.next().await? {
                Some(row) => (row.get::<i64>(0)?, row.get::<Option<i64>>(1)?),
                None => (i64::MIN, None),
            };
            drop(rows);
            let mut clocks = Vec::new();
            let mut rows = tx
                .query(alert_sql::CLOCKS, params![group, req.topic.as_str()])
                .await?;
            while let Some(row) = rows.next().await? {
                clocks.push(PartitionClock {
                    partition: int32(row.get::<i64>(0)?),
                    clock: row.get::<Option<i64>>(1)?,
                    caught_up_since: row.get::<Option<i64>>(2)?,
                });
            }
            drop(rows);
            let Some(w) = req.watermark(&clocks, closed_through) else {
                tx.rollback().await?;
                return Ok(0);
            };
            let mut found = Vec::new();
            let mut rows = tx
                .query(
                    alert_sql::WINDOWS,
                    params![group, closed_through.saturating_sub(req.history()), w],
                )
                .await?;
            while let Some(row) = rows.next().await? {
                found.push(WindowRow {
                    window: row.get::<i64>(0)?,
                    start: row.get::<i64>(1)?,
                    subject: row.get::<String>(2)?,
                    totals: WindowTotals {
                        requests: count(row.get::<i64>(3)?),
                        errors: count(row.get::<i64>(4)?),
                    },
                });
            }
            drop(rows);
            let alerts = req.alerts(&found, closed_through, w, first);
            let now = req.now_ms;
            for a in &alerts {
                let start = crate::alert::window::seconds_of(&a.window_start).unwrap_or(0);
                let payload = serde_json::to_string(a)
                    .map_err(|e| StoreError::Corrupt(format!("alert payload: {e}")))?;
                tx.execute(
                    alert_sql::INSERT_ALERT,
                    vec![
                        Text(group.to_owned()),
                        Text(a.id.clone()),
                        Integer(start),
                        Text(payload),
                        Integer(now),
                    ],
                )
                .await?;
            }
            tx.execute(alert_sql::CLOSE, params![group, w]).await?;
            tx.execute(
                alert_sql::PRUNE,
                params![group, w.saturating_sub(req.history())],
            )
            .await?;
            tx.commit().await?;
            Ok(alerts.len())
        })
        .await
    }

    pub async fn alerts(
        &self,
        sql: &'static str,
        group: &str,
        pending_only: bool,
        limit: u32,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        let group = group.to_owned();
        self.with_conn(move |conn| async move {
            let mut rows = conn
                .query(
                    sql,
                    params![group.as_str(), i64::from(pending_only), i64::from(limit)],
                )
                .await?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().await? {
                out.push(stored_alert(
                    &row.get::<String>(0)?,
                    row.get::<i64>(1)?,
                    row.get::<i64>(2)? != 0,
                )?);
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn execute_alert(
        &self,
        sql: &str,
        group: &str,
        id: &str,
        third: AlertArg,
        fourth: Option<i64>,
    ) -> Result<u64, StoreError> {
        use libsql::Value::{Integer, Text};
        let (sql, group, id) = (sql.to_owned(), group.to_owned(), id.to_owned());
        self.with_conn(move |conn| async move {
            let mut values = vec![
                Text(group),
                Text(id),
                match third {
                    AlertArg::Int(v) => Integer(v),
                    AlertArg::Text(t) => Text(t),
                },
            ];
            values.extend(fourth.map(Integer));
            Ok(conn.execute(&sql, values).await?)
        })
        .await
    }

    pub async fn alert_groups(&self) -> Result<Vec<String>, StoreError> {
        self.with_conn(|conn| async move {
            let mut rows = conn.query(alert_sql::GROUPS, ()).await?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().await? {
                out.push(row.get::<String>(0)?);
            }
            Ok(out)
        })
        .await
    }

    pub async fn alert_status(&self, group: &str) -> Result<AlertStatus, StoreError> {
        let group = group.to_owned();
        self.with_conn(move |conn| async move {
            let mut out = AlertStatus::default();
            let mut rows = conn
                .query(alert_sql::STATUS, params![group.as_str()])
                .await?;
            if let Some(row) = rows.next().await? {
                out.closed_through = Some(row.get::<i64>(0)?).filter(|&c| c != i64::MIN);
                out.late_events = count(row.get::<i64>(1)?);
            }
            drop(rows);
            let mut rows = conn
                .query(alert_sql::COUNTS, params![group.as_str()])
                .await?;
            if let Some(row) = rows.next().await? {
                out.pending = count(row.get::<i64>(0)?);
                out.delivered = count(row.get::<i64>(1)?).saturating_sub(out.pending);
            }
            Ok(out)
        })
        .await
    }

    pub async fn latest_minute(&self) -> Result<Option<i64>, StoreError> {
        self.with_conn(|conn| async move {
            let mut rows = conn
                .query("SELECT MAX(minute) FROM minute_counts", ())
                .await?;
            match rows.next().await? {
                Some(row) => Ok(row.get::<Option<i64>>(0)?),
                None => Ok(None),
            }
        })
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

async fn unique_rows(mut rows: libsql::Rows) -> Result<Vec<UniqueCount>, StoreError> {
    let mut out = Vec::new();
    while let Some(row) = rows.next().await? {
        out.push(UniqueCount {
            day: row.get::<String>(0)?,
            country_code: row.get::<String>(1)?,
            visitors: count(row.get::<i64>(2)?),
        });
    }
    Ok(out)
}

/// One flush on one connection: compare-and-set of the offsets, then watermarks, topic ids
/// and counts, in one immediate (write-locked) transaction.
/// An alerting group's part of a flush: window counts (late ones counted as such), clocks.
async fn flush_alert(
    tx: &libsql::Transaction,
    group: &str,
    topic: &str,
    alert: &super::AlertFlush,
) -> Result<(), StoreError> {
    use libsql::Value::{Integer, Null, Text};
    let opt = |v: Option<i64>| v.map_or(Null, Integer);
    tx.execute(alert_sql::ENSURE_STATE, params![group, i64::MIN])
        .await?;
    let mut rows = tx.query(alert_sql::STATUS, params![group]).await?;
    let closed_through = match rows.next().await? {
        Some(row) => row.get::<i64>(0)?,
        None => i64::MIN,
    };
    drop(rows);
    let late = alert.late + alert.late_rows(closed_through);
    let add = tx.prepare(alert_sql::ADD_WINDOW).await?;
    for w in &alert.windows {
        if w.start.saturating_add(w.window) <= closed_through {
            continue;
        }
        add.execute(vec![
            Text(group.to_owned()),
            Integer(w.window),
            Integer(w.start),
            Text(w.subject.clone()),
            Integer(sql_count(w.totals.requests)),
            Integer(sql_count(w.totals.errors)),
        ])
        .await?;
        add.reset();
    }
    tx.execute(
        alert_sql::ADD_LATE,
        vec![
            Text(group.to_owned()),
            Integer(sql_count(late)),
            opt(alert.first_event),
        ],
    )
    .await?;
    for c in &alert.clocks {
        tx.execute(
            alert_sql::SET_CLOCK,
            vec![
                Text(group.to_owned()),
                Text(topic.to_owned()),
                Integer(i64::from(c.partition)),
                opt(c.clock),
                opt(c.caught_up_since),
            ],
        )
        .await?;
    }
    Ok(())
}

async fn flush_on(conn: &Connection, batch: &FlushBatch) -> Result<FlushOutcome, StoreError> {
    let started = std::time::Instant::now();
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
    if let Some(alert) = &batch.alert {
        flush_alert(&tx, group, topic, alert).await?;
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for (code, n) in &batch.increments {
        tx.execute(
            "INSERT INTO country_stats (country_code, visit_count, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (country_code) DO UPDATE
             SET visit_count = country_stats.visit_count + excluded.visit_count, updated_at = excluded.updated_at",
            params![code.as_str(), sql_count(*n), now.as_str()],
        )
        .await?;
    }
    use libsql::Value::{Integer, Text};
    add_amounts(
        &tx,
        "dimension_counts",
        &["dimension", "value"],
        batch.dimensions.iter().map(|d| {
            (
                vec![Text(d.dimension.clone()), Text(d.value.clone())],
                d.amount,
            )
        }),
    )
    .await?;
    add_amounts(
        &tx,
        "dimension_hours",
        &["dimension", "hour", "value"],
        batch.dimension_hours.iter().map(|d| {
            let key = vec![
                Text(d.dimension.clone()),
                Integer(d.hour),
                Text(d.value.clone()),
            ];
            (key, d.amount)
        }),
    )
    .await?;
    if let Some(before) = batch.prune_hours_before {
        tx.execute(
            "DELETE FROM dimension_hours WHERE hour < ?1",
            params![before],
        )
        .await?;
    }
    if let Some(keep) = batch.keep_values {
        for (d, hour) in super::compaction_targets(batch) {
            compact(&tx, d, hour, keep).await?;
        }
    }
    add_amounts(
        &tx,
        "minute_counts",
        &["minute", "country_code"],
        batch.minutes.iter().map(|m| {
            (
                vec![Integer(m.minute), Text(m.country_code.clone())],
                m.amount,
            )
        }),
    )
    .await?;
    if !batch.histograms.is_empty() {
        let stmt = tx
            .prepare(
                "INSERT INTO histogram_buckets (metric, scope, bucket, visits) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (metric, scope, bucket) DO UPDATE
                 SET visits = histogram_buckets.visits + excluded.visits",
            )
            .await?;
        for h in &batch.histograms {
            stmt.execute(params![
                h.metric.as_str(),
                h.scope.as_str(),
                i64::from(h.bucket),
                sql_count(h.count)
            ])
            .await?;
            stmt.reset();
        }
    }
    // Sketches merge with what is stored (read, union, write: this transaction holds the
    // write lock, so no other flush interleaves).
    for u in &batch.uniques {
        let mut sketch = u.sketch.clone();
        let mut rows = tx
            .query(
                "SELECT registers FROM unique_visitors WHERE day = ?1 AND country_code = ?2",
                params![u.day.as_str(), u.country_code.as_str()],
            )
            .await?;
        if let Some(row) = rows.next().await? {
            super::merge_stored(&mut sketch, &row.get::<Vec<u8>>(0)?, u);
        }
        drop(rows);
        tx.execute(
            "INSERT INTO unique_visitors (day, country_code, registers, estimate) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (day, country_code) DO UPDATE
             SET registers = excluded.registers, estimate = excluded.estimate",
            params![
                u.day.as_str(),
                u.country_code.as_str(),
                sketch.to_bytes(),
                sketch.estimate().round() as i64
            ],
        )
        .await?;
    }
    if let Some(before) = batch.prune_minutes_before {
        tx.execute(
            "DELETE FROM minute_counts WHERE minute < ?1",
            params![before],
        )
        .await?;
    }
    if let Some(error) = &batch.data_error {
        tx.execute(super::RECORD_DATA_ERROR, params![group, error.as_str()])
            .await?;
    }
    if batch.lost > 0 {
        let lost = i64::try_from(batch.lost).unwrap_or(i64::MAX);
        tx.execute(super::RECORD_LOST, params![group, lost]).await?;
    }
    let (le, ms) = flush_bucket(started.elapsed());
    tx.execute(
        "INSERT INTO flush_stats (consumer_group, le_ms, flushes, total_ms) VALUES (?1, ?2, 1, ?3)
         ON CONFLICT (consumer_group, le_ms) DO UPDATE
         SET flushes = flush_stats.flushes + 1, total_ms = flush_stats.total_ms + excluded.total_ms",
        params![group, le, ms],
    )
    .await?;
    tx.commit().await?;
    Ok(FlushOutcome::Committed)
}

/// Folds the values of `dimension` (in `hour`, or all time) beyond the `keep` with the most
/// visits into `(other)`.
async fn compact(
    tx: &libsql::Transaction,
    dimension: &str,
    hour: Option<i64>,
    keep: u32,
) -> Result<(), StoreError> {
    use libsql::Value::{Integer, Text};
    let (select, delete) = super::compaction_queries(hour.is_some());
    let mut args = vec![Text(dimension.to_owned()), Integer(i64::from(keep))];
    args.extend(hour.map(Integer));
    let mut folded = Amount::default();
    let mut rows = tx.query(&select, args.clone()).await?;
    while let Some(row) = rows.next().await? {
        folded += Amount {
            visits: count(row.get::<i64>(1)?),
            bytes: count(row.get::<i64>(2)?),
            humans: count(row.get::<i64>(3)?),
        };
    }
    drop(rows);
    if folded.is_zero() {
        return Ok(());
    }
    tx.execute(&delete, args).await?;
    let other = Text(super::OTHER.to_owned());
    match hour {
        None => {
            let key = vec![Text(dimension.to_owned()), other];
            add_amounts(
                tx,
                "dimension_counts",
                &["dimension", "value"],
                std::iter::once((key, folded)),
            )
            .await
        }
        Some(h) => {
            let key = vec![Text(dimension.to_owned()), Integer(h), other];
            add_amounts(
                tx,
                "dimension_hours",
                &["dimension", "hour", "value"],
                std::iter::once((key, folded)),
            )
            .await
        }
    }
}

/// Adds visits, bytes and humans to the rows of `table` keyed by the `keys` columns, inserting
/// the rows that are missing: one statement prepared per flush, run once per row.
async fn add_amounts(
    tx: &libsql::Transaction,
    table: &str,
    keys: &[&str],
    rows: impl ExactSizeIterator<Item = (Vec<libsql::Value>, Amount)>,
) -> Result<(), StoreError> {
    if rows.len() == 0 {
        return Ok(());
    }
    let columns = keys.join(", ");
    let placeholders: Vec<String> = (1..=keys.len() + 3).map(|i| format!("?{i}")).collect();
    let stmt = tx
        .prepare(&format!(
            "INSERT INTO {table} ({columns}, visits, bytes, humans) VALUES ({})
             ON CONFLICT ({columns}) DO UPDATE
             SET visits = {}, bytes = {}, humans = {}",
            placeholders.join(", "),
            super::saturating_add(table, "visits"),
            super::saturating_add(table, "bytes"),
            super::saturating_add(table, "humans"),
        ))
        .await?;
    for (mut values, amount) in rows {
        values.extend(
            [amount.visits, amount.bytes, amount.humans]
                .map(|n| libsql::Value::Integer(sql_count(n))),
        );
        stmt.execute(values).await?;
        stmt.reset();
    }
    Ok(())
}

/// Partition numbers are written from `i32`; anything else is a corrupt row, kept out of range.
fn int32(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(-1)
}
