//! Authenticated outbound TLS and smart-host login, end to end: real SMTP peers with
//! certificates from a test CA mailroot trusts (`delivery.ca_file`), from a CA it does not (the
//! man in the middle), or for the wrong name; a smart host that requires AUTH, over STARTTLS or
//! implicit TLS. Names resolve through the DNS server running in the test.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::dns::DnsServer;
use common::peer::{Behavior, Peer};
use common::*;
use mailroot::client::AdminClient;

const LONG: Duration = Duration::from_secs(20);

/// A certificate authority made for the test.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        Ca { issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap() }
    }

    /// A server configuration presenting a certificate for `names`, signed by this CA.
    fn server(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        self.identity(names).0
    }

    /// [`Ca::server`], and the SubjectPublicKeyInfo of the certificate's key (DER).
    fn identity(&self, names: &[&str]) -> (Arc<rustls::ServerConfig>, Vec<u8>) {
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone(), self.issuer.der().clone()], der)
            .unwrap();
        (Arc::new(config), rcgen::PublicKeyData::subject_public_key_info(&key))
    }

    fn der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.issuer.pem()).unwrap();
        path.to_path_buf()
    }
}

fn tls_peer(ip: &str, config: Arc<rustls::ServerConfig>) -> Peer {
    Peer::start(ip, 0, Behavior { tls: true, tls_config: Some(config), ..Behavior::default() })
}

fn received(peer: &Peer, n: usize) -> Vec<common::peer::Received> {
    wait_for(&format!("{n} messages at {}", peer.addr), LONG, || {
        let r = peer.received();
        (r.len() >= n).then_some(r)
    })
}

fn send(running: &mailroot::daemon::Running, to: &str) -> u64 {
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    let r = c.transaction("sender@example.test", &[to], b"From: sender@example.test\r\nSubject: s\r\n\r\nsecret\r\n");
    assert_eq!(r.code, 250, "{r:?}");
    r.queue_id().unwrap()
}

fn operator(running: &mailroot::daemon::Running) -> AdminClient {
    let token = std::fs::read_to_string(running.folders.root.join("admin.token")).unwrap_or_default();
    AdminClient { address: running.admin_addr.expect("admin API").to_string(), token, timeout: Duration::from_secs(30) }
}

