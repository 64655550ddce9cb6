//! The sections of the configuration file and their defaults (what a fresh machine runs with).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use mailroot_actors::queue::QueueSettings;
use mailroot_actors::remote::RemoteSettings;
use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// `address:port` of the admin HTTP API; empty = not started.
    pub listen: String,
    /// Every request needs `Authorization: Bearer <token>`. Empty: a token is generated at the
    /// first start into `<Mailroot>/admin.token` (0600), which the CLI reads by itself.
    pub token: String,
    /// Serve /metrics without the token.
    pub metrics_public: bool,
    /// Host names the API answers to besides addresses and `localhost` (DNS-rebinding defence).
    pub hosts: Vec<String>,
    /// The path under which a reverse proxy passes the API and the console on without removing
    /// it (`/mailroot`): requests are served with and without it. Empty: none.
    pub path_prefix: String,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: "127.0.0.1:8025".into(),
            token: String::new(),
            metrics_public: false,
            hosts: Vec::new(),
            path_prefix: String::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// W3C extended protocol log, one line per SMTP command; `%Y`, `%m`, `%d` are replaced
    /// (a new file each day). Relative to the config's folder; empty = off.
    pub protocol: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaildirRoute {
    /// Each recipient's Maildir: `{user}`, `{domain}` and `{address}` are replaced. Empty = the
    /// `maildir` route is not available.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmtpRoute {
    /// `host:port` or `unix:/path`; empty = the `lmtp` route is not available.
    pub address: String,
    pub max_connections: usize,
    pub timeout: HumanDuration,
    /// A connection is kept this long after a clean transaction, then closed with QUIT.
    pub idle_timeout: HumanDuration,
    /// Recipients of domains routed here are checked with the server at RCPT (no backscatter).
    pub verify_recipients: bool,
    /// How long such a check may take before RCPT gets 451 4.4.3.
    pub verify_timeout: HumanDuration,
}

impl Default for LmtpRoute {
    fn default() -> Self {
        LmtpRoute {
            address: String::new(),
            max_connections: 8,
            timeout: HumanDuration(Duration::from_secs(300)),
            idle_timeout: HumanDuration(mailroot_actors::lmtp::IDLE),
            verify_recipients: true,
            verify_timeout: HumanDuration(Duration::from_secs(10)),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// TOML file with a `[users]` table of `name = "argon2 hash"`; empty = AUTH off.
    pub users_file: PathBuf,
    /// Offer AUTH in clear text to loopback clients (local submission without TLS).
    pub allow_plaintext_loopback: bool,
    /// Failed AUTH attempts allowed per client address (IPv6: per /64) within `failure_window`,
    /// across connections; after that, AUTH gets 454 4.7.0 unchecked. 0 = no limit.
    pub max_failures: u32,
    /// The window of `max_failures`, and so how long a lockout lasts at most.
    pub failure_window: HumanDuration,
    /// Login = the senders it may use (`"alice@example.com"`, `"@example.org"`); when any is
    /// set, an authenticated user giving another sender gets 553 5.7.1. Empty = not checked.
    pub senders: BTreeMap<String, Vec<String>>,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            users_file: PathBuf::new(),
            allow_plaintext_loopback: false,
            max_failures: 5,
            failure_window: HumanDuration(Duration::from_secs(15 * 60)),
            senders: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// The name used in the greeting, in EHLO and in `Received:` headers.
    pub hostname: String,
    pub listen: Vec<String>,
    pub max_connections: usize,
    pub idle_timeout: HumanDuration,
    /// The idle timeout once open connections reach 3/4 of `max_connections` (Postfix's stress
    /// mode): idle clients make room for new ones.
    pub stress_idle_timeout: HumanDuration,
    /// Bytes per second a client must keep up, on average over `min_transfer_window`, while it is
    /// in the middle of a command line or a message (a slow-drip client is cut); 0 = no minimum.
    pub min_transfer_rate: u64,
    /// The window over which `min_transfer_rate` is averaged.
    pub min_transfer_window: HumanDuration,
    /// At stop, sessions may finish the transaction under way and deliveries in flight may end
    /// for this long; then sessions get 421 and the rest stays queued.
    pub shutdown_grace: HumanDuration,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            hostname: system_hostname(),
            listen: vec!["127.0.0.1:2525".into()],
            // An idle session costs a few KB: 10,000 take well under 100 MB (docs/performance.md).
            max_connections: 5000,
            idle_timeout: HumanDuration(Duration::from_secs(300)),
            stress_idle_timeout: HumanDuration(Duration::from_secs(10)),
            min_transfer_rate: 100,
            min_transfer_window: HumanDuration(Duration::from_secs(30)),
            shutdown_grace: HumanDuration(Duration::from_secs(30)),
        }
    }
}

