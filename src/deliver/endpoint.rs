//! Per-endpoint runtime state (one per subscription): the concurrency cap (`max_in_flight`, below which
//! the adaptive limit of [`super::adaptive`] moves unless the subscription turned it off), the token
//! bucket (`rate_limit_per_sec`, `burst`) and the circuit breaker.
//!
//! A delivery asks [`Endpoint::admit`] for a [`Slot`] before sending. The order matters:
//! 1. The breaker, read first: while it is open nothing waits for a permit only to be refused.
//! 2. A concurrency permit, waited for as long as it takes — or until the delivery's partition asks it
//!    to step aside ([`crate::spill`]): waiting is the backpressure that paces a backlog to what the
//!    endpoint can take, and only the source knows when a wait blocks work that is otherwise done.
//! 3. The breaker's admission (a half-open breaker lets a few probes through; `circuit_open` otherwise,
//!    a failed attempt).
//! 4. A rate-limit token, taken last so that requests leave at the limited rate (taking tokens before
//!    waiting for a permit would let them bunch up behind a slow request); spillable too.
//!
//! The semaphore holds as many permits as the endpoint may have requests out: the adaptive limit (or
//! `max_in_flight` scaled by the group share when adaptation is off). When either moves, permits are
//! added, or taken out of circulation as they come back ([`Endpoint::resize`]).
//!
//! Everything here is lock-free except the breaker and the adaptive limit, short mutexes held for a few
//! comparisons.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::adaptive::Adaptive;
use super::breaker::{Admission, Breaker, BreakerConfig, BreakerState};
use super::share::{GroupShare, scaled, scaled_rate};
use crate::spill::{Spill, SpillReason};
use arc_swap::ArcSwapOption;

/// The limits of one endpoint, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointLimits {
    pub max_in_flight: u32,
    pub rate_per_sec: Option<u32>,
    pub burst: Option<u32>,
    /// Learn the concurrency below `max_in_flight` (the subscription's `adaptive_concurrency`).
    pub adaptive: bool,
}

pub struct Endpoint {
    /// As configured, for the whole consumer group.
    limits: EndpointLimits,
    /// This instance's share of the group's work; the limits below are scaled by it.
    share: Arc<GroupShare>,
    /// The share the current limits were computed for.
    applied: AtomicU32,
    reshaping: Mutex<()>,
    concurrency: Semaphore,
    /// Permits currently in circulation (the adaptive limit, or the scaled `max_in_flight`).
    permits: AtomicU32,
    /// The learned limit, when adaptive; its clock is microseconds since `born`.
    adaptive: Option<Mutex<Adaptive>>,
    born: Instant,
    /// Permits to take out of circulation when slots are released (the share shrank while they were out).
    permit_debt: AtomicUsize,
    limiter: ArcSwapOption<DefaultDirectRateLimiter>,
    /// Deliveries inside `admit` or holding a slot.
    pending: AtomicUsize,
    breaker: Mutex<Breaker>,
    /// Epoch ms of the first failed delivery since the last delivered one (0: not failing), for
    /// `delivery.disable_after`.
    failing_since_ms: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("limits", &self.limits)
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish()
    }
}

/// Why a delivery may not be sent now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotNow {
    /// Its partition asked it to step aside while it waited: defer to a tier (no attempt spent).
    Spilled(SpillReason),
    /// The breaker is open: a failed `circuit_open` attempt.
    CircuitOpen,
}

/// Permission to send one request; report its result with [`Slot::finish`].
pub struct Slot<'a> {
    endpoint: &'a Endpoint,
    permit: Option<SemaphorePermit<'a>>,
    probe: bool,
    /// The adaptive limit's window this request was sent in; `None` once its answer was judged.
    window: Option<u64>,
}

impl Slot<'_> {
    /// Feeds the result to the breaker and the adaptive limit. `healthy` is false for failures that say
    /// the endpoint is in trouble (timeouts, connection errors, 408/425/429/5xx); `took` is how long
    /// the attempt took (its round trip).
    /// Returns the breaker's new state when this result moved it.
    pub fn finish(mut self, healthy: bool, took: Duration) -> Option<BreakerState> {
        let now = Instant::now();
        if let (Some(a), Some(window)) = (&self.endpoint.adaptive, self.window.take()) {
            let rtt = took.as_micros() as u64;
            let mut a = lock(a);
            if a.answered(self.endpoint.clock_us(now), window, rtt, !healthy)
                .is_some()
            {
                // Under the lock: resizes follow the limit's changes in order.
                self.endpoint.resize(a.limit());
            }
        }
        let mut breaker = self.endpoint.breaker();
        let before = breaker.state(now);
        breaker.record(now, healthy, self.probe);
        let after = breaker.state(now);
        (before != after).then_some(after)
    }
}

