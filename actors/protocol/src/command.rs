//! Parsing one SMTP command line (without its line end) into a typed [`Command`].
//!
//! Purely syntactic: whether a command is allowed now is the session's business.

use super::address::{parse_path, AddressError, Mailbox, Path};
use super::dsn::{self, MessageDsn, Notify, RcptDsn, Ret};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail {
        from: Path,
        params: MailParams,
    },
    Rcpt {
        to: Mailbox,
        dsn: RcptDsn,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
    /// `AUTH mechanism [initial-response]`; the mechanism upper-cased.
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
    /// `BDAT size [LAST]` (RFC 3030).
    Bdat {
        size: u64,
        last: bool,
    },
    /// Known commands mailroot does not offer (EXPN, TURN, ETRN, …).
    NotImplemented,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body_8bit: bool,
    pub smtputf8: bool,
    pub dsn: MessageDsn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    Unrecognized,
    /// Bytes that are not UTF-8, or control characters in a command line.
    Syntax(&'static str),
    BadSender(AddressError),
    BadRecipient(AddressError),
    /// An ESMTP parameter we do not know or whose value is malformed.
    BadParameter,
}

pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    let line = std::str::from_utf8(line).map_err(|_| CommandError::Syntax("Invalid UTF-8 in command"))?;
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(CommandError::Syntax("Control characters in command"));
    }
    let (verb, arg) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let verb = verb.to_ascii_uppercase();
    match verb.as_str() {
        "EHLO" | "HELO" => {
            let domain = arg.trim();
            if domain.is_empty() || domain.contains(' ') {
                return Err(CommandError::Syntax("EHLO/HELO requires one domain or address literal"));
            }
            let d = domain.to_string();
            Ok(if verb == "EHLO" { Command::Ehlo(d) } else { Command::Helo(d) })
        }
        "MAIL" => {
            let rest = strip_keyword(arg, "FROM:").ok_or(CommandError::Syntax("Syntax: MAIL FROM:<address>"))?;
            let (from, params) = parse_path(rest).map_err(CommandError::BadSender)?;
            Ok(Command::Mail { from, params: parse_mail_params(params)? })
        }
        "RCPT" => {
            let rest = strip_keyword(arg, "TO:").ok_or(CommandError::Syntax("Syntax: RCPT TO:<address>"))?;
            let (to, params) = parse_path(rest).map_err(CommandError::BadRecipient)?;
            let to = to.ok_or(CommandError::BadRecipient(AddressError::Empty))?;
            Ok(Command::Rcpt { to, dsn: parse_rcpt_params(params)? })
        }
        "DATA" => no_arg(arg, Command::Data),
        "RSET" => no_arg(arg, Command::Rset),
        "QUIT" => no_arg(arg, Command::Quit),
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "VRFY" => {
            if arg.trim().is_empty() {
                Err(CommandError::Syntax("Syntax: VRFY <user>"))
            } else {
                Ok(Command::Vrfy)
            }
        }
        "STARTTLS" => no_arg(arg, Command::StartTls),
        "AUTH" => {
            let mut words = arg.split(' ').filter(|w| !w.is_empty());
            let mechanism = words.next().ok_or(CommandError::Syntax("Syntax: AUTH mechanism [initial-response]"))?;
            let initial = words.next().map(str::to_string);
            if words.next().is_some() {
                return Err(CommandError::Syntax("Syntax: AUTH mechanism [initial-response]"));
            }
            Ok(Command::Auth { mechanism: mechanism.to_ascii_uppercase(), initial })
        }
        "BDAT" => {
            let mut words = arg.split(' ').filter(|w| !w.is_empty());
            let size = words
                .next()
                .filter(|n| !n.is_empty() && n.len() <= 20 && n.bytes().all(|b| b.is_ascii_digit()))
                // More digits than u64 holds is simply "too big".
                .map(|n| n.parse().unwrap_or(u64::MAX))
                .ok_or(CommandError::Syntax("Syntax: BDAT size [LAST]"))?;
            let last = match words.next() {
                None => false,
                Some(w) if w.eq_ignore_ascii_case("LAST") => true,
                Some(_) => return Err(CommandError::Syntax("Syntax: BDAT size [LAST]")),
            };
            if words.next().is_some() {
                return Err(CommandError::Syntax("Syntax: BDAT size [LAST]"));
            }
            Ok(Command::Bdat { size, last })
        }
        "EXPN" | "TURN" | "ETRN" | "ATRN" | "SEND" | "SOML" | "SAML" => Ok(Command::NotImplemented),
        _ => Err(CommandError::Unrecognized),
    }
}

fn no_arg(arg: &str, cmd: Command) -> Result<Command, CommandError> {
    if arg.trim().is_empty() {
        Ok(cmd)
    } else {
        Err(CommandError::Syntax("This command takes no argument"))
    }
}

