//! One mail transaction of a session: MAIL, RCPT, DATA and BDAT, up to the complete message
//! handed to the caller as [`Action::Enqueue`]. The transaction's state is [`Transaction`];
//! RSET, EHLO and STARTTLS throw it away, and the queue's answer ends it.

use super::{Action, Incoming, Mode, RateEvent, RecipientVerdict, RefusalCause, Session};
use std::collections::HashSet;

use crate::address::Mailbox;
use crate::command;
use crate::data::{DataOutcome, DataProblem, DataReceiver};
use crate::dsn::{MessageDsn, RcptDsn};
use crate::recipients::{Lookup, MAX_EXPANSION};
use crate::reply::{self, Reply};

#[derive(Debug, Default)]
pub(super) struct Transaction {
    pub(super) sender: Option<Option<Mailbox>>,
    pub(super) recipients: Vec<Mailbox>,
    pub(super) smtputf8: bool,
    pub(super) dsn: MessageDsn,
    /// DSN parameters of `recipients`, index for index.
    pub(super) rcpt_dsn: Vec<RcptDsn>,
    /// The message so far when it comes in BDAT chunks.
    pub(super) chunks: Option<DataReceiver>,
    /// RCPT commands accepted (an alias makes more `recipients` than this).
    pub(super) given: usize,
    /// Some recipient is a forward to another domain (see [`Incoming::forwarded`]).
    pub(super) forwarded: bool,
    /// `recipients` as a set: an alias repeated in many RCPTs costs a lookup per address, not a
    /// scan of up to 1,000 recipients per address.
    pub(super) seen: HashSet<Mailbox>,
}

impl Session {
    pub(super) fn bdat(&mut self, size: u64, last: bool) {
        // The chunk's octets follow the command whatever the answer: they are always read.
        let refuse = if self.txn.sender.is_none() {
            Some(reply::bad_sequence("Need MAIL before BDAT"))
        } else if self.txn.recipients.is_empty() {
            Some(reply::no_valid_recipients())
        } else {
            if self.txn.chunks.is_none() {
                self.txn.chunks = Some(
                    DataReceiver::raw(self.params.max_message_size)
                        .strip_auth_results(self.params.auth_results_id.as_deref()),
                );
                self.body_seq += 1;
            }
            None
        };
        self.mode = Mode::Bdat { size, remaining: size, last, refuse };
    }

    pub(super) fn chunk_done(&mut self, size: u64, last: bool, refuse: Option<Reply>) {
        if let Some(r) = refuse {
            if r.code == 530 {
                let refusal = self.refusal(RefusalCause::TlsRequired, None, 0);
                return self.reject(Some(refusal), r);
            }
            return self.reject(None, r);
        }
        let Some(rx) = self.txn.chunks.as_mut() else {
            return self.reject(None, reply::bad_sequence("Need MAIL before BDAT"));
        };
        if let Some(p @ (DataProblem::TooBig | DataProblem::NoRoom)) = rx.problem() {
            // Refused at once: the client need not send the rest.
            return self.end_of_data(DataOutcome::Refused(p));
        }
        if last {
            let outcome = rx.finish_chunks();
            self.end_of_data(outcome);
        } else {
            self.reply(reply::chunk_received(size));
        }
    }

