//! Mailbox and path syntax of RFC 5321 §4.1.2 (with RFC 6531 UTF-8), and the length limits of §4.5.3.1.

use std::fmt;

/// A validated `local-part@domain`. The local part keeps its original form (quoted or not);
/// the domain is stored lower-cased because domains compare case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mailbox {
    pub local: String,
    pub domain: String,
}

impl Mailbox {
    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// The domains delivered locally; the first is the default domain. The one place that decides
/// "is this domain ours" (RCPT policy and queue routing both ask it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDomains(Vec<String>);

impl LocalDomains {
    pub fn new<S: AsRef<str>>(domains: impl IntoIterator<Item = S>) -> Self {
        LocalDomains(domains.into_iter().map(|d| d.as_ref().to_ascii_lowercase()).collect())
    }

    /// Domains compare case-insensitively.
    pub fn contains(&self, domain: &str) -> bool {
        self.0.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// The domain of an address (`local@domain`), checked with [`LocalDomains::contains`].
    pub fn contains_address(&self, address: &str) -> bool {
        address.rsplit_once('@').is_some_and(|(_, d)| self.contains(d))
    }

    /// The default domain: completes a bare `postmaster`.
    pub fn default_domain(&self) -> Option<&str> {
        self.0.first().map(String::as_str)
    }
}

/// Why an address was refused; each maps to one short text for the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressError {
    Empty,
    MissingAt,
    BadLocalPart,
    BadDomain,
    LocalTooLong,
    DomainTooLong,
    PathTooLong,
    Unterminated,
}

impl AddressError {
    pub fn text(self) -> &'static str {
        match self {
            AddressError::Empty => "empty address",
            AddressError::MissingAt => "address lacks a domain",
            AddressError::BadLocalPart => "invalid local part",
            AddressError::BadDomain => "invalid domain",
            AddressError::LocalTooLong => "local part longer than 64 octets",
            AddressError::DomainTooLong => "domain longer than 255 octets",
            AddressError::PathTooLong => "path longer than 256 octets",
            AddressError::Unterminated => "missing closing '>'",
        }
    }
}

/// A parsed reverse- or forward-path: `None` is the null path `<>`.
pub type Path = Option<Mailbox>;

/// Parses the path at the start of `s` (after `FROM:`/`TO:`), returning it and the rest
/// (the ESMTP parameters). Accepts `<addr>`, `<>`, a source route (ignored, RFC 5321 §4.1.2) and,
/// leniently, an unbracketed address. `<postmaster>` without a domain is returned with an empty
/// domain for the caller to complete.
pub fn parse_path(s: &str) -> Result<(Path, &str), AddressError> {
    let s = s.trim_start_matches(' ');
    if let Some(inner) = s.strip_prefix('<') {
        let end = find_path_end(inner).ok_or(AddressError::Unterminated)?;
        let path = &inner[..end];
        let rest = &inner[end + 1..];
        if path.len() + 2 > 256 {
            return Err(AddressError::PathTooLong);
        }
        if path.is_empty() {
            return Ok((None, rest));
        }
        let path = strip_source_route(path)?;
        Ok((Some(parse_mailbox(path)?), rest))
    } else {
        let end = s.find(' ').unwrap_or(s.len());
        let (addr, rest) = s.split_at(end);
        if addr.is_empty() {
            return Err(AddressError::Empty);
        }
        if addr.len() > 256 {
            return Err(AddressError::PathTooLong);
        }
        Ok((Some(parse_mailbox(addr)?), rest))
    }
}

