//! Fan-out: one task per (event, subscription). Each task waits for the endpoint's concurrency permit,
//! makes the attempt, and settles the outcome: delivered, or handed to a retry tier / the dead-letter topic
//! (and acknowledged by Kafka) — only then is its share of the source record marked done.

use std::sync::Arc;
use std::time::Duration;

use crate::deliver::Deliverer;
use crate::deliver::outcome::{Next, Outcome, classify, next_tier};
use crate::matching::cache::now_ms;
use crate::metrics::Metrics;
use crate::model::{Event, Subscription};
use crate::retry::publish::{DlqReason, Failure, Publisher};
use crate::source::tracker::Completion;

pub struct Dispatcher {
    pub deliverer: Deliverer,
    pub publisher: Publisher,
    pub metrics: Arc<Metrics>,
    /// Tier delays, in order.
    pub tier_delays: Vec<Duration>,
}

impl Dispatcher {
    /// Starts the delivery of `event` to `sub`; `done` is completed when it is settled.
    pub fn dispatch(self: &Arc<Self>, event: Arc<Event>, sub: Arc<Subscription>, done: Completion) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.deliver(&event, &sub).await;
            done.done();
        });
    }

    async fn deliver(&self, event: &Event, sub: &Subscription) {
        let _permit = sub.concurrency.acquire().await;
        self.metrics.in_flight.inc();
        let span = tracing::debug_span!("delivery", event_id = %event.id, subscription = %sub.id_str, attempt = 1u32);
        let _enter = span.enter();
        let (result, took) = self.deliverer.attempt(event, sub).await;
        self.metrics.in_flight.dec();
        self.metrics.attempt(result.metric_label()).inc();
        self.metrics.delivery_duration.observe(took.as_secs_f64());
        match classify(&result) {
            Outcome::Delivered => {
                self.metrics.delivered.inc();
                if let Some(ts) = event.origin.timestamp_ms {
                    let age_ms = now_ms() as i64 - ts;
                    self.metrics
                        .end_to_end
                        .observe(age_ms.max(0) as f64 / 1000.0);
                }
                tracing::debug!(
                    status = result.last_status(),
                    took_ms = took.as_millis() as u64,
                    "delivered"
                );
            }
            outcome => {
                let failure = Failure {
                    event,
                    subscription: sub,
                    attempts: 1,
                    first_failure_ms: now_ms(),
                    last: &result,
                };
                tracing::debug!(status = result.last_status(), error = %result.last_error(), "attempt failed");
                match outcome {
                    Outcome::Retry { retry_after } => {
                        match next_tier(None, retry_after, &self.tier_delays) {
                            Next::Tier(t) => {
                                let due = now_ms() + self.tier_delays[t].as_millis() as u64;
                                self.publisher.publish_retry(&failure, t, due).await;
                            }
                            Next::DeadLetter => {
                                self.publisher
                                    .publish_dead(&failure, DlqReason::Exhausted)
                                    .await
                            }
                        }
                    }
                    Outcome::Gone => self.publisher.publish_dead(&failure, DlqReason::Gone).await,
                    _ => {
                        self.publisher
                            .publish_dead(&failure, DlqReason::Rejected)
                            .await
                    }
                }
            }
        }
    }
}
