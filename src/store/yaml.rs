//! Read-only store: a YAML list of subscriptions (`config/subscriptions.yaml`), re-read on every refresh so
//! that a GitOps-managed file takes effect without a restart.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use async_trait::async_trait;
use uuid::Uuid;

use super::{AttemptRecord, Page, Store, StoreError, paged};
use crate::model::SubscriptionSpec;

pub struct YamlStore {
    path: PathBuf,
}

impl YamlStore {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }
}

/// Parses the YAML text; errors name the entry (`subscriptions[2]`) and, where serde knows it, the field.
pub fn parse(text: &str) -> Result<Vec<SubscriptionSpec>, StoreError> {
    let docs: Vec<serde_yaml_ng::Value> =
        match serde_yaml_ng::from_str::<Option<Vec<serde_yaml_ng::Value>>>(text) {
            Ok(v) => v.unwrap_or_default(),
            Err(e) => {
                return Err(StoreError::Invalid {
                    at: "subscriptions".into(),
                    message: format!("expected a YAML list of subscriptions ({e})"),
                });
            }
        };
    let mut out = Vec::with_capacity(docs.len());
    let mut seen = std::collections::HashSet::new();
    for (i, d) in docs.into_iter().enumerate() {
        let spec: SubscriptionSpec = serde_path_to_error::deserialize(d).map_err(|e| {
            let path = e.path().to_string();
            StoreError::Invalid {
                at: if path == "." {
                    format!("subscriptions[{i}]")
                } else {
                    format!("subscriptions[{i}].{path}")
                },
                message: e.into_inner().to_string(),
            }
        })?;
        if !seen.insert(spec.id) {
            return Err(StoreError::Invalid {
                at: format!("subscriptions[{i}].id"),
                message: format!("duplicate id {}", spec.id),
            });
        }
        out.push(spec);
    }
    Ok(out)
}

#[async_trait]
impl Store for YamlStore {
    fn describe(&self) -> String {
        format!("yaml file {}", self.path.display())
    }

    fn writable(&self) -> bool {
        false
    }

    async fn list(&self) -> Result<Vec<SubscriptionSpec>, StoreError> {
        let text = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.path.display())))?;
        parse(&text)
    }

    /// The file's modification time and length: an edit (or a replacement by a GitOps tool) moves it.
    async fn revision(&self) -> Result<Option<String>, StoreError> {
        let m = tokio::fs::metadata(&self.path)
            .await
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.path.display())))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(Some(format!("{mtime}:{}:{}", m.len(), m.ino())))
    }

    async fn page(
        &self,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<Page<SubscriptionSpec>, StoreError> {
        let after = match cursor {
            Some(c) => Some(Uuid::parse_str(c).map_err(|_| StoreError::BadCursor)?),
            None => None,
        };
        let mut all = self.list().await?;
        all.sort_by_key(|s| s.id);
        let items: Vec<_> = all
            .into_iter()
            .filter(|s| after.is_none_or(|a| s.id > a))
            .take(limit.max(1) as usize + 1)
            .collect();
        Ok(paged(items, limit.max(1) as usize, |s| s.id.to_string()))
    }

    async fn get(&self, id: Uuid) -> Result<Option<SubscriptionSpec>, StoreError> {
        Ok(self.list().await?.into_iter().find(|s| s.id == id))
    }

    async fn put(&self, _spec: &SubscriptionSpec) -> Result<(), StoreError> {
        Err(self.read_only())
    }

    async fn delete(&self, _id: Uuid) -> Result<bool, StoreError> {
        Err(self.read_only())
    }

    async fn write_attempts(&self, _batch: &[AttemptRecord]) -> Result<(), StoreError> {
        Err(self.read_only())
    }

    async fn attempts(
        &self,
        _subscription: Uuid,
        _cursor: Option<&str>,
        _limit: u32,
    ) -> Result<Page<AttemptRecord>, StoreError> {
        Err(self.read_only())
    }

    async fn expire_attempts(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}

impl YamlStore {
    fn read_only(&self) -> StoreError {
        StoreError::ReadOnly(format!(
            "the yaml file {} is read-only (use store.kind = \"sqlite\" or \"scylla\" for writes and the attempt log)",
            self.path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_entry_and_field() {
        let e = parse(
            "- url: http://x/\n  event_types: [a]\n  secrets: [whsec_x]\n- url: 5\n  bogus: 1\n",
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("subscriptions[1]"), "{s}");
        let e = parse("- url: http://x/\n  event_types: a\n  secrets: []\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("subscriptions[0].event_types"), "{e}");
        assert!(parse("{}").is_err());
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn ids_are_generated_and_must_be_unique() {
        let v = parse("- {url: 'http://x/', event_types: [a], secrets: [s]}\n- {url: 'http://y/', event_types: [a], secrets: [s]}\n").unwrap();
        assert_ne!(v[0].id, v[1].id);
        let id = "6f1c3f4e-0000-4000-8000-000000000001";
        let e = parse(&format!("- {{id: {id}, url: 'http://x/', event_types: [a], secrets: [s]}}\n- {{id: {id}, url: 'http://y/', event_types: [a], secrets: [s]}}\n")).unwrap_err();
        assert!(e.to_string().starts_with("subscriptions[1].id"), "{e}");
    }

    #[test]
    fn shipped_example_parses_and_prepares() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/subscriptions.yaml");
        let specs = parse(&std::fs::read_to_string(p).unwrap()).unwrap();
        assert!(!specs.is_empty());
        for s in specs {
            crate::matching::Subscription::prepare(s, &crate::matching::Defaults::default())
                .unwrap();
        }
    }
}
