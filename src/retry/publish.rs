//! The producer for retry and dead-letter records: idempotent, `acks=all`. Each `publish_*` call returns
//! only when Kafka acknowledged the record; transient failures are retried with backoff, because the
//! source record may not be marked done before the hand-off is durable.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use super::Topics;
use super::headers as h;
use super::receipt::{Ack, Receipt};
use crate::config::Config;
use crate::deliver::outcome::{AttemptResult, truncate};
use crate::kafka::topic_partitions;
use crate::metrics::Metrics;
use crate::model::{Event, Origin};

/// Dead-letter reasons (`hookline-dlq-reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqReason {
    Exhausted,
    Rejected,
    Gone,
    InvalidEvent,
    /// An ordered key's retrying head given up by an operator (`skip`), so its key moves on.
    Skipped,
}

impl DlqReason {
    pub const ALL: [DlqReason; 5] = [
        DlqReason::Exhausted,
        DlqReason::Rejected,
        DlqReason::Gone,
        DlqReason::InvalidEvent,
        DlqReason::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DlqReason::Exhausted => "exhausted",
            DlqReason::Rejected => "rejected",
            DlqReason::Gone => "gone",
            DlqReason::InvalidEvent => "invalid_event",
            DlqReason::Skipped => "skipped",
        }
    }
}

/// What the publisher needs to know about the failed delivery.
pub struct Failure<'a> {
    pub event: &'a Event,
    pub subscription_id: &'a str,
    /// Attempts made so far, including the one that just failed (unchanged by a deferral).
    pub attempts: u32,
    /// Times the delivery was deferred because the endpoint's queue was full.
    pub deferrals: u32,
    /// Epoch ms of the first failure of this delivery.
    pub first_failure_ms: u64,
    pub last: &'a AttemptResult,
    /// The ordering key of an ordered subscription's event (`hookline-ordering-key` on its
    /// dead-letter record, so that a replay keeps its order per key).
    pub ordering_key: Option<&'a [u8]>,
}

impl<'a> Failure<'a> {
    /// The failure of a delivery with history `prior` (attempts, deferrals, first failure — now when
    /// it had none) whose last result is `last`.
    pub fn of(
        event: &'a Event,
        subscription_id: &'a str,
        prior: crate::model::Prior,
        last: &'a AttemptResult,
        ordering_key: Option<&'a [u8]>,
    ) -> Failure<'a> {
        Failure {
            event,
            subscription_id,
            attempts: prior.attempts,
            deferrals: prior.deferrals,
            first_failure_ms: prior.first_failure_ms.unwrap_or_else(crate::clock::now_ms),
            last,
            ordering_key,
        }
    }
}

pub struct Publisher {
    producer: FutureProducer,
    /// `source.max_event_bytes`.
    max_event_bytes: usize,
    pub topics: Topics,
    /// Partitions of each tier topic (0 = unknown: the producer's key hashing decides).
    tier_partitions: Vec<std::sync::atomic::AtomicI32>,
    /// Tier partitions this instance's retry consumer owns (updated on its rebalances).
    pub local_tiers: Arc<LocalTiers>,
    metrics: Arc<Metrics>,
    tier_counters: Vec<prometheus_client::metrics::counter::Counter>,
    /// Receipts' own producer, when `[receipts] enabled`.
    receipts: Option<super::receipt::Receipts>,
}

pub fn producer_config(config: &Config) -> ClientConfig {
    // Room for the largest event hookline accepts plus its headers (librdkafka's default is 1 000 000
    // bytes, less than the default source.max_event_bytes).
    let max = (config.source.max_event_bytes + (1 << 20))
        .max(1_000_000)
        .to_string();
    config.kafka_client(
        &[
            ("linger.ms", "50"),
            ("client.id", "hookline-retry"),
            ("message.max.bytes", max.as_str()),
        ],
        &[("enable.idempotence", "true"), ("acks", "all")],
    )
}

