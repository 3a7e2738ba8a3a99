//! The dead-letter API (issue 20): `GET /v1/dead-letters` (counts, a page of records with headers and a
//! body excerpt, the CLI's filters, paging), `POST /v1/dead-letters/replay` (dry run, then a real
//! replay, resumable with the CLI's consumer group) and `GET /v1/replays/{id}`, for the admin and
//! scoped to a tenant. A real Apache Kafka broker, real receivers, hookline on SQLite.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

const TOKEN: &str = "dlq-api-test-token-0123456789";

/// 400 (rejected: straight to the dead-letter topic) while `failing`, then 200.
fn rejecting(failing: Arc<AtomicBool>) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    move |_| {
        if failing.load(Ordering::Relaxed) {
            Reply::Status(400)
        } else {
            Reply::Status(200)
        }
    }
}

async fn wait_replay(api: &Api, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let (st, r) = api.get(&format!("/v1/replays/{id}")).await;
        assert_eq!(st, 200, "{r}");
        if r["state"] != "running" {
            return r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "replay still running: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_listed_and_replayed_over_http_scoped_to_a_tenant() {
    let env = SqliteEnv::new(1);
    let h = env.hookline(TOKEN).await;
    let admin = Api::new(&h, TOKEN);
    let prefix = prefix_of(&env.cfg);
    let dlq = format!("{prefix}.dlq");

    let failing = Arc::new(AtomicBool::new(true));
    let rx_a = Receiver::start(rejecting(failing.clone())).await;
    let rx_b = Receiver::start(rejecting(failing.clone())).await;
    let mut subs = Vec::new();
    for (rx, tenant, ty) in [(&rx_a, "acme", "a.*"), (&rx_b, "beta", "b.*")] {
        let (st, s) = admin
            .post(
                "/v1/subscriptions",
                json!({"url": rx.url(), "event_types": [ty], "tenant": tenant}),
            )
            .await;
        assert_eq!(st, 201, "{s}");
        subs.push(s["id"].as_str().unwrap().to_string());
    }
    let (sub_a, sub_b) = (subs[0].clone(), subs[1].clone());
    let mut tokens = Vec::new();
    for tenant in ["acme", "beta"] {
        let (st, t) = admin
            .call(Method::POST, "/v1/tokens", Some(json!({"tenant": tenant})))
            .await;
        assert_eq!(st, 201);
        tokens.push(t["token"].as_str().unwrap().to_string());
    }
    let (api_a, api_b) = (Api::new(&h, &tokens[0]), Api::new(&h, &tokens[1]));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 5 dead letters of A (one with a header of its own), 3 of B.
    let mut recs = Vec::new();
    for i in 0..5 {
        let mut r = Record::json(0, plain_event(i, "a.created", Some("acme")));
        if i == 0 {
            r.headers.push(("x-origin".into(), "upstream-7".into()));
        }
        recs.push(r);
    }
    for i in 5..8 {
        recs.push(Record::json(0, plain_event(i, "b.created", Some("beta"))));
    }
    env.broker.produce(&env.topic, &recs).await;
    let t = Instant::now();
    while env.broker.read_all(&dlq).len() < 8 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "dead letters missing"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The admin sees all 8, counted.
    let (st, all) = admin.get("/v1/dead-letters").await;
    assert_eq!(st, 200, "{all}");
    assert_eq!(all["matched"], 8, "{all}");
    assert_eq!(all["by_reason"], json!({"rejected": 8}));
    assert_eq!(all["by_subscription"][&sub_a], 5);
    assert_eq!(all["by_subscription"][&sub_b], 3);
    assert_eq!(
        all["by_event_type"],
        json!({"a.created": 5, "b.created": 3})
    );
    let items = all["items"].as_array().unwrap();
    assert_eq!(items.len(), 8);
    let first = items
        .iter()
        .find(|i| i["event_id"] == "evt-00000")
        .expect("evt-00000 listed");
    assert_eq!(first["headers"]["x-origin"], "upstream-7", "{first}");
    assert_eq!(first["headers"]["hookline-dlq-reason"], "rejected");
    assert!(
        first["body_excerpt"]
            .as_str()
            .unwrap()
            .contains("\"evt-00000\"")
    );
    assert_eq!(
        first["body_bytes"].as_u64().unwrap() as usize,
        first["body_excerpt"].as_str().unwrap().len()
    );

    // Pages of 3: every record once, in order, the last page without a cursor.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/dead-letters?limit=3&cursor={c}"),
            None => "/v1/dead-letters?limit=3".into(),
        };
        let (st, page) = admin.get(&path).await;
        assert_eq!(st, 200, "{page}");
        assert_eq!(page["matched"], 8, "counts cover every match, not the page");
        for i in page["items"].as_array().unwrap() {
            seen.push((
                i["partition"].as_i64().unwrap(),
                i["offset"].as_i64().unwrap(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        (seen.len(), &seen),
        (8, &sorted),
        "each record once, in order"
    );

    // Tenants see only their own; another tenant's subscription is "not found".
    let (st, only_a) = api_a.get("/v1/dead-letters").await;
    assert_eq!(st, 200);
    assert_eq!(only_a["matched"], 5, "{only_a}");
    assert!(
        only_a["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["subscription"] == sub_a.as_str())
    );
    let (st, e) = api_a
        .get(&format!("/v1/dead-letters?subscription={sub_b}"))
        .await;
    assert_eq!(
        (st, e["field"].as_str()),
        (404, Some("subscription")),
        "{e}"
    );
    let (_, only_b) = api_b.get("/v1/dead-letters").await;
    assert_eq!(only_b["matched"], 3);

    // Filters are the CLI's, and bad ones name themselves.
    let (_, f) = admin.get("/v1/dead-letters?event_type=b.*").await;
    assert_eq!(f["matched"], 3);
    let (_, f) = admin.get("/v1/dead-letters?reason=exhausted").await;
    assert_eq!(f["matched"], 0);
    for (q, st, field) in [
        ("reason=lost", 422, "reason"),
        ("since=yesterday", 400, "since"),
        ("event_type=a*b", 422, "event_type"),
        ("subscription=nope", 400, "subscription"),
        ("limit=0", 400, "limit"),
        ("cursor=x", 400, "cursor"),
        ("colour=red", 400, "colour"),
    ] {
        let (s, e) = admin.get(&format!("/v1/dead-letters?{q}")).await;
        assert_eq!((s, e["field"].as_str()), (st, Some(field)), "{q}: {e}");
    }

    // A tenant cannot re-publish to the source topic (it would re-match every tenant's subscriptions).
    let (st, e) = api_a
        .post("/v1/dead-letters/replay", json!({"to": "source"}))
        .await;
    assert_eq!((st, e["field"].as_str()), (422, Some("to")), "{e}");
    let (st, e) = admin
        .post("/v1/dead-letters/replay", json!({"to": "dlq"}))
        .await;
    assert_eq!((st, e["field"].as_str()), (422, Some("to")), "{e}");
    let (st, e) = admin
        .post("/v1/dead-letters/replay", json!({"dry_run": "yes"}))
        .await;
    assert_eq!((st, e["field"].as_str()), (400, Some("dry_run")), "{e}");

    failing.store(false, Ordering::Relaxed);
    let (a_before, b_before) = (rx_a.count(), rx_b.count());

    // Tenant A: a dry run first (counts, a sample, nothing sent), then the replay.
    let (st, started) = api_a
        .post("/v1/dead-letters/replay", json!({"dry_run": true}))
        .await;
    assert_eq!(st, 202, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    let dry = wait_replay(&api_a, &id).await;
    assert_eq!(dry["state"], "finished", "{dry}");
    assert_eq!(
        (
            dry["summary"]["scanned"].as_u64(),
            dry["summary"]["matched"].as_u64()
        ),
        (Some(8), Some(5)),
        "{dry}"
    );
    assert_eq!(dry["summary"]["replayed"], 5, "would replay");
    assert_eq!(dry["summary"]["sample"].as_array().unwrap().len(), 5);
    // B cannot see A's replay.
    assert_eq!(api_b.get(&format!("/v1/replays/{id}")).await.0, 404);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        (rx_a.count(), rx_b.count()),
        (a_before, b_before),
        "a dry run sends nothing"
    );

    let (st, started) = api_a
        .post("/v1/dead-letters/replay", json!({"rate": 100}))
        .await;
    assert_eq!(st, 202, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    let done = wait_replay(&api_a, &id).await;
    assert_eq!(done["state"], "finished", "{done}");
    assert_eq!(done["summary"]["replayed"], 5, "{done}");
    let want: HashSet<String> = (0..5).map(|i| format!("evt-{i:05}")).collect();
    rx_a.wait_acked(&want, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rx_b.count(),
        b_before,
        "B's dead letters were not A's to replay"
    );

    // The same request again resumes after what was done: nothing left.
    let (_, again) = api_a
        .post("/v1/dead-letters/replay", json!({"rate": 100}))
        .await;
    let again = wait_replay(&api_a, again["id"].as_str().unwrap()).await;
    assert_eq!(
        (
            again["summary"]["in_range"].as_u64(),
            again["summary"]["replayed"].as_u64()
        ),
        (Some(0), Some(0)),
        "{again}"
    );

    // The admin's replay of B's subscription through the API, then the CLI with the same filters
    // resumes it (one consumer group for both): it finds nothing left to send.
    let (st, started) = admin
        .post(
            "/v1/dead-letters/replay",
            json!({"subscription": sub_b, "reason": "rejected"}),
        )
        .await;
    assert_eq!(st, 202, "{started}");
    let done = wait_replay(&admin, started["id"].as_str().unwrap()).await;
    assert_eq!(done["summary"]["replayed"], 3, "{done}");
    let cli = hookline_cli(
        &[
            "replay",
            "--subscription",
            &sub_b,
            "--reason",
            "rejected",
            "--json",
            "--config",
            h.config_path().to_str().unwrap(),
        ],
        &[("RUST_LOG", "warn")],
    );
    assert_eq!(cli.code, 0, "{}", cli.all());
    let sum: Value = serde_json::from_str(cli.stdout.trim()).unwrap();
    assert_eq!(sum["group"], done["group"], "{sum}");
    assert_eq!(
        (sum["in_range"].as_u64(), sum["replayed"].as_u64()),
        (Some(0), Some(0)),
        "{sum}"
    );
    let want: HashSet<String> = (5..8).map(|i| format!("evt-{i:05}")).collect();
    rx_b.wait_acked(&want, Duration::from_secs(15)).await;
}
