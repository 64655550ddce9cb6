//! The RetryScheduler actor, started by the Queue on its arbiter: sleeps until the earliest retry
//! time in the store's retry index, then tells the Queue (`RetryDue`) to take the messages that
//! are due. It knows the Queue only as a `Recipient<RetryDue>`. On a store shared by several
//! nodes it also wakes every [`QueueStore::poll_every`]: others add work, and leases expire.
//!
//! Invariants:
//! - The times live in the store, not here: after a restart the scheduler reads the earliest one and
//!   sleeps until then, so no retry is lost or run early.
//! - The scheduler never sleeps past a time the Queue has told it (`Reschedule`) nor past the
//!   earliest time it read from the index after its last wake-up.
//! - One `RetryDue` at a time: the next is sent only after the Queue answered the last, which is
//!   the backpressure when the Queue is full (it answers `more: true` and the scheduler comes
//!   back a second later).

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tracing::{debug, error, warn};

use super::messages::RetryDue;
use crate::clock::unix_now;
use crate::metrics::ActorMeter;
use crate::store::QueueStore;

/// Sent by the Queue: a message now waits until `at` (Unix seconds).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reschedule {
    pub at: u64,
}

/// The longest the scheduler sleeps at once.
const MAX_SLEEP_SECS: u64 = 3600;

pub struct RetryScheduler {
    store: Arc<dyn QueueStore>,
    queue: Recipient<RetryDue>,
    /// When the timer fires, and its handle.
    wake: Option<(u64, SpawnHandle)>,
    /// A `RetryDue` is outstanding.
    busy: bool,
    /// The earliest `Reschedule` received while busy.
    pending: Option<u64>,
    meter: ActorMeter,
}

impl RetryScheduler {
    pub fn new(store: Arc<dyn QueueStore>, queue: Recipient<RetryDue>, meter: ActorMeter) -> Self {
        RetryScheduler { store, queue, wake: None, busy: false, pending: None, meter }
    }

    /// Sleeps until `at` unless already waking earlier.
    fn arm(&mut self, at: u64, ctx: &mut Context<Self>) {
        if let Some((current, handle)) = self.wake {
            if current <= at {
                return;
            }
            ctx.cancel_future(handle);
        }
        // Woken at least hourly: a wall-clock jump or a corrupt far-future time cannot leave the
        // scheduler asleep for days; an early wake-up finds nothing due and sleeps again.
        let longest = self.store.poll_every().map_or(MAX_SLEEP_SECS, |p| p.as_secs().max(1));
        let wait = Duration::from_secs(at.saturating_sub(unix_now()).min(longest));
        debug!(at, wait_secs = wait.as_secs(), "retry scheduler sleeping");
        let handle = ctx.run_later(wait, |act, ctx| {
            act.wake = None;
            act.fire(ctx);
        });
        self.wake = Some((at, handle));
    }

    /// Arms for the earliest time in the index at or after `from`.
    fn arm_from_store(&mut self, from: u64, ctx: &mut Context<Self>) {
        self.store
            .earliest_retry(from)
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok(Some(at)) => act.arm(at, ctx),
                // Nothing waits; a shared store is looked at again anyway.
                Ok(None) => {
                    if let Some(every) = act.store.poll_every() {
                        act.arm(unix_now() + every.as_secs().max(1), ctx);
                    }
                }
                Err(e) => {
                    error!(error = %e, "cannot read the retry index; trying again in 10 s");
                    act.arm(unix_now() + 10, ctx);
                }
            })
            .spawn(ctx);
    }

    fn fire(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let now = unix_now();
        self.queue
            .send(RetryDue { now })
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.busy = false;
                let more = match res {
                    Ok(batch) => batch.more,
                    Err(e) => {
                        // The Queue that started us is gone (its supervisor starts a new Queue,
                        // with a new scheduler): waking up for it again would be work for nobody.
                        warn!(error = %e, "queue gone; its retry scheduler stops");
                        ctx.stop();
                        return;
                    }
                };
                if more {
                    act.arm(unix_now() + 1, ctx);
                }
                if let Some(at) = act.pending.take() {
                    act.arm(at.max(now + 1), ctx);
                }
                // Entries at or before `now` were taken (or are being delivered and will be
                // rescheduled when their results come back).
                act.arm_from_store(now + 1, ctx);
            })
            .spawn(ctx);
    }
}

impl Actor for RetryScheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.meter.started();
        self.arm_from_store(0, ctx);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.meter.stopped();
    }
}

impl Handler<Reschedule> for RetryScheduler {
    type Result = ();

    fn handle(&mut self, msg: Reschedule, ctx: &mut Self::Context) {
        let _handling = self.meter.handling();
        if self.busy {
            self.pending = Some(self.pending.map_or(msg.at, |p| p.min(msg.at)));
        } else {
            self.arm(msg.at, ctx);
        }
    }
}
