//! Access and security end to end: STARTTLS through a real TLS client, AUTH, the relay policy,
//! access lists, per-address limits, BDAT, SMTP smuggling and the error tarpit — all against the
//! real daemon over loopback.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A self-signed certificate for HOST in `dir`, and a TLS client config that trusts it.
fn certificate(dir: &Path) -> (String, Arc<rustls::ClientConfig>) {
    let cert = rcgen::generate_simple_self_signed(vec![HOST.to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let toml =
        format!("[tls]\ncert = \"{}\"\nkey = \"{}\"\n", dir.join("cert.pem").display(), dir.join("key.pem").display());
    (toml, Arc::new(client))
}

/// A users file with alice/secret; returns its TOML section.
fn users(dir: &Path, plaintext_loopback: bool) -> String {
    let hash = mailroot_actors::auth::hash_password("secret").unwrap();
    let path = dir.join("users.toml");
    std::fs::write(&path, format!("[users]\n\"alice\" = \"{hash}\"\n")).unwrap();
    format!("[auth]\nusers_file = \"{}\"\nallow_plaintext_loopback = {plaintext_loopback}\n", path.display())
}

/// An SMTP client that can switch to TLS after STARTTLS.
struct TlsClient {
    stream: Option<BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>>,
    plain: Option<BufReader<TcpStream>>,
}

impl TlsClient {
    fn connect(addr: SocketAddr) -> TlsClient {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = TlsClient { stream: None, plain: Some(BufReader::new(s)) };
        assert_eq!(c.read().0, 220);
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        match (&mut self.stream, &mut self.plain) {
            (Some(s), _) => s.get_mut().write_all(bytes).unwrap(),
            (None, Some(p)) => p.get_mut().write_all(bytes).unwrap(),
            _ => unreachable!(),
        }
    }

    fn read(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = match (&mut self.stream, &mut self.plain) {
                (Some(s), _) => s.read_line(&mut line).unwrap_or(0),
                (None, Some(p)) => p.read_line(&mut line).unwrap_or(0),
                _ => 0,
            };
            if n == 0 {
                return (0, text);
            }
            text.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return (line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0), text);
            }
        }
    }

    fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send(format!("{line}\r\n").as_bytes());
        self.read()
    }

    /// Connected, through EHLO, STARTTLS and the handshake, and EHLO again: ready for mail.
    fn encrypted(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> TlsClient {
        let mut c = TlsClient::connect(addr);
        assert_eq!(c.cmd("EHLO client.test").0, 250);
        assert_eq!(c.cmd("STARTTLS").0, 220);
        c.upgrade(config);
        assert_eq!(c.cmd("EHLO client.test").0, 250);
        c
    }

    /// Connected to an implicit-TLS listener (port 465): the handshake, then the greeting.
    fn implicit(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> TlsClient {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = TlsClient { stream: None, plain: Some(BufReader::new(s)) };
        c.upgrade(config);
        assert_eq!(c.read().0, 220);
        c
    }

    /// The handshake after a 220 to STARTTLS.
    fn upgrade(&mut self, config: &Arc<rustls::ClientConfig>) {
        let plain = self.plain.take().unwrap();
        assert!(plain.buffer().is_empty(), "nothing may follow the 220 in clear text");
        let tcp = plain.into_inner();
        let conn = rustls::ClientConnection::new(config.clone(), HOST.try_into().unwrap()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).unwrap();
        }
        self.stream = Some(BufReader::new(tls));
    }
}

/// No remote delivery attempts leave the test: DNS goes to a port where nothing answers.
const NO_DNS: &str = "[delivery]\nnameservers = [\"127.0.0.1:9\"]\ndns_timeout = \"1s\"\n";

#[test]
fn starttls_with_a_real_client_and_injection_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, client) = certificate(dir.path());
    let running = start(config(dir.path(), &format!("{tls}{NO_DNS}")));
    let addr = running.smtp_addrs[0];

    let mut c = TlsClient::connect(addr);
    let (code, ehlo) = c.cmd("EHLO client.test");
    assert!(code == 250 && ehlo.contains("250-STARTTLS"), "{ehlo}");
    assert_eq!(c.cmd("STARTTLS").0, 220);
    c.upgrade(&client);
    let (code, ehlo) = c.cmd("EHLO client.test");
    assert!(code == 250 && !ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(c.cmd("MAIL FROM:<a@remote.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<tls@example.test>").0, 250);
    assert_eq!(c.cmd("DATA").0, 354);
    c.send(b"Subject: over TLS\r\n\r\nsecret\r\n.\r\n");
    let (code, text) = c.read();
    assert_eq!(code, 250, "{text}");
    let id: u64 = text.trim().rsplit(' ').next().unwrap().parse().unwrap();
    let f = parse_drop(&drop_file(dir.path(), id));
    assert!(f.received.contains("with ESMTPS"), "{}", f.received);
    assert_eq!(metric(&running, "mailroot_inbound_tls_total"), 1.0);

    // CVE-2011-0411: commands sent in clear text right after STARTTLS must not run after the
    // handshake. If MAIL had been kept, the RCPT below would be accepted.
    let mut c = TlsClient::connect(addr);
    c.cmd("EHLO client.test");
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\n");
    assert_eq!(c.read().0, 220);
    c.upgrade(&client);
    assert_eq!(c.cmd("RCPT TO:<victim@example.test>").0, 503, "state from before TLS was kept");
    assert_eq!(c.cmd("EHLO client.test").0, 250);
    assert_eq!(c.cmd("RCPT TO:<victim@example.test>").0, 503);
    running.stop();
}

