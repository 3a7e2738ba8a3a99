//! `hookline dlq stats` and `hookline replay` end to end (issue 6): a real broker, a hookline on SQLite
//! producing real dead letters of several reasons for two subscriptions, the CLI run as a process.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "replay-test-token-0123456789";

fn cli(config: &Path, args: &[&str]) -> (i32, String, String) {
    let config = config.to_str().unwrap();
    let r = hookline_cli(
        &[args, &["--config", config]].concat(),
        &[("RUST_LOG", "warn")],
    );
    (r.code, r.stdout, r.stderr)
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Fails by event type while `failing` is set: x.rejected → 400, x.gone → 410, x.exhausted and y.* → 503
/// (y.* rejected: 400). Everything succeeds once `failing` is cleared.
fn typed(failing: Arc<AtomicBool>) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    move |r| {
        if !failing.load(Ordering::Relaxed) {
            return Reply::Status(200);
        }
        match r.event_type().as_str() {
            "x.rejected" | "y.rejected" | "z.rejected" => Reply::Status(400),
            "x.gone" => Reply::Status(410),
            "x.exhausted" => Reply::Status(503),
            _ => Reply::Status(200),
        }
    }
}

fn end_offsets(broker: &Broker, topic: &str) -> usize {
    broker.read_all(topic).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_stats_and_filtered_resumable_rate_limited_replay() {
    let env = SqliteEnv::new(1);
    let (broker, topic) = (&env.broker, &env.topic);
    let h = env.hookline(TOKEN).await;
    let api = Api::new(&h, TOKEN);
    let prefix = prefix_of(&env.cfg);
    let dlq = format!("{prefix}.dlq");
    let cli_cfg = h.config_path();

    let failing = Arc::new(AtomicBool::new(true));
    let r1 = Receiver::start(typed(failing.clone())).await;
    let r2 = Receiver::start(typed(failing.clone())).await;
    let mut ids = Vec::new();
    for rx in [&r1, &r2] {
        let (st, s) = api
            .post(
                "/v1/subscriptions",
                json!({"url": rx.url(), "event_types": ["x.*"]}),
            )
            .await;
        assert_eq!(st, 201, "{s}");
        ids.push(s["id"].as_str().unwrap().to_string());
    }
    let (s1, s2) = (ids[0].clone(), ids[1].clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Dead letters: per subscription 3 rejected, 2 exhausted, then 1 gone (last: a 410 disables the
    // subscription, which would turn pending retries into `rejected`); plus one undecodable record.
    let mut recs = Vec::new();
    for i in 0..3 {
        recs.push(Record::json(0, plain_event(i, "x.rejected", None)));
    }
    for i in 4..6 {
        recs.push(Record::json(0, plain_event(i, "x.exhausted", None)));
    }
    recs.push(Record::raw(0, b"not json at all"));
    broker.produce(topic, &recs).await;
    let wait_dlq = async |n: usize| {
        let t = Instant::now();
        while end_offsets(broker, &dlq) < n {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "dead letters did not arrive: {}",
                end_offsets(broker, &dlq)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    wait_dlq(11).await;
    broker
        .produce(topic, &[Record::json(0, plain_event(3, "x.gone", None))])
        .await;
    wait_dlq(13).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(end_offsets(broker, &dlq), 13);
    // The 410 disabled both subscriptions; enable them again and let every delivery succeed from now on.
    for id in [&s1, &s2] {
        let (st, _) = api
            .patch(&format!("/v1/subscriptions/{id}"), json!({"enabled": true}))
            .await;
        assert_eq!(st, 200);
    }
    failing.store(false, Ordering::Relaxed);
    let (r1_before, r2_before) = (r1.count(), r2.count());

    // dlq stats.
    let (code, out, err) = cli(&cli_cfg, &["dlq", "stats", "--json"]);
    assert_eq!(code, 0, "{err}");
    let stats = json_of(&out);
    assert_eq!(stats["records"], 13);
    assert_eq!(
        stats["by_reason"],
        json!({"rejected": 6, "gone": 2, "exhausted": 4, "invalid_event": 1})
    );
    assert_eq!(stats["by_subscription"][&s1], 6);
    assert_eq!(stats["by_subscription"][&s2], 6);
    assert_eq!(stats["by_subscription"]["(none)"], 1);
    assert_eq!(
        stats["by_event_type"],
        json!({"x.rejected": 6, "x.gone": 2, "x.exhausted": 4, "(not decodable)": 1})
    );
    assert!(stats["oldest"].as_str().unwrap() <= stats["newest"].as_str().unwrap());
    let (code, text, _) = cli(&cli_cfg, &["dlq", "stats"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("13 records") && text.contains("invalid_event"),
        "{text}"
    );
    println!(
        "dlq stats: {}",
        serde_json::to_string(&stats["by_reason"]).unwrap()
    );

    // 1. One subscription, one reason: exactly those re-delivered, once each, through the first tier.
    let tier1 = format!("{prefix}.retry.1s");
    let (code, out, err) = cli(
        &cli_cfg,
        &[
            "replay",
            "--subscription",
            &s1,
            "--reason",
            "rejected",
            "--to",
            "retry.1s",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let sum = json_of(&out);
    assert_eq!(
        (
            sum["scanned"].as_u64(),
            sum["matched"].as_u64(),
            sum["replayed"].as_u64(),
            sum["skipped"].as_u64()
        ),
        (Some(13), Some(3), Some(3), Some(0)),
        "{sum}"
    );
    r1.wait_acked(&ids_of(0..3), Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let new1: Vec<String> = r1.received()[r1_before..]
        .iter()
        .map(|r| r.webhook_id.clone())
        .collect();
    assert_eq!(new1.len(), 3, "r1 got {new1:?}");
    assert_eq!(
        new1.iter().collect::<HashSet<_>>(),
        ids_of(0..3).iter().collect()
    );
    assert_eq!(r2.count(), r2_before, "the other subscription got a replay");
    let replayed: Vec<_> = broker
        .read_all(&tier1)
        .into_iter()
        .filter(|r| r.headers.contains_key("hookline-replay-id"))
        .collect();
    assert_eq!(replayed.len(), 3);
    for r in &replayed {
        assert_eq!(r.headers["hookline-attempt"], "0", "attempts reset");
        assert_eq!(r.headers["hookline-subscription"], s1);
        assert_eq!(
            r.headers["hookline-replay-id"],
            sum["replay_id"].as_str().unwrap()
        );
        assert!(!r.headers.contains_key("hookline-dlq-reason"));
    }
    println!(
        "replay --subscription S1 --reason rejected: {}",
        sum["matched"]
    );

    // 2. Dry run: nothing produced, the same count a real run then replays.
    let args = [
        "replay",
        "--subscription",
        &s2,
        "--reason",
        "exhausted",
        "--to",
        "retry.1s",
        "--json",
    ];
    let before = (
        end_offsets(broker, &tier1),
        end_offsets(broker, &dlq),
        end_offsets(broker, topic),
    );
    let mut dry: Vec<&str> = args.to_vec();
    dry.push("--dry-run");
    let (code, out, err) = cli(&cli_cfg, &dry);
    assert_eq!(code, 0, "{err}");
    let d = json_of(&out);
    assert_eq!(d["dry_run"], true);
    assert_eq!(d["matched"], 2);
    assert_eq!(d["sample"].as_array().unwrap().len(), 2);
    assert_eq!(d["sample"][0]["event_type"], "x.exhausted");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        (
            end_offsets(broker, &tier1),
            end_offsets(broker, &dlq),
            end_offsets(broker, topic)
        ),
        before,
        "a dry run produced"
    );
    let (code, out, err) = cli(&cli_cfg, &args);
    assert_eq!(code, 0, "{err}");
    let real = json_of(&out);
    assert_eq!(real["replayed"], d["replayed"], "dry run {d}\nreal {real}");
    assert_eq!(real["replayed"], 2);
    r2.wait_acked(&ids_of(4..6), Duration::from_secs(10)).await;
    // The same command again: its group has seen everything; nothing twice.
    let (code, out, _) = cli(&cli_cfg, &args);
    assert_eq!(code, 0);
    assert_eq!(json_of(&out)["replayed"], 0);
    println!(
        "dry run: would replay {}, real run replayed {}",
        d["replayed"], real["replayed"]
    );

    // Records of a deleted subscription are reported, not sent; invalid_event records are never replayed.
    let (st, _) = api.delete(&format!("/v1/subscriptions/{s2}")).await;
    assert_eq!(st, 204);
    let (code, out, err) = cli(&cli_cfg, &["replay", "--reason", "gone", "--json"]);
    assert_eq!(code, 0, "{err}");
    let g = json_of(&out);
    assert_eq!(
        (
            g["matched"].as_u64(),
            g["replayed"].as_u64(),
            g["skipped"].as_u64()
        ),
        (Some(2), Some(1), Some(1)),
        "{g}"
    );
    assert_eq!(g["missing_subscriptions"][&s2], 1);
    let (code, out, _) = cli(
        &cli_cfg,
        &[
            "replay",
            "--reason",
            "invalid_event",
            "--to",
            "source",
            "--json",
        ],
    );
    assert_eq!(code, 0);
    let inv = json_of(&out);
    assert_eq!(
        (inv["matched"].as_u64(), inv["replayed"].as_u64()),
        (Some(1), Some(0)),
        "{inv}"
    );
    let (code, _, err) = cli(&cli_cfg, &["replay", "--to", &dlq]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("dead-letter topic itself"), "{err}");

    // 3. --rate 20 over 100 records, interrupted and resumed with the same command.
    let y: Vec<Record> = (100..200)
        .map(|i| Record::json(0, plain_event(i, "y.rejected", None)))
        .collect();
    let (st, _) = api
        .patch(
            &format!("/v1/subscriptions/{s1}"),
            json!({"event_types": ["x.*", "y.*"]}),
        )
        .await;
    assert_eq!(st, 200);
    failing.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.produce(topic, &y).await;
    let t = Instant::now();
    while end_offsets(broker, &dlq) < 113 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "y dead letters missing"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    failing.store(false, Ordering::Relaxed);
    let r1_before = r1.count();
    let args = [
        "replay",
        "--event-type",
        "y.*",
        "--rate",
        "20",
        "--to",
        "source",
        "--json",
    ];
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_hookline"))
        .args(args)
        .arg("--config")
        .arg(&cli_cfg)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let first_wall = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let part1 = json_of(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(part1["interrupted"], true, "{part1}");
    let n1 = part1["replayed"].as_u64().unwrap();
    assert!((20..=60).contains(&n1), "{n1} replayed in ~2 s at 20/s");
    let (code, out, err) = cli(&cli_cfg, &args);
    assert_eq!(code, 0, "{err}");
    let part2 = json_of(&out);
    let n2 = part2["replayed"].as_u64().unwrap();
    assert_eq!(n1 + n2, 100, "first {part1}\nsecond {part2}");
    assert_eq!(part2["interrupted"], false);
    let secs = part1["seconds"].as_f64().unwrap() + part2["seconds"].as_f64().unwrap();
    assert!(secs >= 4.7, "100 records at 20/s took {secs:.2} s");
    assert!(part2["seconds"].as_f64().unwrap() >= (n2 - 1) as f64 / 20.0 - 0.1);
    r1.wait_acked(&ids_of(100..200), Duration::from_secs(15))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got: Vec<String> = r1.received()[r1_before..]
        .iter()
        .map(|r| r.webhook_id.clone())
        .collect();
    let mut counts: HashMap<&String, usize> = HashMap::new();
    for g in &got {
        *counts.entry(g).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    assert_eq!(counts.len(), 100);
    println!(
        "rate 20/s: interrupted after {n1} ({first_wall:?} wall), resumed {n2}; {secs:.2} s of replay in all, 100 delivered once each"
    );
    drop(h);
}

/// Replaying to a tier goes through the normal delivery path: the subscription's rate limit and its
/// circuit breaker apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_a_tier_obeys_rate_limit_and_breaker() {
    let mut env = SqliteEnv::new(1);
    env.cfg
        .push_str("[delivery.breaker]\nconsecutive_failures = 3\ncool_down = \"60s\"\n");
    let (broker, topic) = (&env.broker, &env.topic);
    let h = env.hookline(TOKEN).await;
    let api = Api::new(&h, TOKEN);
    let dlq = format!("{}.dlq", prefix_of(&env.cfg));
    let failing = Arc::new(AtomicBool::new(true));
    let rx = Receiver::start(typed(failing.clone())).await;
    let (st, s) = api
        .post(
            "/v1/subscriptions",
            json!({"url": rx.url(), "event_types": ["x.*"], "rate_limit_per_sec": 5, "burst": 1}),
        )
        .await;
    assert_eq!(st, 201, "{s}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let recs: Vec<Record> = (0..20)
        .map(|i| Record::json(0, plain_event(i, "x.rejected", None)))
        .collect();
    broker.produce(topic, &recs).await;
    let t = Instant::now();
    while end_offsets(broker, &dlq) < 20 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "dead letters missing"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    failing.store(false, Ordering::Relaxed);
    let before = rx.count();
    let (code, out, err) = cli(&h.config_path(), &["replay", "--to", "retry.1s", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&out)["replayed"], 20);
    rx.wait_acked(&ids_of(0..20), Duration::from_secs(30)).await;
    let times: Vec<Instant> = rx.received()[before..].iter().map(|r| r.at).collect();
    let peak = times
        .iter()
        .map(|a| {
            times
                .iter()
                .filter(|b| **b >= *a && **b < *a + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    let spread = *times.iter().max().unwrap() - *times.iter().min().unwrap();
    println!("replayed 20 to a 5/s subscription: peak {peak} in any 1 s, spread over {spread:?}");
    assert!(
        peak <= 6,
        "rate limit not applied to replayed records: {peak} in 1 s"
    );
    assert!(spread >= Duration::from_millis(3000), "{spread:?}");

    // Breaker: a subscription whose endpoint now fails (503) gets 3 requests, then its breaker opens
    // and the other replayed records are not sent (circuit_open); one request at a time.
    let rb = Receiver::start(typed(Arc::new(AtomicBool::new(true)))).await;
    let (st, sb) = api
        .post(
            "/v1/subscriptions",
            json!({"url": rb.url(), "event_types": ["z.*"], "max_in_flight": 1}),
        )
        .await;
    assert_eq!(st, 201, "{sb}");
    let b = sb["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let zs: Vec<Record> = (60..70)
        .map(|i| Record::json(0, plain_event(i, "z.rejected", None)))
        .collect();
    broker.produce(topic, &zs).await;
    let t = Instant::now();
    while end_offsets(broker, &dlq) < 30 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "z dead letters missing"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    rb.set_behaviour(|_| Reply::Status(503));
    let open_series = "hookline_delivery_attempts_total{result=\"circuit_open\"}";
    let open_before = h.metric(open_series).await;
    let before = rb.count();
    let (code, out, err) = cli(
        &h.config_path(),
        &["replay", "--subscription", &b, "--to", "retry.1s", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&out)["replayed"], 10);
    let t = Instant::now();
    loop {
        let open = h.metric(open_series).await - open_before;
        if open >= 7.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "breaker did not stop replayed deliveries: {open}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rb.count() - before,
        3,
        "requests reached an endpoint whose breaker was open"
    );
    println!("replayed 10 to a failing endpoint: 3 requests, then circuit_open");
    drop(h);
}

fn ids_of(r: std::ops::Range<usize>) -> HashSet<String> {
    ids(r)
}
