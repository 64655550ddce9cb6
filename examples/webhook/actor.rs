//! The webhook delivery actor: POSTs each message to an HTTP endpoint and turns the answer into
//! per-recipient results — the whole contract a custom delivery actor has with mailroot.
//!
//! The request: `POST <path>` with the message as the body (`Content-Type: message/rfc822`) and
//! the envelope in headers (`X-Mailroot-Queue-Id`, `X-Mailroot-Sender`, `X-Mailroot-Recipients`).
//! The answer: 2xx = delivered; 408, 429 and 5xx = try again later (the queue retries on its
//! schedule); any other 4xx = refused for good (the sender gets a non-delivery report); no answer
//! in time, or a connection error = try again later.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use mailroot::actors::delivery::{Deliver, DeliveryReport, Outcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

/// Where to POST: `http://host:port/path` (plain HTTP; put a TLS proxy in front for more).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = url.strip_prefix("http://").ok_or("the URL must start with http://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| format!("bad port in {url}"))?),
            None => (authority, 80),
        };
        if host.is_empty() {
            return Err(format!("no host in {url}"));
        }
        Ok(Endpoint { host: host.to_string(), port, path: path.to_string() })
    }
}

pub struct Webhook {
    endpoint: Arc<Endpoint>,
    timeout: Duration,
    /// Requests in flight at once, at most: the endpoint is somebody's small web service.
    requests: Arc<Semaphore>,
}

impl Webhook {
    pub fn new(endpoint: Endpoint, timeout: Duration) -> Self {
        Webhook { endpoint: Arc::new(endpoint), timeout, requests: Arc::new(Semaphore::new(8)) }
    }
}

impl Actor for Webhook {
    type Context = Context<Self>;
}

/// What a status code means for the message.
pub fn classify(status: u16) -> Outcome {
    let text = format!("webhook answered HTTP {status}");
    match status {
        200..=299 => Outcome::new(250, "2.0.0", text),
        408 | 429 | 500..=599 => Outcome::new(451, "4.4.0", text),
        _ => Outcome::new(550, "5.0.0", text),
    }
}

/// Header values come from the envelope; no CR or LF may reach the request.
fn header_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

async fn post(e: &Endpoint, req: &Deliver) -> Result<u16, String> {
    let mut stream = tokio::net::TcpStream::connect((e.host.as_str(), e.port))
        .await
        .map_err(|err| format!("cannot connect to {}:{}: {err}", e.host, e.port))?;
    let recipients: Vec<&str> = req.recipients.iter().map(|r| r.address.as_str()).collect();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: message/rfc822\r\nContent-Length: {}\r\n\
         X-Mailroot-Queue-Id: {}\r\nX-Mailroot-Sender: {}\r\nX-Mailroot-Recipients: {}\r\nConnection: close\r\n\r\n",
        e.path,
        e.host,
        e.port,
        req.message.len(),
        req.id,
        header_safe(&req.sender),
        header_safe(&recipients.join(", "))
    );
    stream.write_all(head.as_bytes()).await.map_err(|err| err.to_string())?;
    stream.write_all(&req.message).await.map_err(|err| err.to_string())?;
    // Only the status line matters; read at most 8 KiB of whatever comes back.
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    while n < buf.len() && !buf[..n].windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buf[n..]).await.map_err(|err| err.to_string())? {
            0 => break,
            k => n += k,
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| "no HTTP status line in the answer".to_string())
}

impl Handler<Deliver> for Webhook {
    type Result = ResponseFuture<DeliveryReport>;

    fn handle(&mut self, req: Deliver, _ctx: &mut Self::Context) -> Self::Result {
        let (endpoint, timeout, requests) = (self.endpoint.clone(), self.timeout, self.requests.clone());
        Box::pin(async move {
            let _permit = requests.acquire_owned().await;
            let outcome = match tokio::time::timeout(timeout, post(&endpoint, &req)).await {
                Ok(Ok(status)) => classify(status),
                Ok(Err(e)) => Outcome::new(451, "4.4.1", format!("webhook: {e}")),
                Err(_) => Outcome::new(451, "4.4.1", "webhook: no answer in time"),
            };
            // One request carries every recipient, so they share its outcome.
            DeliveryReport::all(req.indices(), outcome)
        })
    }
}
