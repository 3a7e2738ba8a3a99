//! Plain data types shared by every stage: the decoded [`Event`], the stored [`SubscriptionSpec`] and its
//! prepared runtime form [`Subscription`]. Stages and stores depend on these, never on each other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::deliver::breaker::BreakerConfig;
use crate::deliver::endpoint::{Endpoint, EndpointLimits};
use crate::deliver::http::Target;
use crate::deliver::share::GroupShare;
use crate::matching::filter::Filter;

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
    pub secrets: Vec<String>,
    /// Secrets replaced by a rotation that still sign until their expiry (the grace period).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_secrets: Vec<RetiredSecret>,
    #[serde(default = "yes")]
    pub enabled: bool,
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
            enabled: true,
            rate_limit_per_sec: None,
            burst: None,
            max_in_flight: None,
            adaptive_concurrency: true,
            timeout_ms: None,
            headers: BTreeMap::new(),
            created_at: Some(now.clone()),
            updated_at: Some(now),
        }
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
    use base64::Engine;
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| format!("no randomness available: {e}"))?;
    Ok(format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    ))
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
            .field("enabled", &self.enabled)
            .field("rate_limit_per_sec", &self.rate_limit_per_sec)
            .field("burst", &self.burst)
            .field("max_in_flight", &self.max_in_flight)
            .field("adaptive_concurrency", &self.adaptive_concurrency)
            .field("timeout_ms", &self.timeout_ms)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
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

fn spec_err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
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
        use base64::Engine;
        let b64 = secret
            .strip_prefix("whsec_")
            .ok_or_else(|| "must start with \"whsec_\"".to_string())?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| "the part after \"whsec_\" is not valid base64".to_string())?;
        if key.len() < 16 || key.len() > 128 {
            return Err(format!("key must be 16 to 128 bytes, got {}", key.len()));
        }
        let mac = HmacSha256::new_from_slice(&key).map_err(|e| e.to_string())?;
        Ok(SigningKey(mac))
    }
}

/// A subscription prepared for the hot path: URL parsed, keys derived, headers built, once per load.
#[derive(Debug)]
pub struct Subscription {
    pub id: Uuid,
    /// `id` as text, kept for headers and logs.
    pub id_str: Box<str>,
    pub tenant: Option<Box<str>>,
    pub url: url::Url,
    /// Where requests go (host, port, path), parsed once.
    pub target: Target,
    pub patterns: Vec<Pattern>,
    pub filter: Option<Filter>,
    pub keys: Vec<SigningKey>,
    /// Keys of retired secrets with their expiry (unix seconds): they sign requests timestamped before it.
    pub retiring: Vec<(SigningKey, u64)>,
    pub timeout: Duration,
    pub headers: HeaderMap,
    /// Runtime state of the endpoint: concurrency cap, rate limit, breaker.
    pub endpoint: Arc<Endpoint>,
    pub spec: SubscriptionSpec,
}

/// Values used where a subscription leaves a field unset (from `[delivery]`), and the instance's share of
/// the group's limits.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub timeout_ms: u64,
    pub max_in_flight: u32,
    pub breaker: BreakerConfig,
    /// This instance's share of each subscription's limits (DESIGN §6), updated on rebalance.
    pub share: Arc<GroupShare>,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            timeout_ms: 10_000,
            max_in_flight: 64,
            breaker: BreakerConfig::default(),
            share: Arc::default(),
        }
    }
}

/// Headers a subscription may not set: hop-by-hop, framing, and the ones hookline itself sends.
const FORBIDDEN_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "content-type",
    "user-agent",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

