//! The policy, pure: which sessions to signal for a lock graph, under the
//! safety rules of docs/policy.md. No I/O and no clock reads: `now` is an
//! argument, and what must be remembered between ticks (who was signalled
//! when, what was already reported, the rate limit) is a [`Memory`] the
//! caller keeps and updates with [`Memory::record`].
//!
//! For each waiter a rule matches, `cancel_blockers` signals the *root
//! blockers* of the waiter's wait tree: the sessions it waits on, directly
//! or through other waiting sessions, that wait on no one. A session that
//! waits is a victim and is never signalled. Rules are tried in order; a
//! rule that matches but can signal none of its targets (protected, or
//! permission denied) hands the waiter to the next matching rule.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::analysis::{Blocker, LockGraph, Waiter};
use crate::snapshot::Session;

/// A snapshot older than this is stale: nothing is decided on it.
pub(crate) const MAX_SNAPSHOT_AGE: Duration = Duration::from_secs(1);

/// The lock modes migrations queue on, which rules match by default:
/// SHARE ROW EXCLUSIVE (`ADD FOREIGN KEY`, `CREATE TRIGGER`), EXCLUSIVE
/// (`REFRESH MATERIALIZED VIEW CONCURRENTLY`) and ACCESS EXCLUSIVE (most of
/// `ALTER TABLE`, `DROP`, `TRUNCATE`). SHARE (`CREATE INDEX` without
/// `CONCURRENTLY`) is left out: such a build blocks writers for as long as
/// it runs once it has its lock, so clearing its way moves the outage
/// rather than ending it; and applications take SHARE themselves
/// (`LOCK TABLE ... IN SHARE MODE`) to freeze writes.
pub const DEFAULT_WAITER_MODES: [&str; 3] = ["ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"];
/// Rules match waits for a lock on a relation by default. Row-lock waits
/// (`transactionid`, and `tuple`, whose mode reads AccessExclusiveLock for
/// a plain `SELECT ... FOR UPDATE`) are an application's own business.
pub(crate) const DEFAULT_WAITER_LOCKTYPES: [&str; 1] = ["relation"];
/// With `terminate_after = "0s"`, a root blocker that still blocks this long
/// after its cancel counts as one the rule cannot signal, and the waiter
/// goes to the next matching rule.
pub(crate) const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// What a rule does: the `action` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum Action {
    /// Cancel the root blockers of the waiter's wait tree; terminate what
    /// cancel cannot end.
    CancelBlockers,
    /// Cancel the waiter itself: a server-side lock_timeout.
    CancelWaiter,
}

impl Action {
    pub const ALL: [Action; 2] = [Action::CancelBlockers, Action::CancelWaiter];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::CancelBlockers => "cancel_blockers",
            Action::CancelWaiter => "cancel_waiter",
        }
    }
}

impl TryFrom<String> for Action {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        Action::ALL
            .into_iter()
            .find(|action| action.as_str() == text)
            .ok_or_else(|| format!("`{text}` is not an action: use cancel_blockers or cancel_waiter"))
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Glob(pub String);

impl Glob {
    /// Matches in time proportional to pattern × text: on a mismatch after
    /// a `*`, the `*` takes one more character and matching resumes there,
    /// so patterns with many stars cannot be made to backtrack
    /// exponentially by a session's name.
    pub fn matches(&self, text: &str) -> bool {
        let pattern: Vec<char> = self.0.chars().collect();
        let text: Vec<char> = text.chars().collect();
        let (mut p, mut t) = (0, 0);
        // The last `*` seen, and the text position it currently reaches to.
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match pattern.get(p) {
                Some('*') => {
                    star = Some((p, t));
                    p += 1;
                }
                Some('?') => {
                    p += 1;
                    t += 1;
                }
                Some(c) if *c == text[t] => {
                    p += 1;
                    t += 1;
                }
                _ => match star {
                    Some((star_p, star_t)) => {
                        star = Some((star_p, star_t + 1));
                        p = star_p + 1;
                        t = star_t + 1;
                    }
                    None => return false,
                },
            }
        }
        pattern[p..].iter().all(|c| *c == '*')
    }
}

fn any_matches(globs: &[Glob], text: &str) -> bool {
    globs.iter().any(|g| g.matches(text))
}

fn patterns(globs: &[Glob]) -> String {
    globs.iter().map(|g| g.0.as_str()).collect::<Vec<_>>().join(",")
}

/// Sessions never signalled, by user, application or database (globs):
/// the `protect_*` keys of a policy or of a rule.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Protections<'a> {
    pub users: &'a [Glob],
    pub applications: &'a [Glob],
    pub databases: &'a [Glob],
}

impl Protections<'_> {
    /// Why `session` is protected, if it is.
    fn reason(&self, session: &Session) -> Option<String> {
        let user = session.usename.as_deref().unwrap_or("");
        let application = session.application_name.as_deref().unwrap_or("");
        let database = session.datname.as_deref().unwrap_or("");
        if any_matches(self.users, user) {
            return Some(format!("user `{user}` is protected"));
        }
        if any_matches(self.applications, application) {
            return Some(format!("application `{application}` is protected"));
        }
        if any_matches(self.databases, database) {
            return Some(format!("database `{database}` is protected"));
        }
        None
    }

    /// The protections, in one line: `users a,b; applications pg_dump*`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("users", self.users),
            ("applications", self.applications),
            ("databases", self.databases),
        ]
        .into_iter()
        .filter(|(_, globs)| !globs.is_empty())
        .map(|(what, globs)| format!("{what} {}", patterns(globs)))
        .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join("; ")
        }
    }
}

/// One `[[policy.rules]]` table, as written (serde reads and writes it);
/// `config` checks what spans its keys.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rule {
    /// The `rule` label.
    pub name: String,
    /// Lock modes (`AccessExclusiveLock`, ...) of the waits the rule is about.
    pub waiter_modes: Vec<String>,
    /// `pg_locks.locktype` of the waits the rule is about.
    pub waiter_locktypes: Vec<String>,
    /// Schema-qualified relation names (`public.orders`).
    pub relations: Vec<Glob>,
    pub databases: Vec<Glob>,
    pub waiter_applications: Vec<Glob>,
    #[serde(with = "crate::duration::or_zero")]
    pub min_wait: Duration,
    /// Sessions behind the waiter, at least.
    pub min_queue: u64,
    pub action: Action,
    /// `None` (written `"0s"`): never terminate.
    #[serde(with = "crate::duration::zero_is_never")]
    pub terminate_after: Option<Duration>,
    /// Protected from this rule, in addition to the policy's protections.
    pub protect_users: Vec<Glob>,
    pub protect_applications: Vec<Glob>,
    pub protect_databases: Vec<Glob>,
    /// Whether the rule acts on a hot standby too. Off by default: there,
    /// PostgreSQL resolves a recovery conflict itself after
    /// `max_standby_streaming_delay`, and a standby query may be a report
    /// someone waits for.
    pub on_standby: bool,
}

impl Default for Rule {
    /// Every default of a rule (`config/lockjam.toml` spells them out),
    /// but no name: each rule is given one.
    fn default() -> Self {
        let everything = || vec![Glob("*".into())];
        Rule {
            name: String::new(),
            waiter_modes: DEFAULT_WAITER_MODES.iter().map(|m| m.to_string()).collect(),
            waiter_locktypes: DEFAULT_WAITER_LOCKTYPES.iter().map(|t| t.to_string()).collect(),
            relations: everything(),
            databases: everything(),
            waiter_applications: everything(),
            min_wait: Duration::from_secs(5),
            min_queue: 0,
            action: Action::CancelBlockers,
            terminate_after: Some(Duration::from_secs(10)),
            protect_users: Vec::new(),
            protect_applications: Vec::new(),
            protect_databases: Vec::new(),
            on_standby: false,
        }
    }
}

impl Rule {
    /// The rule of `lockjam run --cancel-blockers-after`, and of the
    /// shipped configuration's example: every default.
    pub fn unblock_migrations(min_wait: Duration) -> Rule {
        Rule {
            name: UNBLOCK_MIGRATIONS.into(),
            min_wait,
            ..Rule::default()
        }
    }

