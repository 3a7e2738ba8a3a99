//! Fan-out: one task per (event, subscription). Each task asks the subscription's endpoint for a slot
//! (queue bound, concurrency, breaker, rate limit — see [`crate::deliver::endpoint`]), makes the attempt,
//! and settles the outcome: delivered, or handed to a retry tier / the dead-letter topic (and acknowledged
//! by Kafka) — only then is its share of the record marked done. Source records and due retry records
//! both come through here; a retry record carries what happened before in [`Prior`].

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::clock::now_ms;
use crate::completion::Completion;
use crate::deliver::Deliverer;
use crate::deliver::breaker::BreakerState;
use crate::deliver::endpoint::NotNow;
use crate::deliver::outcome::{
    AttemptResult, Next, Outcome, classify, healthy, jittered, next_tier,
};
use crate::matching::Subscription;
use crate::metrics::Metrics;
use crate::model::{Event, Prior};
use crate::registry::Registry;
use crate::retry::publish::{DlqReason, Failure, Publisher};
use crate::retry::receipt::{Ack, Receipt, Terminal};
use crate::spill::Spill;
use crate::store::AttemptRecord;
use crate::store::attempts::AttemptLog;

pub struct Dispatcher {
    pub deliverer: Arc<Deliverer>,
    pub publisher: Publisher,
    pub metrics: Arc<Metrics>,
    /// Tier delays, in order.
    pub tier_delays: Vec<Duration>,
    /// `retry.jitter`.
    pub jitter: f64,
    /// `delivery.max_deferrals`.
    pub max_deferrals: u32,
    /// Where attempt records go (a no-op for read-only stores).
    pub attempt_log: AttemptLog,
    /// Writes to the subscriptions (a 410 disables the subscription); `None` in tools and benchmarks.
    pub registry: Option<Arc<Registry>>,
    /// Attempt spans over OTLP (`[tracing] otlp_endpoint`).
    pub tracer: Option<Arc<crate::otlp::Tracer>>,
    /// Operational events (`[operational] enabled`): `message.exhausted` from here.
    pub reporter: Option<Arc<crate::operational::Reporter>>,
    /// `delivery.disable_after` (zero: never).
    pub disable_after: Duration,
}

impl Dispatcher {
    /// Starts the delivery of `event` to `sub`; `done` is completed when it is settled. `spill` tells
    /// the delivery, while it waits for its endpoint, that it blocks its partition.
    pub fn dispatch(
        self: &Arc<Self>,
        event: Arc<Event>,
        sub: Arc<Subscription>,
        prior: Prior,
        done: Completion,
        mut spill: Spill,
    ) {
        let this = Arc::clone(self);
        // One span per delivery: every line logged while delivering (here, in the HTTP client, in the
        // publisher) carries the event id, the subscription and the attempt number. The span is attached
        // to the task, not entered across awaits. Disabled (no cost beyond a level check) below debug.
        let span = tracing::debug_span!("delivery", event_id = %event.id, subscription = %sub.id_str, attempt = prior.attempts + 1);
        tokio::spawn(
            async move {
                if let Some(done) = this.deliver(&event, &sub, prior, &mut spill, done).await {
                    done.done();
                }
            }
            .instrument(span),
        );
    }

