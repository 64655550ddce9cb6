//! The checks behind the fuzz targets in `fuzz/`, as plain functions: cargo-fuzz calls them
//! with generated inputs, and `actors/protocol/tests/fuzz_corpus.rs` replays the kept corpus through them
//! in every `cargo test`, so each input that once found new coverage stays a regression test.
//! Each panics (an assertion) when the code under test misbehaves.

use std::sync::Arc;

use crate::client::{Capabilities, ReplyParser, MAX_REPLY_LINE};
use crate::command::parse;
use crate::data::{DataOutcome, DataReceiver};
use crate::{Action, LocalDomains, Session, SessionParams};

/// One command line through the parser: a command or an error, never a panic.
pub fn command(line: &[u8]) {
    let _ = parse(line);
}

const DATA_LIMIT: usize = 4096;

fn run_data(raw: bool, input: &[u8], step: usize) -> (usize, Option<DataOutcome>) {
    let mut rx = if raw { DataReceiver::raw(DATA_LIMIT) } else { DataReceiver::new(DATA_LIMIT) };
    let mut used = 0;
    for chunk in input.chunks(step.max(1)) {
        let (n, outcome) = rx.feed(chunk);
        used += n;
        if let Some(o) = outcome {
            return (used, Some(o));
        }
        assert_eq!(n, chunk.len(), "without an end the whole chunk is taken");
    }
    if raw {
        return (used, Some(rx.finish_chunks()));
    }
    (used, None)
}

/// The DATA and BDAT receivers: the first byte picks the read size. The outcome must not depend
/// on how reads split, a kept body stays within the limit, and only CRLF line ends survive.
pub fn data(input: &[u8]) {
    let Some((&first, rest)) = input.split_first() else { return };
    for raw in [false, true] {
        let whole = run_data(raw, rest, rest.len());
        let split = run_data(raw, rest, usize::from(first % 17) + 1);
        assert_eq!(whole, split, "the outcome must not depend on how reads split");
        if let (_, Some(DataOutcome::Message { body, .. })) = &whole {
            assert!(body.len() <= DATA_LIMIT);
            for (i, &b) in body.iter().enumerate() {
                if b == b'\n' {
                    assert!(i > 0 && body[i - 1] == b'\r', "bare LF kept");
                }
                if b == b'\r' {
                    assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR kept");
                }
            }
        }
    }
}

