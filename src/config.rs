//! Configuration: `config/hookline.toml`, overridden by `HOOKLINE_…` environment variables.
//!
//! Loading is strict: unknown keys, wrong types and values out of range are rejected at start with a
//! message naming the setting (`source.topics: must not be empty`). The `[kafka]` table is passed
//! verbatim to librdkafka; librdkafka itself validates those names and values when the clients are
//! created, which also happens at start.
//!
//! Environment overrides use a double underscore between levels: `HOOKLINE_SOURCE__TOPICS=orders,payments`,
//! `HOOKLINE_DELIVERY__MAX_BODY_BYTES=8192`. For the `[kafka]` table the property name is written with
//! underscores for dots: `HOOKLINE_KAFKA__BOOTSTRAP_SERVERS=broker:9092` sets `bootstrap.servers`.
//! Values are read as TOML when they parse as TOML (`5`, `true`, `["a","b"]`), as plain strings otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// A configuration problem. The message always starts with the setting's dotted path.
/// Why a command (`run`, `replay`, …) stopped with an error. Config errors exit 2, the rest 1.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("config error: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Runtime(String),
}

impl RunError {
    /// A runtime failure (exit 1) described by `e`.
    pub fn runtime(e: impl std::fmt::Display) -> RunError {
        RunError::Runtime(e.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    pub setting: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// librdkafka properties shared by every client hookline creates (consumers, producer, admin).
    #[serde(default, deserialize_with = "kafka_props")]
    pub kafka: BTreeMap<String, String>,
    pub source: SourceConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub receipts: ReceiptsConfig,
    #[serde(default)]
    pub tracing: TracingConfig,
    #[serde(default)]
    pub operational: OperationalConfig,
}

/// The id of the operator's webhook subscription (`[operational] webhook_url`), on its retry and
/// dead-letter records.
pub const OPERATOR_SUBSCRIPTION: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f70_6572_6174_4f70_8000_0000_0000_0001);

/// `[operational]`: events about endpoints and messages on `<prefix>.events`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationalConfig {
    /// Off by default (the topic is created with the retry topics when on).
    #[serde(default)]
    pub enabled: bool,
    /// Also POST every operational event here, signed (Standard Webhooks) with `webhook_secret`, with
    /// the retries and dead letters of any delivery.
    #[serde(default)]
    pub webhook_url: Option<String>,
    #[serde(default)]
    pub webhook_secret: Option<String>,
}

/// The OTLP exporter's settings, checked (see [`Config::otlp`]).
#[derive(Debug, Clone)]
pub struct OtlpExport {
    /// Where requests go: `otlp_endpoint` with `/v1/traces` appended unless it already ends so.
    pub url: url::Url,
    pub service_name: String,
    pub timeout: Duration,
    pub batch_delay: Duration,
}

/// `[tracing]`: spans of delivery attempts over OTLP/HTTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/HTTP collector, e.g. `http://127.0.0.1:4318` (`/v1/traces` is appended unless given); unset:
    /// no spans (the record's trace context is still forwarded).
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Bound of one export request.
    #[serde(default = "default_export_timeout", with = "humantime_serde_compat")]
    pub export_timeout: Duration,
    /// How long the exporter waits for a batch (512 spans) to fill before sending what it has.
    #[serde(default = "default_batch_delay", with = "humantime_serde_compat")]
    pub batch_delay: Duration,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            service_name: default_service_name(),
            export_timeout: default_export_timeout(),
            batch_delay: default_batch_delay(),
        }
    }
}

fn default_batch_delay() -> Duration {
    Duration::from_secs(1)
}

fn default_service_name() -> String {
    "hookline".into()
}

fn default_export_timeout() -> Duration {
    Duration::from_secs(5)
}

/// `[receipts]`: one record per terminal outcome of an (event, subscription) on `<prefix>.receipts`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptsConfig {
    /// Off by default: a receipt is one more produce per delivery, acknowledged before the source
    /// record counts as done.
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    #[serde(deserialize_with = "string_or_list")]
    pub topics: Vec<String>,
    #[serde(default = "default_group")]
    pub group: String,
    /// Largest accepted record value; larger records are dead-lettered as `invalid_event`.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Records (not deliveries) taken from one partition and not yet done; the partition is paused above it.
    #[serde(default = "default_max_in_flight_per_partition")]
    pub max_in_flight_per_partition: usize,
    /// Bytes of record values in flight for one partition.
    #[serde(default = "default_max_bytes_per_partition")]
    pub max_in_flight_bytes_per_partition: u64,
    /// Records in flight over all partitions of this instance.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Bytes of record values in flight over all partitions of this instance.
    #[serde(default = "default_max_bytes")]
    pub max_in_flight_bytes: u64,
    /// How often finished offsets are handed to librdkafka (which commits them every `commit_interval`).
    #[serde(default = "default_store_interval", with = "humantime_serde_compat")]
    pub store_interval: Duration,
    #[serde(default = "default_commit_interval", with = "humantime_serde_compat")]
    pub commit_interval: Duration,
    /// On SIGTERM/SIGINT: how long in-flight deliveries may take before the process commits and exits.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde_compat")]
    pub shutdown_timeout: Duration,
    /// On partition revocation: how long in-flight records of the revoked partitions may take.
    #[serde(default = "default_rebalance_timeout", with = "humantime_serde_compat")]
    pub rebalance_timeout: Duration,
    /// How often consumer lag (high watermarks and committed offsets of the assigned partitions) is read
    /// from the broker for `/metrics`.
    #[serde(default = "default_lag_interval", with = "humantime_serde_compat")]
    pub lag_interval: Duration,
    /// Static group membership (`group.instance.id` of both the source and the retry consumer): a
    /// restarted instance with the same id takes its partitions back at once instead of waiting for its
    /// old session to time out. Unique per instance and stable across its restarts, e.g. the pod name of
    /// a StatefulSet (`HOOKLINE_SOURCE__INSTANCE_ID` from the downward API).
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Consumer group protocol: `classic` (default; cooperative-sticky assignment, client-side
    /// `session.timeout.ms`) or `consumer` (KIP-848, Kafka 4: the broker assigns and owns the session
    /// timing, `group.consumer.session.timeout.ms`).
    #[serde(default)]
    pub group_protocol: GroupProtocol,
    /// The longest the oldest unfinished record of a partition may hold its commit while other work of
    /// the partition is done: past it, that record's deliveries still waiting for their endpoint are
    /// handed to a retry tier (see `spill.rs`). Rate-limited endpoints' waits are exempt (their pace is
    /// known); only a partition at its in-flight bound spills them.
    #[serde(default = "default_max_commit_delay", with = "humantime_serde_compat")]
    pub max_commit_delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    #[default]
    Classic,
    Consumer,
}

impl Config {
    /// Settings that are accepted but no longer do anything (warned about at start).
    pub fn obsolete_settings(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.delivery.endpoint_queue.is_some() {
            out.push("delivery.endpoint_queue");
        }
        if self.delivery.queue_wait.is_some() {
            out.push("delivery.queue_wait");
        }
        out
    }
}

