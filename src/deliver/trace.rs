//! W3C Trace Context (https://www.w3.org/TR/trace-context/) carried from the Kafka record to the
//! receiver: a record's `traceparent` and `tracestate` headers are forwarded on every attempt's request,
//! so a trace started in the upstream service continues at the endpoint. Pure, unit-tested.
//!
//! Only a well-formed `traceparent` is forwarded (version 00 layout, lowercase hex, non-zero ids; a
//! later version is accepted by its first four fields, as the specification asks of parsers), and
//! `tracestate` only beside it — the specification forbids using a `tracestate` without a valid
//! `traceparent`. Header names are matched without regard to case; the first of each wins.

/// The `traceparent` and `tracestate` values to forward from a record's headers.
pub fn forwarded<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Option<(&'a [u8], Option<&'a [u8]>)> {
    let mut parent = None;
    let mut state = None;
    for (k, v) in headers {
        if parent.is_none() && k.eq_ignore_ascii_case("traceparent") {
            parent = Some(v);
        } else if state.is_none() && k.eq_ignore_ascii_case("tracestate") {
            state = Some(v);
        }
    }
    let parent = parent.filter(|p| valid_traceparent(p))?;
    Some((parent, state.filter(|s| valid_tracestate(s))))
}

/// [`forwarded`] from an event's record headers.
pub fn of_event(event: &crate::model::Event) -> Option<(&[u8], Option<&[u8]>)> {
    forwarded(event.headers.iter().map(|(k, v)| (k.as_ref(), v.as_ref())))
}

/// `version-traceid-parentid-flags`: `00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero.
pub fn valid_traceparent(v: &[u8]) -> bool {
    let hex = |s: &[u8]| {
        s.iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    let nonzero = |s: &[u8]| s.iter().any(|b| *b != b'0');
    if v.len() < 55 || !hex(&v[..2]) || &v[..2] == b"ff" {
        return false;
    }
    // Version 00 is exactly 55 bytes; a later version may append `-…` fields.
    if (&v[..2] == b"00" && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return false;
    }
    v[2] == b'-'
        && v[35] == b'-'
        && v[52] == b'-'
        && hex(&v[3..35])
        && nonzero(&v[3..35])
        && hex(&v[36..52])
        && nonzero(&v[36..52])
        && hex(&v[53..55])
}

/// The trace id (32 hex) of a valid `traceparent`.
pub fn trace_id(traceparent: &[u8]) -> Option<&str> {
    valid_traceparent(traceparent)
        .then(|| std::str::from_utf8(&traceparent[3..35]).ok())
        .flatten()
}

/// A `tracestate` that can travel as it is: at most 512 bytes (the specification's propagation limit)
/// of visible ASCII, spaces and tabs (list members are checked by whoever reads them).
pub fn valid_tracestate(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 512
        && v.iter()
            .all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn hs<'a>(v: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = (&'a str, &'a [u8])> {
        v.iter().map(|(k, v)| (*k, v.as_bytes()))
    }

    #[test]
    fn well_formed_parents_are_forwarded_with_their_state() {
        let got = forwarded(hs(&[
            ("content-type", "x"),
            ("TraceParent", TP),
            ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        ]));
        assert_eq!(
            got,
            Some((
                TP.as_bytes(),
                Some(&b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"[..])
            ))
        );
        assert_eq!(
            trace_id(TP.as_bytes()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        // The first of each wins.
        let got = forwarded(hs(&[("traceparent", TP), ("traceparent", "junk")]));
        assert_eq!(got, Some((TP.as_bytes(), None)));
        // A later version with an extra field.
        assert!(valid_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
        ));
    }

    #[test]
    fn malformed_parents_forward_nothing_and_take_their_state_along() {
        for bad in [
            "",
            "00-abc",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert!(!valid_traceparent(bad.as_bytes()), "{bad:?}");
            assert_eq!(
                forwarded(hs(&[("traceparent", bad), ("tracestate", "a=b")])),
                None,
                "{bad:?}"
            );
        }
        assert_eq!(forwarded(hs(&[("tracestate", "a=b")])), None);
        let long = "a=".to_string() + &"x".repeat(600);
        assert_eq!(
            forwarded(hs(&[("traceparent", TP), ("tracestate", &long)])),
            Some((TP.as_bytes(), None)),
            "an oversized tracestate is dropped, the parent still goes"
        );
        assert!(!valid_tracestate(b"a=b\r\nx-injected: 1"));
    }
}
