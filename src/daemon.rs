//! Wiring: creates the Mailroot folders, opens the queue, starts every actor on its arbiter,
//! binds the listeners and the admin API, and runs the control task: signals, reloads, the
//! watchdog, and the stop in order.
//!
//! Arbiters: the Queue gets one of its own (its sled writes must not stall sessions), started by
//! its supervisor, as does each route's delivery actor; sessions are spread over one arbiter per
//! core; the Listener, Pickup, the supervisors and the control task share the system arbiter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use actix::prelude::*;
use actix_rt::{Arbiter, System};
use mailroot_actors::auth::Users;
use mailroot_actors::delivery::Deliver;
use mailroot_actors::listener::Reconfigure;
use mailroot_actors::listener::{AccessLists, Listener, ListenerSettings, StopListening};
use mailroot_actors::lmtp::{Lmtp, LmtpSettings};
use mailroot_actors::local_drop::LocalDrop;
use mailroot_actors::maildir::{Maildir, MaildirSettings};
use mailroot_actors::metrics::Metrics;
use mailroot_actors::pickup::{Pickup, PickupSettings};
use mailroot_actors::protocol::SessionParams;
use mailroot_actors::queue::{unix_now, Drain, Flush, Queue, QueueSettings, Router, SetRouter, Summary};
use mailroot_actors::remote::dns::Dns;
use mailroot_actors::remote::RemoteDelivery;
use mailroot_actors::routes::RouteTable;
use mailroot_actors::session::ProtocolLog;
use mailroot_actors::session::SessionShared;
use mailroot_actors::store::Store;
use mailroot_actors::supervisor::{self, ChildFactory, DeliverySupervisor, QueueFactory, QueueSupervisor};
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::admin::AdminState;
use crate::config::{Config, Server};

/// The folders of a Mailroot.
#[derive(Debug, Clone)]
pub struct Folders {
    pub root: PathBuf,
    pub pickup: PathBuf,
    pub queue: PathBuf,
    pub drop: PathBuf,
    pub badmail: PathBuf,
    pub sort_temp: PathBuf,
}

impl Folders {
    pub fn new(root: &Path) -> Self {
        Folders {
            root: root.to_path_buf(),
            pickup: root.join("Pickup"),
            queue: root.join("Queue"),
            drop: root.join("Drop"),
            badmail: root.join("Badmail"),
            sort_temp: root.join("SortTemp"),
        }
    }

    /// Creates the folders, and empties SortTemp: what is there was being written when a previous
    /// run stopped and is referenced by nothing (the queue still holds those messages).
    pub fn create(&self) -> std::io::Result<()> {
        fn context(d: &Path) -> impl FnOnce(std::io::Error) -> std::io::Error + '_ {
            move |e| std::io::Error::new(e.kind(), format!("{}: {e}", d.display()))
        }
        for d in [&self.pickup, &self.queue, &self.drop, &self.badmail, &self.sort_temp] {
            std::fs::create_dir_all(d).map_err(context(d))?;
        }
        for entry in std::fs::read_dir(&self.sort_temp).map_err(context(&self.sort_temp))? {
            let path = entry.map_err(context(&self.sort_temp))?.path();
            if path.is_file() {
                std::fs::remove_file(&path).map_err(context(&path))?;
            }
        }
        Ok(())
    }
}

/// Options that are not part of the config file.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Stop on SIGTERM/SIGINT and reload on SIGHUP (the binary); tests stop through
    /// [`Running::stop`].
    pub handle_signals: bool,
    /// The file to read again at a reload (SIGHUP or [`Running::reload`]).
    pub config_path: Option<PathBuf>,
}

/// What the control task of a running daemon can be asked to do.
#[derive(Debug)]
pub(crate) enum Control {
    Stop,
    /// Fault injection for the supervision tests (debug builds only).
    #[cfg(debug_assertions)]
    InjectPanic(&'static str),
    Reload(Option<oneshot::Sender<Result<Vec<String>, String>>>),
}

/// Asks a running daemon to stop or reload (the admin API and [`Running`] hold one).
#[derive(Clone)]
pub struct ControlHandle(tokio::sync::mpsc::Sender<Control>);

impl ControlHandle {
    /// Starts an orderly stop (as SIGTERM does). False when the daemon is already gone.
    pub fn stop(&self) -> bool {
        // A full channel means requests are already waiting; one more stop changes nothing.
        !matches!(self.0.try_send(Control::Stop), Err(tokio::sync::mpsc::error::TrySendError::Closed(_)))
    }

