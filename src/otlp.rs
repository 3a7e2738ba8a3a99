//! One span per delivery attempt, exported over OTLP/HTTP (`[tracing] otlp_endpoint`), continuing the
//! trace the upstream service started (the record's W3C `traceparent`).
//!
//! The delivery path only does two cheap things: [`Tracer::begin`] draws a span id when the record
//! carries a sampled trace context (the outgoing request then carries `traceparent` with *this* span as
//! the parent, so the receiver's own span is a child of the attempt), and [`Tracer::end`] hands the
//! finished span to a bounded queue with `try_send` — never waiting. A background task drains the queue
//! in batches (up to [`BATCH`] spans or one second) and POSTs them as an `ExportTraceServiceRequest`
//! (protobuf, encoded here: the handful of messages involved do not justify a protobuf code generator).
//! A full queue, a collector that is down or answers an error: the spans are dropped and counted
//! (`hookline_trace_spans_dropped_total`), deliveries are unaffected.
//!
//! Records without a trace context, or whose `traceparent` is not sampled (flags bit 0), get no span
//! (parent-based sampling); their `traceparent`, if any, is forwarded unchanged.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::config::OtlpExport;
use crate::deliver::http::{Client, ClientConfig, Target};
use crate::deliver::policy::AddressPolicy;

/// Spans per export request at most.
pub const BATCH: usize = 512;
/// Spans waiting for export at most; beyond, new spans are dropped.
pub const QUEUE: usize = 8192;

/// A span begun for one attempt.
#[derive(Debug, Clone)]
pub struct SpanStart {
    pub trace_id: [u8; 16],
    pub parent_span_id: [u8; 8],
    pub span_id: [u8; 8],
    flags: u8,
    trace_state: Option<Box<str>>,
    start_ns: u64,
    /// `traceparent` for the outgoing request: this span as the parent.
    pub traceparent: [u8; 55],
}

/// A finished span, queued for export.
#[derive(Debug)]
pub struct SpanRecord {
    start: SpanStart,
    end_ns: u64,
    subscription: Box<str>,
    attempt: u32,
    status: Option<u16>,
    result: &'static str,
    ok: bool,
}

