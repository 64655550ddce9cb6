//! DNS, shared by every actor that resolves: where a domain's mail goes for remote delivery (MX
//! records in preference order, equal preferences shuffled; the implicit MX; RFC 7505 null MX;
//! address lookups — every answer classified as a host list, a permanent failure or a temporary
//! one) and the forward-confirmed reverse name of a client for the Listener.

use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;

use crate::delivery::{replies, Outcome};
use crate::metrics::{Metrics, ResultLabel};

/// At most this many MX hosts are tried, and this many addresses per host: a hostile zone
/// cannot make one delivery attempt walk thousands of targets.
pub const MAX_MX_HOSTS: usize = 10;
pub const MAX_ADDRESSES_PER_HOST: usize = 4;

/// One MX host (or the domain itself, for the implicit MX).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    pub name: String,
    pub preference: u16,
}

pub struct Dns {
    resolver: TokioResolver,
    metrics: Arc<Metrics>,
}

/// Orders MX records by preference and shuffles each group of equal preference (RFC 5321 §5.1),
/// using `seed` so that tests can check the result.
/// The resolvers of /etc/resolv.conf (empty when it cannot be read).
pub fn system_nameservers() -> Vec<SocketAddr> {
    match hickory_resolver::system_conf::read_system_conf() {
        Ok((config, _)) => config
            .name_servers()
            .iter()
            .flat_map(|ns| ns.connections.iter().map(move |c| SocketAddr::new(ns.ip, c.port)))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
        Err(_) => Vec::new(),
    }
}

