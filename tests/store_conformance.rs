//! One conformance suite for every subscription store (DESIGN §3): SQLite always; the ScyllaDB adapter
//! through the real `scylla` driver against a real CQL database — a single-node Apache Cassandra 5.0
//! started by the tests (not ScyllaDB), or the database that `HOOKLINE_TEST_SCYLLA=host:port` names (a
//! real ScyllaDB) — with `hookline migrate` creating its keyspace and tables; and the read paths of the
//! YAML store. Beyond the suite, on the CQL database: a listing longer than three driver pages, attempt
//! rows expiring by their TTL, the configured consistency levels reaching the database, and two hookline
//! instances converging after 20 concurrent writers.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::cassandra::{CqlNode, keyspace};
use common::{Api, Broker, Hookline, base_config, rand_suffix};
use futures_util::StreamExt;
use hookline::clock::now_ms;
use hookline::config::{Consistency, ScyllaConfig};
use hookline::model::{
    ApiToken, OAuth2Spec, OnDeadLetter, OrderingMode, RetiredSecret, SubscriptionSpec,
    api_token_hash, rfc3339_ms,
};
use hookline::store::scylla::ScyllaStore;
use hookline::store::sqlite::SqliteStore;
use hookline::store::yaml::YamlStore;
use hookline::store::{AttemptRecord, Store, StoreError, day_of};
use scylla::client::session::Session;
use serde_json::json;
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(30 * 86_400);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// API tokens: stored and found by hash, listed oldest first, revoked by id; the subscription revision
/// does not move for them (instances do not reload subscriptions for a token).
async fn tokens_conform(store: &dyn Store) {
    let rev = store.revision().await.unwrap();
    let before = store.tokens().await.unwrap().len();
    let now = now_ms();
    let (a, token_a) = ApiToken::issue("acme".into(), Some("ci".into()), None, now).unwrap();
    let (b, _) = ApiToken::issue(
        "beta".into(),
        None,
        Some(Duration::from_secs(3600)),
        now + 1,
    )
    .unwrap();
    store.put_token(&a).await.unwrap();
    store.put_token(&b).await.unwrap();
    assert_eq!(api_token_hash(&token_a), a.hash);
    assert_eq!(
        store.token_by_hash(&a.hash).await.unwrap().as_ref(),
        Some(&a)
    );
    assert_eq!(
        store.token_by_hash(&b.hash).await.unwrap().as_ref(),
        Some(&b)
    );
    assert_eq!(
        store
            .token_by_hash(&api_token_hash("hlt_other"))
            .await
            .unwrap(),
        None
    );
    let all = store.tokens().await.unwrap();
    assert_eq!(all.len(), before + 2);
    let pos = |id: Uuid| all.iter().position(|t| t.id == id).unwrap();
    assert!(pos(a.id) < pos(b.id), "oldest first");
    assert!(store.delete_token(a.id).await.unwrap());
    assert!(!store.delete_token(a.id).await.unwrap(), "already revoked");
    assert_eq!(store.token_by_hash(&a.hash).await.unwrap(), None);
    assert!(store.delete_token(b.id).await.unwrap());
    assert_eq!(store.tokens().await.unwrap().len(), before);
    assert_eq!(store.revision().await.unwrap(), rev);
}

