//! The parked keys of an ordered subscription (`GET /v1/subscriptions/{id}/parked-keys`) and an
//! operator's release or skip of one (`POST …/parked-keys/release`, `…/skip`).
//!
//! The listing shows the keys parked in the whole group: those of the partitions this instance owns
//! from memory, the others as their owners published them on `<prefix>.parked-keys` (every change
//! within about 2 s, each key again every 30 s; a state older than 90 s is left out). A release or skip is written to the
//! key's parked partition as a control record, so it reaches the owner whichever instance serves the
//! request, and it applies only to the event it names (a request that arrives after the key moved on
//! changes nothing).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, ApiState, Principal, body_object, ok, parse_id};
use std::collections::HashMap;

use crate::clock::{mono_ms, now_ms};
use crate::order::{Control, KeyState, STALE_AFTER_MS};
use crate::retry::headers as h;
use axum::Extension;

/// What the API needs for parked keys: this instance's partitions and a producer for control records.
#[derive(Clone)]
pub struct OrderApi {
    pub source: crate::source::SourceHandle,
    pub producer: rdkafka::producer::FutureProducer,
    pub prefix: String,
    pub topics: Vec<String>,
}

fn key_json(k: &[u8]) -> Value {
    match std::str::from_utf8(k) {
        Ok(s) => json!(s),
        Err(_) => Value::Null,
    }
}

fn unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        None,
        "ordered delivery is not running on this instance",
    )
}

pub(super) async fn list(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    let id = parse_id(&id)?;
    s.existing(&who, id).await?;
    let order = s.order.as_ref().ok_or_else(unavailable)?;
    let (now, mono) = (now_ms(), mono_ms());
    let mut keys: Vec<KeyState> = Vec::new();
    let mut partitions = Vec::new();
    let mut owned = std::collections::HashSet::new();
    for po in order.source.orders() {
        partitions.push(
            json!({"topic": &*po.source_topic, "partition": po.partition, "ready": po.is_ready()}),
        );
        owned.insert((po.source_topic.to_string(), po.partition));
        keys.extend(
            po.key_states(now, mono)
                .into_iter()
                .filter(|k| k.subscription == id),
        );
    }
    // The other instances' keys, as they published them (partitions owned here are answered from
    // memory above).
    // The read runs on the blocking pool, as the dead-letter listing's does (at most two at once).
    let topic = crate::retry::parked_keys_topic(&order.prefix);
    let _permit = s
        .listings
        .acquire()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, None, e.to_string()))?;
    let (config, handle, t) = (
        s.config.clone(),
        tokio::runtime::Handle::current(),
        topic.clone(),
    );
    let read = tokio::task::spawn_blocking(move || {
        let mut latest: HashMap<String, Option<KeyState>> = HashMap::new();
        handle
            .block_on(crate::replay::read_topic(&config, &t, async |m| {
                if let Some(k) = m.key().and_then(|k| std::str::from_utf8(k).ok()) {
                    let v = m
                        .payload()
                        .and_then(|p| serde_json::from_slice::<KeyState>(p).ok());
                    latest.insert(k.to_string(), v);
                }
                Ok(true)
            }))
            .map(|()| latest)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()))?;
    let group = match read {
        Ok(latest) => {
            keys.extend(latest.into_values().flatten().filter(|k| {
                k.subscription == id
                    && now.saturating_sub(k.updated_at_ms) <= STALE_AFTER_MS
                    && !owned.contains(&(k.topic.clone(), k.partition))
            }));
            true
        }
        Err(e) => {
            tracing::warn!(topic = %topic, error = %e, "parked keys of other instances unknown");
            false
        }
    };
    keys.sort_by_key(|k| k.parked_at_ms);
    let data: Vec<Value> = keys
        .iter()
        .map(|k| {
            let raw = STANDARD.decode(&k.key_base64).unwrap_or_default();
            let here = owned.contains(&(k.topic.clone(), k.partition));
            json!({
                "key": key_json(&raw),
                "key_base64": k.key_base64,
                "topic": k.topic,
                "partition": k.partition,
                "offset": k.offset,
                "state": k.state,
                "backlog": k.backlog,
                "parked_for_ms": now.saturating_sub(k.parked_at_ms),
                "owner": if here { "this instance" } else { k.instance.as_str() },
            })
        })
        .collect();
    Ok(ok(
        StatusCode::OK,
        json!({"data": data, "partitions": partitions, "group": group}),
    ))
}

pub(super) async fn release(
    s: State<ApiState>,
    who: Extension<Principal>,
    id: Path<String>,
    body: Bytes,
) -> ApiResult {
    request(s, who, id, body, Control::Release).await
}

