//! Small file-system helpers shared by the actors that touch disk (queue sync, Drop, Pickup).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Runs blocking file work on the blocking pool; a panicked task becomes an I/O error.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(io::Error::other(format!("blocking task failed: {e}"))))
}

/// The disk (or quota) is full: ENOSPC, whichever way the error was built.
pub fn is_no_space(e: &io::Error) -> bool {
    e.raw_os_error() == Some(28) || e.kind() == io::ErrorKind::StorageFull
}

/// Writes `contents` to `tmp`, `fdatasync`s it and renames it to `dest`, so readers of `dest`'s
/// folder see the whole file or none of it; on failure `tmp` is removed. `mode` applies when the
/// file is created (then the umask). The folder is not synced: callers do that, often for many
/// files at once, before they call the file durable.
pub fn write_and_rename(tmp: &Path, dest: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let result = (|| {
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(tmp)?;
        f.write_all(contents)?;
        f.sync_data()?;
        fs::rename(tmp, dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_and_rename_leaves_nothing_behind_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, dest) = (dir.path().join("x.tmp"), dir.path().join("x"));
        write_and_rename(&tmp, &dest, b"one", 0o600).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"one");
        assert!(!tmp.exists());
        // The rename fails (no such folder): the temporary file is removed, dest untouched.
        let err = write_and_rename(&tmp, &dir.path().join("missing/x"), b"two", 0o600);
        assert!(err.is_err() && !tmp.exists());
        assert_eq!(fs::read(&dest).unwrap(), b"one");
    }
}
