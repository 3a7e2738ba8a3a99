//! The subscription cache: the current [`Index`], loaded from the store at start and refreshed periodically.
//! Readers take a lock-free snapshot (`ArcSwap`); a failed refresh keeps the last good index.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::now_ms;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::Index;
use super::{Defaults, Subscription};
use crate::metrics::Metrics;
use crate::model::{SpecError, SubscriptionSpec};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("subscription {id}: {err}")]
    Spec { id: uuid::Uuid, err: SpecError },
}

/// Told of an operator's change of a subscription's `enabled` (see [`Cache::on_toggle`]).
pub type ToggleObserver = Box<dyn Fn(&SubscriptionSpec) + Send + Sync>;

pub struct Cache {
    index: ArcSwap<Index>,
    defaults: Defaults,
    /// Epoch ms of the last successful load or revision check (0 = never loaded).
    loaded_at_ms: AtomicU64,
    /// Epoch ms of the last full load.
    full_at_ms: AtomicU64,
    healthy: AtomicBool,
    /// The store revision the index was loaded at.
    revision: std::sync::Mutex<Option<String>>,
    /// Serialises loads with direct updates, so a slow full load never overwrites a newer update.
    swap: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
    /// The operator's webhook (`[operational] webhook_url`): a subscription outside the store and the
    /// index, fed only by the operational events topic.
    operator: std::sync::OnceLock<Arc<Subscription>>,
    /// Ids of the store's disabled subscriptions at the last load or direct update: with the index (the
    /// enabled ones) they are what a load compares with to find the subscriptions whose `enabled` an
    /// operator changed.
    disabled: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
    /// Told of each such change (see [`Cache::on_toggle`]).
    toggled: std::sync::OnceLock<ToggleObserver>,
}

impl Cache {
    pub fn new(defaults: Defaults, metrics: Arc<Metrics>) -> Self {
        Self {
            index: ArcSwap::from_pointee(Index::default()),
            defaults,
            loaded_at_ms: AtomicU64::new(0),
            full_at_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(false),
            revision: std::sync::Mutex::new(None),
            swap: tokio::sync::Mutex::new(()),
            metrics,
            operator: std::sync::OnceLock::new(),
            disabled: std::sync::Mutex::default(),
            toggled: std::sync::OnceLock::new(),
        }
    }

    /// Calls `f` with the new version of every subscription whose `enabled` changed by an operator's
    /// hand — through the API, the CLI or any other writer of the store — as this instance sees it:
    /// at a direct update, or at the load that finds the store changed. (hookline's own disabling, for
    /// a 410 or `delivery.disable_after`, carries a `disabled_reason` and is reported where it happens.)
    /// Several instances see one change; `f` must make its report once per change itself. Changes
    /// made and undone between two loads are not seen. Set once, at start.
    pub fn on_toggle(&self, f: ToggleObserver) {
        let _ = self.toggled.set(f);
    }

    /// Reports `spec` to the toggle observer when its `enabled` differs from what this instance knew of
    /// it: in the index (`was_enabled`) or among the disabled ones (`was_disabled`).
    fn observe(&self, spec: &SubscriptionSpec, was_enabled: bool, was_disabled: bool) {
        let toggled = if spec.enabled {
            was_disabled
        } else {
            was_enabled && spec.disabled_reason.is_none()
        };
        if toggled && let Some(f) = self.toggled.get() {
            f(spec);
        }
    }

    /// Installs the operator's webhook subscription (once, at start).
    pub fn set_operator(&self, sub: Arc<Subscription>) {
        let _ = self.operator.set(sub);
    }

    /// The operator's webhook subscription, when configured.
    pub fn operator(&self) -> Option<&Arc<Subscription>> {
        self.operator.get()
    }

    /// A subscription by id: from the index, or the operator's webhook.
    pub fn subscription(&self, id: &uuid::Uuid) -> Option<Arc<Subscription>> {
        self.index
            .load()
            .get(id)
            .or_else(|| self.operator.get().filter(|o| o.id == *id).cloned())
    }

    /// The current index snapshot.
    pub fn index(&self) -> arc_swap::Guard<Arc<Index>> {
        self.index.load()
    }