    /// Who this rule never signals, beyond the policy's protections.
    pub(crate) fn protections(&self) -> Protections<'_> {
        Protections {
            users: &self.protect_users,
            applications: &self.protect_applications,
            databases: &self.protect_databases,
        }
    }

    fn matches(&self, waiter: &Waiter) -> bool {
        self.concerns(waiter) && waiter.wait >= self.min_wait && waiter.behind >= self.min_queue
    }

    /// Whether the rule is about this waiter's kind of wait, however long
    /// it has waited and however many wait behind it.
    pub(crate) fn concerns(&self, waiter: &Waiter) -> bool {
        self.waiter_locktypes.contains(&waiter.lock.locktype)
            && self.waiter_modes.contains(&waiter.lock.mode)
            && any_matches(&self.relations, &waiter.lock.relation_label())
            && any_matches(&self.databases, waiter.datname())
            && any_matches(
                &self.waiter_applications,
                waiter.session.application_name.as_deref().unwrap_or(""),
            )
    }

    /// The rule in one line, for the start-up log.
    pub fn describe(&self) -> String {
        let show = crate::duration::show;
        format!(
            "rule `{}`: {} when a {} wait for {} on {} in database {} from application {} has waited {}{}; {}; protects {}; {}",
            self.name,
            self.action.as_str(),
            self.waiter_locktypes.join("/"),
            self.waiter_modes.join("/"),
            patterns(&self.relations),
            patterns(&self.databases),
            patterns(&self.waiter_applications),
            show(self.min_wait),
            if self.min_queue > 0 {
                format!(" with {} or more behind it", self.min_queue)
            } else {
                String::new()
            },
            match self.terminate_after {
                Some(after) => format!("terminate after {}", show(after)),
                None => "never terminate".into(),
            },
            self.protections().describe(),
            if self.on_standby {
                "acts on a hot standby too"
            } else {
                "not on a hot standby"
            }
        )
    }
}

/// The name of the rule `--cancel-blockers-after` builds or adjusts.
pub(crate) const UNBLOCK_MIGRATIONS: &str = "unblock-migrations";

/// The `[policy]` section, as written (serde reads and writes it).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub enabled: bool,
    pub dry_run: bool,
    /// Signals per target per minute, at most.
    pub max_actions_per_minute: u32,
    /// Protected from every rule.
    pub protect_users: Vec<Glob>,
    pub protect_applications: Vec<Glob>,
    pub protect_databases: Vec<Glob>,
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

    /// Who no rule ever signals.
    pub(crate) fn protections(&self) -> Protections<'_> {
        Protections {
            users: &self.protect_users,
            applications: &self.protect_applications,
            databases: &self.protect_databases,
        }
    }

    /// `off`, `dry run` or `live`.
    pub fn mode(&self) -> &'static str {
        match (self.enabled, self.dry_run) {
            (false, _) => "off",
            (true, true) => "dry run",
            (true, false) => "live",
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            enabled: false,
            dry_run: true,
            max_actions_per_minute: 30,
            protect_users: Vec::new(),
            protect_applications: Vec::new(),
            protect_databases: Vec::new(),
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

/// Whether a decision's signal is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The enforcer sends it, after its checks.
    Send,
    /// Not sent, with this outcome: dry run, protected or rate limited.
    Withhold(Outcome),
}

/// One thing the policy decided: a signal to one session on behalf of one
/// waiter, or the reason it sends none.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub rule: String,
    pub action: Action,
    pub signal: Signal,
    /// The session to signal: a root blocker, or the waiter itself for
    /// `cancel_waiter`.
    pub signalled: Identity,
    /// `None` for a prepared transaction (pid 0), which has no session.
    pub signalled_session: Option<Session>,
    pub waiter: Waiter,
    /// The root blockers of the waiter's wait tree, as sampled: whom the
    /// waiter waits on, for the audit event.
    pub roots: Vec<Blocker>,
    /// When the sample the decision was made on was taken (server clock).
    pub sampled_at: SystemTime,
    /// Whether the server was a hot standby: the enforcer then follows
    /// WAL replay's waits too, which pg_blocking_pids does not know.
    pub in_recovery: bool,
    /// Whether the signal goes out, or what became of it without the
    /// database (dry run, protected, rate limited).
    pub verdict: Verdict,
    /// Why, in words, for the audit event.
    pub reason: String,
}

/// A waiter a rule matches whose wait tree is a deadlock cycle: there is
/// no root to signal, and PostgreSQL's deadlock detector breaks the cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct Deadlock {
    pub rule: String,
    pub waiter: Waiter,
}

/// What [`decide`] returns: decisions to carry out and deadlocks to report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub decisions: Vec<Decision>,
    pub deadlocks: Vec<Deadlock>,
}

/// A signal sent (or that would have been, in dry run).
#[derive(Debug, Clone, Copy)]
struct Signalled {
    signal: Signal,
    /// When the first signal to this session was sent.
    at: SystemTime,
    /// When the last one was.
    last: SystemTime,
    dry_run: bool,
}

/// What the policy remembers between ticks.
#[derive(Debug, Default, Clone)]
pub struct Memory {
    signalled: HashMap<Identity, Signalled>,
    /// (rule, session, outcome) already reported as protected or rate
    /// limited: reported once, not every tick.
    reported: HashSet<(String, Identity, Outcome)>,
    /// Waiters (pid, backend start) whose deadlock was reported.
    deadlocks: HashSet<(i32, Option<SystemTime>)>,
    /// Sessions lockjam may not signal (permission denied): not retried.
    denied: HashSet<Identity>,
    /// Sessions whose signal failed (a backend that did not exit, a lost
    /// session): how many times in a row, and when to try again, so that
    /// one stuck backend neither floods the log nor spends the rate limit
    /// that other queues need.
    failed: HashMap<Identity, (u32, SystemTime)>,
    /// When signalling statements were sent, for the rate limit.
    recent: VecDeque<SystemTime>,
}

/// After a failed signal, a session is tried again after this long,
/// doubling with each failure in a row, up to [`MAX_RETRY_PAUSE`].
const RETRY_PAUSE: Duration = Duration::from_secs(2);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(60);
/// Entries older than this are forgotten.
const MEMORY_HORIZON: Duration = Duration::from_secs(3600);
/// Sets of reports larger than this start afresh.
const MEMORY_LIMIT: usize = 10_000;

