//! The Listener actor: accepts TCP connections, enforces `max_connections`, and starts one
//! Session actor (plus its I/O task) per connection, spread over the session arbiters.
//!
//! Invariant: the connection-limit permit moves into the connection's task and is released only
//! when the socket is closed, so the limit counts real open sockets.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::protocol::{self, reply, SessionParams};
use crate::queue::Enqueue;
use crate::session::{serve, Session};

#[derive(Clone)]
pub struct ListenerSettings {
    pub params: Arc<SessionParams>,
    pub relay_networks: Arc<Vec<IpNet>>,
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

pub struct Listener {
    sockets: Vec<TcpListener>,
    settings: ListenerSettings,
    queue: Recipient<Enqueue>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    /// Session actors run on these, round robin; empty = the listener's own arbiter.
    arbiters: Vec<actix_rt::ArbiterHandle>,
    next: usize,
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

impl Listener {
    pub fn new(
        sockets: Vec<TcpListener>,
        settings: ListenerSettings,
        queue: Recipient<Enqueue>,
        metrics: Arc<Metrics>,
        arbiters: Vec<actix_rt::ArbiterHandle>,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(settings.max_connections));
        Listener { sockets, settings, queue, metrics, permits, arbiters, next: 0 }
    }
}

pub fn relay_allowed(networks: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    networks.iter().any(|n| n.contains(&ip))
}

impl Actor for Listener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for socket in std::mem::take(&mut self.sockets) {
            let me = ctx.address();
            if let Ok(addr) = socket.local_addr() {
                info!(%addr, "listening");
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
        let Accepted { stream, peer } = msg;
        self.metrics.connections_total.inc();
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.metrics.refused(protocol::RefusalCause::TooManyConnections.as_str());
            info!(client = %peer, cause = "too_many_connections", "refused");
            // The socket's send buffer is empty, so a non-blocking write of one short line goes
            // out whole; no task is spawned per refused connection, whatever the flood.
            let _ = stream.try_write(&reply::too_many_connections(&self.settings.params.hostname).to_bytes());
            drop(stream);
            return;
        };
        let relay = relay_allowed(&self.settings.relay_networks, peer.ip());
        let proto = protocol::Session::new(self.settings.params.clone(), peer.ip(), relay);
        let (queue, metrics, idle) = (self.queue.clone(), self.metrics.clone(), self.settings.idle_timeout);
        let run = move |stream: TcpStream| async move {
            metrics.connections_current.inc();
            let session = Session::new(proto, queue, peer, metrics.clone()).start();
            serve(stream, session, idle).await;
            metrics.connections_current.dec();
            drop(permit);
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

impl Handler<StopListening> for Listener {
    type Result = ();

    fn handle(&mut self, _msg: StopListening, ctx: &mut Self::Context) {
        info!("no longer accepting connections");
        ctx.stop();
    }
}