/// The last result of the message's first recipient, as `mailroot queue show` prints it,
/// once the message has been tried.
fn last_reason(running: &mailroot::daemon::Running, id: u64) -> String {
    wait_for(&format!("a delivery attempt of {id}"), LONG, || {
        let r = operator(running).request("GET", &format!("/api/queue/{id}")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        let last = &v["recipients"][0]["last"];
        (!last.is_null()).then(|| last.to_string())
    })
}

/// Peers for four domains on 127.`net`.0.x, a CA file with the trusted CA, and a daemon with
/// `extra` settings.
struct World {
    dns: DnsServer,
    dir: tempfile::TempDir,
    trusted: Ca,
    ca_file: PathBuf,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let trusted = Ca::new("mailroot test CA");
    let ca_file = trusted.write(&dir.path().join("ca.pem"));
    World { dns: DnsServer::start(), dir, trusted, ca_file }
}

impl World {
    /// `domain`'s MX is mx.`domain` at `peer`.
    fn mx(&self, domain: &str, peer: &Peer) {
        self.dns.mx(domain, &[(10, &format!("mx.{domain}"))]);
        self.dns.a(&format!("mx.{domain}"), &[&peer.addr.ip().to_string()]);
    }

    fn start(&self, port: u16, extra: &str) -> mailroot::daemon::Running {
        let text = format!(
            "[queue]\nretry_intervals = [\"1s\"]\n[delivery]\nnameservers = [\"{}\"]\nremote_port = {port}\n\
             dns_timeout = \"1s\"\nconnect_timeout = \"2s\"\ncommand_timeout = \"3s\"\nca_file = \"{}\"\n{extra}\n",
            self.dns.addr,
            self.ca_file.display()
        );
        start(config(&self.dir.path().join("mr"), &text))
    }
}

#[test]
fn verify_delivers_only_to_a_trusted_certificate_for_the_right_name() {
    let w = world();
    let mitm = Ca::new("somebody else");
    let good = tls_peer("127.71.0.1", w.trusted.server(&["mx.good.test"]));
    let port = good.addr.port();
    let start =
        |ip: &str, cfg| Peer::start(ip, port, Behavior { tls: true, tls_config: Some(cfg), ..Behavior::default() });
    let intercepted = start("127.71.0.2", mitm.server(&["mx.intercepted.test"]));
    let wrong_name = start("127.71.0.3", w.trusted.server(&["another.test"]));
    let plain = Peer::start("127.71.0.4", port, Behavior::default());
    let opportunistic = start("127.71.0.5", mitm.server(&["mx.opportunistic.test"]));
    for (d, p) in [
        ("good.test", &good),
        ("intercepted.test", &intercepted),
        ("wrongname.test", &wrong_name),
        ("plain.test", &plain),
        ("opportunistic.test", &opportunistic),
    ] {
        w.mx(d, p);
    }
    let mut extra = String::new();
    for d in ["good.test", "intercepted.test", "wrongname.test", "plain.test"] {
        extra.push_str(&format!("[domains.remote.\"{d}\"]\ntls_policy = \"verify\"\n"));
    }
    let running = w.start(port, &extra);
    send(&running, "a@good.test");
    let intercepted_id = send(&running, "b@intercepted.test");
    let wrong_id = send(&running, "c@wrongname.test");
    let plain_id = send(&running, "d@plain.test");
    send(&running, "e@opportunistic.test");
    assert!(received(&good, 1)[0].tls);
    // Without a policy, the man in the middle's certificate is good enough (RFC 7435).
    assert!(received(&opportunistic, 1)[0].tls);
    let reason = last_reason(&running, intercepted_id);
    assert!(reason.contains("4.7.5") && reason.contains("not trusted"), "{reason}");
    let reason = last_reason(&running, wrong_id);
    assert!(reason.contains("4.7.5") && reason.contains("not trusted"), "{reason}");
    let reason = last_reason(&running, plain_id);
    assert!(reason.contains("4.7.10"), "{reason}");
    // Retries come and go; none of the three ever gets the message, in clear text or not.
    wait_metric(&running, "mailroot_outbound_tls_policy_total{policy=\"verify\",result=\"failure\"}", |v| v >= 6.0);
    for p in [&intercepted, &wrong_name, &plain] {
        assert!(p.received().is_empty(), "{} got mail", p.addr);
    }
    assert!(metric(&running, "mailroot_outbound_tls_policy_total{policy=\"verify\",result=\"success\"}") >= 1.0);
    running.stop();
}

#[test]
fn smart_host_login_over_verified_starttls_and_implicit_tls() {
    let w = world();
    let auth = Some(("relayuser".to_string(), "pa ss:wörd".to_string()));
    let relay = Peer::start(
        "127.72.0.1",
        0,
        Behavior {
            tls: true,
            tls_config: Some(w.trusted.server(&["relay.test"])),
            auth: auth.clone(),
            ..Behavior::default()
        },
    );
    let port = relay.addr.port();
    w.dns.a("relay.test", &["127.72.0.1"]);
    let secret = w.dir.path().join("relay.password");
    std::fs::write(&secret, "pa ss:wörd\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let extra = format!(
        "smart_host = \"[relay.test]:{port}\"\nsmart_host_username = \"relayuser\"\nsmart_host_password_file = \"{}\"\n",
        secret.display()
    );
    let running = w.start(port, &extra);
    send(&running, "someone@far.test");
    let got = &received(&relay, 1)[0];
    assert!(got.tls);
    assert_eq!(got.user.as_deref(), Some("relayuser"));
    running.stop();

    // The same relay, TLS from the first byte.
    let implicit = Peer::start(
        "127.72.0.2",
        port,
        Behavior {
            implicit_tls: true,
            tls_config: Some(w.trusted.server(&["relay.test"])),
            auth,
            ..Behavior::default()
        },
    );
    w.dns.a("relay.test", &["127.72.0.2"]);
    let running = w.start(port, &format!("{extra}smart_host_implicit_tls = true\n"));
    send(&running, "other@far.test");
    let got = &received(&implicit, 1)[0];
    assert!(got.tls);
    assert_eq!(got.user.as_deref(), Some("relayuser"));
    running.stop();
}

#[test]
fn a_refused_login_waits_and_credentials_never_go_out_unprotected() {
    let w = world();
    let wants = Some(("relayuser".to_string(), "right".to_string()));
    let relay = Peer::start(
        "127.73.0.1",
        0,
        Behavior {
            tls: true,
            tls_config: Some(w.trusted.server(&["relay.test"])),
            auth: wants.clone(),
            ..Behavior::default()
        },
    );
    let port = relay.addr.port();
    // A relay whose certificate is not trusted, and one without TLS at all.
    let untrusted = Peer::start("127.73.0.2", port, Behavior { tls: true, auth: wants.clone(), ..Behavior::default() });
    let clear = Peer::start("127.73.0.3", port, Behavior { auth: wants, ..Behavior::default() });
    w.dns.a("relay.test", &["127.73.0.1"]);
    w.dns.a("untrusted.test", &["127.73.0.2"]);
    w.dns.a("clear.test", &["127.73.0.3"]);
    let extra = format!(
        "smart_host = \"[relay.test]:{port}\"\nsmart_host_username = \"relayuser\"\nsmart_host_password_env = \"MAILROOT_TEST_RELAY_PASSWORD\"\n\
         [domains.remote.\"viauntrusted.test\"]\nsmart_host = \"[untrusted.test]:{port}\"\ntls_policy = \"require\"\nusername = \"u\"\npassword_env = \"MAILROOT_TEST_RELAY_PASSWORD\"\n\
         [domains.remote.\"viaclear.test\"]\nsmart_host = \"[clear.test]:{port}\"\ntls_policy = \"opportunistic\"\nusername = \"u\"\npassword_env = \"MAILROOT_TEST_RELAY_PASSWORD\"\n"
    );
    std::env::set_var("MAILROOT_TEST_RELAY_PASSWORD", "wrong");
    let running = w.start(port, &extra);
    let id = send(&running, "someone@far.test");
    let reason = last_reason(&running, id);
    assert!(reason.contains("4.7.8") && reason.contains("535"), "{reason}");
    assert_eq!(relay.logins()[0], ("relayuser".into(), "wrong".into(), false));
    // Temporary: the message waits for the operator to fix the password; nobody got a bounce.
    wait_metric(&running, "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}", |v| v >= 2.0);
    assert_eq!(metric(&running, "mailroot_notifications_total{kind=\"failure\"}"), 0.0);
    let a = send(&running, "x@viauntrusted.test");
    let b = send(&running, "y@viaclear.test");
    for id in [a, b] {
        let reason = last_reason(&running, id);
        assert!(reason.contains("not sending credentials"), "{reason}");
    }
    assert!(untrusted.logins().is_empty() && clear.logins().is_empty(), "credentials went out");
    running.stop();
}

fn policy(mode: &str, mx: &str) -> String {
    format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
}

#[test]
fn mta_sts_enforce_keeps_mail_from_an_unverified_or_unlisted_mx() {
    let w = world();
    let mitm = Ca::new("somebody else");
    let good = tls_peer("127.74.0.1", w.trusted.server(&["mx.sts.test"]));
    let port = good.addr.port();
    let start =
        |ip: &str, cfg| Peer::start(ip, port, Behavior { tls: true, tls_config: Some(cfg), ..Behavior::default() });
    let intercepted = start("127.74.0.2", mitm.server(&["mx.mitm.test"]));
    let unlisted = start("127.74.0.3", w.trusted.server(&["mx.unlisted.test"]));
    let testing = start("127.74.0.4", mitm.server(&["mx.testing.test"]));
    let web = common::https::HttpsServer::start(
        "127.74.0.10:0",
        w.trusted.server(&["mta-sts.sts.test", "mta-sts.mitm.test", "mta-sts.unlisted.test", "mta-sts.testing.test"]),
    );
    let path = "/.well-known/mta-sts.txt";
    for (d, p, mode, mx) in [
        ("sts.test", &good, "enforce", "mx.sts.test"),
        ("mitm.test", &intercepted, "enforce", "*.mitm.test"),
        ("unlisted.test", &unlisted, "enforce", "mx.elsewhere.test"),
        ("testing.test", &testing, "testing", "mx.elsewhere.test"),
    ] {
        w.mx(d, p);
        w.dns.txt(&format!("_mta-sts.{d}"), "v=STSv1; id=20261202T01;");
        w.dns.a(&format!("mta-sts.{d}"), &["127.74.0.10"]);
        web.page(&format!("mta-sts.{d}"), path, 200, &policy(mode, mx));
    }
    let running = w.start(port, &format!("mta_sts_port = {}\n", web.addr.port()));
    send(&running, "a@sts.test");
    let mitm_id = send(&running, "b@mitm.test");
    let unlisted_id = send(&running, "c@unlisted.test");
    send(&running, "d@testing.test");
    assert!(received(&good, 1)[0].tls);
    // testing: delivered anyway (over TLS, to a certificate we would not trust), and both what
    // enforcing would refuse are counted: the MX name outside the policy, the certificate.
    assert!(received(&testing, 1)[0].tls);
    wait_metric(&running, "mailroot_outbound_tls_policy_total{policy=\"mta-sts-testing\",result=\"failure\"}", |v| {
        v >= 2.0
    });
    let reason = last_reason(&running, mitm_id);
    assert!(reason.contains("not trusted"), "{reason}");
    let reason = last_reason(&running, unlisted_id);
    assert!(reason.contains("MTA-STS") && reason.contains("mx.elsewhere.test"), "{reason}");
    wait_metric(&running, "mailroot_outbound_tls_policy_total{policy=\"mta-sts\",result=\"failure\"}", |v| v >= 2.0);
    assert!(intercepted.received().is_empty() && unlisted.received().is_empty());
    // The counts of an SMTP TLS report (RFC 8460), per domain and policy type.
    let r = operator(&running).request("GET", "/api/tls-report").unwrap();
    let report: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let policy = |d: &str| {
        report["policies"].as_array().unwrap().iter().find(|p| p["policy"]["policy-domain"] == d).cloned().unwrap()
    };
    assert_eq!(policy("sts.test")["policy"]["policy-type"], "sts");
    assert_eq!(policy("sts.test")["summary"]["total-successful-session-count"], 1);
    let mitm = policy("mitm.test");
    assert!(mitm["summary"]["total-failure-session-count"].as_u64().unwrap() >= 1, "{mitm}");
    assert_eq!(mitm["failure-details"][0]["result-type"], "certificate-not-trusted", "{mitm}");
    assert_eq!(mitm["failure-details"][0]["receiving-mx-hostname"], "mx.mitm.test");
    assert_eq!(policy("unlisted.test")["failure-details"][0]["result-type"], "validation-failure");
    // The policies are cached (disk and memory): more mail, no more fetches while the id stays.
    let fetched = web.requests();
    assert_eq!(fetched, 4, "one fetch per domain");
    send(&running, "e@sts.test");
    received(&good, 2);
    assert_eq!(web.requests(), fetched);
    assert!(w.dir.path().join("mr/Cache/mta-sts/sts.test").exists());
    // The policy host goes away: the cached policy still holds (never a downgrade), even when the
    // id changes and the refresh fails.
    web.page("mta-sts.mitm.test", path, 404, "gone");
    w.dns.txt("_mta-sts.mitm.test", "v=STSv1; id=20261203T01;");
    let again = send(&running, "f@mitm.test");
    let reason = last_reason(&running, again);
    assert!(reason.contains("not trusted"), "{reason}");
    assert!(intercepted.received().is_empty());
    running.stop();
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b).as_ref().to_vec()
}

