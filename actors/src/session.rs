//! The Session actor (one per SMTP connection) and the small I/O task that owns its socket.
//!
//! The I/O task reads bytes, sends them to the actor as [`Input`] and waits for the [`Output`]
//! (reply bytes, whether to close or start TLS, how long to wait first) before reading again.
//! Waiting gives backpressure and keeps replies in order under PIPELINING; owning the socket in
//! one task makes STARTTLS a local change: write the 220, hand the TCP stream to the TLS
//! acceptor, go on reading from the TLS stream. The actor holds the sans-IO
//! [`protocol::Session`], checks AUTH credentials and talks to the Queue.
//!
//! Invariants:
//! - After STARTTLS nothing read in clear text is used: the protocol drops its buffer when it
//!   asks for TLS, and the I/O task reads nothing between the 220 and the handshake.
//! - Each reply that follows a client error waits `error_delay` × the errors so far (at most
//!   `MAX_ERROR_DELAY`): the tarpit that slows down guessing and scanning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use crate::auth::{AuthFailures, Users};
use crate::fsio::blocking;
use crate::logsafe::LogSafe;
use crate::metrics::{ActorMeter, Metrics, ResultLabel};
use crate::protocol::received::Origin;
use crate::protocol::{self, Action, EnqueueError};
pub use crate::protolog::ProtocolLog;
use crate::queue::Enqueue;
use crate::sessions::SessionEntry;
use crate::store::{QueueStore, SpoolWriter, StagedBody};

/// Bodies are written to their spool file in pieces of at least this size (plus at most one
/// read); a message smaller than this never gets a spool file and goes whole to the Queue.
pub const STREAM_PIECE: usize = 64 * 1024;

/// The first bytes of a connection: the greeting.
#[derive(Message)]
#[rtype(result = "Output")]
pub struct Greet;

/// Bytes read from the client.
#[derive(Message)]
#[rtype(result = "Output")]
pub struct Input(pub Vec<u8>);

/// The client sent nothing for the idle timeout.
#[derive(Message)]
#[rtype(result = "Output")]
pub struct IdleTimeout;

/// The client sent below the minimum transfer rate while mid-command or mid-message.
#[derive(Message)]
#[rtype(result = "Output")]
pub struct TooSlow;

/// The server is stopping: answer `421 4.3.2` and close.
#[derive(Message)]
#[rtype(result = "Output")]
pub struct Shutdown;

/// An operator asked for this session to be closed: answer `421 4.7.0` and close, even in the
/// middle of a transaction.
#[derive(Message)]
#[rtype(result = "Output")]
pub struct Disconnect;

/// The TLS handshake asked for by the last [`Output`] succeeded.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TlsStarted;

/// What to write back, and what to do next.
#[derive(Debug, Default, MessageResponse)]
pub struct Output {
    pub bytes: Vec<u8>,
    pub close: bool,
    /// After writing, hand the connection to the TLS acceptor.
    pub start_tls: bool,
    /// Wait this long before writing (the error tarpit).
    pub delay: Duration,
    /// A mail transaction is under way: a stopping server waits for it (up to its grace time).
    pub in_transaction: bool,
    /// The client is mid-command or mid-message: held to the minimum transfer rate.
    pub receiving: bool,
}

/// Set when the server starts stopping: the time by which every session must be closed. Sessions
/// without a transaction under way close at once (421 4.3.2); the others when it ends, or at the
/// deadline.
pub type StopSignal = tokio::sync::watch::Receiver<Option<tokio::time::Instant>>;

/// The longest the tarpit makes one reply wait.
pub const MAX_ERROR_DELAY: Duration = Duration::from_secs(10);

/// The memory all sessions together may hold in message bodies while they arrive
/// (`[limits] max_body_memory`). A session charges what its message holds after each read; when
/// the budget is spent, that message is dropped at once, drained, and refused with `452 4.3.1`
/// (the client tries again later), so a thousand clients sending large messages at once cannot
/// make the daemon hold a thousand of them.
pub struct BodyBudget {
    limit: usize,
    used: std::sync::atomic::AtomicUsize,
    /// Shows `used` (`mailroot_body_memory_bytes`).
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl BodyBudget {
    pub fn new(limit: usize, gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        BodyBudget { limit, used: std::sync::atomic::AtomicUsize::new(0), gauge }
    }

    /// Takes `n` bytes if they fit.
    pub fn try_take(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(n).filter(|&t| t <= self.limit));
        if taken.is_ok() {
            self.gauge.inc_by(n as i64);
        }
        taken.is_ok()
    }

