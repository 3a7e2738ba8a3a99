//! Tenant-scoped tokens (issue 20, must show 1): the authorization matrix of every `/v1` route ×
//! {no token, expired token, revoked token, tenant A, tenant B, admin} against a real hookline on an
//! SQLite store (a real Apache Kafka broker under it), plus revocation seen by a second instance and
//! the tenant confinement of created and updated subscriptions.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

const TOKEN: &str = "test-admin-token-0123456789";

/// Who calls, in the matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Who {
    Nobody,
    Expired,
    Revoked,
    TenantA,
    TenantB,
    Admin,
}

const EVERYONE: [Who; 6] = [
    Who::Nobody,
    Who::Expired,
    Who::Revoked,
    Who::TenantA,
    Who::TenantB,
    Who::Admin,
];

/// Makes a token through the API as the admin; returns (id, token).
async fn make_token(admin: &Api, tenant: &str, expires_in: Option<&str>) -> (String, String) {
    let mut body = json!({"tenant": tenant, "name": format!("{tenant} token")});
    if let Some(e) = expires_in {
        body["expires_in"] = json!(e);
    }
    let (st, t) = admin.call(Method::POST, "/v1/tokens", Some(body)).await;
    assert_eq!(st, 201, "{t}");
    assert!(t["token"].as_str().unwrap().starts_with("hlt_"), "{t}");
    (
        t["id"].as_str().unwrap().to_string(),
        t["token"].as_str().unwrap().to_string(),
    )
}

/// A subscription of tenant A, made by tenant A's token (its tenant is forced, not given).
async fn a_subscription(a: &Api, url: &str) -> String {
    let (st, s) = a
        .call(
            Method::POST,
            "/v1/subscriptions",
            Some(json!({"url": url, "event_types": ["order.*"]})),
        )
        .await;
    assert_eq!(st, 201, "{s}");
    assert_eq!(
        s["tenant"], "acme",
        "a tenant token's subscription gets its tenant"
    );
    s["id"].as_str().unwrap().to_string()
}

