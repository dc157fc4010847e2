//! The randomized safety run. A seeded generator stages lock scenarios with
//! real sessions on a real cluster (table locks in random modes, row locks,
//! `FOR UPDATE`/`FOR SHARE`, advisory locks, holders active or idle in
//! transaction, chains of victims, several strong waiters on one table, a
//! migration holding one table while it waits for another, deadlocks,
//! protected applications and users, holders that commit just as
//! `min_wait` passes, and sessions coming and going), lockjam's policy acts
//! on them, and a checker that shares no code with lockjam builds its own
//! ground truth from reads of `pg_stat_activity`, `pg_locks` and
//! `pg_blocking_pids` every few milliseconds, and flags:
//!
//! - a *wrong signal*: to a session that, at that instant, was not a root
//!   blocker of a waiter the rule matches (a waiting session, a soft
//!   blocker, a victim), was protected, or whose identity (backend start,
//!   transaction start) was not the one the event names; or a
//!   `cancel_waiter` while the first rule could still signal a root;
//! - a *miss*: a root that kept a matching waiter blocked more than a
//!   second past `min_wait` with no signal (or, when every root is
//!   protected, a waiter the `cancel_waiter` rule should have cancelled by
//!   then);
//! - events and `lockjam_policy_actions_total` that disagree.
//!
//! The sessions behave as applications do: every one works in a
//! transaction, and after an error keeps the aborted transaction for
//! 300 ms before its ROLLBACK, so that a signalled session still shows
//! what it held. Each records, with the server's clock, when each of its
//! statements returned: the checker's proof that a session it last saw
//! waiting got its lock before a signal.
//!
//! CI runs [`CI_ROUNDS`] rounds of [`SCENARIOS_PER_ROUND`] scenarios on
//! every PostgreSQL version; `scripts/safety-run.sh` runs 1,000 or more
//! (`LOCKJAM_SAFETY_SCENARIOS`) through the ignored test `safety_many`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use lockjam::audit::AuditEvent;
use lockjam::cluster::{Cluster, ClusterOptions};
use lockjam::policy::{Action, Glob, Policy, Rule};
use lockjam::service::Service;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::{backend_pid, config_with, connect, start_cluster, wait_until};

/// Scenarios staged side by side in one round, each on its own tables.
const SCENARIOS_PER_ROUND: usize = 6;
/// Rounds of the CI run: 108 scenarios.
const CI_ROUNDS: u64 = 18;
/// How long a round's sessions run before it is judged.
const ROUND: Duration = Duration::from_secs(4);
/// How long a session keeps its aborted transaction after an error.
const SLOW_ROLLBACK: Duration = Duration::from_millis(300);
/// A root left blocking a matching waiter this long past min_wait, with no
/// signal, is a miss.
const MISS_AFTER: f64 = 1.0;
/// A signal is judged against the checker's last read before it; a read
/// older than this leaves it unjudged, which fails the run too. The
/// checker reads about every 30 ms; on the 2-core CI machine, with the
/// suite's other tests beside it, one read in a run of PostgreSQL 17 came
/// more than 0.25 s late (0 wrong signals, 0 misses, 1 unjudged), so the
/// bound is 0.5 s, an eighth of a round. What the signal relies on at its
/// instant, signal.sql re-checks in the same statement.
const MAX_READ_GAP: f64 = 0.5;
/// Clock slack when comparing a wait with min_wait, and identities.
const SLACK: f64 = 0.02;

/// The modes the default rule matches, as the documentation gives them.
const MATCHED_MODES: [&str; 3] = ["ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"];

/// A seeded generator (splitmix64): the same seed stages the same rounds.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x9E37_79B9_7F4A_7C15)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.below(high - low + 1))
    }
}

/// Who a protection covers, in a round.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Level {
    Policy,
    FirstRule,
}

/// The policy of one round, and the checker's own reading of it.
#[derive(Debug, Clone)]
struct RoundPolicy {
    min_wait: Duration,
    /// terminate_after = 1s, or "0s".
    terminate: bool,
    /// [policy] protect_applications = ["pg_dump*"].
    protect_pg_dump: bool,
    /// protect_users = ["backup"], under [policy] or in the first rule.
    protect_backup: Option<Level>,
    /// A second rule, `cancel_waiter`, with this min_wait.
    fallback: Option<Duration>,
}

impl RoundPolicy {
    fn random(rng: &mut Rng) -> RoundPolicy {
        let min_wait = rng.pick(&[400, 600, 800]);
        RoundPolicy {
            min_wait: Duration::from_millis(min_wait),
            terminate: rng.chance(0.7),
            protect_pg_dump: rng.chance(0.7),
            protect_backup: match rng.below(3) {
                0 => None,
                1 => Some(Level::Policy),
                _ => Some(Level::FirstRule),
            },
            fallback: rng
                .chance(0.5)
                .then(|| Duration::from_millis(min_wait + rng.pick(&[0, 300]))),
        }
    }