impl GroupProtocol {
    /// The value of librdkafka's `group.protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    #[serde(default = "default_tiers", deserialize_with = "string_or_list")]
    pub tiers: Vec<String>,
    /// Create the retry and dead-letter topics at start when they are missing.
    #[serde(default = "default_true")]
    pub create_topics: bool,
    #[serde(default = "default_retry_partitions")]
    pub partitions: i32,
    /// -1 = the broker's default.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Consumer group of the tier consumers; default `<source.group>.retry`.
    #[serde(default)]
    pub group: Option<String>,
    /// Each hop's delay is stretched by a random fraction in `[0, jitter]` (never shortened), so a burst
    /// of failures does not come back as one burst.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
    /// Not-yet-due retry records kept in memory per tier partition; at this many the partition is
    /// paused until the oldest become due.
    #[serde(default = "default_max_held")]
    pub max_held_per_partition: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default = "default_store_kind")]
    pub kind: StoreKind,
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// How often the store's revision is polled; a change reloads the subscriptions.
    #[serde(default = "default_refresh_interval", with = "humantime_serde_compat")]
    pub refresh_interval: Duration,
    /// A full reload this often even without a revision change (a safety net).
    #[serde(default = "default_full_refresh", with = "humantime_serde_compat")]
    pub full_refresh_interval: Duration,
    /// Write one row per delivery attempt (writable stores only).
    #[serde(default = "yes")]
    pub attempt_log: bool,
    /// Attempt rows older than this are removed (ScyllaDB: row TTL; SQLite: periodic delete).
    #[serde(default = "default_attempt_ttl", with = "humantime_serde_compat")]
    pub attempt_ttl: Duration,
    /// Attempts waiting to be written; more are dropped and counted while the store lags.
    #[serde(default = "default_attempt_buffer")]
    pub attempt_buffer: usize,
    /// Attempts written per store call.
    #[serde(default = "default_attempt_batch")]
    pub attempt_batch: usize,
    /// SQLite: how often expired attempts are deleted.
    #[serde(default = "default_attempt_expiry", with = "humantime_serde_compat")]
    pub attempt_expiry_interval: Duration,
    #[serde(default)]
    pub scylla: ScyllaConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScyllaConfig {
    #[serde(default = "default_scylla_nodes", deserialize_with = "string_or_list")]
    pub nodes: Vec<String>,
    #[serde(default = "default_keyspace")]
    pub keyspace: String,
    /// The keyspace's replication map, used by `hookline migrate`.
    #[serde(default = "default_replication_map")]
    pub replication: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(
        default = "default_scylla_connect_timeout",
        with = "humantime_serde_compat"
    )]
    pub connect_timeout: Duration,
    /// Consistency level of every subscription statement: the writes (insert, delete), the revision
    /// register's overwrite and poll, the full load, the API's listing and single reads. Reads and
    /// writes at the same level: LOCAL_QUORUM on both sides overlap, so an instance that sees a new
    /// revision also reads the write behind it.
    #[serde(default = "default_consistency")]
    pub consistency: Consistency,
    /// Consistency level of the attempt log's inserts and reads (best effort, off the delivery path).
    #[serde(default = "default_attempt_consistency")]
    pub attempt_consistency: Consistency,
}

/// A CQL consistency level that is valid for reads and writes alike (hookline's statements do both at
/// one level). Configured by name, case-insensitive: `ONE`, `TWO`, `THREE`, `QUORUM`, `ALL`,
/// `LOCAL_QUORUM`, `LOCAL_ONE`. Refused: `ANY` and `EACH_QUORUM` (not for reads on every database),
/// `SERIAL` and `LOCAL_SERIAL` (lightweight transactions only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    One,
    Two,
    Three,
    Quorum,
    All,
    LocalQuorum,
    LocalOne,
}

impl Consistency {
    const ALL_LEVELS: [Consistency; 7] = [
        Consistency::One,
        Consistency::Two,
        Consistency::Three,
        Consistency::Quorum,
        Consistency::All,
        Consistency::LocalQuorum,
        Consistency::LocalOne,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::One => "ONE",
            Consistency::Two => "TWO",
            Consistency::Three => "THREE",
            Consistency::Quorum => "QUORUM",
            Consistency::All => "ALL",
            Consistency::LocalQuorum => "LOCAL_QUORUM",
            Consistency::LocalOne => "LOCAL_ONE",
        }
    }
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Consistency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let name = s.trim().to_ascii_uppercase();
        if let Some(c) = Consistency::ALL_LEVELS.iter().find(|c| c.as_str() == name) {
            return Ok(*c);
        }
        let why = match name.as_str() {
            "ANY" | "EACH_QUORUM" => "is for writes only, and these statements also read",
            "SERIAL" | "LOCAL_SERIAL" => {
                "is for lightweight transactions, which hookline does not use"
            }
            _ => "is not a consistency level",
        };
        Err(format!(
            "{s:?} {why}: use ONE, TWO, THREE, QUORUM, ALL, LOCAL_QUORUM or LOCAL_ONE"
        ))
    }
}

impl<'de> Deserialize<'de> for Consistency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Yaml,
    Sqlite,
    Scylla,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// CIDRs exempt from the refusal of loopback/private/link-local/unspecified destinations.
    #[serde(default, deserialize_with = "string_or_list")]
    pub allow_networks: Vec<String>,
    /// Response bodies are read up to this many bytes and dropped.
    #[serde(default = "default_max_body_bytes")]
    pub max_response_bytes: usize,
    /// Default request timeout for subscriptions that do not set `timeout_ms`.
    #[serde(default = "default_timeout_ms")]
    pub default_timeout_ms: u64,
    /// Default concurrent requests per subscription that does not set `max_in_flight`.
    #[serde(default = "default_sub_in_flight")]
    pub default_max_in_flight: u32,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Idle keep-alive connections kept per endpoint host.
    #[serde(default = "default_pool_idle")]
    pub pool_max_idle_per_host: usize,
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde_compat")]
    pub pool_idle_timeout: Duration,
    /// A keep-alive connection older than this is closed instead of reused, so DNS changes are seen.
    #[serde(default = "default_pool_max_lifetime", with = "humantime_serde_compat")]
    pub pool_max_lifetime: Duration,
    /// TCP keepalive probes after this much silence on a connection; "0s" turns them off.
    #[serde(default = "default_tcp_keepalive", with = "humantime_serde_compat")]
    pub tcp_keepalive: Duration,
    #[serde(default)]
    pub tls: DeliveryTlsConfig,
    /// Name servers for endpoint names (`"10.0.0.2"` or `"10.0.0.2:5353"`); empty: the system's
    /// (/etc/resolv.conf). /etc/hosts is read first either way.
    #[serde(default, deserialize_with = "string_or_list")]
    pub dns_servers: Vec<String>,
    /// Egress proxy `http://[user:password@]host:port`: HTTPS through CONNECT, HTTP in absolute form,
    /// always to an address hookline resolved and the policy allowed.
    #[serde(default)]
    pub proxy: Option<String>,
    /// Destinations that go direct: host names (and their subdomains), `.suffix`, IPs, CIDRs, `*`.
    #[serde(default, deserialize_with = "string_or_list")]
    pub no_proxy: Vec<String>,
    /// Bound of one DNS query; a name that does not answer in time fails the attempt (a retry).
    #[serde(default = "default_dns_timeout", with = "humantime_serde_compat")]
    pub dns_timeout: Duration,
    /// A delivery handed to a retry tier without an attempt (spilled from a blocked partition) this
    /// many times is counted as a failed attempt the next time, so deferrals cannot cycle forever.
    #[serde(default = "default_max_deferrals")]
    pub max_deferrals: u32,
    /// A subscription whose deliveries have all failed for this long is disabled (reason `failing`, an
    /// `endpoint.disabled` operational event); 0 (the default) = never.
    #[serde(default, with = "humantime_serde_compat")]
    pub disable_after: Duration,
    /// No longer used (deliveries wait for their endpoint; see `source.max_commit_delay`); accepted
    /// with a warning so that older configurations still start.
    #[serde(default)]
    pub endpoint_queue: Option<serde::de::IgnoredAny>,
    /// No longer used, as `endpoint_queue`.
    #[serde(default)]
    pub queue_wait: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub breaker: BreakerSettings,
}

