//! The admin HTTP API (actix-web): Prometheus metrics, status, queue management,
//! pause/resume/stop, open sessions, per-actor figures, and the web console (`console.rs`) that
//! uses them. JSON in and out; every error is `{"error": "..."}` with a fitting status.
//!
//! Invariants:
//! - Every request passes `guard.rs` first: a Host that DNS rebinding cannot forge, JSON and no
//!   foreign Origin for state-changing requests, and `Authorization: Bearer <token>` (compared in
//!   constant time; a token is generated when none is configured). `/metrics` is exempt from the
//!   token only with `admin.metrics_public`.
//! - Handlers only send messages to the actors; the queue's own invariants (durability before a
//!   reply, no change to a message being delivered) hold for every change made here.

// The `Err` of the request helpers is the response to send, built once per refused request.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use mailroot_actors::metrics::{ListenerLabel, Metrics, StateLabel};
use mailroot_actors::queue::{
    AdminError, Bounce, Delete, Headers, Hold, List, ListFilter, Release, RetryAll, RetryNow, Show, Summary,
};
use mailroot_actors::session::StopSignal;
use mailroot_actors::sessions::OpenSessions;
use mailroot_actors::supervisor::QueueSupervisor;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use tracing::info;

use crate::api::{
    ApiError, BulkDone, BulkFailure, BulkRequest, Disconnected, Done, MessageHeaders, Reloaded, Retried, ServerState,
    Status, BULK_MAX,
};

mod console;
pub mod guard;
use crate::control::ControlHandle;

/// What the handlers work with.
pub struct AdminState {
    pub queue: Addr<QueueSupervisor>,
    /// Sends SMTP TLS reports (`POST /api/tls-report/send`).
    pub tls_reporter: Arc<crate::daemon::reports::TlsReporter>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// Always set: configured, or generated into the Mailroot (see `guard.rs`).
    pub token: String,
    /// Names the Host header may carry besides addresses and `localhost` (`admin.hosts`).
    pub hosts: Vec<String>,
    pub metrics_public: bool,
    pub started: Instant,
    pub started_unix: u64,
    pub paused: Arc<AtomicBool>,
    pub control: ControlHandle,
    /// (name, role, bound addresses) of each SMTP listener.
    pub smtp_listeners: Vec<(String, &'static str, Vec<SocketAddr>)>,
    pub hostname: String,
    /// The open SMTP sessions (`/api/sessions`).
    pub sessions: Arc<OpenSessions>,
    /// Set once the daemon is stopping (the sessions' stop signal): status says `stopping`.
    pub stopping: StopSignal,
    /// `admin.path_prefix`: also served under it.
    pub path_prefix: String,
}

type State = web::Data<AdminState>;

/// How long `/metrics` and `/api/status` wait for the queue's summary.
const SUMMARY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(ApiError { error: message.into() })
}

fn admin_error(e: AdminError) -> HttpResponse {
    match e {
        AdminError::NotFound => error(StatusCode::NOT_FOUND, e.to_string()),
        AdminError::Conflict(m) => error(StatusCode::CONFLICT, m),
        AdminError::Internal(m) => error(StatusCode::INTERNAL_SERVER_ERROR, m),
    }
}

fn unavailable(e: impl std::fmt::Display) -> HttpResponse {
    error(StatusCode::SERVICE_UNAVAILABLE, format!("the queue is not answering: {e}"))
}

macro_rules! authorized {
    ($req:expr, $state:expr) => {
        if let Err(r) = guard::check(&$req, &$state, false) {
            return r;
        }
    };
}

fn message_id(req: &HttpRequest) -> Result<u64, HttpResponse> {
    req.match_info()
        .get("id")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "no such message in the queue"))
}

fn query(req: &HttpRequest) -> Result<HashMap<String, String>, HttpResponse> {
    web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad query string: {e}")))
}

async fn metrics(req: HttpRequest, s: State) -> HttpResponse {
    if let Err(r) = guard::check(&req, &s, true) {
        return r;
    }
    // Queue length by state is computed when asked rather than kept up to date per message. A
    // queue that does not answer in time leaves the last values: a scrape must not hang.
    if let Ok(Ok(summary)) = tokio::time::timeout(SUMMARY_TIMEOUT, s.queue.send(Summary)).await {
        for (state, n) in [
            ("active", summary.active),
            ("ready", summary.ready),
            ("deferred", summary.deferred),
            ("held", summary.held),
        ] {
            s.metrics.queue_by_state.get_or_create(&StateLabel { state }).set(n as i64);
        }
    }
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &s.registry) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the metrics: {e}"));
    }
    HttpResponse::Ok().content_type("application/openmetrics-text; version=1.0.0; charset=utf-8").body(text)
}

