//! Delivery: one signed HTTP attempt of one event to one subscription.
//!
//! One pooled [`reqwest::Client`] serves every endpoint (keep-alive connections per host, no redirects, no
//! proxies, DNS answers filtered by the [`policy`]). Per request it costs one signature per secret and one
//! small header map; the body is the shared event bytes.

pub mod breaker;
pub mod endpoint;
pub mod outcome;
pub mod policy;
pub mod share;
pub mod sign;

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT};

use crate::config::DeliveryConfig;
use crate::model::{Event, Subscription};
use outcome::{AttemptResult, parse_retry_after};
use policy::{AddressPolicy, AddressRefused, PolicyResolver};

pub static WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
pub static WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
pub static WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

pub struct Deliverer {
    client: reqwest::Client,
    policy: AddressPolicy,
    max_response_bytes: usize,
    user_agent: HeaderValue,
}

impl Deliverer {
    pub fn new(cfg: &DeliveryConfig, policy: AddressPolicy) -> Result<Deliverer, reqwest::Error> {
        // rustls needs a process-wide crypto provider; installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .dns_resolver(PolicyResolver {
                policy: policy.clone(),
            })
            .build()?;
        Ok(Deliverer {
            client,
            policy,
            max_response_bytes: cfg.max_response_bytes,
            user_agent: HeaderValue::from_static(concat!("hookline/", env!("CARGO_PKG_VERSION"))),
        })
    }

    /// Makes one attempt. Returns the result and how long the HTTP exchange took.
    pub async fn attempt(&self, event: &Event, sub: &Subscription) -> (AttemptResult, Duration) {
        let (r, took, _) = self.attempt_capturing(event, sub, 0).await;
        (r, took)
    }

    /// [`Deliverer::attempt`], also returning the first `capture` bytes of the response body (the admin
    /// API's test delivery shows them).
    pub async fn attempt_capturing(
        &self,
        event: &Event,
        sub: &Subscription,
        capture: usize,
    ) -> (AttemptResult, Duration, Vec<u8>) {
        let mut excerpt = Vec::new();
        let started = Instant::now();
        if let Some(ip) = literal_ip(&sub.url)
            && let Err(e) = self.policy.check(ip)
        {
            return (
                AttemptResult::Refused(e.to_string()),
                started.elapsed(),
                excerpt,
            );
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Secrets retired by a rotation keep signing during their grace period.
        let keys = sub.keys.iter().chain(
            sub.retiring
                .iter()
                .filter(move |(_, until)| ts < *until)
                .map(|(k, _)| k),
        );
        let signature = sign::signature_header(keys, event.webhook_id.as_bytes(), ts, &event.body);
        let mut req = self
            .client
            .post(sub.url.clone())
            .timeout(sub.timeout)
            .header(CONTENT_TYPE, event.content_type.clone())
            .header(USER_AGENT, self.user_agent.clone())
            .header(&WEBHOOK_ID, event.webhook_id.clone())
            .header(&WEBHOOK_TIMESTAMP, HeaderValue::from(ts))
            .header(&WEBHOOK_SIGNATURE, signature);
        if !sub.headers.is_empty() {
            req = req.headers(sub.headers.clone());
        }
        let result = match req.body(event.body.clone()).send().await {
            Ok(mut resp) => {
                let code = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                // Read a bounded part of the body so small responses free their connection for reuse;
                // larger ones are dropped, which closes the connection.
                let mut read = 0usize;
                let mut body_error = None;
                while read < self.max_response_bytes {
                    match resp.chunk().await {
                        Ok(Some(c)) => {
                            if excerpt.len() < capture {
                                let n = (capture - excerpt.len()).min(c.len());
                                excerpt.extend_from_slice(&c[..n]);
                            }
                            read += c.len()
                        }
                        Ok(None) => break,
                        Err(e) => {
                            body_error = Some(e);
                            break;
                        }
                    }
                }
                match body_error {
                    // A 2xx whose body broke off still counts: the endpoint said it accepted the event.
                    Some(e) if !(200..300).contains(&code) => error_result(&e),
                    _ => AttemptResult::Status { code, retry_after },
                }
            }
            Err(e) => error_result(&e),
        };
        (result, started.elapsed(), excerpt)
    }
}

fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
        url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
        url::Host::Domain(_) => None,
    }
}

fn error_result(e: &reqwest::Error) -> AttemptResult {
    if e.is_timeout() {
        return AttemptResult::Timeout;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<AddressRefused>() {
            return AttemptResult::Refused(r.to_string());
        }
        src = s.source();
    }
    AttemptResult::Connect(error_chain(e))
}

/// A one-line description of an error and its causes, without the URL (which may carry tokens).
fn error_chain(e: &reqwest::Error) -> String {
    let mut out = String::new();
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    if e.is_connect() {
        out.push_str("connect error");
    } else if e.is_request() {
        out.push_str("request error");
    } else if e.is_body() {
        out.push_str("body error");
    } else {
        out.push_str("error");
    }
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
