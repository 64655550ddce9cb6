//! End-to-end tests of the Pickup folder, of retries after a local delivery failure, and of
//! restarts with mail pending.

mod common;

use std::fs;
use std::time::Duration;

use common::*;

// The queue's behaviour on each store (tests/common/pg.rs).
both_stores!(
    pickup_both_envelope_forms_and_a_malformed_file,
    local_delivery_failure_is_retried,
    restart_with_mail_pending
);

/// Writes a Pickup file the documented way: a dotfile first, then a rename.
fn put_pickup(dir: &std::path::Path, name: &str, contents: &[u8]) {
    let tmp = dir.join("Pickup").join(format!(".{name}"));
    fs::write(&tmp, contents).unwrap();
    fs::rename(&tmp, dir.join("Pickup").join(name)).unwrap();
}

fn pickup_both_envelope_forms_and_a_malformed_file() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), ""));
    put_pickup(
        dir.path(),
        "iis.eml",
        b"x-sender: app@remote.test\r\nx-receiver: one@example.test\r\nx-receiver: two@alias.test\r\nSubject: iis form\r\n\r\nbody one\r\n",
    );
    put_pickup(
        dir.path(),
        "headers.eml",
        b"From: Cron <cron@remote.test>\nTo: three@example.test\nBcc: secret@example.test\nSubject: header form\n\nbody two\n",
    );
    put_pickup(dir.path(), "broken.eml", b"this is not a message\n");

    let files = wait_for("two Drop files", Duration::from_secs(10), || {
        let f = drop_files(dir.path());
        (f.len() == 2).then_some(f)
    });
    let mut parsed: Vec<DropFile> = files.iter().map(|p| parse_drop(&fs::read(p).unwrap())).collect();
    parsed.sort_by(|a, b| a.sender.cmp(&b.sender));
    let (iis, hdr) = (&parsed[0], &parsed[1]);
    assert_eq!(iis.sender, "app@remote.test");
    assert_eq!(iis.receivers, vec!["one@example.test", "two@alias.test"]);
    assert_eq!(iis.message, b"Subject: iis form\r\n\r\nbody one\r\n");
    assert!(iis.received.starts_with("Received: from pickup\r\n\tby mx.example.test (mailroot) with local id "));
    assert_eq!(hdr.sender, "cron@remote.test");
    assert_eq!(hdr.receivers, vec!["three@example.test", "secret@example.test"]);
    assert_eq!(
        hdr.message,
        b"From: Cron <cron@remote.test>\r\nTo: three@example.test\r\nSubject: header form\r\n\r\nbody two\r\n"
    );

    let bdr = wait_for("Badmail reason", Duration::from_secs(10), || {
        fs::read_to_string(dir.path().join("Badmail/broken.eml.bdr")).ok()
    });
    assert!(bdr.contains("Reason:"), "{bdr}");
    // The reason is written (and synced) before the file is moved beside it: wait for both.
    let bad =
        wait_for("Badmail file", Duration::from_secs(10), || fs::read(dir.path().join("Badmail/broken.eml.bad")).ok());
    assert_eq!(bad, b"this is not a message\n");
    wait_for("Pickup emptied", Duration::from_secs(10), || {
        (fs::read_dir(dir.path().join("Pickup")).unwrap().count() == 0).then_some(())
    });
    assert_eq!(metric(&running, "mailroot_pickup_files_total{result=\"queued\"}"), 2.0);
    assert_eq!(metric(&running, "mailroot_pickup_files_total{result=\"badmail\"}"), 1.0);
    running.stop();
}

