//! Routes and delivery actors end to end: LMTP to an in-process LMTP server (TCP and Unix socket)
//! with per-recipient replies, Maildir delivery, the example webhook actor with temporary and
//! permanent failures, and a panicking custom actor restarted while mail keeps flowing.

mod common;

#[path = "../examples/webhook/actor.rs"]
#[allow(dead_code)]
mod webhook;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use common::*;
use mailroot::actors::delivery::{Deliver, DeliveryReport, Outcome};
use mailroot::daemon::{Daemon, Running};

fn send(addr: std::net::SocketAddr, to: &[&str], subject: &str) -> u64 {
    let mut c = Client::ready(addr, "client.test");
    let r = c.transaction("sender@example.test", to, format!("Subject: {subject}\r\n\r\nbody\r\n").as_bytes());
    assert_eq!(r.code, 250, "{r:?}");
    r.queue_id().unwrap()
}

/// The NDR in Drop that mentions `needle`.
fn ndr_about(dir: &Path, needle: &str) -> String {
    wait_for(&format!("an NDR about {needle}"), Duration::from_secs(15), || {
        drop_files(dir).into_iter().find_map(|p| {
            let text = String::from_utf8_lossy(&std::fs::read(p).ok()?).into_owned();
            (text.contains("x-receiver: sender@example.test") && text.contains(needle)).then_some(text)
        })
    })
}

// --- LMTP -------------------------------------------------------------------------------------

#[derive(Default)]
struct LmtpLog {
    /// (recipient, message) per final 250.
    delivered: Vec<(String, Vec<u8>)>,
    lhlo: Vec<String>,
    /// Hang up after each message's replies (as a server that drops idle clients).
    hang_up: bool,
    connections: usize,
    /// QUITs received.
    quits: usize,
    /// RCPT commands received (deliveries and checks).
    rcpts_seen: usize,
    /// Connections that ended (QUIT or the client closing).
    closed: usize,
}

/// An LMTP server: `bad…` refused at RCPT (550), `full…` refused after DATA (452), everyone
/// else gets 250 after DATA — one reply per accepted recipient, as RFC 2033 has it.
fn lmtp_session(stream: impl Read + Write, log: Arc<Mutex<LmtpLog>>) {
    let mut stream = BufReader::new(stream);
    let say = |s: &mut BufReader<_>, text: &str| {
        let w: &mut dyn Write = s.get_mut();
        let _ = w.write_all(text.as_bytes());
    };
    say(&mut stream, "220 lmtp.test LMTP ready\r\n");
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).unwrap_or(0) == 0 {
            log.lock().unwrap().closed += 1;
            return;
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        if upper == "RSET" {
            rcpts.clear();
            say(&mut stream, "250 2.0.0 OK\r\n");
        } else if upper.starts_with("LHLO ") {
            log.lock().unwrap().lhlo.push(cmd[5..].to_string());
            say(&mut stream, "250-lmtp.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n");
        } else if upper.starts_with("MAIL FROM:") {
            rcpts.clear();
            say(&mut stream, "250 2.1.0 OK\r\n");
        } else if upper.starts_with("RCPT TO:") {
            log.lock().unwrap().rcpts_seen += 1;
            let addr = cmd[8..].trim_matches(['<', '>']).to_string();
            if addr.starts_with("bad") {
                say(&mut stream, "550 5.1.1 No such mailbox\r\n");
            } else {
                rcpts.push(addr);
                say(&mut stream, "250 2.1.5 OK\r\n");
            }
        } else if upper == "DATA" {
            say(&mut stream, "354 go ahead\r\n");
            let mut data = Vec::new();
            loop {
                let mut l = Vec::new();
                if stream.read_until(b'\n', &mut l).unwrap_or(0) == 0 {
                    return;
                }
                if l == b".\r\n" {
                    break;
                }
                data.extend_from_slice(&l);
            }
            for r in &rcpts {
                if r.starts_with("full") {
                    say(&mut stream, &format!("452 4.2.2 <{r}> Mailbox full\r\n"));
                } else {
                    log.lock().unwrap().delivered.push((r.clone(), data.clone()));
                    say(&mut stream, &format!("250 2.0.0 <{r}> Saved\r\n"));
                }
            }
            if log.lock().unwrap().hang_up {
                return;
            }
        } else if upper == "QUIT" {
            say(&mut stream, "221 2.0.0 bye\r\n");
            let mut log = log.lock().unwrap();
            log.quits += 1;
            log.closed += 1;
            return;
        } else {
            say(&mut stream, "500 5.5.1 what?\r\n");
        }
    }
}

