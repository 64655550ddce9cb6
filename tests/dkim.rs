//! DKIM signing end to end: keys made by `mailroot dkim keygen`'s code, mail relayed through a
//! real mailroot to a real SMTP peer, and every signature checked by an independent verifier
//! (mail-auth's) that reads the public keys from the DNS server running in the test.

mod common;

use std::path::Path;
use std::time::Duration;

use common::dns::DnsServer;
use common::peer::{Behavior, Peer};
use common::*;
use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};

const LONG: Duration = Duration::from_secs(20);

struct Setup {
    dns: DnsServer,
    peer: Peer,
    running: mailroot::daemon::Running,
    _dir: tempfile::TempDir,
}

/// A daemon signing for example.test with an RSA key (s1) and an Ed25519 key (e1), relaying
/// remote.test to a peer on 127.`net`.0.1; the public keys are in the test's DNS.
fn setup(net: u8, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let dns = DnsServer::start();
    let (rsa, rsa_record) = mailroot::publish::keygen("example.test", "s1", "rsa", &keys).unwrap();
    let (ed, ed_record) = mailroot::publish::keygen("example.test", "e1", "ed25519", &keys).unwrap();
    dns.txt("s1._domainkey.example.test", &rsa_record);
    dns.txt("e1._domainkey.example.test", &ed_record);
    let peer = Peer::start(&format!("127.{net}.0.1"), 0, Behavior::default());
    dns.mx("remote.test", &[(10, "mx.remote.test")]);
    dns.a("mx.remote.test", &[&format!("127.{net}.0.1")]);
    let text = format!(
        "[queue]\nretry_intervals = [\"1s\"]\n[delivery]\nnameservers = [\"{}\"]\nremote_port = {}\n\
         dns_timeout = \"1s\"\n[dkim.\"example.test\"]\nselector = \"s1\"\nkey = \"{}\"\n\
         keys = [{{ selector = \"e1\", key = \"{}\" }}]\n{extra}\n",
        dns.addr,
        peer.addr.port(),
        rsa.display(),
        ed.display()
    );
    let running = start(config(&dir.path().join("mr"), &text));
    Setup { dns, peer, running, _dir: dir }
}

fn verifier(dns: &DnsServer) -> MessageAuthenticator {
    let mut ns = NameServerConfig::udp_and_tcp(dns.addr.ip());
    for c in &mut ns.connections {
        c.port = dns.addr.port();
    }
    MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![ns]), ResolverOpts::default()).unwrap()
}

/// Each signature's (selector, result), checked by mail-auth against the test's DNS.
fn verify(dns: &DnsServer, message: &[u8]) -> Vec<(String, DkimResult)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let auth = verifier(dns);
    rt.block_on(async {
        let m = AuthenticatedMessage::parse(message).expect("message parses");
        auth.verify_dkim(&m)
            .await
            .iter()
            .map(|o| (o.signature().map(|s| s.s.clone()).unwrap_or_default(), o.result().clone()))
            .collect()
    })
}

fn received(peer: &Peer, n: usize) -> Vec<common::peer::Received> {
    wait_for(&format!("{n} messages at the peer"), LONG, || {
        let r = peer.received();
        (r.len() >= n).then_some(r)
    })
}

fn signatures(message: &[u8]) -> usize {
    String::from_utf8_lossy(message).to_ascii_lowercase().matches("\r\ndkim-signature:").count()
}

fn send(addr: std::net::SocketAddr, from: &str, to: &[&str], body: &[u8]) {
    let mut c = Client::ready(addr, "client.test");
    let r = c.transaction(from, to, body);
    assert_eq!(r.code, 250, "{r:?}");
}

fn pass(results: &[(String, DkimResult)], selectors: &[&str]) {
    let mut got: Vec<&str> = results.iter().filter(|(_, r)| *r == DkimResult::Pass).map(|(s, _)| s.as_str()).collect();
    got.sort();
    assert_eq!(got, selectors, "{results:?}");
}

