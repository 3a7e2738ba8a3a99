//! The attempt log's writer (DESIGN §10): deliveries hand their attempt records to a bounded channel
//! (`try_send`, never waiting), and one task writes them to the store in batches. When the store lags or
//! fails, records are dropped and counted — the delivery path never slows down for its own history.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{AttemptRecord, Store};
use crate::config::StoreConfig;
use crate::metrics::Metrics;

/// The sending side, held by the dispatcher. Cloning is cheap.
#[derive(Clone)]
pub struct AttemptLog {
    tx: Option<mpsc::Sender<AttemptRecord>>,
    metrics: Arc<Metrics>,
}

impl AttemptLog {
    /// A log that records nothing (read-only store, or `store.attempt_log = false`).
    pub fn disabled(metrics: Arc<Metrics>) -> AttemptLog {
        AttemptLog { tx: None, metrics }
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one record; drops (and counts) it when the buffer is full.
    pub fn record(&self, rec: AttemptRecord) {
        if let Some(tx) = &self.tx
            && tx.try_send(rec).is_err()
        {
            self.metrics.attempt_log_dropped.inc();
        }
    }

    /// Starts the writer (and, where the store needs it, the periodic expiry). The writer stops when
    /// `stop` is cancelled, after writing what is already queued.
    pub fn start(
        store: Arc<dyn Store>,
        cfg: &StoreConfig,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> (AttemptLog, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(cfg.attempt_buffer);
        let writer = tokio::spawn(write_loop(
            store.clone(),
            rx,
            cfg.attempt_batch,
            metrics.clone(),
            stop.clone(),
        ));
        tokio::spawn(expire_loop(store, cfg.attempt_expiry_interval, stop));
        (
            AttemptLog {
                tx: Some(tx),
                metrics,
            },
            writer,
        )
    }
}

/// A store write slower than this counts as failed (its records are dropped).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the writer waits for a batch to fill once it has records: one store write (one SQLite
/// commit) per batch instead of one per handful of records; the rows appear at most this much later.
const LINGER: Duration = Duration::from_millis(20);

async fn write_loop(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<AttemptRecord>,
    batch: usize,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut buf = Vec::with_capacity(batch);
    let mut failing = false;
    loop {
        let mut n = tokio::select! {
            n = rx.recv_many(&mut buf, batch) => n,
            _ = stop.cancelled() => {
                // Write what is queued, then stop.
                while rx.try_recv().map(|r| buf.push(r)).is_ok() {}
                0
            }
        };
        if n > 0 && buf.len() < batch {
            let deadline = tokio::time::Instant::now() + LINGER;
            while buf.len() < batch {
                let room = batch - buf.len();
                tokio::select! {
                    more = rx.recv_many(&mut buf, room) => {
                        if more == 0 {
                            n = 0; // closed: write what there is, then stop
                            break;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = stop.cancelled() => break,
                }
            }
        }
        if !buf.is_empty() {
            let len = buf.len() as u64;
            match tokio::time::timeout(WRITE_TIMEOUT, store.write_attempts(&buf)).await {
                Ok(Ok(())) => {
                    metrics.attempt_log_written.inc_by(len);
                    if failing {
                        tracing::info!("attempt log writes succeed again");
                        failing = false;
                    }
                }
                Ok(Err(e)) => {
                    metrics.attempt_log_dropped.inc_by(len);
                    if !failing {
                        tracing::warn!(error = %e, "attempt log write failed; records are dropped until the store recovers");
                        failing = true;
                    }
                }
                Err(_) => {
                    metrics.attempt_log_dropped.inc_by(len);
                    if !failing {
                        tracing::warn!(
                            "attempt log write timed out; records are dropped until the store recovers"
                        );
                        failing = true;
                    }
                }
            }
            buf.clear();
        }
        if n == 0 {
            return;
        }
    }
}

async fn expire_loop(store: Arc<dyn Store>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.expire_attempts().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "expired delivery attempts deleted"),
            Err(e) => tracing::warn!(error = %e, "deleting expired delivery attempts failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SubscriptionSpec;
    use crate::store::{Page, StoreError};
    use async_trait::async_trait;
    use std::sync::Mutex;
    use uuid::Uuid;

    /// A store whose attempt writes block until released, and which keeps what it was given.
    struct Slow {
        gate: tokio::sync::Semaphore,
        written: Mutex<Vec<AttemptRecord>>,
        /// Sizes of the store writes, in order.
        batches: Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl Store for Slow {
        fn describe(&self) -> String {
            "slow".into()
        }
        async fn list(&self) -> Result<Vec<SubscriptionSpec>, StoreError> {
            Ok(vec![])
        }
        async fn revision(&self) -> Result<Option<String>, StoreError> {
            Ok(None)
        }
        async fn page(
            &self,
            _: Option<&str>,
            _: u32,
        ) -> Result<Page<SubscriptionSpec>, StoreError> {
            unimplemented!()
        }
        async fn get(&self, _: Uuid) -> Result<Option<SubscriptionSpec>, StoreError> {
            Ok(None)
        }
        async fn put(&self, _: &SubscriptionSpec) -> Result<(), StoreError> {
            Ok(())
        }
        async fn delete(&self, _: Uuid) -> Result<bool, StoreError> {
            Ok(false)
        }
        async fn write_attempts(&self, batch: &[AttemptRecord]) -> Result<(), StoreError> {
            let _p = self
                .gate
                .acquire()
                .await
                .map_err(|_| StoreError::BadCursor)?;
            self.written.lock().unwrap().extend_from_slice(batch);
            self.batches.lock().unwrap().push(batch.len());
            Ok(())
        }
        async fn attempts(
            &self,
            _: Uuid,
            _: Option<&str>,
            _: u32,
        ) -> Result<Page<AttemptRecord>, StoreError> {
            unimplemented!()
        }
        async fn expire_attempts(&self) -> Result<u64, StoreError> {
            Ok(0)
        }
    }

    fn rec(i: u32) -> AttemptRecord {
        AttemptRecord {
            subscription_id: Uuid::nil(),
            at_ms: 1,
            event_id: format!("e{i}"),
            event_type: "t".into(),
            attempt: 1,
            result: "delivered".into(),
            status_code: Some(200),
            duration_ms: 1,
            error: None,
        }
    }

    #[tokio::test]
    async fn a_lagging_store_drops_and_counts_without_blocking_then_drains_on_stop() {
        let store = Arc::new(Slow {
            gate: tokio::sync::Semaphore::new(0),
            written: Mutex::default(),
            batches: Mutex::default(),
        });
        let metrics = Arc::new(Metrics::new());
        let cfg = StoreConfig {
            attempt_buffer: 10,
            attempt_batch: 4,
            ..StoreConfig::default()
        };
        let stop = CancellationToken::new();
        let (log, writer) = AttemptLog::start(store.clone(), &cfg, metrics.clone(), stop.clone());
        // The writer takes the first batch and blocks in the store; the channel then fills up.
        for i in 0..100 {
            log.record(rec(i));
            tokio::task::yield_now().await;
        }
        let dropped = metrics.attempt_log_dropped.get();
        // At most one batch in the writer's hands plus a full buffer were kept.
        assert!(
            (100 - 4 - 10..=100 - 10).contains(&dropped),
            "dropped {dropped}"
        );
        store.gate.add_permits(1000);
        stop.cancel();
        writer.await.unwrap();
        let written = store.written.lock().unwrap().len() as u64;
        assert_eq!(written + dropped, 100);
        assert_eq!(metrics.attempt_log_written.get(), written);
    }

    #[tokio::test(start_paused = true)]
    async fn records_arriving_within_the_linger_share_one_write() {
        let store = Arc::new(Slow {
            gate: tokio::sync::Semaphore::new(1000),
            written: Mutex::default(),
            batches: Mutex::default(),
        });
        let metrics = Arc::new(Metrics::new());
        let cfg = StoreConfig {
            attempt_batch: 500,
            ..StoreConfig::default()
        };
        let stop = CancellationToken::new();
        let (log, writer) = AttemptLog::start(store.clone(), &cfg, metrics.clone(), stop.clone());
        let settle = async || {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };
        for i in 0..3 {
            log.record(rec(i));
        }
        settle().await;
        tokio::time::advance(LINGER / 2).await;
        settle().await;
        assert!(
            store.batches.lock().unwrap().is_empty(),
            "written before the linger ended"
        );
        for i in 3..5 {
            log.record(rec(i));
        }
        tokio::time::advance(LINGER).await;
        settle().await;
        assert_eq!(
            *store.batches.lock().unwrap(),
            vec![5],
            "one write for the five"
        );
        // A full batch does not wait.
        for i in 0..500 {
            log.record(rec(i));
        }
        settle().await;
        assert_eq!(*store.batches.lock().unwrap(), vec![5, 500]);
        stop.cancel();
        writer.await.unwrap();
        assert_eq!(metrics.attempt_log_written.get(), 505);
    }
}
