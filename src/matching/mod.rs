//! Matching: which subscriptions want an event.
//!
//! The [`Index`] is an immutable snapshot built from all enabled subscriptions and swapped atomically when
//! the cache refreshes ([`cache`]). Lookups are hash probes keyed by the event type — one for the exact type,
//! one per `.`-separated prefix of it, plus the `*` bucket — and inside each bucket by tenant, so the cost of
//! matching an event depends on the subscriptions that match it, not on how many others exist.

pub mod cache;
pub mod filter;
pub mod subscription;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::model::{Event, Pattern};
pub use subscription::{Defaults, Subscription};

/// Subscriptions (by position in `Index::subs`) that share a pattern, split by tenant scope.
#[derive(Default, Debug)]
struct Bucket {
    /// Subscriptions without a tenant: they see every tenant's events.
    all_tenants: Vec<u32>,
    /// Subscriptions scoped to one tenant.
    by_tenant: HashMap<Box<str>, Vec<u32>>,
}

impl Bucket {
    fn add(&mut self, tenant: Option<&str>, i: u32) {
        match tenant {
            None => self.all_tenants.push(i),
            Some(t) => self.by_tenant.entry(t.into()).or_default().push(i),
        }
    }

    fn collect(&self, tenant: Option<&str>, out: &mut Vec<u32>) {
        out.extend_from_slice(&self.all_tenants);
        if let Some(t) = tenant
            && let Some(v) = self.by_tenant.get(t)
        {
            out.extend_from_slice(v);
        }
    }
}

#[derive(Default, Debug)]
pub struct Index {
    subs: Vec<Arc<Subscription>>,
    /// Per subscription: does it have several patterns (so it may be found twice)?
    multi: Vec<bool>,
    exact: HashMap<Box<str>, Bucket>,
    /// Keyed by the prefix including its trailing dot (`order.` for `order.*`).
    prefix: HashMap<Box<str>, Bucket>,
    any: Bucket,
    /// Position in `subs` by id (retry records name their one subscription).
    by_id: HashMap<uuid::Uuid, u32>,
}

impl Index {
    /// Builds the index from enabled subscriptions (disabled ones are skipped).
    pub fn build(subs: impl IntoIterator<Item = Arc<Subscription>>) -> Index {
        let mut idx = Index::default();
        for sub in subs {
            if !sub.spec.enabled {
                continue;
            }
            let i = idx.subs.len() as u32;
            let tenant = sub.tenant.as_deref();
            for p in &sub.patterns {
                match p {
                    Pattern::Exact(t) => idx.exact.entry(t.clone()).or_default().add(tenant, i),
                    Pattern::Prefix(t) => idx.prefix.entry(t.clone()).or_default().add(tenant, i),
                    Pattern::Any => idx.any.add(tenant, i),
                }
            }
            idx.multi.push(sub.patterns.len() > 1);
            idx.by_id.insert(sub.id, i);
            idx.subs.push(sub);
        }
        idx
    }

    /// The enabled subscription with this id.
    pub fn get(&self, id: &uuid::Uuid) -> Option<Arc<Subscription>> {
        self.by_id.get(id).map(|&i| self.subs[i as usize].clone())
    }

    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    pub fn subscriptions(&self) -> &[Arc<Subscription>] {
        &self.subs
    }

    /// Subscriptions matching `event`, each once. `doc` builds the JSON document filters look at; it is
    /// called at most once, and only when a candidate has a filter.
    pub fn matches(&self, event: &Event, doc: impl FnOnce() -> Value) -> Vec<Arc<Subscription>> {
        self.matches_parts(&event.event_type, event.tenant.as_deref(), doc)
    }

