//! The deployment files (docker/) cannot be run here (no Docker engine), so everything that can be checked
//! without one is: the compose file parses and names the services of DESIGN §12; every file it mounts or
//! builds from exists; the Dockerfile's stages, copies and user are coherent; the hookline config and
//! subscriptions it ships are accepted by this binary — `hookline migrate`, `subscriptions import` and
//! `run --check-config`, exactly as the compose services run them, against a real Apache Cassandra 5.0
//! node (not ScyllaDB; `HOOKLINE_TEST_SCYLLA` names another database); Prometheus and Alertmanager configs pass promtool and amtool; names agree across files.

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde_yaml_ng::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Value {
    let text = std::fs::read_to_string(root().join("docker/docker-compose.yml")).unwrap();
    let mut v: Value = serde_yaml_ng::from_str(&text).unwrap();
    v.apply_merge().unwrap();
    v
}

fn service<'a>(c: &'a Value, name: &str) -> &'a Value {
    let s = &c["services"][name];
    assert!(!s.is_null(), "compose has no service {name}");
    s
}

#[test]
fn compose_file_services_and_references() {
    let c = compose();
    for s in [
        "kafka",
        "kafka-topics",
        "scylla",
        "hookline-migrate",
        "hookline-1",
        "hookline-2",
        "prometheus",
        "alertmanager",
        "demo-receiver",
        "demo-producer",
    ] {
        service(&c, s);
    }
    assert!(
        service(&c, "kafka")["environment"]["KAFKA_PROCESS_ROLES"]
            .as_str()
            .unwrap()
            .contains("controller"),
        "Kafka must run in KRaft mode"
    );
    let docker = root().join("docker");
    let mut mounts = 0;
    for (name, svc) in c["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let spec = v.as_str().unwrap();
            let host = spec.split(':').next().unwrap();
            if host.starts_with('.') {
                let p = docker.join(host);
                assert!(
                    p.exists(),
                    "{name} mounts {host}, which does not exist ({})",
                    p.display()
                );
                mounts += 1;
            }
        }
        if let Some(b) = svc["build"].as_mapping() {
            let ctx = docker.join(b[&Value::from("context")].as_str().unwrap());
            let df = ctx.join(b[&Value::from("dockerfile")].as_str().unwrap());
            assert!(
                df.is_file(),
                "{name} builds from {} which is missing",
                df.display()
            );
        }
    }
    assert!(mounts >= 9, "{mounts} mounts checked");
    // Both instances: same image, same config, one consumer group (the group is in the shared config).
    for h in ["hookline-1", "hookline-2"] {
        let s = service(&c, h);
        assert_eq!(s["image"], "hookline:local");
        assert!(s["volumes"].as_sequence().unwrap().iter().any(|v| {
            v.as_str()
                .unwrap()
                .starts_with("./hookline.toml:/etc/hookline/hookline.toml")
        }));
        assert_eq!(
            s["depends_on"]["hookline-migrate"]["condition"],
            "service_completed_successfully"
        );
        assert!(
            s["environment"]["HOOKLINE_ADMIN__TOKEN"]
                .as_str()
                .unwrap()
                .contains("HOOKLINE_ADMIN_TOKEN")
        );
    }
}

#[test]
fn dockerfile_is_multi_stage_and_non_root() {
    let text = std::fs::read_to_string(root().join("docker/Dockerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let stages: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .map(|l| l.split_whitespace().last().unwrap())
        .collect();
    assert_eq!(stages, ["build", "runtime"]);
    let mut stage = "";
    let mut user = None;
    for l in &lines {
        if l.starts_with("FROM ") {
            stage = l.split_whitespace().last().unwrap();
        }
        if let Some(rest) = l.strip_prefix("COPY ") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            if let Some(from) = parts[0].strip_prefix("--from=") {
                assert!(stages.contains(&from), "COPY from unknown stage {from}");
                continue;
            }
            // Sources of a plain COPY are relative to the build context (the repository root).
            for src in &parts[..parts.len() - 1] {
                assert!(
                    root().join(src).exists(),
                    "Dockerfile copies {src}, which does not exist"
                );
            }
        }
        if let Some(u) = l.strip_prefix("USER ") {
            assert_eq!(stage, "runtime");
            user = Some(u.trim().to_string());
        }
    }
    let user = user.expect("the runtime stage sets USER");
    assert!(user != "root" && user != "0", "runs as {user}");
    assert!(text.contains("cargo build --release --locked --bin hookline"));
    assert!(
        text.contains("COPY --from=build /src/target/release/hookline /usr/local/bin/hookline")
    );
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/hookline\"]"));
}

