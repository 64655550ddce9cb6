//! A full disk, for real: the Mailroot on a small tmpfs that the test fills. Mail is refused
//! (452 4.3.1, nothing acknowledged is lost), status says why, and once space is back mail flows
//! again within 30 s without a restart: through the free-space reserve when it is kept, and by
//! reopening the queue store when sled itself met the full disk.
//!
//! Needs root to mount tmpfs (CI runs as root). Where mount is refused, the tests fail and say
//! why rather than pass without having tried.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::peer::{Behavior, Peer};
use common::*;
use mailroot::client::AdminClient;
use mailroot::daemon::Running;

/// A tmpfs of `size` mounted on a fresh folder; unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}; this test needs root and mount(8)"));
        assert!(
            out.status.success(),
            "mounting a tmpfs was refused ({}): this test needs root (CI runs as root)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Writes a file until the filesystem has at most `leave` bytes free (0: until it is full).
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0x55u8; 64 * 1024];
    loop {
        let free = mailroot_actors::health::free_space(dir).expect("statvfs");
        if free <= leave {
            break;
        }
        let n = (free - leave).min(chunk.len() as u64) as usize;
        match f.write_all(&chunk[..n]) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    let _ = f.sync_all();
    path
}

fn operator(running: &Running) -> AdminClient {
    AdminClient {
        address: running.admin_addr.expect("admin API").to_string(),
        token: std::fs::read_to_string(running.folders.root.join("admin.token")).expect("token"),
        timeout: Duration::from_secs(10),
    }
}

fn store_error(running: &Running) -> Option<String> {
    let r = operator(running).request("GET", "/api/status").expect("status");
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    v["queue"]["store_error"].as_str().map(str::to_string)
}

/// One transaction on a new connection: MAIL's reply if refused, else the final reply.
fn try_send(addr: std::net::SocketAddr, subject: &str) -> Reply {
    let mut c = Client::ready(addr, "client.test");
    let r = c.cmd("MAIL FROM:<s@client.test>");
    if r.code != 250 {
        return r;
    }
    assert_eq!(c.cmd("RCPT TO:<p@example.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(format!("Subject: {subject}\r\n\r\n{}.\r\n", "0123456789 abcdefghij\r\n".repeat(100)).as_bytes());
    c.read_reply().expect("end of data reply")
}

/// sled itself meets the full disk (no reserve): the write error sticks to its handles, so
/// mail would be refused until a restart if the Queue did not reopen the store.
#[test]
fn the_store_is_reopened_once_space_is_back() {
    let fs = Tmpfs::mount("32m");
    let root = fs.path().join("mailroot");
    // A smart host that defers `t4…` recipients: one message is retried every second.
    let peer = Peer::start("127.43.0.1", 0, Behavior::default());
    let extra = format!(
        "[queue]\nmin_free_space = 0\nretry_intervals = [\"1s\"]\n[delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[{}]:{}\"\n",
        peer.addr.ip(),
        peer.addr.port()
    );
    let running = start(config(&root, &extra));
    let addr = running.smtp_addrs[0];
    let deferred = "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}";

    let before = try_send(addr, "before");
    assert_eq!(before.code, 250, "{before:?}");
    drop_file(&root, before.queue_id().expect("id"));
    let mut c = Client::ready(addr, "client.test");
    let r = c.transaction("s@client.test", &["t4@remote.test"], b"Subject: retried\r\n\r\nx\r\n");
    assert_eq!(r.code, 250, "{r:?}");
    drop(c);
    wait_metric(&running, deferred, |v| v >= 2.0);

    let filler = fill(fs.path(), 0);
    // sled may still have room inside the files it already has: what it takes is durable and
    // acknowledged honestly; once it needs more, the refusals come.
    let refused = wait_for("a refusal", Duration::from_secs(20), || {
        let r = try_send(addr, "while full");
        (r.code != 250).then_some(r)
    });
    assert_eq!(refused.code, 452, "a full disk is 452 4.3.1, never 250: {refused:?}");
    assert!(refused.text.starts_with("4.3.1"), "{refused:?}");
    let why = store_error(&running).expect("status says the store is failing");
    assert!(why.contains("No space left"), "{why}");
    assert_eq!(metric(&running, "mailroot_queue_store_failures_total"), 1.0);
    // While failing, MAIL itself is refused: no message body is read for nothing.
    let mut c = Client::ready(addr, "client.test");
    let r = c.cmd("MAIL FROM:<s@client.test>");
    assert_eq!((r.code, r.text.get(..5)), (452, Some("4.3.1")), "{r:?}");
    drop(c);
    // Nothing is delivered while results cannot be recorded: the retried message is not sent
    // again and again (at most one attempt already under way ends).
    std::thread::sleep(Duration::from_secs(1));
    let attempts = metric(&running, deferred);
    std::thread::sleep(Duration::from_secs(3));
    assert!(metric(&running, deferred) <= attempts + 1.0, "no deliveries while the store is failing");

    std::fs::remove_file(&filler).expect("free the space");
    let freed = Instant::now();
    let after = wait_for("mail to flow again", Duration::from_secs(30), || {
        let r = try_send(addr, "after");
        (r.code == 250).then_some(r)
    });
    eprintln!("mail flowed again {:?} after space came back", freed.elapsed());
    let id = after.queue_id().expect("id");
    let delivered = parse_drop(&drop_file(&root, id));
    assert!(String::from_utf8_lossy(&delivered.message).contains("Subject: after"));
    assert_eq!(store_error(&running), None, "status is healthy again");
    assert!(metric(&running, "mailroot_queue_store_reopens_total") >= 1.0);
    // Retrying goes on once the store writes again.
    let now = metric(&running, deferred);
    wait_metric(&running, deferred, |v| v >= now + 2.0);
    running.stop();
}

/// With the reserve kept (the default), the store never meets the full disk: MAIL is refused
/// with 452 4.3.1 below it, status says why, and mail flows as soon as space is back.
#[test]
fn below_the_free_space_reserve_mail_is_refused_at_mail() {
    let fs = Tmpfs::mount("32m");
    let root = fs.path().join("mailroot");
    let reserve = 8 * 1024 * 1024;
    let running = start(config(&root, &format!("[queue]\nmin_free_space = {reserve}\n")));
    let addr = running.smtp_addrs[0];
    assert_eq!(try_send(addr, "before").code, 250);

    let filler = fill(fs.path(), reserve - 1024 * 1024);
    // The free space is read at most once a second.
    let refused = wait_for("MAIL to be refused", Duration::from_secs(5), || {
        let r = try_send(addr, "low");
        (r.code != 250).then_some(r)
    });
    assert_eq!((refused.code, refused.text.get(..5)), (452, Some("4.3.1")), "{refused:?}");
    let why = store_error(&running).expect("status says why");
    assert!(why.contains("min_free_space"), "{why}");
    assert_eq!(metric(&running, "mailroot_queue_store_failures_total"), 0.0, "the store never failed");

    std::fs::remove_file(&filler).expect("free the space");
    let after = wait_for("mail to flow again", Duration::from_secs(5), || {
        let r = try_send(addr, "after");
        (r.code == 250).then_some(r)
    });
    drop_file(&root, after.queue_id().expect("id"));
    assert_eq!(store_error(&running), None);
    running.stop();
}
