//! The one catalogue of delivery results mailroot states itself: codes, enhanced status codes
//! (RFC 3463) and texts for every condition a delivery actor or the queue finds on its own side
//! (DNS, connecting, TLS, a peer's misbehaviour, the disk, a delivery actor that died). What a
//! server says goes through [`Outcome::from_reply`] instead. The inbound replies' catalogue is
//! `mailroot_protocol::reply`; together they hold every code and text mailroot writes.
//!
//! Delivery actors call a constructor here, never spell a result themselves, so the same
//! condition always reads the same in the queue, the logs and the notifications.

use std::fmt::Display;
use std::io;

use super::Outcome;

// --- our own side: the queue, the delivery actors, the disk ------------------------------------

/// A local I/O error (a full disk, a wrong permission): always temporary, because it is the
/// operator's to fix and the message must wait for it rather than bounce. A full disk says so.
pub fn local_io(context: &str, e: &io::Error) -> Outcome {
    if crate::fsio::is_no_space(e) {
        return Outcome::new(452, "4.3.1", format!("{context}: {e}"));
    }
    Outcome::new(451, "4.3.0", format!("{context}: {e}"))
}

pub fn dropped(id: u64) -> Outcome {
    Outcome::new(250, "2.0.0", format!("dropped as {id}.eml"))
}

pub fn maildir_delivered(path: impl Display) -> Outcome {
    Outcome::new(250, "2.0.0", format!("delivered to {path}"))
}

pub fn unmappable_mailbox() -> Outcome {
    Outcome::new(550, "5.1.3", "the address cannot be mapped to a mailbox folder")
}

pub fn actor_not_running(route: &str) -> Outcome {
    Outcome::new(451, "4.3.0", format!("delivery actor {route} is not running"))
}

pub fn actor_failed(route: &str, e: impl Display) -> Outcome {
    Outcome::new(451, "4.3.0", format!("delivery actor {route} failed during the attempt ({e}); it was restarted"))
}

pub fn actor_unavailable(e: impl Display) -> Outcome {
    Outcome::new(451, "4.3.0", format!("delivery actor unavailable: {e}"))
}

/// A delivery actor left a recipient out of its report.
pub fn no_result() -> Outcome {
    Outcome::new(451, "4.3.0", "delivery actor gave no result for this recipient")
}

pub fn internal_error(e: impl Display) -> Outcome {
    Outcome::new(451, "4.3.0", format!("Internal error during delivery: {e}"))
}

pub fn limits_closed() -> Outcome {
    Outcome::new(451, "4.3.0", "Outbound connection limits are shut down")
}

pub fn returned_by_admin() -> Outcome {
    Outcome::new(550, "5.0.0", "The message was returned by the mail system administrator")
}

/// A temporary failure that lasted past `expire_after`: permanent, with the code and server of
/// the last attempt and RFC 3463's 4.4.7 ("delivery time expired").
pub fn expired(waited: &str, last: &Outcome) -> Outcome {
    Outcome {
        code: last.code,
        enhanced: super::EnhancedCode::parse("4.4.7"),
        text: format!("Message expired after {waited} in the queue; last result: {last}"),
        ..last.clone()
    }
    .expired()
}

// --- finding the next hop ------------------------------------------------------------------------

pub fn null_mx(domain: &str) -> Outcome {
    Outcome::new(556, "5.1.10", format!("Domain {domain} accepts no mail (null MX, RFC 7505)"))
}

pub fn nxdomain(domain: &str) -> Outcome {
    Outcome::new(550, "5.1.2", format!("Domain {domain} does not exist (NXDOMAIN)"))
}

/// `msg` comes from the resolver and may hold what a hostile DNS server sent: control
/// characters are removed and it is cut to 200 characters.
pub fn dns_failed(kind: &str, name: &str, msg: impl Display) -> Outcome {
    let msg: String = msg.to_string().chars().filter(|c| !c.is_control()).take(200).collect();
    Outcome::new(451, "4.4.3", format!("DNS lookup of {kind} for {name} failed: {msg}"))
}

pub fn no_route(domain: &str) -> Outcome {
    Outcome::new(451, "4.4.0", format!("No route to {domain}"))
}

