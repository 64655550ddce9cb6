//! Who inbound mail is from (mail-auth): SPF of the HELO and MAIL FROM identities (RFC 7208),
//! DKIM signatures (RFC 6376), the ARC chain (RFC 8617) and DMARC alignment and policy (RFC
//! 7489, with DMARCbis's DNS tree walk instead of a public-suffix list), summed up in one
//! `Authentication-Results:` header (RFC 8601) and a verdict: accept, refuse (550) or try later
//! (451 4.4.3). Run at the end of DATA for clients that are neither authenticated nor in a relay
//! network, before the message is queued.
//!
//! Bounds: at most `max_concurrent` checks at once and [`MEMORY`] of messages held for them, each
//! check within `timeout` in all (waiting for a slot and for memory included). DKIM and ARC are
//! verified for messages up to `max_message_size` (the whole message is parsed in memory); a
//! larger one gets SPF and DMARC on its header section, and DMARC is enforced on it only when it
//! carries no DKIM signature we could not verify. Every lookup goes through the SMTP side's one
//! caching resolver (hickory).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mail_auth::common::headers::HeaderWriter;
use mail_auth::dmarc::Policy;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator, SpfResult,
};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::protocol::reply::{self, Reply};
use crate::protocol::{Mailbox, RefusalCause};

/// What to do with an SPF `fail` (`-all`) of the MAIL FROM identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfFail {
    /// Only record it in the header (DMARC decides).
    Record,
    /// Refuse the message: `550 5.7.23`.
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSettings {
    /// Our `authserv-id` (the host name) in `Authentication-Results:`.
    pub hostname: String,
    pub spf_fail: SpfFail,
    /// Apply the sender domain's DMARC policy: `p=reject` refused, `p=quarantine` marked.
    pub dmarc_enforce: bool,
    /// The header line added to mail DMARC says to quarantine (`X-Spam-Flag: YES`).
    pub quarantine_header: String,
    pub timeout: Duration,
    pub max_concurrent: usize,
    /// DKIM and ARC are verified for messages up to this size.
    pub max_message_size: usize,
    /// DNS block lists asked at connect (`zen.spamhaus.org`): a listed client is refused.
    pub dnsbl: Vec<String>,
    /// DNS allow lists: a client listed in one is not looked up in the block lists.
    pub dnswl: Vec<String>,
    /// Forwarders (mailing lists) whose ARC seal we trust: a message failing DMARC whose ARC
    /// chain passes and was last sealed by one of these is not refused or quarantined for it
    /// (RFC 8617 §7.2.1, a local policy override).
    pub trusted_arc_sealers: Vec<String>,
}

impl Default for CheckSettings {
    fn default() -> Self {
        CheckSettings {
            hostname: "localhost".into(),
            spf_fail: SpfFail::Record,
            dmarc_enforce: true,
            quarantine_header: "X-Spam-Flag: YES".into(),
            timeout: Duration::from_secs(20),
            max_concurrent: 64,
            // As `[limits] max_message_size`: every message verified whole by default.
            max_message_size: 25 * 1024 * 1024,
            dnsbl: Vec::new(),
            dnswl: Vec::new(),
            trusted_arc_sealers: Vec::new(),
        }
    }
}

/// The outcome of the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Queue it with these header lines on top (`Authentication-Results:` and, for DMARC
    /// quarantine, the quarantine header), each ending in CRLF.
    Accept { headers: String },
    /// Refuse it: a 5xx, or a 4xx when a lookup failed where the answer would decide.
    Refuse { reply: Reply, cause: RefusalCause },
}

/// What the session knows of the message's origin.
pub struct Origin<'a> {
    pub ip: IpAddr,
    pub helo: &'a str,
    pub sender: Option<&'a Mailbox>,
}

