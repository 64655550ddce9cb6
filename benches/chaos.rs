//! Chaos benchmark: mixed load — local mail (to Drop) and relayed mail (through a smart host
//! that now and then defers with 451, or drops the connection after the data), small and large
//! messages — while the `mailroot` binary is SIGKILLed at random moments and started again.
//! At the end it runs undisturbed until the queue is empty and prints how many messages were
//! acknowledged (250), delivered, duplicated (allowed: delivery is at least once) and lost (must
//! be 0), and the daemon's peak RSS.
//! Halfway through there is one disk-full episode: the Mailroot is on a tmpfs of its own (when
//! mount is allowed, as root), which is filled for 5 s and then freed; it prints how soon after
//! mail was acknowledged again, without a restart.
//! Run with `cargo bench --bench chaos -- [--cycles N] [--sessions S] [--dir PATH] [--tmpfs SIZE]`
//! (default 10 cycles and a 2g tmpfs; a long run: `--cycles 100 --tmpfs 6g`); see
//! docs/performance.md.

mod common;

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Sink;

/// A small xorshift generator: runs are repeatable from the seed printed at the start.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Sends messages until `stop`, each on the current connection (a new one after any failure);
/// records the token of every message answered 250.
fn client(
    addr: SocketAddr,
    id: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, bool)>>>,
    no_space: Arc<AtomicUsize>,
) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1));
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let Ok(s) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut w = s;
        if common::read_reply(&mut r) != 220
            || w.write_all(b"EHLO chaos.test\r\n").is_err()
            || common::read_reply(&mut r) != 250
        {
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let token = format!("chaos-{id}-{n}");
            let local = rng.below(2) == 0;
            let to = if local { "user@example.test" } else { "user@relay.test" };
            let size = if rng.below(20) == 0 { 200_000 } else { 1_000 };
            let mut body = format!("From: chaos@remote.test\r\nTo: {to}\r\nSubject: {token}\r\n\r\n");
            while body.len() < size {
                body.push_str("0123456789012345678901234567890123456789012345678901234567890123456789012\r\n");
            }
            body.push_str(".\r\n");
            let env = format!("MAIL FROM:<chaos@remote.test>\r\nRCPT TO:<{to}>\r\nDATA\r\n");
            if w.write_all(env.as_bytes()).is_err() {
                break;
            }
            let replies = [common::read_reply(&mut r), common::read_reply(&mut r), common::read_reply(&mut r)];
            if replies != [250, 250, 354] {
                if replies.contains(&452) {
                    no_space.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(100));
                }
                break;
            }
            if w.write_all(body.as_bytes()).is_err() {
                break;
            }
            match common::read_reply(&mut r) {
                250 => acked.lock().unwrap().push((token, local)),
                0 => break,
                452 => {
                    no_space.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }
}

fn start(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mailroot"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mailroot")
}

fn wait_listening(addr: SocketAddr) {
    let t = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "mailroot did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Subject tokens of the messages in Drop, with how often.
fn in_drop(dir: &Path) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
        if let Some(tok) = text.lines().find_map(|l| l.strip_prefix("Subject: ")) {
            *seen.entry(tok.to_string()).or_insert(0) += 1;
        }
    }
    seen
}

/// Mounts a tmpfs of `size` on `dir`; why not, if it cannot.
fn mount_tmpfs(dir: &Path, size: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
        .arg(dir)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Writes a file until the filesystem of `dir` is full.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0x55u8; 1 << 20];
    let mut small = false;
    loop {
        let piece = if small { &chunk[..4096] } else { &chunk[..] };
        match f.write_all(piece) {
            Ok(()) => {}
            Err(_) if !small => small = true,
            Err(_) => break,
        }
    }
    path
}

/// The disk-full episode: fill the Mailroot's filesystem for 5 s, free it, and measure how long
/// until a message is acknowledged again (the daemon is not restarted meanwhile).
fn disk_full_episode(mailroot: &Path, acked: &Mutex<Vec<(String, bool)>>, no_space: &AtomicUsize) -> String {
    let refusals_before = no_space.load(Ordering::Relaxed);
    let filler = fill(mailroot);
    let filled_at = acked.lock().unwrap().len();
    std::thread::sleep(Duration::from_secs(5));
    let while_full = acked.lock().unwrap().len() - filled_at;
    let refused = no_space.load(Ordering::Relaxed) - refusals_before;
    let _ = std::fs::remove_file(&filler);
    let freed = Instant::now();
    let before = acked.lock().unwrap().len();
    while acked.lock().unwrap().len() == before && freed.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let flowing = if acked.lock().unwrap().len() > before {
        format!("acknowledging again {:.1} s after space came back, without a restart", freed.elapsed().as_secs_f64())
    } else {
        "NOT acknowledging 120 s after space came back".to_string()
    };
    format!("disk full for 5 s: {refused} answers 452, {while_full} acknowledged meanwhile; {flowing}")
}

