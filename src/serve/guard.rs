//! What stands between the network and the handlers. The dashboard may be reachable by
//! anyone, so every request passes, in this order:
//!
//! 1. the **Host check** (while bound to loopback): a page on another site that makes its own
//!    name resolve to 127.0.0.1 (DNS rebinding) sends its own name as `Host` and is refused;
//! 2. **access control** (with `--auth-token`): a bearer token, or the cookie that the
//!    `?token=` link (or the login form) sets; `/healthz` stays open for probes;
//! 3. the **request limits**: at most `--max-requests` handlers at once, each at most
//!    `--request-timeout` (the push channel's stream is not a handler: it has its own cap);
//! 4. **security headers** on every response: a Content-Security-Policy that allows the
//!    page's own script and style only (by hash), `nosniff`, no framing, no referrer.
//!
//! Connections are bounded in [`super::run`] (count, header-read timeout).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

/// The cookie the `?token=` link and the login form set.
const COOKIE: &str = "pageviews_session";

/// What the guard checks, built once per server.
pub(crate) struct Guard {
    /// Host names accepted while bound to loopback (lower case, no port); `None` when bound
    /// to another address (then a reverse proxy or the network decides what names reach us).
    hosts: Option<Vec<String>>,
    /// SHA-256 of the token: what requests are compared with (in constant time), and, in
    /// hex, the cookie's value, so the token itself never travels in a cookie.
    token_hash: Option<[u8; 32]>,
    /// Handlers running at once.
    requests: Semaphore,
    request_timeout: Duration,
    csp: HeaderValue,
}

impl Guard {
    pub(crate) fn new(bound: SocketAddr, config: &super::ServeConfig, page: &str) -> Guard {
        let hosts = bound.ip().is_loopback().then(|| {
            let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
                .into_iter()
                .map(str::to_owned)
                .collect();
            hosts.extend(config.allowed_hosts.iter().map(|h| h.to_ascii_lowercase()));
            hosts
        });
        Guard {
            hosts,
            token_hash: config
                .auth_token
                .as_deref()
                .map(|t| Sha256::digest(t.as_bytes()).into()),
            requests: Semaphore::new(config.max_requests.max(1)),
            request_timeout: config.request_timeout,
            csp: content_security_policy(page),
        }
    }

    /// Whether `host` (a `Host` header: name or address, maybe with a port) is one we answer.
    fn host_allowed(&self, host: Option<&str>) -> bool {
        let (Some(allowed), Some(host)) = (&self.hosts, host) else {
            return true;
        };
        let name = match host.rsplit_once(':') {
            // `[::1]:8080`, `localhost:8080`; a bare `[::1]` has its colons inside brackets.
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty() => {
                name
            }
            _ => host,
        };
        let name = name.to_ascii_lowercase();
        allowed.contains(&name)
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// Whether the request carries the token (bearer header or session cookie).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(want) = &self.token_hash else {
            return true;
        };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| same(&Sha256::digest(t.trim().as_bytes()), want));
        bearer
            || headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
                .any(|v| same(v.as_bytes(), hex(want).as_bytes()))
    }
}

/// Constant-time equality (the token must not be guessable byte by byte from timings).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The policy for the page: its inline script and style by hash, data from this server only,
/// no plugins, no framing, forms to this server only.
fn content_security_policy(page: &str) -> HeaderValue {
    use base64::Engine;
    let hash_of = |open: &str, close: &str| {
        let body = page
            .split_once(open)
            .and_then(|(_, rest)| rest.split_once(close))
            .map_or("", |(body, _)| body);
        let digest = Sha256::digest(body.as_bytes());
        format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    };
    let policy = format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        hash_of("<script>", "</script>"),
        hash_of("<style>", "</style>"),
    );
    HeaderValue::from_str(&policy).unwrap_or(HeaderValue::from_static("default-src 'none'"))
}

/// The page a browser without the token sees: one field, sent back as `?token=`.
const LOGIN: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>pageviews: sign in</title><style>body{font:16px system-ui,sans-serif;margin:3rem}</style></head><body><h1>pageviews</h1><p>This dashboard needs its access token (<code>--auth-token</code>).</p><form method=\"get\" action=\"/\"><input type=\"password\" name=\"token\" autocomplete=\"current-password\" autofocus> <button>Sign in</button></form></body></html>";

/// The middleware (see the module docs).
pub(crate) async fn guard(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let mut resp = check(&g, req, next).await;
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CONTENT_SECURITY_POLICY, g.csp.clone());
    resp
}

