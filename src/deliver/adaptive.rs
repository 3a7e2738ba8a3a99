//! Adaptive concurrency: how many requests one endpoint is sent at once, learned from how it answers.
//!
//! A subscription's `max_in_flight` is a ceiling chosen up front. An endpoint that cannot serve that many
//! at once queues them inside, and shows it before anything times out: its answers take longer than its
//! unloaded round trip, and requests stay out much longer than the answers account for. Sending more only
//! lengthens its queue until requests time out and are retried — work for nobody. So below the ceiling
//! the limit follows AIMD (as TCP's congestion window, Vector's adaptive request concurrency or Netflix's
//! concurrency-limits do), judged once per *window* of about one round trip. It starts at the ceiling: an
//! endpoint is sent what the subscription allows until it shows it cannot take it (a slow start from a
//! few would find the ceiling of a healthy endpoint in a few round trips anyway, and would hold back
//! the first burst to a slow one):
//!
//! - the endpoint **pushed back** in the window (a timeout, a connection failure, 408/425/429/5xx): the
//!   limit shrinks to 3/4;
//! - the window's mean round trip was **late** — above the endpoint's floor by more than half plus 2 ms —
//!   or requests are **stuck**: more than a fifth of those in flight were sent at least [`STUCK_WINDOWS`]
//!   windows ago (a queue, or a hang, that the answers received so far do not show yet): it shrinks to
//!   9/10;
//! - otherwise, if the window **used the whole limit** and no more than 1 in 20 requests in flight were
//!   sent [`AGING_WINDOWS`] or more windows ago (requests that hang show here before they are stuck), it
//!   grows by an eighth (at least one), so it climbs back from one to a ceiling of 256 in about fifty
//!   windows after an outage and probes in small steps near what the endpoint serves;
//! - a window that never used the whole limit leaves it alone: nothing showed the endpoint could take more.
//!
//! A push back also holds growth below 9/10 of the limit it happened at (the highest, for push backs in
//! consecutive windows) for [`HOLD_US`]: an endpoint that
//! collapses when sent too much (its answers then take longer than the timeout) is probed again every few
//! seconds, not every round trip — each probe costs a timeout's worth of failed requests.
//!
//! After a shrink, answers to requests sent before it are not judged (they describe the old limit; judging
//! them again would shrink once per late answer instead of once per round trip).
//!
//! The *floor* is the lowest window mean seen in the current and the previous [`FLOOR_PERIOD_US`], so one
//! lucky window does not pin it for ever; an endpoint that became slower for good shrinks the limit to
//! one, and a lone request's round trip, which cannot be queued behind our own, becomes the new floor. The 2 ms slack keeps scheduling noise on a busy host (round trips of a fraction
//! of a millisecond that double for no reason at the endpoint) from counting as a queue, and makes the limit
//! settle where the endpoint has a short queue — enough to keep it busy, which is what throughput needs.
//!
//! Pure state: the caller passes a monotonic clock in microseconds (tests drive it by hand).

/// A window lasts at least this long (and at least the floor round trip), at most [`MAX_WINDOW_US`].
pub const MIN_WINDOW_US: u64 = 5_000;
pub const MAX_WINDOW_US: u64 = 1_000_000;
/// A request still out after this many windows counts as stuck.
pub const STUCK_WINDOWS: u64 = 4;
/// How long growth is held below 9/10 of the limit at which the endpoint last pushed back.
pub const HOLD_US: u64 = 5_000_000;
/// More than 1 in 20 requests still out after this many windows holds growth back.
pub const AGING_WINDOWS: u64 = 2;
/// How long a floor measurement is trusted (see the module docs).
pub const FLOOR_PERIOD_US: u64 = 30_000_000;
const LATE_RATIO: f64 = 1.5;
const LATE_SLACK_US: f64 = 2_000.0;
const BACKOFF: f64 = 0.75;
const EASE: f64 = 0.9;
/// Window ids kept apart for the stuck check; older sends share one count.
const RING: usize = 8;