/// Finds the closing `>`, skipping a quoted local part that may itself contain `>`.
fn find_path_end(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut quoted = false;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

fn strip_source_route(path: &str) -> Result<&str, AddressError> {
    if !path.starts_with('@') {
        return Ok(path);
    }
    match path.find(':') {
        Some(colon) => Ok(&path[colon + 1..]),
        None => Err(AddressError::BadDomain),
    }
}

/// Parses `local@domain` (no brackets). `postmaster` alone is allowed with an empty domain.
pub fn parse_mailbox(s: &str) -> Result<Mailbox, AddressError> {
    if s.is_empty() {
        return Err(AddressError::Empty);
    }
    if s.eq_ignore_ascii_case("postmaster") {
        return Ok(Mailbox { local: "postmaster".into(), domain: String::new() });
    }
    let at = split_at_domain(s).ok_or(AddressError::MissingAt)?;
    let (local, domain) = (&s[..at], &s[at + 1..]);
    validate_local(local)?;
    validate_domain(domain)?;
    Ok(Mailbox { local: local.to_string(), domain: domain.to_ascii_lowercase() })
}

/// The index of the `@` that separates local part and domain (the last one outside quotes).
fn split_at_domain(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut quoted = false;
    let mut found = None;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'@' if !quoted => found = Some(i),
            _ => {}
        }
        i += 1;
    }
    found
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || is_utf8_text(c)
}

/// A non-ASCII character an internationalized address may hold (RFC 6531): anything but control
/// characters (C1, U+0080–U+009F) and [`is_invisible`] ones.
fn is_utf8_text(c: char) -> bool {
    !c.is_ascii() && !c.is_control() && !is_invisible(c)
}

/// Format and separator characters that change how a line reads without showing themselves:
/// U+2028 LINE SEPARATOR, U+2029, bidirectional overrides, zero-width characters, U+FEFF, tags,
/// noncharacters. Refused in addresses, escaped in the text log.
pub fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}'
        | '\u{0600}'..='\u{0605}'
        | '\u{061C}'
        | '\u{06DD}'
        | '\u{070F}'
        | '\u{08E2}'
        | '\u{180E}'
        | '\u{200B}'..='\u{200F}'
        | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}'
        | '\u{FEFF}'
        | '\u{FFF9}'..='\u{FFFB}'
        | '\u{FFFE}'..='\u{FFFF}'
        | '\u{110BD}'
        | '\u{110CD}'
        | '\u{13430}'..='\u{1343F}'
        | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}'
    )
}

fn validate_local(local: &str) -> Result<(), AddressError> {
    if local.is_empty() {
        return Err(AddressError::BadLocalPart);
    }
    if local.len() > 64 {
        return Err(AddressError::LocalTooLong);
    }
    if let Some(q) = local.strip_prefix('"') {
        let inner = q.strip_suffix('"').ok_or(AddressError::BadLocalPart)?;
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(e) if (' '..='~').contains(&e) => {}
                    _ => return Err(AddressError::BadLocalPart),
                },
                '"' => return Err(AddressError::BadLocalPart),
                c if c.is_ascii() && !(' '..='~').contains(&c) => return Err(AddressError::BadLocalPart),
                c if !c.is_ascii() && !is_utf8_text(c) => return Err(AddressError::BadLocalPart),
                _ => {}
            }
        }
        return Ok(());
    }
    // Dot-string: atoms separated by single dots.
    for atom in local.split('.') {
        if atom.is_empty() || !atom.chars().all(is_atext) {
            return Err(AddressError::BadLocalPart);
        }
    }
    Ok(())
}