    pub fn give_back(&self, n: usize) {
        use std::sync::atomic::Ordering;
        if let Ok(before) = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| Some(u.saturating_sub(n))) {
            self.gauge.dec_by(before.min(n) as i64);
        }
    }
}

/// What every session of a listener shares besides the protocol parameters.
#[derive(Clone)]
pub struct SessionShared {
    pub queue: Recipient<Enqueue>,
    pub metrics: Arc<Metrics>,
    /// AUTH users; `None` = AUTH off.
    pub users: Option<Arc<Users>>,
    /// Password checks running at once, at most. Each argon2 check takes ~19 MiB and a core for
    /// tens of milliseconds: unbounded, a flood of AUTH attempts would exhaust memory.
    pub auth_checks: Arc<tokio::sync::Semaphore>,
    /// Failed AUTH attempts per client address, across connections (the lockout).
    pub auth_failures: Arc<AuthFailures>,
    /// Memory all sessions together may hold in message bodies being received.
    pub body_budget: Arc<BodyBudget>,
    /// Room in the queue (free space above its reserve, none while its store fails): MAIL is
    /// refused with 452 4.3.1 without it.
    pub store_health: Arc<crate::health::StoreHealth>,
    /// Asks the LMTP server whether a recipient exists, for the recipients the protocol's
    /// `check_recipients` selects (LMTP-delivered domains).
    pub recipient_verifier: Option<Arc<crate::lmtp::RecipientVerifier>>,
    /// Where large message bodies go piece by piece as they arrive (a spool file each), so a
    /// session holds only about [`STREAM_PIECE`] of a message whatever its size. `None`: bodies
    /// go whole to the Queue.
    pub body_store: Option<Arc<dyn QueueStore>>,
    /// Tarpit step: each reply after an error waits this × the errors so far.
    pub error_delay: Duration,
    pub stop: StopSignal,
    pub meter: ActorMeter,
    /// The protocol log, when `[log] protocol` is set.
    pub protolog: Option<Arc<ProtocolLog>>,
    /// Checks who inbound mail is from (SPF, DKIM, ARC, DMARC) for clients that are neither
    /// authenticated nor in a relay network; `None` = off on this listener.
    pub checker: Option<Arc<crate::checks::Checker>>,
    /// Rewrites the sender of mail forwarded to other domains (`None`: forwards keep it).
    pub srs: Option<Arc<crate::srs::Srs>>,
    /// Connections open at once, all listeners together (`[server] max_connections`).
    pub connection_permits: Arc<tokio::sync::Semaphore>,
    /// The listener's name (set by the Listener), for the logs.
    pub listener: &'static str,
    /// The open sessions of all listeners, as the admin API lists them.
    pub sessions: Arc<crate::sessions::OpenSessions>,
}

/// TLS on a connection: none, offered with STARTTLS, or from the first byte (port 465).
pub enum Tls {
    None,
    StartTls(TlsAcceptor),
    Implicit(TlsAcceptor),
}

pub struct Session {
    /// `None` only while a handler's future owns it.
    proto: Option<protocol::Session>,
    shared: SessionShared,
    peer: SocketAddr,
    /// What this session's message being received holds of the shared [`BodyBudget`].
    charged: usize,
    /// The spool file of the message being received (with `body_store`; boxed: most sessions
    /// never have one); like `proto`, owned by a handler's future while it runs.
    staging: Option<Box<Staging>>,
    /// This session's line in the list of open sessions, kept up to date after each command.
    entry: Option<Arc<SessionEntry>>,
}

impl Session {
    pub fn new(mut proto: protocol::Session, shared: SessionShared, peer: SocketAddr) -> Self {
        if shared.body_store.is_some() {
            proto.set_body_streaming(STREAM_PIECE);
        }
        Session { proto: Some(proto), shared, peer, charged: 0, staging: None, entry: None }
    }

