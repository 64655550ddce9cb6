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
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::Queue;
use crate::clock::unix_now;
use crate::delivery::{replies, DeliveryReport, Outcome};
use crate::logsafe::LogSafe;
use crate::routes::domain_of;
use crate::store::{Claim, Envelope, QueueId, QueueStore, RcptStatus};

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
    /// Messages whose sender contains this (case-insensitive; `<>` for the null sender).
    pub sender: Option<String>,
    /// Messages with a recipient (any state) containing this (case-insensitive).
    pub recipient: Option<String>,
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

/// The state of a message as the admin API names it; `busy`: being delivered here.
fn state_of(env: &Envelope, busy: bool, now: u64) -> &'static str {
    if env.held {
        "held"
    } else if busy {
        "active"
    } else if env.next_attempt.is_some_and(|t| t > now) {
        "deferred"
    } else {
        "ready"
    }
}

fn info(env: &Envelope, busy: bool, now: u64) -> MessageInfo {
    MessageInfo {
        id: env.id,
        sender: env.sender.clone(),
        state: Cow::Borrowed(state_of(env, busy, now)),
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

fn internal(e: impl std::fmt::Display) -> AdminError {
    AdminError::Internal(e.to_string())
}

type AdminFuture<T> = ResponseActFuture<Queue, Result<T, AdminError>>;

fn answer<T: 'static>(r: Result<T, AdminError>) -> AdminFuture<T> {
    Box::pin(actix::fut::ready(r))
}

impl Queue {
    fn info(&self, env: &Envelope, now: u64) -> MessageInfo {
        info(env, self.outstanding.contains_key(&env.id), now)
    }

    /// A message's envelope: the Queue's own copy while it works on the message (the newer one),
    /// else the store's.
    pub(super) fn envelope_of(&self, id: QueueId) -> AdminFuture<Envelope> {
        let read = self.store.envelope(id);
        self.own_copy_or(id, Box::pin(async move { Ok(read.await?.map_or(Claim::Missing, Claim::Taken)) }))
    }

    /// A message an operator acts on: the Queue's own copy while it works on it, else taken from
    /// the store for this node (refused while another node delivers it). Unless the action
    /// ends with the message delivered here or gone, give it back with `release`.
    fn claim_of(&self, id: QueueId) -> AdminFuture<Envelope> {
        self.own_copy_or(id, self.store.claim(id))
    }

    /// The Queue's copy of `id` if it works on it (also when it took it up while `from_store`
    /// ran), else what `from_store` says.
    fn own_copy_or(&self, id: QueueId, from_store: crate::store::StoreFuture<Claim>) -> AdminFuture<Envelope> {
        if let Some(env) = self.active.get(&id) {
            return answer(Ok(env.clone()));
        }
        Box::pin(from_store.into_actor(self).map(move |res, act, _| {
            if let Some(env) = act.active.get(&id) {
                return Ok(env.clone());
            }
            match res {
                Ok(Claim::Taken(env)) => Ok(env),
                Ok(Claim::Missing) => Err(AdminError::NotFound),
                Ok(Claim::Busy(node)) => Err(AdminError::Conflict(format!(
                    "message {id} is being delivered by node {node:?} right now; try again once this attempt ends"
                ))),
                Err(e) => Err(internal(e)),
            }
        }))
    }

    /// Gives back a message claimed for an action, unless the Queue works on it.
    fn give_back(&self, id: QueueId) {
        if !self.active.contains_key(&id) {
            self.store.release(id);
        }
    }

    /// Fails unless the message can be changed now: not while a delivery of it is in flight.
    fn idle(&self, id: QueueId, what: &str) -> Result<(), AdminError> {
        if self.outstanding.contains_key(&id) {
            return Err(AdminError::Conflict(format!(
                "message {id} is being delivered right now; {what} it once this attempt ends"
            )));
        }
        Ok(())
    }

    /// Writes the envelope (whose stored retry time was `old_next`), in the Queue's own copy too
    /// if it has one, and answers once it is durable: the operator is told only then.
    fn save(&mut self, env: &Envelope, old_next: Option<u64>) -> AdminFuture<()> {
        if let Err(e) = self.store.update(env, old_next) {
            return answer(Err(internal(e)));
        }
        if let Some(mine) = self.active.get_mut(&env.id) {
            *mine = env.clone();
        }
        self.durable()
    }

    /// Answers once everything written so far is durable.
    pub(super) fn durable(&mut self) -> AdminFuture<()> {
        let Some(committer) = self.committer.clone() else {
            return answer(Err(AdminError::Internal("the queue is not running".into())));
        };
        Box::pin(async move { committer.commit().await.map_err(internal) }.into_actor(self))
    }

    fn retry_now(&mut self, mut env: Envelope) -> AdminFuture<MessageInfo> {
        if env.held {
            return answer(Err(AdminError::Conflict(format!("message {} is on hold; release it instead", env.id))));
        }
        let old_next = make_due(&mut env);
        Box::pin(self.save(&env, old_next).map(move |res, act, ctx| {
            res?;
            let info = act.info(&env, unix_now());
            act.schedule(env, None);
            act.pump(ctx);
            Ok(info)
        }))
    }
}

impl Handler<List> for Queue {
    type Result = ResponseActFuture<Self, Result<ListPage, AdminError>>;

    fn handle(&mut self, msg: List, _ctx: &mut Self::Context) -> Self::Result {
        let f = msg.0;
        if let Some(s) = &f.state {
            if !STATES.contains(&s.as_str()) {
                return answer(Err(AdminError::Conflict(format!("unknown state {s:?}; one of {}", STATES.join(", ")))));
            }
        }
        // What is being delivered here now; the walk runs off the Queue's thread, a page at a time.
        let busy: HashSet<QueueId> = self.outstanding.keys().copied().collect();
        let walk = list_walk(self.store.clone(), f, busy, unix_now(), LIST_SCAN);
        Box::pin(off_queue(walk).into_actor(self))
    }
}

/// One page of the list: messages matching `f` after `f.after`, looking at `scan` envelopes at
/// most — a filter that matches little must not walk a huge queue in one request, so the page
/// then ends short, with where to go on from.
async fn list_walk(
    store: Arc<dyn QueueStore>,
    f: ListFilter,
    busy: HashSet<QueueId>,
    now: u64,
    scan: usize,
) -> Result<ListPage, AdminError> {
    // However many operators or scripts list at once, at most two walks run: the rest wait
    // their turn rather than take every core from the mail.
    let _turn = LIST_WALKS.acquire().await.map_err(internal)?;
    let limit = f.limit.clamp(1, 1000);
    let mut messages = Vec::new();
    let mut after = f.after.unwrap_or(0);
    let mut scanned = 0;
    loop {
        if scanned >= scan {
            return Ok(ListPage { messages, next_after: Some(after) });
        }
        // The first read asks for one more than the page (enough when nothing is filtered out:
        // a page of 100 reads 101 envelopes, not 500); later reads take 500.
        let want = if scanned == 0 { (limit + 1).min(LIST_PAGE) } else { LIST_PAGE }.min(scan - scanned);
        let page = store.page(after, want).await.map_err(internal)?;
        let last_page = page.len() < want;
        scanned += page.len();
        for env in page {
            after = env.id;
            let busy = busy.contains(&env.id);
            // The view is built only for what is shown.
            if env.is_finished() || !f.matches(&env, busy, now) {
                continue;
            }
            if messages.len() == limit {
                let next_after = messages.last().map(|m: &MessageInfo| m.id);
                return Ok(ListPage { messages, next_after });
            }
            messages.push(info(&env, busy, now));
        }
        if last_page {
            return Ok(ListPage { messages, next_after: None });
        }
    }
}

impl ListFilter {
    /// Whether `env` is one the filter asks for (`busy`: being delivered here).
    fn matches(&self, env: &Envelope, busy: bool, now: u64) -> bool {
        fn wanted(given: &Option<String>) -> Option<&str> {
            given.as_deref().filter(|s| !s.is_empty())
        }
        if self.state.as_deref().is_some_and(|s| s != state_of(env, busy, now)) {
            return false;
        }
        if let Some(want) = wanted(&self.sender) {
            let ok = if want == "<>" { env.sender.is_empty() } else { contains_ignoring_case(&env.sender, want) };
            if !ok {
                return false;
            }
        }
        if let Some(want) = wanted(&self.recipient) {
            if !env.recipients.iter().any(|r| contains_ignoring_case(&r.address, want)) {
                return false;
            }
        }
        if let Some(d) = wanted(&self.domain) {
            let pending_there = env
                .recipients
                .iter()
                .any(|r| r.status == RcptStatus::Pending && domain_of(&r.address).eq_ignore_ascii_case(d));
            if !pending_there {
                return false;
            }
        }
        true
    }
}

/// `needle` (not empty) in `hay`, ASCII letters of either case alike; no copy of either.
fn contains_ignoring_case(hay: &str, needle: &str) -> bool {
    hay.as_bytes().windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Runs an admin read on a blocking thread. sled reads (and envelopes are parsed) when a read is
/// asked for, on the asking thread: off the Queue's, listing a large queue or reading a spooled
/// body never holds up the Queue's own work (new mail first). PostgreSQL's reads run on its own
/// runtime anyway; waiting for them here costs a blocking thread, not the Queue.
fn off_queue<T: Send + 'static>(
    read: impl std::future::Future<Output = Result<T, AdminError>> + Send + 'static,
) -> impl std::future::Future<Output = Result<T, AdminError>> {
    let runtime = tokio::runtime::Handle::current();
    async move {
        tokio::task::spawn_blocking(move || runtime.block_on(read))
            .await
            .unwrap_or_else(|e| Err(internal(format!("the admin read failed: {e}"))))
    }
}

/// Envelopes read from the store at once when listing.
const LIST_PAGE: usize = 500;

/// List walks running at once, at most (all Queues of the process together).
static LIST_WALKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Envelopes one list request looks at, at most (a page may then be short, with `next_after`).
const LIST_SCAN: usize = 20_000;

/// The header section of one message (at most [`HEADERS_MAX`] bytes of it), for the console's
/// message detail: read from the store without the rest of the body.
#[derive(Message)]
#[rtype(result = "Result<String, AdminError>")]
pub struct Headers(pub QueueId);

pub const HEADERS_MAX: usize = 64 * 1024;

impl Handler<Headers> for Queue {
    type Result = ResponseActFuture<Self, Result<String, AdminError>>;

    fn handle(&mut self, msg: Headers, _ctx: &mut Self::Context) -> Self::Result {
        let store = self.store.clone();
        let read = async move {
            let head = store.body_head(msg.0, HEADERS_MAX).await.map_err(internal)?;
            if head.is_empty() {
                return Err(AdminError::NotFound);
            }
            Ok(String::from_utf8_lossy(crate::notify::header_block(&head)).into_owned())
        };
        Box::pin(off_queue(read).into_actor(self))
    }
}

impl Handler<Show> for Queue {
    type Result = ResponseActFuture<Self, Result<MessageInfo, AdminError>>;

    fn handle(&mut self, msg: Show, _ctx: &mut Self::Context) -> Self::Result {
        Box::pin(self.envelope_of(msg.0).map(|res, act, _| res.map(|env| act.info(&env, unix_now()))))
    }
}

impl Handler<RetryNow> for Queue {
    type Result = ResponseActFuture<Self, Result<MessageInfo, AdminError>>;

    fn handle(&mut self, msg: RetryNow, _ctx: &mut Self::Context) -> Self::Result {
        let id = msg.0;
        Box::pin(self.claim_of(id).then(move |res, act, _ctx| {
            let env = match res.and_then(|env| act.idle(id, "retry").map(|()| env)) {
                Ok(env) => env,
                Err(e) => return answer(Err(e)),
            };
            info!(id, "retry now (admin)");
            act.retry_now(env)
        }))
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
    /// One slice: reads up to [`RETRY_ALL_SLICE`] envelopes, makes the deferred ones due now
    /// (written, not yet synced), commits them with the group commit off the Queue's thread, then
    /// queues them for delivery and goes on with the next slice as a new task.
    fn retry_all_slice(&mut self, job: RetryAllJob, ctx: &mut Context<Self>) {
        self.store
            .page(job.after, RETRY_ALL_SLICE)
            .into_actor(self)
            .map(move |res, act, ctx| act.retry_all_page(job, res, ctx))
            .spawn(ctx);
    }

    fn retry_all_page(
        &mut self,
        mut job: RetryAllJob,
        page: crate::store::Result<Vec<Envelope>>,
        ctx: &mut Context<Self>,
    ) {
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                let _ = job.reply.send(Err(internal(e)));
                return;
            }
        };
        let finished = page.len() < RETRY_ALL_SLICE;
        let mut chosen = Vec::new();
        for mut env in page {
            job.after = env.id;
            let in_domain = |a: &str| job.domain.as_deref().is_none_or(|d| domain_of(a).eq_ignore_ascii_case(d));
            // The messages the Queue works on are on their way already.
            let eligible = !env.held
                && env.next_attempt.is_some_and(|t| t > job.now)
                && !self.active.contains_key(&env.id)
                && env.recipients.iter().any(|r| r.status == RcptStatus::Pending && in_domain(&r.address));
            if eligible {
                let old_next = make_due(&mut env);
                if let Err(e) = self.store.update(&env, old_next) {
                    let _ = job.reply.send(Err(internal(e)));
                    return;
                }
                chosen.push(env);
            }
        }
        job.count += chosen.len();
        let Some(committer) = self.committer.clone() else {
            let _ = job.reply.send(Err(AdminError::Internal("the queue is not running".into())));
            return;
        };
        async move { committer.commit().await }
            .into_actor(self)
            .map(move |res, act, ctx| {
                if let Err(e) = res {
                    let _ = job.reply.send(Err(internal(e)));
                    return;
                }
                for env in chosen {
                    act.schedule(env, None);
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
    type Result = ResponseActFuture<Self, Result<MessageInfo, AdminError>>;

    fn handle(&mut self, msg: Hold, _ctx: &mut Self::Context) -> Self::Result {
        let id = msg.0;
        Box::pin(self.claim_of(id).then(move |res, act, _ctx| {
            let mut env = match res.and_then(|env| act.idle(id, "hold").map(|()| env)) {
                Ok(env) => env,
                Err(e) => return answer(Err(e)),
            };
            if env.held {
                act.give_back(id);
                return answer(Ok(act.info(&env, unix_now())));
            }
            let old_next = env.next_attempt;
            env.held = true;
            env.next_attempt = None;
            act.held.insert(id);
            act.give_back(id);
            Box::pin(act.save(&env, old_next).map(move |res, act, _| {
                res?;
                info!(id, "message put on hold (admin)");
                Ok(act.info(&env, unix_now()))
            }))
        }))
    }
}

impl Handler<Release> for Queue {
    type Result = ResponseActFuture<Self, Result<MessageInfo, AdminError>>;

    fn handle(&mut self, msg: Release, _ctx: &mut Self::Context) -> Self::Result {
        let id = msg.0;
        Box::pin(self.claim_of(id).then(move |res, act, _ctx| {
            let mut env = match res {
                Ok(env) => env,
                Err(e) => return answer(Err(e)),
            };
            if !env.held {
                act.give_back(id);
                return answer(Ok(act.info(&env, unix_now())));
            }
            let now = unix_now();
            env.held = false;
            env.next_attempt = env
                .recipients
                .iter()
                .filter(|r| r.status == RcptStatus::Pending)
                .filter_map(|r| r.next_attempt)
                .min()
                .filter(|t| *t > now);
            Box::pin(act.save(&env, None).map(move |res, act, ctx| {
                res?;
                act.held.remove(&id);
                let info = act.info(&env, unix_now());
                match env.next_attempt {
                    Some(at) => {
                        act.give_back(id);
                        act.tell_scheduler(at, now)
                    }
                    None => {
                        act.schedule(env, None);
                        act.pump(ctx);
                    }
                }
                info!(id, "message released (admin)");
                Ok(info)
            }))
        }))
    }
}

impl Handler<Bounce> for Queue {
    type Result = ResponseActFuture<Self, Result<(), AdminError>>;

    fn handle(&mut self, msg: Bounce, _ctx: &mut Self::Context) -> Self::Result {
        let id = msg.0;
        let body = self.store.body(id);
        Box::pin(self.claim_of(id).then(move |res, act, _ctx| {
            let env = match res.and_then(|env| act.idle(id, "bounce").map(|()| env)) {
                Ok(env) => env,
                Err(e) => return answer(Err(e)),
            };
            let pending: Vec<usize> = env
                .recipients
                .iter()
                .enumerate()
                .filter(|(_, r)| r.status == RcptStatus::Pending)
                .map(|(i, _)| i)
                .collect();
            if pending.is_empty() {
                act.give_back(id);
                return answer(Err(AdminError::Conflict(format!("message {id} has no pending recipient"))));
            }
            // The report returns the message (or its headers): read it first.
            Box::pin(body.into_actor(act).then(move |body, act, ctx| {
                let body = match body {
                    Ok(b) => b,
                    Err(e) => {
                        act.give_back(id);
                        return answer(Err(internal(e)));
                    }
                };
                // Checked again: a delivery may have started while the body was read.
                if let Err(e) = act.idle(id, "bounce") {
                    return answer(Err(e));
                }
                let env = act.active.remove(&id).unwrap_or(env);
                warn!(id, recipients = pending.len(), "message bounced (admin)");
                act.held.remove(&id);
                let report = DeliveryReport::all(pending, replies::returned_by_admin());
                act.record(env, "admin", report, &body, ctx);
                act.store.release(id);
                // The NDR and the new state must be on disk before the operator is told it is done.
                act.durable()
            }))
        }))
    }
}

impl Handler<Delete> for Queue {
    type Result = ResponseActFuture<Self, Result<(), AdminError>>;

    fn handle(&mut self, msg: Delete, _ctx: &mut Self::Context) -> Self::Result {
        let id = msg.0;
        Box::pin(self.claim_of(id).then(move |res, act, _ctx| {
            let env = match res.and_then(|env| act.idle(id, "delete").map(|()| env)) {
                Ok(env) => env,
                Err(e) => return answer(Err(e)),
            };
            if let Err(e) = act.store.remove(env.id, env.next_attempt) {
                return answer(Err(internal(e)));
            }
            act.active.remove(&id);
            act.held.remove(&id);
            act.queued = act.queued.saturating_sub(1);
            act.metrics.queue_messages.set(act.queued as i64);
            let pending = env.recipients.iter().filter(|r| r.status == RcptStatus::Pending).count();
            warn!(id, sender = %LogSafe(&env.sender), pending, "message deleted (admin)");
            act.durable()
        }))
    }
}

impl Handler<Summary> for Queue {
    type Result = ResponseActFuture<Self, QueueSummary>;

    fn handle(&mut self, _msg: Summary, _ctx: &mut Self::Context) -> Self::Result {
        Box::pin(self.store.counts(unix_now()).into_actor(self).map(|counts, act, _| {
            let counts = counts.unwrap_or_default();
            // A shared store counts every node's messages: the gauge follows it.
            if let Some(total) = counts.total {
                act.queued = total;
                act.metrics.queue_messages.set(total as i64);
            }
            let active = act.outstanding.len();
            let total = counts.total.unwrap_or(act.queued);
            let held = counts.held.unwrap_or(act.held.len());
            let deferred = counts.deferred;
            let wedged = act.committer.as_ref().is_some_and(|c| c.stuck());
            QueueSummary {
                total,
                active,
                deferred,
                held,
                ready: total.saturating_sub(active + deferred + held),
                store_error: if wedged {
                    Some("the queue store's sync is stuck (a failing disk?); new mail gets 451".to_string())
                } else if let Some(why) = act.health.failing() {
                    Some(format!("{why}; new mail is refused, reopening the store every 5 s"))
                } else if act.health.room() == 0 {
                    Some(format!(
                        "free space in {} is below [queue] min_free_space ({} bytes); new mail gets 452 4.3.1",
                        act.health.dir().display(),
                        act.health.reserve()
                    ))
                } else {
                    None
                },
                store_wedged: wedged,
            }
        }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{test_envelope, SledStore};

    fn filter(state: Option<&str>, domain: Option<&str>, sender: Option<&str>, recipient: Option<&str>) -> ListFilter {
        let own = |v: Option<&str>| v.map(str::to_string);
        ListFilter {
            state: own(state),
            domain: own(domain),
            sender: own(sender),
            recipient: own(recipient),
            after: None,
            limit: 100,
        }
    }

    #[test]
    fn what_each_filter_matches() {
        let now = 1_000;
        let deferred = test_envelope(1, "Alice@Example.test", "bob@Far.test", Some(now + 60));
        let null_sender = test_envelope(2, "", "carol@near.test", None);
        let mut held = test_envelope(3, "dave@example.test", "erin@far.test", None);
        held.held = true;
        let mut delivered_there = test_envelope(4, "x@example.test", "frank@far.test", None);
        delivered_there.recipients[0].status = RcptStatus::Delivered;
        // (filter, busy, which of the four it takes)
        let cases = [
            (filter(None, None, None, None), false, [true, true, true, true]),
            (filter(Some("deferred"), None, None, None), false, [true, false, false, false]),
            (filter(Some("ready"), None, None, None), false, [false, true, false, true]),
            (filter(Some("held"), None, None, None), false, [false, false, true, false]),
            (filter(Some("active"), None, None, None), true, [true, true, false, true]),
            (filter(None, None, Some("alice@EXAMPLE"), None), false, [true, false, false, false]),
            (filter(None, None, Some("<>"), None), false, [false, true, false, false]),
            (filter(None, None, Some(""), None), false, [true, true, true, true]),
            (filter(None, None, None, Some("FAR.test")), false, [true, false, true, true]),
            (filter(None, Some("far.test"), None, None), false, [true, false, true, false]),
            (filter(None, Some("far"), None, None), false, [false, false, false, false]),
            (filter(None, Some("far.test"), Some("alice"), Some("bob")), false, [true, false, false, false]),
            (filter(None, None, Some("a much longer needle than any sender here"), None), false, [false; 4]),
        ];
        for (f, busy, want) in cases {
            let got = [&deferred, &null_sender, &held, &delivered_there].map(|e| f.matches(e, busy, now));
            assert_eq!(got, want, "{f:?} busy={busy}");
        }
    }

    /// Paging: pages of `limit`, and a filter that matches little stops after `scan` envelopes
    /// with where to go on from — walked to the end, it finds each match once.
    #[tokio::test]
    async fn pages_and_bounded_scans() {
        let dir = tempfile::tempdir().unwrap();
        let sled = SledStore::open(dir.path(), 0).unwrap();
        let mut ids = Vec::new();
        for i in 0..50u64 {
            let id = sled.next_id().unwrap();
            let sender = if i % 10 == 0 { "rare@example.test" } else { "common@example.test" };
            sled.insert(&test_envelope(id, sender, "to@far.test", None), b"x", None).unwrap();
            ids.push(id);
        }
        sled.sync().unwrap();
        let store: Arc<dyn QueueStore> = Arc::new(sled);
        let walk = |f: ListFilter, scan| list_walk(store.clone(), f, HashSet::new(), 0, scan);

        // Unfiltered: 20 a page, next_after the last shown.
        let mut f = filter(None, None, None, None);
        f.limit = 20;
        let page = walk(f.clone(), LIST_SCAN).await.unwrap();
        assert_eq!(page.messages.iter().map(|m| m.id).collect::<Vec<_>>(), ids[..20]);
        assert_eq!(page.next_after, Some(ids[19]));
        f.after = Some(ids[39]);
        let page = walk(f, LIST_SCAN).await.unwrap();
        assert_eq!(page.messages.len(), 10);
        assert_eq!(page.next_after, None, "the last page");

        // Five rare senders, looked for 12 envelopes at a time: short pages, then the end.
        let mut f = filter(None, None, Some("rare"), None);
        let (mut found, mut requests) = (Vec::new(), 0);
        loop {
            requests += 1;
            let page = walk(f.clone(), 12).await.unwrap();
            found.extend(page.messages.iter().map(|m| m.id));
            match page.next_after {
                Some(next) => f.after = Some(next),
                None => break,
            }
        }
        let rare: Vec<u64> = ids.iter().step_by(10).copied().collect();
        assert_eq!(found, rare);
        assert_eq!(requests, 5, "each request read 12 envelopes at most: 12, 24, 36, 48, then the last 2");
    }
}
