//! Incident history: every lock queue lockjam saw, remembered for the
//! post-mortem. [`Tracker`] is pure: it follows each sample's lock graph
//! (and the policy's decisions on it) and says when an incident's waits
//! have ended; the service then looks once at how the waiter and the root
//! blockers are ([`SessionNow`]) and [`Ending::finish`] names the outcome.
//! [`store`] keeps closed incidents in SQLite, across restarts.
//!
//! An incident opens when a waiter has waited `min_wait` and either waits
//! on a relation in one of `modes` or has sessions queued behind it; it
//! follows that waiter (pid, backend start, lock) and every later
//! qualifying wait on the same relation that overlaps it, and closes when
//! none of them waits any more. A waiter that lies in another qualifying
//! waiter's wait tree (a victim upstream of a migration, such as an
//! `UPDATE` waiting on a row in front of `ADD FOREIGN KEY`) opens no
//! incident of its own: the incident is the migration's, and its root is
//! whoever holds the row.

pub mod store;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::analysis::{LockGraph, Waiter};
use crate::audit::{AuditEvent, HeldLock};
use crate::view::{rfc3339, seconds, SessionView};

/// How an incident ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The root blockers' transactions ended, and lockjam signalled none.
    BlockerFinished,
    /// lockjam cancelled or terminated a root blocker.
    BlockerSignalled,
    /// lockjam cancelled the waiter (`cancel_waiter`).
    WaiterSignalled,
    /// The waiter stopped waiting while a root still held its lock: its own
    /// `lock_timeout`, a cancel from elsewhere, a disconnect.
    WaiterGone,
    /// lockjam lost the database while the incident was open.
    TargetDown,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::BlockerFinished,
        Outcome::BlockerSignalled,
        Outcome::WaiterSignalled,
        Outcome::WaiterGone,
        Outcome::TargetDown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::BlockerFinished => "blocker_finished",
            Outcome::BlockerSignalled => "blocker_signalled",
            Outcome::WaiterSignalled => "waiter_signalled",
            Outcome::WaiterGone => "waiter_gone",
            Outcome::TargetDown => "target_down",
        }
    }
}

/// Most roots, decisions and stuck relations an incident keeps: a queue
/// that stands for hours behind churning sessions stays a bounded record
/// (the first ones kept, all counted).
const MAX_ROOTS: usize = 20;
const MAX_DECISIONS: usize = 50;
const MAX_STUCK_RELATIONS: usize = 50;

/// What opens an incident (`[incidents]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Criteria {
    pub min_wait: Duration,
    pub modes: Vec<String>,
}

/// A root blocker seen during an incident, as last seen.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RootSeen {
    #[serde(flatten)]
    pub session: SessionView,
    /// The lock it held against the waiter.
    pub holds: Option<HeldLock>,
    /// RFC 3339, server clock.
    pub first_seen: String,
}

/// A policy decision taken during an incident (one audit event).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DecisionSeen {
    pub time: String,
    pub rule: String,
    pub rule_action: &'static str,
    pub action: &'static str,
    pub outcome: &'static str,
    pub signalled_pid: i32,
    pub reason: String,
}

/// A closed incident, as stored and served.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Incident {
    /// The store's id; 0 until stored.
    pub id: i64,
    pub target: String,
    pub datname: String,
    /// As in metric labels: `public.orders`, or `(transactionid)`.
    pub relation: String,
    pub locktype: String,
    pub mode: String,
    /// RFC 3339, server clock: when the first waiter began to wait.
    pub opened_at: String,
    /// RFC 3339, server clock: the first sample that saw no wait of it.
    pub closed_at: String,
    pub duration_seconds: f64,
    /// The first waiter, as seen when the incident opened.
    pub waiter: SessionView,
    /// Qualifying waits that belonged to it (the first included).
    pub waits: u64,
    /// The first [`MAX_ROOTS`] (20) root blockers seen.
    pub roots: Vec<RootSeen>,
    /// Root blockers seen (by pid), all of them.
    pub roots_seen: u64,
    /// Most sessions queued behind the waiter at once.
    pub peak_behind: u64,
    /// Most sessions waiting for a lock in its database at once.
    pub peak_blocked_sessions: u64,
    pub peak_chain_depth: u32,
    /// Relations whose queries waited in its database while it was open.
    pub stuck_relations: Vec<String>,
    /// The first [`MAX_DECISIONS`] (50) decisions.
    pub decisions: Vec<DecisionSeen>,
    /// Decisions taken, all of them.
    pub decisions_taken: u64,
    pub outcome: Outcome,
    /// Whether the waiter got its lock, where PostgreSQL showed it: `true`
    /// when it was seen holding the lock or still running its statement
    /// past the wait, `false` when it gave up or was cancelled, `null`
    /// when its statement had ended before lockjam looked.
    pub waiter_got_lock: Option<bool>,
}

