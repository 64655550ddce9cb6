//! Data-driven transcript tests of the sans-IO session: client bytes in, reply codes out.

use std::sync::Arc;

use super::address::LocalDomains;
use super::session::{
    Action, EnqueueError, Incoming, RecipientCheck, RecipientVerdict, RefusalCause, Session, SessionParams,
};

fn params() -> SessionParams {
    SessionParams {
        hostname: "mx.example.test".into(),
        local_domains: LocalDomains::new(["example.test", "alias.test"]),
        relay_domains: LocalDomains::new(["backup.test"]),
        max_message_size: 2000,
        max_recipients: 3,
        max_messages_per_connection: 0,
        max_errors: 10,
        max_hop_count: 3,
        tls_available: false,
        tls_required: false,
        auth_enabled: false,
        auth_plaintext_loopback: false,
        check_recipients: RecipientCheck::default(),
        sender_logins: None,
        recipient_maps: None,
        srs: Default::default(),
        auth_results_id: None,
        rates: Default::default(),
        check_sender: false,
        auth_required: false,
    }
}

#[derive(Default, Debug)]
struct Run {
    /// One token per reply: `code` or `code/status`.
    codes: Vec<String>,
    wire: String,
    messages: Vec<Incoming>,
    refusals: Vec<RefusalCause>,
    closed: bool,
    log: Vec<super::session::CommandLog>,
}

fn drive(p: SessionParams, relay: bool, chunks: &[&[u8]], queue: Result<u64, EnqueueError>) -> Run {
    drive_from("192.0.2.9", p, relay, chunks, queue)
}

