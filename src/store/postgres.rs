//! PostgreSQL implementation of the store: the same schema and the same exactly-once flush,
//! for aggregators and `serve` spread over several machines.
//!
//! A flush is a constant number of round trips whatever the number of partitions and
//! countries: BEGIN, one statement that moves all offsets (compare-and-set over `unnest`
//! arrays), the multi-row upserts of source watermarks and counts sent together (pipelined),
//! COMMIT. Statements are prepared once per pooled connection.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use std::collections::HashMap;

use super::{
    CountryCount, EXPECTED_COLUMNS, FlushBatch, FlushOutcome, MIGRATIONS, SqlType, StoreError,
    StoredPositions, TopicIdentity, schema_problem,
};

/// Offsets compare-and-set: returns the partitions whose offset moved (or was created).
const CAS_OFFSETS: &str = "WITH moved AS (
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
                 SELECT \"partition\" FROM moved UNION ALL SELECT \"partition\" FROM created";

const UPSERT_WATERMARKS: &str = "INSERT INTO source_watermarks (consumer_group, topic, \"partition\", source_partition, source_offset)
     SELECT $1, $2, p, s, o FROM unnest($3::int4[], $4::int4[], $5::int8[]) AS u(p, s, o)
     ON CONFLICT (consumer_group, topic, \"partition\", source_partition)
     DO UPDATE SET source_offset = excluded.source_offset";

const RESET_WATERMARKS: &str = "DELETE FROM source_watermarks
     WHERE consumer_group = $1 AND topic = $2 AND \"partition\" = ANY($3::int4[])";

const UPSERT_TOPIC_IDS: &str = "INSERT INTO topic_ids (consumer_group, topic, \"partition\", topic_id, source_topic_id)
     SELECT $1, $2, p, $4, $5 FROM unnest($3::int4[]) AS u(p)
     ON CONFLICT (consumer_group, topic, \"partition\")
     DO UPDATE SET topic_id = COALESCE(excluded.topic_id, topic_ids.topic_id),
                           source_topic_id = COALESCE(excluded.source_topic_id, topic_ids.source_topic_id)";

const UPSERT_COUNTS: &str = "INSERT INTO country_stats (country_code, visit_count, updated_at)
     SELECT c, n, $3 FROM unnest($1::text[], $2::int8[]) AS u(c, n)
     ON CONFLICT (country_code) DO UPDATE
     SET visit_count = country_stats.visit_count + excluded.visit_count, updated_at = excluded.updated_at";

/// A connection pool to one PostgreSQL database (and schema, via `options=-csearch_path=…`).
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
}

impl PostgresStore {
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let open_err = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
            url: redact(url),
            source,
        };
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| open_err(Box::new(e)))?;
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
        for m in MIGRATIONS {
            tx.execute(*m, &[]).await?;
        }
        // A table of ours made by something else (same name, other columns) is a clear error
        // now rather than a failed flush later.
        let mut tables: HashMap<String, HashMap<String, String>> = HashMap::new();
        for row in tx
            .query(
                "SELECT table_name::text, column_name::text, data_type::text
                 FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = ANY($1)",
                &[&EXPECTED_COLUMNS.iter().map(|(t, _)| *t).collect::<Vec<_>>()],
            )
            .await?
        {
            tables
                .entry(row.try_get(0)?)
                .or_default()
                .insert(row.try_get(1)?, row.try_get(2)?);
        }
        tx.commit().await?;
        for (table, _) in EXPECTED_COLUMNS {
            let found = tables.remove(*table).unwrap_or_default();
            if let Some(problem) = schema_problem(table, &found, SqlType::postgres) {
                return Err(StoreError::Schema {
                    url: redact(url),
                    table: (*table).to_owned(),
                    problem,
                });
            }
        }
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(StoreError::Pool)
    }

    pub async fn load_positions(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<StoredPositions, StoreError> {
        let client = self.client().await?;
        let mut out = StoredPositions::default();
        for r in client
            .query(
                "SELECT \"partition\", next_offset FROM consumer_offsets WHERE consumer_group = $1 AND topic = $2",
                &[&group, &topic],
            )
            .await?
        {
            out.offsets.insert(r.try_get::<_, i32>(0)?, r.try_get::<_, i64>(1)?);
        }
        for r in client
            .query(
                "SELECT \"partition\", source_partition, source_offset FROM source_watermarks
                 WHERE consumer_group = $1 AND topic = $2",
                &[&group, &topic],
            )
            .await?
        {
            out.watermarks
                .entry(r.try_get::<_, i32>(0)?)
                .or_default()
                .insert(r.try_get::<_, i32>(1)?, r.try_get::<_, i64>(2)?);
        }
        for r in client
            .query(
                "SELECT \"partition\", topic_id, source_topic_id FROM topic_ids
                 WHERE consumer_group = $1 AND topic = $2",
                &[&group, &topic],
            )
            .await?
        {
            out.identities.insert(
                r.try_get::<_, i32>(0)?,
                TopicIdentity {
                    topic_id: r.try_get(1)?,
                    source_topic_id: r.try_get(2)?,
                },
            );
        }
        Ok(out)
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
        let cas = tx.prepare_cached(CAS_OFFSETS).await?;
        let rows = tx
            .query(
                &cas,
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
        let done = rows
            .iter()
            .map(|r| r.try_get::<_, i32>(0))
            .collect::<Result<std::collections::HashSet<i32>, _>>()?;
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
        // The statements go out together (tokio-postgres pipelines concurrent queries on one
        // connection, in order, so the watermark reset runs before the upsert); statements are
        // prepared once per pooled connection.
        let (reset_stmt, wm_stmt, ids_stmt, count_stmt) = futures::try_join!(
            tx.prepare_cached(RESET_WATERMARKS),
            tx.prepare_cached(UPSERT_WATERMARKS),
            tx.prepare_cached(UPSERT_TOPIC_IDS),
            tx.prepare_cached(UPSERT_COUNTS)
        )?;
        let all_partitions: Vec<i32> = batch.offsets.iter().map(|o| o.partition).collect();
        let parts: Vec<i32> = batch.watermarks.iter().map(|w| w.partition).collect();
        let sources: Vec<i32> = batch
            .watermarks
            .iter()
            .map(|w| w.source_partition)
            .collect();
        let offsets: Vec<i64> = batch.watermarks.iter().map(|w| w.source_offset).collect();
        let codes: Vec<&str> = batch.increments.iter().map(|(c, _)| c.as_str()).collect();
        let counts: Vec<i64> = batch
            .increments
            .iter()
            .map(|(_, n)| i64::try_from(*n).unwrap_or(i64::MAX))
            .collect();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let wm_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
            &batch.consumer_group,
            &batch.topic,
            &parts,
            &sources,
            &offsets,
        ];
        let count_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&codes, &counts, &now];
        let reset_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&batch.consumer_group, &batch.topic, &batch.reset_watermarks];
        let ids_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
            &batch.consumer_group,
            &batch.topic,
            &all_partitions,
            &batch.identity.topic_id,
            &batch.identity.source_topic_id,
        ];
        futures::try_join!(
            tx.execute(&reset_stmt, &reset_params),
            tx.execute(&wm_stmt, &wm_params),
            tx.execute(&ids_stmt, &ids_params),
            tx.execute(&count_stmt, &count_params),
        )?;
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
        rows.iter()
            .map(|r| {
                Ok(CountryCount {
                    country_code: r.try_get(0)?,
                    visits: u64::try_from(r.try_get::<_, i64>(1)?).unwrap_or(0),
                })
            })
            .collect()
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
