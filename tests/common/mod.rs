//! Test harness: a real Apache Kafka 4 broker process, real HTTP receivers on 127.0.0.1, and hookline run as its
//! own process (the binary under test), exactly as an operator would run it.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::atomic::{AtomicBool, Ordering};

pub mod cassandra;
pub mod dns;
pub mod oauth;
pub mod phases;
pub mod proxy;
pub mod tls;

/// An HTTP client for talking to hookline's admin server.
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn wait_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("port {port} did not open within {timeout:?}");
}

fn signal(child: &Child, sig: i32) {
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Spawns `cmd` so that the child is killed when this test process ends, however it ends (a shared
/// broker is a `static` and never dropped): PR_SET_PDEATHSIG fires when the *thread* that forked the
/// child exits, so the fork happens on a thread that parks until the process exits.
fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: prctl is async-signal-safe and only changes the child's own death signal.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let _ = tx.send(cmd.spawn());
        loop {
            std::thread::park();
        }
    });
    rx.recv().expect("spawner thread")
}

/// Where broker directories live: one per broker, named after this process, so that a later run can
/// remove those of processes that are gone (a shared broker's directory is never dropped).
fn broker_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let root = std::env::temp_dir().join("hookline-test-kafka");
    std::fs::create_dir_all(&root).unwrap();
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid: i32 = name
                .split('-')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            // SAFETY: signal 0 only checks that the process exists.
            if pid > 0 && unsafe { libc::kill(pid, 0) } != 0 {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = root.join(format!("{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A single-node Apache Kafka 4 broker (KRaft, broker and controller in one JVM) started by
/// `scripts/kafka/broker run` in a directory of its own, on free ports.
///
/// Most tests share one broker per test binary ([`Broker::shared`]) with unique topics and groups; a
/// test that stops, kills or cuts off the broker starts its own ([`Broker::start`]).
pub struct Broker {
    host: String,
    pub port: u16,
    controller_port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
    producer: std::sync::OnceLock<FutureProducer>,
}

impl Broker {
    /// A broker of this test's own (stopped and its directory removed when dropped).
    pub fn start() -> Broker {
        Self::start_on("127.0.0.1")
    }

    /// A broker of this test's own whose client listener is on `host` (an address of this machine,
    /// e.g. the host end of a [`NetNs`]: reachable from the namespace and from the host).
    pub fn start_on(host: &str) -> Broker {
        let b = Broker {
            host: host.to_string(),
            port: free_port(),
            controller_port: free_port(),
            dir: broker_dir(),
            child: Mutex::new(None),
            producer: std::sync::OnceLock::new(),
        };
        b.spawn();
        b
    }

    /// The broker shared by every test of this test binary, started on first use. When a test fails,
    /// the tail of its log is printed beside the panic.
    pub fn shared() -> &'static Broker {
        static SHARED: std::sync::OnceLock<Broker> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let b = Broker::start();
            let log = b.dir.join("server.log");
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                default(info);
                eprintln!(
                    "--- shared broker log ({}), last lines ---\n{}",
                    log.display(),
                    tail(&log, 40)
                );
            }));
            b
        })
    }

    fn spawn(&self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))
            .unwrap();
        let mut cmd = Command::new(repo_root().join("scripts/kafka/broker"));
        cmd.args([
            "run".to_string(),
            self.dir.display().to_string(),
            self.port.to_string(),
            self.controller_port.to_string(),
        ])
        .env("KAFKA_HOST", &self.host)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
        let mut child = spawn_tied(cmd).expect("start scripts/kafka/broker");
        // Ready = it answers a metadata request (the port opens before the broker can serve).
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("log_level", "0")
            .create()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the Kafka broker exited at start ({status}):\n{}\n{}",
                    tail(&self.dir.join("stdout.log"), 30),
                    tail(&self.dir.join("server.log"), 30)
                );
            }
            if let Ok(md) = probe.fetch_metadata(None, Duration::from_millis(500))
                && !md.brokers().is_empty()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Kafka broker did not answer within 90 s:\n{}",
                tail(&self.dir.join("server.log"), 30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        *self.child.lock().unwrap() = Some(child);
    }

    /// The broker's own log (log4j file).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn bootstrap(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The broker JVM's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(|c| c.id())
    }

    /// Stops the broker with `sig` (SIGTERM: then SIGKILL after 20 s) and leaves it down.
    pub fn stop(&self, sig: i32) {
        let child = self.child.lock().unwrap().take();
        if let Some(mut c) = child {
            signal(&c, sig);
            wait_child(&mut c, Duration::from_secs(20));
        }
    }

    /// Starts a stopped broker again on the same ports and data.
    pub fn start_again(&self) {
        assert!(self.child.lock().unwrap().is_none(), "broker still running");
        self.spawn();
    }

    /// Stops the broker (SIGTERM, then SIGKILL after 20 s) and starts it again on the same ports and data.
    pub fn restart(&self) {
        self.stop(libc::SIGTERM);
        self.spawn();
    }

    /// Creates a topic named `base` plus a unique suffix (tests share a broker) and returns its name.
    pub fn topic(&self, base: &str, partitions: i32) -> String {
        let name = format!("{base}-{}", rand_suffix());
        self.create_topic(&name, partitions);
        name
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with(name, partitions, &[]);
    }

    /// A topic with topic-level settings, e.g. `("message.timestamp.type", "LogAppendTime")`.
    pub fn create_topic_with(&self, name: &str, partitions: i32, settings: &[(&str, &str)]) {
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (k, v) in settings {
            topic = topic.set(k, v);
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .unwrap();
        // Callable from sync and async tests alike: its own runtime on its own thread.
        let res = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(admin.create_topics(
                    &[topic],
                    &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
                ))
            })
            .join()
            .unwrap()
        })
        .unwrap();
        for r in res {
            r.unwrap();
        }
    }

    /// Produces records and waits for every acknowledgement.
    pub async fn produce(&self, topic: &str, records: &[Record]) {
        let p = self.producer.get_or_init(|| {
            ClientConfig::new()
                .set("bootstrap.servers", self.bootstrap())
                .set("linger.ms", "5")
                .set("message.max.bytes", "33554432")
                .set("enable.idempotence", "true")
                .create()
                .unwrap()
        });
        let mut futs = Vec::with_capacity(records.len());
        for r in records {
            let mut hs = OwnedHeaders::new();
            for (k, v) in &r.headers {
                hs = hs.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let mut fr = FutureRecord::<[u8], [u8]>::to(topic)
                .payload(&r.value)
                .headers(hs);
            if let Some(p) = r.partition {
                fr = fr.partition(p);
            }
            if let Some(k) = &r.key {
                fr = fr.key(k.as_bytes());
            }
            // send_result enqueues now (send() would only enqueue when awaited, one at a time).
            loop {
                match p.send_result(fr) {
                    Ok(f) => {
                        futs.push(f);
                        break;
                    }
                    Err((e, back)) => {
                        assert!(
                            matches!(
                                e,
                                rdkafka::error::KafkaError::MessageProduction(
                                    rdkafka::types::RDKafkaErrorCode::QueueFull
                                )
                            ),
                            "produce: {e}"
                        );
                        fr = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
        for f in futs {
            f.await
                .expect("delivery future cancelled")
                .map_err(|(e, _)| e)
                .expect("produce");
        }
    }

    /// Reads a whole topic (all partitions) from the beginning up to its current end.
    pub fn read_all(&self, topic: &str) -> Vec<ReadRecord> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", format!("reader-{}", rand_suffix()))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let parts: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
        let mut ends = HashMap::new();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in &parts {
            let (lo, hi) = c
                .fetch_watermarks(topic, *p, Duration::from_secs(10))
                .unwrap();
            if hi > lo {
                ends.insert(*p, hi);
                tpl.add_partition_offset(topic, *p, rdkafka::Offset::Offset(lo))
                    .unwrap();
            }
        }
        let mut out = Vec::new();
        if ends.is_empty() {
            return out;
        }
        c.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut done: HashMap<i32, bool> = HashMap::new();
        while done.len() < ends.len() {
            assert!(Instant::now() < deadline, "reading {topic} timed out");
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(ReadRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
                if m.offset() + 1 >= ends[&m.partition()] {
                    done.insert(m.partition(), true);
                }
            }
        }
        out
    }

    /// Waits until `group` has committed everything in `topic`.
    pub async fn wait_committed(&self, group: &str, topic: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.group_lag(group, topic) > 0 {
            assert!(
                Instant::now() < deadline,
                "group {group} did not commit {topic} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sum over partitions of (high watermark - committed offset) for a group.
    pub fn group_lag(&self, group: &str, topic: &str) -> i64 {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition(topic, p.id());
        }
        let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
        let mut lag = 0;
        for e in committed.elements() {
            let (_, hi) = c
                .fetch_watermarks(topic, e.partition(), Duration::from_secs(10))
                .unwrap();
            let off = match e.offset() {
                rdkafka::Offset::Offset(o) => o,
                _ => 0,
            };
            lag += hi - off;
        }
        lag
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- broker log ({}), last lines ---\n{}",
                self.dir.display(),
                tail(&self.dir.join("server.log"), 40)
            );
        }
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_child(c: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn rand_suffix() -> String {
    format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            ^ (std::process::id() as u128) << 64
    )
}

#[derive(Clone, Debug, Default)]
pub struct Record {
    pub partition: Option<i32>,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn json(partition: i32, v: serde_json::Value) -> Record {
        Record {
            partition: Some(partition),
            key: None,
            value: serde_json::to_vec(&v).unwrap(),
            headers: vec![],
        }
    }
    pub fn raw(partition: i32, value: &[u8]) -> Record {
        Record {
            partition: Some(partition),
            key: None,
            value: value.to_vec(),
            headers: vec![],
        }
    }
}

#[derive(Clone, Debug)]
pub struct ReadRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub webhook_id: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
    /// Status the receiver answered with (None while it is still hanging).
    pub status: Option<u16>,
}

/// What a receiver does with a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reply {
    Status(u16),
    /// Answer this status after a delay.
    Delayed(u16, Duration),
    /// Hold the request until [`Receiver::release`], then answer 200.
    Hang,
    /// Answer this status with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// Answer this status with this body.
    Body(u16, &'static str),
}

/// A behaviour that answers `status` to the first `n` requests of each webhook-id, then 200.
pub fn fail_first(n: usize, status: u16) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    let seen: Mutex<HashMap<String, usize>> = Mutex::new(HashMap::new());
    move |r| {
        let mut m = seen.lock().unwrap();
        let c = m.entry(r.webhook_id.clone()).or_insert(0);
        *c += 1;
        if *c <= n {
            Reply::Status(status)
        } else {
            Reply::Status(200)
        }
    }
}

type Behaviour = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

#[derive(Clone)]
struct RecvState {
    log: Arc<Mutex<Vec<Received>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    release: tokio::sync::watch::Receiver<bool>,
}

/// A real HTTP server on 127.0.0.1 recording every request.
pub struct Receiver {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Received>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    release: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Received {
    /// The `type` of the JSON event this request carried ("" when it has none).
    pub fn event_type(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["type"].as_str().map(String::from))
            .unwrap_or_default()
    }
}

impl Receiver {
    pub async fn start(behaviour: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Receiver {
        Self::start_on("127.0.0.1", behaviour).await
    }

    /// A receiver listening on `ip` (an address of this host, e.g. the host end of a [`NetNs`]).
    pub async fn start_on(
        ip: &str,
        behaviour: impl Fn(&Received) -> Reply + Send + Sync + 'static,
    ) -> Receiver {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        Self::serve(listener, addr, behaviour)
    }

    /// A receiver serving whatever connections `listener` accepts (plain TCP, or TLS: [`tls`]).
    fn serve(
        listener: impl axum::serve::Listener<Addr = SocketAddr>,
        addr: SocketAddr,
        behaviour: impl Fn(&Received) -> Reply + Send + Sync + 'static,
    ) -> Receiver {
        let log = Arc::new(Mutex::new(Vec::new()));
        let behaviour: Arc<Mutex<Behaviour>> = Arc::new(Mutex::new(Arc::new(behaviour)));
        let (tx, rx) = tokio::sync::watch::channel(false);
        let state = RecvState {
            log: log.clone(),
            behaviour: behaviour.clone(),
            release: rx,
        };
        let app = axum::Router::new().fallback(handle).with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            addr,
            log,
            behaviour,
            release: tx,
            task,
        }
    }

    pub async fn ok() -> Receiver {
        Receiver::start(|_| Reply::Status(200)).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn set_behaviour(&self, b: impl Fn(&Received) -> Reply + Send + Sync + 'static) {
        *self.behaviour.lock().unwrap() = Arc::new(b);
    }

    /// Lets every hanging request (and every later one that would hang) answer 200.
    pub fn release(&self) {
        let _ = self.release.send(true);
    }

    pub fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    /// Requests answered with a 2xx.
    pub fn acked_ids(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.status.is_some_and(|s| (200..300).contains(&s)))
            .map(|r| r.webhook_id.clone())
            .collect()
    }

    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Requests beyond the first for each webhook-id.
    pub fn duplicates(&self) -> usize {
        let log = self.log.lock().unwrap();
        let distinct: std::collections::HashSet<&str> =
            log.iter().map(|r| r.webhook_id.as_str()).collect();
        log.len() - distinct.len()
    }

    /// Waits until `pred` holds for the log, or panics after `timeout`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Received]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.log.lock().unwrap()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what} (have {} requests)",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the set of acknowledged ids contains all of `ids`.
    pub async fn wait_acked(&self, ids: &std::collections::HashSet<String>, timeout: Duration) {
        let n = ids.len();
        self.wait_for(&format!("{n} acknowledged ids"), timeout, |log| {
            let got: std::collections::HashSet<&str> = log
                .iter()
                .filter(|r| r.status.is_some_and(|s| (200..300).contains(&s)))
                .map(|r| r.webhook_id.as_str())
                .collect();
            ids.iter().all(|i| got.contains(i.as_str()))
        })
        .await;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    State(s): State<RecvState>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let hs: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let rec = Received {
        webhook_id: hs.get("webhook-id").cloned().unwrap_or_default(),
        headers: hs,
        body: body.to_vec(),
        at: Instant::now(),
        status: None,
    };
    let reply = (s.behaviour.lock().unwrap())(&rec);
    let idx = {
        let mut log = s.log.lock().unwrap();
        log.push(rec);
        log.len() - 1
    };
    let mut retry_after = None;
    let mut body = "ok";
    let status = match reply {
        Reply::Status(c) => c,
        Reply::Body(c, b) => {
            body = b;
            c
        }
        Reply::RetryAfter(c, secs) => {
            retry_after = Some(secs.to_string());
            c
        }
        Reply::Delayed(c, d) => {
            tokio::time::sleep(d).await;
            c
        }
        Reply::Hang => {
            let mut rx = s.release.clone();
            let _ = rx.wait_for(|r| *r).await;
            200
        }
    };
    s.log.lock().unwrap()[idx].status = Some(status);
    let code = StatusCode::from_u16(status).unwrap();
    match retry_after {
        Some(ra) => (code, [("retry-after", ra)], body).into_response(),
        None => (code, body).into_response(),
    }
}

/// hookline run as a child process with a generated config.
pub struct Hookline {
    pub admin: SocketAddr,
    pub dir: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    /// Runs hookline inside this network namespace (`ip netns exec`).
    netns: Option<String>,
    child: Option<Child>,
    pub log_path: PathBuf,
}

pub const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const SECRET_B: &str = "whsec_dGhpcyBpcyBhIHNlY29uZCBzZWNyZXQgZm9yIGhvb2tsaW5l";

/// A subscription entry for the YAML store.
pub fn sub(id: u32, url: &str, types: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "id": format!("00000000-0000-4000-8000-{id:012}"),
        "url": url,
        "event_types": types,
        "secrets": [SECRET_A],
    })
}

pub fn sub_id(id: u32) -> String {
    format!("00000000-0000-4000-8000-{id:012}")
}

/// Writes `subs` into `dir/subscriptions.yaml` and returns the `[store]` section reading it.
pub fn yaml_store(dir: &Path, subs: &[serde_json::Value]) -> String {
    let subs_path = dir.join("subscriptions.yaml");
    std::fs::write(&subs_path, serde_yaml_ng::to_string(subs).unwrap()).unwrap();
    format!(
        "[store]\nkind = \"yaml\"\npath = \"{}\"\nrefresh_interval = \"1s\"\n",
        subs_path.display()
    )
}

impl Hookline {
    /// Writes `config` (TOML, without [admin] and [store]) and `subs` into a temp dir and starts hookline.
    pub fn start(dir: &Path, config: &str, subs: &[serde_json::Value]) -> Hookline {
        Self::start_with_env(dir, config, subs, &[])
    }

    pub fn start_with_env(
        dir: &Path,
        config: &str,
        subs: &[serde_json::Value],
        env: &[(&str, &str)],
    ) -> Hookline {
        Self::start_with_store(dir, config, &yaml_store(dir, subs), None, env)
    }

    /// Starts hookline inside network namespace `netns` (see [`NetNs`]) with its admin server on `ip`, an
    /// address of that namespace.
    pub fn start_in(
        netns: &NetNs,
        dir: &Path,
        config: &str,
        subs: &[serde_json::Value],
    ) -> Hookline {
        let store = yaml_store(dir, subs);
        let admin: SocketAddr = format!("{}:{}", netns.inner, free_port()).parse().unwrap();
        Self::start_full(
            dir,
            config,
            &store,
            None,
            &[],
            admin,
            Some(netns.name.clone()),
        )
    }

    /// Starts hookline with a `[store]` section of the test's choice and, optionally, an admin token.
    pub fn start_with_store(
        dir: &Path,
        config: &str,
        store: &str,
        token: Option<&str>,
        env: &[(&str, &str)],
    ) -> Hookline {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Self::start_full(dir, config, store, token, env, admin, None)
    }

    fn start_full(
        dir: &Path,
        config: &str,
        store: &str,
        token: Option<&str>,
        env: &[(&str, &str)],
        admin: SocketAddr,
        netns: Option<String>,
    ) -> Hookline {
        let token = token
            .map(|t| format!("token = \"{t}\"\n"))
            .unwrap_or_default();
        let cfg = format!("{config}\n[admin]\nlisten = \"{admin}\"\n{token}{store}");
        let config_path = dir.join(format!("hookline-{}.toml", admin.port()));
        std::fs::write(&config_path, cfg).unwrap();
        let mut h = Hookline {
            admin,
            dir: dir.to_path_buf(),
            config: config_path,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns,
            child: None,
            log_path: dir.join("hookline.log"),
        };
        h.spawn();
        h
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        // HOOKLINE_TEST_WRAPPER (e.g. "heaptrack -o /tmp/ht") runs hookline under a profiler; the pid
        // and RSS figures are then the wrapper's.
        let wrapper = std::env::var("HOOKLINE_TEST_WRAPPER").unwrap_or_default();
        let mut argv: Vec<&str> = Vec::new();
        if let Some(ns) = &self.netns {
            // `ip netns exec` execs the command: the child is hookline itself.
            argv.extend(["ip", "netns", "exec", ns.as_str()]);
        }
        argv.extend(wrapper.split_whitespace());
        // HOOKLINE_BIN (in this instance's env, or this process's) runs another build: the
        // benchmark's before/after comparisons (`--compare-bin`).
        let bin = self
            .env
            .iter()
            .find(|(k, _)| k == "HOOKLINE_BIN")
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var("HOOKLINE_BIN").ok());
        argv.push(bin.as_deref().unwrap_or(env!("CARGO_BIN_EXE_hookline")));
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .args(["run", "--config"])
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("HOOKLINE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // A test's own environment (RUST_LOG included) wins over the defaults above.
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start hookline");
        self.child = Some(child);
    }

    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart after the previous process ended"
        );
        self.spawn();
    }

    /// Waits until `/readyz` answers 200 (group joined, cache loaded).
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let client = http();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("hookline exited early with {status}; log:\n{}", self.log());
            }
            if let Ok(r) = client
                .get(format!("http://{}/readyz", self.admin))
                .send()
                .await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hookline not ready within {timeout:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one sample line of `/metrics` (`name{labels}` exactly as exposed), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// The configuration file this hookline runs with (the CLI commands take the same one).
    pub fn config_path(&self) -> PathBuf {
        self.config.clone()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn sigterm(&self) {
        signal(self.child.as_ref().expect("running"), libc::SIGTERM);
    }

    /// Waits for the process to exit; returns its status and how long that took.
    pub fn wait_exit(&mut self, timeout: Duration) -> (Option<ExitStatus>, Duration) {
        let start = Instant::now();
        let mut c = self.child.take().expect("running");
        let s = wait_child(&mut c, timeout);
        (s, start.elapsed())
    }
}

impl Drop for Hookline {
    fn drop(&mut self) {
        self.kill9();
        // Every integration test doubles as a log-secrecy check: the shared test secrets must never
        // appear in what hookline logged (issue 5).
        if !std::thread::panicking() {
            let log = self.log();
            for secret in [SECRET_A, SECRET_B] {
                let key = secret.trim_start_matches("whsec_");
                assert!(
                    !log.contains(key),
                    "hookline logged the signing secret {secret}; log: {}",
                    self.log_path.display()
                );
            }
        }
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(series)
            && let Some(v) = rest.strip_prefix(' ')
        {
            return v.trim().parse().unwrap_or(f64::NAN);
        }
    }
    0.0
}

/// Base config for tests: the broker, topics, short tiers, loopback allowed.
pub fn base_config(broker: &Broker, topics: &[&str], group: &str) -> String {
    format!(
        r#"[kafka]
"bootstrap.servers" = "{}"
"topic.metadata.refresh.interval.ms" = "1000"
[source]
topics = {:?}
group = "{group}"
store_interval = "50ms"
commit_interval = "200ms"
shutdown_timeout = "10s"
[retry]
topic_prefix = "hl{}"
tiers = ["1s", "2s", "3s"]
partitions = 2
[delivery]
allow_networks = ["127.0.0.0/8", "::1/128"]
[log]
level = "info"
"#,
        broker.bootstrap(),
        topics,
        rand_suffix()
    )
}

/// Partitions hookline's source consumer holds by its log: "partitions assigned" minus "partitions
/// revoked" (incremental rebalances move partitions in steps; the retry consumer logs `role="retry"`).
pub fn source_partitions_assigned(log: &str) -> usize {
    let count = |l: &str, what: &str| -> Option<i64> {
        let n = l.split(what).nth(1)?.split_whitespace().next()?;
        n.parse().ok()
    };
    let mut held = 0i64;
    for l in log.lines().filter(|l| l.contains("role=\"source\"")) {
        held += count(l, "partitions assigned role=\"source\" partitions=").unwrap_or(0);
        held -= count(l, "partitions revoked role=\"source\" partitions=").unwrap_or(0);
    }
    held.max(0) as usize
}

/// `cfg` with `source.group_protocol` set (`"classic"` or `"consumer"`, KIP-848).
pub fn with_protocol(cfg: &str, protocol: &str) -> String {
    assert!(cfg.contains("[source]\n"));
    cfg.replacen(
        "[source]\n",
        &format!("[source]\ngroup_protocol = \"{protocol}\"\n"),
        1,
    )
}

/// Under the classic protocol the client owns the session timeout (librdkafka's default is 45 s); the
/// fault tests use 10 s, the setting the README recommends where failover time matters. Under the
/// consumer protocol the broker owns it (the test broker: 6 s, scripts/kafka/broker) and the client may
/// not set it.
pub fn fast_failover(cfg: &str, protocol: &str) -> String {
    let cfg = with_protocol(cfg, protocol);
    if protocol == "classic" {
        cfg.replacen(
            "[kafka]\n",
            "[kafka]\n\"session.timeout.ms\" = \"10000\"\n\"heartbeat.interval.ms\" = \"1000\"\n",
            1,
        )
    } else {
        cfg
    }
}

/// Python interpreter with the `standardwebhooks` package (created by scripts/setup).
pub fn verifier_python() -> PathBuf {
    if let Ok(p) = std::env::var("HOOKLINE_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let p = repo_root().join(".venv/bin/python");
    assert!(
        p.is_file(),
        "{} missing: run scripts/setup (creates the venv with standardwebhooks)",
        p.display()
    );
    p
}

/// Hands `reqs` to the reference Standard Webhooks verifier (tests/support/verify_standardwebhooks.py,
/// a separate Python process), once per secret; asserts it ran and returns its stdout and its counts
/// per secret (`counts[secret]["valid"]`).
pub fn verify_standardwebhooks(
    dir: &Path,
    reqs: &[Received],
    secrets: &[&str],
) -> (String, serde_json::Value) {
    run_verifier(dir, "verify_standardwebhooks.py", reqs, secrets)
}

/// Runs `tests/support/<script> REQUESTS.json ARGS…` (a verifier in a separate Python process) over
/// `reqs` (`[{"headers", "body_b64"}]`); asserts it succeeded and returns its stdout and its last line
/// as JSON.
pub fn run_verifier(
    dir: &Path,
    script: &str,
    reqs: &[Received],
    args: &[&str],
) -> (String, serde_json::Value) {
    use base64::Engine;
    let dump: Vec<serde_json::Value> = reqs
        .iter()
        .map(|q| serde_json::json!({"headers": q.headers, "body_b64": base64::engine::general_purpose::STANDARD.encode(&q.body)}))
        .collect();
    let path = dir.join(format!("{script}.requests.json"));
    std::fs::write(&path, serde_json::to_vec(&dump).unwrap()).unwrap();
    let out = Command::new(verifier_python())
        .arg(repo_root().join("tests/support").join(script))
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    (stdout, counts)
}

pub fn plain_event(i: usize, ty: &str, tenant: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::json!({"id": format!("evt-{i:05}"), "type": ty, "data": {"n": i}});
    if let Some(t) = tenant {
        v["tenant"] = serde_json::json!(t);
    }
    v
}

pub fn id_set(ids: impl IntoIterator<Item = String>) -> HashSet<String> {
    ids.into_iter().collect()
}

/// The retry/dead-letter topic prefix `base_config` chose.
pub fn prefix_of(cfg: &str) -> String {
    cfg.split("topic_prefix = \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string()
}

/// The ids `plain_event` gives events `range`.
pub fn ids(range: std::ops::Range<usize>) -> HashSet<String> {
    range.map(|i| format!("evt-{i:05}")).collect()
}

/// A client of the admin API (`/v1`) with a bearer token.
pub struct Api {
    pub base: String,
    pub token: String,
    client: reqwest::Client,
}

impl Api {
    pub fn new(h: &Hookline, token: &str) -> Api {
        Api {
            base: format!("http://{}", h.admin),
            token: token.into(),
            client: http(),
        }
    }

    /// Sends a request; returns the status and the JSON body (`Null` when empty or not JSON).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&b).unwrap());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
    pub async fn patch(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::PATCH, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }
}

/// A `[store]` section for an SQLite file.
pub fn sqlite_store(db: &Path) -> String {
    format!(
        "[store]\nkind = \"sqlite\"\npath = \"{}\"\nrefresh_interval = \"500ms\"\n",
        db.display()
    )
}

/// A broker with one topic, a temp dir and an SQLite file: the usual setup of the store and API tests.
pub struct SqliteEnv {
    pub broker: &'static Broker,
    pub topic: String,
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub cfg: String,
}

impl SqliteEnv {
    pub fn new(partitions: i32) -> SqliteEnv {
        let broker = Broker::shared();
        let topic = format!("t-{}", rand_suffix());
        broker.create_topic(&topic, partitions);
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("hookline.db");
        let cfg = base_config(broker, &[&topic], &format!("g-{}", rand_suffix()));
        SqliteEnv {
            broker,
            topic,
            dir,
            db,
            cfg,
        }
    }

    /// A hookline on this store with the admin API behind `token`, ready.
    pub async fn hookline(&self, token: &str) -> Hookline {
        let mut h = Hookline::start_with_store(
            self.dir.path(),
            &self.cfg,
            &sqlite_store(&self.db),
            Some(token),
            &[],
        );
        h.wait_ready(Duration::from_secs(30)).await;
        h
    }
}

/// The most requests in any window `[t, t + 1 s)` (times sorted).
pub fn max_per_second(times: &[Instant]) -> usize {
    let mut best = 0;
    let mut j = 0;
    for i in 0..times.len() {
        while times[i] - times[j] >= Duration::from_secs(1) {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

/// What one run of the hookline binary printed.
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// stdout then stderr.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `hookline ARGS` from the repository root with extra environment, and waits for it.
pub fn hookline_cli(args: &[&str], env: &[(&str, &str)]) -> CliRun {
    let out = Command::new(env!("CARGO_BIN_EXE_hookline"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(repo_root())
        .output()
        .unwrap();
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A `/proc/<pid>/status` size field (`VmRSS:`, `VmHWM:`) in MiB, 0 when unreadable.
pub fn proc_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A network namespace made by the test: a veth pair whose host end is `outer` and whose namespace end
/// is `inner` (a /30 of 10.0.0.0/8 picked at random), so a process started in it (see
/// [`Hookline::start_in`]) reaches only `outer`'s services. nftables rules inside it cut or degrade
/// its traffic to one port. Removed (with its rules and the veth pair) when dropped.
pub struct NetNs {
    pub name: String,
    pub outer: String,
    pub inner: String,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    pub fn new() -> NetNs {
        let tag = format!("{:05x}", fastrand::u32(..0xfffff));
        let (a, b) = (fastrand::u8(16..250), fastrand::u8(0..64) * 4);
        let ns = NetNs {
            name: format!("hl{tag}"),
            outer: format!("10.{a}.{b}.1"),
            inner: format!("10.{a}.{b}.2"),
        };
        let (host_if, ns_if) = (format!("hlh{tag}"), format!("hln{tag}"));
        let inner_cidr = format!("{}/30", ns.inner);
        let outer_cidr = format!("{}/30", ns.outer);
        let steps: Vec<Vec<&str>> = vec![
            vec!["ip", "netns", "add", &ns.name],
            vec![
                "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ],
            vec!["ip", "link", "set", &ns_if, "netns", &ns.name],
            vec!["ip", "addr", "add", &outer_cidr, "dev", &host_if],
            vec!["ip", "link", "set", &host_if, "up"],
            vec![
                "ip",
                "netns",
                "exec",
                &ns.name,
                "ip",
                "addr",
                "add",
                &inner_cidr,
                "dev",
                &ns_if,
            ],
            vec![
                "ip", "netns", "exec", &ns.name, "ip", "link", "set", &ns_if, "up",
            ],
            vec![
                "ip", "netns", "exec", &ns.name, "ip", "link", "set", "lo", "up",
            ],
        ];
        for step in steps {
            if let Err(e) = sh(&step) {
                panic!("network namespace setup (needs root, iproute2): {e}");
            }
        }
        ns
    }

    fn nft(&self, rules: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Drops every TCP packet to or from `port` of `outer` (both directions), or only `percent` % of
    /// them at random: the namespace's side of a partition or of a lossy link to that service.
    pub fn degrade(&self, port: u16, percent: u32) {
        let verdict = if percent >= 100 {
            "drop".to_string()
        } else {
            format!("numgen random mod 100 < {percent} drop")
        };
        self.heal();
        self.nft(&format!(
            "table inet hlfault {{\n\
               chain out {{ type filter hook output priority 0; ip daddr {o} tcp dport {port} {verdict}; }}\n\
               chain in {{ type filter hook input priority 0; ip saddr {o} tcp sport {port} {verdict}; }}\n\
             }}\n",
            o = self.outer
        ));
    }

    /// Removes the fault rules.
    pub fn heal(&self) {
        let _ = sh(&[
            "ip", "netns", "exec", &self.name, "nft", "delete", "table", "inet", "hlfault",
        ]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, which deletes the pair.
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// A steady load: one event per partition every `every`, with its own producer (so the broker object
/// can be restarted meanwhile), until [`Load::finish`].
pub struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Load {
    /// Stops the load and returns the ids the broker acknowledged.
    pub async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load task")
    }
}

pub fn load(bootstrap: String, topic: &'static str, partitions: i32, every: Duration) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let stop = flag;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "5")
            // Idempotent, as upstream producers should be: a broker restart under load must not
            // cost it its sequence state (no duplicates or gaps from the producer side).
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "120000")
            .create()
            .unwrap();
        let mut acked = Vec::new();
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let batch: Vec<(String, String)> = (0..partitions)
                .map(|p| {
                    let id = format!("p{p}-{n}");
                    let body =
                        serde_json::json!({"id": id, "type": "order.created", "data": {"n": n}})
                            .to_string();
                    (id, body)
                })
                .collect();
            let sends = batch.iter().enumerate().map(|(p, (_, body))| {
                producer.send(
                    FutureRecord::<[u8], [u8]>::to(topic)
                        .payload(body.as_bytes())
                        .partition(p as i32),
                    Duration::from_secs(120),
                )
            });
            let results = futures_util::future::join_all(sends).await;
            for ((id, _), r) in batch.into_iter().zip(results) {
                if r.is_ok() {
                    acked.push(id);
                }
            }
            n += 1;
            tokio::time::sleep(every).await;
        }
        acked
    });
    Load { stop, task }
}
