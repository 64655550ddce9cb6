//! Shared by the benchmarks: the load-generating SMTP client (PIPELINING, one session per
//! thread), the test message, and a fast counting SMTP sink.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};

/// Command-line options shared by the benchmarks.
pub struct Args {
    pub messages: usize,
    pub sessions: usize,
    pub size: usize,
    pub dir: Option<PathBuf>,
    /// Run Postfix side by side (relay benchmark); `--no-postfix` turns it off.
    pub postfix: bool,
    /// Relay benchmark: also run with DKIM signing (`rsa`, `ed25519` or `both`).
    pub dkim: Option<String>,
    /// SMTP benchmark: run with the inbound SPF/DKIM/DMARC checks off, then on.
    pub checks: bool,
    /// The queue stores to measure, one after the other: `sled`, `postgres` or `both`.
    pub stores: Vec<String>,
    /// The PostgreSQL database for `--store postgres` (a schema of the run's own is made there).
    pub pg: String,
    /// SMTP benchmark on PostgreSQL: this many nodes on one database, the load split between them.
    pub nodes: usize,
}

impl Args {
    pub fn parse() -> Args {
        let mut a = Args {
            messages: 20_000,
            sessions: 20,
            size: 1024,
            dir: None,
            postfix: true,
            dkim: None,
            checks: false,
            stores: vec!["sled".into()],
            pg: std::env::var("MAILROOT_TEST_PG").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into()),
            nodes: 1,
        };
        let mut it = std::env::args().skip(1);
        while let Some(k) = it.next() {
            let mut v = || it.next().unwrap_or_default();
            match k.as_str() {
                "--messages" => a.messages = v().parse().unwrap_or(a.messages),
                "--sessions" => a.sessions = v().parse().unwrap_or(a.sessions),
                "--size" => a.size = v().parse().unwrap_or(a.size),
                "--dir" => a.dir = Some(PathBuf::from(v())),
                "--no-postfix" => a.postfix = false,
                "--dkim" => a.dkim = Some(v()),
                "--checks" => a.checks = true,
                "--store" => {
                    a.stores = match v().as_str() {
                        "both" => vec!["sled".into(), "postgres".into()],
                        s => vec![s.to_string()],
                    }
                }
                "--pg" => a.pg = v(),
                "--nodes" => a.nodes = v().parse().unwrap_or(1).max(1),
                _ => {} // cargo passes --bench
            }
        }
        a
    }
}