/// `[rates]`: inbound limits per client address (IPv6 per /64) and per authenticated user,
/// across connections, per `window`; 0 = no limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rates {
    pub window: HumanDuration,
    /// Messages (MAIL commands) per client per window: over it, 450 4.7.1.
    pub messages_per_client: u32,
    /// Recipients (RCPT commands past the relay check) per client per window: 450 4.7.1.
    pub recipients_per_client: u32,
    /// Unknown recipients per client per window (directory harvesting): 421 4.7.0, closed.
    pub failed_recipients_per_client: u32,
    /// The same for an authenticated user, wherever it connects from.
    pub messages_per_user: u32,
    pub recipients_per_user: u32,
}

impl Default for Rates {
    fn default() -> Self {
        Rates {
            window: HumanDuration(Duration::from_secs(60)),
            messages_per_client: 0,
            recipients_per_client: 0,
            failed_recipients_per_client: 20,
            messages_per_user: 0,
            recipients_per_user: 0,
        }
    }
}

/// `[checks]`: who inbound mail is from (SPF, DKIM, ARC, DMARC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Checks {
    /// Check mail from clients that are neither authenticated nor in `relay.allow_networks`,
    /// on `mx` listeners (a listener's `checks` overrides).
    pub enabled: bool,
    /// `record` (only in the header; DMARC decides) or `reject` (550 5.7.23 for an SPF `fail`).
    pub spf_fail: String,
    /// `enforce` (`p=reject` refused, `p=quarantine` marked) or `record`.
    pub dmarc: String,
    /// The header line added to mail DMARC says to quarantine.
    pub quarantine_header: String,
    /// All checks of one message, at most.
    pub timeout: HumanDuration,
    /// Messages checked at once, at most (others wait, within the timeout).
    pub max_concurrent: usize,
    /// DKIM and ARC are verified for messages up to this size (bytes).
    pub max_message_size: u64,
    /// DNS block lists asked at connect; a listed client gets 554 5.7.1 instead of a greeting.
    pub dnsbl: Vec<String>,
    /// DNS allow lists: a client listed in one is not looked up in the block lists.
    pub dnswl: Vec<String>,
    /// Forwarders whose ARC seal may excuse a DMARC failure (mailing lists you know).
    pub trusted_arc_sealers: Vec<String>,
}

impl Default for Checks {
    fn default() -> Self {
        let c = mailroot_actors::checks::CheckSettings::default();
        Checks {
            enabled: true,
            spf_fail: "record".into(),
            dmarc: "enforce".into(),
            quarantine_header: c.quarantine_header,
            timeout: HumanDuration(c.timeout),
            max_concurrent: c.max_concurrent,
            max_message_size: c.max_message_size as u64,
            dnsbl: Vec::new(),
            dnswl: Vec::new(),
            trusted_arc_sealers: Vec::new(),
        }
    }
}

/// `[recipients."domain"]`: the recipient map of one local domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecipientMap {
    /// Local parts that are mailboxes here.
    pub users: Vec<String>,
    /// Local part = the addresses it forwards to (a bare local part is in this domain).
    pub aliases: BTreeMap<String, Vec<String>>,
    /// Where mail to other local parts goes; empty = refused with 550 5.1.1.
    pub catch_all: Vec<String>,
    /// The subaddress separator (`user+tag@`); `""` = none.
    pub delimiter: String,
}