#[test]
fn relayed_mail_is_signed_with_both_keys_and_verifies() {
    let s = setup(61, "");
    // 8-bit text, a long unfolded header line, a folded one with odd spacing, trailing
    // whitespace and blank lines at the end: where signers and verifiers tend to disagree.
    let long_subject = "word ".repeat(150);
    let body = format!(
        "From: =?utf-8?q?J=C3=B6rg?= <joerg@Example.TEST>\r\nTo: friend@remote.test\r\n\
         Subject: {long_subject}\r\nX-Folded:  a\r\n\t  b   c \r\nDate: Wed, 2 Dec 2026 10:00:00 +0000\r\n\
         Message-ID: <1@example.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln \t \r\n..a line that starts with a dot\r\n\r\n\r\n"
    );
    send(s.running.smtp_addrs[0], "joerg@example.test", &["friend@remote.test"], body.as_bytes());
    let got = &received(&s.peer, 1)[0];
    assert_eq!(signatures(&[b"\r\n", &got.data[..]].concat()), 2, "{}", String::from_utf8_lossy(&got.data));
    pass(&verify(&s.dns, &got.data), &["e1", "s1"]);
    let text = String::from_utf8_lossy(&got.data).to_string();
    // Over-signed: one From more than the message has, so none can be added.
    let h: String = text.split("h=").nth(1).unwrap().split(';').next().unwrap().split_whitespace().collect();
    assert!(h.to_ascii_lowercase().matches("from").count() >= 2, "{h}");
    // The verifier really checks: one byte changed in the body and both fail.
    let tampered = text.replacen("Köln", "Kóln", 1);
    let results = verify(&s.dns, tampered.as_bytes());
    assert!(results.iter().all(|(_, r)| *r != DkimResult::Pass), "{results:?}");
    // A message already signed by both keys (a loop back through us) is not signed again.
    send(s.running.smtp_addrs[0], "joerg@example.test", &["again@remote.test"], &got.data);
    let again = &received(&s.peer, 2)[1];
    assert_eq!(signatures(&[b"\r\n", &again.data[..]].concat()), 2);
    assert_eq!(metric(&s.running, "mailroot_dkim_signing_total{result=\"signed\"}"), 1.0);
    assert_eq!(metric(&s.running, "mailroot_dkim_signing_total{result=\"already_signed\"}"), 1.0);
    s.running.stop();
}

#[test]
fn a_large_spooled_message_is_signed_from_its_file() {
    let s = setup(62, "");
    let mut body = b"From: big@example.test\r\nTo: r@remote.test\r\nSubject: big\r\n\r\n".to_vec();
    let line = "0123456789abcdefghijklmnopqrstuvwxyz ÄÖÜ 0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    while body.len() < 600 * 1024 {
        body.extend_from_slice(line.as_bytes());
    }
    send(s.running.smtp_addrs[0], "big@example.test", &["r@remote.test"], &body);
    let got = &received(&s.peer, 1)[0];
    assert!(got.data.len() > 600 * 1024);
    pass(&verify(&s.dns, &got.data), &["e1", "s1"]);
    s.running.stop();
}

#[test]
fn what_is_not_ours_to_sign_goes_unsigned() {
    // backup.test: we are its backup MX, so anyone may send to it through us.
    let s = setup(
        63,
        "[relay]\nallow_networks = [\"127.0.0.1/32\"]\n[domains.remote.\"backup.test\"]\nrelay_allowed = true\n",
    );
    s.dns.mx("backup.test", &[(10, "mx.remote.test")]);
    // A client outside the relay networks claiming to be example.test is not signed for.
    let mut c = Client::connect_from("127.63.0.9", s.running.smtp_addrs[0]);
    assert_eq!(c.greeting().code, 220);
    assert_eq!(c.cmd("EHLO stranger.test").code, 250);
    let forged = b"From: ceo@example.test\r\nSubject: wire money\r\n\r\nnow\r\n";
    assert_eq!(c.transaction("ceo@example.test", &["victim@backup.test"], forged).code, 250);
    // A trusted client, but a From: domain without a key.
    send(s.running.smtp_addrs[0], "a@other.test", &["r@remote.test"], b"From: a@other.test\r\n\r\nhi\r\n");
    let got = received(&s.peer, 2);
    for m in &got {
        assert_eq!(signatures(&[b"\r\n", &m.data[..]].concat()), 0, "{}", String::from_utf8_lossy(&m.data));
    }
    assert_eq!(metric(&s.running, "mailroot_dkim_signing_total{result=\"no_key\"}"), 1.0);
    s.running.stop();
}

