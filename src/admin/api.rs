//! The subscription API (DESIGN §11), described by `schemas/openapi.yaml`.
//!
//! Every route is in one table ([`table`]); the router is built from it and a test compares it with the
//! OpenAPI document, so the two cannot drift apart. Every `/v1` route requires `Authorization: Bearer
//! <token>`: the admin token (`admin.token`, compared in constant time) or a tenant-scoped token
//! (`POST /v1/tokens`, stored as its SHA-256 and read from the store on every request, so a revocation
//! applies at once on every instance). A tenant token is a [`Principal::Tenant`]: every handler scopes
//! what it reads and writes to that tenant, answers 404 for another tenant's ids (their existence is
//! not disclosed) and 403 for the admin-only routes (tokens). Bodies are parsed by hand rather than by a derived
//! deserializer so that every error names its field: `{"error": "...", "field": "event_types[1]"}`.
//! Syntax and type errors are 400, values that parse but are not acceptable are 422, and nothing is
//! written unless the whole request is valid.
//!
//! Secrets and signing keys are returned only when they are created (POST, rotate-secret,
//! rotate-signing-key); reads show how many secrets there are and the signing keys' public halves
//! (`whpk_…`). The OAuth2 client secret, the client certificate's key and `secret_headers` values are
//! write-only: reads show the OAuth2 settings without the secret and the secret headers' names.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, patch, post};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::now_ms;
use crate::config::Config;
use crate::deliver::Deliverer;
use crate::deliver::outcome::{AttemptResult, classify};
use crate::deliver::policy::AddressPolicy;
use crate::dispatch::log_result;
use crate::matching::Subscription;
use crate::matching::subscription::retry_schedule;
use crate::model::{
    ApiToken, Ed25519Key, Encoding, Event, OAuth2Spec, OnDeadLetter, OrderingMode, Origin,
    RetiredSecret, SigningKey, SubscriptionSpec, api_token_hash, generate_secret,
    generate_signing_key, parse_rfc3339_ms, rfc3339_ms, webhook_id,
};
use crate::registry::{Registry, WriteError};
use crate::replay::{self, FilterArgs, ReplayRequest, Summary};
use crate::store::{AttemptRecord, StoreError};

mod parked;
pub use parked::OrderApi;

#[derive(Clone)]
pub struct ApiState {
    pub registry: Arc<Registry>,
    pub deliverer: Arc<Deliverer>,
    pub policy: AddressPolicy,
    /// SHA-256 of `admin.token`; `None`: only tenant tokens are accepted.
    token: Option<[u8; 32]>,
    pub rotation_grace: Duration,
    /// For the dead-letter routes (Kafka settings, topics, tiers).
    config: Arc<Config>,
    /// Replays started through the API on this instance, by id.
    replays: Arc<std::sync::Mutex<HashMap<Uuid, ReplayJob>>>,
    /// Fires at shutdown: running replays stop and commit what they finished.
    stop: CancellationToken,
    /// Dead-letter listings reading at once (each reads the topic on a blocking-pool thread).
    listings: Arc<tokio::sync::Semaphore>,
    /// Parked keys of ordered subscriptions (`None` in tools without a source).
    order: Option<OrderApi>,
}

/// A replay started by `POST /v1/dead-letters/replay`, as `GET /v1/replays/{id}` shows it.
#[derive(Debug, Clone)]
struct ReplayJob {
    tenant: Option<String>,
    group: String,
    state: &'static str,
    error: Option<String>,
    summary: Summary,
    started_at: String,
}

impl ApiState {
    pub fn new(
        registry: Arc<Registry>,
        deliverer: Arc<Deliverer>,
        policy: AddressPolicy,
        config: Arc<Config>,
        stop: CancellationToken,
    ) -> ApiState {
        ApiState {
            registry,
            deliverer,
            policy,
            token: config
                .admin
                .token
                .as_deref()
                .map(|t| Sha256::digest(t.as_bytes()).into()),
            rotation_grace: config.admin.rotation_grace,
            config,
            replays: Arc::default(),
            stop,
            listings: Arc::new(tokio::sync::Semaphore::new(MAX_LISTINGS)),
            order: None,
        }
    }

    /// The same, serving the parked keys of the partitions `order.source` owns.
    pub fn with_order(mut self, order: OrderApi) -> ApiState {
        self.order = Some(order);
        self
    }
}

/// Who a request is from, decided by [`authenticate`] and handed to every handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The admin token: everything.
    Admin,
    /// A tenant-scoped token: only this tenant's subscriptions, attempts, dead letters and replays.
    Tenant { tenant: String, token: Uuid },
}

impl Principal {
    /// The tenant a request is limited to (`None` for the admin).
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Principal::Admin => None,
            Principal::Tenant { tenant, .. } => Some(tenant),
        }
    }

    /// Whether this principal may see a subscription of `tenant`.
    pub fn sees(&self, tenant: Option<&str>) -> bool {
        match self.tenant() {
            None => true,
            Some(mine) => tenant == Some(mine),
        }
    }

    /// 403 unless this is the admin.
    fn admin_only(&self) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Tenant { .. } => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                Some("authorization"),
                "this route needs the admin token",
            )),
        }
    }
}

/// Every API route: method, path (OpenAPI syntax), handler.
pub fn table() -> Vec<(Method, &'static str, MethodRouter<ApiState>)> {
    vec![
        (Method::GET, "/v1/subscriptions", get(list)),
        (Method::POST, "/v1/subscriptions", post(create)),
        (Method::GET, "/v1/subscriptions/{id}", get(read)),
        (Method::PATCH, "/v1/subscriptions/{id}", patch(update)),
        (Method::DELETE, "/v1/subscriptions/{id}", delete(remove)),
        (
            Method::POST,
            "/v1/subscriptions/{id}/rotate-secret",
            post(rotate),
        ),
        (
            Method::POST,
            "/v1/subscriptions/{id}/rotate-signing-key",
            post(rotate_signing_key),
        ),
        (Method::POST, "/v1/subscriptions/{id}/test", post(test)),
        (Method::GET, "/v1/subscriptions/{id}/health", get(health)),
        (
            Method::GET,
            "/v1/subscriptions/{id}/parked-keys",
            get(parked::list),
        ),
        (
            Method::POST,
            "/v1/subscriptions/{id}/parked-keys/release",
            post(parked::release),
        ),
        (
            Method::POST,
            "/v1/subscriptions/{id}/parked-keys/skip",
            post(parked::skip),
        ),
        (
            Method::GET,
            "/v1/subscriptions/{id}/attempts",
            get(attempts),
        ),
        (Method::GET, "/v1/dead-letters", get(dead_letters)),
        (Method::POST, "/v1/dead-letters/replay", post(start_replay)),
        (Method::GET, "/v1/replays/{id}", get(replay_status)),
        (Method::GET, "/v1/tokens", get(list_tokens)),
        (Method::POST, "/v1/tokens", post(create_token)),
        (Method::DELETE, "/v1/tokens/{id}", delete(revoke_token)),
    ]
}