/// A session as lockjam found it when an incident's waits ended.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionNow {
    pub pid: i32,
    pub backend_start: Option<SystemTime>,
    pub xact_start: Option<SystemTime>,
    pub query_start: Option<SystemTime>,
    pub state: Option<String>,
    /// For the waiter: whether it holds the lock it waited for.
    pub holds: Option<bool>,
}

/// Who waits: a pid is reused, a pid with its backend's start is not; the
/// lock's tag tells this wait from the session's next one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WaitId {
    pid: i32,
    backend_start: Option<SystemTime>,
    tag: String,
}

impl WaitId {
    fn of(waiter: &Waiter) -> WaitId {
        WaitId {
            pid: waiter.session.pid,
            backend_start: waiter.session.backend_start,
            tag: waiter.lock.tag.clone(),
        }
    }
}

/// A root's identity: its session and transaction.
#[derive(Debug, Clone, PartialEq)]
struct RootId {
    backend_start: Option<SystemTime>,
    xact_start: Option<SystemTime>,
}

#[derive(Debug, Clone)]
struct Open {
    datname: String,
    relation: String,
    locktype: String,
    mode: String,
    tag: String,
    opened_at: SystemTime,
    waiter: SessionView,
    waiter_query_start: Option<SystemTime>,
    first: WaitId,
    members: Vec<WaitId>,
    waits: u64,
    roots: BTreeMap<i32, (RootSeen, RootId)>,
    /// Every root's pid, kept or not.
    root_pids: BTreeSet<i32>,
    peak_behind: u64,
    peak_blocked: u64,
    peak_depth: u32,
    stuck: BTreeSet<String>,
    decisions: Vec<DecisionSeen>,
    decisions_taken: u64,
    /// Who lockjam signalled with success: the waiter (`cancel_waiter`),
    /// and roots (`cancel_blockers`), whether or not their decisions fit
    /// in `decisions`.
    waiter_signalled: bool,
    roots_signalled: BTreeSet<i32>,
}

/// An incident whose waits have ended, before lockjam has looked at how.
#[derive(Debug, Clone)]
pub struct Ending {
    open: Open,
    target: String,
    closed_at: SystemTime,
    target_down: bool,
}

/// Follows one target's incidents from sample to sample.
#[derive(Debug)]
pub struct Tracker {
    target: String,
    criteria: Criteria,
    open: Vec<Open>,
}

impl Tracker {
    pub fn new(target: &str, criteria: Criteria) -> Tracker {
        Tracker {
            target: target.to_string(),
            criteria,
            open: Vec::new(),
        }
    }

    /// New criteria (a reload); open incidents stay open.
    pub fn set_criteria(&mut self, criteria: Criteria) {
        self.criteria = criteria;
    }

    /// Open incidents: (database, relation) of each.
    pub fn open(&self) -> Vec<(String, String)> {
        self.open
            .iter()
            .map(|o| (o.datname.clone(), o.relation.clone()))
            .collect()
    }

    /// Takes one sample's graph and the policy's decisions on it; returns
    /// the incidents that opened (database of each) and those whose waits
    /// ended.
    pub fn observe(&mut self, graph: &LockGraph, events: &[AuditEvent]) -> (Vec<String>, Vec<Ending>) {
        let now = graph.taken_at;
        let qualifying = self.qualifying(graph);
        let waiting: HashSet<WaitId> = graph.waiters.iter().map(WaitId::of).collect();
        let mut ended = Vec::new();
        let mut open = Vec::new();
        for mut incident in std::mem::take(&mut self.open) {
            incident.members.retain(|m| waiting.contains(m));
            for waiter in &qualifying {
                let id = WaitId::of(waiter);
                if incident.key_matches(waiter) && !incident.members.contains(&id) {
                    incident.members.push(id);
                    incident.waits += 1;
                }
            }
            if incident.members.is_empty() {
                ended.push(Ending {
                    open: incident,
                    target: self.target.clone(),
                    closed_at: now,
                    target_down: false,
                });
            } else {
                open.push(incident);
            }
        }
        let mut opened = Vec::new();
        for waiter in qualifying {
            if open.iter().any(|o| o.key_matches(waiter)) {
                continue;
            }
            opened.push(waiter.datname().to_string());
            open.push(Open::new(waiter, now));
        }
        for incident in &mut open {
            incident.update(graph, now);
        }
        for event in events {
            for incident in open.iter_mut().chain(ended.iter_mut().map(|e| &mut e.open)) {
                if incident.concerns(event) {
                    incident.decided(event);
                }
            }
        }
        self.open = open;
        (opened, ended)
    }

    /// lockjam lost the database: every open incident ends, at the last
    /// sample that saw it (`last_seen`, the server's clock).
    pub fn target_down(&mut self, last_seen: SystemTime) -> Vec<Ending> {
        std::mem::take(&mut self.open)
            .into_iter()
            .map(|open| Ending {
                open,
                target: self.target.clone(),
                closed_at: last_seen,
                target_down: true,
            })
            .collect()
    }