pub fn order_mx(mut hosts: Vec<MxHost>, seed: u64) -> Vec<MxHost> {
    hosts.sort_by_key(|h| h.preference);
    let mut state = seed | 1;
    let mut rand = move || {
        // xorshift64: a load spreader, not cryptography.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut start = 0;
    while start < hosts.len() {
        let end = hosts[start..]
            .iter()
            .position(|h| h.preference != hosts[start].preference)
            .map_or(hosts.len(), |n| start + n);
        for i in (start + 1..end).rev() {
            let j = start + (rand() % (i - start + 1) as u64) as usize;
            hosts.swap(i, j);
        }
        start = end;
    }
    hosts
}

fn random_seed() -> u64 {
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// Turns a domain into the absolute name we query, so no search list is ever appended.
fn absolute(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

impl Dns {
    /// `nameservers` empty = the system resolver configuration (`/etc/resolv.conf`).
    pub fn new(nameservers: &[SocketAddr], timeout: Duration, metrics: Arc<Metrics>) -> Result<Dns, String> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if nameservers.is_empty() {
            match TokioResolver::builder(provider.clone()) {
                Ok(b) => b,
                Err(e) => {
                    // Start anyway: local delivery works, and remote mail waits (temporary
                    // failures) until the operator fixes resolv.conf or sets delivery.nameservers.
                    tracing::error!(error = %e, "cannot read the system DNS configuration; remote delivery will fail until it is fixed");
                    TokioResolver::builder_with_config(ResolverConfig::from_name_servers(Vec::new()), provider)
                }
            }
        } else {
            let servers = nameservers
                .iter()
                .map(|a| {
                    let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                    for c in &mut ns.connections {
                        c.port = a.port();
                    }
                    ns
                })
                .collect();
            let mut b = TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider);
            b.options_mut().use_hosts_file = ResolveHosts::Never;
            b
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 1;
        // Retries are the queue's job; a short cache keeps a burst to one domain to one lookup.
        opts.positive_max_ttl = Some(Duration::from_secs(300));
        opts.negative_max_ttl = Some(Duration::from_secs(30));
        let resolver = builder.build().map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
        Ok(Dns { resolver, metrics })
    }

    /// The resolver itself (a handle: clones share its cache), for the inbound checks.
    pub fn resolver(&self) -> TokioResolver {
        self.resolver.clone()
    }

    fn count(&self, result: &'static str) {
        self.metrics.dns_queries.get_or_create(&ResultLabel { result }).inc();
    }

    /// The hosts to try for `domain`, best first.
    pub async fn mx_hosts(&self, domain: &str) -> Result<Vec<MxHost>, Outcome> {
        match self.resolver.lookup(absolute(domain), RecordType::MX).await {
            Ok(lookup) => {
                self.count("ok");
                let mut hosts = Vec::new();
                let mut null_mx = false;
                for record in lookup.answers() {
                    if let RData::MX(mx) = &record.data {
                        if mx.exchange.is_root() {
                            null_mx = true;
                            continue;
                        }
                        let name = mx.exchange.to_ascii();
                        hosts.push(MxHost { name: name.trim_end_matches('.').to_string(), preference: mx.preference });
                    }
                }
                if null_mx && hosts.is_empty() {
                    return Err(replies::null_mx(domain));
                }
                if hosts.is_empty() {
                    // Answers of other types only (e.g. a CNAME chain without MX): implicit MX.
                    return Ok(vec![MxHost { name: domain.to_string(), preference: 0 }]);
                }
                let mut hosts = order_mx(hosts, random_seed());
                hosts.truncate(MAX_MX_HOSTS);
                Ok(hosts)
            }
            Err(e) if e.is_nx_domain() => {
                self.count("nxdomain");
                Err(replies::nxdomain(domain))
            }
            Err(e) if e.is_no_records_found() => {
                self.count("nodata");
                Ok(vec![MxHost { name: domain.to_string(), preference: 0 }])
            }
            Err(e) => {
                self.count("error");
                Err(temporary_dns(domain, "MX", &e))
            }
        }
    }

    /// The client's name by reverse DNS, confirmed forward (one of the PTR names has `ip` among
    /// its addresses); `None` when there is none or DNS fails.
    pub async fn verified_name(&self, ip: IpAddr) -> Option<String> {
        let lookup = self.resolver.lookup(Name::from(ip.to_canonical()), RecordType::PTR).await.ok()?;
        for record in lookup.answers().iter().take(3) {
            if let RData::PTR(ptr) = &record.data {
                let name = ptr.0.to_ascii().trim_end_matches('.').to_string();
                if let Ok(ips) = self.resolver.lookup_ip(absolute(&name)).await {
                    if ips.iter().any(|a| a == ip.to_canonical()) {
                        return Some(name);
                    }
                }
            }
        }
        None
    }

    /// The addresses of one host. `Ok(empty)` when the name exists without addresses or does
    /// not exist; `Err` only for a failure worth retrying (timeout, SERVFAIL).
    /// The TXT records of `name`, each with its strings joined (RFC 7208 §3.3); empty when
    /// there are none. At most 16 records of 4 KiB are kept: what follows is a hostile answer.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, Outcome> {
        match self.resolver.lookup(absolute(name), RecordType::TXT).await {
            Ok(lookup) => {
                self.count("ok");
                let mut out = Vec::new();
                for record in lookup.answers() {
                    if let RData::TXT(txt) = &record.data {
                        let joined: Vec<u8> = txt.txt_data.iter().flat_map(|s| s.iter().copied()).take(4096).collect();
                        out.push(String::from_utf8_lossy(&joined).into_owned());
                    }
                }
                out.truncate(16);
                Ok(out)
            }
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
                self.count(if e.is_nx_domain() { "nxdomain" } else { "nodata" });
                Ok(Vec::new())
            }
            Err(e) => {
                self.count("error");
                Err(temporary_dns(name, "TXT", &e))
            }
        }
    }

    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, Outcome> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        match self.resolver.lookup_ip(absolute(host)).await {
            Ok(ips) => {
                self.count("ok");
                let mut out: Vec<IpAddr> = ips.iter().filter(|ip| !ip.is_unspecified() && !ip.is_multicast()).collect();
                out.dedup();
                out.truncate(MAX_ADDRESSES_PER_HOST);
                Ok(out)
            }
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
                self.count(if e.is_nx_domain() { "nxdomain" } else { "nodata" });
                Ok(Vec::new())
            }
            Err(e) => {
                self.count("error");
                Err(temporary_dns(host, "A/AAAA", &e))
            }
        }
    }
}

fn temporary_dns(name: &str, kind: &str, e: &NetError) -> Outcome {
    replies::dns_failed(kind, name, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, preference: u16) -> MxHost {
        MxHost { name: name.into(), preference }
    }

    #[test]
    fn mx_order() {
        let hosts = vec![h("c", 20), h("a", 10), h("b", 10), h("d", 30), h("e", 10)];
        let mut seen_first = std::collections::HashSet::new();
        for seed in 0..200u64 {
            let got = order_mx(hosts.clone(), seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let prefs: Vec<u16> = got.iter().map(|h| h.preference).collect();
            assert_eq!(prefs, vec![10, 10, 10, 20, 30]);
            assert_eq!(&got[3..], &[h("c", 20), h("d", 30)]);
            seen_first.insert(got[0].name.clone());
        }
        // Equal preferences really are spread.
        assert_eq!(seen_first.len(), 3, "{seen_first:?}");
        assert_eq!(order_mx(vec![], 1), vec![]);
        assert_eq!(absolute("example.test"), "example.test.");
        assert_eq!(absolute("example.test."), "example.test.");
    }
}
