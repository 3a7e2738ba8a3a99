//! The web console at `/console`: one HTML page, one script and one style sheet, embedded in the
//! binary (no CDN, no build step), that drive the `/v1` API from the browser.
//!
//! Sign-in exchanges a token (the admin token or a tenant token) for a session cookie that holds the
//! token itself: `HttpOnly` (page scripts cannot read it), `SameSite=Strict` (other sites' pages do not
//! send it), `Path=/`. Keeping the token in the cookie, not in a server-side session table, means every
//! instance behind a load balancer accepts the session, and a revoked or expired token ends it at once
//! (the API checks the token on every request, [`super::api`]).
//!
//! CSRF: a request authenticated by the cookie that changes state (anything but GET and HEAD) must carry
//! `X-CSRF-Token`, an HMAC of the session token that only the signed-in page learns (from the sign-in
//! answer or `GET /console/session`), and, when the browser sends `Origin`, it must be this server's
//! own. A bearer `Authorization` header is not ambient authority, so API clients need neither.
//!
//! Every console response carries a strict Content-Security-Policy (scripts and styles from this
//! origin only, no inline code, no framing).

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::api::{ApiState, Principal};

/// The session cookie's name.
pub const COOKIE: &str = "hookline_session";
/// The header that carries the CSRF token on state-changing requests.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a console session lasts (the token's own expiry still applies).
const SESSION_SECS: u64 = 12 * 3600;

const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");

/// No inline script or style, nothing from elsewhere, no framing, forms only to this origin.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes (not part of the `/v1` API document).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route(
            "/console",
            get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/app.js",
            get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/app.css",
            get(|| async { page(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/console/session",
            get(session).post(sign_in).delete(sign_out),
        )
        .with_state(state)
}

/// Bytes of the page, the script and the style sheet (reported in the notes).
pub fn weight() -> usize {
    INDEX_HTML.len() + APP_JS.len() + APP_CSS.len()
}

fn hardened(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    hardened(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// The CSRF token of a session: HMAC-SHA256 keyed by the session's token, so any instance can check it
/// and no other site can compute it.
pub fn csrf_token(session_token: &str) -> String {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(session_token.as_bytes())
        .unwrap_or_else(|_| {
            // HMAC takes keys of any length; this arm is never taken.
            <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(b"hookline").expect("key")
        });
    mac.update(b"hookline console csrf v1");
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// The session token from the request's cookie, if any.
pub fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Whether the request's `Origin`, when the browser sends one, is this server's own (`Host`).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|o| !host.is_empty() && o.eq_ignore_ascii_case(host))
}

/// Whether a cookie-authenticated request may change state: a matching `X-CSRF-Token` and, when the
/// browser names the page's origin, this server's own (`Host`). `Err` names what is wrong.
pub fn check_csrf(method: &Method, headers: &HeaderMap, session: &str) -> Result<(), &'static str> {
    if method == Method::GET || method == Method::HEAD {
        return Ok(());
    }
    if !same_origin(headers) {
        return Err("a request from another origin cannot use the console session");
    }
    let given = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if given.is_empty() {
        return Err("missing X-CSRF-Token (the console session needs it on every change)");
    }
    if bool::from(given.as_bytes().ct_eq(csrf_token(session).as_bytes())) {
        Ok(())
    } else {
        Err("wrong X-CSRF-Token")
    }
}

fn error(status: StatusCode, field: &str, message: &str) -> Response {
    hardened(
        (
            status,
            axum::Json(json!({"error": message, "field": field})),
        )
            .into_response(),
    )
}

fn who_json(who: &Principal, token: &str) -> Value {
    json!({
        "role": if who.tenant().is_some() { "tenant" } else { "admin" },
        "tenant": who.tenant(),
        "csrf_token": csrf_token(token),
    })
}

fn cookie(value: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("hookline_session=; Max-Age=0"))
}

