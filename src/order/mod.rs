//! Ordered delivery per key (subscriptions with `ordering: key`; ARCHITECTURE.md, invariant 15).
//!
//! For each source partition the source keeps one [`PartitionOrder`]: the partition's [`lanes`] (one
//! per subscription and ordering key) and the tasks that carry out what the lanes decide. An event of
//! an ordered subscription starts only when the event of its key before it has finished; different keys
//! run side by side under the endpoint's usual limits.
//!
//! When an event fails and may be retried (or is deferred, or is dead-lettered under
//! `on_dead_letter: hold`), its key **parks**: the event, with its attempts and due time, and every later
//! event of the key are appended to the *parked topic* of the source topic (`<prefix>.parked.<topic>`,
//! same partition number as the source partition, so its owner is the source partition's owner). Once
//! Kafka acknowledged an append, the source record is done: a parked key never holds the source
//! partition's commit. The source's owner reads its parked partitions (a second consumer, assigned the
//! parked partitions of exactly the source partitions it owns), and delivers each parked key's events
//! in offset order, retrying the head in place at its tiers' delays, while other parked keys go on.
//! The parked partition's commit follows the same rule as every other: only over finished records.
//!
//! Whoever owns the source partition next (after a crash, a rebalance, a scale-out) reads the parked
//! partition from its committed offset to the end it had at assignment before it starts any ordered
//! event of that partition, so it knows every parked key (from Kafka, not from memory) first.

pub mod lanes;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::{mono_ms, now_ms};
use crate::completion::Completion;
use crate::deliver::outcome::AttemptResult;
use crate::dispatch::{Dispatcher, Verdict};
use crate::matching::Subscription;
use crate::matching::cache::Cache;
use crate::model::{Event, KeySource, Prior};
use crate::retry::publish::DlqReason;
use crate::spill::Spill;
use lanes::{Action, Finish, LaneKey, LaneView, Lanes};

pub use crate::retry::parked_topic;

/// The ordering key of `event` for a subscription whose keys come from `source`; `None` when the event
/// has none (it is then delivered unordered). `doc` caches the event's JSON document across the
/// subscriptions of one record.
pub fn key_of(
    event: &Event,
    record_key: Option<&[u8]>,
    source: &KeySource,
    doc: &mut Option<serde_json::Value>,
) -> Option<Bytes> {
    match source {
        KeySource::RecordKey => record_key
            .filter(|k| !k.is_empty())
            .map(Bytes::copy_from_slice),
        KeySource::Subject | KeySource::Data(_) => {
            let doc = doc.get_or_insert_with(|| crate::decode::filter_document(event));
            let v = match source {
                KeySource::Subject => doc.get("subject"),
                KeySource::Data(path) => path
                    .iter()
                    .try_fold(doc.get("data")?, |v, p| v.get(p.as_str())),
                KeySource::RecordKey => None,
            }?;
            match v {
                serde_json::Value::String(s) if !s.is_empty() => {
                    Some(Bytes::copy_from_slice(s.as_bytes()))
                }
                serde_json::Value::Number(n) => Some(Bytes::from(n.to_string())),
                serde_json::Value::Bool(b) => Some(Bytes::from(b.to_string())),
                _ => None,
            }
        }
    }
}

/// An ordered event waiting in, or started from, its lane.
pub enum OJob {
    /// Taken from the source partition.
    Source {
        event: Arc<Event>,
        sub: Arc<Subscription>,
        done: Completion,
        spill: Spill,
    },
    /// Read from the parked partition: an event with what happened before, or a hold marker.
    Parked {
        event: Arc<Event>,
        subscription: Uuid,
        prior: Prior,
        due_ms: u64,
        done: Completion,
        hold: bool,
    },
}

impl OJob {
    fn finish(self) {
        match self {
            OJob::Source { done, .. } | OJob::Parked { done, .. } => done.done(),
        }
    }
}

impl lanes::Job for OJob {
    fn parked(&self) -> bool {
        matches!(self, OJob::Parked { .. })
    }
    fn hold(&self) -> bool {
        matches!(self, OJob::Parked { hold: true, .. })
    }
}

