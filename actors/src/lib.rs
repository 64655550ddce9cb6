//! mailroot-actors: the engine of the mailroot MTA.
//!
//! Layout:
//! - [`protocol`]: the sans-IO SMTP protocol (commands, DATA receiver, session state machine,
//!   reply catalogue). No sockets, no actors.

pub mod protocol;
