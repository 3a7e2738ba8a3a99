//! Delivery receipts (`[receipts] enabled`): one record on `<prefix>.receipts` per terminal outcome of an
//! (event, subscription) — delivered, or dead-lettered with its reason — so that the teams whose services
//! speak Kafka can reconcile, bill or alert on outcomes without calling hookline. The value is JSON
//! (`schemas/receipt.schema.json`), the key the subscription id, and the headers say where the event came
//! from (`hookline-origin-*`, `hookline-subscription`).
//!
//! A receipt is part of settling a delivery: the delivery's share of the source record is done only
//! once Kafka acknowledged its receipt, exactly as for a retry or dead-letter hand-off. So a committed
//! offset never passes an outcome without a receipt; a crash between the outcome and the receipt
//! redelivers the event and receipts it then (a duplicate receipt is possible, a missing one is not).
//! Retry hops are not terminal and have no receipt; records that are not valid events reach no
//! subscription and have none either (they are on the dead-letter topic as `invalid_event`).
//!
//! Receipts have a producer of their own ([`Receipts`]) whose acknowledgements settle what waits on them
//! directly, on librdkafka's polling thread: a delivered attempt hands its [`Completion`] over with the
//! receipt and its task ends, instead of sleeping until the acknowledgement wakes it (the wake-up and
//! the task's second run were a good part of what a receipt cost).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::util::Timeout;
use serde::Serialize;

use super::publish::DlqReason;
use crate::completion::Completion;
use crate::model::{Event, rfc3339_ms};

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    Delivered,
    DeadLettered(DlqReason),
}

/// What a receipt says.
pub struct Receipt<'a> {
    pub event: &'a Event,
    pub subscription_id: &'a str,
    pub tenant: Option<&'a str>,
    pub outcome: Terminal,
    /// Attempts made, the final one included (0 for a delivery dead-lettered without one).
    pub attempts: u32,
    /// When the first attempt started when it was the deciding one, else when it failed (epoch ms).
    pub first_attempt_ms: u64,
    /// When the last attempt ended, or the dead-lettering happened (epoch ms).
    pub last_attempt_ms: u64,
    /// `hookline-last-status`: the HTTP status or the error kind.
    pub last_status: String,
}

#[derive(Serialize)]
struct Json<'a> {
    event_id: &'a str,
    event_type: &'a str,
    subscription_id: &'a str,
    tenant: Option<&'a str>,
    outcome: &'static str,
    reason: Option<&'static str>,
    attempts: u32,
    first_attempt_at: String,
    last_attempt_at: String,
    /// From the source record's timestamp to the last attempt's end; null without a record timestamp.
    latency_ms: Option<u64>,
    last_status: &'a str,
}

/// The receipt's JSON value.
pub fn value(r: &Receipt<'_>) -> Vec<u8> {
    let (outcome, reason) = match r.outcome {
        Terminal::Delivered => ("delivered", None),
        Terminal::DeadLettered(why) => ("dead_lettered", Some(why.as_str())),
    };
    let j = Json {
        event_id: &r.event.id,
        event_type: &r.event.event_type,
        subscription_id: r.subscription_id,
        tenant: r.tenant,
        outcome,
        reason,
        attempts: r.attempts,
        first_attempt_at: rfc3339_ms(r.first_attempt_ms),
        last_attempt_at: rfc3339_ms(r.last_attempt_ms),
        latency_ms: r
            .event
            .origin
            .timestamp_ms
            .map(|ts| r.last_attempt_ms.saturating_sub(ts.max(0) as u64)),
        last_status: &r.last_status,
    };
    serde_json::to_vec(&j).unwrap_or_default()
}

/// What the acknowledgement of a receipt settles.
pub enum Ack {
    /// A delivery's share of its source record: done once Kafka has the receipt.
    Record(Completion),
    /// A settlement that waits for the receipt (dead letters, ordered deliveries).
    Notify(tokio::sync::oneshot::Sender<()>),
}

impl Ack {
    fn settle(self) {
        match self {
            Ack::Record(done) => done.done(),
            Ack::Notify(tx) => {
                let _ = tx.send(());
            }
        }
    }
}

/// The receipts producer's context: settles acknowledged receipts, sends failed ones again.
struct Settle {
    topic: String,
    /// For sending failed receipts again from the polling thread.
    runtime: tokio::runtime::Handle,
    counted: prometheus_client::metrics::counter::Counter,
    /// Filled in once the producer exists (a failed receipt is sent again through it).
    producer: std::sync::OnceLock<std::sync::Weak<BaseProducer<Settle>>>,
}

impl ClientContext for Settle {}

impl ProducerContext for Settle {
    type DeliveryOpaque = Box<Ack>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Box<Ack>) {
        match result {
            Ok(_) => {
                self.counted.inc();
                ack.settle();
            }
            // librdkafka has retried for `message.timeout.ms` already. The record stays in flight (its
            // offset is not committed) and the receipt is sent again after a pause, until Kafka takes it.
            Err((e, msg)) => {
                tracing::warn!(topic = %self.topic, error = %e, retry_in_ms = 1000u64, "publishing a receipt failed; the source record stays in flight until it succeeds");
                let Some(producer) = self.producer.get().and_then(std::sync::Weak::upgrade) else {
                    return; // shutting down: the record stays uncommitted, redelivered next time
                };
                let key = msg.key().map(<[u8]>::to_vec);
                let value = msg.payload().map(<[u8]>::to_vec).unwrap_or_default();
                let headers = msg.headers().map(|h| h.detach());
                let topic = self.topic.clone();
                self.runtime.spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    send(
                        &producer,
                        &topic,
                        key.as_deref(),
                        &value,
                        headers.unwrap_or_default(),
                        *ack,
                    )
                    .await;
                });
            }
        }
    }
}

