//! One outbound SMTP connection: connect (implicit TLS or not), greeting, EHLO (HELO fallback),
//! STARTTLS, AUTH, and transactions with per-recipient results, every wait bounded by a timeout.
//!
//! Invariant: every failure comes back as a [`Failure`] carrying an [`Outcome`] already
//! classified (2xx/4xx/5xx or a network error = temporary); nothing here panics on what the
//! server sends.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::delivery::{replies, Outcome};
use crate::protocol::client::{Capabilities, ReplyParser, ServerReply};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub command: Duration,
    pub data: Duration,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Taken by a TLS handshake that failed.
    Closed,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

/// Why a connection or transaction could not give per-recipient answers.
#[derive(Debug, Clone)]
pub struct Failure {
    pub outcome: Outcome,
    /// The problem is this host's (connection refused, 4xx greeting, dropped connection…):
    /// another MX host may do better.
    pub try_next_host: bool,
    /// The TLS handshake failed: the same host may work in clear text.
    pub tls_failed: bool,
    /// `outcome` is the peer's own reply (not our description of a network or local problem).
    pub peer_reply: bool,
}

impl Failure {
    pub(crate) fn host(outcome: Outcome) -> Self {
        Failure { outcome, try_next_host: true, tls_failed: false, peer_reply: false }
    }

    /// The peer refused with this reply.
    fn reply(reply: &ServerReply, try_next_host: bool) -> Self {
        Failure { outcome: reply_outcome(reply), try_next_host, tls_failed: false, peer_reply: true }
    }
}

/// One message's envelope as this connection sends it.
pub struct Transaction<'a> {
    /// `MAIL FROM` address, empty for `<>`.
    pub sender: &'a str,
    /// Extra MAIL parameters (`SIZE=`, `BODY=`, `SMTPUTF8`, `RET=`, `ENVID=`).
    pub mail_params: String,
    /// Each recipient with its extra RCPT parameters (`NOTIFY=`, `ORCPT=`).
    pub recipients: Vec<(&'a str, String)>,
    /// Dot-stuffed and terminated with `CRLF.CRLF`.
    pub data: &'a [u8],
}

pub struct Connection {
    stream: Stream,
    parser: ReplyParser,
    pub caps: Capabilities,
    /// `name[ip]` for logs and reports.
    pub peer: String,
    pub addr: SocketAddr,
    pub tls: bool,
    /// Transactions completed on this connection.
    pub messages: usize,
    /// The last transaction ended cleanly (end-of-data reply read): safe to carry another.
    pub reusable: bool,
    timeouts: Timeouts,
}

/// Only the code decides; the text is the remote server's, shown as it said it.
fn reply_outcome(reply: &ServerReply) -> Outcome {
    Outcome::from_reply(reply.code, reply.text().get(4..).unwrap_or(""))
}

/// How a connection uses TLS and logs in.
pub struct Security<'a> {
    /// The client configuration to use; `None` = clear text only.
    pub tls: Option<&'a Arc<rustls::ClientConfig>>,
    /// No TLS means no connection.
    pub required: bool,
    /// `tls` checks the chain and name: only then are credentials sent (unless allowed).
    pub verified: bool,
    /// TLS from the first byte (RFC 8314, port 465), not STARTTLS.
    pub implicit: bool,
    pub auth: Option<&'a Credentials>,
    /// Credentials may go over a connection that is not encrypted and verified.
    pub allow_unverified_auth: bool,
}

/// A login at a smart host or route. Never printed: `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials {{ username: {:?}, password: <hidden> }}", self.username)
    }
}

