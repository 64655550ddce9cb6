//! End-to-end SMTP tests: the real daemon on 127.0.0.1 port 0, spoken to through lettre and raw
//! sockets, with Drop files checked byte for byte.

mod common;

use std::time::Duration;

use common::*;

// The queue's behaviour on each store (tests/common/pg.rs).
both_stores!(lettre_message_lands_in_drop, raw_transaction_is_byte_exact_and_pipelined, ten_megabyte_message);
use lettre::message::Mailbox as LMailbox;
use lettre::{Message, SmtpTransport, Transport};

fn lettre_message_lands_in_drop() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), ""));
    let addr = running.smtp_addrs[0];
    let email = Message::builder()
        .from("Alice <alice@remote.test>".parse::<LMailbox>().unwrap())
        .to("Bob <bob@example.test>".parse::<LMailbox>().unwrap())
        .subject("lettre test")
        .body(String::from("Hello from lettre.\r\n.leading dot line\r\n"))
        .unwrap();
    let mailer = SmtpTransport::builder_dangerous(addr.ip().to_string()).port(addr.port()).build();
    let response = mailer.send(&email).expect("lettre sends");
    assert!(response.is_positive());
    let text = response.message().collect::<Vec<_>>().join(" ");
    let id: u64 = text.rsplit("queued as ").next().unwrap().trim().parse().expect("queue id in the 250 reply");

    let f = parse_drop(&drop_file(dir.path(), id));
    assert_eq!(f.sender, "alice@remote.test");
    assert_eq!(f.receivers, vec!["bob@example.test"]);
    assert!(f.received.contains(&format!("by {HOST} (mailroot) with ESMTP id {id}")), "{}", f.received);
    // What lettre put on the wire, dot-unstuffed, is what the Drop file holds after the envelope.
    // lettre always ends DATA with "\r\n.\r\n", so the body gains one CRLF.
    let mut sent = email.formatted();
    sent.extend_from_slice(b"\r\n");
    assert_eq!(String::from_utf8_lossy(&f.message), String::from_utf8_lossy(&sent));
    assert_eq!(metric(&running, "mailroot_messages_received_total{source=\"smtp\"}"), 1.0);
    running.stop();
}

fn raw_transaction_is_byte_exact_and_pipelined() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), ""));
    let mut c = Client::connect(running.smtp_addrs[0]);
    assert_eq!(c.greeting().code, 220);
    let ehlo = c.cmd("EHLO client.test");
    for ext in ["PIPELINING", "SIZE 26214400", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"] {
        assert!(ehlo.text.lines().any(|l| l == ext), "EHLO lacks {ext}: {}", ehlo.text);
    }
    // One pipelined batch: two transactions, a refused RCPT in between, then QUIT.
    let body1 = b"Subject: one\r\n\r\n..stuffed\r\nline two\r\n";
    let mut batch = Vec::new();
    batch.extend_from_slice(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<a@example.test>\r\nRCPT TO:<b@ALIAS.test>\r\nRCPT TO:<bad address>\r\nDATA\r\n");
    batch.extend_from_slice(body1);
    batch.extend_from_slice(
        b".\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\nSubject: two\r\n\r\nx\r\n.\r\nQUIT\r\n",
    );
    c.send(&batch);
    let codes: Vec<u16> = std::iter::from_fn(|| c.read_reply()).map(|r| r.code).collect();
    assert_eq!(codes, vec![250, 250, 250, 501, 354, 250, 250, 250, 354, 250, 221]);

    let files = wait_for("two Drop files", Duration::from_secs(10), || {
        let f = drop_files(dir.path());
        (f.len() == 2).then_some(f)
    });
    let first = parse_drop(&std::fs::read(&files[0]).unwrap());
    assert_eq!(first.sender, "s@remote.test");
    assert_eq!(first.receivers, vec!["a@example.test", "b@alias.test"]);
    assert_eq!(first.message, b"Subject: one\r\n\r\n.stuffed\r\nline two\r\n");
    assert!(first
        .received
        .starts_with("Received: from client.test ([127.0.0.1])\r\n\tby mx.example.test (mailroot) with ESMTP id "));
    assert!(first.received.trim_end().ends_with("+0000"), "{}", first.received);
    assert!(!first.received.contains("for <"), "no 'for' clause with two recipients");
    let second = parse_drop(&std::fs::read(&files[1]).unwrap());
    assert_eq!(second.sender, "<>");
    assert_eq!(second.receivers, vec!["postmaster@example.test"]);
    assert!(second.received.contains("for <postmaster@example.test>"));
    running.stop();
}

