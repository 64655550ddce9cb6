//! Who inbound mail is from, end to end: SPF, DKIM, ARC and DMARC checked against a real DNS
//! server in the test, messages signed in the test with mail-auth (through our signer), over
//! SMTP from a client outside the relay networks. Each case ends in a reply and, when accepted,
//! in the `Authentication-Results:` header the Drop file carries.

mod common;

use std::path::Path;

use common::dns::{Answer, DnsServer};
use common::*;
use hickory_proto::rr::RecordType;
use mailroot_actors::dkim::{DomainSettings, KeySettings, Signer};

/// A signer for `domain` with an Ed25519 key whose public record is in `dns` under `s1`.
fn signer(dir: &Path, dns: &DnsServer, domain: &str) -> Signer {
    let (key, record) = mailroot::publish::keygen(domain, "s1", "ed25519", &dir.join(domain)).unwrap();
    dns.txt(&format!("s1._domainkey.{domain}"), &record);
    let settings = DomainSettings {
        domain: domain.into(),
        keys: vec![KeySettings { selector: "s1".into(), key_file: key, algorithm: None }],
        headers: Vec::new(),
        oversign: Vec::new(),
        expire: None,
    };
    Signer::load(&[settings]).unwrap()
}

fn message(from: &str, subject: &str) -> Vec<u8> {
    format!("From: <{from}>\r\nTo: <user@example.test>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@x>\r\n\r\nHello.\r\n")
        .into_bytes()
}

fn signed(signer: &Signer, msg: &[u8]) -> Vec<u8> {
    let signature = signer.sign(&mut &msg[..]).unwrap().unwrap();
    [signature, msg.to_vec()].concat()
}

/// The test's DNS: origin.test (SPF allows 127.0.0.1, DMARC p=reject, signs), strict.test
/// (SPF allows only 192.0.2.1, DMARC p=reject), soft.test (same, p=quarantine), broken.test
/// (an SPF record that is a permanent error), slow.test (its DMARC record never answers).
fn zone(dns: &DnsServer) {
    dns.txt("origin.test", "v=spf1 ip4:127.0.0.1 -all");
    dns.txt("_dmarc.origin.test", "v=DMARC1; p=reject");
    for d in ["strict.test", "soft.test"] {
        dns.txt(d, "v=spf1 ip4:192.0.2.1 -all");
    }
    dns.txt("_dmarc.strict.test", "v=DMARC1; p=reject");
    dns.txt("_dmarc.soft.test", "v=DMARC1; p=quarantine");
    dns.txt("broken.test", "v=spf1 ip4:127.0.0.1 redirect=a redirect=b");
    dns.txt("slow.test", "v=spf1 ip4:192.0.2.1 -all");
    dns.set("_dmarc.slow.test", RecordType::TXT, Answer::Silent);
}

fn daemon(dir: &Path, dns: &DnsServer, extra: &str) -> mailroot::daemon::Running {
    let text = format!(
        "[relay]\nallow_networks = [\"127.0.0.2/32\"]\n[delivery]\nnameservers = [\"{}\"]\ndns_timeout = \"1s\"\n{extra}",
        dns.addr
    );
    start(config(dir, &text))
}

/// Our `Authentication-Results:` header in the Drop file of message `id`.
fn header_of_in(dir: &Path, id: u64) -> String {
    let text = dropped(dir, id);
    text.split(&format!("Authentication-Results: {HOST}")).nth(1).unwrap().split("\r\n\r\n").next().unwrap().to_string()
}

/// The Drop file of message `id`, as text.
fn dropped(dir: &Path, id: u64) -> String {
    String::from_utf8_lossy(&drop_file(dir, id)).into_owned()
}