/// Serves LMTP sessions, one thread each, for whatever `accept` yields (TCP or Unix socket).
fn serve_lmtp<S: Read + Write + Send + 'static>(
    mut accept: impl FnMut() -> std::io::Result<S> + Send + 'static,
) -> Arc<Mutex<LmtpLog>> {
    let log = Arc::new(Mutex::new(LmtpLog::default()));
    let l = log.clone();
    std::thread::spawn(move || {
        while let Ok(s) = accept() {
            l.lock().unwrap().connections += 1;
            let l = l.clone();
            std::thread::spawn(move || lmtp_session(s, l));
        }
    });
    log
}

#[test]
fn lmtp_per_recipient_replies() {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log = serve_lmtp(move || listener.accept().map(|(s, _)| s));
    let log_handle = log.clone();
    // Recipients are not checked at RCPT here: this is about the replies at delivery.
    let extra = format!(
        "[routes]\n\"mbox.test\" = \"lmtp\"\n[lmtp]\naddress = \"{addr}\"\nverify_recipients = false\n\
         [queue]\nretry_intervals = [\"1h\"]\n"
    );
    let running = start(config(dir.path(), &extra));
    let smtp = running.smtp_addrs[0];
    send(smtp, &["ok1@mbox.test", "bad@mbox.test", "full@mbox.test", "ok2@mbox.test"], "lmtp");
    ndr_about(dir.path(), "bad@mbox.test");
    wait_metric(&running, "mailroot_deliveries_total{route=\"lmtp\",result=\"temporary\"}", |v| v == 1.0);
    assert_eq!(metric(&running, "mailroot_deliveries_total{route=\"lmtp\",result=\"delivered\"}"), 2.0);
    assert_eq!(metric(&running, "mailroot_deliveries_total{route=\"lmtp\",result=\"permanent\"}"), 1.0);
    let log = log.lock().unwrap();
    let got: Vec<&str> = log.delivered.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(got, vec!["ok1@mbox.test", "ok2@mbox.test"]);
    assert!(String::from_utf8_lossy(&log.delivered[0].1).contains("Subject: lmtp"));
    assert_eq!(log.lhlo, vec![HOST.to_string()]);
    drop(log);

    // The connection is kept and carries the next messages: one connection, one LHLO.
    for i in 0..3 {
        send(smtp, &[&format!("again{i}@mbox.test")], "reuse");
        wait_metric(&running, "mailroot_deliveries_total{route=\"lmtp\",result=\"delivered\"}", |v| {
            v == 3.0 + i as f64
        });
    }
    let l = log_of(&log_handle);
    assert_eq!((l.connections, l.lhlo.len()), (1, 1));
    drop(l);
    // A server that hangs up on kept connections: the next message fails on the kept one before
    // MAIL is accepted, goes again on a new connection, and arrives once.
    log_of(&log_handle).hang_up = true;
    send(smtp, &["x1@mbox.test"], "after a hang-up");
    send(smtp, &["x2@mbox.test"], "after another");
    wait_metric(&running, "mailroot_deliveries_total{route=\"lmtp\",result=\"delivered\"}", |v| v == 7.0);
    let l = log_of(&log_handle);
    assert_eq!(l.delivered.iter().filter(|(r, _)| r.starts_with('x')).count(), 2);
    // x1 went over the kept connection (then hung up on), x2 found it closed and opened one.
    assert_eq!(l.connections, 2, "one new connection after the hang-up");
    assert_eq!(metric(&running, "mailroot_deliveries_total{route=\"lmtp\",result=\"temporary\"}"), 1.0);
    running.stop();
}

