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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server on loopback that answers `response` to every request, counting
    /// requests; its URL with a secret path.
    async fn answering(
        response: &'static str,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicU32>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/services/T0/B0/S3CRETPATH",
            listener.local_addr().unwrap()
        );
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = std::sync::Arc::clone(&hits);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(response.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        (url, hits)
    }

    fn alert() -> Alert {
        Alert {
            id: "errors/2026-01-01T00:00:00Z".into(),
            rule: "errors".into(),
            kind: "error_share".into(),
            window_start: "2026-01-01T00:00:00Z".into(),
            window_end: "2026-01-01T00:01:00Z".into(),
            subject: None,
            value: 0.5,
            threshold: 0.2,
            text: "errors".into(),
        }
    }

    #[tokio::test]
    async fn redirects_are_not_followed_and_the_url_is_redacted() {
        let (target, target_hits) = answering("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        let redirect: &'static str = Box::leak(
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n"
            )
            .into_boxed_str(),
        );
        let (url, hits) = answering(redirect).await;
        let hook = Webhook::new(&url, Duration::from_secs(5)).unwrap();
        let err = hook.deliver(&alert()).await.unwrap_err();
        let DeliveryError::Refused(text) = &err else {
            panic!("{err:?}");
        };
        assert!(text.contains("redirects are not followed"), "{text}");
        assert!(!text.contains("S3CRETPATH"), "{text}");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(target_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_error_body_is_read_up_to_4_kib_and_the_url_is_redacted() {
        let body = "e".repeat(1 << 20);
        let response: &'static str = Box::leak(
            format!(
                "HTTP/1.1 500 Internal Server Error\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let (url, _) = answering(response).await;
        let hook = Webhook::new(&url, Duration::from_secs(5)).unwrap();
        let err = hook.deliver(&alert()).await.unwrap_err();
        let DeliveryError::Unavailable(text) = &err else {
            panic!("{err:?}");
        };
        assert!(text.len() < 400, "{} bytes", text.len());
        assert!(!text.contains("S3CRETPATH"), "{text}");
        // A refused connection: reqwest's error names no URL either.
        let closed =
            Webhook::new("http://127.0.0.1:1/hook/S3CRETPATH", Duration::from_secs(5)).unwrap();
        let err = closed.deliver(&alert()).await.unwrap_err();
        assert!(!err.to_string().contains("S3CRETPATH"), "{err}");
    }
}
