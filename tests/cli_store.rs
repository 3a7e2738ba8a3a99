//! `hookline subscriptions …`, `hookline migrate` and `--check-config` against an SQLite store, from the
//! command line (no broker needed: these commands never contact Kafka).

mod common;

use std::path::Path;

use common::hookline_cli;

fn run(args: &[&str], config: &Path) -> (i32, String) {
    let config = config.to_str().unwrap();
    let r = hookline_cli(&[args, &["--config", config]].concat(), &[]);
    (r.code, r.all())
}

fn config(dir: &Path, store: &str) -> std::path::PathBuf {
    let p = dir.join("hookline.toml");
    std::fs::write(
        &p,
        format!("[kafka]\n\"bootstrap.servers\" = \"127.0.0.1:1\"\n[source]\ntopics = [\"orders\"]\n{store}"),
    )
    .unwrap();
    p
}

#[test]
fn subscription_commands_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    let cfg = config(
        dir.path(),
        &format!("[store]\nkind = \"sqlite\"\npath = \"{}\"\n", db.display()),
    );

    // --check-config does not create the file.
    let (code, out) = run(&["run", "--check-config"], &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("does not exist yet"), "{out}");
    assert!(!db.exists());

    let (code, out) = run(&["migrate"], &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(db.exists());

    let (code, out) = run(
        &[
            "subscriptions",
            "create",
            "--url",
            "https://example.com/h",
            "--event-type",
            "order.*",
            "--tenant",
            "acme",
        ],
        &cfg,
    );
    assert_eq!(code, 0, "{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap()
        .to_string();
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .unwrap()
        .to_string();
    assert!(secret.starts_with("whsec_"));
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD
        .decode(&secret[6..])
        .unwrap();
    assert_eq!(key.len(), 32);

    let (code, out) = run(&["subscriptions", "list"], &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&id)
            && out.contains("enabled ")
            && out.contains("acme")
            && out.contains("order.*"),
        "{out}"
    );
    assert!(!out.contains(&secret), "list printed a secret");

    let (code, out) = run(&["subscriptions", "disable", &id], &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(run(&["subscriptions", "list"], &cfg).1.contains("disabled"));
    let (code, _) = run(&["subscriptions", "enable", &id], &cfg);
    assert_eq!(code, 0);
    let (code, out) = run(
        &[
            "subscriptions",
            "disable",
            "00000000-0000-4000-8000-000000000099",
        ],
        &cfg,
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no subscription"), "{out}");

    // Import is all or nothing: a bad entry names itself and nothing is written.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "- {url: 'https://a.example/x', event_types: [a.b], secrets: [whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw]}\n- {url: 'ftp://b.example/', event_types: [a.b], secrets: [whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw]}\n",
    )
    .unwrap();
    let (code, out) = run(&["subscriptions", "import", bad.to_str().unwrap()], &cfg);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(": url:") && out.contains("scheme"), "{out}");
    assert!(
        run(&["subscriptions", "list"], &cfg)
            .1
            .contains("1 subscriptions")
    );
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        std::fs::read_to_string(&bad)
            .unwrap()
            .replace("ftp://", "https://"),
    )
    .unwrap();
    let (code, out) = run(&["subscriptions", "import", good.to_str().unwrap()], &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(
        run(&["subscriptions", "list"], &cfg)
            .1
            .contains("3 subscriptions")
    );
    let (code, out) = run(&["run", "--check-config"], &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("3 enabled subscriptions"), "{out}");
}

#[tokio::test]
async fn token_commands_on_sqlite() {
    use hookline::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    let cfg = config(
        dir.path(),
        &format!("[store]\nkind = \"sqlite\"\npath = \"{}\"\n", db.display()),
    );
    let (code, out) = run(&["migrate"], &cfg);
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(
        &[
            "tokens",
            "create",
            "--tenant",
            "acme",
            "--name",
            "ci",
            "--expires-in",
            "90d",
        ],
        &cfg,
    );
    assert_eq!(code, 0, "{out}");
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .to_string()
    };
    let (id, token) = (field("id: "), field("token: "));
    assert!(token.starts_with("hlt_") && token.len() >= 40, "{out}");
    // What the store holds is the hash, which the API's lookup finds.
    let store =
        hookline::store::sqlite::SqliteStore::open(db.clone(), std::time::Duration::from_secs(60))
            .await
            .unwrap();
    let stored = store
        .token_by_hash(&hookline::model::api_token_hash(&token))
        .await
        .unwrap()
        .expect("stored by hash");
    assert_eq!(
        (stored.id.to_string(), stored.tenant.as_str()),
        (id.clone(), "acme")
    );
    assert!(stored.expires_at_ms.is_some());
    assert!(
        !std::fs::read(&db)
            .unwrap()
            .windows(token.len())
            .any(|w| w == token.as_bytes())
    );

    let (code, out) = run(&["tokens", "list"], &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&id) && out.contains("acme") && out.contains("expires "),
        "{out}"
    );
    assert!(!out.contains(&token), "list printed a token");
    let (code, out) = run(&["tokens", "revoke", &id], &cfg);
    assert_eq!((code, out.trim()), (0, format!("{id} revoked").as_str()));
    let (code, out) = run(&["tokens", "revoke", &id], &cfg);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no token"), "{out}");
    let (code, out) = run(&["tokens", "create", "--tenant", " "], &cfg);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--tenant"), "{out}");
}

#[test]
fn migrate_refuses_the_yaml_store() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "[store]\nkind = \"yaml\"\npath = \"x.yaml\"\n");
    let (code, out) = run(&["migrate"], &cfg);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("store.kind"), "{out}");
}

/// `subscriptions create` sets ordered delivery; a bad ordering key is refused naming the flag's field.
#[tokio::test]
async fn create_an_ordered_subscription() {
    use hookline::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    let cfg = config(
        dir.path(),
        &format!("[store]\nkind = \"sqlite\"\npath = \"{}\"\n", db.display()),
    );
    assert_eq!(run(&["migrate"], &cfg).0, 0);
    let base = [
        "subscriptions",
        "create",
        "--url",
        "https://example.com/h",
        "--event-type",
        "order.*",
        "--ordering",
        "key",
    ];
    let (code, out) = run(
        &[
            &base[..],
            &[
                "--ordering-key",
                "data.customer.id",
                "--on-dead-letter",
                "hold",
            ],
        ]
        .concat(),
        &cfg,
    );
    assert_eq!(code, 0, "{out}");
    let id: uuid::Uuid = out
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap()
        .parse()
        .unwrap();
    let store =
        hookline::store::sqlite::SqliteStore::open(db.clone(), std::time::Duration::from_secs(60))
            .await
            .unwrap();
    let spec = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (
            spec.ordering,
            spec.ordering_key.as_deref(),
            spec.on_dead_letter
        ),
        (
            hookline::model::OrderingMode::Key,
            Some("data.customer.id"),
            hookline::model::OnDeadLetter::Hold
        )
    );
    let (code, out) = run(&[&base[..], &["--ordering-key", "header.x"]].concat(), &cfg);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("ordering_key"), "{out}");
    let (code, out) = run(
        &[
            "subscriptions",
            "create",
            "--url",
            "https://example.com/h",
            "--event-type",
            "a",
            "--ordering-key",
            "subject",
        ],
        &cfg,
    );
    assert_eq!(code, 2, "--ordering-key needs --ordering: {out}");
}