pub fn router(state: ApiState) -> Router {
    let mut r = Router::new();
    for (_, path, handler) in table() {
        r = r.route(path, handler);
    }
    r.route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, None, "no such route") })
        .with_state(state)
}

/// A JSON error naming the field it is about.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    field: Option<String>,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            field: field.map(String::from),
            message: message.into(),
        }
    }
    fn bad(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, Some(field), message)
    }
    fn invalid(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, Some(field), message)
    }
    fn not_found(id: Uuid) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no subscription {id}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            axum::Json(json!({"error": self.message, "field": self.field})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, None, e.to_string())
            }
            StoreError::ReadOnly(_) => {
                ApiError::new(StatusCode::CONFLICT, Some("store.kind"), e.to_string())
            }
            StoreError::BadCursor => ApiError::bad("cursor", "is not a cursor this API returned"),
            StoreError::Invalid { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string())
            }
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        match e {
            WriteError::Store(s) => s.into(),
            WriteError::Invalid(l) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, l.to_string())
            }
        }
    }
}

type ApiResult = Result<Response, ApiError>;

async fn authenticate(State(s): State<ApiState>, mut req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    // Without a bearer token, the console's session cookie: ambient authority, so changes must also
    // prove they come from the console page (super::console).
    let cookie = match &bearer {
        Some(_) => None,
        None => super::console::session_token(req.headers()),
    };
    if let Some(session) = &cookie
        && let Err(m) = super::console::check_csrf(req.method(), req.headers(), session)
    {
        return ApiError::new(StatusCode::FORBIDDEN, Some(super::console::CSRF_HEADER), m)
            .into_response();
    }
    match s.principal(bearer.as_deref().or(cookie.as_deref())).await {
        Ok(who) => {
            req.extensions_mut().insert(who);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

impl ApiState {
    /// The principal a bearer token stands for: the admin token, or a live tenant token in the store.
    pub async fn principal(&self, given: Option<&str>) -> Result<Principal, ApiError> {
        let unauthorized =
            |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, Some("authorization"), m);
        let Some(given) = given else {
            return Err(unauthorized(
                "missing \"Authorization: Bearer <token>\" (the admin token or a tenant token)",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        if let Some(expected) = self.token
            && bool::from(digest.as_slice().ct_eq(&expected))
        {
            return Ok(Principal::Admin);
        }
        if !given.starts_with("hlt_") {
            return Err(unauthorized(if self.token.is_some() {
                "wrong bearer token"
            } else {
                "admin.token is not set: only tenant tokens (hlt_…) are accepted"
            }));
        }
        let hash = api_token_hash(given);
        let found = self.registry.store.token_by_hash(&hash).await?;
        match found {
            // The store found it by hash; the comparison is repeated in constant time anyway.
            Some(t) if bool::from(t.hash.as_bytes().ct_eq(hash.as_bytes())) => {
                if t.expired(now_ms()) {
                    Err(unauthorized("token expired"))
                } else {
                    Ok(Principal::Tenant {
                        tenant: t.tenant,
                        token: t.id,
                    })
                }
            }
            _ => Err(unauthorized("unknown or revoked token")),
        }
    }
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::bad("id", format!("{raw:?} is not a UUID")))
}

/// The listing query parameters: only `limit` (1..=1000, default `default_limit`) and `cursor`.
fn query_params(
    q: &BTreeMap<String, String>,
    default_limit: u32,
) -> Result<(u32, Option<String>), ApiError> {
    for k in q.keys() {
        if k != "limit" && k != "cursor" {
            return Err(ApiError::bad(k, "unknown query parameter"));
        }
    }
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| ApiError::bad("limit", "must be an integer in 1..=1000"))?,
        None => default_limit,
    };
    Ok((limit, q.get("cursor").cloned()))
}

/// The body as a JSON object (`allow_empty`: an empty body is `{}`).
fn body_object(body: &Bytes, allow_empty: bool) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        if allow_empty {
            return Ok(Map::new());
        }
        return Err(ApiError::bad("body", "a JSON object is required"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad("body", "must be a JSON object")),
        Err(e) => Err(ApiError::bad("body", format!("malformed JSON: {e}"))),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn want_string(v: Value, field: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(ApiError::bad(
            field,
            format!("must be a string, got {}", json_type(&other)),
        )),
    }
}

fn want_strings(v: Value, field: &str) -> Result<Vec<String>, ApiError> {
    match v {
        Value::Array(a) => a
            .into_iter()
            .enumerate()
            .map(|(i, x)| want_string(x, &format!("{field}[{i}]")))
            .collect(),
        other => Err(ApiError::bad(
            field,
            format!("must be an array of strings, got {}", json_type(&other)),
        )),
    }
}

fn want_uint(v: &Value, field: &str, max: u64) -> Result<u64, ApiError> {
    v.as_u64()
        .filter(|n| *n <= max)
        .ok_or_else(|| ApiError::bad(field, format!("must be an integer in 0..={max}")))
}

/// Applies the fields of a POST or PATCH body to `spec`. `null` clears an optional field.
fn apply(
    spec: &mut SubscriptionSpec,
    body: Map<String, Value>,
    creating: bool,
) -> Result<(), ApiError> {
    for (k, v) in body {
        let f = k.as_str();
        let null = v.is_null();
        match f {
            "url" => spec.url = want_string(v, f)?,
            "event_types" => spec.event_types = want_strings(v, f)?,
            "tenant" if null => spec.tenant = None,
            "tenant" => spec.tenant = Some(want_string(v, f)?),
            "filter" if null => spec.filter = None,
            "filter" => match v {
                Value::Object(m) => spec.filter = Some(m.into_iter().collect()),
                other => {
                    return Err(ApiError::bad(
                        f,
                        format!("must be an object, got {}", json_type(&other)),
                    ));
                }
            },
            "secrets" if creating => spec.secrets = want_strings(v, f)?,
            "secrets" => {
                return Err(ApiError::bad(
                    f,
                    "cannot be changed by PATCH; use POST /v1/subscriptions/{id}/rotate-secret",
                ));
            }
            "signing_keys" if creating => spec.signing_keys = want_strings(v, f)?,
            "generate_signing_key" if creating => {
                if v.as_bool()
                    .ok_or_else(|| ApiError::bad(f, "must be true or false"))?
                {
                    spec.signing_keys.push(
                        generate_signing_key().map_err(|m| {
                            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, m)
                        })?,
                    );
                }
            }
            "signing_keys" | "generate_signing_key" => {
                return Err(ApiError::bad(
                    f,
                    "cannot be changed by PATCH; use POST /v1/subscriptions/{id}/rotate-signing-key",
                ));
            }
            "oauth2" if null => spec.oauth2 = None,
            "oauth2" => spec.oauth2 = Some(oauth2_of(v, spec.oauth2.take())?),
            "retry_tiers" if null => spec.retry_tiers = None,
            "retry_tiers" => spec.retry_tiers = Some(want_strings(v, f)?),
            "max_attempts" if null => spec.max_attempts = None,
            "max_attempts" => spec.max_attempts = Some(want_uint(&v, f, u32::MAX as u64)? as u32),
            "ordering" if null => spec.ordering = OrderingMode::None,
            "ordering" => {
                let s = want_string(v, f)?;
                spec.ordering = OrderingMode::parse(&s)
                    .ok_or_else(|| ApiError::bad(f, format!("{s:?} is not none or key")))?;
            }
            "ordering_key" if null => spec.ordering_key = None,
            "ordering_key" => spec.ordering_key = Some(want_string(v, f)?),
            "on_dead_letter" if null => spec.on_dead_letter = OnDeadLetter::Continue,
            "on_dead_letter" => {
                let s = want_string(v, f)?;
                spec.on_dead_letter = OnDeadLetter::parse(&s)
                    .ok_or_else(|| ApiError::bad(f, format!("{s:?} is not continue or hold")))?;
            }
            // Write-only: replaced as a whole, cleared with null.
            "secret_headers" if null => spec.secret_headers.clear(),
            "secret_headers" => spec.secret_headers = string_map(v, f)?,
            "enabled" => {
                spec.enabled = v
                    .as_bool()
                    .ok_or_else(|| ApiError::bad(f, "must be true or false"))?;
                if spec.enabled {
                    // Enabled again: why hookline had disabled it no longer applies.
                    spec.disabled_reason = None;
                    spec.disabled_at = None;
                }
            }
            // null restores the default (on).
            "adaptive_concurrency" if null => spec.adaptive_concurrency = true,
            "adaptive_concurrency" => {
                spec.adaptive_concurrency = v
                    .as_bool()
                    .ok_or_else(|| ApiError::bad(f, "must be true or false"))?
            }
            "rate_limit_per_sec" | "burst" | "max_in_flight" => {
                let n = if null {
                    None
                } else {
                    Some(want_uint(&v, f, u32::MAX as u64)? as u32)
                };
                match f {
                    "rate_limit_per_sec" => spec.rate_limit_per_sec = n,
                    "burst" => spec.burst = n,
                    _ => spec.max_in_flight = n,
                }
            }
            "timeout_ms" if null => spec.timeout_ms = None,
            "timeout_ms" => spec.timeout_ms = Some(want_uint(&v, f, u64::MAX >> 1)?),
            // Write-only: set (both, checked together by prepare) or cleared with null.
            "tls_client_cert" if null => spec.tls_client_cert = None,
            "tls_client_cert" => spec.tls_client_cert = Some(want_string(v, f)?),
            "tls_client_key" if null => spec.tls_client_key = None,
            "tls_client_key" => spec.tls_client_key = Some(want_string(v, f)?),
            "headers" if null => spec.headers.clear(),
            "headers" => spec.headers = string_map(v, f)?,
            "id"
            | "created_at"
            | "updated_at"
            | "retired_secrets"
            | "secret_count"
            | "public_keys"
            | "retired_signing_keys"
            | "secret_header_names"
            | "retry_schedule"
            | "disabled_reason"
            | "disabled_at"
            | "tls_client_cert_expires_at" => {
                return Err(ApiError::bad(f, "is read-only"));
            }
            _ => return Err(ApiError::bad(f, "unknown field")),
        }
    }
    Ok(())
}

/// An object of strings (`headers`, `secret_headers`); errors name `field.name`.
fn string_map(v: Value, field: &str) -> Result<BTreeMap<String, String>, ApiError> {
    match v {
        Value::Object(m) => m
            .into_iter()
            .map(|(name, val)| {
                let f = format!("{field}.{name}");
                want_string(val, &f).map(|s| (name, s))
            })
            .collect(),
        other => Err(ApiError::bad(
            field,
            format!("must be an object of strings, got {}", json_type(&other)),
        )),
    }
}

/// The `oauth2` object. `client_secret` is write-only: a PATCH that leaves it out keeps the stored one.
fn oauth2_of(v: Value, old: Option<OAuth2Spec>) -> Result<OAuth2Spec, ApiError> {
    let Value::Object(m) = v else {
        return Err(ApiError::bad(
            "oauth2",
            format!("must be an object or null, got {}", json_type(&v)),
        ));
    };
    let (mut token_url, mut client_id, mut client_secret) = (None, None, None);
    let mut scopes = Vec::new();
    let (mut audience, mut client_auth) = (None, None);
    for (k, v) in m {
        let f = format!("oauth2.{k}");
        let null = v.is_null();
        match k.as_str() {
            "token_url" => token_url = Some(want_string(v, &f)?),
            "client_id" => client_id = Some(want_string(v, &f)?),
            "client_secret" => client_secret = Some(want_string(v, &f)?),
            "scopes" if null => {}
            "scopes" => scopes = want_strings(v, &f)?,
            "audience" if null => {}
            "audience" => audience = Some(want_string(v, &f)?),
            "client_auth" if null => {}
            "client_auth" => client_auth = Some(want_string(v, &f)?),
            _ => return Err(ApiError::bad(&f, "unknown field")),
        }
    }
    let client_secret = client_secret
        .or(old.map(|o| o.client_secret))
        .ok_or_else(|| ApiError::bad("oauth2.client_secret", "is required"))?;
    Ok(OAuth2Spec {
        token_url: token_url.ok_or_else(|| ApiError::bad("oauth2.token_url", "is required"))?,
        client_id: client_id.ok_or_else(|| ApiError::bad("oauth2.client_id", "is required"))?,
        client_secret,
        scopes,
        audience,
        client_auth,
    })
}

impl ApiState {
    /// Checks a spec the way the cache will prepare it, plus the address policy for literal and
    /// resolvable hosts (delivery checks every connection again; this is early feedback).
    async fn validate(&self, spec: &SubscriptionSpec) -> Result<(), ApiError> {
        let sub = Subscription::prepare(spec.clone(), self.registry.cache.defaults())
            .map_err(|e| ApiError::invalid(&e.field, e.message))?;
        self.check_host(&sub.url, "url").await?;
        if let Some(o) = &sub.recipient.oauth
            && let Ok(u) = url::Url::parse(o.token_url())
        {
            self.check_host(&u, "oauth2.token_url").await?;
        }
        Ok(())
    }

    /// The address policy for a URL's literal or resolvable host.
    async fn check_host(&self, url: &url::Url, field: &str) -> Result<(), ApiError> {
        let host = match url.host() {
            Some(url::Host::Ipv4(a)) => vec![IpAddr::V4(a)],
            Some(url::Host::Ipv6(a)) => vec![IpAddr::V6(a)],
            Some(url::Host::Domain(d)) => {
                // A name that does not resolve (yet) is accepted; delivery will retry it.
                match tokio::time::timeout(Duration::from_secs(1), self.deliverer.resolve(d)).await
                {
                    Ok(Ok(addrs)) => addrs.to_vec(),
                    _ => Vec::new(),
                }
            }
            None => Vec::new(),
        };
        for ip in host {
            self.policy
                .check(ip)
                .map_err(|e| ApiError::invalid(field, e.to_string()))?;
        }
        Ok(())
    }

    /// The subscription `id` if `who` may see it; another tenant's is "not found", like a missing one.
    async fn existing(&self, who: &Principal, id: Uuid) -> Result<SubscriptionSpec, ApiError> {
        self.registry
            .store
            .get(id)
            .await?
            .filter(|spec| who.sees(spec.tenant.as_deref()))
            .ok_or(ApiError::not_found(id))
    }
}

/// `notAfter` (unix seconds) of a spec's client certificate.
fn cert_expiry(spec: &SubscriptionSpec) -> Option<i64> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = spec.tls_client_cert.as_deref()?;
    let leaf = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    crate::deliver::identity::not_after(&leaf)
}

