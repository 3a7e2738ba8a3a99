//! The embedded store: one SQLite file with the same two tables as the ScyllaDB schema (list-valued
//! fields as JSON text), plus a one-row revision counter that every write bumps in the same transaction.
//!
//! SQLite calls block, so each operation runs on tokio's blocking pool. One connection is kept and reused;
//! before each use the file's identity is checked, so a file that was moved away or replaced is reported
//! as an outage (and reopened when it is back) instead of being served from a stale descriptor. WAL mode
//! lets several hookline processes on one host share the file.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, params};
use uuid::Uuid;

use super::{AttemptRecord, Page, Store, StoreError, paged};
use crate::clock::now_ms;
use crate::model::{ApiToken, OnDeadLetter, OrderingMode, SubscriptionSpec};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS subscriptions (
    id TEXT PRIMARY KEY,
    tenant TEXT,
    url TEXT NOT NULL,
    event_types TEXT NOT NULL,
    filter TEXT,
    secrets TEXT NOT NULL,
    retired_secrets TEXT NOT NULL DEFAULT '[]',
    enabled INTEGER NOT NULL,
    rate_limit_per_sec INTEGER,
    burst INTEGER,
    max_in_flight INTEGER,
    timeout_ms INTEGER,
    headers TEXT NOT NULL DEFAULT '{}',
    created_at TEXT,
    updated_at TEXT,
    adaptive_concurrency INTEGER NOT NULL DEFAULT 1,
    tls_client_cert TEXT,
    tls_client_key TEXT,
    signing_keys TEXT NOT NULL DEFAULT '[]',
    retired_signing_keys TEXT NOT NULL DEFAULT '[]',
    secret_headers TEXT NOT NULL DEFAULT '{}',
    oauth2 TEXT,
    retry_tiers TEXT,
    max_attempts INTEGER,
    disabled_reason TEXT,
    disabled_at TEXT,
    ordering TEXT,
    ordering_key TEXT,
    on_dead_letter TEXT
);
CREATE TABLE IF NOT EXISTS delivery_attempts (
    seq INTEGER PRIMARY KEY,
    subscription_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    result TEXT NOT NULL,
    status_code INTEGER,
    duration_ms INTEGER NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS delivery_attempts_by_subscription
    ON delivery_attempts (subscription_id, at_ms DESC, seq DESC);
CREATE INDEX IF NOT EXISTS delivery_attempts_by_time ON delivery_attempts (at_ms);
CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    name TEXT,
    created_at TEXT NOT NULL,
    expires_at_ms INTEGER
);
CREATE TABLE IF NOT EXISTS revision (id INTEGER PRIMARY KEY CHECK (id = 0), value INTEGER NOT NULL);
INSERT OR IGNORE INTO revision (id, value) VALUES (0, 0);
";

/// Columns added after the first release, for files created by an earlier version
/// (`CREATE TABLE IF NOT EXISTS` leaves an existing table as it is).
const ADDED_COLUMNS: &[(&str, &str)] = &[
    (
        "adaptive_concurrency",
        "ALTER TABLE subscriptions ADD COLUMN adaptive_concurrency INTEGER NOT NULL DEFAULT 1",
    ),
    (
        "tls_client_cert",
        "ALTER TABLE subscriptions ADD COLUMN tls_client_cert TEXT",
    ),
    (
        "tls_client_key",
        "ALTER TABLE subscriptions ADD COLUMN tls_client_key TEXT",
    ),
    (
        "signing_keys",
        "ALTER TABLE subscriptions ADD COLUMN signing_keys TEXT NOT NULL DEFAULT '[]'",
    ),
    (
        "retired_signing_keys",
        "ALTER TABLE subscriptions ADD COLUMN retired_signing_keys TEXT NOT NULL DEFAULT '[]'",
    ),
    (
        "secret_headers",
        "ALTER TABLE subscriptions ADD COLUMN secret_headers TEXT NOT NULL DEFAULT '{}'",
    ),
    ("oauth2", "ALTER TABLE subscriptions ADD COLUMN oauth2 TEXT"),
    (
        "retry_tiers",
        "ALTER TABLE subscriptions ADD COLUMN retry_tiers TEXT",
    ),
    (
        "max_attempts",
        "ALTER TABLE subscriptions ADD COLUMN max_attempts INTEGER",
    ),
    (
        "disabled_reason",
        "ALTER TABLE subscriptions ADD COLUMN disabled_reason TEXT",
    ),
    (
        "disabled_at",
        "ALTER TABLE subscriptions ADD COLUMN disabled_at TEXT",
    ),
    (
        "ordering",
        "ALTER TABLE subscriptions ADD COLUMN ordering TEXT",
    ),
    (
        "ordering_key",
        "ALTER TABLE subscriptions ADD COLUMN ordering_key TEXT",
    ),
    (
        "on_dead_letter",
        "ALTER TABLE subscriptions ADD COLUMN on_dead_letter TEXT",
    ),
];

