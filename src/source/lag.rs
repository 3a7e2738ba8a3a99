//! Consumer lag for `/metrics` (DESIGN §7), in kafka_exporter's names so existing dashboards and alerts
//! work.
//!
//! Every `source.lag_interval` each consumer (the source role and the retry role, each with its own
//! group) asks the broker, for the partitions assigned to it, for the group's committed offsets (one
//! OffsetFetch) and the high watermarks (one ListOffsets per broker), off the async threads. Records lag
//! is `high watermark - committed`, so it counts what the group as a whole has not committed yet: records
//! in flight here, records not fetched yet, and finished records whose commit is pending. A partition the
//! group never committed counts from its low watermark (`auto.offset.reset = earliest` starts there) and
//! reports a committed offset of -1.
//!
//! Each instance reports only the partitions assigned to it; queries sum over instances. The broker is
//! asked instead of reading librdkafka's cached watermarks because those stop moving while a partition
//! is paused — exactly when lag matters.
//!
//! The time lag (`hookline_consumer_lag_seconds`, age of the oldest unfinished record) needs no broker:
//! the admin server computes it from the trackers at scrape time ([`super::SourceHandle::oldest_unfinished`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::{State, lock};
use crate::metrics::{GroupPartitionLabels, GroupTopicLabels, Metrics};

/// Offsets of one assigned partition as the broker reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub topic: Arc<str>,
    pub partition: i32,
    pub high: i64,
    /// The group's committed offset; `None` when the group never committed this partition.
    pub committed: Option<i64>,
    /// Low watermark; only asked for partitions without a committed offset.
    pub low: Option<i64>,
}

impl PartitionOffsets {
    /// Records the group has not committed yet.
    pub fn lag(&self) -> i64 {
        let from = self.committed.or(self.low).unwrap_or(0);
        (self.high - from).max(0)
    }

    /// The committed offset as kafka_exporter reports it (-1 when none).
    pub fn current_offset(&self) -> i64 {
        self.committed.unwrap_or(-1)
    }
}

/// Asks the broker for committed offsets and watermarks of `keys` (blocking).
pub fn query<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    keys: &[(Arc<str>, i32)],
    timeout: Duration,
) -> KafkaResult<Vec<PartitionOffsets>> {
    let mut tpl = TopicPartitionList::with_capacity(keys.len());
    let mut ends = TopicPartitionList::with_capacity(keys.len());
    for (t, p) in keys {
        tpl.add_partition(t, *p);
        // ListOffsets with timestamp -1 (`Offset::End`) answers the high watermark, one request per broker.
        ends.add_partition_offset(t, *p, Offset::End)?;
    }
    let committed = offsets_by_key(&consumer.committed_offsets(tpl, timeout)?);
    let highs = offsets_by_key(&consumer.offsets_for_times(ends, timeout)?);
    let mut starts = TopicPartitionList::new();
    for (t, p) in keys {
        if !committed.contains_key(&(t.to_string(), *p)) {
            starts.add_partition_offset(t, *p, Offset::Beginning)?;
        }
    }
    let lows = if starts.count() > 0 {
        offsets_by_key(&consumer.offsets_for_times(starts, timeout)?)
    } else {
        HashMap::new()
    };
    Ok(keys
        .iter()
        .filter_map(|(t, p)| {
            let k = (t.to_string(), *p);
            Some(PartitionOffsets {
                topic: t.clone(),
                partition: *p,
                high: highs.get(&k).copied()?,
                committed: committed.get(&k).copied(),
                low: lows.get(&k).copied(),
            })
        })
        .collect())
}

/// (topic, partition) → offset, for the partitions the broker answered with a concrete offset (not the
/// logical ones: unset, end, beginning).
fn offsets_by_key(tpl: &TopicPartitionList) -> HashMap<(String, i32), i64> {
    tpl.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) if e.error().is_ok() => {
                Some(((e.topic().to_string(), e.partition()), o))
            }
            _ => None,
        })
        .collect()
}

/// Writes samples into the kafka_exporter families and removes the series of partitions no longer
/// assigned here.
pub struct Reporter {
    group: String,
    metrics: Arc<Metrics>,
    partitions: HashSet<(Arc<str>, i32)>,
    topics: HashSet<Arc<str>>,
}

impl Reporter {
    pub fn new(group: String, metrics: Arc<Metrics>) -> Reporter {
        Reporter {
            group,
            metrics,
            partitions: HashSet::new(),
            topics: HashSet::new(),
        }
    }

    fn partition_labels(&self, topic: &str, partition: i32) -> GroupPartitionLabels {
        GroupPartitionLabels {
            consumergroup: self.group.clone(),
            topic: topic.to_string(),
            partition,
        }
    }

    fn topic_labels(&self, topic: &str) -> GroupTopicLabels {
        GroupTopicLabels {
            consumergroup: self.group.clone(),
            topic: topic.to_string(),
        }
    }

