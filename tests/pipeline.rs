//! The core pipeline against a real tansu broker, real receivers on 127.0.0.1 and the hookline binary.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const TYPES: [&str; 5] = [
    "order.created",
    "order.paid",
    "order.shipped",
    "payment.captured",
    "user.signup",
];

/// Must show 1: each receiver gets exactly its matching set, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_receiver_gets_exactly_its_matching_set() {
    let broker = Broker::shared();
    let events = broker.topic("events", 4);
    let dir = tempfile::tempdir().unwrap();
    let exact = Receiver::ok().await;
    let prefix = Receiver::ok().await;
    let all = Receiver::ok().await;
    let tenant = Receiver::ok().await;
    let filtered = Receiver::ok().await;
    let mut f = sub(5, &filtered.url(), &["user.signup"]);
    f["filter"] = json!({"data.n": {"in": [1, 2, 3, 4, 5, 500, 999]}});
    let subs = vec![
        sub(1, &exact.url(), &["order.created"]),
        sub(2, &prefix.url(), &["order.*"]),
        sub(3, &all.url(), &["*"]),
        {
            let mut s = sub(4, &tenant.url(), &["payment.*", "order.paid"]);
            s["tenant"] = json!("acme");
            s
        },
        f,
    ];
    let mut h = Hookline::start(
        dir.path(),
        &base_config(broker, &[events.as_str()], "g1"),
        &subs,
    );
    h.wait_ready(Duration::from_secs(30)).await;

    // 1 000 events of 5 types over 4 partitions, a third of them for tenant acme, a third for globex.
    let mut records = Vec::new();
    let mut expect: HashMap<&str, HashSet<String>> = HashMap::new();
    for i in 0..1000 {
        let ty = TYPES[i % 5];
        let tenant = match i % 3 {
            0 => Some("acme"),
            1 => Some("globex"),
            _ => None,
        };
        records.push(Record::json((i % 4) as i32, plain_event(i, ty, tenant)));
        let id = format!("evt-{i:05}");
        if ty == "order.created" {
            expect.entry("exact").or_default().insert(id.clone());
        }
        if ty.starts_with("order.") {
            expect.entry("prefix").or_default().insert(id.clone());
        }
        expect.entry("all").or_default().insert(id.clone());
        if tenant == Some("acme") && (ty.starts_with("payment.") || ty == "order.paid") {
            expect.entry("tenant").or_default().insert(id.clone());
        }
        if ty == "user.signup" && [1, 2, 3, 4, 5, 500, 999].contains(&i) {
            expect.entry("filtered").or_default().insert(id.clone());
        }
    }
    broker.produce(events.as_str(), &records).await;

    let receivers = [
        ("exact", &exact),
        ("prefix", &prefix),
        ("all", &all),
        ("tenant", &tenant),
        ("filtered", &filtered),
    ];
    for (name, r) in receivers {
        r.wait_acked(&expect[name], Duration::from_secs(60)).await;
    }
    // Give stragglers (wrong deliveries, if any) time to show up, then compare exactly.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (name, r) in receivers {
        let got: Vec<String> = r.received().into_iter().map(|x| x.webhook_id).collect();
        let set = id_set(got.clone());
        assert_eq!(set, expect[name], "receiver {name} got a different set");
        assert_eq!(
            got.len(),
            set.len(),
            "receiver {name} got duplicates in a fault-free run"
        );
        println!(
            "receiver {name}: {} events, exactly the matching set",
            set.len()
        );
    }
    assert_eq!(
        expect["filtered"].len(),
        2,
        "sanity: filter selects user.signup with n in the list"
    );
    assert_eq!(
        h.metric(&format!(
            "hookline_events_consumed_total{{topic=\"{events}\"}}"
        ))
        .await,
        1000.0
    );
}

