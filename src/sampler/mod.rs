//! The sampler: the only code that reads from PostgreSQL. One per target,
//! one connection per target (plus, lazily, one per other database whose
//! relation names it must resolve), producing a [`Snapshot`] per tick.
//!
//! Every tick learns which backends wait for a lock. Every
//! `activity_interval` it reads sessions by database and state
//! (`activity.sql`, one scan of `pg_stat_get_activity`), and the same scan
//! says who waits; every other tick runs only a probe: one field of each
//! backend's status (`probe.sql`), or with many sessions connected
//! `pg_locks`' ungranted rows (`probe_locks.sql`), whichever costs less
//! (see [`Probe`]). When some backend waits, the tick also reads the
//! waiters' `pg_blocking_pids` and the sessions involved (`waiters.sql`),
//! their `pg_locks` rows (`locks.sql`), and resolves relation names in the
//! database that owns them; when only watching, a tick that finds the same
//! backends waiting reuses that read until the next `activity.sql`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::{Client, Statement};

use crate::config::SessionSettings;
use crate::config::{SamplerConfig, Target};
use crate::connect::{error_chain, ConnectError, Connector};
use crate::incidents::SessionNow;
use crate::snapshot::{ActivityGroup, LockRow, Session, Snapshot};

const PROBE_SQL: &str = include_str!("probe.sql");
const PROBE_LOCKS_SQL: &str = include_str!("probe_locks.sql");
const ACTIVITY_SQL: &str = include_str!("activity.sql");
const WAITERS_SQL: &str = include_str!("waiters.sql");
const LOCKS_SQL: &str = include_str!("locks.sql");
const RELATIONS_SQL: &str = include_str!("relations.sql");
const ENDED_SQL: &str = include_str!("ended.sql");
/// Once per session: its pid, database, server version, role, and the
/// size of the lock table (`lock_slots`).
pub const SESSION_SQL: &str = include_str!("session.sql");
const IDENTITY_SQL: &str = include_str!("identity.sql");
/// WAL replay's blockers on a hot standby, for `waiters.sql` and the
/// enforcer's `signal.sql`; `{in_recovery}` names their boolean parameter.
pub(crate) const REPLAY_SQL: &str = include_str!("replay.sql");

/// Characters of query text kept: enough to recognise a statement, bounded
/// so that a sample stays small.
pub const QUERY_TEXT_LENGTH: i32 = 200;
/// The server's list of databases is read at least this often, so that
/// the series of a dropped database go.
const DATABASE_LIST_PERIOD: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("target `{target}`: {what} failed: {message}")]
    Query {
        target: String,
        what: &'static str,
        message: String,
    },
    #[error("target `{target}`: the sample took longer than {limit:?} and was abandoned")]
    Timeout { target: String, limit: Duration },
    #[error(
        "targets {} are one PostgreSQL server ({identity}): one target sees every database of its server \
         and counts the others' sessions; keep one of them",
        .targets.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ")
    )]
    SameServer {
        targets: Vec<String>,
        identity: ServerIdentity,
    },
}

/// Which server a session reached: see [`ServerIdentity::same_server`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    /// `pg_control_system()`'s, where the role may call it.
    pub system_identifier: Option<i64>,
    /// `pg_postmaster_start_time()`, RFC 3339.
    pub started: String,
    pub data_directory: Option<String>,
}

impl ServerIdentity {
    /// Whether two sessions reached one server: the same postmaster (its
    /// start time) and, where both could read them, the same system
    /// identifier and data directory. Two roles may see different parts
    /// (one without pg_read_all_settings has no data directory): what only
    /// one side has is not compared.
    pub fn same_server(&self, other: &ServerIdentity) -> bool {
        fn agree<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
        }
        self.started == other.started
            && agree(&self.system_identifier, &other.system_identifier)
            && agree(&self.data_directory, &other.data_directory)
    }
}

impl std::fmt::Display for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(id) = self.system_identifier {
            write!(f, "system identifier {id}, ")?;
        }
        write!(f, "started {}", self.started)?;
        if let Some(dir) = &self.data_directory {
            write!(f, ", data directory {dir}")?;
        }
        Ok(())
    }
}

