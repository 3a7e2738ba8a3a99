//! The source consumer: one consumer-group member reading the source topics.
//!
//! Flow per record: decode → match → one [`Completion`] per matching subscription, pushed into the
//! partition's [`PartitionTracker`] → deliveries run concurrently as tasks. Every `store_interval` the loop
//! advances the trackers and hands the committable offsets to librdkafka in one batch (one
//! `TopicPartitionList` per tick, never per record); librdkafka's auto-commit sends them to the broker.
//!
//! Backpressure: when a partition holds too many records or bytes, or the instance as a whole does, the
//! partition is paused (librdkafka keeps heartbeating and the poll loop keeps running for the others) and
//! resumed once below three quarters of the bounds. librdkafka resumes after the last record handed out,
//! so pausing never skips or repeats a record.
//!
//! Revocation drains the revoked partitions' in-flight records for up to `rebalance_timeout` and commits
//! synchronously before the partitions are given up; shutdown does the same for all partitions within
//! `shutdown_timeout`. Records still unfinished then are simply not committed: the next owner redelivers
//! them (at-least-once).
//!
//! The same loop, in its [`Role::Retry`], consumes the retry tier topics under its own group. There a
//! record that is not yet due is *held*: kept in memory with its tracker entry (so the commit cannot pass
//! it), in order, with a timer set for the head's `hookline-due-ms`. Tier delays are fixed per topic, so
//! due times only grow along a partition and only the head needs checking. Fetching goes on behind a
//! held head until `retry.max_held_per_partition` records are held; then the partition is paused
//! (keeping what was fetched) and resumed once the head records became due and were dispatched.
//! librdkafka resumes after the last record it handed out, so nothing is skipped or fetched twice.
//! (Pausing at every not-yet-due head would cost a pause/resume and a new fetch per record.) A rebalance
//! drops held records without committing them; the next owner fetches and holds them again, and since
//! the due time travels in the header nothing is early.

pub mod lag;
pub mod tracker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::clock::{mono_ms, now_ms};
use crate::config::{Config, GroupProtocol};
use crate::decode::{self, RawRecord};
use crate::deliver::share::GroupShare;
use crate::dispatch::Dispatcher;
use crate::kafka::topic_partitions;
use crate::matching::cache::Cache;
use crate::metrics::Metrics;
use crate::model::Prior;
use crate::model::{Event, Origin};
use crate::order::{Control, OJob, OrderContext, PartitionOrder};
use crate::retry::publish::LocalTiers;
use crate::retry::tier;
use crate::spill::{self, Spill, SpillPoint, SpillReason};
use tokio::sync::watch;
use tracker::{Completion, PartitionTracker};

/// What the consumer reads: the source topics (decode, match, fan out) or the retry tiers (hold until
/// due, deliver to the one subscription).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Retry,
}

impl Role {
    /// The consumer group this role joins.
    fn group(self, config: &Config) -> String {
        match self {
            Role::Source => config.source.group.clone(),
            Role::Retry => config.retry_group(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Retry => "retry",
        }
    }
}

/// A retry record waiting for its due time.
struct Held {
    due_ms: u64,
    event: Arc<Event>,
    subscription: uuid::Uuid,
    prior: Prior,
    done: Completion,
}

/// The share of a partition's window of deliveries that must be finished before spilling its waiting
/// head is worth a deferral (see [`Source::relieve`]).
const MIN_DONE: f64 = 0.25;

/// How long the final commit and the group leave may take at shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds on in-flight records (DESIGN §6).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_partition: usize,
    pub per_partition_bytes: u64,
    pub total: usize,
    pub total_bytes: u64,
}

impl Limits {
    fn over(&self, p: &PartitionTracker, total: usize, total_bytes: u64) -> bool {
        p.len() >= self.per_partition
            || p.bytes() >= self.per_partition_bytes
            || total >= self.total
            || total_bytes >= self.total_bytes
    }

    fn may_resume(&self, p: &PartitionTracker, total: usize, total_bytes: u64) -> bool {
        p.len() < self.per_partition * 3 / 4
            && p.bytes() < self.per_partition_bytes * 3 / 4
            && total < self.total * 3 / 4
            && total_bytes < self.total_bytes * 3 / 4
    }
}

struct PartitionState {
    tracker: PartitionTracker,
    /// Paused because an in-flight bound was reached.
    paused: bool,
    /// When it was paused at its bound (monotonic ms): a bound is acted on only once the partition has
    /// stayed there for a while (see [`Source::relieve`]).
    paused_at_ms: u64,
    /// Where this partition's waiting deliveries step aside (see `spill.rs` and [`Source::relieve`]).
    spill: watch::Sender<SpillPoint>,
    /// Retry records not yet due, oldest first; the partition is paused while `max_held` are held.
    held: std::collections::VecDeque<Held>,
    /// Source role: the partition's ordered deliveries (per-key lanes) and its parked partition.
    order: Option<Arc<PartitionOrder>>,
    parked: ParkedPart,
}

/// The parked partition of a source partition (same number, in the source topic's parked topic), read
/// by the source's owner.
struct ParkedPart {
    tracker: PartitionTracker,
    paused: bool,
    /// The offset whose reading makes the lanes ready (the last one the parked partition had at
    /// assignment); `None` once ready.
    ready_at: Option<i64>,
}

impl PartitionState {
    fn new() -> Self {
        PartitionState {
            tracker: PartitionTracker::new(),
            paused: false,
            paused_at_ms: 0,
            spill: spill::channel(),
            held: Default::default(),
            order: None,
            parked: ParkedPart {
                tracker: PartitionTracker::new(),
                paused: false,
                ready_at: None,
            },
        }
    }
}

/// State shared by the poll loop and the rebalance callbacks (which run inside the loop's `recv`, on the
/// same task, so the mutex is never contended in practice).
#[derive(Default)]
struct State {
    parts: HashMap<(Arc<str>, i32), PartitionState>,
    records: usize,
    bytes: u64,
    /// Set once the group assigned this member partitions (possibly none) at least once.
    joined: bool,
    /// Set when shutdown has drained; later revocations (from close) only commit.
    closing: bool,
}

/// What [`State::push`] did with a record.
struct Pushed {
    completions: Vec<tracker::Completion>,
    /// The partition's spill channel, for the deliveries' [`Spill`]s.
    spill: watch::Sender<SpillPoint>,
    /// The partition just went over a bound and must be paused in librdkafka.
    pause: bool,
    /// The partition's ordered deliveries.
    order: Option<Arc<PartitionOrder>>,
}