/// `whpk_…` of a `whsk_…` key (`None` for a key that does not parse, which prepare refuses anyway).
fn public_key(key: &str) -> Option<String> {
    Ed25519Key::parse(key).ok().map(|k| k.public_key())
}

/// A subscription as the API shows it: everything but the secrets. `tiers` are `retry.tiers`, for the
/// effective retry schedule.
fn view(spec: &SubscriptionSpec, tiers: &[(Box<str>, Duration)]) -> Map<String, Value> {
    let now = now_ms();
    let live = |r: &&RetiredSecret| parse_rfc3339_ms(&r.expires_at).is_ok_and(|t| t > now);
    let retired: Vec<Value> = spec
        .retired_secrets
        .iter()
        .filter(live)
        .map(|r| json!({"expires_at": r.expires_at}))
        .collect();
    let retired_signing: Vec<Value> = spec
        .retired_signing_keys
        .iter()
        .filter(live)
        .map(|r| json!({"public_key": public_key(&r.secret), "expires_at": r.expires_at}))
        .collect();
    let schedule: Option<Vec<&str>> = retry_schedule(spec, tiers).ok().map(|s| {
        s.iter()
            .filter_map(|&i| tiers.get(i))
            .map(|(n, _)| n.as_ref())
            .collect()
    });
    let v = json!({
        "id": spec.id,
        "tenant": spec.tenant,
        "url": spec.url,
        "event_types": spec.event_types,
        "filter": spec.filter,
        "enabled": spec.enabled,
        // Why and when hookline disabled it (410 Gone: "gone"; failing for disable_after: "failing").
        "disabled_reason": spec.disabled_reason,
        "disabled_at": spec.disabled_at,
        "rate_limit_per_sec": spec.rate_limit_per_sec,
        "burst": spec.burst,
        "max_in_flight": spec.max_in_flight,
        "adaptive_concurrency": spec.adaptive_concurrency,
        "timeout_ms": spec.timeout_ms,
        "headers": spec.headers,
        "secret_count": spec.secrets.len(),
        "retired_secrets": retired,
        // Receivers verify `v1a` signatures with these; the secret halves are never shown.
        "public_keys": spec.signing_keys.iter().filter_map(|k| public_key(k)).collect::<Vec<_>>(),
        "retired_signing_keys": retired_signing,
        "secret_header_names": spec.secret_headers.keys().collect::<Vec<_>>(),
        "oauth2": spec.oauth2.as_ref().map(|o| json!({
            "token_url": o.token_url,
            "client_id": o.client_id,
            "scopes": o.scopes,
            "audience": o.audience,
            "client_auth": o.client_auth.as_deref().unwrap_or("basic"),
        })),
        "retry_tiers": spec.retry_tiers,
        "max_attempts": spec.max_attempts,
        "ordering": spec.ordering.as_str(),
        "ordering_key": match spec.ordering {
            OrderingMode::Key => Some(spec.ordering_key.as_deref().unwrap_or("record_key")),
            OrderingMode::None => None,
        },
        "on_dead_letter": spec.on_dead_letter.as_str(),
        // The tiers a failed delivery goes through, in order (null if retry.tiers no longer has them).
        "retry_schedule": schedule,
        // The certificate and key are never shown; when the certificate expires is.
        "tls_client_cert_expires_at": cert_expiry(spec).map(|s| rfc3339_ms(s.max(0) as u64 * 1000)),
        "created_at": spec.created_at,
        "updated_at": spec.updated_at,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// A tenant token's subscriptions belong to its tenant: a new one gets it, and `tenant` cannot be
/// set to another (`before`: the stored tenant, for an update).
fn confine(
    who: &Principal,
    spec: &mut SubscriptionSpec,
    before: Option<&Option<String>>,
) -> Result<(), ApiError> {
    let Some(mine) = who.tenant() else {
        return Ok(());
    };
    let given_other = spec.tenant.as_deref().is_some_and(|t| t != mine);
    let cleared = before.is_some() && spec.tenant.is_none();
    if given_other || cleared {
        return Err(ApiError::invalid(
            "tenant",
            format!("a token of tenant {mine:?} manages only that tenant's subscriptions"),
        ));
    }
    spec.tenant = Some(mine.to_string());
    Ok(())
}

fn ok(status: StatusCode, body: impl serde::Serialize) -> Response {
    (status, axum::Json(body)).into_response()
}

async fn list(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<BTreeMap<String, String>>,
) -> ApiResult {
    let (limit, cursor) = query_params(&q, 100)?;
    let tiers = &s.registry.cache.defaults().tiers;
    // A tenant's page is the store's pages filtered to its subscriptions: whole store pages are
    // taken while they fit in `limit`, and the cursor is the one of the first page not taken (store
    // cursors are opaque), so nothing is skipped. A page may then hold fewer than `limit` items;
    // `next_cursor` is null only at the end.
    let mut items = Vec::new();
    let mut cursor = cursor;
    let mut scanned = 0usize;
    loop {
        let page = s.registry.store.page(cursor.as_deref(), limit).await?;
        let mine: Vec<_> = page
            .items
            .iter()
            .filter(|x| who.sees(x.tenant.as_deref()))
            .map(|x| view(x, tiers))
            .collect();
        if !items.is_empty() && items.len() + mine.len() > limit as usize {
            break;
        }
        items.extend(mine);
        scanned += page.items.len();
        cursor = page.next;
        // Bounded work per request: at most ten store pages' worth of subscriptions.
        if cursor.is_none() || items.len() >= limit as usize || scanned >= 10 * limit as usize {
            break;
        }
    }
    Ok(ok(
        StatusCode::OK,
        json!({"items": items, "next_cursor": cursor}),
    ))
}

async fn create(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let fields = body_object(&body, false)?;
    for required in ["url", "event_types"] {
        if !fields.contains_key(required) {
            return Err(ApiError::bad(required, "is required"));
        }
    }
    let mut spec = SubscriptionSpec::new(String::new(), Vec::new(), Vec::new(), now_ms());
    let given_secrets = fields.contains_key("secrets");
    apply(&mut spec, fields, true)?;
    confine(&who, &mut spec, None)?;
    // One HMAC secret is made unless the request gave secrets or asked for Ed25519 keys instead.
    if !given_secrets && spec.signing_keys.is_empty() {
        spec.secrets = vec![
            generate_secret()
                .map_err(|m| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, m))?,
        ];
    }
    s.validate(&spec).await?;
    s.registry.put(spec.clone()).await?;
    tracing::info!(subscription = %spec.id, "subscription created");
    let mut body = view(&spec, &s.registry.cache.defaults().tiers);
    body.insert("secrets".into(), json!(spec.secrets));
    body.insert("signing_keys".into(), json!(spec.signing_keys));
    let mut resp = ok(StatusCode::CREATED, body);
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/subscriptions/{}", spec.id)) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(resp)
}

async fn read(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    let spec = s.existing(&who, parse_id(&id)?).await?;
    Ok(ok(
        StatusCode::OK,
        view(&spec, &s.registry.cache.defaults().tiers),
    ))
}

async fn update(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let id = parse_id(&id)?;
    let fields = body_object(&body, false)?;
    let mut spec = s.existing(&who, id).await?;
    let before = spec.clone();
    apply(&mut spec, fields, false)?;
    confine(&who, &mut spec, Some(&before.tenant))?;
    s.validate(&spec).await?;
    spec.updated_at = Some(rfc3339_ms(now_ms()));
    s.registry.put(spec.clone()).await?;
    tracing::info!(subscription = %id, "subscription updated");
    Ok(ok(
        StatusCode::OK,
        view(&spec, &s.registry.cache.defaults().tiers),
    ))
}

async fn remove(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    let id = parse_id(&id)?;
    if who.tenant().is_some() {
        s.existing(&who, id).await?;
    }
    if !s.registry.delete(id).await? {
        return Err(ApiError::not_found(id));
    }
    tracing::info!(subscription = %id, "subscription deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Retired secrets kept at most (the oldest beyond this are dropped at the next rotation).
const MAX_RETIRED: usize = 10;

/// The `grace_seconds` and new value of a rotation request; `check` validates a given value.
fn rotation_request(
    s: &ApiState,
    body: &Bytes,
    value_field: &str,
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<(Duration, Option<String>), ApiError> {
    let fields = body_object(body, true)?;
    let mut grace = s.rotation_grace;
    let mut new_value = None;
    for (k, v) in fields {
        match k.as_str() {
            "grace_seconds" => {
                grace = Duration::from_secs(want_uint(&v, &k, 30 * 86_400)?);
            }
            f if f == value_field => {
                let value = want_string(v, &k)?;
                check(&value).map_err(|m| ApiError::invalid(value_field, m))?;
                new_value = Some(value);
            }
            _ => return Err(ApiError::bad(&k, "unknown field")),
        }
    }
    Ok((grace, new_value))
}

/// Makes `new` the only current value of `current`; the old ones keep signing for `grace` in
/// `retired` (expired ones are dropped, and the oldest beyond [`MAX_RETIRED`]).
fn rotate_into(
    current: &mut Vec<String>,
    retired: &mut Vec<RetiredSecret>,
    new: &str,
    grace: Duration,
    now: u64,
) {
    let until = rfc3339_ms(now + grace.as_millis() as u64);
    retired.retain(|r| parse_rfc3339_ms(&r.expires_at).is_ok_and(|t| t > now));
    if !grace.is_zero() {
        retired.extend(
            current
                .drain(..)
                .filter(|old| old != new)
                .map(|old| RetiredSecret {
                    secret: old,
                    expires_at: until.clone(),
                }),
        );
    }
    let excess = retired.len().saturating_sub(MAX_RETIRED);
    retired.drain(..excess);
    *current = vec![new.to_string()];
}

async fn rotate(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let id = parse_id(&id)?;
    let (grace, given) =
        rotation_request(&s, &body, "secret", |v| SigningKey::parse(v).map(|_| ()))?;
    let mut spec = s.existing(&who, id).await?;
    let secret = match given {
        Some(x) => x,
        None => generate_secret()
            .map_err(|m| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, m))?,
    };
    let now = now_ms();
    rotate_into(
        &mut spec.secrets,
        &mut spec.retired_secrets,
        &secret,
        grace,
        now,
    );
    spec.updated_at = Some(rfc3339_ms(now));
    s.registry.put(spec.clone()).await?;
    tracing::info!(subscription = %id, grace_seconds = grace.as_secs(), "signing secret rotated");
    let mut body = view(&spec, &s.registry.cache.defaults().tiers);
    body.insert("secret".into(), json!(secret));
    Ok(ok(StatusCode::OK, body))
}

/// Replaces the Ed25519 signing key (or adds the first one); the old one keeps signing `v1a` for the
/// grace period, so receivers can add the new public key before the old one stops.
async fn rotate_signing_key(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let id = parse_id(&id)?;
    let (grace, given) = rotation_request(&s, &body, "signing_key", |v| {
        Ed25519Key::parse(v).map(|_| ())
    })?;
    let mut spec = s.existing(&who, id).await?;
    let key = match given {
        Some(x) => x,
        None => generate_signing_key()
            .map_err(|m| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, m))?,
    };
    let now = now_ms();
    rotate_into(
        &mut spec.signing_keys,
        &mut spec.retired_signing_keys,
        &key,
        grace,
        now,
    );
    spec.updated_at = Some(rfc3339_ms(now));
    s.registry.put(spec.clone()).await?;
    tracing::info!(subscription = %id, grace_seconds = grace.as_secs(), "signing key rotated");
    let mut body = view(&spec, &s.registry.cache.defaults().tiers);
    body.insert("public_key".into(), json!(public_key(&key)));
    body.insert("signing_key".into(), json!(key));
    Ok(ok(StatusCode::OK, body))
}

/// Bytes of the receiver's response shown by a test delivery.
const EXCERPT_BYTES: usize = 512;

async fn test(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let id = parse_id(&id)?;
    let fields = body_object(&body, true)?;
    let mut event_type = "hookline.test".to_string();
    let mut data = json!({"message": "test delivery from hookline"});
    for (k, v) in fields {
        match k.as_str() {
            "event_type" => event_type = want_string(v, &k)?,
            "data" => data = v,
            _ => return Err(ApiError::bad(&k, "unknown field")),
        }
    }
    let spec = s.existing(&who, id).await?;
    let sub = Subscription::prepare(spec, s.registry.cache.defaults())
        .map_err(|e| ApiError::invalid(&e.field, e.message))?;
    let event_id = format!("test_{}", Uuid::new_v4().simple());
    let body = json!({
        "id": event_id,
        "type": event_type,
        "timestamp": rfc3339_ms(now_ms()),
        "data": data,
    });
    let event = Event {
        webhook_id: webhook_id(&event_id),
        id: event_id.into(),
        event_type: event_type.into(),
        tenant: None,
        encoding: Encoding::Plain,
        body: serde_json::to_vec(&body).unwrap_or_default().into(),
        content_type: HeaderValue::from_static("application/json"),
        headers: Vec::new(),
        origin: Origin {
            topic: "admin-test".into(),
            partition: -1,
            offset: -1,
            timestamp_ms: None,
        },
    };
    // A manual test bypasses the endpoint's limits and breaker, and is not written to the attempt log.
    let (result, took, excerpt) = s
        .deliverer
        .attempt_capturing(&event, &sub.recipient, EXCERPT_BYTES)
        .await;
    let outcome = classify(&result);
    let status = match result {
        AttemptResult::Status { code, .. } => Some(code),
        _ => None,
    };
    Ok(ok(
        StatusCode::OK,
        json!({
            "webhook_id": event.webhook_id.to_str().unwrap_or_default(),
            "result": log_result(&result, outcome),
            "status": status,
            "duration_ms": took.as_secs_f64() * 1000.0,
            "response_excerpt": String::from_utf8_lossy(&excerpt),
            "error": (!matches!(status, Some(200..=299))).then(|| result.last_error()),
        }),
    ))
}

fn attempt_view(a: &AttemptRecord) -> Value {
    json!({
        "at": rfc3339_ms(a.at_ms),
        "event_id": a.event_id,
        "event_type": a.event_type,
        "attempt": a.attempt,
        "result": a.result,
        "status_code": a.status_code,
        "duration_ms": a.duration_ms,
        "error": a.error,
    })
}

async fn health(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    let id = parse_id(&id)?;
    let cached = s.registry.cache.index().get(&id);
    // Health is wanted most when things are failing: with the store down, answer from the cache.
    let spec = match s.registry.store.get(id).await {
        Ok(Some(spec)) => spec,
        Ok(None) => return Err(ApiError::not_found(id)),
        Err(e) => match &cached {
            Some(sub) => sub.spec.clone(),
            None => return Err(e.into()),
        },
    };
    if !who.sees(spec.tenant.as_deref()) {
        return Err(ApiError::not_found(id));
    }
    let breaker = match &cached {
        Some(sub) => sub.endpoint.state().as_str(),
        None => "disabled",
    };
    let (successes, failures, consecutive) = cached
        .as_ref()
        .map_or((0, 0, 0), |sub| sub.endpoint.recent());
    // null when the store keeps no attempt log or cannot be read right now.
    let recent = if s.registry.store.writable() {
        s.registry
            .store
            .attempts(id, None, 10)
            .await
            .ok()
            .map(|page| page.items.iter().map(attempt_view).collect::<Vec<_>>())
    } else {
        None
    };
    Ok(ok(
        StatusCode::OK,
        json!({
            "id": id,
            "enabled": spec.enabled,
            "breaker": breaker,
            "pending": cached.as_ref().map_or(0, |sub| sub.endpoint.pending()),
            // Requests this instance may have out at once now: the adaptive limit when the
            // subscription adapts, else max_in_flight scaled by the instance's share of the group.
            "concurrency": cached.as_ref().map(|sub| {
                let (limit, _) = sub.endpoint.effective();
                json!({
                    "adaptive": sub.spec.adaptive_concurrency,
                    "limit": limit,
                    "max": sub.endpoint.ceiling(),
                    "in_flight": sub.endpoint.in_flight(),
                })
            }),
            "window": {
                "seconds": s.registry.cache.defaults().breaker.window.as_secs_f64(),
                "successes": successes,
                "failures": failures,
            },
            "consecutive_failures": consecutive,
            "recent_attempts": recent,
            // Mutual TLS: when the client certificate expires, and whether that is within 14 days.
            "tls_client_cert": cert_expiry(&spec).map(|t| json!({
                "expires_at": rfc3339_ms(t.max(0) as u64 * 1000),
                "expiring": t - (now_ms() / 1000) as i64 <= crate::deliver::identity::EXPIRY_WARNING_SECS,
            })),
        }),
    ))
}

async fn attempts(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> ApiResult {
    let id = parse_id(&id)?;
    let (limit, cursor) = query_params(&q, 50)?;
    s.existing(&who, id).await?;
    let page = s
        .registry
        .store
        .attempts(id, cursor.as_deref(), limit)
        .await?;
    let items: Vec<_> = page.items.iter().map(attempt_view).collect();
    Ok(ok(
        StatusCode::OK,
        json!({"items": items, "next_cursor": page.next}),
    ))
}

fn token_view(t: &ApiToken) -> Value {
    json!({
        "id": t.id,
        "tenant": t.tenant,
        "name": t.name,
        "created_at": t.created_at,
        "expires_at": t.expires_at_ms.map(rfc3339_ms),
        "expired": t.expired(now_ms()),
    })
}

/// Longest `expires_in` accepted: ten years.
const MAX_TOKEN_LIFETIME_SECS: u64 = 10 * 365 * 86_400;

/// `expires_in`: seconds, or a duration such as `"90d"` or `"12h"`.
fn lifetime(v: &Value) -> Result<Duration, ApiError> {
    const F: &str = "expires_in";
    let d = match v {
        Value::Number(_) => Duration::from_secs(want_uint(v, F, MAX_TOKEN_LIFETIME_SECS)?),
        Value::String(text) => humantime::parse_duration(text).map_err(|e| {
            ApiError::bad(
                F,
                format!("{text:?} is not a duration (\"90d\", \"12h\"): {e}"),
            )
        })?,
        other => {
            return Err(ApiError::bad(
                F,
                format!(
                    "must be seconds or a duration string, got {}",
                    json_type(other)
                ),
            ));
        }
    };
    if d.is_zero() || d.as_secs() > MAX_TOKEN_LIFETIME_SECS {
        return Err(ApiError::invalid(
            F,
            "must be at least 1 second and at most 10 years",
        ));
    }
    Ok(d)
}

/// Makes a tenant token; the token is in this response only (the store keeps its SHA-256).
async fn create_token(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    who.admin_only()?;
    let fields = body_object(&body, false)?;
    let (mut tenant, mut name, mut expires) = (None, None, None);
    for (k, v) in fields {
        match k.as_str() {
            "tenant" => tenant = Some(want_string(v, &k)?),
            "name" if v.is_null() => {}
            "name" => name = Some(want_string(v, &k)?),
            "expires_in" if v.is_null() => {}
            "expires_in" => expires = Some(lifetime(&v)?),
            _ => return Err(ApiError::bad(&k, "unknown field")),
        }
    }
    let tenant = tenant.ok_or_else(|| ApiError::bad("tenant", "is required"))?;
    if tenant.trim().is_empty() {
        return Err(ApiError::invalid("tenant", "must not be empty"));
    }
    let (record, token) = ApiToken::issue(tenant, name, expires, now_ms())
        .map_err(|m| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, m))?;
    s.registry.store.put_token(&record).await?;
    tracing::info!(token = %record.id, tenant = %record.tenant, "API token created");
    let mut body = token_view(&record);
    if let Value::Object(m) = &mut body {
        m.insert("token".into(), json!(token));
    }
    let mut resp = ok(StatusCode::CREATED, body);
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/tokens/{}", record.id)) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(resp)
}

async fn list_tokens(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<BTreeMap<String, String>>,
) -> ApiResult {
    who.admin_only()?;
    if let Some(k) = q.keys().next() {
        return Err(ApiError::bad(k, "unknown query parameter"));
    }
    let items: Vec<Value> = s
        .registry
        .store
        .tokens()
        .await?
        .iter()
        .map(token_view)
        .collect();
    Ok(ok(StatusCode::OK, json!({ "items": items })))
}

async fn revoke_token(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    who.admin_only()?;
    let id = parse_id(&id)?;
    if !s.registry.store.delete_token(id).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no token {id}"),
        ));
    }
    tracing::info!(token = %id, "API token revoked");
    Ok(StatusCode::NO_CONTENT.into_response())
}

