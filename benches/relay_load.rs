//! Relay benchmark: N messages of `size` bytes from S concurrent SMTP sessions, relayed to a
//! counting SMTP sink through a smart host, first by mailroot (durability on) and then — when
//! Postfix is installed and we run as root — by a private Postfix instance relaying to the same
//! sink. Prints messages/s end to end for both and the ratio.
//!
//! `cargo bench --bench relay_load -- [--messages N] [--sessions S] [--size BYTES] [--dir PATH]
//! [--no-postfix] [--dkim rsa|ed25519|both] [--store sled|postgres|both] [--pg URL]`; with
//! `--dkim`, mailroot runs twice, without and with signing (the messages are From: remote.test),
//! and the signing cost per message is printed; with `--store both`, mailroot runs once per queue
//! store (PostgreSQL in a schema of the run's own). Postfix comes from Debian's `postfix` package
//! (`apt-get install postfix`).
//! See docs/performance.md.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::Sink;
use mailroot::config::Config;
use mailroot::daemon::{self, StartOptions};

const TO: &str = "sink@relay.test";
const FROM: &str = "bench@example.test";

/// Runs the load against `addr` and waits for the sink; returns messages/s end to end.
fn measure(name: &str, addr: SocketAddr, sink: &Sink, a: &common::Args) -> Option<f64> {
    let before = sink.messages.load(Ordering::Relaxed);
    let start = Instant::now();
    let (accepted, accept_time) = common::load(addr, a.sessions, a.messages, FROM, TO, common::body(a.size, TO));
    let all_there = sink.wait_for(before + accepted, Duration::from_secs(1200));
    let e2e = start.elapsed();
    let arrived = sink.messages.load(Ordering::Relaxed) - before;
    println!(
        "{name:9} accepted {accepted} in {:.2}s ({:.0}/s); {arrived} at the sink after {:.2}s = {:.0} messages/s end to end{}",
        accept_time.as_secs_f64(),
        accepted as f64 / accept_time.as_secs_f64(),
        e2e.as_secs_f64(),
        arrived as f64 / e2e.as_secs_f64(),
        if all_there { "" } else { " (TIMED OUT)" }
    );
    all_there.then(|| arrived as f64 / e2e.as_secs_f64())
}

/// The `[dkim."remote.test"]` section for `algorithms` (`rsa`, `ed25519`, `both`), with keys
/// made in `dir`.
fn dkim_section(dir: &Path, algorithms: &str) -> String {
    let algs: Vec<&str> = match algorithms {
        "both" => vec!["rsa", "ed25519"],
        one => vec![one],
    };
    let mut keys = Vec::new();
    for alg in algs {
        let (path, _) = mailroot::publish::keygen("remote.test", alg, alg, dir).expect("dkim keygen");
        keys.push(format!("{{ selector = \"{alg}\", key = \"{}\" }}", path.display()));
    }
    format!("[dkim.\"remote.test\"]\nkeys = [{}]\n", keys.join(", "))
}

fn run_mailroot(
    base: &Path,
    sink: &Sink,
    a: &common::Args,
    dkim: Option<&str>,
    pg: Option<&common::BenchSchema>,
) -> Option<f64> {
    let _ = std::fs::remove_dir_all(base);
    let mut text = format!(
        "[server]\nhostname = \"bench.example.test\"\nlisten = [\"127.0.0.1:0\"]\n[domains]\nlocal = [\"example.test\"]\n[access]\nmax_connections_per_ip = 0\n\
         [delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[127.0.0.1]:{}\"\n",
        sink.addr.port()
    );
    if let Some(algs) = dkim {
        text.push_str(&dkim_section(&base.join("keys"), algs));
    }
    let mut config = Config::from_toml(&text).expect("bench config");
    config.mailroot.path = base.to_path_buf();
    config.admin.listen = "127.0.0.1:0".into();
    if let Some(schema) = pg {
        schema.apply(&mut config, "bench-relay");
    }
    let running = daemon::start(config, StartOptions::default()).expect("start");
    let name = match (dkim.is_some(), pg.is_some()) {
        (true, _) => "mr+dkim",
        (false, true) => "mr/pg",
        (false, false) => "mailroot",
    };
    let rate = measure(name, running.smtp_addrs[0], sink, a);
    let m = running.metrics_text();
    let get = |k: &str| m.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string()).unwrap_or_default();
    println!(
        "          outbound connections opened: {}; queue syncs: {}; DKIM-signed: {}",
        get("mailroot_outbound_connections_total "),
        get("mailroot_queue_commit_batch_size_count "),
        get("mailroot_dkim_signing_total{result=\"signed\"} "),
    );
    running.stop();
    rate
}

/// A private Postfix instance: its own config, queue and data folders under `dir`, smtpd on
/// `port`, relaying everything to the sink. Started in the foreground so it dies with us.
struct Postfix {
    conf: PathBuf,
    child: Child,
}

