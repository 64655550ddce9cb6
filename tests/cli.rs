//! The command line as a contract: `check-config` prints the effective config or an error naming
//! the key; `run` refuses a broken config.

use std::process::Command;

fn mailroot(args: &[&str], cwd: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailroot")).args(args).current_dir(cwd).output().expect("run mailroot");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_config_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("m.toml");
    std::fs::write(
        &cfg,
        "[server]\nhostname = \"mx.example.test\"\nidle_timeout = \"90s\"\n[mailroot]\npath = \"spool\"\n",
    )
    .unwrap();
    let (code, out, err) = mailroot(&["check-config", "--config", cfg.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hostname = \"mx.example.test\""), "{out}");
    // Durations are shown as humantime writes them.
    assert!(out.contains("idle_timeout = \"1m 30s\""), "{out}");
    assert!(out.contains("max_recipients = 100"), "defaults are shown too: {out}");
    // Relative paths are relative to the config file's folder.
    assert!(out.contains(&format!("path = \"{}\"", dir.path().join("spool").display())), "{out}");
}

/// check-config reads what the configuration names but writes nothing: the SRS secret of
/// recipient maps is made by the daemon when it creates its folders, not by a check.
#[test]
fn check_config_writes_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("m.toml");
    std::fs::write(
        &cfg,
        "[mailroot]\npath = \"spool\"\n[domains]\nlocal = [\"example.test\"]\n\
         [recipients.\"example.test\"]\nusers = [\"alice\"]\naliases = { team = [\"alice\", \"x@far.test\"] }\n",
    )
    .unwrap();
    let (code, out, err) = mailroot(&["check-config", "--config", cfg.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[recipients.\"example.test\"]"), "{out}");
    assert!(!dir.path().join("spool").exists(), "nothing written");
    // A map naming a user its domain does not have is refused, naming the key.
    std::fs::write(
        &cfg,
        "[domains]\nlocal = [\"example.test\"]\n[recipients.\"example.test\"]\naliases = { a = [\"ghost\"] }\n",
    )
    .unwrap();
    let (code, _, err) = mailroot(&["check-config", "--config", cfg.to_str().unwrap()], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("recipients: example.test: alias \"a\""), "{err}");
}

#[test]
fn without_a_config_file_the_defaults_work() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = mailroot(&["check-config"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("built-in defaults"), "{out}");
    assert!(out.contains("listen = [\"127.0.0.1:2525\"]"), "{out}");
    assert!(out.contains("local = [\"localhost\"]"), "{out}");
}

#[test]
fn errors_name_the_key_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    for (text, key) in [
        ("[limits]\nmax_recipients = -1\n", "max_recipients"),
        ("[server]\nlisten = [\"127.0.0.1\"]\n", "server.listen[0]"),
        ("[server]\nlisen = []\n", "lisen"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let (code, _, err) = mailroot(&["check-config", "--config", cfg.to_str().unwrap()], dir.path());
        assert_eq!(code, 2, "{text}");
        assert!(err.contains(key), "error for {text:?} should name {key}: {err}");
        let (code, _, err) = mailroot(&["run", "--config", cfg.to_str().unwrap()], dir.path());
        assert_eq!(code, 2, "run refuses it too: {err}");
    }
    let (code, _, err) = mailroot(&["check-config", "--config", "/nonexistent/m.toml"], dir.path());
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/m.toml"), "{err}");
}

/// check-config opens every file the configuration names: a certificate, key or users file
/// that cannot be read or parsed fails it (as it would fail the start), naming the file.
#[test]
fn check_config_opens_the_files_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("m.toml");
    for (extra, named) in [
        ("[tls]\ncert = \"missing/cert.pem\"\nkey = \"missing/key.pem\"\n", "cert.pem"),
        ("[auth]\nusers_file = \"nobody.toml\"\nallow_plaintext_loopback = true\n", "nobody.toml"),
    ] {
        std::fs::write(&cfg, format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{extra}")).unwrap();
        let (code, _, err) = mailroot(&["check-config", "--config", cfg.to_str().unwrap()], dir.path());
        assert_eq!(code, 2, "{extra}: {err}");
        assert!(err.contains(named), "{err}");
    }
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate").unwrap();
    std::fs::write(&cfg, "[tls]\ncert = \"garbage.pem\"\nkey = \"garbage.pem\"\n").unwrap();
    let (code, _, err) = mailroot(&["check-config", "--config", cfg.to_str().unwrap()], dir.path());
    assert_eq!(code, 2, "{err}");
}

