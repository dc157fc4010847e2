//! Pure analysis: turns a [`Snapshot`] into a [`LockGraph`] of waiters,
//! blockers, queues and ages.
//!
//! No I/O and no clock reads happen here: the time is the snapshot's
//! `taken_at`. Vocabulary (ARCHITECTURE.md): a *hard* blocker holds a conflicting
//! lock; a *soft* blocker waits ahead in the same queue for a conflicting
//! lock; a *root* blocker blocks someone and waits on no one; a *queue head*
//! is the first waiter in line that other waiters queue behind.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use crate::snapshot::{ActivityGroup, LockRow, Session, Snapshot};

/// Why a blocker blocks a waiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockKind {
    /// Holds a lock that conflicts with the waiter's request.
    Hard,
    /// Waits ahead of the waiter, in the same queue, for a conflicting lock.
    Soft,
}

impl BlockKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BlockKind::Hard => "hard",
            BlockKind::Soft => "soft",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockedBy {
    /// 0 is a prepared transaction, which has no backend.
    pub pid: i32,
    pub kind: BlockKind,
}

/// A heavyweight lock: the one a waiter asks for, or one a blocker holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Lock {
    pub locktype: String,
    pub mode: String,
    pub tag: String,
    pub relation: Option<String>,
}

impl Lock {
    /// The `relation` label of queue series: the schema-qualified name, or
    /// the lock type in parentheses for locks not on a relation (a
    /// schema-qualified name always has a dot, so the two cannot collide).
    pub(crate) fn relation_label(&self) -> String {
        match &self.relation {
            Some(name) => name.clone(),
            None => format!("({})", self.locktype),
        }
    }

    fn of(row: &LockRow) -> Lock {
        Lock {
            locktype: row.locktype.clone(),
            mode: row.mode.clone(),
            tag: row.tag.clone(),
            relation: row.relation.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Waiter {
    pub session: Session,
    pub lock: Lock,
    pub wait_start: Option<SystemTime>,
    pub wait: Duration,
    pub blocked_by: Vec<BlockedBy>,
    /// Wait edges in the longest chain from this waiter to a session that
    /// waits on no one: 1 for a waiter directly behind a root blocker.
    pub chain_depth: u32,
    /// Whether its wait chain leads to a root blocker (false in a deadlock
    /// cycle that the server has not broken yet).
    pub leads_to_root: bool,
    /// Sessions waiting behind this one, directly or transitively.
    pub behind: u64,
}

impl Waiter {
    pub fn datname(&self) -> &str {
        self.session.datname.as_deref().unwrap_or("")
    }
}

/// A session that blocks at least one waiter.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocker {
    pub pid: i32,
    /// `None` for pid 0 (a prepared transaction) and sessions that ended
    /// between the reads of one sample.
    pub session: Option<Session>,
    pub datname: String,
    pub is_root: bool,
    /// Pids of the waiters it blocks directly, ascending.
    pub blocking: Vec<i32>,
    pub transaction_age: Option<Duration>,
    /// The granted locks it holds on objects that someone waits for,
    /// strongest first.
    pub held: Vec<Lock>,
}

impl Blocker {
    /// The lock it holds that matters to `waiter`: the strongest on the
    /// object the waiter asks for, else on the same relation, else the
    /// strongest it holds on anything someone waits for (a root that blocks
    /// through a chain of other waiters).
    pub(crate) fn lock_held_against(&self, waiter: &Lock) -> Option<&Lock> {
        self.held
            .iter()
            .find(|held| held.tag == waiter.tag)
            .or_else(|| {
                self.held
                    .iter()
                    .find(|held| held.relation.is_some() && held.relation == waiter.relation)
            })
            .or_else(|| self.held.first())
    }
}

/// A queue head and the sessions waiting behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    pub head_pid: i32,
    pub datname: String,
    pub relation: String,
    pub mode: String,
    /// Sessions waiting behind the head, directly or transitively.
    pub depth: u64,
    pub head_wait: Duration,
}

/// Per-database figures of the lock graph.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatabaseLocks {
    /// Waiters by requested (locktype, mode).
    pub waiters: BTreeMap<(String, String), u64>,
    pub lock_wait_max: Duration,
    pub blocked_sessions: u64,
    pub root_blockers: u64,
    pub root_blocker_max_age: Duration,
    pub chain_max_depth: u32,
    /// Waiters by the relation whose lock, or whose tuple or page lock,
    /// they ask for: where queries are stuck. A wait for the transaction
    /// that holds a row names no relation and is not counted here.
    pub relation_waiters: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LockGraph {
    pub taken_at: SystemTime,
    pub activity: Vec<ActivityGroup>,
    /// Sorted by pid.
    pub waiters: Vec<Waiter>,
    /// Sorted by pid.
    pub blockers: Vec<Blocker>,
    /// Sorted by datname, relation, mode, head pid.
    pub queues: Vec<Queue>,
    /// Every database with client sessions or waiters, even calm ones, so
    /// that their gauges read 0 rather than vanish.
    pub databases: BTreeMap<String, DatabaseLocks>,
    /// This lockjam's own sessions, known by pid (the caller fills them
    /// in): never signalled. A session's name proves nothing.
    pub own_pids: Vec<i32>,
    /// The snapshot's list of the server's databases, when it read one.
    pub existing_databases: Option<Vec<String>>,
    /// A hot standby: the policy acts only by rules with `on_standby`.
    pub in_recovery: bool,
}

/// The sessions a waiter waits on, followed through the sessions that
/// themselves wait: its *wait tree*.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct WaitTree {
    /// Root blockers, ascending: sessions that block the waiter directly or
    /// through other waiting sessions, and wait on no one. Signalling them,
    /// and only them, can free the waiter; every other session in the tree
    /// is a victim.
    pub roots: Vec<i32>,
    /// True when the tree has no root and every session in it waits on
    /// another one in it: a deadlock that the server's deadlock detector
    /// breaks after `deadlock_timeout`.
    pub deadlock: bool,
}

