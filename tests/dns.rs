//! DNS for deliveries (issue 18, defect 1 and must show 6) against a real DNS server on loopback
//! (tests/common/dns.rs): answers are cached for their TTL, concurrent lookups of one name are one
//! query, a name that is never answered fails within `delivery.dns_timeout` without holding anything
//! else back, and — through the whole pipeline — one black-holed endpoint name costs the other nine
//! endpoints less than 10 % of their throughput while every partition's commit keeps moving.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::dns::{Answer, DnsServer};
use common::phases::{CommitDelaySampler, offer_phase};
use common::*;

const LOCAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_cached_for_their_ttl_and_concurrent_lookups_share_one_query() {
    let dns = DnsServer::start().await;
    dns.set(
        "slow.test",
        Answer::Delayed(vec![LOCAL], 1, Duration::from_millis(300)),
    );
    let r = std::sync::Arc::new(dns.resolver(Duration::from_secs(2)));
    let lookups: Vec<_> = (0..500)
        .map(|_| {
            let r = r.clone();
            tokio::spawn(async move { r.lookup("slow.test").await })
        })
        .collect();
    for l in lookups {
        assert_eq!(&*l.await.unwrap().unwrap(), &[std::net::IpAddr::V4(LOCAL)]);
    }
    // One A and one AAAA query for all 500.
    assert_eq!(dns.queries_for("slow.test"), 2, "coalesced");
    assert_eq!(r.inflight(), 0);
    // Within the TTL: from the cache.
    r.lookup("slow.test").await.unwrap();
    assert_eq!(dns.queries_for("slow.test"), 2, "cached");
    // After the 1 s TTL: asked again.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    r.lookup("slow.test").await.unwrap();
    assert!(dns.queries_for("slow.test") > 2, "the TTL was honoured");
    // A name that does not exist is an error naming it, not a hang.
    let e = r.lookup("nope.test").await.unwrap_err();
    assert!(!e.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_name_fails_in_time_and_holds_back_no_other_name() {
    let dns = DnsServer::start().await;
    dns.set("hole.test", Answer::BlackHole);
    dns.set("ok.test", Answer::A(vec![LOCAL], 60));
    let r = std::sync::Arc::new(dns.resolver(Duration::from_millis(500)));
    let started = Instant::now();
    let holes: Vec<_> = (0..200)
        .map(|_| {
            let r = r.clone();
            tokio::spawn(async move { r.lookup("hole.test").await })
        })
        .collect();
    // Meanwhile another name answers at once, 50 times over.
    for _ in 0..50 {
        let t = Instant::now();
        r.lookup("ok.test").await.unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
    }
    for h in holes {
        assert!(h.await.unwrap().is_err());
    }
    let took = started.elapsed();
    println!("200 lookups of a black-holed name failed together after {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // One A and one AAAA query (each possibly retransmitted once by the resolver) for all 200; 200
    // separate lookups would have been at least 400.
    assert!(
        dns.queries_for("hole.test") <= 8,
        "{}",
        dns.queries_for("hole.test")
    );
    assert_eq!(r.inflight(), 0);
}

/// Must show 6, by the head-of-line method (tests/head_of_line.rs): ten endpoints by name, all
/// resolved by the test's DNS server with a 1 s TTL and connections renewed every second, so names
/// are looked up again and again during each phase. In the second phase the tenth name is never
/// answered: its deliveries fail after `dns_timeout` and go to the tiers, and the nine keep ≥ 90 % of
/// the throughput they had in the first phase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_endpoint_name_does_not_slow_the_other_nine() {
    let broker = Broker::shared();
    let topic = broker.topic("dns", 4);
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start().await;
    let mut rxs = Vec::new();
    let mut subs = Vec::new();
    for i in 0..10 {
        let r = Receiver::ok().await;
        let name = format!("ep{i}.test");
        dns.set(&name, Answer::A(vec![LOCAL], 1));
        subs.push(sub(
            i + 1,
            &format!("http://{name}:{}/hook", r.addr.port()),
            &["*"],
        ));
        rxs.push(r);
    }
    let cfg = base_config(broker, &[topic.as_str()], "dns1").replace(
        "[delivery]\n",
        &format!(
            "[delivery]\ndns_servers = [\"{}\"]\ndns_timeout = \"1s\"\npool_max_lifetime = \"1s\"\n",
            dns.addr
        ),
    );
    let mut h = Hookline::start(dir.path(), &cfg, &subs);
    h.wait_ready(Duration::from_secs(30)).await;

    const RATE: usize = 200;
    const SECS: usize = 5;
    const N: usize = RATE * SECS;
    let healthy = offer_phase(broker, &topic, 4, 0, RATE, SECS, &rxs[..9]).await;
    let asked_before = dns.queries_for("ep0.test");
    dns.set("ep9.test", Answer::BlackHole);
    // Let the tenth name's cached answer (1 s TTL) and connections (1 s lifetime) expire.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sampler = CommitDelaySampler::start(h.admin);
    let blocked = offer_phase(broker, &topic, 4, N, RATE, SECS, &rxs[..9]).await;
    let max_commit_delay = sampler.stop().await;
    let tput = |d: Duration| (9 * N) as f64 / d.as_secs_f64();
    let ratio = tput(blocked) / tput(healthy);
    let dns_errors = h
        .metric(r#"hookline_delivery_attempts_total{result="connect"}"#)
        .await;
    println!(
        "nine endpoints, {N} events each at {RATE}/s: all names answered {healthy:?} ({:.0} deliveries/s), \
         tenth name black-holed {blocked:?} ({:.0} deliveries/s); ratio {ratio:.3}; failed attempts \
         of the tenth: {dns_errors}; longest commit hold {max_commit_delay:.1} s; queries for a healthy \
         name: {asked_before} in the first phase, {} in all",
        tput(healthy),
        tput(blocked),
        dns.queries_for("ep0.test")
    );
    assert!(
        dns_errors > 0.0,
        "the tenth endpoint's lookups really failed"
    );
    assert!(
        dns.queries_for("ep0.test") > asked_before,
        "healthy names were looked up during the blocked phase too"
    );
    assert!(
        rxs[9].count() < 2 * N,
        "the tenth endpoint got no second phase deliveries"
    );
    assert!(
        max_commit_delay < 30.0,
        "a partition's commit was held {max_commit_delay} s"
    );
    assert!(
        ratio >= 0.9,
        "the nine kept only {:.0} % of their throughput",
        ratio * 100.0
    );
}
