//! Failure hand-off: re-publishing failed deliveries to the retry tier topics and the dead-letter topic
//! (DESIGN §5). A source record counts as done only once Kafka acknowledged its re-publish.

pub mod headers;
pub mod publish;
pub mod receipt;
pub mod tier;

/// The parked topic of source topic `topic` (ordered delivery, `order/`): `<prefix>.parked.<topic>`.
pub fn parked_topic(prefix: &str, topic: &str) -> String {
    format!("{prefix}.parked.{topic}")
}

/// The compacted topic where each instance publishes the state of the parked keys of the partitions
/// it owns (`<prefix>.parked-keys`), for a listing of the whole group's parked keys.
pub fn parked_keys_topic(prefix: &str) -> String {
    format!("{prefix}.parked-keys")
}

/// Topic names derived from the configured prefix and tiers.
#[derive(Debug, Clone)]
pub struct Topics {
    pub tiers: Vec<String>,
    pub dlq: String,
    /// `<prefix>.receipts`, when `[receipts] enabled`.
    pub receipts: Option<String>,
    /// `<prefix>.events` (operational events), when `[operational] enabled`.
    pub events: Option<String>,
}

impl Topics {
    pub fn new(prefix: &str, tier_names: &[String]) -> Topics {
        Topics {
            tiers: tier_names
                .iter()
                .map(|t| format!("{prefix}.retry.{t}"))
                .collect(),
            dlq: format!("{prefix}.dlq"),
            receipts: None,
            events: None,
        }
    }

    /// The same, with the operational events topic `<prefix>.events` when `enabled`.
    pub fn with_events(mut self, prefix: &str, enabled: bool) -> Topics {
        self.events = enabled.then(|| format!("{prefix}.events"));
        self
    }

    /// The same, with the receipts topic `<prefix>.receipts` when `enabled`.
    pub fn with_receipts(mut self, prefix: &str, enabled: bool) -> Topics {
        self.receipts = enabled.then(|| format!("{prefix}.receipts"));
        self
    }

    /// Every topic hookline writes (created at start when missing).
    pub fn all(&self) -> impl Iterator<Item = &str> {
        self.tiers
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(self.dlq.as_str()))
            .chain(self.receipts.as_deref())
            .chain(self.events.as_deref())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn topic_names() {
        let t = super::Topics::new("hookline", &["1m".into(), "5m".into()]);
        assert_eq!(t.tiers, vec!["hookline.retry.1m", "hookline.retry.5m"]);
        assert_eq!(t.dlq, "hookline.dlq");
        assert_eq!(t.all().count(), 3);
        let t = t.with_receipts("hookline", true);
        assert_eq!(t.receipts.as_deref(), Some("hookline.receipts"));
        assert_eq!(t.all().last(), Some("hookline.receipts"));
    }
}
