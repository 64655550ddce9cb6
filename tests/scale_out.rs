//! Several nodes on one PostgreSQL queue (`queue.store = "postgres"`): two daemons share the
//! work and lose nothing; a node killed with SIGKILL while delivering leaves its mail to the
//! survivor (after its leases expire); a database that goes away and comes back costs `451`s
//! meanwhile and nothing acknowledged, without a restart. Each test has a schema of its own on
//! the machine's PostgreSQL (tests/common/pg.rs).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::peer::{Behavior, Peer};
use common::pg::{Proxy, Schema};
use common::*;

/// A node whose remote mail goes to `peer`; `delivery` adds lines to its `[delivery]`.
fn node(dir: &Path, schema: &Schema, name: &str, peer: &Peer, delivery: &str) -> mailroot::config::Config {
    let mut c = config(
        dir,
        &format!(
            "[delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[{}]:{}\"\n{delivery}",
            peer.addr.ip(),
            peer.addr.port()
        ),
    );
    schema.apply(&mut c, name);
    c
}

/// The admin API of a node, with the token it generated.
fn admin(running: &mailroot::daemon::Running) -> mailroot::client::AdminClient {
    mailroot::client::AdminClient {
        address: running.admin_addr.expect("admin").to_string(),
        token: std::fs::read_to_string(running.folders.root.join("admin.token")).unwrap_or_default(),
        timeout: Duration::from_secs(30),
    }
}

/// How many times each token (Subject line) reached the peer.
fn tokens(peer: &Peer) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for r in peer.received() {
        for line in String::from_utf8_lossy(&r.data).lines() {
            if let Some(tok) = line.strip_prefix("Subject: ") {
                *seen.entry(tok.to_string()).or_insert(0) += 1;
            }
        }
    }
    seen
}

/// `n` messages over one connection to `addr`, pipelined a transaction at a time; returns the
/// tokens and queue IDs of those that got a 250.
fn send_many(addr: SocketAddr, prefix: &str, n: usize) -> Vec<(String, u64)> {
    let mut c = Client::ready(addr, "load.test");
    let mut acked = Vec::with_capacity(n);
    for i in 0..n {
        let token = format!("{prefix}-{i}");
        c.send(
            format!(
                "MAIL FROM:<load@example.test>\r\nRCPT TO:<sink@far.test>\r\nDATA\r\nSubject: {token}\r\n\r\nbody\r\n.\r\n"
            )
            .as_bytes(),
        );
        let mut last = None;
        for _ in 0..4 {
            last = c.read_reply();
        }
        let last = last.expect("a reply to DATA");
        assert_eq!(last.code, 250, "{last:?}");
        acked.push((token, last.queue_id().expect("queue id")));
    }
    acked
}