#[test]
fn notifications_are_signed_by_the_parent_domain_of_the_host_name() {
    let s = setup(64, "");
    // The peer refuses p5… recipients: the (remote) sender gets a failure report, from
    // MAILER-DAEMON@mx.example.test, signed for example.test (DMARC-aligned, relaxed).
    send(
        s.running.smtp_addrs[0],
        "sender@remote.test",
        &["p5nobody@remote.test"],
        b"From: sender@remote.test\r\nSubject: x\r\n\r\nx\r\n",
    );
    let got = &received(&s.peer, 1)[0];
    let text = String::from_utf8_lossy(&got.data);
    assert!(text.contains("MAILER-DAEMON@mx.example.test"), "{text}");
    pass(&verify(&s.dns, &got.data), &["e1", "s1"]);
    s.running.stop();
}

#[test]
fn unsafe_or_broken_keys_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = mailroot::publish::keygen("example.test", "s1", "ed25519", dir.path()).unwrap();
    let conf = |k: &Path| {
        let text = format!("[dkim.\"example.test\"]\nselector = \"s1\"\nkey = \"{}\"\n", k.display());
        config(&dir.path().join("mr"), &text)
    };
    let security = |k: &Path| mailroot::config::Security::load(&conf(k)).err().map(|e| e.to_string());
    assert_eq!(security(&key), None);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(security(&key).unwrap().contains("readable by every user"), "{:?}", security(&key));
    let junk = dir.path().join("junk.key");
    std::fs::write(&junk, "not a key").unwrap();
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(security(&junk).unwrap().contains("not a PEM private key"), "{:?}", security(&junk));
    // keygen never writes over a key that may be in use.
    assert!(mailroot::publish::keygen("example.test", "s1", "ed25519", dir.path()).is_err());
}

#[test]
fn a_reload_adds_and_removes_keys() {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start();
    let (key, record) = mailroot::publish::keygen("example.test", "r1", "ed25519", &dir.path().join("keys")).unwrap();
    dns.txt("r1._domainkey.example.test", &record);
    let peer = Peer::start("127.65.0.1", 0, Behavior::default());
    dns.mx("remote.test", &[(10, "mx.remote.test")]);
    dns.a("mx.remote.test", &["127.65.0.1"]);
    let path = dir.path().join("mailroot.toml");
    let write = |dkim: bool| {
        let section = if dkim {
            format!("[dkim.\"example.test\"]\nselector = \"r1\"\nkey = \"{}\"\n", key.display())
        } else {
            String::new()
        };
        let text = format!(
            "[server]\nhostname = \"{HOST}\"\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"1s\"\n[mailroot]\npath = \"spool\"\n\
             [domains]\nlocal = [\"example.test\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [delivery]\nnameservers = [\"{}\"]\nremote_port = {}\n{section}",
            dns.addr,
            peer.addr.port()
        );
        std::fs::write(&path, text).unwrap();
    };
    write(false);
    let loaded = mailroot::config::Config::load(Some(&path)).unwrap();
    let options = mailroot::daemon::StartOptions { handle_signals: false, config_path: Some(path.clone()) };
    let running = mailroot::daemon::start(loaded.config, options).unwrap();
    let body = b"From: a@example.test\r\nSubject: r\r\n\r\nr\r\n";
    send(running.smtp_addrs[0], "a@example.test", &["x@remote.test"], body);
    assert_eq!(signatures(&[b"\r\n", &received(&peer, 1)[0].data[..]].concat()), 0);
    write(true);
    running.reload().unwrap();
    send(running.smtp_addrs[0], "a@example.test", &["y@remote.test"], body);
    let got = &received(&peer, 2)[1];
    pass(&verify(&dns, &got.data), &["r1"]);
    write(false);
    running.reload().unwrap();
    send(running.smtp_addrs[0], "a@example.test", &["z@remote.test"], body);
    assert_eq!(signatures(&[b"\r\n", &received(&peer, 3)[2].data[..]].concat()), 0);
    running.stop();
}
