//! Fuzz target: the whole sans-IO SMTP session. Arbitrary bytes in arbitrary reads, with TLS
//! and AUTH on; every action is answered as the daemon would. The session never panics, never
//! buffers more than one read plus a command line, and every reply line is well-formed.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mailroot_actors::protocol::{Action, LocalDomains, Session, SessionParams};

fuzz_target!(|input: &[u8]| {
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
    };
    let ip = if control & 0x80 != 0 { "127.0.0.1" } else { "192.0.2.1" };
    let mut s = Session::new(Arc::new(params), ip.parse().unwrap(), control & 1 != 0);
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
                Action::Enqueue(m) => {
                    assert!(!m.recipients.is_empty() && m.recipients.len() <= 5);
                    assert!(m.body.len() <= 2048);
                    id += 1;
                    let _ = s.enqueued(Ok(id));
                }
                Action::StartTls => s.tls_started(),
                Action::Authenticate { user, password } => s.authenticated(user == "alice" && password.0 == "secret"),
                Action::Refused(_) | Action::Close => {}
            }
        }
    }
});
