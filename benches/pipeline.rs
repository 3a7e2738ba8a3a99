//! End-to-end benchmark: an Apache Kafka 4 broker (scripts/kafka/broker), a lean HTTP receiver (in this process) and the hookline release
//! binary (its own process, measured through /proc). Prints one JSON line per mode.
//!
//!   cargo bench --bench pipeline -- [--events N] [--subs M] [--matching K] [--partitions P]
//!                                   [--rate R] [--seconds S] [--mode throughput|latency|both]
//!                                   [--pairs N] [--compare-bin PATH] [--compare-config TOML]
//!                                   [--endpoints E] [--event-bytes B] [--threads T] [--config TOML]
//!                                   [--store sqlite|yaml] [--ordered-keys N]
//!
//! throughput: N events are produced before hookline starts; each matches K of the M subscriptions
//!   (the rest are on other event types). Reports deliveries/s, hookline CPU-seconds per 1 000 deliveries
//!   and deliveries per hookline CPU-second (utime+stime from /proc/<pid>/stat between the first and the
//!   last delivery), and peak RSS (VmHWM). Beside each hookline run, in alternation (A B A B, `--pairs`
//!   pairs, each run its own consumer group over the same pre-produced events, same broker, same
//!   receiver), a **bare loop**: this binary re-run as a child process (`--bare-loop`) that does the least
//!   a correct Kafka-to-webhook service must do — rdkafka consumer → JSON parse of id/type →
//!   HMAC-SHA256 signature → HTTP/1.1 keep-alive POST (hyper's connection API, no pooling layer), concurrent, committing only the lowest
//!   unfinished offset of each partition. Its CPU is measured the same way; the ratio is hookline's
//!   deliveries per CPU-second over the bare loop's (median of the pairs). With `--compare-bin PATH`,
//!   each pair also runs that hookline build (A C B), and `ratio_to_compare_bin` is this build's
//!   deliveries per CPU-second over it (median of the pairs): before/after figures from one run. With
//!   `--compare-config TOML` (`\n` for newlines) and no `--compare-bin`, the compared run is this build
//!   with that config appended, e.g. `'[receipts]\nenabled = true'`: the cost of a feature in one run.
//!   Scale knobs: `--endpoints E` spreads the events over E receivers (each its own port, so its own
//!   connection pool; event k goes to endpoint k mod E), `--matching K` is the fan-out (K subscriptions
//!   per endpoint match each event), `--subs M` the cached subscriptions (the rest on other types),
//!   `--event-bytes B` the event size, `--threads T` hookline's `[runtime] worker_threads` (and the bare
//!   loop's), `--config TOML` extra config for every hookline run. The bare loop does the same work
//!   (K signed POSTs per event to the event's endpoint). `--store sqlite` (the default) runs hookline on
//!   an SQLite store with the attempt log on (one row per attempt, written in batches; rows written and
//!   dropped are reported), `--store yaml` on a read-only YAML file (no attempt log). `--ordered-keys N`
//!   makes the matching subscriptions ordered (`ordering: key`, `ordering_key: data.key`, event k's key
//!   k mod N): the bare loop stays unordered, so its ratio shows what ordered delivery costs.
//! latency: events produced at R/s for S seconds while hookline runs, to a topic whose records carry the
//!   broker's append time (LogAppendTime); a bare consumer beside hookline learns each event's append
//!   time and the receiver records when it arrived. Reports append → received p50/p99/max (the target),
//!   the bare consumer's append → consumed, and both from the producer's own clock (each event carries
//!   its produce time), which adds the producer's queueing.

#[path = "../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Broker, Hookline, Record, base_config, sub};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};

struct Args {
    events: usize,
    subs: usize,
    matching: usize,
    partitions: i32,
    rate: usize,
    seconds: u64,
    mode: String,
    pairs: usize,
    /// Another hookline build, run beside this one in each pair (before/after comparisons).
    compare_bin: Option<String>,
    /// Extra config (TOML) for the compared run: with it and without `--compare-bin`, this build is
    /// compared with itself under that config (e.g. `[receipts] enabled = true`).
    compare_config: Option<String>,
    /// Distinct receivers (ports); event k goes to endpoint k mod `endpoints`.
    endpoints: usize,
    /// Event size in bytes (0: ~260 B, the historic default).
    event_bytes: usize,
    /// hookline's `[runtime] worker_threads` and the bare loop's threads (0: one per CPU).
    threads: usize,
    /// Extra config (TOML) for every hookline run.
    config: String,
    /// `sqlite` (attempt log on) or `yaml` (read-only, no attempt log).
    store: String,
    /// With N > 0, the matching subscriptions are ordered (`ordering: key`) by `data.key`, which
    /// event k carries as k mod N (ordered delivery's cost per delivery).
    ordered_keys: usize,
}