/// The receipts producer (idempotent, `acks=all`, like the retry producer).
///
/// Its acknowledgements are served by a thread of its own that waits for them without a timeout. (A
/// `ThreadedProducer` polls with 100 ms timeouts, and rdkafka rounds the remaining time down to whole
/// milliseconds, so the last millisecond of every period is a busy loop: measured ~3 % of a core per
/// producer, a fixed cost that at 10 000 deliveries a second is ~3 µs per delivery.) The thread and
/// the producer live as long as the process.
pub struct Receipts {
    producer: Arc<BaseProducer<Settle>>,
    topic: String,
}

impl Receipts {
    /// A producer for `topic` with the retry producer's settings (`config`), counting acknowledged
    /// receipts in `counted`. Needs a tokio runtime.
    pub fn new(
        config: ClientConfig,
        topic: String,
        counted: prometheus_client::metrics::counter::Counter,
    ) -> Result<Receipts, KafkaError> {
        let mut config = config;
        config.set("client.id", "hookline-receipts");
        let context = Settle {
            topic: topic.clone(),
            runtime: tokio::runtime::Handle::current(),
            counted,
            producer: std::sync::OnceLock::new(),
        };
        let producer: Arc<BaseProducer<Settle>> = Arc::new(config.create_with_context(context)?);
        let _ = producer.context().producer.set(Arc::downgrade(&producer));
        let polled = Arc::clone(&producer);
        std::thread::Builder::new()
            .name("hookline-receipts".into())
            .spawn(move || polled.poll(Timeout::Never))
            .map_err(|e| {
                KafkaError::ClientCreation(format!("cannot start the receipts thread: {e}"))
            })?;
        Ok(Receipts { producer, topic })
    }

    /// Sends a receipt (`value`, keyed `key`); `ack` is settled once Kafka acknowledged it. Returns once
    /// librdkafka queued it (waiting only while its queue is full).
    pub async fn send(&self, key: &[u8], value: &[u8], headers: OwnedHeaders, ack: Ack) {
        send(&self.producer, &self.topic, Some(key), value, headers, ack).await;
    }

    /// Waits for outstanding receipts (shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "receipts producer flush incomplete");
        }
    }
}

async fn send(
    producer: &BaseProducer<Settle>,
    topic: &str,
    key: Option<&[u8]>,
    value: &[u8],
    headers: OwnedHeaders,
    ack: Ack,
) {
    let mut rec = BaseRecord::<[u8], [u8], Box<Ack>>::with_opaque_to(topic, Box::new(ack))
        .payload(value)
        .headers(headers);
    if let Some(k) = key {
        rec = rec.key(k);
    }
    let mut backoff = Duration::from_millis(10);
    loop {
        match producer.send(rec) {
            Ok(()) => return,
            Err((e, back)) => {
                if e.rdkafka_error_code() != Some(RDKafkaErrorCode::QueueFull) {
                    tracing::warn!(topic, error = %e, "queueing a receipt failed; trying again");
                }
                rec = back;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Encoding, Origin, webhook_id};
    use http::HeaderValue;

    fn event(ts: Option<i64>) -> Event {
        Event {
            id: "evt-1".into(),
            event_type: "order.created".into(),
            tenant: Some("acme".into()),
            encoding: Encoding::Plain,
            body: bytes::Bytes::from_static(b"{}"),
            content_type: HeaderValue::from_static("application/json"),
            webhook_id: webhook_id("evt-1"),
            headers: vec![],
            origin: Origin {
                topic: "orders".into(),
                partition: 2,
                offset: 41,
                timestamp_ms: ts,
            },
        }
    }

    #[test]
    fn a_receipt_names_the_outcome_attempts_and_latency() {
        let e = event(Some(1_700_000_000_000));
        let r = Receipt {
            event: &e,
            subscription_id: "6f1c2a54-6d0e-4c57-9d43-3f0c2b1a0001",
            tenant: Some("acme"),
            outcome: Terminal::DeadLettered(DlqReason::Exhausted),
            attempts: 4,
            first_attempt_ms: 1_700_000_000_010,
            last_attempt_ms: 1_700_000_006_500,
            last_status: "503".into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&value(&r)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "event_id": "evt-1",
                "event_type": "order.created",
                "subscription_id": "6f1c2a54-6d0e-4c57-9d43-3f0c2b1a0001",
                "tenant": "acme",
                "outcome": "dead_lettered",
                "reason": "exhausted",
                "attempts": 4,
                "first_attempt_at": "2023-11-14T22:13:20.010Z",
                "last_attempt_at": "2023-11-14T22:13:26.500Z",
                "latency_ms": 6500,
                "last_status": "503",
            })
        );
        let e = event(None);
        let r = Receipt {
            event: &e,
            outcome: Terminal::Delivered,
            attempts: 1,
            tenant: None,
            ..r
        };
        let v: serde_json::Value = serde_json::from_slice(&value(&r)).unwrap();
        assert_eq!(v["outcome"], "delivered");
        assert_eq!(v["reason"], serde_json::Value::Null);
        assert_eq!(v["latency_ms"], serde_json::Value::Null);
        assert_eq!(v["tenant"], serde_json::Value::Null);
    }
}
