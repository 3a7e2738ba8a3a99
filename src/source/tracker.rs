//! Per-partition offset tracking: records of a partition finish out of order, offsets are committed in order.
//!
//! The source loop owns one [`PartitionTracker`] per assigned partition and pushes every record it hands
//! out. Each delivery of a record holds a [`Completion`]; finishing it is one atomic decrement, so delivery
//! tasks never lock anything. The tracker then advances over the contiguous prefix of finished records:
//! the committable offset is the offset after the last record of that prefix, so the committed offset
//! never passes an unfinished record (DESIGN §6).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

pub use crate::completion::Completion;
use crate::completion::RecordState;

#[derive(Debug)]
struct Entry {
    offset: i64,
    bytes: u32,
    /// When the record was taken from Kafka (the caller's monotonic ms, truncated): how long it has
    /// been holding the partition's commit once it is the oldest unfinished record.
    taken_ms: u32,
    timestamp_ms: i64,
    /// `None` when the record needed no work (already done when pushed).
    state: Option<Arc<RecordState>>,
}

impl Entry {
    fn is_done(&self) -> bool {
        self.state.as_ref().is_none_or(|s| s.is_done())
    }
}

/// A record at or below an offset the tracker already saw (a re-fetch); it is being handled already.
#[derive(Debug, PartialEq, Eq)]
pub struct AlreadySeen;

#[derive(Debug, Default)]
pub struct PartitionTracker {
    entries: VecDeque<Entry>,
    bytes: u64,
    /// Offset after the last finished record of the contiguous finished prefix.
    committable: Option<i64>,
    /// The last value returned by [`PartitionTracker::take_store`].
    stored: Option<i64>,
    last_seen: Option<i64>,
}

impl PartitionTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a record that needs `deliveries` pieces of work and returns one [`Completion`] per piece.
    pub fn push(
        &mut self,
        offset: i64,
        bytes: u32,
        timestamp_ms: i64,
        deliveries: u32,
    ) -> Result<Vec<Completion>, AlreadySeen> {
        self.push_at(offset, bytes, timestamp_ms, deliveries, 0)
    }

    /// [`PartitionTracker::push`] of a record taken at `taken_ms` (a monotonic clock in ms).
    pub fn push_at(
        &mut self,
        offset: i64,
        bytes: u32,
        timestamp_ms: i64,
        deliveries: u32,
        taken_ms: u64,
    ) -> Result<Vec<Completion>, AlreadySeen> {
        let taken_ms = taken_ms as u32;
        if self.last_seen.is_some_and(|l| offset <= l) {
            return Err(AlreadySeen);
        }
        self.last_seen = Some(offset);
        if deliveries == 0 {
            if self.entries.is_empty() {
                self.committable = Some(offset + 1);
            } else {
                self.entries.push_back(Entry {
                    offset,
                    bytes: 0,
                    taken_ms,
                    timestamp_ms,
                    state: None,
                });
            }
            return Ok(Vec::new());
        }
        let state = Arc::new(RecordState {
            pending: AtomicU32::new(deliveries),
            work: deliveries,
        });
        let completions = (0..deliveries).map(|_| Completion(state.clone())).collect();
        self.entries.push_back(Entry {
            offset,
            bytes,
            taken_ms,
            timestamp_ms,
            state: Some(state),
        });
        self.bytes += u64::from(bytes);
        Ok(completions)
    }

    /// Drops the finished prefix; returns (records, bytes) released.
    pub fn advance(&mut self) -> (usize, u64) {
        let mut records = 0;
        let mut bytes = 0u64;
        while let Some(front) = self.entries.front() {
            if !front.is_done() {
                break;
            }
            self.committable = Some(front.offset + 1);
            bytes += u64::from(front.bytes);
            records += 1;
            self.entries.pop_front();
        }
        self.bytes -= bytes;
        (records, bytes)
    }

    /// The next offset to commit (everything below it is done), if any record finished.
    pub fn committable(&self) -> Option<i64> {
        self.committable
    }

    /// The committable offset when it moved since the last call.
    pub fn take_store(&mut self) -> Option<i64> {
        if self.committable != self.stored {
            self.stored = self.committable;
            return self.committable;
        }
        None
    }

    /// Records held (unfinished, or finished behind an unfinished one).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How long (at `now_ms`, the clock of `push_at`) the oldest unfinished record has been taken;
    /// `None` when nothing is unfinished. After [`PartitionTracker::advance`] that is the head, so this
    /// looks at one entry.
    pub fn held_ms(&self, now_ms: u64) -> Option<u64> {
        self.entries
            .iter()
            .find(|e| !e.is_done())
            .map(|e| u64::from((now_ms as u32).wrapping_sub(e.taken_ms)))
    }

    /// What holds this partition at `now_ms` (same clock as `push_at`), for the spill decision.
    pub fn window(&self, now_ms: u64) -> Window {
        let mut w = Window::default();
        for e in &self.entries {
            // A record without work is no delivery: a window of such records behind one slow
            // endpoint is a backlog to pace, not done work to free.
            let (work, pending) = match &e.state {
                None => (0, 0),
                Some(s) => (s.work, s.pending.load(Ordering::Acquire)),
            };
            w.units += u64::from(work);
            w.done_units += u64::from(work - pending.min(work));
        }
        w.held_ms = self.held_ms(now_ms);
        w
    }

    /// The offset just past the `n`-th unfinished record, and past every unfinished record held for
    /// `older_than_ms` or longer at `now_ms`, whichever is further: the records whose waiting
    /// deliveries are handed to a tier to unblock the partition. `None` when nothing is unfinished.
    pub fn spill_point(&self, n: usize, older_than_ms: Option<u64>, now_ms: u64) -> Option<i64> {
        let mut point = None;
        for (counted, e) in self.entries.iter().filter(|e| !e.is_done()).enumerate() {
            // Ages, not times, so that the u32 truncation of `taken_ms` wraps harmlessly.
            let age = u64::from((now_ms as u32).wrapping_sub(e.taken_ms));
            if counted < n || older_than_ms.is_some_and(|o| age >= o) {
                point = Some(e.offset + 1);
            } else {
                break;
            }
        }
        point
    }

    /// Timestamp (epoch ms) of the oldest unfinished record.
    pub fn oldest_unfinished_ms(&self) -> Option<i64> {
        self.entries
            .iter()
            .find(|e| !e.is_done())
            .map(|e| e.timestamp_ms)
    }
}

