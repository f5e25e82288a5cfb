//! PostgreSQL implementation of the store: the same schema and the same exactly-once flush,
//! for aggregators and `serve` spread over several machines.
//!
//! A flush is a constant number of round trips whatever the number of partitions and
//! countries: BEGIN, one statement that moves all offsets (compare-and-set over `unnest`
//! arrays), the multi-row upserts of source watermarks and counts sent together (pipelined),
//! COMMIT. Statements are prepared once per pooled connection.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use std::collections::HashMap;
use std::sync::LazyLock;

use super::{
    AlertArg, AlertStatus, CloseRequest, CountryCount, DimensionCounts, EXPECTED_COLUMNS,
    FlushBatch, FlushOutcome, MIGRATIONS, MinutePoint, SqlType, StoreError, StoredAlert,
    StoredPositions, TopicIdentity, UniqueCount, ValueCount, alert_sql, count, dollar_params,
    flush_bucket, saturating_add, schema_problem, sql_count, stored_alert,
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

/// `SET visits = …, bytes = …, humans = …` of an upsert into `table`, each sum saturating.
fn add_amounts(table: &str) -> String {
    format!(
        "SET visits = {}, bytes = {}, humans = {}",
        saturating_add(table, "visits"),
        saturating_add(table, "bytes"),
        saturating_add(table, "humans")
    )
}

static UPSERT_DIMENSIONS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO dimension_counts (dimension, value, visits, bytes, humans)
         SELECT d, v, n, b, h FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[]) AS u(d, v, n, b, h)
         ON CONFLICT (dimension, value) DO UPDATE {}",
        add_amounts("dimension_counts")
    )
});

static UPSERT_DIMENSION_HOURS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO dimension_hours (dimension, hour, value, visits, bytes, humans)
         SELECT d, h, v, n, b, m FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $5::int8[], $6::int8[]) AS u(d, h, v, n, b, m)
         ON CONFLICT (dimension, hour, value) DO UPDATE {}",
        add_amounts("dimension_hours")
    )
});

/// `$1` NULL deletes nothing.
const PRUNE_HOURS: &str = "DELETE FROM dimension_hours WHERE hour < $1::int8";

static UPSERT_MINUTES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO minute_counts (minute, country_code, visits, bytes, humans)
         SELECT m, c, n, b, h FROM unnest($1::int8[], $2::text[], $3::int8[], $4::int8[], $5::int8[]) AS u(m, c, n, b, h)
         ON CONFLICT (minute, country_code) DO UPDATE {}",
        add_amounts("minute_counts")
    )
});

const UPSERT_HISTOGRAMS: &str = "INSERT INTO histogram_buckets (metric, scope, bucket, visits)
     SELECT m, s, b, n FROM unnest($1::text[], $2::text[], $3::int4[], $4::int8[]) AS u(m, s, b, n)
     ON CONFLICT (metric, scope, bucket) DO UPDATE
     SET visits = histogram_buckets.visits + excluded.visits";

/// Serializes the read-merge-write of unique-visitor sketches between aggregators (two of
/// them may both add a day's first `*` sketch; without the lock the second would overwrite
/// the first's registers). Held until the transaction ends.
const LOCK_UNIQUES: &str = "SELECT pg_advisory_xact_lock(7061676576)";

const READ_UNIQUES: &str = "SELECT u.day, u.country_code, u.registers FROM unique_visitors u
     JOIN unnest($1::text[], $2::text[]) AS k(d, c) ON u.day = k.d AND u.country_code = k.c";

const UPSERT_UNIQUES: &str = "INSERT INTO unique_visitors (day, country_code, registers, estimate)
     SELECT d, c, r, e FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int8[]) AS u(d, c, r, e)
     ON CONFLICT (day, country_code) DO UPDATE
     SET registers = excluded.registers, estimate = excluded.estimate";

const UPSERT_FLUSH_STATS: &str =
    "INSERT INTO flush_stats (consumer_group, le_ms, flushes, total_ms)
     VALUES ($1, $2, 1, $3)
     ON CONFLICT (consumer_group, le_ms) DO UPDATE
     SET flushes = flush_stats.flushes + 1, total_ms = flush_stats.total_ms + excluded.total_ms";

