//! The Queue actor: owns the sled store, assigns message IDs, answers `Enqueue` only once the
//! message is durable (group commit), routes each recipient to a delivery actor, and records the
//! per-recipient results.
//!
//! Invariants:
//! - An `Enqueue` is answered `Ok` only after a sync that covers its write has returned.
//! - At most `max_in_flight` `Deliver` requests are outstanding; everything else waits in `ready`.
//!   `ready` keeps message bodies in memory only up to `READY_BODY_BYTES` in total (the rest are
//!   read back from sled when their turn comes), so memory stays bounded whatever the queue holds.
//! - A message is removed from the store only when no recipient is pending.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use tracing::{error, info, warn};

use crate::commit::GroupCommit;
use crate::delivery::{Deliver, DeliveryRecipient, DeliveryReport, Outcome};
use crate::metrics::{Metrics, RouteLabel, SourceLabel};
use crate::protocol::received::{received_header, Origin};
use crate::protocol::{EnqueueError, LocalDomains, Mailbox};
use crate::store::{Envelope, PickupMark, QueueId, RcptStatus, RecipientState, Store};

/// Store one new message. Answered once it is on stable storage.
#[derive(Message)]
#[rtype(result = "Result<QueueId, EnqueueError>")]
pub struct Enqueue {
    pub sender: Option<Mailbox>,
    pub recipients: Vec<Mailbox>,
    /// The message without our trace header; the queue adds it, as it knows the ID.
    pub body: Vec<u8>,
    pub origin: Origin,
    /// Client address (SMTP) or file name (Pickup), for logs and the envelope.
    pub origin_text: String,
    /// Set for Pickup files: makes the enqueue idempotent across a restart.
    pub pickup: Option<PickupMark>,
}

/// A Pickup file whose message is queued has been deleted; forget its mark.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PickupDone {
    pub name: String,
}

/// Read one message's envelope and per-recipient state.
#[derive(Message)]
#[rtype(result = "Option<Envelope>")]
pub struct Inspect {
    pub id: QueueId,
}

/// Make everything durable (used at shutdown).
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Flush;

/// Where recipients go. Local domains go to `local`; the others to `remote` when there is one,
/// else they stay queued until a remote delivery actor is wired in.
#[derive(Clone)]
pub struct Router {
    pub local_domains: LocalDomains,
    pub local: Recipient<Deliver>,
    pub remote: Option<Recipient<Deliver>>,
}

impl Router {
    fn route(&self, address: &str) -> Option<(&'static str, Recipient<Deliver>)> {
        if self.local_domains.contains_address(address) {
            Some(("drop", self.local.clone()))
        } else {
            self.remote.clone().map(|r| ("remote", r))
        }
    }
}

#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub hostname: String,
    /// Waits after the 1st, 2nd, … temporary failure; the last repeats.
    pub retry_intervals: Vec<Duration>,
    pub max_in_flight: usize,
    /// How often the retry index is checked for due messages.
    pub retry_poll: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            hostname: "localhost".into(),
            retry_intervals: [15, 30, 60, 240].iter().map(|m| Duration::from_secs(m * 60)).collect(),
            max_in_flight: 256,
            retry_poll: Duration::from_secs(1),
        }
    }
}