#[test]
fn gen_cert_and_passwd_make_files_the_daemon_accepts() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = mailroot(&["gen-cert", "--hostname", "mx.example.test", "--out", "tls"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cert.pem"), "{out}");
    let key_mode = std::fs::metadata(dir.path().join("tls/key.pem")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600, "the key is for its owner only");
    let (code, _, err) = mailroot(&["gen-cert", "--hostname", "bad name", "--out", "x"], dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("bad name"), "{err}");
    // What it prints works where it is pasted: a config in another folder starts from it.
    let printed = out.split_once("[tls]").map(|(_, t)| format!("[tls]{t}")).expect("a [tls] block");
    let elsewhere = dir.path().join("config");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let pasted = elsewhere.join("mailroot.toml");
    std::fs::write(&pasted, format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{printed}")).unwrap();
    let (code, _, err) = mailroot(&["check-config", "--config", pasted.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "the printed paths work: {err}");
    // The certificate names the host as CN too, and is valid from about now for about two years.
    match std::process::Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-startdate", "-enddate", "-in"])
        .arg(dir.path().join("tls/cert.pem"))
        .output()
    {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            assert!(text.contains("CN = mx.example.test") || text.contains("CN=mx.example.test"), "{text}");
            let year = |field: &str| -> i32 {
                let line = text.lines().find(|l| l.starts_with(field)).unwrap_or_default();
                line.split_whitespace().rev().nth(1).and_then(|y| y.parse().ok()).unwrap_or(0)
            };
            let (from, until) = (year("notBefore="), year("notAfter="));
            assert!((2026..2100).contains(&from) && (2..=3).contains(&(until - from)), "{text}");
        }
        other => eprintln!("openssl x509 unavailable ({other:?}); the certificate's fields are not checked"),
    }

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mailroot"))
        .arg("passwd")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");

    // Both go into a config that check-config accepts and that starts.
    std::fs::write(dir.path().join("users.toml"), format!("[users]\n\"alice\" = \"{hash}\"\n")).unwrap();
    let cfg = dir.path().join("m.toml");
    std::fs::write(
        &cfg,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[tls]\ncert = \"tls/cert.pem\"\nkey = \"tls/key.pem\"\n\
         [auth]\nusers_file = \"users.toml\"\n",
    )
    .unwrap();
    let (code, out, err) = mailroot(&["check-config", "--config", cfg.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("users_file"), "{out}");
    let mut config = mailroot::config::Config::load(Some(&cfg)).unwrap().config;
    config.mailroot.path = dir.path().join("spool");
    // Not the default admin port: something else on this machine may hold it.
    config.admin.listen = "127.0.0.1:0".into();
    let running = mailroot::daemon::start(config, Default::default()).expect("starts with TLS and AUTH");
    running.stop();
    // A users file with a broken hash is a start error naming the user.
    std::fs::write(dir.path().join("users.toml"), "[users]\n\"bob\" = \"plain\"\n").unwrap();
    let mut config = mailroot::config::Config::load(Some(&cfg)).unwrap().config;
    config.mailroot.path = dir.path().join("spool2");
    config.admin.listen = "127.0.0.1:0".into();
    let e = mailroot::daemon::start(config, Default::default()).err().expect("refused");
    assert!(e.to_string().contains("bob"), "{e}");
}

#[test]
fn dkim_keygen_and_dns_records_give_what_to_publish() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = mailroot(
        &["dkim", "keygen", "--domain", "example.test", "--selector", "e1", "--algorithm", "ed25519", "--out", "dkim"],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("e1._domainkey.example.test.\t3600\tIN\tTXT\t\"v=DKIM1; k=ed25519; p="), "{out}");
    let key = dir.path().join("dkim/example.test.e1.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    // The printed configuration lines work as they are.
    let config_lines = out.split("# and in the configuration:\n").nth(1).unwrap();
    std::fs::write(
        dir.path().join("mailroot.toml"),
        format!("[server]\nhostname = \"mx.example.test\"\n[domains]\nlocal = [\"example.test\"]\n{config_lines}"),
    )
    .unwrap();
    let (code, _, err) = mailroot(&["check-config", "--config", "mailroot.toml"], dir.path());
    assert_eq!(code, 0, "{err}");
    let (code, records, err) = mailroot(&["dns-records", "--config", "mailroot.toml"], dir.path());
    assert_eq!(code, 0, "{err}");
    let published = out.lines().find(|l| l.starts_with("e1._domainkey")).unwrap();
    for want in [
        "example.test.\t3600\tIN\tMX\t10 mx.example.test.",
        "\"v=spf1 mx a:mx.example.test -all\"",
        published,
        "_dmarc.example.test.",
        "_mta-sts.example.test.",
        "_smtp._tls.example.test.",
        "PTR",
    ] {
        assert!(records.contains(want), "{want:?} missing from:\n{records}");
    }
    // Never over an existing key; an unknown domain is an error.
    let (code, _, err) =
        mailroot(&["dkim", "keygen", "--domain", "example.test", "--selector", "e1", "--out", "dkim"], dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("exists"), "{err}");
    let (code, _, _) = mailroot(&["dns-records", "--config", "mailroot.toml", "--domain", "nope.test"], dir.path());
    assert_eq!(code, 2);
}
