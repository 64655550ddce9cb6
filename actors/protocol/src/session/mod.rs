//! The SMTP server state machine of one connection, sans-IO: bytes in, [`Action`]s out.
//!
//! It knows nothing about sockets, actors or the queue. The caller feeds bytes, pulls actions
//! until `None` (more input needed), writes the replies, and answers every
//! [`Action::Enqueue`] with [`Session::enqueued`] before pulling again — which keeps replies in
//! order under PIPELINING.

use crate::address::Mailbox;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

mod action;
mod sasl;
mod transaction;

pub use action::{Action, CommandLog, EnqueueError, Incoming, RecipientVerdict, Refusal, RefusalCause, Secret};

use crate::address::LocalDomains;
use crate::command::{self, Command, CommandError};
use crate::data::DataReceiver;
use crate::reply::{self, Reply};
use sasl::{AuthStep, SaslStep};
use transaction::Transaction;

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.
pub const MAX_COMMAND_LINE: usize = 512;

/// Session-wide policy, shared by all sessions of a listener.
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub hostname: String,
    pub local_domains: LocalDomains,
    /// Remote domains anyone may relay to (we are their backup MX): `relay_allowed = true`.
    pub relay_domains: LocalDomains,
    pub max_message_size: usize,
    pub max_recipients: usize,
    /// 0 = no limit.
    pub max_messages_per_connection: usize,
    /// 0 = no limit.
    pub max_errors: usize,
    pub max_hop_count: usize,
    /// STARTTLS is offered (a certificate is configured).
    pub tls_available: bool,
    /// Mail commands before STARTTLS get 530 5.7.0.
    pub tls_required: bool,
    /// AUTH PLAIN and LOGIN are offered: over TLS, or in clear text from loopback when
    /// `auth_plaintext_loopback`.
    pub auth_enabled: bool,
    pub auth_plaintext_loopback: bool,
    /// Recipients to check with the mailbox server before RCPT is answered.
    pub check_recipients: RecipientCheck,
    /// When set, an authenticated user may use only the senders it owns (553 5.7.1).
    pub sender_logins: Option<Arc<crate::senders::SenderLogins>>,
    /// A submission listener (RFC 6409 §4.3): MAIL before AUTH gets 530 5.7.0, whoever asks.
    pub auth_required: bool,
    /// Recipient maps of local domains: unknown local parts of a mapped domain get 550 5.1.1 at
    /// RCPT; aliases and the catch-all are expanded into the transaction's recipients.
    pub recipient_maps: Option<Arc<crate::recipients::RecipientMaps>>,
    /// Reverses SRS addresses (bounces of mail we forwarded) at RCPT.
    pub srs: SrsReverse,
    /// Our authserv-id when we add `Authentication-Results:` (the host name): such fields
    /// already in a message are dropped as it arrives (RFC 8601 §5). `None` = kept.
    pub auth_results_id: Option<String>,
    /// Rates per client address and per user, across connections (the caller keeps the counts).
    pub rates: RateGate,
    /// Ask the caller about the sender at MAIL ([`Action::CheckSender`]): SPF refused there.
    pub check_sender: bool,
}

/// What a rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateEvent {
    /// A message begins (MAIL).
    Message,
    /// A recipient is accepted (RCPT).
    Recipient,
    /// A recipient was refused as unknown (directory harvesting).
    FailedRecipient,
}

/// Counts `event` for the client (`None` for a relay-network client, exempt as Postfix exempts
/// `$mynetworks`) and the user (when authenticated) and says whether it is within the limits: `false` refuses it — 450 4.7.1 for messages and recipients, 421 4.7.0
/// and the end of the connection for failed recipients. The caller's (it needs the clock and
/// state shared by every connection). No limits by default.
#[derive(Clone, Default)]
pub struct RateGate(Option<Arc<Gate>>);

type Gate = dyn Fn(RateEvent, Option<IpAddr>, Option<&str>) -> bool + Send + Sync;

