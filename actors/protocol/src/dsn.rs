//! Delivery Status Notification parameters (RFC 3461): `RET`/`ENVID` on MAIL, `NOTIFY`/`ORCPT`
//! on RCPT, and the xtext encoding they travel in.
//!
//! Values are kept in their wire form (xtext) so they can be passed on to the next hop unchanged;
//! [`xtext_decode`] gives the readable form for reports.

use serde::{Deserialize, Serialize};

/// What the sender wants back in a failure report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ret {
    Full,
    Hdrs,
}

impl Ret {
    pub fn keyword(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Hdrs => "HDRS",
        }
    }
}

/// `NOTIFY=`: which events the sender wants to hear about. `NEVER` is all three false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    /// What an absent `NOTIFY` means here (RFC 3461 §4.1 leaves it to us): failures and delays.
    pub const DEFAULT: Notify = Notify { success: false, failure: true, delay: true };

    pub fn parse(v: &str) -> Option<Notify> {
        if v.eq_ignore_ascii_case("NEVER") {
            return Some(Notify { success: false, failure: false, delay: false });
        }
        let mut n = Notify { success: false, failure: false, delay: false };
        for word in v.split(',') {
            let flag = match word.to_ascii_uppercase().as_str() {
                "SUCCESS" => &mut n.success,
                "FAILURE" => &mut n.failure,
                "DELAY" => &mut n.delay,
                // NEVER combined with anything else is a syntax error (RFC 3461 §4.1).
                _ => return None,
            };
            if *flag {
                return None;
            }
            *flag = true;
        }
        Some(n)
    }

    /// The parameter value, for passing on to the next hop.
    pub fn keyword(self) -> String {
        let words: Vec<&str> = [(self.success, "SUCCESS"), (self.failure, "FAILURE"), (self.delay, "DELAY")]
            .into_iter()
            .filter_map(|(on, w)| on.then_some(w))
            .collect();
        if words.is_empty() {
            "NEVER".into()
        } else {
            words.join(",")
        }
    }
}

/// The DSN parameters of one recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptDsn {
    /// `None`: the sender did not say (see [`Notify::DEFAULT`]).
    pub notify: Option<Notify>,
    /// `ORCPT=` as received: `addr-type;xtext`, e.g. `rfc822;a+2Bb@example.test`.
    pub orcpt: Option<String>,
}

impl RcptDsn {
    pub fn notify(&self) -> Notify {
        self.notify.unwrap_or(Notify::DEFAULT)
    }

    /// The RCPT parameters they travel in (` NOTIFY=… ORCPT=…`; empty when none was given).
    pub fn params(&self) -> String {
        let mut p = String::new();
        if let Some(n) = self.notify {
            p.push_str(&format!(" NOTIFY={}", n.keyword()));
        }
        if let Some(o) = &self.orcpt {
            p.push_str(&format!(" ORCPT={o}"));
        }
        p
    }
}

/// The DSN parameters of a whole message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageDsn {
    pub ret: Option<Ret>,
    /// `ENVID=` in xtext, as received.
    pub envid: Option<String>,
}

impl MessageDsn {
    /// The MAIL parameters they travel in (` RET=… ENVID=…`; empty when none was given).
    pub fn params(&self) -> String {
        let mut p = String::new();
        if let Some(r) = self.ret {
            p.push_str(&format!(" RET={}", r.keyword()));
        }
        if let Some(e) = &self.envid {
            p.push_str(&format!(" ENVID={e}"));
        }
        p
    }
}

/// RFC 3461 §4: xtext is printable ASCII except `+` and `=`, with `+XX` hex escapes.
pub fn is_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
                match (b.get(i + 1), b.get(i + 2)) {
                    (Some(&h), Some(&l)) if hex(h) && hex(l) => i += 3,
                    _ => return false,
                }
            }
            b'!'..=b'~' if b[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

/// Decodes xtext; `None` when it is not valid xtext.
pub fn xtext_decode(s: &str) -> Option<String> {
    if !is_xtext(s) {
        return None;
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            out.push(u8::from_str_radix(s.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Encodes text as xtext (used for the ORCPT we add when relaying a recipient that had none).
pub fn xtext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if (b'!'..=b'~').contains(&c) && c != b'+' && c != b'=' {
            out.push(c as char);
        } else {
            out.push_str(&format!("+{c:02X}"));
        }
    }
    out
}

/// Longest ENVID we accept (RFC 3461 §4.4 asks for at least 100 characters).
pub const MAX_ENVID: usize = 100;
/// Longest ORCPT value (RFC 3461 §4.2: at most 500 characters).
pub const MAX_ORCPT: usize = 500;

/// Validates an `ORCPT=` value: `addr-type ";" xtext`.
pub fn valid_orcpt(v: &str) -> bool {
    match v.split_once(';') {
        Some((kind, addr)) => {
            v.len() <= MAX_ORCPT
                && !kind.is_empty()
                && kind.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !addr.is_empty()
                && is_xtext(addr)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_values() {
        let n = |s, f, d| Some(Notify { success: s, failure: f, delay: d });
        let cases = [
            ("NEVER", n(false, false, false)),
            ("never", n(false, false, false)),
            ("SUCCESS", n(true, false, false)),
            ("FAILURE,DELAY", n(false, true, true)),
            ("success,failure,delay", n(true, true, true)),
            ("NEVER,SUCCESS", None),
            ("SUCCESS,SUCCESS", None),
            ("", None),
            ("SUCCESS,", None),
            ("BOGUS", None),
        ];
        for (input, want) in cases {
            assert_eq!(Notify::parse(input), want, "{input:?}");
        }
        assert_eq!(Notify { success: true, failure: false, delay: true }.keyword(), "SUCCESS,DELAY");
        assert_eq!(Notify { success: false, failure: false, delay: false }.keyword(), "NEVER");
    }

    #[test]
    fn xtext() {
        let cases = [
            ("abc", Some("abc")),
            ("a+2Bb", Some("a+b")),
            ("a+3Db", Some("a=b")),
            ("a+2b", None),
            ("a+2", None),
            ("a+", None),
            ("a=b", None),
            ("a b", None),
            ("", Some("")),
        ];
        for (input, want) in cases {
            assert_eq!(xtext_decode(input).as_deref(), want, "{input:?}");
        }
        assert_eq!(xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(xtext_decode(&xtext_encode("ü+x")).as_deref(), Some("ü+x"));
        let orcpt = [("rfc822;a@b.test", true), ("rfc822;", false), (";a@b", false), ("rfc822 a@b", false)];
        for (input, want) in orcpt {
            assert_eq!(valid_orcpt(input), want, "{input:?}");
        }
    }
}
