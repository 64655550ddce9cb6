//! The admin commands of the `mailroot` binary: `queue …` and `ctl …` over the admin API (tables
//! for people, `--json` for scripts), and `sendmail` into Pickup.
//!
//! Exit codes: 0 done, 1 the API refused (the message says why; 404 for an unknown ID), 2 the
//! configuration is invalid, 3 the API cannot be reached; sendmail uses sysexits.h codes.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use mailroot::actors::queue::humanize;
use mailroot::actors::store::RcptStatus;
use mailroot::api::{Done, ListPage, MessageInfo, Reloaded, Retried, ServerState, Status};
use mailroot::client::{AdminClient, Response};
use mailroot::config::Config;
use mailroot::sendmail::{self, Mode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{ApiArgs, CtlAction, QueueAction};

fn client(api: &ApiArgs) -> Result<AdminClient, ExitCode> {
    let config = Config::load(api.config.as_deref()).map(|l| l.config).map_err(|e| {
        eprintln!("mailroot: invalid configuration: {e}");
        ExitCode::from(2)
    })?;
    let address = api.admin.clone().unwrap_or(config.admin.listen.clone());
    if address.is_empty() {
        eprintln!("mailroot: the admin API is off (admin.listen is empty); give --admin ADDRESS");
        return Err(ExitCode::from(2));
    }
    Ok(AdminClient {
        address,
        token: mailroot::admin::guard::client_token(&config, api.token.as_deref()),
        timeout: Duration::from_secs(60),
    })
}

/// Sends the request; prints errors; `Ok` only for a 2xx answer, read into the same type the
/// API wrote (`crate::api`).
fn call<T: DeserializeOwned>(c: &AdminClient, method: &str, path: &str) -> Result<T, ExitCode> {
    let r: Response = c.request(method, path).map_err(|e| {
        eprintln!("mailroot: {e}");
        ExitCode::from(3)
    })?;
    if !(200..300).contains(&r.status) {
        eprintln!("mailroot: {} (HTTP {})", r.error_text(), r.status);
        return Err(ExitCode::FAILURE);
    }
    serde_json::from_str(&r.body).map_err(|e| {
        eprintln!("mailroot: the admin API's answer is not what this version expects: {e}");
        ExitCode::FAILURE
    })
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn size(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n}"),
        n if n < 1024 * 1024 => format!("{:.1}K", n as f64 / 1024.0),
        n => format!("{:.1}M", n as f64 / 1024.0 / 1024.0),
    }
}

fn next_attempt(m: &MessageInfo) -> String {
    let Some(next) = m.next_attempt else { return "-".into() };
    let now = m.received_at + m.age_seconds;
    if next <= now {
        "now".into()
    } else {
        format!("in {}", humanize(next - now))
    }
}

fn print_message(m: &MessageInfo, out: &mut String) {
    let sender = if m.sender.is_empty() { "<>" } else { &m.sender };
    out.push_str(&format!(
        "{:<8} {:<9} {:>7} {:>7} {:>5}  {:<10} {}\n",
        m.id,
        m.state,
        humanize(m.age_seconds),
        size(m.size),
        m.attempts,
        next_attempt(m),
        sender
    ));
    for r in &m.recipients {
        let status = match r.status {
            RcptStatus::Pending => "pending",
            RcptStatus::Delivered => "delivered",
            RcptStatus::Failed => "failed",
        };
        let last = r.last.as_ref().map(|o| o.to_string()).unwrap_or_default();
        out.push_str(&format!("         {status:<9} {}  {last}\n", r.address));
    }
}

const HEADER: &str = "ID       STATE         AGE    SIZE TRIES  NEXT       SENDER / recipients\n";

/// Prints the answer: as JSON with `--json` (the API's own fields), else as `table` says.
fn finish<T: Serialize>(api: &ApiArgs, v: &T, table: impl FnOnce(&T) -> String) -> ExitCode {
    if api.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        print!("{}", table(v));
    }
    ExitCode::SUCCESS
}

