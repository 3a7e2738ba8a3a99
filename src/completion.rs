//! A delivery's share of a source record. The source's offset tracker (`source/tracker.rs`) makes one
//! [`Completion`] per delivery of a record; the delivery task (`dispatch.rs`) calls [`Completion::done`]
//! when its part is settled. A plain type low in the tree, so that dispatch never depends on the source.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Shared by the deliveries of one record: how many are still running (of `work`).
#[derive(Debug)]
pub struct RecordState {
    pub(crate) pending: AtomicU32,
    pub(crate) work: u32,
}

impl RecordState {
    pub(crate) fn is_done(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }
}

/// One delivery's share of a record. Dropping it without calling [`Completion::done`] leaves the record
/// unfinished (so an aborted task can never cause an offset to be committed).
#[derive(Debug)]
pub struct Completion(pub(crate) Arc<RecordState>);

impl Completion {
    pub fn done(self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}
