//! Fuzz target: the DATA receiver and the BDAT (raw) receiver. The first byte picks the split
//! points; whatever the input, the receiver never panics, never keeps more than its limit, and
//! gives the same outcome however the input is split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailroot_actors::protocol::data::{DataOutcome, DataReceiver};

const LIMIT: usize = 4096;

fn run(raw: bool, input: &[u8], step: usize) -> (usize, Option<DataOutcome>) {
    let mut rx = if raw { DataReceiver::raw(LIMIT) } else { DataReceiver::new(LIMIT) };
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

fuzz_target!(|input: &[u8]| {
    let Some((&first, rest)) = input.split_first() else { return };
    for raw in [false, true] {
        let whole = run(raw, rest, rest.len());
        let split = run(raw, rest, usize::from(first % 17) + 1);
        assert_eq!(whole, split, "the outcome must not depend on how reads split");
        if let (_, Some(DataOutcome::Message { body, .. })) = &whole {
            assert!(body.len() <= LIMIT);
            // Only CRLF line ends survive.
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
});
