//! The Listener actor: accepts TCP connections, applies the access lists and the connection
//! limits (in total, per client address, per client address per minute), and starts one Session
//! actor (plus its I/O task) per connection, spread over the session arbiters.
//!
//! Invariants:
//! - The connection-limit permit and the per-address count move into the connection's task and
//!   are released only when the socket is closed, so the limits count real open sockets.
//! - A refused connection gets one reply written without blocking and is closed; no task is
//!   spawned for it, whatever the flood.
//! - Per-address state is bounded: IPv6 clients are counted per /64, and entries with no open
//!   connection and no recent connection are dropped every minute.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::metrics::{ActorMeter, ListenerLabel, Metrics};
use crate::peer::client_key;
use crate::protocol::{self, reply, RefusalCause, SessionParams};
use crate::session::{serve, Session, SessionShared, Timing, Tls};

#[derive(Clone)]
pub struct ListenerSettings {
    /// The listener's name in the configuration (`mx` for `[server] listen`): in metrics, logs
    /// and the protocol log's `s-sitename`.
    pub name: &'static str,
    /// TLS from the first byte (`submissions`, RFC 8314): the handshake comes before the greeting.
    pub implicit_tls: bool,
    pub params: Arc<SessionParams>,
    pub relay_networks: Arc<Vec<IpNet>>,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// The idle timeout under stress (open connections at 3/4 of `max_connections` or more).
    pub stress_idle_timeout: Duration,
    /// Bytes per second a client mid-command or mid-message must keep up (0 = no minimum), on
    /// average over each `min_transfer_window`.
    pub min_transfer_rate: u64,
    pub min_transfer_window: Duration,
    pub access: AccessLists,
    /// Connections open at once from one address (IPv6: one /64); 0 = no limit.
    pub max_connections_per_ip: usize,
    /// New connections from one address (IPv6: one /64) in any 60 seconds; 0 = no limit.
    pub max_connections_per_ip_per_minute: usize,
    /// Offered as STARTTLS when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Look up each client's name (PTR, confirmed forward) for the `Received:` header.
    pub reverse_dns: Option<Arc<crate::resolve::Dns>>,
    /// Check who mail is from (SPF, DKIM, ARC, DMARC) on this listener; `None` = not.
    pub checker: Option<Arc<crate::checks::Checker>>,
}

/// How long the reverse lookup of a client may delay its greeting.
const REVERSE_DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// The IIS connection-control lists: with `allow` non-empty only those networks may connect;
/// `deny` refuses networks whatever `allow` says.
#[derive(Debug, Clone, Default)]
pub struct AccessLists {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl AccessLists {
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip)))
            && !self.deny.iter().any(|n| n.contains(&ip))
    }
}

#[derive(Default)]
struct PerClient {
    open: usize,
    /// Times of the connections accepted in the last minute (at most the per-minute limit).
    recent: VecDeque<Instant>,
}

type Clients = Arc<Mutex<HashMap<IpAddr, PerClient>>>;

fn lock(clients: &Clients) -> std::sync::MutexGuard<'_, HashMap<IpAddr, PerClient>> {
    clients.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Listener {
    sockets: Vec<TcpListener>,
    settings: ListenerSettings,
    shared: SessionShared,
    permits: Arc<Semaphore>,
    clients: Clients,
    /// Session actors run on these, round robin; empty = the listener's own arbiter.
    arbiters: Vec<actix_rt::ArbiterHandle>,
    next: usize,
    /// Paused (IIS semantics): new connections get 421 4.3.2; open sessions go on.
    paused: Arc<AtomicBool>,
    meter: ActorMeter,
}

/// A connection accepted by one of the accept loops.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
}

/// Stop accepting connections (open sessions go on).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopListening;

/// New settings from a configuration reload: they apply to connections accepted from now on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconfigure {
    pub settings: ListenerSettings,
    pub users: Option<Arc<crate::auth::Users>>,
    pub error_delay: Duration,
    /// `[auth] max_failures` and `failure_window` (counts so far are kept).
    pub auth_limits: (u32, Duration),
    /// The SRS secret for forwards (recipient maps may have been added or removed).
    pub srs: Option<Arc<crate::srs::Srs>>,
}