impl Memory {
    /// Remembers what became of a decision.
    pub fn record(&mut self, decision: &Decision, outcome: Outcome, now: SystemTime) {
        let identity = decision.signalled.clone();
        match outcome {
            Outcome::Success | Outcome::DryRun => {
                self.failed.remove(&identity);
                let first = self.signalled.get(&identity).map_or(now, |earlier| earlier.at);
                self.signalled.insert(
                    identity,
                    Signalled {
                        signal: decision.signal,
                        at: first,
                        last: now,
                        dry_run: outcome == Outcome::DryRun,
                    },
                );
                self.recent.push_back(now);
            }
            Outcome::Error => {
                let failures = self.failed.get(&identity).map_or(0, |(n, _)| *n) + 1;
                let pause = RETRY_PAUSE
                    .saturating_mul(1 << (failures - 1).min(6))
                    .min(MAX_RETRY_PAUSE);
                self.failed.insert(identity, (failures, now + pause));
                self.recent.push_back(now);
            }
            Outcome::Gone | Outcome::NotBlocking => self.recent.push_back(now),
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

    /// Remembers that a deadlock was reported, so that it is reported once.
    pub(crate) fn record_deadlock(&mut self, deadlock: &Deadlock) {
        if self.deadlocks.len() > MEMORY_LIMIT {
            self.deadlocks.clear();
        }
        self.deadlocks.insert(waiter_key(&deadlock.waiter));
    }

    fn forget_before(&mut self, now: SystemTime) {
        let minute_ago = now
            .checked_sub(Duration::from_secs(60))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        while self.recent.front().is_some_and(|t| *t < minute_ago) {
            self.recent.pop_front();
        }
        let horizon = now.checked_sub(MEMORY_HORIZON).unwrap_or(SystemTime::UNIX_EPOCH);
        self.signalled.retain(|_, signalled| signalled.at >= horizon);
        if self.reported.len() > MEMORY_LIMIT {
            self.reported.clear();
        }
        if self.denied.len() > MEMORY_LIMIT {
            self.denied.clear();
        }
        self.failed.retain(|_, (_, retry_at)| *retry_at >= horizon);
    }

    fn actions_in_last_minute(&self, now: SystemTime) -> usize {
        let minute_ago = now
            .checked_sub(Duration::from_secs(60))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.recent.iter().filter(|t| **t >= minute_ago).count()
    }
}

fn waiter_key(waiter: &Waiter) -> (i32, Option<SystemTime>) {
    (waiter.session.pid, waiter.session.backend_start)
}

/// Why a session must never be signalled by `rule`, if it must not.
pub(crate) fn protection(session: &Session, own_pids: &[i32], policy: &Policy, rule: &Rule) -> Option<String> {
    if own_pids.contains(&session.pid) {
        return Some("one of this lockjam's own sessions".into());
    }
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
    policy
        .protections()
        .reason(session)
        .or_else(|| rule.protections().reason(session))
}

fn idle_in_transaction(session: &Session) -> bool {
    session
        .state
        .as_deref()
        .is_some_and(|s| s.starts_with("idle in transaction"))
}

/// What a rule can do about one of its targets now.
enum Assessment {
    /// Send this signal, for this reason.
    Send(Signal, String),
    /// The rule may never signal it (protected, a prepared transaction,
    /// terminating forbidden): reported once, and the waiter goes on to the
    /// next rule if no other target can be signalled.
    Refused(Signal, String),
    /// Permission was denied before: already reported, never retried.
    Denied,
    /// Being dealt with: signalled and within its grace, already decided
    /// this tick for another waiter, or ended between the reads.
    InHand,
}

/// What a rule is about to signal, and what it decides with.
struct Candidate<'a> {
    pid: i32,
    session: Option<&'a Session>,
}

fn assess(
    rule: &Rule,
    policy: &Policy,
    graph: &LockGraph,
    waiter: &Waiter,
    candidate: &Candidate,
    memory: &Memory,
    now: SystemTime,
) -> Assessment {
    let (pid, session) = (candidate.pid, candidate.session);
    if pid == 0 {
        return Assessment::Refused(
            Signal::Cancel,
            "a prepared transaction (pid 0) has no backend to signal: end it with COMMIT PREPARED or ROLLBACK PREPARED"
                .into(),
        );
    }
    let Some(session) = session else {
        return Assessment::InHand;
    };
    if let Some(reason) = protection(session, &graph.own_pids, policy, rule) {
        return Assessment::Refused(Signal::Cancel, reason);
    }
    let identity = Identity::of(session);
    if memory.denied.contains(&identity) {
        return Assessment::Denied;
    }
    if memory
        .failed
        .get(&identity)
        .is_some_and(|(_, retry_at)| *retry_at > now)
    {
        return Assessment::InHand;
    }
    choose_signal(rule, waiter, session, memory.signalled.get(&identity), now)
}

/// Cancel first. Terminate a session that cancel cannot help (idle in
/// transaction) at once, and one that still blocks `terminate_after` after
/// its cancel. In dry run nothing follows a cancel: whether the cancel
/// would have freed the waiter is not known.
fn choose_signal(
    rule: &Rule,
    waiter: &Waiter,
    session: &Session,
    earlier: Option<&Signalled>,
    now: SystemTime,
) -> Assessment {
    let waited = format!(
        "the waiter has waited {:.1}s (min_wait {})",
        waiter.wait.as_secs_f64(),
        crate::duration::show(rule.min_wait)
    );
    if rule.action == Action::CancelWaiter {
        // A server-side lock_timeout: each wait is cancelled once, and
        // never escalated. A wait that began after the last cancel (a
        // retry in the same transaction) is another wait.
        let waits_again = earlier.is_some_and(|e| !e.dry_run && waiter.wait_start.is_some_and(|start| start > e.last));
        return match earlier {
            None => Assessment::Send(Signal::Cancel, waited),
            Some(_) if waits_again => Assessment::Send(Signal::Cancel, format!("{waited}, again after its cancel")),
            Some(_) => Assessment::InHand,
        };
    }
    let Some(earlier) = earlier else {
        if !idle_in_transaction(session) {
            return Assessment::Send(Signal::Cancel, waited);
        }
        return match rule.terminate_after {
            Some(_) => Assessment::Send(
                Signal::Terminate,
                format!("{waited}; the blocker is idle in transaction, which cancel cannot end"),
            ),
            None => Assessment::Refused(
                Signal::Terminate,
                "the blocker is idle in transaction, which cancel cannot end, and terminate_after = \"0s\" forbids terminating"
                    .into(),
            ),
        };
    };
    if earlier.dry_run || earlier.signal == Signal::Terminate {
        return Assessment::InHand;
    }
    let since = now.duration_since(earlier.at).unwrap_or(Duration::ZERO);
    match rule.terminate_after {
        Some(grace) if since >= grace => Assessment::Send(
            Signal::Terminate,
            format!("the blocker still blocks {:.1}s after its cancel", since.as_secs_f64()),
        ),
        None if since >= CANCEL_GRACE => Assessment::Refused(
            Signal::Terminate,
            format!(
                "the blocker still blocks {:.1}s after its cancel, and terminate_after = \"0s\" forbids terminating",
                since.as_secs_f64()
            ),
        ),
        _ => Assessment::InHand,
    }
}

/// Where a waiter goes when `rule` can signal none of its targets, in
/// words: the next rule about its kind of wait, now or once it has waited
/// long enough (or has enough behind it), or nowhere.
fn handover(policy: &Policy, rule: &Rule, waiter: &Waiter) -> String {
    let later = policy
        .rules
        .iter()
        .skip_while(|r| r.name != rule.name)
        .skip(1)
        .find(|r| r.concerns(waiter));
    match later {
        Some(next) if next.matches(waiter) => format!("; the waiter goes to rule `{}`", next.name),
        Some(next) => format!(
            "; the waiter goes to rule `{}` once it has waited {} with {} or more behind it",
            next.name,
            crate::duration::show(next.min_wait),
            next.min_queue
        ),
        None => "; no later rule matches: the waiter stays queued".into(),
    }
}

/// Decides what to signal. `now` is the server's clock now; nothing is
/// decided on a snapshot older than [`MAX_SNAPSHOT_AGE`].
pub fn decide(graph: &LockGraph, policy: &Policy, memory: &Memory, now: SystemTime) -> Plan {
    let age = now.duration_since(graph.taken_at).unwrap_or(Duration::ZERO);
    if !policy.enabled || age > MAX_SNAPSHOT_AGE {
        return Plan::default();
    }
    let mut deciding = Deciding {
        graph,
        policy,
        memory,
        now,
        plan: Plan::default(),
        budget: (policy.max_actions_per_minute as usize).saturating_sub(memory.actions_in_last_minute(now)),
        decided: HashSet::new(),
        reported: HashSet::new(),
    };
    // Longest waits first, so that the rate limit spends itself on the
    // oldest queue.
    let mut waiters: Vec<&Waiter> = graph.waiters.iter().collect();
    waiters.sort_by(|a, b| b.wait.cmp(&a.wait).then(a.session.pid.cmp(&b.session.pid)));
    for waiter in waiters {
        deciding.waiter(waiter);
    }
    deciding.plan
}

/// The next moment, on the server's clock, at which [`decide`] could
/// decide something new for the waiters of `graph` without anything else
/// changing: a waiter reaching a rule's `min_wait`, a cancelled blocker
/// reaching `terminate_after` or the cancel's grace, a failed signal's
/// retry. The service samples then, so that the policy acts on time rather
/// than on its next tick. `None` when nothing is due (no waiter, or the
/// policy is off).
pub fn next_deadline(graph: &LockGraph, policy: &Policy, memory: &Memory) -> Option<SystemTime> {
    if !policy.enabled || graph.waiters.is_empty() {
        return None;
    }
    let rules: Vec<&Rule> = policy
        .rules
        .iter()
        .filter(|rule| rule.on_standby || !graph.in_recovery)
        .collect();
    let waits = graph.waiters.iter().flat_map(|waiter| {
        rules
            .iter()
            .filter(|rule| rule.concerns(waiter) && waiter.wait < rule.min_wait)
            .map(|rule| graph.taken_at + (rule.min_wait - waiter.wait))
    });
    // Only cancel_blockers follows a cancel up (cancel_waiter never does).
    let escalations = memory
        .signalled
        .values()
        .filter(|signalled| signalled.signal == Signal::Cancel && !signalled.dry_run)
        .flat_map(|signalled| {
            rules
                .iter()
                .filter(|rule| rule.action == Action::CancelBlockers)
                .map(|rule| signalled.at + rule.terminate_after.unwrap_or(CANCEL_GRACE))
        });
    let retries = memory.failed.values().map(|(_, retry_at)| *retry_at);
    waits
        .chain(escalations)
        .chain(retries)
        .filter(|at| *at > graph.taken_at)
        .min()
}

/// One run of [`decide`]: what it reads, and what it has decided so far.
struct Deciding<'a> {
    graph: &'a LockGraph,
    policy: &'a Policy,
    memory: &'a Memory,
    now: SystemTime,
    plan: Plan,
    /// Signals left under `max_actions_per_minute`.
    budget: usize,
    /// One signal per pid per tick...
    decided: HashSet<i32>,
    /// ...and one report per (rule, pid, outcome).
    reported: HashSet<(String, i32, Outcome)>,
}

