//! The per-key lanes of one source partition: which event of each ordering key may be delivered now.
//! Pure state (no I/O, no clock): the caller feeds it what happened and carries out the [`Action`]s it
//! returns, so every ordering rule is tested here with plain values.
//!
//! A *lane* is one (subscription, ordering key) of one source partition. Its events are ordered by their
//! source offset. A lane is either *direct* — its events come from the source partition and run one at
//! a time, the next one starting when the one before finished — or *parked*: one of its events failed
//! (or was deferred, or is held after a dead letter), so that event and every later one of the key are
//! appended to the partition's parked topic partition and delivered from there, in offset order, one at
//! a time, while every other lane keeps going.
//!
//! The order rule, in one line: **a lane starts an event only when no event of the key with a lower
//! source offset is unfinished** — running, queued, or appended to the parked topic and not yet read
//! back (`outstanding`). Appends may reach Kafka in any order (retries, several tasks); the reader waits
//! for the outstanding ones. After a restart or rebalance nothing is outstanding in memory: the lanes
//! stay *not ready* (nothing starts) until the parked partition was read up to the end it had when it
//! was assigned, so everything appended before is known before anything is delivered.
//!
//! A parked lane returns to direct once it has nothing queued, running or outstanding.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use uuid::Uuid;

/// A lane: subscription and ordering key (within one source partition).
pub type LaneKey = (Uuid, Bytes);

/// What the lanes ask the caller to do.
#[derive(Debug)]
pub enum Action<J> {
    /// Deliver this job now (a direct or a parked one).
    Start(LaneKey, i64, J),
    /// Append this source job to the parked topic; it counts as outstanding until read back.
    Redirect(LaneKey, i64, J),
    /// This job is a copy of one already known (re-read after a restart): finish it, deliver nothing.
    Drop(J),
    /// A hold marker reached the head of its lane: the key waits for an operator's release.
    Held(LaneKey, i64),
}

/// Where a job came from, as the lanes need to know it.
pub trait Job {
    /// Read from the parked topic (rather than taken from the source partition).
    fn parked(&self) -> bool;
    /// A hold marker (an event dead-lettered under `on_dead_letter: hold`): blocks its lane, delivers
    /// nothing.
    fn hold(&self) -> bool;
}

/// How a started job ended, as its lane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Delivered, or dead-lettered with `on_dead_letter: continue`: the lane moves on.
    Continue,
    /// Not delivered and not terminal (retryable failure, deferral), or held after a dead letter: the
    /// caller appends the event (or its hold marker) to the parked topic at this offset; the lane parks.
    Park,
}

#[derive(Debug)]
struct Lane<J> {
    parked: bool,
    /// Source offset of the job being delivered.
    running: Option<i64>,
    /// A hold marker at the head: its offset and job (finished on release).
    held: Option<(i64, J)>,
    /// Jobs waiting, by source offset.
    queue: BTreeMap<i64, J>,
    /// Offsets appended to the parked topic and not read back yet.
    outstanding: BTreeSet<i64>,
    /// The highest offset finished here (copies at or below it are dropped).
    finished: i64,
    /// When the lane parked (ms on the caller's clock), for the oldest-parked-age metric.
    parked_at: u64,
}

impl<J> Lane<J> {
    fn new() -> Self {
        Lane {
            parked: false,
            running: None,
            held: None,
            queue: BTreeMap::new(),
            outstanding: BTreeSet::new(),
            finished: -1,
            parked_at: 0,
        }
    }

    /// Marks the lane parked (since `now`, if it was not) and takes its queued source jobs out, in
    /// order, as redirects behind what is parked: they count as outstanding until read back.
    fn park(&mut self, key: &LaneKey, now: u64, out: &mut Vec<Action<J>>)
    where
        J: Job,
    {
        if !self.parked {
            self.parked = true;
            self.parked_at = now;
        }
        let sources: Vec<i64> = self
            .queue
            .iter()
            .filter(|(_, j)| !j.parked())
            .map(|(o, _)| *o)
            .collect();
        for o in sources {
            if let Some(j) = self.queue.remove(&o) {
                self.outstanding.insert(o);
                out.push(Action::Redirect(key.clone(), o, j));
            }
        }
    }

