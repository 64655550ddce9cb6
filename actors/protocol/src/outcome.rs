//! A delivery result as a typed value: its class, the reply code, the enhanced status code, the
//! text and the server that gave it. Delivery actors make outcomes with the constructors in the
//! engine's catalogue of delivery results (`mailroot_actors::delivery::replies`, their own
//! conditions) or with [`Outcome::from_reply`] (a server's reply); the queue, the notifications,
//! the admin API and the logs read the fields, never a string. It lives here, below the queue
//! store that keeps it, because it is plain data about SMTP replies.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What the queue does with a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Done; the recipient leaves the queue.
    Delivered,
    /// Try again later (4xx, network trouble, local disk trouble).
    Temporary,
    /// Give up on this recipient (5xx): a non-delivery report goes to the sender.
    Permanent,
}

impl Class {
    /// The class of an SMTP/LMTP reply code: 2xx delivered, 5xx permanent; anything else
    /// (4xx, or a garbled code from a hostile peer) temporary.
    pub fn of_code(code: u16) -> Class {
        match code {
            200..=299 => Class::Delivered,
            500..=599 => Class::Permanent,
            _ => Class::Temporary,
        }
    }

    /// Stable label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Class::Delivered => "delivered",
            Class::Temporary => "temporary",
            Class::Permanent => "permanent",
        }
    }

    /// The enhanced status code of a reply that carried none (RFC 3463 §3: `X.0.0`).
    fn default_status(self) -> EnhancedCode {
        let class = match self {
            Class::Delivered => 2,
            Class::Temporary => 4,
            Class::Permanent => 5,
        };
        EnhancedCode { class, subject: 0, detail: 0 }
    }
}

/// An RFC 3463 enhanced status code, `class.subject.detail` (e.g. `4.4.2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EnhancedCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl EnhancedCode {
    /// Parses `2.1.5`: class 2, 4 or 5, then two numbers of one to three digits.
    pub fn parse(s: &str) -> Option<EnhancedCode> {
        let mut parts = s.split('.');
        let (class, subject, detail) = (parts.next()?, parts.next()?, parts.next()?);
        let number = |p: &str| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
        if parts.next().is_some() || !matches!(class, "2" | "4" | "5") || !number(subject) || !number(detail) {
            return None;
        }
        Some(EnhancedCode { class: class.parse().ok()?, subject: subject.parse().ok()?, detail: detail.parse().ok()? })
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl TryFrom<String> for EnhancedCode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        EnhancedCode::parse(&s).ok_or_else(|| format!("not an enhanced status code: {s:?}"))
    }
}

impl From<EnhancedCode> for String {
    fn from(c: EnhancedCode) -> String {
        c.to_string()
    }
}

/// The result of one delivery attempt for one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub class: Class,
    /// The reply code: the server's, or ours for conditions found locally.
    pub code: u16,
    /// The enhanced status code, when the reply carried one (see [`Outcome::status`]).
    #[serde(default)]
    pub enhanced: Option<EnhancedCode>,
    /// The text after the codes: the server's words as it said them, or ours.
    pub text: String,
    /// The server that gave this reply (`mx.example.org[192.0.2.1]`), for delivery status
    /// reports; `None` for conditions found locally (DNS, connecting, the disk).
    #[serde(default)]
    pub remote_mta: Option<String>,
}

impl Outcome {
    /// Our own result for a condition mailroot found: the class follows the code.
    pub fn new(code: u16, enhanced: &str, text: impl Into<String>) -> Outcome {
        Outcome {
            class: Class::of_code(code),
            code,
            enhanced: EnhancedCode::parse(enhanced),
            text: text.into(),
            remote_mta: None,
        }
    }

    /// Classifies a server's SMTP/LMTP reply by its code (see [`Class::of_code`]); an enhanced
    /// status code at the start of the text is taken out into [`Outcome::enhanced`].
    pub fn from_reply(code: u16, text: &str) -> Outcome {
        let (enhanced, rest) = match text.split_once(' ') {
            Some((first, rest)) => match EnhancedCode::parse(first) {
                Some(e) => (Some(e), rest),
                None => (None, text),
            },
            None => match EnhancedCode::parse(text) {
                Some(e) => (Some(e), ""),
                None => (None, text),
            },
        };
        Outcome { class: Class::of_code(code), code, enhanced, text: rest.to_string(), remote_mta: None }
    }

    /// The same outcome, said by `remote_mta`.
    pub fn from_mta(mut self, remote_mta: Option<String>) -> Outcome {
        self.remote_mta = remote_mta;
        self
    }

    /// A temporary failure that has run out of time: permanent from now on, same words.
    pub fn expired(mut self) -> Outcome {
        self.class = Class::Permanent;
        self
    }

    pub fn is_delivered(&self) -> bool {
        self.class == Class::Delivered
    }

    pub fn is_temporary(&self) -> bool {
        self.class == Class::Temporary
    }

    pub fn is_permanent(&self) -> bool {
        self.class == Class::Permanent
    }