thread_local! {
    /// When set, [`drive_from`] has bodies streamed in pieces of at least this many bytes and
    /// puts each message back together: every transcript must come out the same.
    static STREAM: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

fn drive_from(ip: &str, p: SessionParams, relay: bool, chunks: &[&[u8]], queue: Result<u64, EnqueueError>) -> Run {
    let mut s = Session::new(Arc::new(p), ip.parse().unwrap(), relay);
    if let Some(min) = STREAM.get() {
        s.set_body_streaming(min);
    }
    // The pieces of the message being received: (its seq, bytes).
    let mut pieces: Option<(u64, Vec<u8>)> = None;
    let mut run = Run::default();
    let record = |run: &mut Run, r: super::Reply| {
        run.codes.push(match r.status {
            Some(st) => format!("{}/{}", r.code, st),
            None => r.code.to_string(),
        });
        run.wire.push_str(&String::from_utf8_lossy(&r.to_bytes()));
    };
    record(&mut run, s.greeting());
    let mut next_id = 100;
    for chunk in chunks {
        s.feed(chunk);
        while let Some(action) = s.next_action() {
            match action {
                Action::Reply(r) => record(&mut run, r),
                Action::BodyChunk { seq, bytes } => match pieces.as_mut() {
                    Some((p, so_far)) if *p == seq => so_far.extend_from_slice(&bytes),
                    _ => pieces = Some((seq, bytes)),
                },
                Action::Enqueue(mut m) => {
                    if let Some((seq, before)) = pieces.take().filter(|(seq, _)| *seq == m.body_seq) {
                        assert_eq!(m.streamed, before.len(), "message {seq}");
                        m.body = [before, m.body].concat();
                        m.streamed = 0;
                    } else {
                        assert_eq!(m.streamed, 0);
                    }
                    run.messages.push(m);
                    next_id += 1;
                    let r = s.enqueued(queue.map(|_| next_id));
                    record(&mut run, r);
                }
                Action::Refused(r) => run.refusals.push(r.cause),
                Action::Close => run.closed = true,
                Action::Log(l) => run.log.push(l),
                // The handshake "succeeds" at once: what follows in this chunk was discarded.
                Action::StartTls => {
                    run.codes.push("TLS".into());
                    s.tls_started();
                }
                Action::Authenticate { user, password } => {
                    s.authenticated(user == "alice" && password.0 == "secret");
                }
                // The "mailbox server": unknown… does not exist, busy… cannot be checked now.
                Action::CheckRecipient(m) => {
                    run.codes.push(format!("CHECK {m}"));
                    s.recipient_checked(if m.local.starts_with("unknown") {
                        RecipientVerdict::Unknown("User doesn't exist".into())
                    } else if m.local.starts_with("busy") {
                        RecipientVerdict::TryLater("Cannot check the recipient now".into())
                    } else {
                        RecipientVerdict::Exists
                    });
                }
                // The "SPF check": senders at spf-fail… are refused, at spf-temp… deferred.
                Action::CheckSender { sender, helo } => {
                    run.codes.push(format!("SPF {sender} {helo}"));
                    s.sender_checked(if sender.domain.starts_with("spf-fail") {
                        Some((crate::reply::spf_failed(), RefusalCause::SpfFail))
                    } else if sender.domain.starts_with("spf-temp") {
                        Some((crate::reply::auth_check_unavailable(), RefusalCause::AuthCheckTempFail))
                    } else {
                        None
                    });
                }
            }
        }
    }
    run
}

/// Feeds `input` in one piece and compares the reply codes.
fn check(input: &str, expected: &str) -> Run {
    check_with(params(), true, input, expected)
}

fn check_with(p: SessionParams, relay: bool, input: &str, expected: &str) -> Run {
    let whole = drive(p.clone(), relay, &[input.as_bytes()], Ok(0));
    let got = whole.codes.join(" ");
    assert_eq!(got, expected, "transcript for {input:?}\n{}", whole.wire);
    // The same bytes one at a time must give the same replies: framing never depends on reads.
    let bytes: Vec<&[u8]> = input.as_bytes().chunks(1).collect();
    let split = drive(p, relay, &bytes, Ok(0));
    assert_eq!(split.codes, whole.codes, "byte-at-a-time transcript for {input:?}");
    assert_eq!(split.messages, whole.messages);
    whole
}

const HELLO: &str = "EHLO client.test\r\n";

#[test]
fn basic_transaction() {
    let r = check(
        "EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n",
        "220 250 250/2.1.0 250/2.1.5 354 250/2.0.0 221/2.0.0",
    );
    assert!(r.closed);
    assert_eq!(r.messages.len(), 1);
    let m = &r.messages[0];
    assert_eq!(m.sender.as_ref().map(|s| s.to_string()), Some("a@remote.test".into()));
    assert_eq!(m.recipients.iter().map(|r| r.to_string()).collect::<Vec<_>>(), vec!["b@example.test"]);
    assert_eq!(m.body, b"Subject: hi\r\n\r\nbody\r\n");
    assert_eq!(m.protocol, "ESMTP");
    assert!(r.wire.contains("250 2.0.0 OK queued as 101\r\n"));
}

#[test]
fn every_command() {
    let cases: &[(&str, &str)] = &[
        ("HELO c\r\n", "220 250"),
        ("EHLO c\r\nEHLO c\r\n", "220 250 250"),
        ("NOOP\r\n", "220 250/2.0.0"),
        ("RSET\r\n", "220 250/2.0.0"),
        ("VRFY root\r\n", "220 252/2.5.2"),
        ("VRFY\r\n", "220 501/5.5.4"),
        ("HELP\r\n", "220 214/2.0.0"),
        ("EXPN list\r\n", "220 502/5.5.1"),
        ("STARTTLS\r\n", "220 502/5.5.1"),
        ("FOO\r\n", "220 500/5.5.2"),
        ("QUIT\r\nNOOP\r\n", "220 221/2.0.0"),
        ("quit\n", "220 221/2.0.0"),
        // Sequence errors.
        ("MAIL FROM:<a@b.test>\r\n", "220 503/5.5.1"),
        ("EHLO c\r\nRCPT TO:<b@example.test>\r\n", "220 250 503/5.5.1"),
        ("EHLO c\r\nDATA\r\n", "220 250 503/5.5.1"),
        ("EHLO c\r\nMAIL FROM:<a@b.test>\r\nDATA\r\n", "220 250 250/2.1.0 554/5.5.1"),
        ("EHLO c\r\nMAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n", "220 250 250/2.1.0 503/5.5.1"),
        // RSET forgets the transaction; EHLO does too.
        (
            "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRSET\r\nRCPT TO:<b@example.test>\r\n",
            "220 250 250/2.1.0 250/2.0.0 503/5.5.1",
        ),
        ("EHLO c\r\nMAIL FROM:<a@b.test>\r\nEHLO c\r\nMAIL FROM:<a@b.test>\r\n", "220 250 250/2.1.0 250 250/2.1.0"),
        // Syntax.
        ("EHLO c\r\nMAIL FROM:<a@b\r\n", "220 250 501/5.1.7"),
        ("EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a..b@example.test>\r\n", "220 250 250/2.1.0 501/5.1.3"),
        ("EHLO c\r\nMAIL FROM:<a@b.test> FOO=1\r\n", "220 250 555/5.5.4"),
        ("HELO c\r\nMAIL FROM:<a@b.test> SIZE=10\r\n", "220 250 555/5.5.4"),
        ("EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<b@example.test> NOTIFY=NEVER\r\n", "220 250 250/2.1.0 250/2.1.5"),
        (
            "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<b@example.test> NOTIFY=NEVER,DELAY\r\n",
            "220 250 250/2.1.0 555/5.5.4",
        ),
        ("HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<b@example.test> NOTIFY=NEVER\r\n", "220 250 250/2.1.0 555/5.5.4"),
        ("EHLO c\r\nMAIL FROM:<a@b.test> RET=FULL ENVID=x\r\n", "220 250 250/2.1.0"),
        ("EHLO c\r\nMAIL FROM:<a@b.test> RET=SOME\r\n", "220 250 555/5.5.4"),
        ("EHLO c\r\nMAIL FROM:<postmaster>\r\n", "220 250 501/5.1.7"),
        ("\r\n", "220 500/5.5.2"),
        ("NOOP \x01\r\n", "220 501/5.5.4"),
    ];
    for (input, expected) in cases {
        check(input, expected);
    }
}

#[test]
fn recipients_local_relay_and_postmaster() {
    let input = "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@EXAMPLE.test>\r\nRCPT TO:<y@alias.test>\r\nRCPT TO:<z@remote.test>\r\n";
    // Relay client: remote recipient accepted.
    check_with(params(), true, input, "220 250 250/2.1.0 250/2.1.5 250/2.1.5 250/2.1.5");
    // Outsider: local recipients accepted, remote one refused.
    let r = check_with(params(), false, input, "220 250 250/2.1.0 250/2.1.5 250/2.1.5 550/5.7.1");
    assert_eq!(r.refusals, vec![RefusalCause::RelayDenied]);
    // <postmaster> alone is the default domain's postmaster, accepted from anyone.
    let r = check_with(
        params(),
        false,
        "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nDATA\r\nx\r\n.\r\n",
        "220 250 250/2.1.0 250/2.1.5 354 250/2.0.0",
    );
    assert_eq!(r.messages[0].recipients[0].to_string(), "postmaster@example.test");
    assert_eq!(r.messages[0].sender, None);
}

#[test]
fn too_many_recipients_keeps_those_accepted() {
    let mut input = String::from("EHLO c\r\nMAIL FROM:<a@b.test>\r\n");
    for i in 0..5 {
        input.push_str(&format!("RCPT TO:<u{i}@example.test>\r\n"));
    }
    input.push_str("DATA\r\nx\r\n.\r\n");
    let r = check(&input, "220 250 250/2.1.0 250/2.1.5 250/2.1.5 250/2.1.5 452/4.5.3 452/4.5.3 354 250/2.0.0");
    assert_eq!(r.messages[0].recipients.len(), 3);
}

#[test]
fn size_limits() {
    let txn = "EHLO c\r\nMAIL FROM:<a@b.test> SIZE=2000\r\nRCPT TO:<b@example.test>\r\nDATA\r\n";
    check(txn, "220 250 250/2.1.0 250/2.1.5 354");
    check("EHLO c\r\nMAIL FROM:<a@b.test> SIZE=2001\r\n", "220 250 552/5.3.4");
    // A body over the limit is drained, refused with 552, and the session goes on.
    let big = format!(
        "{txn}{}\r\n.\r\nNOOP\r\n",
        "x".repeat(900)
            .repeat(3)
            .chars()
            .collect::<Vec<_>>()
            .chunks(900)
            .map(|c| c.iter().collect::<String>())
            .collect::<Vec<_>>()
            .join("\r\n")
    );
    let r = check(&big, "220 250 250/2.1.0 250/2.1.5 354 552/5.3.4 250/2.0.0");
    assert!(r.messages.is_empty());
    assert_eq!(r.refusals, vec![RefusalCause::MessageTooBig]);
}

#[test]
fn long_lines() {
    // A 512-octet command line (CRLF included) is fine; 513 is refused and the session resynchronises.
    let ok = format!("NOOP {}\r\n", "a".repeat(512 - 7));
    check(&ok, "220 250/2.0.0");
    let long = format!("NOOP {}\r\nNOOP\r\n", "a".repeat(512 - 6));
    check(&long, "220 500/5.5.6 250/2.0.0");
    let very_long = format!("NOOP {}\r\nNOOP\r\n", "a".repeat(100_000));
    let r = check(&very_long, "220 500/5.5.6 250/2.0.0");
    assert_eq!(r.refusals, vec![RefusalCause::LineTooLong]);
    // A text line over 1000 octets refuses the message after draining to the end of DATA.
    let data = format!(
        "{HELLO}MAIL FROM:<a@b.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n{}\r\n.\r\nNOOP\r\n",
        "y".repeat(999)
    );
    check(&data, "220 250 250/2.1.0 250/2.1.5 354 554/5.6.0 250/2.0.0");
}

#[test]
fn smuggling_variants_yield_exactly_one_message() {
    // Each body tries to end DATA early and start a second, forged transaction inside it.
    let forged = "MAIL FROM:<ceo@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nforged\r\n";
    for (name, early_end) in
        [("<LF>.<LF>", "\n.\n"), ("<LF>.<CR><LF>", "\n.\r\n"), ("<CR><LF>.<LF>", "\r\n.\n"), ("<CR>.<CR>", "\r.\r")]
    {
        let input = format!(
            "{HELLO}MAIL FROM:<a@b.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nhello{early_end}{forged}.\r\nQUIT\r\n"
        );
        let r = drive(params(), true, &[input.as_bytes()], Ok(0));
        assert!(r.messages.is_empty(), "{name}: the message holding a bare line end must be refused");
        assert_eq!(r.codes.iter().filter(|c| c.starts_with("354")).count(), 1, "{name}: {}", r.wire);
        assert!(r.codes.iter().any(|c| c == "554/5.6.0"), "{name}: {}", r.wire);
        assert!(r.closed, "{name}: QUIT after the real end is executed");
    }
    // With proper line ends the "forged" lines are just body text of one message.
    let input =
        format!("{HELLO}MAIL FROM:<a@b.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nhello\r\n{forged}.\r\nQUIT\r\n");
    let r = drive(params(), true, &[input.as_bytes()], Ok(0));
    assert_eq!(r.messages.len(), 1);
    assert_eq!(r.messages[0].body, format!("hello\r\n{forged}").as_bytes());
}

#[test]
fn bare_line_ends_are_named() {
    let base = format!("{HELLO}MAIL FROM:<a@b.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    let r = drive(params(), true, &[format!("{base}a\nb\r\n.\r\n").as_bytes()], Ok(0));
    assert!(r.wire.contains("bare <LF>"), "{}", r.wire);
    let r = drive(params(), true, &[format!("{base}a\rb\r\n.\r\n").as_bytes()], Ok(0));
    assert!(r.wire.contains("bare <CR>"), "{}", r.wire);
}

#[test]
fn pipelined_batches_reply_in_order() {
    let mut input = String::from(HELLO);
    for i in 0..3 {
        input.push_str(&format!("MAIL FROM:<s{i}@b.test>\r\nRCPT TO:<r{i}@example.test>\r\nRCPT TO:<x@nowhere.test>\r\nDATA\r\nmsg {i}\r\n.\r\n"));
    }
    input.push_str("QUIT\r\n");
    let expected =
        "220 250 ".to_string() + &["250/2.1.0 250/2.1.5 550/5.7.1 354 250/2.0.0"; 3].join(" ") + " 221/2.0.0";
    let r = check_with(params(), false, &input, &expected);
    assert_eq!(r.messages.len(), 3);
    assert_eq!(r.messages[2].body, b"msg 2\r\n");
    assert!(r.wire.contains("queued as 101") && r.wire.contains("queued as 103"));
}

#[test]
fn dot_stuffing_and_8bit() {
    let r = check(
        "EHLO c\r\nMAIL FROM:<a@b.test> BODY=8BITMIME\r\nRCPT TO:<b@example.test>\r\nDATA\r\n..leading dot\r\n..\r\nünïcödé\r\n.\r\n",
        "220 250 250/2.1.0 250/2.1.5 354 250/2.0.0",
    );
    assert_eq!(r.messages[0].body, ".leading dot\r\n.\r\nünïcödé\r\n".as_bytes());
    assert!(r.messages[0].eight_bit);
}

#[test]
fn smtputf8_addresses() {
    check("EHLO c\r\nMAIL FROM:<jörg@b.test>\r\n", "220 250 553/5.6.7");
    let r = check(
        "EHLO c\r\nMAIL FROM:<jörg@bücher.test> SMTPUTF8\r\nRCPT TO:<ü@example.test>\r\nDATA\r\nx\r\n.\r\n",
        "220 250 250/2.1.0 250/2.1.5 354 250/2.0.0",
    );
    assert_eq!(r.messages[0].protocol, "UTF8SMTP");
    check("EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<ü@example.test>\r\n", "220 250 250/2.1.0 553/5.6.7");
    check("EHLO c\r\nMAIL FROM:<\u{1}@b.test>\r\n", "220 250 501/5.5.4");
}

#[test]
fn hop_count() {
    let body = "Received: a\r\nReceived: b\r\nreceived: c\r\nReceived: d\r\n\r\nx\r\n.\r\n";
    let r = check(
        &format!("{HELLO}MAIL FROM:<a@b.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n{body}"),
        "220 250 250/2.1.0 250/2.1.5 354 554/5.4.6",
    );
    assert_eq!(r.refusals, vec![RefusalCause::HopCountExceeded]);
    // Exactly max_hop_count is allowed, and "Received:" in the body does not count.
    let body = "Received: a\r\nReceived: b\r\nReceived: c\r\n\r\nReceived: body\r\n.\r\n";
    check(
        &format!("{HELLO}MAIL FROM:<a@b.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n{body}"),
        "220 250 250/2.1.0 250/2.1.5 354 250/2.0.0",
    );
}

#[test]
fn max_errors_closes() {
    let mut p = params();
    p.max_errors = 3;
    let r = check_with(p, true, "FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n", "220 500/5.5.2 500/5.5.2 500/5.5.2 421/4.7.0");
    assert!(r.closed);
    assert_eq!(r.refusals, vec![RefusalCause::TooManyErrors]);
}

#[test]
fn max_messages_per_connection() {
    let mut p = params();
    p.max_messages_per_connection = 1;
    let txn = "MAIL FROM:<a@b.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nx\r\n.\r\n";
    let r = check_with(p, true, &format!("{HELLO}{txn}{txn}"), "220 250 250/2.1.0 250/2.1.5 354 250/2.0.0 421/4.7.0");
    assert!(r.closed);
}

#[test]
fn queue_failures_are_temporary() {
    let input = format!(
        "{HELLO}MAIL FROM:<a@b.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nx\r\n.\r\nMAIL FROM:<a@b.test>\r\n"
    );
    let r = drive(params(), true, &[input.as_bytes()], Err(EnqueueError::Temporary));
    assert_eq!(r.codes.join(" "), "220 250 250/2.1.0 250/2.1.5 354 451/4.3.0 250/2.1.0");
    let r = drive(params(), true, &[input.as_bytes()], Err(EnqueueError::Storage));
    assert_eq!(r.codes.join(" "), "220 250 250/2.1.0 250/2.1.5 354 452/4.3.1 250/2.1.0");
}

#[test]
fn timeout_closes_with_421() {
    let mut s = Session::new(Arc::new(params()), "192.0.2.9".parse().unwrap(), false);
    // Input still buffered when the timeout fires is not executed.
    s.feed(b"NOOP");
    s.timeout();
    let actions: Vec<Action> = std::iter::from_fn(|| s.next_action()).collect();
    assert!(matches!(&actions[0], Action::Refused(r) if r.cause == RefusalCause::IdleTimeout));
    assert!(matches!(&actions[1], Action::Reply(r) if r.code == 421 && r.status == Some("4.4.2")));
    assert!(matches!(actions[2], Action::Close));
    assert_eq!(actions.len(), 3);
    assert!(s.is_closed());
}

/// What the list of open sessions shows, step by step through a transaction; and an operator's
/// disconnect in the middle of one closes with 421 4.7.0 and hands nothing to the queue.
#[test]
fn phases_and_disconnect() {
    let mut s = Session::new(Arc::new(params()), "192.0.2.9".parse().unwrap(), true);
    let steps: [(&[u8], &str); 6] = [
        (b"", "connected"),
        (b"EHLO client.example\r\n", "idle"),
        (b"MAIL FROM:<a@example.org>\r\n", "mail"),
        (b"RCPT TO:<b@example.net>\r\n", "rcpt"),
        (b"DATA\r\n", "data"),
        (b"Subject: half\r\n\r\nso far", "data"),
    ];
    for (input, phase) in steps {
        s.feed(input);
        while s.next_action().is_some() {}
        assert_eq!(s.phase(), phase, "after {:?}", String::from_utf8_lossy(input));
    }
    assert_eq!(s.helo_name(), Some("client.example"));
    assert!(!s.is_tls());
    s.disconnect();
    let actions: Vec<Action> = std::iter::from_fn(|| s.next_action()).collect();
    assert!(matches!(&actions[0], Action::Refused(r) if r.cause == RefusalCause::Disconnected));
    assert!(matches!(&actions[1], Action::Reply(r) if r.code == 421 && r.status == Some("4.7.0")));
    assert!(matches!(actions[2], Action::Close));
    assert!(!actions.iter().any(|a| matches!(a, Action::Enqueue(_))));
    assert_eq!(s.phase(), "closed");
}

/// A small deterministic generator (xorshift64*), so failures reproduce from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Hostile input is normal input: random mixes of valid commands, smuggling line ends, long
/// lines and raw garbage, cut into random reads. The session must never panic, never hold more
/// than one read plus one command line, and only emit well-formed reply lines.
#[test]
fn random_streams_never_break_the_session() {
    let pieces: &[&[u8]] = &[
        b"EHLO x\r\n",
        b"HELO y\r\n",
        b"MAIL FROM:<a@b.test>\r\n",
        b"MAIL FROM:<> SIZE=10\r\n",
        b"RCPT TO:<c@example.test>\r\n",
        b"RCPT TO:<d@far.test>\r\n",
        b"DATA\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"VRFY x\r\n",
        b"\r\n.\r\n",
        b"\n.\n",
        b"\r\n.\n",
        b"\n.\r\n",
        b".",
        b"\r",
        b"\n",
        b"..\r\n",
        b"Received: x\r\n",
        b"\xff\xfe\x00",
        "ü@ß\r\n".as_bytes(),
        b"MAIL FROM:<\"q>\"@x>\r\n",
        b"RCPT TO:<postmaster>\r\n",
        b"BDAT 10 LAST\r\n",
        b"BDAT 3\r\n",
        b"BDAT 99999999999\r\n",
        b"STARTTLS\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH LOGIN YWxpY2U=\r\n",
        b"AGFsaWNlAHNlY3JldA==\r\n",
        b"*\r\n",
        b"<<<>>>@@@::",
    ];
    let mut p = params();
    p.max_errors = 0;
    p.max_recipients = 5;
    p.tls_available = true;
    p.auth_enabled = true;
    p.auth_plaintext_loopback = true;
    for seed in 1..=2000u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut stream = Vec::new();
        while stream.len() < 4000 {
            match rng.below(10) {
                0 => stream.extend((0..rng.below(700)).map(|_| rng.next() as u8)),
                1 => stream.extend(std::iter::repeat_n(b'a', rng.below(3000))),
                _ => stream.extend_from_slice(pieces[rng.below(pieces.len())]),
            }
        }
        let mut s = Session::new(Arc::new(p.clone()), "192.0.2.1".parse().unwrap(), rng.below(2) == 0);
        if rng.below(2) == 0 {
            s.set_body_streaming(1 + rng.below(3000));
        }
        let mut pos = 0;
        let mut id = 0;
        while pos < stream.len() && !s.is_closed() {
            let n = 1 + rng.below(16 * 1024).min(stream.len() - pos - 1);
            let read = &stream[pos..pos + n];
            pos += n;
            s.feed(read);
            assert!(s.buffered() <= 16 * 1024 + 512, "seed {seed}: buffer grew to {}", s.buffered());
            while let Some(a) = s.next_action() {
                match a {
                    Action::Reply(r) => {
                        let wire = r.to_bytes();
                        for line in wire.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                            assert!(line.len() <= 512 && line.ends_with(b"\r"), "seed {seed}: bad reply line {line:?}");
                            assert!((200..600).contains(&r.code), "seed {seed}: code {}", r.code);
                        }
                    }
                    Action::Enqueue(m) => {
                        assert!(!m.recipients.is_empty() && m.recipients.len() <= 5, "seed {seed}");
                        assert!(m.body.len() <= p.max_message_size, "seed {seed}");
                        id += 1;
                        s.enqueued(Ok(id));
                    }
                    Action::Refused(_) | Action::Close | Action::Log(_) | Action::BodyChunk { .. } => {}
                    Action::StartTls => s.tls_started(),
                    Action::Authenticate { .. } => s.authenticated(rng.below(2) == 0),
                    Action::CheckRecipient(_) => s.recipient_checked(RecipientVerdict::Exists),
                    Action::CheckSender { .. } => s.sender_checked(None),
                }
            }
        }
    }
}

