//! The JSON of `/api/v1/snapshot`: each target's last graph, ages in
//! seconds on the server's clock.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::analysis::{Blocker, LockGraph, Queue, Waiter};
use crate::snapshot::Session;
use crate::state::SharedState;

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

/// Every target's view, as `/api/v1/snapshot` answers.
pub(super) fn snapshot(state: &SharedState) -> serde_json::Value {
    let view = SnapshotView {
        targets: state
            .targets()
            .iter()
            .map(|t| target_view(&t.name, t.status()))
            .collect(),
    };
    serde_json::to_value(view).unwrap_or_default()
}