#[test]
fn tls_required_refuses_mail_in_clear_text() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, client) = certificate(dir.path());
    let running = start(config(dir.path(), &format!("{tls}required = true\n{NO_DNS}")));
    let mut c = TlsClient::connect(running.smtp_addrs[0]);
    c.cmd("EHLO client.test");
    assert_eq!(c.cmd("MAIL FROM:<a@remote.test>").0, 530);
    assert_eq!(c.cmd("STARTTLS").0, 220);
    c.upgrade(&client);
    c.cmd("EHLO client.test");
    assert_eq!(c.cmd("MAIL FROM:<a@remote.test>").0, 250);
    running.stop();
}

#[test]
fn auth_plain_and_login_over_tls_then_relay() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, client) = certificate(dir.path());
    let extra = format!("{tls}{}[relay]\nallow_networks = []\n{NO_DNS}", users(dir.path(), false));
    let running = start(config(dir.path(), &extra));
    let addr = running.smtp_addrs[0];

    // In clear text AUTH is neither offered nor accepted.
    let mut c = TlsClient::connect(addr);
    let (_, ehlo) = c.cmd("EHLO client.test");
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert_eq!(c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").0, 538);

    let mut c = TlsClient::connect(addr);
    c.cmd("EHLO client.test");
    c.cmd("STARTTLS");
    c.upgrade(&client);
    let (_, ehlo) = c.cmd("EHLO client.test");
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN"), "{ehlo}");
    // Not authenticated, not in allow_networks: no relaying.
    assert_eq!(c.cmd("MAIL FROM:<alice@example.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<friend@far.test>").0, 550);
    assert_eq!(c.cmd("RSET").0, 250);
    assert_eq!(c.cmd("AUTH PLAIN AGFsaWNlAHdyb25n").0, 535, "wrong password");
    assert_eq!(c.cmd("AUTH LOGIN").0, 334);
    assert_eq!(c.cmd("YWxpY2U=").0, 334);
    assert_eq!(c.cmd("c2VjcmV0").0, 235);
    assert_eq!(c.cmd("MAIL FROM:<alice@example.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<friend@far.test>").0, 250, "authenticated users may relay");
    assert_eq!(c.cmd("DATA").0, 354);
    c.send(b"Subject: relayed\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.read().0, 250);

    let mut c = TlsClient::encrypted(addr, &client);
    assert_eq!(c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").0, 235);
    assert_eq!(metric(&running, "mailroot_auth_total{result=\"success\"}"), 2.0);
    assert_eq!(metric(&running, "mailroot_auth_total{result=\"failure\"}"), 1.0);
    running.stop();
}

#[test]
fn auth_in_clear_text_from_loopback_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{}[relay]\nallow_networks = []\n{NO_DNS}", users(dir.path(), true));
    let running = start(config(dir.path(), &extra));
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    assert_eq!(c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").code, 235);
    assert_eq!(c.cmd("MAIL FROM:<alice@example.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<friend@far.test>").code, 250);
    running.stop();
}

/// With `[auth.senders]`, an authenticated user sends only as the addresses it owns.
#[test]
fn authenticated_users_cannot_send_as_someone_else() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "{}senders = {{ alice = [\"alice@example.test\", \"@alice.test\"] }}\n[relay]\nallow_networks = []\n{NO_DNS}",
        users(dir.path(), true)
    );
    let running = start(config(dir.path(), &extra));
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    assert_eq!(c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").code, 235);
    let r = c.cmd("MAIL FROM:<ceo@example.test>");
    assert_eq!((r.code, r.text.starts_with("5.7.1")), (553, true), "{r:?}");
    assert_eq!(c.cmd("MAIL FROM:<news@alice.test>").code, 250);
    c.cmd("RSET");
    assert_eq!(c.cmd("MAIL FROM:<alice@example.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<friend@far.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    // The From: header is the user's too, or the message is refused at its end.
    c.send(b"From: The CEO <ceo@example.test>\r\nSubject: wire money\r\n\r\nx\r\n.\r\n");
    let r = c.read_reply().unwrap();
    assert_eq!((r.code, r.text.starts_with("5.7.1")), (550, true), "{r:?}");
    assert_eq!(c.cmd("MAIL FROM:<alice@example.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<friend@far.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"From: Alice <alice@example.test>\r\nSubject: hi\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.read_reply().unwrap().code, 250);
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"sender_login_mismatch\"}"), 2.0);
    running.stop();
    // A pattern that is not an address is a configuration error naming the key.
    let bad = mailroot::config::Config::from_toml("[auth.senders]\nalice = [\"alice\"]\n");
    assert!(bad.unwrap_err().to_string().starts_with("auth.senders"));
}

/// Failed AUTH attempts are counted per client address across connections (like Postfix's
/// anvil): after `max_failures`, even the right password gets 454 4.7.0, unchecked, from that
/// address, while other addresses are unaffected; it ends with the window.
#[test]
fn failed_auth_locks_an_address_out_across_connections() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{}max_failures = 3\nfailure_window = \"2s\"\n", users(dir.path(), true));
    let running = start(config(dir.path(), &extra));
    let addr = running.smtp_addrs[0];
    let auth = |from: &str, b64: &str| {
        let mut c = Client::connect_from(from, addr);
        assert_eq!(c.greeting().code, 220);
        assert_eq!(c.cmd("EHLO client.test").code, 250);
        c.cmd(&format!("AUTH PLAIN {b64}"))
    };
    const GOOD: &str = "AGFsaWNlAHNlY3JldA==";
    const BAD: &str = "AGFsaWNlAHdyb25n";
    // One password per connection, as a guesser spreading attempts would.
    for _ in 0..3 {
        assert_eq!(auth("127.0.0.7", BAD).code, 535);
    }
    let r = auth("127.0.0.7", GOOD);
    assert_eq!((r.code, r.text.starts_with("4.7.0")), (454, true), "{r:?}");
    assert_eq!(auth("127.0.0.8", GOOD).code, 235, "another address is not locked out");
    assert_eq!(metric(&running, "mailroot_auth_total{result=\"locked_out\"}"), 1.0);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(auth("127.0.0.7", GOOD).code, 235, "the window has passed");
    running.stop();
}

