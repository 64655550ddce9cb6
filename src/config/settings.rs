//! Where the configuration becomes each actor's settings: the listener and its sessions, the
//! queue, Pickup, remote delivery and every route actor. The daemon's wiring and reload take
//! settings only from here, so one function decides what each key means at run time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mailroot_actors::auth::Users;
use mailroot_actors::checks::{CheckSettings, Checker, SpfFail};
use mailroot_actors::dkim::{self, Signer};
use mailroot_actors::listener::{AccessLists, ListenerSettings};
use mailroot_actors::lmtp::LmtpSettings;
use mailroot_actors::maildir::MaildirSettings;
use mailroot_actors::pickup::PickupSettings;
use mailroot_actors::protocol::recipients::{MapSource, RecipientMaps};
use mailroot_actors::protocol::senders::SenderLogins;
use mailroot_actors::protocol::{LocalDomains, RateGate, RecipientCheck, SessionParams, SrsReverse};
use mailroot_actors::queue::QueueSettings;
use mailroot_actors::rates::{RateLimits, RateSettings};
use mailroot_actors::remote::connection::Timeouts;
use mailroot_actors::remote::{Credentials, DomainPolicy, RemoteSettings, SmartHost, TlsPolicy};
use mailroot_actors::resolve::Dns;
use mailroot_actors::routes::RouteTable;
use tracing::warn;

use super::{Config, ConfigError, Role};

/// The TLS configuration and AUTH users, loaded from their files before anything starts (or
/// changes, at a reload), so a bad file is a clear error and never half-applied.
#[derive(Clone)]
pub struct Security {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Listeners with a certificate of their own, by name.
    pub listener_tls: BTreeMap<String, Arc<rustls::ServerConfig>>,
    pub users: Option<Arc<Users>>,
    /// DKIM keys (empty when no `[dkim."domain"]` is configured).
    pub dkim: Arc<Signer>,
    /// The SRS secret and domain, when recipient maps can forward.
    pub srs: Option<Arc<mailroot_actors::srs::Srs>>,
}

impl Security {
    pub fn load(config: &Config) -> Result<Security, ConfigError> {
        let tls = if config.tls.enabled() {
            let c = mailroot_actors::tls::server_config(&config.tls.cert, &config.tls.key)
                .map_err(|e| ConfigError(format!("tls: {e}")))?;
            Some(c)
        } else {
            None
        };
        let mut listener_tls = BTreeMap::new();
        for (name, l) in &config.listeners {
            if l.tls_cert.as_os_str().is_empty() && l.tls_key.as_os_str().is_empty() {
                continue;
            }
            let c = mailroot_actors::tls::server_config(&l.tls_cert, &l.tls_key)
                .map_err(|e| ConfigError(format!("listeners.\"{name}\".tls_cert: {e}")))?;
            listener_tls.insert(name.clone(), c);
        }
        let users = match config.load_users()? {
            Some(map) => {
                let users = Users::new(map).map_err(|e| ConfigError(format!("auth.users_file: {e}")))?;
                if users.is_empty() {
                    warn!("auth.users_file has no users: every AUTH will fail");
                }
                Some(Arc::new(users))
            }
            None => None,
        };
        let dkim = Arc::new(Signer::load(&config.dkim_settings()?).map_err(|e| ConfigError(e.to_string()))?);
        let srs = if config.recipients.is_empty() { None } else { Some(Arc::new(config.load_srs()?)) };
        Ok(Security { tls, listener_tls, users, dkim, srs })
    }
}

/// What every listener's settings share, built once per (re)load.
struct ListenerCommon {
    reverse_dns: Option<Arc<Dns>>,
    checker: Option<Arc<Checker>>,
    rates: RateGate,
    check_recipients: RecipientCheck,
    sender_logins: Option<Arc<SenderLogins>>,
    recipient_maps: Option<Arc<RecipientMaps>>,
    srs: SrsReverse,
}

