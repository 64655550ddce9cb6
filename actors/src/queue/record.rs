//! Recording delivery reports: each recipient's result, its next attempt or its end (delivered,
//! failed, expired), and the notifications that are due — failure, delay and success reports to
//! the sender, or Badmail for a notification that cannot be delivered. Notifications are stored
//! before the state that makes them due (see the invariants in `mod.rs`).

use actix::prelude::*;
use tracing::{error, info, warn};

use super::schedule::{humanize, next_attempt_at};
use super::{Body, NewMessage, Queue, MAX_RETURNED_MESSAGE};
use crate::clock::unix_now;
use crate::delivery::{replies, Class, DeliveryReport, Handoff};
use crate::fsio::write_badmail;
use crate::logsafe::LogSafe;
use crate::metrics::{CauseLabel, KindLabel, RouteLabel};
use crate::notify::{self, Report, ReportKind, ReportRecipient};
use crate::protocol::dsn::{MessageDsn, RcptDsn};
use crate::protocol::received::rfc3339_utc;
use crate::protocol::received::{rfc5322_date, Origin};
use crate::store::{Envelope, RcptStatus, StoreError};

impl Queue {
    /// Records `report` about the message whose stored envelope is `stored`, with `original`, its
    /// bytes (at hand: they were just delivered, or read for a bounce), for the reports it makes
    /// due. Returns the envelope as now written, or `stored`
    /// unchanged when nothing could be written (the results are then lost and the recipients
    /// tried again: at least once).
    pub(super) fn record(
        &mut self,
        stored: Envelope,
        route: &'static str,
        report: DeliveryReport,
        original: &[u8],
        ctx: &mut Context<Self>,
    ) -> Envelope {
        let id = stored.id;
        let mut env = stored.clone();
        let stored_next = env.next_attempt;
        let now = unix_now();
        let (expire_after, delay_notice_after) = self.settings.times(route);
        let expires_at = env.received_at.saturating_add(expire_after.as_secs());
        let (mut failed, mut delayed, mut succeeded) = (Vec::new(), Vec::new(), Vec::new());
        for res in report.results {
            let Some(r) = env.recipients.get_mut(res.index) else {
                warn!(id, index = res.index, "delivery report names an unknown recipient");
                continue;
            };
            if r.status != RcptStatus::Pending {
                warn!(id, index = res.index, "delivery report for a recipient already done; ignored");
                continue;
            }
            // Held back by a rate limit, it was not really tried.
            let deferred = res.retry_after.filter(|_| res.outcome.is_temporary());
            if deferred.is_none() {
                r.attempts += 1;
            }
            let mut outcome = res.outcome;
            match outcome.class {
                Class::Delivered => {
                    r.status = RcptStatus::Delivered;
                    r.next_attempt = None;
                    match res.handoff {
                        Handoff::Final => succeeded.push((res.index, "delivered")),
                        Handoff::Relayed => succeeded.push((res.index, "relayed")),
                        Handoff::PassedOn => {}
                    }
                }
                Class::Permanent => {
                    r.status = RcptStatus::Failed;
                    r.next_attempt = None;
                    failed.push(res.index);
                }
                Class::Temporary if now >= expires_at => {
                    let waited = humanize(now.saturating_sub(env.received_at));
                    outcome = replies::expired(&waited, &outcome);
                    r.status = RcptStatus::Failed;
                    r.next_attempt = None;
                    failed.push(res.index);
                }
                Class::Temporary => {
                    let at = match deferred {
                        Some(wait) => now.saturating_add(wait.as_secs().max(1)).min(expires_at).max(now + 1),
                        None => {
                            next_attempt_at(&self.settings, route, r.attempts, env.received_at, env.delay_notified, now)
                        }
                    };
                    r.next_attempt = Some(at);
                    delayed.push(res.index);
                }
            }
            self.metrics.deliveries.get_or_create(&RouteLabel { route, result: outcome.label() }).inc();
            self.metrics.history.delivery(outcome.class);
            info!(
                id,
                sender = %LogSafe(&env.sender),
                recipient = %LogSafe(&r.address),
                route,
                result = outcome.label(),
                attempts = r.attempts,
                next_attempt = %r.next_attempt.map_or_else(|| "-".to_string(), rfc3339_utc),
                remote = outcome.remote_mta.as_deref().unwrap_or(""),
                code = outcome.code,
                status = %outcome.status(),
                reply = %LogSafe(&outcome.text),
                "delivery"
            );
            r.last = Some(outcome);
        }
        env.next_attempt =
            env.recipients.iter().filter(|r| r.status == RcptStatus::Pending).filter_map(|r| r.next_attempt).min();

        // Notifications go into the store before the state that makes them due (see invariants).
        let mut notices: Vec<(Envelope, Body)> = Vec::new();
        if env.sender.is_empty() {
            if !failed.is_empty() {
                if let Err(e) = self.badmail(&env, &failed, original) {
                    // Keep the message queued: losing it silently is worse than retrying.
                    error!(id, error = %e, "cannot write an undeliverable notification to Badmail; kept");
                    return stored;
                }
            }
        } else {
            let delay_due = now >= env.received_at.saturating_add(delay_notice_after.as_secs());
            let wants = |i: &usize, f: fn(&RcptDsn) -> bool| env.recipients.get(*i).is_some_and(|r| f(&r.dsn));
            let failed_n: Vec<usize> = failed.iter().copied().filter(|i| wants(i, |d| d.notify().failure)).collect();
            let delayed_n: Vec<usize> = if !env.delay_notified && delay_due {
                delayed.iter().copied().filter(|i| wants(i, |d| d.notify().delay)).collect()
            } else {
                Vec::new()
            };
            let succeeded_n: Vec<(usize, &str)> =
                succeeded.iter().copied().filter(|(i, _)| wants(i, |d| d.notify().success)).collect();
            let jobs = [
                (ReportKind::Failure, failed_n.iter().map(|&i| (i, "failed")).collect::<Vec<_>>()),
                (ReportKind::Delay, delayed_n.iter().map(|&i| (i, "delayed")).collect()),
                (ReportKind::Success, succeeded_n),
            ];
            for (kind, rcpts) in jobs {
                if rcpts.is_empty() {
                    continue;
                }
                match self.store_notification(&env, kind, &rcpts, original, expires_at, now) {
                    Ok(n) => notices.push(n),
                    Err(e) => {
                        error!(id, error = %e, "cannot store a delivery notification; results will be retried");
                        self.store_error(&e, ctx);
                        return stored;
                    }
                }
            }
            if !delayed.is_empty() && delay_due {
                env.delay_notified = true;
            }
        }

        let finished = env.is_finished();
        let result = if finished { self.store.remove(id, stored_next) } else { self.store.update(&env, stored_next) };
        match result {
            Ok(()) if finished => {
                self.queued = self.queued.saturating_sub(1);
                self.metrics.queue_messages.set(self.queued as i64);
            }
            Ok(()) => {
                if let Some(at) = env.next_attempt {
                    self.tell_scheduler(at, now);
                }
            }
            Err(e) => {
                error!(id, error = %e, "cannot record delivery results; the message will be retried");
                self.store_error(&e, ctx);
                return stored;
            }
        }
        if !notices.is_empty() {
            self.commit_notices(notices, ctx);
        }
        env
    }

