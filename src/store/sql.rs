//! The SQL dialect layer: what differs between SQLite and PostgreSQL, so that every step of a
//! flush, a close or a read is written once.
//!
//! SQL is written once with SQLite's `?N` placeholders ([`dollar_params`] turns them into
//! PostgreSQL's `$N`). Values go in as [`Value`] and come out as [`Row`]s of them, whichever
//! driver ran the statement. What the dialects do differently is named here and nowhere
//! else: a multi-row upsert ([`Upsert`]: one prepared statement per row on SQLite, one
//! `INSERT … SELECT * FROM unnest(…)` on PostgreSQL), a sum that saturates ([`capped_sum`])
//! and a row lock ([`lock`]).

use std::error::Error;

use bytes::BytesMut;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::StoreError;

/// One SQL value, as written or read by either database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Value {
        Value::Int(i64::from(v))
    }
}

/// A count, as SQL's BIGINT (saturating: a count is never negative in the database).
impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_owned())
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Value {
        Value::Blob(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// Builds a `Vec<Value>` from values of different types: `args![group, 3_i64, None::<i64>]`.
macro_rules! args {
    ($($v:expr),* $(,)?) => { Vec::from([$($crate::store::sql::Value::from($v)),*]) };
}
pub(crate) use args;

impl Value {
    fn to_libsql(&self) -> libsql::Value {
        match self {
            Value::Null => libsql::Value::Null,
            Value::Int(v) => libsql::Value::Integer(*v),
            Value::Text(s) => libsql::Value::Text(s.clone()),
            Value::Blob(b) => libsql::Value::Blob(b.clone()),
        }
    }

    fn from_libsql(v: libsql::Value) -> Value {
        match v {
            libsql::Value::Null => Value::Null,
            libsql::Value::Integer(i) => Value::Int(i),
            // Only sums can be REAL (SQLite's TOTAL); every query casts them back.
            libsql::Value::Real(r) => Value::Int(r as i64),
            libsql::Value::Text(s) => Value::Text(s),
            libsql::Value::Blob(b) => Value::Blob(b),
        }
    }

    fn from_postgres(row: &tokio_postgres::Row, i: usize) -> Result<Value, StoreError> {
        let ty = row.columns()[i].type_().clone();
        Ok(match ty {
            Type::INT8 => row.try_get::<_, Option<i64>>(i)?.into(),
            Type::INT4 => row.try_get::<_, Option<i32>>(i)?.into(),
            Type::INT2 => row.try_get::<_, Option<i16>>(i)?.map(i32::from).into(),
            Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(i64::from).into(),
            Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.into(),
            Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => {
                row.try_get::<_, Option<String>>(i)?.into()
            }
            other => {
                return Err(StoreError::Corrupt(format!(
                    "column {} is of type {other}, which pageviews does not read",
                    row.columns()[i].name()
                )));
            }
        })
    }
}

/// PostgreSQL takes a [`Value`] for a parameter of any of the types pageviews uses: the
/// integer is narrowed to the column's width (an out-of-range value is an error, never a
/// wrapped number).
impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => match *ty {
                Type::INT8 => v.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::BOOL => (*v != 0).to_sql(ty, out),
                _ => Err(format!("an integer cannot be written as {ty}").into()),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// One row of a query's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(Vec<Value>);

impl Row {
    fn get(&self, i: usize) -> Result<&Value, StoreError> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Corrupt(format!("a row has no column {i}")))
    }

    fn wrong(&self, i: usize, want: &str) -> StoreError {
        StoreError::Corrupt(format!(
            "column {i} is {:?}, expected {want}",
            self.0.get(i)
        ))
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.get(i)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            _ => Err(self.wrong(i, "an integer")),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.opt_int(i)?.ok_or_else(|| self.wrong(i, "an integer"))
    }

    /// A stored count (never negative; a corrupt one reads as 0).
    pub fn count(&self, i: usize) -> Result<u64, StoreError> {
        Ok(u64::try_from(self.opt_int(i)?.unwrap_or(0)).unwrap_or(0))
    }

    /// A partition number (written from `i32`; anything else is corrupt, kept out of range).
    pub fn int32(&self, i: usize) -> Result<i32, StoreError> {
        Ok(i32::try_from(self.int(i)?).unwrap_or(-1))
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.get(i)? {
            Value::Null => Ok(None),
            Value::Text(s) => Ok(Some(s.clone())),
            _ => Err(self.wrong(i, "text")),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?.ok_or_else(|| self.wrong(i, "text"))
    }

    pub fn blob(&self, i: usize) -> Result<Vec<u8>, StoreError> {
        match self.get(i)? {
            Value::Blob(b) => Ok(b.clone()),
            _ => Err(self.wrong(i, "bytes")),
        }
    }
}

/// A connection, or a transaction, of either database. SQLite's is a connection of its own
/// (a transaction is `BEGIN IMMEDIATE` on it: see `sqlite.rs`); PostgreSQL's is a pooled
/// client, or a transaction that rolls back if dropped unfinished.
pub enum Tx<'a> {
    Sqlite(&'a libsql::Connection),
    Pg(&'a deadpool_postgres::Transaction<'a>),
    PgClient(&'a deadpool_postgres::Client),
}

impl Tx<'_> {
    pub fn is_postgres(&self) -> bool {
        !matches!(self, Tx::Sqlite(_))
    }

    /// Runs one statement; how many rows it changed.
    pub async fn execute(&self, sql: &str, args: &[Value]) -> Result<u64, StoreError> {
        match self {
            Tx::Sqlite(c) => Ok(c.execute(sql, libsql_args(args)).await?),
            Tx::Pg(t) => {
                let stmt = t.prepare_cached(&dollar_params(sql)).await?;
                Ok(t.execute(&stmt, &pg_args(args)).await?)
            }
            Tx::PgClient(c) => {
                let stmt = c.prepare_cached(&dollar_params(sql)).await?;
                Ok(c.execute(&stmt, &pg_args(args)).await?)
            }
        }
    }

    /// Runs one query; all its rows.
    pub async fn query(&self, sql: &str, args: &[Value]) -> Result<Vec<Row>, StoreError> {
        let pg_rows = match self {
            Tx::Sqlite(c) => {
                let mut rows = c.query(sql, libsql_args(args)).await?;
                let columns = usize::try_from(rows.column_count()).unwrap_or(0);
                let mut out = Vec::new();
                while let Some(row) = rows.next().await? {
                    let mut values = Vec::with_capacity(columns);
                    for i in 0..columns {
                        let i = i32::try_from(i).unwrap_or(i32::MAX);
                        values.push(Value::from_libsql(row.get_value(i)?));
                    }
                    out.push(Row(values));
                }
                return Ok(out);
            }
            Tx::Pg(t) => {
                let stmt = t.prepare_cached(&dollar_params(sql)).await?;
                t.query(&stmt, &pg_args(args)).await?
            }
            Tx::PgClient(c) => {
                let stmt = c.prepare_cached(&dollar_params(sql)).await?;
                c.query(&stmt, &pg_args(args)).await?
            }
        };
        pg_rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| Value::from_postgres(r, i))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Row)
            })
            .collect()
    }

    /// The first row of a query, if any.
    pub async fn query_opt(&self, sql: &str, args: &[Value]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, args).await?.into_iter().next())
    }

    /// The stored rows of `table` whose `keys` columns equal one of `wanted` (each a list of
    /// key values, in `keys` order), as (key values, then `columns`). One statement on
    /// PostgreSQL (a join with the keys as `unnest` arrays), one per key on SQLite (which
    /// runs in process: a statement costs no round trip).
    pub async fn rows_by_key(
        &self,
        table: &str,
        keys: &[(&str, Ty)],
        columns: &[&str],
        wanted: Vec<Vec<Value>>,
    ) -> Result<Vec<Row>, StoreError> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let select: Vec<String> = keys
            .iter()
            .map(|k| format!("t.{}", k.0))
            .chain(columns.iter().map(|c| format!("t.{c}")))
            .collect();
        if self.is_postgres() {
            let arrays: Vec<String> = keys
                .iter()
                .enumerate()
                .map(|(i, k)| format!("$${}::{}", i + 1, k.1.array()))
                .collect();
            let names: Vec<String> = (0..keys.len()).map(|i| format!("k{i}")).collect();
            let on: Vec<String> = keys
                .iter()
                .zip(&names)
                .map(|(k, n)| format!("t.{} = k.{n}", k.0))
                .collect();
            let sql = format!(
                "SELECT {} FROM {table} t JOIN unnest({}) AS k({}) ON {}",
                select.join(", "),
                arrays.join(", ").replace("$$", "$"),
                names.join(", "),
                on.join(" AND ")
            );
            let mut columns: Vec<Vec<Value>> = vec![Vec::with_capacity(wanted.len()); keys.len()];
            for row in wanted {
                for (column, v) in columns.iter_mut().zip(row) {
                    column.push(v);
                }
            }
            let args: Vec<&(dyn ToSql + Sync)> =
                columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
            let rows = match self {
                Tx::Pg(t) => {
                    let stmt = t.prepare_cached(&sql).await?;
                    t.query(&stmt, &args).await?
                }
                Tx::PgClient(c) => {
                    let stmt = c.prepare_cached(&sql).await?;
                    c.query(&stmt, &args).await?
                }
                Tx::Sqlite(_) => Vec::new(),
            };
            return rows
                .iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| Value::from_postgres(r, i))
                        .collect::<Result<Vec<_>, _>>()
                        .map(Row)
                })
                .collect();
        }
        let filter: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("t.{} = ?{}", k.0, i + 1))
            .collect();
        let sql = format!(
            "SELECT {} FROM {table} t WHERE {}",
            select.join(", "),
            filter.join(" AND ")
        );
        let mut out = Vec::new();
        for key in &wanted {
            out.extend(self.query(&sql, key).await?);
        }
        Ok(out)
    }

    /// Holds the lock named `key` until the transaction ends, so that read-modify-write
    /// steps of concurrent writers take turns. SQLite's write transaction (`BEGIN
    /// IMMEDIATE`) already holds the whole database.
    pub async fn lock_named(&self, key: i64) -> Result<(), StoreError> {
        if self.is_postgres() {
            self.execute("SELECT pg_advisory_xact_lock(?1)", &[Value::Int(key)])
                .await?;
        }
        Ok(())
    }

    /// Inserts `rows` (each: the key columns, then the value columns of `u`, in order),
    /// merging each with the stored row of the same key as `u` says.
    pub async fn upsert(&self, u: &Upsert, rows: Vec<Vec<Value>>) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        match self {
            Tx::Sqlite(c) => {
                let stmt = c.prepare(&u.sql_per_row()).await?;
                for row in rows {
                    stmt.execute(libsql_args(&row)).await?;
                    stmt.reset();
                }
                Ok(())
            }
            Tx::Pg(_) | Tx::PgClient(_) => {
                // Column-major: one array parameter per column.
                let width = u.keys.len() + u.values.len();
                let mut columns: Vec<Vec<Value>> = vec![Vec::with_capacity(rows.len()); width];
                for row in rows {
                    for (column, v) in columns.iter_mut().zip(row) {
                        column.push(v);
                    }
                }
                let args: Vec<&(dyn ToSql + Sync)> =
                    columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
                let sql = u.sql_unnest();
                match self {
                    Tx::Pg(t) => {
                        let stmt = t.prepare_cached(&sql).await?;
                        t.execute(&stmt, &args).await?;
                    }
                    Tx::PgClient(c) => {
                        let stmt = c.prepare_cached(&sql).await?;
                        c.execute(&stmt, &args).await?;
                    }
                    Tx::Sqlite(_) => {}
                }
                Ok(())
            }
        }
    }
}

