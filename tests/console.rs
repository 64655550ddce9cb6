//! The web console end to end: its pages and their headers (behind a path prefix too), the
//! endpoints it added (open sessions and disconnect, actors, bulk actions, message headers,
//! sender and recipient filters), cross-site and foreign-Host requests refused, and the console
//! driven in Debian's headless Chromium (`console_in_a_real_browser`, see tests/common/browser.rs).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use common::peer::{Behavior, Peer};
use common::*;
use mailroot::daemon::Running;
use serde_json::Value;

const TOKEN: &str = "console-test-token-0123456789abcdef";

/// One raw HTTP/1.1 exchange: (status, headers lowercased as "name: value" lines, body).
fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("admin API reachable");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // A server that answers before reading a body (401, 413) may close, or reset, the connection
    // with the rest unread: the answer is what counts, whatever the write and the end of the read say.
    let _ = s.write_all(request.as_bytes());
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn get(addr: SocketAddr, host: &str, path: &str, token: Option<&str>) -> (u16, String, String) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"))
}

/// A POST as the caller describes it: extra header lines, then the body.
fn post(addr: SocketAddr, path: &str, headers: &str, body: &str) -> (u16, String, String) {
    http(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn api_get(addr: SocketAddr, path: &str) -> Value {
    let (status, _, body) = get(addr, &addr.to_string(), path, Some(TOKEN));
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

fn api_post(addr: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    let (status, _, text) =
        post(addr, path, &format!("Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"), body);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn admin_of(running: &Running) -> SocketAddr {
    running.admin_addr.expect("admin API running")
}

fn admin_toml(extra: &str) -> String {
    format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n{extra}")
}

/// A daemon whose remote mail goes to `peer`, which defers `t4…` recipients (451).
fn deferring_daemon(dir: &Path, peer: &Peer) -> Running {
    let extra = format!(
        "[delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[{}]:{}\"\n[queue]\nretry_intervals = [\"1h\"]\n{}",
        peer.addr.ip(),
        peer.addr.port(),
        admin_toml("")
    );
    start(config(dir, &extra))
}

fn send(addr: SocketAddr, from: &str, to: &[&str], subject: &str) -> u64 {
    let mut c = Client::ready(addr, "client.test");
    let body = format!("Subject: {subject}\r\nFrom: <{from}>\r\n\r\nthe body text\r\n");
    let r = c.transaction(from, to, body.as_bytes());
    assert_eq!(r.code, 250, "{r:?}");
    r.queue_id().expect("queue id")
}

#[test]
fn pages_are_served_with_a_strict_policy_under_a_prefix_and_only_to_our_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &admin_toml("path_prefix = \"/mailroot\"\n")));
    let admin = admin_of(&running);
    let host = admin.to_string();

    for prefix in ["", "/mailroot"] {
        let (status, head, body) = get(admin, &host, &format!("{prefix}/console/"), None);
        assert_eq!(status, 200, "{prefix}/console/: {body}");
        assert!(head.contains("content-type: text/html"), "{head}");
        assert!(head.contains("content-security-policy: default-src 'none'; script-src 'self'"), "{head}");
        assert!(head.contains("frame-ancestors 'none'"), "{head}");
        assert!(head.contains("x-frame-options: deny"), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        assert!(body.contains("<script src=\"app.js\""), "relative links only: {body}");
        assert!(!body.contains("<script>"), "no inline script (the policy would block it)");
        let (status, head, body) = get(admin, &host, &format!("{prefix}/console/app.js"), None);
        assert_eq!(status, 200);
        assert!(head.contains("content-type: text/javascript"), "{head}");
        assert!(!body.contains("innerHTML"), "the script renders data as text only");
        let (status, head, _) = get(admin, &host, &format!("{prefix}/console/app.css"), None);
        assert_eq!(status, 200);
        assert!(head.contains("content-type: text/css"), "{head}");
        // The API under the prefix too, with the same token rule.
        let (status, _, _) = get(admin, &host, &format!("{prefix}/api/status"), Some(TOKEN));
        assert_eq!(status, 200);
        let (status, _, _) = get(admin, &host, &format!("{prefix}/api/status"), None);
        assert_eq!(status, 401);
    }
    let (status, head, _) = get(admin, &host, "/", None);
    assert_eq!(status, 302);
    assert!(head.contains("location: ./console/"), "{head}");
    let (status, head, _) = get(admin, &host, "/console", None);
    assert_eq!(status, 302);
    assert!(head.contains("location: console/"), "{head}");

    // A name DNS rebinding could point at us: no page, no script, no API (even with the token).
    for path in ["/", "/console/", "/console/app.js", "/mailroot/console/", "/api/status", "/mailroot/api/status"] {
        let (status, _, body) = get(admin, &format!("evil.example:{}", admin.port()), path, Some(TOKEN));
        assert_eq!(status, 403, "{path}: {body}");
    }
    // A name the operator listed is served.
    drop(running);
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &admin_toml("hosts = [\"mail.example.org\"]\n")));
    let (status, _, _) = get(admin_of(&running), "mail.example.org", "/console/", None);
    assert_eq!(status, 200);
}