#[test]
fn relay_is_denied_to_outsiders_and_allowed_to_listed_networks() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), "[relay]\nallow_networks = [\"127.0.0.1/32\"]\n"));
    let addr = running.smtp_addrs[0];
    // 127.0.0.9 is not in allow_networks.
    let mut out = Client::connect_from("127.0.0.9", addr);
    out.greeting();
    out.cmd("EHLO outsider.test");
    assert_eq!(out.cmd("MAIL FROM:<x@outside.test>").code, 250);
    let r = out.cmd("RCPT TO:<victim@elsewhere.test>");
    assert_eq!((r.code, r.text.starts_with("5.7.1")), (550, true), "{r:?}");
    assert_eq!(out.cmd("RCPT TO:<user@example.test>").code, 250, "local mail is accepted from anyone");
    // 127.0.0.1 may relay; the message stays queued (no remote delivery yet) and is not lost.
    let mut inside = Client::ready(addr, "inside.test");
    let r = inside.transaction("a@example.test", &["far@elsewhere.test"], b"Subject: relay\r\n\r\nx\r\n");
    assert_eq!(r.code, 250);
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"relay_denied\"}"), 1.0);
    wait_metric(&running, "mailroot_queue_messages", |v| v == 1.0);
    running.stop();
}

fn ten_megabyte_message() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), ""));
    let mut c = Client::ready(running.smtp_addrs[0], "big.test");
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    let mut n = 0u64;
    while body.len() < 10 * 1024 * 1024 {
        body.extend_from_slice(format!("line {n:08} {}\r\n", "x".repeat(60)).as_bytes());
        n += 1;
    }
    let r = c.transaction("a@remote.test", &["big@example.test"], &body);
    assert_eq!(r.code, 250, "{r:?}");
    let f = parse_drop(&drop_file(dir.path(), r.queue_id().unwrap()));
    assert_eq!(f.message.len(), body.len());
    assert!(f.message == body, "10 MB body must arrive unchanged");
    running.stop();
}

#[test]
fn size_limit_is_enforced_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), "[limits]\nmax_message_size = 10000\n"));
    let mut c = Client::ready(running.smtp_addrs[0], "c.test");
    let r = c.cmd("MAIL FROM:<a@remote.test> SIZE=10001");
    assert_eq!(r.code, 552);
    assert_eq!(c.cmd("MAIL FROM:<a@remote.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<b@example.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    for _ in 0..200 {
        c.send(format!("{}\r\n", "z".repeat(98)).as_bytes());
    }
    c.send(b".\r\n");
    let r = c.read_reply().unwrap();
    assert_eq!((r.code, r.text.starts_with("5.3.4")), (552, true), "{r:?}");
    assert_eq!(c.cmd("NOOP").code, 250);
    assert!(drop_files(dir.path()).is_empty());
    running.stop();
}

#[test]
fn smuggling_through_the_socket_yields_no_forged_message() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), ""));
    let mut c = Client::ready(running.smtp_addrs[0], "c.test");
    let forged = "MAIL FROM:<ceo@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nforged\r\n";
    let mut ok_ids = Vec::new();
    for early in ["\n.\n", "\n.\r\n", "\r\n.\n"] {
        assert_eq!(c.cmd("MAIL FROM:<a@remote.test>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<b@example.test>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(format!("hello{early}{forged}.\r\n").as_bytes());
        let r = c.read_reply().unwrap();
        assert_eq!(r.code, 554, "{early:?}: {r:?}");
        // Nothing else is pending: the forged commands were body text, not commands.
        let r = c.cmd("NOOP");
        assert_eq!(r.code, 250);
    }
    let r = c.transaction("a@remote.test", &["b@example.test"], b"clean\r\n");
    ok_ids.push(r.queue_id().unwrap());
    drop_file(dir.path(), ok_ids[0]);
    assert_eq!(drop_files(dir.path()).len(), 1, "exactly one message, the clean one");
    running.stop();
}

#[test]
fn connection_limit_and_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), "max_connections = 2\nidle_timeout = \"1s\"\n"));
    let addr = running.smtp_addrs[0];
    let mut a = Client::connect(addr);
    let mut b = Client::connect(addr);
    assert_eq!(a.greeting().code, 220);
    assert_eq!(b.greeting().code, 220);
    let mut c = Client::connect(addr);
    let r = c.greeting();
    assert_eq!((r.code, r.text.starts_with("4.7.0")), (421, true), "{r:?}");
    assert!(c.read_reply().is_none(), "closed after 421");
    // Silent clients are cut at the idle timeout with 421 4.4.2.
    let r = a.read_reply().expect("idle timeout reply");
    assert_eq!((r.code, r.text.starts_with("4.4.2")), (421, true), "{r:?}");
    assert!(a.read_reply().is_none());
    b.read_reply();
    // Their slots are free again.
    let mut d = wait_for("a free connection slot", Duration::from_secs(5), || {
        let mut d = Client::connect(addr);
        (d.greeting().code == 220).then_some(d)
    });
    assert_eq!(d.cmd("QUIT").code, 221);
    running.stop();
}

#[test]
fn hop_count_and_long_lines() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), "[queue]\nmax_hop_count = 2\n"));
    let mut c = Client::ready(running.smtp_addrs[0], "c.test");
    assert_eq!(c.cmd("MAIL FROM:<a@remote.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<b@example.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Received: 1\r\nReceived: 2\r\nReceived: 3\r\n\r\nloop\r\n.\r\n");
    let r = c.read_reply().unwrap();
    assert_eq!((r.code, r.text.starts_with("5.4.6")), (554, true), "{r:?}");
    let r = c.cmd(&format!("NOOP {}", "n".repeat(600)));
    assert_eq!((r.code, r.text.starts_with("5.5.6")), (500, true), "{r:?}");
    assert_eq!(c.cmd("NOOP").code, 250, "resynchronised after the long line");
    running.stop();
}

