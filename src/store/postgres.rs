//! PostgreSQL: the connection pool (with TLS) and migrations; every statement is in the
//! shared code ([`super::sql`]), for groups and `serve` spread over several machines.
//!
//! Multi-row writes are one `unnest` statement per table whatever the number of rows, and
//! statements are prepared once per pooled connection.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use std::collections::HashMap;

use super::sql::Tx;
use super::{Done, Reading, Schema, SqlType, StoreError, Writing, added_column, schema_problem};

/// A connection pool to one PostgreSQL database (and schema, via `options=-csearch_path=…`).
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
}

impl PostgresStore {
    pub async fn open(url: &str, schemas: &[&Schema]) -> Result<PostgresStore, StoreError> {
        let open_err = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
            url: crate::secrets::redact(url),
            source,
        };
        let (driver_url, check, root) =
            super::tls::split_url(url).map_err(|e| open_err(e.into()))?;
        let config: tokio_postgres::Config = driver_url
            .parse()
            .map_err(|e: tokio_postgres::Error| open_err(Box::new(e)))?;
        let tls = super::tls::connector(check, root.as_ref()).map_err(|e| open_err(e.into()))?;
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(4)
            .build()
            .map_err(|e| open_err(Box::new(e)))?;
        let store = PostgresStore { pool };
        let mut client = store.client().await.map_err(|e| match e {
            // deadpool's "Error occurred while creating a new object" adds nothing to the
            // driver's own account (connection refused, no such database, …).
            StoreError::Pool(deadpool_postgres::PoolError::Backend(e)) => open_err(Box::new(e)),
            other => open_err(Box::new(other)),
        })?;
        // Several processes may start at once: serialise the migrations.
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(7450118)", &[])
            .await?;
        let columns_of = "SELECT table_name::text, column_name::text, data_type::text
             FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = ANY($1)";
        for m in schemas.iter().flat_map(|s| s.migrations.iter()) {
            if let Some((table, column)) = added_column(m) {
                let found = tx.query(columns_of, &[&vec![table]]).await?;
                if found
                    .iter()
                    .any(|r| r.try_get::<_, String>(1).ok().as_deref() == Some(column))
                {
                    continue;
                }
            }
            tx.execute(*m, &[]).await?;
        }
        // A table of ours made by something else (same name, other columns) is a clear error
        // now rather than a failed flush later.
        let expected: Vec<(&str, &[(&str, SqlType)])> = schemas
            .iter()
            .flat_map(|s| s.columns.iter().copied())
            .collect();
        let names: Vec<&str> = expected.iter().map(|(t, _)| *t).collect();
        let mut tables: HashMap<String, HashMap<String, String>> = HashMap::new();
        for row in tx.query(columns_of, &[&names]).await? {
            tables
                .entry(row.try_get(0)?)
                .or_default()
                .insert(row.try_get(1)?, row.try_get(2)?);
        }
        tx.commit().await?;
        for (table, want) in expected {
            let found = tables.remove(table).unwrap_or_default();
            if let Some(problem) = schema_problem(want, &found, SqlType::postgres) {
                return Err(StoreError::Schema {
                    url: crate::secrets::redact(url),
                    table: table.to_owned(),
                    problem,
                });
            }
        }
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(StoreError::Pool)
    }

    /// Whether this store's connections are encrypted (for tests of `sslmode`).
    pub async fn uses_tls(&self) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT COALESCE((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
                &[],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    pub async fn read<T: Send + 'static>(&self, f: Reading<T>) -> Result<T, StoreError> {
        let client = self.client().await?;
        f(Tx::PgClient(&client)).await
    }

    /// A transaction that rolls back when dropped unfinished (a timeout, a shutdown).
    pub async fn write<T: Send + 'static>(&self, f: Writing<T>) -> Result<T, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        match f(Tx::Pg(&tx)).await? {
            Done::Commit(t) => {
                tx.commit().await?;
                Ok(t)
            }
            Done::Rollback(t) => {
                tx.rollback().await?;
                Ok(t)
            }
        }
    }
}