    pub(super) fn mail(&mut self, from: Option<Mailbox>, params: command::MailParams) {
        let Some((_, esmtp)) = &self.helo else {
            return self.reject(None, reply::bad_sequence("Send EHLO or HELO first"));
        };
        if self.txn.sender.is_some() {
            return self.reject(None, reply::bad_sequence("Sender already given (nested MAIL)"));
        }
        if self.params.auth_required && self.user.is_none() {
            let refusal = self.refusal(RefusalCause::AuthRequired, None, 0);
            return self.reject(Some(refusal), reply::auth_required());
        }
        let has_params = params != command::MailParams::default();
        if has_params && !esmtp {
            // Service extensions are only available after EHLO (RFC 5321 §4.1.1.1).
            return self.reject(None, reply::unsupported_parameter());
        }
        if self.params.max_messages_per_connection > 0 && self.messages >= self.params.max_messages_per_connection {
            let refusal = self.refusal(RefusalCause::TooManyMessages, None, 0);
            self.out.push_back(Action::Refused(refusal));
            let r = reply::too_many_messages(&self.params.hostname);
            return self.close_with(r);
        }
        if let Some(m) = &from {
            if !m.is_ascii() && !params.smtputf8 {
                return self.reject(None, reply::utf8_needs_smtputf8());
            }
            if m.domain.is_empty() {
                return self.reject(None, reply::bad_sender_address("address lacks a domain"));
            }
        }
        if let (Some(user), Some(logins), Some(sender)) = (&self.user, &self.params.sender_logins, &from) {
            // The null sender is anyone's (a client's own bounce); any other must be the user's.
            if !logins.allows(user, sender) {
                let mut refusal = self.refusal(RefusalCause::SenderLoginMismatch, None, 0);
                refusal.sender = Some(sender.to_string());
                return self.reject(Some(refusal), reply::sender_not_owned());
            }
        }
        if let Some(size) = params.size {
            if size > self.params.max_message_size as u64 {
                let mut refusal = self.refusal(RefusalCause::MessageTooBig, None, 0);
                refusal.sender = Some(from.as_ref().map(|m| m.to_string()).unwrap_or_default());
                self.out.push_back(Action::Refused(refusal));
                return self.reply(reply::size_exceeded());
            }
        }
        if !self.params.rates.allows(RateEvent::Message, self.rate_client(), self.user.as_deref()) {
            let mut refusal = self.refusal(RefusalCause::MessageRate, None, 0);
            refusal.sender = Some(from.as_ref().map(|m| m.to_string()).unwrap_or_default());
            self.out.push_back(Action::Refused(refusal));
            return self.reply(reply::rate_limited("messages"));
        }
        if self.storage_down {
            let mut refusal = self.refusal(RefusalCause::StoreUnavailable, None, 0);
            refusal.sender = Some(from.as_ref().map(|m| m.to_string()).unwrap_or_default());
            self.out.push_back(Action::Refused(refusal));
            return self.reply(reply::queue_unavailable());
        }
        if self.storage_room == 0 || params.size.is_some_and(|size| size > self.storage_room) {
            let mut refusal = self.refusal(RefusalCause::InsufficientStorage, None, 0);
            refusal.sender = Some(from.as_ref().map(|m| m.to_string()).unwrap_or_default());
            self.out.push_back(Action::Refused(refusal));
            return self.reply(reply::insufficient_storage());
        }
        let txn = Transaction {
            sender: Some(from),
            recipients: Vec::new(),
            smtputf8: params.smtputf8,
            dsn: params.dsn,
            rcpt_dsn: Vec::new(),
            chunks: None,
            given: 0,
            forwarded: false,
            seen: HashSet::new(),
        };
        if let Some(Some(sender)) = txn.sender.as_ref().filter(|_| self.params.check_sender && !self.trusted()) {
            let helo = self.helo.as_ref().map(|h| h.0.clone()).unwrap_or_default();
            self.out.push_back(Action::CheckSender { sender: sender.clone(), helo });
            self.mode = Mode::AwaitingSender { txn: Box::new(txn) };
            return;
        }
        self.txn = txn;
        self.reply(reply::sender_ok());
    }

    pub(super) fn rcpt(&mut self, mut to: Mailbox, dsn: RcptDsn) {
        if self.txn.sender.is_none() {
            return self.reject(None, reply::bad_sequence("Need MAIL before RCPT"));
        }
        if dsn != RcptDsn::default() && !self.helo.as_ref().is_some_and(|h| h.1) {
            return self.reject(None, reply::unsupported_parameter());
        }
        if to.domain.is_empty() {
            // `<postmaster>` alone (RFC 5321 §4.5.1) means the postmaster of the default domain.
            match self.params.local_domains.default_domain() {
                Some(d) => to.domain = d.to_string(),
                None => return self.reject(None, reply::bad_recipient_address("address lacks a domain")),
            }
        }
        if !to.is_ascii() && !self.txn.smtputf8 {
            return self.reject(None, reply::utf8_needs_smtputf8());
        }
        if self.txn.given >= self.params.max_recipients {
            let refusal = self.refusal(RefusalCause::TooManyRecipients, Some(to.to_string()), 0);
            self.out.push_back(Action::Refused(refusal));
            return self.reply(reply::too_many_recipients());
        }
        if !self.params.local_domains.contains(&to.domain)
            && !self.params.relay_domains.contains(&to.domain)
            && !self.relay_allowed
            && self.user.is_none()
        {
            let refusal = self.refusal(RefusalCause::RelayDenied, Some(to.to_string()), 0);
            return self.reject(Some(refusal), reply::relay_denied());
        }
        if !self.params.rates.allows(RateEvent::Recipient, self.rate_client(), self.user.as_deref()) {
            let refusal = self.refusal(RefusalCause::RecipientRate, Some(to.to_string()), 0);
            self.out.push_back(Action::Refused(refusal));
            return self.reply(reply::rate_limited("recipients"));
        }
        if self.params.local_domains.contains(&to.domain) {
            if let Some(reversed) = self.params.srs.reverse(&to) {
                return match reversed {
                    Ok(original) => self.add_recipients(&to, dsn, vec![original]),
                    Err(why) => self.unknown(&to, &why),
                };
            }
            let lookup = self.params.recipient_maps.as_ref().map(|m| m.lookup(&to));
            match lookup {
                None | Some(Lookup::NoMap | Lookup::Exists) => {}
                Some(Lookup::Unknown) => return self.unknown(&to, "no such user here"),
                Some(Lookup::Expands(list)) => return self.add_recipients(&to, dsn, list),
            }
        }
        if self.params.check_recipients.wanted(&to) {
            self.out.push_back(Action::CheckRecipient(to.clone()));
            self.mode = Mode::AwaitingCheck { to, dsn };
            return;
        }
        self.push_recipient(to, dsn);
        self.reply(reply::recipient_ok());
    }

