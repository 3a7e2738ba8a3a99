//! Per-endpoint runtime state (one per subscription): the concurrency cap (`max_in_flight`), the token
//! bucket (`rate_limit_per_sec`, `burst`), the bounded wait queue and the circuit breaker.
//!
//! A delivery asks [`Endpoint::admit`] for a [`Slot`] before sending. The order matters:
//! 1. Queue bound: at most `max_in_flight + queue` deliveries may be waiting or sending, and none may
//!    join while the endpoint is *congested* (a delivery gave up waiting within the last `queue_wait`).
//!    Otherwise the delivery is deferred at once: handed to the first retry tier without spending an
//!    attempt, so a slow, hung or rate-limited endpoint never holds source records for long (DESIGN §6).
//! 2. A concurrency permit, waited for at most `queue_wait` (then deferred, and the endpoint marked
//!    congested).
//! 3. The breaker: while open the delivery is not sent (`circuit_open`, a failed attempt).
//! 4. A rate-limit token, taken last so that requests leave at the limited rate (taking tokens before
//!    waiting for a permit would let them bunch up behind a slow request).
//!
//! Why a time bound and not only a count: when hookline itself is the bottleneck (a backlog after
//! downtime), every endpoint's queue is long but moving, and deferring would only churn the retry topic;
//! a waiting time says whether *this* endpoint keeps up. A rate-limited endpoint's queue is capped at
//! about one second of its rate plus its burst, since its drain rate is known in advance.
//!
//! Everything here is lock-free except the breaker, a short mutex held for a few comparisons.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::breaker::{Admission, Breaker, BreakerConfig, BreakerState};
use super::share::{GroupShare, scaled, scaled_rate};
use arc_swap::ArcSwapOption;

/// The limits of one endpoint, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointLimits {
    pub max_in_flight: u32,
    pub rate_per_sec: Option<u32>,
    pub burst: Option<u32>,
    /// Deliveries allowed to wait beyond `max_in_flight` (`delivery.endpoint_queue`).
    pub queue: usize,
    /// Longest wait for a concurrency permit (`delivery.queue_wait`).
    pub queue_wait: Duration,
}

impl EndpointLimits {
    /// Deliveries that may be waiting or sending at once; more are deferred. A rate-limited endpoint
    /// queues at most `queue_wait` worth of its rate (plus its burst): its drain rate is known, so a
    /// longer queue would only keep source records (and the partition's commit) waiting longer than any
    /// other endpoint may, and a shorter one would send most of a backlog around the retry topic again
    /// and again (each deferral is a produce and a fetch).
    pub fn capacity(&self) -> usize {
        let queue = match self.rate_per_sec {
            Some(r) => {
                let secs = self.queue_wait.as_secs_f64().max(1.0);
                self.queue
                    .min((f64::from(r) * secs) as usize + self.burst.unwrap_or(r) as usize)
            }
            None => self.queue,
        };
        self.max_in_flight as usize + queue
    }
}

pub struct Endpoint {
    /// As configured, for the whole consumer group.
    limits: EndpointLimits,
    /// This instance's share of the group's work; the limits below are scaled by it.
    share: Arc<GroupShare>,
    /// The share the current limits were computed for.
    applied: AtomicU32,
    reshaping: Mutex<()>,
    capacity: AtomicUsize,
    concurrency: Semaphore,
    /// Permits currently in circulation (the scaled `max_in_flight`).
    permits: AtomicU32,
    /// Permits to take out of circulation when slots are released (the share shrank while they were out).
    permit_debt: AtomicUsize,
    limiter: ArcSwapOption<DefaultDirectRateLimiter>,
    /// Deliveries inside `admit` or holding a slot.
    pending: AtomicUsize,
    /// Congested until this many ns after `epoch` (0 = not congested).
    congested_until: AtomicU64,
    /// tokio's clock, so tests can pause it.
    epoch: tokio::time::Instant,
    breaker: Mutex<Breaker>,
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
    /// The endpoint's queue is full: defer to a tier (no attempt spent).
    QueueFull,
    /// The breaker is open: a failed `circuit_open` attempt.
    CircuitOpen,
}

/// Permission to send one request; report its result with [`Slot::finish`].
pub struct Slot<'a> {
    endpoint: &'a Endpoint,
    permit: Option<SemaphorePermit<'a>>,
    probe: bool,
}