/// The main session: prepared statements and what the server told us.
struct MainSession {
    client: Client,
    pid: i32,
    identity: ServerIdentity,
    dbname: String,
    /// The role lockjam is, as named in warnings.
    role: String,
    server_version: i32,
    /// The lock table's slots (`session.sql`), for [`Probe::choose`].
    lock_slots: i64,
    /// Whether the last probe found the role in `pg_read_all_stats`.
    reads_all_stats: bool,
    probe: Statement,
    probe_locks: Statement,
    activity: Statement,
    waiters: Statement,
    locks: Statement,
    relations: Statement,
}

/// A session to another database of the same server, for relation names.
struct DatabaseSession {
    client: Client,
    pid: i32,
    relations: Statement,
    last_used: Instant,
}

/// Identity of a lock wait, for first-seen wait starts: pid, backend
/// start, lock tag and mode.
type WaitKey = (i32, Option<SystemTime>, String, String);

/// The statements of a sample on a server of `server_version`
/// (`server_version_num`) besides the probe ([`Probe::sql`]): the sessions
/// by state (every `activity_interval`, in place of the probe), then the
/// waiters and their `pg_locks` rows, read only while someone waits.
pub fn sample_statements(server_version: i32) -> [String; 3] {
    let waitstart = if server_version >= 140_000 {
        "l.waitstart"
    } else {
        "NULL::pg_catalog.timestamptz"
    };
    [
        ACTIVITY_SQL.into(),
        WAITERS_SQL.replace("{replay}", &REPLAY_SQL.replace("{in_recovery}", "$3::pg_catalog.bool")),
        LOCKS_SQL.replace("{waitstart}", waitstart),
    ]
}

/// The statement that probes each tick for lock waits. Both answer with
/// the waiting pids; what their cost grows with differs (BENCHMARKS.md,
/// part 2, "probe candidates"): `probe.sql` copies every backend's status,
/// and `probe_locks.sql` walks the lock table, every slot, used or not.
/// Run once a second, as lockjam runs them (caches cold; PostgreSQL 15,
/// `max_connections = 1100`, the bench's machine), the status probe took
/// 0.10 ms beside 1 session and 1.24 ms beside 1,000 (about 1.1 µs a
/// backend), the lock-table probe 0.96 and 1.01 ms (about 13 ns a slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `probe.sql`: one field of each backend's status.
    Status,
    /// `probe_locks.sql`: `pg_locks`' ungranted rows.
    Locks,
}

impl Probe {
    /// What copying one backend's status costs, in lock-table slots
    /// walked: the two costs above, divided (the crossover, about 770
    /// sessions beside 71,680 slots).
    const SLOTS_PER_BACKEND: i64 = 90;

    /// The cheaper probe for `backends` connected sessions beside a lock
    /// table of `lock_slots`. Without `pg_read_all_stats` the status probe
    /// always: it sees only the role's own waits, as every other read then
    /// does, where `pg_locks` would show every role's.
    pub fn choose(backends: i64, lock_slots: i64, reads_all_stats: bool) -> Probe {
        if reads_all_stats && backends.saturating_mul(Probe::SLOTS_PER_BACKEND) > lock_slots {
            Probe::Locks
        } else {
            Probe::Status
        }
    }

    /// The probe's SQL; `$1` is lockjam's own pids.
    pub fn sql(self) -> &'static str {
        match self {
            Probe::Status => PROBE_SQL,
            Probe::Locks => PROBE_LOCKS_SQL,
        }
    }
}

/// What the probe of every tick says.
struct Tick {
    taken_at: SystemTime,
    /// The pids waiting for a heavyweight lock, in order.
    lock_waiting_pids: Vec<i32>,
    in_recovery: bool,
}

/// The last read of the waiters and their locks, kept while the same
/// backends wait.
struct WaitingRead {
    /// The probe's waiting pids when it was made.
    waiting_pids: Vec<i32>,
    sessions: Vec<Session>,
    locks: Vec<LockRow>,
}

