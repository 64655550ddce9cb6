//! DKIM signing (RFC 6376, RFC 8463) of mail leaving through us: the keys of each signing
//! domain, which messages get signed, and the `DKIM-Signature:` headers themselves.
//!
//! The signing domain is the one in the `From:` header, not the envelope sender: DMARC (which
//! the large receivers enforce) asks for a signature aligned with `From:`, and the envelope
//! sender of a notification is empty. Signing happens once, when a message is queued, with
//! relaxed/relaxed canonicalization and never `l=`; the body is read piece by piece (from memory
//! or its spool file), so a 25 MB message costs one piece of memory, not 25 MB.
//!
//! Invariant: signing never changes the message; it only yields header lines the queue puts in
//! front of it, so an existing signature cannot break.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;

/// The headers signed when a domain names none: those a recipient sees or a list server
/// relies on (RFC 6376 §5.4.1).
pub const DEFAULT_HEADERS: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Resent-Date",
    "Resent-From",
    "Resent-To",
    "Resent-Cc",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// Headers signed once more than they occur, so nobody can add one after us (RFC 6376 §8.15).
pub const DEFAULT_OVERSIGN: &[&str] = &["From", "Subject", "To"];

/// A header section longer than this is not signed (the message still goes): the signer keeps
/// the section in memory, and no real message has one this large.
pub const MAX_HEADER_SECTION: usize = 1024 * 1024;

const PIECE: usize = 64 * 1024;

/// One key of a signing domain, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySettings {
    pub selector: String,
    /// PEM: PKCS#8 (RSA or Ed25519) or PKCS#1 (`RSA PRIVATE KEY`).
    pub key_file: PathBuf,
    /// `rsa` or `ed25519` when the operator says which; `None` = whatever the file holds.
    pub algorithm: Option<String>,
}

/// A signing domain's settings (`[dkim."example.com"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSettings {
    pub domain: String,
    pub keys: Vec<KeySettings>,
    pub headers: Vec<String>,
    pub oversign: Vec<String>,
    /// Signatures expire (`x=`) this long after signing; `None` = never.
    pub expire: Option<Duration>,
}

enum Key {
    Rsa(Box<DkimSigner<RsaKey<Sha256>, Done>>),
    Ed25519(Box<DkimSigner<Ed25519Key, Done>>),
}

struct DomainKey {
    selector: String,
    key: Key,
}

struct Domain {
    keys: Vec<DomainKey>,
}

/// Why a message was not signed although signing is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsigned {
    /// No `From:` address, or its domain has no key.
    NoKey,
    /// Every key of the domain already signed it (the message came through us before).
    AlreadySigned,
    /// The header section is over [`MAX_HEADER_SECTION`].
    HeaderTooLarge,
}

/// The keys of every signing domain; cheap to share (`Arc`) between threads.
#[derive(Default)]
pub struct Signer {
    domains: HashMap<String, Domain>,
}

/// What [`Signer::load`] could not use, naming the domain and file.
#[derive(Debug, thiserror::Error)]
#[error("dkim.\"{domain}\": {what}")]
pub struct KeyError {
    pub domain: String,
    pub what: String,
}

