//! Part 1: incident 000 under load, once per strategy. 50 sessions run
//! short queries on `orders` without pause; a 60 s read takes ACCESS SHARE;
//! then `ALTER TABLE orders DROP CONSTRAINT` asks for ACCESS EXCLUSIVE.
//! Every application query's latency is recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use lockjam::policy::{Action, Policy, Rule};
use lockjam::service::Service;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::common::{backend_pid, connect, lockjam_config, spread, table, wait_for_waiters, Scale, Stats};

const ROWS: i64 = 200_000;
use lockjam::staging::DROP_CONSTRAINT as DROP_FK;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Nothing,
    LockTimeout,
    CancelBlockers,
    CancelWaiter,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::Nothing,
        Strategy::LockTimeout,
        Strategy::CancelBlockers,
        Strategy::CancelWaiter,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Strategy::Nothing => "nothing",
            Strategy::LockTimeout => "lock_timeout = 2s on the migration",
            Strategy::CancelBlockers => "lockjam cancel_blockers, min_wait = 2s",
            Strategy::CancelWaiter => "lockjam cancel_waiter, min_queue = 5",
        }
    }

    fn policy(self) -> Option<Policy> {
        let unblock = Rule::unblock_migrations(Duration::from_secs(2));
        match self {
            Strategy::Nothing | Strategy::LockTimeout => None,
            Strategy::CancelBlockers => Some(Policy::acting(vec![unblock])),
            Strategy::CancelWaiter => Some(Policy::acting(vec![Rule {
                name: "queue-guard".into(),
                min_wait: Duration::ZERO,
                min_queue: 5,
                action: Action::CancelWaiter,
                ..unblock
            }])),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Select,
    Update,
}

impl Workload {
    pub fn label(self) -> &'static str {
        match self {
            Workload::Select => "SELECT by primary key",
            Workload::Update => "UPDATE by primary key",
        }
    }

    fn sql(self) -> &'static str {
        match self {
            Workload::Select => "SELECT id, customer_id, total FROM orders WHERE id = $1",
            Workload::Update => "UPDATE orders SET total = total + 1 WHERE id = $1",
        }
    }
}

/// What one run of one strategy measured.
#[derive(Debug, Clone)]
pub struct Run {
    pub queries: usize,
    pub max_latency: f64,
    pub p99_latency: f64,
    pub over_one_second: usize,
    /// Application queries that failed (none expected).
    pub failed_queries: usize,
    pub migration: &'static str,
    /// Statements cancelled: the long read, the migration, queries.
    pub cancelled: Vec<&'static str>,
}

pub async fn setup(admin: &Client) {
    admin
        .batch_execute(&lockjam::staging::orders_schema(ROWS as u64))
        .await
        .unwrap();
    admin.batch_execute("VACUUM ANALYZE orders").await.unwrap();
}