    /// Shows this session in the list of open sessions (`registration` made by the Listener).
    pub fn listed(mut self, entry: Arc<SessionEntry>) -> Self {
        self.entry = Some(entry);
        self
    }

    fn show(&self, proto: &protocol::Session) {
        if let Some(e) = &self.entry {
            e.update(proto.phase(), proto.user(), proto.helo_name(), proto.is_tls());
        }
    }
}

/// The spool file of the message being received. Dropped without being kept (the message was
/// refused, the client left, the session ended), it removes the file, so only an acknowledged
/// message's file stays; a crash leaves it as an orphan, removed at the next open.
struct Staging {
    /// The protocol's number for the message (see `protocol::Session::body_seq`).
    seq: u64,
    path: std::path::PathBuf,
    /// `None` while a write runs, or once writing failed (the message is then refused at its
    /// end with 452 4.3.1).
    writer: Option<SpoolWriter>,
    kept: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.kept {
            if let Err(e) = std::fs::remove_file(&self.path) {
                debug!(file = %self.path.display(), error = %e, "cannot remove the spool file of a message not taken");
            }
        }
    }
}

/// Writes one piece of message `seq` to its spool file, starting the file if it is the first.
/// A failure refuses the message at its end (with 452 4.3.1), never a broken message.
async fn stage_piece(
    staging: &mut Option<Box<Staging>>,
    store: &Arc<dyn QueueStore>,
    proto: &mut protocol::Session,
    seq: u64,
    bytes: Vec<u8>,
    peer: SocketAddr,
) {
    if staging.as_ref().is_some_and(|s| s.seq != seq) {
        *staging = None;
    }
    let writer = match staging.as_mut() {
        Some(st) => st.writer.take(),
        None => {
            let s = store.clone();
            match blocking(move || s.start_spool().map_err(std::io::Error::other)).await {
                Ok(w) => {
                    *staging = Some(Box::new(Staging { seq, path: w.path().to_path_buf(), writer: None, kept: false }));
                    Some(w)
                }
                Err(e) => {
                    info!(client = %peer, error = %e, "cannot start a spool file; the message will be refused");
                    return proto.no_room();
                }
            }
        }
    };
    let (Some(mut w), Some(st)) = (writer, staging.as_mut()) else { return };
    match blocking(move || w.write(&bytes).map(|()| w)).await {
        Ok(w) => st.writer = Some(w),
        Err(e) => {
            info!(client = %peer, error = %e, "cannot write the message being received; it will be refused");
            proto.no_room();
        }
    }
}

/// Finishes the spool file of a message with its rest (synced), for its `Enqueue`.
async fn finish_spool(st: &mut Staging, rest: Vec<u8>) -> Result<StagedBody, std::io::Error> {
    let w = st.writer.take().ok_or_else(|| std::io::Error::other("writing the message failed"))?;
    blocking(move || w.finish(&rest)).await
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        self.shared.meter.started();
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.shared.meter.stopped();
        self.shared.body_budget.give_back(std::mem::take(&mut self.charged));
        debug!(client = %self.peer, "session ended");
    }
}

fn log_refusal(peer: SocketAddr, metrics: &Metrics, r: &protocol::Refusal) {
    metrics.refused(r.cause.as_str());
    info!(
        client = %peer,
        cause = r.cause.as_str(),
        sender = %LogSafe(r.sender.as_deref().unwrap_or("-")),
        recipients = %LogSafe(&r.recipients.join(",")),
        recipient = %LogSafe(r.recipient.as_deref().unwrap_or("-")),
        "refused"
    );
}