fn libsql_args(args: &[Value]) -> Vec<libsql::Value> {
    args.iter().map(Value::to_libsql).collect()
}

fn pg_args(args: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

/// A column's type, for PostgreSQL's typed arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Int4,
    Int8,
    Text,
    Bytes,
}

impl Ty {
    fn array(self) -> &'static str {
        match self {
            Ty::Int4 => "int4[]",
            Ty::Int8 => "int8[]",
            Ty::Text => "text[]",
            Ty::Bytes => "bytea[]",
        }
    }
}

/// How an upserted value meets the stored one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// Stored + new.
    Add,
    /// Stored + new, stopping at BIGINT's largest value (PostgreSQL fails the statement on
    /// overflow, SQLite turns the sum into a REAL): sums of hostile byte counts.
    SaturatingAdd,
    /// The new value.
    Replace,
    /// The new value unless it is NULL.
    KeepIfNull,
    /// The stored value unless it is NULL (the first value written stays).
    KeepFirst,
}

/// An `INSERT … ON CONFLICT (keys) DO UPDATE` of one table, written once for both databases.
#[derive(Debug)]
pub struct Upsert {
    pub table: &'static str,
    /// The conflict target: column names (quoted where SQL needs it) and types.
    pub keys: &'static [(&'static str, Ty)],
    pub values: &'static [(&'static str, Ty, Merge)],
}