pub struct Checker {
    auth: MessageAuthenticator,
    settings: CheckSettings,
    slots: Arc<Semaphore>,
    /// KiB of messages held in memory for DKIM and ARC, all checks together.
    memory: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// Messages held in memory for verification at once, at most (all sessions together);
/// `max_message_size` may not exceed it.
pub const MEMORY: usize = 64 * 1024 * 1024;

/// The header section of a message too large to verify is read up to this much.
const HEADER_LIMIT: usize = 1024 * 1024;

/// The message to check, where it is.
pub enum Message<'a> {
    Memory(&'a [u8]),
    /// A spool file holding the whole message (a large one), read on the blocking pool.
    File(std::io::Result<std::fs::File>),
}

impl Checker {
    /// `resolver`: the SMTP side's resolver (`resolve::Dns::resolver`).
    pub fn new(resolver: hickory_resolver::TokioResolver, settings: CheckSettings, metrics: Arc<Metrics>) -> Checker {
        let slots = Arc::new(Semaphore::new(settings.max_concurrent.max(1)));
        let memory = Arc::new(Semaphore::new(MEMORY / 1024));
        Checker { auth: MessageAuthenticator(resolver), settings, slots, memory, metrics }
    }

    pub fn settings(&self) -> &CheckSettings {
        &self.settings
    }

    /// The same checker (one resolver, slots and memory budget) with a listener's own policy.
    pub fn with_policy(&self, spf_fail: SpfFail, dmarc_enforce: bool) -> Checker {
        Checker {
            auth: MessageAuthenticator(self.auth.0.clone()),
            settings: CheckSettings { spf_fail, dmarc_enforce, ..self.settings.clone() },
            slots: self.slots.clone(),
            memory: self.memory.clone(),
            metrics: self.metrics.clone(),
        }
    }

    fn count(&self, check: &'static str, result: &'static str) {
        self.metrics.inbound_auth.get_or_create(&crate::metrics::CheckLabel { check, result }).inc();
    }

    /// Checks one message of `size` bytes. Waiting for a slot and for memory, reading it and
    /// every lookup happen within one `timeout`.
    pub async fn check(&self, origin: &Origin<'_>, size: usize, message: Message<'_>) -> Verdict {
        let work = async {
            let _slot = self.slots.acquire().await.ok()?;
            let whole = size <= self.settings.max_message_size;
            let _held = match whole {
                true => {
                    let kib = u32::try_from(size.div_ceil(1024).max(1)).ok()?;
                    Some(self.memory.acquire_many(kib).await.ok()?)
                }
                false => None,
            };
            let read;
            let bytes: &[u8] = match message {
                Message::Memory(b) if whole => b,
                Message::Memory(b) => header_section(b),
                Message::File(file) => {
                    let limit = if whole { size } else { HEADER_LIMIT };
                    read = crate::fsio::blocking(move || {
                        let mut buf = Vec::new();
                        std::io::Read::read_to_end(&mut std::io::Read::take(file?, limit as u64), &mut buf)?;
                        Ok(buf)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "cannot read a spooled message to check it");
                        Vec::new()
                    });
                    if whole {
                        &read
                    } else {
                        header_section(&read)
                    }
                }
            };
            Some(self.run(origin, bytes, whole).await)
        };
        match tokio::time::timeout(self.settings.timeout, work).await {
            Ok(Some(v)) => v,
            _ => {
                self.metrics
                    .inbound_auth
                    .get_or_create(&crate::metrics::CheckLabel { check: "all", result: "timeout" })
                    .inc();
                if self.settings.dmarc_enforce || self.settings.spf_fail == SpfFail::Reject {
                    // The answer could have refused it: ask the sender to come back.
                    Verdict::Refuse { reply: reply::auth_check_unavailable(), cause: RefusalCause::AuthCheckTempFail }
                } else {
                    let header =
                        format!("Authentication-Results: {}; none (checks timed out)\r\n", self.settings.hostname);
                    Verdict::Accept { headers: header }
                }
            }
        }
    }

