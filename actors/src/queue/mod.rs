//! The Queue actor: owns the queue store (sled, or PostgreSQL shared with other nodes), assigns
//! message IDs, answers `Enqueue` only once the message is durable (group commit), routes each
//! recipient to a delivery actor, and records the per-recipient results: retry times, expiry,
//! delay notices, non-delivery reports and success notices (RFC 3464), and Badmail for
//! notifications that cannot be delivered.
//!
//! Invariants:
//! - An `Enqueue` is answered `Ok` only after a sync that covers its write has returned.
//! - The envelopes of the messages the Queue works on (waiting in `ready` or being delivered)
//!   live in `active`, and every change to them is made there and written to the store from
//!   there: the Queue never reads back what it wrote, so a store whose reads are remote (and see
//!   only what is committed) behaves as the embedded one.
//! - At most `max_in_flight` `Deliver` requests are outstanding; everything else waits in `ready`.
//!   None is sent while the store cannot write (its result could not be recorded).
//!   `ready` keeps message bodies in memory only up to `READY_BODY_BYTES` in total (the rest are
//!   read back from the store when their turn comes, counted as in flight while they are read),
//!   so memory stays bounded whatever the queue holds.
//! - A message is removed from the store only when no recipient is pending.
//! - A notification about a message is written to the store before that message's new state, so
//!   sled's prefix recovery never keeps the state without the notification. A message from the
//!   null sender never causes a notification; its failures go to Badmail (written and synced
//!   before the state that forgets it).
//! - Every retry time written is either told to the [`RetryScheduler`] or not earlier than a time
//!   already told to it, so the scheduler never sleeps past a due message.

//!
//! Layout: `messages.rs` (what it receives for mail flow) and `handlers.rs`; `admin.rs` (the
//! management messages and their handlers); `record.rs` (recording delivery reports and the
//! notifications they make due); `schedule.rs` (retry times, pure); `retry.rs` (the
//! RetryScheduler actor that wakes the Queue when a retry time comes).

mod admin;
mod handlers;
mod messages;
mod record;
mod retry;
mod schedule;
mod signing;

pub use admin::{
    AdminError, Bounce, Delete, Drain, Headers, Hold, List, ListFilter, ListPage, MessageInfo, QueueSummary,
    RecipientInfo, Release, RetryAll, RetryNow, Show, Summary, STATES,
};
pub use messages::{Enqueue, Flush, Inspect, PickupDone, RetryBatch, RetryDue, SetRouter, SetSigner};
pub use retry::{Reschedule, RetryScheduler};
pub use schedule::{humanize, next_attempt_at, retry_delay};

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tracing::{error, info, warn};

use crate::clock::unix_now;
use crate::commit::GroupCommit;
use crate::delivery::{replies, Deliver, DeliveryRecipient, DeliveryReport, RecipientResult};
use crate::health::{free_space, StoreHealth};
use crate::logsafe::LogSafe;
use crate::metrics::{ActorMeter, Metrics, RouteOnlyLabel};
use crate::protocol::dsn::{MessageDsn, RcptDsn};
use crate::protocol::received::{received_header, Origin};
use crate::routes::Router;
use crate::store::{Envelope, PickupMark, QueueId, QueueStore, RcptStatus, RecipientState, StagedBody, StoreError};

#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub hostname: String,
    /// Waits after the 1st, 2nd, … temporary failure; the last repeats.
    pub retry_intervals: Vec<Duration>,
    /// Recipients still failing this long after arrival are given up (4.4.7) and reported.
    pub expire_after: Duration,
    /// The sender gets one delay notice once a message has waited this long.
    pub delay_notice_after: Duration,
    /// The same two for local routes (every route but `smtp` and `smarthost`: Drop, Maildir,
    /// LMTP, custom actors), as IIS kept separate local and remote times; `None` = as above.
    pub local_expire_after: Option<Duration>,
    pub local_delay_notice_after: Option<Duration>,
    /// Gets a copy of every non-delivery report.
    pub ndr_copy_to: Option<String>,
    /// Where undeliverable notifications go.
    pub badmail_dir: PathBuf,
    pub max_in_flight: usize,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            hostname: "localhost".into(),
            retry_intervals: [15, 30, 60, 240].iter().map(|m| Duration::from_secs(m * 60)).collect(),
            expire_after: Duration::from_secs(5 * 86_400),
            delay_notice_after: Duration::from_secs(4 * 3600),
            local_expire_after: None,
            local_delay_notice_after: None,
            ndr_copy_to: None,
            badmail_dir: PathBuf::from("Badmail"),
            max_in_flight: 256,
        }
    }
}

