//! Helpers shared by the end-to-end tests: start a real mailroot on 127.0.0.1 port 0 in a temp
//! Mailroot, a small raw SMTP client, and polling with a deadline (never fixed sleeps).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mailroot::config::Config;
use mailroot::daemon::{self, Running, StartOptions};

pub mod dns;
pub mod https;
pub mod peer;
pub mod pg;

pub const HOST: &str = "mx.example.test";

/// A test config: port 0, local domains example.test and alias.test, Mailroot in `dir`.
pub fn config(dir: &Path, extra: &str) -> Config {
    let text = format!("[server]\nhostname = \"{HOST}\"\nlisten = [\"127.0.0.1:0\"]\n{extra}\n");
    let mut c = Config::from_toml(&text).expect("test config");
    c.domains.local = vec!["example.test".into(), "alias.test".into()];
    c.mailroot.path = dir.to_path_buf();
    // A test run on PostgreSQL (`both_stores!`) keeps its queue in its own schema.
    pg::apply_thread_schema(&mut c);
    // Every test daemon gets its own admin port, unless the test chose one.
    if !extra.contains("[admin]") {
        c.admin.listen = "127.0.0.1:0".into();
    }
    // Stops wait for open transactions and deliveries in flight; tests need not wait long.
    if !extra.contains("shutdown_grace") {
        c.server.shutdown_grace = mailroot::config::HumanDuration(Duration::from_secs(1));
    }
    // No tarpit in tests unless a test asks for it: errors are part of many transcripts.
    if !extra.contains("error_delay") {
        c.limits.error_delay = mailroot::config::HumanDuration(Duration::ZERO);
    }
    c
}

pub fn start(c: Config) -> Running {
    daemon::start(c, StartOptions::default()).expect("mailroot starts")
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn drop_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("Drop"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits for `Drop/<id>.eml` and returns its bytes.
pub fn drop_file(dir: &Path, id: u64) -> Vec<u8> {
    let path = dir.join("Drop").join(format!("{id}.eml"));
    wait_for(&format!("{}", path.display()), Duration::from_secs(10), || std::fs::read(&path).ok())
}

pub fn metric(running: &Running, name_and_labels: &str) -> f64 {
    running
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.trim().split(' ').next()?.parse().ok()))
        .unwrap_or(0.0)
}

/// Waits until the metric `name_and_labels` satisfies `ok`.
pub fn wait_metric(running: &Running, name_and_labels: &str, ok: impl Fn(f64) -> bool) {
    wait_for(name_and_labels, Duration::from_secs(10), || ok(metric(running, name_and_labels)).then_some(()));
}

/// Puts a plain file where the Drop folder should be, so local delivery fails temporarily.
pub fn break_drop(dir: &Path) {
    std::fs::remove_dir(dir.join("Drop")).expect("remove Drop");
    std::fs::write(dir.join("Drop"), b"").expect("file in Drop's place");
}

/// A raw SMTP client over a real socket.
pub struct Client {
    reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

/// One reply: code and all its lines joined with `\n`.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    /// The queue ID from `250 2.0.0 OK queued as N`.
    pub fn queue_id(&self) -> Option<u64> {
        self.text.rsplit("queued as ").next()?.trim().parse().ok()
    }
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        Client { reader: BufReader::new(s.try_clone().expect("clone")), writer: s }
    }

    pub fn connect_from(local: &str, addr: SocketAddr) -> Client {
        let sock = socket2_bind(local, addr);
        sock.set_read_timeout(Some(Duration::from_secs(30))).ok();
        Client { reader: BufReader::new(sock.try_clone().expect("clone")), writer: sock }
    }

    /// Connected, greeted and past `EHLO <helo>`: ready for a transaction.
    pub fn ready(addr: SocketAddr, helo: &str) -> Client {
        let mut c = Client::connect(addr);
        assert_eq!(c.greeting().code, 220);
        assert_eq!(c.cmd(&format!("EHLO {helo}")).code, 250);
        c
    }

    pub fn read_reply(&mut self) -> Option<Reply> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let code = line.get(..3)?.parse().ok()?;
            text.push_str(line.get(4..).unwrap_or("").trim_end());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(Reply { code, text });
            }
            text.push('\n');
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write");
    }

    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.read_reply().expect("reply")
    }

    pub fn greeting(&mut self) -> Reply {
        self.read_reply().expect("greeting")
    }

    /// EHLO, MAIL, RCPTs, DATA, body (already dot-stuffed, CRLF), end; returns the final reply.
    pub fn transaction(&mut self, from: &str, to: &[&str], body: &[u8]) -> Reply {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert_eq!(r.code, 250, "MAIL: {r:?}");
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>"));
            assert_eq!(r.code, 250, "RCPT {t}: {r:?}");
        }
        let r = self.cmd("DATA");
        assert_eq!(r.code, 354, "DATA: {r:?}");
        self.send(body);
        self.send(b".\r\n");
        self.read_reply().expect("end of data reply")
    }
}

