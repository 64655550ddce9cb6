//! MTA-STS (RFC 8461): a domain's published promise that its MX hosts have certificates that
//! verify. The `_mta-sts.<domain>` TXT record names the current policy id; the policy itself is
//! fetched over HTTPS from `https://mta-sts.<domain>/.well-known/mta-sts.txt` (certificate
//! checked, no redirects, at most 64 KiB, 10 s) and cached — in memory, and on disk in
//! `<Mailroot>/Cache/mta-sts/` so a restart does not forget it — for its `max_age`.
//!
//! Invariants: a failed refresh keeps the cached policy (never a downgrade); a policy is
//! fetched again only when the TXT id changes or it has expired; `*.example.net` matches exactly
//! one leftmost label.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};

use crate::clock::unix_now;
use crate::resolve::Dns;

/// The largest policy file we read (RFC 8461 §3.3 suggests 64 KiB as the limit).
const MAX_POLICY: usize = 64 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// max_age is capped (RFC 8461 §3.2: at most 31557600) and floored so a tiny one cannot
/// make us fetch at every message.
const MAX_AGE_CAP: u64 = 31_557_600;
const MAX_AGE_FLOOR: u64 = 300;
/// Policies kept in memory at most.
const MAX_CACHED: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub id: String,
    pub mode: Mode,
    /// MX patterns: `mx.example.net` or `*.example.net`.
    pub mx: Vec<String>,
    pub max_age: u64,
    /// When it was fetched (Unix seconds).
    pub fetched_at: u64,
}

impl Policy {
    /// Parses a policy file (RFC 8461 §3.2): `key: value` lines, CRLF or LF.
    pub fn parse(text: &str, id: &str, now: u64) -> Result<Policy, String> {
        let (mut version, mut mode, mut max_age, mut mx) = (None, None, None, Vec::new());
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else { return Err(format!("not key: value: {line:?}")) };
            let v = v.trim();
            match k.trim() {
                "version" => version = Some(v.to_string()),
                "mode" => {
                    mode = Some(match v {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        other => return Err(format!("unknown mode {other:?}")),
                    })
                }
                "max_age" => max_age = Some(v.parse::<u64>().map_err(|_| format!("max_age {v:?} is not a number"))?),
                // At most 64 patterns are kept: a hostile policy cannot make matching costly.
                "mx" if mx.len() < 64 => mx.push(v.trim_end_matches('.').to_ascii_lowercase()),
                "mx" => {}
                _ => {} // Unknown keys are ignored (RFC 8461 §3.2).
            }
        }
        if version.as_deref() != Some("STSv1") {
            return Err("version is not STSv1".into());
        }
        let mode = mode.ok_or("no mode")?;
        let max_age = max_age.ok_or("no max_age")?.clamp(MAX_AGE_FLOOR, MAX_AGE_CAP);
        if mode != Mode::None && mx.is_empty() {
            return Err("no mx".into());
        }
        Ok(Policy { id: id.to_string(), mode, mx, max_age, fetched_at: now })
    }

    /// Whether the MX host `host` is one the policy names.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            // Exactly one label in place of the star.
            Some(suffix) => host
                .strip_suffix(suffix)
                .and_then(|h| h.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            None => *p == host,
        })
    }

    fn fresh(&self, now: u64) -> bool {
        now < self.fetched_at.saturating_add(self.max_age)
    }
}

/// The id in a `_mta-sts` TXT record set; `None` unless exactly one record is `v=STSv1`.
pub fn txt_id(records: &[String]) -> Option<String> {
    use mail_auth::common::parse::TxtRecordParser;
    let sts: Vec<mail_auth::mta_sts::MtaSts> = records
        .iter()
        .filter(|r| r.trim_start().starts_with("v=STSv1"))
        .filter_map(|r| mail_auth::mta_sts::MtaSts::parse(r.as_bytes()).ok())
        .collect();
    match sts.as_slice() {
        [one] => Some(one.id.clone()),
        _ => None,
    }
}

/// Policies by domain, with their disk copies.
pub struct Policies {
    memory: Mutex<HashMap<String, Policy>>,
    /// Domains whose policy is being fetched: one fetch per domain at a time, so a burst of
    /// mail to a new domain fetches once (the others go on with what is cached, if anything).
    fetching: Mutex<std::collections::HashSet<String>>,
    dir: Option<PathBuf>,
    port: u16,
}

impl Policies {
    /// `dir`: where policies are kept across restarts (`None`: memory only). `port`: the HTTPS
    /// port of policy hosts (443; tests use others).
    pub fn new(dir: Option<PathBuf>, port: u16) -> Policies {
        Policies { memory: Mutex::new(HashMap::new()), fetching: Mutex::default(), dir, port }
    }

    /// The policy in force for `domain`, refreshed as RFC 8461 §5.1 says. `None` = none.
    pub async fn get(&self, domain: &str, dns: &Dns, tls: &Arc<rustls::ClientConfig>) -> Option<Policy> {
        let now = unix_now();
        let cached = self.cached(domain);
        let txt = dns.txt(&format!("_mta-sts.{domain}")).await.ok().and_then(|r| txt_id(&r));
        match (&cached, &txt) {
            // Same id and not expired: no fetch.
            (Some(p), Some(id)) if p.id == *id && p.fresh(now) => return cached,
            (Some(p), None) if p.fresh(now) => return cached,
            (None, None) => return None,
            _ => {}
        }
        let id = txt.unwrap_or_else(|| cached.as_ref().map(|p| p.id.clone()).unwrap_or_default());
        if !self.fetching.lock().unwrap_or_else(|e| e.into_inner()).insert(domain.to_string()) {
            return cached;
        }
        let fetched = fetch(domain, self.port, dns, tls).await.and_then(|text| Policy::parse(&text, &id, now));
        self.fetching.lock().unwrap_or_else(|e| e.into_inner()).remove(domain);
        match fetched {
            Ok(p) => {
                self.store(domain, &p);
                Some(p)
            }
            Err(e) => {
                tracing::info!(domain, error = %e, "MTA-STS policy fetch failed; keeping what we had");
                // A failed refresh never downgrades: the old policy stays, even expired.
                cached
            }
        }
    }