impl RateGate {
    pub fn new(f: impl Fn(RateEvent, Option<IpAddr>, Option<&str>) -> bool + Send + Sync + 'static) -> Self {
        RateGate(Some(Arc::new(f)))
    }

    fn allows(&self, event: RateEvent, ip: Option<IpAddr>, user: Option<&str>) -> bool {
        self.0.as_ref().is_none_or(|f| f(event, ip, user))
    }
}

impl std::fmt::Debug for RateGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "RateGate(some)" } else { "RateGate(none)" })
    }
}

/// Takes an SRS address of ours apart at RCPT: `None` = not one; `Some(Err)` = forged or
/// expired (550 5.1.1); `Some(Ok(original))` = deliver to the original sender instead. The
/// caller's (it needs the secret and the clock).
#[derive(Clone, Default)]
pub struct SrsReverse(Option<Arc<Reverser>>);

type Reverser = dyn Fn(&Mailbox) -> Option<Result<Mailbox, String>> + Send + Sync;

impl SrsReverse {
    pub fn new(f: impl Fn(&Mailbox) -> Option<Result<Mailbox, String>> + Send + Sync + 'static) -> Self {
        SrsReverse(Some(Arc::new(f)))
    }

    fn reverse(&self, m: &Mailbox) -> Option<Result<Mailbox, String>> {
        self.0.as_ref().and_then(|f| f(m))
    }
}

impl std::fmt::Debug for SrsReverse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "SrsReverse(some)" } else { "SrsReverse(none)" })
    }
}

/// Selects the recipients whose existence the caller checks at RCPT ([`Action::CheckRecipient`]):
/// those of domains delivered over LMTP, so an unknown user is refused at once instead of
/// bounced later to a sender who may be forged (backscatter). None by default.
#[derive(Clone, Default)]
pub struct RecipientCheck(Option<Arc<Wanted>>);

/// Whether a recipient is to be checked.
type Wanted = dyn Fn(&Mailbox) -> bool + Send + Sync;

impl RecipientCheck {
    pub fn new(wanted: impl Fn(&Mailbox) -> bool + Send + Sync + 'static) -> Self {
        RecipientCheck(Some(Arc::new(wanted)))
    }

    fn wanted(&self, m: &Mailbox) -> bool {
        self.0.as_ref().is_some_and(|f| f(m))
    }
}

impl std::fmt::Debug for RecipientCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "RecipientCheck(some)" } else { "RecipientCheck(none)" })
    }
}

#[derive(Debug)]
enum Mode {
    Command,
    /// A command line was too long; bytes are dropped until the next LF.
    DiscardLine,
    Data(DataReceiver),
    /// An `Enqueue` is outstanding.
    AwaitingQueue,
    /// A `CheckSender` is outstanding for this MAIL; the transaction it would start.
    AwaitingSender {
        txn: Box<Transaction>,
    },
    /// A `CheckRecipient` is outstanding for this RCPT.
    AwaitingCheck {
        to: Mailbox,
        dsn: crate::dsn::RcptDsn,
    },
    /// Reading the octets of a BDAT chunk; `refuse` is the reply when the chunk is not wanted.
    Bdat {
        size: u64,
        remaining: u64,
        last: bool,
        refuse: Option<Reply>,
    },
    /// Reading an AUTH response line.
    Auth(AuthStep),
    /// An `Authenticate` is outstanding.
    AwaitingAuth {
        user: String,
    },
    /// A `StartTls` is outstanding.
    AwaitingTls,
    Closed,
}

