//! Issue 7, must show 4: the hostile corpus (`tests/corpus/hostile/` plus generated cases) interleaved with
//! good events. hookline must not crash, must deliver every good event, must dead-letter every bad record
//! as `invalid_event` (pointing at its source offset), and its memory must stay bounded.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;

/// Resident set size (VmRSS) and its peak (VmHWM) of a process, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    (proc_mib(pid, "VmRSS:"), proc_mib(pid, "VmHWM:"))
}

/// One hostile record: name, value, headers.
type Case = (String, Vec<u8>, Vec<(String, String)>);

/// The hostile records.
fn corpus() -> Vec<Case> {
    let dir = repo_root().join("tests/corpus/hostile");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json" || e == "bin"))
        .collect();
    files.sort();
    let mut out: Vec<Case> = files
        .iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(p).unwrap(),
                vec![],
            )
        })
        .collect();
    assert!(out.len() >= 20, "corpus has {} files", out.len());
    // A valid-looking event of 10 MiB, far over source.max_event_bytes (1 MiB); the test broker accepts
    // records up to 32 MiB (scripts/kafka/broker), as a broker that carries such events must.
    let mut big = br#"{"id":"huge","type":"order.created","data":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 10 * 1024 * 1024));
    big.extend_from_slice(br#""}"#);
    out.push(("gen-10MiB".into(), big, vec![]));
    // 100 000 levels of nesting.
    let mut nested = br#"{"id":"deep","type":"order.created","data":"#.to_vec();
    nested.extend(std::iter::repeat_n(b'[', 100_000));
    nested.extend(std::iter::repeat_n(b']', 100_000));
    nested.push(b'}');
    out.push(("gen-nested-100000".into(), nested, vec![]));
    // 300 headers.
    let many: Vec<(String, String)> = (0..300)
        .map(|i| (format!("h{i}"), "v".to_string()))
        .collect();
    out.push((
        "gen-300-headers".into(),
        br#"{"id":"hdr","type":"order.created"}"#.to_vec(),
        many,
    ));
    // A 2 KiB id.
    out.push((
        "gen-2KiB-id".into(),
        format!(r#"{{"id":"{}","type":"order.created"}}"#, "i".repeat(2048)).into_bytes(),
        vec![],
    ));
    // CloudEvents binary mode with missing or bad attributes.
    let ce = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    out.push((
        "gen-ce-binary-no-source".into(),
        b"{}".to_vec(),
        ce(&[
            ("ce_specversion", "1.0"),
            ("ce_id", "b1"),
            ("ce_type", "order.created"),
        ]),
    ));
    out.push((
        "gen-ce-binary-no-type".into(),
        b"{}".to_vec(),
        ce(&[
            ("ce_specversion", "1.0"),
            ("ce_id", "b2"),
            ("ce_source", "/s"),
        ]),
    ));
    out.push((
        "gen-ce-binary-no-id".into(),
        b"{}".to_vec(),
        ce(&[
            ("ce_specversion", "1.0"),
            ("ce_type", "order.created"),
            ("ce_source", "/s"),
        ]),
    ));
    out.push((
        "gen-ce-binary-empty-id".into(),
        b"{}".to_vec(),
        ce(&[
            ("ce_specversion", "1.0"),
            ("ce_id", ""),
            ("ce_type", "order.created"),
            ("ce_source", "/s"),
        ]),
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_corpus_is_dead_lettered_and_good_events_flow() {
    let broker = Broker::shared();
    broker.create_topic("events", 2);
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::ok().await;
    let cfg = base_config(broker, &["events"], "hostile");
    let mut h = Hookline::start(dir.path(), &cfg, &[sub(1, &rx.url(), &["*"])]);
    h.wait_ready(Duration::from_secs(30)).await;
    let cases = corpus();
    // Good, bad, good, bad, … on both partitions; each good event once more with a duplicate id (a
    // duplicate is not bad input: both are delivered, with the same webhook-id).
    let mut records = Vec::new();
    let mut bad: Vec<(i32, String)> = Vec::new();
    let mut n_good = 0;
    for round in 0..2 {
        for (name, value, headers) in &cases {
            let p = (records.len() % 2) as i32;
            records.push(Record::json(p, plain_event(n_good, "order.created", None)));
            n_good += 1;
            let p = (records.len() % 2) as i32;
            let mut r = Record::raw(p, value);
            r.headers = headers.clone();
            records.push(r);
            bad.push((p, format!("{round}:{name}")));
        }
    }
    for i in 0..5 {
        records.push(Record::json(0, plain_event(i, "order.created", None)));
    }
    let pid = h.pid();
    let (_, hwm_before) = rss_mib(pid);
    broker.produce("events", &records).await;
    rx.wait_acked(&ids(0..n_good), Duration::from_secs(60))
        .await;
    let dlq = format!("{}.dlq", prefix_of(&cfg));
    let t = Instant::now();
    let dead = loop {
        let d = broker.read_all(&dlq);
        if d.len() >= bad.len() {
            break d;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let seen: HashSet<String> = d
                .iter()
                .map(|r| r.headers["hookline-origin-offset"].clone())
                .collect();
            let missing: Vec<&String> = bad
                .iter()
                .enumerate()
                .filter(|(i, _)| !seen.contains(&i.to_string()))
                .map(|(_, (_, name))| name)
                .collect();
            panic!(
                "{} of {} bad records dead-lettered; missing {missing:?}; log:\n{}",
                d.len(),
                bad.len(),
                h.log()
                    .lines()
                    .filter(|l| !l.contains("invalid event; dead-lettering"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(dead.len(), bad.len(), "more dead letters than bad records");
    let mut by_reason: HashMap<String, usize> = HashMap::new();
    let mut origins = HashSet::new();
    for d in &dead {
        assert_eq!(
            d.headers["hookline-dlq-reason"], "invalid_event",
            "{:?}",
            d.headers
        );
        *by_reason
            .entry(
                d.headers["hookline-last-error"]
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .to_string(),
            )
            .or_default() += 1;
        origins.insert((
            d.headers["hookline-origin-partition"].clone(),
            d.headers["hookline-origin-offset"].clone(),
        ));
    }
    assert_eq!(
        origins.len(),
        bad.len(),
        "each bad record dead-lettered once"
    );
    let omitted: Vec<_> = dead
        .iter()
        .filter_map(|d| d.headers.get("hookline-value-omitted"))
        .collect();
    assert_eq!(
        omitted.len(),
        2,
        "the oversized record is dead-lettered without its value"
    );
    assert!(
        dead.iter()
            .filter(|d| d.headers.contains_key("hookline-value-omitted"))
            .all(|d| d.value.is_empty())
    );
    // The duplicate-id events were delivered twice, with the same webhook-id.
    let counts = rx
        .received()
        .iter()
        .fold(HashMap::new(), |mut m: HashMap<String, usize>, r| {
            *m.entry(r.webhook_id.clone()).or_default() += 1;
            m
        });
    for i in 0..5 {
        assert_eq!(counts[&format!("evt-{i:05}")], 2, "duplicate id evt-{i:05}");
    }
    // Alive and bounded.
    let ok = http()
        .get(format!("http://{}/healthz", h.admin))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(ok, 200);
    let (rss, hwm) = rss_mib(pid);
    println!(
        "{} bad records ({} cases x 2) dead-lettered as invalid_event, {n_good} good events delivered; \
         invalid by metric: {}; RSS {rss:.0} MiB, peak {hwm:.0} MiB (before {hwm_before:.0})",
        bad.len(),
        cases.len(),
        h.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("hookline_events_invalid_total") && !l.ends_with(" 0"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(hwm < 200.0, "peak RSS {hwm:.0} MiB");
    drop(h);
}
