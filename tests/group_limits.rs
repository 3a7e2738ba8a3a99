//! Issue 7, must show 3, in its own test binary (its 1 s windows are measured with the receiver's clock,
//! so no other test may share the process): a subscription limited to 100/s (burst 20) served by two
//! instances that share the source partitions. Each enforces its share (half), so the receiver never sees
//! more than limit + burst in any 1 s window, and still gets at least 80 % of the limit while the backlog
//! lasts.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_rate_limit() {
    let broker = Broker::shared();
    broker.create_topic("events", 4);
    let dir1 = tempfile::tempdir().unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let rx = Receiver::ok().await;
    let mut s = sub(1, &rx.url(), &["*"]);
    s["rate_limit_per_sec"] = serde_json::json!(100);
    s["burst"] = serde_json::json!(20);
    let cfg = base_config(broker, &["events"], "shared-limit");
    let mut h1 = Hookline::start(dir1.path(), &cfg, std::slice::from_ref(&s));
    h1.wait_ready(Duration::from_secs(30)).await;
    let mut h2 = Hookline::start(dir2.path(), &cfg, &[s]);
    h2.wait_ready(Duration::from_secs(30)).await;
    // Both instances hold two of the four partitions: each logs its share of 0.5.
    let t = Instant::now();
    while !(h1.log().contains("share=0.5") && h2.log().contains("share=0.5")) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no 2/2 split:\n{}\n{}",
            h1.log(),
            h2.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = 1500;
    let records: Vec<Record> = (0..n)
        .map(|i| Record::json((i % 4) as i32, plain_event(i, "order.created", None)))
        .collect();
    broker.produce("events", &records).await;
    rx.wait_acked(&ids(0..n), Duration::from_secs(60)).await;
    let mut times: Vec<Instant> = rx.received().iter().map(|r| r.at).collect();
    times.sort();
    let peak = max_per_second(&times);
    let span = *times.last().unwrap() - times[0];
    let rate = (n - 1) as f64 / span.as_secs_f64();
    let deferred = h1
        .metric("hookline_delivery_attempts_total{result=\"rate_limited\"}")
        .await
        + h2.metric("hookline_delivery_attempts_total{result=\"rate_limited\"}")
            .await;
    println!(
        "2 instances, limit 100/s burst 20: {n} delivered in {span:?} = {rate:.1}/s, peak {peak} in a 1 s \
         window, {deferred} deferrals, {} duplicates",
        rx.duplicates()
    );
    let mut per_sec = vec![0usize; span.as_secs() as usize + 1];
    for t in &times {
        per_sec[(*t - times[0]).as_secs() as usize] += 1;
    }
    println!("arrivals per second: {per_sec:?}");
    assert!(
        peak <= 120,
        "peak {peak} in one second exceeds limit + burst"
    );
    assert!(
        rate >= 80.0,
        "only {rate:.1}/s of a 100/s limit while the backlog lasted"
    );
    drop((h1, h2));
}
