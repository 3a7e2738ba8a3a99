//! What one HTTP attempt produced, and what happens next (DESIGN §4). Pure functions, unit-tested.

use std::time::{Duration, SystemTime};

use crate::spill::SpillReason;

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
    /// No OAuth2 token could be had (token endpoint down, refusing the client, bad answer); no request
    /// to the endpoint was sent.
    Auth(String),
    /// The breaker is open; no request was sent.
    CircuitOpen,
    /// Not sent: it waited for its endpoint while that blocked its partition (see `spill.rs`); handed
    /// to a tier without spending an attempt.
    Deferred(SpillReason),
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
            AttemptResult::Connect(_) | AttemptResult::Refused(_) | AttemptResult::Auth(_) => {
                "connect"
            }
            AttemptResult::CircuitOpen => "circuit_open",
            AttemptResult::Deferred(_) => "rate_limited",
        }
    }

    /// `hookline-last-status` header value: the HTTP status or the error kind.
    pub fn last_status(&self) -> String {
        match self {
            AttemptResult::Status { code, .. } => code.to_string(),
            AttemptResult::Timeout => "timeout".into(),
            AttemptResult::Connect(_) => "connect".into(),
            AttemptResult::Refused(_) => "refused".into(),
            AttemptResult::Auth(_) => "auth".into(),
            AttemptResult::CircuitOpen => "circuit_open".into(),
            AttemptResult::Deferred(_) => "deferred".into(),
        }
    }

    /// `hookline-last-error`: a short text, never response bodies or secrets.
    pub fn last_error(&self) -> String {
        let s = match self {
            AttemptResult::Status { code, .. } => format!("HTTP {code}"),
            AttemptResult::Timeout => "request timed out".into(),
            AttemptResult::Connect(e) | AttemptResult::Refused(e) | AttemptResult::Auth(e) => {
                e.clone()
            }
            AttemptResult::CircuitOpen => "circuit breaker open".into(),
            AttemptResult::Deferred(r) => format!(
                "waited for the endpoint while blocking its partition ({}); deferred",
                r.as_str()
            ),
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
        AttemptResult::Timeout
        | AttemptResult::Connect(_)
        | AttemptResult::Auth(_)
        | AttemptResult::CircuitOpen
        | AttemptResult::Deferred(_) => Outcome::Retry { retry_after: None },
        AttemptResult::Refused(_) => Outcome::Rejected,
    }
}

