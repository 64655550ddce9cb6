//! The LMTP delivery actor (route `lmtp`, RFC 2033): hands messages to a mailbox server (Dovecot,
//! Cyrus) over TCP or a Unix socket, and reports the server's reply for each recipient.
//!
//! Invariants:
//! - After DATA an LMTP server answers once per accepted recipient; each recipient gets its own
//!   reply, classified by [`Outcome::from_reply`]. A connection that fails before those replies
//!   makes every recipient without one a temporary failure.
//! - Every read and write is bounded by a timeout and every reply by the bounded
//!   [`ReplyParser`]; nothing the server sends can panic or grow a buffer without limit.
//! - At most `max_connections` transactions run at once; a connection whose transaction ended
//!   cleanly is kept (at most `max_connections` of them, for `idle`, 10 s by default) and carries
//!   the next message. Kept connections are closed with QUIT once idle that long (checked every
//!   second) and when the actor stops (a reload or the daemon's stop): each holds a process on
//!   the server (a Dovecot `lmtp`).
//!   A kept connection the server closed meanwhile fails before MAIL is accepted, and only then
//!   is the message sent again on a new connection, so nothing is delivered twice by it.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::delivery::{replies, Deliver, DeliveryReport, Outcome, RecipientResult};
use crate::protocol::client::{dot_stuff, is_eight_bit, Capabilities, ReplyParser, ServerReply};
use crate::protocol::{Mailbox, RecipientVerdict};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LmtpSettings {
    /// `host:port`, or `unix:/path/to/socket`.
    pub address: String,
    /// Our name in LHLO.
    pub hostname: String,
    pub timeout: Duration,
    pub max_connections: usize,
    /// How long a connection is kept for the next message after a clean transaction.
    pub idle: Duration,
}

/// Connections kept for the next message, with when each became idle.
type IdlePool = Mutex<Vec<(Conn, Instant)>>;

pub struct Lmtp {
    settings: Arc<LmtpSettings>,
    transactions: Arc<Semaphore>,
    idle: Arc<IdlePool>,
}

/// The pools of a daemon's LMTP actors, so its stop can say QUIT on every kept connection
/// before the actors' threads end ([`KeptConnections::quit_all`]). Shared by the actors a
/// daemon starts, and by those that replace them at a reload.
#[derive(Clone, Default)]
pub struct KeptConnections(Arc<Mutex<Vec<std::sync::Weak<IdlePool>>>>);

impl KeptConnections {
    fn register(&self, pool: &Arc<IdlePool>) {
        let mut pools = self.0.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|w| w.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    /// Says QUIT on every kept connection and closes it; returns when done (each bounded by a
    /// few seconds).
    pub async fn quit_all(&self) {
        let pools: Vec<Arc<IdlePool>> =
            self.0.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(std::sync::Weak::upgrade).collect();
        let conns: Vec<Conn> = pools
            .iter()
            .flat_map(|p| std::mem::take(&mut *p.lock().unwrap_or_else(|e| e.into_inner())))
            .map(|(c, _)| c)
            .collect();
        quit(conns).await;
    }
}

/// QUIT on each connection, at most a few seconds each, then closed.
async fn quit(conns: Vec<Conn>) {
    for mut c in conns {
        // QUIT need not wait as long as a delivery may.
        c.timeout = c.timeout.min(Duration::from_secs(5));
        c.quit().await;
    }
}

/// The default of [`LmtpSettings::idle`].
pub const IDLE: Duration = Duration::from_secs(10);

impl Lmtp {
    pub fn new(settings: LmtpSettings) -> Self {
        let n = settings.max_connections.max(1);
        Lmtp { settings: Arc::new(settings), transactions: Arc::new(Semaphore::new(n)), idle: Arc::default() }
    }

