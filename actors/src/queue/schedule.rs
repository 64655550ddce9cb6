//! The retry schedule, pure: when a recipient that failed temporarily is tried next (the
//! configured intervals, never past the message's expiry or its delay notice), and waits written
//! for people (`3d 4h`). Times are Unix seconds passed in; nothing here reads the clock.

use std::time::Duration;

use super::QueueSettings;

/// The wait before the next attempt after `attempts` failures (1-based); the last interval repeats.
pub fn retry_delay(intervals: &[Duration], attempts: u32) -> Duration {
    let i = (attempts.max(1) as usize - 1).min(intervals.len().saturating_sub(1));
    intervals.get(i).copied().unwrap_or(Duration::from_secs(900))
}

/// When a recipient that just failed temporarily for the `attempts`-th time is tried next: the
/// schedule's delay, but never after the message expires, nor after its delay notice is due
/// (so both happen on time rather than at the next scheduled attempt). All times in Unix seconds.
/// `route` picks the local or remote times ([`QueueSettings::times`]).
pub fn next_attempt_at(
    s: &QueueSettings,
    route: &str,
    attempts: u32,
    received_at: u64,
    notified: bool,
    now: u64,
) -> u64 {
    let (expire_after, delay_notice_after) = s.times(route);
    let mut at = now.saturating_add(retry_delay(&s.retry_intervals, attempts).as_secs());
    at = at.min(received_at.saturating_add(expire_after.as_secs()));
    let notice = received_at.saturating_add(delay_notice_after.as_secs());
    if !notified && notice > now {
        at = at.min(notice);
    }
    at.max(now + 1)
}

/// `3d 4h`, `2h 5m`, `42s`: a wait for people to read (reports, logs, the CLI).
pub fn humanize(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_schedule() {
        let m = |n: u64| Duration::from_secs(n * 60);
        let schedule = vec![m(15), m(30), m(60), m(240)];
        let cases = [(0, m(15)), (1, m(15)), (2, m(30)), (3, m(60)), (4, m(240)), (5, m(240)), (1000, m(240))];
        for (attempts, want) in cases {
            assert_eq!(retry_delay(&schedule, attempts), want, "attempts {attempts}");
        }
        assert_eq!(retry_delay(&[], 3), Duration::from_secs(900));
    }

    /// The next attempt time: the schedule, clamped to the delay-notice time (until the notice
    /// went out) and to the expiry time, and always in the future.
    #[test]
    fn next_attempt_times() {
        let m = |n: u64| Duration::from_secs(n * 60);
        let s = QueueSettings {
            retry_intervals: vec![m(15), m(30), m(60), m(240)],
            expire_after: m(5 * 24 * 60),
            delay_notice_after: m(240),
            ..QueueSettings::default()
        };
        let t0 = 1_000_000;
        let min = |n: u64| t0 + n * 60;
        // (attempts, notified, now, expected)
        let cases = [
            (1, false, t0, min(15)),
            (2, false, min(15), min(45)),
            (3, false, min(45), min(105)),
            // 4th failure at 1h45: the schedule says 5h45, the delay notice is due at 4h.
            (4, false, min(105), min(240)),
            (4, true, min(105), min(345)),
            (9, true, min(345), min(585)),
            // Near expiry (5 days): the last attempt happens exactly at expiry.
            (30, true, min(7100), min(7200)),
            // Past expiry or at the notice time: never in the past, never now.
            (31, true, min(7300), min(7300) + 1),
            (4, false, min(240), min(480)),
        ];
        for (attempts, notified, now, want) in cases {
            assert_eq!(
                next_attempt_at(&s, "smtp", attempts, t0, notified, now),
                want,
                "attempts {attempts}, notified {notified}, now +{}m",
                (now - t0) / 60
            );
        }
        // Local routes may have times of their own (IIS's local expiry and delay notice); the
        // remote ones keep the above.
        let local =
            QueueSettings { local_expire_after: Some(m(120)), local_delay_notice_after: Some(m(30)), ..s.clone() };
        let cases = [
            ("drop", 1, false, t0, min(15)),
            ("drop", 2, false, min(15), min(30)),
            ("lmtp", 3, true, min(100), min(120)),
            ("smtp", 2, false, min(15), min(45)),
            ("smarthost", 3, true, min(100), min(160)),
        ];
        for (route, attempts, notified, now, want) in cases {
            assert_eq!(
                next_attempt_at(&local, route, attempts, t0, notified, now),
                want,
                "{route} attempts {attempts}"
            );
        }
        assert_eq!(local.times("maildir"), (m(120), m(30)));
        assert_eq!(local.times("smtp"), (m(5 * 24 * 60), m(240)));
        assert_eq!(humanize(42), "42s");
        assert_eq!(humanize(5 * 60), "5m");
        assert_eq!(humanize(7500), "2h 5m");
        assert_eq!(humanize(5 * 86_400 + 3600), "5d 1h");
    }
}
