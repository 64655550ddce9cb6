//! The wall clock, in the Unix seconds the queue store, the retry index and the reports use.
//! One function, so that pure code takes the time as a parameter and only actors read it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
