//! The Session actor (one per SMTP connection) and the small I/O task that owns its socket.
//!
//! The I/O task reads bytes, sends them to the actor as [`Input`] and waits for the [`Output`]
//! (reply bytes and whether to close) before reading again. Waiting gives backpressure and keeps
//! replies in order under PIPELINING; owning the socket in one task keeps a later STARTTLS upgrade
//! a local change. The actor holds the sans-IO [`protocol::Session`] and talks to the Queue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::metrics::Metrics;
use crate::protocol::received::Origin;
use crate::protocol::{self, Action, EnqueueError};
use crate::queue::Enqueue;

/// The first bytes of a connection: the greeting.
#[derive(Message)]
#[rtype(result = "Output")]
pub struct Greet;

/// Bytes read from the client.
#[derive(Message)]
#[rtype(result = "Output")]
pub struct Input(pub Vec<u8>);

/// The client sent nothing for the idle timeout.
#[derive(Message)]
#[rtype(result = "Output")]
pub struct IdleTimeout;

/// What to write back, and whether to close afterwards.
#[derive(Debug, Default, MessageResponse)]
pub struct Output {
    pub bytes: Vec<u8>,
    pub close: bool,
}

pub struct Session {
    /// `None` only while a handler's future owns it.
    proto: Option<protocol::Session>,
    queue: Recipient<Enqueue>,
    peer: SocketAddr,
    metrics: Arc<Metrics>,
}

impl Session {
    pub fn new(proto: protocol::Session, queue: Recipient<Enqueue>, peer: SocketAddr, metrics: Arc<Metrics>) -> Self {
        Session { proto: Some(proto), queue, peer, metrics }
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        debug!(client = %self.peer, "session ended");
    }
}

fn log_refusal(peer: SocketAddr, metrics: &Metrics, r: &protocol::Refusal) {
    metrics.refused(r.cause.as_str());
    info!(
        client = %peer,
        cause = r.cause.as_str(),
        sender = r.sender.as_deref().unwrap_or("-"),
        recipients = %r.recipients.join(","),
        recipient = r.recipient.as_deref().unwrap_or("-"),
        "refused"
    );
}

/// Runs the protocol over what is buffered, awaiting the queue for each complete message.
async fn drive(
    mut proto: protocol::Session,
    queue: Recipient<Enqueue>,
    peer: SocketAddr,
    metrics: Arc<Metrics>,
) -> (protocol::Session, Output) {
    let mut out = Output::default();
    while let Some(action) = proto.next_action() {
        match action {
            Action::Reply(r) => r.write_to(&mut out.bytes),
            Action::Refused(r) => log_refusal(peer, &metrics, &r),
            Action::Close => out.close = true,
            Action::Enqueue(m) => {
                let sender = m.sender.as_ref().map(|s| s.to_string()).unwrap_or_default();
                let recipients: Vec<String> = m.recipients.iter().map(|r| r.to_string()).collect();
                let size = m.body.len();
                let req = Enqueue {
                    sender: m.sender,
                    recipients: m.recipients,
                    dsn: m.dsn,
                    rcpt_dsn: m.rcpt_dsn,
                    body: m.body,
                    origin: Origin::Smtp { helo: m.helo, ip: peer.ip(), protocol: m.protocol },
                    origin_text: peer.to_string(),
                    pickup: None,
                };
                let result = queue.send(req).await.unwrap_or(Err(EnqueueError::Temporary));
                let reply = proto.enqueued(result);
                match result {
                    Ok(id) => {
                        info!(id, client = %peer, sender = %sender, recipients = %recipients.join(","), size, result = "accepted", "message")
                    }
                    Err(_) => {
                        metrics.refused(protocol::RefusalCause::QueueFailure.as_str());
                        info!(client = %peer, sender = %sender, recipients = %recipients.join(","), size, result = %reply.summary(), "message")
                    }
                }
                reply.write_to(&mut out.bytes);
            }
        }
    }
    (proto, out)
}

impl Handler<Greet> for Session {
    type Result = Output;

    fn handle(&mut self, _msg: Greet, _ctx: &mut Self::Context) -> Output {
        let bytes = self.proto.as_ref().map(|p| p.greeting().to_bytes()).unwrap_or_default();
        Output { bytes, close: false }
    }
}

impl Session {
    /// Lets `step` act on the protocol state (feed input, signal a timeout), then runs every
    /// action that results, awaiting the queue where needed.
    fn run(&mut self, step: impl FnOnce(&mut protocol::Session)) -> ResponseActFuture<Self, Output> {
        let Some(mut proto) = self.proto.take() else {
            // Only reachable if the I/O task did not wait for the previous answer.
            return Box::pin(actix::fut::ready(Output { bytes: Vec::new(), close: true }));
        };
        step(&mut proto);
        let fut = drive(proto, self.queue.clone(), self.peer, self.metrics.clone());
        Box::pin(fut.into_actor(self).map(|(proto, out), act, _ctx| {
            act.proto = Some(proto);
            out
        }))
    }
}

impl Handler<Input> for Session {
    type Result = ResponseActFuture<Self, Output>;

    fn handle(&mut self, msg: Input, _ctx: &mut Self::Context) -> Self::Result {
        self.run(|proto| proto.feed(&msg.0))
    }
}

impl Handler<IdleTimeout> for Session {
    type Result = ResponseActFuture<Self, Output>;

    fn handle(&mut self, _msg: IdleTimeout, _ctx: &mut Self::Context) -> Self::Result {
        self.run(protocol::Session::timeout)
    }
}

/// Size of one read; also bounds how much input one `Input` carries.
const READ_CHUNK: usize = 16 * 1024;

/// Owns the socket of one connection until it closes. Every write is bounded by `idle` too, so a
/// client that stops reading cannot pin the connection.
pub async fn serve(mut stream: TcpStream, session: Addr<Session>, idle: Duration) {
    let _ = stream.set_nodelay(true);
    let Ok(greeting) = session.send(Greet).await else {
        return;
    };
    if !write(&mut stream, &greeting.bytes, idle).await {
        return;
    }
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let out = match tokio::time::timeout(idle, stream.read(&mut buf)).await {
            Err(_) => match session.send(IdleTimeout).await {
                Ok(out) => out,
                Err(_) => break,
            },
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => match session.send(Input(buf[..n].to_vec())).await {
                Ok(out) => out,
                Err(_) => break,
            },
        };
        let close = out.close;
        if !write(&mut stream, &out.bytes, idle).await || close {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
}

async fn write(stream: &mut TcpStream, bytes: &[u8], idle: Duration) -> bool {
    bytes.is_empty() || matches!(tokio::time::timeout(idle, stream.write_all(bytes)).await, Ok(Ok(())))
}