/// A session a rule would signal, with what its assessment said.
type Assessed<'a> = (i32, Option<&'a Session>, Assessment);

impl<'a> Deciding<'a> {
    /// Tries the rules that match `waiter` in order, until one handles it.
    fn waiter(&mut self, waiter: &'a Waiter) {
        let graph = self.graph;
        let rules: Vec<&'a Rule> = self
            .policy
            .rules
            .iter()
            .filter(|rule| (rule.on_standby || !graph.in_recovery) && rule.matches(waiter))
            .collect();
        if rules.is_empty() {
            return;
        }
        let tree = graph.wait_tree(waiter.session.pid);
        if tree.deadlock {
            // No root to signal: PostgreSQL's deadlock detector breaks the
            // cycle after deadlock_timeout; no rule acts on it.
            if !self.memory.deadlocks.contains(&waiter_key(waiter)) {
                self.plan.deadlocks.push(Deadlock {
                    rule: rules[0].name.clone(),
                    waiter: waiter.clone(),
                });
            }
            return;
        }
        let roots: Vec<Blocker> = tree
            .roots
            .iter()
            .filter_map(|pid| graph.blocker(*pid).cloned())
            .collect();
        // Rules that matched before this one but could signal nothing.
        let mut passed: Vec<&str> = Vec::new();
        for rule in rules {
            let assessed = self.assess_targets(rule, waiter, &tree);
            if assessed.is_empty() {
                // No root yet: a tree in motion (a blocker began to wait
                // between the reads), which the next sample shows settled.
                break;
            }
            let handles = assessed
                .iter()
                .any(|(_, _, a)| matches!(a, Assessment::Send(..) | Assessment::InHand));
            let handover = if handles {
                String::new()
            } else {
                handover(self.policy, rule, waiter)
            };
            let preface = if passed.is_empty() {
                String::new()
            } else {
                format!("rule `{}` could signal none of its targets; ", passed.join("`, `"))
            };
            for assessed in assessed {
                self.record(rule, waiter, assessed, &roots, &preface, &handover);
            }
            if handles {
                break;
            }
            passed.push(&rule.name);
        }
    }