/// Runs the protocol over what is buffered, awaiting the queue for each complete message and
/// the password check for each AUTH.
async fn drive(
    mut proto: protocol::Session,
    mut staging: Option<Box<Staging>>,
    shared: SessionShared,
    peer: SocketAddr,
) -> (protocol::Session, Option<Box<Staging>>, Output) {
    let mut out = Output::default();
    let started = std::time::Instant::now();
    let errors_before = proto.errors();
    let metrics = &shared.metrics;
    while let Some(action) = proto.next_action() {
        match action {
            Action::Reply(r) => r.write_to(&mut out.bytes),
            Action::BodyChunk { seq, bytes } => match &shared.body_store {
                Some(store) => stage_piece(&mut staging, store, &mut proto, seq, bytes, peer).await,
                // Streaming is only turned on with a store; without one this cannot happen.
                None => proto.no_room(),
            },
            Action::Refused(r) => log_refusal(peer, metrics, &r),
            Action::CheckRecipient(rcpt) => {
                let verdict = match &shared.recipient_verifier {
                    Some(v) => v.check(&rcpt).await,
                    // Checking is only asked for with a verifier; without one, say so.
                    None => protocol::RecipientVerdict::TryLater("no recipient check is configured".into()),
                };
                let result = match &verdict {
                    protocol::RecipientVerdict::Exists => "exists",
                    protocol::RecipientVerdict::Unknown(_) => "unknown",
                    protocol::RecipientVerdict::TryLater(_) => "unverified",
                };
                metrics.recipient_checks.get_or_create(&ResultLabel { result }).inc();
                proto.recipient_checked(verdict);
            }
            Action::CheckSender { sender, helo } => {
                let verdict = match &shared.checker {
                    Some(checker) => checker.sender(peer.ip(), &helo, &sender).await,
                    None => None,
                };
                proto.sender_checked(verdict);
            }
            Action::Close => out.close = true,
            Action::Log(entry) => {
                if let Some(log) = &shared.protolog {
                    log.write(peer.ip(), shared.listener, &entry, started.elapsed());
                }
            }
            Action::StartTls => {
                // The protocol waits for `TlsStarted`; nothing more to do in this round.
                out.start_tls = true;
                break;
            }
            Action::Authenticate { user, password } => {
                if shared.auth_failures.locked(peer.ip(), Instant::now()) {
                    // Not even checked: a guesser learns nothing and costs no argon2 run.
                    metrics.auth.get_or_create(&ResultLabel { result: "locked_out" }).inc();
                    info!(client = %peer, user = %LogSafe(&user), result = "locked_out", "auth");
                    proto.auth_locked_out();
                    continue;
                }
                let ok = match (shared.users.clone(), shared.auth_checks.clone().acquire_owned().await) {
                    (Some(users), Ok(permit)) => {
                        let u = user.clone();
                        let ok = blocking(move || Ok(users.verify(&u, &password.0))).await.unwrap_or(false);
                        drop(permit);
                        ok
                    }
                    _ => false,
                };
                if ok {
                    shared.auth_failures.succeeded(peer.ip());
                } else {
                    shared.auth_failures.failed(peer.ip(), Instant::now());
                }
                let result = if ok { "success" } else { "failure" };
                metrics.auth.get_or_create(&ResultLabel { result }).inc();
                info!(client = %peer, user = %LogSafe(&user), result, "auth");
                proto.authenticated(ok);
            }
            Action::Enqueue(m) => {
                let sender = m.sender.as_ref().map(|s| s.to_string()).unwrap_or_default();
                let recipients: Vec<String> = m.recipients.iter().map(|r| r.to_string()).collect();
                let size = m.streamed + m.body.len();
                // The spool file of this message (another message's is dropped, and removed).
                let mut staged = staging.take().filter(|s| s.seq == m.body_seq);
                let mut body = m.body;
                let spooled = match staged.as_mut() {
                    Some(st) => Some(finish_spool(st, std::mem::take(&mut body)).await),
                    None => None,
                };
                // Who is it from? Not asked of our own users and relay networks.
                let mut auth_results = String::new();
                if let Some(checker) = shared.checker.clone().filter(|_| !proto.trusted()) {
                    // A spooled message is all in its file (`finish_spool` wrote the rest).
                    let message = match (&spooled, &shared.body_store) {
                        (Some(Ok(st)), Some(store)) => crate::checks::Message::File(
                            store.spool().open(st).map_err(|e| std::io::Error::other(e.to_string())),
                        ),
                        _ => crate::checks::Message::Memory(&body),
                    };
                    let origin = crate::checks::Origin { ip: peer.ip(), helo: &m.helo, sender: m.sender.as_ref() };
                    match checker.check(&origin, size, message).await {
                        crate::checks::Verdict::Accept { headers } => auth_results = headers,
                        crate::checks::Verdict::Refuse { reply, cause } => {
                            // Not acknowledged: the spool file goes with `staged`.
                            let reply = proto.refused_at_end(reply, cause);
                            info!(client = %peer, sender = %LogSafe(&sender), recipients = %LogSafe(&recipients.join(",")), size, result = %reply.summary(), "message");
                            reply.write_to(&mut out.bytes);
                            continue;
                        }
                    }
                }
                let mut sender_out = m.sender;
                if m.forwarded {
                    // SPF at the destination judges the envelope sender against our address:
                    // make it one of ours (SRS), unless it is the null sender or cannot be.
                    let days = crate::clock::unix_now() / 86_400;
                    let local = |s: &protocol::Mailbox| proto.params().local_domains.contains(&s.domain);
                    if let (Some(srs), Some(s)) = (&shared.srs, &sender_out) {
                        if !local(s) {
                            match srs.forward(s, days) {
                                Some(rewritten) => sender_out = Some(rewritten),
                                None => {
                                    info!(client = %peer, sender = %s, "forwarded without SRS: the sender cannot be rewritten")
                                }
                            }
                        }
                    }
                }
                let req = Enqueue {
                    sender: sender_out,
                    recipients: m.recipients,
                    dsn: m.dsn,
                    rcpt_dsn: m.rcpt_dsn,
                    body,
                    origin: Origin::Smtp {
                        helo: m.helo,
                        ip: peer.ip(),
                        protocol: m.protocol,
                        client_name: m.client_name,
                    },
                    origin_text: peer.to_string(),
                    pickup: None,
                    staged: None,
                    sign: proto.trusted(),
                    auth_results,
                };
                let result = match spooled {
                    Some(Err(e)) => {
                        info!(client = %peer, error = %e, "cannot finish the spool file of a message");
                        Err(EnqueueError::Storage)
                    }
                    Some(Ok(body)) => shared
                        .queue
                        .send(Enqueue { staged: Some(body), ..req })
                        .await
                        .unwrap_or(Err(EnqueueError::Temporary)),
                    None => shared.queue.send(req).await.unwrap_or(Err(EnqueueError::Temporary)),
                };
                if let Some(mut s) = staged {
                    // Acknowledged: the pieces are the message's now. Otherwise they go.
                    s.kept = result.is_ok();
                }
                let reply = proto.enqueued(result);
                let user = proto.user().unwrap_or("-").to_string();
                match result {
                    Ok(id) => {
                        info!(id, client = %peer, user = %LogSafe(&user), sender = %LogSafe(&sender), recipients = %LogSafe(&recipients.join(",")), size, result = "accepted", "message")
                    }
                    Err(_) => {
                        metrics.refused(protocol::RefusalCause::QueueFailure.as_str());
                        info!(client = %peer, sender = %LogSafe(&sender), recipients = %LogSafe(&recipients.join(",")), size, result = %reply.summary(), "message")
                    }
                }
                reply.write_to(&mut out.bytes);
            }
        }
    }
    if proto.errors() > errors_before && !shared.error_delay.is_zero() {
        out.delay = shared.error_delay.saturating_mul(proto.errors() as u32).min(MAX_ERROR_DELAY);
    }
    out.in_transaction = proto.in_transaction();
    out.receiving = proto.receiving();
    proto.release_idle_memory();
    // A message that ended without being queued (refused, reset) leaves no pieces behind.
    if staging.as_ref().is_some_and(|s| proto.body_seq() != Some(s.seq)) {
        staging = None;
    }
    (proto, staging, out)
}