fn log_of(log: &Arc<Mutex<LmtpLog>>) -> std::sync::MutexGuard<'_, LmtpLog> {
    log.lock().unwrap()
}

#[test]
fn lmtp_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lmtp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let log = serve_lmtp(move || listener.accept().map(|(s, _)| s));
    let extra = format!("[routes]\n\"*.mbox.test\" = \"lmtp\"\n[lmtp]\naddress = \"unix:{}\"\n", path.display());
    let running = start(config(dir.path(), &extra));
    send(running.smtp_addrs[0], &["u@a.mbox.test"], "over unix");
    wait_metric(&running, "mailroot_deliveries_total{route=\"lmtp\",result=\"delivered\"}", |v| v == 1.0);
    assert_eq!(log.lock().unwrap().delivered[0].0, "u@a.mbox.test");
    running.stop();
}

// --- Maildir ----------------------------------------------------------------------------------

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn maildir_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let boxes = dir.path().join("boxes");
    let extra = format!(
        "[routes]\n\"box.test\" = \"maildir\"\n\"blocked.test\" = \"maildir\"\n\
         [maildir]\npath = \"{}/{{domain}}/{{user}}/Maildir\"\n[queue]\nretry_intervals = [\"1h\"]\n",
        boxes.display()
    );
    let running = start(config(dir.path(), &extra));
    let smtp = running.smtp_addrs[0];
    // A folder that cannot be created (a file is in the way) is the operator's to fix: the
    // message waits, it does not bounce.
    std::fs::create_dir_all(&boxes).unwrap();
    std::fs::write(boxes.join("blocked.test"), b"not a folder").unwrap();
    send(smtp, &["someone@blocked.test"], "blocked");
    wait_metric(&running, "mailroot_deliveries_total{route=\"maildir\",result=\"temporary\"}", |v| v == 1.0);
    assert_eq!(metric(&running, "mailroot_queue_messages"), 1.0);
    send(smtp, &["Alice@box.test", "bob@box.test"], "first");
    send(smtp, &["alice@box.test"], "second");
    wait_metric(&running, "mailroot_deliveries_total{route=\"maildir\",result=\"delivered\"}", |v| v == 3.0);
    assert_eq!(metric(&running, "mailroot_deliveries_total{route=\"maildir\",result=\"permanent\"}"), 0.0);
    let alice = boxes.join("box.test/alice/Maildir");
    let new = files(&alice.join("new"));
    assert_eq!(new.len(), 2, "{new:?}");
    assert_ne!(new[0], new[1]);
    assert!(new.iter().all(|n| n.contains(&format!(".{HOST},S="))), "{new:?}");
    assert!(files(&alice.join("tmp")).is_empty());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(alice.join("new").join(&new[0])).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mailbox files are private");
    assert!(alice.join("cur").is_dir());
    let texts: Vec<String> =
        new.iter().map(|n| String::from_utf8(std::fs::read(alice.join("new").join(n)).unwrap()).unwrap()).collect();
    assert!(texts.iter().all(|t| t.starts_with("Return-Path: <sender@example.test>\r\nDelivered-To: ")), "{texts:?}");
    assert!(texts.iter().any(|t| t.contains("Subject: second")));
    let size: usize = new[0].rsplit("S=").next().unwrap().parse().unwrap();
    assert_eq!(size, std::fs::metadata(alice.join("new").join(&new[0])).unwrap().len() as usize);
    assert_eq!(files(&boxes.join("box.test/bob/Maildir/new")).len(), 1);

    // An address that would leave the template's folder is refused for good; nothing written.
    let mut c = Client::ready(smtp, "client.test");
    let r = c.cmd("MAIL FROM:<sender@example.test>");
    assert_eq!(r.code, 250);
    // Quoted local parts may hold `/` (RFC 5321), so SMTP accepts it; the Maildir actor refuses.
    assert_eq!(c.cmd("RCPT TO:<\"../../escape\"@box.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: escape\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.read_reply().unwrap().code, 250);
    let ndr = ndr_about(dir.path(), "escape");
    assert!(ndr.contains("5.1.3"), "{ndr}");
    assert!(!dir.path().join("escape").exists() && !boxes.join("escape").exists());
    running.stop();
}

// --- The example webhook actor ----------------------------------------------------------------

/// An HTTP endpoint: 503 the first time it sees a `temp…` recipient, 400 for `perm…`, else 200.
fn webhook_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mail", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        let temp_failures = AtomicUsize::new(0);
        for stream in listener.incoming().flatten() {
            let mut r = BufReader::new(stream);
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
            }
            let mut body = vec![0; length];
            let _ = r.read_exact(&mut body);
            let status = if head.contains("temp@") && temp_failures.fetch_add(1, Ordering::SeqCst) == 0 {
                503
            } else if head.contains("perm@") {
                400
            } else {
                s.lock().unwrap().push(format!("{head}\r\n{}", String::from_utf8_lossy(&body)));
                200
            };
            let _ = r.get_mut().write_all(format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes());
        }
    });
    (url, seen)
}

