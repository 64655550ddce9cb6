//! Delivery status notifications (RFC 3464): non-delivery reports, delay notices and success
//! notices, built with mail-builder from plain data. No I/O and no clock: the caller passes the
//! time in, which keeps this table-testable.

use std::borrow::Cow;

use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{BodyPart, MimePart};
use mail_builder::MessageBuilder;

use crate::protocol::dsn::{xtext_decode, Ret};
use crate::protocol::outcome::Outcome;
use crate::protocol::received::rfc5322_date;

/// Which report, i.e. which `Action:` its recipients carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    Failure,
    Delay,
    Success,
}

/// One recipient in a report.
#[derive(Debug, Clone)]
pub struct ReportRecipient {
    pub address: String,
    /// `ORCPT` as received (`rfc822;xtext`).
    pub orcpt: Option<String>,
    /// `failed`, `delayed`, `delivered` or `relayed`.
    pub action: &'static str,
    /// The last result: a remote reply (`550 5.1.1 …`, with its `remote_mta`) or our own reason.
    pub result: Option<Outcome>,
    /// Delay notices: when we give up.
    pub will_retry_until: Option<u64>,
}

pub struct Report<'a> {
    pub kind: ReportKind,
    pub hostname: &'a str,
    pub queue_id: u64,
    /// The original envelope sender: the report goes there.
    pub to: &'a str,
    pub envid: Option<&'a str>,
    pub arrival: u64,
    pub now: u64,
    pub recipients: Vec<ReportRecipient>,
    /// The original message as stored.
    pub original: &'a [u8],
    /// `RET`; when the sender did not say, headers only.
    pub ret: Option<Ret>,
    /// Messages larger than this are returned as headers only whatever `RET` says.
    pub max_full: usize,
}

/// The `Status:` of a recipient (RFC 3463): its last result's enhanced code, or, when there was
/// no attempt yet, `X.0.0` of the action's class.
fn status_of(rc: &ReportRecipient) -> String {
    match (&rc.result, rc.action) {
        (Some(o), _) => o.status().to_string(),
        (None, "delivered" | "relayed") => "2.0.0".into(),
        (None, "failed") => "5.0.0".into(),
        (None, _) => "4.0.0".into(),
    }
}

/// Keeps header and report field values on one line and of sane length.
fn field(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(900).collect()
}

/// The header block of a stored message (up to the first empty line).
pub fn header_block(message: &[u8]) -> &[u8] {
    let end = message.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 2).unwrap_or(message.len());
    &message[..end]
}

fn subject_of(message: &[u8]) -> Option<String> {
    let headers = String::from_utf8_lossy(header_block(message));
    let mut lines = headers.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        // `get`, not slicing: byte 8 may fall inside a UTF-8 character of any header line.
        if let Some(rest) = line.get(..8).filter(|h| h.eq_ignore_ascii_case("subject:")).and_then(|_| line.get(8..)) {
            let mut v = rest.trim().to_string();
            while let Some(next) = lines.peek().filter(|l| l.starts_with([' ', '\t'])) {
                v.push(' ');
                v.push_str(next.trim());
                lines.next();
            }
            return Some(field(&v));
        }
    }
    None
}

