//! The admin API end to end (issue 4): a real Apache Kafka broker, real receivers, hookline processes on
//! a writable store: SQLite, and for the change propagation between two instances also the ScyllaDB
//! adapter on a real Apache Cassandra 5.0 node (not ScyllaDB).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::cassandra::{CqlNode, keyspace};
use common::*;
use hookline::deliver::sign;
use hookline::model::SigningKey;
use serde_json::json;

const TOKEN: &str = "test-admin-token-0123456789";

/// Produces two events (one per partition) every 40 ms, alternating order.created / order.updated,
/// until stopped. Ids: `p<partition>-<n>`.
fn steady_producer(
    broker: &'static Broker,
    topic: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let ty = if n.is_multiple_of(2) {
                "order.created"
            } else {
                "order.updated"
            };
            let recs: Vec<Record> = (0..2)
                .map(|p| {
                    Record::json(
                        p,
                        json!({"id": format!("p{p}-{n}"), "type": ty, "data": {"n": n}}),
                    )
                })
                .collect();
            broker.produce(&topic, &recs).await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        n
    })
}

fn partition_of(r: &Received) -> char {
    r.webhook_id.chars().nth(1).unwrap_or('?')
}

/// Waits until `pred` holds for some received request that arrived after `since`; returns when.
async fn first_after(
    rx: &Receiver,
    since: Instant,
    limit: Duration,
    pred: impl Fn(&Received) -> bool,
) -> Duration {
    let deadline = since + limit;
    loop {
        if let Some(r) = rx.received().iter().find(|r| r.at >= since && pred(r)) {
            return r.at - since;
        }
        assert!(
            Instant::now() < deadline,
            "nothing matching arrived within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn verifies(secret: &str, r: &Received) -> bool {
    let key = SigningKey::parse(secret).unwrap();
    let ts: u64 = r.headers["webhook-timestamp"].parse().unwrap();
    sign::verify(
        &key,
        r.webhook_id.as_bytes(),
        ts,
        &r.headers["webhook-signature"],
        &r.body,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_changes_reach_every_instance_within_5s() {
    // Two instances in one group, sharing one SQLite file.
    let env = SqliteEnv::new(2);
    let (h1, h2) = tokio::join!(env.hookline(TOKEN), env.hookline(TOKEN));
    changes_reach_both_instances(env.broker, env.topic.clone(), h1, h2, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_changes_reach_every_instance_within_5s_on_cassandra() {
    // The same with store.kind = "scylla": two instances on one keyspace of a real Apache Cassandra 5.0
    // node (or the database HOOKLINE_TEST_SCYLLA names), created by `hookline migrate`.
    let node = CqlNode::shared();
    let broker = Broker::shared();
    let topic = broker.topic("api", 2);
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(broker, &[&topic], &format!("g-{}", rand_suffix()));
    let store = node.store_section(&keyspace("api"), "");
    let cli = dir.path().join("cli.toml");
    std::fs::write(&cli, format!("{cfg}\n{store}")).unwrap();
    node.migrate(&cli);
    let mut h1 = Hookline::start_with_store(dir.path(), &cfg, &store, Some(TOKEN), &[]);
    let mut h2 = Hookline::start_with_store(dir.path(), &cfg, &store, Some(TOKEN), &[]);
    h1.wait_ready(Duration::from_secs(60)).await;
    h2.wait_ready(Duration::from_secs(60)).await;
    changes_reach_both_instances(broker, topic, h1, h2, &node.label()).await;
}

/// Create, patch, disable, enable and rotate through either instance of two in one group, under a
/// steady load: each change shows in the deliveries of both instances (one partition each) within 5 s.
async fn changes_reach_both_instances(
    broker: &'static Broker,
    topic: String,
    h1: Hookline,
    h2: Hookline,
    store: &str,
) {
    let (api1, api2) = (Api::new(&h1, TOKEN), Api::new(&h2, TOKEN));
    let rx = Receiver::ok().await;

    let stop = Arc::new(AtomicBool::new(false));
    let producer = steady_producer(broker, topic.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rx.count(), 0);

    // Create on instance 1: both partitions (one per instance) deliver within 5 s.
    let (st, created) = api1
        .post(
            "/v1/subscriptions",
            json!({"url": rx.url(), "event_types": ["order.created"]}),
        )
        .await;
    assert_eq!(st, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let old_secret = created["secrets"][0].as_str().unwrap().to_string();
    let t0 = Instant::now();
    let p0 = first_after(&rx, t0, Duration::from_secs(5), |r| partition_of(r) == '0').await;
    let p1 = first_after(&rx, t0, Duration::from_secs(5), |r| partition_of(r) == '1').await;
    println!("{store}: create → first delivery: partition 0 {p0:?}, partition 1 {p1:?}");
    assert!(
        rx.received()
            .iter()
            .all(|r| r.event_type() == "order.created")
    );

    // PATCH on instance 2: matching changes on both instances within 5 s.
    let (st, patched) = api2
        .patch(
            &format!("/v1/subscriptions/{id}"),
            json!({"event_types": ["order.updated"]}),
        )
        .await;
    assert_eq!(st, 200, "{patched}");
    assert_eq!(patched["event_types"], json!(["order.updated"]));
    let t1 = Instant::now();
    for p in ['0', '1'] {
        let d = first_after(&rx, t1, Duration::from_secs(5), |r| {
            partition_of(r) == p && r.event_type() == "order.updated"
        })
        .await;
        println!("{store}: patch → first order.updated on partition {p}: {d:?}");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let late_created: Vec<_> = rx
        .received()
        .into_iter()
        .filter(|r| r.at >= t1 + Duration::from_secs(5) && r.event_type() == "order.created")
        .map(|r| r.webhook_id)
        .collect();
    assert!(
        late_created.is_empty(),
        "order.created still delivered 5 s after the PATCH: {late_created:?}"
    );

    // Disable on instance 1: deliveries stop within 5 s.
    let (st, _) = api1
        .patch(
            &format!("/v1/subscriptions/{id}"),
            json!({"enabled": false}),
        )
        .await;
    assert_eq!(st, 200);
    let t2 = Instant::now();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after: Vec<_> = rx.received().into_iter().filter(|r| r.at >= t2).collect();
    let last = after.iter().map(|r| r.at - t2).max().unwrap_or_default();
    println!(
        "{store}: disable → last delivery after {last:?} ({} deliveries after the disable)",
        after.len()
    );
    assert!(
        last <= Duration::from_secs(5),
        "deliveries went on {last:?} after disabling"
    );

    // Enable on instance 2 and rotate on instance 1 with a 4 s grace period.
    let (st, _) = api2
        .patch(&format!("/v1/subscriptions/{id}"), json!({"enabled": true}))
        .await;
    assert_eq!(st, 200);
    let (st, rotated) = api1
        .post(
            &format!("/v1/subscriptions/{id}/rotate-secret"),
            json!({"grace_seconds": 4}),
        )
        .await;
    assert_eq!(st, 200, "{rotated}");
    let t3 = Instant::now();
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, old_secret);
    assert_eq!(rotated["secret_count"], 1);
    assert_eq!(rotated["retired_secrets"].as_array().unwrap().len(), 1);
    assert!(rotated.get("secrets").is_none(), "reads never show secrets");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let all = rx.received();
    // During the grace period (after both instances saw the rotation): both signatures, both valid.
    let during: Vec<_> = all
        .iter()
        .filter(|r| {
            r.at >= t3 + Duration::from_millis(1500) && r.at < t3 + Duration::from_millis(2900)
        })
        .collect();
    assert!(
        during.len() >= 10,
        "only {} deliveries during the grace period",
        during.len()
    );
    for r in &during {
        assert_eq!(
            r.headers["webhook-signature"].split(' ').count(),
            2,
            "{}",
            r.headers["webhook-signature"]
        );
        assert!(
            verifies(&new_secret, r) && verifies(&old_secret, r),
            "{}",
            r.webhook_id
        );
    }
    let parts: std::collections::HashSet<char> = during.iter().map(|r| partition_of(r)).collect();
    assert_eq!(parts.len(), 2, "both instances sign with both secrets");
    // After it: only the new one.
    let after: Vec<_> = all
        .iter()
        .filter(|r| r.at >= t3 + Duration::from_millis(5500))
        .collect();
    assert!(
        after.len() >= 10,
        "only {} deliveries after the grace period",
        after.len()
    );
    for r in &after {
        assert_eq!(r.headers["webhook-signature"].split(' ').count(), 1);
        assert!(
            verifies(&new_secret, r) && !verifies(&old_secret, r),
            "{}",
            r.webhook_id
        );
    }
    println!(
        "{store}: rotation: {} deliveries with both signatures in the grace period, {} with only the new one after",
        during.len(),
        after.len()
    );
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    drop((h1, h2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_delivery_attempt_log_health_and_gone() {
    let env = SqliteEnv::new(1);
    let (broker, topic, cfg) = (&env.broker, &env.topic, &env.cfg);
    let h = env.hookline(TOKEN).await;
    let api = Api::new(&h, TOKEN);

    // Test delivery: the receiver's status, timing and an excerpt of its body.
    let r1 = Receiver::start(|_| Reply::Body(202, "accepted by receiver one")).await;
    let (st, s1) = api
        .post(
            "/v1/subscriptions",
            json!({"url": r1.url(), "event_types": ["ping.*"]}),
        )
        .await;
    assert_eq!(st, 201, "{s1}");
    let id1 = s1["id"].as_str().unwrap();
    let (st, t) = api
        .post(
            &format!("/v1/subscriptions/{id1}/test"),
            json!({"data": {"hello": "world"}}),
        )
        .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["status"], 202);
    let fast_ms = t["duration_ms"].as_f64().unwrap();
    assert_eq!(t["result"], "delivered");
    assert_eq!(t["response_excerpt"], "accepted by receiver one");
    assert!(t["duration_ms"].as_f64().unwrap() > 0.0);
    let got = r1.received();
    assert_eq!(got.len(), 1);
    assert!(got[0].webhook_id.starts_with("test_"));
    assert!(
        verifies(s1["secrets"][0].as_str().unwrap(), &got[0]),
        "test delivery is signed"
    );
    let body: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["data"]["hello"], "world");

    let slow = Receiver::start(|_| Reply::Delayed(503, Duration::from_millis(300))).await;
    let (_, s_slow) = api
        .post(
            "/v1/subscriptions",
            json!({"url": slow.url(), "event_types": ["ping.*"]}),
        )
        .await;
    let (st, t) = api
        .post(
            &format!("/v1/subscriptions/{}/test", s_slow["id"].as_str().unwrap()),
            json!({}),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(t["status"], 503);
    assert_eq!(t["result"], "failed");
    let ms = t["duration_ms"].as_f64().unwrap();
    assert!(
        (300.0..3000.0).contains(&ms),
        "duration {ms} ms for a 300 ms receiver"
    );
    println!("test delivery: 202 in {fast_ms:.1} ms; slow 503 in {ms:.1} ms");

    // Real deliveries: each fails once (503), then succeeds from the 1 s tier.
    let r2 = Receiver::start(fail_first(1, 503)).await;
    let (_, s2) = api
        .post(
            "/v1/subscriptions",
            json!({"url": r2.url(), "event_types": ["invoice.*"]}),
        )
        .await;
    let id2 = s2["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let recs: Vec<Record> = (0..3)
        .map(|i| Record::json(0, plain_event(i, "invoice.paid", None)))
        .collect();
    broker.produce(topic, &recs).await;
    r2.wait_acked(&ids(0..3), Duration::from_secs(15)).await;
    // The attempt log is written asynchronously: poll until all 6 rows are there.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut rows = Vec::new();
    while Instant::now() < deadline {
        let mut cursor = String::new();
        rows.clear();
        loop {
            let (st, page) = api
                .get(&format!("/v1/subscriptions/{id2}/attempts?limit=4{cursor}"))
                .await;
            assert_eq!(st, 200, "{page}");
            rows.extend(page["items"].as_array().unwrap().iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => break,
            }
        }
        if rows.len() >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows.len(), 6, "{rows:?}");
    let ats: Vec<&str> = rows.iter().map(|r| r["at"].as_str().unwrap()).collect();
    assert!(
        ats.windows(2).all(|w| w[0] >= w[1]),
        "attempts not newest first: {ats:?}"
    );
    for r in &rows[..3] {
        assert_eq!(r["attempt"], 2);
        assert_eq!(r["result"], "delivered");
        assert_eq!(r["status_code"], 200);
        assert_eq!(r["error"], serde_json::Value::Null);
    }
    for r in &rows[3..] {
        assert_eq!(r["attempt"], 1);
        assert_eq!(r["result"], "failed");
        assert_eq!(r["status_code"], 503);
        assert_eq!(r["event_type"], "invoice.paid");
        assert!(r["duration_ms"].as_u64().is_some());
    }
    let ev: std::collections::HashSet<&str> = rows
        .iter()
        .map(|r| r["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ev,
        ["evt-00000", "evt-00001", "evt-00002"]
            .into_iter()
            .collect()
    );
    let (st, health) = api.get(&format!("/v1/subscriptions/{id2}/health")).await;
    assert_eq!(st, 200);
    assert_eq!(health["breaker"], "closed");
    assert_eq!(health["enabled"], true);
    assert_eq!(health["window"]["successes"], 3);
    assert_eq!(health["window"]["failures"], 3);
    assert_eq!(health["recent_attempts"].as_array().unwrap().len(), 6);
    let c = &health["concurrency"];
    assert_eq!(c["adaptive"], true, "{health}");
    let (limit, max) = (c["limit"].as_u64().unwrap(), c["max"].as_u64().unwrap());
    assert!(limit >= 1 && limit <= max, "{health}");
    assert_eq!(c["in_flight"], 0);
    assert!(h.metric("hookline_attempt_log_written_total").await >= 6.0);
    assert!(h.metric("hookline_concurrency_limit_sum").await >= limit as f64);
    // Adaptation off: the limit is max_in_flight (scaled by this instance's share, here all of it).
    let (st, v) = api
        .patch(
            &format!("/v1/subscriptions/{id2}"),
            json!({"adaptive_concurrency": false, "max_in_flight": 40}),
        )
        .await;
    assert_eq!((st, &v["adaptive_concurrency"]), (200, &json!(false)));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, health) = api.get(&format!("/v1/subscriptions/{id2}/health")).await;
        let c = &health["concurrency"];
        if c["adaptive"] == false {
            assert_eq!(
                (&c["limit"], &c["max"]),
                (&json!(40), &json!(40)),
                "{health}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "edit not applied: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 410 Gone disables the subscription in the store.
    let r3 = Receiver::start(|_| Reply::Status(410)).await;
    let (_, s3) = api
        .post(
            "/v1/subscriptions",
            json!({"url": r3.url(), "event_types": ["gone.*"]}),
        )
        .await;
    let id3 = s3["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker
        .produce(
            topic,
            &[Record::json(0, plain_event(10, "gone.once", None))],
        )
        .await;
    let t = Instant::now();
    loop {
        let (_, s) = api.get(&format!("/v1/subscriptions/{id3}")).await;
        if s["enabled"] == false {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "410 did not disable the subscription"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("410 → subscription disabled after {:?}", t.elapsed());
    assert_eq!(
        h.metric("hookline_subscriptions_disabled_gone_total").await,
        1.0
    );
    broker
        .produce(
            topic,
            &[Record::json(0, plain_event(11, "gone.twice", None))],
        )
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        r3.count(),
        1,
        "a disabled subscription received another delivery"
    );
    let dlq = broker.read_all(&format!("{}.dlq", prefix_of(cfg)));
    let gone: Vec<_> = dlq
        .iter()
        .filter(|r| r.headers.get("hookline-dlq-reason").map(String::as_str) == Some("gone"))
        .collect();
    assert_eq!(gone.len(), 1);
    drop(h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_validation_and_documented_routes() {
    // Loopback is allowed for the test receivers (base_config), nothing else.
    let env = SqliteEnv::new(1);
    let h = env.hookline(TOKEN).await;
    let api = Api::new(&h, TOKEN);
    let anon = Api::new(&h, "");
    let wrong = Api::new(&h, "not-the-token-at-all");
    let client = http();

    // Every documented route: 401 without or with a wrong token (except the three open ones), and
    // never "no such route"/405 with the right one.
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo_root().join("schemas/openapi.yaml")).unwrap(),
    )
    .unwrap();
    let some_id = uuid::Uuid::new_v4().to_string();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        let path = path.as_str().unwrap().replace("{id}", &some_id);
        for (m, _) in item.as_mapping().unwrap() {
            let m = m.as_str().unwrap();
            if !["get", "post", "patch", "delete", "put"].contains(&m) {
                continue;
            }
            let method: reqwest::Method = m.to_uppercase().parse().unwrap();
            let open = ["/healthz", "/readyz", "/metrics"].contains(&path.as_str());
            let (st, _) = anon.call(method.clone(), &path, None).await;
            let plain = client
                .request(method.clone(), format!("{}{path}", api.base))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            let (st_wrong, body) = wrong.call(method.clone(), &path, None).await;
            if open {
                assert_eq!(plain, 200, "{method} {path}");
            } else {
                assert_eq!((st, plain, st_wrong), (401, 401, 401), "{method} {path}");
                assert_eq!(body["field"], "authorization");
            }
            let (st, body) = api.call(method.clone(), &path, None).await;
            assert!(
                st != 405 && body["error"] != "no such route",
                "{method} {path}: {st} {body}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 22);

    // Bad input: 4xx naming the field, nothing written.
    let rx = Receiver::ok().await;
    let url = rx.url();
    let raw = |body: &'static str| {
        let client = client.clone();
        let base = api.base.clone();
        async move {
            let r = client
                .post(format!("{base}/v1/subscriptions"))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (
                st,
                serde_json::from_slice::<serde_json::Value>(&r.bytes().await.unwrap()).unwrap(),
            )
        }
    };
    let (st, e) = raw("{\"url\": ").await;
    assert_eq!((st, e["field"].as_str()), (400, Some("body")), "{e}");
    let (st, e) = raw("[1, 2]").await;
    assert_eq!((st, e["field"].as_str()), (400, Some("body")), "{e}");
    let cases = vec![
        (
            json!({"url": url, "event_types": ["a.b"], "colour": "red"}),
            400,
            "colour",
        ),
        (json!({"event_types": ["a.b"]}), 400, "url"),
        (json!({"url": url}), 400, "event_types"),
        (json!({"url": 5, "event_types": ["a.b"]}), 400, "url"),
        (
            json!({"url": url, "event_types": ["a.b", 7]}),
            400,
            "event_types[1]",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "id": "x"}),
            400,
            "id",
        ),
        (
            json!({"url": "ftp://example.com/x", "event_types": ["a.b"]}),
            422,
            "url",
        ),
        (
            json!({"url": "not a url", "event_types": ["a.b"]}),
            422,
            "url",
        ),
        (
            json!({"url": "http://10.1.2.3/x", "event_types": ["a.b"]}),
            422,
            "url",
        ),
        (
            json!({"url": "http://169.254.169.254/latest/meta-data", "event_types": ["a.b"]}),
            422,
            "url",
        ),
        (
            json!({"url": "http://[fd00::1]:9/x", "event_types": ["a.b"]}),
            422,
            "url",
        ),
        (
            json!({"url": "http://192.168.0.10/x", "event_types": ["a.b"]}),
            422,
            "url",
        ),
        // Issue 18, must show 7: a NAT64 address is judged by the IPv4 address it reaches (10.0.0.5).
        (
            json!({"url": "http://[64:ff9b::a00:5]/", "event_types": ["a.b"]}),
            422,
            "url",
        ),
        (
            json!({"url": "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "event_types": ["a.b"]}),
            422,
            "url",
        ),
        (
            json!({"url": url, "event_types": ["a.b", "or*der"]}),
            422,
            "event_types[1]",
        ),
        (json!({"url": url, "event_types": []}), 422, "event_types"),
        (
            json!({"url": url, "event_types": ["a.b"], "rate_limit_per_sec": 0}),
            422,
            "rate_limit_per_sec",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "max_in_flight": 1000000}),
            422,
            "max_in_flight",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "timeout_ms": 0}),
            422,
            "timeout_ms",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "headers": {"bad header": "x"}}),
            422,
            "headers.bad header",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "headers": {"webhook-signature": "x"}}),
            422,
            "headers.webhook-signature",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "secrets": ["nope"]}),
            422,
            "secrets[0]",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "filter": {"data.x": {"regex": "a"}}}),
            422,
            "filter.data.x",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "tenant": 3}),
            400,
            "tenant",
        ),
        // Issue 22: signing keys, secret headers, OAuth2, retry schedules.
        (
            json!({"url": url, "event_types": ["a.b"], "secrets": []}),
            422,
            "secrets",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "signing_keys": ["whsk_AAAA"]}),
            422,
            "signing_keys[0]",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "generate_signing_key": "yes"}),
            400,
            "generate_signing_key",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "secret_headers": {"host": "x"}}),
            422,
            "secret_headers.host",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "headers": {"x-k": "a"}, "secret_headers": {"X-K": "b"}}),
            422,
            "secret_headers.X-K",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "oauth2": {"token_url": "http://127.0.0.1:9/t", "client_id": "c"}}),
            400,
            "oauth2.client_secret",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "oauth2": {"token_url": "http://127.0.0.1:9/t", "client_id": "c", "client_secret": "s", "grant": "x"}}),
            400,
            "oauth2.grant",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "oauth2": {"token_url": "http://10.0.0.1/t", "client_id": "c", "client_secret": "s"}}),
            422,
            "oauth2.token_url",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "oauth2": {"token_url": "http://127.0.0.1:9/t", "client_id": "c", "client_secret": "s", "scopes": ["a b"]}}),
            422,
            "oauth2.scopes[0]",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "headers": {"authorization": "Basic x"}, "oauth2": {"token_url": "http://127.0.0.1:9/t", "client_id": "c", "client_secret": "s"}}),
            422,
            "headers.authorization",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "retry_tiers": ["7s"]}),
            422,
            "retry_tiers[0]",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "retry_tiers": ["2s", "1s"]}),
            422,
            "retry_tiers[1]",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "retry_tiers": []}),
            422,
            "retry_tiers",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "max_attempts": 5}),
            422,
            "max_attempts",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "max_attempts": 2, "retry_tiers": ["1s"]}),
            422,
            "max_attempts",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "ordering": "sorted"}),
            400,
            "ordering",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "ordering_key": "subject"}),
            422,
            "ordering_key",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "ordering": "key", "ordering_key": "data."}),
            422,
            "ordering_key",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "ordering": "key", "ordering_key": "header.x"}),
            422,
            "ordering_key",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "on_dead_letter": "hold"}),
            422,
            "on_dead_letter",
        ),
        (
            json!({"url": url, "event_types": ["a.b"], "ordering": "key", "on_dead_letter": "pause"}),
            400,
            "on_dead_letter",
        ),
    ];
    for (body, status, field) in &cases {
        let (st, e) = api.post("/v1/subscriptions", body.clone()).await;
        assert_eq!(
            (st, e["field"].as_str()),
            (*status, Some(*field)),
            "{body} → {e}"
        );
        assert!(!e["error"].as_str().unwrap().is_empty());
    }
    let (st, page) = api.get("/v1/subscriptions").await;
    assert_eq!(st, 200);
    assert_eq!(
        page["items"],
        json!([]),
        "a rejected request wrote something"
    );

    // PATCH: the same rules, and a failed PATCH changes nothing.
    let (st, s) = api
        .post(
            "/v1/subscriptions",
            json!({"url": url, "event_types": ["a.b"]}),
        )
        .await;
    assert_eq!(st, 201);
    let id = s["id"].as_str().unwrap();
    let before = api.get(&format!("/v1/subscriptions/{id}")).await.1;
    for (body, status, field) in [
        (json!({"secrets": ["whsec_x"]}), 400, "secrets"),
        (json!({"created_at": "now"}), 400, "created_at"),
        (json!({"url": "http://10.0.0.1/"}), 422, "url"),
        (json!({"url": "http://[64:ff9b::a00:5]/"}), 422, "url"),
        (json!({"burst": 5}), 422, "burst"),
        (json!({"enabled": "yes"}), 400, "enabled"),
        (
            json!({"adaptive_concurrency": 1}),
            400,
            "adaptive_concurrency",
        ),
    ] {
        let (st, e) = api
            .patch(&format!("/v1/subscriptions/{id}"), body.clone())
            .await;
        assert_eq!(
            (st, e["field"].as_str()),
            (status, Some(field)),
            "{body} → {e}"
        );
    }
    assert_eq!(api.get(&format!("/v1/subscriptions/{id}")).await.1, before);
    let (st, e) = api.get("/v1/subscriptions/not-a-uuid").await;
    assert_eq!((st, e["field"].as_str()), (400, Some("id")));
    let (st, e) = api.get(&format!("/v1/subscriptions/{some_id}")).await;
    assert_eq!((st, e["field"].as_str()), (404, Some("id")));
    let (st, e) = api.get("/v1/subscriptions?limit=0").await;
    assert_eq!((st, e["field"].as_str()), (400, Some("limit")));
    let (st, e) = api.get("/v1/subscriptions?cursor=zzz").await;
    assert_eq!((st, e["field"].as_str()), (400, Some("cursor")));
    let (st, e) = api.get("/v1/subscriptions?sort=id").await;
    assert_eq!((st, e["field"].as_str()), (400, Some("sort")));
    let (st, e) = api
        .post(
            &format!("/v1/subscriptions/{id}/rotate-secret"),
            json!({"grace_seconds": -1}),
        )
        .await;
    assert_eq!((st, e["field"].as_str()), (400, Some("grace_seconds")));
    let (st, e) = api
        .post(
            &format!("/v1/subscriptions/{id}/rotate-secret"),
            json!({"secret": "plain"}),
        )
        .await;
    assert_eq!((st, e["field"].as_str()), (422, Some("secret")));
    let (st, e) = api
        .post(
            &format!("/v1/subscriptions/{id}/rotate-signing-key"),
            json!({"signing_key": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}),
        )
        .await;
    assert_eq!((st, e["field"].as_str()), (422, Some("signing_key")));
    for (body, field) in [
        (json!({"signing_keys": []}), "signing_keys"),
        (
            json!({"generate_signing_key": true}),
            "generate_signing_key",
        ),
    ] {
        let (st, e) = api.patch(&format!("/v1/subscriptions/{id}"), body).await;
        assert_eq!((st, e["field"].as_str()), (400, Some(field)), "{e}");
    }

    // Write-only values never come back; the schedule and the OAuth2 settings do.
    let (st, w) = api
        .patch(
            &format!("/v1/subscriptions/{id}"),
            json!({
                "secret_headers": {"x-api-key": "api-key-value-1"},
                "oauth2": {"token_url": "http://127.0.0.1:9/token", "client_id": "cid", "client_secret": "client-secret-1", "scopes": ["a"]},
                "retry_tiers": ["1s", "3s"],
            }),
        )
        .await;
    assert_eq!(st, 200, "{w}");
    let (_, read) = api.get(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(read["secret_header_names"], json!(["x-api-key"]));
    assert_eq!(
        read["oauth2"],
        json!({"token_url": "http://127.0.0.1:9/token", "client_id": "cid", "scopes": ["a"], "audience": null, "client_auth": "basic"})
    );
    assert_eq!(read["retry_tiers"], json!(["1s", "3s"]));
    assert_eq!(read["retry_schedule"], json!(["1s", "3s"]));
    for text in [w.to_string(), read.to_string()] {
        assert!(
            !text.contains("api-key-value-1") && !text.contains("client-secret-1"),
            "{text}"
        );
    }
    // A PATCH of the OAuth2 settings without client_secret keeps the stored one (still valid), and
    // max_attempts replaces retry_tiers once that is cleared.
    let (st, w) = api
        .patch(
            &format!("/v1/subscriptions/{id}"),
            json!({"oauth2": {"token_url": "http://127.0.0.1:9/token2", "client_id": "cid"}, "retry_tiers": null, "max_attempts": 2}),
        )
        .await;
    assert_eq!(st, 200, "{w}");
    assert_eq!(w["oauth2"]["token_url"], "http://127.0.0.1:9/token2");
    assert_eq!(w["retry_schedule"], json!(["1s"]));
    let (st, w) = api
        .patch(
            &format!("/v1/subscriptions/{id}"),
            json!({"oauth2": null, "secret_headers": null, "max_attempts": null}),
        )
        .await;
    assert_eq!(st, 200, "{w}");
    assert_eq!(
        (
            &w["oauth2"],
            &w["secret_header_names"],
            &w["retry_schedule"]
        ),
        (&json!(null), &json!([]), &json!(["1s", "2s", "3s"]))
    );
    // Ordering: unordered by default; set, shown, and cleared again.
    assert_eq!(
        (&w["ordering"], &w["ordering_key"], &w["on_dead_letter"]),
        (&json!("none"), &json!(null), &json!("continue"))
    );
    let (st, w) = api
        .patch(
            &format!("/v1/subscriptions/{id}"),
            json!({"ordering": "key", "ordering_key": "data.customer.id", "on_dead_letter": "hold"}),
        )
        .await;
    assert_eq!(st, 200, "{w}");
    let (_, read) = api.get(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(
        (
            &read["ordering"],
            &read["ordering_key"],
            &read["on_dead_letter"]
        ),
        (&json!("key"), &json!("data.customer.id"), &json!("hold"))
    );
    let (st, w) = api
        .patch(
            &format!("/v1/subscriptions/{id}"),
            json!({"ordering": null, "ordering_key": null, "on_dead_letter": null}),
        )
        .await;
    assert_eq!(st, 200, "{w}");
    assert_eq!(w["ordering"], "none");
    // Pagination of the listing.
    for i in 0..4 {
        let (st, _) = api
            .post(
                "/v1/subscriptions",
                json!({"url": url, "event_types": [format!("p.{i}")]}),
            )
            .await;
        assert_eq!(st, 201);
    }
    let (_, p1) = api.get("/v1/subscriptions?limit=3").await;
    let c = p1["next_cursor"].as_str().unwrap();
    let (_, p2) = api
        .get(&format!("/v1/subscriptions?limit=3&cursor={c}"))
        .await;
    assert_eq!(
        p1["items"].as_array().unwrap().len() + p2["items"].as_array().unwrap().len(),
        5
    );
    assert_eq!(p2["next_cursor"], serde_json::Value::Null);
    // Delete.
    let (st, _) = api.delete(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(st, 204);
    let (st, _) = api.delete(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(st, 404);
    println!(
        "{} bad requests refused with their field named, {checked} documented routes checked",
        cases.len() + 2
    );
    drop(h);
}
