//! The Queue actor: owns the sled store, assigns message IDs, answers `Enqueue` only once the
//! message is durable (group commit), routes each recipient to a delivery actor, and records the
//! per-recipient results: retry times, expiry, delay notices, non-delivery reports and success
//! notices (RFC 3464), and Badmail for notifications that cannot be delivered.
//!
//! Invariants:
//! - An `Enqueue` is answered `Ok` only after a sync that covers its write has returned.
//! - At most `max_in_flight` `Deliver` requests are outstanding; everything else waits in `ready`.
//!   `ready` keeps message bodies in memory only up to `READY_BODY_BYTES` in total (the rest are
//!   read back from sled when their turn comes), so memory stays bounded whatever the queue holds.
//! - A message is removed from the store only when no recipient is pending.
//! - A notification about a message is written to the store before that message's new state, so
//!   sled's prefix recovery never keeps the state without the notification. A message from the
//!   null sender never causes a notification; its failures go to Badmail (written and synced
//!   before the state that forgets it).
//! - Every retry time written is either told to the [`RetryScheduler`] or not earlier than a time
//!   already told to it, so the scheduler never sleeps past a due message.

mod admin;

pub use admin::{
    AdminError, Bounce, Delete, Drain, Hold, List, ListFilter, ListPage, MessageInfo, QueueSummary, RecipientInfo,
    Release, RetryAll, RetryNow, Show, Summary, STATES,
};

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use tracing::{error, info, warn};

use crate::commit::GroupCommit;
use crate::delivery::{replies, Class, Deliver, DeliveryRecipient, DeliveryReport, Handoff, RecipientResult};
use crate::fsio::write_badmail;
use crate::metrics::{ActorMeter, CauseLabel, KindLabel, Metrics, RouteLabel, RouteOnlyLabel, SourceLabel};
use crate::notify::{self, Report, ReportKind, ReportRecipient};
use crate::protocol::dsn::{MessageDsn, RcptDsn};
use crate::protocol::received::{received_header, rfc5322_date, Origin};
use crate::protocol::{EnqueueError, LocalDomains, Mailbox};
use crate::retry::{Reschedule, RetryBatch, RetryDue, RetryScheduler};
use crate::routes::{self, RouteTable};
use crate::store::{Envelope, PickupMark, QueueId, RcptStatus, RecipientState, Store, StoreError};

/// Store one new message. Answered once it is on stable storage.
#[derive(Message)]
#[rtype(result = "Result<QueueId, EnqueueError>")]
pub struct Enqueue {
    pub sender: Option<Mailbox>,
    pub recipients: Vec<Mailbox>,
    pub dsn: MessageDsn,
    /// DSN parameters of `recipients`, index for index (missing entries mean none given).
    pub rcpt_dsn: Vec<RcptDsn>,
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

/// Where recipients go: the route table names a delivery actor for each domain; the router holds
/// the actors by name. A recipient whose route names no actor stays queued (and is logged) until
/// a reload provides one.
#[derive(Clone)]
pub struct Router {
    local_domains: LocalDomains,
    table: Arc<RouteTable>,
    /// By route name; the name is interned once here for the metric labels.
    actors: HashMap<String, (&'static str, Recipient<Deliver>)>,
}

impl Router {
    pub fn new(
        local_domains: LocalDomains,
        table: RouteTable,
        actors: impl IntoIterator<Item = (String, Recipient<Deliver>)>,
    ) -> Self {
        let actors = actors.into_iter().map(|(name, a)| (name.clone(), (crate::metrics::intern(&name), a))).collect();
        Router { local_domains, table: Arc::new(table), actors }
    }

    /// No rules: local domains to `drop`, the others to `smtp` when given.
    pub fn simple(local_domains: LocalDomains, drop: Recipient<Deliver>, smtp: Option<Recipient<Deliver>>) -> Self {
        let smtp = smtp.map(|a| (routes::REMOTE_DEFAULT.to_string(), a));
        let actors = std::iter::once((routes::LOCAL_DEFAULT.to_string(), drop)).chain(smtp);
        Router::new(local_domains, RouteTable::default(), actors)
    }