    /// `message` is the whole message, or (`whole` false) only its header section: then DKIM and
    /// ARC are not verified, and a DMARC failure is enforced only without a DKIM signature.
    async fn run(&self, origin: &Origin<'_>, message: &[u8], whole: bool) -> Verdict {
        let s = &self.settings;
        let helo = origin.helo.trim_start_matches('[').trim_end_matches(']');
        let sender = origin.sender.map(|m| m.to_string()).unwrap_or_default();
        let parsed = AuthenticatedMessage::parse(message);
        // SPF: HELO first (RFC 7208 §2.3); MAIL FROM, or the HELO identity for the null sender.
        let spf_helo = self
            .auth
            .verify_spf(mail_auth::spf::verify::SpfParameters::verify_ehlo(origin.ip, helo, &s.hostname))
            .await;
        let spf_mail = if sender.is_empty() {
            spf_helo.clone()
        } else {
            self.auth
                .verify_spf(mail_auth::spf::verify::SpfParameters::verify_mail_from(
                    origin.ip,
                    helo,
                    &s.hostname,
                    &sender,
                ))
                .await
        };
        self.count("spf", spf_label(spf_mail.result()));
        let mut results = AuthenticationResults::new(&s.hostname)
            .with_spf_ehlo_result(&spf_helo, origin.ip, helo)
            .with_spf_mailfrom_result(&spf_mail, origin.ip, &sender, helo);
        let mail_from_domain = origin.sender.map(|m| m.domain.clone()).unwrap_or_else(|| helo.to_string());
        let Some(msg) = parsed.as_ref() else {
            // Not a parseable message: SPF only.
            if let Some(refusal) = self.spf_verdict(&spf_mail, &sender) {
                return refusal;
            }
            return Verdict::Accept { headers: results.to_header() };
        };
        let header_from = msg.from.first().cloned().unwrap_or_default();
        let (dkim, arc) = if whole {
            (self.auth.verify_dkim(msg).await, self.auth.verify_arc(msg).await)
        } else {
            self.count("dkim", "too_large");
            (Vec::new(), Default::default())
        };
        for d in &dkim {
            self.count("dkim", dkim_label(d.result()));
        }
        self.count("arc", dkim_label(arc.result()));
        let dmarc = self
            .auth
            .verify_dmarc(mail_auth::dmarc::verify::DmarcParameters::new(msg, &dkim, &mail_from_domain, &spf_mail))
            .await;
        let pass = *dmarc.dkim_result() == DmarcResult::Pass || *dmarc.spf_result() == DmarcResult::Pass;
        let temp = matches!(dmarc.dkim_result(), DmarcResult::TempError(_))
            || matches!(dmarc.spf_result(), DmarcResult::TempError(_));
        // RFC 7489 §6.6.2: the domain has a record and no aligned identifier passed. (mail-auth
        // leaves both results `none` when neither SPF nor DKIM passed at all: it is a fail.)
        let failed = dmarc.dmarc_record().is_some() && !pass && !temp;
        let dmarc = if failed && *dmarc.spf_result() == DmarcResult::None && *dmarc.dkim_result() == DmarcResult::None {
            dmarc.with_spf_result(DmarcResult::Fail(mail_auth::Error::NotAligned))
        } else {
            dmarc
        };
        if whole {
            results = results.with_dkim_results(&dkim, &header_from);
        }
        results = results.with_arc_result(&arc, origin.ip).with_dmarc_result(&dmarc);
        let mut headers = results.to_header();
        if !whole {
            // RFC 8601 §2.7.1 "policy": signed or not, we did not verify it.
            if let Some(at) = headers.rfind("\r\n") {
                headers.insert_str(at, ";\r\n\tdkim=policy reason=\"message too large to verify\"");
            }
        }
        let dmarc_label = if pass {
            "pass"
        } else if temp {
            "temperror"
        } else if failed {
            "fail"
        } else {
            "none"
        };
        self.count("dmarc", dmarc_label);
        if let Some(refusal) = self.spf_verdict(&spf_mail, &sender) {
            return refusal;
        }
        // A failure a trusted forwarder vouches for: its ARC chain passes and it sealed last.
        let sealer = msg.as_headers.iter().max_by_key(|h| h.header.i).map(|h| h.header.d.as_str());
        let vouched = failed
            && *arc.result() == DkimResult::Pass
            && sealer.is_some_and(|d| s.trusted_arc_sealers.iter().any(|t| t.eq_ignore_ascii_case(d)));
        if vouched {
            self.count("dmarc", "arc_override");
            tracing::info!(ip = %origin.ip, sealer = sealer.unwrap_or(""), domain = dmarc.domain(), "DMARC failure accepted: a trusted ARC sealer vouches for it");
        }
        // Too large to verify, and signed: the signature may well pass; unsigned, a forgery
        // cannot escape DMARC by being large.
        let unverified = failed && !whole && !msg.dkim_headers.is_empty();
        if unverified {
            self.count("dmarc", "not_enforced_unverified");
        }
        if s.dmarc_enforce && !pass && !vouched && !unverified {
            match (dmarc.policy(), failed, temp) {
                (Policy::Reject, true, _) => {
                    return Verdict::Refuse {
                        reply: reply::dmarc_rejected(dmarc.domain()),
                        cause: RefusalCause::DmarcReject,
                    };
                }
                (Policy::Quarantine, true, _) => {
                    headers.push_str(&s.quarantine_header);
                    headers.push_str("\r\n");
                }
                // A lookup failed where the answer could refuse the message (RFC 7489 §6.6.3):
                // the record (so the policy) is unknown, or a known strict one's check failed.
                (Policy::Reject | Policy::Quarantine | Policy::Unspecified, false, true) => {
                    return Verdict::Refuse {
                        reply: reply::auth_check_unavailable(),
                        cause: RefusalCause::AuthCheckTempFail,
                    };
                }
                (_, false, true) if dmarc.dmarc_record().is_none() => {
                    return Verdict::Refuse {
                        reply: reply::auth_check_unavailable(),
                        cause: RefusalCause::AuthCheckTempFail,
                    };
                }
                _ => {}
            }
        }
        Verdict::Accept { headers }
    }

