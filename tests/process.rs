//! The daemon as operators run it: the real binary as a child process. SIGHUP reloads (a broken
//! file keeps the old configuration), SIGTERM stops in order and a second one at once,
//! systemd's notify protocol, JSON logs, the W3C protocol log, and `mailroot sendmail`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

struct Daemon {
    child: Child,
    smtp: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn spawn(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailroot"));
        cmd.args(["run", "--config"]).arg(config).args(args).env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn mailroot");
        let stderr = child.stderr.take().expect("stderr");
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        let smtp = wait_for("the daemon to listen", Duration::from_secs(30), || {
            log.lock().unwrap().iter().find_map(|l| {
                let rest = l.split("listening addr=").nth(1).or_else(|| l.split("\"addr\":\"").nth(1))?;
                rest.split_whitespace().next()?.trim_end_matches(['"', '}', ',']).split('"').next()?.parse().ok()
            })
        });
        Daemon { child, smtp, log }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args(["-s", sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -s {sig}");
    }

    fn wait_log(&self, what: &str) -> String {
        wait_for(&format!("log line {what:?}"), Duration::from_secs(20), || {
            self.log.lock().unwrap().iter().find(|l| l.contains(what)).cloned()
        })
    }

    fn log_count(&self, what: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains(what)).count()
    }

    fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("mailroot did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `server` goes into the `[server]` table, `extra` after the other tables.
fn write_config(dir: &Path, server: &str, extra: &str) -> PathBuf {
    let path = dir.join("mailroot.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nhostname = \"{HOST}\"\nlisten = [\"127.0.0.1:0\"]\n{server}\n[mailroot]\npath = \"spool\"\n\
             [domains]\nlocal = [\"example.test\"]\n[admin]\nlisten = \"\"\n{extra}"
        ),
    )
    .unwrap();
    path
}

/// RCPT replies for three recipients in one transaction.
fn rcpt_codes(addr: SocketAddr) -> Vec<u16> {
    let mut c = Client::ready(addr, "client.test");
    assert_eq!(c.cmd("MAIL FROM:<s@example.test>").code, 250);
    let codes = (0..3).map(|i| c.cmd(&format!("RCPT TO:<r{i}@example.test>")).code).collect();
    c.cmd("QUIT");
    codes
}

#[test]
fn sighup_reloads_and_a_broken_file_keeps_the_old_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "", "[limits]\nmax_recipients = 2\n");
    let d = Daemon::spawn(&cfg, &[], &[]);
    assert_eq!(rcpt_codes(d.smtp), vec![250, 250, 452]);

    // A broken file: refused with the reason, the old limits stay.
    std::fs::write(&cfg, "[limits]\nmax_recipients = \"lots\"\n").unwrap();
    d.signal("HUP");
    let line = d.wait_log("configuration reload refused");
    assert!(line.contains("mailroot.toml") && line.contains("parse error"), "{line}");
    assert_eq!(rcpt_codes(d.smtp), vec![250, 250, 452]);