/// Strips `FROM:`/`TO:` case-insensitively.
fn strip_keyword<'a>(arg: &'a str, kw: &str) -> Option<&'a str> {
    let head = arg.get(..kw.len())?;
    head.eq_ignore_ascii_case(kw).then(|| &arg[kw.len()..])
}

fn parse_mail_params(s: &str) -> Result<MailParams, CommandError> {
    let mut p = MailParams::default();
    for param in s.split(' ').filter(|t| !t.is_empty()) {
        let (key, value) = match param.find('=') {
            Some(i) => (&param[..i], Some(&param[i + 1..])),
            None => (param, None),
        };
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(v)) if !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()) => {
                // More digits than u64 holds is simply "too big".
                p.size = Some(v.parse().unwrap_or(u64::MAX));
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => p.body_8bit = true,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => p.body_8bit = false,
            ("SMTPUTF8", None) => p.smtputf8 = true,
            // A repeated DSN parameter is an error (RFC 3461 §4.3, §4.4).
            ("RET", Some(v)) if p.dsn.ret.is_none() => {
                p.dsn.ret = Some(match v.to_ascii_uppercase().as_str() {
                    "FULL" => Ret::Full,
                    "HDRS" => Ret::Hdrs,
                    _ => return Err(CommandError::BadParameter),
                })
            }
            ("ENVID", Some(v))
                if p.dsn.envid.is_none() && !v.is_empty() && v.len() <= dsn::MAX_ENVID && dsn::is_xtext(v) =>
            {
                p.dsn.envid = Some(v.to_string())
            }
            _ => return Err(CommandError::BadParameter),
        }
    }
    Ok(p)
}

