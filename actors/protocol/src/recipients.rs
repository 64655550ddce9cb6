//! Recipient maps of local domains (Postfix's virtual alias and mailbox maps): which local parts
//! exist, aliases (one address to many, local or remote), a catch-all and plus-addressing. A
//! domain with a map refuses unknown recipients at RCPT (550 5.1.1), so mail to them is never
//! accepted and bounced later to a sender who may be forged (backscatter). Pure: the session
//! asks at RCPT; the configuration builds it.

use std::collections::{HashMap, HashSet};

use crate::address::{parse_mailbox, Mailbox};

/// An alias expands to at most this many addresses (after following aliases of aliases), and a
/// transaction holds at most this many recipients after expansion: a map cannot make one RCPT
/// cost without bound.
pub const MAX_EXPANSION: usize = 1000;

/// Aliases of aliases are followed this deep (Postfix's virtual_alias_recursion_limit is 1000;
/// real maps nest two or three levels).
const MAX_DEPTH: usize = 10;

/// One domain's map. Local parts compare case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainMap {
    /// Local parts that are mailboxes here.
    pub users: HashSet<String>,
    /// Local part → the addresses it forwards to.
    pub aliases: HashMap<String, Vec<Mailbox>>,
    /// Where mail to any other local part goes; `None` = refused.
    pub catch_all: Option<Vec<Mailbox>>,
    /// The subaddress separator (`user+tag@`): `Some('+')` by default.
    pub delimiter: Option<char>,
}

/// What the map says about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The domain has no map: anything goes (the IIS Drop behaviour).
    NoMap,
    /// A mailbox here: delivered to the address as given (tag and all).
    Exists,
    /// An alias or the catch-all: delivered to these instead.
    Expands(Vec<Mailbox>),
    /// Not known here: 550 5.1.1.
    Unknown,
}

/// The maps of every mapped local domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecipientMaps {
    domains: HashMap<String, DomainMap>,
    /// Every alias (`local@domain`) and catch-all (`@domain`) followed to its final addresses
    /// once, when the maps are built: a RCPT costs a lookup, not a walk.
    expanded: HashMap<String, Vec<Mailbox>>,
}

/// A map definition as the configuration gives it (strings), checked by [`RecipientMaps::new`].
#[derive(Debug, Clone, Default)]
pub struct MapSource {
    pub users: Vec<String>,
    pub aliases: Vec<(String, Vec<String>)>,
    pub catch_all: Vec<String>,
    /// `""` = no plus-addressing.
    pub delimiter: String,
}

impl RecipientMaps {
    /// Builds and checks the maps: every address parses, every alias expands to at most
    /// [`MAX_EXPANSION`] addresses without a loop, and every target in a mapped domain exists.
    /// Errors name the domain and the entry.
    pub fn new(sources: impl IntoIterator<Item = (String, MapSource)>) -> Result<RecipientMaps, String> {
        let mut domains = HashMap::new();
        for (domain, src) in sources {
            let domain = domain.to_ascii_lowercase();
            let target = |s: &str| -> Result<Mailbox, String> {
                let s = s.trim();
                // A bare local part means an address in this domain.
                let full = if s.contains('@') { s.to_string() } else { format!("{s}@{domain}") };
                let m = parse_mailbox(&full).map_err(|e| format!("{domain}: {s:?}: {}", e.text()))?;
                Ok(Mailbox { local: m.local, domain: m.domain.to_ascii_lowercase() })
            };
            let local = |s: &str| -> Result<String, String> {
                let s = s.trim();
                if s.is_empty() || s.contains('@') {
                    return Err(format!("{domain}: {s:?} is not a local part"));
                }
                target(s).map(|m| m.local.to_lowercase())
            };
            let delimiter = match src.delimiter.chars().collect::<Vec<_>>().as_slice() {
                [] => None,
                [c] if !c.is_alphanumeric() && *c != '@' && *c != '.' => Some(*c),
                _ => return Err(format!("{domain}: delimiter {:?} is not one punctuation character", src.delimiter)),
            };
            let mut map = DomainMap { delimiter, ..DomainMap::default() };
            for u in &src.users {
                map.users.insert(local(u)?);
            }
            for (name, targets) in &src.aliases {
                let list = targets.iter().map(|t| target(t)).collect::<Result<Vec<_>, _>>()?;
                if list.is_empty() {
                    return Err(format!("{domain}: alias {name:?} has no target"));
                }
                map.aliases.insert(local(name)?, list);
            }
            if !src.catch_all.is_empty() {
                map.catch_all = Some(src.catch_all.iter().map(|t| target(t)).collect::<Result<Vec<_>, _>>()?);
            }
            domains.insert(domain, map);
        }
        let mut maps = RecipientMaps { domains, expanded: HashMap::new() };
        let mut expanded = HashMap::new();
        for (domain, map) in &maps.domains {
            // (name for errors, key): the catch-all under "@domain", as no alias has an empty name.
            let all = map
                .aliases
                .iter()
                .map(|(k, v)| (k.clone(), format!("{k}@{domain}"), v))
                .chain(map.catch_all.iter().map(|v| ("*".to_string(), format!("@{domain}"), v)));
            for (name, key, targets) in all {
                let mut out = Vec::new();
                for t in targets {
                    maps.expand(t, 0, &mut out).map_err(|e| format!("{domain}: alias {name:?}: {e}"))?;
                }
                expanded.insert(key, out);
            }
        }
        maps.expanded = expanded;
        Ok(maps)
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// Whether `domain` has a map.
    pub fn has(&self, domain: &str) -> bool {
        self.domains.contains_key(&domain.to_ascii_lowercase())
    }

    /// What the map of `to`'s domain says about it. Aliases are followed to their end: the
    /// result lists final addresses (mailboxes here, or addresses elsewhere).
    pub fn lookup(&self, to: &Mailbox) -> Lookup {
        let Some(map) = self.domains.get(&to.domain.to_ascii_lowercase()) else { return Lookup::NoMap };
        let local = to.local.to_lowercase();
        // The whole local part first, then without its tag.
        let mut names = vec![local.clone()];
        if let Some((base, _)) = map.delimiter.and_then(|d| local.split_once(d)) {
            if !base.is_empty() {
                names.push(base.to_string());
            }
        }
        for name in &names {
            if map.users.contains(name) {
                return Lookup::Exists;
            }
            if map.aliases.contains_key(name) {
                let key = format!("{name}@{}", to.domain.to_ascii_lowercase());
                return self.expanded.get(&key).map_or(Lookup::Unknown, |v| Lookup::Expands(v.clone()));
            }
        }
        match &map.catch_all {
            Some(_) => {
                let key = format!("@{}", to.domain.to_ascii_lowercase());
                self.expanded.get(&key).map_or(Lookup::Unknown, |v| Lookup::Expands(v.clone()))
            }
            None => Lookup::Unknown,
        }
    }

    /// Follows `m` to final addresses, appending each once to `out`.
    fn expand(&self, m: &Mailbox, depth: usize, out: &mut Vec<Mailbox>) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("aliases nest deeper than {MAX_DEPTH} (a loop?) at {m}"));
        }
        let Some(map) = self.domains.get(&m.domain) else {
            // Another domain (remote, or local without a map): final.
            if !out.contains(m) {
                out.push(m.clone());
            }
            return check_size(out);
        };
        let local = m.local.to_lowercase();
        if map.users.contains(&local) {
            if !out.contains(m) {
                out.push(m.clone());
            }
            return check_size(out);
        }
        match map.aliases.get(&local) {
            Some(targets) => {
                for t in targets {
                    self.expand(t, depth + 1, out)?;
                }
                Ok(())
            }
            None => Err(format!("{m} is not a user or an alias of its domain's map")),
        }
    }
}