    /// The sessions `rule` would signal for `waiter` (its tree's roots, or
    /// the waiter itself), each assessed; one already signalled this tick
    /// is in hand.
    fn assess_targets(&self, rule: &Rule, waiter: &'a Waiter, tree: &crate::analysis::WaitTree) -> Vec<Assessed<'a>> {
        let graph = self.graph;
        let targets: Vec<(i32, Option<&'a Session>)> = match rule.action {
            Action::CancelBlockers => tree
                .roots
                .iter()
                .map(|pid| (*pid, graph.blocker(*pid).and_then(|b| b.session.as_ref())))
                .collect(),
            Action::CancelWaiter => vec![(waiter.session.pid, Some(&waiter.session))],
        };
        targets
            .into_iter()
            .map(|(pid, session)| {
                let assessment = if self.decided.contains(&pid) {
                    Assessment::InHand
                } else {
                    let candidate = Candidate { pid, session };
                    assess(rule, self.policy, graph, waiter, &candidate, self.memory, self.now)
                };
                (pid, session, assessment)
            })
            .collect()
    }

    /// Turns one assessment into a decision: a signal within the budget,
    /// or a report (protected, rate limited) once.
    fn record(
        &mut self,
        rule: &Rule,
        waiter: &Waiter,
        (pid, session, assessment): Assessed<'_>,
        roots: &[Blocker],
        preface: &str,
        handover: &str,
    ) {
        let signalled = session.map(Identity::of).unwrap_or(Identity {
            pid,
            backend_start: None,
            xact_start: None,
        });
        let decision = |signal, verdict, reason: String| Decision {
            rule: rule.name.clone(),
            action: rule.action,
            signal,
            signalled: signalled.clone(),
            signalled_session: session.cloned(),
            waiter: waiter.clone(),
            roots: roots.to_vec(),
            sampled_at: self.graph.taken_at,
            in_recovery: self.graph.in_recovery,
            verdict,
            reason: format!("{preface}{reason}"),
        };
        let memory = self.memory;
        let reported = &mut self.reported;
        let mut report_once = |outcome: Outcome| {
            !memory
                .reported
                .contains(&(rule.name.clone(), signalled.clone(), outcome))
                && reported.insert((rule.name.clone(), pid, outcome))
        };
        match assessment {
            Assessment::Refused(signal, reason) => {
                if report_once(Outcome::Protected) {
                    let decided = decision(
                        signal,
                        Verdict::Withhold(Outcome::Protected),
                        format!("{reason}{handover}"),
                    );
                    self.plan.decisions.push(decided);
                }
            }
            Assessment::Send(signal, reason) if self.budget == 0 => {
                if report_once(Outcome::RateLimited) {
                    let reason = format!(
                        "max_actions_per_minute ({}) reached; {reason}",
                        self.policy.max_actions_per_minute
                    );
                    let decided = decision(signal, Verdict::Withhold(Outcome::RateLimited), reason);
                    self.plan.decisions.push(decided);
                }
            }
            Assessment::Send(signal, reason) => {
                self.budget -= 1;
                self.decided.insert(pid);
                let verdict = if self.policy.dry_run {
                    Verdict::Withhold(Outcome::DryRun)
                } else {
                    Verdict::Send
                };
                let decided = decision(signal, verdict, reason);
                self.plan.decisions.push(decided);
            }
            Assessment::Denied | Assessment::InHand => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::analyze;
    use crate::snapshot::{LockRow, Snapshot};

    const T0: u64 = 1_700_000_000;
    const AX: &str = "AccessExclusiveLock";
    const SRX: &str = "ShareRowExclusiveLock";
    const RX: &str = "RowExclusiveLock";

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
        let mut locks = vec![lock(10, true, "AccessShareLock", None), lock(20, false, AX, Some(50.0))];
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
            existing_databases: None,
            in_recovery: false,
        };
        (snapshot, read)
    }

    /// Incident 002 as the web and a migration tool stage it: the mailer
    /// (10) updated row 1 of users and runs a long statement; a web UPDATE
    /// of that row (11) waits for the mailer's transaction holding ROW
    /// EXCLUSIVE on users; ADD FOREIGN KEY (20) waits for SHARE ROW
    /// EXCLUSIVE behind both; writers (100..) queue behind it.
    fn incident_002(writers: i32) -> Snapshot {
        let mut mailer = session(10, "active");
        mailer.application_name = Some("mailer".into());
        let mut web = session(11, "active");
        web.blocked_by = Some(vec![10]);
        let mut migration = session(20, "active");
        migration.application_name = Some("migrate".into());
        migration.blocked_by = Some(vec![10, 11]);
        let mut sessions = vec![mailer, web, migration];
        let xid = |pid: i32, granted: bool, mode: &str| LockRow {
            locktype: "transactionid".into(),
            tag: "transactionid:777".into(),
            relation: None,
            datname: None,
            ..lock(pid, granted, mode, (!granted).then_some(40.0))
        };
        let mut locks = vec![
            lock(10, true, RX, None),
            xid(10, true, "ExclusiveLock"),
            lock(11, true, RX, None),
            xid(11, false, "ShareLock"),
            lock(20, false, SRX, Some(50.0)),
        ];
        for pid in 100..100 + writers {
            let mut writer = session(pid, "active");
            writer.blocked_by = Some(vec![20]);
            sessions.push(writer);
            locks.push(lock(pid, false, RX, Some(60.0)));
        }
        Snapshot {
            taken_at: at(100.0),
            activity: Vec::new(),
            sessions,
            locks,
            existing_databases: None,
            in_recovery: false,
        }
    }

    fn policy(rule: Rule) -> Policy {
        Policy::acting(vec![rule])
    }

    fn rule(min_wait: f64) -> Rule {
        Rule::unblock_migrations(Duration::from_secs_f64(min_wait))
    }

    fn one_glob(glob: &str) -> Vec<Glob> {
        vec![Glob(glob.into())]
    }

    /// The same scene sampled at `t`.
    fn graph_at(snapshot: &Snapshot, t: f64) -> LockGraph {
        analyze(&Snapshot {
            taken_at: at(t),
            ..snapshot.clone()
        })
    }

    fn decisions(graph: &LockGraph, policy: &Policy, memory: &Memory, now: f64) -> Vec<Decision> {
        decide(graph, policy, memory, at(now)).decisions
    }

    fn summary(decisions: &[Decision]) -> Vec<(i32, Signal, Option<Outcome>)> {
        let withheld = |verdict| match verdict {
            Verdict::Send => None,
            Verdict::Withhold(outcome) => Some(outcome),
        };
        decisions
            .iter()
            .map(|d| (d.signalled.pid, d.signal, withheld(d.verdict)))
            .collect()
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
        assert!(!glob("").matches("x"));
        assert!(glob("*").matches(""));
        assert!(glob("a*b*c").matches("aXbYc"));
        assert!(!glob("a*b*c").matches("aXbYcZ"));
        assert!(glob("a*b*c*").matches("aXbYcZ"));
        assert!(!glob("?").matches(""));
        assert!(glob("*?").matches("x"));
        assert!(glob("*ab").matches("aab"));
        // Exponential for a backtracking matcher; immediate here.
        let many = glob("*a*a*a*a*a*a*a*a*a*a*b");
        assert!(!many.matches(&"a".repeat(63)));
        assert!(many.matches(&format!("{}b", "a".repeat(62))));
    }

    proptest::proptest! {
        /// The linear matcher agrees with the textbook recursive one.
        #[test]
        fn globs_match_as_the_recursive_definition_says(pattern in "[ab*?]{0,6}", text in "[ab]{0,8}") {
            fn reference(pattern: &[char], text: &[char]) -> bool {
                match (pattern.first(), text.first()) {
                    (None, None) => true,
                    (Some('*'), _) => {
                        reference(&pattern[1..], text) || (!text.is_empty() && reference(pattern, &text[1..]))
                    }
                    (Some('?'), Some(_)) => reference(&pattern[1..], &text[1..]),
                    (Some(p), Some(t)) if p == t => reference(&pattern[1..], &text[1..]),
                    _ => false,
                }
            }
            let chars = |s: &str| s.chars().collect::<Vec<_>>();
            proptest::prop_assert_eq!(
                Glob(pattern.clone()).matches(&text),
                reference(&chars(&pattern), &chars(&text))
            );
        }
    }

    #[test]
    fn the_next_deadline_is_when_a_rule_would_act() {
        // The ALTER has waited 50 s at t=100: a 60 s rule acts at t=110,
        // and not a moment before.
        let (snapshot, _) = incident("active", 3);
        let graph = analyze(&snapshot);
        let sixty = policy(rule(60.0));
        let memory = Memory::default();
        assert_eq!(next_deadline(&graph, &sixty, &memory), Some(at(110.0)));
        assert!(decisions(&graph_at(&snapshot, 109.99), &sixty, &memory, 109.99).is_empty());
        assert_eq!(decisions(&graph_at(&snapshot, 110.0), &sixty, &memory, 110.0).len(), 1);
        // The earliest of several rules; none for a rule about other modes,
        // an off policy, or a rule that already matches.
        let mut two = sixty.clone();
        two.rules.push(Rule {
            name: "sooner".into(),
            ..rule(55.0)
        });
        assert_eq!(next_deadline(&graph, &two, &memory), Some(at(105.0)));
        let shares = policy(Rule {
            waiter_modes: vec!["ShareLock".into()],
            ..rule(60.0)
        });
        assert_eq!(next_deadline(&graph, &shares, &memory), None);
        assert_eq!(
            next_deadline(
                &graph,
                &Policy {
                    enabled: false,
                    ..sixty
                },
                &memory
            ),
            None
        );
        let five = policy(rule(5.0));
        assert_eq!(next_deadline(&graph, &five, &memory), None);

        // Once the root is cancelled, terminate_after (10 s) after the cancel.
        let mut memory = Memory::default();
        let cancel = decisions(&graph, &five, &memory, 100.0).remove(0);
        memory.record(&cancel, Outcome::Success, at(100.0));
        assert_eq!(
            next_deadline(&graph_at(&snapshot, 101.0), &five, &memory),
            Some(at(110.0))
        );
        // cancel_waiter never follows its cancel up: no deadline for it.
        let waiter_rule = policy(Rule {
            action: Action::CancelWaiter,
            ..rule(5.0)
        });
        let mut cancelled = Memory::default();
        let cancel_waiter = decisions(&graph, &waiter_rule, &cancelled, 100.0).remove(0);
        cancelled.record(&cancel_waiter, Outcome::Success, at(100.0));
        assert_eq!(
            next_deadline(&graph_at(&snapshot, 101.0), &waiter_rule, &cancelled),
            None
        );
        // A dry run's cancel is never followed up.
        let mut dry = Memory::default();
        dry.record(&cancel, Outcome::DryRun, at(100.0));
        assert_eq!(next_deadline(&graph_at(&snapshot, 101.0), &five, &dry), None);
        // A failed signal is retried after its pause (2 s).
        let mut failed = Memory::default();
        failed.record(&cancel, Outcome::Error, at(100.0));
        assert_eq!(
            next_deadline(&graph_at(&snapshot, 101.0), &five, &failed),
            Some(at(102.0))
        );
    }

    #[test]
    fn cancels_the_root_blocker_once_the_waiter_waited_long_enough() {
        let (snapshot, read) = incident("active", 3);
        let graph = analyze(&snapshot);
        let memory = Memory::default();
        assert!(
            decisions(&graph, &policy(rule(60.0)), &memory, 100.0).is_empty(),
            "waited 50s < 60s"
        );
        let decided = decisions(&graph, &policy(rule(5.0)), &memory, 100.0);
        assert_eq!(summary(&decided), vec![(10, Signal::Cancel, None)]);
        assert_eq!(decided[0].signalled, Identity::of(&read));
        assert_eq!(decided[0].waiter.session.pid, 20);
        assert_eq!(decided[0].rule, "unblock-migrations");
        assert_eq!(decided[0].action, Action::CancelBlockers);
        assert_eq!(decided[0].roots.iter().map(|r| r.pid).collect::<Vec<_>>(), vec![10]);
        assert_eq!(decided[0].reason, "the waiter has waited 50.0s (min_wait 5s)");
    }

    #[test]
    fn default_rule_matches_the_modes_migrations_queue_on_and_relation_waits_only() {
        let (mut snapshot, _) = incident("active", 0);
        let mode_of_alter = |snapshot: &mut Snapshot, mode: &str| {
            snapshot.locks.iter_mut().find(|l| l.pid == 20).unwrap().mode = mode.into();
        };
        for (mode, matched) in [
            (AX, true),
            ("ExclusiveLock", true),
            (SRX, true),
            ("ShareLock", false),
            ("ShareUpdateExclusiveLock", false),
        ] {
            mode_of_alter(&mut snapshot, mode);
            let decided = decisions(&analyze(&snapshot), &policy(rule(5.0)), &Memory::default(), 100.0);
            assert_eq!(!decided.is_empty(), matched, "{mode}");
        }
        // A SELECT ... FOR UPDATE waiting for a row's tuple lock asks for
        // AccessExclusiveLock on locktype tuple: not a relation wait.
        mode_of_alter(&mut snapshot, AX);
        let row = snapshot.locks.iter_mut().find(|l| l.pid == 20).unwrap();
        row.locktype = "tuple".into();
        assert!(decisions(&analyze(&snapshot), &policy(rule(5.0)), &Memory::default(), 100.0).is_empty());
        let opted_in = Rule {
            waiter_locktypes: vec!["relation".into(), "tuple".into()],
            ..rule(5.0)
        };
        assert_eq!(
            summary(&decisions(
                &analyze(&snapshot),
                &policy(opted_in),
                &Memory::default(),
                100.0
            )),
            vec![(10, Signal::Cancel, None)]
        );
    }

    #[test]
    fn rule_filters_modes_relations_databases_applications_and_queue() {
        let (snapshot, _) = incident("active", 3);
        let graph = analyze(&snapshot);
        let none = |rule: Rule| decisions(&graph, &policy(rule), &Memory::default(), 100.0).is_empty();
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
        // The first matching rule that can signal decides.
        let mut two = policy(Rule {
            name: "first".into(),
            ..rule(5.0)
        });
        two.rules.push(Rule {
            name: "second".into(),
            ..rule(0.0)
        });
        assert_eq!(decisions(&graph, &two, &Memory::default(), 100.0)[0].rule, "first");
    }

    #[test]
    fn soft_blockers_are_never_cancelled() {
        // Rule on AccessShareLock waiters: the SELECTs wait only on the
        // ALTER, itself waiting; their root is the read.
        let (snapshot, _) = incident("active", 3);
        let graph = analyze(&snapshot);
        let decided = decisions(
            &graph,
            &policy(Rule {
                waiter_modes: vec!["AccessShareLock".into()],
                ..rule(0.0)
            }),
            &Memory::default(),
            100.0,
        );
        assert_eq!(summary(&decided), vec![(10, Signal::Cancel, None)], "{decided:?}");
    }

    #[test]
    fn victims_are_never_signalled_their_roots_are() {
        // The web UPDATE (11) holds ROW EXCLUSIVE on users, which conflicts
        // with the migration's request: a hard blocker, but it waits for
        // the mailer. Only the mailer is cancelled.
        let graph = analyze(&incident_002(5));
        let migration = graph.waiter(20).unwrap();
        assert_eq!(
            migration.blocked_by.iter().map(|e| e.pid).collect::<Vec<_>>(),
            vec![10, 11]
        );
        assert_eq!(graph.wait_tree(20).roots, vec![10]);
        let decided = decisions(&graph, &policy(rule(2.0)), &Memory::default(), 100.0);
        assert_eq!(summary(&decided), vec![(10, Signal::Cancel, None)]);
        assert_eq!(decided[0].waiter.session.pid, 20);
        let mailer = &decided[0].roots[0];
        assert_eq!(
            mailer.lock_held_against(&migration.lock).map(|l| l.mode.as_str()),
            Some(RX),
            "the lock the mailer holds on users"
        );
        // A rule on the writers (ROW EXCLUSIVE waiters): their root is the
        // mailer too, through the migration, which is never signalled.
        let writers = Rule {
            waiter_modes: vec![RX.into()],
            ..rule(0.0)
        };
        assert_eq!(
            summary(&decisions(&graph, &policy(writers), &Memory::default(), 100.0)),
            vec![(10, Signal::Cancel, None)]
        );
    }

    #[test]
    fn cancel_waiter_cancels_the_waiter_and_names_its_roots() {
        let (snapshot, _) = incident("active", 5);
        let graph = analyze(&snapshot);
        let waiter_rule = Rule {
            action: Action::CancelWaiter,
            min_queue: 5,
            ..rule(0.0)
        };
        let decided = decisions(&graph, &policy(waiter_rule.clone()), &Memory::default(), 100.0);
        assert_eq!(summary(&decided), vec![(20, Signal::Cancel, None)]);
        assert_eq!(decided[0].roots.iter().map(|r| r.pid).collect::<Vec<_>>(), vec![10]);
        let (short, _) = incident("active", 4);
        assert!(decisions(&analyze(&short), &policy(waiter_rule), &Memory::default(), 100.0).is_empty());
    }

    #[test]
    fn cancel_waiter_cancels_each_wait_once_and_never_terminates() {
        let (snapshot, _) = incident("active", 1);
        let timeout = policy(Rule {
            action: Action::CancelWaiter,
            ..rule(5.0)
        });
        let mut memory = Memory::default();
        let first = decisions(&graph_at(&snapshot, 100.0), &timeout, &memory, 100.0);
        assert_eq!(summary(&first), vec![(20, Signal::Cancel, None)]);
        memory.record(&first[0], Outcome::Success, at(100.0));
        // Still the same wait long after (terminate_after is 10s): nothing.
        assert!(decisions(&graph_at(&snapshot, 130.0), &timeout, &memory, 130.0).is_empty());
        // The migration retries in the same transaction: a new wait, which
        // is cancelled once it has waited min_wait.
        let mut retry = snapshot.clone();
        retry.locks.iter_mut().find(|l| l.pid == 20).unwrap().wait_start = Some(at(131.0));
        assert!(decisions(&graph_at(&retry, 133.0), &timeout, &memory, 133.0).is_empty());
        let again = decisions(&graph_at(&retry, 136.0), &timeout, &memory, 136.0);
        assert_eq!(summary(&again), vec![(20, Signal::Cancel, None)]);
        assert_eq!(
            again[0].reason,
            "the waiter has waited 5.0s (min_wait 5s), again after its cancel"
        );
        memory.record(&again[0], Outcome::Success, at(136.0));
        assert!(decisions(&graph_at(&retry, 136.2), &timeout, &memory, 136.2).is_empty());
    }

    #[test]
    fn protected_root_hands_the_waiter_to_the_next_rule() {
        // Incident 001: the backup is protected by the policy; the first
        // rule reports it once and hands the waiter to the second, which
        // cancels the migration.
        let (snapshot, _) = incident("active", 3);
        let mut snapshot = snapshot;
        snapshot.sessions[0].application_name = Some("pg_dump".into());
        let graph = analyze(&snapshot);
        let mut two = Policy::acting(vec![
            rule(1.0),
            Rule {
                name: "migration-lock-timeout".into(),
                action: Action::CancelWaiter,
                ..rule(1.0)
            },
        ]);
        two.protect_applications = one_glob("pg_dump*");
        let mut memory = Memory::default();
        let decided = decisions(&graph, &two, &memory, 100.0);
        assert_eq!(
            summary(&decided),
            vec![
                (10, Signal::Cancel, Some(Outcome::Protected)),
                (20, Signal::Cancel, None)
            ]
        );
        assert_eq!(
            decided[0].reason,
            "application `pg_dump` is protected; the waiter goes to rule `migration-lock-timeout`"
        );
        assert_eq!(decided[1].rule, "migration-lock-timeout");
        assert!(
            decided[1]
                .reason
                .starts_with("rule `unblock-migrations` could signal none of its targets; "),
            "{}",
            decided[1].reason
        );
        memory.record(&decided[0], Outcome::Protected, at(100.0));
        memory.record(&decided[1], Outcome::Success, at(100.0));
        // The migration was cancelled; if it still waits a tick later, the
        // fallthrough holds without a second report.
        assert!(decisions(&graph_at(&snapshot, 100.2), &two, &memory, 100.2).is_empty());

        // A later rule that will match once the waiter has waited longer.
        let mut later = two.clone();
        later.rules[1].min_wait = Duration::from_secs(60);
        let decided = decisions(&graph, &later, &Memory::default(), 100.0);
        assert_eq!(summary(&decided), vec![(10, Signal::Cancel, Some(Outcome::Protected))]);
        assert_eq!(
            decided[0].reason,
            "application `pg_dump` is protected; the waiter goes to rule `migration-lock-timeout` once it has \
             waited 1m with 0 or more behind it"
        );

        // With no later rule, the report says the waiter stays queued.
        let mut one = policy(rule(1.0));
        one.protect_applications = one_glob("pg_dump*");
        let decided = decisions(&graph, &one, &Memory::default(), 100.0);
        assert_eq!(
            decided[0].reason,
            "application `pg_dump` is protected; no later rule matches: the waiter stays queued"
        );
    }

    #[test]
    fn a_rule_that_can_signal_one_root_keeps_the_waiter() {
        // Two roots, one protected: the other is cancelled, the protected
        // one reported, and the next rule is not consulted.
        let (mut snapshot, _) = incident("active", 1);
        let mut other = session(11, "active");
        other.application_name = Some("report".into());
        snapshot.sessions.push(other);
        snapshot.locks.push(lock(11, true, "AccessShareLock", None));
        snapshot.sessions.iter_mut().find(|s| s.pid == 20).unwrap().blocked_by = Some(vec![10, 11]);
        let two = Policy::acting(vec![
            Rule {
                protect_applications: one_glob("psql"),
                ..rule(1.0)
            },
            Rule {
                name: "timeout".into(),
                action: Action::CancelWaiter,
                ..rule(1.0)
            },
        ]);
        let decided = decisions(&analyze(&snapshot), &two, &Memory::default(), 100.0);
        assert_eq!(
            summary(&decided),
            vec![
                (10, Signal::Cancel, Some(Outcome::Protected)),
                (11, Signal::Cancel, None)
            ]
        );
        assert_eq!(decided[0].reason, "application `psql` is protected");
    }

    #[test]
    fn protected_and_non_client_sessions_are_reported_once_never_signalled() {
        let (mut snapshot, _) = incident("active", 1);
        let protect = Rule {
            protect_users: one_glob("analyst"),
            ..rule(5.0)
        };
        let graph = analyze(&snapshot);
        let mut memory = Memory::default();
        let decided = decisions(&graph, &policy(protect.clone()), &memory, 100.0);
        assert_eq!(summary(&decided), vec![(10, Signal::Cancel, Some(Outcome::Protected))]);
        assert!(decided[0].reason.contains("user `analyst` is protected"));
        memory.record(&decided[0], Outcome::Protected, at(100.0));
        assert!(
            decisions(&graph, &policy(protect), &memory, 100.5).is_empty(),
            "reported once"
        );

        for (field, value, reason) in [
            ("application", "pg_dump", "application `pg_dump` is protected"),
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
                protect_applications: one_glob("pg_dump"),
                ..rule(5.0)
            };
            let decided = decisions(&analyze(&snapshot), &policy(r), &Memory::default(), 100.0);
            assert_eq!(decided[0].verdict, Verdict::Withhold(Outcome::Protected), "{value}");
            assert!(decided[0].reason.contains(reason), "{}", decided[0].reason);
        }
    }