/// `queue export` / `queue import`: runs `work` on the configuration's store, and says how many
/// messages went to or came from `file`.
pub fn queue_file(
    config: Option<&std::path::Path>,
    work: impl FnOnce(&mailroot::config::Config) -> Result<usize, String>,
    what: &str,
    file: &std::path::Path,
) -> ExitCode {
    let loaded = match mailroot::config::Config::load(config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mailroot: {e}");
            return ExitCode::from(2);
        }
    };
    match work(&loaded.config) {
        Ok(n) => {
            println!("{n} messages {what} {} ({} store)", file.display(), loaded.config.queue.store);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mailroot: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn queue(action: QueueAction, api: &ApiArgs) -> ExitCode {
    // These two work on the store itself, not through the API.
    let action = match action {
        QueueAction::Export { config, out } => {
            return queue_file(config.as_deref(), |c| mailroot::queue_io::export(c, &out), "exported to", &out)
        }
        QueueAction::Import { config, input } => {
            return queue_file(config.as_deref(), |c| mailroot::queue_io::import(c, &input), "imported from", &input)
        }
        other => other,
    };
    let c = match client(api) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match action {
        QueueAction::List { state, domain, limit, after } => {
            let filtered = state.is_some() || domain.is_some() || after.is_some();
            let mut path = format!("/api/queue?limit={limit}");
            if let Some(s) = state {
                path.push_str(&format!("&state={}", encode(&s)));
            }
            if let Some(d) = domain {
                path.push_str(&format!("&domain={}", encode(&d)));
            }
            if let Some(a) = after {
                path.push_str(&format!("&after={a}"));
            }
            call::<ListPage>(&c, "GET", &path).map(|page| {
                finish(api, &page, |page| {
                    if page.messages.is_empty() {
                        let empty = if filtered { "No queued message matches.\n" } else { "The queue is empty.\n" };
                        return empty.into();
                    }
                    let mut out = HEADER.to_string();
                    for m in &page.messages {
                        print_message(m, &mut out);
                    }
                    out.push_str(&format!("{} message(s)", page.messages.len()));
                    if let Some(next) = page.next_after {
                        out.push_str(&format!("; more with --after {next}"));
                    }
                    out.push('\n');
                    out
                })
            })
        }
        QueueAction::Show { id } => call::<MessageInfo>(&c, "GET", &format!("/api/queue/{id}")).map(|m| {
            finish(api, &m, |m| {
                let mut out = HEADER.to_string();
                print_message(m, &mut out);
                out.push_str(&format!("source: {} ({})\n", m.source, m.origin));
                out
            })
        }),
        QueueAction::Retry { id: _, all: true, domain } => {
            let path = match &domain {
                Some(d) => format!("/api/queue/retry-all?domain={}", encode(d)),
                None => "/api/queue/retry-all".into(),
            };
            call::<Retried>(&c, "POST", &path)
                .map(|r| finish(api, &r, |r| format!("{} message(s) will be tried now\n", r.retried)))
        }
        QueueAction::Retry { id: Some(id), all: false, .. } => changed(&c, api, "retry", id),
        QueueAction::Retry { id: None, all: false, .. } => {
            eprintln!("mailroot: give a message ID or --all");
            return ExitCode::from(2);
        }
        QueueAction::Hold { id } => changed(&c, api, "hold", id),
        QueueAction::Release { id } => changed(&c, api, "release", id),
        QueueAction::Export { .. } | QueueAction::Import { .. } => {
            eprintln!("mailroot: queue export and import do not go through the admin API");
            return ExitCode::FAILURE;
        }
        QueueAction::Bounce { id } => call::<Done>(&c, "POST", &format!("/api/queue/{id}/bounce"))
            .map(|d| finish(api, &d, |_| format!("message {id}: bounce done\n"))),
        QueueAction::Delete { id } => call::<Done>(&c, "DELETE", &format!("/api/queue/{id}"))
            .map(|d| finish(api, &d, |_| format!("message {id} deleted\n"))),
    };
    result.unwrap_or_else(|code| code)
}

/// Retry, hold and release answer with the message as it is now.
fn changed(c: &AdminClient, api: &ApiArgs, action: &str, id: u64) -> Result<ExitCode, ExitCode> {
    call::<MessageInfo>(c, "POST", &format!("/api/queue/{id}/{action}"))
        .map(|m| finish(api, &m, |m| format!("message {id}: {action} done; now {}\n", m.state)))
}

pub fn ctl(action: CtlAction, api: &ApiArgs) -> ExitCode {
    let c = match client(api) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match action {
        CtlAction::Status => call::<Status>(&c, "GET", "/api/status").map(|v| {
            finish(api, &v, |v| {
                let q = &v.queue;
                format!(
                    "mailroot {} on {}: {}, up {}\nlisteners: {}\nconnections: {}\nqueue: {} messages ({} active, {} ready, {} deferred, {} held)\n",
                    v.version,
                    v.hostname,
                    v.state,
                    humanize(v.uptime_seconds),
                    v.listeners
                        .iter()
                        .map(|l| format!("{} ({}) {} [{} open]", l.name, l.role, l.addresses.join(" "), l.connections))
                        .collect::<Vec<_>>()
                        .join(", "),
                    v.connections,
                    q.total,
                    q.active,
                    q.ready,
                    q.deferred,
                    q.held
                ) + &q.store_error.as_ref().map(|e| format!("QUEUE STORE FAILING: {e}\n")).unwrap_or_default()
            })
        }),
        CtlAction::Reload => call::<Reloaded>(&c, "POST", "/api/server/reload").map(|r| {
            finish(api, &r, |r| match r.changed.as_slice() {
                [] => "reloaded: nothing changed\n".into(),
                changed => format!("reloaded: {}\n", changed.join(", ")),
            })
        }),
        CtlAction::Pause | CtlAction::Resume | CtlAction::Stop => {
            let path = match action {
                CtlAction::Pause => "/api/server/pause",
                CtlAction::Resume => "/api/server/resume",
                _ => "/api/server/stop",
            };
            call::<ServerState>(&c, "POST", path).map(|s| finish(api, &s, |s| format!("{}\n", s.state)))
        }
    };
    result.unwrap_or_else(|code| code)
}

pub fn sendmail(config: Option<&Path>, args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: mailroot sendmail [-t] [-i] [-f sender] [-F name] [--config FILE] [recipient ...] < message\n\
             \x20      mailroot sendmail -bs | -bp | -q | -bi | -bv recipient ...   (see docs/operations.md)"
        );
        return ExitCode::SUCCESS;
    }
    let parsed = match sendmail::parse_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mailroot sendmail: {e}");
            return ExitCode::from(sendmail::EX_USAGE);
        }
    };
    // Listing and flushing go through the admin API, as `mailroot queue` does.
    let api = ApiArgs { config: config.map(Path::to_path_buf), admin: None, token: None, json: false };
    match parsed.mode {
        Mode::ListQueue => {
            return queue(QueueAction::List { state: None, domain: None, limit: 1000, after: None }, &api)
        }
        Mode::Flush => return queue(QueueAction::Retry { id: None, all: true, domain: None }, &api),
        // mailroot has no aliases database (recipient maps come with the configuration).
        Mode::NoAliases => return ExitCode::SUCCESS,
        Mode::Deliver | Mode::Smtp | Mode::Verify => {}
    }
    let config = match Config::load(config) {
        Ok(l) => l.config,
        Err(e) => {
            eprintln!("mailroot sendmail: invalid configuration: {e}");
            return ExitCode::from(sendmail::EX_USAGE);
        }
    };
    if parsed.mode == Mode::Smtp {
        return match sendmail::smtp_session(&config, std::io::stdin().lock(), std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mailroot sendmail -bs: {e}");
                ExitCode::from(sendmail::EX_IOERR)
            }
        };
    }
    if parsed.mode == Mode::Verify {
        let (lines, ok) = sendmail::verify(&config, &parsed.recipients);
        print!("{lines}");
        return if ok { ExitCode::SUCCESS } else { ExitCode::from(sendmail::EX_DATAERR) };
    }
    if std::io::stdin().is_terminal() {
        eprintln!("Enter the message; end with a line holding a single dot, or Ctrl-D.");
    }
    let limit = config.limits.max_message_size as usize;
    let message = match sendmail::read_message(&mut std::io::stdin().lock(), parsed.ignore_dots, limit) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("mailroot sendmail: {e}");
            return ExitCode::from(sendmail::EX_DATAERR);
        }
    };
    let login = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "root".into());
    let login: String = login.chars().filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c)).collect();
    match sendmail::submit(&config, &parsed, &message, if login.is_empty() { "root" } else { &login }) {
        Ok(_) => ExitCode::SUCCESS,
        Err((code, e)) => {
            eprintln!("mailroot sendmail: {e}");
            ExitCode::from(code)
        }
    }
}