fn add_missing_columns(c: &Connection) -> rusqlite::Result<()> {
    let mut st = c.prepare("SELECT name FROM pragma_table_info('subscriptions')")?;
    let have: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    for (name, add) in ADDED_COLUMNS {
        if !have.iter().any(|h| h == name) {
            c.execute_batch(add)?;
        }
    }
    Ok(())
}

const COLUMNS: &str = "id, tenant, url, event_types, filter, secrets, retired_secrets, enabled, \
    rate_limit_per_sec, burst, max_in_flight, timeout_ms, headers, created_at, updated_at, \
    adaptive_concurrency, tls_client_cert, tls_client_key, signing_keys, retired_signing_keys, \
    secret_headers, oauth2, retry_tiers, max_attempts, disabled_reason, disabled_at, \
    ordering, ordering_key, on_dead_letter";

pub struct SqliteStore {
    path: PathBuf,
    ttl: Duration,
    /// The open connection and the inode it was opened on.
    conn: Arc<Mutex<Option<(Connection, u64)>>>,
    /// The attempt log's own connection, with `synchronous = NORMAL`: its commits are not flushed to
    /// disk one by one (WAL mode: an application crash loses nothing; a power loss may lose the last
    /// batches of attempt history, never subscriptions or tokens, whose connection stays `FULL`).
    /// A profile of the benchmark had 4.4 % of hookline's CPU in the attempt log's fsyncs.
    attempt_conn: Arc<Mutex<Option<(Connection, u64)>>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the file and its tables.
    pub async fn open(path: PathBuf, ttl: Duration) -> Result<SqliteStore, StoreError> {
        let p = path.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let c = Connection::open(&p)
                .map_err(|e| StoreError::unavailable(format!("{}: {e}", p.display())))?;
            c.busy_timeout(Duration::from_secs(5))
                .map_err(StoreError::unavailable)?;
            c.pragma_update(None, "journal_mode", "WAL")
                .map_err(StoreError::unavailable)?;
            c.execute_batch(SCHEMA)
                .map_err(|e| StoreError::unavailable(format!("{}: {e}", p.display())))?;
            add_missing_columns(&c)
                .map_err(|e| StoreError::unavailable(format!("{}: {e}", p.display())))?;
            Ok(())
        })
        .await
        .map_err(StoreError::unavailable)??;
        Ok(SqliteStore {
            path,
            ttl,
            conn: Arc::default(),
            attempt_conn: Arc::default(),
        })
    }

    /// Runs `f` on the connection in the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on(Arc::clone(&self.conn), "FULL", f).await
    }

    /// Runs `f` on the attempt log's connection in the blocking pool.
    async fn with_attempts<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on(Arc::clone(&self.attempt_conn), "NORMAL", f).await
    }

    /// Runs `f` on the connection in `slot` (opened with `synchronous`) in the blocking pool.
    async fn on<T: Send + 'static>(
        &self,
        slot: Arc<Mutex<Option<(Connection, u64)>>>,
        synchronous: &'static str,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            let ino = std::fs::metadata(&path)
                .map_err(|e| StoreError::unavailable(format!("{}: {e}", path.display())))?
                .ino();
            if guard.as_ref().is_none_or(|(_, i)| *i != ino) {
                *guard = None;
                let c = Connection::open_with_flags(
                    &path,
                    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(|e| StoreError::unavailable(format!("{}: {e}", path.display())))?;
                c.busy_timeout(Duration::from_secs(5))
                    .map_err(StoreError::unavailable)?;
                c.pragma_update(None, "synchronous", synchronous)
                    .map_err(StoreError::unavailable)?;
                *guard = Some((c, ino));
            }
            let Some((conn, _)) = guard.as_mut() else {
                return Err(StoreError::unavailable("no connection"));
            };
            let r = f(conn);
            if let Err(StoreError::Unavailable(_)) = &r {
                // Reopen next time: the file may have been replaced or repaired.
                *guard = None;
            }
            r
        })
        .await
        .map_err(StoreError::unavailable)?
    }
}

