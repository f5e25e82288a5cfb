//! The alerting groups' tables: requests and errors per window (added by each flush), the
//! group's state (how far its windows are closed) and the alerts outbox. Their schema, what a
//! flush adds ([`AlertFlush`], inside the shared flush transaction, `crate::store`), closing
//! windows ([`close_in`]) and the outbox's operations. SQL is written once for both
//! databases ([`crate::store::sql`]).

use futures::future::BoxFuture;

use super::rules::Rule;
use super::window::{self, Alert, WindowRow, WindowTotals};
use crate::store::sql::{Merge, Tx, Ty, Upsert, args, lock};
use crate::store::{Done, Results, Schema, SqlType, Store, StoreError, reading, writing};

pub const SCHEMA: Schema = Schema {
    migrations: &[
        // Requests and server errors per window and subject (a country or `*`), added by each
        // flush like the counts.
        "CREATE TABLE IF NOT EXISTS alert_windows (
            consumer_group TEXT NOT NULL,
            window_secs BIGINT NOT NULL,
            window_start BIGINT NOT NULL,
            subject TEXT NOT NULL,
            requests BIGINT NOT NULL,
            errors BIGINT NOT NULL,
            PRIMARY KEY (consumer_group, window_secs, window_start, subject))",
        // Per alerting group: windows ending at or before `closed_through` are closed (their
        // alerts written); events that came too late; the earliest event time counted.
        "CREATE TABLE IF NOT EXISTS alert_state (
            consumer_group TEXT PRIMARY KEY,
            closed_through BIGINT NOT NULL,
            late_events BIGINT NOT NULL,
            first_event_time BIGINT)",
        // The alerts of closed windows (an outbox): written when their window closes,
        // delivered from here in order, marked when delivered; an id is never written twice.
        "CREATE TABLE IF NOT EXISTS alerts (
            consumer_group TEXT NOT NULL,
            id TEXT NOT NULL,
            window_start BIGINT NOT NULL,
            payload TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            claimed_until BIGINT,
            delivered_at BIGINT,
            attempts BIGINT NOT NULL,
            last_error TEXT,
            PRIMARY KEY (consumer_group, id))",
    ],
    columns: &[
        (
            "alert_windows",
            &[
                ("consumer_group", SqlType::Text),
                ("window_secs", SqlType::BigInt),
                ("window_start", SqlType::BigInt),
                ("subject", SqlType::Text),
                ("requests", SqlType::BigInt),
                ("errors", SqlType::BigInt),
            ],
        ),
        (
            "alert_state",
            &[
                ("consumer_group", SqlType::Text),
                ("closed_through", SqlType::BigInt),
                ("late_events", SqlType::BigInt),
                ("first_event_time", SqlType::BigInt),
            ],
        ),
        (
            "alerts",
            &[
                ("consumer_group", SqlType::Text),
                ("id", SqlType::Text),
                ("window_start", SqlType::BigInt),
                ("payload", SqlType::Text),
                ("created_at", SqlType::BigInt),
                ("claimed_until", SqlType::BigInt),
                ("delivered_at", SqlType::BigInt),
                ("attempts", SqlType::BigInt),
                ("last_error", SqlType::Text),
            ],
        ),
    ],
};

const WINDOWS: Upsert = Upsert {
    table: "alert_windows",
    keys: &[
        ("consumer_group", Ty::Text),
        ("window_secs", Ty::Int8),
        ("window_start", Ty::Int8),
        ("subject", Ty::Text),
    ],
    values: &[
        ("requests", Ty::Int8, Merge::Add),
        ("errors", Ty::Int8, Merge::Add),
    ],
};

const ADD_LATE: &str = "UPDATE alert_state SET late_events = late_events + ?2,
    first_event_time = CASE WHEN CAST(?3 AS BIGINT) IS NULL THEN first_event_time
        WHEN first_event_time IS NULL OR first_event_time > CAST(?3 AS BIGINT) THEN CAST(?3 AS BIGINT)
        ELSE first_event_time END
    WHERE consumer_group = ?1";
const LIST: &str = "SELECT payload, attempts, delivered_at IS NOT NULL, delivered_at FROM alerts
    WHERE consumer_group = ?1 AND (delivered_at IS NULL OR CAST(?2 AS BIGINT) = 0)
    ORDER BY window_start, id LIMIT CAST(?3 AS BIGINT)";
