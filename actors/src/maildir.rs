//! The Maildir delivery actor (route `maildir`): one copy per recipient into the Maildir the path
//! template names (`/var/mail/{domain}/{user}/Maildir`), the format Dovecot, Courier and mutt read.
//!
//! Invariants:
//! - A recipient is reported delivered only after its file was written in `tmp/`, `fdatasync`ed,
//!   renamed into `new/` and `new/` synced. Readers never see a partial file.
//! - File names are unique (time, microseconds, process, a counter, host) as the Maildir
//!   specification asks, so concurrent deliveries never overwrite one another.
//! - Addresses come from the network: a local part or domain that could leave the template's
//!   folder (`/`, `..`, a leading dot, control characters) is refused permanently (5.1.3) and
//!   nothing is written.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use tokio::sync::Semaphore;

use crate::delivery::{replies, Deliver, DeliveryReport, RecipientResult};
use crate::fsio::{blocking, sync_dir, write_and_rename};

/// Recipients written at once, at most.
const WRITERS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaildirSettings {
    /// Folder of each recipient's Maildir, with `{user}` (local part, lower-cased), `{domain}`
    /// (lower-cased) and `{address}` replaced.
    pub path: String,
    /// For the unique file names.
    pub hostname: String,
}

pub struct Maildir {
    settings: Arc<MaildirSettings>,
    writers: Arc<Semaphore>,
}

impl Maildir {
    pub fn new(settings: MaildirSettings) -> Self {
        Maildir { settings: Arc::new(settings), writers: Arc::new(Semaphore::new(WRITERS)) }
    }
}

impl Actor for Maildir {
    type Context = Context<Self>;
}

/// One path component taken from an address: refused when it could name another folder.
fn safe_component(s: &str) -> Option<String> {
    let s = s.to_lowercase();
    let bad = s.is_empty() || s.starts_with('.') || s.contains(['/', '\\', '\0']) || s.chars().any(char::is_control);
    (!bad).then_some(s)
}

/// The Maildir folder of `address` under `template`, or `None` when the address cannot be mapped
/// safely.
pub fn maildir_path(template: &str, address: &str) -> Option<PathBuf> {
    let (user, domain) = address.rsplit_once('@')?;
    let user = safe_component(user.trim_matches('"'))?;
    let domain = safe_component(domain)?;
    let address = format!("{user}@{domain}");
    Some(PathBuf::from(template.replace("{user}", &user).replace("{domain}", &domain).replace("{address}", &address)))
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// `1764380000.M123456P4242Q7.host,S=1234`: unique per the Maildir specification, with the size
/// Dovecot reads from the name.
fn unique_name(hostname: &str, size: usize) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    // `/` and `:` have meanings in Maildir names.
    let host: String = hostname.chars().map(|c| if c == '/' || c == ':' { '_' } else { c }).collect();
    format!("{}.M{}P{}Q{}.{},S={}", now.as_secs(), now.subsec_micros(), std::process::id(), seq, host, size)
}

fn create_maildir(dir: &Path) -> io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true).mode(0o700);
    for sub in ["tmp", "new", "cur"] {
        b.create(dir.join(sub))?;
    }
    Ok(())
}

/// Writes one recipient's copy; returns the file name in `new/`.
fn deliver_one(dir: &Path, hostname: &str, contents: &[u8]) -> io::Result<String> {
    create_maildir(dir)?;
    let name = unique_name(hostname, contents.len());
    // Mailboxes are private to their owner, as delivery agents make them.
    write_and_rename(&dir.join("tmp").join(&name), &dir.join("new").join(&name), contents, 0o600)?;
    sync_dir(&dir.join("new"))?;
    Ok(name)
}

/// `Return-Path:` and `Delivered-To:` on top of the stored message, as a delivery agent adds them.
pub fn with_delivery_headers(sender: &str, recipient: &str, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 128);
    out.extend_from_slice(format!("Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n").as_bytes());
    out.extend_from_slice(message);
    out
}

impl Handler<Deliver> for Maildir {
    type Result = ResponseFuture<DeliveryReport>;

    fn handle(&mut self, req: Deliver, _ctx: &mut Self::Context) -> Self::Result {
        let settings = self.settings.clone();
        let writers = self.writers.clone();
        Box::pin(async move {
            let mut results = Vec::with_capacity(req.recipients.len());
            for r in &req.recipients {
                let Some(dir) = maildir_path(&settings.path, &r.address) else {
                    results.push(RecipientResult::new(r.index, replies::unmappable_mailbox()));
                    continue;
                };
                let contents = with_delivery_headers(&req.sender, &r.address, &req.message);
                let hostname = settings.hostname.clone();
                let written = match writers.clone().acquire_owned().await {
                    Ok(permit) => {
                        let d = dir.clone();
                        blocking(move || {
                            let r = deliver_one(&d, &hostname, &contents);
                            drop(permit);
                            r
                        })
                        .await
                    }
                    Err(e) => Err(io::Error::other(e.to_string())),
                };
                let outcome = match written {
                    Ok(name) => replies::maildir_delivered(format!("{}/new/{name}", dir.display())),
                    Err(e) => replies::local_io(&format!("writing to the Maildir {}", dir.display()), &e),
                };
                results.push(RecipientResult::new(r.index, outcome));
            }
            DeliveryReport { results }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_from_addresses() {
        let t = "/var/mail/{domain}/{user}/Maildir";
        let cases: [(&str, Option<&str>); 9] = [
            ("Alice@Example.COM", Some("/var/mail/example.com/alice/Maildir")),
            ("first.last@ex.org", Some("/var/mail/ex.org/first.last/Maildir")),
            ("\"quoted\"@ex.org", Some("/var/mail/ex.org/quoted/Maildir")),
            ("\"../../etc\"@ex.org", None),
            ("\"a/b\"@ex.org", None),
            (".hidden@ex.org", None),
            ("..@ex.org", None),
            ("bob@..", None),
            ("no-at-sign", None),
        ];
        for (address, want) in cases {
            assert_eq!(maildir_path(t, address), want.map(PathBuf::from), "{address}");
        }
        assert_eq!(
            maildir_path("/srv/{address}", "a@b.org"),
            Some(PathBuf::from("/srv/a@b.org")),
            "{{address}} is the whole address"
        );
    }

    #[test]
    fn names_are_unique() {
        let names: std::collections::HashSet<String> = (0..1000).map(|_| unique_name("h/o:st", 10)).collect();
        assert_eq!(names.len(), 1000);
        assert!(names.iter().all(|n| !n.contains('/') && !n.contains(':') && n.ends_with(",S=10")));
    }
}
