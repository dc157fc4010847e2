//! State shared between the target tasks (writers) and HTTP (reader): the
//! metrics registry, each target's last graph and health, the audit
//! events, and the credentials HTTP asks for. A configuration reload
//! replaces the targets and credentials; metrics and events carry over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::analysis::LockGraph;
use crate::audit::EventLog;
use crate::config::HttpAuth;
use crate::incidents::store::Store;
use crate::incidents::Tracker;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::preflight::Preflight;
use crate::sampler::ServerIdentity;

pub struct SharedState {
    pub metrics: Metrics,
    pub events: EventLog,
    /// Closed incidents.
    pub incidents: Arc<Store>,
    /// Each target's open incidents while its task is not running (a
    /// reload restarts the tasks; an incident open across it stays one).
    trackers: Mutex<HashMap<String, Tracker>>,
    targets: RwLock<Vec<Arc<TargetRecord>>>,
    auth: RwLock<Arc<HttpAuth>>,
    /// The server each target last reached, to refuse a second target on
    /// the same server that was down when lockjam started.
    servers: Mutex<HashMap<String, ServerIdentity>>,
}

/// One target as HTTP sees it: its name, cadence and last sample.
pub struct TargetRecord {
    pub name: String,
    /// The calm sampling interval: readiness allows three of them.
    pub interval: Duration,
    /// The policy this target's task runs (off when disabled).
    pub policy: Arc<Policy>,
    /// Asks `/api/v1/preflight`'s questions, on a session of its own.
    pub preflight: Option<Arc<Preflight>>,
    status: RwLock<LastSample>,
}

/// What the last sample of a target left: its graph, or its error.
#[derive(Debug, Clone, Default)]
pub struct LastSample {
    pub last_good: Option<Instant>,
    pub graph: Option<Arc<LockGraph>>,
    /// Why the last sample failed, while the target is down.
    pub last_error: Option<String>,
    pub server_version: Option<i32>,
    /// What keeps the figures from being complete (a missing grant).
    pub warnings: Vec<String>,
    /// Whether this instance leads the target's policy, as of the last
    /// sample; `None` with the policy off.
    pub leader: Option<bool>,
}

impl LastSample {
    pub fn up(&self) -> bool {
        self.last_good.is_some() && self.last_error.is_none()
    }
}

impl TargetRecord {
    pub fn new(name: &str, interval: Duration, policy: Arc<Policy>, preflight: Option<Preflight>) -> TargetRecord {
        TargetRecord {
            name: name.to_string(),
            interval,
            policy,
            preflight: preflight.map(Arc::new),
            status: RwLock::new(LastSample::default()),
        }
    }

