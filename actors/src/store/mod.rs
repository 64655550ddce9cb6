//! The durable queue: what the Queue keeps (envelopes with per-recipient state, bodies, the
//! retry-time index, message IDs, Pickup marks) behind one interface, [`QueueStore`], with two
//! implementations: [`sled::SledStore`] (embedded, the default) and
//! [`postgres::PgStore`] (PostgreSQL, shared by several nodes).
//!
//! The interface was drawn from both: writes are *buffered* and become durable together at the
//! next [`QueueStore::commit`] (sled: its log flushed and `fdatasync`ed; PostgreSQL: one
//! transaction), which is what the group commit calls, so one sync or one COMMIT covers a batch
//! of messages; reads are futures (a database answers over the network) and see what is
//! committed (sled also shows what is written but not yet synced). The Queue keeps the
//! envelopes of the messages it is working on in memory, so it never needs to read back what it
//! has just written.
//!
//! Invariants every implementation keeps:
//! - A message's body is durable no later than its envelope; an envelope never names a body
//!   that is not there (bodies without an envelope are removed when the store opens).
//! - Message IDs are unique for the life of the store (and across the nodes sharing it) and
//!   never reused, even after the message is gone.
//! - A message due for delivery is handed out by [`QueueStore::claim_due`] to one node at a
//!   time: sled has one node; PostgreSQL leases it to the claiming node until the lease
//!   expires or the node records its results.
//! - Large bodies are written as they arrive to a spool file in a local folder
//!   ([`SpoolWriter`]); the store takes them over at insert.

pub mod pg_tls;
pub mod postgres;
pub mod sled;

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::dsn::{MessageDsn, RcptDsn};
use crate::protocol::outcome::{Class, Outcome};

pub use self::postgres::{PgSettings, PgStore, PgTls};
pub use self::sled::SledStore;

pub type QueueId = u64;

/// Body chunk size: well under sled's blob threshold (segment size / 4 = 128 KiB by default).
pub const CHUNK: usize = 64 * 1024;

pub(crate) fn remove_spool_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    Pending,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredRecipient")]
pub struct RecipientState {
    pub address: String,
    pub status: RcptStatus,
    pub attempts: u32,
    /// The result of the last delivery attempt (with the server that gave it, if one did).
    pub last: Option<Outcome>,
    /// Unix seconds of the next attempt after a temporary failure.
    pub next_attempt: Option<u64>,
    pub dsn: RcptDsn,
}

/// A recipient as any version stored it. Before outcomes were typed, the last result was a
/// text (`last_reply`, `"451 4.4.2 …"`) beside `remote_mta`; such envelopes are read into the
/// typed form here, and written back typed the next time they change.
#[derive(Deserialize)]
struct StoredRecipient {
    address: String,
    status: RcptStatus,
    attempts: u32,
    #[serde(default)]
    last: Option<Outcome>,
    #[serde(default)]
    last_reply: Option<String>,
    #[serde(default)]
    remote_mta: Option<String>,
    next_attempt: Option<u64>,
    #[serde(default)]
    dsn: RcptDsn,
}