/// One listener: its name, the key that defines it (for errors), its role and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerDef {
    pub name: String,
    pub key: String,
    pub role: Role,
    pub addrs: Vec<SocketAddr>,
}

/// What a built-in route's actor is made from. A reload compares these (`PartialEq`) and
/// replaces only the actors whose settings changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteSettings {
    Drop { drop: PathBuf, sort_temp: PathBuf },
    Remote(Box<RemoteSettings>),
    Maildir(MaildirSettings),
    Lmtp(LmtpSettings),
}

impl Config {
    /// The `[dkim."domain"]` sections as the signer takes them.
    pub fn dkim_settings(&self) -> Result<Vec<dkim::DomainSettings>, ConfigError> {
        let mut out = Vec::new();
        for (domain, d) in &self.dkim {
            let key = |selector: &str, file: &Path, algorithm: &str| dkim::KeySettings {
                selector: selector.to_string(),
                key_file: file.to_path_buf(),
                algorithm: (!algorithm.is_empty()).then(|| algorithm.to_string()),
            };
            let mut keys = Vec::new();
            if !d.selector.is_empty() || !d.key.as_os_str().is_empty() {
                keys.push(key(&d.selector, &d.key, &d.algorithm));
            }
            keys.extend(d.keys.iter().map(|k| key(&k.selector, &k.key, &k.algorithm)));
            let expire = match d.expire.trim() {
                "" => None,
                x => Some(
                    super::HumanDuration::parse(x)
                        .map_err(|e| ConfigError(format!("dkim.\"{domain}\".expire: {e}")))?
                        .0,
                ),
            };
            out.push(dkim::DomainSettings {
                domain: domain.clone(),
                keys,
                headers: d.headers.clone(),
                oversign: d.oversign.clone(),
                expire,
            });
        }
        Ok(out)
    }

