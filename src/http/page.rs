//! The page: `/` shows every target, `/targets/{name}` one. One HTML file
//! with its style and script inline (`page.html`, `page.js`), compiled
//! into the binary: no CDN, no build step, works offline. The script reads
//! the JSON APIs and sets every value as text, and the Content Security
//! Policy allows no script or style but these two, by their hashes.

use std::sync::{Arc, OnceLock};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use crate::state::SharedState;

const HTML: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("page.js");

/// The page, and its Content-Security-Policy header.
struct Page {
    html: String,
    policy: String,
}

fn built() -> &'static Page {
    static PAGE: OnceLock<Page> = OnceLock::new();
    PAGE.get_or_init(|| {
        let html = HTML.replacen("/*SCRIPT*/", SCRIPT, 1);
        let style = between(&html, "<style>", "</style>");
        let hash = |text: &str| {
            let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
            )
        };
        let policy = format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; base-uri 'none'; \
             form-action 'none'; frame-ancestors 'none'",
            hash(SCRIPT),
            hash(style)
        );
        Page { html, policy }
    })
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let from = text.find(start).map_or(0, |i| i + start.len());
    let to = text[from..].find(end).map_or(text.len(), |i| from + i);
    &text[from..to]
}

fn respond() -> Response {
    let page = built();
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, page.policy.as_str()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page.html.clone(),
    )
        .into_response()
}

pub(super) async fn page() -> Response {
    respond()
}

/// One target's page; 404 naming the targets for a name lockjam does not
/// watch.
pub(super) async fn target_page(State(state): State<Arc<SharedState>>, Path(name): Path<String>) -> Response {
    if state.target(&name).is_some() {
        return respond();
    }
    let known: Vec<String> = state.targets().iter().map(|t| t.name.clone()).collect();
    (
        StatusCode::NOT_FOUND,
        [(header::X_CONTENT_TYPE_OPTIONS, "nosniff")],
        format!(
            "lockjam watches no target named {name:?}; its targets: {}\n",
            known.join(", ")
        ),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prepared_root_reads_as_in_the_terminal() {
        // The script cannot share the Rust text; this keeps them equal.
        assert!(SCRIPT.contains(&format!("\" {}\"", crate::tree::PREPARED_ROOT)));
    }

    #[test]
    fn the_policy_allows_the_inline_script_and_style_by_hash_only() {
        let page = built();
        assert!(page.html.contains("\"use strict\";"));
        assert!(!page.html.contains("/*SCRIPT*/"));
        assert!(!page.html.contains("://"), "nothing loaded from elsewhere");
        assert!(page.policy.starts_with("default-src 'none'; script-src 'sha256-"));
        assert!(!page.policy.contains("unsafe"));
        // No value is ever written as HTML.
        assert!(
            !SCRIPT.contains("innerHTML")
                && !SCRIPT.contains("insertAdjacentHTML")
                && !SCRIPT.contains("document.write")
        );
    }
}
