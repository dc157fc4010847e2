//! State shared between the target tasks (writers) and HTTP (reader): the
//! metrics registry and each target's last graph and health.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::analysis::LockGraph;
use crate::audit::EventLog;
use crate::metrics::Metrics;

pub struct SharedState {
    pub metrics: Metrics,
    pub targets: Vec<TargetState>,
    pub events: EventLog,
}

pub struct TargetState {
    pub name: String,
    /// The calm sampling interval: readiness allows three of them.
    pub interval: Duration,
    status: RwLock<TargetStatus>,
}

#[derive(Debug, Clone, Default)]
pub struct TargetStatus {
    pub last_good: Option<Instant>,
    pub graph: Option<Arc<LockGraph>>,
    /// Why the last sample failed, while the target is down.
    pub last_error: Option<String>,
    pub server_version: Option<i32>,
    /// What keeps the figures from being complete (a missing grant).
    pub warnings: Vec<String>,
}

impl TargetStatus {
    pub fn up(&self) -> bool {
        self.last_good.is_some() && self.last_error.is_none()
    }
}

impl TargetState {
    pub fn new(name: &str, interval: Duration) -> TargetState {
        TargetState {
            name: name.to_string(),
            interval,
            status: RwLock::new(TargetStatus::default()),
        }
    }

    pub fn status(&self) -> TargetStatus {
        self.status.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn record_success(&self, graph: Arc<LockGraph>, server_version: Option<i32>, warnings: &[String], at: Instant) {
        let mut status = self.status.write().unwrap_or_else(|p| p.into_inner());
        status.last_good = Some(at);
        status.graph = Some(graph);
        status.last_error = None;
        status.server_version = server_version;
        status.warnings = warnings.to_vec();
    }

    /// A failed sample: the graph is dropped so that nothing downstream
    /// acts on, or shows, what is no longer known.
    pub fn record_failure(&self, error: String) {
        let mut status = self.status.write().unwrap_or_else(|p| p.into_inner());
        status.graph = None;
        status.last_error = Some(error);
    }

    /// Why the target is not ready, or `None` when it is: a good sample
    /// within the last three intervals.
    pub fn not_ready_reason(&self, now: Instant) -> Option<String> {
        let status = self.status();
        let limit = self.interval * 3;
        match status.last_good {
            None => Some(match &status.last_error {
                Some(error) => format!("no successful sample yet; last error: {error}"),
                None => "no sample yet".to_string(),
            }),
            Some(at) if now.duration_since(at) > limit => Some(format!(
                "last successful sample {:.1}s ago (limit {:.1}s){}",
                now.duration_since(at).as_secs_f64(),
                limit.as_secs_f64(),
                status
                    .last_error
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            )),
            Some(_) => None,
        }
    }
}

impl SharedState {
    pub fn new(targets: Vec<TargetState>) -> SharedState {
        let metrics = Metrics::new();
        for target in &targets {
            metrics.register_target(&target.name);
        }
        SharedState {
            metrics,
            targets,
            events: EventLog::default(),
        }
    }

    pub fn target(&self, name: &str) -> Option<&TargetState> {
        self.targets.iter().find(|t| t.name == name)
    }
}