#[test]
fn files_being_written_are_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), ""));
    // Dotfiles and *.tmp are never taken, however long they sit there.
    fs::write(dir.path().join("Pickup/.partial"), b"x-sender: a@b.test\r\nx-receiver: c@example.test\r\n\r\nx\r\n")
        .unwrap();
    fs::write(dir.path().join("Pickup/writing.tmp"), b"x-sender: a@b.test\r\nx-receiver: c@example.test\r\n\r\nx\r\n")
        .unwrap();
    put_pickup(dir.path(), "marker.eml", b"x-sender: a@b.test\r\nx-receiver: m@example.test\r\n\r\nx\r\n");
    wait_for("the marker message", Duration::from_secs(10), || (drop_files(dir.path()).len() == 1).then_some(()));
    // Two more scans go by; the partial files stay.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(drop_files(dir.path()).len(), 1);
    assert!(dir.path().join("Pickup/.partial").exists() && dir.path().join("Pickup/writing.tmp").exists());
    running.stop();
}

fn local_delivery_failure_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), "[queue]\nretry_intervals = [\"1s\"]\n"));
    // Break the Drop folder: a plain file where the folder should be.
    break_drop(dir.path());
    let mut c = Client::ready(running.smtp_addrs[0], "c.test");
    let id = c.transaction("a@remote.test", &["r@example.test"], b"Subject: retry\r\n\r\nx\r\n").queue_id().unwrap();
    wait_metric(&running, "mailroot_deliveries_total{route=\"drop\",result=\"temporary\"}", |v| v >= 1.0);
    fs::remove_file(dir.path().join("Drop")).unwrap();
    fs::create_dir(dir.path().join("Drop")).unwrap();
    let f = parse_drop(&drop_file(dir.path(), id));
    assert_eq!(f.message, b"Subject: retry\r\n\r\nx\r\n");
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    running.stop();
}

fn restart_with_mail_pending() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "[queue]\nretry_intervals = [\"1s\"]\n");
    let running = start(cfg.clone());
    break_drop(dir.path());
    let mut c = Client::ready(running.smtp_addrs[0], "c.test");
    let local =
        c.transaction("a@remote.test", &["r@example.test"], b"Subject: pending\r\n\r\nx\r\n").queue_id().unwrap();
    let remote =
        c.transaction("a@example.test", &["far@remote.test"], b"Subject: remote\r\n\r\ny\r\n").queue_id().unwrap();
    assert!(remote > local, "IDs increase");
    wait_metric(&running, "mailroot_deliveries_total{route=\"drop\",result=\"temporary\"}", |v| v >= 1.0);
    drop(c);
    running.stop();

    fs::remove_file(dir.path().join("Drop")).unwrap();
    let running = start(cfg.clone());
    // Both messages survived the restart: the local one is delivered below, the remote one stays.
    let f = parse_drop(&drop_file(dir.path(), local));
    assert_eq!(f.message, b"Subject: pending\r\n\r\nx\r\n");
    // The remote one waits for remote delivery, still queued; new IDs stay above the old ones.
    let mut c = Client::ready(running.smtp_addrs[0], "c.test");
    let next = c.transaction("a@remote.test", &["r@example.test"], b"x\r\n").queue_id().unwrap();
    assert!(next > remote);
    wait_metric(&running, "mailroot_queue_messages", |v| v == 1.0);
    running.stop();
}

#[test]
fn wiping_the_queue_folder_never_reuses_a_drop_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let running = start(cfg.clone());
    let mut c = Client::ready(running.smtp_addrs[0], "c.test");
    let first = c.transaction("a@remote.test", &["r@example.test"], b"Subject: first\r\n\r\nx\r\n").queue_id().unwrap();
    drop_file(dir.path(), first);
    drop(c);
    running.stop();

    // The operator resets the queue; the undelivered-to-anyone Drop file is still there.
    fs::remove_dir_all(dir.path().join("Queue")).unwrap();
    let running = start(cfg);
    let mut c = Client::ready(running.smtp_addrs[0], "c.test");
    let second =
        c.transaction("a@remote.test", &["r@example.test"], b"Subject: second\r\n\r\ny\r\n").queue_id().unwrap();
    assert!(second > first, "new ID {second} must not reuse {first}");
    drop_file(dir.path(), second);
    let kept = parse_drop(&fs::read(dir.path().join(format!("Drop/{first}.eml"))).unwrap());
    assert_eq!(kept.message, b"Subject: first\r\n\r\nx\r\n");
    running.stop();
}

