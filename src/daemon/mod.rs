//! The daemon: builds and starts mailroot, and hands back a [`Running`] handle.
//!
//! Layout:
//! - this file: [`Daemon::builder`] / [`start`], [`Running`], the Mailroot [`Folders`],
//!   [`StartError`];
//! - `routes.rs`: the route actors by name, replaced at a reload only when their settings change;
//! - `wiring.rs`: starts the actor system — the Queue and its supervisor, the Listener and the
//!   session arbiters, Pickup, the admin API — from settings made by `crate::config`;
//! - `control.rs`: the control task (signals, the admin API's requests, stop in order, reload,
//!   the liveness checks); `reload.rs`: what a reload changes, as a pure function;
//! - `systemd.rs`: readiness notifications and the watchdog.
//!
//! Dependencies point one way: `main`/`cli` → `daemon` → `config` → `mailroot_actors` →
//! `mailroot_protocol`. The admin API is started by `wiring.rs` and talks back only through
//! [`ControlHandle`] (`control.rs`), which imports nothing of the admin API.
//!
//! Arbiters: the Queue gets one of its own (its sled writes must not stall sessions), started by
//! its supervisor, as does each route's delivery actor; sessions are spread over one arbiter per
//! core; the Listener, Pickup, the supervisors and the control task share the system arbiter.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use actix::prelude::*;
use mailroot_actors::delivery::Deliver;
use mailroot_actors::local_drop::highest_drop_id;
use mailroot_actors::metrics::Metrics;
use mailroot_actors::session::ProtocolLog;
use mailroot_actors::store::{PgStore, QueueStore, SledStore, StoreError};
use mailroot_actors::supervisor::{self, ChildFactory};
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

use crate::config::{Config, ConfigError, Security};

mod control;
mod reload;
pub mod reports;
mod routes;
mod systemd;
mod wiring;

pub use crate::control::ControlHandle;
pub use routes::BUILT_IN_ROUTES;

use crate::control::Control;
use wiring::Parts;

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

/// Each listener's name and the addresses it is bound to.
pub type BoundListeners = Vec<(String, Vec<SocketAddr>)>;

/// A running mailroot.
pub struct Running {
    /// The addresses the SMTP listeners are bound to (useful with port 0), all listeners'.
    pub smtp_addrs: Vec<SocketAddr>,
    /// The same by listener name, in the configuration's order (`mx` for `[server] listen`).
    pub listeners: Vec<(String, Vec<SocketAddr>)>,
    /// The admin API's address, when it runs.
    pub admin_addr: Option<SocketAddr>,
    pub folders: Folders,
    registry: Arc<Registry>,
    control: ControlHandle,
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    /// The first address of the listener called `name` (tests and embedders).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.iter().find(|(n, _)| n == name).and_then(|(_, a)| a.first().copied())
    }

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
        self.control.sender().try_send(Control::Reload(Some(tx))).map_err(|e| format!("daemon not reachable: {e}"))?;
        rx.blocking_recv().map_err(|_| "the daemon stopped".to_string())?
    }

    /// Fault injection for the supervision tests: makes `actor` (`queue`, `pickup` or
    /// `listener`) panic. Debug builds only.
    #[cfg(debug_assertions)]
    #[doc(hidden)]
    pub fn inject_panic(&self, actor: &'static str) {
        let _ = self.control.sender().try_send(Control::InjectPanic(actor));
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

/// Why mailroot did not start (or a reload was refused).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the queue in {} is locked: is another mailroot running on this Mailroot?", path.display())]
    QueueLocked { path: PathBuf },
    #[error("opening the queue in {}: {source}", path.display())]
    Queue { path: PathBuf, source: StoreError },
    #[error("{0}")]
    Other(String),
}

