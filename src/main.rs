//! The `mailroot` command: `run` the daemon in the foreground, or `check-config`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mailroot::config::Config;
use mailroot::daemon::{self, StartOptions};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "mailroot", version, about = "An actor-model mail transfer agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run mailroot in the foreground until SIGTERM or SIGINT.
    Run {
        /// Configuration file (default: config/mailroot.toml if present, else built-in defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and print the effective settings.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(loaded) => {
                match &loaded.source {
                    Some(p) => println!("# effective configuration, from {}", p.display()),
                    None => println!("# effective configuration: built-in defaults"),
                }
                print!("{}", loaded.config.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mailroot: invalid configuration: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .init();
            let loaded = match Config::load(config.as_deref()) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("mailroot: invalid configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            match &loaded.source {
                Some(p) => tracing::info!(config = %p.display(), "configuration loaded"),
                None => tracing::info!("no configuration file; using built-in defaults"),
            }
            match daemon::start(loaded.config, StartOptions { handle_signals: true }) {
                Ok(running) => {
                    running.wait();
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mailroot: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