/// The wait before the next attempt after `attempts` failures (1-based); the last interval repeats.
pub fn retry_delay(intervals: &[Duration], attempts: u32) -> Duration {
    let i = (attempts.max(1) as usize - 1).min(intervals.len().saturating_sub(1));
    intervals.get(i).copied().unwrap_or(Duration::from_secs(900))
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Message bodies kept in memory while waiting for a delivery slot, at most.
const READY_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Bodies handed to delivery actors at once, at most (one message is always allowed).
const IN_FLIGHT_BYTES: usize = 256 * 1024 * 1024;

pub struct Queue {
    store: Arc<Store>,
    committer: Option<GroupCommit>,
    settings: QueueSettings,
    router: Router,
    metrics: Arc<Metrics>,
    /// Messages waiting for a delivery slot, with their body when still in memory.
    ready: VecDeque<(QueueId, Option<Arc<Vec<u8>>>)>,
    /// Bytes of the bodies held in `ready`.
    ready_bytes: usize,
    /// IDs in `ready` or being delivered: never dispatched twice at once.
    active: HashSet<QueueId>,
    /// `Deliver` requests outstanding.
    in_flight: usize,
    /// Bytes of the messages those requests carry.
    in_flight_bytes: usize,
    /// Messages in the store (counted once at open: sled's `len` walks the whole tree).
    queued: usize,
    outstanding: std::collections::HashMap<QueueId, usize>,
}

impl Queue {
    pub fn new(store: Store, settings: QueueSettings, router: Router, metrics: Arc<Metrics>) -> Self {
        Queue {
            store: Arc::new(store),
            committer: None,
            settings,
            router,
            metrics,
            ready: VecDeque::new(),
            ready_bytes: 0,
            active: HashSet::new(),
            in_flight: 0,
            in_flight_bytes: 0,
            queued: 0,
            outstanding: Default::default(),
        }
    }

    fn schedule(&mut self, id: QueueId, body: Option<Arc<Vec<u8>>>) {
        if self.active.insert(id) {
            let body = body.filter(|b| self.ready_bytes + b.len() <= READY_BODY_BYTES);
            self.ready_bytes += body.as_ref().map_or(0, |b| b.len());
            self.ready.push_back((id, body));
        }
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        while self.in_flight < self.settings.max_in_flight
            && (self.in_flight == 0 || self.in_flight_bytes < IN_FLIGHT_BYTES)
        {
            let Some((id, body)) = self.ready.pop_front() else {
                break;
            };
            self.ready_bytes -= body.as_ref().map_or(0, |b| b.len());
            if !self.dispatch(id, body, ctx) {
                self.active.remove(&id);
            }
        }
    }

    /// Sends the pending recipients of `id` to their delivery actors; false when nothing was sent.
    fn dispatch(&mut self, id: QueueId, body: Option<Arc<Vec<u8>>>, ctx: &mut Context<Self>) -> bool {
        let env = match self.store.envelope(id) {
            Ok(Some(env)) => env,
            Ok(None) => return false,
            Err(e) => {
                error!(id, error = %e, "cannot read envelope");
                return false;
            }
        };
        let now = unix_now();
        let mut groups: Vec<(&'static str, Recipient<Deliver>, Vec<DeliveryRecipient>)> = Vec::new();
        let mut held = Vec::new();
        for (index, r) in env.recipients.iter().enumerate() {
            if r.status != RcptStatus::Pending || r.next_attempt.is_some_and(|t| t > now) {
                continue;
            }
            let Some((name, actor)) = self.router.route(&r.address) else {
                held.push(r.address.as_str());
                continue;
            };
            let rcpt = DeliveryRecipient { index, address: r.address.clone() };
            match groups.iter_mut().find(|g| g.0 == name) {
                Some(g) => g.2.push(rcpt),
                None => groups.push((name, actor, vec![rcpt])),
            }
        }
        if !held.is_empty() {
            info!(id, recipients = %held.join(","), "no delivery actor for these recipients yet; they stay queued");
        }
        if groups.is_empty() {
            return false;
        }
        let message = match body {
            Some(b) => b,
            None => match self.store.body(id) {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    error!(id, error = %e, "cannot read message body");
                    return false;
                }
            },
        };
        for (route, actor, recipients) in groups {
            let req = Deliver { id, sender: env.sender.clone(), recipients, message: message.clone() };
            self.in_flight += 1;
            self.in_flight_bytes += message.len();
            *self.outstanding.entry(id).or_default() += 1;
            let indices = req.indices();
            let size = message.len();
            actor
                .send(req)
                .into_actor(self)
                .map(move |res, act, ctx| {
                    let report = res.unwrap_or_else(|e| {
                        DeliveryReport::all(indices, Outcome::Temporary(format!("delivery actor unavailable: {e}")))
                    });
                    act.in_flight -= 1;
                    act.in_flight_bytes -= size;
                    act.record(id, route, report);
                    act.pump(ctx);
                })
                .spawn(ctx);
        }
        true
    }

    fn record(&mut self, id: QueueId, route: &'static str, report: DeliveryReport) {
        let done_here = match self.outstanding.get_mut(&id) {
            Some(n) => {
                *n -= 1;
                *n == 0
            }
            None => true,
        };
        if done_here {
            self.outstanding.remove(&id);
            self.active.remove(&id);
        }
        let mut env = match self.store.envelope(id) {
            Ok(Some(env)) => env,
            Ok(None) => return,
            Err(e) => return error!(id, error = %e, "cannot read envelope to record results"),
        };
        let stored_next = env.next_attempt;
        let now = unix_now();
        for res in report.results {
            let Some(r) = env.recipients.get_mut(res.index) else {
                warn!(id, index = res.index, "delivery report names an unknown recipient");
                continue;
            };
            r.attempts += 1;
            r.last_reply = Some(res.outcome.text().to_string());
            match &res.outcome {
                Outcome::Delivered(_) => {
                    r.status = RcptStatus::Delivered;
                    r.next_attempt = None;
                }
                Outcome::Permanent(_) => {
                    r.status = RcptStatus::Failed;
                    r.next_attempt = None;
                }
                Outcome::Temporary(_) => {
                    let delay = retry_delay(&self.settings.retry_intervals, r.attempts);
                    r.next_attempt = Some(now + delay.as_secs());
                }
            }
            self.metrics.deliveries.get_or_create(&RouteLabel { route, result: res.outcome.label() }).inc();
            info!(
                id,
                sender = %env.sender,
                recipient = %r.address,
                route,
                result = res.outcome.label(),
                attempts = r.attempts,
                next_attempt = ?r.next_attempt,
                reply = %res.outcome.text(),
                "delivery"
            );
        }
        env.next_attempt =
            env.recipients.iter().filter(|r| r.status == RcptStatus::Pending).filter_map(|r| r.next_attempt).min();
        let finished = env.is_finished();
        let result = if finished { self.store.remove(id, stored_next) } else { self.store.update(&env, stored_next) };
        match result {
            Ok(()) if finished => {
                self.queued = self.queued.saturating_sub(1);
                self.metrics.queue_messages.set(self.queued as i64);
            }
            Ok(()) => {}
            Err(e) => error!(id, error = %e, "cannot record delivery results; the message will be retried"),
        }
    }

    fn check_retries(&mut self, ctx: &mut Context<Self>) {
        let room = self.settings.max_in_flight.saturating_mul(4).saturating_sub(self.ready.len());
        if room == 0 {
            return;
        }
        match self.store.due(unix_now(), room + self.active.len()) {
            Ok(ids) => {
                for id in ids {
                    self.schedule(id, None);
                }
            }
            Err(e) => error!(error = %e, "cannot read the retry index"),
        }
        self.pump(ctx);
    }
}

impl Actor for Queue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Writes are rare compared with the work they wait for; let sessions queue up.
        ctx.set_mailbox_capacity(1024);
        let store = self.store.clone();
        self.committer = Some(GroupCommit::spawn(
            "queue",
            move || store.sync().map_err(|e| std::io::Error::other(e.to_string())),
            self.metrics.queue_commit_batch.clone(),
        ));
        match self.store.envelopes() {
            Ok(envs) => {
                let now = unix_now();
                self.queued = envs.len();
                let mut resumed = 0;
                for env in envs.iter().filter(|e| !e.is_finished()) {
                    // Messages waiting for a retry time are the retry check's; the rest go now.
                    if env.next_attempt.is_none_or(|t| t <= now) {
                        resumed += 1;
                        self.schedule(env.id, None);
                    }
                }
                info!(resumed, queued = self.queued, "queue opened");
            }
            Err(e) => error!(error = %e, "cannot list the queued messages"),
        }
        self.metrics.queue_messages.set(self.queued as i64);
        self.pump(ctx);
        ctx.run_interval(self.settings.retry_poll, |act, ctx| act.check_retries(ctx));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Err(e) = self.store.sync() {
            error!(error = %e, "final queue sync failed");
        }
    }
}

