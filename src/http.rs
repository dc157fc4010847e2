//! HTTP: `/metrics`, `/healthz`, `/readyz` and `/api/v1/snapshot`, served
//! from shared state only; no handler ever runs SQL. Optional HTTPS and
//! credentials. Every client is bounded: a header timeout and a cap on
//! open connections. The only module that knows axum and hyper.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::analysis::{Blocker, LockGraph, Queue, Waiter};
use crate::config::{HttpAuth, TlsFiles};
use crate::snapshot::Session;
use crate::state::SharedState;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot use {file} for HTTPS: {message}")]
    Tls { file: String, message: String },
}

/// The routes. `/metrics` and `/api/*` require the configured credentials;
/// `/healthz` never does, and `/readyz` gives its status code to anyone
/// and its reasons only with credentials, so that probes need none.
pub fn router(state: Arc<SharedState>) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/snapshot", get(snapshot))
        .route("/api/v1/events", get(events))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth));
    Router::new()
        .merge(protected)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(state)
}

/// The HTTPS settings in force; [`TlsReloader::reload`] swaps in a renewed
/// certificate for the connections that follow.
#[derive(Clone)]
pub struct TlsReloader(Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>);

impl TlsReloader {
    pub fn load(files: &TlsFiles) -> Result<TlsReloader, HttpError> {
        Ok(TlsReloader(Arc::new(std::sync::RwLock::new(tls_server_config(files)?))))
    }

    /// Re-reads the files; on error the certificate in force stays.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), HttpError> {
        let config = tls_server_config(files)?;
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        Ok(())
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        tokio_rustls::TlsAcceptor::from(config)
    }
}

fn tls_server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, HttpError> {
    let failed = |file: &std::path::Path, message: String| HttpError::Tls {
        file: file.display().to_string(),
        message,
    };
    // Read as small regular files first: a FIFO or /dev/zero must not hang
    // or exhaust lockjam.
    let read = |file: &std::path::Path| crate::config::read_small_file(file).map_err(|message| failed(file, message));
    let certs = CertificateDer::pem_slice_iter(read(&files.cert_file)?.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(&files.cert_file, format!("{e}; it must hold PEM certificates")))?;
    if certs.is_empty() {
        return Err(failed(&files.cert_file, "no PEM certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(read(&files.key_file)?.as_bytes())
        .map_err(|e| failed(&files.key_file, format!("{e}; it must hold a PEM private key")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| failed(&files.cert_file, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| failed(&files.key_file, format!("{e}; does the key belong to the certificate?")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Bounds on HTTP clients, so that idle, slow or too many connections
/// cannot starve a scrape of file descriptors or memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionLimits {
    /// How long a client has, from connecting (TLS handshake included) or
    /// from the end of its previous response, to send a complete request
    /// head. Idle keep-alive connections and slowloris clients alike are
    /// closed after it.
    pub header_timeout: Duration,
    /// Open connections at most. At the cap, the oldest connection is
    /// closed (after its response in flight, if any) to admit the new one,
    /// so a fresh scrape is always answered.
    pub max_connections: usize,
}

/// Grace for an evicted or shut-down connection to finish its response.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves the routes on `listener`, over HTTPS when `tls` is given, until
/// `shutdown` completes; responses in flight then get [`CLOSE_GRACE`] to
/// finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<SharedState>,
    tls: Option<TlsReloader>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = router(state);
    let open = Arc::new(OpenConnections::default());
    let mut next_id: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than
                    // spin, and close the oldest connection to free one.
                    tracing::warn!("cannot accept an HTTP connection: {e}");
                    open.evict_oldest();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        next_id += 1;
        let id = next_id;
        let close = open.admit(id, limits.max_connections);
        let app = app.clone();
        let tls = tls.as_ref().map(TlsReloader::acceptor);
        let open = open.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            match tls {
                None => serve_connection(stream, app, limits, close).await,
                Some(acceptor) => match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => serve_connection(stream, app, limits, close).await,
                    Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!("TLS handshake not finished within the header timeout"),
                },
            }
            open.remove(id);
        });
    }
    open.close_all();
    let deadline = Instant::now() + CLOSE_GRACE;
    while !open.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn serve_connection<I>(io: I, app: Router, limits: ConnectionLimits, mut close: watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(
            hyper_util::rt::TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(app),
        );
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!("HTTP connection ended: {e}");
            }
            return;
        }
        _ = close.wait_for(|closing| *closing) => connection.as_mut().graceful_shutdown(),
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
}

/// The open connections by age, each with the switch that closes it.
#[derive(Default)]
struct OpenConnections(std::sync::Mutex<std::collections::BTreeMap<u64, watch::Sender<bool>>>);

impl OpenConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, watch::Sender<bool>>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers connection `id`, first closing the oldest ones that are
    /// not yet closing while `max` or more are open.
    fn admit(&self, id: u64, max: usize) -> watch::Receiver<bool> {
        let mut open = self.lock();
        let mut live = open.values().filter(|close| !*close.borrow()).count();
        for close in open.values() {
            if live < max {
                break;
            }
            if !*close.borrow() {
                close.send_replace(true);
                live -= 1;
            }
        }
        let (close, closed) = watch::channel(false);
        open.insert(id, close);
        closed
    }

    fn evict_oldest(&self) {
        if let Some(close) = self.lock().values().find(|close| !*close.borrow()) {
            close.send_replace(true);
        }
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn close_all(&self) {
        for close in self.lock().values() {
            close.send_replace(true);
        }
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

async fn require_auth(State(state): State<Arc<SharedState>>, request: Request, next: Next) -> Response {
    let auth = state.auth();
    if !auth.is_required() || authorized(&auth, request.headers()) {
        return next.run(request).await;
    }
    let challenge = if auth.basic.is_some() {
        "Basic realm=\"lockjam\", charset=\"UTF-8\""
    } else {
        "Bearer realm=\"lockjam\""
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, challenge)],
        "unauthorized: lockjam's /metrics and /api/* need the credentials of its [server] configuration\n",
    )
        .into_response()
}

/// Whether the request carries the configured basic credentials or bearer
/// token. Secrets are compared by their SHA-256 digests in constant time,
/// so that neither a secret's content nor its length shows in timing.
fn authorized(auth: &HttpAuth, headers: &HeaderMap) -> bool {
    let Some((scheme, credentials)) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().split_once(' '))
    else {
        return false;
    };
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return auth
            .bearer_token
            .as_ref()
            .is_some_and(|token| secrets_equal(credentials, &token.secret.0));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let Some(basic) = &auth.basic else {
            return false;
        };
        let Some(decoded) = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
        else {
            return false;
        };
        let (user, password) = decoded.split_once(':').unwrap_or((&decoded, ""));
        // Both comparisons run whichever fails, so that timing does not
        // tell a right user name from a wrong one.
        let user_ok = secrets_equal(user, &basic.user);
        let password_ok = secrets_equal(password, &basic.password.secret.0);
        return user_ok & password_ok;
    }
    false
}