/// An operator's request about a parked key, read from the parked partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// A held key continues with its next event.
    Release,
    /// A retrying head is given up (dead-lettered `skipped`) and its key continues.
    Skip,
}

impl Control {
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Release => "release",
            Control::Skip => "skip",
        }
    }
}

/// What every partition's ordered deliveries share.
pub struct OrderContext {
    pub dispatcher: Arc<Dispatcher>,
    pub cache: Arc<Cache>,
    /// A parked head whose next attempt is further away than this (`source.max_commit_delay`) is
    /// appended again with its attempts and due time, rather than kept waiting in memory: its count
    /// of attempts survives a restart.
    pub requeue_after: Duration,
}

/// The ordered deliveries of one source partition.
pub struct PartitionOrder {
    pub source_topic: Arc<str>,
    pub partition: i32,
    pub parked_topic: Arc<str>,
    lanes: Mutex<Lanes<OJob>>,
    /// Cancelled when the partition is revoked: parked heads stop retrying (the next owner goes on).
    revoked: CancellationToken,
    /// Running parked heads that an operator may skip.
    skips: Mutex<HashMap<(LaneKey, i64), CancellationToken>>,
    ctx: Arc<OrderContext>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a parked head's wait ended.
enum Woken {
    Due,
    Skipped,
    Revoked,
}

impl PartitionOrder {
    pub fn new(
        ctx: Arc<OrderContext>,
        source_topic: Arc<str>,
        partition: i32,
        parked_topic: Arc<str>,
        ready: bool,
    ) -> Arc<PartitionOrder> {
        Arc::new(PartitionOrder {
            source_topic,
            partition,
            parked_topic,
            lanes: Mutex::new(if ready {
                Lanes::ready_now()
            } else {
                Lanes::default()
            }),
            revoked: CancellationToken::new(),
            skips: Mutex::new(HashMap::new()),
            ctx,
        })
    }

    pub fn is_ready(&self) -> bool {
        lock(&self.lanes).is_ready()
    }

    /// A source record's delivery to an ordered subscription, for the key `key`.
    pub fn source(
        self: &Arc<Self>,
        key: Bytes,
        offset: i64,
        event: Arc<Event>,
        sub: Arc<Subscription>,
        done: Completion,
        spill: Spill,
    ) {
        let lane = (sub.id, key);
        let job = OJob::Source {
            event,
            sub,
            done,
            spill,
        };
        let actions = lock(&self.lanes).source(lane, offset, job);
        self.apply(actions);
    }

    /// A record read from the parked partition.
    pub fn parked(self: &Arc<Self>, key: Bytes, offset: i64, job: OJob) {
        let OJob::Parked { subscription, .. } = &job else {
            return job.finish();
        };
        let lane = (*subscription, key);
        let actions = lock(&self.lanes).parked(lane, offset, job, mono_ms());
        self.apply(actions);
    }

    /// The parked partition was read to the end it had at assignment.
    pub fn set_ready(self: &Arc<Self>) {
        let actions = lock(&self.lanes).set_ready(mono_ms());
        self.apply(actions);
    }

    /// An operator's request for the key `key` of `subscription` at `offset`. Returns whether it
    /// applied (a key not held or not retrying there is left as it is).
    pub fn control(
        self: &Arc<Self>,
        subscription: Uuid,
        key: Bytes,
        offset: i64,
        c: Control,
    ) -> bool {
        let lane = (subscription, key);
        if let Some(actions) = lock(&self.lanes).release(&lane, offset) {
            tracing::info!(subscription = %subscription, offset, action = c.as_str(), "parked key released");
            self.apply(actions);
            return true;
        }
        if c == Control::Skip
            && let Some(t) = lock(&self.skips).get(&(lane, offset))
        {
            t.cancel();
            return true;
        }
        false
    }

    /// The partition was revoked: nothing more starts, queued and held jobs are dropped unfinished
    /// (their records are not committed; the next owner delivers them), parked heads stop retrying.
    pub fn revoke(&self) {
        self.revoked.cancel();
        let left = lock(&self.lanes).clear();
        drop(left);
    }