impl State {
    /// Pushes a record into its partition's tracker, keeping the instance totals equal to the sum of what
    /// the trackers hold (records with no work queued behind unfinished ones count too). `None` when the
    /// partition is not assigned here or the offset was already seen.
    fn push(
        &mut self,
        key: &(Arc<str>, i32),
        offset: i64,
        bytes: u32,
        ts_ms: i64,
        work: u32,
        limits: &Limits,
    ) -> Option<Pushed> {
        let part = self.parts.get_mut(key)?;
        let (r, b) = part.tracker.advance();
        let (len0, bytes0) = (part.tracker.len(), part.tracker.bytes());
        let completions = part
            .tracker
            .push_at(offset, bytes, ts_ms, work, mono_ms())
            .ok()?;
        self.records = self.records - r + (part.tracker.len() - len0);
        self.bytes = self.bytes - b + (part.tracker.bytes() - bytes0);
        let pause = !part.paused && limits.over(&part.tracker, self.records, self.bytes);
        if pause {
            part.paused = true;
            part.paused_at_ms = mono_ms();
        }
        Some(Pushed {
            completions,
            pause,
            spill: part.spill.clone(),
            order: part.order.clone(),
        })
    }

    /// Records taken and not finished, not counting held ones (those are given up, not waited for, at
    /// shutdown and revocation).
    fn unfinished(&mut self, keys: Option<&[(Arc<str>, i32)]>) -> usize {
        let mut left = 0;
        let (mut r, mut b) = (0, 0);
        for (k, p) in self.parts.iter_mut() {
            if keys.is_some_and(|ks| !ks.contains(k)) {
                continue;
            }
            let (r1, b1) = p.tracker.advance();
            r += r1;
            b += b1;
            left += p.tracker.len().saturating_sub(p.held.len());
        }
        self.records -= r;
        self.bytes -= b;
        left
    }

    /// Earliest due time of a held record, epoch ms.
    fn next_due(&self) -> Option<u64> {
        self.parts
            .values()
            .filter_map(|p| p.held.front().map(|h| h.due_ms))
            .min()
    }

    /// Advances every tracker; returns the offsets to store.
    fn advance_all(&mut self) -> Vec<(Arc<str>, i32, i64)> {
        let mut out = Vec::new();
        for ((topic, partition), p) in self.parts.iter_mut() {
            let (r, b) = p.tracker.advance();
            self.records -= r;
            self.bytes -= b;
            if let Some(o) = p.tracker.take_store() {
                out.push((topic.clone(), *partition, o));
            }
        }
        out
    }
}

#[derive(Clone)]
struct SourceContext {
    role: Role,
    state: Arc<Mutex<State>>,
    topics: Vec<Arc<str>>,
    rebalance_timeout: Duration,
    /// Source role: this instance's share of the group's limits, updated after every rebalance.
    share: Option<Arc<GroupShare>>,
    /// The operational events topic (feeding the operator's webhook): not part of the limit share, which
    /// is about the subscriptions' traffic.
    unshared: Option<Arc<str>>,
    /// Retry role: the tier partitions owned here, for deferrals to stay local.
    local_tiers: Option<Arc<LocalTiers>>,
    /// Cleared when the consumer this context belongs to was replaced after a fatal error: its last
    /// rebalance callbacks (from its close) must not touch the state its successor now owns.
    live: Arc<AtomicBool>,
    /// Source role: ordered delivery (the parked partitions follow the source partitions).
    order: Option<Arc<OrderLink>>,
}

/// What the source role needs for ordered delivery: the consumer of the parked partitions (assigned
/// by hand, the parked partitions of exactly the source partitions owned here, committing under
/// `<group>.parked`) and the parked topic of each source topic.
struct OrderLink {
    consumer: Arc<StreamConsumer>,
    ctx: Arc<OrderContext>,
    /// Source topic → its parked topic.
    parked_of: HashMap<Arc<str>, Arc<str>>,
    /// Parked topic → its source topic.
    source_of: HashMap<Arc<str>, Arc<str>>,
}