    /// One attempt and its settlement (unordered deliveries). The delivered case is written out here
    /// rather than through [`Dispatcher::delivered`] (which ordered delivery uses): settling through
    /// the nested helper futures measured ~10 % more CPU per delivery (bench, ratio to the previous
    /// build 0.88-0.90; 0.99 as written here). Returns `done` unless a receipt took it over (it is
    /// settled when Kafka acknowledges the receipt).
    async fn deliver(
        &self,
        event: &Event,
        sub: &Subscription,
        prior: Prior,
        spill: &mut Spill,
        done: Completion,
    ) -> Option<Completion> {
        let attempt_no = prior.attempts + 1;
        let Attempted {
            result,
            outcome,
            took,
            started_ms,
        } = self.attempt(event, sub, prior, spill).await;
        if outcome == Outcome::Delivered {
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
            if self.publisher.receipts() {
                self.publisher
                    .publish_receipt_then(
                        &Receipt {
                            event,
                            subscription_id: &sub.id_str,
                            tenant: sub.tenant.as_deref(),
                            outcome: Terminal::Delivered,
                            attempts: attempt_no,
                            first_attempt_ms: prior.first_failure_ms.unwrap_or(started_ms),
                            last_attempt_ms: now_ms(),
                            last_status: result.last_status(),
                        },
                        Ack::Record(done),
                    )
                    .await;
                return None;
            }
            return Some(done);
        }
        // A delivery deferred `max_deferrals` times already counts this one as an attempt: deferrals
        // cost no attempt, but they must not cycle without end.
        let spilled = matches!(result, AttemptResult::Deferred(_));
        let deferred = spilled && prior.deferrals < self.max_deferrals;
        let failure = Failure {
            event,
            subscription_id: &sub.id_str,
            attempts: if deferred { prior.attempts } else { attempt_no },
            deferrals: prior.deferrals + u32::from(spilled),
            first_failure_ms: prior.first_failure_ms.unwrap_or_else(now_ms),
            last: &result,
            ordering_key: None,
        };
        tracing::debug!(status = result.last_status(), error = %result.last_error(), "not delivered");
        let dead = match outcome {
            // A deferral goes to the first tier whose delay covers the endpoint's expected wait (a
            // rate-limited backlog then comes back about when it can be sent, instead of cycling
            // through the first tier again and again).
            Outcome::Retry { .. } if deferred => {
                let tier = deferral_tier(sub.endpoint.expected_wait(), &self.tier_delays);
                self.to_tier(&failure, tier, true).await;
                None
            }
            Outcome::Retry { retry_after } => {
                match next_tier(failure.attempts, retry_after, &self.tier_delays, &sub.retry) {
                    Next::Tier(t) => {
                        self.to_tier(&failure, t, false).await;
                        None
                    }
                    Next::DeadLetter => Some(DlqReason::Exhausted),
                }
            }
            // dead_letter disables the subscription.
            Outcome::Gone => Some(DlqReason::Gone),
            Outcome::Rejected | Outcome::Delivered => Some(DlqReason::Rejected),
        };
        if let Some(reason) = dead {
            self.dead_letter(&failure, sub, reason).await;
        }
        Some(done)
    }

