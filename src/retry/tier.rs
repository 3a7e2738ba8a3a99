//! Reading a retry-tier record back (DESIGN §5): which subscription it targets, when it is due, what
//! happened before, and where it first came from. The tier consumer (the same consumer loop as the
//! source, in its retry role) holds a partition at its head record until that record is due.

use std::sync::Arc;

use uuid::Uuid;

use super::headers as h;
use crate::model::Origin;
use crate::model::Prior;

/// The `hookline-*` facts of one retry record.
#[derive(Debug, Clone)]
pub struct RetryHeaders {
    pub subscription: Uuid,
    /// Epoch ms before which the record must not be attempted. Missing → due at once.
    pub due_ms: u64,
    pub prior: Prior,
    /// The source location of the event (from `hookline-origin-*`), when present.
    pub origin: Option<Origin>,
}

fn value<'a>(headers: &'a [(&'a str, Option<&'a [u8]>)], name: &str) -> Option<&'a [u8]> {
    // The last occurrence wins: hookline replaces its headers, but a foreign producer might append.
    headers
        .iter()
        .rev()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| *v)
}

fn number<T: std::str::FromStr>(
    headers: &[(&str, Option<&[u8]>)],
    name: &str,
) -> Result<Option<T>, String> {
    match value(headers, name) {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| format!("header {name} is not a number")),
    }
}

/// Parses the retry headers. Only the subscription is required; a record without it cannot be
/// delivered to anyone and is dead-lettered as `invalid_event` by the caller.
pub fn parse(headers: &[(&str, Option<&[u8]>)]) -> Result<RetryHeaders, String> {
    let sub = value(headers, h::SUBSCRIPTION)
        .ok_or_else(|| format!("retry record without a {} header", h::SUBSCRIPTION))?;
    let subscription = std::str::from_utf8(sub)
        .ok()
        .and_then(|s| Uuid::parse_str(s.trim()).ok())
        .ok_or_else(|| format!("header {} is not a UUID", h::SUBSCRIPTION))?;
    let origin = match (
        value(headers, h::ORIGIN_TOPIC).and_then(|v| std::str::from_utf8(v).ok()),
        number::<i32>(headers, h::ORIGIN_PARTITION)?,
        number::<i64>(headers, h::ORIGIN_OFFSET)?,
    ) {
        (Some(topic), Some(partition), Some(offset)) => Some(Origin {
            topic: Arc::from(topic),
            partition,
            offset,
            timestamp_ms: number::<i64>(headers, h::ORIGIN_TIMESTAMP_MS)?,
        }),
        _ => None,
    };
    Ok(RetryHeaders {
        subscription,
        due_ms: number(headers, h::DUE_MS)?.unwrap_or(0),
        prior: Prior {
            attempts: number(headers, h::ATTEMPT)?.unwrap_or(0),
            first_failure_ms: number(headers, h::FIRST_FAILURE_MS)?,
            deferrals: number(headers, h::DEFERRALS)?.unwrap_or(0),
        },
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "6f1c2a9e-0d55-4d8e-9b7a-1f2e3d4c5b6a";

    #[test]
    fn reads_every_header_hookline_writes() {
        let hs: Vec<(&str, Option<&[u8]>)> = vec![
            ("traceparent", Some(b"00-abc".as_slice())),
            ("hookline-subscription", Some(SUB.as_bytes())),
            ("hookline-attempt", Some(b"3")),
            ("hookline-due-ms", Some(b"1700000000123")),
            ("hookline-origin-topic", Some(b"orders")),
            ("hookline-origin-partition", Some(b"2")),
            ("hookline-origin-offset", Some(b"41")),
            ("hookline-first-failure-ms", Some(b"1699999990000")),
            ("hookline-deferrals", Some(b"2")),
            ("hookline-origin-timestamp-ms", Some(b"1699999980000")),
        ];
        let r = parse(&hs).unwrap();
        assert_eq!(r.subscription.to_string(), SUB);
        assert_eq!(r.due_ms, 1_700_000_000_123);
        assert_eq!(
            r.prior,
            Prior {
                attempts: 3,
                first_failure_ms: Some(1_699_999_990_000),
                deferrals: 2
            }
        );
        let o = r.origin.unwrap();
        assert_eq!((&*o.topic, o.partition, o.offset), ("orders", 2, 41));
        assert_eq!(o.timestamp_ms, Some(1_699_999_980_000));
    }

    #[test]
    fn lenient_on_optional_strict_on_the_target() {
        let only: Vec<(&str, Option<&[u8]>)> =
            vec![("hookline-subscription", Some(SUB.as_bytes()))];
        let r = parse(&only).unwrap();
        assert_eq!((r.due_ms, r.prior), (0, Prior::default()));
        assert!(r.origin.is_none());
        assert!(parse(&[]).unwrap_err().contains("hookline-subscription"));
        let bad: Vec<(&str, Option<&[u8]>)> = vec![("hookline-subscription", Some(b"nope"))];
        assert!(parse(&bad).unwrap_err().contains("UUID"));
        let bad_due: Vec<(&str, Option<&[u8]>)> = vec![
            ("hookline-subscription", Some(SUB.as_bytes())),
            ("hookline-due-ms", Some(b"soon")),
        ];
        assert!(parse(&bad_due).unwrap_err().contains("hookline-due-ms"));
    }
}