impl QueueSettings {
    /// (expire after, delay notice after) for recipients of `route`.
    pub fn times(&self, route: &str) -> (Duration, Duration) {
        if matches!(route, "smtp" | "smarthost") {
            (self.expire_after, self.delay_notice_after)
        } else {
            (
                self.local_expire_after.unwrap_or(self.expire_after),
                self.local_delay_notice_after.unwrap_or(self.delay_notice_after),
            )
        }
    }
}

/// Message bodies kept in memory while waiting for a delivery slot, at most.
const READY_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Bodies handed to delivery actors at once, at most (one message is always allowed).
const IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;
/// While the store cannot write, reopening it is tried this often.
const RECOVER_EVERY: Duration = Duration::from_secs(5);
/// After a full disk, reopening waits for at least this much free space (or the reserve).
const RECOVER_MIN_FREE: u64 = 4 * 1024 * 1024;
/// Failure reports return the whole message (`RET=FULL`) only up to this size.
const MAX_RETURNED_MESSAGE: usize = 1024 * 1024;

/// A message's body when it is in memory; `None` when it is only in the store (read back when
/// its turn to be delivered comes).
type Body = Option<Arc<Vec<u8>>>;

/// The recipients of one message that go to one delivery actor.
type Group = (&'static str, Recipient<Deliver>, Vec<DeliveryRecipient>);

/// A message to store: what an `Enqueue` carries, or a notification the queue makes itself.
struct NewMessage {
    sender: Option<String>,
    recipients: Vec<(String, RcptDsn)>,
    dsn: MessageDsn,
    body: Vec<u8>,
    origin: Origin,
    origin_text: String,
    pickup: Option<PickupMark>,
    /// The body's first pieces, already in the store; `body` is the rest.
    staged: Option<StagedBody>,
    /// `DKIM-Signature:` lines, put in front of the message below our trace header.
    signature: Vec<u8>,
}

pub struct Queue {
    store: Arc<dyn QueueStore>,
    committer: Option<GroupCommit>,
    settings: QueueSettings,
    router: Router,
    metrics: Arc<Metrics>,
    scheduler: Option<Addr<RetryScheduler>>,
    /// The earliest retry time told to the scheduler (see the invariants).
    told_scheduler: Option<u64>,
    /// Messages waiting for a delivery slot, with their body when still in memory.
    ready: VecDeque<(QueueId, Option<Arc<Vec<u8>>>)>,
    /// Bytes of the bodies held in `ready`.
    ready_bytes: usize,
    /// The envelopes of the messages in `ready` or being delivered (see the invariants): never
    /// dispatched twice at once.
    active: HashMap<QueueId, Envelope>,
    /// `Deliver` requests outstanding.
    in_flight: usize,
    /// Bytes of the messages those requests carry.
    in_flight_bytes: usize,
    /// Messages in the store (counted once at open: sled's `len` walks the whole tree).
    queued: usize,
    /// Per message being delivered: the `Deliver` requests out (or its body being read).
    outstanding: HashMap<QueueId, usize>,
    /// Messages on hold (loaded at start, kept by Hold/Release/Delete).
    held: HashSet<QueueId>,
    /// Stopping: nothing new is dispatched (see [`Drain`]).
    draining: bool,
    /// Told when the last delivery in flight ends while draining.
    drained: Vec<tokio::sync::oneshot::Sender<()>>,
    meter: ActorMeter,
    /// Whether the store can write, and the room for new mail; shared with the sessions.
    health: Arc<StoreHealth>,
    /// A reopening of the failed store is scheduled or running.
    recovering: bool,
    /// The store's count of messages taken over from dead nodes, as last added to the metric.
    taken_over: u64,
    /// DKIM keys; empty = nothing is signed.
    signer: Arc<crate::dkim::Signer>,
}

impl Queue {
    /// The queue and its [`RetryScheduler`] are started together on the current arbiter.
    pub fn new(store: Arc<dyn QueueStore>, settings: QueueSettings, router: Router, metrics: Arc<Metrics>) -> Self {
        Queue {
            health: Arc::new(StoreHealth::new(store.dir(), 0)),
            recovering: false,
            // A Queue started again after a panic counts on from where the store is.
            taken_over: store.taken_over(),
            signer: Arc::new(crate::dkim::Signer::default()),
            store,
            committer: None,
            settings,
            router,
            scheduler: None,
            told_scheduler: None,
            ready: VecDeque::new(),
            ready_bytes: 0,
            active: HashMap::new(),
            in_flight: 0,
            in_flight_bytes: 0,
            queued: 0,
            outstanding: Default::default(),
            held: HashSet::new(),
            draining: false,
            drained: Vec::new(),
            meter: metrics.actor("queue"),
            metrics,
        }
    }

    /// Signs with these DKIM keys (see [`SetSigner`](messages::SetSigner) for a reload).
    pub fn with_signer(mut self, signer: Arc<crate::dkim::Signer>) -> Self {
        self.signer = signer;
        self
    }

    /// Shares `health` with the sessions (the daemon gives both the same one, with its reserve).
    pub fn with_health(mut self, health: Arc<StoreHealth>) -> Self {
        self.health = health;
        self
    }

    /// A store error: a failed write or sync marks the store failing (new mail is refused) and
    /// starts reopening it; other errors (an unreadable record, a store being reopened) do not.
    fn store_error(&mut self, e: &StoreError, ctx: &mut Context<Self>) {
        if e.is_write_failure() {
            self.store_failed(e.to_string(), e.is_no_space(), ctx);
        }
    }

    /// The store cannot make anything durable: refuse new mail and try to reopen it every
    /// [`RECOVER_EVERY`]. sled keeps a write error for as long as its handles live, so even once
    /// space is back, only a reopened store writes again.
    fn store_failed(&mut self, why: String, no_space: bool, ctx: &mut Context<Self>) {
        if self.health.failing().is_none() {
            error!(error = %why, "the queue store cannot write; new mail is refused until it has been reopened");
            self.metrics.store_failures.inc();
            self.health.set_failing(why, no_space);
        }
        if !self.recovering {
            self.recovering = true;
            ctx.run_later(RECOVER_EVERY, |act, ctx| act.recover(ctx));
        }
    }

    /// One attempt at reopening the failed store. Waits (and tries again later) while a sync
    /// still hangs (it holds the old handles) or, after a full disk, while space is short.
    /// Reopening runs on the blocking pool; the Queue meanwhile answers with the store closed.
    fn recover(&mut self, ctx: &mut Context<Self>) {
        let again = |ctx: &mut Context<Self>| {
            ctx.run_later(RECOVER_EVERY, |act, ctx| act.recover(ctx));
        };
        if self.committer.as_ref().is_some_and(|c| c.stuck()) {
            warn!("the queue store's last sync still hangs; it cannot be reopened yet");
            return again(ctx);
        }
        if self.health.failing_for_space() {
            let want = self.health.reserve().max(RECOVER_MIN_FREE);
            match free_space(self.store.dir()) {
                Ok(free) if free < want => return again(ctx),
                _ => {}
            }
        }
        // What the Queue held in memory may not be what the store kept: start again from the store.
        self.store
            .clone()
            .recover()
            .into_actor(self)
            .map(move |res, act, ctx| match res {
                Ok(()) => {
                    act.recovering = false;
                    act.health.set_healthy();
                    act.forget_waiting();
                    act.metrics.store_reopens.inc();
                    info!("queue store reopened; taking mail again");
                    act.load_queue(ctx);
                    // The scheduler reads the reopened retry index from its start.
                    act.told_scheduler = None;
                    if let Some(s) = &act.scheduler {
                        s.do_send(Reschedule { at: 0 });
                    }
                }
                Err(e) => {
                    warn!(error = %e, every_s = RECOVER_EVERY.as_secs(), "reopening the queue store failed; trying again");
                    again(ctx);
                }
            })
            .spawn(ctx);
    }

    /// Reads the queue from the store: counts, held messages, and the messages due now that the
    /// store's retry index does not hand out (the rest come through the scheduler). At start, and
    /// after a reopen (when what was written but not synced before may be gone: the store is the
    /// truth).
    fn load_queue(&mut self, ctx: &mut Context<Self>) {
        self.store
            .startup()
            .into_actor(self)
            .map(|res, act, ctx| {
                match res {
                    Ok(start) => {
                        act.queued = start.queued;
                        act.held = start.held.into_iter().collect();
                        let resumed = start.resume.len();
                        for env in start.resume {
                            act.schedule(env, None);
                        }
                        info!(
                            store = act.store.kind(),
                            resumed,
                            queued = act.queued,
                            held = act.held.len(),
                            "queue opened"
                        );
                    }
                    Err(e) => error!(error = %e, "cannot list the queued messages"),
                }
                act.metrics.queue_messages.set(act.queued as i64);
                act.pump(ctx);
                // Whatever else is due now (new messages on a shared store, expired leases).
                act.take_due(unix_now(), ctx).map(|_, _, _| ()).spawn(ctx);
            })
            .spawn(ctx);
    }

    /// Drops the messages waiting for a slot (not those being delivered): after the store was
    /// reopened they are read again from what it kept (and a shared store gets their leases
    /// back, so they need not wait for them to expire).
    fn forget_waiting(&mut self) {
        for (id, _) in self.ready.drain(..) {
            if !self.outstanding.contains_key(&id) && self.active.remove(&id).is_some() {
                self.store.release(id);
            }
        }
        self.ready_bytes = 0;
    }

    /// Puts a message in line for delivery, unless the Queue already works on it (its own copy of
    /// the envelope is then the newer one).
    fn schedule(&mut self, env: Envelope, body: Option<Arc<Vec<u8>>>) {
        let id = env.id;
        if let std::collections::hash_map::Entry::Vacant(slot) = self.active.entry(id) {
            slot.insert(env);
            let body = body.filter(|b| self.ready_bytes + b.len() <= READY_BODY_BYTES);
            self.ready_bytes += body.as_ref().map_or(0, |b| b.len());
            self.ready.push_back((id, body));
        }
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        // A delivery whose result cannot be recorded would be made again and again (the store
        // still says pending): nothing goes out until the store writes again (`load_queue`).
        if self.health.is_failing() {
            return;
        }
        while self.in_flight < self.settings.max_in_flight
            && (self.in_flight == 0 || self.in_flight_bytes < IN_FLIGHT_BYTES)
        {
            let Some((id, body)) = self.ready.pop_front() else {
                break;
            };
            self.ready_bytes -= body.as_ref().map_or(0, |b| b.len());
            if !self.dispatch(id, body, ctx) && !self.outstanding.contains_key(&id) {
                self.active.remove(&id);
            }
        }
    }

    /// Sends the pending recipients of `id` to their delivery actors (reading its body from the
    /// store first if it is not in memory); false when nothing was sent.
    fn dispatch(&mut self, id: QueueId, body: Option<Arc<Vec<u8>>>, ctx: &mut Context<Self>) -> bool {
        let Some(env) = self.active.get(&id) else { return false };
        if env.held || self.draining || self.outstanding.contains_key(&id) {
            return false;
        }
        let now = unix_now();
        let mut groups: Vec<Group> = Vec::new();
        let mut held = Vec::new();
        for (index, r) in env.recipients.iter().enumerate() {
            if r.status != RcptStatus::Pending || r.next_attempt.is_some_and(|t| t > now) {
                continue;
            }
            let (name, actor) = match self.router.route(&r.address) {
                Ok(route) => route,
                Err(missing) => {
                    held.push(format!("{} (route {missing:?})", r.address));
                    continue;
                }
            };
            if r.attempts > 0 {
                self.metrics.retries.inc();
            }
            let rcpt = DeliveryRecipient { index, address: r.address.clone(), dsn: r.dsn.clone() };
            match groups.iter_mut().find(|g| g.0 == name) {
                Some(g) => g.2.push(rcpt),
                None => groups.push((name, actor, vec![rcpt])),
            }
        }
        if !held.is_empty() {
            warn!(id, recipients = %LogSafe(&held.join(",")), "no delivery actor for these recipients' route; they stay queued");
        }
        if groups.is_empty() {
            return false;
        }
        match body {
            Some(message) => self.send(id, groups, message, ctx),
            None => {
                // Counted as a delivery under way while it is read: it holds a slot, and the
                // admin sees it as active.
                self.in_flight += 1;
                *self.outstanding.entry(id).or_default() += 1;
                self.store
                    .body(id)
                    .into_actor(self)
                    .map(move |res, act, ctx| {
                        act.in_flight -= 1;
                        let done_here = act.one_less(id);
                        match res {
                            Ok(message) if !act.draining && act.active.contains_key(&id) => {
                                act.send(id, groups, Arc::new(message), ctx)
                            }
                            Ok(_) => {}
                            Err(e) => error!(id, error = %e, "cannot read message body"),
                        }
                        if done_here && !act.outstanding.contains_key(&id) {
                            act.active.remove(&id);
                        }
                        act.after_delivery(ctx);
                    })
                    .spawn(ctx);
            }
        }
        true
    }

    /// One fewer request out for `id`; true when none is left.
    fn one_less(&mut self, id: QueueId) -> bool {
        match self.outstanding.get_mut(&id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.outstanding.remove(&id);
                true
            }
        }
    }

    /// After a delivery (or a body read) ended: wake a drain waiting for the last one, and send
    /// what waits.
    fn after_delivery(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight == 0 {
            for tx in self.drained.drain(..) {
                let _ = tx.send(());
            }
        }
        self.pump(ctx);
    }

    /// Sends one `Deliver` per route group and records each report as it comes back.
    fn send(&mut self, id: QueueId, groups: Vec<Group>, message: Arc<Vec<u8>>, ctx: &mut Context<Self>) {
        let Some(env) = self.active.get(&id) else { return };
        let (sender, dsn) = (env.sender.clone(), env.dsn.clone());
        for (route, actor, recipients) in groups {
            let req = Deliver { id, sender: sender.clone(), recipients, message: message.clone(), dsn: dsn.clone() };
            self.in_flight += 1;
            self.in_flight_bytes += message.len();
            *self.outstanding.entry(id).or_default() += 1;
            let indices = req.indices();
            let size = message.len();
            let original = message.clone();
            actor
                .send(req)
                .into_actor(self)
                .map(move |res, act, ctx| {
                    let mut report = match res {
                        Ok(r) => r,
                        // Stopping: the delivery actor went away under it. Nothing is known of
                        // the attempt, so nothing is recorded: its recipients stay pending as if
                        // not attempted (see `Drain`), not deferred by a retry interval.
                        Err(_) if act.draining => {
                            act.in_flight -= 1;
                            act.in_flight_bytes -= size;
                            // Its lease goes back at once (a shared store's other nodes take it up).
                            if act.one_less(id) && act.active.remove(&id).is_some() {
                                act.store.release(id);
                            }
                            return act.after_delivery(ctx);
                        }
                        Err(e) => DeliveryReport::all(indices.clone(), replies::actor_unavailable(e)),
                    };
                    // The interface promises a result per recipient; a buggy actor that leaves
                    // one out must not leave it pending with no retry time.
                    for index in indices {
                        if !report.results.iter().any(|r| r.index == index) {
                            report.results.push(RecipientResult::new(index, replies::no_result()));
                        }
                    }
                    act.in_flight -= 1;
                    act.in_flight_bytes -= size;
                    if report.results.iter().any(|r| r.outcome.is_delivered()) {
                        act.metrics.bytes_delivered.get_or_create(&RouteOnlyLabel { route }).inc_by(size as u64);
                    }
                    let done_here = act.one_less(id);
                    if let Some(env) = act.active.remove(&id) {
                        let env = act.record(env, route, report, &original, ctx);
                        if done_here {
                            act.store.release(id);
                        } else {
                            act.active.insert(id, env);
                        }
                    }
                    act.after_delivery(ctx);
                })
                .spawn(ctx);
        }
    }

    /// Writes a new message (body, envelope) to the store; durable only after a commit. Returns
    /// the body when it is in memory (not for a staged body, which is read back when delivered).
    fn store_message(&mut self, msg: NewMessage) -> Result<(Envelope, Body), StoreError> {
        let id = match &msg.staged {
            Some(staged) => staged.id,
            None => self.store.next_id()?,
        };
        let now = unix_now();
        let single = (msg.recipients.len() == 1).then(|| msg.recipients[0].0.clone());
        let mut header = received_header(&msg.origin, &self.settings.hostname, id, single.as_deref(), now);
        header.push_str(&String::from_utf8_lossy(&msg.signature));
        let staged_bytes = msg.staged.as_ref().map_or(0, |s| s.bytes);
        let size = (header.len() + msg.body.len()) as u64 + staged_bytes;
        let source = match msg.origin {
            Origin::Smtp { .. } => "smtp",
            Origin::Pickup => "pickup",
            Origin::Local => "local",
        };
        let env = Envelope {
            id,
            sender: msg.sender.unwrap_or_default(),
            recipients: msg
                .recipients
                .into_iter()
                .map(|(address, dsn)| RecipientState {
                    address,
                    status: RcptStatus::Pending,
                    attempts: 0,
                    last: None,
                    next_attempt: None,
                    dsn,
                })
                .collect(),
            size,
            received_at: now,
            source: source.into(),
            origin: msg.origin_text,
            next_attempt: None,
            dsn: msg.dsn,
            delay_notified: false,
            held: false,
        };
        if let Some(staged) = &msg.staged {
            // The whole body is in the spool file: the sender wrote its rest there too.
            if !msg.body.is_empty() {
                return Err(StoreError::Corrupt("a spooled message with a rest outside its file".into()));
            }
            if let Err(e) = self.store.insert_staged(&env, header.as_bytes(), staged) {
                let _ = self.store.discard(&env, None);
                return Err(e);
            }
            return Ok((env, None));
        }
        // The header goes in front of the body in place: no second copy of a large body.
        let mut message = msg.body;
        message.splice(0..0, header.bytes());
        // Shared with the store until its commit (no copy), and with delivery after.
        let message = Arc::new(message);
        if let Err(e) = self.store.insert(&env, message.clone(), msg.pickup.as_ref()) {
            let _ = self.store.discard(&env, msg.pickup.as_ref());
            return Err(e);
        }
        Ok((env, Some(message)))
    }

    fn tell_scheduler(&mut self, at: u64, now: u64) {
        if self.told_scheduler.is_none_or(|t| at < t || t <= now) {
            if let Some(s) = &self.scheduler {
                // At most one message per new earliest time, so this cannot grow without bound.
                s.do_send(Reschedule { at });
                self.told_scheduler = Some(at);
            }
        }
    }

    /// Queues the messages whose retry time has come (claimed for this node on a shared
    /// store); answers true when there may be more than fitted.
    fn take_due(&mut self, now: u64, _ctx: &mut Context<Self>) -> ResponseActFuture<Self, bool> {
        let room = self.settings.max_in_flight.saturating_mul(4).saturating_sub(self.ready.len());
        if room == 0 || self.health.is_failing() {
            return Box::pin(actix::fut::ready(room == 0));
        }
        let active = &self.active;
        let claim = self.store.claim_due(now, room, &|id| active.contains_key(&id));
        Box::pin(claim.into_actor(self).map(move |res, act, ctx| {
            // What the store took over from dead nodes since the last look: possible duplicates.
            let taken = act.store.taken_over();
            act.metrics.queue_takeovers.inc_by(taken.saturating_sub(act.taken_over));
            act.taken_over = act.taken_over.max(taken);
            let more = match res {
                Ok(envs) => {
                    let more = envs.len() == room;
                    for env in envs {
                        act.schedule(env, None);
                    }
                    more
                }
                Err(e) => {
                    // A shared store that cannot be reached, or whose background commit failed,
                    // is failing: new mail is refused and it is recovered, as after a write.
                    error!(error = %e, "cannot read the retry index");
                    act.store_error(&e, ctx);
                    true
                }
            };
            act.pump(ctx);
            more
        }))
    }
}