    fn policy(&self) -> Policy {
        let backup = || vec![Glob("backup".into())];
        let first = Rule {
            terminate_after: self.terminate.then_some(Duration::from_secs(1)),
            protect_users: if self.protect_backup == Some(Level::FirstRule) {
                backup()
            } else {
                Vec::new()
            },
            ..Rule::unblock_migrations(self.min_wait)
        };
        let mut rules = vec![first];
        if let Some(min_wait) = self.fallback {
            rules.push(Rule {
                name: "timeout".into(),
                action: Action::CancelWaiter,
                terminate_after: None,
                ..Rule::unblock_migrations(min_wait)
            });
        }
        let mut policy = Policy::acting(rules);
        policy.max_actions_per_minute = 100_000;
        if self.protect_pg_dump {
            policy.protect_applications = vec![Glob("pg_dump*".into())];
        }
        if self.protect_backup == Some(Level::Policy) {
            policy.protect_users = backup();
        }
        policy
    }

    /// Whether rule `rule` (0: unblock-migrations, 1: timeout) may never
    /// signal a session of this application and user.
    fn protected(&self, rule: usize, application: &str, user: &str) -> bool {
        (self.protect_pg_dump && application.starts_with("pg_dump"))
            || (user == "backup"
                && match self.protect_backup {
                    Some(Level::Policy) => true,
                    Some(Level::FirstRule) => rule == 0,
                    None => false,
                })
    }

    fn min_wait_of(&self, rule: usize) -> f64 {
        match rule {
            0 => self.min_wait.as_secs_f64(),
            _ => self.fallback.unwrap_or(self.min_wait).as_secs_f64(),
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Sql(String),
    /// The client waits; in its transaction, the session is idle.
    Sleep(Duration),
}

/// One session of a scenario.
#[derive(Debug, Clone)]
struct Actor {
    application: &'static str,
    user: &'static str,
    start: Duration,
    steps: Vec<Step>,
}

/// Builds the sessions of one scenario on tables `<prefix>_a` and `_b`.
struct Stage<'a> {
    rng: &'a mut Rng,
    prefix: String,
    min_wait: Duration,
    actors: Vec<Actor>,
    columns: u32,
}

impl Stage<'_> {
    fn table(&self, which: &str) -> String {
        format!("{}_{which}", self.prefix)
    }

    fn advisory_key(&self) -> u64 {
        let digits: String = self.prefix.chars().filter(char::is_ascii_digit).collect();
        digits.parse::<u64>().unwrap_or(0) * 10 + 7
    }

    /// Who holds the first lock: mostly the application, sometimes a
    /// backup or a reporting role that a round may protect.
    fn holder_identity(&mut self) -> (&'static str, &'static str) {
        self.rng.pick(&[
            ("app", "postgres"),
            ("app", "postgres"),
            ("app", "postgres"),
            ("pg_dump", "postgres"),
            ("report", "backup"),
        ])
    }

    /// How long a holder keeps its lock once it has it: about when the
    /// waiter (starting `waiter_after` later) reaches min_wait, a little
    /// past it, or beyond the round.
    fn hold(&mut self, waiter_after: Duration) -> Duration {
        match self.rng.below(4) {
            0 => {
                let around = waiter_after + self.min_wait;
                around + self.rng.millis(0, 240) - Duration::from_millis(120)
            }
            1 => self.min_wait + Duration::from_millis(1500),
            2 => Duration::from_millis(100),
            _ => Duration::from_secs(8),
        }
    }

    /// Keeps a lock for `hold`: running a statement (active) or idle in
    /// transaction.
    fn keep(&mut self, hold: Duration) -> Step {
        if self.rng.chance(0.5) {
            Step::Sql(format!("SELECT pg_sleep({:.3})", hold.as_secs_f64()))
        } else {
            Step::Sleep(hold)
        }
    }

    /// A holder of a lock on `table` drawn at random: a read, a table lock
    /// in a weak mode, a row update, a row lock, or an advisory lock.
    fn holder(&mut self, table: &str, waiter_after: Duration) {
        let k = 1 + self.rng.below(10);
        let key = self.advisory_key();
        let acquire = match self.rng.below(6) {
            0 | 1 => format!("SELECT count(*) FROM {table}"),
            2 => format!(
                "LOCK TABLE {table} IN {} MODE",
                self.rng.pick(&[
                    "ACCESS SHARE",
                    "ROW SHARE",
                    "ROW EXCLUSIVE",
                    "SHARE UPDATE EXCLUSIVE",
                    "SHARE"
                ])
            ),
            3 => format!("UPDATE {table} SET v = v + 1 WHERE id = {k}"),
            4 => format!(
                "SELECT id FROM {table} WHERE id = {k} FOR {}",
                self.rng.pick(&["UPDATE", "NO KEY UPDATE", "SHARE", "KEY SHARE"])
            ),
            _ => format!("SELECT pg_advisory_xact_lock({key}), count(*) FROM {table}"),
        };
        self.holder_running(acquire, waiter_after);
    }

    /// A holder whose first statement is `acquire`, keeping its locks as
    /// [`Stage::hold`] draws.
    fn holder_running(&mut self, acquire: String, waiter_after: Duration) {
        let (application, user) = self.holder_identity();
        let hold = self.hold(waiter_after);
        let keep = self.keep(hold);
        self.actors.push(Actor {
            application,
            user,
            start: Duration::ZERO,
            steps: vec![Step::Sql(acquire), keep],
        });
    }

    /// A session that runs `statements` in one transaction from `start`,
    /// then lingers 50 ms before it commits.
    fn session(&mut self, application: &'static str, start: Duration, statements: &[String]) {
        let mut steps: Vec<Step> = statements.iter().map(|s| Step::Sql(s.clone())).collect();
        steps.push(Step::Sleep(Duration::from_millis(50)));
        self.actors.push(Actor {
            application,
            user: "postgres",
            start,
            steps,
        });
    }

