//! The two clocks hookline reads: wall time for what crosses process boundaries (due times in headers,
//! attempt rows, lag against record timestamps) and a monotonic one for how long something has waited
//! here (it never jumps with the wall clock).

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock time, epoch milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Monotonic milliseconds since the first call in this process.
pub fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