#[test]
fn echoed_names_keep_reply_lines_within_512_octets() {
    for verb in ["EHLO", "HELO"] {
        let input = format!("{verb} {}\r\n", "h".repeat(512 - 7));
        let r = check(&input, "220 250");
        // `lines()` drops the CRLF, which counts towards the 512 octets.
        assert!(r.wire.lines().all(|l| l.len() <= 510), "{}", r.wire);
    }
}

#[test]
fn dsn_parameters_reach_the_queue() {
    let r = check(
        "EHLO c\r\nMAIL FROM:<a@b.test> RET=HDRS ENVID=id+2B1\r\nRCPT TO:<x@example.test> NOTIFY=SUCCESS ORCPT=rfc822;x@example.test\r\nRCPT TO:<y@example.test>\r\nDATA\r\nx\r\n.\r\n",
        "220 250 250/2.1.0 250/2.1.5 250/2.1.5 354 250/2.0.0",
    );
    let m = &r.messages[0];
    assert_eq!(m.dsn.ret, Some(super::dsn::Ret::Hdrs));
    assert_eq!(m.dsn.envid.as_deref(), Some("id+2B1"));
    assert_eq!(m.rcpt_dsn.len(), 2);
    assert_eq!(m.rcpt_dsn[0].notify.map(|n| n.success), Some(true));
    assert_eq!(m.rcpt_dsn[0].orcpt.as_deref(), Some("rfc822;x@example.test"));
    assert_eq!(m.rcpt_dsn[1], super::dsn::RcptDsn::default());
    assert!(r.wire.contains("250-DSN\r\n"));
}

