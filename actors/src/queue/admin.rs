//! The Queue's management messages, used by the admin API: list and show messages, retry now,
//! hold and release, bounce (NDR now), delete, a summary by state, and draining at shutdown.
//!
//! Invariants:
//! - A message being delivered right now cannot be held, bounced, deleted or retried
//!   ([`AdminError::Conflict`]): its results are about to be recorded, and they would race.
//! - A held message has no retry-index entry (so the scheduler never wakes for it) and is never
//!   dispatched; release puts its earliest pending retry time back (now, if already past).
//! - Bounce goes through the same recording path as a delivery actor's permanent failure, so the
//!   sender gets the same NDR (or Badmail for the null sender).

use std::borrow::Cow;
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::Queue;
use crate::clock::unix_now;
use crate::delivery::{replies, DeliveryReport, Outcome};
use crate::logsafe::LogSafe;
use crate::routes::domain_of;
use crate::store::{Envelope, QueueId, RcptStatus};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    NotFound,
    /// The request cannot be done in the message's current state.
    Conflict(String),
    Internal(String),
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminError::NotFound => f.write_str("no such message in the queue"),
            AdminError::Conflict(s) | AdminError::Internal(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecipientInfo {
    pub address: String,
    /// `pending`, `delivered` or `failed`.
    pub status: RcptStatus,
    pub attempts: u32,
    /// The last result as one line (`451 4.4.2 …`), for people and simple scripts.
    pub last_reply: Option<String>,
    /// The same result with its fields: class, code, enhanced code, text, remote MTA.
    pub last: Option<Outcome>,
    pub next_attempt: Option<u64>,
}

/// One message as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageInfo {
    pub id: QueueId,
    /// Empty for the null sender `<>`.
    pub sender: String,
    /// `active` (being delivered), `ready` (waiting for a delivery slot or its route),
    /// `deferred` (waiting for its retry time) or `held`.
    pub state: Cow<'static, str>,
    pub recipients: Vec<RecipientInfo>,
    /// The most attempts of any recipient.
    pub attempts: u32,
    /// Unix seconds.
    pub next_attempt: Option<u64>,
    pub size: u64,
    pub received_at: u64,
    pub age_seconds: u64,
    pub source: String,
    pub origin: String,
}

/// Messages by state, for `/api/status` and the queue-length metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, MessageResponse)]
pub struct QueueSummary {
    pub total: usize,
    pub active: usize,
    pub ready: usize,
    pub deferred: usize,
    pub held: usize,
    /// Set while the store cannot make anything durable (a write or sync failed, or a sync is
    /// stuck past its deadline): new mail is refused (452 4.3.1 or 451) until it is reopened.
    #[serde(default)]
    pub store_error: Option<String>,
    /// A sync hangs past its deadline: the store cannot be reopened in this process (the hung
    /// sync holds it), so the systemd watchdog is no longer notified and systemd restarts us.
    #[serde(default)]
    pub store_wedged: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `active`, `ready`, `deferred` or `held`.
    pub state: Option<String>,
    /// Messages with a pending recipient in this domain (case-insensitive).
    pub domain: Option<String>,
    /// Paging: messages with IDs above this one.
    pub after: Option<QueueId>,
    pub limit: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListPage {
    pub messages: Vec<MessageInfo>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next_after: Option<QueueId>,
}

pub const STATES: [&str; 4] = ["active", "ready", "deferred", "held"];

/// List messages. Walks the store, so its cost grows with the queue: an operator's tool.
#[derive(Message)]
#[rtype(result = "Result<ListPage, AdminError>")]
pub struct List(pub ListFilter);

#[derive(Message)]
#[rtype(result = "Result<MessageInfo, AdminError>")]
pub struct Show(pub QueueId);

/// Deliver the pending recipients now, whatever their retry time.
#[derive(Message)]
#[rtype(result = "Result<MessageInfo, AdminError>")]
pub struct RetryNow(pub QueueId);

/// [`RetryNow`] for every deferred message (with a pending recipient in `domain`, if given).
#[derive(Message)]
#[rtype(result = "Result<usize, AdminError>")]
pub struct RetryAll {
    pub domain: Option<String>,
}

#[derive(Message)]
#[rtype(result = "Result<MessageInfo, AdminError>")]
pub struct Hold(pub QueueId);

#[derive(Message)]
#[rtype(result = "Result<MessageInfo, AdminError>")]
pub struct Release(pub QueueId);

/// Fail every pending recipient now (5.0.0) and send the NDR.
#[derive(Message)]
#[rtype(result = "Result<(), AdminError>")]
pub struct Bounce(pub QueueId);

/// Remove the message without notifying anyone (Postfix `postsuper -d`).
#[derive(Message)]
#[rtype(result = "Result<(), AdminError>")]
pub struct Delete(pub QueueId);

#[derive(Message)]
#[rtype(result = "QueueSummary")]
pub struct Summary;

/// Shutdown: dispatch nothing more and wait (at most `grace`) for deliveries in flight. Answers
/// how many were still out; their recipients stay pending, as if not attempted.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Drain {
    pub grace: Duration,
}