    /// The parked keys of this partition.
    pub fn parked_lanes(&self) -> Vec<LaneView> {
        lock(&self.lanes).parked_lanes()
    }

    fn apply(self: &Arc<Self>, actions: Vec<Action<OJob>>) {
        for a in actions {
            match a {
                Action::Start(lane, offset, job) => {
                    let this = Arc::clone(self);
                    tokio::spawn(async move { this.run(lane, offset, job).await });
                }
                Action::Redirect(lane, _, job) => {
                    let this = Arc::clone(self);
                    tokio::spawn(async move { this.redirect(lane, job).await });
                }
                Action::Drop(job) => job.finish(),
                Action::Held(lane, offset) => {
                    // A deleted or disabled subscription has nobody to release its keys: they
                    // continue (their parked events are dead-lettered like any of such a
                    // subscription's retries).
                    if self.ctx.cache.subscription(&lane.0).is_none() {
                        let next = lock(&self.lanes).release(&lane, offset);
                        if let Some(next) = next {
                            self.apply(next);
                        }
                        continue;
                    }
                    tracing::info!(subscription = %lane.0, offset, "ordered key held after a dead letter; waiting for release");
                }
            }
        }
    }

    /// Appends a source job to the parked topic behind its key's earlier events.
    async fn redirect(self: Arc<Self>, lane: LaneKey, job: OJob) {
        let OJob::Source {
            event, sub, done, ..
        } = job
        else {
            return job.finish();
        };
        self.append(
            &lane,
            &event,
            &sub.id_str,
            Prior::default(),
            now_ms(),
            "event",
            None,
        )
        .await;
        done.done();
    }

    #[allow(clippy::too_many_arguments)]
    async fn append(
        &self,
        lane: &LaneKey,
        event: &Event,
        subscription: &str,
        prior: Prior,
        due_ms: u64,
        kind: &str,
        last: Option<&AttemptResult>,
    ) {
        self.ctx
            .dispatcher
            .publisher
            .publish_parked(
                &self.parked_topic,
                self.partition,
                &lane.1,
                event,
                subscription,
                prior,
                due_ms,
                kind,
                last,
            )
            .await;
    }

    fn finished(self: &Arc<Self>, lane: &LaneKey, offset: i64, how: Finish) {
        let actions = lock(&self.lanes).finished(lane, offset, how, mono_ms());
        self.apply(actions);
    }

    async fn run(self: Arc<Self>, lane: LaneKey, offset: i64, job: OJob) {
        match job {
            OJob::Source {
                event,
                sub,
                done,
                mut spill,
            } => {
                self.run_direct(lane, offset, event, sub, done, &mut spill)
                    .await
            }
            OJob::Parked {
                event,
                subscription,
                prior,
                due_ms,
                done,
                ..
            } => {
                self.run_parked(lane, offset, event, subscription, prior, due_ms, done)
                    .await
            }
        }
    }

    /// The head of a direct lane: one attempt; then delivered, dead-lettered, or parked.
    async fn run_direct(
        self: &Arc<Self>,
        lane: LaneKey,
        offset: i64,
        event: Arc<Event>,
        sub: Arc<Subscription>,
        done: Completion,
        spill: &mut Spill,
    ) {
        let d = &self.ctx.dispatcher;
        let a = d.attempt(&event, &sub, Prior::default(), spill).await;
        match d.verdict(&sub, Prior::default(), &a) {
            (Verdict::Delivered, p) => {
                d.delivered(&event, &sub, p, &a).await;
                done.done();
                self.finished(&lane, offset, Finish::Continue);
            }
            (Verdict::Tier { tier, .. }, p) => {
                // Parked: this event first (due at its tier's time), its key's later ones behind it.
                let due = d.due_for(tier);
                self.finished(&lane, offset, Finish::Park);
                tracing::debug!(subscription = %sub.id_str, offset, "ordered key parked");
                d.metrics.parked.inc();
                self.append(&lane, &event, &sub.id_str, p, due, "event", Some(&a.result))
                    .await;
                done.done();
            }
            (Verdict::Dead(reason), p) => {
                self.dead(&lane, offset, &event, &sub, p, reason, &a).await;
                done.done();
            }
        }
    }