    pub fn matches_parts(
        &self,
        event_type: &str,
        tenant: Option<&str>,
        doc: impl FnOnce() -> Value,
    ) -> Vec<Arc<Subscription>> {
        let mut cand: Vec<u32> = Vec::new();
        if let Some(b) = self.exact.get(event_type) {
            b.collect(tenant, &mut cand);
        }
        if !self.prefix.is_empty() {
            for (pos, c) in event_type.char_indices() {
                if c == '.'
                    && let Some(b) = self.prefix.get(&event_type[..=pos])
                {
                    b.collect(tenant, &mut cand);
                }
            }
        }
        self.any.collect(tenant, &mut cand);
        if cand.is_empty() {
            return Vec::new();
        }
        if cand.iter().any(|&i| self.multi[i as usize]) {
            cand.sort_unstable();
            cand.dedup();
        }
        let mut doc = Some(doc);
        let mut built: Option<Value> = None;
        let mut out = Vec::with_capacity(cand.len());
        for i in cand {
            let sub = &self.subs[i as usize];
            if let Some(f) = &sub.filter {
                if built.is_none()
                    && let Some(make) = doc.take()
                {
                    built = Some(make());
                }
                if !built.as_ref().is_some_and(|d| f.matches(d)) {
                    continue;
                }
            }
            out.push(sub.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SubscriptionSpec;
    use serde_json::json;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn sub(
        name: u128,
        types: &[&str],
        tenant: Option<&str>,
        filter: Option<&str>,
    ) -> Arc<Subscription> {
        let spec = SubscriptionSpec {
            id: uuid::Uuid::from_u128(name),
            tenant: tenant.map(String::from),
            filter: filter.map(|f| serde_yaml_ng::from_str(f).unwrap()),
            created_at: None,
            updated_at: None,
            ..SubscriptionSpec::new(
                "http://127.0.0.1:1/".into(),
                types.iter().map(|s| s.to_string()).collect(),
                vec![SECRET.into()],
                0,
            )
        };
        Arc::new(Subscription::prepare(spec, &Defaults::default()).unwrap())
    }

    fn ids(v: Vec<Arc<Subscription>>) -> Vec<u128> {
        let mut v: Vec<u128> = v.iter().map(|s| s.id.as_u128()).collect();
        v.sort();
        v
    }

    #[test]
    fn exact_prefix_any_tenant_and_dedupe() {
        let idx = Index::build([
            sub(1, &["order.created"], None, None),
            sub(2, &["order.*"], None, None),
            sub(3, &["*"], None, None),
            sub(4, &["order.created"], Some("acme"), None),
            sub(5, &["order.*", "order.created"], None, None),
            sub(6, &["payment.*"], None, None),
            sub(7, &["order.created.*"], None, None),
        ]);
        let m = |t: &str, tenant: Option<&str>| ids(idx.matches_parts(t, tenant, || json!({})));
        assert_eq!(m("order.created", None), vec![1, 2, 3, 5]);
        assert_eq!(m("order.created", Some("acme")), vec![1, 2, 3, 4, 5]);
        assert_eq!(m("order.created", Some("other")), vec![1, 2, 3, 5]);
        assert_eq!(m("order.created.v2", None), vec![2, 3, 5, 7]);
        assert_eq!(m("order", None), vec![3]);
        assert_eq!(m("payment.failed", None), vec![3, 6]);
        assert_eq!(m("orders.created", None), vec![3]);
    }

    #[test]
    fn disabled_are_not_indexed() {
        let mut s = sub(1, &["*"], None, None);
        Arc::get_mut(&mut s).unwrap().spec.enabled = false;
        let idx = Index::build([s]);
        assert!(idx.matches_parts("x", None, || json!({})).is_empty());
    }

    #[test]
    fn filters_apply_and_doc_is_built_lazily_once() {
        let idx = Index::build([
            sub(1, &["a.b"], None, Some("data.x: 1")),
            sub(2, &["a.*"], None, Some("data.x: 2")),
            sub(3, &["a.b"], None, None),
        ]);
        let mut calls = 0;
        let r = ids(idx.matches_parts("a.b", None, || {
            calls += 1;
            json!({"data": {"x": 1}})
        }));
        assert_eq!(r, vec![1, 3]);
        assert_eq!(calls, 1);
        let idx2 = Index::build([sub(3, &["a.b"], None, None)]);
        let mut calls2 = 0;
        idx2.matches_parts("a.b", None, || {
            calls2 += 1;
            json!({})
        });
        assert_eq!(calls2, 0, "no filter, no document");
    }

    #[test]
    fn non_matching_subscriptions_are_never_visited() {
        // 100 000 subscriptions on other types and tenants; the candidate list for an event only ever
        // holds the matching ones (checked through the filter-document call count and the result).
        let mut subs: Vec<Arc<Subscription>> = (0..100_000u128)
            .map(|i| {
                sub(
                    1000 + i,
                    &[&format!("t{i}.created")],
                    Some(&format!("tenant{i}")),
                    Some("data.x: 1"),
                )
            })
            .collect();
        subs.push(sub(1, &["hot.created"], None, None));
        let idx = Index::build(subs);
        let mut calls = 0;
        let r = ids(idx.matches_parts("hot.created", Some("tenant5"), || {
            calls += 1;
            json!({})
        }));
        assert_eq!(r, vec![1]);
        assert_eq!(calls, 0);
    }
}
