//! What a reload changes, decided as a pure function of the running and the new configuration
//! before anything is touched: the sections applied at once, and those that only take effect
//! at the next start (the Mailroot folder, the queue's settings, the admin API, logging, the
//! listening sockets and the host name, which the queue writes into every header it adds).

use crate::config::{Config, ListenerSection, Server};

/// The outcome of comparing two configurations.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct ReloadPlan {
    /// Sections applied now, as `ctl reload` and the log name them.
    pub changed: Vec<String>,
    /// Changed, but applied only when mailroot starts again.
    pub needs_restart: Vec<String>,
}

/// `tls_loaded`: the new configuration has a certificate, which is read again at every reload
/// (a file replaced under the same name is a change too).
pub(super) fn plan(old: &Config, new: &Config, tls_loaded: bool) -> ReloadPlan {
    // The rest of [server] applies to new connections; listen and hostname need a restart.
    let rest = |s: &Server| Server { listen: Vec::new(), hostname: String::new(), ..s.clone() };
    // A listener's sockets and role are fixed at start; the rest of its settings apply now.
    let shape =
        |c: &Config| c.listeners.iter().map(|(n, l)| (n.clone(), l.role.clone(), l.listen.clone())).collect::<Vec<_>>();
    let rest_of = |c: &Config| {
        c.listeners
            .iter()
            .map(|(n, l)| (n.clone(), ListenerSection { role: String::new(), listen: Vec::new(), ..l.clone() }))
            .collect::<Vec<_>>()
    };
    // (name, changed, applied now)
    let sections = [
        ("tls", old.tls != new.tls, true),
        ("auth", old.auth != new.auth, true),
        ("relay", old.relay != new.relay, true),
        ("access", old.access != new.access, true),
        ("limits", old.limits != new.limits, true),
        ("routes", old.routes != new.routes, true),
        ("domains", old.domains != new.domains, true),
        ("maildir", old.maildir != new.maildir, true),
        ("lmtp", old.lmtp != new.lmtp, true),
        ("delivery", old.delivery != new.delivery, true),
        ("recipients", old.recipients != new.recipients, true),
        ("srs", old.srs != new.srs, true),
        ("checks", old.checks != new.checks, true),
        ("rates", old.rates != new.rates, true),
        ("server", rest(&old.server) != rest(&new.server), true),
        ("mailroot", old.mailroot != new.mailroot, false),
        ("queue", old.queue != new.queue, false),
        ("admin", old.admin != new.admin, false),
        ("log", old.log != new.log, false),
        ("server.hostname", old.server.hostname != new.server.hostname, false),
        ("server.listen", old.server.listen != new.server.listen, false),
        ("listeners", rest_of(old) != rest_of(new), true),
        ("listeners (names, roles, addresses)", shape(old) != shape(new), false),
    ];
    let mut p = ReloadPlan::default();
    for (name, _, now) in sections.into_iter().filter(|s| s.1) {
        if now { &mut p.changed } else { &mut p.needs_restart }.push(name.to_string());
    }
    if tls_loaded && old.tls == new.tls {
        p.changed.push("tls (certificate reloaded)".into());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each case: a change to the default configuration (TOML), whether a certificate is
    /// loaded, and what the plan says is applied now and what needs a restart.
    #[test]
    fn plans() {
        let cases: &[(&str, bool, &[&str], &[&str])] = &[
            ("", false, &[], &[]),
            ("", true, &["tls (certificate reloaded)"], &[]),
            ("[limits]\nmax_recipients = 10\n", false, &["limits"], &[]),
            ("[server]\nmax_connections = 5\n", false, &["server"], &[]),
            ("[server]\nidle_timeout = \"1m\"\n", false, &["server"], &[]),
            ("[server]\nhostname = \"mx.example.test\"\n", false, &[], &["server.hostname"]),
            ("[server]\nlisten = [\"127.0.0.1:2626\"]\n", false, &[], &["server.listen"]),
            ("[server]\nlisten = [\"127.0.0.1:2626\"]\nmax_connections = 5\n", false, &["server"], &["server.listen"]),
            ("[domains]\nlocal = [\"a.test\"]\n", false, &["domains"], &[]),
            ("[relay]\nallow_networks = []\n", false, &["relay"], &[]),
            ("[access]\nmax_connections_per_ip = 3\n", false, &["access"], &[]),
            ("[delivery]\nremote_port = 2525\n", false, &["delivery"], &[]),
            ("[lmtp]\naddress = \"127.0.0.1:24\"\n", false, &["lmtp"], &[]),
            ("[maildir]\npath = \"/var/mail/{domain}/{user}\"\n", false, &["maildir"], &[]),
            ("[routes]\n\"a.test\" = \"drop\"\n", false, &["routes"], &[]),
            ("[auth]\nallow_plaintext_loopback = true\n", false, &["auth"], &[]),
            ("[queue]\nexpire_after = \"1d\"\n", false, &[], &["queue"]),
            ("[admin]\nlisten = \"\"\n", false, &[], &["admin"]),
            ("[log]\nprotocol = \"/tmp/p\"\n", false, &[], &["log"]),
            ("[mailroot]\npath = \"/srv/mail\"\n", false, &[], &["mailroot"]),
            (
                "[listeners.sub]\nrole = \"mx\"\nlisten = [\"127.0.0.1:2627\"]\n",
                false,
                &["listeners"],
                &["listeners (names, roles, addresses)"],
            ),
            (
                "[limits]\nmax_recipients = 10\n[queue]\nmax_hop_count = 20\n",
                true,
                &["limits", "tls (certificate reloaded)"],
                &["queue"],
            ),
        ];
        let old = Config::default();
        for (change, tls, changed, restart) in cases {
            let new = Config::from_toml(change).unwrap_or_else(|e| panic!("{change:?}: {e}"));
            let p = plan(&old, &new, *tls);
            let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            assert_eq!((p.changed, p.needs_restart), (strings(changed), strings(restart)), "{change:?}");
        }
    }
}
