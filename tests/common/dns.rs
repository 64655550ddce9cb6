//! A real DNS server for tests: UDP and TCP on 127.0.0.1, answering from a table the test can
//! change while it runs — MX, A, AAAA and TXT records, NXDOMAIN, SERVFAIL, silence (a timeout) and
//! garbage bytes.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX, SOA, TLSA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone)]
pub enum Answer {
    /// MX records: (preference, exchange); an exchange of "." is a null MX.
    Mx(Vec<(u16, String)>),
    Addrs(Vec<IpAddr>),
    /// TXT records, each a value split into strings of at most 255 bytes.
    Txt(Vec<String>),
    /// TLSA records: (usage, selector, matching, data).
    Tlsa(Vec<(u8, u8, u8, Vec<u8>)>),
    NxDomain,
    ServFail,
    /// No answer at all: the resolver times out.
    Silent,
    /// Bytes that are not a DNS message.
    Garbage,
}

#[derive(Default)]
struct Zone {
    entries: HashMap<(String, RecordType), Answer>,
    /// Names whose answers carry the AD bit, as from a validating resolver.
    secure: std::collections::HashSet<String>,
}

#[derive(Clone)]
pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    pub queries: Arc<Mutex<Vec<(String, RecordType)>>>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    /// Starts on 127.0.0.1 (UDP and TCP on one port) on a thread of its own.
    pub fn start() -> DnsServer {
        let (tx, rx) = std::sync::mpsc::channel();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let queries = Arc::new(Mutex::new(Vec::new()));
        let (z, q) = (zone.clone(), queries.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                // UDP and TCP on the same port: retry until both binds succeed.
                let (udp, tcp) = loop {
                    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("udp bind");
                    let port = udp.local_addr().expect("addr").port();
                    if let Ok(tcp) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                        break (udp, tcp);
                    }
                };
                tx.send(udp.local_addr().expect("addr")).expect("send addr");
                let (zt, qt) = (z.clone(), q.clone());
                tokio::spawn(async move {
                    while let Ok((mut s, _)) = tcp.accept().await {
                        let (z, q) = (zt.clone(), qt.clone());
                        tokio::spawn(async move {
                            let mut len = [0u8; 2];
                            while s.read_exact(&mut len).await.is_ok() {
                                let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
                                if s.read_exact(&mut buf).await.is_err() {
                                    return;
                                }
                                if let Some(out) = respond(&z, &q, &buf) {
                                    let mut framed = (out.len() as u16).to_be_bytes().to_vec();
                                    framed.extend_from_slice(&out);
                                    if s.write_all(&framed).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        });
                    }
                });
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, from)) = udp.recv_from(&mut buf).await else { continue };
                    if let Some(out) = respond(&z, &q, &buf[..n]) {
                        let _ = udp.send_to(&out, from).await;
                    }
                }
            });
        });
        let addr = rx.recv().expect("dns server address");
        DnsServer { addr, zone, queries }
    }

    pub fn set(&self, name: &str, rtype: RecordType, answer: Answer) {
        self.zone.lock().unwrap().entries.insert((key(name), rtype), answer);
    }

    /// `name` has MX records pointing at `hosts` (preference, host).
    pub fn mx(&self, name: &str, hosts: &[(u16, &str)]) {
        self.set(name, RecordType::MX, Answer::Mx(hosts.iter().map(|(p, h)| (*p, h.to_string())).collect()));
    }

    /// `name` has these A records.
    pub fn a(&self, name: &str, ips: &[&str]) {
        self.set(name, RecordType::A, Answer::Addrs(ips.iter().map(|i| i.parse().expect("ip")).collect()));
    }

    /// Answers for `name` carry the AD bit (DNSSEC-authenticated), as a validating resolver's.
    pub fn secure(&self, name: &str) {
        self.zone.lock().unwrap().secure.insert(key(name));
    }

    /// `name` has these TLSA records.
    pub fn tlsa(&self, name: &str, records: Vec<(u8, u8, u8, Vec<u8>)>) {
        self.set(name, RecordType::TLSA, Answer::Tlsa(records));
    }

    /// `name` has one TXT record with this value.
    pub fn txt(&self, name: &str, value: &str) {
        self.set(name, RecordType::TXT, Answer::Txt(vec![value.to_string()]));
    }

    pub fn query_count(&self, name: &str) -> usize {
        self.queries.lock().unwrap().iter().filter(|(n, _)| *n == key(name)).count()
    }
}

fn respond(zone: &Mutex<Zone>, queries: &Mutex<Vec<(String, RecordType)>>, bytes: &[u8]) -> Option<Vec<u8>> {
    let req = Message::from_vec(bytes).ok()?;
    let query = req.queries.first()?.clone();
    let name = key(&query.name().to_ascii());
    let rtype = query.query_type();
    queries.lock().unwrap().push((name.clone(), rtype));
    let (answer, secure) = {
        let z = zone.lock().unwrap();
        let secure = z.secure.contains(&name);
        let answer = match z.entries.get(&(name.clone(), rtype)) {
            Some(a) => Some(a.clone()),
            // The name exists with other types: NOERROR with no answers (NODATA).
            None if z.entries.keys().any(|(n, _)| *n == name) => None,
            None => Some(Answer::NxDomain),
        };
        (answer, secure)
    };
    let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.authoritative = true;
    resp.metadata.authentic_data = secure;
    resp.add_query(query.clone());
    let owner = query.name().clone();
    // A negative answer carries the zone's SOA (RFC 2308), as real servers send it, so that
    // resolvers may cache it — for a second, like every answer here.
    let soa = || {
        let zone = Name::from_ascii("test.").ok()?;
        let rname = Name::from_ascii("hostmaster.test.").ok()?;
        Some(Record::from_rdata(zone.clone(), 1, RData::SOA(SOA::new(zone, rname, 1, 60, 60, 60, 1))))
    };
    match answer {
        None => {
            if let Some(r) = soa() {
                resp.add_authority(r);
            }
        }
        Some(Answer::Mx(hosts)) => {
            for (pref, host) in hosts {
                let exchange = if host == "." { Name::root() } else { Name::from_ascii(format!("{host}.")).ok()? };
                resp.add_answer(Record::from_rdata(owner.clone(), 1, RData::MX(MX::new(pref, exchange))));
            }
        }
        Some(Answer::Addrs(ips)) => {
            for ip in ips {
                let rdata = match (ip, rtype) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
                    _ => continue,
                };
                resp.add_answer(Record::from_rdata(owner.clone(), 1, rdata));
            }
        }
        Some(Answer::Txt(values)) => {
            for v in values {
                let parts: Vec<String> =
                    v.as_bytes().chunks(255).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
                resp.add_answer(Record::from_rdata(owner.clone(), 1, RData::TXT(TXT::new(parts))));
            }
        }
        Some(Answer::Tlsa(records)) => {
            for (u, s, m, data) in records {
                let t = TLSA::new(u.into(), s.into(), m.into(), data);
                // A minute: long enough for a test to see that a cache is used.
                resp.add_answer(Record::from_rdata(owner.clone(), 60, RData::TLSA(t)));
            }
        }
        Some(Answer::NxDomain) => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            if let Some(r) = soa() {
                resp.add_authority(r);
            }
        }
        Some(Answer::ServFail) => resp.metadata.response_code = ResponseCode::ServFail,
        Some(Answer::Silent) => return None,
        Some(Answer::Garbage) => return Some(b"\x00\x01garbage that is not DNS at all".to_vec()),
    }
    resp.to_vec().ok()
}
