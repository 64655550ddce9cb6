//! The Sender Rewriting Scheme (SRS, as postsrsd and libsrs2 do it): mail we forward to another
//! domain leaves with the sender `SRS0=HHHH=TT=orig-domain=orig-local@our-domain`, so the
//! destination's SPF check sees our domain, which our SPF record covers, instead of the original
//! sender's domain, whose record does not list us. A bounce to that address comes back to us; we
//! check its hash (HMAC-SHA1 with our secret, so nobody can make us relay to an address of their
//! choosing) and age (21 days), and send it on to the original sender.

use base64::Engine;

use crate::protocol::Mailbox;

/// How long an SRS address is honoured, in days (postsrsd's default).
pub const MAX_AGE_DAYS: u64 = 21;

/// The timestamp wraps every 1024 days (two base32 characters).
const TIME_SLOTS: u64 = 1024;
const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

pub struct Srs {
    key: ring::hmac::Key,
    /// The domain SRS addresses are in (one of ours, so bounces reach us).
    pub domain: String,
}

impl Srs {
    pub fn new(secret: &[u8], domain: &str) -> Srs {
        Srs {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret),
            domain: domain.to_ascii_lowercase(),
        }
    }

    /// 32 random bytes, hex: a new secret.
    pub fn generate_secret() -> Result<String, String> {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| "no randomness available".to_string())?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    fn hash(&self, stamp: &str, domain: &str, local: &str) -> String {
        let data = format!("{stamp}{}{}", domain.to_ascii_lowercase(), local.to_lowercase());
        let tag = ring::hmac::sign(&self.key, data.as_bytes());
        let b64 = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
        b64.chars().take(4).collect()
    }

    /// The sender a forwarded copy of mail from `sender` leaves with, at `unix_days`. `None` when
    /// the result would not be a valid address (a local part over 64 octets, RFC 5321 §4.5.3.1.1,
    /// or a quoted one) or the sender is in the SRS domain already; the caller then keeps it.
    pub fn forward(&self, sender: &Mailbox, unix_days: u64) -> Option<Mailbox> {
        if sender.domain.eq_ignore_ascii_case(&self.domain) || sender.domain.is_empty() {
            return None;
        }
        let stamp = timestamp(unix_days);
        let hash = self.hash(&stamp, &sender.domain, &sender.local);
        let local = format!("SRS0={hash}={stamp}={}={}", sender.domain, sender.local);
        // Too long, or not a valid local part (a quoted original): the sender stays.
        crate::protocol::address::parse_mailbox(&format!("{local}@{}", self.domain)).ok()
    }

    /// Takes `to` apart if it is an SRS address: `None` = not one (another local part), `Some(Err)`
    /// = forged (bad hash) or expired, `Some(Ok(original))` = the original sender.
    pub fn reverse(&self, to: &Mailbox, unix_days: u64) -> Option<Result<Mailbox, String>> {
        if !to.domain.eq_ignore_ascii_case(&self.domain) {
            return None;
        }
        let rest = to.local.get(..5).filter(|p| p.eq_ignore_ascii_case("SRS0=")).map(|_| &to.local[5..])?;
        let mut parts = rest.splitn(4, '=');
        let (Some(hash), Some(stamp), Some(domain), Some(local)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Some(Err("malformed SRS address".into()));
        };
        // Some MTAs change the case of local parts: compare the hash without case.
        if !self.hash(&stamp.to_ascii_uppercase(), domain, local).eq_ignore_ascii_case(hash) {
            return Some(Err("SRS address not issued here".into()));
        }
        let Some(then) = slot(stamp) else { return Some(Err("malformed SRS address".into())) };
        let age = (unix_days % TIME_SLOTS + TIME_SLOTS - then) % TIME_SLOTS;
        if age > MAX_AGE_DAYS {
            return Some(Err("SRS address expired".into()));
        }
        match crate::protocol::address::parse_mailbox(&format!("{local}@{domain}")) {
            Ok(m) if !m.domain.is_empty() => Some(Ok(m)),
            _ => Some(Err("malformed SRS address".into())),
        }
    }
}

fn timestamp(unix_days: u64) -> String {
    let t = unix_days % TIME_SLOTS;
    let a = BASE32[(t >> 5) as usize & 31] as char;
    let b = BASE32[t as usize & 31] as char;
    format!("{a}{b}")
}

fn slot(stamp: &str) -> Option<u64> {
    let b = stamp.as_bytes();
    if b.len() != 2 {
        return None;
    }
    let v = |c: u8| BASE32.iter().position(|x| *x == c.to_ascii_uppercase()).map(|p| p as u64);
    Some(v(b[0])? << 5 | v(b[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::address::parse_mailbox;

    #[test]
    fn forward_and_back() {
        let srs = Srs::new(b"secret", "example.test");
        let other = Srs::new(b"another secret", "example.test");
        let day = 20_000;
        let alice = parse_mailbox("alice@origin.test").unwrap();
        let f = srs.forward(&alice, day).unwrap();
        assert_eq!(f.domain, "example.test");
        assert!(f.local.starts_with("SRS0=") && f.local.ends_with("=origin.test=alice"), "{f}");
        // Back within 21 days, with any case, across the 1024-day wrap too.
        for later in [day, day + 1, day + MAX_AGE_DAYS] {
            assert_eq!(srs.reverse(&f, later), Some(Ok(alice.clone())), "day {later}");
        }
        let lower = Mailbox { local: f.local.to_lowercase(), domain: f.domain.clone() };
        assert_eq!(srs.reverse(&lower, day), Some(Ok(alice.clone())));
        let wrap = srs.forward(&alice, 1023).unwrap();
        assert_eq!(srs.reverse(&wrap, 1024 + 5), Some(Ok(alice.clone())));
        // Expired, forged, tampered, malformed, not ours.
        for (to, day) in [
            (f.clone(), day + MAX_AGE_DAYS + 1),
            (other.forward(&alice, day).unwrap(), day),
            (Mailbox { local: f.local.replace("alice", "mallory"), domain: f.domain.clone() }, day),
            (parse_mailbox("SRS0=abcd@example.test").unwrap(), day),
            (parse_mailbox("SRS0=abcd=!!=x.test=y@example.test").unwrap(), day),
        ] {
            assert!(matches!(srs.reverse(&to, day), Some(Err(_))), "{to}");
        }
        assert_eq!(srs.reverse(&parse_mailbox("alice@example.test").unwrap(), day), None);
        assert_eq!(srs.reverse(&f.clone().with_domain("other.test"), day), None);
        // Our own senders and senders too long to wrap stay as they are.
        assert_eq!(srs.forward(&parse_mailbox("bob@example.test").unwrap(), day), None);
        let long = parse_mailbox(&format!("{}@origin.test", "x".repeat(50))).unwrap();
        assert_eq!(srs.forward(&long, day), None);
    }

    trait WithDomain {
        fn with_domain(self, d: &str) -> Mailbox;
    }

    impl WithDomain for Mailbox {
        fn with_domain(self, d: &str) -> Mailbox {
            Mailbox { local: self.local, domain: d.into() }
        }
    }
}