#[test]
fn spf_dkim_dmarc_results_and_policies() {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start();
    zone(&dns);
    let origin = signer(dir.path(), &dns, "origin.test");
    let running = daemon(dir.path(), &dns, "[checks]\ntimeout = \"8s\"\n");
    let addr = running.smtp_addrs[0];
    let mut c = Client::connect_from("127.0.0.1", addr);
    assert_eq!(c.greeting().code, 220);
    assert_eq!(c.cmd("EHLO client.origin.test").code, 250);

    // Signed, from an address SPF allows: everything passes; a forged result claiming our host
    // name is dropped, another server's is kept.
    let forged = format!("Authentication-Results: {HOST}; dkim=pass header.d=bank.test\r\n");
    let theirs = "Authentication-Results: mx.elsewhere.test; spf=fail\r\n";
    let body = [forged.as_bytes(), theirs.as_bytes(), &signed(&origin, &message("alice@origin.test", "good"))].concat();
    let r = c.transaction("alice@origin.test", &["user@example.test"], &body);
    assert_eq!(r.code, 250, "{r:?}");
    let text = dropped(dir.path(), r.queue_id().unwrap());
    let ours: Vec<&str> =
        text.split("\r\n").filter(|l| l.starts_with(&format!("Authentication-Results: {HOST}"))).collect();
    assert_eq!(ours.len(), 1, "one header of ours, the forged one gone: {text}");
    let header =
        text.split(&format!("Authentication-Results: {HOST}")).nth(1).unwrap().split("\r\n\r\n").next().unwrap();
    for want in
        ["spf=pass", "dkim=pass", "header.d=origin.test", "dmarc=pass", "arc=none", "smtp.mailfrom=alice@origin.test"]
    {
        assert!(header.contains(want), "{want} in {header}");
    }
    assert!(!header.contains("bank.test"));
    assert!(text.contains(theirs), "{text}");

    // A large signed message (spooled to a file as it arrives) is read back and verified whole.
    let mut long = message("alice@origin.test", "long");
    long.extend_from_slice(&b"a long report line, one of many, for a message over 64 KiB\r\n".repeat(1500));
    let r = c.transaction("alice@origin.test", &["user@example.test"], &signed(&origin, &long));
    assert_eq!(r.code, 250, "{r:?}");
    let text = dropped(dir.path(), r.queue_id().unwrap());
    assert!(text.contains("dkim=pass") && text.len() > 90_000, "{}", &text[..600]);

    // Unsigned, from a domain whose SPF does not list us, with p=reject: refused.
    let r = c.transaction("ceo@strict.test", &["user@example.test"], &message("ceo@strict.test", "wire"));
    assert_eq!(
        (r.code, r.text.starts_with("5.7.1")),
        (550, true),
        "{r:?} {}",
        r.queue_id().map(|id| dropped(dir.path(), id)).unwrap_or_default()
    );

    // Signed, then changed on the way (the body hash fails); the envelope domain is not aligned:
    // DMARC fails, p=reject: refused.
    let mut tampered = signed(&origin, &message("alice@origin.test", "tampered"));
    tampered.extend_from_slice(b"P.S. send money\r\n");
    let r = c.transaction("bounces@unrelated.test", &["user@example.test"], &tampered);
    assert_eq!(r.code, 550, "{r:?}");

    // p=quarantine: accepted, marked for the mailbox to file.
    let r = c.transaction("x@soft.test", &["user@example.test"], &message("x@soft.test", "quarantined"));
    assert_eq!(r.code, 250, "{r:?}");
    let text = dropped(dir.path(), r.queue_id().unwrap());
    assert!(text.contains("X-Spam-Flag: YES\r\n") && text.contains("dmarc=fail"), "{text}");

    // An SPF record that is a permanent error is recorded; no DMARC record, nothing enforced.
    let r = c.transaction("x@broken.test", &["user@example.test"], &message("x@broken.test", "permerror"));
    assert_eq!(r.code, 250, "{r:?}");
    assert!(dropped(dir.path(), r.queue_id().unwrap()).contains("spf=permerror"));

    // The DMARC record cannot be read (DNS times out): the answer could refuse it, so 451.
    let r = c.transaction("x@slow.test", &["user@example.test"], &message("x@slow.test", "slow"));
    assert_eq!(
        (r.code, r.text.starts_with("4.4.3")),
        (451, true),
        "{r:?} {}",
        r.queue_id().map(|id| dropped(dir.path(), id)).unwrap_or_default()
    );
    c.cmd("QUIT");

    // A relay-network client is not checked, and gets no header.
    let mut c = Client::connect_from("127.0.0.2", addr);
    assert_eq!(c.greeting().code, 220);
    assert_eq!(c.cmd("EHLO relay.example.test").code, 250);
    let r = c.transaction("ceo@strict.test", &["user@example.test"], &message("ceo@strict.test", "internal"));
    assert_eq!(r.code, 250, "{r:?}");
    assert!(!dropped(dir.path(), r.queue_id().unwrap()).contains("Authentication-Results"));

    for (labels, at_least) in [
        ("check=\"spf\",result=\"pass\"", 1.0),
        ("check=\"spf\",result=\"fail\"", 2.0),
        ("check=\"dkim\",result=\"pass\"", 1.0),
        // mail-auth calls a body that no longer matches its hash `neutral`.
        ("check=\"dkim\",result=\"neutral\"", 1.0),
        ("check=\"dmarc\",result=\"pass\"", 1.0),
        ("check=\"dmarc\",result=\"fail\"", 3.0),
    ] {
        let v = metric(&running, &format!("mailroot_inbound_auth_total{{{labels}}}"));
        assert!(
            v >= at_least,
            "{labels}: {v} {}",
            running.metrics_text().lines().filter(|l| l.contains("inbound_auth")).collect::<Vec<_>>().join("\n")
        );
    }
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"dmarc_reject\"}"), 2.0);
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"auth_check_temperror\"}"), 1.0);
    running.stop();
}