impl ApiState {
    /// The subscriptions a tenant token may see dead letters and replays of (`None`: the admin, all).
    async fn visible_subscriptions(
        &self,
        who: &Principal,
    ) -> Result<Option<HashSet<Uuid>>, ApiError> {
        let Some(tenant) = who.tenant() else {
            return Ok(None);
        };
        Ok(Some(
            self.registry
                .store
                .list()
                .await?
                .into_iter()
                .filter(|s| s.tenant.as_deref() == Some(tenant))
                .map(|s| s.id)
                .collect(),
        ))
    }

    /// Filters from request fields, scoped to what `who` may see; another tenant's subscription id
    /// is "not found".
    async fn dlq_filters(
        &self,
        who: &Principal,
        args: &FilterArgs,
    ) -> Result<(replay::Filters, String), ApiError> {
        let (mut filters, mut text) = args.parse(now_ms()).map_err(|(f, m)| {
            if f == "event_type" || f == "reason" {
                ApiError::invalid(f, m)
            } else {
                ApiError::bad(f, m)
            }
        })?;
        if let Some(only) = self.visible_subscriptions(who).await? {
            if let Some(id) = args.subscription
                && !only.contains(&id)
            {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    Some("subscription"),
                    format!("no subscription {id}"),
                ));
            }
            filters.only = Some(only);
            // A tenant's replay has its own consumer group.
            text.push_str(&format!(" tenant={:?}", who.tenant().unwrap_or_default()));
        }
        Ok((filters, text))
    }
}

