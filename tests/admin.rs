//! The admin API and CLI end to end against a running daemon: every endpoint with and without
//! the token, queue management on real deferred mail, metrics after a known workload, pause
//! (IIS semantics) and an orderly stop with sessions open.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::peer::{Behavior, Peer};
use common::*;

// The queue's behaviour on each store (tests/common/pg.rs).
both_stores!(
    every_endpoint_with_and_without_the_token,
    retry_all_goes_through_every_slice,
    stop_with_sessions_open_loses_nothing
);
use mailroot::client::{AdminClient, Response};
use mailroot::daemon::Running;
use serde_json::Value;

const TOKEN: &str = "s3cret-token";

fn api(running: &Running, token: &str) -> AdminClient {
    AdminClient {
        address: running.admin_addr.expect("admin API running").to_string(),
        token: token.into(),
        timeout: Duration::from_secs(30),
    }
}

/// The client an operator on this machine gets with no setup: the token the daemon generated.
fn operator(running: &Running) -> AdminClient {
    let token = std::fs::read_to_string(running.folders.root.join("admin.token")).unwrap_or_default();
    api(running, &token)
}

fn json(r: &Response) -> Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body))
}

fn call(c: &AdminClient, method: &str, path: &str) -> (u16, Value) {
    let r = c.request(method, path).expect("admin API answers");
    let v = json(&r);
    (r.status, v)
}

/// A daemon whose remote mail goes to `peer` as smart host; `t4…` recipients are deferred there.
fn deferring_daemon(dir: &Path, peer: &Peer, admin: &str) -> Running {
    let extra = format!(
        "[delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[{}]:{}\"\n[queue]\nretry_intervals = [\"1h\"]\n{admin}",
        peer.addr.ip(),
        peer.addr.port()
    );
    start(config(dir, &extra))
}

fn send(addr: std::net::SocketAddr, from: &str, to: &[&str]) -> u64 {
    let mut c = Client::ready(addr, "client.test");
    let r = c.transaction(from, to, b"Subject: admin test\r\n\r\nhello\r\n");
    assert_eq!(r.code, 250, "{r:?}");
    r.queue_id().expect("queue id")
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mailroot"))
}