    pub fn status(&self) -> LastSample {
        self.status.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn record_success(
        &self,
        graph: Arc<LockGraph>,
        server_version: Option<i32>,
        warnings: &[String],
        at: Instant,
    ) {
        let mut status = self.status.write().unwrap_or_else(|p| p.into_inner());
        status.last_good = Some(at);
        status.graph = Some(graph);
        status.last_error = None;
        status.server_version = server_version;
        status.warnings = warnings.to_vec();
    }

    pub(crate) fn record_leader(&self, leader: Option<bool>) {
        self.status.write().unwrap_or_else(|p| p.into_inner()).leader = leader;
    }

    /// A failed sample: the graph is dropped so that nothing downstream
    /// acts on, or shows, what is no longer known.
    pub(crate) fn record_failure(&self, error: String) {
        let mut status = self.status.write().unwrap_or_else(|p| p.into_inner());
        status.graph = None;
        status.last_error = Some(error);
        status.leader = None;
    }

    /// Why the target is not ready, or `None` when it is: a good sample
    /// within the last three intervals.
    pub(crate) fn not_ready_reason(&self, now: Instant) -> Option<String> {
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
    pub fn new(targets: Vec<TargetRecord>, auth: HttpAuth, incidents: Store) -> SharedState {
        let state = SharedState {
            metrics: Metrics::new(),
            events: EventLog::default(),
            incidents: Arc::new(incidents),
            trackers: Mutex::new(HashMap::new()),
            targets: RwLock::new(Vec::new()),
            auth: RwLock::new(Arc::new(auth)),
            servers: Mutex::new(HashMap::new()),
        };
        state.replace_targets(targets);
        state
    }

    /// The tracker a target's task left behind, if any.
    pub(crate) fn take_tracker(&self, target: &str) -> Option<Tracker> {
        self.trackers.lock().unwrap_or_else(|p| p.into_inner()).remove(target)
    }

    /// Keeps a stopping task's tracker for the next task of that target.
    pub(crate) fn keep_tracker(&self, target: &str, tracker: Tracker) {
        self.trackers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(target.to_string(), tracker);
    }

    pub fn targets(&self) -> Vec<Arc<TargetRecord>> {
        self.targets.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn target(&self, name: &str) -> Option<Arc<TargetRecord>> {
        self.targets().into_iter().find(|t| t.name == name)
    }

    /// Replaces every target: the old ones' series go (a reload starts
    /// each target afresh, as a restart would), the new ones are declared.
    pub(crate) fn replace_targets(&self, targets: Vec<TargetRecord>) {
        let mut current = self.targets.write().unwrap_or_else(|p| p.into_inner());
        for old in current.iter() {
            self.metrics.forget_target(&old.name);
        }
        for target in &targets {
            self.metrics.register_target(&target.name);
        }
        self.servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| targets.iter().any(|t| &t.name == name));
        *current = targets.into_iter().map(Arc::new).collect();
    }

    /// Records that `target` reached the server `identity`; returns the
    /// other target that reached it first, if one did.
    pub(crate) fn claim_server(&self, target: &str, identity: &ServerIdentity) -> Option<String> {
        let mut servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        let other = servers
            .iter()
            .find(|(name, known)| name.as_str() != target && known.same_server(identity))
            .map(|(name, _)| name.clone());
        if other.is_none() {
            servers.insert(target.to_string(), identity.clone());
        } else {
            servers.remove(target);
        }
        other
    }

    pub fn auth(&self) -> Arc<HttpAuth> {
        self.auth.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_auth(&self, auth: HttpAuth) {
        *self.auth.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(auth);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(started: &str) -> ServerIdentity {
        ServerIdentity {
            system_identifier: Some(7),
            started: started.into(),
            data_directory: Some("/data".into()),
        }
    }

    #[test]
    fn a_second_target_on_a_claimed_server_is_named_and_refused() {
        let state = SharedState::new(
            vec![
                TargetRecord::new("a", Duration::from_secs(1), Arc::default(), None),
                TargetRecord::new("b", Duration::from_secs(1), Arc::default(), None),
            ],
            HttpAuth::default(),
            Store::open(
                None,
                crate::incidents::store::Retention {
                    keep_days: 1,
                    keep_count: 10,
                },
            ),
        );
        assert_eq!(state.claim_server("a", &server("t1")), None);
        assert_eq!(
            state.claim_server("a", &server("t1")),
            None,
            "claiming again is no conflict"
        );
        assert_eq!(state.claim_server("b", &server("t1")), Some("a".into()));
        // A standby or a copy: same system identifier, another postmaster.
        assert_eq!(state.claim_server("b", &server("t2")), None);
        // A role that may not read the data directory still matches.
        let partial = ServerIdentity {
            data_directory: None,
            ..server("t2")
        };
        assert_eq!(state.claim_server("c", &partial), Some("b".into()));
        // Reloaded without `a`: its claim goes with it.
        state.replace_targets(vec![TargetRecord::new(
            "b",
            Duration::from_secs(1),
            Arc::default(),
            None,
        )]);
        assert_eq!(state.claim_server("c", &server("t1")), None);
    }
}
