//! Decoding a Kafka record into an [`Event`] (DESIGN §2).
//!
//! Per record, in this order:
//! 1. CloudEvents binary mode when a `ce_specversion` header is present: attributes from `ce_*` headers,
//!    the value is the data (any bytes).
//! 2. Otherwise the value must be a JSON object. CloudEvents structured mode when it has `specversion`
//!    (or the content type is `application/cloudevents+json`), else the plain envelope `{id, type, …}`.
//!
//! The JSON is parsed once, borrowing from the value, reading only the attributes hookline needs (the rest
//! is validated and skipped). A record that cannot be decoded yields an [`Invalid`] with a metric-friendly
//! reason and a human-readable detail; it never panics.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::header::HeaderValue;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::model::{Encoding, Event, Origin, webhook_id};

/// Why a record is not a valid event. `reason` is a fixed label (metrics), `detail` a short explanation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Invalid {
    pub reason: &'static str,
    pub detail: String,
}

/// Every `reason` label [`decode`] can give (the metric's series exist from the start, at zero).
pub const INVALID_REASONS: [&str; 11] = [
    "too_large",
    "bad_header",
    "not_json",
    "not_object",
    "duplicate_attribute",
    "missing_attribute",
    "bad_attribute",
    "missing_id",
    "bad_id",
    "missing_type",
    "bad_type",
];

fn invalid(reason: &'static str, detail: impl Into<String>) -> Invalid {
    debug_assert!(
        INVALID_REASONS.contains(&reason),
        "unlisted reason {reason}"
    );
    Invalid {
        reason,
        detail: detail.into(),
    }
}

/// One record as handed over by the source: borrowed value and headers.
pub struct RawRecord<'a> {
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
}

const MAX_ID_BYTES: usize = 1024;
/// Deepest nesting of arrays and objects accepted in a JSON event (serde_json's own limit for values,
/// which receivers' parsers often share).
const MAX_DEPTH: usize = 128;

/// The byte offset where a JSON text first nests deeper than `max`, if it does. One pass, no allocation;
/// brackets inside strings do not count, and strings (most of an event's bytes) are skipped with
/// `memchr` rather than byte by byte. serde_json's own depth limit does not cover values it skips or
/// keeps raw (`data`), so this check does.
fn too_deep(json: &[u8], max: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = json.get(i) {
        match b {
            b'"' => {
                i += 1;
                // To the closing quote: a backslash escapes the byte after it.
                loop {
                    let j = i + memchr::memchr2(b'"', b'\\', json.get(i..)?)?;
                    if json[j] == b'"' {
                        i = j;
                        break;
                    }
                    i = j + 2;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return Some(i);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}
const MAX_TYPE_BYTES: usize = 255;
const MAX_HEADERS: usize = 256;

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    specversion: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "type")]
    event_type: Option<&'a RawValue>,
    #[serde(borrow, default)]
    source: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tenant: Option<&'a RawValue>,
    #[serde(borrow, default)]
    datacontenttype: Option<&'a RawValue>,
}

fn header<'a>(headers: &'a [(&'a str, Option<&'a [u8]>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| *v)
}

fn header_str<'a>(
    headers: &'a [(&'a str, Option<&'a [u8]>)],
    name: &str,
) -> Result<Option<&'a str>, Invalid> {
    match header(headers, name) {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v)
            .map(Some)
            .map_err(|_| invalid("bad_header", format!("header {name} is not UTF-8"))),
    }
}

/// A JSON string attribute (`Cow` borrows unless it has escapes). Absent → `None`; not a string → error.
fn json_str<'a>(raw: Option<&'a RawValue>, name: &str) -> Result<Option<Cow<'a, str>>, Invalid> {
    let Some(raw) = raw else { return Ok(None) };
    let text = raw.get();
    if text == "null" {
        return Ok(None);
    }
    if !text.starts_with('"') {
        return Err(invalid(
            if name == "id" {
                "bad_id"
            } else if name == "type" {
                "bad_type"
            } else {
                "bad_attribute"
            },
            format!("`{name}` must be a string"),
        ));
    }
    let s: Cow<'a, str> =
        serde_json::from_str(text).map_err(|e| invalid("not_json", format!("`{name}`: {e}")))?;
    Ok(Some(s))
}

fn check_id(id: Option<&str>) -> Result<&str, Invalid> {
    match id {
        None => Err(invalid("missing_id", "no event id")),
        Some("") => Err(invalid("missing_id", "empty event id")),
        Some(s) if s.len() > MAX_ID_BYTES => Err(invalid(
            "bad_id",
            format!("id longer than {MAX_ID_BYTES} bytes"),
        )),
        Some(s) => Ok(s),
    }
}