    /// Reloads the configuration file (as SIGHUP); `Ok` lists what changed.
    pub async fn reload(&self) -> Result<Vec<String>, String> {
        let (tx, rx) = oneshot::channel();
        self.0.send(Control::Reload(Some(tx))).await.map_err(|_| "the daemon is stopping".to_string())?;
        rx.await.map_err(|_| "the daemon stopped".to_string())?
    }
}

/// A running mailroot.
pub struct Running {
    /// The addresses the SMTP listeners are bound to (useful with port 0).
    pub smtp_addrs: Vec<SocketAddr>,
    /// The admin API's address, when it runs.
    pub admin_addr: Option<SocketAddr>,
    pub folders: Folders,
    registry: Arc<Registry>,
    control: ControlHandle,
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    /// The metrics in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    /// Reads the configuration file again and applies what can change at run time (as SIGHUP
    /// does). `Ok` lists what changed; `Err` says why the new file was refused (the old
    /// configuration stays). Blocks: call it from a plain thread, not from async code.
    pub fn reload(&self) -> Result<Vec<String>, String> {
        let (tx, rx) = oneshot::channel();
        self.control.0.try_send(Control::Reload(Some(tx))).map_err(|e| format!("daemon not reachable: {e}"))?;
        rx.blocking_recv().map_err(|_| "the daemon stopped".to_string())?
    }

    /// Fault injection for the supervision tests: makes `actor` (`queue`, `pickup` or
    /// `listener`) panic. Debug builds only.
    #[cfg(debug_assertions)]
    #[doc(hidden)]
    pub fn inject_panic(&self, actor: &'static str) {
        let _ = self.control.0.try_send(Control::InjectPanic(actor));
    }

    pub fn control(&self) -> ControlHandle {
        self.control.clone()
    }

    /// Stops in order (see [`StartOptions`] and `server.shutdown_grace`) and waits for it.
    pub fn stop(mut self) {
        self.control.stop();
        self.join();
    }

    /// Waits until the daemon stops by itself (a signal, or the admin API). False when it
    /// stopped because a part of it failed (the binary then exits with status 1).
    pub fn wait(mut self) -> bool {
        self.join();
        !self.failed.load(Ordering::Relaxed)
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.control.stop();
        self.join();
    }
}

#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// The highest queue ID that names a file in Drop (`<id>.eml`), so new IDs never reuse one even
/// if the Queue folder was wiped.
fn highest_drop_id(drop_dir: &Path) -> std::io::Result<u64> {
    let mut max = 0;
    for entry in std::fs::read_dir(drop_dir)? {
        let name = entry?.file_name();
        if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".eml")).and_then(|n| n.parse::<u64>().ok()) {
            max = max.max(id);
        }
    }
    Ok(max)
}

/// sled locks its folder; a daemon that just stopped may take a moment to let go.
fn open_store(dir: &Path, id_floor: u64) -> Result<Store, StartError> {
    Store::open_waiting(dir, id_floor, Duration::from_secs(3)).map_err(|e| {
        if e.is_locked() {
            StartError(format!(
                "the queue in {} is locked: is another mailroot running on this Mailroot? ({e})",
                dir.display()
            ))
        } else {
            StartError(format!("opening the queue in {}: {e}", dir.display()))
        }
    })
}

/// The TLS configuration and AUTH users, loaded before anything starts so a bad file is a clear
/// start error.
#[derive(Clone)]
struct Security {
    tls: Option<Arc<rustls::ServerConfig>>,
    users: Option<Arc<Users>>,
}

impl Security {
    fn load(config: &Config) -> Result<Security, StartError> {
        let tls = if config.tls.enabled() {
            let c = mailroot_actors::tls::server_config(&config.tls.cert, &config.tls.key)
                .map_err(|e| StartError(format!("tls: {e}")))?;
            Some(c)
        } else {
            None
        };
        let users = match config.load_users().map_err(|e| StartError(e.to_string()))? {
            Some(map) => {
                let users = Users::new(map).map_err(|e| StartError(format!("auth.users_file: {e}")))?;
                if users.is_empty() {
                    warn!("auth.users_file has no users: every AUTH will fail");
                }
                Some(Arc::new(users))
            }
            None => None,
        };
        Ok(Security { tls, users })
    }
}

