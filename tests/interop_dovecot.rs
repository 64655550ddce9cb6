//! mailroot against a real Dovecot LMTP server (Debian's `dovecot-lmtpd`): recipients checked at
//! RCPT (Dovecot's own `550 5.1.1 … User doesn't exist` at once, no bounce later), delivery into
//! the user's Maildir, and kept connections closed with QUIT once idle (Dovecot logs `Logged out`,
//! not a dropped connection).
//!
//! Needs `/usr/sbin/dovecot` and root (Dovecot's master runs as root and switches to `nobody` for
//! the mail). `.ci/run` installs the package and sets `MAILROOT_INTEROP=1`, which makes a missing
//! Dovecot a failure; without it the test says it is skipped and why.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const DOVECOT: &str = "/usr/sbin/dovecot";

/// A private Dovecot serving LMTP on 127.0.0.1:`port`, users alice and bob, Maildirs under `dir`.
struct Dovecot {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Dovecot {
    fn start(dir: &Path) -> Dovecot {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        for sub in ["run", "state", "mail"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        assert!(Command::new("chown").arg("nobody:nogroup").arg(dir.join("mail")).status().unwrap().success());
        // Dovecot's processes must reach the folder (tempdirs are 0700).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("users"), "alice:{PLAIN}x::::::\nbob:{PLAIN}x::::::\n").unwrap();
        let d = dir.display();
        let conf = format!(
            "base_dir = {d}/run\nstate_dir = {d}/state\nlog_path = {d}/dovecot.log\nprotocols = lmtp\n\
             listen = 127.0.0.1\nssl = no\nauth_username_format = %Ln\nmail_uid = nobody\nmail_gid = nogroup\n\
             first_valid_uid = 1\nmail_location = maildir:{d}/mail/%n/Maildir\n\
             passdb {{\n  driver = passwd-file\n  args = {d}/users\n}}\n\
             userdb {{\n  driver = passwd-file\n  args = {d}/users\n  default_fields = home={d}/mail/%n\n}}\n\
             service lmtp {{\n  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n\
               unix_listener {d}/lmtp.sock {{\n    mode = 0666\n  }}\n}}\n"
        );
        std::fs::write(dir.join("dovecot.conf"), conf).unwrap();
        let child = Command::new(DOVECOT)
            .args(["-F", "-c"])
            .arg(dir.join("dovecot.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dovecot");
        // The probe that waits for Dovecot to listen ends its session with QUIT, and we wait until
        // Dovecot has logged it out: on a cold machine the first LMTP process can take long to
        // start, and a probe logged late would unbalance the counts the test reads afterwards.
        wait_for("Dovecot to answer LMTP", Duration::from_secs(30), || Self::greet_and_quit(port));
        let dovecot = Dovecot { child, dir: dir.to_path_buf(), port };
        dovecot.wait_all_logged_out(0, "Dovecot to log the probe out");
        dovecot
    }

    /// One LMTP session that only greets and quits; `None` while Dovecot does not answer yet.
    fn greet_and_quit(port: u16) -> Option<()> {
        use std::io::{BufRead, BufReader, Write};
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let mut r = BufReader::new(s.try_clone().ok()?);
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        if !line.starts_with("220") {
            return None;
        }
        (&s).write_all(b"QUIT\r\n").ok()?;
        line.clear();
        r.read_line(&mut line).ok()?;
        line.starts_with("221").then_some(())
    }

    /// The log from byte `from` on, once every connection it shows has been logged out; on
    /// timeout the panic shows that log, which says which connection was not.
    fn wait_all_logged_out(&self, from: usize, what: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log().get(from..).unwrap_or_default().to_string();
            let connects = log.matches("Info: Connect from").count();
            if connects > 0 && log.matches("Logged out").count() == connects {
                return log;
            }
            if std::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; Dovecot's log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default()
    }

    fn maildir_new(&self, user: &str) -> Vec<PathBuf> {
        maildir_new(&self.dir.join("mail"), user)
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = Command::new(DOVECOT).arg("-c").arg(self.dir.join("dovecot.conf")).arg("stop").status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn dovecot_lmtp_checks_recipients_delivers_and_is_left_with_quit() {
    if !interop_peer(DOVECOT, "dovecot-lmtpd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dovecot = Dovecot::start(&dir.path().join("dovecot"));
    let extra = format!(
        "[routes]\n\"mbox.test\" = \"lmtp\"\n[lmtp]\naddress = \"127.0.0.1:{}\"\nidle_timeout = \"1s\"\n",
        dovecot.port
    );
    let root = dir.path().join("mailroot");
    // The probe is logged out (`Dovecot::start` waited for it): mailroot's connections start here.
    let before = dovecot.log().len();
    let running = start(config(&root, &extra));
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    assert_eq!(c.cmd("MAIL FROM:<sender@remote.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<alice@mbox.test>").code, 250);
    let r = c.cmd("RCPT TO:<ghost@mbox.test>");
    assert_eq!((r.code, r.text.get(..5)), (550, Some("5.1.1")), "{r:?}");
    assert!(r.text.contains("User doesn't exist"), "Dovecot's own words: {r:?}");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: through dovecot\r\n\r\nline one\r\n..dot line\r\n.\r\n");
    assert_eq!(c.read_reply().unwrap().code, 250);
    assert_eq!(c.cmd("QUIT").code, 221);
    let files = wait_for("the message in alice's Maildir", Duration::from_secs(15), || {
        let f = dovecot.maildir_new("alice");
        (!f.is_empty()).then_some(f)
    });
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(text.contains("Subject: through dovecot") && text.contains("\n.dot line"), "{text}");
    // No bounce was made for ghost: nothing in Drop.
    assert!(drop_files(&root).is_empty(), "no NDR to the (maybe forged) sender");
    // Every connection (the check's and the delivery's) ends with QUIT once idle for 1 s.
    let log = dovecot.wait_all_logged_out(before, "Dovecot to see every connection logged out");
    assert!(!log.contains("Connection closed"), "no connection dropped without QUIT: {log}");
    running.stop();

    // The same over Dovecot's Unix socket, and the kept connection closed with QUIT at stop.
    let before = dovecot.log().len();
    let extra = format!(
        "[routes]\n\"mbox.test\" = \"lmtp\"\n[lmtp]\naddress = \"unix:{}\"\nidle_timeout = \"1h\"\n",
        dovecot.dir.join("lmtp.sock").display()
    );
    let root = dir.path().join("mailroot-unix");
    let running = start(config(&root, &extra));
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    assert_eq!(c.cmd("MAIL FROM:<sender@remote.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<nobody-here@mbox.test>").code, 550);
    assert_eq!(c.cmd("RCPT TO:<bob@mbox.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: over the socket\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.read_reply().unwrap().code, 250);
    wait_for("the message in bob's Maildir", Duration::from_secs(15), || {
        (!dovecot.maildir_new("bob").is_empty()).then_some(())
    });
    running.stop();
    let log = dovecot.wait_all_logged_out(before, "every connection logged out after the stop");
    assert!(!log.contains("Connection closed"), "no connection dropped without QUIT: {log}");
}