/// The smart host could not be used, whatever the reason: the operator's problem, never a
/// reason to bounce mail.
pub fn smart_host_unusable(why: &Outcome) -> Outcome {
    Outcome::new(451, "4.4.4", format!("Smart host unusable: {why}"))
}

pub fn no_address(names: &[&str]) -> Outcome {
    Outcome::new(550, "5.4.4", format!("No address found for {}", names.join(", ")))
}

pub fn no_host_answered() -> Outcome {
    Outcome::new(451, "4.4.1", "No host answered")
}

// --- talking to a server -------------------------------------------------------------------------

/// Connecting to `what` (`the LMTP server x`, `mx.example[192.0.2.1]`) failed.
pub fn cannot_connect(what: &str, e: impl Display) -> Outcome {
    Outcome::new(451, "4.4.1", format!("cannot connect to {what}: {e}"))
}

pub fn connect_timed_out(what: &str) -> Outcome {
    Outcome::new(451, "4.4.1", format!("timed out connecting to {what}"))
}

/// A read or write failed: `what` says which (`writing to`, `connection lost with`).
pub fn network_error(what: &str, peer: &str, e: impl Display) -> Outcome {
    Outcome::new(451, "4.4.2", format!("{what} {peer}: {e}"))
}

pub fn timed_out(what: &str, peer: &str) -> Outcome {
    Outcome::new(451, "4.4.2", format!("Timed out {what} {peer}"))
}

/// The server closed the connection; `when` says at which point (may be empty).
pub fn peer_closed(peer: &str, when: &str) -> Outcome {
    let text = format!("{peer} closed the connection {when}");
    Outcome::new(451, "4.4.2", text.trim_end())
}

/// The connection ended before the server answered for this recipient.
pub fn no_reply() -> Outcome {
    Outcome::new(451, "4.4.2", "no reply")
}

/// The server's replies could not be read (too long, not a reply): see `ReplyParser`.
pub fn protocol_error(peer: &str, e: impl Display) -> Outcome {
    Outcome::new(451, "4.5.0", format!("Protocol error from {peer}: {e}"))
}

/// RFC 6531 §3.7.5: a UTF-8 address cannot go to a server without SMTPUTF8.
pub fn no_smtputf8(peer: &str) -> Outcome {
    Outcome::new(553, "5.6.7", format!("{peer} does not support internationalized addresses (no SMTPUTF8)"))
}

/// RFC 6152: 8-bit data cannot go to a server without 8BITMIME (and we do not convert).
pub fn no_8bitmime(peer: &str) -> Outcome {
    Outcome::new(
        554,
        "5.6.3",
        format!("{peer} does not accept 8-bit data (no 8BITMIME); the message was not converted"),
    )
}

/// The server announced a `SIZE` limit below the message.
pub fn too_big_for(peer: &str, size: usize, limit: u64) -> Outcome {
    Outcome::new(552, "5.3.4", format!("Message of {size} bytes exceeds the {limit}-byte limit of {peer}"))
}

pub fn tls_not_offered(host: &str) -> Outcome {
    Outcome::new(451, "4.7.10", format!("TLS is required for this domain but {host} did not offer STARTTLS"))
}

pub fn starttls_twice(peer: &str) -> Outcome {
    Outcome::new(451, "4.7.5", format!("STARTTLS twice with {peer}"))
}

/// A failed handshake; a certificate that did not verify says so first (RFC 3463 4.7.5).
pub fn tls_handshake_failed(peer: &str, e: impl Display) -> Outcome {
    let e = e.to_string();
    if e.contains("TLSA mismatch") {
        return Outcome::new(451, "4.7.5", format!("DANE: certificate of {peer} does not match its TLSA records: {e}"));
    }
    if e.contains("invalid peer certificate") {
        return Outcome::new(451, "4.7.5", format!("certificate of {peer} not trusted: {e}"));
    }
    Outcome::new(451, "4.7.5", format!("TLS handshake with {peer} failed: {e}"))
}

pub fn auth_failed(peer: &str, reply: impl Display) -> Outcome {
    Outcome::new(451, "4.7.8", format!("login to {peer} refused ({reply}); check the credentials"))
}

