//! The LMTP delivery actor (route `lmtp`, RFC 2033): hands messages to a mailbox server (Dovecot,
//! Cyrus) over TCP or a Unix socket, and reports the server's reply for each recipient.
//!
//! Invariants:
//! - After DATA an LMTP server answers once per accepted recipient; each recipient gets its own
//!   reply, classified by [`Outcome::from_reply`]. A connection that fails before those replies
//!   makes every recipient without one a temporary failure.
//! - Every read and write is bounded by a timeout and every reply by the bounded
//!   [`ReplyParser`]; nothing the server sends can panic or grow a buffer without limit.
//! - At most `max_connections` connections are open at once.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::delivery::{Deliver, DeliveryReport, Outcome, RecipientResult};
use crate::protocol::client::{dot_stuff, is_eight_bit, Capabilities, ReplyParser, ServerReply};

#[derive(Debug, Clone)]
pub struct LmtpSettings {
    /// `host:port`, or `unix:/path/to/socket`.
    pub address: String,
    /// Our name in LHLO.
    pub hostname: String,
    pub timeout: Duration,
    pub max_connections: usize,
}

pub struct Lmtp {
    settings: Arc<LmtpSettings>,
    connections: Arc<Semaphore>,
}

impl Lmtp {
    pub fn new(settings: LmtpSettings) -> Self {
        let n = settings.max_connections.max(1);
        Lmtp { settings: Arc::new(settings), connections: Arc::new(Semaphore::new(n)) }
    }
}

impl Actor for Lmtp {
    type Context = Context<Self>;
}

struct Conn<S> {
    stream: S,
    parser: ReplyParser,
    timeout: Duration,
    peer: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Outcome> {
        let fut = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Outcome::Temporary(format!("451 4.4.2 connection to {} lost: {e}", self.peer))),
            Err(_) => Err(Outcome::Temporary(format!("451 4.4.2 timed out writing to {}", self.peer))),
        }
    }

    async fn read(&mut self) -> Result<ServerReply, Outcome> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut buf = [0u8; 4096];
        loop {
            match self.parser.next_reply() {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => return Err(Outcome::Temporary(format!("451 4.5.0 protocol error from {}: {e}", self.peer))),
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) => return Err(Outcome::Temporary(format!("451 4.4.2 {} closed the connection", self.peer))),
                Ok(Ok(n)) => self.parser.feed(&buf[..n]),
                Ok(Err(e)) => {
                    return Err(Outcome::Temporary(format!("451 4.4.2 connection to {} lost: {e}", self.peer)))
                }
                Err(_) => return Err(Outcome::Temporary(format!("451 4.4.2 timed out waiting for {}", self.peer))),
            }
        }
    }

    async fn command(&mut self, line: &str) -> Result<ServerReply, Outcome> {
        self.write(line.as_bytes()).await?;
        self.read().await
    }
}

fn outcome(r: &ServerReply) -> Outcome {
    Outcome::from_reply(r.code, r.text().get(4..).unwrap_or(""))
}

/// One LMTP transaction. `Ok` has an outcome per recipient of `req`, in order.
async fn transact<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: &str,
    s: &LmtpSettings,
    req: &Deliver,
) -> Result<Vec<Outcome>, Outcome> {
    let mut c = Conn { stream, parser: ReplyParser::new(), timeout: s.timeout, peer: peer.to_string() };
    let greeting = c.read().await?;
    if greeting.code != 220 {
        return Err(outcome(&greeting));
    }
    let lhlo = c.command(&format!("LHLO {}\r\n", s.hostname)).await?;
    if lhlo.code != 250 {
        return Err(outcome(&lhlo));
    }
    let caps = Capabilities::from_ehlo(&lhlo);
    let utf8 = !req.sender.is_ascii() || req.recipients.iter().any(|r| !r.address.is_ascii());
    if utf8 && !caps.smtputf8 {
        return Err(Outcome::Permanent(format!("550 5.6.7 {peer} does not support SMTPUTF8 addresses")));
    }
    let mut params = String::new();
    if is_eight_bit(&req.message) && caps.eight_bit_mime {
        params.push_str(" BODY=8BITMIME");
    }
    if utf8 {
        params.push_str(" SMTPUTF8");
    }
    let mail = c.command(&format!("MAIL FROM:<{}>{params}\r\n", req.sender)).await?;
    if mail.code != 250 {
        return Err(outcome(&mail));
    }
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(req.recipients.len());
    for r in &req.recipients {
        let reply = c.command(&format!("RCPT TO:<{}>\r\n", r.address)).await?;
        outcomes.push((!reply.is_positive()).then(|| outcome(&reply)));
    }
    if outcomes.iter().all(Option::is_some) {
        let _ = c.command("QUIT\r\n").await;
        return Ok(outcomes.into_iter().flatten().collect());
    }
    let data = c.command("DATA\r\n").await?;
    if data.code != 354 {
        let o = outcome(&data);
        return Ok(outcomes.into_iter().map(|x| x.unwrap_or_else(|| o.clone())).collect());
    }
    c.write(&dot_stuff(&req.message)).await?;
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
                result.push(lost.clone().unwrap_or_else(|| Outcome::Temporary("no reply".into())));
            }
        }
    }
    if lost.is_none() {
        let _ = c.command("QUIT\r\n").await;
    }
    Ok(result)
}

async fn deliver(s: &LmtpSettings, req: &Deliver) -> Result<Vec<Outcome>, Outcome> {
    let connect_failed =
        |e: io::Error| Outcome::Temporary(format!("451 4.4.1 cannot connect to the LMTP server {}: {e}", s.address));
    let timed_out = || Outcome::Temporary(format!("451 4.4.1 timed out connecting to the LMTP server {}", s.address));
    if let Some(path) = s.address.strip_prefix("unix:") {
        let stream = tokio::time::timeout(s.timeout, tokio::net::UnixStream::connect(path))
            .await
            .map_err(|_| timed_out())?
            .map_err(connect_failed)?;
        transact(stream, &s.address, s, req).await
    } else {
        let stream = tokio::time::timeout(s.timeout, tokio::net::TcpStream::connect(s.address.as_str()))
            .await
            .map_err(|_| timed_out())?
            .map_err(connect_failed)?;
        let _ = stream.set_nodelay(true);
        transact(stream, &s.address, s, req).await
    }
}

impl Handler<Deliver> for Lmtp {
    type Result = ResponseFuture<DeliveryReport>;

    fn handle(&mut self, req: Deliver, _ctx: &mut Self::Context) -> Self::Result {
        let settings = self.settings.clone();
        let connections = self.connections.clone();
        Box::pin(async move {
            let _permit = match connections.acquire_owned().await {
                Ok(p) => p,
                Err(e) => return DeliveryReport::all(req.indices(), Outcome::Temporary(e.to_string())),
            };
            match deliver(&settings, &req).await {
                Ok(outcomes) => DeliveryReport {
                    results: req
                        .recipients
                        .iter()
                        .zip(outcomes)
                        .map(|(r, o)| {
                            let mut result = RecipientResult::new(r.index, o);
                            result.remote_mta = Some(settings.address.clone());
                            result
                        })
                        .collect(),
                },
                Err(o) => DeliveryReport::all(req.indices(), o),
            }
        })
    }
}