/// Builds a daemon: the configuration, options, and delivery actors of your own.
///
/// ```no_run
/// # use mailroot::daemon::Daemon;
/// # use mailroot::config::Config;
/// # struct Webhook;
/// # impl actix::Actor for Webhook { type Context = actix::Context<Self>; }
/// # impl actix::Handler<mailroot::actors::delivery::Deliver> for Webhook {
/// #     type Result = mailroot::actors::delivery::DeliveryReport;
/// #     fn handle(&mut self, r: mailroot::actors::delivery::Deliver, _: &mut Self::Context) -> Self::Result {
/// #         mailroot::actors::delivery::DeliveryReport { results: vec![] }
/// #     }
/// # }
/// let running = Daemon::builder()
///     .config(Config::default())
///     .route_actor("webhook", || Webhook)
///     .start()?;
/// running.wait();
/// # Ok::<(), mailroot::daemon::StartError>(())
/// ```
#[derive(Default)]
pub struct DaemonBuilder {
    config: Option<Config>,
    options: StartOptions,
    custom: Vec<(String, ChildFactory)>,
}

pub struct Daemon;

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }
}

impl DaemonBuilder {
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    pub fn options(mut self, options: StartOptions) -> Self {
        self.options = options;
        self
    }

    /// Registers a delivery actor under `name`, for `[routes]` to use. `build` makes a fresh
    /// actor: at start, and again each time the supervisor restarts it after a panic. It runs on
    /// an arbiter (thread) of its own.
    pub fn route_actor<A, F>(mut self, name: &str, build: F) -> Self
    where
        A: Actor<Context = Context<A>> + Handler<Deliver> + Send,
        F: Fn() -> A + Send + Sync + 'static,
    {
        self.custom.push((name.to_string(), supervisor::factory(move || Ok(build()))));
        self
    }

    /// Starts mailroot on its own thread and returns once it listens (or failed to start).
    pub fn start(self) -> Result<Running, StartError> {
        start_with(self.config.unwrap_or_default(), self.options, self.custom)
    }
}

/// Starts mailroot on its own thread and returns once it listens (or failed to start).
pub fn start(config: Config, options: StartOptions) -> Result<Running, StartError> {
    start_with(config, options, Vec::new())
}

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

fn start_with(
    config: Config,
    options: StartOptions,
    custom: Vec<(String, ChildFactory)>,
) -> Result<Running, StartError> {
    for (name, _) in &custom {
        if BUILT_IN_ROUTES.contains(&name.as_str()) {
            return Err(StartError(format!("route actor {name:?}: that name is a built-in route")));
        }
    }
    check_route_names(&config, &custom)?;
    let folders = Folders::new(&config.mailroot.path);
    folders.create().map_err(|e| StartError(format!("creating the Mailroot folders: {e}")))?;
    let listen = config.listen_addrs().map_err(|e| StartError(e.to_string()))?;
    let admin_listener = match config.admin_addr().map_err(|e| StartError(e.to_string()))? {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|e| StartError(format!("admin.listen: cannot listen on {addr}: {e}")))?,
        ),
        None => None,
    };
    let admin_addr = match &admin_listener {
        Some(l) => Some(l.local_addr().map_err(|e| StartError(e.to_string()))?),
        None => None,
    };
    let floor = highest_drop_id(&folders.drop)
        .map_err(|e| StartError(format!("reading {}: {e}", folders.drop.display())))?
        .saturating_add(1);
    let security = Security::load(&config)?;
    let protolog = ProtocolLog::open(&config.log.protocol).map_err(|e| StartError(format!("log.protocol: {e}")))?;
    let store = open_store(&folders.queue, floor)?;

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let registry = Arc::new(registry);

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Vec<SocketAddr>, StartError>>();
    let (control_tx, control_rx) = tokio::sync::mpsc::channel::<Control>(16);
    let control = ControlHandle(control_tx);
    let failed = Arc::new(AtomicBool::new(false));
    let parts = Parts {
        failed: failed.clone(),
        config,
        options,
        folders: folders.clone(),
        store,
        metrics,
        registry: registry.clone(),
        listen,
        admin: admin_listener,
        security,
        protolog,
        custom,
        control: control.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("mailroot".into())
        .spawn(move || run_system(parts, ready_tx, control_rx))
        .map_err(|e| StartError(format!("cannot start the actor system thread: {e}")))?;

    match ready_rx.recv() {
        Ok(Ok(smtp_addrs)) => {
            Ok(Running { smtp_addrs, admin_addr, folders, registry, control, failed, thread: Some(thread) })
        }
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(StartError("the actor system stopped while starting".into()))
        }
    }
}

