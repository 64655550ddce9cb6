//! Whether the queue can take mail: free space on its filesystem above a reserve (Postfix's
//! `queue_minfree`), and whether its store can write at all.
//!
//! Shared by the sessions, which refuse `MAIL` with `452 4.3.1` when there is no room (before a
//! byte of the message is read), and the Queue, which checks the room again for the message it
//! is about to write, marks the store failing when a write or sync fails, and healthy again once
//! it has reopened it. Keeping the reserve means sled itself rarely meets a full disk: a write
//! error sticks to an open sled handle until it is reopened (see `Queue::recover`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Free space is asked of the kernel at most this often; between, the last answer is used.
const LOOK_EVERY: Duration = Duration::from_secs(1);

pub struct StoreHealth {
    dir: PathBuf,
    reserve: u64,
    /// Bytes above the reserve at the last look.
    room: AtomicU64,
    /// Milliseconds after `epoch` of the last look, plus one (0: never looked).
    looked_at: AtomicU64,
    epoch: Instant,
    failing: AtomicBool,
    /// Why the store is failing, and whether for want of space.
    reason: Mutex<Option<(String, bool)>>,
}

impl StoreHealth {
    /// `reserve`: bytes that must stay free on `dir`'s filesystem; 0 turns the check off.
    pub fn new(dir: &Path, reserve: u64) -> Self {
        StoreHealth {
            dir: dir.to_path_buf(),
            reserve,
            room: AtomicU64::new(u64::MAX),
            looked_at: AtomicU64::new(0),
            epoch: Instant::now(),
            failing: AtomicBool::new(false),
            reason: Mutex::new(None),
        }
    }

    /// Bytes the queue can take now: 0 while the store is failing, otherwise the free space above
    /// the reserve. A filesystem that cannot be asked does not stop mail (`u64::MAX`): the store
    /// itself then says whether it can write.
    pub fn room(&self) -> u64 {
        if self.failing.load(Ordering::Relaxed) {
            return 0;
        }
        if self.reserve == 0 {
            return u64::MAX;
        }
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.looked_at.load(Ordering::Relaxed);
        let stale = last == 0 || now.saturating_sub(last) >= LOOK_EVERY.as_millis() as u64;
        // One caller refreshes; the others use the last answer meanwhile.
        if stale && self.looked_at.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            let room = match free_space(&self.dir) {
                Ok(free) => free.saturating_sub(self.reserve),
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot ask the queue's filesystem for its free space");
                    u64::MAX
                }
            };
            let before = self.room.swap(room, Ordering::Relaxed);
            if room == 0 && before != 0 {
                tracing::warn!(
                    dir = %self.dir.display(),
                    reserve = self.reserve,
                    "free space on the queue's filesystem is below the reserve; new mail gets 452 4.3.1"
                );
            } else if room != 0 && before == 0 {
                tracing::info!(dir = %self.dir.display(), "free space above the reserve again; taking mail");
            }
        }
        self.room.load(Ordering::Relaxed)
    }

    /// The store cannot write (`no_space`: for want of space). Until [`StoreHealth::set_healthy`],
    /// [`StoreHealth::room`] is 0, status shows `why` and the watchdog is not notified.
    pub fn set_failing(&self, why: String, no_space: bool) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some((why, no_space));
        self.failing.store(true, Ordering::Relaxed);
    }

    pub fn set_healthy(&self) {
        self.failing.store(false, Ordering::Relaxed);
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Why the store is failing, if it is.
    pub fn failing(&self) -> Option<String> {
        if !self.failing.load(Ordering::Relaxed) {
            return None;
        }
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(why, _)| why.clone())
    }

    /// The store is failing for want of space.
    pub fn failing_for_space(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
            && self.reason.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|(_, space)| *space)
    }

    pub fn reserve(&self) -> u64 {
        self.reserve
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Bytes an unprivileged process may still write on the filesystem holding `dir`.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid NUL-terminated string and `st` points to writable memory of the
    // right type; statvfs only writes into it, and we read it only when it returned 0.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the structure.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_free_space_above_the_reserve_and_zero_while_failing() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_space(dir.path()).unwrap();
        assert!(free > 0);
        assert_eq!(StoreHealth::new(dir.path(), 0).room(), u64::MAX, "no reserve: no check");
        let tight = StoreHealth::new(dir.path(), u64::MAX);
        assert_eq!(tight.room(), 0, "a reserve larger than the disk leaves no room");
        let h = StoreHealth::new(dir.path(), 1);
        let room = h.room();
        assert!(room > 0 && room < free + (1 << 30), "{room} vs {free}");
        h.set_failing("disk full".into(), true);
        assert_eq!(h.room(), 0);
        assert_eq!(h.failing().as_deref(), Some("disk full"));
        assert!(h.failing_for_space());
        h.set_healthy();
        assert!(h.room() > 0 && h.failing().is_none() && !h.failing_for_space());
        assert!(free_space(&dir.path().join("missing")).is_err());
    }
}