fn main() {
    let a = common::Args::parse();
    let mut cycles = 10;
    let mut tmpfs = "2g".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--cycles" {
            cycles = it.next().and_then(|v| v.parse().ok()).unwrap_or(cycles);
        } else if k == "--tmpfs" {
            tmpfs = it.next().unwrap_or(tmpfs);
        }
    }
    let sessions = if std::env::args().any(|x| x == "--sessions") { a.sessions } else { 8 };
    let base = a.dir.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-chaos"));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("bench folder");
    let sink = Sink::start();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg = base.join("mailroot.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nhostname = \"chaos.example.test\"\nlisten = [\"{addr}\"]\n[mailroot]\npath = \"spool\"\n\
             [domains]\nlocal = [\"example.test\"]\n[access]\nmax_connections_per_ip = 0\n[admin]\nlisten = \"\"\n\
             [delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[127.0.0.1]:{}\"\n[queue]\nretry_intervals = [\"1s\"]\n",
            sink.addr.port()
        ),
    )
    .unwrap();
    let mailroot = base.join("spool");
    let mounted = mount_tmpfs(&mailroot, &tmpfs);
    if let Err(why) = &mounted {
        println!("no disk-full episode: mounting a tmpfs for the Mailroot was refused ({why})");
    }
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
            | 1;
    let mut rng = Rng(seed);
    println!("chaos: {cycles} SIGKILL cycles, {sessions} clients, seed {seed}, Mailroot in {}", base.display());

    let (stop, acked) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
    let no_space = Arc::new(AtomicUsize::new(0));
    let mut episode = None;
    let peak = Arc::new(AtomicUsize::new(0));
    let mut child = start(&cfg);
    wait_listening(addr);
    let clients: Vec<_> = (0..sessions)
        .map(|i| {
            let (stop, acked, no_space) = (stop.clone(), acked.clone(), no_space.clone());
            std::thread::spawn(move || client(addr, i, stop, acked, no_space))
        })
        .collect();
    let started = Instant::now();
    for cycle in 0..cycles {
        if cycle == cycles / 2 && mounted.is_ok() {
            let e = disk_full_episode(&mailroot, &acked, &no_space);
            println!("  {e}");
            episode = Some(e);
        }
        // The smart host misbehaves now and then.
        sink.defer.store(rng.below(4) == 0, Ordering::Relaxed);
        sink.drop_after_data.store(rng.below(6) == 0, Ordering::Relaxed);
        let pid = child.id();
        let run_for = Duration::from_millis(300 + rng.below(2700));
        let t = Instant::now();
        while t.elapsed() < run_for {
            peak.fetch_max(common::rss_kib(Some(pid)) as usize, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        child = start(&cfg);
        wait_listening(addr);
        if cycle % 10 == 9 {
            println!("  {} cycles, {} acknowledged so far", cycle + 1, acked.lock().unwrap().len());
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let load_time = started.elapsed();
    // Undisturbed now: the smart host behaves, and everything queued must arrive.
    sink.defer.store(false, Ordering::Relaxed);
    sink.drop_after_data.store(false, Ordering::Relaxed);
    let acked = acked.lock().unwrap().clone();
    let drop_dir = base.join("spool").join("Drop");
    let deadline = Instant::now() + Duration::from_secs(300);
    let (lost, dup, delivered) = loop {
        peak.fetch_max(common::rss_kib(Some(child.id())) as usize, Ordering::Relaxed);
        let (local, remote) = (in_drop(&drop_dir), sink.subjects.lock().unwrap().clone());
        let count =
            |tok: &str, is_local: bool| if is_local { local.get(tok) } else { remote.get(tok) }.copied().unwrap_or(0);
        let lost = acked.iter().filter(|(t, l)| count(t, *l) == 0).count();
        let dup: usize = acked.iter().map(|(t, l)| count(t, *l).saturating_sub(1)).sum();
        if lost == 0 || Instant::now() > deadline {
            let dup_local: usize = acked.iter().filter(|(_, l)| *l).map(|(t, l)| count(t, *l).saturating_sub(1)).sum();
            println!("  duplicates: {dup_local} in Drop, {} at the smart host", dup - dup_local);
            break (lost, dup, acked.len() - lost);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = child.kill();
    let _ = child.wait();
    if mounted.is_ok() {
        let _ = Command::new("umount").arg("-l").arg(&mailroot).status();
    }
    println!(
        "acknowledged: {} ({} local, {} relayed) in {:.0}s of load with {cycles} kills",
        acked.len(),
        acked.iter().filter(|(_, l)| *l).count(),
        acked.iter().filter(|(_, l)| !*l).count(),
        load_time.as_secs_f64()
    );
    println!("delivered:    {delivered}");
    println!("duplicated:   {dup} (allowed: delivery is at least once)");
    println!("lost:         {lost}{}", if lost == 0 { "" } else { "   <-- MUST BE 0" });
    println!("peak RSS:     {:.1} MB (the daemon, any incarnation)", peak.load(Ordering::Relaxed) as f64 / 1024.0);
    println!("disk full:    {}", episode.unwrap_or_else(|| "no episode (see above)".into()));
}
