//! The policy, pure: which sessions to signal for a lock graph, under the
//! safety rules of DESIGN.md. No I/O and no clock reads: `now` is an
//! argument, and what must be remembered between ticks (who was cancelled
//! when, what was already reported, the rate limit) is a [`Memory`] the
//! caller keeps and updates with [`Memory::record`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use crate::analysis::{BlockKind, LockGraph, Waiter};
use crate::snapshot::Session;

/// A snapshot older than this is stale: nothing is decided on it.
pub const MAX_SNAPSHOT_AGE: Duration = Duration::from_secs(1);
/// The application name of lockjam's own sessions, never signalled.
pub const LOCKJAM_APPLICATION: &str = "lockjam";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Cancel the waiter's hard blockers; terminate what cancel cannot end.
    CancelBlockers,
    /// Cancel the waiter itself: a server-side lock_timeout.
    CancelWaiter,
}

impl Action {
    pub fn parse(text: &str) -> Option<Action> {
        match text {
            "cancel_blockers" => Some(Action::CancelBlockers),
            "cancel_waiter" => Some(Action::CancelWaiter),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::CancelBlockers => "cancel_blockers",
            Action::CancelWaiter => "cancel_waiter",
        }
    }
}

/// The signal sent: `pg_cancel_backend` or `pg_terminate_backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    Cancel,
    Terminate,
}

impl Signal {
    pub const ALL: [Signal; 2] = [Signal::Cancel, Signal::Terminate];

    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Cancel => "cancel",
            Signal::Terminate => "terminate",
        }
    }
}

/// The `outcome` label of `lockjam_policy_actions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    DryRun,
    Gone,
    NotBlocking,
    Protected,
    PermissionDenied,
    RateLimited,
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Success,
        Outcome::DryRun,
        Outcome::Gone,
        Outcome::NotBlocking,
        Outcome::Protected,
        Outcome::PermissionDenied,
        Outcome::RateLimited,
        Outcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::DryRun => "dry_run",
            Outcome::Gone => "gone",
            Outcome::NotBlocking => "not_blocking",
            Outcome::Protected => "protected",
            Outcome::PermissionDenied => "permission_denied",
            Outcome::RateLimited => "rate_limited",
            Outcome::Error => "error",
        }
    }
}

/// A shell-style pattern: `*` matches any run of characters, `?` one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(pub String);

impl Glob {
    pub fn matches(&self, text: &str) -> bool {
        fn matches(pattern: &[char], text: &[char]) -> bool {
            match (pattern.first(), text.first()) {
                (None, None) => true,
                (Some('*'), _) => matches(&pattern[1..], text) || (!text.is_empty() && matches(pattern, &text[1..])),
                (Some('?'), Some(_)) => matches(&pattern[1..], &text[1..]),
                (Some(p), Some(t)) if p == t => matches(&pattern[1..], &text[1..]),
                _ => false,
            }
        }
        let pattern: Vec<char> = self.0.chars().collect();
        let text: Vec<char> = text.chars().collect();
        matches(&pattern, &text)
    }
}

fn any_matches(globs: &[Glob], text: &str) -> bool {
    globs.iter().any(|g| g.matches(text))
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub waiter_modes: Vec<String>,
    pub relations: Vec<Glob>,
    pub databases: Vec<Glob>,
    pub waiter_applications: Vec<Glob>,
    pub min_wait: Duration,
    pub min_queue: u64,
    pub action: Action,
    /// `None`: never terminate.
    pub terminate_after: Option<Duration>,
    pub protect_users: Vec<Glob>,
    pub protect_applications: Vec<Glob>,
    pub protect_databases: Vec<Glob>,
}

impl Rule {
    /// The rule of `lockjam run --cancel-blockers-after`, and of the
    /// shipped configuration's example.
    pub fn unblock_migrations(min_wait: Duration) -> Rule {
        let everything = || vec![Glob("*".into())];
        Rule {
            name: "unblock-migrations".into(),
            waiter_modes: vec!["AccessExclusiveLock".into()],
            relations: everything(),
            databases: everything(),
            waiter_applications: everything(),
            min_wait,
            min_queue: 0,
            action: Action::CancelBlockers,
            terminate_after: Some(Duration::from_secs(10)),
            protect_users: Vec::new(),
            protect_applications: Vec::new(),
            protect_databases: Vec::new(),
        }
    }

