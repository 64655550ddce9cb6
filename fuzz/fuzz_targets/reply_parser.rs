//! Fuzz target: the client-side reply parser that reads what remote servers send during
//! delivery. It never panics and never holds more than one reply line's worth of bytes plus
//! one read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailroot_actors::protocol::client::{Capabilities, ReplyParser, MAX_REPLY_LINE};

fuzz_target!(|input: &[u8]| {
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
});