/// What another site's page can make a browser send — an HTML form (urlencoded, multipart or
/// text/plain: no preflight) or a script's request carrying its Origin — changes nothing, with or
/// without a token.
#[test]
fn cross_site_requests_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &admin_toml("")));
    let admin = admin_of(&running);
    let smtp = running.smtp_addrs[0];
    send(smtp, "a@example.test", &["postmaster@example.test"], "kept");
    let paths = [
        "/api/server/pause",
        "/api/server/stop",
        "/api/server/reload",
        "/api/queue/bulk",
        "/api/queue/retry-all",
        "/api/queue/1/hold",
        "/api/sessions/1/disconnect",
    ];
    let forms = [
        ("application/x-www-form-urlencoded", "action=delete&ids=1"),
        ("multipart/form-data; boundary=x", "--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--x--\r\n"),
        ("text/plain", "{\"action\":\"delete\",\"ids\":[1]}"),
    ];
    for path in paths {
        for (ctype, body) in forms {
            for auth in ["", &format!("Authorization: Bearer {TOKEN}\r\n")] {
                // As a browser sends a form from another site: with its Origin.
                let headers = format!("Origin: http://evil.example\r\nContent-Type: {ctype}\r\n{auth}");
                let (status, _, text) = post(admin, path, &headers, body);
                assert_eq!(status, 403, "{path} {ctype} {auth:?}: {text}");
                // Without an Origin (older browsers, some redirects): still not JSON.
                let headers = format!("Content-Type: {ctype}\r\n{auth}");
                let (status, _, text) = post(admin, path, &headers, body);
                assert_eq!(status, 415, "{path} {ctype} {auth:?}: {text}");
            }
        }
        // A script on another site that learnt the token and sends JSON: its Origin gives it away.
        let headers = format!(
            "Origin: http://evil.example\r\nContent-Type: application/json\r\nAuthorization: Bearer {TOKEN}\r\n"
        );
        let (status, _, text) = post(admin, path, &headers, "{}");
        assert_eq!(status, 403, "{path}: {text}");
    }
    let status = api_get(admin, "/api/status");
    assert_eq!(status["state"], "running", "nothing paused or stopped");
    // The test's message was delivered: neither deleted nor held by a forged request.
    wait_for("the message delivered to Drop", Duration::from_secs(20), || {
        (drop_files(dir.path()).len() == 1).then_some(())
    });
}