#[test]
fn example_webhook_actor_with_temporary_and_permanent_failures() {
    let dir = tempfile::tempdir().unwrap();
    let (url, seen) = webhook_server();
    let endpoint = webhook::Endpoint::parse(&url).unwrap();
    let c = config(dir.path(), "[routes]\n\"hook.test\" = \"webhook\"\n[queue]\nretry_intervals = [\"1s\"]\n");
    let running = Daemon::builder()
        .config(c)
        .route_actor("webhook", move || webhook::Webhook::new(endpoint.clone(), Duration::from_secs(10)))
        .start()
        .unwrap();
    let smtp = running.smtp_addrs[0];
    let ok = send(smtp, &["ok@hook.test"], "ok");
    send(smtp, &["temp@hook.test"], "temporary");
    send(smtp, &["perm@hook.test"], "permanent");
    // Permanent: an NDR to the sender, as from any built-in actor.
    let ndr = ndr_about(dir.path(), "perm@hook.test");
    assert!(ndr.contains("HTTP 400"), "{ndr}");
    // Temporary: retried on the queue's schedule, then delivered.
    wait_metric(&running, "mailroot_deliveries_total{route=\"webhook\",result=\"delivered\"}", |v| v == 2.0);
    assert_eq!(metric(&running, "mailroot_deliveries_total{route=\"webhook\",result=\"temporary\"}"), 1.0);
    assert!(metric(&running, "mailroot_delivery_retries_total") >= 1.0);
    let seen = seen.lock().unwrap();
    assert!(seen.iter().any(|r| r.contains(&format!("X-Mailroot-Queue-Id: {ok}")) && r.contains("Subject: ok")));
    assert!(seen.iter().any(|r| r.contains("X-Mailroot-Recipients: temp@hook.test")));
    assert_eq!(metric(&running, "mailroot_actor_live{actor=\"webhook\"}"), 1.0);
    running.stop();
}

#[test]
fn webhook_status_classification() {
    let cases = [(200, "delivered"), (204, "delivered"), (400, "permanent"), (404, "permanent"), (408, "temporary")];
    let more = [(429, "temporary"), (500, "temporary"), (503, "temporary"), (302, "permanent")];
    for (status, want) in cases.into_iter().chain(more) {
        assert_eq!(webhook::classify(status).label(), want, "{status}");
    }
    assert!(webhook::Endpoint::parse("https://x/").is_err());
    let e = webhook::Endpoint::parse("http://h:81").unwrap();
    assert_eq!((e.host.as_str(), e.port, e.path.as_str()), ("h", 81, "/"));
}

