//! The production store: ScyllaDB (or Cassandra), shared by every instance. Schema in
//! `schemas/scylla.cql`, applied by `hookline migrate`.
//!
//! Every statement is prepared once at connect. The full load pages through `subscriptions` (1 000 rows a
//! page); the API's listing hands the driver's paging state to the client as its cursor. A one-row
//! `revision` register, overwritten with a fresh UUID by every subscription write, lets each instance
//! poll for changes with one single-partition read instead of reloading everything. Attempts live in
//! `delivery_attempts`, one partition per subscription and day, newest first, each row written with the
//! remaining part of its time-to-live.
//!
//! Consistency per statement: the subscription statements and the revision register (writes, polls,
//! loads, API reads) at `store.scylla.consistency` (LOCAL_QUORUM by default: read and write quorums
//! overlap), the attempt rows and their reads at `store.scylla.attempt_consistency` (LOCAL_ONE). The CQL
//! is plain and valid on ScyllaDB and Cassandra alike (no `USING TIMEOUT`, no `ALTER TABLE … IF NOT
//! EXISTS`); the tests run it against Apache Cassandra 5.0.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::StreamExt;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::response::{PagingState, PagingStateResponse};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use scylla::{DeserializeRow, SerializeRow};
use uuid::Uuid;

use super::{AttemptRecord, Page, Store, StoreError, attempt_live, day_of};
use crate::clock::now_ms;
use crate::config::{Consistency, ScyllaConfig};
use crate::model::{
    ApiToken, OnDeadLetter, OrderingMode, RetiredSecret, SubscriptionSpec, parse_rfc3339_ms,
    rfc3339_ms,
};

/// The schema, with `{{keyspace}}` and `{{replication}}` placeholders.
pub const SCHEMA: &str = include_str!("../../schemas/scylla.cql");

const COLUMNS: &str = "id, tenant, url, event_types, filter, secrets, retired_secrets, enabled, \
    rate_limit_per_sec, burst, max_in_flight, timeout_ms, headers, created_at, updated_at, \
    adaptive_concurrency, tls_client_cert, tls_client_key, signing_keys, retired_signing_keys, \
    secret_headers, oauth2, retry_tiers, max_attempts, disabled_reason, disabled_at, \
    ordering, ordering_key, on_dead_letter";
const ATTEMPT_COLUMNS: &str =
    "at, seq, event_id, event_type, attempt, result, status_code, duration_ms, error";

/// A `subscriptions` row as read (columns by name; every column but the key may be null).
#[derive(DeserializeRow)]
#[scylla(crate = scylla)]
struct SpecRow {
    id: Uuid,
    tenant: Option<String>,
    url: Option<String>,
    event_types: Option<Vec<String>>,
    filter: Option<String>,
    secrets: Option<Vec<String>>,
    retired_secrets: Option<String>,
    enabled: Option<bool>,
    rate_limit_per_sec: Option<i32>,
    burst: Option<i32>,
    max_in_flight: Option<i32>,
    timeout_ms: Option<i64>,
    headers: Option<BTreeMap<String, String>>,
    created_at: Option<CqlTimestamp>,
    updated_at: Option<CqlTimestamp>,
    adaptive_concurrency: Option<bool>,
    tls_client_cert: Option<String>,
    tls_client_key: Option<String>,
    signing_keys: Option<Vec<String>>,
    retired_signing_keys: Option<String>,
    secret_headers: Option<BTreeMap<String, String>>,
    oauth2: Option<String>,
    retry_tiers: Option<Vec<String>>,
    max_attempts: Option<i32>,
    disabled_reason: Option<String>,
    disabled_at: Option<CqlTimestamp>,
    ordering: Option<String>,
    ordering_key: Option<String>,
    on_dead_letter: Option<String>,
}