impl Handler<Greet> for Session {
    type Result = Output;

    fn handle(&mut self, _msg: Greet, _ctx: &mut Self::Context) -> Output {
        let bytes = self.proto.as_ref().map(|p| p.greeting().to_bytes()).unwrap_or_default();
        Output { bytes, ..Output::default() }
    }
}

impl Session {
    /// Lets `step` act on the protocol state (feed input, signal a timeout), then runs every
    /// action that results, awaiting the queue where needed.
    fn run(&mut self, step: impl FnOnce(&mut protocol::Session)) -> ResponseActFuture<Self, Output> {
        let Some(mut proto) = self.proto.take() else {
            // Only reachable if the I/O task did not wait for the previous answer.
            return Box::pin(actix::fut::ready(Output { close: true, ..Output::default() }));
        };
        step(&mut proto);
        let handling = self.shared.meter.handling();
        let fut = drive(proto, self.staging.take(), self.shared.clone(), self.peer);
        Box::pin(fut.into_actor(self).map(|(mut proto, staging, out), act, _ctx| {
            drop(handling);
            act.charge(&mut proto);
            act.show(&proto);
            act.proto = Some(proto);
            act.staging = staging;
            out
        }))
    }
}

impl Session {
    /// Brings this session's share of the body budget in line with what its message holds; when
    /// the budget has no room for the growth, the message is dropped (and ends with 452 4.3.1).
    fn charge(&mut self, proto: &mut protocol::Session) {
        let held = proto.body_held();
        let budget = &self.shared.body_budget;
        if held > self.charged && !budget.try_take(held - self.charged) {
            proto.no_room();
            let after = proto.body_held();
            budget.give_back(self.charged.saturating_sub(after));
            self.charged = after.min(self.charged);
            return;
        }
        if held < self.charged {
            budget.give_back(self.charged - held);
        }
        self.charged = held;
    }
}