    /// Builds a report about `rcpts` of `env` and stores it (not yet durable).
    fn store_notification(
        &mut self,
        env: &Envelope,
        kind: ReportKind,
        rcpts: &[(usize, &'static str)],
        message: &[u8],
        expires_at: u64,
        now: u64,
    ) -> Result<(Envelope, Body), StoreError> {
        let recipients = rcpts
            .iter()
            .filter_map(|&(i, action)| env.recipients.get(i).map(|r| (r, action)))
            .map(|(r, action)| ReportRecipient {
                address: r.address.clone(),
                orcpt: r.dsn.orcpt.clone(),
                action,
                result: r.last.clone(),
                will_retry_until: (kind == ReportKind::Delay).then_some(expires_at),
            })
            .collect();
        let report = notify::build(&Report {
            kind,
            hostname: &self.settings.hostname,
            queue_id: env.id,
            to: &env.sender,
            envid: env.dsn.envid.as_deref(),
            arrival: env.received_at,
            now,
            recipients,
            original: message,
            ret: env.dsn.ret,
            max_full: MAX_RETURNED_MESSAGE,
        });
        let mut to = vec![(env.sender.clone(), RcptDsn::default())];
        if let Some(copy) = self.settings.ndr_copy_to.as_ref().filter(|_| kind == ReportKind::Failure) {
            to.push((copy.clone(), RcptDsn::default()));
        }
        let kind_name = match kind {
            ReportKind::Failure => "failure",
            ReportKind::Delay => "delay",
            ReportKind::Success => "success",
        };
        // Small and rare enough to sign here, on the actor (ed25519 takes ~0.1 ms, RSA ~1 ms).
        let signature = self.sign_notice(&report);
        let (new, message) = self.store_message(NewMessage {
            signature,
            sender: None,
            recipients: to,
            dsn: MessageDsn::default(),
            body: report,
            origin: Origin::Local,
            origin_text: format!("{kind_name} notice for {}", env.id),
            pickup: None,
            staged: None,
        })?;
        self.metrics.notifications.get_or_create(&KindLabel { kind: kind_name }).inc();
        info!(id = new.id, about = env.id, to = %LogSafe(&env.sender), kind = kind_name, "notification queued");
        Ok((new, message))
    }

    /// Makes stored notifications durable, then queues them for delivery.
    fn commit_notices(&mut self, notices: Vec<(Envelope, Body)>, ctx: &mut Context<Self>) {
        let Some(committer) = self.committer.clone() else { return };
        self.queued += notices.len();
        self.metrics.queue_messages.set(self.queued as i64);
        async move { committer.commit().await }
            .into_actor(self)
            .map(move |res, act, ctx| {
                if let Err(e) = res {
                    // They stay in the store and are picked up again when it is next opened.
                    error!(error = %e, "queue sync failed for notifications");
                    return act.store_failed(format!("queue sync failed: {e}"), crate::fsio::is_no_space(&e), ctx);
                }
                for (env, message) in notices {
                    act.schedule(env, message);
                }
                act.pump(ctx);
            })
            .spawn(ctx);
    }

    /// A notification (null sender) that cannot be delivered goes to Badmail, never back out.
    fn badmail(&self, env: &Envelope, failed: &[usize], message: &[u8]) -> std::io::Result<()> {
        let mut reason = format!(
            "Queue ID: {}\r\nReason: a message from the null sender (a notification) could not be delivered\r\nArrival-Date: {}\r\n",
            env.id,
            rfc5322_date(env.received_at)
        );
        for r in failed.iter().filter_map(|&i| env.recipients.get(i)) {
            reason.push_str(&format!(
                "Recipient: {} -- {}\r\n",
                r.address,
                r.last.as_ref().map(|o| o.to_string()).unwrap_or_default()
            ));
        }
        let base = write_badmail(&self.settings.badmail_dir, &env.id.to_string(), message, &reason)?;
        self.metrics.badmail.get_or_create(&CauseLabel { cause: "undeliverable_notification" }).inc();
        warn!(id = env.id, file = %LogSafe(&base), "undeliverable notification written to Badmail");
        Ok(())
    }
}