    /// Whether any DNS list is configured (the Listener asks [`Checker::blocked`] only then).
    pub fn has_dns_lists(&self) -> bool {
        !self.settings.dnsbl.is_empty()
    }

    /// The block list that lists `ip`, unless an allow list does: asked at connect, every zone at
    /// once, within [`DNSL_TIMEOUT`]. A list that fails to answer does not block (fail open: a
    /// dead list must not stop all mail), and is counted.
    pub async fn blocked(&self, ip: IpAddr) -> Option<String> {
        let ip = ip.to_canonical();
        let listed = |zones: Vec<String>| {
            let resolver = self.auth.0.clone();
            let reversed = reversed_name(ip);
            async move {
                let mut asks = tokio::task::JoinSet::new();
                for zone in zones {
                    let resolver = resolver.clone();
                    let name = format!("{reversed}.{}.", zone.trim_end_matches('.'));
                    asks.spawn(async move {
                        match resolver.ipv4_lookup(name).await {
                            // 127.0.0.0/8 is a listing; 127.255.255.0/24 is the list refusing the
                            // query (Spamhaus: a public resolver, or over quota), not a listing.
                            Ok(a)
                                if a.answers().iter().any(|r| {
                                    matches!(&r.data, hickory_proto::rr::RData::A(x)
                                    if x.0.octets()[0] == 127 && x.0.octets()[1] != 255)
                                }) =>
                            {
                                (zone, Some(true))
                            }
                            Ok(_) => (zone, Some(false)),
                            Err(e) if e.is_no_records_found() => (zone, Some(false)),
                            Err(_) => (zone, None),
                        }
                    });
                }
                asks.join_all().await
            }
        };
        let work = async {
            for (zone, answer) in listed(self.settings.dnswl.clone()).await {
                match answer {
                    Some(true) => {
                        self.count("dnswl", "listed");
                        tracing::debug!(%ip, zone, "client on a DNS allow list");
                        return None;
                    }
                    Some(false) => {}
                    None => self.count("dnswl", "error"),
                }
            }
            let mut hit = None;
            for (zone, answer) in listed(self.settings.dnsbl.clone()).await {
                match answer {
                    Some(true) => hit = hit.or(Some(zone)),
                    Some(false) => {}
                    None => self.count("dnsbl", "error"),
                }
            }
            self.count("dnsbl", if hit.is_some() { "listed" } else { "clear" });
            hit
        };
        tokio::time::timeout(DNSL_TIMEOUT, work).await.unwrap_or_else(|_| {
            self.count("dnsbl", "timeout");
            None
        })
    }