impl Listener {
    pub fn new(
        sockets: Vec<TcpListener>,
        settings: ListenerSettings,
        shared: SessionShared,
        arbiters: Vec<actix_rt::ArbiterHandle>,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(settings.max_connections));
        let meter = shared.metrics.actor("listener");
        let mut shared = shared;
        shared.listener = settings.name;
        shared.checker = settings.checker.clone();
        Listener {
            sockets,
            settings,
            shared,
            permits,
            clients: Clients::default(),
            arbiters,
            next: 0,
            paused: Arc::default(),
            meter,
        }
    }

    /// Shares the pause switch: set it to pause, clear it to resume (the admin API holds it).
    pub fn paused_by(mut self, flag: Arc<AtomicBool>) -> Self {
        self.paused = flag;
        self
    }

    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Writes one reply without blocking and drops the connection.
    fn refuse(&self, stream: TcpStream, peer: SocketAddr, cause: RefusalCause, r: reply::Reply) {
        self.metrics().refused(cause.as_str());
        info!(client = %peer, cause = cause.as_str(), "refused");
        // The socket's send buffer is empty, so a non-blocking write of one short line goes out
        // whole.
        let _ = stream.try_write(&r.to_bytes());
    }

    /// Counts a new connection from `ip` against the per-address limits; `Err` = refuse it.
    fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), RefusalCause> {
        let (per_ip, per_minute) =
            (self.settings.max_connections_per_ip, self.settings.max_connections_per_ip_per_minute);
        if per_ip == 0 && per_minute == 0 {
            return Ok(());
        }
        let mut clients = lock(&self.clients);
        let c = clients.entry(client_key(ip)).or_default();
        if per_ip > 0 && c.open >= per_ip {
            return Err(RefusalCause::TooManyConnectionsFromIp);
        }
        if per_minute > 0 {
            while c.recent.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60)) {
                c.recent.pop_front();
            }
            if c.recent.len() >= per_minute {
                return Err(RefusalCause::ConnectionRate);
            }
            c.recent.push_back(now);
        }
        c.open += 1;
        Ok(())
    }
}

/// Gives back a connection's place in the per-address count when it closes.
struct ClientSlot {
    clients: Option<Clients>,
    key: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Some(clients) = &self.clients {
            if let Some(c) = lock(clients).get_mut(&self.key) {
                c.open = c.open.saturating_sub(1);
            }
        }
    }
}

/// Changes a connection limit from `old` to `new` permits. Open connections keep theirs; only
/// the number handed out from now on changes. Call it on an actix runtime.
pub fn resize(permits: &Arc<Semaphore>, old: usize, new: usize) {
    if new > old {
        permits.add_permits(new - old);
    } else if new < old {
        let forgotten = permits.forget_permits(old - new);
        if forgotten < old - new {
            // The rest are held by open connections: take them as those close.
            let (permits, rest) = (permits.clone(), u32::try_from(old - new - forgotten).unwrap_or(u32::MAX));
            actix_rt::spawn(async move {
                if let Ok(p) = permits.acquire_many(rest).await {
                    p.forget();
                }
            });
        }
    }
}

pub fn relay_allowed(networks: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    networks.iter().any(|n| n.contains(&ip))
}