    /// One attempt (admission, request, breaker, metrics, attempt log, failing streak); settles nothing.
    pub async fn attempt(
        &self,
        event: &Event,
        sub: &Subscription,
        prior: Prior,
        spill: &mut Spill,
    ) -> Attempted {
        let attempt_no = prior.attempts + 1;
        let started_ms = if self.attempt_log.enabled() || self.publisher.receipts() {
            now_ms()
        } else {
            0
        };
        let (result, took) = match sub.endpoint.admit(spill).await {
            Ok(slot) => {
                // A sampled record trace gets a span for this attempt; the request then names it as
                // the receiver's parent.
                let span = self.tracer.as_ref().and_then(|_| {
                    let (parent, state) = crate::deliver::trace::of_event(event)?;
                    crate::otlp::begin(parent, state)
                });
                self.metrics.in_flight.inc();
                let (result, took, _) = self
                    .deliverer
                    .attempt_as(
                        event,
                        &sub.recipient,
                        0,
                        span.as_ref().map(|s| &s.traceparent[..]),
                    )
                    .await;
                self.metrics.in_flight.dec();
                if let (Some(t), Some(s)) = (&self.tracer, span) {
                    let outcome = classify(&result);
                    let status = match result {
                        AttemptResult::Status { code, .. } => Some(code),
                        _ => None,
                    };
                    t.end(
                        s,
                        &sub.id_str,
                        attempt_no,
                        status,
                        log_result(&result, outcome),
                        outcome == Outcome::Delivered,
                    );
                }
                let changed = slot.finish(healthy(&result), took);
                match changed {
                    Some(BreakerState::Open) => {
                        tracing::warn!(subscription = %sub.id_str, "circuit breaker opened: endpoint failing; deliveries go to the retry tiers until it recovers")
                    }
                    Some(state) => {
                        tracing::info!(subscription = %sub.id_str, state = state.as_str(), "circuit breaker changed state")
                    }
                    None => {}
                }
                if let (Some(r), Some(state)) = (&self.reporter, changed)
                    && state != BreakerState::HalfOpen
                    && sub.id != crate::config::OPERATOR_SUBSCRIPTION
                {
                    r.breaker(
                        state == BreakerState::Open,
                        &sub.id_str,
                        sub.tenant.as_deref(),
                        sub.breaker_episodes.clone(),
                    );
                }
                self.metrics.delivery_duration.observe(took.as_secs_f64());
                (result, took)
            }
            Err(NotNow::CircuitOpen) => (AttemptResult::CircuitOpen, Duration::ZERO),
            Err(NotNow::Spilled(reason)) => {
                self.metrics
                    .deferrals
                    .get_or_create(&crate::metrics::ReasonLabel {
                        reason: reason.as_str().into(),
                    })
                    .inc();
                (AttemptResult::Deferred(reason), Duration::ZERO)
            }
        };
        self.metrics.attempt(result.metric_label()).inc();
        let outcome = classify(&result);
        // A deferral says nothing about the endpoint; every other outcome extends or ends its failing
        // streak, and a streak longer than delivery.disable_after disables the subscription. Without
        // disable_after the streak is not kept (no clock read, no shared write per delivery).
        if !self.disable_after.is_zero() && !matches!(result, AttemptResult::Deferred(_)) {
            let now = now_ms();
            let since = sub.endpoint.settled(outcome == Outcome::Delivered, now);
            if let (Some(since), Some(r)) = (since, &self.registry)
                && now.saturating_sub(since) >= self.disable_after.as_millis() as u64
            {
                r.disable_failing(sub.id, since);
            }
        }
        if self.attempt_log.enabled() {
            self.attempt_log.record(AttemptRecord {
                subscription_id: sub.id,
                at_ms: started_ms,
                event_id: event.id.to_string(),
                event_type: event.event_type.to_string(),
                attempt: attempt_no,
                result: log_result(&result, outcome).into(),
                status_code: match result {
                    AttemptResult::Status { code, .. } => Some(code),
                    _ => None,
                },
                duration_ms: took.as_millis().min(u32::MAX as u128) as u32,
                error: (outcome != Outcome::Delivered).then(|| result.last_error()),
            });
        }
        Attempted {
            result,
            outcome,
            took,
            started_ms,
        }
    }

    /// What to do after attempt `a`, and the delivery's history including it (attempts unchanged by
    /// a deferral, which costs none unless `max_deferrals` were spent).
    pub fn verdict(&self, sub: &Subscription, prior: Prior, a: &Attempted) -> (Verdict, Prior) {
        if a.outcome == Outcome::Delivered {
            return (Verdict::Delivered, prior);
        }
        let attempt_no = prior.attempts + 1;
        // A delivery deferred `max_deferrals` times already counts this one as an attempt: deferrals
        // cost no attempt, but they must not cycle without end.
        let spilled = matches!(a.result, AttemptResult::Deferred(_));
        let deferred = spilled && prior.deferrals < self.max_deferrals;
        let p = Prior {
            attempts: if deferred { prior.attempts } else { attempt_no },
            deferrals: prior.deferrals + u32::from(spilled),
            first_failure_ms: Some(prior.first_failure_ms.unwrap_or_else(now_ms)),
        };
        tracing::debug!(status = a.result.last_status(), error = %a.result.last_error(), "not delivered");
        let v = match a.outcome {
            // A deferral goes to the first tier whose delay covers the endpoint's expected wait (a
            // rate-limited backlog then comes back about when it can be sent, instead of cycling
            // through the first tier again and again).
            Outcome::Retry { .. } if deferred => Verdict::Tier {
                tier: deferral_tier(sub.endpoint.expected_wait(), &self.tier_delays),
                deferred: true,
            },
            Outcome::Retry { retry_after } => {
                match next_tier(p.attempts, retry_after, &self.tier_delays, &sub.retry) {
                    Next::Tier(t) => Verdict::Tier {
                        tier: t,
                        deferred: false,
                    },
                    Next::DeadLetter => Verdict::Dead(DlqReason::Exhausted),
                }
            }
            Outcome::Gone => Verdict::Dead(DlqReason::Gone),
            Outcome::Rejected | Outcome::Delivered => Verdict::Dead(DlqReason::Rejected),
        };
        (v, p)
    }

