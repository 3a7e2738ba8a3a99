//! Operator tooling on the dead-letter topic (DESIGN §8): `hookline dlq stats` and `hookline replay`.
//!
//! Both read a topic from where they start up to the **end offsets taken at start**, so a replay never
//! chases records dead-lettered after it began (its own re-failures included). A replay reads with its
//! own consumer group: it commits what it has finished (produced and acknowledged, or skipped), so an
//! interrupted replay (SIGINT/SIGTERM) resumed with the same command continues where it stopped and sends
//! nothing twice. The default group is derived from the command's topic, target and filters; `--group`
//! names one. `--dry-run` reads the same records from the same position and commits nothing.
//!
//! `--to retry.<tier>` re-targets the one subscription of each record through the normal retry path
//! (limits and breaker apply): the record goes to that tier topic due at once, attempts reset to 0, with
//! `hookline-replay-id`. `--to source` re-publishes the event (original value and non-hookline headers) to
//! its origin topic for full re-matching. Records whose subscription no longer exists (or is disabled) are
//! reported, not sent; `invalid_event` records are never replayed (the same bytes would fail again).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::io::IsTerminal;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use uuid::Uuid;

use crate::clock::now_ms;
use crate::config::{Config, ConfigError};
use crate::decode::{RawRecord, decode};
use crate::kafka::topic_partitions;
use crate::model::{Origin, Pattern, parse_rfc3339_ms};
use crate::pipeline::RunError;
use crate::retry::Topics;
use crate::retry::headers as h;
use crate::retry::publish::producer_config;
use crate::store::{self, Store};

/// Which records a replay takes. All given filters must hold.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub subscription: Option<Uuid>,
    pub event_type: Option<Pattern>,
    pub reason: Option<String>,
    /// Dead-lettered at or after (record timestamp, epoch ms).
    pub since_ms: Option<u64>,
    /// Dead-lettered before.
    pub until_ms: Option<u64>,
}

/// What hookline knows about one dead-letter record.
#[derive(Debug, Clone, PartialEq)]
pub struct DlqRecord {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<u64>,
    pub reason: Option<String>,
    pub subscription: Option<Uuid>,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub origin_topic: Option<String>,
}

fn pattern_matches(p: &Pattern, ty: &str) -> bool {
    match p {
        Pattern::Any => true,
        Pattern::Exact(t) => &**t == ty,
        Pattern::Prefix(p) => ty.starts_with(&**p),
    }
}

impl Filters {
    pub fn matches(&self, r: &DlqRecord) -> bool {
        if let Some(s) = self.subscription
            && r.subscription != Some(s)
        {
            return false;
        }
        if let Some(p) = &self.event_type
            && !r
                .event_type
                .as_deref()
                .is_some_and(|t| pattern_matches(p, t))
        {
            return false;
        }
        if let Some(reason) = &self.reason
            && r.reason.as_deref() != Some(reason.as_str())
        {
            return false;
        }
        let ts = r.timestamp_ms.unwrap_or(0);
        if self.since_ms.is_some_and(|s| ts < s) || self.until_ms.is_some_and(|u| ts >= u) {
            return false;
        }
        true
    }
}

/// `--since`/`--until`: RFC 3339, or a duration meaning that long ago (`2h`).
pub fn parse_time(s: &str, now_ms: u64) -> Result<u64, String> {
    if let Ok(ms) = parse_rfc3339_ms(s) {
        return Ok(ms);
    }
    crate::config::parse_duration(s)
        .map(|d| now_ms.saturating_sub(d.as_millis() as u64))
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration like \"2h\""))
}

/// Where replayed records go.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A retry tier topic (index, topic name).
    Tier(usize, String),
    /// Each record's origin topic.
    Source,
}