    #[test]
    fn lockjam_s_own_sessions_are_known_by_pid_not_by_name() {
        let (mut snapshot, _) = incident("active", 1);
        snapshot.sessions[0].application_name = Some("lockjam".into());
        let mut graph = analyze(&snapshot);
        let decided = decisions(&graph, &policy(rule(5.0)), &Memory::default(), 100.0);
        assert_eq!(
            summary(&decided),
            vec![(10, Signal::Cancel, None)],
            "a name protects nothing"
        );
        graph.own_pids = vec![10];
        let decided = decisions(&graph, &policy(rule(5.0)), &Memory::default(), 100.0);
        assert_eq!(summary(&decided), vec![(10, Signal::Cancel, Some(Outcome::Protected))]);
        assert!(decided[0].reason.starts_with("one of this lockjam's own sessions"));
    }

    #[test]
    fn policy_protections_apply_to_every_rule() {
        let (snapshot, _) = incident("active", 1);
        let mut protected = policy(rule(5.0));
        protected.protect_databases = one_glob("ap?");
        let decided = decisions(&analyze(&snapshot), &protected, &Memory::default(), 100.0);
        assert_eq!(summary(&decided), vec![(10, Signal::Cancel, Some(Outcome::Protected))]);
        assert!(decided[0].reason.starts_with("database `app` is protected"));
    }

