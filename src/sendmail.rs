//! `mailroot sendmail`: the sendmail-compatible entry point that cron, PHP's `mail()` and
//! friends call. It reads a message on standard input and writes it into the Pickup folder
//! atomically, so it works whether the daemon runs or not; the daemon queues it when it sees it.
//!
//! Invariants:
//! - The file appears in Pickup complete or not at all (temporary name starting with `.`, which
//!   Pickup ignores, `fsync`, rename, `fsync` of the folder).
//! - The file is checked with the same parser Pickup uses before it is written, so a message
//!   Pickup would refuse is refused here, with the reason, instead of landing in Badmail.

use std::io::{BufRead, Read};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use mailroot_actors::fsio::{sync_dir, write_and_rename};
use mailroot_actors::protocol::address::parse_mailbox;
use mailroot_actors::protocol::pickup::parse_pickup;
use mailroot_actors::protocol::received::rfc5322_date;

use crate::config::Config;

/// sysexits.h codes, which sendmail callers understand.
pub const EX_USAGE: u8 = 64;
pub const EX_DATAERR: u8 = 65;
pub const EX_CANTCREAT: u8 = 73;
pub const EX_IOERR: u8 = 74;

/// What the command is asked to do (`-b…`, `-q`, or the name it was called by).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Read a message on standard input and queue it (`-bm`, the default).
    #[default]
    Deliver,
    /// SMTP on standard input and output (`-bs`), each message into Pickup.
    Smtp,
    /// List the queue (`-bp`, or called as `mailq`).
    ListQueue,
    /// Retry the deferred messages now (`-q`).
    Flush,
    /// Rebuild the aliases database (`-bi`, or called as `newaliases`): mailroot has none.
    NoAliases,
    /// Check the recipients' addresses and say where they would go (`-bv`); nothing is sent.
    Verify,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    pub mode: Mode,
    /// `-t`: recipients from To:, Cc: and Bcc: too (Bcc: is removed).
    pub from_headers: bool,
    /// `-F`: the sender's full name, for the From: header mailroot adds when there is none.
    pub full_name: Option<String>,
    /// `-N`: DSN NOTIFY for every recipient (`never`, or `success`, `delay`, `failure`).
    pub notify: Option<mailroot_actors::protocol::dsn::Notify>,
    /// `-R`: DSN RET (`full` or `hdrs`).
    pub ret: Option<mailroot_actors::protocol::dsn::Ret>,
    /// `-V`: DSN ENVID, as given (xtext-encoded in the file).
    pub envid: Option<String>,
    /// `-f`: the envelope sender; `<>` or empty for the null sender.
    pub sender: Option<String>,
    /// `-i` / `-oi`: a line with a single dot does not end the message.
    pub ignore_dots: bool,
    pub recipients: Vec<String>,
}

/// Parses sendmail's arguments, as Postfix's sendmail reads them. Options that do not apply
/// here (`-o…` except `-oi`, `-B…`, `-v`, `-e…`, `-N`, `-R`, `-V`: see docs/operations.md)
/// are accepted and ignored, as other MTAs' sendmail commands do.
pub fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut a = Args::default();
    let mut i = 0;
    let mut only_recipients = false;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if only_recipients || !arg.starts_with('-') || arg == "-" {
            a.recipients.push(arg.clone());
            continue;
        }
        match arg.as_str() {
            "--" => only_recipients = true,
            "-t" => a.from_headers = true,
            "-i" | "-oi" => a.ignore_dots = true,
            "-f" | "-r" => {
                let v = args.get(i).ok_or(format!("{arg} needs a sender address"))?;
                a.sender = Some(v.clone());
                i += 1;
            }
            "-F" => {
                let v = args.get(i).ok_or("-F needs a full name")?;
                a.full_name = Some(v.clone());
                i += 1;
            }
            "-N" | "-R" | "-V" => {
                let v = args.get(i).ok_or(format!("{arg} needs a value"))?;
                dsn_option(&mut a, &arg[1..2], v)?;
                i += 1;
            }
            "-B" | "-O" | "-o" => i += 1,
            "-bm" => a.mode = Mode::Deliver,
            "-bs" => a.mode = Mode::Smtp,
            "-bp" => a.mode = Mode::ListQueue,
            "-bi" => a.mode = Mode::NoAliases,
            "-bv" => a.mode = Mode::Verify,
            "-q" => a.mode = Mode::Flush,
            s if s.starts_with("-b") => return Err(format!("{s}: mode not supported (-bm, -bs, -bp, -bi, -bv are)")),
            s if s.starts_with("-q") => {
                return Err(format!("{s}: only -q (retry every deferred message now) is supported"))
            }
            s if s.starts_with("-f") || s.starts_with("-r") => a.sender = Some(s[2..].to_string()),
            s if s.starts_with("-F") => a.full_name = Some(s[2..].to_string()),
            s if s.starts_with("-N") || s.starts_with("-R") || s.starts_with("-V") => {
                dsn_option(&mut a, &s[1..2], &s[2..])?
            }
            s if ["-o", "-B", "-O", "-v", "-e"].iter().any(|p| s.starts_with(p)) => {}
            s => return Err(format!("unknown option {s}")),
        }
    }
    Ok(a)
}