/// A subscription exercising every field (which ones are set varies with `i`).
fn spec(i: u32) -> SubscriptionSpec {
    let t = now_ms() - 60_000;
    SubscriptionSpec {
        id: Uuid::new_v4(),
        tenant: i.is_multiple_of(3).then(|| format!("tenant-{i}")),
        url: format!("https://hooks.example.com/{i}"),
        event_types: vec![format!("order.{i}"), "payment.*".into()],
        filter: i.is_multiple_of(4).then(|| {
            let mut f = BTreeMap::new();
            f.insert(
                "data.region".to_string(),
                serde_json::json!({"in": ["eu", "us"]}),
            );
            f.insert("data.vip".to_string(), serde_json::json!(true));
            f
        }),
        secrets: vec![SECRET.into()],
        retired_secrets: if i.is_multiple_of(5) {
            vec![RetiredSecret {
                secret: "whsec_dGhpcyBpcyBhIHNlY29uZCBzZWNyZXQ=".into(),
                expires_at: rfc3339_ms(t + 86_400_000),
            }]
        } else {
            vec![]
        },
        enabled: !i.is_multiple_of(7),
        disabled_reason: i.is_multiple_of(7).then(|| "gone".to_string()),
        disabled_at: i.is_multiple_of(7).then(|| rfc3339_ms(t + 1_000)),
        rate_limit_per_sec: i.is_multiple_of(2).then_some(100 + i),
        burst: i.is_multiple_of(2).then_some(10),
        max_in_flight: (i % 3 == 1).then_some(8),
        adaptive_concurrency: !i.is_multiple_of(3),
        timeout_ms: (i % 3 == 2).then_some(2_500 + u64::from(i)),
        headers: if i % 2 == 1 {
            [("x-team".to_string(), format!("team-{i}"))].into()
        } else {
            BTreeMap::new()
        },
        // Stores keep the PEM text as given (prepare checks it, not the store).
        tls_client_cert: (i % 4 == 1)
            .then(|| format!("-----BEGIN CERTIFICATE-----\ncert-{i}\n-----END CERTIFICATE-----\n")),
        tls_client_key: (i % 4 == 1)
            .then(|| format!("-----BEGIN PRIVATE KEY-----\nkey-{i}\n-----END PRIVATE KEY-----\n")),
        signing_keys: if i % 4 == 2 {
            vec![format!("whsk_key{i}")]
        } else {
            vec![]
        },
        retired_signing_keys: if i % 8 == 2 {
            vec![RetiredSecret {
                secret: format!("whsk_old{i}"),
                expires_at: rfc3339_ms(t + 3_600_000),
            }]
        } else {
            vec![]
        },
        secret_headers: if i.is_multiple_of(3) {
            [("x-api-key".to_string(), format!("key-{i}"))].into()
        } else {
            BTreeMap::new()
        },
        oauth2: (i % 5 == 1).then(|| OAuth2Spec {
            token_url: format!("https://auth.example.com/{i}/token"),
            client_id: format!("client-{i}"),
            client_secret: format!("secret-{i}"),
            scopes: if i.is_multiple_of(2) {
                vec![]
            } else {
                vec!["a".into(), "b:c".into()]
            },
            audience: i
                .is_multiple_of(3)
                .then(|| "https://api.example.com".to_string()),
            client_auth: i.is_multiple_of(4).then(|| "post".to_string()),
        }),
        retry_tiers: (i % 6 == 1).then(|| vec!["1m".to_string(), "30m".to_string()]),
        max_attempts: (i % 6 == 3).then_some(2),
        ordering: if i % 5 == 2 {
            OrderingMode::Key
        } else {
            OrderingMode::None
        },
        ordering_key: match i % 15 {
            2 => Some("subject".to_string()),
            7 => Some("data.customer.id".to_string()),
            _ => None,
        },
        on_dead_letter: if i % 10 == 7 {
            OnDeadLetter::Hold
        } else {
            OnDeadLetter::Continue
        },
        created_at: Some(rfc3339_ms(t)),
        updated_at: Some(rfc3339_ms(t + u64::from(i))),
    }
}

fn attempt(sub: Uuid, at_ms: u64, n: u32) -> AttemptRecord {
    AttemptRecord {
        subscription_id: sub,
        at_ms,
        event_id: format!("evt-{n}"),
        event_type: "order.created".into(),
        attempt: 1 + n % 3,
        result: if n.is_multiple_of(2) {
            "delivered"
        } else {
            "failed"
        }
        .into(),
        status_code: if n % 4 == 3 {
            None
        } else {
            Some(200 + (n % 2) as u16 * 303)
        },
        duration_ms: n * 7,
        error: (n % 2 == 1).then(|| format!("HTTP 503 ({n})")),
    }
}

