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
use crate::config::{Config, ConfigError, RunError};
use crate::decode::{RawRecord, decode};
use crate::kafka::topic_partitions;
use crate::model::{Origin, Pattern, parse_rfc3339_ms};
use crate::retry::Topics;
use crate::retry::headers as h;
use crate::retry::publish::{DlqReason, producer_config};
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
    /// Only records of these subscriptions (a tenant's: the API sets it for tenant tokens).
    pub only: Option<std::collections::HashSet<Uuid>>,
}

/// The filters as given, by the CLI's flags or the API's fields (same names without `--`).
#[derive(Debug, Clone, Default)]
pub struct FilterArgs {
    pub subscription: Option<Uuid>,
    pub event_type: Option<String>,
    pub reason: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
}

impl FilterArgs {
    /// The filters, and the text that names a replay's default consumer group (the same filters
    /// from the CLI or the API resume the same replay). Errors name the filter (`since`, …).
    pub fn parse(&self, now_ms: u64) -> Result<(Filters, String), (&'static str, String)> {
        let time = |name: &'static str, v: &Option<String>| {
            v.as_deref()
                .map(|t| parse_time(t, now_ms))
                .transpose()
                .map_err(|m| (name, m))
        };
        let event_type = self
            .event_type
            .as_deref()
            .map(Pattern::parse)
            .transpose()
            .map_err(|m| ("event_type", m))?;
        if let Some(r) = &self.reason
            && !DlqReason::ALL.iter().any(|k| k.as_str() == r)
        {
            let all: Vec<&str> = DlqReason::ALL.iter().map(|k| k.as_str()).collect();
            return Err((
                "reason",
                format!("{r:?} is not a reason: one of {}", all.join(", ")),
            ));
        }
        let filters = Filters {
            subscription: self.subscription,
            event_type,
            reason: self.reason.clone(),
            since_ms: time("since", &self.since)?,
            until_ms: time("until", &self.until)?,
            only: None,
        };
        let text = format!(
            "{:?} {:?} {:?} {:?} {:?}",
            self.subscription, self.event_type, self.reason, self.since, self.until
        );
        Ok((filters, text))
    }
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
        if let Some(only) = &self.only
            && !r.subscription.is_some_and(|s| only.contains(&s))
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

fn header_bytes<'a>(m: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a [u8]> {
    let hs = m.headers()?;
    hs.iter()
        .filter(|hd| hd.key.eq_ignore_ascii_case(name))
        .last()
        .and_then(|hd| hd.value)
}

/// The marker of a replay's lane in an ordering key (`\0replay\0<id>\0<key>`).
const REPLAY_LANE: &[u8] = b"\0replay\0";

/// The ordering key a record had before any replay put it in a replay's lane.
fn original_key(k: &[u8]) -> &[u8] {
    match k.strip_prefix(REPLAY_LANE) {
        Some(rest) => rest
            .iter()
            .position(|b| *b == 0)
            .map_or(rest, |i| &rest[i + 1..]),
        None => k,
    }
}

