//! The client side of SMTP, sans-IO: parsing a server's replies (bounded, whatever the server
//! sends), reading its EHLO capabilities, and dot-stuffing a message for DATA.

/// Longest reply line we read. RFC 5321 allows 512 octets; generous servers send longer text,
/// but a line that never ends is an attack.
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one multi-line reply (EHLO answers have a dozen).
pub const MAX_REPLY_LINES: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReply {
    pub code: u16,
    /// The text of each line, without code and separator.
    pub lines: Vec<String>,
}

impl ServerReply {
    /// `code text` on one line (lines joined by spaces), for logs and reports.
    pub fn text(&self) -> String {
        let mut s = self.code.to_string();
        for l in &self.lines {
            s.push(' ');
            s.push_str(l.trim());
        }
        s
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    LineTooLong,
    TooManyLines,
    /// Not `ddd`, `ddd-text` or `ddd text`, or a code that changes mid-reply.
    Malformed(String),
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyError::LineTooLong => write!(f, "reply line longer than {MAX_REPLY_LINE} bytes"),
            ReplyError::TooManyLines => write!(f, "reply of more than {MAX_REPLY_LINES} lines"),
            ReplyError::Malformed(l) => write!(f, "malformed reply line {l:?}"),
        }
    }
}

/// Accumulates bytes from the server and yields complete replies.
#[derive(Debug, Default)]
pub struct ReplyParser {
    buf: Vec<u8>,
    lines: Vec<String>,
    code: Option<u16>,
}

impl ReplyParser {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received and not yet part of a returned reply.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Drops buffered input (after STARTTLS, nothing read in clear text may be used).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.lines.clear();
        self.code = None;
    }

    /// The next complete reply, `Ok(None)` when more bytes are needed.
    pub fn next_reply(&mut self) -> Result<Option<ServerReply>, ReplyError> {
        loop {
            let Some(end) = self.buf.iter().position(|&b| b == b'\n') else {
                if self.buf.len() > MAX_REPLY_LINE {
                    return Err(ReplyError::LineTooLong);
                }
                return Ok(None);
            };
            if end > MAX_REPLY_LINE {
                return Err(ReplyError::LineTooLong);
            }
            let raw: Vec<u8> = self.buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\r', '\n']);
            let b = line.as_bytes();
            let code = match (b.first(), b.get(1), b.get(2)) {
                (Some(&a), Some(&m), Some(&c))
                    if (b'2'..=b'5').contains(&a) && m.is_ascii_digit() && c.is_ascii_digit() =>
                {
                    u16::from(a - b'0') * 100 + u16::from(m - b'0') * 10 + u16::from(c - b'0')
                }
                _ => return Err(ReplyError::Malformed(line.chars().take(80).collect())),
            };
            if self.code.is_some_and(|c| c != code) {
                return Err(ReplyError::Malformed(line.chars().take(80).collect()));
            }
            self.code = Some(code);
            let (more, text) = match b.get(3) {
                None => (false, ""),
                Some(b' ') => (false, &line[4..]),
                Some(b'-') => (true, &line[4..]),
                Some(_) => return Err(ReplyError::Malformed(line.chars().take(80).collect())),
            };
            // Control characters never reach logs or reports.
            self.lines.push(text.chars().map(|c| if c.is_control() { '?' } else { c }).collect());
            if self.lines.len() > MAX_REPLY_LINES {
                return Err(ReplyError::TooManyLines);
            }
            if !more {
                self.code = None;
                return Ok(Some(ServerReply { code, lines: std::mem::take(&mut self.lines) }));
            }
        }
    }
}

/// What a server offered in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    /// `SIZE n`; `Some(0)` means offered without a limit.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub starttls: bool,
    /// `AUTH PLAIN` offered.
    pub auth_plain: bool,
    /// `AUTH LOGIN` offered.
    pub auth_login: bool,
}

