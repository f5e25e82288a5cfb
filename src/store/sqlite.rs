//! SQLite: connections and migrations; every statement is in the shared code ([`super::sql`]).
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

use libsql::{Connection, params};

use super::sql::Tx;
use super::{Done, Reading, Schema, SqlType, StoreError, Writing, added_column, schema_problem};

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
        // flushes, but results and offsets are lost together, so nothing is counted twice.
        handle.block_on(conn.execute("PRAGMA synchronous = NORMAL", ()))?;
        Ok(conn)
    }
}

/// The columns of `table` (name → declared type).
async fn columns_of(conn: &Connection, table: &str) -> Result<HashMap<String, String>, StoreError> {
    let mut found = HashMap::new();
    let mut rows = conn
        .query(
            "SELECT name, type FROM pragma_table_info(?1)",
            params![table],
        )
        .await?;
    while let Some(row) = rows.next().await? {
        found.insert(row.get::<String>(0)?, row.get::<String>(1)?);
    }
    Ok(found)
}

impl SqliteStore {
    pub async fn open(path: &str, schemas: &[&Schema]) -> Result<SqliteStore, StoreError> {
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
        let migrations: Vec<&'static str> = schemas
            .iter()
            .flat_map(|s| s.migrations.iter().copied())
            .collect();
        let expected: Vec<(&'static str, &'static [(&'static str, SqlType)])> = schemas
            .iter()
            .flat_map(|s| s.columns.iter().copied())
            .collect();
        let tables: Vec<&'static str> = expected.iter().map(|(t, _)| *t).collect();
        let columns = store
            .with_conn(|conn| async move {
                let mut rows = conn.query("PRAGMA journal_mode = WAL", ()).await?;
                while rows.next().await?.is_some() {}
                for m in migrations {
                    if let Some((table, column)) = added_column(m)
                        && columns_of(&conn, table).await?.contains_key(column)
                    {
                        continue;
                    }
                    match conn.execute(m, ()).await {
                        Ok(_) => {}
                        // Another process added the column between the check and here.
                        Err(e)
                            if added_column(m).is_some()
                                && e.to_string().contains("duplicate column") => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                let mut found = HashMap::new();
                for table in tables {
                    found.insert(table, columns_of(&conn, table).await?);
                }
                Ok(found)
            })
            .await
            .map_err(|e| match e {
                StoreError::Sqlite(e) => open_err(Box::new(e)),
                other => other,
            })?;
        for (table, want) in expected {
            let empty = HashMap::new();
            let found = columns.get(table).unwrap_or(&empty);
            if let Some(problem) = schema_problem(want, found, SqlType::sqlite) {
                return Err(StoreError::Schema {
                    url,
                    table: table.to_owned(),
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

    pub async fn read<T: Send + 'static>(&self, f: Reading<T>) -> Result<T, StoreError> {
        self.with_conn(move |conn| async move { f(Tx::Sqlite(&conn)).await })
            .await
    }

    /// An immediate (write-locked) transaction: no other flush interleaves with it. On an
    /// error the connection is closed (see `with_conn`), which rolls it back.
    pub async fn write<T: Send + 'static>(&self, f: Writing<T>) -> Result<T, StoreError> {
        self.with_conn(move |conn| async move {
            conn.execute("BEGIN IMMEDIATE", ()).await?;
            match f(Tx::Sqlite(&conn)).await? {
                Done::Commit(t) => {
                    conn.execute("COMMIT", ()).await?;
                    Ok(t)
                }
                Done::Rollback(t) => {
                    conn.execute("ROLLBACK", ()).await?;
                    Ok(t)
                }
            }
        })
        .await
    }
}
