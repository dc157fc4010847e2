//! The plain data one sample produces: what the sampler read, before analysis.
//!
//! These types carry no behaviour and know nothing of tokio or PostgreSQL
//! clients, so that analysis can be tested with snapshots built by hand.

use std::time::SystemTime;

/// Client backends of one database in one state, from the cheap per-tick read.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivityGroup {
    pub datname: String,
    /// `pg_stat_activity.state`; `unknown` where the role may not see it.
    pub state: String,
    pub sessions: u64,
    /// Oldest `xact_start` among these sessions, if any has a transaction open.
    pub oldest_xact_start: Option<SystemTime>,
}

/// One backend involved in lock waiting: a waiter or one of its blockers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Session {
    pub pid: i32,
    pub datname: Option<String>,
    pub usename: Option<String>,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub backend_type: Option<String>,
    pub state: Option<String>,
    pub wait_event_type: Option<String>,
    pub wait_event: Option<String>,
    pub backend_start: Option<SystemTime>,
    pub xact_start: Option<SystemTime>,
    pub query_start: Option<SystemTime>,
    /// The query text, already truncated by the sampler.
    pub query: Option<String>,
    /// `pg_blocking_pids(pid)` as returned, for sessions that were waiting
    /// for a lock when it was called; `None` for the others.
    pub blocked_by: Option<Vec<i32>>,
}

/// One row of `pg_locks`: an ungranted request of a waiter, or a granted
/// lock a blocker holds on an object somebody waits for.
#[derive(Debug, Clone, PartialEq)]
pub struct LockRow {
    pub pid: i32,
    pub granted: bool,
    pub locktype: String,
    pub mode: String,
    /// Every locktag column joined into one string: two rows lock the same
    /// object exactly when their tags are equal.
    pub tag: String,
    /// Database of the locked object (`None` for shared objects and locks
    /// that are not per-database, such as transaction ids).
    pub datname: Option<String>,
    /// Schema-qualified name of the locked relation, resolved in its own
    /// database; `None` when the lock is not on a relation.
    pub relation: Option<String>,
    /// When the wait began: `pg_locks.waitstart` (PostgreSQL 14+) or the
    /// first sample that saw this wait. `None` for granted rows.
    pub wait_start: Option<SystemTime>,
}

/// Everything one sample of one target read.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The server's clock when the sample was taken; every age is measured
    /// against it, so the clocks of lockjam's host do not matter.
    pub taken_at: SystemTime,
    pub activity: Vec<ActivityGroup>,
    pub sessions: Vec<Session>,
    pub locks: Vec<LockRow>,
    /// Every database of the server, read only when a database that had
    /// client sessions has none any more (it may have been dropped);
    /// `None` otherwise.
    pub existing_databases: Option<Vec<String>>,
    /// Whether the server is a standby (`pg_is_in_recovery()`).
    pub in_recovery: bool,
}

impl Snapshot {
    /// A snapshot of a server where nothing waits.
    pub fn calm(taken_at: SystemTime, activity: Vec<ActivityGroup>) -> Snapshot {
        Snapshot {
            taken_at,
            activity,
            sessions: Vec::new(),
            locks: Vec::new(),
            existing_databases: None,
            in_recovery: false,
        }
    }
}
