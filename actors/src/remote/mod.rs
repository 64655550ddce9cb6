//! The RemoteDelivery actor: delivers `Deliver` requests for non-local domains over SMTP —
//! grouped by domain, routed through MX records or a smart host, over pooled connections within
//! global and per-domain limits.
//!
//! Invariants:
//! - Every recipient of a request gets exactly one result, whatever DNS or the peers do.
//! - An open connection holds one global and one per-route permit for its whole life, idle or
//!   not; a request that needs a permit held by an idle connection closes that connection first,
//!   so idle connections never starve new routes.
//! - A connection goes back to the pool only after a clean transaction, and at most
//!   `max_messages_per_connection` transactions run on it.

mod attempt;
pub mod connection;
pub mod dane;
mod mta_sts;
mod pool;
mod throttle;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::Semaphore;
use tracing::warn;

use crate::clock::unix_now;
use crate::delivery::{replies, Deliver, DeliveryRecipient, DeliveryReport, Outcome, RecipientResult};
use crate::metrics::{Metrics, PolicyLabel};
use crate::protocol::client::is_eight_bit;
use crate::protocol::dsn::MessageDsn;
use crate::protocol::LocalDomains;
use crate::resolve::{Dns, MxHost};
use crate::tlsrpt::Session;
pub use connection::Credentials;
use connection::{Connection, Failure, Security, Timeouts};
use pool::{Acquired, Permits, Pool};
pub use tls::TlsPolicy;

fn limits_closed() -> Failure {
    Failure { outcome: replies::limits_closed(), try_next_host: false, tls_failed: false, peer_reply: false }
}

/// A relay host: `host`, `host:port`, `[host]` or `[192.0.2.1]:25`. Brackets skip the MX lookup
/// (as in IIS): the name's own addresses are used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartHost {
    pub host: String,
    pub port: Option<u16>,
    pub mx_lookup: bool,
}

impl SmartHost {
    pub fn parse(s: &str) -> Result<SmartHost, String> {
        let s = s.trim();
        let bad = || format!("{s:?} is not host, host:port, [host] or [host]:port");
        if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').and_then(|p| p.parse().ok()).ok_or_else(bad)?),
            };
            if host.is_empty() {
                return Err(bad());
            }
            return Ok(SmartHost { host: host.to_string(), port, mx_lookup: false });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse().map_err(|_| bad())?)),
            None => (s, None),
        };
        if host.is_empty() || host.contains([' ', '[', ']']) {
            return Err(bad());
        }
        let is_ip = host.parse::<IpAddr>().is_ok();
        Ok(SmartHost { host: host.to_string(), port, mx_lookup: !is_ip })
    }
}

/// Settings of one remote domain (`[domains.remote."example.org"]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainPolicy {
    pub smart_host: Option<SmartHost>,
    /// This domain's TLS policy; `None` = the default for its route (MX or smart host).
    pub tls: Option<TlsPolicy>,
    /// Login at this domain's smart host.
    pub auth: Option<Credentials>,
    /// Overrides of the delivery limits for this destination.
    pub max_recipients: Option<usize>,
    pub max_connections: Option<usize>,
    pub messages_per_minute: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSettings {
    pub helo_name: String,
    pub remote_port: u16,
    pub nameservers: Vec<SocketAddr>,
    pub dns_timeout: Duration,
    pub smart_host: Option<SmartHost>,
    /// Try the MX hosts first and the smart host only when they fail temporarily.
    pub direct_before_smart_host: bool,
    pub max_connections: usize,
    pub max_connections_per_domain: usize,
    pub max_messages_per_connection: usize,
    pub timeouts: Timeouts,
    /// Opportunistic STARTTLS.
    pub starttls: bool,
    /// Rewrites a local domain in MAIL FROM to this one.
    pub masquerade_domain: Option<String>,
    pub local_domains: LocalDomains,
    /// Per-domain policies, by lower-case domain.
    pub domains: BTreeMap<String, DomainPolicy>,
    /// How long an idle connection stays in the pool.
    pub idle_timeout: Duration,
    /// TLS policy of MX delivery (`opportunistic` unless set).
    pub tls_policy: TlsPolicy,
    /// TLS policy of the smart host (`verify` unless set).
    pub smart_host_tls: TlsPolicy,
    /// Trusted roots for `verify` instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Login at the smart host.
    pub smart_host_auth: Option<Credentials>,
    /// Credentials may be sent over a connection that is not TLS with a verified certificate.
    pub allow_unverified_auth: bool,
    /// Smart hosts speak TLS from the first byte (RFC 8314), as those on port 465 always do.
    pub smart_host_implicit_tls: bool,
    /// Recipients per transaction at most (the rest go in further transactions at once).
    pub max_recipients_per_transaction: usize,
    /// Messages per minute to one destination (domain or smart host); 0 = no limit.
    pub messages_per_minute_per_domain: u32,
    /// Honour MTA-STS policies of domains without a `tls_policy` of their own.
    pub mta_sts: bool,
    /// The HTTPS port of `mta-sts.<domain>` (443; tests use others).
    pub mta_sts_port: u16,
    /// Where fetched MTA-STS policies are kept across restarts.
    pub cache_dir: Option<PathBuf>,
    /// DANE with the AD bit of the resolver (which must validate, and be trusted).
    pub dane: bool,
}