fn wait_delivered(peer: &Peer, acked: &[String], within: Duration) -> HashMap<String, usize> {
    let deadline = Instant::now() + within;
    loop {
        let seen = tokens(peer);
        let missing = acked.iter().filter(|t| !seen.contains_key(*t)).count();
        if missing == 0 {
            return seen;
        }
        assert!(Instant::now() < deadline, "{missing} of {} acknowledged messages not delivered", acked.len());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 10,000 messages, half to each of two nodes on one database: every one delivered, message IDs
/// unique across the nodes, duplicates counted.
#[test]
fn two_nodes_share_one_queue() {
    let Some(schema) = Schema::for_this_test() else { return };
    let peer = Peer::start("127.0.0.1", 0, Behavior::default());
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(node(d1.path(), &schema, "node-a", &peer, ""));
    let b = start(node(d2.path(), &schema, "node-b", &peer, ""));
    let started = Instant::now();
    let (total, clients) = (10_000, 8);
    let acked: Vec<(String, u64)> = (0..clients)
        .map(|t| {
            let addr = if t % 2 == 0 { a.smtp_addrs[0] } else { b.smtp_addrs[0] };
            std::thread::spawn(move || send_many(addr, &format!("m{t}"), total / clients))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|h| h.join().expect("client"))
        .collect();
    let accepted_in = started.elapsed();
    assert_eq!(acked.len(), total);
    let ids: std::collections::HashSet<u64> = acked.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), total, "message IDs are unique across the nodes");
    let tokens_acked: Vec<String> = acked.into_iter().map(|(t, _)| t).collect();
    let seen = wait_delivered(&peer, &tokens_acked, Duration::from_secs(300));
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    println!(
        "two nodes: {total} messages accepted in {accepted_in:?}, all delivered after {:?}; {duplicates} duplicates",
        started.elapsed()
    );
    // Nothing failed, so nothing was sent twice: a duplicate needs a node that died.
    assert_eq!(duplicates, 0);
    // The queue empties: every result was recorded and committed.
    wait_for("an empty queue", Duration::from_secs(30), || {
        let n = common::pg::query(&format!("SELECT count(*) FROM {}.messages", schema.name)).ok()?;
        (n.first().map(String::as_str) == Some("0")).then_some(())
    });
    a.stop();
    b.stop();
}

/// Node A (its own process) takes 300 messages and delivers them slowly; it is SIGKILLed in the
/// middle. Node B, running on the same database all along, leaves A's messages alone while A
/// lives and delivers every acknowledged one once A's leases have expired (10 s here); what A
/// handed over without recording it arrives twice, counted.
#[test]
fn a_node_killed_while_delivering_leaves_its_mail_to_the_other() {
    let Some(schema) = Schema::for_this_test() else { return };
    // Each connection waits before its greeting: A is still delivering when it dies.
    let peer = Peer::start("127.0.0.1", 0, Behavior { stall: Some(Duration::from_millis(150)), ..Behavior::default() });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nhostname = \"a.example.test\"\nlisten = [\"127.0.0.1:0\"]\n[mailroot]\npath = \"a\"\n\
             [domains]\nlocal = [\"example.test\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[127.0.0.1]:{}\"\nmax_connections = 2\n\
             max_messages_per_connection = 5\n{}",
            peer.addr.port(),
            schema.toml("node-a")
        ),
    )
    .unwrap();
    // B runs all along: it must not take what A holds leases on while A lives.
    let bdir = tempfile::tempdir().unwrap();
    let b = start(node(bdir.path(), &schema, "node-b", &peer, "max_connections = 8\n"));
    let (mut a, a_addr) = spawn_daemon(&file);
    let acked: Vec<String> = send_many(a_addr, "k", 300).into_iter().map(|(t, _)| t).collect();
    wait_for("A to be delivering", Duration::from_secs(60), || (tokens(&peer).len() >= 10).then_some(()));
    let by_b = "mailroot_deliveries_total{route=\"smtp\",result=\"delivered\"}";
    assert_eq!(metric(&b, by_b), 0.0, "B took none of the messages A holds leases on");
    // B's admin API shows the shared queue, and refuses to act on what A is working on.
    let api = admin(&b);
    let r = api.request("GET", "/api/queue?limit=1000").expect("list on B");
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    let listed = v["messages"].as_array().map_or(0, |m| m.len());
    assert!(listed > 0, "B lists A's messages: {}", r.body);
    let id = v["messages"][0]["id"].as_u64().expect("an ID");
    let r = api.request("POST", &format!("/api/queue/{id}/hold")).expect("hold on B");
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("node-a"), "{}", r.body);
    a.kill().expect("SIGKILL");
    let _ = a.wait();
    let killed = Instant::now();
    let delivered_by_a = tokens(&peer).len();
    assert!(delivered_by_a < acked.len(), "A died with work left ({delivered_by_a} of {} delivered)", acked.len());

    // The lease (10 s) plus B's look every second, plus the delivery itself.
    let seen = wait_delivered(&peer, &acked, Duration::from_secs(90));
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    assert!(metric(&b, by_b) > 0.0, "B delivered A's leftovers");
    let taken = metric(&b, "mailroot_queue_takeovers_total");
    assert!(taken > 0.0 && taken <= acked.len() as f64, "takeovers counted: {taken}");
    println!(
        "killed node: {} acknowledged, {delivered_by_a} delivered by A before SIGKILL, the rest by B within {:?} \
         of the kill (lease 10 s); {taken} taken over by B (counted), {duplicates} arrived twice",
        acked.len(),
        killed.elapsed()
    );
    b.stop();
}

