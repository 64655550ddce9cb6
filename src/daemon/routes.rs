//! The route actors by name: each a DeliverySupervisor in front of a built-in delivery actor
//! (Drop, remote SMTP, smart host, Maildir, LMTP) or one registered by the embedder. A reload
//! compares each built-in route's settings (`RouteSettings`, `PartialEq`) and replaces only the
//! actors whose settings changed; the others keep their connections and deliveries in flight.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use mailroot_actors::lmtp::{KeptConnections, Lmtp};
use mailroot_actors::local_drop::LocalDrop;
use mailroot_actors::maildir::Maildir;
use mailroot_actors::metrics::Metrics;
use mailroot_actors::remote::RemoteDelivery;
use mailroot_actors::routes::RouteTable;
use mailroot_actors::routes::Router;
use mailroot_actors::supervisor::{self, ChildFactory, DeliverySupervisor};

use super::{Folders, StartError};
use crate::config::{Config, RouteSettings};

/// Built-in route names.
pub const BUILT_IN_ROUTES: [&str; 5] = ["drop", "smtp", "smarthost", "maildir", "lmtp"];

/// The actor-kind label of a route's actor in the metrics.
fn route_kind(name: &str) -> &str {
    match name {
        "drop" => "local-drop",
        "smtp" => "remote-delivery",
        other => other,
    }
}

/// Every route the config names must have an actor: built in, or registered.
pub(super) fn check_names(config: &Config, custom: &[(String, ChildFactory)]) -> Result<(), StartError> {
    let table = RouteTable::new(&config.routes).map_err(|e| StartError::Other(format!("routes: {e}")))?;
    for name in table.names() {
        if !BUILT_IN_ROUTES.contains(&name) && !custom.iter().any(|(n, _)| n == name) {
            let registered: Vec<&str> = custom.iter().map(|(n, _)| n.as_str()).collect();
            return Err(StartError::Other(format!(
                "routes: no delivery actor is named {name:?} (built in: {}; registered: {})",
                BUILT_IN_ROUTES.join(", "),
                if registered.is_empty() { "none".to_string() } else { registered.join(", ") }
            )));
        }
    }
    Ok(())
}

/// The actor that delivers with `settings`, as a factory the supervisor calls at start and
/// after each panic.
fn factory(
    settings: &RouteSettings,
    metrics: &Arc<Metrics>,
    kept: &KeptConnections,
) -> Result<ChildFactory, StartError> {
    let m = metrics.clone();
    Ok(match settings.clone() {
        RouteSettings::Drop { drop, sort_temp } => {
            supervisor::factory(move || Ok(LocalDrop::new(drop.clone(), sort_temp.clone(), m.clone())))
        }
        RouteSettings::Remote(remote) => {
            // Checked here so that a restart cannot meet a resolver error the start did not.
            RemoteDelivery::new((*remote).clone(), metrics.clone()).map_err(StartError::Other)?;
            supervisor::factory(move || RemoteDelivery::new((*remote).clone(), m.clone()))
        }
        RouteSettings::Maildir(s) => supervisor::factory(move || Ok(Maildir::new(s.clone()))),
        RouteSettings::Lmtp(s) => {
            let kept = kept.clone();
            supervisor::factory(move || Ok(Lmtp::new(s.clone()).kept_in(&kept)))
        }
    })
}

/// The route actors (supervisors) by name, with the settings each was built from (`None` for
/// an embedder's actor, whose settings are its own).
#[derive(Default, Clone)]
pub(super) struct RouteActors {
    actors: HashMap<String, (Option<RouteSettings>, Addr<DeliverySupervisor>)>,
    /// The LMTP actors' kept connections, closed with QUIT at the daemon's stop.
    lmtp_kept: KeptConnections,
}

impl RouteActors {
    /// Starts (or keeps) the actor of every route the config makes available; returns the
    /// names of the routes whose actor was replaced or removed.
    pub(super) fn update(
        &mut self,
        config: &Config,
        folders: &Folders,
        metrics: &Arc<Metrics>,
        custom: &[(String, ChildFactory)],
    ) -> Result<Vec<String>, StartError> {
        let mut wanted: Vec<(String, Option<RouteSettings>, Option<ChildFactory>)> = Vec::new();
        for (name, settings) in config.route_settings(&folders.drop, &folders.sort_temp)? {
            wanted.push((name.to_string(), Some(settings), None));
        }
        for (name, factory) in custom {
            wanted.push((name.clone(), None, Some(factory.clone())));
        }
        let mut changed = Vec::new();
        let mut next = HashMap::new();
        for (name, settings, custom_factory) in wanted {
            match self.actors.remove(&name) {
                Some((old, addr)) if old == settings => {
                    next.insert(name, (settings, addr));
                }
                old => {
                    let factory = match (&settings, custom_factory) {
                        (Some(s), _) => factory(s, metrics, &self.lmtp_kept)?,
                        (None, Some(f)) => f,
                        (None, None) => continue,
                    };
                    let meter = metrics.actor(route_kind(&name));
                    let addr = DeliverySupervisor::new(&name, factory, meter).start();
                    if old.is_some() {
                        changed.push(name.clone());
                    }
                    next.insert(name, (settings, addr));
                }
            }
        }
        // Routes no longer available stop once their deliveries in flight end.
        changed.extend(self.actors.keys().cloned());
        self.actors = next;
        Ok(changed)
    }

    /// The LMTP connections kept by route actors and recipient checks, closed at stop.
    pub(super) fn kept_connections(&self) -> &KeptConnections {
        &self.lmtp_kept
    }

    /// Says QUIT on the kept LMTP connections (each holds a process on the mailbox server).
    pub(super) async fn quit_kept_connections(&self) {
        self.lmtp_kept.quit_all().await;
    }

    pub(super) fn router(&self, config: &Config) -> Result<Router, StartError> {
        let table = RouteTable::new(&config.routes).map_err(|e| StartError::Other(format!("routes: {e}")))?;
        let actors = self.actors.iter().map(|(n, (_, a))| (n.clone(), a.clone().recipient()));
        Ok(Router::new(config.local_domains(), table, actors))
    }
}
