//! AUTH memory benchmark: N failed AUTH PLAIN attempts (argon2id, 19 MiB each) from P parallel
//! connections, with the per-address lockout off so that every attempt really verifies. Prints
//! the RSS before, the peak while they run (sampled every 5 ms), and after; then checks that the
//! right password still works. Run with `cargo bench --bench auth_memory -- [--attempts N]
//! [--parallel P]`; see docs/performance.md.

mod common;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroot::config::Config;
use mailroot::daemon::{self, StartOptions};

fn auth(addr: SocketAddr, b64: &str) -> u16 {
    let s = TcpStream::connect(addr).expect("connect");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    let mut reply = || common::read_reply(&mut r);
    reply();
    let _ = w.write_all(b"EHLO bench.test\r\n");
    reply();
    let _ = w.write_all(format!("AUTH PLAIN {b64}\r\n").as_bytes());
    let code = reply();
    let _ = w.write_all(b"QUIT\r\n");
    code
}

fn main() {
    let (mut attempts, mut parallel) = (80usize, 16usize);
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--attempts" => attempts = it.next().and_then(|v| v.parse().ok()).unwrap_or(attempts),
            "--parallel" => parallel = it.next().and_then(|v| v.parse().ok()).unwrap_or(parallel),
            _ => {}
        }
    }
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-auth");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("bench folder");
    let hash = mailroot::actors::auth::hash_password("secret").expect("hash");
    let users = base.join("users.toml");
    std::fs::write(&users, format!("[users]\nalice = \"{hash}\"\n")).expect("users file");
    let mut config = Config::from_toml(&format!(
        "[server]\nhostname = \"bench.example.test\"\nlisten = [\"127.0.0.1:0\"]\n[domains]\nlocal = [\"example.test\"]\n\
         [access]\nmax_connections_per_ip = 0\n[admin]\nlisten = \"\"\n\
         [auth]\nusers_file = {users:?}\nallow_plaintext_loopback = true\nmax_failures = 0\n"
    ))
    .expect("bench config");
    config.mailroot.path = base.join("mailroot");
    let running = daemon::start(config, StartOptions::default()).expect("start");
    let addr = running.smtp_addrs[0];
    std::thread::sleep(Duration::from_millis(500));
    let before = common::rss_kib(None);

    let sampler = common::RssSampler::start(None);
    println!("auth_memory: {attempts} failed AUTH PLAIN attempts, {parallel} connections at a time");
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let (next, refused) = (next.clone(), refused.clone());
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < attempts {
                    // "alice" with a wrong password.
                    if auth(addr, "AGFsaWNlAHdyb25n") == 535 {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let took = start.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let (peak, after) = (sampler.stop(), common::rss_kib(None));
    let right = auth(addr, "AGFsaWNlAHNlY3JldA==");
    println!("refused with 535:  {} of {attempts} in {:.2}s", refused.load(Ordering::Relaxed), took.as_secs_f64());
    println!("RSS before:        {:.1} MB", before as f64 / 1024.0);
    println!(
        "RSS peak:          {:.1} MB (+{:.1} MB)",
        peak as f64 / 1024.0,
        peak.saturating_sub(before) as f64 / 1024.0
    );
    println!(
        "RSS 2 s after:     {:.1} MB (+{:.1} MB)",
        after as f64 / 1024.0,
        after.saturating_sub(before) as f64 / 1024.0
    );
    println!("right password:    {right} (235 expected)");
    running.stop();
}