/// The database goes away (every connection cut, new ones refused) and comes back: meanwhile
/// new mail gets 451 4.3.0 and nothing is acknowledged; afterwards mail flows again without a
/// restart, and what was acknowledged before is delivered.
#[test]
fn a_database_that_goes_away_and_comes_back() {
    let Some(schema) = Schema::for_this_test() else { return };
    let proxy = Proxy::start();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), "");
    schema.apply(&mut c, "node1");
    c.queue.postgres.url = common::pg::url_via(proxy.addr);
    c.queue.postgres.connect_timeout = mailroot::config::HumanDuration(Duration::from_secs(2));
    let running = start(c);
    let smtp = running.smtp_addrs[0];
    let mut client = Client::ready(smtp, "client.test");
    let before = client.transaction("a@example.test", &["before@example.test"], b"Subject: before\r\n\r\nx\r\n");
    assert_eq!(before.code, 250, "{before:?}");

    proxy.set_down(true);
    // New mail is refused, temporarily, and never acknowledged, until the database is back.
    common::pg::refused_while_down(smtp);
    let r = admin(&running).request("GET", "/api/status").expect("status while the database is away");
    assert!(r.body.contains("store_error"), "{}", r.body);

    proxy.set_down(false);
    // Back within the recovery interval (every 5 s), without a restart.
    common::pg::taken_again(smtp);
    wait_for("both acknowledged messages in Drop", Duration::from_secs(30), || {
        let subjects: Vec<String> =
            drop_files(&running.folders.root).iter().filter_map(|f| std::fs::read_to_string(f).ok()).collect();
        let has = |s: &str| subjects.iter().any(|t| t.contains(s));
        (has("Subject: before") && has("Subject: after")).then_some(())
    });
    assert!(
        !drop_files(&running.folders.root)
            .iter()
            .any(|f| std::fs::read_to_string(f).is_ok_and(|t| t.contains("Subject: during"))),
        "a message refused while the database was away is not delivered"
    );
    running.stop();
}

