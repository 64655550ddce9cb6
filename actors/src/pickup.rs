//! The Pickup actor: takes RFC 5322 files dropped into the Pickup folder and queues them as if
//! they had come over SMTP. The file format itself is parsed by `mailroot_protocol::pickup`.
//!
//! Rules (docs/configuration.md repeats them for users):
//! - Names starting with `.` or ending in `.tmp` are never taken: write there, then rename.
//! - A file is taken only when its inode, size and mtime are unchanged across two scans, so a
//!   writer that ignores the rename rule is still not read half-written.
//! - The file is deleted only after its message is durably queued. A restart in between does not
//!   queue it twice: the queue remembers the file's name and fingerprint with the message.
//! - A malformed file goes to `Badmail/<name>.bad` with `<name>.bdr` stating the reason.
//! - Only regular files are read. A file is opened without following symbolic links and without
//!   blocking (`O_NOFOLLOW | O_NONBLOCK`), then checked on the opened descriptor (`fstat`: a
//!   regular file, and the same inode, size and mtime the scans saw). A symlink, FIFO, socket or
//!   device goes to Badmail with the reason; a file swapped or changed since the scan is left
//!   for the next scans. So a writer who swaps a file for a link between scan and open cannot
//!   make mailroot mail the link's target, and a FIFO cannot wedge Pickup or the stop.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tracing::{error, info, warn};

use crate::fsio::{blocking, sync_dir, unique_badmail_base};
use crate::logsafe::LogSafe;
use crate::metrics::{ActorMeter, Metrics, ResultLabel};
use crate::protocol::pickup::parse_pickup;
use crate::protocol::received::Origin;
use crate::queue::{Enqueue, PickupDone};
use crate::store::PickupMark;

#[derive(Debug, Clone)]
pub struct PickupSettings {
    pub pickup_dir: PathBuf,
    pub badmail_dir: PathBuf,
    pub poll: Duration,
    pub max_message_size: usize,
    pub max_hop_count: usize,
    /// Files handled at once.
    pub max_concurrent: usize,
}

// --- the actor --------------------------------------------------------------------------------

pub struct Pickup {
    settings: PickupSettings,
    queue: Recipient<Enqueue>,
    done: Recipient<PickupDone>,
    metrics: Arc<Metrics>,
    /// Fingerprints seen at the previous scan.
    seen: HashMap<String, String>,
    in_flight: HashSet<String>,
    scanning: bool,
    meter: ActorMeter,
}

impl Pickup {
    pub fn new(
        settings: PickupSettings,
        queue: Recipient<Enqueue>,
        done: Recipient<PickupDone>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let meter = metrics.actor("pickup");
        Pickup {
            settings,
            queue,
            done,
            metrics,
            seen: HashMap::new(),
            in_flight: HashSet::new(),
            scanning: false,
            meter,
        }
    }

    fn scan(&mut self, ctx: &mut Context<Self>) {
        if self.scanning {
            return;
        }
        self.scanning = true;
        let dir = self.settings.pickup_dir.clone();
        blocking(move || list_candidates(&dir))
            .into_actor(self)
            .map(|res, act, ctx| {
                act.scanning = false;
                let found = match res {
                    Ok(found) => found,
                    Err(e) => return warn!(error = %e, "cannot list the Pickup folder"),
                };
                let mut now_seen = HashMap::new();
                for (name, fp) in found {
                    let stable = act.seen.get(&name) == Some(&fp);
                    if stable && !act.in_flight.contains(&name) && act.in_flight.len() < act.settings.max_concurrent {
                        act.take(name.clone(), fp.clone(), ctx);
                    }
                    now_seen.insert(name, fp);
                }
                act.seen = now_seen;
            })
            .spawn(ctx);
    }

    fn take(&mut self, name: String, fingerprint: String, ctx: &mut Context<Self>) {
        self.in_flight.insert(name.clone());
        let handling = self.meter.handling();
        let s = self.settings.clone();
        let (queue, done, metrics) = (self.queue.clone(), self.done.clone(), self.metrics.clone());
        let name2 = name.clone();
        async move { process(s, name2, fingerprint, queue, done, metrics).await }
            .into_actor(self)
            .map(move |_, act, _| {
                drop(handling);
                act.in_flight.remove(&name);
                act.seen.remove(&name);
            })
            .spawn(ctx);
    }
}

