//! Fuzz target: The DATA receiver and the BDAT (raw) receiver, split in two ways. The checks are in
//! `mailroot_protocol::fuzzing::data`, which `cargo test` also runs over the kept corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailroot_protocol::fuzzing::data(input));