/// `$1` NULL deletes nothing.
const PRUNE_MINUTES: &str = "DELETE FROM minute_counts WHERE minute < $1::int8";

/// A connection pool to one PostgreSQL database (and schema, via `options=-csearch_path=…`).
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
}

impl PostgresStore {
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
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
                    url: crate::secrets::redact(url),
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
        for r in client
            .query(&dollar_params(alert_sql::CLOCKS), &[&group, &topic])
            .await?
        {
            if let Some(clock) = r.try_get::<_, Option<i64>>(1)? {
                out.event_clocks.insert(r.try_get::<_, i32>(0)?, clock);
            }
        }
        Ok(out)
    }

    pub async fn close_windows(&self, req: &CloseRequest) -> Result<usize, StoreError> {
        use crate::alert::window::{PartitionClock, WindowRow, WindowTotals};
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let group = req.group.as_str();
        // Locked: a flush of the group waits until these windows are closed (or not).
        let (closed_through, first) = lock_alert_state(&tx, group).await?;
        let mut clocks = Vec::new();
        for r in tx
            .query(&dollar_params(alert_sql::CLOCKS), &[&group, &req.topic])
            .await?
        {
            clocks.push(PartitionClock {
                partition: r.try_get(0)?,
                clock: r.try_get(1)?,
                caught_up_since: r.try_get(2)?,
            });
        }
        let Some(w) = req.watermark(&clocks, closed_through) else {
            tx.rollback().await?;
            return Ok(0);
        };
        let mut found = Vec::new();
        for r in tx
            .query(
                &dollar_params(alert_sql::WINDOWS),
                &[&group, &closed_through.saturating_sub(req.history()), &w],
            )
            .await?
        {
            found.push(WindowRow {
                window: r.try_get(0)?,
                start: r.try_get(1)?,
                subject: r.try_get(2)?,
                totals: WindowTotals {
                    requests: count(r.try_get(3)?),
                    errors: count(r.try_get(4)?),
                },
            });
        }
        let alerts = req.alerts(&found, closed_through, w, first);
        let insert = tx
            .prepare_cached(&dollar_params(alert_sql::INSERT_ALERT))
            .await?;
        for a in &alerts {
            let start = crate::alert::window::seconds_of(&a.window_start).unwrap_or(0);
            let payload = serde_json::to_string(a)
                .map_err(|e| StoreError::Corrupt(format!("alert payload: {e}")))?;
            tx.execute(&insert, &[&group, &a.id, &start, &payload, &req.now_ms])
                .await?;
        }
        tx.execute(&dollar_params(alert_sql::CLOSE), &[&group, &w])
            .await?;
        tx.execute(
            &dollar_params(alert_sql::PRUNE),
            &[&group, &w.saturating_sub(req.history())],
        )
        .await?;
        tx.commit().await?;
        Ok(alerts.len())
    }

    pub async fn alerts(
        &self,
        sql: &'static str,
        group: &str,
        pending_only: bool,
        limit: u32,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &dollar_params(sql),
                &[&group, &i64::from(pending_only), &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| stored_alert(r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))
            .collect()
    }

    pub(super) async fn execute_alert(
        &self,
        sql: &str,
        group: &str,
        id: &str,
        third: AlertArg,
        fourth: Option<i64>,
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let sql = dollar_params(sql);
        let changed = match (&third, &fourth) {
            (AlertArg::Int(v), Some(f)) => client.execute(&sql, &[&group, &id, v, f]).await?,
            (AlertArg::Int(v), None) => client.execute(&sql, &[&group, &id, v]).await?,
            (AlertArg::Text(t), Some(f)) => client.execute(&sql, &[&group, &id, t, f]).await?,
            (AlertArg::Text(t), None) => client.execute(&sql, &[&group, &id, t]).await?,
        };
        Ok(changed)
    }

    pub async fn alert_groups(&self) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client.query(alert_sql::GROUPS, &[]).await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    pub async fn alert_status(&self, group: &str) -> Result<AlertStatus, StoreError> {
        let client = self.client().await?;
        let mut out = AlertStatus::default();
        if let Some(r) = client
            .query_opt(&dollar_params(alert_sql::STATUS), &[&group])
            .await?
        {
            out.closed_through = Some(r.try_get::<_, i64>(0)?).filter(|&c| c != i64::MIN);
            out.late_events = count(r.try_get(1)?);
        }
        let r = client
            .query_one(&dollar_params(alert_sql::COUNTS), &[&group])
            .await?;
        out.pending = count(r.try_get(0)?);
        out.delivered = count(r.try_get(1)?).saturating_sub(out.pending);
        Ok(out)
    }

    pub async fn flush(&self, batch: &FlushBatch) -> Result<FlushOutcome, StoreError> {
        let started = std::time::Instant::now();
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
        let (reset_stmt, wm_stmt, ids_stmt, count_stmt, dim_stmt, min_stmt, prune_stmt, hist_stmt) =
            futures::try_join!(
                tx.prepare_cached(RESET_WATERMARKS),
                tx.prepare_cached(UPSERT_WATERMARKS),
                tx.prepare_cached(UPSERT_TOPIC_IDS),
                tx.prepare_cached(UPSERT_COUNTS),
                tx.prepare_cached(&UPSERT_DIMENSIONS),
                tx.prepare_cached(&UPSERT_MINUTES),
                tx.prepare_cached(PRUNE_MINUTES),
                tx.prepare_cached(UPSERT_HISTOGRAMS)
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
            .map(|(_, n)| sql_count(*n))
            .collect();
        let dims = &batch.dimensions;
        let dim_names: Vec<&str> = dims.iter().map(|d| d.dimension.as_str()).collect();
        let dim_values: Vec<&str> = dims.iter().map(|d| d.value.as_str()).collect();
        let dim_visits: Vec<i64> = dims.iter().map(|d| sql_count(d.amount.visits)).collect();
        let dim_bytes: Vec<i64> = dims.iter().map(|d| sql_count(d.amount.bytes)).collect();
        let dim_humans: Vec<i64> = dims.iter().map(|d| sql_count(d.amount.humans)).collect();
        let mins = &batch.minutes;
        let min_starts: Vec<i64> = mins.iter().map(|m| m.minute).collect();
        let min_countries: Vec<&str> = mins.iter().map(|m| m.country_code.as_str()).collect();
        let min_visits: Vec<i64> = mins.iter().map(|m| sql_count(m.amount.visits)).collect();
        let min_bytes: Vec<i64> = mins.iter().map(|m| sql_count(m.amount.bytes)).collect();
        let min_humans: Vec<i64> = mins.iter().map(|m| sql_count(m.amount.humans)).collect();
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
        let dim_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
            &dim_names,
            &dim_values,
            &dim_visits,
            &dim_bytes,
            &dim_humans,
        ];
        let min_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
            &min_starts,
            &min_countries,
            &min_visits,
            &min_bytes,
            &min_humans,
        ];
        let prune_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] =
            [&batch.prune_minutes_before];
        let hs = &batch.histograms;
        let hist_metrics: Vec<&str> = hs.iter().map(|h| h.metric.as_str()).collect();
        let hist_scopes: Vec<&str> = hs.iter().map(|h| h.scope.as_str()).collect();
        let hist_buckets: Vec<i32> = hs.iter().map(|h| h.bucket).collect();
        let hist_counts: Vec<i64> = hs.iter().map(|h| sql_count(h.count)).collect();
        let hist_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&hist_metrics, &hist_scopes, &hist_buckets, &hist_counts];
        futures::try_join!(
            tx.execute(&reset_stmt, &reset_params),
            tx.execute(&wm_stmt, &wm_params),
            tx.execute(&ids_stmt, &ids_params),
            tx.execute(&count_stmt, &count_params),
            tx.execute(&dim_stmt, &dim_params),
            tx.execute(&min_stmt, &min_params),
            tx.execute(&prune_stmt, &prune_params),
            tx.execute(&hist_stmt, &hist_params),
        )?;
        if !batch.dimension_hours.is_empty() || batch.prune_hours_before.is_some() {
            let hs = &batch.dimension_hours;
            let names: Vec<&str> = hs.iter().map(|d| d.dimension.as_str()).collect();
            let hours: Vec<i64> = hs.iter().map(|d| d.hour).collect();
            let values: Vec<&str> = hs.iter().map(|d| d.value.as_str()).collect();
            let visits: Vec<i64> = hs.iter().map(|d| sql_count(d.amount.visits)).collect();
            let bytes: Vec<i64> = hs.iter().map(|d| sql_count(d.amount.bytes)).collect();
            let humans: Vec<i64> = hs.iter().map(|d| sql_count(d.amount.humans)).collect();
            let (upsert, prune) = futures::try_join!(
                tx.prepare_cached(&UPSERT_DIMENSION_HOURS),
                tx.prepare_cached(PRUNE_HOURS)
            )?;
            let upsert_params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
                [&names, &hours, &values, &visits, &bytes, &humans];
            let prune_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] =
                [&batch.prune_hours_before];
            futures::try_join!(
                tx.execute(&upsert, &upsert_params),
                tx.execute(&prune, &prune_params),
            )?;
        }
        if let Some(keep) = batch.keep_values {
            for (d, hour) in super::compaction_targets(batch) {
                compact(&tx, d, hour, keep).await?;
            }
        }
        if !batch.uniques.is_empty() {
            merge_uniques(&tx, &batch.uniques).await?;
        }
        if let Some(error) = &batch.data_error {
            let record = tx
                .prepare_cached(&dollar_params(super::RECORD_DATA_ERROR))
                .await?;
            tx.execute(&record, &[&batch.consumer_group, error]).await?;
        }
        if batch.lost > 0 {
            let lost = i64::try_from(batch.lost).unwrap_or(i64::MAX);
            let record = tx
                .prepare_cached(&dollar_params(super::RECORD_LOST))
                .await?;
            tx.execute(&record, &[&batch.consumer_group, &lost]).await?;
        }
        if let Some(alert) = &batch.alert {
            flush_alert(&tx, &batch.consumer_group, &batch.topic, alert).await?;
        }
        let (le, ms) = flush_bucket(started.elapsed());
        let stats = tx.prepare_cached(UPSERT_FLUSH_STATS).await?;
        tx.execute(&stats, &[&batch.consumer_group, &le, &ms])
            .await?;
        tx.commit().await?;
        Ok(FlushOutcome::Committed)
    }

    pub async fn dimension_counts(
        &self,
        dimension: &str,
        since: Option<i64>,
        limit: u32,
    ) -> Result<DimensionCounts, StoreError> {
        let client = self.client().await?;
        let (top, totals) = super::dimension_queries(since.is_some(), limit, '$');
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&dimension];
        if let Some(since) = &since {
            params.push(since);
        }
        let mut out = DimensionCounts::default();
        for r in &client.query(&top, &params).await? {
            out.values.push(ValueCount {
                value: r.try_get(0)?,
                visits: count(r.try_get(1)?),
                bytes: count(r.try_get(2)?),
                humans: count(r.try_get(3)?),
            });
        }
        let row = client.query_one(&totals, &params).await?;
        out.total_visits = count(row.try_get(0)?);
        out.total_bytes = count(row.try_get(1)?);
        out.total_humans = count(row.try_get(2)?);
        out.distinct = count(row.try_get(3)?);
        Ok(out)
    }

    pub async fn minutes(
        &self,
        since: i64,
        country: Option<&str>,
    ) -> Result<Vec<MinutePoint>, StoreError> {
        let client = self.client().await?;
        let rows = match country {
            Some(c) => {
                client
                    .query(
                        "SELECT minute, visits, bytes, humans FROM minute_counts
                         WHERE minute >= $1 AND country_code = $2 ORDER BY minute",
                        &[&since, &c],
                    )
                    .await?
            }
            None => client.query(&super::minutes_query('$'), &[&since]).await?,
        };
        rows.iter()
            .map(|r| {
                Ok(MinutePoint {
                    minute: r.try_get(0)?,
                    visits: count(r.try_get(1)?),
                    bytes: count(r.try_get(2)?),
                    humans: count(r.try_get(3)?),
                })
            })
            .collect()
    }

    pub async fn unique_days(
        &self,
        country: &str,
        days: u32,
    ) -> Result<Vec<UniqueCount>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT day, country_code, estimate FROM unique_visitors
                 WHERE country_code = $1 ORDER BY day DESC LIMIT $2",
                &[&country, &i64::from(days)],
            )
            .await?;
        unique_rows(&rows)
    }

    pub async fn unique_countries(&self, day: &str) -> Result<Vec<UniqueCount>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT day, country_code, estimate FROM unique_visitors
                 WHERE day = $1 AND country_code <> '*' ORDER BY estimate DESC, country_code",
                &[&day],
            )
            .await?;
        unique_rows(&rows)
    }

    pub async fn histogram(
        &self,
        metric: &str,
        scope: &str,
    ) -> Result<Vec<(i32, u64)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT bucket, visits FROM histogram_buckets
                 WHERE metric = $1 AND scope = $2 ORDER BY bucket",
                &[&metric, &scope],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, count(r.try_get(1)?))))
            .collect()
    }

    pub async fn last_flush(&self) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT MAX(updated_at) FROM country_stats", &[])
            .await?;
        Ok(row.try_get(0)?)
    }

    pub async fn flush_stats(&self) -> Result<Vec<(String, i64, u64, u64)>, StoreError> {
        let client = self.client().await?;
        let rows = client.query(super::FLUSH_STATS, &[]).await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    count(r.try_get(2)?),
                    count(r.try_get(3)?),
                ))
            })
            .collect()
    }

    pub async fn flush_version(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT CAST(COALESCE(SUM(next_offset), 0) AS BIGINT) FROM consumer_offsets",
                &[],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    pub async fn latest_minute(&self) -> Result<Option<i64>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT MAX(minute) FROM minute_counts", &[])
            .await?;
        Ok(row.try_get(0)?)
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

fn unique_rows(rows: &[tokio_postgres::Row]) -> Result<Vec<UniqueCount>, StoreError> {
    rows.iter()
        .map(|r| {
            Ok(UniqueCount {
                day: r.try_get(0)?,
                country_code: r.try_get(1)?,
                visitors: count(r.try_get(2)?),
            })
        })
        .collect()
}

/// Merges a flush's unique-visitor sketches into the stored ones (under [`LOCK_UNIQUES`]).
async fn merge_uniques(
    tx: &deadpool_postgres::Transaction<'_>,
    uniques: &[super::UniqueSketch],
) -> Result<(), StoreError> {
    tx.execute(LOCK_UNIQUES, &[]).await?;
    let days: Vec<&str> = uniques.iter().map(|u| u.day.as_str()).collect();
    let countries: Vec<&str> = uniques.iter().map(|u| u.country_code.as_str()).collect();
    let read = tx.prepare_cached(READ_UNIQUES).await?;
    let mut stored: HashMap<(String, String), Vec<u8>> = HashMap::new();
    for r in tx.query(&read, &[&days, &countries]).await? {
        stored.insert((r.try_get(0)?, r.try_get(1)?), r.try_get(2)?);
    }
    let mut registers = Vec::with_capacity(uniques.len());
    let mut estimates = Vec::with_capacity(uniques.len());
    for u in uniques {
        let mut sketch = u.sketch.clone();
        if let Some(bytes) = stored.get(&(u.day.clone(), u.country_code.clone())) {
            super::merge_stored(&mut sketch, bytes, u);
        }
        estimates.push(sketch.estimate().round() as i64);
        registers.push(sketch.to_bytes());
    }
    let upsert = tx.prepare_cached(UPSERT_UNIQUES).await?;
    tx.execute(&upsert, &[&days, &countries, &registers, &estimates])
        .await?;
    Ok(())
}

/// The URL without its password, for error messages.
/// Folds the values of `dimension` (in `hour`, or all time) beyond the `keep` with the most
/// visits into `(other)`.
async fn compact(
    tx: &deadpool_postgres::Transaction<'_>,
    dimension: &str,
    hour: Option<i64>,
    keep: u32,
) -> Result<(), StoreError> {
    let (select, delete) = super::compaction_queries(hour.is_some());
    let keep = i64::from(keep);
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&dimension, &keep];
    if let Some(h) = &hour {
        params.push(h);
    }
    let select = tx.prepare_cached(&dollar_params(&select)).await?;
    let mut folded = super::Amount::default();
    for r in tx.query(&select, &params).await? {
        folded += super::Amount {
            visits: count(r.try_get(1)?),
            bytes: count(r.try_get(2)?),
            humans: count(r.try_get(3)?),
        };
    }
    if folded.is_zero() {
        return Ok(());
    }
    let delete = tx.prepare_cached(&dollar_params(&delete)).await?;
    tx.execute(&delete, &params).await?;
    let (visits, bytes, humans) = (
        vec![sql_count(folded.visits)],
        vec![sql_count(folded.bytes)],
        vec![sql_count(folded.humans)],
    );
    let (names, values) = (vec![dimension], vec![super::OTHER]);
    match hour {
        None => {
            let upsert = tx.prepare_cached(&UPSERT_DIMENSIONS).await?;
            tx.execute(&upsert, &[&names, &values, &visits, &bytes, &humans])
                .await?;
        }
        Some(h) => {
            let upsert = tx.prepare_cached(&UPSERT_DIMENSION_HOURS).await?;
            tx.execute(
                &upsert,
                &[&names, &vec![h], &values, &visits, &bytes, &humans],
            )
            .await?;
        }
    }
    Ok(())
}

