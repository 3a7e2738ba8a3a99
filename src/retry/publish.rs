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
use crate::config::Config;
use crate::deliver::outcome::{AttemptResult, truncate};
use crate::metrics::Metrics;
use crate::model::{Event, Origin};

/// Dead-letter reasons (`hookline-dlq-reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqReason {
    Exhausted,
    Rejected,
    Gone,
    InvalidEvent,
}

impl DlqReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DlqReason::Exhausted => "exhausted",
            DlqReason::Rejected => "rejected",
            DlqReason::Gone => "gone",
            DlqReason::InvalidEvent => "invalid_event",
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
}

pub struct Publisher {
    producer: FutureProducer,
    pub topics: Topics,
    metrics: Arc<Metrics>,
    tier_counters: Vec<prometheus_client::metrics::counter::Counter>,
}

pub fn producer_config(config: &Config) -> ClientConfig {
    config.kafka_client(
        &[("linger.ms", "50"), ("client.id", "hookline-retry")],
        &[("enable.idempotence", "true"), ("acks", "all")],
    )
}

impl Publisher {
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<Publisher, rdkafka::error::KafkaError> {
        let topics = Topics::new(&config.retry.topic_prefix, &config.retry.tiers);
        let producer: FutureProducer = producer_config(config).create()?;
        let tier_counters = config
            .retry
            .tiers
            .iter()
            .map(|t| metrics.tier_counter(t))
            .collect();
        Ok(Publisher {
            producer,
            topics,
            metrics,
            tier_counters,
        })
    }

    /// Creates the retry and dead-letter topics that do not exist yet.
    pub async fn ensure_topics(&self, config: &Config) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> = config
            .kafka_client(&[("client.id", "hookline-admin")], &[])
            .create()
            .map_err(|e| format!("admin client: {e}"))?;
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

    /// Hands a failed delivery to retry tier `tier`, due at `due_ms`.
    pub async fn publish_retry(&self, f: &Failure<'_>, tier: usize, due_ms: u64) {
        let headers = delivery_headers(f, Some(due_ms), None);
        self.send(
            &self.topics.tiers[tier],
            Some(f.subscription_id.as_bytes()),
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
        let headers = delivery_headers(f, Some(crate::matching::cache::now_ms()), Some(reason));
        self.send(
            &self.topics.dlq,
            Some(f.subscription_id.as_bytes()),
            &f.event.body,
            headers,
        )
        .await;
        self.metrics.dlq_counter(reason.as_str()).inc();
        self.metrics.dead_lettered.inc();
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
        let mut hs = OwnedHeaders::new_with_capacity(original.len() + 6);
        for (k, v) in original {
            if !h::is_hookline_header(k) {
                hs = hs.insert(Header {
                    key: k,
                    value: v.as_deref(),
                });
            }
        }
        let now = crate::matching::cache::now_ms().to_string();
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
        self.send(&self.topics.dlq, key, value, hs).await;
        self.metrics
            .dlq_counter(DlqReason::InvalidEvent.as_str())
            .inc();
    }

    async fn send(&self, topic: &str, key: Option<&[u8]>, value: &[u8], headers: OwnedHeaders) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut rec = FutureRecord::<[u8], [u8]>::to(topic)
                .payload(value)
                .headers(headers.clone());
            if let Some(k) = key {
                rec = rec.key(k);
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
    }
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
        })
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
    hs
}