pub struct Session {
    params: Arc<SessionParams>,
    relay_allowed: bool,
    client_ip: IpAddr,
    input: Vec<u8>,
    mode: Mode,
    helo: Option<(String, bool)>,
    txn: Transaction,
    errors: usize,
    messages: usize,
    out: VecDeque<Action>,
    /// TLS is active on this connection.
    tls: bool,
    /// The authenticated user.
    user: Option<String>,
    /// Reverse DNS of the client: `None` = not looked up.
    client_name: Option<Option<String>>,
    /// Emit [`Action::Log`] for each command.
    logging: bool,
    /// The command waiting for its final reply (when logging).
    log_cmd: Option<CommandLog>,
    /// See [`Session::set_storage_room`].
    storage_room: u64,
    /// See [`Session::set_storage_down`].
    storage_down: bool,
    /// See [`Session::set_body_streaming`].
    stream_min: Option<usize>,
    /// Counts the messages whose body began (DATA, or a transaction's first BDAT).
    body_seq: u64,
}

impl Session {
    pub fn new(params: Arc<SessionParams>, client_ip: IpAddr, relay_allowed: bool) -> Self {
        Session {
            params,
            relay_allowed,
            client_ip,
            input: Vec::new(),
            mode: Mode::Command,
            helo: None,
            txn: Transaction::default(),
            errors: 0,
            messages: 0,
            out: VecDeque::new(),
            tls: false,
            user: None,
            client_name: None,
            logging: false,
            log_cmd: None,
            storage_room: u64::MAX,
            storage_down: false,
            stream_min: None,
            body_seq: 0,
        }
    }

    /// Hands message bodies out as they arrive, in [`Action::BodyChunk`]s of at least `min`
    /// bytes, instead of whole in [`Action::Enqueue`]: the caller stores them, and memory per
    /// session stays about `min` plus one read whatever the message size.
    pub fn set_body_streaming(&mut self, min: usize) {
        self.stream_min = Some(min.max(1));
    }

    /// The sequence number of the message whose body is being received (DATA, or BDAT chunks
    /// so far), if one is. A caller holding [`Action::BodyChunk`]s of another message, or when
    /// this is `None` and no [`Action::Enqueue`] took them, throws them away.
    pub fn body_seq(&self) -> Option<u64> {
        (matches!(self.mode, Mode::Data(_)) || self.txn.chunks.is_some()).then_some(self.body_seq)
    }

    /// Bytes the queue can still take (free space above its reserve; 0 while the store cannot
    /// write). `MAIL` is refused with `452 4.3.1` when it is 0 or below the declared `SIZE=`
    /// (RFC 1870 §6.1), as Postfix does with `queue_minfree`. Unlimited unless set.
    pub fn set_storage_room(&mut self, bytes: u64) {
        self.storage_room = bytes;
    }

    /// The queue cannot make anything durable now for a reason other than space (a failed write
    /// being recovered, its database away): `MAIL` is refused with `451 4.3.0`.
    pub fn set_storage_down(&mut self, down: bool) {
        self.storage_down = down;
    }

    /// Emit an [`Action::Log`] after the final reply to each command (the protocol log).
    pub fn set_logging(&mut self, on: bool) {
        self.logging = on;
    }

    /// The result of the reverse DNS lookup of the client (its forward-confirmed name, or
    /// `None`), for the `Received:` header.
    pub fn set_client_name(&mut self, name: Option<String>) {
        self.client_name = Some(name);
    }

    /// Client errors so far (each makes the next reply wait a little longer: the tarpit).
    pub fn errors(&self) -> usize {
        self.errors
    }

    /// The policy this session runs under.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The client may relay: its address is in a relay network, or it authenticated. Such a
    /// client speaks for its `From:` domain (its mail is DKIM-signed); others do not.
    pub fn trusted(&self) -> bool {
        self.relay_allowed || self.user.is_some()
    }