/// Our own rate limit for a destination held the message back (not an attempt).
pub fn held_back(destination: &str, wait: std::time::Duration) -> Outcome {
    Outcome::new(
        451,
        "4.4.5",
        format!("held back by the rate limit for {destination}; next in {}s", wait.as_secs().max(1)),
    )
}

pub fn dane_unusable(e: impl Display) -> Outcome {
    Outcome::new(451, "4.7.5", format!("DANE: {e}"))
}

pub fn mta_sts_mx_mismatch(domain: &str, allowed: &[String]) -> Outcome {
    Outcome::new(
        451,
        "4.7.5",
        format!("MTA-STS: none of the MX hosts of {domain} is in its policy (mx: {})", allowed.join(", ")),
    )
}

pub fn no_trusted_roots(e: impl Display) -> Outcome {
    Outcome::new(451, "4.7.5", format!("cannot verify certificates: {e}"))
}

pub fn auth_not_offered(peer: &str) -> Outcome {
    Outcome::new(451, "4.7.12", format!("{peer} offers neither AUTH PLAIN nor AUTH LOGIN; cannot log in"))
}

pub fn auth_unprotected(peer: &str) -> Outcome {
    Outcome::new(
        451,
        "4.7.12",
        format!("not sending credentials to {peer}: the connection is not encrypted with a verified certificate"),
    )
}

#[cfg(test)]
mod tests {
    use super::super::Class;
    use super::*;

    /// Every constructor's class agrees with its code and its enhanced code's class, and each
    /// one carries an enhanced code (RFC 3463) for the reports.
    #[test]
    fn catalogue_is_consistent() {
        let last = no_host_answered();
        let all = [
            local_io("x", &io::Error::other("e")),
            local_io("x", &io::Error::from_raw_os_error(28)),
            dropped(7),
            maildir_delivered("/m/new/x"),
            unmappable_mailbox(),
            actor_not_running("smtp"),
            actor_failed("smtp", "gone"),
            actor_unavailable("closed"),
            no_result(),
            internal_error("panic"),
            limits_closed(),
            returned_by_admin(),
            null_mx("d"),
            nxdomain("d"),
            dns_failed("MX", "d", "servfail\r\nX-Injected: 1"),
            no_route("d"),
            smart_host_unusable(&nxdomain("d")),
            no_address(&["a", "b"]),
            no_8bitmime("h"),
            too_big_for("h", 10, 5),
            last.clone(),
            cannot_connect("h", "refused"),
            connect_timed_out("h"),
            network_error("writing to", "h", "reset"),
            timed_out("waiting for", "h"),
            peer_closed("h", ""),
            no_reply(),
            protocol_error("h", "line too long"),
            no_smtputf8("h"),
            tls_not_offered("h"),
            starttls_twice("h"),
            tls_handshake_failed("h", "bad cert"),
        ];
        for o in &all {
            let e = o.enhanced.unwrap_or_else(|| panic!("{o}: no enhanced code"));
            assert_eq!(o.class, Class::of_code(o.code), "{o}");
            assert_eq!(u16::from(e.class), o.code / 100, "{o}");
            assert!(!o.text.contains(['\r', '\n']), "{o}");
            assert_eq!(o.remote_mta, None, "{o}");
        }
        assert_eq!(local_io("x", &io::Error::from_raw_os_error(28)).to_string().get(..9), Some("452 4.3.1"));
        assert_eq!(peer_closed("h", "").to_string(), "451 4.4.2 h closed the connection");
    }

    #[test]
    fn expiry_keeps_the_last_attempt() {
        let last = Outcome::from_reply(451, "4.2.1 try later").from_mta(Some("mx[192.0.2.1]".into()));
        let o = expired("5d", &last);
        assert_eq!(o.class, Class::Permanent);
        assert_eq!(o.status().to_string(), "4.4.7");
        assert_eq!(o.remote_mta.as_deref(), Some("mx[192.0.2.1]"));
        assert_eq!(o.to_string(), "451 4.4.7 Message expired after 5d in the queue; last result: 451 4.2.1 try later");
    }
}