#[test]
fn sessions_are_listed_and_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &admin_toml("")));
    let admin = admin_of(&running);
    let smtp = running.smtp_addrs[0];

    let mut a = Client::ready(smtp, "client-a.test");
    assert_eq!(a.cmd("MAIL FROM:<a@example.test>").code, 250);
    assert_eq!(a.cmd("RCPT TO:<postmaster@example.test>").code, 250);
    let a_addr = a.writer.local_addr().unwrap();
    let mut b = Client::ready(smtp, "client-b.test");
    assert_eq!(b.cmd("MAIL FROM:<b@example.test>").code, 250);
    assert_eq!(b.cmd("RCPT TO:<postmaster@example.test>").code, 250);
    assert_eq!(b.cmd("DATA").code, 354);
    b.send(b"Subject: half a message\r\n\r\nnot finished");

    let list = wait_for("both sessions listed where they are", Duration::from_secs(10), || {
        let v = api_get(admin, "/api/sessions");
        let ok = v["total"] == 2 && v["sessions"][1]["state"] == "data";
        ok.then_some(v)
    });
    let sessions = list["sessions"].as_array().unwrap();
    let sa = &sessions[0];
    assert_eq!(sa["client"], a_addr.to_string());
    assert_eq!(sa["listener"], "mx");
    assert_eq!(sa["state"], "rcpt");
    assert_eq!(sa["helo"], "client-a.test");
    assert_eq!(sa["tls"], false);
    assert!(sa["user"].is_null());
    let (a_id, b_id) = (sa["id"].as_u64().unwrap(), sessions[1]["id"].as_u64().unwrap());

    // In the middle of a message: 421 and closed; the half message is not queued.
    let (status, v) = api_post(admin, &format!("/api/sessions/{b_id}/disconnect"), "{}");
    assert_eq!((status, v["id"].as_u64()), (200, Some(b_id)));
    let r = b.read_reply().expect("a reply before the close");
    assert_eq!((r.code, r.text.starts_with("4.7.0")), (421, true), "{r:?}");
    assert!(b.read_reply().is_none(), "closed");
    // Between commands too.
    let (status, _) = api_post(admin, &format!("/api/sessions/{a_id}/disconnect"), "{}");
    assert_eq!(status, 200);
    let r = a.read_reply().expect("a reply before the close");
    assert_eq!(r.code, 421, "{r:?}");
    assert!(a.read_reply().is_none(), "closed");

    wait_for("the list empty again", Duration::from_secs(10), || {
        (api_get(admin, "/api/sessions")["total"] == 0).then_some(())
    });
    let (status, _) = api_post(admin, &format!("/api/sessions/{a_id}/disconnect"), "{}");
    assert_eq!(status, 404, "a session that ended");
    assert_eq!(api_get(admin, "/api/status")["queue"]["total"], 0, "nothing was queued");
    assert!(drop_files(dir.path()).is_empty());
    assert_eq!(metric(&running, "mailroot_refusals_total{cause=\"disconnected\"}"), 2.0);
}