/// A poisoned lock is still used: every state behind these locks is valid after any panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let (Some(a), Some(window)) = (&self.endpoint.adaptive, self.window) {
            lock(a).abandoned(window);
        }
        self.endpoint.pending.fetch_sub(1, Ordering::AcqRel);
        // After the share shrank, released permits leave circulation until the debt is paid.
        if let Some(p) = self.permit.take()
            && self
                .endpoint
                .permit_debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
                .is_ok()
        {
            p.forget();
        }
    }
}

/// The limits of one endpoint on this instance for a share: permits, rate limiter.
fn shape(l: &EndpointLimits, ppm: u32) -> (u32, Option<DefaultDirectRateLimiter>) {
    let max = scaled(l.max_in_flight, ppm);
    let rate = l.rate_per_sec.filter(|r| *r > 0);
    let limiter = rate.map(|r| {
        let rate = scaled_rate(r, ppm);
        let burst = scaled(l.burst.unwrap_or(r).max(1), ppm);
        // Tokens come 2 % slower than the rate: a receiver counting arrivals in any 1 s window then sees
        // at most burst + rate - 2 sent in it, which leaves room for requests that were delayed on the way
        // and arrive bunched, so it never counts more than burst + rate. (At exactly the configured rate
        // the sender-side maximum is burst + rate - 1, and one late request would reach the limit.)
        let period = Duration::from_secs_f64(1.02 / rate);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(burst))
            .allow_burst(burst);
        RateLimiter::direct(quota)
    });
    (max, limiter)
}

/// Decrements `pending` when an admission is abandoned (deferred, refused, or the task dropped).
struct PendingGuard<'a>(&'a AtomicUsize, bool);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Endpoint {
    pub fn new(limits: EndpointLimits, breaker: BreakerConfig, share: Arc<GroupShare>) -> Endpoint {
        let ppm = share.ppm();
        let (max, limiter) = shape(&limits, ppm);
        let adaptive = limits.adaptive.then(|| Adaptive::new(max, 0));
        let permits = adaptive.as_ref().map_or(max, Adaptive::limit);
        Endpoint {
            share,
            applied: AtomicU32::new(ppm),
            reshaping: Mutex::new(()),
            concurrency: Semaphore::new(permits as usize),
            permits: AtomicU32::new(permits),
            adaptive: adaptive.map(Mutex::new),
            born: Instant::now(),
            permit_debt: AtomicUsize::new(0),
            limiter: ArcSwapOption::new(limiter.map(Arc::new)),
            pending: AtomicUsize::new(0),
            breaker: Mutex::new(Breaker::new(breaker, Instant::now())),
            failing_since_ms: Default::default(),
            limits,
        }
    }

    /// Applies a new group share: rescales the permits and the rate limiter (its bucket starts afresh).
    /// Permits that are out when the share shrinks are withdrawn as they return.
    fn reshape(&self, ppm: u32) {
        let _one = lock(&self.reshaping);
        if self.applied.load(Ordering::Acquire) == ppm {
            return;
        }
        let (max, limiter) = shape(&self.limits, ppm);
        match &self.adaptive {
            Some(a) => {
                let mut a = lock(a);
                a.set_max(max);
                self.resize(a.limit());
            }
            None => self.resize(max),
        }
        self.limiter.store(limiter.map(Arc::new));
        self.applied.store(ppm, Ordering::Release);
    }