/// The learned limit of one endpoint. Tell it of every send ([`Adaptive::sent`], which returns the
/// window to hand back) and every answer ([`Adaptive::answered`]).
#[derive(Debug, Clone)]
pub struct Adaptive {
    max: u32,
    limit: f64,
    floor: Floor,
    /// Id of the current window; sends are stamped with it.
    id: u64,
    started_us: u64,
    answers: u32,
    rtt_sum_us: u64,
    pushed_back: bool,
    full: bool,
    /// Requests judged are those sent in this window or later (the window after the last shrink).
    judged_from: u64,
    /// Requests in flight by the window they were sent in (`id % RING`), and those sent before that.
    out: [u32; RING],
    out_older: u32,
    /// After a push back, growth stops below `hold_below` until `hold_until_us`.
    hold_below: f64,
    hold_until_us: u64,
    /// The previous window was pushed back too.
    pushed_back_before: bool,
}

/// The lowest window mean round trip of the current and the previous period.
#[derive(Debug, Clone, Copy)]
struct Floor {
    period_started_us: u64,
    current: Option<u64>,
    previous: Option<u64>,
}

impl Floor {
    fn get(&self) -> Option<u64> {
        match (self.current, self.previous) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn rebase(&mut self, now_us: u64, mean_us: u64) {
        self.period_started_us = now_us;
        self.previous = None;
        self.current = Some(mean_us);
    }

    fn observe(&mut self, now_us: u64, mean_us: u64) {
        if now_us.saturating_sub(self.period_started_us) >= FLOOR_PERIOD_US {
            self.previous = self.current.take();
            self.period_started_us = now_us;
        }
        self.current = Some(self.current.map_or(mean_us, |c| c.min(mean_us)));
    }
}

/// What a window's judgement did to the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Grew,
    Shrank,
}

impl Adaptive {
    pub fn new(max: u32, now_us: u64) -> Adaptive {
        let max = max.max(1);
        Adaptive {
            max,
            limit: f64::from(max),
            floor: Floor {
                period_started_us: now_us,
                current: None,
                previous: None,
            },
            id: 0,
            started_us: now_us,
            answers: 0,
            rtt_sum_us: 0,
            pushed_back: false,
            full: false,
            judged_from: 0,
            out: [0; RING],
            out_older: 0,
            hold_below: 0.0,
            hold_until_us: 0,
            pushed_back_before: false,
        }
    }

    /// Requests that may be in flight now.
    pub fn limit(&self) -> u32 {
        (self.limit as u32).clamp(1, self.max)
    }

    /// The ceiling changed (the subscription's share of the group moved): the limit stays below it.
    pub fn set_max(&mut self, max: u32) {
        self.max = max.max(1);
        self.limit = self.limit.min(f64::from(self.max));
    }

    /// The endpoint's unloaded round trip as measured, if any window has closed yet.
    pub fn floor_us(&self) -> Option<u64> {
        self.floor.get()
    }

    /// A request was sent with `in_flight` requests out (itself included). Returns the window to pass
    /// to [`Adaptive::answered`] with its answer.
    pub fn sent(&mut self, in_flight: u32) -> u64 {
        if in_flight >= self.limit() {
            self.full = true;
        }
        self.out[(self.id % RING as u64) as usize] += 1;
        self.id
    }

    /// The request sent in window `sent_in` was answered after `rtt_us` (`pushed_back`: the endpoint
    /// refused or failed it as an overloaded one does). Closes the window when it has lasted long enough
    /// and returns what its judgement did to the limit.
    pub fn answered(
        &mut self,
        now_us: u64,
        sent_in: u64,
        rtt_us: u64,
        pushed_back: bool,
    ) -> Option<Change> {
        self.abandoned(sent_in);
        if sent_in < self.judged_from {
            return None;
        }
        self.answers += 1;
        self.rtt_sum_us = self.rtt_sum_us.saturating_add(rtt_us);
        self.pushed_back |= pushed_back;
        let length = self
            .floor
            .get()
            .unwrap_or(0)
            .clamp(MIN_WINDOW_US, MAX_WINDOW_US);
        if now_us.saturating_sub(self.started_us) < length {
            return None;
        }
        self.close(now_us)
    }