impl LockGraph {
    pub fn waiter(&self, pid: i32) -> Option<&Waiter> {
        self.waiters
            .binary_search_by_key(&pid, |w| w.session.pid)
            .ok()
            .map(|i| &self.waiters[i])
    }

    pub fn blocker(&self, pid: i32) -> Option<&Blocker> {
        self.blockers
            .binary_search_by_key(&pid, |b| b.pid)
            .ok()
            .map(|i| &self.blockers[i])
    }

    /// Whether `pid` waits for a lock: it has an ungranted request, or its
    /// session showed a lock wait when read (a wait that began between the
    /// reads of one sample, whose blockers are not known yet).
    fn is_waiting(&self, pid: i32) -> bool {
        self.waiter(pid).is_some()
            || self
                .blocker(pid)
                .and_then(|b| b.session.as_ref())
                .is_some_and(|s| s.wait_event_type.as_deref() == Some("Lock"))
    }

    /// The wait tree of the waiter `pid`: computed on demand, for the few
    /// waiters a policy rule matches, because a queue of N waiters that
    /// each name every waiter ahead of them has N² edges.
    pub(crate) fn wait_tree(&self, pid: i32) -> WaitTree {
        let mut seen: HashSet<i32> = HashSet::from([pid]);
        let mut stack = vec![pid];
        let mut roots = BTreeSet::new();
        // A dead end (a waiting session whose blockers are unknown, or a
        // waiter whose blockers just let go) means the tree is in motion,
        // not deadlocked.
        let mut dead_end = false;
        while let Some(current) = stack.pop() {
            let Some(waiter) = self.waiter(current) else {
                dead_end = true;
                continue;
            };
            if waiter.blocked_by.is_empty() {
                dead_end = true;
            }
            for edge in &waiter.blocked_by {
                if !seen.insert(edge.pid) {
                    continue;
                }
                if self.is_waiting(edge.pid) {
                    stack.push(edge.pid);
                } else {
                    roots.insert(edge.pid);
                }
            }
        }
        WaitTree {
            deadlock: roots.is_empty() && !dead_end,
            roots: roots.into_iter().collect(),
        }
    }
}

/// The eight table-level lock modes in increasing strength; transaction,
/// tuple and advisory locks use the same names.
const LOCK_MODES: [&str; 8] = [
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
];

/// `CONFLICTS[i]` has bit `j` set when mode `i` conflicts with mode `j`
/// (the table in PostgreSQL's "Explicit Locking" chapter).
const CONFLICTS: [u8; 8] = [
    0b1000_0000,
    0b1100_0000,
    0b1111_0000,
    0b1111_1000,
    0b1110_1100,
    0b1111_1100,
    0b1111_1110,
    0b1111_1111,
];

/// Whether `name` is one of PostgreSQL's heavyweight lock modes.
pub(crate) fn is_lock_mode(name: &str) -> bool {
    LOCK_MODES.contains(&name)
}

/// The lock types of `pg_locks.locktype`.
pub(crate) const LOCK_TYPES: [&str; 12] = [
    "relation",
    "extend",
    "frozenid",
    "page",
    "tuple",
    "transactionid",
    "virtualxid",
    "spectoken",
    "object",
    "userlock",
    "advisory",
    "applytransaction",
];

/// Whether `name` is one of `pg_locks.locktype`'s values.
pub(crate) fn is_lock_type(name: &str) -> bool {
    LOCK_TYPES.contains(&name)
}

/// Rank of a lock mode in [`LOCK_MODES`] (unknown modes rank lowest).
fn mode_strength(mode: &str) -> usize {
    LOCK_MODES.iter().position(|m| *m == mode).map_or(0, |i| i + 1)
}

/// Whether two lock modes conflict. Unknown modes are taken to conflict, so
/// that a blocker the server reports is never explained away.
pub(crate) fn modes_conflict(a: &str, b: &str) -> bool {
    let index = |name| LOCK_MODES.iter().position(|mode| *mode == name);
    match (index(a), index(b)) {
        (Some(a), Some(b)) => CONFLICTS[a] & (1 << b) != 0,
        _ => true,
    }
}

fn age(taken_at: SystemTime, since: Option<SystemTime>) -> Option<Duration> {
    since.map(|since| taken_at.duration_since(since).unwrap_or(Duration::ZERO))
}