fn secrets_equal(presented: &str, expected: &str) -> bool {
    let digest = |text: &str| ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest(presented).as_ref().ct_eq(digest(expected).as_ref()).into()
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
    let may_see_reasons = !auth.is_required() || authorized(&auth, &headers);
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
        "not found: lockjam serves /metrics, /healthz, /readyz, /api/v1/snapshot and /api/v1/events\n",
    )
        .into_response()
}

#[derive(Serialize)]
struct SnapshotView {
    targets: Vec<TargetView>,
}

#[derive(Serialize)]
struct TargetView {
    target: String,
    up: bool,
    server_version: Option<i32>,
    /// RFC 3339 time of the sample, by the server's clock.
    taken_at: Option<String>,
    error: Option<String>,
    warnings: Vec<String>,
    waiters: Vec<WaiterView>,
    blockers: Vec<BlockerView>,
    queues: Vec<QueueView>,
}

#[derive(Serialize)]
struct SessionView {
    pid: i32,
    datname: Option<String>,
    usename: Option<String>,
    application_name: Option<String>,
    client_addr: Option<String>,
    state: Option<String>,
    backend_type: Option<String>,
    wait_event_type: Option<String>,
    wait_event: Option<String>,
    transaction_age_seconds: Option<f64>,
    query: Option<String>,
}

#[derive(Serialize)]
struct BlockedByView {
    pid: i32,
    kind: &'static str,
}

#[derive(Serialize)]
struct WaiterView {
    #[serde(flatten)]
    session: SessionView,
    locktype: String,
    relation: Option<String>,
    mode: String,
    wait_seconds: f64,
    chain_depth: u32,
    blocked_by: Vec<BlockedByView>,
}

#[derive(Serialize)]
struct BlockerView {
    pid: i32,
    /// Absent for a prepared transaction (pid 0) or a session that ended.
    #[serde(flatten)]
    session: Option<SessionView>,
    root: bool,
    blocking: Vec<i32>,
}

#[derive(Serialize)]
struct QueueView {
    head_pid: i32,
    datname: String,
    relation: String,
    mode: String,
    depth: u64,
    head_wait_seconds: f64,
}

/// Query texts are cut to this many characters on the API.
const QUERY_CHARS: usize = 200;

fn age_seconds(taken_at: SystemTime, since: Option<SystemTime>) -> Option<f64> {
    since.map(|t| round_ms(taken_at.duration_since(t).unwrap_or_default()))
}

fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn session_view(session: &Session, taken_at: SystemTime) -> SessionView {
    SessionView {
        pid: session.pid,
        datname: session.datname.clone(),
        usename: session.usename.clone(),
        application_name: session.application_name.clone(),
        client_addr: session.client_addr.clone(),
        state: session.state.clone(),
        backend_type: session.backend_type.clone(),
        wait_event_type: session.wait_event_type.clone(),
        wait_event: session.wait_event.clone(),
        transaction_age_seconds: age_seconds(taken_at, session.xact_start),
        query: session.query.as_ref().map(|q| q.chars().take(QUERY_CHARS).collect()),
    }
}

fn waiter_view(waiter: &Waiter, taken_at: SystemTime) -> WaiterView {
    WaiterView {
        session: session_view(&waiter.session, taken_at),
        locktype: waiter.lock.locktype.clone(),
        relation: waiter.lock.relation.clone(),
        mode: waiter.lock.mode.clone(),
        wait_seconds: round_ms(waiter.wait),
        chain_depth: waiter.chain_depth,
        blocked_by: waiter
            .blocked_by
            .iter()
            .map(|b| BlockedByView {
                pid: b.pid,
                kind: b.kind.as_str(),
            })
            .collect(),
    }
}

fn blocker_view(blocker: &Blocker, taken_at: SystemTime) -> BlockerView {
    BlockerView {
        pid: blocker.pid,
        session: blocker.session.as_ref().map(|s| session_view(s, taken_at)),
        root: blocker.is_root,
        blocking: blocker.blocking.clone(),
    }
}

fn queue_view(queue: &Queue) -> QueueView {
    QueueView {
        head_pid: queue.head_pid,
        datname: queue.datname.clone(),
        relation: queue.relation.clone(),
        mode: queue.mode.clone(),
        depth: queue.depth,
        head_wait_seconds: round_ms(queue.head_wait),
    }
}

fn target_view(name: &str, status: crate::state::TargetStatus) -> TargetView {
    let up = status.up();
    let graph: Option<&LockGraph> = status.graph.as_deref();
    TargetView {
        target: name.to_string(),
        up,
        server_version: status.server_version,
        taken_at: graph.map(|g| humantime::format_rfc3339_millis(g.taken_at).to_string()),
        error: status.last_error.clone(),
        warnings: status.warnings.clone(),
        waiters: graph
            .map(|g| g.waiters.iter().map(|w| waiter_view(w, g.taken_at)).collect())
            .unwrap_or_default(),
        blockers: graph
            .map(|g| g.blockers.iter().map(|b| blocker_view(b, g.taken_at)).collect())
            .unwrap_or_default(),
        queues: graph
            .map(|g| g.queues.iter().map(queue_view).collect())
            .unwrap_or_default(),
    }
}

/// Policy decisions, newest first (the last 1000).
async fn events(State(state): State<Arc<SharedState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "events": state.events.newest_first() }))
}

async fn snapshot(State(state): State<Arc<SharedState>>) -> Json<serde_json::Value> {
    let view = SnapshotView {
        targets: state
            .targets()
            .iter()
            .map(|t| target_view(&t.name, t.status()))
            .collect(),
    };
    Json(serde_json::to_value(view).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BasicAuth, FileSecret, Secret};

    fn secret(text: &str) -> FileSecret {
        FileSecret {
            file: "/run/secrets/x".into(),
            secret: Secret(text.into()),
        }
    }

    fn with_header(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    fn basic(user_password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        )
    }

    #[test]
    fn credentials_are_checked_exactly() {
        let both = HttpAuth {
            basic: Some(BasicAuth {
                user: "prometheus".into(),
                password: secret("pass:word"),
            }),
            bearer_token: Some(secret("tok")),
        };
        let accepted = |auth: &HttpAuth, value: &str| authorized(auth, &with_header(value));
        assert!(
            accepted(&both, &basic("prometheus:pass:word")),
            "a password may hold ':'"
        );
        assert!(accepted(&both, "bearer tok"), "schemes are case-insensitive");
        assert!(accepted(&both, "Bearer  tok "));
        for refused in [
            basic("prometheus:pass:wor"),
            basic("prometheus:pass:word2"),
            basic("Prometheus:pass:word"),
            basic("prometheus"),
            basic(""),
            "Basic !!!not-base64".into(),
            "Bearer to".into(),
            "Bearer tokk".into(),
            "Bearer".into(),
            "Digest tok".into(),
            "tok".into(),
        ] {
            assert!(!accepted(&both, &refused), "{refused}");
        }
        assert!(!authorized(&both, &HeaderMap::new()));
        let token_only = HttpAuth {
            basic: None,
            bearer_token: Some(secret("tok")),
        };
        assert!(!accepted(&token_only, &basic("prometheus:tok")));
        assert!(!HttpAuth::default().is_required());
    }
}