impl Subscription {
    /// Validates a spec and prepares it. Errors name the field (`url`, `event_types[1]`, `secrets[0]`, …).
    pub fn prepare(spec: SubscriptionSpec, defaults: &Defaults) -> Result<Subscription, SpecError> {
        let url = url::Url::parse(&spec.url)
            .map_err(|e| spec_err("url", format!("{:?} is not a URL ({e})", spec.url)))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(spec_err("url", "scheme must be http or https"));
        }
        if url.host().is_none() {
            return Err(spec_err("url", "must have a host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(spec_err("url", "must not contain credentials; use headers"));
        }
        if spec.event_types.is_empty() {
            return Err(spec_err("event_types", "must list at least one pattern"));
        }
        let patterns = spec
            .event_types
            .iter()
            .enumerate()
            .map(|(i, p)| Pattern::parse(p).map_err(|m| spec_err(format!("event_types[{i}]"), m)))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(t) = &spec.tenant
            && t.is_empty()
        {
            return Err(spec_err("tenant", "must not be empty when present"));
        }
        if spec.secrets.is_empty() {
            return Err(spec_err("secrets", "must list at least one secret"));
        }
        let keys = spec
            .secrets
            .iter()
            .enumerate()
            .map(|(i, s)| SigningKey::parse(s).map_err(|m| spec_err(format!("secrets[{i}]"), m)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut retiring = Vec::with_capacity(spec.retired_secrets.len());
        for (i, r) in spec.retired_secrets.iter().enumerate() {
            let key = SigningKey::parse(&r.secret)
                .map_err(|m| spec_err(format!("retired_secrets[{i}].secret"), m))?;
            let until = parse_rfc3339_ms(&r.expires_at)
                .map_err(|m| spec_err(format!("retired_secrets[{i}].expires_at"), m))?;
            retiring.push((key, until / 1000));
        }
        let filter = match &spec.filter {
            Some(f) => Some(
                Filter::compile(f).map_err(|(path, m)| spec_err(format!("filter.{path}"), m))?,
            ),
            None => None,
        };
        if let Some(r) = spec.rate_limit_per_sec
            && !(1..=1_000_000).contains(&r)
        {
            return Err(spec_err("rate_limit_per_sec", "must be 1..=1000000"));
        }
        if let Some(b) = spec.burst {
            if !(1..=1_000_000).contains(&b) {
                return Err(spec_err("burst", "must be 1..=1000000"));
            }
            if spec.rate_limit_per_sec.is_none() {
                return Err(spec_err("burst", "needs rate_limit_per_sec"));
            }
        }
        if let Some(m) = spec.max_in_flight
            && !(1..=100_000).contains(&m)
        {
            return Err(spec_err("max_in_flight", "must be 1..=100000"));
        }
        let timeout_ms = spec.timeout_ms.unwrap_or(defaults.timeout_ms);
        if !(1..=600_000).contains(&timeout_ms) {
            return Err(spec_err("timeout_ms", "must be 1..=600000"));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &spec.headers {
            let field = format!("headers.{name}");
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| spec_err(&field, "is not a valid header name"))?;
            if FORBIDDEN_HEADERS.contains(&n.as_str()) {
                return Err(spec_err(
                    &field,
                    "is set by hookline or is hop-by-hop and cannot be overridden",
                ));
            }
            let mut v = HeaderValue::from_str(value)
                .map_err(|_| spec_err(&field, "is not a valid header value"))?;
            // Extra headers often carry credentials; keep them out of debug output.
            v.set_sensitive(true);
            headers.insert(n, v);
        }
        let target = Target::from_url(&url).map_err(|m| spec_err("url", m))?;
        Ok(Subscription {
            id: spec.id,
            target,
            id_str: spec.id.to_string().into(),
            tenant: spec.tenant.as_deref().map(Into::into),
            url,
            patterns,
            filter,
            keys,
            retiring,
            timeout: Duration::from_millis(timeout_ms),
            headers,
            endpoint: Arc::new(Endpoint::new(
                EndpointLimits {
                    max_in_flight: spec.max_in_flight.unwrap_or(defaults.max_in_flight),
                    rate_per_sec: spec.rate_limit_per_sec,
                    burst: spec.burst,
                    adaptive: spec.adaptive_concurrency,
                },
                defaults.breaker,
                defaults.share.clone(),
            )),
            spec,
        })
    }
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

    fn spec() -> SubscriptionSpec {
        serde_yaml_ng::from_str(
            "url: http://127.0.0.1:9/x\nevent_types: [\"order.*\"]\nsecrets: [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n",
        )
        .unwrap()
    }

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

    #[test]
    fn prepare_validates_and_names_fields() {
        assert!(Subscription::prepare(spec(), &Defaults::default()).is_ok());
        type Mutation = Box<dyn Fn(&mut SubscriptionSpec)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.url = "ftp://x/".into()), "url"),
            (Box::new(|s| s.url = "not a url".into()), "url"),
            (Box::new(|s| s.event_types = vec![]), "event_types"),
            (
                Box::new(|s| s.event_types = vec!["a".into(), "b*".into()]),
                "event_types[1]",
            ),
            (Box::new(|s| s.secrets = vec!["nope".into()]), "secrets[0]"),
            (
                Box::new(|s| s.secrets.push("whsec_!!!".into())),
                "secrets[1]",
            ),
            (Box::new(|s| s.timeout_ms = Some(0)), "timeout_ms"),
            (Box::new(|s| s.burst = Some(5)), "burst"),
            (
                Box::new(|s| s.rate_limit_per_sec = Some(0)),
                "rate_limit_per_sec",
            ),
            (Box::new(|s| s.max_in_flight = Some(0)), "max_in_flight"),
            (
                Box::new(|s| {
                    s.headers.insert("webhook-id".into(), "x".into());
                }),
                "headers.webhook-id",
            ),
            (
                Box::new(|s| {
                    s.headers.insert("Connection".into(), "x".into());
                }),
                "headers.Connection",
            ),
            (
                Box::new(|s| {
                    s.headers.insert("bad header".into(), "x".into());
                }),
                "headers.bad header",
            ),
            (Box::new(|s| s.tenant = Some(String::new())), "tenant"),
        ];
        for (mutate, field) in cases {
            let mut s = spec();
            mutate(&mut s);
            let e = Subscription::prepare(s, &Defaults::default()).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn signing_key_debug_is_redacted() {
        let s = Subscription::prepare(spec(), &Defaults::default()).unwrap();
        let dbg = format!("{:?}", s);
        assert!(!dbg.contains("MfKQ9r8"), "{dbg}");
    }
}
