//! The SMTP server state machine of one connection, sans-IO: bytes in, [`Action`]s out.
//!
//! It knows nothing about sockets, actors or the queue. The caller feeds bytes, pulls actions
//! until `None` (more input needed), writes the replies, and answers every
//! [`Action::Enqueue`] with [`Session::enqueued`] before pulling again — which keeps replies in
//! order under PIPELINING.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

mod action;
mod sasl;

pub use action::{Action, CommandLog, EnqueueError, Incoming, Refusal, RefusalCause, Secret};

use crate::address::{LocalDomains, Mailbox};
use crate::command::{self, Command, CommandError};
use crate::data::{DataOutcome, DataProblem, DataReceiver};
use crate::dsn::{MessageDsn, RcptDsn};
use crate::reply::{self, Reply};
use sasl::{AuthStep, SaslStep};

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
}

#[derive(Debug)]
enum Mode {
    Command,
    /// A command line was too long; bytes are dropped until the next LF.
    DiscardLine,
    Data(DataReceiver),
    /// An `Enqueue` is outstanding.
    AwaitingQueue,
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

#[derive(Debug, Default)]
struct Transaction {
    sender: Option<Option<Mailbox>>,
    recipients: Vec<Mailbox>,
    smtputf8: bool,
    dsn: MessageDsn,
    /// DSN parameters of `recipients`, index for index.
    rcpt_dsn: Vec<RcptDsn>,
    /// The message so far when it comes in BDAT chunks.
    chunks: Option<DataReceiver>,
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
        }
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

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
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

