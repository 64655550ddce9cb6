//! Who may use the admin API: the checks every request passes before a handler runs, and the
//! token that is always there.
//!
//! - **A token always.** With no `admin.token` configured, the daemon generates one at first
//!   start into `<Mailroot>/admin.token` (0600, 256 random bits) and the CLI reads it from there,
//!   so a local operator needs no setup and other users of the machine, and web pages, get 401.
//! - **The Host header** must be an IP literal, `localhost`, or a name in `admin.hosts`: a page
//!   on a DNS-rebinding name (`evil.example` resolving to 127.0.0.1) gets 403.
//! - **State-changing requests** (`POST`, `DELETE`) must say `Content-Type: application/json`,
//!   which an HTML form cannot send and a foreign page's script cannot send without a CORS
//!   preflight we never grant; one that carries an `Origin` must be from the Host itself.

use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use actix_web::http::{header, Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse};
use mailroot_actors::auth::constant_time_eq;
use tracing::{info, warn};

use super::{error, AdminState};
use crate::config::Config;

/// Where the generated token lives: in the Mailroot, beside the queue it guards.
pub fn token_file(config: &Config) -> PathBuf {
    config.mailroot.path.join("admin.token")
}

/// The token the API requires: `admin.token` when configured, else the one in `admin.token`
/// (created at the first start, and made 0600 if someone loosened it).
pub fn load_or_create_token(config: &Config) -> io::Result<String> {
    if !config.admin.token.is_empty() {
        return Ok(config.admin.token.clone());
    }
    let path = token_file(config);
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
        Ok(mut f) => {
            let token = random_token()?;
            f.write_all(token.as_bytes())?;
            f.sync_all()?;
            info!(file = %path.display(), "admin API token generated; the CLI reads it from this file");
            return Ok(token);
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
    let meta = std::fs::symlink_metadata(&path)?;
    if !meta.is_file() {
        return Err(io::Error::other(format!("{} is not a regular file", path.display())));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        warn!(file = %path.display(), "admin token file was readable by others; made 0600");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    let token = std::fs::read_to_string(&path)?.trim().to_string();
    if token.len() < 32 {
        return Err(io::Error::other(format!("{}: the token is shorter than 32 characters", path.display())));
    }
    Ok(token)
}

/// 32 bytes from the kernel's generator, as 64 hex digits.
fn random_token() -> io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The token the CLI sends: `--token`, else `admin.token`, else the generated file (when this
/// user may read it).
pub fn client_token(config: &Config, given: Option<&str>) -> String {
    if let Some(t) = given {
        return t.to_string();
    }
    if !config.admin.token.is_empty() {
        return config.admin.token.clone();
    }
    std::fs::read_to_string(token_file(config)).map(|t| t.trim().to_string()).unwrap_or_default()
}

/// The host part of a `Host` header value (`[::1]:8025` → `::1`, `a.test:80` → `a.test`).
fn host_name(value: &str) -> &str {
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split_once(']').map_or("", |(h, _)| h);
    }
    value.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(value, |(h, _)| h)
}

/// A Host a DNS-rebinding page cannot present: an address, `localhost`, or a configured name.
pub(super) fn host_allowed(value: &str, allowed: &[String]) -> bool {
    let host = host_name(value.trim());
    host.parse::<std::net::IpAddr>().is_ok()
        || host.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(host))
}

/// 403 for a Host that DNS rebinding could present; what the console's pages check too (they
/// hold no data, so they need no token).
pub(super) fn check_host(req: &HttpRequest, s: &AdminState) -> Result<(), HttpResponse> {
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    if host_allowed(host, &s.hosts) {
        return Ok(());
    }
    let who = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    warn!(client = %who, "admin API request for a foreign Host refused (DNS rebinding?)");
    Err(error(
        StatusCode::FORBIDDEN,
        "this Host is not served: use an address, localhost, or a name listed in admin.hosts",
    ))
}

/// `Err` is the response to send: 403 for a foreign Host or Origin, 415 for a state-changing
/// request that is not JSON, 401 for a missing or wrong token.
pub(super) fn check(req: &HttpRequest, s: &AdminState, is_metrics: bool) -> Result<(), HttpResponse> {
    let who = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    check_host(req, s)?;
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    if matches!(*req.method(), Method::POST | Method::DELETE | Method::PUT | Method::PATCH) {
        let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if let Some(origin) = origin {
            let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            if !origin_host.eq_ignore_ascii_case(host) {
                warn!(client = %who, "admin API request from a foreign Origin refused");
                return Err(error(StatusCode::FORBIDDEN, "cross-origin requests are not served"));
            }
        }
        let json =
            req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
                v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "state-changing requests must be sent as Content-Type: application/json",
            ));
        }
    }
    if is_metrics && s.metrics_public {
        return Ok(());
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), s.token.as_bytes()) => Ok(()),
        _ => {
            warn!(client = %who, path = req.path(), "admin API request without a valid token");
            let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            Err(r)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let allowed = vec!["mail.example.org".to_string()];
        let cases = [
            ("127.0.0.1:8025", true),
            ("127.0.0.1", true),
            ("[::1]:8025", true),
            ("localhost:8025", true),
            ("LOCALHOST", true),
            ("192.0.2.7:8025", true),
            ("mail.example.org:8025", true),
            ("Mail.Example.Org", true),
            ("evil.example:8025", false),
            ("evil.example", false),
            ("127.0.0.1.evil.example", false),
            ("localhost.evil.example:80", false),
            ("", false),
            ("[::1", false),
        ];
        for (host, ok) in cases {
            assert_eq!(host_allowed(host, &allowed), ok, "{host:?}");
        }
    }

    #[test]
    fn token_file_is_created_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.mailroot.path = dir.path().to_path_buf();
        let t = load_or_create_token(&c).unwrap();
        assert_eq!(t.len(), 64);
        let mode = std::fs::metadata(token_file(&c)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create_token(&c).unwrap(), t, "the same token at the next start");
        assert_eq!(client_token(&c, None), t);
        assert_eq!(client_token(&c, Some("x")), "x");
        // Loosened by someone: made 0600 again.
        std::fs::set_permissions(token_file(&c), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_or_create_token(&c).unwrap(), t);
        assert_eq!(std::fs::metadata(token_file(&c)).unwrap().permissions().mode() & 0o777, 0o600);
        // A configured token wins, and no file is needed.
        c.admin.token = "configured-token".into();
        assert_eq!(load_or_create_token(&c).unwrap(), "configured-token");
    }
}
