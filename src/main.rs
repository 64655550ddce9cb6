//! The `mailroot` command: `run` the daemon in the foreground, `check-config`, the admin CLI on
//! the admin API (`queue …`, `ctl …`), `sendmail` (into Pickup), and the tools `gen-cert` (a
//! self-signed certificate for trials) and `passwd` (a password hash for AUTH).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mailroot::config::Config;
use mailroot::daemon::{self, StartOptions};
use tracing_subscriber::EnvFilter;

mod cli;

#[derive(Parser)]
#[command(name = "mailroot", version, about = "An actor-model mail transfer agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run mailroot in the foreground until SIGTERM or SIGINT; SIGHUP reloads the configuration.
    Run {
        /// Configuration file (default: config/mailroot.toml if present, else built-in defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// `text` for people, `json` (one object per line) for log shippers.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Inspect and manage the queue through the admin API.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Status, pause, resume, reload or stop the running daemon through the admin API.
    Ctl {
        #[command(subcommand)]
        action: CtlAction,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// sendmail-compatible: read a message on standard input and put it into Pickup
    /// (`-t`, `-f sender`, `-i`; works while the daemon is down).
    #[command(disable_help_flag = true)]
    Sendmail {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
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
    /// DKIM keys: `mailroot dkim keygen --domain D --selector S [--algorithm ed25519|rsa] --out DIR`.
    Dkim {
        #[command(subcommand)]
        action: DkimAction,
    },
    /// Print the DNS records to publish (MX, SPF, DKIM, DMARC, MTA-STS, TLS-RPT), zone-file syntax.
    DnsRecords {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only this domain (default: every local and signing domain).
        #[arg(long)]
        domain: Option<String>,
    },
}

#[derive(Subcommand)]
enum DkimAction {
    /// Write a new private key (0600) and print the TXT record to publish and the config lines.
    Keygen {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
        /// ed25519 (RFC 8463, small) or rsa (2048 bits, which every receiver checks).
        #[arg(long, default_value = "rsa", value_parser = ["ed25519", "rsa"])]
        algorithm: String,
        /// Folder for the key file `<domain>.<selector>.key` (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct ApiArgs {
    /// Configuration file, for [admin] listen and token.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Admin API address (default: admin.listen from the configuration).
    #[arg(long, global = true)]
    admin: Option<String>,
    /// Bearer token (default: admin.token from the configuration).
    #[arg(long, global = true)]
    token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum QueueAction {
    /// List queued messages.
    List {
        /// active, ready, deferred or held.
        #[arg(long)]
        state: Option<String>,
        /// Messages with a pending recipient in this domain.
        #[arg(long)]
        domain: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Start after this message ID (paging).
        #[arg(long)]
        after: Option<u64>,
    },
    /// Show one message and its recipients.
    Show { id: u64 },
    /// Try the message now (or every deferred message with --all).
    Retry {
        id: Option<u64>,
        #[arg(long)]
        all: bool,
        /// With --all: only messages with a pending recipient in this domain.
        #[arg(long)]
        domain: Option<String>,
    },
    /// Keep the message from being delivered until released.
    Hold { id: u64 },
    /// Put a held message back on its retry schedule.
    Release { id: u64 },
    /// Fail the pending recipients now and send the non-delivery report.
    Bounce { id: u64 },
    /// Remove the message without notifying anyone.
    Delete { id: u64 },
    /// Write every queued message to a file (the daemon stopped), to move the queue to another
    /// store or machine with `import`.
    Export {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The file to write (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Add the messages of an `export` file to the configured store (under new IDs).
    Import {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The file `export` wrote.
        #[arg(long = "in")]
        input: PathBuf,
    },
}

#[derive(Subcommand)]
enum CtlAction {
    /// Version, state, listeners, connections and the queue by state.
    Status,
    /// New SMTP clients get 421 4.3.2; open sessions finish; delivery goes on.
    Pause,
    /// Accept new connections again.
    Resume,
    /// Read the configuration file again (as SIGHUP).
    Reload,
    /// Stop in order (as SIGTERM).
    Stop,
}

fn gen_cert(hostname: &str, out: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    mailroot_actors::protocol::address::validate_domain(hostname)
        .map_err(|_| format!("{hostname:?} is not a valid host name"))?;
    // The host name as the subject's CN and its only SAN; valid from yesterday (clocks differ)
    // for 825 days, the longest validity clients accept for a server certificate.
    let mut params = rcgen::CertificateParams::new(vec![hostname.to_string()]).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, hostname);
    let now = mailroot_actors::clock::unix_now();
    let day = |secs: u64| {
        let (y, m, d) = mailroot_actors::protocol::received::civil_date(secs);
        rcgen::date_time_ymd(y as i32, m as u8, d as u8)
    };
    params.not_before = day(now.saturating_sub(86_400));
    params.not_after = day(now + 825 * 86_400);
    let key_pair = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key_pair).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    // Absolute paths: config paths are relative to the config file, wherever this is pasted.
    let out = std::fs::canonicalize(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let (cert_path, key_path) = (out.join("cert.pem"), out.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    // The key is readable by its owner only.
    let mut key = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    key.write_all(key_pair.serialize_pem().as_bytes()).map_err(|e| format!("{}: {e}", key_path.display()))?;
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

/// Where `sendmail` (mailroot invoked under that name) finds its configuration.
const SENDMAIL_CONFIG: &str = "/etc/mailroot/mailroot.toml";

fn main() -> ExitCode {
    // Installed as /usr/sbin/sendmail (a symlink): act as `mailroot sendmail`, with the
    // configuration from $MAILROOT_CONFIG or /etc/mailroot/mailroot.toml.
    // Also as `mailq` (= sendmail -bp) and `newaliases` (= sendmail -bi), as Postfix installs them.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let called = std::path::Path::new(&argv0).file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    if let Some(mode) = match called.as_str() {
        "sendmail" => Some(None),
        "mailq" => Some(Some("-bp")),
        "newaliases" => Some(Some("-bi")),
        _ => None,
    } {
        let config = std::env::var_os("MAILROOT_CONFIG")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from(SENDMAIL_CONFIG)).filter(|p| p.exists()));
        let args: Vec<String> = mode.map(String::from).into_iter().chain(std::env::args().skip(1)).collect();
        return cli::sendmail(config.as_deref(), &args);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::GenCert { hostname, out } => match gen_cert(&hostname, &out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mailroot gen-cert: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Dkim { action: DkimAction::Keygen { domain, selector, algorithm, out } } => {
            match mailroot::publish::keygen(&domain, &selector, &algorithm, &out) {
                Ok((path, record)) => {
                    println!("wrote {}", path.display());
                    println!("\n; publish in DNS:");
                    println!("{selector}._domainkey.{domain}.\t3600\tIN\tTXT\t{}", mailroot::publish::txt(&record));
                    println!("\n# and in the configuration:");
                    println!("[dkim.\"{domain}\"]\nselector = \"{selector}\"\nkey = \"{}\"", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mailroot dkim keygen: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::DnsRecords { config, domain } => {
            match Config::load(config.as_deref())
                .map_err(|e| e.to_string())
                .and_then(|l| mailroot::publish::dns_records(&l.config, domain.as_deref()))
            {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mailroot dns-records: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Passwd => match passwd() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mailroot passwd: {e}");
                ExitCode::FAILURE
            }
        },
        // Every file the configuration names is opened and parsed too (certificate, key, users),
        // so what passes here also starts.
        Command::CheckConfig { config } => match Config::load(config.as_deref()).and_then(|loaded| {
            mailroot::config::Security::load(&loaded.config)?;
            loaded.config.listen_addrs()?;
            loaded.config.admin_addr()?;
            loaded.config.remote_settings()?;
            Ok(loaded)
        }) {
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
        Command::Queue { action, api } => cli::queue(action, &api),
        Command::Ctl { action, api } => cli::ctl(action, &api),
        Command::Sendmail { config, args } => cli::sendmail(config.as_deref(), &args),
        Command::Run { config, log_format } => {
            let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
            // A log line that cannot be written (stderr is a pipe that closed: `| head`, a
            // journald restart) is dropped; by default tracing-subscriber reports it with
            // `eprintln!`, which panics on that same closed pipe and takes the daemon down.
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .log_internal_errors(false);
            if log_format == "json" {
                builder.json().with_current_span(false).init();
            } else {
                builder.with_ansi(std::io::stderr().is_terminal()).init();
            }
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
            let options = StartOptions { handle_signals: true, config_path: loaded.source.clone() };
            match daemon::start(loaded.config, options) {
                Ok(running) => {
                    if running.wait() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("mailroot: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
