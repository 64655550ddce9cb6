//! `mailroot queue export` and `import`: the queue as a portable file, to move it from one store
//! to another (sled to PostgreSQL and back) or to another machine. Works on the store the
//! configuration names, with every daemon using it stopped.
//!
//! The file is JSON lines: a header (`format`, `version`, the store it came from), one line per
//! message (its envelope as the store keeps it, its bytes in base64), and an end line with the
//! count, so that a file cut short is refused before anything is imported. Import gives each
//! message a new ID from the target store (IDs are unique per store, and the target may already
//! hold messages), keeps every recipient's state (attempts, last reply, retry time, hold), and
//! commits in batches.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use mailroot_actors::store::{Envelope, QueueStore};
use serde::{Deserialize, Serialize};

use crate::config::Config;

const FORMAT: &str = "mailroot-queue";
const VERSION: u32 = 1;
/// Messages read from the store at once while exporting.
const PAGE: usize = 100;
/// A commit at least every this many messages, or bytes of bodies, while importing.
const BATCH_MESSAGES: usize = 200;
const BATCH_BYTES: usize = 32 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    store: String,
}

#[derive(Serialize, Deserialize)]
struct Line {
    envelope: Envelope,
    body: String,
}

#[derive(Serialize, Deserialize)]
struct End {
    end: bool,
    messages: usize,
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())
}

fn open(config: &Config) -> Result<Arc<dyn QueueStore>, String> {
    crate::daemon::open_queue_store(config).map_err(|e| format!("{e} (stop the daemon first)"))
}

/// Writes every message of the configured store to `out`; returns how many.
pub fn export(config: &Config, out: &Path) -> Result<usize, String> {
    let store = open(config)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let mut w = BufWriter::new(file);
    let io = |e: std::io::Error| format!("{}: {e}", out.display());
    let json = |e: serde_json::Error| e.to_string();
    let header = Header { format: FORMAT.into(), version: VERSION, store: store.kind().into() };
    writeln!(w, "{}", serde_json::to_string(&header).map_err(json)?).map_err(io)?;
    let rt = runtime()?;
    let mut count = 0;
    let mut after = 0;
    loop {
        let page = rt.block_on(store.page(after, PAGE)).map_err(|e| e.to_string())?;
        let last_page = page.len() < PAGE;
        for env in page {
            after = env.id;
            let body = rt.block_on(store.body(env.id)).map_err(|e| format!("message {}: {e}", env.id))?;
            let line = Line { envelope: env, body: base64::engine::general_purpose::STANDARD.encode(&body) };
            writeln!(w, "{}", serde_json::to_string(&line).map_err(json)?).map_err(io)?;
            count += 1;
        }
        if last_page {
            break;
        }
    }
    writeln!(w, "{}", serde_json::to_string(&End { end: true, messages: count }).map_err(json)?).map_err(io)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(count)
}

/// Reads `input` whole once to check it (header, every line, the end line's count), without
/// keeping the bodies; returns the number of messages.
fn check(input: &Path) -> Result<usize, String> {
    let f = std::fs::File::open(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let mut lines = BufReader::new(f).lines();
    let header: Header = match lines.next() {
        Some(Ok(l)) => serde_json::from_str(&l).map_err(|e| format!("line 1 is not a queue export header: {e}"))?,
        _ => return Err("empty file".into()),
    };
    if header.format != FORMAT || header.version != VERSION {
        return Err(format!("not a {FORMAT} file of version {VERSION}"));
    }
    let mut count = 0;
    for (n, line) in lines.enumerate() {
        let line = line.map_err(|e| format!("line {}: {e}", n + 2))?;
        if let Ok(end) = serde_json::from_str::<End>(&line) {
            if end.end && end.messages == count {
                return Ok(count);
            }
            return Err(format!("the end line counts {} messages, the file has {count}", end.messages));
        }
        let m: Line = serde_json::from_str(&line).map_err(|e| format!("line {}: {e}", n + 2))?;
        base64::engine::general_purpose::STANDARD.decode(&m.body).map_err(|e| format!("line {}: body: {e}", n + 2))?;
        count += 1;
    }
    Err(format!("no end line after {count} messages: the file was cut short; nothing imported"))
}

/// Adds every message in `input` to the configured store, under new IDs; returns how many.
pub fn import(config: &Config, input: &Path) -> Result<usize, String> {
    let expected = check(input)?;
    let store = open(config)?;
    let rt = runtime()?;
    let f = std::fs::File::open(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let mut count = 0;
    let (mut batch, mut batch_bytes) = (0, 0);
    for line in BufReader::new(f).lines().skip(1).take(expected) {
        let line = line.map_err(|e| e.to_string())?;
        let m: Line = serde_json::from_str(&line).map_err(|e| e.to_string())?;
        let body = base64::engine::general_purpose::STANDARD.decode(&m.body).map_err(|e| e.to_string())?;
        let mut env = m.envelope;
        env.id = store.next_id().map_err(|e| e.to_string())?;
        let size = body.len();
        store.insert(&env, Arc::new(body), None).map_err(|e| e.to_string())?;
        // Not being worked on by anyone: any node may take it when it is due.
        store.release(env.id);
        count += 1;
        batch += 1;
        batch_bytes += size;
        if batch >= BATCH_MESSAGES || batch_bytes >= BATCH_BYTES {
            rt.block_on(store.commit()).map_err(|e| format!("after {count} messages: {e}"))?;
            (batch, batch_bytes) = (0, 0);
        }
    }
    rt.block_on(store.commit()).map_err(|e| format!("after {count} messages: {e}"))?;
    Ok(count)
}
