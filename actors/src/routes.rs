//! The route table: which delivery actor (by name) gets the recipients of a domain. Rules map an
//! exact domain, or `*.suffix` for every subdomain of `suffix`; what no rule names goes to `drop`
//! when the domain is local and to `smtp` otherwise.
//!
//! The [`Router`] puts the two together for the Queue: the table, and the delivery actors by
//! name.
//!
//! Invariant: lookups are pure and case-insensitive; an exact rule beats any suffix rule, and a
//! longer suffix beats a shorter one, whatever the order in the config.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use actix::Recipient;

use crate::delivery::Deliver;

use crate::protocol::address::validate_domain;
use crate::protocol::LocalDomains;

/// The route for local domains that no rule names.
pub const LOCAL_DEFAULT: &str = "drop";
/// The route for other domains that no rule names.
pub const REMOTE_DEFAULT: &str = "smtp";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    /// `(domain, route)`; the rules are few, so a scan beats hashing a lower-cased copy.
    exact: Vec<(String, String)>,
    /// `(".suffix", route)`, longest first.
    suffixes: Vec<(String, String)>,
}

impl RouteTable {
    /// Builds the table from `pattern = "route"` pairs, checking every pattern.
    pub fn new(rules: &BTreeMap<String, String>) -> Result<RouteTable, String> {
        let mut table = RouteTable::default();
        for (pattern, route) in rules {
            let p = pattern.trim().to_ascii_lowercase();
            if route.trim().is_empty() {
                return Err(format!("route for {pattern:?} is empty"));
            }
            let (domain, wildcard) = match p.strip_prefix("*.") {
                Some(rest) => (rest, true),
                None => (p.as_str(), false),
            };
            validate_domain(domain).map_err(|_| format!("{pattern:?} is neither a domain nor *.domain"))?;
            if wildcard {
                table.suffixes.push((format!(".{domain}"), route.trim().to_string()));
            } else {
                table.exact.retain(|(d, _)| d != domain);
                table.exact.push((domain.to_string(), route.trim().to_string()));
            }
        }
        table.suffixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(table)
    }

    /// The route named by a rule for `domain`, if any. Runs per recipient: no allocation.
    pub fn rule(&self, domain: &str) -> Option<&str> {
        let d = domain.trim_end_matches('.').as_bytes();
        if let Some((_, r)) = self.exact.iter().find(|(e, _)| e.as_bytes().eq_ignore_ascii_case(d)) {
            return Some(r);
        }
        // Compared as bytes: a UTF-8 domain cannot make a slice fall inside a character.
        self.suffixes
            .iter()
            .find(|(s, _)| d.len() > s.len() && d[d.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes()))
            .map(|(_, r)| r.as_str())
    }

    /// The route for `domain`: a rule's, else the default for local or remote domains.
    pub fn route<'a>(&'a self, domain: &str, local: &LocalDomains) -> &'a str {
        match self.rule(domain) {
            Some(r) => r,
            None if local.contains(domain) => LOCAL_DEFAULT,
            None => REMOTE_DEFAULT,
        }
    }

    /// Every route name the rules use.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.exact.iter().chain(&self.suffixes).map(|(_, r)| r.as_str())
    }
}

/// The domain part of an address (after the last `@`); the whole text when there is none.
pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or(address, |(_, d)| d)
}

/// Where recipients go: the route table names a delivery actor for each domain; the router holds
/// the actors by name. A recipient whose route names no actor stays queued (and is logged) until
/// a reload provides one.
#[derive(Clone)]
pub struct Router {
    local_domains: LocalDomains,
    table: Arc<RouteTable>,
    /// By route name; the name is interned once here for the metric labels.
    actors: HashMap<String, (&'static str, Recipient<Deliver>)>,
}

impl Router {
    pub fn new(
        local_domains: LocalDomains,
        table: RouteTable,
        actors: impl IntoIterator<Item = (String, Recipient<Deliver>)>,
    ) -> Self {
        let actors = actors.into_iter().map(|(name, a)| (name.clone(), (crate::metrics::intern(&name), a))).collect();
        Router { local_domains, table: Arc::new(table), actors }
    }

    /// No rules: local domains to `drop`, the others to `smtp` when given.
    pub fn simple(local_domains: LocalDomains, drop: Recipient<Deliver>, smtp: Option<Recipient<Deliver>>) -> Self {
        let smtp = smtp.map(|a| (REMOTE_DEFAULT.to_string(), a));
        let actors = std::iter::once((LOCAL_DEFAULT.to_string(), drop)).chain(smtp);
        Router::new(local_domains, RouteTable::default(), actors)
    }

    /// The name of the route `address` takes (`drop` for the Drop folder).
    pub(crate) fn route_name(&self, address: &str) -> &str {
        self.table.route(domain_of(address), &self.local_domains)
    }

    /// The route name and its actor; `Err(name)` when no actor has that name.
    pub(crate) fn route(&self, address: &str) -> Result<(&'static str, Recipient<Deliver>), &str> {
        let name = self.table.route(domain_of(address), &self.local_domains);
        match self.actors.get(name) {
            Some((label, actor)) => Ok((label, actor.clone())),
            None => Err(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        let rules: BTreeMap<String, String> = [
            ("example.com", "maildir"),
            ("*.example.com", "lmtp"),
            ("*.eu.example.com", "webhook"),
            ("Partner.ORG", "smarthost"),
            ("*.org", "smtp"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let t = RouteTable::new(&rules).unwrap();
        let local = LocalDomains::new(["localhost", "corp.test"]);
        let cases = [
            ("example.com", "maildir"),
            ("EXAMPLE.com.", "maildir"),
            ("a.example.com", "lmtp"),
            ("x.y.example.com", "lmtp"),
            // A longer suffix wins whatever the order.
            ("paris.eu.example.com", "webhook"),
            // `*.eu.example.com` is subdomains only; eu.example.com itself is under `*.example.com`.
            ("eu.example.com", "lmtp"),
            ("partner.org", "smarthost"),
            ("other.org", "smtp"),
            // A suffix never matches a name that merely ends with its text.
            ("notexample.com", "smtp"),
            ("localhost", "drop"),
            // Bytes compared, never sliced inside a character.
            ("пример.example.com", "lmtp"),
            ("ü.org", "smtp"),
            ("é", "smtp"),
            ("corp.test", "drop"),
            ("elsewhere.net", "smtp"),
        ];
        for (domain, want) in cases {
            assert_eq!(t.route(domain, &local), want, "{domain}");
        }
        assert_eq!(domain_of("a@b@c.org"), "c.org");
    }

    #[test]
    fn bad_rules() {
        for (pattern, route) in [("*", "drop"), ("a..b", "drop"), ("*.", "drop"), ("ok.org", " "), ("**.x.org", "smtp")]
        {
            let rules = BTreeMap::from([(pattern.to_string(), route.to_string())]);
            assert!(RouteTable::new(&rules).is_err(), "{pattern:?} = {route:?} should be refused");
        }
    }
}
