//! Issue 14, must show 3: kill -9 of the only instance under load, then an immediate restart, with default
//! settings: every event is delivered, and the time until deliveries resume is printed for
//! (a) the classic protocol without static membership: the restarted member waits until the killed
//!     member's session times out (librdkafka's default `session.timeout.ms`, 45 s);
//! (b) with `source.instance_id`: the restarted member takes the killed member's place at once (≤ 5 s);
//! (c) with `group_protocol = "consumer"` (KIP-848): the killed member's partitions move when its
//!     broker-side session expires (`group.consumer.session.timeout.ms`: 45 s by default, 6 s on the
//!     test broker, scripts/kafka/broker);
//! (d) both: `consumer` with `source.instance_id`.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;

const PARTITIONS: i32 = 4;

/// Returns the time from the restart until the receiver saw a request again.
async fn crash_and_restart(case: &str, protocol: &str, instance_id: Option<&str>) -> Duration {
    let broker = Broker::shared();
    let topic: &'static str = Box::leak(broker.topic("crash", PARTITIONS).into_boxed_str());
    let rx = Receiver::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let group = format!("crash-{}", rand_suffix());
    let cfg = with_protocol(&base_config(broker, &[topic], &group), protocol);
    let env: Vec<(&str, &str)> = instance_id
        .map(|id| ("HOOKLINE_SOURCE__INSTANCE_ID", id))
        .into_iter()
        .collect();
    let mut h = Hookline::start_with_env(dir.path(), &cfg, &[sub(1, &rx.url(), &["*"])], &env);
    h.wait_ready(Duration::from_secs(60)).await;
    let load = load(
        broker.bootstrap(),
        topic,
        PARTITIONS,
        Duration::from_millis(50),
    );
    rx.wait_for("steady deliveries", Duration::from_secs(30), |l| {
        l.len() >= 100
    })
    .await;
    h.kill9();
    let before = rx.count();
    let restarted = Instant::now();
    h.restart();
    let deadline = restarted + Duration::from_secs(120);
    while rx.count() <= before {
        assert!(
            Instant::now() < deadline,
            "{case}: no delivery within 120 s of the restart; log:\n{}",
            h.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked: HashSet<String> = load.finish().await.into_iter().collect();
    rx.wait_acked(&acked, Duration::from_secs(120)).await;
    println!(
        "kill -9 and restart, {case}: deliveries resumed {resumed:?} after the restart; {} events acknowledged, \
         all delivered, {} duplicates",
        acked.len(),
        rx.duplicates()
    );
    resumed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_without_static_membership() {
    crash_and_restart("(a) classic, no instance_id", "classic", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_classic_with_instance_id_resumes_within_5s() {
    let resumed = crash_and_restart("(b) classic, instance_id", "classic", Some("crash-b-0")).await;
    assert!(
        resumed <= Duration::from_secs(5),
        "static membership: resumed only {resumed:?} after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_consumer_protocol() {
    crash_and_restart("(c) consumer protocol, no instance_id", "consumer", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_consumer_protocol_with_instance_id() {
    crash_and_restart(
        "(d) consumer protocol, instance_id",
        "consumer",
        Some("crash-d-0"),
    )
    .await;
}