#[test]
fn relay_allowed_domains_take_mail_from_anyone() {
    check_with(
        params(),
        false,
        "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@backup.test>\r\nRCPT TO:<x@BACKUP.TEST>\r\nRCPT TO:<x@other.test>\r\n",
        "220 250 250/2.1.0 250/2.1.5 250/2.1.5 550/5.7.1",
    );
}

fn secure() -> SessionParams {
    SessionParams { tls_available: true, auth_enabled: true, ..params() }
}

/// Codes of a run fed in the given chunks (a handshake "happens" between chunks).
fn codes(p: SessionParams, relay: bool, chunks: &[&str]) -> (String, Run) {
    let bytes: Vec<&[u8]> = chunks.iter().map(|c| c.as_bytes()).collect();
    let r = drive(p, relay, &bytes, Ok(0));
    (r.codes.join(" "), r)
}

#[test]
fn starttls() {
    let cases: &[(SessionParams, &[&str], &str)] = &[
        // Offered only when configured, and only once.
        (params(), &["EHLO c\r\nSTARTTLS\r\n"], "220 250 502/5.5.1"),
        (secure(), &["EHLO c\r\nSTARTTLS\r\n", "STARTTLS\r\n"], "220 250 220/2.0.0 TLS 503/5.5.1"),
        // Everything before the handshake is forgotten: EHLO again, then mail.
        (secure(), &["EHLO c\r\nSTARTTLS\r\n", "MAIL FROM:<a@b.test>\r\n"], "220 250 220/2.0.0 TLS 503/5.5.1"),
        (
            secure(),
            &["EHLO c\r\nSTARTTLS\r\n", "EHLO c\r\nMAIL FROM:<a@b.test>\r\n"],
            "220 250 220/2.0.0 TLS 250 250/2.1.0",
        ),
        // CVE-2011-0411: commands pipelined after STARTTLS in clear text are never executed.
        (
            secure(),
            &["EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@example.test>\r\n", "NOOP\r\n"],
            "220 250 220/2.0.0 TLS 250/2.0.0",
        ),
        // tls.required: mail commands wait for STARTTLS; EHLO, NOOP, RSET, QUIT do not.
        (
            SessionParams { tls_required: true, ..secure() },
            &[
                "EHLO c\r\nMAIL FROM:<a@b.test>\r\nNOOP\r\nAUTH PLAIN\r\nSTARTTLS\r\n",
                "EHLO c\r\nMAIL FROM:<a@b.test>\r\n",
            ],
            "220 250 530/5.7.0 250/2.0.0 530/5.7.0 220/2.0.0 TLS 250 250/2.1.0",
        ),
    ];
    for (p, chunks, want) in cases {
        assert_eq!(codes(p.clone(), true, chunks).0, *want, "{chunks:?}");
    }
    let (_, r) = codes(secure(), true, &["EHLO c\r\nSTARTTLS\r\n", "EHLO c\r\n"]);
    let first = r.wire.split("220 2.0.0").next().unwrap_or("");
    let after = r.wire.split("220 2.0.0").nth(1).unwrap_or("");
    assert!(first.contains("250-STARTTLS") && !after.contains("STARTTLS"), "{}", r.wire);
    assert!(!first.contains("AUTH") && after.contains("250-AUTH PLAIN LOGIN"), "AUTH only over TLS: {}", r.wire);
}

