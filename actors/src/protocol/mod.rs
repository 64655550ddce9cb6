//! The SMTP protocol, sans-IO: command parsing, the DATA receiver, the session state machine,
//! the reply catalogue and the `Received:` trace header.
//!
//! Invariant: nothing here touches a socket, a file, a clock or an actor. Bytes go in, replies
//! and actions come out; that is what makes it table-testable and fuzzable.

pub mod address;
pub mod client;
pub mod command;
pub mod data;
pub mod dsn;
pub mod received;
pub mod reply;
pub mod session;

#[cfg(test)]
mod tests;

pub use address::{LocalDomains, Mailbox};
pub use reply::Reply;
pub use session::{Action, CommandLog, EnqueueError, Incoming, Refusal, RefusalCause, Session, SessionParams};