/// Every route the config names must have an actor: built in, or registered.
fn check_route_names(config: &Config, custom: &[(String, ChildFactory)]) -> Result<(), StartError> {
    let table = RouteTable::new(&config.routes).map_err(|e| StartError(format!("routes: {e}")))?;
    for name in table.names() {
        if !BUILT_IN_ROUTES.contains(&name) && !custom.iter().any(|(n, _)| n == name) {
            let registered: Vec<&str> = custom.iter().map(|(n, _)| n.as_str()).collect();
            return Err(StartError(format!(
                "routes: no delivery actor is named {name:?} (built in: {}; registered: {})",
                BUILT_IN_ROUTES.join(", "),
                if registered.is_empty() { "none".to_string() } else { registered.join(", ") }
            )));
        }
    }
    Ok(())
}

/// Everything the actor system thread needs.
struct Parts {
    config: Config,
    options: StartOptions,
    folders: Folders,
    store: Store,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    listen: Vec<SocketAddr>,
    admin: Option<std::net::TcpListener>,
    security: Security,
    protolog: Option<Arc<ProtocolLog>>,
    custom: Vec<(String, ChildFactory)>,
    control: ControlHandle,
    failed: Arc<AtomicBool>,
}

/// The route actors (supervisors) by name, with the settings each was built from, so a reload
/// restarts only those whose settings changed.
#[derive(Default)]
struct RouteActors {
    actors: HashMap<String, (String, Addr<DeliverySupervisor>)>,
}

impl RouteActors {
    /// Starts (or keeps) the actor of every route the config makes available.
    fn update(
        &mut self,
        config: &Config,
        folders: &Folders,
        metrics: &Arc<Metrics>,
        custom: &[(String, ChildFactory)],
    ) -> Result<Vec<String>, StartError> {
        let mut wanted: Vec<(String, String, ChildFactory)> = Vec::new();
        let (drop_dir, sort_temp, m) = (folders.drop.clone(), folders.sort_temp.clone(), metrics.clone());
        wanted.push((
            "drop".into(),
            format!("{drop_dir:?}"),
            supervisor::factory(move || Ok(LocalDrop::new(drop_dir.clone(), sort_temp.clone(), m.clone()))),
        ));
        let remote = config.remote_settings().map_err(|e| StartError(e.to_string()))?;
        // Checked here so that a restart cannot meet a resolver error the start did not.
        RemoteDelivery::new(remote.clone(), metrics.clone()).map_err(StartError)?;
        let m = metrics.clone();
        let r = remote.clone();
        wanted.push((
            "smtp".into(),
            format!("{remote:?}"),
            supervisor::factory(move || RemoteDelivery::new(r.clone(), m.clone())),
        ));
        if remote.smart_host.is_some() {
            let mut smart = remote.clone();
            smart.direct_before_smart_host = false;
            smart.domains.values_mut().for_each(|d| d.smart_host = None);
            let m = metrics.clone();
            let s = smart.clone();
            wanted.push((
                "smarthost".into(),
                format!("{smart:?}"),
                supervisor::factory(move || RemoteDelivery::new(s.clone(), m.clone())),
            ));
        }
        if !config.maildir.path.is_empty() {
            let settings =
                MaildirSettings { path: config.maildir.path.clone(), hostname: config.server.hostname.clone() };
            let s = settings.clone();
            wanted.push((
                "maildir".into(),
                format!("{settings:?}"),
                supervisor::factory(move || Ok(Maildir::new(s.clone()))),
            ));
        }
        if !config.lmtp.address.is_empty() {
            let settings = LmtpSettings {
                address: config.lmtp.address.clone(),
                hostname: config.server.hostname.clone(),
                timeout: config.lmtp.timeout.0,
                max_connections: config.lmtp.max_connections,
            };
            let s = settings.clone();
            wanted.push((
                "lmtp".into(),
                format!("{settings:?}"),
                supervisor::factory(move || Ok(Lmtp::new(s.clone()))),
            ));
        }
        for (name, factory) in custom {
            wanted.push((name.clone(), "custom".into(), factory.clone()));
        }
        let mut changed = Vec::new();
        let mut next = HashMap::new();
        for (name, key, factory) in wanted {
            match self.actors.remove(&name) {
                Some((old_key, addr)) if old_key == key => {
                    next.insert(name, (key, addr));
                }
                old => {
                    let meter = metrics.actor(route_kind(&name));
                    let addr = DeliverySupervisor::new(&name, factory, meter).start();
                    if old.is_some() {
                        changed.push(name.clone());
                    }
                    next.insert(name, (key, addr));
                }
            }
        }
        // Routes no longer available stop once their deliveries in flight end.
        changed.extend(self.actors.keys().cloned());
        self.actors = next;
        Ok(changed)
    }

