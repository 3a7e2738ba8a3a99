//! The prepared form of a subscription: what matching selects and dispatch delivers to. A
//! [`SubscriptionSpec`] (the stored, user-facing form in `model`) is validated and turned into a
//! [`Subscription`] once per load — URL parsed, keys derived, headers built, filter compiled, endpoint
//! runtime created — so the hot path never parses anything.
//!
//! It lives here, above `model` and `deliver`, because it joins both: its matching half (patterns,
//! filter) is read by the [`Index`](super::Index), its delivery half is a [`Recipient`] the deliverer
//! needs and nothing more, and its [`Endpoint`] is the per-endpoint runtime. `model` stays plain data
//! and `deliver` never sees a subscription.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use uuid::Uuid;

use super::filter::Filter;
use crate::deliver::Recipient;
use crate::deliver::breaker::BreakerConfig;
use crate::deliver::endpoint::{Endpoint, EndpointLimits};
use crate::deliver::http::Target;
use crate::deliver::identity::ClientIdentity;
use crate::deliver::oauth::TokenSource;
use crate::deliver::share::GroupShare;
use crate::model::{
    Ed25519Key, KeySource, OnDeadLetter, OrderingMode, Pattern, RetiredSecret, SigningKey,
    SpecError, SubscriptionSpec, parse_rfc3339_ms,
};

/// A subscription prepared for the hot path: URL parsed, keys derived, headers built, once per load.
#[derive(Debug)]
pub struct Subscription {
    pub id: Uuid,
    /// `id` as text, kept for headers and logs.
    pub id_str: Box<str>,
    pub tenant: Option<Box<str>>,
    pub url: url::Url,
    pub patterns: Vec<Pattern>,
    pub filter: Option<Filter>,
    /// Everything a request to this endpoint needs: target, signing keys, extra headers, timeout.
    pub recipient: Recipient,
    /// Runtime state of the endpoint: concurrency cap, rate limit, breaker.
    pub endpoint: Arc<Endpoint>,
    /// The retry tiers this subscription uses, as indices into `retry.tiers`, in order: attempt `k + 2`
    /// comes from tier `retry[k]`, and a failure after the last is exhausted.
    pub retry: Box<[usize]>,
    /// Breaker episodes as this instance knows them, for operational events (kept across reloads).
    pub breaker_episodes: Arc<crate::operational::BreakerEpisodes>,
    /// `ordering: key`: where each event's ordering key comes from, and whether a dead-lettered event
    /// holds its key (`on_dead_letter: hold`). `None`: unordered.
    pub ordering: Option<Ordered>,
    pub spec: SubscriptionSpec,
}

/// An ordered subscription's settings, prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ordered {
    pub key: KeySource,
    pub hold: bool,
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
    /// `retry.tiers`: names and delays, in order (what `retry_tiers` and `max_attempts` choose from).
    pub tiers: Arc<[(Box<str>, Duration)]>,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            timeout_ms: 10_000,
            max_in_flight: 64,
            breaker: BreakerConfig::default(),
            share: Arc::default(),
            tiers: [
                ("1m", 60),
                ("5m", 300),
                ("30m", 1800),
                ("2h", 7200),
                ("24h", 86_400),
            ]
            .map(|(n, s)| (n.into(), Duration::from_secs(s)))
            .into(),
        }
    }
}