impl Upsert {
    fn columns(&self) -> String {
        self.keys
            .iter()
            .map(|k| k.0)
            .chain(self.values.iter().map(|v| v.0))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn on_conflict(&self) -> String {
        let keys: Vec<&str> = self.keys.iter().map(|k| k.0).collect();
        if self.values.is_empty() {
            return format!("ON CONFLICT ({}) DO NOTHING", keys.join(", "));
        }
        let t = self.table;
        let set: Vec<String> = self
            .values
            .iter()
            .map(|&(c, _, merge)| {
                let value = match merge {
                    Merge::Add => format!("{t}.{c} + excluded.{c}"),
                    Merge::SaturatingAdd => format!(
                        "CASE WHEN {t}.{c} > 9223372036854775807 - excluded.{c} \
                         THEN 9223372036854775807 ELSE {t}.{c} + excluded.{c} END"
                    ),
                    Merge::Replace => format!("excluded.{c}"),
                    Merge::KeepIfNull => format!("COALESCE(excluded.{c}, {t}.{c})"),
                    Merge::KeepFirst => format!("COALESCE({t}.{c}, excluded.{c})"),
                };
                format!("{c} = {value}")
            })
            .collect();
        format!(
            "ON CONFLICT ({}) DO UPDATE SET {}",
            keys.join(", "),
            set.join(", ")
        )
    }

    fn sql_per_row(&self) -> String {
        let n = self.keys.len() + self.values.len();
        let placeholders: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
        format!(
            "INSERT INTO {} ({}) VALUES ({}) {}",
            self.table,
            self.columns(),
            placeholders.join(", "),
            self.on_conflict()
        )
    }

    fn sql_unnest(&self) -> String {
        let arrays: Vec<String> = self
            .keys
            .iter()
            .map(|k| k.1)
            .chain(self.values.iter().map(|v| v.1))
            .enumerate()
            .map(|(i, ty)| format!("${}::{}", i + 1, ty.array()))
            .collect();
        format!(
            "INSERT INTO {} ({}) SELECT * FROM unnest({}) {}",
            self.table,
            self.columns(),
            arrays.join(", "),
            self.on_conflict()
        )
    }
}

/// `SUM(column)` as a BIGINT that stops at the largest BIGINT instead of failing (PostgreSQL
/// raises "bigint out of range", SQLite "integer overflow"): saturated byte counts of hostile
/// lines must not make a panel unreadable. SQLite's `TOTAL` is exact below 2^53 (9 PB).
pub fn capped_sum(postgres: bool, column: &str) -> String {
    if postgres {
        format!("CAST(LEAST(COALESCE(SUM({column}), 0), 9223372036854775807) AS BIGINT)")
    } else {
        format!("CAST(MIN(TOTAL({column}), 9223372036854775807.0) AS BIGINT)")
    }
}

/// What a `SELECT` appends to lock the rows it reads until the transaction ends. SQLite needs
/// nothing: its write transactions (`BEGIN IMMEDIATE`) hold the whole database.
pub fn lock(postgres: bool) -> &'static str {
    if postgres { " FOR UPDATE" } else { "" }
}

/// SQL written with SQLite's `?N` parameters, for PostgreSQL (`$N`).
pub fn dollar_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Upsert = Upsert {
        table: "t",
        keys: &[("k", Ty::Text), ("\"partition\"", Ty::Int4)],
        values: &[
            ("n", Ty::Int8, Merge::Add),
            ("s", Ty::Text, Merge::KeepIfNull),
        ],
    };

    #[test]
    fn one_upsert_two_dialects() {
        assert_eq!(
            T.sql_per_row(),
            "INSERT INTO t (k, \"partition\", n, s) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (k, \"partition\") DO UPDATE SET n = t.n + excluded.n, s = COALESCE(excluded.s, t.s)"
        );
        assert_eq!(
            T.sql_unnest(),
            "INSERT INTO t (k, \"partition\", n, s) SELECT * FROM unnest($1::text[], $2::int4[], $3::int8[], $4::text[]) ON CONFLICT (k, \"partition\") DO UPDATE SET n = t.n + excluded.n, s = COALESCE(excluded.s, t.s)"
        );
    }

    #[test]
    fn placeholders() {
        assert_eq!(
            dollar_params("a = ?1 AND b = ?12 AND c = '?'"),
            "a = $1 AND b = $12 AND c = '?'"
        );
    }
}