pub struct Sampler {
    target: Target,
    connector: Connector,
    settings: SessionSettings,
    main: Option<MainSession>,
    databases: HashMap<String, DatabaseSession>,
    first_seen: HashMap<WaitKey, SystemTime>,
    database_session_idle: Duration,
    /// Sessions by database and state, as last read, and when.
    activity: Vec<ActivityGroup>,
    activity_read_at: Option<Instant>,
    activity_interval: Duration,
    /// The last read of the waiters, and whether a tick may reuse it (see
    /// [`Sampler::reuse_waiting_reads`]).
    waiting: Option<WaitingRead>,
    reuse_waiting: bool,
    /// Databases with client sessions in the last sample.
    databases_with_sessions: HashSet<String>,
    /// When the server's list of databases was last read.
    databases_read_at: Option<Instant>,
    /// What the target's role may not see, said once.
    warnings: Vec<String>,
}

impl Sampler {
    pub fn new(target: &Target, config: &SamplerConfig) -> Result<Sampler, ConnectError> {
        let settings = config.sessions();
        Ok(Sampler {
            target: target.clone(),
            connector: Connector::new(target, settings)?,
            settings,
            main: None,
            databases: HashMap::new(),
            first_seen: HashMap::new(),
            database_session_idle: config.database_session_idle,
            activity: Vec::new(),
            activity_read_at: None,
            activity_interval: config.activity_interval,
            waiting: None,
            reuse_waiting: false,
            databases_with_sessions: HashSet::new(),
            databases_read_at: None,
            warnings: Vec::new(),
        })
    }

    /// How long one sample may take before the caller abandons it: the
    /// server-side statement timeout cannot fire in a backend that is
    /// stopped, so the client keeps its own limit.
    pub fn deadline(&self) -> Duration {
        self.settings.connect_timeout * 2 + self.settings.statement_timeout * 4
    }

    /// The server version (`server_version_num`) of the open session.
    pub fn server_version(&self) -> Option<i32> {
        self.main.as_ref().map(|m| m.server_version)
    }

    /// Problems of privilege that make the figures incomplete.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Drops every session, so that the next sample starts on fresh ones.
    pub fn reset(&mut self) {
        self.main = None;
        self.databases.clear();
        self.activity_read_at = None;
        self.waiting = None;
    }

    /// Lets a tick whose probe finds the same backends waiting as at the
    /// last read of the waiters reuse that read, until the next read of
    /// the sessions by state (every `activity_interval`, on whose tick the
    /// waiters are read again): the waiters' read scans every backend's status
    /// (the costliest statement of a sample), and while a queue stands
    /// still it would read the same thing every tick. A new or departed
    /// waiter is still seen on the tick it happens; what may lag, by up to
    /// `activity_interval`, is a change that leaves the waiters as they
    /// are (a blocker's state or query). Wait and transaction ages keep
    /// counting, from the server's timestamps. For watching only: a live
    /// or dry-run policy, or a `fast_interval`, wants every tick fresh.
    pub fn reuse_waiting_reads(&mut self, reuse: bool) {
        self.reuse_waiting = reuse;
        self.waiting = None;
    }

    /// The probe the next tick runs, the cheaper of two for the sessions
    /// last counted (see [`Probe`]); `None` until connected.
    pub fn next_probe(&self) -> Option<Probe> {
        let main = self.main.as_ref()?;
        let sessions: u64 = self.activity.iter().map(|group| group.sessions).sum();
        Some(Probe::choose(
            i64::try_from(sessions).unwrap_or(i64::MAX),
            main.lock_slots,
            main.reads_all_stats,
        ))
    }

    /// The target's name.
    pub fn target_name(&self) -> &str {
        &self.target.name
    }

    /// Which server the target is, connecting if need be.
    pub async fn identify(&mut self) -> Result<ServerIdentity, SampleError> {
        if self.main.is_none() {
            let main = self.open_main().await?;
            self.main = Some(main);
        }
        Ok(self.main.as_ref().expect("connected").identity.clone())
    }