    /// The admin API address (`None` when `admin.listen` is empty).
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.admin.listen.is_empty() {
            return Ok(None);
        }
        self.admin
            .listen
            .parse()
            .map(Some)
            .map_err(|_| ConfigError(format!("admin.listen: {:?} is not an address:port", self.admin.listen)))
    }

    /// Every listener: `[server] listen` as the `mx` listener (when it has addresses), then each
    /// `[listeners."name"]` in name order.
    pub fn listener_defs(&self) -> Result<Vec<ListenerDef>, ConfigError> {
        let addrs = |key: &str, list: &[String]| -> Result<Vec<SocketAddr>, ConfigError> {
            list.iter()
                .enumerate()
                .map(|(i, a)| a.parse().map_err(|_| ConfigError(format!("{key}[{i}]: {a:?} is not an address:port"))))
                .collect()
        };
        let mut defs = Vec::new();
        if !self.server.listen.is_empty() {
            defs.push(ListenerDef {
                name: "mx".into(),
                key: "server.listen".into(),
                role: Role::Mx,
                addrs: addrs("server.listen", &self.server.listen)?,
            });
        }
        for (name, l) in &self.listeners {
            let key = format!("listeners.\"{name}\"");
            let valid = !name.is_empty()
                && name.len() <= 32
                && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !valid {
                return Err(ConfigError(format!("{key}: a listener's name is 1-32 of a-z, 0-9, '-', '_'")));
            }
            if name == "mx" && !self.server.listen.is_empty() {
                return Err(ConfigError(format!("{key}: \"mx\" is [server] listen's name; choose another")));
            }
            let role = Role::parse(&l.role)
                .ok_or_else(|| ConfigError(format!("{key}.role: {:?} is not mx, submission or submissions", l.role)))?;
            if l.listen.is_empty() {
                return Err(ConfigError(format!("{key}.listen: at least one address is needed")));
            }
            if l.max_connections == Some(0) {
                return Err(ConfigError(format!("{key}.max_connections: must be at least 1")));
            }
            defs.push(ListenerDef {
                name: name.clone(),
                role,
                addrs: addrs(&format!("{key}.listen"), &l.listen)?,
                key,
            });
        }
        Ok(defs)
    }

    /// Every listener's addresses, in [`Config::listener_defs`] order.
    pub fn listen_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        Ok(self.listener_defs()?.into_iter().flat_map(|d| d.addrs).collect())
    }

    /// Remote domains anyone may relay to (`relay_allowed = true`).
    pub fn relay_domains(&self) -> LocalDomains {
        LocalDomains::new(self.domains.remote.iter().filter(|(_, r)| r.relay_allowed).map(|(d, _)| d.clone()))
    }

    /// The remote delivery settings this config describes.
    pub fn remote_settings(&self) -> Result<RemoteSettings, ConfigError> {
        let d = &self.delivery;
        let smart = |s: &str| -> Result<Option<SmartHost>, ConfigError> {
            if s.is_empty() {
                Ok(None)
            } else {
                SmartHost::parse(s).map(Some).map_err(ConfigError)
            }
        };
        let policy = |key: &str, s: &str| -> Result<Option<TlsPolicy>, ConfigError> {
            if s.is_empty() {
                return Ok(None);
            }
            TlsPolicy::parse(s).map(Some).map_err(|e| ConfigError(format!("{key}: {e}")))
        };
        let mut domains = BTreeMap::new();
        for (name, r) in &self.domains.remote {
            let key = format!("domains.remote.\"{name}\"");
            let mut tls = policy(&format!("{key}.tls_policy"), &r.tls_policy)?;
            if r.require_tls && tls.is_none() {
                tls = Some(TlsPolicy::Require);
            }
            let auth = credentials(&key, &r.username, &r.password_file, &r.password_env)?;
            if auth.is_some() && r.smart_host.is_empty() {
                return Err(ConfigError(format!("{key}.username: a login needs this domain's smart_host")));
            }
            let some = |n: usize| (n > 0).then_some(n);
            domains.insert(
                name.to_ascii_lowercase(),
                DomainPolicy {
                    smart_host: smart(&r.smart_host)?,
                    tls,
                    auth,
                    max_recipients: some(r.max_recipients),
                    max_connections: some(r.max_connections),
                    messages_per_minute: (r.messages_per_minute > 0).then_some(r.messages_per_minute),
                },
            );
        }
        let smart_host_auth =
            credentials("delivery", &d.smart_host_username, &d.smart_host_password_file, &d.smart_host_password_env)?;
        Ok(RemoteSettings {
            helo_name: if d.helo_name.is_empty() { self.server.hostname.clone() } else { d.helo_name.clone() },
            remote_port: d.remote_port,
            nameservers: d.nameserver_addrs()?,
            dns_timeout: d.dns_timeout.0,
            smart_host: smart(&d.smart_host)?,
            direct_before_smart_host: d.direct_before_smart_host,
            max_connections: d.max_connections,
            max_connections_per_domain: d.max_connections_per_domain,
            max_messages_per_connection: d.max_messages_per_connection,
            timeouts: Timeouts { connect: d.connect_timeout.0, command: d.command_timeout.0, data: d.data_timeout.0 },
            starttls: d.starttls,
            masquerade_domain: (!d.masquerade_domain.is_empty()).then(|| d.masquerade_domain.clone()),
            local_domains: self.local_domains(),
            domains,
            idle_timeout: Duration::from_secs(10),
            tls_policy: policy("delivery.tls_policy", &d.tls_policy)?.unwrap_or_default(),
            smart_host_tls: policy("delivery.smart_host_tls", &d.smart_host_tls)?.unwrap_or(TlsPolicy::Verify),
            ca_file: (!d.ca_file.as_os_str().is_empty()).then(|| d.ca_file.clone()),
            smart_host_auth,
            allow_unverified_auth: d.allow_unverified_auth,
            smart_host_implicit_tls: d.smart_host_implicit_tls,
            max_recipients_per_transaction: d.max_recipients_per_transaction.max(1),
            messages_per_minute_per_domain: d.messages_per_minute_per_domain,
            mta_sts: d.mta_sts,
            mta_sts_port: d.mta_sts_port,
            cache_dir: Some(self.mailroot.path.join("Cache")),
            dane: d.dane,
        })
    }

    /// The local domains, default first.
    pub fn local_domains(&self) -> LocalDomains {
        LocalDomains::new(&self.domains.local)
    }

    /// Recipients of domains routed to `lmtp` are checked with the LMTP server at RCPT
    /// (`[lmtp] verify_recipients`, on by default).
    fn recipient_check(&self) -> RecipientCheck {
        if !self.lmtp.verify_recipients || self.lmtp.address.is_empty() {
            return RecipientCheck::default();
        }
        let Ok(table) = RouteTable::new(&self.routes) else { return RecipientCheck::default() };
        if !table.names().any(|r| r == "lmtp") {
            return RecipientCheck::default();
        }
        let local = self.local_domains();
        RecipientCheck::new(move |m| table.route(&m.domain, &local) == "lmtp")
    }

    /// The recipient check's own settings: the LMTP server, and how long a check may take.
    pub fn recipient_verifier_settings(&self) -> Option<(LmtpSettings, Duration)> {
        if !self.lmtp.verify_recipients || self.lmtp.address.is_empty() {
            return None;
        }
        let settings = LmtpSettings {
            address: self.lmtp.address.clone(),
            hostname: self.server.hostname.clone(),
            timeout: self.lmtp.timeout.0,
            max_connections: self.lmtp.max_connections,
            idle: self.lmtp.idle_timeout.0,
        };
        Some((settings, self.lmtp.verify_timeout.0))
    }

    /// The `[recipients."domain"]` maps (`None` when there are none).
    pub fn recipient_maps(&self) -> Result<Option<Arc<RecipientMaps>>, ConfigError> {
        if self.recipients.is_empty() {
            return Ok(None);
        }
        let sources = self.recipients.iter().map(|(d, m)| {
            let src = MapSource {
                users: m.users.clone(),
                aliases: m.aliases.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                catch_all: m.catch_all.clone(),
                delimiter: m.delimiter.clone(),
            };
            (d.clone(), src)
        });
        RecipientMaps::new(sources).map(|m| Some(Arc::new(m))).map_err(ConfigError)
    }

    /// The SRS secret from `[srs] secret_file` (or `<Mailroot>/srs.key`, made now if missing).
    pub fn load_srs(&self) -> Result<mailroot_actors::srs::Srs, ConfigError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let path = if self.srs.secret_file.as_os_str().is_empty() {
            self.mailroot.path.join("srs.key")
        } else {
            self.srs.secret_file.clone()
        };
        let err = |m: String| ConfigError(format!("srs.secret_file: {}: {m}", path.display()));
        let domain = if self.srs.domain.is_empty() {
            self.domains.local.first().cloned().unwrap_or_default()
        } else {
            self.srs.domain.clone()
        };
        if !path.exists() {
            let secret = mailroot_actors::srs::Srs::generate_secret().map_err(err)?;
            // Before the first start (`check-config` on a new machine) the folder is not there:
            // nothing is written; the daemon makes the file when it creates its folders.
            if !path.parent().is_some_and(Path::exists) {
                if !self.srs.secret_file.as_os_str().is_empty() {
                    return Err(err("its folder does not exist".into()));
                }
                return Ok(mailroot_actors::srs::Srs::new(secret.as_bytes(), &domain));
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| err(e.to_string()))?;
            std::io::Write::write_all(&mut f, format!("{secret}\n").as_bytes()).map_err(|e| err(e.to_string()))?;
            f.sync_all().map_err(|e| err(e.to_string()))?;
        }
        let meta = std::fs::metadata(&path).map_err(|e| err(e.to_string()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(err("readable by others: chmod 600 it".into()));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let secret = text.lines().next().unwrap_or("").trim();
        if secret.len() < 16 {
            return Err(err("the secret is shorter than 16 characters".into()));
        }
        Ok(mailroot_actors::srs::Srs::new(secret.as_bytes(), &domain))
    }

    /// `[auth.senders]`, checked by `validate` (so a bad entry never reaches here).
    pub fn sender_logins(&self) -> Option<Arc<SenderLogins>> {
        if self.auth.senders.is_empty() {
            return None;
        }
        SenderLogins::new(self.auth.senders.iter().map(|(k, v)| (k.clone(), v.clone()))).ok().map(Arc::new)
    }

    /// `[rates]` as the rate table takes them.
    pub fn rate_settings(&self) -> RateSettings {
        let r = &self.rates;
        RateSettings {
            window: r.window.0,
            messages_per_client: r.messages_per_client,
            recipients_per_client: r.recipients_per_client,
            failed_recipients_per_client: r.failed_recipients_per_client,
            messages_per_user: r.messages_per_user,
            recipients_per_user: r.recipients_per_user,
        }
    }

    /// `[checks]` as the checker takes them (validated by `validate`).
    pub fn check_settings(&self) -> Result<CheckSettings, ConfigError> {
        let c = &self.checks;
        let spf_fail = spf_policy("checks.spf_fail", &c.spf_fail)?;
        let dmarc_enforce = dmarc_policy("checks.dmarc", &c.dmarc)?;
        for (name, l) in &self.listeners {
            if let Some(v) = &l.spf_fail {
                spf_policy(&format!("listeners.\"{name}\".spf_fail"), v)?;
            }
            if let Some(v) = &l.dmarc {
                dmarc_policy(&format!("listeners.\"{name}\".dmarc"), v)?;
            }
        }
        let header = c.quarantine_header.trim();
        let valid = header
            .split_once(':')
            .is_some_and(|(name, _)| !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':'))
            && header.bytes().all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic());
        if !valid {
            return Err(ConfigError(format!("checks.quarantine_header: {header:?} is not one \"Name: value\" line")));
        }
        if c.max_concurrent == 0 {
            return Err(ConfigError("checks.max_concurrent: must be at least 1".into()));
        }
        if c.timeout.0.is_zero() {
            return Err(ConfigError("checks.timeout: must be more than 0".into()));
        }
        if c.max_message_size > mailroot_actors::checks::MEMORY as u64 {
            return Err(ConfigError(format!(
                "checks.max_message_size: at most {} (the memory all checks together may hold)",
                mailroot_actors::checks::MEMORY
            )));
        }
        for (key, zones) in [
            ("checks.dnsbl", &c.dnsbl),
            ("checks.dnswl", &c.dnswl),
            ("checks.trusted_arc_sealers", &c.trusted_arc_sealers),
        ] {
            for z in zones {
                let valid = mailroot_actors::protocol::address::validate_domain(z.trim_end_matches('.')).is_ok()
                    && z.contains('.');
                if !valid {
                    return Err(ConfigError(format!("{key}: {z:?} is not a DNS zone")));
                }
            }
        }
        Ok(CheckSettings {
            dnsbl: c.dnsbl.clone(),
            trusted_arc_sealers: c.trusted_arc_sealers.clone(),
            dnswl: c.dnswl.clone(),
            hostname: self.server.hostname.clone(),
            spf_fail,
            dmarc_enforce,
            quarantine_header: header.to_string(),
            timeout: c.timeout.0,
            max_concurrent: c.max_concurrent,
            max_message_size: usize::try_from(c.max_message_size).unwrap_or(usize::MAX),
        })
    }

    /// What each listener is built from, in [`Config::listener_defs`] order (validated, so a bad
    /// listener never reaches here); rebuilt at each reload. `dns` is the daemon's inbound
    /// resolver (reverse DNS, the checks); `None` = neither (`mailroot sendmail`).
    pub fn listener_settings(
        &self,
        security: &Security,
        dns: Option<&Arc<Dns>>,
        metrics: Option<&Arc<mailroot_actors::metrics::Metrics>>,
        rates: Option<&Arc<RateLimits>>,
    ) -> Vec<ListenerSettings> {
        // What every listener shares, built once.
        let common = ListenerCommon {
            reverse_dns: dns.filter(|_| self.access.reverse_dns).cloned(),
            // One checker for all listeners: its slots and memory budget are global.
            checker: match (dns, metrics, self.check_settings()) {
                (Some(dns), Some(m), Ok(s)) => Some(Arc::new(Checker::new(dns.resolver(), s, m.clone()))),
                _ => None,
            },
            rates: rates.map(|r| r.gate()).unwrap_or_default(),
            check_recipients: self.recipient_check(),
            sender_logins: self.sender_logins(),
            recipient_maps: self.recipient_maps().ok().flatten(),
            srs: match &security.srs {
                Some(srs) => {
                    let srs = srs.clone();
                    SrsReverse::new(move |m| srs.reverse(m, mailroot_actors::clock::unix_now() / 86_400))
                }
                None => SrsReverse::default(),
            },
        };
        let defs = self.listener_defs().unwrap_or_default();
        defs.iter().map(|def| self.one_listener(def, security, &common)).collect()
    }

    fn one_listener(&self, def: &ListenerDef, security: &Security, common: &ListenerCommon) -> ListenerSettings {
        let own = self.listeners.get(&def.name).filter(|_| def.key != "server.listen").cloned().unwrap_or_default();
        let tls = security.listener_tls.get(&def.name).or(security.tls.as_ref()).cloned();
        let submission = def.role != Role::Mx;
        let checks_on = own.checks.unwrap_or(self.checks.enabled && def.role == Role::Mx);
        // The shared checker, with this listener's own policy if it has one (validated).
        let checker = common.checker.clone().filter(|_| checks_on).map(|c| {
            let spf = own.spf_fail.as_deref().and_then(|v| spf_policy("", v).ok());
            let dmarc = own.dmarc.as_deref().and_then(|v| dmarc_policy("", v).ok());
            match (spf, dmarc) {
                (None, None) => c,
                (spf, dmarc) => Arc::new(
                    c.with_policy(spf.unwrap_or(c.settings().spf_fail), dmarc.unwrap_or(c.settings().dmarc_enforce)),
                ),
            }
        });
        let params = Arc::new(SessionParams {
            hostname: self.server.hostname.clone(),
            local_domains: self.local_domains(),
            relay_domains: self.relay_domains(),
            max_message_size: own.max_message_size.unwrap_or(self.limits.max_message_size) as usize,
            max_recipients: own.max_recipients.unwrap_or(self.limits.max_recipients),
            max_messages_per_connection: self.limits.max_messages_per_connection,
            max_errors: self.limits.max_errors,
            max_hop_count: self.queue.max_hop_count,
            // Implicit TLS is on before the first command: nothing to offer.
            tls_available: tls.is_some() && def.role != Role::Submissions,
            tls_required: match def.role {
                Role::Mx => own.tls_required.unwrap_or(self.tls.required),
                Role::Submission => own.tls_required.unwrap_or(true),
                Role::Submissions => false,
            },
            auth_enabled: security.users.is_some() && own.auth.unwrap_or(true),
            auth_plaintext_loopback: self.auth.allow_plaintext_loopback,
            check_recipients: common.check_recipients.clone(),
            sender_logins: common.sender_logins.clone(),
            auth_required: submission,
            recipient_maps: common.recipient_maps.clone(),
            srs: common.srs.clone(),
            // Only we may claim our own results: drop such headers as mail arrives.
            auth_results_id: checks_on.then(|| self.server.hostname.clone()),
            rates: common.rates.clone(),
            // An SPF fail is refused at MAIL, before the message is sent.
            check_sender: checker.as_ref().is_some_and(|c| c.settings().spf_fail == SpfFail::Reject),
        });
        let relay_networks = match (submission, own.relay_networks) {
            (true, _) => Vec::new(),
            (false, Some(n)) => n,
            (false, None) => self.relay.allow_networks.clone(),
        };
        ListenerSettings {
            name: mailroot_actors::metrics::intern(&def.name),
            implicit_tls: def.role == Role::Submissions,
            params,
            relay_networks: Arc::new(relay_networks),
            max_connections: own.max_connections.unwrap_or(self.server.max_connections),
            idle_timeout: self.server.idle_timeout.0,
            stress_idle_timeout: self.server.stress_idle_timeout.0,
            min_transfer_rate: self.server.min_transfer_rate,
            min_transfer_window: self.server.min_transfer_window.0,
            access: AccessLists { allow: self.access.allow.clone(), deny: self.access.deny.clone() },
            max_connections_per_ip: self.access.max_connections_per_ip,
            max_connections_per_ip_per_minute: self.access.max_connections_per_ip_per_minute,
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
            reverse_dns: common.reverse_dns.clone(),
            checker,
        }
    }

    /// The Queue's settings; `badmail` is the Mailroot's Badmail folder.
    /// How to reach the shared queue (`queue.store = "postgres"`), with its password read.
    pub fn pg_settings(&self) -> Result<mailroot_actors::store::PgSettings, ConfigError> {
        let pg = &self.queue.postgres;
        let password = match credentials("queue.postgres", "-", &pg.password_file, &pg.password_env) {
            Ok(c) => c.map(|c| c.password),
            // Neither given: the URL (or trust authentication) says it all.
            Err(_) if pg.password_file.as_os_str().is_empty() && pg.password_env.is_empty() => None,
            Err(e) => return Err(e),
        };
        Ok(mailroot_actors::store::PgSettings {
            url: pg.url.clone(),
            password,
            schema: pg.schema.clone(),
            node: if pg.node.is_empty() { self.server.hostname.clone() } else { pg.node.clone() },
            pool_size: pg.pool_size,
            lease: pg.lease.0,
            poll_every: pg.poll_every.0,
            connect_timeout: pg.connect_timeout.0,
            statement_timeout: pg.statement_timeout.0,
            tls: mailroot_actors::store::PgTls::parse(&pg.tls)
                .map_err(|e| ConfigError(format!("queue.postgres.tls: {e}")))?,
            ca_file: (!pg.ca_file.as_os_str().is_empty()).then(|| pg.ca_file.clone()),
        })
    }

    pub fn queue_settings(&self, badmail: &Path) -> QueueSettings {
        QueueSettings {
            hostname: self.server.hostname.clone(),
            retry_intervals: self.queue.retry_intervals.iter().map(|d| d.0).collect(),
            expire_after: self.queue.expire_after.0,
            delay_notice_after: self.queue.delay_notice_after.0,
            local_expire_after: optional_duration(&self.queue.local_expire_after),
            local_delay_notice_after: optional_duration(&self.queue.local_delay_notice_after),
            ndr_copy_to: Some(self.queue.ndr_copy_to.clone()).filter(|s| !s.is_empty()),
            badmail_dir: badmail.to_path_buf(),
            ..QueueSettings::default()
        }
    }

    /// The Pickup actor's settings: a scan every 250 ms, at most 64 files at once.
    pub fn pickup_settings(&self, pickup: &Path, badmail: &Path) -> PickupSettings {
        PickupSettings {
            pickup_dir: pickup.to_path_buf(),
            badmail_dir: badmail.to_path_buf(),
            poll: Duration::from_millis(250),
            max_message_size: self.limits.max_message_size as usize,
            max_hop_count: self.queue.max_hop_count,
            max_concurrent: 64,
        }
    }

    /// The built-in routes this configuration makes available, by name, with their settings:
    /// `drop` and `smtp` always, `smarthost` with a smart host, `maildir` and `lmtp` when
    /// configured.
    pub fn route_settings(
        &self,
        drop: &Path,
        sort_temp: &Path,
    ) -> Result<Vec<(&'static str, RouteSettings)>, ConfigError> {
        let mut routes =
            vec![("drop", RouteSettings::Drop { drop: drop.to_path_buf(), sort_temp: sort_temp.to_path_buf() })];
        let remote = self.remote_settings()?;
        if remote.smart_host.is_some() {
            // Everything through the smart host: no MX first, no per-domain smart hosts.
            let mut smart = remote.clone();
            smart.direct_before_smart_host = false;
            smart.domains.values_mut().for_each(|d| d.smart_host = None);
            routes.push(("smtp", RouteSettings::Remote(Box::new(remote))));
            routes.push(("smarthost", RouteSettings::Remote(Box::new(smart))));
        } else {
            routes.push(("smtp", RouteSettings::Remote(Box::new(remote))));
        }
        if !self.maildir.path.is_empty() {
            let settings = MaildirSettings { path: self.maildir.path.clone(), hostname: self.server.hostname.clone() };
            routes.push(("maildir", RouteSettings::Maildir(settings)));
        }
        if !self.lmtp.address.is_empty() {
            routes.push((
                "lmtp",
                RouteSettings::Lmtp(LmtpSettings {
                    address: self.lmtp.address.clone(),
                    hostname: self.server.hostname.clone(),
                    timeout: self.lmtp.timeout.0,
                    max_connections: self.lmtp.max_connections,
                    idle: self.lmtp.idle_timeout.0,
                }),
            ));
        }
        Ok(routes)
    }
}

