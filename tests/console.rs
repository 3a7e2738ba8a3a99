//! The web console's server side (issue 20, must show 3 and 4): embedded assets with a strict
//! Content-Security-Policy, sign-in to an HttpOnly SameSite cookie, and CSRF protection of every
//! state change made with that cookie — a request from a page of another origin is refused. Real
//! hookline on SQLite over a real Apache Kafka broker. The browser tests are in `console_browser.rs`.

mod common;

use std::time::Instant;

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "console-admin-token-0123456789";

async fn json_of(r: reqwest::Response) -> Value {
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null)
}

fn plain_client() -> reqwest::Client {
    let _ = http();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_assets_session_cookie_and_csrf() {
    let env = SqliteEnv::new(1);
    let h = env.hookline(TOKEN).await;
    let base = format!("http://{}", h.admin);
    let c = plain_client();

    // The page and its two assets: embedded, strict CSP, no inline code, nothing from elsewhere.
    let started = Instant::now();
    let mut weight = 0;
    for (path, ty) in [
        ("/console", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
    ] {
        let r = c.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let headers = r.headers().clone();
        assert!(
            headers["content-type"].to_str().unwrap().starts_with(ty),
            "{path}"
        );
        let csp = headers["content-security-policy"].to_str().unwrap();
        for part in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(part), "{path}: {csp}");
        }
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{csp}"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let body = r.text().await.unwrap();
        weight += body.len();
        if path == "/console" {
            assert!(
                !body.contains("<script>") && !body.contains("style="),
                "inline code in the page"
            );
            assert!(
                !body.contains("http://") && !body.contains("https://"),
                "an external reference"
            );
        }
    }
    let load = started.elapsed();
    println!(
        "console page weight (HTML + JS + CSS): {weight} bytes; fetched on loopback in {:.1} ms",
        load.as_secs_f64() * 1000.0
    );

    // Sign-in: a wrong token is refused; the right one sets an HttpOnly, SameSite=Strict cookie.
    let r = c
        .post(format!("{base}/console/session"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&json!({"token": "wrong-token"})).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let r = c
        .post(format!("{base}/console/session"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&json!({"token": TOKEN})).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/"),
        "{set}"
    );
    let session: Value = json_of(r).await;
    assert_eq!(session["role"], "admin");
    let csrf = session["csrf_token"].as_str().unwrap().to_string();
    let cookie = set.split(';').next().unwrap().to_string();
    // A sign-in posted by another site's page is refused.
    let r = c
        .post(format!("{base}/console/session"))
        .header("origin", "http://evil.example")
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&json!({"token": TOKEN})).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The cookie authenticates reads without a CSRF token…
    let r = c
        .get(format!("{base}/v1/subscriptions"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (st, s) = {
        let r = c
            .get(format!("{base}/console/session"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        (r.status(), json_of(r).await)
    };
    assert_eq!(
        (st.as_u16(), s["csrf_token"].as_str()),
        (200, Some(csrf.as_str()))
    );

    // …but every change needs it, and from this origin.
    let rx = Receiver::ok().await;
    let body = json!({"url": rx.url(), "event_types": ["order.*"]});
    let create = |headers: Vec<(&'static str, String)>| {
        let mut req = c
            .post(format!("{base}/v1/subscriptions"))
            .header("cookie", &cookie)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send()
    };
    let refused = [
        ("no CSRF token", vec![]),
        ("wrong CSRF token", vec![("x-csrf-token", "x".repeat(43))]),
        (
            "a page of another origin",
            vec![
                ("origin", "http://evil.example".to_string()),
                ("x-csrf-token", csrf.clone()),
            ],
        ),
        (
            "another origin without the token (a cross-site form post)",
            vec![("origin", "http://evil.example".to_string())],
        ),
    ];
    for (what, headers) in refused {
        let r = create(headers).await.unwrap();
        let st = r.status().as_u16();
        let e: Value = json_of(r).await;
        assert_eq!(
            (st, e["field"].as_str()),
            (403, Some("x-csrf-token")),
            "{what}: {e}"
        );
    }
    let (_, list) = Api::new(&h, TOKEN).get("/v1/subscriptions").await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        0,
        "a refused change wrote something"
    );
    let r = create(vec![
        ("origin", base.clone()),
        ("x-csrf-token", csrf.clone()),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    // A bearer token is no ambient authority: API clients need no CSRF token.
    let (st, _) = Api::new(&h, TOKEN)
        .post("/v1/subscriptions", body.clone())
        .await;
    assert_eq!(st, 201);

    // Sign-out needs the CSRF token too, and clears the cookie.
    let r = c
        .delete(format!("{base}/console/session"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .delete(format!("{base}/console/session"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );

    // A tenant's console session is the tenant token's scope, and ends when the token is revoked.
    let (_, t) = Api::new(&h, TOKEN)
        .post("/v1/tokens", json!({"tenant": "acme"}))
        .await;
    let r = c
        .post(format!("{base}/console/session"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&json!({"token": t["token"]})).unwrap())
        .send()
        .await
        .unwrap();
    let tenant_cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let s: Value = json_of(r).await;
    assert_eq!(
        (s["role"].as_str(), s["tenant"].as_str()),
        (Some("tenant"), Some("acme"))
    );
    let r = c
        .get(format!("{base}/v1/subscriptions"))
        .header("cookie", &tenant_cookie)
        .send()
        .await
        .unwrap();
    let v: Value = json_of(r).await;
    assert_eq!(
        v["items"].as_array().unwrap().len(),
        0,
        "the admin's subscriptions are not acme's"
    );
    let (st, _) = Api::new(&h, TOKEN)
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/tokens/{}", t["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(st, 204);
    let r = c
        .get(format!("{base}/console/session"))
        .header("cookie", &tenant_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a revoked token ends its console session");
}