impl Publisher {
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<Publisher, rdkafka::error::KafkaError> {
        let topics = Topics::new(&config.retry.topic_prefix, &config.retry.tiers)
            .with_receipts(&config.retry.topic_prefix, config.receipts.enabled)
            .with_events(&config.retry.topic_prefix, config.operational.enabled);
        let producer: FutureProducer = producer_config(config).create()?;
        let receipts = match &topics.receipts {
            Some(topic) => Some(super::receipt::Receipts::new(
                producer_config(config),
                topic.clone(),
                metrics.receipts.clone(),
            )?),
            None => None,
        };
        let tier_counters = config
            .retry
            .tiers
            .iter()
            .map(|t| metrics.tier_counter(t))
            .collect();
        Ok(Publisher {
            producer,
            max_event_bytes: config.source.max_event_bytes,
            local_tiers: Arc::new(LocalTiers::default()),
            tier_partitions: topics
                .tiers
                .iter()
                .map(|_| std::sync::atomic::AtomicI32::new(0))
                .collect(),
            topics,
            metrics,
            tier_counters,
            receipts,
        })
    }

    /// Creates the retry and dead-letter topics that do not exist yet, then learns the tier topics'
    /// partition counts.
    pub async fn ensure_topics(&self, config: &Config) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> = config
            .kafka_client(&[("client.id", "hookline-admin")], &[])
            .create()
            .map_err(|e| format!("admin client: {e}"))?;
        self.create_missing(config, &admin).await?;
        ensure_parked(config, &admin).await?;
        for (topic, count) in self.topics.tiers.iter().zip(&self.tier_partitions) {
            let n = topic_partitions(admin.inner(), topic, Duration::from_secs(10))
                .map_err(|e| format!("cannot read metadata of {topic}: {e}"))?
                .len();
            count.store(n as i32, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    async fn create_missing(
        &self,
        config: &Config,
        admin: &AdminClient<DefaultClientContext>,
    ) -> Result<(), String> {
        let md = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| format!("cannot read topic metadata: {e}"))?;
        let existing: std::collections::HashSet<&str> = md
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| t.name())
            .collect();
        let missing: Vec<&str> = self
            .topics
            .all()
            .filter(|t| !existing.contains(t))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if !config.retry.create_topics {
            return Err(format!(
                "retry/dead-letter topics missing: {} (create them, or set retry.create_topics = true)",
                missing.join(", ")
            ));
        }
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    config.retry.partitions,
                    TopicReplication::Fixed(config.retry.replication_factor),
                )
            })
            .collect();
        let results = admin
            .create_topics(
                &new,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(|e| format!("creating topics: {e}"))?;
        for r in results {
            match r {
                Ok(t) => tracing::info!(topic = %t, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, e)) => return Err(format!("creating topic {t}: {e}")),
            }
        }
        Ok(())
    }

    /// Hands a failed delivery to retry tier `tier`, due at `due_ms`. `local`: prefer a tier partition
    /// this instance consumes (deferrals: the work stays where its share of the limits was granted).
    pub async fn publish_retry(&self, f: &Failure<'_>, tier: usize, due_ms: u64, local: bool) {
        let headers = delivery_headers(f, Some(due_ms), None, true);
        // The key is the subscription (DESIGN §5), but the partition is chosen here, not by hashing the
        // key: otherwise one subscription's retries — a rate-limited endpoint's deferred backlog above
        // all — would all land on one partition and be delivered by one instance at its share of the
        // limit. A deferral goes to a partition this instance consumes, a failure's retry to a partition
        // chosen by the event's id (stable for an event).
        let id = f.event.webhook_id.as_bytes();
        // A deferral stays on this instance: a partition of the wanted tier it consumes, else of another
        // tier it consumes one of (the record is still due at the wanted tier's time; the attempt count,
        // not the topic, decides later tiers).
        let (tier, partition) = match local.then(|| self.local_tiers.pick(tier, id)).flatten() {
            Some((t, p)) => (t, Some(p)),
            None => {
                let n = self.tier_partitions[tier].load(std::sync::atomic::Ordering::Relaxed);
                (tier, (n > 0).then(|| spread(id, n)))
            }
        };
        self.send(
            &self.topics.tiers[tier],
            Some(f.subscription_id.as_bytes()),
            partition,
            &f.event.body,
            headers,
        )
        .await;
        self.tier_counters[tier].inc();
        self.metrics.retried.inc();
    }

    /// Dead-letters a failed delivery. `hookline-due-ms` on a dead-letter record is the time it was
    /// dead-lettered (a replay sets a new one).
    pub async fn publish_dead(&self, f: &Failure<'_>, reason: DlqReason) {
        let headers = delivery_headers(f, Some(crate::clock::now_ms()), Some(reason), true);
        self.send(
            &self.topics.dlq,
            Some(f.subscription_id.as_bytes()),
            None,
            &f.event.body,
            headers,
        )
        .await;
        self.metrics.dlq_counter(reason.as_str()).inc();
        self.metrics.dead_lettered.inc();
    }

    /// Appends an ordered event (or a hold marker, or an operator's control record) to partition
    /// `partition` of the parked topic `topic` (the one of its source partition): key = the ordering
    /// key, value = the event body, headers = the original ones plus this delivery's `hookline-*` (its
    /// source offset in `hookline-origin-offset`, its attempts and due time, and `hookline-parked` =
    /// `kind`). Returns once Kafka acknowledged it.
    #[allow(clippy::too_many_arguments)]
    pub async fn publish_parked(
        &self,
        topic: &str,
        partition: i32,
        key: &[u8],
        event: &Event,
        subscription_id: &str,
        prior: crate::model::Prior,
        due_ms: u64,
        kind: &str,
        last: Option<&AttemptResult>,
    ) {
        let waiting = AttemptResult::Refused(String::new());
        let f = Failure {
            event,
            subscription_id,
            attempts: prior.attempts,
            deferrals: prior.deferrals,
            first_failure_ms: prior.first_failure_ms.unwrap_or(0),
            last: last.unwrap_or(&waiting),
            ordering_key: None,
        };
        let mut hs = delivery_headers(&f, Some(due_ms), None, last.is_some());
        hs = hs.insert(Header {
            key: h::PARKED,
            value: Some(kind.as_bytes()),
        });
        self.send(topic, Some(key), Some(partition), &event.body, hs)
            .await;
    }

    /// The idempotent producer, for other records hookline writes (operational events).
    pub fn producer(&self) -> FutureProducer {
        self.producer.clone()
    }

    /// Whether terminal outcomes get a receipt (`[receipts] enabled`).
    pub fn receipts(&self) -> bool {
        self.receipts.is_some()
    }

    /// Publishes the receipt of a terminal outcome (see [`super::receipt`]); returns once Kafka
    /// acknowledged it. A no-op when receipts are off.
    pub async fn publish_receipt(&self, r: &Receipt<'_>) {
        if !self.receipts() {
            return;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.publish_receipt_then(r, Ack::Notify(tx)).await;
        // The sender is only dropped unsent when the producer is gone (shutdown).
        let _ = rx.await;
    }

    /// Publishes the receipt of a terminal outcome; `ack` is settled once Kafka acknowledged it.
    /// Returns at once when receipts are off (false; `ack` is dropped unsettled), else once the
    /// receipt is queued (true).
    pub async fn publish_receipt_then(&self, r: &Receipt<'_>, ack: Ack) -> bool {
        let Some(receipts) = &self.receipts else {
            return false;
        };
        let hs =
            origin_headers(OwnedHeaders::new_with_capacity(5), &r.event.origin).insert(Header {
                key: h::SUBSCRIPTION,
                value: Some(r.subscription_id.as_bytes()),
            });
        let value = super::receipt::value(r);
        receipts
            .send(r.subscription_id.as_bytes(), &value, hs, ack)
            .await;
        true
    }

    /// Dead-letters a record that is not a valid event: original bytes and headers, reason `invalid_event`.
    pub async fn publish_invalid(
        &self,
        key: Option<&[u8]>,
        value: &[u8],
        original: &[(Box<str>, Option<bytes::Bytes>)],
        origin: &Origin,
        detail: &str,
    ) {
        let mut hs = OwnedHeaders::new_with_capacity(original.len() + 7);
        // A record far over source.max_event_bytes (more than 512 KiB over, beyond what the producer is
        // sized for) is dead-lettered without its value; the origin headers say where to find it while
        // the source topic retains it. Smaller oversized records keep their bytes.
        let value = if value.len() > self.max_event_bytes + (512 << 10) {
            hs = hs.insert(Header {
                key: h::VALUE_OMITTED,
                value: Some(value.len().to_string().as_bytes()),
            });
            &[][..]
        } else {
            value
        };
        for (k, v) in original {
            if !h::is_hookline_header(k) {
                hs = hs.insert(Header {
                    key: k,
                    value: v.as_deref(),
                });
            }
        }
        let now = crate::clock::now_ms().to_string();
        let detail = truncate(detail, 200);
        hs = origin_headers(hs, origin)
            .insert(Header {
                key: h::ATTEMPT,
                value: Some(b"0"),
            })
            .insert(Header {
                key: h::FIRST_FAILURE_MS,
                value: Some(now.as_bytes()),
            })
            .insert(Header {
                key: h::LAST_STATUS,
                value: Some(b"invalid_event"),
            })
            .insert(Header {
                key: h::LAST_ERROR,
                value: Some(detail.as_bytes()),
            })
            .insert(Header {
                key: h::DLQ_REASON,
                value: Some(b"invalid_event"),
            });
        self.send(&self.topics.dlq, key, None, value, hs).await;
        self.metrics
            .dlq_counter(DlqReason::InvalidEvent.as_str())
            .inc();
    }

    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        partition: Option<i32>,
        value: &[u8],
        headers: OwnedHeaders,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut rec = FutureRecord::<[u8], [u8]>::to(topic)
                .payload(value)
                .headers(headers.clone());
            if let Some(k) = key {
                rec = rec.key(k);
            }
            if let Some(p) = partition {
                rec = rec.partition(p);
            }
            match self.producer.send(rec, Duration::from_secs(5)).await {
                Ok(_) => return,
                Err((e, _)) => {
                    tracing::warn!(topic, error = %e, retry_in_ms = backoff.as_millis() as u64, "publish failed; the source record stays in flight until it succeeds");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Waits for outstanding produce requests (shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "retry producer flush incomplete");
        }
        if let Some(r) = &self.receipts {
            r.flush(timeout);
        }
    }
}