// --- Supervision ------------------------------------------------------------------------------

/// A custom actor that panics on `boom…` recipients while `panics_left` > 0.
struct Crashy {
    panics_left: Arc<AtomicUsize>,
    delivered: Arc<Mutex<Vec<String>>>,
}

impl Actor for Crashy {
    type Context = Context<Self>;
}

impl Handler<Deliver> for Crashy {
    type Result = DeliveryReport;

    fn handle(&mut self, req: Deliver, _ctx: &mut Self::Context) -> DeliveryReport {
        for r in &req.recipients {
            if r.address.starts_with("boom")
                && self.panics_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
            {
                panic!("a bug in a custom delivery actor");
            }
        }
        self.delivered.lock().unwrap().extend(req.recipients.iter().map(|r| r.address.clone()));
        DeliveryReport::all(req.indices(), Outcome::new(250, "2.0.0", "taken"))
    }
}

fn crashy_daemon(dir: &Path, panics: usize) -> (Running, Arc<Mutex<Vec<String>>>) {
    let panics_left = Arc::new(AtomicUsize::new(panics));
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let d = delivered.clone();
    let c = config(dir, "[routes]\n\"crash.test\" = \"crashy\"\n[queue]\nretry_intervals = [\"1s\"]\n");
    let running = Daemon::builder()
        .config(c)
        .route_actor("crashy", move || Crashy { panics_left: panics_left.clone(), delivered: d.clone() })
        .start()
        .unwrap();
    (running, delivered)
}

#[test]
fn a_panicking_actor_is_restarted_and_mail_keeps_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let (running, delivered) = crashy_daemon(dir.path(), 2);
    let smtp = running.smtp_addrs[0];
    send(smtp, &["boom@crash.test"], "boom");
    wait_metric(&running, "mailroot_actor_restarts_total{actor=\"crashy\"}", |v| v >= 1.0);
    // While it is being restarted and panics again, other mail goes through: to the same actor
    // and to local Drop.
    let mut local = Vec::new();
    for i in 0..5 {
        send(smtp, &[&format!("fine{i}@crash.test")], "fine");
        local.push(send(smtp, &["local@example.test"], "local"));
    }
    for id in local {
        drop_file(dir.path(), id);
    }
    wait_for("everything delivered", Duration::from_secs(20), || {
        let d = delivered.lock().unwrap();
        (d.len() == 6 && d.contains(&"boom@crash.test".to_string())).then_some(())
    });
    assert_eq!(metric(&running, "mailroot_actor_restarts_total{actor=\"crashy\"}"), 2.0);
    assert_eq!(metric(&running, "mailroot_actor_live{actor=\"crashy\"}"), 1.0);
    // The attempts a panic interrupted were temporary failures, retried on schedule.
    assert!(metric(&running, "mailroot_deliveries_total{route=\"crashy\",result=\"temporary\"}") >= 2.0);
    assert_eq!(metric(&running, "mailroot_deliveries_total{route=\"crashy\",result=\"permanent\"}"), 0.0);
    running.stop();
}

#[test]
fn unknown_route_names_and_reserved_names_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), "[routes]\n\"x.test\" = \"nosuch\"\n");
    let e = mailroot::daemon::start(c, Default::default()).err().expect("refused");
    assert!(e.to_string().contains("nosuch") && e.to_string().contains("built in"), "{e}");
    let c = config(dir.path(), "");
    let e = Daemon::builder()
        .config(c)
        .route_actor("drop", || Crashy { panics_left: Arc::default(), delivered: Arc::default() })
        .start()
        .err()
        .expect("refused");
    assert!(e.to_string().contains("built-in"), "{e}");
}

