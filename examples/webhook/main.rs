//! `cargo run --example webhook -- --url http://127.0.0.1:8080/mail [--config FILE]`: mailroot
//! with a custom delivery actor that POSTs each message to a webhook. Route domains to it in the
//! configuration, e.g. `[routes] "hooks.example.com" = "webhook"`. docs/extending.md walks
//! through it.

mod actor;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use actor::{Endpoint, Webhook};
use mailroot::config::Config;
use mailroot::daemon::{Daemon, StartOptions};

fn main() -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mut url = None;
    let mut config_path: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--url" => url = args.next(),
            "--config" => config_path = args.next().map(PathBuf::from),
            other => {
                eprintln!("unknown argument {other}; usage: webhook --url http://host:port/path [--config FILE]");
                return ExitCode::from(2);
            }
        }
    }
    let endpoint = match Endpoint::parse(url.as_deref().unwrap_or("http://127.0.0.1:8080/mail")) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("webhook: {e}");
            return ExitCode::from(2);
        }
    };
    let loaded = match Config::load(config_path.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("webhook: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let options = StartOptions { handle_signals: true, config_path: loaded.source.clone() };
    let started = Daemon::builder()
        .config(loaded.config)
        .options(options)
        // Called again for a fresh actor whenever the supervisor restarts it.
        .route_actor("webhook", move || Webhook::new(endpoint.clone(), Duration::from_secs(30)))
        .start();
    match started {
        Ok(running) => {
            if running.wait() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("webhook: {e}");
            ExitCode::FAILURE
        }
    }
}
