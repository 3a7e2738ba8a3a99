//! Store outages (DESIGN §10): deliveries go on from the cache, `/readyz` and a metric say so, attempt-log
//! writes are dropped and counted, and everything recovers without intervention. Once with the ScyllaDB
//! adapter on a real Apache Cassandra 5.0 node of the test's own (not ScyllaDB), stopped under load and
//! started again; once with the SQLite file moved away and back. The Cassandra run also drives
//! `hookline migrate` and `hookline subscriptions import` from the command line.

mod common;

use std::time::{Duration, Instant};

use common::cassandra::{CqlNode, keyspace};
use common::*;
use hookline::clock::now_ms;
use hookline::store::day_of;
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
async fn cassandra_stopped_under_load_keeps_delivering_and_recovers() {
    // A node of this test's own: it is stopped and started again.
    let node = CqlNode::start();
    println!(
        "{}: started in {:?}, {:.0} MiB resident",
        node.label(),
        node.started_in(),
        node.rss_mib()
    );
    let broker = Broker::shared();
    let topic = format!("o-{}", rand_suffix());
    broker.create_topic(&topic, 1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(broker, &[&topic], &format!("g-{}", rand_suffix()));
    let ks = keyspace("outage");
    let store = node.store_section(&ks, "");
    // The CLI: migrate (twice: idempotent) and import, with the same configuration.
    let cli_cfg = dir.path().join("cli.toml");
    std::fs::write(&cli_cfg, format!("{cfg}\n{store}")).unwrap();
    for _ in 0..2 {
        let out = node.migrate(&cli_cfg);
        assert!(out.contains("20 schema statements applied"), "{out}");
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

    // Load: 20 events a second, before, during and after the outage.
    let topic: &'static str = Box::leak(topic.into_boxed_str());
    let load = load(broker.bootstrap(), topic, 1, Duration::from_millis(50));
    let before = rx.count();
    rx.wait_for("deliveries under load", Duration::from_secs(10), |l| {
        l.len() >= before + 20
    })
    .await;

    // Outage: Cassandra stopped (SIGTERM: it drains and exits) under load.
    let rss = node.rss_mib();
    let stopped_in = node.stop();
    let down = Instant::now();
    let seen = wait_readyz(&h, 503, Duration::from_secs(10)).await;
    let (_, body) = readyz(&h).await;
    assert_eq!(body["store_reachable"], false, "{body}");
    assert_eq!(body["cache_loaded"], true);
    assert_eq!(h.metric("hookline_store_reachable").await, 0.0);
    println!(
        "{}: {rss:.0} MiB resident under load; stopped in {stopped_in:?}: /readyz 503 after {seen:?}",
        node.label()
    );
    // Deliveries go on from the cache (3 s of load).
    let at_stop = rx.count();
    rx.wait_for(
        "deliveries during the outage",
        Duration::from_secs(10),
        |l| l.len() >= at_stop + 60,
    )
    .await;
    let (st, e) = api.get("/v1/subscriptions").await;
    assert_eq!(st, 503, "{e}");
    // Health still answers, from the cache.
    let (st, health) = api
        .get(&format!("/v1/subscriptions/{}/health", sub_id(1)))
        .await;
    assert_eq!(st, 200, "{health}");
    assert_eq!(health["breaker"], "closed");
    assert_eq!(health["recent_attempts"], serde_json::Value::Null);
    // The attempt rows of the deliveries made during the outage cannot be written: dropped, counted.
    let t = Instant::now();
    while h.metric("hookline_attempt_log_dropped_total").await < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no attempt-log drop counted during the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Recovery, unattended: the same node started again on the same ports and data.
    let restart = Instant::now();
    let restarted_in = node.start_again();
    let outage = down.elapsed();
    let back = wait_readyz(&h, 200, Duration::from_secs(60)).await;
    assert_eq!(h.metric("hookline_store_reachable").await, 1.0);
    let from_cache = rx
        .received()
        .iter()
        .filter(|r| r.at >= down && r.at < restart + restarted_in + back)
        .count();
    println!(
        "{}: down {outage:?}, restarted in {restarted_in:?}; /readyz 200 {back:?} after it answered \
         (the driver reconnects and the store poll backs off, each up to a few seconds); \
         {from_cache} deliveries from the cache meanwhile",
        node.label()
    );
    let (st, page) = api.get("/v1/subscriptions").await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    // Every event the load producer had acknowledged was delivered.
    let acked = load.finish().await;
    rx.wait_acked(&acked.iter().cloned().collect(), Duration::from_secs(30))
        .await;
    assert_eq!(
        rx.duplicates(),
        0,
        "the first subscription got something twice"
    );
    // A subscription created through the API (the ScyllaDB adapter end to end) gets deliveries, and
    // their attempts are logged again.
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
    broker.produce(topic, &recs).await;
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
            "attempts not logged in Cassandra: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every attempt is accounted for: written or dropped; the database holds at least the written ones
    // (a batch that failed half way may have written some of its rows) and no more than all.
    let attempts = (rx.count() + rx2.count()) as f64;
    let t = Instant::now();
    let (written, dropped) = loop {
        let w = h.metric("hookline_attempt_log_written_total").await;
        let d = h.metric("hookline_attempt_log_dropped_total").await;
        if w + d >= attempts {
            break (w, d);
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{w} written + {d} dropped of {attempts} attempts"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(written + dropped, attempts);
    let session = node.session().await;
    let day = day_of(now_ms()) as i32;
    let mut rows = 0usize;
    for sub in [sub_id(1), id.to_string()] {
        for d in [day - 1, day] {
            rows += session
                .query_unpaged(
                    format!(
                        "SELECT seq FROM {ks}.delivery_attempts WHERE subscription_id = ? AND day = ?"
                    ),
                    (uuid::Uuid::parse_str(&sub).unwrap(), d),
                )
                .await
                .unwrap()
                .into_rows_result()
                .unwrap()
                .rows_num();
        }
    }
    assert!(
        (written as usize..=attempts as usize).contains(&rows),
        "{rows} attempt rows in the database; {written} written, {dropped} dropped of {attempts}"
    );
    println!(
        "{}: {attempts} attempts, {written} written, {dropped} dropped and counted; {rows} rows in the \
         database",
        node.label()
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
