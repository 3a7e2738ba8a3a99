//! Per-endpoint circuit breaker (DESIGN §4; issue 3). Pure state machine: time is passed in, so every
//! transition is tested without sleeping.
//!
//! - Closed → Open when, over the sliding `window`, at least `min_requests` finished and the failure ratio
//!   reached `failure_ratio`, or when `consecutive_failures` failures came in a row.
//! - Open for `cool_down`; requests are refused (they become `circuit_open` attempts).
//! - Then half-open: exactly `half_open_probes` requests are let through. All of them succeeding closes
//!   the breaker (with a fresh window); any failing reopens it for another cool-down.
//!
//! Results of requests that started before the breaker opened do not move it once it is open.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    pub window: Duration,
    pub min_requests: u32,
    pub failure_ratio: f64,
    pub consecutive_failures: u32,
    pub cool_down: Duration,
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: Duration::from_secs(30),
            min_requests: 20,
            failure_ratio: 0.5,
            consecutive_failures: 10,
            cool_down: Duration::from_secs(30),
            half_open_probes: 3,
        }
    }
}

/// The state as exported (`hookline_endpoints{state}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Whether a request may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Sent as one of the half-open probes; report its result with `probe = true`.
    Probe,
    Refused,
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed,
    Open { until: Instant },
    HalfOpen { issued: u32, succeeded: u32 },
}

const BUCKETS: usize = 10;

/// Failure/success counts in `BUCKETS` slices of the window.
#[derive(Debug, Clone)]
struct Window {
    slice: Duration,
    /// (slice index since `origin`, successes, failures)
    buckets: [(u64, u32, u32); BUCKETS],
    origin: Instant,
}

impl Window {
    fn new(window: Duration, origin: Instant) -> Window {
        let slice = (window / BUCKETS as u32).max(Duration::from_millis(1));
        Window {
            slice,
            buckets: [(u64::MAX, 0, 0); BUCKETS],
            origin,
        }
    }

