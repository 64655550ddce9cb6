//! The `mailroot` command: `run` the daemon in the foreground, `check-config`, and the tools
//! `gen-cert` (a self-signed certificate for trials) and `passwd` (a password hash for AUTH).

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
    /// Write a self-signed certificate and key (cert.pem, key.pem) for trying STARTTLS.
    GenCert {
        /// The name the certificate is for (your server.hostname).
        #[arg(long)]
        hostname: String,
        /// Folder to write cert.pem and key.pem into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Read a password from standard input and print its argon2 hash for auth.users_file.
    Passwd,
}

fn gen_cert(hostname: &str, out: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    mailroot_actors::protocol::address::validate_domain(hostname)
        .map_err(|_| format!("{hostname:?} is not a valid host name"))?;
    let cert = rcgen::generate_simple_self_signed(vec![hostname.to_string()]).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let (cert_path, key_path) = (out.join("cert.pem"), out.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    // The key is readable by its owner only.
    let mut key = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    key.write_all(cert.signing_key.serialize_pem().as_bytes()).map_err(|e| format!("{}: {e}", key_path.display()))?;
    println!("wrote {} and {}", cert_path.display(), key_path.display());
    println!("[tls]\ncert = \"{}\"\nkey = \"{}\"", cert_path.display(), key_path.display());
    Ok(())
}

fn passwd() -> Result<(), String> {
    if std::io::stdin().is_terminal() {
        eprint!("Password (echoed): ");
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| format!("reading the password: {e}"))?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err("empty password".into());
    }
    println!("{}", mailroot_actors::auth::hash_password(password)?);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::GenCert { hostname, out } => match gen_cert(&hostname, &out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mailroot gen-cert: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Passwd => match passwd() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mailroot passwd: {e}");
                ExitCode::FAILURE
            }
        },
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
