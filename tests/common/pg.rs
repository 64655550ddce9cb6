//! The machine's PostgreSQL for the tests: a schema of its own for each test (dropped when the
//! test ends), so tests run side by side on one database. The database is `MAILROOT_TEST_PG`
//! (`.ci/run` creates one per run and drops it after) or `postgres://root@127.0.0.1:5432/test`.
//! Without a reachable server the PostgreSQL variants say they are skipped, unless
//! `MAILROOT_INTEROP=1` (CI), which makes that a failure.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

use mailroot::config::Config;

pub fn url() -> String {
    std::env::var("MAILROOT_TEST_PG").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

/// Runs `sql` on the test database (a fresh connection each time: tests are not in a hurry).
pub fn execute(sql: &str) -> Result<(), String> {
    query(sql).map(|_| ())
}

/// The first column of each row of `sql`, as text.
pub fn query(sql: &str) -> Result<Vec<String>, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let rows = client.simple_query(sql).await.map_err(|e| e.to_string())?;
        Ok(rows
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
                _ => None,
            })
            .collect())
    })
}

thread_local! {
    /// The schema of the test running on this thread, if it runs on PostgreSQL.
    static SCHEMA: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A test's schema; dropped (with everything in it) when this goes.
pub struct Schema {
    pub name: String,
}

impl Schema {
    /// A new schema name for this test, made the thread's queue for every [`super::config`]
    /// from now on; `None` when PostgreSQL cannot be reached and CI does not require it.
    pub fn for_this_test() -> Option<Schema> {
        static N: AtomicUsize = AtomicUsize::new(0);
        if let Err(e) = execute("SELECT 1") {
            if std::env::var_os("MAILROOT_INTEROP").is_some() {
                panic!("PostgreSQL at {} is needed (MAILROOT_INTEROP is set): {e}", url());
            }
            eprintln!("skipped: no PostgreSQL at {} ({e}); set MAILROOT_TEST_PG", url());
            return None;
        }
        let name = format!("t{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        SCHEMA.with(|s| *s.borrow_mut() = Some(name.clone()));
        Some(Schema { name })
    }

    /// The settings a node named `node` uses for this schema.
    pub fn apply(&self, c: &mut Config, node: &str) {
        set(c, &self.name, node);
    }

    /// The same as TOML lines for a configuration file (`[queue]` section included).
    pub fn toml(&self, node: &str) -> String {
        toml(&self.name, node)
    }
}

impl Schema {
    /// Fails unless a daemon kept its queue here (the schema was created and a node checked in).
    pub fn assert_used(&self) {
        let nodes = query(&format!("SELECT count(*) FROM {}.nodes", self.name));
        assert!(
            nodes.as_ref().is_ok_and(|n| n.first().is_some_and(|c| c != "0")),
            "the test's daemon did not use schema {}: {nodes:?}",
            self.name
        );
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        SCHEMA.with(|s| *s.borrow_mut() = None);
        if let Err(e) = execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name)) {
            eprintln!("cannot drop test schema {}: {e}", self.name);
        }
    }
}

fn set(c: &mut Config, schema: &str, node: &str) {
    c.queue.store = "postgres".into();
    c.queue.postgres.url = url();
    c.queue.postgres.schema = schema.into();
    c.queue.postgres.node = node.into();
    // Short, so that the tests about dead nodes do not wait long.
    c.queue.postgres.lease = mailroot::config::HumanDuration(std::time::Duration::from_secs(10));
    c.queue.postgres.poll_every = mailroot::config::HumanDuration(std::time::Duration::from_secs(1));
}

fn toml(schema: &str, node: &str) -> String {
    format!(
        "[queue]\nstore = \"postgres\"\n[queue.postgres]\nurl = \"{}\"\nschema = \"{schema}\"\nnode = \"{node}\"\nlease = \"10s\"\npoll_every = \"1s\"\n",
        url()
    )
}

