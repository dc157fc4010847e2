//! The accept loop: plain or HTTPS, each connection bounded by a header
//! timeout, and a cap on open connections that pushes out the oldest.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use tokio::sync::watch;

use super::{router, TlsReloader};
use crate::state::SharedState;

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
