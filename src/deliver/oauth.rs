//! OAuth2 client credentials (RFC 6749 §4.4) for endpoints that want a bearer token.
//!
//! One [`TokenSource`] per subscription, built when the subscription is prepared and kept across
//! reloads while its `oauth2` settings do not change. It hands every delivery the cached token while
//! that is fresh; the first delivery that finds it stale fetches a new one while the others wait for
//! that fetch (one request to the token endpoint however many deliveries are waiting). A token is
//! refreshed before it expires — at 90 % of its lifetime, at most a minute early — and at once when the
//! endpoint answers 401 to it ([`TokenSource::invalidate`]; the deliverer then resends the attempt once).
//!
//! The token request goes through the delivery client, so the token endpoint passes the same address
//! policy, proxy, TLS roots and DNS as every endpoint. A failed fetch is remembered for [`FAILURE_HOLD`]:
//! deliveries queued behind it get the same error instead of each asking a server that is down again.
//! Errors name the token endpoint by `host:port` and what failed (status, the RFC 6749 `error` code, a
//! missing field); they never contain the URL's path, the client secret, the token or the response body.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use tokio::time::Instant;

use super::http::{Client, HttpError, Target};
use crate::model::OAuth2Spec;

/// A token without `expires_in` is used for this long (or until a 401).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// How long a failed fetch answers for the fetches that would follow it.
pub const FAILURE_HOLD: Duration = Duration::from_secs(1);
/// The longest token response read.
const MAX_RESPONSE: usize = 16 * 1024;

/// A fetched token.
#[derive(Debug)]
pub struct Token {
    /// `Bearer <token>`, the `authorization` value.
    pub authorization: Box<[u8]>,
    /// When deliveries start refreshing it.
    refresh_at: Instant,
    /// When it is no longer used at all.
    expires_at: Instant,
}