/// The lane of replay `id` for ordering key `k`: its replayed events are ordered among themselves,
/// beside (not behind) the key's live events.
fn replay_lane(id: &str, k: &[u8]) -> Vec<u8> {
    let mut out = REPLAY_LANE.to_vec();
    out.extend_from_slice(id.as_bytes());
    out.push(0);
    out.extend_from_slice(original_key(k));
    out
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

/// Reads all of `topic` (from its low watermarks to the end it has now), calling `each` for every
/// record (the parked keys' listing).
pub async fn read_topic(
    config: &Config,
    topic: &str,
    each: impl AsyncFnMut(&BorrowedMessage<'_>) -> Result<bool, RunError>,
) -> Result<(), RunError> {
    let c = consumer(config, &format!("{}.reader", config.source.group))?;
    let b = bounds(&c, topic, false).await?;
    read_bounded(&c, topic, &b, each).await
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
    let l = list(config, topic, &Filters::default(), None, 0, u64::MAX).await?;
    Ok(Stats {
        topic: l.topic,
        records: l.matched,
        by_reason: l.by_reason,
        by_subscription: l.by_subscription,
        by_event_type: l.by_event_type,
        oldest: l.oldest,
        newest: l.newest,
    })
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

/// A page of dead letters with the counts of everything that matched (`GET /v1/dead-letters`).
#[derive(Debug, Default, Serialize)]
pub struct Listing {
    pub topic: String,
    /// Records read (the whole topic up to its end offsets at the start of the request, or the
    /// first `max_scan` of them: then `truncated`).
    pub scanned: u64,
    pub truncated: bool,
    pub matched: u64,
    pub by_reason: BTreeMap<String, u64>,
    pub by_subscription: BTreeMap<String, u64>,
    pub by_event_type: BTreeMap<String, u64>,
    pub oldest: Option<String>,
    pub newest: Option<String>,
    /// Matching records after the cursor, in (partition, offset) order.
    pub items: Vec<DlqEntry>,
    /// `<partition>:<offset>` of the last item when more matched after it.
    pub next_cursor: Option<String>,
}

/// One dead-letter record as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DlqEntry {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<String>,
    pub reason: Option<String>,
    pub subscription: Option<String>,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub origin_topic: Option<String>,
    /// Header values as text (invalid UTF-8 replaced), each cut at 256 bytes.
    pub headers: BTreeMap<String, String>,
    pub body_bytes: usize,
    /// The first [`EXCERPT_BYTES`] of the value, as text.
    pub body_excerpt: String,
}

/// Records one API listing request reads at most.
pub const MAX_SCAN: u64 = 1_000_000;
/// Bytes of a record's value shown in a listing.
pub const EXCERPT_BYTES: usize = 512;

fn cut(b: &[u8], n: usize) -> String {
    String::from_utf8_lossy(&b[..b.len().min(n)]).into_owned()
}

/// `<partition>:<offset>`: the position a listing page ended at.
pub fn parse_cursor(c: &str) -> Option<(i32, i64)> {
    let (p, o) = c.split_once(':')?;
    Some((p.parse().ok()?, o.parse().ok()?))
}

/// `GET /v1/dead-letters` and `hookline dlq stats`: counts over the records of `topic` (default the
/// dead-letter topic) that match `filters` (reading at most `max_scan`), and the first `limit` of them
/// after `cursor`.
pub async fn list(
    config: &Config,
    topic: Option<String>,
    filters: &Filters,
    cursor: Option<(i32, i64)>,
    limit: usize,
    max_scan: u64,
) -> Result<Listing, RunError> {
    let topics = Topics::new(&config.retry.topic_prefix, &config.retry.tiers);
    let topic = topic.unwrap_or(topics.dlq);
    let c = consumer(config, &format!("{}.dlq-stats", config.source.group))?;
    let b = bounds(&c, &topic, false).await?;
    let mut l = Listing {
        topic: topic.clone(),
        ..Listing::default()
    };
    let (mut oldest, mut newest) = (u64::MAX, 0u64);
    // The `limit + 1` smallest positions after the cursor (one more tells whether a next page exists).
    let mut page: BTreeMap<(i32, i64), DlqEntry> = BTreeMap::new();
    read_bounded(&c, &topic, &b, async |m| {
        if l.scanned >= max_scan {
            l.truncated = true;
            return Ok(false);
        }
        l.scanned += 1;
        let r = describe(m);
        if !filters.matches(&r) {
            return Ok(true);
        }
        l.matched += 1;
        *l.by_reason
            .entry(r.reason.clone().unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
        *l.by_subscription
            .entry(
                r.subscription
                    .map_or_else(|| "(none)".into(), |u| u.to_string()),
            )
            .or_default() += 1;
        *l.by_event_type
            .entry(
                r.event_type
                    .clone()
                    .unwrap_or_else(|| "(not decodable)".into()),
            )
            .or_default() += 1;
        if let Some(t) = r.timestamp_ms {
            oldest = oldest.min(t);
            newest = newest.max(t);
        }
        let pos = (r.partition, r.offset);
        let after = cursor.is_none_or(|c| pos > c);
        let fits = page.len() <= limit || page.last_key_value().is_some_and(|(k, _)| pos < *k);
        if after && fits {
            let value = m.payload().unwrap_or_default();
            let headers = m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|hd| (hd.key.to_string(), cut(hd.value.unwrap_or_default(), 256)))
                        .collect()
                })
                .unwrap_or_default();
            page.insert(
                pos,
                DlqEntry {
                    partition: r.partition,
                    offset: r.offset,
                    timestamp: r.timestamp_ms.map(crate::model::rfc3339_ms),
                    reason: r.reason,
                    subscription: r.subscription.map(|u| u.to_string()),
                    event_id: r.event_id,
                    event_type: r.event_type,
                    origin_topic: r.origin_topic,
                    headers,
                    body_bytes: value.len(),
                    body_excerpt: cut(value, EXCERPT_BYTES),
                },
            );
            if page.len() > limit + 1 {
                page.pop_last();
            }
        }
        Ok(true)
    })
    .await?;
    if l.matched > 0 && newest > 0 {
        l.oldest = Some(crate::model::rfc3339_ms(oldest));
        l.newest = Some(crate::model::rfc3339_ms(newest));
    }
    let more = page.len() > limit;
    l.items = page.into_values().take(limit).collect();
    l.next_cursor = more
        .then(|| {
            l.items
                .last()
                .map(|e| format!("{}:{}", e.partition, e.offset))
        })
        .flatten();
    Ok(l)
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
    /// The replay's id (a new one when `None`): the API hands it out before the replay starts.
    pub id: Option<Uuid>,
}

