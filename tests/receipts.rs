//! Delivery receipts and trace context (issue 21), against the real broker and real receivers: one
//! receipt per terminal outcome of an (event, subscription), valid against schemas/receipt.schema.json
//! (checked by jsonschema-rs in a separate Python process), none for retry hops or invalid events, none
//! missing after a kill -9; W3C `traceparent`/`tracestate` forwarded on every attempt.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const RECEIPTS: &str = "[receipts]\nenabled = true\n";
const NO_BREAKER: &str =
    "[delivery.breaker]\nconsecutive_failures = 1000000\nmin_requests = 1000000\n";

/// The receipts topic's records as (JSON value, record), after at least `want` arrived.
async fn receipts(
    broker: &Broker,
    prefix: &str,
    want: usize,
    timeout: Duration,
) -> Vec<(Value, ReadRecord)> {
    let topic = format!("{prefix}.receipts");
    let deadline = Instant::now() + timeout;
    loop {
        let recs = broker.read_all(&topic);
        if recs.len() >= want {
            return recs
                .into_iter()
                .map(|r| (serde_json::from_slice(&r.value).unwrap(), r))
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "{} of {want} receipts on {topic}",
            recs.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Validates every receipt against schemas/receipt.schema.json with jsonschema-rs (Python, a separate
/// process; installed with schemathesis).
fn validate_against_schema(dir: &std::path::Path, values: &[Value]) {
    let path = dir.join("receipts.json");
    std::fs::write(&path, serde_json::to_vec(values).unwrap()).unwrap();
    let script = r#"
import json, sys, jsonschema_rs
schema = json.load(open(sys.argv[1]))
v = jsonschema_rs.validator_for(schema, validate_formats=True)
items = json.load(open(sys.argv[2]))
bad = [(i, str(e)) for i, x in enumerate(items) for e in v.iter_errors(x)]
print(json.dumps({"checked": len(items), "errors": bad[:5]}))
sys.exit(1 if bad else 0)
"#;
    let out = Command::new(verifier_python())
        .args(["-c", script])
        .arg(repo_root().join("schemas/receipt.schema.json"))
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "receipts do not match the schema: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("schema: {stdout}");
}

/// Must show 1 (first part): delivered, retried-then-delivered, rejected, exhausted and invalid events,
/// one event fanned out to two subscriptions: exactly one receipt per (event, subscription) terminal
/// outcome, with the right outcome, reason, attempts and origin; none for retry hops or invalid events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_receipt_per_terminal_outcome() {
    let broker = Broker::shared();
    let topic = broker.topic("receipts", 2);
    let dir = tempfile::tempdir().unwrap();
    let ok = Receiver::ok().await;
    let also = Receiver::ok().await;
    let flaky = Receiver::start(fail_first(1, 503)).await;
    let rejecting = Receiver::start(|_| Reply::Status(400)).await;
    let failing = Receiver::start(|_| Reply::Status(503)).await;
    let cfg = base_config(broker, &[topic.as_str()], "rcpt1") + RECEIPTS + NO_BREAKER;
    let prefix = prefix_of(&cfg);
    let mut exhausted = sub(5, &failing.url(), &["exh"]);
    exhausted["retry_tiers"] = json!(["1s"]);
    let mut tenant_sub = sub(2, &also.url(), &["ok"]);
    tenant_sub["tenant"] = json!("acme");
    let subs = vec![
        sub(1, &ok.url(), &["ok"]),
        tenant_sub,
        sub(3, &flaky.url(), &["flaky"]),
        sub(4, &rejecting.url(), &["rej"]),
        exhausted,
    ];
    let mut h = Hookline::start(dir.path(), &cfg, &subs);
    h.wait_ready(Duration::from_secs(30)).await;
    let mut records = Vec::new();
    let mut expect: HashMap<(String, String), (&str, Option<&str>, u64)> = HashMap::new();
    for i in 0..40 {
        let (ty, tenant) = match i % 4 {
            0 | 1 => ("ok", Some("acme")),
            2 => ("flaky", None),
            _ => ("rej", None),
        };
        records.push(Record::json((i % 2) as i32, plain_event(i, ty, tenant)));
        let id = format!("evt-{i:05}");
        match ty {
            "ok" => {
                expect.insert((id.clone(), sub_id(1)), ("delivered", None, 1));
                expect.insert((id, sub_id(2)), ("delivered", None, 1));
            }
            "flaky" => {
                expect.insert((id, sub_id(3)), ("delivered", None, 2));
            }
            _ => {
                expect.insert((id, sub_id(4)), ("dead_lettered", Some("rejected"), 1));
            }
        }
    }
    for i in 40..43 {
        records.push(Record::json(0, plain_event(i, "exh", None)));
        expect.insert(
            (format!("evt-{i:05}"), sub_id(5)),
            ("dead_lettered", Some("exhausted"), 2),
        );
    }
    for i in 0..4 {
        records.push(Record::raw(1, format!("not json {i}").as_bytes()));
    }
    broker.produce(&topic, &records).await;
    let got = receipts(broker, &prefix, expect.len(), Duration::from_secs(40)).await;
    // Anything more would come within a tier delay; wait one, then count again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let got_again = broker.read_all(&format!("{prefix}.receipts"));
    assert_eq!(
        got_again.len(),
        expect.len(),
        "exactly one receipt per outcome"
    );
    let mut seen = HashSet::new();
    for (v, rec) in &got {
        let key = (
            v["event_id"].as_str().unwrap().to_string(),
            v["subscription_id"].as_str().unwrap().to_string(),
        );
        assert!(seen.insert(key.clone()), "a second receipt for {key:?}");
        let (outcome, reason, attempts) = expect
            .get(&key)
            .unwrap_or_else(|| panic!("a receipt nobody expected: {v}"));
        assert_eq!(v["outcome"], *outcome, "{v}");
        assert_eq!(v["reason"].as_str(), *reason, "{v}");
        assert_eq!(v["attempts"], *attempts, "{v}");
        assert_eq!(
            rec.key.as_deref(),
            Some(key.1.as_str()),
            "keyed by subscription"
        );
        assert_eq!(rec.headers["hookline-subscription"], key.1);
        assert_eq!(rec.headers["hookline-origin-topic"], topic);
        let n: usize = key.0[4..].parse().unwrap();
        assert_eq!(
            rec.headers["hookline-origin-partition"],
            (if n >= 40 { 0 } else { n % 2 }).to_string()
        );
        let latency = v["latency_ms"].as_u64().unwrap();
        assert!(latency < 30_000, "{v}");
        if key.1 == sub_id(2) {
            assert_eq!(v["tenant"], "acme");
        }
        match v["outcome"].as_str() {
            Some("delivered") if *attempts == 2 => assert_eq!(v["last_status"], "200"),
            Some("dead_lettered") if *reason == Some("exhausted") => {
                assert_eq!(v["last_status"], "503");
                assert!(latency >= 1000, "two attempts a tier apart: {v}");
            }
            Some("dead_lettered") => assert_eq!(v["last_status"], "400"),
            _ => assert_eq!(v["last_status"], "200"),
        }
    }
    let values: Vec<Value> = got.iter().map(|(v, _)| v.clone()).collect();
    validate_against_schema(dir.path(), &values);
    assert_eq!(
        h.metric("hookline_receipts_published_total").await,
        expect.len() as f64
    );
    h.sigterm();
    h.wait_exit(Duration::from_secs(20));
}

/// Must show 1 (second part): kill -9 in the middle of a run, restart: every event the receiver
/// acknowledged has a `delivered` receipt (duplicates allowed), none is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_leaves_no_outcome_without_a_receipt() {
    let broker = Broker::shared();
    let topic = broker.topic("receipts-kill", 2);
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(|_| Reply::Delayed(200, Duration::from_millis(2))).await;
    let cfg = fast_failover(
        &(base_config(broker, &[topic.as_str()], "rcpt2") + RECEIPTS),
        "consumer",
    );
    let prefix = prefix_of(&cfg);
    let mut h = Hookline::start(dir.path(), &cfg, &[sub(1, &receiver.url(), &["k"])]);
    h.wait_ready(Duration::from_secs(30)).await;
    const N: usize = 3000;
    let records: Vec<Record> = (0..N)
        .map(|i| Record::json((i % 2) as i32, plain_event(i, "k", None)))
        .collect();
    broker.produce(&topic, &records).await;
    receiver
        .wait_for("a third of the events", Duration::from_secs(60), |l| {
            l.len() >= N / 3
        })
        .await;
    h.kill9();
    let before = receiver.acked_ids().len();
    h.restart();
    h.wait_ready(Duration::from_secs(60)).await;
    receiver
        .wait_acked(&ids(0..N), Duration::from_secs(120))
        .await;
    // A delivery's receipt is produced after the receiver answered: read until every event has one
    // (duplicates from the redelivery after the kill make the record count alone no measure).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (got, receipted) = loop {
        let got = receipts(broker, &prefix, N, Duration::from_secs(60)).await;
        let receipted: HashSet<String> = got
            .iter()
            .filter(|(v, _)| v["outcome"] == "delivered")
            .map(|(v, _)| v["event_id"].as_str().unwrap().to_string())
            .collect();
        if receipted.len() >= N || Instant::now() > deadline {
            break (got, receipted);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let acked: HashSet<String> = receiver.acked_ids().into_iter().collect();
    let missing: Vec<&String> = acked.difference(&receipted).collect();
    println!(
        "{before} acknowledged before the kill; {} receipts for {} events ({} duplicates); {} deliveries",
        got.len(),
        receipted.len(),
        got.len() - receipted.len(),
        receiver.count()
    );
    assert!(before < N, "the kill came before the end");
    assert!(
        missing.is_empty(),
        "acknowledged without a receipt: {:?}",
        &missing[..missing.len().min(5)]
    );
    assert_eq!(receipted.len(), N);
    h.sigterm();
    h.wait_exit(Duration::from_secs(20));
}

/// Must show 3 (first part): a record's `traceparent` and `tracestate` reach the receiver on every
/// attempt (the retry too); a malformed `traceparent` is not forwarded, nor its `tracestate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_reaches_the_receiver_on_every_attempt() {
    let broker = Broker::shared();
    let topic = broker.topic("trace", 1);
    let dir = tempfile::tempdir().unwrap();
    let flaky = Receiver::start(fail_first(1, 503)).await;
    let cfg = base_config(broker, &[topic.as_str()], "trace1");
    let mut h = Hookline::start(dir.path(), &cfg, &[sub(1, &flaky.url(), &["t"])]);
    h.wait_ready(Duration::from_secs(30)).await;
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut good = Record::json(0, plain_event(0, "t", None));
    good.headers = vec![
        ("traceparent".into(), TP.into()),
        ("tracestate".into(), "rojo=00f067aa0ba902b7".into()),
    ];
    let mut bad = Record::json(0, plain_event(1, "t", None));
    bad.headers = vec![
        ("traceparent".into(), "00-nothex-00f067aa0ba902b7-01".into()),
        ("tracestate".into(), "rojo=1".into()),
    ];
    let plain = Record::json(0, plain_event(2, "t", None));
    broker.produce(&topic, &[good, bad, plain]).await;
    flaky.wait_acked(&ids(0..3), Duration::from_secs(30)).await;
    let reqs = flaky.received();
    let of = |id: &str| {
        reqs.iter()
            .filter(|r| r.webhook_id == id)
            .collect::<Vec<_>>()
    };
    let first = of("evt-00000");
    assert_eq!(first.len(), 2, "attempt 1 failed, attempt 2 from the tier");
    for r in first {
        assert_eq!(r.headers.get("traceparent").map(String::as_str), Some(TP));
        assert_eq!(
            r.headers.get("tracestate").map(String::as_str),
            Some("rojo=00f067aa0ba902b7")
        );
    }
    for id in ["evt-00001", "evt-00002"] {
        for r in of(id) {
            assert!(!r.headers.contains_key("traceparent"), "{id}");
            assert!(!r.headers.contains_key("tracestate"), "{id}");
        }
    }
    h.sigterm();
    h.wait_exit(Duration::from_secs(20));
}

/// The test collector (tests/support/otlp_collector.py: the official opentelemetry-proto decoder in a
/// separate process) on `port`, writing one JSON line per span to `out`.
fn collector(port: u16, out: &std::path::Path) -> std::process::Child {
    let child = Command::new(verifier_python())
        .arg(repo_root().join("tests/support/otlp_collector.py"))
        .arg(port.to_string())
        .arg(out)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the collector did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn spans(out: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Must show 3 (second part): with `[tracing] otlp_endpoint`, each attempt of a record with a sampled
/// `traceparent` is one span at the collector — same trace, the record's span as parent, attributes for
/// subscription, attempt, status and result — and the receiver's `traceparent` names that span; records
/// without one (or not sampled) make no span. With the collector down, deliveries go on and the
/// dropped spans are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_spans_reach_an_otlp_collector_and_a_down_collector_costs_nothing() {
    let broker = Broker::shared();
    let topic = broker.topic("otlp", 1);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let out = dir.path().join("spans.jsonl");
    let mut col = collector(port, &out);
    let flaky = Receiver::start(fail_first(1, 503)).await;
    let cfg = base_config(broker, &[topic.as_str()], "otlp1")
        + NO_BREAKER
        + &format!(
            "[tracing]\notlp_endpoint = \"http://127.0.0.1:{port}\"\nservice_name = \"hookline-test\"\n"
        );
    let mut h = Hookline::start(dir.path(), &cfg, &[sub(1, &flaky.url(), &["t"])]);
    h.wait_ready(Duration::from_secs(30)).await;
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    let traced = |i: usize, flags: &str| {
        let mut r = Record::json(0, plain_event(i, "t", None));
        r.headers = vec![
            ("traceparent".into(), format!("00-{TRACE}-{PARENT}-{flags}")),
            ("tracestate".into(), "rojo=1".into()),
        ];
        r
    };
    broker
        .produce(
            &topic,
            &[
                traced(0, "01"),
                traced(1, "00"),
                Record::json(0, plain_event(2, "t", None)),
            ],
        )
        .await;
    flaky.wait_acked(&ids(0..3), Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while spans(&out).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "{} spans exported",
            spans(&out).len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = spans(&out);
    assert_eq!(
        got.len(),
        2,
        "one span per attempt of the sampled record only: {got:?}"
    );
    let requests: Vec<Received> = flaky
        .received()
        .into_iter()
        .filter(|r| r.webhook_id == "evt-00000")
        .collect();
    assert_eq!(requests.len(), 2);
    for (n, s) in got.iter().enumerate() {
        assert_eq!(s["trace_id"], TRACE);
        assert_eq!(s["parent_span_id"], PARENT, "a child of the record's span");
        assert_eq!(s["trace_state"], "rojo=1");
        assert_eq!(s["kind"], 3, "SPAN_KIND_CLIENT");
        assert_eq!(s["service"], "hookline-test");
        assert_eq!(s["attributes"]["hookline.subscription"], sub_id(1));
        let attempt = s["attributes"]["hookline.attempt"].as_i64().unwrap();
        assert_eq!(attempt, n as i64 + 1, "{got:?}");
        let (status, result, code) = if attempt == 1 {
            (503, "failed", 2)
        } else {
            (200, "delivered", 1)
        };
        assert_eq!(s["attributes"]["http.response.status_code"], status);
        assert_eq!(s["attributes"]["hookline.result"], result);
        assert_eq!(s["status"], code);
        assert!(s["end"].as_u64() >= s["start"].as_u64());
        // The request of this attempt named this span as its parent.
        let span_id = s["span_id"].as_str().unwrap();
        assert!(
            requests
                .iter()
                .any(|r| r.headers["traceparent"] == format!("00-{TRACE}-{span_id}-01")),
            "no request carried span {span_id}"
        );
    }
    // The unsampled record's traceparent went on unchanged, without a span.
    let unsampled = flaky
        .received()
        .into_iter()
        .find(|r| r.webhook_id == "evt-00001")
        .unwrap();
    assert_eq!(
        unsampled.headers["traceparent"],
        format!("00-{TRACE}-{PARENT}-00")
    );

    // The collector goes down: deliveries go on, spans are dropped and counted.
    col.kill().unwrap();
    col.wait().unwrap();
    let records: Vec<Record> = (3..23).map(|i| traced(i, "01")).collect();
    broker.produce(&topic, &records).await;
    flaky.wait_acked(&ids(3..23), Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dropped = h.metric("hookline_trace_spans_dropped_total").await;
        if dropped >= 40.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{dropped} spans counted as dropped"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(h.metric("hookline_trace_spans_exported_total").await, 2.0);
    assert_eq!(spans(&out).len(), 2);
    h.sigterm();
    h.wait_exit(Duration::from_secs(20));
}

/// Spans still queued at shutdown are exported before hookline exits on SIGTERM, not lost: here the
/// exporter would wait 60 s for a batch to fill (`tracing.batch_delay`), far beyond the shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_queued_at_shutdown_are_exported_before_exit() {
    let broker = Broker::shared();
    let topic = broker.topic("otlp-stop", 1);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let out = dir.path().join("spans.jsonl");
    let mut col = collector(port, &out);
    let rx = Receiver::ok().await;
    let cfg = base_config(broker, &[topic.as_str()], "otlp-stop")
        + &format!(
            "[tracing]\notlp_endpoint = \"http://127.0.0.1:{port}\"\nbatch_delay = \"60s\"\n"
        );
    let mut h = Hookline::start(dir.path(), &cfg, &[sub(1, &rx.url(), &["t"])]);
    h.wait_ready(Duration::from_secs(30)).await;
    let records: Vec<Record> = (0..5)
        .map(|i| {
            let mut r = Record::json(0, plain_event(i, "t", None));
            r.headers = vec![(
                "traceparent".into(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            )];
            r
        })
        .collect();
    broker.produce(&topic, &records).await;
    rx.wait_acked(&ids(0..5), Duration::from_secs(30)).await;
    // At once: the exporter is still waiting for its batch to fill.
    h.sigterm();
    let (status, took) = h.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        h.log()
    );
    assert_eq!(
        spans(&out).len(),
        5,
        "spans lost at shutdown; exit took {took:?}"
    );
    let _ = col.kill();
    let _ = col.wait();
}
