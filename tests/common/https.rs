//! A small HTTPS server for tests: answers `GET` by the Host header from a table the test
//! sets (status and body), with the certificate it is given; counts the requests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone)]
pub struct HttpsServer {
    pub addr: SocketAddr,
    pages: Arc<Mutex<HashMap<String, (u16, String)>>>,
    requests: Arc<AtomicUsize>,
}

impl HttpsServer {
    pub fn start(bind: &str, config: Arc<rustls::ServerConfig>) -> HttpsServer {
        let pages: Arc<Mutex<HashMap<String, (u16, String)>>> = Arc::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let (p, r) = (pages.clone(), requests.clone());
        let bind: SocketAddr = bind.parse().expect("https bind address");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(bind).await.expect("https bind");
                tx.send(listener.local_addr().expect("addr")).expect("send addr");
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                while let Ok((s, _)) = listener.accept().await {
                    let (acceptor, p, r) = (acceptor.clone(), p.clone(), r.clone());
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(s).await else { return };
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                            match tls.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        r.fetch_add(1, Ordering::SeqCst);
                        let text = String::from_utf8_lossy(&head).to_string();
                        let host = text
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("host:").map(|h| h.trim().to_string()))
                            .unwrap_or_default();
                        let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
                        let page = p.lock().unwrap().get(&format!("{host}{path}")).cloned();
                        let (status, body) = page.unwrap_or((404, "not found".into()));
                        if status == 0 {
                            // A server that takes the request and never answers.
                            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                            return;
                        }
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = tls.write_all(resp.as_bytes()).await;
                        let _ = tls.shutdown().await;
                    });
                }
            });
        });
        let addr = rx.recv().expect("https server address");
        HttpsServer { addr, pages, requests }
    }

    /// `https://<host><path>` answers `status` with `body`; status 0 = never answers.
    pub fn page(&self, host: &str, path: &str, status: u16, body: &str) {
        self.pages.lock().unwrap().insert(format!("{host}{path}"), (status, body.to_string()));
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}