/// `[delivery.tls]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryTlsConfig {
    /// PEM file of CA certificates trusted beside the platform's roots (a private CA of a tenant's
    /// endpoints). Read at start: a missing or unreadable file, or one without a certificate, is a
    /// config error.
    #[serde(default)]
    pub extra_ca_file: Option<std::path::PathBuf>,
}

/// Per-subscription circuit breaker (DESIGN §4).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    /// Sliding window over which the failure ratio is computed.
    #[serde(default = "default_breaker_window", with = "humantime_serde_compat")]
    pub window: Duration,
    /// Finished requests needed in the window before the ratio can open the breaker.
    #[serde(default = "default_breaker_min_requests")]
    pub min_requests: u32,
    /// Failure ratio (0 < r <= 1) that opens the breaker.
    #[serde(default = "default_breaker_ratio")]
    pub failure_ratio: f64,
    /// Failures in a row that open the breaker regardless of the window.
    #[serde(default = "default_breaker_consecutive")]
    pub consecutive_failures: u32,
    /// How long the breaker stays open before letting probes through.
    #[serde(default = "default_breaker_cool_down", with = "humantime_serde_compat")]
    pub cool_down: Duration,
    /// Requests let through while half-open; all must succeed to close.
    #[serde(default = "default_breaker_probes")]
    pub half_open_probes: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    #[serde(default)]
    pub token: Option<String>,
    /// After a secret rotation the old secret keeps signing this long (unless the request says otherwise).
    #[serde(default = "default_rotation_grace", with = "humantime_serde_compat")]
    pub rotation_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    /// A tracing filter directive, e.g. `info` or `hookline=debug,rdkafka=warn`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Tokio worker threads; 0 = one per CPU.
    #[serde(default)]
    pub worker_threads: usize,
}

fn default_group() -> String {
    "hookline".into()
}
fn default_max_event_bytes() -> usize {
    1024 * 1024
}
fn default_max_in_flight_per_partition() -> usize {
    10_000
}
fn default_max_bytes_per_partition() -> u64 {
    64 * 1024 * 1024
}
fn default_max_in_flight() -> usize {
    20_000
}
fn default_max_bytes() -> u64 {
    128 * 1024 * 1024
}
fn default_store_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_lag_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_rebalance_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_prefix() -> String {
    "hookline".into()
}
fn default_tiers() -> Vec<String> {
    ["1m", "5m", "30m", "2h", "24h"].map(String::from).to_vec()
}
fn default_true() -> bool {
    true
}
fn default_retry_partitions() -> i32 {
    6
}
fn default_replication() -> i32 {
    -1
}
fn default_jitter() -> f64 {
    0.1
}
fn default_max_held() -> usize {
    1000
}
fn default_max_deferrals() -> u32 {
    3
}
fn default_max_commit_delay() -> Duration {
    Duration::from_secs(30)
}
fn default_breaker_window() -> Duration {
    Duration::from_secs(30)
}
fn default_breaker_min_requests() -> u32 {
    20
}
fn default_breaker_ratio() -> f64 {
    0.5
}
fn default_breaker_consecutive() -> u32 {
    10
}
fn default_breaker_cool_down() -> Duration {
    Duration::from_secs(30)
}
fn default_breaker_probes() -> u32 {
    3
}
impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            window: default_breaker_window(),
            min_requests: default_breaker_min_requests(),
            failure_ratio: default_breaker_ratio(),
            consecutive_failures: default_breaker_consecutive(),
            cool_down: default_breaker_cool_down(),
            half_open_probes: default_breaker_probes(),
        }
    }
}
fn default_store_kind() -> StoreKind {
    StoreKind::Sqlite
}
fn default_store_path() -> PathBuf {
    "hookline.db".into()
}
fn default_refresh_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_full_refresh() -> Duration {
    Duration::from_secs(300)
}
fn yes() -> bool {
    true
}
fn default_attempt_ttl() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_attempt_buffer() -> usize {
    10_000
}
fn default_attempt_batch() -> usize {
    500
}
fn default_attempt_expiry() -> Duration {
    Duration::from_secs(3600)
}
fn default_scylla_nodes() -> Vec<String> {
    vec!["127.0.0.1:9042".into()]
}
fn default_keyspace() -> String {
    "hookline".into()
}
fn default_replication_map() -> String {
    "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}".into()
}
fn default_scylla_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_consistency() -> Consistency {
    Consistency::LocalQuorum
}
fn default_attempt_consistency() -> Consistency {
    Consistency::LocalOne
}
fn default_rotation_grace() -> Duration {
    Duration::from_secs(86_400)
}
fn default_max_body_bytes() -> usize {
    4096
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_sub_in_flight() -> u32 {
    64
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_pool_idle() -> usize {
    256
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(90)
}
fn default_pool_max_lifetime() -> Duration {
    Duration::from_secs(300)
}
fn default_tcp_keepalive() -> Duration {
    Duration::from_secs(30)
}
fn default_dns_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_admin_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_log_format() -> LogFormat {
    LogFormat::Text
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            topic_prefix: default_prefix(),
            tiers: default_tiers(),
            create_topics: true,
            partitions: default_retry_partitions(),
            replication_factor: default_replication(),
            group: None,
            jitter: default_jitter(),
            max_held_per_partition: default_max_held(),
        }
    }
}
impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: default_store_kind(),
            path: default_store_path(),
            refresh_interval: default_refresh_interval(),
            full_refresh_interval: default_full_refresh(),
            attempt_log: true,
            attempt_ttl: default_attempt_ttl(),
            attempt_buffer: default_attempt_buffer(),
            attempt_batch: default_attempt_batch(),
            attempt_expiry_interval: default_attempt_expiry(),
            scylla: ScyllaConfig::default(),
        }
    }
}
impl Default for ScyllaConfig {
    fn default() -> Self {
        Self {
            nodes: default_scylla_nodes(),
            keyspace: default_keyspace(),
            replication: default_replication_map(),
            username: None,
            password: None,
            connect_timeout: default_scylla_connect_timeout(),
            consistency: default_consistency(),
            attempt_consistency: default_attempt_consistency(),
        }
    }
}
impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            allow_networks: Vec::new(),
            max_response_bytes: default_max_body_bytes(),
            default_timeout_ms: default_timeout_ms(),
            default_max_in_flight: default_sub_in_flight(),
            connect_timeout_ms: default_connect_timeout_ms(),
            pool_max_idle_per_host: default_pool_idle(),
            pool_idle_timeout: default_pool_idle_timeout(),
            pool_max_lifetime: default_pool_max_lifetime(),
            tcp_keepalive: default_tcp_keepalive(),
            tls: DeliveryTlsConfig::default(),
            dns_servers: Vec::new(),
            dns_timeout: default_dns_timeout(),
            proxy: None,
            no_proxy: Vec::new(),
            max_deferrals: default_max_deferrals(),
            disable_after: Duration::ZERO,
            endpoint_queue: None,
            queue_wait: None,
            breaker: BreakerSettings::default(),
        }
    }
}
impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
            rotation_grace: default_rotation_grace(),
        }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

