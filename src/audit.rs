//! Audit events: every policy decision becomes one WARN log line and one
//! entry of `/api/v1/events` (the last [`EVENT_CAPACITY`], newest first).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::policy::{Decision, Outcome};
use crate::snapshot::Session;

pub const EVENT_CAPACITY: usize = 1000;
/// Characters of query text an event keeps.
const QUERY_CHARS: usize = 200;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SessionEvent {
    pub pid: i32,
    pub datname: Option<String>,
    pub usename: Option<String>,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub backend_type: Option<String>,
    pub state: Option<String>,
    pub transaction_age_seconds: Option<f64>,
    pub query: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WaiterEvent {
    #[serde(flatten)]
    pub session: SessionEvent,
    pub relation: String,
    pub mode: String,
    pub wait_seconds: f64,
    /// Sessions queued behind the waiter.
    pub behind: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditEvent {
    /// RFC 3339, by the database server's clock.
    pub time: String,
    pub target: String,
    pub rule: String,
    /// The signal: `cancel` or `terminate`.
    pub action: &'static str,
    pub outcome: &'static str,
    pub reason: String,
    /// What the database said, for `permission_denied` and `error`.
    pub detail: Option<String>,
    pub waiter: WaiterEvent,
    /// The session signalled (the waiter itself for `cancel_waiter`).
    pub blocker: SessionEvent,
}

fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn session_event(pid: i32, session: Option<&Session>, now: SystemTime) -> SessionEvent {
    SessionEvent {
        pid,
        datname: session.and_then(|s| s.datname.clone()),
        usename: session.and_then(|s| s.usename.clone()),
        application_name: session.and_then(|s| s.application_name.clone()),
        client_addr: session.and_then(|s| s.client_addr.clone()),
        backend_type: session.and_then(|s| s.backend_type.clone()),
        state: session.and_then(|s| s.state.clone()),
        transaction_age_seconds: session
            .and_then(|s| s.xact_start)
            .map(|t| seconds(now.duration_since(t).unwrap_or_default())),
        query: session
            .and_then(|s| s.query.as_ref())
            .map(|q| q.chars().take(QUERY_CHARS).collect()),
    }
}

/// The event of one decision and what became of it.
pub fn event(
    target: &str,
    decision: &Decision,
    outcome: Outcome,
    detail: Option<String>,
    now: SystemTime,
) -> AuditEvent {
    let waiter = &decision.waiter;
    AuditEvent {
        time: humantime::format_rfc3339_millis(now).to_string(),
        target: target.to_string(),
        rule: decision.rule.clone(),
        action: decision.signal.as_str(),
        outcome: outcome.as_str(),
        reason: decision.reason.clone(),
        detail,
        waiter: WaiterEvent {
            session: session_event(waiter.session.pid, Some(&waiter.session), now),
            relation: waiter.lock.relation_label(),
            mode: waiter.lock.mode.clone(),
            wait_seconds: seconds(waiter.wait),
            behind: waiter.behind,
        },
        blocker: session_event(decision.target.pid, decision.target_session.as_ref(), now),
    }
}

/// Writes the event as one structured WARN line.
pub fn log(event: &AuditEvent) {
    let (w, b) = (&event.waiter, &event.blocker);
    tracing::warn!(
        target: "lockjam::audit",
        target_name = %event.target,
        rule = %event.rule,
        action = event.action,
        outcome = event.outcome,
        reason = %event.reason,
        detail = event.detail.as_deref().unwrap_or(""),
        waiter_pid = w.session.pid,
        waiter_usename = w.session.usename.as_deref().unwrap_or(""),
        waiter_application_name = w.session.application_name.as_deref().unwrap_or(""),
        waiter_client_addr = w.session.client_addr.as_deref().unwrap_or(""),
        waiter_state = w.session.state.as_deref().unwrap_or(""),
        waiter_relation = %w.relation,
        waiter_mode = %w.mode,
        waiter_wait_seconds = w.wait_seconds,
        waiter_transaction_age_seconds = w.session.transaction_age_seconds.unwrap_or(0.0),
        waiter_query = w.session.query.as_deref().unwrap_or(""),
        blocker_pid = b.pid,
        blocker_usename = b.usename.as_deref().unwrap_or(""),
        blocker_application_name = b.application_name.as_deref().unwrap_or(""),
        blocker_client_addr = b.client_addr.as_deref().unwrap_or(""),
        blocker_state = b.state.as_deref().unwrap_or(""),
        blocker_transaction_age_seconds = b.transaction_age_seconds.unwrap_or(0.0),
        blocker_query = b.query.as_deref().unwrap_or(""),
        "policy {} {} of pid {} for waiter pid {}: {}",
        event.action,
        event.outcome,
        b.pid,
        w.session.pid,
        event.reason
    );
}

/// The last events, shared with HTTP.
#[derive(Default)]
pub struct EventLog {
    events: Mutex<VecDeque<AuditEvent>>,
}

impl EventLog {
    pub fn push(&self, event: AuditEvent) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() == EVENT_CAPACITY {
            events.pop_back();
        }
        events.push_front(event);
    }

    pub fn newest_first(&self) -> Vec<AuditEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{WaitedLock, Waiter};
    use crate::policy::{Decision, Identity, Signal};

    fn decision(pid: i32) -> Decision {
        let session = Session {
            pid,
            query: Some("x".repeat(500)),
            ..Session::default()
        };
        Decision {
            rule: "r".into(),
            signal: Signal::Cancel,
            target: Identity::of(&session),
            target_session: Some(session.clone()),
            waiter: Waiter {
                session,
                lock: WaitedLock {
                    locktype: "relation".into(),
                    mode: "AccessExclusiveLock".into(),
                    tag: "t".into(),
                    relation: Some("public.t".into()),
                },
                wait_start: None,
                wait: Duration::from_millis(2500),
                blocked_by: Vec::new(),
                chain_depth: 1,
                leads_to_root: true,
                behind: 3,
            },
            verdict: None,
            reason: "because".into(),
        }
    }

    #[test]
    fn keeps_the_last_thousand_newest_first_with_queries_cut() {
        let log = EventLog::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for pid in 0..1005 {
            log.push(event("main", &decision(pid), Outcome::Success, None, now));
        }
        let events = log.newest_first();
        assert_eq!(events.len(), EVENT_CAPACITY);
        assert_eq!((events[0].blocker.pid, events[999].blocker.pid), (1004, 5));
        assert_eq!(events[0].blocker.query.as_ref().unwrap().chars().count(), 200);
        assert_eq!(events[0].waiter.wait_seconds, 2.5);
        assert_eq!((events[0].action, events[0].outcome), ("cancel", "success"));
        assert_eq!(events[0].time, "2023-11-14T22:13:20.000Z");
    }
}