impl Default for RemoteSettings {
    fn default() -> Self {
        RemoteSettings {
            helo_name: "localhost".into(),
            remote_port: 25,
            nameservers: Vec::new(),
            dns_timeout: Duration::from_secs(10),
            smart_host: None,
            direct_before_smart_host: false,
            max_connections: 1000,
            max_connections_per_domain: 100,
            max_messages_per_connection: 100,
            timeouts: Timeouts {
                connect: Duration::from_secs(30),
                command: Duration::from_secs(300),
                data: Duration::from_secs(600),
            },
            starttls: true,
            masquerade_domain: None,
            local_domains: LocalDomains::new(Vec::<String>::new()),
            domains: BTreeMap::new(),
            idle_timeout: Duration::from_secs(10),
            tls_policy: TlsPolicy::Opportunistic,
            smart_host_tls: TlsPolicy::Verify,
            ca_file: None,
            smart_host_auth: None,
            allow_unverified_auth: false,
            smart_host_implicit_tls: false,
            max_recipients_per_transaction: 50,
            messages_per_minute_per_domain: 0,
            mta_sts: true,
            mta_sts_port: 443,
            cache_dir: None,
            dane: false,
        }
    }
}

/// The key of a destination: its domain, or the smart host it goes through.
fn route_key(domain: &str, smart_host: Option<&SmartHost>, remote_port: u16) -> String {
    match smart_host {
        Some(sh) => format!("smarthost:{}:{}", sh.host, sh.port.unwrap_or(remote_port)),
        None => domain.to_string(),
    }
}

/// How one route's connections use TLS and log in.
struct RouteSecurity {
    tls: TlsPolicy,
    /// The policy's name in metrics: the TLS policy's, or `mta-sts` when one made it `verify`.
    label: &'static str,
    auth: Option<Credentials>,
    /// TLS from the first byte (the smart host's port is 465, RFC 8314).
    implicit: bool,
    /// DANE's verdict per MX host name, when the domain's MX records are DNSSEC-authenticated.
    dane: HashMap<String, DaneHost>,
    /// The domain's MTA-STS policy is in `testing` mode: verify, count, deliver anyway.
    sts_testing: bool,
    /// MX delivery: the domain and policy type (`sts`, `no-policy-found`) TLS reports count
    /// its sessions under (`tlsa` for hosts DANE applies to).
    report: Option<(String, &'static str)>,
}

/// How far a host's connection has fallen back after failed TLS handshakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// As the route's policy says.
    AsPolicy,
    /// Any certificate (after a failed verification under MTA-STS `testing`).
    AnyCertificate,
    /// No TLS (only under `opportunistic`).
    ClearText,
}

/// How DANE treats one MX host.
enum DaneHost {
    /// Its certificate must match its TLSA records.
    Verify(Arc<rustls::ClientConfig>),
    /// TLS is required, any certificate (authenticated TLSA records, none usable).
    Encrypt,
    /// The TLSA lookup failed: the host is not used now.
    Unusable(String),
}

/// Where one domain's mail goes.
#[derive(Debug, Clone)]
enum Route {
    Mx(String),
    Smart(SmartHost),
}

struct Inner {
    settings: RemoteSettings,
    dns: Dns,
    tls: tls::TlsConfigs,
    pool: Pool,
    metrics: Arc<Metrics>,
    throttle: throttle::Throttle,
    policies: mta_sts::Policies,
    /// The resolvers DANE asks (with the AD bit): `nameservers`, or the system's.
    dane_servers: Vec<SocketAddr>,
    dane_cache: dane::Cache,
}