impl From<StoredRecipient> for RecipientState {
    fn from(s: StoredRecipient) -> Self {
        let class = match s.status {
            RcptStatus::Pending => Class::Temporary,
            RcptStatus::Delivered => Class::Delivered,
            RcptStatus::Failed => Class::Permanent,
        };
        let last = s.last.or_else(|| s.last_reply.map(|t| Outcome::from_legacy_text(class, &t, s.remote_mta)));
        RecipientState {
            address: s.address,
            status: s.status,
            attempts: s.attempts,
            last,
            next_attempt: s.next_attempt,
            dsn: s.dsn,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: QueueId,
    /// Empty for the null reverse-path `<>`.
    pub sender: String,
    pub recipients: Vec<RecipientState>,
    /// Stored size, trace header included.
    pub size: u64,
    /// Unix seconds.
    pub received_at: u64,
    /// `smtp` or `pickup`.
    pub source: String,
    /// Client address for SMTP, file name for Pickup.
    pub origin: String,
    /// Earliest `next_attempt` of the pending recipients; mirrored in the retry index.
    pub next_attempt: Option<u64>,
    #[serde(default)]
    pub dsn: MessageDsn,
    /// A delay notice has been sent for this message (one per message).
    #[serde(default)]
    pub delay_notified: bool,
    /// Put on hold by the operator: not delivered until released (no retry-index entry).
    #[serde(default)]
    pub held: bool,
}

impl Envelope {
    pub fn is_finished(&self) -> bool {
        self.recipients.iter().all(|r| r.status != RcptStatus::Pending)
    }
}

/// Identifies a Pickup file that has been queued, so a restart between "queued" and "file
/// deleted" does not take it twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PickupMark {
    pub name: String,
    /// Inode, size and modification time of the file.
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("queue store: {0}")]
    Sled(#[from] ::sled::Error),
    #[error("queue store I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("queue store record unreadable: {0}")]
    Corrupt(String),
    /// Another handle holds the folder's lock: another process, or one of ours that was just
    /// dropped and whose background flusher has not let go yet.
    #[error("the queue store in {} is locked by another process", .0.display())]
    Locked(std::path::PathBuf),
    /// Being reopened after a write error ([`QueueStore::recover`]).
    #[error("the queue store is being reopened")]
    Closed,
    /// The database could not be reached or refused a statement (PostgreSQL store).
    #[error("queue database: {0}")]
    Database(String),
    /// The database reports that its disk is full (SQLSTATE 53100).
    #[error("queue database: disk full: {0}")]
    DatabaseFull(String),
}

impl StoreError {
    /// As an I/O error for the group commit, keeping whether the disk is full.
    pub fn into_io(self) -> std::io::Error {
        let kind = if self.is_no_space() { std::io::ErrorKind::StorageFull } else { std::io::ErrorKind::Other };
        std::io::Error::new(kind, self.to_string())
    }

    /// A write or sync failed (sled keeps such an error until the store is reopened), as
    /// opposed to a record that cannot be read or a store that is being reopened.
    pub fn is_write_failure(&self) -> bool {
        matches!(
            self,
            StoreError::Io(_)
                | StoreError::Sled(::sled::Error::Io(_))
                | StoreError::Database(_)
                | StoreError::DatabaseFull(_)
        )
    }

    /// True when the disk is full (so the client is told 452 4.3.1 rather than 451).
    pub fn is_no_space(&self) -> bool {
        if matches!(self, StoreError::DatabaseFull(_)) {
            return true;
        }
        let io = match self {
            StoreError::Io(e) => Some(e),
            StoreError::Sled(::sled::Error::Io(e)) => Some(e),
            _ => None,
        };
        io.is_some_and(crate::fsio::is_no_space)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A large message body a session wrote to its spool file as it arrived ([`Store::spool`]),
/// complete and synced. Becomes a message with [`Store::insert_staged`], which refuses it if
/// the store was reopened since (the reopen's orphan sweep may have removed the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedBody {
    pub id: QueueId,
    /// Bytes in the spool file.
    pub bytes: u64,
    pub generation: u64,
}

/// A body being written to its spool file (`<Queue>/spool/<id>`) as it arrives. The file
/// lives in the kernel's page cache, not in our memory; [`SpoolWriter::finish`] syncs it.
pub struct SpoolWriter {
    id: QueueId,
    file: File,
    path: PathBuf,
    bytes: u64,
    generation: u64,
}

impl SpoolWriter {
    pub fn id(&self) -> QueueId {
        self.id
    }

    /// The spool file; whoever gives up on the message removes it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.file.write_all(bytes)?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Writes the rest of the body and makes the file durable (its data, and its name in the
    /// spool folder), so the envelope written after it never names a body that a crash lost.
    pub fn finish(mut self, rest: &[u8]) -> std::io::Result<StagedBody> {
        self.write(rest)?;
        self.file.sync_data()?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(StagedBody { id: self.id, bytes: self.bytes, generation: self.generation })
    }
}

/// The folder of large bodies written as they arrived, one file per message (`<id>`), local to
/// the node whatever the store; and the count of the store's openings, which a staged body must
/// match to be queued (an opening sweeps the files of messages never queued).
pub struct Spool {
    dir: PathBuf,
    generation: AtomicU64,
}

impl Spool {
    /// Creates the folder if needed (0700 like the queue's).
    pub fn new(dir: PathBuf) -> std::io::Result<Spool> {
        std::fs::create_dir_all(&dir)?;
        Ok(Spool { dir, generation: AtomicU64::new(0) })
    }