    /// The failure record of attempt `a` with history `p` (from [`Dispatcher::verdict`]).
    pub fn failure<'a>(
        &self,
        event: &'a Event,
        sub: &'a Subscription,
        p: Prior,
        a: &'a Attempted,
    ) -> Failure<'a> {
        Failure {
            event,
            subscription_id: &sub.id_str,
            attempts: p.attempts,
            deferrals: p.deferrals,
            first_failure_ms: p.first_failure_ms.unwrap_or_else(now_ms),
            last: &a.result,
            ordering_key: None,
        }
    }

    /// Settles a delivered attempt: metrics, end-to-end time, receipt.
    pub async fn delivered(&self, event: &Event, sub: &Subscription, prior: Prior, a: &Attempted) {
        let attempt_no = prior.attempts + 1;
        self.metrics.delivered.inc();
        if let Some(ts) = event.origin.timestamp_ms {
            let age_ms = now_ms() as i64 - ts;
            self.metrics
                .end_to_end
                .observe(age_ms.max(0) as f64 / 1000.0);
        }
        tracing::debug!(
            status = a.result.last_status(),
            took_ms = a.took.as_millis() as u64,
            "delivered"
        );
        if self.publisher.receipts() {
            self.publisher
                .publish_receipt(&Receipt {
                    event,
                    subscription_id: &sub.id_str,
                    tenant: sub.tenant.as_deref(),
                    outcome: Terminal::Delivered,
                    attempts: attempt_no,
                    first_attempt_ms: prior.first_failure_ms.unwrap_or(a.started_ms),
                    last_attempt_ms: now_ms(),
                    last_status: a.result.last_status(),
                })
                .await;
        }
    }

    /// Dead-letters a failed delivery (a 410 also disables the subscription), reports an exhausted
    /// message, and publishes the receipt; returns once Kafka acknowledged them.
    pub async fn dead_letter(&self, failure: &Failure<'_>, sub: &Subscription, reason: DlqReason) {
        if reason == DlqReason::Gone
            && let Some(r) = &self.registry
        {
            r.disable_gone(sub.id);
        }
        let event = failure.event;
        let result = failure.last;
        self.publisher.publish_dead(failure, reason).await;
        // The operator's own webhook reports nothing about itself (no loop of events about events).
        if let (DlqReason::Exhausted, Some(r), false) = (
            reason,
            &self.reporter,
            sub.id == crate::config::OPERATOR_SUBSCRIPTION,
        ) {
            r.report(
                crate::operational::Kind::MessageExhausted,
                format!(
                    "{}:{}",
                    sub.id_str,
                    event.webhook_id.to_str().unwrap_or_default()
                ),
                &sub.id_str,
                sub.tenant.as_deref(),
                serde_json::json!({
                    "event_id": &*event.id,
                    "event_type": &*event.event_type,
                    "attempts": failure.attempts,
                    "last_status": result.last_status(),
                    "last_error": result.last_error(),
                }),
            );
        }
        self.receipt_of_dead(failure, sub.tenant.as_deref(), reason)
            .await;
    }

    /// The due time (epoch ms) of a retry from tier `tier` made now (jittered like a tier record's).
    pub fn due_for(&self, tier: usize) -> u64 {
        let delay = jittered(self.tier_delays[tier], self.jitter, fastrand::f64());
        now_ms() + delay.as_millis() as u64
    }

    /// The receipt of a dead-lettered delivery (when receipts are on), after its dead-letter record.
    async fn receipt_of_dead(&self, f: &Failure<'_>, tenant: Option<&str>, reason: DlqReason) {
        if !self.publisher.receipts() {
            return;
        }
        self.publisher
            .publish_receipt(&Receipt {
                event: f.event,
                subscription_id: f.subscription_id,
                tenant,
                outcome: Terminal::DeadLettered(reason),
                attempts: f.attempts,
                first_attempt_ms: f.first_failure_ms,
                last_attempt_ms: now_ms(),
                last_status: f.last.last_status(),
            })
            .await;
    }

    /// Dead-letters a due retry record whose subscription was deleted or disabled meanwhile (reason
    /// `rejected`, so it can be replayed once the subscription is back), then marks it done.
    pub fn dead_letter_orphan(
        self: &Arc<Self>,
        event: Arc<Event>,
        subscription: uuid::Uuid,
        prior: Prior,
        done: Completion,
    ) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.dead_letter_orphaned(&event, subscription, prior, None)
                .await;
            done.done();
        });
    }

    /// The work of [`Dispatcher::dead_letter_orphan`], awaited: dead letter `rejected` (with the
    /// ordering key of an ordered event), then its receipt.
    pub async fn dead_letter_orphaned(
        &self,
        event: &Event,
        subscription: uuid::Uuid,
        prior: Prior,
        ordering_key: Option<&[u8]>,
    ) {
        let id = subscription.to_string();
        let last =
            AttemptResult::Refused(format!("subscription {id} no longer exists or is disabled"));
        tracing::info!(subscription = %id, event_id = %event.id, "retry for a missing or disabled subscription; dead-lettering");
        let failure = Failure::of(event, &id, prior, &last, ordering_key);
        self.publisher
            .publish_dead(&failure, DlqReason::Rejected)
            .await;
        self.receipt_of_dead(&failure, None, DlqReason::Rejected)
            .await;
    }

    async fn to_tier(&self, failure: &Failure<'_>, tier: usize, local: bool) {
        let due = self.due_for(tier);
        self.publisher
            .publish_retry(failure, tier, due, local)
            .await;
    }
}