    /// SPF of the MAIL FROM identity at MAIL, with `spf_fail = reject` (RFC 7208 §2.4: checked
    /// there, refused there): `None` = go on, else the refusal. Within `timeout` and a slot; a
    /// timeout defers (451 4.4.3).
    pub async fn sender(&self, ip: IpAddr, helo: &str, sender: &Mailbox) -> Option<(Reply, RefusalCause)> {
        if self.settings.spf_fail != SpfFail::Reject {
            return None;
        }
        let helo = helo.trim_start_matches('[').trim_end_matches(']');
        let address = sender.to_string();
        let work = async {
            let _slot = self.slots.acquire().await.ok()?;
            let params =
                mail_auth::spf::verify::SpfParameters::verify_mail_from(ip, helo, &self.settings.hostname, &address);
            Some(self.auth.verify_spf(params).await)
        };
        let spf = match tokio::time::timeout(self.settings.timeout, work).await {
            Ok(Some(spf)) => spf,
            _ => return Some((reply::auth_check_unavailable(), RefusalCause::AuthCheckTempFail)),
        };
        match self.spf_verdict(&spf, &address) {
            Some(Verdict::Refuse { reply, cause }) => Some((reply, cause)),
            _ => None,
        }
    }

    /// With `spf_fail = reject`: a `fail` refuses (550 5.7.23), a `temperror` defers (451 4.4.3,
    /// RFC 7208 §8.6). The null sender's bounces are not refused on SPF.
    fn spf_verdict(&self, spf: &mail_auth::SpfOutput, sender: &str) -> Option<Verdict> {
        if self.settings.spf_fail != SpfFail::Reject || sender.is_empty() {
            return None;
        }
        match spf.result() {
            SpfResult::Fail => Some(Verdict::Refuse { reply: reply::spf_failed(), cause: RefusalCause::SpfFail }),
            SpfResult::TempError => {
                Some(Verdict::Refuse { reply: reply::auth_check_unavailable(), cause: RefusalCause::AuthCheckTempFail })
            }
            _ => None,
        }
    }
}

/// The header section of `message`, blank line included (all of it when there is none).
fn header_section(message: &[u8]) -> &[u8] {
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &message[..i + 4],
        None => message,
    }
}

/// How long the DNS lists may delay a client's greeting, in all.
pub const DNSL_TIMEOUT: Duration = Duration::from_secs(5);

/// The name a DNS list is asked under: the address's octets (IPv4) or nibbles (IPv6) reversed.
fn reversed_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut parts = Vec::with_capacity(32);
            for byte in v6.octets().iter().rev() {
                parts.push(format!("{:x}", byte & 0x0f));
                parts.push(format!("{:x}", byte >> 4));
            }
            parts.join(".")
        }
    }
}

fn spf_label(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dkim_label(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::reversed_name;

    #[test]
    fn dns_list_names() {
        for (ip, want) in [
            ("192.0.2.99", "99.2.0.192"),
            ("2001:db8::1", "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"),
        ] {
            assert_eq!(reversed_name(ip.parse().unwrap()), want);
        }
    }
}
