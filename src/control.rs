//! The control channel: how the admin API and the daemon's `Running` handle ask the running daemon
//! to stop or reload, as typed requests. The daemon's control task (`daemon/control.rs`) holds
//! the receiving end. Its own module so that the admin API depends on this channel only, and
//! nothing of the daemon: the daemon starts the admin API, never the other way round.

use tokio::sync::{mpsc, oneshot};

/// What the control task of a running daemon can be asked to do.
#[derive(Debug)]
pub(crate) enum Control {
    Stop,
    /// Fault injection for the supervision tests (debug builds only).
    #[cfg(debug_assertions)]
    InjectPanic(&'static str),
    Reload(Option<oneshot::Sender<Result<Vec<String>, String>>>),
}

/// Asks a running daemon to stop or reload (the admin API and the daemon's `Running` handle hold one).
#[derive(Clone)]
pub struct ControlHandle(mpsc::Sender<Control>);

impl ControlHandle {
    pub(crate) fn new(sender: mpsc::Sender<Control>) -> Self {
        ControlHandle(sender)
    }

    pub(crate) fn sender(&self) -> &mpsc::Sender<Control> {
        &self.0
    }

    /// Starts an orderly stop (as SIGTERM does). False when the daemon is already gone.
    pub fn stop(&self) -> bool {
        // A full channel means requests are already waiting; one more stop changes nothing.
        !matches!(self.0.try_send(Control::Stop), Err(mpsc::error::TrySendError::Closed(_)))
    }

    /// Reloads the configuration file (as SIGHUP); `Ok` lists what changed.
    pub async fn reload(&self) -> Result<Vec<String>, String> {
        let (tx, rx) = oneshot::channel();
        self.0.send(Control::Reload(Some(tx))).await.map_err(|_| "the daemon is stopping".to_string())?;
        rx.await.map_err(|_| "the daemon stopped".to_string())?
    }
}