    /// The waiters that open or join an incident: waited `min_wait`, on a
    /// relation in one of the modes or with someone behind, and not in the
    /// wait tree of another such waiter.
    fn qualifying<'g>(&self, graph: &'g LockGraph) -> Vec<&'g Waiter> {
        let candidates: Vec<&Waiter> = graph
            .waiters
            .iter()
            .filter(|w| w.wait >= self.criteria.min_wait)
            .filter(|w| w.behind > 0 || (w.lock.relation.is_some() && self.criteria.modes.contains(&w.lock.mode)))
            .collect();
        let mut upstream: HashSet<i32> = HashSet::new();
        for waiter in &candidates {
            upstream.extend(upstream_of(graph, waiter.session.pid));
        }
        candidates
            .into_iter()
            .filter(|w| !upstream.contains(&w.session.pid))
            .collect()
    }
}

/// Every waiting session `pid` waits on, directly or through others (not
/// `pid` itself).
fn upstream_of(graph: &LockGraph, pid: i32) -> HashSet<i32> {
    let mut seen = HashSet::from([pid]);
    let mut stack = vec![pid];
    let mut upstream = HashSet::new();
    while let Some(current) = stack.pop() {
        let Some(waiter) = graph.waiter(current) else { continue };
        for edge in &waiter.blocked_by {
            if seen.insert(edge.pid) && graph.waiter(edge.pid).is_some() {
                upstream.insert(edge.pid);
                stack.push(edge.pid);
            }
        }
    }
    upstream
}

impl Open {
    fn new(waiter: &Waiter, now: SystemTime) -> Open {
        let id = WaitId::of(waiter);
        Open {
            datname: waiter.datname().to_string(),
            relation: waiter.lock.relation_label(),
            locktype: waiter.lock.locktype.clone(),
            mode: waiter.lock.mode.clone(),
            tag: waiter.lock.tag.clone(),
            opened_at: waiter.wait_start.unwrap_or(now - waiter.wait),
            waiter: SessionView::of(waiter.session.pid, Some(&waiter.session), now),
            waiter_query_start: waiter.session.query_start,
            first: id.clone(),
            members: vec![id],
            waits: 1,
            roots: BTreeMap::new(),
            root_pids: BTreeSet::new(),
            peak_behind: 0,
            peak_blocked: 0,
            peak_depth: 0,
            stuck: BTreeSet::new(),
            decisions: Vec::new(),
            decisions_taken: 0,
            waiter_signalled: false,
            roots_signalled: BTreeSet::new(),
        }
    }

    /// Records a policy decision about this incident.
    fn decided(&mut self, event: &AuditEvent) {
        self.decisions_taken += 1;
        if event.outcome == "success" {
            match event.rule_action {
                "cancel_waiter" if event.signalled_pid == self.first.pid => self.waiter_signalled = true,
                "cancel_blockers" => {
                    self.roots_signalled.insert(event.signalled_pid);
                }
                _ => {}
            }
        }
        if self.decisions.len() < MAX_DECISIONS {
            self.decisions.push(DecisionSeen {
                time: event.time.clone(),
                rule: event.rule.clone(),
                rule_action: event.rule_action,
                action: event.signal,
                outcome: event.outcome,
                signalled_pid: event.signalled_pid,
                reason: event.reason.clone(),
            });
        }
    }

    fn key_matches(&self, waiter: &Waiter) -> bool {
        waiter.datname() == self.datname && waiter.lock.relation_label() == self.relation
    }

    /// Peaks, roots and stuck relations from one sample.
    fn update(&mut self, graph: &LockGraph, now: SystemTime) {
        for member in &self.members {
            let Some(waiter) = graph.waiter(member.pid) else {
                continue;
            };
            self.peak_behind = self.peak_behind.max(waiter.behind);
            for root in graph.wait_tree(member.pid).roots {
                let Some(blocker) = graph.blocker(root) else { continue };
                let session = SessionView::of(root, blocker.session.as_ref(), now);
                let holds = blocker.lock_held_against(&waiter.lock).map(|lock| HeldLock {
                    locktype: lock.locktype.clone(),
                    relation: lock.relation_label(),
                    mode: lock.mode.clone(),
                });
                let id = RootId {
                    backend_start: blocker.session.as_ref().and_then(|s| s.backend_start),
                    xact_start: blocker.session.as_ref().and_then(|s| s.xact_start),
                };
                let first_seen = match self.roots.get(&root) {
                    Some((seen, known)) if *known == id => seen.first_seen.clone(),
                    _ if self.roots.len() >= MAX_ROOTS && !self.roots.contains_key(&root) => {
                        self.root_pids.insert(root);
                        continue;
                    }
                    _ => rfc3339(now),
                };
                self.root_pids.insert(root);
                self.roots.insert(
                    root,
                    (
                        RootSeen {
                            session,
                            holds,
                            first_seen,
                        },
                        id,
                    ),
                );
            }
        }
        if let Some(database) = graph.databases.get(&self.datname) {
            self.peak_blocked = self.peak_blocked.max(database.blocked_sessions);
            self.peak_depth = self.peak_depth.max(database.chain_max_depth);
            for relation in database.relation_waiters.keys() {
                if self.stuck.len() >= MAX_STUCK_RELATIONS {
                    break;
                }
                self.stuck.insert(relation.clone());
            }
        }
    }