#[test]
fn relay_policy_never_an_open_relay() {
    let dir = tempfile::tempdir().unwrap();
    let extra =
        format!("[relay]\nallow_networks = [\"127.0.0.2/32\"]\n[domains.remote.\"backup.test\"]\nrelay_allowed = true\n{NO_DNS}");
    let running = start(config(dir.path(), &extra));
    let addr = running.smtp_addrs[0];
    // The open-relay test: an outsider may send to us and to domains we back up, nowhere else.
    let mut c = Client::connect_from("127.0.0.5", addr);
    assert_eq!(c.greeting().code, 220);
    c.cmd("EHLO outsider.test");
    assert_eq!(c.cmd("MAIL FROM:<spam@outsider.test>").code, 250);
    let r = c.cmd("RCPT TO:<victim@far.test>");
    assert_eq!((r.code, r.text.starts_with("5.7.1")), (550, true), "{r:?}");
    assert_eq!(c.cmd("RCPT TO:<victim@FAR.TEST>").code, 550);
    assert_eq!(c.cmd("RCPT TO:<user@example.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<user@backup.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<\"victim@far.test\"@example.test>").code, 250, "a quoted local part stays local");
    // An allowed network relays.
    let mut c = Client::connect_from("127.0.0.2", addr);
    assert_eq!(c.greeting().code, 220);
    c.cmd("EHLO insider.test");
    assert_eq!(c.cmd("MAIL FROM:<me@example.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<friend@far.test>").code, 250);
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"relay_denied\"}"), 2.0);
    running.stop();
}

/// The first reply on a connection from `local`, and whether the server then closed it.
fn first_reply(local: &str, addr: SocketAddr) -> (u16, bool) {
    let mut c = Client::connect_from(local, addr);
    let code = c.read_reply().map(|r| r.code).unwrap_or(0);
    let closed = c.read_reply().is_none();
    (code, closed)
}

#[test]
fn access_lists() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &format!("[access]\ndeny = [\"127.0.0.6/32\"]\n{NO_DNS}")));
    assert_eq!(first_reply("127.0.0.6", running.smtp_addrs[0]), (554, true));
    let mut c = Client::connect_from("127.0.0.7", running.smtp_addrs[0]);
    assert_eq!(c.greeting().code, 220);
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"access_denied\"}"), 1.0);
    running.stop();

    let dir = tempfile::tempdir().unwrap();
    let extra = format!("[access]\nallow = [\"127.0.0.0/30\"]\ndeny = [\"127.0.0.2/32\"]\n{NO_DNS}");
    let running = start(config(dir.path(), &extra));
    let addr = running.smtp_addrs[0];
    assert_eq!(first_reply("127.0.0.8", addr), (554, true), "outside the allow list");
    assert_eq!(first_reply("127.0.0.2", addr), (554, true), "deny wins over allow");
    assert_eq!(Client::connect_from("127.0.0.1", addr).greeting().code, 220);
    running.stop();
}