    /// Lets `kept` close this actor's kept connections (at the daemon's stop).
    pub fn kept_in(self, kept: &KeptConnections) -> Self {
        kept.register(&self.idle);
        self
    }
}

impl Actor for Lmtp {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(Duration::from_secs(1), |act, _ctx| {
            let expired = Lmtp::take_expired(&act.idle, act.settings.idle);
            Lmtp::quit_all(expired);
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Replaced at a reload: this actor's thread ends now, so the QUITs go on the system's.
        let all = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        let conns: Vec<Conn> = all.into_iter().map(|(c, _)| c).collect();
        if !conns.is_empty() {
            System::current().arbiter().spawn(quit(conns));
        }
    }
}

/// A TCP or Unix stream.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

struct Conn {
    stream: Box<dyn Stream>,
    parser: ReplyParser,
    timeout: Duration,
    peer: String,
    caps: Capabilities,
}

impl Conn {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Outcome> {
        let fut = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(replies::network_error("connection lost with", &self.peer, e)),
            Err(_) => Err(replies::timed_out("writing to", &self.peer)),
        }
    }

    async fn read(&mut self) -> Result<ServerReply, Outcome> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut buf = [0u8; 4096];
        loop {
            match self.parser.next_reply() {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => return Err(replies::protocol_error(&self.peer, e)),
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) => return Err(replies::peer_closed(&self.peer, "")),
                Ok(Ok(n)) => self.parser.feed(&buf[..n]),
                Ok(Err(e)) => return Err(replies::network_error("connection lost with", &self.peer, e)),
                Err(_) => return Err(replies::timed_out("waiting for", &self.peer)),
            }
        }
    }

    async fn command(&mut self, line: &str) -> Result<ServerReply, Outcome> {
        self.write(line.as_bytes()).await?;
        self.read().await
    }

    /// Connects, reads the greeting and says LHLO.
    async fn open(s: &LmtpSettings) -> Result<Conn, Outcome> {
        let server = format!("the LMTP server {}", s.address);
        let connect_failed = |e: io::Error| replies::cannot_connect(&server, e);
        let timed_out = || replies::connect_timed_out(&server);
        let stream: Box<dyn Stream> = if let Some(path) = s.address.strip_prefix("unix:") {
            let connect = tokio::net::UnixStream::connect(path);
            Box::new(tokio::time::timeout(s.timeout, connect).await.map_err(|_| timed_out())?.map_err(connect_failed)?)
        } else {
            let connect = tokio::net::TcpStream::connect(s.address.as_str());
            let tcp =
                tokio::time::timeout(s.timeout, connect).await.map_err(|_| timed_out())?.map_err(connect_failed)?;
            let _ = tcp.set_nodelay(true);
            Box::new(tcp)
        };
        let mut c = Conn {
            stream,
            parser: ReplyParser::new(),
            timeout: s.timeout,
            peer: s.address.clone(),
            caps: Capabilities::default(),
        };
        let greeting = c.read().await?;
        if greeting.code != 220 {
            return Err(outcome(&greeting));
        }
        let lhlo = c.command(&format!("LHLO {}\r\n", s.hostname)).await?;
        if lhlo.code != 250 {
            return Err(outcome(&lhlo));
        }
        c.caps = Capabilities::from_ehlo(&lhlo);
        Ok(c)
    }

    async fn quit(mut self) {
        let _ = self.command("QUIT\r\n").await;
    }
}

fn outcome(r: &ServerReply) -> Outcome {
    Outcome::from_reply(r.code, r.text().get(4..).unwrap_or(""))
}

/// How a transaction ended.
enum Ended {
    /// Every reply was read: the connection can carry another message.
    Clean(Vec<Outcome>),
    /// Per-recipient outcomes, but the connection is not usable any more.
    Broken(Vec<Outcome>),
    /// No recipient got an answer of its own. `before_mail`: nothing was accepted yet, so the
    /// message can go again on another connection (a reused one the server had closed).
    Failed { outcome: Outcome, before_mail: bool },
}