impl Default for RecipientMap {
    fn default() -> Self {
        RecipientMap { users: Vec::new(), aliases: BTreeMap::new(), catch_all: Vec::new(), delimiter: "+".into() }
    }
}

/// `[srs]`: the Sender Rewriting Scheme for mail forwarded to other domains.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Srs {
    /// The domain of SRS addresses (default: the first local domain). Bounces come back to it.
    pub domain: String,
    /// The secret (hex or any text, one line). Empty: `<Mailroot>/srs.key`, made at the first
    /// start (0600). Keep it when moving: bounces of earlier forwards need it for 21 days.
    pub secret_file: PathBuf,
}

/// What a listener is for (RFC 6409, RFC 8314).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Port 25: anyone may deliver to the local domains; AUTH optional.
    Mx,
    /// Port 587: STARTTLS, then AUTH before MAIL.
    Submission,
    /// Port 465: TLS from the first byte, then AUTH before MAIL.
    Submissions,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "mx" => Some(Role::Mx),
            "submission" => Some(Role::Submission),
            "submissions" => Some(Role::Submissions),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Mx => "mx",
            Role::Submission => "submission",
            Role::Submissions => "submissions",
        }
    }
}

/// `[listeners."name"]`: one more set of SMTP sockets with a role and its own settings. What a
/// listener does not set comes from the global sections (`[server]`, `[tls]`, `[auth]`,
/// `[limits]`, `[relay]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerSection {
    /// `mx`, `submission` or `submissions`.
    pub role: String,
    pub listen: Vec<String>,
    /// Connections open at once on this listener (default `server.max_connections`).
    pub max_connections: Option<usize>,
    /// This listener's own certificate (default `[tls]`'s). Relative to the config's folder.
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// Mail commands before STARTTLS get 530 (default: `true` for `submission`, `tls.required`
    /// for `mx`).
    pub tls_required: Option<bool>,
    /// Offer AUTH (default: when `auth.users_file` is set; submission roles always do).
    pub auth: Option<bool>,
    pub max_message_size: Option<u64>,
    pub max_recipients: Option<usize>,
    /// Who may relay without AUTH (`mx` only; default `relay.allow_networks`).
    pub relay_networks: Option<Vec<IpNet>>,
    /// Check who mail is from here (default `checks.enabled`).
    pub checks: Option<bool>,
    /// This listener's own `checks.dmarc` and `checks.spf_fail`.
    pub dmarc: Option<String>,
    pub spf_fail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteDomain {
    /// Send this domain's mail to this host instead of its MX hosts.
    pub smart_host: String,
    /// Anyone may send mail for this domain through us (we are its backup MX).
    pub relay_allowed: bool,
    /// Deliver only over STARTTLS; otherwise the mail waits (= `tls_policy = "require"`).
    pub require_tls: bool,
    /// `opportunistic`, `require` or `verify`; empty = the default of its route.
    pub tls_policy: String,
    /// Login at this domain's smart host: user name, and the password from a file (0600) or an
    /// environment variable.
    pub username: String,
    pub password_file: PathBuf,
    pub password_env: String,
    /// Recipients per transaction for this domain; 0 = delivery.max_recipients_per_transaction.
    pub max_recipients: usize,
    /// Connections to this domain at once; 0 = delivery.max_connections_per_domain.
    pub max_connections: usize,
    /// Messages a minute to this domain; 0 = delivery.messages_per_minute_per_domain.
    pub messages_per_minute: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Bytes all sessions together may hold in message bodies while they arrive; a message that
    /// does not fit is refused with 452 4.3.1 (try again later).
    pub max_body_memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 26_214_400,
            max_recipients: 100,
            max_messages_per_connection: 0,
            max_errors: 10,
            error_delay: HumanDuration(Duration::from_millis(500)),
            max_body_memory: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// The same two for local routes (Drop, Maildir, LMTP, custom actors); empty = as above.
    pub local_expire_after: String,
    pub local_delay_notice_after: String,
    /// Gets a copy of every non-delivery report; empty = nobody.
    pub ndr_copy_to: String,
    /// Bytes that must stay free on the Queue folder's filesystem: below it, MAIL gets
    /// 452 4.3.1 (as does a declared SIZE= larger than the space above it). 0 = no check.
    pub min_free_space: u64,
    /// Where the queue lives: `sled` (embedded in the Queue folder, the default) or `postgres`
    /// (a PostgreSQL database several nodes share; see `[queue.postgres]`).
    pub store: String,
    pub postgres: QueuePostgres,
}