/// `-N`, `-R`, `-V` (as Postfix's sendmail reads them).
fn dsn_option(a: &mut Args, which: &str, v: &str) -> Result<(), String> {
    use mailroot_actors::protocol::dsn::{Notify, Ret};
    match which {
        "N" => a.notify = Some(Notify::parse(v).ok_or(format!("-N {v}: never, or success, delay, failure"))?),
        "R" => {
            a.ret = Some(match v.to_ascii_lowercase().as_str() {
                "full" => Ret::Full,
                "hdrs" => Ret::Hdrs,
                _ => return Err(format!("-R {v}: full or hdrs")),
            })
        }
        _ => {
            if v.is_empty() || v.len() > 100 || !v.chars().all(|c| c.is_ascii_graphic()) {
                return Err(format!("-V {v:?}: up to 100 printable characters"));
            }
            a.envid = Some(v.to_string());
        }
    }
    Ok(())
}

/// Reads the message: to the end of input, or (without `-i`) to a line holding a single dot.
/// At most `limit` bytes.
pub fn read_message<R: BufRead>(input: &mut R, ignore_dots: bool, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = Read::take(&mut *input, (limit + 2 - out.len().min(limit)) as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("reading the message: {e}"))?;
        if n == 0 {
            break;
        }
        if !ignore_dots && (line == b".\n" || line == b".\r\n") {
            break;
        }
        out.extend_from_slice(&line);
        if out.len() > limit {
            return Err(format!("the message is larger than limits.max_message_size ({limit} bytes)"));
        }
    }
    Ok(out)
}

fn has_header(message: &[u8], name: &str) -> bool {
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return false;
        }
        if line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
            && line[name.len()] == b':'
        {
            return true;
        }
    }
    false
}

/// A full name as an RFC 5322 display name: as it is when it is plain words, else quoted
/// (RFC 2047 encoded when it is not ASCII). Control characters are dropped.
fn display_name(name: &str) -> String {
    let name: String = name.chars().filter(|c| !c.is_control()).take(200).collect();
    let name = name.trim();
    if !name.is_ascii() {
        use base64::Engine;
        return format!("=?utf-8?b?{}?=", base64::engine::general_purpose::STANDARD.encode(name));
    }
    if name.chars().all(|c| c.is_ascii_alphanumeric() || " !#$%&'*+-/=?^_`{|}~".contains(c)) {
        return name.to_string();
    }
    format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
}