/// A `subscriptions` row as written (bound by column name).
#[derive(SerializeRow)]
#[scylla(crate = scylla)]
struct SpecValues<'a> {
    id: Uuid,
    tenant: Option<&'a str>,
    url: &'a str,
    event_types: &'a [String],
    filter: Option<String>,
    secrets: &'a [String],
    retired_secrets: Option<String>,
    enabled: bool,
    rate_limit_per_sec: Option<i32>,
    burst: Option<i32>,
    max_in_flight: Option<i32>,
    timeout_ms: Option<i64>,
    headers: &'a BTreeMap<String, String>,
    created_at: Option<CqlTimestamp>,
    updated_at: Option<CqlTimestamp>,
    adaptive_concurrency: bool,
    tls_client_cert: Option<&'a str>,
    tls_client_key: Option<&'a str>,
    signing_keys: &'a [String],
    retired_signing_keys: Option<String>,
    secret_headers: &'a BTreeMap<String, String>,
    oauth2: Option<String>,
    retry_tiers: Option<&'a [String]>,
    max_attempts: Option<i32>,
    disabled_reason: Option<&'a str>,
    disabled_at: Option<CqlTimestamp>,
    ordering: Option<&'a str>,
    ordering_key: Option<&'a str>,
    on_dead_letter: Option<&'a str>,
}

type AttemptRow = (
    CqlTimestamp,
    Uuid,
    String,
    String,
    i32,
    String,
    Option<i32>,
    i32,
    Option<String>,
);

struct Statements {
    list: PreparedStatement,
    get: PreparedStatement,
    put: PreparedStatement,
    delete: PreparedStatement,
    revision: PreparedStatement,
    bump: PreparedStatement,
    insert_attempt: PreparedStatement,
    attempts: PreparedStatement,
    claim: PreparedStatement,
    claimed: PreparedStatement,
    put_token: PreparedStatement,
    tokens: PreparedStatement,
    token: PreparedStatement,
    delete_token: PreparedStatement,
}

/// hash, id, tenant, name, created_at, expires_at
type TokenRow = (
    String,
    Uuid,
    String,
    Option<String>,
    String,
    Option<CqlTimestamp>,
);

const TOKEN_COLUMNS: &str = "hash, id, tenant, name, created_at, expires_at";

fn token_of(r: TokenRow) -> ApiToken {
    let (hash, id, tenant, name, created_at, expires) = r;
    ApiToken {
        id,
        tenant,
        name,
        hash,
        created_at,
        expires_at_ms: expires.map(|t| t.0.max(0) as u64),
    }
}

pub struct ScyllaStore {
    session: Session,
    st: Statements,
    ttl: Duration,
    describe: String,
}

/// The schema statements for a keyspace and replication setting, in order.
pub fn schema_statements(keyspace: &str, replication: &str) -> Vec<String> {
    let text: Vec<&str> = SCHEMA
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect();
    text.join("\n")
        .replace("{{keyspace}}", keyspace)
        .replace("{{replication}}", replication)
        .split(';')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

async fn session(cfg: &ScyllaConfig, keyspace: Option<&str>) -> Result<Session, StoreError> {
    let mut b = SessionBuilder::new()
        .known_nodes(&cfg.nodes)
        .connection_timeout(cfg.connect_timeout)
        // hookline reads its own tables only; the cluster-wide schema is not needed.
        .fetch_schema_metadata(false)
        .fetch_full_schema_metadata(false);
    if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
        b = b.user(u, p);
    }
    if let Some(ks) = keyspace {
        b = b.use_keyspace(ks, false);
    }
    b.build()
        .await
        .map_err(|e| StoreError::unavailable(format!("cannot connect to {:?}: {e}", cfg.nodes)))
}

