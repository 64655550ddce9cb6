//! mailroot-actors: the engine of the mailroot MTA.
//!
//! Layout:
//! - [`protocol`]: the sans-IO SMTP protocol (commands, DATA receiver, session state machine,
//!   reply catalogue, trace header). No sockets, no actors.
//! - [`store`]: the sled queue store (envelopes, chunked bodies, retry index); [`health`]: the
//!   room for new mail (free space above the reserve, a failing store).
//! - [`commit`]: group commit, shared by the queue and the Drop writer; [`fsio`]: blocking-pool
//!   and directory-sync helpers.
//! - [`delivery`]: the `Deliver`/`DeliveryReport` interface and outcome classification.
//! - Actors: [`listener`], [`session`], [`queue`], [`retry`], [`local_drop`], [`remote`], [`pickup`],
//!   and the delivery actors [`maildir`] and [`lmtp`]; [`supervisor`] restarts delivery actors
//!   that panic; [`routes`] maps domains to delivery actors by name.
//! - [`auth`]: AUTH users and password hashes; [`tls`]: the inbound TLS configuration;
//!   [`notify`]: delivery status notifications; [`srs`]: the Sender Rewriting Scheme for forwards.
//! - [`metrics`]: the prometheus-client registry the actors update.

pub mod alloc;
pub mod auth;
pub mod checks;
pub mod clock;
pub mod commit;
pub mod delivery;
pub mod dkim;
#[cfg(debug_assertions)]
#[doc(hidden)]
pub mod fault;
pub mod fsio;
pub mod health;
pub mod history;
pub mod listener;
pub mod lmtp;
pub mod local_drop;
pub mod logsafe;
pub mod maildir;
pub mod metrics;
pub mod notify;
pub mod peer;
pub mod pickup;
pub mod protolog;
pub mod queue;
pub mod rates;
pub mod remote;
pub mod resolve;
pub mod routes;
pub mod session;
pub mod sessions;
pub mod srs;
pub mod store;
pub mod supervisor;
pub mod tls;
pub mod tlsrpt;

/// The sans-IO SMTP protocol lives in its own crate, so the compiler keeps it free of I/O.
pub use mailroot_protocol as protocol;
