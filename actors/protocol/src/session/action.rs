//! What the session state machine hands its caller: the [`Action`]s to carry out and their
//! payloads — a message to enqueue ([`Incoming`]), a refusal for the log and counters
//! ([`Refusal`]), credentials to check ([`Secret`] keeps the password out of logs), a protocol-log
//! line ([`CommandLog`]) — and the queue's answer ([`EnqueueError`]).

use crate::address::Mailbox;
use crate::dsn::{MessageDsn, RcptDsn};
use crate::reply::Reply;

/// What the caller must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Reply(Reply),
    /// The next piece of the body of message `seq`, as it arrives (only with
    /// [`Session::set_body_streaming`]): the caller stores it. Its [`Action::Enqueue`] carries the
    /// rest, with the same `seq`; a message that ends any other way (refused, reset, closed)
    /// never gets one, and the caller throws its pieces away (see [`Session::body_seq`]).
    BodyChunk {
        seq: u64,
        bytes: Vec<u8>,
    },
    /// Check that this recipient exists (asking the mailbox server), then call
    /// [`Session::recipient_checked`]; RCPT is answered then. Only for recipients
    /// [`SessionParams::check_recipients`] selects.
    CheckRecipient(Mailbox),
    /// Check the sender's SPF (with the HELO name and the client's address), then call
    /// [`Session::sender_checked`]; MAIL is answered then. Only with
    /// [`SessionParams::check_sender`], for clients neither authenticated nor relaying, and never
    /// for the null sender.
    CheckSender {
        sender: Mailbox,
        helo: String,
    },
    /// Store this message durably, then call [`Session::enqueued`].
    Enqueue(Incoming),
    /// Something was refused: for the log and the refusal counters. A reply follows.
    Refused(Refusal),
    /// Close the connection after writing the replies so far.
    Close,
    /// Write the replies so far, then do the TLS handshake and call [`Session::tls_started`]
    /// (or close the connection if it fails). Input buffered before it has been discarded.
    StartTls,
    /// Check these credentials, then call [`Session::authenticated`].
    Authenticate {
        user: String,
        password: Secret,
    },
    /// A command and its final reply, for the protocol log (only with [`Session::set_logging`]).
    Log(CommandLog),
}

/// One line of the protocol log. Never holds AUTH credentials: only the mechanism.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLog {
    /// The command verb, upper-cased (`EHLO`, `MAIL`, …).
    pub verb: String,
    /// Its argument, with spaces as `+` and anything unprintable as `?`, at most 128 characters.
    pub arg: String,
    pub status: u16,
    /// Bytes from the client: the command line, plus the message for DATA and BDAT.
    pub in_bytes: u64,
    /// Bytes of the reply.
    pub out_bytes: u64,
}

impl CommandLog {
    pub(crate) fn from_line(line: &[u8]) -> CommandLog {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']);
        let (verb, arg) = text.split_once(' ').unwrap_or((text, ""));
        let verb: String = verb
            .chars()
            .take(12)
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '?' })
            .collect();
        // AUTH's argument may carry the credentials (AUTH PLAIN <base64>): keep the mechanism only.
        let arg = if verb == "AUTH" { arg.split(' ').next().unwrap_or("") } else { arg };
        let arg: String = arg
            .trim()
            .chars()
            .take(128)
            .map(|c| match c {
                ' ' => '+',
                c if c.is_control() => '?',
                c => c,
            })
            .collect();
        // The line comes without its CRLF.
        CommandLog { verb, arg, status: 0, in_bytes: line.len() as u64 + 2, out_bytes: 0 }
    }
}