    fn index(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / self.slice.as_nanos()) as u64
    }

    fn record(&mut self, now: Instant, success: bool) {
        let i = self.index(now);
        let b = &mut self.buckets[(i % BUCKETS as u64) as usize];
        if b.0 != i {
            *b = (i, 0, 0);
        }
        if success {
            b.1 += 1;
        } else {
            b.2 += 1;
        }
    }

    /// (successes, failures) within the window ending at `now`.
    fn totals(&self, now: Instant) -> (u32, u32) {
        let i = self.index(now);
        self.buckets
            .iter()
            .filter(|b| b.0 != u64::MAX && b.0 <= i && i - b.0 < BUCKETS as u64)
            .fold((0, 0), |(s, f), b| (s + b.1, f + b.2))
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    inner: Inner,
    window: Window,
    consecutive: u32,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig, now: Instant) -> Breaker {
        let window = Window::new(cfg.window, now);
        Breaker {
            cfg,
            inner: Inner::Closed,
            window,
            consecutive: 0,
        }
    }

    /// (successes, failures) in the window, and the current run of consecutive failures.
    pub fn recent(&self, now: Instant) -> (u32, u32, u32) {
        let (s, f) = self.window.totals(now);
        (s, f, self.consecutive)
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.inner {
            Inner::Closed => BreakerState::Closed,
            Inner::Open { until } if now < until => BreakerState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Asks to send one request now.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.inner {
            Inner::Closed => Admission::Allowed,
            Inner::Open { until } if now < until => Admission::Refused,
            Inner::Open { .. } => {
                self.inner = Inner::HalfOpen {
                    issued: 1,
                    succeeded: 0,
                };
                Admission::Probe
            }
            Inner::HalfOpen { issued, succeeded } if issued < self.cfg.half_open_probes => {
                self.inner = Inner::HalfOpen {
                    issued: issued + 1,
                    succeeded,
                };
                Admission::Probe
            }
            Inner::HalfOpen { .. } => Admission::Refused,
        }
    }

    /// Reports the result of a request admitted earlier.
    pub fn record(&mut self, now: Instant, success: bool, probe: bool) {
        match self.inner {
            Inner::Closed => {
                self.window.record(now, success);
                self.consecutive = if success { 0 } else { self.consecutive + 1 };
                let (s, f) = self.window.totals(now);
                let total = s + f;
                let ratio_trips = total >= self.cfg.min_requests
                    && total > 0
                    && f as f64 / total as f64 >= self.cfg.failure_ratio;
                if !success && (ratio_trips || self.consecutive >= self.cfg.consecutive_failures) {
                    self.open(now);
                }
            }
            Inner::HalfOpen { issued, succeeded } if probe => {
                if !success {
                    self.open(now);
                } else if succeeded + 1 >= self.cfg.half_open_probes {
                    self.inner = Inner::Closed;
                    self.window = Window::new(self.cfg.window, now);
                    self.consecutive = 0;
                } else {
                    self.inner = Inner::HalfOpen {
                        issued,
                        succeeded: succeeded + 1,
                    };
                }
            }
            // Results of requests sent before the breaker opened do not move it.
            Inner::Open { .. } | Inner::HalfOpen { .. } => {}
        }
    }

    fn open(&mut self, now: Instant) {
        self.inner = Inner::Open {
            until: now + self.cfg.cool_down,
        };
        self.consecutive = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            window: Duration::from_secs(10),
            min_requests: 10,
            failure_ratio: 0.5,
            consecutive_failures: 5,
            cool_down: Duration::from_secs(30),
            half_open_probes: 2,
        }
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn consecutive_failures_open_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        for i in 0..4 {
            assert_eq!(b.admit(ms(t0, i)), Admission::Allowed);
            b.record(ms(t0, i), false, false);
            assert_eq!(
                b.state(ms(t0, i)),
                BreakerState::Closed,
                "after {} failures",
                i + 1
            );
        }
        b.record(ms(t0, 4), true, false); // a success resets the run
        for i in 5..9 {
            b.record(ms(t0, i), false, false);
        }
        assert_eq!(b.state(ms(t0, 9)), BreakerState::Closed);
        b.record(ms(t0, 9), false, false);
        assert_eq!(b.state(ms(t0, 9)), BreakerState::Open);
        assert_eq!(b.admit(ms(t0, 10)), Admission::Refused);
    }

    #[test]
    fn failure_ratio_needs_the_minimum_count_within_the_window() {
        let mut c = cfg();
        c.consecutive_failures = 1000;
        let t0 = Instant::now();
        let mut b = Breaker::new(c, t0);
        // 9 requests, 6 failed (ratio 0.67, never 5 in a row): over the ratio but under min_requests.
        let pattern = [false, false, true, false, false, true, false, false, true];
        for (i, ok) in pattern.iter().enumerate() {
            b.record(ms(t0, i as u64), *ok, false);
        }
        assert_eq!(b.state(ms(t0, 9)), BreakerState::Closed);
        // The 10th, a failure: 10 requests, 7 failed → open.
        b.record(ms(t0, 9), false, false);
        assert_eq!(b.state(ms(t0, 9)), BreakerState::Open);

        // At the minimum count but under the ratio: stays closed.
        let mut b = Breaker::new(c, t0);
        for i in 0..10u64 {
            b.record(ms(t0, i), i % 3 != 0, false); // 4 of 10 fail
        }
        assert_eq!(b.state(ms(t0, 10)), BreakerState::Closed);

        // Outside the window old results no longer count.
        let mut b = Breaker::new(c, t0);
        for i in 0..9 {
            b.record(ms(t0, i), false, false);
        }
        b.record(ms(t0, 20_000), false, false);
        assert_eq!(
            b.state(ms(t0, 20_000)),
            BreakerState::Closed,
            "the 9 old failures left the window"
        );
    }

    #[test]
    fn successes_keep_it_closed() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        for i in 0..100 {
            b.record(ms(t0, i), i % 3 != 0, false); // a third fail, never 5 in a row
        }
        assert_eq!(b.state(ms(t0, 100)), BreakerState::Closed);
    }

    fn opened(t0: Instant) -> Breaker {
        let mut b = Breaker::new(cfg(), t0);
        for i in 0..5 {
            b.record(ms(t0, i), false, false);
        }
        assert_eq!(b.state(ms(t0, 5)), BreakerState::Open);
        b
    }

    #[test]
    fn open_refuses_until_the_cool_down_then_lets_exactly_k_probes() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        assert_eq!(b.admit(ms(t0, 29_000)), Admission::Refused);
        let after = ms(t0, 30_005);
        assert_eq!(b.state(after), BreakerState::HalfOpen);
        assert_eq!(b.admit(after), Admission::Probe);
        assert_eq!(b.admit(after), Admission::Probe);
        assert_eq!(b.admit(after), Admission::Refused, "exactly K = 2 probes");
        assert_eq!(b.state(after), BreakerState::HalfOpen);
    }

    #[test]
    fn all_probes_succeeding_closes_it_with_a_fresh_window() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let after = ms(t0, 30_005);
        b.admit(after);
        b.admit(after);
        b.record(after, true, true);
        assert_eq!(
            b.state(after),
            BreakerState::HalfOpen,
            "one of two probes is not enough"
        );
        b.record(after, true, true);
        assert_eq!(b.state(after), BreakerState::Closed);
        assert_eq!(b.admit(after), Admission::Allowed);
        // The failures from before the opening are forgotten: four more do not reopen it.
        for i in 0..4 {
            b.record(ms(t0, 30_010 + i), false, false);
        }
        assert_eq!(b.state(ms(t0, 30_020)), BreakerState::Closed);
    }

    #[test]
    fn a_failing_probe_reopens_it_for_another_cool_down() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let after = ms(t0, 30_005);
        b.admit(after);
        b.admit(after);
        b.record(after, true, true);
        b.record(after, false, true);
        assert_eq!(b.state(after), BreakerState::Open);
        assert_eq!(b.admit(ms(t0, 59_000)), Admission::Refused);
        assert_eq!(b.admit(ms(t0, 60_010)), Admission::Probe);
    }

    #[test]
    fn late_results_of_earlier_requests_do_not_move_an_open_breaker() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        b.record(ms(t0, 10), true, false);
        b.record(ms(t0, 11), true, false);
        assert_eq!(b.state(ms(t0, 12)), BreakerState::Open);
        let after = ms(t0, 30_005);
        b.admit(after);
        b.record(after, true, false); // a straggler, not a probe
        assert_eq!(b.state(after), BreakerState::HalfOpen);
    }

    #[test]
    fn state_labels() {
        assert_eq!(BreakerState::HalfOpen.as_str(), "half_open");
        assert_eq!(BreakerState::Open.as_str(), "open");
        assert_eq!(BreakerState::Closed.as_str(), "closed");
    }
}
