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
use mailroot::client::{AdminClient, Response};
use mailroot::config::Config;
use mailroot::sendmail;
use serde_json::Value;

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
        token: api.token.clone().unwrap_or(config.admin.token),
        timeout: Duration::from_secs(60),
    })
}

/// Sends the request; prints errors; `Ok` only for a 2xx answer.
fn call(c: &AdminClient, method: &str, path: &str) -> Result<Value, ExitCode> {
    let r: Response = c.request(method, path).map_err(|e| {
        eprintln!("mailroot: {e}");
        ExitCode::from(3)
    })?;
    if !(200..300).contains(&r.status) {
        eprintln!("mailroot: {} (HTTP {})", r.error_text(), r.status);
        return Err(ExitCode::FAILURE);
    }
    serde_json::from_str(&r.body).map_err(|e| {
        eprintln!("mailroot: the admin API sent something that is not JSON: {e}");
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

fn next_attempt(m: &Value) -> String {
    let (Some(next), Some(received), Some(age_s)) =
        (m["next_attempt"].as_u64(), m["received_at"].as_u64(), m["age_seconds"].as_u64())
    else {
        return "-".into();
    };
    let now = received + age_s;
    if next <= now {
        "now".into()
    } else {
        format!("in {}", humanize(next - now))
    }
}

fn print_message(m: &Value, out: &mut String) {
    let sender = m["sender"].as_str().filter(|s| !s.is_empty()).unwrap_or("<>");
    // serde_json's Display ignores widths: numbers go through u64.
    out.push_str(&format!(
        "{:<8} {:<9} {:>7} {:>7} {:>5}  {:<10} {}\n",
        m["id"].as_u64().unwrap_or(0),
        m["state"].as_str().unwrap_or("?"),
        humanize(m["age_seconds"].as_u64().unwrap_or(0)),
        size(m["size"].as_u64().unwrap_or(0)),
        m["attempts"].as_u64().unwrap_or(0),
        next_attempt(m),
        sender
    ));
    for r in m["recipients"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "         {:<9} {}  {}\n",
            r["status"].as_str().unwrap_or("?"),
            r["address"].as_str().unwrap_or("?"),
            r["last_reply"].as_str().unwrap_or("")
        ));
    }
}

const HEADER: &str = "ID       STATE         AGE    SIZE TRIES  NEXT       SENDER / recipients\n";

fn finish(api: &ApiArgs, v: &Value, table: impl FnOnce(&Value) -> String) -> ExitCode {
    if api.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        print!("{}", table(v));
    }
    ExitCode::SUCCESS
}

pub fn queue(action: QueueAction, api: &ApiArgs) -> ExitCode {
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
            call(&c, "GET", &path).map(|v| {
                finish(api, &v, |v| {
                    let messages = v["messages"].as_array().cloned().unwrap_or_default();
                    if messages.is_empty() {
                        let empty = if filtered { "No queued message matches.\n" } else { "The queue is empty.\n" };
                        return empty.into();
                    }
                    let mut out = HEADER.to_string();
                    for m in &messages {
                        print_message(m, &mut out);
                    }
                    out.push_str(&format!("{} message(s)", messages.len()));
                    if let Some(next) = v["next_after"].as_u64() {
                        out.push_str(&format!("; more with --after {next}"));
                    }
                    out.push('\n');
                    out
                })
            })
        }
        QueueAction::Show { id } => call(&c, "GET", &format!("/api/queue/{id}")).map(|v| {
            finish(api, &v, |m| {
                let mut out = HEADER.to_string();
                print_message(m, &mut out);
                out.push_str(&format!(
                    "source: {} ({})\n",
                    m["source"].as_str().unwrap_or(""),
                    m["origin"].as_str().unwrap_or("")
                ));
                out
            })
        }),
        QueueAction::Retry { id: _, all: true, domain } => {
            let path = match &domain {
                Some(d) => format!("/api/queue/retry-all?domain={}", encode(d)),
                None => "/api/queue/retry-all".into(),
            };
            call(&c, "POST", &path)
                .map(|v| finish(api, &v, |v| format!("{} message(s) will be tried now\n", v["retried"])))
        }
        QueueAction::Retry { id: Some(id), all: false, .. } => action_on(&c, api, "retry", id),
        QueueAction::Retry { id: None, all: false, .. } => {
            eprintln!("mailroot: give a message ID or --all");
            return ExitCode::from(2);
        }
        QueueAction::Hold { id } => action_on(&c, api, "hold", id),
        QueueAction::Release { id } => action_on(&c, api, "release", id),
        QueueAction::Bounce { id } => action_on(&c, api, "bounce", id),
        QueueAction::Delete { id } => call(&c, "DELETE", &format!("/api/queue/{id}"))
            .map(|v| finish(api, &v, |_| format!("message {id} deleted\n"))),
    };
    result.unwrap_or_else(|code| code)
}

fn action_on(c: &AdminClient, api: &ApiArgs, action: &str, id: u64) -> Result<ExitCode, ExitCode> {
    call(c, "POST", &format!("/api/queue/{id}/{action}")).map(|v| {
        finish(api, &v, |v| match v["state"].as_str() {
            Some(state) => format!("message {id}: {action} done; now {state}\n"),
            None => format!("message {id}: {action} done\n"),
        })
    })
}

pub fn ctl(action: CtlAction, api: &ApiArgs) -> ExitCode {
    let c = match client(api) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (method, path) = match action {
        CtlAction::Status => ("GET", "/api/status"),
        CtlAction::Pause => ("POST", "/api/server/pause"),
        CtlAction::Resume => ("POST", "/api/server/resume"),
        CtlAction::Reload => ("POST", "/api/server/reload"),
        CtlAction::Stop => ("POST", "/api/server/stop"),
    };
    let result = call(&c, method, path).map(|v| {
        finish(api, &v, |v| {
            if path != "/api/status" {
                return match v["changed"].as_array() {
                    Some(ch) if ch.is_empty() => "reloaded: nothing changed\n".into(),
                    Some(ch) => format!(
                        "reloaded: {}\n",
                        ch.iter().filter_map(|c| c.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                    None => format!("{}\n", v["state"].as_str().unwrap_or("done")),
                };
            }
            let q = &v["queue"];
            format!(
                "mailroot {} on {}: {}, up {}\nlisteners: {}\nconnections: {}\nqueue: {} messages ({} active, {} ready, {} deferred, {} held)\n",
                v["version"].as_str().unwrap_or("?"),
                v["hostname"].as_str().unwrap_or("?"),
                v["state"].as_str().unwrap_or("?"),
                humanize(v["uptime_seconds"].as_u64().unwrap_or(0)),
                v["listeners"].as_array().map(|l| l.iter().filter_map(|a| a.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
                v["connections"],
                q["total"],
                q["active"],
                q["ready"],
                q["deferred"],
                q["held"]
            )
        })
    });
    result.unwrap_or_else(|code| code)
}

pub fn sendmail(config: Option<&Path>, args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: mailroot sendmail [-t] [-i] [-f sender] [--config FILE] [recipient ...] < message");
        return ExitCode::SUCCESS;
    }
    let parsed = match sendmail::parse_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mailroot sendmail: {e}");
            return ExitCode::from(sendmail::EX_USAGE);
        }
    };
    let config = match Config::load(config) {
        Ok(l) => l.config,
        Err(e) => {
            eprintln!("mailroot sendmail: invalid configuration: {e}");
            return ExitCode::from(sendmail::EX_USAGE);
        }
    };
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