/// Builds the complete report message (CRLF line ends, ready to queue from `<>`).
pub fn build(r: &Report) -> Vec<u8> {
    let (subject, intro) = match r.kind {
        ReportKind::Failure => (
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to one or more recipients. It has been given up on.",
        ),
        ReportKind::Delay => (
            "Delayed Mail (still being retried)",
            "Your message has not been delivered yet to one or more recipients. Delivery will be retried; \
             you do not need to send it again. You will be told if it finally fails.",
        ),
        ReportKind::Success => ("Successful Mail Delivery Report", "Your message was delivered to these recipients."),
    };
    let mut human =
        format!("This is the mail system at {host}.\r\n\r\n{intro}\r\n\r\n", host = field(r.hostname), intro = intro);
    if let Some(s) = subject_of(r.original) {
        human.push_str(&format!("Subject of your message: {s}\r\n\r\n"));
    }
    for rc in &r.recipients {
        let result = rc.result.as_ref().map(|o| o.to_string()).unwrap_or_default();
        human.push_str(&format!("<{}>: {}\r\n", field(&rc.address), field(&result)));
        if let Some(until) = rc.will_retry_until {
            human.push_str(&format!("    (will be retried until {})\r\n", rfc5322_date(until)));
        }
    }

    // RFC 6533: a report about internationalized mail (a UTF-8 address, or raw UTF-8 in the
    // original's header, which only SMTPUTF8 allows) is a global delivery status report.
    let global = !r.to.is_ascii()
        || r.recipients.iter().any(|rc| !rc.address.is_ascii() || rc.orcpt.as_ref().is_some_and(|o| !o.is_ascii()))
        || !header_block(r.original).is_ascii();
    let addr_type = |kind: &str, addr: &str| if global && !addr.is_ascii() { "utf-8".to_string() } else { field(kind) };
    let mut status = format!("Reporting-MTA: dns; {}\r\n", field(r.hostname));
    if let Some(envid) = r.envid {
        status.push_str(&format!("Original-Envelope-Id: {}\r\n", field(envid)));
    }
    status.push_str(&format!("X-Mailroot-Queue-ID: {}\r\n", r.queue_id));
    status.push_str(&format!("Arrival-Date: {}\r\n", rfc5322_date(r.arrival)));
    for rc in &r.recipients {
        status.push_str("\r\n");
        if let Some(orcpt) = &rc.orcpt {
            // ORCPT stays in xtext on the wire (RFC 3464 §2.3.1); show the decoded form when valid.
            let (kind, addr) = orcpt.split_once(';').unwrap_or(("rfc822", orcpt));
            let addr = xtext_decode(addr).unwrap_or_else(|| addr.to_string());
            status.push_str(&format!("Original-Recipient: {}; {}\r\n", addr_type(kind, &addr), field(&addr)));
        }
        status.push_str(&format!("Final-Recipient: {}; {}\r\n", addr_type("rfc822", &rc.address), field(&rc.address)));
        status.push_str(&format!("Action: {}\r\n", rc.action));
        status.push_str(&format!("Status: {}\r\n", status_of(rc)));
        if let Some((mta, o)) = rc.result.as_ref().and_then(|o| Some((o.remote_mta.as_ref()?, o))) {
            status.push_str(&format!("Remote-MTA: {}\r\n", field(&remote_mta_field(mta))));
            status.push_str(&format!("Diagnostic-Code: smtp; {}\r\n", field(&o.to_string())));
        }
        status.push_str(&format!("Last-Attempt-Date: {}\r\n", rfc5322_date(r.now)));
        if let Some(until) = rc.will_retry_until {
            status.push_str(&format!("Will-Retry-Until: {}\r\n", rfc5322_date(until)));
        }
    }

    let full = r.kind == ReportKind::Failure && r.ret == Some(Ret::Full) && r.original.len() <= r.max_full;
    let (message_type, headers_type, status_type) = match global {
        true => ("message/global", "text/global-headers", "global-delivery-status"),
        false => ("message/rfc822", "text/rfc822-headers", "delivery-status"),
    };
    let returned: Vec<u8> = if full {
        let mut v =
            format!("Content-Type: {message_type}\r\nContent-Description: Undelivered message\r\n\r\n").into_bytes();
        v.extend_from_slice(r.original);
        v
    } else {
        let mut v =
            format!("Content-Type: {headers_type}\r\nContent-Description: Message headers\r\n\r\n").into_bytes();
        v.extend_from_slice(header_block(r.original));
        v
    };
    let returned = String::from_utf8_lossy(&returned).into_owned();

    let parts = vec![
        MimePart::new(ContentType::new("text/plain").attribute("charset", "utf-8"), BodyPart::from(human))
            .transfer_encoding("8bit"),
        MimePart::raw(BodyPart::from(format!(
            "Content-Type: message/{status_type}\r\nContent-Description: Delivery report\r\n\r\n{status}"
        ))),
        MimePart::raw(BodyPart::Text(Cow::Owned(returned))),
    ];
    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", status_type),
        BodyPart::Multipart(parts),
    );
    let from = format!("MAILER-DAEMON@{}", field(r.hostname));
    let to = if r.to.is_empty() { "undisclosed-recipients:;".to_string() } else { field(r.to) };
    let builder = MessageBuilder::new().from(("Mail Delivery System".to_string(), from));
    // A UTF-8 address goes into the header as it is (RFC 6532): it is sent with SMTPUTF8.
    let builder = if to.is_ascii() { builder.to(to) } else { builder.header("To", Raw::new(format!("<{to}>"))) };
    builder
        .subject(subject)
        .date(r.now as i64)
        .message_id(format!("{}.{}.{}@{}", r.queue_id, r.now, subject.len(), field(r.hostname)))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(report)
        .write_to_vec()
        .unwrap_or_default()
}