/// SMTP on standard input and output (`sendmail -bs`, as Symfony Mailer and others use it):
/// the same protocol engine as the daemon, for a local user (no TLS, no AUTH, relaying allowed as
/// for any local program). Each message goes into Pickup, complete and synced, before its `250`;
/// the daemon queues it from there (it need not be running). Returns at QUIT or end of input.
pub fn smtp_session<R: Read, W: std::io::Write>(config: &Config, mut input: R, mut output: W) -> Result<(), String> {
    use mailroot_actors::protocol::{Action, EnqueueError, Session};
    let security = crate::config::Security {
        tls: None,
        listener_tls: Default::default(),
        users: None,
        dkim: Default::default(),
        srs: None,
    };
    let first = config.listener_settings(&security, None, None, None).into_iter().next();
    let Some(first) = first else { return Err("the configuration has no listener".into()) };
    let mut params = (*first.params).clone();
    params.auth_required = false;
    params.tls_available = false;
    params.tls_required = false;
    params.auth_enabled = false;
    // A local program's recipients are not checked with the LMTP server here (the daemon's
    // delivery reports unknown ones to the program's own sender).
    params.check_recipients = Default::default();
    let mut session = Session::new(std::sync::Arc::new(params), std::net::Ipv4Addr::LOCALHOST.into(), true);
    let io = |e: std::io::Error| format!("writing to standard output: {e}");
    output.write_all(&session.greeting().to_bytes()).map_err(io)?;
    output.flush().map_err(io)?;
    let pickup = config.mailroot.path.join("Pickup");
    let mut queued = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = input.read(&mut buf).map_err(|e| format!("reading standard input: {e}"))?;
        if n == 0 {
            return Ok(());
        }
        session.feed(&buf[..n]);
        while let Some(action) = session.next_action() {
            match action {
                Action::Reply(r) => output.write_all(&r.to_bytes()).map_err(io)?,
                Action::Enqueue(m) => {
                    let sender = m.sender.map(|s| s.to_string()).unwrap_or_default();
                    let mut file = format!("x-sender: <{sender}>{}\r\n", m.dsn.params());
                    for (i, r) in m.recipients.iter().enumerate() {
                        let params = m.rcpt_dsn.get(i).map(|d| d.params()).unwrap_or_default();
                        file.push_str(&format!("x-receiver: <{r}>{params}\r\n"));
                    }
                    let mut file = file.into_bytes();
                    file.extend_from_slice(&m.body);
                    let written = parse_pickup(&file, config.queue.max_hop_count)
                        .map_err(|e| (EX_DATAERR, e))
                        .and_then(|_| write_atomically(&pickup, &file));
                    let result = match written {
                        Ok(_) => {
                            queued += 1;
                            Ok(queued)
                        }
                        Err((_, e)) => {
                            eprintln!("mailroot sendmail -bs: {e}");
                            Err(EnqueueError::Temporary)
                        }
                    };
                    output.write_all(&session.enqueued(result).to_bytes()).map_err(io)?;
                }
                Action::Close => {
                    output.flush().map_err(io)?;
                    return Ok(());
                }
                // Neither is offered here; refuse if asked anyway.
                Action::Authenticate { .. } => session.authenticated(false),
                Action::StartTls => return Err("STARTTLS is not offered on standard input".into()),
                Action::CheckRecipient(_) => {
                    session.recipient_checked(mailroot_actors::protocol::RecipientVerdict::Exists)
                }
                // A local program is trusted (a relay client): never asked; say "go on" anyway.
                Action::CheckSender { .. } => session.sender_checked(None),
                Action::BodyChunk { .. } | Action::Refused(_) | Action::Log(_) => {}
            }
        }
        output.flush().map_err(io)?;
    }
}

fn unique() -> String {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:09}.{}", t.as_secs(), t.subsec_nanos(), std::process::id())
}

