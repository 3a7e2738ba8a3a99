//! Issue 14, must show 5: network faults, Jepsen style, between one of two instances and the real broker
//! while load flows. Instance B runs in a network namespace of the test's own (ip netns + veth); nftables
//! rules inside it drop B's traffic to and from the broker's port — all of it (a partition) or 20 % of
//! the packets at random (a lossy link) — for 30 s, then heal. B still reaches the receiver, so what is
//! cut is exactly B ↔ Kafka. Instance A and the load producer are on the host.
//!
//! Every event the broker acknowledged must be delivered (0 lost) and both instances must deliver again
//! unattended; the test prints the time to recover and the duplicates. Session settings are the fault
//! tests' fast-failover ones (classic protocol, `session.timeout.ms` 10 s, static membership), so a 30 s
//! partition expires B's session and moves its partitions to A while it lasts.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;

const PARTITIONS: i32 = 6;
const DELIVERED: &str = "hookline_deliveries_total{outcome=\"delivered\"}";

async fn fault_for_30s(name: &str, percent: u32) {
    let ns = NetNs::new();
    let broker = Broker::start_on(&ns.outer);
    let topic: &'static str = Box::leak(broker.topic("netfault", PARTITIONS).into_boxed_str());
    let rx = Receiver::start_on(&ns.outer, |_| Reply::Status(200)).await;
    let group = format!("net-{}", rand_suffix());
    let cfg = fast_failover(&base_config(&broker, &[topic], &group), "classic").replace(
        r#"allow_networks = ["127.0.0.0/8", "::1/128"]"#,
        r#"allow_networks = ["127.0.0.0/8", "::1/128", "10.0.0.0/8"]"#,
    );
    assert!(cfg.contains("10.0.0.0/8"));
    let subs = [sub(1, &rx.url(), &["order.*"])];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let id_a = format!("{group}-a");
    let mut a = Hookline::start_with_env(
        dir_a.path(),
        &cfg,
        &subs,
        &[("HOOKLINE_SOURCE__INSTANCE_ID", id_a.as_str())],
    );
    let cfg_b = cfg.replacen(
        "[source]\n",
        &format!("[source]\ninstance_id = \"{group}-b\"\n"),
        1,
    );
    let mut b = Hookline::start_in(&ns, dir_b.path(), &cfg_b, &subs);
    a.wait_ready(Duration::from_secs(60)).await;
    b.wait_ready(Duration::from_secs(60)).await;
    let load = load(
        broker.bootstrap(),
        topic,
        PARTITIONS,
        Duration::from_millis(50),
    );
    // Both instances deliver before the fault.
    let t = Instant::now();
    while a.metric(DELIVERED).await < 20.0 || b.metric(DELIVERED).await < 20.0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "both instances should deliver before the fault; A:\n{}\nB:\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let b_before = b.metric(DELIVERED).await;
    let cut = Instant::now();
    ns.degrade(broker.port, percent);
    let mut a_during = a.metric(DELIVERED).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    a_during = a.metric(DELIVERED).await - a_during;
    let b_during = b.metric(DELIVERED).await - b_before;
    ns.heal();
    let healed = Instant::now();

    // Recovery: B delivers again (after the fault's in-flight tail), unattended.
    let b_at_heal = b.metric(DELIVERED).await;
    while b.metric(DELIVERED).await <= b_at_heal {
        assert!(
            healed.elapsed() < Duration::from_secs(90),
            "B delivered nothing within 90 s of the heal; B log:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = healed.elapsed();
    a.wait_ready(Duration::from_secs(60)).await;
    b.wait_ready(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acked: HashSet<String> = load.finish().await.into_iter().collect();
    rx.wait_acked(&acked, Duration::from_secs(120)).await;
    let b_after = b.metric(DELIVERED).await - b_at_heal;
    println!(
        "{name} between instance B and the broker for 30 s under load: {} events acknowledged, 0 lost, \
         {} duplicates; during the fault A delivered {a_during} and B {b_during}; B delivered again \
         {recovered:?} after the heal ({b_after} since), both ready again ({:?} after the fault began)",
        acked.len(),
        rx.duplicates(),
        cut.elapsed()
    );
    assert!(b_after > 0.0, "B does its share again after the heal");
    if percent >= 100 {
        // A took over B's partitions while B was cut off: A delivered what B could not fetch.
        assert!(a_during > 0.0);
    }
    let dlq = broker.read_all(&format!("{}.dlq", prefix_of(&cfg)));
    assert!(dlq.is_empty(), "{} dead letters", dlq.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_for_30s_then_heal() {
    fault_for_30s("a partition", 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_percent_packet_loss_for_30s() {
    fault_for_30s("20 % packet loss", 20).await;
}
