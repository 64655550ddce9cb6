//! The DATA receiver: finds the end of a message, undoes dot-stuffing, and enforces the size,
//! line-length and line-ending rules without ever buffering more than the size limit.
//!
//! Only `<CR><LF>.<CR><LF>` ends a message. A bare LF or bare CR anywhere marks the message as
//! refused (SMTP smuggling defence, CVE-2023-51764/5/6) and never counts as a line end, so
//! `<LF>.<LF>`, `<LF>.<CR><LF>` and `<CR><LF>.<LF>` cannot end DATA. After a refusal the receiver
//! keeps draining until the real end so the session stays in step with the client.
//!
//! NUL characters refuse the message too (RFC 5322 §2.2 and RFC 6152 allow none, even in 8-bit
//! data; we do not offer BINARYMIME), so a `\0` never reaches the queue or a next hop.
//!
//! The same receiver takes BDAT chunks (RFC 3030) in raw mode: no dot-stuffing and no end
//! marker (the client says the sizes), but the same size, line-length and bare CR/LF rules, so a
//! message is judged the same whichever way it came.

/// Why a message is refused at the end of DATA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataProblem {
    TooBig,
    LineTooLong,
    BareLf,
    BareCr,
    /// A NUL character in the data.
    Nul,
    /// The server has no room for it now (its budget for message bodies in memory is spent):
    /// a temporary refusal, `452 4.3.1`.
    NoRoom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (after CRLF, or at the start of DATA).
    LineStart,
    /// Saw `.` at the start of a line.
    Dot,
    /// Saw `.` `CR` at the start of a line.
    DotCr,
    /// Inside a line.
    Mid,
    /// Saw `CR` inside a line.
    Cr,
}

/// RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets including CRLF.
pub const MAX_LINE: usize = 1000;

#[derive(Debug)]
pub struct DataReceiver {
    state: State,
    limit: usize,
    body: Vec<u8>,
    problem: Option<DataProblem>,
    /// Octets of the current line as sent (before unstuffing), CRLF included.
    line_len: usize,
    /// Offset in `body` where the current line starts; used to read header lines.
    line_start: usize,
    in_header: bool,
    received_headers: usize,
    /// The `From:` header fields seen, and the first one's value (unfolded, bounded).
    from: HeaderFrom,
    /// What the current header field is, for its folded lines.
    field: Field,
    /// Offset in `body` where the current header field starts (its first line).
    field_start: usize,
    /// `Authentication-Results:` fields naming this authserv-id (lower case) are dropped:
    /// only we may claim our own results (RFC 8601 §5).
    strip_results: Option<String>,
    saw_8bit: bool,
    /// BDAT: no dot-stuffing, no end marker.
    raw: bool,
    /// Bytes of the body already handed out by [`DataReceiver::take_ready`].
    handed: usize,
}

/// What the receiver has at the end of DATA.
#[derive(Debug, PartialEq, Eq)]
pub enum DataOutcome {
    /// `body` is what was not handed out by [`DataReceiver::take_ready`] (all of it when nothing
    /// was); `streamed` bytes came before it.
    Message {
        body: Vec<u8>,
        streamed: usize,
        received_headers: usize,
        eight_bit: bool,
        from: HeaderFrom,
    },
    Refused(DataProblem),
}

/// The header field the current line belongs to, as far as the receiver cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Other,
    /// The first `From:` field: its folded lines are captured too.
    From,
    /// Our own `Authentication-Results:` (forged): dropped, folded lines and all.
    OurResults,
    /// An `Authentication-Results:` whose authserv-id is on a folded line yet to come.
    UndecidedResults,
}

/// What the header section said in `From:` (for the sender-login check): how many `From:`
/// fields there were and the first one's value, unfolded, at most [`MAX_FROM`] octets (`None`
/// past that: too long to judge).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HeaderFrom {
    pub count: usize,
    pub value: Option<Vec<u8>>,
}

/// The longest `From:` value kept. A From: field naming more than a few mailboxes is rare; one
/// longer than this is judged as unreadable, never truncated into a different answer.
pub const MAX_FROM: usize = 2048;