/// Parses every entry of the list `field`; an error names `field[i]`.
fn parse_each<T>(
    list: &[String],
    field: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, SpecError> {
    list.iter()
        .enumerate()
        .map(|(i, x)| parse(x).map_err(|m| SpecError::new(format!("{field}[{i}]"), m)))
        .collect()
}

/// Parses retired secrets or keys with their expiry (unix seconds); an error names
/// `field[i].secret` or `field[i].expires_at`.
fn parse_retiring<K>(
    list: &[RetiredSecret],
    field: &str,
    parse: impl Fn(&str) -> Result<K, String>,
) -> Result<Vec<(K, u64)>, SpecError> {
    list.iter()
        .enumerate()
        .map(|(i, r)| {
            let key =
                parse(&r.secret).map_err(|m| SpecError::new(format!("{field}[{i}].secret"), m))?;
            let until = parse_rfc3339_ms(&r.expires_at)
                .map_err(|m| SpecError::new(format!("{field}[{i}].expires_at"), m))?;
            Ok((key, until / 1000))
        })
        .collect()
}

/// The tier indices of a subscription's retry schedule: `retry_tiers` (each named as in `retry.tiers`
/// or by an equal delay, in increasing order), or the first `max_attempts - 1` tiers, or all of them.
pub fn retry_schedule(
    spec: &SubscriptionSpec,
    tiers: &[(Box<str>, Duration)],
) -> Result<Box<[usize]>, SpecError> {
    let configured = || {
        tiers
            .iter()
            .map(|(n, _)| n.as_ref())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (&spec.retry_tiers, spec.max_attempts) {
        (Some(_), Some(_)) => Err(SpecError::new(
            "max_attempts",
            "set retry_tiers or max_attempts, not both",
        )),
        (None, None) => Ok((0..tiers.len()).collect()),
        (None, Some(m)) => {
            if m == 0 || m as usize > tiers.len() + 1 {
                return Err(SpecError::new(
                    "max_attempts",
                    format!(
                        "must be 1..={} (the first attempt and one per configured tier: {})",
                        tiers.len() + 1,
                        configured()
                    ),
                ));
            }
            Ok((0..m as usize - 1).collect())
        }
        (Some(names), None) => {
            if names.is_empty() {
                return Err(SpecError::new(
                    "retry_tiers",
                    "must name at least one tier (max_attempts: 1 means no retries)",
                ));
            }
            let mut out: Vec<usize> = Vec::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                let field = format!("retry_tiers[{i}]");
                let wanted = humantime::parse_duration(name.trim()).ok();
                let Some(idx) = tiers
                    .iter()
                    .position(|(n, d)| n.as_ref() == name.trim() || Some(*d) == wanted)
                else {
                    return Err(SpecError::new(
                        field,
                        format!("{name:?} is not a configured retry tier ({})", configured()),
                    ));
                };
                if out.last().is_some_and(|&prev| prev >= idx) {
                    return Err(SpecError::new(
                        field,
                        "tiers must be listed once each, in the order of retry.tiers",
                    ));
                }
                out.push(idx);
            }
            Ok(out.into())
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
    "traceparent",
    "tracestate",
];

impl Subscription {
    /// Validates a spec and prepares it. Errors name the field (`url`, `event_types[1]`, `secrets[0]`, …).
    pub fn prepare(spec: SubscriptionSpec, defaults: &Defaults) -> Result<Subscription, SpecError> {
        let url = url::Url::parse(&spec.url)
            .map_err(|e| SpecError::new("url", format!("{:?} is not a URL ({e})", spec.url)))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(SpecError::new("url", "scheme must be http or https"));
        }
        if url.host().is_none() {
            return Err(SpecError::new("url", "must have a host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(SpecError::new(
                "url",
                "must not contain credentials; use headers",
            ));
        }
        if spec.event_types.is_empty() {
            return Err(SpecError::new(
                "event_types",
                "must list at least one pattern",
            ));
        }
        let patterns = parse_each(&spec.event_types, "event_types", Pattern::parse)?;
        if let Some(t) = &spec.tenant
            && t.is_empty()
        {
            return Err(SpecError::new("tenant", "must not be empty when present"));
        }
        if spec.secrets.is_empty() && spec.signing_keys.is_empty() {
            return Err(SpecError::new(
                "secrets",
                "must list at least one secret (or give signing_keys)",
            ));
        }
        let keys = parse_each(&spec.secrets, "secrets", SigningKey::parse)?;
        let retiring = parse_retiring(&spec.retired_secrets, "retired_secrets", SigningKey::parse)?;
        let ed_keys = parse_each(&spec.signing_keys, "signing_keys", Ed25519Key::parse)?;
        let ed_retiring = parse_retiring(
            &spec.retired_signing_keys,
            "retired_signing_keys",
            Ed25519Key::parse,
        )?;
        let retry = retry_schedule(&spec, &defaults.tiers)?;
        let ordering = match spec.ordering {
            OrderingMode::Key => Some(Ordered {
                key: KeySource::parse(spec.ordering_key.as_deref())
                    .map_err(|m| SpecError::new("ordering_key", m))?,
                hold: spec.on_dead_letter == OnDeadLetter::Hold,
            }),
            OrderingMode::None => {
                if spec.ordering_key.is_some() {
                    return Err(SpecError::new("ordering_key", "needs ordering: key"));
                }
                if spec.on_dead_letter != OnDeadLetter::Continue {
                    return Err(SpecError::new("on_dead_letter", "needs ordering: key"));
                }
                None
            }
        };
        let filter = match &spec.filter {
            Some(f) => Some(
                Filter::compile(f)
                    .map_err(|(path, m)| SpecError::new(format!("filter.{path}"), m))?,
            ),
            None => None,
        };
        if let Some(r) = spec.rate_limit_per_sec
            && !(1..=1_000_000).contains(&r)
        {
            return Err(SpecError::new("rate_limit_per_sec", "must be 1..=1000000"));
        }
        if let Some(b) = spec.burst {
            if !(1..=1_000_000).contains(&b) {
                return Err(SpecError::new("burst", "must be 1..=1000000"));
            }
            if spec.rate_limit_per_sec.is_none() {
                return Err(SpecError::new("burst", "needs rate_limit_per_sec"));
            }
        }
        if let Some(m) = spec.max_in_flight
            && !(1..=100_000).contains(&m)
        {
            return Err(SpecError::new("max_in_flight", "must be 1..=100000"));
        }
        let timeout_ms = spec.timeout_ms.unwrap_or(defaults.timeout_ms);
        if !(1..=600_000).contains(&timeout_ms) {
            return Err(SpecError::new("timeout_ms", "must be 1..=600000"));
        }
        let oauth = match &spec.oauth2 {
            Some(o) => Some(Arc::new(
                TokenSource::new(o).map_err(|(f, m)| SpecError::new(f, m))?,
            )),
            None => None,
        };
        let mut headers = HeaderMap::new();
        let all = spec
            .headers
            .iter()
            .map(|h| ("headers", h))
            .chain(spec.secret_headers.iter().map(|h| ("secret_headers", h)));
        for (map, (name, value)) in all {
            let field = format!("{map}.{name}");
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| SpecError::new(&field, "is not a valid header name"))?;
            if FORBIDDEN_HEADERS.contains(&n.as_str()) {
                return Err(SpecError::new(
                    &field,
                    "is set by hookline or is hop-by-hop and cannot be overridden",
                ));
            }
            let mut v = HeaderValue::from_str(value)
                .map_err(|_| SpecError::new(&field, "is not a valid header value"))?;
            if oauth.is_some() && n == http::header::AUTHORIZATION {
                return Err(SpecError::new(
                    &field,
                    "is set from the oauth2 token; remove one of them",
                ));
            }
            // Extra headers often carry credentials; keep them out of debug output.
            v.set_sensitive(true);
            if headers.insert(n, v).is_some() {
                return Err(SpecError::new(
                    &field,
                    "is given twice (in headers and secret_headers, or in two spellings)",
                ));
            }
        }
        let mut target = Target::from_url(&url).map_err(|m| SpecError::new("url", m))?;
        let identity = match (&spec.tls_client_cert, &spec.tls_client_key) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(SpecError::new(
                    "tls_client_key",
                    "is required with tls_client_cert",
                ));
            }
            (None, Some(_)) => {
                return Err(SpecError::new(
                    "tls_client_cert",
                    "is required with tls_client_key",
                ));
            }
            (Some(cert), Some(key)) => {
                if url.scheme() != "https" {
                    return Err(SpecError::new("tls_client_cert", "needs an https url"));
                }
                Some(Arc::new(
                    ClientIdentity::from_pem(cert, key).map_err(|(f, m)| SpecError::new(f, m))?,
                ))
            }
        };
        if let Some(id) = &identity {
            target = target.with_identity(id.clone());
        }
        Ok(Subscription {
            id: spec.id,
            id_str: spec.id.to_string().into(),
            tenant: spec.tenant.as_deref().map(Into::into),
            url,
            patterns,
            filter,
            recipient: Recipient {
                target,
                keys,
                retiring,
                ed_keys,
                ed_retiring,
                oauth,
                timeout: Duration::from_millis(timeout_ms),
                headers,
            },
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
            retry,
            breaker_episodes: Arc::default(),
            ordering,
            spec,
        })
    }
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
            (
                Box::new(|s| s.tls_client_cert = Some("x".into())),
                "tls_client_key",
            ),
            (
                Box::new(|s| s.tls_client_key = Some("x".into())),
                "tls_client_cert",
            ),
            (
                Box::new(|s| {
                    s.tls_client_cert = Some("x".into());
                    s.tls_client_key = Some("x".into());
                }),
                "tls_client_cert",
            ),
            (
                Box::new(|s| {
                    s.url = "https://127.0.0.1:9/x".into();
                    s.tls_client_cert = Some("x".into());
                    s.tls_client_key = Some("x".into());
                }),
                "tls_client_cert",
            ),
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
        let mut with_cert = spec();
        with_cert.tls_client_cert = Some("CERT-PEM-TEXT".into());
        with_cert.tls_client_key = Some("KEY-PEM-TEXT".into());
        let dbg = format!("{with_cert:?}");
        assert!(!dbg.contains("PEM-TEXT"), "{dbg}");
    }
}
