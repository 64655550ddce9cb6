//! The machine's PostgreSQL itself stopped (`pg_ctlcluster … stop`) under a running node and
//! started again: new mail gets 451 4.3.0 meanwhile and nothing is acknowledged; afterwards mail
//! flows again without a restart of mailroot, and what was acknowledged before is delivered.
//! (tests/scale_out.rs does the same through a proxy that cuts the connections; this is the
//! server going down for real: its connections end with an administrator shutdown, and its
//! prepared statements are gone when it comes back.)
//!
//! A test binary of its own, with one test: stopping the server must not pull it from under
//! other tests, and cargo runs test binaries one at a time. Needs root and `pg_ctlcluster`
//! (Debian's PostgreSQL); without them it says it is skipped, unless `MAILROOT_INTEROP=1`. The
//! server is started again when the test ends, whatever happened.

mod common;

use std::process::Command;
use std::time::Duration;

use common::pg::Schema;
use common::*;

/// The cluster to stop, as `pg_ctlcluster` names it: the first version under /etc/postgresql.
fn cluster() -> Option<String> {
    let version = std::fs::read_dir("/etc/postgresql").ok()?.filter_map(|e| e.ok()).next()?;
    Some(version.file_name().to_string_lossy().into_owned())
}

fn pg_ctl(version: &str, action: &str) -> bool {
    Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main", action])
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts the server again when dropped, and waits until it answers.
struct Restart(String);

impl Drop for Restart {
    fn drop(&mut self) {
        pg_ctl(&self.0, "start");
        for _ in 0..300 {
            if common::pg::execute("SELECT 1").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("PostgreSQL did not come back after the test");
    }
}

#[test]
fn postgresql_stopped_and_started_again() {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let usable = cluster().filter(|_| root && Command::new("pg_ctlcluster").arg("--help").output().is_ok());
    let Some(version) = usable else {
        if std::env::var_os("MAILROOT_INTEROP").is_some() {
            panic!("pg_ctlcluster and root are needed (MAILROOT_INTEROP is set)");
        }
        eprintln!("skipped: needs root and Debian's pg_ctlcluster");
        return;
    };
    let Some(schema) = Schema::for_this_test() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), "");
    schema.apply(&mut c, "node1");
    c.queue.postgres.connect_timeout = mailroot::config::HumanDuration(Duration::from_secs(2));
    let running = start(c);
    let smtp = running.smtp_addrs[0];
    let mut client = Client::ready(smtp, "client.test");
    let r = client.transaction("a@example.test", &["before@example.test"], b"Subject: before\r\n\r\nx\r\n");
    assert_eq!(r.code, 250, "{r:?}");
    wait_for("the first message in Drop", Duration::from_secs(30), || {
        (!drop_files(dir.path()).is_empty()).then_some(())
    });

    let restart = Restart(version.clone());
    assert!(pg_ctl(&version, "stop"), "pg_ctlcluster stop");
    common::pg::refused_while_down(smtp);
    drop(restart);

    common::pg::taken_again(smtp);
    wait_for("the message taken after the restart in Drop", Duration::from_secs(30), || {
        drop_files(dir.path())
            .iter()
            .any(|f| std::fs::read_to_string(f).is_ok_and(|t| t.contains("Subject: after")))
            .then_some(())
    });
    assert!(
        !drop_files(dir.path()).iter().any(|f| std::fs::read_to_string(f).is_ok_and(|t| t.contains("Subject: during"))),
        "a message refused while the database was down is not delivered"
    );
    running.stop();
    schema.assert_used();
}
