//! Issue 3, must show 6, in its own test binary so that no other test shares the process while the two
//! phases are timed.

mod common;

use std::time::Duration;

use common::phases::{CommitDelaySampler, offer_phase};
use common::*;

/// Must show 6: 10 subscriptions, one never answers (timeout 2 s). The other nine keep at least 90 % of
/// the throughput they had when all ten were healthy, measured in the same run: each phase offers the
/// same steady load (200 events/s for 5 s, every event for all ten) and the throughput of the nine is
/// the phase's events over the time until the nine had all of them. A hung endpoint that held back
/// the source partitions (2 s timeouts of 64 requests at a time) would stretch that time by seconds.
/// The load is below saturation on purpose: the tests run debug builds with the broker, hookline and
/// ten receivers on two cores; saturated throughput is the benchmark's job (scripts/bench).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hung_endpoint_does_not_slow_the_other_nine() {
    let broker = Broker::shared();
    broker.create_topic("events", 4);
    let dir = tempfile::tempdir().unwrap();
    let mut rxs = Vec::new();
    for _ in 0..10 {
        rxs.push(Receiver::ok().await);
    }
    let subs: Vec<serde_json::Value> = rxs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut s = sub(i as u32 + 1, &r.url(), &["*"]);
            s["timeout_ms"] = serde_json::json!(2000);
            s
        })
        .collect();
    // 1 s tiers (base_config: 1 s, 2 s, 3 s): the hung endpoint's events are handed to the first tier
    // and come back, time out again and move on *during* the measurement, so the retry traffic
    // (produce, fetch, hold, re-deliver) is part of what the nine must not feel.
    let cfg = base_config(broker, &["events"], "r6");
    assert!(cfg.contains(r#"tiers = ["1s", "2s", "3s"]"#));
    let mut h = Hookline::start(dir.path(), &cfg, &subs);
    h.wait_ready(Duration::from_secs(30)).await;

    const RATE: usize = 200;
    const SECS: usize = 5;
    const N: usize = RATE * SECS;
    let tier = format!(
        "hookline_events_consumed_total{{topic=\"{}.retry.1s\"}}",
        prefix_of(&cfg)
    );
    let healthy = offer_phase(broker, "events", 4, 0, RATE, SECS, &rxs[..9]).await;
    rxs[9].set_behaviour(|_| Reply::Hang);
    // Meanwhile: the longest any partition's commit is held (hookline_commit_delay_seconds), sampled.
    let sampler = CommitDelaySampler::start(h.admin);
    let hung = offer_phase(broker, "events", 4, N, RATE, SECS, &rxs[..9]).await;
    let max_commit_delay = sampler.stop().await;
    // Retry traffic inside the measured phase: records came back from the 1 s tier before it ended.
    let retried = h.metric(&tier).await;
    let tput = |d: Duration| (9 * N) as f64 / d.as_secs_f64();
    let ratio = tput(hung) / tput(healthy);
    println!(
        "nine healthy endpoints, {N} events each offered at {RATE}/s: all ten healthy {healthy:?} ({:.0} deliveries/s), \
         one hung {hung:?} ({:.0} deliveries/s); throughput ratio {ratio:.3}; hung endpoint: {} timeouts, {} circuit_open, {} deferred",
        tput(healthy),
        tput(hung),
        h.metric("hookline_delivery_attempts_total{result=\"timeout\"}")
            .await,
        h.metric("hookline_delivery_attempts_total{result=\"circuit_open\"}")
            .await,
        h.metric("hookline_delivery_attempts_total{result=\"rate_limited\"}")
            .await,
    );
    println!(
        "records re-consumed from the 1 s tier during the hung phase: {retried}; longest commit hold \
         of any partition meanwhile {max_commit_delay:.1} s (deferrals: {:?})",
        (
            h.metric("hookline_deferrals_total{reason=\"partition_bound\"}")
                .await,
            h.metric("hookline_deferrals_total{reason=\"commit_delay\"}")
                .await
        )
    );
    assert!(
        max_commit_delay < 30.0,
        "a partition's commit was held {max_commit_delay} s: commits must keep moving"
    );
    rxs[9].release();
    assert!(
        retried > 0.0,
        "no retry traffic inside the measurement ({tier})"
    );
    assert!(
        h.metric("hookline_delivery_attempts_total{result=\"timeout\"}")
            .await
            > 0.0,
        "the tenth endpoint really hung"
    );
    assert!(
        ratio >= 0.9,
        "the nine kept only {:.0} % of their throughput",
        ratio * 100.0
    );
}