    // A good file: applied to new sessions, and the log says what changed.
    write_config(dir.path(), "", "[limits]\nmax_recipients = 5\n[access]\ndeny = [\"127.0.0.99/32\"]\n");
    d.signal("HUP");
    let line = d.wait_log("configuration reloaded");
    assert!(line.contains("limits") && line.contains("access"), "{line}");
    assert_eq!(rcpt_codes(d.smtp), vec![250, 250, 250]);
    let mut denied = Client::connect_from("127.0.0.99", d.smtp);
    assert_eq!(denied.greeting().code, 554);
    // The same through the admin API and `mailroot ctl reload`: the answer says what changed,
    // or why the file was refused (exit status 1).
    write_config(dir.path(), "", "[limits]\nmax_recipients = 5\n[access]\ndeny = [\"127.0.0.99/32\"]\n");
    let text =
        std::fs::read_to_string(&cfg).unwrap().replace("[admin]\nlisten = \"\"", "[admin]\nlisten = \"127.0.0.1:0\"");
    std::fs::write(&cfg, text).unwrap();
    drop(d);
    let d = Daemon::spawn(&cfg, &[], &[]);
    let admin = d.wait_log("admin API started");
    let admin = admin.split("admin=").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    // The token the daemon generated in its Mailroot (the file is broken on purpose below, so
    // the CLI is told the address and token rather than reading them from it).
    let token = std::fs::read_to_string(dir.path().join("spool/admin.token")).unwrap();
    let ctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mailroot"))
            .args(args)
            .args(["--admin", &admin, "--token", &token])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("max_recipients = 5", "max_recipients = 1"))
        .unwrap();
    let (code, out, err) = ctl(&["ctl", "reload"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "reloaded: limits");
    assert_eq!(rcpt_codes(d.smtp), vec![250, 452, 452]);
    std::fs::write(&cfg, "[limits]\nmax_recipients = 0\n").unwrap();
    let (code, _, err) = ctl(&["ctl", "reload"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("limits.max_recipients") && err.contains("422"), "{err}");
    assert_eq!(rcpt_codes(d.smtp), vec![250, 452, 452]);
    write_config(dir.path(), "", "[limits]\nmax_recipients = 5\n[access]\ndeny = [\"127.0.0.99/32\"]\n");
    // Something that needs a restart is named as such.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace("path = \"spool\"", "path = \"elsewhere\"").replace(HOST, "renamed.example.test");
    std::fs::write(&cfg, text).unwrap();
    d.signal("HUP");
    let line = d.wait_log("only applied at the next start");
    assert!(line.contains("mailroot") && line.contains("server.hostname"), "{line}");
    let mut c = Client::connect(d.smtp);
    assert!(c.greeting().text.starts_with(HOST), "the running name stays until a restart");
}

#[test]
fn sigterm_stops_in_order_and_a_second_signal_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "shutdown_grace = \"30s\"", "");

    // One signal, no sessions: exits 0 at once, queue flushed.
    let mut d = Daemon::spawn(&cfg, &[], &[]);
    d.signal("TERM");
    assert_eq!(d.exit_code(Duration::from_secs(10)), Some(0));
    assert!(d.log_count("queue flushed") == 1 && d.log_count("mailroot stopped") == 1);

    // A session in the middle of DATA holds the stop for up to 30 s; a second signal ends it now.
    let mut d = Daemon::spawn(&cfg, &[], &[]);
    let mut c = Client::ready(d.smtp, "client.test");
    c.cmd("MAIL FROM:<s@example.test>");
    c.cmd("RCPT TO:<r@example.test>");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: slow\r\n\r\n");
    d.signal("TERM");
    d.wait_log("stopping");
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.child.try_wait().unwrap().is_none(), "waits for the transaction");
    let t = Instant::now();
    d.signal("TERM");
    assert_eq!(d.exit_code(Duration::from_secs(10)), Some(0));
    assert!(t.elapsed() < Duration::from_secs(5));
    d.wait_log("second stop request");
    assert_eq!(d.log_count("queue flushed"), 1);
}

#[test]
fn systemd_notify_and_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "", "");
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // A 2 s systemd watchdog: WATCHDOG=1 comes every second while the queue answers.
    let mut d = Daemon::spawn(
        &cfg,
        &["--log-format", "json"],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap()), ("WATCHDOG_USEC", "2000000")],
    );
    // Each datagram is newline-separated assignments (sd_notify(3)); the state comes first.
    let recv_all = || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let recv = || recv_all().lines().next().unwrap_or_default().to_string();
    assert_eq!(recv(), "READY=1");
    let next = || loop {
        // Watchdog pings come in between; the state changes must come in order.
        let m = recv();
        if m != "WATCHDOG=1" {
            return m;
        }
    };
    let start = Instant::now();
    let pings = std::iter::from_fn(|| Some(recv())).take_while(|m| m == "WATCHDOG=1").take(2).count();
    assert_eq!(pings, 2, "two watchdog pings");
    assert!(start.elapsed() < Duration::from_secs(5));
    d.signal("HUP");
    let reloading = loop {
        let m = recv_all();
        if !m.starts_with("WATCHDOG=1") {
            break m;
        }
    };
    // With the time, as systemd 253+ wants for Type=notify-reload.
    assert!(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{reloading:?}");
    assert_eq!(next(), "READY=1");
    d.signal("TERM");
    assert_eq!(next(), "STOPPING=1");
    assert_eq!(d.exit_code(Duration::from_secs(10)), Some(0));
    // Every log line is one JSON object with a level and a message.
    let lines = d.log.lock().unwrap().clone();
    assert!(lines.len() >= 4, "{lines:?}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{l}");
    }
    assert!(lines.iter().any(|l| l.contains("\"message\":\"mailroot started\"")));
}