/// Durations are written as `"1m"`, `"250ms"`, `"2h"` (humantime syntax).
mod humantime_serde_compat {
    use super::*;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("invalid duration {s:?} ({e}); write e.g. \"500ms\", \"30s\", \"5m\", \"2h\"")
    })
}

/// Accepts `["a", "b"]` or `"a,b"` (the latter is what an environment variable naturally holds).
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        OneOrMany::Many(v) => v,
    })
}

/// librdkafka properties: any scalar TOML value, kept as the string librdkafka expects.
fn kafka_props<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, toml::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            let s = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "kafka.\"{k}\": expected a string, number or boolean, got {}",
                        other.type_str()
                    )));
                }
            };
            Ok((k, s))
        })
        .collect()
}

/// A tier: its name (used in topic names, e.g. `5m`) and its delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub name: String,
    pub delay: Duration,
}

impl Config {
    /// Reads the file (if any), applies `HOOKLINE_…` overrides from `env`, parses and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut root = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    ConfigError::new("--config", format!("cannot read {}: {e}", p.display()))
                })?;
                text.parse::<toml::Table>().map_err(|e| {
                    let line = e.span().map(|sp| text[..sp.start].lines().count().max(1));
                    let at = line.map(|l| format!(" at line {l}")).unwrap_or_default();
                    ConfigError::new(
                        "config",
                        format!("invalid TOML{at}: {}", e.message().trim()),
                    )
                })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut root, env)?;
        let cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(root)).map_err(|e| {
                let path = e.path().to_string();
                // toml appends multi-line context; the path already says where.
                let inner = e
                    .into_inner()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                // serde's own messages already name unknown fields; keep the path in front.
                ConfigError::new(if path == "." { "config".into() } else { path }, inner)
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.otlp()?;
        self.operator_subscription()?;
        if self.source.topics.is_empty() {
            return Err(ConfigError::new(
                "source.topics",
                "must name at least one topic",
            ));
        }
        for (i, t) in self.source.topics.iter().enumerate() {
            validate_topic_name(t)
                .map_err(|m| ConfigError::new(format!("source.topics[{i}]"), m))?;
        }
        if self.source.group.trim().is_empty() {
            return Err(ConfigError::new("source.group", "must not be empty"));
        }
        if !self.kafka.contains_key("bootstrap.servers")
            && !self.kafka.contains_key("metadata.broker.list")
        {
            return Err(ConfigError::new(
                "kafka.\"bootstrap.servers\"",
                "is required (e.g. \"127.0.0.1:9092\")",
            ));
        }
        for reserved in [
            "group.id",
            "group.instance.id",
            "group.protocol",
            "enable.auto.offset.store",
            "enable.auto.commit",
            "enable.idempotence",
        ] {
            if self.kafka.contains_key(reserved) {
                return Err(ConfigError::new(
                    format!("kafka.\"{reserved}\""),
                    "is managed by hookline (use source.group, source.instance_id, \
                     source.group_protocol, source.commit_interval)",
                ));
            }
        }
        if let Some(id) = &self.source.instance_id {
            let ok = !id.is_empty()
                && id.len() <= 249
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
            if !ok {
                return Err(ConfigError::new(
                    "source.instance_id",
                    format!("{id:?} is not a valid group.instance.id (1-249 of [a-zA-Z0-9._-])"),
                ));
            }
        }
        if self.source.group_protocol == GroupProtocol::Consumer {
            // librdkafka refuses these at client creation under KIP-848: the broker owns them.
            for classic_only in [
                "session.timeout.ms",
                "heartbeat.interval.ms",
                "partition.assignment.strategy",
                "group.protocol.type",
            ] {
                if self.kafka.contains_key(classic_only) {
                    return Err(ConfigError::new(
                        format!("kafka.\"{classic_only}\""),
                        "is not allowed with source.group_protocol = \"consumer\" (the broker sets \
                         it: group.consumer.* broker settings)",
                    ));
                }
            }
        }
        range(
            "source.max_event_bytes",
            self.source.max_event_bytes as u64,
            1,
            64 << 20,
        )?;
        range(
            "source.max_in_flight_per_partition",
            self.source.max_in_flight_per_partition as u64,
            1,
            1_000_000,
        )?;
        range(
            "source.max_in_flight",
            self.source.max_in_flight as u64,
            1,
            10_000_000,
        )?;
        range(
            "source.max_in_flight_bytes_per_partition",
            self.source.max_in_flight_bytes_per_partition,
            1024,
            u64::MAX,
        )?;
        range(
            "source.max_in_flight_bytes",
            self.source.max_in_flight_bytes,
            1024,
            u64::MAX,
        )?;
        if self.source.store_interval.is_zero() {
            return Err(ConfigError::new(
                "source.store_interval",
                "must be greater than 0",
            ));
        }
        if self.source.commit_interval.is_zero() {
            return Err(ConfigError::new(
                "source.commit_interval",
                "must be greater than 0",
            ));
        }
        range(
            "source.lag_interval (ms)",
            self.source.lag_interval.as_millis() as u64,
            100,
            600_000,
        )?;
        validate_topic_name(&self.retry.topic_prefix)
            .map_err(|m| ConfigError::new("retry.topic_prefix", m))?;
        self.tiers()?;
        if self.retry.partitions < 1 {
            return Err(ConfigError::new("retry.partitions", "must be at least 1"));
        }
        if self.retry.replication_factor == 0 || self.retry.replication_factor < -1 {
            return Err(ConfigError::new(
                "retry.replication_factor",
                "must be -1 (broker default) or at least 1",
            ));
        }
        for t in &self.source.topics {
            if t.starts_with(&format!("{}.", self.retry.topic_prefix)) {
                return Err(ConfigError::new(
                    "source.topics",
                    format!("{t:?} is one of hookline's own retry/dead-letter topics"),
                ));
            }
        }
        self.allow_networks()?;
        self.extra_roots()?;
        self.dns_servers()?;
        self.proxy()?;
        if !(Duration::from_millis(100)..=Duration::from_secs(30))
            .contains(&self.delivery.dns_timeout)
        {
            return Err(ConfigError::new(
                "delivery.dns_timeout",
                "must be 100ms..=30s",
            ));
        }
        if self.delivery.pool_max_lifetime < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "delivery.pool_max_lifetime",
                "must be at least 1s",
            ));
        }
        if self.delivery.tcp_keepalive > Duration::from_secs(7200) {
            return Err(ConfigError::new(
                "delivery.tcp_keepalive",
                "must be at most 2h (or 0s for off)",
            ));
        }
        range(
            "delivery.max_response_bytes",
            self.delivery.max_response_bytes as u64,
            0,
            1 << 20,
        )?;
        range(
            "delivery.default_timeout_ms",
            self.delivery.default_timeout_ms,
            1,
            600_000,
        )?;
        range(
            "delivery.default_max_in_flight",
            u64::from(self.delivery.default_max_in_flight),
            1,
            100_000,
        )?;
        range(
            "delivery.connect_timeout_ms",
            self.delivery.connect_timeout_ms,
            1,
            600_000,
        )?;
        range(
            "delivery.max_deferrals",
            u64::from(self.delivery.max_deferrals),
            0,
            1_000,
        )?;
        if self.source.max_commit_delay < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "source.max_commit_delay",
                "must be at least 100ms",
            ));
        }
        let b = &self.delivery.breaker;
        if b.window < Duration::from_millis(10) {
            return Err(ConfigError::new(
                "delivery.breaker.window",
                "must be at least 10ms",
            ));
        }
        range(
            "delivery.breaker.min_requests",
            u64::from(b.min_requests),
            1,
            1_000_000,
        )?;
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
            return Err(ConfigError::new(
                "delivery.breaker.failure_ratio",
                "must be greater than 0 and at most 1",
            ));
        }
        range(
            "delivery.breaker.consecutive_failures",
            u64::from(b.consecutive_failures),
            1,
            1_000_000,
        )?;
        if b.cool_down.is_zero() {
            return Err(ConfigError::new(
                "delivery.breaker.cool_down",
                "must be greater than 0",
            ));
        }
        range(
            "delivery.breaker.half_open_probes",
            u64::from(b.half_open_probes),
            1,
            10_000,
        )?;
        range(
            "retry.max_held_per_partition",
            self.retry.max_held_per_partition as u64,
            1,
            1_000_000,
        )?;
        if !(0.0..=1.0).contains(&self.retry.jitter) {
            return Err(ConfigError::new("retry.jitter", "must be within 0..=1"));
        }
        if let Some(g) = &self.retry.group
            && (g.trim().is_empty() || *g == self.source.group)
        {
            return Err(ConfigError::new(
                "retry.group",
                "must be non-empty and differ from source.group",
            ));
        }
        self.admin
            .listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| {
                ConfigError::new(
                    "admin.listen",
                    format!("{:?} is not host:port ({e})", self.admin.listen),
                )
            })?;
        if let Some(t) = &self.admin.token
            && t.len() < 8
        {
            return Err(ConfigError::new(
                "admin.token",
                "must be at least 8 characters",
            ));
        }
        self.validate_store()?;
        if self.admin.rotation_grace > Duration::from_secs(30 * 86_400) {
            return Err(ConfigError::new(
                "admin.rotation_grace",
                "must be at most 30 days",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::new("log.level", e.to_string()))?;
        range(
            "runtime.worker_threads",
            self.runtime.worker_threads as u64,
            0,
            256,
        )?;
        Ok(())
    }

    fn validate_store(&self) -> Result<(), ConfigError> {
        let st = &self.store;
        let ms = |d: Duration| d.as_millis() as u64;
        range(
            "store.refresh_interval",
            ms(st.refresh_interval),
            100,
            60_000,
        )?;
        range(
            "store.full_refresh_interval",
            ms(st.full_refresh_interval),
            ms(st.refresh_interval),
            86_400_000,
        )?;
        range(
            "store.attempt_ttl",
            st.attempt_ttl.as_secs(),
            60,
            365 * 86_400,
        )?;
        range(
            "store.attempt_buffer",
            st.attempt_buffer as u64,
            1,
            10_000_000,
        )?;
        range("store.attempt_batch", st.attempt_batch as u64, 1, 10_000)?;
        range(
            "store.attempt_expiry_interval",
            ms(st.attempt_expiry_interval),
            1_000,
            86_400_000,
        )?;
        if st.path.as_os_str().is_empty() && st.kind != StoreKind::Scylla {
            return Err(ConfigError::new("store.path", "must not be empty"));
        }
        let sc = &st.scylla;
        if st.kind == StoreKind::Scylla {
            if sc.nodes.is_empty() {
                return Err(ConfigError::new(
                    "store.scylla.nodes",
                    "must name at least one host:port",
                ));
            }
            if sc.username.is_some() != sc.password.is_some() {
                return Err(ConfigError::new(
                    "store.scylla.password",
                    "username and password go together",
                ));
            }
        }
        let ks_ok = sc.keyspace.len() <= 48
            && sc.keyspace.starts_with(|c: char| c.is_ascii_alphabetic())
            && sc
                .keyspace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ks_ok {
            return Err(ConfigError::new(
                "store.scylla.keyspace",
                "must be a CQL identifier: a letter, then letters, digits or _ (at most 48)",
            ));
        }
        if !(sc.replication.trim_start().starts_with('{')
            && sc.replication.trim_end().ends_with('}'))
            || sc.replication.contains(';')
        {
            return Err(ConfigError::new(
                "store.scylla.replication",
                "must be a CQL map like {'class': 'NetworkTopologyStrategy', 'replication_factor': 3}",
            ));
        }
        Ok(())
    }

    /// Consumer group of the tier consumers.
    pub fn retry_group(&self) -> String {
        self.retry
            .group
            .clone()
            .unwrap_or_else(|| format!("{}.retry", self.source.group))
    }

    /// The operator's webhook as a subscription spec, when `[operational] webhook_url` is set: id
    /// [`OPERATOR_SUBSCRIPTION`], every event type, the secret of `webhook_secret`.
    pub fn operator_subscription(
        &self,
    ) -> Result<Option<crate::model::SubscriptionSpec>, ConfigError> {
        let o = &self.operational;
        let Some(url) = &o.webhook_url else {
            if o.webhook_secret.is_some() {
                return Err(ConfigError::new(
                    "operational.webhook_secret",
                    "is only used with operational.webhook_url",
                ));
            }
            return Ok(None);
        };
        if !o.enabled {
            return Err(ConfigError::new(
                "operational.webhook_url",
                "needs operational.enabled = true",
            ));
        }
        let secret = o.webhook_secret.clone().ok_or_else(|| {
            ConfigError::new(
                "operational.webhook_secret",
                "is required with operational.webhook_url (a whsec_ secret)",
            )
        })?;
        crate::model::SigningKey::parse(&secret)
            .map_err(|m| ConfigError::new("operational.webhook_secret", m))?;
        let u = url::Url::parse(url).map_err(|e| {
            ConfigError::new(
                "operational.webhook_url",
                format!("{url:?} is not a URL ({e})"),
            )
        })?;
        if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
            return Err(ConfigError::new(
                "operational.webhook_url",
                "must be an http or https URL with a host",
            ));
        }
        let mut spec =
            crate::model::SubscriptionSpec::new(url.clone(), vec!["*".into()], vec![secret], 0);
        spec.id = OPERATOR_SUBSCRIPTION;
        spec.created_at = None;
        spec.updated_at = None;
        Ok(Some(spec))
    }

    /// The OTLP exporter's settings, when `[tracing] otlp_endpoint` is set.
    pub fn otlp(&self) -> Result<Option<OtlpExport>, ConfigError> {
        let Some(raw) = &self.tracing.otlp_endpoint else {
            return Ok(None);
        };
        let setting = "tracing.otlp_endpoint";
        let mut url = url::Url::parse(raw)
            .map_err(|e| ConfigError::new(setting, format!("{raw:?} is not a URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(ConfigError::new(
                setting,
                "must be an http or https URL with a host",
            ));
        }
        if !url.path().ends_with("/v1/traces") {
            let path = format!("{}/v1/traces", url.path().trim_end_matches('/'));
            url.set_path(&path);
        }
        if self.tracing.service_name.is_empty() {
            return Err(ConfigError::new(
                "tracing.service_name",
                "must not be empty",
            ));
        }
        if self.tracing.export_timeout.is_zero() {
            return Err(ConfigError::new(
                "tracing.export_timeout",
                "must be greater than 0",
            ));
        }
        if self.tracing.batch_delay.is_zero() {
            return Err(ConfigError::new(
                "tracing.batch_delay",
                "must be greater than 0",
            ));
        }
        Ok(Some(OtlpExport {
            url,
            service_name: self.tracing.service_name.clone(),
            timeout: self.tracing.export_timeout,
            batch_delay: self.tracing.batch_delay,
        }))
    }

    /// The retry tiers in order, with their delays. Validated by [`Config::validate`].
    pub fn tiers(&self) -> Result<Vec<Tier>, ConfigError> {
        if self.retry.tiers.is_empty() {
            return Err(ConfigError::new(
                "retry.tiers",
                "must list at least one tier",
            ));
        }
        let mut out: Vec<Tier> = Vec::new();
        for (i, name) in self.retry.tiers.iter().enumerate() {
            let setting = format!("retry.tiers[{i}]");
            let delay = parse_duration(name).map_err(|m| ConfigError::new(&setting, m))?;
            if delay.is_zero() {
                return Err(ConfigError::new(setting, "must be greater than 0"));
            }
            validate_topic_name(name).map_err(|m| ConfigError::new(&setting, m))?;
            if let Some(prev) = out.last()
                && prev.delay >= delay
            {
                return Err(ConfigError::new(
                    setting,
                    "tiers must be in increasing order of delay",
                ));
            }
            out.push(Tier {
                name: name.trim().to_string(),
                delay,
            });
        }
        Ok(out)
    }

    /// A librdkafka client configuration: `defaults`, then the `[kafka]` table, then `forced` (hookline's own
    /// settings, which the user cannot override).
    pub fn kafka_client(
        &self,
        defaults: &[(&str, &str)],
        forced: &[(&str, &str)],
    ) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.kafka {
            c.set(k, v);
        }
        for (k, v) in forced {
            c.set(*k, *v);
        }
        c
    }

    /// `delivery.proxy` with its `no_proxy` list.
    pub fn proxy(&self) -> Result<Option<crate::proxy::Proxy>, ConfigError> {
        let Some(url) = &self.delivery.proxy else {
            if !self.delivery.no_proxy.is_empty() {
                return Err(ConfigError::new(
                    "delivery.no_proxy",
                    "is set without delivery.proxy",
                ));
            }
            return Ok(None);
        };
        crate::proxy::Proxy::parse(url, &self.delivery.no_proxy)
            .map(Some)
            .map_err(|(i, m)| match i {
                Some(i) => ConfigError::new(format!("delivery.no_proxy[{i}]"), m),
                None => ConfigError::new("delivery.proxy", m),
            })
    }

    /// `delivery.dns_servers` as socket addresses (port 53 unless given).
    pub fn dns_servers(&self) -> Result<Vec<std::net::SocketAddr>, ConfigError> {
        self.delivery
            .dns_servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<std::net::SocketAddr>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                    .map_err(|_| {
                        ConfigError::new(
                            format!("delivery.dns_servers[{i}]"),
                            format!("{s:?} is not an IP address or ip:port"),
                        )
                    })
            })
            .collect()
    }

    /// The CA certificates of `delivery.tls.extra_ca_file` (none when unset).
    pub fn extra_roots(
        &self,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ConfigError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let Some(path) = &self.delivery.tls.extra_ca_file else {
            return Ok(Vec::new());
        };
        let err = |m: String| ConfigError::new("delivery.tls.extra_ca_file", m);
        let pem =
            std::fs::read(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(format!("{}: not PEM certificates ({e})", path.display())))?;
        if certs.is_empty() {
            return Err(err(format!(
                "{} holds no \"BEGIN CERTIFICATE\" block",
                path.display()
            )));
        }
        // Each must be a certificate rustls can use as a trust anchor.
        let mut store = rustls::RootCertStore::empty();
        for (i, c) in certs.iter().enumerate() {
            store.add(c.clone()).map_err(|e| {
                err(format!(
                    "{}: certificate {} is not a usable CA ({e})",
                    path.display(),
                    i + 1
                ))
            })?;
        }
        Ok(certs)
    }

    pub fn allow_networks(&self) -> Result<Vec<IpNet>, ConfigError> {
        self.delivery
            .allow_networks
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        ConfigError::new(
                            format!("delivery.allow_networks[{i}]"),
                            format!("{s:?} is not a CIDR such as \"127.0.0.0/8\""),
                        )
                    })
            })
            .collect()
    }
}

