//! A real OAuth2 token endpoint for the tests (client credentials grant, RFC 6749 §4.4): checks the
//! client's Basic credentials and the form, issues opaque tokens that expire after `expires_in`
//! seconds (enforced: [`TokenServer::accepts`] refuses an expired or revoked token), and counts requests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

pub const CLIENT_ID: &str = "hookline-client";
pub const CLIENT_SECRET: &str = "client-secret-b2F1dGgyLXNlY3JldA";

#[derive(Default)]
pub struct TokenState {
    requests: AtomicUsize,
    issued: AtomicUsize,
    expires_in: AtomicU64,
    /// Valid tokens and when each stops being valid.
    valid: Mutex<HashMap<String, Instant>>,
    /// Every token ever issued (the log-secrecy test looks for them).
    all: Mutex<Vec<String>>,
    /// The form of the last request.
    pub last_form: Mutex<String>,
}

impl TokenState {
    /// Whether `authorization` (`Bearer …`) carries a token that is issued, not revoked, not expired.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(token) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else {
            return false;
        };
        self.valid
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|until| Instant::now() < *until)
    }
}

pub struct TokenServer {
    pub addr: SocketAddr,
    pub state: Arc<TokenState>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenServer {
    /// A token server on a free port of 127.0.0.1 issuing tokens valid for `expires_in` seconds.
    pub async fn start(expires_in: u64) -> TokenServer {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(l, expires_in)
    }

    /// The same on a given port (to bring a "down" token endpoint up where hookline expects it).
    pub async fn start_on(port: u16, expires_in: u64) -> TokenServer {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        Self::serve(l, expires_in)
    }

    fn serve(l: tokio::net::TcpListener, expires_in: u64) -> TokenServer {
        let addr = l.local_addr().unwrap();
        let state = Arc::new(TokenState::default());
        state.expires_in.store(expires_in, Ordering::Relaxed);
        let app = axum::Router::new()
            .route("/token", axum::routing::post(issue))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        TokenServer { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Token requests answered so far (any outcome).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Lifetime of the tokens issued from now on.
    pub fn set_expires_in(&self, secs: u64) {
        self.state.expires_in.store(secs, Ordering::Relaxed);
    }

    /// Revokes every token issued so far.
    pub fn revoke_all(&self) {
        self.state.valid.lock().unwrap().clear();
    }

    /// Every token issued so far.
    pub fn issued(&self) -> Vec<String> {
        self.state.all.lock().unwrap().clone()
    }

    /// The `oauth2` object of a subscription using this server.
    pub fn subscription_settings(&self) -> serde_json::Value {
        serde_json::json!({
            "token_url": self.url(),
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "scopes": ["webhooks:write"],
            "audience": "https://receiver.test",
        })
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn issue(
    State(s): State<Arc<TokenState>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    use base64::Engine;
    s.requests.fetch_add(1, Ordering::Relaxed);
    let form = String::from_utf8_lossy(&body).into_owned();
    *s.last_form.lock().unwrap() = form.clone();
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == expected);
    if !authorized {
        return (
            StatusCode::UNAUTHORIZED,
            r#"{"error":"invalid_client"}"#.into(),
        );
    }
    if !form
        .split('&')
        .any(|p| p == "grant_type=client_credentials")
    {
        return (
            StatusCode::BAD_REQUEST,
            r#"{"error":"unsupported_grant_type"}"#.into(),
        );
    }
    let n = s.issued.fetch_add(1, Ordering::Relaxed);
    let token = format!("tok{n}-{}", super::rand_suffix());
    let secs = s.expires_in.load(Ordering::Relaxed);
    s.valid
        .lock()
        .unwrap()
        .insert(token.clone(), Instant::now() + Duration::from_secs(secs));
    s.all.lock().unwrap().push(token.clone());
    (
        StatusCode::OK,
        serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": secs})
            .to_string(),
    )
}