    fn router(&self, config: &Config) -> Result<Router, StartError> {
        let table = RouteTable::new(&config.routes).map_err(|e| StartError(format!("routes: {e}")))?;
        let actors = self.actors.iter().map(|(n, (_, a))| (n.clone(), a.clone().recipient()));
        Ok(Router::new(config.local_domains(), table, actors))
    }
}

/// What the SMTP side is built from; rebuilt at each reload.
fn listener_settings(config: &Config, security: &Security, reverse_dns: Option<Arc<Dns>>) -> ListenerSettings {
    let params = Arc::new(SessionParams {
        hostname: config.server.hostname.clone(),
        local_domains: config.local_domains(),
        relay_domains: config.relay_domains(),
        max_message_size: config.limits.max_message_size as usize,
        max_recipients: config.limits.max_recipients,
        max_messages_per_connection: config.limits.max_messages_per_connection,
        max_errors: config.limits.max_errors,
        max_hop_count: config.queue.max_hop_count,
        tls_available: security.tls.is_some(),
        tls_required: config.tls.required,
        auth_enabled: security.users.is_some(),
        auth_plaintext_loopback: config.auth.allow_plaintext_loopback,
    });
    ListenerSettings {
        params,
        relay_networks: Arc::new(config.relay.allow_networks.clone()),
        max_connections: config.server.max_connections,
        idle_timeout: config.server.idle_timeout.0,
        access: AccessLists { allow: config.access.allow.clone(), deny: config.access.deny.clone() },
        max_connections_per_ip: config.access.max_connections_per_ip,
        max_connections_per_ip_per_minute: config.access.max_connections_per_ip_per_minute,
        tls: security.tls.clone().map(tokio_rustls::TlsAcceptor::from),
        reverse_dns,
    }
}

/// The parts of the running system the control task works with.
struct Wired {
    config: Config,
    config_path: Option<PathBuf>,
    folders: Folders,
    metrics: Arc<Metrics>,
    custom: Vec<(String, ChildFactory)>,
    routes: RouteActors,
    reverse_dns: Option<Arc<Dns>>,
    /// The routes a restarted Queue starts with.
    router: Arc<std::sync::Mutex<Router>>,
    listener: Addr<Listener>,
    queue: Addr<QueueSupervisor>,
    pickup: Addr<Pickup>,
    pickup_factory: Box<dyn Fn() -> Addr<Pickup>>,
    /// Set when the daemon stops because a part of it failed (exit status 1).
    failed: Arc<AtomicBool>,
    admin: Option<actix_web::dev::ServerHandle>,
    stop_tx: tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
    protolog: Option<Arc<ProtocolLog>>,
}

