//! The admin HTTP server: `/healthz` (process alive), `/readyz` (joined the group, cache loaded, store
//! reachable) and `/metrics`, open to anyone who can reach the port; the subscription API under `/v1`
//! ([`api`], DESIGN §11), behind a bearer token or the console's session; and the web console
//! ([`console`], `/console`), whose page and assets are open and whose data all comes from `/v1`.

pub mod api;
pub mod console;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{Method, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, get};

use crate::clock::now_ms;
use crate::deliver::breaker::BreakerState;
use crate::matching::cache::Cache;
use crate::metrics::{Metrics, TopicPartitionLabels};
use crate::source::SourceHandle;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub cache: Arc<Cache>,
    pub source: SourceHandle,
    pub retry: SourceHandle,
    /// Serialises the gauges computed at scrape time with their encoding, so that two concurrent scrapes
    /// never see a family half rebuilt.
    pub scrape: Arc<std::sync::Mutex<()>>,
    pub api: api::ApiState,
}

impl AdminState {
    pub fn new(
        metrics: Arc<Metrics>,
        cache: Arc<Cache>,
        source: SourceHandle,
        retry: SourceHandle,
        api: api::ApiState,
    ) -> AdminState {
        AdminState {
            metrics,
            cache,
            source,
            retry,
            scrape: Arc::default(),
            api,
        }
    }

    /// What `/readyz` reports; `ready` requires all of it.
    fn readiness(&self) -> Readiness {
        Readiness {
            consumer_joined: self.source.joined(),
            retry_consumer_joined: self.retry.joined(),
            cache_loaded: self.cache.loaded(),
            store_reachable: self.cache.healthy(),
        }
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Readiness {
    consumer_joined: bool,
    retry_consumer_joined: bool,
    cache_loaded: bool,
    store_reachable: bool,
}

impl Readiness {
    fn ready(&self) -> bool {
        self.consumer_joined
            && self.retry_consumer_joined
            && self.cache_loaded
            && self.store_reachable
    }
}

/// The routes open to anyone who reaches the port: method, path, handler.
fn open_table() -> Vec<(Method, &'static str, MethodRouter<AdminState>)> {
    vec![
        (Method::GET, "/healthz", get(|| async { "ok\n" })),
        (Method::GET, "/readyz", get(readyz)),
        (Method::GET, "/metrics", get(metrics)),
    ]
}

/// Every route the server answers (method, path in OpenAPI syntax); `schemas/openapi.yaml` must list
/// exactly these.
pub fn routes() -> Vec<(Method, &'static str)> {
    open_table()
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .chain(api::table().into_iter().map(|(m, p, _)| (m, p)))
        .collect()
}

pub fn router(state: AdminState) -> Router {
    let api = api::router(state.api.clone());
    let console = console::router(state.api.clone());
    let mut r = Router::new();
    for (_, path, handler) in open_table() {
        r = r.route(path, handler);
    }
    r.with_state(state).merge(console).merge(api)
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let r = s.readiness();
    let body = serde_json::json!({
        "ready": r.ready(),
        "consumer_joined": r.consumer_joined,
        "retry_consumer_joined": r.retry_consumer_joined,
        "cache_loaded": r.cache_loaded,
        "store_reachable": r.store_reachable,
        "subscriptions": s.cache.index().len(),
    });
    let code = if r.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let _serial = s.scrape.lock().unwrap_or_else(|p| p.into_inner());
    refresh_scrape_gauges(&s);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// Gauges whose truth changes with the clock rather than with an event are computed at scrape time.
fn refresh_scrape_gauges(s: &AdminState) {
    let m = &s.metrics;
    let r = s.readiness();
    m.ready.set(i64::from(r.ready()));
    m.store_reachable.set(i64::from(r.store_reachable));
    m.subscription_cache_age_seconds.set(s.cache.age_seconds());
    // Breaker states: open → half-open happens by the clock.
    let mut counts = [0i64; 3];
    let (mut limit_sum, mut below, mut expiring) = (0i64, 0i64, 0i64);
    let now_s = (crate::clock::now_ms() / 1000) as i64;
    for sub in s.cache.index().subscriptions() {
        if sub
            .recipient
            .target
            .identity()
            .is_some_and(|id| id.expiring(now_s))
        {
            expiring += 1;
        }
        counts[sub.endpoint.state() as usize] += 1;
        let (limit, _) = sub.endpoint.effective();
        limit_sum += i64::from(limit);
        if sub.spec.adaptive_concurrency && limit < sub.endpoint.ceiling() {
            below += 1;
        }
    }
    m.concurrency_limit_sum.set(limit_sum);
    m.endpoints_adapted_below_max.set(below);
    m.tls_client_certs_expiring.set(expiring);
    for (state, n) in [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ]
    .iter()
    .zip(counts)
    {
        m.endpoint_state(state.as_str()).set(n);
    }
    // Commit delay: how long the oldest unfinished record of each source partition has held it.
    m.commit_delay_seconds.clear();
    for (topic, partition, held_ms) in s.source.commit_delays() {
        m.commit_delay_seconds
            .get_or_create(&TopicPartitionLabels {
                topic: topic.to_string(),
                partition,
            })
            .set(held_ms as f64 / 1000.0);
    }
    // Ordered delivery: keys parked in the partitions owned here, and how long the oldest has been.
    let mono = crate::clock::mono_ms();
    let (mut parked, mut oldest) = (0i64, 0u64);
    for o in s.source.orders() {
        for v in o.parked_lanes() {
            parked += 1;
            oldest = oldest.max(mono.saturating_sub(v.parked_at));
        }
    }
    m.parked_keys.set(parked);
    m.parked_oldest_age_seconds.set(oldest as f64 / 1000.0);
    // Time lag: age of the oldest unfinished record of each partition assigned here (0 when none).
    let now = now_ms() as i64;
    m.lag_seconds.clear();
    for (topic, partition, oldest) in s
        .source
        .oldest_unfinished()
        .into_iter()
        .chain(s.retry.oldest_unfinished())
    {
        let age_ms = oldest.map_or(0, |ts| (now - ts).max(0));
        m.lag_seconds
            .get_or_create(&TopicPartitionLabels {
                topic: topic.to_string(),
                partition,
            })
            .set(age_ms as f64 / 1000.0);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// The OpenAPI document and the router list the same (method, path) pairs.
    #[test]
    fn openapi_document_matches_the_routes() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/openapi.yaml");
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_mapping().unwrap() {
            for (k, _) in item.as_mapping().unwrap() {
                let k = k.as_str().unwrap();
                if ["get", "put", "post", "patch", "delete", "head", "options"].contains(&k) {
                    documented.insert((k.to_uppercase(), path.as_str().unwrap().to_string()));
                }
            }
        }
        let served: BTreeSet<(String, String)> = super::routes()
            .into_iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty() && unserved.is_empty(),
            "served but not in schemas/openapi.yaml: {undocumented:?}; documented but not served: {unserved:?}"
        );
        assert_eq!(served.len(), 22);
    }
}
