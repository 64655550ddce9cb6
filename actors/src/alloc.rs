//! Makes the C allocator give large blocks back to the system when they are freed.
//!
//! glibc serves blocks of 128 KiB and more with their own mapping, unmapped when freed, but it
//! raises that threshold to the size of each such block freed (up to 32 MiB): after one 20 MB
//! message body or one 19 MiB argon2 block has come and gone, later ones come from the heap
//! arenas, which keep the memory. A burst of large messages then leaves hundreds of MB behind.
//! Fixing the threshold turns the adjustment off, so large bodies cost one mapping each and go
//! back when freed; small allocations are unaffected.

/// Blocks of at least this size get their own mapping.
const MMAP_THRESHOLD: i32 = 1024 * 1024;

/// Sets the threshold for the whole process (glibc only; elsewhere nothing to do). Idempotent.
pub fn return_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; any value is accepted or refused.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        if ok != 1 {
            tracing::warn!("cannot set the allocator's mmap threshold; large freed blocks may stay in the heap");
        }
    }
}
