//! A real CQL database for the ScyllaDB adapter's tests: one single-node Apache Cassandra 5.0 started by
//! `scripts/cassandra/node run` in a directory of its own, on free ports (Cassandra is not ScyllaDB; the
//! adapter's statements are valid on both). `HOOKLINE_TEST_SCYLLA=host:port` makes [`CqlNode::shared`]
//! use that database instead (a real ScyllaDB, say), without starting anything.
//!
//! Test binaries share one node ([`CqlNode::shared`], a keyspace of each test's own); a test that stops
//! the node starts its own ([`CqlNode::start`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hookline::config::ScyllaConfig;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;

use super::{free_port, proc_mib, rand_suffix, repo_root, signal, spawn_tied, tail, wait_child};

/// How long a Cassandra start may take before the test fails (measured: 14–20 s on 2 shared cores).
const START_LIMIT: Duration = Duration::from_secs(180);
/// SIGTERM lets Cassandra drain; SIGKILL after this.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// Single-node replication for test keyspaces (production keeps NetworkTopologyStrategy with 3).
pub const TEST_REPLICATION: &str = "{'class': 'NetworkTopologyStrategy', 'replication_factor': 1}";

pub struct CqlNode {
    /// host:port of the CQL listener.
    pub addr: String,
    /// `SELECT release_version FROM system.local`.
    pub version: String,
    /// None: a database given by HOOKLINE_TEST_SCYLLA.
    process: Option<Process>,
}

struct Process {
    dir: PathBuf,
    port: u16,
    storage_port: u16,
    child: Mutex<Option<Child>>,
    /// How long the last start took, until a CQL query answered.
    started_in: Mutex<Duration>,
}

impl CqlNode {
    /// A Cassandra node of this test's own (stopped and its directory removed when dropped).
    pub fn start() -> CqlNode {
        let p = Process {
            dir: node_dir(),
            port: free_port(),
            storage_port: free_port(),
            child: Mutex::new(None),
            started_in: Mutex::new(Duration::ZERO),
        };
        let mut node = CqlNode {
            addr: format!("127.0.0.1:{}", p.port),
            version: String::new(),
            process: Some(p),
        };
        node.version = node.spawn();
        node
    }