#[test]
fn per_address_limits() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("[access]\nmax_connections_per_ip = 2\nmax_connections_per_ip_per_minute = 3\n{NO_DNS}");
    let running = start(config(dir.path(), &extra));
    let addr = running.smtp_addrs[0];
    let mut a = Client::connect_from("127.0.0.10", addr);
    let mut b = Client::connect_from("127.0.0.10", addr);
    assert_eq!((a.greeting().code, b.greeting().code), (220, 220));
    assert_eq!(first_reply("127.0.0.10", addr), (421, true), "a third open connection");
    assert_eq!(Client::connect_from("127.0.0.11", addr).greeting().code, 220, "another address is not affected");
    a.cmd("QUIT");
    drop(a);
    // The closed connection frees its place (as soon as the server has seen it close).
    let mut c = wait_for("a place for a new connection", Duration::from_secs(10), || {
        let mut c = Client::connect_from("127.0.0.10", addr);
        (c.read_reply()?.code == 220).then_some(c)
    });
    c.cmd("QUIT");
    drop(b.cmd("QUIT"));
    // Three connections from .10 were let in within the minute (a, b, c; refused attempts do
    // not count): the next is over the rate, though none is open.
    let (code, _) = first_reply("127.0.0.10", addr);
    assert_eq!(code, 421);
    assert!(metric(&running, "mailroot_refusals_total{cause=\"connection_rate\"}") >= 1.0);
    // At least the third connection; a retry above may have been early too.
    assert!(metric(&running, "mailroot_refusals_total{cause=\"too_many_connections_from_ip\"}") >= 1.0);
    running.stop();
}

#[test]
fn bdat_pipelined_oversize_and_mixed_with_data() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &format!("[limits]\nmax_message_size = 4096\n{NO_DNS}")));
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    // Everything in one write: envelope, three chunks, QUIT.
    let (p1, p2, p3) = ("Subject: chunked\r\n", "\r\nfirst line\r\n.dot line\r\n", "last line\r\n");
    c.send(
        format!(
            "MAIL FROM:<a@remote.test>\r\nRCPT TO:<x@example.test>\r\nBDAT {}\r\n{p1}BDAT {}\r\n{p2}BDAT {} LAST\r\n{p3}",
            p1.len(),
            p2.len(),
            p3.len()
        )
        .as_bytes(),
    );
    let codes: Vec<u16> = (0..5).map(|_| c.read_reply().unwrap().code).collect();
    assert_eq!(codes, vec![250, 250, 250, 250, 250]);
    let f = wait_for("the chunked message in Drop", Duration::from_secs(10), || {
        drop_files(dir.path()).first().map(|p| parse_drop(&std::fs::read(p).unwrap()))
    });
    assert_eq!(f.message, format!("{p1}{p2}{p3}").as_bytes(), "BDAT content is taken as is, dots included");
    // Chunks that together grow larger than max_message_size: 552, and the session goes on.
    assert_eq!(c.cmd("MAIL FROM:<a@remote.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<x@example.test>").code, 250);
    let half = "0123456789abcdef\r\n".repeat(150);
    c.send(format!("BDAT {n}\r\n{half}BDAT {n} LAST\r\n{half}", n = half.len()).as_bytes());
    assert_eq!(c.read_reply().unwrap().code, 250);
    assert_eq!(c.read_reply().unwrap().code, 552);
    assert_eq!(c.cmd("NOOP").code, 250);
    // BDAT then DATA in one message: refused.
    assert_eq!(c.cmd("MAIL FROM:<a@remote.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<x@example.test>").code, 250);
    c.send(b"BDAT 3\r\nabc");
    assert_eq!(c.read_reply().unwrap().code, 250);
    assert_eq!(c.cmd("DATA").code, 503);
    // One chunk larger than a whole message may be, up to 2^64 and beyond: its octets are not
    // read (that could take forever), the client gets 552 and the connection ends.
    for size in ["5000", "18446744073709551615", "18446744073709551616"] {
        let mut c = Client::ready(running.smtp_addrs[0], "client.test");
        assert_eq!(c.cmd("MAIL FROM:<a@remote.test>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<x@example.test>").code, 250);
        c.send(format!("BDAT {size} LAST\r\n0123456789").as_bytes());
        assert_eq!(c.read_reply().unwrap().code, 552, "{size}");
        assert!(c.read_reply().is_none(), "{size}: the connection is closed");
    }
    running.stop();
}

