use std::io::Read;

// glibc malloc showed ~12 % of delivery CPU (arena growth, free lists across threads); mimalloc's
// thread-local heaps fit the allocate-on-one-task, free-on-another pattern of deliveries. With the
// crate's `override` feature, mimalloc also defines `malloc`/`free` for the whole process, so the C
// code (librdkafka: produced messages allocated on a tokio worker and freed by its broker thread) uses
// it too: with receipts on, glibc's `_int_malloc`/`_int_free` had been ~11 % of hookline's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

use clap::Parser;
use hookline::cli::{
    Cli, Command, DlqCommand, ReplayArgs, RunArgs, SignArgs, SubscriptionsCommand, TokensCommand,
    VerifyArgs,
};
use hookline::config::ConfigError;
use hookline::config::{Config, LogFormat};
use hookline::deliver::sign;
use hookline::manage;
use hookline::model::{Ed25519Key, SigningKey, generate_signing_key, parse_public_key};
use hookline::pipeline::{self, RunError};
use hookline::replay;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Migrate(args) => with_store(args.config.as_deref(), |c| async move {
            manage::migrate(&c).await
        }),
        Command::Replay(a) => {
            let path = a.config.config.clone();
            with_store(path.as_deref(), |c| async move { replay_cmd(&c, a).await })
        }
        Command::Dlq(DlqCommand::Stats {
            topic,
            json,
            config,
        }) => with_store(config.config.as_deref(), |c| async move {
            let s = replay::stats(&c, topic).await?;
            Ok(if json {
                serde_json::to_string_pretty(&s).unwrap_or_default()
            } else {
                s.to_string().trim_end().to_string()
            })
        }),
        Command::Subscriptions(cmd) => {
            let path = match &cmd {
                SubscriptionsCommand::List(a) => a.config.clone(),
                SubscriptionsCommand::Import { config, .. }
                | SubscriptionsCommand::Create { config, .. }
                | SubscriptionsCommand::Disable { config, .. }
                | SubscriptionsCommand::Enable { config, .. } => config.config.clone(),
            };
            with_store(path.as_deref(), |c| async move {
                manage::subscriptions(&c, cmd).await
            })
        }
        Command::Tokens(cmd) => {
            let path = match &cmd {
                TokensCommand::List(a) => a.config.clone(),
                TokensCommand::Create { config, .. } | TokensCommand::Revoke { config, .. } => {
                    config.config.clone()
                }
            };
            with_store(
                path.as_deref(),
                |c| async move { manage::tokens(&c, cmd).await },
            )
        }
        Command::Sign(args) => sign_cmd(args),
        Command::Verify(args) => verify_cmd(args),
        Command::Keygen => keygen_cmd(),
    }
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("hookline: {msg}");
    ExitCode::from(code)
}

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (the Rust bindings do not name it); the test
/// below checks the index against the option's documented default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Allocator settings for a long-running service with a steady churn of short-lived deliveries, applied
/// before the pipeline starts.
///
/// Both allocators hand memory that stays free for a while back to the kernel, and at a steady
/// delivery rate the same memory is soon needed again: every page then costs a fault and the kernel's
/// zeroing of it. A profile of a 300 000-event catch-up put ~9 % of hookline's CPU in page faults and
/// `madvise`, from mimalloc's purge of free pages after 1 s (the delivery tasks are allocated by one
/// thread and freed by others, and librdkafka's fetch buffers come from mimalloc too).
fn tune_allocators() {
    // mimalloc keeps free pages for 10 s before purging (default 1 s); memory an idle or shrinking
    // instance no longer needs is still returned. `MIMALLOC_PURGE_DELAY` in the environment wins.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is a plain store into mimalloc's option table.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) };
    }
}

fn run(args: RunArgs) -> ExitCode {
    tune_allocators();
    let config = match Config::load(args.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => return fail(2, format!("config error: {e}")),
    };
    init_logging(&config);
    hookline::deliver::http::raise_fd_limit();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if config.runtime.worker_threads > 0 {
        rt.worker_threads(config.runtime.worker_threads);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start runtime: {e}")),
    };
    let result = if args.check_config {
        rt.block_on(pipeline::check(&config))
            .map(|summary| println!("{summary}"))
    } else {
        rt.block_on(pipeline::run(config))
    };
    // Blocking tasks that outlived their timeouts (a close against an unreachable broker) must not hold
    // the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ RunError::Config(_)) => fail(2, e),
        Err(e) => fail(1, e),
    }
}

