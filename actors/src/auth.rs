//! SMTP AUTH users and their argon2 password hashes (PHC strings, as `mailroot passwd` prints),
//! and the per-address limit on failed attempts ([`AuthFailures`], like Postfix's anvil).
//!
//! Invariants:
//! - A verification takes about as long for an unknown user as for a known one, so the time
//!   taken does not tell which user names exist.
//! - Verification memory is reused: each argon2 check needs `m` KiB (19 MiB by default), taken
//!   from a small pool of buffers and zeroed before it goes back. Allocating it per check made
//!   glibc keep the freed blocks in per-thread arenas (1 GB after 80 attempts); the pool holds at
//!   most [`MAX_POOLED`] buffers, and the Session bounds checks running at once.
//! - A hash asking for more than [`MAX_M_COST_KIB`] is refused when the users are loaded.

use std::collections::HashMap;
use std::io::Read;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

use crate::peer::client_key;

/// Buffers of verification memory kept for reuse, at most (more checks than this never run at
/// once on the machines we target; a surplus buffer is freed).
pub const MAX_POOLED: usize = 8;
/// The most memory one hash may ask for (256 MiB): a users file cannot make a check exhaust RAM.
pub const MAX_M_COST_KIB: u32 = 256 * 1024;

pub struct Users {
    /// User name (as given in AUTH, compared exactly) → PHC hash string.
    hashes: HashMap<String, String>,
    /// Verified against for unknown users.
    decoy: String,
    /// Verification memory, reused.
    pool: Mutex<Vec<Vec<Block>>>,
}

impl Users {
    /// Checks every hash parses; the error names the user.
    pub fn new(hashes: HashMap<String, String>) -> Result<Users, String> {
        for (user, hash) in &hashes {
            let parsed = PasswordHash::new(hash).map_err(|e| format!("user {user:?}: not a password hash ({e})"))?;
            let params = Params::try_from(&parsed).map_err(|e| format!("user {user:?}: unusable parameters ({e})"))?;
            if params.m_cost() > MAX_M_COST_KIB {
                return Err(format!("user {user:?}: the hash asks for more than {} MiB", MAX_M_COST_KIB / 1024));
            }
        }
        let decoy = hash_password("not a real password").map_err(|e| format!("cannot hash: {e}"))?;
        Ok(Users { hashes, decoy, pool: Mutex::new(Vec::new()) })
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// True when `password` is `user`'s. Slow on purpose (argon2): call it off the event loop.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let (hash, known) = match self.hashes.get(user) {
            Some(h) => (h.as_str(), true),
            None => (self.decoy.as_str(), false),
        };
        self.check(hash, password.as_bytes()) && known
    }

    /// Recomputes the hash with pooled memory and compares it in constant time.
    fn check(&self, hash: &str, password: &[u8]) -> bool {
        let Ok(parsed) = PasswordHash::new(hash) else { return false };
        let (Ok(algorithm), Ok(params)) = (Algorithm::try_from(parsed.algorithm), Params::try_from(&parsed)) else {
            return false;
        };
        let version = match parsed.version.map(Version::try_from) {
            None => Version::default(),
            Some(Ok(v)) => v,
            Some(Err(_)) => return false,
        };
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else { return false };
        let mut salt_buf = [0u8; 64];
        let Ok(salt) = salt.decode_b64(&mut salt_buf) else { return false };
        let blocks_needed = params.block_count();
        let argon = Argon2::new(algorithm, version, params);
        let mut memory = self.take(blocks_needed);
        let mut out = vec![0u8; expected.len()];
        let computed = argon.hash_password_into_with_memory(password, salt, &mut out, &mut memory[..]).is_ok();
        self.give_back(memory);
        computed && constant_time_eq(&out, expected.as_bytes())
    }

    fn take(&self, blocks: usize) -> Vec<Block> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        match pool.iter().position(|b| b.len() >= blocks) {
            Some(i) => pool.swap_remove(i),
            None => {
                drop(pool);
                vec![Block::default(); blocks]
            }
        }
    }

    fn give_back(&self, mut memory: Vec<Block>) {
        // What was derived from a password does not linger in memory.
        memory.iter_mut().for_each(|b| *b = Block::default());
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < MAX_POOLED {
            pool.push(memory);
        }
    }

    /// Verification buffers held for reuse (for tests and the metrics of memory use).
    pub fn pooled(&self) -> usize {
        self.pool.lock().map(|p| p.len()).unwrap_or(0)
    }
}

/// Equal bytes, compared in time that does not depend on where they differ (tokens, hashes).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Failed AUTH attempts per client address (IPv4 address, IPv6 /64), across connections: after
/// `max` failures within `window`, the address is locked out until the window has passed since
/// its first failure in the run. A success clears the address. At most [`MAX_TRACKED`] addresses
/// are tracked; when full, expired entries are dropped first, then the oldest.
pub struct AuthFailures {
    /// Failures allowed per window (0 = no limit) and the window; changed by a reload.
    max: AtomicU32,
    window_ms: AtomicU64,
    seen: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// Addresses tracked at most (≈ 4 MB): a flood from many addresses cannot grow it further.
pub const MAX_TRACKED: usize = 65_536;

impl AuthFailures {
    /// `max = 0` turns the limit off.
    pub fn new(max: u32, window: Duration) -> Self {
        let f = AuthFailures { max: AtomicU32::new(0), window_ms: AtomicU64::new(0), seen: Mutex::new(HashMap::new()) };
        f.set_limits(max, window);
        f
    }

