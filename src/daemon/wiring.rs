//! Wiring the actor system: binds the SMTP sockets, starts the route actors, the Queue behind
//! its supervisor, the Listener with one session arbiter per core, Pickup, the admin API and the
//! protocol log's flusher, then hands what the control task needs to it. Every actor's settings
//! come from `crate::config` (`settings.rs`); nothing here decides what a key means.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_rt::{Arbiter, System};
use mailroot_actors::auth::AuthFailures;
use mailroot_actors::clock::unix_now;
use mailroot_actors::health::StoreHealth;
use mailroot_actors::listener::Listener;
use mailroot_actors::lmtp::RecipientVerifier;
use mailroot_actors::metrics::Metrics;
use mailroot_actors::pickup::Pickup;
use mailroot_actors::queue::Queue;
use mailroot_actors::rates::RateLimits;
use mailroot_actors::resolve::Dns;
use mailroot_actors::routes::Router;
use mailroot_actors::session::{BodyBudget, ProtocolLog, SessionShared};
use mailroot_actors::store::QueueStore;
use mailroot_actors::supervisor::{ChildFactory, QueueFactory, QueueSupervisor};
use prometheus_client::registry::Registry;
use tracing::{error, info};

use super::control;
use super::routes::RouteActors;
use super::{systemd, Folders, StartError, StartOptions};
use crate::admin::AdminState;
use crate::config::{Config, ListenerDef, Security};
use crate::control::{Control, ControlHandle};

/// Everything the actor system thread needs.
pub(super) struct Parts {
    pub(super) config: Config,
    pub(super) options: StartOptions,
    pub(super) folders: Folders,
    pub(super) store: Arc<dyn QueueStore>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) registry: Arc<Registry>,
    /// The listeners to bind, as the configuration defines them.
    pub(super) listen: Vec<ListenerDef>,
    pub(super) admin: Option<std::net::TcpListener>,
    /// The admin API's token (configured or generated).
    pub(super) admin_token: String,
    pub(super) security: Security,
    pub(super) protolog: Option<Arc<ProtocolLog>>,
    pub(super) custom: Vec<(String, ChildFactory)>,
    pub(super) control: ControlHandle,
    pub(super) failed: Arc<AtomicBool>,
}

/// The parts of the running system the control task works with.
pub(super) struct Wired {
    pub(super) config: Config,
    pub(super) config_path: Option<PathBuf>,
    pub(super) folders: Folders,
    pub(super) metrics: Arc<Metrics>,
    pub(super) custom: Vec<(String, ChildFactory)>,
    pub(super) routes: RouteActors,
    /// The resolver of the SMTP side (reverse DNS, the checks of who mail is from).
    pub(super) inbound_dns: Arc<Dns>,
    /// Inbound rate counts, kept across reloads.
    pub(super) rates: Arc<RateLimits>,
    /// The routes a restarted Queue starts with.
    pub(super) router: Arc<std::sync::Mutex<Router>>,
    /// The DKIM keys a restarted Queue starts with.
    pub(super) signer: Arc<std::sync::Mutex<Arc<mailroot_actors::dkim::Signer>>>,
    /// Every listener by name, in the configuration's order.
    pub(super) listeners: Vec<(String, Addr<Listener>)>,
    /// `[server] max_connections`, shared by every listener.
    pub(super) connection_permits: Arc<tokio::sync::Semaphore>,
    pub(super) queue: Addr<QueueSupervisor>,
    pub(super) pickup: Addr<Pickup>,
    pub(super) pickup_factory: Box<dyn Fn() -> Addr<Pickup>>,
    /// Set when the daemon stops because a part of it failed (exit status 1).
    pub(super) failed: Arc<AtomicBool>,
    pub(super) admin: Option<actix_web::dev::ServerHandle>,
    pub(super) stop_tx: tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
    pub(super) protolog: Option<Arc<ProtocolLog>>,
    pub(super) recipient_verifier: Arc<RecipientVerifier>,
}