impl Capabilities {
    /// Reads a 250 reply to EHLO (the first line is the greeting text).
    pub fn from_ehlo(reply: &ServerReply) -> Self {
        let mut c = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let keyword = words.next().unwrap_or("").to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => c.pipelining = true,
                "SIZE" => c.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => c.eight_bit_mime = true,
                "SMTPUTF8" => c.smtputf8 = true,
                "DSN" => c.dsn = true,
                "STARTTLS" => c.starttls = true,
                // `AUTH=LOGIN` is the form some old servers still send.
                "AUTH" | "AUTH=LOGIN" | "AUTH=PLAIN" => {
                    let inline = keyword.strip_prefix("AUTH=").map(str::to_string);
                    for m in words.map(str::to_ascii_uppercase).chain(inline) {
                        match m.as_str() {
                            "PLAIN" => c.auth_plain = true,
                            "LOGIN" => c.auth_login = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        c
    }
}

/// The message dot-stuffed (RFC 5321 §4.5.2) and terminated with `CRLF.CRLF`. Bare CR or LF
/// (which the queue never stores from SMTP, but a Pickup file or a user actor might hand over)
/// become CRLF, so the peer can never see a different end of data than we mean.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 8);
    let mut at_line_start = true;
    let mut i = 0;
    while i < message.len() {
        let b = message[i];
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        match b {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if message.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                at_line_start = true;
            }
            b'\n' => {
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
            }
            _ => {
                out.push(b);
                at_line_start = false;
            }
        }
        i += 1;
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// True when the message has bytes above 127 (it needs 8BITMIME).
pub fn is_eight_bit(message: &[u8]) -> bool {
    message.iter().any(|&b| b >= 0x80)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed = Result<Vec<ServerReply>, ReplyError>;

    fn parse_all(input: &[u8]) -> Parsed {
        let mut p = ReplyParser::new();
        let mut out = Vec::new();
        // Byte at a time: framing must not depend on how reads split.
        for b in input {
            p.feed(std::slice::from_ref(b));
            while let Some(r) = p.next_reply()? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn r(code: u16, lines: &[&str]) -> ServerReply {
        ServerReply { code, lines: lines.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn replies() {
        let cases: Vec<(&[u8], Parsed)> = vec![
            (b"220 mx ready\r\n", Ok(vec![r(220, &["mx ready"])])),
            (b"250-mx\r\n250-PIPELINING\r\n250 SIZE 100\r\n", Ok(vec![r(250, &["mx", "PIPELINING", "SIZE 100"])])),
            (b"250\r\n354 go\n", Ok(vec![r(250, &[""]), r(354, &["go"])])),
            (b"250-a\r\n", Ok(vec![])),
            (b"250-a\r\n251 b\r\n", Err(ReplyError::Malformed("251 b".into()))),
            (b"hello\r\n", Err(ReplyError::Malformed("hello".into()))),
            (b"25\r\n", Err(ReplyError::Malformed("25".into()))),
            (b"250x\r\n", Err(ReplyError::Malformed("250x".into()))),
            (b"650 what\r\n", Err(ReplyError::Malformed("650 what".into()))),
            (b"550 bad\x07bell\r\n", Ok(vec![r(550, &["bad?bell"])])),
        ];
        for (input, want) in cases {
            assert_eq!(parse_all(input), want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn hostile_replies_are_bounded() {
        let long = vec![b'x'; 10 * 1024 * 1024];
        let mut p = ReplyParser::new();
        p.feed(b"250 ");
        let mut err = None;
        for chunk in long.chunks(8192) {
            p.feed(chunk);
            if let Err(e) = p.next_reply() {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(ReplyError::LineTooLong));
        assert!(p.buffered() < 2 * MAX_REPLY_LINE + 8192);
        let endless: Vec<u8> = b"250-more\r\n".repeat(MAX_REPLY_LINES + 5);
        assert_eq!(parse_all(&endless), Err(ReplyError::TooManyLines));
    }

    #[test]
    fn capabilities() {
        let c = Capabilities::from_ehlo(&r(
            250,
            &["mx greets you", "PIPELINING", "SIZE 1000", "8BITMIME", "dsn", "STARTTLS", "SMTPUTF8", "AUTH PLAIN"],
        ));
        assert_eq!(
            c,
            Capabilities {
                pipelining: true,
                size: Some(1000),
                eight_bit_mime: true,
                smtputf8: true,
                dsn: true,
                starttls: true,
                auth_plain: true,
                auth_login: false,
            }
        );
        for (line, plain, login) in [
            ("AUTH LOGIN PLAIN CRAM-MD5", true, true),
            ("auth xoauth2 login", false, true),
            ("AUTH=LOGIN", false, true),
            ("AUTH", false, false),
            ("AUTHX PLAIN", false, false),
        ] {
            let c = Capabilities::from_ehlo(&r(250, &["mx", line]));
            assert_eq!((c.auth_plain, c.auth_login), (plain, login), "{line}");
        }
        let c = Capabilities::from_ehlo(&r(250, &["mx", "SIZE"]));
        assert_eq!(c.size, Some(0));
        assert!(!c.pipelining);
    }

    #[test]
    fn dot_stuffing() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"a\r\n", b"a\r\n.\r\n"),
            (b".a\r\n..b\r\nc.\r\n", b"..a\r\n...b\r\nc.\r\n.\r\n"),
            (b"no newline", b"no newline\r\n.\r\n"),
            (b"", b".\r\n"),
            (b"a\n.\nb\r.\r\n", b"a\r\n..\r\nb\r\n..\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
        ];
        for (input, want) in cases {
            assert_eq!(dot_stuff(input), *want, "{:?}", String::from_utf8_lossy(input));
        }
        assert!(is_eight_bit("é".as_bytes()) && !is_eight_bit(b"plain"));
    }

    /// Random server output never panics the parser and never grows its buffer without bound.
    #[test]
    fn random_replies_are_handled() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"0123456789 -\r\nabc\xff";
        for _ in 0..2000 {
            let mut p = ReplyParser::new();
            for _ in 0..(next() % 20) {
                let n = (next() % 200) as usize;
                let chunk: Vec<u8> = (0..n).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect();
                p.feed(&chunk);
                while let Ok(Some(r)) = p.next_reply() {
                    assert!((200..600).contains(&r.code));
                }
                assert!(p.buffered() <= MAX_REPLY_LINE + 200);
            }
        }
    }
}
