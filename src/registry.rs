//! Subscription writes: the store first, then this instance's cache at once (other instances follow at
//! their next revision poll, within `store.refresh_interval`). Used by the admin API, and by the
//! dispatcher to disable a subscription whose endpoint answered 410 Gone (DESIGN §4).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::clock::now_ms;
use crate::matching::cache::{Cache, LoadError};
use crate::metrics::Metrics;
use crate::model::{SubscriptionSpec, rfc3339_ms};
use crate::store::{Store, StoreError};

pub struct Registry {
    pub store: Arc<dyn Store>,
    pub cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    /// Subscriptions whose 410-disable is in progress (many in-flight deliveries may see the 410).
    disabling: Mutex<HashSet<Uuid>>,
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
        }
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
            match this.disable(id).await {
                Ok(true) => {
                    this.metrics.subscriptions_disabled_gone.inc();
                    tracing::warn!(subscription = %id, "endpoint answered 410 Gone; subscription disabled");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(subscription = %id, error = %e, "endpoint answered 410 Gone but disabling the subscription failed")
                }
            }
            this.disabling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }

    async fn disable(&self, id: Uuid) -> Result<bool, WriteError> {
        let Some(mut spec) = self.store.get(id).await? else {
            return Ok(false);
        };
        if !spec.enabled {
            return Ok(false);
        }
        spec.enabled = false;
        spec.updated_at = Some(rfc3339_ms(now_ms()));
        self.put(spec).await?;
        Ok(true)
    }
}
