//! Where alerts go: a Slack-style webhook or e-mail. A sink delivers one alert at a time and
//! says whether a failure is worth retrying soon (the receiver is down) or is a
//! configuration problem (retried slowly: an alert is never dropped).

pub mod smtp;
pub mod webhook;

use super::window::Alert;

/// Why a delivery failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver is down, slow or busy (5xx, 429, timeouts, refused connections): retry
    /// with backoff.
    #[error("{0}")]
    Unavailable(String),
    /// The receiver refused the alert (a 4xx other than 429, a permanent SMTP error): most
    /// likely a wrong URL or address. Retried slowly, never dropped.
    #[error("{0}")]
    Refused(String),
}

/// Errors setting a sink up, phrased for the person who has to fix them.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("invalid --webhook URL {url:?}: {reason}")]
    WebhookUrl { url: String, reason: String },
    #[error(
        "invalid --smtp URL {url:?}: {reason} (smtp://host:port, smtp://user:pass@host:port?tls=required, smtps://…)"
    )]
    SmtpUrl { url: String, reason: String },
    #[error(
        "invalid e-mail address {address:?} for {option}: {reason} (write user@example.com or \"Name <user@example.com>\")"
    )]
    Address {
        option: &'static str,
        address: String,
        reason: String,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// A configured sink.
pub enum Sink {
    Webhook(webhook::Webhook),
    Email(smtp::Email),
}

impl Sink {
    /// Delivers `alert` once.
    pub async fn deliver(&self, alert: &Alert) -> Result<(), DeliveryError> {
        match self {
            Sink::Webhook(w) => w.deliver(alert).await,
            Sink::Email(e) => e.deliver(alert).await,
        }
    }

    /// The consumer group a sink of this kind uses unless `--group` says otherwise.
    pub fn default_group(&self) -> &'static str {
        match self {
            Sink::Webhook(_) => "alerts-webhook",
            Sink::Email(_) => "alerts-email",
        }
    }
}

/// An error and its sources on one line (reqwest and lettre say what failed on top, why below).
fn chain(err: &dyn std::error::Error) -> String {
    crate::one_line(err)
}