fn run_system(
    parts: Parts,
    ready: std::sync::mpsc::Sender<Result<Vec<SocketAddr>, StartError>>,
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
        security,
        protolog,
        custom,
        control,
    } = parts;

    let started = system.block_on(async {
        let mut sockets = Vec::new();
        let mut addrs = Vec::new();
        for addr in &listen {
            let socket = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| StartError(format!("server.listen: cannot listen on {addr}: {e}")))?;
            addrs.push(socket.local_addr().map_err(|e| StartError(e.to_string()))?);
            sockets.push(socket);
        }
        let mut routes = RouteActors::default();
        routes.update(&config, &folders, &metrics, &custom)?;
        let router = routes.router(&config)?;
        let remote_settings = config.remote_settings().map_err(|e| StartError(e.to_string()))?;
        let reverse_dns = if config.access.reverse_dns {
            let dns = Dns::new(&remote_settings.nameservers, remote_settings.dns_timeout, metrics.clone())
                .map_err(StartError)?;
            Some(Arc::new(dns))
        } else {
            None
        };
        let queue_settings = QueueSettings {
            hostname: config.server.hostname.clone(),
            retry_intervals: config.queue.retry_intervals.iter().map(|d| d.0).collect(),
            expire_after: config.queue.expire_after.0,
            delay_notice_after: config.queue.delay_notice_after.0,
            ndr_copy_to: Some(config.queue.ndr_copy_to.clone()).filter(|s| !s.is_empty()),
            badmail_dir: folders.badmail.clone(),
            ..QueueSettings::default()
        };
        let qm = metrics.clone();
        let store = Arc::new(store);
        let current_router = Arc::new(std::sync::Mutex::new(router));
        let r = current_router.clone();
        let factory: QueueFactory = Box::new(move || {
            let router = r.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Queue::new(store.clone(), queue_settings.clone(), router, qm.clone())
        });
        let queue = QueueSupervisor::new(factory, metrics.actor("queue")).start();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(None);
        let failed = failed.clone();
        let paused = Arc::new(AtomicBool::new(false));
        let listener = Listener::new(
            sockets,
            listener_settings(&config, &security, reverse_dns.clone()),
            SessionShared {
                queue: queue.clone().recipient(),
                metrics: metrics.clone(),
                users: security.users.clone(),
                auth_checks: Arc::new(tokio::sync::Semaphore::new(cores.max(2))),
                error_delay: config.limits.error_delay.0,
                stop: stop_rx,
                meter: metrics.actor("session"),
                protolog: protolog.clone(),
            },
            session_arbiters.iter().map(|a| a.handle()).collect(),
        )
        .paused_by(paused.clone())
        .start();
        let pickup_settings = PickupSettings {
            pickup_dir: folders.pickup.clone(),
            badmail_dir: folders.badmail.clone(),
            poll: Duration::from_millis(250),
            max_message_size: config.limits.max_message_size as usize,
            max_hop_count: config.queue.max_hop_count,
            max_concurrent: 64,
        };
        let (q, m) = (queue.clone(), metrics.clone());
        let pickup_factory: Box<dyn Fn() -> Addr<Pickup>> = Box::new(move || {
            Pickup::new(pickup_settings.clone(), q.clone().recipient(), q.clone().recipient(), m.clone()).start()
        });
        let pickup = pickup_factory();
        let admin = match admin {
            Some(socket) => {
                let state = AdminState {
                    queue: queue.clone(),
                    registry,
                    metrics: metrics.clone(),
                    token: config.admin.token.clone(),
                    metrics_public: config.admin.metrics_public,
                    started: std::time::Instant::now(),
                    started_unix: unix_now(),
                    paused,
                    control: control.clone(),
                    smtp_listeners: addrs.clone(),
                    hostname: config.server.hostname.clone(),
                };
                let server = crate::admin::serve(socket, state).map_err(|e| StartError(format!("admin.listen: {e}")))?;
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
                reverse_dns,
                listener,
                queue,
                pickup,
                pickup_factory,
                failed: failed.clone(),
                admin,
                stop_tx,
                protolog,
            },
        ))
    });

    let ok = system.block_on(async move {
        let sys = match started {
            Ok((addrs, sys)) => {
                let _ = ready.send(Ok(addrs));
                sd_notify("READY=1");
                sys
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return false;
            }
        };
        // Spawned here so that it runs on the system arbiter once `run` starts.
        actix_rt::spawn(control_loop(sys, control_rx, options.handle_signals));
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

/// A stop or reload request, from a signal or the control channel.
enum Request {
    Stop(&'static str),
    #[cfg(debug_assertions)]
    InjectPanic(&'static str),
    /// Time to check that the Listener and Pickup are alive.
    Watch,
    Reload(Option<oneshot::Sender<Result<Vec<String>, String>>>),
}

struct Signals {
    watch: tokio::time::Interval,
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new(enabled: bool) -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let watch = tokio::time::interval(Duration::from_secs(1));
        if !enabled {
            return Signals { watch, term: None, int: None, hup: None };
        }
        let s = Signals {
            watch,
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
        };
        if s.term.is_none() || s.int.is_none() || s.hup.is_none() {
            error!("cannot install every signal handler (TERM, INT, HUP)");
        }
        s
    }

    async fn next(&mut self, rx: &mut tokio::sync::mpsc::Receiver<Control>) -> Request {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            c = rx.recv() => match c {
                Some(Control::Stop) | None => Request::Stop("stop requested"),
                Some(Control::Reload(reply)) => Request::Reload(reply),
                #[cfg(debug_assertions)]
                Some(Control::InjectPanic(actor)) => Request::InjectPanic(actor),
            },
            _ = recv(&mut self.term) => Request::Stop("SIGTERM received"),
            _ = recv(&mut self.int) => Request::Stop("SIGINT received"),
            _ = recv(&mut self.hup) => Request::Reload(None),
            _ = self.watch.tick() => Request::Watch,
        }
    }
}

async fn control_loop(mut sys: Wired, mut rx: tokio::sync::mpsc::Receiver<Control>, signals: bool) {
    let mut signals = Signals::new(signals);
    let mut watchdog = Watchdog::from_env();
    loop {
        let request = match signals.next(&mut rx).await {
            Request::Watch if !sys.listener.connected() => {
                // Its sockets went with it: stop in order and let the service manager start a
                // new process (the systemd unit restarts on failure).
                error!("the SMTP listener died; stopping with a failure status");
                sys.failed.store(true, Ordering::Relaxed);
                Request::Stop("the listener died")
            }
            other => other,
        };
        match request {
            #[cfg(debug_assertions)]
            Request::InjectPanic(actor) => match actor {
                "queue" => sys.queue.do_send(mailroot_actors::fault::InjectPanic),
                "pickup" => sys.pickup.do_send(mailroot_actors::fault::InjectPanic),
                "listener" => sys.listener.do_send(mailroot_actors::fault::InjectPanic),
                other => warn!(actor = other, "no such actor to make panic"),
            },
            Request::Watch => {
                if !sys.pickup.connected() {
                    error!("the Pickup actor died; starting a new one");
                    sys.metrics.actor("pickup").restarted();
                    sys.pickup = (sys.pickup_factory)();
                }
                watchdog.tick(&sys.queue).await;
            }
            Request::Reload(reply) => {
                sd_notify("RELOADING=1");
                let result = reload(&mut sys).await;
                match &result {
                    Ok(changed) if changed.is_empty() => info!("configuration reloaded: nothing changed"),
                    Ok(changed) => info!(changed = %changed.join(", "), "configuration reloaded"),
                    Err(e) => error!(error = %e, "configuration reload refused; the running configuration stays"),
                }
                sd_notify("READY=1");
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Request::Stop(why) => {
                info!(why, "stopping");
                sd_notify("STOPPING=1");
                let graceful = shutdown(&sys);
                tokio::select! {
                    _ = graceful => {}
                    _ = async {
                        loop {
                            if let Request::Stop(_) = signals.next(&mut rx).await {
                                break;
                            }
                        }
                    } => warn!("second stop request: stopping at once"),
                }
                match sys.queue.send(Flush).await {
                    Ok(Ok(())) => info!("queue flushed"),
                    Ok(Err(e)) => error!(error = %e, "final queue flush failed"),
                    Err(e) => error!(error = %e, "queue unavailable at shutdown"),
                }
                if let Some(admin) = &sys.admin {
                    admin.stop(false).await;
                }
                if let Some(log) = &sys.protolog {
                    log.flush();
                }
                System::current().stop();
                return;
            }
        }
    }
}

/// The orderly part of a stop: no new connections, sessions finish their transaction (until the
/// grace time), deliveries in flight end (until the grace time) and nothing new starts.
async fn shutdown(sys: &Wired) {
    let grace = sys.config.server.shutdown_grace.0;
    let deadline = tokio::time::Instant::now() + grace;
    let _ = sys.listener.send(StopListening).await;
    let _ = sys.stop_tx.send(Some(deadline));
    let drain = sys.queue.send(Drain { grace });
    let sessions = async {
        // Sessions past the deadline are being closed with 421; give them a moment to say so.
        while sys.metrics.connections_current.get() > 0
            && tokio::time::Instant::now() < deadline + Duration::from_secs(2)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (drained, ()) = tokio::join!(drain, sessions);
    match drained {
        Ok(0) => info!("no delivery in flight"),
        Ok(n) => warn!(in_flight = n, "deliveries still in flight at the grace time; their recipients stay queued"),
        Err(e) => error!(error = %e, "queue unavailable while draining"),
    }
    let open = sys.metrics.connections_current.get();
    if open > 0 {
        warn!(open, "sessions still open at the grace time");
    }
}

/// Reads the configuration again and applies what may change at run time.
async fn reload(sys: &mut Wired) -> Result<Vec<String>, String> {
    let Some(path) = sys.config_path.clone() else {
        return Err("mailroot was started without a configuration file; nothing to reload".into());
    };
    let mut new = Config::load(Some(&path)).map_err(|e| e.to_string())?.config;
    // The host name is also in every Received: header and notification the queue writes, and
    // the queue's settings only change at a restart: keep the running name everywhere until then.
    let hostname_changed = new.server.hostname != sys.config.server.hostname;
    new.server.hostname = sys.config.server.hostname.clone();
    check_route_names(&new, &sys.custom).map_err(|e| e.0)?;
    let security = Security::load(&new).map_err(|e| e.0)?;
    // Route actors: only those whose settings changed are replaced.
    let mut routes = RouteActors { actors: sys.routes.actors.clone() };
    let restarted = routes.update(&new, &sys.folders, &sys.metrics, &sys.custom).map_err(|e| e.0)?;
    let router = routes.router(&new).map_err(|e| e.0)?;

    let section = |c: &Config, name: &str| -> String {
        toml::Value::try_from(c).ok().and_then(|v| v.get(name).map(|s| s.to_string())).unwrap_or_default()
    };
    let applied = ["tls", "auth", "relay", "access", "limits", "routes", "domains", "maildir", "lmtp", "delivery"];
    let restart_only = ["mailroot", "queue", "admin", "log"];
    let mut changed: Vec<String> =
        applied.iter().filter(|s| section(&sys.config, s) != section(&new, s)).map(|s| s.to_string()).collect();
    let old_server = Config { server: Server { listen: vec![], ..sys.config.server.clone() }, ..Config::default() };
    let new_server = Config { server: Server { listen: vec![], ..new.server.clone() }, ..Config::default() };
    if section(&old_server, "server") != section(&new_server, "server") {
        changed.push("server".into());
    }
    // A TLS certificate file replaced under the same name is a change too.
    if security.tls.is_some() && !changed.iter().any(|c| c == "tls") {
        changed.push("tls (certificate reloaded)".into());
    }
    let mut needs_restart: Vec<&str> =
        restart_only.iter().copied().filter(|s| section(&sys.config, s) != section(&new, s)).collect();
    if hostname_changed {
        needs_restart.push("server.hostname");
    }
    if sys.config.server.listen != new.server.listen {
        needs_restart.push("server.listen");
    }
    if !needs_restart.is_empty() {
        warn!(sections = %needs_restart.join(", "), "changed but only applied at the next start");
    }
    sys.listener
        .send(Reconfigure {
            settings: listener_settings(&new, &security, sys.reverse_dns.clone()),
            users: security.users.clone(),
            error_delay: new.limits.error_delay.0,
        })
        .await
        .map_err(|e| format!("listener unavailable: {e}"))?;
    *sys.router.lock().unwrap_or_else(|e| e.into_inner()) = router.clone();
    sys.queue.send(SetRouter(router)).await.map_err(|e| format!("queue unavailable: {e}"))?;
    if !restarted.is_empty() {
        info!(routes = %restarted.join(", "), "route actors replaced with new settings");
    }
    sys.routes = routes;
    sys.config = new;
    Ok(changed)
}

/// systemd's watchdog (`WatchdogSec=` in the unit sets `WATCHDOG_USEC`): `WATCHDOG=1` at half
/// the interval, but only while the Queue answers, so a wedged queue gets the process restarted
/// rather than kept alive by a control task that still runs.
struct Watchdog {
    interval: Option<Duration>,
    last: tokio::time::Instant,
}

impl Watchdog {
    fn from_env() -> Watchdog {
        let usec = std::env::var("WATCHDOG_USEC").ok().and_then(|v| v.parse::<u64>().ok()).filter(|&u| u > 0);
        // WATCHDOG_PID, when set, names the process the watchdog is for.
        let ours = std::env::var("WATCHDOG_PID").ok().is_none_or(|p| p == std::process::id().to_string());
        let interval = usec.filter(|_| ours).map(|u| Duration::from_micros(u) / 2);
        if let Some(i) = interval {
            info!(every_ms = i.as_millis() as u64, "systemd watchdog: notifying while the queue answers");
        }
        Watchdog { interval, last: tokio::time::Instant::now() }
    }

    async fn tick(&mut self, queue: &Addr<QueueSupervisor>) {
        let Some(interval) = self.interval else { return };
        if self.last.elapsed() < interval.saturating_sub(Duration::from_secs(1)) {
            return;
        }
        match tokio::time::timeout(interval, queue.send(Summary)).await {
            Ok(Ok(_)) => {
                sd_notify("WATCHDOG=1");
                self.last = tokio::time::Instant::now();
            }
            _ => warn!("the queue did not answer the watchdog check; not notifying systemd"),
        }
    }
}

/// Tells systemd (`Type=notify`) about our state; nothing when not started by systemd.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        warn!(error = %e, state, "cannot notify systemd");
    }
}