/// Everything a writable store must do.
/// Returns the subscription whose 30 attempts it wrote (6 of them two days old).
async fn writable_suite(store: &dyn Store) -> Uuid {
    assert!(store.writable());
    // Claims: first writer wins, also when 20 race for one key.
    let key = format!("test:{}", Uuid::new_v4());
    let claims: Vec<bool> = futures_util::future::join_all((0..20).map(|_| store.claim(&key)))
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(claims.iter().filter(|c| **c).count(), 1, "{claims:?}");
    assert!(!store.claim(&key).await.unwrap(), "a claim is remembered");
    assert!(store.claimed(&key).await.unwrap());
    assert!(!store.claimed(&format!("{key}-never")).await.unwrap());
    assert!(store.claim(&format!("{key}-other")).await.unwrap());
    tokens_conform(store).await;
    let rev0 = store.revision().await.unwrap();
    assert_eq!(
        store.revision().await.unwrap(),
        rev0,
        "revision moves without writes"
    );

    // Create.
    let specs: Vec<SubscriptionSpec> = (1..=25).map(spec).collect();
    for s in &specs {
        store.put(s).await.unwrap();
    }
    let rev1 = store.revision().await.unwrap();
    assert_ne!(rev1, rev0, "revision did not move after writes");
    assert_eq!(store.revision().await.unwrap(), rev1);

    // Get: every field round-trips exactly.
    for s in &specs {
        let got = store
            .get(s.id)
            .await
            .unwrap()
            .expect("created subscription missing");
        assert_eq!(&got, s, "round trip of subscription {}", s.id);
    }
    assert_eq!(store.get(Uuid::new_v4()).await.unwrap(), None);

    // List.
    let mut all = store.list().await.unwrap();
    all.sort_by_key(|s| s.id);
    let mut want = specs.clone();
    want.sort_by_key(|s| s.id);
    assert_eq!(all, want);

    // Pagination: pages of 10 cover everything once, in a stable order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.page(cursor.as_deref(), 10).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 10);
        seen.extend(page.items.iter().map(|s| s.id));
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(seen.len(), 25, "pages returned {} items", seen.len());
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        25,
        "a page repeated items"
    );
    assert!((3..=4).contains(&pages), "{pages} pages of 10 for 25 items");
    let again: Vec<Uuid> = store
        .page(None, 10)
        .await
        .unwrap()
        .items
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(again, seen[..10], "first page differs between calls");
    assert!(matches!(
        store.page(Some("!!not-a-cursor!!"), 10).await,
        Err(StoreError::BadCursor)
    ));

    // Update.
    let mut changed = specs[3].clone();
    changed.url = "https://hooks.example.com/changed".into();
    changed.event_types = vec!["invoice.*".into()];
    changed.tenant = None;
    changed.filter = None;
    changed.headers.clear();
    changed.rate_limit_per_sec = Some(7);
    changed.burst = None;
    changed.adaptive_concurrency = !changed.adaptive_concurrency;
    store.put(&changed).await.unwrap();
    assert_eq!(
        store.get(changed.id).await.unwrap().as_ref(),
        Some(&changed)
    );
    let rev2 = store.revision().await.unwrap();
    assert_ne!(rev2, rev1);

    // Disable.
    let mut off = specs[4].clone();
    off.enabled = false;
    store.put(&off).await.unwrap();
    assert!(!store.get(off.id).await.unwrap().unwrap().enabled);
    assert_eq!(
        store.list().await.unwrap().len(),
        25,
        "disabled subscriptions stay listed"
    );

    // Rotate: the new secret first, the old one retired until a time.
    let mut rotated = specs[5].clone();
    rotated.retired_secrets = vec![RetiredSecret {
        secret: SECRET.into(),
        expires_at: rfc3339_ms(now_ms() + 3_600_000),
    }];
    rotated.secrets = vec!["whsec_bmV3IHNlY3JldCBhZnRlciByb3RhdGlvbg==".into()];
    store.put(&rotated).await.unwrap();
    assert_eq!(
        store.get(rotated.id).await.unwrap().as_ref(),
        Some(&rotated)
    );

    // Delete.
    assert!(store.delete(specs[6].id).await.unwrap());
    assert!(!store.delete(specs[6].id).await.unwrap());
    assert_eq!(store.get(specs[6].id).await.unwrap(), None);
    assert_eq!(store.list().await.unwrap().len(), 24);
    assert_ne!(store.revision().await.unwrap(), rev2);

    // Attempts: newest first, paged, per subscription, expired ones never returned.
    let a = specs[0].id;
    let b = specs[1].id;
    let now = now_ms();
    let mut batch = Vec::new();
    for n in 0..30u32 {
        // Two attempts share each millisecond; some are two days old (another day partition).
        let age = if n < 6 {
            2 * 86_400_000 + u64::from(n / 2)
        } else {
            u64::from(n / 2) * 10
        };
        batch.push(attempt(a, now - age, n));
    }
    for n in 0..5 {
        batch.push(attempt(b, now - 5, 100 + n));
    }
    // Older than the TTL.
    batch.push(attempt(a, now - TTL.as_millis() as u64 - 60_000, 200));
    batch.push(attempt(a, now - TTL.as_millis() as u64 - 1, 201));
    store.write_attempts(&batch).await.unwrap();

    let mut got = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.attempts(a, cursor.as_deref(), 7).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 7);
        got.extend(page.items);
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(pages < 20, "attempt pagination does not end");
    }
    assert_eq!(got.len(), 30, "attempts of A: {}", got.len());
    assert!(got.iter().all(|r| r.subscription_id == a));
    assert!(
        got.windows(2).all(|w| w[0].at_ms >= w[1].at_ms),
        "attempts not newest first"
    );
    let ids: HashSet<&str> = got.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!(ids.len(), 30, "an attempt was returned twice");
    assert!(
        !ids.contains("evt-200") && !ids.contains("evt-201"),
        "expired attempt returned"
    );
    let mut want: Vec<AttemptRecord> = batch
        .iter()
        .filter(|r| r.subscription_id == a && r.event_id != "evt-200" && r.event_id != "evt-201")
        .cloned()
        .collect();
    want.sort_by_key(|r| r.event_id.clone());
    got.sort_by_key(|r| r.event_id.clone());
    assert_eq!(got, want, "attempt fields round trip");
    assert_eq!(store.attempts(b, None, 50).await.unwrap().items.len(), 5);
    assert!(
        store
            .attempts(Uuid::new_v4(), None, 50)
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // Expiry: afterwards the live attempts are all still there.
    store.expire_attempts().await.unwrap();
    assert_eq!(store.attempts(a, None, 1000).await.unwrap().items.len(), 30);
    a
}