    pub fn defaults(&self) -> &Defaults {
        &self.defaults
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

    /// One refresh tick: asks the store for its revision and reloads only when it moved (or when the last
    /// full load is older than `full_every`). Returns whether it reloaded.
    pub async fn poll(&self, store: &dyn Store, full_every: Duration) -> Result<bool, LoadError> {
        let rev = match bounded(store.revision()).await {
            Ok(r) => r,
            Err(e) => {
                self.healthy.store(false, Ordering::Relaxed);
                return Err(e.into());
            }
        };
        let current = rev.is_some() && *lock(&self.revision) == rev;
        let fresh = now_ms().saturating_sub(self.full_at_ms.load(Ordering::Relaxed))
            < full_every.as_millis() as u64;
        if current && fresh && self.loaded() {
            self.loaded_at_ms.store(now_ms(), Ordering::Relaxed);
            self.healthy.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        self.refresh(store).await.map(|_| true)
    }

    async fn load(&self, store: &dyn Store) -> Result<usize, LoadError> {
        let _swap = self.swap.lock().await;
        // Read the revision first: a write that lands during the listing moves it again, so the next poll
        // reloads.
        let rev = bounded(store.revision()).await?;
        let specs = bounded(store.list()).await?;
        let old = self.index.load();
        let previous: HashMap<uuid::Uuid, &Arc<Subscription>> =
            old.subscriptions().iter().map(|s| (s.id, s)).collect();
        let mut subs = Vec::with_capacity(specs.len());
        // The first load has nothing to compare with: it reports no change.
        let first = !self.loaded();
        let mut disabled = std::collections::HashSet::new();
        let mut known = lock(&self.disabled);
        for spec in specs {
            let prev = previous.get(&spec.id).copied();
            if !first {
                self.observe(&spec, prev.is_some(), known.contains(&spec.id));
            }
            if !spec.enabled {
                disabled.insert(spec.id);
                continue;
            }
            subs.push(self.prepared(spec, prev)?);
        }
        *known = disabled;
        drop(known);
        let n = self.install(Index::build(subs));
        *lock(&self.revision) = rev;
        let now = now_ms();
        self.loaded_at_ms.store(now, Ordering::Relaxed);
        self.full_at_ms.store(now, Ordering::Relaxed);
        Ok(n)
    }

    /// The prepared form of `spec`, reusing `prev` when nothing changed. An edited subscription keeps its
    /// breaker state (its limits start afresh) and, while its `oauth2` settings are the same, its token.
    fn prepared(
        &self,
        spec: SubscriptionSpec,
        prev: Option<&Arc<Subscription>>,
    ) -> Result<Arc<Subscription>, LoadError> {
        if let Some(p) = prev
            && p.spec == spec
        {
            return Ok(Arc::clone(p));
        }
        let id = spec.id;
        let mut sub = Subscription::prepare(spec, &self.defaults)
            .map_err(|err| LoadError::Spec { id, err })?;
        if let Some(p) = prev {
            sub.breaker_episodes = p.breaker_episodes.clone();
            sub.endpoint.inherit(&p.endpoint);
            sub.recipient.inherit(&p.recipient);
        }
        Ok(Arc::new(sub))
    }

    fn install(&self, index: Index) -> usize {
        let n = index.len();
        self.index.store(Arc::new(index));
        self.metrics.subscriptions_cached.set(n as i64);
        n
    }

    /// Applies a write made through this instance at once (the other instances see it at their next
    /// revision poll). A disabled spec leaves the index.
    ///
    /// The write reached the store before this call, so a load that ran in between may already hold a
    /// later write of another instance to the same subscription, under a revision that the next poll
    /// would take as current. So a direct update also forgets the revision: the next poll reloads, and
    /// this instance converges on the store's final state whatever the order of concurrent writers.
    pub async fn upsert(&self, spec: SubscriptionSpec) -> Result<(), LoadError> {
        let _swap = self.swap.lock().await;
        *lock(&self.revision) = None;
        let old = self.index.load();
        let prev = old.get(&spec.id);
        let id = spec.id;
        let was_disabled = {
            let mut known = lock(&self.disabled);
            if spec.enabled {
                known.remove(&id)
            } else {
                !known.insert(id)
            }
        };
        self.observe(&spec, prev.is_some(), was_disabled);
        let new = if spec.enabled {
            Some(self.prepared(spec, prev.as_ref())?)
        } else {
            None
        };
        let subs = old
            .subscriptions()
            .iter()
            .filter(|s| s.id != id)
            .cloned()
            .chain(new);
        self.install(Index::build(subs));
        Ok(())
    }

    /// Removes a deleted subscription at once (and, as [`Cache::upsert`], reloads at the next poll).
    pub async fn remove(&self, id: uuid::Uuid) {
        let _swap = self.swap.lock().await;
        *lock(&self.revision) = None;
        lock(&self.disabled).remove(&id);
        let old = self.index.load();
        if old.get(&id).is_none() {
            return;
        }
        self.install(Index::build(
            old.subscriptions().iter().filter(|s| s.id != id).cloned(),
        ));
    }

    /// Seconds since the last successful load.
    pub fn age_seconds(&self) -> f64 {
        let at = self.loaded_at_ms.load(Ordering::Relaxed);
        if at == 0 {
            return f64::INFINITY;
        }
        now_ms().saturating_sub(at) as f64 / 1000.0
    }

    /// Polls the store every `interval` until cancelled; failures are logged and the last good index kept.
    pub async fn run_refresh(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        interval: Duration,
        full_every: Duration,
        stop: CancellationToken,
    ) {
        let mut failures = 0u32;
        loop {
            // While the store fails, poll less often (doubling, at most MAX_BACKOFF).
            let wait = backoff(interval, failures);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.poll(store.as_ref(), full_every).await {
                Ok(reloaded) => {
                    if failures > 0 {
                        tracing::info!("subscription store reachable again");
                        failures = 0;
                    }
                    if reloaded {
                        tracing::debug!(
                            subscriptions = self.index().len(),
                            "subscription cache reloaded"
                        );
                    }
                }
                Err(e) => {
                    if failures == 0 {
                        tracing::warn!(error = %e, "subscription refresh failed; keeping the last good cache");
                    }
                    failures = failures.saturating_add(1);
                }
            }
            self.metrics
                .subscription_cache_age_seconds
                .set(self.age_seconds());
        }
    }
}

/// The longest pause between polls of a failing store.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The pause before the next poll after `failures` failed ones in a row.
fn backoff(interval: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return interval;
    }
    interval
        .saturating_mul(1u32 << failures.min(16))
        .clamp(interval, MAX_BACKOFF.max(interval))
}

/// A store call that does not answer within this long counts as failed (the cache keeps what it has).
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(STORE_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "no answer within {STORE_TIMEOUT:?}"
            )))
        })
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_backs_off_while_the_store_fails() {
        let i = Duration::from_millis(500);
        assert_eq!(backoff(i, 0), i);
        assert_eq!(backoff(i, 1), Duration::from_secs(1));
        assert_eq!(backoff(i, 2), Duration::from_secs(2));
        assert_eq!(backoff(i, 4), MAX_BACKOFF);
        assert_eq!(backoff(i, 40), MAX_BACKOFF);
        // An interval longer than the cap is never shortened.
        assert_eq!(backoff(Duration::from_secs(30), 3), Duration::from_secs(30));
    }

    /// Two instances write the same subscription; this one's direct update arrives after a poll that
    /// already loaded the other's later write. The next poll must reload (the revision alone would say
    /// the cache is current), or the stale version would stay until the next full refresh.
    #[tokio::test]
    async fn a_late_direct_update_never_outlives_a_later_write_of_another_instance() {
        use crate::store::sqlite::SqliteStore;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("h.db"), Duration::from_secs(3600))
            .await
            .unwrap();
        let cache = Cache::new(Defaults::default(), Arc::new(Metrics::new()));
        let spec = |types: &str| {
            let mut s = SubscriptionSpec::new(
                "http://127.0.0.1:1/".into(),
                vec![types.into()],
                vec!["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()],
                now_ms(),
            );
            s.id = uuid::Uuid::from_u128(7);
            s
        };
        let types = |c: &Cache| c.index().subscriptions()[0].spec.event_types[0].clone();
        let full = Duration::from_secs(3600);
        store.put(&spec("v0")).await.unwrap();
        cache.refresh(&store).await.unwrap();
        // This instance writes v1 to the store; before it applies v1 to its cache, another instance
        // writes v2 and this instance's poll loads it.
        store.put(&spec("v1")).await.unwrap();
        store.put(&spec("v2")).await.unwrap();
        assert!(cache.poll(&store, full).await.unwrap());
        assert_eq!(types(&cache), "v2");
        cache.upsert(spec("v1")).await.unwrap();
        assert_eq!(types(&cache), "v1", "the direct update applies at once");
        assert!(
            cache.poll(&store, full).await.unwrap(),
            "no reload after a direct update"
        );
        assert_eq!(types(&cache), "v2", "the cache kept a stale version");
        assert!(!cache.poll(&store, full).await.unwrap(), "current again");
        // The same for a delete that arrives late.
        cache.remove(uuid::Uuid::from_u128(7)).await;
        assert!(cache.index().subscriptions().is_empty());
        assert!(cache.poll(&store, full).await.unwrap());
        assert_eq!(types(&cache), "v2");
    }
}
