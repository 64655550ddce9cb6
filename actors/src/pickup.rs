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
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        out.push((name, format!("{}:{}:{}.{}", meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec())));
    }
    Ok(out)
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
    let p = path.clone();
    let raw = match blocking(move || {
        // Read at most one byte past the limit, even if the file grows while we read it.
        let mut raw = Vec::new();
        fs::File::open(&p)?.take(limit + 1).read_to_end(&mut raw)?;
        Ok((raw.len() as u64 <= limit).then_some(raw))
    })
    .await
    {
        Ok(Some(raw)) => raw,
        Ok(None) => return badmail(&s, &name, "the file is larger than the maximum message size", &metrics).await,
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
        dsn: Default::default(),
        rcpt_dsn: Vec::new(),
        body: msg.body,
        origin: Origin::Pickup,
        origin_text: name.clone(),
        pickup: Some(PickupMark { name: name.clone(), fingerprint }),
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
