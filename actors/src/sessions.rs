//! The open SMTP sessions as the admin API and the web console list them ("current sessions" in
//! IIS), and the operator's disconnect.
//!
//! Invariants:
//! - One entry per open connection, made after the connection got its permits and removed when
//!   its task ends (the [`Registration`] guard), so the table never holds more than
//!   `server.max_connections` entries, whatever the flood.
//! - The table's lock is taken only to add, remove and list; a session updates its own entry
//!   under the entry's lock after each command, so sessions never wait for one another.
//! - Everything shown came from the client: it is kept bounded (the EHLO name to 64 characters)
//!   and the console renders it as text, never as markup.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::clock::unix_now;

/// Longest EHLO name kept for the list (the rest is cut).
const HELO_SHOWN: usize = 64;

/// The open sessions of every listener.
#[derive(Default)]
pub struct OpenSessions {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<SessionEntry>>>,
}

/// One open session: what it is, and the bell an operator rings to close it.
pub struct SessionEntry {
    pub id: u64,
    pub listener: &'static str,
    pub client: SocketAddr,
    started: Instant,
    started_unix: u64,
    view: Mutex<View>,
    kick: Notify,
}

#[derive(Default)]
struct View {
    phase: &'static str,
    user: Option<String>,
    helo: Option<String>,
    tls: bool,
}

/// One session as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: u64,
    pub listener: String,
    pub client: String,
    /// `connected`, `idle`, `auth`, `tls`, `mail`, `rcpt`, `data` or `closed` (see
    /// `protocol::Session::phase`).
    pub state: String,
    /// The authenticated login, if any.
    pub user: Option<String>,
    /// The EHLO/HELO name (at most 64 characters).
    pub helo: Option<String>,
    pub tls: bool,
    pub started_at: u64,
    pub age_seconds: u64,
}

/// A page of the list: the oldest sessions first, and how many are open in all.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionList {
    pub total: usize,
    pub sessions: Vec<SessionInfo>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl OpenSessions {
    pub fn new() -> Arc<Self> {
        Arc::new(OpenSessions::default())
    }

    /// Adds a session; it is listed until the returned guard is dropped.
    pub fn open(self: &Arc<Self>, listener: &'static str, client: SocketAddr) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = Arc::new(SessionEntry {
            id,
            listener,
            client,
            started: Instant::now(),
            started_unix: unix_now(),
            view: Mutex::new(View { phase: "connected", ..View::default() }),
            kick: Notify::new(),
        });
        lock(&self.open).insert(id, entry.clone());
        Registration { sessions: self.clone(), entry }
    }

    /// Up to `limit` sessions, oldest first (IDs grow with time).
    pub fn list(&self, limit: usize) -> SessionList {
        let (total, entries): (usize, Vec<Arc<SessionEntry>>) = {
            let open = lock(&self.open);
            (open.len(), open.values().take(limit).cloned().collect())
        };
        SessionList { total, sessions: entries.iter().map(|e| e.info()).collect() }
    }

    /// Asks session `id` to close (421 4.7.0, then the connection is closed). False when no
    /// such session is open.
    pub fn disconnect(&self, id: u64) -> bool {
        let entry = lock(&self.open).get(&id).cloned();
        match entry {
            Some(e) => {
                // A stored permit: the session sees it at its next wait even if it is not
                // waiting now.
                e.kick.notify_one();
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.open).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SessionEntry {
    /// Records where the session is now (after each command).
    pub fn update(&self, phase: &'static str, user: Option<&str>, helo: Option<&str>, tls: bool) {
        let mut v = lock(&self.view);
        v.phase = phase;
        v.tls = tls;
        // Called after every command: copy only what changed.
        if v.user.as_deref() != user {
            v.user = user.map(str::to_string);
        }
        let helo = helo.map(|h| h.char_indices().nth(HELO_SHOWN).map_or(h, |(end, _)| &h[..end]));
        if v.helo.as_deref() != helo {
            v.helo = helo.map(str::to_string);
        }
    }

    /// Completes when an operator asked this session to close.
    pub async fn kicked(&self) {
        self.kick.notified().await
    }

    pub fn info(&self) -> SessionInfo {
        let v = lock(&self.view);
        SessionInfo {
            id: self.id,
            listener: self.listener.to_string(),
            client: self.client.to_string(),
            state: v.phase.to_string(),
            user: v.user.clone(),
            helo: v.helo.clone(),
            tls: v.tls,
            started_at: self.started_unix,
            age_seconds: self.started.elapsed().as_secs(),
        }
    }
}

/// Keeps a session listed while it lives.
pub struct Registration {
    sessions: Arc<OpenSessions>,
    entry: Arc<SessionEntry>,
}

impl Registration {
    pub fn entry(&self) -> Arc<SessionEntry> {
        self.entry.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.sessions.open).remove(&self.entry.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listed_while_open_and_kicked_once_asked() {
        let s = OpenSessions::new();
        let a = s.open("mx", "192.0.2.1:1000".parse().unwrap());
        let b = s.open("submission", "[2001:db8::1]:2000".parse().unwrap());
        b.entry().update("rcpt", Some("alice"), Some(&"x".repeat(300)), true);
        let list = s.list(10);
        assert_eq!(list.total, 2);
        assert_eq!(list.sessions.iter().map(|i| i.id).collect::<Vec<_>>(), vec![a.entry.id, b.entry.id]);
        let bi = &list.sessions[1];
        assert_eq!((bi.state.as_str(), bi.user.as_deref(), bi.tls), ("rcpt", Some("alice"), true));
        assert_eq!(bi.helo.as_ref().map(String::len), Some(HELO_SHOWN), "hostile EHLO names are cut");
        assert_eq!(bi.client, "[2001:db8::1]:2000");
        assert_eq!(s.list(1).sessions.len(), 1, "the limit holds; total still counts all");
        assert_eq!(s.list(1).total, 2);

        // Asked before it waits: the permit is kept, so the wait ends at once.
        assert!(s.disconnect(b.entry.id));
        tokio::time::timeout(std::time::Duration::from_secs(5), b.entry().kicked()).await.unwrap();
        assert!(!s.disconnect(999), "no such session");
        drop(a);
        drop(b);
        assert!(s.is_empty(), "dropped registrations leave the table");
    }
}