    /// The client address rates count against; `None` for a relay-network client (exempt).
    fn rate_client(&self) -> Option<std::net::IpAddr> {
        (!self.relay_allowed).then_some(self.client_ip)
    }

    /// RCPT of a recipient that does not exist: 550 5.1.1 — or, past the client's rate of
    /// unknown recipients (someone guessing addresses), 421 4.7.0 and the end of the connection.
    fn unknown(&mut self, to: &Mailbox, why: &str) {
        if !self.params.rates.allows(RateEvent::FailedRecipient, self.rate_client(), self.user.as_deref()) {
            let refusal = self.refusal(RefusalCause::HarvestRate, Some(to.to_string()), 0);
            self.out.push_back(Action::Refused(refusal));
            let r = reply::harvesting(&self.params.hostname);
            return self.close_with(r);
        }
        let refusal = self.refusal(RefusalCause::UnknownRecipient, Some(to.to_string()), 0);
        self.reject(Some(refusal), reply::unknown_recipient(why));
    }

    /// One more RCPT accepted; an address already in the transaction (given twice, or also
    /// reached through an alias) is delivered once.
    fn push_recipient(&mut self, to: Mailbox, dsn: RcptDsn) {
        if self.txn.seen.insert(to.clone()) {
            self.txn.recipients.push(to);
            self.txn.rcpt_dsn.push(dsn);
        }
        self.txn.given += 1;
    }

    /// RCPT `to` stands for `list` (an alias, the catch-all, a reversed SRS address): each joins
    /// the transaction once, remembering `to` as its original recipient (ORCPT, RFC 3461) unless
    /// the client gave one.
    fn add_recipients(&mut self, to: &Mailbox, dsn: RcptDsn, list: Vec<Mailbox>) {
        let new: Vec<Mailbox> = list.into_iter().filter(|m| !self.txn.seen.contains(m)).collect();
        if self.txn.recipients.len() + new.len() > MAX_EXPANSION {
            let refusal = self.refusal(RefusalCause::TooManyRecipients, Some(to.to_string()), 0);
            self.out.push_back(Action::Refused(refusal));
            return self.reply(reply::too_many_recipients());
        }
        let orcpt = dsn.orcpt.clone().or_else(|| {
            let s = to.to_string();
            s.is_ascii().then(|| format!("rfc822;{}", crate::dsn::xtext_encode(&s)))
        });
        for m in new {
            if !self.params.local_domains.contains(&m.domain) {
                self.txn.forwarded = true;
            }
            self.txn.seen.insert(m.clone());
            self.txn.recipients.push(m);
            self.txn.rcpt_dsn.push(RcptDsn { notify: dsn.notify, orcpt: orcpt.clone() });
        }
        self.txn.given += 1;
        self.reply(reply::recipient_ok());
    }

    /// RCPT answered after the recipient was checked.
    pub(super) fn checked(&mut self, to: Mailbox, dsn: RcptDsn, verdict: RecipientVerdict) {
        match verdict {
            RecipientVerdict::Exists => {
                self.push_recipient(to, dsn);
                self.reply(reply::recipient_ok());
            }
            RecipientVerdict::Unknown(why) => self.unknown(&to, &why),
            RecipientVerdict::TryLater(why) => {
                // Not the client's error: no error count, no tarpit.
                let refusal = self.refusal(RefusalCause::RecipientUnverified, Some(to.to_string()), 0);
                self.out.push_back(Action::Refused(refusal));
                self.reply(reply::recipient_unverified(&why));
            }
        }
    }

