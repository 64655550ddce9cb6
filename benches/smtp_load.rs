//! Load benchmark: N messages of `size` bytes from S concurrent SMTP sessions to a local domain,
//! with full durability on. Prints accepted messages per second and the time until every message
//! is in Drop. Run with `cargo bench --bench smtp_load -- [--messages N] [--sessions S]
//! [--size BYTES] [--dir PATH] [--checks] [--store sled|postgres|both] [--pg URL] [--nodes N]`;
//! see docs/performance.md. `--checks` runs twice, with the inbound SPF/DKIM/DMARC checks off and
//! on, against a DNS server in the process. `--store postgres` keeps the queue in a schema of the
//! run's own on `--pg` (default `MAILROOT_TEST_PG` or the machine's `test` database); `--nodes 2`
//! runs two daemons on that schema and splits the load between them.

mod common;
#[path = "../tests/common/dns.rs"]
mod dns;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroot::config::Config;
use mailroot::daemon::{self, StartOptions};
use mailroot_actors::dkim::{DomainSettings, KeySettings, Signer};

fn histogram_avg(metrics: &str, name: &str) -> f64 {
    let get = |suffix: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_{suffix} ")).and_then(|v| v.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    let (sum, count) = (get("sum"), get("count"));
    if count > 0.0 {
        sum / count
    } else {
        0.0
    }
}

/// What one run measured.
struct Figures {
    accepted_per_s: f64,
    e2e_per_s: f64,
    /// CPU seconds of this process (server and load generator) per message.
    cpu_per_message: f64,
}