/// Builds the lock graph of one snapshot.
pub fn analyze(snapshot: &Snapshot) -> LockGraph {
    let locks = LocksByPid::of(snapshot);
    let mut waiters = waiters(snapshot, &locks);
    // Reverse edges: who waits directly on whom.
    let mut blockees: BTreeMap<i32, BTreeSet<i32>> = BTreeMap::new();
    for waiter in waiters.values() {
        for edge in &waiter.blocked_by {
            blockees.entry(edge.pid).or_default().insert(waiter.session.pid);
        }
    }
    let waits_on_someone = |pid: i32| waiters.get(&pid).is_some_and(|w| !w.blocked_by.is_empty());
    let roots: BTreeSet<i32> = blockees.keys().copied().filter(|pid| !waits_on_someone(*pid)).collect();
    place_waiters(&mut waiters, &blockees, &roots);
    let blockers = blockers(snapshot, &locks, &waiters, &blockees, &roots);
    let queues = queues(&waiters);
    let databases = database_figures(&snapshot.activity, &waiters, &blockers);
    LockGraph {
        taken_at: snapshot.taken_at,
        activity: snapshot.activity.clone(),
        waiters: waiters.into_values().collect(),
        blockers,
        queues,
        databases,
        own_pids: Vec::new(),
        existing_databases: snapshot.existing_databases.clone(),
        in_recovery: snapshot.in_recovery,
    }
}

/// A snapshot's lock rows by pid: each pid's first ungranted request, and
/// the locks it holds.
struct LocksByPid<'a> {
    requests: HashMap<i32, &'a LockRow>,
    held: HashMap<i32, Vec<&'a LockRow>>,
}

impl<'a> LocksByPid<'a> {
    fn of(snapshot: &'a Snapshot) -> LocksByPid<'a> {
        let mut requests: HashMap<i32, &LockRow> = HashMap::new();
        let mut held: HashMap<i32, Vec<&LockRow>> = HashMap::new();
        for row in &snapshot.locks {
            if row.granted {
                held.entry(row.pid).or_default().push(row);
            } else {
                requests.entry(row.pid).or_insert(row);
            }
        }
        LocksByPid { requests, held }
    }
}

/// The waiters, each with its edges classified. A waiter is a session that
/// pg_blocking_pids was called for and that still has an ungranted lock; a
/// session whose request was granted between the reads is not waiting any
/// more.
fn waiters(snapshot: &Snapshot, locks: &LocksByPid) -> BTreeMap<i32, Waiter> {
    let mut waiters: BTreeMap<i32, Waiter> = BTreeMap::new();
    for session in &snapshot.sessions {
        let (Some(blocked_by), Some(request)) = (&session.blocked_by, locks.requests.get(&session.pid)) else {
            continue;
        };
        let mut seen = HashSet::new();
        let edges = blocked_by
            .iter()
            .filter(|pid| **pid != session.pid && seen.insert(**pid))
            .map(|&pid| BlockedBy {
                pid,
                kind: classify(request, locks.held.get(&pid), locks.requests.get(&pid)),
            })
            .collect();
        waiters.insert(
            session.pid,
            Waiter {
                session: session.clone(),
                lock: Lock::of(request),
                wait_start: request.wait_start,
                wait: age(snapshot.taken_at, request.wait_start).unwrap_or(Duration::ZERO),
                blocked_by: edges,
                chain_depth: 0,
                leads_to_root: false,
                behind: 0,
            },
        );
    }
    waiters
}

/// Each waiter's depth in its chain, whether it leads to a root, and how
/// many wait behind it.
fn place_waiters(waiters: &mut BTreeMap<i32, Waiter>, blockees: &BTreeMap<i32, BTreeSet<i32>>, roots: &BTreeSet<i32>) {
    let behind_roots = reachable_behind(roots.iter().copied(), blockees);
    let depths = chain_depths(waiters);
    for waiter in waiters.values_mut() {
        let pid = waiter.session.pid;
        waiter.chain_depth = depths.get(&pid).copied().unwrap_or(0);
        waiter.leads_to_root = behind_roots.contains(&pid);
        waiter.behind = reachable_behind(std::iter::once(pid), blockees)
            .iter()
            .filter(|behind| **behind != pid)
            .count() as u64;
    }
}

/// Every session someone waits on, with the locks it holds, strongest
/// first.
fn blockers(
    snapshot: &Snapshot,
    locks: &LocksByPid,
    waiters: &BTreeMap<i32, Waiter>,
    blockees: &BTreeMap<i32, BTreeSet<i32>>,
    roots: &BTreeSet<i32>,
) -> Vec<Blocker> {
    let sessions: HashMap<i32, &Session> = snapshot.sessions.iter().map(|s| (s.pid, s)).collect();
    blockees
        .iter()
        .map(|(&pid, blocked)| {
            let session = sessions.get(&pid).map(|s| (*s).clone());
            // A blocker without a backend (pid 0) belongs to the database of
            // the first waiter it blocks.
            let datname = session
                .as_ref()
                .and_then(|s| s.datname.clone())
                .or_else(|| {
                    blocked
                        .iter()
                        .find_map(|p| waiters.get(p).map(|w| w.datname().to_string()))
                })
                .unwrap_or_default();
            let mut held: Vec<Lock> = locks
                .held
                .get(&pid)
                .into_iter()
                .flatten()
                .map(|row| Lock::of(row))
                .collect();
            held.sort_by_key(|lock| std::cmp::Reverse(mode_strength(&lock.mode)));
            Blocker {
                pid,
                transaction_age: age(snapshot.taken_at, session.as_ref().and_then(|s| s.xact_start)),
                session,
                datname,
                is_root: roots.contains(&pid),
                blocking: blocked.iter().copied().collect(),
                held,
            }
        })
        .collect()
}

/// Hard when the blocker holds a conflicting lock on the same object; soft
/// when it only waits for one ahead in the queue. A blocker the server
/// reports without a visible lock on the object (the leader of parallel
/// workers that hold it, or a lock released since) is hard.
fn classify(request: &LockRow, held: Option<&Vec<&LockRow>>, queued: Option<&&LockRow>) -> BlockKind {
    let conflicts_on_object = |row: &LockRow| row.tag == request.tag && modes_conflict(&row.mode, &request.mode);
    let holds = held.is_some_and(|rows| rows.iter().any(|row| conflicts_on_object(row)));
    let waits_ahead = queued.is_some_and(|row| conflicts_on_object(row));
    if !holds && waits_ahead {
        BlockKind::Soft
    } else {
        BlockKind::Hard
    }
}

/// Every pid that waits behind one of `starts`, directly or transitively.
fn reachable_behind(starts: impl Iterator<Item = i32>, blockees: &BTreeMap<i32, BTreeSet<i32>>) -> BTreeSet<i32> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<i32> = starts.collect();
    while let Some(pid) = stack.pop() {
        for &behind in blockees.get(&pid).into_iter().flatten() {
            if seen.insert(behind) {
                stack.push(behind);
            }
        }
    }
    seen
}

