//! Plain data types shared by every stage: the decoded [`Event`], the stored [`SubscriptionSpec`], event-type
//! [`Pattern`]s, [`SigningKey`]s and [`Prior`]. This module imports nothing else from the crate; the
//! prepared form of a subscription, which joins matching and delivery, is `matching::subscription`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit};
use http::header::HeaderValue;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// How a record was encoded on the source topic (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    CloudEventsStructured,
    CloudEventsBinary,
    Plain,
}

/// Where a record came from; kept for retry/dead-letter headers and offset tracking.
#[derive(Debug, Clone)]
pub struct Origin {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Record timestamp (CreateTime or LogAppendTime), epoch ms.
    pub timestamp_ms: Option<i64>,
}

/// A decoded event. Cheap to share: deliveries to several subscriptions hold the same `Arc<Event>`,
/// and the body is never copied after it left librdkafka's buffer.
#[derive(Debug)]
pub struct Event {
    pub id: Box<str>,
    pub event_type: Box<str>,
    pub tenant: Option<Box<str>>,
    pub encoding: Encoding,
    /// The request body: the record value, byte for byte.
    pub body: Bytes,
    /// `content-type` of the delivery.
    pub content_type: HeaderValue,
    /// `webhook-id` (stable across retries, see [`webhook_id`]).
    pub webhook_id: HeaderValue,
    /// Original Kafka headers, re-published unchanged on retry/dead-letter topics.
    pub headers: Vec<(Box<str>, Bytes)>,
    pub origin: Origin,
}

/// `webhook-id` for an event id (DESIGN §4): the id itself when it is at most 128 bytes with no `.` and no
/// whitespace, else `evt_` + the first 32 hex digits of SHA-256(id). Ids containing bytes that are not
/// visible ASCII (control characters, non-ASCII) are also hashed, because they cannot travel in an HTTP
/// header unchanged.
pub fn webhook_id(event_id: &str) -> HeaderValue {
    let usable = event_id.len() <= 128
        && !event_id.is_empty()
        && event_id.bytes().all(|b| b.is_ascii_graphic() && b != b'.');
    if usable && let Ok(v) = HeaderValue::from_str(event_id) {
        return v;
    }
    let digest = Sha256::digest(event_id.as_bytes());
    let hex = hex::encode(&digest[..16]);
    HeaderValue::from_str(&format!("evt_{hex}")).expect("hex is a valid header value")
}

/// A subscription as stored and as written in YAML (DESIGN §3).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    #[serde(default = "Uuid::new_v4")]
    pub id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub url: String,
    pub event_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<BTreeMap<String, serde_json::Value>>,
    /// HMAC secrets (`whsec_…`), each signing `v1,`; may be empty when `signing_keys` sign instead.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Secrets replaced by a rotation that still sign until their expiry (the grace period).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_secrets: Vec<RetiredSecret>,
    /// Ed25519 secret keys (`whsk_…`), each signing `v1a,` (Standard Webhooks asymmetric signatures);
    /// kept like secrets. Receivers verify with the public keys (`whpk_…`) the API shows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_keys: Vec<String>,
    /// Signing keys replaced by a rotation that still sign until their expiry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_signing_keys: Vec<RetiredSecret>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Why hookline disabled the subscription (`gone`: the endpoint answered 410; `failing`: every
    /// delivery failed for `delivery.disable_after`); cleared when it is enabled again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// When hookline disabled it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_sec: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Learn the endpoint's concurrency below `max_in_flight` (deliver/adaptive.rs); on unless false.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub adaptive_concurrency: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Extra headers whose values are secrets (an API key): sent like `headers`, write-only in the
    /// API (reads show the names), redacted in debug output.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_headers: BTreeMap<String, String>,
    /// OAuth2 client credentials: each request carries a bearer token fetched from `token_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Spec>,
    /// The retry tiers this subscription uses, a subset of `retry.tiers` in their order (default all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_tiers: Option<Vec<String>>,
    /// Attempts in all (1 = no retry): the first `max_attempts - 1` tiers. Not with `retry_tiers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// `"key"`: events with the same ordering key are delivered one at a time, in offset order, and a
    /// failing key parks only itself (ARCHITECTURE.md, ordered delivery). Default `"none"`.
    #[serde(default, skip_serializing_if = "OrderingMode::is_none")]
    pub ordering: OrderingMode,
    /// Where the ordering key comes from: `record_key` (default), `subject`, or `data.<dotted.path>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<String>,
    /// What an ordered key does after one of its events is dead-lettered: `continue` (default) with
    /// its next event, or `hold` until an operator releases it.
    #[serde(default, skip_serializing_if = "OnDeadLetter::is_continue")]
    pub on_dead_letter: OnDeadLetter,
    /// Client certificate chain (PEM) for mutual TLS; with `tls_client_key`. Write-only in the API
    /// (which shows `tls_client_cert_expires_at`), redacted in debug output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_cert: Option<String>,
    /// The private key (PEM) of `tls_client_cert`; kept like a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl SubscriptionSpec {
    /// A new enabled subscription with a fresh id, the given secrets and nothing else set; created and
    /// updated now.
    pub fn new(url: String, event_types: Vec<String>, secrets: Vec<String>, now_ms: u64) -> Self {
        let now = rfc3339_ms(now_ms);
        SubscriptionSpec {
            id: Uuid::new_v4(),
            tenant: None,
            url,
            event_types,
            filter: None,
            secrets,
            retired_secrets: Vec::new(),
            signing_keys: Vec::new(),
            retired_signing_keys: Vec::new(),
            enabled: true,
            disabled_reason: None,
            disabled_at: None,
            rate_limit_per_sec: None,
            burst: None,
            max_in_flight: None,
            adaptive_concurrency: true,
            timeout_ms: None,
            headers: BTreeMap::new(),
            secret_headers: BTreeMap::new(),
            oauth2: None,
            retry_tiers: None,
            max_attempts: None,
            ordering: OrderingMode::None,
            ordering_key: None,
            on_dead_letter: OnDeadLetter::Continue,
            tls_client_cert: None,
            tls_client_key: None,
            created_at: Some(now.clone()),
            updated_at: Some(now),
        }
    }
}

