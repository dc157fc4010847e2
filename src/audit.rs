//! Audit events: every policy decision becomes one WARN log line and one
//! entry of `/api/v1/events` (the last [`EVENT_CAPACITY`], newest first).
//! An event names the waiter, the root blockers of its wait tree (with
//! the lock each holds and what each waits on, if anything), the session
//! signalled, the signal and what became of it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::analysis::{Blocker, Lock};
use crate::policy::{Action, Decision, Outcome};
use crate::view::{rfc3339, seconds, SessionView};

pub(crate) const EVENT_CAPACITY: usize = 1000;
/// Characters of query text the log line keeps.
const LOG_QUERY_CHARS: usize = 60;

/// A lock held, as the event shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HeldLock {
    pub locktype: String,
    /// As in metric labels: `public.orders`, or `(transactionid)`.
    pub relation: String,
    pub mode: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BlockerEvent {
    #[serde(flatten)]
    pub session: SessionView,
    /// The lock it holds against the waiter: on the object the waiter asks
    /// for, else on the same relation, else on what the session it
    /// blocks directly waits for.
    pub holds: Option<HeldLock>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WaiterEvent {
    #[serde(flatten)]
    pub session: SessionView,
    pub locktype: String,
    pub relation: String,
    pub mode: String,
    pub wait_seconds: f64,
    /// Sessions queued behind the waiter.
    pub behind: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditEvent {
    /// RFC 3339, by the database server's clock: when the signalling
    /// statement ran, or when the policy decided, for outcomes known
    /// without the database (`dry_run`, `protected`, `rate_limited`).
    pub time: String,
    /// RFC 3339, server clock: when the sample the decision was made on
    /// was taken.
    pub sampled_at: String,
    pub target: String,
    pub rule: String,
    /// The rule's action: `cancel_blockers` or `cancel_waiter`.
    pub rule_action: &'static str,
    /// The signal: `cancel` or `terminate` (`action` in the JSON and the
    /// metric label, as before the word meant the rule's).
    #[serde(rename = "action")]
    pub signal: &'static str,
    pub outcome: &'static str,
    pub reason: String,
    /// What the database said, for `permission_denied` and `error`.
    pub detail: Option<String>,
    /// The session the signal is for: a root blocker, or the waiter for
    /// `cancel_waiter`.
    pub signalled_pid: i32,
    pub waiter: WaiterEvent,
    /// For `cancel_blockers`, the root blocker signalled; for
    /// `cancel_waiter`, the (first) root blocker the waiter waited on.
    pub blocker: Option<BlockerEvent>,
    /// Every root blocker of the waiter's wait tree.
    pub roots: Vec<BlockerEvent>,
}

fn blocker_event(blocker: &Blocker, waited_for: &Lock, now: SystemTime) -> BlockerEvent {
    BlockerEvent {
        session: SessionView::of(blocker.pid, blocker.session.as_ref(), now),
        holds: blocker.lock_held_against(waited_for).map(|lock| HeldLock {
            locktype: lock.locktype.clone(),
            relation: lock.relation_label(),
            mode: lock.mode.clone(),
        }),
    }
}

/// The event of one decision and what became of it; `now` is the time of
/// the event on the server's clock.
pub fn event(
    target: &str,
    decision: &Decision,
    outcome: Outcome,
    detail: Option<String>,
    now: SystemTime,
) -> AuditEvent {
    let waiter = &decision.waiter;
    let roots: Vec<BlockerEvent> = decision
        .roots
        .iter()
        .map(|root| blocker_event(root, &waiter.lock, now))
        .collect();
    let blocker = match decision.action {
        Action::CancelBlockers => Some(
            roots
                .iter()
                .find(|root| root.session.pid == decision.signalled.pid)
                .cloned()
                .unwrap_or_else(|| BlockerEvent {
                    session: SessionView::of(decision.signalled.pid, decision.signalled_session.as_ref(), now),
                    holds: None,
                }),
        ),
        Action::CancelWaiter => roots.first().cloned(),
    };
    AuditEvent {
        time: rfc3339(now),
        sampled_at: rfc3339(decision.sampled_at),
        target: target.to_string(),
        rule: decision.rule.clone(),
        rule_action: decision.action.as_str(),
        signal: decision.signal.as_str(),
        outcome: outcome.as_str(),
        reason: decision.reason.clone(),
        detail,
        signalled_pid: decision.signalled.pid,
        waiter: WaiterEvent {
            session: SessionView::of(waiter.session.pid, Some(&waiter.session), now),
            locktype: waiter.lock.locktype.clone(),
            relation: waiter.lock.relation_label(),
            mode: waiter.lock.mode.clone(),
            wait_seconds: seconds(waiter.wait),
            behind: waiter.behind,
        },
        blocker,
        roots,
    }
}

/// Whether a character could break a log line or disguise it: control
/// characters, line and paragraph separators, and bidirectional overrides.
fn unsafe_in_a_line(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Text from the database (names, states) for a log line: what could break
/// the line or disguise it is escaped, so that a table or role named with a
/// newline cannot forge a second line.
pub(crate) fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if unsafe_in_a_line(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A query for the log line: on one line, cut.
fn short_query(query: Option<&str>) -> String {
    let query = query.unwrap_or("").trim();
    let mut short: String = query
        .chars()
        .take(LOG_QUERY_CHARS)
        .map(|c| if unsafe_in_a_line(c) { ' ' } else { c })
        .collect();
    if query.chars().count() > LOG_QUERY_CHARS {
        short.push('…');
    }
    format!("{short:?}")
}

/// `analyst/psql, active, wait Client:ClientWrite, transaction 95.3s`.
fn describe(session: &SessionView) -> String {
    let mut parts = vec![format!(
        "{}/{}",
        session.usename.as_deref().unwrap_or("?"),
        session.application_name.as_deref().unwrap_or("")
    )];
    if let Some(state) = &session.state {
        parts.push(state.clone());
    }
    if let (Some(kind), Some(event)) = (&session.wait_event_type, &session.wait_event) {
        parts.push(format!("wait {kind}:{event}"));
    }
    if let Some(age) = session.transaction_age_seconds {
        parts.push(format!("transaction {age:.1}s"));
    }
    parts.join(", ")
}

fn describe_blocker(blocker: &BlockerEvent) -> String {
    let holds = blocker
        .holds
        .as_ref()
        .map(|h| format!(", holds {} on {}", h.mode, h.relation))
        .unwrap_or_default();
    format!(
        "pid {} ({}{holds}) {}",
        blocker.session.pid,
        describe(&blocker.session),
        short_query(blocker.session.query.as_deref())
    )
}

impl AuditEvent {
    /// The event in one line of words: what was (or would be) sent to
    /// whom, on behalf of which waiter, and why.
    pub fn summary(&self) -> String {
        let signal = self.signal;
        let pid = self.signalled_pid;
        let what = match self.outcome {
            "success" if signal == "terminate" => format!("terminated pid {pid}"),
            "success" => format!("cancelled pid {pid}"),
            "dry_run" => format!("dry run: would {signal} pid {pid}"),
            "protected" => format!("will not {signal} pid {pid}"),
            "rate_limited" => format!("rate limited: did not {signal} pid {pid}"),
            "gone" => format!("did not {signal} pid {pid}: it ended, or began another transaction"),
            "not_blocking" => format!("did not {signal} pid {pid}: it no longer blocks the waiter"),
            _ => format!("could not {signal} pid {pid}"),
        };
        let w = &self.waiter;
        let waiter = format!(
            "waiter pid {} ({}) waiting {:.1}s for {} on {}, {} behind, {}",
            w.session.pid,
            describe(&w.session),
            w.wait_seconds,
            w.mode,
            w.relation,
            w.behind,
            short_query(w.session.query.as_deref())
        );
        let detail = self.detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default();
        let blocker = self.blocker.as_ref().map(describe_blocker).unwrap_or_default();
        match self.rule_action {
            "cancel_waiter" => format!(
                "rule {}: {what}, the {waiter}, behind root {blocker}: {}{detail}",
                self.rule, self.reason
            ),
            _ => format!(
                "rule {}: {what}, root {blocker}, for {waiter}: {}{detail}",
                self.rule, self.reason
            ),
        }
    }
}

/// Writes the event as one WARN line: the summary, and the fields a log
/// pipeline filters on.
pub fn log(event: &AuditEvent) {
    tracing::warn!(
        target: "lockjam::audit",
        target_name = %event.target,
        rule = %event.rule,
        action = event.signal,
        outcome = event.outcome,
        pid = event.signalled_pid,
        waiter_pid = event.waiter.session.pid,
        "{}",
        one_line(&event.summary())
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
    use crate::analysis::{Lock, Waiter};
    use crate::policy::{Decision, Identity, Signal};
    use crate::snapshot::Session;
    use std::time::Duration;

    const T: u64 = 1_700_000_000;

    fn at(seconds: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(T as f64 + seconds)
    }

    fn relation_lock(mode: &str) -> Lock {
        Lock {
            locktype: "relation".into(),
            mode: mode.into(),
            tag: "relation:1:2".into(),
            relation: Some("public.orders".into()),
        }
    }

    fn decision(pid: i32, action: Action) -> Decision {
        let root_session = Session {
            pid,
            usename: Some("analyst".into()),
            application_name: Some("psql".into()),
            state: Some("active".into()),
            wait_event_type: Some("Client".into()),
            wait_event: Some("ClientWrite".into()),
            backend_start: Some(at(0.0)),
            xact_start: Some(at(4.7)),
            query: Some(format!("SELECT\n{}", "x".repeat(500))),
            ..Session::default()
        };
        let waiter = Session {
            pid: 4242,
            usename: Some("deploy".into()),
            application_name: Some("migrate".into()),
            state: Some("active".into()),
            wait_event_type: Some("Lock".into()),
            wait_event: Some("relation".into()),
            xact_start: Some(at(97.5)),
            query: Some("ALTER TABLE orders DROP CONSTRAINT orders_customer_id_fkey".into()),
            ..Session::default()
        };
        let root = Blocker {
            pid,
            session: Some(root_session.clone()),
            datname: "app".into(),
            is_root: true,
            blocking: vec![4242],
            transaction_age: None,
            held: vec![relation_lock("AccessShareLock")],
        };
        Decision {
            rule: "r".into(),
            action,
            signal: Signal::Cancel,
            signalled: match action {
                Action::CancelBlockers => Identity::of(&root_session),
                Action::CancelWaiter => Identity::of(&waiter),
            },
            signalled_session: Some(match action {
                Action::CancelBlockers => root_session,
                Action::CancelWaiter => waiter.clone(),
            }),
            waiter: Waiter {
                session: waiter,
                lock: relation_lock("AccessExclusiveLock"),
                wait_start: None,
                wait: Duration::from_millis(2500),
                blocked_by: Vec::new(),
                chain_depth: 1,
                leads_to_root: true,
                behind: 3,
            },
            roots: vec![root],
            sampled_at: at(99.9),
            in_recovery: false,
            verdict: crate::policy::Verdict::Send,
            reason: "the waiter has waited 2.5s (min_wait 2s)".into(),
        }
    }

    #[test]
    fn keeps_the_last_thousand_newest_first() {
        let log = EventLog::default();
        for pid in 0..1005 {
            log.push(event(
                "main",
                &decision(pid, Action::CancelBlockers),
                Outcome::Success,
                None,
                at(100.0),
            ));
        }
        let events = log.newest_first();
        assert_eq!(events.len(), EVENT_CAPACITY);
        assert_eq!((events[0].signalled_pid, events[999].signalled_pid), (1004, 5));
        let blocker = events[0].blocker.as_ref().unwrap();
        // Query texts arrive cut by the sampler's SQL; the event keeps
        // what it was given.
        assert_eq!(blocker.session.query.as_ref().unwrap().chars().count(), 507);
        assert_eq!(events[0].waiter.wait_seconds, 2.5);
        assert_eq!((events[0].signal, events[0].outcome), ("cancel", "success"));
        assert_eq!(events[0].time, "2023-11-14T22:15:00.000Z");
        assert_eq!(
            blocker.session.backend_start.as_deref(),
            Some("2023-11-14T22:13:20.000Z")
        );
        assert_eq!(blocker.session.transaction_age_seconds, Some(95.3));
    }

    #[test]
    fn events_name_the_roots_their_locks_and_the_session_signalled() {
        let blockers = event(
            "main",
            &decision(4240, Action::CancelBlockers),
            Outcome::Success,
            None,
            at(100.0),
        );
        let root = blockers.blocker.as_ref().unwrap();
        assert_eq!(
            (blockers.rule_action, blockers.signalled_pid),
            ("cancel_blockers", 4240)
        );
        assert_eq!(root.session.pid, 4240);
        assert_eq!(
            root.holds,
            Some(HeldLock {
                locktype: "relation".into(),
                relation: "public.orders".into(),
                mode: "AccessShareLock".into()
            })
        );
        assert_eq!(root.session.wait_event.as_deref(), Some("ClientWrite"));
        assert_eq!(blockers.roots, vec![root.clone()]);

        let waiter = event(
            "main",
            &decision(4240, Action::CancelWaiter),
            Outcome::Success,
            None,
            at(100.0),
        );
        assert_eq!((waiter.rule_action, waiter.signalled_pid), ("cancel_waiter", 4242));
        assert_eq!(
            waiter.blocker.as_ref().map(|b| b.session.pid),
            Some(4240),
            "the session the waiter waited on, not the waiter"
        );
    }

    #[test]
    fn the_log_line_is_short_says_the_reason_once_and_what_would_be_sent() {
        let sent = event(
            "main",
            &decision(4240, Action::CancelBlockers),
            Outcome::Success,
            None,
            at(100.0),
        );
        let line = sent.summary();
        assert_eq!(
            line,
            "rule r: cancelled pid 4240, root pid 4240 (analyst/psql, active, wait Client:ClientWrite, \
             transaction 95.3s, holds AccessShareLock on public.orders) \"SELECT xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…\", \
             for waiter pid 4242 (deploy/migrate, active, wait Lock:relation, transaction 2.5s) waiting 2.5s for \
             AccessExclusiveLock on public.orders, 3 behind, \"ALTER TABLE orders DROP CONSTRAINT orders_customer_id_fkey\": \
             the waiter has waited 2.5s (min_wait 2s)"
        );
        assert_eq!(line.matches("min_wait").count(), 1, "the reason once");
        assert!(!line.contains('\n'));
        let dry = event(
            "main",
            &decision(4240, Action::CancelBlockers),
            Outcome::DryRun,
            None,
            at(100.0),
        );
        assert!(dry
            .summary()
            .starts_with("rule r: dry run: would cancel pid 4240, root pid 4240 ("));
        let waiter = event(
            "main",
            &decision(4240, Action::CancelWaiter),
            Outcome::Success,
            None,
            at(100.0),
        );
        assert!(
            waiter
                .summary()
                .starts_with("rule r: cancelled pid 4242, the waiter pid 4242 (deploy/migrate"),
            "{}",
            waiter.summary()
        );
        assert!(waiter.summary().contains(", behind root pid 4240 (analyst/psql"));
    }

    #[test]
    fn hostile_names_cannot_forge_a_log_line() {
        let mut decision = decision(4240, Action::CancelBlockers);
        decision.roots[0].session.as_mut().unwrap().usename = Some("evil\n2026-01-01 WARN forged".into());
        decision.waiter.lock.relation = Some("public.\"a\u{202E}b\"".into());
        decision.waiter.session.query = Some("SELECT 1;\r\nSELECT 2".into());
        let line = one_line(&event("main", &decision, Outcome::Success, None, at(100.0)).summary());
        assert!(!line.chars().any(|c| c.is_control() || c == '\u{202E}'), "{line}");
        assert!(line.contains("evil\\u{a}2026-01-01 WARN forged"), "{line}");
        assert!(line.contains("public.\"a\\u{202e}b\""), "{line}");
        assert!(line.contains("\"SELECT 1;  SELECT 2\""), "{line}");
    }
}