/// `[queue.postgres]`: the shared queue on PostgreSQL (`queue.store = "postgres"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueuePostgres {
    /// `postgres://user@host:port/database` (or libpq's `host=… dbname=…`); a password is better
    /// given with `password_file` or `password_env` than here.
    pub url: String,
    /// Read the password from this file (its first line; 0600: only its owner may read it).
    pub password_file: PathBuf,
    /// … or from this environment variable.
    pub password_env: String,
    /// The schema mailroot's tables live in; created and migrated by mailroot.
    pub schema: String,
    /// This node's name among the nodes sharing the queue (on its leases and Pickup marks);
    /// empty = `server.hostname`. Two running nodes must never share a name.
    pub node: String,
    /// Connections to the database at most.
    pub pool_size: usize,
    /// A message this node works on stays its own this long without a renewal (renewed every
    /// third of it); after a node dies, its messages go to the others after this.
    pub lease: HumanDuration,
    /// How often a node looks for work the others left or could not finish.
    pub poll_every: HumanDuration,
    pub connect_timeout: HumanDuration,
    pub statement_timeout: HumanDuration,
    /// `auto` (none to this machine, `verify` to any other), `off`, `require` (encrypted, any
    /// certificate) or `verify` (chain and name checked).
    pub tls: String,
    /// The CA certificates (PEM) `verify` trusts; empty = the system's roots.
    pub ca_file: PathBuf,
}