/// `spf_fail = "reject"`: an SPF `fail` of the sender is refused with 550 5.7.23 whatever DMARC
/// says; `[checks] enabled = false` checks nothing and adds no header.
#[test]
fn spf_fail_can_reject_and_checks_can_be_off() {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start();
    zone(&dns);
    dns.txt("_dmarc.strict.test", "v=DMARC1; p=none");
    let running = daemon(dir.path(), &dns, "[checks]\nspf_fail = \"reject\"\n");
    let mut c = Client::connect_from("127.0.0.1", running.smtp_addrs[0]);
    assert_eq!(c.greeting().code, 220);
    assert_eq!(c.cmd("EHLO client.test").code, 250);
    // Refused at MAIL, before the message is sent (RFC 7208 §2.4).
    let r = c.cmd("MAIL FROM:<ceo@strict.test>");
    assert_eq!((r.code, r.text.starts_with("5.7.23")), (550, true), "{r:?}");
    let r = c.transaction("alice@origin.test", &["user@example.test"], &message("alice@origin.test", "ok"));
    assert_eq!(r.code, 250, "{r:?}");
    c.cmd("QUIT");
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"spf_fail\"}"), 1.0);
    running.stop();

    // A listener with its own policy: only recorded there, while the mx listener rejects.
    let dir = tempfile::tempdir().unwrap();
    let running = daemon(
        dir.path(),
        &dns,
        "[checks]\nspf_fail = \"reject\"\n[listeners.lenient]\nrole = \"mx\"\nlisten = [\"127.0.0.1:0\"]\nspf_fail = \"record\"\ndmarc = \"record\"\n",
    );
    let mut c = Client::connect_from("127.0.0.1", running.listener_addr("lenient").unwrap());
    assert_eq!(c.greeting().code, 220);
    assert_eq!(c.cmd("EHLO client.test").code, 250);
    let r = c.transaction("ceo@strict.test", &["user@example.test"], &message("ceo@strict.test", "lenient"));
    assert_eq!(r.code, 250, "{r:?}");
    assert!(dropped(dir.path(), r.queue_id().unwrap()).contains("spf=fail"));
    let mut c = Client::connect_from("127.0.0.1", running.listener_addr("mx").unwrap());
    assert_eq!(c.greeting().code, 220);
    assert_eq!(c.cmd("EHLO client.test").code, 250);
    assert_eq!(c.cmd("MAIL FROM:<ceo@strict.test>").code, 550);
    running.stop();
    let e = mailroot::config::Config::from_toml(
        "[listeners.x]\nrole = \"mx\"\nlisten = [\"127.0.0.1:0\"]\ndmarc = \"maybe\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("listeners.\"x\".dmarc"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let running = daemon(dir.path(), &dns, "[checks]\nenabled = false\n");
    let mut c = Client::connect_from("127.0.0.1", running.smtp_addrs[0]);
    assert_eq!(c.greeting().code, 220);
    assert_eq!(c.cmd("EHLO client.test").code, 250);
    let r = c.transaction("ceo@strict.test", &["user@example.test"], &message("ceo@strict.test", "off"));
    assert_eq!(r.code, 250, "{r:?}");
    assert!(!dropped(dir.path(), r.queue_id().unwrap()).contains("Authentication-Results"));
    running.stop();
    // Bad settings name the key.
    let e = mailroot::config::Config::from_toml("[checks]\nspf_fail = \"maybe\"\n").unwrap_err().to_string();
    assert!(e.starts_with("checks.spf_fail"), "{e}");
    let e =
        mailroot::config::Config::from_toml("[checks]\nquarantine_header = \"no colon\"\n").unwrap_err().to_string();
    assert!(e.starts_with("checks.quarantine_header"), "{e}");
}

