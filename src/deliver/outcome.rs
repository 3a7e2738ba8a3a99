//! What one HTTP attempt produced, and what happens next (DESIGN §4). Pure functions, unit-tested.

use std::time::{Duration, SystemTime};

/// The result of one attempt, as observed.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    /// The endpoint answered with this status.
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// No complete response within the subscription's timeout.
    Timeout,
    /// Connection, DNS or TLS failure, or the connection broke mid-request.
    Connect(String),
    /// The outbound address policy refused the destination; no request was sent.
    Refused(String),
    /// The breaker is open; no request was sent.
    CircuitOpen,
}

impl AttemptResult {
    /// The `result` label of `hookline_delivery_attempts_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AttemptResult::Status { code, .. } => match code {
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            },
            AttemptResult::Timeout => "timeout",
            AttemptResult::Connect(_) | AttemptResult::Refused(_) => "connect",
            AttemptResult::CircuitOpen => "circuit_open",
        }
    }

    /// `hookline-last-status` header value: the HTTP status or the error kind.
    pub fn last_status(&self) -> String {
        match self {
            AttemptResult::Status { code, .. } => code.to_string(),
            AttemptResult::Timeout => "timeout".into(),
            AttemptResult::Connect(_) => "connect".into(),
            AttemptResult::Refused(_) => "refused".into(),
            AttemptResult::CircuitOpen => "circuit_open".into(),
        }
    }

    /// `hookline-last-error`: a short text, never response bodies or secrets.
    pub fn last_error(&self) -> String {
        let s = match self {
            AttemptResult::Status { code, .. } => format!("HTTP {code}"),
            AttemptResult::Timeout => "request timed out".into(),
            AttemptResult::Connect(e) | AttemptResult::Refused(e) => e.clone(),
            AttemptResult::CircuitOpen => "circuit breaker open".into(),
        };
        truncate(&s, 200).to_string()
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

/// What to do with the delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again later; `retry_after` is the endpoint's wish, if it said one.
    Retry {
        retry_after: Option<Duration>,
    },
    /// 410: dead-letter as `gone`.
    Gone,
    /// Other 3xx/4xx, or a refused address: dead-letter as `rejected`.
    Rejected,
}

pub fn classify(r: &AttemptResult) -> Outcome {
    match r {
        AttemptResult::Status { code, retry_after } => match code {
            200..=299 => Outcome::Delivered,
            408 | 425 | 429 | 500..=599 => Outcome::Retry {
                retry_after: *retry_after,
            },
            410 => Outcome::Gone,
            _ => Outcome::Rejected,
        },
        AttemptResult::Timeout | AttemptResult::Connect(_) | AttemptResult::CircuitOpen => {
            Outcome::Retry { retry_after: None }
        }
        AttemptResult::Refused(_) => Outcome::Rejected,
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date (relative to `now`). Past dates give zero.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Where a failed delivery goes next: the index of a retry tier, or the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Tier(usize),
    DeadLetter,
}

/// Picks the next tier after a retryable failure. `current` is the tier the attempt came from (`None` =
/// the source topic). The next tier is the one after `current`, or later when `retry_after` asks for
/// more: the first tier whose delay is at least `retry_after` (the last tier when none is that long).
/// After the last tier, the delivery is exhausted.
pub fn next_tier(
    current: Option<usize>,
    retry_after: Option<Duration>,
    delays: &[Duration],
) -> Next {
    let first = current.map_or(0, |c| c + 1);
    if first >= delays.len() {
        return Next::DeadLetter;
    }
    let Some(wish) = retry_after else {
        return Next::Tier(first);
    };
    let pick = (first..delays.len())
        .find(|&i| delays[i] >= wish)
        .unwrap_or(delays.len() - 1);
    Next::Tier(pick)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(code: u16) -> AttemptResult {
        AttemptResult::Status {
            code,
            retry_after: None,
        }
    }

    #[test]
    fn classification_follows_design_table() {
        for c in [200, 201, 204, 299] {
            assert_eq!(classify(&st(c)), Outcome::Delivered, "{c}");
        }
        for c in [408, 425, 429, 500, 502, 503, 599] {
            assert_eq!(
                classify(&st(c)),
                Outcome::Retry { retry_after: None },
                "{c}"
            );
        }
        assert_eq!(classify(&st(410)), Outcome::Gone);
        for c in [301, 302, 304, 400, 401, 403, 404, 409, 413, 422] {
            assert_eq!(classify(&st(c)), Outcome::Rejected, "{c}");
        }
        assert_eq!(
            classify(&AttemptResult::Timeout),
            Outcome::Retry { retry_after: None }
        );
        assert_eq!(
            classify(&AttemptResult::Connect("x".into())),
            Outcome::Retry { retry_after: None }
        );
        assert_eq!(
            classify(&AttemptResult::CircuitOpen),
            Outcome::Retry { retry_after: None }
        );
        assert_eq!(
            classify(&AttemptResult::Refused("x".into())),
            Outcome::Rejected
        );
        let ra = AttemptResult::Status {
            code: 429,
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(
            classify(&ra),
            Outcome::Retry {
                retry_after: Some(Duration::from_secs(2))
            }
        );
    }

    #[test]
    fn labels() {
        assert_eq!(st(204).metric_label(), "2xx");
        assert_eq!(st(302).metric_label(), "3xx");
        assert_eq!(st(404).metric_label(), "4xx");
        assert_eq!(st(503).metric_label(), "5xx");
        assert_eq!(AttemptResult::Timeout.metric_label(), "timeout");
        assert_eq!(AttemptResult::CircuitOpen.last_status(), "circuit_open");
        assert_eq!(st(503).last_status(), "503");
        assert!(AttemptResult::Connect("é".repeat(300)).last_error().len() <= 200);
    }

    #[test]
    fn retry_after_parsing() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn tier_selection() {
        let d: Vec<Duration> = [60, 300, 1800, 7200, 86400]
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect();
        assert_eq!(next_tier(None, None, &d), Next::Tier(0));
        assert_eq!(next_tier(Some(0), None, &d), Next::Tier(1));
        assert_eq!(next_tier(Some(3), None, &d), Next::Tier(4));
        assert_eq!(next_tier(Some(4), None, &d), Next::DeadLetter);
        assert_eq!(
            next_tier(None, Some(Duration::from_secs(2)), &d),
            Next::Tier(0)
        );
        assert_eq!(
            next_tier(None, Some(Duration::from_secs(60)), &d),
            Next::Tier(0)
        );
        assert_eq!(
            next_tier(None, Some(Duration::from_secs(61)), &d),
            Next::Tier(1)
        );
        assert_eq!(
            next_tier(Some(1), Some(Duration::from_secs(10)), &d),
            Next::Tier(2)
        );
        assert_eq!(
            next_tier(None, Some(Duration::from_secs(999_999)), &d),
            Next::Tier(4)
        );
        assert_eq!(
            next_tier(Some(4), Some(Duration::from_secs(1)), &d),
            Next::DeadLetter
        );
    }
}
