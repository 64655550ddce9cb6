//! Small file-system helpers shared by the actors that touch disk (queue sync, Drop, Pickup).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Runs blocking file work on the blocking pool; a panicked task becomes an I/O error.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(io::Error::other(format!("blocking task failed: {e}"))))
}

/// `fsync` of a directory makes the renames and deletions in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `name`, or `name-2`, `name-3`… when `dir` already holds `name.bad` or `name.bdr`.
pub fn unique_badmail_base(dir: &Path, name: &str) -> String {
    let mut base = name.to_string();
    let mut n = 1;
    while dir.join(format!("{base}.bad")).exists() || dir.join(format!("{base}.bdr")).exists() {
        n += 1;
        base = format!("{name}-{n}");
    }
    base
}

/// Writes `<base>.bad` (the message) and `<base>.bdr` (the reason) into Badmail, durably.
pub fn write_badmail(dir: &Path, name: &str, message: &[u8], reason: &str) -> io::Result<String> {
    let base = unique_badmail_base(dir, name);
    for (ext, bytes) in [("bad", message), ("bdr", reason.as_bytes())] {
        let mut f = File::create(dir.join(format!("{base}.{ext}")))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    sync_dir(dir)?;
    Ok(base)
}