/// One run: `sessions` clients, a read held for `hold`, the migration.
pub async fn run(dsn: &str, strategy: Strategy, workload: Workload, sessions: usize, hold: Duration) -> Run {
    let admin = connect(dsn, "bench").await;
    admin
        .batch_execute(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_constraint WHERE conname = 'orders_customer_id_fkey') THEN
                 ALTER TABLE orders ADD CONSTRAINT orders_customer_id_fkey
                   FOREIGN KEY (customer_id) REFERENCES customers NOT VALID;
               END IF;
             END $$",
        )
        .await
        .unwrap();
    let service = match strategy.policy() {
        Some(policy) => Some(Service::start(&lockjam_config(dsn, policy)).await.unwrap()),
        None => None,
    };
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..sessions {
        let client = connect(dsn, "web").await;
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let statement = client.prepare(workload.sql()).await.unwrap();
            let mut seen = Vec::new();
            let mut failed = 0;
            let mut cancelled = 0;
            let mut n = worker as i64;
            while !stop.load(Ordering::Relaxed) {
                n += sessions as i64;
                let id = 1 + (n * 7919) % ROWS;
                let at = started.elapsed().as_secs_f64();
                let sent = Instant::now();
                let result = client.execute(&statement, &[&id]).await;
                seen.push((at, sent.elapsed().as_secs_f64()));
                if let Err(e) = result {
                    if client.is_closed() {
                        // Nothing more to measure, and no busy loop on a
                        // dead session (as when the bench itself panics).
                        break;
                    }
                    failed += 1;
                    if e.code() == Some(&SqlState::QUERY_CANCELED) {
                        cancelled += 1;
                    }
                }
            }
            (seen, failed, cancelled)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let reader = connect(dsn, "analyst").await;
    let read_sql = format!("SELECT pg_sleep({}), count(*) FROM orders", hold.as_secs_f64());
    let read = tokio::spawn(async move { reader.simple_query(&read_sql).await.map(|_| ()) });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the long read never took its lock");
        // The read may run in parallel: its workers hold the lock too.
        let holding: bool = admin
            .query_one(
                "SELECT EXISTS (SELECT FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = 'analyst' AND l.relation = 'orders'::regclass AND l.granted)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if holding {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let migration = connect(dsn, "migrate").await;
    let _ = backend_pid(&migration).await;
    if strategy == Strategy::LockTimeout {
        migration.batch_execute("SET lock_timeout = '2s'").await.unwrap();
    }
    let migration_result = migration.batch_execute(DROP_FK).await;
    let migration_outcome = match &migration_result {
        Ok(()) => "succeeded",
        Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => "failed: lock_timeout",
        Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => "failed: cancelled",
        Err(_) => "failed",
    };
    // The queue behind the migration drains; the read may still run (it
    // blocks nothing once the migration is over), and then ends.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut timeline = Vec::new();
    let mut failed_queries = 0;
    let mut cancelled_queries = 0;
    for worker in workers {
        let (seen, failed, cancelled) = worker.await.unwrap();
        timeline.extend(seen);
        failed_queries += failed;
        cancelled_queries += cancelled;
    }
    let read_finished = read.is_finished();
    admin
        .execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'analyst'",
            &[],
        )
        .await
        .unwrap();
    let read_result = read.await.unwrap();
    if let Some(service) = service {
        service.stop().await;
    }
    let mut cancelled = Vec::new();
    if read_finished && matches!(&read_result, Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED)) {
        cancelled.push("the long read");
    }
    if migration_outcome == "failed: cancelled" {
        cancelled.push("the migration");
    }
    cancelled.extend(std::iter::repeat("an application query").take(cancelled_queries));
    let latencies: Vec<f64> = timeline.iter().map(|(_, l)| *l).collect();
    let stats = Stats::of(&latencies);
    Run {
        queries: latencies.len(),
        max_latency: stats.max,
        p99_latency: stats.p99,
        over_one_second: latencies.iter().filter(|l| **l > 1.0).count(),
        failed_queries,
        migration: migration_outcome,
        cancelled,
    }
}

/// Every strategy, `repeats` times, on both workloads; the Markdown and
/// the runs for the plot.
pub async fn all(dsn: &str, scale: Scale) -> (String, Vec<(Workload, Strategy, Vec<Run>)>) {
    let sessions = scale.pick(50, 8);
    let hold = scale.pick(Duration::from_secs(60), Duration::from_secs(3));
    let repeats = scale.pick(3, 1);
    let workloads = [Workload::Select, Workload::Update];
    let mut results = Vec::new();
    for &workload in &workloads {
        for strategy in Strategy::ALL {
            let mut runs = Vec::new();
            for _ in 0..repeats {
                runs.push(run(dsn, strategy, workload, sessions, hold).await);
            }
            eprintln!("outage: {} / {}: done", workload.label(), strategy.label());
            results.push((workload, strategy, runs));
        }
    }
    let mut text = format!(
        "{sessions} sessions, a read holding ACCESS SHARE for {} s, {repeats} runs per row: median (min–max).\n\n",
        hold.as_secs()
    );
    for &workload in &workloads {
        text.push_str(&format!("**{}**\n\n", workload.label()));
        let rows: Vec<Vec<String>> = results
            .iter()
            .filter(|(w, _, _)| *w == workload)
            .map(|(_, strategy, runs)| {
                let of = |f: &dyn Fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
                let migration: Vec<&str> = runs.iter().map(|r| r.migration).collect();
                let mut outcomes = migration.clone();
                outcomes.dedup();
                let cancelled: Vec<String> = runs
                    .iter()
                    .map(|r| match r.cancelled.as_slice() {
                        [] => "none".to_string(),
                        list => list.join(", "),
                    })
                    .collect();
                let mut cancelled_set = cancelled.clone();
                cancelled_set.dedup();
                vec![
                    strategy.label().to_string(),
                    spread(&of(&|r| r.max_latency), 2, " s"),
                    spread(&of(&|r| r.p99_latency * 1000.0), 1, " ms"),
                    spread(&of(&|r| r.over_one_second as f64), 0, ""),
                    spread(&of(&|r| r.queries as f64), 0, ""),
                    outcomes.join(" / "),
                    cancelled_set.join(" / "),
                ]
            })
            .collect();
        text.push_str(&table(
            &[
                "strategy",
                "longest query",
                "p99 latency",
                "queries > 1 s",
                "queries",
                "migration",
                "cancelled",
            ],
            &rows,
        ));
        text.push('\n');
    }
    let failed: usize = results
        .iter()
        .flat_map(|(_, _, runs)| runs)
        .map(|r| r.failed_queries)
        .sum();
    text.push_str(&format!("Application queries that failed, over all runs: {failed}.\n"));
    (text, results)
}