    /// New limits (a reload); counts so far are kept.
    pub fn set_limits(&self, max: u32, window: Duration) {
        self.max.store(max, Ordering::Relaxed);
        self.window_ms.store(u64::try_from(window.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn limits(&self) -> (u32, Duration) {
        (self.max.load(Ordering::Relaxed), Duration::from_millis(self.window_ms.load(Ordering::Relaxed)))
    }

    /// True when `ip` has used up its failed attempts: its next AUTH is refused unchecked.
    pub fn locked(&self, ip: IpAddr, now: Instant) -> bool {
        let (max, window) = self.limits();
        if max == 0 {
            return false;
        }
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&client_key(ip)).is_some_and(|&(n, first)| n >= max && now.duration_since(first) < window)
    }

    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let (max, window) = self.limits();
        if max == 0 {
            return;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_TRACKED {
            seen.retain(|_, (_, first)| now.duration_since(*first) < window);
            if seen.len() >= MAX_TRACKED {
                if let Some(oldest) = seen.iter().min_by_key(|(_, (_, first))| *first).map(|(k, _)| *k) {
                    seen.remove(&oldest);
                }
            }
        }
        let entry = seen.entry(client_key(ip)).or_insert((0, now));
        if now.duration_since(entry.1) >= window {
            *entry = (0, now);
        }
        entry.0 = entry.0.saturating_add(1);
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(&client_key(ip));
    }
}

/// An argon2id hash of `password` with a fresh random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read /dev/urandom for a salt: {e}"))?;
    let salt = SaltString::encode_b64(&bytes).map_err(|e| e.to_string())?;
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        let users = Users::new([("alice".to_string(), h)].into_iter().collect()).unwrap();
        let cases =
            [("alice", "s3cret", true), ("alice", "S3cret", false), ("alice", "", false), ("bob", "s3cret", false)];
        for (u, p, want) in cases {
            assert_eq!(users.verify(u, p), want, "{u}/{p}");
        }
        assert!(Users::new([("x".to_string(), "plaintext".to_string())].into_iter().collect())
            .err()
            .is_some_and(|e| e.contains("\"x\"")));
        // The memory of the checks above is pooled, not freed: one buffer, reused each time.
        assert_eq!(users.pooled(), 1);
        // Other algorithms and versions in a PHC string verify too (argon2i, v=16).
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let params = Params::new(1024, 2, 1, None).unwrap();
        let i16 =
            Argon2::new(Algorithm::Argon2i, Version::V0x10, params).hash_password(b"pw", &salt).unwrap().to_string();
        let users = Users::new([("old".to_string(), i16)].into_iter().collect()).unwrap();
        assert!(users.verify("old", "pw") && !users.verify("old", "px"));
        // A hash that would take 1 GiB per check is refused at load.
        let huge =
            "$argon2id$v=19$m=1048576,t=2,p=1$MDEyMzQ1Njc4OWFiY2RlZg$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert!(Users::new([("big".to_string(), huge.to_string())].into_iter().collect()).is_err());
    }

    #[test]
    fn failures_lock_an_address_out_for_a_while() {
        let f = AuthFailures::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        for _ in 0..2 {
            f.failed(a, t0);
        }
        assert!(!f.locked(a, t0), "two failures: not yet");
        f.failed(a, t0);
        assert!(f.locked(a, t0 + Duration::from_secs(59)), "three: locked");
        assert!(!f.locked(b, t0), "another address is not");
        assert!(!f.locked(a, t0 + Duration::from_secs(60)), "the window passed");
        // A failure after the window starts a new count.
        f.failed(a, t0 + Duration::from_secs(61));
        assert!(!f.locked(a, t0 + Duration::from_secs(61)));
        // IPv6 counts per /64; a success clears the address.
        for _ in 0..3 {
            f.failed(v6a, t0);
        }
        assert!(f.locked(v6b, t0));
        f.succeeded(v6b);
        assert!(!f.locked(v6a, t0));
        // Off: never locked.
        let off = AuthFailures::new(0, Duration::from_secs(60));
        (0..10).for_each(|_| off.failed(a, t0));
        assert!(!off.locked(a, t0));
    }

    #[test]
    fn tracking_is_bounded() {
        let f = AuthFailures::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            f.failed(IpAddr::V4(std::net::Ipv4Addr::from(i)), t0 + Duration::from_micros(u64::from(i)));
        }
        assert!(f.seen.lock().unwrap().len() <= MAX_TRACKED);
    }
}