fn every_endpoint_with_and_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::start("127.41.0.1", 0, Behavior::default());
    let running =
        deferring_daemon(dir.path(), &peer, &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"));
    let smtp = running.smtp_addrs[0];
    let ok = api(&running, TOKEN);

    // Three deferred messages (two to far.test, one to other.test) and their attempts.
    let a = send(smtp, "alice@example.test", &["t4a@far.test"]);
    let b = send(smtp, "alice@example.test", &["t4b@far.test"]);
    let c = send(smtp, "alice@example.test", &["t4c@other.test"]);
    wait_metric(&running, "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}", |v| v >= 3.0);

    // Without a token, or with a wrong one: 401 with a JSON error, for every endpoint.
    for token in ["", "wrong"] {
        let bad = api(&running, token);
        for (method, path) in [
            ("GET", "/metrics".to_string()),
            ("GET", "/api/status".into()),
            ("GET", "/api/history".into()),
            ("GET", "/api/sessions".into()),
            ("POST", "/api/sessions/1/disconnect".into()),
            ("GET", "/api/actors".into()),
            ("POST", "/api/queue/bulk".into()),
            ("GET", format!("/api/queue/{a}/headers")),
            ("GET", "/api/queue".into()),
            ("GET", format!("/api/queue/{a}")),
            ("POST", format!("/api/queue/{a}/retry")),
            ("POST", format!("/api/queue/{a}/hold")),
            ("POST", format!("/api/queue/{a}/release")),
            ("POST", format!("/api/queue/{a}/bounce")),
            ("DELETE", format!("/api/queue/{a}")),
            ("POST", "/api/queue/retry-all".into()),
            ("POST", "/api/server/pause".into()),
            ("POST", "/api/server/resume".into()),
            ("POST", "/api/server/reload".into()),
            ("POST", "/api/server/stop".into()),
        ] {
            let r = bad.request(method, &path).unwrap();
            assert_eq!(r.status, 401, "{method} {path} with token {token:?}: {}", r.body);
            assert!(json(&r)["error"].as_str().unwrap().contains("token"));
        }
    }

    let (status, v) = call(&ok, "GET", "/api/status");
    assert_eq!(status, 200);
    assert_eq!(v["state"], "running");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["listeners"][0]["addresses"][0], smtp.to_string());
    assert_eq!(v["listeners"][0]["name"], "mx");
    assert_eq!(v["listeners"][0]["role"], "mx");
    assert_eq!(v["queue"]["total"], 3);
    assert_eq!(v["queue"]["deferred"], 3);

    // Listing, filters and paging.
    let (_, v) = call(&ok, "GET", "/api/queue");
    let ids: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![a, b, c]);
    let m = &v["messages"][0];
    assert_eq!(m["sender"], "alice@example.test");
    assert_eq!(m["state"], "deferred");
    assert_eq!(m["attempts"], 1);
    assert_eq!(m["recipients"][0]["address"], "t4a@far.test");
    assert_eq!(m["recipients"][0]["status"], "pending");
    assert!(m["recipients"][0]["last_reply"].as_str().unwrap().starts_with("451 4.2.1"), "{m}");
    assert!(m["next_attempt"].as_u64().unwrap() > m["received_at"].as_u64().unwrap());
    assert!(m["size"].as_u64().unwrap() > 20);
    let (_, v) = call(&ok, "GET", "/api/queue?domain=OTHER.test");
    assert_eq!(v["messages"].as_array().unwrap().len(), 1);
    assert_eq!(v["messages"][0]["id"], c);
    let (_, v) = call(&ok, "GET", "/api/queue?limit=2");
    assert_eq!(v["messages"].as_array().unwrap().len(), 2);
    let next = v["next_after"].as_u64().expect("a next page");
    let (_, v) = call(&ok, "GET", &format!("/api/queue?limit=2&after={next}"));
    assert_eq!(v["messages"][0]["id"], c);
    assert!(v["next_after"].is_null());
    assert_eq!(call(&ok, "GET", "/api/queue?state=held").1["messages"].as_array().unwrap().len(), 0);
    assert_eq!(call(&ok, "GET", "/api/queue?state=bogus").0, 400);
    assert_eq!(call(&ok, "GET", "/api/queue?limit=many").0, 400);

    // One message; unknown IDs are 404 with a message.
    let (status, v) = call(&ok, "GET", &format!("/api/queue/{a}"));
    assert_eq!((status, v["id"].as_u64()), (200, Some(a)));
    for path in ["/api/queue/999999", "/api/queue/abc", "/api/nothing"] {
        let (status, v) = call(&ok, "GET", path);
        assert_eq!(status, 404, "{path}");
        assert!(v["error"].is_string(), "{path}: {v}");
    }
    assert_eq!(call(&ok, "POST", "/api/queue/999999/retry").0, 404);
    assert_eq!(call(&ok, "DELETE", "/api/queue/999999").0, 404);

    // Hold: not retried; retry refused while held; release puts it back.
    let (status, v) = call(&ok, "POST", &format!("/api/queue/{a}/hold"));
    assert_eq!((status, v["state"].as_str()), (200, Some("held")));
    assert_eq!(call(&ok, "GET", "/api/queue?state=held").1["messages"][0]["id"], a);
    assert_eq!(call(&ok, "POST", &format!("/api/queue/{a}/retry")).0, 409);
    assert_eq!(call(&ok, "GET", "/api/status").1["queue"]["held"], 1);
    let (status, v) = call(&ok, "POST", &format!("/api/queue/{a}/release"));
    assert_eq!((status, v["state"].as_str()), (200, Some("deferred")));

    // Retry now: the peer sees a second attempt at once (the schedule says 1h).
    let before = peer.connections();
    let (status, _) = call(&ok, "POST", &format!("/api/queue/{b}/retry"));
    assert_eq!(status, 200);
    wait_for("a second attempt", Duration::from_secs(10), || {
        let v = call(&ok, "GET", &format!("/api/queue/{b}")).1;
        (v["attempts"] == 2).then_some(())
    });
    assert!(peer.connections() > before);

    // Retry all for one domain: only far.test's messages.
    let (status, v) = call(&ok, "POST", "/api/queue/retry-all?domain=far.test");
    assert_eq!((status, v["retried"].as_u64()), (200, Some(2)));
    wait_for("the retried attempts", Duration::from_secs(10), || {
        let (va, vb) = (call(&ok, "GET", &format!("/api/queue/{a}")).1, call(&ok, "GET", &format!("/api/queue/{b}")).1);
        (va["attempts"] == 2 && vb["attempts"] == 3 && vb["state"] == "deferred").then_some(())
    });
    assert_eq!(call(&ok, "GET", &format!("/api/queue/{c}")).1["attempts"], 1);

    // Bounce: the sender (local) gets the NDR now, and the message leaves the queue.
    let (status, _) = call(&ok, "POST", &format!("/api/queue/{c}/bounce"));
    assert_eq!(status, 200);
    assert_eq!(call(&ok, "GET", &format!("/api/queue/{c}")).0, 404);
    let ndr = wait_for("the NDR in Drop", Duration::from_secs(10), || {
        drop_files(dir.path()).into_iter().find_map(|p| {
            let text = String::from_utf8_lossy(&std::fs::read(p).ok()?).into_owned();
            text.contains("t4c@other.test").then_some(text)
        })
    });
    assert!(ndr.contains("x-receiver: alice@example.test"), "{ndr}");
    assert!(ndr.contains("5.0.0"), "{ndr}");

    // Delete: gone, nobody told.
    let (status, _) = call(&ok, "DELETE", &format!("/api/queue/{a}"));
    assert_eq!(status, 200);
    assert_eq!(call(&ok, "GET", &format!("/api/queue/{a}")).0, 404);
    // Only b is left once the NDR about c (a message too) has been delivered.
    wait_for("one message left", Duration::from_secs(10), || {
        (call(&ok, "GET", "/api/status").1["queue"]["total"] == 1).then_some(())
    });

    // Metrics with the token: Prometheus text with the queue by state.
    let r = ok.request("GET", "/metrics").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.contains("mailroot_queue_messages_by_state{state=\"deferred\"} 1"), "{}", r.body);

    // Pause and resume through the API.
    assert_eq!(call(&ok, "POST", "/api/server/pause").1["state"], "paused");
    assert_eq!(call(&ok, "GET", "/api/status").1["state"], "paused");
    let mut refused = Client::connect(smtp);
    let g = refused.greeting();
    assert_eq!(g.code, 421, "{g:?}");
    assert!(g.text.starts_with("4.3.2"), "{g:?}");
    assert_eq!(call(&ok, "POST", "/api/server/resume").1["state"], "running");
    assert_eq!(Client::connect(smtp).greeting().code, 220);

    // Reload without a configuration file is refused with the reason.
    let (status, v) = call(&ok, "POST", "/api/server/reload");
    assert_eq!(status, 422);
    assert!(v["error"].as_str().unwrap().contains("without a configuration file"), "{v}");

    // The CLI on the same API: tables, --json, and the token from the command line.
    let admin = running.admin_addr.unwrap().to_string();
    let cli = |args: &[&str]| {
        let out = bin().args(args).args(["--admin", &admin]).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = cli(&["ctl", "status"]);
    assert_eq!(code, Some(1), "no token: {err}");
    assert!(err.contains("token") && err.contains("401"), "{err}");
    let (code, out, err) = cli(&["ctl", "status", "--token", TOKEN]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("running") && out.contains("queue: 1 messages"), "{out}");
    let (code, out, _) = cli(&["queue", "list", "--token", TOKEN]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&b.to_string()) && out.contains("t4b@far.test") && out.contains("deferred"), "{out}");
    let (code, out, _) = cli(&["queue", "list", "--json", "--token", TOKEN]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(v["messages"][0]["id"], b);
    let (code, out, _) = cli(&["queue", "show", &b.to_string(), "--token", TOKEN]);
    assert_eq!(code, Some(0));
    assert!(out.contains("451 4.2.1"), "{out}");
    let (code, _, err) = cli(&["queue", "show", "424242", "--token", TOKEN]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no such message") && err.contains("404"), "{err}");
    for (verb, state) in [("hold", "held"), ("release", "deferred")] {
        let (code, out, err) = cli(&["queue", verb, &b.to_string(), "--token", TOKEN]);
        assert_eq!(code, Some(0), "{verb}: {err}");
        assert!(out.contains(state), "{verb}: {out}");
    }
    let (code, out, _) = cli(&["queue", "retry", &b.to_string(), "--token", TOKEN]);
    assert_eq!(code, Some(0), "{out}");
    wait_for("the CLI's retry", Duration::from_secs(10), || {
        let v = call(&ok, "GET", &format!("/api/queue/{b}")).1;
        (v["attempts"] == 4 && v["state"] == "deferred").then_some(())
    });
    let (code, out, _) = cli(&["queue", "retry", "--all", "--token", TOKEN]);
    assert_eq!(code, Some(0));
    assert!(out.contains("1 message(s)"), "{out}");
    wait_for("retry --all", Duration::from_secs(10), || {
        let v = call(&ok, "GET", &format!("/api/queue/{b}")).1;
        (v["attempts"] == 5 && v["state"] == "deferred").then_some(())
    });
    // Address and token from a configuration file, as an operator runs it.
    let cfg = dir.path().join("cli.toml");
    std::fs::write(&cfg, format!("[admin]\nlisten = \"{admin}\"\ntoken = \"{TOKEN}\"\n")).unwrap();
    let out = bin().args(["ctl", "status", "--config"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("running"));
    let (code, _, _) = cli(&["ctl", "pause", "--token", TOKEN]);
    assert_eq!(code, Some(0));
    assert_eq!(Client::connect(smtp).greeting().code, 421);
    let (code, _, _) = cli(&["ctl", "resume", "--token", TOKEN]);
    assert_eq!(code, Some(0));
    let (code, out, _) = cli(&["queue", "bounce", &b.to_string(), "--token", TOKEN]);
    assert_eq!(code, Some(0), "{out}");
    // The bounce's NDR is a message too, delivered to the sender's Drop a moment later.
    wait_for("an empty queue", Duration::from_secs(10), || {
        (call(&ok, "GET", "/api/status").1["queue"]["total"] == 0).then_some(())
    });
    let (code, out, _) = cli(&["queue", "list", "--token", TOKEN]);
    assert_eq!(code, Some(0));
    assert_eq!(out, "The queue is empty.\n");
    let (code, out, _) = cli(&["queue", "list", "--domain", "far.test", "--token", TOKEN]);
    assert_eq!((code, out.as_str()), (Some(0), "No queued message matches.\n"));
    let d = send(smtp, "alice@example.test", &["t4d@far.test"]);
    wait_for("the first attempt", Duration::from_secs(10), || {
        (call(&ok, "GET", &format!("/api/queue/{d}")).1["state"] == "deferred").then_some(())
    });
    let (code, out, err) = cli(&["queue", "delete", &d.to_string(), "--token", TOKEN]);
    assert_eq!(code, Some(0), "{out} {err}");
    assert_eq!(call(&ok, "GET", &format!("/api/queue/{d}")).0, 404);

    // Stop through the CLI: the daemon ends by itself.
    let (code, out, _) = cli(&["ctl", "stop", "--token", TOKEN]);
    assert_eq!(code, Some(0));
    assert!(out.contains("stopping"), "{out}");
    running.wait();
}

#[test]
fn metrics_public_and_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(
        dir.path(),
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\nmetrics_public = true\n"),
    ));
    let anon = api(&running, "");
    assert_eq!(anon.request("GET", "/metrics").unwrap().status, 200);
    assert_eq!(anon.request("GET", "/api/status").unwrap().status, 401);
    running.stop();

    // No token configured: one is generated into the Mailroot (0600) and required; the CLI
    // reads it by itself.
    let running = start(config(dir.path(), "[admin]\nlisten = \"127.0.0.1:0\"\n"));
    let anon = api(&running, "");
    assert_eq!(anon.request("GET", "/api/status").unwrap().status, 401);
    assert_eq!(anon.request("GET", "/metrics").unwrap().status, 401);
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    assert_eq!(api(&running, &token).request("GET", "/api/status").unwrap().status, 200);
    let cfg = dir.path().join("cli.toml");
    let admin = running.admin_addr.unwrap();
    std::fs::write(&cfg, format!("[mailroot]\npath = {:?}\n[admin]\nlisten = \"{admin}\"\n", dir.path())).unwrap();
    let out = bin().args(["ctl", "status", "--config"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    running.stop();

    // An empty listen address: no admin API at all.
    let running = start(config(dir.path(), "[admin]\nlisten = \"\"\n"));
    assert!(running.admin_addr.is_none());
    running.stop();
}

/// Parses `name{labels} value` lines of the Prometheus text.
fn scrape(c: &AdminClient) -> Vec<(String, f64)> {
    let r = c.request("GET", "/metrics").unwrap();
    assert_eq!(r.status, 200);
    r.body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn value(samples: &[(String, f64)], name: &str) -> f64 {
    samples.iter().find(|(n, _)| n == name).map(|(_, v)| *v).unwrap_or_else(|| panic!("no metric {name}"))
}

#[test]
fn metrics_count_a_known_workload() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), "[relay]\nallow_networks = [\"127.0.0.1/32\"]\n"));
    let c = operator(&running);
    let smtp = running.smtp_addrs[0];
    let body = b"Subject: m\r\n\r\n0123456789\r\n";
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut client = Client::ready(smtp, "client.test");
        for j in 0..4 {
            let r = client.transaction("s@example.test", &[&format!("r{i}{j}@example.test")], body);
            ids.push(r.queue_id().unwrap());
        }
        assert_eq!(client.cmd("QUIT").code, 221);
    }
    // A refused relay attempt from outside the relay networks is counted by cause.
    let mut outsider = Client::connect_from("127.9.9.9", smtp);
    outsider.greeting();
    outsider.cmd("EHLO outsider.test");
    outsider.cmd("MAIL FROM:<x@outside.test>");
    assert_eq!(outsider.cmd("RCPT TO:<victim@elsewhere.test>").code, 550);
    outsider.cmd("QUIT");
    for n in 0..5 {
        std::fs::write(
            dir.path().join("Pickup").join(format!("p{n}.eml")),
            "x-sender: s@example.test\r\nx-receiver: p@example.test\r\nSubject: p\r\n\r\nbody\r\n",
        )
        .unwrap();
    }
    for id in &ids {
        drop_file(dir.path(), *id);
    }
    wait_metric(&running, "mailroot_deliveries_total{route=\"drop\",result=\"delivered\"}", |v| v >= 17.0);
    wait_for("sessions to end", Duration::from_secs(10), || {
        (metric(&running, "mailroot_inbound_connections_current") == 0.0).then_some(())
    });
    // 17 Enqueue and 5 PickupDone (sent once each file's deletion is synced).
    wait_metric(&running, "mailroot_actor_messages_handled_total{actor=\"queue\"}", |v| v == 22.0);

    let m = scrape(&c);
    assert_eq!(value(&m, "mailroot_messages_received_total{source=\"smtp\"}"), 12.0);
    assert_eq!(value(&m, "mailroot_messages_received_total{source=\"pickup\"}"), 5.0);
    assert_eq!(value(&m, "mailroot_deliveries_total{route=\"drop\",result=\"delivered\"}"), 17.0);
    assert_eq!(value(&m, "mailroot_pickup_files_total{result=\"queued\"}"), 5.0);
    assert_eq!(value(&m, "mailroot_inbound_connections_total"), 4.0);
    assert_eq!(value(&m, "mailroot_inbound_connections_current"), 0.0);
    assert_eq!(value(&m, "mailroot_refusals_total{cause=\"relay_denied\"}"), 1.0);
    assert_eq!(value(&m, "mailroot_queue_messages"), 0.0);
    assert_eq!(value(&m, "mailroot_queue_messages_by_state{state=\"deferred\"}"), 0.0);
    // Every message got a Received header plus its bytes: more than 17 × the body.
    let received = value(&m, "mailroot_bytes_received_total");
    assert!(received > 17.0 * body.len() as f64);
    // Each message went to Drop once, as stored.
    assert_eq!(value(&m, "mailroot_bytes_delivered_total{route=\"drop\"}"), received);
    // Per-actor metrics: what each kind handled, and who is alive.
    assert_eq!(value(&m, "mailroot_actor_messages_handled_total{actor=\"local-drop\"}"), 17.0);
    assert_eq!(value(&m, "mailroot_actor_handling_seconds_count{actor=\"local-drop\"}"), 17.0);
    assert_eq!(value(&m, "mailroot_actor_messages_handled_total{actor=\"pickup\"}"), 5.0);
    assert_eq!(value(&m, "mailroot_actor_messages_handled_total{actor=\"listener\"}"), 4.0);
    // Every message to the Queue: 17 Enqueue, 5 PickupDone (the files' deletion), and the
    // Summary this scrape asked for.
    assert_eq!(value(&m, "mailroot_actor_messages_handled_total{actor=\"queue\"}"), 23.0);
    // 4 connections × (EHLO … QUIT): more session messages than commands were batched.
    assert!(value(&m, "mailroot_actor_messages_handled_total{actor=\"session\"}") >= 4.0);
    for actor in ["listener", "queue", "scheduler", "local-drop", "remote-delivery", "pickup"] {
        assert_eq!(value(&m, &format!("mailroot_actor_live{{actor=\"{actor}\"}}")), 1.0, "{actor}");
        assert_eq!(value(&m, &format!("mailroot_actor_in_flight{{actor=\"{actor}\"}}")), 0.0, "{actor}");
    }
    assert_eq!(value(&m, "mailroot_actor_live{actor=\"session\"}"), 0.0);
    assert_eq!(value(&m, "mailroot_actor_restarts_total{actor=\"local-drop\"}"), 0.0);
    // The last hour minute by minute (the console's charts): the same workload, summed.
    let (status, v) = call(&c, "GET", "/api/history");
    assert_eq!(status, 200);
    let minutes = v["minutes"].as_array().expect("minutes");
    assert_eq!(minutes.len(), 60);
    let sum = |k: &str| minutes.iter().map(|m| m[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!((sum("received"), sum("delivered"), sum("deferred"), sum("bounced")), (17, 17, 0, 0), "{v}");
    let at = |i: usize| minutes[i]["at"].as_u64().unwrap();
    assert!((1..60).all(|i| at(i) == at(i - 1) + 60), "consecutive minutes, oldest first");
    running.stop();
}

#[test]
fn pause_refuses_new_clients_while_an_open_session_completes() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), ""));
    let c = operator(&running);
    let smtp = running.smtp_addrs[0];
    let mut open = Client::ready(smtp, "client.test");
    assert_eq!(open.cmd("MAIL FROM:<s@example.test>").code, 250);
    assert_eq!(call(&c, "POST", "/api/server/pause").0, 200);
    let mut late = Client::connect(smtp);
    let r = late.greeting();
    assert_eq!((r.code, r.text.starts_with("4.3.2")), (421, true), "{r:?}");
    assert!(late.read_reply().is_none(), "the refused connection is closed");
    // The open session goes on: its message is accepted and delivered while paused.
    assert_eq!(open.cmd("RCPT TO:<r@example.test>").code, 250);
    assert_eq!(open.cmd("DATA").code, 354);
    open.send(b"Subject: paused\r\n\r\nstill flowing\r\n.\r\n");
    let r = open.read_reply().unwrap();
    assert_eq!(r.code, 250);
    drop_file(dir.path(), r.queue_id().unwrap());
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"paused\"}"), 1.0);
    assert_eq!(call(&c, "POST", "/api/server/resume").0, 200);
    assert_eq!(Client::connect(smtp).greeting().code, 220);
    running.stop();
}