    /// The server the main session reached, while connected.
    pub fn server_identity(&self) -> Option<&ServerIdentity> {
        self.main.as_ref().map(|m| &m.identity)
    }

    /// Takes one sample. On error every session is dropped and the next
    /// call reconnects.
    pub async fn sample(&mut self) -> Result<Snapshot, SampleError> {
        let result = self.read().await;
        if result.is_err() {
            self.reset();
        }
        result
    }

    async fn read(&mut self) -> Result<Snapshot, SampleError> {
        if self.main.is_none() {
            let main = self.open_main().await?;
            self.main = Some(main);
        }
        let own_pids = self.own_pids();
        // A tick that reads the sessions by state learns from the same scan
        // what the probe would say, and runs no probe.
        let activity_due = !matches!(self.activity_read_at, Some(at) if at.elapsed() < self.activity_interval);
        let (tick, existing_databases) = if activity_due {
            let (tick, activity) = self.read_activity(&own_pids).await?;
            self.activity = activity;
            self.activity_read_at = Some(Instant::now());
            (tick, self.databases_if_one_vanished().await?)
        } else {
            (self.probe(&own_pids).await?, None)
        };
        if tick.lock_waiting_pids.is_empty() {
            self.waiting = None;
            self.first_seen.clear();
            self.close_idle_database_sessions();
            return Ok(Snapshot {
                existing_databases,
                in_recovery: tick.in_recovery,
                ..Snapshot::calm(tick.taken_at, self.activity.clone())
            });
        }
        // Refreshed with the sessions by state, so that one tick in
        // `activity_interval` reads everything and the others only probe.
        let reusable = self
            .waiting
            .as_ref()
            .filter(|read| self.reuse_waiting && !activity_due && read.waiting_pids == tick.lock_waiting_pids);
        let (sessions, locks) = match reusable {
            Some(read) => (read.sessions.clone(), read.locks.clone()),
            None => {
                let sessions = self.read_waiters(&own_pids, tick.in_recovery).await?;
                let pids: Vec<i32> = sessions.iter().map(|s| s.pid).collect();
                let mut locks = self.read_locks(&pids).await?;
                self.name_relations(&mut locks).await;
                let mut locks: Vec<LockRow> = locks.into_iter().map(|(lock, _, _)| lock).collect();
                self.fill_wait_starts(&sessions, &mut locks, tick.taken_at);
                if self.reuse_waiting {
                    self.waiting = Some(WaitingRead {
                        waiting_pids: tick.lock_waiting_pids,
                        sessions: sessions.clone(),
                        locks: locks.clone(),
                    });
                }
                (sessions, locks)
            }
        };
        self.close_idle_database_sessions();
        Ok(Snapshot {
            taken_at: tick.taken_at,
            activity: self.activity.clone(),
            sessions,
            locks,
            existing_databases,
            in_recovery: tick.in_recovery,
        })
    }

    /// The probe of a tick that does not read the sessions by state
    /// ([`Sampler::next_probe`]).
    async fn probe(&mut self, own_pids: &[i32]) -> Result<Tick, SampleError> {
        let probe = self.next_probe().expect("opened");
        let main = self.main.as_ref().expect("opened");
        let statement = match probe {
            Probe::Status => &main.probe,
            Probe::Locks => &main.probe_locks,
        };
        let row = main
            .client
            .query_one(statement, &[&own_pids])
            .await
            .map_err(|e| self.query_error("probing for lock waits", &e))?;
        Ok(self.tick_from(&row, row.get("lock_waiting_pids")))
    }