/// Builds the Pickup file for `message` and writes it into `pickup_dir`; returns its path.
pub fn submit(config: &Config, args: &Args, message: &[u8], login: &str) -> Result<std::path::PathBuf, (u8, String)> {
    let data = |e: String| (EX_DATAERR, e);
    let domain = config.domains.local.first().map(String::as_str).unwrap_or("localhost");
    let sender = match args.sender.as_deref() {
        Some("" | "<>") => String::new(),
        Some(s) => s.trim_matches(['<', '>']).to_string(),
        None => format!("{login}@{domain}"),
    };
    if !sender.is_empty() {
        parse_mailbox(&sender).map_err(|e| data(format!("sender {sender:?}: {}", e.text())))?;
    }
    let mut recipients = Vec::new();
    for r in &args.recipients {
        for one in r.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            // A bare user name is local, as sendmail has it.
            let full = if one.contains('@') { one.to_string() } else { format!("{one}@{domain}") };
            let m = parse_mailbox(full.trim_matches(['<', '>']))
                .map_err(|e| data(format!("recipient {one:?}: {}", e.text())))?;
            recipients.push(m.to_string());
        }
    }
    if !args.from_headers && recipients.is_empty() {
        return Err((EX_USAGE, "no recipients: give them as arguments, or use -t to read To:, Cc: and Bcc:".into()));
    }

    // Headers a sendmail adds when the program did not write them.
    let mut head = String::new();
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    if !has_header(message, "From") {
        let from = if sender.is_empty() { format!("MAILER-DAEMON@{domain}") } else { sender.clone() };
        match args.full_name.as_deref().map(display_name).filter(|n| !n.is_empty()) {
            Some(name) => head.push_str(&format!("From: {name} <{from}>\r\n")),
            None => head.push_str(&format!("From: {from}\r\n")),
        }
    }
    if !has_header(message, "Date") {
        head.push_str(&format!("Date: {}\r\n", rfc5322_date(t)));
    }
    if !has_header(message, "Message-ID") {
        head.push_str(&format!("Message-ID: <{}@{}>\r\n", unique(), config.server.hostname));
    }
    let mut body = head.into_bytes();
    body.extend_from_slice(message);

    // DSN parameters ride on the envelope lines, as on MAIL and RCPT.
    let message_dsn = mailroot_actors::protocol::dsn::MessageDsn {
        ret: args.ret,
        envid: args.envid.as_deref().map(mailroot_actors::protocol::dsn::xtext_encode),
    };
    let rcpt_dsn = mailroot_actors::protocol::dsn::RcptDsn { notify: args.notify, orcpt: None };
    let envelope = |rcpts: &[String]| {
        let mut f = format!("x-sender: <{sender}>{}\r\n", message_dsn.params()).into_bytes();
        for r in rcpts {
            f.extend_from_slice(format!("x-receiver: <{r}>{}\r\n", rcpt_dsn.params()).as_bytes());
        }
        f.extend_from_slice(&body);
        f
    };
    if args.from_headers {
        // The Pickup parser reads the header recipients (and checks them) when there is no
        // x-receiver line.
        let parsed = parse_pickup(&envelope(&[]), config.queue.max_hop_count);
        match parsed {
            Ok(p) => recipients.extend(p.recipients.iter().map(|m| m.to_string())),
            Err(e) if recipients.is_empty() => return Err(data(e)),
            Err(_) => {}
        }
    }
    // The same address from the arguments and the header goes once.
    let mut seen = std::collections::HashSet::new();
    recipients.retain(|r| seen.insert(r.to_ascii_lowercase()));
    let file = envelope(&recipients);
    parse_pickup(&file, config.queue.max_hop_count).map_err(data)?;
    write_atomically(&config.mailroot.path.join("Pickup"), &file)
}

/// `-bv`: checks each recipient's address and says where mail for it would go, one line each;
/// nothing is sent. False when an address is unusable.
pub fn verify(config: &Config, recipients: &[String]) -> (String, bool) {
    let domain = config.domains.local.first().map(String::as_str).unwrap_or("localhost");
    let local = config.local_domains();
    let relay = config.relay_domains();
    // The daemon's own routing table, so the answer is the daemon's.
    let table = mailroot_actors::routes::RouteTable::new(&config.routes).ok();
    let (mut out, mut ok) = (String::new(), true);
    for one in recipients.iter().flat_map(|r| r.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
        let full = if one.contains('@') { one.to_string() } else { format!("{one}@{domain}") };
        match parse_mailbox(full.trim_matches(['<', '>'])) {
            Ok(m) => {
                let route = table.as_ref().and_then(|t| t.rule(&m.domain));
                let how = match (route, local.contains(&m.domain), relay.contains(&m.domain)) {
                    (Some(r), _, _) => format!("deliverable: route {r:?}"),
                    (None, true, _) => "deliverable: local domain (Drop)".to_string(),
                    (None, false, true) => "deliverable: relay domain (its MX or the smart host)".to_string(),
                    (None, false, false) => "deliverable: remote (its MX or the smart host)".to_string(),
                };
                out.push_str(&format!("{m}: {how}\n"));
            }
            Err(e) => {
                ok = false;
                out.push_str(&format!("{one}: undeliverable: {}\n", e.text()));
            }
        }
    }
    (out, ok)
}

