//! The one catalogue of SMTP replies mailroot sends: codes, enhanced status codes (RFC 3463) and texts.
//!
//! Handlers never spell a reply literal themselves; they call a constructor here, so that the same
//! condition always gets the same code, status and wording.

use std::borrow::Cow;
use std::fmt::Write as _;

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code (RFC 2034). `None` for the greeting, EHLO, 354 and HELP-less replies
    /// where RFC 2034 does not use one.
    pub status: Option<&'static str>,
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    fn new(code: u16, status: &'static str, text: impl Into<Cow<'static, str>>) -> Self {
        Reply { code, status: Some(status), lines: vec![text.into()] }
    }

    fn plain(code: u16, text: impl Into<Cow<'static, str>>) -> Self {
        Reply { code, status: None, lines: vec![text.into()] }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the wire form (CRLF line ends) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut s = String::new();
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let _ = write!(s, "{}{}", self.code, sep);
            if let Some(st) = self.status {
                s.push_str(st);
                s.push(' ');
            }
            s.push_str(line);
            s.push_str("\r\n");
        }
        if self.lines.is_empty() {
            let _ = write!(s, "{}\r\n", self.code);
        }
        out.extend_from_slice(s.as_bytes());
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v);
        v
    }

    /// The reply as one log-friendly line.
    pub fn summary(&self) -> String {
        let text = self.lines.last().map(|l| l.as_ref()).unwrap_or("");
        match self.status {
            Some(st) => format!("{} {} {}", self.code, st, text),
            None => format!("{} {}", self.code, text),
        }
    }
}

// --- connection level -------------------------------------------------------------------------

pub fn greeting(hostname: &str) -> Reply {
    Reply::plain(220, format!("{hostname} ESMTP mailroot ready"))
}

pub fn closing(hostname: &str) -> Reply {
    Reply::new(221, "2.0.0", format!("{hostname} closing connection"))
}

pub fn too_many_connections(hostname: &str) -> Reply {
    Reply::new(421, "4.7.0", format!("{hostname} too many connections, try again later"))
}

pub fn idle_timeout(hostname: &str) -> Reply {
    Reply::new(421, "4.4.2", format!("{hostname} idle timeout, closing connection"))
}

pub fn too_slow(hostname: &str) -> Reply {
    Reply::new(421, "4.4.2", format!("{hostname} Connection too slow, closing"))
}

pub fn too_many_errors(hostname: &str) -> Reply {
    Reply::new(421, "4.7.0", format!("{hostname} too many errors, closing connection"))
}

pub fn too_many_messages(hostname: &str) -> Reply {
    Reply::new(421, "4.7.0", format!("{hostname} too many messages in this connection, reconnect"))
}

pub fn paused(hostname: &str) -> Reply {
    Reply::new(421, "4.3.2", format!("{hostname} service paused, try again later"))
}

pub fn shutting_down(hostname: &str) -> Reply {
    Reply::new(421, "4.3.2", format!("{hostname} service shutting down, try again later"))
}

pub fn disconnected(hostname: &str) -> Reply {
    Reply::new(421, "4.7.0", format!("{hostname} closing connection: disconnected by the administrator"))
}

// --- positive ---------------------------------------------------------------------------------

/// The client's EHLO/HELO argument as echoed back: at most 64 characters, so a reply line stays
/// within RFC 5321's 512 octets whatever the client sent.
fn echo(client: &str) -> String {
    let mut s: String = client.chars().take(64).collect();
    if s.len() < client.len() {
        s.push_str("...");
    }
    s
}

/// What an EHLO reply offers beyond the fixed extensions, which depends on the session.
#[derive(Debug, Clone, Copy, Default)]
pub struct Offer {
    pub starttls: bool,
    pub auth: bool,
}

pub fn ehlo(hostname: &str, client: &str, max_size: u64, offer: Offer) -> Reply {
    let mut lines: Vec<std::borrow::Cow<'static, str>> = vec![
        format!("{hostname} greets {}", echo(client)).into(),
        "PIPELINING".into(),
        format!("SIZE {max_size}").into(),
        "8BITMIME".into(),
        "ENHANCEDSTATUSCODES".into(),
        "SMTPUTF8".into(),
        "DSN".into(),
        "CHUNKING".into(),
    ];
    if offer.starttls {
        lines.push("STARTTLS".into());
    }
    if offer.auth {
        lines.push("AUTH PLAIN LOGIN".into());
    }
    lines.push("HELP".into());
    Reply { code: 250, status: None, lines }
}

pub fn ready_for_tls() -> Reply {
    Reply::new(220, "2.0.0", "Ready to start TLS")
}

/// RFC 7372 §3.2: the sender's domain says this client may not send its mail (SPF `fail`).
pub fn spf_failed() -> Reply {
    Reply::new(550, "5.7.23", "SPF validation failed: the sender's domain does not allow this client")
}

