//! Inbound rate limits across connections (Postfix's anvil): messages, recipients and unknown
//! recipients per client address (IPv6 per /64) and per authenticated user, in fixed windows.
//! The sessions ask through the protocol's `RateGate`; the counts live here.
//!
//! Bounded: at most [`MAX_TRACKED`] clients and users are counted. Entries whose window has ended
//! are swept at most once a window; a table still full after a sweep is emptied. Each is O(n)
//! once per n new entries, so a flood from many addresses can neither grow the table nor make
//! each new client cost a scan of it; what it buys is counts that start over, which a flood
//! from 100,000 addresses has anyway.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::peer::client_key;
use crate::protocol::{RateEvent, RateGate};

/// Clients and users counted at most (≈ 10 MB).
pub const MAX_TRACKED: usize = 100_000;

/// The limits per window; 0 = no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSettings {
    pub window: Duration,
    pub messages_per_client: u32,
    pub recipients_per_client: u32,
    pub failed_recipients_per_client: u32,
    pub messages_per_user: u32,
    pub recipients_per_user: u32,
}

impl RateSettings {
    fn any(&self) -> bool {
        self.messages_per_client
            + self.recipients_per_client
            + self.failed_recipients_per_client
            + self.messages_per_user
            + self.recipients_per_user
            > 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Client(IpAddr),
    User(String),
}

#[derive(Debug, Clone, Copy)]
struct Counts {
    start: Instant,
    messages: u32,
    recipients: u32,
    failed: u32,
}

pub struct RateLimits {
    settings: Mutex<RateSettings>,
    table: Mutex<Table>,
}

struct Table {
    counts: HashMap<Key, Counts>,
    last_sweep: Option<Instant>,
}

impl RateLimits {
    pub fn new(settings: RateSettings) -> Arc<RateLimits> {
        let table = Table { counts: HashMap::new(), last_sweep: None };
        Arc::new(RateLimits { settings: Mutex::new(settings), table: Mutex::new(table) })
    }

    /// New limits (a reload); counts so far are kept.
    pub fn set(&self, settings: RateSettings) {
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = settings;
    }

    fn settings(&self) -> RateSettings {
        *self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The protocol's gate over these counts (no gate at all while every limit is 0).
    pub fn gate(self: &Arc<Self>) -> RateGate {
        if !self.settings().any() {
            return RateGate::default();
        }
        let me = self.clone();
        RateGate::new(move |event, ip, user| me.allows(event, ip, user, Instant::now()))
    }

    /// Counts `event` and says whether it is within the limits of the client and of the user.
    pub fn allows(&self, event: RateEvent, ip: Option<IpAddr>, user: Option<&str>, now: Instant) -> bool {
        let s = self.settings();
        let (per_client, per_user) = match event {
            RateEvent::Message => (s.messages_per_client, s.messages_per_user),
            RateEvent::Recipient => (s.recipients_per_client, s.recipients_per_user),
            RateEvent::FailedRecipient => (s.failed_recipients_per_client, 0),
        };
        let mut ok = true;
        if let (Some(ip), true) = (ip, per_client > 0) {
            ok &= self.count(Key::Client(client_key(ip)), event, per_client, s.window, now);
        }
        if let (Some(user), true) = (user, per_user > 0) {
            ok &= self.count(Key::User(user.to_lowercase()), event, per_user, s.window, now);
        }
        ok
    }

    fn count(&self, key: Key, event: RateEvent, max: u32, window: Duration, now: Instant) -> bool {
        let mut guard = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let t = &mut *guard;
        if t.last_sweep.is_none_or(|s| now.duration_since(s) >= window) {
            t.counts.retain(|_, c| now.duration_since(c.start) < window);
            t.last_sweep = Some(now);
        }
        if !t.counts.contains_key(&key) && t.counts.len() >= MAX_TRACKED {
            t.counts.retain(|_, c| now.duration_since(c.start) < window);
            t.last_sweep = Some(now);
            if t.counts.len() >= MAX_TRACKED {
                tracing::warn!(tracked = t.counts.len(), "rate table full: counts start over");
                t.counts.clear();
            }
        }
        let c = t.counts.entry(key).or_insert(Counts { start: now, messages: 0, recipients: 0, failed: 0 });
        if now.duration_since(c.start) >= window {
            *c = Counts { start: now, messages: 0, recipients: 0, failed: 0 };
        }
        let n = match event {
            RateEvent::Message => &mut c.messages,
            RateEvent::Recipient => &mut c.recipients,
            RateEvent::FailedRecipient => &mut c.failed,
        };
        *n = n.saturating_add(1);
        *n <= max
    }

    /// Clients and users counted now.
    pub fn tracked(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).counts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_clients_and_users() {
        let s = RateSettings {
            window: Duration::from_secs(60),
            messages_per_client: 2,
            recipients_per_client: 0,
            failed_recipients_per_client: 1,
            messages_per_user: 3,
            recipients_per_user: 0,
        };
        let r = RateLimits::new(s);
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b2: IpAddr = "2001:db8::2:3".parse().unwrap(); // same /64 as b
        let m = RateEvent::Message;
        // (event, ip, user, time, allowed)
        let cases: &[(RateEvent, IpAddr, Option<&str>, u64, bool)] = &[
            (m, a, None, 0, true),
            (m, a, None, 1, true),
            (m, a, None, 2, false),
            (RateEvent::Recipient, a, None, 2, true), // no recipient limit
            (m, a, None, 61, true),                   // a new window
            (m, b, None, 3, true),
            (m, b2, None, 4, true),
            (m, b2, None, 5, false), // one /64, one count
            // A user is limited wherever it connects from, on top of its address.
            (m, "198.51.100.1".parse().unwrap(), Some("Alice"), 6, true),
            (m, "198.51.100.2".parse().unwrap(), Some("alice"), 7, true),
            (m, "198.51.100.3".parse().unwrap(), Some("alice"), 8, true),
            (m, "198.51.100.4".parse().unwrap(), Some("ALICE"), 9, false),
            (RateEvent::FailedRecipient, a, None, 10, true),
            (RateEvent::FailedRecipient, a, None, 11, false),
        ];
        for (i, (event, ip, user, t, want)) in cases.iter().enumerate() {
            assert_eq!(r.allows(*event, Some(*ip), *user, at(*t)), *want, "case {i}");
        }
    }

    #[test]
    fn the_table_stays_bounded() {
        let s = RateSettings {
            window: Duration::from_secs(60),
            messages_per_client: 1,
            recipients_per_client: 0,
            failed_recipients_per_client: 0,
            messages_per_user: 0,
            recipients_per_user: 0,
        };
        let r = RateLimits::new(s);
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 500) {
            let ip = IpAddr::from(i.to_be_bytes());
            assert!(r.allows(RateEvent::Message, Some(ip), None, now));
        }
        assert!(r.tracked() <= MAX_TRACKED, "{}", r.tracked());
        // Off: no gate at all.
        // A relay-network client (no address) is not counted.
        assert!(r.allows(RateEvent::Message, None, None, now));
        let off = RateLimits::new(RateSettings { messages_per_client: 0, ..s });
        assert!(format!("{:?}", off.gate()).contains("none"));
    }
}