async fn replay_cmd(c: &Config, a: ReplayArgs) -> Result<String, RunError> {
    let (filters, filter_text) = replay::FilterArgs {
        subscription: a.subscription,
        event_type: a.event_type.clone(),
        reason: a.reason.clone(),
        since: a.since.clone(),
        until: a.until.clone(),
    }
    .parse(hookline::clock::now_ms())
    .map_err(|(field, m)| {
        RunError::Config(ConfigError::new(
            format!("--{}", field.replace('_', "-")),
            m,
        ))
    })?;
    let s = replay::replay(
        c,
        replay::ReplayRequest {
            from: a.from,
            to: a.to,
            filters,
            filter_text,
            rate: a.rate,
            limit: a.limit,
            dry_run: a.dry_run,
            group: a.group,
            sample: a.sample,
            id: None,
        },
    )
    .await?;
    Ok(if a.json {
        serde_json::to_string(&s).unwrap_or_default()
    } else {
        s.to_string().trim_end().to_string()
    })
}

/// Runs a store command on a small runtime: prints its output, maps errors to exit codes.
fn with_store<F, Fut>(config: Option<&std::path::Path>, f: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = Result<String, RunError>>,
{
    let config = match Config::load(config, std::env::vars()) {
        Ok(c) => c,
        Err(e) => return fail(2, format!("config error: {e}")),
    };
    init_logging(&config);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start runtime: {e}")),
    };
    let result = rt.block_on(f(config));
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e @ RunError::Config(_)) => fail(2, e),
        Err(e) => fail(1, e),
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    // Colours only for a terminal; files and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn read_stdin() -> Result<Vec<u8>, ExitCode> {
    let mut body = Vec::new();
    std::io::stdin()
        .read_to_end(&mut body)
        .map_err(|e| fail(1, format!("reading stdin: {e}")))?;
    Ok(body)
}

/// What `--secret` holds: an HMAC secret, an Ed25519 signing key, or (verify only) a public key.
enum Key {
    Hmac(SigningKey),
    Ed25519(Ed25519Key),
    Public([u8; 32]),
}

fn key(secret: &str, public_ok: bool) -> Result<Key, ExitCode> {
    let parsed = if secret.starts_with("whsk_") {
        Ed25519Key::parse(secret).map(Key::Ed25519)
    } else if secret.starts_with("whpk_") {
        if !public_ok {
            return Err(fail(
                2,
                "--secret: a public key (whpk_) verifies but cannot sign; give the whsk_ key",
            ));
        }
        parse_public_key(secret).map(Key::Public)
    } else {
        SigningKey::parse(secret).map(Key::Hmac)
    };
    parsed.map_err(|m| fail(2, format!("--secret: {m}")))
}

fn sign_cmd(a: SignArgs) -> ExitCode {
    let k = match key(&a.secret, false) {
        Ok(k) => k,
        Err(c) => return c,
    };
    let body = match read_stdin() {
        Ok(b) => b,
        Err(c) => return c,
    };
    let ts = a.timestamp.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let sig = match &k {
        Key::Hmac(k) => {
            sign::signature_header(std::slice::from_ref(k), [], a.id.as_bytes(), ts, &body)
        }
        Key::Ed25519(k) => {
            sign::signature_header([], std::slice::from_ref(k), a.id.as_bytes(), ts, &body)
        }
        Key::Public(_) => return fail(2, "--secret: a public key cannot sign"),
    };
    println!("{}", String::from_utf8_lossy(sig.as_bytes()));
    ExitCode::SUCCESS
}

fn keygen_cmd() -> ExitCode {
    let made = generate_signing_key().and_then(|k| Ed25519Key::parse(&k).map(|p| (k, p)));
    match made {
        Ok((secret, pair)) => {
            println!(
                "{}",
                serde_json::json!({"signing_key": secret, "public_key": pair.public_key()})
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

fn verify_cmd(a: VerifyArgs) -> ExitCode {
    let k = match key(&a.secret, true) {
        Ok(k) => k,
        Err(c) => return c,
    };
    let body = match read_stdin() {
        Ok(b) => b,
        Err(c) => return c,
    };
    if let Some(tol) = a.tolerance {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if now.abs_diff(a.timestamp) > tol {
            println!("invalid: timestamp outside tolerance");
            return ExitCode::from(1);
        }
    }
    let (id, ts, sig) = (a.id.as_bytes(), a.timestamp, a.signature.as_str());
    let valid = match &k {
        Key::Hmac(k) => sign::verify(k, id, ts, sig, &body),
        Key::Ed25519(k) => match parse_public_key(&k.public_key()) {
            Ok(p) => sign::verify_v1a(&p, id, ts, sig, &body),
            Err(_) => false,
        },
        Key::Public(p) => sign::verify_v1a(p, id, ts, sig, &body),
    };
    if valid {
        println!("valid");
        ExitCode::SUCCESS
    } else {
        println!("invalid");
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn purge_delay_option_index_names_the_purge_delay() {
        // SAFETY: reading an option is a plain load from mimalloc's option table.
        let got = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        let want = std::env::var("MIMALLOC_PURGE_DELAY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        assert_eq!(
            got, want,
            "index 15 is not mimalloc's purge_delay (default 1000 ms)"
        );
    }
}
