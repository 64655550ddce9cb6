//! Console paging benchmark: N messages (default 100,000) sit deferred in the queue (a smart
//! host defers every recipient), then rounds of 20,000 local messages are sent: alone; while a
//! client pages through the whole queue through the admin API as the console does (pages of 100
//! back to back, the same at 10 a second, a filter that matches nothing and so scans 20,000
//! envelopes per request); alone again. Prints intake per round (the question: does paging slow
//! intake?) and the list requests' times. Run with `cargo bench --bench console_paging -- [--messages N]
//! [--sessions S] [--dir PATH] [--store sled|postgres|both] [--pg URL]`; see docs/performance.md.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Sink;
use mailroot::client::AdminClient;

const TO: &str = "sink@relay.test";
const FROM: &str = "bench@example.test";
const LOCAL: &str = "sink@example.test";
/// Local messages per intake round.
const ROUND: usize = 20_000;

/// What a pager did: requests, messages listed, whole passes, and the time per request.
#[derive(Default)]
struct Paging {
    requests: usize,
    messages: usize,
    passes: usize,
    times: Vec<Duration>,
}

/// Pages through the whole queue with `query`, again and again until `stop`, waiting `pause`
/// between requests (zero: as fast as the API answers).
fn pager(admin: AdminClient, query: &'static str, pause: Duration, stop: Arc<AtomicBool>) -> Paging {
    let mut p = Paging::default();
    let mut after: Option<u64> = None;
    while !stop.load(Ordering::Relaxed) {
        let path = match after {
            Some(a) => format!("/api/queue?{query}&after={a}"),
            None => format!("/api/queue?{query}"),
        };
        let t = Instant::now();
        let r = admin.request("GET", &path).expect("list");
        p.times.push(t.elapsed());
        assert_eq!(r.status, 200, "{}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        p.requests += 1;
        p.messages += v["messages"].as_array().map_or(0, Vec::len);
        after = v["next_after"].as_u64();
        if after.is_none() {
            p.passes += 1;
        }
        std::thread::sleep(pause);
    }
    p
}

fn intake(addr: std::net::SocketAddr, sessions: usize, size: usize) -> f64 {
    let (accepted, took) = common::load(addr, sessions, ROUND, FROM, LOCAL, common::body(size, LOCAL));
    accepted as f64 / took.as_secs_f64()
}

/// One whole run on a fresh daemon in `base`, on sled or (with `pg`) PostgreSQL.
fn run(a: &common::Args, messages: usize, base: &std::path::Path, pg: Option<&common::BenchSchema>) {
    let _ = std::fs::remove_dir_all(base);
    let sink = Sink::start();
    sink.defer.store(true, Ordering::Relaxed);
    let running = common::deferring_daemon(base, &sink, pg);
    let addr = running.smtp_addrs[0];
    println!(
        "console_paging [{}]: {messages} messages deferred in the queue, intake of {ROUND} local messages from {} \
         sessions without and with a client paging; mailroot in {}",
        if pg.is_some() { "postgres" } else { "sled" },
        a.sessions,
        base.display()
    );

    let start = Instant::now();
    let accepted = common::fill_deferred(&running, a, messages, FROM, TO);
    println!("queue:      {accepted} messages deferred in {:.1}s", start.elapsed().as_secs_f64());
    let token = std::fs::read_to_string(base.join("admin.token")).expect("admin token");
    let admin = || AdminClient {
        address: running.admin_addr.expect("admin API").to_string(),
        token: token.clone(),
        timeout: Duration::from_secs(600),
    };

    let before = intake(addr, a.sessions, a.size);
    let rounds: [(&str, &'static str, Duration); 3] = [
        ("pages of 100, back to back", "limit=100", Duration::ZERO),
        ("pages of 100, 10 a second", "limit=100", Duration::from_millis(100)),
        ("a filter matching nothing, back to back", "limit=100&sender=nobody-sends-this", Duration::ZERO),
    ];
    let mut results = Vec::new();
    for (what, query, pause) in rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let paging = {
            let (admin, stop) = (admin(), stop.clone());
            std::thread::spawn(move || pager(admin, query, pause, stop))
        };
        let with = intake(addr, a.sessions, a.size);
        stop.store(true, Ordering::Relaxed);
        results.push((what, with, paging.join().expect("pager")));
    }
    let after = intake(addr, a.sessions, a.size);
    // Intake drifts over a run (the disk, the Drop folder filling): rounds are compared with the
    // mean of the rounds alone before and after them.
    let alone = (before + after) / 2.0;
    println!("intake:     alone {before:.0} before and {after:.0} after messages/s (mean {alone:.0})");
    for (what, with, p) in results {
        let mut t = p.times.clone();
        t.sort();
        let ms = |q: f64| {
            t.get(((t.len() as f64 * q) as usize).min(t.len().saturating_sub(1))).map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        println!(
            "intake:     {with:.0} messages/s ({:.2} of alone) while paging with {what}: {} requests ({} messages \
             listed, {} whole passes), median {:.1} ms, p99 {:.1} ms",
            with / alone,
            p.requests,
            p.messages,
            p.passes,
            ms(0.5),
            ms(0.99)
        );
    }
    // The console's "every message matching the filter": all IDs, page by page, then the
    // action 1,000 at a time.
    let client = admin();
    let start = Instant::now();
    let mut ids = Vec::new();
    let mut after: Option<u64> = None;
    loop {
        let path = match after {
            Some(a) => format!("/api/queue?limit=1000&state=deferred&after={a}"),
            None => "/api/queue?limit=1000&state=deferred".to_string(),
        };
        let v: serde_json::Value =
            serde_json::from_str(&client.request("GET", &path).expect("list").body).expect("JSON");
        ids.extend(v["messages"].as_array().into_iter().flatten().filter_map(|m| m["id"].as_u64()));
        match v["next_after"].as_u64() {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let listed = start.elapsed();
    for action in ["hold", "release"] {
        let start = Instant::now();
        let mut done = 0;
        for chunk in ids.chunks(1000) {
            let list: Vec<String> = chunk.iter().map(u64::to_string).collect();
            let body = format!("{{\"action\":\"{action}\",\"ids\":[{}]}}", list.join(","));
            let r = client.request_json("POST", "/api/queue/bulk", &body).expect("bulk");
            let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
            done += v["done"].as_u64().unwrap_or(0);
        }
        let took = start.elapsed();
        println!(
            "bulk:       {action} on every deferred message ({} listed in {:.1}s): {done} done in {:.1}s = {:.0} messages/s",
            ids.len(),
            listed.as_secs_f64(),
            took.as_secs_f64(),
            done as f64 / took.as_secs_f64()
        );
    }
    running.stop();
}

fn main() {
    let a = common::Args::parse();
    let messages = if std::env::args().any(|x| x == "--messages") { a.messages } else { 100_000 };
    let base = a.dir.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-console"));
    let _ = std::fs::remove_dir_all(&base);
    for store in &a.stores {
        let schema = (store == "postgres").then(|| common::BenchSchema::new(&a.pg, "console"));
        run(&a, messages, &base.join(store), schema.as_ref());
    }
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
}