/// A listening socket. An IPv6 one is IPv6-only, so `0.0.0.0:25` and `[::]:25` can both be
/// listened on (Linux's default would make `[::]` take IPv4 too, and the second bind fail).
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // As std's bind does on Unix: a restart can listen again while old connections linger.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Each connection is a file descriptor: the soft limit (often 1024) is raised to the hard one,
/// and a hard limit below what `max_connections` needs is said at start (the systemd unit sets
/// `LimitNOFILE=65536`).
fn raise_open_file_limit(max_connections: usize) {
    let needed = max_connections as u64 + 256;
    match rlimit::increase_nofile_limit(needed.max(65_536)) {
        Ok(n) if n < needed => tracing::warn!(
            open_files = n,
            max_connections,
            "the open-file limit is below what server.max_connections needs; raise LimitNOFILE or ulimit -n"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

/// The queue store the configuration names, opened outside a running daemon (for
/// `mailroot queue export/import`): sled refuses while a daemon holds it.
pub fn open_queue_store(config: &Config) -> Result<Arc<dyn QueueStore>, StartError> {
    let folders = Folders::new(&config.mailroot.path);
    folders.create().map_err(|e| StartError::Other(format!("{}: {e}", folders.root.display())))?;
    let floor = highest_drop_id(&folders.drop)
        .map_err(|e| StartError::Other(format!("reading {}: {e}", folders.drop.display())))?
        .saturating_add(1);
    open_store(config, &folders.queue, floor)
}

/// The queue store the configuration names. sled locks its folder; a daemon that just stopped may
/// take a moment to let go. PostgreSQL is reached (and its schema migrated) before anything else
/// starts: a node that cannot reach its queue does not take mail.
fn open_store(config: &Config, dir: &Path, id_floor: u64) -> Result<Arc<dyn QueueStore>, StartError> {
    if config.queue.store == "postgres" {
        let settings = config.pg_settings()?;
        let store = PgStore::open(&settings, dir, id_floor).map_err(|e| {
            StartError::Other(format!("opening the queue database (queue.postgres, schema {}): {e}", settings.schema))
        })?;
        tracing::info!(node = %settings.node, schema = %settings.schema, "queue on PostgreSQL");
        return Ok(Arc::new(store));
    }
    match SledStore::open_waiting(dir, id_floor, Duration::from_secs(3)) {
        Ok(store) => Ok(Arc::new(store)),
        Err(StoreError::Locked(_)) => Err(StartError::QueueLocked { path: dir.to_path_buf() }),
        Err(source) => Err(StartError::Queue { path: dir.to_path_buf(), source }),
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

fn start_with(
    config: Config,
    options: StartOptions,
    custom: Vec<(String, ChildFactory)>,
) -> Result<Running, StartError> {
    mailroot_actors::alloc::return_large_blocks();
    for (name, _) in &custom {
        if BUILT_IN_ROUTES.contains(&name.as_str()) {
            return Err(StartError::Other(format!("route actor {name:?}: that name is a built-in route")));
        }
    }
    routes::check_names(&config, &custom)?;
    let folders = Folders::new(&config.mailroot.path);
    folders.create().map_err(|e| StartError::Other(format!("creating the Mailroot folders: {e}")))?;
    let listen = config.listener_defs()?;
    raise_open_file_limit(config.server.max_connections);
    let admin_listener = match config.admin_addr()? {
        Some(addr) => {
            Some(bind(addr).map_err(|e| StartError::Other(format!("admin.listen: cannot listen on {addr}: {e}")))?)
        }
        None => None,
    };
    // Before anything starts, so a Mailroot where it cannot be written is a clear start error.
    let admin_token = match &admin_listener {
        Some(_) => crate::admin::guard::load_or_create_token(&config)
            .map_err(|e| StartError::Other(format!("admin token: {e}")))?,
        None => String::new(),
    };
    let admin_addr = match &admin_listener {
        Some(l) => Some(l.local_addr().map_err(|e| StartError::Other(e.to_string()))?),
        None => None,
    };
    let floor = highest_drop_id(&folders.drop)
        .map_err(|e| StartError::Other(format!("reading {}: {e}", folders.drop.display())))?
        .saturating_add(1);
    let security = Security::load(&config)?;
    let protolog =
        ProtocolLog::open(&config.log.protocol).map_err(|e| StartError::Other(format!("log.protocol: {e}")))?;
    let store = open_store(&config, &folders.queue, floor)?;

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let registry = Arc::new(registry);

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<BoundListeners, StartError>>();
    let (control_tx, control_rx) = tokio::sync::mpsc::channel::<Control>(16);
    let control = ControlHandle::new(control_tx);
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
        admin_token,
        security,
        protolog,
        custom,
        control: control.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("mailroot".into())
        .spawn(move || wiring::run_system(parts, ready_tx, control_rx))
        .map_err(|e| StartError::Other(format!("cannot start the actor system thread: {e}")))?;

    match ready_rx.recv() {
        Ok(Ok(listeners)) => {
            let smtp_addrs = listeners.iter().flat_map(|(_, a)| a.iter().copied()).collect();
            Ok(Running { smtp_addrs, listeners, admin_addr, folders, registry, control, failed, thread: Some(thread) })
        }
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(StartError::Other("the actor system stopped while starting".into()))
        }
    }
}