    /// Sessions by database and state (`activity.sql`), and the tick its
    /// scan answers.
    async fn read_activity(&mut self, own_pids: &[i32]) -> Result<(Tick, Vec<ActivityGroup>), SampleError> {
        let main = self.main.as_ref().expect("opened");
        let rows = main
            .client
            .query(&main.activity, &[&own_pids])
            .await
            .map_err(|e| self.query_error("reading pg_stat_activity", &e))?;
        // The outer join in activity.sql returns at least one row.
        let Some(first) = rows.first() else {
            return Err(SampleError::Query {
                target: self.target.name.clone(),
                what: "reading pg_stat_activity",
                message: "no row returned".into(),
            });
        };
        let mut waiting = Vec::new();
        let mut groups = Vec::new();
        for row in &rows {
            if let Some(pids) = row.get::<_, Option<Vec<i32>>>("lock_waiting_pids") {
                waiting.extend(pids);
            }
            let Some(datname) = row.get::<_, Option<String>>("datname") else {
                continue;
            };
            if row.get::<_, bool>("client") {
                groups.push(ActivityGroup {
                    datname,
                    state: row.get("state"),
                    sessions: row.get::<_, i64>("sessions") as u64,
                    oldest_xact_start: row.get("oldest_xact_start"),
                });
            }
        }
        waiting.sort_unstable();
        let tick = self.tick_from(first, waiting);
        Ok((tick, groups))
    }

    /// What a probe's columns say, with these waiting pids; it also
    /// re-checks the role's grant.
    fn tick_from(&mut self, row: &tokio_postgres::Row, lock_waiting_pids: Vec<i32>) -> Tick {
        let reads_all_stats = row.get("reads_all_stats");
        self.main.as_mut().expect("opened").reads_all_stats = reads_all_stats;
        self.note_privilege(reads_all_stats);
        Tick {
            taken_at: row.get("taken_at"),
            lock_waiting_pids,
            in_recovery: row.get("in_recovery"),
        }
    }

    /// The waiters and their blockers (`waiters.sql`).
    async fn read_waiters(&self, own_pids: &[i32], in_recovery: bool) -> Result<Vec<Session>, SampleError> {
        let main = self.main.as_ref().expect("opened");
        let rows = main
            .client
            .query(&main.waiters, &[&own_pids, &QUERY_TEXT_LENGTH, &in_recovery])
            .await
            .map_err(|e| self.query_error("reading lock waiters", &e))?;
        Ok(rows.iter().map(session_from_row).collect())
    }

    /// The locks of `pids` that matter (`locks.sql`), each with its
    /// database and relation oids, for naming.
    async fn read_locks(&self, pids: &[i32]) -> Result<Vec<(LockRow, Option<u32>, Option<u32>)>, SampleError> {
        let main = self.main.as_ref().expect("opened");
        let rows = main
            .client
            .query(&main.locks, &[&pids])
            .await
            .map_err(|e| self.query_error("reading pg_locks", &e))?;
        Ok(rows
            .iter()
            .map(|row| {
                let lock = LockRow {
                    pid: row.get("pid"),
                    granted: row.get("granted"),
                    locktype: row.get("locktype"),
                    mode: row.get("mode"),
                    tag: row.get("tag"),
                    datname: row.get("datname"),
                    relation: None,
                    wait_start: row.get("waitstart"),
                };
                (lock, row.get("database"), row.get("relation"))
            })
            .collect())
    }

    /// How an incident's sessions are now that its waits ended
    /// (`ended.sql`, rarely): `pids` (the waiter and the roots), and
    /// whether `waiter` holds the lock of `tag` in `mode`.
    pub async fn look_at_ended(
        &self,
        pids: &[i32],
        (waiter, tag, mode): (i32, &str, &str),
    ) -> Result<Vec<SessionNow>, SampleError> {
        let Some(main) = self.main.as_ref() else {
            return Err(SampleError::Query {
                target: self.target.name.clone(),
                what: "looking at an incident's sessions",
                message: "not connected".into(),
            });
        };
        let rows = main
            .client
            .query(ENDED_SQL, &[&pids, &waiter, &tag, &mode])
            .await
            .map_err(|e| self.query_error("looking at an incident's sessions", &e))?;
        Ok(rows
            .iter()
            .map(|row| SessionNow {
                pid: row.get("pid"),
                backend_start: row.get("backend_start"),
                xact_start: row.get("xact_start"),
                query_start: row.get("query_start"),
                state: row.get("state"),
                holds: row.get("holds"),
            })
            .collect())
    }