    pub(super) fn data(&mut self) {
        if self.txn.sender.is_none() {
            return self.reject(None, reply::bad_sequence("Need MAIL before DATA"));
        }
        if self.txn.chunks.is_some() {
            return self.reject(None, reply::bad_sequence("DATA after BDAT: end the message with BDAT ... LAST"));
        }
        if self.txn.recipients.is_empty() {
            return self.reject(None, reply::no_valid_recipients());
        }
        self.mode = Mode::Data(
            DataReceiver::new(self.params.max_message_size).strip_auth_results(self.params.auth_results_id.as_deref()),
        );
        self.body_seq += 1;
        self.reply(reply::start_data());
    }

    pub(super) fn end_of_data(&mut self, outcome: DataOutcome) {
        let (body, streamed, received, eight_bit, from) = match outcome {
            DataOutcome::Message { body, streamed, received_headers, eight_bit, from } => {
                (body, streamed, received_headers, eight_bit, from)
            }
            DataOutcome::Refused(problem) => {
                let (cause, r) = match problem {
                    DataProblem::TooBig => (RefusalCause::MessageTooBig, reply::size_exceeded()),
                    DataProblem::LineTooLong => (RefusalCause::DataLineTooLong, reply::data_line_too_long()),
                    DataProblem::BareLf => (RefusalCause::BareLf, reply::bare_lf()),
                    DataProblem::BareCr => (RefusalCause::BareCr, reply::bare_cr()),
                    DataProblem::Nul => (RefusalCause::NulCharacter, reply::nul_character()),
                    DataProblem::NoRoom => (RefusalCause::NoRoom, reply::insufficient_storage()),
                };
                let refusal = self.refusal(cause, None, 0);
                self.txn = Transaction::default();
                if matches!(problem, DataProblem::TooBig | DataProblem::NoRoom) {
                    // Not a protocol error by the client: no error count.
                    self.out.push_back(Action::Refused(refusal));
                    self.reply(r);
                } else {
                    self.reject(Some(refusal), r);
                }
                return;
            }
        };
        if body.is_empty() && streamed == 0 {
            let refusal = self.refusal(RefusalCause::EmptyMessage, None, 0);
            self.txn = Transaction::default();
            return self.reject(Some(refusal), reply::empty_message());
        }
        if received > self.params.max_hop_count {
            let refusal = self.refusal(RefusalCause::HopCountExceeded, None, streamed + body.len());
            self.txn = Transaction::default();
            return self.reject(Some(refusal), reply::hop_count_exceeded());
        }
        if let (Some(user), Some(logins)) = (&self.user, &self.params.sender_logins) {
            // The header the reader sees must be the user's too, as the envelope sender was at
            // MAIL. One `From:` naming only owned mailboxes, or none at all (nothing claimed).
            let owned = match (from.count, &from.value) {
                (0, _) => true,
                (1, Some(v)) => {
                    crate::senders::header_mailboxes(v).is_some_and(|list| list.iter().all(|m| logins.allows(user, m)))
                }
                _ => false,
            };
            if !owned {
                let refusal = self.refusal(RefusalCause::SenderLoginMismatch, None, streamed + body.len());
                self.txn = Transaction::default();
                return self.reject(Some(refusal), reply::from_not_owned());
            }
        }
        let txn = std::mem::take(&mut self.txn);
        let (helo, esmtp) = self.helo.clone().unwrap_or_default();
        // RFC 3848 (and RFC 6531 for UTF8SMTP): S for TLS, A for an authenticated client.
        let protocol = match (esmtp, txn.smtputf8, self.tls, self.user.is_some()) {
            (true, true, false, false) => "UTF8SMTP",
            (true, true, true, false) => "UTF8SMTPS",
            (true, true, false, true) => "UTF8SMTPA",
            (true, true, true, true) => "UTF8SMTPSA",
            (true, false, false, false) => "ESMTP",
            (true, false, true, false) => "ESMTPS",
            (true, false, false, true) => "ESMTPA",
            (true, false, true, true) => "ESMTPSA",
            (false, _, _, _) => "SMTP",
        };
        self.mode = Mode::AwaitingQueue;
        // BDAT counted its chunks as they came.
        if let Some(l) = self.log_cmd.as_mut().filter(|l| l.verb == "DATA") {
            l.in_bytes += (streamed + body.len()) as u64;
        }
        self.out.push_back(Action::Enqueue(Incoming {
            sender: txn.sender.flatten(),
            recipients: txn.recipients,
            dsn: txn.dsn,
            rcpt_dsn: txn.rcpt_dsn,
            body,
            streamed,
            body_seq: self.body_seq,
            helo,
            protocol,
            eight_bit,
            client_name: self.client_name.clone(),
            forwarded: txn.forwarded,
        }));
    }
}
