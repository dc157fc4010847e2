//! HTTP: the routes in [`ROUTES`], served from shared state only; no
//! handler ever runs SQL. Optional HTTPS ([`tls`]) and credentials
//! ([`auth`]); every client is bounded ([`serve`]); the JSON of
//! `/api/v1/snapshot` is in [`views`]. The only module that knows axum and
//! hyper.

mod auth;
mod serve;
mod tls;
mod views;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

pub use serve::serve;
pub(crate) use serve::ConnectionLimits;
pub(crate) use tls::TlsReloader;

use crate::state::SharedState;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot use {file} for HTTPS: {message}")]
    Tls { file: String, message: String },
}

const METRICS: &str = "/metrics";
const HEALTHZ: &str = "/healthz";
const READYZ: &str = "/readyz";
const SNAPSHOT: &str = "/api/v1/snapshot";
const EVENTS: &str = "/api/v1/events";

/// Every route lockjam serves, as the startup log and the 404 name them.
pub(crate) const ROUTES: [&str; 5] = [METRICS, HEALTHZ, READYZ, SNAPSHOT, EVENTS];

/// The routes. `/metrics` and `/api/*` require the configured credentials;
/// `/healthz` never does, and `/readyz` gives its status code to anyone
/// and its reasons only with credentials, so that probes need none.
pub(crate) fn router(state: Arc<SharedState>) -> Router {
    let protected = Router::new()
        .route(METRICS, get(metrics))
        .route(SNAPSHOT, get(snapshot))
        .route(EVENTS, get(events))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_auth));
    Router::new()
        .merge(protected)
        .route(HEALTHZ, get(healthz))
        .route(READYZ, get(readyz))
        .fallback(not_found)
        .with_state(state)
}

async fn metrics(State(state): State<Arc<SharedState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<SharedState>>, headers: HeaderMap) -> Response {
    let now = Instant::now();
    let reasons: Vec<String> = state
        .targets()
        .iter()
        .filter_map(|t| t.not_ready_reason(now).map(|r| format!("target `{}`: {r}", t.name)))
        .collect();
    let auth = state.auth();
    let may_see_reasons = !auth.is_required() || auth::authorized(&auth, &headers);
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else if may_see_reasons {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", reasons.join("\n")),
        )
            .into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("not found: lockjam serves {}\n", ROUTES.join(", ")),
    )
        .into_response()
}

/// Policy decisions, newest first (the last 1000).
async fn events(State(state): State<Arc<SharedState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "events": state.events.newest_first() }))
}

async fn snapshot(State(state): State<Arc<SharedState>>) -> Json<serde_json::Value> {
    Json(views::snapshot(&state))
}
