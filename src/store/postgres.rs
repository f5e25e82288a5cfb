//! PostgreSQL implementation of the store: the same schema and the same exactly-once flush,
//! for aggregators and `serve` spread over several machines.
//!
//! A flush is a constant number of round trips whatever the number of partitions and
//! countries: one statement moves all offsets (compare-and-set over `unnest` arrays), one
//! multi-row upsert adds all counts, inside one transaction.

use std::collections::HashMap;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::{CountryCount, FlushBatch, FlushOutcome, MIGRATIONS, StoreError};

/// A connection pool to one PostgreSQL database (and schema, via `options=-csearch_path=…`).
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
}

impl PostgresStore {
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            url: redact(url),
            reason,
        };
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| open_err(e.to_string()))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(4)
            .build()
            .map_err(|e| open_err(e.to_string()))?;
        let store = PostgresStore { pool };
        let mut client = store.client().await.map_err(|e| open_err(e.to_string()))?;
        // Several processes may start at once: serialise the migrations.
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(7450118)", &[])
            .await?;
        for m in MIGRATIONS {
            tx.execute(*m, &[]).await?;
        }
        tx.commit().await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Pool(e.to_string()))
    }

    pub async fn load_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<HashMap<i32, i64>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT \"partition\", next_offset FROM consumer_offsets WHERE consumer_group = $1 AND topic = $2",
                &[&group, &topic],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
            .collect())
    }

    pub async fn flush(&self, batch: &FlushBatch) -> Result<FlushOutcome, StoreError> {
        let (mut moved_p, mut moved_expected, mut moved_next) =
            (Vec::new(), Vec::new(), Vec::new());
        let (mut new_p, mut new_next) = (Vec::new(), Vec::new());
        for o in &batch.offsets {
            match o.expected {
                Some(e) => {
                    moved_p.push(o.partition);
                    moved_expected.push(e);
                    moved_next.push(o.next);
                }
                None => {
                    new_p.push(o.partition);
                    new_next.push(o.next);
                }
            }
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "WITH moved AS (
                    UPDATE consumer_offsets o SET next_offset = u.next
                    FROM unnest($3::int4[], $4::int8[], $5::int8[]) AS u(p, expected, next)
                    WHERE o.consumer_group = $1 AND o.topic = $2 AND o.\"partition\" = u.p
                      AND o.next_offset = u.expected
                    RETURNING o.\"partition\"
                 ), created AS (
                    INSERT INTO consumer_offsets (consumer_group, topic, \"partition\", next_offset)
                    SELECT $1, $2, u.p, u.next FROM unnest($6::int4[], $7::int8[]) AS u(p, next)
                    ON CONFLICT DO NOTHING
                    RETURNING \"partition\"
                 )
                 SELECT \"partition\" FROM moved UNION ALL SELECT \"partition\" FROM created",
                &[
                    &batch.consumer_group,
                    &batch.topic,
                    &moved_p,
                    &moved_expected,
                    &moved_next,
                    &new_p,
                    &new_next,
                ],
            )
            .await?;
        let done: std::collections::HashSet<i32> =
            rows.iter().map(|r| r.get::<_, i32>(0)).collect();
        let conflicts: Vec<i32> = batch
            .offsets
            .iter()
            .map(|o| o.partition)
            .filter(|p| !done.contains(p))
            .collect();
        if !conflicts.is_empty() {
            tx.rollback().await?;
            return Ok(FlushOutcome::Conflict(conflicts));
        }
        if !batch.increments.is_empty() {
            let codes: Vec<&str> = batch.increments.iter().map(|(c, _)| c.as_str()).collect();
            let counts: Vec<i64> = batch
                .increments
                .iter()
                .map(|(_, n)| i64::try_from(*n).unwrap_or(i64::MAX))
                .collect();
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            tx.execute(
                "INSERT INTO country_stats (country_code, visit_count, updated_at)
                 SELECT c, n, $3 FROM unnest($1::text[], $2::int8[]) AS u(c, n)
                 ON CONFLICT (country_code) DO UPDATE
                 SET visit_count = country_stats.visit_count + excluded.visit_count, updated_at = excluded.updated_at",
                &[&codes, &counts, &now],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(FlushOutcome::Committed)
    }

    pub async fn country_counts(&self) -> Result<Vec<CountryCount>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT country_code, visit_count FROM country_stats WHERE visit_count > 0
                 ORDER BY visit_count DESC, country_code",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| CountryCount {
                country_code: r.get(0),
                visits: u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
            })
            .collect())
    }
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}