/// `?day=today|yesterday` as "is it yesterday"; `yesterday` when not given.
fn day_param(req: &HttpRequest, yesterday: bool) -> Result<bool, HttpResponse> {
    match query(req)?.get("day").map(String::as_str) {
        None => Ok(yesterday),
        Some("today") => Ok(false),
        Some("yesterday") => Ok(true),
        Some(other) => Err(error(StatusCode::BAD_REQUEST, format!("day={other}: give today or yesterday"))),
    }
}

/// The SMTP TLS report (RFC 8460 §4) of today so far, or `?day=yesterday` (the last complete
/// UTC day), from what remote delivery counted.
async fn tls_report(req: HttpRequest, s: State) -> HttpResponse {
    authorized!(req, s);
    let yesterday = match day_param(&req, false) {
        Ok(y) => y,
        Err(r) => return r,
    };
    let now = mailroot_actors::clock::unix_now();
    HttpResponse::Ok().json(s.metrics.tls_rpt.report(&s.hostname, yesterday, now))
}

/// Queues the TLS reports of `?day=yesterday` (the default) or `today` now: `{queued: n}`.
async fn send_tls_reports(req: HttpRequest, s: State) -> HttpResponse {
    authorized!(req, s);
    let yesterday = match day_param(&req, true) {
        Ok(y) => y,
        Err(r) => return r,
    };
    match s.tls_reporter.send(yesterday).await {
        Ok(n) => HttpResponse::Ok().json(serde_json::json!({ "queued": n })),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// The last hour minute by minute: messages received, recipient deliveries by result (kept by
/// the daemon: the web console's charts need no Prometheus).
async fn history(req: HttpRequest, s: State) -> HttpResponse {
    authorized!(req, s);
    let minutes = s.metrics.history.last_hour(mailroot_actors::clock::unix_now());
    HttpResponse::Ok().json(serde_json::json!({ "minutes": minutes }))
}

async fn status(req: HttpRequest, s: State) -> HttpResponse {
    authorized!(req, s);
    let queue = match tokio::time::timeout(SUMMARY_TIMEOUT, s.queue.send(Summary)).await {
        Ok(Ok(q)) => q,
        Ok(Err(e)) => return unavailable(e),
        Err(_) => return unavailable("no answer within 5 s"),
    };
    HttpResponse::Ok().json(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        hostname: s.hostname.clone(),
        state: if s.stopping.borrow().is_some() {
            "stopping"
        } else if s.paused.load(Ordering::Relaxed) {
            "paused"
        } else {
            "running"
        }
        .into(),
        started_at: s.started_unix,
        uptime_seconds: s.started.elapsed().as_secs(),
        listeners: s
            .smtp_listeners
            .iter()
            .map(|(name, role, addrs)| crate::api::ListenerStatus {
                name: name.clone(),
                role: Cow::Borrowed(role),
                addresses: addrs.iter().map(|a| a.to_string()).collect(),
                connections: s
                    .metrics
                    .listener_connections_current
                    .get_or_create(&ListenerLabel { listener: mailroot_actors::metrics::intern(name) })
                    .get(),
            })
            .collect(),
        connections: s.metrics.connections_current.get(),
        queue,
    })
}

async fn list(req: HttpRequest, s: State) -> HttpResponse {
    authorized!(req, s);
    let q = match query(&req) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let number = |key: &str| -> Result<Option<u64>, HttpResponse> {
        match q.get(key) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| error(StatusCode::BAD_REQUEST, format!("{key} must be a number, not {v:?}"))),
        }
    };
    let (after, limit) = match (number("after"), number("limit")) {
        (Ok(a), Ok(l)) => (a, l),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let filter = ListFilter {
        state: q.get("state").filter(|s| !s.is_empty()).cloned(),
        domain: q.get("domain").filter(|s| !s.is_empty()).cloned(),
        sender: q.get("sender").filter(|s| !s.is_empty()).cloned(),
        recipient: q.get("recipient").filter(|s| !s.is_empty()).cloned(),
        after,
        limit: limit.unwrap_or(100) as usize,
    };
    match s.queue.send(List(filter)).await {
        Ok(Ok(page)) => HttpResponse::Ok().json(page),
        Ok(Err(AdminError::Conflict(m))) => error(StatusCode::BAD_REQUEST, m),
        Ok(Err(e)) => admin_error(e),
        Err(e) => unavailable(e),
    }
}

async fn show(req: HttpRequest, s: State) -> HttpResponse {
    authorized!(req, s);
    let id = match message_id(&req) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match s.queue.send(Show(id)).await {
        Ok(Ok(m)) => HttpResponse::Ok().json(m),
        Ok(Err(e)) => admin_error(e),
        Err(e) => unavailable(e),
    }
}