/// Whether an attempt's result says the endpoint is healthy, for its breaker: only the retryable
/// failures count against it (an endpoint answering 400 or 410 is up and deciding).
pub fn healthy(r: &AttemptResult) -> bool {
    !matches!(classify(r), Outcome::Retry { .. })
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

/// Picks the next tier after a retryable failure, from the number of attempts made so far (including
/// the one that just failed) and the subscription's `schedule` (indices into `delays`, in order; all
/// tiers unless the subscription chose fewer). Attempt 1 comes from the source topic and attempt `k + 2`
/// from tier `schedule[k]`, so the next tier is normally `schedule[attempts - 1]`; `retry_after` may push
/// it later: the first scheduled tier from there whose delay is at least `retry_after` (the last one when
/// none is that long). When the schedule is used up (`attempts > schedule.len()`), the delivery is
/// exhausted. Tier choice depends on attempts only, never on which topic the record sat in, so a
/// deferral (which spends no attempt) cannot add attempts.
pub fn next_tier(
    attempts: u32,
    retry_after: Option<Duration>,
    delays: &[Duration],
    schedule: &[usize],
) -> Next {
    let first = attempts.saturating_sub(1) as usize;
    let usable = &schedule[..schedule
        .len()
        .min(schedule.iter().take_while(|&&t| t < delays.len()).count())];
    if first >= usable.len() {
        return Next::DeadLetter;
    }
    let Some(wish) = retry_after else {
        return Next::Tier(usable[first]);
    };
    let pick = usable[first..]
        .iter()
        .copied()
        .find(|&i| delays[i] >= wish)
        .unwrap_or(usable[usable.len() - 1]);
    Next::Tier(pick)
}

/// A tier's delay stretched by `jitter_fraction` (in `0..=1`, drawn by the caller) of `jitter`. Never
/// shorter than the delay, so no hop happens early.
pub fn jittered(delay: Duration, jitter: f64, jitter_fraction: f64) -> Duration {
    let extra = delay.as_secs_f64() * jitter.clamp(0.0, 1.0) * jitter_fraction.clamp(0.0, 1.0);
    delay + Duration::from_secs_f64(extra)
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

    fn next_tier(attempts: u32, retry_after: Option<Duration>, delays: &[Duration]) -> Next {
        let all: Vec<usize> = (0..delays.len()).collect();
        super::next_tier(attempts, retry_after, delays, &all)
    }

    #[test]
    fn a_subscription_schedule_picks_its_tiers_in_order() {
        let d = [1, 2, 3].map(Duration::from_secs);
        let secs = |s| Some(Duration::from_secs(s));
        // retry_tiers: ["1s"]: one retry, then exhausted.
        assert_eq!(super::next_tier(1, None, &d, &[0]), Next::Tier(0));
        assert_eq!(super::next_tier(2, None, &d, &[0]), Next::DeadLetter);
        // retry_tiers: ["1s", "3s"]: the second retry skips 2s.
        assert_eq!(super::next_tier(2, None, &d, &[0, 2]), Next::Tier(2));
        assert_eq!(super::next_tier(3, None, &d, &[0, 2]), Next::DeadLetter);
        // Retry-After looks only at the scheduled tiers.
        assert_eq!(super::next_tier(1, secs(2), &d, &[0, 2]), Next::Tier(2));
        assert_eq!(super::next_tier(1, secs(9), &d, &[0, 1]), Next::Tier(1));
        // max_attempts: 1: no retry at all.
        assert_eq!(super::next_tier(1, None, &d, &[]), Next::DeadLetter);
        // Defensive: an index past the configured tiers ends the schedule there.
        assert_eq!(super::next_tier(1, None, &d, &[0, 7]), Next::Tier(0));
        assert_eq!(super::next_tier(2, None, &d, &[0, 7]), Next::DeadLetter);
    }

    #[test]
    fn tier_selection_follows_attempts() {
        let d: Vec<Duration> = [60, 300, 1800, 7200, 86400]
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect();
        // Attempt 1 (source) fails → tier 0; attempt 2 (from tier 0) → tier 1; … attempt 6 → dead letter.
        assert_eq!(next_tier(1, None, &d), Next::Tier(0));
        assert_eq!(next_tier(2, None, &d), Next::Tier(1));
        assert_eq!(next_tier(5, None, &d), Next::Tier(4));
        assert_eq!(next_tier(6, None, &d), Next::DeadLetter);
        assert_eq!(
            next_tier(0, None, &d),
            Next::Tier(0),
            "defensive: no attempt yet"
        );
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(next_tier(1, secs(2), &d), Next::Tier(0));
        assert_eq!(next_tier(1, secs(60), &d), Next::Tier(0));
        assert_eq!(next_tier(1, secs(61), &d), Next::Tier(1));
        assert_eq!(
            next_tier(2, secs(10), &d),
            Next::Tier(1),
            "never earlier than the attempt's tier"
        );
        assert_eq!(next_tier(3, secs(3600), &d), Next::Tier(3));
        assert_eq!(next_tier(1, secs(999_999), &d), Next::Tier(4));
        assert_eq!(next_tier(6, secs(1), &d), Next::DeadLetter);
        // A Retry-After that jumped to a later tier does not shorten the schedule: the next failure
        // still goes by attempts.
        assert_eq!(next_tier(2, None, &d), Next::Tier(1));
    }

    #[test]
    fn jitter_only_lengthens() {
        let d = Duration::from_secs(10);
        assert_eq!(jittered(d, 0.1, 0.0), d);
        assert_eq!(jittered(d, 0.1, 1.0), Duration::from_secs(11));
        assert_eq!(jittered(d, 0.0, 1.0), d);
        assert_eq!(
            jittered(d, 0.1, 5.0),
            Duration::from_secs(11),
            "fraction clamped"
        );
        assert_eq!(jittered(d, 0.1, -1.0), d);
    }
}
