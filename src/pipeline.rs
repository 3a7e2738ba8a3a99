//! Wires the stages together: store → cache → (source → decode → match → dispatch → deliver | retry) and
//! the admin server, then runs until a signal.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::admin::api::ApiState;
use crate::config::{Config, ConfigError};
use crate::deliver::Deliverer;
use crate::deliver::breaker::BreakerConfig;
use crate::deliver::policy::AddressPolicy;
use crate::dispatch::Dispatcher;
use crate::matching::Defaults;
use crate::matching::cache::{Cache, LoadError};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::retry::publish::Publisher;
use crate::source::{Role, Source};
use crate::store::attempts::AttemptLog;
use crate::store::{self, StoreError};

pub use crate::config::RunError;

pub fn defaults(config: &Config) -> Defaults {
    let b = &config.delivery.breaker;
    Defaults {
        timeout_ms: config.delivery.default_timeout_ms,
        max_in_flight: config.delivery.default_max_in_flight,
        breaker: BreakerConfig {
            window: b.window,
            min_requests: b.min_requests,
            failure_ratio: b.failure_ratio,
            consecutive_failures: b.consecutive_failures,
            cool_down: b.cool_down,
            half_open_probes: b.half_open_probes,
        },
        share: Default::default(),
        tiers: config
            .tiers()
            .unwrap_or_default()
            .into_iter()
            .map(|t| (t.name.into_boxed_str(), t.delay))
            .collect(),
    }
}