pub struct RemoteDelivery {
    inner: Arc<Inner>,
}

impl RemoteDelivery {
    /// Must be called inside the arbiter that will run the actor (the resolver spawns there).
    pub fn new(settings: RemoteSettings, metrics: Arc<Metrics>) -> Result<Self, String> {
        let dns = Dns::new(&settings.nameservers, settings.dns_timeout, metrics.clone())?;
        let tls = tls::TlsConfigs::new(settings.ca_file.as_deref())?;
        let overrides = settings
            .domains
            .iter()
            .filter_map(|(d, p)| Some((route_key(d, p.smart_host.as_ref(), settings.remote_port), p.max_connections?)))
            .collect();
        let pool = Pool::new(
            Arc::new(Semaphore::new(settings.max_connections)),
            settings.max_connections_per_domain,
            overrides,
            metrics.clone(),
        );
        let throttle = throttle::Throttle::default();
        let policies =
            mta_sts::Policies::new(settings.cache_dir.as_ref().map(|d| d.join("mta-sts")), settings.mta_sts_port);
        let dane_servers = if settings.nameservers.is_empty() {
            crate::resolve::system_nameservers()
        } else {
            settings.nameservers.clone()
        };
        let dane_cache = dane::Cache::default();
        let inner = Inner { settings, dns, tls, pool, metrics, throttle, policies, dane_servers, dane_cache };
        Ok(RemoteDelivery { inner: Arc::new(inner) })
    }
}

impl Actor for RemoteDelivery {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Requests are bounded by the Queue's in-flight limit; this is only a safety margin.
        ctx.set_mailbox_capacity(1024);
        let every = (self.inner.settings.idle_timeout / 2).max(Duration::from_millis(500));
        ctx.run_interval(every, |act, _| act.inner.pool.expire(act.inner.settings.idle_timeout));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.inner.pool.close_all();
    }
}

impl Handler<Deliver> for RemoteDelivery {
    type Result = ResponseFuture<DeliveryReport>;

    fn handle(&mut self, req: Deliver, _ctx: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.deliver(req).await })
    }
}

/// What one domain's delivery needs, shared by its recipients.
struct Job {
    id: u64,
    sender: String,
    message: Arc<Vec<u8>>,
    /// Dot-stuffed once per message, on first use.
    data: Arc<tokio::sync::OnceCell<Vec<u8>>>,
    dsn: MessageDsn,
    eight_bit: bool,
}

