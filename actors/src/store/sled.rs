//! The embedded queue store on sled (the default): envelopes with per-recipient state, message
//! bodies in chunks, the retry-time index and the Pickup "already taken" marks, in one process.
//!
//! Invariants:
//! - Bodies are stored in chunks of at most [`CHUNK`] bytes, so sled keeps them in its log (values
//!   over ~128 KiB go to unsynced blob files, see docs/architecture.md) and one
//!   [`SledStore::sync`] makes a whole batch durable.
//! - The envelope of a message is written after its body; sled recovers a prefix of its log, so an
//!   envelope found after a crash always has its body. Bodies without an envelope are removed at open.
//! - `sync` = sled's flush (which only `sync_file_range`s) plus an `fdatasync` of the log file.
//! - Message IDs come from our own counter, persisted with every insert and never lowered. At open
//!   it is raised above every envelope in the store and above any floor the caller gives (the
//!   daemon passes the highest ID already in Drop), so wiping the Queue folder cannot make a new
//!   message reuse the name of an undelivered Drop file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::{
    ready, remove_spool_file, Counts, Envelope, PickupMark, QueueId, QueueStore, Result, Spool, StagedBody, Startup,
    StoreError, StoreFuture, CHUNK,
};

const NEXT_ID: &[u8] = b"next_id";
/// The folder (inside the store's) of large bodies written as they arrived, one file per message.
const SPOOL: &str = "spool";
/// The chunk number that marks a body whose rest is in its spool file (the value: its length).
const SPOOLED: u32 = u32::MAX;

/// sled reports a held lock only as text inside an I/O error; when opening fails, ask the
/// kernel instead: sled locks its `db` file with `flock`, and so does `File::try_lock`.
fn locked(dir: &Path) -> bool {
    File::open(dir.join("db")).is_ok_and(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
}

/// The sled store. Its sled handles can be closed and opened again in place
/// ([`SledStore::reopen`]): sled keeps a write error (a full disk) for as long as a handle
/// lives, so reopening is how writing resumes once the cause has gone, without a restart.
pub struct SledStore {
    dir: PathBuf,
    /// The next message ID to hand out; kept across reopens.
    next: AtomicU64,
    /// The open handles; `None` while being reopened (every call then gets [`StoreError::Closed`]).
    open: RwLock<Option<Arc<Trees>>>,
    /// Large bodies; its generation counts the reopens: pieces of a body staged before one are
    /// gone (see [`StagedBody`]).
    spool: Spool,
    /// Bodies without an envelope removed by the last open.
    orphans: AtomicU64,
}

/// One opening of the store: sled's database, its trees and a handle on its log file.
struct Trees {
    db: sled::Db,
    envelopes: sled::Tree,
    bodies: sled::Tree,
    retry: sled::Tree,
    pickup: sled::Tree,
    meta: sled::Tree,
    /// A second handle on sled's log file: `fdatasync` acts on the inode.
    log: File,
}

fn body_key(id: QueueId, chunk: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&id.to_be_bytes());
    k[8..].copy_from_slice(&chunk.to_be_bytes());
    k
}

fn retry_key(at: u64, id: QueueId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&at.to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

fn id_from(bytes: &[u8]) -> Option<QueueId> {
    bytes.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes)
}

impl Trees {
    fn put_envelope(&self, env: &Envelope, old_next: Option<u64>) -> Result<()> {
        if old_next != env.next_attempt {
            if let Some(at) = old_next {
                self.retry.remove(retry_key(at, env.id))?;
            }
        }
        if let Some(at) = env.next_attempt {
            self.retry.insert(retry_key(at, env.id), &[])?;
        }
        let v = serde_json::to_vec(env).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.envelopes.insert(env.id.to_be_bytes(), v)?;
        Ok(())
    }

