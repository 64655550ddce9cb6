//! Fuzz target: One SMTP command line through the parser. The checks are in
//! `mailroot_protocol::fuzzing::command`, which `cargo test` also runs over the kept corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailroot_protocol::fuzzing::command(input));
