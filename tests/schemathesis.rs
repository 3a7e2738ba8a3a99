//! Issue 7, must show 6: schemathesis (PyPI, installed by scripts/setup) generates requests from
//! `schemas/openapi.yaml` against a running hookline — valid and invalid bodies, parameters, headers —
//! and checks that no response is a server error and every response conforms to the document (status
//! code, content type, body schema). Bounded: a fixed seed and example count.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "schemathesis-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let env = SqliteEnv::new(1);
    let h = env.hookline(TOKEN).await;
    let api = Api::new(&h, TOKEN);
    let rx = Receiver::ok().await;
    // Some real subscriptions, so reads of existing ids happen too.
    for t in ["order.*", "payment.*"] {
        let (st, _) = api
            .post(
                "/v1/subscriptions",
                serde_json::json!({"url": rx.url(), "event_types": [t]}),
            )
            .await;
        assert_eq!(st, 201);
    }
    let started = Instant::now();
    let bin = repo_root().join(".venv/bin/schemathesis");
    assert!(
        bin.is_file(),
        "{} missing: run scripts/setup",
        bin.display()
    );
    let out = tokio::task::spawn_blocking({
        let url = api.base.clone();
        move || {
            Command::new(bin)
                .args(["run", "schemas/openapi.yaml", "--url", &url])
                .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
                .args([
                    "--checks",
                    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                ])
                .args(["--phases", "examples,coverage,fuzzing"])
                .args(["--max-examples", "40", "--seed", "20261125", "--request-timeout", "10"])
                .args(["--no-color"])
                .current_dir(repo_root())
                .env("SCHEMATHESIS_HOOKS", "")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("passed")
                || l.contains("failed")
                || l.contains("Test cases")
                || l.contains("API Operations")
        })
        .collect();
    println!(
        "schemathesis in {:?}:\n{}",
        started.elapsed(),
        summary.join("\n")
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    // It really got past authentication: it wrote through the API (the log lines of accepted writes).
    let log = h.log();
    let (created, updated, deleted) = (
        log.matches("subscription created").count() - 2,
        log.matches("subscription updated").count(),
        log.matches("subscription deleted").count(),
    );
    println!(
        "accepted writes by schemathesis: {created} creates, {updated} updates, {deleted} deletes"
    );
    assert!(
        created + updated + deleted > 0,
        "no accepted write: did its requests authenticate?"
    );
    assert!(started.elapsed() < Duration::from_secs(600));
    drop(h);
}