    /// Opens the trees and removes orphan bodies (returns how many).
    fn open(dir: &Path, spool: &Spool) -> Result<(Trees, usize)> {
        std::fs::create_dir_all(dir)?;
        let open = || sled::Config::new().path(dir).cache_capacity(64 * 1024 * 1024).flush_every_ms(Some(500)).open();
        // When opening fails, the kernel says whether the folder is locked. A lock let go between
        // sled's attempt and our look (a just-dropped store's flusher) is worth one more try.
        let db = match open() {
            Ok(db) => db,
            Err(_) if locked(dir) => return Err(StoreError::Locked(dir.to_path_buf())),
            Err(_) => match open() {
                Ok(db) => db,
                Err(_) if locked(dir) => return Err(StoreError::Locked(dir.to_path_buf())),
                Err(e) => return Err(e.into()),
            },
        };
        let log = File::open(dir.join("db"))?;
        let trees = Trees {
            envelopes: db.open_tree("envelopes")?,
            bodies: db.open_tree("bodies")?,
            retry: db.open_tree("retry")?,
            pickup: db.open_tree("pickup")?,
            meta: db.open_tree("meta")?,
            db,
            log,
        };
        let orphans = trees.remove_orphans(spool)?;
        Ok((trees, orphans))
    }

    /// Removes a message's body chunks; true if its body was spooled (the caller removes the file).
    fn remove_body(&self, id: QueueId) -> Result<bool> {
        let keys: Vec<_> = self.bodies.scan_prefix(id.to_be_bytes()).keys().collect::<std::result::Result<_, _>>()?;
        let spooled = keys.iter().any(|k| k.get(8..) == Some(&SPOOLED.to_be_bytes()[..]));
        for k in keys {
            self.bodies.remove(k)?;
        }
        Ok(spooled)
    }