/// The built-in actors under their supervisors, through debug-build fault injection: the Queue
/// and Pickup come back and mail keeps flowing; a dead Listener makes the daemon stop itself
/// with a failure status (for systemd to restart it).
#[cfg(debug_assertions)]
#[test]
fn the_queue_and_pickup_are_restarted_and_a_dead_listener_stops_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), ""));
    let smtp = running.smtp_addrs[0];
    running.inject_panic("queue");
    wait_metric(&running, "mailroot_actor_restarts_total{actor=\"queue\"}", |v| v == 1.0);
    drop_file(dir.path(), send(smtp, &["after-queue@example.test"], "queue restarted"));

    running.inject_panic("pickup");
    wait_metric(&running, "mailroot_actor_restarts_total{actor=\"pickup\"}", |v| v == 1.0);
    std::fs::write(
        dir.path().join("Pickup").join("after.eml"),
        "x-sender: s@example.test\r\nx-receiver: p@example.test\r\nSubject: pickup restarted\r\n\r\nx\r\n",
    )
    .unwrap();
    wait_metric(&running, "mailroot_pickup_files_total{result=\"queued\"}", |v| v == 1.0);
    assert_eq!(metric(&running, "mailroot_actor_live{actor=\"pickup\"}"), 1.0);
    assert_eq!(metric(&running, "mailroot_actor_live{actor=\"queue\"}"), 1.0);

    running.inject_panic("listener");
    assert!(!running.wait(), "a dead listener stops the daemon with a failure status");
}

/// A kept LMTP connection is closed with QUIT once idle for `idle_timeout`, and at stop: each
/// one holds a process on the server (Dovecot's `lmtp`).
#[test]
fn idle_lmtp_connections_are_closed_with_quit() {
    for (idle, stop_first) in [("1s", false), ("1h", true)] {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let log = serve_lmtp(move || listener.accept().map(|(s, _)| s));
        let extra =
            format!("[routes]\n\"mbox.test\" = \"lmtp\"\n[lmtp]\naddress = \"{addr}\"\nidle_timeout = \"{idle}\"\nverify_recipients = false\n");
        let running = start(config(dir.path(), &extra));
        send(running.smtp_addrs[0], &["ok@mbox.test"], "idle");
        wait_for("delivery", Duration::from_secs(10), || (log.lock().unwrap().delivered.len() == 1).then_some(()));
        if stop_first {
            assert_eq!(log.lock().unwrap().closed, 0, "kept for the next message");
            running.stop();
        }
        wait_for(&format!("QUIT (idle {idle})"), Duration::from_secs(10), || {
            (log.lock().unwrap().quits == 1).then_some(())
        });
        let l = log.lock().unwrap();
        assert_eq!((l.connections, l.closed), (1, 1), "idle {idle}");
    }
}