fn spf_policy(key: &str, v: &str) -> Result<SpfFail, ConfigError> {
    match v {
        "record" => Ok(SpfFail::Record),
        "reject" => Ok(SpfFail::Reject),
        other => Err(ConfigError(format!("{key}: {other:?} is not record or reject"))),
    }
}

fn dmarc_policy(key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "enforce" => Ok(true),
        "record" => Ok(false),
        other => Err(ConfigError(format!("{key}: {other:?} is not enforce or record"))),
    }
}

/// `""` = `None`; anything else was checked by `validate`.
fn optional_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    (!s.is_empty()).then(|| super::HumanDuration::parse(s).ok().map(|d| d.0)).flatten()
}

/// A login from `<key>.username` and a password file (0600: only its owner may read it) or
/// environment variable. `None` when no username is set.
fn credentials(key: &str, username: &str, file: &Path, env: &str) -> Result<Option<Credentials>, ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let err = |k: &str, m: String| ConfigError(format!("{key}.{k}: {m}"));
    let (user_key, file_key, env_key) = if key == "delivery" {
        ("smart_host_username", "smart_host_password_file", "smart_host_password_env")
    } else {
        ("username", "password_file", "password_env")
    };
    if username.is_empty() {
        if !file.as_os_str().is_empty() || !env.is_empty() {
            return Err(err(user_key, "a password is set but no username".into()));
        }
        return Ok(None);
    }
    let password = match (file.as_os_str().is_empty(), env.is_empty()) {
        (false, true) => {
            let meta = std::fs::metadata(file).map_err(|e| err(file_key, format!("{}: {e}", file.display())))?;
            if meta.mode() & 0o077 != 0 {
                return Err(err(file_key, format!("{} is readable by others: chmod 600 it", file.display())));
            }
            let text = std::fs::read_to_string(file).map_err(|e| err(file_key, format!("{}: {e}", file.display())))?;
            text.lines().next().unwrap_or("").to_string()
        }
        (true, false) => std::env::var(env).map_err(|_| err(env_key, format!("the environment has no {env}")))?,
        (true, true) => return Err(err(file_key, format!("{user_key} is set: give {file_key} or {env_key}"))),
        (false, false) => return Err(err(file_key, format!("give {file_key} or {env_key}, not both"))),
    };
    if password.is_empty() {
        return Err(err(file_key, "the password is empty".into()));
    }
    Ok(Some(Credentials { username: username.to_string(), password }))
}