const LIST_RECENT: &str =
    "SELECT payload, attempts, delivered_at IS NOT NULL, delivered_at FROM alerts
    WHERE consumer_group = ?1 AND (delivered_at IS NULL OR CAST(?2 AS BIGINT) = 0)
    ORDER BY window_start DESC, id LIMIT CAST(?3 AS BIGINT)";

/// What an alerting group's flush writes besides its positions (and clocks, which the
/// shared flush writes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertFlush {
    /// Window counts to add (those of windows already closed count as late instead).
    pub windows: Vec<WindowRow>,
    /// Events the members found too late for their window.
    pub late: u64,
    /// The earliest event time in this flush.
    pub first_event: Option<i64>,
}

impl AlertFlush {
    /// Requests in `windows` of windows already closed at `closed_through`, each event once:
    /// only rows of the shortest window length count (the shortest window holding an event
    /// ends first, so an event late for any length is late for it).
    fn late_rows(&self, closed_through: i64) -> u64 {
        let shortest = self.windows.iter().map(|w| w.window).min();
        self.windows
            .iter()
            .filter(|w| Some(w.window) == shortest && w.subject == window::ALL)
            .filter(|w| w.start.saturating_add(w.window) <= closed_through)
            .map(|w| w.totals.requests)
            .sum()
    }

    async fn write_in(&self, tx: &Tx<'_>, group: &str) -> Result<(), StoreError> {
        let (closed_through, _) = lock_state(tx, group).await?;
        let late = self.late + self.late_rows(closed_through);
        tx.upsert(
            &WINDOWS,
            self.windows
                .iter()
                .filter(|w| w.start.saturating_add(w.window) > closed_through)
                .map(|w| {
                    args![
                        group,
                        w.window,
                        w.start,
                        w.subject.as_str(),
                        w.totals.requests,
                        w.totals.errors
                    ]
                })
                .collect(),
        )
        .await?;
        tx.execute(ADD_LATE, &args![group, late, self.first_event])
            .await?;
        Ok(())
    }
}

impl Results for AlertFlush {
    fn write<'a>(
        &'a self,
        tx: &'a Tx<'a>,
        group: &'a str,
        _topic: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.write_in(tx, group))
    }
}

/// The group's `closed_through` and first event time, its state row created if missing and
/// locked until the transaction ends (flushes and closes of one group take turns).
async fn lock_state(tx: &Tx<'_>, group: &str) -> Result<(i64, Option<i64>), StoreError> {
    tx.execute(
        "INSERT INTO alert_state (consumer_group, closed_through, late_events)
         VALUES (?1, ?2, 0) ON CONFLICT (consumer_group) DO NOTHING",
        &args![group, i64::MIN],
    )
    .await?;
    let sql = format!(
        "SELECT closed_through, first_event_time FROM alert_state WHERE consumer_group = ?1{}",
        lock(tx.is_postgres())
    );
    match tx.query_opt(&sql, &args![group]).await? {
        Some(r) => Ok((r.int(0)?, r.opt_int(1)?)),
        None => Ok((i64::MIN, None)),
    }
}

/// What closing windows needs besides the database's state.
#[derive(Debug, Clone)]
pub struct CloseRequest {
    pub group: String,
    pub topic: String,
    /// The topic's partition count: a partition that has not reported holds the watermark.
    pub partitions: i32,
    pub now_ms: i64,
    pub idle_ms: i64,
    /// Allowed lateness, seconds.
    pub lateness: i64,
    pub rules: Vec<Rule>,
}

impl CloseRequest {
    /// How far before the first closing window the rules look back, plus the longest window.
    fn history(&self) -> i64 {
        let h = self.rules.iter().map(|r| r.history()).max().unwrap_or(0);
        h + self.rules.iter().map(|r| r.window).max().unwrap_or(0)
    }
}