/// One `api_tokens` row (an id that is not a UUID is invalid content, not an outage).
fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<ApiToken, StoreError>> {
    let id: String = r.get(0)?;
    let expires: Option<i64> = r.get(5)?;
    Ok(match Uuid::parse_str(&id) {
        Ok(uuid) => Ok(ApiToken {
            id: uuid,
            hash: r.get(1)?,
            tenant: r.get(2)?,
            name: r.get(3)?,
            created_at: r.get(4)?,
            expires_at_ms: expires.map(|m| m.max(0) as u64),
        }),
        Err(_) => Err(StoreError::Invalid {
            at: format!("api_tokens {id:?}"),
            message: "id is not a UUID".into(),
        }),
    })
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn from_json<T: serde::de::DeserializeOwned>(
    id: &str,
    field: &str,
    s: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Invalid {
        at: format!("subscription {id}.{field}"),
        message: e.to_string(),
    })
}

/// A column holding a value this version does not know.
fn corrupt(id: &str, field: &str, v: &str) -> StoreError {
    StoreError::Invalid {
        at: format!("subscription {id}.{field}"),
        message: format!("unknown value {v:?}"),
    }
}

/// A nullable JSON column.
fn optional_json<T: serde::de::DeserializeOwned>(
    r: &rusqlite::Row<'_>,
    id: &str,
    i: usize,
    field: &str,
) -> Result<Option<T>, StoreError> {
    match r
        .get::<_, Option<String>>(i)
        .map_err(StoreError::unavailable)?
    {
        Some(text) => from_json(id, field, &text).map(Some),
        None => Ok(None),
    }
}

fn row_to_spec(r: &rusqlite::Row<'_>) -> Result<SubscriptionSpec, StoreError> {
    let get = |e: rusqlite::Error| StoreError::unavailable(e);
    let id: String = r.get(0).map_err(get)?;
    let uuid = Uuid::parse_str(&id).map_err(|e| StoreError::Invalid {
        at: format!("subscription {id:?}.id"),
        message: e.to_string(),
    })?;
    let filter: Option<String> = r.get(4).map_err(get)?;
    let oauth2 = optional_json(r, &id, 21, "oauth2")?;
    let retry_tiers = optional_json(r, &id, 22, "retry_tiers")?;
    Ok(SubscriptionSpec {
        id: uuid,
        tenant: r.get(1).map_err(get)?,
        url: r.get(2).map_err(get)?,
        event_types: from_json(&id, "event_types", &r.get::<_, String>(3).map_err(get)?)?,
        filter: match filter {
            Some(f) => Some(from_json(&id, "filter", &f)?),
            None => None,
        },
        secrets: from_json(&id, "secrets", &r.get::<_, String>(5).map_err(get)?)?,
        retired_secrets: from_json(&id, "retired_secrets", &r.get::<_, String>(6).map_err(get)?)?,
        enabled: r.get(7).map_err(get)?,
        rate_limit_per_sec: r.get(8).map_err(get)?,
        burst: r.get(9).map_err(get)?,
        max_in_flight: r.get(10).map_err(get)?,
        timeout_ms: r
            .get::<_, Option<i64>>(11)
            .map_err(get)?
            .map(|v| v.max(0) as u64),
        headers: from_json(&id, "headers", &r.get::<_, String>(12).map_err(get)?)?,
        created_at: r.get(13).map_err(get)?,
        updated_at: r.get(14).map_err(get)?,
        adaptive_concurrency: r.get(15).map_err(get)?,
        tls_client_cert: r.get(16).map_err(get)?,
        tls_client_key: r.get(17).map_err(get)?,
        signing_keys: from_json(&id, "signing_keys", &r.get::<_, String>(18).map_err(get)?)?,
        retired_signing_keys: from_json(
            &id,
            "retired_signing_keys",
            &r.get::<_, String>(19).map_err(get)?,
        )?,
        secret_headers: from_json(&id, "secret_headers", &r.get::<_, String>(20).map_err(get)?)?,
        oauth2,
        retry_tiers,
        max_attempts: r.get(23).map_err(get)?,
        disabled_reason: r.get(24).map_err(get)?,
        disabled_at: r.get(25).map_err(get)?,
        ordering: match r.get::<_, Option<String>>(26).map_err(get)?.as_deref() {
            None => OrderingMode::None,
            Some(v) => OrderingMode::parse(v).ok_or_else(|| corrupt(&id, "ordering", v))?,
        },
        ordering_key: r.get(27).map_err(get)?,
        on_dead_letter: match r.get::<_, Option<String>>(28).map_err(get)?.as_deref() {
            None => OnDeadLetter::Continue,
            Some(v) => OnDeadLetter::parse(v).ok_or_else(|| corrupt(&id, "on_dead_letter", v))?,
        },
    })
}