fn check_size(out: &[Mailbox]) -> Result<(), String> {
    if out.len() > MAX_EXPANSION {
        return Err(format!("expands to more than {MAX_EXPANSION} addresses"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(users: &[&str], aliases: &[(&str, &[&str])], catch_all: &[&str]) -> MapSource {
        MapSource {
            users: users.iter().map(|s| s.to_string()).collect(),
            aliases: aliases.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect(),
            catch_all: catch_all.iter().map(|s| s.to_string()).collect(),
            delimiter: "+".into(),
        }
    }

    fn addr(s: &str) -> Mailbox {
        parse_mailbox(s).unwrap()
    }

    #[test]
    fn lookups() {
        let maps = RecipientMaps::new([
            (
                "example.test".to_string(),
                src(
                    &["alice", "Bob"],
                    &[
                        ("sales", &["alice", "carol@other.test"]),
                        ("team", &["sales", "bob@example.test", "alice"]),
                        ("info", &["help@catch.test"]),
                    ],
                    &[],
                ),
            ),
            ("catch.test".to_string(), src(&["help"], &[], &["help"])),
            // An alias that looks like a wildcard is just a name; the catch-all is apart.
            ("star.test".to_string(), src(&["u", "v"], &[("*", &["u"])], &["v"])),
        ])
        .unwrap();
        let expands = |v: &[&str]| Lookup::Expands(v.iter().map(|s| addr(s)).collect());
        for (to, want) in [
            ("alice@example.test", Lookup::Exists),
            ("ALICE@Example.TEST", Lookup::Exists),
            ("bob@example.test", Lookup::Exists),
            ("alice+news@example.test", Lookup::Exists),
            ("nobody@example.test", Lookup::Unknown),
            ("nobody+alice@example.test", Lookup::Unknown),
            ("+alice@example.test", Lookup::Unknown),
            ("sales@example.test", expands(&["alice@example.test", "carol@other.test"])),
            ("sales+q3@example.test", expands(&["alice@example.test", "carol@other.test"])),
            // Aliases of aliases, each address once.
            ("team@example.test", expands(&["alice@example.test", "carol@other.test", "bob@example.test"])),
            ("info@example.test", expands(&["help@catch.test"])),
            ("help@catch.test", Lookup::Exists),
            ("anything@catch.test", expands(&["help@catch.test"])),
            ("x@unmapped.test", Lookup::NoMap),
            ("*@star.test", expands(&["u@star.test"])),
            ("w@star.test", expands(&["v@star.test"])),
        ] {
            assert_eq!(maps.lookup(&addr(to)), want, "{to}");
        }
    }

    #[test]
    fn bad_maps_are_refused() {
        let one = |s: MapSource| RecipientMaps::new([("example.test".to_string(), s)]);
        for (s, want) in [
            (src(&[], &[("a", &["b"])], &[]), "b@example.test is not a user or an alias"),
            (src(&[], &[("a", &["b"]), ("b", &["a"])], &[]), "nest deeper"),
            (src(&[], &[("a", &[])], &[]), "has no target"),
            (src(&["a@b"], &[], &[]), "is not a local part"),
            (src(&[], &[("a", &["not an address@"])], &[]), "example.test"),
            (src(&[], &[], &["ghost"]), "alias \"*\""),
            (MapSource { delimiter: "ab".into(), ..src(&["a"], &[], &[]) }, "delimiter"),
        ] {
            let e = one(s).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        // An alias that fans out past the bound is refused when the map is built.
        let many: Vec<String> = (0..=MAX_EXPANSION).map(|i| format!("u{i}@far.test")).collect();
        let s = MapSource { aliases: vec![("all".into(), many)], ..MapSource::default() };
        assert!(one(s).unwrap_err().contains("more than"));
    }
}