fn check_type(t: Option<&str>) -> Result<&str, Invalid> {
    match t {
        None => Err(invalid("missing_type", "no event type")),
        Some("") => Err(invalid("missing_type", "empty event type")),
        Some(s) if s.len() > MAX_TYPE_BYTES || !s.bytes().all(|b| b.is_ascii_graphic()) => {
            Err(invalid(
                "bad_type",
                format!("type must be 1-{MAX_TYPE_BYTES} visible ASCII characters"),
            ))
        }
        Some(s) => Ok(s),
    }
}

fn content_type(s: Option<&str>, default: &'static str) -> HeaderValue {
    s.and_then(|s| HeaderValue::from_str(s).ok())
        .unwrap_or_else(|| HeaderValue::from_static(default))
}

/// Decodes one record. `value` is copied once into the event body (shared by all its deliveries).
pub fn decode(record: &RawRecord<'_>, origin: Origin, max_bytes: usize) -> Result<Event, Invalid> {
    let value = record.value.unwrap_or_default();
    if value.len() > max_bytes {
        return Err(invalid(
            "too_large",
            format!("value is {} bytes, limit {max_bytes}", value.len()),
        ));
    }
    if record.headers.len() > MAX_HEADERS {
        return Err(invalid(
            "bad_header",
            format!("{} headers, limit {MAX_HEADERS}", record.headers.len()),
        ));
    }
    let headers = record.headers;
    let header_tenant = header_str(headers, "tenant")?;
    let ct_header = header_str(headers, "content-type")?;

    let (encoding, id, event_type, tenant, ct) = if header(headers, "ce_specversion").is_some() {
        let id = check_id(header_str(headers, "ce_id")?)?;
        let t = check_type(header_str(headers, "ce_type")?)?;
        if header_str(headers, "ce_source")?.is_none_or(str::is_empty) {
            return Err(invalid(
                "missing_attribute",
                "CloudEvents binary mode without ce_source",
            ));
        }
        let tenant = header_str(headers, "ce_tenant")?.or(header_tenant);
        let ct = ct_header.or(header_str(headers, "ce_datacontenttype")?);
        (
            Encoding::CloudEventsBinary,
            Cow::Borrowed(id),
            Cow::Borrowed(t),
            tenant.map(Cow::Borrowed),
            content_type(ct, "application/json"),
        )
    } else {
        if value.is_empty() {
            return Err(invalid("not_json", "empty value"));
        }
        let text = std::str::from_utf8(value)
            .map_err(|e| invalid("not_json", format!("not UTF-8: {e}")))?;
        // serde's derived structs would also accept a JSON array positionally; events are objects.
        if !text.trim_start().starts_with('{') {
            let reason = if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
                "not_object"
            } else {
                "not_json"
            };
            return Err(invalid(reason, "value is not a JSON object"));
        }
        if let Some(d) = too_deep(value, MAX_DEPTH) {
            return Err(invalid(
                "not_json",
                format!("nested deeper than {MAX_DEPTH} levels (at byte {d})"),
            ));
        }
        let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| {
            let reason = if !e.is_data() {
                "not_json"
            } else if e.to_string().starts_with("duplicate field") {
                "duplicate_attribute"
            } else {
                "not_object"
            };
            invalid(reason, e.to_string())
        })?;
        let id = json_str(env.id, "id")?;
        let t = json_str(env.event_type, "type")?;
        let tenant = match json_str(env.tenant, "tenant")? {
            Some(t) => Some(t),
            None => header_tenant.map(Cow::Borrowed),
        };
        check_id(id.as_deref())?;
        check_type(t.as_deref())?;
        let structured = env.specversion.is_some()
            || ct_header.is_some_and(|c| c.starts_with("application/cloudevents+json"));
        if structured {
            json_str(env.specversion, "specversion")?
                .ok_or_else(|| invalid("missing_attribute", "CloudEvents without specversion"))?;
            if json_str(env.source, "source")?.is_none_or(|s| s.is_empty()) {
                return Err(invalid("missing_attribute", "CloudEvents without source"));
            }
            let _ = json_str(env.datacontenttype, "datacontenttype")?;
            (
                Encoding::CloudEventsStructured,
                id.unwrap_or_default(),
                t.unwrap_or_default(),
                tenant,
                content_type(ct_header, "application/cloudevents+json"),
            )
        } else {
            (
                Encoding::Plain,
                id.unwrap_or_default(),
                t.unwrap_or_default(),
                tenant,
                content_type(ct_header, "application/json"),
            )
        }
    };
    if tenant.as_deref() == Some("") {
        return Err(invalid("bad_attribute", "empty tenant"));
    }

    Ok(Event {
        webhook_id: webhook_id(&id),
        id: id.into(),
        event_type: event_type.into(),
        tenant: tenant.map(Into::into),
        encoding,
        body: Bytes::copy_from_slice(value),
        content_type: ct,
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    (*k).into(),
                    v.map(Bytes::copy_from_slice).unwrap_or_default(),
                )
            })
            .collect(),
        origin,
    })
}