    fn cached(&self, domain: &str) -> Option<Policy> {
        if let Some(p) = self.memory.lock().unwrap_or_else(|e| e.into_inner()).get(domain) {
            return Some(p.clone());
        }
        let path = self.dir.as_ref()?.join(file_name(domain));
        let p: Policy = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        self.remember(domain, &p);
        Some(p)
    }

    fn remember(&self, domain: &str, p: &Policy) {
        let mut m = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_CACHED && !m.contains_key(domain) {
            let now = unix_now();
            m.retain(|_, p| p.fresh(now));
            if m.len() >= MAX_CACHED {
                return;
            }
        }
        m.insert(domain.to_string(), p.clone());
    }

    fn store(&self, domain: &str, p: &Policy) {
        self.remember(domain, p);
        let Some(dir) = &self.dir else { return };
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            let tmp = dir.join(format!(".{}.tmp", file_name(domain)));
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&serde_json::to_vec(p).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join(file_name(domain)))
        };
        if let Err(e) = write() {
            tracing::warn!(domain, error = %e, "cannot keep the MTA-STS policy on disk");
        }
    }
}

/// A domain as a file name: domains are letters, digits, '-' and '.', anything else is hex.
fn file_name(domain: &str) -> String {
    domain
        .chars()
        .map(
            |c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c.to_string()
                } else {
                    format!("%{:x}", c as u32)
                }
            },
        )
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

/// GETs the policy file with a verified certificate, no redirects, a bounded body and time.
async fn fetch(domain: &str, port: u16, dns: &Dns, tls: &Arc<rustls::ClientConfig>) -> Result<String, String> {
    let host = format!("mta-sts.{domain}");
    let work = async {
        let ips = dns.addresses(&host).await.map_err(|o| o.text)?;
        let ip = ips.first().ok_or_else(|| format!("{host} has no address"))?;
        let tcp =
            tokio::net::TcpStream::connect(SocketAddr::new(*ip, port)).await.map_err(|e| format!("{host}: {e}"))?;
        let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        // The connection's own task ends with the fetch's time limit too: a server that holds
        // the connection open cannot keep a task (and its socket) alive.
        tokio::task::spawn_local(async move {
            let _ = tokio::time::timeout(FETCH_TIMEOUT, conn).await;
        });
        let req = hyper::Request::get("/.well-known/mta-sts.txt")
            .header("host", &host)
            .header("user-agent", "mailroot")
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != hyper::StatusCode::OK {
            // Redirects included: RFC 8461 §3.3 forbids following them.
            return Err(format!("{host} answered HTTP {}", resp.status()));
        }
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Some(data) = frame.data_ref() {
                if out.len() + data.len() > MAX_POLICY {
                    return Err(format!("the policy of {domain} is over {MAX_POLICY} bytes"));
                }
                out.extend_from_slice(data);
            }
        }
        String::from_utf8(out).map_err(|_| "the policy is not UTF-8".to_string())
    };
    tokio::time::timeout(FETCH_TIMEOUT, work).await.map_err(|_| format!("fetching the policy of {domain} timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        let p = Policy::parse(
            "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.Example.NET.\r\nmax_age: 86400\r\nextension: x\r\n",
            "id1",
            0,
        )
        .unwrap();
        assert_eq!((p.mode, p.max_age, p.mx.len()), (Mode::Enforce, 86400, 2));
        for (host, want) in [
            ("mx1.example.com", true),
            ("MX1.example.com.", true),
            ("mx2.example.com", false),
            ("a.example.net", true),
            ("a.b.example.net", false),
            ("example.net", false),
            ("aexample.net", false),
        ] {
            assert_eq!(p.allows(host), want, "{host}");
        }
        let bad = [
            "mode: enforce\nmx: a\nmax_age: 1\n",                  // no version
            "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",   // unknown mode
            "version: STSv1\nmode: enforce\nmax_age: 1\n",         // no mx
            "version: STSv1\nmode: enforce\nmx: a\n",              // no max_age
            "version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n", // bad number
            "<html>not a policy</html>",
        ];
        for b in bad {
            assert!(Policy::parse(b, "x", 0).is_err(), "{b}");
        }
        let none = Policy::parse("version: STSv1\nmode: none\nmax_age: 99999999999\n", "x", 0).unwrap();
        assert_eq!(none.max_age, MAX_AGE_CAP);
        assert_eq!(
            Policy::parse("version: STSv1\nmode: testing\nmx: a\nmax_age: 1\n", "x", 0).unwrap().max_age,
            MAX_AGE_FLOOR
        );
    }

    #[test]
    fn txt_records() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(txt_id(&s(&["v=STSv1; id=20261202T01;"])), Some("20261202T01".into()));
        assert_eq!(txt_id(&s(&["v=spf1 -all", "v=STSv1; id=abc"])), Some("abc".into()));
        assert_eq!(txt_id(&s(&["v=STSv1; id=a", "v=STSv1; id=b"])), None, "two records: none (RFC 8461 §3.1)");
        assert_eq!(txt_id(&s(&["v=spf1 -all"])), None);
        assert_eq!(file_name("example.com"), "example.com");
        assert_eq!(file_name("../x/y"), "%2fx%2fy");
    }
}
