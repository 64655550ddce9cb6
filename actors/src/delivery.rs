//! The one interface every delivery actor speaks: a [`Deliver`] request answered by a
//! per-recipient [`DeliveryReport`], and the single place where results are classified as
//! delivered, temporary or permanent.

use std::io;
use std::sync::Arc;

use actix::prelude::*;

use crate::protocol::dsn::{MessageDsn, RcptDsn};
use crate::store::QueueId;

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
    /// The server that answered (`mx.example.org[192.0.2.1]`), for delivery status reports.
    pub remote_mta: Option<String>,
    /// Who owes the sender a success notice (`NOTIFY=SUCCESS`) when this is `Delivered`.
    pub handoff: Handoff,
}

impl RecipientResult {
    /// A result of final delivery (the default for delivery actors that store mail).
    pub fn new(index: usize, outcome: Outcome) -> Self {
        RecipientResult { index, outcome, remote_mta: None, handoff: Handoff::Final }
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered(String),
    /// Try again later (4xx, network trouble, local disk trouble).
    Temporary(String),
    /// Give up on this recipient (5xx).
    Permanent(String),
}

impl Outcome {
    /// Classifies an SMTP/LMTP reply: 2xx delivered, 4xx temporary, 5xx permanent; anything else
    /// (a garbled code from a hostile peer) is temporary.
    pub fn from_reply(code: u16, text: &str) -> Self {
        let text = format!("{code} {text}");
        match code {
            200..=299 => Outcome::Delivered(text),
            500..=599 => Outcome::Permanent(text),
            _ => Outcome::Temporary(text),
        }
    }

    /// Local I/O errors are always temporary: a full disk or a wrong permission is the
    /// operator's to fix, and the message must wait for it rather than bounce.
    pub fn from_io_error(context: &str, e: &io::Error) -> Self {
        Outcome::Temporary(format!("{context}: {e}"))
    }

    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered(_) => "delivered",
            Outcome::Temporary(_) => "temporary",
            Outcome::Permanent(_) => "permanent",
        }
    }

    pub fn text(&self) -> &str {
        match self {
            Outcome::Delivered(t) | Outcome::Temporary(t) | Outcome::Permanent(t) => t,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let cases = [
            (250, "delivered"),
            (251, "delivered"),
            (421, "temporary"),
            (450, "temporary"),
            (452, "temporary"),
            (500, "permanent"),
            (550, "permanent"),
            (554, "permanent"),
            (999, "temporary"),
            (0, "temporary"),
        ];
        for (code, label) in cases {
            assert_eq!(Outcome::from_reply(code, "x").label(), label, "code {code}");
        }
        assert_eq!(Outcome::from_io_error("drop", &io::Error::other("disk full")).label(), "temporary");
    }
}