#[tokio::test]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("hookline.db"), TTL)
        .await
        .unwrap();
    writable_suite(&store).await;
    // SQLite deletes expired rows itself: the two written beyond the TTL are gone from the file.
    assert_eq!(
        store.expire_attempts().await.unwrap(),
        0,
        "expired rows were already deleted above"
    );
    println!("sqlite: conformance suite passed");
}

/// A config file for the CLI with a scylla `[store]` on `keyspace` of `node` (Kafka is not contacted by
/// `hookline migrate`).
fn cli_config(dir: &std::path::Path, node: &CqlNode, keyspace: &str) -> std::path::PathBuf {
    let path = dir.join("cli.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\n\"bootstrap.servers\" = \"127.0.0.1:9\"\n[source]\ntopics = [\"unused\"]\n{}",
            node.store_section(keyspace, "")
        ),
    )
    .unwrap();
    path
}

/// A fresh keyspace on the shared node, created by `hookline migrate` (run twice: idempotent).
fn migrated(node: &CqlNode, base: &str) -> (ScyllaConfig, tempfile::TempDir) {
    let ks = keyspace(base);
    let dir = tempfile::tempdir().unwrap();
    let cli = cli_config(dir.path(), node, &ks);
    for _ in 0..2 {
        let out = node.migrate(&cli);
        assert!(
            out.contains("20 schema statements applied"),
            "CREATE KEYSPACE, 5 tables, 14 columns added later: {out}"
        );
    }
    (node.scylla_config(&ks), dir)
}

/// Rows of `delivery_attempts` for `sub` in the day partitions `days`, read with the driver directly
/// (not through the store, which also hides rows older than its TTL): event id and remaining TTL.
async fn raw_attempts(
    session: &Session,
    keyspace: &str,
    sub: Uuid,
    days: std::ops::RangeInclusive<i64>,
) -> Vec<(String, Option<i32>)> {
    let q = format!(
        "SELECT event_id, TTL(event_id) FROM {keyspace}.delivery_attempts WHERE subscription_id = ? AND day = ?"
    );
    let mut out = Vec::new();
    for day in days {
        let rows = session
            .query_unpaged(q.as_str(), (sub, day as i32))
            .await
            .unwrap()
            .into_rows_result()
            .unwrap();
        for r in rows.rows::<(String, Option<i32>)>().unwrap() {
            out.push(r.unwrap());
        }
    }
    out
}