/// Recipients of an LMTP-routed domain are checked with the LMTP server at RCPT (on by
/// default): an unknown user gets the server's 550 at once, so nothing is accepted and bounced
/// later to a sender who may be forged; answers are cached; a server that does not answer in
/// time gives 451 4.4.3, never 250.
#[test]
fn lmtp_recipients_are_checked_at_rcpt() {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log = serve_lmtp(move || listener.accept().map(|(s, _)| s));
    let extra = format!("[routes]\n\"mbox.test\" = \"lmtp\"\n[lmtp]\naddress = \"{addr}\"\n");
    let running = start(config(dir.path(), &extra));
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    assert_eq!(c.cmd("MAIL FROM:<forged@remote.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<ok@mbox.test>").code, 250);
    let r = c.cmd("RCPT TO:<bad@mbox.test>");
    assert_eq!((r.code, r.text.get(..5)), (550, Some("5.1.1")), "{r:?}");
    assert!(r.text.contains("No such mailbox"), "the server's own words: {r:?}");
    let seen = log_of(&log).rcpts_seen;
    // Asked again: the cached answer, the server is not asked.
    assert_eq!(c.cmd("RCPT TO:<bad@mbox.test>").code, 550);
    assert_eq!(log_of(&log).rcpts_seen, seen);
    // Domains not routed to LMTP are not checked.
    assert_eq!(c.cmd("RCPT TO:<anyone@example.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: checked\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.read_reply().unwrap().code, 250);
    wait_for("delivery", Duration::from_secs(10), || (!log_of(&log).delivered.is_empty()).then_some(()));
    // The cached answer counts too: two RCPTs refused after a check.
    assert_eq!(metric(&running, "mailroot_recipient_checks_total{result=\"unknown\"}"), 2.0);
    assert_eq!(metric(&running, "mailroot_recipient_checks_total{result=\"exists\"}"), 1.0);
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"unknown_recipient\"}"), 2.0);
    // No NDR was made: the sender (maybe forged) hears nothing from us later.
    std::thread::sleep(Duration::from_millis(300));
    assert!(drop_files(dir.path())
        .iter()
        .all(|p| !std::fs::read_to_string(p).unwrap_or_default().contains("Undelivered")));
    running.stop();

    // A server that accepts connections and says nothing: 451 4.4.3 within verify_timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept() {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let extra =
        format!("[routes]\n\"mbox.test\" = \"lmtp\"\n[lmtp]\naddress = \"{silent_addr}\"\nverify_timeout = \"1s\"\n");
    let running = start(config(dir.path(), &extra));
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    assert_eq!(c.cmd("MAIL FROM:<s@remote.test>").code, 250);
    let started = std::time::Instant::now();
    let r = c.cmd("RCPT TO:<who@mbox.test>");
    assert_eq!((r.code, r.text.get(..5)), (451, Some("4.4.3")), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "bounded by verify_timeout");
    running.stop();
}

/// Recipient maps and LMTP checks together, and a reload: the map refuses unknown users without
/// asking the server; users the map knows are still checked with the LMTP server (the map says
/// who may exist, the server whether the mailbox is there); a user added to the map is taken at
/// the next RCPT after `reload`.
#[test]
fn recipient_maps_with_lmtp_checks_and_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log = serve_lmtp(move || listener.accept().map(|(s, _)| s));
    let path = dir.path().join("mailroot.toml");
    let write = |users: &str| {
        let text = format!(
            "[server]\nhostname = \"{HOST}\"\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"1s\"\n\
             [mailroot]\npath = \"spool\"\n[domains]\nlocal = [\"example.test\", \"mbox.test\"]\n[admin]\nlisten = \"\"\n\
             [routes]\n\"mbox.test\" = \"lmtp\"\n[lmtp]\naddress = \"{addr}\"\n\
             [recipients.\"mbox.test\"]\nusers = [{users}]\n"
        );
        std::fs::write(&path, text).unwrap();
    };
    write("\"ok\", \"bad\"");
    let loaded = mailroot::config::Config::load(Some(&path)).unwrap();
    let options = mailroot::daemon::StartOptions { handle_signals: false, config_path: Some(path.clone()) };
    let running = mailroot::daemon::start(loaded.config, options).unwrap();
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    assert_eq!(c.cmd("MAIL FROM:<s@remote.test>").code, 250);
    let r = c.cmd("RCPT TO:<nobody@mbox.test>");
    assert_eq!(r.code, 550, "{r:?}");
    assert_eq!(log_of(&log).rcpts_seen, 0, "the map answered; the server was not asked");
    let r = c.cmd("RCPT TO:<bad@mbox.test>");
    assert!(r.code == 550 && r.text.contains("No such mailbox"), "the server's answer: {r:?}");
    assert_eq!(c.cmd("RCPT TO:<ok@mbox.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<newbie@mbox.test>").code, 550);
    write("\"ok\", \"bad\", \"newbie\"");
    let changed = running.reload().unwrap();
    assert!(changed.contains(&"recipients".to_string()), "{changed:?}");
    assert_eq!(c.cmd("RCPT TO:<newbie@mbox.test>").code, 550, "a session keeps the settings it began with");
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    assert_eq!(c.cmd("MAIL FROM:<s@remote.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<newbie@mbox.test>").code, 250);
    running.stop();
}