/// A subscription's `ordering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderingMode {
    #[default]
    None,
    Key,
}

impl OrderingMode {
    pub fn is_none(&self) -> bool {
        *self == OrderingMode::None
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OrderingMode::None => "none",
            OrderingMode::Key => "key",
        }
    }

    pub fn parse(s: &str) -> Option<OrderingMode> {
        match s {
            "none" => Some(OrderingMode::None),
            "key" => Some(OrderingMode::Key),
            _ => None,
        }
    }
}

/// A subscription's `on_dead_letter` (ordered subscriptions only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDeadLetter {
    #[default]
    Continue,
    Hold,
}

impl OnDeadLetter {
    pub fn is_continue(&self) -> bool {
        *self == OnDeadLetter::Continue
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OnDeadLetter::Continue => "continue",
            OnDeadLetter::Hold => "hold",
        }
    }

    pub fn parse(s: &str) -> Option<OnDeadLetter> {
        match s {
            "continue" => Some(OnDeadLetter::Continue),
            "hold" => Some(OnDeadLetter::Hold),
            _ => None,
        }
    }
}

/// Where an ordered subscription's ordering key comes from (`ordering_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The Kafka record key (default).
    RecordKey,
    /// The CloudEvents `subject`.
    Subject,
    /// A field of the event's `data`, by dotted path (`data.customer.id` → `["customer", "id"]`).
    Data(Vec<String>),
}

impl KeySource {
    /// Parses `ordering_key`; `None` (unset) is the record key.
    pub fn parse(s: Option<&str>) -> Result<KeySource, String> {
        match s {
            None | Some("record_key") => Ok(KeySource::RecordKey),
            Some("subject") => Ok(KeySource::Subject),
            Some(p) => {
                let path = p.strip_prefix("data.").ok_or_else(|| {
                    format!("{p:?} is not record_key, subject or data.<dotted.path>")
                })?;
                let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
                if parts.iter().any(String::is_empty) {
                    return Err(format!("{p:?}: empty segment in the path"));
                }
                Ok(KeySource::Data(parts))
            }
        }
    }
}

/// OAuth2 client credentials (RFC 6749 §4.4) of a subscription: the token endpoint, the client, and
/// what to ask for. The client authenticates with HTTP Basic (`client_secret_basic`) unless
/// `client_auth` is `"post"` (`client_secret_post`, the credentials in the form).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Spec {
    pub token_url: String,
    pub client_id: String,
    /// Write-only in the API, redacted in debug output.
    pub client_secret: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<String>,
}

impl std::fmt::Debug for OAuth2Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2Spec")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("scopes", &self.scopes)
            .field("audience", &self.audience)
            .field("client_auth", &self.client_auth)
            .finish()
    }
}

/// A secret that keeps signing until `expires_at` (RFC 3339), after a rotation.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiredSecret {
    pub secret: String,
    pub expires_at: String,
}

impl std::fmt::Debug for RetiredSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetiredSecret")
            .field("secret", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Epoch milliseconds as RFC 3339 UTC with milliseconds (`2026-11-25T13:16:07.123Z`).
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// RFC 3339 text to epoch milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Result<u64, String> {
    let t = humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time ({e})"))?;
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .map_err(|_| format!("{s:?} is before 1970"))
}

