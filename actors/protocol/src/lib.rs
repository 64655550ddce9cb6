//! mailroot-protocol: the SMTP protocol of mailroot, sans-IO.
//!
//! Layout:
//! - [`command`] parses one command line (with [`dsn`]'s RFC 3461 parameters); [`address`]
//!   validates paths and mailboxes and decides which domains are ours ([`LocalDomains`]).
//! - [`data`]: the DATA and BDAT receivers (dot-unstuffing, line and size limits, smuggling).
//! - [`session`]: the state machine of one server connection, with its SASL exchange
//!   (`session/sasl.rs`) and the [`Action`]s it hands its caller (`session/action.rs`).
//! - [`reply`]: the catalogue of every reply mailroot sends to a client.
//! - [`client`]: the client side used for delivery (reply parser, EHLO capabilities, dot-stuffing);
//!   [`outcome`]: a delivery result as a typed value (class, codes, text, remote MTA).
//! - [`recipients`]: recipient maps of local domains (users, aliases, catch-all, `user+tag`);
//!   [`senders`]: which senders an authenticated login owns.
//! - [`received`]: the `Received:` trace header and dates; [`pickup`]: the Pickup file format.
//! - [`fuzzing`]: the checks the fuzz targets run (and `cargo test` replays over the corpus).
//!
//! Invariant, held by this crate's dependencies (serde, base64, mail-builder's date formatter):
//! nothing here touches a
//! socket, a file, a clock, a thread or an actor. Bytes go in, replies and actions come out; that
//! is what makes it table-testable and fuzzable.

pub mod address;
pub mod client;
pub mod command;
pub mod data;
pub mod dsn;
#[doc(hidden)]
pub mod fuzzing;
pub mod outcome;
pub mod pickup;
pub mod received;
pub mod recipients;
pub mod reply;
pub mod senders;
pub mod session;

#[cfg(test)]
mod tests;

pub use address::{LocalDomains, Mailbox};
pub use reply::Reply;
pub use session::{
    Action, CommandLog, EnqueueError, Incoming, RateEvent, RateGate, RecipientCheck, RecipientVerdict, Refusal,
    RefusalCause, Session, SessionParams, SrsReverse,
};
