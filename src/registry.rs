//! Subscription writes: the store first, then this instance's cache at once (other instances follow at
//! their next revision poll, within `store.refresh_interval`). Used by the admin API, and by the
//! dispatcher to disable a subscription whose endpoint answered 410 Gone (DESIGN §4).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use uuid::Uuid;

use crate::clock::now_ms;
use crate::matching::cache::{Cache, LoadError};
use crate::metrics::Metrics;
use crate::model::{SubscriptionSpec, rfc3339_ms};
use crate::operational::{Kind, Reporter};
use crate::store::{Store, StoreError};

pub struct Registry {
    pub store: Arc<dyn Store>,
    pub cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    /// Subscriptions whose disabling is in progress (many in-flight deliveries may see the 410).
    disabling: Mutex<HashSet<Uuid>>,
    /// Operational events (`[operational] enabled`).
    reporter: OnceLock<Arc<Reporter>>,
}

/// Why hookline disabled a subscription (`disabled_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisableReason {
    /// The endpoint answered 410 Gone.
    Gone,
    /// Every delivery failed for `delivery.disable_after`.
    Failing,
}

impl DisableReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DisableReason::Gone => "gone",
            DisableReason::Failing => "failing",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Invalid(#[from] LoadError),
}

impl Registry {
    pub fn new(store: Arc<dyn Store>, cache: Arc<Cache>, metrics: Arc<Metrics>) -> Registry {
        Registry {
            store,
            cache,
            metrics,
            disabling: Mutex::default(),
            reporter: OnceLock::new(),
        }
    }

    /// Operational events go through `r` from now on: hookline's own disabling here, and every change
    /// of `enabled` by an operator's hand (API, CLI, another writer of the store) through the cache,
    /// which sees them all: one `endpoint.disabled` (reason `operator`) or `endpoint.enabled` per
    /// change. Every instance that sees a change claims the same key (the new version's id and
    /// `updated_at`), so the group reports it once.
    pub fn set_reporter(&self, r: Arc<Reporter>) {
        let observer = Arc::clone(&r);
        self.cache
            .on_toggle(Box::new(move |after: &SubscriptionSpec| {
                let (kind, data) = if after.enabled {
                    (Kind::EndpointEnabled, serde_json::json!({}))
                } else {
                    (
                        Kind::EndpointDisabled,
                        serde_json::json!({"reason": "operator"}),
                    )
                };
                observer.report(
                    kind,
                    occurrence(after),
                    &after.id.to_string(),
                    after.tenant.as_deref(),
                    data,
                );
            }));
        let _ = self.reporter.set(r);
    }

    pub fn reporter(&self) -> Option<&Arc<Reporter>> {
        self.reporter.get()
    }

    /// Stores `spec` (insert or replace) and applies it to the local cache.
    pub async fn put(&self, spec: SubscriptionSpec) -> Result<(), WriteError> {
        self.store.put(&spec).await?;
        self.cache.upsert(spec).await?;
        Ok(())
    }

    /// Deletes a subscription; `false` when it did not exist.
    pub async fn delete(&self, id: Uuid) -> Result<bool, WriteError> {
        let existed = self.store.delete(id).await?;
        self.cache.remove(id).await;
        Ok(existed)
    }

    /// Disables a subscription whose endpoint answered 410 Gone, once, in the background. Read-only
    /// stores cannot record it; the 410 then only dead-letters the delivery.
    pub fn disable_gone(self: &Arc<Self>, id: Uuid) {
        self.disable_in_background(id, DisableReason::Gone, None);
    }

    /// Disables a subscription whose deliveries have all failed since `since_ms` (epoch ms), once, in
    /// the background.
    pub fn disable_failing(self: &Arc<Self>, id: Uuid, since_ms: u64) {
        self.disable_in_background(id, DisableReason::Failing, Some(since_ms));
    }

    fn disable_in_background(
        self: &Arc<Self>,
        id: Uuid,
        why: DisableReason,
        since_ms: Option<u64>,
    ) {
        if !self.store.writable() {
            return;
        }
        if !self
            .disabling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id)
        {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            match this.disable(id, why, since_ms).await {
                Ok(true) if why == DisableReason::Gone => {
                    this.metrics.subscriptions_disabled_gone.inc();
                    tracing::warn!(subscription = %id, "endpoint answered 410 Gone; subscription disabled");
                }
                Ok(true) => {
                    tracing::warn!(subscription = %id, "every delivery failed for delivery.disable_after; subscription disabled");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(subscription = %id, reason = why.as_str(), error = %e, "disabling the subscription failed")
                }
            }
            this.disabling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }

    async fn disable(
        &self,
        id: Uuid,
        why: DisableReason,
        since_ms: Option<u64>,
    ) -> Result<bool, WriteError> {
        let Some(mut spec) = self.store.get(id).await? else {
            return Ok(false);
        };
        if !spec.enabled {
            return Ok(false);
        }
        // Every instance that disables this version of the subscription derives the same key, so the
        // group reports it once.
        let key = occurrence(&spec);
        let now = rfc3339_ms(now_ms());
        spec.enabled = false;
        spec.disabled_reason = Some(why.as_str().into());
        spec.disabled_at = Some(now.clone());
        spec.updated_at = Some(now);
        self.put(spec.clone()).await?;
        if let Some(r) = self.reporter() {
            let mut data = serde_json::json!({"reason": why.as_str()});
            if let Some(since) = since_ms {
                data["failing_since"] = serde_json::json!(rfc3339_ms(since));
            }
            r.report(
                Kind::EndpointDisabled,
                key,
                &id.to_string(),
                spec.tenant.as_deref(),
                data,
            );
        }
        Ok(true)
    }
}

/// The occurrence key of a change to `spec`: its id and a version (`updated_at`) every instance knows
/// alike — the one hookline disabled, or the one an operator's change made.
fn occurrence(spec: &SubscriptionSpec) -> String {
    format!("{}:{}", spec.id, spec.updated_at.as_deref().unwrap_or("-"))
}