/// The header section of one message's body.
async fn headers(req: HttpRequest, s: State) -> HttpResponse {
    authorized!(req, s);
    let id = match message_id(&req) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match s.queue.send(Headers(id)).await {
        Ok(Ok(headers)) => HttpResponse::Ok().json(MessageHeaders { id, headers }),
        Ok(Err(e)) => admin_error(e),
        Err(e) => unavailable(e),
    }
}

/// What `queue_action` knows.
const QUEUE_ACTIONS: [&str; 5] = ["retry", "hold", "release", "bounce", "delete"];

/// One queue action on one message; `Ok` carries what the single-message endpoint answers
/// (`None`: not one of [`QUEUE_ACTIONS`]).
async fn queue_action(q: &Addr<QueueSupervisor>, id: u64, action: &str) -> Option<Result<HttpResponse, AdminError>> {
    let shown = |m| HttpResponse::Ok().json(m);
    let done = |()| HttpResponse::Ok().json(Done { id, result: action.to_string().into() });
    let sent = match action {
        "retry" => q.send(RetryNow(id)).await.map(|r| r.map(shown)),
        "hold" => q.send(Hold(id)).await.map(|r| r.map(shown)),
        "release" => q.send(Release(id)).await.map(|r| r.map(shown)),
        "bounce" => q.send(Bounce(id)).await.map(|r| r.map(done)),
        "delete" => q.send(Delete(id)).await.map(|r| r.map(done)),
        _ => return None,
    };
    Some(sent.unwrap_or_else(|e| Err(AdminError::Internal(format!("the queue is not answering: {e}")))))
}

/// The queue actions on one message, by the last path segment (or DELETE).
async fn act(req: HttpRequest, s: State) -> HttpResponse {
    authorized!(req, s);
    let id = match message_id(&req) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let action = if req.method() == actix_web::http::Method::DELETE {
        "delete"
    } else {
        req.match_info().get("action").unwrap_or("")
    };
    let who = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(client = %who, id, action, "admin API queue action");
    match queue_action(&s.queue, id, action).await {
        Some(Ok(r)) => r,
        Some(Err(e)) => admin_error(e),
        None => not_found(req).await,
    }
}

/// One action on up to [`BULK_MAX`] messages, each as the single-message endpoint does it,
/// [`BULK_AT_ONCE`] at a time: what the console's selections and "all matching" send, in pieces.
async fn bulk(req: HttpRequest, s: State, payload: web::Payload) -> HttpResponse {
    authorized!(req, s);
    // Read only once the request passed the guard, and never more than BODY_MAX.
    let body = match read_body(payload).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut r: BulkRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("expected {{\"action\": …, \"ids\": […]}}: {e}")),
    };
    if !QUEUE_ACTIONS.contains(&r.action.as_str()) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown action {:?}: one of {}", r.action, QUEUE_ACTIONS.join(", ")),
        );
    }
    if r.ids.len() > BULK_MAX {
        return error(StatusCode::BAD_REQUEST, format!("at most {BULK_MAX} messages per request, not {}", r.ids.len()));
    }
    r.ids.sort_unstable();
    r.ids.dedup();
    let who = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(client = %who, action = %r.action, messages = r.ids.len(), "admin API bulk queue action");
    let (mut done, mut failed) = (0, Vec::new());
    // A few dozen at a time: the Queue's group commit makes each batch's changes durable
    // together (one sync, not one per message), while the Queue's mailbox is never flooded.
    for batch in r.ids.chunks(BULK_AT_ONCE) {
        let results =
            futures_util::future::join_all(batch.iter().map(|&id| queue_action(&s.queue, id, &r.action))).await;
        for (&id, result) in batch.iter().zip(results) {
            match result {
                Some(Ok(_)) => done += 1,
                Some(Err(e)) => failed.push(BulkFailure { id, error: e.to_string() }),
                None => {}
            }
        }
    }
    HttpResponse::Ok().json(BulkDone { action: r.action, done, failed })
}

