//! Debian's Chromium, headless, driven over WebDriver: chromedriver on a loopback port of its
//! own, a fresh profile per browser, no network beyond what the test serves. `.ci/run` installs
//! the `chromium` and `chromium-driver` packages; without them a test says it is skipped (and
//! fails when `MAILROOT_INTEROP` is set, as in CI).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const DRIVER: &str = "/usr/bin/chromedriver";

/// How long any one wait in the page may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Whether Chromium and chromedriver are installed; with `MAILROOT_INTEROP` set, their absence
/// is a failure.
pub fn available() -> bool {
    let missing: Vec<&str> = [CHROMIUM, DRIVER].into_iter().filter(|p| !Path::new(p).exists()).collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!("{} not installed (apt-get install chromium chromium-driver)", missing.join(" and "));
    if std::env::var_os("MAILROOT_INTEROP").is_some() {
        panic!("MAILROOT_INTEROP is set but {why}");
    }
    eprintln!("SKIPPED: {why}; .ci/run installs them and runs this test");
    false
}

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver takes its browsers with it.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

impl Browser {
    /// A headless Chromium whose resolver maps `evil.test` to 127.0.0.1 (a DNS-rebinding name).
    pub async fn start() -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        // The port is free when chosen; another process could take it before chromedriver does,
        // so a start that does not come up is tried again on another.
        for _ in 0..3 {
            let port = free_port();
            let mut driver = Command::new(DRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver starts");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + PATIENCE;
            while Instant::now() < deadline && TcpStream::connect(addr).is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let caps = json!({
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--disable-quic", "--disable-dev-shm-usage", "--window-size=1280,900",
                        "--host-resolver-rules=MAP evil.test 127.0.0.1",
                        format!("--user-data-dir={}", profile.path().display()),
                    ],
                },
            });
            let Value::Object(caps) = caps else { unreachable!() };
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector).capabilities(caps).connect(&format!("http://{addr}")).await {
                Ok(client) => return Browser { client, driver, _profile: profile },
                Err(e) => {
                    eprintln!("chromedriver on port {port} did not start a browser: {e}");
                    let _ = driver.kill();
                    let _ = driver.wait();
                }
            }
        }
        panic!("no headless Chromium could be started");
    }

    /// The text of the first element matching `css` ("" when there is none).
    pub async fn text(&self, css: &str) -> String {
        let v = self
            .client
            .execute("const e = document.querySelector(arguments[0]); return e ? e.textContent : '';", vec![json!(css)])
            .await
            .expect("script runs");
        v.as_str().unwrap_or_default().to_string()
    }

    /// Waits until the text of `css` satisfies `ok`; returns it.
    pub async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let t = self.text(css).await;
            if ok(&t) {
                return t;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}: {css} says {t:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for an element that is displayed and enabled, and clicks it. The element is looked
    /// up again on each try: the pages that refresh themselves (sessions, actors) replace their
    /// rows every few seconds, and a row found just before that is gone ("stale").
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let last = match self.client.find(Locator::Css(css)).await {
                Ok(e) => match (e.is_displayed().await, e.is_enabled().await) {
                    (Ok(true), Ok(true)) => match e.click().await {
                        Ok(()) => return,
                        Err(err) => format!("click failed: {err}"),
                    },
                    (shown, enabled) => format!("displayed {shown:?}, enabled {enabled:?}"),
                },
                Err(err) => format!("not found: {err}"),
            };
            if Instant::now() > deadline {
                panic!("could not click {css}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.client.wait().at_most(PATIENCE).for_element(Locator::Css(css)).await.expect("input");
        e.clear().await.expect("cleared");
        e.send_keys(text).await.expect("typed");
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    }

    /// Saves what the browser shows as `<target>/console-screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("screenshot folder");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("screenshot written");
        path
    }
}

/// `target/console-screenshots`, found from the test binary's place (`target/debug/deps/…`),
/// so a `CARGO_TARGET_DIR` elsewhere is followed.
pub fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.ancestors().nth(3).map(|t| t.join("console-screenshots")).expect("target folder")
}