impl Handler<Enqueue> for Queue {
    type Result = ResponseActFuture<Self, Result<QueueId, EnqueueError>>;

    fn handle(&mut self, msg: Enqueue, _ctx: &mut Self::Context) -> Self::Result {
        let fail = |e: crate::store::StoreError| {
            error!(error = %e, "cannot store message");
            if e.is_no_space() {
                EnqueueError::Storage
            } else {
                EnqueueError::Temporary
            }
        };
        if let Some(mark) = &msg.pickup {
            match self.store.pickup_taken(mark) {
                Ok(Some(id)) => {
                    info!(id, file = %mark.name, "pickup file was already queued before a restart");
                    return Box::pin(actix::fut::ready(Ok(id)));
                }
                Ok(None) => {}
                Err(e) => return Box::pin(actix::fut::ready(Err(fail(e)))),
            }
        }
        let id = match self.store.next_id() {
            Ok(id) => id,
            Err(e) => return Box::pin(actix::fut::ready(Err(fail(e)))),
        };
        let now = unix_now();
        let single = (msg.recipients.len() == 1).then(|| msg.recipients[0].to_string());
        let header = received_header(&msg.origin, &self.settings.hostname, id, single.as_deref(), now);
        let mut message = Vec::with_capacity(header.len() + msg.body.len());
        message.extend_from_slice(header.as_bytes());
        message.extend_from_slice(&msg.body);
        drop(msg.body);
        let source = match msg.origin {
            Origin::Smtp { .. } => "smtp",
            Origin::Pickup => "pickup",
        };
        let env = Envelope {
            id,
            sender: msg.sender.as_ref().map(|s| s.to_string()).unwrap_or_default(),
            recipients: msg
                .recipients
                .iter()
                .map(|r| RecipientState {
                    address: r.to_string(),
                    status: RcptStatus::Pending,
                    attempts: 0,
                    last_reply: None,
                    next_attempt: None,
                })
                .collect(),
            size: message.len() as u64,
            received_at: now,
            source: source.into(),
            origin: msg.origin_text,
            next_attempt: None,
        };
        if let Err(e) = self.store.insert(&env, &message, msg.pickup.as_ref()) {
            let _ = self.store.discard(&env, msg.pickup.as_ref());
            return Box::pin(actix::fut::ready(Err(fail(e))));
        }
        let Some(committer) = self.committer.clone() else {
            return Box::pin(actix::fut::ready(Err(EnqueueError::Temporary)));
        };
        let size = message.len() as u64;
        let message = Arc::new(message);
        let mark = msg.pickup;
        Box::pin(async move { committer.commit().await }.into_actor(self).map(move |res, act, ctx| match res {
            Ok(()) => {
                act.metrics.messages_received.get_or_create(&SourceLabel { source }).inc();
                act.metrics.bytes_received.inc_by(size);
                act.queued += 1;
                act.metrics.queue_messages.set(act.queued as i64);
                act.schedule(id, Some(message));
                act.pump(ctx);
                Ok(id)
            }
            Err(e) => {
                error!(id, error = %e, "queue sync failed; refusing the message");
                let _ = act.store.discard(&env, mark.as_ref());
                Err(EnqueueError::Temporary)
            }
        }))
    }
}

impl Handler<PickupDone> for Queue {
    type Result = ();

    fn handle(&mut self, msg: PickupDone, _ctx: &mut Self::Context) {
        if let Err(e) = self.store.forget_pickup(&msg.name) {
            warn!(file = %msg.name, error = %e, "cannot forget pickup mark");
        }
    }
}

impl Handler<Inspect> for Queue {
    type Result = Option<Envelope>;

    fn handle(&mut self, msg: Inspect, _ctx: &mut Self::Context) -> Self::Result {
        self.store.envelope(msg.id).ok().flatten()
    }
}

impl Handler<Flush> for Queue {
    type Result = Result<(), String>;

    fn handle(&mut self, _msg: Flush, _ctx: &mut Self::Context) -> Self::Result {
        self.store.sync().map_err(|e| e.to_string())
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
}