impl Inner {
    async fn deliver(self: Arc<Self>, req: Deliver) -> DeliveryReport {
        let mut by_domain: BTreeMap<String, Vec<DeliveryRecipient>> = BTreeMap::new();
        for r in req.recipients {
            let domain = r.address.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()).unwrap_or_default();
            by_domain.entry(domain).or_default().push(r);
        }
        let job = Arc::new(Job {
            id: req.id,
            sender: req.sender,
            eight_bit: is_eight_bit(&req.message),
            message: req.message,
            data: Arc::new(tokio::sync::OnceCell::new()),
            dsn: req.dsn,
        });
        let mut tasks = tokio::task::JoinSet::new();
        let mut owners = std::collections::HashMap::new();
        for (domain, rcpts) in by_domain {
            let (inner, job) = (self.clone(), job.clone());
            let indices: Vec<usize> = rcpts.iter().map(|r| r.index).collect();
            let handle = tasks.spawn_local(async move { inner.deliver_domain(&job, &domain, rcpts).await });
            owners.insert(handle.id(), indices);
        }
        let mut results = Vec::new();
        while let Some(done) = tasks.join_next_with_id().await {
            match done {
                Ok((_, mut r)) => results.append(&mut r),
                Err(e) => {
                    // A panic in one domain's delivery: its recipients are retried later.
                    warn!(id = job.id, error = %e, "a domain delivery task failed");
                    for index in owners.remove(&e.id()).unwrap_or_default() {
                        results.push(RecipientResult::new(index, replies::internal_error(&e)));
                    }
                }
            }
        }
        DeliveryReport { results }
    }

    fn route_for(&self, domain: &str) -> (Option<Route>, Option<Route>) {
        let policy = self.settings.domains.get(domain);
        if let Some(sh) = policy.and_then(|p| p.smart_host.clone()) {
            return (Some(Route::Smart(sh)), None);
        }
        match &self.settings.smart_host {
            Some(sh) if self.settings.direct_before_smart_host => {
                (Some(Route::Mx(domain.to_string())), Some(Route::Smart(sh.clone())))
            }
            Some(sh) => (Some(Route::Smart(sh.clone())), None),
            None => (Some(Route::Mx(domain.to_string())), None),
        }
    }

    async fn deliver_domain(&self, job: &Job, domain: &str, rcpts: Vec<DeliveryRecipient>) -> Vec<RecipientResult> {
        let fail_all = |o: Outcome, remote: Option<String>| -> Vec<RecipientResult> {
            rcpts.iter().map(|r| RecipientResult::new(r.index, o.clone().from_mta(remote.clone()))).collect()
        };
        // What every transaction for this domain needs to know.
        let smtputf8 = !job.sender.is_ascii() || rcpts.iter().any(|r| !r.address.is_ascii());
        let (first, fallback) = self.route_for(domain);
        let mut last = replies::no_route(domain);
        let mut last_remote = None;
        for route in [first, fallback].into_iter().flatten() {
            let key = self.key_of(&route);
            let rate = self
                .settings
                .domains
                .get(domain)
                .and_then(|p| p.messages_per_minute)
                .unwrap_or(self.settings.messages_per_minute_per_domain);
            if let Err(wait) = self.throttle.admit(&key, rate, Instant::now()) {
                let o = replies::held_back(&key, wait);
                return rcpts.iter().map(|r| RecipientResult::deferred(r.index, o.clone(), wait)).collect();
            }
            let (key, targets) = match self.targets(&route).await {
                Ok(t) => t,
                // A smart host that cannot be resolved is the operator's problem, never a
                // reason to bounce mail: it stays temporary whatever DNS says.
                Err(o) if o.is_permanent() && matches!(route, Route::Smart(_)) => {
                    last = replies::smart_host_unusable(&o);
                    last_remote = None;
                    continue;
                }
                Err(o) => {
                    last = o;
                    last_remote = None;
                    if last.is_permanent() && matches!(route, Route::Mx(_)) {
                        break;
                    }
                    continue;
                }
            };
            let mut sec = self.route_security(domain, &route);
            let mut targets = targets;
            // DANE takes precedence over MTA-STS (RFC 8461 §2): a domain with DANE is not
            // asked for its MTA-STS policy.
            let dane = self.apply_dane(domain, &route, &mut sec, &targets).await;
            let sts = if dane { Ok(()) } else { self.apply_mta_sts(domain, &route, &mut sec, &mut targets).await };
            if let Err(o) = sts {
                last = o;
                last_remote = None;
                continue;
            }
            let max_rcpts = self
                .settings
                .domains
                .get(domain)
                .and_then(|p| p.max_recipients)
                .unwrap_or(self.settings.max_recipients_per_transaction);
            match self.try_targets(job, &key, &targets, &rcpts, &sec, max_rcpts, smtputf8).await {
                Ok(results) => return self.heed_rate_limits(&key, results),
                Err((o, remote)) if remote.is_some() && throttle::is_rate_limit(&o) => {
                    let results =
                        rcpts.iter().map(|r| RecipientResult::new(r.index, o.clone().from_mta(remote.clone())));
                    return self.heed_rate_limits(&key, results.collect());
                }
                Err((o, remote)) => {
                    last = o;
                    last_remote = remote;
                    // A permanent answer from a real server is final; only temporary trouble
                    // sends the message on to the smart host.
                    if last.is_permanent() {
                        break;
                    }
                }
            }
        }
        fail_all(last, last_remote)
    }

    /// A destination that answered "slow down" is paused, and the recipients it said so for
    /// wait for the pause without counting an attempt.
    fn heed_rate_limits(&self, key: &str, mut results: Vec<RecipientResult>) -> Vec<RecipientResult> {
        let limited = results.iter().any(|r| r.outcome.remote_mta.is_some() && throttle::is_rate_limit(&r.outcome));
        if !limited {
            if results.iter().any(|r| r.outcome.is_delivered()) {
                self.throttle.went_through(key);
            }
            return results;
        }
        let pause = self.throttle.slow_down(key, Instant::now());
        self.metrics.rate_limited.inc();
        warn!(destination = %key, pause = ?pause, "the destination limits our rate; pausing it");
        for r in results.iter_mut() {
            if r.outcome.remote_mta.is_some() && throttle::is_rate_limit(&r.outcome) {
                r.retry_after = Some(pause);
            }
        }
        results
    }

    /// DANE (RFC 7672) for a domain without a TLS policy of its own, when `[delivery] dane` is
    /// on and its MX records are DNSSEC-authenticated: each MX host's authenticated TLSA
    /// records decide how it is used. True when DANE applies to at least one host.
    async fn apply_dane(
        &self,
        domain: &str,
        route: &Route,
        sec: &mut RouteSecurity,
        targets: &[(String, SocketAddr)],
    ) -> bool {
        let explicit = self.settings.domains.get(domain).is_some_and(|p| p.tls.is_some());
        if !matches!(route, Route::Mx(_)) || explicit || !self.settings.dane || self.dane_servers.is_empty() {
            return false;
        }
        if !dane::mx_secure(&self.dane_cache, &self.dane_servers, domain).await {
            return false;
        }
        let mut hosts = HashMap::new();
        for (host, _) in targets {
            if hosts.contains_key(host) {
                continue;
            }
            let verdict =
                match dane::host_tlsa(&self.dane_cache, &self.dane_servers, host, self.settings.remote_port).await {
                    dane::HostTlsa::Verify(tlsa) => match dane::client_config(host, tlsa) {
                        Ok(c) => DaneHost::Verify(c),
                        Err(e) => DaneHost::Unusable(e),
                    },
                    dane::HostTlsa::Encrypt => DaneHost::Encrypt,
                    dane::HostTlsa::Unusable(e) => DaneHost::Unusable(e),
                    dane::HostTlsa::None => continue,
                };
            hosts.insert(host.clone(), verdict);
        }
        if hosts.is_empty() {
            return false;
        }
        sec.dane = hosts;
        true
    }

    /// A domain without a TLS policy of its own that publishes an MTA-STS policy: `enforce`
    /// means only the MX hosts it names, with verified certificates; `testing` means deliver as
    /// before, but log and count what enforcing would have refused (the MX names only).
    async fn apply_mta_sts(
        &self,
        domain: &str,
        route: &Route,
        sec: &mut RouteSecurity,
        targets: &mut Vec<(String, SocketAddr)>,
    ) -> Result<(), Outcome> {
        let explicit = self.settings.domains.get(domain).is_some_and(|p| p.tls.is_some());
        let (Route::Mx(_), false, true, Ok(verified)) = (route, explicit, self.settings.mta_sts, &self.tls.verified)
        else {
            return Ok(());
        };
        let Some(policy) = self.policies.get(domain, &self.dns, verified).await else { return Ok(()) };
        let label = PolicyLabel { policy: "mta-sts", result: "failure" };
        match policy.mode {
            mta_sts::Mode::Enforce => {
                *sec = RouteSecurity {
                    tls: TlsPolicy::Verify,
                    label: "mta-sts",
                    auth: None,
                    implicit: false,
                    dane: HashMap::new(),
                    sts_testing: false,
                    report: Some((domain.to_string(), "sts")),
                };
                let before = targets.len();
                let first = targets.first().cloned();
                targets.retain(|(host, _)| policy.allows(host));
                if targets.is_empty() && before > 0 {
                    self.metrics.tls_policy.get_or_create(&label).inc();
                    if let Some((mx, ip)) = first {
                        let session =
                            Session::Failure { result_type: "validation-failure", mx: &mx, ip: ip.ip().to_string() };
                        self.metrics.tls_rpt.record(domain, "sts", session, unix_now());
                    }
                    return Err(replies::mta_sts_mx_mismatch(domain, &policy.mx));
                }
            }
            mta_sts::Mode::Testing => {
                sec.sts_testing = true;
                sec.report = Some((domain.to_string(), "sts"));
                if let Some((host, _)) = targets.iter().find(|(h, _)| !policy.allows(h)) {
                    let testing = PolicyLabel { policy: "mta-sts-testing", result: "failure" };
                    self.metrics.tls_policy.get_or_create(&testing).inc();
                    warn!(domain, host = %host, "MTA-STS (testing): MX host not in the policy; delivering anyway");
                }
            }
            mta_sts::Mode::None => {}
        }
        Ok(())
    }

    /// The key a route's connections are pooled, limited and throttled under.
    fn key_of(&self, route: &Route) -> String {
        match route {
            Route::Mx(domain) => route_key(domain, None, self.settings.remote_port),
            Route::Smart(sh) => route_key("", Some(sh), self.settings.remote_port),
        }
    }

    /// How connections of `route` (for `domain`) use TLS and log in.
    fn route_security(&self, domain: &str, route: &Route) -> RouteSecurity {
        let policy = self.settings.domains.get(domain);
        match route {
            Route::Smart(sh) => {
                let tls = policy.and_then(|p| p.tls).unwrap_or(self.settings.smart_host_tls);
                RouteSecurity {
                    tls,
                    label: tls.name(),
                    // A domain's own smart host logs in with the domain's credentials only.
                    auth: match policy.filter(|p| p.smart_host.is_some()) {
                        Some(p) => p.auth.clone(),
                        None => self.settings.smart_host_auth.clone(),
                    },
                    implicit: sh.port == Some(465) || self.settings.smart_host_implicit_tls,
                    dane: HashMap::new(),
                    sts_testing: false,
                    report: None,
                }
            }
            Route::Mx(_) => {
                let tls = policy.and_then(|p| p.tls).unwrap_or(self.settings.tls_policy);
                let report = Some((domain.to_string(), "no-policy-found"));
                RouteSecurity {
                    tls,
                    label: tls.name(),
                    auth: None,
                    implicit: false,
                    dane: HashMap::new(),
                    sts_testing: false,
                    report,
                }
            }
        }
    }

    /// The addresses to try for a route, best first, and the key its connections are pooled
    /// and limited under.
    async fn targets(&self, route: &Route) -> Result<(String, Vec<(String, SocketAddr)>), Outcome> {
        let (key, hosts, port) = match route {
            Route::Mx(domain) => (self.key_of(route), self.dns.mx_hosts(domain).await?, self.settings.remote_port),
            Route::Smart(sh) => {
                let port = sh.port.unwrap_or(self.settings.remote_port);
                let key = self.key_of(route);
                let hosts = if sh.mx_lookup {
                    self.dns.mx_hosts(&sh.host).await?
                } else {
                    vec![MxHost { name: sh.host.clone(), preference: 0 }]
                };
                (key, hosts, port)
            }
        };
        let mut targets = Vec::new();
        let mut dns_trouble = None;
        for h in &hosts {
            match self.dns.addresses(&h.name).await {
                Ok(ips) => targets.extend(ips.into_iter().map(|ip| (h.name.clone(), SocketAddr::new(ip, port)))),
                Err(o) => dns_trouble = Some(o),
            }
        }
        if targets.is_empty() {
            return Err(dns_trouble.unwrap_or_else(|| {
                let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
                replies::no_address(&names)
            }));
        }
        Ok((key, targets))
    }

    /// A pooled connection to `addr`, or a new one.
    async fn connection(
        &self,
        key: &str,
        host: &str,
        addr: SocketAddr,
        sec: &RouteSecurity,
        step: Step,
    ) -> Result<(Connection, Permits), Failure> {
        let clear_text = step == Step::ClearText;
        let permits = match self.pool.acquire(key, addr).await {
            // A retry after a failed handshake must not reuse a connection made otherwise.
            Some(Acquired::Pooled(c, p)) if step == Step::AsPolicy => return Ok((*c, p)),
            Some(Acquired::Pooled(c, p)) => {
                pool::close(*c, p);
                match self.pool.acquire(key, addr).await {
                    Some(Acquired::New(p)) => p,
                    Some(Acquired::Pooled(c, p)) => return Ok((*c, p)),
                    None => return Err(limits_closed()),
                }
            }
            Some(Acquired::New(p)) => p,
            None => return Err(limits_closed()),
        };
        let mut verified = sec.tls == TlsPolicy::Verify;
        let mut required = sec.tls.required();
        let mut policy = sec.label;
        let mut config = match sec.tls {
            _ if clear_text => None,
            TlsPolicy::Opportunistic if !self.settings.starttls => None,
            TlsPolicy::Verify => match &self.tls.verified {
                Ok(c) => Some(c),
                Err(e) => return Err(Failure::host(replies::no_trusted_roots(e))),
            },
            // MTA-STS testing: a verified certificate is tried first, to count what enforcing
            // would refuse (RFC 8461 §5); any certificate after that.
            TlsPolicy::Opportunistic if sec.sts_testing && step == Step::AsPolicy => match &self.tls.verified {
                Ok(c) => Some(c),
                Err(_) => Some(&self.tls.any),
            },
            _ => Some(&self.tls.any),
        };
        // DANE decides per MX host (RFC 7672), over whatever the route said.
        match sec.dane.get(host) {
            Some(DaneHost::Verify(c)) => (config, verified, required, policy) = (Some(c), true, true, "dane"),
            Some(DaneHost::Encrypt) => {
                (config, verified, required, policy) = (Some(&self.tls.any), false, true, "dane")
            }
            Some(DaneHost::Unusable(e)) => return Err(Failure::host(replies::dane_unusable(e))),
            None => {}
        }
        let security = Security {
            tls: config,
            required,
            verified,
            implicit: sec.implicit,
            auth: sec.auth.as_ref(),
            allow_unverified_auth: self.settings.allow_unverified_auth,
        };
        match Connection::open(addr, host, &self.settings.helo_name, &security, &self.settings.timeouts).await {
            Ok(c) => {
                self.metrics.outbound_connections.inc();
                if c.tls {
                    self.metrics.outbound_tls.inc();
                }
                if required {
                    self.metrics.tls_policy.get_or_create(&PolicyLabel { policy, result: "success" }).inc();
                }
                if sec.sts_testing {
                    let result = if c.tls && step == Step::AsPolicy { "success" } else { "failure" };
                    self.metrics.tls_policy.get_or_create(&PolicyLabel { policy: "mta-sts-testing", result }).inc();
                }
                if let Some((domain, policy_type)) = &sec.report {
                    let policy_type = if sec.dane.contains_key(host) { "tlsa" } else { policy_type };
                    let session = match (c.tls, step) {
                        (true, Step::AsPolicy) => Some(Session::Success),
                        (false, _) if sec.sts_testing => Some(Session::Failure {
                            result_type: "starttls-not-supported",
                            mx: host,
                            ip: addr.ip().to_string(),
                        }),
                        _ => None,
                    };
                    if let Some(session) = session {
                        self.metrics.tls_rpt.record(domain, policy_type, session, unix_now());
                    }
                }
                Ok((c, permits))
            }
            Err(f) => {
                self.metrics.outbound_connect_failures.inc();
                let status = f.outcome.status();
                let tls_missing = status.subject == 7 && status.detail == 10;
                if required && (f.tls_failed || tls_missing) {
                    self.metrics.tls_policy.get_or_create(&PolicyLabel { policy, result: "failure" }).inc();
                }
                if let (Some((domain, policy_type)), true) =
                    (&sec.report, (required || sec.sts_testing) && (f.tls_failed || tls_missing))
                {
                    let policy_type = if sec.dane.contains_key(host) { "tlsa" } else { policy_type };
                    let result_type = crate::tlsrpt::result_type(&f.outcome.text, tls_missing);
                    let session = Session::Failure { result_type, mx: host, ip: addr.ip().to_string() };
                    self.metrics.tls_rpt.record(domain, policy_type, session, unix_now());
                }
                Err(f)
            }
        }
    }

    /// After a transaction: back to the pool, or closed with QUIT.
    fn finish(&self, key: &str, conn: Connection, permits: Permits) {
        if conn.reusable && conn.messages < self.settings.max_messages_per_connection {
            self.pool.put(key, conn, permits);
        } else {
            pool::close(conn, permits);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_host_syntax() {
        let sh = |h: &str, p: Option<u16>, mx| Ok(SmartHost { host: h.into(), port: p, mx_lookup: mx });
        let cases = [
            ("relay.example.org", sh("relay.example.org", None, true)),
            ("relay.example.org:587", sh("relay.example.org", Some(587), true)),
            ("[relay.example.org]", sh("relay.example.org", None, false)),
            ("[192.0.2.1]:25", sh("192.0.2.1", Some(25), false)),
            ("192.0.2.1:2525", sh("192.0.2.1", Some(2525), false)),
        ];
        for (input, want) in cases {
            assert_eq!(SmartHost::parse(input), want, "{input}");
        }
        for bad in ["", "[]", "[x]y", "host:port", "a b", "[1.2.3.4]:99999"] {
            assert!(SmartHost::parse(bad).is_err(), "{bad}");
        }
    }
}