fn query_specs(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<SubscriptionSpec>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(StoreError::unavailable)?;
    let mut rows = stmt.query(params).map_err(StoreError::unavailable)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(StoreError::unavailable)? {
        out.push(row_to_spec(r)?);
    }
    Ok(out)
}

fn bump_revision(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute("UPDATE revision SET value = value + 1 WHERE id = 0", [])
        .map_err(StoreError::unavailable)?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite file {}", self.path.display())
    }

    async fn list(&self) -> Result<Vec<SubscriptionSpec>, StoreError> {
        self.with(|c| query_specs(c, &format!("SELECT {COLUMNS} FROM subscriptions"), []))
            .await
    }

    async fn revision(&self) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            let v: i64 = c
                .query_row("SELECT value FROM revision WHERE id = 0", [], |r| r.get(0))
                .map_err(StoreError::unavailable)?;
            Ok(Some(v.to_string()))
        })
        .await
    }

    async fn page(
        &self,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<Page<SubscriptionSpec>, StoreError> {
        let after = match cursor {
            Some(c) => Uuid::parse_str(c)
                .map_err(|_| StoreError::BadCursor)?
                .to_string(),
            None => String::new(),
        };
        let limit = limit.max(1);
        let items = self
            .with(move |c| {
                query_specs(
                    c,
                    &format!(
                        "SELECT {COLUMNS} FROM subscriptions WHERE id > ?1 ORDER BY id LIMIT ?2"
                    ),
                    params![after, limit + 1],
                )
            })
            .await?;
        Ok(paged(items, limit as usize, |s| s.id.to_string()))
    }

    async fn get(&self, id: Uuid) -> Result<Option<SubscriptionSpec>, StoreError> {
        let mut v = self
            .with(move |c| {
                query_specs(
                    c,
                    &format!("SELECT {COLUMNS} FROM subscriptions WHERE id = ?1"),
                    params![id.to_string()],
                )
            })
            .await?;
        Ok(v.pop())
    }

    async fn put(&self, spec: &SubscriptionSpec) -> Result<(), StoreError> {
        let s = spec.clone();
        self.with(move |c| {
            let tx = c.transaction().map_err(StoreError::unavailable)?;
            tx.execute(
                &format!(
                    "INSERT OR REPLACE INTO subscriptions ({COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
                     ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29)"
                ),
                params![
                    s.id.to_string(),
                    s.tenant,
                    s.url,
                    json(&s.event_types),
                    s.filter.as_ref().map(json),
                    json(&s.secrets),
                    json(&s.retired_secrets),
                    s.enabled,
                    s.rate_limit_per_sec,
                    s.burst,
                    s.max_in_flight,
                    s.timeout_ms.map(|v| v.min(i64::MAX as u64) as i64),
                    json(&s.headers),
                    s.created_at,
                    s.updated_at,
                    s.adaptive_concurrency,
                    s.tls_client_cert,
                    s.tls_client_key,
                    json(&s.signing_keys),
                    json(&s.retired_signing_keys),
                    json(&s.secret_headers),
                    s.oauth2.as_ref().map(json),
                    s.retry_tiers.as_ref().map(json),
                    s.max_attempts,
                    s.disabled_reason,
                    s.disabled_at,
                    (!s.ordering.is_none()).then(|| s.ordering.as_str()),
                    s.ordering_key,
                    (!s.on_dead_letter.is_continue()).then(|| s.on_dead_letter.as_str()),
                ],
            )
            .map_err(StoreError::unavailable)?;
            bump_revision(&tx)?;
            tx.commit().map_err(StoreError::unavailable)
        })
        .await
    }

    async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(StoreError::unavailable)?;
            let n = tx
                .execute(
                    "DELETE FROM subscriptions WHERE id = ?1",
                    params![id.to_string()],
                )
                .map_err(StoreError::unavailable)?;
            if n > 0 {
                bump_revision(&tx)?;
            }
            tx.commit().map_err(StoreError::unavailable)?;
            Ok(n > 0)
        })
        .await
    }

    async fn write_attempts(&self, batch: &[AttemptRecord]) -> Result<(), StoreError> {
        let batch = batch.to_vec();
        self.with_attempts(move |c| {
            let tx = c.transaction().map_err(StoreError::unavailable)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO delivery_attempts (subscription_id, at_ms, event_id, event_type, \
                         attempt, result, status_code, duration_ms, error) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    )
                    .map_err(StoreError::unavailable)?;
                for a in &batch {
                    stmt.execute(params![
                        a.subscription_id.to_string(),
                        a.at_ms as i64,
                        a.event_id,
                        a.event_type,
                        a.attempt,
                        a.result,
                        a.status_code,
                        a.duration_ms,
                        a.error,
                    ])
                    .map_err(StoreError::unavailable)?;
                }
            }
            tx.commit().map_err(StoreError::unavailable)
        })
        .await
    }

    async fn attempts(
        &self,
        subscription: Uuid,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<Page<AttemptRecord>, StoreError> {
        // Cursor: "<at_ms>.<seq>" of the last row returned.
        let (before_ms, before_seq) = match cursor {
            Some(c) => {
                let (a, b) = c.split_once('.').ok_or(StoreError::BadCursor)?;
                (
                    a.parse::<i64>().map_err(|_| StoreError::BadCursor)?,
                    b.parse::<i64>().map_err(|_| StoreError::BadCursor)?,
                )
            }
            None => (i64::MAX, i64::MAX),
        };
        let oldest = now_ms().saturating_sub(self.ttl.as_millis() as u64) as i64;
        let limit = limit.max(1);
        let rows = self
            .with(move |c| {
                let mut stmt = c
                    .prepare_cached(
                        "SELECT seq, at_ms, event_id, event_type, attempt, result, status_code, \
                         duration_ms, error FROM delivery_attempts \
                         WHERE subscription_id = ?1 AND at_ms > ?2 \
                         AND (at_ms < ?3 OR (at_ms = ?3 AND seq < ?4)) \
                         ORDER BY at_ms DESC, seq DESC LIMIT ?5",
                    )
                    .map_err(StoreError::unavailable)?;
                let rows = stmt
                    .query_map(
                        params![
                            subscription.to_string(),
                            oldest,
                            before_ms,
                            before_seq,
                            limit + 1
                        ],
                        |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                AttemptRecord {
                                    subscription_id: subscription,
                                    at_ms: r.get::<_, i64>(1)? as u64,
                                    event_id: r.get(2)?,
                                    event_type: r.get(3)?,
                                    attempt: r.get(4)?,
                                    result: r.get(5)?,
                                    status_code: r.get(6)?,
                                    duration_ms: r.get(7)?,
                                    error: r.get(8)?,
                                },
                            ))
                        },
                    )
                    .map_err(StoreError::unavailable)?;
                rows.collect::<Result<Vec<_>, _>>()
                    .map_err(StoreError::unavailable)
            })
            .await?;
        let page = paged(rows, limit as usize, |(seq, a)| {
            format!("{}.{seq}", a.at_ms)
        });
        Ok(Page {
            items: page.items.into_iter().map(|(_, a)| a).collect(),
            next: page.next,
        })
    }

    async fn claim(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.with(move |c| {
            let n = c
                .execute(
                    "INSERT OR IGNORE INTO claims (key, at_ms) VALUES (?1, ?2)",
                    params![key, now_ms() as i64],
                )
                .map_err(StoreError::unavailable)?;
            Ok(n == 1)
        })
        .await
    }

    async fn claimed(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.with(move |c| {
            let n: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM claims WHERE key = ?1",
                    params![key],
                    |r| r.get(0),
                )
                .map_err(StoreError::unavailable)?;
            Ok(n > 0)
        })
        .await
    }

    async fn put_token(&self, t: &ApiToken) -> Result<(), StoreError> {
        let t = t.clone();
        self.with(move |c| {
            c.execute(
                "INSERT INTO api_tokens (id, hash, tenant, name, created_at, expires_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    t.id.to_string(),
                    t.hash,
                    t.tenant,
                    t.name,
                    t.created_at,
                    t.expires_at_ms.map(|m| m as i64)
                ],
            )
            .map_err(StoreError::unavailable)?;
            Ok(())
        })
        .await
    }

    async fn tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        self.with(|c| {
            let mut st = c
                .prepare(
                    "SELECT id, hash, tenant, name, created_at, expires_at_ms FROM api_tokens \
                     ORDER BY created_at, id",
                )
                .map_err(StoreError::unavailable)?;
            let rows = st
                .query_map([], token_row)
                .map_err(StoreError::unavailable)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r.map_err(StoreError::unavailable)??);
            }
            Ok(out)
        })
        .await
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let hash = hash.to_string();
        self.with(move |c| {
            let mut st = c
                .prepare(
                    "SELECT id, hash, tenant, name, created_at, expires_at_ms FROM api_tokens \
                     WHERE hash = ?1",
                )
                .map_err(StoreError::unavailable)?;
            let mut rows = st
                .query_map(params![hash], token_row)
                .map_err(StoreError::unavailable)?;
            match rows.next() {
                Some(r) => Ok(Some(r.map_err(StoreError::unavailable)??)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn delete_token(&self, id: Uuid) -> Result<bool, StoreError> {
        self.with(move |c| {
            let n = c
                .execute(
                    "DELETE FROM api_tokens WHERE id = ?1",
                    params![id.to_string()],
                )
                .map_err(StoreError::unavailable)?;
            Ok(n == 1)
        })
        .await
    }

    async fn expire_attempts(&self) -> Result<u64, StoreError> {
        let ttl = self.ttl;
        self.with(move |c| {
            let old_claims = now_ms().saturating_sub(super::CLAIM_TTL.as_millis() as u64) as i64;
            c.execute("DELETE FROM claims WHERE at_ms <= ?1", params![old_claims])
                .map_err(StoreError::unavailable)?;
            let oldest = now_ms().saturating_sub(ttl.as_millis() as u64) as i64;
            let n = c
                .execute(
                    "DELETE FROM delivery_attempts WHERE at_ms <= ?1",
                    params![oldest],
                )
                .map_err(StoreError::unavailable)?;
            Ok(n as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paged_cuts_and_names_the_last_key() {
        let p = paged(vec![1, 2, 3], 2, |x| x.to_string());
        assert_eq!(p.items, vec![1, 2]);
        assert_eq!(p.next.as_deref(), Some("2"));
        let p = paged(vec![1, 2], 2, |x| x.to_string());
        assert_eq!(p.next, None);
    }

    #[tokio::test]
    async fn attempts_commit_without_fsync_and_everything_else_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("s.db"), Duration::from_secs(60))
            .await
            .unwrap();
        let rec = AttemptRecord {
            subscription_id: Uuid::nil(),
            at_ms: now_ms(),
            event_id: "e".into(),
            event_type: "t".into(),
            attempt: 1,
            result: "delivered".into(),
            status_code: Some(204),
            duration_ms: 1,
            error: None,
        };
        store.write_attempts(&[rec]).await.unwrap();
        store.claim("k").await.unwrap();
        let level = |c: &mut Connection| -> Result<i64, StoreError> {
            c.query_row("PRAGMA synchronous", [], |r| r.get(0))
                .map_err(StoreError::unavailable)
        };
        // 1 = NORMAL, 2 = FULL.
        assert_eq!(store.with_attempts(level).await.unwrap(), 1);
        assert_eq!(store.with(level).await.unwrap(), 2);
        assert_eq!(
            store
                .attempts(Uuid::nil(), None, 10)
                .await
                .unwrap()
                .items
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn a_file_of_an_earlier_version_gains_the_new_columns_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // The subscriptions table as the first release created it.
            let c = Connection::open(&path).unwrap();
            let old = SCHEMA.replace(
                ",\n    adaptive_concurrency INTEGER NOT NULL DEFAULT 1,\n    tls_client_cert TEXT,\n    tls_client_key TEXT,\n    signing_keys TEXT NOT NULL DEFAULT '[]',\n    retired_signing_keys TEXT NOT NULL DEFAULT '[]',\n    secret_headers TEXT NOT NULL DEFAULT '{}',\n    oauth2 TEXT,\n    retry_tiers TEXT,\n    max_attempts INTEGER,\n    disabled_reason TEXT,\n    disabled_at TEXT",
                "",
            );
            assert_ne!(old, SCHEMA, "the test removes the column");
            c.execute_batch(&old).unwrap();
            c.execute(
                "INSERT INTO subscriptions (id, url, event_types, secrets, enabled) \
                 VALUES ('6f1c2a54-6d0e-4c57-9d43-3f0c2b1a0001', 'https://x.example/h', '[\"a.*\"]', \
                 '[\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]', 1)",
                [],
            )
            .unwrap();
        }
        let s = SqliteStore::open(path.clone(), Duration::from_secs(60))
            .await
            .unwrap();
        let all = s.list().await.unwrap();
        assert_eq!(all.len(), 1);
        assert!(
            all[0].adaptive_concurrency,
            "an old row reads as the default"
        );
        assert!(all[0].tls_client_cert.is_none() && all[0].tls_client_key.is_none());
        assert!(all[0].signing_keys.is_empty() && all[0].secret_headers.is_empty());
        assert!(all[0].oauth2.is_none() && all[0].retry_tiers.is_none());
        assert_eq!(all[0].max_attempts, None);
        let mut off = all[0].clone();
        off.adaptive_concurrency = false;
        off.tls_client_cert = Some("-----BEGIN CERTIFICATE-----".into());
        off.tls_client_key = Some("-----BEGIN PRIVATE KEY-----".into());
        off.signing_keys = vec!["whsk_a".into()];
        off.retired_signing_keys = vec![crate::model::RetiredSecret {
            secret: "whsk_b".into(),
            expires_at: "2030-01-01T00:00:00.000Z".into(),
        }];
        off.secret_headers.insert("x-api-key".into(), "k".into());
        off.oauth2 = Some(crate::model::OAuth2Spec {
            token_url: "https://auth.example/t".into(),
            client_id: "c".into(),
            client_secret: "s".into(),
            scopes: vec!["a".into()],
            audience: None,
            client_auth: Some("post".into()),
        });
        off.retry_tiers = Some(vec!["1m".into()]);
        off.max_attempts = Some(3);
        s.put(&off).await.unwrap();
        assert_eq!(s.get(off.id).await.unwrap(), Some(off));
        // Opening again finds the column and adds nothing.
        drop(s);
        SqliteStore::open(path, Duration::from_secs(60))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn expired_rows_are_deleted_and_a_moved_file_is_an_outage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.db");
        let ttl = Duration::from_secs(3600);
        let s = SqliteStore::open(path.clone(), ttl).await.unwrap();
        let id = Uuid::new_v4();
        let rec = |at_ms| AttemptRecord {
            subscription_id: id,
            at_ms,
            event_id: "e".into(),
            event_type: "t".into(),
            attempt: 1,
            result: "delivered".into(),
            status_code: Some(200),
            duration_ms: 3,
            error: None,
        };
        let now = now_ms();
        s.write_attempts(&[rec(now - 7_200_000), rec(now - 10), rec(now)])
            .await
            .unwrap();
        assert_eq!(s.expire_attempts().await.unwrap(), 1);
        assert_eq!(s.expire_attempts().await.unwrap(), 0);
        let n: i64 = s
            .with(|c| {
                c.query_row("SELECT count(*) FROM delivery_attempts", [], |r| r.get(0))
                    .map_err(StoreError::unavailable)
            })
            .await
            .unwrap();
        assert_eq!(n, 2);

        let away = dir.path().join("away.db");
        std::fs::rename(&path, &away).unwrap();
        assert!(matches!(s.list().await, Err(StoreError::Unavailable(_))));
        std::fs::rename(&away, &path).unwrap();
        assert!(s.list().await.unwrap().is_empty());
    }
}