/// Candidates collected per scan, at most: a Pickup folder flooded with files is worked through
/// in slices, and the scan's memory stays bounded.
const SCAN_LIMIT: usize = 4096;

fn list_candidates(dir: &Path) -> io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        if out.len() >= SCAN_LIMIT {
            break;
        }
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') || name.ends_with(".tmp") {
            continue;
        }
        // lstat: what the name is, not what a link points to. Folders are the operator's; any
        // other kind is a candidate, and `read_pickup_file` sends what is not a file to Badmail.
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            continue;
        }
        out.push((name, fingerprint(&meta)));
    }
    Ok(out)
}

/// Inode, size and modification time: what must not change between the scans and the read.
fn fingerprint(meta: &fs::Metadata) -> String {
    format!("{}:{}:{}.{}", meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec())
}

/// What reading a Pickup entry found.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    /// The file's bytes, at most the limit.
    File(Vec<u8>),
    /// Larger than the limit.
    TooBig,
    /// Not a regular file: the reason for Badmail.
    NotRegular(&'static str),
    /// A different or changed file since the scan: left for the next scans.
    Changed,
}

/// Opens `path` without following links or blocking, checks the descriptor is the regular file
/// the scans fingerprinted, and reads at most `limit + 1` bytes (even if the file grows).
fn read_pickup_file(path: &Path, scanned: &str, limit: u64) -> io::Result<Entry> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(Entry::NotRegular("a symbolic link")),
        // A socket cannot be opened at all.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(Entry::NotRegular("not a regular file")),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Ok(Entry::NotRegular(match () {
            _ if kind.is_fifo() => "a FIFO (named pipe)",
            _ if kind.is_socket() => "a socket",
            _ if kind.is_block_device() || kind.is_char_device() => "a device",
            _ => "not a regular file",
        }));
    }
    if fingerprint(&meta) != scanned {
        return Ok(Entry::Changed);
    }
    let mut raw = Vec::new();
    file.take(limit + 1).read_to_end(&mut raw)?;
    Ok(if raw.len() as u64 <= limit { Entry::File(raw) } else { Entry::TooBig })
}

async fn process(
    s: PickupSettings,
    name: String,
    fingerprint: String,
    queue: Recipient<Enqueue>,
    done: Recipient<PickupDone>,
    metrics: Arc<Metrics>,
) {
    let path = s.pickup_dir.join(&name);
    let limit = s.max_message_size as u64 + 64 * 1024;
    let (p, scanned) = (path.clone(), fingerprint.clone());
    let raw = match blocking(move || read_pickup_file(&p, &scanned, limit)).await {
        Ok(Entry::File(raw)) => raw,
        Ok(Entry::TooBig) => {
            return badmail(&s, &name, "the file is larger than the maximum message size", &metrics).await
        }
        Ok(Entry::NotRegular(what)) => {
            let reason = format!("{what}: only regular files are taken from Pickup");
            return badmail(&s, &name, &reason, &metrics).await;
        }
        Ok(Entry::Changed) => return info!(file = %LogSafe(&name), "pickup file changed since the scan; taken later"),
        Err(e) => return warn!(file = %LogSafe(&name), error = %e, "cannot read pickup file; will retry"),
    };
    let parsed = match parse_pickup(&raw, s.max_hop_count) {
        Ok(p) if p.body.len() > s.max_message_size => Err("the message is larger than the maximum message size".into()),
        other => other,
    };
    let msg = match parsed {
        Ok(m) => m,
        Err(reason) => return badmail(&s, &name, &reason, &metrics).await,
    };
    let sender = msg.sender.as_ref().map(|m| m.to_string()).unwrap_or_default();
    let recipients: Vec<String> = msg.recipients.iter().map(|r| r.to_string()).collect();
    let size = msg.body.len();
    let req = Enqueue {
        sender: msg.sender,
        recipients: msg.recipients,
        dsn: msg.dsn,
        rcpt_dsn: msg.rcpt_dsn,
        body: msg.body,
        origin: Origin::Pickup,
        origin_text: name.clone(),
        pickup: Some(PickupMark { name: name.clone(), fingerprint }),
        staged: None,
        // Whoever can write to the Pickup folder is a local user of this machine.
        sign: true,
        auth_results: String::new(),
    };
    let id = match queue.send(req).await {
        Ok(Ok(id)) => id,
        Ok(Err(e)) => return warn!(file = %LogSafe(&name), error = ?e, "queue refused pickup file; will retry"),
        Err(e) => return warn!(file = %LogSafe(&name), error = %e, "queue unavailable; will retry"),
    };
    info!(id, file = %LogSafe(&name), sender = %LogSafe(&sender), recipients = %LogSafe(&recipients.join(",")), size, result = "accepted", "pickup");
    metrics.pickup_files.get_or_create(&ResultLabel { result: "queued" }).inc();
    let dir = s.pickup_dir.clone();
    match blocking(move || {
        fs::remove_file(&path)?;
        sync_dir(&dir)
    })
    .await
    {
        // The mark is forgotten only once the deletion is durable.
        Ok(()) => {
            let _ = done.send(PickupDone { name }).await;
        }
        Err(e) => {
            error!(id, file = %LogSafe(&name), error = %e, "cannot delete queued pickup file; it will not be queued again")
        }
    }
}

