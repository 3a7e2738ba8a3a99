//! Delivery receipts (`[receipts] enabled`): one record on `<prefix>.receipts` per terminal outcome of an
//! (event, subscription) — delivered, or dead-lettered with its reason — so that the teams whose services
//! speak Kafka can reconcile, bill or alert on outcomes without calling hookline. The value is JSON
//! (`schemas/receipt.schema.json`), the key the subscription id, and the headers say where the event came
//! from (`hookline-origin-*`, `hookline-subscription`).
//!
//! A receipt is part of settling a delivery: the dispatcher awaits Kafka's acknowledgement of it before
//! the delivery's share of the source record is done, exactly as for a retry or dead-letter hand-off. So
//! a committed offset never passes an outcome without a receipt; a crash between the outcome and the
//! receipt redelivers the event and receipts it then (a duplicate receipt is possible, a missing one is
//! not). Retry hops are not terminal and have no receipt; records that are not valid events reach no
//! subscription and have none either (they are on the dead-letter topic as `invalid_event`).

use serde::Serialize;

use super::publish::DlqReason;
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