impl OrderLink {
    /// Where the lanes of a newly assigned parked partition must read to before they start anything:
    /// `None` when there is nothing after the committed offset (ready at once). When the broker
    /// cannot say, the whole partition is read (from the committed offset) before — the last offset is
    /// asked again by housekeeping.
    fn ready_at(&self, topic: &str, partition: i32) -> Result<Option<i64>, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let committed = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(5))?
            .elements()
            .first()
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let (low, high) =
            self.consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(5))?;
        let from = committed.unwrap_or(low).max(low);
        Ok((high > from).then_some(high - 1))
    }

    /// Commits the parked partitions' finished prefixes now.
    fn commit(&self, offsets: &[(Arc<str>, i32, i64)]) {
        let mut tpl = TopicPartitionList::new();
        for (t, p, o) in offsets {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        if tpl.count() == 0 {
            return;
        }
        let _ = self.consumer.store_offsets(&tpl);
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(error = %e, "commit of parked partitions failed; their next owner may repeat deliveries");
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock would be a bug; the data (counters, trackers) stays usable.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl ClientContext for SourceContext {}

impl SourceContext {
    /// Retry role: publishes which tier partitions are consumed here.
    fn update_local_tiers(&self) {
        let Some(lt) = &self.local_tiers else {
            return;
        };
        let st = lock(&self.state);
        let parts = self
            .topics
            .iter()
            .map(|t| {
                let mut v: Vec<i32> = st
                    .parts
                    .keys()
                    .filter(|(topic, _)| topic == t)
                    .map(|(_, p)| *p)
                    .collect();
                v.sort_unstable();
                v
            })
            .collect();
        drop(st);
        lt.set(parts);
    }

    /// Recomputes the group share from the partitions assigned here and the topics' partition counts.
    fn update_share(&self, consumer: &BaseConsumer<Self>) {
        let Some(share) = &self.share else {
            return;
        };
        let unshared = |t: &Arc<str>| self.unshared.as_ref().is_some_and(|u| u == t);
        let assigned = lock(&self.state)
            .parts
            .keys()
            .filter(|(t, _)| !unshared(t))
            .count();
        let mut total = 0usize;
        for t in self.topics.iter().filter(|t| !unshared(t)) {
            match topic_partitions(consumer.client(), t, Duration::from_secs(5)) {
                Ok(parts) => total += parts.len(),
                Err(e) => {
                    tracing::warn!(topic = %t, error = %e, "partition count unknown; keeping the previous limit share");
                    return;
                }
            }
        }
        if let Some(ppm) = share.set(assigned, total) {
            tracing::info!(
                assigned,
                total,
                share = f64::from(ppm) / f64::from(crate::deliver::share::FULL),
                "limit share of this instance changed"
            );
        }
    }

    fn topic(&self, name: &str) -> Option<Arc<str>> {
        self.topics.iter().find(|t| ***t == *name).cloned()
    }

    /// Waits (blocking this thread) until the given partitions have nothing in flight or the deadline passes.
    fn drain(&self, keys: &[(Arc<str>, i32)], deadline: Instant) -> usize {
        let check = || lock(&self.state).unfinished(Some(keys));
        let wait = || loop {
            let left = check();
            if left == 0 || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if check() == 0 {
            return 0;
        }
        // The callback runs inside the poll loop's task; let the runtime move other tasks (the deliveries
        // being waited for) to another worker while this thread waits.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        if !self.live.load(Ordering::Acquire) {
            return;
        }
        let keys: Vec<(Arc<str>, i32)> = tpl
            .elements()
            .iter()
            .filter_map(|e| self.topic(e.topic()).map(|t| (t, e.partition())))
            .collect();
        let closing = lock(&self.state).closing;
        let left = if closing {
            0
        } else {
            self.drain(&keys, Instant::now() + self.rebalance_timeout)
        };
        let mut st = lock(&self.state);
        let mut commit = TopicPartitionList::new();
        let mut parked = Vec::new();
        for k in &keys {
            if let Some(mut p) = st.parts.remove(k) {
                p.tracker.advance();
                if let Some(o) = p.tracker.committable() {
                    let _ = commit.add_partition_offset(&k.0, k.1, Offset::Offset(o));
                }
                st.records -= p.tracker.len();
                st.bytes -= p.tracker.bytes();
                // Ordered deliveries stop here; the parked partition's finished prefix is committed
                // and it goes with its source partition.
                if let Some(order) = p.order.take() {
                    order.revoke();
                    p.parked.tracker.advance();
                    parked.push((
                        order.parked_topic.clone(),
                        k.1,
                        p.parked.tracker.committable(),
                    ));
                }
            }
        }
        drop(st);
        if let Some(link) = &self.order
            && !parked.is_empty()
        {
            let done: Vec<_> = parked
                .iter()
                .filter_map(|(t, p, o)| o.map(|o| (t.clone(), *p, o)))
                .collect();
            link.commit(&done);
            let mut tpl = TopicPartitionList::new();
            for (t, p, _) in &parked {
                tpl.add_partition(t, *p);
            }
            if let Err(e) = link.consumer.incremental_unassign(&tpl) {
                tracing::warn!(error = %e, "unassigning parked partitions failed");
            }
        }
        if commit.count() > 0 {
            let _ = consumer.store_offsets(&commit);
            if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                tracing::warn!(error = %e, "commit on revocation failed; the next owner may repeat deliveries");
            }
        }
        tracing::info!(
            role = self.role.name(),
            partitions = keys.len(),
            unfinished = left,
            "partitions revoked"
        );
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if !self.live.load(Ordering::Acquire) {
            return;
        }
        match rebalance {
            Rebalance::Assign(tpl) => {
                // Ordered delivery: each source partition brings its parked partition, read from its
                // committed offset; its lanes start nothing until that read reached the end the
                // parked partition has now.
                let mut orders = HashMap::new();
                let mut parked_tpl = TopicPartitionList::new();
                if let Some(link) = &self.order {
                    for e in tpl.elements() {
                        let Some(t) = self.topic(e.topic()) else {
                            continue;
                        };
                        let Some(pt) = link.parked_of.get(&t) else {
                            continue;
                        };
                        let ready_at = match link.ready_at(pt, e.partition()) {
                            Ok(r) => r,
                            Err(err) => {
                                tracing::warn!(topic = %pt, partition = e.partition(), error = %err, "parked partition bounds unknown; its ordered keys wait until it was read");
                                Some(i64::MAX)
                            }
                        };
                        let order = PartitionOrder::new(
                            link.ctx.clone(),
                            t.clone(),
                            e.partition(),
                            pt.clone(),
                            ready_at.is_none(),
                        );
                        orders.insert((t, e.partition()), (order, ready_at));
                        let _ = parked_tpl.add_partition_offset(pt, e.partition(), Offset::Stored);
                    }
                }
                let mut st = lock(&self.state);
                st.joined = true;
                for e in tpl.elements() {
                    if let Some(t) = self.topic(e.topic()) {
                        let key = (t, e.partition());
                        let mut ps = PartitionState::new();
                        if let Some((order, ready_at)) = orders.remove(&key) {
                            ps.order = Some(order);
                            ps.parked.ready_at = ready_at;
                        }
                        st.parts.insert(key, ps);
                    }
                }
                drop(st);
                if let Some(link) = &self.order
                    && parked_tpl.count() > 0
                {
                    if let Err(e) = link.consumer.incremental_assign(&parked_tpl) {
                        tracing::error!(error = %e, "assigning parked partitions failed; ordered keys of these partitions wait");
                    } else {
                        let _ = link.consumer.resume(&parked_tpl);
                    }
                }
                // librdkafka keeps a partition's pause flag across rebalances; a newly assigned partition
                // starts unpaused in our state, so make librdkafka agree.
                if tpl.count() > 0 {
                    let _ = consumer.resume(tpl);
                }
                tracing::info!(
                    role = self.role.name(),
                    partitions = tpl.count(),
                    "partitions assigned"
                );
                self.update_share(consumer);
                self.update_local_tiers();
            }
            Rebalance::Revoke(_) => {
                self.update_share(consumer);
                self.update_local_tiers();
            }
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance error"),
        }
    }
}

/// Observable state of the source for `/readyz` and metrics.
#[derive(Clone)]
pub struct SourceHandle {
    state: Arc<Mutex<State>>,
}

impl SourceHandle {
    pub fn joined(&self) -> bool {
        lock(&self.state).joined
    }

    /// Per assigned partition: how long (ms) its oldest unfinished record has held the commit (0 when
    /// nothing is unfinished).
    pub fn commit_delays(&self) -> Vec<(Arc<str>, i32, u64)> {
        let now = mono_ms();
        lock(&self.state)
            .parts
            .iter()
            .map(|((t, p), ps)| (t.clone(), *p, ps.tracker.held_ms(now).unwrap_or(0)))
            .collect()
    }

    /// The ordered deliveries of the partitions owned here.
    pub fn orders(&self) -> Vec<Arc<PartitionOrder>> {
        lock(&self.state)
            .parts
            .values()
            .filter_map(|p| p.order.clone())
            .collect()
    }

    /// Per assigned partition: the timestamp (epoch ms) of the oldest record taken and not finished
    /// (held retry records included), `None` when nothing is unfinished.
    pub fn oldest_unfinished(&self) -> Vec<(Arc<str>, i32, Option<i64>)> {
        lock(&self.state)
            .parts
            .iter()
            .map(|((t, p), ps)| (t.clone(), *p, ps.tracker.oldest_unfinished_ms()))
            .collect()
    }
}

pub struct Source {
    role: Role,
    /// Held retry records per partition before the partition is paused.
    max_held: usize,
    consumer: Arc<StreamConsumer<SourceContext>>,
    /// What the consumer was made from, to make a new one after a fatal error.
    client_config: ClientConfig,
    context: SourceContext,
    names: Vec<String>,
    static_id: Option<String>,
    /// This role's consumer group (for the lag metrics).
    group: String,
    lag_interval: Duration,
    state: Arc<Mutex<State>>,
    topics: Vec<Arc<str>>,
    limits: Limits,
    max_event_bytes: usize,
    max_commit_delay: Duration,
    store_interval: Duration,
    shutdown_timeout: Duration,
    cache: Arc<Cache>,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    /// The operational events topic, when this source feeds the operator's webhook from it.
    operational: Option<Arc<str>>,
    /// Source role: ordered delivery's parked partitions.
    order: Option<Arc<OrderLink>>,
}

/// A consumer made from `config`, subscribed to `names`.
fn subscribed(
    config: &ClientConfig,
    ctx: SourceContext,
    names: &[String],
) -> Result<StreamConsumer<SourceContext>, rdkafka::error::KafkaError> {
    let consumer: StreamConsumer<SourceContext> = config.create_with_context(ctx)?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    Ok(consumer)
}

pub fn consumer_config(config: &Config, role: Role) -> ClientConfig {
    let commit_ms = config.source.commit_interval.as_millis().to_string();
    let group = role.group(config);
    let client_id = match role {
        Role::Source => "hookline",
        Role::Retry => "hookline-retry",
    };
    let protocol = config.source.group_protocol;
    let mut defaults = vec![
        ("auto.offset.reset", "earliest"),
        ("client.id", client_id),
        ("enable.partition.eof", "false"),
        // librdkafka prefetches up to 64 MiB per consumer by default; hookline bounds what it
        // takes in flight itself, so a smaller prefetch bounds memory under a backlog.
        ("queued.max.messages.kbytes", "16384"),
    ];
    if protocol == GroupProtocol::Classic {
        // Incremental rebalances (rust-rdkafka then calls incremental assign/unassign); under the
        // consumer protocol they always are, and the broker picks the assignor.
        defaults.push(("partition.assignment.strategy", "cooperative-sticky"));
    }
    let mut forced = vec![
        ("group.id", group.as_str()),
        ("group.protocol", protocol.as_str()),
        ("enable.auto.commit", "true"),
        ("enable.auto.offset.store", "false"),
        ("auto.commit.interval.ms", commit_ms.as_str()),
    ];
    // Both consumers carry the same instance id: they are in different groups.
    if let Some(id) = &config.source.instance_id {
        forced.push(("group.instance.id", id.as_str()));
    }
    config.kafka_client(&defaults, &forced)
}

/// The consumer of the parked partitions: assigned by hand, committing (stored offsets, auto-commit)
/// under `<group>.parked`, which no member ever joins.
fn parked_consumer_config(config: &Config) -> ClientConfig {
    let commit_ms = config.source.commit_interval.as_millis().to_string();
    let group = format!("{}.parked", config.source.group);
    config.kafka_client(
        &[
            ("auto.offset.reset", "earliest"),
            ("client.id", "hookline-parked"),
            ("enable.partition.eof", "false"),
            ("queued.max.messages.kbytes", "16384"),
        ],
        &[
            ("group.id", group.as_str()),
            ("enable.auto.commit", "true"),
            ("enable.auto.offset.store", "false"),
            ("auto.commit.interval.ms", commit_ms.as_str()),
        ],
    )
}

impl Source {
    pub fn new(
        config: &Config,
        role: Role,
        cache: Arc<Cache>,
        dispatcher: Arc<Dispatcher>,
        metrics: Arc<Metrics>,
    ) -> Result<Source, rdkafka::error::KafkaError> {
        let state = Arc::new(Mutex::new(State::default()));
        let mut names: Vec<String> = match role {
            Role::Source => config.source.topics.clone(),
            Role::Retry => dispatcher.publisher.topics.tiers.clone(),
        };
        // The operator's webhook is fed by the operational events topic, consumed like a source topic.
        let operational = match (&dispatcher.publisher.topics.events, cache.operator()) {
            (Some(t), Some(_)) if role == Role::Source => {
                names.push(t.clone());
                Some(Arc::<str>::from(t.as_str()))
            }
            _ => None,
        };
        let topics: Vec<Arc<str>> = names.iter().map(|t| Arc::from(t.as_str())).collect();
        let order = if role == Role::Source {
            let mut parked_of = HashMap::new();
            let mut source_of = HashMap::new();
            for t in &config.source.topics {
                let src: Arc<str> = Arc::from(t.as_str());
                let pt: Arc<str> =
                    Arc::from(crate::order::parked_topic(&config.retry.topic_prefix, t).as_str());
                parked_of.insert(src.clone(), pt.clone());
                source_of.insert(pt, src);
            }
            let consumer: StreamConsumer = parked_consumer_config(config).create()?;
            Some(Arc::new(OrderLink {
                consumer: Arc::new(consumer),
                ctx: Arc::new(OrderContext {
                    dispatcher: dispatcher.clone(),
                    cache: cache.clone(),
                    requeue_after: config.source.max_commit_delay,
                }),
                parked_of,
                source_of,
            }))
        } else {
            None
        };
        let ctx = SourceContext {
            order: order.clone(),
            role,
            state: state.clone(),
            topics: topics.clone(),
            rebalance_timeout: config.source.rebalance_timeout,
            share: (role == Role::Source).then(|| cache.defaults().share.clone()),
            unshared: operational.clone(),
            local_tiers: (role == Role::Retry).then(|| dispatcher.publisher.local_tiers.clone()),
            live: Arc::new(AtomicBool::new(true)),
        };
        let client_config = consumer_config(config, role);
        let consumer = subscribed(&client_config, ctx.clone(), &names)?;
        Ok(Source {
            role,
            max_held: config.retry.max_held_per_partition,
            consumer: Arc::new(consumer),
            client_config,
            context: ctx,
            names,
            static_id: config.source.instance_id.clone(),
            group: role.group(config),
            lag_interval: config.source.lag_interval,
            state,
            topics,
            limits: Limits {
                per_partition: config.source.max_in_flight_per_partition,
                per_partition_bytes: config.source.max_in_flight_bytes_per_partition,
                total: config.source.max_in_flight,
                total_bytes: config.source.max_in_flight_bytes,
            },
            max_event_bytes: config.source.max_event_bytes,
            max_commit_delay: config.source.max_commit_delay,
            store_interval: config.source.store_interval,
            shutdown_timeout: config.source.shutdown_timeout,
            cache,
            dispatcher,
            metrics,
            operational,
            order,
        })
    }

    pub fn handle(&self) -> SourceHandle {
        SourceHandle {
            state: self.state.clone(),
        }
    }

    /// Runs until `stop` is cancelled, then drains, commits and leaves the group.
    pub async fn run(mut self, stop: CancellationToken) {
        let consumed: Vec<_> = self
            .topics
            .iter()
            .map(|t| self.metrics.consumed_for(t))
            .collect();
        if self.role == Role::Source {
            for t in &self.topics {
                self.metrics.invalid_reasons_for(t);
            }
        }
        let mut tick = tokio::time::interval(self.store_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Fires at the earliest due time of a held retry record (retry role only).
        let due_timer = tokio::time::sleep(Duration::from_secs(86_400));
        tokio::pin!(due_timer);
        let mut armed_for: Option<u64> = None;
        let retry = self.role == Role::Retry;
        let mut lag_stop = stop.child_token();
        let mut lag_task = self.spawn_lag(&lag_stop);
        let parked = self.order.as_ref().map(|l| l.consumer.clone());
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = tick.tick() => self.housekeeping(),
                msg = async {
                    match &parked {
                        Some(c) => c.recv().await,
                        None => std::future::pending().await,
                    }
                } => match msg {
                    Ok(m) => self.handle_parked(&m),
                    Err(e) => tracing::warn!(error = %e, "parked consumer error"),
                },
                () = &mut due_timer, if armed_for.is_some() => {
                    armed_for = None;
                    self.release_due();
                }
                msg = self.consumer.recv() => match msg {
                    Ok(m) => self.handle_record(&m, &consumed),
                    Err(KafkaError::MessageConsumptionFatal(code)) => {
                        lag_stop.cancel();
                        let _ = lag_task.await;
                        if !self.replace_consumer(code, &stop).await {
                            return;
                        }
                        lag_stop = stop.child_token();
                        lag_task = self.spawn_lag(&lag_stop);
                    }
                    Err(e) => {
                        tracing::warn!(role = self.role.name(), error = %e, "consumer error");
                    }
                },
            }
            if retry {
                let next = lock(&self.state).next_due();
                if next != armed_for {
                    armed_for = next;
                    if let Some(due) = next {
                        let wait = Duration::from_millis(due.saturating_sub(now_ms()));
                        due_timer.as_mut().reset(tokio::time::Instant::now() + wait);
                    }
                }
            }
        }
        // The sampler holds a reference to the consumer; it must be gone before the consumer closes.
        lag_stop.cancel();
        let _ = lag_task.await;
        self.shutdown().await;
    }

    fn spawn_lag(&self, stop: &CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(lag::run(
            self.consumer.clone(),
            self.state.clone(),
            lag::Reporter::new(self.group.clone(), self.metrics.clone()),
            self.lag_interval,
            stop.clone(),
        ))
    }

    /// After a fatal consumer error the consumer is dead for good (librdkafka serves nothing more):
    /// forget its partitions (their unfinished records are redelivered to whoever owns them next; the
    /// commits a dead consumer cannot make are what at-least-once allows) and make a new one, after a
    /// pause, until one lives or `stop` is cancelled. Returns false when stopped.
    ///
    /// The usual cause is benign: with static membership (`source.instance_id`) under the consumer
    /// protocol, an instance restarted after a crash is refused (`UNRELEASED_INSTANCE_ID`) until the
    /// broker expires its previous session; the new consumer is let in then.
    async fn replace_consumer(&mut self, code: RDKafkaErrorCode, stop: &CancellationToken) -> bool {
        let unreleased = code == RDKafkaErrorCode::UnreleasedInstanceId;
        if unreleased {
            tracing::info!(
                role = self.role.name(),
                instance_id = self.static_id.as_deref().unwrap_or(""),
                "the previous session of this instance id is still open; joining again when the broker \
                 has expired it"
            );
        } else {
            tracing::error!(
                role = self.role.name(),
                error = %code,
                "fatal consumer error; making a new consumer"
            );
        }
        self.context.live.store(false, Ordering::Release);
        self.context = SourceContext {
            live: Arc::new(AtomicBool::new(true)),
            ..self.context.clone()
        };
        {
            let mut st = lock(&self.state);
            for p in st.parts.values() {
                if let Some(o) = &p.order {
                    o.revoke();
                }
            }
            if let Some(link) = &self.order
                && let Ok(a) = link.consumer.assignment()
                && a.count() > 0
            {
                let _ = link.consumer.incremental_unassign(&a);
            }
            st.parts.clear();
            st.records = 0;
            st.bytes = 0;
            st.joined = false;
        }
        let pause = if unreleased {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(pause) => {}
            }
            match subscribed(&self.client_config, self.context.clone(), &self.names) {
                Ok(c) => {
                    // The dead consumer's close may wait on the broker: off the async threads.
                    let old = std::mem::replace(&mut self.consumer, Arc::new(c));
                    tokio::task::spawn_blocking(move || drop(old));
                    return true;
                }
                Err(e) => tracing::error!(role = self.role.name(), error = %e, "kafka consumer"),
            }
        }
    }

    fn handle_record(
        &self,
        m: &rdkafka::message::BorrowedMessage<'_>,
        consumed: &[prometheus_client::metrics::counter::Counter],
    ) {
        let Some(ti) = self.topics.iter().position(|t| **t == *m.topic()) else {
            return;
        };
        consumed[ti].inc();
        let topic = &self.topics[ti];
        let key = (topic.clone(), m.partition());
        let value = m.payload();
        let mut header_buf: Vec<(&str, Option<&[u8]>)> = Vec::new();
        if let Some(hs) = m.headers() {
            header_buf.extend(hs.iter().map(|h| (h.key, h.value)));
        }
        let timestamp_ms = m.timestamp().to_millis();
        let origin = || Origin {
            topic: topic.clone(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms,
        };
        let bytes = value.map_or(0, <[u8]>::len) as u32;
        if self.role == Role::Retry {
            return self.handle_retry_record(m, &key, &header_buf, bytes, origin());
        }
        let decoded = decode::decode(
            &RawRecord {
                value,
                headers: &header_buf,
            },
            origin(),
            self.max_event_bytes,
        );
        let (event, subs, invalid_detail) = match decoded {
            Ok(ev) => {
                let ev = Arc::new(ev);
                // An operational event goes to the operator's webhook only, never to subscriptions.
                let subs = match (&self.operational, self.cache.operator()) {
                    (Some(t), Some(op)) if t == topic => vec![op.clone()],
                    _ => self
                        .cache
                        .index()
                        .matches(&ev, || decode::filter_document(&ev)),
                };
                if subs.is_empty() {
                    self.metrics.events_unmatched.inc();
                } else {
                    self.metrics.events_matched.inc();
                }
                (Some(ev), subs, None)
            }
            Err(invalid) => {
                self.metrics
                    .events_invalid
                    .get_or_create(&crate::metrics::TopicReasonLabels {
                        topic: topic.to_string(),
                        reason: invalid.reason.to_string(),
                    })
                    .inc();
                tracing::warn!(topic = %topic, partition = m.partition(), offset = m.offset(), reason = invalid.reason, detail = %invalid.detail, "invalid event; dead-lettering");
                (None, Vec::new(), Some(invalid.to_string()))
            }
        };
        let work = if event.is_some() {
            subs.len() as u32
        } else {
            1
        };

        let pushed = lock(&self.state).push(
            &key,
            m.offset(),
            bytes,
            timestamp_ms.unwrap_or(0),
            work,
            &self.limits,
        );
        // Not (or no longer) assigned here, or a re-fetch of a record already taken: leave it.
        let Some(Pushed {
            completions,
            pause,
            spill,
            order,
        }) = pushed
        else {
            return;
        };
        if pause {
            self.pause(&key);
            tracing::debug!(topic = %topic, partition = m.partition(), "partition paused (in-flight bound)");
        }

        match event {
            Some(ev) => {
                let mut doc = None;
                for (sub, done) in subs.into_iter().zip(completions) {
                    let spill = Spill::new(&spill, m.offset());
                    // An ordered subscription's event with a key joins its key's lane.
                    if let (Some(o), Some(order)) = (&sub.ordering, &order)
                        && let Some(k) = crate::order::key_of(&ev, m.key(), &o.key, &mut doc)
                    {
                        order.source(k, m.offset(), ev.clone(), sub, done, spill);
                        continue;
                    }
                    self.dispatcher
                        .dispatch(ev.clone(), sub, Prior::default(), done, spill);
                }
            }
            None => self.dead_letter_invalid(
                m,
                &header_buf,
                origin(),
                invalid_detail.unwrap_or_default(),
                completions,
            ),
        }
    }

    /// Dead-letters a record that is not a valid event (original bytes and headers), then marks it done.
    fn dead_letter_invalid(
        &self,
        m: &rdkafka::message::BorrowedMessage<'_>,
        header_buf: &[(&str, Option<&[u8]>)],
        origin: Origin,
        detail: String,
        mut completions: Vec<Completion>,
    ) {
        let dispatcher = self.dispatcher.clone();
        let value = m.payload().unwrap_or_default().to_vec();
        let key_bytes = m.key().map(<[u8]>::to_vec);
        let headers: Vec<(Box<str>, Option<bytes::Bytes>)> = header_buf
            .iter()
            .map(|(k, v)| ((*k).into(), v.map(bytes::Bytes::copy_from_slice)))
            .collect();
        let done = completions.pop();
        tokio::spawn(async move {
            dispatcher
                .publisher
                .publish_invalid(key_bytes.as_deref(), &value, &headers, &origin, &detail)
                .await;
            if let Some(d) = done {
                d.done();
            }
        });
    }

    /// A record of a parked partition (ordered delivery): an event of a parked key, a hold marker,
    /// or an operator's release/skip. It joins its lane (`order/lanes.rs`); the parked partition's
    /// commit passes it once it is finished.
    fn handle_parked(&self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let Some(link) = &self.order else {
            return;
        };
        let Some(source) = link.source_of.get(m.topic()) else {
            return;
        };
        let key = (source.clone(), m.partition());
        let mut header_buf: Vec<(&str, Option<&[u8]>)> = Vec::new();
        if let Some(hs) = m.headers() {
            header_buf.extend(hs.iter().map(|h| (h.key, h.value)));
        }
        let bytes = m.payload().map_or(0, <[u8]>::len) as u32;
        let ts = m.timestamp().to_millis().unwrap_or(0);
        let mut st = lock(&self.state);
        let Some(part) = st.parts.get_mut(&key) else {
            return;
        };
        let Some(order) = part.order.clone() else {
            return;
        };
        let Ok(mut completions) = part
            .parked
            .tracker
            .push_at(m.offset(), bytes, ts, 1, mono_ms())
        else {
            return;
        };
        let became_ready = part.parked.ready_at.is_some_and(|r| m.offset() >= r);
        if became_ready {
            part.parked.ready_at = None;
        }
        // Paused at its bound only once ready: before, the lanes start nothing, so nothing would
        // finish and the read would never reach its end.
        let pause = part.parked.ready_at.is_none()
            && !part.parked.paused
            && (part.parked.tracker.len() >= self.limits.per_partition
                || part.parked.tracker.bytes() >= self.limits.per_partition_bytes);
        if pause {
            part.parked.paused = true;
        }
        drop(st);
        if pause {
            let mut tpl = TopicPartitionList::new();
            let _ = tpl.add_partition(m.topic(), m.partition());
            if let Err(e) = link.consumer.pause(&tpl) {
                tracing::warn!(error = %e, "pause of a parked partition failed");
            }
        }
        let Some(done) = completions.pop() else {
            return;
        };
        let lane_key = bytes::Bytes::copy_from_slice(m.key().unwrap_or_default());
        let kind = header_buf
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(crate::retry::headers::PARKED))
            .and_then(|(_, v)| *v)
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("event");
        let here = Origin {
            topic: Arc::from(m.topic()),
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
        };
        match tier::parse(&header_buf) {
            Err(detail) => {
                tracing::warn!(topic = %m.topic(), partition = m.partition(), offset = m.offset(), detail = %detail, "unreadable parked record; dead-lettering");
                self.dead_letter_invalid(m, &header_buf, here, detail, vec![done]);
            }
            Ok(rh) => {
                let source_offset = rh.origin.as_ref().map_or(-1, |o| o.offset);
                match kind {
                    "release" | "skip" => {
                        let c = if kind == "skip" {
                            Control::Skip
                        } else {
                            Control::Release
                        };
                        if !order.control(rh.subscription, lane_key, source_offset, c) {
                            tracing::info!(subscription = %rh.subscription, offset = source_offset, action = kind, "parked key not held or retrying there; request ignored");
                        }
                        done.done();
                    }
                    _ => {
                        let origin = rh.origin.clone().unwrap_or_else(|| here.clone());
                        match decode::decode(
                            &RawRecord {
                                value: m.payload(),
                                headers: &header_buf,
                            },
                            origin,
                            self.max_event_bytes,
                        ) {
                            Ok(ev) => order.parked(
                                lane_key,
                                source_offset,
                                OJob::Parked {
                                    event: Arc::new(ev),
                                    subscription: rh.subscription,
                                    prior: rh.prior,
                                    due_ms: rh.due_ms,
                                    done,
                                    hold: kind.starts_with("hold"),
                                },
                            ),
                            Err(e) => {
                                let detail = e.to_string();
                                tracing::warn!(topic = %m.topic(), partition = m.partition(), offset = m.offset(), detail = %detail, "undecodable parked record; dead-lettering");
                                self.dead_letter_invalid(m, &header_buf, here, detail, vec![done]);
                            }
                        }
                    }
                }
            }
        }
        if became_ready {
            order.set_ready();
        }
    }

    /// A record of a retry tier: deliver it to its one subscription when due, holding it (and the
    /// records behind it) in memory until then.
    fn handle_retry_record(
        &self,
        m: &rdkafka::message::BorrowedMessage<'_>,
        key: &(Arc<str>, i32),
        header_buf: &[(&str, Option<&[u8]>)],
        bytes: u32,
        here: Origin,
    ) {
        let parsed = tier::parse(header_buf).and_then(|rh| {
            let origin = rh.origin.clone().unwrap_or_else(|| here.clone());
            decode::decode(
                &RawRecord {
                    value: m.payload(),
                    headers: header_buf,
                },
                origin,
                self.max_event_bytes,
            )
            .map(|ev| (rh, ev))
            .map_err(|e| e.to_string())
        });
        let timestamp_ms = m.timestamp().to_millis().unwrap_or(0);
        let mut st = lock(&self.state);
        let Some(Pushed {
            completions, pause, ..
        }) = st.push(key, m.offset(), bytes, timestamp_ms, 1, &self.limits)
        else {
            return;
        };
        let (rh, event) = match parsed {
            Ok(p) => p,
            Err(detail) => {
                drop(st);
                if pause {
                    self.pause(key);
                }
                tracing::warn!(topic = %key.0, partition = key.1, offset = m.offset(), detail = %detail, "unreadable retry record; dead-lettering");
                return self.dead_letter_invalid(m, header_buf, here, detail, completions);
            }
        };
        let Some(done) = completions.into_iter().next() else {
            return;
        };
        let Some(part) = st.parts.get_mut(key) else {
            return;
        };
        let job = Held {
            due_ms: rh.due_ms,
            event: Arc::new(event),
            subscription: rh.subscription,
            prior: rh.prior,
            done,
        };
        let hold_starts = part.held.is_empty();
        if hold_starts && job.due_ms <= now_ms() {
            drop(st);
            if pause {
                self.pause(key);
            }
            return self.release(job);
        }
        // Not due (or queued behind a record that is not): hold it, pausing the partition when the hold
        // buffer becomes full and a bound did not pause it already.
        part.held.push_back(job);
        let pause_for_hold = part.held.len() == self.max_held && !part.paused;
        drop(st);
        if pause || pause_for_hold {
            self.pause(key);
        }
    }

    fn pause(&self, key: &(Arc<str>, i32)) {
        let mut tpl = TopicPartitionList::new();
        let _ = tpl.add_partition(&key.0, key.1);
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(error = %e, "pause failed");
        }
    }

    /// Dispatches the held records that are due and resumes partitions whose hold buffer is no longer
    /// full (unless an in-flight bound keeps them paused).
    fn release_due(&self) {
        let now = now_ms();
        let mut due = Vec::new();
        let mut resume = TopicPartitionList::new();
        let mut st = lock(&self.state);
        for ((topic, partition), p) in st.parts.iter_mut() {
            if p.held.is_empty() {
                continue;
            }
            let was_full = p.held.len() >= self.max_held;
            while p.held.front().is_some_and(|h| h.due_ms <= now) {
                due.extend(p.held.pop_front());
            }
            if was_full && p.held.len() < self.max_held && !p.paused {
                let _ = resume.add_partition(topic, *partition);
            }
        }
        drop(st);
        for job in due {
            self.release(job);
        }
        if resume.count() > 0
            && let Err(e) = self.consumer.resume(&resume)
        {
            tracing::warn!(error = %e, "resume failed");
        }
    }

    /// Hands a due retry record to the dispatcher, or dead-letters it when its subscription is gone.
    fn release(&self, job: Held) {
        if let Some(sub) = self.cache.subscription(&job.subscription) {
            // A due retry record waits for its endpoint without being spilled: its tier partition's
            // head is held by design, and the breaker and request timeout bound the wait.
            self.dispatcher
                .dispatch(job.event, sub, job.prior, job.done, Spill::never());
            return;
        }
        self.dispatcher
            .dead_letter_orphan(job.event, job.subscription, job.prior, job.done);
    }

    /// Stores finished offsets, spills what blocks a partition, and resumes partitions that are below
    /// their bounds.
    fn housekeeping(&self) {
        let mut st = lock(&self.state);
        let offsets = st.advance_all();
        if self.role == Role::Source {
            self.relieve(&mut st, mono_ms());
        }
        let (records, bytes) = (st.records, st.bytes);
        let mut resume = TopicPartitionList::new();
        for ((topic, partition), p) in st.parts.iter_mut() {
            if p.paused && self.limits.may_resume(&p.tracker, records, bytes) {
                p.paused = false;
                if p.held.len() < self.max_held {
                    let _ = resume.add_partition(topic, *partition);
                }
            }
        }
        // The parked partitions: store their finished prefixes, resume those below 3/4 of the bound,
        // and ask again for the end of one whose end was unknown at assignment.
        let mut parked_store = TopicPartitionList::new();
        let mut parked_resume = TopicPartitionList::new();
        let mut unknown = Vec::new();
        for ((_, partition), p) in st.parts.iter_mut() {
            let Some(order) = &p.order else {
                continue;
            };
            p.parked.tracker.advance();
            if let Some(o) = p.parked.tracker.take_store() {
                let _ = parked_store.add_partition_offset(
                    &order.parked_topic,
                    *partition,
                    Offset::Offset(o),
                );
            }
            if p.parked.paused
                && p.parked.tracker.len() < self.limits.per_partition * 3 / 4
                && p.parked.tracker.bytes() < self.limits.per_partition_bytes * 3 / 4
            {
                p.parked.paused = false;
                let _ = parked_resume.add_partition(&order.parked_topic, *partition);
            }
            if p.parked.ready_at == Some(i64::MAX) {
                unknown.push(order.clone());
            }
        }
        drop(st);
        if let Some(link) = &self.order {
            if parked_store.count() > 0
                && let Err(e) = link.consumer.store_offsets(&parked_store)
            {
                tracing::debug!(error = %e, "storing parked offsets failed (partition revoked meanwhile?)");
            }
            if parked_resume.count() > 0
                && let Err(e) = link.consumer.resume(&parked_resume)
            {
                tracing::warn!(error = %e, "resume of parked partitions failed");
            }
            for order in unknown {
                if let Ok(r) = link.ready_at(&order.parked_topic, order.partition) {
                    let key = (order.source_topic.clone(), order.partition);
                    if let Some(p) = lock(&self.state).parts.get_mut(&key) {
                        p.parked.ready_at = r;
                    }
                    if r.is_none() {
                        order.set_ready();
                    }
                }
            }
        }
        if !offsets.is_empty() {
            let mut tpl = TopicPartitionList::with_capacity(offsets.len());
            for (t, p, o) in &offsets {
                let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
            }
            if let Err(e) = self.consumer.store_offsets(&tpl) {
                tracing::debug!(error = %e, "storing offsets failed (partition revoked meanwhile?)");
            }
        }
        if resume.count() > 0
            && let Err(e) = self.consumer.resume(&resume)
        {
            tracing::warn!(error = %e, "resume failed");
        }
    }

    /// The admission invariant (ARCHITECTURE.md, 7): a delivery waits for its endpoint unless that
    /// wait blocks work that is otherwise done. Per partition, *pressure* is the partition held at its
    /// in-flight bound for a tenth of `max_commit_delay` (a healthy head finishes and the partition
    /// resumes long before; a pause that lasts means the head is stuck), or its oldest unfinished record
    /// holding the commit for `max_commit_delay`; it is acted on only when at least [`MIN_DONE`] of the
    /// window's deliveries are finished (else the window is one endpoint's backlog, and pausing paces it). Then the waiting deliveries of the oldest
    /// records are told to step aside: those held past half of `max_commit_delay`, and at a bound an
    /// eighth of the unfinished window more per tick, until the partition resumes.
    fn relieve(&self, st: &mut State, now: u64) {
        let max_ms = self.max_commit_delay.as_millis() as u64;
        for p in st.parts.values_mut() {
            // The cheap checks first: the whole window is walked only under pressure.
            let Some(held) = p.tracker.held_ms(now) else {
                continue;
            };
            let too_long = held >= max_ms;
            let stuck_at_bound = p.paused && now.saturating_sub(p.paused_at_ms) >= max_ms / 10;
            if !(stuck_at_bound || too_long)
                || !p.tracker.window(now).head_blocks_done_work(MIN_DONE)
            {
                continue;
            }
            let n = if stuck_at_bound {
                (p.tracker.len() / 8).max(1)
            } else {
                1
            };
            let reason = if too_long {
                SpillReason::CommitDelay
            } else {
                SpillReason::PartitionBound
            };
            let older = too_long.then_some(max_ms / 2);
            if let Some(through) = p.tracker.spill_point(n, older, now)
                && through > p.spill.borrow().through
            {
                p.spill.send_replace(SpillPoint { through, reason });
            }
        }
    }

    /// Shutdown: ordered deliveries start nothing more (parked heads stop retrying), and the parked
    /// partitions' finished prefixes are committed.
    fn stop_ordered(&self) {
        let Some(link) = &self.order else {
            return;
        };
        let mut done = Vec::new();
        for p in lock(&self.state).parts.values_mut() {
            if let Some(order) = p.order.take() {
                order.revoke();
                p.parked.tracker.advance();
                if let Some(o) = p.parked.tracker.committable() {
                    done.push((order.parked_topic.clone(), order.partition, o));
                }
            }
        }
        // A synchronous commit talks to the broker: let the runtime move other tasks meanwhile.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| link.commit(&done))
            }
            _ => link.commit(&done),
        }
    }

    async fn shutdown(self) {
        tracing::info!(
            role = self.role.name(),
            "stopping: no new records; draining in-flight deliveries"
        );
        if let Ok(assigned) = self.consumer.assignment()
            && assigned.count() > 0
        {
            let _ = self.consumer.pause(&assigned);
        }
        let deadline = Instant::now() + self.shutdown_timeout;
        loop {
            self.housekeeping();
            let left = lock(&self.state).unfinished(None);
            if left == 0 {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    unfinished = left,
                    "shutdown deadline reached; unfinished records will be redelivered"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.housekeeping();
        self.stop_ordered();
        lock(&self.state).closing = true;
        // Committing and leaving the group talk to the broker, and librdkafka's close has no timeout of
        // its own: run them off the async threads and give up after CLOSE_TIMEOUT (an unreachable broker
        // must not keep the process alive; uncommitted records are redelivered).
        let consumer = self.consumer;
        let c = consumer.clone();
        let commit = tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync));
        match tokio::time::timeout(CLOSE_TIMEOUT, commit).await {
            Ok(Ok(Ok(()))) => tracing::info!("offsets committed"),
            Ok(Ok(Err(e))) => tracing::debug!(error = %e, "final commit (nothing to commit?)"),
            _ => {
                tracing::warn!("final commit did not finish in time; the broker may be unreachable")
            }
        }
        let close = tokio::task::spawn_blocking(move || {
            consumer.unsubscribe();
            drop(consumer);
        });
        if tokio::time::timeout(CLOSE_TIMEOUT, close).await.is_err() {
            tracing::warn!("leaving the consumer group did not finish in time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with(key: &(Arc<str>, i32)) -> State {
        let mut st = State::default();
        st.parts.insert(key.clone(), PartitionState::new());
        st
    }

    const LIMITS: Limits = Limits {
        per_partition: 3,
        per_partition_bytes: 1 << 20,
        total: 100,
        total_bytes: 1 << 30,
    };

    #[test]
    fn totals_follow_the_trackers_including_records_without_work() {
        let key: (Arc<str>, i32) = (Arc::from("t"), 0);
        let mut st = state_with(&key);
        let mut a = st.push(&key, 0, 10, 0, 1, &LIMITS).unwrap().completions;
        // A record matching nothing, queued behind the unfinished one.
        assert!(
            st.push(&key, 1, 10, 0, 0, &LIMITS)
                .unwrap()
                .completions
                .is_empty()
        );
        assert_eq!((st.records, st.bytes), (2, 10));
        a.pop().unwrap().done();
        let stored = st.advance_all();
        assert_eq!(stored, vec![(key.0.clone(), 0, 2)]);
        assert_eq!((st.records, st.bytes), (0, 0));
        // Later pushes advance over finished work first.
        let mut b = st.push(&key, 2, 5, 0, 2, &LIMITS).unwrap().completions;
        b.pop().unwrap().done();
        b.pop().unwrap().done();
        st.push(&key, 3, 5, 0, 0, &LIMITS).unwrap();
        assert_eq!((st.records, st.bytes), (0, 0));
        assert_eq!(st.advance_all(), vec![(key.0.clone(), 0, 4)]);
    }

    #[test]
    fn byte_bounds_pause_too_and_resume_below_three_quarters() {
        let key: (Arc<str>, i32) = (Arc::from("t"), 0);
        let limits = Limits {
            per_partition: 1000,
            per_partition_bytes: 1000,
            total: 1000,
            total_bytes: 1 << 30,
        };
        let mut st = state_with(&key);
        let mut held = st.push(&key, 0, 600, 0, 1, &limits).unwrap().completions;
        let p = st.push(&key, 1, 400, 0, 1, &limits).unwrap();
        assert!(
            p.pause,
            "1000 bytes held reaches the per-partition byte bound"
        );
        held.extend(p.completions);
        assert!(!limits.may_resume(&st.parts[&key].tracker, st.records, st.bytes));
        held.remove(0).done();
        st.advance_all();
        assert_eq!(st.bytes, 400);
        assert!(
            limits.may_resume(&st.parts[&key].tracker, st.records, st.bytes),
            "400 < 750"
        );
        // The instance-wide byte bound applies across partitions.
        let global = Limits {
            per_partition: 1000,
            per_partition_bytes: 1 << 30,
            total: 1000,
            total_bytes: 500,
        };
        let other: (Arc<str>, i32) = (Arc::from("t"), 1);
        st.parts.insert(other.clone(), PartitionState::new());
        assert!(
            st.push(&other, 0, 100, 0, 1, &global).unwrap().pause,
            "400 + 100 bytes held in the instance"
        );
    }

    #[test]
    fn pause_is_signalled_once_when_a_bound_is_reached() {
        let key: (Arc<str>, i32) = (Arc::from("t"), 0);
        let mut st = state_with(&key);
        let mut held = Vec::new();
        let mut pauses = Vec::new();
        for off in 0..5 {
            let p = st.push(&key, off, 1, 0, 1, &LIMITS).unwrap();
            pauses.push(p.pause);
            held.extend(p.completions);
        }
        assert_eq!(pauses, vec![false, false, true, false, false]);
        assert!(st.parts[&key].paused);
        assert!(
            st.push(&(Arc::from("other"), 0), 0, 1, 0, 1, &LIMITS)
                .is_none(),
            "unassigned partition"
        );
        assert!(
            st.push(&key, 2, 1, 0, 1, &LIMITS).is_none(),
            "re-fetched offset"
        );
    }
}