#[test]
fn auth() {
    // "\0alice\0secret" and friends, base64.
    let good = "AGFsaWNlAHNlY3JldA==";
    let bad = "AGFsaWNlAHdyb25n";
    let tls = "EHLO c\r\nSTARTTLS\r\n";
    let cases: &[(&[&str], &str)] = &[
        (&[tls, &format!("EHLO c\r\nAUTH PLAIN {good}\r\n")], "250 235/2.7.0"),
        (&[tls, &format!("EHLO c\r\nAUTH PLAIN\r\n{good}\r\n")], "250 334 235/2.7.0"),
        (&[tls, &format!("EHLO c\r\nAUTH PLAIN {bad}\r\n")], "250 535/5.7.8"),
        (&[tls, "EHLO c\r\nAUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\n"], "250 334 334 235/2.7.0"),
        (&[tls, "EHLO c\r\nAUTH LOGIN YWxpY2U=\r\nd3Jvbmc=\r\n"], "250 334 535/5.7.8"),
        (&[tls, "EHLO c\r\nAUTH LOGIN\r\n*\r\n"], "250 334 501/5.0.0"),
        (&[tls, "EHLO c\r\nAUTH PLAIN not-base64!\r\n"], "250 501/5.5.2"),
        (&[tls, "EHLO c\r\nAUTH CRAM-MD5\r\n"], "250 504/5.5.4"),
        (&[tls, &format!("EHLO c\r\nAUTH PLAIN {good}\r\nAUTH PLAIN {good}\r\n")], "250 235/2.7.0 503/5.5.1"),
        (&[tls, &format!("EHLO c\r\nMAIL FROM:<a@b.test>\r\nAUTH PLAIN {good}\r\n")], "250 250/2.1.0 503/5.5.1"),
        // Acting as another user is not supported.
        (&[tls, "EHLO c\r\nAUTH PLAIN Ym9iAGFsaWNlAHNlY3JldA==\r\n"], "250 535/5.7.8"),
        // Never in clear text from a non-loopback client.
        (&[&format!("EHLO c\r\nAUTH PLAIN {good}\r\n")], "220 250 538/5.7.11"),
    ];
    for (chunks, want) in cases {
        let (got, _) = codes(secure(), false, chunks);
        let got = got.trim_start_matches("220 250 220/2.0.0 TLS ");
        assert_eq!(got, *want, "{chunks:?}");
    }
    // Loopback clients may authenticate in clear text when allowed.
    let p = SessionParams { auth_plaintext_loopback: true, ..secure() };
    let input = format!("EHLO c\r\nAUTH PLAIN {good}\r\n");
    let r = drive_from("127.0.0.1", p.clone(), false, &[input.as_bytes()], Ok(0));
    assert_eq!(r.codes.join(" "), "220 250 235/2.7.0");
    let r = drive_from("192.0.2.1", p, false, &[input.as_bytes()], Ok(0));
    assert_eq!(r.codes.join(" "), "220 250 538/5.7.11");
    // An authenticated client may relay; the trace header says ESMTPSA.
    let (got, r) = codes(
        secure(),
        false,
        &[tls, &format!("EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\nRSET\r\nAUTH PLAIN {good}\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\nx\r\n.\r\n")],
    );
    assert!(got.ends_with("250 250/2.1.0 550/5.7.1 250/2.0.0 235/2.7.0 250/2.1.0 250/2.1.5 354 250/2.0.0"), "{got}");
    assert_eq!(r.messages[0].protocol, "ESMTPSA");
    assert!(r.refusals.contains(&RefusalCause::RelayDenied));
}

/// Secure params where the login alice owns alice@example.test and all of alice.test.
fn alice_owns_her_addresses() -> SessionParams {
    let map = crate::senders::SenderLogins::new([(
        "alice".to_string(),
        vec!["alice@example.test".to_string(), "@alice.test".to_string()],
    )])
    .unwrap();
    SessionParams { sender_logins: Some(Arc::new(map)), ..secure() }
}

#[test]
fn authenticated_users_send_only_as_themselves() {
    // "\0alice\0secret", base64.
    let login = "EHLO c\r\nSTARTTLS\r\n";
    let auth = "EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n";
    let p = alice_owns_her_addresses();
    let cases: &[(&str, &str)] = &[
        ("MAIL FROM:<alice@example.test>\r\n", "250/2.1.0"),
        ("MAIL FROM:<Alice@Example.TEST>\r\n", "250/2.1.0"),
        ("MAIL FROM:<anything@alice.test>\r\n", "250/2.1.0"),
        ("MAIL FROM:<>\r\n", "250/2.1.0"),
        ("MAIL FROM:<bob@example.test>\r\n", "553/5.7.1"),
        ("MAIL FROM:<alice@evil.test>\r\n", "553/5.7.1"),
    ];
    for (mail, want) in cases {
        let (got, r) = codes(p.clone(), false, &[login, &format!("{auth}{mail}")]);
        assert_eq!(got.rsplit(' ').next(), Some(*want), "{mail}: {got}");
        assert_eq!(r.refusals.contains(&RefusalCause::SenderLoginMismatch), want.starts_with("553"));
    }
    // Without a map, or without AUTH (a relay network's client), senders are not checked.
    let (got, _) = codes(secure(), false, &[login, &format!("{auth}MAIL FROM:<bob@example.test>\r\n")]);
    assert!(got.ends_with("250/2.1.0"), "{got}");
    let (got, _) = codes(p, true, &["EHLO c\r\nMAIL FROM:<bob@example.test>\r\n"]);
    assert!(got.ends_with("250/2.1.0"), "{got}");
}

/// A submission listener (RFC 6409): nothing is taken before AUTH, not even from a relay network
/// or for a local domain.
#[test]
fn submission_requires_auth() {
    let p = SessionParams { auth_required: true, tls_required: true, ..secure() };
    let login = "EHLO c\r\nSTARTTLS\r\n";
    let cases: &[(&str, bool, &str)] = &[
        ("EHLO c\r\nMAIL FROM:<a@b.test>\r\n", false, "250 530/5.7.0"),
        ("EHLO c\r\nMAIL FROM:<a@b.test>\r\n", true, "250 530/5.7.0"),
        ("EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@example.test>\r\n", true, "250 530/5.7.0 503/5.5.1"),
        (
            "EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\n",
            false,
            "250 235/2.7.0 250/2.1.0 250/2.1.5",
        ),
    ];
    for (input, relay, want) in cases {
        let (got, r) = codes(p.clone(), *relay, &[login, input]);
        assert!(got.ends_with(want), "{input:?} relay {relay}: {got}");
        assert_eq!(r.refusals.contains(&RefusalCause::AuthRequired), want.contains("530"), "{input:?}");
    }
    // Before STARTTLS, tls_required answers first.
    let (got, _) = codes(p, false, &["EHLO c\r\nMAIL FROM:<a@b.test>\r\n"]);
    assert!(got.ends_with("250 530/5.7.0"), "{got}");
}

