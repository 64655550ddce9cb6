//! AUTH memory benchmark: N failed AUTH PLAIN attempts (argon2id, 19 MiB each) from P parallel
//! connections, with the per-address lockout off so that every attempt really verifies. Prints
//! the RSS before, the peak while they run (sampled every 5 ms), and after; then checks that the
//! right password still works. Run with `cargo bench --bench auth_memory -- [--attempts N]
//! [--parallel P]`; see docs/performance.md.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroot::config::Config;
use mailroot::daemon::{self, StartOptions};

/// Resident memory of this process (daemon and client), in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().to_string()))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn auth(addr: SocketAddr, b64: &str) -> u16 {
    let s = TcpStream::connect(addr).expect("connect");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    let mut reply = || {
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return 0;
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            }
        }
    };
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
    let before = rss_kib();

    let (done, peak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib() as usize, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
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
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let (peak, after) = (peak.load(Ordering::Relaxed) as u64, rss_kib());
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