impl Signer {
    /// Reads every key file. A key readable by every user of the machine is refused, as
    /// OpenDKIM does: whoever can read it can sign mail as the domain.
    pub fn load(domains: &[DomainSettings]) -> Result<Signer, KeyError> {
        let mut out = HashMap::new();
        for d in domains {
            let err = |what: String| KeyError { domain: d.domain.clone(), what };
            if d.keys.is_empty() {
                return Err(err("no key: give selector and key, or keys".into()));
            }
            let mut headers: Vec<String> = if d.headers.is_empty() {
                DEFAULT_HEADERS.iter().map(|h| h.to_string()).collect()
            } else {
                d.headers.clone()
            };
            if !headers.iter().any(|h| h.eq_ignore_ascii_case("from")) {
                return Err(err("headers must include From (RFC 6376 §5.4)".into()));
            }
            // Listed twice, a header present once is signed with one more, absent instance.
            headers.extend(d.oversign.iter().cloned());
            let mut keys = Vec::new();
            for k in &d.keys {
                let key = load_key(&k.key_file, k.algorithm.as_deref())
                    .map_err(|e| err(format!("key {}: {e}", k.key_file.display())))?;
                let signer = |key| -> Key {
                    match key {
                        Loaded::Rsa(r) => {
                            Key::Rsa(Box::new(template(DkimSigner::from_key(r), d, &k.selector, &headers)))
                        }
                        Loaded::Ed25519(e) => {
                            Key::Ed25519(Box::new(template(DkimSigner::from_key(e), d, &k.selector, &headers)))
                        }
                    }
                };
                keys.push(DomainKey { selector: k.selector.clone(), key: signer(key) });
            }
            out.insert(d.domain.to_ascii_lowercase(), Domain { keys });
        }
        Ok(Signer { domains: out })
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// Signs the message `reader` yields (headers and body as they will leave, without our
    /// trace header). Returns the `DKIM-Signature:` lines to put in front of it, one per key
    /// of the `From:` domain that has not signed it already.
    pub fn sign(&self, reader: &mut dyn Read) -> std::io::Result<Result<Vec<u8>, Unsigned>> {
        let Some((header, first_body)) = read_header_section(reader)? else {
            return Ok(Err(Unsigned::HeaderTooLarge));
        };
        let Some(domain_name) = from_domain(&header) else {
            return Ok(Err(Unsigned::NoKey));
        };
        // The domain itself or its nearest parent with a key: a signature by example.com is
        // aligned (DMARC's default, relaxed) with From: MAILER-DAEMON@mx.example.com.
        let mut candidate = domain_name.as_str();
        let (domain_name, domain) = loop {
            if let Some(d) = self.domains.get(candidate) {
                break (candidate.to_string(), d);
            }
            match candidate.split_once('.') {
                Some((_, parent)) if parent.contains('.') => candidate = parent,
                _ => return Ok(Err(Unsigned::NoKey)),
            }
        };
        let existing = existing_signatures(&header);
        let keys: Vec<&DomainKey> = domain
            .keys
            .iter()
            .filter(|k| !existing.iter().any(|(d, s)| *d == domain_name && s.eq_ignore_ascii_case(&k.selector)))
            .collect();
        if keys.is_empty() {
            return Ok(Err(Unsigned::AlreadySigned));
        }
        let mut streams: Vec<Stream> = keys
            .iter()
            .map(|k| match &k.key {
                Key::Rsa(s) => Stream::Rsa(s.sign_streaming()),
                Key::Ed25519(s) => Stream::Ed25519(s.sign_streaming()),
            })
            .collect();
        for s in &mut streams {
            s.write(&header);
            s.write(&first_body);
        }
        // Small messages (most) never need the large buffer: it grows when a read fills it.
        let mut buf = vec![0u8; 4096];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            for s in &mut streams {
                s.write(&buf[..n]);
            }
            if n == buf.len() && buf.len() < PIECE {
                buf = vec![0u8; PIECE];
            }
        }
        let mut out = Vec::new();
        for s in streams {
            match s.finish() {
                Ok(h) => out.extend_from_slice(h.as_bytes()),
                Err(e) => return Err(std::io::Error::other(format!("DKIM signing failed: {e}"))),
            }
        }
        Ok(Ok(out))
    }
}

fn template<K: mail_auth::common::crypto::SigningKey>(
    s: mail_auth::dkim::DkimSigner<K, mail_auth::dkim::NeedDomain>,
    d: &DomainSettings,
    selector: &str,
    headers: &[String],
) -> DkimSigner<K, Done> {
    let s = s
        .domain(d.domain.to_ascii_lowercase())
        .selector(selector)
        .headers(headers.iter().cloned())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed);
    match d.expire {
        Some(x) => s.expiration(x.as_secs().max(1)),
        None => s,
    }
}

enum Stream<'a> {
    Rsa(mail_auth::dkim::streaming::DkimSigningStream<'a, RsaKey<Sha256>>),
    Ed25519(mail_auth::dkim::streaming::DkimSigningStream<'a, Ed25519Key>),
}

impl Stream<'_> {
    fn write(&mut self, b: &[u8]) {
        match self {
            Stream::Rsa(s) => s.write(b),
            Stream::Ed25519(s) => s.write(b),
        }
    }

    fn finish(self) -> mail_auth::Result<String> {
        Ok(match self {
            Stream::Rsa(s) => s.finish()?.to_header(),
            Stream::Ed25519(s) => s.finish()?.to_header(),
        })
    }
}

