//! The configuration file: TOML, every key with a default that works on a fresh machine,
//! validated into errors that name the key. docs/configuration.md documents each key.
//!
//! Layout: `sections.rs` holds the sections and their defaults; `validate.rs` checks a parsed
//! file and names the key at fault; `settings.rs` is the one place where the configuration
//! becomes each actor's settings (listener, queue, Pickup, remote delivery, every route).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod sections;
mod settings;
mod validate;

pub use sections::*;
pub use settings::{ListenerDef, RouteSettings, Security};

/// The file `mailroot run` uses when `--config` is not given and it exists.
pub const DEFAULT_CONFIG_PATH: &str = "config/mailroot.toml";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// DKIM keys by signing domain.
    pub dkim: BTreeMap<String, DkimDomain>,
    pub listeners: BTreeMap<String, ListenerSection>,
    pub recipients: BTreeMap<String, RecipientMap>,
    pub srs: Srs,
    pub checks: Checks,
    pub rates: Rates,
}

/// A configuration problem, naming the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

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
        for p in std::iter::once(&mut self.delivery.ca_file)
            .chain(std::iter::once(&mut self.delivery.smart_host_password_file))
            .chain(self.domains.remote.values_mut().map(|r| &mut r.password_file))
            .chain(std::iter::once(&mut self.queue.postgres.password_file))
            .chain(std::iter::once(&mut self.queue.postgres.ca_file))
        {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
        if self.srs.secret_file.is_relative() && !self.srs.secret_file.as_os_str().is_empty() {
            self.srs.secret_file = base.join(&self.srs.secret_file);
        }
        for l in self.listeners.values_mut() {
            for p in [&mut l.tls_cert, &mut l.tls_key] {
                if p.is_relative() && !p.as_os_str().is_empty() {
                    *p = base.join(&*p);
                }
            }
        }
        for d in self.dkim.values_mut() {
            for p in std::iter::once(&mut d.key).chain(d.keys.iter_mut().map(|k| &mut k.key)) {
                if p.is_relative() && !p.as_os_str().is_empty() {
                    *p = base.join(&*p);
                }
            }
        }
        for p in [&mut self.log.protocol, &mut self.maildir.path] {
            if !p.is_empty() && Path::new(p.as_str()).is_relative() {
                *p = base.join(&*p).to_string_lossy().into_owned();
            }
        }
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

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_is_valid_and_matches_the_defaults() {
        let text = include_str!("../../config/mailroot.toml");
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