    fn matches(&self, waiter: &Waiter) -> bool {
        self.waiter_modes.contains(&waiter.lock.mode)
            && any_matches(&self.relations, &waiter.lock.relation_label())
            && any_matches(&self.databases, waiter.datname())
            && any_matches(
                &self.waiter_applications,
                waiter.session.application_name.as_deref().unwrap_or(""),
            )
            && waiter.wait >= self.min_wait
            && waiter.behind >= self.min_queue
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub enabled: bool,
    pub dry_run: bool,
    pub max_actions_per_minute: u32,
    pub rules: Vec<Rule>,
}

impl Policy {
    /// An enabled policy that signals (no dry run), with these rules.
    pub fn acting(rules: Vec<Rule>) -> Policy {
        Policy {
            enabled: true,
            dry_run: false,
            rules,
            ..Policy::default()
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            enabled: false,
            dry_run: true,
            max_actions_per_minute: 30,
            rules: Vec::new(),
        }
    }
}

/// Who a session is: a pid alone may be reused by a new backend, and a
/// session moves on to new transactions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub pid: i32,
    pub backend_start: Option<SystemTime>,
    pub xact_start: Option<SystemTime>,
}

impl Identity {
    pub fn of(session: &Session) -> Identity {
        Identity {
            pid: session.pid,
            backend_start: session.backend_start,
            xact_start: session.xact_start,
        }
    }
}

/// One thing the policy decided: a signal to one session on behalf of one
/// waiter, or the reason it sends none.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub rule: String,
    pub signal: Signal,
    /// The session to signal (the waiter itself for `cancel_waiter`).
    pub target: Identity,
    /// `None` for a prepared transaction (pid 0), which has no session.
    pub target_session: Option<Session>,
    pub waiter: Waiter,
    /// The outcome already known without the database (dry run, protected,
    /// rate limited); `None` means: send the signal.
    pub verdict: Option<Outcome>,
    /// Why, in words, for the audit event.
    pub reason: String,
}

/// What the policy remembers between ticks.
#[derive(Debug, Default, Clone)]
pub struct Memory {
    /// Sessions signalled (or that would have been, in dry run), with the
    /// strongest signal and when it was first sent.
    signalled: HashMap<Identity, (Signal, SystemTime)>,
    /// (rule, session, outcome) already reported as protected or rate
    /// limited: reported once, not every tick.
    reported: HashSet<(String, Identity, Outcome)>,
    /// Sessions lockjam may not signal (permission denied): not retried.
    denied: HashSet<Identity>,
    /// When signalling statements were sent, for the rate limit.
    recent: VecDeque<SystemTime>,
}

/// Entries older than this are forgotten.
const MEMORY_HORIZON: Duration = Duration::from_secs(3600);

impl Memory {
    /// Remembers what became of a decision.
    pub fn record(&mut self, decision: &Decision, outcome: Outcome, now: SystemTime) {
        let identity = decision.target.clone();
        match outcome {
            Outcome::Success | Outcome::DryRun => {
                let first = self.signalled.get(&identity).map_or(now, |(_, at)| *at);
                self.signalled.insert(identity, (decision.signal, first));
                self.recent.push_back(now);
            }
            Outcome::Gone | Outcome::NotBlocking | Outcome::Error => self.recent.push_back(now),
            Outcome::Protected | Outcome::RateLimited => {
                self.reported.insert((decision.rule.clone(), identity, outcome));
            }
            Outcome::PermissionDenied => {
                self.denied.insert(identity);
                self.recent.push_back(now);
            }
        }
        self.forget_before(now);
    }

    fn forget_before(&mut self, now: SystemTime) {
        let minute_ago = now
            .checked_sub(Duration::from_secs(60))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        while self.recent.front().is_some_and(|t| *t < minute_ago) {
            self.recent.pop_front();
        }
        let horizon = now.checked_sub(MEMORY_HORIZON).unwrap_or(SystemTime::UNIX_EPOCH);
        self.signalled.retain(|_, (_, at)| *at >= horizon);
        if self.reported.len() > 10_000 {
            self.reported.clear();
        }
        if self.denied.len() > 10_000 {
            self.denied.clear();
        }
    }

    fn actions_in_last_minute(&self, now: SystemTime) -> usize {
        let minute_ago = now
            .checked_sub(Duration::from_secs(60))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.recent.iter().filter(|t| **t >= minute_ago).count()
    }
}