/// Reaction times, interleaved run by run: `cancel_blockers` (`min_wait =
/// 2s`, default cadence), from the waiter's `pg_locks.waitstart` to the
/// blocker's cancel (its `state_change`); and `lock_timeout = 2s` on the
/// migration, from its `waitstart` to its own error (its `state_change`).
/// Both on the server's clock, one table per run. Returns (lockjam,
/// lock_timeout).
pub async fn reaction_times(dsn: &str, runs: usize) -> (Vec<f64>, Vec<f64>) {
    let admin = connect(dsn, "bench").await;
    let policy = Policy::acting(vec![Rule::unblock_migrations(Duration::from_secs(2))]);
    let mut lockjam = Vec::new();
    let mut lock_timeout = Vec::new();
    for run in 0..runs {
        let service = Service::start(&lockjam_config(dsn, policy.clone())).await.unwrap();
        lockjam.push(reaction(dsn, &admin, &format!("reaction_{run}"), false).await);
        service.stop().await;
        lock_timeout.push(reaction(dsn, &admin, &format!("reaction_timeout_{run}"), true).await);
    }
    (lockjam, lock_timeout)
}

/// One run: a long read of `table`, a migration waiting behind it (with
/// `lock_timeout = 2s` when `own_timeout`); seconds from the migration's
/// waitstart to the end of the statement that gave way.
async fn reaction(dsn: &str, admin: &tokio_postgres::Client, table: &str, own_timeout: bool) -> f64 {
    admin
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int); INSERT INTO {table} VALUES (1)"
        ))
        .await
        .unwrap();
    let reader = connect(dsn, "analyst").await;
    let reader_pid = backend_pid(&reader).await;
    let read_sql = format!("SELECT pg_sleep(600), count(*) FROM {table}");
    // The clients are kept, so that their sessions (and state_change)
    // outlive the cancelled statements.
    let read = tokio::spawn(async move {
        let result = reader.simple_query(&read_sql).await;
        (reader, result)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let migration = connect(dsn, "migrate").await;
    let migration_pid = backend_pid(&migration).await;
    if own_timeout {
        migration.batch_execute("SET lock_timeout = '2s'").await.unwrap();
    }
    let alter_sql = format!("ALTER TABLE {table} ADD COLUMN note text");
    let alter = tokio::spawn(async move {
        let result = migration.simple_query(&alter_sql).await;
        (migration, result)
    });
    wait_for_waiters(admin, 1).await;
    let wait_start: SystemTime = loop {
        let row = admin
            .query_opt(
                "SELECT waitstart FROM pg_locks WHERE pid = $1 AND NOT granted AND waitstart IS NOT NULL",
                &[&migration_pid],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            break row.get(0);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (_migration, altered) = tokio::time::timeout(Duration::from_secs(60), alter)
        .await
        .expect("the ALTER ends within a minute")
        .unwrap();
    // Both clients live until state_change is read: a closed session
    // leaves pg_stat_activity.
    let (gave_way, _reader) = if own_timeout {
        assert!(altered.is_err(), "lock_timeout cancels the ALTER");
        admin
            .execute("SELECT pg_cancel_backend($1)", &[&reader_pid])
            .await
            .unwrap();
        let (reader, _) = read.await.unwrap();
        (migration_pid, reader)
    } else {
        altered.expect("the ALTER succeeds");
        let (reader, result) = read.await.unwrap();
        assert!(result.is_err(), "the read was cancelled");
        (reader_pid, reader)
    };
    let ended: SystemTime = admin
        .query_one("SELECT state_change FROM pg_stat_activity WHERE pid = $1", &[&gave_way])
        .await
        .unwrap()
        .get(0);
    ended.duration_since(wait_start).unwrap().as_secs_f64()
}