fn stop_with_sessions_open_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::start("127.42.0.1", 0, Behavior::default());
    // Remote deliveries wait 20 s at the peer's greeting: one is still in flight when the 3 s
    // grace time ends.
    peer.set(|b| b.stall = Some(Duration::from_secs(20)));
    let extra = format!(
        "[delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[{}]:{}\"\n",
        peer.addr.ip(),
        peer.addr.port()
    );
    let mut cfg = config(dir.path(), &extra);
    cfg.server.shutdown_grace = mailroot::config::HumanDuration(Duration::from_secs(3));
    let running = start(cfg.clone());
    let smtp = running.smtp_addrs[0];
    let relayed = send(smtp, "s@example.test", &["far@far.test"]);
    // While its delivery is in flight, the message cannot be changed: 409 with the reason.
    let c = operator(&running);
    wait_for("the delivery in flight", Duration::from_secs(10), || {
        (call(&c, "GET", &format!("/api/queue/{relayed}")).1["state"] == "active").then_some(())
    });
    for (method, action) in [("POST", "hold"), ("POST", "bounce"), ("POST", "retry"), ("DELETE", "")] {
        let path = format!("/api/queue/{relayed}/{action}");
        let (status, v) = call(&c, method, path.trim_end_matches('/'));
        assert_eq!(status, 409, "{method} {path}: {v}");
        assert!(v["error"].as_str().unwrap().contains("being delivered"), "{v}");
    }

    let mut idle = Client::ready(smtp, "idle.test");
    let mut busy = Client::ready(smtp, "busy.test");
    assert_eq!(busy.cmd("MAIL FROM:<s@example.test>").code, 250);
    assert_eq!(busy.cmd("RCPT TO:<r@example.test>").code, 250);
    assert_eq!(busy.cmd("DATA").code, 354);
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n");

    let stopper = std::thread::spawn(move || running.stop());
    // The idle session is told at once.
    let r = idle.read_reply().expect("421 to the idle session");
    assert_eq!((r.code, r.text.starts_with("4.3.2")), (421, true), "{r:?}");
    // The session in a transaction may finish it: its message is accepted…
    std::thread::sleep(Duration::from_millis(200));
    busy.send(b"second half\r\n.\r\n");
    let r = busy.read_reply().expect("end of data reply");
    assert_eq!(r.code, 250, "{r:?}");
    let accepted = r.queue_id().unwrap();
    // … and then it is closed with 421.
    let r = busy.read_reply().expect("421 after the transaction");
    assert_eq!(r.code, 421, "{r:?}");
    stopper.join().unwrap();

    // Restart: both messages are still there and get delivered.
    peer.set(|b| b.stall = None);
    let running = start(cfg);
    drop_file(dir.path(), accepted);
    wait_for("the relayed message at the peer", Duration::from_secs(20), || {
        peer.received().iter().any(|m| m.rcpts.contains(&"<far@far.test>".to_string())).then_some(())
    });
    assert_eq!(peer.received().iter().filter(|m| m.rcpts.contains(&"<far@far.test>".to_string())).count(), 1);
    running.stop();
}

