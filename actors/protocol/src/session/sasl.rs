//! The SASL exchange of AUTH PLAIN and LOGIN (RFC 4954, RFC 4616), pure: a mechanism and its
//! client responses in, a challenge, credentials to check, or a refusal out. The session decides
//! *whether* AUTH may start (EHLO first, TLS, not twice, not in a transaction); this module only
//! decodes what the client sends.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::Secret;
use crate::reply::{self, Reply};

/// Where an exchange stands while the session reads the client's next response line.
#[derive(Debug)]
pub(crate) enum AuthStep {
    Plain,
    LoginUser,
    LoginPassword { user: String },
}

/// What the session does next.
#[derive(Debug)]
pub(crate) enum SaslStep {
    /// Send `334 <prompt>` and read the next line as the response to `AuthStep`.
    Challenge(&'static str, AuthStep),
    /// The exchange is complete: check these credentials.
    Credentials { user: String, password: Secret },
    /// Well-formed but unusable credentials: a failed authentication (counted as a refusal).
    Failed,
    /// A protocol error (cancelled, not base64, unknown mechanism): this reply.
    Refused(Reply),
}

const USERNAME_PROMPT: &str = "VXNlcm5hbWU6"; // "Username:"
const PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6"; // "Password:"

/// `AUTH <mechanism> [initial-response]`.
pub(crate) fn start(mechanism: &str, initial: Option<&str>) -> SaslStep {
    match (mechanism, initial) {
        ("PLAIN", None) => SaslStep::Challenge("", AuthStep::Plain),
        ("PLAIN", Some(response)) => respond(AuthStep::Plain, response.as_bytes()),
        ("LOGIN", None) => SaslStep::Challenge(USERNAME_PROMPT, AuthStep::LoginUser),
        ("LOGIN", Some(response)) => respond(AuthStep::LoginUser, response.as_bytes()),
        _ => SaslStep::Refused(reply::auth_mechanism_unsupported()),
    }
}

/// One client response line (without CRLF): base64, `=` for empty, or `*` to cancel.
pub(crate) fn respond(step: AuthStep, line: &[u8]) -> SaslStep {
    if line == b"*" {
        return SaslStep::Refused(reply::auth_cancelled());
    }
    // "=" is an empty initial response (RFC 4954 §4). Padding must be canonical (RFC 4648 §3.5).
    let decoded = if line == b"=" { Ok(Vec::new()) } else { STANDARD.decode(line) };
    let Ok(decoded) = decoded else {
        return SaslStep::Refused(reply::auth_bad_encoding());
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
    match step {
        AuthStep::Plain => {
            // authzid NUL authcid NUL password; acting for another user is not supported.
            let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
            let creds = match parts.as_slice() {
                [authz, user, pass] if authz.is_empty() || authz == user => text(user).zip(text(pass)),
                _ => None,
            };
            match creds {
                Some((user, pass)) if !user.is_empty() => SaslStep::Credentials { user, password: Secret(pass) },
                _ => SaslStep::Failed,
            }
        }
        AuthStep::LoginUser => match text(&decoded) {
            Some(user) => SaslStep::Challenge(PASSWORD_PROMPT, AuthStep::LoginPassword { user }),
            None => SaslStep::Refused(reply::auth_bad_encoding()),
        },
        AuthStep::LoginPassword { user } => match text(&decoded) {
            Some(pass) => SaslStep::Credentials { user, password: Secret(pass) },
            None => SaslStep::Refused(reply::auth_bad_encoding()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each case: the mechanism, its initial response, then further response lines; what the
    /// last step is (`C` challenge with its prompt, `K user:pass` credentials, `F` failed,
    /// or the refusal's code and enhanced code).
    #[test]
    fn exchanges() {
        let cases: &[(&str, Option<&str>, &[&str], &str)] = &[
            ("PLAIN", Some("AGFsaWNlAHNlY3JldA=="), &[], "K alice:secret"),
            ("PLAIN", Some("YWxpY2UAYWxpY2UAc2VjcmV0"), &[], "K alice:secret"), // authzid = authcid
            ("PLAIN", Some("Ym9iAGFsaWNlAHNlY3JldA=="), &[], "F"),              // acting for bob
            ("PLAIN", Some("AABzZWNyZXQ="), &[], "F"),                          // empty user
            ("PLAIN", Some("="), &[], "F"),
            ("PLAIN", None, &[], "C "),
            ("PLAIN", None, &["AGFsaWNlAHNlY3JldA=="], "K alice:secret"),
            ("PLAIN", None, &["*"], "501 5.0.0"),
            ("PLAIN", Some("not-base64!"), &[], "501 5.5.2"),
            ("PLAIN", Some("AGFsaWNlAHNlY3JldA"), &[], "501 5.5.2"), // padding missing
            ("PLAIN", Some("QR=="), &[], "501 5.5.2"),               // non-canonical trailing bits
            ("LOGIN", None, &[], "C VXNlcm5hbWU6"),
            ("LOGIN", None, &["YWxpY2U="], "C UGFzc3dvcmQ6"),
            ("LOGIN", None, &["YWxpY2U=", "c2VjcmV0"], "K alice:secret"),
            ("LOGIN", Some("YWxpY2U="), &["c2VjcmV0"], "K alice:secret"),
            ("LOGIN", None, &["/w=="], "501 5.5.2"), // not UTF-8
            ("CRAM-MD5", None, &[], "504 5.5.4"),
        ];
        for (mechanism, initial, lines, want) in cases {
            let mut step = start(mechanism, *initial);
            for line in *lines {
                let SaslStep::Challenge(_, next) = step else { panic!("{mechanism} {initial:?}: no challenge") };
                step = respond(next, line.as_bytes());
            }
            let got = match step {
                SaslStep::Challenge(prompt, _) => format!("C {prompt}"),
                SaslStep::Credentials { user, password } => format!("K {user}:{}", password.0),
                SaslStep::Failed => "F".into(),
                SaslStep::Refused(r) => format!("{} {}", r.code, r.status.unwrap_or("")),
            };
            assert_eq!(&got, want, "{mechanism} {initial:?} {lines:?}");
        }
    }
}