/// The thread's test's queue settings as configuration-file lines (empty on sled).
pub fn thread_toml(node: &str) -> String {
    SCHEMA.with(|s| s.borrow().as_ref().map(|name| toml(name, node)).unwrap_or_default())
}

/// Puts the thread's test on its PostgreSQL schema, if it has one (called by `config`).
pub fn apply_thread_schema(c: &mut Config) {
    SCHEMA.with(|s| {
        if let Some(name) = s.borrow().as_ref() {
            set(c, name, "node1");
        }
    });
}

/// Runs a test on both queue stores: `both_stores!(name);` beside a plain `fn name()` makes the
/// tests `name::sled` and `name::postgres`, the same body each time (the `postgres` one on a
/// schema of its own).
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            fn sled() {
                super::$name()
            }

            #[test]
            fn postgres() {
                if let Some(schema) = super::common::pg::Schema::for_this_test() {
                    super::$name();
                    schema.assert_used();
                }
            }
        }
    )+};
}

/// The test database's URL with its `host:port` replaced by `addr` (to go through a [`Proxy`]).
pub fn url_via(addr: std::net::SocketAddr) -> String {
    let u = url();
    let start = u.find('@').map_or("postgres://".len(), |i| i + 1);
    let end = u[start..].find('/').map_or(u.len(), |i| start + i);
    format!("{}{addr}{}", &u[..start], &u[end..])
}

/// The test database's `host:port`.
pub fn server_addr() -> std::net::SocketAddr {
    let u = url();
    let start = u.find('@').map_or("postgres://".len(), |i| i + 1);
    let end = u[start..].find('/').map_or(u.len(), |i| start + i);
    u[start..end].parse().expect("MAILROOT_TEST_PG names the server as ip:port")
}

/// A TCP proxy in front of the database that can be made to go away (every connection cut,
/// new ones closed at once) and come back: a database outage for one test, without stopping
/// the server the other tests use.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    pub fn start() -> Proxy {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let target = server_addr();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let down = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (d, o) = (down.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if d.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(target) else { continue };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { continue };
                if let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) {
                    o.lock().unwrap().extend([c3, s3]);
                }
                let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                pipe(client, server);
                pipe(s2, c2);
            }
        });
        Proxy { addr, down, open }
    }

    /// Down: every connection cut, new ones closed; up: connections go through again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for s in self.open.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// While the queue's database is away: new clients are refused at MAIL with 451 4.3.0 (once the
/// node has noticed), and a message that got past MAIL before is never acknowledged.
pub fn refused_while_down(smtp: std::net::SocketAddr) {
    let refused = super::wait_for("451 4.3.0 at MAIL", std::time::Duration::from_secs(60), || {
        let mut c = super::Client::ready(smtp, "client.test");
        let mail = c.cmd("MAIL FROM:<a@example.test>");
        if mail.code != 250 {
            return Some(mail);
        }
        assert_eq!(c.cmd("RCPT TO:<during@example.test>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(b"Subject: during\r\n\r\nx\r\n.\r\n");
        let end = c.read_reply().expect("a reply to the message");
        assert_eq!(end.code / 100, 4, "nothing is acknowledged while the database is away: {end:?}");
        None
    });
    assert_eq!((refused.code, refused.text.get(..5)), (451, Some("4.3.0")), "{refused:?}");
}

/// Once the database is back: mail is taken again (a message `Subject: after` gets its 250)
/// within the recovery interval, without a restart.
pub fn taken_again(smtp: std::net::SocketAddr) {
    let after = super::wait_for("mail taken again", std::time::Duration::from_secs(60), || {
        let mut c = super::Client::ready(smtp, "client.test");
        if c.cmd("MAIL FROM:<a@example.test>").code != 250 {
            return None;
        }
        assert_eq!(c.cmd("RSET").code, 250);
        Some(c.transaction("a@example.test", &["after@example.test"], b"Subject: after\r\n\r\nx\r\n"))
    });
    assert_eq!(after.code, 250, "{after:?}");
}