    /// Bodies whose envelope was never written (a crash mid-insert). Jumps from message to
    /// message instead of reading every chunk key.
    fn remove_orphans(&self, spool: &Spool) -> Result<usize> {
        let mut orphans = Vec::new();
        let mut next = self.bodies.first()?;
        while let Some((k, _)) = next {
            let Some(id) = id_from(&k) else { break };
            if !self.envelopes.contains_key(id.to_be_bytes())? {
                orphans.push(id);
            }
            next = match id.checked_add(1) {
                Some(n) => self.bodies.range(body_key(n, 0)..).next().transpose()?,
                None => None,
            };
        }
        for id in &orphans {
            tracing::warn!(id, "removing the body of a message whose envelope was never written");
            self.remove_body(*id)?;
        }
        // Spool files without an envelope: a message being received when the process ended,
        // or one whose envelope never became durable.
        let spooled = spool.sweep(|id| self.envelopes.contains_key(id.to_be_bytes()).unwrap_or(true))?;
        Ok(orphans.len() + spooled)
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. sled locks the folder: a second process gets an error.
    /// New IDs will be at least `id_floor`.
    pub fn open(dir: &Path, id_floor: QueueId) -> Result<SledStore> {
        std::fs::create_dir_all(dir)?;
        let spool = Spool::new(dir.join(SPOOL))?;
        let (trees, orphans) = Trees::open(dir, &spool)?;
        let store = SledStore {
            dir: dir.to_path_buf(),
            next: AtomicU64::new(1),
            open: RwLock::new(None),
            spool,
            orphans: AtomicU64::new(orphans as u64),
        };
        store.raise_next(&trees, id_floor)?;
        store.set_open(Some(Arc::new(trees)));
        Ok(store)
    }

    /// Closes the sled handles and opens them again (waiting up to `wait` for the old handles to
    /// let go of the folder's lock), then removes what a failed write left half-done. What was
    /// written but not synced before may be gone: it was never acknowledged. Callers must have
    /// stopped using the store; anything still holding the old handles (a sync that hangs) keeps
    /// the lock, and this fails with [`StoreError::Locked`].
    pub fn reopen(&self, wait: std::time::Duration) -> Result<()> {
        // Dropped outside the lock's guard would not matter; dropped before opening does.
        self.set_open(None);
        self.spool.next_generation();
        let deadline = std::time::Instant::now() + wait;
        let trees = loop {
            match Trees::open(&self.dir, &self.spool) {
                Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let (trees, orphans) = trees;
        self.orphans.store(orphans as u64, Ordering::SeqCst);
        self.raise_next(&trees, 0)?;
        self.set_open(Some(Arc::new(trees)));
        Ok(())
    }

    /// Raises the ID counter above the stored counter, every envelope and `floor`.
    fn raise_next(&self, t: &Trees, floor: QueueId) -> Result<()> {
        let stored = t.meta.get(NEXT_ID)?.as_deref().and_then(id_from).unwrap_or(1);
        let after_last = t.envelopes.last()?.and_then(|(k, _)| id_from(&k)).map_or(1, |id| id + 1);
        self.next.fetch_max(stored.max(after_last).max(floor).max(1), Ordering::SeqCst);
        Ok(())
    }

    fn set_open(&self, trees: Option<Arc<Trees>>) {
        let old = std::mem::replace(&mut *self.open.write().unwrap_or_else(|e| e.into_inner()), trees);
        drop(old);
    }

    /// The current handles (cheap: one read lock and a reference count).
    fn trees(&self) -> Result<Arc<Trees>> {
        self.open.read().unwrap_or_else(|e| e.into_inner()).clone().ok_or(StoreError::Closed)
    }

    /// Bodies without an envelope (a crash mid-write, or pieces of a message never queued)
    /// that the last open removed.
    pub fn orphans_removed(&self) -> u64 {
        self.orphans.load(Ordering::SeqCst)
    }

    /// The folder the store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// [`SledStore::open`], waiting up to `wait` while the folder is locked.
    pub fn open_waiting(dir: &Path, id_floor: QueueId, wait: std::time::Duration) -> Result<SledStore> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match SledStore::open(dir, id_floor) {
                Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// A new, increasing message ID. The counter is persisted by [`SledStore::insert`]: an ID handed
    /// out for a message that never became durable may be handed out again after a crash, which
    /// is harmless because that message was never acknowledged or delivered.
    pub fn next_id(&self) -> Result<QueueId> {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        if id == u64::MAX {
            return Err(StoreError::Corrupt("message IDs exhausted".into()));
        }
        Ok(id)
    }

    /// Writes body and envelope (and the Pickup mark). Not durable until [`SledStore::sync`].
    pub fn insert(&self, env: &Envelope, message: &[u8], mark: Option<&PickupMark>) -> Result<()> {
        let t = self.trees()?;
        // The counter goes into the log before the envelope: a recovered envelope implies a
        // recovered counter above it.
        t.meta.insert(NEXT_ID, &self.next.load(Ordering::SeqCst).to_be_bytes())?;
        for (i, chunk) in message.chunks(CHUNK).enumerate() {
            t.bodies.insert(body_key(env.id, i as u32), chunk)?;
        }
        t.put_envelope(env, None)?;
        // The mark goes last: a recovered mark implies a recovered envelope, so a mark whose
        // envelope is gone means the message was delivered, never that it was half-written.
        if let Some(m) = mark {
            let v = serde_json::to_vec(&(env.id, m)).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            t.pickup.insert(m.name.as_bytes(), v)?;
        }
        Ok(())
    }

    fn spool_path(&self, id: QueueId) -> PathBuf {
        self.spool.path(id)
    }

    /// [`SledStore::insert`] for a body in a spool file: the trace header as chunk 0, a mark
    /// that the rest is in the file (with its length), then the envelope. Not durable until
    /// [`SledStore::sync`] (the file already is); refused if the store was reopened since the
    /// file was started.
    pub fn insert_staged(&self, env: &Envelope, header: &[u8], staged: &StagedBody) -> Result<()> {
        let t = self.trees()?;
        self.spool.check(staged, env.id)?;
        t.meta.insert(NEXT_ID, &self.next.load(Ordering::SeqCst).to_be_bytes())?;
        t.bodies.insert(body_key(env.id, 0), header)?;
        t.bodies.insert(body_key(env.id, SPOOLED), &staged.bytes.to_be_bytes())?;
        t.put_envelope(env, None)
    }

    /// Undoes an [`SledStore::insert`] whose sync failed: the message and its Pickup mark go, so a
    /// retried Pickup file is queued afresh.
    pub fn discard(&self, env: &Envelope, mark: Option<&PickupMark>) -> Result<()> {
        if let Some(m) = mark {
            self.forget_pickup(&m.name)?;
        }
        self.remove(env.id, env.next_attempt)
    }

    /// Writes and syncs a small record: whether the store can make anything durable now.
    pub fn probe(&self) -> Result<()> {
        let t = self.trees()?;
        t.meta.insert(b"probe", &crate::clock::unix_now().to_be_bytes())?;
        self.sync()
    }

    /// Makes everything written so far durable: sled's flush, then a real `fdatasync`.
    pub fn sync(&self) -> Result<()> {
        let t = self.trees()?;
        t.db.flush()?;
        t.log.sync_data()?;
        Ok(())
    }

    pub fn envelope(&self, id: QueueId) -> Result<Option<Envelope>> {
        let t = self.trees()?;
        match t.envelopes.get(id.to_be_bytes())? {
            None => Ok(None),
            Some(v) => {
                serde_json::from_slice(&v).map(Some).map_err(|e| StoreError::Corrupt(format!("envelope {id}: {e}")))
            }
        }
    }

    /// Rewrites an envelope whose stored `next_attempt` was `old_next`, keeping the retry index in
    /// step (the caller has just read the envelope; reading it again here would parse it twice).
    pub fn update(&self, env: &Envelope, old_next: Option<u64>) -> Result<()> {
        self.trees()?.put_envelope(env, old_next)
    }

    pub fn body(&self, id: QueueId) -> Result<Vec<u8>> {
        let t = self.trees()?;
        let mut out = Vec::new();
        for kv in t.bodies.scan_prefix(id.to_be_bytes()) {
            let (k, v) = kv?;
            if k.get(8..).and_then(|c| c.try_into().ok()).map(u32::from_be_bytes) == Some(SPOOLED) {
                // The rest is in the spool file, which must hold exactly what was acknowledged.
                let want = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(u64::MAX);
                let mut f = File::open(self.spool_path(id))?;
                let len = f.metadata()?.len();
                if len != want {
                    return Err(StoreError::Corrupt(format!("spool file of {id} has {len} bytes, not {want}")));
                }
                out.reserve(len as usize);
                std::io::Read::read_to_end(&mut f, &mut out)?;
                continue;
            }
            out.extend_from_slice(&v);
        }
        Ok(out)
    }

    /// The first `max` bytes of a body: the chunks in order until there are enough, and of a
    /// spool file only what is still wanted.
    pub fn body_head(&self, id: QueueId, max: usize) -> Result<Vec<u8>> {
        let t = self.trees()?;
        let mut out = Vec::new();
        for kv in t.bodies.scan_prefix(id.to_be_bytes()) {
            if out.len() >= max {
                break;
            }
            let (k, v) = kv?;
            let want = max - out.len();
            if k.get(8..).and_then(|c| c.try_into().ok()).map(u32::from_be_bytes) == Some(SPOOLED) {
                let f = File::open(self.spool_path(id))?;
                std::io::Read::read_to_end(&mut std::io::Read::take(f, want as u64), &mut out)?;
                continue;
            }
            out.extend_from_slice(&v[..v.len().min(want)]);
        }
        Ok(out)
    }

    /// Removes a message whose stored `next_attempt` is `stored_next`: envelope first, so a crash
    /// leaves at worst an orphan body, cleaned at the next open; then retry entry and body.
    pub fn remove(&self, id: QueueId, stored_next: Option<u64>) -> Result<()> {
        let t = self.trees()?;
        t.envelopes.remove(id.to_be_bytes())?;
        if let Some(at) = stored_next {
            t.retry.remove(retry_key(at, id))?;
        }
        if t.remove_body(id)? {
            remove_spool_file(&self.spool_path(id))?;
        }
        Ok(())
    }

    /// Every readable envelope, oldest first.
    pub fn envelopes(&self) -> Result<Vec<Envelope>> {
        let t = self.trees()?;
        let mut out = Vec::new();
        for kv in t.envelopes.iter() {
            let (k, v) = kv?;
            match serde_json::from_slice::<Envelope>(&v) {
                Ok(env) => out.push(env),
                Err(e) => tracing::error!(key = ?k, error = %e, "unreadable envelope left in the queue"),
            }
        }
        Ok(out)
    }

    /// Envelopes with IDs above `after`, in ID order: paging through the queue. A closed store
    /// yields one error.
    pub fn envelopes_after(&self, after: QueueId) -> Box<dyn Iterator<Item = Result<Envelope>>> {
        let t = match self.trees() {
            Ok(t) => t,
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        Box::new(t.envelopes.range(after.saturating_add(1).to_be_bytes()..).map(|kv| {
            let (k, v) = kv?;
            serde_json::from_slice::<Envelope>(&v).map_err(|e| StoreError::Corrupt(format!("envelope {k:?}: {e}")))
        }))
    }

    /// Retry-index entries due at or before `now`, and those after it. Reads keys only.
    pub fn retry_counts(&self, now: u64) -> Result<(usize, usize)> {
        let t = self.trees()?;
        let (mut due, mut later) = (0, 0);
        for k in t.retry.iter().keys() {
            let k = k?;
            if id_from(&k).is_some_and(|at| at <= now) {
                due += 1;
            } else {
                later += 1;
            }
        }
        Ok((due, later))
    }

    /// The envelopes of up to `limit` messages whose retry time is at or before `now`, earliest
    /// first, leaving out those on hold and those `working` names (the Queue has them).
    pub fn due_envelopes(&self, now: u64, limit: usize, working: &dyn Fn(QueueId) -> bool) -> Result<Vec<Envelope>> {
        let t = self.trees()?;
        let mut out = Vec::new();
        for k in t.retry.range(..retry_key(now, u64::MAX)).keys() {
            if out.len() == limit {
                break;
            }
            let Some(id) = k?.get(8..).and_then(id_from).filter(|id| !working(*id)) else { continue };
            match SledStore::envelope(self, id) {
                Ok(Some(env)) if !env.held => out.push(env),
                Ok(_) => {}
                Err(e) => tracing::error!(id, error = %e, "cannot read a due message's envelope"),
            }
        }
        Ok(out)
    }

    /// The earliest retry time at or after `from` (Unix seconds), if any.
    pub fn earliest_retry(&self, from: u64) -> Result<Option<u64>> {
        let t = self.trees()?;
        match t.retry.range(retry_key(from, 0)..).keys().next() {
            Some(k) => Ok(k?.get(..8).and_then(id_from)),
            None => Ok(None),
        }
    }

    /// The queue ID of a Pickup file already queued under this name and fingerprint.
    pub fn pickup_taken(&self, mark: &PickupMark) -> Result<Option<QueueId>> {
        let t = self.trees()?;
        match t.pickup.get(mark.name.as_bytes())? {
            Some(v) => {
                let (id, stored): (QueueId, PickupMark) =
                    serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok((stored == *mark).then_some(id))
            }
            None => Ok(None),
        }
    }

    pub fn forget_pickup(&self, name: &str) -> Result<()> {
        let t = self.trees()?;
        t.pickup.remove(name.as_bytes())?;
        Ok(())
    }
}

/// sled answers from memory and its own log: every read is done by the time the future is made
/// (on the caller's thread, as before the interface existed); only the sync goes to the
/// blocking pool.
impl QueueStore for SledStore {
    fn kind(&self) -> &'static str {
        "sled"
    }

    fn dir(&self) -> &Path {
        &self.dir
    }

    fn spool(&self) -> &Spool {
        &self.spool
    }

    fn next_id(&self) -> Result<QueueId> {
        SledStore::next_id(self)
    }

    fn insert(&self, env: &Envelope, message: Arc<Vec<u8>>, mark: Option<&PickupMark>) -> Result<()> {
        SledStore::insert(self, env, &message, mark)
    }

    fn insert_staged(&self, env: &Envelope, header: &[u8], staged: &StagedBody) -> Result<()> {
        SledStore::insert_staged(self, env, header, staged)
    }

    fn update(&self, env: &Envelope, old_next: Option<u64>) -> Result<()> {
        SledStore::update(self, env, old_next)
    }

    fn remove(&self, id: QueueId, stored_next: Option<u64>) -> Result<()> {
        SledStore::remove(self, id, stored_next)
    }

    fn discard(&self, env: &Envelope, mark: Option<&PickupMark>) -> Result<()> {
        SledStore::discard(self, env, mark)
    }

    fn forget_pickup(&self, name: &str) -> Result<()> {
        SledStore::forget_pickup(self, name)
    }

    fn commit(&self) -> StoreFuture<()> {
        let trees = match self.trees() {
            Ok(t) => t,
            Err(e) => return ready(Err(e)),
        };
        Box::pin(async move {
            crate::fsio::blocking(move || {
                trees.db.flush().map_err(|e| StoreError::Sled(e).into_io())?;
                trees.log.sync_data()
            })
            .await
            .map_err(StoreError::Io)
        })
    }

    fn commit_blocking(&self, _wait: std::time::Duration) -> Result<()> {
        self.sync()
    }

    fn envelope(&self, id: QueueId) -> StoreFuture<Option<Envelope>> {
        ready(SledStore::envelope(self, id))
    }

    fn body(&self, id: QueueId) -> StoreFuture<Vec<u8>> {
        ready(SledStore::body(self, id))
    }

    fn body_head(&self, id: QueueId, max: usize) -> StoreFuture<Vec<u8>> {
        ready(SledStore::body_head(self, id, max))
    }

    fn page(&self, after: QueueId, limit: usize) -> StoreFuture<Vec<Envelope>> {
        ready(self.envelopes_after(after).take(limit).collect())
    }

    fn claim_due(&self, now: u64, limit: usize, working: &dyn Fn(QueueId) -> bool) -> StoreFuture<Vec<Envelope>> {
        ready(self.due_envelopes(now, limit, working))
    }

    fn earliest_retry(&self, from: u64) -> StoreFuture<Option<u64>> {
        ready(SledStore::earliest_retry(self, from))
    }

    fn counts(&self, now: u64) -> StoreFuture<Counts> {
        ready(self.retry_counts(now).map(|(_, deferred)| Counts { total: None, deferred, held: None }))
    }

    fn startup(&self) -> StoreFuture<Startup> {
        let now = crate::clock::unix_now();
        ready(self.envelopes().map(|envs| {
            Startup {
                queued: envs.len(),
                held: envs.iter().filter(|e| e.held).map(|e| e.id).collect(),
                resume: envs
                    .into_iter()
                    .filter(|e| !e.is_finished() && !e.held && e.next_attempt.is_none_or(|t| t <= now))
                    .collect(),
            }
        }))
    }

    fn pickup_taken(&self, mark: &PickupMark) -> StoreFuture<Option<QueueId>> {
        ready(SledStore::pickup_taken(self, mark))
    }

    fn recover(self: std::sync::Arc<Self>) -> StoreFuture<()> {
        // Reopening waits for the old handles to let go of the lock: on the blocking pool.
        Box::pin(async move {
            crate::fsio::blocking(move || {
                self.reopen(std::time::Duration::from_secs(2)).and_then(|()| self.probe()).map_err(StoreError::into_io)
            })
            .await
            .map_err(StoreError::Io)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reopens right after a handle was dropped: its flusher may still hold the lock briefly.
    fn reopen(dir: &Path, floor: QueueId) -> SledStore {
        SledStore::open_waiting(dir, floor, std::time::Duration::from_secs(10)).unwrap()
    }

    /// The IDs of the due messages (none being worked on).
    fn due(s: &SledStore, now: u64, limit: usize) -> Vec<QueueId> {
        s.due_envelopes(now, limit, &|_| false).unwrap().iter().map(|e| e.id).collect()
    }

    fn env(id: QueueId, next: Option<u64>) -> Envelope {
        crate::store::test_envelope(id, "a@b.test", "c@d.test", next)
    }

    #[test]
    fn insert_read_update_remove_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let id;
        {
            let s = reopen(dir.path(), 0);
            id = s.next_id().unwrap();
            assert!(id > 0);
            s.insert(&env(id, None), &big, None).unwrap();
            s.sync().unwrap();
            assert_eq!(s.body(id).unwrap(), big);
            // Retry index follows next_attempt.
            let mut e = env(id, Some(100));
            s.update(&e, None).unwrap();
            assert_eq!(due(&s, 99, 10), Vec::<u64>::new());
            assert_eq!(due(&s, 100, 10), vec![id]);
            e.next_attempt = Some(200);
            s.update(&e, Some(100)).unwrap();
            assert_eq!(due(&s, 150, 10), Vec::<u64>::new());
            assert_eq!(due(&s, 200, 10), vec![id]);
            assert_eq!(s.earliest_retry(0).unwrap(), Some(200));
            assert_eq!(s.earliest_retry(200).unwrap(), Some(200));
            assert_eq!(s.earliest_retry(201).unwrap(), None);
            s.sync().unwrap();
        }
        let s = reopen(dir.path(), 0);
        assert_eq!(s.body(id).unwrap(), big);
        let stored = s.envelopes().unwrap();
        assert_eq!(stored.len(), 1);
        assert!(s.next_id().unwrap() > id);
        s.remove(stored[0].id, stored[0].next_attempt).unwrap();
        assert!(s.envelope(id).unwrap().is_none());
        assert!(s.body(id).unwrap().is_empty());
        assert_eq!(due(&s, u64::MAX, 10), Vec::<u64>::new());
    }

    /// What the Queue works on already is skipped, and the limit counts what it gets.
    #[test]
    fn due_messages_leave_out_those_being_worked_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(dir.path(), 0);
        for (id, at) in [(1, 10), (2, 20), (3, 30)] {
            s.insert(&env(id, Some(at)), b"x", None).unwrap();
        }
        let got = |limit, working: &dyn Fn(QueueId) -> bool| -> Vec<QueueId> {
            s.due_envelopes(100, limit, working).unwrap().iter().map(|e| e.id).collect()
        };
        assert_eq!(got(2, &|_| false), vec![1, 2]);
        assert_eq!(got(2, &|id| id == 1), vec![2, 3], "1 is skipped, and does not count");
        assert_eq!(got(10, &|id| id != 3), vec![3]);
        let mut held = env(2, None);
        held.held = true;
        s.update(&held, Some(20)).unwrap();
        assert_eq!(got(10, &|_| false), vec![1, 3], "a held message is never due");
    }

    #[test]
    fn ids_increase_across_reopen_and_respect_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let last;
        {
            let s = reopen(dir.path(), 0);
            let a = s.next_id().unwrap();
            let b = s.next_id().unwrap();
            assert!(a >= 1 && b == a + 1);
            s.insert(&env(b, None), b"x", None).unwrap();
            s.remove(b, None).unwrap();
            s.sync().unwrap();
            last = b;
        }
        // The message is gone, but its ID is not handed out again.
        let s = reopen(dir.path(), 0);
        assert!(s.next_id().unwrap() > last);
        drop(s);
        // A floor (the highest ID in Drop, after the Queue folder was wiped) is respected.
        let wiped = tempfile::tempdir().unwrap();
        let s = SledStore::open(wiped.path(), 500).unwrap();
        assert_eq!(s.next_id().unwrap(), 500);
    }

    #[test]
    fn orphan_bodies_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = reopen(dir.path(), 0);
            s.insert(&env(3, None), &vec![b'k'; 3 * CHUNK], None).unwrap();
            s.trees().unwrap().bodies.insert(body_key(7, 0), b"orphan".as_slice()).unwrap();
            s.trees().unwrap().bodies.insert(body_key(7, 1), b"orphan".as_slice()).unwrap();
            s.insert(&env(9, None), b"kept", None).unwrap();
            s.trees().unwrap().bodies.insert(body_key(u64::MAX, 0), b"orphan".as_slice()).unwrap();
            s.sync().unwrap();
        }
        let s = reopen(dir.path(), 0);
        assert_eq!(s.orphans_removed(), 2);
        assert!(s.body(7).unwrap().is_empty());
        assert!(s.body(u64::MAX).unwrap().is_empty());
        assert_eq!(s.body(3).unwrap().len(), 3 * CHUNK);
        assert_eq!(s.body(9).unwrap(), b"kept");
    }

    #[test]
    fn pickup_marks() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(dir.path(), 0);
        let mark = PickupMark { name: "a.eml".into(), fingerprint: "1:2:3".into() };
        s.insert(&env(5, None), b"x", Some(&mark)).unwrap();
        assert_eq!(s.pickup_taken(&mark).unwrap(), Some(5));
        let other = PickupMark { name: "a.eml".into(), fingerprint: "9:9:9".into() };
        assert_eq!(s.pickup_taken(&other).unwrap(), None);
        s.forget_pickup("a.eml").unwrap();
        assert_eq!(s.pickup_taken(&mark).unwrap(), None);
        // A message whose sync failed is discarded with its mark: the file is queued afresh later.
        s.insert(&env(6, None), b"y", Some(&mark)).unwrap();
        s.discard(&env(6, None), Some(&mark)).unwrap();
        assert_eq!(s.pickup_taken(&mark).unwrap(), None);
        assert!(s.envelope(6).unwrap().is_none() && s.body(6).unwrap().is_empty());
    }

    /// Reopening in place keeps what was synced and the ID counter, and the handle works after.
    #[test]
    fn reopen_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(dir.path(), 0);
        let id = s.next_id().unwrap();
        s.insert(&env(id, Some(50)), b"kept", None).unwrap();
        s.sync().unwrap();
        s.reopen(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(s.body(id).unwrap(), b"kept");
        assert_eq!(due(&s, 50, 10), vec![id]);
        assert!(s.next_id().unwrap() > id);
        s.probe().unwrap();
        // The reopened handles hold the folder's lock as the first ones did.
        let other = SledStore::open(dir.path(), 0).err();
        assert!(matches!(other, Some(StoreError::Locked(_))), "{other:?}");
    }

    /// A body spooled piece by piece reads back as header and file; removing the message
    /// removes the file; a spool file whose message was never queued is removed at the next
    /// open; a file started before a reopen cannot become a message; a file that does not hold
    /// what was acknowledged is an error, never a truncated message.
    #[test]
    fn spooled_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(dir.path(), 0);
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let mut w = s.start_spool().unwrap();
        let id = w.id();
        w.write(&big[..150_000]).unwrap();
        w.write(&big[150_000..190_000]).unwrap();
        let staged = w.finish(&big[190_000..]).unwrap();
        assert_eq!(staged.bytes, 200_000);
        s.insert_staged(&env(id, None), b"Received: x\r\n", &staged).unwrap();
        s.sync().unwrap();
        assert_eq!(s.body(id).unwrap(), [b"Received: x\r\n".as_slice(), &big].concat());

        let mut left = s.start_spool().unwrap();
        left.write(b"never queued").unwrap();
        let left_path = left.path().to_path_buf();
        let stale = s.start_spool().unwrap();
        let stale = stale.finish(b"abc").unwrap();
        drop(s);
        let s = reopen(dir.path(), 0);
        assert!(!left_path.exists(), "removed at open");
        assert_eq!(s.orphans_removed(), 2);
        assert_eq!(s.body(id).unwrap().len(), 200_013, "the queued message survives");
        s.reopen(std::time::Duration::from_secs(5)).unwrap();
        assert!(matches!(s.insert_staged(&env(stale.id, None), b"R\r\n", &stale), Err(StoreError::Closed)));

        // A spool file cut short (a disk fault, a hand) is an error, not a shorter message.
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("spool").join(id.to_string()))
            .unwrap()
            .set_len(10)
            .unwrap();
        assert!(matches!(s.body(id), Err(StoreError::Corrupt(_))));
        s.remove(id, None).unwrap();
        assert!(!dir.path().join("spool").join(id.to_string()).exists());
    }

    /// A second open of a folder in use is the typed `Locked` error, not a text to search.
    #[test]
    fn a_store_in_use_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let first = SledStore::open(dir.path(), 1).unwrap();
        let second = SledStore::open(dir.path(), 1).err().expect("the folder is locked");
        assert!(matches!(second, StoreError::Locked(ref p) if p == dir.path()), "{second:?}");
        let waited = SledStore::open_waiting(dir.path(), 1, std::time::Duration::from_millis(100)).err();
        assert!(matches!(waited, Some(StoreError::Locked(_))), "{waited:?}");
        drop(first);
        // sled's flusher lets go of the lock a moment after the handle is dropped.
        SledStore::open_waiting(dir.path(), 1, std::time::Duration::from_secs(5)).unwrap();
    }
}
