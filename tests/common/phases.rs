//! The head-of-line method shared by the tests that compare a healthy phase with a faulty one: offer
//! the same steady load in each phase and time how long until the healthy endpoints have all of it,
//! while sampling the longest commit hold of any partition.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Broker, Receiver, Record, http, ids, plain_event};

/// Offers events `first..first + rate * secs` to `topic` (spread over `partitions`) at `rate` per
/// second in tenths of a second, then waits until every receiver in `healthy` acknowledged all of
/// them. Returns the time from the first produce to the last acknowledgement.
pub async fn offer_phase(
    broker: &Broker,
    topic: &str,
    partitions: usize,
    first: usize,
    rate: usize,
    secs: usize,
    healthy: &[Receiver],
) -> Duration {
    let start = Instant::now();
    for tick in 0..secs * 10 {
        let from = first + tick * rate / 10;
        let batch: Vec<Record> = (from..from + rate / 10)
            .map(|i| {
                Record::json(
                    (i % partitions) as i32,
                    plain_event(i, "order.created", None),
                )
            })
            .collect();
        broker.produce(topic, &batch).await;
        let next = start + Duration::from_millis(100 * (tick as u64 + 1));
        tokio::time::sleep_until(next.into()).await;
    }
    let want = ids(first..first + rate * secs);
    for r in healthy {
        r.wait_acked(&want, Duration::from_secs(60)).await;
    }
    start.elapsed()
}

/// Samples `hookline_commit_delay_seconds` (every partition) from an admin address until stopped;
/// [`CommitDelaySampler::stop`] returns the largest value seen.
pub struct CommitDelaySampler {
    running: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<f64>,
}

impl CommitDelaySampler {
    pub fn start(admin: std::net::SocketAddr) -> CommitDelaySampler {
        let running = Arc::new(AtomicBool::new(true));
        let r = running.clone();
        let task = tokio::spawn(async move {
            let mut max = 0.0f64;
            while r.load(Ordering::Relaxed) {
                if let Ok(resp) = http().get(format!("http://{admin}/metrics")).send().await
                    && let Ok(text) = resp.text().await
                {
                    for l in text
                        .lines()
                        .filter(|l| l.starts_with("hookline_commit_delay_seconds{"))
                    {
                        let v: f64 = l
                            .rsplit(' ')
                            .next()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0.0);
                        max = max.max(v);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            max
        });
        CommitDelaySampler { running, task }
    }

    pub async fn stop(self) -> f64 {
        self.running.store(false, Ordering::Relaxed);
        self.task.await.unwrap_or(f64::MAX)
    }
}