impl Actor for Queue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.meter.started();
        // Writes are rare compared with the work they wait for; let sessions queue up.
        ctx.set_mailbox_capacity(1024);
        let store = self.store.clone();
        self.committer = Some(GroupCommit::spawn(
            "queue",
            move || {
                let commit = store.commit();
                Box::pin(async move { commit.await.map_err(StoreError::into_io) })
            },
            self.metrics.queue_commit_batch.clone(),
            crate::commit::SYNC_DEADLINE,
        ));
        self.scheduler = Some(
            RetryScheduler::new(self.store.clone(), ctx.address().recipient(), self.metrics.actor("scheduler")).start(),
        );
        self.load_queue(ctx);
        // A shared store leases the messages this node works on: keep the leases while the
        // work lasts (a node that dies stops renewing, and another node takes the work over).
        if let Some(every) = self.store.renew_every() {
            ctx.run_interval(every, |act, ctx| {
                let ids: Vec<QueueId> = act.active.keys().copied().collect();
                if ids.is_empty() || act.health.is_failing() {
                    return;
                }
                act.store
                    .renew(ids)
                    .into_actor(act)
                    .map(|res, act, ctx| {
                        if let Err(e) = res {
                            warn!(error = %e, "cannot renew the leases on the messages being delivered");
                            act.store_error(&e, ctx);
                        }
                    })
                    .spawn(ctx);
            });
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.meter.stopped();
        // What waits here for a slot goes back to the shared store's other nodes at once,
        // rather than when its lease runs out (deliveries still out keep theirs).
        for id in self.active.keys().filter(|id| !self.outstanding.contains_key(id)) {
            self.store.release(*id);
        }
        if let Err(e) = self.store.commit_blocking(Duration::from_secs(5)) {
            error!(error = %e, "final queue sync failed");
        }
    }
}