    /// The pids of this sampler's open sessions.
    pub(crate) fn own_pids(&self) -> Vec<i32> {
        self.main
            .iter()
            .map(|m| m.pid)
            .chain(self.databases.values().map(|d| d.pid))
            .collect()
    }

    fn query_error(&self, what: &'static str, error: &tokio_postgres::Error) -> SampleError {
        SampleError::Query {
            target: self.target.name.clone(),
            what,
            message: error_chain(error),
        }
    }

    /// Warns when the role may no longer read other roles' activity (at
    /// start, or after a REVOKE mid-run), and says so when it may again.
    fn note_privilege(&mut self, reads_all_stats: bool) {
        let role = &self.main.as_ref().expect("open").role;
        match (reads_all_stats, self.warnings.is_empty()) {
            (false, true) => {
                let warning = format!(
                    "role `{role}` may not read other roles' activity: their sessions count as state \"unknown\", \
                     show no query, and their lock waits go unseen; GRANT pg_monitor TO \"{role}\""
                );
                tracing::warn!(target = %self.target.name, "{warning}");
                self.warnings.push(warning);
            }
            (true, false) => {
                tracing::info!(target = %self.target.name, "role `{role}` may read other roles' activity again");
                self.warnings.clear();
            }
            _ => {}
        }
    }

