//! systemd integration (`Type=notify`): readiness, reload and stop notifications, and the
//! watchdog. Through the `sd-notify` crate; without `NOTIFY_SOCKET` (not started by systemd)
//! nothing is sent.

use std::time::Duration;

use actix::Addr;
use mailroot_actors::queue::Summary;
use mailroot_actors::supervisor::QueueSupervisor;
use tracing::{info, warn};

/// systemd's watchdog (`WatchdogSec=` in the unit sets `WATCHDOG_USEC`): `WATCHDOG=1` at half
/// the interval, but only while the Queue answers and its store is not wedged, so a wedged
/// queue gets the process restarted rather than kept alive by a control task that still runs.
pub(super) struct Watchdog {
    interval: Option<Duration>,
    last: tokio::time::Instant,
    /// The last look found the store failing (STATUS= says so until it recovers).
    failing: bool,
}

impl Watchdog {
    pub(super) fn from_env() -> Watchdog {
        // Read here rather than with `sd_notify::watchdog_enabled`, which requires WATCHDOG_PID;
        // sd_watchdog_enabled(3) treats it as optional (when set, it names our process).
        let usec = std::env::var("WATCHDOG_USEC").ok().and_then(|v| v.parse::<u64>().ok()).filter(|&u| u > 0);
        let ours = std::env::var("WATCHDOG_PID").ok().is_none_or(|p| p == std::process::id().to_string());
        let interval = usec.filter(|_| ours).map(|u| Duration::from_micros(u) / 2);
        if let Some(i) = interval {
            info!(every_ms = i.as_millis() as u64, "systemd watchdog: notifying while the queue answers");
        }
        Watchdog { interval, last: tokio::time::Instant::now(), failing: false }
    }

    pub(super) async fn tick(&mut self, queue: &Addr<QueueSupervisor>) {
        let Some(interval) = self.interval else { return };
        if self.last.elapsed() < interval.saturating_sub(Duration::from_secs(1)) {
            return;
        }
        match tokio::time::timeout(interval, queue.send(Summary)).await {
            Ok(Ok(summary)) if summary.store_wedged => {
                // A sync hangs and holds the store: only a fresh process can open it again.
                let why = summary.store_error.unwrap_or_default();
                notify(&format!("STATUS=queue store failing: {why}"));
                warn!(reason = %why, "the queue store is wedged; not notifying the systemd watchdog");
            }
            Ok(Ok(summary)) => {
                // A store that cannot write but is being reopened is said in STATUS (systemctl
                // status shows it); restarting would not bring the space back sooner.
                match &summary.store_error {
                    Some(why) => notify(&format!("STATUS=queue store failing: {why}")),
                    None if self.failing => notify("STATUS=running"),
                    None => {}
                }
                self.failing = summary.store_error.is_some();
                notify("WATCHDOG=1");
                self.last = tokio::time::Instant::now();
            }
            _ => warn!("the queue did not answer the watchdog check; not notifying systemd"),
        }
    }
}

/// Tells systemd about our state (`READY=1`, `RELOADING=1`, `STOPPING=1`, `WATCHDOG=1`).
pub(super) fn notify(state: &str) {
    use sd_notify::NotifyState;
    let states = match state {
        "READY=1" => vec![NotifyState::Ready],
        // systemd 253+ wants the time with RELOADING=1 (for Type=notify-reload units).
        "RELOADING=1" => {
            [Some(NotifyState::Reloading), NotifyState::monotonic_usec_now().ok()].into_iter().flatten().collect()
        }
        "STOPPING=1" => vec![NotifyState::Stopping],
        "WATCHDOG=1" => vec![NotifyState::Watchdog],
        other => vec![NotifyState::Custom(other)],
    };
    if let Err(e) = sd_notify::notify(false, &states) {
        warn!(error = %e, "cannot notify systemd");
    }
}