/// One LMTP transaction on an open connection, outcomes per recipient of `req`, in order.
async fn transact(c: &mut Conn, req: &Deliver) -> Ended {
    let failed = |outcome, before_mail| Ended::Failed { outcome, before_mail };
    let utf8 = !req.sender.is_ascii() || req.recipients.iter().any(|r| !r.address.is_ascii());
    if utf8 && !c.caps.smtputf8 {
        let o = replies::no_smtputf8(&c.peer);
        return Ended::Clean(vec![o; req.recipients.len()]);
    }
    let mut params = String::new();
    if is_eight_bit(&req.message) && c.caps.eight_bit_mime {
        params.push_str(" BODY=8BITMIME");
    }
    if utf8 {
        params.push_str(" SMTPUTF8");
    }
    let mail = match c.command(&format!("MAIL FROM:<{}>{params}\r\n", req.sender)).await {
        Ok(r) => r,
        Err(e) => return failed(e, true),
    };
    if mail.code != 250 {
        let o = outcome(&mail);
        return match c.command("RSET\r\n").await {
            Ok(r) if r.code == 250 => Ended::Clean(vec![o; req.recipients.len()]),
            _ => failed(o, false),
        };
    }
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(req.recipients.len());
    for r in &req.recipients {
        match c.command(&format!("RCPT TO:<{}>\r\n", r.address)).await {
            Ok(reply) => outcomes.push((!reply.is_positive()).then(|| outcome(&reply))),
            Err(e) => return failed(e, false),
        }
    }
    if outcomes.iter().all(Option::is_some) {
        let all: Vec<Outcome> = outcomes.into_iter().flatten().collect();
        return match c.command("RSET\r\n").await {
            Ok(r) if r.code == 250 => Ended::Clean(all),
            _ => Ended::Broken(all),
        };
    }
    let data = match c.command("DATA\r\n").await {
        Ok(r) => r,
        Err(e) => return failed(e, false),
    };
    if data.code != 354 {
        let o = outcome(&data);
        return Ended::Broken(outcomes.into_iter().map(|x| x.unwrap_or_else(|| o.clone())).collect());
    }
    if let Err(e) = c.write(&dot_stuff(&req.message)).await {
        return failed(e, false);
    }
    // One reply per accepted recipient, in RCPT order (RFC 2033 §4.2).
    let mut result = Vec::with_capacity(outcomes.len());
    let mut lost: Option<Outcome> = None;
    for x in outcomes {
        match x {
            Some(refused) => result.push(refused),
            None => {
                if lost.is_none() {
                    match c.read().await {
                        Ok(r) => {
                            result.push(outcome(&r));
                            continue;
                        }
                        Err(e) => lost = Some(e),
                    }
                }
                result.push(lost.clone().unwrap_or_else(replies::no_reply));
            }
        }
    }
    if lost.is_some() {
        Ended::Broken(result)
    } else {
        Ended::Clean(result)
    }
}

impl Lmtp {
    /// The most recently used kept connection that has not been idle too long.
    fn take_idle(idle: &IdlePool, max_idle: Duration) -> Option<Conn> {
        let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((c, since)) = idle.pop() {
            if since.elapsed() < max_idle {
                return Some(c);
            }
            // Too old to reuse: closed properly, off this request's path.
            Lmtp::quit_all(vec![c]);
        }
        None
    }

    /// Takes out the kept connections idle for `max_idle` or longer.
    fn take_expired(idle: &IdlePool, max_idle: Duration) -> Vec<Conn> {
        let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
        let (old, kept): (Vec<_>, Vec<_>) = idle.drain(..).partition(|(_, since)| since.elapsed() >= max_idle);
        *idle = kept;
        old.into_iter().map(|(c, _)| c).collect()
    }

    /// Says QUIT on each connection (bounded) and closes it, in the background.
    fn quit_all(conns: Vec<Conn>) {
        if !conns.is_empty() {
            actix_rt::spawn(quit(conns));
        }
    }
}

impl Handler<Deliver> for Lmtp {
    type Result = ResponseFuture<DeliveryReport>;

