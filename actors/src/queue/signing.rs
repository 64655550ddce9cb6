//! DKIM signing as messages are queued: which messages are signed, and the signing itself on
//! the blocking pool so the Queue actor never spends a signature's CPU time (see `dkim.rs`).

use std::io::Read;
use std::sync::Arc;

use actix::prelude::*;
use tracing::{debug, warn};

use super::messages::SetSigner;
use super::Queue;
use crate::dkim::{Signer, Unsigned};
use crate::metrics::{Metrics, ResultLabel};
use crate::protocol::Mailbox;
use crate::routes::LOCAL_DEFAULT;

/// Signs what `reader` yields and counts the result; `Err` = the message could not be read or
/// signed (the caller refuses it for now rather than send it unsigned).
pub(super) fn sign(signer: &Signer, metrics: &Metrics, reader: &mut dyn Read) -> Result<Vec<u8>, String> {
    let (result, out) = match signer.sign(reader) {
        Ok(Ok(headers)) => ("signed", Ok(headers)),
        Ok(Err(Unsigned::NoKey)) => ("no_key", Ok(Vec::new())),
        Ok(Err(Unsigned::AlreadySigned)) => ("already_signed", Ok(Vec::new())),
        Ok(Err(Unsigned::HeaderTooLarge)) => {
            warn!("header section over 1 MiB: the message goes unsigned");
            ("header_too_large", Ok(Vec::new()))
        }
        Err(e) => ("failed", Err(e.to_string())),
    };
    metrics.dkim.get_or_create(&ResultLabel { result }).inc();
    out
}

impl Queue {
    /// Whether a message from a trusted submitter is worth signing: there are keys, and some
    /// recipient leaves through a route other than the Drop folder.
    pub(super) fn wants_signature(&self, recipients: &[Mailbox]) -> bool {
        !self.signer.is_empty() && recipients.iter().any(|r| self.router.route_name(&r.to_string()) != LOCAL_DEFAULT)
    }

    pub(super) fn signer(&self) -> Arc<Signer> {
        self.signer.clone()
    }

    /// The signature of a notification we made ourselves (`From: MAILER-DAEMON@hostname`). A
    /// notification that cannot be signed still goes: it reports on mail already accepted.
    pub(super) fn sign_notice(&self, report: &[u8]) -> Vec<u8> {
        if self.signer.is_empty() {
            return Vec::new();
        }
        sign(&self.signer, &self.metrics, &mut &report[..]).unwrap_or_else(|e| {
            warn!(error = %e, "cannot sign a notification; it goes unsigned");
            Vec::new()
        })
    }
}

impl Handler<SetSigner> for Queue {
    type Result = ();

    fn handle(&mut self, msg: SetSigner, _ctx: &mut Self::Context) {
        debug!("DKIM keys replaced");
        self.signer = msg.0;
    }
}