    /// The TLS handshake after [`Action::StartTls`] succeeded. Everything learnt before it is
    /// forgotten (RFC 3207 §4.2): the client starts again with EHLO.
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.txn = Transaction::default();
        self.user = None;
        self.input.clear();
        if matches!(self.mode, Mode::AwaitingTls) {
            self.mode = Mode::Command;
        }
    }

    /// The answer to [`Action::Authenticate`]: the reply follows as the next action.
    pub fn authenticated(&mut self, ok: bool) {
        let Mode::AwaitingAuth { user } = std::mem::replace(&mut self.mode, Mode::Command) else {
            return;
        };
        if ok {
            self.user = Some(user);
            self.reply(reply::auth_ok());
        } else {
            let refusal = self.refusal(RefusalCause::AuthFailed, Some(user), 0);
            self.reject(Some(refusal), reply::auth_failed());
        }
    }

    /// The answer to [`Action::Authenticate`] when the caller did not check the credentials
    /// because the client's address is locked out: `454 4.7.0`, a failed attempt.
    pub fn auth_locked_out(&mut self) {
        let Mode::AwaitingAuth { user } = std::mem::replace(&mut self.mode, Mode::Command) else {
            return;
        };
        let refusal = self.refusal(RefusalCause::AuthLockedOut, Some(user), 0);
        self.reject(Some(refusal), reply::auth_locked_out());
    }

    fn auth_offered(&self) -> bool {
        self.params.auth_enabled
            && (self.tls || (self.params.auth_plaintext_loopback && self.client_ip.to_canonical().is_loopback()))
    }

    pub fn greeting(&self) -> Reply {
        reply::greeting(&self.params.hostname)
    }

    /// Bytes received but not yet consumed (bounded: see [`Session::feed`]).
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.mode, Mode::Closed)
    }

    /// A mail transaction is under way (MAIL given, or message data being read): a stopping
    /// server lets it finish before closing the connection.
    pub fn in_transaction(&self) -> bool {
        self.txn.sender.is_some() || matches!(self.mode, Mode::Data(_) | Mode::AwaitingQueue | Mode::Bdat { .. })
    }

    /// The server is stopping: the next actions are `421 4.3.2` and `Close`.
    pub fn shutdown(&mut self) {
        let refusal = self.refusal(RefusalCause::ShuttingDown, None, 0);
        self.out.push_back(Action::Refused(refusal));
        let r = reply::shutting_down(&self.params.hostname);
        self.close_with(r);
    }

    /// An operator closed the session: the next actions are `421 4.7.0` and `Close`, even in
    /// the middle of a transaction (whose message is then not acknowledged, so not lost).
    pub fn disconnect(&mut self) {
        let refusal = self.refusal(RefusalCause::Disconnected, None, 0);
        self.out.push_back(Action::Refused(refusal));
        let r = reply::disconnected(&self.params.hostname);
        self.close_with(r);
    }

    /// Where the session is, in a word, for the list of open sessions: `connected` (no HELO yet),
    /// `idle` (greeted, no transaction), `auth`, `tls` (handshake asked for), `mail` (MAIL given),
    /// `rcpt` (a recipient accepted), `data` (message being received or queued), `closed`.
    pub fn phase(&self) -> &'static str {
        match &self.mode {
            Mode::Closed => "closed",
            Mode::Data(_) | Mode::AwaitingQueue | Mode::Bdat { .. } => "data",
            Mode::Auth(_) | Mode::AwaitingAuth { .. } => "auth",
            Mode::AwaitingTls => "tls",
            _ if !self.txn.recipients.is_empty() => "rcpt",
            _ if self.txn.sender.is_some() || matches!(self.mode, Mode::AwaitingSender { .. }) => "mail",
            _ if self.helo.is_some() => "idle",
            _ => "connected",
        }
    }

    /// The name the client gave in EHLO/HELO, if any.
    pub fn helo_name(&self) -> Option<&str> {
        self.helo.as_ref().map(|(name, _)| name.as_str())
    }

    /// TLS is in use on this connection (STARTTLS done, or implicit TLS).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Adds bytes read from the client. The buffer holds at most what one read brought plus one
    /// partial command line, because the caller drains it before reading again.
    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.is_closed() {
            self.input.extend_from_slice(bytes);
        }
    }

    /// The client is in the middle of something — a command line partly received, or message
    /// data (DATA or a BDAT chunk) — rather than idle between commands. The caller holds such a
    /// client to a minimum transfer rate; an idle one only to the idle timeout.
    pub fn receiving(&self) -> bool {
        !self.input.is_empty()
            || matches!(self.mode, Mode::Data(_) | Mode::DiscardLine | Mode::Auth(_))
            || matches!(self.mode, Mode::Bdat { remaining, .. } if remaining > 0)
    }

    /// Memory the message being received holds now (DATA or BDAT chunks so far).
    pub fn body_held(&self) -> usize {
        let data = match &self.mode {
            Mode::Data(rx) => rx.held(),
            _ => 0,
        };
        data + self.txn.chunks.as_ref().map_or(0, DataReceiver::held)
    }

    /// The caller has no room for more of this message (a global budget is spent): it is dropped,
    /// its rest drained, and it ends with `452 4.3.1` (a temporary refusal, not a client error).
    pub fn no_room(&mut self) {
        if let Mode::Data(rx) = &mut self.mode {
            rx.no_room();
        }
        if let Some(rx) = self.txn.chunks.as_mut() {
            rx.no_room();
        }
    }

    /// Frees the input buffer's memory when nothing is buffered: an idle session holds none.
    pub fn release_idle_memory(&mut self) {
        if self.input.is_empty() && self.input.capacity() > 0 {
            self.input = Vec::new();
        }
    }

    /// The client sends too slowly (below the caller's minimum rate while [`Session::receiving`]):
    /// the next actions are the refusal, `421 4.4.2` and `Close`.
    pub fn too_slow(&mut self) {
        let refusal = self.refusal(RefusalCause::TooSlow, None, 0);
        self.out.push_back(Action::Refused(refusal));
        let r = reply::too_slow(&self.params.hostname);
        self.close_with(r);
    }

    /// The client was silent for too long: the next actions are the refusal, `421 4.4.2` and
    /// `Close`, and nothing after.
    pub fn timeout(&mut self) {
        let refusal = self.refusal(RefusalCause::IdleTimeout, None, 0);
        self.out.push_back(Action::Refused(refusal));
        let r = reply::idle_timeout(&self.params.hostname);
        self.close_with(r);
    }

    /// The next action, or `None` when more input is needed.
    pub fn next_action(&mut self) -> Option<Action> {
        loop {
            if let Some(a) = self.out.pop_front() {
                return Some(a);
            }
            match &mut self.mode {
                Mode::Closed
                | Mode::AwaitingQueue
                | Mode::AwaitingCheck { .. }
                | Mode::AwaitingSender { .. }
                | Mode::AwaitingAuth { .. }
                | Mode::AwaitingTls => return None,
                Mode::Bdat { remaining, .. } => {
                    if *remaining > 0 {
                        if self.input.is_empty() {
                            return None;
                        }
                        let n = (*remaining).min(self.input.len() as u64) as usize;
                        *remaining -= n as u64;
                        if let Some(rx) = &mut self.txn.chunks {
                            rx.feed(&self.input[..n]);
                            if let Some(bytes) = self.stream_min.and_then(|min| rx.take_ready(min)) {
                                self.out.push_back(Action::BodyChunk { seq: self.body_seq, bytes });
                            }
                        }
                        self.input.drain(..n);
                        if *remaining > 0 {
                            // The piece handed out (if any) first; then more input is needed.
                            if !self.out.is_empty() {
                                continue;
                            }
                            return None;
                        }
                    }
                    if let Mode::Bdat { size, last, refuse, .. } = std::mem::replace(&mut self.mode, Mode::Command) {
                        self.chunk_done(size, last, refuse);
                    }
                }
                Mode::Auth(_) => {
                    let Some(i) = self.input.iter().position(|&b| b == b'\n') else {
                        if self.input.len() >= MAX_COMMAND_LINE {
                            self.input.clear();
                            self.mode = Mode::DiscardLine;
                        }
                        return None;
                    };
                    let mut line: Vec<u8> = self.input.drain(..=i).collect();
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if let Mode::Auth(step) = std::mem::replace(&mut self.mode, Mode::Command) {
                        self.sasl(sasl::respond(step, &line));
                    }
                }
                Mode::DiscardLine => {
                    let lf = self.input.iter().position(|&b| b == b'\n');
                    match lf {
                        Some(i) => {
                            self.input.drain(..=i);
                            self.mode = Mode::Command;
                            self.error(RefusalCause::LineTooLong, reply::line_too_long());
                        }
                        None => {
                            self.input.clear();
                            return None;
                        }
                    }
                }
                Mode::Data(rx) => {
                    if self.input.is_empty() {
                        return None;
                    }
                    let (used, outcome) = rx.feed(&self.input);
                    self.input.drain(..used);
                    if let Some(outcome) = outcome {
                        self.mode = Mode::Command;
                        self.end_of_data(outcome);
                    } else if let Some(bytes) = self.stream_min.and_then(|min| rx.take_ready(min)) {
                        self.out.push_back(Action::BodyChunk { seq: self.body_seq, bytes });
                    } else {
                        return None;
                    }
                }
                Mode::Command => {
                    let lf = self.input.iter().position(|&b| b == b'\n');
                    match lf {
                        Some(i) if i + 1 > MAX_COMMAND_LINE => {
                            self.input.drain(..=i);
                            self.error(RefusalCause::LineTooLong, reply::line_too_long());
                        }
                        Some(i) => {
                            let mut line: Vec<u8> = self.input.drain(..=i).collect();
                            line.pop();
                            if line.last() == Some(&b'\r') {
                                line.pop();
                            }
                            self.command(&line);
                        }
                        None if self.input.len() >= MAX_COMMAND_LINE => {
                            self.input.clear();
                            self.mode = Mode::DiscardLine;
                        }
                        None => return None,
                    }
                }
            }
        }
    }

    /// The answer to the last [`Action::CheckRecipient`]: RCPT is answered now.
    pub fn recipient_checked(&mut self, verdict: RecipientVerdict) {
        if let Mode::AwaitingCheck { to, dsn } = std::mem::replace(&mut self.mode, Mode::Command) {
            self.checked(to, dsn, verdict);
        }
    }

    /// The caller refused the message of the last [`Action::Enqueue`] instead of queueing it
    /// (its checks of who the message is from): `reply` is sent, the refusal counted.
    pub fn refused_at_end(&mut self, reply: Reply, cause: RefusalCause) -> Reply {
        let refusal = self.refusal(cause, None, 0);
        self.out.push_back(Action::Refused(refusal));
        if matches!(self.mode, Mode::AwaitingQueue) {
            self.mode = Mode::Command;
        }
        self.txn = Transaction::default();
        if let Some(mut l) = self.log_cmd.take() {
            l.status = reply.code;
            l.out_bytes = reply.to_bytes().len() as u64;
            self.out.push_back(Action::Log(l));
        }
        reply
    }

    /// The answer to [`Action::CheckSender`]: `None` = go on (MAIL gets 250), else the refusal.
    pub fn sender_checked(&mut self, refused: Option<(Reply, RefusalCause)>) {
        let Mode::AwaitingSender { txn } = std::mem::replace(&mut self.mode, Mode::Command) else {
            return;
        };
        match refused {
            None => {
                self.txn = *txn;
                self.reply(reply::sender_ok());
            }
            Some((r, cause)) => {
                let mut refusal = self.refusal(cause, None, 0);
                refusal.sender = txn.sender.as_ref().map(|s| s.as_ref().map(|m| m.to_string()).unwrap_or_default());
                self.out.push_back(Action::Refused(refusal));
                self.reply(r);
            }
        }
    }

    /// The queue's answer to the last [`Action::Enqueue`].
    pub fn enqueued(&mut self, result: Result<u64, EnqueueError>) -> Reply {
        if matches!(self.mode, Mode::AwaitingQueue) {
            self.mode = Mode::Command;
        }
        self.txn = Transaction::default();
        let r = match result {
            Ok(id) => {
                self.messages += 1;
                reply::queued(id)
            }
            Err(EnqueueError::Storage) => reply::insufficient_storage(),
            Err(EnqueueError::Temporary) => reply::queue_unavailable(),
        };
        if let Some(mut l) = self.log_cmd.take() {
            l.status = r.code;
            l.out_bytes = r.to_bytes().len() as u64;
            self.out.push_back(Action::Log(l));
        }
        r
    }

    fn refusal(&self, cause: RefusalCause, recipient: Option<String>, size: usize) -> Refusal {
        Refusal {
            cause,
            sender: self.txn.sender.as_ref().map(|s| s.as_ref().map(|m| m.to_string()).unwrap_or_default()),
            recipients: self.txn.recipients.iter().map(|r| r.to_string()).collect(),
            recipient,
            size,
        }
    }

    fn reply(&mut self, r: Reply) {
        // 334 and 354 are intermediate: the command is logged with its final reply.
        let log = match self.log_cmd.take() {
            Some(l) if matches!(r.code, 334 | 354) => {
                self.log_cmd = Some(l);
                None
            }
            Some(mut l) => {
                l.status = r.code;
                l.out_bytes = r.to_bytes().len() as u64;
                Some(l)
            }
            None => None,
        };
        self.out.push_back(Action::Reply(r));
        if let Some(l) = log {
            self.out.push_back(Action::Log(l));
        }
    }

    /// A client error: counted towards `max_errors`, which ends the session when reached.
    fn error(&mut self, cause: RefusalCause, r: Reply) {
        let refusal = self.refusal(cause, None, 0);
        self.reject(Some(refusal), r);
    }

    fn reject(&mut self, refusal: Option<Refusal>, r: Reply) {
        if let Some(refusal) = refusal {
            self.out.push_back(Action::Refused(refusal));
        }
        self.reply(r);
        self.errors += 1;
        if self.params.max_errors > 0 && self.errors >= self.params.max_errors {
            let refusal = self.refusal(RefusalCause::TooManyErrors, None, 0);
            self.out.push_back(Action::Refused(refusal));
            self.close_with(reply::too_many_errors(&self.params.hostname));
        }
    }

    fn close_with(&mut self, r: Reply) {
        self.reply(r);
        self.out.push_back(Action::Close);
        self.mode = Mode::Closed;
        self.input.clear();
    }

    fn command(&mut self, line: &[u8]) {
        if self.logging {
            self.log_cmd = Some(CommandLog::from_line(line));
        }
        let cmd = match command::parse(line) {
            Ok(c) => c,
            Err(e) => {
                let r = match e {
                    CommandError::Unrecognized => reply::unrecognized(),
                    CommandError::Syntax(t) => reply::syntax(t),
                    CommandError::BadSender(a) => reply::bad_sender_address(a.text()),
                    CommandError::BadRecipient(a) => reply::bad_recipient_address(a.text()),
                    CommandError::BadParameter => reply::unsupported_parameter(),
                };
                self.reject(None, r);
                return;
            }
        };
        if let Command::Bdat { size, .. } = cmd {
            if size > self.params.max_message_size as u64 {
                // Its octets follow unasked; reading them to stay in step could take forever
                // (`BDAT 18446744073709551615`). Whatever the state, the connection ends.
                let refusal = self.refusal(RefusalCause::MessageTooBig, None, 0);
                self.out.push_back(Action::Refused(refusal));
                return self.close_with(reply::chunk_too_big());
            }
        }
        if let (Some(l), Command::Bdat { size, .. }) = (self.log_cmd.as_mut(), &cmd) {
            l.in_bytes += size;
        }
        let needs_tls = matches!(
            cmd,
            Command::Mail { .. }
                | Command::Rcpt { .. }
                | Command::Data
                | Command::Bdat { .. }
                | Command::Auth { .. }
                | Command::Vrfy
        );
        if needs_tls && self.params.tls_required && !self.tls {
            if let Command::Bdat { size, .. } = cmd {
                // The chunk follows the command unasked: read it, then refuse.
                self.mode = Mode::Bdat { size, remaining: size, last: false, refuse: Some(reply::tls_required()) };
                return;
            }
            let refusal = self.refusal(RefusalCause::TlsRequired, None, 0);
            return self.reject(Some(refusal), reply::tls_required());
        }
        match cmd {
            Command::Ehlo(name) => {
                let offer = reply::Offer {
                    starttls: self.params.tls_available && !self.tls,
                    auth: self.auth_offered() && self.user.is_none(),
                };
                let r = reply::ehlo(&self.params.hostname, &name, self.params.max_message_size as u64, offer);
                self.helo = Some((name, true));
                self.txn = Transaction::default();
                self.reply(r);
            }
            Command::Helo(name) => {
                let r = reply::helo(&self.params.hostname, &name);
                self.helo = Some((name, false));
                self.txn = Transaction::default();
                self.reply(r);
            }
            Command::Mail { from, params } => self.mail(from, params),
            Command::Rcpt { to, dsn } => self.rcpt(to, dsn),
            Command::Data => self.data(),
            Command::Rset => {
                self.txn = Transaction::default();
                self.reply(reply::reset_ok());
            }
            Command::Noop => self.reply(reply::ok()),
            Command::Quit => {
                let r = reply::closing(&self.params.hostname);
                self.close_with(r);
            }
            Command::Vrfy => self.reply(reply::cannot_vrfy()),
            Command::Help => self.reply(reply::help()),
            Command::StartTls => self.start_tls(),
            Command::Auth { mechanism, initial } => self.auth(&mechanism, initial.as_deref()),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::NotImplemented => self.reject(None, reply::not_implemented()),
        }
    }

    fn start_tls(&mut self) {
        if !self.params.tls_available {
            return self.reject(None, reply::not_implemented());
        }
        if self.tls {
            return self.reject(None, reply::bad_sequence("TLS is already active"));
        }
        self.reply(reply::ready_for_tls());
        self.out.push_back(Action::StartTls);
        self.mode = Mode::AwaitingTls;
        // CVE-2011-0411: nothing sent before the handshake may be read as a command after it.
        self.input.clear();
    }

    fn auth(&mut self, mechanism: &str, initial: Option<&str>) {
        if !self.params.auth_enabled {
            return self.reject(None, reply::not_implemented());
        }
        if !self.helo.as_ref().is_some_and(|h| h.1) {
            return self.reject(None, reply::bad_sequence("Send EHLO first"));
        }
        if self.user.is_some() {
            return self.reject(None, reply::bad_sequence("Already authenticated"));
        }
        if self.txn.sender.is_some() {
            return self.reject(None, reply::bad_sequence("AUTH is not allowed during a mail transaction"));
        }
        if !self.auth_offered() {
            return self.reject(None, reply::auth_needs_encryption());
        }
        let step = sasl::start(mechanism, initial);
        self.sasl(step);
    }

    /// Carries out one step of the SASL exchange.
    fn sasl(&mut self, step: SaslStep) {
        match step {
            SaslStep::Challenge(prompt, next) => {
                self.reply(reply::auth_challenge(prompt));
                self.mode = Mode::Auth(next);
            }
            SaslStep::Credentials { user, password } => {
                self.out.push_back(Action::Authenticate { user: user.clone(), password });
                self.mode = Mode::AwaitingAuth { user };
            }
            SaslStep::Failed => {
                let refusal = self.refusal(RefusalCause::AuthFailed, None, 0);
                self.reject(Some(refusal), reply::auth_failed());
            }
            SaslStep::Refused(r) => self.reject(None, r),
        }
    }

    pub fn client_ip(&self) -> IpAddr {
        self.client_ip
    }
}
