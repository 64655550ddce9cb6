//! The Pickup file format, pure: what the Pickup folder and `mailroot sendmail` accept.
//!
//! A file is either the IIS form (leading `x-sender:`/`x-receiver:` lines, then the message) or a
//! plain RFC 5322 message whose envelope comes from `From:` and `To:`/`Cc:`/`Bcc:` (`Bcc:` is
//! removed). Line ends become CRLF; bare CR, lines over 998 octets, hop-count loops and files
//! without recipients are refused with a reason for the Badmail `.bdr` file.

use crate::address::parse_mailbox;
use crate::command::{self, Command};
use crate::data::MAX_LINE;
use crate::dsn::{MessageDsn, RcptDsn};
use crate::Mailbox;

/// A parsed Pickup file.
#[derive(Debug, PartialEq, Eq)]
pub struct PickupMessage {
    pub sender: Option<Mailbox>,
    pub recipients: Vec<Mailbox>,
    /// DSN parameters (RFC 3461) given on the `x-sender:` line (`RET=`, `ENVID=`).
    pub dsn: MessageDsn,
    /// DSN parameters of `recipients`, index for index (`NOTIFY=`, `ORCPT=` on `x-receiver:`).
    pub rcpt_dsn: Vec<RcptDsn>,
    /// The message with CRLF line ends, without the `x-` envelope lines and without `Bcc:`.
    pub body: Vec<u8>,
}

/// Parses a Pickup file: optional `x-sender:`/`x-receiver:` lines, then an RFC 5322 message.
/// Without `x-` lines the envelope comes from `From:` and `To:`/`Cc:`/`Bcc:`.
pub fn parse_pickup(raw: &[u8], max_hop_count: usize) -> Result<PickupMessage, String> {
    let text = normalize_line_ends(raw)?;
    let mut lines = split_lines(&text);
    let mut x_sender: Option<Option<Mailbox>> = None;
    let mut x_receivers = Vec::new();
    let mut dsn = MessageDsn::default();
    let mut rcpt_dsn = Vec::new();
    let mut consumed = 0;
    while let Some(line) = lines.first() {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with(b"x-sender:") {
            if x_sender.is_some() {
                return Err("more than one x-sender line".into());
            }
            let (addr, params) = split_params(&line[9..])?;
            x_sender = Some(envelope_address(addr.as_bytes(), true)?);
            if !params.is_empty() {
                dsn = match command::parse(format!("MAIL FROM:<> {params}").as_bytes()) {
                    Ok(Command::Mail { params, .. }) => params.dsn,
                    _ => return Err(format!("x-sender parameters {params:?}: only RET= and ENVID= (RFC 3461)")),
                };
            }
        } else if lower.starts_with(b"x-receiver:") {
            let (addr, params) = split_params(&line[11..])?;
            match envelope_address(addr.as_bytes(), false)? {
                Some(m) => x_receivers.push(m),
                None => return Err("empty x-receiver address".into()),
            }
            rcpt_dsn.push(match params.is_empty() {
                true => RcptDsn::default(),
                false => match command::parse(format!("RCPT TO:<postmaster> {params}").as_bytes()) {
                    Ok(Command::Rcpt { dsn, .. }) => dsn,
                    _ => return Err(format!("x-receiver parameters {params:?}: only NOTIFY= and ORCPT= (RFC 3461)")),
                },
            });
        } else {
            break;
        }
        consumed += line.len() + 2;
        lines.remove(0);
    }
    let message = &text[consumed..];
    if message.is_empty() {
        return Err("the file holds no message".into());
    }

    // Header section: unfold, collect the fields we need, drop Bcc.
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut out = Vec::with_capacity(message.len());
    let mut pos = 0;
    let mut skipping_bcc = false;
    let mut in_header = true;
    let mut received = 0;
    for line in split_lines(message) {
        let len = line.len() + 2;
        if line.len() > MAX_LINE - 2 {
            return Err(format!("a line is longer than {} characters", MAX_LINE - 2));
        }
        if in_header {
            if line.is_empty() {
                in_header = false;
            } else if line[0] == b' ' || line[0] == b'\t' {
                match fields.last_mut() {
                    Some(f) => f.1.push_str(&String::from_utf8_lossy(line)),
                    None => return Err("the message starts with a continuation line".into()),
                }
                if skipping_bcc {
                    pos += len;
                    continue;
                }
            } else {
                let colon = line.iter().position(|&b| b == b':').ok_or("a header line has no colon")?;
                let name = &line[..colon];
                if name.is_empty() || !name.iter().all(|&b| (33..=126).contains(&b)) {
                    return Err("invalid header field name (is there a header at all?)".into());
                }
                let name = String::from_utf8_lossy(name).to_ascii_lowercase();
                skipping_bcc = name == "bcc";
                if name == "received" {
                    received += 1;
                }
                fields.push((name, String::from_utf8_lossy(&line[colon + 1..]).into_owned()));
                if skipping_bcc {
                    pos += len;
                    continue;
                }
            }
        }
        out.extend_from_slice(&message[pos..pos + len.min(message.len() - pos)]);
        pos += len;
    }
    if received > max_hop_count {
        return Err(format!("{received} Received headers exceed the hop count limit of {max_hop_count}"));
    }

    let sender = match x_sender {
        Some(s) => s,
        None => {
            let from = fields.iter().find(|f| f.0 == "from").ok_or("no x-sender line and no From: header")?;
            let mut addrs = address_list(&from.1).map_err(|e| format!("From: {e}"))?;
            if addrs.is_empty() {
                return Err("From: holds no address".into());
            }
            Some(addrs.remove(0))
        }
    };
    let recipients = if x_receivers.is_empty() {
        let mut all = Vec::new();
        for f in fields.iter().filter(|f| matches!(f.0.as_str(), "to" | "cc" | "bcc")) {
            all.extend(address_list(&f.1).map_err(|e| format!("{}: {e}", f.0))?);
        }
        all
    } else {
        x_receivers
    };
    if recipients.is_empty() {
        return Err("no recipients: no x-receiver lines and no To:, Cc: or Bcc: addresses".into());
    }
    // Header recipients have no parameters.
    rcpt_dsn.resize(recipients.len(), RcptDsn::default());
    Ok(PickupMessage { sender, recipients, dsn, rcpt_dsn, body: out })
}