/// Creates the parked topic of every source topic (ordered delivery: `<prefix>.parked.<topic>`, as many
/// partitions as the source topic, since parked partition p belongs to source partition p) and grows
/// one that has fewer partitions than its source.
async fn ensure_parked(
    config: &Config,
    admin: &AdminClient<DefaultClientContext>,
) -> Result<(), String> {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    // Partition counts from the listing of all topics: a metadata request naming a missing topic may
    // make the broker auto-create it with its default partition count.
    let counts = || -> Result<std::collections::HashMap<String, usize>, String> {
        let md = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| format!("cannot read topic metadata: {e}"))?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| (t.name().to_string(), t.partitions().len()))
            .collect())
    };
    let have = counts()?;
    // The parked keys' state: compacted (the last state of each key), and deleted after a day
    // (owners rewrite the keys they hold every 30 s; a key nobody rewrites is gone).
    let keys_topic = super::parked_keys_topic(&config.retry.topic_prefix);
    if !have.contains_key(&keys_topic) && config.retry.create_topics {
        let t = NewTopic::new(
            &keys_topic,
            config.retry.partitions,
            TopicReplication::Fixed(config.retry.replication_factor),
        )
        .set("cleanup.policy", "compact,delete")
        .set("retention.ms", "86400000")
        .set("segment.ms", "3600000");
        match admin.create_topics([&t], &opts).await {
            Ok(rs) => {
                for r in rs {
                    match r {
                        Ok(t) => tracing::info!(topic = %t, "created topic"),
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((t, e)) => return Err(format!("creating topic {t}: {e}")),
                    }
                }
            }
            Err(e) => return Err(format!("creating topic {keys_topic}: {e}")),
        }
    }
    let mut grow = Vec::new();
    let mut create = Vec::new();
    for source in &config.source.topics {
        let Some(&n) = have.get(source) else {
            continue;
        };
        let parked = super::parked_topic(&config.retry.topic_prefix, source);
        match have.get(&parked) {
            Some(&p) if p >= n => {}
            Some(_) => grow.push((parked, n)),
            None => create.push((parked, n)),
        }
    }
    if (!grow.is_empty() || !create.is_empty()) && !config.retry.create_topics {
        let names: Vec<&str> = grow
            .iter()
            .chain(&create)
            .map(|(t, _)| t.as_str())
            .collect();
        return Err(format!(
            "parked topics missing or with fewer partitions than their source topics: {} (create them, or set retry.create_topics = true)",
            names.join(", ")
        ));
    }
    if !create.is_empty() {
        let new: Vec<NewTopic<'_>> = create
            .iter()
            .map(|(t, n)| {
                NewTopic::new(
                    t,
                    *n as i32,
                    TopicReplication::Fixed(config.retry.replication_factor),
                )
            })
            .collect();
        let results = admin
            .create_topics(&new, &opts)
            .await
            .map_err(|e| format!("creating parked topics: {e}"))?;
        for r in results {
            match r {
                Ok(t) => tracing::info!(topic = %t, "created topic"),
                // Made meanwhile (another instance, or the broker's auto-creation): its partitions
                // are checked below.
                Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    if let Some((_, n)) = create.iter().find(|(c, _)| *c == t) {
                        grow.push((t, *n));
                    }
                }
                Err((t, e)) => return Err(format!("creating topic {t}: {e}")),
            }
        }
    }
    if !grow.is_empty() {
        let now = counts()?;
        let grow: Vec<(String, usize)> = grow
            .into_iter()
            .filter(|(t, n)| now.get(t).is_some_and(|p| p < n))
            .collect();
        let new: Vec<rdkafka::admin::NewPartitions<'_>> = grow
            .iter()
            .map(|(t, n)| rdkafka::admin::NewPartitions::new(t, *n))
            .collect();
        if !new.is_empty() {
            let results = admin
                .create_partitions(&new, &opts)
                .await
                .map_err(|e| format!("adding partitions to parked topics: {e}"))?;
            for r in results {
                match r {
                    Ok(t) => {
                        tracing::info!(topic = %t, "grew parked topic to its source topic's partitions")
                    }
                    Err((t, e)) => return Err(format!("adding partitions to {t}: {e}")),
                }
            }
        }
    }
    Ok(())
}