/// Longest chain of wait edges from each waiter; cycles count once. A
/// depth-first walk with its own stack, not the call stack: a chain of
/// thousands of waiters must not overflow a task's stack.
fn chain_depths(waiters: &BTreeMap<i32, Waiter>) -> HashMap<i32, u32> {
    /// One waiter being measured: its next edge, and its deepest blocker
    /// so far.
    struct Frame {
        pid: i32,
        edge: usize,
        deepest: Option<u32>,
    }
    let mut memo: HashMap<i32, u32> = HashMap::new();
    for &start in waiters.keys() {
        let mut on_path: HashSet<i32> = HashSet::new();
        let mut stack: Vec<Frame> = Vec::new();
        // The depth of `pid` if known without a walk, else a new frame.
        let enter = |pid: i32, memo: &HashMap<i32, u32>, on_path: &mut HashSet<i32>, stack: &mut Vec<Frame>| {
            if let Some(known) = memo.get(&pid) {
                return Some(*known);
            }
            if !waiters.contains_key(&pid) || !on_path.insert(pid) {
                return Some(0);
            }
            stack.push(Frame {
                pid,
                edge: 0,
                deepest: None,
            });
            None
        };
        if enter(start, &memo, &mut on_path, &mut stack).is_some() {
            continue;
        }
        while let Some(frame) = stack.last_mut() {
            let edges = &waiters[&frame.pid].blocked_by;
            if frame.edge < edges.len() {
                let next = edges[frame.edge].pid;
                frame.edge += 1;
                if let Some(depth) = enter(next, &memo, &mut on_path, &mut stack) {
                    let frame = stack.last_mut().expect("the frame that asked");
                    frame.deepest = frame.deepest.max(Some(depth));
                }
                continue;
            }
            let done = stack.pop().expect("a frame");
            on_path.remove(&done.pid);
            let depth = done.deepest.map_or(0, |d| d + 1);
            memo.insert(done.pid, depth);
            if let Some(caller) = stack.last_mut() {
                caller.deepest = caller.deepest.max(Some(depth));
            }
        }
    }
    memo
}

/// Queue heads: waiters that another waiter queues behind (they are its
/// soft blocker) and that have no soft blocker themselves.
fn queues(waiters: &BTreeMap<i32, Waiter>) -> Vec<Queue> {
    let soft_blockers: BTreeSet<i32> = waiters
        .values()
        .flat_map(|w| w.blocked_by.iter())
        .filter(|edge| edge.kind == BlockKind::Soft)
        .map(|edge| edge.pid)
        .collect();
    let mut queues: Vec<Queue> = soft_blockers
        .iter()
        .filter_map(|pid| waiters.get(pid))
        .filter(|head| head.blocked_by.iter().all(|edge| edge.kind == BlockKind::Hard))
        .map(|head| Queue {
            head_pid: head.session.pid,
            datname: head.datname().to_string(),
            relation: head.lock.relation_label(),
            mode: head.lock.mode.clone(),
            depth: head.behind,
            head_wait: head.wait,
        })
        .collect();
    queues.sort_by(|a, b| {
        (&a.datname, &a.relation, &a.mode, a.head_pid).cmp(&(&b.datname, &b.relation, &b.mode, b.head_pid))
    });
    queues
}