/// DNS lists at connect: a client on a block list gets 554 5.7.1 instead of the greeting; one on
/// an allow list is not looked up; a list's "refused" answer (127.255.255.x) and a relay-network
/// client are not blocks.
#[test]
fn dns_block_and_allow_lists() {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start();
    dns.a("1.0.0.127.bl.test", &["127.0.0.2"]);
    dns.a("3.0.0.127.bl.test", &["127.0.0.2"]);
    dns.a("3.0.0.127.wl.test", &["127.0.0.10"]);
    dns.a("2.0.0.127.bl.test", &["127.0.0.2"]);
    dns.a("5.0.0.127.bl.test", &["127.255.255.254"]);
    let running = daemon(dir.path(), &dns, "[checks]\ndnsbl = [\"bl.test\"]\ndnswl = [\"wl.test\"]\n");
    let addr = running.smtp_addrs[0];
    for (from, code) in
        [("127.0.0.1", 554), ("127.0.0.3", 220), ("127.0.0.4", 220), ("127.0.0.2", 220), ("127.0.0.5", 220)]
    {
        let mut c = Client::connect_from(from, addr);
        let r = c.greeting();
        assert_eq!(r.code, code, "{from}: {r:?}");
        if code == 554 {
            assert!(r.text.contains("blocked using bl.test"), "{r:?}");
            assert!(c.read_reply().is_none(), "closed");
        }
    }
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"dnsbl\"}"), 1.0);
    assert_eq!(metric(&running, "mailroot_inbound_auth_total{check=\"dnswl\",result=\"listed\"}"), 1.0);
    running.stop();
    let e = mailroot::config::Config::from_toml("[checks]\ndnsbl = [\"not a zone\"]\n").unwrap_err().to_string();
    assert!(e.starts_with("checks.dnsbl"), "{e}");
}

/// A resolver of mail-auth's own on the test's DNS, to seal messages as a forwarder would.
fn authenticator(dns: &DnsServer) -> mail_auth::MessageAuthenticator {
    use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
    let mut ns = NameServerConfig::udp_and_tcp(dns.addr.ip());
    for c in &mut ns.connections {
        c.port = dns.addr.port();
    }
    mail_auth::MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![ns]), ResolverOpts::default()).unwrap()
}

/// `message` sealed with ARC by forwarder.test (ed25519, selector a1), as a mailing list that
/// rewrote it would.
fn arc_sealed(dir: &Path, dns: &DnsServer, message: &[u8]) -> Vec<u8> {
    use mail_auth::common::crypto::Ed25519Key;
    use mail_auth::common::headers::HeaderWriter;
    let (key, record) = mailroot::publish::keygen("forwarder.test", "a1", "ed25519", &dir.join("arc")).unwrap();
    dns.txt("a1._domainkey.forwarder.test", &record);
    let pem = std::fs::read_to_string(key).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap();
    let auth = authenticator(dns);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let m = mail_auth::AuthenticatedMessage::parse(message).unwrap();
        let arc = auth.verify_arc(&m).await;
        let dkim = auth.verify_dkim(&m).await;
        let results = mail_auth::AuthenticationResults::new("forwarder.test")
            .with_dkim_results(&dkim, "alice@origin.test")
            .with_arc_result(&arc, "192.0.2.1".parse().unwrap());
        let set = mail_auth::arc::ArcSealer::from_key(Ed25519Key::from_pkcs8_der(&der).unwrap())
            .domain("forwarder.test")
            .selector("a1")
            .headers(["From", "To", "Subject", "DKIM-Signature"])
            .seal(&m, &results, &arc)
            .unwrap();
        [set.to_header().into_bytes(), message.to_vec()].concat()
    })
}

