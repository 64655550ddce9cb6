//! Which envelope senders an authenticated login may use (Postfix's `smtpd_sender_login_maps`
//! with `reject_authenticated_sender_login_mismatch`): a user cannot send as someone else.

use std::collections::HashMap;

use crate::address::Mailbox;

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
