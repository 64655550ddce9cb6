//! Group commit: many waiters, one sync. Whoever asks while a sync runs is served by the next one.
//!
//! A task owns the sync function and a bounded channel of waiters. It takes the first request,
//! drains every other request already queued, runs the sync once on the blocking pool and answers
//! them all. Anything written before a request was sent is covered by the sync that answers it.
//! The batch adapts by itself: one when idle, dozens under load, no timer.

use std::io;
use std::sync::Arc;

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

use crate::fsio::blocking;

type Waiter = oneshot::Sender<Result<(), Arc<io::Error>>>;

#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Waiter>,
}

impl GroupCommit {
    /// Spawns the commit task on the current runtime. `sync` runs on the blocking pool.
    pub fn spawn<F>(name: &'static str, sync: F, batch_sizes: Histogram) -> Self
    where
        F: Fn() -> io::Result<()> + Send + Sync + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Waiter>(4096);
        let sync = Arc::new(sync);
        actix_rt::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(w) = rx.try_recv() {
                    batch.push(w);
                }
                let f = sync.clone();
                let result = blocking(move || f()).await.map_err(Arc::new);
                batch_sizes.observe(batch.len() as f64);
                if let Err(e) = &result {
                    tracing::error!(what = name, error = %e, "sync failed");
                }
                for w in batch {
                    let _ = w.send(result.clone());
                }
            }
        });
        GroupCommit { tx }
    }

    /// Waits until everything written before this call is durable.
    pub async fn commit(&self) -> Result<(), Arc<io::Error>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).await.map_err(|_| Arc::new(io::Error::other("commit task stopped")))?;
        rx.await.map_err(|_| Arc::new(io::Error::other("commit task stopped")))?
    }
}
