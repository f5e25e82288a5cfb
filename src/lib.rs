//! pageviews: live visitor statistics from web-server access logs, through Kafka.
//!
//! # Layout
//!
//! Data flows through the stages, each a module with a `run(config, …, shutdown)` entry; the
//! alerting groups read the same events as the aggregator, each with its own positions:
//!
//! ```text
//!  access logs ──▶ import ──▶ [raw-page-views] ──▶ preprocess ──▶ [page-views] ──▶ aggregate ──▶ database ──▶ serve
//!  (files, stdin,               one line per        parse, GeoIP,   keyed by          count in       counts +      dashboard,
//!   generator)                  message             User-Agent      country code      memory, one    offsets in    /api/countries
//!                                                        │                            transaction    one tx
//!                                                        └──▶ [raw-page-views-dead-letter]  every 5 s
//!                                                                     [page-views] ──▶ alert ──▶ outbox ──▶ webhook, e-mail
//! ```
//!
//! - [`import`]: lines → `raw-page-views` (files, globs, gzip, stdin, `--follow`).
//! - [`format`]: what a raw line means: presets, GoAccess and nginx format strings, W3C,
//!   JSON; the importer picks one per input ([`import::input_format`]) and sends it with every
//!   line.
//! - [`preprocess`]: the consumer group `preprocessors`. Pure core in [`format`] (parsing),
//!   [`preprocess::geo`] (IP → country), [`preprocess::useragent`] and
//!   [`preprocess::enrich`] (line → [`event::PageView`] JSON); the module itself is the Kafka
//!   loop.
//! - [`positions`]: what every consumer group that writes results to the database needs:
//!   offsets stored in the same transaction as the results, loaded on assignment, fenced by
//!   compare-and-set. Pure core in [`positions::tally`] (per-partition results and offsets,
//!   replays dropped) and [`positions::start`] (where a newly owned partition starts); the
//!   module is the Kafka side ([`positions::GroupMember`]), which assigns partitions paused in
//!   the rebalance callback and positions them from the database outside it. The one consume
//!   loop, [`positions::consume`], runs any [`positions::Group`]: the aggregator and the
//!   alerters implement it in their own folders.
//! - [`aggregate`]: the consumer group `aggregators`, a [`positions`] user. Pure core in
//!   [`aggregate::dimensions`] (what is counted: the dimensions, top-K, visits per minute,
//!   sketches, per slice of site, country and visitor type; what a flush writes) and
//!   [`sketch`] (HyperLogLog, histogram buckets); [`aggregate::rollups`] holds the
//!   filterable counts (per day, hour and minute and per slice) and the filtered reads;
//!   [`aggregate::visits`] the visits' tables.
//! - [`sessions`]: visits (sessions) on event time, the pure core the aggregator runs: open
//!   visits per partition, per-raw-partition clocks and watermark, closing, the stored form.
//! - [`alert`]: the alerting groups (`alerts-webhook`, `alerts-email`), [`positions`] users
//!   too. Pure core in [`alert::rules`] (the rules file) and [`alert::window`] (event-time
//!   tumbling windows, watermarks, rule evaluation); [`alert::sink`] delivers (webhook,
//!   SMTP); alerts wait in the database until delivered.
//! - [`store`]: the database's shared part (SQLite or PostgreSQL): connections, migrations,
//!   positions (offsets, source watermarks, topic ids, event-time clocks) and the one flush
//!   transaction ([`store::flush_in`]) that writes them with a group's results; the SQL
//!   dialect layer ([`store::sql`]). It names no group: each group's tables, rows and SQL are
//!   in its own folder ([`aggregate::tables`], [`alert::tables`]), and `database.rs` lists
//!   every group's schema to open.
//! - [`serve`]: the dashboard ([`serve::live`] pushes it an update after each flush, per
//!   filter), the JSON API ([`serve::api`]: every panel filtered, compared, or as CSV through
//!   [`serve::csv`]), pipeline health and `/metrics` ([`serve::pipeline`]).
//! - [`kafka`]: the one place that knows topic/group names and client settings;
//!   [`broker`]: the embedded Kafka-compatible broker (tansu) for one machine.
//! - [`run`]: every stage in one process for one real server (`pageviews run`, following the
//!   logs, resuming exactly after a kill); [`demo`]: the same fed by [`generate`]'s
//!   deterministic realistic log lines; [`report`]: the statistics as one self-contained
//!   HTML, JSON or CSV file.
//! - [`secrets`]: the one place that redacts URLs (database, SMTP, webhook) for output.
//! - [`cli`]: the command line; [`args`]: its options, one struct per stage, flattened into
//!   the stage's command and into `demo`.

pub mod aggregate;
pub(crate) mod alert;
pub(crate) mod args;
pub mod broker;
pub mod cli;
pub mod countries;
mod database;
pub mod demo;
pub mod event;
pub mod format;
pub mod generate;
pub mod import;
pub mod kafka;
pub(crate) mod positions;
pub mod preprocess;
pub mod report;
pub mod run;
pub(crate) mod secrets;
pub mod serve;
pub mod sessions;
pub(crate) mod sketch;
pub mod store;

/// An error and its sources on one line: the drivers' own messages ("db error", "error
/// connecting to server") only say what failed, their sources say why. A source whose text
/// is already in the line is left out.
pub fn one_line(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
