//! The shipped Prometheus files (issue 5): `promtool check`/`test rules` over docker/prometheus, and a real
//! Prometheus on loopback scraping hookline, whose lag alert (a copy with short durations) fires while
//! deliveries are blocked and resolves after recovery. Also checks that every metric the rules and the
//! Grafana dashboard use is one hookline exports.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn prometheus_dir() -> PathBuf {
    repo_root().join("docker/prometheus")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(prometheus_dir())
        .output()
        .expect("promtool (Debian package prometheus; scripts/setup installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

fn rules() -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(prometheus_dir().join("alerts.yml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

fn alert_names(rules: &serde_yaml_ng::Value) -> BTreeSet<String> {
    rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .filter_map(|r| r["alert"].as_str().map(String::from))
        .collect()
}

/// Must show 3: the rules and the config pass promtool's checks, and the unit tests pass and cover every
/// alert with a case where it fires and one where it must not.
#[test]
fn promtool_checks_and_rule_unit_tests_pass() {
    println!("{}", promtool(&["check", "rules", "alerts.yml"]));
    println!("{}", promtool(&["check", "config", "prometheus.yml"]));
    println!("{}", promtool(&["test", "rules", "alerts_test.yml"]));

    let names = alert_names(&rules());
    let tests: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(prometheus_dir().join("alerts_test.yml")).unwrap(),
    )
    .unwrap();
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for t in tests["tests"].as_sequence().unwrap() {
        for case in t["alert_rule_test"].as_sequence().unwrap() {
            let name = case["alertname"].as_str().unwrap().to_string();
            let firing = case["exp_alerts"]
                .as_sequence()
                .is_some_and(|a| !a.is_empty());
            if firing {
                fires.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    assert_eq!(
        fires, names,
        "every alert needs a case where it fires (and no case names an unknown alert)"
    );
    assert_eq!(
        quiet, names,
        "every alert needs a case where it must not fire"
    );
    println!(
        "{} alerts, each with a firing and a quiet case",
        names.len()
    );
}

/// Metric names (hookline's and kafka_exporter's) used in a PromQL text.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    for prefix in ["hookline_", "kafka_consumergroup_"] {
        let mut from = 0;
        while let Some(i) = expr[from..].find(prefix) {
            let start = from + i;
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            // Not the tail of a longer identifier.
            if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_')
            {
                out.insert(expr[start..end].to_string());
            }
            from = end;
        }
    }
    out
}

fn exported(metrics: &str, name: &str) -> bool {
    metrics.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    })
}

struct Prometheus {
    child: Child,
    url: String,
}

impl Prometheus {
    /// Starts Prometheus on loopback with a 1 s scrape and evaluation interval, scraping `target` as job
    /// `hookline`, with `rules` as its only rule file.
    async fn start(dir: &Path, target: &str, rules: &str) -> Prometheus {
        std::fs::write(dir.join("rules.yml"), rules).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\n\
             scrape_configs:\n  - job_name: hookline\n    static_configs:\n      - targets: [\"{target}\"]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package prometheus; scripts/setup installs it)");
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http().get(format!("{}/-/ready", p.url)).send().await
                && r.status() == 200
            {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready; log:\n{}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn get(&self, path: &str) -> serde_json::Value {
        http()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .map(|t| serde_json::from_str(&t).unwrap())
            .unwrap()
    }

    /// State of the alert `name` for `topic` ("pending", "firing"), `None` when not active.
    async fn alert_state(&self, name: &str, topic: &str) -> Option<String> {
        let v = self.get("/api/v1/alerts").await;
        v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["labels"]["alertname"] == name && a["labels"]["topic"] == topic)
            .map(|a| a["state"].as_str().unwrap().to_string())
    }

    async fn wait_alert(&self, name: &str, topic: &str, want: Option<&str>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.alert_state(name, topic).await;
            if state.as_deref() == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} for {topic} is {state:?}, not {want:?}, after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped rules with `HooklineConsumerLagHigh` shortened for a test: 2 s of time lag for 1 s.
fn fast_lag_rules() -> String {
    let mut rules = rules();
    let mut changed = false;
    for g in rules["groups"].as_sequence_mut().unwrap() {
        for r in g["rules"].as_sequence_mut().unwrap() {
            if r["alert"].as_str() == Some("HooklineConsumerLagHigh") {
                let expr = r["expr"].as_str().unwrap().to_string();
                assert!(expr.ends_with("> 300"), "threshold moved: {expr}");
                r["expr"] = format!("{} > 2", expr.trim_end_matches("> 300").trim_end()).into();
                r["for"] = "1s".into();
                changed = true;
            }
        }
    }
    assert!(changed, "HooklineConsumerLagHigh not found in alerts.yml");
    serde_yaml_ng::to_string(&rules).unwrap()
}

/// Must show 4: a real Prometheus scrapes hookline; the lag alert fires while deliveries are blocked and
/// resolves after recovery. The rules and the dashboard only use metrics hookline exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_fires_and_resolves_the_lag_alert() {
    let broker = Broker::shared();
    broker.create_topic("alerted", 1);
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::ok().await;
    let cfg = base_config(broker, &["alerted"], "alert1")
        .replace("[source]\n", "[source]\nlag_interval = \"500ms\"\n");
    let mut s = sub(1, &receiver.url(), &["*"]);
    s["timeout_ms"] = serde_json::json!(120_000);
    let mut h = Hookline::start(dir.path(), &cfg, &[s]);
    h.wait_ready(Duration::from_secs(30)).await;
    broker
        .produce("alerted", &[Record::json(0, plain_event(0, "t", None))])
        .await;
    receiver
        .wait_acked(&ids(0..1), Duration::from_secs(20))
        .await;

    let pdir = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(pdir.path(), &h.admin.to_string(), &fast_lag_rules()).await;
    // Scraped and evaluated a few times without the alert.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = prom
            .get("/api/v1/query?query=up%7Bjob%3D%22hookline%22%7D")
            .await;
        if v["data"]["result"][0]["value"][1] == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "target never up: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        prom.alert_state("HooklineConsumerLagHigh", "alerted").await,
        None,
        "no lag yet"
    );
    let rules_loaded = prom.get("/api/v1/rules").await;
    let loaded = rules_loaded["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        loaded,
        alert_names(&rules()).len(),
        "Prometheus loaded every rule"
    );

    receiver.set_behaviour(|_| Reply::Hang);
    let blocked = Instant::now();
    let events: Vec<Record> = (1..6)
        .map(|i| Record::json(0, plain_event(i, "t", None)))
        .collect();
    broker.produce("alerted", &events).await;
    prom.wait_alert(
        "HooklineConsumerLagHigh",
        "alerted",
        Some("firing"),
        Duration::from_secs(30),
    )
    .await;
    let fired = blocked.elapsed();
    // While firing: Prometheus sees the records lag too.
    let v = prom
        .get("/api/v1/query?query=sum(kafka_consumergroup_lag_sum%7Btopic%3D%22alerted%22%7D)")
        .await;
    assert_eq!(v["data"]["result"][0]["value"][1], "5", "{v}");

    receiver.release();
    let released = Instant::now();
    receiver
        .wait_acked(&ids(1..6), Duration::from_secs(20))
        .await;
    prom.wait_alert(
        "HooklineConsumerLagHigh",
        "alerted",
        None,
        Duration::from_secs(30),
    )
    .await;
    println!(
        "lag alert firing {fired:?} after deliveries were blocked (threshold 2 s, for 1 s, scrape 1 s); \
         resolved {:?} after they were released",
        released.elapsed()
    );

    // Every metric the rules and the dashboard use is exported (lag series exist once partitions are
    // assigned and sampled, which they are by now).
    let metrics = h.metrics().await;
    let mut used = BTreeSet::new();
    for g in rules()["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            used.extend(metric_names(r["expr"].as_str().unwrap()));
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("docker/grafana/hookline.json")).unwrap(),
    )
    .unwrap();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            used.extend(metric_names(t["expr"].as_str().unwrap()));
        }
    }
    let missing: Vec<&String> = used.iter().filter(|n| !exported(&metrics, n)).collect();
    assert!(
        missing.is_empty(),
        "used by rules or dashboard but not exported: {missing:?}"
    );
    println!(
        "rules and dashboard use {} metrics, all exported",
        used.len()
    );
    h.sigterm();
    h.wait_exit(Duration::from_secs(20));
}