/// One attempt's result, as [`Dispatcher::attempt`] returns it.
pub struct Attempted {
    pub result: AttemptResult,
    pub outcome: Outcome,
    pub took: Duration,
    /// Epoch ms when it started (0 unless the attempt log or receipts need it).
    pub started_ms: u64,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Retry from this tier (`deferred`: no attempt was spent; stay on this instance).
    Tier {
        tier: usize,
        deferred: bool,
    },
    Dead(DlqReason),
}

/// The attempt log's `result` for one attempt.
pub fn log_result(r: &AttemptResult, outcome: Outcome) -> &'static str {
    match (r, outcome) {
        (_, Outcome::Delivered) => "delivered",
        (_, Outcome::Gone) => "gone",
        (AttemptResult::Refused(_), _) => "refused",
        (_, Outcome::Rejected) => "rejected",
        (AttemptResult::Timeout, _) => "timeout",
        (AttemptResult::Connect(_), _) => "connect_error",
        (AttemptResult::Auth(_), _) => "auth_error",
        (AttemptResult::CircuitOpen, _) => "circuit_open",
        (AttemptResult::Deferred(_), _) => "deferred",
        (AttemptResult::Status { .. }, Outcome::Retry { .. }) => "failed",
    }
}

/// The tier for a deferral: the first whose delay is at least `wait`, else the last.
pub fn deferral_tier(wait: Duration, delays: &[Duration]) -> usize {
    delays
        .iter()
        .position(|d| *d >= wait)
        .unwrap_or(delays.len().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferrals_wait_about_as_long_as_the_endpoint_needs() {
        let d = [1, 2, 3].map(Duration::from_secs);
        assert_eq!(deferral_tier(Duration::ZERO, &d), 0);
        assert_eq!(deferral_tier(Duration::from_millis(1500), &d), 1);
        assert_eq!(deferral_tier(Duration::from_secs(2), &d), 1);
        assert_eq!(
            deferral_tier(Duration::from_secs(60), &d),
            2,
            "the last tier at most"
        );
    }
}
