//! A small HTTP/1.1 client for the admin API, used by `mailroot queue` and `mailroot ctl`: one
//! request per connection, bounded in time and size. The API is on loopback or a trusted
//! network, so no TLS.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Responses larger than this are refused (a queue listing page is far smaller).
const MAX_RESPONSE: u64 = 64 * 1024 * 1024;

pub struct AdminClient {
    pub address: String,
    pub token: String,
    pub timeout: Duration,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    /// The `error` text of a JSON error body, else the body.
    pub fn error_text(&self) -> String {
        serde_json::from_str::<crate::api::ApiError>(&self.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| self.body.trim().to_string())
    }
}

impl AdminClient {
    pub fn request(&self, method: &str, path: &str) -> Result<Response, String> {
        // State-changing requests are JSON (the API refuses others: see admin/guard.rs).
        self.request_json(method, path, if method == "GET" { "" } else { "{}" })
    }

    /// A request with a JSON body (`""`: none).
    pub fn request_json(&self, method: &str, path: &str, body: &str) -> Result<Response, String> {
        let addr = self
            .address
            .to_socket_addrs()
            .map_err(|e| format!("admin address {}: {e}", self.address))?
            .next()
            .ok_or_else(|| format!("admin address {} resolves to nothing", self.address))?;
        let mut stream = TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| {
            format!("cannot reach the admin API at {addr}: {e} (is mailroot running with [admin] listen set?)")
        })?;
        stream.set_read_timeout(Some(self.timeout)).map_err(|e| e.to_string())?;
        stream.set_write_timeout(Some(self.timeout)).map_err(|e| e.to_string())?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        if !self.token.is_empty() {
            req.push_str(&format!("Authorization: Bearer {}\r\n", self.token));
        }
        req.push_str("\r\n");
        req.push_str(body);
        stream.write_all(req.as_bytes()).map_err(|e| format!("writing to the admin API: {e}"))?;
        let mut raw = Vec::new();
        stream.take(MAX_RESPONSE).read_to_end(&mut raw).map_err(|e| format!("reading from the admin API: {e}"))?;
        parse_response(&raw)
    }
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("incomplete HTTP response")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("malformed HTTP status line")?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if chunked {
        body = dechunk(&body).ok_or("malformed chunked HTTP body")?;
    }
    Ok(Response { status, body: String::from_utf8_lossy(&body).into_owned() })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses() {
        let r =
            parse_response(b"HTTP/1.1 404 Not Found\r\ncontent-length: 22\r\n\r\n{\"error\":\"no such id\"}").unwrap();
        assert_eq!((r.status, r.error_text().as_str()), (404, "no such id"));
        let r =
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "abcde"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
    }
}
