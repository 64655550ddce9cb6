//! Validation of a parsed configuration: every error names the key at fault
//! (`server.listen[0]: …`), so an operator knows what to fix.

use std::time::Duration;

use mailroot_actors::remote::SmartHost;
use mailroot_actors::routes::RouteTable;

use super::Role;
use super::{Config, ConfigError};

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, msg: String| Err(ConfigError(format!("{key}: {msg}")));
        use mailroot_actors::protocol::address::validate_domain;
        if validate_domain(&self.server.hostname).is_err() {
            return err("server.hostname", format!("{:?} is not a valid host name", self.server.hostname));
        }
        if self.server.listen.is_empty() && self.listeners.is_empty() {
            return err("server.listen", "at least one address is needed (or a [listeners.\"name\"] section)".into());
        }
        let defs = self.listener_defs()?;
        let mut seen = std::collections::HashSet::new();
        for def in &defs {
            // Port 0 (any free port, as tests use) never collides.
            for a in def.addrs.iter().filter(|a| a.port() != 0) {
                if !seen.insert(*a) {
                    return err(&def.key, format!("{a} is also another listener's address"));
                }
            }
        }
        for def in defs.iter().filter(|d| d.role != Role::Mx) {
            let key = &def.key;
            let section = &self.listeners[&def.name];
            if self.auth.users_file.as_os_str().is_empty() {
                return err(key, format!("role {:?} needs AUTH: set auth.users_file", def.role.as_str()));
            }
            if section.auth == Some(false) {
                return err(&format!("{key}.auth"), format!("role {:?} always offers AUTH", def.role.as_str()));
            }
            if !self.tls.enabled() && section.tls_cert.as_os_str().is_empty() {
                return err(
                    key,
                    format!("role {:?} needs a certificate: set tls_cert and tls_key, or [tls]", def.role.as_str()),
                );
            }
            if section.relay_networks.is_some() {
                return err(
                    &format!("{key}.relay_networks"),
                    "a submission listener relays for authenticated users only".into(),
                );
            }
        }
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
        self.check_settings()?;
        if self.rates.window.0 < Duration::from_secs(1) {
            return err("rates.window", "must be at least 1s".into());
        }
        for domain in self.recipients.keys() {
            if !self.local_domains().contains(domain) {
                return err(&format!("recipients.\"{domain}\""), "maps are for local domains (domains.local)".into());
            }
        }
        if let Err(e) = self.recipient_maps() {
            return err("recipients", e.0);
        }
        if !self.srs.domain.is_empty() && !self.local_domains().contains(&self.srs.domain) {
            return err(
                "srs.domain",
                format!("{:?} is not a local domain: bounces to it would not reach us", self.srs.domain),
            );
        }
        if let Err(e) = mailroot_actors::protocol::senders::SenderLogins::new(
            self.auth.senders.iter().map(|(k, v)| (k.clone(), v.clone())),
        ) {
            return err("auth.senders", e);
        }
        for (domain, d) in &self.dkim {
            let key = format!("dkim.\"{domain}\"");
            if validate_domain(domain).is_err() || !domain.contains('.') {
                return err(&key, format!("{domain:?} is not a domain name"));
            }
            let keys = std::iter::once((d.selector.as_str(), &d.key))
                .filter(|(s, k)| !s.is_empty() || !k.as_os_str().is_empty())
                .chain(d.keys.iter().map(|k| (k.selector.as_str(), &k.key)));
            let mut n = 0;
            for (selector, file) in keys {
                n += 1;
                if selector.is_empty()
                    || !selector
                        .split('.')
                        .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
                {
                    return err(&key, format!("selector {selector:?} is not a DNS label (letters, digits, '-')"));
                }
                if file.as_os_str().is_empty() {
                    return err(&key, format!("selector {selector:?} has no key file"));
                }
            }
            if n == 0 {
                return err(&key, "no key: set selector and key (and keys = [...] for more)".into());
            }
        }
        if self.limits.max_message_size < 1024 {
            return err("limits.max_message_size", "must be at least 1024 bytes (RFC 5321 asks for 64 KB)".into());
        }
        if self.limits.max_body_memory < 1024 * 1024 {
            return err(
                "limits.max_body_memory",
                "must be at least 1 MiB (a session receiving a message holds up to about 128 KiB of it)".into(),
            );
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
        match self.queue.store.as_str() {
            "sled" => {}
            "postgres" => {
                let pg = &self.queue.postgres;
                if pg.url.trim().is_empty() {
                    return err("queue.postgres.url", "queue.store is postgres: give the database's URL".into());
                }
                if let Err(e) = mailroot_actors::store::postgres::check_url(&pg.url) {
                    return err("queue.postgres.url", e);
                }
                if !mailroot_actors::store::postgres::valid_schema(&pg.schema) {
                    return err("queue.postgres.schema", "lower-case letters, digits and _ only, at most 63".into());
                }
                let node_ok = |n: &str| {
                    !n.is_empty()
                        && n.len() <= 64
                        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                };
                if !pg.node.is_empty() && !node_ok(&pg.node) {
                    return err("queue.postgres.node", "letters, digits, '.', '_' and '-' only, at most 64".into());
                }
                if let Err(e) = mailroot_actors::store::PgTls::parse(&pg.tls) {
                    return err("queue.postgres.tls", e);
                }
                if pg.pool_size < 2 {
                    return err("queue.postgres.pool_size", "at least 2 (commits and reads run side by side)".into());
                }
                if pg.lease.0 < Duration::from_secs(10) {
                    return err("queue.postgres.lease", "at least 10s".into());
                }
                for (key, d) in [
                    ("queue.postgres.poll_every", pg.poll_every.0),
                    ("queue.postgres.connect_timeout", pg.connect_timeout.0),
                    ("queue.postgres.statement_timeout", pg.statement_timeout.0),
                ] {
                    if d < Duration::from_secs(1) {
                        return err(key, "at least 1s".into());
                    }
                }
            }
            other => return err("queue.store", format!("{other:?} is not sled or postgres")),
        }
        if self.queue.max_hop_count == 0 {
            return err("queue.max_hop_count", "must be at least 1 (RFC 5321 asks for 100)".into());
        }
        for (key, v) in [
            ("queue.local_expire_after", &self.queue.local_expire_after),
            ("queue.local_delay_notice_after", &self.queue.local_delay_notice_after),
        ] {
            if !v.trim().is_empty() {
                match super::HumanDuration::parse(v.trim()) {
                    Ok(d) if d.0 >= Duration::from_secs(1) => {}
                    Ok(_) => return err(key, "must be at least 1s".into()),
                    Err(e) => return err(key, e),
                }
            }
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
        let prefix = &self.admin.path_prefix;
        if !prefix.is_empty() {
            let safe = prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b));
            if !prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains("//") || !safe {
                return err(
                    "admin.path_prefix",
                    format!("{prefix:?}: a path such as \"/mailroot\" (starts with /, no / at the end, letters, digits, - . _ ~)"),
                );
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[server]\nlisten = [\"nonsense\"]\n", "server.listen[0]"),
            ("[server]\nidle_timeout = \"5 parsecs\"\n", "idle_timeout"),
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
            ("[admin]\npath_prefix = \"mailroot\"\n", "admin.path_prefix"),
            ("[admin]\npath_prefix = \"/mailroot/\"\n", "admin.path_prefix"),
            ("[admin]\npath_prefix = \"/a b\"\n", "admin.path_prefix"),
            ("[admin]\npath_prefix = \"/a\\\"<x>\"\n", "admin.path_prefix"),
            ("[routes]\n\"*\" = \"drop\"\n", "routes"),
            ("[routes]\n\"a.test\" = \"maildir\"\n", "maildir.path"),
            ("[routes]\n\"a.test\" = \"lmtp\"\n", "lmtp.address"),
            ("[routes]\n\"a.test\" = \"smarthost\"\n", "delivery.smart_host"),
            ("[lmtp]\naddress = \"dovecot\"\n", "lmtp.address"),
            ("[lmtp]\naddress = \"unix:relative/path\"\n", "lmtp.address"),
            ("[lmtp]\naddress = \":24\"\n", "lmtp.address"),
            ("[maildir]\npath = \"/var/mail/shared\"\n", "maildir.path"),
            ("[server]\nshutdown_grace = \"soon\"\n", "shutdown_grace"),
            // Once overflowed a hand-written parser.
            ("[queue]\nexpire_after = \"999999999999999999d\"\n", "expire_after"),
        ];
        for (text, key) in cases {
            let e = Config::from_toml(text).expect_err(text).0;
            assert!(e.contains(key), "error for {text:?} should name {key}: {e}");
        }
    }
}