impl Actor for Listener {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.meter.stopped();
    }

    fn started(&mut self, ctx: &mut Self::Context) {
        self.meter.started();
        let clients = self.clients.clone();
        ctx.run_interval(Duration::from_secs(60), move |_, _| {
            let now = Instant::now();
            lock(&clients).retain(|_, c| {
                c.open > 0 || c.recent.back().is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60))
            });
        });
        for socket in std::mem::take(&mut self.sockets) {
            let me = ctx.address();
            if let Ok(addr) = socket.local_addr() {
                info!(%addr, listener = self.settings.name, implicit_tls = self.settings.implicit_tls, "listening");
            }
            ctx.spawn(
                async move {
                    loop {
                        match socket.accept().await {
                            Ok((stream, peer)) => {
                                if me.send(Accepted { stream, peer }).await.is_err() {
                                    break;
                                }
                            }
                            Err(e) => {
                                // EMFILE and friends: back off instead of spinning or giving up.
                                warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                }
                .into_actor(self),
            );
        }
    }
}

impl Handler<Accepted> for Listener {
    type Result = ();

    fn handle(&mut self, msg: Accepted, _ctx: &mut Self::Context) {
        let _handling = self.meter.handling();
        let Accepted { stream, peer } = msg;
        self.metrics().connections_total.inc();
        let label = ListenerLabel { listener: self.settings.name };
        self.metrics().listener_connections.get_or_create(&label).inc();
        let hostname = self.settings.params.hostname.clone();
        if self.paused.load(Ordering::Relaxed) {
            return self.refuse(stream, peer, RefusalCause::Paused, reply::paused(&hostname));
        }
        if !self.settings.access.permits(peer.ip()) {
            return self.refuse(stream, peer, RefusalCause::AccessDenied, reply::access_denied(&hostname));
        }
        // The listener's own limit, then all listeners' together.
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return self.refuse(stream, peer, RefusalCause::TooManyConnections, reply::too_many_connections(&hostname));
        };
        let Ok(global) = self.shared.connection_permits.clone().try_acquire_owned() else {
            return self.refuse(stream, peer, RefusalCause::TooManyConnections, reply::too_many_connections(&hostname));
        };
        if let Err(cause) = self.admit(peer.ip(), Instant::now()) {
            return self.refuse(stream, peer, cause, reply::too_many_connections_from_ip(&hostname));
        }
        let limited = self.settings.max_connections_per_ip > 0 || self.settings.max_connections_per_ip_per_minute > 0;
        let slot = ClientSlot { clients: limited.then(|| self.clients.clone()), key: client_key(peer.ip()) };
        let relay = relay_allowed(&self.settings.relay_networks, peer.ip());
        let mut proto = protocol::Session::new(self.settings.params.clone(), peer.ip(), relay);
        proto.set_logging(self.shared.protolog.is_some());
        let timing = Timing {
            idle: self.settings.idle_timeout,
            stress_idle: self.settings.stress_idle_timeout,
            stress_at: i64::try_from(self.settings.max_connections.saturating_mul(3) / 4).unwrap_or(i64::MAX),
            connections: self.shared.metrics.connections_current.clone(),
            min_rate: self.settings.min_transfer_rate,
            rate_window: self.settings.min_transfer_window,
        };
        let (shared, tls) = (self.shared.clone(), self.settings.tls.clone());
        let shared_hostname = hostname.clone();
        let tls = match (tls, self.settings.implicit_tls) {
            (Some(acceptor), true) => Tls::Implicit(acceptor),
            (Some(acceptor), false) => Tls::StartTls(acceptor),
            (None, _) => Tls::None,
        };
        let dns = self.settings.reverse_dns.clone();
        // DNS block lists, for clients outside the relay networks.
        let lists = self.settings.checker.clone().filter(|c| c.has_dns_lists() && !relay);
        let run = move |mut stream: TcpStream| async move {
            if let Some(dns) = dns {
                let name = tokio::time::timeout(REVERSE_DNS_TIMEOUT, dns.verified_name(peer.ip())).await.ok().flatten();
                proto.set_client_name(name);
            }
            if let Some(zone) = match &lists {
                Some(checker) => checker.blocked(peer.ip()).await,
                None => None,
            } {
                shared.metrics.refused(RefusalCause::DnsBlockList.as_str());
                info!(client = %peer, zone = %zone, cause = "dnsbl", "refused");
                let r = reply::blocked_by_dnsbl(&shared_hostname, peer.ip(), &zone);
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::io::AsyncWriteExt::write_all(&mut stream, &r.to_bytes()),
                )
                .await;
                drop(permit);
                drop(global);
                drop(slot);
                return;
            }
            let metrics = shared.metrics.clone();
            metrics.connections_current.inc();
            let current = metrics.listener_connections_current.get_or_create(&label).clone();
            current.inc();
            let stop = shared.stop.clone();
            let registration = shared.sessions.open(shared.listener, peer);
            let entry = registration.entry();
            let session = Session::new(proto, shared, peer).listed(entry.clone()).start();
            serve(stream, session, timing, tls, stop, Some(entry)).await;
            drop(registration);
            metrics.connections_current.dec();
            current.dec();
            drop(permit);
            drop(global);
            drop(slot);
        };
        if self.arbiters.is_empty() {
            actix_rt::spawn(run(stream));
            return;
        }
        // A tokio socket belongs to the runtime that registered it: move it as a std socket and
        // register it again on the session arbiter's runtime.
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => return warn!(client = %peer, error = %e, "cannot hand the connection over"),
        };
        let handle = &self.arbiters[self.next % self.arbiters.len()];
        self.next = self.next.wrapping_add(1);
        handle.spawn(async move {
            match TcpStream::from_std(std_stream) {
                Ok(stream) => run(stream).await,
                Err(e) => warn!(client = %peer, error = %e, "cannot register the connection"),
            }
        });
    }
}

impl Handler<Reconfigure> for Listener {
    type Result = ();

    fn handle(&mut self, msg: Reconfigure, _ctx: &mut Self::Context) {
        resize(&self.permits, self.settings.max_connections, msg.settings.max_connections);
        // The name and the sockets are fixed at start (a reload that changes them waits for a
        // restart), so the implicit-TLS switch is too.
        self.settings =
            ListenerSettings { name: self.settings.name, implicit_tls: self.settings.implicit_tls, ..msg.settings };
        self.shared.users = msg.users;
        self.shared.srs = msg.srs;
        self.shared.checker = self.settings.checker.clone();
        self.shared.error_delay = msg.error_delay;
        self.shared.auth_failures.set_limits(msg.auth_limits.0, msg.auth_limits.1);
    }
}

impl Handler<StopListening> for Listener {
    type Result = ();

    fn handle(&mut self, _msg: StopListening, ctx: &mut Self::Context) {
        info!(listener = self.settings.name, "no longer accepting connections");
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lists() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let open = AccessLists::default();
        let deny = AccessLists { allow: vec![], deny: vec![net("192.0.2.0/24")] };
        let only = AccessLists { allow: vec![net("10.0.0.0/8")], deny: vec![net("10.9.0.0/16")] };
        let cases = [
            (&open, "203.0.113.1", true),
            (&deny, "192.0.2.9", false),
            (&deny, "::ffff:192.0.2.9", false),
            (&deny, "192.0.3.9", true),
            (&only, "10.1.2.3", true),
            (&only, "10.9.2.3", false),
            (&only, "11.1.2.3", false),
        ];
        for (lists, ip, want) in cases {
            assert_eq!(lists.permits(ip.parse().unwrap()), want, "{ip} with {lists:?}");
        }
    }
}
