//! The cost of checking who a message is from, without the disk: SPF (HELO and MAIL FROM),
//! DKIM, ARC and DMARC for one message at a time through `Checker::check`, against a DNS server
//! in the process (its answers cached by the resolver, as a busy MX's would be). Prints
//! microseconds per check for an Ed25519- and an RSA-2048-signed message. Run with
//! `cargo bench --bench auth_checks -- [--messages N]`; see docs/performance.md.

mod common;
#[path = "../tests/common/dns.rs"]
mod dns;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroot_actors::checks::{CheckSettings, Checker, Message, Origin, Verdict};
use mailroot_actors::dkim::{DomainSettings, KeySettings, Signer};
use mailroot_actors::metrics::Metrics;
use mailroot_actors::protocol::address::parse_mailbox;
use mailroot_actors::resolve::Dns;

fn main() {
    let a = common::Args::parse();
    let n = if a.messages == 20_000 { 5_000 } else { a.messages };
    let dns = dns::DnsServer::start();
    dns.txt("remote.test", "v=spf1 ip4:127.0.0.1 -all");
    dns.txt("bench.test", "v=spf1 ip4:127.0.0.1 -all");
    dns.txt("_dmarc.remote.test", "v=DMARC1; p=reject");
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let resolver = Dns::new(&[dns.addr], Duration::from_secs(2), metrics.clone()).expect("resolver");
    let settings = CheckSettings { hostname: "bench.example.test".into(), ..CheckSettings::default() };
    let checker = Checker::new(resolver.resolver(), settings, metrics);
    let sender = parse_mailbox("bench@remote.test").expect("sender");
    let message = common::body(1024, "sink@example.test");
    let message = &message[..message.len() - 3];
    println!("auth_checks: {n} checks of a 1 KiB message, one at a time");
    for algorithm in ["ed25519", "rsa"] {
        let selector = format!("s-{algorithm}");
        let (key, record) = mailroot::publish::keygen("remote.test", &selector, algorithm, &dir.path().join(algorithm))
            .expect("keygen");
        dns.txt(&format!("{selector}._domainkey.remote.test"), &record);
        let signer = Signer::load(&[DomainSettings {
            domain: "remote.test".into(),
            keys: vec![KeySettings { selector, key_file: key, algorithm: None }],
            headers: Vec::new(),
            oversign: Vec::new(),
            expire: None,
        }])
        .expect("signer");
        let signature = signer.sign(&mut &message[..]).expect("read").expect("signed");
        let signed: Arc<Vec<u8>> = Arc::new([signature, message.to_vec()].concat());
        let origin = Origin { ip: "127.0.0.1".parse().expect("ip"), helo: "bench.test", sender: Some(&sender) };
        let verdict = rt.block_on(checker.check(&origin, signed.len(), Message::Memory(&signed)));
        let Verdict::Accept { headers } = &verdict else { panic!("{verdict:?}") };
        assert!(headers.contains("dkim=pass") && headers.contains("dmarc=pass"), "{headers}");
        let start = Instant::now();
        for _ in 0..n {
            let v = rt.block_on(checker.check(&origin, signed.len(), Message::Memory(&signed)));
            assert!(matches!(v, Verdict::Accept { .. }));
        }
        let per = start.elapsed().as_secs_f64() / n as f64;
        println!(
            "{algorithm:>8}-signed: {:.0} us per check (SPF x2, DKIM, ARC, DMARC), {:.0} checks/s on one core",
            per * 1e6,
            1.0 / per
        );
    }
    // Without a signature: SPF and DMARC-on-SPF only.
    let origin = Origin { ip: "127.0.0.1".parse().expect("ip"), helo: "bench.test", sender: Some(&sender) };
    let start = Instant::now();
    for _ in 0..n {
        rt.block_on(checker.check(&origin, message.len(), Message::Memory(message)));
    }
    let per = start.elapsed().as_secs_f64() / n as f64;
    println!("  unsigned: {:.0} us per check, {:.0} checks/s on one core", per * 1e6, 1.0 / per);
}
