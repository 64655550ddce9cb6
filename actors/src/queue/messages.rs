//! The messages the Queue receives for mail flow (its management messages are in `admin.rs`):
//! from sessions and Pickup (`Enqueue`, `PickupDone`), from its RetryScheduler (`RetryDue`),
//! from the daemon (`SetRouter`, `Flush`) and from tests (`Inspect`). Their handlers are in
//! `handlers.rs`.

use actix::prelude::*;

use crate::protocol::dsn::{MessageDsn, RcptDsn};
use crate::protocol::received::Origin;
use crate::protocol::{EnqueueError, Mailbox};
use crate::routes::Router;
use crate::store::{Envelope, PickupMark, QueueId, StagedBody};

/// Store one new message. Answered once it is on stable storage.
#[derive(Message)]
#[rtype(result = "Result<QueueId, EnqueueError>")]
pub struct Enqueue {
    pub sender: Option<Mailbox>,
    pub recipients: Vec<Mailbox>,
    pub dsn: MessageDsn,
    /// DSN parameters of `recipients`, index for index (missing entries mean none given).
    pub rcpt_dsn: Vec<RcptDsn>,
    /// The message without our trace header; the queue adds it, as it knows the ID.
    pub body: Vec<u8>,
    pub origin: Origin,
    /// Client address (SMTP) or file name (Pickup), for logs and the envelope.
    pub origin_text: String,
    /// Set for Pickup files: makes the enqueue idempotent across a restart.
    pub pickup: Option<PickupMark>,
    /// The body's first pieces, already in the store (SMTP sessions stream them there as they
    /// arrive); `body` is the rest.
    pub staged: Option<StagedBody>,
    /// The submitter may speak for the message's `From:` domain (an authenticated user, a
    /// relay client, Pickup): sign it with that domain's DKIM key if it leaves us.
    pub sign: bool,
    /// Header lines to put on top of the message below our trace header (the results of the
    /// checks of who it is from); empty = none.
    pub auth_results: String,
}

/// A Pickup file whose message is queued has been deleted; forget its mark.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PickupDone {
    pub name: String,
}

/// Read one message's envelope and per-recipient state.
#[derive(Message)]
#[rtype(result = "Option<Envelope>")]
pub struct Inspect {
    pub id: QueueId,
}

/// Make everything durable (used at shutdown).
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Flush;

/// Replace the DKIM keys (at start and at a configuration reload).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetSigner(pub std::sync::Arc<crate::dkim::Signer>);

/// Replace the routes (a configuration reload). Deliveries in flight finish with the old ones.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetRouter(pub Router);

/// Sent to the Queue: take the messages due at `now`.
#[derive(Message)]
#[rtype(result = "RetryBatch")]
pub struct RetryDue {
    pub now: u64,
}

#[derive(Debug, MessageResponse)]
pub struct RetryBatch {
    /// The Queue had no room for all that is due: come back soon.
    pub more: bool,
}
