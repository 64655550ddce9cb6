//! One route's delivery attempt: the addresses in turn, recipients in transactions of at most
//! the destination's limit, and recipients a server put off with `452 4.5.3` (too many
//! recipients, RFC 5321 §4.5.3.1.10) sent again at once in a transaction of their own.
//!
//! Invariant: a recipient that has an answer is never sent again in this attempt, whatever
//! happens to the connection afterwards; only recipients without one move on to another host.

use std::net::SocketAddr;

use tracing::{debug, info};

use super::connection::{Connection, Failure, Transaction};
use super::{Inner, Job, RouteSecurity, Step};
use crate::delivery::{replies, DeliveryRecipient, Handoff, Outcome, RecipientResult};
use crate::logsafe::LogSafe;
use crate::protocol::client::dot_stuff;

/// The server took fewer recipients than offered: the rest may go in another transaction.
pub(super) fn too_many_recipients(o: &Outcome) -> bool {
    let s = o.status();
    o.code == 452 && ((s.subject == 5 && s.detail == 3) || o.text.to_ascii_lowercase().contains("too many recipients"))
}

impl Inner {
    /// Tries each address in turn until every recipient has an answer. `Err` = no recipient
    /// got one (the caller may try another route); the outcome applies to all.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn try_targets(
        &self,
        job: &Job,
        key: &str,
        targets: &[(String, SocketAddr)],
        rcpts: &[DeliveryRecipient],
        sec: &RouteSecurity,
        max_rcpts: usize,
        smtputf8: bool,
    ) -> Result<Vec<RecipientResult>, (Outcome, Option<String>)> {
        let require_tls = sec.tls.required();
        let mut pending: Vec<DeliveryRecipient> = rcpts.to_vec();
        let mut done: Vec<RecipientResult> = Vec::with_capacity(rcpts.len());
        let mut last = (replies::no_host_answered(), None);
        // Once some recipients have answers, the rest get the failure that stopped us.
        let rest_fail =
            |done: &mut Vec<RecipientResult>, pending: Vec<DeliveryRecipient>, o: &Outcome, remote: &Option<String>| {
                for r in pending {
                    done.push(RecipientResult::new(r.index, o.clone().from_mta(remote.clone())));
                }
            };
        for (host, addr) in targets {
            let mut step = Step::AsPolicy;
            // At most: a pooled connection that turned out dead, then a fresh one, then a
            // fresh one with any certificate (MTA-STS testing) or in clear text after a failed
            // TLS handshake.
            let mut failures = 0;
            while failures < 4 && !pending.is_empty() {
                let (mut conn, permits) = match self.connection(key, host, *addr, sec, step).await {
                    Ok(c) => c,
                    Err(f) => {
                        let remote = f.peer_reply.then(|| format!("{host}[{}]", addr.ip()));
                        if f.tls_failed && sec.sts_testing && step == Step::AsPolicy {
                            info!(id = job.id, host = %LogSafe(host), error = %f.outcome.text, "MTA-STS (testing): certificate not verified; delivering anyway");
                            step = Step::AnyCertificate;
                            failures += 1;
                            continue;
                        }
                        if f.tls_failed && !require_tls && step != Step::ClearText {
                            info!(id = job.id, host = %LogSafe(host), addr = %addr, "TLS handshake failed; retrying in clear text");
                            step = Step::ClearText;
                            last = (f.outcome, remote);
                            failures += 1;
                            continue;
                        }
                        last = (f.outcome, remote);
                        break;
                    }
                };
                let fresh = conn.messages == 0;
                let result = self.transactions(job, &mut conn, &mut pending, &mut done, max_rcpts, smtputf8).await;
                // Report the peer as the source only of what it said itself.
                let peer = conn.peer.clone();
                self.finish(key, conn, permits);
                // Ok: every batch sent; any recipients left need a new connection.
                let Err(f) = result else { continue };
                let remote = f.peer_reply.then_some(peer);
                if !done.is_empty() {
                    rest_fail(&mut done, std::mem::take(&mut pending), &f.outcome, &remote);
                    return Ok(done);
                }
                if !f.try_next_host {
                    return Err((f.outcome, remote));
                }
                last = (f.outcome, remote);
                if fresh {
                    break;
                }
                failures += 1;
                // A pooled connection the peer had closed: try again on a new one.
                debug!(id = job.id, host = %LogSafe(host), "pooled connection failed; opening a new one");
            }
            if pending.is_empty() {
                return Ok(done);
            }
            if !done.is_empty() {
                rest_fail(&mut done, std::mem::take(&mut pending), &last.0, &last.1);
                return Ok(done);
            }
        }
        Err(last)
    }

    /// Sends `pending` in transactions of at most `max` recipients on `conn` while it stays
    /// usable, moving answered recipients to `done`. Recipients put off with 452 4.5.3 go back
    /// to `pending` when the same transaction took others (so each round makes progress).
    /// `Ok` with recipients left = the connection cannot carry another transaction.
    async fn transactions(
        &self,
        job: &Job,
        conn: &mut Connection,
        pending: &mut Vec<DeliveryRecipient>,
        done: &mut Vec<RecipientResult>,
        max: usize,
        smtputf8: bool,
    ) -> Result<(), Failure> {
        let mut first = true;
        while !pending.is_empty() && (first || conn.reusable) {
            let n = pending.len().min(max.max(1));
            let batch: Vec<DeliveryRecipient> = pending.drain(..n).collect();
            let results = match self.transaction(job, conn, &batch, smtputf8).await {
                Ok(r) => r,
                Err(f) => {
                    pending.splice(0..0, batch);
                    return Err(f);
                }
            };
            first = false;
            let took = results.iter().any(|r| r.outcome.is_delivered());
            let mut put_off = Vec::new();
            for (result, rcpt) in results.into_iter().zip(batch) {
                if took && too_many_recipients(&result.outcome) {
                    put_off.push(rcpt);
                } else {
                    done.push(result);
                }
            }
            if !put_off.is_empty() {
                debug!(id = job.id, recipients = put_off.len(), "server took fewer recipients; sending the rest now");
                pending.splice(0..0, put_off);
            }
        }
        Ok(())
    }

    pub(super) async fn transaction(
        &self,
        job: &Job,
        conn: &mut Connection,
        rcpts: &[DeliveryRecipient],
        smtputf8: bool,
    ) -> Result<Vec<RecipientResult>, Failure> {
        let caps = conn.caps.clone();
        let peer = conn.peer.clone();
        let refuse = |outcome: Outcome| -> Result<Vec<RecipientResult>, Failure> {
            Err(Failure { outcome, try_next_host: false, tls_failed: false, peer_reply: false })
        };
        if let Some(limit) = caps.size.filter(|&n| n > 0) {
            if job.message.len() as u64 > limit {
                return refuse(replies::too_big_for(&peer, job.message.len(), limit));
            }
        }
        // The more specific reason first: UTF-8 addresses make the message 8-bit as well.
        if smtputf8 && !caps.smtputf8 {
            return refuse(replies::no_smtputf8(&peer));
        }
        if job.eight_bit && !caps.eight_bit_mime {
            return refuse(replies::no_8bitmime(&peer));
        }
        let mut mail_params = String::new();
        if caps.size.is_some() {
            mail_params.push_str(&format!(" SIZE={}", job.message.len()));
        }
        if job.eight_bit {
            mail_params.push_str(" BODY=8BITMIME");
        }
        if smtputf8 {
            mail_params.push_str(" SMTPUTF8");
        }
        if caps.dsn {
            mail_params.push_str(&job.dsn.params());
        }
        let recipients: Vec<(&str, String)> =
            rcpts.iter().map(|r| (r.address.as_str(), if caps.dsn { r.dsn.params() } else { String::new() })).collect();
        let sender = self.masquerade(&job.sender);
        let data = job.data.get_or_init(|| async { dot_stuff(&job.message) }).await;
        let t = Transaction { sender: &sender, mail_params, recipients, data };
        let outcomes = conn.send(&t).await?;
        let handoff = if caps.dsn { Handoff::PassedOn } else { Handoff::Relayed };
        Ok(rcpts
            .iter()
            .zip(outcomes)
            .map(|(r, outcome)| RecipientResult {
                index: r.index,
                outcome: outcome.from_mta(Some(peer.clone())),
                handoff,
                retry_after: None,
            })
            .collect())
    }

    pub(super) fn masquerade(&self, sender: &str) -> String {
        if let (Some(m), Some((local, domain))) = (&self.settings.masquerade_domain, sender.rsplit_once('@')) {
            if self.settings.local_domains.contains(domain) {
                return format!("{local}@{m}");
            }
        }
        sender.to_string()
    }
}