#[test]
fn authenticated_users_write_only_their_own_from_header() {
    let login = "EHLO c\r\nSTARTTLS\r\n";
    let auth =
        "EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.test>\r\n";
    let p = alice_owns_her_addresses();
    let cases: &[(&str, &str)] = &[
        ("From: Alice <alice@example.test>\r\n", "250/2.0.0"),
        ("FROM : alice@EXAMPLE.test\r\n", "250/2.0.0"),
        ("From: a@alice.test,\r\n b@alice.test\r\n", "250/2.0.0"),
        ("Subject: no From: at all\r\n", "250/2.0.0"),
        ("From: \"alice@example.test\" <bob@example.test>\r\n", "550/5.7.1"),
        ("From: Alice <alice@example.test>,\r\n\tBob <bob@example.test>\r\n", "550/5.7.1"),
        ("From: alice@example.test\r\nFrom: bob@example.test\r\n", "550/5.7.1"),
        ("From: Alice <alice@example.test\r\n", "550/5.7.1"),
        ("From: undisclosed:;\r\n", "550/5.7.1"),
        // After the header section, "From:" is body text.
        ("Subject: s\r\n\r\nFrom: bob@example.test\r\n", "250/2.0.0"),
    ];
    for (headers, want) in cases {
        for bdat in [false, true] {
            let body = format!("{headers}\r\nbody\r\n");
            let data =
                if bdat { format!("BDAT {} LAST\r\n{body}", body.len()) } else { format!("DATA\r\n{body}.\r\n") };
            let (got, r) = codes(p.clone(), false, &[login, &format!("{auth}{data}")]);
            assert_eq!(got.rsplit(' ').next(), Some(*want), "{headers:?} bdat {bdat}: {got}");
            assert_eq!(r.messages.len(), usize::from(want.starts_with("250")), "{headers:?}");
            assert_eq!(r.refusals.contains(&RefusalCause::SenderLoginMismatch), want.starts_with("550"));
        }
    }
    // Unauthenticated clients (a relay network) are not checked.
    let (got, _) = codes(
        p,
        true,
        &["EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\nFrom: bob@example.test\r\n\r\nx\r\n.\r\n"],
    );
    assert!(got.ends_with("250/2.0.0"), "{got}");
}

/// Recipient maps at RCPT: unknown users of a mapped domain are refused before DATA (no
/// backscatter); aliases expand with ORCPT kept; unmapped domains take anything; SRS addresses
/// of ours are reversed by the caller's hook.
#[test]
fn recipient_maps_at_rcpt() {
    use crate::recipients::{MapSource, RecipientMaps};
    let src = MapSource {
        users: vec!["alice".into()],
        aliases: vec![("team".into(), vec!["alice".into(), "bob@far.test".into()])],
        catch_all: Vec::new(),
        delimiter: "+".into(),
    };
    let maps = RecipientMaps::new([("example.test".to_string(), src)]).unwrap();
    let srs = crate::SrsReverse::new(|m| {
        let rest = m.local.strip_prefix("SRS0=")?;
        Some(if rest == "good" {
            Ok(crate::address::parse_mailbox("orig@far.test").unwrap())
        } else {
            Err("bad SRS".into())
        })
    });
    let p = SessionParams { recipient_maps: Some(Arc::new(maps)), srs, max_recipients: 2, ..params() };
    let mail = "EHLO c\r\nMAIL FROM:<s@far.test>\r\n";
    let cases: &[(&str, &str, &[&str], bool)] = &[
        ("RCPT TO:<alice@example.test>\r\n", "250/2.1.5", &["alice@example.test"], false),
        ("RCPT TO:<Alice+news@example.test>\r\n", "250/2.1.5", &["Alice+news@example.test"], false),
        ("RCPT TO:<nobody@example.test>\r\n", "550/5.1.1", &[], false),
        ("RCPT TO:<team@example.test>\r\n", "250/2.1.5", &["alice@example.test", "bob@far.test"], true),
        ("RCPT TO:<x@alias.test>\r\n", "250/2.1.5", &["x@alias.test"], false),
        ("RCPT TO:<SRS0=good@example.test>\r\n", "250/2.1.5", &["orig@far.test"], true),
        ("RCPT TO:<SRS0=forged@example.test>\r\n", "550/5.1.1", &[], false),
        // An alias counts as one RCPT against max_recipients, however far it expands.
        (
            "RCPT TO:<team@example.test>\r\nRCPT TO:<alice@example.test>\r\n",
            "250/2.1.5",
            &["alice@example.test", "bob@far.test"],
            true,
        ),
    ];
    for (rcpt, want, recipients, forwarded) in cases {
        let data = if recipients.is_empty() { "" } else { "DATA\r\nx\r\n.\r\n" };
        let r = drive(p.clone(), false, &[format!("{mail}{rcpt}{data}").as_bytes()], Ok(1));
        let rcpt_reply = r.codes.iter().rev().nth(if recipients.is_empty() { 0 } else { 2 }).cloned();
        assert_eq!(rcpt_reply.as_deref(), Some(*want), "{rcpt:?}: {:?}", r.codes);
        let got: Vec<String> = r.messages.iter().flat_map(|m| m.recipients.iter().map(|r| r.to_string())).collect();
        assert_eq!(got, *recipients, "{rcpt:?}");
        if let Some(m) = r.messages.first() {
            assert_eq!(m.forwarded, *forwarded, "{rcpt:?}");
        }
        assert_eq!(r.refusals.contains(&RefusalCause::UnknownRecipient), want.starts_with("550"), "{rcpt:?}");
    }
    // The expansion remembers the address the client gave (RFC 3461 ORCPT).
    let r = drive(p, false, &[format!("{mail}RCPT TO:<team@example.test>\r\nDATA\r\nx\r\n.\r\n").as_bytes()], Ok(1));
    let orcpt: Vec<_> = r.messages[0].rcpt_dsn.iter().map(|d| d.orcpt.clone()).collect();
    assert_eq!(orcpt, vec![Some("rfc822;team@example.test".to_string()); 2]);
}