impl Connection {
    /// Connects (with TLS at once when implicit), reads the greeting, says EHLO (or HELO),
    /// upgrades with STARTTLS when offered and `sec.tls` is given, then logs in when
    /// `sec.auth` is given. A required TLS that did not happen is a failure.
    pub async fn open(
        addr: SocketAddr,
        host: &str,
        helo: &str,
        sec: &Security<'_>,
        timeouts: &Timeouts,
    ) -> Result<Connection, Failure> {
        let peer = format!("{host}[{}]", addr.ip());
        let tcp = match tokio::time::timeout(timeouts.connect, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(Failure::host(replies::network_error("cannot connect to", &peer, e))),
            Err(_) => return Err(Failure::host(replies::timed_out("connecting to", &peer))),
        };
        let _ = tcp.set_nodelay(true);
        let mut c = Connection {
            stream: Stream::Plain(tcp),
            parser: ReplyParser::new(),
            caps: Capabilities::default(),
            peer,
            addr,
            tls: false,
            messages: 0,
            reusable: false,
            timeouts: timeouts.clone(),
        };
        if sec.implicit {
            let Some(config) = sec.tls else {
                return Err(Failure::host(replies::tls_not_offered(host)));
            };
            c.handshake(config, host).await?;
        }
        let greeting = c.read_reply(timeouts.command, "waiting for the greeting of").await?;
        if greeting.code != 220 {
            return Err(Failure::reply(&greeting, true));
        }
        c.hello(helo).await?;
        if c.caps.starttls && !c.tls {
            if let Some(config) = sec.tls {
                c.start_tls(config, host).await?;
                c.hello(helo).await?;
            }
        }
        if sec.required && !c.tls {
            let _ = c.quit().await;
            return Err(Failure::host(replies::tls_not_offered(host)));
        }
        if let Some(creds) = sec.auth {
            let protected = c.tls && sec.verified;
            if !protected && !sec.allow_unverified_auth {
                let _ = c.quit().await;
                return Err(Failure::host(replies::auth_unprotected(&c.peer)));
            }
            c.login(creds).await?;
        }
        Ok(c)
    }

