//! Operational events and auto-disable (issue 21, must show 2 — without breaker events), with two
//! instances sharing one SQLite store and one consumer group: a 410, an exhausted message, an endpoint
//! failing for `delivery.disable_after` and an operator enabling a subscription again each produce
//! exactly one event on `<prefix>.events`, although both instances see them; and the operator's webhook
//! receives the events, signed and verified by the reference `standardwebhooks` package.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "ops-admin-token";

/// The events topic's values after `settle` without a new one (at least `want` of them).
async fn events(broker: &Broker, topic: &str, want: usize, timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let recs = broker.read_all(topic);
        if recs.len() >= want {
            return recs
                .iter()
                .map(|r| serde_json::from_slice(&r.value).unwrap())
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "{} of {want} operational events: {:?}",
            recs.len(),
            recs.iter()
                .map(|r| String::from_utf8_lossy(&r.value).into_owned())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Two ready instances in one group on `env`'s SQLite store with `cfg` (A in `env.dir`, B in the
/// returned directory).
async fn two_instances(env: &SqliteEnv, cfg: &str) -> (Hookline, Hookline, tempfile::TempDir) {
    let start = |dir: &std::path::Path| {
        Hookline::start_with_store(dir, cfg, &sqlite_store(&env.db), Some(TOKEN), &[])
    };
    let dir_b = tempfile::tempdir().unwrap();
    let mut a = start(env.dir.path());
    a.wait_ready(Duration::from_secs(30)).await;
    let mut b = start(dir_b.path());
    b.wait_ready(Duration::from_secs(30)).await;
    (a, b, dir_b)
}

/// Waits until each instance holds one source partition, then a cache refresh more (both have the
/// subscriptions created meanwhile).
async fn one_partition_each(a: &Hookline, b: &Hookline) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while source_partitions_assigned(&a.log()) != 1 || source_partitions_assigned(&b.log()) != 1 {
        assert!(
            Instant::now() < deadline,
            "the group did not settle on one partition each"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_occurrence_is_one_event_with_two_instances_running() {
    let env = SqliteEnv::new(2);
    let cfg = env.cfg.clone()
        + "[operational]\nenabled = true\n"
        + "[delivery.breaker]\nconsecutive_failures = 1000000\nmin_requests = 1000000\n";
    let cfg = cfg.replace("[delivery]\n", "[delivery]\ndisable_after = \"3s\"\n");
    assert!(cfg.contains("disable_after"));
    let prefix = prefix_of(&cfg);
    let events_topic = format!("{prefix}.events");
    let gone = Receiver::start(|_| Reply::Status(410)).await;
    let exhausting = Receiver::start(|_| Reply::Status(503)).await;
    let failing = Receiver::start(|_| Reply::Status(500)).await;
    let ok = Receiver::ok().await;
    let (mut a, mut b, _dir_b) = two_instances(&env, &cfg).await;
    let api = Api::new(&a, TOKEN);
    let create = |url: String, ty: &str, extra: Value| {
        let mut body = json!({"url": url, "event_types": [ty]});
        if let (Value::Object(m), Value::Object(e)) = (&mut body, extra) {
            m.extend(e);
        }
        let api = &api;
        async move {
            let (st, s) = api.post("/v1/subscriptions", body).await;
            assert_eq!(st, 201, "{s}");
            s["id"].as_str().unwrap().to_string()
        }
    };
    let gone_id = create(gone.url(), "g", json!({})).await;
    let exh_id = create(exhausting.url(), "x", json!({"retry_tiers": ["1s"]})).await;
    // All tiers (1 s, 2 s, 3 s): its first message would be exhausted after 6 s, but the subscription
    // is disabled after 3 s of failures, so its retries are dead-lettered as orphans, not exhausted.
    let fail_id = create(failing.url(), "f", json!({})).await;
    let ok_id = create(ok.url(), "o", json!({})).await;
    // Both instances hold a partition before anything is produced, and both have the subscriptions.
    one_partition_each(&a, &b).await;

    // Both partitions carry each kind, so both instances see every occurrence.
    let mut records = Vec::new();
    for i in 0..8 {
        records.push(Record::json(i % 2, plain_event(i as usize, "g", None)));
    }
    for i in 8..10 {
        records.push(Record::json(i % 2, plain_event(i as usize, "x", None)));
    }
    for i in 10..14 {
        records.push(Record::json(i % 2, plain_event(i as usize, "o", None)));
    }
    env.broker.produce(&env.topic, &records).await;
    // The failing endpoint: deliveries on both partitions for 5 s (disable_after is 3 s).
    for round in 0..10 {
        let i = 100 + 2 * round;
        env.broker
            .produce(
                &env.topic,
                &[
                    Record::json(0, plain_event(i, "f", None)),
                    Record::json(1, plain_event(i + 1, "f", None)),
                ],
            )
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ok.wait_acked(&ids(10..14), Duration::from_secs(30)).await;
    // gone: 1 disabled; exhausted: 2 messages; failing: 1 disabled.
    let got = events(env.broker, &events_topic, 4, Duration::from_secs(30)).await;
    // Enabling the gone subscription again through the API: one endpoint.enabled.
    let (st, s) = api
        .patch(
            &format!("/v1/subscriptions/{gone_id}"),
            json!({"enabled": true}),
        )
        .await;
    assert_eq!(st, 200, "{s}");
    assert_eq!(
        s["disabled_reason"],
        Value::Null,
        "enabling clears the reason"
    );
    let got_all = events(
        env.broker,
        &events_topic,
        got.len() + 1,
        Duration::from_secs(20),
    )
    .await;
    // Let any duplicate arrive (claims are decided before publishing; a duplicate would be quick).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let last = env
        .broker
        .read_all(&events_topic)
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.value).unwrap())
        .collect::<Vec<_>>();
    assert_eq!(last.len(), got_all.len(), "no duplicate came later");
    let mut by: HashMap<(String, String), Vec<&Value>> = HashMap::new();
    for e in &last {
        by.entry((
            e["type"].as_str().unwrap().to_string(),
            e["data"]["subscription_id"].as_str().unwrap().to_string(),
        ))
        .or_default()
        .push(e);
    }
    let one = |kind: &str, sub: &str| -> &Value {
        let v = by
            .get(&(kind.to_string(), sub.to_string()))
            .unwrap_or_else(|| panic!("no {kind} for {sub}: {last:?}"));
        assert_eq!(v.len(), 1, "{kind} for {sub} more than once: {v:?}");
        v[0]
    };
    assert_eq!(one("endpoint.disabled", &gone_id)["data"]["reason"], "gone");
    let auto = one("endpoint.disabled", &fail_id);
    assert_eq!(auto["data"]["reason"], "failing");
    assert!(auto["data"]["failing_since"].is_string());
    one("endpoint.enabled", &gone_id);
    let exhausted = &by[&("message.exhausted".to_string(), exh_id.clone())];
    let mut msgs: Vec<&str> = exhausted
        .iter()
        .map(|e| e["data"]["event_id"].as_str().unwrap())
        .collect();
    msgs.sort();
    assert_eq!(msgs, ["evt-00008", "evt-00009"], "one per message");
    for e in exhausted {
        assert_eq!(e["data"]["attempts"], 2);
        assert_eq!(e["data"]["last_status"], "503");
    }
    assert_eq!(last.len(), 5, "nothing else: {last:?}");
    let ids_: std::collections::HashSet<&str> =
        last.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids_.len(), 5, "ids are distinct per occurrence");
    assert!(!by.contains_key(&("endpoint.disabled".to_string(), ok_id.clone())));
    assert!(
        !by.contains_key(&("endpoint.disabled".to_string(), exh_id.clone())),
        "2 s of failures is under disable_after"
    );
    // The reason is visible in the API.
    let (_, f) = api.get(&format!("/v1/subscriptions/{fail_id}")).await;
    assert_eq!(
        (f["enabled"].clone(), f["disabled_reason"].clone()),
        (json!(false), json!("failing"))
    );
    assert!(f["disabled_at"].is_string());
    // Both instances saw the failing endpoint; one of them reported each occurrence.
    let seen = |h: &Hookline| h.log().matches("operational event published").count();
    println!("instance A published {}, B {}", seen(&a), seen(&b));
    assert_eq!(seen(&a) + seen(&b), 5);
    a.sigterm();
    b.sigterm();
    a.wait_exit(Duration::from_secs(20));
    b.wait_exit(Duration::from_secs(20));
}

/// The operator's webhook (`[operational] webhook_url`): fed by the events topic, it receives each event
/// once, signed with `webhook_secret` (checked by the reference `standardwebhooks` package), retried
/// through the tiers like any delivery; it receives no customer event, and customers' subscriptions
/// receive no operational event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_webhook_receives_signed_events_with_retries() {
    let broker = Broker::shared();
    let topic = broker.topic("ops-hook", 1);
    let dir = tempfile::tempdir().unwrap();
    let operator = Receiver::start(fail_first(1, 503)).await;
    let gone = Receiver::start(|_| Reply::Status(410)).await;
    let all = Receiver::ok().await;
    let cfg = base_config(broker, &[topic.as_str()], "opshook")
        + &format!(
            "[operational]\nenabled = true\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET_B}\"\n",
            operator.url()
        );
    let prefix = prefix_of(&cfg);
    let db = dir.path().join("hookline.db");
    let mut h = Hookline::start_with_store(dir.path(), &cfg, &sqlite_store(&db), Some(TOKEN), &[]);
    h.wait_ready(Duration::from_secs(30)).await;
    let api = Api::new(&h, TOKEN);
    let (st, g) = api
        .post(
            "/v1/subscriptions",
            json!({"url": gone.url(), "event_types": ["g"]}),
        )
        .await;
    assert_eq!(st, 201, "{g}");
    // A subscription to every event type: it must not see operational events.
    let (st, a) = api
        .post(
            "/v1/subscriptions",
            json!({"url": all.url(), "event_types": ["*"]}),
        )
        .await;
    assert_eq!(st, 201, "{a}");
    let gone_id = g["id"].as_str().unwrap();
    broker
        .produce(&topic, &[Record::json(0, plain_event(0, "g", None))])
        .await;
    // Disabled by the 410 first, then enabled again by the operator.
    events(
        broker,
        &format!("{prefix}.events"),
        1,
        Duration::from_secs(30),
    )
    .await;
    let (st, _) = api
        .patch(
            &format!("/v1/subscriptions/{gone_id}"),
            json!({"enabled": true}),
        )
        .await;
    assert_eq!(st, 200);
    let evs = events(
        broker,
        &format!("{prefix}.events"),
        2,
        Duration::from_secs(30),
    )
    .await;
    let want: std::collections::HashSet<String> = evs
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(want.len(), 2, "{evs:?}");
    operator.wait_acked(&want, Duration::from_secs(30)).await;
    let reqs = operator.received();
    // Each event: a 503 first, then delivered from the 1 s tier.
    assert_eq!(reqs.len(), 4, "{reqs:?}");
    for r in &reqs {
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(evs.contains(&body), "the webhook body is the event: {body}");
        assert_eq!(r.webhook_id, body["id"]);
    }
    let (_, counts) = verify_standardwebhooks(dir.path(), &reqs, &[SECRET_B, SECRET_A]);
    assert_eq!(counts[SECRET_B]["valid"], 4, "{counts}");
    assert_eq!(counts[SECRET_A]["valid"], 0, "{counts}");
    all.wait_acked(&ids(0..1), Duration::from_secs(10)).await;
    assert_eq!(
        all.count(),
        1,
        "a subscription to * got only the customer event"
    );
    h.sigterm();
    h.wait_exit(Duration::from_secs(20));
}

/// Must show 2, breaker part: two instances both see an endpoint fail (each breaker opens, and
/// re-opens after failed half-open probes), then recover (each breaker closes): exactly one
/// `endpoint.breaker_opened` and one `endpoint.breaker_closed` for the episode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_episode_is_one_opened_and_one_closed_event_with_two_instances() {
    let env = SqliteEnv::new(2);
    let cfg = env.cfg.clone()
        + "[operational]\nenabled = true\n"
        + "[delivery.breaker]\nconsecutive_failures = 3\nmin_requests = 1000000\ncool_down = \"1s\"\n";
    let prefix = prefix_of(&cfg);
    let receiver = Receiver::start(|_| Reply::Status(503)).await;
    let (mut a, mut b, _dir_b) = two_instances(&env, &cfg).await;
    let (api_a, api_b) = (Api::new(&a, TOKEN), Api::new(&b, TOKEN));
    let (st, s) = api_a
        .post(
            "/v1/subscriptions",
            json!({"url": receiver.url(), "event_types": ["b"]}),
        )
        .await;
    assert_eq!(st, 201, "{s}");
    let id = s["id"].as_str().unwrap().to_string();
    one_partition_each(&a, &b).await;
    async fn breaker(api: &Api, id: &str) -> String {
        let path = format!("/v1/subscriptions/{id}/health");
        api.get(&path).await.1["breaker"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
    // Traffic on both partitions until both breakers are open (or probing), then until both closed.
    let mut i = 0usize;
    let mut tick = |broker: &'static Broker, topic: String| {
        i += 2;
        let n = i;
        async move {
            broker
                .produce(
                    &topic,
                    &[
                        Record::json(0, plain_event(n, "b", None)),
                        Record::json(1, plain_event(n + 1, "b", None)),
                    ],
                )
                .await;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tick(env.broker, env.topic.clone()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (sa, sb) = (breaker(&api_a, &id).await, breaker(&api_b, &id).await);
        if sa != "closed" && sb != "closed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "breakers did not both open: {sa} {sb}"
        );
    }
    // Both open; a little longer so that half-open probes fail and breakers re-open.
    for _ in 0..15 {
        tick(env.broker, env.topic.clone()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    receiver.set_behaviour(|_| Reply::Status(200));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tick(env.broker, env.topic.clone()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (sa, sb) = (breaker(&api_a, &id).await, breaker(&api_b, &id).await);
        if sa == "closed" && sb == "closed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "breakers did not both close: {sa} {sb}"
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let evs: Vec<Value> = env
        .broker
        .read_all(&format!("{prefix}.events"))
        .iter()
        .map(|r| serde_json::from_slice(&r.value).unwrap())
        .collect();
    let of = |kind: &str| {
        evs.iter()
            .filter(|e| e["type"] == kind && e["data"]["subscription_id"] == id.as_str())
            .collect::<Vec<_>>()
    };
    let (opened, closed) = (of("endpoint.breaker_opened"), of("endpoint.breaker_closed"));
    let opened_lines = |h: &Hookline| h.log().matches("circuit breaker opened").count();
    println!(
        "breaker opened {} times on A, {} on B; events: {} opened, {} closed",
        opened_lines(&a),
        opened_lines(&b),
        opened.len(),
        closed.len()
    );
    assert!(
        opened_lines(&a) >= 1 && opened_lines(&b) >= 1,
        "both breakers opened"
    );
    assert_eq!(opened.len(), 1, "{evs:?}");
    assert_eq!(closed.len(), 1, "{evs:?}");
    assert_eq!(opened[0]["data"]["episode"], 0);
    assert_eq!(closed[0]["data"]["episode"], 0);
    a.sigterm();
    b.sigterm();
    a.wait_exit(Duration::from_secs(20));
    b.wait_exit(Duration::from_secs(20));
}

/// An operator's change of `enabled` is one event whichever way it is made: through the CLI (which
/// writes the store directly; both instances find the change at their next load) or through the API
/// (which applies it to one instance's cache at once; the other finds it at its next load). Each
/// change is `endpoint.disabled` with reason `operator` or `endpoint.enabled`, exactly once with two
/// instances running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_toggles_through_the_cli_and_the_api_are_one_event_each() {
    let env = SqliteEnv::new(2);
    let cfg = env.cfg.clone() + "[operational]\nenabled = true\n";
    let prefix = prefix_of(&cfg);
    let events_topic = format!("{prefix}.events");
    let (mut a, mut b, _dir_b) = two_instances(&env, &cfg).await;
    let api = Api::new(&b, TOKEN);
    let (st, s) = api
        .post(
            "/v1/subscriptions",
            json!({"url": "http://127.0.0.1:9/h", "event_types": ["t"]}),
        )
        .await;
    assert_eq!(st, 201, "{s}");
    let id = s["id"].as_str().unwrap().to_string();
    // Both instances' caches load the new subscription (refresh_interval is 500 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cli_cfg = env.dir.path().join("cli.toml");
    std::fs::write(
        &cli_cfg,
        format!(
            "[kafka]\n\"bootstrap.servers\" = \"127.0.0.1:1\"\n[source]\ntopics = [\"{}\"]\n{}",
            env.topic,
            sqlite_store(&env.db)
        ),
    )
    .unwrap();
    let cli = |verb: &str| {
        let r = hookline_cli(
            &[
                "subscriptions",
                verb,
                &id,
                "--config",
                cli_cfg.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(r.code, 0, "{}", r.all());
    };
    cli("disable");
    events(env.broker, &events_topic, 1, Duration::from_secs(20)).await;
    cli("enable");
    events(env.broker, &events_topic, 2, Duration::from_secs(20)).await;
    let (st, s) = api
        .patch(
            &format!("/v1/subscriptions/{id}"),
            json!({"enabled": false}),
        )
        .await;
    assert_eq!(st, 200, "{s}");
    let got = events(env.broker, &events_topic, 3, Duration::from_secs(20)).await;
    // Both caches have loaded the last change (and would have reported a duplicate by now).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let last = env.broker.read_all(&events_topic);
    assert_eq!(last.len(), got.len(), "no duplicate came later");
    let kinds: Vec<(String, String, Value)> = got
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["data"]["subscription_id"].as_str().unwrap().to_string(),
                e["data"]["reason"].clone(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("endpoint.disabled".into(), id.clone(), json!("operator")),
            ("endpoint.enabled".into(), id.clone(), Value::Null),
            ("endpoint.disabled".into(), id.clone(), json!("operator")),
        ],
        "{got:?}"
    );
    let distinct: std::collections::HashSet<&str> =
        got.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(distinct.len(), 3, "each change has its own id");
    let seen = |h: &Hookline| h.log().matches("operational event published").count();
    assert_eq!(seen(&a) + seen(&b), 3);
    a.sigterm();
    b.sigterm();
    a.wait_exit(Duration::from_secs(20));
    b.wait_exit(Duration::from_secs(20));
}
