//! The `hookline-*` headers of retry and dead-letter records (DESIGN §5).

pub const SUBSCRIPTION: &str = "hookline-subscription";
pub const ATTEMPT: &str = "hookline-attempt";
pub const DUE_MS: &str = "hookline-due-ms";
pub const ORIGIN_TOPIC: &str = "hookline-origin-topic";
pub const ORIGIN_PARTITION: &str = "hookline-origin-partition";
pub const ORIGIN_OFFSET: &str = "hookline-origin-offset";
/// The source record's timestamp (epoch ms), so that a delivery after retries still measures its end-to-end
/// time from the original append. Absent when the source record had none.
pub const ORIGIN_TIMESTAMP_MS: &str = "hookline-origin-timestamp-ms";
pub const FIRST_FAILURE_MS: &str = "hookline-first-failure-ms";
pub const LAST_STATUS: &str = "hookline-last-status";
pub const LAST_ERROR: &str = "hookline-last-error";
pub const DLQ_REASON: &str = "hookline-dlq-reason";
/// Times a delivery was handed to the first tier because its endpoint's queue was full (no attempt
/// spent). Absent when zero.
pub const DEFERRALS: &str = "hookline-deferrals";
/// On a dead-letter record whose value was left out because it exceeded `source.max_event_bytes` by more
/// than 512 KiB: the original value's size in bytes (the origin headers point at the source record).
pub const VALUE_OMITTED: &str = "hookline-value-omitted";
/// On a parked-topic record (ordered delivery): `event` (an event of a parked key), `hold:<reason>` (the
/// marker of a dead-lettered event holding its key, `on_dead_letter: hold`), or an operator's `release`
/// / `skip` of the key at `hookline-origin-offset`.
pub const PARKED: &str = "hookline-parked";
/// On a dead-letter record of an ordered subscription's event: its ordering key (raw bytes). A replay
/// to a tier sends such records through the parked topic of their origin partition, in order per key.
pub const ORDERING_KEY: &str = "hookline-ordering-key";
/// The run of `hookline replay` that re-published a record.
pub const REPLAY_ID: &str = "hookline-replay-id";

/// Headers hookline sets itself; any earlier value is replaced (origin ones are carried over explicitly).
pub fn is_hookline_header(name: &str) -> bool {
    name.len() > 9 && name[..9].eq_ignore_ascii_case("hookline-")
}