impl Slot<'_> {
    /// Feeds the result to the breaker. `healthy` is false for failures that say the endpoint is in
    /// trouble (timeouts, connection errors, 408/425/429/5xx).
    /// Returns the breaker's new state when this result moved it.
    pub fn finish(self, healthy: bool) -> Option<BreakerState> {
        let now = Instant::now();
        let mut breaker = self.endpoint.breaker();
        let before = breaker.state(now);
        breaker.record(now, healthy, self.probe);
        let after = breaker.state(now);
        (before != after).then_some(after)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
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

/// The limits of one endpoint on this instance for a share: permits, rate limiter, capacity.
fn shape(l: &EndpointLimits, ppm: u32) -> (u32, Option<DefaultDirectRateLimiter>, usize) {
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
    let capacity = EndpointLimits {
        max_in_flight: max,
        rate_per_sec: rate.map(|r| scaled_rate(r, ppm).ceil() as u32),
        burst: rate.map(|r| scaled(l.burst.unwrap_or(r).max(1), ppm)),
        ..*l
    }
    .capacity();
    (max, limiter, capacity)
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
        let (max, limiter, capacity) = shape(&limits, ppm);
        Endpoint {
            share,
            applied: AtomicU32::new(ppm),
            reshaping: Mutex::new(()),
            capacity: AtomicUsize::new(capacity),
            concurrency: Semaphore::new(max as usize),
            permits: AtomicU32::new(max),
            permit_debt: AtomicUsize::new(0),
            limiter: ArcSwapOption::new(limiter.map(Arc::new)),
            pending: AtomicUsize::new(0),
            congested_until: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            breaker: Mutex::new(Breaker::new(breaker, Instant::now())),
            limits,
        }
    }

    /// Applies a new group share: rescales the permits, the rate limiter (its bucket starts afresh)
    /// and the queue bound. Permits that are out when the share shrinks are withdrawn as they return.
    fn reshape(&self, ppm: u32) {
        let _one = self.reshaping.lock().unwrap_or_else(|p| p.into_inner());
        if self.applied.load(Ordering::Acquire) == ppm {
            return;
        }
        let (max, limiter, capacity) = shape(&self.limits, ppm);
        let old = self.permits.swap(max, Ordering::AcqRel);
        if max > old {
            let mut grow = (max - old) as usize;
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
        } else if max < old {
            let shrink = (old - max) as usize;
            let taken = self.concurrency.forget_permits(shrink);
            self.permit_debt.fetch_add(shrink - taken, Ordering::AcqRel);
        }
        self.limiter.store(limiter.map(Arc::new));
        self.capacity.store(capacity, Ordering::Release);
        self.applied.store(ppm, Ordering::Release);
    }

    /// The limits this instance enforces now: (max in flight, rate per second).
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
    }

    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        self.breaker().state(Instant::now())
    }

    /// What the breaker saw recently: (successes, failures) in its window, consecutive failures.
    pub fn recent(&self) -> (u32, u32, u32) {
        self.breaker().recent(Instant::now())
    }

    /// How long a delivery turned away now would probably have to wait for this endpoint: the queue
    /// ahead of it at the endpoint's rate when it is rate-limited, else `queue_wait`.
    pub fn expected_wait(&self) -> Duration {
        let (_, rate) = self.effective();
        match rate {
            Some(r) if r > 0.0 => Duration::from_secs_f64(self.pending() as f64 / r),
            _ => self.limits.queue_wait,
        }
    }

    /// Deliveries waiting or sending.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    fn since_epoch(&self, t: tokio::time::Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Whether a delivery gave up waiting recently (new ones are then deferred without queueing).
    pub fn congested(&self) -> bool {
        let until = self.congested_until.load(Ordering::Relaxed);
        until != 0 && self.since_epoch(tokio::time::Instant::now()) < until
    }

    /// Waits until one request may be sent (see the module docs for the order of the checks).
    pub async fn admit(&self) -> Result<Slot<'_>, NotNow> {
        let start = tokio::time::Instant::now();
        let ppm = self.share.ppm();
        if ppm != self.applied.load(Ordering::Acquire) {
            self.reshape(ppm);
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.capacity.load(Ordering::Acquire) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(NotNow::QueueFull);
        }
        let mut guard = PendingGuard(&self.pending, true);
        let permit = match self.concurrency.try_acquire() {
            Ok(p) => p,
            Err(_) if self.congested() => return Err(NotNow::QueueFull),
            Err(_) => {
                let deadline = start + self.limits.queue_wait;
                match tokio::time::timeout_at(deadline, self.concurrency.acquire()).await {
                    Ok(Ok(p)) => p,
                    // Waited too long: this endpoint does not keep up. Defer, and let the next ones
                    // skip the queue for a while.
                    _ => {
                        let until =
                            self.since_epoch(tokio::time::Instant::now() + self.limits.queue_wait);
                        self.congested_until.store(until, Ordering::Relaxed);
                        return Err(NotNow::QueueFull);
                    }
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
                tokio::time::sleep(wait).await;
            }
        }
        guard.1 = false;
        Ok(Slot {
            endpoint: self,
            permit: Some(permit),
            probe,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn limits(max_in_flight: u32, queue: usize) -> EndpointLimits {
        EndpointLimits {
            max_in_flight,
            rate_per_sec: None,
            burst: None,
            queue,
            queue_wait: Duration::from_secs(60),
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

    #[test]
    fn capacity_is_in_flight_plus_queue_and_queue_wait_of_rate() {
        assert_eq!(limits(4, 10).capacity(), 14);
        let mut l = limits(4, 1000);
        l.queue_wait = Duration::from_secs(5);
        l.rate_per_sec = Some(50);
        assert_eq!(
            l.capacity(),
            4 + 250 + 50,
            "5 s of 50/s, burst defaulting to 50"
        );
        l.burst = Some(5);
        assert_eq!(l.capacity(), 4 + 255);
        l.queue_wait = Duration::from_millis(200);
        assert_eq!(l.capacity(), 4 + 55, "at least one second of rate");
        l.queue = 10;
        assert_eq!(l.capacity(), 14, "the configured queue is still the cap");
    }

    #[tokio::test]
    async fn queue_overflow_is_refused_at_once_and_slots_free_it() {
        let e = Endpoint::new(limits(1, 1), breaker_cfg(), Arc::default());
        let first = e.admit().await.expect("a free slot");
        // The second waits for the permit (one queued); the third finds the queue full.
        let second = e.admit();
        tokio::pin!(second);
        assert!(
            second.as_mut().now_or_never().is_none(),
            "waits for the permit"
        );
        assert_eq!(e.pending(), 2);
        assert_eq!(e.admit().await.err(), Some(NotNow::QueueFull));
        assert_eq!(e.pending(), 2, "a refused admission leaves no trace");
        first.finish(true);
        let s = second.await.expect("gets the freed permit");
        drop(s);
        assert_eq!(e.pending(), 0);
    }

    #[tokio::test]
    async fn an_abandoned_wait_releases_its_place() {
        let e = Endpoint::new(limits(1, 1), breaker_cfg(), Arc::default());
        let held = e.admit().await.unwrap();
        {
            let waiting = e.admit();
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

    #[tokio::test(start_paused = true)]
    async fn a_long_wait_defers_and_marks_the_endpoint_congested() {
        let mut l = limits(1, 100);
        l.queue_wait = Duration::from_millis(500);
        let e = Endpoint::new(l, breaker_cfg(), Arc::default());
        let held = e.admit().await.unwrap();
        let t0 = tokio::time::Instant::now();
        assert_eq!(e.admit().await.err(), Some(NotNow::QueueFull));
        assert_eq!(
            t0.elapsed(),
            Duration::from_millis(500),
            "waited queue_wait, then gave up"
        );
        assert!(e.congested());
        // While congested, a delivery that cannot get a permit at once does not queue.
        let t1 = tokio::time::Instant::now();
        assert_eq!(e.admit().await.err(), Some(NotNow::QueueFull));
        assert_eq!(t1.elapsed(), Duration::ZERO);
        // A free permit is still taken while congested.
        drop(held);
        assert!(e.admit().await.is_ok());
        assert_eq!(e.pending(), 0);
    }

    #[tokio::test]
    async fn an_open_breaker_refuses_without_sending_and_edits_keep_it() {
        let e = Endpoint::new(limits(4, 4), breaker_cfg(), Arc::default());
        for _ in 0..2 {
            e.admit().await.unwrap().finish(false);
        }
        assert_eq!(e.state(), BreakerState::Open);
        assert_eq!(e.admit().await.err(), Some(NotNow::CircuitOpen));
        assert_eq!(e.pending(), 0);
        let edited = Endpoint::new(limits(8, 4), breaker_cfg(), Arc::default());
        edited.inherit(&e);
        assert_eq!(edited.state(), BreakerState::Open);
        assert_eq!(edited.admit().await.err(), Some(NotNow::CircuitOpen));
    }

    #[tokio::test]
    async fn the_token_bucket_spaces_requests_after_the_burst() {
        let mut l = limits(100, 100);
        l.rate_per_sec = Some(10);
        l.burst = Some(2);
        let e = Endpoint::new(l, breaker_cfg(), Arc::default());
        // The burst goes at once; the third request needs a new token (100 ms at 10/s).
        let t0 = std::time::Instant::now();
        for _ in 0..3 {
            drop(e.admit().await.unwrap());
        }
        assert!(
            t0.elapsed() >= Duration::from_millis(80),
            "the third token was waited for: {:?}",
            t0.elapsed()
        );
    }

    #[tokio::test]
    async fn limits_follow_the_group_share() {
        let share = Arc::new(GroupShare::default());
        let l = EndpointLimits {
            max_in_flight: 8,
            rate_per_sec: Some(100),
            burst: Some(100),
            queue: 1000,
            queue_wait: Duration::from_secs(1),
        };
        let e = Endpoint::new(l, breaker_cfg(), share.clone());
        assert_eq!(e.effective(), (8, Some(100.0)));
        assert_eq!(e.capacity.load(Ordering::Relaxed), 8 + 200);

        // Half the partitions: half the permits, rate, burst and queue — applied at the next admission.
        share.set(1, 2);
        let mut slots = Vec::new();
        for _ in 0..4 {
            slots.push(e.admit().await.unwrap());
        }
        assert_eq!(e.effective(), (4, Some(50.0)));
        assert_eq!(e.capacity.load(Ordering::Relaxed), 4 + 100);
        assert!(
            e.admit().now_or_never().is_none(),
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