enum Loaded {
    Rsa(RsaKey<Sha256>),
    Ed25519(Ed25519Key),
}

fn load_key(path: &Path, algorithm: Option<&str>) -> Result<Loaded, String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.mode() & 0o004 != 0 {
        return Err("readable by every user of this machine: chmod 600 it (or 640 for a group)".into());
    }
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("not a PEM private key: {e}"))?;
    let want = algorithm.map(str::to_ascii_lowercase);
    match want.as_deref() {
        None | Some("rsa") | Some("rsa-sha256") | Some("ed25519") | Some("ed25519-sha256") => {}
        Some(other) => return Err(format!("algorithm {other:?} is not rsa or ed25519")),
    }
    let is_rsa = |a: &str| a.starts_with("rsa");
    if let PrivateKeyDer::Pkcs8(p8) = &der {
        if want.as_deref().is_none_or(|a| !is_rsa(a)) {
            if let Ok(k) = Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der()) {
                return Ok(Loaded::Ed25519(k));
            }
        }
    }
    if want.as_deref().is_some_and(|a| !is_rsa(a)) {
        return Err("not an Ed25519 key (PKCS#8)".into());
    }
    RsaKey::<Sha256>::from_key_der(der)
        .map(Loaded::Rsa)
        .map_err(|e| format!("not a usable RSA key (2048 to 4096 bits) or Ed25519 key: {e}"))
}

/// Reads up to the end of the header section: the section (with its blank line) and whatever
/// body bytes came with the last read. `None` = the section is over [`MAX_HEADER_SECTION`].
fn read_header_section(reader: &mut dyn Read) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(8 * 1024);
    let mut piece = [0u8; 4096];
    let mut searched: usize = 0;
    loop {
        if buf.starts_with(b"\r\n") {
            // No header at all: the whole message is body.
            return Ok(Some((Vec::new(), buf)));
        }
        if let Some(p) = buf[searched.saturating_sub(3)..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = searched.saturating_sub(3) + p + 4;
            let body = buf.split_off(end);
            return Ok(Some((buf, body)));
        }
        searched = buf.len();
        if buf.len() > MAX_HEADER_SECTION {
            return Ok(None);
        }
        let n = reader.read(&mut piece)?;
        if n == 0 {
            return Ok(Some((buf, Vec::new())));
        }
        buf.extend_from_slice(&piece[..n]);
    }
}

/// The lower-case domain of the first `From:` address.
pub fn from_domain(header: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::new().parse_headers(header)?;
    let addr = parsed.from()?.first()?.address()?;
    let (_, domain) = addr.rsplit_once('@')?;
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    (!domain.is_empty()).then_some(domain)
}

/// `(d=, s=)` of each `DKIM-Signature:` already in the header section.
fn existing_signatures(header: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let text = String::from_utf8_lossy(header);
    let mut current: Option<String> = None;
    let flush = |h: Option<String>, out: &mut Vec<(String, String)>| {
        if let Some(h) = h {
            let mut d = String::new();
            let mut s = String::new();
            for tag in h.split(';') {
                let tag: String = tag.chars().filter(|c| !c.is_whitespace()).collect();
                if let Some(v) = tag.strip_prefix("d=") {
                    d = v.to_ascii_lowercase();
                } else if let Some(v) = tag.strip_prefix("s=") {
                    s = v.to_string();
                }
            }
            out.push((d, s));
        }
    };
    for line in text.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(c) = current.as_mut() {
                c.push_str(line);
            }
            continue;
        }
        flush(current.take(), &mut out);
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("dkim-signature") {
                current = Some(value.to_string());
            }
        }
    }
    flush(current, &mut out);
    out
}