/// A new signing secret: `whsec_` + base64 of 32 random bytes.
pub fn generate_secret() -> Result<String, String> {
    random_key("whsec_")
}

/// A tenant-scoped API token as stored: only the SHA-256 of the token is kept (the token itself is
/// shown once, when it is made). A request bearing it sees and changes only `tenant`'s objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub id: Uuid,
    pub tenant: String,
    pub name: Option<String>,
    /// Lower-case hex SHA-256 of the whole token string (`hlt_…`).
    pub hash: String,
    pub created_at: String,
    /// Epoch milliseconds after which the token is refused; `None` never expires.
    pub expires_at_ms: Option<u64>,
}

impl ApiToken {
    /// A new token of `tenant`, made at `now_ms`: the record to store and the token text, which is
    /// shown once and never stored.
    pub fn issue(
        tenant: String,
        name: Option<String>,
        lifetime: Option<Duration>,
        now_ms: u64,
    ) -> Result<(ApiToken, String), String> {
        let token = generate_api_token()?;
        let record = ApiToken {
            id: Uuid::new_v4(),
            tenant,
            name,
            hash: api_token_hash(&token),
            created_at: rfc3339_ms(now_ms),
            expires_at_ms: lifetime.map(|d| now_ms.saturating_add(d.as_millis() as u64)),
        };
        Ok((record, token))
    }

    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|t| t <= now_ms)
    }
}

/// A new API token: `hlt_` + URL-safe base64 of 32 random bytes (256 bits: a plain SHA-256 of it is
/// enough to store, no slow hash needed).
fn generate_api_token() -> Result<String, String> {
    use base64::Engine;
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| format!("no randomness available: {e}"))?;
    Ok(format!(
        "hlt_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
    ))
}

/// The stored form of a token: lower-case hex SHA-256 of its text.
pub fn api_token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// `prefix` + base64 of 32 random bytes (a new `whsec_` secret or `whsk_` seed).
fn random_key(prefix: &str) -> Result<String, String> {
    use base64::Engine;
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| format!("no randomness available: {e}"))?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    ))
}

/// The bytes of a key written `<prefix><base64>` (`whsec_`, `whsk_`, `whpk_`); errors say which part
/// is wrong.
fn prefixed_base64(key: &str, prefix: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let b64 = key
        .strip_prefix(prefix)
        .ok_or_else(|| format!("must start with \"{prefix}\""))?;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| format!("the part after \"{prefix}\" is not valid base64"))
}

/// Secrets never appear in debug output (and so never in logs).
impl std::fmt::Debug for SubscriptionSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionSpec")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("url", &self.url)
            .field("event_types", &self.event_types)
            .field("filter", &self.filter)
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .field("retired_secrets", &self.retired_secrets)
            .field(
                "signing_keys",
                &format_args!("<{} redacted>", self.signing_keys.len()),
            )
            .field("retired_signing_keys", &self.retired_signing_keys)
            .field("enabled", &self.enabled)
            .field("disabled_reason", &self.disabled_reason)
            .field("rate_limit_per_sec", &self.rate_limit_per_sec)
            .field("burst", &self.burst)
            .field("max_in_flight", &self.max_in_flight)
            .field("adaptive_concurrency", &self.adaptive_concurrency)
            .field("timeout_ms", &self.timeout_ms)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field(
                "secret_headers",
                &self.secret_headers.keys().collect::<Vec<_>>(),
            )
            .field("oauth2", &self.oauth2)
            .field("retry_tiers", &self.retry_tiers)
            .field("max_attempts", &self.max_attempts)
            .field("ordering", &self.ordering)
            .field("ordering_key", &self.ordering_key)
            .field("on_dead_letter", &self.on_dead_letter)
            .field(
                "tls_client_cert",
                &self.tls_client_cert.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "tls_client_key",
                &self.tls_client_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Why a subscription is invalid; `field` names the offending field (for API errors and config checks).
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An event-type pattern: exact `order.created`, prefix `order.*` (stored as `order.`), or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(Box<str>),
    Prefix(Box<str>),
    Any,
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if s == "*" {
            return Ok(Pattern::Any);
        }
        let (body, prefix) = match s.strip_suffix(".*") {
            Some(b) => (b, true),
            None => (s, false),
        };
        let ok = !body.is_empty()
            && body.len() <= 255
            && !body.contains('*')
            && !body.starts_with('.')
            && !body.ends_with('.')
            && !body.contains("..")
            && body.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(format!(
                "{s:?} is not an event-type pattern (use \"order.created\", \"order.*\" or \"*\")"
            ));
        }
        Ok(if prefix {
            Pattern::Prefix(format!("{body}.").into())
        } else {
            Pattern::Exact(body.into())
        })
    }
}