fn database_figures(
    activity: &[ActivityGroup],
    waiters: &BTreeMap<i32, Waiter>,
    blockers: &[Blocker],
) -> BTreeMap<String, DatabaseLocks> {
    let mut databases: BTreeMap<String, DatabaseLocks> = activity
        .iter()
        .map(|group| (group.datname.clone(), DatabaseLocks::default()))
        .collect();
    for waiter in waiters.values() {
        let figures = databases.entry(waiter.datname().to_string()).or_default();
        *figures
            .waiters
            .entry((waiter.lock.locktype.clone(), waiter.lock.mode.clone()))
            .or_default() += 1;
        figures.lock_wait_max = figures.lock_wait_max.max(waiter.wait);
        if let Some(relation) = &waiter.lock.relation {
            *figures.relation_waiters.entry(relation.clone()).or_default() += 1;
        }
        figures.chain_max_depth = figures.chain_max_depth.max(waiter.chain_depth);
        if waiter.leads_to_root {
            figures.blocked_sessions += 1;
        }
    }
    for root in blockers.iter().filter(|b| b.is_root) {
        let figures = databases.entry(root.datname.clone()).or_default();
        figures.root_blockers += 1;
        if let Some(age) = root.transaction_age {
            figures.root_blocker_max_age = figures.root_blocker_max_age.max(age);
        }
    }
    databases
}

/// Identity of one lock wait across samples: the session and what it asks
/// for. The wait start is left out on purpose: on PostgreSQL 14+ it moves
/// from first-seen to `waitstart` once the server fills that in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WaitIdentity {
    pid: i32,
    backend_start: Option<SystemTime>,
    tag: String,
    mode: String,
}

impl WaitIdentity {
    fn of(waiter: &Waiter) -> WaitIdentity {
        WaitIdentity {
            pid: waiter.session.pid,
            backend_start: waiter.session.backend_start,
            tag: waiter.lock.tag.clone(),
            mode: waiter.lock.mode.clone(),
        }
    }
}

/// A lock wait that ended between two samples.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EndedWait {
    pub datname: String,
    /// The wait as last seen: a lower bound, short of the truth by less than
    /// one sampling interval.
    pub wait: Duration,
}

