//! mailroot against a real Postfix (Debian's `postfix`, a private instance on its own port) as
//! its smart host: 8-bit and SMTPUTF8 mail goes through byte for byte, and Postfix's refusal of
//! an internationalized recipient comes back to the sender as an RFC 6533 report
//! (`message/global-delivery-status`, `Final-Recipient: utf-8; …`) naming Postfix properly
//! (`Remote-MTA: dns; [127.0.0.1]`).
//!
//! Needs `/usr/sbin/postfix` and root. `.ci/run` installs the package and sets
//! `MAILROOT_INTEROP=1`, which makes a missing Postfix a failure; without it the test says it is
//! skipped and why.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const POSTFIX: &str = "/usr/sbin/postfix";

/// A private Postfix listening on 127.0.0.1:`port`, delivering `alice@pf.test` into a Maildir.
struct Postfix {
    dir: PathBuf,
    port: u16,
}

impl Postfix {
    fn start(dir: &Path) -> Postfix {
        use std::os::unix::fs::PermissionsExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        for sub in ["conf", "queue", "data", "mail"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // Postfix's processes run as `postfix` and `nobody`: they must reach the folders.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        if let Some(parent) = dir.parent() {
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        assert!(Command::new("chown").arg("postfix").arg(dir.join("data")).status().unwrap().success());
        assert!(Command::new("chown").arg("nobody:nogroup").arg(dir.join("mail")).status().unwrap().success());
        // Debian's master.cf, with smtpd on our port and nothing chrooted.
        let master = std::fs::read_to_string("/etc/postfix/master.cf").expect("Debian's master.cf");
        let master: String = master
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if l.starts_with('#') || l.starts_with(' ') || f.len() < 8 {
                    return format!("{l}\n");
                }
                let service = if f[0] == "smtp" && f[1] == "inet" { format!("127.0.0.1:{port}") } else { f[0].into() };
                format!("{service} {} {} {} n {} {} {}\n", f[1], f[2], f[3], f[5], f[6], f[7..].join(" "))
            })
            .collect();
        std::fs::write(dir.join("conf/master.cf"), master).unwrap();
        let d = dir.display();
        let main = format!(
            "compatibility_level = 3.6\nqueue_directory = {d}/queue\ndata_directory = {d}/data\nmail_owner = postfix\n\
             setgid_group = postdrop\ninet_interfaces = 127.0.0.1\ninet_protocols = ipv4\nmyhostname = pf.test\n\
             mydestination =\nsmtputf8_enable = yes\nalias_maps =\nalias_database =\nmaillog_file_prefixes = {d}\n\
             maillog_file = {d}/maillog\nvirtual_mailbox_domains = pf.test\nvirtual_mailbox_base = {d}/mail\n\
             virtual_mailbox_maps = inline:{{ alice@pf.test=alice/Maildir/ }}\nvirtual_uid_maps = static:65534\n\
             virtual_gid_maps = static:65534\nmynetworks = 127.0.0.0/8\n"
        );
        std::fs::write(dir.join("conf/main.cf"), main).unwrap();
        let conf = dir.join("conf");
        let _ = Command::new(POSTFIX).arg("-c").arg(&conf).arg("set-permissions").output();
        let out = Command::new(POSTFIX).arg("-c").arg(&conf).arg("start").output().expect("run postfix");
        assert!(
            out.status.success(),
            "postfix start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("maillog")).unwrap_or_default()
        );
        wait_for("Postfix to listen", Duration::from_secs(15), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        Postfix { dir: dir.to_path_buf(), port }
    }

    fn maildir_new(&self, user: &str) -> Vec<PathBuf> {
        maildir_new(&self.dir.join("mail"), user)
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new(POSTFIX).arg("-c").arg(self.dir.join("conf")).arg("stop").output();
    }
}

#[test]
fn postfix_as_smart_host_utf8_mail_and_a_global_report() {
    if !interop_peer(POSTFIX, "postfix") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let postfix = Postfix::start(&dir.path().join("postfix"));
    let extra =
        format!("[delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[127.0.0.1]:{}\"\n", postfix.port);
    let root = dir.path().join("mailroot");
    let running = start(config(&root, &extra));
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    assert_eq!(c.cmd("MAIL FROM:<alice@example.test> SMTPUTF8 BODY=8BITMIME").code, 250);
    assert_eq!(c.cmd("RCPT TO:<alice@pf.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<ghöst@pf.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send("Subject: Grüße\r\nFrom: alice@example.test\r\n\r\nGrüße aus mailroot\r\n..a dot line\r\n.\r\n".as_bytes());
    let r = c.read_reply().unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    assert!(r.queue_id().is_some(), "{r:?}");
    let files = wait_for("the message in alice's Maildir at Postfix", Duration::from_secs(30), || {
        let f = postfix.maildir_new("alice");
        (!f.is_empty()).then_some(f)
    });
    let got = std::fs::read_to_string(&files[0]).unwrap();
    assert!(got.contains("Subject: Grüße") && got.contains("Grüße aus mailroot\n.a dot line"), "{got}");
    assert!(got.contains(&format!("by {HOST}")), "our Received header, then Postfix's: {got}");
    // Postfix refused ghöst@ at RCPT: the sender gets a global report (RFC 6533).
    let ndr = wait_for("the report in Drop", Duration::from_secs(30), || {
        drop_files(&root).into_iter().find_map(|p| {
            let t = std::fs::read_to_string(p).ok()?;
            t.contains("Undelivered Mail").then_some(t)
        })
    });
    for want in [
        "report-type=\"global-delivery-status\"",
        "Content-Type: message/global-delivery-status",
        "Final-Recipient: utf-8; ghöst@pf.test",
        "Status: 5.1.1",
        "Remote-MTA: dns; [127.0.0.1]",
        "Diagnostic-Code: smtp; 550 5.1.1",
        "User unknown in virtual mailbox table",
    ] {
        assert!(ndr.contains(want), "{want} in {ndr}");
    }
    running.stop();
}