    /// Whether a policy decision was about this incident: its waiter, or
    /// one of its roots signalled.
    fn concerns(&self, event: &AuditEvent) -> bool {
        self.members.iter().any(|m| m.pid == event.waiter.session.pid)
            || self.first.pid == event.waiter.session.pid
            || self.roots.contains_key(&event.signalled_pid)
    }
}

impl Ending {
    /// The pids whose state tells how it ended: the first waiter, then the
    /// roots.
    pub fn pids(&self) -> Vec<i32> {
        std::iter::once(self.open.first.pid)
            .chain(self.open.roots.keys().copied())
            .collect()
    }

    /// The waiter's pid, and the tag and mode of the lock it waited for.
    pub fn waited_for(&self) -> (i32, &str, &str) {
        (self.open.first.pid, &self.open.tag, &self.open.mode)
    }

    /// Whether lockjam must look at the sessions to tell the outcome.
    pub fn needs_a_look(&self) -> bool {
        !self.target_down
    }

    /// When its waits were seen ended (server clock).
    pub fn closed_at(&self) -> SystemTime {
        self.closed_at
    }

    /// The database of the incident.
    pub fn datname(&self) -> &str {
        &self.open.datname
    }

    /// The incident, its outcome told from lockjam's successful signals
    /// first, then from `now` (the sessions as lockjam found them; `None`
    /// if it could not look).
    pub fn finish(self, now: Option<&[SessionNow]>) -> Incident {
        let open = self.open;
        let waiter_now = now.and_then(|rows| {
            rows.iter()
                .find(|r| r.pid == open.first.pid && r.backend_start == open.first.backend_start)
        });
        let root_still_holds = now.is_some_and(|rows| {
            open.roots.iter().any(|(pid, (_, id))| {
                rows.iter().any(|r| {
                    r.pid == *pid
                        && r.backend_start == id.backend_start
                        && id.xact_start.is_some()
                        && r.xact_start == id.xact_start
                })
            })
        });
        let outcome = if self.target_down {
            Outcome::TargetDown
        } else if open.waiter_signalled {
            Outcome::WaiterSignalled
        } else if !open.roots_signalled.is_empty() {
            Outcome::BlockerSignalled
        } else if root_still_holds {
            Outcome::WaiterGone
        } else {
            Outcome::BlockerFinished
        };
        let still_running = waiter_now
            .is_some_and(|w| w.query_start == open.waiter_query_start && w.state.as_deref() == Some("active"));
        let aborted = waiter_now.is_some_and(|w| {
            w.query_start == open.waiter_query_start && w.state.as_deref() == Some("idle in transaction (aborted)")
        });
        let waiter_got_lock = match outcome {
            Outcome::TargetDown => None,
            Outcome::WaiterSignalled | Outcome::WaiterGone => Some(false),
            _ if waiter_now.and_then(|w| w.holds) == Some(true) || still_running => Some(true),
            _ if aborted => Some(false),
            _ => None,
        };
        let mut roots: Vec<RootSeen> = open.roots.into_values().map(|(seen, _)| seen).collect();
        roots.sort_by(|a, b| a.first_seen.cmp(&b.first_seen).then(a.session.pid.cmp(&b.session.pid)));
        Incident {
            id: 0,
            target: self.target,
            datname: open.datname,
            relation: open.relation,
            locktype: open.locktype,
            mode: open.mode,
            opened_at: rfc3339(open.opened_at),
            closed_at: rfc3339(self.closed_at),
            duration_seconds: seconds(self.closed_at.duration_since(open.opened_at).unwrap_or_default()),
            waiter: open.waiter,
            waits: open.waits,
            roots,
            roots_seen: open.root_pids.len() as u64,
            peak_behind: open.peak_behind,
            peak_blocked_sessions: open.peak_blocked,
            peak_chain_depth: open.peak_depth,
            stuck_relations: open.stuck.into_iter().collect(),
            decisions: open.decisions,
            decisions_taken: open.decisions_taken,
            outcome,
            waiter_got_lock,
        }
    }
}

impl Incident {
    /// Its duration, for the histogram.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_seconds.max(0.0))
    }

    /// The first root blocker, in a few words for a log line or a table:
    /// `pid 4242 (analyst/psql, idle in transaction)`.
    pub fn root_summary(&self) -> String {
        match self.roots.first() {
            None => "none seen".to_string(),
            Some(root) => {
                let s = &root.session;
                let more = match self.roots.len() {
                    1 => String::new(),
                    n => format!(" and {} more", n - 1),
                };
                format!(
                    "pid {} ({}/{}, {}){more}",
                    s.pid,
                    s.usename.as_deref().unwrap_or("?"),
                    s.application_name.as_deref().unwrap_or(""),
                    s.state.as_deref().unwrap_or("?")
                )
            }
        }
    }
}

