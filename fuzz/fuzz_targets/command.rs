//! Fuzz target: one SMTP command line through the parser. It must return a command or an error,
//! never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailroot_actors::protocol::command::parse;

fuzz_target!(|line: &[u8]| {
    let _ = parse(line);
});