    /// A migration: a strong lock on `table`, mostly in a mode the default
    /// rule matches; sometimes a DDL statement; sometimes SHARE, which no
    /// default rule matches.
    fn migration_statement(&mut self, table: &str) -> String {
        self.columns += 1;
        match self.rng.below(7) {
            0 | 1 => format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"),
            2 => format!("ALTER TABLE {table} ADD COLUMN c{} int", self.columns),
            3 => format!("LOCK TABLE {table} IN EXCLUSIVE MODE"),
            4 => format!("LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"),
            5 => format!("ALTER TABLE {table} DROP COLUMN IF EXISTS gone{}", self.columns),
            _ => format!("LOCK TABLE {table} IN SHARE MODE"),
        }
    }

    fn migration(&mut self, table: &str, start: Duration) {
        let statement = self.migration_statement(table);
        let (application, user) = self.rng.pick(&[
            ("migrate", "postgres"),
            ("migrate", "postgres"),
            ("migrate", "postgres"),
            ("", "postgres"),
            ("pg_dump_restore", "postgres"),
            ("migrate", "backup"),
        ]);
        self.actors.push(Actor {
            application,
            user,
            start,
            steps: vec![Step::Sql(statement), Step::Sleep(Duration::from_millis(30))],
        });
    }

    fn followers(&mut self, table: &str, count: u64, from: Duration) {
        for i in 0..count {
            let k = 1 + self.rng.below(10);
            let statement = match self.rng.below(3) {
                0 => format!("SELECT count(*) FROM {table}"),
                1 => format!("UPDATE {table} SET v = v WHERE id = {k}"),
                _ => format!("SELECT id FROM {table} WHERE id = {k} FOR SHARE"),
            };
            let linger = self.rng.millis(0, 200);
            self.actors.push(Actor {
                application: "web",
                user: "postgres",
                start: from + Duration::from_millis(30 * i),
                steps: vec![Step::Sql(statement), Step::Sleep(linger)],
            });
        }
    }

    /// One scenario, of a shape drawn at random.
    fn scenario(&mut self) -> &'static str {
        let (a, b) = (self.table("a"), self.table("b"));
        let ms = Duration::from_millis;
        let k = 1 + self.rng.below(10);
        let followers = self.rng.below(5);
        match self.rng.below(7) {
            0 => {
                self.holder(&a, ms(200));
                self.migration(&a, ms(200));
                if self.rng.chance(0.3) {
                    self.migration(&a, ms(300));
                }
                self.followers(&a, followers, ms(350));
                "queue behind a holder"
            }
            1 => {
                // Incident 002: a victim holds ROW EXCLUSIVE while it waits
                // for the holder's row.
                self.holder_running(format!("UPDATE {a} SET v = v + 1 WHERE id = {k}"), ms(250));
                self.session("web", ms(100), &[format!("UPDATE {a} SET v = v WHERE id = {k}")]);
                self.migration(&a, ms(250));
                self.followers(&a, followers, ms(400));
                "victim holding the table waits for a row"
            }
            2 => {
                // Row-lock queue: the second FOR UPDATE waits for the tuple
                // lock the first holds while it waits for the row's owner.
                self.holder_running(format!("UPDATE {a} SET v = v + 1 WHERE id = {k}"), ms(300));
                for start in [ms(100), ms(200)] {
                    self.session("web", start, &[format!("SELECT id FROM {a} WHERE id = {k} FOR UPDATE")]);
                }
                if self.rng.chance(0.5) {
                    self.migration(&a, ms(300));
                }
                self.followers(&a, followers, ms(400));
                "row-lock queue"
            }
            3 => {
                // A migration that holds b while it waits for a: the
                // queries on b are stuck behind it.
                self.holder(&a, ms(200));
                let statement = self.migration_statement(&a);
                self.session(
                    "migrate",
                    ms(200),
                    &[format!("LOCK TABLE {b} IN ACCESS EXCLUSIVE MODE"), statement],
                );
                let on_b = 2 + self.rng.below(3);
                self.followers(&b, on_b, ms(400));
                self.followers(&a, followers.min(2), ms(450));
                "migration holding one table waits for another"
            }
            4 => {
                // A chain through an advisory lock: the victim holds ROW
                // EXCLUSIVE on a and waits for the holder's advisory lock.
                let key = self.advisory_key();
                self.holder_running(format!("SELECT pg_advisory_xact_lock({key})"), ms(250));
                self.session(
                    "worker",
                    ms(100),
                    &[
                        format!("LOCK TABLE {a} IN ROW EXCLUSIVE MODE"),
                        format!("SELECT pg_advisory_xact_lock({key})"),
                    ],
                );
                self.migration(&a, ms(250));
                self.followers(&a, followers, ms(400));
                "chain through an advisory lock"
            }
            5 => {
                // A deadlock, which the server breaks after deadlock_timeout.
                for (start, first, second) in [(ms(0), &a, &b), (ms(10), &b, &a)] {
                    self.actors.push(Actor {
                        application: "migrate",
                        user: "postgres",
                        start,
                        steps: vec![
                            Step::Sql(format!("LOCK TABLE {first} IN ACCESS EXCLUSIVE MODE")),
                            Step::Sleep(ms(300)),
                            Step::Sql(format!("LOCK TABLE {second} IN ACCESS EXCLUSIVE MODE")),
                            Step::Sleep(ms(30)),
                        ],
                    });
                }
                self.followers(&a, followers.min(2), ms(400));
                "deadlock"
            }
            _ => {
                // Several strong waiters on one table.
                self.holder(&a, ms(200));
                self.migration(&a, ms(200));
                self.migration(&a, ms(260));
                self.migration(&a, ms(320));
                self.followers(&a, followers, ms(400));
                "several strong waiters on one table"
            }
        }
    }
}