    pub fn path(&self, id: QueueId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// A new opening: files staged before it cannot become messages any more.
    pub fn next_generation(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Starts the spool file of message `id`.
    pub fn start(&self, id: QueueId) -> Result<SpoolWriter> {
        use std::os::unix::fs::OpenOptionsExt;
        let generation = self.generation();
        let path = self.path(id);
        let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        Ok(SpoolWriter { id, file, path, bytes: 0, generation })
    }

    pub fn open(&self, staged: &StagedBody) -> Result<File> {
        Ok(File::open(self.path(staged.id))?)
    }

    /// Whether `staged` may still become a message (same opening, same ID).
    pub fn check(&self, staged: &StagedBody, id: QueueId) -> Result<()> {
        if staged.generation != self.generation() || staged.id != id {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// Removes the files whose name is not a message for which `keep` is true; returns how many.
    pub fn sweep(&self, mut keep: impl FnMut(QueueId) -> bool) -> Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let id = name.to_str().and_then(|n| n.parse::<QueueId>().ok());
            if id.is_some_and(&mut keep) {
                continue;
            }
            tracing::warn!(file = %entry.path().display(), "removing a spool file whose message was never queued");
            remove_spool_file(&entry.path())?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// What a store answers with: a future that owns what it needs (the Queue polls it on its
/// actor, the database work runs elsewhere).
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'static>>;

/// An answer already known (sled answers from memory and its own log).
pub fn ready<T: Send + 'static>(r: Result<T>) -> StoreFuture<T> {
    Box::pin(std::future::ready(r))
}

/// Messages by state, as the store counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Every message in the store; `None`: the store does not count them cheaply, and the
    /// Queue's own count (it is the only writer) is the truth.
    pub total: Option<usize>,
    /// Messages waiting for a retry time after `now`.
    pub deferred: usize,
    /// Messages on hold; `None` as for `total`.
    pub held: Option<usize>,
}

/// The answer to [`QueueStore::claim`].
#[derive(Debug)]
pub enum Claim {
    Taken(Envelope),
    Missing,
    /// Another node works on it (its name).
    Busy(String),
}

/// What the Queue needs to know when it opens the store.
#[derive(Debug, Default)]
pub struct Startup {
    /// Messages in the store, and those on hold (for the summary until the store counts).
    pub queued: usize,
    pub held: Vec<QueueId>,
    /// Messages to deliver now that [`QueueStore::claim_due`] would not hand out (sled's retry
    /// index holds only messages with a retry time; a new message has none).
    pub resume: Vec<Envelope>,
}

/// Everything the Queue keeps, behind one interface (see the module's documentation).
pub trait QueueStore: Send + Sync + 'static {
    /// `sled` or `postgres`, for logs and the status page.
    fn kind(&self) -> &'static str;

    /// The local folder the store uses (sled's files, the spool of large bodies): free space is
    /// watched here.
    fn dir(&self) -> &Path;

    /// Large bodies being received, and their files.
    fn spool(&self) -> &Spool;

    /// A new message ID, unique across every node sharing the store. Never blocks: a store
    /// that must ask a server keeps a few IDs in hand, and answers an error when it has none.
    fn next_id(&self) -> Result<QueueId>;

    /// Starts the spool file of a large body being received, under a new message ID.
    fn start_spool(&self) -> Result<SpoolWriter> {
        let id = self.next_id()?;
        self.spool().start(id)
    }

    /// Writes a message (body, envelope and the Pickup mark); durable after the next commit.
    fn insert(&self, env: &Envelope, message: std::sync::Arc<Vec<u8>>, mark: Option<&PickupMark>) -> Result<()>;

    /// [`QueueStore::insert`] for a body in a spool file: `header` (our trace header) goes in
    /// front of the file's content. Refused if the store was opened again since the file was
    /// started.
    fn insert_staged(&self, env: &Envelope, header: &[u8], staged: &StagedBody) -> Result<()>;

    /// Rewrites an envelope whose stored `next_attempt` was `old_next`, keeping the retry index
    /// in step; on a shared store this also gives the message's lease back.
    fn update(&self, env: &Envelope, old_next: Option<u64>) -> Result<()>;

    /// Removes a message whose stored `next_attempt` is `stored_next`.
    fn remove(&self, id: QueueId, stored_next: Option<u64>) -> Result<()>;

    /// Undoes an insert whose commit failed: the message and its Pickup mark go, so a retried
    /// Pickup file is queued afresh.
    fn discard(&self, env: &Envelope, mark: Option<&PickupMark>) -> Result<()>;

    fn forget_pickup(&self, name: &str) -> Result<()>;

    /// The Queue is done with the message for now: a shared store gives its lease back (with
    /// the next commit), so another node may take it when it is due.
    fn release(&self, _id: QueueId) {}

    /// Makes every write made before the call durable. The group commit calls this: one call
    /// answers many writers.
    fn commit(&self) -> StoreFuture<()>;

    /// [`QueueStore::commit`] from a thread that may block (the Queue stopping), waiting at most
    /// `wait`.
    fn commit_blocking(&self, wait: Duration) -> Result<()>;

    /// One message's envelope.
    fn envelope(&self, id: QueueId) -> StoreFuture<Option<Envelope>>;

    /// One message's stored bytes (our trace header included).
    fn body(&self, id: QueueId) -> StoreFuture<Vec<u8>>;

    /// At most the first `max` bytes of one message's stored bytes (its header section, for the
    /// admin API), read without reading the rest.
    fn body_head(&self, id: QueueId, max: usize) -> StoreFuture<Vec<u8>>;

    /// Up to `limit` envelopes with IDs above `after`, in ID order: paging through the queue.
    fn page(&self, after: QueueId, limit: usize) -> StoreFuture<Vec<Envelope>>;

    /// Up to `limit` messages whose retry time is at or before `now`, earliest first, not on
    /// hold and not among those `working` says the Queue works on already; on a shared store,
    /// claimed for this node (leased) as they are handed out (what this node works on is leased
    /// to it already, so is never handed out again).
    fn claim_due(&self, now: u64, limit: usize, working: &dyn Fn(QueueId) -> bool) -> StoreFuture<Vec<Envelope>>;

    /// Takes one message for this node now (an operator acts on it): its envelope, unless another
    /// node is working on it. Give it back with [`QueueStore::release`] unless it is delivered.
    fn claim(&self, id: QueueId) -> StoreFuture<Claim> {
        let envelope = self.envelope(id);
        Box::pin(async move { Ok(envelope.await?.map_or(Claim::Missing, Claim::Taken)) })
    }

    /// Extends this node's leases on the messages it works on (shared stores).
    fn renew(&self, _ids: Vec<QueueId>) -> StoreFuture<()> {
        ready(Ok(()))
    }

    /// How often [`QueueStore::renew`] must be called; `None`: the store has no leases.
    fn renew_every(&self) -> Option<Duration> {
        None
    }

    /// The earliest retry time at or after `from`, if any.
    fn earliest_retry(&self, from: u64) -> StoreFuture<Option<u64>>;

    /// Messages by state.
    fn counts(&self, now: u64) -> StoreFuture<Counts>;

    /// What the Queue needs when it (re)opens.
    fn startup(&self) -> StoreFuture<Startup>;

    /// The queue ID of a Pickup file already queued under this name and fingerprint.
    fn pickup_taken(&self, mark: &PickupMark) -> StoreFuture<Option<QueueId>>;

    /// After a write failed: gets the store writing again (sled: reopens its files; PostgreSQL:
    /// new connections), and proves it with a durable write. Callers have stopped writing.
    fn recover(self: std::sync::Arc<Self>) -> StoreFuture<()>;

    /// How often the retry scheduler must look at the store even when nothing it was told is
    /// due: other nodes add work to a shared store, and leases expire. `None`: only this node
    /// writes.
    fn poll_every(&self) -> Option<Duration> {
        None
    }

    /// Messages taken over so far from other nodes whose leases had expired (shared stores):
    /// each one may be delivered twice.
    fn taken_over(&self) -> u64 {
        0
    }
}

/// An envelope for tests: one pending recipient, never tried, due at `next`.
#[cfg(test)]
pub(crate) fn test_envelope(id: QueueId, sender: &str, recipient: &str, next: Option<u64>) -> Envelope {
    Envelope {
        id,
        sender: sender.into(),
        recipients: vec![RecipientState {
            address: recipient.into(),
            status: RcptStatus::Pending,
            attempts: 0,
            last: None,
            next_attempt: next,
            dsn: Default::default(),
        }],
        size: 3,
        received_at: 0,
        source: "smtp".into(),
        origin: "127.0.0.1".into(),
        next_attempt: next,
        dsn: Default::default(),
        delay_notified: false,
        held: false,
    }
}