/// A client that sends and never reads: once the socket buffers are full the session is stuck
/// writing its replies. A disconnect still ends it at once, not at the idle timeout.
#[test]
fn a_session_stuck_writing_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    // The idle timeout (300 s by default) is far beyond the test's patience: only the disconnect
    // can end the session in time.
    let running = start(config(dir.path(), &admin_toml("")));
    let admin = admin_of(&running);
    let smtp = running.smtp_addrs[0];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let stream = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(smtp).await.unwrap().into_std().unwrap()
    });
    stream.set_nonblocking(false).unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (mut w, sent) = (stream.try_clone().unwrap(), sent.clone());
        std::thread::spawn(move || {
            let batch = "NOOP\r\n".repeat(1000);
            while w.write_all(batch.as_bytes()).is_ok() {
                sent.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    // Stuck: what the client has sent stops growing (the server no longer reads).
    wait_for("the session stuck writing", Duration::from_secs(60), || {
        let before = sent.load(std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(500));
        (before > 0 && sent.load(std::sync::atomic::Ordering::Relaxed) == before).then_some(())
    });
    let v = api_get(admin, "/api/sessions");
    assert_eq!(v["total"], 1, "{v}");
    let id = v["sessions"][0]["id"].as_u64().unwrap();
    let (status, _) = api_post(admin, &format!("/api/sessions/{id}/disconnect"), "{}");
    assert_eq!(status, 200);
    wait_for("the stuck session ended", Duration::from_secs(15), || {
        (api_get(admin, "/api/sessions")["total"] == 0).then_some(())
    });
    drop(stream);
    let _ = writer.join();
}

// The queue's side on each store (tests/common/pg.rs): filters, headers read without the body.
both_stores!(filters_bulk_actions_headers_and_actors);

fn filters_bulk_actions_headers_and_actors() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::start("127.42.0.1", 0, Behavior::default());
    let running = deferring_daemon(dir.path(), &peer);
    let admin = admin_of(&running);
    let smtp = running.smtp_addrs[0];
    let a = send(smtp, "alice@example.test", &["t4a@far.test"], "console a");
    let b = send(smtp, "bob@example.test", &["t4b@far.test"], "console b");
    let c = send(smtp, "alice@example.test", &["t4c@other.test"], "console c");
    wait_metric(&running, "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}", |v| v >= 3.0);

    let ids = |query: &str| -> Vec<u64> {
        let v = api_get(admin, &format!("/api/queue{query}"));
        v["messages"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect()
    };
    let cases: [(&str, Vec<u64>); 8] = [
        ("", vec![a, b, c]),
        ("?sender=ALICE", vec![a, c]),
        ("?sender=bob%40example.test", vec![b]),
        ("?sender=%3C%3E", vec![]),
        ("?recipient=t4b", vec![b]),
        ("?recipient=far.test&sender=alice", vec![a]),
        ("?domain=other.test", vec![c]),
        ("?state=deferred&recipient=t4", vec![a, b, c]),
    ];
    for (query, want) in cases {
        assert_eq!(ids(query), want, "{query}");
    }

    // The header section only, our trace header first.
    let h = api_get(admin, &format!("/api/queue/{a}/headers"));
    let text = h["headers"].as_str().unwrap();
    assert!(text.starts_with("Received: "), "{text}");
    assert!(text.contains("Subject: console a\r\n"), "{text}");
    assert!(!text.contains("the body text"), "{text}");
    let (status, _, _) = get(admin, &admin.to_string(), "/api/queue/999999/headers", Some(TOKEN));
    assert_eq!(status, 404);

    // Bulk: each message as the single-message action would do it; the missing one reported.
    let (status, v) =
        api_post(admin, "/api/queue/bulk", &format!("{{\"action\":\"hold\",\"ids\":[{a},{c},999999,{a}]}}"));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["done"], 2);
    assert_eq!(v["failed"][0]["id"], 999999);
    assert!(v["failed"][0]["error"].as_str().unwrap().contains("no such message"), "{v}");
    assert_eq!(ids("?state=held"), vec![a, c]);
    let (_, v) = api_post(admin, "/api/queue/bulk", &format!("{{\"action\":\"release\",\"ids\":[{a},{c}]}}"));
    assert_eq!(v["done"], 2);
    assert_eq!(ids("?state=held"), Vec::<u64>::new());
    let (_, v) = api_post(admin, "/api/queue/bulk", &format!("{{\"action\":\"delete\",\"ids\":[{c}]}}"));
    assert_eq!(v["done"], 1);
    assert_eq!(ids(""), vec![a, b]);
    let too_many: Vec<String> = (1..=1001).map(|i| i.to_string()).collect();
    for (body, why) in [
        (format!("{{\"action\":\"hold\",\"ids\":[{}]}}", too_many.join(",")), "at most 1000"),
        (format!("{{\"action\":\"explode\",\"ids\":[{a}]}}"), "unknown action"),
        ("{\"action\":\"hold\"}".to_string(), "expected"),
        ("not json".to_string(), "expected"),
    ] {
        let (status, v) = api_post(admin, "/api/queue/bulk", &body);
        assert_eq!(status, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{v}");
    }
    let (status, _, _) = post(
        admin,
        "/api/queue/bulk",
        &format!("Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"),
        &" ".repeat(70 * 1024),
    );
    assert_eq!(status, 413, "a body over 64 KiB is not read");
    let (status, _, _) = post(admin, "/api/queue/bulk", "Content-Type: application/json\r\n", &" ".repeat(70 * 1024));
    assert_eq!(status, 401, "without the token nothing is read: the guard answers first");
    assert_eq!(ids(""), vec![a, b], "nothing else changed");

    // Many at once (acted on in batches that share their commits): every one, once.
    let mut c = Client::ready(smtp, "client.test");
    let many: Vec<u64> = (0..150)
        .map(|i| {
            let body = format!("Subject: many {i}\r\n\r\nx\r\n");
            let r = c.transaction("carol@example.test", &[&format!("t4m{i}@far.test")], body.as_bytes());
            r.queue_id().expect("queued")
        })
        .collect();
    wait_metric(&running, "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}", |v| v >= 153.0);
    let list: Vec<String> = many.iter().map(u64::to_string).collect();
    let (_, v) = api_post(admin, "/api/queue/bulk", &format!("{{\"action\":\"hold\",\"ids\":[{}]}}", list.join(",")));
    assert_eq!((v["done"].as_u64(), v["failed"].as_array().map(Vec::len)), (Some(150), Some(0)), "{v}");
    let held = api_get(admin, "/api/queue?state=held&limit=1000");
    assert_eq!(held["messages"].as_array().unwrap().len(), 150);
    let (_, v) = api_post(admin, "/api/queue/bulk", &format!("{{\"action\":\"delete\",\"ids\":[{}]}}", list.join(",")));
    assert_eq!(v["done"], 150, "{v}");
    assert_eq!(ids(""), vec![a, b], "only the 150 went");

    // Every actor kind that worked shows what it handled.
    let v = api_get(admin, "/api/actors");
    let actors = v["actors"].as_array().unwrap();
    let row = |name: &str| actors.iter().find(|r| r["actor"] == name).unwrap_or_else(|| panic!("{name} in {v}"));
    for name in ["listener", "session", "queue"] {
        let r = row(name);
        assert!(r["handled"].as_u64().unwrap() > 0, "{r}");
        assert!(r["live"].as_i64().unwrap() >= 1 || name == "session", "{r}");
        assert!(r["mean_seconds"].as_f64().is_some(), "{r}");
        assert_eq!(r["restarts"], 0);
    }
    assert!(row("session")["handled"].as_u64().unwrap() >= 3 * 5, "at least five commands per client");
}

#[path = "common/browser.rs"]
mod browser;

/// Another site's page: it submits an HTML form to the admin API as soon as it loads.
fn foreign_site(form: String) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.2:0").expect("a foreign site on 127.0.0.2");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let page =
                format!("<!doctype html><html><body>{form}<script>document.forms[0].submit()</script></body></html>");
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    addr
}

/// A reverse proxy that serves the admin API under `/mailroot/` and strips that path (as nginx's
/// `proxy_pass http://127.0.0.1:8025/;` does), passing the Host on; anything else gets 404.
/// One request per connection (`Connection: close`); returns its address and how many requests
/// it forwarded.
fn stripping_proxy(admin: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.3:0").expect("a proxy on 127.0.0.3");
    let addr = listener.local_addr().unwrap();
    let forwarded = Arc::new(AtomicUsize::new(0));
    let count = forwarded.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let count = count.clone();
            std::thread::spawn(move || {
                let _ = proxy_one(client, admin, &count);
            });
        }
    });
    (addr, forwarded)
}