/// The one log line of a closed incident (`lockjam::incidents`, INFO):
/// under `log.format = "json"` its fields are the JSON's; names and
/// queries from the database are escaped onto one line either way.
pub fn log_closed(incident: &Incident) {
    let root = incident.roots.first().map(|r| &r.session);
    let text = |value: Option<&String>| crate::audit::one_line(value.map_or("", |v| v.as_str()));
    tracing::info!(
        target: "lockjam::incidents",
        incident = incident.id,
        target = incident.target.as_str(),
        datname = text(Some(&incident.datname)),
        relation = text(Some(&incident.relation)),
        mode = incident.mode.as_str(),
        outcome = incident.outcome.as_str(),
        duration_seconds = incident.duration_seconds,
        opened_at = incident.opened_at.as_str(),
        closed_at = incident.closed_at.as_str(),
        waiter_pid = incident.waiter.pid,
        waiter_application = text(incident.waiter.application_name.as_ref()),
        waiter_got_lock = match incident.waiter_got_lock {
            Some(true) => "true",
            Some(false) => "false",
            None => "unknown",
        },
        root_pid = root.map(|r| r.pid),
        root_application = text(root.and_then(|r| r.application_name.as_ref())),
        root_query = text(root.and_then(|r| r.query.as_ref())),
        peak_behind = incident.peak_behind,
        decisions = incident.decisions.len(),
        "incident {} closed: {} on {} in {}, {:.1}s, {}; waiter pid {}, root {}",
        incident.id,
        incident.mode,
        text(Some(&incident.relation)),
        text(Some(&incident.datname)),
        incident.duration_seconds,
        incident.outcome.as_str(),
        incident.waiter.pid,
        crate::audit::one_line(&incident.root_summary())
    );
}