impl Queue {
    fn state_of(&self, env: &Envelope, now: u64) -> &'static str {
        if env.held {
            "held"
        } else if self.outstanding.contains_key(&env.id) {
            "active"
        } else if env.next_attempt.is_some_and(|t| t > now) {
            "deferred"
        } else {
            "ready"
        }
    }

    fn info(&self, env: &Envelope, now: u64) -> MessageInfo {
        MessageInfo {
            id: env.id,
            sender: env.sender.clone(),
            state: Cow::Borrowed(self.state_of(env, now)),
            recipients: env
                .recipients
                .iter()
                .map(|r| RecipientInfo {
                    address: r.address.clone(),
                    status: r.status,
                    attempts: r.attempts,
                    last_reply: r.last.as_ref().map(|o| o.to_string()),
                    last: r.last.clone(),
                    next_attempt: r.next_attempt,
                })
                .collect(),
            attempts: env.recipients.iter().map(|r| r.attempts).max().unwrap_or(0),
            next_attempt: env.next_attempt,
            size: env.size,
            received_at: env.received_at,
            age_seconds: now.saturating_sub(env.received_at),
            source: env.source.clone(),
            origin: env.origin.clone(),
        }
    }

    fn load(&self, id: QueueId) -> Result<Envelope, AdminError> {
        match self.store.envelope(id) {
            Ok(Some(env)) => Ok(env),
            Ok(None) => Err(AdminError::NotFound),
            Err(e) => Err(AdminError::Internal(e.to_string())),
        }
    }

    /// The envelope, unless a delivery of it is in flight.
    fn load_idle(&self, id: QueueId, what: &str) -> Result<Envelope, AdminError> {
        let env = self.load(id)?;
        if self.outstanding.contains_key(&id) {
            return Err(AdminError::Conflict(format!(
                "message {id} is being delivered right now; {what} it once this attempt ends"
            )));
        }
        Ok(env)
    }

    /// Writes the envelope (whose stored retry time was `old_next`) and makes it durable before
    /// the operator is told it is done.
    fn save(&mut self, env: &Envelope, old_next: Option<u64>) -> Result<(), AdminError> {
        self.store.update(env, old_next).map_err(|e| AdminError::Internal(e.to_string()))?;
        self.store.sync().map_err(|e| AdminError::Internal(e.to_string()))
    }

    fn retry_now(&mut self, mut env: Envelope, ctx: &mut Context<Self>) -> Result<MessageInfo, AdminError> {
        if env.held {
            return Err(AdminError::Conflict(format!("message {} is on hold; release it instead", env.id)));
        }
        let old_next = make_due(&mut env);
        self.save(&env, old_next)?;
        self.schedule(env.id, None);
        self.pump(ctx);
        Ok(self.info(&env, unix_now()))
    }
}

impl Handler<List> for Queue {
    type Result = Result<ListPage, AdminError>;

    fn handle(&mut self, msg: List, _ctx: &mut Self::Context) -> Self::Result {
        let f = msg.0;
        if let Some(s) = &f.state {
            if !STATES.contains(&s.as_str()) {
                return Err(AdminError::Conflict(format!("unknown state {s:?}; one of {}", STATES.join(", "))));
            }
        }
        let limit = f.limit.clamp(1, 1000);
        let now = unix_now();
        let mut messages = Vec::new();
        let mut next_after = None;
        for env in self.store.envelopes_after(f.after.unwrap_or(0)) {
            let env = env.map_err(|e| AdminError::Internal(e.to_string()))?;
            if env.is_finished() {
                continue;
            }
            let info = self.info(&env, now);
            if f.state.as_deref().is_some_and(|s| s != info.state) {
                continue;
            }
            if let Some(d) = &f.domain {
                let matches = env
                    .recipients
                    .iter()
                    .any(|r| r.status == RcptStatus::Pending && domain_of(&r.address).eq_ignore_ascii_case(d));
                if !matches {
                    continue;
                }
            }
            if messages.len() == limit {
                next_after = messages.last().map(|m: &MessageInfo| m.id);
                break;
            }
            messages.push(info);
        }
        Ok(ListPage { messages, next_after })
    }
}

impl Handler<Show> for Queue {
    type Result = Result<MessageInfo, AdminError>;

    fn handle(&mut self, msg: Show, _ctx: &mut Self::Context) -> Self::Result {
        let env = self.load(msg.0)?;
        Ok(self.info(&env, unix_now()))
    }
}