/// The tier partitions the local retry consumer owns, per tier index.
#[derive(Debug, Default)]
pub struct LocalTiers {
    parts: std::sync::RwLock<Vec<Vec<i32>>>,
}

impl LocalTiers {
    /// Replaces the assignment (partitions per tier index).
    pub fn set(&self, parts: Vec<Vec<i32>>) {
        *self.parts.write().unwrap_or_else(|p| p.into_inner()) = parts;
    }

    /// A local partition for this event: of `tier` if this instance consumes one, else of the first
    /// later tier it does, else of the nearest earlier one. Returns (tier, partition).
    fn pick(&self, tier: usize, webhook_id: &[u8]) -> Option<(usize, i32)> {
        let parts = self.parts.read().unwrap_or_else(|p| p.into_inner());
        // The wanted tier, else a later one, else an earlier one: any partition consumed here.
        let (t, local) = parts
            .iter()
            .enumerate()
            .skip(tier)
            .chain(parts.iter().enumerate().take(tier).rev())
            .find(|(_, v)| !v.is_empty())?;
        Some((t, local[spread(webhook_id, local.len() as i32) as usize]))
    }
}

/// The tier partition of an event: a stable hash of its `webhook-id` over `n` partitions.
fn spread(webhook_id: &[u8], n: i32) -> i32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    webhook_id.hash(&mut h);
    (h.finish() % n.max(1) as u64) as i32
}