    fn idle(&self) -> bool {
        self.running.is_none()
            && self.held.is_none()
            && self.queue.is_empty()
            && self.outstanding.is_empty()
    }
}

/// What a lane looks like from outside (API, metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneView {
    pub key: LaneKey,
    /// The lowest unfinished offset of the key (running, held, queued or outstanding).
    pub head: Option<i64>,
    pub held: bool,
    pub running: bool,
    /// Events of the key waiting behind the head (queued or outstanding).
    pub backlog: usize,
    pub parked_at: u64,
}

/// The lanes of one source partition.
#[derive(Debug)]
pub struct Lanes<J> {
    ready: bool,
    lanes: HashMap<LaneKey, Lane<J>>,
}

impl<J: Job> Default for Lanes<J> {
    fn default() -> Self {
        Lanes {
            ready: false,
            lanes: HashMap::new(),
        }
    }
}

impl<J: Job> Lanes<J> {
    /// Lanes that may start jobs at once (nothing parked to read first: tests, and partitions whose
    /// parked partition is known to be empty).
    pub fn ready_now() -> Self {
        Lanes {
            ready: true,
            lanes: HashMap::new(),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// A source record's job for `key` at `offset`.
    pub fn source(&mut self, key: LaneKey, offset: i64, job: J) -> Vec<Action<J>> {
        let ready = self.ready;
        let lane = self.lanes.entry(key.clone()).or_insert_with(Lane::new);
        if offset <= lane.finished
            || lane.queue.contains_key(&offset)
            || lane.running == Some(offset)
            || lane.held.as_ref().is_some_and(|(o, _)| *o == offset)
        {
            return vec![Action::Drop(job)];
        }
        if ready && lane.parked {
            lane.outstanding.insert(offset);
            return vec![Action::Redirect(key, offset, job)];
        }
        lane.queue.insert(offset, job);
        if ready { self.next(&key) } else { Vec::new() }
    }

    /// A job read from the parked partition for `key` at (source) `offset`.
    pub fn parked(&mut self, key: LaneKey, offset: i64, job: J, now: u64) -> Vec<Action<J>> {
        let lane = self.lanes.entry(key.clone()).or_insert_with(Lane::new);
        lane.outstanding.remove(&offset);
        // A copy of something finished, queued, held or running here: keep the one we have. (A hold
        // marker replaces its event, which is running when the marker comes back.)
        let running_same = lane.running == Some(offset) && !job.hold();
        if offset <= lane.finished
            || lane.held.as_ref().is_some_and(|(o, _)| *o == offset)
            || running_same
        {
            return vec![Action::Drop(job)];
        }
        if !lane.parked {
            lane.parked = true;
            lane.parked_at = now;
        }
        // Of two copies of one event, the later read is the later append: it carries the newer
        // state (more attempts, a hold marker), and a source copy gives way to a parked one.
        let mut out = Vec::new();
        if let Some(old) = lane.queue.insert(offset, job) {
            out.push(Action::Drop(old));
        }
        if self.ready {
            out.extend(self.next(&key));
        }
        out
    }

    /// The parked partition was read to the end it had at assignment: start what may start. Queued
    /// source jobs of lanes that turned out parked are redirected behind their parked events.
    pub fn set_ready(&mut self, now: u64) -> Vec<Action<J>> {
        if self.ready {
            return Vec::new();
        }
        self.ready = true;
        let keys: Vec<LaneKey> = self.lanes.keys().cloned().collect();
        let mut out = Vec::new();
        for key in keys {
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            if lane.queue.values().any(Job::parked) {
                lane.park(&key, now, &mut out);
            }
            out.extend(self.next(&key));
        }
        out
    }

    /// The running job of `key` at `offset` ended.
    pub fn finished(
        &mut self,
        key: &LaneKey,
        offset: i64,
        how: Finish,
        now: u64,
    ) -> Vec<Action<J>> {
        let Some(lane) = self.lanes.get_mut(key) else {
            return Vec::new();
        };
        if lane.running == Some(offset) {
            lane.running = None;
        }
        let mut out = Vec::new();
        match how {
            Finish::Continue => lane.finished = lane.finished.max(offset),
            Finish::Park => {
                // Everything queued behind it follows it to the parked topic (parked jobs already are
                // there and stay queued).
                lane.outstanding.insert(offset);
                lane.park(key, now, &mut out);
            }
        }
        out.extend(self.next(key));
        out
    }

    /// An operator released the hold at `offset`: the marker is finished and the key moves on. `None`
    /// when the key is not held there.
    pub fn release(&mut self, key: &LaneKey, offset: i64) -> Option<Vec<Action<J>>> {
        let lane = self.lanes.get_mut(key)?;
        if lane.held.as_ref().is_none_or(|(o, _)| *o != offset) {
            return None;
        }
        let (_, job) = lane.held.take()?;
        lane.finished = lane.finished.max(offset);
        let mut out = vec![Action::Drop(job)];
        out.extend(self.next(key));
        Some(out)
    }

    /// Starts the head of `key` when nothing before it is unfinished; forgets an idle lane.
    fn next(&mut self, key: &LaneKey) -> Vec<Action<J>> {
        let Some(lane) = self.lanes.get_mut(key) else {
            return Vec::new();
        };
        if !self.ready || lane.running.is_some() || lane.held.is_some() {
            return Vec::new();
        }
        let Some((&first, _)) = lane.queue.first_key_value() else {
            if lane.idle() {
                self.lanes.remove(key);
            }
            return Vec::new();
        };
        if lane.outstanding.first().is_some_and(|&o| o < first) {
            return Vec::new();
        }
        let Some(job) = lane.queue.remove(&first) else {
            return Vec::new();
        };
        if job.hold() {
            lane.held = Some((first, job));
            return vec![Action::Held(key.clone(), first)];
        }
        // A direct job's lane has nothing parked: it is direct again once nothing is outstanding.
        if !job.parked() && lane.outstanding.is_empty() && lane.parked {
            lane.parked = false;
        }
        lane.running = Some(first);
        vec![Action::Start(key.clone(), first, job)]
    }

    /// Takes every queued and held job (revocation: they are dropped unfinished, so the next owner
    /// delivers them) and stops the lanes from starting anything more.
    pub fn clear(&mut self) -> Vec<J> {
        self.ready = false;
        let mut out = Vec::new();
        for (_, lane) in self.lanes.drain() {
            out.extend(lane.queue.into_values());
            out.extend(lane.held.map(|(_, j)| j));
        }
        out
    }

    /// The lanes that are parked (for the API and metrics).
    pub fn parked_lanes(&self) -> Vec<LaneView> {
        self.lanes
            .iter()
            .filter(|(_, l)| l.parked)
            .map(|(k, l)| {
                let head = [
                    l.running,
                    l.held.as_ref().map(|(o, _)| *o),
                    l.queue.keys().next().copied(),
                    l.outstanding.first().copied(),
                ]
                .into_iter()
                .flatten()
                .min();
                LaneView {
                    key: k.clone(),
                    head,
                    held: l.held.is_some(),
                    running: l.running.is_some(),
                    backlog: (l.queue.len() + l.outstanding.len())
                        .saturating_sub(usize::from(l.running.is_none() && l.held.is_none())),
                    parked_at: l.parked_at,
                }
            })
            .collect()
    }

    /// Lanes known (parked or with work), for tests and metrics.
    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job: its name, whether it is parked, whether a hold marker.
    #[derive(Debug, Clone, PartialEq)]
    struct J(&'static str, bool, bool);

    impl Job for J {
        fn parked(&self) -> bool {
            self.1
        }
        fn hold(&self) -> bool {
            self.2
        }
    }

    fn src(n: &'static str) -> J {
        J(n, false, false)
    }
    fn pk(n: &'static str) -> J {
        J(n, true, false)
    }

    fn key(k: &'static str) -> LaneKey {
        (Uuid::nil(), Bytes::from_static(k.as_bytes()))
    }

    /// The names of the jobs started, redirected, dropped; held offsets.
    fn names(actions: &[Action<J>]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Start(_, o, j) => format!("start {} @{o}", j.0),
                Action::Redirect(_, o, j) => format!("redirect {} @{o}", j.0),
                Action::Drop(j) => format!("drop {}", j.0),
                Action::Held(_, o) => format!("held @{o}"),
            })
            .collect()
    }

    #[test]
    fn one_event_per_key_at_a_time_in_offset_order_and_keys_independent() {
        let mut l: Lanes<J> = Lanes::ready_now();
        assert_eq!(names(&l.source(key("a"), 1, src("a1"))), ["start a1 @1"]);
        assert!(l.source(key("a"), 3, src("a3")).is_empty(), "waits for a1");
        assert_eq!(names(&l.source(key("b"), 2, src("b2"))), ["start b2 @2"]);
        assert_eq!(
            names(&l.finished(&key("a"), 1, Finish::Continue, 0)),
            ["start a3 @3"]
        );
        assert!(l.finished(&key("a"), 3, Finish::Continue, 0).is_empty());
        assert!(l.finished(&key("b"), 2, Finish::Continue, 0).is_empty());
        assert!(l.is_empty(), "idle lanes are forgotten");
    }

    #[test]
    fn a_failure_parks_the_key_and_its_later_events_follow_it_in_order() {
        let mut l: Lanes<J> = Lanes::ready_now();
        l.source(key("a"), 1, src("a1"));
        l.source(key("a"), 2, src("a2"));
        l.source(key("a"), 4, src("a4"));
        // a1 failed: it is appended (by the caller) and a2, a4 follow.
        let acts = l.finished(&key("a"), 1, Finish::Park, 7);
        assert_eq!(names(&acts), ["redirect a2 @2", "redirect a4 @4"]);
        // Later source events of the key go straight to the parked topic.
        assert_eq!(names(&l.source(key("a"), 5, src("a5"))), ["redirect a5 @5"]);
        // Other keys are not affected.
        assert_eq!(names(&l.source(key("b"), 6, src("b6"))), ["start b6 @6"]);
        let v = l.parked_lanes();
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].head, v[0].parked_at), (Some(1), 7));
        // The appends come back out of order: nothing starts before the lowest outstanding one.
        assert!(l.parked(key("a"), 4, pk("a4"), 0).is_empty());
        assert!(
            l.parked(key("a"), 2, pk("a2"), 0).is_empty(),
            "a1 is outstanding"
        );
        assert_eq!(names(&l.parked(key("a"), 1, pk("a1"), 0)), ["start a1 @1"]);
        assert_eq!(
            names(&l.finished(&key("a"), 1, Finish::Continue, 0)),
            ["start a2 @2"]
        );
        assert_eq!(
            names(&l.finished(&key("a"), 2, Finish::Continue, 0)),
            ["start a4 @4"]
        );
        assert!(
            l.finished(&key("a"), 4, Finish::Continue, 0).is_empty(),
            "a5 is not back yet"
        );
        assert_eq!(names(&l.parked(key("a"), 5, pk("a5"), 0)), ["start a5 @5"]);
        l.finished(&key("a"), 5, Finish::Continue, 0);
        assert!(l.parked_lanes().is_empty(), "drained: direct again");
        assert_eq!(names(&l.source(key("a"), 9, src("a9"))), ["start a9 @9"]);
    }

    #[test]
    fn nothing_starts_before_the_parked_partition_was_read_to_its_end() {
        let mut l: Lanes<J> = Lanes::default();
        // After a restart: source records arrive while the parked partition is still being read.
        assert!(l.source(key("a"), 10, src("a10")).is_empty());
        assert!(l.source(key("b"), 11, src("b11")).is_empty());
        assert!(l.parked(key("a"), 7, pk("a7"), 0).is_empty());
        // A copy of an event appended twice (redirected, then re-read from the source after a crash).
        // Its parked copy (it was redirected before the restart) takes the source copy's place.
        assert_eq!(names(&l.parked(key("a"), 10, pk("a10'"), 0)), ["drop a10"]);
        // A source event of a key that turns out parked follows its parked events.
        assert!(l.source(key("a"), 12, src("a12")).is_empty());
        let mut acts = names(&l.set_ready(5));
        acts.sort();
        // b has nothing parked and starts; a starts with its oldest parked event.
        assert_eq!(acts, ["redirect a12 @12", "start a7 @7", "start b11 @11"]);
        assert_eq!(
            names(&l.finished(&key("a"), 7, Finish::Continue, 0)),
            ["start a10' @10"]
        );
    }

    #[test]
    fn copies_of_finished_or_queued_events_are_dropped() {
        let mut l: Lanes<J> = Lanes::ready_now();
        l.parked(key("a"), 3, pk("a3"), 0);
        assert_eq!(
            names(&l.parked(key("a"), 3, pk("again"), 0)),
            ["drop again"]
        );
        l.parked(key("a"), 5, pk("a5"), 0);
        l.finished(&key("a"), 3, Finish::Continue, 0);
        assert_eq!(names(&l.parked(key("a"), 2, pk("old"), 0)), ["drop old"]);
        assert_eq!(names(&l.source(key("a"), 5, src("s5"))), ["drop s5"]);
    }

    #[test]
    fn of_two_copies_of_an_event_the_later_read_wins() {
        let mut l: Lanes<J> = Lanes::default();
        assert!(l.source(key("a"), 3, src("s3")).is_empty());
        // Re-read after a restart: the event appended at attempt 1, then again at attempt 2.
        assert_eq!(names(&l.parked(key("a"), 3, pk("try1"), 0)), ["drop s3"]);
        assert_eq!(names(&l.parked(key("a"), 3, pk("try2"), 0)), ["drop try1"]);
        assert_eq!(names(&l.set_ready(0)), ["start try2 @3"]);
    }

    #[test]
    fn a_hold_marker_blocks_its_key_until_released() {
        let mut l: Lanes<J> = Lanes::ready_now();
        l.source(key("a"), 1, src("a1"));
        l.source(key("a"), 2, src("a2"));
        // a1 dead-lettered with on_dead_letter hold: its marker is appended (Park).
        assert_eq!(
            names(&l.finished(&key("a"), 1, Finish::Park, 0)),
            ["redirect a2 @2"]
        );
        assert!(l.parked(key("a"), 2, pk("a2"), 0).is_empty());
        assert_eq!(
            names(&l.parked(key("a"), 1, J("mark", true, true), 0)),
            ["held @1"]
        );
        let v = l.parked_lanes();
        assert!(v[0].held && v[0].head == Some(1));
        assert!(l.release(&key("a"), 2).is_none(), "not held at 2");
        assert!(l.release(&key("b"), 1).is_none());
        assert_eq!(
            names(&l.release(&key("a"), 1).unwrap()),
            ["drop mark", "start a2 @2"]
        );
    }

    #[test]
    fn a_hold_marker_of_a_running_parked_event_replaces_it() {
        let mut l: Lanes<J> = Lanes::ready_now();
        assert_eq!(names(&l.parked(key("a"), 4, pk("a4"), 0)), ["start a4 @4"]);
        l.parked(key("a"), 6, pk("a6"), 0);
        // a4 was dead-lettered under hold: the caller appends its marker at 4.
        assert!(l.finished(&key("a"), 4, Finish::Park, 0).is_empty());
        assert_eq!(
            names(&l.parked(key("a"), 4, J("mark", true, true), 0)),
            ["held @4"]
        );
    }

    #[test]
    fn clear_hands_back_queued_and_held_jobs_and_stops_starting() {
        let mut l: Lanes<J> = Lanes::ready_now();
        l.source(key("a"), 1, src("a1"));
        l.source(key("a"), 2, src("a2"));
        let left = l.clear();
        assert_eq!(left, vec![src("a2")]);
        assert!(!l.is_ready());
        assert!(l.finished(&key("a"), 1, Finish::Continue, 0).is_empty());
    }
}
