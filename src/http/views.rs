//! The JSON of `/api/v1/snapshot`: each target's last graph, ages in
//! seconds on the server's clock.

use std::time::SystemTime;

use serde::Serialize;

use crate::analysis::{Blocker, LockGraph, Queue, Waiter};
use crate::policy::Policy;
use crate::state::{LastSample, SharedState};
use crate::tree::{self, Tree};
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
    /// The lock queues as trees, the largest first (see `tree`).
    trees: Vec<Tree>,
    /// Sessions by database and state, for the one-line summary of a calm
    /// target.
    sessions: u64,
    policy: PolicyView,
}

#[derive(Serialize)]
struct PolicyView {
    /// `off`, `dry run` or `live`.
    mode: &'static str,
    /// Whether this instance leads (holds the target's advisory lock);
    /// `null` with the policy off or the target down.
    leader: Option<bool>,
    /// Each rule in one line.
    rules: Vec<String>,
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

/// One target's view: its last sample, as trees too, and its policy.
fn target_view(name: &str, status: LastSample, policy: &Policy) -> TargetView {
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
        trees: graph.map(|g| tree::build(g, Some(policy))).unwrap_or_default(),
        sessions: graph.map_or(0, |g| g.activity.iter().map(|a| a.sessions).sum()),
        policy: PolicyView {
            mode: policy.mode(),
            leader: status.leader,
            rules: if policy.enabled {
                policy.rules.iter().map(|r| r.describe()).collect()
            } else {
                Vec::new()
            },
        },
    }
}

/// The JSON of `/api/v1/snapshot` for targets given by name, last sample
/// and policy: what `lockjam tree --json` prints too.
pub fn snapshot_of<'a>(targets: impl Iterator<Item = (&'a str, LastSample, &'a Policy)>) -> serde_json::Value {
    let view = SnapshotView {
        targets: targets
            .map(|(name, status, policy)| target_view(name, status, policy))
            .collect(),
    };
    serde_json::to_value(view).unwrap_or_default()
}

/// Every target's view, as `/api/v1/snapshot` answers.
pub(super) fn snapshot(state: &SharedState) -> serde_json::Value {
    let targets = state.targets();
    snapshot_of(targets.iter().map(|t| (t.name.as_str(), t.status(), t.policy.as_ref())))
}