#[test]
fn the_protocol_log_has_one_w3c_line_per_command() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "", "[log]\nprotocol = \"logs/smtp-%Y%m%d.log\"\n");
    let mut d = Daemon::spawn(&cfg, &[], &[]);
    let mut c = Client::ready(d.smtp, "client.test");
    let r = c.transaction("s@example.test", &["r@example.test"], b"Subject: logged\r\n\r\n0123456789\r\n");
    assert_eq!(r.code, 250);
    assert_eq!(c.cmd("NOOP").code, 250);
    assert_eq!(c.cmd("BOGUS command").code, 500);
    assert_eq!(c.cmd("QUIT").code, 221);
    d.signal("TERM");
    assert_eq!(d.exit_code(Duration::from_secs(10)), Some(0));
    let logs: Vec<PathBuf> = std::fs::read_dir(dir.path().join("logs")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(logs.len(), 1);
    let name = logs[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("smtp-20") && name.ends_with(".log") && name.len() == "smtp-20261129.log".len(), "{name}");
    let text = std::fs::read_to_string(&logs[0]).unwrap();
    assert!(text
        .contains("#Fields: date time c-ip s-sitename cs-method cs-uri-stem sc-status sc-bytes cs-bytes time-taken"));
    let lines: Vec<Vec<&str>> = text.lines().filter(|l| !l.starts_with('#')).map(|l| l.split(' ').collect()).collect();
    let methods: Vec<(&str, &str)> = lines.iter().map(|f| (f[4], f[6])).collect();
    assert_eq!(
        methods,
        vec![
            ("EHLO", "250"),
            ("MAIL", "250"),
            ("RCPT", "250"),
            ("DATA", "250"),
            ("NOOP", "250"),
            ("BOGUS", "500"),
            ("QUIT", "221")
        ],
        "{text}"
    );
    for f in &lines {
        assert_eq!(f.len(), 10, "ten fields: {f:?}");
        assert_eq!((f[2], f[3]), ("127.0.0.1", "mx"), "the client and the listener");
        assert!(f[7].parse::<u64>().unwrap() > 0 && f[8].parse::<u64>().unwrap() > 0 && f[9].parse::<u64>().is_ok());
    }
    assert_eq!(lines[1][5], "FROM:<s@example.test>");
    // DATA counts the message's bytes from the client.
    assert!(lines[3][8].parse::<u64>().unwrap() > "Subject: logged\r\n\r\n0123456789\r\n".len() as u64);
}

#[test]
fn sendmail_writes_into_pickup_even_while_the_daemon_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "", "");
    let sendmail = |args: &[&str], input: &[u8]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mailroot"))
            .args(["sendmail", "--config"])
            .arg(&cfg)
            .args(args)
            .env("USER", "cronuser")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let pickup = dir.path().join("spool/Pickup");
    // -t: recipients from the header; Bcc is removed; a lone dot ends the input without -i.
    let (code, err) = sendmail(
        &["-t", "hidden@example.test"],
        b"To: a@example.test\nBcc: hidden@example.test\nSubject: from cron\n\nline\n.\nnot part of it\n",
    );
    assert_eq!(code, Some(0), "{err}");
    // Explicit recipients, a bare user name, -f and -i (the dot line is content).
    let (code, err) = sendmail(&["-f", "app@example.test", "-i", "bob"], b"Subject: with -i\n\n.\nafter the dot\n");
    assert_eq!(code, Some(0), "{err}");
    // Refused with sendmail's exit codes: no recipient (64), bad address (65).
    assert_eq!(sendmail(&[], b"Subject: x\n\nx\n").0, Some(64));
    assert_eq!(sendmail(&["not an address@"], b"Subject: x\n\nx\n").0, Some(65));
    // Installed as `sendmail` (a symlink), with the configuration from $MAILROOT_CONFIG.
    let link = dir.path().join("sendmail");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_mailroot"), &link).unwrap();
    let mut child = Command::new(&link)
        .args(["-oi", "carol@example.test"])
        .env("MAILROOT_CONFIG", &cfg)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Subject: via the symlink\n\nhi\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let files: Vec<String> =
        std::fs::read_dir(&pickup).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(files.iter().all(|f| f.ends_with(".eml") && !f.starts_with('.')), "{files:?}");

    // The daemon takes them when it starts.
    let d = Daemon::spawn(&cfg, &[], &[]);
    let drop_dir = dir.path().join("spool");
    let texts = wait_for("both messages in Drop", Duration::from_secs(20), || {
        let t: Vec<String> = drop_files(&drop_dir).iter().filter_map(|p| std::fs::read_to_string(p).ok()).collect();
        (t.len() == 3).then_some(t)
    });
    let cron = texts.iter().filter(|t| t.contains("Subject: from cron")).collect::<Vec<_>>();
    assert_eq!(cron.len(), 1, "one Drop file holds both recipients: {texts:?}");
    assert!(cron[0].contains("x-sender: cronuser@example.test"), "{}", cron[0]);
    assert!(cron[0].contains("x-receiver: a@example.test") && cron[0].contains("x-receiver: hidden@example.test"));
    assert_eq!(
        cron[0].matches("x-receiver: hidden@example.test").count(),
        1,
        "given twice (argument and Bcc:), sent once"
    );
    assert!(!cron[0].contains("Bcc:") && !cron[0].contains("not part of it"), "{}", cron[0]);
    assert!(cron[0].contains("Message-ID: <") && cron[0].contains("Date: "), "added headers: {}", cron[0]);
    let bob = texts.iter().find(|t| t.contains("Subject: with -i")).expect("the -i message");
    assert!(bob.contains("x-sender: app@example.test") && bob.contains("x-receiver: bob@example.test"), "{bob}");
    assert!(bob.contains("\r\n.\r\nafter the dot"), "{bob}");
    assert!(texts.iter().any(|t| t.contains("x-receiver: carol@example.test") && t.contains("via the symlink")));
    drop(d);
}