/// RFC 7489 §6.6.3 (RFC 7372's 5.7.1): the From: domain's DMARC policy says to reject it.
pub fn dmarc_rejected(domain: &str) -> Reply {
    let domain: String = domain.chars().filter(|c| c.is_ascii_graphic()).take(255).collect();
    Reply::new(550, "5.7.1", format!("Rejected by the DMARC policy of {domain}"))
}

/// A lookup that decides the message failed (RFC 7208 §8.6, RFC 7489): come back later.
pub fn auth_check_unavailable() -> Reply {
    Reply::new(451, "4.4.3", "Sender authentication temporarily unavailable, try again later")
}

/// A rate limit (messages or recipients per time) is reached: try again later.
pub fn rate_limited(what: &str) -> Reply {
    Reply::new(450, "4.7.1", format!("Too many {what} from you in a short time, try again later"))
}

/// Too many unknown recipients (directory harvesting): the connection ends.
pub fn harvesting(hostname: &str) -> Reply {
    Reply::new(421, "4.7.0", format!("{hostname} Too many unknown recipients, closing connection"))
}

/// RFC 4954 §6: a submission server takes mail only from authenticated clients.
pub fn auth_required() -> Reply {
    Reply::new(530, "5.7.0", "Authentication required")
}

pub fn tls_required() -> Reply {
    Reply::new(530, "5.7.0", "Must issue a STARTTLS command first")
}

/// The client is on a DNS block list (Postfix's wording): sent instead of the greeting.
pub fn blocked_by_dnsbl(hostname: &str, ip: std::net::IpAddr, zone: &str) -> Reply {
    let zone: String = zone.chars().filter(|c| c.is_ascii_graphic()).take(255).collect();
    Reply::new(554, "5.7.1", format!("{hostname} Service unavailable; client [{ip}] blocked using {zone}"))
}

pub fn access_denied(hostname: &str) -> Reply {
    Reply::new(554, "5.7.1", format!("{hostname} Access denied"))
}

pub fn too_many_connections_from_ip(hostname: &str) -> Reply {
    Reply::new(421, "4.7.0", format!("{hostname} Too many connections from your address, try again later"))
}

/// `334 <challenge>`: the challenge is already base64.
pub fn auth_challenge(challenge: &'static str) -> Reply {
    Reply { code: 334, status: None, lines: vec![challenge.into()] }
}

pub fn auth_ok() -> Reply {
    Reply::new(235, "2.7.0", "Authentication successful")
}

pub fn auth_failed() -> Reply {
    Reply::new(535, "5.7.8", "Authentication credentials invalid")
}

/// Too many failed AUTH attempts from the client's address (checked across connections).
pub fn auth_locked_out() -> Reply {
    Reply::new(454, "4.7.0", "Too many failed authentication attempts from your address; try again later")
}

pub fn auth_cancelled() -> Reply {
    Reply::new(501, "5.0.0", "Authentication cancelled")
}

pub fn auth_bad_encoding() -> Reply {
    Reply::new(501, "5.5.2", "Cannot decode the response (base64 expected)")
}

pub fn auth_mechanism_unsupported() -> Reply {
    Reply::new(504, "5.5.4", "Unrecognized authentication mechanism")
}

pub fn auth_needs_encryption() -> Reply {
    Reply::new(538, "5.7.11", "Encryption required for requested authentication mechanism")
}

pub fn chunk_received(size: u64) -> Reply {
    Reply::new(250, "2.0.0", format!("{size} octets received"))
}

pub fn helo(hostname: &str, client: &str) -> Reply {
    Reply::plain(250, format!("{hostname} greets {}", echo(client)))
}

pub fn ok() -> Reply {
    Reply::new(250, "2.0.0", "OK")
}

pub fn reset_ok() -> Reply {
    Reply::new(250, "2.0.0", "Reset OK")
}

pub fn sender_ok() -> Reply {
    Reply::new(250, "2.1.0", "Sender OK")
}

pub fn recipient_ok() -> Reply {
    Reply::new(250, "2.1.5", "Recipient OK")
}

pub fn start_data() -> Reply {
    Reply::plain(354, "Start mail input; end with <CRLF>.<CRLF>")
}

pub fn queued(id: u64) -> Reply {
    Reply::new(250, "2.0.0", format!("OK queued as {id}"))
}