/// Stored incidents (as `/api/v1/incidents` serves them) as a table for a
/// terminal or a post-mortem: one row each, then the waiter's and the
/// first root's query (as stored: cut by the sampler at 200 characters).
/// Text from the database is kept on its line.
pub fn table(incidents: &[serde_json::Value]) -> String {
    if incidents.is_empty() {
        return "no incidents\n".to_string();
    }
    let text = |value: &serde_json::Value| -> String {
        match value {
            serde_json::Value::String(s) => crate::audit::one_line(s),
            serde_json::Value::Null => "-".to_string(),
            other => other.to_string(),
        }
    };
    let header = [
        "ID",
        "CLOSED (UTC)",
        "TARGET",
        "DATABASE",
        "RELATION",
        "MODE",
        "LASTED",
        "BEHIND",
        "WAITER",
        "ROOT",
        "OUTCOME",
    ];
    let mut rows: Vec<[String; 11]> = Vec::new();
    let mut queries = Vec::new();
    for i in incidents {
        let root = &i["roots"][0];
        rows.push([
            text(&i["id"]),
            text(&i["closed_at"])
                .chars()
                .take(19)
                .collect::<String>()
                .replace('T', " "),
            text(&i["target"]),
            text(&i["datname"]),
            text(&i["relation"]),
            text(&i["mode"]),
            format!("{:.1}s", i["duration_seconds"].as_f64().unwrap_or(0.0)),
            text(&i["peak_behind"]),
            format!(
                "{} {}",
                text(&i["waiter"]["pid"]),
                text(&i["waiter"]["application_name"])
            ),
            if root.is_null() {
                "-".to_string()
            } else {
                format!(
                    "{} {} ({})",
                    text(&root["pid"]),
                    text(&root["application_name"]),
                    text(&root["state"])
                )
            },
            text(&i["outcome"]),
        ]);
        queries.push((text(&i["waiter"]["query"]), text(&root["query"])));
    }
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell}{}", " ".repeat(width - cell.chars().count())))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    for (row, (waiter_query, root_query)) in rows.iter().zip(queries) {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push_str(&format!("    waiter: {waiter_query}\n    root:   {root_query}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::analyze;
    use crate::snapshot::{LockRow, Session, Snapshot};

    const AX: &str = "AccessExclusiveLock";

    fn at(seconds: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1_800_000_000.0 + seconds)
    }

    fn session(pid: i32, application: &str, blocked_by: Option<Vec<i32>>) -> Session {
        Session {
            pid,
            datname: Some("app".into()),
            usename: Some("web".into()),
            application_name: Some(application.into()),
            backend_type: Some("client backend".into()),
            state: Some("active".into()),
            backend_start: Some(at(0.0)),
            xact_start: Some(at(pid as f64 / 1000.0)),
            query_start: Some(at(1.0)),
            query: Some(format!("query of {pid}")),
            blocked_by,
            ..Session::default()
        }
    }

    fn lock(pid: i32, granted: bool, mode: &str, relation: Option<&str>, wait_start: f64) -> LockRow {
        LockRow {
            pid,
            granted,
            locktype: if relation.is_some() {
                "relation"
            } else {
                "transactionid"
            }
            .into(),
            mode: mode.into(),
            tag: relation.map_or("transactionid:7".into(), |r| format!("relation:1:{r}")),
            datname: relation.map(|_| "app".into()),
            relation: relation.map(str::to_string),
            wait_start: (!granted).then(|| at(wait_start)),
        }
    }

    fn graph(t: f64, sessions: Vec<Session>, locks: Vec<LockRow>) -> LockGraph {
        analyze(&Snapshot {
            taken_at: at(t),
            activity: Vec::new(),
            sessions,
            locks,
            existing_databases: None,
            in_recovery: false,
        })
    }

    /// Incident 000 at `t`: a read (10) holds orders, an ALTER (20) has
    /// waited since t=50, `selects` SELECTs (100..) queue behind it.
    fn incident_000(t: f64, selects: i32) -> LockGraph {
        let mut sessions = vec![session(10, "analyst", None), session(20, "migrate", Some(vec![10]))];
        let mut locks = vec![
            lock(10, true, "AccessShareLock", Some("public.orders"), 0.0),
            lock(20, false, AX, Some("public.orders"), 50.0),
        ];
        for pid in 100..100 + selects {
            sessions.push(session(pid, "web", Some(vec![20])));
            locks.push(lock(pid, false, "AccessShareLock", Some("public.orders"), 51.0));
        }
        graph(t, sessions, locks)
    }

    fn calm(t: f64) -> LockGraph {
        graph(t, Vec::new(), Vec::new())
    }

    fn tracker() -> Tracker {
        Tracker::new(
            "db",
            Criteria {
                min_wait: Duration::from_secs(1),
                modes: vec![AX.into()],
            },
        )
    }

    #[test]
    fn a_strong_wait_opens_at_min_wait_and_closes_when_it_ends() {
        let mut tracker = tracker();
        // Waited 0.5 s: not yet.
        assert_eq!(tracker.observe(&incident_000(50.5, 0), &[]).0, Vec::<String>::new());
        assert!(tracker.open().is_empty());
        let (opened, ended) = tracker.observe(&incident_000(51.0, 3), &[]);
        assert_eq!((opened, ended.len()), (vec!["app".to_string()], 0));
        tracker.observe(&incident_000(52.0, 5), &[]);
        let (opened, mut ended) = tracker.observe(&calm(53.0), &[]);
        assert!(opened.is_empty());
        assert_eq!(ended.len(), 1);
        let ending = ended.remove(0);
        assert_eq!(ending.pids(), [20, 10]);
        let incident = ending.finish(Some(&[]));
        assert_eq!(incident.relation, "public.orders");
        assert_eq!(incident.mode, AX);
        assert_eq!(incident.waiter.pid, 20);
        assert_eq!(incident.waiter.application_name.as_deref(), Some("migrate"));
        assert_eq!(
            incident.duration_seconds, 3.0,
            "from the wait start at 50 to the calm sample at 53"
        );
        assert_eq!(incident.roots.len(), 1);
        assert_eq!(incident.roots[0].session.pid, 10);
        assert_eq!(incident.roots[0].holds.as_ref().unwrap().mode, "AccessShareLock");
        assert_eq!(
            (
                incident.peak_behind,
                incident.peak_blocked_sessions,
                incident.peak_chain_depth
            ),
            (5, 6, 2)
        );
        assert_eq!(incident.stuck_relations, ["public.orders"]);
        assert_eq!(incident.outcome, Outcome::BlockerFinished);
        assert!(tracker.open().is_empty());
    }

    #[test]
    fn a_weak_wait_with_no_one_behind_is_no_incident() {
        let mut tracker = tracker();
        // A SELECT waits behind an ALTER that holds the table: mode
        // AccessShareLock, and no one behind it.
        let sessions = vec![session(10, "migrate", None), session(30, "web", Some(vec![10]))];
        let locks = vec![
            lock(10, true, AX, Some("public.orders"), 0.0),
            lock(30, false, "AccessShareLock", Some("public.orders"), 40.0),
        ];
        let (opened, _) = tracker.observe(&graph(100.0, sessions, locks), &[]);
        assert!(opened.is_empty());
    }

    #[test]
    fn a_victim_in_front_of_a_migration_opens_no_incident_of_its_own() {
        // Incident 002: the mailer (10) holds row 1; a web UPDATE (11)
        // waits for the mailer's transaction, holding ROW EXCLUSIVE; ADD
        // FOREIGN KEY (20) waits behind both; a writer (100) behind it.
        let rx = "RowExclusiveLock";
        let sessions = vec![
            session(10, "mailer", None),
            session(11, "web", Some(vec![10])),
            session(20, "migrate", Some(vec![10, 11])),
            session(100, "writer", Some(vec![20])),
        ];
        let locks = vec![
            lock(10, true, rx, Some("public.users"), 0.0),
            lock(10, true, "ExclusiveLock", None, 0.0),
            lock(11, true, rx, Some("public.users"), 0.0),
            lock(11, false, "ShareLock", None, 40.0),
            lock(20, false, "ShareRowExclusiveLock", Some("public.users"), 50.0),
            lock(100, false, rx, Some("public.users"), 60.0),
        ];
        let mut tracker = Tracker::new(
            "db",
            Criteria {
                min_wait: Duration::from_secs(1),
                modes: vec!["ShareRowExclusiveLock".into()],
            },
        );
        let (opened, _) = tracker.observe(&graph(100.0, sessions, locks), &[]);
        assert_eq!(opened, ["app"]);
        assert_eq!(tracker.open(), [("app".to_string(), "public.users".to_string())]);
        let incident = tracker.observe(&calm(101.0), &[]).1.remove(0).finish(Some(&[]));
        assert_eq!(incident.waiter.pid, 20);
        let roots: Vec<i32> = incident.roots.iter().map(|r| r.session.pid).collect();
        assert_eq!(roots, [10], "the mailer, not the victim");
    }

    #[test]
    fn overlapping_waits_on_one_relation_are_one_incident() {
        let mut tracker = tracker();
        tracker.observe(&incident_000(52.0, 0), &[]);
        // A second ALTER (21) joins the queue while the first still waits.
        let two = |t: f64, first: bool| {
            let mut sessions = vec![session(10, "analyst", None), session(21, "migrate", Some(vec![10]))];
            let mut locks = vec![
                lock(10, true, "AccessShareLock", Some("public.orders"), 0.0),
                lock(21, false, AX, Some("public.orders"), 51.5),
            ];
            if first {
                sessions.push(session(20, "migrate", Some(vec![10])));
                locks.push(lock(20, false, AX, Some("public.orders"), 50.0));
            }
            graph(t, sessions, locks)
        };
        assert!(tracker.observe(&two(53.0, true), &[]).0.is_empty());
        // The first gives up; the second still waits: still open.
        let (opened, ended) = tracker.observe(&two(54.0, false), &[]);
        assert!(opened.is_empty() && ended.is_empty());
        let incident = tracker.observe(&calm(55.0), &[]).1.remove(0).finish(Some(&[]));
        assert_eq!((incident.waiter.pid, incident.waits), (20, 2));
        assert_eq!(incident.duration_seconds, 5.0);
    }

    /// Incident 000 opened and ended: the ending, before the look.
    fn ended_000() -> Ending {
        let mut tracker = tracker();
        tracker.observe(&incident_000(52.0, 2), &[]);
        tracker.observe(&calm(53.0), &[]).1.remove(0)
    }

    fn now(pid: i32, xact_start: f64, state: &str, holds: Option<bool>) -> SessionNow {
        SessionNow {
            pid,
            backend_start: Some(at(0.0)),
            xact_start: Some(at(xact_start)),
            query_start: Some(at(1.0)),
            state: Some(state.into()),
            holds,
        }
    }

    #[test]
    fn the_look_tells_who_ended_it() {
        // The root still in the transaction it blocked in: the waiter
        // gave up.
        let root_holds = [now(10, 0.010, "active", None), now(20, 0.020, "idle", Some(false))];
        let incident = ended_000().finish(Some(&root_holds));
        assert_eq!(
            (incident.outcome, incident.waiter_got_lock),
            (Outcome::WaiterGone, Some(false))
        );
        // The root's transaction ended; the waiter still runs its
        // statement past the wait: it got the lock.
        let got_it = [now(10, 9.0, "idle", None), now(20, 0.020, "active", Some(false))];
        let incident = ended_000().finish(Some(&got_it));
        assert_eq!(
            (incident.outcome, incident.waiter_got_lock),
            (Outcome::BlockerFinished, Some(true))
        );
        // Seen holding it in its open transaction.
        let holds = [now(20, 0.020, "idle in transaction", Some(true))];
        assert_eq!(ended_000().finish(Some(&holds)).waiter_got_lock, Some(true));
        // Its statement failed.
        let aborted = [now(20, 0.020, "idle in transaction (aborted)", Some(false))];
        assert_eq!(ended_000().finish(Some(&aborted)).waiter_got_lock, Some(false));
        // Both gone: the statement ended before lockjam looked.
        let incident = ended_000().finish(Some(&[]));
        assert_eq!(
            (incident.outcome, incident.waiter_got_lock),
            (Outcome::BlockerFinished, None)
        );
        // No look at all.
        assert_eq!(ended_000().finish(None).outcome, Outcome::BlockerFinished);
    }

    fn event(rule_action: &'static str, signalled_pid: i32, outcome: &'static str) -> AuditEvent {
        let graph = incident_000(52.0, 2);
        let waiter = graph.waiter(20).unwrap();
        AuditEvent {
            time: rfc3339(at(52.0)),
            sampled_at: rfc3339(at(52.0)),
            target: "db".into(),
            rule: "r".into(),
            rule_action,
            signal: "cancel",
            outcome,
            reason: "because".into(),
            detail: None,
            signalled_pid,
            waiter: crate::audit::WaiterEvent {
                session: SessionView::of(20, Some(&waiter.session), at(52.0)),
                locktype: "relation".into(),
                relation: "public.orders".into(),
                mode: AX.into(),
                wait_seconds: 2.0,
                behind: 2,
            },
            blocker: None,
            roots: Vec::new(),
        }
    }

    #[test]
    fn lockjams_own_signals_come_first() {
        let signalled = |events: &[AuditEvent]| {
            let mut tracker = tracker();
            tracker.observe(&incident_000(52.0, 2), events);
            let root_holds = [now(10, 0.010, "active", None)];
            tracker.observe(&calm(53.0), &[]).1.remove(0).finish(Some(&root_holds))
        };
        let cancelled_root = signalled(&[event("cancel_blockers", 10, "success")]);
        assert_eq!(cancelled_root.outcome, Outcome::BlockerSignalled);
        assert_eq!(cancelled_root.decisions.len(), 1);
        assert_eq!(cancelled_root.decisions[0].signalled_pid, 10);
        let cancelled_waiter = signalled(&[event("cancel_waiter", 20, "success")]);
        assert_eq!(
            (cancelled_waiter.outcome, cancelled_waiter.waiter_got_lock),
            (Outcome::WaiterSignalled, Some(false))
        );
        // A dry run signals nothing: the look decides.
        let dry_run = signalled(&[event("cancel_blockers", 10, "dry_run")]);
        assert_eq!((dry_run.outcome, dry_run.decisions.len()), (Outcome::WaiterGone, 1));
    }

    #[test]
    fn a_long_incident_keeps_a_bounded_record_and_counts_the_rest() {
        // The ALTER (20) waits for 40 samples, each behind another
        // short-lived root (1000 + n); every sample brings two decisions.
        let mut tracker = tracker();
        for n in 0..40 {
            let root = 1000 + n;
            let graph = graph(
                52.0 + f64::from(n),
                vec![session(root, "analyst", None), session(20, "migrate", Some(vec![root]))],
                vec![
                    lock(root, true, "AccessShareLock", Some("public.orders"), 0.0),
                    lock(20, false, AX, Some("public.orders"), 50.0),
                ],
            );
            let outcome = if n == 39 { "success" } else { "not_blocking" };
            tracker.observe(
                &graph,
                &[
                    event("cancel_blockers", root, "dry_run"),
                    event("cancel_blockers", root, outcome),
                ],
            );
        }
        let incident = tracker.observe(&calm(92.0), &[]).1.remove(0).finish(Some(&[]));
        assert_eq!((incident.roots.len(), incident.roots_seen), (MAX_ROOTS, 40));
        assert_eq!(incident.roots[0].session.pid, 1000, "the first ones are kept");
        assert_eq!(
            (incident.decisions.len(), incident.decisions_taken),
            (MAX_DECISIONS, 80)
        );
        assert_eq!(
            incident.outcome,
            Outcome::BlockerSignalled,
            "the 80th decision, a success, counts though it is not kept"
        );
    }

    #[test]
    fn a_lost_database_ends_open_incidents_at_the_last_sample() {
        let mut tracker = tracker();
        tracker.observe(&incident_000(52.0, 2), &[]);
        let mut ended = tracker.target_down(at(52.0));
        assert_eq!(ended.len(), 1);
        assert!(!ended[0].needs_a_look());
        let incident = ended.remove(0).finish(None);
        assert_eq!(
            (incident.outcome, incident.waiter_got_lock),
            (Outcome::TargetDown, None)
        );
        assert_eq!(incident.duration_seconds, 2.0);
        assert!(tracker.open().is_empty());
        assert!(tracker.target_down(at(53.0)).is_empty());
    }
}