/// Waits until a replay is no longer running (the API allows a few at once per instance).
async fn replay_done(api: &Api, id: &str) {
    let t = std::time::Instant::now();
    loop {
        let (st, r) = api.get(&format!("/v1/replays/{id}")).await;
        assert_eq!(st, 200, "{r}");
        if r["state"] != "running" {
            assert_eq!(r["state"], "finished", "{r}");
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_only_the_expected_principals() {
    let env = SqliteEnv::new(1);
    let h = env.hookline(TOKEN).await;
    let rx = Receiver::ok().await;
    let url = rx.url();
    let admin = Api::new(&h, TOKEN);

    let (_, token_a) = make_token(&admin, "acme", None).await;
    let (_, token_b) = make_token(&admin, "beta", None).await;
    let (expired_id, token_expired) = make_token(&admin, "acme", Some("1s")).await;
    let (revoked_id, token_revoked) = make_token(&admin, "acme", None).await;
    let api_a = Api::new(&h, &token_a);
    let api_revoked = Api::new(&h, &token_revoked);
    // The revoked token works until it is revoked.
    assert_eq!(api_revoked.get("/v1/subscriptions").await.0, 200);
    let (st, _) = admin
        .call(Method::DELETE, &format!("/v1/tokens/{revoked_id}"), None)
        .await;
    assert_eq!(st, 204);

    // Tokens are listed without their secret; the expired one says so once its time is up.
    let (st, list) = admin.get("/v1/tokens").await;
    assert_eq!(st, 200);
    let listed = list["items"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{list}");
    assert!(
        listed
            .iter()
            .all(|t| t.get("token").is_none() && t.get("hash").is_none())
    );
    assert!(
        !list.to_string().contains(&token_a[4..]),
        "a token is shown once only"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, list) = admin.get("/v1/tokens").await;
    let expired = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == expired_id.as_str())
        .unwrap();
    assert_eq!(expired["expired"], true, "{expired}");

    let api = |who: Who| -> Api {
        match who {
            Who::Nobody => Api::new(&h, ""),
            Who::Expired => Api::new(&h, &token_expired),
            Who::Revoked => Api::new(&h, &token_revoked),
            Who::TenantA => Api::new(&h, &token_a),
            Who::TenantB => Api::new(&h, &token_b),
            Who::Admin => Api::new(&h, TOKEN),
        }
    };

    // Every documented /v1 route must have a case here: a new route without one fails the test.
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo_root().join("schemas/openapi.yaml")).unwrap(),
    )
    .unwrap();
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        let path = path.as_str().unwrap();
        if !path.starts_with("/v1/") {
            continue;
        }
        for (m, _) in item.as_mapping().unwrap() {
            let m = m.as_str().unwrap();
            if ["get", "post", "patch", "delete", "put"].contains(&m) {
                documented.push(format!("{} {path}", m.to_uppercase()));
            }
        }
    }
    let mut covered = Vec::new();
    let mut cells = 0;

    for who in EVERYONE {
        let caller = api(who);
        // A fresh subscription of tenant A per row, so that the destructive routes (DELETE, rotate)
        // of one row cannot change what another row sees.
        let sub_a = a_subscription(&api_a, &url).await;
        // A token to revoke, per row.
        let (spare_token, _) = make_token(&admin, "acme", None).await;
        // A (dry-run) replay of tenant A's, per row; finished before the row starts.
        let (st, r) = api_a
            .call(
                Method::POST,
                "/v1/dead-letters/replay",
                Some(json!({"dry_run": true})),
            )
            .await;
        assert_eq!(st, 202, "{r}");
        let replay_a = r["id"].as_str().unwrap().to_string();
        replay_done(&admin, &replay_a).await;
        let cases: Vec<(Method, &str, String, Option<Value>)> = vec![
            (
                Method::GET,
                "/v1/subscriptions",
                "/v1/subscriptions".into(),
                None,
            ),
            (
                Method::POST,
                "/v1/subscriptions",
                "/v1/subscriptions".into(),
                Some(json!({"url": url, "event_types": ["order.created"]})),
            ),
            (
                Method::GET,
                "/v1/subscriptions/{id}",
                format!("/v1/subscriptions/{sub_a}"),
                None,
            ),
            (
                Method::PATCH,
                "/v1/subscriptions/{id}",
                format!("/v1/subscriptions/{sub_a}"),
                Some(json!({"headers": {"x-row": format!("{who:?}")}})),
            ),
            (
                Method::POST,
                "/v1/subscriptions/{id}/rotate-secret",
                format!("/v1/subscriptions/{sub_a}/rotate-secret"),
                Some(json!({"grace_seconds": 60})),
            ),
            (
                Method::POST,
                "/v1/subscriptions/{id}/rotate-signing-key",
                format!("/v1/subscriptions/{sub_a}/rotate-signing-key"),
                Some(json!({})),
            ),
            (
                Method::POST,
                "/v1/subscriptions/{id}/test",
                format!("/v1/subscriptions/{sub_a}/test"),
                Some(json!({})),
            ),
            (
                Method::GET,
                "/v1/subscriptions/{id}/health",
                format!("/v1/subscriptions/{sub_a}/health"),
                None,
            ),
            (
                Method::GET,
                "/v1/subscriptions/{id}/attempts",
                format!("/v1/subscriptions/{sub_a}/attempts"),
                None,
            ),
            (
                Method::GET,
                "/v1/subscriptions/{id}/parked-keys",
                format!("/v1/subscriptions/{sub_a}/parked-keys"),
                None,
            ),
            // A request naming an event that is not parked: written, and ignored by the owner.
            (
                Method::POST,
                "/v1/subscriptions/{id}/parked-keys/release",
                format!("/v1/subscriptions/{sub_a}/parked-keys/release"),
                Some(json!({"key": "k1", "topic": env.topic, "partition": 0, "offset": 0})),
            ),
            (
                Method::POST,
                "/v1/subscriptions/{id}/parked-keys/skip",
                format!("/v1/subscriptions/{sub_a}/parked-keys/skip"),
                Some(json!({"key": "k1", "topic": env.topic, "partition": 0, "offset": 0})),
            ),
            (
                Method::GET,
                "/v1/dead-letters",
                "/v1/dead-letters".into(),
                None,
            ),
            (
                Method::POST,
                "/v1/dead-letters/replay",
                "/v1/dead-letters/replay".into(),
                Some(json!({"dry_run": true})),
            ),
            (
                Method::GET,
                "/v1/replays/{id}",
                format!("/v1/replays/{replay_a}"),
                None,
            ),
            (Method::GET, "/v1/tokens", "/v1/tokens".into(), None),
            (
                Method::POST,
                "/v1/tokens",
                "/v1/tokens".into(),
                Some(json!({"tenant": "acme"})),
            ),
            (
                Method::DELETE,
                "/v1/tokens/{id}",
                format!("/v1/tokens/{spare_token}"),
                None,
            ),
            // Last: it deletes the row's subscription.
            (
                Method::DELETE,
                "/v1/subscriptions/{id}",
                format!("/v1/subscriptions/{sub_a}"),
                None,
            ),
        ];
        for (method, route, path, body) in cases {
            let (st, resp) = caller.call(method.clone(), &path, body.clone()).await;
            let admin_only = route.starts_with("/v1/tokens");
            let names_a = route.contains("{id}") && !admin_only;
            let expected: &[u16] = match who {
                Who::Nobody | Who::Expired | Who::Revoked => &[401],
                Who::Admin => &[200, 201, 202, 204],
                Who::TenantA if admin_only => &[403],
                Who::TenantA => &[200, 201, 202, 204],
                Who::TenantB if admin_only => &[403],
                // Another tenant's id is "not found", exactly like an id that does not exist.
                Who::TenantB if names_a => &[404],
                Who::TenantB => &[200, 201, 202],
            };
            assert!(
                expected.contains(&st),
                "{who:?} {method} {path}: {st} (expected {expected:?}) {resp}"
            );
            match st {
                401 => {
                    assert_eq!(resp["field"], "authorization", "{who:?} {path}: {resp}");
                    let want = match who {
                        Who::Expired => "token expired",
                        Who::Revoked => "unknown or revoked token",
                        _ => "missing",
                    };
                    assert!(
                        resp["error"].as_str().unwrap().contains(want),
                        "{who:?} {path}: {resp}"
                    );
                }
                403 => assert_eq!(resp["field"], "authorization", "{resp}"),
                404 => {
                    // The same answer as for an id that never existed (no "forbidden" leak).
                    let missing = uuid::Uuid::new_v4().to_string();
                    let own = if route.starts_with("/v1/replays") {
                        &replay_a
                    } else {
                        &sub_a
                    };
                    let (st2, resp2) = caller
                        .call(method.clone(), &path.replace(own, &missing), body)
                        .await;
                    assert_eq!(st2, 404);
                    assert_eq!(
                        resp["error"].as_str().unwrap().replace(own, "X"),
                        resp2["error"].as_str().unwrap().replace(&missing, "X")
                    );
                }
                _ => {}
            }
            // What a listing shows: tenant B never sees A's subscriptions; A sees only its own.
            if method == Method::GET && route == "/v1/subscriptions" && st == 200 {
                let items = resp["items"].as_array().unwrap();
                let tenants: Vec<&str> = items
                    .iter()
                    .map(|i| i["tenant"].as_str().unwrap_or("-"))
                    .collect();
                match who {
                    Who::TenantA => {
                        assert!(tenants.iter().all(|t| *t == "acme"), "{tenants:?}");
                        assert!(items.iter().any(|i| i["id"] == sub_a.as_str()));
                    }
                    Who::TenantB => {
                        assert!(tenants.iter().all(|t| *t == "beta"), "{tenants:?}");
                        assert!(!items.iter().any(|i| i["id"] == sub_a.as_str()));
                    }
                    _ => assert!(tenants.contains(&"acme") && tenants.contains(&"beta")),
                }
            }
            if route == "/v1/dead-letters/replay" && st == 202 {
                replay_done(&caller, resp["id"].as_str().unwrap()).await;
            }
            if method == Method::POST && route == "/v1/subscriptions" && st == 201 {
                let forced = match who {
                    Who::TenantA => json!("acme"),
                    Who::TenantB => json!("beta"),
                    _ => Value::Null,
                };
                assert_eq!(resp["tenant"], forced, "{who:?}: {resp}");
            }
            covered.push(format!("{method} {route}"));
            cells += 1;
        }
        // Tenant B's attempts changed nothing of A's subscription; the others deleted it.
        let (st, _) = admin.get(&format!("/v1/subscriptions/{sub_a}")).await;
        let kept = !matches!(who, Who::TenantA | Who::Admin);
        assert_eq!(st, if kept { 200 } else { 404 }, "{who:?}");
        if who == Who::TenantB {
            let (_, s) = admin.get(&format!("/v1/subscriptions/{sub_a}")).await;
            assert_eq!(
                s["headers"],
                json!({}),
                "B's PATCH must not have applied: {s}"
            );
            assert_eq!(
                s["retired_secrets"],
                json!([]),
                "B's rotation must not have applied"
            );
        }
        let (_, toks) = admin.get("/v1/tokens").await;
        let spare_left = toks["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == spare_token.as_str());
        assert_eq!(spare_left, who != Who::Admin, "{who:?}: spare token");
    }
    covered.sort();
    covered.dedup();
    documented.sort();
    assert_eq!(
        covered, documented,
        "every documented /v1 route is in the matrix"
    );
    assert_eq!(cells, 6 * documented.len());

    // Confinement: a tenant cannot create for, or move a subscription to, another tenant.
    let (st, e) = api_a
        .call(
            Method::POST,
            "/v1/subscriptions",
            Some(json!({"url": url, "event_types": ["a.b"], "tenant": "beta"})),
        )
        .await;
    assert_eq!((st, e["field"].as_str()), (422, Some("tenant")), "{e}");
    let sub = a_subscription(&api_a, &url).await;
    for tenant in [json!("beta"), Value::Null] {
        let (st, e) = api_a
            .call(
                Method::PATCH,
                &format!("/v1/subscriptions/{sub}"),
                Some(json!({ "tenant": tenant })),
            )
            .await;
        assert_eq!((st, e["field"].as_str()), (422, Some("tenant")), "{e}");
    }
    let (_, s) = admin.get(&format!("/v1/subscriptions/{sub}")).await;
    assert_eq!(s["tenant"], "acme");

    // Bad token requests name their field.
    for (body, field) in [
        (json!({}), "tenant"),
        (json!({"tenant": ""}), "tenant"),
        (json!({"tenant": "x", "expires_in": "soon"}), "expires_in"),
        (json!({"tenant": "x", "expires_in": 0}), "expires_in"),
        (json!({"tenant": "x", "colour": 1}), "colour"),
    ] {
        let (st, e) = admin.call(Method::POST, "/v1/tokens", Some(body)).await;
        assert!(st == 400 || st == 422, "{st} {e}");
        assert_eq!(e["field"], field, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_is_refused_by_every_instance_within_5s() {
    // Two instances on one SQLite file: a token revoked through one is refused by the other.
    let env = SqliteEnv::new(2);
    let (h1, h2) = tokio::join!(env.hookline(TOKEN), env.hookline(TOKEN));
    let (id, token) = make_token(&Api::new(&h1, TOKEN), "acme", None).await;
    let on2 = Api::new(&h2, &token);
    assert_eq!(on2.get("/v1/subscriptions").await.0, 200);
    let (st, _) = Api::new(&h1, TOKEN)
        .call(Method::DELETE, &format!("/v1/tokens/{id}"), None)
        .await;
    assert_eq!(st, 204);
    let revoked = std::time::Instant::now();
    loop {
        let (st, _) = on2.get("/v1/subscriptions").await;
        if st == 401 {
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(5),
            "instance 2 still accepts a revoked token after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "revocation refused by the other instance after {:?}",
        revoked.elapsed()
    );
}