/// The whole sans-IO session: the first byte sets the options (TLS offered/required, AUTH in
/// clear text, loopback client, relay, max_errors, read size); every action is answered as the
/// daemon would. Never a panic, a bounded buffer, well-formed replies.
pub fn session(input: &[u8]) {
    let Some((&control, stream)) = input.split_first() else { return };
    let params = SessionParams {
        hostname: "mx.example.test".into(),
        local_domains: LocalDomains::new(["example.test"]),
        relay_domains: LocalDomains::new(["backup.test"]),
        max_message_size: 2048,
        max_recipients: 5,
        max_messages_per_connection: 0,
        max_errors: usize::from(control & 0x0f),
        max_hop_count: 5,
        tls_available: control & 0x10 != 0,
        tls_required: control & 0x20 != 0,
        auth_enabled: true,
        auth_plaintext_loopback: control & 0x40 != 0,
        // Recipients in example.test are checked when bit 2 is set.
        check_recipients: if control & 4 != 0 {
            crate::RecipientCheck::new(|m| m.domain == "example.test")
        } else {
            crate::RecipientCheck::default()
        },
        // The fuzz user owns only its own address (bit 3): other senders are refused.
        sender_logins: (control & 8 != 0).then(|| {
            Arc::new(
                crate::senders::SenderLogins::new([("alice".to_string(), vec!["alice@example.test".to_string()])])
                    .unwrap_or_default(),
            )
        }),
        // A submission listener when a relay client also has a sender map.
        auth_required: control & 0x09 == 0x09,
        // Recipients of example.test are mapped when bits 1 and 2 are set.
        recipient_maps: (control & 6 == 6).then(|| {
            let src = crate::recipients::MapSource {
                users: vec!["alice".into()],
                aliases: vec![("team".into(), vec!["alice".into(), "bob@far.test".into()])],
                catch_all: Vec::new(),
                delimiter: "+".into(),
            };
            Arc::new(crate::recipients::RecipientMaps::new([("example.test".to_string(), src)]).unwrap_or_default())
        }),
        srs: Default::default(),
        // Our own Authentication-Results are dropped when bit 4 is set.
        auth_results_id: (control & 0x10 != 0).then(|| "mx.example.test".to_string()),
        // Every second message and recipient is over the rate when bit 5 is set.
        rates: if control & 0x20 != 0 {
            let n = std::sync::atomic::AtomicUsize::new(0);
            crate::RateGate::new(move |_, _, _| n.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(2))
        } else {
            crate::RateGate::default()
        },
        check_sender: control & 0x24 == 0x24,
    };
    let ip = if control & 0x80 != 0 { [127, 0, 0, 1] } else { [192, 0, 2, 1] };
    let mut s = Session::new(Arc::new(params), ip.into(), control & 1 != 0);
    s.set_logging(control & 2 != 0);
    if control & 4 != 0 {
        s.set_body_streaming(100);
    }
    // Pieces of the message being received when streaming: (its seq, bytes so far).
    let mut pieces: Option<(u64, usize)> = None;
    let mut id = 0;
    let step = usize::from(control % 7) * 37 + 1;
    for read in stream.chunks(step) {
        if s.is_closed() {
            break;
        }
        s.feed(read);
        assert!(s.buffered() <= read.len() + 512 + step, "buffer grew to {}", s.buffered());
        while let Some(action) = s.next_action() {
            match action {
                Action::Reply(r) => {
                    assert!((200..600).contains(&r.code));
                    for line in r.to_bytes().split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                        assert!(line.len() <= 512 && line.ends_with(b"\r"), "bad reply line {line:?}");
                    }
                }
                Action::BodyChunk { seq, bytes } => {
                    assert!(bytes.len() >= 100, "pieces are at least the minimum");
                    let so_far = match pieces {
                        Some((p, n)) if p == seq => n,
                        _ => 0,
                    };
                    pieces = Some((seq, so_far + bytes.len()));
                }
                Action::Enqueue(m) => {
                    assert!(!m.recipients.is_empty() && m.recipients.len() <= 5);
                    let streamed = match pieces.take() {
                        Some((seq, n)) if seq == m.body_seq => n,
                        _ => 0,
                    };
                    assert_eq!(m.streamed, streamed, "the rest says how much came before it");
                    assert!(streamed + m.body.len() <= 2048);
                    id += 1;
                    let _ = s.enqueued(Ok(id));
                }
                Action::StartTls => s.tls_started(),
                Action::Authenticate { user, password } => s.authenticated(user == "alice" && password.0 == "secret"),
                Action::CheckSender { sender, .. } => s.sender_checked(match sender.local.len() % 3 {
                    0 => None,
                    1 => Some((crate::reply::spf_failed(), crate::RefusalCause::SpfFail)),
                    _ => Some((crate::reply::auth_check_unavailable(), crate::RefusalCause::AuthCheckTempFail)),
                }),
                Action::CheckRecipient(m) => s.recipient_checked(match m.local.len() % 3 {
                    0 => crate::RecipientVerdict::Exists,
                    1 => crate::RecipientVerdict::Unknown("no such user".into()),
                    _ => crate::RecipientVerdict::TryLater("try later".into()),
                }),
                Action::Log(l) => {
                    // One W3C field each: no spaces, no control characters, bounded.
                    for field in [&l.verb, &l.arg] {
                        assert!(!field.contains(' ') && !field.chars().any(char::is_control), "log field {field:?}");
                    }
                    assert!(l.verb.len() <= 12 * 4 && l.arg.chars().count() <= 128);
                    assert!((200..600).contains(&l.status) && l.in_bytes > 0 && l.out_bytes > 0);
                }
                Action::Refused(_) | Action::Close => {}
            }
        }
    }
}

/// What a remote server sends during delivery, through the client-side reply parser.
pub fn reply_parser(input: &[u8]) {
    let mut p = ReplyParser::new();
    for read in input.chunks(97) {
        p.feed(read);
        loop {
            match p.next_reply() {
                Ok(Some(r)) => {
                    assert!((200..600).contains(&r.code));
                    let _ = Capabilities::from_ehlo(&r);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(p.buffered() <= MAX_REPLY_LINE + 97);
    }
}
