//! Load benchmark: N messages of `size` bytes from S concurrent SMTP sessions to a local domain,
//! with full durability on. Prints accepted messages per second and the time until every message
//! is in Drop. Run with `cargo bench --bench smtp_load -- [--messages N] [--sessions S]
//! [--size BYTES] [--dir PATH]`; see docs/performance.md.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use mailroot::config::Config;
use mailroot::daemon::{self, StartOptions};

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
    let a = common::Args::parse();
    let base = a.dir.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-mailroot"));
    let _ = std::fs::remove_dir_all(&base);
    let mut config = Config::from_toml(
        "[server]\nhostname = \"bench.example.test\"\nlisten = [\"127.0.0.1:0\"]\n[domains]\nlocal = [\"example.test\"]\n[access]\nmax_connections_per_ip = 0\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("bench config");
    config.mailroot.path = base.clone();
    let running = daemon::start(config, StartOptions::default()).expect("start");
    let addr = running.smtp_addrs[0];

    let body = common::body(a.size, "sink@example.test");

    println!(
        "smtp_load: {} messages of {} bytes, {} sessions, mailroot in {}",
        a.messages,
        a.size,
        a.sessions,
        base.display()
    );
    let start = Instant::now();
    let (accepted, accept_time) =
        common::load(addr, a.sessions, a.messages, "bench@remote.test", "sink@example.test", body);
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