    #[test]
    fn prepared_transaction_is_reported_never_signalled() {
        let (mut snapshot, _) = incident("active", 1);
        snapshot.sessions.retain(|s| s.pid != 10);
        snapshot.locks.retain(|l| l.pid != 10);
        snapshot.sessions.iter_mut().find(|s| s.pid == 20).unwrap().blocked_by = Some(vec![0]);
        let decided = decisions(&analyze(&snapshot), &policy(rule(5.0)), &Memory::default(), 100.0);
        assert_eq!(summary(&decided), vec![(0, Signal::Cancel, Some(Outcome::Protected))]);
        assert!(decided[0].reason.contains("ROLLBACK PREPARED"));
    }

    #[test]
    fn idle_in_transaction_root_is_terminated_at_min_wait() {
        let (snapshot, _) = incident("idle in transaction", 1);
        let graph = analyze(&snapshot);
        assert!(decisions(&graph, &policy(rule(60.0)), &Memory::default(), 100.0).is_empty());
        let decided = decisions(&graph, &policy(rule(50.0)), &Memory::default(), 100.0);
        assert_eq!(summary(&decided), vec![(10, Signal::Terminate, None)]);
        assert_eq!(
            decided[0].reason,
            "the waiter has waited 50.0s (min_wait 50s); the blocker is idle in transaction, which cancel cannot end"
        );
        let (aborted, _) = incident("idle in transaction (aborted)", 1);
        assert_eq!(
            summary(&decisions(
                &analyze(&aborted),
                &policy(rule(5.0)),
                &Memory::default(),
                100.0
            )),
            vec![(10, Signal::Terminate, None)]
        );
        let never = Rule {
            terminate_after: None,
            ..rule(5.0)
        };
        let decided = decisions(&graph, &policy(never), &Memory::default(), 100.0);
        assert_eq!(
            summary(&decided),
            vec![(10, Signal::Terminate, Some(Outcome::Protected))]
        );
        assert!(decided[0].reason.contains("forbids terminating"));
    }

    #[test]
    fn escalates_to_terminate_for_the_same_blocker_only() {
        let (snapshot, _) = incident("active", 1);
        let policy = policy(rule(5.0)); // terminate_after 10s
        let mut memory = Memory::default();
        let first = decisions(&graph_at(&snapshot, 100.0), &policy, &memory, 100.0);
        memory.record(&first[0], Outcome::Success, at(100.0));
        let waiting = decisions(&graph_at(&snapshot, 105.0), &policy, &memory, 105.0);
        assert!(waiting.is_empty(), "cancelled; waiting");
        // A cancelled statement in a transaction block leaves it idle in
        // transaction (aborted), still holding its locks: the same
        // identity, escalated after terminate_after like an active one.
        let (aborted, _) = incident("idle in transaction (aborted)", 1);
        assert!(decisions(&graph_at(&aborted, 106.0), &policy, &memory, 106.0).is_empty());
        let later = decisions(&graph_at(&snapshot, 110.0), &policy, &memory, 110.0);
        assert_eq!(summary(&later), vec![(10, Signal::Terminate, None)]);
        assert_eq!(later[0].reason, "the blocker still blocks 10.0s after its cancel");
        memory.record(&later[0], Outcome::Success, at(110.0));
        assert!(decisions(&graph_at(&snapshot, 111.0), &policy, &memory, 111.0).is_empty());

        // The same pid in a new transaction is another identity: cancel again.
        let (mut moved, _) = incident("active", 1);
        moved.sessions.iter_mut().find(|s| s.pid == 10).unwrap().xact_start = Some(at(99.0));
        let decided = decisions(&graph_at(&moved, 111.0), &policy, &memory, 111.0);
        assert_eq!(summary(&decided), vec![(10, Signal::Cancel, None)]);
    }

    #[test]
    fn a_cancel_that_cannot_be_followed_by_terminate_hands_the_waiter_on() {
        let (snapshot, _) = incident("active", 1);
        let two = Policy::acting(vec![
            Rule {
                terminate_after: None,
                ..rule(5.0)
            },
            Rule {
                name: "timeout".into(),
                action: Action::CancelWaiter,
                ..rule(5.0)
            },
        ]);
        let mut memory = Memory::default();
        let first = decisions(&graph_at(&snapshot, 100.0), &two, &memory, 100.0);
        assert_eq!(summary(&first), vec![(10, Signal::Cancel, None)]);
        memory.record(&first[0], Outcome::Success, at(100.0));
        assert!(decisions(&graph_at(&snapshot, 100.5), &two, &memory, 100.5).is_empty());
        let later = decisions(&graph_at(&snapshot, 101.0), &two, &memory, 101.0);
        assert_eq!(
            summary(&later),
            vec![
                (10, Signal::Terminate, Some(Outcome::Protected)),
                (20, Signal::Cancel, None)
            ]
        );
    }

