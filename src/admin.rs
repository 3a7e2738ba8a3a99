//! The admin HTTP server: `/healthz` (process alive), `/readyz` (joined the group, cache loaded) and
//! `/metrics`. The subscription API (DESIGN §11) mounts here too.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::deliver::breaker::BreakerState;
use crate::matching::cache::Cache;
use crate::metrics::Metrics;
use crate::source::SourceHandle;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub cache: Arc<Cache>,
    pub source: SourceHandle,
    pub retry: SourceHandle,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let joined = s.source.joined() && s.retry.joined();
    let loaded = s.cache.loaded();
    let store_ok = s.cache.healthy();
    let body = serde_json::json!({
        "ready": joined && loaded,
        "consumer_joined": s.source.joined(),
        "retry_consumer_joined": s.retry.joined(),
        "cache_loaded": loaded,
        "store_reachable": store_ok,
        "subscriptions": s.cache.index().len(),
    });
    let code = if joined && loaded {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    s.metrics
        .subscription_cache_age_seconds
        .set(s.cache.age_seconds());
    // Breaker states are read at scrape time (open → half-open happens by the clock, not by an event).
    let mut counts = [0i64; 3];
    for sub in s.cache.index().subscriptions() {
        counts[sub.endpoint.state() as usize] += 1;
    }
    for (state, n) in [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ]
    .iter()
    .zip(counts)
    {
        s.metrics.endpoint_state(state.as_str()).set(n);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}