/// `hookline migrate`: creates the keyspace and tables if missing (idempotent). Returns the statements
/// applied (a column that is already there counts as applied).
pub async fn migrate(cfg: &ScyllaConfig) -> Result<usize, StoreError> {
    let s = session(cfg, None).await?;
    let stmts = schema_statements(&cfg.keyspace, &cfg.replication);
    for stmt in &stmts {
        // CQL has no portable `ADD IF NOT EXISTS`: a column added by a later version is looked up in
        // system_schema (the same on ScyllaDB and Cassandra) and only added when missing.
        if let Some((ks, table, column)) = added_column(stmt)
            && column_exists(&s, ks, table, column).await?
        {
            continue;
        }
        if let Err(e) = s.query_unpaged(stmt.as_str(), ()).await {
            // Another migrate added it meanwhile (ScyllaDB and Cassandra word this differently).
            let text = e.to_string();
            let raced = added_column(stmt).is_some()
                && (text.contains("conflicts with an existing column")
                    || text.contains("already exists"));
            if !raced {
                return Err(StoreError::unavailable(format!("{e} in: {stmt}")));
            }
        }
    }
    Ok(stmts.len())
}

/// `(keyspace, table, column)` of an `ALTER TABLE ks.table ADD column type` statement.
fn added_column(stmt: &str) -> Option<(&str, &str, &str)> {
    let mut words = stmt.split_whitespace();
    let is = |w: Option<&str>, want: &str| w.is_some_and(|w| w.eq_ignore_ascii_case(want));
    if !(is(words.next(), "alter") && is(words.next(), "table")) {
        return None;
    }
    let (ks, table) = words.next()?.split_once('.')?;
    if !is(words.next(), "add") {
        return None;
    }
    Some((ks, table, words.next()?))
}

async fn column_exists(
    s: &Session,
    keyspace: &str,
    table: &str,
    column: &str,
) -> Result<bool, StoreError> {
    let res = s
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns \
             WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
            (keyspace, table, column),
        )
        .await
        .map_err(StoreError::unavailable)?
        .into_rows_result()
        .map_err(StoreError::unavailable)?;
    Ok(res.rows_num() > 0)
}

impl ScyllaStore {
    pub async fn connect(cfg: &ScyllaConfig, ttl: Duration) -> Result<ScyllaStore, StoreError> {
        let session = session(cfg, Some(&cfg.keyspace)).await?;
        let prep = |q: String| {
            let session = &session;
            async move {
                session.prepare(q.as_str()).await.map_err(|e| {
                    StoreError::unavailable(format!("{e} (did `hookline migrate` run?) in: {q}"))
                })
            }
        };
        let mut list = prep(format!("SELECT {COLUMNS} FROM subscriptions")).await?;
        list.set_page_size(1000);
        let mut st = Statements {
            list,
            get: prep(format!("SELECT {COLUMNS} FROM subscriptions WHERE id = ?")).await?,
            put: prep(format!(
                "INSERT INTO subscriptions ({COLUMNS}) VALUES ({})",
                vec!["?"; COLUMNS.split(',').count()].join(", ")
            ))
            .await?,
            delete: prep("DELETE FROM subscriptions WHERE id = ?".into()).await?,
            revision: prep("SELECT value FROM revision WHERE name = ?".into()).await?,
            bump: prep("UPDATE revision SET value = ? WHERE name = ?".into()).await?,
            insert_attempt: prep(format!(
                "INSERT INTO delivery_attempts (subscription_id, day, {ATTEMPT_COLUMNS}) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            attempts: prep(format!(
                "SELECT {ATTEMPT_COLUMNS} FROM delivery_attempts WHERE subscription_id = ? AND day = ?"
            ))
            .await?,
            claim: prep(format!(
                "INSERT INTO claims (key, at) VALUES (?, ?) IF NOT EXISTS USING TTL {}",
                super::CLAIM_TTL.as_secs()
            ))
            .await?,
            claimed: prep("SELECT key FROM claims WHERE key = ?".into()).await?,
            put_token: prep(format!(
                "INSERT INTO api_tokens ({TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            tokens: prep(format!("SELECT {TOKEN_COLUMNS} FROM api_tokens")).await?,
            token: prep(format!(
                "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE hash = ?"
            ))
            .await?,
            delete_token: prep("DELETE FROM api_tokens WHERE hash = ?".into()).await?,
        };
        // Consistency per statement (README, "ScyllaDB consistency"): the subscriptions and the revision
        // register at store.scylla.consistency for reads and writes alike, so that a poll that sees a
        // new revision also lists the write behind it; the attempt log at attempt_consistency.
        let subs = level(cfg.consistency);
        for stmt in [
            &mut st.list,
            &mut st.get,
            &mut st.put,
            &mut st.delete,
            &mut st.revision,
            &mut st.bump,
            // Tokens like subscriptions: a revocation written at this level is seen by the next
            // request's read on any instance.
            &mut st.put_token,
            &mut st.tokens,
            &mut st.token,
            &mut st.delete_token,
        ] {
            stmt.set_consistency(subs);
        }
        let attempts = level(cfg.attempt_consistency);
        st.insert_attempt.set_consistency(attempts);
        st.attempts.set_consistency(attempts);
        // Claims are lightweight transactions (Paxos, LOCAL_SERIAL), so that of two instances claiming
        // one key exactly one is applied; the commit at store.scylla.consistency.
        st.claim.set_consistency(subs);
        st.claim
            .set_serial_consistency(Some(scylla::statement::SerialConsistency::LocalSerial));
        // A serial read sees every applied claim (and completes one in progress).
        st.claimed
            .set_consistency(scylla::statement::Consistency::LocalSerial);
        Ok(ScyllaStore {
            session,
            st,
            ttl,
            describe: format!(
                "scylla {} keyspace {} (consistency {}, attempts {})",
                cfg.nodes.join(","),
                cfg.keyspace,
                cfg.consistency,
                cfg.attempt_consistency
            ),
        })
    }

    async fn bump(&self) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.st.bump, (Uuid::new_v4(), "subscriptions"))
            .await
            .map_err(StoreError::unavailable)?;
        Ok(())
    }

