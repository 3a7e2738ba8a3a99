//! Spill signals: how the source tells the *waiting* deliveries of a blocked partition to step aside.
//!
//! A delivery waits for its endpoint (a concurrency permit, a rate-limit token) for as long as it takes:
//! that is backpressure, and a backlog for one endpoint is simply worked off at the endpoint's pace
//! while the partition stays paused at its in-flight bound. Waiting is only wrong when it holds back
//! work that is otherwise done — records whose other deliveries finished, stuck behind a slow or hung
//! endpoint. The source detects that per partition (see `source::Source::relieve`) and publishes a
//! [`SpillPoint`]: every delivery of a record below `through` that is still waiting is handed to a retry
//! tier (a deferral, no attempt spent); deliveries already sending are bounded by their timeout.
//!
//! One `watch` channel per partition: a waiting delivery holds a receiver and its record's offset, and
//! wakes only when the point moves (which happens only under pressure).

use tokio::sync::watch;

/// Why deliveries were spilled (`hookline_deferrals_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpillReason {
    /// The partition reached its in-flight bound while most of its window was done.
    PartitionBound,
    /// The oldest unfinished record held the partition's commit longer than `source.max_commit_delay`.
    CommitDelay,
}

impl SpillReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SpillReason::PartitionBound => "partition_bound",
            SpillReason::CommitDelay => "commit_delay",
        }
    }
}

/// Deliveries of records with an offset below `through` that are still waiting step aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpillPoint {
    pub through: i64,
    pub reason: SpillReason,
}

/// The sending side, one per assigned partition.
pub fn channel() -> watch::Sender<SpillPoint> {
    watch::Sender::new(SpillPoint {
        through: i64::MIN,
        reason: SpillReason::PartitionBound,
    })
}

/// One delivery's view of its partition's spill point.
#[derive(Debug)]
pub struct Spill {
    rx: Option<watch::Receiver<SpillPoint>>,
    offset: i64,
}

impl Spill {
    /// For the delivery of the record at `offset`.
    pub fn new(tx: &watch::Sender<SpillPoint>, offset: i64) -> Spill {
        Spill {
            rx: Some(tx.subscribe()),
            offset,
        }
    }

    /// A delivery that is never spilled (one-off test requests).
    pub fn never() -> Spill {
        Spill {
            rx: None,
            offset: 0,
        }
    }

    /// Whether this delivery should step aside now, for a reason `heeds` accepts.
    pub fn now(&self, heeds: impl Fn(SpillReason) -> bool) -> Option<SpillReason> {
        let p = *self.rx.as_ref()?.borrow();
        (self.offset < p.through && heeds(p.reason)).then_some(p.reason)
    }

    /// Resolves when this delivery should step aside for a reason `heeds` accepts (never, for
    /// [`Spill::never`] or a closed channel).
    pub async fn wait(&mut self, heeds: impl Fn(SpillReason) -> bool) -> SpillReason {
        let offset = self.offset;
        if let Some(rx) = self.rx.as_mut()
            && let Ok(p) = rx.wait_for(|p| offset < p.through && heeds(p.reason)).await
        {
            return p.reason;
        }
        std::future::pending().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[tokio::test]
    async fn only_records_below_the_point_step_aside() {
        let tx = channel();
        let mut old = Spill::new(&tx, 10);
        let mut young = Spill::new(&tx, 11);
        let all = |_| true;
        assert_eq!(old.now(all), None);
        assert!(old.wait(all).now_or_never().is_none());
        tx.send_replace(SpillPoint {
            through: 11,
            reason: SpillReason::CommitDelay,
        });
        assert_eq!(old.now(all), Some(SpillReason::CommitDelay));
        assert_eq!(old.wait(all).await, SpillReason::CommitDelay);
        // A delivery that does not heed commit delays (a rate-limited endpoint's) keeps waiting.
        let bound_only = |r| r == SpillReason::PartitionBound;
        assert_eq!(old.now(bound_only), None);
        assert!(old.wait(bound_only).now_or_never().is_none());
        assert_eq!(young.now(all), None);
        assert!(young.wait(all).now_or_never().is_none());
        assert!(Spill::never().wait(all).now_or_never().is_none());
        drop(tx);
        assert!(
            young.wait(all).now_or_never().is_none(),
            "a closed channel never spills"
        );
    }
}
