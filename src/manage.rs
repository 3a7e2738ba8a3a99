//! Operator commands on the store: `hookline migrate`, `hookline subscriptions …` and `hookline tokens
//! …` (DESIGN §8). They
//! write straight to the store; running instances pick the change up at their next revision poll.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::cli::{SubscriptionsCommand, TokensCommand};
use crate::clock::now_ms;
use crate::config::{Config, ConfigError, StoreKind};
use crate::matching::{Defaults, Subscription};
use crate::model::{ApiToken, SubscriptionSpec, generate_secret, rfc3339_ms};
use crate::pipeline::{RunError, defaults};
use crate::store::{self, yaml};

/// `hookline migrate`.
pub async fn migrate(config: &Config) -> Result<String, RunError> {
    match config.store.kind {
        StoreKind::Scylla => {
            let n = store::scylla::migrate(&config.store.scylla)
                .await
                .map_err(RunError::runtime)?;
            Ok(format!(
                "migrate: {n} schema statements applied to keyspace {} on {}",
                config.store.scylla.keyspace,
                config.store.scylla.nodes.join(",")
            ))
        }
        StoreKind::Sqlite => {
            let s = store::open(config).await?;
            Ok(format!("migrate: tables present in {}", s.describe()))
        }
        StoreKind::Yaml => {
            Err(ConfigError::new("store.kind", "the yaml store has no schema to migrate").into())
        }
    }
}

fn check(spec: &SubscriptionSpec, defaults: &Defaults) -> Result<(), RunError> {
    Subscription::prepare(spec.clone(), defaults).map_err(|e| {
        RunError::Config(ConfigError::new(
            format!("subscription {}: {}", spec.id, e.field),
            e.message,
        ))
    })?;
    Ok(())
}

/// `hookline subscriptions …`; returns what to print.
pub async fn subscriptions(config: &Config, cmd: SubscriptionsCommand) -> Result<String, RunError> {
    let store = store::open(config).await?;
    let defaults = defaults(config);
    let mut out = String::new();
    match cmd {
        SubscriptionsCommand::List(_) => {
            let mut all = store.list().await.map_err(RunError::runtime)?;
            all.sort_by(|a, b| (&a.tenant, &a.url, a.id).cmp(&(&b.tenant, &b.url, b.id)));
            for s in &all {
                let _ = writeln!(
                    out,
                    "{}  {}  {:<12} {:<30} {}",
                    s.id,
                    if s.enabled { "enabled " } else { "disabled" },
                    s.tenant.as_deref().unwrap_or("-"),
                    s.event_types.join(","),
                    s.url
                );
            }
            let _ = write!(out, "{} subscriptions in {}", all.len(), store.describe());
        }
        SubscriptionsCommand::Import { file, .. } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| ConfigError::new(file.display().to_string(), e.to_string()))?;
            let specs = yaml::parse(&text)
                .map_err(|e| ConfigError::new(file.display().to_string(), e.to_string()))?;
            // All or nothing: every entry is checked before the first is written.
            for s in &specs {
                check(s, &defaults)?;
            }
            let now = rfc3339_ms(now_ms());
            let mut seen = HashSet::new();
            for mut s in specs {
                seen.insert(s.id);
                let existing = store.get(s.id).await.map_err(RunError::runtime)?;
                s.created_at = s
                    .created_at
                    .or_else(|| existing.and_then(|e| e.created_at))
                    .or_else(|| Some(now.clone()));
                s.updated_at = Some(now.clone());
                store.put(&s).await.map_err(RunError::runtime)?;
            }
            let _ = write!(
                out,
                "imported {} subscriptions from {} into {}",
                seen.len(),
                file.display(),
                store.describe()
            );
        }
        SubscriptionsCommand::Create {
            url,
            event_types,
            tenant,
            tls_client_cert,
            tls_client_key,
            ordering,
            ordering_key,
            on_dead_letter,
            ..
        } => {
            let mut spec = SubscriptionSpec::new(
                url,
                event_types,
                vec![generate_secret().map_err(RunError::runtime)?],
                now_ms(),
            );
            spec.tenant = tenant;
            let read = |flag: &str, p: &Option<PathBuf>| -> Result<Option<String>, RunError> {
                p.as_ref()
                    .map(|p| {
                        std::fs::read_to_string(p)
                            .map_err(|e| RunError::Runtime(format!("{flag} {}: {e}", p.display())))
                    })
                    .transpose()
            };
            spec.tls_client_cert = read("--tls-client-cert", &tls_client_cert)?;
            spec.tls_client_key = read("--tls-client-key", &tls_client_key)?;
            // clap allows only the listed values.
            if let Some(o) = ordering
                .as_deref()
                .and_then(crate::model::OrderingMode::parse)
            {
                spec.ordering = o;
            }
            spec.ordering_key = ordering_key;
            if let Some(d) = on_dead_letter
                .as_deref()
                .and_then(crate::model::OnDeadLetter::parse)
            {
                spec.on_dead_letter = d;
            }
            check(&spec, &defaults)?;
            store.put(&spec).await.map_err(RunError::runtime)?;
            let _ = write!(out, "id: {}\nsecret: {}", spec.id, spec.secrets[0]);
        }
        SubscriptionsCommand::Disable { id, .. } | SubscriptionsCommand::Enable { id, .. } => {
            let enable = matches!(cmd, SubscriptionsCommand::Enable { .. });
            let Some(mut spec) = store.get(id).await.map_err(RunError::runtime)? else {
                return Err(RunError::Runtime(format!("no subscription {id}")));
            };
            spec.enabled = enable;
            if enable {
                // As through the API: why hookline had disabled it no longer applies.
                spec.disabled_reason = None;
                spec.disabled_at = None;
            }
            spec.updated_at = Some(rfc3339_ms(now_ms()));
            store.put(&spec).await.map_err(RunError::runtime)?;
            let _ = write!(out, "{id} {}", if enable { "enabled" } else { "disabled" });
        }
    }
    Ok(out)
}

