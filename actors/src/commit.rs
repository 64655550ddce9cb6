//! Group commit: many waiters, one sync. Whoever asks while a sync runs is served by the next one.
//!
//! A task owns the sync function and a bounded channel of waiters. It takes the first request,
//! drains every other request already queued, runs the sync once (the store's commit: an
//! `fdatasync` on the blocking pool for sled, a transaction for PostgreSQL) and answers them all. Anything written before a request was sent is covered by the sync that answers it.
//! The batch adapts by itself: one when idle, dozens under load, no timer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), Arc<io::Error>>>;

/// One sync under way.
pub type SyncFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// A sync that has not finished within this long is given up on: its waiters get an error
/// (so clients get 451, not silence), and no new sync starts until it has finished. sled's flush
/// never returns after an I/O error such as a full disk; a stuck disk or a database that stopped
/// answering may do the same.
pub const SYNC_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Waiter>,
    stuck: Arc<AtomicBool>,
}

impl GroupCommit {
    /// Spawns the commit task on the current runtime. `sync` starts one sync (whatever it
    /// blocks must run elsewhere: the future is polled on this runtime), which is given up on
    /// after `deadline`.
    pub fn spawn<F>(name: &'static str, sync: F, batch_sizes: Histogram, deadline: Duration) -> Self
    where
        F: Fn() -> SyncFuture + Send + Sync + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Waiter>(4096);
        let stuck = Arc::new(AtomicBool::new(false));
        let flag = stuck.clone();
        actix_rt::spawn(async move {
            // A sync that outlived its deadline, still running on the blocking pool.
            let mut late: Option<Pin<Box<dyn Future<Output = io::Result<()>>>>> = None;
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(w) = rx.try_recv() {
                    batch.push(w);
                }
                if let Some(fut) = late.as_mut() {
                    match tokio::time::timeout(Duration::ZERO, fut).await {
                        Ok(_) => {
                            late = None;
                            flag.store(false, Ordering::Relaxed);
                            tracing::warn!(what = name, "the sync that was stuck has finished; syncing again");
                        }
                        Err(_) => {
                            let e = Arc::new(io::Error::new(io::ErrorKind::TimedOut, "the last sync is still stuck"));
                            for w in batch {
                                let _ = w.send(Err(e.clone()));
                            }
                            continue;
                        }
                    }
                }
                let mut fut: Pin<Box<dyn Future<Output = io::Result<()>>>> = sync();
                let result = match tokio::time::timeout(deadline, &mut fut).await {
                    Ok(r) => r.map_err(Arc::new),
                    Err(_) => {
                        tracing::error!(
                            what = name,
                            deadline_s = deadline.as_secs(),
                            "sync stuck; refusing until it finishes"
                        );
                        flag.store(true, Ordering::Relaxed);
                        late = Some(fut);
                        Err(Arc::new(io::Error::new(io::ErrorKind::TimedOut, "sync did not finish in time")))
                    }
                };
                batch_sizes.observe(batch.len() as f64);
                if let Err(e) = &result {
                    tracing::error!(what = name, error = %e, "sync failed");
                }
                for w in batch {
                    let _ = w.send(result.clone());
                }
            }
        });
        GroupCommit { tx, stuck }
    }

    /// A sync has outlived its deadline and has not finished yet: nothing can be made durable.
    pub fn stuck(&self) -> bool {
        self.stuck.load(Ordering::Relaxed)
    }

    /// Waits until everything written before this call is durable.
    pub async fn commit(&self) -> Result<(), Arc<io::Error>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).await.map_err(|_| Arc::new(io::Error::other("commit task stopped")))?;
        rx.await.map_err(|_| Arc::new(io::Error::other("commit task stopped")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sync that hangs (sled's flush after a full disk) answers its waiters with an error at
    /// the deadline, refuses further commits at once while it hangs, and syncing resumes once it
    /// finishes.
    #[actix_rt::test]
    async fn a_stuck_sync_is_given_up_on() {
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = std::sync::Mutex::new(gate);
        let hang = Arc::new(AtomicBool::new(true));
        let h = hang.clone();
        let gate = Arc::new(gate);
        let sync = move || -> SyncFuture {
            let (h, gate) = (h.clone(), gate.clone());
            Box::pin(crate::fsio::blocking(move || {
                if h.swap(false, Ordering::SeqCst) {
                    let _ = gate.lock().map(|g| g.recv());
                }
                Ok(())
            }))
        };
        let c = GroupCommit::spawn("test", sync, Histogram::new([1.0].into_iter()), Duration::from_millis(100));
        let e = c.commit().await.expect_err("given up on");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(c.stuck());
        let started = std::time::Instant::now();
        assert!(c.commit().await.is_err(), "refused while stuck");
        assert!(started.elapsed() < Duration::from_millis(50), "at once");
        release.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.commit().await.expect("syncing again once it finished");
        assert!(!c.stuck());
    }
}
