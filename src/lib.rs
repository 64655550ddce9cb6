//! mailroot: an actor-model mail transfer agent. This crate is the daemon and the library to
//! embed it: configuration, wiring of the actors from `mailroot-actors`, and the CLI's pieces.
//!
//! Layout:
//! - [`config`]: the TOML configuration, its defaults and validation.
//! - [`daemon`]: creates the Mailroot folders, starts the actors, stops them in order.
//! - [`queue_io`]: the queue as a portable file (`mailroot queue export/import`).
//!
//! Embedding: `let running = mailroot::daemon::start(config, Default::default())?;` then
//! `running.stop()`.

pub mod admin;
pub mod api;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod publish;
pub mod queue_io;
pub mod sendmail;

pub use daemon::Daemon;

pub use mailroot_actors as actors;
