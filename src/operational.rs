//! Operational events (`[operational] enabled`): what operators want to be told, as records on
//! `<prefix>.events` — `endpoint.disabled` (410 Gone, failing for `delivery.disable_after`, or an
//! operator), `endpoint.enabled`, `endpoint.breaker_opened`, `endpoint.breaker_closed`,
//! `message.exhausted`.
//!
//! Once per occurrence across the group: several instances can see the same occurrence (each gets a 410
//! from the same endpoint, each finds it failing), so every occurrence has a key derived from what they
//! all see alike — the subscription and the version (`updated_at`) of it that was disabled, or the
//! subscription and the message — and only the instance whose claim of that key the store applies
//! (`Store::claim`: first writer wins, a lightweight transaction on ScyllaDB) publishes the event. The
//! event id is a hash of the key, so it is stable: a consumer can also drop repeats. A store that cannot
//! be reached when claiming does not silence the event (it is published, perhaps twice); a read-only
//! store cannot coordinate, so each instance reports what it saw.
//!
//! Breakers are per instance, so a breaker episode has no key every instance sees alike; the group
//! numbers episodes instead ([`BreakerEpisodes`]): an opening claims `breaker_opened:<sub>:<n>` for the
//! episode number `n` it knows, a closing claims `breaker_closed:<sub>:<n>` and moves on to `n + 1`. An
//! instance that finds episode `n` already opened by another learns from `claimed` whether that
//! episode is over (then it tries `n + 1`) or still open (then there is nothing to report). So the first
//! instance to open reports the opening, the first to close reports the closing, and the re-openings of
//! one episode (a failed half-open probe) are not new events.
//!
//! Reporting never holds up a delivery: it runs in a task, and a publish that keeps failing is retried
//! for a minute, then dropped with a warning and counted.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::model::rfc3339_ms;
use crate::store::Store;

/// The kinds of operational event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    EndpointDisabled,
    EndpointEnabled,
    BreakerOpened,
    BreakerClosed,
    MessageExhausted,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::EndpointDisabled => "endpoint.disabled",
            Kind::EndpointEnabled => "endpoint.enabled",
            Kind::BreakerOpened => "endpoint.breaker_opened",
            Kind::BreakerClosed => "endpoint.breaker_closed",
            Kind::MessageExhausted => "message.exhausted",
        }
    }
}

/// The stable id of the event of an occurrence: `op_` + 32 hex digits of SHA-256(kind ‖ key).
pub fn event_id(kind: Kind, occurrence: &str) -> String {
    let d = Sha256::digest(format!("{}\n{occurrence}", kind.as_str()).as_bytes());
    format!("op_{}", hex::encode(&d[..16]))
}

/// The record value: an event in hookline's plain envelope (`id`, `type`, `timestamp`, `data`), so that
/// it can be consumed — or delivered as a webhook — like any other event.
pub fn value(
    kind: Kind,
    occurrence: &str,
    subscription: &str,
    tenant: Option<&str>,
    at_ms: u64,
    data: Value,
) -> Value {
    let mut d = json!({"subscription_id": subscription, "tenant": tenant});
    if let (Value::Object(m), Value::Object(extra)) = (&mut d, data) {
        m.extend(extra);
    }
    json!({
        "id": event_id(kind, occurrence),
        "type": kind.as_str(),
        "timestamp": rfc3339_ms(at_ms),
        "data": d,
    })
}

/// A subscription's breaker episodes as this instance knows them (kept across cache reloads).
#[derive(Debug, Default)]
pub struct BreakerEpisodes {
    /// The episode number this instance is at.
    n: std::sync::atomic::AtomicU64,
    /// Reports of one subscription run in order (an opening's claim before the closing's).
    order: tokio::sync::Mutex<()>,
}

pub struct Reporter {
    producer: FutureProducer,
    topic: String,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Reporter {
    pub fn new(
        producer: FutureProducer,
        topic: String,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Reporter {
        Reporter {
            producer,
            topic,
            store,
            metrics,
        }
    }

    /// Reports an occurrence (in the background): claimed under `kind:occurrence`, published when this
    /// instance's claim applied.
    pub fn report(
        self: &Arc<Self>,
        kind: Kind,
        occurrence: String,
        subscription: &str,
        tenant: Option<&str>,
        data: Value,
    ) {
        let this = Arc::clone(self);
        let at = now_ms();
        let v = value(kind, &occurrence, subscription, tenant, at, data);
        let subscription = subscription.to_string();
        tokio::spawn(async move {
            let key = format!("{}:{occurrence}", kind.as_str());
            match this.store.claim(&key).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(kind = kind.as_str(), subscription = %subscription, error = %e, "cannot claim an operational event in the store; publishing it anyway (another instance may too)");
                }
            }
            this.publish(kind, &subscription, &v).await;
        });
    }

