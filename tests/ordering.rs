//! Ordered delivery per key (`ordering: key`) against a real Apache Kafka broker and real receivers:
//! order per key through random failures, a failing key that parks only itself, `on_dead_letter: hold`
//! with a release through the API.

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{
    Api, Broker, Hookline, Receiver, Record, Reply, base_config, sub, sub_id, yaml_store,
};
use serde_json::json;

const TOKEN: &str = "ordering-test-admin-token-0123456789";

/// Short tiers: a retried head comes back within a fraction of a second.
fn config(broker: &Broker, topic: &str) -> String {
    base_config(broker, &[topic], &format!("g-{}", common::rand_suffix())).replace(
        "tiers = [\"1s\", \"2s\", \"3s\"]",
        "tiers = [\"200ms\", \"400ms\", \"800ms\", \"1s\", \"2s\"]\njitter = 0.0",
    )
}

/// For keys that fail for many seconds: tiers long enough (18.5 s in all) that their heads are not
/// exhausted meanwhile, and a breaker that does not open. (Only a few keys' events fail; with its
/// defaults the endpoint's breaker would open after the parked heads' ten failures in a row and park
/// every key that has an event meanwhile.)
fn long_failures(cfg: &str) -> String {
    let short = "tiers = [\"200ms\", \"400ms\", \"800ms\", \"1s\", \"2s\"]";
    assert!(cfg.contains(short));
    cfg.replace(
        short,
        "tiers = [\"500ms\", \"1s\", \"2s\", \"5s\", \"10s\"]",
    ) + "[delivery.breaker]\nconsecutive_failures = 100000\nfailure_ratio = 1.0\n"
}

fn ordered(id: u32, url: &str) -> serde_json::Value {
    let mut s = sub(id, url, &["order.*"]);
    s["ordering"] = json!("key");
    s
}

/// Event `i` of `keys` keys: id `evt-{i:05}`, key `k{i % keys}`; its rank within its key is `i / keys`.
fn records(n: usize, keys: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            partition: None,
            key: Some(format!("k{}", i % keys)),
            value: serde_json::to_vec(&common::plain_event(i, "order.created", None)).unwrap(),
            headers: vec![],
        })
        .collect()
}

fn index_of(webhook_id: &str) -> usize {
    webhook_id
        .strip_prefix("evt-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected webhook-id {webhook_id}"))
}

/// The receiver's acknowledgements in the order it answered them, as (event index, key, rank).
fn acks(log: &[common::Received], keys: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    log.iter()
        .filter(|r| r.status.is_some_and(|s| (200..300).contains(&s)))
        .map(move |r| {
            let i = index_of(&r.webhook_id);
            (i, i % keys, i / keys)
        })
}

/// Checks the receiver's acknowledgements, in the order it answered them: per key, no event is
/// acknowledged after a later event of its key was (a repeat of the latest one is allowed). Returns the
/// number of repeated acknowledgements.
fn assert_in_order(log: &[common::Received], keys: usize) -> usize {
    let mut latest: HashMap<usize, usize> = HashMap::new();
    let mut repeats = 0;
    for (i, key, rank) in acks(log, keys) {
        match latest.get(&key) {
            Some(&l) if rank < l => panic!(
                "key k{key}: evt-{i:05} (rank {rank}) acknowledged after rank {l} of the same key"
            ),
            Some(&l) if rank == l => repeats += 1,
            _ => {
                latest.insert(key, rank);
            }
        }
    }
    repeats
}

