//! The JSON of `/api/v1/snapshot`: each target's last graph, ages in
//! seconds on the server's clock.

use std::time::SystemTime;

use serde::Serialize;

use crate::analysis::{Blocker, LockGraph, Queue, Waiter};
use crate::state::SharedState;
use crate::view::{seconds, SessionView};

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

fn waiter_view(waiter: &Waiter, taken_at: SystemTime) -> WaiterView {
    WaiterView {
        session: SessionView::of(waiter.session.pid, Some(&waiter.session), taken_at),
        locktype: waiter.lock.locktype.clone(),
        relation: waiter.lock.relation.clone(),
        mode: waiter.lock.mode.clone(),
        wait_seconds: seconds(waiter.wait),
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
        session: blocker
            .session
            .as_ref()
            .map(|s| SessionView::of(s.pid, Some(s), taken_at)),
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
        head_wait_seconds: seconds(queue.head_wait),
    }
}

fn target_view(name: &str, status: crate::state::LastSample) -> TargetView {
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