impl Handler<RetryNow> for Queue {
    type Result = Result<MessageInfo, AdminError>;

    fn handle(&mut self, msg: RetryNow, ctx: &mut Self::Context) -> Self::Result {
        let env = self.load_idle(msg.0, "retry")?;
        info!(id = msg.0, "retry now (admin)");
        self.retry_now(env, ctx)
    }
}

impl Handler<RetryAll> for Queue {
    type Result = ResponseActFuture<Self, Result<usize, AdminError>>;

    fn handle(&mut self, msg: RetryAll, ctx: &mut Self::Context) -> Self::Result {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = RetryAllJob { domain: msg.domain, now: unix_now(), after: 0, count: 0, reply };
        self.retry_all_slice(job, ctx);
        Box::pin(
            async move { answer.await.unwrap_or_else(|_| Err(AdminError::Internal("the queue restarted".into()))) }
                .into_actor(self),
        )
    }
}

/// Makes a message's pending recipients due now (retry now, retry all); returns the retry time it
/// had, which the store needs to move its retry-index entry.
fn make_due(env: &mut Envelope) -> Option<u64> {
    for r in env.recipients.iter_mut().filter(|r| r.status == RcptStatus::Pending) {
        r.next_attempt = None;
    }
    env.next_attempt.take()
}

/// Envelopes looked at per slice of a retry-all: the Queue handles other messages (new mail
/// first of all) between slices, so a queue-wide retry never stalls intake.
const RETRY_ALL_SLICE: usize = 256;

/// A retry-all under way: where it is in the store, and whom to tell at the end.
struct RetryAllJob {
    domain: Option<String>,
    now: u64,
    /// The last envelope ID looked at.
    after: QueueId,
    count: usize,
    reply: tokio::sync::oneshot::Sender<Result<usize, AdminError>>,
}

impl Queue {
    /// One slice: makes up to [`RETRY_ALL_SLICE`] deferred messages due now (written, not yet
    /// synced), commits them with the group commit off the Queue's thread, then queues them for
    /// delivery and goes on with the next slice as a new task.
    fn retry_all_slice(&mut self, mut job: RetryAllJob, ctx: &mut Context<Self>) {
        let mut chosen = Vec::new();
        let mut seen = 0;
        for env in self.store.envelopes_after(job.after) {
            let mut env = match env {
                Ok(env) => env,
                Err(e) => {
                    let _ = job.reply.send(Err(AdminError::Internal(e.to_string())));
                    return;
                }
            };
            seen += 1;
            job.after = env.id;
            let in_domain = |a: &str| job.domain.as_deref().is_none_or(|d| domain_of(a).eq_ignore_ascii_case(d));
            let eligible = !env.held
                && env.next_attempt.is_some_and(|t| t > job.now)
                && !self.outstanding.contains_key(&env.id)
                && env.recipients.iter().any(|r| r.status == RcptStatus::Pending && in_domain(&r.address));
            if eligible {
                let old_next = make_due(&mut env);
                if let Err(e) = self.store.update(&env, old_next) {
                    let _ = job.reply.send(Err(AdminError::Internal(e.to_string())));
                    return;
                }
                chosen.push(env.id);
            }
            if seen >= RETRY_ALL_SLICE {
                break;
            }
        }
        let finished = seen < RETRY_ALL_SLICE;
        job.count += chosen.len();
        let Some(committer) = self.committer.clone() else {
            let _ = job.reply.send(Err(AdminError::Internal("the queue is not running".into())));
            return;
        };
        async move { committer.commit().await }
            .into_actor(self)
            .map(move |res, act, ctx| {
                if let Err(e) = res {
                    let _ = job.reply.send(Err(AdminError::Internal(e.to_string())));
                    return;
                }
                for id in chosen {
                    act.schedule(id, None);
                }
                act.pump(ctx);
                if finished {
                    info!(messages = job.count, domain = job.domain.as_deref().unwrap_or("*"), "retry all (admin)");
                    let _ = job.reply.send(Ok(job.count));
                } else {
                    act.next_retry_all_slice(job, ctx);
                }
            })
            .spawn(ctx);
    }

    /// The next slice once the messages already made due are mostly on their way: the retry
    /// goes at the pace of delivery, and its writes never crowd out those of new mail.
    fn next_retry_all_slice(&mut self, job: RetryAllJob, ctx: &mut Context<Self>) {
        if self.ready.len() >= self.settings.max_in_flight.saturating_mul(2) {
            ctx.run_later(Duration::from_millis(10), move |act, ctx| act.next_retry_all_slice(job, ctx));
        } else {
            self.retry_all_slice(job, ctx);
        }
    }
}

impl Handler<Hold> for Queue {
    type Result = Result<MessageInfo, AdminError>;

