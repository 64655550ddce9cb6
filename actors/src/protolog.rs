//! The protocol log (IIS's SMTP W3C extended log): one line per SMTP command with the client,
//! the command, the reply code, the bytes each way and the time taken. A new file each day when
//! the path has `%Y`, `%m`, `%d`.
//!
//! Invariant: a failure to write the log never affects mail: it is reported once per file and
//! the line is dropped. Lines are buffered and flushed at least every second by the daemon.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::protocol::received::civil_date;
use crate::protocol::CommandLog;

pub const FIELDS: &str = "date time c-ip s-sitename cs-method cs-uri-stem sc-status sc-bytes cs-bytes time-taken";

pub struct ProtocolLog {
    template: String,
    file: Mutex<Option<(PathBuf, BufWriter<File>)>>,
}

/// `%Y-%m-%d` and `%H:%M:%S` in UTC.
fn date_time(unix: u64) -> (String, String) {
    let (y, m, d) = civil_date(unix);
    let s = unix % 86_400;
    (format!("{y:04}-{m:02}-{d:02}"), format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60))
}

impl ProtocolLog {
    /// `None` when `template` is empty (the log is off). Checks that the folder can be created.
    pub fn open(template: &str) -> std::io::Result<Option<std::sync::Arc<ProtocolLog>>> {
        if template.is_empty() {
            return Ok(None);
        }
        let log = ProtocolLog { template: template.to_string(), file: Mutex::new(None) };
        if let Some(dir) = log.path_for(crate::clock::unix_now()).parent() {
            fs::create_dir_all(dir)?;
        }
        Ok(Some(std::sync::Arc::new(log)))
    }

    fn path_for(&self, unix: u64) -> PathBuf {
        let (y, m, d) = civil_date(unix);
        PathBuf::from(
            self.template
                .replace("%Y", &format!("{y:04}"))
                .replace("%m", &format!("{m:02}"))
                .replace("%d", &format!("{d:02}")),
        )
    }

    fn open_file(path: &Path, unix: u64) -> std::io::Result<BufWriter<File>> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let new = !path.exists();
        let mut w = BufWriter::new(OpenOptions::new().create(true).append(true).open(path)?);
        if new {
            let (date, time) = date_time(unix);
            write!(
                w,
                "#Software: mailroot {}\r\n#Version: 1.0\r\n#Date: {date} {time}\r\n#Fields: {FIELDS}\r\n",
                env!("CARGO_PKG_VERSION")
            )?;
        }
        Ok(w)
    }

    /// Appends one line.
    /// `site` is the listener's name (IIS wrote its virtual server's, `SMTPSVC1`).
    pub fn write(&self, client: IpAddr, site: &str, entry: &CommandLog, taken: Duration) {
        let now = crate::clock::unix_now();
        let path = self.path_for(now);
        let (date, time) = date_time(now);
        let arg = if entry.arg.is_empty() { "-" } else { entry.arg.as_str() };
        let line = format!(
            "{date} {time} {client} {site} {} {arg} {} {} {} {}\r\n",
            entry.verb,
            entry.status,
            entry.out_bytes,
            entry.in_bytes,
            taken.as_millis()
        );
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_none_or(|(p, _)| *p != path) {
            if let Some((_, mut old)) = guard.take() {
                let _ = old.flush();
            }
            match Self::open_file(&path, now) {
                Ok(w) => *guard = Some((path.clone(), w)),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot open the protocol log");
                    return;
                }
            }
        }
        if let Some((p, w)) = guard.as_mut() {
            if let Err(e) = w.write_all(line.as_bytes()) {
                tracing::error!(file = %p.display(), error = %e, "cannot write the protocol log");
                *guard = None;
            }
        }
    }

    pub fn flush(&self) {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, w)) = guard.as_mut() {
            let _ = w.flush();
        }
    }
}

impl Drop for ProtocolLog {
    fn drop(&mut self) {
        self.flush();
    }
}