async fn badmail(s: &PickupSettings, name: &str, reason: &str, metrics: &Metrics) {
    warn!(file = %LogSafe(name), reason = %LogSafe(reason), "pickup file moved to Badmail");
    metrics.pickup_files.get_or_create(&ResultLabel { result: "badmail" }).inc();
    let (from, bad_dir) = (s.pickup_dir.join(name), s.badmail_dir.clone());
    let (name, reason) = (name.to_string(), reason.to_string());
    let res = blocking(move || {
        let base = unique_badmail_base(&bad_dir, &name);
        let mut bdr = fs::File::create(bad_dir.join(format!("{base}.bdr")))?;
        writeln!(bdr, "Pickup file: {name}\r\nReason: {reason}\r")?;
        bdr.sync_all()?;
        fs::rename(&from, bad_dir.join(format!("{base}.bad")))?;
        sync_dir(&bad_dir)
    })
    .await;
    if let Err(e) = res {
        error!(error = %e, "cannot move a malformed pickup file to Badmail");
    }
}

impl Actor for Pickup {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.meter.stopped();
    }

    fn started(&mut self, ctx: &mut Self::Context) {
        self.meter.started();
        ctx.run_interval(self.settings.poll, |act, ctx| act.scan(ctx));
        self.scan(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn scanned(path: &Path) -> String {
        fingerprint(&fs::symlink_metadata(path).unwrap())
    }

    /// What the scan saw, then what is there when the file is opened.
    #[test]
    fn only_the_scanned_regular_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        fs::write(&secret, "root only\r\n").unwrap();
        let file = dir.path().join("mail.eml");
        fs::write(&file, "x-sender: a@b.test\r\n").unwrap();
        let fp = scanned(&file);
        assert_eq!(read_pickup_file(&file, &fp, 100).unwrap(), Entry::File(b"x-sender: a@b.test\r\n".to_vec()));
        assert_eq!(read_pickup_file(&file, &fp, 5).unwrap(), Entry::TooBig);

        // Swapped for a symlink to a file the writer could not read: not followed.
        fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&secret, &file).unwrap();
        assert_eq!(read_pickup_file(&file, &fp, 100).unwrap(), Entry::NotRegular("a symbolic link"));

        // Swapped for another regular file (another inode): left for the next scans.
        fs::remove_file(&file).unwrap();
        fs::write(&file, "other\r\n").unwrap();
        assert_eq!(read_pickup_file(&file, &fp, 100).unwrap(), Entry::Changed);

        // A FIFO with no writer: refused at once, never a blocking open or read.
        let fifo = dir.path().join("pipe.eml");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success(), "mkfifo");
        let start = Instant::now();
        assert_eq!(read_pickup_file(&fifo, &scanned(&fifo), 100).unwrap(), Entry::NotRegular("a FIFO (named pipe)"));
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
