//! Idle outbound connections kept for reuse, and the permits that bound how many connections
//! exist: one global semaphore and one semaphore per route (destination domain or smart host).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

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

/// One route's connection limit, and a signal for requests waiting on it.
struct Route {
    limit: Arc<Semaphore>,
    /// The limit's size (this route's override, or the pool's per-route limit).
    size: usize,
    /// Signalled when a connection of this route goes idle: a waiter may take it.
    idle: Notify,
}

#[derive(Default)]
struct State {
    idle: HashMap<(String, SocketAddr), Vec<Idle>>,
    routes: HashMap<String, Arc<Route>>,
}

pub struct Pool {
    state: Mutex<State>,
    global: Arc<Semaphore>,
    /// Signalled when any connection goes idle.
    any_idle: Notify,
    per_route: usize,
    /// Per-route limits that differ from `per_route` (a domain's `max_connections`).
    overrides: HashMap<String, usize>,
    metrics: Arc<Metrics>,
}

/// What a request gets: a connection that is already open, or the right to open one.
pub enum Acquired {
    Pooled(Box<Connection>, Permits),
    New(Permits),
}

/// Says QUIT and closes, in the background; the permits are released when it is done.
pub fn close(mut conn: Connection, permits: Permits) {
    tokio::task::spawn_local(async move {
        let _ = conn.quit().await;
        drop(permits);
    });
}

impl Pool {
    pub fn new(
        global: Arc<Semaphore>,
        per_route: usize,
        overrides: HashMap<String, usize>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Pool {
            state: Mutex::new(State::default()),
            global,
            any_idle: Notify::new(),
            per_route: per_route.max(1),
            overrides,
            metrics,
        }
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
        let route = {
            let mut st = self.state();
            st.idle.entry((key.to_string(), addr)).or_default().push(Idle { conn, permits, since: Instant::now() });
            st.routes.get(key).cloned()
        };
        if let Some(r) = route {
            r.idle.notify_waiters();
        }
        self.any_idle.notify_waiters();
    }

    fn route(&self, key: &str) -> Arc<Route> {
        self.state()
            .routes
            .entry(key.to_string())
            .or_insert_with(|| {
                let size = self.overrides.get(key).copied().unwrap_or(self.per_route).max(1);
                Arc::new(Route { limit: Arc::new(Semaphore::new(size)), size, idle: Notify::new() })
            })
            .clone()
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

    /// An idle connection to `addr` on this route, or the right to open a new one; waits while
    /// the limits are reached, taking the first connection that goes idle meanwhile. `None`
    /// only if the semaphores were closed, which nothing does.
    pub async fn acquire(&self, key: &str, addr: SocketAddr) -> Option<Acquired> {
        let route = self.route(key);
        let route_permit = loop {
            let notified = route.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some((c, p)) = self.take(key, addr) {
                return Some(Acquired::Pooled(Box::new(c), p));
            }
            if let Ok(p) = route.limit.clone().try_acquire_owned() {
                break p;
            }
            // Idle connections of this route to other addresses give their permits back.
            if self.evict(Some(key)) {
                continue;
            }
            tokio::select! {
                p = route.limit.clone().acquire_owned() => break p.ok()?,
                _ = &mut notified => continue,
            }
        };
        let global_permit = loop {
            let notified = self.any_idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Ok(p) = self.global.clone().try_acquire_owned() {
                break p;
            }
            if self.evict(None) {
                continue;
            }
            tokio::select! {
                p = self.global.clone().acquire_owned() => break p.ok()?,
                _ = &mut notified => continue,
            }
        };
        self.metrics.outbound_connections_current.inc();
        Some(Acquired::New(Permits { _global: global_permit, _route: route_permit, metrics: self.metrics.clone() }))
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
            st.routes.retain(|_, r| Arc::strong_count(r) > 1 || r.limit.available_permits() < r.size);
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