fn range(setting: &str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::new(
            setting,
            format!("{v} is out of range {lo}..={hi}"),
        ));
    }
    Ok(())
}

fn validate_topic_name(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 249
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{t:?} is not a valid Kafka topic name (1-249 of [a-zA-Z0-9._-])"
        ))
    }
}

/// Applies `HOOKLINE_A__B=value` overrides to the parsed TOML table.
fn apply_env(
    root: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("HOOKLINE_") && k.contains("__"))
        .collect();
    vars.sort();
    for (key, value) in vars {
        let rest = &key["HOOKLINE_".len()..];
        let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::new(
                key.clone(),
                "empty level in variable name",
            ));
        }
        let parsed = if parts[0] == "kafka" {
            // librdkafka property: kafka.<name with dots>, always a string.
            if parts.len() != 2 {
                return Err(ConfigError::new(
                    key.clone(),
                    "use HOOKLINE_KAFKA__<PROPERTY_WITH_UNDERSCORES>",
                ));
            }
            let prop = parts[1].replace('_', ".");
            let table = root
                .entry("kafka")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(t) = table.as_table_mut() else {
                return Err(ConfigError::new("kafka", "must be a table"));
            };
            t.insert(prop, toml::Value::String(value));
            continue;
        } else {
            parse_env_value(&value)
        };
        let mut cur = &mut *root;
        for (i, part) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                cur.insert(part.clone(), parsed);
                break;
            }
            let next = cur
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = next
                .as_table_mut()
                .ok_or_else(|| ConfigError::new(parts[..=i].join("."), "is not a table"))?;
        }
    }
    Ok(())
}

