//! Idle-session benchmark: runs the `mailroot` binary (release) as a child process with the
//! shipped defaults, then
//! 1. opens N connections (default 10,000) from 127.0.0.x that each say EHLO and go idle, and
//!    prints the daemon's RSS before and after (the cost of an idle session);
//! 2. with 1,000 idle connections from 20 addresses (50 each, the per-address limit), checks
//!    that a new client is still served;
//! 3. drips a command one byte every 5 s and prints when the daemon cuts it.
//!
//! Run with `cargo bench --bench idle_sessions -- [--sessions N] [--skip-drip] [--bin PATH]`; see
//! docs/performance.md. Needs about 2 × N + 100 open files (`ulimit -n`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn connect_from(local: std::net::Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::new(local.into(), 0).into())?;
    s.connect(&addr.into())?;
    Ok(s.into())
}

/// Connected, greeted and past EHLO; kept open.
fn idle_client(local: std::net::Ipv4Addr, addr: SocketAddr) -> Option<TcpStream> {
    let s = connect_from(local, addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut r = BufReader::new(s.try_clone().ok()?);
    if common::read_reply(&mut r) != 220 {
        return None;
    }
    (&s).write_all(b"EHLO idle.test\r\n").ok()?;
    (common::read_reply(&mut r) == 250).then_some(s)
}

struct Daemon(Child);

/// The binary on a fresh folder, with the shipped defaults but for the port, the folder, no admin
/// API, and `max_connections` when given; returns once it accepts connections.
fn start(bin: &std::path::Path, dir: &std::path::Path, max_connections: Option<usize>) -> (Daemon, SocketAddr) {
    std::fs::create_dir_all(dir).expect("bench folder");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let max = max_connections.map(|n| format!("max_connections = {n}\n")).unwrap_or_default();
    let cfg = dir.join("mailroot.toml");
    std::fs::write(
        &cfg,
        format!("[server]\nlisten = [\"{addr}\"]\n{max}[mailroot]\npath = \"spool\"\n[admin]\nlisten = \"\"\n"),
    )
    .unwrap();
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mailroot");
    let daemon = Daemon(child);
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "mailroot did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    (daemon, addr)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let (mut sessions, mut drip) = (10_000usize, true);
    let mut bin = PathBuf::from(env!("CARGO_BIN_EXE_mailroot"));
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--sessions" => sessions = it.next().and_then(|v| v.parse().ok()).unwrap_or(sessions),
            "--skip-drip" => drip = false,
            // Another build to compare with (an older checkout's target/release/mailroot).
            "--bin" => bin = it.next().map(PathBuf::from).unwrap_or(bin),
            _ => {}
        }
    }
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-idle");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("bench folder");
    // Part 1 needs room for N sessions; parts 2 and 3 run on the shipped defaults.
    let (daemon, addr) = start(&bin, &base.join("one"), Some(sessions + 100));
    let pid = daemon.0.id();

    // 1. N idle sessions from 250 addresses (at most 50 each: the shipped per-address limit).
    let before = common::rss_kib(Some(pid));
    let mut held = Vec::with_capacity(sessions);
    let started = Instant::now();
    for i in 0..sessions {
        let local = std::net::Ipv4Addr::new(127, 1, (i / 50 / 250) as u8, (i / 50 % 250 + 1) as u8);
        match idle_client(local, addr) {
            Some(s) => held.push(s),
            None => {
                eprintln!("connection {i} failed");
                break;
            }
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = common::rss_kib(Some(pid));
    println!(
        "idle sessions: {} open in {:.1}s; daemon RSS {:.1} MB before, {:.1} MB after: +{:.1} MB, {:.1} KB per session",
        held.len(),
        started.elapsed().as_secs_f64(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        after.saturating_sub(before) as f64 / 1024.0,
        after.saturating_sub(before) as f64 / held.len().max(1) as f64
    );
    drop(held);
    drop(daemon);
    let (_daemon, addr) = start(&bin, &base.join("two"), None);

    // 2. 1,000 idle connections from 20 addresses with the shipped limits: a new client is served.
    let mut crowd = Vec::new();
    for i in 0..1000 {
        let local = std::net::Ipv4Addr::new(127, 2, 0, (i / 50 + 1) as u8);
        if let Some(s) = idle_client(local, addr) {
            crowd.push(s);
        }
    }
    let newcomer = connect_from(std::net::Ipv4Addr::new(127, 3, 0, 1), addr).ok().map(|s| {
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        common::read_reply(&mut BufReader::new(s))
    });
    println!("1,000 idle from 20 addresses ({} open): a new client gets {:?}", crowd.len(), newcomer);
    drop(crowd);

    // 3. One byte every 5 s.
    if drip {
        let s = connect_from(std::net::Ipv4Addr::new(127, 4, 0, 1), addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(100))).ok();
        let mut r = BufReader::new(s.try_clone().unwrap());
        common::read_reply(&mut r);
        let t0 = Instant::now();
        let mut cut = None;
        for b in b"EHLO a.very.slow.client.example\r\n".iter().cycle() {
            if (&s).write_all(&[*b]).is_err() {
                cut = Some(t0.elapsed());
                break;
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut line = String::new();
            while Instant::now() < deadline {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) if line.starts_with("421") => {
                        cut = Some(t0.elapsed());
                        break;
                    }
                    _ => {}
                }
            }
            if cut.is_some() || t0.elapsed() > Duration::from_secs(300) {
                break;
            }
        }
        println!("one byte every 5 s: cut after {:?}", cut.map(|d| format!("{:.0}s", d.as_secs_f64())));
    }
}