    /// Opens the main session.
    async fn open_main(&self) -> Result<MainSession, SampleError> {
        let client = self.connector.connect(None).await?;
        let row = client
            .query_one(SESSION_SQL, &[])
            .await
            .map_err(|e| self.query_error("reading the session's identity", &e))?;
        let server_version: i32 = row.get("server_version");
        let identity = identify(&client)
            .await
            .map_err(|e| self.query_error("reading the server's identity", &e))?;
        let prepare = |sql: String, what: &'static str| {
            let client = &client;
            async move { client.prepare(&sql).await.map_err(|e| self.query_error(what, &e)) }
        };
        let [activity, waiters, locks] = sample_statements(server_version);
        let probe = prepare(Probe::Status.sql().into(), "preparing the probe").await?;
        let probe_locks = prepare(Probe::Locks.sql().into(), "preparing the pg_locks probe").await?;
        let activity = prepare(activity, "preparing the activity query").await?;
        let waiters = prepare(waiters, "preparing the waiters query").await?;
        let locks = prepare(locks, "preparing the pg_locks query").await?;
        let relations = prepare(RELATIONS_SQL.into(), "preparing the relation-name query").await?;
        let main = MainSession {
            identity,
            role: row.get("role"),
            pid: row.get("pid"),
            dbname: row.get("dbname"),
            server_version,
            lock_slots: row.get("lock_slots"),
            reads_all_stats: false,
            client,
            probe,
            probe_locks,
            activity,
            waiters,
            locks,
            relations,
        };
        Ok(main)
    }

    /// Fills `relation` of every lock on a relation with its
    /// schema-qualified name, looked up in the database that owns it. Names
    /// are looked up afresh in every sample that has waiters, never cached:
    /// a migration may rename a table while others wait, and a rule's
    /// `relations` glob must match the name the table has now.
    async fn name_relations(&mut self, locks: &mut [(LockRow, Option<u32>, Option<u32>)]) {
        let mut wanted: HashMap<(u32, Option<String>), HashSet<u32>> = HashMap::new();
        for (lock, database, relation) in locks.iter() {
            if let (Some(database), Some(relation)) = (database, relation) {
                wanted
                    .entry((*database, lock.datname.clone()))
                    .or_default()
                    .insert(*relation);
            }
        }
        let mut names: HashMap<(u32, u32), String> = HashMap::new();
        for ((database, datname), oids) in wanted {
            let oids: Vec<u32> = oids.into_iter().collect();
            match self.lookup_relations(datname.as_deref(), &oids).await {
                Ok(found) => {
                    for (oid, name) in found {
                        names.insert((database, oid), name);
                    }
                }
                Err(message) => tracing::warn!(
                    target = %self.target.name,
                    database = datname.as_deref().unwrap_or("(shared)"),
                    "cannot resolve relation names, showing oids: {message}"
                ),
            }
        }
        for (lock, database, relation) in locks.iter_mut() {
            if let (Some(database), Some(relation)) = (database, relation) {
                lock.relation = Some(
                    names
                        .get(&(*database, *relation))
                        .cloned()
                        .unwrap_or_else(|| format!("oid {relation}")),
                );
            }
        }
    }

    /// Shared catalogs (database 0) and the main session's own database are
    /// read on the main session; any other database on its own session,
    /// opened on first use.
    async fn lookup_relations(&mut self, datname: Option<&str>, oids: &[u32]) -> Result<Vec<(u32, String)>, String> {
        let main = self.main.as_ref().ok_or("not connected")?;
        let (client, statement) = match datname {
            None => (&main.client, &main.relations),
            Some(name) if name == main.dbname => (&main.client, &main.relations),
            Some(name) => {
                if !self.databases.contains_key(name) {
                    let session = self.open_database(name).await?;
                    self.databases.insert(name.to_string(), session);
                }
                let session = self.databases.get_mut(name).expect("inserted above");
                session.last_used = Instant::now();
                (&session.client, &session.relations)
            }
        };
        let rows = match client.query(statement, &[&oids]).await {
            Ok(rows) => rows,
            Err(e) => {
                if let Some(name) = datname {
                    self.databases.remove(name);
                }
                return Err(error_chain(&e));
            }
        };
        Ok(rows
            .iter()
            .map(|row| {
                let schema: String = row.get("nspname");
                let name: String = row.get("relname");
                (row.get("oid"), format!("{schema}.{name}"))
            })
            .collect())
    }

    async fn open_database(&self, name: &str) -> Result<DatabaseSession, String> {
        let client = self.connector.connect(Some(name)).await.map_err(|e| e.to_string())?;
        let pid: i32 = client
            .query_one("SELECT pg_catalog.pg_backend_pid()", &[])
            .await
            .map_err(|e| error_chain(&e))?
            .get(0);
        let relations = client.prepare(RELATIONS_SQL).await.map_err(|e| error_chain(&e))?;
        Ok(DatabaseSession {
            client,
            pid,
            relations,
            last_used: Instant::now(),
        })
    }

    /// The server's databases, read when a database that had client
    /// sessions in the previous read of the activity has none in the one
    /// just made (it may have been dropped, and its series must go with
    /// it); `None`, with no query, otherwise.
    async fn databases_if_one_vanished(&mut self) -> Result<Option<Vec<String>>, SampleError> {
        let now: HashSet<String> = self.activity.iter().map(|g| g.datname.clone()).collect();
        let vanished = self.databases_with_sessions.iter().any(|d| !now.contains(d));
        self.databases_with_sessions = now;
        // Also now and then: a database can be dropped long after its
        // last session left.
        let due = self
            .databases_read_at
            .map_or(true, |at| at.elapsed() >= DATABASE_LIST_PERIOD);
        if !vanished && !due {
            return Ok(None);
        }
        self.databases_read_at = Some(Instant::now());
        let main = self.main.as_ref().expect("opened before the activity read");
        let rows = main
            .client
            .query("SELECT datname::pg_catalog.text FROM pg_catalog.pg_database", &[])
            .await
            .map_err(|e| self.query_error("reading pg_database", &e))?;
        Ok(Some(rows.iter().map(|row| row.get(0)).collect()))
    }

    /// Closes sessions to other databases unused for
    /// `database_session_idle`, and forgets those the server ended (a
    /// dropped database): checked every sample, calm or not, so that
    /// lockjam does not keep `DROP DATABASE` from going through.
    fn close_idle_database_sessions(&mut self) {
        let idle = self.database_session_idle;
        self.databases
            .retain(|_, session| session.last_used.elapsed() < idle && !session.client.is_closed());
    }

    /// Before PostgreSQL 14, and for the moment after a wait begins on
    /// later versions, `waitstart` is NULL: the wait start is then the
    /// first sample that saw this wait.
    fn fill_wait_starts(&mut self, sessions: &[Session], locks: &mut [LockRow], taken_at: SystemTime) {
        let backend_start: HashMap<i32, Option<SystemTime>> =
            sessions.iter().map(|s| (s.pid, s.backend_start)).collect();
        let mut seen_now = HashSet::new();
        for lock in locks.iter_mut().filter(|l| !l.granted) {
            let started = backend_start.get(&lock.pid).copied().flatten();
            let key = (lock.pid, started, lock.tag.clone(), lock.mode.clone());
            let first_seen = *self.first_seen.entry(key.clone()).or_insert(taken_at);
            if lock.wait_start.is_none() {
                lock.wait_start = Some(first_seen);
            }
            seen_now.insert(key);
        }
        self.first_seen.retain(|key, _| seen_now.contains(key));
    }
}