    /// The node shared by every test of this test binary, started on first use: the database named by
    /// `HOOKLINE_TEST_SCYLLA` when set, else a Cassandra node. When a test fails, the tail of the node's
    /// log is printed beside the panic.
    pub fn shared() -> &'static CqlNode {
        static SHARED: std::sync::OnceLock<CqlNode> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            if let Ok(addr) = std::env::var("HOOKLINE_TEST_SCYLLA") {
                let version = query_version(&addr, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("HOOKLINE_TEST_SCYLLA={addr}: {e}"));
                return CqlNode {
                    addr,
                    version,
                    process: None,
                };
            }
            let node = CqlNode::start();
            let log = node.log_path();
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                default(info);
                eprintln!(
                    "--- shared Cassandra log ({}), last lines ---\n{}",
                    log.display(),
                    tail(&log, 40)
                );
            }));
            node
        })
    }

    /// What the results were measured on, for every test's output: "Apache Cassandra 5.0.x, not
    /// ScyllaDB", or the given database's address and version.
    pub fn label(&self) -> String {
        match &self.process {
            Some(_) => format!("Apache Cassandra {}, not ScyllaDB", self.version),
            None => format!(
                "the database at HOOKLINE_TEST_SCYLLA={} (release_version {})",
                self.addr, self.version
            ),
        }
    }

    fn process(&self) -> &Process {
        self.process
            .as_ref()
            .expect("only a Cassandra node of the tests' own can be stopped or measured")
    }

    /// Starts the JVM and waits until a CQL query answers; returns the server's release_version.
    fn spawn(&self) -> String {
        let p = self.process();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p.dir.join("stdout.log"))
            .unwrap();
        let mut cmd = Command::new(repo_root().join("scripts/cassandra/node"));
        cmd.args([
            "run".to_string(),
            p.dir.display().to_string(),
            p.port.to_string(),
            p.storage_port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
        let t = Instant::now();
        let mut child = spawn_tied(cmd).expect("start scripts/cassandra/node");
        let version = loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "Cassandra exited at start ({status}):\n{}\n{}",
                    tail(&p.dir.join("stdout.log"), 30),
                    tail(&self.log_path(), 30)
                );
            }
            // The port opens before the node can serve: ready = a query answers.
            if let Ok(v) = query_version(&self.addr, Duration::from_secs(2)) {
                break v;
            }
            assert!(
                t.elapsed() < START_LIMIT,
                "Cassandra did not answer a CQL query within {START_LIMIT:?}:\n{}",
                tail(&self.log_path(), 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        *p.started_in.lock().unwrap() = t.elapsed();
        *p.child.lock().unwrap() = Some(child);
        version
    }

    /// How long the last start took (JVM start until a CQL query answered).
    pub fn started_in(&self) -> Duration {
        *self.process().started_in.lock().unwrap()
    }

    /// The Cassandra JVM's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process()
            .child
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| c.id())
    }

    /// Resident memory of the JVM now, in MiB (0 when not running).
    pub fn rss_mib(&self) -> f64 {
        self.pid().map_or(0.0, |pid| proc_mib(pid, "VmRSS:"))
    }

    /// Stops the node: SIGTERM (Cassandra drains and exits), SIGKILL after 30 s. Returns how long it
    /// took. The node stays down until [`CqlNode::start_again`].
    pub fn stop(&self) -> Duration {
        let t = Instant::now();
        let child = self.process().child.lock().unwrap().take();
        if let Some(mut c) = child {
            signal(&c, libc::SIGTERM);
            if wait_child(&mut c, STOP_LIMIT).is_none() {
                eprintln!("Cassandra did not stop within {STOP_LIMIT:?} of SIGTERM: killed");
            }
        }
        t.elapsed()
    }

    /// Starts a stopped node again on the same ports and data; returns how long until a query answered.
    pub fn start_again(&self) -> Duration {
        assert!(
            self.process().child.lock().unwrap().is_none(),
            "Cassandra still running"
        );
        self.spawn();
        self.started_in()
    }

    /// The node's log (logback file `system.log` in its directory).
    pub fn log_path(&self) -> PathBuf {
        self.process
            .as_ref()
            .map(|p| p.dir.join("system.log"))
            .unwrap_or_default()
    }

    /// The driver configuration of a keyspace on this node, single-node replication.
    pub fn scylla_config(&self, keyspace: &str) -> ScyllaConfig {
        ScyllaConfig {
            nodes: vec![self.addr.clone()],
            keyspace: keyspace.into(),
            replication: TEST_REPLICATION.into(),
            ..ScyllaConfig::default()
        }
    }

    /// A `[store]` section for hookline on `keyspace` of this node (`extra`: more `[store]` lines).
    pub fn store_section(&self, keyspace: &str, extra: &str) -> String {
        format!(
            "[store]\nkind = \"scylla\"\nrefresh_interval = \"500ms\"\n{extra}\n[store.scylla]\nnodes = [\"{}\"]\nkeyspace = \"{keyspace}\"\nreplication = \"{TEST_REPLICATION}\"\n",
            self.addr
        )
    }

    /// Runs `hookline migrate` with `config` (a file with a scylla `[store]`); returns what it printed.
    pub fn migrate(&self, config: &Path) -> String {
        let r = super::hookline_cli(&["migrate", "--config", config.to_str().unwrap()], &[]);
        assert_eq!(r.code, 0, "hookline migrate: {}", r.all());
        r.all()
    }

    /// A driver session for reading the database directly (what hookline wrote, TTLs).
    pub async fn session(&self) -> Session {
        SessionBuilder::new()
            .known_node(&self.addr)
            .build()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.addr))
    }
}

impl Drop for CqlNode {
    fn drop(&mut self) {
        let Some(p) = &self.process else { return };
        if std::thread::panicking() {
            eprintln!(
                "--- Cassandra log ({}), last lines ---\n{}",
                p.dir.display(),
                tail(&p.dir.join("system.log"), 40)
            );
        }
        if let Some(mut c) = p.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&p.dir);
    }
}

/// A keyspace name of a test's own (tests share a node).
pub fn keyspace(base: &str) -> String {
    format!("{base}_{}", rand_suffix())
}

/// `SELECT release_version FROM system.local` through the scylla driver, on a runtime of its own
/// thread (callable from sync and async code).
fn query_version(addr: &str, timeout: Duration) -> Result<String, String> {
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let s = SessionBuilder::new()
                .known_node(&addr)
                .connection_timeout(timeout)
                .fetch_schema_metadata(false)
                .build()
                .await
                .map_err(|e| e.to_string())?;
            let rows = s
                .query_unpaged("SELECT release_version FROM system.local", ())
                .await
                .map_err(|e| e.to_string())?
                .into_rows_result()
                .map_err(|e| e.to_string())?;
            let (v,): (String,) = rows.single_row().map_err(|e| e.to_string())?;
            Ok(v)
        })
    })
    .join()
    .map_err(|_| "the version query panicked".to_string())?
}

/// Where node directories live: one per node, named after this process, so that a later run can remove
/// those of processes that are gone (a shared node's directory is never dropped).
fn node_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let root = std::env::temp_dir().join("hookline-test-cassandra");
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