/// A partition's window of held records as deliveries: how much of it is done, and how long the oldest
/// unfinished record has held the commit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Deliveries of the held records (records without work count for nothing).
    pub units: u64,
    pub done_units: u64,
    /// How long the oldest unfinished record has been taken, if any.
    pub held_ms: Option<u64>,
}

impl Window {
    /// Whether spilling the unfinished head would free work that is otherwise done: at least
    /// `min_done` (a fraction) of the window's deliveries finished. A window that is all waiting for
    /// one endpoint (a catch-up) is not: there, spilling only moves the backlog through a tier.
    pub fn head_blocks_done_work(&self, min_done: f64) -> bool {
        self.units > 0 && self.done_units as f64 >= min_done * self.units as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_done_deliveries_and_the_hold_time_of_the_head() {
        let mut t = PartitionTracker::new();
        let mut a = t.push_at(0, 1, 0, 3, 1_000).unwrap();
        let mut b = t.push_at(1, 1, 0, 2, 1_500).unwrap();
        t.push_at(2, 1, 0, 0, 1_600).unwrap();
        let w = t.window(4_000);
        assert_eq!((w.units, w.done_units, w.held_ms), (5, 0, Some(3_000)));
        assert!(!w.head_blocks_done_work(0.5));
        b.pop().unwrap().done();
        b.pop().unwrap().done();
        a.pop().unwrap().done();
        let w = t.window(4_000);
        assert_eq!((w.units, w.done_units), (5, 3));
        assert!(
            w.head_blocks_done_work(0.5),
            "2 of 5 deliveries hold 3 done ones"
        );
        // The head record finishes: nothing holds the commit any more.
        a.into_iter().for_each(Completion::done);
        t.advance();
        assert_eq!(t.window(4_000), Window::default());
    }

    #[test]
    fn spill_point_covers_the_oldest_and_the_too_old() {
        let mut t = PartitionTracker::new();
        let _a = t.push_at(10, 1, 0, 1, 1_000).unwrap();
        let mut b = t.push_at(11, 1, 0, 1, 2_000).unwrap();
        let _c = t.push_at(12, 1, 0, 1, 3_000).unwrap();
        let _d = t.push_at(13, 1, 0, 1, 4_000).unwrap();
        assert_eq!(t.spill_point(1, None, 5_000), Some(11));
        assert_eq!(t.spill_point(2, None, 5_000), Some(12));
        // Every record held for 1.5 s or more (three of them), even when asked for one.
        assert_eq!(t.spill_point(1, Some(1_500), 5_000), Some(13));
        // Finished records are skipped, not counted.
        b.pop().unwrap().done();
        assert_eq!(t.spill_point(2, None, 5_000), Some(13));
        assert_eq!(PartitionTracker::new().spill_point(3, None, 0), None);
    }

    #[test]
    fn commits_only_the_contiguous_done_prefix() {
        let mut t = PartitionTracker::new();
        let mut a = t.push(10, 100, 0, 1).unwrap();
        let mut b = t.push(11, 100, 0, 2).unwrap();
        let mut c = t.push(12, 100, 0, 1).unwrap();
        assert_eq!((t.len(), t.bytes()), (3, 300));
        // Later records finish first: nothing is committable.
        c.pop().unwrap().done();
        b.pop().unwrap().done();
        assert_eq!(t.advance(), (0, 0));
        assert_eq!(t.committable(), None);
        // The head finishes: only up to the record that still has a pending delivery.
        a.pop().unwrap().done();
        assert_eq!(t.advance(), (1, 100));
        assert_eq!(t.committable(), Some(11));
        b.pop().unwrap().done();
        assert_eq!(t.advance(), (2, 200));
        assert_eq!(t.committable(), Some(13));
        assert!(t.is_empty());
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn records_without_work_and_offset_gaps() {
        let mut t = PartitionTracker::new();
        assert!(t.push(5, 10, 0, 0).unwrap().is_empty());
        assert_eq!(t.committable(), Some(6));
        let mut a = t.push(9, 10, 0, 1).unwrap(); // gap 6..8 (compaction, markers)
        t.push(12, 10, 0, 0).unwrap(); // no work, but behind an unfinished record
        t.advance();
        assert_eq!(t.committable(), Some(6));
        assert_eq!(t.len(), 2);
        a.pop().unwrap().done();
        t.advance();
        assert_eq!(t.committable(), Some(13));
    }

    #[test]
    fn dropped_completion_never_finishes_a_record() {
        let mut t = PartitionTracker::new();
        let c = t.push(0, 1, 0, 1).unwrap();
        drop(c);
        t.advance();
        assert_eq!(t.committable(), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn take_store_reports_each_change_once() {
        let mut t = PartitionTracker::new();
        assert_eq!(t.take_store(), None);
        t.push(0, 1, 0, 0).unwrap();
        assert_eq!(t.take_store(), Some(1));
        assert_eq!(t.take_store(), None);
        t.push(1, 1, 0, 0).unwrap();
        assert_eq!(t.take_store(), Some(2));
    }

    #[test]
    fn refetched_offsets_are_refused() {
        let mut t = PartitionTracker::new();
        t.push(3, 1, 0, 1).unwrap();
        assert_eq!(t.push(3, 1, 0, 1).unwrap_err(), AlreadySeen);
        assert_eq!(t.push(2, 1, 0, 1).unwrap_err(), AlreadySeen);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn oldest_unfinished_timestamp() {
        let mut t = PartitionTracker::new();
        let mut a = t.push(0, 1, 1000, 1).unwrap();
        let _b = t.push(1, 1, 2000, 1).unwrap();
        assert_eq!(t.oldest_unfinished_ms(), Some(1000));
        a.pop().unwrap().done();
        assert_eq!(t.oldest_unfinished_ms(), Some(2000));
    }

    #[test]
    fn completions_from_many_threads() {
        let mut t = PartitionTracker::new();
        let mut all = Vec::new();
        for off in 0..1000 {
            all.extend(t.push(off, 1, 0, 3).unwrap());
        }
        // Finish all but the deliveries of record 500 on four threads.
        let held: Vec<Completion> = all.drain(1500..1503).collect();
        let mut chunks: Vec<Vec<Completion>> = Vec::new();
        while !all.is_empty() {
            let n = all.len().min(750);
            chunks.push(all.drain(..n).collect());
        }
        std::thread::scope(|s| {
            for chunk in chunks {
                s.spawn(move || chunk.into_iter().for_each(Completion::done));
            }
        });
        t.advance();
        assert_eq!(t.committable(), Some(500));
        held.into_iter().for_each(Completion::done);
        t.advance();
        assert_eq!(t.committable(), Some(1000));
        assert!(t.is_empty());
    }
}
