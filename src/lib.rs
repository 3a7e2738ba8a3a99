//! hookline: Kafka events to signed webhook deliveries. See ARCHITECTURE.md for the flow and invariants.

pub mod admin;
pub mod cli;
pub mod clock;
pub mod completion;
pub mod config;
pub mod decode;
pub mod deliver;
pub mod dispatch;
pub mod kafka;
pub mod manage;
pub mod matching;
pub mod metrics;
pub mod model;
pub mod operational;
pub mod order;
pub mod otlp;
pub mod pipeline;
pub mod proxy;
pub mod registry;
pub mod replay;
pub mod retry;
pub mod shutdown;
pub mod source;
pub mod spill;
pub mod store;
