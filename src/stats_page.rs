//! The live stats page on the metrics address: `/` (HTML), [`STYLE_PATH`]
//! and [`SCRIPT_PATH`], three small assets compiled into the binary
//! (`src/stats/`), no CDN, no font, no build step.
//!
//! The page polls `/debug/services` about once a second while it is open
//! and visible, and computes every rate itself from counter deltas over the
//! document's `now_ms`: the proxy samples nothing and keeps no history, so
//! the page costs nothing while nobody looks. Its charts are inline SVG.
//!
//! Every asset is sent with [`CSP`]: only this origin may serve scripts,
//! styles and fetches; no inline script or style, no frames, no forms.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// Where the page's script is served.
pub const SCRIPT_PATH: &str = "/stats.js";
/// Where the page's style sheet is served.
pub const STYLE_PATH: &str = "/stats.css";

/// The Content-Security-Policy of every asset: nothing but this origin's
/// own script, style sheet and `/debug/services`; no inline code, no
/// plug-ins, no framing, no form targets, no `<base>` rewrites.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

const HTML: &str = include_str!("stats/index.html");
const JS: &str = include_str!("stats/stats.js");
const CSS: &str = include_str!("stats/stats.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the page.
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", HTML)
}

/// `GET /stats.js`: the page's script.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

/// `GET /stats.css`: the page's style sheet.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_links_only_its_own_assets_and_has_no_inline_code() {
        assert!(HTML.contains(&format!("src=\"{SCRIPT_PATH}\"")));
        assert!(HTML.contains(&format!("href=\"{STYLE_PATH}\"")));
        for forbidden in [
            "<style", "style=", "onload=", "onclick=", "http://", "https://",
        ] {
            assert!(!HTML.contains(forbidden), "index.html has {forbidden}");
        }
        // Every <script> has a src (no inline script).
        assert_eq!(
            HTML.matches("<script").count(),
            HTML.matches("<script src=").count()
        );
        // The SVG namespace is a name, not a fetch.
        let js = JS.replace("'http://www.w3.org/2000/svg'", "");
        for text in [js.as_str(), CSS] {
            assert!(!text.contains("http://") && !text.contains("https://"));
        }
    }
}