/// The code of the next (possibly multi-line) reply; 0 when the connection ended.
pub fn read_reply(r: &mut BufReader<TcpStream>) -> u16 {
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

/// A message of about `size` bytes, dot-terminated, ready to send after DATA.
pub fn body(size: usize, to: &str) -> Arc<Vec<u8>> {
    let mut body = format!("From: bench@remote.test\r\nTo: {to}\r\nSubject: load\r\n\r\n").into_bytes();
    while body.len() + 80 < size {
        body.extend_from_slice(&[b'x'; 76]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b".\r\n");
    Arc::new(body)
}

/// One client session sending messages until `next` reaches `total`; returns how many were
/// accepted with 250.
pub fn session(
    addr: SocketAddr,
    from: &str,
    to: &str,
    next: Arc<AtomicUsize>,
    total: usize,
    body: Arc<Vec<u8>>,
) -> usize {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).ok();
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    assert_eq!(read_reply(&mut r), 220);
    w.write_all(b"EHLO bench.test\r\n").unwrap();
    assert_eq!(read_reply(&mut r), 250);
    let envelope = format!("MAIL FROM:<{from}>\r\nRCPT TO:<{to}>\r\nDATA\r\n");
    let mut ok = 0;
    while next.fetch_add(1, Ordering::Relaxed) < total {
        // PIPELINING: envelope and DATA in one write, then the body.
        w.write_all(envelope.as_bytes()).unwrap();
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

/// Runs `sessions` sessions to `addr` and returns (accepted, time taken).
pub fn load(
    addr: SocketAddr,
    sessions: usize,
    total: usize,
    from: &str,
    to: &str,
    body: Arc<Vec<u8>>,
) -> (usize, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..sessions)
        .map(|_| {
            let (next, body, from, to) = (next.clone(), body.clone(), from.to_string(), to.to_string());
            std::thread::spawn(move || session(addr, &from, &to, next, total, body))
        })
        .collect();
    let accepted = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    (accepted, start.elapsed())
}

/// An SMTP server that accepts everything (PIPELINING, 8BITMIME) and counts the messages; while
/// `defer` is set it answers every RCPT `451 4.2.1` instead (and DATA without recipients `554`).
pub struct Sink {
    pub addr: SocketAddr,
    pub messages: Arc<AtomicUsize>,
    pub defer: Arc<std::sync::atomic::AtomicBool>,
    /// While set, the connection is dropped after a message's data, before its 250 (the message
    /// is counted: the client will send it again, a duplicate).
    pub drop_after_data: Arc<std::sync::atomic::AtomicBool>,
    /// The `Subject:` of every message received, with how often.
    pub subjects: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Sink {
    pub fn start() -> Sink {
        let messages = Arc::new(AtomicUsize::new(0));
        let defer = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let count = messages.clone();
        let deferring = defer.clone();
        let drop_after_data = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let subjects: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
        let (dropping, seen) = (drop_after_data.clone(), subjects.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("sink bind");
                tx.send(l.local_addr().expect("addr")).expect("send");
                while let Ok((s, _)) = l.accept().await {
                    let (count, deferring) = (count.clone(), deferring.clone());
                    let (dropping, seen) = (dropping.clone(), seen.clone());
                    tokio::spawn(async move {
                        let _ = s.set_nodelay(true);
                        let (r, mut w) = s.into_split();
                        let mut r = AsyncBufReader::new(r);
                        if w.write_all(b"220 sink ESMTP\r\n").await.is_err() {
                            return;
                        }
                        let mut line = Vec::new();
                        let mut in_data = false;
                        let mut recipients = 0;
                        let mut out = Vec::new();
                        loop {
                            line.clear();
                            match r.read_until(b'\n', &mut line).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                            if in_data {
                                if let Some(subject) = line.strip_prefix(b"Subject: ") {
                                    let subject = String::from_utf8_lossy(subject).trim().to_string();
                                    *seen.lock().unwrap().entry(subject).or_insert(0) += 1;
                                }
                                if line == b".\r\n" {
                                    in_data = false;
                                    count.fetch_add(1, Ordering::Relaxed);
                                    if dropping.load(Ordering::Relaxed) {
                                        return;
                                    }
                                    out.extend_from_slice(b"250 2.0.0 Ok\r\n");
                                }
                            } else {
                                let upper = line.to_ascii_uppercase();
                                if upper.starts_with(b"EHLO") {
                                    out.extend_from_slice(b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n");
                                } else if upper.starts_with(b"RCPT") && deferring.load(Ordering::Relaxed) {
                                    out.extend_from_slice(b"451 4.2.1 try later\r\n");
                                } else if upper.starts_with(b"RCPT") {
                                    recipients += 1;
                                    out.extend_from_slice(b"250 Ok\r\n");
                                } else if upper.starts_with(b"DATA") && recipients == 0 {
                                    out.extend_from_slice(b"554 5.5.1 no valid recipients\r\n");
                                } else if upper.starts_with(b"DATA") {
                                    in_data = true;
                                    recipients = 0;
                                    out.extend_from_slice(b"354 go\r\n");
                                } else if upper.starts_with(b"QUIT") {
                                    let _ = w.write_all(b"221 bye\r\n").await;
                                    return;
                                } else {
                                    out.extend_from_slice(b"250 Ok\r\n");
                                }
                            }
                            // Reply when the client waits: nothing more is buffered.
                            if !out.is_empty() && r.buffer().is_empty() {
                                if w.write_all(&out).await.is_err() {
                                    return;
                                }
                                out.clear();
                            }
                        }
                    });
                }
            });
        });
        let addr = rx.recv().expect("sink address");
        Sink { addr, messages, defer, drop_after_data, subjects }
    }

    /// Waits until the sink has `n` messages in total; false after `limit`.
    pub fn wait_for(&self, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.messages.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

/// Resident memory of a process (`None`: this one), in KiB, from `/proc`.
pub fn rss_kib(pid: Option<u32>) -> u64 {
    let path = pid.map_or("/proc/self/status".to_string(), |p| format!("/proc/{p}/status"));
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().to_string()))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Samples a process's RSS every 5 ms on a thread of its own and keeps the peak.
pub struct RssSampler {
    done: Arc<std::sync::atomic::AtomicBool>,
    peak: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: Option<u32>) -> RssSampler {
        let (done, peak) = (Arc::new(std::sync::atomic::AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (d, p) = (done.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(pid) as usize, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssSampler { done, peak, thread: Some(thread) }
    }

    /// Stops sampling; the peak seen, in KiB.
    pub fn stop(mut self) -> u64 {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed) as u64
    }
}

/// A schema of the benchmark run's own on PostgreSQL, dropped at the end.
pub struct BenchSchema {
    pub url: String,
    pub name: String,
}

impl BenchSchema {
    pub fn new(url: &str, tag: &str) -> BenchSchema {
        BenchSchema { url: url.to_string(), name: format!("bench_{tag}_{}", std::process::id()) }
    }

    /// Puts `config`'s queue in this schema, as node `node`.
    pub fn apply(&self, config: &mut mailroot::config::Config, node: &str) {
        config.queue.store = "postgres".into();
        config.queue.postgres.url = self.url.clone();
        config.queue.postgres.schema = self.name.clone();
        config.queue.postgres.node = node.into();
    }

    fn execute(&self, sql: &str) -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(async {
            let (client, conn) =
                tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            client.batch_execute(sql).await.map_err(|e| e.to_string())
        })
    }
}

impl Drop for BenchSchema {
    fn drop(&mut self) {
        if let Err(e) = self.execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name)) {
            println!("could not drop schema {}: {e}", self.name);
        }
    }
}