/// A behaviour answering 500 to the first attempt of about `share` of the events (chosen at random,
/// seeded), 200 otherwise.
fn fail_first_attempts(share: f64, seed: u64) -> impl Fn(&common::Received) -> Reply + Send + Sync {
    let rng = Mutex::new(fastrand::Rng::with_seed(seed));
    let seen: Mutex<HashMap<String, usize>> = Mutex::new(HashMap::new());
    move |r| {
        let mut seen = seen.lock().unwrap();
        let n = seen.entry(r.webhook_id.clone()).or_insert(0);
        *n += 1;
        if *n == 1 && rng.lock().unwrap().f64() < share {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    }
}

/// Must show 1: 10 000 events over 1 000 keys on 4 partitions, 20 % of first attempts failing at random:
/// every event delivered, and per key never an event acknowledged after a later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stay_in_order_through_random_failures() {
    let broker = Broker::shared();
    let topic = broker.topic("ordered", 4);
    let rx = Receiver::start(fail_first_attempts(0.2, 7)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut h = Hookline::start(
        dir.path(),
        &config(broker, &topic),
        &[ordered(1, &rx.url())],
    );
    h.wait_ready(Duration::from_secs(60)).await;
    let (n, keys) = (10_000, 1_000);
    let t0 = Instant::now();
    broker.produce(&topic, &records(n, keys)).await;
    rx.wait_acked(&common::ids(0..n), Duration::from_secs(180))
        .await;
    let took = t0.elapsed();
    let log = rx.received();
    let failed_first = log.iter().filter(|r| r.status == Some(500)).count();
    let repeats = assert_in_order(&log, keys);
    let parked = h.metric("hookline_ordered_parked_total").await;
    println!(
        "{n} events over {keys} keys in {took:?}: {failed_first} first attempts failed, {parked} parks, \
         {repeats} repeated acknowledgements, {} requests",
        log.len()
    );
    assert!(failed_first > n / 10, "the receiver failed {failed_first}");
    // A failure of a key's direct event parks the key; a failure of an event already parked is
    // retried in place.
    assert!(
        parked > 0.0 && parked <= failed_first as f64,
        "{parked} parks for {failed_first} failures"
    );
    assert_eq!(
        repeats, 0,
        "no crash, no timeout: no repeated acknowledgement"
    );
    // Everything finished: the parked keys drained and the source partitions' commits caught up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = h.metrics().await;
        let keys_left = common::metric_value(&m, "hookline_parked_keys");
        if keys_left == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{keys_left} keys still parked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Must show 4: `on_dead_letter: hold`: a rejected event keeps its key parked (its later events wait,
/// other keys flow) until released through the API; then the key's later events arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_key_waits_for_its_release() {
    let broker = Broker::shared();
    let topic = broker.topic("held", 2);
    // evt-00020 (key k0, rank 2) is rejected; everything else is accepted.
    let rx = Receiver::start(|r: &common::Received| {
        if r.webhook_id == "evt-00020" {
            Reply::Status(400)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = ordered(1, &rx.url());
    s["on_dead_letter"] = json!("hold");
    let cfg = config(broker, &topic);
    let mut h = Hookline::start_with_store(
        dir.path(),
        &cfg,
        &yaml_store(dir.path(), &[s]),
        Some(TOKEN),
        &[],
    );
    h.wait_ready(Duration::from_secs(60)).await;
    let api = Api::new(&h, TOKEN);
    let (n, keys) = (100, 10);
    broker.produce(&topic, &records(n, keys)).await;
    // Every key but k0 is delivered completely; k0 stops after its rejected rank 2.
    let others: std::collections::HashSet<String> = (0..n)
        .filter(|i| !i.is_multiple_of(keys) || *i < 20)
        .map(|i| format!("evt-{i:05}"))
        .collect();
    rx.wait_acked(&others, Duration::from_secs(60)).await;
    let path = format!("/v1/subscriptions/{}/parked-keys", sub_id(1));
    let deadline = Instant::now() + Duration::from_secs(20);
    let listed = loop {
        let (st, body) = api.call(reqwest::Method::GET, &path, None).await;
        assert_eq!(st, 200, "{body}");
        // Parked first ("waiting" while its hold marker is on its way), then held with its backlog.
        if body["data"][0]["state"] == "held" && body["data"][0]["backlog"] == 7 {
            break body;
        }
        assert!(Instant::now() < deadline, "no held key listed: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let k = &listed["data"][0];
    assert_eq!(
        (k["key"].as_str(), k["state"].as_str()),
        (Some("k0"), Some("held")),
        "{listed}"
    );
    assert_eq!(
        k["backlog"], 7,
        "k0's ranks 3..9 wait behind the hold: {listed}"
    );
    // Held, not just slow: nothing of k0 after rank 2 arrives while it is held.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later_k0 = |log: &[common::Received]| {
        log.iter()
            .filter(|r| {
                let i = index_of(&r.webhook_id);
                i.is_multiple_of(keys) && i > 20
            })
            .count()
    };
    assert_eq!(later_k0(&rx.received()), 0, "k0 delivered past its hold");
    let dlq = broker.read_all(&format!("{}.dlq", common::prefix_of(&cfg)));
    assert_eq!(dlq.len(), 1, "the rejected event is dead-lettered");
    assert_eq!(dlq[0].headers["hookline-dlq-reason"], "rejected");
    // Bad requests name the field.
    let (st, body) = api
        .call(
            reqwest::Method::POST,
            &format!("{path}/release"),
            Some(json!({})),
        )
        .await;
    assert_eq!((st, body["field"].as_str()), (400, Some("key")), "{body}");
    let (st, body) = api
        .call(
            reqwest::Method::POST,
            &format!("{path}/release"),
            Some(json!({"key": "k0"})),
        )
        .await;
    assert_eq!(st, 202, "{body}");
    let mut all = common::ids(0..n);
    all.remove("evt-00020");
    rx.wait_acked(&all, Duration::from_secs(30)).await;
    let log = rx.received();
    assert_in_order(&log, keys);
    let (st, body) = api.call(reqwest::Method::GET, &path, None).await;
    assert_eq!(st, 200);
    assert_eq!(body["data"], json!([]), "released and drained: {body}");
    assert_eq!(h.metric("hookline_parked_keys").await, 0.0);
}

/// Checks that the *first* acknowledgement of each event comes in its key's order (rank 0, 1, 2, …
/// with no gap); repeats of earlier events (redelivery after a crash) are allowed and counted.
fn assert_first_acks_in_order(log: &[common::Received], keys: usize) -> usize {
    let mut next: HashMap<usize, usize> = HashMap::new();
    let mut repeats = 0;
    for (i, key, rank) in acks(log, keys) {
        let n = next.entry(key).or_insert(0);
        if rank < *n {
            repeats += 1;
        } else {
            assert_eq!(
                rank, *n,
                "key k{key}: evt-{i:05} (rank {rank}) first acknowledged before rank {n}"
            );
            *n += 1;
        }
    }
    repeats
}

/// [`Receiver::wait_acked`], printing the tails of the instances' logs (and what is missing) when it
/// times out.
async fn wait_acked_or_dump(
    rx: &Receiver,
    ids: &std::collections::HashSet<String>,
    timeout: Duration,
    instances: &[&Hookline],
) {
    let deadline = Instant::now() + timeout;
    loop {
        let acked: std::collections::HashSet<String> = rx.acked_ids().into_iter().collect();
        let mut missing: Vec<&String> = ids.difference(&acked).collect();
        if missing.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            missing.sort();
            for h in instances {
                println!(
                    "--- {} ---\n{}",
                    h.log_path.display(),
                    common::tail(&h.log_path, 80)
                );
            }
            panic!(
                "{} of {} not acknowledged after {timeout:?}, e.g. {:?}",
                missing.len(),
                ids.len(),
                &missing[..missing.len().min(10)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_metric_at_least(h: &Hookline, series: &str, min: f64, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = common::metric_value(&h.metrics().await, series);
        if v >= min {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {v} (< {min})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Must show 3: keys parked at a kill -9 are parked again after the restart (from Kafka), keys parked
/// when a second instance joins are handed over with their partitions; order per key holds and
/// nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_keys_survive_kill_9_and_a_rebalance() {
    let broker = Broker::shared();
    let topic = broker.topic("ordcrash", 4);
    let keys = 100;
    // Keys k0..k9 fail while `failing` is set (long enough to park them through every step below).
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = failing.clone();
    let rx = Receiver::start(move |r: &common::Received| {
        if index_of(&r.webhook_id) % keys < 10 && f.load(std::sync::atomic::Ordering::Relaxed) {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let cfg = long_failures(&common::fast_failover(&config(broker, &topic), "consumer"));
    let subs = [ordered(1, &rx.url())];
    let good = |range: std::ops::Range<usize>| -> std::collections::HashSet<String> {
        range
            .filter(|i| i % keys >= 10)
            .map(|i| format!("evt-{i:05}"))
            .collect()
    };
    let batch = |range: std::ops::Range<usize>| -> Vec<Record> {
        records(range.end, keys).split_off(range.start)
    };
    let dir_a = tempfile::tempdir().unwrap();
    let start = |dir: &std::path::Path| {
        Hookline::start_with_store(dir, &cfg, &yaml_store(dir, &subs), Some(TOKEN), &[])
    };
    let mut a = start(dir_a.path());
    a.wait_ready(Duration::from_secs(60)).await;
    broker.produce(&topic, &batch(0..2000)).await;
    rx.wait_acked(&good(0..2000), Duration::from_secs(60)).await;
    let parked =
        wait_metric_at_least(&a, "hookline_parked_keys", 10.0, Duration::from_secs(20)).await;
    println!("before the kill: {parked} keys parked");

    // kill -9 while ten keys are parked; more events meanwhile; the restarted instance finds the
    // parked keys in Kafka before it delivers anything of theirs.
    a.kill9();
    broker.produce(&topic, &batch(2000..4000)).await;
    a.restart();
    a.wait_ready(Duration::from_secs(60)).await;
    rx.wait_acked(&good(0..4000), Duration::from_secs(60)).await;
    let parked =
        wait_metric_at_least(&a, "hookline_parked_keys", 10.0, Duration::from_secs(30)).await;
    println!("after the restart: {parked} keys parked");

    // A second instance joins: partitions (and their parked keys) move to it while parked.
    let dir_b = tempfile::tempdir().unwrap();
    let mut b = start(dir_b.path());
    b.wait_ready(Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::source_partitions_assigned(&b.log()) == 0 {
        assert!(
            Instant::now() < deadline,
            "the second instance got no partition"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.produce(&topic, &batch(4000..6000)).await;
    wait_acked_or_dump(&rx, &good(0..6000), Duration::from_secs(60), &[&a, &b]).await;
    let on_b = wait_metric_at_least(&b, "hookline_parked_keys", 1.0, Duration::from_secs(30)).await;
    let on_a = common::metric_value(&a.metrics().await, "hookline_parked_keys");
    println!("after the rebalance: {on_a} keys parked on the first instance, {on_b} on the second");
    assert_eq!(
        on_a + on_b,
        10.0,
        "every failing key parked once, on its partition's owner"
    );
    // Either instance lists the whole group's parked keys: its own from memory, the other's as
    // published on the parked-keys topic.
    let path = format!("/v1/subscriptions/{}/parked-keys", sub_id(1));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, body) = Api::new(&a, TOKEN)
            .call(reqwest::Method::GET, &path, None)
            .await;
        assert_eq!(st, 200, "{body}");
        let data = body["data"].as_array().cloned().unwrap_or_default();
        let mine = data
            .iter()
            .filter(|k| k["owner"] == "this instance")
            .count();
        let mut listed: Vec<&str> = data.iter().filter_map(|k| k["key"].as_str()).collect();
        listed.sort_unstable();
        listed.dedup();
        if data.len() == 10 && listed.len() == 10 && mine == on_a as usize && body["group"] == true
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "group listing incomplete: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = rx
        .received()
        .iter()
        .filter(|r| index_of(&r.webhook_id) % keys < 10 && r.status == Some(200))
        .count();
    assert_eq!(
        before, 0,
        "nothing of a failing key was acknowledged while it failed"
    );

    // The endpoint recovers: every parked key drains in order.
    failing.store(false, std::sync::atomic::Ordering::Relaxed);
    wait_acked_or_dump(
        &rx,
        &common::ids(0..6000),
        Duration::from_secs(90),
        &[&a, &b],
    )
    .await;
    let log = rx.received();
    let repeats = assert_first_acks_in_order(&log, keys);
    println!(
        "6000 events delivered in order per key; {repeats} repeated acknowledgements, {} requests",
        log.len()
    );
    let dlq = broker.read_all(&format!("{}.dlq", common::prefix_of(&cfg)));
    assert!(
        dlq.is_empty(),
        "nothing exhausted: {} dead letters",
        dlq.len()
    );
}

/// Offers events `first..first + rate * secs` (keys as [`records`]) at `rate` per second in tenths of
/// a second; returns when it has offered them all.
async fn offer(broker: &Broker, topic: &str, first: usize, rate: usize, secs: usize, keys: usize) {
    let start = Instant::now();
    for tick in 0..secs * 10 {
        let from = first + tick * rate / 10;
        let batch: Vec<Record> = (from..from + rate / 10)
            .map(|i| Record {
                partition: None,
                key: Some(format!("k{}", i % keys)),
                value: serde_json::to_vec(&common::plain_event(i, "order.created", None)).unwrap(),
                headers: vec![],
            })
            .collect();
        broker.produce(topic, &batch).await;
        tokio::time::sleep_until((start + Duration::from_millis(100 * (tick as u64 + 1))).into())
            .await;
    }
}

/// Must show 2 and 5, under the same steady load in each phase (1 000 events/s over 1 000 keys for
/// 10 s): one key failing for the whole phase costs the 999 others under 10 % of their throughput
/// in a phase without failure, the source partitions' commits keep moving meanwhile, and an
/// unordered subscription on the same topic delivers as fast as when it was alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_key_costs_the_other_keys_nothing() {
    let broker = Broker::shared();
    let topic = broker.topic("ordload", 4);
    let (keys, rate, secs) = (1000, 1000, 10);
    let n = rate * secs;
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = failing.clone();
    let rx_o = Receiver::start(move |r: &common::Received| {
        if index_of(&r.webhook_id).is_multiple_of(keys)
            && f.load(std::sync::atomic::Ordering::Relaxed)
        {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let rx_u = Receiver::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let unordered = sub(2, &rx_u.url(), &["order.*"]);
    let cfg = long_failures(&config(broker, &topic));
    let mut h = Hookline::start(dir.path(), &cfg, std::slice::from_ref(&unordered));
    h.wait_ready(Duration::from_secs(60)).await;
    let phase = |first: usize| (first..first + n).map(|i| format!("evt-{i:05}"));
    let others = |first: usize| -> std::collections::HashSet<String> {
        phase(first)
            .filter(|id| !index_of(id).is_multiple_of(keys))
            .collect()
    };

    // Phase 1: the unordered subscription alone.
    let t = Instant::now();
    offer(broker, &topic, 0, rate, secs, keys).await;
    rx_u.wait_acked(&phase(0).collect(), Duration::from_secs(60))
        .await;
    let alone = t.elapsed();

    // Phase 2: an ordered subscription beside it, nothing failing.
    yaml_store(dir.path(), &[unordered.clone(), ordered(1, &rx_o.url())]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.metric("hookline_subscriptions_cached").await < 2.0 {
        assert!(
            Instant::now() < deadline,
            "the ordered subscription was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = Instant::now();
    offer(broker, &topic, n, rate, secs, keys).await;
    rx_u.wait_acked(&phase(n).collect(), Duration::from_secs(60))
        .await;
    let beside = t.elapsed();
    rx_o.wait_acked(&phase(n).collect(), Duration::from_secs(60))
        .await;
    let ordered_healthy = t.elapsed();

    // Phase 3: key k0 fails for the whole phase.
    failing.store(true, std::sync::atomic::Ordering::Relaxed);
    let sampler = common::phases::CommitDelaySampler::start(h.admin);
    let t = Instant::now();
    offer(broker, &topic, 2 * n, rate, secs, keys).await;
    rx_u.wait_acked(&phase(2 * n).collect(), Duration::from_secs(60))
        .await;
    let beside_failing = t.elapsed();
    wait_acked_or_dump(&rx_o, &others(2 * n), Duration::from_secs(60), &[&h]).await;
    let ordered_failing = t.elapsed();
    let max_commit_delay = sampler.stop().await;
    let k0_during = rx_o
        .received()
        .iter()
        .filter(|r| {
            let i = index_of(&r.webhook_id);
            i >= 2 * n && i.is_multiple_of(keys) && r.status == Some(200)
        })
        .count();
    let parked_keys = h.metric("hookline_parked_keys").await;
    failing.store(false, std::sync::atomic::Ordering::Relaxed);
    wait_acked_or_dump(
        &rx_o,
        &common::ids(n..3 * n),
        Duration::from_secs(60),
        &[&h],
    )
    .await;
    assert_in_order(&rx_o.received(), keys);

    let ratio = |base: Duration, d: Duration| base.as_secs_f64() / d.as_secs_f64();
    let (others_ratio, unordered_ratio, unordered_failing_ratio) = (
        ratio(ordered_healthy, ordered_failing),
        ratio(alone, beside),
        ratio(alone, beside_failing),
    );
    println!(
        "{n} events per phase at {rate}/s over {keys} keys: unordered alone {alone:?}, beside the ordered \
         subscription {beside:?} (ratio {unordered_ratio:.3}), beside it with k0 failing {beside_failing:?} \
         (ratio {unordered_failing_ratio:.3}); ordered, all healthy {ordered_healthy:?}, 999 keys while \
         k0 failed {ordered_failing:?} (throughput ratio {others_ratio:.3}); longest source commit hold \
         meanwhile {max_commit_delay:.2} s; parked keys at the end of the phase {parked_keys}"
    );
    assert_eq!(k0_during, 0, "k0 failed throughout the phase");
    assert_eq!(parked_keys, 1.0, "only k0 parked");
    assert!(
        others_ratio >= 0.9,
        "the other keys lost throughput: {others_ratio:.3}"
    );
    assert!(
        unordered_ratio >= 0.9,
        "the unordered subscription lost throughput: {unordered_ratio:.3}"
    );
    assert!(
        unordered_failing_ratio >= 0.9,
        "the unordered subscription lost throughput while k0 failed: {unordered_failing_ratio:.3}"
    );
    assert!(
        max_commit_delay < 3.0,
        "a parked key held a source partition's commit for {max_commit_delay:.2} s"
    );
}

/// A replay of an ordered subscription's dead letters delivers a key's replayed events in their
/// order, one at a time, even when some of them fail again on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_keeps_the_order_of_a_keys_dead_letters() {
    let broker = Broker::shared();
    let topic = broker.topic("ordreplay", 2);
    let keys = 5;
    // At first every event of k0 is rejected (dead-lettered, the key continues).
    let rx = Receiver::start(move |r: &common::Received| {
        if index_of(&r.webhook_id).is_multiple_of(keys) {
            Reply::Status(400)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(broker, &topic);
    let mut h = Hookline::start_with_store(
        dir.path(),
        &cfg,
        &yaml_store(dir.path(), &[ordered(1, &rx.url())]),
        Some(TOKEN),
        &[],
    );
    h.wait_ready(Duration::from_secs(60)).await;
    let n = 50;
    broker.produce(&topic, &records(n, keys)).await;
    let others: std::collections::HashSet<String> = (0..n)
        .filter(|i| !i.is_multiple_of(keys))
        .map(|i| format!("evt-{i:05}"))
        .collect();
    rx.wait_acked(&others, Duration::from_secs(60)).await;
    let dlq = format!("{}.dlq", common::prefix_of(&cfg));
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.read_all(&dlq).len() < n / keys {
        assert!(
            Instant::now() < deadline,
            "k0's events were not all dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        broker.read_all(&dlq).iter().all(|r| r
            .headers
            .get("hookline-ordering-key")
            .map(String::as_str)
            == Some("k0")),
        "dead letters of an ordered subscription carry their ordering key"
    );
    // Now half of the first attempts of the replayed events fail: without the order kept, the ones
    // that fail would arrive after later ones.
    rx.set_behaviour(fail_first_attempts(0.5, 11));
    let api = Api::new(&h, TOKEN);
    let (st, started) = api
        .call(
            reqwest::Method::POST,
            "/v1/dead-letters/replay",
            Some(json!({"to": "retry.200ms"})),
        )
        .await;
    assert_eq!(st, 202, "{started}");
    let k0: std::collections::HashSet<String> = (0..n)
        .step_by(keys)
        .map(|i| format!("evt-{i:05}"))
        .collect();
    wait_acked_or_dump(&rx, &k0, Duration::from_secs(60), &[&h]).await;
    let log = rx.received();
    let replayed_failures = log.iter().filter(|r| r.status == Some(500)).count();
    assert!(replayed_failures > 0, "some replayed events failed again");
    assert_eq!(assert_in_order(&log, keys), 0);
    println!(
        "{} replayed events of k0 delivered in order; {replayed_failures} failed once on the way",
        k0.len()
    );
}

/// A parked head waiting longer than `source.max_commit_delay` for its next attempt goes back to the
/// parked topic with its attempts and due time: after a kill -9 it is not attempted more often than
/// its schedule allows, and its key's later events still wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_waiting_head_keeps_its_attempts_across_a_kill_9() {
    let broker = Broker::shared();
    let topic = broker.topic("ordrequeue", 1);
    // evt-00000 (key k0) fails its first three attempts; everything else is accepted.
    let rx = Receiver::start(common::fail_first(3, 503)).await;
    rx.set_behaviour({
        let inner = common::fail_first(3, 503);
        move |r: &common::Received| {
            if r.webhook_id == "evt-00000" {
                inner(r)
            } else {
                Reply::Status(200)
            }
        }
    });
    let cfg = config(broker, &topic)
        .replace(
            "tiers = [\"200ms\", \"400ms\", \"800ms\", \"1s\", \"2s\"]",
            "tiers = [\"1500ms\", \"2s\", \"3s\"]",
        )
        .replace("[source]\n", "[source]\nmax_commit_delay = \"1s\"\n");
    let cfg = common::fast_failover(&cfg, "consumer");
    let dir = tempfile::tempdir().unwrap();
    let mut h = Hookline::start(dir.path(), &cfg, &[ordered(1, &rx.url())]);
    h.wait_ready(Duration::from_secs(60)).await;
    // k0: evt-00000 and evt-00002; k1: evt-00001.
    broker.produce(&topic, &records(3, 2)).await;
    rx.wait_acked(
        &common::id_set(["evt-00001".to_string()]),
        Duration::from_secs(30),
    )
    .await;
    // The third attempt failed: the head went back to the parked topic with attempt 3.
    let parked_topic = format!("{}.parked.{topic}", common::prefix_of(&cfg));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let copies: Vec<String> = broker
            .read_all(&parked_topic)
            .into_iter()
            .filter(|r| r.headers.get("hookline-origin-offset").map(String::as_str) == Some("0"))
            .filter_map(|r| r.headers.get("hookline-attempt").cloned())
            .collect();
        if copies.contains(&"3".to_string()) {
            assert_eq!(copies, ["1", "2", "3"], "one append per long wait");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no requeue with attempt 3: {copies:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.kill9();
    h.restart();
    h.wait_ready(Duration::from_secs(60)).await;
    let k0 = common::id_set(["evt-00000".to_string(), "evt-00002".to_string()]);
    wait_acked_or_dump(&rx, &k0, Duration::from_secs(30), &[&h]).await;
    let log = rx.received();
    let attempts = log.iter().filter(|r| r.webhook_id == "evt-00000").count();
    assert_eq!(attempts, 4, "1 + 3 tiers, the restart included");
    assert_eq!(assert_in_order(&log, 2), 0);
}
