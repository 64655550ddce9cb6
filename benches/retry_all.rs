//! Retry-all benchmark: N messages (default 100,000) relayed to a smart host that defers every
//! recipient (451), so all sit deferred for an hour; then the smart host accepts again and
//! `POST /api/queue/retry-all` sends them all. While they drain, a probe sends a local message
//! every 20 ms and times its 250. Prints the probe's worst and median wait, the drain rate, and,
//! in the same run, the rate of fresh relaying through the same path.
//! Run with `cargo bench --bench retry_all -- [--messages N] [--dir PATH]`; see docs/performance.md.

mod common;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Sink;
use mailroot::client::AdminClient;

const TO: &str = "sink@relay.test";
const FROM: &str = "bench@example.test";

/// Sends one local message every 20 ms on one session until `stop`; the time from the end of
/// the data to its `250`, for each.
fn probe(addr: SocketAddr, stop: Arc<AtomicBool>, waits: Arc<Mutex<Vec<Duration>>>) {
    let s = TcpStream::connect(addr).expect("probe connects");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    common::read_reply(&mut r);
    w.write_all(b"EHLO probe.test\r\n").unwrap();
    common::read_reply(&mut r);
    while !stop.load(Ordering::Relaxed) {
        w.write_all(b"MAIL FROM:<probe@remote.test>\r\nRCPT TO:<probe@example.test>\r\nDATA\r\n").unwrap();
        let codes = [common::read_reply(&mut r), common::read_reply(&mut r), common::read_reply(&mut r)];
        assert_eq!(codes, [250, 250, 354]);
        let start = Instant::now();
        w.write_all(b"Subject: probe\r\n\r\nprobe\r\n.\r\n").unwrap();
        assert_eq!(common::read_reply(&mut r), 250);
        waits.lock().unwrap().push(start.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let a = common::Args::parse();
    let messages = if std::env::args().any(|x| x == "--messages") { a.messages } else { 100_000 };
    let base = a.dir.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-retry-all"));
    let _ = std::fs::remove_dir_all(&base);
    let sink = Sink::start();
    sink.defer.store(true, Ordering::Relaxed);
    let running = common::deferring_daemon(&base, &sink, None);
    let addr = running.smtp_addrs[0];
    println!(
        "retry_all: {messages} messages deferred by the smart host, then retried at once; mailroot in {}",
        base.display()
    );

    // 1. Fill the queue with deferred mail.
    let start = Instant::now();
    let accepted = common::fill_deferred(&running, &a, messages, FROM, TO);
    println!("deferred:   {accepted} messages in {:.1}s", start.elapsed().as_secs_f64());

    // 2. Retry them all while a probe measures intake.
    sink.defer.store(false, Ordering::Relaxed);
    let (stop, waits) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
    let prober = {
        let (stop, waits) = (stop.clone(), waits.clone());
        std::thread::spawn(move || probe(addr, stop, waits))
    };
    std::thread::sleep(Duration::from_millis(500));
    let token = std::fs::read_to_string(base.join("admin.token")).expect("admin token");
    let admin = AdminClient {
        address: running.admin_addr.expect("admin API").to_string(),
        token,
        timeout: Duration::from_secs(600),
    };
    let before = sink.messages.load(Ordering::Relaxed);
    let start = Instant::now();
    let r = admin.request("POST", "/api/queue/retry-all").expect("retry-all");
    let answered = start.elapsed();
    let drained = sink.wait_for(before + accepted, Duration::from_secs(1800));
    let drain = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = prober.join();
    let mut w = waits.lock().unwrap().clone();
    w.sort();
    let pct =
        |p: f64| w.get(((w.len() as f64 * p) as usize).min(w.len().saturating_sub(1))).copied().unwrap_or_default();
    println!("retry-all:  answered {} in {:.2}s: {}", r.status, answered.as_secs_f64(), r.body.trim());
    println!(
        "drained:    {} messages in {:.1}s = {:.0} messages/s{}",
        sink.messages.load(Ordering::Relaxed) - before,
        drain.as_secs_f64(),
        accepted as f64 / drain.as_secs_f64(),
        if drained { "" } else { " (TIMED OUT)" }
    );
    println!(
        "probe:      {} local messages during the drain; 250 after median {:.1} ms, p99 {:.1} ms, worst {:.1} ms",
        w.len(),
        pct(0.5).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
        w.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
    );

    // 3. Fresh relaying through the same path, same run.
    let fresh = 20_000.min(messages);
    let before = sink.messages.load(Ordering::Relaxed);
    let start = Instant::now();
    let (accepted, _) = common::load(addr, a.sessions, fresh, FROM, TO, common::body(a.size, TO));
    sink.wait_for(before + accepted, Duration::from_secs(600));
    let took = start.elapsed();
    println!(
        "fresh:      {accepted} relayed in {:.1}s = {:.0} messages/s",
        took.as_secs_f64(),
        accepted as f64 / took.as_secs_f64()
    );
    running.stop();
}