impl ReplayRequest {
    /// The consumer group this replay reads with (given, or derived from what it replays).
    pub fn group_name(&self, config: &Config) -> String {
        let topics = Topics::new(&config.retry.topic_prefix, &config.retry.tiers);
        let from = self.from.clone().unwrap_or(topics.dlq);
        let to = self
            .to
            .clone()
            .unwrap_or_else(|| format!("retry.{}", config.retry.tiers[0]));
        self.group
            .clone()
            .unwrap_or_else(|| default_group(config, &from, &to, &self.filter_text))
    }
}

/// The outcome of a replay (and its progress while it runs).
#[derive(Debug, Clone, Default, Serialize)]
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

#[derive(Debug, Clone, Serialize)]
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

/// `hookline replay`: stops on SIGINT/SIGTERM (committing what it finished), shows progress on the
/// terminal or in log lines.
pub async fn replay(config: &Config, req: ReplayRequest) -> Result<Summary, RunError> {
    let stop = tokio_util::sync::CancellationToken::new();
    crate::shutdown::on_signal(stop.clone());
    let mut progress: Option<Progress> = None;
    let r = run(config, req, None, stop, |s| {
        progress
            .get_or_insert_with(|| Progress::new(s.in_range))
            .update(s)
    })
    .await;
    if let Some(p) = &progress {
        p.finish();
    }
    r
}