#[tokio::test]
async fn scylla_store_conforms() {
    let node = CqlNode::shared();
    let (cfg, _dir) = migrated(node, "conform");
    let store = ScyllaStore::connect(&cfg, TTL).await.unwrap();
    let a = writable_suite(&store).await;
    // Every attempt row carries the remaining part of the TTL: 30 days for the fresh ones, 28 for the
    // two-day-old ones (read back from the database).
    let session = node.session().await;
    let today = day_of(now_ms());
    let rows = raw_attempts(&session, &cfg.keyspace, a, today - 3..=today).await;
    assert_eq!(rows.len(), 30, "{rows:?}");
    let day = 86_400;
    let (old, fresh): (Vec<_>, Vec<_>) = rows
        .iter()
        .map(|(id, ttl)| (id, ttl.expect("attempt row without a TTL")))
        .partition(|(id, _)| id[4..].parse::<u32>().unwrap() < 6);
    assert_eq!(old.len(), 6);
    assert!(
        old.iter()
            .all(|(_, t)| (28 * day - 120..=28 * day).contains(t)),
        "two-day-old rows: {old:?}"
    );
    assert!(
        fresh
            .iter()
            .all(|(_, t)| (30 * day - 120..=30 * day).contains(t)),
        "fresh rows: {fresh:?}"
    );
    println!("{}: conformance suite passed", node.label());
}

#[tokio::test]
async fn scylla_listing_spans_more_than_three_driver_pages() {
    let node = CqlNode::shared();
    let (cfg, _dir) = migrated(node, "pages");
    let store = ScyllaStore::connect(&cfg, TTL).await.unwrap();
    // The full load pages 1 000 rows at a time: 3 500 subscriptions are four driver pages.
    const N: u32 = 3_500;
    let t = Instant::now();
    let specs: Vec<SubscriptionSpec> = (0..N).map(spec).collect();
    let mut puts =
        futures_util::stream::iter(specs.iter().map(|s| store.put(s))).buffer_unordered(64);
    while let Some(r) = puts.next().await {
        r.unwrap();
    }
    drop(puts);
    let written = t.elapsed();
    let want: HashSet<Uuid> = specs.iter().map(|s| s.id).collect();

    let t = Instant::now();
    let all = store.list().await.unwrap();
    let listed = t.elapsed();
    assert_eq!(all.len(), N as usize, "the full load");
    assert_eq!(all.iter().map(|s| s.id).collect::<HashSet<_>>(), want);
    let by_id: HashMap<Uuid, &SubscriptionSpec> = specs.iter().map(|s| (s.id, s)).collect();
    assert!(
        all.iter().all(|s| by_id[&s.id] == s),
        "a row changed in the listing"
    );

    // The API's listing: pages of 1 000 (the largest a client may ask for), cursor = paging state.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.page(cursor.as_deref(), 1000).await.unwrap();
        pages += 1;
        seen.extend(page.items.iter().map(|s| s.id));
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(
        seen.len(),
        N as usize,
        "API pages returned {} items",
        seen.len()
    );
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), want);
    assert!((4..=5).contains(&pages), "{pages} pages of 1 000 for {N}");
    println!(
        "{}: {N} subscriptions written in {written:?}, listed in {listed:?} (4 driver pages of 1 000); \
         API listing in {pages} pages of 1 000",
        node.label()
    );
}

