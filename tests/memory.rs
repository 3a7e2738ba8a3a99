//! Issue 7, must show 7 (own test binary: it holds 10 000 connections): memory stays bounded.
//! 1. 10 000 deliveries in flight at once (10 subscriptions x 1 000, receivers that take 5 s to answer).
//! 2. Then a dead endpoint (connection refused) receiving a flood of events for 60 s while its retries
//!    cycle through the tiers into the dead-letter topic.
//!
//! RSS is sampled throughout; it must stay under 200 MiB, and must not grow during the flood.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn rss_mib(pid: u32) -> f64 {
    proc_mib(pid, "VmRSS:")
}

/// Measured on 2026-11-25 (debug build, as CI runs it): 38 MiB at start, 86 MiB with 10 000 in flight,
/// 75–91 MiB through the flood. With reqwest/hyper it was ~450 MiB (~40 KiB per in-flight request); see
/// `src/deliver/http.rs` for why hookline has its own HTTP/1.1 client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_bounded_with_10k_in_flight_and_flat_under_a_dead_endpoint_flood() {
    // The receivers in this process hold 10 000 connections too.
    hookline::deliver::http::raise_fd_limit();
    let broker = Broker::shared();
    broker.create_topic("events", 4);
    let slow = Receiver::start(|_| Reply::Delayed(200, Duration::from_secs(5))).await;
    let dead_port = free_port(); // nothing listens: connection refused
    let mut subs = Vec::new();
    for i in 0..10u32 {
        let mut s = sub(i + 1, &slow.url(), &[&format!("slow.t{i}")]);
        s["max_in_flight"] = serde_json::json!(1000);
        subs.push(s);
    }
    subs.push(sub(
        99,
        &format!("http://127.0.0.1:{dead_port}/hook"),
        &["dead.*"],
    ));
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(broker, &["events"], "memory");
    let mut h = Hookline::start(dir.path(), &cfg, &subs);
    h.wait_ready(Duration::from_secs(30)).await;
    let pid = h.pid();
    let mut samples = vec![("start".to_string(), rss_mib(pid))];

    // 1. 10 000 in flight.
    let records: Vec<Record> = (0..10_000)
        .map(|i| {
            Record::json(
                (i % 4) as i32,
                plain_event(i, &format!("slow.t{}", i % 10), None),
            )
        })
        .collect();
    broker.produce("events", &records).await;
    let t = Instant::now();
    let mut peak_in_flight = 0.0f64;
    while t.elapsed() < Duration::from_secs(5) {
        peak_in_flight = peak_in_flight.max(h.metric("hookline_in_flight_deliveries").await);
        if peak_in_flight >= 10_000.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    samples.push((format!("{peak_in_flight} in flight"), rss_mib(pid)));
    assert!(
        peak_in_flight >= 9_000.0,
        "only {peak_in_flight} deliveries in flight at once"
    );
    slow.wait_acked(&ids(0..10_000), Duration::from_secs(60))
        .await;
    samples.push(("10k delivered".into(), rss_mib(pid)));

    // 2. A dead endpoint flooded for 60 s.
    let flood_start = Instant::now();
    let mut n = 100_000;
    let mut flood_samples = Vec::new();
    while flood_start.elapsed() < Duration::from_secs(60) {
        let batch: Vec<Record> = (n..n + 100)
            .map(|i| Record::json((i % 4) as i32, plain_event(i, "dead.letter", None)))
            .collect();
        broker.produce("events", &batch).await;
        n += 100;
        tokio::time::sleep(Duration::from_millis(250)).await;
        if flood_samples.len() < (flood_start.elapsed().as_secs() / 5) as usize {
            flood_samples.push(rss_mib(pid));
        }
    }
    let produced = n - 100_000;
    samples.push(("flood end".into(), rss_mib(pid)));
    let dlq = h
        .metric("hookline_dlq_published_total{reason=\"exhausted\"}")
        .await;
    println!(
        "RSS samples (MiB): {samples:?}; during the 60 s flood of {produced} events to a dead endpoint, every 5 s: \
         {flood_samples:?}; {dlq} dead-lettered as exhausted by then"
    );
    let max = samples
        .iter()
        .map(|(_, m)| *m)
        .chain(flood_samples.iter().copied())
        .fold(0.0, f64::max);
    assert!(max < 200.0, "RSS reached {max:.0} MiB");
    // Flat: the second half of the flood is no higher than the first half's peak plus 10 %.
    let half = flood_samples.len() / 2;
    let first = flood_samples[..half].iter().copied().fold(0.0, f64::max);
    let second = flood_samples[half..].iter().copied().fold(0.0, f64::max);
    assert!(
        second <= first * 1.10 + 5.0,
        "RSS grew during the flood: {first:.0} → {second:.0} MiB"
    );
    drop(h);
}