impl Handler<Input> for Session {
    type Result = ResponseActFuture<Self, Output>;

    fn handle(&mut self, msg: Input, _ctx: &mut Self::Context) -> Self::Result {
        let health = &self.shared.store_health;
        let (room, down) = (health.room(), health.is_failing() && !health.failing_for_space());
        self.run(|proto| {
            proto.set_storage_room(room);
            proto.set_storage_down(down);
            proto.feed(&msg.0)
        })
    }
}

impl Handler<TlsStarted> for Session {
    type Result = ();

    fn handle(&mut self, _msg: TlsStarted, _ctx: &mut Self::Context) {
        if let Some(proto) = self.proto.as_mut() {
            proto.tls_started();
            self.shared.metrics.inbound_tls.inc();
        }
        if let Some(proto) = self.proto.as_ref() {
            self.show(proto);
        }
    }
}

impl Handler<Shutdown> for Session {
    type Result = ResponseActFuture<Self, Output>;

    fn handle(&mut self, _msg: Shutdown, _ctx: &mut Self::Context) -> Self::Result {
        self.run(protocol::Session::shutdown)
    }
}

impl Handler<Disconnect> for Session {
    type Result = ResponseActFuture<Self, Output>;

    fn handle(&mut self, _msg: Disconnect, _ctx: &mut Self::Context) -> Self::Result {
        info!(client = %self.peer, "session closed by the administrator");
        self.run(protocol::Session::disconnect)
    }
}

impl Handler<IdleTimeout> for Session {
    type Result = ResponseActFuture<Self, Output>;

    fn handle(&mut self, _msg: IdleTimeout, _ctx: &mut Self::Context) -> Self::Result {
        self.run(protocol::Session::timeout)
    }
}

impl Handler<TooSlow> for Session {
    type Result = ResponseActFuture<Self, Output>;

    fn handle(&mut self, _msg: TooSlow, _ctx: &mut Self::Context) -> Self::Result {
        self.run(protocol::Session::too_slow)
    }
}

/// How long a client may take, besides the idle timeout.
#[derive(Clone)]
pub struct Timing {
    /// A client that sends nothing for this long is disconnected (421 4.4.2).
    pub idle: Duration,
    /// Under stress — open connections at or above `stress_at` — reads wait at most this long,
    /// as Postfix does, so that idle clients make room for new ones.
    pub stress_idle: Duration,
    pub stress_at: i64,
    /// Open connections now (the Listener's gauge).
    pub connections: prometheus_client::metrics::gauge::Gauge,
    /// While a command line or message is partly received, at least `min_rate` bytes per second
    /// on average over each `rate_window`; 0 = no minimum.
    pub min_rate: u64,
    pub rate_window: Duration,
}

impl Timing {
    /// The idle timeout now: shorter under stress.
    fn idle_now(&self) -> Duration {
        if self.connections.get() >= self.stress_at {
            self.idle.min(self.stress_idle)
        } else {
            self.idle
        }
    }
}

/// Size of one read; also bounds how much input one `Input` carries.
const READ_CHUNK: usize = 16 * 1024;