    /// A terminal failure of the key's head: dead letter (with its ordering key), then the key
    /// continues, or (`on_dead_letter: hold`) a hold marker takes the event's place and the key waits
    /// for an operator.
    #[allow(clippy::too_many_arguments)]
    async fn dead(
        self: &Arc<Self>,
        lane: &LaneKey,
        offset: i64,
        event: &Event,
        sub: &Subscription,
        p: Prior,
        reason: DlqReason,
        a: &crate::dispatch::Attempted,
    ) {
        let d = &self.ctx.dispatcher;
        let mut f = d.failure(event, sub, p, a);
        f.ordering_key = Some(&lane.1);
        d.dead_letter(&f, sub, reason).await;
        if !sub.ordering.as_ref().is_some_and(|o| o.hold) {
            return self.finished(lane, offset, Finish::Continue);
        }
        self.finished(lane, offset, Finish::Park);
        self.append(
            lane,
            event,
            &sub.id_str,
            p,
            now_ms(),
            &format!("hold:{}", reason.as_str()),
            Some(&a.result),
        )
        .await;
    }

    /// The head of a parked lane: attempts at its due times until it is delivered or dead-lettered
    /// (or skipped, or the partition is revoked).
    #[allow(clippy::too_many_arguments)]
    async fn run_parked(
        self: &Arc<Self>,
        lane: LaneKey,
        offset: i64,
        event: Arc<Event>,
        subscription: Uuid,
        mut prior: Prior,
        mut due_ms: u64,
        done: Completion,
    ) {
        let skip = CancellationToken::new();
        lock(&self.skips).insert((lane.clone(), offset), skip.clone());
        let d = &self.ctx.dispatcher;
        loop {
            let wait = Duration::from_millis(due_ms.saturating_sub(now_ms()));
            let woken = tokio::select! {
                biased;
                _ = self.revoked.cancelled() => Woken::Revoked,
                _ = skip.cancelled() => Woken::Skipped,
                _ = tokio::time::sleep(wait) => Woken::Due,
            };
            let Some(sub) = self.ctx.cache.subscription(&subscription) else {
                if matches!(woken, Woken::Revoked) {
                    break;
                }
                // Deleted or disabled meanwhile: dead-letter it (replayable), the key continues.
                d.dead_letter_orphaned(&event, subscription, prior, Some(&lane.1))
                    .await;
                done.done();
                self.finished(&lane, offset, Finish::Continue);
                break;
            };
            match woken {
                Woken::Revoked => break,
                Woken::Skipped => {
                    tracing::info!(subscription = %sub.id_str, offset, "parked head skipped by an operator; dead-lettering");
                    let last = AttemptResult::Refused("skipped by an operator".into());
                    let f = crate::retry::publish::Failure::of(
                        &event,
                        &sub.id_str,
                        prior,
                        &last,
                        Some(&lane.1),
                    );
                    d.dead_letter(&f, &sub, DlqReason::Skipped).await;
                    done.done();
                    self.finished(&lane, offset, Finish::Continue);
                    break;
                }
                Woken::Due => {}
            }
            let a = d.attempt(&event, &sub, prior, &mut Spill::never()).await;
            match d.verdict(&sub, prior, &a) {
                (Verdict::Delivered, p) => {
                    d.delivered(&event, &sub, p, &a).await;
                    done.done();
                    self.finished(&lane, offset, Finish::Continue);
                    break;
                }
                (Verdict::Tier { tier, .. }, p) => {
                    prior = p;
                    due_ms = d.due_for(tier);
                    if due_ms.saturating_sub(now_ms()) > self.ctx.requeue_after.as_millis() as u64 {
                        // A long wait: the head goes back to the parked topic with what happened
                        // (it is outstanding until read back, so nothing of its key overtakes it).
                        self.finished(&lane, offset, Finish::Park);
                        self.append(
                            &lane,
                            &event,
                            &sub.id_str,
                            prior,
                            due_ms,
                            "event",
                            Some(&a.result),
                        )
                        .await;
                        done.done();
                        break;
                    }
                }
                (Verdict::Dead(reason), p) => {
                    self.dead(&lane, offset, &event, &sub, p, reason, &a).await;
                    done.done();
                    break;
                }
            }
        }
        lock(&self.skips).remove(&(lane, offset));
    }
}

/// One parked key as published on `<prefix>.parked-keys` (and listed by the API).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeyState {
    pub subscription: Uuid,
    pub topic: String,
    pub partition: i32,
    /// The ordering key, base64 (it may be any bytes).
    pub key_base64: String,
    /// Source offset of the key's oldest unfinished event.
    pub offset: Option<i64>,
    /// `retrying`, `held` or `waiting`.
    pub state: String,
    pub backlog: usize,
    /// When the key parked (epoch ms, as this instance knows it).
    pub parked_at_ms: u64,
    /// When this state was published (epoch ms).
    #[serde(default)]
    pub updated_at_ms: u64,
    /// The instance owning the key's partition.
    #[serde(default)]
    pub instance: String,
}