/// Must show 2: every request verifies with the unmodified `standardwebhooks` package, each secret alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_verify_with_reference_library() {
    let broker = Broker::shared();
    let events = broker.topic("events", 2);
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::ok().await;
    let mut s = sub(1, &r.url(), &["*"]);
    s["secrets"] = json!([SECRET_A, SECRET_B]);
    s["headers"] = json!({"x-team": "billing"});
    let mut h = Hookline::start(
        dir.path(),
        &base_config(broker, &[events.as_str()], "g2"),
        &[s],
    );
    h.wait_ready(Duration::from_secs(30)).await;

    let mut records = Vec::new();
    for i in 0..40 {
        records.push(Record::json(
            i % 2,
            plain_event(i as usize, "order.created", None),
        ));
    }
    // Ids that webhook-id must hash, a CloudEvents structured and a binary-mode event.
    records.push(Record::json(
        0,
        json!({"id": "has.dots and spaces", "type": "order.created", "data": {"ü": "ß"}}),
    ));
    records.push(Record::json(1, json!({"specversion": "1.0", "id": "ce-1", "type": "order.created", "source": "/shop", "data": {}})));
    records.push(Record {
        partition: Some(0),
        key: None,
        value: br#"{"binary":"mode"}"#.to_vec(),
        headers: vec![
            ("ce_specversion".into(), "1.0".into()),
            ("ce_id".into(), "ce-bin-1".into()),
            ("ce_type".into(), "order.created".into()),
            ("ce_source".into(), "/shop".into()),
        ],
    });
    broker.produce(events.as_str(), &records).await;
    r.wait_for("43 requests", Duration::from_secs(60), |l| l.len() >= 43)
        .await;

    let reqs = r.received();
    for q in &reqs {
        assert_eq!(q.headers["x-team"], "billing");
        assert!(q.headers["user-agent"].starts_with("hookline/"));
        assert_eq!(q.headers["webhook-signature"].split(' ').count(), 2);
    }
    let hashed = reqs
        .iter()
        .find(|q| q.body.windows(4).any(|w| w == b"dots"))
        .unwrap();
    assert!(
        hashed.webhook_id.starts_with("evt_") && hashed.webhook_id.len() == 36,
        "{}",
        hashed.webhook_id
    );
    let bin = reqs.iter().find(|q| q.webhook_id == "ce-bin-1").unwrap();
    assert_eq!(bin.body, br#"{"binary":"mode"}"#);
    let ce = reqs.iter().find(|q| q.webhook_id == "ce-1").unwrap();
    assert_eq!(ce.headers["content-type"], "application/cloudevents+json");

    // Hand every request to the reference verifier, once per secret, plus once with a wrong secret.
    let wrong = "whsec_d3Jvbmcgc2VjcmV0IHdyb25nIHNlY3JldA==";
    let (stdout, counts) = verify_standardwebhooks(dir.path(), &reqs, &[SECRET_A, SECRET_B, wrong]);
    println!("{stdout}");
    let n = reqs.len() as u64;
    assert_eq!(
        counts[SECRET_A]["valid"], n,
        "secret A alone must verify every request"
    );
    assert_eq!(
        counts[SECRET_B]["valid"], n,
        "secret B alone must verify every request"
    );
    assert_eq!(
        counts[wrong]["valid"], 0,
        "a wrong secret must verify nothing"
    );
}

/// Must show 3: records of one partition are delivered concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_partition_is_delivered_concurrently() {
    let broker = Broker::shared();
    let events = broker.topic("events", 1);
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::start(|_| Reply::Delayed(200, Duration::from_millis(200))).await;
    let mut h = Hookline::start(
        dir.path(),
        &base_config(broker, &[events.as_str()], "g3"),
        &[sub(1, &r.url(), &["*"])],
    );
    h.wait_ready(Duration::from_secs(30)).await;
    let records: Vec<Record> = (0..100)
        .map(|i| Record::json(0, plain_event(i, "order.created", None)))
        .collect();
    let start = Instant::now();
    broker.produce(events.as_str(), &records).await;
    let ids = ids(0..100);
    r.wait_acked(&ids, Duration::from_secs(30)).await;
    let took = start.elapsed();
    println!(
        "100 events x 200 ms on one partition delivered in {took:?} (sequential would be 20 s)"
    );
    assert!(
        took < Duration::from_secs(4),
        "took {took:?}: the partition is not processed concurrently"
    );
}

