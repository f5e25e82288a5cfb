//! A Slack-style incoming webhook: one POST per alert, `{"text": …, "alert": {…}}`.

use std::time::Duration;

use super::{DeliveryError, SinkError, chain};
use crate::alert::window::Alert;

/// Posts alerts to one URL.
pub struct Webhook {
    client: reqwest::Client,
    url: reqwest::Url,
}

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
        let parsed = reqwest::Url::parse(url).map_err(|e| SinkError::WebhookUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(SinkError::WebhookUrl {
                url: url.to_owned(),
                reason: "use http:// or https://".into(),
            });
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("pageviews/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SinkError::Client(chain(&e)))?;
        Ok(Webhook {
            client,
            url: parsed,
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
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                return Err(DeliveryError::Unavailable(format!(
                    "POST {}: {}",
                    self.url,
                    chain(&e)
                )));
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let text: String = text.chars().take(200).collect();
        let what = format!("POST {} answered {status}: {}", self.url, text.trim());
        if status.is_client_error() && status != reqwest::StatusCode::TOO_MANY_REQUESTS {
            Err(DeliveryError::Refused(format!("{what} (check --webhook)")))
        } else {
            Err(DeliveryError::Unavailable(what))
        }
    }
}