    pub fn label(&self) -> &'static str {
        self.class.label()
    }

    /// The enhanced status code for reports: the reply's own, or `X.0.0` of the class.
    pub fn status(&self) -> EnhancedCode {
        self.enhanced.unwrap_or_else(|| self.class.default_status())
    }

    /// Reads a result text stored by versions before outcomes were typed (`"451 4.4.2 text"`,
    /// or a bare local error text); `class` comes from the recipient's stored state.
    pub fn from_legacy_text(class: Class, text: &str, remote_mta: Option<String>) -> Outcome {
        let code = text
            .get(..3)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()) && text.as_bytes().get(3).is_none_or(|&b| b == b' '));
        let mut outcome = match code.and_then(|c| c.parse::<u16>().ok()) {
            Some(code) => Outcome::from_reply(code, text.get(4..).unwrap_or("")),
            // Our own texts without a code: local errors, and expiry ("4.4.7 Message expired…").
            None => Outcome::from_reply(
                match class {
                    Class::Delivered => 250,
                    Class::Temporary => 451,
                    Class::Permanent => 550,
                },
                text,
            ),
        };
        outcome.class = class;
        outcome.remote_mta = remote_mta;
        outcome
    }
}

/// The reply as one line: `451 4.4.2 text` (or `451 text` without an enhanced code).
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.enhanced {
            Some(e) if self.text.is_empty() => write!(f, "{} {e}", self.code),
            Some(e) => write!(f, "{} {e} {}", self.code, self.text),
            None if self.text.is_empty() => write!(f, "{}", self.code),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_by_code() {
        let cases = [
            (250, Class::Delivered),
            (251, Class::Delivered),
            (421, Class::Temporary),
            (450, Class::Temporary),
            (452, Class::Temporary),
            (500, Class::Permanent),
            (550, Class::Permanent),
            (554, Class::Permanent),
            (999, Class::Temporary),
            (0, Class::Temporary),
            (354, Class::Temporary),
        ];
        for (code, class) in cases {
            assert_eq!(Outcome::from_reply(code, "x").class, class, "code {code}");
        }
    }

    /// A server's reply text: what is taken as the enhanced code, what stays text, how it shows.
    #[test]
    fn replies_from_servers() {
        let cases = [
            (550, "5.1.1 User unknown", Some("5.1.1"), "User unknown", "550 5.1.1 User unknown", "5.1.1"),
            (451, "4.4.2 x", Some("4.4.2"), "x", "451 4.4.2 x", "4.4.2"),
            (250, "2.0.0", Some("2.0.0"), "", "250 2.0.0", "2.0.0"),
            (550, "User unknown", None, "User unknown", "550 User unknown", "5.0.0"),
            (452, "Mailbox full", None, "Mailbox full", "452 Mailbox full", "4.0.0"),
            (250, "Ok", None, "Ok", "250 Ok", "2.0.0"),
            (550, "5.1.1000 x", None, "5.1.1000 x", "550 5.1.1000 x", "5.0.0"),
            (550, "3.1.1 x", None, "3.1.1 x", "550 3.1.1 x", "5.0.0"),
            (550, "5.1 x", None, "5.1 x", "550 5.1 x", "5.0.0"),
            (550, "", None, "", "550", "5.0.0"),
            (999, "junk", None, "junk", "999 junk", "4.0.0"),
        ];
        for (code, text, enhanced, rest, shown, status) in cases {
            let o = Outcome::from_reply(code, text);
            assert_eq!(o.enhanced.map(|e| e.to_string()).as_deref(), enhanced, "{code} {text:?}");
            assert_eq!(o.text, rest, "{code} {text:?}");
            assert_eq!(o.to_string(), shown, "{code} {text:?}");
            assert_eq!(o.status().to_string(), status, "{code} {text:?}");
        }
    }

    /// Texts as versions before typed outcomes stored them, and the class their state gave.
    #[test]
    fn legacy_texts() {
        let cases = [
            ("451 4.4.2 Timed out x", Class::Temporary, 451, Some("4.4.2"), "Timed out x"),
            ("550 5.1.1 no such user", Class::Permanent, 550, Some("5.1.1"), "no such user"),
            // A temporary failure that expired was stored with its 4xx text but failed.
            ("451 4.4.1 No host answered", Class::Permanent, 451, Some("4.4.1"), "No host answered"),
            ("250 2.0.0 dropped as 7.eml", Class::Delivered, 250, Some("2.0.0"), "dropped as 7.eml"),
            ("writing the Drop file: disk full", Class::Temporary, 451, None, "writing the Drop file: disk full"),
            ("delivery actor gave no result", Class::Temporary, 451, None, "delivery actor gave no result"),
            ("2500 x", Class::Temporary, 451, None, "2500 x"),
            ("4.4.7 Message expired after 5d", Class::Permanent, 550, Some("4.4.7"), "Message expired after 5d"),
            ("", Class::Permanent, 550, None, ""),
        ];
        for (text, class, code, enhanced, rest) in cases {
            let o = Outcome::from_legacy_text(class, text, Some("mx".into()));
            assert_eq!((o.class, o.code, o.text.as_str()), (class, code, rest), "{text:?}");
            assert_eq!(o.enhanced.map(|e| e.to_string()).as_deref(), enhanced, "{text:?}");
            assert_eq!(o.remote_mta.as_deref(), Some("mx"));
        }
    }

    #[test]
    fn serde_round_trip() {
        let o = Outcome::from_reply(550, "5.1.1 no").from_mta(Some("mx[192.0.2.1]".into()));
        let json = serde_json::to_string(&o).unwrap();
        assert!(json.contains("\"enhanced\":\"5.1.1\"") && json.contains("\"class\":\"permanent\""), "{json}");
        assert_eq!(serde_json::from_str::<Outcome>(&json).unwrap(), o);
        assert!(serde_json::from_str::<Outcome>(&json.replace("5.1.1", "9.9")).is_err());
    }
}
