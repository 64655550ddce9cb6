//! Idle outbound connections kept for reuse, and the permits that bound how many connections
//! exist: one global semaphore and one semaphore per route (destination domain or smart host).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::connection::Connection;
use crate::metrics::Metrics;

/// The right to have one connection open: held for the connection's whole life.
pub struct Permits {
    _global: OwnedSemaphorePermit,
    _route: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Permits {
    fn drop(&mut self) {
        self.metrics.outbound_connections_current.dec();
    }
}

struct Idle {
    conn: Connection,
    permits: Permits,
    since: Instant,
}

#[derive(Default)]
struct State {
    idle: HashMap<(String, SocketAddr), Vec<Idle>>,
    routes: HashMap<String, Arc<Semaphore>>,
}

pub struct Pool {
    state: Mutex<State>,
    global: Arc<Semaphore>,
    per_route: usize,
    metrics: Arc<Metrics>,
}

/// Says QUIT and closes, in the background; the permits are released when it is done.
pub fn close(mut conn: Connection, permits: Permits) {
    tokio::task::spawn_local(async move {
        let _ = conn.quit().await;
        drop(permits);
    });
}

impl Pool {
    pub fn new(global: Arc<Semaphore>, per_route: usize, metrics: Arc<Metrics>) -> Self {
        Pool { state: Mutex::new(State::default()), global, per_route: per_route.max(1), metrics }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that matters.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection to `addr` on this route.
    pub fn take(&self, key: &str, addr: SocketAddr) -> Option<(Connection, Permits)> {
        let mut st = self.state();
        let list = st.idle.get_mut(&(key.to_string(), addr))?;
        let idle = list.pop()?;
        if list.is_empty() {
            st.idle.remove(&(key.to_string(), addr));
        }
        Some((idle.conn, idle.permits))
    }

    pub fn put(&self, key: &str, conn: Connection, permits: Permits) {
        let addr = conn.addr;
        self.state().idle.entry((key.to_string(), addr)).or_default().push(Idle {
            conn,
            permits,
            since: Instant::now(),
        });
    }

    /// Closes one idle connection, of this route when `key` is given; false when there is none.
    fn evict(&self, key: Option<&str>) -> bool {
        let victim = {
            let mut st = self.state();
            let k =
                st.idle.iter().find(|(k, v)| key.is_none_or(|key| k.0 == key) && !v.is_empty()).map(|(k, _)| k.clone());
            let Some(k) = k else { return false };
            let list = st.idle.get_mut(&k);
            let victim = list.and_then(|l| if l.is_empty() { None } else { Some(l.remove(0)) });
            if st.idle.get(&k).is_some_and(|l| l.is_empty()) {
                st.idle.remove(&k);
            }
            victim
        };
        match victim {
            Some(v) => {
                close(v.conn, v.permits);
                true
            }
            None => false,
        }
    }

    /// Waits for the right to open one more connection on this route (`None` only if the
    /// semaphores were closed, which nothing does).
    pub async fn permits(&self, key: &str) -> Option<Permits> {
        let route = self
            .state()
            .routes
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_route)))
            .clone();
        let route = match route.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.evict(Some(key));
                route.acquire_owned().await.ok()?
            }
        };
        let global = match self.global.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.evict(None);
                self.global.clone().acquire_owned().await.ok()?
            }
        };
        self.metrics.outbound_connections_current.inc();
        Some(Permits { _global: global, _route: route, metrics: self.metrics.clone() })
    }

    /// Closes connections idle longer than `max_idle` and forgets unused route limits.
    pub fn expire(&self, max_idle: Duration) {
        let mut old = Vec::new();
        {
            let mut st = self.state();
            for list in st.idle.values_mut() {
                let (keep, gone): (Vec<Idle>, Vec<Idle>) = list.drain(..).partition(|i| i.since.elapsed() < max_idle);
                *list = keep;
                old.extend(gone);
            }
            st.idle.retain(|_, l| !l.is_empty());
            let per_route = self.per_route;
            st.routes.retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() < per_route);
        }
        for i in old {
            close(i.conn, i.permits);
        }
    }

    pub fn close_all(&self) {
        let all: Vec<Idle> = self.state().idle.drain().flat_map(|(_, l)| l).collect();
        for i in all {
            close(i.conn, i.permits);
        }
    }
}