    fn handle(&mut self, req: Deliver, _ctx: &mut Self::Context) -> Self::Result {
        let settings = self.settings.clone();
        let (transactions, idle) = (self.transactions.clone(), self.idle.clone());
        Box::pin(async move {
            let _permit = match transactions.acquire_owned().await {
                Ok(p) => p,
                Err(e) => return DeliveryReport::all(req.indices(), replies::internal_error(e)),
            };
            // A reused connection the server has meanwhile closed fails before MAIL is accepted:
            // then, and only then, the message goes again on a new connection.
            let mut reused = Lmtp::take_idle(&idle, settings.idle);
            let ended = loop {
                let was_reused = reused.is_some();
                let mut conn = match reused.take() {
                    Some(c) => c,
                    None => match Conn::open(&settings).await {
                        Ok(c) => c,
                        Err(o) => break (Ended::Failed { outcome: o, before_mail: false }, None),
                    },
                };
                match transact(&mut conn, &req).await {
                    Ended::Failed { before_mail: true, .. } if was_reused => continue,
                    ended => break (ended, Some(conn)),
                }
            };
            let outcomes = match ended {
                (Ended::Clean(o), Some(conn)) => {
                    let surplus = {
                        let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
                        if idle.len() < settings.max_connections {
                            idle.push((conn, Instant::now()));
                            None
                        } else {
                            Some(conn)
                        }
                    };
                    if let Some(conn) = surplus {
                        conn.quit().await;
                    }
                    o
                }
                (Ended::Clean(o) | Ended::Broken(o), _) => o,
                (Ended::Failed { outcome, .. }, _) => vec![outcome; req.recipients.len()],
            };
            DeliveryReport {
                results: req
                    .recipients
                    .iter()
                    .zip(outcomes)
                    .map(|(r, o)| RecipientResult::new(r.index, o.from_mta(Some(settings.address.clone()))))
                    .collect(),
            }
        })
    }
}

/// Checks at RCPT time that a recipient of an LMTP-delivered domain exists, by asking the LMTP
/// server itself (`MAIL FROM:<>`, `RCPT TO:`, `RSET` on a kept connection), so an unknown user is
/// refused with `550 5.1.1` during the SMTP session instead of bounced later to a sender who may
/// be forged (backscatter).
///
/// Bounded: at most `PROBES` checks at once (others wait their turn within the timeout), each
/// command within `timeout`; answers are cached for `CACHE_FOR` (at most `CACHE_MAX` addresses),
/// so a flood of RCPTs for the same users costs the server nothing more. No answer in time, a
/// connection failure or a 4xx is `451 4.4.3`, never a 250.
pub struct RecipientVerifier {
    /// The LMTP server and the time a check may take; `None` until configured (or when checks
    /// are off). Replaced at a reload ([`RecipientVerifier::configure`]).
    config: std::sync::RwLock<Option<(Arc<LmtpSettings>, Duration)>>,
    probes: Semaphore,
    idle: Arc<IdlePool>,
    cache: Mutex<std::collections::HashMap<String, (RecipientVerdict, Instant)>>,
}

/// Checks running at once, at most (each holds a connection, and a process on the server).
const PROBES: usize = 4;
/// How long an answer is reused.
const CACHE_FOR: Duration = Duration::from_secs(60);
/// Addresses whose answer is kept, at most.
const CACHE_MAX: usize = 10_000;