/// The waits of `previous` that `current` no longer shows. With no current
/// graph (the sample failed), nothing is known to have ended yet.
pub(crate) fn ended_waits(previous: &LockGraph, current: &LockGraph) -> Vec<EndedWait> {
    let still_waiting: HashSet<WaitIdentity> = current.waiters.iter().map(WaitIdentity::of).collect();
    previous
        .waiters
        .iter()
        .filter(|w| !still_waiting.contains(&WaitIdentity::of(w)))
        .map(|w| EndedWait {
            datname: w.datname().to_string(),
            wait: w.wait,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    /// A tiny builder for snapshots: sessions, their requests and holdings.
    struct Builder {
        snapshot: Snapshot,
    }

    impl Builder {
        fn new() -> Builder {
            Builder {
                snapshot: Snapshot::calm(
                    at(T0 + 100),
                    vec![ActivityGroup {
                        datname: "app".into(),
                        state: "active".into(),
                        sessions: 1,
                        oldest_xact_start: None,
                    }],
                ),
            }
        }

        fn session(&mut self, pid: i32, xact_start: u64) -> &mut Session {
            self.snapshot.sessions.push(Session {
                pid,
                datname: Some("app".into()),
                state: Some("active".into()),
                backend_type: Some("client backend".into()),
                xact_start: Some(at(T0 + xact_start)),
                backend_start: Some(at(T0)),
                ..Session::default()
            });
            self.snapshot.sessions.last_mut().unwrap()
        }

        /// `pid` holds `mode` on relation `relation`.
        fn holds(&mut self, pid: i32, relation: &str, mode: &str) -> &mut Builder {
            if !self.snapshot.sessions.iter().any(|s| s.pid == pid) {
                self.session(pid, 0);
            }
            self.snapshot
                .locks
                .push(lock_row(pid, true, "relation", relation, mode, None));
            self
        }

        /// `pid` waits since `since` for `mode` on `relation`, blocked by `blockers`.
        fn waits(&mut self, pid: i32, relation: &str, mode: &str, since: u64, blockers: &[i32]) -> &mut Builder {
            self.session(pid, since).blocked_by = Some(blockers.to_vec());
            self.snapshot
                .locks
                .push(lock_row(pid, false, "relation", relation, mode, Some(at(T0 + since))));
            self
        }

        fn waits_on(&mut self, pid: i32, locktype: &str, tag: &str, mode: &str, blockers: &[i32]) -> &mut Builder {
            self.session(pid, 90).blocked_by = Some(blockers.to_vec());
            let mut row = lock_row(pid, false, locktype, tag, mode, Some(at(T0 + 90)));
            row.relation = None;
            self.snapshot.locks.push(row);
            self
        }

        fn graph(&self) -> LockGraph {
            analyze(&self.snapshot)
        }
    }

    fn lock_row(
        pid: i32,
        granted: bool,
        locktype: &str,
        object: &str,
        mode: &str,
        wait_start: Option<SystemTime>,
    ) -> LockRow {
        LockRow {
            pid,
            granted,
            locktype: locktype.into(),
            mode: mode.into(),
            tag: format!("{locktype}:{object}"),
            datname: Some("app".into()),
            relation: Some(object.into()),
            wait_start,
        }
    }

    fn edges(graph: &LockGraph, pid: i32) -> Vec<(i32, BlockKind)> {
        let waiter = graph.waiters.iter().find(|w| w.session.pid == pid).expect("waiter");
        waiter.blocked_by.iter().map(|e| (e.pid, e.kind)).collect()
    }

    const AS: &str = "AccessShareLock";
    const AX: &str = "AccessExclusiveLock";
    const RX: &str = "RowExclusiveLock";

    /// Incident 000: a long read, an ALTER TABLE behind it, SELECTs behind that.
    fn incident_000(selects: i32) -> Builder {
        let mut b = Builder::new();
        b.holds(10, "public.orders", AS);
        b.waits(20, "public.orders", AX, 60, &[10]);
        for pid in 100..100 + selects {
            b.waits(pid, "public.orders", AS, 70, &[20]);
        }
        b
    }

    #[test]
    fn lock_conflict_table_matches_postgres() {
        assert!(modes_conflict(AS, AX));
        assert!(!modes_conflict(AS, "ExclusiveLock"));
        assert!(!modes_conflict(RX, RX));
        assert!(modes_conflict(RX, "ShareLock"));
        assert!(!modes_conflict("ShareLock", "ShareLock"));
        assert!(modes_conflict("ShareUpdateExclusiveLock", "ShareUpdateExclusiveLock"));
        assert!(modes_conflict("ShareRowExclusiveLock", RX));
        assert!(!modes_conflict("ShareRowExclusiveLock", "RowShareLock"));
        for (i, a) in LOCK_MODES.iter().enumerate() {
            for b in &LOCK_MODES[i..] {
                assert_eq!(modes_conflict(a, b), modes_conflict(b, a), "{a} vs {b} is symmetric");
            }
        }
        assert!(modes_conflict("SIReadLock", AS), "unknown modes conflict");
    }

    #[test]
    fn incident_000_queue_behind_the_alter() {
        let graph = incident_000(20).graph();
        assert_eq!(graph.waiters.len(), 21);
        assert_eq!(edges(&graph, 20), vec![(10, BlockKind::Hard)]);
        assert_eq!(edges(&graph, 100), vec![(20, BlockKind::Soft)]);
        assert_eq!(
            graph.queues,
            vec![Queue {
                head_pid: 20,
                datname: "app".into(),
                relation: "public.orders".into(),
                mode: AX.into(),
                depth: 20,
                head_wait: Duration::from_secs(40),
            }]
        );
        let app = &graph.databases["app"];
        assert_eq!(app.blocked_sessions, 21);
        assert_eq!(app.root_blockers, 1);
        assert_eq!(app.root_blocker_max_age, Duration::from_secs(100));
        assert_eq!(app.chain_max_depth, 2);
        assert_eq!(app.lock_wait_max, Duration::from_secs(40));
        assert_eq!(app.waiters[&("relation".to_string(), AS.to_string())], 20);
        assert_eq!(app.waiters[&("relation".to_string(), AX.to_string())], 1);
        let root = graph.blockers.iter().find(|b| b.is_root).unwrap();
        assert_eq!((root.pid, root.blocking.clone()), (10, vec![20]));
        assert_eq!(graph.blockers.iter().filter(|b| b.is_root).count(), 1);
    }

    #[test]
    fn chain_of_three_transactions() {
        // 1 holds a row lock; 2 waits for it (transactionid) while holding
        // AccessExclusive on t; 3 waits for t behind 2.
        let mut b = Builder::new();
        b.session(1, 0);
        b.snapshot
            .locks
            .push(lock_row(1, true, "transactionid", "777", "ExclusiveLock", None));
        b.waits_on(2, "transactionid", "777", "ShareLock", &[1]);
        b.snapshot
            .locks
            .push(lock_row(2, true, "relation", "public.t", AX, None));
        b.waits(3, "public.t", AS, 95, &[2]);
        let graph = b.graph();
        assert_eq!(edges(&graph, 2), vec![(1, BlockKind::Hard)]);
        assert_eq!(edges(&graph, 3), vec![(2, BlockKind::Hard)]);
        let depths: Vec<u32> = graph.waiters.iter().map(|w| w.chain_depth).collect();
        assert_eq!(depths, vec![1, 2]);
        assert_eq!(graph.databases["app"].blocked_sessions, 2);
        assert_eq!(graph.databases["app"].root_blockers, 1);
        assert!(
            graph.queues.is_empty(),
            "nobody queues behind a waiter for the same object"
        );
        let waits: Vec<_> = graph.databases["app"].waiters.keys().cloned().collect();
        assert_eq!(
            waits,
            vec![
                ("relation".to_string(), AS.to_string()),
                ("transactionid".to_string(), "ShareLock".to_string())
            ]
        );
    }

    #[test]
    fn two_queues_on_one_table() {
        // Queue 1: ALTER (20) behind a read (10), SELECTs 100..103 behind it.
        let mut b = incident_000(3);
        // Queue 2, on a row of the same table: 30 holds the row, 31 waits for
        // 30's transaction holding the tuple lock, 32 and 33 queue for the
        // tuple lock behind 31's place.
        b.session(30, 0);
        b.snapshot
            .locks
            .push(lock_row(30, true, "transactionid", "900", "ExclusiveLock", None));
        b.waits_on(31, "transactionid", "900", "ShareLock", &[30]);
        b.snapshot
            .locks
            .push(lock_row(31, true, "tuple", "public.orders:0:1", "ExclusiveLock", None));
        for (pid, ahead) in [(32, vec![31]), (33, vec![31, 32])] {
            b.waits(pid, "public.orders:0:1", "ExclusiveLock", 95, &ahead);
            let row = b.snapshot.locks.last_mut().unwrap();
            row.locktype = "tuple".into();
            row.tag = "tuple:public.orders:0:1".into();
            row.relation = Some("public.orders".into());
        }
        b.snapshot
            .locks
            .iter_mut()
            .filter(|r| r.pid == 31 && r.granted)
            .for_each(|r| {
                r.tag = "tuple:public.orders:0:1".into();
            });
        let graph = b.graph();
        assert_eq!(edges(&graph, 33), vec![(31, BlockKind::Hard), (32, BlockKind::Soft)]);
        let summary: Vec<(i32, &str, &str, u64)> = graph
            .queues
            .iter()
            .map(|q| (q.head_pid, q.relation.as_str(), q.mode.as_str(), q.depth))
            .collect();
        assert_eq!(
            summary,
            vec![(20, "public.orders", AX, 3), (32, "public.orders", "ExclusiveLock", 1)]
        );
        assert_eq!(graph.databases["app"].root_blockers, 2);
        assert_eq!(graph.databases["app"].blocked_sessions, 4 + 3);
    }

    #[test]
    fn soft_only_blocking_is_not_counted_as_holding() {
        // Two ALTERs queue behind a read; the second is blocked hard by the
        // read and soft by the first; SELECTs are soft-blocked by both.
        let mut b = Builder::new();
        b.holds(10, "public.t", AS);
        b.waits(20, "public.t", AX, 50, &[10]);
        b.waits(21, "public.t", AX, 60, &[10, 20]);
        b.waits(100, "public.t", AS, 70, &[20, 21]);
        let graph = b.graph();
        assert_eq!(edges(&graph, 21), vec![(10, BlockKind::Hard), (20, BlockKind::Soft)]);
        assert_eq!(edges(&graph, 100), vec![(20, BlockKind::Soft), (21, BlockKind::Soft)]);
        assert_eq!(graph.queues.len(), 1, "only the first in line heads the queue");
        assert_eq!((graph.queues[0].head_pid, graph.queues[0].depth), (20, 2));
        assert_eq!(graph.databases["app"].chain_max_depth, 3);
        assert_eq!(graph.databases["app"].root_blockers, 1);
    }

    #[test]
    fn lock_upgrade_in_queue_is_a_hard_blocker_for_strong_requests() {
        // 10 holds AccessShare and waits for AccessExclusive on the same
        // table behind 11; 12 asks for AccessExclusive: 10's held lock
        // conflicts, so 10 is hard for 12 although 10 waits too.
        let mut b = Builder::new();
        b.holds(11, "public.t", AS);
        b.holds(10, "public.t", AS);
        b.waits(10, "public.t", AX, 50, &[11]);
        b.waits(12, "public.t", AX, 60, &[10, 11]);
        let graph = b.graph();
        assert_eq!(edges(&graph, 12), vec![(10, BlockKind::Hard), (11, BlockKind::Hard)]);
        assert!(graph.queues.is_empty());
    }

    #[test]
    fn prepared_transaction_blocks_as_pid_zero() {
        let mut b = Builder::new();
        b.waits(20, "public.t", AX, 50, &[0]);
        b.waits(100, "public.t", AS, 60, &[20]);
        let graph = b.graph();
        assert_eq!(edges(&graph, 20), vec![(0, BlockKind::Hard)]);
        let root = &graph.blockers[0];
        assert_eq!((root.pid, root.is_root, root.session.is_none()), (0, true, true));
        assert_eq!(root.datname, "app", "pid 0 is counted in the database it blocks");
        assert_eq!(root.transaction_age, None);
        let app = &graph.databases["app"];
        assert_eq!((app.root_blockers, app.blocked_sessions), (1, 2));
        assert_eq!(app.root_blocker_max_age, Duration::ZERO);
        assert_eq!(graph.queues[0].depth, 1);
    }

    #[test]
    fn parallel_workers_report_their_leader_more_than_once() {
        let mut b = Builder::new();
        // The leader 10 holds nothing itself: its workers do, and
        // pg_blocking_pids names the leader once per worker.
        b.session(10, 0);
        b.waits(20, "public.t", AX, 50, &[10, 10, 10]);
        let graph = b.graph();
        assert_eq!(edges(&graph, 20), vec![(10, BlockKind::Hard)]);
        assert_eq!(graph.blockers.len(), 1);
        assert_eq!(graph.blockers[0].blocking, vec![20]);
    }

    #[test]
    fn transactionid_waits_have_no_relation() {
        let mut b = Builder::new();
        b.session(1, 0);
        b.snapshot
            .locks
            .push(lock_row(1, true, "transactionid", "5", "ExclusiveLock", None));
        b.waits_on(2, "transactionid", "5", "ShareLock", &[1]);
        b.waits_on(3, "transactionid", "5", "ShareLock", &[1]);
        let graph = b.graph();
        assert_eq!(graph.waiters[0].lock.relation_label(), "(transactionid)");
        assert_eq!(edges(&graph, 3), vec![(1, BlockKind::Hard)]);
        assert_eq!(graph.databases["app"].root_blockers, 1);
        assert_eq!(graph.databases["app"].blocked_sessions, 2);
    }

    #[test]
    fn vanished_and_granted_sessions_are_not_waiters() {
        let mut b = Builder::new();
        b.holds(10, "public.t", AS);
        b.waits(20, "public.t", AX, 50, &[10]);
        // 21 was waiting when pg_stat_activity was read, but its request
        // was granted before pg_locks was read.
        b.session(21, 50).blocked_by = Some(vec![]);
        // 22 waits behind a blocker whose session ended between the reads.
        b.waits(22, "public.u", AX, 50, &[99]);
        let graph = b.graph();
        let pids: Vec<i32> = graph.waiters.iter().map(|w| w.session.pid).collect();
        assert_eq!(pids, vec![20, 22]);
        let gone = graph.blockers.iter().find(|b| b.pid == 99).unwrap();
        assert!(gone.is_root && gone.session.is_none());
    }

    #[test]
    fn deadlock_cycle_has_no_root() {
        let mut b = Builder::new();
        b.waits(1, "public.a", AX, 50, &[2]);
        b.waits(2, "public.b", AX, 50, &[1]);
        let graph = b.graph();
        let app = &graph.databases["app"];
        assert_eq!((app.root_blockers, app.blocked_sessions), (0, 0));
        assert_eq!(app.chain_max_depth, 2);
    }

    #[test]
    fn sessions_stuck_on_a_table_the_queue_head_altered_are_counted_there() {
        // A migration (20) altered orders (it holds ACCESS EXCLUSIVE there)
        // and now waits to drop legacy, which a backup (10) reads. 17
        // queries wait for orders, held by the migration; 3 queue behind it
        // for legacy. The queue series names legacy only; the per-relation
        // count shows where the queries are stuck.
        let mut b = Builder::new();
        b.holds(10, "public.legacy", AS);
        b.holds(20, "public.orders", AX);
        b.waits(20, "public.legacy", AX, 50, &[10]);
        for pid in 100..117 {
            b.waits(pid, "public.orders", AS, 60, &[20]);
        }
        for pid in 200..203 {
            b.waits(pid, "public.legacy", AS, 60, &[20]);
        }
        let graph = b.graph();
        let queues: Vec<(&str, u64)> = graph.queues.iter().map(|q| (q.relation.as_str(), q.depth)).collect();
        assert_eq!(queues, vec![("public.legacy", 20)]);
        let stuck: Vec<(&str, u64)> = graph.databases["app"]
            .relation_waiters
            .iter()
            .map(|(r, n)| (r.as_str(), *n))
            .collect();
        assert_eq!(stuck, vec![("public.legacy", 4), ("public.orders", 17)]);
        // Every one of them waits, in the end, on the backup.
        assert_eq!(graph.wait_tree(100).roots, vec![10]);
        assert_eq!(graph.wait_tree(20).roots, vec![10]);
        let migration = graph.blocker(20).unwrap();
        assert_eq!(
            migration.held.iter().map(|l| l.mode.as_str()).collect::<Vec<_>>(),
            vec![AX]
        );
        let waited = &graph.waiter(100).unwrap().lock;
        assert_eq!(
            migration.lock_held_against(waited).map(|l| l.tag.as_str()),
            Some("relation:public.orders")
        );
    }

    #[test]
    fn wait_trees_follow_waiting_sessions_to_their_roots() {
        // 1 and 2 hold t; 3 waits behind both; 4 waits for u, held by 3;
        // 5 waits for u behind 4. The roots of 5 are 1 and 2, never 3 or 4.
        let mut b = Builder::new();
        b.holds(1, "public.t", AS);
        b.holds(2, "public.t", AS);
        b.holds(3, "public.u", AS);
        b.waits(3, "public.t", AX, 50, &[1, 2]);
        b.waits(4, "public.u", AX, 60, &[3]);
        b.waits(5, "public.u", AS, 70, &[4]);
        let graph = b.graph();
        assert_eq!(
            graph.wait_tree(5),
            WaitTree {
                roots: vec![1, 2],
                deadlock: false
            }
        );
        assert_eq!(graph.wait_tree(3).roots, vec![1, 2]);
        assert_eq!(graph.wait_tree(1), WaitTree::default(), "not a waiter");
    }

    #[test]
    fn calm_databases_report_zero() {
        let graph = analyze(&Snapshot::calm(at(T0), Builder::new().snapshot.activity));
        assert_eq!(graph.databases["app"], DatabaseLocks::default());
        assert!(graph.waiters.is_empty() && graph.queues.is_empty());
    }

    #[test]
    fn a_wait_ends_once() {
        let during = incident_000(2).graph();
        let mut after_builder = incident_000(1);
        after_builder.snapshot.taken_at = at(T0 + 101);
        let after = after_builder.graph();
        let ended = ended_waits(&during, &after);
        assert_eq!(
            ended,
            vec![EndedWait {
                datname: "app".into(),
                wait: Duration::from_secs(30)
            }]
        );
        assert!(ended_waits(&after, &after).is_empty());
        // A wait start that the server filled in since is the same wait.
        let mut refined = incident_000(2);
        refined.snapshot.taken_at = at(T0 + 101);
        refined.snapshot.locks.iter_mut().for_each(|l| {
            l.wait_start = l.wait_start.map(|t| t - Duration::from_millis(300));
        });
        assert!(ended_waits(&during, &refined.graph()).is_empty());
    }
}