async fn check(g: &Guard, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if !g.host_allowed(host) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            "this server answers to localhost only (pass --allowed-host NAME to add a name)\n",
        )
            .into_response();
    }
    if req.uri().path() != "/healthz" && !g.authorized(req.headers()) {
        if let Some(resp) = g.token_link(&req) {
            return resp;
        }
        let wants_page = req.method() == axum::http::Method::GET && req.uri().path() == "/";
        let mut resp = if wants_page {
            (StatusCode::UNAUTHORIZED, axum::response::Html(LOGIN)).into_response()
        } else {
            (
                StatusCode::UNAUTHORIZED,
                "this server needs its access token: Authorization: Bearer TOKEN\n",
            )
                .into_response()
        };
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"pageviews\""),
        );
        return resp;
    }
    let Ok(permit) = tokio::time::timeout(g.request_timeout, g.requests.acquire()).await else {
        return busy("too many requests at once");
    };
    let resp = tokio::time::timeout(g.request_timeout, next.run(req)).await;
    drop(permit);
    resp.unwrap_or_else(|_| busy("the request took longer than --request-timeout"))
}

impl Guard {
    /// `?token=TOKEN` with the right token: a redirect to the same address without it that
    /// sets the session cookie (so the token does not stay in the address bar or history).
    fn token_link(&self, req: &Request) -> Option<Response> {
        let want = self.token_hash.as_ref()?;
        let query = req.uri().query()?;
        let mut rest = Vec::new();
        let mut given = None;
        for pair in query.split('&') {
            match pair.strip_prefix("token=") {
                Some(t) => given = Some(t),
                None => rest.push(pair),
            }
        }
        let given = url::form_urlencoded::parse(given?.as_bytes())
            .next()
            .map(|(k, _)| k.into_owned())
            .unwrap_or_default();
        if !same(&Sha256::digest(given.as_bytes()), want) {
            return None;
        }
        let mut location = req.uri().path().to_owned();
        if !rest.is_empty() {
            location.push('?');
            location.push_str(&rest.join("&"));
        }
        let cookie = format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age=2592000",
            hex(want)
        );
        let mut resp = StatusCode::SEE_OTHER.into_response();
        let h = resp.headers_mut();
        h.insert(header::LOCATION, HeaderValue::from_str(&location).ok()?);
        h.insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).ok()?);
        Some(resp)
    }
}

/// 503 with `Retry-After`: the server is at one of its limits.
pub(crate) fn busy(why: &str) -> Response {
    let mut resp = (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{why}; retry later\n"),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(listen: &str, token: Option<&str>) -> Guard {
        let config = super::super::ServeConfig {
            auth_token: token.map(str::to_owned),
            allowed_hosts: vec!["Stats.Example".into()],
            ..super::super::ServeConfig::default()
        };
        Guard::new(
            listen.parse().unwrap(),
            &config,
            "<style>a{}</style><script>1</script>",
        )
    }

    #[test]
    fn hosts_on_loopback() {
        let g = guard("127.0.0.1:8080", None);
        for ok in [
            None,
            Some("localhost"),
            Some("localhost:8080"),
            Some("127.0.0.1:8080"),
            Some("127.1.2.3"),
            Some("[::1]:8080"),
            Some("[::1]"),
            Some("stats.example:80"),
        ] {
            assert!(g.host_allowed(ok), "{ok:?}");
        }
        for bad in [
            Some("attacker.example"),
            Some("attacker.example:8080"),
            Some("10.0.0.1"),
        ] {
            assert!(!g.host_allowed(bad), "{bad:?}");
        }
        // Bound elsewhere: the network decides.
        assert!(guard("0.0.0.0:8080", None).host_allowed(Some("attacker.example")));
    }

    #[test]
    fn tokens_by_header_or_cookie() {
        let g = guard("127.0.0.1:8080", Some("s3cret"));
        let with = |name: header::HeaderName, value: &str| {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_str(value).unwrap());
            g.authorized(&h)
        };
        assert!(!g.authorized(&HeaderMap::new()));
        assert!(with(header::AUTHORIZATION, "Bearer s3cret"));
        assert!(!with(header::AUTHORIZATION, "Bearer s3cre"));
        assert!(!with(header::AUTHORIZATION, "Basic s3cret"));
        let cookie = format!("a=b; {COOKIE}={}", hex(&Sha256::digest(b"s3cret")));
        assert!(with(header::COOKIE, &cookie));
        assert!(!with(header::COOKIE, &format!("{COOKIE}=s3cret")));
        assert!(guard("127.0.0.1:8080", None).authorized(&HeaderMap::new()));
    }

    #[test]
    fn the_policy_names_the_page_hashes() {
        let g = guard("127.0.0.1:8080", None);
        let csp = g.csp.to_str().unwrap();
        let hash = |s: &str| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(s.as_bytes()))
        };
        assert!(
            csp.contains(&format!("script-src 'sha256-{}'", hash("1"))),
            "{csp}"
        );
        assert!(
            csp.contains(&format!("style-src 'sha256-{}'", hash("a{}"))),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"));
    }
}