impl RecipientVerifier {
    /// An unconfigured verifier whose kept connections `kept` closes at the daemon's stop.
    pub fn new(kept: &KeptConnections) -> Arc<Self> {
        let v = Arc::new(RecipientVerifier {
            config: std::sync::RwLock::new(None),
            probes: Semaphore::new(PROBES),
            idle: Arc::default(),
            cache: Mutex::default(),
        });
        kept.register(&v.idle);
        // Kept probe connections are closed with QUIT once idle, as the delivery ones are.
        let weak = Arc::downgrade(&v);
        actix_rt::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(v) = weak.upgrade() else { return };
                let idle = v.settings().map_or(IDLE, |(s, _)| s.idle);
                let expired = Lmtp::take_expired(&v.idle, idle);
                drop(v);
                quit(expired).await;
            }
        });
        v
    }

    /// The LMTP server to ask and how long a check may take (`timeout` bounds waiting for a
    /// turn, connecting and each reply), or `None`: checks off. At start and at each reload; a
    /// change forgets the cached answers and closes the kept connections.
    pub fn configure(&self, config: Option<(LmtpSettings, Duration)>) {
        let new = config.map(|(s, timeout)| (Arc::new(LmtpSettings { timeout, ..s }), timeout));
        {
            let mut cur = self.config.write().unwrap_or_else(|e| e.into_inner());
            if *cur == new {
                return;
            }
            *cur = new;
        }
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let old: Vec<Conn> = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        Lmtp::quit_all(old);
    }

    fn settings(&self) -> Option<(Arc<LmtpSettings>, Duration)> {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub async fn check(&self, rcpt: &Mailbox) -> RecipientVerdict {
        let Some((settings, timeout)) = self.settings() else {
            return RecipientVerdict::TryLater("recipient checks are not configured".into());
        };
        let key = rcpt.to_string().to_lowercase();
        if let Some(v) = self.cached(&key) {
            return v;
        }
        let verdict = match tokio::time::timeout(timeout, self.ask(&settings, rcpt)).await {
            Ok(v) => v,
            Err(_) => {
                RecipientVerdict::TryLater(format!("the LMTP server {} did not answer in time", settings.address))
            }
        };
        // Only answers the server gave are kept; a failure to ask is not an answer.
        if !matches!(verdict, RecipientVerdict::TryLater(_)) {
            let v = verdict.clone();
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= CACHE_MAX {
                cache.retain(|_, (_, at)| at.elapsed() < CACHE_FOR);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(key, (v, Instant::now()));
        }
        verdict
    }

    fn cached(&self, key: &str) -> Option<RecipientVerdict> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(key).filter(|(_, at)| at.elapsed() < CACHE_FOR).map(|(v, _)| v.clone())
    }

    async fn ask(&self, settings: &LmtpSettings, rcpt: &Mailbox) -> RecipientVerdict {
        let Ok(_turn) = self.probes.acquire().await else {
            return RecipientVerdict::TryLater("recipient checks are shut down".into());
        };
        let mut reused = Lmtp::take_idle(&self.idle, settings.idle);
        loop {
            let was_reused = reused.is_some();
            let mut conn = match reused.take() {
                Some(c) => c,
                None => match Conn::open(settings).await {
                    Ok(c) => c,
                    Err(o) => return RecipientVerdict::TryLater(o.to_string()),
                },
            };
            match probe(&mut conn, rcpt).await {
                // A kept connection the server closed meanwhile: once more on a new one.
                Err(_) if was_reused => continue,
                Err(o) => return RecipientVerdict::TryLater(o.to_string()),
                Ok(verdict) => {
                    let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                    if idle.len() < PROBES {
                        idle.push((conn, Instant::now()));
                    }
                    return verdict;
                }
            }
        }
    }
}