impl DataReceiver {
    pub fn new(limit: usize) -> Self {
        DataReceiver {
            state: State::LineStart,
            limit,
            body: Vec::new(),
            problem: None,
            line_len: 0,
            line_start: 0,
            in_header: true,
            received_headers: 0,
            from: HeaderFrom::default(),
            field: Field::Other,
            field_start: 0,
            strip_results: None,
            saw_8bit: false,
            raw: false,
            handed: 0,
        }
    }

    /// A receiver for BDAT chunks: feed every chunk, then [`DataReceiver::finish_chunks`].
    pub fn raw(limit: usize) -> Self {
        DataReceiver { raw: true, ..DataReceiver::new(limit) }
    }

    /// Drops `Authentication-Results:` header fields whose authserv-id is `id` (our host name).
    pub fn strip_auth_results(mut self, id: Option<&str>) -> Self {
        self.strip_results = id.map(str::to_ascii_lowercase);
        self
    }

    /// True once the message is known to be refused (e.g. too big): later chunks are drained.
    pub fn problem(&self) -> Option<DataProblem> {
        self.problem
    }

    /// Memory the body holds now (its buffer's capacity).
    pub fn held(&self) -> usize {
        self.body.capacity()
    }

    /// Hands out the body received so far once it is at least `min` bytes, so the caller can
    /// store it and the receiver holds no more than about `min` plus one read. Within the header
    /// section it cuts at the start of the current field (header fields are read whole: the hop
    /// count, `From:`, our own `Authentication-Results:`). Nothing is handed out of a refused
    /// message.
    pub fn take_ready(&mut self, min: usize) -> Option<Vec<u8>> {
        if self.problem.is_some() {
            return None;
        }
        let cut = if self.in_header { self.field_start.min(self.line_start) } else { self.body.len() };
        if cut < min.max(1) {
            return None;
        }
        let rest = self.body.get(cut..).unwrap_or_default();
        let mut next = Vec::with_capacity(min.max(rest.len()));
        next.extend_from_slice(rest);
        let mut ready = std::mem::replace(&mut self.body, next);
        ready.truncate(cut);
        self.line_start = self.line_start.saturating_sub(cut);
        self.field_start = self.field_start.saturating_sub(cut);
        self.handed += cut;
        Some(ready)
    }

    /// Refuses the message for want of room (see [`DataProblem::NoRoom`]): the body is dropped
    /// and the rest is drained, so the session stays in step.
    pub fn no_room(&mut self) {
        self.flag(DataProblem::NoRoom);
    }

    /// The end of a chunked message (`BDAT … LAST`). A final line without CRLF gets one; a
    /// final bare CR refuses the message.
    pub fn finish_chunks(&mut self) -> DataOutcome {
        match self.state {
            State::Cr | State::DotCr => self.flag(DataProblem::BareCr),
            State::Mid | State::Dot => {
                self.emit(b"\r\n");
                self.end_of_line();
            }
            State::LineStart => {}
        }
        self.state = State::LineStart;
        self.finish()
    }