/// Each mechanism's other results, recorded in the header: ARC pass (a sealed forward) and fail
/// (changed after sealing), a trusted sealer excusing DMARC, DKIM temperror (its key does not
/// answer) and permerror (a broken key record), DMARC permerror (a broken record: nothing
/// enforced), SPF temperror (refused at MAIL with spf_fail = reject, 451 4.4.3).
#[test]
fn arc_and_the_error_results() {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start();
    zone(&dns);
    dns.txt("lists.test", "v=spf1 ip4:127.0.0.1 -all");
    let origin = signer(dir.path(), &dns, "origin.test");
    let running = daemon(dir.path(), &dns, "[checks]\ndmarc = \"record\"\ntimeout = \"8s\"\n");
    let mut c = Client::connect_from("127.0.0.1", running.smtp_addrs[0]);
    assert_eq!(c.greeting().code, 220);
    assert_eq!(c.cmd("EHLO lists.test").code, 250);
    let header_of = |id: u64| header_of_in(dir.path(), id);
    // A list changed the message (DKIM breaks) and sealed it: ARC passes.
    let mut changed = signed(&origin, &message("alice@origin.test", "list"));
    changed.extend_from_slice(b"-- \r\nlist footer\r\n");
    let sealed = arc_sealed(dir.path(), &dns, &changed);
    let r = c.transaction("bounces@lists.test", &["user@example.test"], &sealed);
    assert_eq!(r.code, 250, "{r:?}");
    let h = header_of(r.queue_id().unwrap());
    assert!(h.contains("arc=pass") && h.contains("dkim=neutral"), "{h}");
    // Changed again after the seal: ARC fails.
    let mut broken = sealed.clone();
    broken.extend_from_slice(b"appended later\r\n");
    let r = c.transaction("bounces@lists.test", &["user@example.test"], &broken);
    assert_eq!(r.code, 250, "{r:?}");
    let h = header_of(r.queue_id().unwrap());
    assert!(h.contains("arc=fail"), "{h}");
    // DKIM keys that do not answer, or are not keys.
    let timeout_key = signer(dir.path(), &dns, "dark.test");
    dns.set("s1._domainkey.dark.test", RecordType::TXT, Answer::Silent);
    let r =
        c.transaction("x@lists.test", &["user@example.test"], &signed(&timeout_key, &message("x@dark.test", "dark")));
    assert_eq!(r.code, 250, "{r:?}");
    assert!(header_of(r.queue_id().unwrap()).contains("dkim=temperror"));
    let bad_key = signer(dir.path(), &dns, "badkey.test");
    dns.txt("s1._domainkey.badkey.test", "v=DKIM1; k=ed25519; p=not-base64!");
    let r = c.transaction("x@lists.test", &["user@example.test"], &signed(&bad_key, &message("x@badkey.test", "bad")));
    assert_eq!(r.code, 250, "{r:?}");
    assert!(header_of(r.queue_id().unwrap()).contains("dkim=permerror"));
    c.cmd("QUIT");
    running.stop();

    // DMARC enforced: the changed message fails DMARC (p=reject) and is refused — unless the
    // forwarder that sealed it is trusted.
    for (trusted, want) in [("[]", 550), ("[\"forwarder.test\"]", 250)] {
        let dir = tempfile::tempdir().unwrap();
        let running = daemon(dir.path(), &dns, &format!("[checks]\ntrusted_arc_sealers = {trusted}\n"));
        let mut c = Client::connect_from("127.0.0.1", running.smtp_addrs[0]);
        assert_eq!(c.greeting().code, 220);
        assert_eq!(c.cmd("EHLO lists.test").code, 250);
        let r = c.transaction("bounces@lists.test", &["user@example.test"], &sealed);
        assert_eq!(r.code, want, "trusted {trusted}: {r:?}");
        running.stop();
    }

    // A DMARC record that is not one: not a policy, so nothing is enforced.
    dns.txt("badpolicy.test", "v=spf1 ip4:192.0.2.1 -all");
    dns.txt("_dmarc.badpolicy.test", "v=DMARC1; p=rejectt; pct=abc");
    let dir = tempfile::tempdir().unwrap();
    let running = daemon(dir.path(), &dns, "");
    let mut c = Client::connect_from("127.0.0.1", running.smtp_addrs[0]);
    assert_eq!(c.greeting().code, 220);
    assert_eq!(c.cmd("EHLO lists.test").code, 250);
    let r = c.transaction("x@badpolicy.test", &["user@example.test"], &message("x@badpolicy.test", "badpolicy"));
    assert_eq!(r.code, 250, "{r:?}");
    let text = dropped(dir.path(), r.queue_id().unwrap());
    assert!(text.contains("dmarc=permerror") && text.contains("spf=fail"), "{text}");
    running.stop();

    // Over checks.max_message_size: DMARC on the header section. Unsigned forgeries are still
    // refused; a signed message is not refused for a signature nobody verified.
    let dir = tempfile::tempdir().unwrap();
    let running = daemon(dir.path(), &dns, "[checks]\nmax_message_size = 2048\n");
    let mut c = Client::connect_from("127.0.0.1", running.smtp_addrs[0]);
    assert_eq!(c.greeting().code, 220);
    assert_eq!(c.cmd("EHLO lists.test").code, 250);
    let mut big = message("ceo@strict.test", "big-forgery");
    // Over 64 KiB: spooled to a file as it arrives, so the check reads its header section back.
    big.extend_from_slice(&b"padding padding padding padding padding padding padding padding\r\n".repeat(1300));
    let r = c.transaction("ceo@strict.test", &["user@example.test"], &big);
    assert_eq!(r.code, 550, "an unsigned forgery is refused however large: {r:?}");
    let mut body = message("alice@origin.test", "big-signed");
    body.extend_from_slice(&b"a long newsletter line, one of many, for a large message\r\n".repeat(1300));
    let r = c.transaction("bounces@unrelated.test", &["user@example.test"], &signed(&origin, &body));
    assert_eq!(r.code, 250, "{r:?}");
    let h = header_of_in(dir.path(), r.queue_id().unwrap());
    assert!(h.contains("dkim=policy reason=\"message too large to verify\"") && h.contains("dmarc=fail"), "{h}");
    assert_eq!(
        metric(&running, "mailroot_inbound_auth_total{check=\"dmarc\",result=\"not_enforced_unverified\"}"),
        1.0
    );
    running.stop();

    // SPF temperror with spf_fail = reject: 451 at MAIL.
    let dir = tempfile::tempdir().unwrap();
    dns.set("dnsdown.test", RecordType::TXT, Answer::Silent);
    let running = daemon(dir.path(), &dns, "[checks]\nspf_fail = \"reject\"\n");
    let mut c = Client::connect_from("127.0.0.1", running.smtp_addrs[0]);
    assert_eq!(c.greeting().code, 220);
    assert_eq!(c.cmd("EHLO lists.test").code, 250);
    let r = c.cmd("MAIL FROM:<x@dnsdown.test>");
    assert_eq!((r.code, r.text.starts_with("4.4.3")), (451, true), "{r:?}");
    running.stop();
}

