//! A Slack-style incoming webhook: one POST per alert, `{"text": …, "alert": {…}}`.

use std::time::Duration;

use super::{DeliveryError, SinkError, chain};
use crate::alert::window::Alert;

/// Posts alerts to one URL.
pub struct Webhook {
    client: reqwest::Client,
    url: reqwest::Url,
    /// The URL as messages show it ([`crate::secrets::redact`]: a webhook's path is its token).
    shown: String,
}

/// The most of an error response's body read (and quoted in the error).
const MAX_ERROR_BODY: usize = 4096;

/// The body of one POST: Slack's incoming-webhook shape plus the structured alert.
#[derive(serde::Serialize)]
struct Body<'a> {
    text: &'a str,
    alert: AlertFields<'a>,
}

#[derive(serde::Serialize)]
struct AlertFields<'a> {
    id: &'a str,
    rule: &'a str,
    kind: &'a str,
    window_start: &'a str,
    window_end: &'a str,
    subject: Option<&'a str>,
    value: f64,
    threshold: f64,
}

impl Webhook {
    /// A webhook at `url` (http or https); a request that takes longer than `timeout` failed.
    pub fn new(url: &str, timeout: Duration) -> Result<Webhook, SinkError> {
        let shown = crate::secrets::redact(url);
        let parsed = reqwest::Url::parse(url).map_err(|e| SinkError::WebhookUrl {
            url: shown.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(SinkError::WebhookUrl {
                url: shown.clone(),
                reason: "use http:// or https://".into(),
            });
        }
        let client = reqwest::Client::builder()
            // A redirect could send the alert (and on 307/308 its body again) anywhere, from
            // https to http included: the configured URL is the only destination.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("pageviews/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SinkError::Client(chain(&e)))?;
        Ok(Webhook {
            client,
            url: parsed,
            shown,
        })
    }

    /// The JSON body posted for `alert`.
    pub fn body(alert: &Alert) -> serde_json::Value {
        let body = Body {
            text: &alert.text,
            alert: AlertFields {
                id: &alert.id,
                rule: &alert.rule,
                kind: &alert.kind,
                window_start: &alert.window_start,
                window_end: &alert.window_end,
                subject: alert.subject.as_deref(),
                value: alert.value,
                threshold: alert.threshold,
            },
        };
        serde_json::to_value(&body).unwrap_or_default()
    }

    pub async fn deliver(&self, alert: &Alert) -> Result<(), DeliveryError> {
        let sent = self
            .client
            .post(self.url.clone())
            .header("X-Pageviews-Alert-Id", alert.id.as_str())
            .json(&Webhook::body(alert))
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => {
                return Err(DeliveryError::Unavailable(format!(
                    "POST {}: {}",
                    self.shown,
                    chain(&e.without_url())
                )));
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // At most MAX_ERROR_BODY bytes of whatever the receiver sends back.
        let mut body = Vec::new();
        while body.len() < MAX_ERROR_BODY {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        body.truncate(MAX_ERROR_BODY);
        let text = String::from_utf8_lossy(&body);
        let text: String = text.chars().take(200).collect();
        let text = crate::event::policy::bounded(text.trim());
        let what = format!("POST {} answered {status}: {text}", self.shown);
        if status.is_redirection() {
            Err(DeliveryError::Refused(format!(
                "{what} (redirects are not followed: give --webhook the final URL)"
            )))
        } else if status.is_client_error() && status != reqwest::StatusCode::TOO_MANY_REQUESTS {
            Err(DeliveryError::Refused(format!("{what} (check --webhook)")))
        } else {
            Err(DeliveryError::Unavailable(what))
        }
    }
}