/// Binds the client side to a chosen 127.x.y.z address (any such address works without setup).
fn socket2_bind(local: &str, addr: SocketAddr) -> TcpStream {
    // std cannot bind before connecting; tokio's TcpSocket can, on a throwaway runtime.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let local: SocketAddr = format!("{local}:0").parse().expect("local addr");
    rt.block_on(async move {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind(local).expect("bind");
        let stream = s.connect(addr).await.expect("connect");
        let std = stream.into_std().expect("into_std");
        std.set_nonblocking(false).expect("blocking");
        std
    })
}

/// The parts of a Drop file: envelope lines, our Received header, and the rest.
pub struct DropFile {
    pub sender: String,
    pub receivers: Vec<String>,
    pub received: String,
    pub message: Vec<u8>,
}

pub fn parse_drop(bytes: &[u8]) -> DropFile {
    let text = bytes;
    let mut pos = 0;
    let mut sender = String::new();
    let mut receivers = Vec::new();
    loop {
        let end = text[pos..].windows(2).position(|w| w == b"\r\n").expect("CRLF") + pos;
        let line = std::str::from_utf8(&text[pos..end]).expect("utf8 envelope");
        if let Some(s) = line.strip_prefix("x-sender: ") {
            sender = s.to_string();
        } else if let Some(r) = line.strip_prefix("x-receiver: ") {
            receivers.push(r.to_string());
        } else {
            break;
        }
        pos = end + 2;
    }
    // The Received header: its first line and continuation lines.
    let start = pos;
    assert!(text[pos..].starts_with(b"Received: "), "Received header first");
    loop {
        let end = text[pos..].windows(2).position(|w| w == b"\r\n").expect("CRLF") + pos;
        pos = end + 2;
        if !matches!(text.get(pos), Some(b'\t') | Some(b' ')) {
            break;
        }
    }
    DropFile {
        sender,
        receivers,
        received: String::from_utf8_lossy(&text[start..pos]).into_owned(),
        message: text[pos..].to_vec(),
    }
}

/// Whether an interop test's real peer (a Debian package's daemon at `program`) can run here: it
/// is installed and we are root. With `MAILROOT_INTEROP` set (`.ci/run` sets it after installing
/// the packages) a missing peer is a failure; otherwise the test says it is skipped and why.
pub fn interop_peer(program: &str, package: &str) -> bool {
    let why = if !Path::new(program).exists() {
        Some(format!("{program} is not installed (apt-get install {package})"))
    } else if !std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n")) {
        Some(format!("{program} needs root"))
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if std::env::var_os("MAILROOT_INTEROP").is_some() => panic!("MAILROOT_INTEROP is set but {why}"),
        Some(why) => {
            eprintln!("SKIPPED: {why}; .ci/run installs it and runs this test");
            false
        }
    }
}

/// The files in `<base>/<user>/Maildir/new` (the interop tests' mailbox servers deliver there).
pub fn maildir_new(base: &Path, user: &str) -> Vec<PathBuf> {
    std::fs::read_dir(base.join(user).join("Maildir/new"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Runs the `mailroot` binary on `config` (as a child process, its log drained so it never
/// blocks); returns it and the SMTP address it logged.
pub fn spawn_daemon(config: &Path) -> (std::process::Child, SocketAddr) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailroot"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mailroot");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening addr=").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).expect("daemon listens").parse().expect("address");
    (child, addr)
}