impl Target {
    /// `retry.<tier>` (a configured tier name) or `source`.
    pub fn parse(s: &str, topics: &Topics, tier_names: &[String]) -> Result<Target, String> {
        if s == "source" {
            return Ok(Target::Source);
        }
        if let Some(name) = s.strip_prefix("retry.")
            && let Some(i) = tier_names.iter().position(|t| t == name)
        {
            return Ok(Target::Tier(i, topics.tiers[i].clone()));
        }
        if s == topics.dlq || s == "dlq" {
            return Err("refusing to replay into the dead-letter topic itself".into());
        }
        Err(format!(
            "{s:?} is not a target: use \"source\" or one of {}",
            tier_names
                .iter()
                .map(|t| format!("\"retry.{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

fn header_str<'a>(m: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a str> {
    let hs = m.headers()?;
    hs.iter()
        .filter(|hd| hd.key.eq_ignore_ascii_case(name))
        .last()
        .and_then(|hd| hd.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Reads the facts of a dead-letter record (the event is decoded for its id and type).
pub fn describe(m: &BorrowedMessage<'_>) -> DlqRecord {
    let headers: Vec<(&str, Option<&[u8]>)> = m
        .headers()
        .map(|hs| hs.iter().map(|hd| (hd.key, hd.value)).collect())
        .unwrap_or_default();
    let origin = Origin {
        topic: Arc::from(m.topic()),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
    };
    let raw = RawRecord {
        value: m.payload(),
        headers: &headers,
    };
    let event = decode(&raw, origin, usize::MAX).ok();
    DlqRecord {
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis().map(|t| t.max(0) as u64),
        reason: header_str(m, h::DLQ_REASON).map(String::from),
        subscription: header_str(m, h::SUBSCRIPTION).and_then(|s| Uuid::parse_str(s.trim()).ok()),
        event_id: event.as_ref().map(|e| e.id.to_string()),
        event_type: event.as_ref().map(|e| e.event_type.to_string()),
        origin_topic: header_str(m, h::ORIGIN_TOPIC).map(String::from),
    }
}

/// Per partition: where to start and the end offset (exclusive) taken at start.
struct Bounds {
    parts: BTreeMap<i32, (i64, i64)>,
}

impl Bounds {
    fn total(&self) -> u64 {
        self.parts
            .values()
            .map(|(s, e)| (e - s).max(0) as u64)
            .sum()
    }
}

fn consumer(config: &Config, group: &str) -> Result<StreamConsumer, RunError> {
    config
        .kafka_client(
            &[("client.id", "hookline-replay")],
            &[
                ("group.id", group),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
            ],
        )
        .create()
        .map_err(|e| RunError::runtime(format!("kafka consumer: {e}")))
}

/// Start (committed offset of `group`, or the low watermark) and end (high watermark now) per partition.
async fn bounds(c: &StreamConsumer, topic: &str, use_committed: bool) -> Result<Bounds, RunError> {
    let timeout = Duration::from_secs(10);
    let parts = topic_partitions(c.client(), topic, timeout)
        .map_err(|e| RunError::runtime(format!("metadata of {topic}: {e}")))?;
    if parts.is_empty() {
        return Err(RunError::runtime(format!(
            "topic {topic} does not exist or has no partitions"
        )));
    }
    let committed: HashMap<i32, i64> = if use_committed {
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition(topic, *p);
        }
        c.committed_offsets(tpl, timeout)
            .map_err(|e| RunError::runtime(format!("committed offsets: {e}")))?
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    } else {
        HashMap::new()
    };
    let mut out = BTreeMap::new();
    for p in parts {
        let (low, high) = c
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| RunError::runtime(format!("watermarks of {topic}/{p}: {e}")))?;
        let start = committed.get(&p).copied().unwrap_or(low).max(low);
        out.insert(p, (start, high));
    }
    Ok(Bounds { parts: out })
}

/// Reads `topic` within `b`, calling `each` for every record; stops early when `each` says so.
async fn read_bounded(
    c: &StreamConsumer,
    topic: &str,
    b: &Bounds,
    mut each: impl AsyncFnMut(&BorrowedMessage<'_>) -> Result<bool, RunError>,
) -> Result<(), RunError> {
    let mut tpl = TopicPartitionList::new();
    let mut open: HashMap<i32, i64> = HashMap::new();
    for (p, (start, end)) in &b.parts {
        if start < end {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*start))
                .map_err(RunError::runtime)?;
            open.insert(*p, *end);
        }
    }
    if open.is_empty() {
        return Ok(());
    }
    c.assign(&tpl).map_err(RunError::runtime)?;
    while !open.is_empty() {
        let m = match tokio::time::timeout(Duration::from_secs(30), c.recv()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(RunError::runtime(format!("reading {topic}: {e}"))),
            Err(_) => {
                return Err(RunError::runtime(format!(
                    "reading {topic}: no record for 30 s before the end offsets taken at start"
                )));
            }
        };
        let Some(end) = open.get(&m.partition()).copied() else {
            continue;
        };
        if m.offset() >= end {
            open.remove(&m.partition());
            continue;
        }
        if !each(&m).await? {
            return Ok(());
        }
        if m.offset() + 1 >= end {
            open.remove(&m.partition());
        }
    }
    Ok(())
}

/// `hookline dlq stats`: counts by reason, subscription and event type; oldest and newest record.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    pub topic: String,
    pub records: u64,
    pub by_reason: BTreeMap<String, u64>,
    pub by_subscription: BTreeMap<String, u64>,
    pub by_event_type: BTreeMap<String, u64>,
    pub oldest: Option<String>,
    pub newest: Option<String>,
}

pub async fn stats(config: &Config, topic: Option<String>) -> Result<Stats, RunError> {
    let topics = Topics::new(&config.retry.topic_prefix, &config.retry.tiers);
    let topic = topic.unwrap_or(topics.dlq);
    let c = consumer(config, &format!("{}.dlq-stats", config.source.group))?;
    let b = bounds(&c, &topic, false).await?;
    let mut s = Stats {
        topic: topic.clone(),
        ..Stats::default()
    };
    let (mut oldest, mut newest) = (u64::MAX, 0u64);
    read_bounded(&c, &topic, &b, async |m| {
        let r = describe(m);
        s.records += 1;
        *s.by_reason
            .entry(r.reason.unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
        *s.by_subscription
            .entry(
                r.subscription
                    .map_or_else(|| "(none)".into(), |u| u.to_string()),
            )
            .or_default() += 1;
        *s.by_event_type
            .entry(r.event_type.unwrap_or_else(|| "(not decodable)".into()))
            .or_default() += 1;
        if let Some(t) = r.timestamp_ms {
            oldest = oldest.min(t);
            newest = newest.max(t);
        }
        Ok(true)
    })
    .await?;
    if s.records > 0 && newest > 0 {
        s.oldest = Some(crate::model::rfc3339_ms(oldest));
        s.newest = Some(crate::model::rfc3339_ms(newest));
    }
    Ok(s)
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}: {} records", self.topic, self.records)?;
        if let (Some(o), Some(n)) = (&self.oldest, &self.newest) {
            writeln!(f, "oldest {o}, newest {n}")?;
        }
        for (title, map) in [
            ("by reason", &self.by_reason),
            ("by subscription", &self.by_subscription),
            ("by event type", &self.by_event_type),
        ] {
            writeln!(f, "{title}:")?;
            let mut rows: Vec<_> = map.iter().collect();
            rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            for (k, v) in rows {
                writeln!(f, "  {v:>10}  {k}")?;
            }
        }
        Ok(())
    }
}

/// What `hookline replay` was asked to do.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    pub from: Option<String>,
    pub to: Option<String>,
    pub filters: Filters,
    /// The filter arguments as given (they name the default consumer group).
    pub filter_text: String,
    pub rate: Option<u32>,
    pub limit: Option<u64>,
    pub dry_run: bool,
    pub group: Option<String>,
    pub sample: usize,
}

/// The outcome of a replay.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub replay_id: String,
    pub from: String,
    pub to: String,
    pub group: String,
    pub dry_run: bool,
    /// Records in range at start (from the group's position to the end offsets).
    pub in_range: u64,
    pub scanned: u64,
    pub matched: u64,
    pub replayed: u64,
    pub skipped: u64,
    /// Why matched records were skipped.
    pub skipped_by_reason: BTreeMap<String, u64>,
    /// Matched records whose subscription is gone or disabled (not sent).
    pub missing_subscriptions: BTreeMap<String, u64>,
    pub sample: Vec<DlqSample>,
    pub interrupted: bool,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct DlqSample {
    pub partition: i32,
    pub offset: i64,
    pub reason: Option<String>,
    pub subscription: Option<String>,
    pub event_type: Option<String>,
    pub event_id: Option<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run {
            "would replay"
        } else {
            "replayed"
        };
        writeln!(
            f,
            "replay {} from {} to {} (group {}){}",
            self.replay_id,
            self.from,
            self.to,
            self.group,
            if self.dry_run {
                ", dry run: nothing produced"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "scanned {}, matched {}, {verb} {}, skipped {} in {:.1} s{}",
            self.scanned,
            self.matched,
            self.replayed,
            self.skipped,
            self.seconds,
            if self.interrupted {
                " (interrupted: run the same command again to continue)"
            } else {
                ""
            }
        )?;
        for (why, n) in &self.skipped_by_reason {
            writeln!(f, "  skipped {n}: {why}")?;
        }
        for (id, n) in &self.missing_subscriptions {
            writeln!(
                f,
                "  subscription {id} no longer exists or is disabled: {n} records not sent"
            )?;
        }
        for s in &self.sample {
            writeln!(
                f,
                "  sample: {}/{} reason={} subscription={} type={} id={}",
                s.partition,
                s.offset,
                s.reason.as_deref().unwrap_or("-"),
                s.subscription.as_deref().unwrap_or("-"),
                s.event_type.as_deref().unwrap_or("-"),
                s.event_id.as_deref().unwrap_or("-"),
            )?;
        }
        Ok(())
    }
}

/// Headers of a replayed record: the original non-hookline ones, then (for a tier) what the tier consumer
/// needs — the subscription, 0 attempts, due now — and the origin, plus `hookline-replay-id`.
fn replay_headers(m: &BorrowedMessage<'_>, tier: bool, replay_id: &str, now: u64) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    let mut keep = Vec::new();
    if let Some(hs) = m.headers() {
        for hd in hs.iter() {
            if !h::is_hookline_header(hd.key) {
                out = out.insert(Header {
                    key: hd.key,
                    value: hd.value,
                });
            } else if tier
                && [
                    h::SUBSCRIPTION,
                    h::ORIGIN_TOPIC,
                    h::ORIGIN_PARTITION,
                    h::ORIGIN_OFFSET,
                    h::ORIGIN_TIMESTAMP_MS,
                ]
                .iter()
                .any(|k| hd.key.eq_ignore_ascii_case(k))
            {
                keep.push((hd.key, hd.value));
            }
        }
    }
    for (k, v) in keep {
        out = out.insert(Header { key: k, value: v });
    }
    if tier {
        let now = now.to_string();
        out = out
            .insert(Header {
                key: h::ATTEMPT,
                value: Some(b"0"),
            })
            .insert(Header {
                key: h::DUE_MS,
                value: Some(now.as_bytes()),
            });
    }
    out.insert(Header {
        key: h::REPLAY_ID,
        value: Some(replay_id.as_bytes()),
    })
}

/// The default consumer group of a replay: the same command resumes, a different one starts afresh.
fn default_group(config: &Config, from: &str, to: &str, filter_text: &str) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (from, to, filter_text).hash(&mut hasher);
    format!(
        "{}.replay.{:08x}",
        config.source.group,
        hasher.finish() as u32
    )
}