    /// Consumes bytes from `input`. Returns how many were used and, when the end of data was
    /// found, the outcome; the bytes after it belong to the command stream.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<DataOutcome>) {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Mid => {
                    // Fast path: copy the run of ordinary bytes up to the next CR or LF.
                    let run = input[i..].iter().position(|&c| c == b'\r' || c == b'\n').unwrap_or(input.len() - i);
                    // Stop at the byte that makes the line too long, as byte-by-byte feeding
                    // would: which problem is found first must not depend on how reads split.
                    let run = match self.problem {
                        Some(_) => run,
                        None => run.min((MAX_LINE + 1).saturating_sub(self.line_len).max(1)),
                    };
                    if run > 0 {
                        self.line_len += run;
                        self.emit(&input[i..i + run]);
                        i += run;
                        self.check_line_len();
                        continue;
                    }
                    self.line_len += 1;
                    if b == b'\r' {
                        self.state = State::Cr;
                    } else {
                        self.flag(DataProblem::BareLf);
                        self.emit(b"\n");
                    }
                }
                State::LineStart => {
                    self.line_len = 1;
                    match b {
                        b'.' if !self.raw => self.state = State::Dot,
                        b'\r' => self.state = State::Cr,
                        b'\n' => {
                            self.flag(DataProblem::BareLf);
                            self.emit(b"\n");
                            self.state = State::Mid;
                        }
                        _ => {
                            self.emit(&[b]);
                            self.state = State::Mid;
                        }
                    }
                }
                State::Dot => {
                    self.line_len += 1;
                    match b {
                        b'\r' => self.state = State::DotCr,
                        b'\n' => {
                            self.flag(DataProblem::BareLf);
                            self.emit(b".\n");
                            self.state = State::Mid;
                        }
                        // Dot-unstuffing: the leading dot is dropped, this byte kept.
                        _ => {
                            self.emit(&[b]);
                            self.state = State::Mid;
                        }
                    }
                }
                State::DotCr => {
                    if b == b'\n' {
                        return (i + 1, Some(self.finish()));
                    }
                    // ".<CR>x": the CR was bare; `b` is looked at again as ordinary line content.
                    self.flag(DataProblem::BareCr);
                    self.emit(b".\r");
                    self.state = State::Mid;
                    continue;
                }
                State::Cr => {
                    if b == b'\n' {
                        self.line_len += 1;
                        self.check_line_len();
                        self.emit(b"\r\n");
                        self.end_of_line();
                        self.state = State::LineStart;
                    } else {
                        self.flag(DataProblem::BareCr);
                        self.emit(b"\r");
                        self.state = State::Mid;
                        continue;
                    }
                }
            }
            self.check_line_len();
            i += 1;
        }
        (input.len(), None)
    }

    fn check_line_len(&mut self) {
        if self.line_len > MAX_LINE {
            self.flag(DataProblem::LineTooLong);
        }
    }

    fn flag(&mut self, p: DataProblem) {
        if self.problem.is_none() {
            self.problem = Some(p);
            // Drained from here on: the message will not be kept.
            self.body = Vec::new();
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        if self.problem.is_some() {
            return;
        }
        if self.handed + self.body.len() + bytes.len() > self.limit {
            self.flag(DataProblem::TooBig);
            return;
        }
        if bytes.contains(&0) {
            self.flag(DataProblem::Nul);
            return;
        }
        if !self.saw_8bit && bytes.iter().any(|b| *b >= 0x80) {
            self.saw_8bit = true;
        }
        self.body.extend_from_slice(bytes);
    }

    fn end_of_line(&mut self) {
        if self.in_header && self.problem.is_none() {
            // Where to cut the body back to when a forged result of ours is dropped.
            let mut drop_from = None;
            let line = &self.body[self.line_start..];
            if line == b"\r\n" {
                self.in_header = false;
                self.field = Field::Other;
                self.field_start = self.line_start;
            } else if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                // A folded line continues the field before it.
                match self.field {
                    Field::OurResults => drop_from = Some(self.line_start),
                    Field::UndecidedResults => match self.claims_our_results(line) {
                        Some(true) => {
                            drop_from = Some(self.field_start);
                            self.field = Field::OurResults;
                        }
                        Some(false) => self.field = Field::Other,
                        None => {}
                    },
                    Field::From => {
                        let text = line.strip_suffix(b"\r\n").unwrap_or(line);
                        if let Some(v) = self.from.value.as_mut() {
                            if v.len() + text.len() > MAX_FROM {
                                self.from.value = None;
                            } else {
                                v.extend_from_slice(text);
                            }
                        }
                    }
                    Field::Other => {}
                }
            } else {
                self.field = Field::Other;
                self.field_start = self.line_start;
                if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
                    self.received_headers += 1;
                } else if let Some(rest) = field_value(line, b"from") {
                    self.from.count += 1;
                    if self.from.count == 1 {
                        let text = rest.strip_suffix(b"\r\n").unwrap_or(rest);
                        self.from.value = (text.len() <= MAX_FROM).then(|| text.to_vec());
                        self.field = Field::From;
                    }
                } else if let Some(value) = field_value(line, b"authentication-results") {
                    match self.claims_our_results(value) {
                        Some(true) => {
                            drop_from = Some(self.line_start);
                            self.field = Field::OurResults;
                        }
                        Some(false) => {}
                        None if self.strip_results.is_some() => self.field = Field::UndecidedResults,
                        None => {}
                    }
                }
            }
            if let Some(at) = drop_from {
                self.body.truncate(at);
            }
        }
        self.line_start = self.body.len();
        self.line_len = 0;
    }

    /// Whether an `Authentication-Results:` value (or its continuation) starts with our
    /// authserv-id; `None` when it holds no token yet (the id is on a folded line).
    fn claims_our_results(&self, value: &[u8]) -> Option<bool> {
        let id = self.strip_results.as_deref()?;
        let text = String::from_utf8_lossy(value);
        let token = text.trim_start().split(|c: char| c == ';' || c.is_whitespace()).next().unwrap_or("");
        if token.is_empty() {
            return None;
        }
        Some(token.eq_ignore_ascii_case(id))
    }

    fn finish(&mut self) -> DataOutcome {
        match self.problem {
            Some(p) => DataOutcome::Refused(p),
            None => DataOutcome::Message {
                body: std::mem::take(&mut self.body),
                streamed: self.handed,
                received_headers: self.received_headers,
                eight_bit: self.saw_8bit,
                from: std::mem::take(&mut self.from),
            },
        }
    }
}