/// Must show 4: kill -9 while some receivers hang; after a restart every event reaches every matching
/// receiver at least once, and offsets committed before the kill are not re-sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_nothing_classic() {
    kill9_loses_nothing("classic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_nothing_consumer() {
    kill9_loses_nothing("consumer").await;
}

/// With static membership (`source.instance_id`), so the restarted process takes its partitions back
/// without waiting for the killed one's session to expire (tests/crash_restart.rs measures each setting).
async fn kill9_loses_nothing(protocol: &str) {
    let broker = Broker::shared();
    let events = broker.topic("events", 4);
    let dir = tempfile::tempdir().unwrap();
    let good = Receiver::ok().await;
    // Hangs for the second batch of events (ids >= 200) until released.
    let hang = Receiver::start(|r| {
        let n: usize = r.webhook_id.trim_start_matches("evt-").parse().unwrap_or(0);
        if n >= 200 {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let mut hs = sub(2, &hang.url(), &["*"]);
    hs["timeout_ms"] = json!(120_000);
    let subs = vec![sub(1, &good.url(), &["*"]), hs];
    let group = format!("g4-{protocol}");
    let cfg = with_protocol(&base_config(broker, &[events.as_str()], &group), protocol);
    let id = format!("kill9-{protocol}");
    let mut h = Hookline::start_with_env(
        dir.path(),
        &cfg,
        &subs,
        &[("HOOKLINE_SOURCE__INSTANCE_ID", id.as_str())],
    );
    h.wait_ready(Duration::from_secs(30)).await;

    let batch = |r: std::ops::Range<usize>| -> Vec<Record> {
        r.map(|i| Record::json((i % 4) as i32, plain_event(i, "order.created", None)))
            .collect()
    };
    broker.produce(events.as_str(), &batch(0..200)).await;
    let first = ids(0..200);
    good.wait_acked(&first, Duration::from_secs(30)).await;
    hang.wait_acked(&first, Duration::from_secs(30)).await;
    // Let the first batch's offsets be committed (commit_interval 200 ms).
    broker
        .wait_committed(&group, events.as_str(), Duration::from_secs(10))
        .await;

    broker.produce(events.as_str(), &batch(200..400)).await;
    let all = ids(0..400);
    good.wait_acked(&all, Duration::from_secs(30)).await;
    hang.wait_for("hung requests", Duration::from_secs(30), |l| {
        l.iter().filter(|r| r.status.is_none()).count() >= 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.kill9();
    println!(
        "killed with {} requests hanging",
        hang.received()
            .iter()
            .filter(|r| r.status.is_none())
            .count()
    );

    hang.release();
    let restarted = Instant::now();
    let before_restart = hang.count();
    h.restart();
    h.wait_ready(Duration::from_secs(60)).await;
    hang.wait_for(
        "a request after the restart",
        Duration::from_secs(60),
        |l| l.len() > before_restart,
    )
    .await;
    println!(
        "{protocol} protocol: restarted instance delivering again after {:?}",
        restarted.elapsed()
    );
    good.wait_acked(&all, Duration::from_secs(60)).await;
    hang.wait_acked(&all, Duration::from_secs(60)).await;

    let resent_first: usize = good
        .received()
        .iter()
        .filter(|r| first.contains(&r.webhook_id))
        .count()
        - first.len();
    println!(
        "after kill -9 and restart: good receiver {} duplicates, hanging receiver {} duplicates, first batch re-sent {}",
        good.duplicates(),
        hang.duplicates(),
        resent_first
    );
    assert_eq!(
        resent_first, 0,
        "records committed before the kill were delivered again"
    );
    assert!(
        good.duplicates() > 0,
        "the unfinished second batch must have been redelivered after the kill"
    );
}

/// Must show 5: malformed records in the middle of a partition are dead-lettered and counted; the rest flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_do_not_stop_the_partition() {
    let broker = Broker::shared();
    let events = broker.topic("events", 1);
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::ok().await;
    let cfg = base_config(broker, &[events.as_str()], "g5")
        .replace("[source]\n", "[source]\nmax_event_bytes = 4096\n");
    let mut h = Hookline::start(dir.path(), &cfg, &[sub(1, &r.url(), &["*"])]);
    h.wait_ready(Duration::from_secs(30)).await;
    let big = format!(
        r#"{{"id":"big","type":"order.created","data":"{}"}}"#,
        "x".repeat(5000)
    );
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("not_json", b"this is not json".to_vec()),
        ("missing_id", br#"{"type":"order.created"}"#.to_vec()),
        ("missing_type", br#"{"id":"no-type"}"#.to_vec()),
        ("too_large", big.into_bytes()),
        ("bad_id", br#"{"id":42,"type":"order.created"}"#.to_vec()),
    ];
    let mut records = Vec::new();
    for (i, (_, v)) in bad.iter().enumerate() {
        records.push(Record::json(0, plain_event(i, "order.created", None)));
        records.push(Record::raw(0, v));
    }
    records.push(Record::json(0, plain_event(99, "order.created", None)));
    broker.produce(events.as_str(), &records).await;
    let good = id_set(
        (0..bad.len())
            .map(|i| format!("evt-{i:05}"))
            .chain(["evt-00099".to_string()]),
    );
    r.wait_acked(&good, Duration::from_secs(30)).await;

    for (reason, _) in &bad {
        let v = h
            .metric(&format!(
                "hookline_events_invalid_total{{topic=\"{events}\",reason=\"{reason}\"}}"
            ))
            .await;
        assert_eq!(v, 1.0, "invalid counter for {reason}");
    }
    let prefix = prefix_of(&cfg);
    let dlq = broker.read_all(&format!("{prefix}.dlq"));
    assert_eq!(
        dlq.len(),
        bad.len(),
        "every invalid record is dead-lettered"
    );
    for (reason, value) in &bad {
        let rec = dlq
            .iter()
            .find(|r| &r.value == value)
            .unwrap_or_else(|| panic!("{reason} record not dead-lettered byte for byte"));
        assert_eq!(rec.headers["hookline-dlq-reason"], "invalid_event");
        assert!(
            rec.headers["hookline-last-error"].starts_with(reason),
            "{:?}",
            rec.headers
        );
        assert_eq!(rec.headers["hookline-origin-topic"], events.as_str());
    }
    assert_eq!(
        h.metric("hookline_dlq_published_total{reason=\"invalid_event\"}")
            .await,
        bad.len() as f64
    );
    // Still alive and everything committed.
    broker
        .wait_committed("g5", events.as_str(), Duration::from_secs(10))
        .await;
    h.sigterm();
    let (status, _) = h.wait_exit(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

/// Must show 6: SIGTERM under load finishes in-flight deliveries, commits, exits 0 within the deadline; after
/// a restart nothing already acknowledged is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_commits_and_exits_zero() {
    let broker = Broker::shared();
    let events = broker.topic("events", 4);
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::start(|_| Reply::Delayed(200, Duration::from_millis(20))).await;
    let mut s = sub(1, &r.url(), &["*"]);
    s["max_in_flight"] = json!(8);
    // Bound what hookline takes per partition so that SIGTERM finds work in flight and work not yet taken.
    let cfg = base_config(broker, &[events.as_str()], "g6")
        .replace("[source]\n", "[source]\nmax_in_flight_per_partition = 10\n");
    let mut h = Hookline::start(dir.path(), &cfg, &[s]);
    h.wait_ready(Duration::from_secs(30)).await;
    let n = 1000;
    let records: Vec<Record> = (0..n)
        .map(|i| Record::json((i % 4) as i32, plain_event(i, "order.created", None)))
        .collect();
    broker.produce(events.as_str(), &records).await;
    r.wait_for("100 requests", Duration::from_secs(30), |l| l.len() >= 100)
        .await;

    h.sigterm();
    let (status, took) = h.wait_exit(Duration::from_secs(15));
    let before = r.received();
    println!(
        "exit {status:?} after {took:?}; {} requests before exit",
        before.len()
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0), "log:\n{}", h.log());
    assert!(
        took < Duration::from_secs(10),
        "exceeded the 10 s shutdown deadline"
    );
    assert!(
        before.iter().all(|q| q.status == Some(200)),
        "a delivery in flight at SIGTERM was not finished"
    );
    assert!(before.len() < n, "the test needs a run stopped under load");
    let acked_before = id_set(before.iter().map(|q| q.webhook_id.clone()));

    h.restart();
    h.wait_ready(Duration::from_secs(30)).await;
    let all = ids(0..n);
    r.wait_acked(&all, Duration::from_secs(60)).await;
    let after: Vec<String> = r.received()[before.len()..]
        .iter()
        .map(|q| q.webhook_id.clone())
        .collect();
    let resent: Vec<&String> = after
        .iter()
        .filter(|id| acked_before.contains(*id))
        .collect();
    println!(
        "after restart: {} requests, {} re-sent of {} acknowledged before",
        after.len(),
        resent.len(),
        acked_before.len()
    );
    assert!(
        resent.is_empty(),
        "acknowledged before SIGTERM and sent again: {resent:?}"
    );
}

/// Must show 7: config and CLI errors exit 2 with a message naming the setting.
#[test]
fn config_and_cli_errors_exit_2_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let subs = dir.path().join("subs.yaml");
    std::fs::write(&subs, "- {url: 'http://127.0.0.1:1/', event_types: ['*'], secrets: ['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']}\n").unwrap();
    let base = format!(
        "[kafka]\n\"bootstrap.servers\" = \"127.0.0.1:1\"\n[source]\ntopics = [\"t\"]\n[store]\nkind = \"yaml\"\npath = \"{}\"\n",
        subs.display()
    );
    let run = |toml: &str, env: &[(&str, &str)]| {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, toml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hookline"))
            .args(["run", "--check-config", "--config"])
            .arg(&p)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, _, out) = run(&base, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 enabled subscriptions"), "{out}");

    // (config text, environment, setting the error must name)
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            base.clone(),
            vec![("HOOKLINE_SOURCE__TOPICS", "")],
            "source.topics",
        ),
        (
            base.clone(),
            vec![("HOOKLINE_RETRY__TIERS", "1m,5x")],
            "retry.tiers[1]",
        ),
        (
            base.clone(),
            vec![("HOOKLINE_DELIVERY__ALLOW_NETWORKS", "300.0.0.0/8")],
            "delivery.allow_networks[0]",
        ),
        (format!("{base}[delivery]\nbogus = 1\n"), vec![], "bogus"),
        (
            base.replace("[source]\n", "[source]\nmax_in_flight = -5\n"),
            vec![],
            "source.max_in_flight",
        ),
        (
            base.clone(),
            vec![("HOOKLINE_STORE__PATH", "/nonexistent/subs.yaml")],
            "store.path",
        ),
        (
            base.clone(),
            vec![("HOOKLINE_ADMIN__LISTEN", "not-an-address")],
            "admin.listen",
        ),
    ];
    for (toml, env, setting) in cases {
        let (code, err, _) = run(&toml, &env);
        assert_eq!(code, Some(2), "{setting}: {err}");
        assert!(
            err.contains(setting),
            "message for {setting} does not name it: {err}"
        );
        assert_eq!(
            err.trim().lines().count(),
            1,
            "one-line message expected: {err}"
        );
    }
    // An invalid subscription names the subscription and the field.
    std::fs::write(&subs, "- {url: 'ftp://x/', event_types: ['*'], secrets: ['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']}\n").unwrap();
    let (code, err, _) = run(&base, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("url"), "{err}");
    std::fs::write(&subs, "- {url: 'http://x/', event_types: ['a*b'], secrets: ['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']}\n").unwrap();
    let (code, err, _) = run(&base, &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("event_types[0]"), "{err}");

    // Usage errors.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hookline"))
        .args(["run", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hookline"))
        .args(["sign", "--secret", "nope", "--id", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--secret"));
}

/// `hookline sign` / `hookline verify` round trip (the receivers' debugging aid).
#[test]
fn sign_and_verify_commands() {
    use std::io::Write;
    let run = |args: &[&str], body: &[u8]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_hookline"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(body).unwrap();
        let out = c.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    // Standard Webhooks reference vector.
    let (code, sig) = run(
        &[
            "sign",
            "--secret",
            SECRET_A,
            "--id",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "--timestamp",
            "1614265330",
        ],
        br#"{"test": 2432232314}"#,
    );
    assert_eq!(code, Some(0));
    assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    let args = [
        "verify",
        "--secret",
        SECRET_A,
        "--id",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "--timestamp",
        "1614265330",
        "--signature",
        &sig,
    ];
    assert_eq!(run(&args, br#"{"test": 2432232314}"#).0, Some(0));
    assert_eq!(run(&args, br#"{"test": 2432232315}"#).0, Some(1));
    let mut tol = args.to_vec();
    tol.extend(["--tolerance", "300"]);
    assert_eq!(
        run(&tol, br#"{"test": 2432232314}"#).0,
        Some(1),
        "a 2021 timestamp is outside a 5 minute tolerance"
    );
}

/// SIGTERM after the broker went away while failed deliveries were being handed to the retry tier: the drain,
/// the final commit and the group leave are all bounded, and the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_broker_gone_still_exits() {
    // Its own broker: this test takes it away.
    let broker = Broker::start();
    let events = broker.topic("events", 2);
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::start(|_| Reply::Delayed(503, Duration::from_millis(300))).await;
    let cfg = base_config(&broker, &[events.as_str()], "g7")
        .replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"3s\"");
    let mut h = Hookline::start(dir.path(), &cfg, &[sub(1, &r.url(), &["*"])]);
    h.wait_ready(Duration::from_secs(30)).await;
    let records: Vec<Record> = (0..200)
        .map(|i| Record::json((i % 2) as i32, plain_event(i, "order.created", None)))
        .collect();
    broker.produce(events.as_str(), &records).await;
    r.wait_for("requests", Duration::from_secs(30), |l| l.len() >= 10)
        .await;
    drop(broker);
    h.sigterm();
    let (status, took) = h.wait_exit(Duration::from_secs(60));
    println!("exit {status:?} after {took:?} with the broker gone");
    assert_eq!(status.and_then(|s| s.code()), Some(0), "log:\n{}", h.log());
    // 3 s drain + at most 5 s each for commit, group leave and producer flush.
    assert!(took < Duration::from_secs(25), "took {took:?}");
}

/// Rebalance: a second instance joins while the first has deliveries in flight. The revoked partitions are
/// drained and committed before they move, so nothing is lost and nothing is delivered twice; then the
/// first instance stops (SIGTERM) and the second takes over everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_drains_revoked_partitions_classic() {
    rebalance_drains_revoked_partitions("classic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_drains_revoked_partitions_consumer() {
    rebalance_drains_revoked_partitions("consumer").await;
}

async fn rebalance_drains_revoked_partitions(protocol: &str) {
    let broker = Broker::shared();
    let events = broker.topic("events", 4);
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let r = Receiver::start(|_| Reply::Delayed(200, Duration::from_millis(50))).await;
    let mut s = sub(1, &r.url(), &["*"]);
    s["max_in_flight"] = json!(16);
    let cfg = with_protocol(
        &base_config(broker, &[events.as_str()], &format!("g8-{protocol}")),
        protocol,
    );
    let mut a = Hookline::start(dir_a.path(), &cfg, std::slice::from_ref(&s));
    a.wait_ready(Duration::from_secs(30)).await;
    let records: Vec<Record> = (0..600)
        .map(|i| Record::json((i % 4) as i32, plain_event(i, "order.created", None)))
        .collect();
    broker.produce(events.as_str(), &records[..400]).await;
    r.wait_for("50 requests", Duration::from_secs(30), |l| l.len() >= 50)
        .await;

    let joined = Instant::now();
    let mut b = Hookline::start(dir_b.path(), &cfg, &[s]);
    b.wait_ready(Duration::from_secs(30)).await;
    // B owns two source partitions once the incremental rebalance completed (in one step or several).
    let deadline = Instant::now() + Duration::from_secs(30);
    while source_partitions_assigned(&b.log()) < 2 {
        assert!(
            Instant::now() < deadline,
            "B never got partitions; A log:\n{}\nB log:\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moved = joined.elapsed();
    broker.produce(events.as_str(), &records[400..]).await;
    let all = ids(0..600);
    r.wait_acked(&all, Duration::from_secs(60)).await;
    let consumed_b = b
        .metric(&format!(
            "hookline_events_consumed_total{{topic=\"{events}\"}}"
        ))
        .await;
    assert!(consumed_b > 0.0, "B consumed nothing");

    a.sigterm();
    let stopped = Instant::now();
    let (status, _) = a.wait_exit(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    let more: Vec<Record> = (600..700)
        .map(|i| Record::json((i % 4) as i32, plain_event(i, "order.created", None)))
        .collect();
    broker.produce(events.as_str(), &more).await;
    let all = ids(0..700);
    r.wait_acked(&all, Duration::from_secs(60)).await;
    let takeover = stopped.elapsed();

    let dups = r.duplicates();
    println!(
        "{protocol} protocol: B had its two partitions {moved:?} after it started; after A's SIGTERM, B had \
         delivered every event {takeover:?} later; B consumed {consumed_b} records; {} requests for 700 \
         events, {dups} duplicates",
        r.count()
    );
    assert_eq!(
        dups, 0,
        "revoked partitions were not drained and committed before moving"
    );
}

/// Backpressure: with every delivery hanging, a partition is paused at `max_in_flight_per_partition`
/// (hookline stops taking records), and after the endpoint recovers it resumes exactly where it stopped:
/// every event delivered, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_pauses_at_bound_and_resumes_without_gaps() {
    let broker = Broker::shared();
    let events = broker.topic("events", 1);
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::start(|_| Reply::Hang).await;
    let mut s = sub(1, &r.url(), &["*"]);
    s["timeout_ms"] = json!(60_000);
    let cfg = base_config(broker, &[events.as_str()], "g9")
        .replace("[source]\n", "[source]\nmax_in_flight_per_partition = 20\n");
    let mut h = Hookline::start(dir.path(), &cfg, &[s]);
    h.wait_ready(Duration::from_secs(30)).await;
    let records: Vec<Record> = (0..300)
        .map(|i| Record::json(0, plain_event(i, "order.created", None)))
        .collect();
    broker.produce(events.as_str(), &records).await;
    r.wait_for("20 hanging requests", Duration::from_secs(30), |l| {
        l.len() >= 20
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let consumed = h
        .metric(&format!(
            "hookline_events_consumed_total{{topic=\"{events}\"}}"
        ))
        .await;
    println!("consumed {consumed} of 300 records while paused at a bound of 20");
    assert!(
        (20.0..=40.0).contains(&consumed),
        "consumed {consumed}: the partition was not paused at its bound"
    );
    assert_eq!(
        r.count(),
        consumed as usize,
        "every record taken is being delivered"
    );

    r.release();
    let all = ids(0..300);
    r.wait_acked(&all, Duration::from_secs(60)).await;
    assert_eq!(r.duplicates(), 0, "pause/resume repeated records");
}
