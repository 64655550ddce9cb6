//! Fuzz target: The client-side reply parser that reads remote servers during delivery. The checks are in
//! `mailroot_protocol::fuzzing::reply_parser`, which `cargo test` also runs over the kept corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailroot_protocol::fuzzing::reply_parser(input));