/// The value of a header line whose field name is `name` (case-insensitive; RFC 5322's obsolete
/// syntax allows blanks before the colon).
fn field_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let head = line.get(..name.len())?;
    if !head.eq_ignore_ascii_case(name) {
        return None;
    }
    let rest = &line[name.len()..];
    let blanks = rest.iter().take_while(|b| **b == b' ' || **b == b'\t').count();
    rest.get(blanks..)?.strip_prefix(b":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(limit: usize, input: &[u8]) -> (usize, Option<DataOutcome>) {
        DataReceiver::new(limit).feed(input)
    }

    fn msg(body: &[u8]) -> Option<DataOutcome> {
        Some(DataOutcome::Message {
            body: body.to_vec(),
            streamed: 0,
            received_headers: 0,
            eight_bit: false,
            from: HeaderFrom::default(),
        })
    }

    #[test]
    fn end_of_data_and_smuggling() {
        let cases: Vec<(&[u8], usize, Option<DataOutcome>)> = vec![
            (b"a\r\n.\r\n", 6, msg(b"a\r\n")),
            (b".\r\n", 3, msg(b"")),
            (b"a\r\n.\r\nMAIL", 6, msg(b"a\r\n")),
            (b"..a\r\n.\r\n", 8, msg(b".a\r\n")),
            (b"...\r\n.\r\n", 8, msg(b"..\r\n")),
            (b"a\r\n.b\r\n.\r\n", 10, msg(b"a\r\nb\r\n")),
            // Smuggling variants: none of these ends DATA and each refuses the message.
            (b"a\n.\n", 4, None),
            (b"a\n.\r\n", 5, None),
            (b"a\r\n.\n", 5, None),
            (b"a\r.\r", 4, None),
            (b"a\n.\nb\r\n.\r\n", 10, Some(DataOutcome::Refused(DataProblem::BareLf))),
            (b"a\n.\r\nb\r\n.\r\n", 11, Some(DataOutcome::Refused(DataProblem::BareLf))),
            (b"a\r\n.\nMAIL\r\n.\r\n", 14, Some(DataOutcome::Refused(DataProblem::BareLf))),
            (b"a\rb\r\n.\r\n", 8, Some(DataOutcome::Refused(DataProblem::BareCr))),
            (b"a\r\n.\rX\r\n.\r\n", 11, Some(DataOutcome::Refused(DataProblem::BareCr))),
            (b"a\r\r\n.\r\n", 7, Some(DataOutcome::Refused(DataProblem::BareCr))),
        ];
        for (input, used, outcome) in cases {
            assert_eq!(run(1000, input), (used, outcome), "input {:?}", String::from_utf8_lossy(input));
        }
    }

    /// Our own `Authentication-Results:` fields (even folded, any case) are dropped as they
    /// arrive, whatever the reads' sizes and the streaming pieces; others' stay; after the header
    /// section nothing is touched.
    #[test]
    fn forged_authentication_results_are_dropped() {
        let ours = "Authentication-Results: MX.example.test; spf=pass\r\n";
        let folded = "Authentication-Results:\r\n mx.example.test;\r\n\tdkim=pass\r\n";
        let versioned = "authentication-results : mx.example.test 1; dmarc=pass\r\n";
        let theirs = "Authentication-Results: mx.other.test; spf=pass\r\n";
        let prefix = "Authentication-Results: mx.example.test.evil.test; x=y\r\n";
        let input =
            format!("Received: x\r\n{ours}Subject: s\r\n{folded}{theirs}{versioned}{prefix}\r\nbody\r\n{ours}.\r\n");
        let want = format!("Received: x\r\nSubject: s\r\n{theirs}{prefix}\r\nbody\r\n{ours}");
        for step in [1, 3, 7, 64, input.len()] {
            for min in [None, Some(1), Some(20)] {
                let mut r = DataReceiver::new(10_000).strip_auth_results(Some("mx.example.test"));
                let (mut got, mut end) = (Vec::new(), None);
                for piece in input.as_bytes().chunks(step) {
                    let (_, out) = r.feed(piece);
                    if let Some(m) = min {
                        while let Some(p) = r.take_ready(m) {
                            got.extend_from_slice(&p);
                        }
                    }
                    if out.is_some() {
                        end = out;
                        break;
                    }
                }
                let Some(DataOutcome::Message { body, received_headers, .. }) = end else { panic!("{end:?}") };
                got.extend_from_slice(&body);
                assert_eq!(String::from_utf8_lossy(&got), want, "step {step} min {min:?}");
                assert_eq!(received_headers, 1);
            }
        }
        // Without an id, nothing is dropped.
        let (_, out) = DataReceiver::new(10_000).feed(format!("{ours}\r\nx\r\n.\r\n").as_bytes());
        let Some(DataOutcome::Message { body, .. }) = out else { panic!() };
        assert!(body.starts_with(ours.as_bytes()));
    }

    #[test]
    fn byte_at_a_time_matches_whole() {
        let input = b"Received: x\r\nreceived: y\r\nSubject: s\r\n\r\n..b\r\nReceived: not a header\r\n.\r\nQUIT\r\n";
        let mut r = DataReceiver::new(1000);
        let mut got = None;
        let mut consumed = 0;
        for (i, b) in input.iter().enumerate() {
            let (n, out) = r.feed(std::slice::from_ref(b));
            assert_eq!(n, 1);
            if out.is_some() {
                got = out;
                consumed = i + 1;
                break;
            }
        }
        assert_eq!(consumed, input.len() - 6);
        assert_eq!(
            got,
            Some(DataOutcome::Message {
                body: b"Received: x\r\nreceived: y\r\nSubject: s\r\n\r\n.b\r\nReceived: not a header\r\n".to_vec(),
                streamed: 0,
                received_headers: 2,
                eight_bit: false,
                from: HeaderFrom::default(),
            })
        );
    }

    #[test]
    fn limits() {
        // Exactly at the size limit is fine; one more octet is too big, and draining continues.
        assert_eq!(run(5, b"abc\r\n.\r\n").1, msg(b"abc\r\n"));
        assert_eq!(run(4, b"abc\r\n.\r\n").1, Some(DataOutcome::Refused(DataProblem::TooBig)));
        let line998 = [vec![b'x'; 998], b"\r\n.\r\n".to_vec()].concat();
        assert!(matches!(run(10_000, &line998).1, Some(DataOutcome::Message { .. })));
        let line999 = [vec![b'x'; 999], b"\r\n.\r\n".to_vec()].concat();
        assert_eq!(run(10_000, &line999).1, Some(DataOutcome::Refused(DataProblem::LineTooLong)));
        // 8-bit content is noted.
        assert!(matches!(run(100, "é\r\n.\r\n".as_bytes()).1, Some(DataOutcome::Message { eight_bit: true, .. })));
    }

    #[test]
    fn never_buffers_more_than_the_limit() {
        let mut r = DataReceiver::new(1024);
        let chunk = vec![b'y'; 100];
        let line = [chunk.as_slice(), b"\r\n"].concat();
        for _ in 0..10_000 {
            let (_, out) = r.feed(&line);
            assert!(out.is_none());
            assert!(r.body.capacity() <= 4096);
        }
        assert_eq!(r.feed(b".\r\n").1, Some(DataOutcome::Refused(DataProblem::TooBig)));
    }

    #[test]
    fn chunks_in_raw_mode() {
        let run_chunks = |limit: usize, chunks: &[&[u8]]| {
            let mut rx = DataReceiver::raw(limit);
            for c in chunks {
                assert_eq!(rx.feed(c).0, c.len(), "raw mode takes every byte");
            }
            rx.finish_chunks()
        };
        let m = |b: &[u8], received: usize| DataOutcome::Message {
            body: b.to_vec(),
            streamed: 0,
            received_headers: received,
            eight_bit: false,
            from: HeaderFrom::default(),
        };
        let cases: Vec<(Vec<&[u8]>, DataOutcome)> = vec![
            // A dot line is content, never an end: the smuggled "message" stays inside this one.
            (vec![b"a\r\n.\r\nMAIL FROM:<x@y>\r\n"], m(b"a\r\n.\r\nMAIL FROM:<x@y>\r\n", 0)),
            (vec![b"..a\r\n"], m(b"..a\r\n", 0)),
            (vec![b"Received: x\r", b"\nSubject: s\r\n\r\nbody"], m(b"Received: x\r\nSubject: s\r\n\r\nbody\r\n", 1)),
            (vec![], m(b"", 0)),
            (vec![b"a\n.\nb\r\n"], DataOutcome::Refused(DataProblem::BareLf)),
            (vec![b"a\r.\r\n"], DataOutcome::Refused(DataProblem::BareCr)),
            (vec![b"a\r\nb\r"], DataOutcome::Refused(DataProblem::BareCr)),
            (vec![b"0123456789012345678901234567890123456789", b"x"], DataOutcome::Refused(DataProblem::TooBig)),
        ];
        for (chunks, want) in cases {
            assert_eq!(run_chunks(40, &chunks), want, "{chunks:?}");
        }
        let long = vec![b'x'; MAX_LINE + 1];
        assert_eq!(run_chunks(4000, &[&long]), DataOutcome::Refused(DataProblem::LineTooLong));
    }

    /// Handing the body out as it arrives changes nothing about the message: the pieces and the
    /// tail make the same body, header lines are counted the same (a piece never ends inside the
    /// header section's current line), the limit counts what was handed out, and whatever the
    /// reads' sizes, the receiver holds at most about `min` plus one read.
    #[test]
    fn handing_the_body_out_as_it_arrives() {
        let mut input = Vec::new();
        for i in 0..40 {
            input.extend_from_slice(format!("Received: hop {i} {}\r\n", "x".repeat(i * 7)).as_bytes());
        }
        input.extend_from_slice(b"Subject: s\r\n\r\n");
        for i in 0..3000 {
            input.extend_from_slice(format!("..line {i} {}\r\n", "y".repeat(i % 90)).as_bytes());
        }
        input.extend_from_slice(b".\r\n");
        let whole = run(1 << 20, &input).1;
        let Some(DataOutcome::Message { body: want, received_headers: 40, .. }) = &whole else { panic!("{whole:?}") };
        for (read, min) in [(1, 64), (7, 100), (333, 1000), (4096, 4096), (65536, 1000)] {
            let mut rx = DataReceiver::new(1 << 20);
            let mut got = Vec::new();
            let mut end = None;
            for piece in input.chunks(read) {
                let (_, out) = rx.feed(piece);
                if let Some(ready) = rx.take_ready(min) {
                    assert!(ready.len() >= min, "pieces are at least min");
                    got.extend_from_slice(&ready);
                }
                assert!(rx.body.len() < min + read + 1100, "holds about min + a read + a line");
                if out.is_some() {
                    end = out;
                    break;
                }
            }
            let Some(DataOutcome::Message { body, streamed, received_headers, .. }) = end else { panic!("{end:?}") };
            assert_eq!(streamed, got.len());
            got.extend_from_slice(&body);
            assert_eq!(&got, want, "read {read}, min {min}");
            assert_eq!(received_headers, 40, "read {read}, min {min}");
        }
        // The limit counts what was handed out; a refused message hands out nothing more.
        let mut rx = DataReceiver::new(300);
        rx.feed(&[b"Subject: s\r\n\r\n".as_slice(), &[b'z'; 200], b"\r\n"].concat());
        assert!(rx.take_ready(100).is_some());
        rx.feed(&[b'z'; 200]);
        assert_eq!(rx.take_ready(1), None);
        assert_eq!(rx.feed(b"\r\n.\r\n").1, Some(DataOutcome::Refused(DataProblem::TooBig)));
    }
}
