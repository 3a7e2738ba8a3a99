//! Subscription stores behind one small trait (DESIGN §3, §10): embedded SQLite (default, writable),
//! ScyllaDB (shared by all instances) and a YAML file (read-only). The cache ([`crate::matching::cache`])
//! is their only reader on the delivery path; the admin API, the CLI and the attempt log write through
//! them. Every store passes the same conformance suite (`tests/store_conformance.rs`).

pub mod attempts;
pub mod scylla;
pub mod sqlite;
pub mod yaml;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::config::{Config, ConfigError, StoreKind};
use crate::model::{ApiToken, SubscriptionSpec};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store's content is invalid; `at` names the entry and field.
    #[error("{at}: {message}")]
    Invalid { at: String, message: String },
    /// The store could not be reached or read.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store cannot be written (the YAML file).
    #[error("{0}")]
    ReadOnly(String),
    /// A pagination cursor that this store did not hand out.
    #[error("invalid cursor")]
    BadCursor,
}

impl StoreError {
    /// The store could not be reached or read, because of `e`.
    pub fn unavailable(e: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(e.to_string())
    }
}

/// One delivery attempt, as kept in the attempt log (DESIGN §10).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttemptRecord {
    pub subscription_id: Uuid,
    /// When the attempt started, epoch milliseconds.
    pub at_ms: u64,
    pub event_id: String,
    pub event_type: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// `delivered`, `failed` (will be retried), `rejected`, `gone`, `timeout`, `connect_error`, `refused`,
    /// `circuit_open` or `deferred`.
    pub result: String,
    pub status_code: Option<u16>,
    pub duration_ms: u32,
    /// A short error text (never a response body or a secret).
    pub error: Option<String>,
}

/// One page of a listing; `next` is the opaque cursor of the following page, `None` on the last one.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

#[async_trait]
pub trait Store: Send + Sync {
    /// A short description for logs and `--check-config`.
    fn describe(&self) -> String;

    /// Whether writes (API, attempt log, 410 disabling) are possible.
    fn writable(&self) -> bool {
        true
    }

    /// Every subscription, enabled or not (the cache's full load).
    async fn list(&self) -> Result<Vec<SubscriptionSpec>, StoreError>;

    /// A value that changes whenever any subscription changes; the cache reloads only when it moved.
    /// `None` means "unknown": the cache then reloads every time.
    async fn revision(&self) -> Result<Option<String>, StoreError>;

    /// Subscriptions in a stable order, `limit` at a time, starting after `cursor`.
    async fn page(
        &self,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<Page<SubscriptionSpec>, StoreError>;

    async fn get(&self, id: Uuid) -> Result<Option<SubscriptionSpec>, StoreError>;

    /// Inserts or replaces the subscription with `spec.id`.
    async fn put(&self, spec: &SubscriptionSpec) -> Result<(), StoreError>;

    /// Deletes a subscription; `false` when there was none.
    async fn delete(&self, id: Uuid) -> Result<bool, StoreError>;

    /// Appends attempt records (one batch; the attempt log calls this off the delivery path).
    async fn write_attempts(&self, batch: &[AttemptRecord]) -> Result<(), StoreError>;

    /// Attempts of one subscription, newest first, `limit` at a time. Attempts older than the store's
    /// time-to-live are never returned.
    async fn attempts(
        &self,
        subscription: Uuid,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<Page<AttemptRecord>, StoreError>;

    /// Removes attempts older than the time-to-live; returns how many (0 where the store expires rows
    /// itself, as ScyllaDB does with TTLs).
    async fn expire_attempts(&self) -> Result<u64, StoreError>;

    /// Claims `key` for this caller, first writer wins across every instance sharing the store: `true`
    /// once, `false` for every later claim of the same key (for [`CLAIM_TTL`]). Operational events use it
    /// so that an occurrence several instances see is reported once. A read-only store cannot
    /// coordinate and always answers `true`.
    async fn claim(&self, key: &str) -> Result<bool, StoreError> {
        let _ = key;
        Ok(true)
    }

    /// Whether `key` was claimed (by anyone), without claiming it. A read-only store answers `false`.
    async fn claimed(&self, key: &str) -> Result<bool, StoreError> {
        let _ = key;
        Ok(false)
    }

    /// Stores a new tenant-scoped API token (its hash). A read-only store refuses.
    async fn put_token(&self, token: &ApiToken) -> Result<(), StoreError> {
        let _ = token;
        Err(StoreError::ReadOnly(format!(
            "{} is read-only: API tokens need a writable store (sqlite or scylla)",
            self.describe()
        )))
    }

    /// Every API token (expired ones included), oldest first. A read-only store has none.
    async fn tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        Ok(Vec::new())
    }

    /// The token whose hash is `hash`, if any. Every authenticated request with a token other than
    /// the admin token reads it, so a revocation is seen by every instance at once.
    async fn token_by_hash(&self, hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let _ = hash;
        Ok(None)
    }

    /// Revokes (deletes) a token; `false` when there was none.
    async fn delete_token(&self, id: Uuid) -> Result<bool, StoreError> {
        let _ = id;
        Ok(false)
    }
}

/// How long a claim is remembered.
pub const CLAIM_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

/// Opens the store the configuration names. SQLite creates its file and tables; ScyllaDB connects (the
/// schema comes from `hookline migrate`).
pub async fn open(config: &Config) -> Result<Arc<dyn Store>, ConfigError> {
    let ttl = config.store.attempt_ttl;
    match config.store.kind {
        StoreKind::Yaml => Ok(Arc::new(yaml::YamlStore::new(config.store.path.clone()))),
        StoreKind::Sqlite => {
            let s = sqlite::SqliteStore::open(config.store.path.clone(), ttl)
                .await
                .map_err(|e| ConfigError::new("store.path", e.to_string()))?;
            Ok(Arc::new(s))
        }
        StoreKind::Scylla => {
            let s = scylla::ScyllaStore::connect(&config.store.scylla, ttl)
                .await
                .map_err(|e| ConfigError::new("store.scylla.nodes", e.to_string()))?;
            Ok(Arc::new(s))
        }
    }
}

/// The attempt-log day partition of an epoch-ms time (days since 1970-01-01, UTC).
pub fn day_of(ms: u64) -> i64 {
    (ms / 86_400_000) as i64
}

/// Whether an attempt at `at_ms` is still within `ttl` at `now_ms`.
pub fn attempt_live(at_ms: u64, ttl: Duration, now_ms: u64) -> bool {
    at_ms.saturating_add(ttl.as_millis() as u64) > now_ms
}

/// Cuts a `limit + 1` fetch to `limit` items; the cursor is the key of the last item kept.
pub(crate) fn paged<T>(mut items: Vec<T>, limit: usize, key: impl Fn(&T) -> String) -> Page<T> {
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(key)
    } else {
        None
    };
    Page { items, next }
}