/// One check on an open connection; `Err` when the connection failed (the caller may retry on a
/// new one). The connection is left ready for the next check (after RSET).
async fn probe(c: &mut Conn, rcpt: &Mailbox) -> Result<RecipientVerdict, Outcome> {
    let utf8 = !rcpt.is_ascii();
    if utf8 && !c.caps.smtputf8 {
        return Ok(RecipientVerdict::TryLater(format!("{} does not support internationalized addresses", c.peer)));
    }
    let mail = c.command(if utf8 { "MAIL FROM:<> SMTPUTF8\r\n" } else { "MAIL FROM:<>\r\n" }).await?;
    if mail.code != 250 {
        let _ = c.command("RSET\r\n").await?;
        return Ok(RecipientVerdict::TryLater(format!("the LMTP server refused MAIL: {}", outcome(&mail))));
    }
    let reply = c.command(&format!("RCPT TO:<{rcpt}>\r\n")).await?;
    let rset = c.command("RSET\r\n").await?;
    if rset.code != 250 {
        return Err(replies::protocol_error(&c.peer, "RSET refused"));
    }
    let said = outcome(&reply).to_string();
    Ok(match reply.code {
        200..=299 => RecipientVerdict::Exists,
        500..=599 => RecipientVerdict::Unknown(said),
        _ => RecipientVerdict::TryLater(said),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncBufReadExt, BufReader};

    /// A small LMTP server: `RCPT` for a local part in `known` gets 250, others 550; counts RCPTs.
    async fn server(known: &'static [&'static str]) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let rcpts = Arc::new(AtomicUsize::new(0));
        let count = rcpts.clone();
        actix_rt::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let count = count.clone();
                actix_rt::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut lines = BufReader::new(r).lines();
                    let _ = w.write_all(b"220 lmtp ready\r\n").await;
                    while let Ok(Some(line)) = lines.next_line().await {
                        let upper = line.to_ascii_uppercase();
                        let reply = if upper.starts_with("LHLO") {
                            "250-lmtp\r\n250 PIPELINING\r\n".to_string()
                        } else if upper.starts_with("RCPT TO:<") {
                            count.fetch_add(1, Ordering::SeqCst);
                            let local = line[9..].split('@').next().unwrap_or_default().to_string();
                            match known.contains(&local.as_str()) {
                                true => "250 2.1.5 OK\r\n".to_string(),
                                false => format!("550 5.1.1 <{local}> User doesn't exist\r\n"),
                            }
                        } else if upper == "QUIT" {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            return;
                        } else {
                            "250 2.0.0 OK\r\n".to_string()
                        };
                        let _ = w.write_all(reply.as_bytes()).await;
                    }
                });
            }
        });
        (addr, rcpts)
    }

    fn settings(address: &str) -> (LmtpSettings, Duration) {
        let s = LmtpSettings {
            address: address.into(),
            hostname: "mx.test".into(),
            timeout: Duration::from_secs(5),
            max_connections: 2,
            idle: IDLE,
        };
        (s, Duration::from_secs(5))
    }

    /// Unconfigured, nothing is checked (451, never 250); configured, the server's answers
    /// count and are cached; pointed at another server (a reload), the cache is forgotten.
    #[actix_rt::test]
    async fn checks_follow_the_configuration() {
        let rcpt = |s: &str| crate::protocol::address::parse_mailbox(s).unwrap();
        let v = RecipientVerifier::new(&KeptConnections::default());
        assert!(matches!(v.check(&rcpt("alice@mbox.test")).await, RecipientVerdict::TryLater(_)));
        let (first, asked) = server(&["alice"]).await;
        v.configure(Some(settings(&first)));
        assert_eq!(v.check(&rcpt("alice@mbox.test")).await, RecipientVerdict::Exists);
        let unknown = v.check(&rcpt("ghost@mbox.test")).await;
        assert!(matches!(&unknown, RecipientVerdict::Unknown(t) if t.contains("User doesn't exist")), "{unknown:?}");
        assert_eq!(v.check(&rcpt("Alice@mbox.test")).await, RecipientVerdict::Exists);
        assert_eq!(asked.load(Ordering::SeqCst), 2, "the third answer came from the cache");
        // The same settings again change nothing; another server forgets what the first said.
        v.configure(Some(settings(&first)));
        assert_eq!(v.check(&rcpt("alice@mbox.test")).await, RecipientVerdict::Exists);
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        let (second, _) = server(&[]).await;
        v.configure(Some(settings(&second)));
        assert!(matches!(v.check(&rcpt("alice@mbox.test")).await, RecipientVerdict::Unknown(_)));
        v.configure(None);
        assert!(matches!(v.check(&rcpt("alice@mbox.test")).await, RecipientVerdict::TryLater(_)));
    }
}