/// The delivery path's handle: begins and ends spans, never blocks.
pub struct Tracer {
    tx: mpsc::Sender<SpanRecord>,
    dropped: Counter,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The bytes of a hex field of a `traceparent` (already validated).
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// The span of an attempt of a record with trace context `(traceparent, tracestate)`, when sampled.
pub fn begin(traceparent: &[u8], tracestate: Option<&[u8]>) -> Option<SpanStart> {
    if !crate::deliver::trace::valid_traceparent(traceparent) {
        return None;
    }
    let trace_id = unhex::<16>(&traceparent[3..35])?;
    let parent_span_id = unhex::<8>(&traceparent[36..52])?;
    let flags = unhex::<1>(&traceparent[53..55])?[0];
    if flags & 1 == 0 {
        return None;
    }
    let mut span_id = [0u8; 8];
    while span_id == [0u8; 8] {
        span_id = fastrand::u64(..).to_be_bytes();
    }
    let mut tp = [0u8; 55];
    tp[..3].copy_from_slice(b"00-");
    tp[3..35].copy_from_slice(&traceparent[3..35]);
    tp[35] = b'-';
    hex::encode_to_slice(span_id, &mut tp[36..52]).ok()?;
    tp[52] = b'-';
    tp[53..55].copy_from_slice(&traceparent[53..55]);
    Some(SpanStart {
        trace_id,
        parent_span_id,
        span_id,
        flags,
        trace_state: tracestate
            .and_then(|s| std::str::from_utf8(s).ok())
            .map(Into::into),
        start_ns: now_ns(),
        traceparent: tp,
    })
}

impl Tracer {
    /// Queues the finished span of an attempt; drops it (counted) when the queue is full.
    pub fn end(
        &self,
        start: SpanStart,
        subscription: &str,
        attempt: u32,
        status: Option<u16>,
        result: &'static str,
        ok: bool,
    ) {
        let rec = SpanRecord {
            start,
            end_ns: now_ns(),
            subscription: subscription.into(),
            attempt,
            status,
            result,
            ok,
        };
        if self.tx.try_send(rec).is_err() {
            self.dropped.inc();
        }
    }
}

/// Starts the exporter task; returns the delivery path's [`Tracer`]. The task ends when `stop` fires
/// (at shutdown, after the last deliveries: it exports what is queued at once, without waiting for a
/// batch to fill) or when every `Tracer` is dropped.
pub fn start(
    cfg: OtlpExport,
    exported: Counter,
    dropped: Counter,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(Arc<Tracer>, tokio::task::JoinHandle<()>), String> {
    let target = Target::from_url(&cfg.url)?;
    // The collector is the operator's own infrastructure, not a tenant's endpoint: the delivery
    // address policy does not apply to it.
    let everything = ["0.0.0.0/0", "::/0"]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect();
    let client = Client::new(ClientConfig::new(AddressPolicy::new(everything)));
    let (tx, mut rx) = mpsc::channel::<SpanRecord>(QUEUE);
    let tracer = Arc::new(Tracer {
        tx,
        dropped: dropped.clone(),
    });
    let task = tokio::spawn(async move {
        let mut batch: Vec<SpanRecord> = Vec::with_capacity(BATCH);
        let mut failing = false;
        let mut last = false;
        while !last {
            let first = tokio::select! {
                s = rx.recv() => s,
                _ = stop.cancelled() => None,
            };
            match first {
                Some(s) => batch.push(s),
                None => last = true,
            }
            let until = tokio::time::Instant::now() + cfg.batch_delay;
            while batch.len() < BATCH && !last {
                tokio::select! {
                    got = tokio::time::timeout_at(until, rx.recv()) => match got {
                        Ok(Some(s)) => batch.push(s),
                        Ok(None) => last = true,
                        Err(_) => break,
                    },
                    _ = stop.cancelled() => last = true,
                }
            }
            if last {
                // Shutting down: what is queued now goes out in this (last) export.
                while batch.len() < BATCH
                    && let Ok(s) = rx.try_recv()
                {
                    batch.push(s);
                }
            }
            if batch.is_empty() {
                continue;
            }
            let body = Bytes::from(encode(&cfg.service_name, &batch));
            let deadline = tokio::time::Instant::now() + cfg.timeout;
            let headers = |h: &mut Vec<u8>| {
                h.extend_from_slice(b"content-type: application/x-protobuf\r\n");
            };
            let sent = client.post(&target, headers, &body, 0, deadline).await;
            let n = batch.len() as u64;
            match sent {
                Ok(r) if (200..300).contains(&r.status) => {
                    exported.inc_by(n);
                    if failing {
                        tracing::info!("OTLP collector reachable again; exporting spans");
                        failing = false;
                    }
                }
                other => {
                    dropped.inc_by(n);
                    if !failing {
                        let why = match other {
                            Ok(r) => format!("HTTP {}", r.status),
                            Err(e) => e.to_string(),
                        };
                        tracing::warn!(error = %why, spans = n, "OTLP export failed; spans dropped (counted in hookline_trace_spans_dropped_total) until the collector answers");
                        failing = true;
                    }
                }
            }
            batch.clear();
        }
    });
    Ok((tracer, task))
}

// --- protobuf encoding (opentelemetry-proto: collector/trace/v1, trace/v1, common/v1, resource/v1) ---

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A length-delimited sub-message written by `f`.
fn message(out: &mut Vec<u8>, field: u32, f: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    f(&mut inner);
    bytes_field(out, field, &inner);
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn fixed32(out: &mut Vec<u8>, field: u32, v: u32) {
    key(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}

enum Any<'a> {
    Str(&'a str),
    Int(i64),
}

/// `KeyValue { key = 1; AnyValue value = 2 }`, `AnyValue { string_value = 1; int_value = 3 }`.
fn attribute(out: &mut Vec<u8>, field: u32, k: &str, v: Any<'_>) {
    message(out, field, |kv| {
        bytes_field(kv, 1, k.as_bytes());
        message(kv, 2, |av| match v {
            Any::Str(s) => bytes_field(av, 1, s.as_bytes()),
            Any::Int(i) => {
                key(av, 3, 0);
                varint(av, i as u64);
            }
        });
    });
}

/// `ExportTraceServiceRequest` holding `spans` under one resource (`service.name`) and scope
/// (`hookline`).
pub fn encode(service_name: &str, spans: &[SpanRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + spans.len() * 160);
    // ExportTraceServiceRequest.resource_spans = 1
    message(&mut out, 1, |rs| {
        // ResourceSpans.resource = 1 { attributes = 1 }
        message(rs, 1, |r| {
            attribute(r, 1, "service.name", Any::Str(service_name));
        });
        // ResourceSpans.scope_spans = 2
        message(rs, 2, |ss| {
            // ScopeSpans.scope = 1 { name = 1; version = 2 }
            message(ss, 1, |sc| {
                bytes_field(sc, 1, b"hookline");
                bytes_field(sc, 2, env!("CARGO_PKG_VERSION").as_bytes());
            });
            for s in spans {
                // ScopeSpans.spans = 2
                message(ss, 2, |sp| span(sp, s));
            }
        });
    });
    out
}

fn span(sp: &mut Vec<u8>, s: &SpanRecord) {
    bytes_field(sp, 1, &s.start.trace_id);
    bytes_field(sp, 2, &s.start.span_id);
    if let Some(ts) = &s.start.trace_state {
        bytes_field(sp, 3, ts.as_bytes());
    }
    bytes_field(sp, 4, &s.start.parent_span_id);
    bytes_field(sp, 5, b"webhook delivery");
    // kind = 6: SPAN_KIND_CLIENT (3)
    key(sp, 6, 0);
    varint(sp, 3);
    fixed64(sp, 7, s.start.start_ns);
    fixed64(sp, 8, s.end_ns.max(s.start.start_ns));
    attribute(sp, 9, "hookline.subscription", Any::Str(&s.subscription));
    attribute(sp, 9, "hookline.attempt", Any::Int(i64::from(s.attempt)));
    attribute(sp, 9, "hookline.result", Any::Str(s.result));
    if let Some(code) = s.status {
        attribute(
            sp,
            9,
            "http.response.status_code",
            Any::Int(i64::from(code)),
        );
    }
    // status = 15 { code = 3: STATUS_CODE_OK (1) / STATUS_CODE_ERROR (2) }
    message(sp, 15, |st| {
        key(st, 3, 0);
        varint(st, if s.ok { 1 } else { 2 });
    });
    // flags = 16: the W3C trace flags in the low byte.
    fixed32(sp, 16, u32::from(s.start.flags));
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_sampled_parent_begins_a_child_span_and_the_request_carries_it() {
        let s = begin(TP, Some(b"rojo=1")).unwrap();
        assert_eq!(hex::encode(s.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(s.parent_span_id), "00f067aa0ba902b7");
        assert_ne!(s.span_id, [0; 8]);
        let out = std::str::from_utf8(&s.traceparent).unwrap();
        assert_eq!(
            out,
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                hex::encode(s.span_id)
            )
        );
        assert!(crate::deliver::trace::valid_traceparent(&s.traceparent));
        // Not sampled, or malformed: no span.
        assert!(
            begin(
                b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                None
            )
            .is_none()
        );
        assert!(begin(b"00-junk", None).is_none());
    }

    #[test]
    fn protobuf_wire_format() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let mut v = Vec::new();
        fixed64(&mut v, 7, 1);
        assert_eq!(v, [0x39, 1, 0, 0, 0, 0, 0, 0, 0]);
        let mut v = Vec::new();
        attribute(&mut v, 9, "a", Any::Int(5));
        // field 9 LEN { field 1 LEN "a", field 2 LEN { field 3 VARINT 5 } }
        assert_eq!(v, [0x4a, 7, 0x0a, 1, b'a', 0x12, 2, 0x18, 5]);
        let rec = SpanRecord {
            start: begin(TP, None).unwrap(),
            end_ns: 0,
            subscription: "s".into(),
            attempt: 1,
            status: Some(204),
            result: "delivered",
            ok: true,
        };
        let body = encode("hookline", &[rec]);
        assert_eq!(body[0], 0x0a, "resource_spans, length-delimited");
        // The trace id appears verbatim (field 1 of the span).
        let id = hex::decode("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        assert!(
            body.windows(18)
                .any(|w| w[..2] == [0x0a, 16] && w[2..] == id[..])
        );
    }
}
