//! DANE for SMTP (RFC 7672): an MX host's certificate checked against its `_25._tcp.<mx>` TLSA
//! records, used only when the DNS answers are DNSSEC-authenticated.
//!
//! Authenticated means the AD bit of the configured resolver's answer, as Postfix does: the
//! operator runs a validating resolver they trust (unbound on loopback), and mailroot asks it
//! with the AD and DO bits set. mailroot does not validate signatures itself: a validating
//! resolver already does, with its own trust anchor upkeep (RFC 5011), and a second validator
//! here would be a second trust-anchor file to keep current. An answer without AD is treated as
//! no TLSA at all; an authenticated TLSA that does not match is a temporary failure, never a
//! fallback to clear text.
//!
//! Usages: DANE-EE (3) matches the server's own certificate or key (names and dates are not
//! checked, RFC 7672 §3.1.1); DANE-TA (2) matches a certificate the server sends in its chain,
//! which then anchors an ordinary chain and name check against the MX host name. PKIX usages
//! (0, 1) are unusable for SMTP (§3.1.3).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;

use super::tls::AnyCertificate;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// One usable TLSA record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

impl Tlsa {
    /// Only what RFC 7672 lets SMTP use: usages 2 and 3, selectors 0 and 1, matching 0–2.
    pub fn usable(&self) -> bool {
        matches!(self.usage, 2 | 3) && self.selector <= 1 && self.matching <= 2
    }

    /// Whether `cert` is the one this record names.
    pub fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        let content: Vec<u8> = match self.selector {
            0 => cert.as_ref().to_vec(),
            _ => match webpki::EndEntityCert::try_from(cert) {
                Ok(c) => c.subject_public_key_info().as_ref().to_vec(),
                Err(_) => return false,
            },
        };
        let digest = match self.matching {
            0 => content,
            1 => ring::digest::digest(&ring::digest::SHA256, &content).as_ref().to_vec(),
            _ => ring::digest::digest(&ring::digest::SHA512, &content).as_ref().to_vec(),
        };
        digest == self.data
    }
}

/// What DNS says about an MX host's TLSA records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostTlsa {
    /// Authenticated, with usable records: the certificate must match one.
    Verify(Vec<Tlsa>),
    /// Authenticated, but no record is usable: TLS is still required (RFC 7672 §2.2).
    Encrypt,
    /// No authenticated TLSA: DANE does not apply to this host.
    None,
    /// The lookup failed: the host cannot be used now (its records may exist).
    Unusable(String),
}

/// A query to `servers` with the AD and DO bits, over UDP (TCP when truncated). `Ok((ad,
/// answer))`; NXDOMAIN and NODATA are answers too.
pub async fn secure_query(servers: &[SocketAddr], name: &str, rtype: RecordType) -> Result<(bool, Message), String> {
    let name = Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).map_err(|e| e.to_string())?;
    let mut last = "no DNS server".to_string();
    for server in servers.iter().take(3) {
        match query_one(*server, &name, rtype).await {
            Ok(m) if matches!(m.metadata.response_code, ResponseCode::NoError | ResponseCode::NXDomain) => {
                return Ok((m.metadata.authentic_data, m));
            }
            Ok(m) => last = format!("{server} answered {}", m.metadata.response_code),
            Err(e) => last = format!("{server}: {e}"),
        }
    }
    Err(last)
}

async fn query_one(server: SocketAddr, name: &Name, rtype: RecordType) -> Result<Message, String> {
    let id: u16 = rand_id();
    let mut q = Message::new(id, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.metadata.authentic_data = true;
    q.add_query(Query::query(name.clone(), rtype));
    let mut edns = Edns::new();
    edns.set_dnssec_ok(true);
    edns.set_max_payload(1232);
    q.set_edns(edns);
    let bytes = q.to_vec().map_err(|e| e.to_string())?;
    let work = async {
        let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().map_err(|_| "bind")?;
        let sock = tokio::net::UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
        sock.connect(server).await.map_err(|e| e.to_string())?;
        sock.send(&bytes).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
            let Ok(m) = Message::from_vec(&buf[..n]) else { continue };
            if m.metadata.id != id {
                continue;
            }
            if !m.metadata.truncation {
                return Ok(m);
            }
            break;
        }
        // Truncated: the same question over TCP.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(server).await.map_err(|e| e.to_string())?;
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        tcp.write_all(&framed).await.map_err(|e| e.to_string())?;
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        tcp.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Message::from_vec(&buf).map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), work).await.map_err(|_| "timed out".to_string())?
}

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u16::from_be_bytes(b)
}

/// Answers of [`secure_query`] kept for their TTL (at most 5 minutes; failures are not kept),
/// so a burst of mail to one domain asks once. Bounded to [`MAX_CACHED`] names.
#[derive(Default)]
pub struct Cache {
    answers: std::sync::Mutex<std::collections::HashMap<(String, RecordType), Cached>>,
}

/// Until when, whether authenticated (AD), the answer.
type Cached = (std::time::Instant, bool, Message);

const MAX_CACHED: usize = 10_000;
const MAX_TTL: u64 = 300;