/// An alerting group's part of a flush: window counts (those of closed windows counted as
/// late), the partitions' clocks. The group's state row is locked first, so a concurrent
/// close waits for this flush or this flush for it.
async fn flush_alert(
    tx: &deadpool_postgres::Transaction<'_>,
    group: &str,
    topic: &str,
    alert: &super::AlertFlush,
) -> Result<(), StoreError> {
    let (closed_through, _) = lock_alert_state(tx, group).await?;
    let late = alert.late + alert.late_rows(closed_through);
    let add = tx
        .prepare_cached(&dollar_params(alert_sql::ADD_WINDOW))
        .await?;
    for w in &alert.windows {
        if w.start.saturating_add(w.window) <= closed_through {
            continue;
        }
        let (requests, errors) = (sql_count(w.totals.requests), sql_count(w.totals.errors));
        tx.execute(
            &add,
            &[&group, &w.window, &w.start, &w.subject, &requests, &errors],
        )
        .await?;
    }
    tx.execute(
        &dollar_params(alert_sql::ADD_LATE),
        &[&group, &sql_count(late), &alert.first_event],
    )
    .await?;
    let set = tx
        .prepare_cached(&dollar_params(alert_sql::SET_CLOCK))
        .await?;
    for c in &alert.clocks {
        tx.execute(
            &set,
            &[&group, &topic, &c.partition, &c.clock, &c.caught_up_since],
        )
        .await?;
    }
    Ok(())
}

/// The group's `closed_through` and first event time, its state row created if missing and
/// locked until the transaction ends (flushes and closes of one group take turns).
async fn lock_alert_state(
    tx: &deadpool_postgres::Transaction<'_>,
    group: &str,
) -> Result<(i64, Option<i64>), StoreError> {
    tx.execute(
        &dollar_params(alert_sql::ENSURE_STATE),
        &[&group, &i64::MIN],
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT closed_through, first_event_time FROM alert_state
             WHERE consumer_group = $1 FOR UPDATE",
            &[&group],
        )
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}