/// `hookline tokens …`; returns what to print.
pub async fn tokens(config: &Config, cmd: TokensCommand) -> Result<String, RunError> {
    let store = store::open(config).await?;
    let mut out = String::new();
    match cmd {
        TokensCommand::Create {
            tenant,
            name,
            expires_in,
            ..
        } => {
            if tenant.trim().is_empty() {
                return Err(ConfigError::new("--tenant", "must not be empty").into());
            }
            let (record, token) =
                ApiToken::issue(tenant, name, expires_in, now_ms()).map_err(RunError::runtime)?;
            store.put_token(&record).await.map_err(RunError::runtime)?;
            let _ = write!(
                out,
                "id: {}\ntenant: {}\ntoken: {token}",
                record.id, record.tenant
            );
        }
        TokensCommand::List(_) => {
            let all = store.tokens().await.map_err(RunError::runtime)?;
            let now = now_ms();
            for t in &all {
                let _ = writeln!(
                    out,
                    "{}  {:<12} {:<20} created {}  {}",
                    t.id,
                    t.tenant,
                    t.name.as_deref().unwrap_or("-"),
                    t.created_at,
                    match t.expires_at_ms {
                        None => "never expires".to_string(),
                        Some(ms) if t.expired(now) => format!("expired {}", rfc3339_ms(ms)),
                        Some(ms) => format!("expires {}", rfc3339_ms(ms)),
                    }
                );
            }
            let _ = write!(out, "{} tokens in {}", all.len(), store.describe());
        }
        TokensCommand::Revoke { id, .. } => {
            if !store.delete_token(id).await.map_err(RunError::runtime)? {
                return Err(RunError::Runtime(format!("no token {id}")));
            }
            let _ = write!(out, "{id} revoked");
        }
    }
    Ok(out)
}