/// `server.max_connections` changes at a reload for new connections, also while connections are
/// open: the limit shrinks as they close, never by dropping them.
#[test]
fn reload_resizes_the_connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mailroot.toml");
    let write = |max: usize| {
        let text = format!(
            "[server]\nhostname = \"{HOST}\"\nlisten = [\"127.0.0.1:0\"]\nmax_connections = {max}\nshutdown_grace = \"1s\"\n\
             [mailroot]\npath = \"spool\"\n[domains]\nlocal = [\"example.test\"]\n[admin]\nlisten = \"\"\n"
        );
        std::fs::write(&path, text).unwrap();
    };
    write(5);
    let loaded = mailroot::config::Config::load(Some(&path)).unwrap();
    let options = mailroot::daemon::StartOptions { handle_signals: false, config_path: Some(path.clone()) };
    let running = mailroot::daemon::start(loaded.config, options).unwrap();
    let smtp = running.smtp_addrs[0];
    let greet = || Client::connect(smtp).greeting().code;
    let open: Vec<Client> = (0..3).map(|_| Client::ready(smtp, "c.test")).collect();

    // Down to 1 with three open: none is dropped, and nobody new gets in…
    write(1);
    assert_eq!(running.reload().unwrap(), vec!["server".to_string()]);
    assert_eq!(greet(), 421);
    let mut open = open.into_iter();
    let last = open.next().unwrap();
    // … until only one is left open.
    drop(open);
    wait_metric(&running, "mailroot_inbound_connections_current", |v| v == 1.0);
    assert_eq!(greet(), 421, "one open connection fills a limit of one");
    drop(last);
    wait_for("a free slot", Duration::from_secs(10), || (greet() == 220).then_some(()));

    // Up to 2: two at once.
    write(2);
    running.reload().unwrap();
    let (a, b) = (Client::ready(smtp, "a.test"), Client::ready(smtp, "b.test"));
    assert_eq!(greet(), 421);
    drop((a, b));
    running.stop();
}