#[test]
fn smuggling_never_yields_a_second_message() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), NO_DNS));
    let addr = running.smtp_addrs[0];
    let smuggled = "MAIL FROM:<admin@example.test>\r\nRCPT TO:<smuggled@example.test>\r\nDATA\r\nSubject: forged\r\n\r\nforged\r\n";
    let ends = ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n", "\r\n.\r", "\r.\r", "\n.\r"];
    for end in ends {
        let mut c = Client::ready(addr, "client.test");
        assert_eq!(c.cmd("MAIL FROM:<a@remote.test>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<x@example.test>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(format!("Subject: real\r\n\r\nbody{end}{smuggled}.\r\n").as_bytes());
        let r = c.read_reply().unwrap();
        assert_eq!(r.code, 554, "{end:?}: {r:?}");
        // Exactly one reply: no second transaction was seen.
        assert_eq!(c.cmd("NOOP").code, 250, "{end:?}");
        // The same through BDAT: one message, the "smuggled" text inside it.
        let content = format!("Subject: real\r\n\r\nbody\r\n.\r\n{smuggled}");
        c.cmd("MAIL FROM:<a@remote.test>");
        c.cmd("RCPT TO:<chunked@example.test>");
        c.send(format!("BDAT {} LAST\r\n{content}", content.len()).as_bytes());
        assert_eq!(c.read_reply().unwrap().code, 250);
        assert_eq!(c.cmd("NOOP").code, 250);
    }
    wait_metric(&running, "mailroot_queue_messages", |v| v == 0.0);
    let drops: Vec<DropFile> = drop_files(dir.path()).iter().map(|p| parse_drop(&std::fs::read(p).unwrap())).collect();
    assert_eq!(drops.len(), ends.len(), "one message per BDAT transaction, none from DATA");
    assert!(
        drops.iter().all(|d| d.receivers == vec!["chunked@example.test"]),
        "nothing reached the smuggled recipient"
    );
    running.stop();
}

#[test]
fn tarpit_slows_errors_and_max_errors_closes() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &format!("[limits]\nerror_delay = \"200ms\"\nmax_errors = 4\n{NO_DNS}")));
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    let t = Instant::now();
    for _ in 0..3 {
        assert_eq!(c.cmd("BOGUS").code, 500);
    }
    // 200 + 400 + 600 ms at least.
    assert!(t.elapsed() >= Duration::from_millis(1200), "{:?}", t.elapsed());
    assert_eq!(c.cmd("NOOP").code, 250);
    assert_eq!(c.cmd("BOGUS").code, 500);
    assert_eq!(c.read_reply().map(|r| r.code), Some(421));
    assert!(c.read_reply().is_none(), "closed after max_errors");
    running.stop();
}

/// Loopback clients only here: by RFC 6761 the resolver answers `localhost` for every
/// 127.x.y.z PTR query itself, and `localhost` resolves to 127.0.0.1 only — so 127.0.0.1 is
/// verified and any other 127 address fails the forward check, which exercises both paths.
#[test]
fn reverse_dns_notes_in_the_received_header() {
    let dns = common::dns::DnsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let extra =
        format!("[access]\nreverse_dns = true\n[delivery]\nnameservers = [\"{}\"]\ndns_timeout = \"1s\"\n", dns.addr);
    let running = start(config(dir.path(), &extra));
    let addr = running.smtp_addrs[0];
    let received = |from: &str, helo: &str| {
        let mut c = Client::connect_from(from, addr);
        assert_eq!(c.greeting().code, 220);
        assert_eq!(c.cmd(&format!("EHLO {helo}")).code, 250);
        let id = c.transaction("a@remote.test", &["x@example.test"], b"Subject: r\r\n\r\nx\r\n").queue_id().unwrap();
        parse_drop(&drop_file(dir.path(), id)).received.lines().next().unwrap_or("").to_string()
    };
    assert_eq!(received("127.0.0.1", "localhost"), "Received: from localhost (localhost [127.0.0.1])");
    assert_eq!(
        received("127.0.0.1", "liar.test"),
        "Received: from liar.test (localhost [127.0.0.1]; EHLO name does not match)"
    );
    assert_eq!(
        received("127.0.0.21", "localhost"),
        "Received: from localhost (unknown [127.0.0.21]; no verified reverse DNS)"
    );
    running.stop();
}

/// A client that drips a command one byte at a time is cut once it falls below
/// `min_transfer_rate` over a window; a client that pauses between whole commands is not.
#[test]
fn slow_drip_clients_are_cut() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "min_transfer_rate = 100\nmin_transfer_window = \"2s\"\n";
    let running = start(config(dir.path(), extra));
    let addr = running.smtp_addrs[0];
    let started = std::time::Instant::now();
    let mut slow = Client::ready(addr, "client.test");
    // One byte every 250 ms (4 bytes/s), until the server has had enough.
    let line = b"MAIL FROM:<someone@example.test>\r\n";
    for b in line {
        use std::io::Write;
        if slow.writer.write_all(&[*b]).is_err() || started.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let cut = slow.read_reply();
    let r = cut.expect("a reply before the end of the line");
    assert_eq!((r.code, r.text.contains("too slow")), (421, true), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(6), "cut after {:?}", started.elapsed());
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"too_slow\"}"), 1.0);
    // A command started and then nothing: cut at the end of the window, not at the (5-minute)
    // idle timeout.
    let started = std::time::Instant::now();
    let mut stalled = Client::ready(addr, "client.test");
    stalled.send(b"MAIL FROM:<some");
    let r = stalled.read_reply().expect("a reply");
    assert_eq!((r.code, r.text.contains("too slow")), (421, true), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(6), "cut after {:?}", started.elapsed());
    // Pauses between whole commands are idle time, not slowness.
    let mut patient = Client::ready(addr, "client.test");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(patient.cmd("NOOP").code, 250);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(patient.cmd("QUIT").code, 221);
    running.stop();
}

