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

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
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

/// The lines of an export file, one at a time, none longer than `max_line` bytes: a damaged
/// or hostile file cannot make us read a line without end.
struct Reader {
    lines: BufReader<std::fs::File>,
    max_line: usize,
    number: usize,
    buf: Vec<u8>,
}

/// What a line of an export file holds after the header.
enum Item {
    Message(Envelope, Vec<u8>),
    End(usize),
}

impl Reader {
    /// Opens `input` and checks its header.
    fn open(input: &Path, max_line: usize) -> Result<Reader, String> {
        let f = std::fs::File::open(input).map_err(|e| format!("{}: {e}", input.display()))?;
        let mut r = Reader { lines: BufReader::new(f), max_line, number: 0, buf: Vec::new() };
        let header: Header = match r.line()? {
            Some(l) => serde_json::from_slice(l).map_err(|e| format!("line 1 is not a queue export header: {e}"))?,
            None => return Err("empty file".into()),
        };
        if header.format != FORMAT || header.version != VERSION {
            return Err(format!("not a {FORMAT} file of version {VERSION}"));
        }
        Ok(r)
    }

    fn line(&mut self) -> Result<Option<&[u8]>, String> {
        self.buf.clear();
        self.number += 1;
        let n = (&mut self.lines)
            .take(self.max_line as u64 + 1)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| format!("line {}: {e}", self.number))?;
        if n == 0 {
            return Ok(None);
        }
        if self.buf.len() > self.max_line {
            return Err(format!("line {} is longer than {} bytes", self.number, self.max_line));
        }
        Ok(Some(&self.buf))
    }

    /// The next message or the end line; `None` when the file ends without one.
    fn next(&mut self) -> Result<Option<Item>, String> {
        let Some(line) = self.line()? else { return Ok(None) };
        if let Ok(end) = serde_json::from_slice::<End>(line) {
            return Ok(end.end.then_some(Item::End(end.messages)));
        }
        let m: Line = serde_json::from_slice(line).map_err(|e| format!("line {}: {e}", self.number))?;
        let body = base64::engine::general_purpose::STANDARD
            .decode(&m.body)
            .map_err(|e| format!("line {}: body: {e}", self.number))?;
        Ok(Some(Item::Message(m.envelope, body)))
    }
}

/// The longest line an export of this configuration's messages can hold: a message's bytes in
/// base64 (4/3) and its envelope, with room to spare.
fn max_line(config: &Config) -> usize {
    (config.limits.max_message_size as usize).max(BATCH_BYTES).saturating_mul(2)
}

/// Reads `input` whole once to check it (header, every line, the end line's count), keeping
/// one line at a time; returns the number of messages.
fn check(input: &Path, max_line: usize) -> Result<usize, String> {
    let mut r = Reader::open(input, max_line)?;
    let mut count = 0;
    loop {
        match r.next()? {
            Some(Item::Message(..)) => count += 1,
            Some(Item::End(n)) if n == count => return Ok(count),
            Some(Item::End(n)) => return Err(format!("the end line counts {n} messages, the file has {count}")),
            None => {
                return Err(format!("no end line after {count} messages: the file was cut short; nothing imported"))
            }
        }
    }
}

/// Adds every message in `input` to the configured store, under new IDs; returns how many.
pub fn import(config: &Config, input: &Path) -> Result<usize, String> {
    let max_line = max_line(config);
    let expected = check(input, max_line)?;
    let store = open(config)?;
    let rt = runtime()?;
    let mut r = Reader::open(input, max_line)?;
    let mut count = 0;
    let (mut batch, mut batch_bytes) = (0, 0);
    while count < expected {
        let Some(Item::Message(mut env, body)) = r.next()? else {
            return Err(format!("the file changed while it was imported (after {count} messages)"));
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, lines: &[&str]) -> std::path::PathBuf {
        let p = dir.join("q.jsonl");
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    }

    /// Files `import` refuses before writing anything, and one it takes.
    #[test]
    fn checking_an_export_file() {
        let dir = tempfile::tempdir().unwrap();
        let header = r#"{"format":"mailroot-queue","version":1,"store":"sled"}"#;
        let env = r#"{"id":7,"sender":"a@b.test","recipients":[],"size":1,"received_at":0,"source":"smtp","origin":"x","next_attempt":null}"#;
        let message = format!(r#"{{"envelope":{env},"body":"eA=="}}"#);
        let end = |n: usize| format!(r#"{{"end":true,"messages":{n}}}"#);
        let cases: Vec<(Vec<String>, usize, Result<usize, &str>)> = vec![
            (vec![header.into(), message.clone(), end(1)], 1000, Ok(1)),
            (vec![header.into(), message.clone()], 1000, Err("cut short")),
            (vec![header.into(), message.clone(), end(2)], 1000, Err("counts 2 messages")),
            (vec![header.into(), message.replace("eA==", "!!"), end(1)], 1000, Err("body")),
            (vec![r#"{"format":"other","version":1,"store":"x"}"#.into(), end(0)], 1000, Err("not a mailroot-queue")),
            (vec![header.into(), message.clone(), end(1)], 100, Err("longer than 100 bytes")),
            (vec![], 1000, Err("not a queue export header")),
        ];
        for (lines, max, want) in cases {
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            let got = check(&file(dir.path(), &refs), max);
            match (got, want) {
                (Ok(n), Ok(w)) => assert_eq!(n, w),
                (Err(e), Err(w)) => assert!(e.contains(w), "{e:?} should say {w:?}"),
                (got, want) => panic!("{lines:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