/// Owns the socket of one connection until it closes. Every write is bounded by the idle
/// timeout too, so a client that stops reading cannot pin the connection.
/// `listed`: the session's entry in the list of open sessions, whose disconnect it obeys.
pub async fn serve(
    stream: TcpStream,
    session: Addr<Session>,
    timing: Timing,
    tls: Tls,
    mut stop: StopSignal,
    listed: Option<Arc<SessionEntry>>,
) {
    let kick = Kick(listed);
    let idle = timing.idle;
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let tls = match tls {
        Tls::None => None,
        Tls::StartTls(acceptor) => Some(acceptor),
        Tls::Implicit(acceptor) => {
            // RFC 8314 §3.3: the handshake first, the greeting over TLS. A client that never
            // finishes it holds its slot only for the handshake's time.
            match tokio::time::timeout(idle.min(HANDSHAKE_TIMEOUT), acceptor.accept(stream)).await {
                Ok(Ok(mut tls_stream)) => {
                    if session.send(TlsStarted).await.is_err() {
                        return;
                    }
                    let Ok(greeting) = session.send(Greet).await else { return };
                    if write(&mut tls_stream, &greeting.bytes, idle).await {
                        let _ = pump(tls_stream, &session, &timing, &mut stop, &kick).await;
                    }
                }
                Ok(Err(e)) => info!(client = ?peer, error = %e, "TLS handshake failed"),
                Err(_) => info!(client = ?peer, "TLS handshake timed out"),
            }
            return;
        }
    };
    let Ok(greeting) = session.send(Greet).await else {
        return;
    };
    let mut stream = stream;
    if !write(&mut stream, &greeting.bytes, idle).await {
        return;
    }
    let Some(tcp) = pump(stream, &session, &timing, &mut stop, &kick).await else {
        return;
    };
    // STARTTLS: the protocol only asks for it when an acceptor is configured.
    let Some(acceptor) = tls else {
        return;
    };
    match tokio::time::timeout(idle, acceptor.accept(tcp)).await {
        Ok(Ok(tls_stream)) => {
            if session.send(TlsStarted).await.is_err() {
                return;
            }
            debug!(client = ?peer, "TLS started");
            // A second STARTTLS is refused by the protocol, so this never returns a stream.
            let _ = pump(tls_stream, &session, &timing, &mut stop, &kick).await;
        }
        Ok(Err(e)) => info!(client = ?peer, error = %e, "TLS handshake failed"),
        Err(_) => info!(client = ?peer, "TLS handshake timed out"),
    }
}

/// How long an implicit-TLS client may take over its handshake (at most the idle timeout).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until a stream has something to read, without a buffer. A plain TCP stream asks the
/// kernel, so an idle session holds no read buffer; a TLS stream may hold decrypted bytes the
/// socket no longer shows, so it reads at once.
trait WaitReadable {
    async fn wait_readable(&self) -> std::io::Result<()>;
}

impl WaitReadable for TcpStream {
    async fn wait_readable(&self) -> std::io::Result<()> {
        self.readable().await
    }
}