/// Closes the windows the group's watermark has passed, inside `tx`: the alerts they yield
/// are written (an id at most once) together with the new `closed_through`. Returns how many
/// alerts were written, or `None` when the watermark did not move (nothing to commit).
pub async fn close_in(tx: &Tx<'_>, req: &CloseRequest) -> Result<Option<usize>, StoreError> {
    let group = req.group.as_str();
    // Locked: a flush of the group waits until these windows are closed (or not).
    let (closed_through, first) = lock_state(tx, group).await?;
    let clocks = crate::store::clocks(tx, group, &req.topic).await?;
    let Some(w) = window::watermark(
        &clocks,
        req.partitions,
        req.now_ms,
        req.idle_ms,
        req.lateness,
    )
    .filter(|&w| w > closed_through) else {
        return Ok(None);
    };
    let mut found = Vec::new();
    for r in tx
        .query(
            "SELECT window_secs, window_start, subject, requests, errors
             FROM alert_windows WHERE consumer_group = ?1
             AND window_start + window_secs > ?2 AND window_start + window_secs <= ?3",
            &args![group, closed_through.saturating_sub(req.history()), w],
        )
        .await?
    {
        found.push(WindowRow {
            window: r.int(0)?,
            start: r.int(1)?,
            subject: r.text(2)?,
            totals: WindowTotals {
                requests: r.count(3)?,
                errors: r.count(4)?,
            },
        });
    }
    let alerts = window::evaluate(&req.rules, &found, closed_through, w, first);
    for a in &alerts {
        let start = window::seconds_of(&a.window_start).unwrap_or(0);
        let payload = serde_json::to_string(a)
            .map_err(|e| StoreError::Corrupt(format!("alert payload: {e}")))?;
        tx.execute(
            "INSERT INTO alerts (consumer_group, id, window_start, payload, created_at, attempts)
             VALUES (?1, ?2, ?3, ?4, ?5, 0) ON CONFLICT (consumer_group, id) DO NOTHING",
            &args![group, a.id.as_str(), start, payload, req.now_ms],
        )
        .await?;
    }
    tx.execute(
        "UPDATE alert_state SET closed_through = ?2 WHERE consumer_group = ?1",
        &args![group, w],
    )
    .await?;
    tx.execute(
        "DELETE FROM alert_windows WHERE consumer_group = ?1 AND window_start + window_secs <= ?2",
        &args![group, w.saturating_sub(req.history())],
    )
    .await?;
    Ok(Some(alerts.len()))
}

/// An alert waiting for delivery (or delivered), as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAlert {
    pub alert: Alert,
    pub attempts: u64,
    pub delivered: bool,
    /// When it was delivered, milliseconds since the epoch.
    pub delivered_at: Option<i64>,
}

/// An alerting group's state, for logs, `/metrics` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertStatus {
    pub closed_through: Option<i64>,
    pub late_events: u64,
    pub pending: u64,
    pub delivered: u64,
}

impl Store {
    /// Closes the windows an alerting group's watermark has passed, in one transaction (see
    /// [`close_in`]). Returns how many alerts were written.
    pub async fn close_windows(&self, req: &CloseRequest) -> Result<usize, StoreError> {
        let req = req.clone();
        self.write(writing(move |tx| {
            Box::pin(async move {
                Ok(match close_in(&tx, &req).await? {
                    Some(n) => Done::Commit(n),
                    None => Done::Rollback(0),
                })
            })
        }))
        .await
    }

    /// The group's alerts not delivered yet, oldest window first (at most `limit`).
    pub async fn pending_alerts(
        &self,
        group: &str,
        limit: u32,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        self.list_alerts(LIST, group, true, limit).await
    }

    /// The group's alerts, delivered or not (`pending_only`), oldest window first.
    pub async fn alerts(
        &self,
        group: &str,
        pending_only: bool,
        limit: u32,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        self.list_alerts(LIST, group, pending_only, limit).await
    }

    /// The group's newest alerts (by window), delivered or not.
    pub async fn recent_alerts(
        &self,
        group: &str,
        limit: u32,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        self.list_alerts(LIST_RECENT, group, false, limit).await
    }

    async fn list_alerts(
        &self,
        sql: &'static str,
        group: &str,
        pending_only: bool,
        limit: u32,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        let params = args![group, i64::from(pending_only), i64::from(limit)];
        self.read(reading(move |tx| {
            Box::pin(async move {
                tx.query(sql, &params)
                    .await?
                    .iter()
                    .map(|r| {
                        let alert = serde_json::from_str(&r.text(0)?)
                            .map_err(|e| StoreError::Corrupt(format!("alert payload: {e}")))?;
                        Ok(StoredAlert {
                            alert,
                            attempts: r.count(1)?,
                            delivered: r.int(2)? != 0,
                            delivered_at: r.opt_int(3)?,
                        })
                    })
                    .collect()
            })
        }))
        .await
    }