pub type HmacSha256 = Hmac<Sha256>;

/// A signing secret `whsec_<base64>`, with its HMAC key state prepared once.
#[derive(Clone)]
pub struct SigningKey(pub HmacSha256);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    pub fn parse(secret: &str) -> Result<SigningKey, String> {
        let key = prefixed_base64(secret, "whsec_")?;
        if key.len() < 16 || key.len() > 128 {
            return Err(format!("key must be 16 to 128 bytes, got {}", key.len()));
        }
        let mac = HmacSha256::new_from_slice(&key).map_err(|e| e.to_string())?;
        Ok(SigningKey(mac))
    }
}

/// An Ed25519 signing key `whsk_<base64>` (the 32-byte seed; the 64-byte seed‖public form of
/// libsodium is accepted too), prepared once. Its public key is `whpk_<base64 of 32 bytes>`.
#[derive(Clone)]
pub struct Ed25519Key(pub Arc<ring::signature::Ed25519KeyPair>);

impl std::fmt::Debug for Ed25519Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ed25519Key(<redacted>)")
    }
}

impl Ed25519Key {
    pub fn parse(key: &str) -> Result<Ed25519Key, String> {
        use ring::signature::Ed25519KeyPair;
        let raw = prefixed_base64(key, "whsk_")?;
        let pair = match raw.len() {
            32 => Ed25519KeyPair::from_seed_unchecked(&raw),
            64 => Ed25519KeyPair::from_seed_and_public_key(&raw[..32], &raw[32..]),
            n => {
                return Err(format!(
                    "an Ed25519 key is 32 bytes (or 64: seed and public key), got {n}"
                ));
            }
        }
        .map_err(|_| "not a valid Ed25519 key (the public half does not match)".to_string())?;
        Ok(Ed25519Key(Arc::new(pair)))
    }

    /// `whpk_<base64>` of the public key.
    pub fn public_key(&self) -> String {
        use base64::Engine;
        use ring::signature::KeyPair;
        format!(
            "whpk_{}",
            base64::engine::general_purpose::STANDARD.encode(self.0.public_key().as_ref())
        )
    }
}

/// A new Ed25519 signing key: `whsk_` + base64 of a random 32-byte seed.
pub fn generate_signing_key() -> Result<String, String> {
    random_key("whsk_")
}

/// The 32 bytes of a public key `whpk_<base64>`.
pub fn parse_public_key(key: &str) -> Result<[u8; 32], String> {
    prefixed_base64(key, "whpk_")?
        .try_into()
        .map_err(|r: Vec<u8>| format!("an Ed25519 public key is 32 bytes, got {}", r.len()))
}

/// What happened to a delivery before this attempt (all zero/`None` for a record from the source).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prior {
    /// Attempts already made.
    pub attempts: u32,
    /// Epoch ms of the first failure (or deferral).
    pub first_failure_ms: Option<u64>,
    /// Times deferred (handed to a tier without an attempt) because it blocked its partition.
    pub deferrals: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_id_rule() {
        assert_eq!(webhook_id("evt_123-abc"), "evt_123-abc");
        let long = "x".repeat(129);
        for id in [
            "has.dot",
            "has space",
            "tab\there",
            long.as_str(),
            "caf\u{e9}",
            "",
        ] {
            let w = webhook_id(id);
            let s = w.to_str().unwrap();
            assert!(s.starts_with("evt_") && s.len() == 36, "{id:?} -> {s}");
            let want = hex::encode(&Sha256::digest(id.as_bytes())[..16]);
            assert_eq!(&s[4..], want);
        }
        assert_eq!(
            webhook_id(&"y".repeat(128)).to_str().unwrap(),
            "y".repeat(128)
        );
        // Stable: same id, same webhook-id.
        assert_eq!(webhook_id("a.b"), webhook_id("a.b"));
    }

    #[test]
    fn patterns() {
        assert_eq!(Pattern::parse("*").unwrap(), Pattern::Any);
        assert_eq!(
            Pattern::parse("order.*").unwrap(),
            Pattern::Prefix("order.".into())
        );
        assert_eq!(
            Pattern::parse("order.created").unwrap(),
            Pattern::Exact("order.created".into())
        );
        for bad in [
            "",
            "order.",
            ".x",
            "a..b",
            "*.created",
            "or*der",
            "a.*.b",
            "has space",
            ".*",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?}");
        }
    }
}