fn write_atomically(dir: &Path, contents: &[u8]) -> Result<std::path::PathBuf, (u8, String)> {
    let io = |what: &str, p: &Path, e: std::io::Error| (EX_IOERR, format!("{what} {}: {e}", p.display()));
    std::fs::create_dir_all(dir).map_err(|e| (EX_CANTCREAT, format!("creating {}: {e}", dir.display())))?;
    let name = format!("sendmail-{}", unique());
    let tmp = dir.join(format!(".{name}.tmp"));
    let dest = dir.join(format!("{name}.eml"));
    write_and_rename(&tmp, &dest, contents, 0o640).map_err(|e| io("writing", &dest, e))?;
    sync_dir(dir).map_err(|e| io("syncing", dir, e))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args, String> {
        parse_args(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn modes_and_names() {
        let cases: [(&str, Mode); 6] = [
            ("-bs", Mode::Smtp),
            ("-bp", Mode::ListQueue),
            ("-q", Mode::Flush),
            ("-bi", Mode::NoAliases),
            ("-bv a@x.org", Mode::Verify),
            ("-bm a@x.org", Mode::Deliver),
        ];
        for (line, mode) in cases {
            assert_eq!(args(line).unwrap().mode, mode, "{line}");
        }
        assert_eq!(args("-F Jane a").unwrap().full_name.as_deref(), Some("Jane"));
        assert_eq!(args("-FCronDaemon a").unwrap().full_name.as_deref(), Some("CronDaemon"));
        let dsn = args("-N success,delay -R hdrs -V id=1 a").unwrap();
        assert_eq!(
            (dsn.notify, dsn.ret, dsn.envid.as_deref()),
            (
                Some(mailroot_actors::protocol::dsn::Notify { success: true, failure: false, delay: true }),
                Some(mailroot_actors::protocol::dsn::Ret::Hdrs),
                Some("id=1")
            )
        );
        assert_eq!(args("-Nnever a").unwrap().notify.map(|n| n.keyword()).as_deref(), Some("NEVER"));
        for bad in ["-bd", "-q30m", "-F", "-N sometimes", "-R most", "-V", "-N"] {
            assert!(args(bad).is_err(), "{bad}");
        }
        for (name, want) in [
            ("Jane Doe", "Jane Doe"),
            ("Jane Q. Doe", "\"Jane Q. Doe\""),
            ("a \"quoted\" \\ name", "\"a \\\"quoted\\\" \\\\ name\""),
            ("Jürgen", "=?utf-8?b?SsO8cmdlbg==?="),
            ("evil\r\nBcc: x", "\"evilBcc: x\""),
        ] {
            assert_eq!(display_name(name), want, "{name:?}");
        }
    }

    #[test]
    fn arguments() {
        let cases: [(&str, Args); 6] = [
            ("a@x.org", Args { recipients: vec!["a@x.org".into()], ..Args::default() }),
            ("-t -i", Args { from_headers: true, ignore_dots: true, ..Args::default() }),
            (
                "-f me@x.org -oi b",
                Args {
                    sender: Some("me@x.org".into()),
                    ignore_dots: true,
                    recipients: vec!["b".into()],
                    ..Args::default()
                },
            ),
            ("-fme@x.org b", Args { sender: Some("me@x.org".into()), recipients: vec!["b".into()], ..Args::default() }),
            // cron: sendmail -FCronDaemon -i -B8BITMIME -oem user
            (
                "-FCronDaemon -i -B8BITMIME -oem user",
                Args {
                    ignore_dots: true,
                    full_name: Some("CronDaemon".into()),
                    recipients: vec!["user".into()],
                    ..Args::default()
                },
            ),
            ("-- -odd@x.org", Args { recipients: vec!["-odd@x.org".into()], ..Args::default() }),
        ];
        for (line, want) in cases {
            assert_eq!(args(line).unwrap(), want, "{line}");
        }
        for bad in ["-f", "-bz", "-qR"] {
            assert!(args(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reading() {
        let cases: [(&[u8], bool, &[u8]); 4] = [
            (b"Subject: a\n\nbody\n.\nafter\n", false, b"Subject: a\n\nbody\n"),
            (b"Subject: a\n\nbody\n.\nafter\n", true, b"Subject: a\n\nbody\n.\nafter\n"),
            (b"Subject: a\r\n\r\n.\r\n", false, b"Subject: a\r\n\r\n"),
            (b"no newline at end", false, b"no newline at end"),
        ];
        for (input, ignore, want) in cases {
            let got = read_message(&mut &input[..], ignore, 1000).unwrap();
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(input));
        }
        assert!(read_message(&mut &[b'x'; 2000][..], true, 1000).is_err());
        assert!(has_header(b"Date: x\r\n\r\n", "date"));
        assert!(!has_header(b"Subject: x\r\n\r\nDate: y\r\n", "Date"));
    }
}