#[cfg(test)]
mod table_tests {
    use super::table;

    #[test]
    fn a_hostile_name_or_query_stays_on_its_line() {
        let incident = serde_json::json!({
            "id": 7, "closed_at": "2026-12-07T06:15:02.123Z", "target": "db", "datname": "app\u{202e}",
            "relation": "public.\"orders\nID  FORGED\"", "mode": "AccessExclusiveLock", "duration_seconds": 901.25,
            "peak_behind": 183, "outcome": "blocker_signalled",
            "waiter": {"pid": 4242, "application_name": "migrate", "query": "DROP TABLE x;\r\n-- ok"},
            "roots": [{"pid": 77, "application_name": "Heroku Postgres Backups", "state": "active",
                       "query": "COPY public.x TO stdout"}]
        });
        let out = table(&[incident]);
        assert_eq!(
            out,
            "ID  CLOSED (UTC)         TARGET  DATABASE     RELATION                        MODE                 \
             LASTED  BEHIND  WAITER        ROOT                                 OUTCOME\n\
             7   2026-12-07 06:15:02  db      app\\u{202e}  public.\"orders\\u{a}ID  FORGED\"  AccessExclusiveLock  \
             901.2s  183     4242 migrate  77 Heroku Postgres Backups (active)  blocker_signalled\n    \
             waiter: DROP TABLE x;\\u{d}\\u{a}-- ok\n    root:   COPY public.x TO stdout\n"
        );
        assert_eq!(table(&[]), "no incidents\n");
    }
}