/// The `Remote-MTA` field's value (RFC 3464 §2.3.5, `dns; name`) for how a delivery actor named
/// its peer: `host[ip]` (SMTP) gives the host name, or the address in brackets when the host was
/// an address (a smart host given as `[192.0.2.1]`); `ip:port` or `host:port` (LMTP over TCP)
/// likewise without the port; a Unix socket path is not a DNS name and says so (`x-unix`).
fn remote_mta_field(mta: &str) -> String {
    use std::net::IpAddr;
    let literal = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    };
    let name = |host: &str| match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip) => literal(ip),
        Err(_) => host.to_string(),
    };
    if let Some(path) = mta.strip_prefix("unix:").or(mta.starts_with('/').then_some(mta)) {
        return format!("x-unix; {path}");
    }
    if let Some((host, rest)) = mta.split_once('[') {
        if rest.ends_with(']') && !host.is_empty() {
            return format!("dns; {}", name(host));
        }
    }
    if let Ok(addr) = mta.parse::<std::net::SocketAddr>() {
        return format!("dns; {}", literal(addr.ip()));
    }
    match mta.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => format!("dns; {}", name(host)),
        _ => format!("dns; {}", name(mta)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn remote_mta_names() {
        for (mta, want) in [
            ("mx1.example.com[192.0.2.1]", "dns; mx1.example.com"),
            ("127.0.0.1[127.0.0.1]", "dns; [127.0.0.1]"),
            ("::1[::1]", "dns; [IPv6:::1]"),
            ("127.0.0.1:2603", "dns; [127.0.0.1]"),
            ("[::1]:24", "dns; [IPv6:::1]"),
            ("lmtp.example.com:24", "dns; lmtp.example.com"),
            ("/var/run/dovecot/lmtp", "x-unix; /var/run/dovecot/lmtp"),
            ("unix:/run/dovecot/lmtp", "x-unix; /run/dovecot/lmtp"),
            ("mx", "dns; mx"),
        ] {
            assert_eq!(super::remote_mta_field(mta), want, "{mta}");
        }
    }

    use super::*;

    #[test]
    fn status_codes() {
        let reply = |code, text: &str| Some(Outcome::from_reply(code, text));
        let expired = Outcome::from_reply(451, "4.4.7 message expired").expired();
        let cases = [
            (reply(550, "5.1.1 no such user"), "failed", "5.1.1"),
            (reply(550, "no such user"), "failed", "5.0.0"),
            (reply(451, "4.3.0 try later"), "delayed", "4.3.0"),
            (reply(451, "try later"), "delayed", "4.0.0"),
            (Some(expired.clone()), "failed", "4.4.7"),
            (Some(Outcome::from_reply(451, "try later").expired()), "failed", "5.0.0"),
            (None, "delayed", "4.0.0"),
            (None, "failed", "5.0.0"),
            (None, "delivered", "2.0.0"),
            (reply(250, "2.0.0 ok"), "delivered", "2.0.0"),
            (reply(250, "ok"), "relayed", "2.0.0"),
            (reply(550, "9.9.9 odd"), "failed", "5.0.0"),
        ];
        for (result, action, want) in cases {
            let rc = ReportRecipient {
                address: "a@b".into(),
                orcpt: None,
                action,
                result: result.clone(),
                will_retry_until: None,
            };
            assert_eq!(status_of(&rc), want, "{result:?}");
        }
    }

    fn report(kind: ReportKind, ret: Option<Ret>) -> String {
        let original = "Received: x\r\nSubject: Hello\r\n there\r\nFrom: a@b.test\r\n\r\nsecret body\r\n";
        report_about(kind, ret, "a@b.test", "c@d.test", original)
    }

    fn report_about(kind: ReportKind, ret: Option<Ret>, sender: &str, rcpt: &str, original: &str) -> String {
        let original = original.as_bytes();
        let r = Report {
            kind,
            hostname: "mx.example.test",
            queue_id: 42,
            to: sender,
            envid: Some("E1"),
            arrival: 1_700_000_000,
            now: 1_700_000_100,
            recipients: vec![ReportRecipient {
                address: rcpt.into(),
                orcpt: Some("rfc822;C+2Bx@d.test".into()),
                action: if kind == ReportKind::Delay { "delayed" } else { "failed" },
                result: Some(
                    Outcome::from_reply(550, "5.1.1 no such user\r\nInjected: header")
                        .from_mta(Some("mx.d.test[192.0.2.1]".into())),
                ),
                will_retry_until: None,
            }],
            original,
            ret,
            max_full: 1 << 20,
        };
        String::from_utf8(build(&r)).unwrap()
    }

    /// A header whose first line has a multi-byte character across byte 8 (a panic once).
    #[test]
    fn subject_after_utf8_across_byte_8() {
        let original = "\tfor <jürgen@d.test>;\r\nSubject: Hello\r\n\r\nbody\r\n";
        assert_eq!(subject_of(original.as_bytes()).as_deref(), Some("Hello"));
    }

    /// RFC 6533: reports about internationalized mail (a UTF-8 address on either side, or UTF-8
    /// in the original's header) are global reports, with `utf-8` address types for UTF-8
    /// addresses and the original returned as `message/global` or `text/global-headers`; other
    /// reports stay RFC 3464, byte for byte as before.
    #[test]
    fn reports_about_utf8_mail_are_global() {
        let ascii = "Subject: Hello\r\nFrom: a@b.test\r\n\r\nbody\r\n";
        let utf8_header = "Subject: Grüße\r\nFrom: a@b.test\r\n\r\nbody\r\n";
        let cases = [
            ("a@b.test", "c@d.test", ascii, Some(Ret::Full), false, "rfc822; c@d.test", "message/rfc822"),
            ("a@b.test", "ghöst@d.test", ascii, Some(Ret::Full), true, "utf-8; ghöst@d.test", "message/global"),
            ("a@b.test", "ghöst@d.test", ascii, None, true, "utf-8; ghöst@d.test", "text/global-headers"),
            ("jürgen@b.test", "c@d.test", ascii, None, true, "rfc822; c@d.test", "text/global-headers"),
            ("a@b.test", "c@d.test", utf8_header, Some(Ret::Full), true, "rfc822; c@d.test", "message/global"),
            ("a@b.test", "c@d.test", ascii, None, false, "rfc822; c@d.test", "text/rfc822-headers"),
        ];
        for (sender, rcpt, original, ret, global, final_rcpt, returned) in cases {
            let m = report_about(ReportKind::Failure, ret, sender, rcpt, original);
            let (status_type, report_type) = match global {
                true => ("message/global-delivery-status", "report-type=\"global-delivery-status\""),
                false => ("message/delivery-status", "report-type=\"delivery-status\""),
            };
            let case = format!("{sender} -> {rcpt}, {ret:?}");
            assert!(m.contains(&format!("Content-Type: {status_type}\r\n")), "{case}: {m}");
            assert!(m.contains(report_type), "{case}: {m}");
            assert!(m.contains(&format!("Final-Recipient: {final_rcpt}\r\n")), "{case}: {m}");
            assert!(m.contains(&format!("Content-Type: {returned}\r\n")), "{case}: {m}");
            if !sender.is_ascii() {
                assert!(m.contains(&format!("To: <{sender}>\r\n")), "{case}: the address as it is: {m}");
            }
        }
    }

    #[test]
    fn failure_report_shape() {
        let m = report(ReportKind::Failure, None);
        assert!(m.contains("From: \"Mail Delivery System\" <MAILER-DAEMON@mx.example.test>\r\n"), "{m}");
        assert!(m.contains("Subject: Undelivered Mail Returned to Sender\r\n"), "{m}");
        assert!(m.contains("Content-Type: multipart/report; report-type=\"delivery-status\""), "{m}");
        assert!(m.contains("Content-Type: message/delivery-status\r\n"), "{m}");
        assert!(m.contains("Original-Envelope-Id: E1\r\n"), "{m}");
        assert!(m.contains("Original-Recipient: rfc822; C+x@d.test\r\n"), "{m}");
        assert!(m.contains("Final-Recipient: rfc822; c@d.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"), "{m}");
        assert!(m.contains("Remote-MTA: dns; mx.d.test\r\n"), "{m}");
        // A hostile reply cannot add a header line to the report.
        assert!(!m.contains("\r\nInjected:"), "{m}");
        assert!(m.contains("Content-Type: text/rfc822-headers\r\n"), "{m}");
        assert!(m.contains("Subject of your message: Hello there"), "{m}");
        assert!(!m.contains("secret body"), "headers only by default: {m}");
        assert!(!m.contains("\n\n") && !m.replace("\r\n", "").contains('\n'), "CRLF only");
    }

    #[test]
    fn full_return_and_delay() {
        let m = report(ReportKind::Failure, Some(Ret::Full));
        assert!(m.contains("Content-Type: message/rfc822\r\n") && m.contains("secret body"), "{m}");
        let m = report(ReportKind::Delay, Some(Ret::Full));
        assert!(m.contains("Subject: Delayed Mail") && m.contains("Action: delayed\r\n"), "{m}");
        assert!(!m.contains("secret body"), "delay notices carry headers only: {m}");
    }

    /// Random originals and replies (bytes from a hostile client or peer, CR and LF included)
    /// never panic the builder and never add a field to the delivery-status part.
    #[test]
    fn random_input_never_panics() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet: Vec<u8> = "ab:. \r\n\tSubject:ü€\x00\x7f".bytes().chain([0xff, 0xc3, 0x80]).collect();
        for _ in 0..2000 {
            let len = (next() % 300) as usize;
            let original: Vec<u8> = (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect();
            let reply = String::from_utf8_lossy(&original[..len.min(80)]).into_owned();
            let r = Report {
                kind: ReportKind::Failure,
                hostname: "mx.example.test",
                queue_id: 1,
                to: "a@b.test",
                envid: None,
                arrival: 0,
                now: 0,
                recipients: vec![ReportRecipient {
                    address: "c@d.test".into(),
                    orcpt: Some(reply.clone()),
                    action: "failed",
                    result: Some(Outcome::from_reply(550, &reply).from_mta(Some("mx".into()))),
                    will_retry_until: Some(u64::MAX),
                }],
                original: &original,
                ret: Some(Ret::Full),
                max_full: 100,
            };
            let out = String::from_utf8_lossy(&build(&r)).into_owned();
            // Random bytes may make it a global report (RFC 6533): the same fields either way.
            let status = out
                .split("-delivery-status\r\n")
                .nth(1)
                .or_else(|| out.split("Content-Type: message/delivery-status\r\n").nth(1))
                .and_then(|rest| rest.split("\r\n--").next())
                .expect("a delivery-status part");
            // Exactly the fields we write: a reply with CR/LF in it cannot start a new one.
            let fields: Vec<&str> =
                status.split("\r\n").filter(|l| !l.is_empty()).filter_map(|l| l.split(':').next()).collect();
            assert_eq!(
                fields,
                [
                    "Content-Description",
                    "Reporting-MTA",
                    "X-Mailroot-Queue-ID",
                    "Arrival-Date",
                    "Original-Recipient",
                    "Final-Recipient",
                    "Action",
                    "Status",
                    "Remote-MTA",
                    "Diagnostic-Code",
                    "Last-Attempt-Date",
                    "Will-Retry-Until"
                ],
                "{status:?}"
            );
        }
    }
}