    async fn specs(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
        paging: PagingState,
    ) -> Result<(Vec<SubscriptionSpec>, PagingStateResponse), StoreError> {
        let (res, more) = self
            .session
            .execute_single_page(st, values, paging)
            .await
            .map_err(StoreError::unavailable)?;
        let rows = res.into_rows_result().map_err(StoreError::unavailable)?;
        let mut out = Vec::new();
        for r in rows.rows::<SpecRow>().map_err(StoreError::unavailable)? {
            out.push(from_row(r.map_err(StoreError::unavailable)?)?);
        }
        Ok((out, more))
    }
}

/// The driver's consistency level for a configured one.
fn level(c: Consistency) -> scylla::statement::Consistency {
    use scylla::statement::Consistency as C;
    match c {
        Consistency::One => C::One,
        Consistency::Two => C::Two,
        Consistency::Three => C::Three,
        Consistency::Quorum => C::Quorum,
        Consistency::All => C::All,
        Consistency::LocalQuorum => C::LocalQuorum,
        Consistency::LocalOne => C::LocalOne,
    }
}

fn ts(s: &Option<String>, field: &str, id: Uuid) -> Result<Option<CqlTimestamp>, StoreError> {
    match s {
        None => Ok(None),
        Some(t) => parse_rfc3339_ms(t)
            .map(|ms| Some(CqlTimestamp(ms as i64)))
            .map_err(|m| StoreError::Invalid {
                at: format!("subscription {id}.{field}"),
                message: m,
            }),
    }
}