/// Where the record came from: source topic, partition, offset and (when it had one) its timestamp.
/// Retry and dead-letter records carry these unchanged through every hop.
fn origin_headers(hs: OwnedHeaders, origin: &Origin) -> OwnedHeaders {
    let part = origin.partition.to_string();
    let off = origin.offset.to_string();
    let hs = hs
        .insert(Header {
            key: h::ORIGIN_TOPIC,
            value: Some(origin.topic.as_bytes()),
        })
        .insert(Header {
            key: h::ORIGIN_PARTITION,
            value: Some(part.as_bytes()),
        })
        .insert(Header {
            key: h::ORIGIN_OFFSET,
            value: Some(off.as_bytes()),
        });
    match origin.timestamp_ms {
        Some(ts) => hs.insert(Header {
            key: h::ORIGIN_TIMESTAMP_MS,
            value: Some(ts.to_string().as_bytes()),
        }),
        None => hs,
    }
}

/// Original headers (minus earlier `hookline-*`) plus this hop's headers. Origin and first-failure
/// headers always describe the first hop.
fn delivery_headers(
    f: &Failure<'_>,
    due_ms: Option<u64>,
    reason: Option<DlqReason>,
    failed: bool,
) -> OwnedHeaders {
    let e = f.event;
    let mut hs = OwnedHeaders::new_with_capacity(e.headers.len() + 12);
    for (k, v) in &e.headers {
        if !h::is_hookline_header(k) {
            hs = hs.insert(Header {
                key: k,
                value: Some(&v[..]),
            });
        }
    }
    let attempts = f.attempts.to_string();
    let first = f.first_failure_ms.to_string();
    let status = f.last.last_status();
    let err = f.last.last_error();
    hs = origin_headers(hs, &e.origin)
        .insert(Header {
            key: h::SUBSCRIPTION,
            value: Some(f.subscription_id.as_bytes()),
        })
        .insert(Header {
            key: h::ATTEMPT,
            value: Some(attempts.as_bytes()),
        });
    // An ordered event waiting behind its key has not failed (no attempt yet): no failure headers.
    if failed {
        hs = hs
            .insert(Header {
                key: h::FIRST_FAILURE_MS,
                value: Some(first.as_bytes()),
            })
            .insert(Header {
                key: h::LAST_STATUS,
                value: Some(status.as_bytes()),
            })
            .insert(Header {
                key: h::LAST_ERROR,
                value: Some(err.as_bytes()),
            });
    }
    if f.deferrals > 0 {
        let d = f.deferrals.to_string();
        hs = hs.insert(Header {
            key: h::DEFERRALS,
            value: Some(d.as_bytes()),
        });
    }
    if let Some(d) = due_ms {
        let d = d.to_string();
        hs = hs.insert(Header {
            key: h::DUE_MS,
            value: Some(d.as_bytes()),
        });
    }
    if let Some(r) = reason {
        hs = hs.insert(Header {
            key: h::DLQ_REASON,
            value: Some(r.as_str().as_bytes()),
        });
    }
    if let Some(k) = f.ordering_key {
        hs = hs.insert(Header {
            key: h::ORDERING_KEY,
            value: Some(k),
        });
    }
    hs
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn retries_spread_over_tier_partitions_stably() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let id = format!("evt-{i}");
            let p = spread(id.as_bytes(), 4);
            assert_eq!(p, spread(id.as_bytes(), 4), "stable per event");
            counts[p as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        assert_eq!(spread(b"x", 1), 0);
    }

    #[test]
    fn deferrals_pick_a_local_partition_of_the_first_tier_consumed_here() {
        let lt = super::LocalTiers::default();
        assert_eq!(lt.pick(0, b"e"), None);
        lt.set(vec![vec![], vec![3], vec![0, 1]]);
        assert_eq!(lt.pick(0, b"e"), Some((1, 3)));
        assert!(matches!(lt.pick(2, b"e"), Some((2, 0 | 1))));
        lt.set(vec![vec![2], vec![], vec![]]);
        assert_eq!(lt.pick(0, b"e"), Some((0, 2)));
        assert_eq!(
            lt.pick(1, b"e"),
            Some((0, 2)),
            "an earlier tier when no later one is local"
        );
        lt.set(vec![vec![], vec![], vec![]]);
        assert_eq!(lt.pick(1, b"e"), None);
    }
}
