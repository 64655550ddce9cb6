//! Replays the fuzz corpus kept in `fuzz/corpus/<target>/` through the same checks the fuzz
//! targets run, so every input that once found new coverage (and any crash, once fixed) is a
//! regression test in every `cargo test`.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let input = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| check(&input));
        assert!(result.is_ok(), "{} fails", path.display());
        n += 1;
    }
    assert!(n > 0, "{} is empty", dir.display());
}

#[test]
fn command_corpus() {
    replay("command", mailroot_protocol::fuzzing::command);
}

#[test]
fn data_corpus() {
    replay("data", mailroot_protocol::fuzzing::data);
}

#[test]
fn session_corpus() {
    replay("session", mailroot_protocol::fuzzing::session);
}

#[test]
fn reply_parser_corpus() {
    replay("reply_parser", mailroot_protocol::fuzzing::reply_parser);
}