fn from_row(r: SpecRow) -> Result<SubscriptionSpec, StoreError> {
    let id = r.id;
    let invalid = |field: &str, e: serde_json::Error| StoreError::Invalid {
        at: format!("subscription {id}.{field}"),
        message: e.to_string(),
    };
    let filter = match r.filter {
        Some(f) => Some(serde_json::from_str(&f).map_err(|e| invalid("filter", e))?),
        None => None,
    };
    let retired: Vec<RetiredSecret> = match r.retired_secrets {
        Some(s) => serde_json::from_str(&s).map_err(|e| invalid("retired_secrets", e))?,
        None => Vec::new(),
    };
    let retired_signing_keys: Vec<RetiredSecret> = match r.retired_signing_keys {
        Some(s) => serde_json::from_str(&s).map_err(|e| invalid("retired_signing_keys", e))?,
        None => Vec::new(),
    };
    let oauth2 = match r.oauth2 {
        Some(s) => Some(serde_json::from_str(&s).map_err(|e| invalid("oauth2", e))?),
        None => None,
    };
    Ok(SubscriptionSpec {
        id,
        tenant: r.tenant,
        url: r.url.unwrap_or_default(),
        event_types: r.event_types.unwrap_or_default(),
        filter,
        secrets: r.secrets.unwrap_or_default(),
        retired_secrets: retired,
        enabled: r.enabled.unwrap_or(false),
        rate_limit_per_sec: r.rate_limit_per_sec.map(|v| v.max(0) as u32),
        burst: r.burst.map(|v| v.max(0) as u32),
        max_in_flight: r.max_in_flight.map(|v| v.max(0) as u32),
        timeout_ms: r.timeout_ms.map(|v| v.max(0) as u64),
        headers: r.headers.unwrap_or_default(),
        created_at: r.created_at.map(|t| rfc3339_ms(t.0.max(0) as u64)),
        updated_at: r.updated_at.map(|t| rfc3339_ms(t.0.max(0) as u64)),
        adaptive_concurrency: r.adaptive_concurrency.unwrap_or(true),
        tls_client_cert: r.tls_client_cert,
        tls_client_key: r.tls_client_key,
        signing_keys: r.signing_keys.unwrap_or_default(),
        retired_signing_keys,
        secret_headers: r.secret_headers.unwrap_or_default(),
        oauth2,
        // An empty CQL list reads as null; an empty schedule is refused before it is stored.
        retry_tiers: r.retry_tiers.filter(|t| !t.is_empty()),
        max_attempts: r.max_attempts.map(|v| v.max(0) as u32),
        disabled_reason: r.disabled_reason,
        disabled_at: r.disabled_at.map(|t| rfc3339_ms(t.0.max(0) as u64)),
        ordering: match r.ordering.as_deref() {
            None => OrderingMode::None,
            Some(v) => OrderingMode::parse(v).ok_or_else(|| StoreError::Invalid {
                at: format!("subscription {id}.ordering"),
                message: format!("unknown value {v:?}"),
            })?,
        },
        ordering_key: r.ordering_key,
        on_dead_letter: match r.on_dead_letter.as_deref() {
            None => OnDeadLetter::Continue,
            Some(v) => OnDeadLetter::parse(v).ok_or_else(|| StoreError::Invalid {
                at: format!("subscription {id}.on_dead_letter"),
                message: format!("unknown value {v:?}"),
            })?,
        },
    })
}

fn cursor_bytes(c: &str) -> Result<Vec<u8>, StoreError> {
    URL_SAFE_NO_PAD.decode(c).map_err(|_| StoreError::BadCursor)
}

fn i32_of(v: Option<u32>) -> Option<i32> {
    v.map(|v| v.min(i32::MAX as u32) as i32)
}