fn hookline(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let r = common::hookline_cli(args, env);
    (r.code, r.all())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_config_and_subscriptions_are_accepted_by_the_binary() {
    let c = compose();
    let migrate = service(&c, "hookline-migrate")["command"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        migrate.contains("hookline migrate --config /etc/hookline/hookline.toml"),
        "{migrate}"
    );
    assert!(migrate.contains("hookline subscriptions import /etc/hookline/subscriptions.yaml --config /etc/hookline/hookline.toml"), "{migrate}");
    // The same commands, with the container paths mapped to the repository and ScyllaDB to this test
    // binary's Cassandra node (the shipped keyspace and its single-node replication as they are).
    let node = common::cassandra::CqlNode::shared();
    let env = [
        ("HOOKLINE_STORE__SCYLLA__NODES", node.addr.as_str()),
        ("HOOKLINE_ADMIN__TOKEN", "compose-token-0123456789"),
    ];
    let cfg = "docker/hookline.toml";
    let cmds: [&[&str]; 3] = [
        &["migrate", "--config", cfg],
        &[
            "subscriptions",
            "import",
            "docker/subscriptions.yaml",
            "--config",
            cfg,
        ],
        &["run", "--check-config", "--config", cfg],
    ];
    let mut outs = Vec::new();
    for args in cmds {
        let (code, out) = tokio::task::spawn_blocking({
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            let env: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            move || {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                let e: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                hookline(&a, &e)
            }
        })
        .await
        .unwrap();
        assert_eq!(code, 0, "hookline {args:?}: {out}");
        outs.push(out);
    }
    assert!(outs[1].contains("imported 2 subscriptions"), "{}", outs[1]);
    assert!(
        outs[2].contains("2 enabled subscriptions") && outs[2].contains("scylla"),
        "{}",
        outs[2]
    );
    println!(
        "docker/hookline.toml on {}: {}",
        node.label(),
        outs[2].trim()
    );

    // Names agree across files: scrape targets are the hookline services on admin.listen's port; the
    // demo receiver verifies with the secret of the shipped subscriptions; the producer writes the
    // configured source topics.
    let toml: toml::Table =
        toml::from_str(&std::fs::read_to_string(root().join(cfg)).unwrap()).unwrap();
    let port = toml["admin"]["listen"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let prom = std::fs::read_to_string(root().join("docker/prometheus/prometheus.yml")).unwrap();
    for h in ["hookline-1", "hookline-2"] {
        assert!(
            prom.contains(&format!("{h}:{port}")),
            "prometheus does not scrape {h}:{port}"
        );
        assert!(
            service(&c, h)["ports"][0]
                .as_str()
                .unwrap()
                .ends_with(&format!(":{port}"))
        );
    }
    let subs = std::fs::read_to_string(root().join("docker/subscriptions.yaml")).unwrap();
    let receiver = service(&c, "demo-receiver")["command"][2]
        .as_str()
        .unwrap()
        .to_string();
    let secret = receiver
        .split_whitespace()
        .find(|w| w.starts_with("whsec_"))
        .unwrap();
    assert!(
        subs.contains(secret),
        "the demo receiver's secret is not the subscriptions' secret"
    );
    let produce = std::fs::read_to_string(root().join("docker/demo/produce.sh")).unwrap();
    for t in toml["source"]["topics"].as_array().unwrap() {
        assert!(
            produce.contains(&format!("-t {}", t.as_str().unwrap())),
            "the demo producer never writes {t}"
        );
    }
}

#[test]
fn prometheus_and_alertmanager_configs_check() {
    for (tool, args) in [
        (
            "promtool",
            vec!["check", "config", "docker/prometheus/prometheus.yml"],
        ),
        (
            "amtool",
            vec!["check-config", "docker/alertmanager/alertmanager.yml"],
        ),
    ] {
        let out = Command::new(tool)
            .args(&args)
            .current_dir(root())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{tool}: {e} (scripts/setup installs prometheus and prometheus-alertmanager)"
                )
            });
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
