//! The web console in a real browser (issue 20, must show 2): Debian's headless Chromium driven by
//! playwright-core (`tests/browser/console.mjs`, installed by scripts/setup) against a running hookline
//! on SQLite over a real Apache Kafka broker, with real receivers. The script signs in as the admin,
//! creates a subscription and watches its deliveries appear, makes the endpoint fail and watches the
//! breaker open and dead letters appear, replays them with a dry run first, then signs in as a tenant
//! that cannot reach another tenant's page by URL. It asks this test (over its stdin/stdout) to
//! produce events and to make the receiver fail or heal. Screenshots of every page:
//! `target/console-screenshots/`.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;

const TOKEN: &str = "browser-admin-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_headless_chromium() {
    let script = repo_root().join("tests/browser/console.mjs");
    assert!(
        repo_root()
            .join("tests/browser/node_modules/playwright-core")
            .is_dir()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "playwright-core or /usr/bin/chromium missing: run scripts/setup"
    );
    let mut env = SqliteEnv::new(1);
    // The breaker opens after 3 failures in a row and probes again after 2 s.
    env.cfg.push_str(
        "[delivery.breaker]\nconsecutive_failures = 3\nmin_requests = 1000\ncool_down = \"2s\"\n",
    );
    let h = env.hookline(TOKEN).await;
    let admin = Api::new(&h, TOKEN);

    let failing = Arc::new(AtomicBool::new(false));
    let rx = {
        let failing = failing.clone();
        Receiver::start(move |_| {
            if failing.load(Ordering::Relaxed) {
                Reply::Status(503)
            } else {
                Reply::Status(200)
            }
        })
        .await
    };
    let other = Receiver::ok().await;
    // One subscription per tenant, and a token for tenant acme.
    let mut ids = Vec::new();
    for tenant in ["acme", "beta"] {
        let (st, s) = admin
            .post(
                "/v1/subscriptions",
                json!({"url": other.url(), "event_types": [format!("{tenant}.*")], "tenant": tenant}),
            )
            .await;
        assert_eq!(st, 201, "{s}");
        ids.push(s["id"].as_str().unwrap().to_string());
    }
    let (_, t) = admin.post("/v1/tokens", json!({"tenant": "acme"})).await;
    let tenant_token = t["token"].as_str().unwrap().to_string();

    let shots = repo_root().join("target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let mut child = Command::new("node")
        .arg(&script)
        .current_dir(repo_root())
        .env("BASE", format!("http://{}", h.admin))
        .env("ADMIN_TOKEN", TOKEN)
        .env("TENANT_A_TOKEN", &tenant_token)
        .env("A_SUBSCRIPTION", &ids[0])
        .env("B_SUBSCRIPTION", &ids[1])
        .env("RECEIVER_URL", rx.url())
        .env("SHOTS", &shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node");
    let mut stdin = child.stdin.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let failed_ids: HashSet<String> = (0..6).map(|i| format!("fail-{i}")).collect();
    let mut transcript = Vec::new();
    let mut dead_at_heal = 0;
    while let Some(line) = tokio::time::timeout(Duration::from_secs(180), lines.recv())
        .await
        .expect("the browser script went quiet for 180 s")
    {
        println!("browser: {line}");
        transcript.push(line.clone());
        let Some(cmd) = line.strip_prefix("CMD ") else {
            continue;
        };
        let mut words = cmd.split_whitespace();
        match (words.next(), words.next()) {
            (Some("PRODUCE"), Some(_)) => {
                let recs: Vec<Record> = (0..10)
                    .map(|i| {
                        Record::json(
                            0,
                            json!({"id": format!("ord-{i}"), "type": "order.created", "data": {"n": i}}),
                        )
                    })
                    .collect();
                env.broker.produce(&env.topic, &recs).await;
            }
            (Some("FAIL"), Some(_)) => {
                failing.store(true, Ordering::Relaxed);
                let recs: Vec<Record> = failed_ids
                    .iter()
                    .map(|id| Record::json(0, json!({"id": id, "type": "order.failed"})))
                    .collect();
                env.broker.produce(&env.topic, &recs).await;
            }
            (Some("HEAL"), Some(_)) => {
                dead_at_heal = env
                    .broker
                    .read_all(&format!("{}.dlq", prefix_of(&env.cfg)))
                    .len();
                failing.store(false, Ordering::Relaxed);
            }
            (Some("REPLAYED"), Some(_)) => {
                // Nothing lost: every failed event is delivered in the end (through its own retries or
                // the replay).
                rx.wait_acked(&failed_ids, Duration::from_secs(30)).await;
            }
            other => panic!("unknown request from the browser script: {other:?}"),
        }
        writeln!(stdin, "ok").unwrap();
    }
    let status = child.wait().unwrap();
    assert!(
        status.success() && transcript.iter().any(|l| l == "LOG all steps passed"),
        "browser script failed:\n{}",
        transcript.join("\n")
    );
    assert!(dead_at_heal >= 1, "no dead letter before the replay");
    for name in [
        "01-sign-in",
        "02-subscription-created",
        "03-deliveries",
        "04-breaker-open",
        "05-dead-letters",
        "06-replay-dry-run",
        "07-replayed",
        "08-lag",
        "09-tenant-subscriptions",
        "10-tenant-other-tenant-not-found",
    ] {
        let p = shots.join(format!("{name}.png"));
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 5_000, "screenshot {} missing or empty", p.display());
    }
    println!("screenshots in {}", shots.display());
}
