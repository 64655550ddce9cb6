//! The configuration file: TOML, every key with a default that works on a fresh machine,
//! validated into errors that name the key. docs/configuration.md documents each key.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use mailroot_actors::queue::QueueSettings;
use mailroot_actors::remote::connection::Timeouts;
use mailroot_actors::remote::{DomainPolicy, RemoteSettings, SmartHost};
use mailroot_actors::routes::RouteTable;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The file `mailroot run` uses when `--config` is not given and it exists.
pub const DEFAULT_CONFIG_PATH: &str = "config/mailroot.toml";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: Server,
    pub mailroot: Mailroot,
    pub domains: Domains,
    pub relay: Relay,
    pub limits: Limits,
    pub queue: Queue,
    pub delivery: Delivery,
    pub tls: Tls,
    pub auth: Auth,
    pub access: Access,
    pub admin: Admin,
    pub log: Log,
    /// Domain (exact, or `*.suffix` for its subdomains) = delivery actor name.
    pub routes: BTreeMap<String, String>,
    pub maildir: MaildirRoute,
    pub lmtp: LmtpRoute,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// `address:port` of the admin HTTP API; empty = not started.
    pub listen: String,
    /// When set, every request needs `Authorization: Bearer <token>`.
    pub token: String,
    /// Serve /metrics without the token.
    pub metrics_public: bool,
}

