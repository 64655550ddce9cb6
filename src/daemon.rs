//! Wiring: creates the Mailroot folders, opens the queue, starts every actor on its arbiter,
//! binds the listeners, and stops it all in order.
//!
//! Arbiters: the Queue gets one of its own (its sled writes must not stall sessions); sessions are
//! spread over one arbiter per core; Listener, LocalDrop and Pickup share the system arbiter.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use actix::prelude::*;
use actix_rt::{Arbiter, System};
use mailroot_actors::auth::Users;
use mailroot_actors::listener::{AccessLists, Listener, ListenerSettings, StopListening};
use mailroot_actors::local_drop::LocalDrop;
use mailroot_actors::metrics::Metrics;
use mailroot_actors::pickup::{Pickup, PickupSettings};
use mailroot_actors::protocol::SessionParams;
use mailroot_actors::queue::{Flush, Queue, QueueSettings, Router};
use mailroot_actors::remote::dns::Dns;
use mailroot_actors::remote::RemoteDelivery;
use mailroot_actors::session::SessionShared;
use mailroot_actors::store::Store;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::config::Config;

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
    /// Stop on SIGTERM/SIGINT (the binary); tests stop through [`Running::stop`].
    pub handle_signals: bool,
}

/// A running mailroot.
pub struct Running {
    /// The addresses the SMTP listeners are bound to (useful with port 0).
    pub smtp_addrs: Vec<SocketAddr>,
    pub folders: Folders,
    registry: Arc<Registry>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    /// The metrics in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    /// Stops accepting, flushes the queue, stops every actor and waits for it.
    pub fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.join();
    }

    /// Waits until the daemon stops by itself (a signal).
    pub fn wait(mut self) {
        self.join();
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
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

/// Starts mailroot on its own thread and returns once it listens (or failed to start).
pub fn start(config: Config, options: StartOptions) -> Result<Running, StartError> {
    let folders = Folders::new(&config.mailroot.path);
    folders.create().map_err(|e| StartError(format!("creating the Mailroot folders: {e}")))?;
    let listen = config.listen_addrs().map_err(|e| StartError(e.to_string()))?;
    let floor = highest_drop_id(&folders.drop)
        .map_err(|e| StartError(format!("reading {}: {e}", folders.drop.display())))?
        .saturating_add(1);
    let security = Security::load(&config)?;
    let store = open_store(&folders.queue, floor)?;

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let registry = Arc::new(registry);

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Vec<SocketAddr>, StartError>>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let f = folders.clone();
    let thread = std::thread::Builder::new()
        .name("mailroot".into())
        .spawn(move || run_system(config, options, f, store, metrics, listen, security, ready_tx, stop_rx))
        .map_err(|e| StartError(format!("cannot start the actor system thread: {e}")))?;

    match ready_rx.recv() {
        Ok(Ok(smtp_addrs)) => Ok(Running { smtp_addrs, folders, registry, stop: Some(stop_tx), thread: Some(thread) }),
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

#[allow(clippy::too_many_arguments)]
fn run_system(
    config: Config,
    options: StartOptions,
    folders: Folders,
    store: Store,
    metrics: Arc<Metrics>,
    listen: Vec<SocketAddr>,
    security: Security,
    ready: std::sync::mpsc::Sender<Result<Vec<SocketAddr>, StartError>>,
    stop_rx: oneshot::Receiver<()>,
) {
    let system = System::new();
    let queue_arbiter = Arbiter::new();
    let delivery_arbiter = Arbiter::new();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let session_arbiters: Vec<Arbiter> = (0..cores).map(|_| Arbiter::new()).collect();

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
        let local_domains = config.local_domains();
        let drop = LocalDrop::new(folders.drop.clone(), folders.sort_temp.clone(), metrics.clone()).start();
        let remote_settings = config.remote_settings().map_err(|e| StartError(e.to_string()))?;
        let reverse_dns = if config.access.reverse_dns {
            let dns = Dns::new(&remote_settings.nameservers, remote_settings.dns_timeout, metrics.clone())
                .map_err(StartError)?;
            Some(Arc::new(dns))
        } else {
            None
        };
        let remote = RemoteDelivery::new(remote_settings, metrics.clone()).map_err(StartError)?;
        let remote = RemoteDelivery::start_in_arbiter(&delivery_arbiter.handle(), move |_| remote);
        let router =
            Router { local_domains: local_domains.clone(), local: drop.recipient(), remote: Some(remote.recipient()) };
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
        let queue = Queue::start_in_arbiter(&queue_arbiter.handle(), move |_| Queue::new(store, queue_settings, router, qm));
        let params = Arc::new(SessionParams {
            hostname: config.server.hostname.clone(),
            local_domains,
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
        let listener = Listener::new(
            sockets,
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
            },
            SessionShared {
                queue: queue.clone().recipient(),
                metrics: metrics.clone(),
                users: security.users.clone(),
                auth_checks: Arc::new(tokio::sync::Semaphore::new(cores.max(2))),
                error_delay: config.limits.error_delay.0,
            },
            session_arbiters.iter().map(|a| a.handle()).collect(),
        )
        .start();
        let pickup = Pickup::new(
            PickupSettings {
                pickup_dir: folders.pickup.clone(),
                badmail_dir: folders.badmail.clone(),
                poll: Duration::from_millis(250),
                max_message_size: config.limits.max_message_size as usize,
                max_hop_count: config.queue.max_hop_count,
                max_concurrent: 64,
            },
            queue.clone().recipient(),
            queue.clone().recipient(),
            metrics.clone(),
        )
        .start();
        info!(mailroot = %folders.root.display(), hostname = %config.server.hostname, domains = ?config.domains.local, "mailroot started");
        Ok::<_, StartError>((addrs, listener, queue, pickup))
    });

    let ok = system.block_on(async move {
        let (listener, queue, pickup) = match started {
            Ok((addrs, listener, queue, pickup)) => {
                let _ = ready.send(Ok(addrs));
                (listener, queue, pickup)
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return false;
            }
        };
        // Spawned here so that it runs on the system arbiter once `run` starts.
        actix_rt::spawn(async move {
            wait_for_stop(stop_rx, options.handle_signals).await;
            info!("stopping: no new connections, flushing the queue");
            let _ = listener.send(StopListening).await;
            drop(pickup);
            match queue.send(Flush).await {
                Ok(Ok(())) => info!("queue flushed"),
                Ok(Err(e)) => error!(error = %e, "final queue flush failed"),
                Err(e) => error!(error = %e, "queue unavailable at shutdown"),
            }
            System::current().stop();
        });
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
    queue_arbiter.stop();
    let _ = queue_arbiter.join();
    delivery_arbiter.stop();
    let _ = delivery_arbiter.join();
    info!("mailroot stopped");
}

async fn wait_for_stop(stop_rx: oneshot::Receiver<()>, signals: bool) {
    if !signals {
        let _ = stop_rx.await;
        return;
    }
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        error!("cannot install signal handlers; stop with SIGKILL only");
        let _ = stop_rx.await;
        return;
    };
    tokio::select! {
        _ = stop_rx => {}
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}
