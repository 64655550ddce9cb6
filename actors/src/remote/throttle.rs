//! Rates per destination: a token bucket of messages per minute for each destination (domain
//! or smart host), and a pause when the destination says it is limiting us (`421 4.7.28 …
//! unusual rate`, `451 … rate limited`), doubling while it keeps saying so.
//!
//! A message held back by either is not an attempt: its recipients get a temporary result with
//! `retry_after`, and the queue tries them again then without moving down the retry schedule.
//! Memory is bounded: idle destinations are forgotten once there are many.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::delivery::Outcome;

/// The first pause after a rate-limit reply; it doubles up to [`MAX_PAUSE`].
pub const FIRST_PAUSE: Duration = Duration::from_secs(60);
pub const MAX_PAUSE: Duration = Duration::from_secs(30 * 60);
/// Destinations remembered at most; beyond it, idle ones are dropped.
const MAX_DESTINATIONS: usize = 10_000;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    paused_until: Option<Instant>,
    /// The next pause after a rate-limit reply.
    pause: Duration,
}

#[derive(Default)]
pub struct Throttle {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Throttle {
    /// Takes one message's token for `key` (`per_minute` 0 = no limit). `Err(wait)` = held
    /// back for at least `wait`.
    pub fn admit(&self, key: &str, per_minute: u32, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_DESTINATIONS && !buckets.contains_key(key) {
            buckets.retain(|_, b| b.paused_until.is_some_and(|t| t > now) || now.duration_since(b.last) < MAX_PAUSE);
            if buckets.len() >= MAX_DESTINATIONS {
                // Still full of busy destinations: this one is not limited rather than stored.
                return Ok(());
            }
        }
        let b = buckets.entry(key.to_string()).or_insert_with(|| Bucket {
            tokens: per_minute as f64,
            last: now,
            paused_until: None,
            pause: FIRST_PAUSE,
        });
        if let Some(until) = b.paused_until {
            if until > now {
                return Err(until - now);
            }
            b.paused_until = None;
        }
        if per_minute == 0 {
            b.last = now;
            return Ok(());
        }
        let rate = per_minute as f64 / 60.0;
        let burst = per_minute as f64;
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - b.tokens) / rate).max(Duration::from_secs(1)))
    }

    /// The destination said it is limiting us: nothing goes to it for the returned time.
    pub fn slow_down(&self, key: &str, now: Instant) -> Duration {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets.entry(key.to_string()).or_insert_with(|| Bucket {
            tokens: 0.0,
            last: now,
            paused_until: None,
            pause: FIRST_PAUSE,
        });
        let pause = b.pause;
        b.paused_until = Some(now + pause);
        b.pause = (pause * 2).min(MAX_PAUSE);
        pause
    }

    /// A message went through: the next rate-limit reply starts from the first pause again.
    pub fn went_through(&self, key: &str) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = buckets.get_mut(key) {
            b.pause = FIRST_PAUSE;
        }
    }
}

/// A peer's temporary reply that says it limits our rate (not a mailbox or greylisting
/// matter): Gmail's 4.7.28, and the words such replies use. Only what a peer said is passed
/// here, never our own outcomes.
pub fn is_rate_limit(o: &Outcome) -> bool {
    if !o.is_temporary() {
        return false;
    }
    let s = o.status();
    if s.subject == 7 && s.detail == 28 {
        return true;
    }
    let text = o.text.to_ascii_lowercase();
    [
        "rate limit",
        "ratelimit",
        "rate-limit",
        "rate limited",
        "unusual rate",
        "sending rate",
        "too many messages",
        "too many connections",
        "too many concurrent",
        "throttl",
        "slow down",
    ]
    .iter()
    .any(|w| text.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_replies() {
        let from = |code, text: &str| Outcome::from_reply(code, text).from_mta(Some("mx[192.0.2.1]".into()));
        let cases = [
            (from(421, "4.7.28 Our system has detected an unusual rate of unsolicited mail"), true),
            (from(451, "4.7.28 Gmail has detected an unusual rate"), true),
            (from(451, "4.7.1 Rate limited, try again later"), true),
            (from(450, "4.2.1 Too many messages for this mailbox, slow down"), true),
            (from(421, "4.7.0 Too many concurrent SMTP connections"), true),
            (from(452, "4.5.3 Too many recipients"), false),
            (from(451, "4.7.1 Greylisted, please try again later"), false),
            (from(451, "4.2.1 Mailbox busy"), false),
            (from(550, "5.7.1 Rate limit exceeded, message rejected"), false),
            (from(250, "2.0.0 ok"), false),
        ];
        for (o, want) in cases {
            assert_eq!(is_rate_limit(&o), want, "{o:?}");
        }
    }

    #[test]
    fn buckets_and_pauses() {
        let t = Throttle::default();
        let start = Instant::now();
        // 60 a minute: a burst of 60, then one a second.
        for _ in 0..60 {
            assert_eq!(t.admit("gmail.com", 60, start), Ok(()));
        }
        let wait = t.admit("gmail.com", 60, start).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert_eq!(t.admit("gmail.com", 60, start + Duration::from_secs(1)), Ok(()));
        // Other destinations and unlimited ones are not held back.
        assert_eq!(t.admit("example.org", 60, start), Ok(()));
        assert_eq!(t.admit("any.test", 0, start), Ok(()));
        // A rate-limit reply pauses the destination; the pause doubles, success resets it.
        assert_eq!(t.slow_down("any.test", start), FIRST_PAUSE);
        assert_eq!(t.admit("any.test", 0, start + Duration::from_secs(10)), Err(FIRST_PAUSE - Duration::from_secs(10)));
        assert_eq!(t.admit("any.test", 0, start + FIRST_PAUSE), Ok(()));
        assert_eq!(t.slow_down("any.test", start + FIRST_PAUSE), FIRST_PAUSE * 2);
        t.went_through("any.test");
        assert_eq!(t.slow_down("any.test", start + FIRST_PAUSE * 4), FIRST_PAUSE);
        for _ in 0..10 {
            t.slow_down("stubborn.test", start);
        }
        assert_eq!(t.slow_down("stubborn.test", start), MAX_PAUSE);
    }
}