/// A daemon in `base` (on PostgreSQL with `pg`) whose remote mail goes to `sink` as smart host,
/// retried after an hour: with the sink deferring, what is relayed stays deferred in the queue.
pub fn deferring_daemon(base: &std::path::Path, sink: &Sink, pg: Option<&BenchSchema>) -> mailroot::daemon::Running {
    let text = format!(
        "[server]\nhostname = \"bench.example.test\"\nlisten = [\"127.0.0.1:0\"]\n[domains]\nlocal = [\"example.test\"]\n\
         [access]\nmax_connections_per_ip = 0\n[delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[127.0.0.1]:{}\"\n\
         [queue]\nretry_intervals = [\"1h\"]\n",
        sink.addr.port()
    );
    let mut config = mailroot::config::Config::from_toml(&text).expect("bench config");
    config.mailroot.path = base.to_path_buf();
    config.admin.listen = "127.0.0.1:0".into();
    if let Some(schema) = pg {
        schema.apply(&mut config, "bench");
    }
    mailroot::daemon::start(config, mailroot::daemon::StartOptions::default()).expect("start")
}

/// Relays `messages` from `from` to `to` through `running` and waits until each has been tried
/// once (and, with a deferring sink, deferred); returns how many were accepted.
pub fn fill_deferred(running: &mailroot::daemon::Running, a: &Args, messages: usize, from: &str, to: &str) -> usize {
    let start = Instant::now();
    let (accepted, _) = load(running.smtp_addrs[0], a.sessions, messages, from, to, body(a.size, to));
    let deferred = "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"} ";
    let tried = || {
        running.metrics_text().lines().find_map(|l| l.strip_prefix(deferred).and_then(|v| v.trim().parse::<f64>().ok()))
    };
    while (tried().unwrap_or(0.0) as usize) < accepted {
        assert!(start.elapsed() < Duration::from_secs(1800), "deferring took too long");
        std::thread::sleep(Duration::from_millis(100));
    }
    accepted
}
