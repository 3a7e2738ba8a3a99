//! Endpoint authentication and signing beyond HMAC (issue 22), against the real broker, real receivers
//! and a real token endpoint: Ed25519 `v1a` signatures checked by an independent implementation
//! (PyNaCl) with only the public key from the API, OAuth2 client credentials (one token for many
//! deliveries, refresh before expiry and after a 401, a token endpoint that is down), and
//! per-subscription retry schedules.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::oauth::{CLIENT_ID, CLIENT_SECRET, TokenServer};
use common::*;
use serde_json::json;

/// Runs tests/support/verify_v1a.py (PyNaCl, a separate process) over `reqs` with each public key;
/// returns `counts[key]` = {"valid", "invalid", "tampered_valid"}.
fn verify_v1a(dir: &std::path::Path, reqs: &[Received], keys: &[&str]) -> serde_json::Value {
    let (stdout, counts) = run_verifier(dir, "verify_v1a.py", reqs, keys);
    println!("PyNaCl: {stdout}");
    counts
}

/// Must show 1: a subscription created through the API with a generated Ed25519 key and no HMAC
/// secret; a receiver verifies every delivery with PyNaCl using only the `whpk_` key the API shows; a
/// tampered body never verifies; during a rotation every request carries both signatures and each
/// public key verifies it; after the grace period only the new key signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1a_signatures_verify_with_an_independent_ed25519_and_only_the_public_key() {
    const TOKEN: &str = "v1a-admin-token";
    let env = SqliteEnv::new(1);
    let receiver = Receiver::ok().await;
    let h = env.hookline(TOKEN).await;
    let api = Api::new(&h, TOKEN);
    let (status, created) = api
        .post(
            "/v1/subscriptions",
            json!({"url": receiver.url(), "event_types": ["order.*"], "generate_signing_key": true}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["secret_count"], 0, "no HMAC secret was made");
    assert_eq!(created["secrets"], json!([]));
    let signing_key = created["signing_keys"][0].as_str().unwrap().to_string();
    assert!(signing_key.starts_with("whsk_"));
    let id = created["id"].as_str().unwrap().to_string();
    // A read shows the public key and never the secret key.
    let (_, read) = api.get(&format!("/v1/subscriptions/{id}")).await;
    let public_old = read["public_keys"][0].as_str().unwrap().to_string();
    assert!(public_old.starts_with("whpk_"), "{read}");
    assert!(
        !read
            .to_string()
            .contains(signing_key.trim_start_matches("whsk_")),
        "{read}"
    );

    let produce = |from: usize, to: usize| {
        let records: Vec<Record> = (from..to)
            .map(|i| Record::json(0, plain_event(i, "order.created", None)))
            .collect();
        let topic = env.topic.clone();
        async move { env.broker.produce(&topic, &records).await }
    };
    produce(0, 20).await;
    receiver
        .wait_acked(&ids(0..20), Duration::from_secs(30))
        .await;
    let before = receiver.received();
    for r in &before {
        let sig = &r.headers["webhook-signature"];
        assert!(
            sig.starts_with("v1a,") && !sig.contains("v1,"),
            "v1a only: {sig}"
        );
    }
    let counts = verify_v1a(env.dir.path(), &before, &[&public_old]);
    assert_eq!(counts[&public_old]["valid"], 20, "{counts}");
    assert_eq!(counts[&public_old]["tampered_valid"], 0, "{counts}");

    // Rotation with a grace period: both keys sign.
    let (status, rotated) = api
        .post(
            &format!("/v1/subscriptions/{id}/rotate-signing-key"),
            json!({"grace_seconds": 3600}),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let public_new = rotated["public_key"].as_str().unwrap().to_string();
    assert_ne!(public_new, public_old);
    assert_eq!(rotated["public_keys"], json!([public_new]));
    assert_eq!(rotated["retired_signing_keys"][0]["public_key"], public_old);
    produce(20, 40).await;
    receiver
        .wait_acked(&ids(0..40), Duration::from_secs(30))
        .await;
    let during: Vec<Received> = receiver
        .received()
        .into_iter()
        .filter(|r| ids(20..40).contains(&r.webhook_id))
        .collect();
    assert_eq!(during.len(), 20);
    for r in &during {
        assert_eq!(
            r.headers["webhook-signature"].matches("v1a,").count(),
            2,
            "old and new key sign during the grace period"
        );
    }
    let counts = verify_v1a(env.dir.path(), &during, &[&public_old, &public_new]);
    for k in [&public_old, &public_new] {
        assert_eq!(counts[k]["valid"], 20, "{counts}");
        assert_eq!(counts[k]["tampered_valid"], 0, "{counts}");
    }

    // A rotation without grace: the key it replaces stops at once; the first key keeps the hour of
    // grace its own rotation gave it.
    let (status, rotated) = api
        .post(
            &format!("/v1/subscriptions/{id}/rotate-signing-key"),
            json!({"grace_seconds": 0}),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let public_last = rotated["public_key"].as_str().unwrap().to_string();
    produce(40, 50).await;
    receiver
        .wait_acked(&ids(0..50), Duration::from_secs(30))
        .await;
    let after: Vec<Received> = receiver
        .received()
        .into_iter()
        .filter(|r| ids(40..50).contains(&r.webhook_id))
        .collect();
    let counts = verify_v1a(
        env.dir.path(),
        &after,
        &[&public_old, &public_new, &public_last],
    );
    assert_eq!(counts[&public_last]["valid"], 10, "{counts}");
    assert_eq!(
        counts[&public_new]["valid"], 0,
        "replaced without grace, it no longer signs: {counts}"
    );
    assert_eq!(
        counts[&public_old]["valid"], 10,
        "still within the grace of the first rotation: {counts}"
    );

    // `hookline verify` with the public key agrees; a wrong key and a changed body do not.
    let r = &after[0];
    let run = |key: &str, body: &[u8]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hookline"))
            .args([
                "verify",
                "--secret",
                key,
                "--id",
                &r.webhook_id,
                "--timestamp",
                &r.headers["webhook-timestamp"],
                "--signature",
                &r.headers["webhook-signature"],
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(body).unwrap();
        child.wait_with_output().unwrap().status.code()
    };
    assert_eq!(run(&public_last, &r.body), Some(0));
    assert_eq!(run(&public_new, &r.body), Some(1));
    assert_eq!(run(&public_last, b"{}"), Some(1));
    assert!(
        !h.log().contains(signing_key.trim_start_matches("whsk_")),
        "the signing key is not logged"
    );
}

/// A receiver that answers 200 only with a valid bearer token from `tokens`, else 401.
fn requiring_token(
    tokens: Arc<common::oauth::TokenState>,
) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    move |r| {
        if tokens.accepts(r.headers.get("authorization").map(String::as_str)) {
            Reply::Status(200)
        } else {
            Reply::Status(401)
        }
    }
}

fn statuses(r: &Receiver) -> HashMap<u16, usize> {
    let mut m = HashMap::new();
    for x in r.received() {
        *m.entry(x.status.unwrap_or(0)).or_default() += 1;
    }
    m
}

/// Must show 2 (first part): 1 000 deliveries need one token; a token revoked by the server gets a
/// 401, one refresh and a delivered resend within the same attempt; short-lived tokens are refreshed
/// before they expire (no 401 while they roll over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_one_token_for_many_deliveries_refreshed_before_expiry_and_after_a_401() {
    let broker = Broker::shared();
    let topic = broker.topic("oauth", 2);
    let dir = tempfile::tempdir().unwrap();
    let tokens = TokenServer::start(3600).await;
    let receiver = Receiver::start(requiring_token(tokens.state.clone())).await;
    let cfg = base_config(broker, &[topic.as_str()], "oauth1");
    let prefix = prefix_of(&cfg);
    let mut s = sub(1, &receiver.url(), &["order.created"]);
    s["oauth2"] = tokens.subscription_settings();
    let mut h = Hookline::start(dir.path(), &cfg, &[s]);
    h.wait_ready(Duration::from_secs(30)).await;

    let records: Vec<Record> = (0..1000)
        .map(|i| Record::json((i % 2) as i32, plain_event(i, "order.created", None)))
        .collect();
    broker.produce(&topic, &records).await;
    receiver
        .wait_acked(&ids(0..1000), Duration::from_secs(60))
        .await;
    assert_eq!(tokens.requests(), 1, "one token fetch for 1 000 deliveries");
    assert_eq!(
        statuses(&receiver).get(&401),
        None,
        "no request without a valid token"
    );
    let form = tokens.state.last_form.lock().unwrap().clone();
    assert_eq!(
        form,
        "grant_type=client_credentials&scope=webhooks%3Awrite&audience=https%3A%2F%2Freceiver.test"
    );

    // The server revokes the token: the next delivery gets 401, hookline fetches a new token and
    // resends at once — the same attempt (no retry tier, which would wait 1 s).
    tokens.revoke_all();
    tokens.set_expires_in(2);
    broker
        .produce(
            &topic,
            &[Record::json(0, plain_event(1000, "order.created", None))],
        )
        .await;
    receiver
        .wait_acked(&ids(1000..1001), Duration::from_secs(20))
        .await;
    let tries: Vec<Received> = receiver
        .received()
        .into_iter()
        .filter(|r| r.webhook_id == "evt-01000")
        .collect();
    assert_eq!(
        tries.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![Some(401), Some(200)]
    );
    assert_eq!(
        tries[0].headers["webhook-timestamp"], tries[1].headers["webhook-timestamp"],
        "the resend is the same attempt"
    );
    assert!(
        tries[1].at - tries[0].at < Duration::from_millis(900),
        "resent at once, not through the 1 s tier: {:?}",
        tries[1].at - tries[0].at
    );
    assert_eq!(tokens.requests(), 2, "one refresh after the 401");
    let retried = broker
        .read_all(&format!("{prefix}.retry.1s"))
        .into_iter()
        .filter(|r| String::from_utf8_lossy(&r.value).contains("evt-01000"))
        .count();
    assert_eq!(retried, 0, "nothing went to a retry tier");

    // Tokens now live 2 s: deliveries over 8 s roll over to new tokens before each expires (a token
    // used after its expiry would be refused with a 401, counted below).
    for i in 0..16 {
        broker
            .produce(
                &topic,
                &[Record::json(
                    0,
                    plain_event(1001 + i, "order.created", None),
                )],
            )
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    receiver
        .wait_acked(&ids(1001..1017), Duration::from_secs(20))
        .await;
    let refreshed = tokens.requests() - 2;
    println!("{refreshed} refreshes over 8 s of 2 s tokens");
    assert!(
        (2..=6).contains(&refreshed),
        "refreshed about every 1.8 s while in use ({refreshed} refreshes)"
    );
    assert_eq!(
        statuses(&receiver).get(&401),
        Some(&1),
        "the only 401 was the revoked token's"
    );
    h.sigterm();
    h.wait_exit(Duration::from_secs(20));
    let log = h.log();
    for t in tokens.issued() {
        assert!(!log.contains(&t), "a token is in the log");
    }
    assert!(!log.contains(CLIENT_SECRET));
}

/// Must show 2 (second part): with the token endpoint down, nothing is sent to the endpoint; the
/// deliveries go to the first retry tier with an error that says the token could not be had; once the
/// token endpoint is up, the retries are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_token_endpoint_sends_deliveries_to_the_retry_tier_with_a_clear_error() {
    let broker = Broker::shared();
    let topic = broker.topic("oauth-down", 1);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let receiver = Receiver::ok().await;
    let cfg = base_config(broker, &[topic.as_str()], "oauth2")
        + "[delivery.breaker]\nconsecutive_failures = 1000\nmin_requests = 1000\n";
    let prefix = prefix_of(&cfg);
    let token_url = format!("http://127.0.0.1:{port}/token");
    let mut s = sub(1, &receiver.url(), &["order.created"]);
    s["oauth2"] =
        json!({"token_url": token_url, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET});
    let mut h = Hookline::start(dir.path(), &cfg, &[s]);
    h.wait_ready(Duration::from_secs(30)).await;
    let records: Vec<Record> = (0..3)
        .map(|i| Record::json(0, plain_event(i, "order.created", None)))
        .collect();
    broker.produce(&topic, &records).await;
    let tier = format!("{prefix}.retry.1s");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let first_hops = loop {
        let recs: Vec<ReadRecord> = broker
            .read_all(&tier)
            .into_iter()
            .filter(|r| r.headers["hookline-attempt"] == "1")
            .collect();
        if recs.len() >= 3 {
            break recs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 3 in the first tier",
            recs.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for r in &first_hops {
        assert_eq!(r.headers["hookline-last-status"], "auth");
        let e = &r.headers["hookline-last-error"];
        assert!(
            e.starts_with(&format!("oauth2 token from 127.0.0.1:{port}: ")),
            "the error says the token could not be had: {e}"
        );
        assert!(!e.contains(CLIENT_SECRET) && !e.contains("/token"), "{e}");
    }
    assert_eq!(receiver.count(), 0, "no request without a token");
    // The token endpoint comes up: the retries are delivered with its token.
    let tokens = TokenServer::start_on(port, 3600).await;
    receiver
        .wait_acked(&ids(0..3), Duration::from_secs(30))
        .await;
    for r in receiver.received() {
        assert!(
            tokens
                .state
                .accepts(r.headers.get("authorization").map(String::as_str))
        );
    }
    h.sigterm();
    h.wait_exit(Duration::from_secs(20));
}

/// Must show 3: configured tiers 1 s, 2 s, 3 s; `retry_tiers: ["1s"]` makes an always-failing
/// endpoint attempted exactly twice, then dead-lettered as `exhausted`; `max_attempts: 1` once;
/// another subscription in the same run keeps all tiers (four attempts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_retry_schedule_bounds_its_attempts() {
    let broker = Broker::shared();
    let topic = broker.topic("schedule", 1);
    let dir = tempfile::tempdir().unwrap();
    let failing = Receiver::start(|_| Reply::Status(503)).await;
    let cfg = base_config(broker, &[topic.as_str()], "sched1")
        + "[delivery.breaker]\nconsecutive_failures = 1000\nmin_requests = 1000\n";
    let prefix = prefix_of(&cfg);
    let mut short = sub(1, &failing.url(), &["a"]);
    short["retry_tiers"] = json!(["1s"]);
    let mut once = sub(2, &failing.url(), &["b"]);
    once["max_attempts"] = json!(1);
    let full = sub(3, &failing.url(), &["c"]);
    let mut h = Hookline::start(dir.path(), &cfg, &[short, once, full]);
    h.wait_ready(Duration::from_secs(30)).await;
    broker
        .produce(
            &topic,
            &[
                Record::json(0, plain_event(0, "a", None)),
                Record::json(0, plain_event(1, "b", None)),
                Record::json(0, plain_event(2, "c", None)),
            ],
        )
        .await;
    let dlq = format!("{prefix}.dlq");
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let dead = loop {
        let recs = broker.read_all(&dlq);
        if recs.len() >= 3 {
            break recs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 3 dead-lettered",
            recs.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Whatever else was going to happen has happened once the longest schedule is dead-lettered; a
    // little more time shows nothing more comes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let attempts = |id: &str| {
        failing
            .received()
            .iter()
            .filter(|r| r.webhook_id == id)
            .count()
    };
    assert_eq!(
        attempts("evt-00000"),
        2,
        "retry_tiers [1s]: attempt 1 and one retry"
    );
    assert_eq!(attempts("evt-00001"), 1, "max_attempts 1: no retry");
    assert_eq!(attempts("evt-00002"), 4, "all three tiers");
    let by_sub: HashMap<String, &ReadRecord> = dead
        .iter()
        .map(|r| (r.headers["hookline-subscription"].clone(), r))
        .collect();
    for (id, want) in [(1, "2"), (2, "1"), (3, "4")] {
        let r = by_sub[&sub_id(id)];
        assert_eq!(r.headers["hookline-dlq-reason"], "exhausted");
        assert_eq!(r.headers["hookline-attempt"], want, "subscription {id}");
    }
    assert_eq!(broker.read_all(&dlq).len(), 3);
    let in_tier = |tier: &str, ev: &str| {
        broker
            .read_all(&format!("{prefix}.retry.{tier}"))
            .iter()
            .filter(|r| String::from_utf8_lossy(&r.value).contains(ev))
            .count()
    };
    assert_eq!(
        (in_tier("1s", "evt-00000"), in_tier("2s", "evt-00000")),
        (1, 0)
    );
    assert_eq!(in_tier("1s", "evt-00001"), 0);
    assert_eq!(
        (
            in_tier("1s", "evt-00002"),
            in_tier("2s", "evt-00002"),
            in_tier("3s", "evt-00002")
        ),
        (1, 1, 1)
    );
    h.sigterm();
    h.wait_exit(Duration::from_secs(20));
}
