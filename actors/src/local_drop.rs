//! The LocalDrop actor: delivers local recipients into the Drop folder, one `<id>.eml` per message,
//! in the IIS format (`x-sender:`/`x-receiver:` lines, then the message).
//!
//! Invariant: a recipient is reported delivered only after its file was written in SortTemp,
//! `fdatasync`ed, renamed into Drop and the Drop directory synced. Readers of Drop never see a
//! partial file. A redelivery of the same message (after a crash) replaces the file rather than
//! adding a second one. Directory syncs are group-committed across concurrent deliveries.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::Semaphore;

use crate::commit::GroupCommit;
use crate::delivery::{replies, Deliver, DeliveryReport};
use crate::fsio::{blocking, sync_dir, write_and_rename};
use crate::metrics::Metrics;

/// The highest queue ID that names a file in Drop (`<id>.eml`): the daemon opens the queue with
/// IDs above it, so new IDs never reuse the name of an undelivered Drop file even if the Queue
/// folder was wiped.
pub fn highest_drop_id(drop_dir: &Path) -> io::Result<u64> {
    let mut max = 0;
    for entry in std::fs::read_dir(drop_dir)? {
        let name = entry?.file_name();
        if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".eml")).and_then(|n| n.parse::<u64>().ok()) {
            max = max.max(id);
        }
    }
    Ok(max)
}

pub struct LocalDrop {
    drop_dir: PathBuf,
    sort_temp: PathBuf,
    metrics: Arc<Metrics>,
    dir_sync: Option<GroupCommit>,
    /// Makes temporary names unique even for two attempts of one message.
    seq: u64,
    /// Files being written at once. Enough concurrent `fdatasync`s for ext4 to merge them into
    /// shared journal commits; more only makes writers spin on the SortTemp directory lock.
    writers: Arc<Semaphore>,
}

/// How many Drop files are written concurrently.
pub const DROP_WRITERS: usize = 32;

impl LocalDrop {
    pub fn new(drop_dir: PathBuf, sort_temp: PathBuf, metrics: Arc<Metrics>) -> Self {
        LocalDrop {
            drop_dir,
            sort_temp,
            metrics,
            dir_sync: None,
            seq: 0,
            writers: Arc::new(Semaphore::new(DROP_WRITERS)),
        }
    }
}

impl Actor for LocalDrop {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        let dir = self.drop_dir.clone();
        self.dir_sync = Some(GroupCommit::spawn(
            "drop directory",
            move || -> crate::commit::SyncFuture {
                let dir = dir.clone();
                Box::pin(crate::fsio::blocking(move || sync_dir(&dir)))
            },
            self.metrics.drop_commit_batch.clone(),
            crate::commit::SYNC_DEADLINE,
        ));
    }
}

/// The Drop file's bytes: envelope lines, then the stored message.
pub fn drop_file_contents(sender: &str, recipients: &[&str], message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64 * (recipients.len() + 1));
    let sender = if sender.is_empty() { "<>" } else { sender };
    out.extend_from_slice(format!("x-sender: {sender}\r\n").as_bytes());
    for r in recipients {
        out.extend_from_slice(format!("x-receiver: {r}\r\n").as_bytes());
    }
    out.extend_from_slice(message);
    out
}

fn write_drop_file(req: &Deliver, drop_dir: &Path, sort_temp: &Path, seq: u64) -> io::Result<()> {
    let rcpts: Vec<&str> = req.recipients.iter().map(|r| r.address.as_str()).collect();
    let contents = drop_file_contents(&req.sender, &rcpts, &req.message);
    let tmp = sort_temp.join(format!("{}.{}.tmp", req.id, seq));
    write_and_rename(&tmp, &drop_dir.join(format!("{}.eml", req.id)), &contents, 0o666)
}

impl Handler<Deliver> for LocalDrop {
    type Result = ResponseFuture<DeliveryReport>;

    fn handle(&mut self, req: Deliver, _ctx: &mut Self::Context) -> Self::Result {
        let (drop_dir, sort_temp) = (self.drop_dir.clone(), self.sort_temp.clone());
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let dir_sync = self.dir_sync.clone();
        let writers = self.writers.clone();
        let req = Arc::new(req);
        Box::pin(async move {
            let written = match writers.acquire_owned().await {
                Ok(permit) => {
                    let req = req.clone();
                    blocking(move || {
                        let r = write_drop_file(&req, &drop_dir, &sort_temp, seq);
                        drop(permit);
                        r
                    })
                    .await
                }
                Err(e) => Err(io::Error::other(e.to_string())),
            };
            if let Err(e) = written {
                return DeliveryReport::all(req.indices(), replies::local_io("writing the Drop file", &e));
            }
            let synced = match dir_sync {
                Some(s) => s.commit().await.map_err(|e| io::Error::other(e.to_string())),
                None => Err(io::Error::other("drop directory syncer not running")),
            };
            let outcome = match synced {
                Ok(()) => replies::dropped(req.id),
                Err(e) => replies::local_io("syncing the Drop folder", &e),
            };
            DeliveryReport::all(req.indices(), outcome)
        })
    }
}