/// The documented dual-stack form, `listen = ["0.0.0.0:P", "[::]:P"]`, starts (IPv6 sockets are
/// IPv6-only) and answers on both families.
#[test]
fn dual_stack_listen_on_one_port() {
    let dir = tempfile::tempdir().unwrap();
    // A port free on both families: bound once on each and let go.
    let port = (0..20)
        .find_map(|_| {
            let port = std::net::TcpListener::bind("0.0.0.0:0").ok()?.local_addr().ok()?.port();
            // std's IPv6 socket is dual-stack: this checks the port on both families.
            std::net::TcpListener::bind(("::", port)).ok().map(|_| port)
        })
        .expect("a port free on IPv4 and IPv6 (is IPv6 loopback configured?)");
    let listen = format!("listen = [\"0.0.0.0:{port}\", \"[::]:{port}\"]");
    let mut c = config(dir.path(), "");
    c.server.listen = mailroot::config::Config::from_toml(&format!("[server]\n{listen}\n")).unwrap().server.listen;
    let running = start(c);
    assert_eq!(running.smtp_addrs.len(), 2, "{:?}", running.smtp_addrs);
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let mut client = Client::ready(addr.parse().unwrap(), "client.test");
        assert_eq!(client.cmd("QUIT").code, 221, "{addr}");
    }
    running.stop();
}

/// Large messages go to the queue store in pieces as they arrive (DATA and BDAT alike) and come
/// out byte for byte; the pieces of a message refused at its end, or whose client left in the
/// middle, are removed at once, so the store holds nothing for them (the next open finds no
/// orphan body to clean up).
#[test]
fn large_messages_stream_through_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), ""));
    let addr = running.smtp_addrs[0];
    let mut text = String::from("Subject: large\r\n\r\n");
    let mut i = 0;
    while text.len() < 5_000_000 {
        // Every 7th line starts with a dot (stuffed on the wire, unstuffed in the store).
        let dot = if i % 7 == 0 { "." } else { "" };
        text.push_str(&format!("{dot}line {i:08} abcdefghijklmnopqrstuvwxyz0123456789\r\n"));
        i += 1;
    }
    let wire = text.replace("\r\n.", "\r\n..");

    let mut a = Client::ready(addr, "a.test");
    let r = a.transaction("a@remote.test", &["x@example.test"], wire.as_bytes());
    assert_eq!(r.code, 250, "{r:?}");
    let data_id = r.queue_id().unwrap();

    let mut c = Client::ready(addr, "c.test");
    assert_eq!(c.cmd("MAIL FROM:<c@remote.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<x@example.test>").code, 250);
    let (first, second) = text.as_bytes().split_at(1_500_001);
    c.send(format!("BDAT {}\r\n", first.len()).as_bytes());
    c.send(first);
    assert_eq!(c.read_reply().unwrap().code, 250);
    c.send(format!("BDAT {} LAST\r\n", second.len()).as_bytes());
    c.send(second);
    let r = c.read_reply().unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    let bdat_id = r.queue_id().unwrap();

    // Refused at its end: a NUL after 3 MB.
    let mut b = Client::ready(addr, "b.test");
    assert_eq!(b.cmd("MAIL FROM:<b@remote.test>").code, 250);
    assert_eq!(b.cmd("RCPT TO:<x@example.test>").code, 250);
    assert_eq!(b.cmd("DATA").code, 354);
    b.send(&wire.as_bytes()[..3_000_000]);
    b.send(b"\r\nnul \0 here\r\n.\r\n");
    assert_eq!(b.read_reply().unwrap().code, 554);
    // Gone in the middle.
    let mut d = Client::ready(addr, "d.test");
    assert_eq!(d.cmd("MAIL FROM:<d@remote.test>").code, 250);
    assert_eq!(d.cmd("RCPT TO:<x@example.test>").code, 250);
    assert_eq!(d.cmd("DATA").code, 354);
    d.send(&wire.as_bytes()[..3_000_000]);
    drop(d);

    for id in [data_id, bdat_id] {
        let f = parse_drop(&drop_file(dir.path(), id));
        assert!(f.message == text.as_bytes(), "message {id} arrived byte for byte");
    }
    wait_metric(&running, "mailroot_inbound_connections_current", |v| v == 3.0);
    wait_metric(&running, "mailroot_body_memory_bytes", |v| v == 0.0);
    let queue = running.folders.queue.clone();
    drop((a, b, c));
    running.stop();
    let store = mailroot_actors::store::SledStore::open_waiting(&queue, 1, Duration::from_secs(10)).unwrap();
    assert_eq!(store.orphans_removed(), 0, "no pieces were left behind");
    assert!(store.envelopes().unwrap().is_empty());
}
