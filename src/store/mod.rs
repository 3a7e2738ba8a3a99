//! Subscription stores behind one small trait. The cache ([`crate::matching::cache`]) is their only reader on
//! the delivery path; the admin API and CLI write through them.

pub mod yaml;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{Config, ConfigError, StoreKind};
use crate::model::SubscriptionSpec;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store's content is invalid; `at` names the entry and field.
    #[error("{at}: {message}")]
    Invalid { at: String, message: String },
    /// The store could not be reached or read.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Every subscription, enabled or not.
    async fn list(&self) -> Result<Vec<SubscriptionSpec>, StoreError>;
    /// A short description for logs and `--check-config`.
    fn describe(&self) -> String;
}

/// Opens the store the configuration names.
pub fn open(config: &Config) -> Result<Arc<dyn Store>, ConfigError> {
    match config.store.kind {
        StoreKind::Yaml => Ok(Arc::new(yaml::YamlStore::new(config.store.path.clone()))),
        StoreKind::Sqlite | StoreKind::Scylla => Err(ConfigError::new(
            "store.kind",
            "only \"yaml\" is available in this build (sqlite and scylla are not implemented yet)",
        )),
    }
}