/// When a session's statement returned, by the server's clock.
#[derive(Debug, Clone, Copy)]
struct Returned {
    pid: i32,
    at: f64,
}

/// Runs one session: its steps in a transaction, the time each statement
/// returned recorded; after an error, the aborted transaction is kept for
/// [`SLOW_ROLLBACK`] before the ROLLBACK.
async fn run_actor(dsn: String, actor: Actor, start: Instant, deadline: Instant, log: Arc<Mutex<Vec<Returned>>>) {
    tokio::time::sleep_until(start + actor.start).await;
    let client = connect(&format!("{dsn} user={}", actor.user), actor.application).await;
    let pid = backend_pid(&client).await;
    if client.batch_execute("BEGIN").await.is_err() {
        return;
    }
    for step in &actor.steps {
        match step {
            Step::Sleep(pause) => {
                tokio::select! {
                    _ = tokio::time::sleep(*pause) => {}
                    _ = tokio::time::sleep_until(deadline) => return,
                }
            }
            Step::Sql(sql) => {
                let timed = format!("{sql}; SELECT extract(epoch FROM clock_timestamp())::float8::text");
                match client.simple_query(&timed).await {
                    Ok(messages) => {
                        let at = messages.iter().rev().find_map(|m| match m {
                            SimpleQueryMessage::Row(row) => row.get(0).and_then(|t| t.parse::<f64>().ok()),
                            _ => None,
                        });
                        if let Some(at) = at {
                            log.lock().unwrap().push(Returned { pid, at });
                        }
                    }
                    Err(_) => {
                        tokio::time::sleep(SLOW_ROLLBACK).await;
                        let _ = client.batch_execute("ROLLBACK").await;
                        return;
                    }
                }
            }
        }
    }
    let _ = client.batch_execute("COMMIT").await;
}

/// A session as one read of the checker saw it.
#[derive(Debug, Clone)]
struct Seen {
    backend_start: f64,
    xact_start: Option<f64>,
    state: String,
    application: String,
    user: String,
    wait: Option<SeenWait>,
}

/// The lock a session waited for, and who `pg_blocking_pids` said blocks it.
#[derive(Debug, Clone)]
struct SeenWait {
    locktype: String,
    mode: String,
    tag: String,
    waitstart: Option<f64>,
    blocked_by: Vec<i32>,
}

/// One read of the checker.
#[derive(Debug)]
struct Reading {
    at: f64,
    sessions: HashMap<i32, Seen>,
}

/// The checker's read: every client session of the database with its
/// ungranted lock, if any, and `pg_blocking_pids` for those that wait.
fn reading_sql(server_version: i32) -> String {
    let waitstart = if server_version >= 140_000 {
        "extract(epoch FROM l.waitstart)::float8"
    } else {
        "NULL::float8"
    };
    format!(
        "WITH now AS MATERIALIZED (SELECT extract(epoch FROM clock_timestamp())::float8 AS at)
         SELECT (SELECT at FROM now), a.pid, extract(epoch FROM a.backend_start)::float8,
                extract(epoch FROM a.xact_start)::float8, coalesce(a.state, ''),
                coalesce(a.application_name, ''), coalesce(a.usename::text, ''),
                l.locktype, l.mode,
                concat_ws(':', l.locktype, l.database, l.relation, l.page, l.tuple, l.transactionid,
                          l.classid, l.objid, l.objsubid),
                {waitstart},
                CASE WHEN l.pid IS NOT NULL THEN pg_blocking_pids(a.pid) END
         FROM pg_stat_activity AS a
         LEFT JOIN pg_locks AS l ON l.pid = a.pid AND NOT l.granted
         WHERE a.datname = current_database() AND a.backend_type = 'client backend'
           AND a.pid <> pg_backend_pid()"
    )
}

/// Reads until told to stop.
async fn observe(client: Client, server_version: i32, mut stop: watch::Receiver<bool>) -> Vec<Reading> {
    let statement = client.prepare(&reading_sql(server_version)).await.unwrap();
    let mut readings = Vec::new();
    while !*stop.borrow() {
        let rows = match client.query(&statement, &[]).await {
            Ok(rows) => rows,
            Err(e) => panic!("the checker's read failed: {e}"),
        };
        let mut sessions = HashMap::new();
        let mut at = None;
        for row in &rows {
            at = row.get::<_, Option<f64>>(0);
            let locktype: Option<String> = row.get(7);
            sessions.insert(
                row.get::<_, i32>(1),
                Seen {
                    backend_start: row.get(2),
                    xact_start: row.get(3),
                    state: row.get(4),
                    application: row.get(5),
                    user: row.get(6),
                    wait: locktype.map(|locktype| SeenWait {
                        locktype,
                        mode: row.get(8),
                        tag: row.get(9),
                        waitstart: row.get(10),
                        blocked_by: row.get::<_, Option<Vec<i32>>>(11).unwrap_or_default(),
                    }),
                },
            );
        }
        if let Some(at) = at {
            readings.push(Reading { at, sessions });
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(3)) => {}
            _ = stop.changed() => {}
        }
    }
    readings
}