#[tokio::test]
async fn scylla_attempt_rows_expire_by_their_ttl() {
    let node = CqlNode::shared();
    let (cfg, _dir) = migrated(node, "ttl");
    // A TTL of seconds (store.attempt_ttl is at least a minute in a config file; the store takes any).
    let ttl = Duration::from_secs(4);
    let store = ScyllaStore::connect(&cfg, ttl).await.unwrap();
    let sub = Uuid::new_v4();
    let now = now_ms();
    // Ten fresh attempts, and ten written 2 s after they were made: those keep only the 2 s left.
    let batch: Vec<AttemptRecord> = (0..20)
        .map(|n| attempt(sub, if n < 10 { now } else { now - 2_000 }, n))
        .collect();
    store.write_attempts(&batch).await.unwrap();
    let written = Instant::now();
    let session = node.session().await;
    let today = day_of(now);
    let rows = raw_attempts(&session, &cfg.keyspace, sub, today - 1..=today).await;
    assert_eq!(rows.len(), 20, "{rows:?}");
    for (id, t) in &rows {
        let n: u32 = id[4..].parse().unwrap();
        let max = if n < 10 { 4 } else { 2 };
        assert!(
            t.is_some_and(|t| (1..=max).contains(&t)),
            "{id}: TTL {t:?}, expected 1..={max} s"
        );
    }
    assert_eq!(
        store.attempts(sub, None, 100).await.unwrap().items.len(),
        20
    );

    // Read back until the database has dropped them: the older ten first, then the rest.
    let mut half = None;
    let gone = loop {
        let rows = raw_attempts(&session, &cfg.keyspace, sub, today - 1..=today).await;
        if rows.len() <= 10 && half.is_none() {
            assert!(
                rows.iter()
                    .all(|(id, _)| id[4..].parse::<u32>().unwrap() < 10),
                "the fresh rows expired first: {rows:?}"
            );
            half = Some(written.elapsed());
        }
        if rows.is_empty() {
            break written.elapsed();
        }
        assert!(
            written.elapsed() < Duration::from_secs(10),
            "attempt rows still in the database 10 s after a 4 s TTL: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let half = half.unwrap_or(gone);
    assert!(
        half >= Duration::from_millis(900),
        "rows with 2 s left gone after {half:?}"
    );
    assert!(
        gone >= Duration::from_millis(2_900),
        "rows with a 4 s TTL gone after {gone:?}"
    );
    assert!(
        store
            .attempts(sub, None, 100)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    println!(
        "{}: attempt rows with 2 s of TTL left gone from the database after {half:?}, with 4 s after {gone:?}",
        node.label()
    );
}

#[tokio::test]
async fn scylla_consistency_levels_reach_the_database() {
    let node = CqlNode::shared();
    let (cfg, _dir) = migrated(node, "consistency");
    // The keyspace has one replica: TWO cannot be met, ALL can (all = 1).
    let with = |subs: Consistency, attempts: Consistency| ScyllaConfig {
        consistency: subs,
        attempt_consistency: attempts,
        ..cfg.clone()
    };
    let s = spec(1);
    let a = attempt(s.id, now_ms(), 1);

    let two = ScyllaStore::connect(&with(Consistency::Two, Consistency::LocalOne), TTL)
        .await
        .unwrap();
    let e = two.put(&s).await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    let msg = e.to_string().to_ascii_lowercase();
    assert!(msg.contains("consistency") && msg.contains("two"), "{e}");
    assert!(
        two.revision().await.is_err(),
        "the revision read is at TWO too"
    );
    assert!(two.list().await.is_err(), "the full load is at TWO too");
    // The attempt log has its own level.
    two.write_attempts(std::slice::from_ref(&a)).await.unwrap();
    assert_eq!(two.attempts(s.id, None, 10).await.unwrap().items.len(), 1);

    let attempts_two = ScyllaStore::connect(&with(Consistency::All, Consistency::Two), TTL)
        .await
        .unwrap();
    attempts_two.put(&s).await.unwrap();
    assert_eq!(attempts_two.get(s.id).await.unwrap().as_ref(), Some(&s));
    assert!(attempts_two.write_attempts(&[a]).await.is_err());
    assert!(attempts_two.attempts(s.id, None, 10).await.is_err());
    println!(
        "{}: subscription statements at TWO refused on one replica ({e}); attempt rows at LOCAL_ONE \
         written; ALL accepted, attempt rows at TWO refused",
        node.label()
    );
}

const API_TOKEN: &str = "conformance-admin-token-0123456789";

/// One instance's cached view of the subscriptions as far as its API shows it: for each id, whether the
/// cache holds it (health's breaker is "disabled" otherwise) and its cached `adaptive_concurrency`;
/// plus the cache's size (`hookline_subscriptions_cached`).
async fn cached_view(
    h: &Hookline,
    api: &Api,
    ids: &[String],
) -> (usize, HashMap<String, Option<bool>>) {
    let n = h.metric("hookline_subscriptions_cached").await as usize;
    let healths = ids.iter().map(|id| async move {
        let (st, health) = api.get(&format!("/v1/subscriptions/{id}/health")).await;
        let cached = match st {
            200 if health["breaker"] == "disabled" => None,
            200 => Some(health["concurrency"]["adaptive"].as_bool().unwrap()),
            404 => None,
            _ => panic!("health of {id}: {st} {health}"),
        };
        (id.clone(), cached)
    });
    (
        n,
        futures_util::future::join_all(healths)
            .await
            .into_iter()
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_converge_after_20_concurrent_writers() {
    let node = CqlNode::shared();
    let broker = Broker::shared();
    let topic = broker.topic("conv", 2);
    let dir = tempfile::tempdir().unwrap();
    let ks = keyspace("converge");
    let cfg = base_config(broker, &[&topic], &format!("g-{}", rand_suffix()));
    let store = node.store_section(&ks, "");
    let cli = dir.path().join("cli.toml");
    std::fs::write(&cli, format!("{cfg}\n{store}")).unwrap();
    node.migrate(&cli);
    let mut h1 = Hookline::start_with_store(dir.path(), &cfg, &store, Some(API_TOKEN), &[]);
    let mut h2 = Hookline::start_with_store(dir.path(), &cfg, &store, Some(API_TOKEN), &[]);
    h1.wait_ready(Duration::from_secs(60)).await;
    h2.wait_ready(Duration::from_secs(60)).await;
    let apis = [Api::new(&h1, API_TOKEN), Api::new(&h2, API_TOKEN)];

    // 20 subscriptions, then 20 writers, each through one instance or the other at random, each making
    // 10 writes: PATCHes of enabled and adaptive_concurrency on subscriptions picked at random (so
    // writers collide on the same rows through different instances), one create, and for half of the
    // writers a delete of what they created.
    let mut ids = Vec::new();
    for i in 0..20 {
        let (st, s) = apis[i % 2]
            .post(
                "/v1/subscriptions",
                json!({"url": "https://hooks.example.com/conv", "event_types": [format!("conv.{i}")]}),
            )
            .await;
        assert_eq!(st, 201, "{s}");
        ids.push(s["id"].as_str().unwrap().to_string());
    }
    let t = Instant::now();
    let mut writers = Vec::new();
    for w in 0..20 {
        let apis = [Api::new(&h1, API_TOKEN), Api::new(&h2, API_TOKEN)];
        let ids = ids.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::new();
            let mut created = None;
            for round in 0..10 {
                let api = &apis[rng.usize(..2)];
                if round == 3 {
                    let (st, s) = api
                        .post(
                            "/v1/subscriptions",
                            json!({"url": "https://hooks.example.com/new", "event_types": ["conv.new"]}),
                        )
                        .await;
                    assert_eq!(st, 201, "{s}");
                    created = Some(s["id"].as_str().unwrap().to_string());
                } else if round == 7 && w % 2 == 0 {
                    let id = created.as_ref().unwrap();
                    let (st, e) = api.delete(&format!("/v1/subscriptions/{id}")).await;
                    assert_eq!(st, 204, "{e}");
                } else {
                    let id = &ids[rng.usize(..ids.len())];
                    let (st, e) = api
                        .patch(
                            &format!("/v1/subscriptions/{id}"),
                            json!({"enabled": rng.bool(), "adaptive_concurrency": rng.bool()}),
                        )
                        .await;
                    assert_eq!(st, 200, "{e}");
                }
            }
            created.unwrap()
        }));
    }
    let mut all_ids = ids.clone();
    for w in writers {
        all_ids.push(w.await.unwrap());
    }
    let t0 = Instant::now();
    let wrote = t0 - t;

    // The final state, read from the store (the API's listing reads the store, not a cache).
    let (st, page) = apis[0].get("/v1/subscriptions?limit=1000").await;
    assert_eq!(st, 200, "{page}");
    let listed = page["items"].as_array().unwrap();
    assert_eq!(listed.len(), 30, "20 + 20 created − 10 deleted: {page}");
    let mut want: HashMap<String, Option<bool>> = listed
        .iter()
        .map(|s| {
            let id = s["id"].as_str().unwrap().to_string();
            let cached = s["enabled"]
                .as_bool()
                .unwrap()
                .then(|| s["adaptive_concurrency"].as_bool().unwrap());
            (id, cached)
        })
        .collect();
    let enabled = want.values().filter(|v| v.is_some()).count();
    let disabled = ids.iter().filter(|id| want[*id].is_none()).count();
    assert!(
        disabled >= 3,
        "the writers left only {disabled} of the first 20 disabled: too few to tell a stale cache"
    );
    // Deleted ones must be gone from every cache.
    let deleted: Vec<String> = all_ids
        .iter()
        .filter(|id| !want.contains_key(*id))
        .cloned()
        .collect();
    assert_eq!(deleted.len(), 10);
    for id in &deleted {
        want.insert(id.clone(), None);
    }
    let check: Vec<String> = want.keys().cloned().collect();

    // Converged = a whole view matches (each view asks for all 30 at once, both instances in
    // parallel); the time is when that view was complete, an upper bound: a view takes ~1 s here.
    let views = || async {
        let (a, b) = tokio::join!(
            cached_view(&h1, &apis[0], &check),
            cached_view(&h2, &apis[1], &check)
        );
        [a, b]
    };
    let mut converged: [Option<Duration>; 2] = [None, None];
    let mut slowest_view = Duration::ZERO;
    while converged.iter().any(Option::is_none) {
        let v0 = Instant::now();
        let got = views().await;
        slowest_view = slowest_view.max(v0.elapsed());
        for (i, (n, view)) in got.iter().enumerate() {
            if converged[i].is_none() && *n == enabled && *view == want {
                converged[i] = Some(t0.elapsed());
            }
        }
        if converged.iter().any(Option::is_none) && t0.elapsed() > Duration::from_secs(5) {
            let diff: Vec<String> = got
                .iter()
                .enumerate()
                .map(|(i, (n, view))| {
                    let wrong = view.iter().filter(|(k, v)| want[*k] != **v).count();
                    format!(
                        "instance {}: {n} cached (want {enabled}), {wrong} subscriptions differ",
                        i + 1
                    )
                })
                .collect();
            panic!("caches did not converge within 5 s: {diff:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, t) in converged.iter().enumerate() {
        let t = t.unwrap();
        assert!(
            t <= Duration::from_secs(5),
            "instance {} converged only after {t:?}",
            i + 1
        );
    }
    // And stay converged (no later reload brings an older state back).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (i, (n, view)) in views().await.iter().enumerate() {
        assert!(
            *n == enabled && *view == want,
            "instance {} diverged again",
            i + 1
        );
    }
    println!(
        "{}: 20 writers × 10 writes through 2 instances in {wrote:?}; final state {enabled} of 30 \
         enabled, 10 deleted; caches converged by {:?} (instance 1) and {:?} (instance 2) after the \
         last write (upper bounds: one view of both caches took up to {slowest_view:?})",
        node.label(),
        converged[0].unwrap(),
        converged[1].unwrap()
    );
    drop((h1, h2));
}

#[tokio::test]
async fn yaml_store_read_paths_conform() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("subscriptions.yaml");
    let specs: Vec<SubscriptionSpec> = (1..=25).map(spec).collect();
    std::fs::write(&path, serde_yaml_ng::to_string(&specs).unwrap()).unwrap();
    let store = YamlStore::new(path.clone());
    assert!(!store.writable());
    let rev = store.revision().await.unwrap();
    assert_eq!(store.revision().await.unwrap(), rev);
    for s in &specs {
        assert_eq!(store.get(s.id).await.unwrap().as_ref(), Some(s));
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store.page(cursor.as_deref(), 10).await.unwrap();
        seen.extend(page.items.iter().map(|s| s.id));
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 25);
    assert_eq!(seen.len(), 25);
    assert!(matches!(
        store.put(&specs[0]).await,
        Err(StoreError::ReadOnly(_))
    ));
    assert!(matches!(
        store.delete(specs[0].id).await,
        Err(StoreError::ReadOnly(_))
    ));
    assert!(matches!(
        store.write_attempts(&[]).await,
        Err(StoreError::ReadOnly(_))
    ));
    // No tokens in a read-only store, and none can be made.
    let (t, _) = ApiToken::issue("acme".into(), None, None, now_ms()).unwrap();
    assert!(matches!(
        store.put_token(&t).await,
        Err(StoreError::ReadOnly(_))
    ));
    assert!(store.tokens().await.unwrap().is_empty());
    // An edit of the file moves the revision.
    std::fs::write(&path, serde_yaml_ng::to_string(&specs[..3]).unwrap()).unwrap();
    assert_ne!(store.revision().await.unwrap(), rev);
    assert_eq!(store.list().await.unwrap().len(), 3);
    println!("yaml: read paths conform (writes refused as read-only)");
}