#[test]
fn dane_checks_authenticated_tlsa_records_and_ignores_unauthenticated_ones() {
    let w = world();
    let other = Ca::new("not in any root store");
    let (ee_config, ee_spki) = other.identity(&["whatever.test"]);
    let ee = tls_peer("127.75.0.1", ee_config);
    let port = ee.addr.port();
    let start =
        |ip: &str, cfg| Peer::start(ip, port, Behavior { tls: true, tls_config: Some(cfg), ..Behavior::default() });
    let mitm = start("127.75.0.2", Ca::new("mitm").server(&["mx.danemitm.test"]));
    let ta = start("127.75.0.3", other.server(&["mx.daneta.test"]));
    let ta_wrong_name = start("127.75.0.4", other.server(&["elsewhere.test"]));
    let insecure = start("127.75.0.5", Ca::new("mitm2").server(&["mx.insecure.test"]));
    let ee_record = vec![(3u8, 1u8, 1u8, sha256(&ee_spki))];
    let ta_record = vec![(2u8, 0u8, 1u8, sha256(&other.der()))];
    for (d, p, records, secure) in [
        ("dane.test", &ee, ee_record.clone(), true),
        ("danemitm.test", &mitm, ee_record.clone(), true),
        ("daneta.test", &ta, ta_record.clone(), true),
        ("danename.test", &ta_wrong_name, ta_record.clone(), true),
        ("insecure.test", &insecure, ee_record.clone(), false),
    ] {
        w.mx(d, p);
        let tlsa_name = format!("_{port}._tcp.mx.{d}");
        w.dns.tlsa(&tlsa_name, records);
        if secure {
            w.dns.secure(d);
            w.dns.secure(&tlsa_name);
        }
    }
    let running = w.start(port, "dane = true\n");
    send(&running, "a@dane.test");
    let mitm_id = send(&running, "b@danemitm.test");
    send(&running, "c@daneta.test");
    let name_id = send(&running, "d@danename.test");
    send(&running, "e@insecure.test");
    // DANE-EE: the key named in DNS, whoever signed the certificate.
    assert!(received(&ee, 1)[0].tls);
    // DANE-TA: a chain to the CA named in DNS, for the MX host's name.
    assert!(received(&ta, 1)[0].tls);
    // Not authenticated (no AD bit): the records are ignored, opportunistic TLS as before.
    assert!(received(&insecure, 1)[0].tls);
    let reason = last_reason(&running, mitm_id);
    assert!(reason.contains("TLSA"), "{reason}");
    let reason = last_reason(&running, name_id);
    assert!(reason.contains("TLSA"), "{reason}");
    assert!(mitm.received().is_empty() && ta_wrong_name.received().is_empty());
    assert!(metric(&running, "mailroot_outbound_tls_policy_total{policy=\"dane\",result=\"success\"}") >= 2.0);
    let r = operator(&running).request("GET", "/api/tls-report?day=today").unwrap();
    let report: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let policy = |d: &str, t: &str| {
        report["policies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["policy"]["policy-domain"] == d && p["policy"]["policy-type"] == t)
            .cloned()
            .unwrap_or_else(|| panic!("no {t} policy for {d} in {report}"))
    };
    assert_eq!(policy("dane.test", "tlsa")["summary"]["total-successful-session-count"], 1);
    assert_eq!(policy("danemitm.test", "tlsa")["failure-details"][0]["result-type"], "tlsa-invalid");
    assert_eq!(policy("insecure.test", "no-policy-found")["summary"]["total-successful-session-count"], 1);
    // Another message to dane.test: the TLSA answer (TTL 60 s in the test DNS) comes from the
    // cache, DNS is not asked again.
    let tlsa_name = format!("_{port}._tcp.mx.dane.test");
    let asked = w.dns.query_count(&tlsa_name);
    assert!(asked >= 1);
    send(&running, "again@dane.test");
    received(&ee, 2);
    assert_eq!(w.dns.query_count(&tlsa_name), asked);
    // The report goes to the address dane.test publishes, as mail (RFC 8460 §5.3).
    let reports = Peer::start("127.75.0.9", port, Behavior::default());
    w.dns.txt("_smtp._tls.dane.test", "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test");
    w.mx("reports.test", &reports);
    let r = operator(&running).request("POST", "/api/tls-report/send?day=today").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"queued\":1"), "{}", r.body);
    let mail = &received(&reports, 1)[0];
    assert_eq!(mail.rcpts[0].trim_start_matches('<').split('>').next(), Some("tlsrpt@reports.test"));
    let text = String::from_utf8_lossy(&mail.data).to_string();
    assert!(text.contains("TLS-Report-Domain: dane.test") && text.contains("report-type=\"tlsrpt\""), "{text}");
    // The attachment: base64 of gzip of the JSON report.
    let b64: String = text
        .split("application/tlsrpt+gzip")
        .nth(1)
        .and_then(|rest| rest.split("\r\n\r\n").nth(1))
        .and_then(|part| part.split("\r\n--").next())
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    use base64::Engine;
    let gz = base64::engine::general_purpose::STANDARD.decode(b64).expect("base64 attachment");
    let mut json = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut json).expect("gzip");
    let sent: serde_json::Value = serde_json::from_str(&json).expect("report JSON");
    assert_eq!(sent["policies"][0]["policy"]["policy-domain"], "dane.test");
    assert_eq!(sent["policies"][0]["policy"]["policy-type"], "tlsa");
    wait_metric(&running, "mailroot_outbound_tls_policy_total{policy=\"dane\",result=\"failure\"}", |v| v >= 2.0);
    running.stop();
}