impl KeyState {
    /// The record key on the parked-keys topic: one per (subscription, partition, ordering key).
    pub fn record_key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.subscription, self.topic, self.partition, self.key_base64
        )
    }
}

impl PartitionOrder {
    /// The parked keys of this partition, as published.
    pub fn key_states(&self, now_ms: u64, mono: u64) -> Vec<KeyState> {
        use base64::Engine as _;
        self.parked_lanes()
            .into_iter()
            .map(|v| KeyState {
                subscription: v.key.0,
                topic: self.source_topic.to_string(),
                partition: self.partition,
                key_base64: base64::engine::general_purpose::STANDARD.encode(&v.key.1),
                offset: v.head,
                state: if v.held {
                    "held"
                } else if v.running {
                    "retrying"
                } else {
                    "waiting"
                }
                .into(),
                backlog: v.backlog,
                parked_at_ms: now_ms.saturating_sub(mono.saturating_sub(v.parked_at)),
                updated_at_ms: 0,
                instance: String::new(),
            })
            .collect()
    }
}

/// How often the parked keys' states are compared with what was published.
const PUBLISH_EVERY: Duration = Duration::from_secs(2);
/// An unchanged state is published again this often, so that listings can tell live entries from
/// those of keys whose owner went away (see [`STALE_AFTER_MS`]).
const REPUBLISH_MS: u64 = 30_000;
/// Listings ignore states not published for this long.
pub const STALE_AFTER_MS: u64 = 90_000;

