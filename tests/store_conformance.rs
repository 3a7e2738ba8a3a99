//! One conformance suite for every subscription store (DESIGN §3): SQLite always; the ScyllaDB adapter
//! through the real `scylla` driver against the narrow CQL test server in `tests/cql_server` (which is not
//! ScyllaDB); a real ScyllaDB when `HOOKLINE_TEST_SCYLLA=host:port` is set; and the read paths of the
//! YAML store.

mod cql_server;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use hookline::clock::now_ms;
use hookline::config::ScyllaConfig;
use hookline::model::{RetiredSecret, SubscriptionSpec, rfc3339_ms};
use hookline::store::scylla::{ScyllaStore, migrate};
use hookline::store::sqlite::SqliteStore;
use hookline::store::yaml::YamlStore;
use hookline::store::{AttemptRecord, Store, StoreError};
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(30 * 86_400);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

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
async fn writable_suite(store: &dyn Store) {
    assert!(store.writable());
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

#[tokio::test]
async fn scylla_adapter_conforms_against_the_cql_test_server() {
    let server = cql_server::CqlServer::start().await;
    let cfg = ScyllaConfig {
        nodes: vec![server.addr.to_string()],
        keyspace: "hookline_test".into(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        ..ScyllaConfig::default()
    };
    let n = migrate(&cfg).await.unwrap();
    assert_eq!(
        n, 7,
        "schema statements (CREATE KEYSPACE, 3 tables, 3 columns added later)"
    );
    // Idempotent.
    migrate(&cfg).await.unwrap();
    let store = ScyllaStore::connect(&cfg, TTL).await.unwrap();
    writable_suite(&store).await;
    assert!(server.executed("prepare") >= 8);
    println!(
        "scylla adapter vs CQL test server (not ScyllaDB): conformance suite passed ({} selects, {} inserts)",
        server.executed("select"),
        server.executed("insert")
    );
}

#[tokio::test]
async fn scylla_store_conforms_on_a_real_scylladb() {
    let Ok(node) = std::env::var("HOOKLINE_TEST_SCYLLA") else {
        println!(
            "skipped: no ScyllaDB (set HOOKLINE_TEST_SCYLLA=host:port to run this suite on one)"
        );
        return;
    };
    let cfg = ScyllaConfig {
        nodes: vec![node],
        keyspace: format!("hookline_test_{}", Uuid::new_v4().simple()),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        ..ScyllaConfig::default()
    };
    migrate(&cfg).await.unwrap();
    let store = ScyllaStore::connect(&cfg, TTL).await.unwrap();
    writable_suite(&store).await;
    println!("scylladb {}: conformance suite passed", cfg.nodes[0]);
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
    // An edit of the file moves the revision.
    std::fs::write(&path, serde_yaml_ng::to_string(&specs[..3]).unwrap()).unwrap();
    assert_ne!(store.revision().await.unwrap(), rev);
    assert_eq!(store.list().await.unwrap().len(), 3);
    println!("yaml: read paths conform (writes refused as read-only)");
}
