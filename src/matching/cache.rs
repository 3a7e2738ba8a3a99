//! The subscription cache: the current [`Index`], loaded from the store at start and refreshed periodically.
//! Readers take a lock-free snapshot (`ArcSwap`); a failed refresh keeps the last good index.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::Index;
use crate::metrics::Metrics;
use crate::model::{Defaults, SpecError, Subscription};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("subscription {id}: {err}")]
    Spec { id: uuid::Uuid, err: SpecError },
}

pub struct Cache {
    index: ArcSwap<Index>,
    defaults: Defaults,
    /// Epoch ms of the last successful load (0 = never).
    loaded_at_ms: AtomicU64,
    healthy: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Cache {
    pub fn new(defaults: Defaults, metrics: Arc<Metrics>) -> Self {
        Self {
            index: ArcSwap::from_pointee(Index::default()),
            defaults,
            loaded_at_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(false),
            metrics,
        }
    }

    /// The current index snapshot.
    pub fn index(&self) -> arc_swap::Guard<Arc<Index>> {
        self.index.load()
    }

    pub fn loaded(&self) -> bool {
        self.loaded_at_ms.load(Ordering::Relaxed) > 0
    }

    /// Whether the last refresh succeeded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Loads every subscription from the store and swaps the index. Unchanged subscriptions keep their
    /// prepared form. On error the previous index stays in place.
    pub async fn refresh(&self, store: &dyn Store) -> Result<usize, LoadError> {
        let result = self.load(store).await;
        self.healthy.store(result.is_ok(), Ordering::Relaxed);
        result
    }

    async fn load(&self, store: &dyn Store) -> Result<usize, LoadError> {
        let specs = store.list().await?;
        let old = self.index.load();
        let previous: HashMap<uuid::Uuid, &Arc<Subscription>> =
            old.subscriptions().iter().map(|s| (s.id, s)).collect();
        let mut subs = Vec::with_capacity(specs.len());
        for spec in specs {
            let prev = previous.get(&spec.id);
            if let Some(p) = prev
                && p.spec == spec
            {
                subs.push(Arc::clone(p));
                continue;
            }
            let id = spec.id;
            let sub = Subscription::prepare(spec, &self.defaults)
                .map_err(|err| LoadError::Spec { id, err })?;
            // An edited subscription keeps its breaker state (its limits start afresh).
            if let Some(p) = prev {
                sub.endpoint.inherit(&p.endpoint);
            }
            subs.push(Arc::new(sub));
        }
        let index = Index::build(subs);
        let n = index.len();
        self.index.store(Arc::new(index));
        self.loaded_at_ms.store(now_ms(), Ordering::Relaxed);
        self.metrics.subscriptions_cached.set(n as i64);
        Ok(n)
    }

    /// Seconds since the last successful load.
    pub fn age_seconds(&self) -> f64 {
        let at = self.loaded_at_ms.load(Ordering::Relaxed);
        if at == 0 {
            return f64::INFINITY;
        }
        now_ms().saturating_sub(at) as f64 / 1000.0
    }

    /// Refreshes every `interval` until cancelled; failures are logged and the last good index kept.
    pub async fn run_refresh(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.refresh(store.as_ref()).await {
                Ok(n) => tracing::debug!(subscriptions = n, "subscription cache refreshed"),
                Err(e) => {
                    tracing::warn!(error = %e, "subscription refresh failed; keeping the last good cache")
                }
            }
            self.metrics
                .subscription_cache_age_seconds
                .set(self.age_seconds());
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