    fn clock_us(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.born).as_micros() as u64
    }

    /// Puts `target` permits in circulation: adds the missing ones (paying any debt first), or takes
    /// the surplus out — at once if free, else as they come back.
    fn resize(&self, target: u32) {
        let old = self.permits.swap(target, Ordering::AcqRel);
        if target > old {
            let mut grow = (target - old) as usize;
            // Cancel outstanding debt before adding permits.
            while grow > 0 {
                let d = self.permit_debt.load(Ordering::Acquire);
                if d == 0 {
                    break;
                }
                let pay = d.min(grow);
                if self
                    .permit_debt
                    .compare_exchange(d, d - pay, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    grow -= pay;
                }
            }
            self.concurrency.add_permits(grow);
        } else if target < old {
            let shrink = (old - target) as usize;
            let taken = self.concurrency.forget_permits(shrink);
            self.permit_debt.fetch_add(shrink - taken, Ordering::AcqRel);
        }
    }

    /// The limits this instance enforces now: (requests that may be out at once — the adaptive limit
    /// when adaptive —, rate per second).
    pub fn effective(&self) -> (u32, Option<f64>) {
        let ppm = self.applied.load(Ordering::Acquire);
        (
            self.permits.load(Ordering::Acquire),
            self.limits.rate_per_sec.map(|r| scaled_rate(r, ppm)),
        )
    }

    /// Takes over the breaker state of the endpoint's previous configuration (subscription edited).
    pub fn inherit(&self, previous: &Endpoint) {
        let b = previous.breaker().clone();
        *self.breaker() = b;
        self.failing_since_ms.store(
            previous.failing_since_ms.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    /// Records a settled delivery: delivered ends a failing streak; a failure starts one (at `now_ms`)
    /// unless one is running. Returns since when this instance's deliveries have all failed.
    pub fn settled(&self, delivered: bool, now_ms: u64) -> Option<u64> {
        if delivered {
            self.failing_since_ms.store(0, Ordering::Relaxed);
            return None;
        }
        let _ = self.failing_since_ms.compare_exchange(
            0,
            now_ms.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        Some(self.failing_since_ms.load(Ordering::Relaxed))
    }

    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        lock(&self.breaker)
    }

    pub fn state(&self) -> BreakerState {
        self.breaker().state(Instant::now())
    }

    /// What the breaker saw recently: (successes, failures) in its window, consecutive failures.
    pub fn recent(&self) -> (u32, u32, u32) {
        self.breaker().recent(Instant::now())
    }

    /// How long a delivery turned away now would probably have to wait for this endpoint: the queue
    /// ahead of it at the endpoint's rate when it is rate-limited, else nothing known (zero).
    pub fn expected_wait(&self) -> Duration {
        let (_, rate) = self.effective();
        match rate {
            Some(r) if r > 0.0 => Duration::from_secs_f64(self.pending() as f64 / r),
            _ => Duration::ZERO,
        }
    }

    /// `max_in_flight` scaled by this instance's share: the ceiling of the adaptive limit.
    pub fn ceiling(&self) -> u32 {
        scaled(
            self.limits.max_in_flight,
            self.applied.load(Ordering::Acquire),
        )
    }

    /// Requests out now (holding a slot).
    pub fn in_flight(&self) -> u32 {
        self.permits
            .load(Ordering::Acquire)
            .saturating_sub(self.concurrency.available_permits() as u32)
    }

    /// Deliveries waiting or sending.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Waits until one request may be sent, or until `spill` says to step aside (see the module docs
    /// for the order of the checks).
    pub async fn admit(&self, spill: &mut Spill) -> Result<Slot<'_>, NotNow> {
        let ppm = self.share.ppm();
        if ppm != self.applied.load(Ordering::Acquire) {
            self.reshape(ppm);
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
        let mut guard = PendingGuard(&self.pending, true);
        if self.state() == BreakerState::Open {
            return Err(NotNow::CircuitOpen);
        }
        // A rate-limited endpoint's backlog drains at a known pace: its waits hold a partition's commit
        // by design, so only a partition at its in-flight bound makes them step aside.
        let rate_limited = self.limits.rate_per_sec.is_some_and(|r| r > 0);
        let heeds = move |r: SpillReason| !rate_limited || r == SpillReason::PartitionBound;
        let permit = match self.concurrency.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                if let Some(r) = spill.now(heeds) {
                    return Err(NotNow::Spilled(r));
                }
                tokio::select! {
                    biased;
                    p = self.concurrency.acquire() => match p {
                        Ok(p) => p,
                        // The semaphore is never closed; treat it as a spill if it were.
                        Err(_) => return Err(NotNow::Spilled(SpillReason::PartitionBound)),
                    },
                    r = spill.wait(heeds) => return Err(NotNow::Spilled(r)),
                }
            }
        };
        let probe = match self.breaker().admit(Instant::now()) {
            Admission::Allowed => false,
            Admission::Probe => true,
            Admission::Refused => return Err(NotNow::CircuitOpen),
        };
        if let Some(l) = self.limiter.load_full() {
            while let Err(not_until) = l.check() {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                tokio::select! {
                    biased;
                    () = tokio::time::sleep(wait) => {}
                    r = spill.wait(heeds) => return Err(NotNow::Spilled(r)),
                }
            }
        }
        guard.1 = false;
        let window = self
            .adaptive
            .as_ref()
            .map(|a| lock(a).sent(self.in_flight().max(1)));
        Ok(Slot {
            endpoint: self,
            permit: Some(permit),
            probe,
            window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spill::{self, SpillPoint};
    use futures_util::FutureExt;

    fn limits(max_in_flight: u32) -> EndpointLimits {
        EndpointLimits {
            max_in_flight,
            rate_per_sec: None,
            burst: None,
            adaptive: false,
        }
    }

    fn breaker_cfg() -> BreakerConfig {
        BreakerConfig {
            window: Duration::from_secs(10),
            min_requests: 100,
            failure_ratio: 0.5,
            consecutive_failures: 2,
            cool_down: Duration::from_secs(60),
            half_open_probes: 1,
        }
    }

    #[tokio::test]
    async fn deliveries_wait_for_a_permit_as_long_as_it_takes() {
        let e = Endpoint::new(limits(1), breaker_cfg(), Arc::default());
        let first = e.admit(&mut Spill::never()).await.expect("a free slot");
        let mut n = Spill::never();
        let second = e.admit(&mut n);
        tokio::pin!(second);
        assert!(second.as_mut().now_or_never().is_none(), "waits");
        assert_eq!(e.pending(), 2);
        first.finish(true, Duration::ZERO);
        let s = second.await.expect("gets the freed permit");
        drop(s);
        assert_eq!(e.pending(), 0);
    }

    #[tokio::test]
    async fn a_waiting_delivery_steps_aside_when_its_partition_spills_it() {
        let e = Endpoint::new(limits(1), breaker_cfg(), Arc::default());
        let tx = spill::channel();
        let held = e.admit(&mut Spill::new(&tx, 5)).await.unwrap();
        let (mut old, mut young) = (Spill::new(&tx, 6), Spill::new(&tx, 7));
        let a = e.admit(&mut old);
        let b = e.admit(&mut young);
        tokio::pin!(a);
        tokio::pin!(b);
        assert!(a.as_mut().now_or_never().is_none());
        assert!(b.as_mut().now_or_never().is_none());
        assert_eq!(e.pending(), 3);
        // Records below offset 7 step aside: the one at 6 is waiting, so it is spilled; the one
        // holding a slot (5) is not affected, nor is the younger one (7).
        tx.send_replace(SpillPoint {
            through: 7,
            reason: SpillReason::CommitDelay,
        });
        assert_eq!(
            a.await.err(),
            Some(NotNow::Spilled(SpillReason::CommitDelay))
        );
        assert!(b.as_mut().now_or_never().is_none());
        assert_eq!(e.pending(), 2, "a spilled admission gives its place back");
        drop(held);
        assert!(b.await.is_ok());
        // Already below the point when it arrives: spilled without waiting.
        let held = e.admit(&mut Spill::never()).await.unwrap();
        assert_eq!(
            e.admit(&mut Spill::new(&tx, 1)).await.err(),
            Some(NotNow::Spilled(SpillReason::CommitDelay))
        );
        drop(held);
        assert_eq!(e.pending(), 0);
    }

    #[tokio::test]
    async fn an_abandoned_wait_releases_its_place() {
        let e = Endpoint::new(limits(1), breaker_cfg(), Arc::default());
        let held = e.admit(&mut Spill::never()).await.unwrap();
        {
            let mut n = Spill::never();
            let waiting = e.admit(&mut n);
            tokio::pin!(waiting);
            assert!(waiting.as_mut().now_or_never().is_none());
            assert_eq!(e.pending(), 2);
        }
        assert_eq!(
            e.pending(),
            1,
            "dropping the waiting future gives its place back"
        );
        drop(held);
        assert_eq!(e.pending(), 0);
    }

    #[tokio::test]
    async fn an_open_breaker_refuses_without_waiting_and_edits_keep_it() {
        let e = Endpoint::new(limits(1), breaker_cfg(), Arc::default());
        for _ in 0..2 {
            e.admit(&mut Spill::never())
                .await
                .unwrap()
                .finish(false, Duration::ZERO);
        }
        assert_eq!(e.state(), BreakerState::Open);
        // Even with every permit out, an open breaker answers at once instead of queueing.
        let held = e.concurrency.try_acquire().unwrap();
        assert_eq!(
            e.admit(&mut Spill::never()).now_or_never().map(|r| r.err()),
            Some(Some(NotNow::CircuitOpen))
        );
        drop(held);
        assert_eq!(e.pending(), 0);
        let edited = Endpoint::new(limits(8), breaker_cfg(), Arc::default());
        edited.inherit(&e);
        assert_eq!(edited.state(), BreakerState::Open);
        assert_eq!(
            edited.admit(&mut Spill::never()).await.err(),
            Some(NotNow::CircuitOpen)
        );
    }

    #[tokio::test]
    async fn the_token_bucket_spaces_requests_after_the_burst() {
        let mut l = limits(100);
        l.rate_per_sec = Some(10);
        l.burst = Some(2);
        let e = Endpoint::new(l, breaker_cfg(), Arc::default());
        // The burst goes at once; the third request needs a new token (100 ms at 10/s).
        let t0 = std::time::Instant::now();
        for _ in 0..3 {
            drop(e.admit(&mut Spill::never()).await.unwrap());
        }
        assert!(
            t0.elapsed() >= Duration::from_millis(80),
            "the third token was waited for: {:?}",
            t0.elapsed()
        );
    }

    #[tokio::test]
    async fn an_adaptive_endpoints_permits_follow_the_learned_limit() {
        let mut l = limits(8);
        l.adaptive = true;
        let e = Endpoint::new(l, breaker_cfg(), Arc::default());
        assert_eq!(e.effective().0, 8, "starts at the ceiling");
        assert_eq!(e.ceiling(), 8);
        let mut slots = Vec::new();
        for _ in 0..8 {
            slots.push(e.admit(&mut Spill::never()).await.unwrap());
        }
        assert_eq!(e.in_flight(), 8);
        assert!(
            e.admit(&mut Spill::never()).now_or_never().is_none(),
            "no permit beyond the limit"
        );
        // One window later (5 ms at least) the endpoint pushes back: the limit shrinks by a quarter and
        // the surplus permits leave circulation as the slots come back.
        tokio::time::sleep(Duration::from_millis(6)).await;
        slots.pop().unwrap().finish(false, Duration::from_millis(6));
        assert_eq!(e.effective().0, 6);
        drop(slots);
        assert_eq!(e.in_flight(), 0);
        assert_eq!(
            e.concurrency.available_permits(),
            6,
            "permits in circulation follow the limit"
        );
        // A cancelled request (slot dropped without an answer) is forgotten, not judged.
        let s = e.admit(&mut Spill::never()).await.unwrap();
        drop(s);
        assert_eq!(e.effective().0, 6);
    }

    #[tokio::test]
    async fn limits_follow_the_group_share() {
        let share = Arc::new(GroupShare::default());
        let l = EndpointLimits {
            max_in_flight: 8,
            rate_per_sec: Some(100),
            burst: Some(100),
            adaptive: false,
        };
        let e = Endpoint::new(l, breaker_cfg(), share.clone());
        assert_eq!(e.effective(), (8, Some(100.0)));

        // Half the partitions: half the permits, rate and burst — applied at the next admission.
        share.set(1, 2);
        let mut slots = Vec::new();
        for _ in 0..4 {
            slots.push(e.admit(&mut Spill::never()).await.unwrap());
        }
        assert_eq!(e.effective(), (4, Some(50.0)));
        assert!(
            e.admit(&mut Spill::never()).now_or_never().is_none(),
            "a fifth slot at share 1/2"
        );
        let limiter = e.limiter.load_full().unwrap();
        let burst = (0..200).take_while(|_| limiter.check().is_ok()).count();
        assert_eq!(
            burst,
            50 - 4,
            "burst halved (the 4 admissions took a token each)"
        );

        // A quarter while all 4 slots are out: 2 permits must leave circulation as slots come back.
        share.set(1, 4);
        e.reshape(share.ppm());
        assert_eq!(e.effective().0, 2);
        assert_eq!(e.permit_debt.load(Ordering::Relaxed), 2);
        drop(slots);
        assert_eq!(e.permit_debt.load(Ordering::Relaxed), 0);
        assert_eq!(e.concurrency.available_permits(), 2);

        // Back to everything: 8 permits again.
        share.set(4, 4);
        e.reshape(share.ppm());
        assert_eq!(e.concurrency.available_permits(), 8);
        assert_eq!(e.effective(), (8, Some(100.0)));
    }
}
