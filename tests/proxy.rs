//! The egress proxy (issue 18, must show 3): deliveries to an HTTPS receiver go through a CONNECT
//! proxy (tests/common/proxy.rs, upstream from 127.0.0.2) and the receiver sees the proxy's address;
//! plain HTTP goes in absolute form with Basic proxy authentication; the proxy is told the address
//! hookline resolved and checked, never a name; a private destination is still refused with the
//! proxy configured, and nothing for it reaches the proxy; `no_proxy` destinations go direct.

mod common;

use std::time::{Duration, Instant};

use common::proxy::{PROXY_EGRESS, TestProxy};
use common::tls::TestCa;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_go_through_the_proxy_and_private_destinations_stay_refused() {
    let broker = Broker::shared();
    let topic = broker.topic("proxy", 1);
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("hookline test CA");
    let ca_file = ca.write_pem(dir.path());
    // user "hook", password "s3cr:t" → Basic aG9vazpzM2NyOnQ=
    let proxy = TestProxy::start(Some("Basic aG9vazpzM2NyOnQ=")).await;
    let (tls_recv, tls_stats) = Receiver::start_tls(
        ca.server_config(&ca.issue(&["localhost"], None), None),
        |_| Reply::Status(204),
    )
    .await;
    let plain = Receiver::ok().await;
    let direct = Receiver::ok().await;
    let subs = [
        sub(1, &tls_recv.https_url("localhost"), &["a.x"]),
        sub(
            2,
            &format!("http://localhost:{}/hook", plain.addr.port()),
            &["b.x"],
        ),
        // 10.0.0.0/8 is not in allow_networks: refused before anything is sent, proxy or not.
        sub(3, "https://10.0.0.5/hook", &["c.x"]),
        // no_proxy: direct.
        sub(
            4,
            &format!("http://127.0.0.1:{}/hook", direct.addr.port()),
            &["d.x"],
        ),
    ];
    let cfg = base_config(broker, &[topic.as_str()], "px1").replace(
        "[delivery]\n",
        &format!(
            "[delivery]\nproxy = \"http://hook:s3cr%3At@{}\"\nno_proxy = [\"127.0.0.1\"]\n",
            proxy.addr
        ),
    ) + &format!(
        "[delivery.tls]\nextra_ca_file = \"{}\"\n",
        ca_file.display()
    );
    let prefix = prefix_of(&cfg);
    let mut h = Hookline::start(dir.path(), &cfg, &subs);
    h.wait_ready(Duration::from_secs(30)).await;
    let mut records = Vec::new();
    for (i, ty) in ["a.x", "b.x", "c.x", "d.x"].iter().enumerate() {
        for k in 0..5 {
            records.push(Record::json(0, plain_event(i * 10 + k, ty, None)));
        }
    }
    broker.produce(topic.as_str(), &records).await;
    tls_recv
        .wait_acked(&ids(0..5), Duration::from_secs(30))
        .await;
    plain
        .wait_acked(&ids(10..15), Duration::from_secs(30))
        .await;
    direct
        .wait_acked(&ids(30..35), Duration::from_secs(30))
        .await;

    let seen = proxy.requests();
    println!("the proxy was asked: {seen:#?}");
    println!(
        "the HTTPS receiver's peers: {:?}",
        tls_stats.peers.lock().unwrap()
    );
    // HTTPS: a CONNECT to the address hookline resolved (localhost → 127.0.0.1), not the name.
    let port = tls_recv.addr.port();
    assert!(
        seen.iter()
            .any(|l| l == &format!("CONNECT 127.0.0.1:{port} HTTP/1.1")),
        "{seen:?}"
    );
    assert!(
        tls_stats
            .peers
            .lock()
            .unwrap()
            .iter()
            .all(|p| p.ip() == std::net::IpAddr::V4(PROXY_EGRESS))
    );
    // HTTP: absolute form to the checked address, authenticated (the proxy answers 407 otherwise).
    let plain_line = format!("POST http://127.0.0.1:{}/hook HTTP/1.1", plain.addr.port());
    assert_eq!(
        seen.iter().filter(|l| **l == plain_line).count(),
        5,
        "{seen:?}"
    );
    assert_eq!(
        plain.received()[0].headers["host"],
        format!("127.0.0.1:{}", plain.addr.port())
    );
    // Nothing asked for the private destination or the no_proxy one.
    assert!(!seen.iter().any(|l| l.contains("10.0.0.5")), "{seen:?}");
    assert!(
        !seen
            .iter()
            .any(|l| l.contains(&direct.addr.port().to_string())),
        "{seen:?}"
    );
    // The refused subscription's events are dead-lettered as rejected.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dead = broker.read_all(&format!("{prefix}.dlq"));
        if dead.len() == 5 {
            assert!(
                dead.iter()
                    .all(|d| d.headers["hookline-dlq-reason"] == "rejected")
            );
            assert!(
                dead[0].headers["hookline-last-error"].contains("10.0.0.5"),
                "{:?}",
                dead[0].headers
            );
            break;
        }
        assert!(Instant::now() < deadline, "{} dead letters", dead.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!h.log().contains("s3cr"), "proxy password in the log");
}