/// A password: never shown by `Debug`, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A complete message received over SMTP, ready for the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub sender: Option<Mailbox>,
    pub recipients: Vec<Mailbox>,
    pub dsn: MessageDsn,
    /// DSN parameters of `recipients`, index for index.
    pub rcpt_dsn: Vec<RcptDsn>,
    /// The message, or with streaming its rest after the [`Action::BodyChunk`]s.
    pub body: Vec<u8>,
    /// Bytes handed out before `body` in [`Action::BodyChunk`]s of this message.
    pub streamed: usize,
    /// Which message this is, to match its [`Action::BodyChunk`]s.
    pub body_seq: u64,
    pub helo: String,
    /// `SMTP`, `ESMTP` or `UTF8SMTP` for the `Received:` header (RFC 3848).
    pub protocol: &'static str,
    pub eight_bit: bool,
    /// Reverse DNS of the client, when looked up (see [`Session::set_client_name`]).
    pub client_name: Option<Option<String>>,
    /// Some recipients are forwards to other domains (an alias, or a reversed SRS address): the
    /// caller rewrites the sender with SRS so SPF passes at the destination.
    pub forwarded: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCause {
    RelayDenied,
    MessageTooBig,
    LineTooLong,
    DataLineTooLong,
    BareLf,
    BareCr,
    /// A NUL character in the message data.
    NulCharacter,
    /// DATA or BDAT with nothing in it.
    EmptyMessage,
    /// No room for the message body now: the budget for bodies in memory was spent.
    NoRoom,
    /// Too little free space for the queue (its reserve reached, or the store failing): 452 4.3.1.
    InsufficientStorage,
    /// The queue store cannot make anything durable now (a failed write, its database away).
    StoreUnavailable,
    HopCountExceeded,
    TooManyRecipients,
    TooManyErrors,
    TooManyMessages,
    IdleTimeout,
    /// Slower than the minimum transfer rate while sending a command or a message.
    TooSlow,
    QueueFailure,
    TooManyConnections,
    TooManyConnectionsFromIp,
    ConnectionRate,
    AccessDenied,
    TlsRequired,
    AuthFailed,
    /// AUTH refused unchecked: too many failures from the client's address.
    AuthLockedOut,
    /// The mailbox server says the recipient does not exist (checked at RCPT).
    UnknownRecipient,
    /// The recipient could not be checked now (the mailbox server did not answer): 451 4.4.3.
    RecipientUnverified,
    /// An authenticated user gave a sender it does not own: 553 5.7.1.
    SenderLoginMismatch,
    /// MAIL before AUTH on a submission listener: 530 5.7.0.
    AuthRequired,
    /// SPF `fail` of the sender with `spf_fail = reject`: 550 5.7.23.
    SpfFail,
    /// DMARC `p=reject` and the message fails DMARC: 550 5.7.1.
    DmarcReject,
    /// An SPF or DMARC lookup failed where the answer could refuse the message: 451 4.4.3.
    AuthCheckTempFail,
    /// The client is on a DNS block list: 554 5.7.1 at connect.
    DnsBlockList,
    /// The client or user sent more messages than its rate allows: 450 4.7.1.
    MessageRate,
    /// The client or user gave more recipients than its rate allows: 450 4.7.1.
    RecipientRate,
    /// Too many unknown recipients from the client (directory harvesting): 421 4.7.0.
    HarvestRate,
    /// The service is paused: new connections get 421 4.3.2.
    Paused,
    /// The service is stopping: open sessions end with 421 4.3.2.
    ShuttingDown,
    /// An operator closed the session (the console's or the API's disconnect): 421 4.7.0.
    Disconnected,
}

impl RefusalCause {
    /// Stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCause::RelayDenied => "relay_denied",
            RefusalCause::MessageTooBig => "message_too_big",
            RefusalCause::LineTooLong => "command_line_too_long",
            RefusalCause::DataLineTooLong => "data_line_too_long",
            RefusalCause::BareLf => "bare_lf",
            RefusalCause::BareCr => "bare_cr",
            RefusalCause::NulCharacter => "nul_character",
            RefusalCause::EmptyMessage => "empty_message",
            RefusalCause::NoRoom => "no_room",
            RefusalCause::InsufficientStorage => "insufficient_storage",
            RefusalCause::StoreUnavailable => "store_unavailable",
            RefusalCause::HopCountExceeded => "hop_count_exceeded",
            RefusalCause::TooManyRecipients => "too_many_recipients",
            RefusalCause::TooManyErrors => "too_many_errors",
            RefusalCause::TooManyMessages => "too_many_messages",
            RefusalCause::IdleTimeout => "idle_timeout",
            RefusalCause::TooSlow => "too_slow",
            RefusalCause::QueueFailure => "queue_failure",
            RefusalCause::TooManyConnections => "too_many_connections",
            RefusalCause::TooManyConnectionsFromIp => "too_many_connections_from_ip",
            RefusalCause::ConnectionRate => "connection_rate",
            RefusalCause::AccessDenied => "access_denied",
            RefusalCause::TlsRequired => "tls_required",
            RefusalCause::AuthFailed => "auth_failed",
            RefusalCause::AuthLockedOut => "auth_locked_out",
            RefusalCause::UnknownRecipient => "unknown_recipient",
            RefusalCause::RecipientUnverified => "recipient_unverified",
            RefusalCause::SenderLoginMismatch => "sender_login_mismatch",
            RefusalCause::AuthRequired => "auth_required",
            RefusalCause::SpfFail => "spf_fail",
            RefusalCause::DmarcReject => "dmarc_reject",
            RefusalCause::AuthCheckTempFail => "auth_check_temperror",
            RefusalCause::DnsBlockList => "dnsbl",
            RefusalCause::MessageRate => "message_rate",
            RefusalCause::RecipientRate => "recipient_rate",
            RefusalCause::HarvestRate => "harvest_rate",
            RefusalCause::Paused => "paused",
            RefusalCause::ShuttingDown => "shutting_down",
            RefusalCause::Disconnected => "disconnected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub cause: RefusalCause,
    pub sender: Option<String>,
    pub recipients: Vec<String>,
    /// The recipient refused, for RCPT-time refusals.
    pub recipient: Option<String>,
    pub size: usize,
}

/// Why the queue could not take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueError {
    /// The store is out of space: 452 4.3.1.
    Storage,
    /// Anything else (store error, queue actor gone): 451 4.3.0.
    Temporary,
}

/// What the caller found out about a recipient ([`Action::CheckRecipient`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientVerdict {
    /// It exists: RCPT gets 250.
    Exists,
    /// The server refused it permanently (550 5.1.1, with the server's text).
    Unknown(String),
    /// The server refused it for now, or did not answer (451 4.4.3, with why).
    TryLater(String),
}
