//! Delivery: one signed HTTP attempt of one event to one subscription.
//!
//! Requests go through [`http::Client`], hookline's own lean HTTP/1.1 client (keep-alive connections per
//! host, no redirects, no proxies, every address checked by the [`policy`]). Per request it costs one
//! signature per secret, written with the other headers into the connection's reused head buffer; the
//! body is the shared event bytes.

pub mod adaptive;
pub mod breaker;
pub mod endpoint;
pub mod http;
pub mod identity;
pub mod oauth;
pub mod outcome;
pub mod policy;
pub mod resolve;
pub mod share;
pub mod sign;
pub mod trace;
pub mod wire;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::http::header::{HeaderMap, HeaderName};

use crate::config::{Config, ConfigError};
use crate::model::{Ed25519Key, Event, SigningKey};
use outcome::{AttemptResult, parse_retry_after};
use policy::AddressPolicy;

pub static WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
pub static WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
pub static WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

const USER_AGENT: &str = concat!("hookline/", env!("CARGO_PKG_VERSION"));

/// Who a request goes to and how it is signed: the delivery half of a prepared subscription, built once
/// per load (`matching::subscription`), so an attempt parses nothing.
#[derive(Debug)]
pub struct Recipient {
    /// Where requests go (host, port, path), parsed once.
    pub target: self::http::Target,
    pub keys: Vec<SigningKey>,
    /// Keys of retired secrets with their expiry (unix seconds): they sign requests timestamped before it.
    pub retiring: Vec<(SigningKey, u64)>,
    /// Ed25519 keys signing `v1a,`, and the retired ones with their expiry (unix seconds).
    pub ed_keys: Vec<Ed25519Key>,
    pub ed_retiring: Vec<(Ed25519Key, u64)>,
    /// Where bearer tokens come from, for an endpoint that wants OAuth2 client credentials.
    pub oauth: Option<std::sync::Arc<oauth::TokenSource>>,
    /// Bounds the request up to the response head.
    pub timeout: Duration,
    /// Extra headers, `secret_headers` included (marked sensitive, so redacted in debug output).
    pub headers: HeaderMap,
}

impl Recipient {
    /// Keeps what `prev` learned that is still valid for this one (the OAuth2 token).
    pub fn inherit(&self, prev: &Recipient) {
        if let (Some(a), Some(b)) = (&self.oauth, &prev.oauth) {
            a.inherit(b);
        }
    }
}

pub struct Deliverer {
    client: self::http::Client,
}

impl Deliverer {
    /// The deliverer of `config.delivery`; its TLS roots and resolver are set up now, so a bad
    /// `extra_ca_file` or DNS configuration fails the start, naming the setting.
    pub fn new(config: &Config, policy: AddressPolicy) -> Result<Deliverer, ConfigError> {
        let cfg = &config.delivery;
        let d = Deliverer {
            client: self::http::Client::new(self::http::ClientConfig {
                policy,
                connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
                max_idle_per_host: cfg.pool_max_idle_per_host,
                idle_timeout: cfg.pool_idle_timeout,
                max_lifetime: cfg.pool_max_lifetime,
                tcp_keepalive: (!cfg.tcp_keepalive.is_zero()).then_some(cfg.tcp_keepalive),
                max_response_bytes: cfg.max_response_bytes,
                extra_roots: config.extra_roots()?,
                dns_servers: config.dns_servers()?,
                dns_timeout: cfg.dns_timeout,
                proxy: config.proxy()?,
            }),
        };
        d.client
            .resolver()
            .map_err(|e| ConfigError::new("delivery.dns_servers", e))?;
        Ok(d)
    }

    /// The addresses of a host name (the delivery resolver: cached, bounded, coalesced).
    pub async fn resolve(&self, host: &str) -> Result<std::sync::Arc<[std::net::IpAddr]>, String> {
        self.client.resolver()?.lookup(host).await
    }