/// A new key pair for `mailroot dkim keygen`: the private key as PEM and the DNS TXT record
/// value (`v=DKIM1; k=…; p=…`).
pub fn generate(algorithm: &str) -> Result<(String, String), String> {
    use base64::Engine;
    let (label, der, k, public) = match algorithm {
        "ed25519" => {
            let pair = mail_auth::dkim::generate::DkimKeyPair::generate_ed25519().map_err(|e| e.to_string())?;
            let (private, public) = pair.into_inner();
            ("PRIVATE KEY", private, "ed25519", public)
        }
        "rsa" => {
            let pair = mail_auth::dkim::generate::DkimKeyPair::generate_rsa(2048).map_err(|e| e.to_string())?;
            let (private, public) = pair.into_inner();
            // DNS publishes the SubjectPublicKeyInfo form; the pair gives PKCS#1.
            ("RSA PRIVATE KEY", private, "rsa", rsa_spki(&public))
        }
        other => return Err(format!("algorithm {other:?} is not ed25519 or rsa")),
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = b64.encode(&der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    Ok((pem, format!("v=DKIM1; k={k}; p={}", b64.encode(&public))))
}

/// The DNS TXT record value for the key in `path` (what `mailroot dns-records` prints).
pub fn public_record(path: &Path) -> Result<String, String> {
    use base64::Engine;
    let (k, public) = match load_key(path, None)? {
        Loaded::Rsa(r) => ("rsa", rsa_spki(&r.public_key())),
        Loaded::Ed25519(e) => ("ed25519", e.public_key()),
    };
    Ok(format!("v=DKIM1; k={k}; p={}", base64::engine::general_purpose::STANDARD.encode(public)))
}

/// Wraps a PKCS#1 RSA public key in a SubjectPublicKeyInfo (the `p=` form verifiers expect).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    fn der_len(n: usize) -> Vec<u8> {
        if n < 0x80 {
            vec![n as u8]
        } else {
            let bytes: Vec<u8> = n.to_be_bytes().iter().copied().skip_while(|b| *b == 0).collect();
            let mut v = vec![0x80 | bytes.len() as u8];
            v.extend(bytes);
            v
        }
    }
    // AlgorithmIdentifier { rsaEncryption, NULL }
    let alg: &[u8] = &[0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
    let mut bit_string = vec![0x03];
    bit_string.extend(der_len(pkcs1.len() + 1));
    bit_string.push(0);
    bit_string.extend_from_slice(pkcs1);
    let mut out = vec![0x30];
    out.extend(der_len(alg.len() + bit_string.len()));
    out.extend_from_slice(alg);
    out.extend(bit_string);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_domains() {
        let cases: &[(&str, Option<&str>)] = &[
            ("From: a@Example.COM\r\n\r\n", Some("example.com")),
            ("From: \"Doe, John\" <john@example.org>\r\nTo: x@y\r\n\r\n", Some("example.org")),
            ("From: =?utf-8?q?J=C3=B6rg?= <j@ex.net> (comment)\r\n\r\n", Some("ex.net")),
            ("From:\r\n a@folded.example\r\n\r\n", Some("folded.example")),
            ("To: x@y\r\n\r\n", None),
            ("From: undisclosed\r\n\r\n", None),
        ];
        for (header, want) in cases {
            assert_eq!(from_domain(header.as_bytes()).as_deref(), *want, "{header:?}");
        }
    }

    #[test]
    fn existing_signature_tags() {
        let h = b"DKIM-Signature: v=1; a=rsa-sha256; d=Example.com;\r\n\ts=sel1; h=from; bh=x; b=y\r\nFrom: a@example.com\r\ndkim-signature: v=1; d=other.org; s=k\r\n\r\n";
        assert_eq!(
            existing_signatures(h),
            vec![("example.com".into(), "sel1".into()), ("other.org".into(), "k".into())]
        );
    }

    #[test]
    fn header_sections() {
        type Split<'a> = Option<(&'a [u8], &'a [u8])>;
        let cases: &[(&[u8], Split)] = &[
            (b"A: b\r\n\r\nbody", Some((b"A: b\r\n\r\n", b"body"))),
            (b"A: b\r\n", Some((b"A: b\r\n", b""))),
            (b"\r\nonly body", Some((b"", b"\r\nonly body"))),
        ];
        for (input, want) in cases {
            let got = read_header_section(&mut &input[..]).unwrap();
            assert_eq!(got.as_ref().map(|(h, b)| (h.as_slice(), b.as_slice())), *want);
        }
        // The blank line split across reads is still found.
        let mut two = std::io::Read::chain(&b"A: b\r\n\r"[..], &b"\nbody"[..]);
        let (h, b) = read_header_section(&mut two).unwrap().unwrap();
        assert_eq!((h.as_slice(), b.as_slice()), (&b"A: b\r\n\r\n"[..], &b"body"[..]));
        let huge = vec![b'x'; MAX_HEADER_SECTION + 10];
        assert!(read_header_section(&mut &huge[..]).unwrap().is_none());
    }
}