    /// The request sent in window `sent_in` is no longer out. Called by [`Adaptive::answered`], and on
    /// its own for a request that ended without an answer to judge (its delivery was cancelled).
    pub fn abandoned(&mut self, sent_in: u64) {
        if self.id - sent_in.min(self.id) < RING as u64 {
            let slot = &mut self.out[(sent_in % RING as u64) as usize];
            *slot = slot.saturating_sub(1);
        } else {
            self.out_older = self.out_older.saturating_sub(1);
        }
    }

    /// Requests in flight that were sent at least `age` windows ago and after the last shrink.
    fn older_than(&self, age: u64) -> u32 {
        let mut n = 0;
        for age in age..RING as u64 {
            let Some(w) = self.id.checked_sub(age) else {
                break;
            };
            if w >= self.judged_from {
                n += self.out[(w % RING as u64) as usize];
            }
        }
        // Sent RING or more windows ago: counted only when no shrink happened since.
        if self.id.saturating_sub(RING as u64) >= self.judged_from {
            n += self.out_older;
        }
        n
    }

    fn close(&mut self, now_us: u64) -> Option<Change> {
        let mean = self.rtt_sum_us / u64::from(self.answers.max(1));
        let in_flight: u32 = self.out.iter().sum::<u32>() + self.out_older;
        let late = self
            .floor
            .get()
            .is_some_and(|f| mean as f64 > f as f64 * LATE_RATIO + LATE_SLACK_US);
        let stuck = f64::from(self.older_than(STUCK_WINDOWS)) > f64::from(in_flight) / 5.0 + 1.0;
        let aging = self.older_than(AGING_WINDOWS) * 20 > in_flight;
        let before = self.limit();
        // A lone request cannot be queued behind our own: its round trip is the endpoint's own, however
        // late against the old floor (the endpoint became slower for good). Re-base instead of shrinking.
        let alone = late && !self.pushed_back && !stuck && before == 1;
        if alone {
            self.floor.rebase(now_us, mean);
        }
        let change = if alone {
            None
        } else if self.pushed_back || late || stuck {
            let factor = if self.pushed_back { BACKOFF } else { EASE };
            if self.pushed_back {
                // The push back was caused by requests sent at a limit somewhat below this one (their
                // answers take a while to come back): hold growth below 9/10 of it for a while. Push
                // backs in consecutive windows keep the highest level (an outage fails at every level
                // on the way down; the endpoint is probed again from where its trouble began).
                let level = self.limit * EASE;
                self.hold_below = if self.pushed_back_before && now_us < self.hold_until_us {
                    self.hold_below.max(level)
                } else {
                    level
                };
                self.hold_until_us = now_us + HOLD_US;
            }
            self.limit = (self.limit * factor).max(1.0);
            Some(Change::Shrank)
        } else if self.full && !aging {
            let mut grown = self.limit + (self.limit / 8.0).max(1.0);
            if now_us < self.hold_until_us {
                grown = grown.min(self.hold_below.max(self.limit));
            }
            self.limit = grown.min(f64::from(self.max));
            Some(Change::Grew)
        } else {
            None
        };
        // A late window cannot lower the floor (it is above it); it still rolls the periods over. A
        // window with failures is not a round-trip measurement (a refused connection answers at once).
        if !self.pushed_back {
            self.floor.observe(now_us, mean);
        }
        // The next window; the slot it reuses held sends of RING windows ago, which become "older".
        self.id += 1;
        let slot = &mut self.out[(self.id % RING as u64) as usize];
        self.out_older += std::mem::take(slot);
        if change == Some(Change::Shrank) {
            self.judged_from = self.id;
        }
        self.pushed_back_before = self.pushed_back;
        self.started_us = now_us;
        self.answers = 0;
        self.rtt_sum_us = 0;
        self.pushed_back = false;
        self.full = false;
        change.filter(|_| self.limit() != before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint model driven by a hand clock: `serve(in_flight)` is the round trip of a request
    /// sent at that concurrency and whether it fails as pushed back (a timeout). Runs a closed loop that
    /// keeps the limit's worth of requests out for `for_us`; returns the limit after each change and the
    /// number of failed requests.
    fn drive(
        a: &mut Adaptive,
        clock: &mut u64,
        for_us: u64,
        serve: impl Fn(u32) -> (u64, bool),
    ) -> (Vec<(u64, u32)>, u32) {
        // (answer due at, sent at, window, fails) of requests out.
        let mut out: Vec<(u64, u64, u64, bool)> = Vec::new();
        let (mut limits, mut failed) = (Vec::new(), 0);
        let end = *clock + for_us;
        while *clock < end {
            while (out.len() as u32) < a.limit() {
                let n = out.len() as u32 + 1;
                let w = a.sent(n);
                let (rtt, fails) = serve(n);
                out.push((*clock + rtt, *clock, w, fails));
            }
            let next = out.iter().map(|o| o.0).min().unwrap_or(u64::MAX);
            if next > end {
                *clock = end;
                break;
            }
            *clock = next;
            let i = out.iter().position(|o| o.0 == next).unwrap();
            let (_, sent, w, fails) = out.swap_remove(i);
            failed += u32::from(fails);
            if a.answered(*clock, w, *clock - sent, fails).is_some() {
                limits.push((*clock, a.limit()));
            }
        }
        // Whatever is still out is cancelled: the next phase starts with nothing in flight.
        for (_, _, w, _) in out {
            a.abandoned(w);
        }
        (limits, failed)
    }

    /// The limit's time-weighted mean over `[from, to)`, from the changes `drive` returned.
    fn time_mean(changes: &[(u64, u32)], from: u64, to: u64) -> f64 {
        let mut at = changes
            .iter()
            .take_while(|c| c.0 <= from)
            .last()
            .map_or(64, |c| c.1);
        let (mut sum, mut t) = (0.0, from);
        for &(when, limit) in changes.iter().filter(|c| c.0 > from && c.0 < to) {
            sum += f64::from(at) * (when - t) as f64;
            (at, t) = (limit, when);
        }
        sum += f64::from(at) * (to - t) as f64;
        sum / (to - from) as f64
    }

    #[test]
    fn an_endpoint_back_from_an_outage_climbs_to_its_ceiling_in_tens_of_round_trips() {
        let mut clock = 0;
        let mut a = Adaptive::new(256, clock);
        assert_eq!(a.limit(), 256, "starts at the ceiling");
        // Down: every request fails fast (connection refused).
        drive(&mut a, &mut clock, 1_000_000, |_| (1_000, true));
        assert_eq!(a.limit(), 1);
        // Back, 10 ms at any concurrency: nothing queues, so every full window grows the limit.
        // Growth by an eighth per window up to 9/10 of where the trouble began, held there for HOLD_US.
        let (changes, _) = drive(&mut a, &mut clock, 2_000_000, |_| (10_000, false));
        assert_eq!(a.limit(), 230, "{changes:?}");
        let windows = changes.len();
        assert!(windows <= 40, "took {windows} windows: {changes:?}");
        drive(&mut a, &mut clock, HOLD_US, |_| (10_000, false));
        assert_eq!(a.limit(), 256);
    }

    #[test]
    fn a_queueing_endpoint_settles_near_the_concurrency_it_serves() {
        let mut clock = 0;
        let mut a = Adaptive::new(64, clock);
        // 20 parallel servers of 10 ms: above 20 in flight a queue forms (round trip grows with it).
        let (changes, failed) = drive(&mut a, &mut clock, 5_000_000, |n| {
            (10_000 * u64::from(n.div_ceil(20)), false)
        });
        let mean = time_mean(&changes, 2_500_000, 5_000_000);
        assert!(
            (16.0..=32.0).contains(&mean),
            "settles near 20 (a short queue allowed): {mean} {changes:?}"
        );
        assert_eq!(failed, 0);
    }

    #[test]
    fn requests_beyond_what_the_endpoint_serves_time_out_far_less_than_at_a_fixed_limit() {
        // Up to 20 at once answer in 10 ms; the 21st and later take 2 s and so time out at 1 s.
        let serve = |n: u32| {
            if n <= 20 {
                (10_000, false)
            } else {
                (1_000_000, true)
            }
        };
        let (mut clock, mut fixed_clock) = (0, 0);
        let mut a = Adaptive::new(64, clock);
        let (changes, timeouts) = drive(&mut a, &mut clock, 20_000_000, serve);
        // A fixed limit of 64: the ceiling from the start and never shrinking.
        let mut fixed_timeouts = 0;
        let end = 20_000_000;
        let mut out: Vec<(u64, bool)> = Vec::new();
        while fixed_clock < end {
            while out.len() < 64 {
                let (rtt, fails) = serve(out.len() as u32 + 1);
                out.push((fixed_clock + rtt, fails));
            }
            out.sort_unstable();
            let (due, fails) = out.remove(0);
            fixed_clock = due;
            fixed_timeouts += u32::from(fails);
        }
        let mean = time_mean(&changes, 10_000_000, 20_000_000);
        assert!(
            (15.0..=22.0).contains(&mean),
            "converges near 20: {mean} {changes:?}"
        );
        // Each probe above 20 costs the requests then out a timeout; they come every HOLD_US or so.
        assert!(
            timeouts * 4 < fixed_timeouts,
            "adaptive {timeouts} timeouts, fixed 64: {fixed_timeouts}"
        );
    }

    #[test]
    fn push_back_shrinks_by_a_quarter_once_per_window() {
        let mut a = Adaptive::new(100, 0);
        for _ in 0..4 {
            a.sent(1);
        }
        a.limit = 40.0;
        let w = 0;
        // Two failures in one window: one judgement.
        assert_eq!(a.answered(1_000, w, 1_000, true), None, "window still open");
        assert_eq!(a.answered(6_000, w, 1_000, true), Some(Change::Shrank));
        assert_eq!(a.limit(), 30);
        // An answer to a request sent before the shrink is not judged again.
        assert_eq!(a.answered(20_000, w, 20_000, true), None);
        assert_eq!(a.limit(), 30);
    }

    #[test]
    fn a_window_that_did_not_use_the_limit_does_not_grow_it() {
        let mut a = Adaptive::new(100, 0);
        a.limit = 10.0;
        let w = a.sent(1);
        assert_eq!(a.answered(10_000, w, 1_000, false), None);
        assert_eq!(a.limit(), 10);
    }

    #[test]
    fn the_floor_follows_an_endpoint_that_became_slower_for_good() {
        let mut clock = 0;
        let mut a = Adaptive::new(64, clock);
        drive(&mut a, &mut clock, 1_000_000, |_| (2_000, false));
        assert_eq!(a.floor_us(), Some(2_000));
        assert_eq!(a.limit(), 64);
        // Now 50 ms whatever the load: late at first (it shrinks to one), then a lone request's round
        // trip re-bases the floor, and the limit climbs back to the ceiling.
        drive(&mut a, &mut clock, 20_000_000, |_| (50_000, false));
        assert_eq!(a.floor_us(), Some(50_000));
        assert_eq!(a.limit(), 64);
    }

    #[test]
    fn the_limit_stays_within_one_and_the_ceiling() {
        let mut a = Adaptive::new(3, 0);
        assert_eq!(a.limit(), 3);
        a.set_max(1);
        assert_eq!(a.limit(), 1);
        let mut clock = 0;
        for _ in 0..50 {
            let w = a.sent(1);
            clock += 10_000;
            a.answered(clock, w, 10_000, true);
        }
        assert_eq!(a.limit(), 1);
    }
}
