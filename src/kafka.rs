//! Small Kafka helpers shared by the consumers, the publisher and the replay tool (plain functions over
//! rdkafka clients; no stage's state).

use std::time::Duration;

use rdkafka::ClientContext;

/// The partition ids of `topic` as the cluster's metadata has them (empty when the topic does not exist
/// or reports an error).
pub fn topic_partitions<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, rdkafka::error::KafkaError> {
    let md = client.fetch_metadata(Some(topic), timeout)?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default())
}
