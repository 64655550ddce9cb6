//! Small file-system helpers shared by the actors that touch disk (queue sync, Drop, Pickup).

use std::fs::File;
use std::io;
use std::path::Path;

/// Runs blocking file work on the blocking pool; a panicked task becomes an I/O error.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(io::Error::other(format!("blocking task failed: {e}"))))
}

/// `fsync` of a directory makes the renames and deletions in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
