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

/// Shared by the deliveries of one record: how many are still running.
#[derive(Debug)]
pub struct RecordState {
    pending: AtomicU32,
}

impl RecordState {
    fn is_done(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }
}

/// One delivery's share of a record. Dropping it without calling [`Completion::done`] leaves the record
/// unfinished (so an aborted task can never cause an offset to be committed).
#[derive(Debug)]
pub struct Completion(Arc<RecordState>);

impl Completion {
    pub fn done(self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
struct Entry {
    offset: i64,
    bytes: u32,
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
                    timestamp_ms,
                    state: None,
                });
            }
            return Ok(Vec::new());
        }
        let state = Arc::new(RecordState {
            pending: AtomicU32::new(deliveries),
        });
        let completions = (0..deliveries).map(|_| Completion(state.clone())).collect();
        self.entries.push_back(Entry {
            offset,
            bytes,
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

    /// Timestamp (epoch ms) of the oldest unfinished record.
    pub fn oldest_unfinished_ms(&self) -> Option<i64> {
        self.entries
            .iter()
            .find(|e| !e.is_done())
            .map(|e| e.timestamp_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