    /// Adds bytes read from the client. The buffer holds at most what one read brought plus one
    /// partial command line, because the caller drains it before reading again.
    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.is_closed() {
            self.input.extend_from_slice(bytes);
        }
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
                Mode::Closed | Mode::AwaitingQueue | Mode::AwaitingAuth { .. } | Mode::AwaitingTls => return None,
                Mode::Bdat { remaining, .. } => {
                    if *remaining > 0 {
                        if self.input.is_empty() {
                            return None;
                        }
                        let n = (*remaining).min(self.input.len() as u64) as usize;
                        *remaining -= n as u64;
                        if let Some(rx) = &mut self.txn.chunks {
                            rx.feed(&self.input[..n]);
                        }
                        self.input.drain(..n);
                        if *remaining > 0 {
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

    fn bdat(&mut self, size: u64, last: bool) {
        // The chunk's octets follow the command whatever the answer: they are always read.
        let refuse = if self.txn.sender.is_none() {
            Some(reply::bad_sequence("Need MAIL before BDAT"))
        } else if self.txn.recipients.is_empty() {
            Some(reply::no_valid_recipients())
        } else {
            if self.txn.chunks.is_none() {
                self.txn.chunks = Some(DataReceiver::raw(self.params.max_message_size));
            }
            None
        };
        self.mode = Mode::Bdat { size, remaining: size, last, refuse };
    }

    fn chunk_done(&mut self, size: u64, last: bool, refuse: Option<Reply>) {
        if let Some(r) = refuse {
            if r.code == 530 {
                let refusal = self.refusal(RefusalCause::TlsRequired, None, 0);
                return self.reject(Some(refusal), r);
            }
            return self.reject(None, r);
        }
        let Some(rx) = self.txn.chunks.as_mut() else {
            return self.reject(None, reply::bad_sequence("Need MAIL before BDAT"));
        };
        if rx.problem() == Some(DataProblem::TooBig) {
            // Refused at once: the client need not send the rest.
            return self.end_of_data(DataOutcome::Refused(DataProblem::TooBig));
        }
        if last {
            let outcome = rx.finish_chunks();
            self.end_of_data(outcome);
        } else {
            self.reply(reply::chunk_received(size));
        }
    }

    fn mail(&mut self, from: Option<Mailbox>, params: command::MailParams) {
        let Some((_, esmtp)) = &self.helo else {
            return self.reject(None, reply::bad_sequence("Send EHLO or HELO first"));
        };
        if self.txn.sender.is_some() {
            return self.reject(None, reply::bad_sequence("Sender already given (nested MAIL)"));
        }
        let has_params = params != command::MailParams::default();
        if has_params && !esmtp {
            // Service extensions are only available after EHLO (RFC 5321 §4.1.1.1).
            return self.reject(None, reply::unsupported_parameter());
        }
        if self.params.max_messages_per_connection > 0 && self.messages >= self.params.max_messages_per_connection {
            let refusal = self.refusal(RefusalCause::TooManyMessages, None, 0);
            self.out.push_back(Action::Refused(refusal));
            let r = reply::too_many_messages(&self.params.hostname);
            return self.close_with(r);
        }
        if let Some(m) = &from {
            if !m.is_ascii() && !params.smtputf8 {
                return self.reject(None, reply::utf8_needs_smtputf8());
            }
            if m.domain.is_empty() {
                return self.reject(None, reply::bad_sender_address("address lacks a domain"));
            }
        }
        if let Some(size) = params.size {
            if size > self.params.max_message_size as u64 {
                let mut refusal = self.refusal(RefusalCause::MessageTooBig, None, 0);
                refusal.sender = Some(from.as_ref().map(|m| m.to_string()).unwrap_or_default());
                self.out.push_back(Action::Refused(refusal));
                return self.reply(reply::size_exceeded());
            }
        }
        self.txn = Transaction {
            sender: Some(from),
            recipients: Vec::new(),
            smtputf8: params.smtputf8,
            dsn: params.dsn,
            rcpt_dsn: Vec::new(),
            chunks: None,
        };
        self.reply(reply::sender_ok());
    }

    fn rcpt(&mut self, mut to: Mailbox, dsn: RcptDsn) {
        if self.txn.sender.is_none() {
            return self.reject(None, reply::bad_sequence("Need MAIL before RCPT"));
        }
        if dsn != RcptDsn::default() && !self.helo.as_ref().is_some_and(|h| h.1) {
            return self.reject(None, reply::unsupported_parameter());
        }
        if to.domain.is_empty() {
            // `<postmaster>` alone (RFC 5321 §4.5.1) means the postmaster of the default domain.
            match self.params.local_domains.default_domain() {
                Some(d) => to.domain = d.to_string(),
                None => return self.reject(None, reply::bad_recipient_address("address lacks a domain")),
            }
        }
        if !to.is_ascii() && !self.txn.smtputf8 {
            return self.reject(None, reply::utf8_needs_smtputf8());
        }
        if self.txn.recipients.len() >= self.params.max_recipients {
            let refusal = self.refusal(RefusalCause::TooManyRecipients, Some(to.to_string()), 0);
            self.out.push_back(Action::Refused(refusal));
            return self.reply(reply::too_many_recipients());
        }
        if !self.params.local_domains.contains(&to.domain)
            && !self.params.relay_domains.contains(&to.domain)
            && !self.relay_allowed
            && self.user.is_none()
        {
            let refusal = self.refusal(RefusalCause::RelayDenied, Some(to.to_string()), 0);
            return self.reject(Some(refusal), reply::relay_denied());
        }
        self.txn.recipients.push(to);
        self.txn.rcpt_dsn.push(dsn);
        self.reply(reply::recipient_ok());
    }

    fn data(&mut self) {
        if self.txn.sender.is_none() {
            return self.reject(None, reply::bad_sequence("Need MAIL before DATA"));
        }
        if self.txn.chunks.is_some() {
            return self.reject(None, reply::bad_sequence("DATA after BDAT: end the message with BDAT ... LAST"));
        }
        if self.txn.recipients.is_empty() {
            return self.reject(None, reply::no_valid_recipients());
        }
        self.mode = Mode::Data(DataReceiver::new(self.params.max_message_size));
        self.reply(reply::start_data());
    }

    fn end_of_data(&mut self, outcome: DataOutcome) {
        let (body, received, eight_bit) = match outcome {
            DataOutcome::Message { body, received_headers, eight_bit } => (body, received_headers, eight_bit),
            DataOutcome::Refused(problem) => {
                let (cause, r) = match problem {
                    DataProblem::TooBig => (RefusalCause::MessageTooBig, reply::size_exceeded()),
                    DataProblem::LineTooLong => (RefusalCause::DataLineTooLong, reply::data_line_too_long()),
                    DataProblem::BareLf => (RefusalCause::BareLf, reply::bare_lf()),
                    DataProblem::BareCr => (RefusalCause::BareCr, reply::bare_cr()),
                };
                let refusal = self.refusal(cause, None, 0);
                self.txn = Transaction::default();
                if problem == DataProblem::TooBig {
                    // Not a protocol error by the client: no error count.
                    self.out.push_back(Action::Refused(refusal));
                    self.reply(r);
                } else {
                    self.reject(Some(refusal), r);
                }
                return;
            }
        };
        if received > self.params.max_hop_count {
            let refusal = self.refusal(RefusalCause::HopCountExceeded, None, body.len());
            self.txn = Transaction::default();
            return self.reject(Some(refusal), reply::hop_count_exceeded());
        }
        let txn = std::mem::take(&mut self.txn);
        let (helo, esmtp) = self.helo.clone().unwrap_or_default();
        // RFC 3848 (and RFC 6531 for UTF8SMTP): S for TLS, A for an authenticated client.
        let protocol = match (esmtp, txn.smtputf8, self.tls, self.user.is_some()) {
            (true, true, false, false) => "UTF8SMTP",
            (true, true, true, false) => "UTF8SMTPS",
            (true, true, false, true) => "UTF8SMTPA",
            (true, true, true, true) => "UTF8SMTPSA",
            (true, false, false, false) => "ESMTP",
            (true, false, true, false) => "ESMTPS",
            (true, false, false, true) => "ESMTPA",
            (true, false, true, true) => "ESMTPSA",
            (false, _, _, _) => "SMTP",
        };
        self.mode = Mode::AwaitingQueue;
        // BDAT counted its chunks as they came.
        if let Some(l) = self.log_cmd.as_mut().filter(|l| l.verb == "DATA") {
            l.in_bytes += body.len() as u64;
        }
        self.out.push_back(Action::Enqueue(Incoming {
            sender: txn.sender.flatten(),
            recipients: txn.recipients,
            dsn: txn.dsn,
            rcpt_dsn: txn.rcpt_dsn,
            body,
            helo,
            protocol,
            eight_bit,
            client_name: self.client_name.clone(),
        }));
    }

    pub fn client_ip(&self) -> IpAddr {
        self.client_ip
    }
}
