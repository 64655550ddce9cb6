//! Fuzz target: The whole sans-IO SMTP session with TLS and AUTH on. The checks are in
//! `mailroot_protocol::fuzzing::session`, which `cargo test` also runs over the kept corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailroot_protocol::fuzzing::session(input));
