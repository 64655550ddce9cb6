//! The last hour of mail flow, minute by minute, kept in memory: messages received and
//! deliveries by result (delivered, deferred, bounced). It is what the admin API's
//! `/api/history` serves (the web console's charts), so an operator sees the recent past without
//! a Prometheus. Bounded: 60 buckets, whatever the load.

use std::sync::Mutex;

use serde::Serialize;

use crate::protocol::outcome::Class;

/// Minutes kept.
pub const MINUTES: usize = 60;

/// One minute's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Minute {
    /// Unix seconds at the start of the minute.
    pub at: u64,
    pub received: u64,
    /// Recipient deliveries, by result.
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
}

#[derive(Debug)]
pub struct History {
    /// Indexed by minute number modulo [`MINUTES`]; a bucket whose `at` is not its minute's is
    /// from an hour ago and counts as empty.
    buckets: Mutex<[Minute; MINUTES]>,
}

impl Default for History {
    fn default() -> Self {
        History { buckets: Mutex::new([Minute::default(); MINUTES]) }
    }
}

impl History {
    fn add(&self, now: u64, f: impl FnOnce(&mut Minute)) {
        let minute = now / 60;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = &mut buckets[(minute % MINUTES as u64) as usize];
        if b.at != minute * 60 {
            *b = Minute { at: minute * 60, ..Minute::default() };
        }
        f(b);
    }

    pub fn received(&self) {
        self.add(crate::clock::unix_now(), |m| m.received += 1);
    }

    /// One recipient's delivery result.
    pub fn delivery(&self, class: Class) {
        self.delivery_at(crate::clock::unix_now(), class);
    }

    fn delivery_at(&self, now: u64, class: Class) {
        self.add(now, |m| match class {
            Class::Delivered => m.delivered += 1,
            Class::Temporary => m.deferred += 1,
            Class::Permanent => m.bounced += 1,
        });
    }

    /// The last [`MINUTES`] minutes up to the one holding `now`, oldest first, empty ones included.
    pub fn last_hour(&self, now: u64) -> Vec<Minute> {
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let current = now / 60;
        (0..MINUTES as u64)
            .rev()
            .map(|back| {
                let minute = current.saturating_sub(back);
                let b = buckets[(minute % MINUTES as u64) as usize];
                if b.at == minute * 60 {
                    b
                } else {
                    Minute { at: minute * 60, ..Minute::default() }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts land in their minute; a bucket an hour old reads as empty and is reused.
    #[test]
    fn minutes_of_the_last_hour() {
        let h = History::default();
        let t0 = 1_000_020; // second 20 of minute 16,667
        h.add(t0, |m| m.received += 1);
        h.delivery_at(t0 + 5, Class::Delivered);
        h.delivery_at(t0 + 61, Class::Temporary);
        h.delivery_at(t0 + 62, Class::Permanent);
        let hour = h.last_hour(t0 + 61);
        assert_eq!(hour.len(), MINUTES);
        assert_eq!(
            hour[MINUTES - 2],
            Minute { at: 1_000_020 / 60 * 60, received: 1, delivered: 1, deferred: 0, bounced: 0 }
        );
        assert_eq!(
            hour[MINUTES - 1],
            Minute { at: (1_000_020 / 60 + 1) * 60, received: 0, delivered: 0, deferred: 1, bounced: 1 }
        );
        assert!(hour[..MINUTES - 2].iter().all(|m| m.received + m.delivered + m.deferred + m.bounced == 0));
        assert!(hour.windows(2).all(|w| w[1].at == w[0].at + 60), "consecutive minutes");
        // An hour later the old minute's bucket is reused, not added to.
        let later = t0 + 3600;
        h.add(later, |m| m.received += 1);
        let hour = h.last_hour(later);
        assert_eq!(hour[MINUTES - 1].received, 1);
        assert_eq!(hour.iter().map(|m| m.received).sum::<u64>(), 1, "the old minute is gone");
    }
}
