//! Issue 7, must show 5: without an allow-list, subscriptions pointing at loopback, private, link-local
//! (cloud metadata) and IPv6 loopback addresses — literally or through a DNS answer (`localhost`) —
//! never get a request: listeners on those addresses count zero connections, and every attempt ends in
//! the dead-letter topic as `rejected` with the policy's reason. (The YAML store is used because the API
//! refuses to create such subscriptions in the first place; `tests/admin_api.rs` checks that.)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// Counts TCP connections accepted on `addr`.
async fn listener(addr: &str) -> (u16, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let port = l.local_addr().unwrap().port();
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
        }
    });
    (port, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_destinations_get_no_request_without_an_allow_list() {
    let broker = Broker::shared();
    broker.create_topic("events", 1);
    let (p4, hits4) = listener("127.0.0.1:0").await;
    let (p6, hits6) = listener("[::1]:0").await;
    let targets = [
        (1, format!("http://127.0.0.1:{p4}/hook"), "loopback"),
        (2, format!("http://[::1]:{p6}/hook"), "loopback"),
        (3, format!("http://localhost:{p4}/hook"), "loopback"),
        (4, "http://10.20.30.40:8080/hook".to_string(), "private"),
        (
            5,
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "link-local",
        ),
        (6, "http://192.168.1.10/hook".to_string(), "private"),
        (
            7,
            "http://100.64.0.1/hook".to_string(),
            "shared address space",
        ),
        (
            8,
            format!("http://[::ffff:127.0.0.1]:{p4}/hook"),
            "loopback",
        ),
        // NAT64: judged as the IPv4 address a NAT64 gateway would reach.
        (9, "http://[64:ff9b::a00:5]/hook".to_string(), "private"),
        (10, "http://[2002:a00:5::1]/hook".to_string(), "6to4"),
    ];
    let subs: Vec<_> = targets
        .iter()
        .map(|(i, url, _)| sub(*i, url, &["*"]))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(broker, &["events"], "ssrf").replace(
        "allow_networks = [\"127.0.0.0/8\", \"::1/128\"]",
        "allow_networks = []",
    );
    assert!(cfg.contains("allow_networks = []"));
    let mut h = Hookline::start(dir.path(), &cfg, &subs);
    h.wait_ready(Duration::from_secs(30)).await;
    broker
        .produce(
            "events",
            &[Record::json(0, plain_event(1, "order.created", None))],
        )
        .await;
    let dlq = format!("{}.dlq", prefix_of(&cfg));
    let t = Instant::now();
    let records = loop {
        let r = broker.read_all(&dlq);
        if r.len() >= targets.len() {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} of {} dead letters",
            r.len(),
            targets.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(records.len(), targets.len());
    for (i, url, class) in &targets {
        let id = sub_id(*i);
        let r = records
            .iter()
            .find(|r| r.headers.get("hookline-subscription") == Some(&id))
            .unwrap_or_else(|| panic!("no dead letter for {url}"));
        assert_eq!(r.headers["hookline-dlq-reason"], "rejected", "{url}");
        assert_eq!(r.headers["hookline-last-status"], "refused", "{url}");
        let err = &r.headers["hookline-last-error"];
        assert!(
            err.contains("address policy refused") && err.contains(class),
            "{url}: {err}"
        );
        assert_eq!(
            r.headers["hookline-attempt"], "1",
            "refused at once, not retried: {url}"
        );
    }
    assert_eq!(
        hits4.load(Ordering::SeqCst),
        0,
        "a request reached 127.0.0.1"
    );
    assert_eq!(hits6.load(Ordering::SeqCst), 0, "a request reached [::1]");
    println!(
        "{} private destinations refused, 0 connections to the loopback listeners, e.g. {:?}",
        targets.len(),
        records[0].headers["hookline-last-error"]
    );
    drop(h);
}