#[test]
fn oversized_pickup_file_goes_to_badmail_and_sort_temp_is_emptied_at_start() {
    let dir = tempfile::tempdir().unwrap();
    // Leftovers of a Drop write interrupted by a crash.
    fs::create_dir_all(dir.path().join("SortTemp")).unwrap();
    fs::write(dir.path().join("SortTemp/7.0.tmp"), b"half a message").unwrap();
    let running = start(config(dir.path(), "[limits]\nmax_message_size = 2000\n"));
    assert!(!dir.path().join("SortTemp/7.0.tmp").exists(), "SortTemp is scratch: emptied at start");

    let big = format!("x-sender: a@b.test\r\nx-receiver: c@example.test\r\n\r\n{}", "y\r\n".repeat(700));
    put_pickup(dir.path(), "big.eml", big.as_bytes());
    let bdr = wait_for("Badmail reason", Duration::from_secs(10), || {
        fs::read_to_string(dir.path().join("Badmail/big.eml.bdr")).ok()
    });
    assert!(bdr.contains("larger than the maximum message size"), "{bdr}");
    // The reason is written (and synced) before the file is moved beside it: wait for both.
    let bad =
        wait_for("Badmail file", Duration::from_secs(10), || fs::read(dir.path().join("Badmail/big.eml.bad")).ok());
    assert_eq!(bad, big.as_bytes());
    // Far over the limit too (the read stops one byte past it).
    let huge = vec![b'z'; 200_000];
    put_pickup(dir.path(), "huge.eml", &huge);
    wait_for("huge file in Badmail", Duration::from_secs(10), || {
        dir.path().join("Badmail/huge.eml.bad").exists().then_some(())
    });
    assert!(drop_files(dir.path()).is_empty());
    running.stop();
}

/// A symlink and a FIFO in Pickup go to Badmail with their reason: the link's target is never
/// mailed, the FIFO never wedges Pickup, and the daemon still stops at once.
#[test]
fn pickup_takes_regular_files_only() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    fs::write(&secret, "x-sender: a@remote.test\r\nx-receiver: one@example.test\r\n\r\nTOP SECRET\r\n").unwrap();
    let running = start(config(dir.path(), ""));
    let pickup = dir.path().join("Pickup");
    std::os::unix::fs::symlink(&secret, pickup.join("link.eml")).unwrap();
    let made = std::process::Command::new("mkfifo").arg(pickup.join("pipe.eml")).status().unwrap();
    assert!(made.success(), "mkfifo");
    put_pickup(dir.path(), "real.eml", b"x-sender: a@remote.test\r\nx-receiver: one@example.test\r\n\r\nhello\r\n");

    let reasons = wait_for("two .bdr files in Badmail", Duration::from_secs(10), || {
        let bdr: Vec<String> = fs::read_dir(dir.path().join("Badmail"))
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".bdr"))
            .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
            .collect();
        (bdr.len() == 2).then_some(bdr.join("\n"))
    });
    assert!(reasons.contains("a symbolic link") && reasons.contains("a FIFO"), "{reasons}");
    let files = wait_for("the real message in Drop", Duration::from_secs(10), || {
        let f = drop_files(dir.path());
        (!f.is_empty()).then_some(f)
    });
    assert_eq!(files.len(), 1);
    assert!(!String::from_utf8_lossy(&fs::read(&files[0]).unwrap()).contains("TOP SECRET"));
    assert!(fs::read_dir(&pickup).unwrap().next().is_none(), "Pickup is empty");
    let start = std::time::Instant::now();
    running.stop();
    assert!(start.elapsed() < Duration::from_secs(5), "stop took {:?}", start.elapsed());
}