/// How the client authenticates to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientAuth {
    /// `client_secret_basic`: HTTP Basic with the url-encoded id and secret (RFC 6749 §2.3.1).
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` in the form.
    Post,
}

pub struct TokenSource {
    target: Target,
    /// `host:port` of the token endpoint, for errors (URLs stay out of errors and logs: a path can
    /// carry a credential).
    authority: String,
    /// The `application/x-www-form-urlencoded` request body.
    form: Bytes,
    /// `Basic …` for `client_secret_basic`.
    basic: Option<Box<[u8]>>,
    /// The settings it was built from (a reload with equal settings keeps the source and its token).
    spec: OAuth2Spec,
    cached: ArcSwapOption<Token>,
    /// Held by the one delivery fetching; the others wait on it, then find the new token.
    fetching: tokio::sync::Mutex<()>,
    failed: Mutex<Option<(Instant, String)>>,
    /// Token requests made (for tests and the health view).
    fetches: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("token_url", &self.spec.token_url)
            .field("client_id", &self.spec.client_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TokenSource {
    /// Checks the settings (errors name the field under `oauth2.`) and prepares the request.
    pub fn new(spec: &OAuth2Spec) -> Result<TokenSource, (String, String)> {
        let field = |f: &str| format!("oauth2.{f}");
        let url = url::Url::parse(&spec.token_url).map_err(|e| {
            (
                field("token_url"),
                format!("{:?} is not a URL ({e})", spec.token_url),
            )
        })?;
        if url.scheme() != "https" && url.scheme() != "http" {
            return Err((field("token_url"), "scheme must be https (or http)".into()));
        }
        if url.host().is_none() || !url.username().is_empty() || url.password().is_some() {
            return Err((
                field("token_url"),
                "must have a host and no credentials".into(),
            ));
        }
        let target = Target::from_url(&url).map_err(|m| (field("token_url"), m))?;
        let authority = match (url.host(), url.port_or_known_default()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            _ => return Err((field("token_url"), "must have a host and a port".into())),
        };
        if spec.client_id.is_empty() || spec.client_id.chars().any(char::is_control) {
            return Err((
                field("client_id"),
                "must be non-empty, without control characters".into(),
            ));
        }
        if spec.client_secret.is_empty() || spec.client_secret.chars().any(char::is_control) {
            return Err((
                field("client_secret"),
                "must be non-empty, without control characters".into(),
            ));
        }
        for (i, s) in spec.scopes.iter().enumerate() {
            // RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
            let ok = !s.is_empty()
                && s.bytes()
                    .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
            if !ok {
                return Err((
                    field(&format!("scopes[{i}]")),
                    "is not an OAuth2 scope token (printable ASCII, no space, quote or backslash)"
                        .into(),
                ));
            }
        }
        let auth = match spec.client_auth.as_deref() {
            None | Some("basic") => ClientAuth::Basic,
            Some("post") => ClientAuth::Post,
            Some(other) => {
                return Err((
                    field("client_auth"),
                    format!("{other:?} is not \"basic\" or \"post\""),
                ));
            }
        };
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if !spec.scopes.is_empty() {
            form.append_pair("scope", &spec.scopes.join(" "));
        }
        if let Some(a) = &spec.audience {
            form.append_pair("audience", a);
        }
        let basic = match auth {
            ClientAuth::Basic => {
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let pair = format!("{}:{}", enc(&spec.client_id), enc(&spec.client_secret));
                Some(
                    format!("Basic {}", STANDARD.encode(pair))
                        .into_bytes()
                        .into(),
                )
            }
            ClientAuth::Post => {
                form.append_pair("client_id", &spec.client_id);
                form.append_pair("client_secret", &spec.client_secret);
                None
            }
        };
        Ok(TokenSource {
            target,
            authority,
            form: Bytes::from(form.finish()),
            basic,
            spec: spec.clone(),
            cached: ArcSwapOption::empty(),
            fetching: tokio::sync::Mutex::new(()),
            failed: Mutex::new(None),
            fetches: Default::default(),
        })
    }

    /// The settings this source was built from.
    pub fn spec(&self) -> &OAuth2Spec {
        &self.spec
    }

    /// Where tokens come from (for the API's early address check).
    pub fn token_url(&self) -> &str {
        &self.spec.token_url
    }

    /// Takes over `prev`'s token when both were built from the same settings.
    pub fn inherit(&self, prev: &TokenSource) {
        if self.spec == prev.spec {
            self.cached.store(prev.cached.load_full());
        }
    }

    /// Token requests made so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A token fresh enough to send, fetching one when needed; waits no longer than `deadline`.
    pub async fn token(&self, client: &Client, deadline: Instant) -> Result<Arc<Token>, String> {
        if let Some(t) = self.fresh(Instant::now()) {
            return Ok(t);
        }
        let Ok(_fetching) = tokio::time::timeout_at(deadline, self.fetching.lock()).await else {
            return Err("timed out waiting for the oauth2 token".into());
        };
        // Whoever held the lock may have fetched it, or failed just now.
        let now = Instant::now();
        if let Some(t) = self.fresh(now) {
            return Ok(t);
        }
        if let Some((at, e)) = &*lock(&self.failed)
            && now.duration_since(*at) < FAILURE_HOLD
        {
            return self.usable(now).ok_or_else(|| e.clone());
        }
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.fetch(client, deadline).await {
            Ok(t) => {
                let t = Arc::new(t);
                self.cached.store(Some(t.clone()));
                *lock(&self.failed) = None;
                Ok(t)
            }
            Err(e) => {
                let e = format!("oauth2 token from {}: {e}", self.authority);
                *lock(&self.failed) = Some((Instant::now(), e.clone()));
                // A refresh that fails early leaves the current token in use until it expires.
                self.usable(Instant::now()).ok_or(e)
            }
        }
    }

    /// Forgets `used` after the endpoint refused it (a later token stays).
    pub fn invalidate(&self, used: &Arc<Token>) {
        let cur = self.cached.load();
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, used)) {
            self.cached.store(None);
        }
    }

    fn fresh(&self, now: Instant) -> Option<Arc<Token>> {
        self.cached.load_full().filter(|t| now < t.refresh_at)
    }

    fn usable(&self, now: Instant) -> Option<Arc<Token>> {
        self.cached.load_full().filter(|t| now < t.expires_at)
    }

    async fn fetch(&self, client: &Client, deadline: Instant) -> Result<Token, String> {
        let asked = Instant::now();
        let headers = |h: &mut Vec<u8>| {
            h.extend_from_slice(
                b"content-type: application/x-www-form-urlencoded\r\naccept: application/json\r\n",
            );
            h.extend_from_slice(
                concat!("user-agent: hookline/", env!("CARGO_PKG_VERSION"), "\r\n").as_bytes(),
            );
            if let Some(b) = &self.basic {
                h.extend_from_slice(b"authorization: ");
                h.extend_from_slice(b);
                h.extend_from_slice(b"\r\n");
            }
        };
        let resp = client
            .post(&self.target, headers, &self.form, MAX_RESPONSE, deadline)
            .await
            .map_err(|e| match e {
                HttpError::TimedOut => "no response within the timeout".to_string(),
                HttpError::Refused(m) | HttpError::Failed(m) => m,
            })?;
        let body: Option<serde_json::Value> = serde_json::from_slice(&resp.excerpt).ok();
        let field = |k: &str| {
            body.as_ref()
                .and_then(|b| b.get(k))
                .and_then(|v| v.as_str())
        };
        if resp.status != 200 {
            // RFC 6749 §5.2: the `error` code is safe to show (a short ASCII word); the description
            // is the server's text and stays out.
            let code = field("error").filter(|c| {
                c.len() <= 64 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            });
            return Err(match code {
                Some(c) => format!("HTTP {} ({c})", resp.status),
                None => format!("HTTP {}", resp.status),
            });
        }
        if body.is_none() {
            return Err("the response is not JSON".into());
        }
        let token = field("access_token")
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or("the response has no usable access_token")?;
        if let Some(kind) = field("token_type")
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(format!("token_type {kind:?} is not Bearer"));
        }
        let lifetime = body
            .as_ref()
            .and_then(|b| b.get("expires_in"))
            .and_then(serde_json::Value::as_f64)
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| Duration::from_secs_f64(s.min(DEFAULT_LIFETIME.as_secs_f64() * 24.0)))
            .unwrap_or(DEFAULT_LIFETIME);
        Ok(Token {
            authorization: format!("Bearer {token}").into_bytes().into(),
            refresh_at: asked + refresh_after(lifetime),
            expires_at: asked + lifetime,
        })
    }
}

/// When a token of `lifetime` is refreshed: at 90 % of it, but never more than a minute early.
pub fn refresh_after(lifetime: Duration) -> Duration {
    let early = (lifetime / 10).min(Duration::from_secs(60));
    lifetime - early
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> OAuth2Spec {
        OAuth2Spec {
            token_url: "https://auth.example/token".into(),
            client_id: "hook line".into(),
            client_secret: "s3cr:et".into(),
            scopes: vec!["webhooks:write".into(), "b".into()],
            audience: Some("https://api.example".into()),
            client_auth: None,
        }
    }

    #[test]
    fn refresh_comes_before_expiry() {
        assert_eq!(
            refresh_after(Duration::from_secs(3600)),
            Duration::from_secs(3540)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(100)),
            Duration::from_secs(90)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(2)),
            Duration::from_millis(1800)
        );
    }

    #[test]
    fn request_form_and_client_authentication() {
        let s = TokenSource::new(&spec()).unwrap();
        assert_eq!(
            &s.form[..],
            b"grant_type=client_credentials&scope=webhooks%3Awrite+b&audience=https%3A%2F%2Fapi.example"
        );
        // RFC 6749 §2.3.1: id and secret are form-urlencoded before Basic encoding.
        let basic = String::from_utf8(s.basic.as_deref().unwrap().to_vec()).unwrap();
        let decoded = STANDARD
            .decode(basic.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(decoded, b"hook+line:s3cr%3Aet");
        let mut post = spec();
        post.client_auth = Some("post".into());
        let s = TokenSource::new(&post).unwrap();
        assert!(s.basic.is_none());
        assert!(
            std::str::from_utf8(&s.form)
                .unwrap()
                .ends_with("&client_id=hook+line&client_secret=s3cr%3Aet")
        );
        assert!(!format!("{s:?}").contains("s3cr"));
    }

    #[test]
    fn bad_settings_name_their_field() {
        type Mutation = fn(&mut OAuth2Spec);
        let cases: [(Mutation, &str); 6] = [
            (|s| s.token_url = "ftp://x/".into(), "oauth2.token_url"),
            (|s| s.token_url = "nope".into(), "oauth2.token_url"),
            (|s| s.client_id = String::new(), "oauth2.client_id"),
            (|s| s.client_secret = "a\nb".into(), "oauth2.client_secret"),
            (|s| s.scopes.push("has space".into()), "oauth2.scopes[2]"),
            (|s| s.client_auth = Some("jwt".into()), "oauth2.client_auth"),
        ];
        for (mutate, want) in cases {
            let mut s = spec();
            mutate(&mut s);
            let (field, _) = TokenSource::new(&s).unwrap_err();
            assert_eq!(field, want);
        }
    }
}