    /// Runs one statement of the outbox; how many rows it changed.
    async fn alert_update(
        &self,
        sql: &'static str,
        params: Vec<crate::store::sql::Value>,
    ) -> Result<u64, StoreError> {
        self.read(reading(move |tx| {
            Box::pin(async move { tx.execute(sql, &params).await })
        }))
        .await
    }

    /// Takes alert `id` for delivery until `until_ms` (so that another member of the group
    /// does not send it meanwhile); false when it is delivered or another member holds it.
    pub async fn claim_alert(
        &self,
        group: &str,
        id: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        let changed = self
            .alert_update(
                "UPDATE alerts SET claimed_until = ?3 WHERE consumer_group = ?1 AND id = ?2
                 AND delivered_at IS NULL AND (claimed_until IS NULL OR claimed_until < ?4)",
                args![group, id, until_ms, now_ms],
            )
            .await?;
        Ok(changed == 1)
    }

    /// Alert `id` was delivered at `now_ms`: it is never sent again.
    pub async fn alert_delivered(
        &self,
        group: &str,
        id: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.alert_update(
            "UPDATE alerts SET delivered_at = ?3, claimed_until = NULL, attempts = attempts + 1
             WHERE consumer_group = ?1 AND id = ?2",
            args![group, id, now_ms],
        )
        .await
        .map(drop)
    }

    /// Delivering alert `id` failed (`error`): it stays pending and is retried.
    pub async fn alert_failed(&self, group: &str, id: &str, error: &str) -> Result<(), StoreError> {
        self.alert_update(
            "UPDATE alerts SET claimed_until = NULL, attempts = attempts + 1, last_error = ?3
             WHERE consumer_group = ?1 AND id = ?2",
            args![group, id, error],
        )
        .await
        .map(drop)
    }

    /// A number that changes when an alert is raised or delivered (the live page is pushed a
    /// new snapshot then, as after a flush: a delivery moves no offset).
    pub async fn alerts_version(&self) -> Result<i64, StoreError> {
        self.read(reading(|tx| {
            Box::pin(async move {
                match tx
                    .query_opt(
                        "SELECT CAST(COUNT(*) + COUNT(delivered_at) AS BIGINT) FROM alerts",
                        &[],
                    )
                    .await?
                {
                    Some(r) => r.int(0),
                    None => Ok(0),
                }
            })
        }))
        .await
    }

    /// The alerting groups that ever flushed, by name.
    pub async fn alert_groups(&self) -> Result<Vec<String>, StoreError> {
        self.read(reading(|tx| {
            Box::pin(async move {
                tx.query(
                    "SELECT consumer_group FROM alert_state ORDER BY consumer_group",
                    &[],
                )
                .await?
                .iter()
                .map(|r| r.text(0))
                .collect()
            })
        }))
        .await
    }

    /// An alerting group's state.
    pub async fn alert_status(&self, group: &str) -> Result<AlertStatus, StoreError> {
        let params = args![group];
        self.read(reading(move |tx| {
            Box::pin(async move {
                let mut out = AlertStatus::default();
                if let Some(r) = tx
                    .query_opt(
                        "SELECT closed_through, late_events FROM alert_state WHERE consumer_group = ?1",
                        &params,
                    )
                    .await?
                {
                    out.closed_through = Some(r.int(0)?).filter(|&c| c != i64::MIN);
                    out.late_events = r.count(1)?;
                }
                if let Some(r) = tx
                    .query_opt(
                        "SELECT CAST(COALESCE(SUM(CASE WHEN delivered_at IS NULL THEN 1 ELSE 0 END), 0) AS BIGINT),
                         CAST(COUNT(*) AS BIGINT) FROM alerts WHERE consumer_group = ?1",
                        &params,
                    )
                    .await?
                {
                    out.pending = r.count(0)?;
                    out.delivered = r.count(1)?.saturating_sub(out.pending);
                }
                Ok(out)
            })
        }))
        .await
    }
}