#[async_trait]
impl Store for ScyllaStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn list(&self) -> Result<Vec<SubscriptionSpec>, StoreError> {
        let mut rows = self
            .session
            .execute_iter(self.st.list.clone(), ())
            .await
            .map_err(StoreError::unavailable)?
            .rows_stream::<SpecRow>()
            .map_err(StoreError::unavailable)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().await {
            out.push(from_row(r.map_err(StoreError::unavailable)?)?);
        }
        Ok(out)
    }

    async fn revision(&self) -> Result<Option<String>, StoreError> {
        let res = self
            .session
            .execute_unpaged(&self.st.revision, ("subscriptions",))
            .await
            .map_err(StoreError::unavailable)?
            .into_rows_result()
            .map_err(StoreError::unavailable)?;
        let v = res
            .maybe_first_row::<(Option<Uuid>,)>()
            .map_err(StoreError::unavailable)?
            .and_then(|r| r.0);
        // Never written yet: a stable value, so an empty keyspace is not reloaded on every poll.
        Ok(Some(v.map_or_else(|| "0".into(), |u| u.to_string())))
    }

    async fn page(
        &self,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<Page<SubscriptionSpec>, StoreError> {
        let paging = match cursor {
            Some(c) => PagingState::new_from_raw_bytes(cursor_bytes(c)?),
            None => PagingState::start(),
        };
        let mut st = self.st.list.clone();
        st.set_page_size(limit.clamp(1, 1000) as i32);
        let (items, more) = self.specs(&st, (), paging).await?;
        let next = match more {
            PagingStateResponse::HasMorePages { state } => state
                .as_bytes_slice()
                .map(|b| URL_SAFE_NO_PAD.encode(b.as_ref())),
            PagingStateResponse::NoMorePages => None,
        };
        Ok(Page { items, next })
    }

    async fn get(&self, id: Uuid) -> Result<Option<SubscriptionSpec>, StoreError> {
        let (mut v, _) = self
            .specs(&self.st.get, (id,), PagingState::start())
            .await?;
        Ok(v.pop())
    }

    async fn put(&self, s: &SubscriptionSpec) -> Result<(), StoreError> {
        let filter = s
            .filter
            .as_ref()
            .map(|f| serde_json::to_string(f).unwrap_or_default());
        let retired = if s.retired_secrets.is_empty() {
            None
        } else {
            Some(serde_json::to_string(&s.retired_secrets).unwrap_or_default())
        };
        let values = SpecValues {
            id: s.id,
            tenant: s.tenant.as_deref(),
            url: s.url.as_str(),
            event_types: &s.event_types,
            filter,
            secrets: &s.secrets,
            retired_secrets: retired,
            enabled: s.enabled,
            rate_limit_per_sec: i32_of(s.rate_limit_per_sec),
            burst: i32_of(s.burst),
            max_in_flight: i32_of(s.max_in_flight),
            timeout_ms: s.timeout_ms.map(|v| v.min(i64::MAX as u64) as i64),
            headers: &s.headers,
            created_at: ts(&s.created_at, "created_at", s.id)?,
            updated_at: ts(&s.updated_at, "updated_at", s.id)?,
            adaptive_concurrency: s.adaptive_concurrency,
            tls_client_cert: s.tls_client_cert.as_deref(),
            tls_client_key: s.tls_client_key.as_deref(),
            signing_keys: &s.signing_keys,
            retired_signing_keys: (!s.retired_signing_keys.is_empty())
                .then(|| serde_json::to_string(&s.retired_signing_keys).unwrap_or_default()),
            secret_headers: &s.secret_headers,
            oauth2: s
                .oauth2
                .as_ref()
                .map(|o| serde_json::to_string(o).unwrap_or_default()),
            retry_tiers: s.retry_tiers.as_deref(),
            max_attempts: i32_of(s.max_attempts),
            disabled_reason: s.disabled_reason.as_deref(),
            disabled_at: ts(&s.disabled_at, "disabled_at", s.id)?,
            ordering: (!s.ordering.is_none()).then(|| s.ordering.as_str()),
            ordering_key: s.ordering_key.as_deref(),
            on_dead_letter: (!s.on_dead_letter.is_continue()).then(|| s.on_dead_letter.as_str()),
        };
        self.session
            .execute_unpaged(&self.st.put, values)
            .await
            .map_err(StoreError::unavailable)?;
        self.bump().await
    }

    async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        if self.get(id).await?.is_none() {
            return Ok(false);
        }
        self.session
            .execute_unpaged(&self.st.delete, (id,))
            .await
            .map_err(StoreError::unavailable)?;
        self.bump().await?;
        Ok(true)
    }

    async fn write_attempts(&self, batch: &[AttemptRecord]) -> Result<(), StoreError> {
        let now = now_ms();
        let ttl_ms = self.ttl.as_millis() as u64;
        // Independent single-partition inserts, a few at a time (a multi-partition batch would make one
        // coordinator do all the work).
        let mut pending = futures_util::stream::FuturesUnordered::new();
        let insert = &self.st.insert_attempt;
        for a in batch {
            if !attempt_live(a.at_ms, self.ttl, now) {
                continue;
            }
            let left_s = (a.at_ms + ttl_ms).saturating_sub(now).div_ceil(1000).max(1);
            let values = (
                a.subscription_id,
                day_of(a.at_ms) as i32,
                CqlTimestamp(a.at_ms as i64),
                Uuid::new_v4(),
                a.event_id.clone(),
                a.event_type.clone(),
                a.attempt.min(i32::MAX as u32) as i32,
                a.result.clone(),
                a.status_code.map(i32::from),
                a.duration_ms.min(i32::MAX as u32) as i32,
                a.error.clone(),
                left_s.min(i32::MAX as u64) as i32,
            );
            pending.push(self.session.execute_unpaged(insert, values));
            if pending.len() >= 16
                && let Some(r) = pending.next().await
            {
                r.map_err(StoreError::unavailable)?;
            }
        }
        while let Some(r) = pending.next().await {
            r.map_err(StoreError::unavailable)?;
        }
        Ok(())
    }

    async fn attempts(
        &self,
        subscription: Uuid,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<Page<AttemptRecord>, StoreError> {
        let now = now_ms();
        let oldest_day = day_of(now.saturating_sub(self.ttl.as_millis() as u64));
        // Cursor: "<day>" to start a day partition afresh, or "<day>.<paging state>" to continue one.
        let (mut day, mut paging) = match cursor {
            None => (day_of(now), PagingState::start()),
            Some(c) => match c.split_once('.') {
                Some((d, p)) => (
                    d.parse().map_err(|_| StoreError::BadCursor)?,
                    PagingState::new_from_raw_bytes(cursor_bytes(p)?),
                ),
                None => (
                    c.parse().map_err(|_| StoreError::BadCursor)?,
                    PagingState::start(),
                ),
            },
        };
        let limit = limit.clamp(1, 1000) as usize;
        let mut items = Vec::with_capacity(limit);
        while day >= oldest_day {
            let mut st = self.st.attempts.clone();
            st.set_page_size((limit - items.len()) as i32);
            let (res, more) = self
                .session
                .execute_single_page(&st, (subscription, day as i32), paging)
                .await
                .map_err(StoreError::unavailable)?;
            let rows = res.into_rows_result().map_err(StoreError::unavailable)?;
            for r in rows.rows::<AttemptRow>().map_err(StoreError::unavailable)? {
                let r = r.map_err(StoreError::unavailable)?;
                let at_ms = r.0.0.max(0) as u64;
                if !attempt_live(at_ms, self.ttl, now) {
                    continue;
                }
                items.push(AttemptRecord {
                    subscription_id: subscription,
                    at_ms,
                    event_id: r.2,
                    event_type: r.3,
                    attempt: r.4.max(0) as u32,
                    result: r.5,
                    status_code: r.6.and_then(|c| u16::try_from(c).ok()),
                    duration_ms: r.7.max(0) as u32,
                    error: r.8,
                });
            }
            match more {
                PagingStateResponse::HasMorePages { state } => {
                    if items.len() >= limit {
                        let p = state
                            .as_bytes_slice()
                            .map(|b| URL_SAFE_NO_PAD.encode(b.as_ref()))
                            .unwrap_or_default();
                        return Ok(Page {
                            items,
                            next: Some(format!("{day}.{p}")),
                        });
                    }
                    paging = state;
                }
                PagingStateResponse::NoMorePages => {
                    day -= 1;
                    paging = PagingState::start();
                    if items.len() >= limit {
                        let next = (day >= oldest_day).then(|| day.to_string());
                        return Ok(Page { items, next });
                    }
                }
            }
        }
        Ok(Page { items, next: None })
    }

    async fn claim(&self, key: &str) -> Result<bool, StoreError> {
        let res = self
            .session
            .execute_unpaged(&self.st.claim, (key, CqlTimestamp(now_ms() as i64)))
            .await
            .map_err(StoreError::unavailable)?
            .into_rows_result()
            .map_err(StoreError::unavailable)?;
        // The first column of an LWT's answer is `[applied]`; a refused one adds the existing row.
        let row = res
            .maybe_first_row::<scylla::value::Row>()
            .map_err(StoreError::unavailable)?;
        Ok(matches!(
            row.as_ref().and_then(|r| r.columns.first()),
            Some(Some(scylla::value::CqlValue::Boolean(true)))
        ))
    }

    async fn claimed(&self, key: &str) -> Result<bool, StoreError> {
        let res = self
            .session
            .execute_unpaged(&self.st.claimed, (key,))
            .await
            .map_err(StoreError::unavailable)?
            .into_rows_result()
            .map_err(StoreError::unavailable)?;
        Ok(res.rows_num() > 0)
    }

    async fn put_token(&self, t: &ApiToken) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(
                &self.st.put_token,
                (
                    &t.hash,
                    t.id,
                    &t.tenant,
                    &t.name,
                    &t.created_at,
                    t.expires_at_ms.map(|m| CqlTimestamp(m as i64)),
                ),
            )
            .await
            .map_err(StoreError::unavailable)?;
        Ok(())
    }

    async fn tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let mut rows = self
            .session
            .execute_iter(self.st.tokens.clone(), ())
            .await
            .map_err(StoreError::unavailable)?
            .rows_stream::<TokenRow>()
            .map_err(StoreError::unavailable)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().await {
            out.push(token_of(r.map_err(StoreError::unavailable)?));
        }
        out.sort_by(|a, b| (&a.created_at, a.id).cmp(&(&b.created_at, b.id)));
        Ok(out)
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let res = self
            .session
            .execute_unpaged(&self.st.token, (hash,))
            .await
            .map_err(StoreError::unavailable)?
            .into_rows_result()
            .map_err(StoreError::unavailable)?;
        Ok(res
            .maybe_first_row::<TokenRow>()
            .map_err(StoreError::unavailable)?
            .map(token_of))
    }

    async fn delete_token(&self, id: Uuid) -> Result<bool, StoreError> {
        // Keyed by hash (what every request looks up); revocation by id is an admin action over
        // a small table.
        let Some(t) = self.tokens().await?.into_iter().find(|t| t.id == id) else {
            return Ok(false);
        };
        self.session
            .execute_unpaged(&self.st.delete_token, (&t.hash,))
            .await
            .map_err(StoreError::unavailable)?;
        Ok(true)
    }

    async fn expire_attempts(&self) -> Result<u64, StoreError> {
        // Rows carry their own TTL.
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_columns_are_found_in_the_schema() {
        let stmts = schema_statements("hl", "{'class': 'NetworkTopologyStrategy'}");
        let added: Vec<_> = stmts.iter().filter_map(|s| added_column(s)).collect();
        assert_eq!(
            added,
            [
                ("hl", "subscriptions", "adaptive_concurrency"),
                ("hl", "subscriptions", "tls_client_cert"),
                ("hl", "subscriptions", "tls_client_key"),
                ("hl", "subscriptions", "signing_keys"),
                ("hl", "subscriptions", "retired_signing_keys"),
                ("hl", "subscriptions", "secret_headers"),
                ("hl", "subscriptions", "oauth2"),
                ("hl", "subscriptions", "retry_tiers"),
                ("hl", "subscriptions", "max_attempts"),
                ("hl", "subscriptions", "disabled_reason"),
                ("hl", "subscriptions", "disabled_at"),
                ("hl", "subscriptions", "ordering"),
                ("hl", "subscriptions", "ordering_key"),
                ("hl", "subscriptions", "on_dead_letter"),
            ]
        );
        assert_eq!(added_column("alter table a.b drop c"), None);
        assert_eq!(added_column("CREATE TABLE a.b (c int PRIMARY KEY)"), None);
    }
}
