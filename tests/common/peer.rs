//! SMTP peers for delivery tests: real servers on chosen 127.x.y.z addresses that accept, answer
//! 4xx/5xx per recipient, drop the connection mid-DATA, stall, offer STARTTLS with a self-signed
//! certificate, or misbehave (endless replies, huge lines, garbage). Behaviour can be changed
//! while the test runs; everything received is recorded.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// Answers EHLO with continuation lines that never end.
    EndlessReply,
    /// Sends a 10 MB line without a line end as the greeting.
    HugeLine,
    /// Greets with bytes that are not SMTP.
    Garbage,
}

#[derive(Debug, Clone)]
pub struct Behavior {
    pub greeting: String,
    /// Extra EHLO keywords (PIPELINING, 8BITMIME, SIZE n, DSN, SMTPUTF8…); STARTTLS is added
    /// when `tls` is on.
    pub ehlo: Vec<String>,
    pub refuse_ehlo: bool,
    /// Recipients whose local part starts with a key get that reply instead of 250.
    pub rcpt_replies: Vec<(String, String)>,
    /// Reply to the final dot.
    pub data_reply: String,
    /// Close the connection after reading this many bytes of DATA.
    pub drop_in_data: bool,
    /// Wait this long before the greeting.
    pub stall: Option<Duration>,
    pub tls: bool,
    /// Say 220 to STARTTLS and then send garbage instead of a handshake.
    pub broken_tls: bool,
    pub hostile: Option<Hostile>,
    /// The server's TLS identity; `None` = a self-signed certificate for peer.test.
    pub tls_config: Option<Arc<rustls::ServerConfig>>,
    /// TLS from the first byte (port 465 style) instead of STARTTLS.
    pub implicit_tls: bool,
    /// AUTH PLAIN and LOGIN are offered and required before MAIL, with this user and password.
    pub auth: Option<(String, String)>,
    /// Recipients per transaction; the next get `452 4.5.3 Too many recipients`.
    pub max_rcpts: Option<usize>,
    /// Offer only AUTH LOGIN (not PLAIN).
    pub auth_login_only: bool,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            greeting: "220 peer.test ESMTP test peer".into(),
            ehlo: vec!["PIPELINING".into(), "8BITMIME".into(), "SIZE 10000000".into()],
            refuse_ehlo: false,
            rcpt_replies: vec![
                ("t4".into(), "451 4.2.1 Mailbox busy, try later".into()),
                ("p5".into(), "550 5.1.1 No such user here".into()),
            ],
            data_reply: "250 2.0.0 Message accepted".into(),
            drop_in_data: false,
            stall: None,
            tls: false,
            broken_tls: false,
            hostile: None,
            tls_config: None,
            implicit_tls: false,
            auth: None,
            max_rcpts: None,
            auth_login_only: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Received {
    pub helo: String,
    pub mail_from: String,
    pub rcpts: Vec<String>,
    pub data: Vec<u8>,
    pub tls: bool,
    pub connection: usize,
    /// The user that logged in, if any.
    pub user: Option<String>,
}

struct State {
    behavior: Mutex<Behavior>,
    received: Mutex<Vec<Received>>,
    connections: AtomicUsize,
    open: AtomicUsize,
    /// Every AUTH attempt: (user, password, accepted).
    logins: Mutex<Vec<(String, String, bool)>>,
    max_open: AtomicUsize,
}

#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    state: Arc<State>,
}

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    let cert = rcgen::generate_simple_self_signed(vec!["peer.test".into()]).expect("certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("server config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

impl Peer {
    /// Starts a peer on `ip:port` (port 0 = any) on a thread of its own.
    pub fn start(ip: &str, port: u16, behavior: Behavior) -> Peer {
        let state = Arc::new(State {
            behavior: Mutex::new(behavior),
            received: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            logins: Mutex::new(Vec::new()),
            max_open: AtomicUsize::new(0),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let st = state.clone();
        let bind: SocketAddr = format!("{ip}:{port}").parse().expect("peer address");
        std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = match TcpListener::bind(bind).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = tx.send(Ok(listener.local_addr().expect("addr")));
                let acceptor = tls_acceptor();
                while let Ok((s, _)) = listener.accept().await {
                    let st = st.clone();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let n = st.connections.fetch_add(1, Ordering::SeqCst) + 1;
                        let open = st.open.fetch_add(1, Ordering::SeqCst) + 1;
                        st.max_open.fetch_max(open, Ordering::SeqCst);
                        let quit = Arc::new(std::sync::atomic::AtomicBool::new(false));
                        serve(s, st.clone(), n, acceptor, quit.clone()).await;
                        // After QUIT the count was already lowered, before the 221 went out.
                        if !quit.load(Ordering::SeqCst) {
                            st.open.fetch_sub(1, Ordering::SeqCst);
                        }
                    });
                }
            });
        });
        let addr = rx.recv().expect("peer start").expect("peer bind");
        Peer { addr, state }
    }

    pub fn set(&self, f: impl FnOnce(&mut Behavior)) {
        f(&mut self.state.behavior.lock().unwrap());
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Recipients received so far, over all messages.
    pub fn rcpt_count(&self) -> usize {
        self.state.received.lock().unwrap().iter().map(|r| r.rcpts.len()).sum()
    }

    pub fn logins(&self) -> Vec<(String, String, bool)> {
        self.state.logins.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn max_open(&self) -> usize {
        self.state.max_open.load(Ordering::SeqCst)
    }
}

async fn serve(
    s: tokio::net::TcpStream,
    st: Arc<State>,
    conn: usize,
    acceptor: tokio_rustls::TlsAcceptor,
    quit: Arc<std::sync::atomic::AtomicBool>,
) {
    let b = st.behavior.lock().unwrap().clone();
    let acceptor = match &b.tls_config {
        Some(c) => tokio_rustls::TlsAcceptor::from(c.clone()),
        None => acceptor,
    };
    if b.implicit_tls {
        let Ok(mut tls) = acceptor.accept(s).await else { return };
        if tls.write_all(format!("{}\r\n", b.greeting).as_bytes()).await.is_err() {
            return;
        }
        let _ = session(tls, &st, conn, true, &quit).await;
        return;
    }
    if let Some(d) = b.stall {
        tokio::time::sleep(d).await;
    }
    let mut s = s;
    match b.hostile {
        Some(Hostile::HugeLine) => {
            let chunk = vec![b'2'; 64 * 1024];
            let _ = s.write_all(b"220 ").await;
            for _ in 0..160 {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            return;
        }
        Some(Hostile::Garbage) => {
            let _ = s.write_all(b"\x00\xff\xfe garbage \x01\x02\r\nmore nonsense\r\n").await;
            let _ = s.read(&mut [0u8; 1024]).await;
            return;
        }
        _ => {}
    }
    if s.write_all(format!("{}\r\n", b.greeting).as_bytes()).await.is_err() {
        return;
    }
    if !b.greeting.starts_with("220") {
        let _ = s.read(&mut [0u8; 1024]).await;
        return;
    }
    if let Some(mut plain) = session(s, &st, conn, false, &quit).await {
        if b.broken_tls {
            let _ = plain.write_all(b"this is not a TLS server hello\r\n").await;
            let _ = plain.read(&mut [0u8; 1024]).await;
            return;
        }
        if let Ok(tls) = acceptor.accept(plain).await {
            let _ = session(tls, &st, conn, true, &quit).await;
        }
    }
}

/// Runs SMTP on `s`; returns the raw stream when the client asked for STARTTLS.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    st: &State,
    conn: usize,
    tls: bool,
    quit: &std::sync::atomic::AtomicBool,
) -> Option<S> {
    let mut r = BufReader::new(s);
    let mut helo = String::new();
    let mut mail_from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    let mut user: Option<String> = None;
    loop {
        let mut line = String::new();
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let b = st.behavior.lock().unwrap().clone();
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            if b.refuse_ehlo {
                "502 5.5.2 EHLO not understood".into()
            } else if b.hostile == Some(Hostile::EndlessReply) {
                loop {
                    if r.get_mut().write_all(b"250-this never ends\r\n").await.is_err() {
                        return None;
                    }
                }
            } else {
                helo = cmd[4..].trim().to_string();
                let mut lines = vec!["peer.test greets you".to_string()];
                lines.extend(b.ehlo.iter().cloned());
                if b.auth.is_some() {
                    lines.push(if b.auth_login_only { "AUTH LOGIN" } else { "AUTH PLAIN LOGIN" }.into());
                }
                if b.tls && !tls {
                    lines.push("STARTTLS".into());
                }
                let n = lines.len();
                lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("250{}{l}\r\n", if i + 1 < n { "-" } else { " " }))
                    .collect()
            }
        } else if upper.starts_with("HELO") {
            helo = cmd[4..].trim().to_string();
            "250 peer.test".into()
        } else if upper == "STARTTLS" && b.tls && !tls {
            if r.get_mut().write_all(b"220 2.0.0 Go ahead\r\n").await.is_err() {
                return None;
            }
            // Whatever the client sent after STARTTLS in clear text is dropped with the buffer.
            return Some(r.into_inner());
        } else if upper.starts_with("AUTH ") && b.auth.is_some() {
            let (want_user, want_pass) = b.auth.clone().unwrap_or_default();
            let b64 = |t: &str| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(t.trim())
                    .ok()
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
            };
            let (u, p) = if upper.starts_with("AUTH PLAIN ") {
                let decoded = b64(&cmd[11..]).unwrap_or_default();
                let mut parts = decoded.split('\0').skip(1);
                (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string())
            } else {
                let mut answers = Vec::new();
                for prompt in [&b"334 VXNlcm5hbWU6\r\n"[..], &b"334 UGFzc3dvcmQ6\r\n"[..]] {
                    if r.get_mut().write_all(prompt).await.is_err() {
                        return None;
                    }
                    let mut l = String::new();
                    if r.read_line(&mut l).await.is_err() {
                        return None;
                    }
                    answers.push(b64(&l).unwrap_or_default());
                }
                let p = answers.pop().unwrap_or_default();
                let u = answers.pop().unwrap_or_default();
                (u, p)
            };
            let ok = u == want_user && p == want_pass;
            st.logins.lock().unwrap().push((u.clone(), p, ok));
            if ok {
                user = Some(u);
                "235 2.7.0 Authentication successful".into()
            } else {
                "535 5.7.8 Authentication credentials invalid".into()
            }
        } else if upper.starts_with("MAIL FROM:") && b.auth.is_some() && user.is_none() {
            "530 5.7.0 Authentication required".into()
        } else if upper.starts_with("MAIL FROM:") {
            mail_from = Some(cmd[10..].to_string());
            rcpts.clear();
            "250 2.1.0 OK".into()
        } else if upper.starts_with("RCPT TO:") {
            let arg = cmd[8..].to_string();
            let addr = arg.trim_start_matches('<').split('>').next().unwrap_or("").to_string();
            let local = addr.split('@').next().unwrap_or("");
            match b.rcpt_replies.iter().find(|(k, _)| local.starts_with(k.as_str())) {
                _ if b.max_rcpts.is_some_and(|m| rcpts.len() >= m) => "452 4.5.3 Too many recipients".into(),
                Some((_, reply)) => reply.clone(),
                None => {
                    rcpts.push(arg);
                    "250 2.1.5 OK".into()
                }
            }
        } else if upper == "DATA" {
            if mail_from.is_none() || rcpts.is_empty() {
                "554 5.5.1 No valid recipients".into()
            } else {
                if r.get_mut().write_all(b"354 Go ahead\r\n").await.is_err() {
                    return None;
                }
                let mut data = Vec::new();
                loop {
                    let mut l = Vec::new();
                    match r.read_until(b'\n', &mut l).await {
                        Ok(0) | Err(_) => return None,
                        Ok(_) => {}
                    }
                    if l == b".\r\n" {
                        break;
                    }
                    if b.drop_in_data && data.len() > 10 {
                        return None;
                    }
                    let l = if l.starts_with(b"..") { l[1..].to_vec() } else { l };
                    data.extend_from_slice(&l);
                }
                if b.data_reply.starts_with('2') {
                    st.received.lock().unwrap().push(Received {
                        helo: helo.clone(),
                        mail_from: mail_from.take().unwrap_or_default(),
                        rcpts: std::mem::take(&mut rcpts),
                        data,
                        tls,
                        connection: conn,
                        user: user.clone(),
                    });
                }
                mail_from = None;
                rcpts.clear();
                b.data_reply.clone()
            }
        } else if upper == "RSET" {
            mail_from = None;
            rcpts.clear();
            "250 2.0.0 OK".into()
        } else if upper == "NOOP" {
            "250 2.0.0 OK".into()
        } else if upper == "QUIT" {
            // Counted as closed before the client can see the 221 and open another connection.
            if !quit.swap(true, Ordering::SeqCst) {
                st.open.fetch_sub(1, Ordering::SeqCst);
            }
            let _ = r.get_mut().write_all(b"221 2.0.0 Bye\r\n").await;
            return None;
        } else {
            "502 5.5.2 Command not recognized".into()
        };
        let reply = if reply.ends_with("\r\n") { reply } else { format!("{reply}\r\n") };
        if r.get_mut().write_all(reply.as_bytes()).await.is_err() {
            return None;
        }
    }
}