/// A request body of at most [`BODY_MAX`] bytes (`Err`: 413, or 400 when it breaks off).
async fn read_body(mut payload: web::Payload) -> Result<Vec<u8>, HttpResponse> {
    use futures_util::StreamExt;
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| error(StatusCode::BAD_REQUEST, format!("reading the request: {e}")))?;
        if body.len() + chunk.len() > BODY_MAX {
            return Err(error(StatusCode::PAYLOAD_TOO_LARGE, format!("request bodies are at most {BODY_MAX} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The open SMTP sessions, oldest first (`?limit=`, default and at most 1,000).
async fn sessions(req: HttpRequest, s: State) -> HttpResponse {
    authorized!(req, s);
    let q = match query(&req) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let limit = match q.get("limit").map(|v| v.parse::<usize>()) {
        None => 1000,
        Some(Ok(n)) => n.clamp(1, 1000),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "limit must be a number"),
    };
    HttpResponse::Ok().json(s.sessions.list(limit))
}

/// Closes one SMTP session (421 4.7.0 to the client; a message it was sending is not taken).
async fn disconnect(req: HttpRequest, s: State) -> HttpResponse {
    authorized!(req, s);
    let Some(id) = req.match_info().get("id").and_then(|v| v.parse().ok()) else {
        return error(StatusCode::NOT_FOUND, "no such session");
    };
    let who = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    if s.sessions.disconnect(id) {
        info!(client = %who, session = id, "admin API: session disconnected");
        HttpResponse::Ok().json(Disconnected { id })
    } else {
        error(StatusCode::NOT_FOUND, "no such session (it may have ended)")
    }
}

/// Every actor kind with its counts and handling times.
async fn actors(req: HttpRequest, s: State) -> HttpResponse {
    authorized!(req, s);
    HttpResponse::Ok().json(serde_json::json!({ "actors": s.metrics.actor_table() }))
}

async fn retry_all(req: HttpRequest, s: State) -> HttpResponse {
    authorized!(req, s);
    let q = match query(&req) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let domain = q.get("domain").filter(|d| !d.is_empty()).cloned();
    match s.queue.send(RetryAll { domain: domain.clone() }).await {
        Ok(Ok(n)) => HttpResponse::Ok().json(Retried { retried: n, domain }),
        Ok(Err(e)) => admin_error(e),
        Err(e) => unavailable(e),
    }
}

async fn server_action(req: HttpRequest, s: State) -> HttpResponse {
    authorized!(req, s);
    let who = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    match req.match_info().get("action").unwrap_or("") {
        "pause" => {
            s.paused.store(true, Ordering::Relaxed);
            info!(client = %who, "paused: new SMTP connections get 421 4.3.2");
            HttpResponse::Ok().json(ServerState { state: "paused".into() })
        }
        "resume" => {
            s.paused.store(false, Ordering::Relaxed);
            info!(client = %who, "resumed");
            HttpResponse::Ok().json(ServerState { state: "running".into() })
        }
        "reload" => {
            info!(client = %who, "reload requested through the admin API");
            match s.control.reload().await {
                Ok(changed) => HttpResponse::Ok().json(Reloaded { changed }),
                Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
            }
        }
        "stop" => {
            info!(client = %who, "stop requested through the admin API");
            if s.control.stop() {
                HttpResponse::Accepted().json(ServerState { state: "stopping".into() })
            } else {
                error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is already stopping")
            }
        }
        _ => not_found(req).await,
    }
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    error(StatusCode::NOT_FOUND, format!("no such endpoint: {} {}", req.method(), req.path()))
}

/// Messages of one bulk request acted on at once.
const BULK_AT_ONCE: usize = 32;

/// Largest request body any endpoint reads (a bulk request of 1,000 IDs is about 20 KiB).
const BODY_MAX: usize = 64 * 1024;

fn routes(cfg: &mut web::ServiceConfig) {
    console::routes(cfg);
    cfg.route("/metrics", web::get().to(metrics))
        .route("/api/status", web::get().to(status))
        .route("/api/history", web::get().to(history))
        .route("/api/queue", web::get().to(list))
        .route("/api/queue/retry-all", web::post().to(retry_all))
        .route("/api/queue/bulk", web::post().to(bulk))
        .route("/api/queue/{id}", web::get().to(show))
        .route("/api/queue/{id}/headers", web::get().to(headers))
        .route("/api/sessions", web::get().to(sessions))
        .route("/api/sessions/{id}/disconnect", web::post().to(disconnect))
        .route("/api/actors", web::get().to(actors))
        .route("/api/queue/{id}", web::delete().to(act))
        .route("/api/queue/{id}/{action}", web::post().to(act))
        .route("/api/server/{action}", web::post().to(server_action))
        .route("/api/tls-report", web::get().to(tls_report))
        .route("/api/tls-report/send", web::post().to(send_tls_reports));
}

/// Builds the server on an already bound socket; the caller spawns it and keeps its handle.
pub fn serve(socket: std::net::TcpListener, state: AdminState) -> std::io::Result<actix_web::dev::Server> {
    let addr = socket.local_addr()?;
    let prefix = state.path_prefix.clone();
    let data = web::Data::new(state);
    let server = HttpServer::new(move || {
        let app = App::new().app_data(data.clone());
        // Behind a proxy that passes `/prefix/…` on as it is; served without it too (a proxy
        // that strips it, or a local operator).
        let app = if prefix.is_empty() { app } else { app.service(web::scope(&prefix).configure(routes)) };
        app.configure(routes).default_service(web::to(not_found))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(2)
    .listen(socket)?
    .run();
    info!(admin = %addr, "admin API started");
    Ok(server)
}