/// The server's identity (`identity.sql`, and the system identifier where
/// the role may read it).
async fn identify(client: &Client) -> Result<ServerIdentity, tokio_postgres::Error> {
    let row = client.query_one(IDENTITY_SQL, &[]).await?;
    // pg_control_system() is granted to pg_monitor by default, but a
    // managed service may revoke it: then start time and directory alone.
    let system_identifier = client
        .query_one("SELECT system_identifier FROM pg_catalog.pg_control_system()", &[])
        .await
        .ok()
        .map(|row| row.get::<_, i64>(0));
    Ok(ServerIdentity {
        system_identifier,
        started: crate::view::rfc3339(row.get::<_, SystemTime>("started")),
        data_directory: row.get("data_directory"),
    })
}

pub(crate) fn session_from_row(row: &tokio_postgres::Row) -> Session {
    Session {
        pid: row.get("pid"),
        datname: row.get("datname"),
        usename: row.get("usename"),
        application_name: row.get("application_name"),
        client_addr: row.get("client_addr"),
        backend_type: row.get("backend_type"),
        state: row.get("state"),
        wait_event_type: row.get("wait_event_type"),
        wait_event: row.get("wait_event"),
        backend_start: row.get("backend_start"),
        xact_start: row.get("xact_start"),
        query_start: row.get("query_start"),
        // Every query text lockjam shows passes here.
        query: row
            .get::<_, Option<String>>("query")
            .map(|query| crate::view::redact_passwords(&query)),
        blocked_by: row.get("blocked_by"),
    }
}

#[cfg(test)]
mod tests {
    use super::Probe;

    /// The lock table of `max_connections` at the default 64 locks per
    /// transaction and no prepared transactions.
    fn slots(max_connections: i64) -> i64 {
        64 * max_connections
    }

    #[test]
    fn the_probe_is_the_cheaper_for_the_sessions_connected() {
        // The measured points: few sessions, and 1,000 of 1,100.
        assert_eq!(Probe::choose(1, slots(1100), true), Probe::Status);
        assert_eq!(Probe::choose(1000, slots(1100), true), Probe::Locks);
        // 1,000 sessions beside a lock table of 5,000 connections: walking
        // it costs more than copying the sessions' status.
        assert_eq!(Probe::choose(1000, slots(5000), true), Probe::Status);
        // The crossover: 90 slots a backend.
        assert_eq!(Probe::choose(700, slots(1100), true), Probe::Status);
        assert_eq!(Probe::choose(100, 9_000, true), Probe::Status);
        assert_eq!(Probe::choose(101, 9_000, true), Probe::Locks);
        // Before the first count of sessions.
        assert_eq!(Probe::choose(0, slots(100), true), Probe::Status);
        assert_eq!(Probe::choose(i64::MAX, i64::MAX, true), Probe::Status);
    }

    #[test]
    fn without_pg_read_all_stats_the_probe_reads_status() {
        assert_eq!(Probe::choose(1000, slots(1100), false), Probe::Status);
    }
}