/// Why a session must not be signalled, if it must not.
fn protection(session: Option<&Session>, pid: i32, rule: &Rule) -> Option<String> {
    if pid == 0 {
        return Some(
            "a prepared transaction (pid 0) has no backend to signal: end it with COMMIT PREPARED or ROLLBACK PREPARED"
                .into(),
        );
    }
    let session = session?;
    let application = session.application_name.as_deref().unwrap_or("");
    let user = session.usename.as_deref().unwrap_or("");
    let database = session.datname.as_deref().unwrap_or("");
    let backend_type = session.backend_type.as_deref().unwrap_or("unknown");
    if backend_type == "autovacuum worker" {
        // pg_signal_autovacuum_worker (PostgreSQL 18) would let lockjam's
        // role cancel one; lockjam never does, on any version.
        return Some(
            "an autovacuum worker: lockjam never signals one; PostgreSQL itself cancels an autovacuum that blocks \
             a lock request after deadlock_timeout, unless it runs to prevent wraparound and must finish"
                .into(),
        );
    }
    if backend_type != "client backend" {
        return Some(format!("backend type `{backend_type}`, not a client backend"));
    }
    if application == LOCKJAM_APPLICATION {
        return Some("one of lockjam's own sessions".into());
    }
    if any_matches(&rule.protect_users, user) {
        return Some(format!("user `{user}` is protected"));
    }
    if any_matches(&rule.protect_applications, application) {
        return Some(format!("application `{application}` is protected"));
    }
    if any_matches(&rule.protect_databases, database) {
        return Some(format!("database `{database}` is protected"));
    }
    None
}

fn idle_in_transaction(session: &Session) -> bool {
    session
        .state
        .as_deref()
        .is_some_and(|s| s.starts_with("idle in transaction"))
}

/// Decides what to signal. `now` is the server's clock now; nothing is
/// decided on a snapshot older than [`MAX_SNAPSHOT_AGE`].
pub fn decide(graph: &LockGraph, policy: &Policy, memory: &Memory, now: SystemTime) -> Vec<Decision> {
    let age = now.duration_since(graph.taken_at).unwrap_or(Duration::ZERO);
    if !policy.enabled || age > MAX_SNAPSHOT_AGE {
        return Vec::new();
    }
    let mut budget = (policy.max_actions_per_minute as usize).saturating_sub(memory.actions_in_last_minute(now));
    let mut decided_this_tick: HashSet<i32> = HashSet::new();
    let mut decisions = Vec::new();
    // Longest waits first, so that the rate limit spends itself on the
    // oldest queue.
    let mut waiters: Vec<&Waiter> = graph.waiters.iter().collect();
    waiters.sort_by(|a, b| b.wait.cmp(&a.wait).then(a.session.pid.cmp(&b.session.pid)));
    for waiter in waiters {
        let Some(rule) = policy.rules.iter().find(|rule| rule.matches(waiter)) else {
            continue;
        };
        let targets: Vec<(i32, Option<&Session>)> = match rule.action {
            Action::CancelBlockers => waiter
                .blocked_by
                .iter()
                .filter(|edge| edge.kind == BlockKind::Hard)
                .map(|edge| {
                    let session = graph
                        .blockers
                        .iter()
                        .find(|b| b.pid == edge.pid)
                        .and_then(|b| b.session.as_ref());
                    (edge.pid, session)
                })
                .collect(),
            Action::CancelWaiter => vec![(waiter.session.pid, Some(&waiter.session))],
        };
        for (pid, session) in targets {
            // A session that ended between the reads is left alone; pid 0
            // is reported.
            if (session.is_none() && pid != 0) || !decided_this_tick.insert(pid) {
                continue;
            }
            let target = session.map(Identity::of).unwrap_or(Identity {
                pid,
                backend_start: None,
                xact_start: None,
            });
            let decision = |signal, verdict, reason: String| Decision {
                rule: rule.name.clone(),
                signal,
                target: target.clone(),
                target_session: session.cloned(),
                waiter: waiter.clone(),
                verdict,
                reason,
            };
            let reported = |outcome| memory.reported.contains(&(rule.name.clone(), target.clone(), outcome));
            if let Some(reason) = protection(session, pid, rule) {
                if !reported(Outcome::Protected) {
                    decisions.push(decision(Signal::Cancel, Some(Outcome::Protected), reason));
                }
                continue;
            }
            if memory.denied.contains(&target) {
                continue;
            }
            let session = session.expect("pid 0 is protected above");
            let Some((signal, reason)) = choose_signal(rule, waiter, session, memory.signalled.get(&target), now)
            else {
                continue;
            };
            if signal == Signal::Terminate && rule.terminate_after.is_none() {
                if !reported(Outcome::Protected) {
                    decisions.push(decision(
                        signal,
                        Some(Outcome::Protected),
                        format!("{reason}, but terminate_after = \"0s\" forbids terminating"),
                    ));
                }
                continue;
            }
            if budget == 0 {
                if !reported(Outcome::RateLimited) {
                    decisions.push(decision(
                        signal,
                        Some(Outcome::RateLimited),
                        format!("max_actions_per_minute ({}) reached", policy.max_actions_per_minute),
                    ));
                }
                continue;
            }
            budget -= 1;
            let verdict = policy.dry_run.then_some(Outcome::DryRun);
            decisions.push(decision(signal, verdict, reason));
        }
    }
    decisions
}