/// User + system CPU seconds this process has used.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// Sends the load to fresh daemons configured with `extra` in `base`: one, or `--nodes` on the
/// PostgreSQL schema `pg`, each taking its share of the sessions and messages.
fn run(
    a: &common::Args,
    base: &std::path::Path,
    extra: &str,
    body: Arc<Vec<u8>>,
    label: &str,
    pg: Option<&common::BenchSchema>,
) -> Figures {
    let _ = std::fs::remove_dir_all(base);
    let nodes = if pg.is_some() { a.nodes } else { 1 };
    let folders: Vec<PathBuf> =
        (0..nodes).map(|n| if nodes == 1 { base.to_path_buf() } else { base.join(format!("node{n}")) }).collect();
    let runnings: Vec<daemon::Running> = folders
        .iter()
        .enumerate()
        .map(|(n, folder)| {
            let mut config = Config::from_toml(&format!(
                "[server]\nhostname = \"bench.example.test\"\nlisten = [\"127.0.0.1:0\"]\n[domains]\nlocal = [\"example.test\"]\n[access]\nmax_connections_per_ip = 0\n[admin]\nlisten = \"127.0.0.1:0\"\n{extra}"
            ))
            .expect("bench config");
            config.mailroot.path = folder.clone();
            if let Some(schema) = pg {
                schema.apply(&mut config, &format!("bench-node{n}"));
            }
            daemon::start(config, StartOptions::default()).expect("start")
        })
        .collect();
    let running = &runnings[0];
    let store = if pg.is_some() { format!("postgres, {nodes} node(s)") } else { "sled".into() };

    println!(
        "smtp_load{label}: {} messages of {} bytes, {} sessions, queue on {store}, mailroot in {}",
        a.messages,
        a.size,
        a.sessions,
        base.display()
    );
    let start = Instant::now();
    let cpu_start = cpu_seconds();
    let loads: Vec<_> = runnings
        .iter()
        .enumerate()
        .map(|(n, r)| {
            let addr = r.smtp_addrs[0];
            let share = |total: usize| total / nodes + usize::from(n < total % nodes);
            let (sessions, messages, body) = (share(a.sessions).max(1), share(a.messages), body.clone());
            std::thread::spawn(move || {
                common::load(addr, sessions, messages, "bench@remote.test", "sink@example.test", body)
            })
        })
        .collect();
    let (mut accepted, mut accept_time) = (0, Duration::ZERO);
    for l in loads {
        let (n, t) = l.join().expect("load");
        accepted += n;
        accept_time = accept_time.max(t);
    }
    // Poll the delivery counter, not the folder: listing 20,000 files every few milliseconds
    // would cost more CPU than the server under test.
    let delivered = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("mailroot_deliveries_total{route=\"drop\",result=\"delivered\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as usize
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while runnings.iter().map(|r| delivered(&r.metrics_text())).sum::<usize>() < accepted && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let e2e = start.elapsed();
    let cpu = cpu_seconds() - cpu_start;
    let in_drop: usize =
        folders.iter().map(|f| std::fs::read_dir(f.join("Drop")).map(|d| d.count()).unwrap_or(0)).sum();
    let m = running.metrics_text();
    let figures = Figures {
        accepted_per_s: accepted as f64 / accept_time.as_secs_f64(),
        e2e_per_s: in_drop as f64 / e2e.as_secs_f64(),
        cpu_per_message: cpu / accepted.max(1) as f64,
    };
    println!("cpu:               {:.0} us per message (server and load generator)", figures.cpu_per_message * 1e6);
    println!(
        "accepted:          {accepted} messages in {:.2}s = {:.0} messages/s",
        accept_time.as_secs_f64(),
        figures.accepted_per_s
    );
    println!(
        "all in Drop:       {in_drop} files after {:.2}s = {:.0} messages/s end to end",
        e2e.as_secs_f64(),
        figures.e2e_per_s
    );
    println!(
        "queue group commit: {:.1} messages per sync on average",
        histogram_avg(&m, "mailroot_queue_commit_batch_size")
    );
    println!(
        "drop group commit:  {:.1} files per directory sync on average",
        histogram_avg(&m, "mailroot_drop_commit_batch_size")
    );
    for l in m.lines().filter(|l| l.starts_with("mailroot_inbound_auth_total")) {
        println!("  {l}");
    }
    for r in runnings {
        r.stop();
    }
    figures
}

fn main() {
    let a = common::Args::parse();
    let base = a.dir.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-mailroot"));
    if !a.checks {
        // Each store in a fresh folder of its own, nothing deleted in between (see below).
        let _ = std::fs::remove_dir_all(&base);
        let mut rates = Vec::new();
        for store in &a.stores {
            let schema = (store == "postgres").then(|| common::BenchSchema::new(&a.pg, "smtp"));
            let f = run(
                &a,
                &base.join(store),
                "",
                common::body(a.size, "sink@example.test"),
                &format!(" [{store}]"),
                schema.as_ref(),
            );
            rates.push((store.clone(), f));
        }
        if let [(s1, f1), (s2, f2)] = &rates[..] {
            println!(
                "stores: {s2}/{s1} = {:.2} accepted, {:.2} end to end",
                f2.accepted_per_s / f1.accepted_per_s,
                f2.e2e_per_s / f1.e2e_per_s
            );
        }
    } else {
        // The sender's domain in a DNS server of our own: SPF allows the client, DMARC says
        // p=reject, and every message carries a valid ed25519 DKIM signature — so all three
        // checks run to "pass" (the full cost), from a client outside the relay networks.
        let dns = dns::DnsServer::start();
        dns.txt("remote.test", "v=spf1 ip4:127.0.0.1 -all");
        dns.txt("_dmarc.remote.test", "v=DMARC1; p=reject");
        // The client's HELO name has SPF too (an unknown name answers NXDOMAIN, which this
        // small server sends without the SOA a resolver needs to cache it).
        dns.txt("bench.test", "v=spf1 ip4:127.0.0.1 -all");
        let keys = base.with_extension("keys");
        let _ = std::fs::remove_dir_all(&keys);
        let (key, record) = mailroot::publish::keygen("remote.test", "s1", "ed25519", &keys).expect("keygen");
        dns.txt("s1._domainkey.remote.test", &record);
        let signer = Signer::load(&[DomainSettings {
            domain: "remote.test".into(),
            keys: vec![KeySettings { selector: "s1".into(), key_file: key, algorithm: None }],
            headers: Vec::new(),
            oversign: Vec::new(),
            expire: None,
        }])
        .expect("signer");
        let plain = common::body(a.size, "sink@example.test");
        let message = &plain[..plain.len() - 3]; // without the ".\r\n" end marker
        let signature = signer.sign(&mut &message[..]).expect("read").expect("signed");
        let signed = Arc::new([signature, plain.to_vec()].concat());
        let common = format!(
            "[relay]\nallow_networks = []\n[delivery]\nnameservers = [\"{}\"]\ndns_timeout = \"2s\"\n",
            dns.addr
        );
        // A fresh folder each, nothing deleted in between: ext4 slows file creation for a while
        // after mass deletions, which would be charged to the second run.
        let _ = std::fs::remove_dir_all(&base);
        let off = run(
            &a,
            &base.join("off"),
            &format!("{common}[checks]\nenabled = false\n"),
            signed.clone(),
            " (checks off)",
            None,
        );
        let on = run(&a, &base.join("on"), &common, signed, " (SPF+DKIM+DMARC on)", None);
        println!(
            "checks: {:.0} -> {:.0} messages/s accepted ({:.0}%), {:.0} -> {:.0} end to end; added {:.0} us of wall time per message at {} sessions",
            off.accepted_per_s,
            on.accepted_per_s,
            100.0 * on.accepted_per_s / off.accepted_per_s,
            off.e2e_per_s,
            on.e2e_per_s,
            1e6 / on.accepted_per_s - 1e6 / off.accepted_per_s,
            a.sessions
        );
        println!(
            "checks: {:.0} -> {:.0} us of CPU per message: the checks cost {:.0} us of CPU each",
            off.cpu_per_message * 1e6,
            on.cpu_per_message * 1e6,
            (on.cpu_per_message - off.cpu_per_message) * 1e6
        );
        for name in [
            "bench.test",
            "remote.test",
            "_dmarc.remote.test",
            "s1._domainkey.remote.test",
            "_dmarc.test",
            "test",
            "_dmarc.bench.test",
        ] {
            println!("DNS queries for {name}: {}", dns.query_count(name));
        }
        let _ = std::fs::remove_dir_all(&keys);
    }
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
}