/// Under stress (open connections at 3/4 of `max_connections`), idle clients get the short
/// `stress_idle_timeout`, so connections held open by idle clients make room for new ones.
#[test]
fn idle_clients_make_room_under_stress() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "max_connections = 8\nstress_idle_timeout = \"1s\"\n[access]\nmax_connections_per_ip = 0\n";
    let running = start(config(dir.path(), extra));
    let addr = running.smtp_addrs[0];
    let mut idle: Vec<Client> = (0..8).map(|_| Client::ready(addr, "idle.test")).collect();
    // Full: the next one is refused at once.
    let mut refused = Client::connect(addr);
    assert_eq!(refused.greeting().code, 421);
    // Idle ones are cut after the stress timeout (the idle timeout is 5 minutes) until fewer
    // than 3/4 are open: three or so of them here (sessions that look at the same moment may
    // both go), within seconds, and not all...
    let t0 = std::time::Instant::now();
    // The stress timeout (1 s) checked at least once a second: done within 3 s.
    std::thread::sleep(Duration::from_secs(3));
    let mut cut = 0;
    for c in &mut idle {
        c.writer.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        if c.read_reply().is_some_and(|r| r.code == 421) {
            cut += 1;
        }
    }
    assert!((3..8).contains(&cut), "{cut} cut ({:?})", t0.elapsed());
    // ... and a new client gets in.
    let mut fresh = wait_for("a free slot", Duration::from_secs(5), || {
        let mut c = Client::connect(addr);
        (c.greeting().code == 220).then_some(c)
    });
    assert_eq!(fresh.cmd("QUIT").code, 221);
    running.stop();
}

/// Message bodies go to the queue store in pieces as they arrive, so a session holds at most
/// about one piece (64 KiB) plus one read of its message; what sessions hold shares one memory
/// budget (`max_body_memory`): a message that does not fit is dropped at once, drained, and
/// refused with 452 4.3.1, and the session goes on; once the budget has room again, the same
/// message is accepted. A client that leaves mid-message gives its share back.
#[test]
fn bodies_in_memory_share_one_budget() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 1024 * 1024;
    let extra = format!("[limits]\nmax_body_memory = {budget}\n");
    let running = start(config(dir.path(), &extra));
    let addr = running.smtp_addrs[0];
    // 60,000 bytes: below one piece, so each session holds all of it (in a buffer of up to
    // twice that); twenty of them need more than the budget, eight fit whatever the buffers.
    let body = format!("Subject: held\r\n\r\n{}", "0123456789012345678901234567890123456789012345678\r\n".repeat(1176));
    let open = |c: &mut Client| {
        assert_eq!(c.cmd("MAIL FROM:<a@remote.test>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<x@example.test>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
    };
    let mut holders: Vec<Client> = (0..20)
        .map(|i| {
            let mut c = Client::ready(addr, &format!("h{i}.test"));
            open(&mut c);
            c.send(body.as_bytes());
            c
        })
        .collect();
    wait_for("the bodies to arrive", Duration::from_secs(10), || {
        (metric(&running, "mailroot_body_memory_bytes") >= (budget - 2 * 60_000) as f64).then_some(())
    });
    assert!(metric(&running, "mailroot_body_memory_bytes") <= budget as f64);
    let mut refused = Vec::new();
    for (i, c) in holders.iter_mut().enumerate() {
        c.send(b".\r\n");
        let r = c.read_reply().unwrap();
        match r.code {
            250 => {}
            452 if r.text.starts_with("4.3.1") => refused.push(i),
            _ => panic!("{r:?}"),
        }
    }
    assert!(!refused.is_empty() && refused.len() <= 12, "some, not all, were refused: {refused:?}");
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"no_room\"}"), refused.len() as f64);
    wait_metric(&running, "mailroot_body_memory_bytes", |v| v == 0.0);
    // Those refused try again and fit.
    for i in &refused {
        let c = &mut holders[*i];
        open(c);
        c.send(body.as_bytes());
        c.send(b".\r\n");
        assert_eq!(c.read_reply().unwrap().code, 250);
    }
    // A client that goes away in the middle of its message gives its share back.
    let mut gone = Client::ready(addr, "gone.test");
    open(&mut gone);
    gone.send(body.as_bytes());
    wait_metric(&running, "mailroot_body_memory_bytes", |v| v >= 60_000.0);
    drop(gone);
    wait_metric(&running, "mailroot_body_memory_bytes", |v| v == 0.0);
    running.stop();
}