fn args() -> Args {
    let mut a = Args {
        events: 100_000,
        subs: 10,
        matching: 1,
        partitions: 4,
        rate: 2000,
        seconds: 10,
        mode: "both".into(),
        pairs: 2,
        compare_bin: None,
        compare_config: None,
        endpoints: 1,
        event_bytes: 0,
        threads: 0,
        config: String::new(),
        store: "sqlite".into(),
        ordered_keys: 0,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--events" => a.events = val.parse().expect("--events"),
            "--subs" => a.subs = val.parse().expect("--subs"),
            "--matching" => a.matching = val.parse().expect("--matching"),
            "--partitions" => a.partitions = val.parse().expect("--partitions"),
            "--rate" => a.rate = val.parse().expect("--rate"),
            "--seconds" => a.seconds = val.parse().expect("--seconds"),
            "--mode" => a.mode = val,
            "--pairs" => a.pairs = val.parse().expect("--pairs"),
            "--compare-bin" => a.compare_bin = Some(val),
            "--compare-config" => a.compare_config = Some(val.replace("\\n", "\n")),
            "--endpoints" => a.endpoints = val.parse().expect("--endpoints"),
            "--event-bytes" => a.event_bytes = val.parse().expect("--event-bytes"),
            "--threads" => a.threads = val.parse().expect("--threads"),
            "--config" => a.config = val.replace("\\n", "\n"),
            "--store" => a.store = val,
            "--ordered-keys" => a.ordered_keys = val.parse().expect("--ordered-keys"),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    assert!(a.matching >= 1, "--matching must be at least 1");
    assert!(a.endpoints >= 1, "--endpoints must be at least 1");
    assert!(
        a.store == "sqlite" || a.store == "yaml",
        "--store must be sqlite or yaml"
    );
    // Every endpoint needs its K matching subscriptions.
    a.subs = a.subs.max(a.endpoints * a.matching);
    a
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Counts requests; for bodies carrying `"t":<µs>` records the produce → received latency, and for ids
/// `"l<k>"` when event k was received (joined with the broker's append times afterwards).
#[derive(Default)]
struct Counter {
    n: AtomicU64,
    first_us: AtomicU64,
    last_us: AtomicU64,
    lat_us: std::sync::Mutex<Vec<u64>>,
    received_us: std::sync::Mutex<Vec<(u64, u64)>>,
}

async fn serve(counter: Arc<Counter>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let c = counter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let c = c.clone();
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let now = now_us();
                        if let Some(pos) = memchr_t(&body) {
                            let digits: &[u8] = &body[pos..];
                            let end = digits
                                .iter()
                                .position(|b| !b.is_ascii_digit())
                                .unwrap_or(digits.len());
                            if let Ok(t) = std::str::from_utf8(&digits[..end])
                                .unwrap_or("x")
                                .parse::<u64>()
                            {
                                c.lat_us.lock().unwrap().push(now.saturating_sub(t));
                            }
                        }
                        if let Some(k) = number_after(&body, b"\"id\":\"l") {
                            c.received_us.lock().unwrap().push((k, now));
                        }
                        if c.n.fetch_add(1, Ordering::Relaxed) == 0 {
                            c.first_us.store(now, Ordering::Relaxed);
                        }
                        c.last_us.store(now, Ordering::Relaxed);
                        Ok::<_, Infallible>(Response::new(http_body_util::Empty::<
                            hyper::body::Bytes,
                        >::new()))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn memchr_t(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\"t\":").map(|p| p + 4)
}

/// The decimal number right after the first occurrence of `prefix` in `b`.
fn number_after(b: &[u8], prefix: &[u8]) -> Option<u64> {
    let start = b.windows(prefix.len()).position(|w| w == prefix)? + prefix.len();
    let d = &b[start..];
    let end = d
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(d.len());
    std::str::from_utf8(&d[..end]).ok()?.parse().ok()
}

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Subscription `j * K + c` (c < K) is copy c on endpoint j, on type `bench.e<j>`; the rest are on
/// types no event has.
fn subscriptions(a: &Args, urls: &[String]) -> Vec<serde_json::Value> {
    (0..a.subs)
        .map(|i| {
            let (ty, url) = if i < a.endpoints * a.matching {
                let j = i / a.matching;
                (format!("bench.e{j}"), urls[j].as_str())
            } else {
                (format!("other.type{i}"), urls[0].as_str())
            };
            let mut s = sub(i as u32 + 1, url, &[&ty]);
            s["max_in_flight"] = serde_json::json!(ENDPOINT_MAX_IN_FLIGHT);
            if a.ordered_keys > 0 {
                s["ordering"] = serde_json::json!("key");
                s["ordering_key"] = serde_json::json!("data.key");
            }
            s
        })
        .collect()
}

/// The `[store]` section for one hookline run in `dir`: a YAML file, or a copy of the SQLite file
/// `template` (migrated and imported once by `hookline` itself).
fn store_for_run(
    a: &Args,
    dir: &std::path::Path,
    subs: &[serde_json::Value],
    template: Option<&std::path::Path>,
) -> String {
    match template {
        Some(t) if a.store == "sqlite" => {
            let db = dir.join("bench.db");
            std::fs::copy(t, &db).expect("copy the SQLite template");
            format!("[store]\nkind = \"sqlite\"\npath = \"{}\"\n", db.display())
        }
        _ => common::yaml_store(dir, subs),
    }
}

/// An SQLite file holding `subs`, made with `hookline migrate` and `hookline subscriptions import`.
fn sqlite_template(dir: &std::path::Path, subs: &[serde_json::Value]) -> std::path::PathBuf {
    let db = dir.join("template.db");
    let yaml = dir.join("subs.yaml");
    std::fs::write(&yaml, serde_yaml_ng::to_string(subs).unwrap()).unwrap();
    let cfg = dir.join("cli.toml");
    std::fs::write(
        &cfg,
        format!(
            "[kafka]\n\"bootstrap.servers\" = \"127.0.0.1:1\"\n[source]\ntopics = [\"bench\"]\n[delivery]\nallow_networks = [\"127.0.0.0/8\"]\n[store]\nkind = \"sqlite\"\npath = \"{}\"\n",
            db.display()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    for args in [
        vec!["migrate", "--config", c],
        vec![
            "subscriptions",
            "import",
            yaml.to_str().unwrap(),
            "--config",
            c,
        ],
    ] {
        let r = common::hookline_cli(&args, &[]);
        assert_eq!(r.code, 0, "hookline {args:?}: {}", r.all());
    }
    db
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    format!(
        "{} cpus, {cpu}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}

async fn throughput(a: &Args) -> serde_json::Value {
    let broker = Broker::start();
    broker.create_topic("bench", a.partitions);
    let counter = Arc::new(Counter::default());
    let mut urls = Vec::new();
    for _ in 0..a.endpoints {
        let addr = serve(counter.clone()).await;
        urls.push(format!("http://{addr}/hook"));
    }
    let subs = subscriptions(a, &urls);
    let work = tempfile::tempdir().unwrap();
    let template = (a.store == "sqlite").then(|| sqlite_template(work.path(), &subs));
    // Pre-produce, in chunks of at most ~32 MiB, events of `--event-bytes` (default ~260 B).
    let skeleton = r#"{"id":"b000000","type":"bench.e0","data":{"k":000000,"pad":""}}"#.len();
    let pad = "x".repeat(if a.event_bytes == 0 {
        200
    } else {
        a.event_bytes.saturating_sub(skeleton)
    });
    let chunk = (32 << 20) / (pad.len() + skeleton);
    let mut i = 0;
    while i < a.events {
        let n = (a.events - i).min(chunk.clamp(1, 20_000));
        let recs: Vec<Record> = (i..i + n)
            .map(|k| {
                let mut data = serde_json::json!({"k": k, "pad": pad});
                if a.ordered_keys > 0 {
                    data["key"] = serde_json::json!(k % a.ordered_keys);
                }
                Record::json(
                    (k % a.partitions as usize) as i32,
                    serde_json::json!({"id": format!("b{k}"), "type": format!("bench.e{}", k % a.endpoints), "data": data}),
                )
            })
            .collect();
        broker.produce("bench", &recs).await;
        i += n;
    }
    let expected = (a.events * a.matching) as u64;
    let threads = if a.threads > 0 {
        format!("[runtime]\nworker_threads = {}\n", a.threads)
    } else {
        String::new()
    };
    let (mut hook, mut bare, mut other) = (Vec::new(), Vec::new(), Vec::new());
    let mut attempt_rows = (0.0, 0.0);
    for pair in 0..a.pairs {
        // A: hookline, its own consumer group over the same events; C: the build to compare with.
        let compared = a.compare_bin.is_some() || a.compare_config.is_some();
        let builds = std::iter::once((None, false))
            .chain(compared.then_some((a.compare_bin.as_ref(), true)));
        for (k, (bin, is_compare)) in builds.enumerate() {
            counter.n.store(0, Ordering::Relaxed);
            let dir = tempfile::tempdir().unwrap();
            let cfg = base_config(&broker, &["bench"], &format!("bench-h{pair}-{k}"))
                .replace("level = \"info\"", "level = \"warn\"")
                // A pre-produced backlog for one endpoint: the benchmark measures straight delivery
                // at a bound of 2 000 records in flight per partition (the bare loop gets the same).
                .replace(
                    "[source]\n",
                    &format!("[source]\nmax_in_flight_per_partition = {BOUND_PER_PARTITION}\n"),
                );
            assert!(
                cfg.contains("max_in_flight_per_partition"),
                "source bound not set"
            );
            let cfg = format!("{cfg}{threads}{}\n", a.config);
            let cfg = match (&a.compare_config, is_compare) {
                (Some(extra), true) => format!("{cfg}{extra}\n"),
                _ => cfg,
            };
            let env: Vec<(&str, &str)> = bin.iter().map(|b| ("HOOKLINE_BIN", b.as_str())).collect();
            let store = store_for_run(a, dir.path(), &subs, template.as_deref());
            let mut h = Hookline::start_with_store(dir.path(), &cfg, &store, None, &env);
            let f = measure(h_pid(&h), &counter, expected, || h.log()).await;
            if !is_compare && a.store == "sqlite" {
                // The attempt log writes in batches behind the deliveries: let it drain.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let m = common::http()
                        .get(format!("http://{}/metrics", h.admin))
                        .send()
                        .await
                        .expect("metrics")
                        .text()
                        .await
                        .unwrap_or_default();
                    let written = common::metric_value(&m, "hookline_attempt_log_written_total");
                    let dropped = common::metric_value(&m, "hookline_attempt_log_dropped_total");
                    if written + dropped >= expected as f64 || Instant::now() > deadline {
                        attempt_rows.0 += written;
                        attempt_rows.1 += dropped;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            h.kill9();
            if is_compare {
                other.push(f);
            } else {
                hook.push(f);
            }
        }
        // B: the bare loop, the same deliveries to the same receivers.
        counter.n.store(0, Ordering::Relaxed);
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--bare-loop",
                &broker.bootstrap(),
                "bench",
                &format!("bench-b{pair}"),
                &urls.join(","),
                &a.events.to_string(),
                &(BOUND_PER_PARTITION * a.partitions as usize).to_string(),
                &a.matching.to_string(),
                &a.threads.to_string(),
            ])
            .spawn()
            .expect("bare loop process");
        let f = measure(child.id(), &counter, expected, || {
            "bare loop (no log)".into()
        })
        .await;
        let _ = child.kill();
        let _ = child.wait();
        bare.push(f);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let hook_per_cpu_s = median(hook.iter().map(|f| f.per_cpu_s).collect());
    let ratios: Vec<f64> = hook
        .iter()
        .zip(&bare)
        .map(|(h, b)| h.per_cpu_s / b.per_cpu_s)
        .collect();
    let runs: Vec<serde_json::Value> = hook
        .iter()
        .zip(&bare)
        .enumerate()
        .map(|(i, (h, b))| serde_json::json!({"hookline_per_cpu_s": h.per_cpu_s.round(), "bare_loop_per_cpu_s": b.per_cpu_s.round(), "hookline_per_s": h.per_s.round(), "bare_loop_per_s": b.per_s.round(), "compare_bin_per_cpu_s": other.get(i).map(|o| o.per_cpu_s.round())}))
        .collect();
    let compare = (!other.is_empty()).then(|| {
        let ratios: Vec<f64> = hook
            .iter()
            .zip(&other)
            .map(|(h, o)| h.per_cpu_s / o.per_cpu_s)
            .collect();
        serde_json::json!({
            "bin": a.compare_bin,
            "config": a.compare_config,
            "deliveries_per_cpu_s": median(other.iter().map(|f| f.per_cpu_s).collect()).round(),
            "ratio_to_compare_bin": (median(ratios) * 1000.0).round() / 1000.0,
        })
    });
    serde_json::json!({
        "mode": "throughput",
        "events": a.events, "subscriptions": a.subs, "matching_per_event": a.matching, "partitions": a.partitions,
        "endpoints": a.endpoints, "event_bytes": pad.len() + skeleton, "threads": a.threads, "store": a.store,
        "extra_config": a.config,
        "deliveries": expected,
        "attempt_rows_written": attempt_rows.0, "attempt_rows_dropped": attempt_rows.1,
        "rss_at_first_delivery_mib": hook.iter().map(|f| f.first_rss_mib).fold(0.0, f64::max),
        "deliveries_per_s": median(hook.iter().map(|f| f.per_s).collect()).round(),
        "hookline_cpu_s_per_1000_deliveries": (1000.0 / hook_per_cpu_s * 10000.0).round() / 10000.0,
        "deliveries_per_hookline_cpu_s": hook_per_cpu_s.round(),
        "bare_loop_deliveries_per_cpu_s": median(bare.iter().map(|f| f.per_cpu_s).collect()).round(),
        "ratio_to_bare_loop": (median(ratios) * 1000.0).round() / 1000.0,
        "peak_rss_mib": hook.iter().map(|f| f.rss_mib).fold(0.0, f64::max),
        "bare_loop_peak_rss_mib": bare.iter().map(|f| f.rss_mib).fold(0.0, f64::max),
        "runs": runs,
        "compare": compare,
        "machine": machine(),
    })
}

/// Requests out at once per endpoint, for hookline (`max_in_flight`) and the bare loop.
const ENDPOINT_MAX_IN_FLIGHT: usize = 256;

/// Records in flight per partition, for hookline (`source.max_in_flight_per_partition`) and the bare loop.
const BOUND_PER_PARTITION: usize = 2000;

struct Figures {
    /// RSS when the first delivery arrived (subscriptions loaded, little in flight yet).
    first_rss_mib: f64,
    per_s: f64,
    per_cpu_s: f64,
    rss_mib: f64,
}

/// Waits for `expected` requests at the receiver; CPU of `pid` from the first to the last of them.
async fn measure(pid: u32, counter: &Counter, expected: u64, log: impl Fn() -> String) -> Figures {
    let deadline = Instant::now() + Duration::from_secs(600);
    while counter.n.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no delivery; log:\n{}", log());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cpu0 = cpu_seconds(pid);
    let first_rss_mib = (status_kb(pid, "VmRSS:") as f64 / 1024.0).round();
    let t0 = Instant::now();
    let n0 = counter.n.load(Ordering::Relaxed);
    while counter.n.load(Ordering::Relaxed) < expected {
        assert!(
            Instant::now() < deadline,
            "only {} of {expected} deliveries; log:\n{}",
            counter.n.load(Ordering::Relaxed),
            log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let n = (counter.n.load(Ordering::Relaxed) - n0) as f64;
    Figures {
        first_rss_mib,
        per_s: n / wall,
        per_cpu_s: n / cpu,
        rss_mib: (status_kb(pid, "VmHWM:") as f64 / 1024.0).round(),
    }
}

/// The bare loop (see the module docs), run as
/// `--bare-loop BOOTSTRAP TOPIC GROUP URLS EVENTS BOUND FANOUT THREADS` (URLS comma-separated; event
/// type `bench.e<j>` goes to the j-th, FANOUT signed POSTs per event).
fn bare_loop_process(v: &[String]) {
    let [
        bootstrap,
        topic,
        group,
        urls,
        events,
        bound,
        fanout,
        threads,
    ] = v
    else {
        panic!("--bare-loop BOOTSTRAP TOPIC GROUP URLS EVENTS BOUND FANOUT THREADS");
    };
    let (events, bound, fanout, threads): (u64, usize, usize, usize) = (
        events.parse().unwrap(),
        bound.parse().unwrap(),
        fanout.parse().unwrap(),
        threads.parse().unwrap(),
    );
    // As many worker threads as hookline's runtime (default one per core).
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        rt.worker_threads(threads);
    }
    let rt = rt.enable_all().build().unwrap();
    let urls: Vec<&str> = urls.split(',').collect();
    rt.block_on(bare_loop(
        bootstrap, topic, group, &urls, events, bound, fanout,
    ));
}

async fn bare_loop(
    bootstrap: &str,
    topic: &str,
    group: &str,
    urls: &[&str],
    events: u64,
    bound: usize,
    fanout: usize,
) {
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    use std::collections::{BTreeSet, HashMap};

    #[derive(serde::Deserialize)]
    struct Ev<'a> {
        #[serde(borrow)]
        id: &'a str,
        #[serde(rename = "type", borrow)]
        ty: &'a str,
    }
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", "200")
        .set("queued.max.messages.kbytes", "16384")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let consumer = Arc::new(consumer);
    // Per endpoint: its connections, and requests out at once (hookline's subscriptions here allow
    // 256 each, FANOUT of them per endpoint).
    let pools: Arc<Vec<(Pool, tokio::sync::Semaphore)>> = Arc::new(
        urls.iter()
            .map(|u| {
                (
                    Pool::new(u),
                    tokio::sync::Semaphore::new(ENDPOINT_MAX_IN_FLIGHT * fanout),
                )
            })
            .collect(),
    );
    let key = hmac::Hmac::<sha2::Sha256>::new_from_slice(&[7u8; 32]).unwrap();
    // Per partition: offsets not yet finished, and the next offset after the highest seen.
    type Offsets = Arc<std::sync::Mutex<HashMap<i32, (BTreeSet<i64>, i64)>>>;
    let offsets: Offsets = Arc::default();
    let permits = Arc::new(tokio::sync::Semaphore::new(bound));
    let done = Arc::new(AtomicU64::new(0));
    {
        // Commit the lowest unfinished offset of each partition (or the next one when all finished).
        let (offsets, consumer, topic) = (offsets.clone(), consumer.clone(), topic.to_string());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let marks: Vec<(i32, i64)> = offsets
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(p, (open, next))| (*p, open.first().copied().unwrap_or(*next)))
                    .collect();
                for (p, o) in marks {
                    let _ = consumer.store_offset(&topic, p, o);
                }
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while done.load(Ordering::Relaxed) < events && Instant::now() < deadline {
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await
        else {
            continue;
        };
        let Some(payload) = m.payload() else { continue };
        let body = bytes::Bytes::copy_from_slice(payload);
        let (p, o) = (m.partition(), m.offset());
        {
            let mut g = offsets.lock().unwrap();
            let e = g.entry(p).or_insert_with(|| (BTreeSet::new(), o));
            e.0.insert(o);
            e.1 = e.1.max(o + 1);
        }
        let permit = permits.clone().acquire_owned().await.unwrap();
        let (pools, key, offsets, done) =
            (pools.clone(), key.clone(), offsets.clone(), done.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Ok(ev) = serde_json::from_slice::<Ev>(&body) {
                let j: usize = ev
                    .ty
                    .strip_prefix("bench.e")
                    .and_then(|j| j.parse().ok())
                    .unwrap_or(0);
                let (pool, requests) = &pools[j.min(pools.len() - 1)];
                for _ in 0..fanout {
                    let _request = requests.acquire().await;
                    let ts = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap()
                        .as_secs()
                        .to_string();
                    let mut mac = key.clone();
                    mac.update(ev.id.as_bytes());
                    mac.update(b".");
                    mac.update(ts.as_bytes());
                    mac.update(b".");
                    mac.update(&body);
                    let sig = format!(
                        "v1,{}",
                        base64::engine::general_purpose::STANDARD
                            .encode(mac.finalize().into_bytes())
                    );
                    let req = Request::post(pool.path.as_str())
                        .header(hyper::header::HOST, pool.host.as_str())
                        .header(hyper::header::CONTENT_TYPE, "application/json")
                        .header("webhook-id", ev.id)
                        .header("webhook-timestamp", ts)
                        .header("webhook-signature", sig)
                        .body(http_body_util::Full::new(body.clone()))
                        .unwrap();
                    let _ = pool.send(req).await;
                }
            }
            offsets.lock().unwrap().get_mut(&p).map(|e| e.0.remove(&o));
            done.fetch_add(1, Ordering::Relaxed);
        });
    }
}

/// The bare loop's HTTP/1.1 keep-alive client: hyper's connection API directly (no pooling layer), a
/// stack of idle connections, a new one when none is idle (at most `ENDPOINT_MAX_IN_FLIGHT`, bounded by
/// the caller's semaphore). A connection is returned after its response body is read; one that fails is
/// dropped.
struct Pool {
    addr: String,
    host: String,
    path: String,
    idle: std::sync::Mutex<
        Vec<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>>,
    >,
}

impl Pool {
    fn new(url: &str) -> Pool {
        let rest = url.strip_prefix("http://").expect("http:// URL");
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        Pool {
            addr: host.to_string(),
            host: host.to_string(),
            path: format!("/{path}"),
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    async fn send(
        &self,
        req: Request<http_body_util::Full<bytes::Bytes>>,
    ) -> Result<u16, Box<dyn std::error::Error + Send + Sync>> {
        let idle = self.idle.lock().unwrap().pop();
        let mut conn = match idle {
            Some(c) => c,
            None => {
                let tcp = tokio::net::TcpStream::connect(&self.addr).await?;
                tcp.set_nodelay(true)?;
                let (send, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                        .await?;
                tokio::spawn(conn);
                send
            }
        };
        conn.ready().await?;
        let resp = conn.send_request(req).await?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        if (200..300).contains(&status) {
            self.idle.lock().unwrap().push(conn);
        }
        Ok(status)
    }
}

fn h_pid(h: &Hookline) -> u32 {
    h.pid()
}

async fn latency(a: &Args) -> serde_json::Value {
    assert_eq!(a.endpoints, 1, "latency mode measures one endpoint");
    let broker = Broker::start();
    // The broker stamps each record with its append time: the target is append → received, so the
    // producer's own queueing (linger, batching, its connection) is not counted against hookline.
    broker.create_topic_with(
        "bench",
        a.partitions,
        &[("message.timestamp.type", "LogAppendTime")],
    );
    let counter = Arc::new(Counter::default());
    let addr = serve(counter.clone()).await;
    let url = format!("http://{addr}/hook");
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(&broker, &["bench"], "bench-lat")
        .replace("level = \"info\"", "level = \"warn\"");
    let threads = if a.threads > 0 {
        format!("[runtime]\nworker_threads = {}\n", a.threads)
    } else {
        String::new()
    };
    let cfg = format!("{cfg}{threads}{}\n", a.config);
    let subs = subscriptions(a, std::slice::from_ref(&url));
    let template = (a.store == "sqlite").then(|| sqlite_template(dir.path(), &subs));
    let store = store_for_run(a, dir.path(), &subs, template.as_deref());
    let mut h = Hookline::start_with_store(dir.path(), &cfg, &store, None, &[]);
    h.wait_ready(Duration::from_secs(30)).await;
    let pid = h.pid();
    // Warm up the connection pool and the consumer fetch path.
    broker
        .produce(
            "bench",
            &[Record::json(
                0,
                serde_json::json!({"id": "warm", "type": "bench.e0"}),
            )],
        )
        .await;
    while counter.n.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    counter.lat_us.lock().unwrap().clear();
    // Baseline: a bare consumer (own group, same fetch settings) measuring produce → consumed, i.e. what
    // the broker and librdkafka cost before hookline does anything.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let baseline = {
        let (bootstrap, stop) = (broker.bootstrap(), stop.clone());
        std::thread::spawn(move || {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            use rdkafka::message::Message;
            let mut cfg = rdkafka::ClientConfig::new();
            cfg.set("bootstrap.servers", &bootstrap)
                .set("group.id", "bench-baseline")
                .set("auto.offset.reset", "latest");
            if let Ok(w) = std::env::var("HOOKLINE_KAFKA__FETCH_WAIT_MAX_MS") {
                cfg.set("fetch.wait.max.ms", w);
            }
            let c: BaseConsumer = cfg.create().unwrap();
            c.subscribe(&["bench"]).unwrap();
            let mut lat = Vec::new();
            // (event k, broker append time in ms, consumed here in µs)
            let mut appended: Vec<(u64, u64, u64)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(100))
                    && let Some(body) = m.payload()
                {
                    let now = now_us();
                    if let (Some(k), Some(at)) =
                        (number_after(body, b"\"id\":\"l"), m.timestamp().to_millis())
                    {
                        appended.push((k, at.max(0) as u64, now));
                    }
                    let Some(pos) = memchr_t(body) else {
                        continue;
                    };
                    let d = &body[pos..];
                    let end = d
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .unwrap_or(d.len());
                    if let Ok(t) = std::str::from_utf8(&d[..end]).unwrap_or("x").parse::<u64>() {
                        lat.push(now.saturating_sub(t));
                    }
                }
            }
            (lat, appended)
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await; // let the baseline consumer join
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("linger.ms", "2")
        .create()
        .unwrap();
    // Warm the producer up (connection, metadata) with one acknowledged record of each partition
    // before the timed phase: a cold producer's first records queue behind its connection set-up and,
    // measured here, every later record then stayed 0.4-3 s behind its timestamp (a producer-side
    // backlog, not the broker or the consumers: both consumers saw the same offset). Those records are
    // not events (no "t"), so they do not count.
    for p in 0..a.partitions {
        let rec = rdkafka::producer::FutureRecord::<(), str>::to("bench")
            .payload(r#"{"id":"warm-producer","type":"other.event"}"#)
            .partition(p);
        producer
            .send(rec, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("warm-up produce");
    }
    let total = a.rate * a.seconds as usize;
    let start = Instant::now();
    let cpu0 = cpu_seconds(pid);
    let mut futs = Vec::new();
    for k in 0..total {
        let due = start + Duration::from_secs_f64(k as f64 / a.rate as f64);
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(w).await;
        }
        let v = format!(
            r#"{{"id":"l{k}","type":"bench.e0","data":{{"t":{}}}}}"#,
            now_us()
        );
        let p = (k % a.partitions as usize) as i32;
        let rec = rdkafka::producer::FutureRecord::<(), str>::to("bench")
            .payload(&v)
            .partition(p);
        futs.push(producer.send_result(rec).expect("queue"));
    }
    for f in futs {
        let _ = f.await;
    }
    let expected = (total * a.matching) as u64 + a.matching as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter.n.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = cpu_seconds(pid) - cpu0;
    let rss_kb = status_kb(pid, "VmHWM:");
    h.kill9();
    stop.store(true, Ordering::Relaxed);
    let (mut base, appended) = baseline.join().unwrap();
    base.sort_unstable();
    let mut l = counter.lat_us.lock().unwrap().clone();
    l.sort_unstable();
    // Append → received / consumed. Append times are whole milliseconds (truncated), so these read up
    // to 1 ms high.
    let append_ms: std::collections::HashMap<u64, u64> =
        appended.iter().map(|(k, at, _)| (*k, *at)).collect();
    let mut from_append: Vec<u64> = counter
        .received_us
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(k, at)| Some(at.saturating_sub(append_ms.get(k)? * 1000)))
        .collect();
    from_append.sort_unstable();
    let mut base_from_append: Vec<u64> = appended
        .iter()
        .map(|(_, at, seen)| seen.saturating_sub(at * 1000))
        .collect();
    base_from_append.sort_unstable();
    let pct_of = |l: &[u64], p: f64| {
        if l.is_empty() {
            0.0
        } else {
            l[((l.len() as f64 * p) as usize).min(l.len() - 1)] as f64 / 1000.0
        }
    };
    let pct = |p: f64| pct_of(&l, p);
    serde_json::json!({
        "mode": "latency",
        "rate_per_s": a.rate, "seconds": a.seconds, "partitions": a.partitions, "matching_per_event": a.matching,
        "store": a.store, "threads": a.threads, "extra_config": a.config,
        "received": l.len(), "expected": total * a.matching, "measured_from_append": from_append.len(),
        "p50_ms": pct_of(&from_append, 0.50), "p99_ms": pct_of(&from_append, 0.99),
        "max_ms": from_append.last().map_or(0.0, |m| *m as f64 / 1000.0),
        "baseline_consumer_received": base.len(),
        "baseline_consumer_p50_ms": pct_of(&base_from_append, 0.50),
        "baseline_consumer_p99_ms": pct_of(&base_from_append, 0.99),
        "produce_to_received_p50_ms": pct(0.50), "produce_to_received_p99_ms": pct(0.99),
        "baseline_consumer_produce_to_consumed_p50_ms": pct_of(&base, 0.50),
        "baseline_consumer_produce_to_consumed_p99_ms": pct_of(&base, 0.99),
        "hookline_cpu_s": (cpu * 100.0).round() / 100.0,
        "peak_rss_mib": (rss_kb as f64 / 1024.0).round(),
        "machine": machine(),
    })
}

fn main() {
    let v: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = v.iter().position(|x| x == "--bare-loop") {
        bare_loop_process(&v[i + 1..]);
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
}

async fn bench() {
    let a = args();
    if a.mode == "throughput" || a.mode == "both" {
        println!("{}", throughput(&a).await);
    }
    if a.mode == "latency" || a.mode == "both" {
        println!("{}", latency(&a).await);
    }
}