    /// The route name and its actor; `Err(name)` when no actor has that name.
    fn route(&self, address: &str) -> Result<(&'static str, Recipient<Deliver>), &str> {
        let name = self.table.route(routes::domain_of(address), &self.local_domains);
        match self.actors.get(name) {
            Some((label, actor)) => Ok((label, actor.clone())),
            None => Err(name),
        }
    }
}

/// Replace the routes (a configuration reload). Deliveries in flight finish with the old ones.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetRouter(pub Router);

#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub hostname: String,
    /// Waits after the 1st, 2nd, … temporary failure; the last repeats.
    pub retry_intervals: Vec<Duration>,
    /// Recipients still failing this long after arrival are given up (4.4.7) and reported.
    pub expire_after: Duration,
    /// The sender gets one delay notice once a message has waited this long.
    pub delay_notice_after: Duration,
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
            ndr_copy_to: None,
            badmail_dir: PathBuf::from("Badmail"),
            max_in_flight: 256,
        }
    }
}

/// The wait before the next attempt after `attempts` failures (1-based); the last interval repeats.
pub fn retry_delay(intervals: &[Duration], attempts: u32) -> Duration {
    let i = (attempts.max(1) as usize - 1).min(intervals.len().saturating_sub(1));
    intervals.get(i).copied().unwrap_or(Duration::from_secs(900))
}