/// Shows progress on a terminal (a bar) or in periodic log lines.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_line: Instant,
    total: u64,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} scanned, {msg}",
            ) {
                b.set_style(style);
            }
            b
        });
        Progress {
            bar,
            last_line: Instant::now(),
            total,
        }
    }

    fn update(&mut self, s: &Summary) {
        match &self.bar {
            Some(b) => {
                b.set_position(s.scanned);
                b.set_message(format!("{} matched, {} replayed", s.matched, s.replayed));
            }
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                self.last_line = Instant::now();
                tracing::info!(
                    scanned = s.scanned,
                    of = self.total,
                    matched = s.matched,
                    replayed = s.replayed,
                    skipped = s.skipped,
                    "replay progress"
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Commits `next` (per partition, the offset after the last finished record) for `group`.
fn commit(c: &StreamConsumer, topic: &str, next: &BTreeMap<i32, i64>) -> Result<(), RunError> {
    if next.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in next {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
            .map_err(RunError::runtime)?;
    }
    c.commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .map_err(|e| RunError::runtime(format!("committing the replay position: {e}")))
}

pub async fn replay(config: &Config, req: ReplayRequest) -> Result<Summary, RunError> {
    let started = Instant::now();
    let topics = Topics::new(&config.retry.topic_prefix, &config.retry.tiers);
    let from = req.from.clone().unwrap_or_else(|| topics.dlq.clone());
    let to_text = req
        .to
        .clone()
        .unwrap_or_else(|| format!("retry.{}", config.retry.tiers[0]));
    let target = Target::parse(&to_text, &topics, &config.retry.tiers)
        .map_err(|m| ConfigError::new("--to", m))?;
    let group = req
        .group
        .clone()
        .unwrap_or_else(|| default_group(config, &from, &to_text, &req.filter_text));
    let store: Option<Arc<dyn Store>> = match target {
        Target::Tier(..) => Some(store::open(config).await?),
        Target::Source => None,
    };
    let c = consumer(config, &group)?;
    let producer: FutureProducer = producer_config(config)
        .set("client.id", "hookline-replay")
        .create()
        .map_err(|e| RunError::runtime(format!("kafka producer: {e}")))?;
    let b = bounds(&c, &from, true).await?;
    let replay_id = Uuid::new_v4().to_string();
    let mut s = Summary {
        replay_id: replay_id.clone(),
        from: from.clone(),
        to: match &target {
            Target::Tier(_, t) => t.clone(),
            Target::Source => "source (each record's origin topic)".into(),
        },
        group: group.clone(),
        dry_run: req.dry_run,
        in_range: b.total(),
        ..Summary::default()
    };
    tracing::info!(replay_id = %replay_id, from = %from, to = %s.to, group = %group, records = s.in_range, dry_run = req.dry_run, "replay starting");
    let limiter = req.rate.and_then(NonZeroU32::new).map(|r| {
        governor::RateLimiter::direct(governor::Quota::per_second(r).allow_burst(NonZeroU32::MIN))
    });
    let stop = tokio_util::sync::CancellationToken::new();
    crate::shutdown::on_signal(stop.clone());
    let mut progress = Progress::new(s.in_range);
    let mut known: HashMap<Uuid, bool> = HashMap::new();
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last_commit = Instant::now();
    let skip = |s: &mut Summary, why: &str| {
        s.skipped += 1;
        *s.skipped_by_reason.entry(why.to_string()).or_default() += 1;
    };
    let result = read_bounded(&c, &from, &b, async |m| {
        if stop.is_cancelled() {
            s.interrupted = true;
            return Ok(false);
        }
        if req.limit.is_some_and(|l| s.matched >= l) {
            return Ok(false);
        }
        let r = describe(m);
        s.scanned += 1;
        if req.filters.matches(&r) {
            s.matched += 1;
            if s.sample.len() < req.sample {
                s.sample.push(DlqSample {
                    partition: r.partition,
                    offset: r.offset,
                    reason: r.reason.clone(),
                    subscription: r.subscription.map(|u| u.to_string()),
                    event_type: r.event_type.clone(),
                    event_id: r.event_id.clone(),
                });
            }
            let dest = match (&target, r.reason.as_deref()) {
                (_, Some("invalid_event")) => Err("invalid_event records are not replayed"),
                (Target::Tier(_, t), _) => match r.subscription {
                    None => Err("no hookline-subscription header"),
                    Some(id) => {
                        let exists = match known.get(&id) {
                            Some(e) => *e,
                            None => {
                                let e = match &store {
                                    Some(st) => st
                                        .get(id)
                                        .await
                                        .map_err(|e| RunError::runtime(format!("store: {e}")))?
                                        .is_some_and(|spec| spec.enabled),
                                    None => true,
                                };
                                known.insert(id, e);
                                e
                            }
                        };
                        if exists {
                            Ok(t.clone())
                        } else {
                            *s.missing_subscriptions.entry(id.to_string()).or_default() += 1;
                            Err("subscription no longer exists or is disabled")
                        }
                    }
                },
                (Target::Source, _) => r
                    .origin_topic
                    .clone()
                    .ok_or("no hookline-origin-topic header"),
            };
            match dest {
                Err(why) => skip(&mut s, why),
                Ok(_) if req.dry_run => s.replayed += 1,
                Ok(topic) => {
                    if let Some(l) = &limiter {
                        tokio::select! {
                            _ = l.until_ready() => {}
                            _ = stop.cancelled() => {
                                s.interrupted = true;
                                return Ok(false);
                            }
                        }
                    }
                    let tier = matches!(target, Target::Tier(..));
                    let headers = replay_headers(m, tier, &replay_id, now_ms());
                    let mut rec = FutureRecord::<[u8], [u8]>::to(&topic)
                        .payload(m.payload().unwrap_or_default())
                        .headers(headers);
                    // A tier record is keyed by its subscription, as hookline's own are.
                    if tier && let Some(k) = m.key() {
                        rec = rec.key(k);
                    }
                    producer
                        .send(rec, Duration::from_secs(30))
                        .await
                        .map_err(|(e, _)| {
                            RunError::runtime(format!("producing to {topic}: {e}"))
                        })?;
                    s.replayed += 1;
                }
            }
        }
        next.insert(m.partition(), m.offset() + 1);
        if !req.dry_run && last_commit.elapsed() >= Duration::from_millis(500) {
            commit(&c, &from, &next)?;
            last_commit = Instant::now();
        }
        progress.update(&s);
        Ok(true)
    })
    .await;
    progress.finish();
    // What was finished is committed even when the run failed part-way.
    if !req.dry_run {
        commit(&c, &from, &next)?;
    }
    result?;
    s.seconds = started.elapsed().as_secs_f64();
    tracing::info!(replay_id = %replay_id, scanned = s.scanned, matched = s.matched, replayed = s.replayed, skipped = s.skipped, interrupted = s.interrupted, "replay finished");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> DlqRecord {
        DlqRecord {
            partition: 0,
            offset: 7,
            timestamp_ms: Some(1_000_000),
            reason: Some("exhausted".into()),
            subscription: Some(Uuid::from_u128(1)),
            event_id: Some("e1".into()),
            event_type: Some("order.created".into()),
            origin_topic: Some("orders".into()),
        }
    }

    #[test]
    fn filters_combine() {
        let r = rec();
        assert!(Filters::default().matches(&r));
        let mut f = Filters {
            subscription: Some(Uuid::from_u128(1)),
            event_type: Some(Pattern::parse("order.*").unwrap()),
            reason: Some("exhausted".into()),
            since_ms: Some(1_000_000),
            until_ms: Some(1_000_001),
        };
        assert!(f.matches(&r));
        f.until_ms = Some(1_000_000);
        assert!(!f.matches(&r), "until is exclusive");
        f.until_ms = None;
        f.since_ms = Some(1_000_001);
        assert!(!f.matches(&r));
        f.since_ms = None;
        f.reason = Some("gone".into());
        assert!(!f.matches(&r));
        f.reason = None;
        f.subscription = Some(Uuid::from_u128(2));
        assert!(!f.matches(&r));
        f.subscription = None;
        f.event_type = Some(Pattern::parse("payment.*").unwrap());
        assert!(!f.matches(&r));
        f.event_type = Some(Pattern::parse("order.created").unwrap());
        assert!(f.matches(&r));
        let mut undecodable = rec();
        undecodable.event_type = None;
        assert!(
            !f.matches(&undecodable),
            "a type filter excludes records without a type"
        );
    }

    #[test]
    fn targets() {
        let tiers = vec!["1m".to_string(), "5m".to_string()];
        let topics = Topics::new("hl", &tiers);
        assert_eq!(
            Target::parse("retry.5m", &topics, &tiers).unwrap(),
            Target::Tier(1, "hl.retry.5m".into())
        );
        assert_eq!(
            Target::parse("source", &topics, &tiers).unwrap(),
            Target::Source
        );
        assert!(
            Target::parse("hl.dlq", &topics, &tiers)
                .unwrap_err()
                .contains("dead-letter")
        );
        assert!(
            Target::parse("dlq", &topics, &tiers)
                .unwrap_err()
                .contains("dead-letter")
        );
        assert!(
            Target::parse("retry.2h", &topics, &tiers)
                .unwrap_err()
                .contains("retry.1m")
        );
    }

    #[test]
    fn times() {
        let now = 10_000_000;
        assert_eq!(parse_time("2h", now).unwrap(), now - 7_200_000);
        assert_eq!(parse_time("1s", now).unwrap(), now - 1000);
        assert_eq!(parse_time("1970-01-01T00:00:01.500Z", now).unwrap(), 1500);
        assert!(parse_time("yesterday", now).is_err());
    }
}