/// A filter field: a string (`subscription` a UUID).
fn filter_args(
    mut get: impl FnMut(&str) -> Result<Option<String>, ApiError>,
) -> Result<FilterArgs, ApiError> {
    let subscription = get("subscription")?
        .map(|v| {
            Uuid::parse_str(&v)
                .map_err(|_| ApiError::bad("subscription", format!("{v:?} is not a UUID")))
        })
        .transpose()?;
    Ok(FilterArgs {
        subscription,
        event_type: get("event_type")?,
        reason: get("reason")?,
        since: get("since")?,
        until: get("until")?,
    })
}

const FILTER_FIELDS: [&str; 5] = ["subscription", "event_type", "reason", "since", "until"];

fn runtime_error(e: crate::config::RunError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, None, e.to_string())
}

/// Counts by reason, subscription and event type of the matching dead letters, and a page of them
/// (headers and a body excerpt).
async fn dead_letters(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<BTreeMap<String, String>>,
) -> ApiResult {
    for k in q.keys() {
        if !FILTER_FIELDS.contains(&k.as_str()) && k != "limit" && k != "cursor" {
            return Err(ApiError::bad(k, "unknown query parameter"));
        }
    }
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| ApiError::bad("limit", "must be an integer in 1..=1000"))?,
        None => 50,
    };
    let cursor = q
        .get("cursor")
        .map(|c| {
            replay::parse_cursor(c)
                .ok_or_else(|| ApiError::bad("cursor", "is not a cursor this API returned"))
        })
        .transpose()?;
    let args = filter_args(|k| Ok(q.get(k).cloned()))?;
    let (filters, _) = s.dlq_filters(&who, &args).await?;
    // Not a `Send` future (see start_replay): read on a blocking-pool thread, a few at a time.
    let _turn = s
        .listings
        .acquire()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, None, e.to_string()))?;
    let (config, handle) = (s.config.clone(), tokio::runtime::Handle::current());
    let listing = tokio::task::spawn_blocking(move || {
        handle.block_on(replay::list(
            &config,
            None,
            &filters,
            cursor,
            limit,
            replay::MAX_SCAN,
        ))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()))?
    .map_err(runtime_error)?;
    Ok(ok(StatusCode::OK, listing))
}