#[test]
fn hostile_or_broken_policy_servers_give_no_policy() {
    let w = world();
    let mitm = Ca::new("somebody else");
    // Every MX presents a certificate we do not trust: a policy in force would stop the mail.
    let peer = tls_peer("127.76.0.1", mitm.server(&["mx.any.test"]));
    let port = peer.addr.port();
    let web = common::https::HttpsServer::start(
        "127.76.0.10:0",
        w.trusted.server(&["mta-sts.redirect.test", "mta-sts.huge.test", "mta-sts.garbage.test", "mta-sts.stall.test"]),
    );
    let untrusted_web = common::https::HttpsServer::start("127.76.0.11:0", mitm.server(&["mta-sts.forged.test"]));
    let path = "/.well-known/mta-sts.txt";
    let enforce = policy("enforce", "mx.nowhere.test");
    web.page("mta-sts.redirect.test", path, 301, &enforce);
    web.page("mta-sts.huge.test", path, 200, &format!("{enforce}{}", "x: y\r\n".repeat(20_000)));
    web.page("mta-sts.garbage.test", path, 200, "<html>hello</html>");
    web.page("mta-sts.stall.test", path, 0, "");
    untrusted_web.page("mta-sts.forged.test", path, 200, &enforce);
    for d in ["redirect.test", "huge.test", "garbage.test", "stall.test", "forged.test"] {
        w.mx(d, &peer);
        w.dns.txt(&format!("_mta-sts.{d}"), "v=STSv1; id=1;");
    }
    for d in ["redirect.test", "huge.test", "garbage.test", "stall.test"] {
        w.dns.a(&format!("mta-sts.{d}"), &["127.76.0.10"]);
    }
    w.dns.a("mta-sts.forged.test", &["127.76.0.11"]);
    let running = w.start(port, &format!("mta_sts_port = {}\n", web.addr.port()));
    for d in ["redirect.test", "huge.test", "garbage.test", "stall.test", "stall.test", "stall.test"] {
        send(&running, &format!("x@{d}"));
    }
    // No policy could be had (a redirect, over 64 KiB, not a policy, no answer within 10 s):
    // delivered as before. Three messages to the stalling domain cause one fetch, not three.
    received(&peer, 6);
    assert_eq!(web.requests(), 4, "each fetched once, none followed anywhere");
    running.stop();
    // The policy port is one setting: a second daemon for the server with a forged certificate.
    let running = w.start(port, &format!("mta_sts_port = {}\n", untrusted_web.addr.port()));
    send(&running, "y@forged.test");
    // A policy server whose certificate does not verify is no policy either.
    received(&peer, 7);
    assert_eq!(untrusted_web.requests(), 0, "the request never went out over the untrusted TLS");
    running.stop();
}