fn parse_rcpt_params(s: &str) -> Result<RcptDsn, CommandError> {
    let mut d = RcptDsn::default();
    for param in s.split(' ').filter(|t| !t.is_empty()) {
        let (key, value) = param.split_once('=').ok_or(CommandError::BadParameter)?;
        match key.to_ascii_uppercase().as_str() {
            "NOTIFY" if d.notify.is_none() => d.notify = Some(Notify::parse(value).ok_or(CommandError::BadParameter)?),
            "ORCPT" if d.orcpt.is_none() && dsn::valid_orcpt(value) => d.orcpt = Some(value.to_string()),
            _ => return Err(CommandError::BadParameter),
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(l: &str, d: &str) -> Mailbox {
        Mailbox { local: l.into(), domain: d.into() }
    }

    #[test]
    fn commands() {
        let cases: Vec<(&[u8], Result<Command, CommandError>)> = vec![
            (b"EHLO client.test", Ok(Command::Ehlo("client.test".into()))),
            (b"ehlo [127.0.0.1]", Ok(Command::Ehlo("[127.0.0.1]".into()))),
            (b"HELO x", Ok(Command::Helo("x".into()))),
            (b"EHLO", Err(CommandError::Syntax("EHLO/HELO requires one domain or address literal"))),
            (
                b"MAIL FROM:<a@b.test>",
                Ok(Command::Mail { from: Some(mb("a", "b.test")), params: MailParams::default() }),
            ),
            (
                b"mail from: <a@b.test>",
                Ok(Command::Mail { from: Some(mb("a", "b.test")), params: MailParams::default() }),
            ),
            (b"MAIL FROM:<>", Ok(Command::Mail { from: None, params: MailParams::default() })),
            (
                b"MAIL FROM:<a@b.test> SIZE=1000 BODY=8BITMIME SMTPUTF8",
                Ok(Command::Mail {
                    from: Some(mb("a", "b.test")),
                    params: MailParams { size: Some(1000), body_8bit: true, smtputf8: true, ..Default::default() },
                }),
            ),
            (
                b"MAIL FROM:<a@b.test> SIZE=99999999999999999999",
                Ok(Command::Mail {
                    from: Some(mb("a", "b.test")),
                    params: MailParams { size: Some(u64::MAX), ..Default::default() },
                }),
            ),
            (b"MAIL FROM:<a@b.test> SIZE=12x", Err(CommandError::BadParameter)),
            (b"MAIL FROM:<a@b.test> SIZE=", Err(CommandError::BadParameter)),
            (b"MAIL FROM:<a@b.test> FOO=BAR", Err(CommandError::BadParameter)),
            (b"MAIL FROM:<a@b.test> BODY=BINARYMIME", Err(CommandError::BadParameter)),
            (b"MAIL TO:<a@b.test>", Err(CommandError::Syntax("Syntax: MAIL FROM:<address>"))),
            (b"MAIL FROM:<a@b", Err(CommandError::BadSender(AddressError::Unterminated))),
            (b"MAIL", Err(CommandError::Syntax("Syntax: MAIL FROM:<address>"))),
            (b"RCPT TO:<c@d.test>", Ok(Command::Rcpt { to: mb("c", "d.test"), dsn: RcptDsn::default() })),
            (b"RCPT TO:<Postmaster>", Ok(Command::Rcpt { to: mb("postmaster", ""), dsn: RcptDsn::default() })),
            (b"RCPT TO:<>", Err(CommandError::BadRecipient(AddressError::Empty))),
            (
                b"RCPT TO:<c@d.test> NOTIFY=NEVER",
                Ok(Command::Rcpt {
                    to: mb("c", "d.test"),
                    dsn: RcptDsn { notify: Some(Notify { success: false, failure: false, delay: false }), orcpt: None },
                }),
            ),
            (
                b"RCPT TO:<c@d.test> notify=SUCCESS,FAILURE ORCPT=rfc822;c+2Bx@d.test",
                Ok(Command::Rcpt {
                    to: mb("c", "d.test"),
                    dsn: RcptDsn {
                        notify: Some(Notify { success: true, failure: true, delay: false }),
                        orcpt: Some("rfc822;c+2Bx@d.test".into()),
                    },
                }),
            ),
            (b"RCPT TO:<c@d.test> NOTIFY=NEVER,DELAY", Err(CommandError::BadParameter)),
            (b"RCPT TO:<c@d.test> NOTIFY=DELAY NOTIFY=DELAY", Err(CommandError::BadParameter)),
            (b"RCPT TO:<c@d.test> ORCPT=c@d.test", Err(CommandError::BadParameter)),
            (b"RCPT TO:<c@d.test> FOO", Err(CommandError::BadParameter)),
            (
                b"MAIL FROM:<a@b.test> RET=hdrs ENVID=QQ+2B1",
                Ok(Command::Mail {
                    from: Some(mb("a", "b.test")),
                    params: MailParams {
                        dsn: MessageDsn { ret: Some(Ret::Hdrs), envid: Some("QQ+2B1".into()) },
                        ..Default::default()
                    },
                }),
            ),
            (b"MAIL FROM:<a@b.test> RET=ALL", Err(CommandError::BadParameter)),
            (b"MAIL FROM:<a@b.test> RET=FULL RET=FULL", Err(CommandError::BadParameter)),
            (b"MAIL FROM:<a@b.test> ENVID=a=b", Err(CommandError::BadParameter)),
            (b"RCPT TO:<c@@d.test>", Err(CommandError::BadRecipient(AddressError::BadLocalPart))),
            (b"DATA", Ok(Command::Data)),
            (b"data x", Err(CommandError::Syntax("This command takes no argument"))),
            (b"RSET", Ok(Command::Rset)),
            (b"NOOP anything", Ok(Command::Noop)),
            (b"QUIT", Ok(Command::Quit)),
            (b"VRFY root", Ok(Command::Vrfy)),
            (b"VRFY", Err(CommandError::Syntax("Syntax: VRFY <user>"))),
            (b"HELP", Ok(Command::Help)),
            (b"EXPN list", Ok(Command::NotImplemented)),
            (b"STARTTLS", Ok(Command::StartTls)),
            (b"starttls x", Err(CommandError::Syntax("This command takes no argument"))),
            (b"AUTH plain", Ok(Command::Auth { mechanism: "PLAIN".into(), initial: None })),
            (
                b"AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                Ok(Command::Auth { mechanism: "PLAIN".into(), initial: Some("AGFsaWNlAHNlY3JldA==".into()) }),
            ),
            (b"AUTH", Err(CommandError::Syntax("Syntax: AUTH mechanism [initial-response]"))),
            (b"AUTH PLAIN a b", Err(CommandError::Syntax("Syntax: AUTH mechanism [initial-response]"))),
            (b"BDAT 100", Ok(Command::Bdat { size: 100, last: false })),
            (b"bdat 0 last", Ok(Command::Bdat { size: 0, last: true })),
            (b"BDAT 99999999999999999999 LAST", Ok(Command::Bdat { size: u64::MAX, last: true })),
            (b"BDAT 999999999999999999999", Err(CommandError::Syntax("Syntax: BDAT size [LAST]"))),
            (b"BDAT", Err(CommandError::Syntax("Syntax: BDAT size [LAST]"))),
            (b"BDAT -1", Err(CommandError::Syntax("Syntax: BDAT size [LAST]"))),
            (b"BDAT 10 FIRST", Err(CommandError::Syntax("Syntax: BDAT size [LAST]"))),
            (b"XYZZY", Err(CommandError::Unrecognized)),
            (b"", Err(CommandError::Unrecognized)),
            (b"MAIL FROM:<\xff@b.test>", Err(CommandError::Syntax("Invalid UTF-8 in command"))),
            (b"NOOP \x00", Err(CommandError::Syntax("Control characters in command"))),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input), expected, "input {:?}", String::from_utf8_lossy(input));
        }
    }
}
