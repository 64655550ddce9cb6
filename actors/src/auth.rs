//! SMTP AUTH users and their argon2 password hashes (PHC strings, as `mailroot passwd` prints).
//!
//! Invariant: a verification takes about as long for an unknown user as for a known one, so the
//! time taken does not tell which user names exist.

use std::collections::HashMap;

use std::io::Read;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

pub struct Users {
    /// User name (as given in AUTH, compared exactly) → PHC hash string.
    hashes: HashMap<String, String>,
    /// Verified against for unknown users.
    decoy: String,
}

impl Users {
    /// Checks every hash parses; the error names the user.
    pub fn new(hashes: HashMap<String, String>) -> Result<Users, String> {
        for (user, hash) in &hashes {
            PasswordHash::new(hash).map_err(|e| format!("user {user:?}: not a password hash ({e})"))?;
        }
        let decoy = hash_password("not a real password").map_err(|e| format!("cannot hash: {e}"))?;
        Ok(Users { hashes, decoy })
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// True when `password` is `user`'s. Slow on purpose (argon2): call it off the event loop.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let (hash, known) = match self.hashes.get(user) {
            Some(h) => (h.as_str(), true),
            None => (self.decoy.as_str(), false),
        };
        let ok = PasswordHash::new(hash)
            .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
            .unwrap_or(false);
        ok && known
    }
}

/// An argon2id hash of `password` with a fresh random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read /dev/urandom for a salt: {e}"))?;
    let salt = SaltString::encode_b64(&bytes).map_err(|e| e.to_string())?;
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        let users = Users::new([("alice".to_string(), h)].into_iter().collect()).unwrap();
        let cases =
            [("alice", "s3cret", true), ("alice", "S3cret", false), ("alice", "", false), ("bob", "s3cret", false)];
        for (u, p, want) in cases {
            assert_eq!(users.verify(u, p), want, "{u}/{p}");
        }
        assert!(Users::new([("x".to_string(), "plaintext".to_string())].into_iter().collect())
            .err()
            .is_some_and(|e| e.contains("\"x\"")));
    }
}