    /// Closes expired idle connections every little while until `stop` (see
    /// [`http::Client::sweep`]).
    pub async fn sweep_idle_connections(&self, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(self.client.sweep_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.client.sweep(),
            }
        }
    }

    /// Makes one attempt. Returns the result and how long the HTTP exchange took.
    pub async fn attempt(&self, event: &Event, to: &Recipient) -> (AttemptResult, Duration) {
        let (r, took, _) = self.attempt_capturing(event, to, 0).await;
        (r, took)
    }

    /// [`Deliverer::attempt`], also returning the first `capture` bytes of the response body (the admin
    /// API's test delivery shows them).
    pub async fn attempt_capturing(
        &self,
        event: &Event,
        to: &Recipient,
        capture: usize,
    ) -> (AttemptResult, Duration, Vec<u8>) {
        self.attempt_as(event, to, capture, None).await
    }

    /// [`Deliverer::attempt_capturing`]; `traceparent`, when given, replaces the record's own in the
    /// request (the attempt's span as the receiver's parent, see `otlp`), keeping its `tracestate`.
    pub async fn attempt_as(
        &self,
        event: &Event,
        to: &Recipient,
        capture: usize,
        traceparent: Option<&[u8]>,
    ) -> (AttemptResult, Duration, Vec<u8>) {
        let started = Instant::now();
        // The subscription's timeout bounds the attempt up to the response head (a token fetch
        // included); the body then has its own short bound (http::BODY_READ_BOUND) and decides only
        // whether the connection is reused.
        let deadline = tokio::time::Instant::from_std(started) + to.timeout;
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let signature = sign::signature_header(
            signing(&to.keys, &to.retiring, ts),
            signing(&to.ed_keys, &to.ed_retiring, ts),
            event.webhook_id.as_bytes(),
            ts,
            &event.body,
        );
        let signed = Signed {
            event,
            to,
            ts,
            signature: signature.as_bytes(),
            trace: trace::of_event(event)
                .map(|(parent, state)| (traceparent.unwrap_or(parent), state)),
        };
        let Some(oauth) = &to.oauth else {
            let (result, excerpt) = self.send(&signed, None, capture, deadline).await;
            return (result, started.elapsed(), excerpt);
        };
        let token = match oauth.token(&self.client, deadline).await {
            Ok(t) => t,
            Err(e) => return (AttemptResult::Auth(e), started.elapsed(), Vec::new()),
        };
        let (mut result, mut excerpt) = self
            .send(&signed, Some(&token.authorization), capture, deadline)
            .await;
        if matches!(result, AttemptResult::Status { code: 401, .. }) {
            // The endpoint refused the token (revoked, or expired early): one fresh token and one
            // resend, within the same attempt and deadline.
            oauth.invalidate(&token);
            match oauth.token(&self.client, deadline).await {
                Ok(fresh) => {
                    (result, excerpt) = self
                        .send(&signed, Some(&fresh.authorization), capture, deadline)
                        .await;
                }
                Err(e) => (result, excerpt) = (AttemptResult::Auth(e), Vec::new()),
            }
        }
        (result, started.elapsed(), excerpt)
    }

    /// One request of an attempt, with the bearer token when there is one.
    async fn send(
        &self,
        s: &Signed<'_>,
        bearer: Option<&[u8]>,
        capture: usize,
        deadline: tokio::time::Instant,
    ) -> (AttemptResult, Vec<u8>) {
        let mut ts_buf = itoa::Buffer::new();
        let ts_text = ts_buf.format(s.ts).as_bytes();
        let headers = |h: &mut Vec<u8>| {
            line(h, b"content-type", s.event.content_type.as_bytes());
            line(h, b"user-agent", USER_AGENT.as_bytes());
            line(
                h,
                WEBHOOK_ID.as_str().as_bytes(),
                s.event.webhook_id.as_bytes(),
            );
            line(h, WEBHOOK_TIMESTAMP.as_str().as_bytes(), ts_text);
            line(h, WEBHOOK_SIGNATURE.as_str().as_bytes(), s.signature);
            if let Some((parent, state)) = s.trace {
                line(h, b"traceparent", parent);
                if let Some(state) = state {
                    line(h, b"tracestate", state);
                }
            }
            if let Some(b) = bearer {
                line(h, b"authorization", b);
            }
            for (name, value) in &s.to.headers {
                line(h, name.as_str().as_bytes(), value.as_bytes());
            }
        };
        let sent = self
            .client
            .post(&s.to.target, headers, &s.event.body, capture, deadline);
        match sent.await {
            Err(self::http::HttpError::TimedOut) => (AttemptResult::Timeout, Vec::new()),
            Err(self::http::HttpError::Refused(m)) => (AttemptResult::Refused(m), Vec::new()),
            Err(self::http::HttpError::Failed(m)) => (AttemptResult::Connect(m), Vec::new()),
            // Once the status is in, it decides: a 2xx whose body stalls or breaks off was accepted,
            // and a 429/503/410 keeps its status and Retry-After even if the body did not end cleanly.
            Ok(resp) => (
                AttemptResult::Status {
                    code: resp.status,
                    retry_after: resp
                        .retry_after
                        .as_deref()
                        .and_then(|v| parse_retry_after(v, SystemTime::now())),
                },
                resp.excerpt,
            ),
        }
    }
}

/// The keys that sign a request timestamped `ts`: the current ones, and the retired ones whose grace
/// period (until their expiry, unix seconds) has not ended.
fn signing<'a, K>(
    current: &'a [K],
    retiring: &'a [(K, u64)],
    ts: u64,
) -> impl Iterator<Item = &'a K> {
    current.iter().chain(
        retiring
            .iter()
            .filter(move |(_, until)| ts < *until)
            .map(|(k, _)| k),
    )
}

/// What every request of one attempt shares.
struct Signed<'a> {
    event: &'a Event,
    to: &'a Recipient,
    ts: u64,
    signature: &'a [u8],
    /// The record's W3C trace context, forwarded as it came.
    trace: Option<(&'a [u8], Option<&'a [u8]>)>,
}

/// Appends one header line.
fn line(h: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    h.extend_from_slice(name);
    h.extend_from_slice(b": ");
    h.extend_from_slice(value);
    h.extend_from_slice(b"\r\n");
}
