//! Command line (DESIGN §8). Usage errors exit 2 (clap's convention, kept for config errors too).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "hookline", version, about = "Kafka events to signed webhooks")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the dispatcher and the admin API.
    Run(RunArgs),
    /// Apply the store schema (ScyllaDB: keyspace and tables from schemas/scylla.cql; SQLite: the file's
    /// tables). Idempotent.
    Migrate(ConfigArgs),
    /// List, create, import, enable or disable subscriptions directly in the store.
    #[command(subcommand)]
    Subscriptions(SubscriptionsCommand),
    /// Create, list or revoke tenant-scoped API tokens directly in the store.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Re-publish dead-letter records (or the records of any topic hookline wrote), filtered, rate-limited,
    /// bounded by the end offsets at start, resumable.
    Replay(ReplayArgs),
    /// Look at the dead-letter topic.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Print the `webhook-signature` value for a body read from stdin.
    Sign(SignArgs),
    /// Check a `webhook-signature` value against a body read from stdin (exit 0 valid, 1 invalid).
    Verify(VerifyArgs),
    /// Make a new Ed25519 signing key; prints `{"signing_key": "whsk_…", "public_key": "whpk_…"}`.
    Keygen,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML); `HOOKLINE_…` variables override it.
    #[arg(long, env = "HOOKLINE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration and the subscriptions, print a summary, and exit (0 ok, 2 invalid).
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Configuration file (TOML); `HOOKLINE_…` variables override it. Only [store] is used.
    #[arg(long, env = "HOOKLINE_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Make a token that sees and changes only one tenant's objects; prints its id and the token
    /// (shown this once: the store keeps only its SHA-256).
    Create {
        #[arg(long)]
        tenant: String,
        /// A label for listings.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. `90d` or `12h` (default: no expiry).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print every token (id, tenant, name, created, expires); never the tokens themselves.
    List(ConfigArgs),
    /// Revoke a token: every instance refuses it from the next request on.
    Revoke {
        id: uuid::Uuid,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionsCommand {
    /// Print every subscription (id, enabled, tenant, event types, URL).
    List(ConfigArgs),
    /// Validate a YAML file of subscriptions and write them all into the store (insert or replace by id).
    Import {
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Create a subscription with a generated secret; prints its id and secret.
    Create {
        #[arg(long)]
        url: String,
        /// Event-type pattern (repeatable): `order.created`, `order.*` or `*`.
        #[arg(long = "event-type", required = true)]
        event_types: Vec<String>,
        #[arg(long)]
        tenant: Option<String>,
        /// PEM file of the client certificate (chain) for mutual TLS; needs --tls-client-key.
        #[arg(long, requires = "tls_client_key")]
        tls_client_cert: Option<PathBuf>,
        /// PEM file of the client certificate's private key.
        #[arg(long, requires = "tls_client_cert")]
        tls_client_key: Option<PathBuf>,
        /// `key`: one event per ordering key at a time, in offset order; a failing key parks only
        /// itself (default `none`).
        #[arg(long, value_parser = ["none", "key"])]
        ordering: Option<String>,
        /// Where the ordering key comes from: `record_key` (default), `subject` or `data.<path>`.
        #[arg(long, requires = "ordering")]
        ordering_key: Option<String>,
        /// After an ordered event is dead-lettered: `continue` (default) or `hold` the key until
        /// released.
        #[arg(long, requires = "ordering", value_parser = ["continue", "hold"])]
        on_dead_letter: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Stop deliveries to a subscription.
    Disable {
        id: uuid::Uuid,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Resume deliveries to a subscription.
    Enable {
        id: uuid::Uuid,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Topic to read (default: the dead-letter topic, `<retry.topic_prefix>.dlq`).
    #[arg(long)]
    pub from: Option<String>,
    /// Only records of this subscription.
    #[arg(long)]
    pub subscription: Option<uuid::Uuid>,
    /// Only events whose type matches this pattern (`order.created`, `order.*`, `*`).
    #[arg(long = "event-type")]
    pub event_type: Option<String>,
    /// Only records dead-lettered for this reason (exhausted, rejected, gone, invalid_event).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only records dead-lettered at or after this time (RFC 3339, or a duration meaning "ago": 2h).
    #[arg(long)]
    pub since: Option<String>,
    /// Only records dead-lettered before this time (RFC 3339, or a duration meaning "ago").
    #[arg(long)]
    pub until: Option<String>,
    /// `retry.<tier>` (the record's one subscription, through the retry path; default the first tier) or
    /// `source` (re-publish to the origin topic for full re-matching).
    #[arg(long)]
    pub to: Option<String>,
    /// At most this many records per second.
    #[arg(long)]
    pub rate: Option<u32>,
    /// Stop after this many matching records.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Count and show a sample; produce and commit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Consumer group that records progress (default: derived from --from, --to and the filters, so the
    /// same command resumes where an interrupted one stopped).
    #[arg(long)]
    pub group: Option<String>,
    /// Records shown as a sample.
    #[arg(long, default_value_t = 5)]
    pub sample: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Counts by reason, subscription and event type; oldest and newest record.
    Stats {
        /// Topic to read (default: the dead-letter topic).
        #[arg(long)]
        topic: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// Signing secret `whsec_<base64>` (prints `v1,…`) or Ed25519 signing key `whsk_<base64>`
    /// (prints `v1a,…`).
    #[arg(long)]
    pub secret: String,
    /// The `webhook-id` value.
    #[arg(long)]
    pub id: String,
    /// Unix seconds (default: now).
    #[arg(long)]
    pub timestamp: Option<u64>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Signing secret `whsec_…` (checks `v1,` signatures), or Ed25519 public key `whpk_…` or signing
    /// key `whsk_…` (checks `v1a,` signatures).
    #[arg(long)]
    pub secret: String,
    #[arg(long)]
    pub id: String,
    #[arg(long)]
    pub timestamp: u64,
    /// The `webhook-signature` header value (one or more space-separated `v1,…` / `v1a,…`).
    #[arg(long)]
    pub signature: String,
    /// Also reject timestamps further than this many seconds from now (Standard Webhooks uses 300).
    #[arg(long)]
    pub tolerance: Option<u64>,
}
