//! Remote delivery end to end: mailroot resolves through a real DNS server running in the test
//! and delivers over SMTP to real peers on their own 127.x.y.z addresses; notifications land in
//! the local sender's Drop folder.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use common::dns::{Answer, DnsServer};
use common::peer::{Behavior, Hostile, Peer};
use common::*;

// The queue's behaviour on each store (tests/common/pg.rs).
both_stores!(
    mixed_results_then_success_on_retry,
    delay_notice_then_expiry_report,
    null_sender_gets_no_report_and_undeliverable_reports_go_to_badmail,
    retry_schedule_survives_a_restart,
    connection_reuse_and_limits_under_a_thousand_messages
);
use hickory_proto::rr::RecordType;

const LONG: Duration = Duration::from_secs(20);

/// A distinct 127.N.0.0/16 per test, so tests running at once never share peer addresses.
fn net() -> u8 {
    static NEXT: AtomicU8 = AtomicU8::new(20);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

/// Peers on 127.n.0.1, 127.n.0.2, … all on one port (mailroot's `remote_port`).
fn peers(n: u8, behaviors: Vec<Behavior>) -> Vec<Peer> {
    let mut out: Vec<Peer> = Vec::new();
    for (i, b) in behaviors.into_iter().enumerate() {
        let port = out.first().map_or(0, |p| p.addr.port());
        out.push(Peer::start(&format!("127.{n}.0.{}", i + 1), port, b));
    }
    out
}

fn port_of(peers: &[Peer]) -> u16 {
    peers.first().map_or(2525, |p| p.addr.port())
}

/// Test settings: fast retries and timeouts, the test's DNS server, peers on `port`.
fn remote_config(dns: &DnsServer, port: u16, queue: &str, delivery: &str) -> String {
    format!(
        "[queue]\nretry_intervals = [\"1s\"]\n{queue}\n[delivery]\nnameservers = [\"{}\"]\nremote_port = {port}\n\
         dns_timeout = \"1s\"\nconnect_timeout = \"2s\"\ncommand_timeout = \"2s\"\ndata_timeout = \"3s\"\n{delivery}\n",
        dns.addr
    )
}

fn send(running: &mailroot::daemon::Running, from: &str, to: &[&str], body: &str) -> u64 {
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    let r = c.transaction(from, to, body.as_bytes());
    assert_eq!(r.code, 250, "{r:?}");
    r.queue_id().expect("queue id")
}

/// Drop files (as text) whose content contains `needle`.
fn drops_with(dir: &Path, needle: &str) -> Vec<String> {
    drop_files(dir)
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .filter(|t| t.contains(needle))
        .collect()
}

fn wait_drop_with(dir: &Path, needle: &str) -> String {
    wait_for(&format!("a Drop file containing {needle:?}"), LONG, || drops_with(dir, needle).into_iter().next())
}

fn wait_received(peer: &Peer, n: usize) -> Vec<common::peer::Received> {
    wait_for(&format!("{n} messages at {}", peer.addr), LONG, || {
        let r = peer.received();
        (r.len() >= n).then_some(r)
    })
}

#[test]
fn mx_preference_fallback_and_implicit_mx() {
    let n = net();
    let dns = DnsServer::start();
    // mx1 (preference 10) has no server at all; mx2 (20) accepts.
    let p = peers(n, vec![Behavior::default(), Behavior::default(), Behavior::default()]);
    drop(p[0].clone());
    let dead = format!("127.{n}.0.9");
    dns.mx("pref.test", &[(20, "mx2.pref.test"), (10, "mx1.pref.test"), (30, "mx3.pref.test")]);
    dns.a("mx1.pref.test", &[&dead]);
    dns.a("mx2.pref.test", &[&p[1].addr.ip().to_string()]);
    dns.a("mx3.pref.test", &[&p[2].addr.ip().to_string()]);
    // No MX at all: the domain's own A record is the implicit MX.
    dns.a("implicit.test", &[&p[0].addr.ip().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &remote_config(&dns, port_of(&p), "", "")));

    // Lines starting with a dot travel dot-stuffed and arrive as written.
    send(&running, "sender@example.test", &["rcpt@pref.test"], "Subject: pref\r\n\r\n..dot line\r\nhello\r\n");
    let got = wait_received(&p[1], 1);
    assert!(got[0].mail_from.starts_with("<sender@example.test> SIZE="), "{}", got[0].mail_from);
    assert_eq!(got[0].rcpts, vec!["<rcpt@pref.test>"]);
    assert_eq!(got[0].helo, HOST);
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(text.starts_with("Received: from client.test"), "{text}");
    assert!(text.ends_with("\r\n.dot line\r\nhello\r\n"), "{text}");
    assert!(p[2].received().is_empty(), "the third MX is not needed");

    send(&running, "sender@example.test", &["rcpt@implicit.test"], "Subject: implicit\r\n\r\nhi\r\n");
    wait_received(&p[0], 1);
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    assert!(metric(&running, "mailroot_outbound_connect_failures_total") >= 1.0);
    running.stop();
}

#[test]
fn null_mx_and_nxdomain_fail_at_once_with_one_report() {
    let dns = DnsServer::start();
    dns.mx("nullmx.test", &[(0, ".")]);
    let dir = tempfile::tempdir().unwrap();
    let extra = remote_config(&dns, 2525, "ndr_copy_to = \"postmaster@example.test\"", "");
    let running = start(config(dir.path(), &extra));
    let id = send(
        &running,
        "sender@example.test",
        &["a@nullmx.test", "b@nxdomain.test"],
        "Subject: doomed\r\nMessage-ID: <doomed@example.test>\r\n\r\nbody\r\n",
    );
    let ndr = wait_drop_with(dir.path(), "Undelivered Mail Returned to Sender");
    let f = parse_drop(ndr.as_bytes());
    assert_eq!(f.sender, "<>", "reports come from the null sender");
    assert_eq!(f.receivers, vec!["sender@example.test", "postmaster@example.test"]);
    for needle in [
        "From: \"Mail Delivery System\" <MAILER-DAEMON@mx.example.test>",
        "Content-Type: multipart/report; report-type=\"delivery-status\"",
        "Final-Recipient: rfc822; a@nullmx.test\r\nAction: failed\r\nStatus: 5.1.10",
        "Final-Recipient: rfc822; b@nxdomain.test\r\nAction: failed\r\nStatus: 5.1.2",
        "Content-Type: text/rfc822-headers",
        "Message-ID: <doomed@example.test>",
        &format!("X-Mailroot-Queue-ID: {id}"),
    ] {
        assert!(ndr.contains(needle), "missing {needle:?} in\n{ndr}");
    }
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    assert_eq!(drops_with(dir.path(), "Undelivered Mail").len(), 1, "one report for both recipients");
    assert_eq!(metric(&running, "mailroot_notifications_total{kind=\"failure\"}"), 1.0);
    running.stop();
}

fn mixed_results_then_success_on_retry() {
    let n = net();
    let dns = DnsServer::start();
    let p = peers(n, vec![Behavior::default()]);
    dns.mx("mixed.test", &[(10, "mx.mixed.test")]);
    dns.a("mx.mixed.test", &[&p[0].addr.ip().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &remote_config(&dns, port_of(&p), "", "")));
    send(
        &running,
        "sender@example.test",
        &["ok@mixed.test", "t4busy@mixed.test", "p5gone@mixed.test"],
        "Subject: mixed\r\n\r\nx\r\n",
    );
    let got = wait_received(&p[0], 1);
    assert_eq!(got[0].rcpts, vec!["<ok@mixed.test>"], "one transaction, only the accepted recipient");
    let ndr = wait_drop_with(dir.path(), "Undelivered Mail");
    assert!(ndr.contains("Final-Recipient: rfc822; p5gone@mixed.test"), "{ndr}");
    assert!(ndr.contains("Diagnostic-Code: smtp; 550 5.1.1 No such user here"), "{ndr}");
    assert!(ndr.contains("Remote-MTA: dns; mx.mixed.test\r\n"), "{ndr}");
    assert!(!ndr.contains("t4busy"), "the busy recipient is not reported as failed: {ndr}");
    // The busy mailbox clears; the retry (1 s) delivers just that recipient.
    p[0].set(|b| b.rcpt_replies.retain(|(k, _)| k != "t4"));
    let got = wait_received(&p[0], 2);
    assert_eq!(got[1].rcpts, vec!["<t4busy@mixed.test>"]);
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    assert!(metric(&running, "mailroot_delivery_retries_total") >= 1.0);
    running.stop();
}

fn delay_notice_then_expiry_report() {
    let n = net();
    let dns = DnsServer::start();
    let p = peers(n, vec![Behavior::default()]);
    dns.mx("slow.test", &[(10, "mx.slow.test")]);
    dns.a("mx.slow.test", &[&p[0].addr.ip().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let queue = "expire_after = \"5s\"\ndelay_notice_after = \"2s\"";
    let running = start(config(dir.path(), &remote_config(&dns, port_of(&p), queue, "")));
    let t0 = Instant::now();
    send(&running, "sender@example.test", &["t4wait@slow.test"], "Subject: patience\r\n\r\nx\r\n");
    let delay = wait_drop_with(dir.path(), "Delayed Mail");
    assert!(t0.elapsed() >= Duration::from_secs(1), "the notice waits for delay_notice_after");
    assert!(delay.contains("Action: delayed\r\nStatus: 4.2.1"), "{delay}");
    assert!(delay.contains("Will-Retry-Until: "), "{delay}");
    let ndr = wait_drop_with(dir.path(), "Undelivered Mail");
    assert!(t0.elapsed() >= Duration::from_secs(4), "expiry waits for expire_after");
    assert!(ndr.contains("Action: failed\r\nStatus: 4.4.7"), "{ndr}");
    assert!(ndr.contains("Message expired after"), "{ndr}");
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    assert_eq!(drops_with(dir.path(), "Delayed Mail").len(), 1, "one delay notice per message");
    running.stop();
}

fn null_sender_gets_no_report_and_undeliverable_reports_go_to_badmail() {
    let n = net();
    let dns = DnsServer::start();
    let p = peers(n, vec![Behavior::default()]);
    dns.mx("far.test", &[(10, "mx.far.test")]);
    dns.a("mx.far.test", &[&p[0].addr.ip().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &remote_config(&dns, port_of(&p), "", "")));
    // A bounce from the null sender that bounces: no report about a report; Badmail instead.
    send(&running, "", &["p5nobody@far.test"], "Subject: a bounce\r\n\r\nx\r\n");
    // A sender whose domain does not exist: its report cannot be delivered either.
    send(&running, "someone@nowhere.test", &["p5nobody@far.test"], "Subject: lost\r\n\r\ny\r\n");
    let badmail = dir.path().join("Badmail");
    let bad = wait_for("two messages in Badmail", LONG, || {
        let mut v: Vec<String> = std::fs::read_dir(&badmail)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        (v.len() == 4).then_some(v)
    });
    assert!(bad.iter().filter(|f| f.ends_with(".bdr")).count() == 2, "{bad:?}");
    let reasons: String =
        bad.iter().filter(|f| f.ends_with(".bdr")).map(|f| std::fs::read_to_string(badmail.join(f)).unwrap()).collect();
    assert!(reasons.contains("p5nobody@far.test -- 550 5.1.1"), "{reasons}");
    assert!(reasons.contains("someone@nowhere.test -- 550 5.1.2"), "{reasons}");
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    assert!(drop_files(dir.path()).is_empty(), "nothing local was generated");
    assert_eq!(metric(&running, "mailroot_notifications_total{kind=\"failure\"}"), 1.0);
    assert_eq!(metric(&running, "mailroot_badmail_total{cause=\"undeliverable_notification\"}"), 2.0);
    running.stop();
}

fn retry_schedule_survives_a_restart() {
    let n = net();
    let dns = DnsServer::start();
    let p = peers(n, vec![Behavior::default()]);
    dns.mx("later.test", &[(10, "mx.later.test")]);
    dns.a("mx.later.test", &[&p[0].addr.ip().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let queue = "retry_intervals = [\"4s\"]";
    let cfg = remote_config(&dns, port_of(&p), "", "").replace("retry_intervals = [\"1s\"]\n", "");
    let cfg = cfg.replace("[queue]\n", &format!("[queue]\n{queue}\n"));
    let running = start(config(dir.path(), &cfg));
    send(&running, "sender@example.test", &["t4soon@later.test"], "Subject: later\r\n\r\nx\r\n");
    wait_for("first attempt", LONG, || (p[0].connections() >= 1).then_some(()));
    let first = Instant::now();
    wait_metric(&running, "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}", |v| v == 1.0);
    running.stop();
    p[0].set(|b| b.rcpt_replies.clear());
    let running = start(config(dir.path(), &cfg));
    let got = wait_received(&p[0], 1);
    let waited = first.elapsed();
    // The retry time is stored in whole seconds, and `first` is taken a little after the attempt:
    // of the 4 seconds, more than 2 must have passed.
    assert!(waited >= Duration::from_secs(2), "retried too early after the restart: {waited:?}");
    assert_eq!(got[0].rcpts, vec!["<t4soon@later.test>"]);
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    running.stop();
}

#[test]
fn smart_host_with_and_without_brackets() {
    let n = net();
    let dns = DnsServer::start();
    let p = peers(n, vec![Behavior::default(), Behavior::default()]);
    let port = port_of(&p);
    // Brackets: no MX lookup at all, straight to the address.
    let dir = tempfile::tempdir().unwrap();
    // These peers have no certificates: the smart host's default (verify) is lowered.
    let d = format!("smart_host_tls = \"opportunistic\"\nsmart_host = \"[{}]:{port}\"", p[0].addr.ip());
    let running = start(config(dir.path(), &remote_config(&dns, 1, "", &d)));
    send(&running, "sender@example.test", &["x@anywhere.test"], "Subject: s\r\n\r\nx\r\n");
    wait_received(&p[0], 1);
    assert_eq!(dns.query_count("anywhere.test"), 0, "no DNS for the recipient domain via a smart host");
    running.stop();
    // No brackets: the smart host's own MX records are used.
    dns.mx("relay.test", &[(10, "mx.relay.test")]);
    dns.a("mx.relay.test", &[&p[1].addr.ip().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let d = "smart_host_tls = \"opportunistic\"\nsmart_host = \"relay.test\"".to_string();
    let running = start(config(dir.path(), &remote_config(&dns, port, "", &d)));
    send(&running, "sender@example.test", &["y@anywhere.test"], "Subject: s\r\n\r\ny\r\n");
    wait_received(&p[1], 1);
    assert!(dns.query_count("relay.test") >= 1);
    running.stop();
}

#[test]
fn per_domain_override_and_direct_before_smart_host() {
    let n = net();
    let dns = DnsServer::start();
    let p = peers(n, vec![Behavior::default(), Behavior::default()]);
    let port = port_of(&p);
    dns.mx("down.test", &[(10, "mx.down.test")]);
    dns.a("mx.down.test", &[&format!("127.{n}.0.9")]);
    dns.mx("direct.test", &[(10, "mx.direct.test")]);
    dns.a("mx.direct.test", &[&p[1].addr.ip().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let d = format!(
        "smart_host_tls = \"opportunistic\"\nsmart_host = \"[{}]\"\ndirect_before_smart_host = true",
        p[0].addr.ip()
    );
    let extra = format!(
        "{}\n[domains.remote.\"routed.test\"]\nsmart_host = \"[{}]\"\n",
        remote_config(&dns, port, "", &d),
        p[1].addr.ip()
    );
    let running = start(config(dir.path(), &extra));
    // MX works: direct. MX down: the smart host. Per-domain route: its own host.
    send(&running, "sender@example.test", &["a@direct.test"], "Subject: 1\r\n\r\n1\r\n");
    send(&running, "sender@example.test", &["b@down.test"], "Subject: 2\r\n\r\n2\r\n");
    send(&running, "sender@example.test", &["c@routed.test"], "Subject: 3\r\n\r\n3\r\n");
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    let at0: Vec<String> = p[0].received().iter().flat_map(|r| r.rcpts.clone()).collect();
    let mut at1: Vec<String> = p[1].received().iter().flat_map(|r| r.rcpts.clone()).collect();
    at1.sort();
    assert_eq!(at0, vec!["<b@down.test>"]);
    assert_eq!(at1, vec!["<a@direct.test>", "<c@routed.test>"]);
    running.stop();
}

fn connection_reuse_and_limits_under_a_thousand_messages() {
    let n = net();
    let dns = DnsServer::start();
    let p = peers(n, vec![Behavior::default()]);
    dns.mx("bulk.test", &[(10, "mx.bulk.test")]);
    dns.a("mx.bulk.test", &[&p[0].addr.ip().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let d = "max_connections_per_domain = 3\nmax_messages_per_connection = 50";
    let running = start(config(dir.path(), &remote_config(&dns, port_of(&p), "", d)));
    let addr = running.smtp_addrs[0];
    let senders: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::ready(addr, "bulk.client");
                for i in 0..250 {
                    let body = format!("Subject: bulk {t}-{i}\r\n\r\nmessage {t}-{i}\r\n");
                    assert_eq!(c.transaction("sender@example.test", &["x@bulk.test"], body.as_bytes()).code, 250);
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    wait_for("1000 messages at the peer", Duration::from_secs(60), || (p[0].rcpt_count() >= 1000).then_some(()));
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    assert_eq!(p[0].rcpt_count(), 1000);
    assert!(p[0].max_open() <= 3, "per-domain limit: {} connections open at once", p[0].max_open());
    let conns = p[0].connections();
    assert!((20..1000).contains(&conns), "connections are reused, 50 messages each at most: {conns}");
    let per_conn = p[0].received().iter().fold(std::collections::HashMap::new(), |mut m, r| {
        *m.entry(r.connection).or_insert(0) += 1;
        m
    });
    assert!(per_conn.values().all(|&v| v <= 50), "max_messages_per_connection holds");
    running.stop();
}

#[test]
fn global_connection_limit_across_domains() {
    let n = net();
    let dns = DnsServer::start();
    let p = peers(n, vec![Behavior::default()]);
    for d in ["one.test", "two.test", "three.test"] {
        dns.mx(d, &[(10, "mx.shared.test")]);
    }
    dns.a("mx.shared.test", &[&p[0].addr.ip().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let d = "max_connections = 2\nmax_connections_per_domain = 100\nmax_messages_per_connection = 10";
    let running = start(config(dir.path(), &remote_config(&dns, port_of(&p), "", d)));
    let addr = running.smtp_addrs[0];
    let senders: Vec<_> = ["one.test", "two.test", "three.test"]
        .into_iter()
        .map(|domain| {
            std::thread::spawn(move || {
                let mut c = Client::ready(addr, "bulk.client");
                for i in 0..100 {
                    let to = format!("x{i}@{domain}");
                    let body = format!("Subject: {i}\r\n\r\nto {to}\r\n");
                    assert_eq!(c.transaction("sender@example.test", &[&to], body.as_bytes()).code, 250);
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    wait_for("300 messages at the peer", Duration::from_secs(60), || (p[0].rcpt_count() >= 300).then_some(()));
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    // Three domains, each allowed 100 connections, share two.
    assert!(p[0].max_open() <= 2, "global limit: {} connections open at once", p[0].max_open());
    running.stop();
}

#[test]
fn unusable_smart_host_is_temporary() {
    let dns = DnsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &remote_config(&dns, 2525, "", "smart_host = \"nosuch-relay.test\"")));
    send(&running, "sender@example.test", &["x@anywhere.test"], "Subject: s\r\n\r\nx\r\n");
    wait_metric(&running, "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}", |v| v >= 1.0);
    assert_eq!(metric(&running, "mailroot_queue_messages"), 1.0, "the message waits for the operator");
    assert!(drops_with(dir.path(), "Undelivered").is_empty(), "no bounce for our own misconfiguration");
    running.stop();
}

#[test]
fn starttls_opportunistic_fallback_and_required() {
    let n = net();
    let dns = DnsServer::start();
    let tls = Behavior { tls: true, ..Behavior::default() };
    let broken = Behavior { tls: true, broken_tls: true, ..Behavior::default() };
    let plain = Behavior::default();
    let p = peers(n, vec![tls, broken, plain]);
    for (i, d) in ["tls.test", "broken.test", "plain.test"].iter().enumerate() {
        dns.mx(d, &[(10, &format!("mx.{d}"))]);
        dns.a(&format!("mx.{d}"), &[&p[i].addr.ip().to_string()]);
    }
    let dir = tempfile::tempdir().unwrap();
    let extra =
        format!("{}\n[domains.remote.\"plain.test\"]\nrequire_tls = true\n", remote_config(&dns, port_of(&p), "", ""));
    let running = start(config(dir.path(), &extra));
    send(&running, "sender@example.test", &["a@tls.test"], "Subject: t\r\n\r\nsecret\r\n");
    send(&running, "sender@example.test", &["b@broken.test"], "Subject: b\r\n\r\nclear\r\n");
    send(&running, "sender@example.test", &["c@plain.test"], "Subject: c\r\n\r\nwaits\r\n");
    assert!(wait_received(&p[0], 1)[0].tls, "delivered over TLS");
    assert!(!wait_received(&p[1], 1)[0].tls, "a failed handshake falls back to clear text");
    wait_metric(&running, "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}", |v| v >= 2.0);
    assert!(p[2].received().is_empty(), "require_tls: never in clear text");
    wait_metric(&running, "mailroot_queue_messages", |v| v == 1.0);
    assert!(metric(&running, "mailroot_outbound_tls_total") >= 1.0);
    running.stop();
}

#[test]
fn hostile_peers_fail_temporarily_and_never_stick() {
    let n = net();
    let dns = DnsServer::start();
    let hostile = [
        Behavior { hostile: Some(Hostile::EndlessReply), ..Behavior::default() },
        Behavior { hostile: Some(Hostile::HugeLine), ..Behavior::default() },
        Behavior { hostile: Some(Hostile::Garbage), ..Behavior::default() },
        Behavior { stall: Some(Duration::from_secs(4)), ..Behavior::default() },
        Behavior { drop_in_data: true, ..Behavior::default() },
        Behavior { greeting: "554 5.7.1 Go away".into(), ..Behavior::default() },
    ];
    let p = peers(n, hostile.to_vec());
    let names = ["endless", "hugeline", "garbage", "stall", "dropdata", "refuse"];
    for (i, d) in names.iter().enumerate() {
        dns.mx(&format!("{d}.test"), &[(10, &format!("mx.{d}.test"))]);
        dns.a(&format!("mx.{d}.test"), &[&p[i].addr.ip().to_string()]);
    }
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &remote_config(&dns, port_of(&p), "", "")));
    for d in &names[..5] {
        send(&running, "sender@example.test", &[&format!("x@{d}.test")], "Subject: h\r\n\r\nbody line\r\nmore\r\n");
    }
    send(&running, "sender@example.test", &["x@refuse.test"], "Subject: h\r\n\r\nx\r\n");
    // The refusing greeting is permanent; the other five are retried.
    wait_drop_with(dir.path(), "Undelivered Mail");
    wait_metric(&running, "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}", |v| v >= 5.0);
    wait_metric(&running, "mailroot_queue_messages", |v| v == 5.0);
    // All peers behave again: every message is delivered on a retry.
    for peer in &p {
        peer.set(|b| *b = Behavior::default());
    }
    for peer in &p[..5] {
        wait_received(peer, 1);
    }
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    running.stop();
}

#[test]
fn dns_trouble_is_temporary() {
    let n = net();
    let dns = DnsServer::start();
    let p = peers(n, vec![Behavior::default()]);
    let ip = p[0].addr.ip().to_string();
    dns.set("servfail.test", RecordType::MX, Answer::ServFail);
    dns.set("silent.test", RecordType::MX, Answer::Silent);
    dns.set("garbage.test", RecordType::MX, Answer::Garbage);
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &remote_config(&dns, port_of(&p), "", "")));
    for d in ["servfail", "silent", "garbage"] {
        send(&running, "sender@example.test", &[&format!("x@{d}.test")], "Subject: d\r\n\r\nx\r\n");
    }
    wait_metric(&running, "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}", |v| v >= 3.0);
    assert_eq!(metric(&running, "mailroot_queue_messages"), 3.0);
    assert!(drops_with(dir.path(), "Undelivered").is_empty(), "no report for a temporary DNS failure");
    for d in ["servfail", "silent", "garbage"] {
        dns.mx(&format!("{d}.test"), &[(10, "mx.fixed.test")]);
    }
    dns.a("mx.fixed.test", &[&ip]);
    wait_received(&p[0], 3);
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    running.stop();
}

#[test]
fn dsn_passed_on_or_answered_and_peer_capabilities_honoured() {
    let n = net();
    let dns = DnsServer::start();
    let with_dsn = Behavior { ehlo: vec!["PIPELINING".into(), "8BITMIME".into(), "DSN".into()], ..Behavior::default() };
    let small = Behavior { ehlo: vec!["SIZE 400".into()], ..Behavior::default() };
    let helo_only = Behavior { refuse_ehlo: true, ..Behavior::default() };
    let p = peers(n, vec![with_dsn, Behavior::default(), small, helo_only]);
    for (i, d) in ["dsn.test", "nodsn.test", "small.test", "old.test"].iter().enumerate() {
        dns.mx(d, &[(10, &format!("mx.{d}"))]);
        dns.a(&format!("mx.{d}"), &[&p[i].addr.ip().to_string()]);
    }
    let dir = tempfile::tempdir().unwrap();
    let d = "masquerade_domain = \"masq.test\"";
    let running = start(config(dir.path(), &remote_config(&dns, port_of(&p), "", d)));
    let addr = running.smtp_addrs[0];
    let dsn_txn = |to: &str, body: &str| {
        let mut c = Client::ready(addr, "client.test");
        assert_eq!(c.cmd("MAIL FROM:<sender@example.test> RET=HDRS ENVID=env+2B1").code, 250);
        assert_eq!(c.cmd(&format!("RCPT TO:<{to}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;{to}")).code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(body.as_bytes());
        c.send(b".\r\n");
        assert_eq!(c.read_reply().unwrap().code, 250);
    };
    dsn_txn("a@dsn.test", "Subject: pass on\r\n\r\nx\r\n");
    let got = wait_received(&p[0], 1);
    // The DSN peer takes the request over; masquerading rewrote our local domain.
    assert_eq!(got[0].mail_from, "<sender@masq.test> RET=HDRS ENVID=env+2B1");
    assert_eq!(got[0].rcpts, vec!["<a@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@dsn.test"]);
    // A peer without DSN: we owe the sender a "relayed" notice.
    dsn_txn("b@nodsn.test", "Subject: relayed\r\n\r\nx\r\n");
    assert_eq!(wait_received(&p[1], 1)[0].rcpts, vec!["<b@nodsn.test>"]);
    let notice = wait_drop_with(dir.path(), "Successful Mail Delivery Report");
    assert!(notice.contains("Final-Recipient: rfc822; b@nodsn.test\r\nAction: relayed"), "{notice}");
    assert!(notice.contains("Original-Envelope-Id: env+2B1"), "{notice}");
    // Local delivery with NOTIFY=SUCCESS: a "delivered" notice.
    dsn_txn("local@example.test", "Subject: local\r\n\r\nx\r\n");
    wait_drop_with(dir.path(), "Action: delivered");
    // SIZE too small at the peer, and 8-bit data to a peer without 8BITMIME: permanent, and
    // nothing is sent.
    send(&running, "sender@example.test", &["big@small.test"], &format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(500)));
    send(&running, "sender@example.test", &["eight@small.test"], "Subject: 8bit\r\n\r\ncaf\u{e9}\r\n");
    // A UTF-8 address to a peer without SMTPUTF8: permanent too.
    let mut c = Client::ready(addr, "client.test");
    assert_eq!(c.cmd("MAIL FROM:<sender@example.test> SMTPUTF8").code, 250);
    assert_eq!(c.cmd("RCPT TO:<j\u{fc}rgen@small.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: utf8\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.read_reply().unwrap().code, 250);
    let ndr = wait_for("three failure reports", LONG, || {
        let v = drops_with(dir.path(), "Undelivered Mail");
        (v.len() == 3).then_some(v.join("\n"))
    });
    assert!(ndr.contains("Status: 5.3.4"), "{ndr}");
    assert!(ndr.contains("Status: 5.6.3"), "{ndr}");
    assert!(ndr.contains("Status: 5.6.7"), "{ndr}");
    assert!(p[2].received().is_empty());
    // EHLO refused: HELO works.
    send(&running, "sender@example.test", &["old@old.test"], "Subject: old\r\n\r\nx\r\n");
    wait_received(&p[3], 1);
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    running.stop();
}

#[test]
fn recipients_beyond_a_limit_go_in_further_transactions_at_once() {
    let n = net();
    let dns = DnsServer::start();
    // The peer takes 3 recipients per transaction and says 452 4.5.3 to the rest; we send 4
    // per transaction to many.test, and 2 to few.test (our own limit for that domain).
    let p = peers(n, vec![Behavior { max_rcpts: Some(3), ..Behavior::default() }]);
    for d in ["many.test", "few.test"] {
        dns.mx(d, &[(10, &format!("mx.{d}"))]);
        dns.a(&format!("mx.{d}"), &[&p[0].addr.ip().to_string()]);
    }
    let dir = tempfile::tempdir().unwrap();
    // Retries an hour away: everything must arrive in the first attempt.
    let extra = format!(
        "{}\n[domains.remote.\"few.test\"]\nmax_recipients = 2\n",
        remote_config(&dns, port_of(&p), "", "max_recipients_per_transaction = 4")
    );
    let running = start(config(dir.path(), &extra.replace("[\"1s\"]", "[\"1h\"]")));
    let many: Vec<String> = (0..10).map(|i| format!("r{i}@many.test")).collect();
    let refs: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
    send(&running, "sender@example.test", &refs, "Subject: many\r\n\r\nm\r\n");
    let got = wait_received(&p[0], 4);
    // 4 offered, 3 taken, 1 put off and sent right after with the next: 3 + 3 + 3 + 1.
    let sizes: Vec<usize> = got.iter().map(|r| r.rcpts.len()).collect();
    assert_eq!(sizes, vec![3, 3, 3, 1], "{sizes:?}");
    let mut all: Vec<String> = got.iter().flat_map(|r| r.rcpts.clone()).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10, "every recipient exactly once: {all:?}");
    send(&running, "sender@example.test", &["a@few.test", "b@few.test", "c@few.test"], "Subject: few\r\n\r\nf\r\n");
    let got = wait_received(&p[0], 6);
    assert_eq!(got[4].rcpts.len(), 2);
    assert_eq!(got[5].rcpts.len(), 1);
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    running.stop();
}

#[test]
fn a_destination_that_says_slow_down_is_paused_without_burning_retries() {
    let n = net();
    let dns = DnsServer::start();
    let p = peers(
        n,
        vec![
            Behavior {
                data_reply: "451 4.7.28 Our system has detected an unusual rate of mail".into(),
                ..Behavior::default()
            },
            Behavior::default(),
        ],
    );
    dns.mx("busy.test", &[(10, "mx.busy.test")]);
    dns.a("mx.busy.test", &[&p[0].addr.ip().to_string()]);
    dns.mx("metered.test", &[(10, "mx.metered.test")]);
    dns.a("mx.metered.test", &[&p[1].addr.ip().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "{}\n[domains.remote.\"metered.test\"]\nmessages_per_minute = 2\n",
        remote_config(&dns, port_of(&p), "", "")
    );
    let running = start(config(dir.path(), &extra));
    let admin = |id: u64| -> serde_json::Value {
        let token = std::fs::read_to_string(running.folders.root.join("admin.token")).unwrap_or_default();
        let c = mailroot::client::AdminClient {
            address: running.admin_addr.expect("admin").to_string(),
            token,
            timeout: Duration::from_secs(10),
        };
        serde_json::from_str(&c.request("GET", &format!("/api/queue/{id}")).expect("api").body).expect("json")
    };
    let first = send(&running, "sender@example.test", &["a@busy.test"], "Subject: 1\r\n\r\n1\r\n");
    wait_metric(&running, "mailroot_outbound_rate_limited_total", |v| v == 1.0);
    let connections = p[0].connections();
    // While paused, nothing else goes to busy.test, and the retry interval (1s) is not used.
    let second = send(&running, "sender@example.test", &["b@busy.test"], "Subject: 2\r\n\r\n2\r\n");
    let reason = wait_for("the second message held back", LONG, || {
        let v = admin(second);
        let last = v["recipients"][0]["last"]["text"].as_str().unwrap_or("").to_string();
        last.contains("held back").then_some(last)
    });
    assert!(reason.contains("busy.test"), "{reason}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(p[0].connections(), connections, "a paused destination got a connection");
    for id in [first, second] {
        let v = admin(id);
        assert_eq!(v["recipients"][0]["attempts"], 0, "{v}");
        assert!(v["next_attempt"].as_u64().unwrap() >= v["received_at"].as_u64().unwrap() + 30, "{v}");
    }
    // Our own limit: 2 a minute to metered.test; the third waits, not counted as an attempt.
    let ids: Vec<u64> = (0..3)
        .map(|i| send(&running, "sender@example.test", &[&format!("m{i}@metered.test")], "Subject: m\r\n\r\nm\r\n"))
        .collect();
    wait_received(&p[1], 2);
    let held = wait_for("one message held back", LONG, || {
        ids.iter()
            .copied()
            .find(|id| admin(*id)["recipients"][0]["last"]["text"].as_str().unwrap_or("").contains("held back"))
    });
    assert_eq!(admin(held)["recipients"][0]["attempts"], 0);
    assert_eq!(p[1].received().len(), 2);
    running.stop();
}

/// Recipient maps end to end: an unknown user of a mapped domain is refused at RCPT and no
/// notification is ever made (no backscatter); an alias delivers to a mailbox here and forwards
/// to another domain with an SRS sender; a bounce to that SRS address goes back to the original
/// sender; a forged one is refused.
#[test]
fn recipient_maps_forward_with_srs_and_never_backscatter() {
    let n = net();
    let dns = DnsServer::start();
    let p = peers(n, vec![Behavior::default()]);
    let dir = tempfile::tempdir().unwrap();
    let d = format!(
        "smart_host_tls = \"opportunistic\"\nsmart_host = \"[{}]:{}\"\n\
         [domains]\nlocal = [\"example.test\", \"alias.test\"]\n[recipients.\"example.test\"]\nusers = [\"alice\"]\naliases = {{ team = [\"alice\", \"friend@far.test\"] }}\n",
        p[0].addr.ip(),
        port_of(&p)
    );
    let running = start(config(dir.path(), &remote_config(&dns, 1, "", &d)));
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    assert_eq!(c.cmd("MAIL FROM:<forged@victim.test>").code, 250);
    let r = c.cmd("RCPT TO:<nobody@example.test>");
    assert_eq!((r.code, r.text.starts_with("5.1.1")), (550, true), "{r:?}");
    assert_eq!(c.cmd("RCPT TO:<alice+lists@example.test>").code, 250);
    assert_eq!(c.cmd("RSET").code, 250);
    // Unmapped local domains still take any local part.
    let r =
        c.transaction("someone@origin.test", &["team@example.test", "anyone@alias.test"], b"Subject: fwd\r\n\r\nx\r\n");
    assert_eq!(r.code, 250, "{r:?}");
    wait_drop_with(dir.path(), "Subject: fwd");
    let got = wait_received(&p[0], 1);
    assert_eq!(got[0].rcpts, ["<friend@far.test>"]);
    let srs = got[0].mail_from.split(['<', '>']).nth(1).unwrap().to_string();
    assert!(srs.starts_with("SRS0=") && srs.ends_with("=origin.test=someone@example.test"), "{srs}");
    // One envelope for the message, as postsrsd does: the local copy carries the SRS sender too
    // (it reverses to the original, so a reply or bounce still reaches it).
    let drop = wait_drop_with(dir.path(), "x-receiver: alice@example.test");
    assert!(drop.contains(&format!("x-sender: {srs}")), "{drop}");

    // The far side bounces: the bounce reaches the original sender through us.
    let r = c.transaction("", &[&srs], b"Subject: bounce\r\n\r\nundeliverable\r\n");
    assert_eq!(r.code, 250, "{r:?}");
    let got = wait_received(&p[0], 2);
    assert!(got[1].mail_from.starts_with("<>"), "{:?}", got[1].mail_from);
    assert_eq!(got[1].rcpts, ["<someone@origin.test>"]);
    // Forged or tampered SRS addresses are unknown users.
    assert_eq!(c.cmd("MAIL FROM:<>").code, 250);
    let tampered = srs.replace("someone", "victim");
    assert_eq!(c.cmd(&format!("RCPT TO:<{tampered}>")).code, 550);
    assert_eq!(c.cmd("RCPT TO:<SRS0=AAAA=AA=x.test=y@example.test>").code, 550);
    c.cmd("QUIT");
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"unknown_recipient\"}"), 3.0);
    assert_eq!(metric(&running, "mailroot_notifications_total{kind=\"failure\"}"), 0.0, "no backscatter");
    running.stop();
}