/// A waiter's wait tree in one reading: its root blockers (sessions it
/// waits on, directly or through waiting sessions, that wait on no one)
/// and the waiting sessions on the way.
fn tree(reading: &Reading, waiter: i32) -> (BTreeSet<i32>, BTreeSet<i32>) {
    let mut roots = BTreeSet::new();
    let mut members = BTreeSet::new();
    let mut seen = HashSet::from([waiter]);
    let mut stack = vec![waiter];
    while let Some(pid) = stack.pop() {
        let Some(wait) = reading.sessions.get(&pid).and_then(|s| s.wait.as_ref()) else {
            continue;
        };
        for &blocker in &wait.blocked_by {
            if !seen.insert(blocker) {
                continue;
            }
            if reading.sessions.get(&blocker).is_some_and(|s| s.wait.is_some()) {
                members.insert(blocker);
                stack.push(blocker);
            } else {
                roots.insert(blocker);
            }
        }
    }
    (roots, members)
}

fn matched(wait: &SeenWait) -> bool {
    wait.locktype == "relation" && MATCHED_MODES.contains(&wait.mode.as_str())
}

fn idle_in_transaction(seen: &Seen) -> bool {
    seen.state.starts_with("idle in transaction")
}

fn epoch(text: &str) -> f64 {
    humantime::parse_rfc3339(text)
        .unwrap_or_else(|e| panic!("event time {text:?}: {e}"))
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn same_time(event: Option<&String>, seen: Option<f64>) -> bool {
    match (event, seen) {
        (Some(text), Some(seen)) => (epoch(text) - seen).abs() < 0.002,
        (None, None) => true,
        _ => false,
    }
}

/// What one round, or the whole run, found.
#[derive(Debug, Default)]
struct Findings {
    scenarios: usize,
    shapes: BTreeMap<&'static str, usize>,
    signals: BTreeMap<(String, String), usize>,
    decisions: usize,
    readings: usize,
    wrong: Vec<String>,
    misses: Vec<String>,
    unjudged: Vec<String>,
    disagreements: Vec<String>,
}

impl Findings {
    fn add(&mut self, other: Findings) {
        self.scenarios += other.scenarios;
        for (shape, n) in other.shapes {
            *self.shapes.entry(shape).or_default() += n;
        }
        for (key, n) in other.signals {
            *self.signals.entry(key).or_default() += n;
        }
        self.decisions += other.decisions;
        self.readings += other.readings;
        self.wrong.extend(other.wrong);
        self.misses.extend(other.misses);
        self.unjudged.extend(other.unjudged);
        self.disagreements.extend(other.disagreements);
    }

    fn signals(&self) -> usize {
        self.signals.values().sum()
    }

    fn summary(&self) -> String {
        format!(
            "{} scenarios ({:?}), {} decisions, {} signals ({:?}), {} wrong signals, {} misses, {} unjudged, \
             {} event/counter disagreements, {} checker reads",
            self.scenarios,
            self.shapes,
            self.decisions,
            self.signals(),
            self.signals,
            self.wrong.len(),
            self.misses.len(),
            self.unjudged.len(),
            self.disagreements.len(),
            self.readings
        )
    }
}

/// Everything one round left behind, for the judge.
struct Round {
    policy: RoundPolicy,
    readings: Vec<Reading>,
    returned: Vec<Returned>,
    events: Vec<AuditEvent>,
    counters: BTreeMap<(String, String, String), f64>,
}

impl Round {
    /// When the checker first saw each wait (pid, lock tag), for servers
    /// without `pg_locks.waitstart` and the instant before it is filled.
    fn wait_starts(&self) -> HashMap<(i32, String), f64> {
        let mut starts = HashMap::new();
        for reading in &self.readings {
            for (pid, seen) in &reading.sessions {
                if let Some(wait) = &seen.wait {
                    let start = wait.waitstart.unwrap_or(reading.at);
                    let entry = starts.entry((*pid, wait.tag.clone())).or_insert(start);
                    *entry = entry.min(start);
                }
            }
        }
        starts
    }

    fn reading_before(&self, at: f64) -> Option<&Reading> {
        let index = self.readings.partition_point(|r| r.at <= at);
        index.checked_sub(1).map(|i| &self.readings[i])
    }

    fn reading_near(&self, at: f64) -> Option<&Reading> {
        self.readings
            .iter()
            .min_by(|a, b| (a.at - at).abs().total_cmp(&(b.at - at).abs()))
    }

    fn returned_between(&self, pid: i32, after: f64, until: f64) -> bool {
        self.returned
            .iter()
            .any(|r| r.pid == pid && r.at > after && r.at <= until)
    }

    /// Whether the first rule can never signal `seen`: protected, or idle
    /// in transaction when it may not terminate.
    fn unsignallable_by_first_rule(&self, seen: &Seen) -> bool {
        self.policy.protected(0, &seen.application, &seen.user) || (idle_in_transaction(seen) && !self.policy.terminate)
    }

    /// Why a signal was wrong in one reading, or `None` if it was right.
    fn fault(
        &self,
        event: &AuditEvent,
        reading: &Reading,
        at: f64,
        starts: &HashMap<(i32, String), f64>,
    ) -> Option<String> {
        let rule = usize::from(event.rule != "unblock-migrations");
        let waiter_pid = event.waiter.session.pid;
        let Some(waiter) = reading.sessions.get(&waiter_pid) else {
            return Some("the waiter is not there".into());
        };
        if !same_time(event.waiter.session.backend_start.as_ref(), Some(waiter.backend_start)) {
            return Some("the waiter is another session".into());
        }
        let Some(wait) = waiter.wait.as_ref().filter(|w| matched(w)) else {
            return Some("the waiter does not wait in a matched mode on a relation".into());
        };
        let waited = at - starts.get(&(waiter_pid, wait.tag.clone())).copied().unwrap_or(at);
        if waited + SLACK < self.policy.min_wait_of(rule) {
            return Some(format!("the waiter had waited {waited:.3}s only"));
        }
        let target_pid = event.signalled_pid;
        let Some(target) = reading.sessions.get(&target_pid) else {
            return Some("the signalled session is not there".into());
        };
        if self.policy.protected(rule, &target.application, &target.user) {
            return Some(format!("protected: {}/{}", target.user, target.application));
        }
        let (roots, members) = tree(reading, waiter_pid);
        match event.rule_action {
            "cancel_blockers" => {
                let blocker = event.blocker.as_ref().map(|b| &b.session);
                if !same_time(
                    blocker.and_then(|b| b.backend_start.as_ref()),
                    Some(target.backend_start),
                ) || !same_time(blocker.and_then(|b| b.xact_start.as_ref()), target.xact_start)
                {
                    return Some("the signalled session's identity differs".into());
                }
                if event.signal == "terminate" && !self.policy.terminate {
                    return Some("terminated, though terminating is off".into());
                }
                let promoted =
                    members.contains(&target_pid) && self.returned_between(target_pid, reading.at, at + 0.002);
                (!roots.contains(&target_pid) && !promoted).then(|| {
                    format!(
                        "not a root of the waiter's tree: roots {roots:?}, waiting on the way {members:?}, \
                         the target waits: {:?}",
                        target.wait.as_ref().map(|w| (&w.locktype, &w.mode))
                    )
                })
            }
            _ => {
                if target_pid != waiter_pid {
                    return Some("cancel_waiter signalled someone else".into());
                }
                let signallable: Vec<i32> = roots
                    .iter()
                    .copied()
                    .filter(|pid| {
                        reading.sessions.get(pid).is_some_and(|root| {
                            !self.unsignallable_by_first_rule(root) && !self.cancelled_a_second_before(*pid, root, at)
                        })
                    })
                    .collect();
                if roots.is_empty() {
                    Some("cancel_waiter with no root".into())
                } else if !signallable.is_empty() {
                    Some(format!(
                        "cancel_waiter while the first rule could signal {signallable:?}"
                    ))
                } else {
                    None
                }
            }
        }
    }

    /// A root cancelled at least a second before `at` and still blocking,
    /// which a rule that may not terminate hands on.
    fn cancelled_a_second_before(&self, pid: i32, seen: &Seen, at: f64) -> bool {
        !self.policy.terminate
            && self.events.iter().any(|e| {
                e.outcome == "success"
                    && e.signalled_pid == pid
                    && same_time(
                        e.blocker.as_ref().and_then(|b| b.session.backend_start.as_ref()),
                        Some(seen.backend_start),
                    )
                    && epoch(&e.time) <= at - 1.0 + SLACK
            })
    }

    fn signalled_before(&self, pid: i32, backend_start: f64, at: f64) -> bool {
        self.events.iter().any(|e| {
            e.outcome == "success"
                && e.signalled_pid == pid
                && epoch(&e.time) <= at
                && (same_time(
                    e.blocker.as_ref().and_then(|b| b.session.backend_start.as_ref()),
                    Some(backend_start),
                ) || same_time(e.waiter.session.backend_start.as_ref(), Some(backend_start)))
        })
    }

    fn judge(&self, label: &str) -> Findings {
        let mut findings = Findings {
            readings: self.readings.len(),
            decisions: self.events.len(),
            ..Findings::default()
        };
        let starts = self.wait_starts();
        for event in &self.events {
            let mut counted = (event.rule.clone(), event.signal.to_string());
            counted.1.push(' ');
            counted.1.push_str(event.outcome);
            if event.outcome != "success" {
                continue;
            }
            *findings.signals.entry(counted).or_default() += 1;
            let at = epoch(&event.time);
            let describe = || {
                format!(
                    "{label}: {} {} of pid {} for waiter pid {} at {at:.3}: {}",
                    event.rule, event.signal, event.signalled_pid, event.waiter.session.pid, event.reason
                )
            };
            let Some(before) = self.reading_before(at).filter(|r| at - r.at <= MAX_READ_GAP) else {
                findings.unjudged.push(describe());
                continue;
            };
            // What must hold at the instant of the signal (the target is a
            // root, unprotected, the same session) is judged on the last
            // read before it. That the first rule could signal no root is
            // the decision's premise, judged on the read nearest the
            // sample it was made on, or failing that, the last one.
            let mut fault = self.fault(event, before, at, &starts);
            if event.rule_action == "cancel_waiter" {
                let decided_on = self.reading_near(epoch(&event.sampled_at));
                if decided_on.is_some_and(|reading| self.fault(event, reading, at, &starts).is_none()) {
                    fault = None;
                }
            }
            if let Some(fault) = fault {
                findings.wrong.push(format!("{}: {fault}", describe()));
            }
        }
        self.find_misses(label, &starts, &mut findings);
        let mut from_events: BTreeMap<(String, String, String), f64> = BTreeMap::new();
        for event in &self.events {
            *from_events
                .entry((event.rule.clone(), event.signal.to_string(), event.outcome.to_string()))
                .or_default() += 1.0;
        }
        for (key, counted) in &self.counters {
            let logged = from_events.get(key).copied().unwrap_or(0.0);
            if logged != *counted {
                findings
                    .disagreements
                    .push(format!("{label}: {key:?}: counter {counted}, events {logged}"));
            }
        }
        for key in from_events.keys().filter(|k| !self.counters.contains_key(*k)) {
            findings
                .disagreements
                .push(format!("{label}: {key:?}: events but no counter"));
        }
        findings
    }

    /// Roots left blocking a matching waiter past min_wait + 1 s with no
    /// signal; and, when every root is beyond the first rule, waiters the
    /// `cancel_waiter` rule left waiting as long.
    fn find_misses(&self, label: &str, starts: &HashMap<(i32, String), f64>, findings: &mut Findings) {
        // (waiter, waiter start, root, root start) -> since when it is a
        // root of that waiter, and the index of the last reading it was.
        let mut roots_since: HashMap<(i32, i64, i32, i64), (f64, usize)> = HashMap::new();
        let mut stuck_since: HashMap<(i32, i64), (f64, usize)> = HashMap::new();
        let mut reported = HashSet::new();
        let key_of = |t: f64| (t * 1000.0).round() as i64;
        for (index, reading) in self.readings.iter().enumerate() {
            for (&waiter_pid, waiter) in &reading.sessions {
                let Some(wait) = waiter.wait.as_ref().filter(|w| matched(w)) else {
                    continue;
                };
                let started = starts
                    .get(&(waiter_pid, wait.tag.clone()))
                    .copied()
                    .unwrap_or(reading.at);
                let (roots, _) = tree(reading, waiter_pid);
                let mut all_beyond_first_rule = !roots.is_empty();
                for &root_pid in &roots {
                    let Some(root) = reading.sessions.get(&root_pid) else {
                        all_beyond_first_rule = false;
                        continue;
                    };
                    let key = (
                        waiter_pid,
                        key_of(waiter.backend_start),
                        root_pid,
                        key_of(root.backend_start),
                    );
                    let since = match roots_since.get(&key) {
                        Some((since, last)) if *last + 1 == index => *since,
                        _ => reading.at,
                    };
                    roots_since.insert(key, (since, index));
                    if self.unsignallable_by_first_rule(root) {
                        continue;
                    }
                    all_beyond_first_rule = false;
                    let due = (started + self.policy.min_wait_of(0)).max(since) + MISS_AFTER;
                    if reading.at >= due
                        && !self.signalled_before(root_pid, root.backend_start, reading.at)
                        && reported.insert(key)
                    {
                        findings.misses.push(format!(
                            "{label}: root pid {root_pid} ({}/{}, {}) blocked waiter pid {waiter_pid} ({} on {}) \
                             from {since:.3}, waiting since {started:.3}; no signal by {:.3}",
                            root.user, root.application, root.state, wait.mode, wait.tag, reading.at
                        ));
                    }
                }
                let waiter_key = (waiter_pid, key_of(waiter.backend_start));
                if !all_beyond_first_rule {
                    stuck_since.remove(&waiter_key);
                    continue;
                }
                let since = match stuck_since.get(&waiter_key) {
                    Some((since, last)) if *last + 1 == index => *since,
                    _ => reading.at,
                };
                stuck_since.insert(waiter_key, (since, index));
                if self.policy.fallback.is_none() || self.policy.protected(1, &waiter.application, &waiter.user) {
                    continue;
                }
                let due = (started + self.policy.min_wait_of(1)).max(since) + MISS_AFTER;
                if reading.at >= due
                    && !self.signalled_before(waiter_pid, waiter.backend_start, reading.at)
                    && reported.insert((waiter_pid, key_of(waiter.backend_start), 0, 0))
                {
                    findings.misses.push(format!(
                        "{label}: waiter pid {waiter_pid} ({} on {}) behind roots {roots:?} the first rule \
                         may not signal, waiting since {started:.3}, not cancelled by {:.3}",
                        wait.mode, wait.tag, reading.at
                    ));
                }
            }
        }
    }
}

/// `lockjam_policy_actions_total` by (rule, action, outcome).
fn policy_counters(metrics: &str) -> BTreeMap<(String, String, String), f64> {
    let scrape = crate::support::Scrape::parse(metrics);
    scrape
        .matching("lockjam_policy_actions_total", &[])
        .into_iter()
        .map(|(_, labels, value)| {
            let label = |name: &str| labels.get(name).cloned().unwrap_or_default();
            ((label("rule"), label("action"), label("outcome")), *value)
        })
        .collect()
}

/// Stages one round: its policy, tables and sessions; runs lockjam and the
/// checker over it; returns what the judge needs.
async fn run_round(
    cluster: &Cluster,
    admin: &Client,
    server_version: i32,
    round: u64,
    seed: u64,
    shapes: &mut BTreeMap<&'static str, usize>,
) -> Round {
    let mut rng = Rng::new(seed);
    let policy = RoundPolicy::random(&mut rng);
    let mut actors = Vec::new();
    let mut tables = Vec::new();
    for scenario in 0..SCENARIOS_PER_ROUND {
        let prefix = format!("r{round}s{scenario}");
        let mut stage = Stage {
            rng: &mut rng,
            prefix: prefix.clone(),
            min_wait: policy.min_wait,
            actors: Vec::new(),
            columns: 0,
        };
        *shapes.entry(stage.scenario()).or_default() += 1;
        actors.extend(stage.actors);
        tables.push(format!("{prefix}_a"));
        tables.push(format!("{prefix}_b"));
    }
    // Sessions that come and go: short reads on the round's tables.
    for _ in 0..12 {
        let table = tables[rng.below(tables.len() as u64) as usize].clone();
        actors.push(Actor {
            application: "churn",
            user: "postgres",
            start: rng.millis(0, 3200),
            steps: vec![Step::Sql(format!("SELECT count(*) FROM {table}"))],
        });
    }
    let ddl: String = tables
        .iter()
        .map(|t| {
            format!("CREATE TABLE {t} (id int PRIMARY KEY, v int); INSERT INTO {t} SELECT g, 0 FROM generate_series(1, 10) AS g;")
        })
        .collect();
    admin.batch_execute(&ddl).await.unwrap();

    let service = Service::start(&config_with(vec![("safety", cluster.dsn("postgres"))], policy.policy()))
        .await
        .expect("lockjam starts");
    let shared = service.shared().clone();
    wait_until("lockjam to lead", || async {
        shared
            .metrics
            .render()
            .contains("lockjam_policy_leader{target=\"safety\"} 1")
    })
    .await;
    let (stop, stopped) = watch::channel(false);
    let checker = connect(&cluster.dsn("app"), "checker").await;
    let observer = tokio::spawn(observe(checker, server_version, stopped));
    let returned = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now() + Duration::from_millis(100);
    let deadline = start + ROUND;
    let mut sessions = JoinSet::new();
    for actor in actors {
        sessions.spawn(run_actor(
            cluster.dsn("app").replace(" user=postgres", ""),
            actor,
            start,
            deadline,
            returned.clone(),
        ));
    }
    tokio::time::sleep_until(deadline).await;
    // lockjam stops first, so that every signal falls within the reads.
    service.stop().await;
    let _ = stop.send(true);
    let readings = observer.await.unwrap();
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
        )
        .await
        .unwrap();
    while tokio::time::timeout(Duration::from_secs(10), sessions.join_next())
        .await
        .expect("sessions end once terminated")
        .is_some()
    {}
    let drop: String = tables.iter().map(|t| format!("DROP TABLE {t};")).collect();
    admin.batch_execute(&drop).await.unwrap();
    let mut events = shared.events.newest_first();
    events.reverse();
    let returned = returned.lock().unwrap().clone();
    Round {
        policy,
        readings,
        returned,
        events,
        counters: policy_counters(&shared.metrics.render()),
    }
}