    fn handle(&mut self, msg: Hold, _ctx: &mut Self::Context) -> Self::Result {
        let mut env = self.load_idle(msg.0, "hold")?;
        if !env.held {
            let old_next = env.next_attempt;
            env.held = true;
            env.next_attempt = None;
            self.save(&env, old_next)?;
            self.held.insert(env.id);
            info!(id = env.id, "message put on hold (admin)");
        }
        Ok(self.info(&env, unix_now()))
    }
}

impl Handler<Release> for Queue {
    type Result = Result<MessageInfo, AdminError>;

    fn handle(&mut self, msg: Release, ctx: &mut Self::Context) -> Self::Result {
        let mut env = self.load(msg.0)?;
        if env.held {
            let now = unix_now();
            env.held = false;
            env.next_attempt = env
                .recipients
                .iter()
                .filter(|r| r.status == RcptStatus::Pending)
                .filter_map(|r| r.next_attempt)
                .min()
                .filter(|t| *t > now);
            self.save(&env, None)?;
            self.held.remove(&env.id);
            match env.next_attempt {
                Some(at) => self.tell_scheduler(at, now),
                None => {
                    self.schedule(env.id, None);
                    self.pump(ctx);
                }
            }
            info!(id = env.id, "message released (admin)");
        }
        Ok(self.info(&env, unix_now()))
    }
}

impl Handler<Bounce> for Queue {
    type Result = Result<(), AdminError>;

    fn handle(&mut self, msg: Bounce, ctx: &mut Self::Context) -> Self::Result {
        let env = self.load_idle(msg.0, "bounce")?;
        let pending: Vec<usize> = env
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.status == RcptStatus::Pending)
            .map(|(i, _)| i)
            .collect();
        if pending.is_empty() {
            return Err(AdminError::Conflict(format!("message {} has no pending recipient", msg.0)));
        }
        warn!(id = msg.0, recipients = pending.len(), "message bounced (admin)");
        self.held.remove(&msg.0);
        let report = DeliveryReport::all(pending, replies::returned_by_admin());
        self.record(msg.0, "admin", report, ctx);
        // The NDR and the new state must be on disk before the operator is told it is done.
        self.store.sync().map_err(|e| AdminError::Internal(e.to_string()))
    }
}

impl Handler<Delete> for Queue {
    type Result = Result<(), AdminError>;

    fn handle(&mut self, msg: Delete, _ctx: &mut Self::Context) -> Self::Result {
        let env = self.load_idle(msg.0, "delete")?;
        self.store.remove(env.id, env.next_attempt).map_err(|e| AdminError::Internal(e.to_string()))?;
        self.store.sync().map_err(|e| AdminError::Internal(e.to_string()))?;
        self.held.remove(&env.id);
        self.queued = self.queued.saturating_sub(1);
        self.metrics.queue_messages.set(self.queued as i64);
        let pending = env.recipients.iter().filter(|r| r.status == RcptStatus::Pending).count();
        warn!(id = env.id, sender = %LogSafe(&env.sender), pending, "message deleted (admin)");
        Ok(())
    }
}

impl Handler<Summary> for Queue {
    type Result = QueueSummary;

    fn handle(&mut self, _msg: Summary, _ctx: &mut Self::Context) -> QueueSummary {
        let (_, deferred) = self.store.retry_counts(unix_now()).unwrap_or_default();
        let active = self.outstanding.len();
        let held = self.held.len();
        let wedged = self.committer.as_ref().is_some_and(|c| c.stuck());
        QueueSummary {
            total: self.queued,
            active,
            deferred,
            held,
            ready: self.queued.saturating_sub(active + deferred + held),
            store_error: if wedged {
                Some("the queue store's sync is stuck (a failing disk?); new mail gets 451".to_string())
            } else if let Some(why) = self.health.failing() {
                Some(format!("{why}; new mail is refused, reopening the store every 5 s"))
            } else if self.health.room() == 0 {
                Some(format!(
                    "free space in {} is below [queue] min_free_space ({} bytes); new mail gets 452 4.3.1",
                    self.health.dir().display(),
                    self.health.reserve()
                ))
            } else {
                None
            },
            store_wedged: wedged,
        }
    }
}

impl Handler<Drain> for Queue {
    type Result = ResponseActFuture<Self, usize>;

    fn handle(&mut self, msg: Drain, _ctx: &mut Self::Context) -> Self::Result {
        self.draining = true;
        info!(in_flight = self.in_flight, "queue draining: no new deliveries");
        if self.in_flight == 0 {
            return Box::pin(actix::fut::ready(0));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.drained.push(tx);
        Box::pin(
            actix::fut::wrap_future::<_, Self>(tokio::time::timeout(msg.grace, rx)).map(|_, act, _ctx| act.in_flight),
        )
    }
}