/// `POST /console/session {"token": …}`: checks the token like the API does and sets the cookie.
async fn sign_in(State(s): State<ApiState>, headers: HeaderMap, body: Bytes) -> Response {
    // The sign-in form posts from this origin only.
    if !same_origin(&headers) {
        return error(
            StatusCode::FORBIDDEN,
            "origin",
            "sign in from the console's own page",
        );
    }
    let token = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => match m.get("token") {
            Some(Value::String(t)) if !t.trim().is_empty() => t.trim().to_string(),
            _ => return error(StatusCode::BAD_REQUEST, "token", "a token is required"),
        },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "body",
                "a JSON object {\"token\": …} is required",
            );
        }
    };
    // A token with characters a cookie cannot hold is no token of ours.
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=".contains(&b))
    {
        return error(StatusCode::UNAUTHORIZED, "token", "wrong token");
    }
    match s.principal(Some(&token)).await {
        Ok(who) => {
            tracing::info!(
                role = if who.tenant().is_some() {
                    "tenant"
                } else {
                    "admin"
                },
                "console sign-in"
            );
            let mut resp = hardened(axum::Json(who_json(&who, &token)).into_response());
            resp.headers_mut()
                .insert(header::SET_COOKIE, cookie(&token, SESSION_SECS));
            resp
        }
        Err(e) => hardened(e.into_response()),
    }
}

/// `GET /console/session`: who the cookie signs in as (and the CSRF token, for a reloaded page).
async fn session(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    let Some(token) = session_token(&headers) else {
        return error(StatusCode::UNAUTHORIZED, "session", "not signed in");
    };
    match s.principal(Some(&token)).await {
        Ok(who) => hardened(axum::Json(who_json(&who, &token)).into_response()),
        Err(e) => hardened(e.into_response()),
    }
}

/// `DELETE /console/session`: signs out (CSRF-checked like any change).
async fn sign_out(headers: HeaderMap) -> Response {
    if let Some(token) = session_token(&headers)
        && let Err(m) = check_csrf(&Method::DELETE, &headers, &token)
    {
        return error(StatusCode::FORBIDDEN, CSRF_HEADER, m);
    }
    let mut resp = hardened(StatusCode::NO_CONTENT.into_response());
    resp.headers_mut().insert(header::SET_COOKIE, cookie("", 0));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=1; hookline_session=hlt_x; b=2")]);
        assert_eq!(session_token(&h).as_deref(), Some("hlt_x"));
        assert_eq!(
            session_token(&headers(&[("cookie", "hookline_session=")])),
            None
        );
        assert_eq!(session_token(&headers(&[("cookie", "other=1")])), None);
    }

    #[test]
    fn changes_need_the_csrf_token_and_the_own_origin() {
        let t = "hlt_abc";
        let good = csrf_token(t);
        assert_ne!(good, csrf_token("hlt_abd"), "bound to the session");
        let ok = headers(&[("host", "127.0.0.1:8080"), ("x-csrf-token", &good)]);
        assert!(check_csrf(&Method::POST, &ok, t).is_ok());
        assert!(
            check_csrf(&Method::GET, &HeaderMap::new(), t).is_ok(),
            "reads need none"
        );
        let none = headers(&[("host", "127.0.0.1:8080")]);
        assert!(
            check_csrf(&Method::POST, &none, t)
                .unwrap_err()
                .contains("missing")
        );
        let wrong = headers(&[("host", "127.0.0.1:8080"), ("x-csrf-token", "nope")]);
        assert!(
            check_csrf(&Method::DELETE, &wrong, t)
                .unwrap_err()
                .contains("wrong")
        );
        let foreign = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://evil.example"),
            ("x-csrf-token", &good),
        ]);
        assert!(
            check_csrf(&Method::PATCH, &foreign, t)
                .unwrap_err()
                .contains("origin")
        );
        let own = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
            ("x-csrf-token", &good),
        ]);
        assert!(check_csrf(&Method::PATCH, &own, t).is_ok());
    }
}
