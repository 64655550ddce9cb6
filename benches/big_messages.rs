//! Large-message memory benchmark: C clients (default 60) each send one message of S bytes
//! (default 20 MB) at once to a local domain; a client answered `452` tries again 200 ms later,
//! as an MTA would. Prints the answers, the peak RSS (sampled every 5 ms) and the RSS afterwards.
//! Run with `cargo bench --bench big_messages -- [--sessions C] [--size S] [--dir PATH]`; see
//! docs/performance.md.

mod common;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroot::config::Config;
use mailroot::daemon::{self, StartOptions};

/// One message on a new connection; the final reply code.
fn send(addr: SocketAddr, body: &[u8]) -> u16 {
    let Ok(s) = TcpStream::connect(addr) else { return 0 };
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    common::read_reply(&mut r);
    let _ = w.write_all(b"EHLO big.test\r\n");
    common::read_reply(&mut r);
    let _ = w.write_all(b"MAIL FROM:<big@remote.test>\r\nRCPT TO:<big@example.test>\r\nDATA\r\n");
    if [common::read_reply(&mut r), common::read_reply(&mut r), common::read_reply(&mut r)] != [250, 250, 354] {
        return 0;
    }
    if w.write_all(body).is_err() {
        return 0;
    }
    let code = common::read_reply(&mut r);
    let _ = w.write_all(b"QUIT\r\n");
    code
}

fn main() {
    let a = common::Args::parse();
    let clients = if std::env::args().any(|x| x == "--sessions") { a.sessions } else { 60 };
    let size = if std::env::args().any(|x| x == "--size") { a.size } else { 20_000_000 };
    let base = a.dir.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-big"));
    let _ = std::fs::remove_dir_all(&base);
    let mut config = Config::from_toml(
        "[server]\nhostname = \"bench.example.test\"\nlisten = [\"127.0.0.1:0\"]\n[domains]\nlocal = [\"example.test\"]\n\
         [access]\nmax_connections_per_ip = 0\n[admin]\nlisten = \"\"\n",
    )
    .expect("bench config");
    config.mailroot.path = base.clone();
    let running = daemon::start(config, StartOptions::default()).expect("start");
    let addr = running.smtp_addrs[0];
    let body = common::body(size, "big@example.test");
    std::thread::sleep(Duration::from_millis(300));
    let before = common::rss_kib(None);
    let sampler = common::RssSampler::start(None);
    println!(
        "big_messages: {clients} clients at once, one message of {size} bytes each; mailroot in {}",
        base.display()
    );
    let (refused, other) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (body, refused, other) = (body.clone(), refused.clone(), other.clone());
            std::thread::spawn(move || loop {
                match send(addr, &body) {
                    250 => return,
                    452 => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    _ => {
                        other.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let took = start.elapsed();
    // Until every message is in Drop.
    let metric = "mailroot_deliveries_total{route=\"drop\",result=\"delivered\"} ";
    while running
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(metric))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        < clients as f64
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let delivered = start.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let peak_during = sampler.stop();
    let after = common::rss_kib(None);
    std::thread::sleep(Duration::from_secs(7));
    let later = common::rss_kib(None);
    println!(
        "accepted:   {clients} of {clients} in {:.1}s (all in Drop after {:.1}s); 452 answers (retried): {}; other failures: {}",
        took.as_secs_f64(),
        delivered.as_secs_f64(),
        refused.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed)
    );
    println!(
        "RSS before: {:.1} MB; peak {:.1} MB; 3 s after {:.1} MB; 10 s after {:.1} MB",
        before as f64 / 1024.0,
        peak_during as f64 / 1024.0,
        after as f64 / 1024.0,
        later as f64 / 1024.0
    );
    running.stop();
}
