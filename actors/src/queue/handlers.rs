//! The Queue's handlers for the messages in `messages.rs`.

use std::io::Read;

use actix::prelude::*;
use tracing::{error, info, warn};

use super::messages::{Enqueue, Flush, Inspect, PickupDone, RetryBatch, RetryDue, SetRouter};
use super::{signing, NewMessage, Queue};
use crate::clock::unix_now;
use crate::logsafe::LogSafe;
use crate::metrics::SourceLabel;
use crate::protocol::received::Origin;
use crate::protocol::EnqueueError;
use crate::store::{Envelope, QueueId, StoreError};

impl Handler<Enqueue> for Queue {
    type Result = ResponseActFuture<Self, Result<QueueId, EnqueueError>>;

    fn handle(&mut self, msg: Enqueue, ctx: &mut Self::Context) -> Self::Result {
        let refused = |e: EnqueueError| -> Self::Result { Box::pin(actix::fut::ready(Err(e))) };
        // Nothing is written while the store cannot write or the disk is at its reserve: the
        // sessions saw the same at MAIL, but the room may have gone since.
        if self.health.room() < msg.body.len() as u64 {
            return refused(match self.health.failing() {
                Some(_) if !self.health.failing_for_space() => EnqueueError::Temporary,
                _ => EnqueueError::Storage,
            });
        }
        let Some(mark) = &msg.pickup else { return self.sign_and_store(msg, ctx) };
        let file = mark.name.clone();
        Box::pin(self.store.pickup_taken(mark).into_actor(self).then(move |res, act, ctx| match res {
            Ok(Some(id)) => {
                info!(id, file = %LogSafe(&file), "pickup file was already queued before a restart");
                Box::pin(actix::fut::ready(Ok(id))) as Self::Result
            }
            Ok(None) => act.sign_and_store(msg, ctx),
            Err(e) => Box::pin(actix::fut::ready(Err(act.cannot_store(e, ctx)))),
        }))
    }
}