/// One replay, the CLI's and the API's: reads `req.from` up to the end offsets taken at start,
/// re-publishes what matches, commits what it finished to the replay's group, and stops early (with
/// `interrupted`) when `stop` fires. `store` answers whether a record's subscription still exists
/// (opened from the config when `None` and needed). `on_progress` sees the summary after every record.
pub async fn run(
    config: &Config,
    req: ReplayRequest,
    store: Option<Arc<dyn Store>>,
    stop: tokio_util::sync::CancellationToken,
    mut on_progress: impl FnMut(&Summary),
) -> Result<Summary, RunError> {
    let started = Instant::now();
    let topics = Topics::new(&config.retry.topic_prefix, &config.retry.tiers);
    let from = req.from.clone().unwrap_or_else(|| topics.dlq.clone());
    let to_text = req
        .to
        .clone()
        .unwrap_or_else(|| format!("retry.{}", config.retry.tiers[0]));
    let target = Target::parse(&to_text, &topics, &config.retry.tiers)
        .map_err(|m| ConfigError::new("--to", m))?;
    let group = req.group_name(config);
    let store: Option<Arc<dyn Store>> = match (target.clone(), store) {
        (Target::Tier(..), Some(s)) => Some(s),
        (Target::Tier(..), None) => Some(store::open(config).await?),
        (Target::Source, _) => None,
    };
    let c = consumer(config, &group)?;
    let producer: FutureProducer = producer_config(config)
        .set("client.id", "hookline-replay")
        .create()
        .map_err(|e| RunError::runtime(format!("kafka producer: {e}")))?;
    let b = bounds(&c, &from, true).await?;
    let replay_id = req.id.unwrap_or_else(Uuid::new_v4).to_string();
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
    on_progress(&s);
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
                    let mut headers = replay_headers(m, tier, &replay_id, now_ms());
                    let ordering_key = header_bytes(m, h::ORDERING_KEY);
                    let origin_partition = header_str(m, h::ORIGIN_PARTITION)
                        .and_then(|p| p.trim().parse::<i32>().ok());
                    let mut topic = topic;
                    let mut partition = None;
                    let mut key: Option<Vec<u8>> = None;
                    match (tier, ordering_key, &r.origin_topic, origin_partition) {
                        // An ordered subscription's event goes through the parked topic of its
                        // origin partition, in a lane of this replay: the replayed events of a
                        // key are delivered in their order, one at a time.
                        (true, Some(k), Some(origin), Some(p)) => {
                            topic = crate::order::parked_topic(&config.retry.topic_prefix, origin);
                            partition = Some(p);
                            key = Some(replay_lane(&replay_id, k));
                            headers = headers.insert(rdkafka::message::Header {
                                key: h::PARKED,
                                value: Some(b"event"),
                            });
                        }
                        // A tier record is keyed by its subscription, as hookline's own are.
                        (true, _, _, _) => key = m.key().map(<[u8]>::to_vec),
                        // Back on the source topic, an ordered event keeps its ordering key.
                        (false, Some(k), _, _) => key = Some(original_key(k).to_vec()),
                        (false, None, _, _) => {}
                    }
                    let mut rec = FutureRecord::<[u8], [u8]>::to(&topic)
                        .payload(m.payload().unwrap_or_default())
                        .headers(headers);
                    if let Some(k) = &key {
                        rec = rec.key(k);
                    }
                    if let Some(p) = partition {
                        rec = rec.partition(p);
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
        on_progress(&s);
        Ok(true)
    })
    .await;
    // What was finished is committed even when the run failed part-way.
    if !req.dry_run {
        commit(&c, &from, &next)?;
    }
    result?;
    s.seconds = started.elapsed().as_secs_f64();
    on_progress(&s);
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
            only: None,
        };
        assert!(f.matches(&r));
        f.only = Some([Uuid::from_u128(2)].into());
        assert!(!f.matches(&r), "only the listed subscriptions");
        f.only = Some([Uuid::from_u128(1)].into());
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
    fn replay_lanes_wrap_the_original_key_once() {
        let lane = replay_lane("r1", b"cust/7");
        assert_eq!(lane, b"\0replay\0r1\0cust/7");
        assert_eq!(original_key(&lane), b"cust/7");
        assert_eq!(replay_lane("r2", &lane), b"\0replay\0r2\0cust/7");
        assert_eq!(original_key(b"plain"), b"plain");
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
    fn filter_args_name_the_field_at_fault() {
        let ok = FilterArgs {
            event_type: Some("order.*".into()),
            reason: Some("gone".into()),
            since: Some("2h".into()),
            ..FilterArgs::default()
        };
        let (f, text) = ok.parse(10_000_000).unwrap();
        assert_eq!(f.since_ms, Some(10_000_000 - 7_200_000));
        assert_eq!(
            text,
            ok.parse(99_999_999).unwrap().1,
            "the group text is the filters as given"
        );
        for (bad, field) in [
            (
                FilterArgs {
                    reason: Some("lost".into()),
                    ..FilterArgs::default()
                },
                "reason",
            ),
            (
                FilterArgs {
                    event_type: Some("or*der".into()),
                    ..FilterArgs::default()
                },
                "event_type",
            ),
            (
                FilterArgs {
                    since: Some("yesterday".into()),
                    ..FilterArgs::default()
                },
                "since",
            ),
            (
                FilterArgs {
                    until: Some("soon".into()),
                    ..FilterArgs::default()
                },
                "until",
            ),
        ] {
            assert_eq!(bad.parse(0).unwrap_err().0, field);
        }
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