/// The sendmail modes tools use: `-bs` (SMTP on standard input, Symfony Mailer's default), `-F`
/// (the full name in the From: added), `-bi` (newaliases: nothing to do), `-bv` (where
/// addresses would go), and with the daemon running `-bp` / `mailq` (the queue) and `-q` (retry
/// the deferred ones now).
#[test]
fn sendmail_modes() {
    let dir = tempfile::tempdir().unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let cfg = dir.path().join("mailroot.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nhostname = \"{HOST}\"\nlisten = [\"127.0.0.1:0\"]\n[mailroot]\npath = \"spool\"\n\
             [domains]\nlocal = [\"example.test\"]\n[admin]\nlisten = \"{admin}\"\n\
             [delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[127.0.0.1]:1\"\n[queue]\nretry_intervals = [\"1h\"]\n\
             [routes]\n\"*.lists.test\" = \"smarthost\"\n"
        ),
    )
    .unwrap();
    let run = |program: &Path, args: &[&str], input: &[u8]| {
        let mut child = Command::new(program)
            .args(args)
            .env("MAILROOT_CONFIG", &cfg)
            .env("USER", "cronuser")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A refused command line exits without reading its input.
        let _ = child.stdin.take().unwrap().write_all(input);
        let out = child.wait_with_output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let sendmail = dir.path().join("sendmail");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_mailroot"), &sendmail).unwrap();
    let mailq = dir.path().join("mailq");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_mailroot"), &mailq).unwrap();

    let smtp = b"EHLO app.test\r\nMAIL FROM:<app@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n\
                 Subject: over -bs\r\n\r\nhello\r\n.\r\nQUIT\r\n";
    let (code, out, err) = run(&sendmail, &["-bs"], smtp);
    assert_eq!(code, Some(0), "{err}");
    for reply in ["220 ", "250-", "250 2.1.0", "354 ", "250 2.0.0", "221 "] {
        assert!(out.contains(reply), "{reply} in {out}");
    }
    let (code, _, err) = run(&sendmail, &["-F", "Jane Q. Doe", "carol@example.test"], b"Subject: named\n\nhi\n");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(run(&sendmail, &["-bi"], b"").0, Some(0));
    let (code, out, _) = run(&sendmail, &["-bv", "bob", "x@remote.test", "y@a.lists.test", "bad@@x"], b"");
    assert_eq!(code, Some(65), "{out}");
    assert!(out.contains("bob@example.test: deliverable: local domain"), "{out}");
    assert!(out.contains("x@remote.test: deliverable: remote"), "{out}");
    assert!(out.contains("y@a.lists.test: deliverable: route \"smarthost\""), "the daemon's routing table: {out}");
    assert!(out.contains("bad@@x: undeliverable"), "{out}");
    let (code, _, err) = run(&sendmail, &["far@remote.test"], b"Subject: deferred\n\nx\n");
    assert_eq!(code, Some(0), "{err}");
    // DSN options: a success report to the sender, with the envelope ID.
    let (code, _, err) = run(
        &sendmail,
        &["-N", "success", "-V", "env-1", "-R", "hdrs", "-f", "app@example.test", "dave@example.test"],
        b"Subject: with DSN\n\nx\n",
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(run(&sendmail, &["-N", "sometimes", "dave@example.test"], b"x\n").0, Some(64));

    let d = Daemon::spawn(&cfg, &[], &[]);
    let drop_dir = dir.path().join("spool");
    let texts = wait_for("the local messages and the success report in Drop", Duration::from_secs(20), || {
        let t: Vec<String> = drop_files(&drop_dir).iter().filter_map(|p| std::fs::read_to_string(p).ok()).collect();
        (t.len() == 4).then_some(t)
    });
    let report = texts.iter().find(|t| t.contains("Successful Mail Delivery Report")).expect("a success report");
    assert!(report.contains("x-receiver: app@example.test"), "{report}");
    assert!(report.contains("Original-Envelope-Id: env-1"), "{report}");
    assert!(report.contains("Final-Recipient: rfc822; dave@example.test"), "{report}");
    let bs = texts.iter().find(|t| t.contains("Subject: over -bs")).expect("the -bs message");
    assert!(bs.contains("x-sender: app@example.test") && bs.contains("x-receiver: bob@example.test"), "{bs}");
    let named = texts.iter().find(|t| t.contains("Subject: named")).expect("the -F message");
    assert!(named.contains("From: \"Jane Q. Doe\" <cronuser@example.test>\r\n"), "{named}");
    // The remote one waits (the smart host does not answer): mailq lists it, -q retries it.
    let listed = wait_for("mailq to list the deferred message", Duration::from_secs(20), || {
        let (code, out, _) = run(&mailq, &[], b"");
        (code == Some(0) && out.contains("far@remote.test")).then_some(out)
    });
    assert!(listed.contains("ID "), "{listed}");
    let (code, out, err) = run(&sendmail, &["-q"], b"");
    assert_eq!(code, Some(0), "{out}{err}");
    drop(d);
}

/// A daemon whose stderr goes away (a pipe whose reader closed: `| head`, a journald restart)
/// keeps working and stops cleanly: log lines it cannot write are dropped.
#[test]
fn a_closed_stderr_is_survived() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "", "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailroot"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // Read until the listening line names the port, then close the pipe.
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let addr: SocketAddr = loop {
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "stderr closed before listening: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some(a) = seen.lines().find_map(|l| l.split("listening addr=").nth(1)) {
            break a.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    drop(stderr);
    // Every session and message logs: all of it to the closed pipe.
    for i in 0..3 {
        let mut c = Client::ready(addr, "client.test");
        let r = c.transaction("a@example.test", &["b@example.test"], format!("Subject: {i}\r\n\r\nx\r\n").as_bytes());
        assert_eq!(r.code, 250, "{r:?}");
    }
    assert!(Command::new("kill").args(["-s", "TERM", &child.id().to_string()]).status().unwrap().success());
    let status = wait_for("the daemon to stop", Duration::from_secs(20), || child.try_wait().unwrap());
    assert!(status.success(), "{status:?}");
}

/// Splits a text log line into `key=value` fields as the simplest reader does: on spaces, then at
/// the first `=`. (A reader that understands quotes is fooled by no less.)
fn logfmt_fields(line: &str) -> Vec<(String, String)> {
    line.split(' ').filter_map(|t| t.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Values a client chooses (here a quoted local part full of `"` and `=`) are escaped in the text
/// log, so a key=value reader sees the fields mailroot wrote and no others.
#[test]
fn client_values_cannot_add_fields_to_the_text_log() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "", "");
    let d = Daemon::spawn(&cfg, &[], &[]);
    let mut c = Client::ready(d.smtp, "client.test");
    let sender = r#""x\" result=\"accepted\" id=999"@example.test"#;
    let r = c.transaction(sender, &["r@example.test"], b"Subject: s\r\n\r\nx\r\n");
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(c.cmd("QUIT").code, 221);
    for what in ["mailroot_actors::session: message", "mailroot_actors::queue::record: delivery"] {
        let line = d.wait_log(what);
        let fields = logfmt_fields(&line);
        let count = |k: &str| fields.iter().filter(|(key, _)| key == k).count();
        assert_eq!((count("id"), count("result"), count("sender")), (1, 1, 1), "{line}");
        let id = &fields.iter().find(|(k, _)| k == "id").unwrap().1;
        assert_ne!(id, "999", "{line}");
        let result = &fields.iter().find(|(k, _)| k == "result").unwrap().1;
        assert!(result.trim_matches('"') == "accepted" || result.trim_matches('"') == "delivered", "{line}");
    }
}