/// The JSON document filters evaluate (see [`crate::matching::filter`]).
pub fn filter_document(event: &Event) -> serde_json::Value {
    match event.encoding {
        Encoding::CloudEventsStructured | Encoding::Plain => {
            serde_json::from_slice(&event.body).unwrap_or(serde_json::Value::Null)
        }
        Encoding::CloudEventsBinary => {
            let h = |name: &str| {
                event
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .and_then(|(_, v)| std::str::from_utf8(v).ok())
                    .map(|s| serde_json::Value::String(s.to_string()))
                    .unwrap_or(serde_json::Value::Null)
            };
            serde_json::json!({
                "id": &*event.id,
                "type": &*event.event_type,
                "source": h("ce_source"),
                "subject": h("ce_subject"),
                "tenant": event.tenant.as_deref(),
                "data": serde_json::from_slice::<serde_json::Value>(&event.body).unwrap_or(serde_json::Value::Null),
            })
        }
    }
}

/// An origin for tests and tools that decode outside the source loop.
pub fn test_origin() -> Origin {
    Origin {
        topic: Arc::from("t"),
        partition: 0,
        offset: 0,
        timestamp_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-at-a-time scan `too_deep` replaced, kept as its oracle.
    fn too_deep_naive(json: &[u8], max: usize) -> Option<usize> {
        let (mut depth, mut in_str, mut esc) = (0usize, false, false);
        for (i, &b) in json.iter().enumerate() {
            if in_str {
                if esc {
                    esc = false;
                } else if b == b'\\' {
                    esc = true;
                } else if b == b'"' {
                    in_str = false;
                }
                continue;
            }
            match b {
                b'"' => in_str = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > max {
                        return Some(i);
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        None
    }

    #[test]
    fn depth_scan_skips_strings_and_escapes_like_a_byte_scan() {
        let cases: &[&[u8]] = &[
            br#"{"a":[[["#,
            br#"{"s":"\\","d":[[["#,
            br#"{"s":"\"[[[","d":[["#,
            br#"{"s":"[[[\"#,
            br#"{"s":"abc\"#,
            br#""\"#,
            br#"[["x\\\"[",["#,
            b"",
            b"\"",
        ];
        for c in cases {
            for max in 0..4 {
                assert_eq!(too_deep(c, max), too_deep_naive(c, max), "{c:?} max {max}");
            }
        }
        // Random texts over the bytes that matter.
        let alphabet = b"[]{}\"\\a";
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..40);
            let t: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect();
            let max = rng.usize(0..6);
            assert_eq!(
                too_deep(&t, max),
                too_deep_naive(&t, max),
                "{t:?} max {max}"
            );
        }
    }

    fn dec(value: &[u8], headers: &[(&str, Option<&[u8]>)]) -> Result<Event, Invalid> {
        decode(
            &RawRecord {
                value: Some(value),
                headers,
            },
            test_origin(),
            1024,
        )
    }

    #[test]
    fn plain_envelope() {
        let e = dec(
            br#"{"id":"e1","type":"order.created","tenant":"acme","data":{"x":1}}"#,
            &[],
        )
        .unwrap();
        assert_eq!(e.encoding, Encoding::Plain);
        assert_eq!(&*e.id, "e1");
        assert_eq!(&*e.event_type, "order.created");
        assert_eq!(e.tenant.as_deref(), Some("acme"));
        assert_eq!(e.content_type, "application/json");
        assert_eq!(
            &e.body[..],
            br#"{"id":"e1","type":"order.created","tenant":"acme","data":{"x":1}}"#
        );
        assert_eq!(filter_document(&e)["data"]["x"], 1);
    }

    #[test]
    fn escaped_strings_and_tenant_header() {
        let e = dec(br#"{"id":"a\"b","type":"x.y"}"#, &[("tenant", Some(b"t1"))]).unwrap();
        assert_eq!(&*e.id, "a\"b");
        assert_eq!(e.tenant.as_deref(), Some("t1"));
    }

    #[test]
    fn cloudevents_structured() {
        let v =
            br#"{"specversion":"1.0","id":"c1","type":"order.paid","source":"/shop","data":{}}"#;
        let e = dec(v, &[]).unwrap();
        assert_eq!(e.encoding, Encoding::CloudEventsStructured);
        assert_eq!(e.content_type, "application/cloudevents+json");
        let e = dec(br#"{"specversion":"1.0","id":"c1","type":"t"}"#, &[]).unwrap_err();
        assert_eq!(e.reason, "missing_attribute");
    }

    #[test]
    fn cloudevents_binary() {
        let h: &[(&str, Option<&[u8]>)] = &[
            ("ce_specversion", Some(b"1.0")),
            ("ce_id", Some(b"b1")),
            ("ce_type", Some(b"order.shipped")),
            ("ce_source", Some(b"/wh")),
            ("ce_tenant", Some(b"acme")),
            ("content-type", Some(b"text/plain")),
        ];
        let e = dec(b"not json at all", h).unwrap();
        assert_eq!(e.encoding, Encoding::CloudEventsBinary);
        assert_eq!(&*e.id, "b1");
        assert_eq!(e.tenant.as_deref(), Some("acme"));
        assert_eq!(e.content_type, "text/plain");
        assert_eq!(&e.body[..], b"not json at all");
        assert_eq!(e.headers.len(), 6);
        let d = filter_document(&e);
        assert_eq!(d["source"], "/wh");
        assert!(d["data"].is_null());
        let missing: &[(&str, Option<&[u8]>)] =
            &[("ce_specversion", Some(b"1.0")), ("ce_type", Some(b"t"))];
        assert_eq!(dec(b"{}", missing).unwrap_err().reason, "missing_id");
    }

    #[test]
    fn invalid_records_have_reasons() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "not_json"),
            (b"not json", "not_json"),
            (b"{\"id\":\"x\",\"type\":\"t\"", "not_json"),
            (b"[1,2]", "not_object"),
            (b"\"str\"", "not_object"),
            (br#"{"type":"t"}"#, "missing_id"),
            (br#"{"id":"","type":"t"}"#, "missing_id"),
            (br#"{"id":"x"}"#, "missing_type"),
            (br#"{"id":5,"type":"t"}"#, "bad_id"),
            (br#"{"id":"x","type":["t"]}"#, "bad_type"),
            (br#"{"id":"x","type":"has space"}"#, "bad_type"),
            (br#"{"id":"x","id":"y","type":"t"}"#, "duplicate_attribute"),
            (b"\xff\xfe{}", "not_json"),
            (br#"{"id":"x","type":"t","tenant":""}"#, "bad_attribute"),
        ];
        for (v, reason) in cases {
            let e = dec(v, &[]).unwrap_err();
            assert_eq!(e.reason, *reason, "{:?}: {e}", String::from_utf8_lossy(v));
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let deep = format!("{{\"id\":\"x\",\"type\":\"t\",\"d\":{deep}}}");
        // Nesting deeper than MAX_DEPTH anywhere is refused before any parse (receivers' parsers have
        // depth limits too, and a filter could not read it), in any field.
        let dec_mib = |v: &[u8]| {
            decode(
                &RawRecord {
                    value: Some(v),
                    headers: &[],
                },
                test_origin(),
                1 << 20,
            )
        };
        assert_eq!(dec_mib(deep.as_bytes()).unwrap_err().reason, "not_json");
        let deep_id = format!(
            "{{\"id\":{}\"x\"{},\"type\":\"t\"}}",
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert_eq!(dec_mib(deep_id.as_bytes()).unwrap_err().reason, "not_json");
        let big = vec![b' '; 1025];
        assert_eq!(dec(&big, &[]).unwrap_err().reason, "too_large");
        let mut deep = br#"{"id":"d","type":"a.b","data":"#.to_vec();
        deep.extend(std::iter::repeat_n(b'[', 200));
        deep.extend(std::iter::repeat_n(b']', 200));
        deep.push(b'}');
        assert_eq!(dec(&deep, &[]).unwrap_err().reason, "not_json");
        // Brackets inside strings do not count; 128 levels are fine.
        let mut ok = br#"{"id":"d","type":"a.b","s":"[[[[\"[[[","data":"#.to_vec();
        ok.extend(std::iter::repeat_n(b'[', 127));
        ok.extend(std::iter::repeat_n(b']', 127));
        ok.push(b'}');
        assert!(dec(&ok, &[]).is_ok());
        let bad_hdr: &[(&str, Option<&[u8]>)] = &[("tenant", Some(b"\xff"))];
        assert_eq!(
            dec(br#"{"id":"x","type":"t"}"#, bad_hdr)
                .unwrap_err()
                .reason,
            "bad_header"
        );
    }
}
