//! Prometheus metrics (DESIGN §7), registered once. Hot-path code holds pre-resolved handles (plain atomics)
//! instead of looking up label sets per event.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    pub topic: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicReasonLabels {
    pub topic: String,
    pub reason: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    pub tier: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

/// kafka_exporter's labels for one partition of a consumer group.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupPartitionLabels {
    pub consumergroup: String,
    pub topic: String,
    pub partition: i32,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupTopicLabels {
    pub consumergroup: String,
    pub topic: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicPartitionLabels {
    pub topic: String,
    pub partition: i32,
}

type FloatGauge = Gauge<f64, AtomicU64>;

pub const ATTEMPT_RESULTS: [&str; 8] = [
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "timeout",
    "connect",
    "circuit_open",
    "rate_limited",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

pub struct Metrics {
    registry: Registry,
    pub events_consumed: Family<TopicLabel, Counter>,
    pub events_invalid: Family<TopicReasonLabels, Counter>,
    pub events_matched: Counter,
    pub events_unmatched: Counter,
    pub delivery_attempts: Family<ResultLabel, Counter>,
    pub delivered: Counter,
    pub retried: Counter,
    pub dead_lettered: Counter,
    pub retry_published: Family<TierLabel, Counter>,
    pub dlq_published: Family<ReasonLabel, Counter>,
    pub delivery_duration: Histogram,
    pub end_to_end: Histogram,
    pub in_flight: Gauge,
    pub endpoints: Family<StateLabel, Gauge>,
    pub concurrency_limit_sum: Gauge,
    pub endpoints_adapted_below_max: Gauge,
    pub tls_client_certs_expiring: Gauge,
    pub subscriptions_cached: Gauge,
    pub subscription_cache_age_seconds: Gauge<f64, AtomicU64>,
    attempts_by_result: Vec<Counter>,
    /// Consumer lag in records per assigned partition (high watermark - committed offset), kafka_exporter's
    /// name and labels. Each instance reports the partitions assigned to it.
    pub group_lag: Family<GroupPartitionLabels, Gauge>,
    pub group_lag_sum: Family<GroupTopicLabels, Gauge>,
    /// The group's committed offset per assigned partition (-1 when nothing was committed yet).
    pub group_offset: Family<GroupPartitionLabels, Gauge>,
    pub group_offset_sum: Family<GroupTopicLabels, Gauge>,
    /// Age of the oldest unfinished record per assigned partition (0 when none is unfinished).
    pub lag_seconds: Family<TopicPartitionLabels, FloatGauge>,
    /// Fixed delay of each retry tier topic, for alerts that compare a tier's time lag with its delay.
    pub tier_delay_seconds: Family<TopicLabel, FloatGauge>,
    /// 1 when `/readyz` would answer 200.
    pub ready: Gauge,
    /// 1 when the last subscription load from the store succeeded.
    pub store_reachable: Gauge,
    /// Attempt-log rows written to the store.
    pub attempt_log_written: Counter,
    /// Attempt-log rows dropped (buffer full, or the store failed the write).
    pub attempt_log_dropped: Counter,
    /// Subscriptions disabled because their endpoint answered 410 Gone.
    pub subscriptions_disabled_gone: Counter,
    /// Receipts acknowledged by Kafka (`[receipts] enabled`).
    pub receipts: Counter,
    /// Operational events published, by kind; and dropped after a minute of failed publishes.
    pub operational_events: Family<KindLabel, Counter>,
    pub operational_dropped: Counter,
    /// Attempt spans accepted by the OTLP collector, and dropped (queue full, collector down).
    pub spans_exported: Counter,
    pub spans_dropped: Counter,
    /// Deliveries handed to a tier without an attempt, by why (`partition_bound`, `commit_delay`).
    pub deferrals: Family<ReasonLabel, Counter>,
    /// Per assigned partition: how long its oldest unfinished record has held the commit (0 when none).
    pub commit_delay_seconds: Family<TopicPartitionLabels, FloatGauge>,
    /// Ordered delivery: times a key parked; keys parked on this instance; age of the oldest.
    pub parked: Counter,
    pub parked_keys: Gauge,
    pub parked_oldest_age_seconds: FloatGauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let events_consumed = Family::<TopicLabel, Counter>::default();
        r.register(
            "hookline_events_consumed",
            "Records read from source topics",
            events_consumed.clone(),
        );
        let events_invalid = Family::<TopicReasonLabels, Counter>::default();
        r.register(
            "hookline_events_invalid",
            "Records that could not be decoded (dead-lettered as invalid_event)",
            events_invalid.clone(),
        );
        let events_matched = Counter::default();
        r.register(
            "hookline_events_matched",
            "Events that matched at least one subscription",
            events_matched.clone(),
        );
        let events_unmatched = Counter::default();
        r.register(
            "hookline_events_unmatched",
            "Events that matched no subscription",
            events_unmatched.clone(),
        );
        let delivery_attempts = Family::<ResultLabel, Counter>::default();
        r.register(
            "hookline_delivery_attempts",
            "HTTP delivery attempts by result",
            delivery_attempts.clone(),
        );
        let deliveries = Family::<OutcomeLabel, Counter>::default();
        r.register(
            "hookline_deliveries",
            "Deliveries (event x subscription) finished by outcome of this instance's attempt",
            deliveries.clone(),
        );
        let retry_published = Family::<TierLabel, Counter>::default();
        r.register(
            "hookline_retry_published",
            "Records published to a retry tier",
            retry_published.clone(),
        );
        let dlq_published = Family::<ReasonLabel, Counter>::default();
        r.register(
            "hookline_dlq_published",
            "Records published to the dead-letter topic",
            dlq_published.clone(),
        );
        let delivery_duration = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ]);
        r.register(
            "hookline_delivery_duration_seconds",
            "Duration of one HTTP attempt",
            delivery_duration.clone(),
        );
        let end_to_end = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 300.0, 1800.0, 7200.0, 86400.0,
        ]);
        r.register(
            "hookline_end_to_end_seconds",
            "Record timestamp to successful delivery",
            end_to_end.clone(),
        );
        let in_flight = Gauge::default();
        r.register(
            "hookline_in_flight_deliveries",
            "Deliveries currently in progress",
            in_flight.clone(),
        );
        let endpoints = Family::<StateLabel, Gauge>::default();
        r.register(
            "hookline_endpoints",
            "Endpoints by circuit breaker state",
            endpoints.clone(),
        );
        let concurrency_limit_sum = Gauge::default();
        r.register(
            "hookline_concurrency_limit_sum",
            "Sum over cached endpoints of the requests each may have out at once on this instance (adaptive limit, or max_in_flight scaled by the instance's share)",
            concurrency_limit_sum.clone(),
        );
        let endpoints_adapted_below_max = Gauge::default();
        r.register(
            "hookline_endpoints_adapted_below_max",
            "Endpoints whose adaptive concurrency limit is below their max_in_flight (they answer slower or fail under more)",
            endpoints_adapted_below_max.clone(),
        );
        let tls_client_certs_expiring = Gauge::default();
        r.register(
            "hookline_tls_client_certs_expiring",
            "Cached subscriptions whose mutual-TLS client certificate expires within 14 days (or has expired)",
            tls_client_certs_expiring.clone(),
        );
        let subscriptions_cached = Gauge::default();
        r.register(
            "hookline_subscriptions_cached",
            "Enabled subscriptions in the cache",
            subscriptions_cached.clone(),
        );
        let subscription_cache_age_seconds = Gauge::<f64, AtomicU64>::default();
        r.register(
            "hookline_subscription_cache_age_seconds",
            "Seconds since the subscription cache was last loaded successfully",
            subscription_cache_age_seconds.clone(),
        );
        let group_lag = Family::<GroupPartitionLabels, Gauge>::default();
        r.register(
            "kafka_consumergroup_lag",
            "Records not yet committed by the group (high watermark - committed offset) per partition assigned to this instance",
            group_lag.clone(),
        );
        let group_lag_sum = Family::<GroupTopicLabels, Gauge>::default();
        r.register(
            "kafka_consumergroup_lag_sum",
            "kafka_consumergroup_lag summed over the topic's partitions assigned to this instance",
            group_lag_sum.clone(),
        );
        let group_offset = Family::<GroupPartitionLabels, Gauge>::default();
        r.register(
            "kafka_consumergroup_current_offset",
            "The group's committed offset per partition assigned to this instance (-1: none yet)",
            group_offset.clone(),
        );
        let group_offset_sum = Family::<GroupTopicLabels, Gauge>::default();
        r.register(
            "kafka_consumergroup_current_offset_sum",
            "kafka_consumergroup_current_offset summed over the topic's partitions assigned to this instance",
            group_offset_sum.clone(),
        );
        let lag_seconds = Family::<TopicPartitionLabels, FloatGauge>::default();
        r.register(
            "hookline_consumer_lag_seconds",
            "Age of the oldest unfinished record per assigned partition (retry tiers: includes the tier delay)",
            lag_seconds.clone(),
        );
        let tier_delay_seconds = Family::<TopicLabel, FloatGauge>::default();
        r.register(
            "hookline_retry_tier_delay_seconds",
            "Configured delay of each retry tier topic",
            tier_delay_seconds.clone(),
        );
        let ready = Gauge::default();
        r.register(
            "hookline_ready",
            "1 when ready: both consumers joined their groups, subscriptions loaded, store reachable",
            ready.clone(),
        );
        let store_reachable = Gauge::default();
        r.register(
            "hookline_store_reachable",
            "1 when the last subscription load from the store succeeded",
            store_reachable.clone(),
        );
        let attempt_log_written = Counter::default();
        r.register(
            "hookline_attempt_log_written",
            "Delivery-attempt rows written to the store",
            attempt_log_written.clone(),
        );
        let attempt_log_dropped = Counter::default();
        r.register(
            "hookline_attempt_log_dropped",
            "Delivery-attempt rows dropped because the buffer was full or the store failed the write",
            attempt_log_dropped.clone(),
        );
        let spans_exported = Counter::default();
        r.register(
            "hookline_trace_spans_exported",
            "Attempt spans accepted by the OTLP collector",
            spans_exported.clone(),
        );
        let spans_dropped = Counter::default();
        r.register(
            "hookline_trace_spans_dropped",
            "Attempt spans dropped: export queue full, collector down or refusing",
            spans_dropped.clone(),
        );
        let operational_events = Family::<KindLabel, Counter>::default();
        r.register(
            "hookline_operational_events",
            "Operational events published to <prefix>.events, by kind",
            operational_events.clone(),
        );
        let operational_dropped = Counter::default();
        r.register(
            "hookline_operational_events_dropped",
            "Operational events dropped after a minute of failed publishes",
            operational_dropped.clone(),
        );
        let receipts = Counter::default();
        r.register(
            "hookline_receipts_published",
            "Delivery receipts (one per terminal outcome) acknowledged by Kafka",
            receipts.clone(),
        );
        let subscriptions_disabled_gone = Counter::default();
        r.register(
            "hookline_subscriptions_disabled_gone",
            "Subscriptions disabled because their endpoint answered 410 Gone",
            subscriptions_disabled_gone.clone(),
        );
        let deferrals = Family::<ReasonLabel, Counter>::default();
        r.register(
            "hookline_deferrals",
            "Deliveries handed to a retry tier without an attempt because they blocked their partition",
            deferrals.clone(),
        );
        let parked = Counter::default();
        r.register(
            "hookline_ordered_parked",
            "Times an ordered key parked (its event failed, was deferred, or was held after a dead letter)",
            parked.clone(),
        );
        let parked_keys = Gauge::default();
        r.register(
            "hookline_parked_keys",
            "Ordered keys parked in the partitions this instance owns",
            parked_keys.clone(),
        );
        let parked_oldest_age_seconds = FloatGauge::default();
        r.register(
            "hookline_parked_oldest_age_seconds",
            "Seconds since the longest-parked key of this instance parked (0 when none)",
            parked_oldest_age_seconds.clone(),
        );
        let commit_delay_seconds = Family::<TopicPartitionLabels, FloatGauge>::default();
        r.register(
            "hookline_commit_delay_seconds",
            "How long the oldest unfinished record of each assigned partition has held its commit",
            commit_delay_seconds.clone(),
        );
        for reason in ["partition_bound", "commit_delay"] {
            let _ = deferrals.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
        }
        // Make every documented series exist from the start (a zero is information; absence is not).
        let attempts_by_result = ATTEMPT_RESULTS
            .iter()
            .map(|l| {
                delivery_attempts
                    .get_or_create(&ResultLabel {
                        result: (*l).into(),
                    })
                    .clone()
            })
            .collect();
        let outcome = |o: &str| {
            deliveries
                .get_or_create(&OutcomeLabel { outcome: o.into() })
                .clone()
        };
        let (delivered, retried, dead_lettered) = (
            outcome("delivered"),
            outcome("retried"),
            outcome("dead_lettered"),
        );
        for s in ["closed", "open", "half_open"] {
            let _ = endpoints.get_or_create(&StateLabel { state: s.into() });
        }
        for reason in ["exhausted", "rejected", "gone", "invalid_event", "skipped"] {
            let _ = dlq_published.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
        }
        Metrics {
            registry: r,
            deferrals,
            commit_delay_seconds,
            parked,
            parked_keys,
            parked_oldest_age_seconds,
            attempt_log_written,
            attempt_log_dropped,
            subscriptions_disabled_gone,
            receipts,
            operational_events,
            operational_dropped,
            spans_exported,
            spans_dropped,
            events_consumed,
            events_invalid,
            events_matched,
            events_unmatched,
            delivery_attempts,
            delivered,
            retried,
            dead_lettered,
            retry_published,
            dlq_published,
            delivery_duration,
            end_to_end,
            in_flight,
            endpoints,
            concurrency_limit_sum,
            endpoints_adapted_below_max,
            tls_client_certs_expiring,
            subscriptions_cached,
            subscription_cache_age_seconds,
            attempts_by_result,
            group_lag,
            group_lag_sum,
            group_offset,
            group_offset_sum,
            lag_seconds,
            tier_delay_seconds,
            ready,
            store_reachable,
        }
    }

    /// The pre-resolved attempt counter for a result label.
    pub fn attempt(&self, label: &str) -> &Counter {
        let i = ATTEMPT_RESULTS
            .iter()
            .position(|l| *l == label)
            .unwrap_or(5);
        &self.attempts_by_result[i]
    }

    pub fn endpoint_state(&self, state: &str) -> Gauge {
        self.endpoints.get_or_create_owned(&StateLabel {
            state: state.into(),
        })
    }

    pub fn consumed_for(&self, topic: &str) -> Counter {
        self.events_consumed
            .get_or_create(&TopicLabel {
                topic: topic.into(),
            })
            .clone()
    }

    /// Creates the `hookline_events_invalid_total` series of a source topic, one per reason, at zero.
    pub fn invalid_reasons_for(&self, topic: &str) {
        for reason in crate::decode::INVALID_REASONS {
            let _ = self.events_invalid.get_or_create(&TopicReasonLabels {
                topic: topic.into(),
                reason: reason.into(),
            });
        }
    }

    pub fn tier_counter(&self, tier: &str) -> Counter {
        self.retry_published
            .get_or_create(&TierLabel { tier: tier.into() })
            .clone()
    }

    pub fn operational_event(&self, kind: &str) -> Counter {
        self.operational_events
            .get_or_create(&KindLabel { kind: kind.into() })
            .clone()
    }

    pub fn dlq_counter(&self, reason: &str) -> Counter {
        self.dlq_published
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .clone()
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