/// When a recipient that just failed temporarily for the `attempts`-th time is tried next: the
/// schedule's delay, but never after the message expires, nor after its delay notice is due
/// (so both happen on time rather than at the next scheduled attempt). All times in Unix seconds.
pub fn next_attempt_at(s: &QueueSettings, attempts: u32, received_at: u64, notified: bool, now: u64) -> u64 {
    let mut at = now.saturating_add(retry_delay(&s.retry_intervals, attempts).as_secs());
    at = at.min(received_at.saturating_add(s.expire_after.as_secs()));
    let notice = received_at.saturating_add(s.delay_notice_after.as_secs());
    if !notified && notice > now {
        at = at.min(notice);
    }
    at.max(now + 1)
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Message bodies kept in memory while waiting for a delivery slot, at most.
const READY_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Bodies handed to delivery actors at once, at most (one message is always allowed).
const IN_FLIGHT_BYTES: usize = 256 * 1024 * 1024;
/// Failure reports return the whole message (`RET=FULL`) only up to this size.
const MAX_RETURNED_MESSAGE: usize = 1024 * 1024;

/// A message to store: what an `Enqueue` carries, or a notification the queue makes itself.
struct NewMessage {
    sender: Option<String>,
    recipients: Vec<(String, RcptDsn)>,
    dsn: MessageDsn,
    body: Vec<u8>,
    origin: Origin,
    origin_text: String,
    pickup: Option<PickupMark>,
}

pub struct Queue {
    store: Arc<Store>,
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
    /// IDs in `ready` or being delivered: never dispatched twice at once.
    active: HashSet<QueueId>,
    /// `Deliver` requests outstanding.
    in_flight: usize,
    /// Bytes of the messages those requests carry.
    in_flight_bytes: usize,
    /// Messages in the store (counted once at open: sled's `len` walks the whole tree).
    queued: usize,
    outstanding: HashMap<QueueId, usize>,
    /// Messages on hold (loaded at start, kept by Hold/Release/Delete).
    held: HashSet<QueueId>,
    /// Stopping: nothing new is dispatched (see [`Drain`]).
    draining: bool,
    /// Told when the last delivery in flight ends while draining.
    drained: Vec<tokio::sync::oneshot::Sender<()>>,
    meter: ActorMeter,
}

impl Queue {
    /// The queue and its [`RetryScheduler`] are started together on the current arbiter.
    pub fn new(store: impl Into<Arc<Store>>, settings: QueueSettings, router: Router, metrics: Arc<Metrics>) -> Self {
        Queue {
            store: store.into(),
            committer: None,
            settings,
            router,
            scheduler: None,
            told_scheduler: None,
            ready: VecDeque::new(),
            ready_bytes: 0,
            active: HashSet::new(),
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
        if env.held || self.draining {
            return false;
        }
        let now = unix_now();
        let mut groups: Vec<(&'static str, Recipient<Deliver>, Vec<DeliveryRecipient>)> = Vec::new();
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
            warn!(id, recipients = %held.join(","), "no delivery actor for these recipients' route; they stay queued");
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
            let req =
                Deliver { id, sender: env.sender.clone(), recipients, message: message.clone(), dsn: env.dsn.clone() };
            self.in_flight += 1;
            self.in_flight_bytes += message.len();
            *self.outstanding.entry(id).or_default() += 1;
            let indices = req.indices();
            let size = message.len();
            actor
                .send(req)
                .into_actor(self)
                .map(move |res, act, ctx| {
                    let mut report = match res {
                        Ok(r) => r,
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
                    act.record(id, route, report, ctx);
                    if act.in_flight == 0 {
                        for tx in act.drained.drain(..) {
                            let _ = tx.send(());
                        }
                    }
                    act.pump(ctx);
                })
                .spawn(ctx);
        }
        true
    }

    fn record(&mut self, id: QueueId, route: &'static str, report: DeliveryReport, ctx: &mut Context<Self>) {
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
        let expires_at = env.received_at.saturating_add(self.settings.expire_after.as_secs());
        let (mut failed, mut delayed, mut succeeded) = (Vec::new(), Vec::new(), Vec::new());
        for res in report.results {
            let Some(r) = env.recipients.get_mut(res.index) else {
                warn!(id, index = res.index, "delivery report names an unknown recipient");
                continue;
            };
            if r.status != RcptStatus::Pending {
                warn!(id, index = res.index, "delivery report for a recipient already done; ignored");
                continue;
            }
            r.attempts += 1;
            let mut outcome = res.outcome;
            match outcome.class {
                Class::Delivered => {
                    r.status = RcptStatus::Delivered;
                    r.next_attempt = None;
                    match res.handoff {
                        Handoff::Final => succeeded.push((res.index, "delivered")),
                        Handoff::Relayed => succeeded.push((res.index, "relayed")),
                        Handoff::PassedOn => {}
                    }
                }
                Class::Permanent => {
                    r.status = RcptStatus::Failed;
                    r.next_attempt = None;
                    failed.push(res.index);
                }
                Class::Temporary if now >= expires_at => {
                    let waited = humanize(now.saturating_sub(env.received_at));
                    outcome = replies::expired(&waited, &outcome);
                    r.status = RcptStatus::Failed;
                    r.next_attempt = None;
                    failed.push(res.index);
                }
                Class::Temporary => {
                    let at = next_attempt_at(&self.settings, r.attempts, env.received_at, env.delay_notified, now);
                    r.next_attempt = Some(at);
                    delayed.push(res.index);
                }
            }
            self.metrics.deliveries.get_or_create(&RouteLabel { route, result: outcome.label() }).inc();
            info!(
                id,
                sender = %env.sender,
                recipient = %r.address,
                route,
                result = outcome.label(),
                attempts = r.attempts,
                next_attempt = ?r.next_attempt,
                remote = outcome.remote_mta.as_deref().unwrap_or(""),
                code = outcome.code,
                status = %outcome.status(),
                reply = %outcome.text,
                "delivery"
            );
            r.last = Some(outcome);
        }
        env.next_attempt =
            env.recipients.iter().filter(|r| r.status == RcptStatus::Pending).filter_map(|r| r.next_attempt).min();

        // Notifications go into the store before the state that makes them due (see invariants).
        let mut original: Option<Vec<u8>> = None;
        let mut body = |store: &Store| -> Option<Vec<u8>> {
            if original.is_none() {
                original = store.body(id).map_err(|e| error!(id, error = %e, "cannot read message for a report")).ok();
            }
            original.clone()
        };
        let mut notices: Vec<(QueueId, Arc<Vec<u8>>)> = Vec::new();
        if env.sender.is_empty() {
            if !failed.is_empty() {
                let Some(message) = body(&self.store) else { return };
                if let Err(e) = self.badmail(&env, &failed, &message) {
                    // Keep the message queued: losing it silently is worse than retrying.
                    return error!(id, error = %e, "cannot write an undeliverable notification to Badmail; kept");
                }
            }
        } else {
            let delay_due = now >= env.received_at.saturating_add(self.settings.delay_notice_after.as_secs());
            let wants = |i: &usize, f: fn(&RcptDsn) -> bool| env.recipients.get(*i).is_some_and(|r| f(&r.dsn));
            let failed_n: Vec<usize> = failed.iter().copied().filter(|i| wants(i, |d| d.notify().failure)).collect();
            let delayed_n: Vec<usize> = if !env.delay_notified && delay_due {
                delayed.iter().copied().filter(|i| wants(i, |d| d.notify().delay)).collect()
            } else {
                Vec::new()
            };
            let succeeded_n: Vec<(usize, &str)> =
                succeeded.iter().copied().filter(|(i, _)| wants(i, |d| d.notify().success)).collect();
            let jobs = [
                (ReportKind::Failure, failed_n.iter().map(|&i| (i, "failed")).collect::<Vec<_>>()),
                (ReportKind::Delay, delayed_n.iter().map(|&i| (i, "delayed")).collect()),
                (ReportKind::Success, succeeded_n),
            ];
            for (kind, rcpts) in jobs {
                if rcpts.is_empty() {
                    continue;
                }
                let Some(message) = body(&self.store) else { return };
                match self.store_notification(&env, kind, &rcpts, &message, expires_at, now) {
                    Ok(n) => notices.push(n),
                    Err(e) => {
                        return error!(id, error = %e, "cannot store a delivery notification; results will be retried")
                    }
                }
            }
            if !delayed.is_empty() && delay_due {
                env.delay_notified = true;
            }
        }

        let finished = env.is_finished();
        let result = if finished { self.store.remove(id, stored_next) } else { self.store.update(&env, stored_next) };
        match result {
            Ok(()) if finished => {
                self.queued = self.queued.saturating_sub(1);
                self.metrics.queue_messages.set(self.queued as i64);
            }
            Ok(()) => {
                if let Some(at) = env.next_attempt {
                    self.tell_scheduler(at, now);
                }
            }
            Err(e) => error!(id, error = %e, "cannot record delivery results; the message will be retried"),
        }
        if !notices.is_empty() {
            self.commit_notices(notices, ctx);
        }
    }

    /// Builds a report about `rcpts` of `env` and stores it (not yet durable).
    fn store_notification(
        &mut self,
        env: &Envelope,
        kind: ReportKind,
        rcpts: &[(usize, &'static str)],
        message: &[u8],
        expires_at: u64,
        now: u64,
    ) -> Result<(QueueId, Arc<Vec<u8>>), StoreError> {
        let recipients = rcpts
            .iter()
            .filter_map(|&(i, action)| env.recipients.get(i).map(|r| (r, action)))
            .map(|(r, action)| ReportRecipient {
                address: r.address.clone(),
                orcpt: r.dsn.orcpt.clone(),
                action,
                result: r.last.clone(),
                will_retry_until: (kind == ReportKind::Delay).then_some(expires_at),
            })
            .collect();
        let report = notify::build(&Report {
            kind,
            hostname: &self.settings.hostname,
            queue_id: env.id,
            to: &env.sender,
            envid: env.dsn.envid.as_deref(),
            arrival: env.received_at,
            now,
            recipients,
            original: message,
            ret: env.dsn.ret,
            max_full: MAX_RETURNED_MESSAGE,
        });
        let mut to = vec![(env.sender.clone(), RcptDsn::default())];
        if let Some(copy) = self.settings.ndr_copy_to.as_ref().filter(|_| kind == ReportKind::Failure) {
            to.push((copy.clone(), RcptDsn::default()));
        }
        let kind_name = match kind {
            ReportKind::Failure => "failure",
            ReportKind::Delay => "delay",
            ReportKind::Success => "success",
        };
        let (new, message) = self.store_message(NewMessage {
            sender: None,
            recipients: to,
            dsn: MessageDsn::default(),
            body: report,
            origin: Origin::Local,
            origin_text: format!("{kind_name} notice for {}", env.id),
            pickup: None,
        })?;
        self.metrics.notifications.get_or_create(&KindLabel { kind: kind_name }).inc();
        info!(id = new.id, about = env.id, to = %env.sender, kind = kind_name, "notification queued");
        Ok((new.id, message))
    }

    /// Makes stored notifications durable, then queues them for delivery.
    fn commit_notices(&mut self, notices: Vec<(QueueId, Arc<Vec<u8>>)>, ctx: &mut Context<Self>) {
        let Some(committer) = self.committer.clone() else { return };
        self.queued += notices.len();
        self.metrics.queue_messages.set(self.queued as i64);
        async move { committer.commit().await }
            .into_actor(self)
            .map(move |res, act, ctx| {
                if let Err(e) = res {
                    // They stay in the store and are picked up again at the next start.
                    return error!(error = %e, "queue sync failed for notifications");
                }
                for (id, message) in notices {
                    act.schedule(id, Some(message));
                }
                act.pump(ctx);
            })
            .spawn(ctx);
    }

    /// A notification (null sender) that cannot be delivered goes to Badmail, never back out.
    fn badmail(&self, env: &Envelope, failed: &[usize], message: &[u8]) -> std::io::Result<()> {
        let mut reason = format!(
            "Queue ID: {}\r\nReason: a message from the null sender (a notification) could not be delivered\r\nArrival-Date: {}\r\n",
            env.id,
            rfc5322_date(env.received_at)
        );
        for r in failed.iter().filter_map(|&i| env.recipients.get(i)) {
            reason.push_str(&format!(
                "Recipient: {} -- {}\r\n",
                r.address,
                r.last.as_ref().map(|o| o.to_string()).unwrap_or_default()
            ));
        }
        let base = write_badmail(&self.settings.badmail_dir, &env.id.to_string(), message, &reason)?;
        self.metrics.badmail.get_or_create(&CauseLabel { cause: "undeliverable_notification" }).inc();
        warn!(id = env.id, file = %base, "undeliverable notification written to Badmail");
        Ok(())
    }

    /// Writes a new message (body, envelope) to the store; durable only after a commit.
    fn store_message(&mut self, msg: NewMessage) -> Result<(Envelope, Arc<Vec<u8>>), StoreError> {
        let id = self.store.next_id()?;
        let now = unix_now();
        let single = (msg.recipients.len() == 1).then(|| msg.recipients[0].0.clone());
        let header = received_header(&msg.origin, &self.settings.hostname, id, single.as_deref(), now);
        let mut message = Vec::with_capacity(header.len() + msg.body.len());
        message.extend_from_slice(header.as_bytes());
        message.extend_from_slice(&msg.body);
        drop(msg.body);
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
            size: message.len() as u64,
            received_at: now,
            source: source.into(),
            origin: msg.origin_text,
            next_attempt: None,
            dsn: msg.dsn,
            delay_notified: false,
            held: false,
        };
        if let Err(e) = self.store.insert(&env, &message, msg.pickup.as_ref()) {
            let _ = self.store.discard(&env, msg.pickup.as_ref());
            return Err(e);
        }
        Ok((env, Arc::new(message)))
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

    /// Queues the messages whose retry time has come; true when there may be more than fitted.
    fn take_due(&mut self, now: u64, ctx: &mut Context<Self>) -> bool {
        let room = self.settings.max_in_flight.saturating_mul(4).saturating_sub(self.ready.len());
        if room == 0 {
            return true;
        }
        let want = room + self.active.len();
        let more = match self.store.due(now, want) {
            Ok(ids) => {
                let more = ids.len() == want;
                for id in ids {
                    self.schedule(id, None);
                }
                more
            }
            Err(e) => {
                error!(error = %e, "cannot read the retry index");
                true
            }
        };
        self.pump(ctx);
        more
    }
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

impl Actor for Queue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.meter.started();
        // Writes are rare compared with the work they wait for; let sessions queue up.
        ctx.set_mailbox_capacity(1024);
        let store = self.store.clone();
        self.committer = Some(GroupCommit::spawn(
            "queue",
            move || store.sync().map_err(|e| std::io::Error::other(e.to_string())),
            self.metrics.queue_commit_batch.clone(),
        ));
        self.scheduler = Some(
            RetryScheduler::new(self.store.clone(), ctx.address().recipient(), self.metrics.actor("scheduler")).start(),
        );
        match self.store.envelopes() {
            Ok(envs) => {
                let now = unix_now();
                self.queued = envs.len();
                let mut resumed = 0;
                self.held = envs.iter().filter(|e| e.held).map(|e| e.id).collect();
                for env in envs.iter().filter(|e| !e.is_finished() && !e.held) {
                    // Messages waiting for a retry time are the scheduler's; the rest go now.
                    if env.next_attempt.is_none_or(|t| t <= now) {
                        resumed += 1;
                        self.schedule(env.id, None);
                    }
                }
                info!(resumed, queued = self.queued, held = self.held.len(), "queue opened");
            }
            Err(e) => error!(error = %e, "cannot list the queued messages"),
        }
        self.metrics.queue_messages.set(self.queued as i64);
        self.pump(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.meter.stopped();
        if let Err(e) = self.store.sync() {
            error!(error = %e, "final queue sync failed");
        }
    }
}

impl Handler<Enqueue> for Queue {
    type Result = ResponseActFuture<Self, Result<QueueId, EnqueueError>>;

    fn handle(&mut self, msg: Enqueue, _ctx: &mut Self::Context) -> Self::Result {
        let fail = |e: StoreError| {
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
        let source = match msg.origin {
            Origin::Smtp { .. } => "smtp",
            Origin::Pickup => "pickup",
            Origin::Local => "local",
        };
        let mark = msg.pickup.clone();
        let rcpt_dsn = msg.rcpt_dsn;
        let new = NewMessage {
            sender: msg.sender.as_ref().map(|s| s.to_string()),
            recipients: msg
                .recipients
                .iter()
                .enumerate()
                .map(|(i, r)| (r.to_string(), rcpt_dsn.get(i).cloned().unwrap_or_default()))
                .collect(),
            dsn: msg.dsn,
            body: msg.body,
            origin: msg.origin,
            origin_text: msg.origin_text,
            pickup: msg.pickup,
        };
        let (env, message) = match self.store_message(new) {
            Ok(stored) => stored,
            Err(e) => return Box::pin(actix::fut::ready(Err(fail(e)))),
        };
        let Some(committer) = self.committer.clone() else {
            return Box::pin(actix::fut::ready(Err(EnqueueError::Temporary)));
        };
        let (id, size) = (env.id, message.len() as u64);
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

impl Handler<RetryDue> for Queue {
    type Result = RetryBatch;

    fn handle(&mut self, msg: RetryDue, ctx: &mut Self::Context) -> RetryBatch {
        // The one message that reaches the Queue without passing its supervisor, which
        // measures all the others.
        let _handling = self.meter.handling();
        // The scheduler now sleeps on its own reading of the index.
        self.told_scheduler = None;
        RetryBatch { more: self.take_due(msg.now, ctx) }
    }
}

impl Handler<SetRouter> for Queue {
    type Result = ();

    fn handle(&mut self, msg: SetRouter, ctx: &mut Self::Context) {
        self.router = msg.0;
        // Recipients that waited for a route that now exists go at once.
        self.take_due(unix_now(), ctx);
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
                next_attempt_at(&s, attempts, t0, notified, now),
                want,
                "attempts {attempts}, notified {notified}, now +{}m",
                (now - t0) / 60
            );
        }
        assert_eq!(humanize(42), "42s");
        assert_eq!(humanize(5 * 60), "5m");
        assert_eq!(humanize(7500), "2h 5m");
        assert_eq!(humanize(5 * 86_400 + 3600), "5d 1h");
    }
}
