//! Group-wide limits (DESIGN §6): a subscription's `rate_limit_per_sec`, `burst` and `max_in_flight` hold
//! for the whole consumer group, not per instance. Each instance enforces its *share*: the configured value
//! times the fraction of the source partitions assigned to it, recomputed on every rebalance. Two
//! instances with half the partitions each send at most half the rate each, so the endpoint never sees
//! more than the configured rate however many instances run.
//!
//! An instance with no source partition (more members than partitions) still delivers retries from the
//! tier topics; it gets the share of one partition, so the group may slightly exceed the limit in that
//! case. Scaled values never drop below 1.

use std::sync::atomic::{AtomicU32, Ordering};

/// Parts per million of the group's work assigned to this instance.
pub const FULL: u32 = 1_000_000;

#[derive(Debug)]
pub struct GroupShare {
    ppm: AtomicU32,
}

impl Default for GroupShare {
    fn default() -> Self {
        GroupShare {
            ppm: AtomicU32::new(FULL),
        }
    }
}

impl GroupShare {
    /// This instance's share, in parts per million.
    pub fn ppm(&self) -> u32 {
        self.ppm.load(Ordering::Relaxed)
    }

    /// Records a new assignment: `assigned` of `total` source partitions. Returns the new share when it
    /// changed.
    pub fn set(&self, assigned: usize, total: usize) -> Option<u32> {
        let ppm = share_ppm(assigned, total);
        (self.ppm.swap(ppm, Ordering::Relaxed) != ppm).then_some(ppm)
    }
}

/// `max(assigned, 1) / total` in parts per million (everything when `total` is unknown).
pub fn share_ppm(assigned: usize, total: usize) -> u32 {
    if total == 0 {
        return FULL;
    }
    let a = assigned.clamp(1, total) as u64;
    ((a * FULL as u64) / total as u64) as u32
}

/// A count (burst, max_in_flight) scaled by the share, rounded up, at least 1.
pub fn scaled(value: u32, ppm: u32) -> u32 {
    let v = (u64::from(value) * u64::from(ppm)).div_ceil(u64::from(FULL));
    v.clamp(1, u64::from(value.max(1))) as u32
}

/// A rate scaled by the share (requests per second, at least 0.01).
pub fn scaled_rate(rate: u32, ppm: u32) -> f64 {
    (f64::from(rate) * f64::from(ppm) / f64::from(FULL)).max(0.01)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares() {
        assert_eq!(share_ppm(3, 6), 500_000);
        assert_eq!(share_ppm(6, 6), FULL);
        assert_eq!(share_ppm(0, 6), 166_666, "no partition: the share of one");
        assert_eq!(share_ppm(1, 0), FULL, "unknown total: everything");
        assert_eq!(share_ppm(9, 6), FULL);
        let s = GroupShare::default();
        assert_eq!(s.ppm(), FULL);
        assert_eq!(s.set(1, 2), Some(500_000));
        assert_eq!(s.set(2, 4), None, "unchanged");
        assert_eq!(s.ppm(), 500_000);
    }

    #[test]
    fn scaling() {
        assert_eq!(scaled(100, 500_000), 50);
        assert_eq!(scaled(3, 500_000), 2, "rounded up");
        assert_eq!(scaled(1, 100_000), 1, "never below 1");
        assert_eq!(scaled(64, FULL), 64);
        assert_eq!(scaled_rate(100, 500_000), 50.0);
        assert_eq!(scaled_rate(1, 1), 0.01);
        // Two halves add up to the whole.
        assert!((scaled_rate(100, share_ppm(2, 4)) * 2.0 - 100.0).abs() < 1e-9);
    }
}
