//! Store outages (DESIGN §10): deliveries go on from the cache, `/readyz` and a metric say so, attempt-log
//! writes are dropped and counted, and everything recovers without intervention. Once with the ScyllaDB
//! adapter against the CQL test server (stopped and restarted; it is test scaffolding, not ScyllaDB), once
//! with the SQLite file moved away and back. The ScyllaDB run also drives `hookline migrate` and
//! `hookline subscriptions import` from the command line.

mod common;
mod cql_server;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const TOKEN: &str = "outage-test-token-0123456789";

async fn readyz(h: &Hookline) -> (u16, serde_json::Value) {
    let r = http()
        .get(format!("http://{}/readyz", h.admin))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (
        st,
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap(),
    )
}

/// Waits until `/readyz` answers `status`; returns how long that took.
async fn wait_readyz(h: &Hookline, status: u16, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let (st, body) = readyz(h).await;
        if st == status {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "/readyz still {st} {body} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cli(args: &[&str], config: &std::path::Path) -> (bool, String) {
    let config = config.to_str().unwrap();
    let r = hookline_cli(&[args, &["--config", config]].concat(), &[]);
    (r.code == 0, r.all())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scylla_store_outage_keeps_delivering_and_recovers() {
    let server = cql_server::CqlServer::start().await;
    let broker = Broker::shared();
    let topic = format!("o-{}", rand_suffix());
    broker.create_topic(&topic, 1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(broker, &[&topic], &format!("g-{}", rand_suffix()));
    let store = format!(
        "[store]\nkind = \"scylla\"\nrefresh_interval = \"500ms\"\n[store.scylla]\nnodes = [\"{}\"]\nkeyspace = \"hookline\"\nreplication = \"{{'class': 'SimpleStrategy', 'replication_factor': 1}}\"\n",
        server.addr
    );
    // The CLI: migrate (twice: idempotent) and import, with the same configuration.
    let cli_cfg = dir.path().join("cli.toml");
    std::fs::write(&cli_cfg, format!("{cfg}\n{store}")).unwrap();
    for _ in 0..2 {
        let (ok, out) = cli(&["migrate"], &cli_cfg);
        assert!(ok, "{out}");
        assert!(out.contains("7 schema statements applied"), "{out}");
    }
    let rx = Receiver::ok().await;
    let subs = dir.path().join("import.yaml");
    std::fs::write(
        &subs,
        serde_yaml_ng::to_string(&[sub(1, &rx.url(), &["order.*"])]).unwrap(),
    )
    .unwrap();
    let (ok, out) = cli(
        &["subscriptions", "import", subs.to_str().unwrap()],
        &cli_cfg,
    );
    assert!(ok, "{out}");
    assert!(out.contains("imported 1 subscriptions"), "{out}");
    let (ok, out) = cli(&["subscriptions", "list"], &cli_cfg);
    assert!(
        ok && out.contains(&sub_id(1)) && out.contains("enabled"),
        "{out}"
    );

    let mut h = Hookline::start_with_store(dir.path(), &cfg, &store, Some(TOKEN), &[]);
    h.wait_ready(Duration::from_secs(30)).await;
    let api = Api::new(&h, TOKEN);
    let recs: Vec<Record> = (0..5)
        .map(|i| Record::json(0, plain_event(i, "order.created", None)))
        .collect();
    broker.produce(&topic, &recs).await;
    rx.wait_acked(&ids(0..5), Duration::from_secs(10)).await;

    // Outage.
    server.stop();
    let seen = wait_readyz(&h, 503, Duration::from_secs(8)).await;
    let (_, body) = readyz(&h).await;
    assert_eq!(body["store_reachable"], false, "{body}");
    assert_eq!(body["cache_loaded"], true);
    assert_eq!(h.metric("hookline_store_reachable").await, 0.0);
    println!("CQL test server stopped: /readyz 503 after {seen:?}");
    let recs: Vec<Record> = (5..10)
        .map(|i| Record::json(0, plain_event(i, "order.created", None)))
        .collect();
    broker.produce(&topic, &recs).await;
    rx.wait_acked(&ids(5..10), Duration::from_secs(10)).await;
    let (st, e) = api.get("/v1/subscriptions").await;
    assert_eq!(st, 503, "{e}");
    // Health still answers, from the cache.
    let (st, health) = api
        .get(&format!("/v1/subscriptions/{}/health", sub_id(1)))
        .await;
    assert_eq!(st, 200, "{health}");
    assert_eq!(health["breaker"], "closed");
    assert_eq!(health["recent_attempts"], serde_json::Value::Null);
    // The attempt rows of the deliveries made during the outage could not be written.
    let t = Instant::now();
    while h.metric("hookline_attempt_log_dropped_total").await < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "no attempt-log drop counted during the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Recovery, unattended.
    server.resume().await;
    let back = wait_readyz(&h, 200, Duration::from_secs(60)).await;
    println!("CQL test server back: /readyz 200 after {back:?}");
    assert_eq!(h.metric("hookline_store_reachable").await, 1.0);
    let (st, page) = api.get("/v1/subscriptions").await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    // A subscription created through the API (the ScyllaDB adapter end to end) gets deliveries.
    let rx2 = Receiver::ok().await;
    let (st, s) = api
        .post(
            "/v1/subscriptions",
            json!({"url": rx2.url(), "event_types": ["invoice.*"]}),
        )
        .await;
    assert_eq!(st, 201, "{s}");
    let recs: Vec<Record> = (20..23)
        .map(|i| Record::json(0, plain_event(i, "invoice.paid", None)))
        .collect();
    broker.produce(&topic, &recs).await;
    rx2.wait_acked(&ids(20..23), Duration::from_secs(10)).await;
    let id = s["id"].as_str().unwrap();
    let t = Instant::now();
    loop {
        let (_, page) = api.get(&format!("/v1/subscriptions/{id}/attempts")).await;
        if page["items"].as_array().is_some_and(|a| a.len() == 3) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "attempts not logged in ScyllaDB: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rx.count(),
        10,
        "the first subscription got something twice or missed something"
    );
    drop(h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_moved_away_keeps_delivering_and_recovers() {
    let env = SqliteEnv::new(1);
    let (broker, topic, db) = (&env.broker, &env.topic, &env.db);
    let h = env.hookline(TOKEN).await;
    let api = Api::new(&h, TOKEN);
    let rx = Receiver::ok().await;
    let (st, _) = api
        .post(
            "/v1/subscriptions",
            json!({"url": rx.url(), "event_types": ["order.*"]}),
        )
        .await;
    assert_eq!(st, 201);
    let recs: Vec<Record> = (0..5)
        .map(|i| Record::json(0, plain_event(i, "order.created", None)))
        .collect();
    broker.produce(topic, &recs).await;
    rx.wait_acked(&ids(0..5), Duration::from_secs(10)).await;

    let away = env.dir.path().join("elsewhere.db");
    std::fs::rename(db, &away).unwrap();
    let seen = wait_readyz(&h, 503, Duration::from_secs(5)).await;
    println!("sqlite file moved away: /readyz 503 after {seen:?}");
    let recs: Vec<Record> = (5..10)
        .map(|i| Record::json(0, plain_event(i, "order.created", None)))
        .collect();
    broker.produce(topic, &recs).await;
    rx.wait_acked(&ids(5..10), Duration::from_secs(10)).await;
    let (st, e) = api
        .post(
            "/v1/subscriptions",
            json!({"url": rx.url(), "event_types": ["x.*"]}),
        )
        .await;
    assert_eq!(st, 503, "{e}");
    let t = Instant::now();
    while h.metric("hookline_attempt_log_dropped_total").await < 5.0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "attempt rows of the outage not counted as dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    std::fs::rename(&away, db).unwrap();
    // The poll backs off to at most 5 s while the store fails.
    let back = wait_readyz(&h, 200, Duration::from_secs(10)).await;
    println!("sqlite file back: /readyz 200 after {back:?}");
    let (st, page) = api.get("/v1/subscriptions").await;
    assert_eq!(st, 200);
    assert_eq!(
        page["items"].as_array().unwrap().len(),
        1,
        "the refused create wrote something"
    );
    assert_eq!(rx.count(), 10);
    drop(h);
}