impl Queue {
    /// An `Enqueue` whose Pickup file (if any) was not queued before: sign it if it leaves us,
    /// then store it.
    fn sign_and_store(
        &mut self,
        msg: Enqueue,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<QueueId, EnqueueError>> {
        if msg.sign && self.wants_signature(&msg.recipients) {
            let (signer, metrics) = (self.signer(), self.metrics.clone());
            let spooled = msg.staged.as_ref().map(|s| self.store.spool().open(s));
            let mut msg = msg;
            let body = std::mem::take(&mut msg.body);
            let work = move || {
                let result = match spooled {
                    Some(Err(e)) => Err(format!("cannot read the spool file: {e}")),
                    Some(Ok(file)) => signing::sign(&signer, &metrics, &mut (&body[..]).chain(file)),
                    None => signing::sign(&signer, &metrics, &mut &body[..]),
                };
                (body, result)
            };
            return Box::pin(async move { tokio::task::spawn_blocking(work).await }.into_actor(self).then(
                move |done, act, ctx| match done {
                    Ok((body, Ok(signature))) => act.store_and_commit(Enqueue { body, ..msg }, signature, ctx),
                    Ok((_, Err(e))) => {
                        warn!(error = %e, "cannot sign a message; refusing it for now");
                        Box::pin(actix::fut::ready(Err(EnqueueError::Temporary)))
                    }
                    Err(e) => {
                        error!(error = %e, "the signing task failed; refusing the message for now");
                        Box::pin(actix::fut::ready(Err(EnqueueError::Temporary)))
                    }
                },
            ));
        }
        self.store_and_commit(msg, Vec::new(), ctx)
    }

    /// A message could not be stored: the store may be failing; the client hears why.
    fn cannot_store(&mut self, e: StoreError, ctx: &mut Context<Self>) -> EnqueueError {
        error!(error = %e, "cannot store message");
        self.store_error(&e, ctx);
        if e.is_no_space() {
            EnqueueError::Storage
        } else {
            EnqueueError::Temporary
        }
    }

    /// The rest of an `Enqueue`: store the message with its signature, commit, then answer.
    fn store_and_commit(
        &mut self,
        msg: Enqueue,
        signature: Vec<u8>,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<QueueId, EnqueueError>> {
        let refused = |e: EnqueueError| -> ResponseActFuture<Self, Result<QueueId, EnqueueError>> {
            Box::pin(actix::fut::ready(Err(e)))
        };
        let source = match msg.origin {
            Origin::Smtp { .. } => "smtp",
            Origin::Pickup => "pickup",
            Origin::Local => "local",
        };
        let mark = msg.pickup.clone();
        let rcpt_dsn = msg.rcpt_dsn;
        // Below the Received: header, above any DKIM signature of ours.
        let signature = [msg.auth_results.into_bytes(), signature].concat();
        let new = NewMessage {
            sender: msg.sender.as_ref().map(|s| s.to_string()),
            recipients: msg
                .recipients
                .iter()
                .enumerate()
                .map(|(i, r)| (r.to_string(), rcpt_dsn.get(i).cloned().unwrap_or_default()))
                .collect(),
            dsn: msg.dsn,
            body: msg.body,
            origin: msg.origin,
            origin_text: msg.origin_text,
            pickup: msg.pickup,
            staged: msg.staged,
            signature,
        };
        let (env, message) = match self.store_message(new) {
            Ok(stored) => stored,
            Err(e) => return refused(self.cannot_store(e, ctx)),
        };
        let Some(committer) = self.committer.clone() else {
            return Box::pin(actix::fut::ready(Err(EnqueueError::Temporary)));
        };
        let (id, size) = (env.id, env.size);
        Box::pin(async move { committer.commit().await }.into_actor(self).map(move |res, act, ctx| match res {
            Ok(()) => {
                act.metrics.messages_received.get_or_create(&SourceLabel { source }).inc();
                act.metrics.history.received();
                act.metrics.bytes_received.inc_by(size);
                act.queued += 1;
                act.metrics.queue_messages.set(act.queued as i64);
                act.schedule(env, message);
                act.pump(ctx);
                Ok(id)
            }
            Err(e) => {
                error!(id, error = %e, "queue sync failed; refusing the message");
                let _ = act.store.discard(&env, mark.as_ref());
                let no_space = crate::fsio::is_no_space(&e);
                act.store_failed(format!("queue sync failed: {e}"), no_space, ctx);
                Err(if no_space { EnqueueError::Storage } else { EnqueueError::Temporary })
            }
        }))
    }
}

impl Handler<RetryDue> for Queue {
    type Result = ResponseActFuture<Self, RetryBatch>;

    fn handle(&mut self, msg: RetryDue, ctx: &mut Self::Context) -> Self::Result {
        // The one message that reaches the Queue without passing its supervisor, which
        // measures all the others.
        let _handling = self.meter.handling();
        // The scheduler now sleeps on its own reading of the index.
        self.told_scheduler = None;
        Box::pin(self.take_due(msg.now, ctx).map(|more, _, _| RetryBatch { more }))
    }
}

impl Handler<SetRouter> for Queue {
    type Result = ();

    fn handle(&mut self, msg: SetRouter, ctx: &mut Self::Context) {
        self.router = msg.0;
        // Recipients that waited for a route that now exists go at once.
        self.take_due(unix_now(), ctx).map(|_, _, _| ()).spawn(ctx);
    }
}

impl Handler<PickupDone> for Queue {
    type Result = ();

    fn handle(&mut self, msg: PickupDone, _ctx: &mut Self::Context) {
        if let Err(e) = self.store.forget_pickup(&msg.name) {
            warn!(file = %LogSafe(&msg.name), error = %e, "cannot forget pickup mark");
        }
    }
}

impl Handler<Inspect> for Queue {
    type Result = ResponseActFuture<Self, Option<Envelope>>;

    fn handle(&mut self, msg: Inspect, _ctx: &mut Self::Context) -> Self::Result {
        Box::pin(self.envelope_of(msg.id).map(|res, _, _| res.ok()))
    }
}

impl Handler<Flush> for Queue {
    type Result = ResponseActFuture<Self, Result<(), String>>;

    fn handle(&mut self, _msg: Flush, _ctx: &mut Self::Context) -> Self::Result {
        Box::pin(self.durable().map(|res, _, _| res.map_err(|e| e.to_string())))
    }
}
