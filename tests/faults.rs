//! Issue 7, must show 1 and 2: a bounded fault campaign under steady load against the real broker. Every
//! event the broker acknowledged must reach the receiver at least once (it answers 200, so nothing
//! should be dead-lettered); the test prints duplicates and how long partitions went without deliveries.
//! 1. Three instances in one group: one is killed with SIGKILL at a random moment and restarted later,
//!    another is stopped gracefully for good.
//! 2. Two instances; the broker is stopped with SIGTERM, then with SIGKILL, and restarted each time;
//!    the instances recover unattended.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const PARTITIONS: i32 = 6;

/// Waits until every acknowledged id was received; reports duplicates and the longest silence per
/// partition after `since`.
async fn settle(
    rx: &Receiver,
    acked: &[String],
    since: Instant,
    timeout: Duration,
) -> (usize, HashMap<char, Duration>) {
    let want: HashSet<String> = acked.iter().cloned().collect();
    rx.wait_acked(&want, timeout).await;
    let got = rx.received();
    let mut times: HashMap<char, Vec<Instant>> = HashMap::new();
    for r in &got {
        let p = r.webhook_id.chars().nth(1).unwrap_or('?');
        times.entry(p).or_default().push(r.at);
    }
    let mut gaps = HashMap::new();
    for (p, mut ts) in times {
        ts.sort();
        let gap = ts
            .windows(2)
            .filter(|w| w[1] >= since)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        gaps.insert(p, gap);
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for r in &got {
        *counts.entry(r.webhook_id.as_str()).or_default() += 1;
    }
    let dups = counts.values().filter(|c| **c > 1).map(|c| c - 1).sum();
    (dups, gaps)
}

/// What every fault test starts with: the topic, a receiver, `n` hookline instances in one group (ready)
/// and the steady load running.
struct Setup {
    rx: Receiver,
    cfg: String,
    hs: Vec<Hookline>,
    load: Load,
    _dirs: Vec<tempfile::TempDir>,
}

/// Each instance has its own static membership id (`source.instance_id`) and the fast-failover session
/// settings of `protocol`.
async fn setup(broker: &Broker, group: &str, n: usize, protocol: &str) -> Setup {
    let topic: &'static str = Box::leak(broker.topic("orders", PARTITIONS).into_boxed_str());
    let rx = Receiver::ok().await;
    let cfg = fast_failover(&base_config(broker, &[topic], group), protocol);
    let subs = [sub(1, &rx.url(), &["order.*"])];
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut hs: Vec<Hookline> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let id = format!("{group}-{i}");
            Hookline::start_with_env(
                d.path(),
                &cfg,
                &subs,
                &[("HOOKLINE_SOURCE__INSTANCE_ID", id.as_str())],
            )
        })
        .collect();
    for h in hs.iter_mut() {
        h.wait_ready(Duration::from_secs(30)).await;
    }
    let load = load(
        broker.bootstrap(),
        topic,
        PARTITIONS,
        Duration::from_millis(50),
    );
    Setup {
        rx,
        cfg,
        hs,
        load,
        _dirs: dirs,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_kill9_restart_and_graceful_stop_lose_nothing_classic() {
    three_instances("classic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_kill9_restart_and_graceful_stop_lose_nothing_consumer() {
    three_instances("consumer").await;
}

async fn three_instances(protocol: &str) {
    let broker = Broker::shared();
    let Setup {
        rx,
        cfg,
        mut hs,
        load,
        _dirs,
    } = setup(broker, &format!("faults-{protocol}"), 3, protocol).await;
    let t0 = Instant::now();

    // SIGKILL instance 1 at a random moment 3-7 s in; restart it 6 s later.
    let kill_at = Duration::from_millis(3000 + fastrand::u64(0..4000));
    tokio::time::sleep(kill_at).await;
    let killed = Instant::now();
    hs[1].kill9();
    let delivered_at_kill = rx.count();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let restarted = Instant::now();
    hs[1].restart();
    hs[1].wait_ready(Duration::from_secs(30)).await;
    let rejoined = restarted.elapsed();
    // Stop instance 2 gracefully (for good) 3 s later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    hs[2].sigterm();
    let (status, took) = hs[2].wait_exit(Duration::from_secs(40));
    assert!(
        status.is_some_and(|s| s.success()),
        "graceful stop failed: {status:?}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let acked = load.finish().await;
    let (dups, gaps) = settle(&rx, &acked, killed, Duration::from_secs(90)).await;
    let worst = gaps.values().max().copied().unwrap_or_default();
    println!(
        "{protocol} protocol, 3 instances, {} events acknowledged over {:?}: 0 lost; SIGKILL at {kill_at:?} \
         ({delivered_at_kill} delivered by then), restarted 6 s later and ready {rejoined:?} after the restart, \
         graceful stop took {took:?}; {dups} duplicates; longest silence per partition after the kill {gaps:?} \
         (worst {worst:?}: the takeover time)",
        acked.len(),
        t0.elapsed()
    );
    let dlq = broker.read_all(&format!("{}.dlq", prefix_of(&cfg)));
    assert!(
        dlq.is_empty(),
        "{} dead letters with an always-200 receiver",
        dlq.len()
    );
    assert!(
        worst < Duration::from_secs(30),
        "a partition went {worst:?} without deliveries"
    );
    drop(hs);
}

/// Must show 2: the broker is stopped under load, first with SIGTERM then with SIGKILL, and started again
/// 2 s later; every instance recovers unattended and nothing is lost (the load producer is idempotent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_under_load_lose_nothing() {
    let broker = Broker::start();
    let Setup {
        rx,
        cfg: _,
        mut hs,
        load,
        _dirs,
    } = setup(&broker, "broker-faults", 2, "classic").await;
    let recoveries = Arc::new(Mutex::new(Vec::new()));
    let first = Instant::now();
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGKILL, "SIGKILL")] {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let before = rx.count();
        let down = Instant::now();
        broker.stop(sig);
        tokio::time::sleep(Duration::from_secs(2)).await;
        broker.start_again();
        // Recovery: deliveries resume, and both instances report ready again, unattended.
        let t = Instant::now();
        let back = down.elapsed();
        while rx.count() <= before + 50 {
            if t.elapsed() > Duration::from_secs(60) {
                let logs: Vec<String> = hs
                    .iter()
                    .map(|h| {
                        h.log()
                            .lines()
                            .rev()
                            .take(12)
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .collect();
                panic!(
                    "no deliveries after the {name} restart ({} since); broker log tail:\n{}\nhookline logs:\n{}",
                    rx.count() - before,
                    {
                        // The broker's first errors and any panic tell more than its last lines.
                        let log = broker.log();
                        let mut firsts: Vec<&str> = log
                            .lines()
                            .filter(|l| l.contains("ERROR") || l.contains("panick"))
                            .take(15)
                            .collect();
                        firsts.extend(log.lines().filter(|l| l.contains("panick")).take(5));
                        firsts.push("…");
                        firsts.extend(log.lines().rev().take(5));
                        firsts.join("\n")
                    },
                    logs.join("\n----\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let resumed = down.elapsed();
        for h in hs.iter_mut() {
            h.wait_ready(Duration::from_secs(60)).await;
        }
        recoveries.lock().unwrap().push(format!(
            "{name}: deliveries resumed {resumed:?} after the stop, {:?} after the broker answered \
             again ({back:?} after the stop: shutdown, 2 s down, start-up)",
            resumed.saturating_sub(back)
        ));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acked = load.finish().await;
    let (dups, gaps) = settle(&rx, &acked, first, Duration::from_secs(90)).await;
    println!(
        "broker restarts under load: {} events acknowledged, 0 lost, {dups} duplicates; {}; longest silence {:?}",
        acked.len(),
        recoveries.lock().unwrap().join("; "),
        gaps.values().max()
    );
    drop(hs);
}