    #[test]
    fn rate_limit_and_dry_run() {
        let (snapshot, _) = incident("active", 1);
        let graph = analyze(&snapshot);
        let mut limited = policy(rule(5.0));
        limited.max_actions_per_minute = 1;
        let mut memory = Memory::default();
        let other = Decision {
            signalled: Identity {
                pid: 77,
                backend_start: None,
                xact_start: None,
            },
            ..decisions(&graph, &limited, &memory, 100.0).remove(0)
        };
        memory.record(&other, Outcome::Success, at(90.0));
        let decided = decisions(&graph, &limited, &memory, 100.0);
        assert_eq!(
            summary(&decided),
            vec![(10, Signal::Cancel, Some(Outcome::RateLimited))]
        );
        memory.record(&decided[0], Outcome::RateLimited, at(100.0));
        let later = graph_at(&snapshot, 101.0);
        assert!(decisions(&later, &limited, &memory, 101.0).is_empty(), "reported once");
        // A minute after the earlier action, the budget is back.
        let decided = decisions(&graph_at(&snapshot, 151.0), &limited, &memory, 151.0);
        assert_eq!(summary(&decided), vec![(10, Signal::Cancel, None)]);

        let mut dry = policy(rule(5.0));
        dry.dry_run = true;
        let mut memory = Memory::default();
        let decided = decisions(&graph, &dry, &memory, 100.0);
        assert_eq!(summary(&decided), vec![(10, Signal::Cancel, Some(Outcome::DryRun))]);
        // In dry run nothing follows the cancel that was not sent: no
        // escalation is reported, however long the blocker stays.
        memory.record(&decided[0], Outcome::DryRun, at(100.0));
        assert!(decisions(&graph_at(&snapshot, 130.0), &dry, &memory, 130.0).is_empty());
    }

    #[test]
    fn stale_snapshot_or_disabled_policy_decides_nothing() {
        let (snapshot, _) = incident("active", 1);
        let graph = analyze(&snapshot);
        assert!(decisions(&graph, &policy(rule(5.0)), &Memory::default(), 101.5).is_empty());
        let mut off = policy(rule(5.0));
        off.enabled = false;
        assert!(decisions(&graph, &off, &Memory::default(), 100.0).is_empty());
    }

    #[test]
    fn on_a_hot_standby_only_rules_that_say_so_act() {
        let (mut snapshot, _) = incident("active", 1);
        snapshot.in_recovery = true;
        let graph = analyze(&snapshot);
        assert!(decisions(&graph, &policy(rule(5.0)), &Memory::default(), 100.0).is_empty());
        let on_standby = Rule {
            on_standby: true,
            ..rule(5.0)
        };
        let decided = decisions(&graph, &policy(on_standby), &Memory::default(), 100.0);
        assert_eq!(summary(&decided), vec![(10, Signal::Cancel, None)]);
        assert!(decided[0].in_recovery);
    }

    #[test]
    fn permission_denied_is_not_retried_and_hands_the_waiter_on() {
        let (snapshot, _) = incident("active", 1);
        let graph = analyze(&snapshot);
        let mut memory = Memory::default();
        let decided = decisions(&graph, &policy(rule(5.0)), &memory, 100.0);
        memory.record(&decided[0], Outcome::PermissionDenied, at(100.0));
        let later = graph_at(&snapshot, 120.0);
        assert!(decisions(&later, &policy(rule(5.0)), &memory, 120.0).is_empty());
        let two = Policy::acting(vec![
            rule(5.0),
            Rule {
                name: "timeout".into(),
                action: Action::CancelWaiter,
                ..rule(5.0)
            },
        ]);
        assert_eq!(
            summary(&decisions(&later, &two, &memory, 120.0)),
            vec![(20, Signal::Cancel, None)]
        );
    }

    #[test]
    fn a_failed_signal_is_retried_after_a_growing_pause() {
        let (snapshot, _) = incident("active", 1);
        let policy = policy(Rule {
            terminate_after: Some(Duration::from_secs(1)),
            ..rule(5.0)
        });
        let mut memory = Memory::default();
        let first = decisions(&graph_at(&snapshot, 100.0), &policy, &memory, 100.0);
        memory.record(&first[0], Outcome::Success, at(100.0));
        let mut tried = Vec::new();
        let mut t = 101.0;
        while t < 140.0 {
            let decided = decisions(&graph_at(&snapshot, t), &policy, &memory, t);
            if let Some(terminate) = decided.first() {
                assert_eq!(terminate.signal, Signal::Terminate);
                // The backend did not exit within the wait.
                memory.record(terminate, Outcome::Error, at(t));
                tried.push(t);
            }
            t += 0.25;
        }
        // 2 s, 4 s, 8 s, 16 s between the attempts, not one per sample.
        assert_eq!(tried, vec![101.0, 103.0, 107.0, 115.0, 131.0]);
    }

    #[test]
    fn one_root_of_several_waiters_is_signalled_once_per_tick() {
        let (mut snapshot, _) = incident("active", 0);
        let mut second = session(21, "active");
        second.blocked_by = Some(vec![10, 20]);
        snapshot.sessions.push(second);
        snapshot.locks.push(lock(21, false, AX, Some(55.0)));
        let decided = decisions(&analyze(&snapshot), &policy(rule(5.0)), &Memory::default(), 100.0);
        assert_eq!(summary(&decided), vec![(10, Signal::Cancel, None)]);
    }

    #[test]
    fn a_deadlock_is_reported_once_and_left_to_the_server() {
        let (mut snapshot, _) = incident("active", 0);
        // 10 now waits for a lock 20 holds: a cycle with no root.
        snapshot.sessions[0].blocked_by = Some(vec![20]);
        snapshot.locks.push(LockRow {
            tag: "relation:1:3".into(),
            relation: Some("public.customers".into()),
            ..lock(10, false, AX, Some(70.0))
        });
        snapshot.locks.push(LockRow {
            tag: "relation:1:3".into(),
            relation: Some("public.customers".into()),
            ..lock(20, true, "RowShareLock", None)
        });
        let graph = analyze(&snapshot);
        assert!(graph.wait_tree(20).deadlock);
        let mut memory = Memory::default();
        let plan = decide(&graph, &policy(rule(5.0)), &memory, at(100.0));
        assert!(plan.decisions.is_empty());
        let waiters: Vec<i32> = plan.deadlocks.iter().map(|d| d.waiter.session.pid).collect();
        assert_eq!(waiters, vec![20, 10]);
        for deadlock in &plan.deadlocks {
            memory.record_deadlock(deadlock);
        }
        assert_eq!(decide(&graph, &policy(rule(5.0)), &memory, at(100.0)), Plan::default());
        let timeout = policy(Rule {
            action: Action::CancelWaiter,
            ..rule(5.0)
        });
        let plan = decide(&graph, &timeout, &Memory::default(), at(100.0));
        assert!(plan.decisions.is_empty(), "not even cancel_waiter: {plan:?}");
        assert_eq!(plan.deadlocks.len(), 2);
    }

    #[test]
    fn a_waiting_session_not_yet_seen_as_a_waiter_is_no_root() {
        // 10 began to wait between the reads: its session shows a lock wait,
        // but its blockers are not known. Nothing is signalled this tick.
        let (mut snapshot, _) = incident("active", 0);
        snapshot.sessions[0].wait_event_type = Some("Lock".into());
        let graph = analyze(&snapshot);
        let tree = graph.wait_tree(20);
        assert_eq!(tree, crate::analysis::WaitTree::default());
        assert_eq!(
            decide(&graph, &policy(rule(5.0)), &Memory::default(), at(100.0)),
            Plan::default()
        );
    }

    #[test]
    fn rules_describe_themselves_in_one_line() {
        let mut described = Rule {
            protect_applications: one_glob("pg_dump*"),
            min_queue: 3,
            ..rule(2.0)
        };
        assert_eq!(
            described.describe(),
            "rule `unblock-migrations`: cancel_blockers when a relation wait for \
             ShareRowExclusiveLock/ExclusiveLock/AccessExclusiveLock on * in database * from application * \
             has waited 2s with 3 or more behind it; terminate after 10s; protects applications pg_dump*; \
             not on a hot standby"
        );
        described.terminate_after = None;
        described.protect_applications.clear();
        described.on_standby = true;
        assert!(described
            .describe()
            .ends_with("; never terminate; protects none; acts on a hot standby too"));
        assert_eq!(Policy::default().mode(), "off");
        assert_eq!(Policy::acting(Vec::new()).mode(), "live");
    }
}
