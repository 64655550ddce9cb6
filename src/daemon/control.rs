//! The control task: the one place that stops, reloads and watches the running daemon. It
//! takes requests from signals (TERM, INT: stop; HUP: reload) and from the control channel
//! (`crate::control`: the admin API and [`super::Running`] hold its sending end); once a second
//! it checks that the Listener and Pickup are alive and feeds the systemd watchdog.

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_rt::System;
use mailroot_actors::listener::{Reconfigure, StopListening};
use mailroot_actors::queue::{Drain, Flush, SetRouter, SetSigner};
use tokio::sync::{mpsc, oneshot};

use crate::control::Control;
use tracing::{error, info, warn};

use super::wiring::Wired;
use super::{reload, routes, systemd};
use crate::config::{Config, Security};

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

    async fn next(&mut self, rx: &mut mpsc::Receiver<Control>) -> Request {
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

pub(super) async fn control_loop(mut sys: Wired, mut rx: mpsc::Receiver<Control>, signals: bool) {
    let mut signals = Signals::new(signals);
    let mut watchdog = systemd::Watchdog::from_env();
    loop {
        let request = match signals.next(&mut rx).await {
            Request::Watch if sys.listeners.iter().any(|(_, l)| !l.connected()) => {
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
                "listener" => sys.listeners.iter().for_each(|(_, l)| l.do_send(mailroot_actors::fault::InjectPanic)),
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
                systemd::notify("RELOADING=1");
                let result = reload(&mut sys).await;
                match &result {
                    Ok(changed) if changed.is_empty() => info!("configuration reloaded: nothing changed"),
                    Ok(changed) => info!(changed = %changed.join(", "), "configuration reloaded"),
                    Err(e) => error!(error = %e, "configuration reload refused; the running configuration stays"),
                }
                systemd::notify("READY=1");
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Request::Stop(why) => {
                info!(why, "stopping");
                systemd::notify("STOPPING=1");
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
                // Kept LMTP connections hold a process each on the mailbox server: say goodbye.
                sys.routes.quit_kept_connections().await;
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
    for (_, l) in &sys.listeners {
        let _ = l.send(StopListening).await;
    }
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

/// Reads the configuration again and applies what may change at run time: everything is
/// loaded and checked first (`reload::plan` decides what changed), so a refused file changes
/// nothing.
async fn reload(sys: &mut Wired) -> Result<Vec<String>, String> {
    let Some(path) = sys.config_path.clone() else {
        return Err("mailroot was started without a configuration file; nothing to reload".into());
    };
    let mut new = Config::load(Some(&path)).map_err(|e| e.to_string())?.config;
    routes::check_names(&new, &sys.custom).map_err(|e| e.to_string())?;
    let security = Security::load(&new).map_err(|e| e.to_string())?;
    let plan = reload::plan(&sys.config, &new, security.tls.is_some());
    // The host name is also in every Received: header and notification the queue writes, and
    // the queue's settings only change at a restart: keep the running name everywhere until then.
    new.server.hostname = sys.config.server.hostname.clone();
    // Route actors: only those whose settings changed are replaced.
    let mut routes = sys.routes.clone();
    let restarted = routes.update(&new, &sys.folders, &sys.metrics, &sys.custom).map_err(|e| e.to_string())?;
    let router = routes.router(&new).map_err(|e| e.to_string())?;
    if !plan.needs_restart.is_empty() {
        warn!(sections = %plan.needs_restart.join(", "), "changed but only applied at the next start");
    }
    // Before the listener sees the new settings: its sessions may start asking at once.
    sys.recipient_verifier.configure(new.recipient_verifier_settings());
    // A listener added or removed waits for a restart (its sockets are bound at start): the
    // running ones take their new settings by name.
    sys.rates.set(new.rate_settings());
    let settings = new.listener_settings(&security, Some(&sys.inbound_dns), Some(&sys.metrics), Some(&sys.rates));
    mailroot_actors::listener::resize(
        &sys.connection_permits,
        sys.config.server.max_connections,
        new.server.max_connections,
    );
    for (name, listener) in &sys.listeners {
        let Some(s) = settings.iter().find(|s| s.name == name.as_str()) else { continue };
        listener
            .send(Reconfigure {
                settings: s.clone(),
                users: security.users.clone(),
                error_delay: new.limits.error_delay.0,
                auth_limits: (new.auth.max_failures, new.auth.failure_window.0),
                srs: security.srs.clone(),
            })
            .await
            .map_err(|e| format!("listener {name} unavailable: {e}"))?;
    }
    *sys.router.lock().unwrap_or_else(|e| e.into_inner()) = router.clone();
    sys.queue.send(SetRouter(router)).await.map_err(|e| format!("queue unavailable: {e}"))?;
    *sys.signer.lock().unwrap_or_else(|e| e.into_inner()) = security.dkim.clone();
    sys.queue.send(SetSigner(security.dkim.clone())).await.map_err(|e| format!("queue unavailable: {e}"))?;
    if !restarted.is_empty() {
        info!(routes = %restarted.join(", "), "route actors replaced with new settings");
    }
    sys.routes = routes;
    sys.config = new;
    Ok(plan.changed)
}