    pub fn publish(&mut self, samples: &[PartitionOffsets]) {
        let m = &self.metrics;
        let mut sums: HashMap<Arc<str>, (i64, i64)> = HashMap::new();
        let mut now = HashSet::with_capacity(samples.len());
        for s in samples {
            let labels = self.partition_labels(&s.topic, s.partition);
            m.group_lag.get_or_create(&labels).set(s.lag());
            m.group_offset
                .get_or_create(&labels)
                .set(s.current_offset());
            let sum = sums.entry(s.topic.clone()).or_default();
            sum.0 += s.lag();
            sum.1 += s.committed.unwrap_or(0);
            now.insert((s.topic.clone(), s.partition));
        }
        for (topic, (lag, offset)) in &sums {
            let labels = self.topic_labels(topic);
            m.group_lag_sum.get_or_create(&labels).set(*lag);
            m.group_offset_sum.get_or_create(&labels).set(*offset);
        }
        for (t, p) in self.partitions.difference(&now) {
            let labels = self.partition_labels(t, *p);
            m.group_lag.remove(&labels);
            m.group_offset.remove(&labels);
        }
        let topics: HashSet<Arc<str>> = sums.into_keys().collect();
        for t in self.topics.difference(&topics) {
            let labels = self.topic_labels(t);
            m.group_lag_sum.remove(&labels);
            m.group_offset_sum.remove(&labels);
        }
        self.partitions = now;
        self.topics = topics;
    }
}

/// Samples the lag of the partitions assigned to `consumer` every `every` until `stop`.
pub(super) async fn run<C, K>(
    consumer: Arc<K>,
    state: Arc<Mutex<State>>,
    mut reporter: Reporter,
    every: Duration,
    stop: CancellationToken,
) where
    C: ConsumerContext + 'static,
    K: Consumer<C> + Send + Sync + 'static,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Queries may take longer than the interval (the next tick waits); a busy broker is not an error.
    let timeout = Duration::from_secs(5);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let keys: Vec<(Arc<str>, i32)> = lock(&state).parts.keys().cloned().collect();
        if keys.is_empty() {
            reporter.publish(&[]);
            continue;
        }
        let c = consumer.clone();
        let mut query = tokio::task::spawn_blocking(move || query(c.as_ref(), &keys, timeout));
        let answer = tokio::select! {
            a = &mut query => a,
            _ = stop.cancelled() => {
                // The query holds the consumer: let it end (normally milliseconds) before the consumer
                // closes, but do not hold shutdown for a query against an unreachable broker.
                let _ = tokio::time::timeout(Duration::from_secs(1), query).await;
                return;
            }
        };
        match answer {
            Ok(Ok(samples)) => {
                if failing {
                    tracing::info!(group = %reporter.group, "consumer lag readable again");
                    failing = false;
                }
                reporter.publish(&samples);
            }
            // Keep the last values: dropping the series would resolve lag alerts while the broker is away.
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(group = %reporter.group, error = %e, "cannot read consumer lag from the broker; exporting the last values");
            }
            Ok(Err(e)) => {
                tracing::debug!(group = %reporter.group, error = %e, "consumer lag still unreadable")
            }
            Err(e) => tracing::error!(error = %e, "lag query task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(high: i64, committed: Option<i64>, low: Option<i64>) -> PartitionOffsets {
        PartitionOffsets {
            topic: Arc::from("t"),
            partition: 0,
            high,
            committed,
            low,
        }
    }

    #[test]
    fn lag_counts_from_the_commit_or_from_the_low_watermark() {
        assert_eq!(offsets(100, Some(60), None).lag(), 40);
        assert_eq!(offsets(100, Some(100), None).lag(), 0);
        // Never committed: the group would start at the low watermark.
        let fresh = offsets(100, None, Some(30));
        assert_eq!((fresh.lag(), fresh.current_offset()), (70, -1));
        // A commit above the watermark (topic truncated and re-created) never reports negative lag.
        assert_eq!(offsets(5, Some(9), None).lag(), 0);
    }

    fn text(m: &Metrics) -> String {
        m.encode()
    }

    #[test]
    fn reporter_sums_per_topic_and_drops_revoked_partitions() {
        let m = Arc::new(Metrics::new());
        let mut r = Reporter::new("g".into(), m.clone());
        let s = |t: &str, p: i32, high: i64, committed: Option<i64>| PartitionOffsets {
            topic: Arc::from(t),
            partition: p,
            high,
            committed,
            low: Some(0),
        };
        r.publish(&[
            s("a", 0, 10, Some(4)),
            s("a", 1, 7, Some(7)),
            s("b", 0, 3, None),
        ]);
        let out = text(&m);
        for line in [
            "kafka_consumergroup_lag{consumergroup=\"g\",topic=\"a\",partition=\"0\"} 6",
            "kafka_consumergroup_lag{consumergroup=\"g\",topic=\"a\",partition=\"1\"} 0",
            "kafka_consumergroup_lag_sum{consumergroup=\"g\",topic=\"a\"} 6",
            "kafka_consumergroup_lag_sum{consumergroup=\"g\",topic=\"b\"} 3",
            "kafka_consumergroup_current_offset{consumergroup=\"g\",topic=\"b\",partition=\"0\"} -1",
            "kafka_consumergroup_current_offset_sum{consumergroup=\"g\",topic=\"a\"} 11",
        ] {
            assert!(out.contains(line), "missing {line} in\n{out}");
        }
        // Partition a/1 and topic b move to another instance.
        r.publish(&[s("a", 0, 12, Some(12))]);
        let out = text(&m);
        assert!(out.contains("kafka_consumergroup_lag_sum{consumergroup=\"g\",topic=\"a\"} 0"));
        assert!(!out.contains("partition=\"1\""), "{out}");
        assert!(!out.contains("topic=\"b\""), "{out}");
    }
}