impl Default for Admin {
    fn default() -> Self {
        Admin { listen: "127.0.0.1:8025".into(), token: String::new(), metrics_public: false }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// W3C extended protocol log, one line per SMTP command; `%Y`, `%m`, `%d` are replaced
    /// (a new file each day). Relative to the config's folder; empty = off.
    pub protocol: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaildirRoute {
    /// Each recipient's Maildir: `{user}`, `{domain}` and `{address}` are replaced. Empty = the
    /// `maildir` route is not available.
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmtpRoute {
    /// `host:port` or `unix:/path`; empty = the `lmtp` route is not available.
    pub address: String,
    pub max_connections: usize,
    pub timeout: HumanDuration,
}

impl Default for LmtpRoute {
    fn default() -> Self {
        LmtpRoute { address: String::new(), max_connections: 8, timeout: HumanDuration(Duration::from_secs(300)) }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM certificate chain; with `key`, STARTTLS is offered. Relative to the config's folder.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Mail commands before STARTTLS get 530 5.7.0.
    pub required: bool,
}

impl Tls {
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// TOML file with a `[users]` table of `name = "argon2 hash"`; empty = AUTH off.
    pub users_file: PathBuf,
    /// Offer AUTH in clear text to loopback clients (local submission without TLS).
    pub allow_plaintext_loopback: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Access {
    /// Only these networks may connect (empty = everyone).
    pub allow: Vec<IpNet>,
    /// These networks may not connect, whatever `allow` says.
    pub deny: Vec<IpNet>,
    /// Connections open at once per client address (IPv6: per /64); 0 = no limit.
    pub max_connections_per_ip: usize,
    /// New connections per client address in any minute; 0 = no limit.
    pub max_connections_per_ip_per_minute: usize,
    /// Look up each client's name (reverse DNS, confirmed forward) for the Received: header.
    pub reverse_dns: bool,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            allow: Vec::new(),
            deny: Vec::new(),
            max_connections_per_ip: 50,
            max_connections_per_ip_per_minute: 0,
            reverse_dns: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// The name used in the greeting, in EHLO and in `Received:` headers.
    pub hostname: String,
    pub listen: Vec<String>,
    pub max_connections: usize,
    pub idle_timeout: HumanDuration,
    /// At stop, sessions may finish the transaction under way and deliveries in flight may end
    /// for this long; then sessions get 421 and the rest stays queued.
    pub shutdown_grace: HumanDuration,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            hostname: system_hostname(),
            listen: vec!["127.0.0.1:2525".into()],
            max_connections: 1000,
            idle_timeout: HumanDuration(Duration::from_secs(300)),
            shutdown_grace: HumanDuration(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mailroot {
    /// Holds Pickup, Queue, Drop, Badmail and SortTemp; relative to the config file's folder.
    pub path: PathBuf,
}

impl Default for Mailroot {
    fn default() -> Self {
        Mailroot { path: PathBuf::from("mailroot") }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Domains {
    /// The first is the default domain, the rest are aliases sharing the Drop folder.
    pub local: Vec<String>,
    /// Settings for particular remote domains, by domain name.
    pub remote: BTreeMap<String, RemoteDomain>,
}

impl Default for Domains {
    fn default() -> Self {
        Domains { local: vec!["localhost".into()], remote: BTreeMap::new() }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteDomain {
    /// Send this domain's mail to this host instead of its MX hosts.
    pub smart_host: String,
    /// Anyone may send mail for this domain through us (we are its backup MX).
    pub relay_allowed: bool,
    /// Deliver only over STARTTLS; otherwise the mail waits.
    pub require_tls: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Relay {
    /// Clients in these networks may send to non-local domains.
    pub allow_networks: Vec<IpNet>,
}

impl Default for Relay {
    fn default() -> Self {
        Relay { allow_networks: vec!["127.0.0.0/8".parse().expect("literal"), "::1/128".parse().expect("literal")] }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// 0 = no limit.
    pub max_messages_per_connection: usize,
    /// 0 = no limit.
    pub max_errors: usize,
    /// Each reply after a client error waits this × the errors so far (at most 10 s).
    pub error_delay: HumanDuration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 26_214_400,
            max_recipients: 100,
            max_messages_per_connection: 0,
            max_errors: 10,
            error_delay: HumanDuration(Duration::from_millis(500)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Queue {
    /// More `Received:` headers than this is a mail loop (RFC 5321 §6.3 asks for at least 100).
    pub max_hop_count: usize,
    /// Waits after the 1st, 2nd, … temporary delivery failure; the last one repeats.
    pub retry_intervals: Vec<HumanDuration>,
    /// Recipients still failing this long after arrival are given up and reported (NDR).
    pub expire_after: HumanDuration,
    /// The sender gets one delay notice once a message has waited this long.
    pub delay_notice_after: HumanDuration,
    /// Gets a copy of every non-delivery report; empty = nobody.
    pub ndr_copy_to: String,
}

impl Default for Queue {
    /// The engine's defaults, so the numbers live in one place.
    fn default() -> Self {
        let q = QueueSettings::default();
        Queue {
            max_hop_count: 100,
            retry_intervals: q.retry_intervals.into_iter().map(HumanDuration).collect(),
            expire_after: HumanDuration(q.expire_after),
            delay_notice_after: HumanDuration(q.delay_notice_after),
            ndr_copy_to: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    /// The port used on MX hosts.
    pub remote_port: u16,
    /// DNS servers as `ip` or `ip:port`; empty = the system resolver (/etc/resolv.conf).
    pub nameservers: Vec<String>,
    pub dns_timeout: HumanDuration,
    /// `host`, `host:port`, `[host]` or `[192.0.2.1]:25`; brackets skip the MX lookup.
    pub smart_host: String,
    pub direct_before_smart_host: bool,
    pub max_connections: usize,
    pub max_connections_per_domain: usize,
    pub max_messages_per_connection: usize,
    pub connect_timeout: HumanDuration,
    pub command_timeout: HumanDuration,
    pub data_timeout: HumanDuration,
    /// The name we give in EHLO; empty = server.hostname.
    pub helo_name: String,
    /// Rewrites a local domain in MAIL FROM to this domain when relaying; empty = off.
    pub masquerade_domain: String,
    /// Use STARTTLS when the peer offers it.
    pub starttls: bool,
}

impl Default for Delivery {
    /// The engine's defaults, so the numbers live in one place.
    fn default() -> Self {
        let r = RemoteSettings::default();
        Delivery {
            remote_port: r.remote_port,
            nameservers: Vec::new(),
            dns_timeout: HumanDuration(r.dns_timeout),
            smart_host: String::new(),
            direct_before_smart_host: r.direct_before_smart_host,
            max_connections: r.max_connections,
            max_connections_per_domain: r.max_connections_per_domain,
            max_messages_per_connection: r.max_messages_per_connection,
            connect_timeout: HumanDuration(r.timeouts.connect),
            command_timeout: HumanDuration(r.timeouts.command),
            data_timeout: HumanDuration(r.timeouts.data),
            helo_name: String::new(),
            masquerade_domain: String::new(),
            starttls: r.starttls,
        }
    }
}

impl Delivery {
    pub fn nameserver_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        self.nameservers
            .iter()
            .enumerate()
            .map(|(i, a)| {
                a.parse::<SocketAddr>()
                    .or_else(|_| a.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| ConfigError(format!("delivery.nameservers[{i}]: {a:?} is not an ip or ip:port")))
            })
            .collect()
    }
}

/// A duration written as `30s`, `15m`, `2h` or `5d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 =
            num.parse().map_err(|_| format!("invalid duration {s:?}: expected a number and a unit, e.g. \"15m\""))?;
        let secs = match unit {
            "ms" => return Ok(HumanDuration(Duration::from_millis(n))),
            "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            "d" => n * 86_400,
            _ => return Err(format!("invalid duration {s:?}: the unit must be ms, s, m, h or d")),
        };
        Ok(HumanDuration(Duration::from_secs(secs)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_millis() != 0 || d.as_secs() == 0 {
            return write!(f, "{}ms", d.as_millis());
        }
        let s = d.as_secs();
        match () {
            _ if s % 86_400 == 0 => write!(f, "{}d", s / 86_400),
            _ if s % 3600 == 0 => write!(f, "{}h", s / 3600),
            _ if s % 60 == 0 => write!(f, "{}m", s / 60),
            _ => write!(f, "{s}s"),
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && mailroot_actors::protocol::address::validate_domain(h).is_ok())
        .unwrap_or_else(|| "localhost".into())
}

#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// A loaded config and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// `None` = built-in defaults.
    pub source: Option<PathBuf>,
}

impl Config {
    /// Loads `path`, or `config/mailroot.toml` when it exists, or the built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
        let path = match path {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
        };
        let Some(path) = path else {
            let config = Config::default();
            config.validate()?;
            return Ok(Loaded { config, source: None });
        };
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        let mut config = Config::from_toml(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        config.resolve_paths(&base);
        Ok(Loaded { config, source: Some(path) })
    }

    /// Parses and validates TOML text; relative paths stay relative.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Makes relative paths relative to `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.mailroot.path, &mut self.tls.cert, &mut self.tls.key, &mut self.auth.users_file] {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
        for p in [&mut self.log.protocol, &mut self.maildir.path] {
            if !p.is_empty() && Path::new(p.as_str()).is_relative() {
                *p = base.join(&*p).to_string_lossy().into_owned();
            }
        }
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

    pub fn listen_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        self.server
            .listen
            .iter()
            .enumerate()
            .map(|(i, a)| {
                a.parse().map_err(|_| ConfigError(format!("server.listen[{i}]: {a:?} is not an address:port")))
            })
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, msg: String| Err(ConfigError(format!("{key}: {msg}")));
        use mailroot_actors::protocol::address::validate_domain;
        if validate_domain(&self.server.hostname).is_err() {
            return err("server.hostname", format!("{:?} is not a valid host name", self.server.hostname));
        }
        if self.server.listen.is_empty() {
            return err("server.listen", "at least one address is needed".into());
        }
        self.listen_addrs()?;
        if self.server.max_connections == 0 {
            return err("server.max_connections", "must be at least 1".into());
        }
        if self.server.idle_timeout.0.is_zero() {
            return err("server.idle_timeout", "must be more than 0".into());
        }
        if self.mailroot.path.as_os_str().is_empty() {
            return err("mailroot.path", "must not be empty".into());
        }
        if self.domains.local.is_empty() {
            return err(
                "domains.local",
                "at least one local domain is needed (the first is the default domain)".into(),
            );
        }
        for (i, d) in self.domains.local.iter().enumerate() {
            if validate_domain(d).is_err() || d.starts_with('[') {
                return err(&format!("domains.local[{i}]"), format!("{d:?} is not a valid domain"));
            }
        }
        if self.limits.max_message_size < 1024 {
            return err("limits.max_message_size", "must be at least 1024 bytes (RFC 5321 asks for 64 KB)".into());
        }
        if self.limits.max_message_size > (1 << 31) {
            return err("limits.max_message_size", "must be at most 2 GiB".into());
        }
        if self.limits.max_recipients == 0 {
            return err("limits.max_recipients", "must be at least 1 (RFC 5321 asks for 100)".into());
        }
        if self.queue.retry_intervals.is_empty() {
            return err("queue.retry_intervals", "at least one interval is needed".into());
        }
        if let Some(i) = self.queue.retry_intervals.iter().position(|d| d.0 < Duration::from_secs(1)) {
            return err(&format!("queue.retry_intervals[{i}]"), "must be at least 1s".into());
        }
        if self.queue.max_hop_count == 0 {
            return err("queue.max_hop_count", "must be at least 1 (RFC 5321 asks for 100)".into());
        }
        if self.queue.expire_after.0 < Duration::from_secs(1) {
            return err("queue.expire_after", "must be at least 1s".into());
        }
        if !self.queue.ndr_copy_to.is_empty()
            && mailroot_actors::protocol::address::parse_mailbox(&self.queue.ndr_copy_to).is_err()
        {
            return err("queue.ndr_copy_to", format!("{:?} is not an email address", self.queue.ndr_copy_to));
        }
        let d = &self.delivery;
        if d.remote_port == 0 {
            return err("delivery.remote_port", "must be 1-65535".into());
        }
        d.nameserver_addrs()?;
        if !d.smart_host.is_empty() {
            SmartHost::parse(&d.smart_host).map_err(|e| ConfigError(format!("delivery.smart_host: {e}")))?;
        }
        for (key, v) in [
            ("delivery.max_connections", d.max_connections),
            ("delivery.max_connections_per_domain", d.max_connections_per_domain),
            ("delivery.max_messages_per_connection", d.max_messages_per_connection),
        ] {
            if v == 0 {
                return err(key, "must be at least 1".into());
            }
        }
        for (key, v) in [
            ("delivery.dns_timeout", d.dns_timeout),
            ("delivery.connect_timeout", d.connect_timeout),
            ("delivery.command_timeout", d.command_timeout),
            ("delivery.data_timeout", d.data_timeout),
        ] {
            if v.0.is_zero() {
                return err(key, "must be more than 0".into());
            }
        }
        if !d.helo_name.is_empty() && validate_domain(&d.helo_name).is_err() {
            return err("delivery.helo_name", format!("{:?} is not a valid host name", d.helo_name));
        }
        if !d.masquerade_domain.is_empty() && validate_domain(&d.masquerade_domain).is_err() {
            return err("delivery.masquerade_domain", format!("{:?} is not a valid domain", d.masquerade_domain));
        }
        if self.tls.cert.as_os_str().is_empty() != self.tls.key.as_os_str().is_empty() {
            return err("tls", "cert and key go together: set both or neither".into());
        }
        if self.tls.required && !self.tls.enabled() {
            return err("tls.required", "needs tls.cert and tls.key".into());
        }
        if !self.auth.users_file.as_os_str().is_empty() && !self.tls.enabled() && !self.auth.allow_plaintext_loopback {
            return err(
                "auth.users_file",
                "AUTH is only offered over TLS: set tls.cert and tls.key, or auth.allow_plaintext_loopback".into(),
            );
        }
        if !self.admin.listen.is_empty() {
            self.admin_addr()?;
        }
        let table = RouteTable::new(&self.routes).map_err(|e| ConfigError(format!("routes: {e}")))?;
        for name in table.names() {
            let missing = match name {
                "smarthost" if self.delivery.smart_host.is_empty() => Some("delivery.smart_host"),
                "maildir" if self.maildir.path.is_empty() => Some("maildir.path"),
                "lmtp" if self.lmtp.address.is_empty() => Some("lmtp.address"),
                _ => None,
            };
            if let Some(key) = missing {
                return err("routes", format!("route {name:?} needs {key}"));
            }
        }
        // `host:port` (an IPv6 literal as `[::1]:24`), or a socket path.
        let a = &self.lmtp.address;
        let host_port = a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !a.is_empty() && !a.starts_with("unix:/") && !host_port {
            return err("lmtp.address", format!("{:?} is neither host:port nor unix:/path", self.lmtp.address));
        }
        if self.lmtp.max_connections == 0 {
            return err("lmtp.max_connections", "must be at least 1".into());
        }
        if self.lmtp.timeout.0.is_zero() {
            return err("lmtp.timeout", "must be more than 0".into());
        }
        if !self.maildir.path.is_empty()
            && !self.maildir.path.contains("{user}")
            && !self.maildir.path.contains("{address}")
        {
            return err(
                "maildir.path",
                "must contain {user} or {address}, or every recipient shares one Maildir".into(),
            );
        }
        for (name, r) in &self.domains.remote {
            if validate_domain(name).is_err() || name.starts_with('[') {
                return err(&format!("domains.remote.{name:?}"), "not a valid domain".into());
            }
            if !r.smart_host.is_empty() {
                SmartHost::parse(&r.smart_host)
                    .map_err(|e| ConfigError(format!("domains.remote.{name:?}.smart_host: {e}")))?;
            }
        }
        Ok(())
    }

    /// The AUTH users from `auth.users_file` (`None` when AUTH is off).
    pub fn load_users(&self) -> Result<Option<HashMap<String, String>>, ConfigError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct UsersFile {
            #[serde(default)]
            users: HashMap<String, String>,
        }
        let path = &self.auth.users_file;
        if path.as_os_str().is_empty() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("auth.users_file: {}: {e}", path.display())))?;
        let file: UsersFile =
            toml::from_str(&text).map_err(|e| ConfigError(format!("auth.users_file: {}: {e}", path.display())))?;
        Ok(Some(file.users))
    }

    /// Remote domains anyone may relay to (`relay_allowed = true`).
    pub fn relay_domains(&self) -> mailroot_actors::protocol::LocalDomains {
        mailroot_actors::protocol::LocalDomains::new(
            self.domains.remote.iter().filter(|(_, r)| r.relay_allowed).map(|(d, _)| d.clone()),
        )
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
        let mut domains = BTreeMap::new();
        for (name, r) in &self.domains.remote {
            domains.insert(
                name.to_ascii_lowercase(),
                DomainPolicy { smart_host: smart(&r.smart_host)?, require_tls: r.require_tls },
            );
        }
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
        })
    }

    /// The local domains, default first.
    pub fn local_domains(&self) -> mailroot_actors::protocol::LocalDomains {
        mailroot_actors::protocol::LocalDomains::new(&self.domains.local)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases = [("30s", 30), ("15m", 900), ("2h", 7200), ("5d", 432_000), (" 1m ", 60)];
        for (s, secs) in cases {
            assert_eq!(HumanDuration::parse(s), Ok(HumanDuration(Duration::from_secs(secs))), "{s}");
        }
        assert_eq!(HumanDuration::parse("250ms"), Ok(HumanDuration(Duration::from_millis(250))));
        for bad in ["", "m", "15", "15x", "-1m", "1.5h"] {
            assert!(HumanDuration::parse(bad).is_err(), "{bad}");
        }
        for (secs, shown) in [(90, "90s"), (900, "15m"), (7200, "2h"), (172_800, "2d")] {
            assert_eq!(HumanDuration(Duration::from_secs(secs)).to_string(), shown);
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[server]\nlisten = [\"nonsense\"]\n", "server.listen[0]"),
            ("[server]\nidle_timeout = \"5 minutes\"\n", "idle_timeout"),
            ("[server]\nmax_connections = 0\n", "server.max_connections"),
            ("[server]\nbogus = 1\n", "bogus"),
            ("[domains]\nlocal = []\n", "domains.local"),
            ("[domains]\nlocal = [\"ok.test\", \"bad domain\"]\n", "domains.local[1]"),
            ("[relay]\nallow_networks = [\"10.0.0.0/33\"]\n", "allow_networks"),
            ("[limits]\nmax_message_size = 10\n", "limits.max_message_size"),
            ("[limits]\nmax_recipients = \"many\"\n", "max_recipients"),
            ("[tls]\ncert = \"a.pem\"\n", "tls"),
            ("[tls]\nrequired = true\n", "tls.required"),
            ("[auth]\nusers_file = \"u.toml\"\n", "auth.users_file"),
            ("[access]\nallow = [\"nonsense\"]\n", "allow"),
            ("[access]\nreverse = true\n", "reverse"),
            ("[limits]\nerror_delay = \"soon\"\n", "error_delay"),
            ("[delivery]\nremote_port = 0\n", "delivery.remote_port"),
            ("[delivery]\nnameservers = [\"dns.example\"]\n", "delivery.nameservers[0]"),
            ("[delivery]\nsmart_host = \"[broken\"\n", "delivery.smart_host"),
            ("[delivery]\nmax_connections_per_domain = 0\n", "delivery.max_connections_per_domain"),
            ("[delivery]\ncommand_timeout = \"0s\"\n", "delivery.command_timeout"),
            ("[delivery]\nhelo_name = \"bad name\"\n", "delivery.helo_name"),
            ("[delivery]\nbogus = 1\n", "bogus"),
            ("[queue]\nndr_copy_to = \"not an address\"\n", "queue.ndr_copy_to"),
            ("[queue]\nexpire_after = \"0s\"\n", "queue.expire_after"),
            ("[domains.remote.\"x.test\"]\nsmart_host = \"a b\"\n", "smart_host"),
            ("[domains.remote.\"x.test\"]\nrelay = true\n", "relay"),
            ("[queue]\nmax_hop_count = 0\n", "queue.max_hop_count"),
            ("[queue]\nretry_intervals = []\n", "queue.retry_intervals"),
            ("[queue]\nretry_intervals = [\"1m\", \"10ms\"]\n", "queue.retry_intervals[1]"),
            ("[nosuch]\n", "nosuch"),
            ("[admin]\nlisten = \"localhost\"\n", "admin.listen"),
            ("[routes]\n\"*\" = \"drop\"\n", "routes"),
            ("[routes]\n\"a.test\" = \"maildir\"\n", "maildir.path"),
            ("[routes]\n\"a.test\" = \"lmtp\"\n", "lmtp.address"),
            ("[routes]\n\"a.test\" = \"smarthost\"\n", "delivery.smart_host"),
            ("[lmtp]\naddress = \"dovecot\"\n", "lmtp.address"),
            ("[lmtp]\naddress = \"unix:relative/path\"\n", "lmtp.address"),
            ("[lmtp]\naddress = \":24\"\n", "lmtp.address"),
            ("[maildir]\npath = \"/var/mail/shared\"\n", "maildir.path"),
            ("[server]\nshutdown_grace = \"soon\"\n", "shutdown_grace"),
        ];
        for (text, key) in cases {
            let e = Config::from_toml(text).expect_err(text).0;
            assert!(e.contains(key), "error for {text:?} should name {key}: {e}");
        }
    }

    #[test]
    fn the_shipped_config_is_valid_and_matches_the_defaults() {
        let text = include_str!("../config/mailroot.toml");
        let c = Config::from_toml(text).unwrap();
        let d = Config::default();
        assert_eq!(c.server.listen, d.server.listen);
        assert_eq!(c.domains.local, d.domains.local);
        assert_eq!(c.limits.max_message_size, d.limits.max_message_size);
        assert_eq!(c.server.idle_timeout, d.server.idle_timeout);
        assert_eq!(c.queue.expire_after, d.queue.expire_after);
        assert_eq!(c.queue.delay_notice_after, d.queue.delay_notice_after);
        assert_eq!(c.delivery.remote_port, d.delivery.remote_port);
        assert_eq!(c.delivery.max_messages_per_connection, d.delivery.max_messages_per_connection);
        assert_eq!(c.delivery.command_timeout, d.delivery.command_timeout);
        assert_eq!(c.server.shutdown_grace, d.server.shutdown_grace);
        assert_eq!(
            (c.admin.listen.as_str(), c.admin.metrics_public),
            (d.admin.listen.as_str(), d.admin.metrics_public)
        );
        assert_eq!((c.lmtp.max_connections, c.lmtp.timeout), (d.lmtp.max_connections, d.lmtp.timeout));
        assert!(c.routes.is_empty() && c.log.protocol.is_empty() && c.maildir.path.is_empty());
        // What check-config prints loads back to the same thing.
        let again = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }

    #[test]
    fn lmtp_addresses() {
        for ok in ["127.0.0.1:24", "[::1]:24", "lmtp.internal:24", "unix:/run/dovecot/lmtp"] {
            let text = format!("[lmtp]\naddress = \"{ok}\"\n");
            assert!(Config::from_toml(&text).is_ok(), "{ok}");
        }
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let mut c = Config::from_toml("[mailroot]\npath = \"spool\"\n").unwrap();
        c.resolve_paths(Path::new("/etc/mailroot"));
        assert_eq!(c.mailroot.path, PathBuf::from("/etc/mailroot/spool"));
        let mut c = Config::from_toml("[mailroot]\npath = \"/var/spool/mailroot\"\n").unwrap();
        c.resolve_paths(Path::new("/etc/mailroot"));
        assert_eq!(c.mailroot.path, PathBuf::from("/var/spool/mailroot"));
    }
}