impl WaitReadable for tokio_rustls::server::TlsStream<TcpStream> {
    async fn wait_readable(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What one read brought.
enum Read {
    Bytes(Vec<u8>),
    /// The peer closed the connection, or it failed.
    Closed,
    /// Nothing within the idle timeout.
    Idle,
    /// Below the minimum rate over the last window.
    TooSlow,
    /// An operator disconnected the session.
    Kicked,
}

/// The operator's disconnect, for a session that is listed (never, for one that is not).
struct Kick(Option<Arc<SessionEntry>>);

impl Kick {
    async fn wait(&self) {
        match &self.0 {
            Some(e) => e.kicked().await,
            None => std::future::pending().await,
        }
    }
}

/// How long the 421 of a disconnect may take to write: the client may not be reading.
const KICKED_WRITE: Duration = Duration::from_secs(2);

/// The minimum-rate window of a client that is mid-command or mid-message.
struct RateWindow {
    start: tokio::time::Instant,
    bytes: u64,
}

/// Reads, asks the session, writes, until the connection ends (`None`) or the session asks for
/// TLS (the stream is handed back, with nothing read past the STARTTLS command's batch). When the
/// server stops, ends the session with 421 once no transaction is under way or the deadline passes.
async fn pump<S: AsyncRead + AsyncWrite + WaitReadable + Unpin>(
    mut stream: S,
    session: &Addr<Session>,
    timing: &Timing,
    stop: &mut StopSignal,
    kick: &Kick,
) -> Option<S> {
    let mut in_transaction = false;
    let mut watching = true;
    let mut window: Option<RateWindow> = None;
    loop {
        let deadline = *stop.borrow_and_update();
        if let Some(d) = deadline {
            if !in_transaction || tokio::time::Instant::now() >= d {
                if let Ok(out) = session.send(Shutdown).await {
                    let _ = write(&mut stream, &out.bytes, timing.idle).await;
                }
                break;
            }
        }
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
        let silent_since = tokio::time::Instant::now();
        let read = async {
            // Waited in slices of at most `stress_idle`, so a wait that began before the server
            // came under stress is cut short once it does.
            loop {
                let now = tokio::time::Instant::now();
                let idle_end = silent_since + timing.idle_now();
                let window_end = window.as_ref().map(|w| w.start + timing.rate_window);
                if now >= idle_end {
                    return Read::Idle;
                }
                if window_end.is_some_and(|end| now >= end) {
                    // Mid-command or mid-message and nothing for the rest of the window.
                    return Read::TooSlow;
                }
                let slice_end = idle_end.min(now + timing.stress_idle).min(window_end.unwrap_or(far));
                let got = tokio::time::timeout_at(slice_end, async {
                    stream.wait_readable().await?;
                    // The buffer exists only while bytes are there to read.
                    let mut buf = vec![0u8; READ_CHUNK];
                    let n = stream.read(&mut buf).await?;
                    buf.truncate(n);
                    Ok::<_, std::io::Error>(buf)
                })
                .await;
                match got {
                    Ok(Ok(buf)) if buf.is_empty() => return Read::Closed,
                    Ok(Ok(buf)) => return Read::Bytes(buf),
                    Ok(Err(_)) => return Read::Closed,
                    Err(_) => continue,
                }
            }
        };
        let read = tokio::select! {
            r = read => Some(r),
            changed = stop.changed(), if watching && deadline.is_none() => {
                // The sender is gone only when the daemon is gone; stop watching then.
                watching = changed.is_ok();
                None
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => None,
            () = kick.wait() => Some(Read::Kicked),
        };
        let Some(mut read) = read else { continue };
        if let (Read::Bytes(b), Some(w)) = (&read, window.as_mut()) {
            w.bytes += b.len() as u64;
        }
        // At the end of a window, the average must have reached the minimum rate.
        if let Some(w) = &mut window {
            let now = tokio::time::Instant::now();
            if now >= w.start + timing.rate_window {
                let wanted = timing.min_rate.saturating_mul(timing.rate_window.as_millis() as u64) / 1000;
                if w.bytes < wanted {
                    read = Read::TooSlow;
                } else {
                    *w = RateWindow { start: now, bytes: 0 };
                }
            }
        }
        let out = match read {
            Read::Idle => session.send(IdleTimeout).await,
            Read::TooSlow => session.send(TooSlow).await,
            Read::Closed => break,
            Read::Kicked => {
                if let Ok(out) = session.send(Disconnect).await {
                    let _ = write(&mut stream, &out.bytes, timing.idle.min(KICKED_WRITE)).await;
                }
                break;
            }
            Read::Bytes(buf) => session.send(Input(buf)).await,
        };
        let Ok(out) = out else { break };
        if !out.delay.is_zero() {
            tokio::time::sleep(out.delay).await;
        }
        // A client that does not read our replies is not waited for once disconnected.
        let written = tokio::select! {
            ok = write(&mut stream, &out.bytes, timing.idle) => ok,
            () = kick.wait() => false,
        };
        if !written || out.close {
            break;
        }
        in_transaction = out.in_transaction;
        window = match (out.receiving && timing.min_rate > 0, window) {
            (true, Some(w)) => Some(w),
            (true, None) => Some(RateWindow { start: tokio::time::Instant::now(), bytes: 0 }),
            (false, _) => None,
        };
        if out.start_tls {
            return Some(stream);
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    None
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8], idle: Duration) -> bool {
    if bytes.is_empty() {
        return true;
    }
    let fut = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    matches!(tokio::time::timeout(idle, fut).await, Ok(Ok(())))
}
