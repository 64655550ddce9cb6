//! The web console: one hand-written page, its script and its style sheet, built into the
//! binary (`console/`), served at `/console/`. It holds no data of its own: the script signs in
//! with the admin token and uses the same API as the CLI.
//!
//! Why hand-written and not a framework's build output: nothing to install to build or run
//! mailroot (no Node.js, no CDN), nothing generated to keep in step with its source, and a page
//! small enough to read in one sitting.
//!
//! Invariants:
//! - The pages pass the same Host check as the API (a DNS-rebinding name gets 403); they need no
//!   token because they contain nothing but code.
//! - Every page is sent with a Content-Security-Policy that allows only these files' script and
//!   style, and connections back to this origin: an address, a HELO name or a header that got
//!   past the script's text-only rendering still could not run or send anything anywhere.
//! - They may not be framed (`frame-ancestors 'none'`), so no other site can trick a click.
//! - Every link and request in the page is relative, so a reverse proxy may serve it under any
//!   path (and `admin.path_prefix` covers proxies that do not strip theirs).

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use super::{guard, State};

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/app.css");

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                      connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(to_console))
        .route("/console", web::get().to(to_console))
        .route("/console/", web::get().to(index))
        .route("/console/app.js", web::get().to(script))
        .route("/console/app.css", web::get().to(style));
}

fn page(req: &HttpRequest, s: &State, content_type: &str, body: &'static str) -> HttpResponse {
    if let Err(r) = guard::check_host(req, s) {
        return r;
    }
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CONTENT_SECURITY_POLICY, POLICY))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

/// `/` and `/console` lead to `/console/` (relative, so it holds behind a proxy's path too).
async fn to_console(req: HttpRequest, s: State) -> HttpResponse {
    if let Err(r) = guard::check_host(&req, &s) {
        return r;
    }
    let to = if req.path().ends_with("/console") { "console/" } else { "./console/" };
    HttpResponse::Found().insert_header((header::LOCATION, to)).finish()
}

async fn index(req: HttpRequest, s: State) -> HttpResponse {
    page(&req, &s, "text/html; charset=utf-8", INDEX)
}

async fn script(req: HttpRequest, s: State) -> HttpResponse {
    page(&req, &s, "text/javascript; charset=utf-8", SCRIPT)
}

async fn style(req: HttpRequest, s: State) -> HttpResponse {
    page(&req, &s, "text/css; charset=utf-8", STYLE)
}
