//! E-mail: one message per alert, its id in `X-Pageviews-Alert-Id`, its line as the subject.

use std::time::Duration;

use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, Message};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::{DeliveryError, SinkError, chain};
use crate::alert::window::Alert;

/// The header that carries an alert's id (receivers dedupe by it).
pub const ALERT_ID_HEADER: &str = "X-Pageviews-Alert-Id";

#[derive(Clone)]
struct AlertId(String);

impl Header for AlertId {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str(ALERT_ID_HEADER)
    }
    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AlertId(s.to_owned()))
    }
    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.clone())
    }
}

/// Whether `url` has a user or password and may talk plain text: `smtp://` without
/// `tls=required` (`tls=opportunistic` falls back to plain text when the server offers no
/// STARTTLS).
fn sends_credentials_in_clear(url: &str) -> bool {
    let Ok(u) = url::Url::parse(url) else {
        return false;
    };
    let credentials = !u.username().is_empty() || u.password().is_some();
    let tls = u.scheme() == "smtps" || u.query_pairs().any(|(k, v)| k == "tls" && v == "required");
    credentials && !tls
}

/// Sends alerts through one SMTP server.
pub struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
}

fn mailbox(option: &'static str, address: &str) -> Result<Mailbox, SinkError> {
    address
        .parse()
        .map_err(|e: lettre::address::AddressError| SinkError::Address {
            option,
            address: address.to_owned(),
            reason: e.to_string(),
        })
}

impl Email {
    /// `url`: `smtp://host:port` (plain), `smtp://user:pass@host:port?tls=required`
    /// (STARTTLS), `smtps://user:pass@host:port` (TLS); `timeout` per message. Credentials
    /// over a connection that may be plain text are refused unless `insecure`.
    pub fn new(
        url: &str,
        from: &str,
        to: &[String],
        timeout: Duration,
        insecure: bool,
    ) -> Result<Email, SinkError> {
        let shown = crate::secrets::redact(url);
        if !insecure && sends_credentials_in_clear(url) {
            return Err(SinkError::SmtpUrl {
                url: shown,
                reason: "it has credentials but no TLS: they would cross the network in clear text; use smtps:// or ?tls=required, or pass --smtp-insecure".into(),
            });
        }
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| SinkError::SmtpUrl {
                url: shown,
                reason: crate::secrets::redact(&chain(&e)),
            })?
            .timeout(Some(timeout))
            .build();
        let to = to
            .iter()
            .map(|a| mailbox("--to", a))
            .collect::<Result<Vec<_>, _>>()?;
        if to.is_empty() {
            return Err(SinkError::Address {
                option: "--to",
                address: String::new(),
                reason: "at least one recipient is needed".into(),
            });
        }
        Ok(Email {
            transport,
            from: mailbox("--from", from)?,
            to,
        })
    }

    /// The message sent for `alert`.
    pub fn message(&self, alert: &Alert) -> Result<Message, DeliveryError> {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(alert.text.clone())
            .header(AlertId(alert.id.clone()))
            .header(ContentType::TEXT_PLAIN);
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        let body = format!(
            "{}\n\nid: {}\nrule: {} ({})\nwindow: {} to {}\nsubject: {}\nvalue: {}\nthreshold: {}\n",
            alert.text,
            alert.id,
            alert.rule,
            alert.kind,
            alert.window_start,
            alert.window_end,
            alert.subject.as_deref().unwrap_or("all traffic"),
            alert.value,
            alert.threshold
        );
        builder
            .body(body)
            .map_err(|e| DeliveryError::Refused(format!("cannot build the message: {e}")))
    }

    pub async fn deliver(&self, alert: &Alert) -> Result<(), DeliveryError> {
        let message = self.message(alert)?;
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(DeliveryError::Refused(format!(
                "the SMTP server refused the message: {} (check --smtp, --from, --to)",
                chain(&e)
            ))),
            Err(e) => Err(DeliveryError::Unavailable(format!("SMTP: {}", chain(&e)))),
        }
    }
}