/// One raw HTTP request with the headers a browser page (or an attacker's script) would send.
fn raw(addr: std::net::SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Secure by default: no configured token still means a token; a cross-site form POST, a
/// DNS-rebinding Host and a foreign Origin are refused, even with the right token.
#[test]
fn the_admin_api_does_not_obey_web_pages() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), "[admin]\nlisten = \"127.0.0.1:0\"\nhosts = [\"mail.example.test\"]\n"));
    let addr = running.admin_addr.unwrap();
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let auth = format!("Authorization: Bearer {token}\r\n");
    let host = format!("Host: {addr}\r\n");
    // The attack as seen: a form POST from a foreign page, with no token.
    let form = format!("{host}Origin: http://evil.example\r\nContent-Type: application/x-www-form-urlencoded\r\n");
    assert_eq!(raw(addr, "POST", "/api/server/stop", &form, "a=b"), 403);
    // Even with the token: forms are not JSON, foreign origins are refused.
    assert_eq!(raw(addr, "POST", "/api/server/pause", &format!("{host}{auth}Content-Type: text/plain\r\n"), "x"), 415);
    let foreign = format!("{host}{auth}Origin: http://evil.example\r\nContent-Type: application/json\r\n");
    assert_eq!(raw(addr, "POST", "/api/server/pause", &foreign, "{}"), 403);
    // DNS rebinding: a page on evil.example that resolves to 127.0.0.1.
    let rebound = format!("Host: evil.example:{}\r\n{auth}", addr.port());
    assert_eq!(raw(addr, "GET", "/api/status", &rebound, ""), 403);
    // No token at all: 401.
    assert_eq!(raw(addr, "GET", "/api/status", &host, ""), 401);
    // What is allowed: the address, localhost, a configured name; JSON from the same origin.
    assert_eq!(raw(addr, "GET", "/api/status", &format!("{host}{auth}"), ""), 200);
    assert_eq!(raw(addr, "GET", "/api/status", &format!("Host: localhost:{}\r\n{auth}", addr.port()), ""), 200);
    assert_eq!(raw(addr, "GET", "/api/status", &format!("Host: mail.example.test\r\n{auth}"), ""), 200);
    let same = format!("{host}{auth}Origin: http://{addr}\r\nContent-Type: application/json\r\n");
    assert_eq!(raw(addr, "POST", "/api/server/pause", &same, "{}"), 200);
    assert_eq!(
        raw(addr, "POST", "/api/server/resume", &format!("{host}{auth}Content-Type: application/json\r\n"), "{}"),
        200
    );
    // Still running after all of it.
    assert_eq!(api(&running, &token).request("GET", "/api/status").unwrap().status, 200);
    running.stop();
}

/// Retry-all works through the queue in slices (256 envelopes each), so it reaches every
/// deferred message however many there are, and the Queue keeps answering meanwhile.
fn retry_all_goes_through_every_slice() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::start("127.43.0.1", 0, Behavior::default());
    let running = deferring_daemon(dir.path(), &peer, "[admin]\nlisten = \"127.0.0.1:0\"\n");
    let smtp = running.smtp_addrs[0];
    // 300 deferred messages: more than one slice.
    let mut c = Client::ready(smtp, "client.test");
    for i in 0..300 {
        let r = c.transaction("alice@example.test", &[&format!("t4{i}@far.test")], b"Subject: s\r\n\r\nx\r\n");
        assert_eq!(r.code, 250, "{r:?}");
    }
    let temporary = "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}";
    wait_for("300 deferred", Duration::from_secs(60), || (metric(&running, temporary) >= 300.0).then_some(()));
    let (status, v) = call(&operator(&running), "POST", "/api/queue/retry-all");
    assert_eq!((status, v["retried"].as_u64()), (200, Some(300)), "{v}");
    // Each was tried again (and deferred again by the peer).
    wait_for("300 more attempts", Duration::from_secs(60), || (metric(&running, temporary) >= 600.0).then_some(()));
    running.stop();
}