impl Postfix {
    fn start(dir: &Path, port: u16, sink: SocketAddr) -> Result<Postfix, String> {
        let conf = dir.join("conf");
        for d in ["conf", "queue", "data"] {
            std::fs::create_dir_all(dir.join(d)).map_err(|e| e.to_string())?;
        }
        let main_cf = format!(
            "compatibility_level = 3.6\nqueue_directory = {q}\ndata_directory = {d}\nmail_owner = postfix\n\
             myhostname = bench-postfix.test\nmydestination =\ninet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n\
             relayhost = [127.0.0.1]:{sp}\nmynetworks = 127.0.0.0/8\nsmtpd_relay_restrictions = permit_mynetworks, reject\n\
             maillog_file = /dev/stdout\nsmtp_tls_security_level = none\nsmtpd_tls_security_level = none\n\
             alias_maps =\nalias_database =\nlocal_recipient_maps =\nbiff = no\n",
            q = dir.join("queue").display(),
            d = dir.join("data").display(),
            sp = sink.port()
        );
        let master_cf = format!(
            "127.0.0.1:{port} inet n - n - - smtpd\n{}",
            [
                "cleanup unix n - n - 0 cleanup",
                "qmgr unix n - n 300 1 qmgr",
                "rewrite unix - - n - - trivial-rewrite",
                "bounce unix - - n - 0 bounce",
                "defer unix - - n - 0 bounce",
                "trace unix - - n - 0 bounce",
                "verify unix - - n - 1 verify",
                "flush unix n - n 1000? 0 flush",
                "proxymap unix - - n - - proxymap",
                "smtp unix - - n - - smtp",
                "relay unix - - n - - smtp",
                "showq unix n - n - - showq",
                "error unix - - n - - error",
                "retry unix - - n - - error",
                "discard unix - - n - - discard",
                "local unix - n n - - local",
                "anvil unix - - n - 1 anvil",
                "scache unix - - n - 1 scache",
                "postlog unix-dgram n - n - 1 postlogd",
            ]
            .join("\n")
        );
        std::fs::write(conf.join("main.cf"), main_cf).map_err(|e| e.to_string())?;
        std::fs::write(conf.join("master.cf"), master_cf + "\n").map_err(|e| e.to_string())?;
        let chown = Command::new("chown").arg("postfix").arg(dir.join("data")).status();
        if !chown.is_ok_and(|s| s.success()) {
            return Err("cannot chown the data folder to the postfix user".into());
        }
        let log = std::fs::File::create(dir.join("maillog")).map_err(|e| e.to_string())?;
        let child = Command::new("postfix")
            .arg("-c")
            .arg(&conf)
            .arg("start-fg")
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run postfix: {e}"))?;
        let pf = Postfix { conf, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("postfix did not listen on port {port}; see {}", dir.join("maillog").display()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(pf)
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix").arg("-c").arg(&self.conf).arg("stop").stdout(Stdio::null()).status();
        let _ = self.child.wait();
    }
}

fn postfix_available() -> Result<(), String> {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
    if !root {
        return Err("needs root (Postfix runs its daemons as the postfix user)".into());
    }
    match Command::new("postconf").arg("-d").arg("mail_version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("Postfix is not installed (apt-get install postfix)".into()),
    }
}

fn main() {
    let a = common::Args::parse();
    let base = a.dir.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-relay"));
    let _ = std::fs::remove_dir_all(&base);
    let sink = Sink::start();
    println!(
        "relay_load: {} messages of {} bytes, {} sessions, through a smart host to a sink at {}",
        a.messages, a.size, a.sessions, sink.addr
    );
    let mut stores = Vec::new();
    for store in &a.stores {
        let schema = (store == "postgres").then(|| common::BenchSchema::new(&a.pg, "relay"));
        stores.push((
            store.clone(),
            run_mailroot(&base.join(format!("mailroot-{store}")), &sink, &a, None, schema.as_ref()),
        ));
    }
    let mailroot = stores.first().and_then(|(_, r)| *r);
    if let [(s1, Some(r1)), (s2, Some(r2))] = &stores[..] {
        println!("stores    {s2} / {s1} = {:.2}", r2 / r1);
    }
    if let Some(algs) = a.dkim.as_deref() {
        let signed = run_mailroot(&base.join("mailroot-dkim"), &sink, &a, Some(algs), None);
        if let (Some(plain), Some(signed)) = (mailroot, signed) {
            println!(
                "dkim      {algs}: {:.0} vs {:.0} messages/s = {:.0} µs more per message end to end ({:.0}%)",
                signed,
                plain,
                (1.0 / signed - 1.0 / plain) * 1e6,
                (plain / signed - 1.0) * 100.0
            );
        }
    }
    if !a.postfix {
        return;
    }
    if let Err(why) = postfix_available() {
        println!("postfix   skipped: {why}");
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").port()
    };
    let postfix = match Postfix::start(&base.join("postfix"), port, sink.addr) {
        Ok(p) => p,
        Err(e) => {
            println!("postfix   could not start: {e}");
            return;
        }
    };
    let pf = measure("postfix", SocketAddr::from(([127, 0, 0, 1], port)), &sink, &a);
    drop(postfix);
    if let (Some(m), Some(p)) = (mailroot, pf) {
        println!("ratio     mailroot / postfix = {:.1}x", m / p);
    }
    for (store, rate) in stores.iter().skip(1) {
        if let (Some(m), Some(p)) = (rate, pf) {
            println!("ratio     mailroot on {store} / postfix = {:.1}x", m / p);
        }
    }
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
}