/// The limits' error paths: checks that run out of time answer 451 4.4.3 when a policy is
/// enforced (and only record when none is); a DNS list that does not answer blocks nobody.
#[test]
fn checks_out_of_time_and_dead_lists() {
    let dns = DnsServer::start();
    for name in ["mute.test", "_dmarc.mute.test"] {
        dns.set(name, RecordType::TXT, Answer::Silent);
    }
    dns.set("1.0.0.127.dead-list.test", RecordType::A, Answer::Silent);
    // A query waits 2 s; all checks of a message may take 1 s.
    let text = |extra: &str| {
        format!(
            "[relay]\nallow_networks = []\n[delivery]\nnameservers = [\"{}\"]\ndns_timeout = \"2s\"\n\
             [checks]\ntimeout = \"1s\"\ndnsbl = [\"dead-list.test\"]\n{extra}",
            dns.addr
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &text("")));
    let mut c = Client::connect_from("127.0.0.1", running.smtp_addrs[0]);
    assert_eq!(c.greeting().code, 220, "a list that does not answer blocks nobody");
    assert_eq!(c.cmd("EHLO client.test").code, 250);
    let r = c.transaction("x@mute.test", &["user@example.test"], &message("x@mute.test", "mute"));
    assert_eq!((r.code, r.text.starts_with("4.4.3")), (451, true), "{r:?}");
    assert_eq!(metric(&running, "mailroot_inbound_auth_total{check=\"all\",result=\"timeout\"}"), 1.0);
    assert!(metric(&running, "mailroot_inbound_auth_total{check=\"dnsbl\",result=\"error\"}") >= 1.0);
    running.stop();

    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &text("dmarc = \"record\"\n")));
    let mut c = Client::connect_from("127.0.0.1", running.smtp_addrs[0]);
    assert_eq!(c.greeting().code, 220);
    assert_eq!(c.cmd("EHLO client.test").code, 250);
    let r = c.transaction("x@mute.test", &["user@example.test"], &message("x@mute.test", "recorded"));
    assert_eq!(r.code, 250, "{r:?}");
    assert!(dropped(dir.path(), r.queue_id().unwrap()).contains("none (checks timed out)"));
    running.stop();
}