fn parse_env_value(v: &str) -> toml::Value {
    let doc = format!("v = {v}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(v.to_string())),
        Err(_) => toml::Value::String(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_ca_file_is_read_at_start_and_errors_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let with = |path: &std::path::Path| {
            format!(
                "{MIN}[delivery.tls]\nextra_ca_file = \"{}\"\n",
                path.display()
            )
        };
        let missing = dir.path().join("nope.pem");
        let e = load(&with(&missing), &[]).unwrap_err().to_string();
        assert!(
            e.starts_with("delivery.tls.extra_ca_file: cannot read"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = load(&with(&empty), &[]).unwrap_err().to_string();
        assert!(e.starts_with("delivery.tls.extra_ca_file:"), "{e}");
        assert!(e.contains("no \"BEGIN CERTIFICATE\""), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load(&with(&garbage), &[]).unwrap_err().to_string();
        assert!(e.contains("not a usable CA"), "{e}");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        let c = load(&with(&good), &[]).unwrap();
        assert_eq!(c.extra_roots().unwrap().len(), 1);
    }

    const MIN: &str = r#"
[kafka]
"bootstrap.servers" = "127.0.0.1:9092"
[source]
topics = ["orders"]
"#;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, toml).unwrap();
        Config::load(
            Some(&p),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn minimal_config_has_documented_defaults() {
        let c = load(MIN, &[]).unwrap();
        assert_eq!(c.source.group, "hookline");
        assert_eq!(c.retry.topic_prefix, "hookline");
        let tiers = c.tiers().unwrap();
        assert_eq!(tiers.len(), 5);
        assert_eq!(tiers[0].delay, Duration::from_secs(60));
        assert_eq!(tiers[4].delay, Duration::from_secs(24 * 3600));
        assert_eq!(c.store.kind, StoreKind::Sqlite);
        assert_eq!(c.delivery.max_response_bytes, 4096);
        assert_eq!(c.source.max_event_bytes, 1 << 20);
    }

    #[test]
    fn env_overrides_nested_keys_lists_and_kafka_properties() {
        let c = load(
            MIN,
            &[
                ("HOOKLINE_SOURCE__TOPICS", "a, b"),
                ("HOOKLINE_SOURCE__MAX_EVENT_BYTES", "2048"),
                ("HOOKLINE_RETRY__TIERS", r#"["1s","2s"]"#),
                ("HOOKLINE_KAFKA__BOOTSTRAP_SERVERS", "other:9093"),
                ("HOOKLINE_DELIVERY__ALLOW_NETWORKS", "127.0.0.0/8"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.source.topics, vec!["a", "b"]);
        assert_eq!(c.source.max_event_bytes, 2048);
        assert_eq!(c.retry.tiers, vec!["1s", "2s"]);
        assert_eq!(c.kafka["bootstrap.servers"], "other:9093");
        assert_eq!(c.allow_networks().unwrap().len(), 1);
    }

    fn err_of(toml: &str, env: &[(&str, &str)]) -> String {
        load(toml, env).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_setting() {
        assert!(err_of(MIN, &[("HOOKLINE_SOURCE__TOPICS", "")]).starts_with("source.topics:"));
        assert!(
            err_of(MIN, &[("HOOKLINE_RETRY__TIERS", "1m,banana")]).starts_with("retry.tiers[1]:")
        );
        assert!(err_of(MIN, &[("HOOKLINE_RETRY__TIERS", "5m,1m")]).starts_with("retry.tiers[1]:"));
        assert!(
            err_of(
                MIN,
                &[("HOOKLINE_DELIVERY__ALLOW_NETWORKS", "10.0.0.0/8,nope")]
            )
            .starts_with("delivery.allow_networks[1]:")
        );
        assert!(
            err_of(MIN, &[("HOOKLINE_SOURCE__MAX_EVENT_BYTES", "0")])
                .starts_with("source.max_event_bytes:")
        );
        assert!(err_of(MIN, &[("HOOKLINE_ADMIN__LISTEN", "nowhere")]).starts_with("admin.listen:"));
        let e = err_of(&format!("{MIN}\n[delivery]\ntimeout = 5\n"), &[]);
        assert!(e.starts_with("delivery"), "{e}");
        assert!(e.contains("timeout"), "{e}");
        let e = err_of(&format!("{MIN}\nmax_event_bytes = \"big\"\n"), &[]);
        assert!(e.starts_with("source.max_event_bytes:"), "{e}");
        let e = err_of("[source]\ntopics=[\"a\"]\n", &[]);
        assert!(e.starts_with("kafka.\"bootstrap.servers\":"), "{e}");
        let e = err_of(&format!("{MIN}\n[store]\nkind = \"postgres\"\n"), &[]);
        assert!(e.starts_with("store.kind:"), "{e}");
        let e = err_of(MIN, &[("HOOKLINE_KAFKA__GROUP_ID", "x")]);
        assert!(e.starts_with("kafka.\"group.id\":"), "{e}");
        let e = err_of(MIN, &[("HOOKLINE_SOURCE__TOPICS", "hookline.dlq")]);
        assert!(e.starts_with("source.topics:"), "{e}");
        let e = err_of(MIN, &[("HOOKLINE_SOURCE__SHUTDOWN_TIMEOUT", "soon")]);
        assert!(e.starts_with("source.shutdown_timeout:"), "{e}");
        let e = err_of("[source\n", &[]);
        assert!(e.starts_with("config: invalid TOML"), "{e}");
    }

    #[test]
    fn failure_handling_settings_are_validated() {
        for (var, value, setting) in [
            (
                "HOOKLINE_DELIVERY__BREAKER__FAILURE_RATIO",
                "1.5",
                "delivery.breaker.failure_ratio:",
            ),
            (
                "HOOKLINE_DELIVERY__BREAKER__HALF_OPEN_PROBES",
                "0",
                "delivery.breaker.half_open_probes:",
            ),
            (
                "HOOKLINE_DELIVERY__BREAKER__COOL_DOWN",
                "0s",
                "delivery.breaker.cool_down:",
            ),
            (
                "HOOKLINE_DELIVERY__BREAKER__CONSECUTIVE_FAILURES",
                "0",
                "delivery.breaker.consecutive_failures:",
            ),
            (
                "HOOKLINE_SOURCE__MAX_COMMIT_DELAY",
                "10ms",
                "source.max_commit_delay:",
            ),
            (
                "HOOKLINE_DELIVERY__MAX_DEFERRALS",
                "5000",
                "delivery.max_deferrals:",
            ),
            (
                "HOOKLINE_SOURCE__GROUP_PROTOCOL",
                "eager",
                "source.group_protocol",
            ),
            (
                "HOOKLINE_SOURCE__INSTANCE_ID",
                "pod 0",
                "source.instance_id:",
            ),
            ("HOOKLINE_RETRY__JITTER", "2", "retry.jitter:"),
            ("HOOKLINE_RETRY__GROUP", "hookline", "retry.group:"),
            (
                "HOOKLINE_RETRY__MAX_HELD_PER_PARTITION",
                "0",
                "retry.max_held_per_partition:",
            ),
        ] {
            let e = err_of(MIN, &[(var, value)]);
            assert!(e.starts_with(setting), "{var}={value}: {e}");
        }
        // Classic-only librdkafka settings are refused under the consumer protocol, naming them.
        let e = err_of(
            MIN,
            &[
                ("HOOKLINE_SOURCE__GROUP_PROTOCOL", "consumer"),
                ("HOOKLINE_KAFKA__SESSION_TIMEOUT_MS", "6000"),
            ],
        );
        assert!(e.starts_with("kafka.\"session.timeout.ms\":"), "{e}");
        // Settings of the old queue bound are accepted, and reported as no longer used.
        let c = load(
            MIN,
            &[
                ("HOOKLINE_DELIVERY__QUEUE_WAIT", "5s"),
                ("HOOKLINE_DELIVERY__ENDPOINT_QUEUE", "100"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.obsolete_settings(),
            ["delivery.endpoint_queue", "delivery.queue_wait"]
        );
        let c = load(MIN, &[]).unwrap();
        assert!(c.obsolete_settings().is_empty());
        assert_eq!(c.source.max_commit_delay, Duration::from_secs(30));
        assert_eq!(c.retry_group(), format!("{}.retry", c.source.group));
        assert_eq!(c.delivery.breaker.half_open_probes, 3);
        let c = load(MIN, &[("HOOKLINE_DELIVERY__BREAKER__COOL_DOWN", "2s")]).unwrap();
        assert_eq!(c.delivery.breaker.cool_down, Duration::from_secs(2));
    }

    #[test]
    fn store_and_admin_settings_are_validated() {
        for (var, value, setting) in [
            (
                "HOOKLINE_STORE__REFRESH_INTERVAL",
                "10ms",
                "store.refresh_interval:",
            ),
            (
                "HOOKLINE_STORE__FULL_REFRESH_INTERVAL",
                "100ms",
                "store.full_refresh_interval:",
            ),
            ("HOOKLINE_STORE__ATTEMPT_TTL", "10s", "store.attempt_ttl:"),
            (
                "HOOKLINE_STORE__ATTEMPT_BUFFER",
                "0",
                "store.attempt_buffer:",
            ),
            ("HOOKLINE_STORE__ATTEMPT_BATCH", "0", "store.attempt_batch:"),
            (
                "HOOKLINE_STORE__ATTEMPT_EXPIRY_INTERVAL",
                "1ms",
                "store.attempt_expiry_interval:",
            ),
            (
                "HOOKLINE_STORE__SCYLLA__KEYSPACE",
                "bad-name",
                "store.scylla.keyspace:",
            ),
            (
                "HOOKLINE_STORE__SCYLLA__REPLICATION",
                "3; DROP",
                "store.scylla.replication:",
            ),
            (
                "HOOKLINE_ADMIN__ROTATION_GRACE",
                "90d",
                "admin.rotation_grace:",
            ),
            ("HOOKLINE_ADMIN__TOKEN", "short", "admin.token:"),
        ] {
            let e = err_of(MIN, &[(var, value)]);
            assert!(e.starts_with(setting), "{var}={value}: {e}");
        }
        let e = err_of(
            MIN,
            &[
                ("HOOKLINE_STORE__KIND", "scylla"),
                ("HOOKLINE_STORE__SCYLLA__USERNAME", "u"),
            ],
        );
        assert!(e.starts_with("store.scylla.password:"), "{e}");
        let c = load(
            MIN,
            &[
                ("HOOKLINE_STORE__KIND", "scylla"),
                ("HOOKLINE_STORE__SCYLLA__NODES", "a:9042,b:9042"),
                ("HOOKLINE_STORE__ATTEMPT_TTL", "7d"),
            ],
        )
        .unwrap();
        assert_eq!(c.store.scylla.nodes, vec!["a:9042", "b:9042"]);
        assert_eq!(c.store.attempt_ttl, Duration::from_secs(7 * 86_400));
        assert_eq!(c.store.refresh_interval, Duration::from_secs(1));
        assert_eq!(c.admin.rotation_grace, Duration::from_secs(86_400));
    }

    #[test]
    fn scylla_consistency_levels_are_validated() {
        let c = load(MIN, &[]).unwrap();
        assert_eq!(c.store.scylla.consistency, Consistency::LocalQuorum);
        assert_eq!(c.store.scylla.attempt_consistency, Consistency::LocalOne);
        let c = load(
            &format!("{MIN}\n[store.scylla]\nconsistency = \"quorum\"\n"),
            &[(
                "HOOKLINE_STORE__SCYLLA__ATTEMPT_CONSISTENCY",
                "LOCAL_QUORUM",
            )],
        )
        .unwrap();
        assert_eq!(c.store.scylla.consistency, Consistency::Quorum);
        assert_eq!(c.store.scylla.attempt_consistency, Consistency::LocalQuorum);
        for (var, value, why) in [
            ("CONSISTENCY", "EACH_QUORUM", "for writes only"),
            ("CONSISTENCY", "any", "for writes only"),
            ("CONSISTENCY", "LOCAL_SERIAL", "lightweight transactions"),
            ("ATTEMPT_CONSISTENCY", "strong", "not a consistency level"),
        ] {
            let var = format!("HOOKLINE_STORE__SCYLLA__{var}");
            let e = err_of(MIN, &[(var.as_str(), value)]);
            let setting = format!("store.scylla.{}:", var[24..].to_ascii_lowercase());
            assert!(e.starts_with(&setting), "{var}={value}: {e}");
            assert!(e.contains(why) && e.contains("LOCAL_QUORUM"), "{e}");
        }
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hookline.toml");
        let c = Config::load(Some(&p), std::iter::empty()).unwrap();
        assert!(!c.source.topics.is_empty());
    }
}
