//! HTTP: the routes in [`ROUTES`], served from shared state; only
//! `/api/v1/preflight` runs SQL on a target (on a session of its own, one
//! question at a time), and the incident routes read lockjam's own SQLite
//! store, off the async threads. Optional HTTPS ([`tls`]) and credentials
//! ([`auth`]); every client is bounded ([`serve`]); the JSON of
//! `/api/v1/snapshot` is in [`views`]. The only module that knows axum and
//! hyper.

mod auth;
mod page;
mod serve;
mod tls;
mod views;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

pub use serve::serve;
pub(crate) use serve::ConnectionLimits;
pub(crate) use tls::TlsReloader;
pub use views::snapshot_of;

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
const INCIDENTS: &str = "/api/v1/incidents";
const INCIDENT: &str = "/api/v1/incidents/{id}";
const PREFLIGHT: &str = "/api/v1/preflight";
const PAGE: &str = "/";
const TARGET_PAGE: &str = "/targets/{name}";

/// Every route lockjam serves, as the startup log and the 404 name them.
pub(crate) const ROUTES: [&str; 10] = [
    PAGE,
    TARGET_PAGE,
    METRICS,
    HEALTHZ,
    READYZ,
    SNAPSHOT,
    EVENTS,
    INCIDENTS,
    INCIDENT,
    PREFLIGHT,
];

/// Incidents a list answers with, by default and at most.
const INCIDENTS_LIMIT: usize = 100;
const INCIDENTS_MAX_LIMIT: usize = 1000;

/// The routes. The page, `/metrics` and `/api/*` require the configured credentials;
/// `/healthz` never does, and `/readyz` gives its status code to anyone
/// and its reasons only with credentials, so that probes need none.
pub(crate) fn router(state: Arc<SharedState>) -> Router {
    let protected = Router::new()
        .route(PAGE, get(page::page))
        .route(TARGET_PAGE, get(page::target_page))
        .route(METRICS, get(metrics))
        .route(SNAPSHOT, get(snapshot))
        .route(EVENTS, get(events))
        .route(INCIDENTS, get(incidents))
        .route(INCIDENT, get(incident))
        .route(PREFLIGHT, get(preflight))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_auth));
    Router::new()
        .merge(protected)
        .route(HEALTHZ, get(healthz))
        .route(READYZ, get(readyz))
        .fallback(not_found)
        // gzip when the request accepts it: a /metrics of a large fleet
        // shrinks about tenfold. Small bodies are sent as they are.
        .layer(tower_http::compression::CompressionLayer::new())
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

/// `GET /api/v1/incidents?target=&since=&limit=` as written: checked here,
/// so that a bad value is named in the answer.
#[derive(Debug, serde::Deserialize)]
struct IncidentsQuery {
    target: Option<String>,
    since: Option<String>,
    limit: Option<String>,
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
}

/// `since`: a duration back from now (`24h`, `90m`) or an RFC 3339 instant.
pub fn parse_since(text: &str, now: std::time::SystemTime) -> Result<std::time::SystemTime, String> {
    let text = text.trim();
    if let Ok(ago) = humantime::parse_duration(text) {
        return Ok(now.checked_sub(ago).unwrap_or(std::time::UNIX_EPOCH));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!(
            "since `{}` is neither a duration (24h, 90m) nor an instant (2026-12-07T06:00:00Z)",
            crate::audit::one_line(text)
        )
    })
}

/// Closed incidents, newest first.
async fn incidents(
    State(state): State<Arc<SharedState>>,
    query: Result<Query<IncidentsQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return bad_request("the query string must be target=NAME&since=24h&limit=100".into());
    };
    let since = match query
        .since
        .as_deref()
        .map(|s| parse_since(s, std::time::SystemTime::now()))
    {
        None => None,
        Some(Ok(since)) => Some(since),
        Some(Err(message)) => return bad_request(message),
    };
    let limit = match query.limit.as_deref().map(str::parse::<usize>) {
        None => INCIDENTS_LIMIT,
        Some(Ok(limit)) if (1..=INCIDENTS_MAX_LIMIT).contains(&limit) => limit,
        Some(_) => return bad_request(format!("limit must be a whole number from 1 to {INCIDENTS_MAX_LIMIT}")),
    };
    let store = state.incidents.clone();
    let found = tokio::task::spawn_blocking(move || store.list(query.target.as_deref(), since, limit)).await;
    match found {
        Ok(Ok(found)) => Json(serde_json::json!({ "incidents": found })).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "the incident store failed\n").into_response(),
    }
}

/// `GET /api/v1/preflight?target=&relation=&relation=&mode=&database=&max_transaction_age=`:
/// `lockjam preflight`'s answer from a running lockjam, for a pipeline
/// without database credentials. 200 with `clear` true or false; 400
/// naming a bad parameter or an unknown relation; 503 when the database
/// cannot be asked. The one route that reads the database, on a session
/// of its own, one question at a time per target.
async fn preflight(State(state): State<Arc<SharedState>>, RawQuery(query): RawQuery) -> Response {
    let Ok(pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(query.as_deref().unwrap_or("")) else {
        return bad_request(
            "the query string must be target=NAME&relation=public.orders&mode=AccessExclusiveLock".into(),
        );
    };
    let mut question = crate::preflight::Question {
        relations: Vec::new(),
        database: None,
        mode: "AccessExclusiveLock".into(),
        max_transaction_age: None,
    };
    let mut target = None;
    for (key, value) in pairs {
        match key.as_str() {
            "target" => target = Some(value),
            "relation" => question.relations.push(value),
            "database" => question.database = Some(value),
            "mode" => question.mode = value,
            "max_transaction_age" => match crate::duration::parse(&value) {
                Ok(age) => question.max_transaction_age = Some(age),
                Err(e) => return bad_request(format!("max_transaction_age: {e}")),
            },
            other => {
                return bad_request(format!(
                    "unknown parameter {other:?}: use target, relation, mode, database, max_transaction_age"
                ))
            }
        }
    }
    let targets = state.targets();
    let record = match (&target, targets.as_slice()) {
        (Some(name), all) => match all.iter().find(|t| &t.name == name) {
            Some(record) => record.clone(),
            None => return (StatusCode::NOT_FOUND, format!("no target named {name:?}\n")).into_response(),
        },
        (None, [one]) => one.clone(),
        (None, []) => return (StatusCode::NOT_FOUND, "this lockjam watches no target\n").into_response(),
        (None, _) => return bad_request("lockjam watches several targets: name one with target=NAME".into()),
    };
    let Some(asker) = record.preflight.clone() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "this target cannot be asked\n").into_response();
    };
    match asker.ask(&question).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) if e.is_usage() => bad_request(e.to_string()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", crate::connect::error_chain(&e)),
        )
            .into_response(),
    }
}

/// One incident by id.
async fn incident(State(state): State<Arc<SharedState>>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return bad_request("an incident id is a whole number, as /api/v1/incidents lists them".into());
    };
    let store = state.incidents.clone();
    match tokio::task::spawn_blocking(move || store.get(id)).await {
        Ok(Ok(Some(found))) => Json(found).into_response(),
        Ok(Ok(None)) => (StatusCode::NOT_FOUND, format!("no incident {id}\n")).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "the incident store failed\n").into_response(),
    }
}

async fn snapshot(State(state): State<Arc<SharedState>>) -> Json<serde_json::Value> {
    Json(views::snapshot(&state))
}