/// Validates a domain name or an address literal (`[192.0.2.1]`, `[IPv6:...]`).
pub fn validate_domain(domain: &str) -> Result<(), AddressError> {
    if domain.is_empty() {
        return Err(AddressError::BadDomain);
    }
    if domain.len() > 255 {
        return Err(AddressError::DomainTooLong);
    }
    if let Some(lit) = domain.strip_prefix('[') {
        let inner = lit.strip_suffix(']').ok_or(AddressError::BadDomain)?;
        let ok = if let Some(v6) = inner.strip_prefix("IPv6:").or_else(|| inner.strip_prefix("ipv6:")) {
            v6.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            inner.parse::<std::net::Ipv4Addr>().is_ok()
        };
        return if ok { Ok(()) } else { Err(AddressError::BadDomain) };
    }
    for label in domain.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || is_utf8_text(c));
        if !valid {
            return Err(AddressError::BadDomain);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(l: &str, d: &str) -> Option<Mailbox> {
        Some(Mailbox { local: l.into(), domain: d.into() })
    }

    #[test]
    fn local_domains() {
        let d = LocalDomains::new(["Example.TEST", "alias.test"]);
        assert_eq!(d.default_domain(), Some("example.test"));
        for (addr, local) in [
            ("a@example.test", true),
            ("a@EXAMPLE.test", true),
            ("a@alias.test", true),
            ("a@other.test", false),
            ("\"x@example.test\"@other.test", false),
            ("example.test", false),
        ] {
            assert_eq!(d.contains_address(addr), local, "{addr}");
        }
        assert_eq!(LocalDomains::new(Vec::<String>::new()).default_domain(), None);
    }

    #[test]
    fn paths() {
        let long_local = format!("<{}@x.test>", "a".repeat(65));
        let long_path = format!("<a@{}.test>", "b.".repeat(130));
        type Case<'a> = (&'a str, Result<(Path, &'a str), AddressError>);
        let cases: Vec<Case> = vec![
            ("<a@b.test>", Ok((mb("a", "b.test"), ""))),
            ("<A.B@EXAMPLE.Test> SIZE=10", Ok((mb("A.B", "example.test"), " SIZE=10"))),
            ("<>", Ok((None, ""))),
            (" <a@b.test>", Ok((mb("a", "b.test"), ""))),
            ("a@b.test", Ok((mb("a", "b.test"), ""))),
            ("<@relay.test,@r2.test:a@b.test>", Ok((mb("a", "b.test"), ""))),
            ("<\"a >b\"@b.test>", Ok((mb("\"a >b\"", "b.test"), ""))),
            ("<postmaster>", Ok((mb("postmaster", ""), ""))),
            ("<a@[192.0.2.1]>", Ok((mb("a", "[192.0.2.1]"), ""))),
            ("<a@[IPv6:::1]>", Ok((mb("a", "[ipv6:::1]"), ""))),
            ("<ü@bücher.test>", Ok((mb("ü", "bücher.test"), ""))),
            ("<\"ü x\"@b.test>", Ok((mb("\"ü x\"", "b.test"), ""))),
            // Control and invisible format/separator characters, in atoms, quotes and domains.
            ("<a\u{2028}b@b.test>", Err(AddressError::BadLocalPart)),
            ("<\"a\u{2029}b\"@b.test>", Err(AddressError::BadLocalPart)),
            ("<a\u{202E}b@b.test>", Err(AddressError::BadLocalPart)),
            ("<a\u{200B}@b.test>", Err(AddressError::BadLocalPart)),
            ("<a\u{0085}@b.test>", Err(AddressError::BadLocalPart)),
            ("<\u{FEFF}a@b.test>", Err(AddressError::BadLocalPart)),
            ("<a\u{E0041}@b.test>", Err(AddressError::BadLocalPart)),
            ("<a@b\u{2028}.test>", Err(AddressError::BadDomain)),
            ("<a@b\u{0085}.test>", Err(AddressError::BadDomain)),
            ("<a@b.test", Err(AddressError::Unterminated)),
            ("<ab.test>", Err(AddressError::MissingAt)),
            ("<a..b@b.test>", Err(AddressError::BadLocalPart)),
            ("<a b@b.test>", Err(AddressError::BadLocalPart)),
            ("<a@-b.test>", Err(AddressError::BadDomain)),
            ("<a@b..test>", Err(AddressError::BadDomain)),
            ("<a@[300.1.1.1]>", Err(AddressError::BadDomain)),
            ("<@b.test>", Err(AddressError::BadDomain)),
            ("", Err(AddressError::Empty)),
            (long_local.as_str(), Err(AddressError::LocalTooLong)),
            (long_path.as_str(), Err(AddressError::PathTooLong)),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_path(input), expected, "input {input:?}");
        }
    }
}