/// Listeners with roles (RFC 6409, RFC 8314): `[server] listen` is the `mx` listener; a
/// `submission` listener wants STARTTLS then AUTH before MAIL, even from a relay network; a
/// `submissions` listener speaks TLS from the first byte; each is counted apart.
#[test]
fn listeners_with_roles() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, client) = certificate(dir.path());
    let extra = format!(
        "{tls}{}[listeners.submission]\nrole = \"submission\"\nlisten = [\"127.0.0.1:0\"]\n\
         [listeners.submissions]\nrole = \"submissions\"\nlisten = [\"127.0.0.1:0\"]\n\
         [listeners.mx-noauth]\nrole = \"mx\"\nlisten = [\"127.0.0.1:0\"]\nauth = false\nmax_recipients = 1\n{NO_DNS}",
        users(dir.path(), false)
    );
    let running = start(config(dir.path(), &extra));
    let names: Vec<&str> = running.listeners.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["mx", "mx-noauth", "submission", "submissions"]);
    const AUTH: &str = "AUTH PLAIN AGFsaWNlAHNlY3JldA==";

    // Submission (587): clear text first; mail commands wait for STARTTLS, then for AUTH — the
    // loopback client is in relay.allow_networks, which a submission listener ignores.
    let sub = running.listener_addr("submission").unwrap();
    let mut c = TlsClient::connect(sub);
    let (code, ehlo) = c.cmd("EHLO client.test");
    assert!(code == 250 && ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"), "{ehlo}");
    let (code, text) = c.cmd("MAIL FROM:<alice@example.test>");
    assert!(code == 530 && text.contains("STARTTLS"), "{text}");
    let mut c = TlsClient::encrypted(sub, &client);
    let (code, text) = c.cmd("MAIL FROM:<alice@example.test>");
    assert!(code == 530 && text.contains("5.7.0 Authentication required"), "{text}");
    assert_eq!(c.cmd(AUTH).0, 235);
    assert_eq!(c.cmd("MAIL FROM:<alice@example.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<friend@far.test>").0, 250);
    assert_eq!(c.cmd("DATA").0, 354);
    c.send(b"Subject: submitted\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.read().0, 250);

    // Submissions (465): TLS before the greeting; no STARTTLS offered; AUTH before MAIL.
    let subs = running.listener_addr("submissions").unwrap();
    let mut c = TlsClient::implicit(subs, &client);
    let (code, ehlo) = c.cmd("EHLO client.test");
    assert!(code == 250 && !ehlo.contains("STARTTLS") && ehlo.contains("AUTH PLAIN"), "{ehlo}");
    assert_eq!(c.cmd("MAIL FROM:<alice@example.test>").0, 530);
    assert_eq!(c.cmd(AUTH).0, 235);
    assert_eq!(c.cmd("MAIL FROM:<alice@example.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<friend@far.test>").0, 250);
    assert_eq!(c.cmd("DATA").0, 354);
    c.send(b"Subject: over 465\r\n\r\nx\r\n.\r\n");
    let (code, _) = c.read();
    assert_eq!(code, 250);
    // A client speaking clear text to 465 gets nothing and is dropped.
    let mut plain = Client::connect_from("127.0.0.1", subs);
    plain.send(b"EHLO client.test\r\n");
    assert!(plain.read_reply().is_none(), "no SMTP in clear text on an implicit-TLS port");

    // The mx listener takes mail for local domains without AUTH, and relays only for the relay
    // networks (loopback here) — as before.
    let mut c = Client::ready(running.listener_addr("mx").unwrap(), "client.test");
    let r = c.transaction("someone@far.test", &["postmaster@example.test"], b"Subject: in\r\n\r\nx\r\n");
    assert_eq!(r.code, 250);
    // Its own settings: no AUTH offered, one recipient per message.
    let mut c = TlsClient::encrypted(running.listener_addr("mx-noauth").unwrap(), &client);
    let (_, ehlo) = c.cmd("EHLO client.test");
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert_eq!(c.cmd(AUTH).0, 502);
    assert_eq!(c.cmd("MAIL FROM:<a@far.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<a@example.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<b@example.test>").0, 452);

    for (name, at_least) in [("mx", 1.0), ("mx-noauth", 1.0), ("submission", 2.0), ("submissions", 2.0)] {
        let n = metric(&running, &format!("mailroot_listener_connections_total{{listener=\"{name}\"}}"));
        assert!(n >= at_least, "{name}: {n}");
    }
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"auth_required\"}"), 2.0);
    running.stop();
}