pub fn cannot_vrfy() -> Reply {
    Reply::new(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
}

pub fn help() -> Reply {
    Reply::new(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP; see RFC 5321")
}

// --- temporary failures -----------------------------------------------------------------------

pub fn queue_unavailable() -> Reply {
    Reply::new(451, "4.3.0", "Temporary failure storing the message, try again later")
}

pub fn insufficient_storage() -> Reply {
    Reply::new(452, "4.3.1", "Insufficient system storage, try again later")
}

pub fn too_many_recipients() -> Reply {
    Reply::new(452, "4.5.3", "Too many recipients")
}

// --- permanent failures -----------------------------------------------------------------------

pub fn line_too_long() -> Reply {
    Reply::new(500, "5.5.6", "Line too long (limit is 512 octets)")
}

pub fn unrecognized() -> Reply {
    Reply::new(500, "5.5.2", "Command not recognized")
}

pub fn syntax(detail: &'static str) -> Reply {
    Reply::new(501, "5.5.4", detail)
}

pub fn bad_sender_address(detail: &'static str) -> Reply {
    Reply::new(501, "5.1.7", format!("Bad sender address syntax: {detail}"))
}

pub fn bad_recipient_address(detail: &'static str) -> Reply {
    Reply::new(501, "5.1.3", format!("Bad recipient address syntax: {detail}"))
}

pub fn not_implemented() -> Reply {
    Reply::new(502, "5.5.1", "Command not implemented")
}

pub fn bad_sequence(detail: &'static str) -> Reply {
    Reply::new(503, "5.5.1", detail)
}

/// The mailbox server says this recipient does not exist (checked at RCPT); `detail` is its
/// reply text, cleaned of anything that is not printable ASCII and cut short.
pub fn unknown_recipient(detail: &str) -> Reply {
    let detail: String = detail.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(200).collect();
    Reply::new(550, "5.1.1", format!("Recipient address rejected: {}", detail.trim()))
}

/// The recipient could not be checked with the mailbox server now (it refused for now, did not
/// answer in time, or cannot be reached): a temporary answer, never a 250 for a maybe-unknown user.
pub fn recipient_unverified(detail: &str) -> Reply {
    let detail: String = detail.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(200).collect();
    Reply::new(451, "4.4.3", format!("Cannot check the recipient now, try again later: {}", detail.trim()))
}

pub fn sender_not_owned() -> Reply {
    Reply::new(553, "5.7.1", "Sender address not owned by the authenticated user")
}

/// The same refusal for the `From:` header at the end of DATA: 550, as RFC 5321 §4.3.2 lists
/// for DATA (553 belongs to MAIL and RCPT).
pub fn from_not_owned() -> Reply {
    Reply::new(550, "5.7.1", "From: header address not owned by the authenticated user")
}

pub fn relay_denied() -> Reply {
    Reply::new(550, "5.7.1", "Relaying denied")
}

pub fn size_exceeded() -> Reply {
    Reply::new(552, "5.3.4", "Message size exceeds fixed maximum message size")
}

pub fn utf8_needs_smtputf8() -> Reply {
    Reply::new(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
}

pub fn no_valid_recipients() -> Reply {
    Reply::new(554, "5.5.1", "No valid recipients")
}

pub fn hop_count_exceeded() -> Reply {
    Reply::new(554, "5.4.6", "Too many Received headers: mail loop detected")
}

pub fn data_line_too_long() -> Reply {
    Reply::new(554, "5.6.0", "Message refused: a line is longer than 1000 octets")
}

pub fn bare_lf() -> Reply {
    Reply::new(554, "5.6.0", "Message refused: bare <LF> in message data (lines must end in <CR><LF>)")
}

pub fn nul_character() -> Reply {
    Reply::new(554, "5.6.0", "Message refused: NUL characters are not allowed in a message (RFC 5322)")
}

pub fn empty_message() -> Reply {
    Reply::new(554, "5.6.0", "Message refused: it is empty (RFC 5322 requires at least Date: and From:)")
}

/// A BDAT chunk larger than a whole message may be: reading it only to stay in step would be
/// unbounded work, so the connection ends.
pub fn chunk_too_big() -> Reply {
    Reply::new(552, "5.3.4", "Chunk exceeds the maximum message size; closing the connection")
}

pub fn bare_cr() -> Reply {
    Reply::new(554, "5.6.0", "Message refused: bare <CR> in message data (lines must end in <CR><LF>)")
}

pub fn unsupported_parameter() -> Reply {
    Reply::new(555, "5.5.4", "Unsupported or malformed MAIL/RCPT parameter")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms() {
        let cases: &[(Reply, &str)] = &[
            (ok(), "250 2.0.0 OK\r\n"),
            (greeting("mx.test"), "220 mx.test ESMTP mailroot ready\r\n"),
            (start_data(), "354 Start mail input; end with <CRLF>.<CRLF>\r\n"),
            (queued(42), "250 2.0.0 OK queued as 42\r\n"),
        ];
        for (reply, wire) in cases {
            assert_eq!(String::from_utf8_lossy(&reply.to_bytes()), *wire);
        }
        let e = String::from_utf8(ehlo("mx.test", "client", 1000, Offer::default()).to_bytes()).unwrap_or_default();
        assert!(e.starts_with("250-mx.test greets client\r\n250-PIPELINING\r\n250-SIZE 1000\r\n"));
        assert!(e.contains("250-CHUNKING\r\n") && !e.contains("STARTTLS") && !e.contains("AUTH"));
        assert!(e.ends_with("250 HELP\r\n"));
        let e = String::from_utf8(ehlo("mx.test", "c", 1, Offer { starttls: true, auth: true }).to_bytes())
            .unwrap_or_default();
        assert!(e.contains("250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250 HELP\r\n"), "{e}");
    }
}
