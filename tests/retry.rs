//! Failure handling (issue 3) against a real tansu broker and real misbehaving receivers: retry tiers of
//! 1–3 s, the dead-letter topic, rate limits, circuit breakers and no head-of-line blocking.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;

/// Requests for one webhook-id, in arrival order.
fn requests_for(r: &Receiver, id: &str) -> Vec<Received> {
    let mut v: Vec<Received> = r
        .received()
        .into_iter()
        .filter(|x| x.webhook_id == id)
        .collect();
    v.sort_by_key(|x| x.at);
    v
}

fn events(range: std::ops::Range<usize>, ty: &str) -> Vec<Record> {
    range
        .map(|i| Record::json(0, plain_event(i, ty, None)))
        .collect()
}

/// Records of `topic` whose value is the event `id`.
fn records_of(broker: &Broker, topic: &str, id: &str) -> Vec<ReadRecord> {
    broker
        .read_all(topic)
        .into_iter()
        .filter(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.value)
                .map(|v| v["id"] == id)
                .unwrap_or(false)
        })
        .collect()
}

/// `hookline-due-ms` granularity: due times are whole milliseconds, so a hop may come up to 1 ms before
/// the exact delay measured with the receiver's monotonic clock; allow 2 ms.
const MS_SLACK: Duration = Duration::from_millis(2);

/// Must show 1: fails three times, then succeeds on attempt 4 through tiers 1..3; each hop no earlier
/// than its delay; `hookline-attempt` is right on each tier; the source commit is not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_three_times_then_delivered_through_each_tier() {
    let broker = Broker::shared();
    let topic = broker.topic("events", 1);
    let dir = tempfile::tempdir().unwrap();
    let flaky = Receiver::start(fail_first(3, 503)).await;
    let other = Receiver::ok().await;
    let cfg = base_config(broker, &[topic.as_str()], "r1");
    let prefix = prefix_of(&cfg);
    let subs = vec![
        sub(1, &flaky.url(), &["order.created"]),
        sub(2, &other.url(), &["user.signup"]),
    ];
    let mut h = Hookline::start(dir.path(), &cfg, &subs);
    h.wait_ready(Duration::from_secs(30)).await;

    let original = plain_event(0, "order.created", None);
    broker
        .produce(topic.as_str(), &[Record::json(0, original.clone())])
        .await;
    flaky
        .wait_for("the first attempt", Duration::from_secs(20), |l| {
            !l.is_empty()
        })
        .await;
    // Later records of the same partition flow and are committed while the event waits in the tiers.
    broker
        .produce(topic.as_str(), &events(1..50, "user.signup"))
        .await;
    other.wait_acked(&ids(1..50), Duration::from_secs(20)).await;
    broker
        .wait_committed("r1", topic.as_str(), Duration::from_secs(10))
        .await;
    assert!(
        flaky.count() < 4,
        "the source partition was committed to its end before attempt 4 ({} attempts so far)",
        flaky.count()
    );

    flaky.wait_acked(&ids(0..1), Duration::from_secs(30)).await;
    let reqs = requests_for(&flaky, "evt-00000");
    let statuses: Vec<Option<u16>> = reqs.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        vec![Some(503), Some(503), Some(503), Some(200)],
        "attempt 4 succeeds"
    );
    for (i, delay) in [1u64, 2, 3].iter().enumerate() {
        let gap = reqs[i + 1].at - reqs[i].at;
        println!("hop {} took {gap:?} (tier delay {delay} s)", i + 1);
        assert!(
            gap + MS_SLACK >= Duration::from_secs(*delay),
            "hop {} came after {gap:?}, before its {delay} s delay",
            i + 1
        );
    }
    for (i, tier) in ["1s", "2s", "3s"].iter().enumerate() {
        let recs = records_of(broker, &format!("{prefix}.retry.{tier}"), "evt-00000");
        assert_eq!(recs.len(), 1, "one record in tier {tier}");
        let hd = &recs[0].headers;
        assert_eq!(hd["hookline-attempt"], (i + 1).to_string(), "tier {tier}");
        assert_eq!(hd["hookline-subscription"], sub_id(1));
        assert_eq!(recs[0].key.as_deref(), Some(sub_id(1).as_str()));
        assert_eq!(hd["hookline-origin-topic"], topic.as_str());
        assert_eq!(hd["hookline-origin-offset"], "0");
        assert_eq!(hd["hookline-last-status"], "503");
        // The source record's append time travels along (end-to-end latency of retried deliveries).
        let appended: u64 = hd["hookline-origin-timestamp-ms"].parse().unwrap();
        let now = now_ms();
        assert!(appended <= now && now - appended < 120_000, "{appended}");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&recs[0].value).unwrap(),
            original
        );
    }
    assert_eq!(
        other.count(),
        49,
        "a retry targets only its own subscription"
    );
    assert!(broker.read_all(&format!("{prefix}.dlq")).is_empty());
    assert_eq!(
        h.metric("hookline_delivery_attempts_total{result=\"5xx\"}")
            .await,
        3.0
    );
    assert_eq!(
        h.metric("hookline_deliveries_total{outcome=\"retried\"}")
            .await,
        3.0
    );
}