/// Rate limits as the caller's gate decides them: a message over the rate gets 450 4.7.1 at
/// MAIL, a recipient 450 4.7.1 at RCPT, and too many unknown recipients end the connection with
/// 421 4.7.0 (directory harvesting).
#[test]
fn rate_limits() {
    use crate::recipients::{MapSource, RecipientMaps};
    use std::sync::Mutex;
    let gate = |max_messages: usize, max_rcpts: usize, max_failed: usize| {
        let counts = Arc::new(Mutex::new((0, 0, 0)));
        crate::RateGate::new(move |event, _ip, _user| {
            let mut c = counts.lock().unwrap();
            match event {
                crate::RateEvent::Message => {
                    c.0 += 1;
                    c.0 <= max_messages
                }
                crate::RateEvent::Recipient => {
                    c.1 += 1;
                    c.1 <= max_rcpts
                }
                crate::RateEvent::FailedRecipient => {
                    c.2 += 1;
                    c.2 <= max_failed
                }
            }
        })
    };
    let src = MapSource { users: vec!["alice".into()], delimiter: "+".into(), ..MapSource::default() };
    let maps = Arc::new(RecipientMaps::new([("example.test".to_string(), src)]).unwrap());
    let p = |g| SessionParams { rates: g, recipient_maps: Some(maps.clone()), ..params() };
    let msg = "MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nx\r\n.\r\n";
    let cases: &[(crate::RateGate, String, &str)] = &[
        (gate(1, 9, 9), format!("EHLO c\r\n{msg}{msg}"), "250 250/2.1.0 250/2.1.5 354 250/2.0.0 450/4.7.1 503/5.5.1 503/5.5.1 500/5.5.2 500/5.5.2"),
        (
            gate(9, 2, 9),
            "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<alice+x@example.test>\r\nRCPT TO:<alice+y@example.test>\r\n".into(),
            "250 250/2.1.0 250/2.1.5 250/2.1.5 450/4.7.1",
        ),
        (
            gate(9, 9, 2),
            "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nRCPT TO:<y@example.test>\r\nRCPT TO:<z@example.test>\r\nRCPT TO:<alice@example.test>\r\n".into(),
            "250 250/2.1.0 550/5.1.1 550/5.1.1 421/4.7.0",
        ),
    ];
    for (g, input, want) in cases {
        let r = drive(p(g.clone()), false, &[input.as_bytes()], Ok(1));
        let got = r.codes.join(" ");
        assert!(got.ends_with(want), "{input:?}: {got}");
    }
    let r = drive(p(gate(9, 9, 0)), false, &[b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\n"], Ok(1));
    assert!(r.closed && r.refusals.contains(&RefusalCause::HarvestRate));
}

/// SPF at MAIL (`check_sender`): the caller's verdict answers MAIL; relay and authenticated
/// clients and the null sender are never asked; a refused MAIL leaves no transaction.
#[test]
fn sender_checked_at_mail() {
    let p = SessionParams { check_sender: true, ..params() };
    let cases: &[(&str, bool, &str)] = &[
        ("MAIL FROM:<a@ok.test>\r\nRCPT TO:<x@example.test>\r\n", false, "SPF a@ok.test c 250/2.1.0 250/2.1.5"),
        (
            "MAIL FROM:<a@spf-fail.test>\r\nRCPT TO:<x@example.test>\r\n",
            false,
            "SPF a@spf-fail.test c 550/5.7.23 503/5.5.1",
        ),
        ("MAIL FROM:<a@spf-temp.test>\r\n", false, "SPF a@spf-temp.test c 451/4.4.3"),
        ("MAIL FROM:<>\r\n", false, "250 250/2.1.0"),
        ("MAIL FROM:<a@spf-fail.test>\r\n", true, "250 250/2.1.0"),
    ];
    for (input, relay, want) in cases {
        let r = drive(p.clone(), *relay, &[format!("EHLO c\r\n{input}").as_bytes()], Ok(1));
        let got = r.codes.join(" ");
        assert!(got.ends_with(want), "{input:?}: {got}");
    }
    let r = drive(p, false, &[b"EHLO c\r\nMAIL FROM:<a@spf-fail.test>\r\n"], Ok(1));
    assert!(r.refusals.contains(&RefusalCause::SpfFail));
}

#[test]
fn bdat() {
    let mail = "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\n";
    let r = check(
        &format!("{mail}BDAT 5\r\nhelloBDAT 8 LAST\r\n world\r\n"),
        "220 250 250/2.1.0 250/2.1.5 250/2.0.0 250/2.0.0",
    );
    assert_eq!(r.messages.len(), 1);
    assert_eq!(r.messages[0].body, b"hello world\r\n");
    assert!(r.wire.contains("250 2.0.0 5 octets received\r\n"));
    // A smuggled "message" inside a chunk is just content: exactly one message.
    let evil = "a\r\n.\r\nMAIL FROM:<e@x.test>\r\nRCPT TO:<y@example.test>\r\nDATA\r\nevil\r\n.\r\n";
    let r = check(
        &format!("{mail}BDAT {} LAST\r\n{evil}QUIT\r\n", evil.len()),
        "220 250 250/2.1.0 250/2.1.5 250/2.0.0 221/2.0.0",
    );
    assert_eq!(r.messages.len(), 1);
    assert_eq!(r.messages[0].body, evil.as_bytes());
    assert_eq!(r.messages[0].recipients.len(), 1);
    // BDAT 0 LAST ends a message; chunks are read even when refused.
    check(&format!("{mail}BDAT 3\r\nab\nBDAT 0 LAST\r\n"), "220 250 250/2.1.0 250/2.1.5 250/2.0.0 554/5.6.0");
    check("EHLO c\r\nBDAT 6 LAST\r\nNOOP\r\nNOOP\r\n", "220 250 503/5.5.1 250/2.0.0");
    check("EHLO c\r\nMAIL FROM:<a@b.test>\r\nBDAT 4\r\nNOOPNOOP\r\n", "220 250 250/2.1.0 554/5.5.1 250/2.0.0");
    // Too big: refused at the chunk that crosses the limit (2000 here), memory stays bounded.
    let big = "xxxxxxxxx\r\n".repeat(150);
    let r = check(
        &format!("{mail}BDAT 1650\r\n{big}BDAT 1650\r\n{big}BDAT 3 LAST\r\nabcNOOP\r\n"),
        "220 250 250/2.1.0 250/2.1.5 250/2.0.0 552/5.3.4 503/5.5.1 250/2.0.0",
    );
    assert!(r.messages.is_empty());
    // A chunk larger than a whole message may be is not read (that could take forever): 552 and
    // the connection ends, whether or not a transaction is open, and however many digits.
    for size in ["2001", "99999999999", "18446744073709551615", "18446744073709551616"] {
        let r = check(&format!("{mail}BDAT {size}\r\nNOOP\r\n"), "220 250 250/2.1.0 250/2.1.5 552/5.3.4");
        assert!(r.closed && r.messages.is_empty(), "{size}");
        let r = check(&format!("EHLO c\r\nBDAT {size} LAST\r\nNOOP\r\n"), "220 250 552/5.3.4");
        assert!(r.closed, "{size}");
    }
    // Nothing at all is not a message (RFC 5322 §3.6 wants Date: and From:): BDAT and DATA.
    let r = check(&format!("{mail}BDAT 0 LAST\r\nNOOP\r\n"), "220 250 250/2.1.0 250/2.1.5 554/5.6.0 250/2.0.0");
    assert!(r.messages.is_empty() && r.refusals.contains(&RefusalCause::EmptyMessage));
    let r = check(&format!("{mail}DATA\r\n.\r\nNOOP\r\n"), "220 250 250/2.1.0 250/2.1.5 354 554/5.6.0 250/2.0.0");
    assert!(r.messages.is_empty());
    // NUL characters refuse the message, in DATA and in BDAT; the session stays in step.
    let r = check(
        &format!("{mail}DATA\r\nSubject: a\0b\r\n\0.\r\n.\r\nNOOP\r\n"),
        "220 250 250/2.1.0 250/2.1.5 354 554/5.6.0 250/2.0.0",
    );
    assert!(r.messages.is_empty() && r.refusals.contains(&RefusalCause::NulCharacter));
    let r = check(&format!("{mail}BDAT 4 LAST\r\na\0\r\nNOOP\r\n"), "220 250 250/2.1.0 250/2.1.5 554/5.6.0 250/2.0.0");
    assert!(r.messages.is_empty());
    // No mixing BDAT and DATA in one message.
    check(&format!("{mail}BDAT 3\r\nabcDATA\r\n"), "220 250 250/2.1.0 250/2.1.5 250/2.0.0 503/5.5.1");
    check(
        &format!("{mail}DATA\r\nx\r\n.\r\nBDAT 3 LAST\r\nabc"),
        "220 250 250/2.1.0 250/2.1.5 354 250/2.0.0 503/5.5.1",
    );
    // EHLO offers CHUNKING.
    assert!(check("EHLO c\r\n", "220 250").wire.contains("250-CHUNKING\r\n"));
}

/// The protocol log: one entry per command with its final reply; intermediate 334/354 replies
/// are not entries; credentials never appear; DATA and BDAT count the message bytes.
#[test]
fn protocol_log_entries() {
    type Entry = (String, String, u16, u64);
    fn logged(p: SessionParams, input: &str) -> Vec<Entry> {
        let mut s = Session::new(Arc::new(p), "192.0.2.9".parse().unwrap(), true);
        s.set_logging(true);
        let mut out = Vec::new();
        // `|` separates reads: what follows STARTTLS in the same read is discarded, rightly.
        for chunk in input.split('|') {
            s.feed(chunk.as_bytes());
            while let Some(a) = s.next_action() {
                match a {
                    Action::Log(l) => out.push((l.verb, l.arg, l.status, l.in_bytes)),
                    Action::Enqueue(_) => {
                        let _ = s.enqueued(Ok(7));
                    }
                    Action::Authenticate { .. } => s.authenticated(true),
                    Action::StartTls => s.tls_started(),
                    _ => {}
                }
            }
        }
        out
    }
    let e = |v: &str, a: &str, st: u16, n: u64| (v.to_string(), a.to_string(), st, n);
    let auth = SessionParams { auth_enabled: true, auth_plaintext_loopback: false, tls_available: true, ..params() };
    // "\0alice\0secret" in base64.
    let plain = "AGFsaWNlAHNlY3JldA==";
    let cases: Vec<(SessionParams, String, Vec<Entry>)> = vec![
        (
            params(),
            "EHLO c.test\r\nMAIL FROM:<a@b.test> SIZE=10\r\nRCPT TO:<x@example.test>\r\nDATA\r\nSubject: s\r\n\r\n.\r\nQUIT\r\n".into(),
            vec![
                e("EHLO", "c.test", 250, 13),
                e("MAIL", "FROM:<a@b.test>+SIZE=10", 250, 30),
                e("RCPT", "TO:<x@example.test>", 250, 26),
                // The DATA line (6) and the message as stored (14).
                e("DATA", "", 250, 6 + 14),
                e("QUIT", "", 221, 6),
            ],
        ),
        (params(), "bogus\x01 x\r\nmail\r\n".into(), vec![e("BOGUS?", "x", 501, 10), e("MAIL", "", 501, 6)]),
        (
            params(),
            "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nBDAT 5\r\nabcdeBDAT 2 LAST\r\nfg".into(),
            vec![
                e("EHLO", "c", 250, 8),
                e("MAIL", "FROM:<a@b.test>", 250, 22),
                e("RCPT", "TO:<x@example.test>", 250, 26),
                e("BDAT", "5", 250, 8 + 5),
                e("BDAT", "2+LAST", 250, 13 + 2),
            ],
        ),
        (
            auth.clone(),
            format!("EHLO c\r\nSTARTTLS\r\n|EHLO c\r\nAUTH PLAIN {plain}\r\n"),
            vec![e("EHLO", "c", 250, 8), e("STARTTLS", "", 220, 10), e("EHLO", "c", 250, 8), e("AUTH", "PLAIN", 235, 33)],
        ),
        (
            auth,
            "EHLO c\r\nSTARTTLS\r\n|EHLO c\r\nAUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\n".into(),
            vec![e("EHLO", "c", 250, 8), e("STARTTLS", "", 220, 10), e("EHLO", "c", 250, 8), e("AUTH", "LOGIN", 235, 12)],
        ),
    ];
    for (p, input, want) in cases {
        assert_eq!(logged(p, &input), want, "{input:?}");
    }
}

/// `receiving`: mid-command or mid-message (held to the minimum rate) versus idle between
/// commands (held to the idle timeout only); an idle session holds no input buffer.
#[test]
fn receiving_and_idle() {
    let mut s = Session::new(Arc::new(params()), "192.0.2.1".parse().unwrap(), false);
    let mut step = |bytes: &str, want: bool| {
        s.feed(bytes.as_bytes());
        while let Some(a) = s.next_action() {
            if let Action::Enqueue(_) = a {
                let _ = s.enqueued(Ok(1));
            }
        }
        assert_eq!(s.receiving(), want, "after {bytes:?}");
        s.release_idle_memory();
    };
    step("EHL", true);
    step("O c\r\n", false);
    step("MAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\n", false);
    step("DATA\r\n", true);
    step("Subject: x\r\n\r\nbody\r\n", true);
    step(".\r\n", false);
    step("BDAT 10\r\n", true);
    step("12345", true);
    step("67890", false);
    step("QUIT", true);
}

/// MAIL is refused with 452 4.3.1 when the queue has no room (its free-space reserve reached or
/// its store failing: room 0) or less room than the declared SIZE; otherwise it goes on.
#[test]
fn mail_is_refused_when_the_queue_has_no_room() {
    let cases: &[(u64, &str, &str)] = &[
        (u64::MAX, "MAIL FROM:<a@b.test> SIZE=1000\r\n", "220 250 250/2.1.0"),
        (0, "MAIL FROM:<a@b.test>\r\n", "220 250 452/4.3.1"),
        (999, "MAIL FROM:<a@b.test> SIZE=1000\r\n", "220 250 452/4.3.1"),
        (1000, "MAIL FROM:<a@b.test> SIZE=1000\r\n", "220 250 250/2.1.0"),
        (1, "MAIL FROM:<a@b.test>\r\n", "220 250 250/2.1.0"),
    ];
    // A store that is down for a reason other than space: 451 4.3.0, whatever the room.
    let mut s = Session::new(Arc::new(params()), "192.0.2.9".parse().unwrap(), true);
    s.set_storage_room(0);
    s.set_storage_down(true);
    s.feed(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n");
    let mut codes = Vec::new();
    while let Some(a) = s.next_action() {
        if let Action::Reply(r) = a {
            codes.push(r.status.map_or(r.code.to_string(), |st| format!("{}/{st}", r.code)));
        }
    }
    assert_eq!(codes.join(" "), "250 451/4.3.0");
    for (room, mail, want) in cases {
        let mut s = Session::new(Arc::new(params()), "192.0.2.9".parse().unwrap(), true);
        s.set_storage_room(*room);
        s.feed(format!("EHLO c.test\r\n{mail}").as_bytes());
        let mut codes = vec![s.greeting().code.to_string()];
        let mut refused = Vec::new();
        while let Some(a) = s.next_action() {
            match a {
                Action::Reply(r) => codes.push(r.status.map_or(r.code.to_string(), |st| format!("{}/{st}", r.code))),
                Action::Refused(r) => refused.push(r.cause),
                _ => {}
            }
        }
        assert_eq!(codes.join(" "), *want, "room {room}, {mail:?}");
        assert_eq!(refused.contains(&RefusalCause::InsufficientStorage), want.ends_with("452/4.3.1"), "room {room}");
    }
}

/// Streaming bodies in pieces changes no transcript: the transaction tests again, with pieces of
/// 1 and 7 bytes (so a piece ends everywhere: inside header lines' successors, at dots, in BDAT
/// chunks), each message put back together from its pieces and its rest.
#[test]
fn streamed_bodies_give_the_same_transcripts() {
    for min in [1, 7] {
        STREAM.set(Some(min));
        basic_transaction();
        size_limits();
        long_lines();
        smuggling_variants_yield_exactly_one_message();
        bare_line_ends_are_named();
        pipelined_batches_reply_in_order();
        dot_stuffing_and_8bit();
        hop_count();
        queue_failures_are_temporary();
        dsn_parameters_reach_the_queue();
        bdat();
        protocol_log_entries();
        STREAM.set(None);
    }
}

/// Recipients the caller checks (LMTP domains) are answered only after the check: 250 when the
/// mailbox exists, the server's own 550 when it does not (counted as a client error), 451 4.4.3
/// when it cannot be checked (not an error); other recipients are not checked. Pipelined
/// commands after a checked RCPT wait for its answer, so replies stay in order.
#[test]
fn recipients_are_checked_at_rcpt() {
    let p = SessionParams { check_recipients: RecipientCheck::new(|m| m.domain == "example.test"), ..params() };
    let input = "EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\n\
                 RCPT TO:<unknown@example.test>\r\nRCPT TO:<busy@example.test>\r\nRCPT TO:<x@alias.test>\r\n\
                 DATA\r\nSubject: s\r\n\r\nx\r\n.\r\n";
    let r = drive(p, false, &[input.as_bytes()], Ok(1));
    assert_eq!(
        r.codes.join(" "),
        "220 250 250/2.1.0 CHECK bob@example.test 250/2.1.5 CHECK unknown@example.test 550/5.1.1 \
         CHECK busy@example.test 451/4.4.3 250/2.1.5 354 250/2.0.0"
    );
    assert_eq!(r.refusals, vec![RefusalCause::UnknownRecipient, RefusalCause::RecipientUnverified]);
    let rcpts: Vec<String> = r.messages[0].recipients.iter().map(|m| m.to_string()).collect();
    assert_eq!(rcpts, ["bob@example.test", "x@alias.test"]);
}