/// What a listener needs is checked before anything starts, naming the key.
#[test]
fn listener_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, _) = certificate(dir.path());
    let auth = users(dir.path(), false);
    let cases = [
        ("[listeners.s]\nrole = \"relay\"\nlisten = [\"127.0.0.1:0\"]\n".to_string(), "listeners.\"s\".role"),
        ("[listeners.s]\nrole = \"mx\"\n".to_string(), "listeners.\"s\".listen"),
        ("[listeners.S]\nrole = \"mx\"\nlisten = [\"127.0.0.1:0\"]\n".to_string(), "listeners.\"S\""),
        (format!("{tls}[listeners.s]\nrole = \"submission\"\nlisten = [\"127.0.0.1:0\"]\n"), "listeners.\"s\": role \"submission\" needs AUTH"),
        (format!("{auth}[listeners.s]\nrole = \"submissions\"\nlisten = [\"127.0.0.1:0\"]\n"), "listeners.\"s\": role \"submissions\" needs a certificate"),
        (format!("{tls}{auth}[listeners.s]\nrole = \"submission\"\nlisten = [\"127.0.0.1:0\"]\nauth = false\n"), "listeners.\"s\".auth"),
        (format!("{tls}{auth}[listeners.s]\nrole = \"submission\"\nlisten = [\"127.0.0.1:0\"]\nrelay_networks = [\"10.0.0.0/8\"]\n"), "listeners.\"s\".relay_networks"),
        ("[listeners.mx]\nrole = \"mx\"\nlisten = [\"127.0.0.1:0\"]\n".to_string(), "listeners.\"mx\""),
        ("[listeners.b]\nrole = \"mx\"\nlisten = [\"127.0.0.1:2599\"]\n[listeners.c]\nrole = \"mx\"\nlisten = [\"127.0.0.1:2599\"]\n".to_string(), "listeners.\"c\": 127.0.0.1:2599 is also"),
    ];
    for (extra, want) in cases {
        let text = format!("[server]\nhostname = \"{HOST}\"\nlisten = [\"127.0.0.1:0\"]\n{extra}");
        let e = mailroot::config::Config::from_toml(&text).unwrap_err().to_string();
        assert!(e.starts_with(want), "{extra}\n=> {e}");
    }
    // [server] listen may be empty once a listener is named.
    let text = format!(
        "[server]\nhostname = \"{HOST}\"\nlisten = []\n[listeners.in]\nrole = \"mx\"\nlisten = [\"127.0.0.1:0\"]\n"
    );
    assert!(mailroot::config::Config::from_toml(&text).is_ok());
    let e = mailroot::config::Config::from_toml("[server]\nlisten = []\n").unwrap_err().to_string();
    assert!(e.starts_with("server.listen"), "{e}");
}

/// Rates across connections (Postfix's anvil): messages per client address, unknown recipients
/// per client (directory harvesting ends the connection), relay networks exempt.
#[test]
fn rate_limits_across_connections() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[relay]\nallow_networks = [\"127.0.0.2/32\"]\n[checks]\nenabled = false\n\
         [rates]\nmessages_per_client = 2\nfailed_recipients_per_client = 2\n\
         [domains]\nlocal = [\"example.test\"]\n[recipients.\"example.test\"]\nusers = [\"alice\"]\n{NO_DNS}"
    );
    let running = start(config(dir.path(), &extra));
    let addr = running.smtp_addrs[0];
    let session = |from: &str| {
        let mut c = Client::connect_from(from, addr);
        assert_eq!(c.greeting().code, 220);
        assert_eq!(c.cmd("EHLO client.test").code, 250);
        c
    };
    let mut c = session("127.0.0.5");
    assert_eq!(c.transaction("a@far.test", &["alice@example.test"], b"Subject: 1\r\n\r\nx\r\n").code, 250);
    let mut d = session("127.0.0.5");
    assert_eq!(d.transaction("a@far.test", &["alice@example.test"], b"Subject: 2\r\n\r\nx\r\n").code, 250);
    let r = c.cmd("MAIL FROM:<a@far.test>");
    assert_eq!((r.code, r.text.starts_with("4.7.1")), (450, true), "{r:?}");
    // Another address has its own count; a relay network none at all.
    let mut e = session("127.0.0.6");
    assert_eq!(e.cmd("MAIL FROM:<a@far.test>").code, 250);
    let mut f = session("127.0.0.2");
    for _ in 0..3 {
        assert_eq!(f.transaction("a@far.test", &["alice@example.test"], b"Subject: r\r\n\r\nx\r\n").code, 250);
    }
    // Guessing addresses: two unknown recipients are refused, the third ends the connection.
    assert_eq!(e.cmd("RCPT TO:<bob@example.test>").code, 550);
    assert_eq!(e.cmd("RCPT TO:<carol@example.test>").code, 550);
    let r = e.cmd("RCPT TO:<dave@example.test>");
    assert_eq!((r.code, r.text.starts_with("4.7.0")), (421, true), "{r:?}");
    assert!(e.read_reply().is_none(), "closed");
    for (cause, n) in [("message_rate", 1.0), ("harvest_rate", 1.0), ("unknown_recipient", 2.0)] {
        assert_eq!(metric(&running, &format!("mailroot_refusals_total{{cause=\"{cause}\"}}")), n, "{cause}");
    }
    running.stop();
}

/// A client that connects to an implicit-TLS port and never starts the handshake holds its
/// connection only until the handshake time is up (the idle timeout, when shorter than 30 s).
#[test]
fn a_silent_client_on_an_implicit_tls_port_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, _) = certificate(dir.path());
    let extra = format!(
        "{tls}{}[listeners.submissions]\nrole = \"submissions\"\nlisten = [\"127.0.0.1:0\"]\n{NO_DNS}",
        users(dir.path(), false)
    );
    let mut c = config(dir.path(), &extra);
    c.server.idle_timeout = mailroot::config::HumanDuration(Duration::from_secs(1));
    let running = start(c);
    let mut s = TcpStream::connect(running.listener_addr("submissions").unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "no greeting in clear text, then closed");
    assert!(started.elapsed() < Duration::from_secs(10), "closed after {:?}", started.elapsed());
    wait_metric(&running, "mailroot_listener_connections_current{listener=\"submissions\"}", |v| v == 0.0);
    running.stop();
}