pub(super) async fn skip(
    s: State<ApiState>,
    who: Extension<Principal>,
    id: Path<String>,
    body: Bytes,
) -> ApiResult {
    request(s, who, id, body, Control::Skip).await
}

/// Body: `key` (or `key_base64`), and `topic`, `partition`, `offset` of the event to release or skip
/// (optional when the key's partition is owned here: its head is taken).
async fn request(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
    c: Control,
) -> ApiResult {
    let id = parse_id(&id)?;
    s.existing(&who, id).await?;
    let order = s.order.as_ref().ok_or_else(unavailable)?;
    let b = body_object(&body, false)?;
    for k in b.keys() {
        if !["key", "key_base64", "topic", "partition", "offset"].contains(&k.as_str()) {
            return Err(ApiError::bad(k, "unknown field"));
        }
    }
    let key: Vec<u8> = match (b.get("key"), b.get("key_base64")) {
        (Some(Value::String(k)), None) if !k.is_empty() => k.as_bytes().to_vec(),
        (None, Some(Value::String(k))) => STANDARD
            .decode(k)
            .ok()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::bad("key_base64", "must be non-empty base64"))?,
        (Some(_), Some(_)) => return Err(ApiError::bad("key", "give key or key_base64, not both")),
        (Some(_), None) => return Err(ApiError::bad("key", "must be a non-empty string")),
        (None, Some(_)) => return Err(ApiError::bad("key_base64", "must be non-empty base64")),
        (None, None) => return Err(ApiError::bad("key", "is required")),
    };
    let topic = match b.get("topic") {
        None => None,
        Some(Value::String(t)) if order.topics.contains(t) => Some(t.clone()),
        Some(_) => return Err(ApiError::bad("topic", "must be one of source.topics")),
    };
    let partition = match b.get("partition") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|p| *p <= i32::MAX as u64)
                .ok_or_else(|| ApiError::bad("partition", "must be a partition number"))?
                as i32,
        ),
    };
    let offset = match b.get("offset") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|o| *o <= i64::MAX as u64)
                .ok_or_else(|| ApiError::bad("offset", "must be an offset"))? as i64,
        ),
    };
    // What this instance knows of the key (its partition may be owned here).
    let local = order.source.orders().into_iter().find_map(|po| {
        if topic.as_deref().is_some_and(|t| t != &*po.source_topic)
            || partition.is_some_and(|p| p != po.partition)
        {
            return None;
        }
        po.parked_lanes()
            .into_iter()
            .find(|v| v.key.0 == id && v.key.1[..] == key[..])
            .map(|v| (po.source_topic.to_string(), po.partition, v.head))
    });
    let (topic, partition, offset) = match (topic, partition, offset, local) {
        (Some(t), Some(p), Some(o), _) => (t, p, o),
        (_, _, o, Some((t, p, Some(head)))) => (t, p, o.unwrap_or(head)),
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                Some("key"),
                "no such parked key in the partitions owned by this instance; give topic, partition and offset (from its owner's listing)",
            ));
        }
    };
    let parked = crate::order::parked_topic(&order.prefix, &topic);
    let sub = id.to_string();
    let (p, o) = (partition.to_string(), offset.to_string());
    let hs = OwnedHeaders::new_with_capacity(5)
        .insert(Header {
            key: h::SUBSCRIPTION,
            value: Some(sub.as_bytes()),
        })
        .insert(Header {
            key: h::ORIGIN_TOPIC,
            value: Some(topic.as_bytes()),
        })
        .insert(Header {
            key: h::ORIGIN_PARTITION,
            value: Some(p.as_bytes()),
        })
        .insert(Header {
            key: h::ORIGIN_OFFSET,
            value: Some(o.as_bytes()),
        })
        .insert(Header {
            key: h::PARKED,
            value: Some(c.as_str().as_bytes()),
        });
    let rec = FutureRecord::<[u8], [u8]>::to(&parked)
        .partition(partition)
        .key(&key)
        .payload(&[])
        .headers(hs);
    order
        .producer
        .send(rec, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                format!("the request could not be written to {parked}: {e}"),
            )
        })?;
    tracing::info!(subscription = %id, topic = %topic, partition, offset, action = c.as_str(), "parked key request written");
    Ok(ok(
        StatusCode::ACCEPTED,
        json!({
            "action": c.as_str(),
            "key": key_json(&key),
            "key_base64": STANDARD.encode(&key),
            "topic": topic,
            "partition": partition,
            "offset": offset,
        }),
    ))
}