/// Cancel first; terminate a session that cancel cannot help (idle in
/// transaction) or that still blocks `terminate_after` after its cancel.
/// `None`: nothing to send now.
fn choose_signal(
    rule: &Rule,
    waiter: &Waiter,
    session: &Session,
    earlier: Option<&(Signal, SystemTime)>,
    now: SystemTime,
) -> Option<(Signal, String)> {
    let grace = rule.terminate_after.unwrap_or(Duration::ZERO);
    let waited = format!("{} has waited {:.1}s", waiter.lock.mode, waiter.wait.as_secs_f64());
    if idle_in_transaction(session) {
        // Cancel cannot end a transaction that runs no statement; the
        // session gets the same grace an active one gets after its cancel.
        if earlier.is_some() || waiter.wait < rule.min_wait + grace {
            return None;
        }
        return Some((
            Signal::Terminate,
            format!("{waited}; the blocker is idle in transaction, which cancel cannot end"),
        ));
    }
    match earlier {
        None => Some((Signal::Cancel, waited)),
        Some((Signal::Cancel, cancelled_at)) => {
            let since = now.duration_since(*cancelled_at).unwrap_or(Duration::ZERO);
            (rule.terminate_after.is_some() && since >= grace).then(|| {
                (
                    Signal::Terminate,
                    format!(
                        "{waited}; the blocker still blocks {:.1}s after its cancel",
                        since.as_secs_f64()
                    ),
                )
            })
        }
        Some((Signal::Terminate, _)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::analyze;
    use crate::snapshot::{LockRow, Snapshot};

    const T0: u64 = 1_700_000_000;

    fn at(seconds: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(T0 as f64 + seconds)
    }

    fn session(pid: i32, state: &str) -> Session {
        Session {
            pid,
            datname: Some("app".into()),
            usename: Some("web".into()),
            application_name: Some("web".into()),
            backend_type: Some("client backend".into()),
            state: Some(state.into()),
            backend_start: Some(at(0.0)),
            xact_start: Some(at(1.0)),
            ..Session::default()
        }
    }

    fn lock(pid: i32, granted: bool, mode: &str, wait_start: Option<f64>) -> LockRow {
        LockRow {
            pid,
            granted,
            locktype: "relation".into(),
            mode: mode.into(),
            tag: "relation:1:2".into(),
            datname: Some("app".into()),
            relation: Some("public.orders".into()),
            wait_start: wait_start.map(at),
        }
    }

    /// A read (10) holds orders; an ALTER (20) has waited since t=50;
    /// `selects` SELECTs queue behind it. Sampled at t=100.
    fn incident(read_state: &str, selects: i32) -> (Snapshot, Session) {
        let mut read = session(10, read_state);
        read.application_name = Some("psql".into());
        read.usename = Some("analyst".into());
        let mut alter = session(20, "active");
        alter.application_name = Some("migrate".into());
        alter.blocked_by = Some(vec![10]);
        let mut sessions = vec![read.clone(), alter];
        let mut locks = vec![
            lock(10, true, "AccessShareLock", None),
            lock(20, false, "AccessExclusiveLock", Some(50.0)),
        ];
        for pid in 100..100 + selects {
            let mut select = session(pid, "active");
            select.blocked_by = Some(vec![20]);
            sessions.push(select);
            locks.push(lock(pid, false, "AccessShareLock", Some(60.0)));
        }
        let snapshot = Snapshot {
            taken_at: at(100.0),
            activity: Vec::new(),
            sessions,
            locks,
        };
        (snapshot, read)
    }

    fn policy(rule: Rule) -> Policy {
        Policy::acting(vec![rule])
    }

    fn rule(min_wait: f64) -> Rule {
        Rule::unblock_migrations(Duration::from_secs_f64(min_wait))
    }

    /// The same scene sampled at `t`.
    fn graph_at(snapshot: &Snapshot, t: f64) -> LockGraph {
        analyze(&Snapshot {
            taken_at: at(t),
            ..snapshot.clone()
        })
    }

    fn summary(decisions: &[Decision]) -> Vec<(i32, Signal, Option<Outcome>)> {
        decisions.iter().map(|d| (d.target.pid, d.signal, d.verdict)).collect()
    }

    #[test]
    fn globs() {
        let glob = |p: &str| Glob(p.into());
        assert!(glob("*").matches("public.orders"));
        assert!(glob("public.*").matches("public.orders"));
        assert!(!glob("public.*").matches("audit.orders"));
        assert!(glob("*.ord?rs").matches("public.orders"));
        assert!(glob("pg_dump*").matches("pg_dump"));
        assert!(!glob("pg_dump").matches("pg_dumpall"));
        assert!(glob("").matches(""));
    }

    #[test]
    fn cancels_the_hard_blocker_once_the_waiter_waited_long_enough() {
        let (snapshot, read) = incident("active", 3);
        let graph = analyze(&snapshot);
        let memory = Memory::default();
        assert!(
            decide(&graph, &policy(rule(60.0)), &memory, at(100.0)).is_empty(),
            "waited 50s < 60s"
        );
        let decisions = decide(&graph, &policy(rule(5.0)), &memory, at(100.0));
        assert_eq!(summary(&decisions), vec![(10, Signal::Cancel, None)]);
        assert_eq!(decisions[0].target, Identity::of(&read));
        assert_eq!(decisions[0].waiter.session.pid, 20);
        assert_eq!(decisions[0].rule, "unblock-migrations");
    }

    #[test]
    fn rule_filters_modes_relations_databases_applications_and_queue() {
        let (snapshot, _) = incident("active", 3);
        let graph = analyze(&snapshot);
        let none = |rule: Rule| decide(&graph, &policy(rule), &Memory::default(), at(100.0)).is_empty();
        assert!(none(Rule {
            waiter_modes: vec!["ShareLock".into()],
            ..rule(5.0)
        }));
        assert!(none(Rule {
            relations: vec![Glob("audit.*".into())],
            ..rule(5.0)
        }));
        assert!(none(Rule {
            databases: vec![Glob("other".into())],
            ..rule(5.0)
        }));
        assert!(none(Rule {
            waiter_applications: vec![Glob("rails".into())],
            ..rule(5.0)
        }));
        assert!(none(Rule {
            min_queue: 4,
            ..rule(5.0)
        }));
        assert!(!none(Rule {
            min_queue: 3,
            ..rule(5.0)
        }));
        // First match wins: a dry rule before an acting one.
        let mut two = policy(Rule {
            name: "first".into(),
            ..rule(5.0)
        });
        two.rules.push(Rule {
            name: "second".into(),
            ..rule(0.0)
        });
        assert_eq!(decide(&graph, &two, &Memory::default(), at(100.0))[0].rule, "first");
    }

    #[test]
    fn soft_blockers_are_never_cancelled() {
        // Rule on AccessShareLock waiters: the SELECTs' only blocker is the
        // ALTER, a soft blocker ahead in the queue. Nothing to cancel.
        let (snapshot, _) = incident("active", 3);
        let graph = analyze(&snapshot);
        let decisions = decide(
            &graph,
            &policy(Rule {
                waiter_modes: vec!["AccessShareLock".into()],
                ..rule(0.0)
            }),
            &Memory::default(),
            at(100.0),
        );
        assert!(decisions.is_empty(), "{decisions:?}");
    }

    #[test]
    fn cancel_waiter_cancels_the_waiter_itself() {
        let (snapshot, _) = incident("active", 5);
        let graph = analyze(&snapshot);
        let waiter_rule = Rule {
            action: Action::CancelWaiter,
            min_queue: 5,
            ..rule(0.0)
        };
        let decisions = decide(&graph, &policy(waiter_rule.clone()), &Memory::default(), at(100.0));
        assert_eq!(summary(&decisions), vec![(20, Signal::Cancel, None)]);
        let (short, _) = incident("active", 4);
        assert!(decide(&analyze(&short), &policy(waiter_rule), &Memory::default(), at(100.0)).is_empty());
    }

    #[test]
    fn protected_and_non_client_sessions_are_reported_once_never_signalled() {
        let (mut snapshot, _) = incident("active", 1);
        let protect = Rule {
            protect_users: vec![Glob("analyst".into())],
            ..rule(5.0)
        };
        let graph = analyze(&snapshot);
        let mut memory = Memory::default();
        let decisions = decide(&graph, &policy(protect.clone()), &memory, at(100.0));
        assert_eq!(
            summary(&decisions),
            vec![(10, Signal::Cancel, Some(Outcome::Protected))]
        );
        assert!(decisions[0].reason.contains("user `analyst` is protected"));
        memory.record(&decisions[0], Outcome::Protected, at(100.0));
        assert!(
            decide(&graph, &policy(protect), &memory, at(100.5)).is_empty(),
            "reported once"
        );

        for (field, value, reason) in [
            ("application", "pg_dump", "application `pg_dump` is protected"),
            ("application", "lockjam", "lockjam's own sessions"),
            (
                "backend_type",
                "autovacuum worker",
                "an autovacuum worker: lockjam never signals one",
            ),
            (
                "backend_type",
                "background worker",
                "backend type `background worker`, not a client backend",
            ),
        ] {
            let read = snapshot.sessions.iter_mut().find(|s| s.pid == 10).unwrap();
            read.application_name = Some("psql".into());
            read.backend_type = Some("client backend".into());
            match field {
                "application" => read.application_name = Some(value.into()),
                _ => read.backend_type = Some(value.into()),
            }
            let r = Rule {
                protect_applications: vec![Glob("pg_dump".into())],
                ..rule(5.0)
            };
            let decisions = decide(&analyze(&snapshot), &policy(r), &Memory::default(), at(100.0));
            assert_eq!(decisions[0].verdict, Some(Outcome::Protected), "{value}");
            assert!(decisions[0].reason.contains(reason), "{}", decisions[0].reason);
        }
    }

    #[test]
    fn prepared_transaction_is_reported_never_signalled() {
        let (mut snapshot, _) = incident("active", 1);
        snapshot.sessions.retain(|s| s.pid != 10);
        snapshot.locks.retain(|l| l.pid != 10);
        snapshot.sessions.iter_mut().find(|s| s.pid == 20).unwrap().blocked_by = Some(vec![0]);
        let decisions = decide(&analyze(&snapshot), &policy(rule(5.0)), &Memory::default(), at(100.0));
        assert_eq!(summary(&decisions), vec![(0, Signal::Cancel, Some(Outcome::Protected))]);
        assert!(decisions[0].reason.contains("ROLLBACK PREPARED"));
    }

    #[test]
    fn idle_in_transaction_blocker_is_terminated_after_the_grace() {
        let (snapshot, _) = incident("idle in transaction", 1);
        let graph = analyze(&snapshot);
        // Waited 50s: min_wait 30 + terminate_after 30 = 60 not reached.
        let thirty = |r: Rule| Rule {
            terminate_after: Some(Duration::from_secs(30)),
            ..r
        };
        assert!(decide(&graph, &policy(thirty(rule(30.0))), &Memory::default(), at(100.0)).is_empty());
        let decisions = decide(&graph, &policy(thirty(rule(20.0))), &Memory::default(), at(100.0));
        assert_eq!(summary(&decisions), vec![(10, Signal::Terminate, None)]);
        assert!(decisions[0].reason.contains("idle in transaction"));
        let never = Rule {
            terminate_after: None,
            ..rule(5.0)
        };
        let decisions = decide(&graph, &policy(never), &Memory::default(), at(100.0));
        assert_eq!(decisions[0].verdict, Some(Outcome::Protected));
    }

    #[test]
    fn escalates_to_terminate_for_the_same_blocker_only() {
        let (snapshot, _) = incident("active", 1);
        let policy = policy(rule(5.0)); // terminate_after 10s
        let mut memory = Memory::default();
        let first = decide(&graph_at(&snapshot, 100.0), &policy, &memory, at(100.0));
        memory.record(&first[0], Outcome::Success, at(100.0));
        let waiting = decide(&graph_at(&snapshot, 105.0), &policy, &memory, at(105.0));
        assert!(waiting.is_empty(), "cancelled; waiting");
        let later = decide(&graph_at(&snapshot, 110.0), &policy, &memory, at(110.0));
        assert_eq!(summary(&later), vec![(10, Signal::Terminate, None)]);
        assert!(
            later[0].reason.contains("still blocks 10.0s after its cancel"),
            "{}",
            later[0].reason
        );
        memory.record(&later[0], Outcome::Success, at(110.0));
        assert!(decide(&graph_at(&snapshot, 111.0), &policy, &memory, at(111.0)).is_empty());

        // The same pid in a new transaction is another identity: cancel again.
        let (mut moved, _) = incident("active", 1);
        moved.sessions.iter_mut().find(|s| s.pid == 10).unwrap().xact_start = Some(at(99.0));
        let decisions = decide(&graph_at(&moved, 111.0), &policy, &memory, at(111.0));
        assert_eq!(summary(&decisions), vec![(10, Signal::Cancel, None)]);
    }

    #[test]
    fn rate_limit_and_dry_run() {
        let (snapshot, _) = incident("active", 1);
        let graph = analyze(&snapshot);
        let mut limited = policy(rule(5.0));
        limited.max_actions_per_minute = 1;
        let mut memory = Memory::default();
        let other = Decision {
            target: Identity {
                pid: 77,
                backend_start: None,
                xact_start: None,
            },
            ..decide(&graph, &limited, &memory, at(100.0)).remove(0)
        };
        memory.record(&other, Outcome::Success, at(90.0));
        let decisions = decide(&graph, &limited, &memory, at(100.0));
        assert_eq!(
            summary(&decisions),
            vec![(10, Signal::Cancel, Some(Outcome::RateLimited))]
        );
        memory.record(&decisions[0], Outcome::RateLimited, at(100.0));
        let later = graph_at(&snapshot, 101.0);
        assert!(decide(&later, &limited, &memory, at(101.0)).is_empty(), "reported once");
        // A minute after the earlier action, the budget is back.
        let decisions = decide(&graph_at(&snapshot, 151.0), &limited, &memory, at(151.0));
        assert_eq!(summary(&decisions), vec![(10, Signal::Cancel, None)]);

        let mut dry = policy(rule(5.0));
        dry.dry_run = true;
        let decisions = decide(&graph, &dry, &Memory::default(), at(100.0));
        assert_eq!(summary(&decisions), vec![(10, Signal::Cancel, Some(Outcome::DryRun))]);
    }

    #[test]
    fn stale_snapshot_or_disabled_policy_decides_nothing() {
        let (snapshot, _) = incident("active", 1);
        let graph = analyze(&snapshot);
        assert!(decide(&graph, &policy(rule(5.0)), &Memory::default(), at(101.5)).is_empty());
        let mut off = policy(rule(5.0));
        off.enabled = false;
        assert!(decide(&graph, &off, &Memory::default(), at(100.0)).is_empty());
    }

    #[test]
    fn permission_denied_is_not_retried() {
        let (snapshot, _) = incident("active", 1);
        let graph = analyze(&snapshot);
        let mut memory = Memory::default();
        let decisions = decide(&graph, &policy(rule(5.0)), &memory, at(100.0));
        memory.record(&decisions[0], Outcome::PermissionDenied, at(100.0));
        assert!(decide(&graph, &policy(rule(5.0)), &memory, at(120.0)).is_empty());
    }

    #[test]
    fn one_blocker_of_several_waiters_is_signalled_once_per_tick() {
        let (mut snapshot, _) = incident("active", 0);
        let mut second = session(21, "active");
        second.blocked_by = Some(vec![10, 20]);
        snapshot.sessions.push(second);
        snapshot.locks.push(lock(21, false, "AccessExclusiveLock", Some(55.0)));
        let decisions = decide(&analyze(&snapshot), &policy(rule(5.0)), &Memory::default(), at(100.0));
        assert_eq!(summary(&decisions), vec![(10, Signal::Cancel, None)]);
    }
}
