//! Load benchmark: N messages of `size` bytes from S concurrent SMTP sessions to a local domain,
//! with full durability on. Prints accepted messages per second and the time until every message
//! is in Drop. Run with `cargo bench --bench smtp_load -- [--messages N] [--sessions S]
//! [--size BYTES] [--dir PATH]`; see docs/performance.md.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroot::config::Config;
use mailroot::daemon::{self, StartOptions};

struct Args {
    messages: usize,
    sessions: usize,
    size: usize,
    dir: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args { messages: 20_000, sessions: 20, size: 1024, dir: None };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_default();
        match k.as_str() {
            "--messages" => a.messages = v().parse().unwrap_or(a.messages),
            "--sessions" => a.sessions = v().parse().unwrap_or(a.sessions),
            "--size" => a.size = v().parse().unwrap_or(a.size),
            "--dir" => a.dir = Some(PathBuf::from(v())),
            _ => {} // cargo passes --bench
        }
    }
    a
}

fn read_reply(r: &mut BufReader<TcpStream>) -> u16 {
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
}

fn session(addr: SocketAddr, next: Arc<AtomicUsize>, total: usize, body: Arc<Vec<u8>>) -> usize {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).ok();
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    assert_eq!(read_reply(&mut r), 220);
    w.write_all(b"EHLO bench.test\r\n").unwrap();
    assert_eq!(read_reply(&mut r), 250);
    let mut ok = 0;
    while next.fetch_add(1, Ordering::Relaxed) < total {
        // PIPELINING: envelope and DATA in one write, then the body.
        w.write_all(b"MAIL FROM:<bench@remote.test>\r\nRCPT TO:<sink@example.test>\r\nDATA\r\n").unwrap();
        let codes = [read_reply(&mut r), read_reply(&mut r), read_reply(&mut r)];
        assert_eq!(codes, [250, 250, 354]);
        w.write_all(&body).unwrap();
        if read_reply(&mut r) == 250 {
            ok += 1;
        }
    }
    w.write_all(b"QUIT\r\n").ok();
    ok
}

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

fn main() {
    let a = args();
    let base = a.dir.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-mailroot"));
    let _ = std::fs::remove_dir_all(&base);
    let mut config = Config::from_toml(
        "[server]\nhostname = \"bench.example.test\"\nlisten = [\"127.0.0.1:0\"]\n[domains]\nlocal = [\"example.test\"]\n",
    )
    .expect("bench config");
    config.mailroot.path = base.clone();
    let running = daemon::start(config, StartOptions::default()).expect("start");
    let addr = running.smtp_addrs[0];

    let mut body = b"From: bench@remote.test\r\nTo: sink@example.test\r\nSubject: load\r\n\r\n".to_vec();
    while body.len() + 80 < a.size {
        body.extend_from_slice(&[b'x'; 76]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b".\r\n");
    let body = Arc::new(body);

    println!(
        "smtp_load: {} messages of {} bytes, {} sessions, mailroot in {}",
        a.messages,
        a.size,
        a.sessions,
        base.display()
    );
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..a.sessions)
        .map(|_| {
            let (next, body) = (next.clone(), body.clone());
            std::thread::spawn(move || session(addr, next, a.messages, body))
        })
        .collect();
    let accepted: usize = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    let accept_time = start.elapsed();
    // Poll the delivery counter, not the folder: listing 20,000 files every few milliseconds
    // would cost more CPU than the server under test.
    let delivered = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("mailroot_deliveries_total{route=\"drop\",result=\"delivered\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as usize
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while delivered(&running.metrics_text()) < accepted && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let e2e = start.elapsed();
    let in_drop = std::fs::read_dir(base.join("Drop")).map(|d| d.count()).unwrap_or(0);
    let m = running.metrics_text();
    println!(
        "accepted:          {accepted} messages in {:.2}s = {:.0} messages/s",
        accept_time.as_secs_f64(),
        accepted as f64 / accept_time.as_secs_f64()
    );
    println!(
        "all in Drop:       {in_drop} files after {:.2}s = {:.0} messages/s end to end",
        e2e.as_secs_f64(),
        in_drop as f64 / e2e.as_secs_f64()
    );
    println!(
        "queue group commit: {:.1} messages per sync on average",
        histogram_avg(&m, "mailroot_queue_commit_batch_size")
    );
    println!(
        "drop group commit:  {:.1} files per directory sync on average",
        histogram_avg(&m, "mailroot_drop_commit_batch_size")
    );
    running.stop();
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
}