/// Loads the subscriptions once; invalid ones are configuration errors naming the subscription and field.
pub async fn load_cache(
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<(Arc<Cache>, Arc<dyn store::Store>), RunError> {
    let store = store::open(config).await?;
    let cache = Arc::new(Cache::new(defaults(config), metrics));
    if let Some(spec) = config.operator_subscription()? {
        let sub = crate::matching::Subscription::prepare(spec, cache.defaults()).map_err(|e| {
            ConfigError::new(
                "operational.webhook_url",
                format!("{}: {}", e.field, e.message),
            )
        })?;
        cache.set_operator(Arc::new(sub));
    }
    match cache.refresh(store.as_ref()).await {
        Ok(_) => Ok((cache, store)),
        Err(LoadError::Spec { id, err }) => {
            Err(ConfigError::new(format!("subscription {id}: {}", err.field), err.message).into())
        }
        Err(LoadError::Store(StoreError::Invalid { at, message })) => {
            Err(ConfigError::new(format!("{} {at}", store.describe()), message).into())
        }
        Err(LoadError::Store(e)) => {
            let setting = match config.store.kind {
                crate::config::StoreKind::Scylla => "store.scylla.nodes",
                _ => "store.path",
            };
            Err(ConfigError::new(setting, e.to_string()).into())
        }
    }
}

/// `hookline run --check-config`: everything that can be checked without contacting Kafka.
pub async fn check(config: &Config) -> Result<String, RunError> {
    let (store, subscriptions) =
        if config.store.kind == crate::config::StoreKind::Sqlite && !config.store.path.exists() {
            // A check must not create the file; `run` will.
            (
                format!(
                    "sqlite file {} (does not exist yet; created at start)",
                    config.store.path.display()
                ),
                0,
            )
        } else {
            let (cache, store) = load_cache(config, Arc::new(Metrics::new())).await?;
            (store.describe(), cache.index().len())
        };
    Ok(format!(
        "config ok: topics {:?}, group {:?}, {} retry tiers ({}), store {store}, {subscriptions} enabled subscriptions",
        config.source.topics,
        config.source.group,
        config.retry.tiers.len(),
        config.retry.tiers.join(", "),
    ))
}

pub async fn run(config: Config) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let (cache, store) = load_cache(&config, metrics.clone()).await?;
    tracing::info!(subscriptions = cache.index().len(), store = %store.describe(), "subscriptions loaded");

    let policy = AddressPolicy::new(config.allow_networks()?);
    let deliverer = Arc::new(Deliverer::new(&config, policy.clone())?);
    let registry = Arc::new(Registry::new(store.clone(), cache.clone(), metrics.clone()));
    // The attempt log outlives the consumers: it is stopped after their deliveries drained.
    let log_stop = CancellationToken::new();
    let (attempt_log, log_writer) = if config.store.attempt_log && store.writable() {
        let (log, writer) = AttemptLog::start(
            store.clone(),
            &config.store,
            metrics.clone(),
            log_stop.clone(),
        );
        (log, Some(writer))
    } else {
        (AttemptLog::disabled(metrics.clone()), None)
    };
    let publisher = Publisher::new(&config, metrics.clone())
        .map_err(|e| RunError::Runtime(format!("kafka producer: {e}")))?;
    publisher
        .ensure_topics(&config)
        .await
        .map_err(RunError::Runtime)?;
    let tiers = config.tiers()?;
    for (t, topic) in tiers.iter().zip(&publisher.topics.tiers) {
        metrics
            .tier_delay_seconds
            .get_or_create(&crate::metrics::TopicLabel {
                topic: topic.clone(),
            })
            .set(t.delay.as_secs_f64());
    }
    let tier_delays = tiers.into_iter().map(|t| t.delay).collect();
    // Attempt spans over OTLP when configured; the exporter exports what is queued when `trace_stop`
    // fires, after the last deliveries (below).
    let trace_stop = CancellationToken::new();
    let (tracer, trace_task) = match config.otlp()? {
        Some(cfg) => {
            let (t, task) = crate::otlp::start(
                cfg,
                metrics.spans_exported.clone(),
                metrics.spans_dropped.clone(),
                trace_stop.clone(),
            )
            .map_err(|e| RunError::Config(ConfigError::new("tracing.otlp_endpoint", e)))?;
            (Some(t), Some(task))
        }
        None => (None, None),
    };
    // Operational events: one reporter for the dispatcher (message.exhausted) and the registry
    // (endpoint.disabled / endpoint.enabled).
    let reporter = publisher.topics.events.clone().map(|topic| {
        Arc::new(crate::operational::Reporter::new(
            publisher.producer(),
            topic,
            registry.store.clone(),
            metrics.clone(),
        ))
    });
    if let Some(r) = &reporter {
        registry.set_reporter(r.clone());
    }
    let dispatcher = Arc::new(Dispatcher {
        tracer,
        reporter,
        disable_after: config.delivery.disable_after,
        deliverer: deliverer.clone(),
        publisher,
        metrics: metrics.clone(),
        tier_delays,
        jitter: config.retry.jitter,
        max_deferrals: config.delivery.max_deferrals,
        attempt_log,
        registry: Some(registry.clone()),
    });
    let source = Source::new(
        &config,
        Role::Source,
        cache.clone(),
        dispatcher.clone(),
        metrics.clone(),
    )
    .map_err(|e| RunError::Runtime(format!("kafka consumer: {e}")))?;
    let tiers = Source::new(
        &config,
        Role::Retry,
        cache.clone(),
        dispatcher.clone(),
        metrics.clone(),
    )
    .map_err(|e| RunError::Runtime(format!("kafka retry consumer: {e}")))?;

    let stop = CancellationToken::new();
    crate::shutdown::on_signal(stop.clone());

    let listener = tokio::net::TcpListener::bind(&config.admin.listen)
        .await
        .map_err(|e| RunError::Runtime(format!("admin.listen {}: {e}", config.admin.listen)))?;
    let app = admin::router(admin::AdminState::new(
        metrics.clone(),
        cache.clone(),
        source.handle(),
        tiers.handle(),
        ApiState::new(
            registry,
            deliverer.clone(),
            policy,
            Arc::new(config.clone()),
            stop.clone(),
        )
        .with_order(crate::admin::api::OrderApi {
            source: source.handle(),
            producer: dispatcher.publisher.producer(),
            prefix: config.retry.topic_prefix.clone(),
            topics: config.source.topics.clone(),
        }),
    ));
    let admin_stop = stop.clone();
    tokio::spawn(async move {
        let serve = axum::serve(listener, app)
            .with_graceful_shutdown(async move { admin_stop.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    // Idle keep-alive connections past their idle timeout or lifetime are closed even when nothing
    // is delivered to their host any more.
    let sweeper = deliverer.clone();
    let sweep_stop = stop.clone();
    tokio::spawn(async move { sweeper.sweep_idle_connections(sweep_stop).await });
    tokio::spawn(cache.clone().run_refresh(
        store,
        config.store.refresh_interval,
        config.store.full_refresh_interval,
        stop.clone(),
    ));

    // Ordered delivery: the parked keys of the partitions owned here, published for group-wide
    // listings.
    let handle = source.handle();
    tokio::spawn(crate::order::publish_key_states(
        move || handle.orders(),
        dispatcher.publisher.producer(),
        crate::retry::parked_keys_topic(&config.retry.topic_prefix),
        config
            .source
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("pid {} admin {}", std::process::id(), config.admin.listen)),
        stop.clone(),
    ));

    for setting in config.obsolete_settings() {
        tracing::warn!(
            setting,
            "setting no longer used: deliveries wait for their endpoint, and only what blocks a \
             partition is deferred (source.max_commit_delay); remove it"
        );
    }
    tracing::info!(topics = ?config.source.topics, group = %config.source.group, "hookline running");
    // Both consumers stop on the same signal, each draining its own in-flight deliveries; the shared
    // producer is flushed once both are done, so no hand-off of either is cut off.
    // Each consumer runs as a task on the runtime's workers, not on this (blocking) thread: the delivery
    // tasks a record fans out to are then spawned into the worker's own queue and run there, without a
    // hand-off through the runtime's shared queue and a wake-up of another thread per record.
    let source = tokio::spawn(source.run(stop.clone()));
    let tiers = tokio::spawn(tiers.run(stop));
    for (role, ended) in [("source", source.await), ("retry", tiers.await)] {
        if let Err(e) = ended {
            tracing::error!(role, error = %e, "consumer task failed");
        }
    }
    let flush = tokio::task::spawn_blocking(move || {
        dispatcher
            .publisher
            .flush(std::time::Duration::from_secs(5))
    });
    let _ = tokio::time::timeout(std::time::Duration::from_secs(6), flush).await;
    trace_stop.cancel();
    if let Some(t) = trace_task {
        // The last export is bounded by tracing.export_timeout; this bound is a backstop.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(12), t).await;
    }
    log_stop.cancel();
    if let Some(w) = log_writer {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), w).await;
    }
    tracing::info!("stopped");
    Ok(())
}