pub(super) fn run_system(
    parts: Parts,
    ready: std::sync::mpsc::Sender<Result<super::BoundListeners, StartError>>,
    control_rx: tokio::sync::mpsc::Receiver<Control>,
) {
    let system = System::new();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let session_arbiters: Vec<Arbiter> = (0..cores).map(|_| Arbiter::new()).collect();
    let Parts {
        failed,
        config,
        options,
        folders,
        store,
        metrics,
        registry,
        listen,
        admin,
        admin_token,
        security,
        protolog,
        custom,
        control,
    } = parts;

    let started = system.block_on(async {
        // (name, sockets, bound addresses) per listener.
        let mut bound = Vec::new();
        for def in &listen {
            let (mut sockets, mut addrs) = (Vec::new(), Vec::new());
            for addr in &def.addrs {
                let socket = super::bind(*addr)
                    .and_then(tokio::net::TcpListener::from_std)
                    .map_err(|e| StartError::Other(format!("{}: cannot listen on {addr}: {e}", def.key)))?;
                addrs.push(socket.local_addr().map_err(|e| StartError::Other(e.to_string()))?);
                sockets.push(socket);
            }
            bound.push((def.name.clone(), sockets, addrs));
        }
        let addrs: Vec<(String, Vec<SocketAddr>)> = bound.iter().map(|(n, _, a)| (n.clone(), a.clone())).collect();
        let mut routes = RouteActors::default();
        routes.update(&config, &folders, &metrics, &custom)?;
        let router = routes.router(&config)?;
        let remote_settings = config.remote_settings()?;
        // One caching resolver for the SMTP side; a reload keeps it (and its cache).
        let inbound_dns = Arc::new(
            Dns::new(&remote_settings.nameservers, remote_settings.dns_timeout, metrics.clone())
                .map_err(StartError::Other)?,
        );
        let queue_settings = config.queue_settings(&folders.badmail);
        let qm = metrics.clone();
        let store_health = Arc::new(StoreHealth::new(store.dir(), config.queue.min_free_space));
        // Always there, so a reload can turn recipient checks on (or point them elsewhere).
        let recipient_verifier = RecipientVerifier::new(routes.kept_connections());
        recipient_verifier.configure(config.recipient_verifier_settings());
        let body_store = store.clone();
        let health = store_health.clone();
        let current_router = Arc::new(std::sync::Mutex::new(router));
        let r = current_router.clone();
        let current_signer = Arc::new(std::sync::Mutex::new(security.dkim.clone()));
        let k = current_signer.clone();
        let factory: QueueFactory = Box::new(move || {
            let router = r.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let signer = k.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Queue::new(store.clone(), queue_settings.clone(), router, qm.clone())
                .with_health(health.clone())
                .with_signer(signer)
        });
        let queue = QueueSupervisor::new(factory, metrics.actor("queue")).start();
        let tls_reporter = Arc::new(super::reports::TlsReporter {
            metrics: metrics.clone(),
            queue: queue.clone(),
            hostname: config.server.hostname.clone(),
            nameservers: if remote_settings.nameservers.is_empty() {
                mailroot_actors::resolve::system_nameservers()
            } else {
                remote_settings.nameservers.clone()
            },
        });
        if config.delivery.tls_reports {
            tls_reporter.clone().schedule();
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(None);
        let failed = failed.clone();
        let paused = Arc::new(AtomicBool::new(false));
        let connection_permits = Arc::new(tokio::sync::Semaphore::new(config.server.max_connections));
        let open_sessions = mailroot_actors::sessions::OpenSessions::new();
        let shared = SessionShared {
                queue: queue.clone().recipient(),
                metrics: metrics.clone(),
                users: security.users.clone(),
                auth_checks: Arc::new(tokio::sync::Semaphore::new(cores.max(2))),
                auth_failures: Arc::new(AuthFailures::new(config.auth.max_failures, config.auth.failure_window.0)),
                body_budget: Arc::new(BodyBudget::new(
                    config.limits.max_body_memory as usize,
                    metrics.body_memory.clone(),
                )),
                store_health,
                body_store: Some(body_store),
                recipient_verifier: Some(recipient_verifier.clone()),
                error_delay: config.limits.error_delay.0,
                stop: stop_rx,
                meter: metrics.actor("session"),
                protolog: protolog.clone(),
                listener: "",
                connection_permits: connection_permits.clone(),
                srs: security.srs.clone(),
                checker: None,
                sessions: open_sessions.clone(),
        };
        let rates = RateLimits::new(config.rate_settings());
        let mut settings =
            config.listener_settings(&security, Some(&inbound_dns), Some(&metrics), Some(&rates)).into_iter();
        let mut listeners = Vec::new();
        for (name, sockets, _) in bound {
            let Some(s) = settings.next() else { break };
            let arbiters = session_arbiters.iter().map(|a| a.handle()).collect();
            let listener = Listener::new(sockets, s, shared.clone(), arbiters).paused_by(paused.clone()).start();
            listeners.push((name, listener));
        }
        let pickup_settings = config.pickup_settings(&folders.pickup, &folders.badmail);
        let (q, m) = (queue.clone(), metrics.clone());
        let pickup_factory: Box<dyn Fn() -> Addr<Pickup>> = Box::new(move || {
            Pickup::new(pickup_settings.clone(), q.clone().recipient(), q.clone().recipient(), m.clone()).start()
        });
        let pickup = pickup_factory();
        let admin = match admin {
            Some(socket) => {
                let state = AdminState {
                    tls_reporter: tls_reporter.clone(),
                    queue: queue.clone(),
                    registry,
                    metrics: metrics.clone(),
                    token: admin_token,
                    hosts: config.admin.hosts.clone(),
                    metrics_public: config.admin.metrics_public,
                    started: std::time::Instant::now(),
                    started_unix: unix_now(),
                    paused,
                    control: control.clone(),
                    smtp_listeners: listen
                        .iter()
                        .zip(&addrs)
                        .map(|(def, (_, a))| (def.name.clone(), def.role.as_str(), a.clone()))
                        .collect(),
                    hostname: config.server.hostname.clone(),
                    sessions: open_sessions,
                    stopping: shared.stop.clone(),
                    path_prefix: config.admin.path_prefix.clone(),
                };
                let server =
                    crate::admin::serve(socket, state).map_err(|e| StartError::Other(format!("admin.listen: {e}")))?;
                let handle = server.handle();
                actix_rt::spawn(async move {
                    if let Err(e) = server.await {
                        error!(error = %e, "admin API stopped");
                    }
                });
                Some(handle)
            }
            None => None,
        };
        if let Some(log) = protolog.clone() {
            // Lines are buffered; a second is as stale as the file gets.
            actix_rt::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    log.flush();
                }
            });
        }
        info!(mailroot = %folders.root.display(), hostname = %config.server.hostname, domains = ?config.domains.local, "mailroot started");
        Ok::<_, StartError>((
            addrs,
            Wired {
                config: config.clone(),
                config_path: options.config_path.clone(),
                folders: folders.clone(),
                metrics: metrics.clone(),
                custom,
                routes,
                router: current_router,
                signer: current_signer,
                inbound_dns,
                rates,
                listeners,
                connection_permits,
                queue,
                pickup,
                pickup_factory,
                failed: failed.clone(),
                admin,
                stop_tx,
                protolog,
                recipient_verifier,
            },
        ))
    });

    let ok = system.block_on(async move {
        let sys = match started {
            Ok((addrs, sys)) => {
                let _ = ready.send(Ok(addrs));
                systemd::notify("READY=1");
                sys
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return false;
            }
        };
        // Spawned here so that it runs on the system arbiter once `run` starts.
        actix_rt::spawn(control::control_loop(sys, control_rx, options.handle_signals));
        true
    });
    if ok {
        if let Err(e) = system.run() {
            error!(error = %e, "actor system error");
        }
    } else {
        System::current().stop();
    }
    for a in session_arbiters {
        a.stop();
        let _ = a.join();
    }
    info!("mailroot stopped");
}