impl Cache {
    pub async fn query(
        &self,
        servers: &[SocketAddr],
        name: &str,
        rtype: RecordType,
    ) -> Result<(bool, Message), String> {
        let key = (name.to_ascii_lowercase(), rtype);
        let now = std::time::Instant::now();
        if let Some((until, ad, m)) = self.answers.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            if *until > now {
                return Ok((*ad, m.clone()));
            }
        }
        let (ad, m) = secure_query(servers, name, rtype).await?;
        // The answer's smallest TTL, or a short while for a negative answer.
        let ttl = m.answers.iter().map(|r| u64::from(r.ttl)).min().unwrap_or(30).min(MAX_TTL);
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if answers.len() >= MAX_CACHED {
            answers.retain(|_, (until, _, _)| *until > now);
        }
        if answers.len() < MAX_CACHED {
            answers.insert(key, (now + Duration::from_secs(ttl), ad, m.clone()));
        }
        Ok((ad, m))
    }
}

/// Whether the MX RRset of `domain` is authenticated (the MX names can then be trusted as the
/// names TLSA records are looked up for, RFC 7672 §2.2.1).
pub async fn mx_secure(cache: &Cache, servers: &[SocketAddr], domain: &str) -> bool {
    matches!(cache.query(servers, domain, RecordType::MX).await, Ok((true, _)))
}

/// The TLSA records of `host` on `port`.
pub async fn host_tlsa(cache: &Cache, servers: &[SocketAddr], host: &str, port: u16) -> HostTlsa {
    let (ad, answer) = match cache.query(servers, &format!("_{port}._tcp.{host}"), RecordType::TLSA).await {
        Ok(a) => a,
        Err(e) => return HostTlsa::Unusable(format!("TLSA lookup for {host} failed: {e}")),
    };
    if !ad {
        return HostTlsa::None;
    }
    let records: Vec<Tlsa> = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::TLSA(t) => Some(Tlsa {
                usage: t.cert_usage.into(),
                selector: t.selector.into(),
                matching: t.matching.into(),
                data: t.cert_data.clone(),
            }),
            _ => None,
        })
        .take(32)
        .collect();
    if records.is_empty() {
        return HostTlsa::None;
    }
    let usable: Vec<Tlsa> = records.into_iter().filter(Tlsa::usable).collect();
    if usable.is_empty() {
        HostTlsa::Encrypt
    } else {
        HostTlsa::Verify(usable)
    }
}

/// Checks the server's certificate against TLSA records.
#[derive(Debug)]
struct DaneVerifier {
    tlsa: Vec<Tlsa>,
    host: String,
    provider: Arc<CryptoProvider>,
    /// The handshake signature checks, which do not depend on the certificate's trust.
    signatures: AnyCertificate,
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.tlsa.iter().any(|t| t.usage == 3 && t.matches(end_entity)) {
            return Ok(ServerCertVerified::assertion());
        }
        for t in self.tlsa.iter().filter(|t| t.usage == 2) {
            for anchor in intermediates.iter().filter(|c| t.matches(c)) {
                let mut roots = RootCertStore::empty();
                if roots.add(anchor.clone().into_owned()).is_err() {
                    continue;
                }
                let Ok(v) = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone()).build()
                else {
                    continue;
                };
                if v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now).is_ok() {
                    return Ok(ServerCertVerified::assertion());
                }
            }
        }
        Err(rustls::Error::General(format!(
            "TLSA mismatch: no certificate of {} matches its {} DNSSEC-authenticated TLSA record(s)",
            self.host,
            self.tlsa.len()
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

/// A client configuration that accepts only what `tlsa` names for `host`.
pub fn client_config(host: &str, tlsa: Vec<Tlsa>) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = DaneVerifier {
        tlsa,
        host: host.to_string(),
        provider: provider.clone(),
        signatures: AnyCertificate(provider.clone()),
    };
    let c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS client configuration: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_a_certificate() {
        let cert = test_cert();
        let der = CertificateDer::from(cert.clone());
        let spki = webpki::EndEntityCert::try_from(&der).unwrap().subject_public_key_info().as_ref().to_vec();
        let sha256 = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b).as_ref().to_vec();
        let sha512 = |b: &[u8]| ring::digest::digest(&ring::digest::SHA512, b).as_ref().to_vec();
        let t = |usage, selector, matching, data| Tlsa { usage, selector, matching, data };
        for (rec, want) in [
            (t(3, 1, 1, sha256(&spki)), true),
            (t(3, 0, 1, sha256(&cert)), true),
            (t(3, 0, 2, sha512(&cert)), true),
            (t(3, 1, 0, spki.clone()), true),
            (t(3, 0, 0, cert.clone()), true),
            (t(3, 1, 1, sha256(b"another key")), false),
            (t(3, 1, 2, sha256(&spki)), false),
        ] {
            assert_eq!(rec.matches(&der), want, "{} {} {}", rec.usage, rec.selector, rec.matching);
        }
        for (rec, usable) in [
            (t(3, 1, 1, vec![]), true),
            (t(2, 0, 1, vec![]), true),
            (t(1, 1, 1, vec![]), false),
            (t(0, 0, 1, vec![]), false),
            (t(3, 2, 1, vec![]), false),
            (t(3, 1, 3, vec![]), false),
        ] {
            assert_eq!(rec.usable(), usable);
        }
    }

    fn test_cert() -> Vec<u8> {
        rcgen::generate_simple_self_signed(vec!["mx.example.test".to_string()]).unwrap().cert.der().to_vec()
    }
}