/// Dead-letter listings read at once per instance; more wait their turn.
const MAX_LISTINGS: usize = 2;

/// Running API replays at once, per instance.
const MAX_RUNNING_REPLAYS: usize = 4;

/// Starts a replay of the matching dead letters (the CLI's `hookline replay`, same implementation and
/// same consumer group for the same filters, so either resumes the other); answers its id at once.
async fn start_replay(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let mut fields = body_object(&body, true)?;
    let mut text = |k: &str| -> Result<Option<String>, ApiError> {
        match fields.remove(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => want_string(v, k).map(Some),
        }
    };
    let args = filter_args(&mut text)?;
    let to = text("to")?;
    let rate = match fields.remove("rate") {
        None | Some(Value::Null) => None,
        Some(v) => Some(want_uint(&v, "rate", 1_000_000)? as u32).filter(|r| *r > 0),
    };
    let limit = match fields.remove("limit") {
        None | Some(Value::Null) => None,
        Some(v) => Some(want_uint(&v, "limit", u64::MAX >> 1)?),
    };
    let dry_run = match fields.remove("dry_run") {
        None | Some(Value::Null) => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::bad("dry_run", "must be true or false"))?,
    };
    if let Some(k) = fields.keys().next() {
        return Err(ApiError::bad(k, "unknown field"));
    }
    // Re-publishing to the origin topic re-matches every subscription, other tenants' included.
    if who.tenant().is_some() && to.as_deref() == Some("source") {
        return Err(ApiError::invalid(
            "to",
            "a tenant token replays to a retry tier (\"retry.<tier>\"), not to the source topic",
        ));
    }
    let topics = crate::retry::Topics::new(&s.config.retry.topic_prefix, &s.config.retry.tiers);
    if let Some(t) = &to {
        replay::Target::parse(t, &topics, &s.config.retry.tiers)
            .map_err(|m| ApiError::invalid("to", m))?;
    }
    let (filters, filter_text) = s.dlq_filters(&who, &args).await?;
    let id = Uuid::new_v4();
    let req = ReplayRequest {
        from: None,
        to,
        filters,
        filter_text,
        rate,
        limit,
        dry_run,
        group: None,
        sample: 10,
        id: Some(id),
    };
    let group = req.group_name(&s.config);
    let job = ReplayJob {
        tenant: who.tenant().map(String::from),
        group: group.clone(),
        state: "running",
        error: None,
        summary: Summary {
            replay_id: id.to_string(),
            group: group.clone(),
            dry_run,
            ..Summary::default()
        },
        started_at: rfc3339_ms(now_ms()),
    };
    {
        let mut jobs = s.replays.lock().unwrap_or_else(|p| p.into_inner());
        let running: Vec<_> = jobs.values().filter(|j| j.state == "running").collect();
        // Two replays reading with one group would send the same records twice (a dry run commits
        // nothing and may run beside anything).
        if !dry_run
            && let Some(other) = running
                .iter()
                .find(|j| j.group == group && !j.summary.dry_run)
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                Some("group"),
                format!(
                    "replay {} with the same filters and target is still running",
                    other.summary.replay_id
                ),
            ));
        }
        if running.len() >= MAX_RUNNING_REPLAYS {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                None,
                format!("{MAX_RUNNING_REPLAYS} replays are running on this instance; wait for one"),
            ));
        }
        jobs.insert(id, job.clone());
    }
    tracing::info!(replay_id = %id, dry_run, "replay started through the API");
    let (config, jobs, stop) = (s.config.clone(), s.replays.clone(), s.stop.clone());
    let store = s.registry.store.clone();
    // The replay's reading loop borrows each Kafka message across awaits, which makes its future
    // not `Send`: it runs on a blocking-pool thread, driven by this runtime's I/O and timers.
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let progress_jobs = jobs.clone();
        let mut last = std::time::Instant::now();
        let result = handle.block_on(replay::run(&config, req, Some(store), stop, |sum| {
            // Progress at most every 100 ms (the summary is cloned under a lock).
            if last.elapsed() >= Duration::from_millis(100) || sum.seconds > 0.0 {
                last = std::time::Instant::now();
                if let Some(j) = progress_jobs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&id)
                {
                    j.summary = sum.clone();
                }
            }
        }));
        let mut jobs = jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = jobs.get_mut(&id) {
            match result {
                Ok(sum) => {
                    j.state = if sum.interrupted {
                        "interrupted"
                    } else {
                        "finished"
                    };
                    j.summary = sum;
                }
                Err(e) => {
                    j.state = "failed";
                    j.error = Some(e.to_string());
                }
            }
        }
    });
    let mut resp = ok(StatusCode::ACCEPTED, replay_view(id, &job));
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/replays/{id}")) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(resp)
}

fn replay_view(id: Uuid, j: &ReplayJob) -> Value {
    json!({
        "id": id,
        "state": j.state,
        "error": j.error,
        "started_at": j.started_at,
        "group": j.group,
        "dry_run": j.summary.dry_run,
        "summary": j.summary,
    })
}

/// Progress and summary of an API replay started on this instance (since it started; a replay
/// interrupted by a restart is resumed by starting the same request again).
async fn replay_status(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    let id = parse_id(&id)?;
    let job = s
        .replays
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
        .cloned()
        .filter(|j| who.tenant().is_none() || j.tenant.as_deref() == who.tenant())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                Some("id"),
                format!("no replay {id} on this instance"),
            )
        })?;
    Ok(ok(StatusCode::OK, replay_view(id, &job)))
}
