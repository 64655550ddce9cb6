//! The one interface every delivery actor speaks: a [`Deliver`] request answered by a
//! per-recipient [`DeliveryReport`] of typed [`Outcome`]s.
//!
//! Beside it, `replies.rs`: the catalogue of every result mailroot states itself. The typed
//! result, [`Outcome`] (class, reply code, enhanced status code, text, remote MTA, and the one
//! place where a server's reply is classified), is `mailroot_protocol::outcome`, below the store.

use std::sync::Arc;

use actix::prelude::*;

use crate::protocol::dsn::{MessageDsn, RcptDsn};
use crate::store::QueueId;

pub mod replies;

pub use crate::protocol::outcome::{Class, EnhancedCode, Outcome};

/// Deliver one message to some of its recipients. Every recipient sent must appear in the report.
#[derive(Message, Clone)]
#[rtype(result = "DeliveryReport")]
pub struct Deliver {
    pub id: QueueId,
    /// Empty for the null reverse-path.
    pub sender: String,
    pub recipients: Vec<DeliveryRecipient>,
    /// The message as stored: our `Received:` header on top, CRLF line ends, not dot-stuffed.
    pub message: Arc<Vec<u8>>,
    /// `RET`/`ENVID`, for a next hop that speaks DSN.
    pub dsn: MessageDsn,
}

#[derive(Debug, Clone)]
pub struct DeliveryRecipient {
    /// Index in the envelope's recipient list.
    pub index: usize,
    pub address: String,
    /// `NOTIFY`/`ORCPT`, for a next hop that speaks DSN.
    pub dsn: RcptDsn,
}

#[derive(Debug, Clone, MessageResponse)]
pub struct DeliveryReport {
    pub results: Vec<RecipientResult>,
}

impl Deliver {
    /// The envelope indices of the recipients in this request.
    pub fn indices(&self) -> Vec<usize> {
        self.recipients.iter().map(|r| r.index).collect()
    }
}

impl DeliveryReport {
    /// The same outcome for every recipient (by envelope index), e.g. `req.indices()`.
    pub fn all(indices: Vec<usize>, outcome: Outcome) -> Self {
        DeliveryReport {
            results: indices.into_iter().map(|index| RecipientResult::new(index, outcome.clone())).collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RecipientResult {
    pub index: usize,
    pub outcome: Outcome,
    /// Who owes the sender a success notice (`NOTIFY=SUCCESS`) when this is `Delivered`.
    pub handoff: Handoff,
    /// For a temporary outcome: the destination asked us to slow down (or our own rate limit
    /// for it held the message back), so try again after this and do not count an attempt.
    pub retry_after: Option<std::time::Duration>,
}

impl RecipientResult {
    /// A result of final delivery (the default for delivery actors that store mail).
    pub fn new(index: usize, outcome: Outcome) -> Self {
        RecipientResult { index, outcome, handoff: Handoff::Final, retry_after: None }
    }

    /// A temporary result to be tried again after `wait` without counting an attempt.
    pub fn deferred(index: usize, outcome: Outcome, wait: std::time::Duration) -> Self {
        RecipientResult { index, outcome, handoff: Handoff::Final, retry_after: Some(wait) }
    }
}

/// What a successful delivery means for Delivery Status Notifications (RFC 3461 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// The message reached its destination: we send a "delivered" notice if asked.
    Final,
    /// Handed to a next hop that does not speak DSN: we send a "relayed" notice if asked.
    Relayed,
    /// Handed to a next hop that took the DSN request over: nothing from us.
    PassedOn,
}