/// CRLF stays, a lone LF becomes CRLF (Unix tools write LF), a lone CR is refused.
fn normalize_line_ends(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 32);
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'\r' if raw.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            b'\r' => return Err("bare CR in the file".into()),
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    if !out.ends_with(b"\r\n") && !out.is_empty() {
        out.extend_from_slice(b"\r\n");
    }
    Ok(out)
}

/// Lines without their CRLF; the input always ends in CRLF after normalisation.
fn split_lines(text: &[u8]) -> Vec<&[u8]> {
    let mut v: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < text.len() {
        if text[i] == b'\r' && text[i + 1] == b'\n' {
            v.push(&text[start..i]);
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    v
}

/// An envelope line's value: the address, then any DSN parameters after a space (`<a@b> RET=HDRS`).
fn split_params(value: &[u8]) -> Result<(String, String), String> {
    let v = std::str::from_utf8(value).map_err(|_| "envelope line is not UTF-8")?.trim();
    // The address ends at its closing bracket, or at the first space when it has none.
    let end = match v.starts_with('<') {
        true => v.find('>').map_or(v.len(), |i| i + 1),
        false => v.find(' ').unwrap_or(v.len()),
    };
    Ok((v[..end].to_string(), v[end..].trim().to_string()))
}

fn envelope_address(value: &[u8], allow_null: bool) -> Result<Option<Mailbox>, String> {
    let v = std::str::from_utf8(value).map_err(|_| "envelope line is not UTF-8")?.trim();
    let v = v.strip_prefix('<').and_then(|s| s.strip_suffix('>')).unwrap_or(v);
    if v.is_empty() {
        return if allow_null { Ok(None) } else { Err("empty envelope address".into()) };
    }
    parse_mailbox(v).map(Some).map_err(|e| format!("envelope address {v:?}: {}", e.text()))
}

/// Extracts the addr-specs of an RFC 5322 address list (names, comments, groups allowed).
pub fn address_list(value: &str) -> Result<Vec<Mailbox>, String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut angle, mut comment) = (false, false, 0usize);
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted || comment > 0 => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                continue;
            }
            '"' if comment == 0 => quoted = !quoted,
            '(' if !quoted => {
                comment += 1;
                continue;
            }
            ')' if !quoted && comment > 0 => {
                comment -= 1;
                continue;
            }
            _ if comment > 0 => continue,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            // A group's display name ends at ':'; its list at ';'.
            ':' if !quoted && !angle => {
                cur.clear();
                continue;
            }
            ',' | ';' if !quoted && !angle => {
                items.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    items.push(cur);
    let mut out = Vec::new();
    for item in items {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let spec = match (item.rfind('<'), item.rfind('>')) {
            (Some(a), Some(b)) if a < b => item[a + 1..b].trim(),
            (None, None) => item,
            _ => return Err(format!("malformed address {item:?}")),
        };
        if spec.is_empty() {
            continue;
        }
        out.push(parse_mailbox(spec).map_err(|e| format!("address {spec:?}: {}", e.text()))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// DSN parameters after the addresses of the envelope lines (as sendmail -N/-R/-V and
    /// sendmail -bs write them) become the message's and each recipient's; anything else there
    /// is refused with the reason.
    #[test]
    fn dsn_parameters_on_envelope_lines() {
        use crate::dsn::{Notify, Ret};
        let raw = b"x-sender: <a@b.test> RET=HDRS ENVID=id+2B1\r\nx-receiver: <c@example.test> NOTIFY=SUCCESS,FAILURE \
                    ORCPT=rfc822;c@example.test\r\nx-receiver: d@example.test\r\n\r\nbody\r\n";
        let m = parse_pickup(raw, 100).unwrap();
        assert_eq!(m.dsn, MessageDsn { ret: Some(Ret::Hdrs), envid: Some("id+2B1".into()) });
        let success_failure = Notify { success: true, failure: true, delay: false };
        assert_eq!(
            m.rcpt_dsn,
            [
                RcptDsn { notify: Some(success_failure), orcpt: Some("rfc822;c@example.test".into()) },
                RcptDsn::default()
            ]
        );
        assert_eq!(m.dsn.params(), " RET=HDRS ENVID=id+2B1");
        assert_eq!(m.rcpt_dsn[0].params(), " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@example.test");
        for bad in [
            &b"x-sender: <a@b.test> SIZE=x\r\nx-receiver: c@d.test\r\n\r\nb\r\n"[..],
            b"x-receiver: <c@d.test> NOTIFY=SOMETIMES\r\n\r\nb\r\n",
        ] {
            assert!(parse_pickup(bad, 100).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let plain = parse_pickup(b"x-sender: a@b.test\r\nx-receiver: c@d.test\r\n\r\nb\r\n", 100).unwrap();
        assert_eq!((plain.dsn, plain.rcpt_dsn), (MessageDsn::default(), vec![RcptDsn::default()]));
    }

    use super::*;

    fn addrs(v: &[Mailbox]) -> Vec<String> {
        v.iter().map(|m| m.to_string()).collect()
    }

    #[test]
    fn iis_envelope_form() {
        let raw = b"x-sender: a@b.test\r\nx-receiver: c@example.test\r\nX-Receiver: <d@example.test>\r\nSubject: s\r\n\r\nbody\r\n";
        let m = parse_pickup(raw, 100).unwrap();
        assert_eq!(m.sender.unwrap().to_string(), "a@b.test");
        assert_eq!(addrs(&m.recipients), vec!["c@example.test", "d@example.test"]);
        assert_eq!(m.body, b"Subject: s\r\n\r\nbody\r\n");
    }

    #[test]
    fn header_envelope_form_removes_bcc() {
        let raw = b"From: \"Al, B\" <al@b.test>\nTo: x@example.test, Y <y@example.test> (comment)\nCc: team: z@example.test;\nBcc: hidden@example.test,\n  hidden2@example.test\nSubject: s\n\nbody\n";
        let m = parse_pickup(raw, 100).unwrap();
        assert_eq!(m.sender.unwrap().to_string(), "al@b.test");
        assert_eq!(
            addrs(&m.recipients),
            vec!["x@example.test", "y@example.test", "z@example.test", "hidden@example.test", "hidden2@example.test"]
        );
        let body = String::from_utf8(m.body).unwrap();
        assert!(!body.to_ascii_lowercase().contains("bcc") && !body.contains("hidden"), "{body}");
        assert!(body.starts_with("From: \"Al, B\" <al@b.test>\r\nTo:"));
        assert!(body.ends_with("Subject: s\r\n\r\nbody\r\n"));
    }

    #[test]
    fn malformed_files() {
        let long = format!("From: a@b.test\r\nTo: c@d.test\r\n\r\n{}\r\n", "x".repeat(1200));
        let hops = format!("From: a@b.test\r\nTo: c@d.test\r\n{}\r\nx\r\n", "Received: x\r\n".repeat(4));
        let cases: Vec<(&[u8], &str)> = vec![
            (b"", "no message"),
            (b"Subject: s\r\n\r\nbody\r\n", "no x-sender line and no From"),
            (b"From: a@b.test\r\nSubject: s\r\n\r\nbody\r\n", "no recipients"),
            (b"x-sender: a@b.test\r\n\r\n", "no recipients"),
            (b"From: a@b.test\r\nTo: not an address\r\n\r\n", "to: address"),
            (b"From: a@b.test\r\nTo: c@d.test\rX\r\n\r\n", "bare CR"),
            (b"just some text\r\n", "no colon"),
            (b"x-sender: a@b.test\r\nx-receiver: bad@@x\r\n\r\n", "envelope address"),
            (long.as_bytes(), "longer than 998"),
            (hops.as_bytes(), "hop count"),
        ];
        for (raw, want) in cases {
            let err = parse_pickup(raw, 3).err().unwrap_or_default();
            assert!(err.contains(want), "{:?}: got {err:?}, want {want:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn null_sender_and_utf8() {
        let m = parse_pickup("x-sender: <>\r\nx-receiver: ü@example.test\r\nSubject: ö\r\n\r\nx\r\n".as_bytes(), 100)
            .unwrap();
        assert_eq!(m.sender, None);
        assert_eq!(addrs(&m.recipients), vec!["ü@example.test"]);
    }

    /// Random files never panic the parser; whatever it accepts has recipients and CRLF lines.
    #[test]
    fn random_files_never_panic() {
        let pieces: &[&[u8]] = &[
            b"x-sender: a@b.test\n",
            b"x-receiver: c@d.test\r\n",
            b"From: x@y.test\n",
            b"To: ",
            b"Bcc: q@r.test,\n",
            b" folded\n",
            b"\r",
            b"\n",
            b":",
            b"<",
            b">",
            b"\"",
            b"(",
            b"@",
            b"\xff",
            b"Received: x\n",
            b"Subject: s\n\nbody\n",
        ];
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut raw = Vec::new();
            for _ in 0..(next() % 40) {
                if next() % 5 == 0 {
                    raw.push(next() as u8);
                } else {
                    raw.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
                }
            }
            if let Ok(m) = parse_pickup(&raw, 2) {
                assert!(!m.recipients.is_empty());
                assert!(!m.body.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'), "{raw:?}");
            }
        }
    }
}
