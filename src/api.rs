//! The admin API's JSON bodies, as types: `admin.rs` serialises them and the CLI (`cli.rs`)
//! deserialises the very same types, so the two cannot drift apart. The queue's own views
//! (`MessageInfo`, `ListPage`, `QueueSummary`) come from the engine and are re-exported here.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

pub use mailroot_actors::queue::{ListPage, MessageInfo, QueueSummary, RecipientInfo};

/// `GET /api/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub version: Cow<'static, str>,
    pub hostname: String,
    /// `running`, `paused` or `stopping`.
    pub state: Cow<'static, str>,
    /// Unix seconds.
    pub started_at: u64,
    pub uptime_seconds: u64,
    /// The SMTP listeners.
    pub listeners: Vec<ListenerStatus>,
    /// SMTP connections open now.
    pub connections: i64,
    pub queue: QueueSummary,
}

/// One SMTP listener in `GET /api/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListenerStatus {
    /// Its name in the configuration (`mx` for `[server] listen`).
    pub name: String,
    /// `mx`, `submission` or `submissions`.
    pub role: Cow<'static, str>,
    pub addresses: Vec<String>,
    /// Connections open on it now.
    pub connections: i64,
}

/// `POST /api/queue/{id}/bounce`, `DELETE /api/queue/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Done {
    pub id: u64,
    /// The action done: `bounce` or `delete`.
    pub result: Cow<'static, str>,
}

/// `POST /api/queue/retry-all[?domain=]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Retried {
    /// Messages that will be tried now.
    pub retried: usize,
    pub domain: Option<String>,
}

/// `POST /api/server/pause|resume|stop`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerState {
    /// `paused`, `running` or `stopping`.
    pub state: Cow<'static, str>,
}

/// `POST /api/server/reload`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reloaded {
    /// The sections applied now (empty: nothing changed).
    pub changed: Vec<String>,
}

/// `POST /api/queue/bulk`: one action on many messages (at most [`BULK_MAX`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BulkRequest {
    /// `retry`, `hold`, `release`, `bounce` or `delete`.
    pub action: String,
    pub ids: Vec<u64>,
}

/// Most messages one bulk request may name: the console sends a larger selection in pieces.
pub const BULK_MAX: usize = 1000;

/// The answer to `POST /api/queue/bulk`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BulkDone {
    pub action: String,
    /// Messages the action was done to.
    pub done: usize,
    /// The others, each with why (gone meanwhile, being delivered, …).
    pub failed: Vec<BulkFailure>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BulkFailure {
    pub id: u64,
    pub error: String,
}

/// `POST /api/sessions/{id}/disconnect`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Disconnected {
    pub id: u64,
}

/// `GET /api/queue/{id}/headers`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageHeaders {
    pub id: u64,
    /// The header section as stored (our `Received:` first), at most 64 KiB of it.
    pub headers: String,
}

/// Every error: 400, 401, 404, 409, 422, 500, 503.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    pub error: String,
}
