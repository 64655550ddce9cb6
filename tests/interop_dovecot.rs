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
        wait_for("Dovecot to listen", Duration::from_secs(15), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        Dovecot { child, dir: dir.to_path_buf(), port }
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
    // Give the greeting probe's disconnect time to be logged, then note where mailroot's begin.
    std::thread::sleep(Duration::from_millis(300));
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
    let log = wait_for("Dovecot to see every connection logged out", Duration::from_secs(15), || {
        // Only mailroot's connections (not the probe that waited for Dovecot to listen).
        let log = dovecot.log().get(before..).unwrap_or_default().to_string();
        let connects = log.matches("Info: Connect from").count();
        (connects > 0 && log.matches("Logged out").count() == connects).then_some(log)
    });
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
    let log = wait_for("every connection logged out after the stop", Duration::from_secs(15), || {
        let log = dovecot.log().get(before..).unwrap_or_default().to_string();
        let connects = log.matches("Info: Connect from").count();
        (connects > 0 && log.matches("Logged out").count() == connects).then_some(log)
    });
    assert!(!log.contains("Connection closed"), "no connection dropped without QUIT: {log}");
}
