//! `PageView`: the structured event on the `page-views` topic, shared by preprocess (writer)
//! and aggregate and the alerting consumers (readers).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// One visit, as JSON on the events topic (keyed by `country_code`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageView<'a> {
    /// Request time, RFC 3339 in UTC (`2024-01-01T09:00:00Z`): event time for rules and buckets.
    #[serde(borrow)]
    pub time: Cow<'a, str>,
    /// Client address as logged.
    #[serde(borrow)]
    pub ip: Cow<'a, str>,
    /// ISO 3166-1 alpha-2, `ZZ` when unknown; also the message key.
    #[serde(borrow)]
    pub country_code: Cow<'a, str>,
    #[serde(borrow)]
    pub browser: Cow<'a, str>,
    #[serde(borrow)]
    pub browser_version: Cow<'a, str>,
    #[serde(borrow)]
    pub os: Cow<'a, str>,
    /// `desktop`, `mobile`, `tablet`, `bot`, `other` or `unknown`.
    #[serde(borrow)]
    pub device: Cow<'a, str>,
    pub is_bot: bool,
    #[serde(borrow)]
    pub method: Cow<'a, str>,
    #[serde(borrow)]
    pub path: Cow<'a, str>,
    pub status: u16,
    pub bytes: u64,
    /// `None` (JSON `null`) when the log had no referrer.
    #[serde(borrow)]
    pub referrer: Option<Cow<'a, str>>,
    /// The site (virtual host) that served the request, when the log format has it; absent
    /// from the JSON otherwise.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub vhost: Option<Cow<'a, str>>,
    /// Time taken to serve the request in microseconds, when the log format has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_time_us: Option<u64>,
}

/// Event headers that let a consumer trace an event back to its raw line: the raw topic's
/// partition and offset. Replays of the same raw line carry the same pair.
pub mod headers {
    /// Partition of the raw line on the raw topic (decimal text).
    pub const SOURCE_PARTITION: &str = "pv-source-partition";
    /// Offset of the raw line on the raw topic (decimal text).
    pub const SOURCE_OFFSET: &str = "pv-source-offset";
    /// On a dead letter: why the line could not be parsed.
    pub const REASON: &str = "pv-reason";
    /// Set by the importer when it cut an over-long line; the value is the original length.
    pub const TRUNCATED: &str = "pv-truncated-from";
    /// Set by the importer on every raw line: its log format ([`crate::format::FormatSpec`]).
    pub const FORMAT: &str = crate::format::FORMAT_HEADER;
}
