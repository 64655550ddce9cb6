//! The crash tests: the real `mailroot` binary as a child process takes mail from concurrent
//! clients and is SIGKILLed at a random moment; after a restart every message that got a 250 must
//! reach its destination — Drop for local mail, an SMTP peer for relayed mail. Duplicates are
//! counted and reported.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;

// On each store (tests/common/pg.rs).
both_stores!(every_acknowledged_message_survives_sigkill, every_acknowledged_relayed_message_survives_sigkill);

fn tokens_in_drop(dir: &Path) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for f in drop_files(dir) {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        for line in text.lines() {
            if let Some(tok) = line.strip_prefix("Subject: ") {
                *seen.entry(tok.to_string()).or_insert(0) += 1;
            }
        }
    }
    seen
}

/// Eight clients send to `rcpt` until the daemon is SIGKILLed at a random moment; returns the
/// tokens (Subject lines) of the messages that got a 250, and when the kill came.
fn load_until_killed(child: &mut Child, addr: SocketAddr, rcpt: &'static str) -> (Vec<String>, Duration) {
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let clients: Vec<_> = (0..8)
        .map(|t| {
            let acked = acked.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                if c.read_reply().is_none() {
                    return;
                }
                c.send(b"EHLO crash.test\r\n");
                if c.read_reply().is_none() {
                    return;
                }
                for n in 0.. {
                    let token = format!("crash-{t}-{n}");
                    let msg = format!(
                        "MAIL FROM:<load@example.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\nSubject: {token}\r\n\r\nbody\r\n.\r\n"
                    );
                    c.send(msg.as_bytes());
                    let mut last = None;
                    for _ in 0..4 {
                        last = c.read_reply();
                        if last.is_none() {
                            return;
                        }
                    }
                    if last.is_some_and(|r| r.code == 250) {
                        acked.lock().unwrap().push(token);
                    }
                }
            })
        })
        .collect();
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().subsec_nanos();
    let delay = Duration::from_millis(300 + (nanos % 1200) as u64);
    // The random moment counts from the first acknowledgement, so a slow start (a busy machine,
    // a disk still busy with earlier deletions) never leaves nothing to check.
    let first = std::time::Instant::now();
    while acked.lock().unwrap().is_empty() && first.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(delay);
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    for c in clients {
        let _ = c.join();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty(), "some messages were accepted before the kill");
    (acked, delay)
}

/// Waits until every acknowledged token is in `seen()`; returns the final counts.
fn wait_all_arrived(
    child: &mut Child,
    acked: &[String],
    delay: Duration,
    seen: impl Fn() -> HashMap<String, usize>,
) -> HashMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = seen();
        let missing = acked.iter().filter(|t| !s.contains_key(*t)).count();
        if missing == 0 {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{missing} of {} acknowledged messages lost after SIGKILL at {delay:?}", acked.len());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let config = dir.join("mailroot.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhostname = \"mx.example.test\"\nlisten = [\"127.0.0.1:0\"]\n[mailroot]\npath = \"mailroot\"\n[domains]\nlocal = [\"example.test\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n{extra}\n{}",
            common::pg::thread_toml("node1")
        ),
    )
    .unwrap();
    config
}

fn every_acknowledged_message_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mailroot");
    let config = write_config(dir.path(), "");
    let (mut child, addr) = spawn_daemon(&config);
    let (acked, delay) = load_until_killed(&mut child, addr, "sink@example.test");
    let (mut child, _addr) = spawn_daemon(&config);
    let seen = wait_all_arrived(&mut child, &acked, delay, || tokens_in_drop(&root));
    let duplicates = seen.values().filter(|&&n| n > 1).count();
    let unacked_but_delivered = seen.keys().filter(|t| !acked.contains(t)).count();
    println!(
        "crash test: killed after {delay:?}; {} acknowledged, all in Drop; {duplicates} arrived twice; \
         {unacked_but_delivered} delivered without an acknowledgement (killed between sync and reply)",
        acked.len()
    );
    assert_eq!(duplicates, 0, "the Drop file is named by queue ID, so a redelivery replaces it");
    let _ = child.kill();
    let _ = child.wait();
}

/// The same for relayed mail: acknowledged messages reach the next hop after the restart. A
/// message the peer took just before the kill, whose result was not yet recorded, is sent again
/// (at least once, never lost).
fn every_acknowledged_relayed_message_survives_sigkill() {
    let peer = common::peer::Peer::start("127.0.0.1", 0, common::peer::Behavior::default());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("[delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[127.0.0.1]:{}\"\n", peer.addr.port()),
    );
    let (mut child, addr) = spawn_daemon(&config);
    let (acked, delay) = load_until_killed(&mut child, addr, "sink@relay.test");
    let (mut child, _addr) = spawn_daemon(&config);
    let seen = wait_all_arrived(&mut child, &acked, delay, || {
        let mut seen = HashMap::new();
        for r in peer.received() {
            for line in String::from_utf8_lossy(&r.data).lines() {
                if let Some(tok) = line.strip_prefix("Subject: ") {
                    *seen.entry(tok.to_string()).or_insert(0) += 1;
                }
            }
        }
        seen
    });
    let duplicates = seen.values().filter(|&&n| n > 1).count();
    println!(
        "relay crash test: killed after {delay:?}; {} acknowledged, all at the peer; {duplicates} sent twice",
        acked.len()
    );
    let _ = child.kill();
    let _ = child.wait();
}