/// Must show 2: an endpoint that always answers 500 gets 1 + tiers attempts, then the event lands in
/// the dead-letter topic as `exhausted` with every header of DESIGN §5, original bytes and headers kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_failing_ends_in_the_dead_letter_topic_as_exhausted() {
    let broker = Broker::shared();
    let topic = broker.topic("events", 2);
    let dir = tempfile::tempdir().unwrap();
    let down = Receiver::start(|_| Reply::Status(500)).await;
    let cfg = base_config(broker, &[topic.as_str()], "r2");
    let prefix = prefix_of(&cfg);
    let mut h = Hookline::start(dir.path(), &cfg, &[sub(1, &down.url(), &["*"])]);
    h.wait_ready(Duration::from_secs(30)).await;
    let before_ms = now_ms();
    let mut rec = Record::json(1, plain_event(7, "order.created", None));
    rec.headers
        .push(("traceparent".into(), "00-abc-def-01".into()));
    rec.key = Some("order-7".into());
    let value = rec.value.clone();
    broker.produce(topic.as_str(), &[rec]).await;

    let dlq_topic = format!("{prefix}.dlq");
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let d = broker.read_all(&dlq_topic);
        if !d.is_empty() {
            break d;
        }
        assert!(Instant::now() < deadline, "nothing dead-lettered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead.len(), 1);
    assert_eq!(down.count(), 4, "1 attempt from the source + 3 tiers");
    let d = &dead[0];
    assert_eq!(d.value, value, "original bytes");
    assert_eq!(d.key.as_deref(), Some(sub_id(1).as_str()));
    let hd = &d.headers;
    assert_eq!(hd["traceparent"], "00-abc-def-01", "original headers kept");
    assert_eq!(hd["hookline-dlq-reason"], "exhausted");
    assert_eq!(hd["hookline-subscription"], sub_id(1));
    assert_eq!(hd["hookline-attempt"], "4");
    assert_eq!(hd["hookline-origin-topic"], topic.as_str());
    assert_eq!(hd["hookline-origin-partition"], "1");
    assert_eq!(hd["hookline-origin-offset"], "0");
    assert_eq!(hd["hookline-last-status"], "500");
    assert_eq!(hd["hookline-last-error"], "HTTP 500");
    let first: u64 = hd["hookline-first-failure-ms"].parse().unwrap();
    let due: u64 = hd["hookline-due-ms"].parse().unwrap();
    assert!(
        first >= before_ms && due >= first + 6000,
        "first failure {first} at the first attempt; dead-lettered {due} after 1+2+3 s of tiers"
    );
    for header in [
        "hookline-subscription",
        "hookline-attempt",
        "hookline-due-ms",
        "hookline-origin-topic",
        "hookline-origin-partition",
        "hookline-origin-offset",
        "hookline-first-failure-ms",
        "hookline-last-status",
        "hookline-last-error",
        "hookline-dlq-reason",
        "hookline-origin-timestamp-ms",
    ] {
        assert!(hd.contains_key(header), "{header} missing");
    }
    assert_eq!(
        hd.keys().filter(|k| k.starts_with("hookline-")).count(),
        11,
        "no duplicated or stray hookline headers after three hops: {hd:?}"
    );
    broker
        .wait_committed("r2", topic.as_str(), Duration::from_secs(10))
        .await;
    assert_eq!(
        h.metric("hookline_dlq_published_total{reason=\"exhausted\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric("hookline_delivery_attempts_total{result=\"5xx\"}")
            .await,
        4.0
    );
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Must show 3: 400 → `rejected` after one attempt; 410 → `gone`; 429 with `Retry-After: 2` → the next
/// attempt at least 2 s later (the 2 s tier, skipping the 1 s one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_gone_and_retry_after() {
    let broker = Broker::shared();
    let topic = broker.topic("events", 1);
    let dir = tempfile::tempdir().unwrap();
    let bad = Receiver::start(|_| Reply::Status(400)).await;
    let gone = Receiver::start(|_| Reply::Status(410)).await;
    let busy = Receiver::start({
        let first = fail_first(1, 0);
        move |r| match first(r) {
            Reply::Status(0) => Reply::RetryAfter(429, 2),
            other => other,
        }
    })
    .await;
    let cfg = base_config(broker, &[topic.as_str()], "r3");
    let prefix = prefix_of(&cfg);
    let subs = vec![
        sub(1, &bad.url(), &["*"]),
        sub(2, &gone.url(), &["*"]),
        sub(3, &busy.url(), &["*"]),
    ];
    let mut h = Hookline::start(dir.path(), &cfg, &subs);
    h.wait_ready(Duration::from_secs(30)).await;
    broker
        .produce(topic.as_str(), &events(0..5, "order.created"))
        .await;
    busy.wait_acked(&ids(0..5), Duration::from_secs(30)).await;
    broker
        .wait_committed("r3", topic.as_str(), Duration::from_secs(10))
        .await;

    for i in 0..5 {
        let id = format!("evt-{i:05}");
        let reqs = requests_for(&busy, &id);
        assert_eq!(reqs.len(), 2, "{id}: 429 then 200");
        let gap = reqs[1].at - reqs[0].at;
        assert!(
            gap + MS_SLACK >= Duration::from_secs(2),
            "{id}: Retry-After: 2 honoured, next attempt after {gap:?}"
        );
    }
    let dlq = broker.read_all(&format!("{prefix}.dlq"));
    let reasons = |sub: u32| -> Vec<(String, String)> {
        dlq.iter()
            .filter(|r| r.key.as_deref() == Some(sub_id(sub).as_str()))
            .map(|r| {
                (
                    r.headers["hookline-dlq-reason"].clone(),
                    r.headers["hookline-attempt"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(reasons(1), vec![("rejected".into(), "1".into()); 5]);
    assert_eq!(reasons(2), vec![("gone".into(), "1".into()); 5]);
    assert_eq!(dlq.len(), 10, "nothing of the 429 subscription");
    assert_eq!((bad.count(), gone.count()), (5, 5), "one attempt each");
    let tier2 = broker.read_all(&format!("{prefix}.retry.2s"));
    assert_eq!(tier2.len(), 5, "Retry-After: 2 picked the 2 s tier");
    assert!(broker.read_all(&format!("{prefix}.retry.1s")).is_empty());
    assert_eq!(
        h.metric("hookline_dlq_published_total{reason=\"rejected\"}")
            .await,
        5.0
    );
    assert_eq!(
        h.metric("hookline_dlq_published_total{reason=\"gone\"}")
            .await,
        5.0
    );
}

/// Clusters of requests separated by at least `gap`.
fn clusters(times: &[Instant], gap: Duration) -> Vec<Vec<Instant>> {
    let mut out: Vec<Vec<Instant>> = Vec::new();
    for &t in times {
        match out.last_mut() {
            Some(c) if t - *c.last().unwrap() < gap => c.push(t),
            _ => out.push(vec![t]),
        }
    }
    out
}

/// Must show 5: endpoint down → after the threshold no request reaches it while open; half-open lets
/// exactly K probes through; it closes after recovery; every event of the outage is delivered later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_probes_and_closes() {
    let broker = Broker::shared();
    let topic = broker.topic("events", 1);
    let dir = tempfile::tempdir().unwrap();
    // Down: every request fails after 200 ms, long enough for both probes to be in flight together.
    let rx = Receiver::start(|_| Reply::Delayed(503, Duration::from_millis(200))).await;
    let mut s = sub(1, &rx.url(), &["*"]);
    s["max_in_flight"] = serde_json::json!(4);
    // A fixed concurrency, so that the K probes can be out together: with adaptive concurrency the
    // outage shrinks the endpoint's limit to one, and a failing first probe reopens the breaker before
    // a second is sent (README, circuit breaker).
    s["adaptive_concurrency"] = serde_json::json!(false);
    let cfg = base_config(broker, &[topic.as_str()], "r5").replace(
        r#"tiers = ["1s", "2s", "3s"]"#,
        r#"tiers = ["1s", "2s", "4s", "8s", "16s"]"#,
    ) + "[delivery.breaker]\nconsecutive_failures = 3\nmin_requests = 1000\ncool_down = \"2s\"\nhalf_open_probes = 2\n";
    let mut h = Hookline::start(dir.path(), &cfg, &[s]);
    h.wait_ready(Duration::from_secs(30)).await;

    // A steady 20 events/s: 6 s of outage, then 2 s after recovery.
    let outage = Duration::from_secs(6);
    let start = Instant::now();
    let mut saw_open = false;
    let mut n = 0;
    let mut recovered_at = None;
    while start.elapsed() < outage + Duration::from_secs(2) {
        broker
            .produce(topic.as_str(), &events(n..n + 1, "order.created"))
            .await;
        n += 1;
        if n % 10 == 0 && h.metric("hookline_endpoints{state=\"open\"}").await == 1.0 {
            saw_open = true;
        }
        if recovered_at.is_none() && start.elapsed() >= outage {
            rx.set_behaviour(|_| Reply::Status(200));
            recovered_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered_at = recovered_at.unwrap();
    rx.wait_acked(&ids(0..n), Duration::from_secs(60)).await;

    let failed: Vec<Instant> = {
        let mut v: Vec<Instant> = rx
            .received()
            .iter()
            .filter(|r| r.status == Some(503))
            .map(|r| r.at)
            .collect();
        v.sort();
        v
    };
    let cl = clusters(&failed, Duration::from_secs(1));
    let sizes: Vec<usize> = cl.iter().map(Vec::len).collect();
    println!(
        "{n} events; failed requests during the outage in clusters {sizes:?} (threshold 3, max_in_flight 4, K = 2)"
    );
    assert!(
        (3..=6).contains(&sizes[0]),
        "trips after 3 consecutive failures (plus at most 3 already in flight): {sizes:?}"
    );
    assert!(
        cl.len() >= 2,
        "at least one half-open period during the outage"
    );
    for c in &cl[1..] {
        assert_eq!(
            c.len(),
            2,
            "exactly K = 2 probes per half-open period: {sizes:?}"
        );
    }
    for w in cl.windows(2) {
        let gap = w[1][0] - *w[0].last().unwrap();
        assert!(
            gap >= Duration::from_millis(1800),
            "no request while open (cool-down 2 s): a gap of only {gap:?}"
        );
    }
    assert!(saw_open, "hookline_endpoints{{state=\"open\"}} showed it");
    // Closed again after recovery: the breaker lets the backlog through.
    let after: usize = rx
        .received()
        .iter()
        .filter(|r| r.at >= recovered_at && r.status == Some(200))
        .count();
    assert!(after >= n / 2, "deliveries resumed after recovery");
    assert_eq!(h.metric("hookline_endpoints{state=\"closed\"}").await, 1.0);
    assert!(
        h.metric("hookline_delivery_attempts_total{result=\"circuit_open\"}")
            .await
            > 0.0
    );
    assert!(
        broker
            .read_all(&format!("{}.dlq", prefix_of(&cfg)))
            .is_empty(),
        "nothing exhausted"
    );
}

/// Must show 7: a tier consumer holding not-yet-due records is restarted: nothing lost, nothing early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_a_holding_tier_consumer_loses_nothing_and_is_never_early() {
    let broker = Broker::shared();
    let topic = broker.topic("events", 2);
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(fail_first(1, 503)).await;
    let cfg = base_config(broker, &[topic.as_str()], "r7")
        .replace(r#"tiers = ["1s", "2s", "3s"]"#, r#"tiers = ["5s", "10s"]"#)
        // All 20 first attempts fail: keep the breaker from turning some of them into circuit_open.
        + "[delivery.breaker]\nconsecutive_failures = 1000000\nmin_requests = 1000000\n";
    let mut h = Hookline::start(dir.path(), &cfg, &[sub(1, &rx.url(), &["*"])]);
    h.wait_ready(Duration::from_secs(30)).await;
    let records: Vec<Record> = (0..20)
        .map(|i| Record::json((i % 2) as i32, plain_event(i, "order.created", None)))
        .collect();
    broker.produce(topic.as_str(), &records).await;
    rx.wait_for("20 first attempts", Duration::from_secs(20), |l| {
        l.len() >= 20
    })
    .await;
    // The records now sit in the 5 s tier, held. Restart hookline (graceful: it leaves the groups).
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.sigterm();
    let (status, _) = h.wait_exit(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert_eq!(rx.count(), 20, "nothing was delivered early");
    h.restart();
    h.wait_ready(Duration::from_secs(30)).await;
    rx.wait_acked(&ids(0..20), Duration::from_secs(30)).await;
    for i in 0..20 {
        let id = format!("evt-{i:05}");
        let reqs = requests_for(&rx, &id);
        assert_eq!(reqs.len(), 2, "{id}: one failure, one success");
        let gap = reqs[1].at - reqs[0].at;
        assert!(
            gap + MS_SLACK >= Duration::from_secs(5),
            "{id} retried after {gap:?}, before its 5 s tier delay"
        );
    }
    // The second instance did the deliveries (the held records survived the restart in Kafka).
    assert_eq!(
        h.metric("hookline_delivery_attempts_total{result=\"2xx\"}")
            .await,
        20.0
    );
}

/// Must show 8: kill -9 while retries are being published: no event lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_while_publishing_retries_loses_nothing() {
    let broker = Broker::shared();
    let topic = broker.topic("events", 2);
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(fail_first(1, 503)).await;
    // Every first attempt fails: keep the breaker out of the way (it is tested on its own above).
    let cfg = base_config(broker, &[topic.as_str()], "r8")
        + "[delivery.breaker]\nconsecutive_failures = 1000000\nmin_requests = 1000000\n";
    // Static membership, as the README recommends where restarts must be fast: the restarted process
    // takes the killed one's partitions back at once (without, it waits ~45 s for the old session).
    let mut h = Hookline::start_with_env(
        dir.path(),
        &cfg,
        &[sub(1, &rx.url(), &["*"])],
        &[("HOOKLINE_SOURCE__INSTANCE_ID", "r8-0")],
    );
    h.wait_ready(Duration::from_secs(30)).await;
    const N: usize = 2000;
    let records: Vec<Record> = (0..N)
        .map(|i| Record::json((i % 2) as i32, plain_event(i, "order.created", None)))
        .collect();
    broker.produce(topic.as_str(), &records).await;
    rx.wait_for("failures being handed off", Duration::from_secs(20), |l| {
        l.len() >= 300
    })
    .await;
    h.kill9();
    let at_kill = rx.count();
    h.restart();
    h.wait_ready(Duration::from_secs(30)).await;
    rx.wait_acked(&ids(0..N), Duration::from_secs(90)).await;
    let distinct: HashSet<String> = rx.acked_ids().into_iter().collect();
    println!(
        "killed after {at_kill} requests; {} requests in all for {N} events, {} distinct acknowledged",
        rx.count(),
        distinct.len()
    );
    assert_eq!(distinct.len(), N);
}