/// `mailroot queue export` / `import`, run as an operator would (the binary, daemons stopped):
/// deferred mail moves from sled to PostgreSQL and back with every recipient's state (attempts,
/// last reply, the recipient already delivered), and is delivered from where it ends up.
#[test]
fn the_queue_moves_from_sled_to_postgres_and_back() {
    let Some(schema) = Schema::for_this_test() else { return };
    let peer = Peer::start("127.0.0.1", 0, Behavior::default());
    let delivery = format!(
        "[delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[127.0.0.1]:{}\"\n[queue]\nretry_intervals = [\"1h\"]\n",
        peer.addr.port()
    );
    let dir = tempfile::tempdir().unwrap();
    let on_sled = |name: &str| {
        let mut c = config(&dir.path().join(name), &delivery);
        c.queue.store = "sled".into();
        c
    };
    let on_pg = |name: &str| {
        let mut c = config(&dir.path().join(name), &delivery);
        schema.apply(&mut c, "node1");
        c
    };
    let cli = |c: &mailroot::config::Config, args: &[&str]| {
        let file = dir.path().join(format!("{}.toml", c.mailroot.path.file_name().unwrap().to_string_lossy()));
        std::fs::write(&file, c.to_toml()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_mailroot"))
            .args(["queue"])
            .args(args)
            .arg("--config")
            .arg(&file)
            .output()
            .expect("run mailroot");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "mailroot queue {args:?}: {text}");
        text
    };
    let deferred = |running: &mailroot::daemon::Running| {
        let admin = admin(running);
        let r = admin.request("GET", "/api/queue").expect("list");
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        (admin, v["messages"].as_array().cloned().unwrap_or_default())
    };

    // On sled: two deferred messages, one of them with a recipient already delivered.
    let first = on_sled("first");
    let running = start(first.clone());
    let mut c = Client::ready(running.smtp_addrs[0], "client.test");
    assert_eq!(c.transaction("a@example.test", &["t4one@far.test"], b"Subject: one\r\n\r\nx\r\n").code, 250);
    assert_eq!(
        c.transaction("a@example.test", &["t4two@far.test", "ok@far.test"], b"Subject: two\r\n\r\nx\r\n").code,
        250
    );
    wait_metric(&running, "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}", |v| v >= 2.0);
    wait_metric(&running, "mailroot_deliveries_total{route=\"smtp\",result=\"delivered\"}", |v| v >= 1.0);
    running.stop();
    let file = dir.path().join("queue.jsonl");
    let said = cli(&first, &["export", "--out", file.to_str().unwrap()]);
    assert!(said.contains("2 messages exported"), "{said}");

    // Into PostgreSQL: the same state, and a file cut short is refused whole.
    let cut = dir.path().join("cut.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&cut, text.lines().take(2).collect::<Vec<_>>().join("\n")).unwrap();
    let second = on_pg("second");
    let refused = Command::new(env!("CARGO_BIN_EXE_mailroot"))
        .args(["queue", "import", "--in", cut.to_str().unwrap(), "--config"])
        .arg({
            let f = dir.path().join("second-cut.toml");
            std::fs::write(&f, second.to_toml()).unwrap();
            f
        })
        .output()
        .unwrap();
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("cut short"));
    let said = cli(&second, &["import", "--in", file.to_str().unwrap()]);
    assert!(said.contains("2 messages imported"), "{said}");
    let running = start(second.clone());
    let (_, list) = deferred(&running);
    assert_eq!(list.len(), 2, "{list:?}");
    let two = list.iter().find(|m| m["recipients"].as_array().unwrap().len() == 2).expect("message two");
    let states: Vec<(&str, u64)> = two["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["status"].as_str().unwrap(), r["attempts"].as_u64().unwrap()))
        .collect();
    assert_eq!(states, vec![("pending", 1), ("delivered", 1)]);
    assert!(two["recipients"][0]["last_reply"].as_str().unwrap().starts_with("451"), "{two}");
    running.stop();

    // And back to sled, where the peer now takes everything.
    let out2 = dir.path().join("queue2.jsonl");
    let said = cli(&second, &["export", "--out", out2.to_str().unwrap()]);
    assert!(said.contains("2 messages exported"), "{said}");
    let third = on_sled("third");
    let said = cli(&third, &["import", "--in", out2.to_str().unwrap()]);
    assert!(said.contains("2 messages imported"), "{said}");
    peer.set(|b| b.rcpt_replies.clear());
    let running = start(third);
    let (admin, list) = deferred(&running);
    assert_eq!(list.len(), 2);
    assert_eq!(admin.request("POST", "/api/queue/retry-all").expect("retry all").status, 200);
    wait_for("both deferred recipients delivered", Duration::from_secs(30), || {
        let seen = tokens(&peer);
        (seen.get("one") == Some(&1) && seen.get("two") == Some(&2)).then_some(())
    });
    // `two` went once with ok@ and once more with t4two@ only: its delivered recipient was
    // never sent again.
    let last_two =
        peer.received().into_iter().rev().find(|r| String::from_utf8_lossy(&r.data).contains("Subject: two"));
    assert_eq!(last_two.map(|r| r.rcpts), Some(vec!["<t4two@far.test>".to_string()]));
    running.stop();
}