fn proxy_one(mut client: TcpStream, admin: SocketAddr, count: &AtomicUsize) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        if client.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.splitn(3, ' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let Some(rest) = path.strip_prefix("/mailroot/") else {
        return client.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    };
    let mut length = 0;
    let mut headers = String::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("connection:") || lower.starts_with("keep-alive:") {
            continue;
        }
        headers.push_str(line);
        headers.push_str("\r\n");
    }
    let mut body = vec![0u8; length];
    client.read_exact(&mut body)?;
    let mut upstream = TcpStream::connect(admin)?;
    upstream.write_all(format!("{method} /{rest} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n").as_bytes())?;
    upstream.write_all(&body)?;
    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer)?;
    client.write_all(&answer)
}

/// The console as an operator uses it, in Debian's headless Chromium: sign in (a wrong token
/// first), see a message sent over SMTP appear in the queue, open it, hold and release it, a
/// cancelled delete, the open sessions and a disconnect, the actors, pause (a new SMTP client
/// gets 421) and resume, reloads, a phone-width overview, the console behind a reverse proxy
/// under a path; then another site's forms and a DNS-rebinding name, refused. A screenshot of each page goes to target/console-screenshots/.
#[test]
fn console_in_a_real_browser() {
    if !browser::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::start("127.43.0.1", 0, Behavior::default());
    // From a file, so that the console's reload has something to read again.
    let path = dir.path().join("mailroot.toml");
    let write = |max_connections: &str| {
        let text = format!(
            "[server]\nhostname = \"{HOST}\"\nlisten = [\"127.0.0.1:0\"]\nmax_connections = {max_connections}\n\
             shutdown_grace = \"1s\"\n[mailroot]\npath = \"spool\"\n[domains]\nlocal = [\"example.test\"]\n\
             [delivery]\nsmart_host_tls = \"opportunistic\"\nsmart_host = \"[{}]:{}\"\n\
             [queue]\nretry_intervals = [\"1h\"]\n{}",
            peer.addr.ip(),
            peer.addr.port(),
            admin_toml("")
        );
        std::fs::write(&path, text).unwrap();
    };
    write("100");
    let loaded = mailroot::config::Config::load(Some(&path)).unwrap();
    let options = mailroot::daemon::StartOptions { handle_signals: false, config_path: Some(path.clone()) };
    let running = mailroot::daemon::start(loaded.config, options).unwrap();
    let admin = admin_of(&running);
    let smtp = running.smtp_addrs[0];
    let console = format!("http://{admin}/console/");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let b = browser::Browser::start().await;

        // Sign in: a wrong token is refused and said so (typed with the keyboard alone: the
        // field has the focus, Enter submits); the right one opens the overview.
        b.goto(&console).await;
        let focused = b.client.active_element().await.expect("focus").attr("id").await.expect("id");
        assert_eq!(focused.as_deref(), Some("token"), "the token field has the focus");
        b.type_into("#token", "not-the-token\u{E007}").await;
        b.wait_text("#signin-error", "the refusal", |t| t.contains("not accepted")).await;
        b.screenshot("signin").await;
        b.type_into("#token", TOKEN).await;
        b.click("#signin").await;
        b.wait_text("#ov-state", "the overview", |t| t == "running").await;
        b.wait_text("#ov-store", "store health", |t| t == "healthy").await;
        b.wait_text("#listeners tbody", "the listener", |t| t.contains(&smtp.to_string())).await;

        // A message sent over SMTP appears in the queue (deferred by the peer).
        let id = send(smtp, "alice@example.test", &["t4a@far.test"], "seen in the console");
        wait_metric(&running, "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}", |v| v >= 1.0);
        b.goto(&format!("{console}#overview")).await;
        b.wait_text("#charts", "the charts count it", |t| t.contains("Received 1 in the hour")).await;
        b.screenshot("overview").await;
        b.click("#nav-queue").await;
        let row = format!("#queue-table tr[data-id=\"{id}\"]");
        b.wait_text(&row, "the message in the queue", |t| t.contains("alice@example.test") && t.contains("deferred"))
            .await;
        b.screenshot("queue").await;

        // Its detail; hold, then release.
        b.click(&format!("{row} a")).await;
        b.wait_text("#m-headers", "the headers", |t| t.contains("Subject: seen in the console")).await;
        b.wait_text("#m-recipients", "the last reply", |t| t.contains("451 4.2.1")).await;
        b.click("#m-hold").await;
        b.wait_text("#m-fields", "held", |t| t.contains("Stateheld")).await;
        let v = api_get(admin, &format!("/api/queue/{id}"));
        assert_eq!(v["state"], "held", "the console's hold reached the queue");
        b.screenshot("message").await;
        b.click("#m-release").await;
        b.wait_text("#m-fields", "released", |t| t.contains("Statedeferred") || t.contains("Stateready")).await;
        assert_ne!(api_get(admin, &format!("/api/queue/{id}"))["state"], "held");

        // Delete asks first; cancelled, nothing happens.
        b.click("#nav-queue").await;
        b.click(&format!("{row} input.q-select")).await;
        b.wait_text("#q-selected", "one selected", |t| t == "1 selected").await;
        b.click("[data-bulk=delete]").await;
        b.wait_text("#confirm-text", "the confirmation", |t| t.contains("deleted without a notice")).await;
        b.screenshot("confirm-delete").await;
        b.click("#confirm-no").await;
        assert_eq!(api_get(admin, "/api/status")["queue"]["total"], 1, "a cancelled delete deletes nothing");

        // A second message, bounced from its page once confirmed: back on the queue, the result
        // still said, the message gone (its sender's NDR is local mail, delivered to Drop).
        let other = send(smtp, "alice@example.test", &["t4z@far.test"], "to be bounced");
        wait_metric(&running, "mailroot_deliveries_total{route=\"smtp\",result=\"temporary\"}", |v| v >= 2.0);
        b.goto(&format!("{console}#message/{other}")).await;
        b.wait_text("#m-headers", "its headers", |t| t.contains("Subject: to be bounced")).await;
        b.click("[data-one=bounce]").await;
        b.wait_text("#confirm-text", "the confirmation", |t| t.contains("returned to its sender")).await;
        b.click("#confirm-yes").await;
        b.wait_text("#flash", "the result kept on the queue page", |t| {
            t.contains(&format!("bounce: done for message {other}"))
        })
        .await;
        let (status, _, _) = get(admin, &admin.to_string(), &format!("/api/queue/{other}"), Some(TOKEN));
        assert_eq!(status, 404, "bounced and gone");
        wait_for("the NDR in Drop", Duration::from_secs(20), || {
            (!drop_files(dir.path().join("spool").as_path()).is_empty()).then_some(())
        });

        // Sessions: an idle client is listed; disconnected from the console, it gets 421.
        let mut idle = Client::ready(smtp, "idle-client.test");
        b.click("#nav-sessions").await;
        b.wait_text("#sessions-table tbody", "the open session", |t| t.contains("idle-client.test")).await;
        b.screenshot("sessions").await;
        b.click("#sessions-table tbody button").await;
        b.click("#confirm-yes").await;
        let r = idle.read_reply().expect("421 before the close");
        assert_eq!(r.code, 421, "{r:?}");
        b.wait_text("#sessions-table tbody", "the list empty", |t| t.contains("no open SMTP session")).await;

        // Actors.
        b.click("#nav-actors").await;
        b.wait_text("#actors-table tbody", "the actors", |t| t.contains("queue") && t.contains("session")).await;
        b.screenshot("actors").await;

        // Pause: a new SMTP client gets 421; resume: 220 again. Reload: nothing changed.
        b.click("#nav-controls").await;
        b.click("#c-pause").await;
        b.wait_text("#c-state", "paused", |t| t == "paused").await;
        let mut c = Client::connect(smtp);
        assert_eq!(c.greeting().code, 421, "paused: new clients are turned away");
        b.click("#c-reload").await;
        b.wait_text("#c-reload-result", "the reload's result", |t| t.contains("Nothing changed")).await;
        write("200");
        b.click("#c-reload").await;
        b.wait_text("#c-reload-result", "what the reload changed", |t| t.contains("Applied: server")).await;
        write("\"many\"");
        b.click("#c-reload").await;
        b.wait_text("#c-reload-result", "the refused reload", |t| t.contains("refused, nothing applied")).await;
        b.screenshot("controls").await;
        b.click("#c-resume").await;
        b.wait_text("#c-state", "running", |t| t == "running").await;
        let mut c = Client::connect(smtp);
        assert_eq!(c.greeting().code, 220);

        // A phone's width: everything within the screen, the menu shown.
        b.client.set_window_size(390, 844).await.expect("resized");
        b.click("#nav-overview").await;
        b.wait_text("#ov-state", "the overview", |t| t == "running").await;
        let fits = b
            .client
            .execute("return document.documentElement.scrollWidth <= window.innerWidth;", vec![])
            .await
            .unwrap();
        assert_eq!(fits, Value::Bool(true), "no sideways scrolling at 390 px");
        b.screenshot("overview-phone").await;
        b.client.set_window_size(1280, 900).await.expect("resized");

        // Another site's forms, submitted by the browser: refused, nothing paused or stopped.
        for (action, enctype, input) in [
            ("/api/server/pause", "text/plain", r#"<input name='{"a":"' value='"}'>"#),
            ("/api/server/stop", "application/x-www-form-urlencoded", "<input name=x value=1>"),
        ] {
            let form =
                format!(r#"<form method="POST" enctype="{enctype}" action="http://{admin}{action}">{input}</form>"#);
            let site = foreign_site(form);
            b.goto(&format!("http://{site}/")).await;
            b.wait_text("body", "the API's refusal", |t| t.contains("cross-origin requests are not served")).await;
        }
        // Behind a reverse proxy that serves it under /mailroot/ and strips the path: the
        // console's relative links and requests go through the proxy (another origin, so the
        // token is asked for again), and its actions work there too.
        let (proxy, forwarded) = stripping_proxy(admin);
        b.goto(&format!("http://{proxy}/mailroot/console/")).await;
        b.type_into("#token", TOKEN).await;
        b.click("#signin").await;
        b.wait_text("#ov-state", "the overview through the proxy", |t| t == "running").await;
        b.click("#nav-controls").await;
        b.click("#c-pause").await;
        b.wait_text("#c-state", "paused through the proxy", |t| t == "paused").await;
        b.click("#c-resume").await;
        b.wait_text("#c-state", "running through the proxy", |t| t == "running").await;
        let through = forwarded.load(std::sync::atomic::Ordering::Relaxed);
        assert!(through >= 8, "pages, script, style and API calls all went through the proxy: {through}");
        // A DNS-rebinding name for our address: the console is not served to it.
        b.goto(&format!("http://evil.test:{}/console/", admin.port())).await;
        b.wait_text("body", "the foreign Host refused", |t| t.contains("this Host is not served")).await;
        assert_eq!(api_get(admin, "/api/status")["state"], "running");
        assert_eq!(api_get(admin, "/api/status")["queue"]["total"], 1);
        let _ = b.client.clone().close().await;
    });
    eprintln!("screenshots in {}", browser::screenshot_dir().display());
}