    /// AUTH PLAIN, or LOGIN when only that is offered (RFC 4954). A refusal is temporary:
    /// the operator's credentials are wrong, not the user's mail.
    async fn login(&mut self, creds: &Credentials) -> Result<(), Failure> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let cmd = self.timeouts.command;
        let refused = |peer: &str, r: &ServerReply| Failure::host(replies::auth_failed(peer, r.text()));
        let reply = if self.caps.auth_plain {
            let token = b64.encode(format!("\0{}\0{}", creds.username, creds.password));
            self.write(format!("AUTH PLAIN {token}\r\n").as_bytes(), cmd).await?;
            self.read_reply(cmd, "waiting for the AUTH reply of").await?
        } else if self.caps.auth_login {
            self.write(b"AUTH LOGIN\r\n", cmd).await?;
            let mut reply = self.read_reply(cmd, "waiting for the AUTH reply of").await?;
            for secret in [&creds.username, &creds.password] {
                if reply.code != 334 {
                    break;
                }
                self.write(format!("{}\r\n", b64.encode(secret)).as_bytes(), cmd).await?;
                reply = self.read_reply(cmd, "waiting for the AUTH reply of").await?;
            }
            reply
        } else {
            return Err(Failure::host(replies::auth_not_offered(&self.peer)));
        };
        if reply.code == 235 {
            return Ok(());
        }
        Err(refused(&self.peer, &reply))
    }

    async fn hello(&mut self, helo: &str) -> Result<(), Failure> {
        self.write(format!("EHLO {helo}\r\n").as_bytes(), self.timeouts.command).await?;
        let reply = self.read_reply(self.timeouts.command, "waiting for the EHLO reply of").await?;
        if reply.code == 250 {
            self.caps = Capabilities::from_ehlo(&reply);
            return Ok(());
        }
        if reply.code == 421 {
            return Err(Failure::reply(&reply, true));
        }
        // EHLO refused: an old server; HELO means no extensions at all.
        self.write(format!("HELO {helo}\r\n").as_bytes(), self.timeouts.command).await?;
        let reply = self.read_reply(self.timeouts.command, "waiting for the HELO reply of").await?;
        if reply.code != 250 {
            return Err(Failure::reply(&reply, true));
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    async fn start_tls(&mut self, config: &Arc<rustls::ClientConfig>, host: &str) -> Result<(), Failure> {
        self.write(b"STARTTLS\r\n", self.timeouts.command).await?;
        let reply = self.read_reply(self.timeouts.command, "waiting for the STARTTLS reply of").await?;
        if reply.code != 220 {
            // Offered but refused: go on in clear text, as the server is still in a sane state.
            return Ok(());
        }
        // Anything the server sent before the handshake must not be read as a reply after it.
        self.parser.clear();
        self.handshake(config, host).await
    }

    async fn handshake(&mut self, config: &Arc<rustls::ClientConfig>, host: &str) -> Result<(), Failure> {
        let name =
            ServerName::try_from(host.to_string()).unwrap_or_else(|_| ServerName::IpAddress(self.addr.ip().into()));
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Closed) else {
            return Err(Failure::host(replies::starttls_twice(&self.peer)));
        };
        let connector = TlsConnector::from(config.clone());
        match tokio::time::timeout(self.timeouts.command, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => {
                self.stream = Stream::Tls(Box::new(tls));
                self.tls = true;
                Ok(())
            }
            Ok(Err(e)) => Err(Failure {
                outcome: replies::tls_handshake_failed(&self.peer, e),
                try_next_host: true,
                tls_failed: true,
                peer_reply: false,
            }),
            Err(_) => Err(Failure {
                outcome: replies::timed_out("in the TLS handshake with", &self.peer),
                try_next_host: true,
                tls_failed: true,
                peer_reply: false,
            }),
        }
    }

    async fn write(&mut self, bytes: &[u8], limit: Duration) -> Result<(), Failure> {
        let fut = async {
            match &mut self.stream {
                Stream::Plain(s) => s.write_all(bytes).await,
                Stream::Tls(s) => {
                    s.write_all(bytes).await?;
                    s.flush().await
                }
                Stream::Closed => Err(closed()),
            }
        };
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::host(replies::network_error("connection lost while writing to", &self.peer, e))),
            Err(_) => Err(Failure::host(replies::timed_out("writing to", &self.peer))),
        }
    }

    async fn read_reply(&mut self, limit: Duration, what: &str) -> Result<ServerReply, Failure> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut buf = [0u8; 4096];
        loop {
            match self.parser.next_reply() {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => return Err(Failure::host(replies::protocol_error(&self.peer, e))),
            }
            let read = async {
                match &mut self.stream {
                    Stream::Plain(s) => s.read(&mut buf).await,
                    Stream::Tls(s) => s.read(&mut buf).await,
                    Stream::Closed => Err(closed()),
                }
            };
            match tokio::time::timeout_at(deadline, read).await {
                Ok(Ok(0)) => return Err(Failure::host(replies::peer_closed(&self.peer, what))),
                Ok(Ok(n)) => self.parser.feed(&buf[..n]),
                Ok(Err(e)) => return Err(Failure::host(replies::network_error("connection lost with", &self.peer, e))),
                Err(_) => return Err(Failure::host(replies::timed_out(what, &self.peer))),
            }
        }
    }

    /// Sends one message. `Ok` carries one outcome per recipient, in order; `Err` means no
    /// recipient got an answer of its own (the same outcome applies to all).
    pub async fn send(&mut self, t: &Transaction<'_>) -> Result<Vec<Outcome>, Failure> {
        self.reusable = false;
        let cmd = self.timeouts.command;
        let mail = format!("MAIL FROM:<{}>{}\r\n", t.sender, t.mail_params);
        let rcpts: Vec<String> = t.recipients.iter().map(|(a, p)| format!("RCPT TO:<{a}>{p}\r\n")).collect();
        let (mail_reply, rcpt_replies, data_reply) = if self.caps.pipelining {
            let mut batch = mail.into_bytes();
            for r in &rcpts {
                batch.extend_from_slice(r.as_bytes());
            }
            batch.extend_from_slice(b"DATA\r\n");
            self.write(&batch, cmd).await?;
            let mail_reply = self.read_reply(cmd, "waiting for the MAIL reply of").await?;
            let mut rcpt_replies = Vec::with_capacity(rcpts.len());
            for _ in &rcpts {
                rcpt_replies.push(self.read_reply(cmd, "waiting for a RCPT reply of").await?);
            }
            let data_reply = self.read_reply(cmd, "waiting for the DATA reply of").await?;
            (mail_reply, rcpt_replies, Some(data_reply))
        } else {
            self.write(mail.as_bytes(), cmd).await?;
            let mail_reply = self.read_reply(cmd, "waiting for the MAIL reply of").await?;
            let mut rcpt_replies = Vec::with_capacity(rcpts.len());
            if mail_reply.code == 250 {
                for r in &rcpts {
                    self.write(r.as_bytes(), cmd).await?;
                    rcpt_replies.push(self.read_reply(cmd, "waiting for a RCPT reply of").await?);
                }
            }
            let data_reply = if rcpt_replies.iter().any(|r| r.is_positive()) {
                self.write(b"DATA\r\n", cmd).await?;
                Some(self.read_reply(cmd, "waiting for the DATA reply of").await?)
            } else {
                None
            };
            (mail_reply, rcpt_replies, data_reply)
        };
        if mail_reply.code != 250 {
            self.reset().await;
            // A sender refusal is about this message, not the host: no other MX is tried.
            return Err(Failure::reply(&mail_reply, false));
        }
        let mut outcomes: Vec<Option<Outcome>> =
            rcpt_replies.iter().map(|r| if r.is_positive() { None } else { Some(reply_outcome(r)) }).collect();
        let accepted = outcomes.iter().filter(|o| o.is_none()).count();
        match data_reply {
            Some(r) if r.code == 354 && accepted > 0 => {}
            Some(r) if accepted > 0 => {
                let o = reply_outcome(&r);
                self.reset().await;
                return Ok(outcomes.into_iter().map(|x| x.unwrap_or_else(|| o.clone())).collect());
            }
            Some(r) if r.code == 354 => {
                // Every recipient was refused but the server wants data anyway (pipelining):
                // an empty message ends it without delivering anything.
                self.write(b".\r\n", cmd).await?;
                let _ = self.read_reply(cmd, "waiting for the end-of-data reply of").await?;
                return Ok(outcomes.into_iter().map(|x| x.unwrap_or_else(replies::no_reply)).collect());
            }
            _ => {
                self.reset().await;
                return Ok(outcomes.into_iter().map(|x| x.unwrap_or_else(replies::no_reply)).collect());
            }
        }
        let data_limit = self.timeouts.data;
        self.write(t.data, data_limit).await?;
        let end = self.read_reply(data_limit, "waiting for the end-of-data reply of").await?;
        let o = reply_outcome(&end);
        for x in outcomes.iter_mut().filter(|x| x.is_none()) {
            *x = Some(o.clone());
        }
        self.messages += 1;
        self.reusable = true;
        Ok(outcomes.into_iter().map(|x| x.unwrap_or_else(replies::no_reply)).collect())
    }

    /// Abandons a transaction so the connection can carry another; on failure the connection
    /// is simply not reused.
    async fn reset(&mut self) {
        if self.write(b"RSET\r\n", self.timeouts.command).await.is_ok() {
            let _ = self.read_reply(self.timeouts.command, "waiting for the RSET reply of").await;
        }
    }

    pub async fn quit(&mut self) -> Result<(), Failure> {
        let limit = self.timeouts.command.min(Duration::from_secs(10));
        self.write(b"QUIT\r\n", limit).await?;
        let _ = self.read_reply(limit, "waiting for the QUIT reply of").await;
        match &mut self.stream {
            Stream::Plain(s) => {
                let _ = s.shutdown().await;
            }
            Stream::Tls(s) => {
                let _ = s.shutdown().await;
            }
            Stream::Closed => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_print_the_password() {
        let c = Credentials { username: "relayuser".into(), password: "hunter2".into() };
        let shown = format!("{c:?} {:?}", Some(&c));
        assert!(shown.contains("relayuser") && !shown.contains("hunter2"), "{shown}");
    }
}