/// Runs `rounds` rounds from `first_seed` on a new cluster, judging each.
async fn safety_run(first_seed: u64, rounds: u64) -> Findings {
    let cluster = start_cluster(ClusterOptions {
        max_connections: 200,
        ..ClusterOptions::default()
    })
    .await;
    let postgres = connect(&cluster.dsn("postgres"), "fixture").await;
    postgres.batch_execute("CREATE DATABASE app").await.unwrap();
    postgres
        .batch_execute("CREATE ROLE backup LOGIN SUPERUSER")
        .await
        .unwrap();
    let admin = connect(&cluster.dsn("app"), "fixture").await;
    let server_version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    let mut findings = Findings::default();
    for round in 0..rounds {
        let seed = first_seed + round;
        let mut shapes = BTreeMap::new();
        let played = run_round(&cluster, &admin, server_version, round, seed, &mut shapes).await;
        let mut judged = played.judge(&format!("seed {seed} ({:?})", played.policy));
        judged.scenarios = SCENARIOS_PER_ROUND;
        judged.shapes = shapes;
        findings.add(judged);
    }
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
    findings
}

fn assert_safe(findings: &Findings) {
    println!("safety: {}", findings.summary());
    let problems: Vec<&String> = findings
        .wrong
        .iter()
        .chain(&findings.misses)
        .chain(&findings.unjudged)
        .chain(&findings.disagreements)
        .collect();
    assert!(
        problems.is_empty(),
        "{}\n{}",
        findings.summary(),
        problems.iter().map(|p| format!("- {p}")).collect::<Vec<_>>().join("\n")
    );
    assert!(findings.signals() > 0, "the run signalled nothing: it tested nothing");
}

/// The CI subset: a fixed set of seeds, 108 scenarios.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn safety_randomized_scenarios() {
    let findings = safety_run(1, CI_ROUNDS).await;
    assert_eq!(findings.scenarios, 108);
    assert_safe(&findings);
}

/// The long run: `LOCKJAM_SAFETY_SCENARIOS` scenarios (1,000 by default)
/// from `LOCKJAM_SAFETY_SEED` (1,000 by default); `scripts/safety-run.sh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "minutes long: run by scripts/safety-run.sh"]
async fn safety_many() {
    let number = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a number")))
            .unwrap_or(default)
    };
    let scenarios = number("LOCKJAM_SAFETY_SCENARIOS", 1000);
    let seed = number("LOCKJAM_SAFETY_SEED", 1000);
    let rounds = scenarios.div_ceil(SCENARIOS_PER_ROUND as u64);
    let findings = safety_run(seed, rounds).await;
    assert_safe(&findings);
}
