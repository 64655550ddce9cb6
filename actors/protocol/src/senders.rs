//! Which envelope senders an authenticated login may use (Postfix's `smtpd_sender_login_maps`
//! with `reject_authenticated_sender_login_mismatch`): a user cannot send as someone else.

use std::collections::HashMap;

use crate::address::{parse_mailbox, Mailbox};

/// Login → the addresses (`alice@example.com`) and whole domains (`@example.org`) it owns.
/// Logins and domains compare case-insensitively, local parts too (as Postfix's lookups do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SenderLogins {
    owned: HashMap<String, Vec<String>>,
}

impl SenderLogins {
    /// Patterns that are neither `local@domain` nor `@domain` are an error naming them.
    pub fn new(map: impl IntoIterator<Item = (String, Vec<String>)>) -> Result<SenderLogins, String> {
        let mut owned = HashMap::new();
        for (login, patterns) in map {
            let mut list = Vec::new();
            for p in patterns {
                let p = p.trim().to_lowercase();
                let ok = match p.split_once('@') {
                    Some((_, domain)) => !domain.is_empty() && !domain.contains('@'),
                    None => false,
                };
                if !ok {
                    return Err(format!("{login}: {p:?} is neither an address nor @domain"));
                }
                list.push(p);
            }
            owned.insert(login.to_lowercase(), list);
        }
        Ok(SenderLogins { owned })
    }

    pub fn is_empty(&self) -> bool {
        self.owned.is_empty()
    }

    /// Whether `login` may send as `sender`. A login the map does not name owns nothing.
    pub fn allows(&self, login: &str, sender: &Mailbox) -> bool {
        let Some(list) = self.owned.get(&login.to_lowercase()) else { return false };
        let address = format!("{}@{}", sender.local, sender.domain).to_lowercase();
        let domain = format!("@{}", sender.domain.to_lowercase());
        list.iter().any(|p| *p == address || *p == domain)
    }
}

/// The mailboxes a `From:` value names (RFC 5322 §3.4: display names, angle addresses, bare
/// addresses, groups, comments). `None` when it names none or one cannot be read: the caller then
/// cannot tell who the message claims to be from.
pub fn header_mailboxes(value: &[u8]) -> Option<Vec<Mailbox>> {
    let text = std::str::from_utf8(value).ok()?;
    let mut found = Vec::new();
    let mut bare = String::new(); // text outside comments and angle brackets
    let mut angle: Option<String> = None;
    let mut in_angle = false;
    let mut quoted = false;
    let mut comment = 0usize;
    let mut chars = text.chars();
    let finish = |bare: &mut String, angle: &mut Option<String>, found: &mut Vec<Mailbox>| -> Option<()> {
        let candidate = match angle.take() {
            Some(a) => a,
            None => bare.trim().to_string(),
        };
        bare.clear();
        if !candidate.is_empty() {
            found.push(parse_mailbox(candidate.trim()).ok()?);
        }
        Some(())
    };
    while let Some(c) = chars.next() {
        let target = if in_angle { angle.get_or_insert_with(String::new) } else { &mut bare };
        if quoted {
            target.push(c);
            match c {
                '\\' => target.push(chars.next()?),
                '"' => quoted = false,
                _ => {}
            }
            continue;
        }
        if comment > 0 {
            match c {
                '\\' => {
                    chars.next()?;
                }
                '(' => comment += 1,
                ')' => comment -= 1,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                quoted = true;
                target.push(c);
            }
            '(' => comment = 1,
            '<' if !in_angle => {
                in_angle = true;
                angle = Some(String::new());
            }
            '>' if in_angle => in_angle = false,
            // A group's display name ends here; its members follow.
            ':' if !in_angle => bare.clear(),
            ',' | ';' if !in_angle => finish(&mut bare, &mut angle, &mut found)?,
            c if in_angle => target.push(c),
            c => target.push(c),
        }
    }
    if quoted || comment > 0 || in_angle {
        return None;
    }
    finish(&mut bare, &mut angle, &mut found)?;
    (!found.is_empty()).then_some(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::parse_mailbox;

    #[test]
    fn ownership() {
        let map = SenderLogins::new([
            ("alice".to_string(), vec!["alice@example.com".to_string(), "@Example.ORG".to_string()]),
            ("bob".to_string(), vec!["bob@example.com".to_string()]),
        ])
        .unwrap();
        for (login, sender, want) in [
            ("alice", "alice@example.com", true),
            ("ALICE", "Alice@EXAMPLE.com", true),
            ("alice", "anyone@example.org", true),
            ("alice", "bob@example.com", false),
            ("alice", "alice@sub.example.org", false),
            ("bob", "bob@example.com", true),
            ("bob", "alice@example.org", false),
            ("carol", "carol@example.com", false),
        ] {
            assert_eq!(map.allows(login, &parse_mailbox(sender).unwrap()), want, "{login} {sender}");
        }
        for bad in ["alice", "@", "a@b@c", ""] {
            assert!(SenderLogins::new([("x".to_string(), vec![bad.to_string()])]).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod header_tests {
    use super::header_mailboxes;

    #[test]
    fn from_header_values() {
        for (value, want) in [
            (" alice@example.com", Some(vec!["alice@example.com"])),
            (" Alice <alice@example.com>", Some(vec!["alice@example.com"])),
            (" \"Bob, <bob@evil.test>\" <alice@example.com>", Some(vec!["alice@example.com"])),
            (" (bob@evil.test) alice@example.com (Alice)", Some(vec!["alice@example.com"])),
            (" a@example.com, B <b@example.org>", Some(vec!["a@example.com", "b@example.org"])),
            (" team: a@example.com, b@example.org;", Some(vec!["a@example.com", "b@example.org"])),
            (" =?utf-8?q?Al=C3=AFce?= <alice@example.com>", Some(vec!["alice@example.com"])),
            (" <alice@example.com> (comment (nested) here)", Some(vec!["alice@example.com"])),
            ("", None),
            (" undisclosed-recipients:;", None),
            (" Alice <alice@example.com", None),
            (" \"unterminated <alice@example.com>", None),
            (" (open comment alice@example.com", None),
            (" not an address", None),
            (" Alice <alice@example.com>, junk", None),
        ] {
            let got = header_mailboxes(value.as_bytes()).map(|v| v.iter().map(|m| m.to_string()).collect::<Vec<_>>());
            let want = want.map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            assert_eq!(got, want, "{value:?}");
        }
    }
}