/// Publishes the parked keys of the partitions `orders()` returns to `topic` until `stop`: a key's
/// state when it changed (or every 30 s), a tombstone when a key of a partition still owned here is
/// no longer parked. Off the delivery path; a failed publish is retried at the next round.
pub async fn publish_key_states(
    orders: impl Fn() -> Vec<Arc<PartitionOrder>> + Send + 'static,
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    instance: String,
    stop: CancellationToken,
) {
    use rdkafka::producer::FutureRecord;
    // Published: record key → (state without its publication time, when published).
    let mut published: HashMap<String, (KeyState, u64)> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PUBLISH_EVERY) => {}
        }
        let (now, mono) = (now_ms(), mono_ms());
        let orders = orders();
        let owned: std::collections::HashSet<(String, i32)> = orders
            .iter()
            .map(|o| (o.source_topic.to_string(), o.partition))
            .collect();
        let mut current: HashMap<String, KeyState> = HashMap::new();
        for o in &orders {
            for mut k in o.key_states(now, mono) {
                k.instance = instance.clone();
                current.insert(k.record_key(), k);
            }
        }
        for (rk, k) in &current {
            let fresh = published.get(rk).is_some_and(|(p, at)| {
                p.offset == k.offset
                    && p.state == k.state
                    && p.backlog == k.backlog
                    && now.saturating_sub(*at) < REPUBLISH_MS
            });
            if fresh {
                continue;
            }
            let mut v = k.clone();
            v.updated_at_ms = now;
            let Ok(body) = serde_json::to_vec(&v) else {
                continue;
            };
            let rec = FutureRecord::<str, [u8]>::to(&topic).key(rk).payload(&body);
            if producer.send(rec, Duration::from_secs(5)).await.is_ok() {
                published.insert(rk.clone(), (k.clone(), now));
            }
        }
        // Keys no longer parked: a tombstone where the partition is still owned here (its next owner
        // publishes what it holds); otherwise just forgotten.
        let gone: Vec<String> = published
            .keys()
            .filter(|rk| !current.contains_key(*rk))
            .cloned()
            .collect();
        for rk in gone {
            let Some((k, _)) = published.get(&rk) else {
                continue;
            };
            if owned.contains(&(k.topic.clone(), k.partition)) {
                let rec = FutureRecord::<str, [u8]>::to(&topic).key(&rk);
                if producer.send(rec, Duration::from_secs(5)).await.is_err() {
                    continue;
                }
            }
            published.remove(&rk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Encoding, Origin};

    fn event(body: &str, headers: Vec<(Box<str>, Bytes)>, encoding: Encoding) -> Event {
        Event {
            id: "e1".into(),
            event_type: "t".into(),
            tenant: None,
            encoding,
            body: Bytes::from(body.to_string()),
            content_type: http::HeaderValue::from_static("application/json"),
            webhook_id: http::HeaderValue::from_static("e1"),
            headers,
            origin: Origin {
                topic: Arc::from("t"),
                partition: 0,
                offset: 0,
                timestamp_ms: None,
            },
        }
    }

    #[test]
    fn keys_from_the_record_key_the_subject_or_a_data_path() {
        let ev = event(
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"cust-7","data":{"customer":{"id":42,"tag":"x"},"flag":true,"obj":{}}}"#,
            vec![],
            Encoding::CloudEventsStructured,
        );
        let mut doc = None;
        let k = |src: &KeySource, doc: &mut Option<serde_json::Value>| {
            key_of(&ev, Some(b"rk"), src, doc)
        };
        assert_eq!(
            k(&KeySource::RecordKey, &mut doc).as_deref(),
            Some(&b"rk"[..])
        );
        assert_eq!(
            key_of(&ev, Some(b""), &KeySource::RecordKey, &mut doc),
            None
        );
        assert_eq!(key_of(&ev, None, &KeySource::RecordKey, &mut doc), None);
        assert_eq!(
            k(&KeySource::Subject, &mut doc).as_deref(),
            Some(&b"cust-7"[..])
        );
        let path = |p: &str| KeySource::parse(Some(p)).unwrap();
        assert_eq!(
            k(&path("data.customer.id"), &mut doc).as_deref(),
            Some(&b"42"[..])
        );
        assert_eq!(
            k(&path("data.flag"), &mut doc).as_deref(),
            Some(&b"true"[..])
        );
        assert_eq!(k(&path("data.obj"), &mut doc), None, "objects are no key");
        assert_eq!(k(&path("data.missing.x"), &mut doc), None);
        // Binary CloudEvents: the subject is a header.
        let bin = event(
            r#"{"n":1}"#,
            vec![("ce_subject".into(), Bytes::from_static(b"s-1"))],
            Encoding::CloudEventsBinary,
        );
        let mut doc = None;
        assert_eq!(
            key_of(&bin, None, &KeySource::Subject, &mut doc).as_deref(),
            Some(&b"s-1"[..])
        );
        assert_eq!(
            key_of(&bin, None, &path("data.n"), &mut doc).as_deref(),
            Some(&b"1"[..])
        );
    }

    #[test]
    fn key_sources_parse_and_refuse_what_they_do_not_know() {
        assert_eq!(KeySource::parse(None), Ok(KeySource::RecordKey));
        assert_eq!(
            KeySource::parse(Some("record_key")),
            Ok(KeySource::RecordKey)
        );
        assert_eq!(
            KeySource::parse(Some("data.a.b")),
            Ok(KeySource::Data(vec!["a".into(), "b".into()]))
        );
        assert!(KeySource::parse(Some("data.")).is_err());
        assert!(KeySource::parse(Some("data.a..b")).is_err());
        assert!(KeySource::parse(Some("key")).is_err());
    }
}
