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
    let running = mailroot::daemon::start(config, Default::default()).expect("starts with TLS and AUTH");
    running.stop();
    // A users file with a broken hash is a start error naming the user.
    std::fs::write(dir.path().join("users.toml"), "[users]\n\"bob\" = \"plain\"\n").unwrap();
    let mut config = mailroot::config::Config::load(Some(&cfg)).unwrap().config;
    config.mailroot.path = dir.path().join("spool2");
    let e = mailroot::daemon::start(config, Default::default()).err().expect("refused");
    assert!(e.to_string().contains("bob"), "{e}");
}