impl Default for QueuePostgres {
    fn default() -> Self {
        let p = mailroot_actors::store::PgSettings::default();
        QueuePostgres {
            url: String::new(),
            password_file: PathBuf::new(),
            password_env: String::new(),
            schema: p.schema,
            node: String::new(),
            pool_size: p.pool_size,
            lease: HumanDuration(p.lease),
            poll_every: HumanDuration(p.poll_every),
            connect_timeout: HumanDuration(p.connect_timeout),
            statement_timeout: HumanDuration(p.statement_timeout),
            tls: "auto".into(),
            ca_file: PathBuf::new(),
        }
    }
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
            local_expire_after: String::new(),
            local_delay_notice_after: String::new(),
            ndr_copy_to: String::new(),
            min_free_space: 100 * 1024 * 1024,
            store: "sled".into(),
            postgres: QueuePostgres::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// TLS policy of MX delivery: `opportunistic`, `require` or `verify`.
    pub tls_policy: String,
    /// TLS policy of the smart host (`verify`: chain and name checked).
    pub smart_host_tls: String,
    /// PEM file of the roots `verify` trusts instead of the system's; empty = the system's.
    pub ca_file: PathBuf,
    /// Login at the smart host: user name, and the password from a file (0600) or an
    /// environment variable.
    pub smart_host_username: String,
    pub smart_host_password_file: PathBuf,
    pub smart_host_password_env: String,
    /// Credentials may go over a connection without TLS and a verified certificate.
    pub allow_unverified_auth: bool,
    /// Smart hosts speak TLS from the first byte (RFC 8314); always so on port 465.
    pub smart_host_implicit_tls: bool,
    /// Recipients per transaction at most; the rest go in further transactions at once.
    pub max_recipients_per_transaction: usize,
    /// Messages a minute to one destination (domain or smart host); 0 = no limit.
    pub messages_per_minute_per_domain: u32,
    /// Honour the MTA-STS policies (RFC 8461) of domains without a `tls_policy` of their own.
    pub mta_sts: bool,
    /// The HTTPS port policies are fetched from (443; other values are for tests).
    pub mta_sts_port: u16,
    /// DANE (RFC 7672) with the AD bit of the resolvers, which must validate DNSSEC and be
    /// trusted (a local unbound): off by default.
    pub dane: bool,
    /// Send yesterday's SMTP TLS reports (RFC 8460) each day to the domains that ask for them.
    pub tls_reports: bool,
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
            tls_policy: r.tls_policy.name().into(),
            smart_host_tls: r.smart_host_tls.name().into(),
            ca_file: PathBuf::new(),
            smart_host_username: String::new(),
            smart_host_password_file: PathBuf::new(),
            smart_host_password_env: String::new(),
            allow_unverified_auth: false,
            smart_host_implicit_tls: false,
            max_recipients_per_transaction: r.max_recipients_per_transaction,
            messages_per_minute_per_domain: r.messages_per_minute_per_domain,
            mta_sts: r.mta_sts,
            mta_sts_port: r.mta_sts_port,
            dane: r.dane,
            tls_reports: true,
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

/// One signing domain's DKIM settings (`[dkim."example.com"]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimDomain {
    /// The selector of the key in `key` (its DNS record is `<selector>._domainkey.<domain>`).
    pub selector: String,
    /// The private key, PEM (what `mailroot dkim keygen` writes); not readable by all users.
    pub key: PathBuf,
    /// `rsa` or `ed25519`; empty = whatever the key file holds.
    pub algorithm: String,
    /// More keys, each signing too (dual signing: an ed25519 and an RSA key, or a key being
    /// rolled over).
    pub keys: Vec<DkimKey>,
    /// Headers to sign; empty = mailroot's list (From, To, Subject, Date, Message-ID, MIME…).
    pub headers: Vec<String>,
    /// Headers signed once more than they occur, so none can be added after signing.
    pub oversign: Vec<String>,
    /// Signatures expire (`x=`) this long after signing; empty = never.
    pub expire: String,
}

impl Default for DkimDomain {
    fn default() -> Self {
        DkimDomain {
            selector: String::new(),
            key: PathBuf::new(),
            algorithm: String::new(),
            keys: Vec::new(),
            headers: Vec::new(),
            oversign: mailroot_actors::dkim::DEFAULT_OVERSIGN.iter().map(|h| h.to_string()).collect(),
            expire: String::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimKey {
    pub selector: String,
    pub key: PathBuf,
    pub algorithm: String,
}

/// A duration in the configuration file, in humantime's syntax: `"30s"`, `"15m"`, `"1h 30m"`,
/// `"5d"`, `"250ms"`. A value too large to represent is an error naming the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| format!("invalid duration {s:?} ({e}); write a number and a unit, e.g. \"15m\" or \"1h 30m\""))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases = [
            ("30s", 30),
            ("15m", 900),
            ("2h", 7200),
            ("5d", 432_000),
            (" 1m ", 60),
            ("1h 30m", 5400),
            ("1.5h", 5400),
            ("5 minutes", 300),
        ];
        for (s, secs) in cases {
            assert_eq!(HumanDuration::parse(s), Ok(HumanDuration(Duration::from_secs(secs))), "{s}");
        }
        assert_eq!(HumanDuration::parse("250ms"), Ok(HumanDuration(Duration::from_millis(250))));
        for bad in ["", "m", "15", "15x", "-1m", "5 parsecs", "999999999999999999d", "18446744073709551616s"] {
            assert!(HumanDuration::parse(bad).is_err(), "{bad}");
        }
        for (secs, shown) in [(90, "1m 30s"), (900, "15m"), (7200, "2h"), (172_800, "2days")] {
            let d = HumanDuration(Duration::from_secs(secs));
            assert_eq!(d.to_string(), shown);
            assert_eq!(HumanDuration::parse(shown), Ok(d), "what is shown reads back");
        }
    }
}