    /// Reports this instance's breaker of `subscription` opening or closing (in the background), once
    /// per episode across the group (see the module documentation).
    pub fn breaker(
        self: &Arc<Self>,
        opened: bool,
        subscription: &str,
        tenant: Option<&str>,
        episodes: Arc<BreakerEpisodes>,
    ) {
        use std::sync::atomic::Ordering;
        let this = Arc::clone(self);
        let subscription = subscription.to_string();
        let tenant = tenant.map(String::from);
        tokio::spawn(async move {
            let _in_order = episodes.order.lock().await;
            let key = |kind: Kind, n: u64| format!("{}:{subscription}:{n}", kind.as_str());
            let claim = |k: String| {
                let store = this.store.clone();
                async move { store.claim(&k).await }
            };
            let report = |kind: Kind, n: u64| {
                let v = value(
                    kind,
                    &format!("{subscription}:{n}"),
                    &subscription,
                    tenant.as_deref(),
                    now_ms(),
                    json!({"episode": n}),
                );
                let this = this.clone();
                let subscription = subscription.clone();
                async move { this.publish(kind, &subscription, &v).await }
            };
            let failed = |e: crate::store::StoreError| {
                tracing::warn!(subscription = %subscription, error = %e, "cannot claim a breaker event in the store; not reported");
            };
            if opened {
                // Catch up with episodes others opened and closed meanwhile (at most a few steps).
                for _ in 0..1000 {
                    let n = episodes.n.load(Ordering::Relaxed);
                    match claim(key(Kind::BreakerOpened, n)).await {
                        Ok(true) => return report(Kind::BreakerOpened, n).await,
                        Ok(false) => {}
                        Err(e) => return failed(e),
                    }
                    match this.store.claimed(&key(Kind::BreakerClosed, n)).await {
                        Ok(true) => episodes.n.store(n + 1, Ordering::Relaxed),
                        // Episode n is open in the group already: nothing new to report.
                        Ok(false) => return,
                        Err(e) => return failed(e),
                    }
                }
            } else {
                let n = episodes.n.load(Ordering::Relaxed);
                let won = match claim(key(Kind::BreakerClosed, n)).await {
                    Ok(w) => w,
                    Err(e) => return failed(e),
                };
                episodes.n.store(n + 1, Ordering::Relaxed);
                // Only an episode that was reported open is reported closed.
                if won
                    && matches!(
                        this.store.claimed(&key(Kind::BreakerOpened, n)).await,
                        Ok(true)
                    )
                {
                    report(Kind::BreakerClosed, n).await;
                }
            }
        });
    }

    async fn publish(&self, kind: Kind, subscription: &str, v: &Value) {
        let payload = serde_json::to_vec(v).unwrap_or_default();
        let hs = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(b"application/json".as_slice()),
        });
        let mut backoff = Duration::from_millis(100);
        let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let rec = FutureRecord::<str, [u8]>::to(&self.topic)
                .key(subscription)
                .payload(&payload)
                .headers(hs.clone());
            match self.producer.send(rec, Duration::from_secs(5)).await {
                Ok(_) => {
                    self.metrics.operational_event(kind.as_str()).inc();
                    tracing::info!(kind = kind.as_str(), subscription = %subscription, "operational event published");
                    return;
                }
                Err((e, _)) if tokio::time::Instant::now() + backoff < give_up => {
                    tracing::debug!(error = %e, "operational event publish failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err((e, _)) => {
                    self.metrics.operational_dropped.inc();
                    tracing::warn!(kind = kind.as_str(), subscription = %subscription, error = %e, "operational event dropped after a minute of failed publishes");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_per_occurrence_and_values_carry_the_data() {
        let a = event_id(Kind::EndpointDisabled, "s1:2026-12-02T10:00:00.000Z");
        assert_eq!(
            a,
            event_id(Kind::EndpointDisabled, "s1:2026-12-02T10:00:00.000Z")
        );
        assert_ne!(
            a,
            event_id(Kind::EndpointEnabled, "s1:2026-12-02T10:00:00.000Z")
        );
        assert_ne!(
            a,
            event_id(Kind::EndpointDisabled, "s1:2026-12-02T10:00:01.000Z")
        );
        assert!(a.starts_with("op_") && a.len() == 35);
        let v = value(
            Kind::MessageExhausted,
            "s1:evt-1",
            "s1",
            Some("acme"),
            1_700_000_000_000,
            json!({"event_id": "evt-1", "attempts": 4}),
        );
        assert_eq!(
            v,
            json!({
                "id": event_id(Kind::MessageExhausted, "s1:evt-1"),
                "type": "message.exhausted",
                "timestamp": "2023-11-14T22:13:20.000Z",
                "data": {"subscription_id": "s1", "tenant": "acme", "event_id": "evt-1", "attempts": 4},
            })
        );
    }
}
