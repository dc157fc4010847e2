//! Differences between PostgreSQL versions that lockjam handles, one test
//! each. Every test runs on whatever server the fixture starts; the matrix
//! (`scripts/test-matrix.sh`) runs them on 13 to 18.

use std::time::{Duration, SystemTime};

use lockjam::sampler::Sampler;

use lockjam::cluster::ClusterOptions;
use lockjam::policy::{Outcome, Policy, Rule, Signal};

use crate::scenes::{staged, DROP_CONSTRAINT};
use crate::support::{sampler_config, within, TestEnv};

/// `pg_locks.waitstart` exists from PostgreSQL 14: lockjam reports it as the
/// wait start. Before 14 the wait start is the first sample that saw the
/// wait, kept across samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_start_is_waitstart_from_14_and_first_seen_before() {
    let env = TestEnv::start().await;
    env.admin.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let holder = env.session("holder").await;
    holder
        .batch_execute("BEGIN; LOCK TABLE t IN ACCESS SHARE MODE")
        .await
        .unwrap();
    let (waiter_pid, _alter) = env.spawn_statement("migrate", "ALTER TABLE t ADD COLUMN x int").await;
    env.wait_until_waiting(waiter_pid).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let target = env.target();
    let mut sampler = Sampler::new(&target, &sampler_config()).unwrap();
    let wait_start = |snapshot: &lockjam::snapshot::Snapshot| {
        snapshot
            .locks
            .iter()
            .find(|l| l.pid == waiter_pid && !l.granted)
            .and_then(|l| l.wait_start)
            .expect("the waiter is sampled with a wait start")
    };
    let first = sampler.sample().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = sampler.sample().await.unwrap();
    assert_eq!(
        wait_start(&first),
        wait_start(&second),
        "the wait start holds across samples"
    );
    let server_version = sampler.server_version().unwrap();
    if server_version >= 140_000 {
        let waitstart: SystemTime = env
            .admin
            .query_one(
                "SELECT waitstart FROM pg_locks WHERE pid = $1 AND NOT granted",
                &[&waiter_pid],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            wait_start(&first),
            waitstart,
            "PostgreSQL {server_version}: pg_locks.waitstart"
        );
        assert!(waitstart < first.taken_at);
    } else {
        assert_eq!(
            wait_start(&first),
            first.taken_at,
            "PostgreSQL {server_version}: first seen"
        );
    }
    drop(holder);
    env.stop().await;
}

/// From PostgreSQL 14, `pg_terminate_backend(pid, timeout)` returns once
/// the backend has exited, and lockjam passes a timeout: `success` then
/// means its locks are released. A backend that cannot exit in time (here,
/// stopped with SIGSTOP) is an `error`, not a success. Before 14 the signal
/// is only sent, and that is all `success` can mean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminate_waits_for_the_backend_to_exit_from_14() {
    let mut s = staged(DROP_CONSTRAINT).await;
    let mut terminate = s.decision.clone();
    terminate.signal = Signal::Terminate;
    let server_version: i32 = s
        .env
        .admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &s.reader_pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {name}");
    };
    signal("-STOP");
    let sent = s.enforcer.signal(&terminate).await;
    let (outcome, detail) = (sent.outcome, sent.detail);
    signal("-CONT");
    if server_version >= 140_000 {
        assert_eq!(outcome, Outcome::Error, "PostgreSQL {server_version}");
        let detail = detail.unwrap();
        assert!(detail.contains("had not exited after 1000 ms"), "{detail}");
    } else {
        assert_eq!(
            (outcome, detail),
            (Outcome::Success, None),
            "PostgreSQL {server_version}"
        );
    }
    // Resumed, the backend acts on the pending terminate.
    within("the ALTER", s.alter).await.unwrap().unwrap();
    assert!(
        s.reader.simple_query("SELECT 1").await.is_err(),
        "the reader was terminated"
    );
    s.env.stop().await;
}

/// An autovacuum worker that blocks a migration is never signalled: a
/// superuser (as here) could cancel one on every version, and from
/// PostgreSQL 18 so could any role granted `pg_signal_autovacuum_worker`;
/// lockjam reports it `protected`, once, and leaves it to PostgreSQL, which
/// cancels an ordinary autovacuum after `deadlock_timeout` (set to an hour
/// here, so that the worker keeps blocking).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn autovacuum_worker_blocking_a_migration_is_never_signalled() {
    let settings = [
        ("autovacuum", "on"),
        ("autovacuum_naptime", "1s"),
        ("deadlock_timeout", "1h"),
    ];
    let env = TestEnv::start_full(
        ClusterOptions {
            settings: settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        },
        Policy::acting(vec![Rule::unblock_migrations(Duration::from_secs(1))]),
    )
    .await;
    // Every dead row is worth a vacuum, and the vacuum sleeps 100 ms per
    // page or so: it holds its SHARE UPDATE EXCLUSIVE lock for minutes.
    env.admin
        .batch_execute(
            "CREATE TABLE vac (id int, pad text) WITH (autovacuum_vacuum_threshold = 0, \
             autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_cost_delay = 100, \
             autovacuum_vacuum_cost_limit = 1);
             INSERT INTO vac SELECT i, repeat('x', 100) FROM generate_series(1, 50000) AS i;
             DELETE FROM vac WHERE id % 2 = 0",
        )
        .await
        .unwrap();
    let worker_pid: i32 = within("an autovacuum worker on table vac", async {
        loop {
            let row = env
                .admin
                .query_opt(
                    "SELECT a.pid FROM pg_stat_activity AS a JOIN pg_locks AS l ON l.pid = a.pid \
                     WHERE a.backend_type = 'autovacuum worker' AND l.granted AND l.relation = 'vac'::regclass",
                    &[],
                )
                .await
                .unwrap();
            if let Some(row) = row {
                return row.get(0);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let (migration_pid, alter) = env
        .spawn_statement("migrate", "ALTER TABLE vac ADD COLUMN note text")
        .await;
    env.wait_until_waiting(migration_pid).await;

    let event = env
        .wait_for_event("the autovacuum worker reported", |e| e["outcome"] == "protected")
        .await;
    assert_eq!(event["blocker"]["pid"], worker_pid);
    assert_eq!(event["blocker"]["backend_type"], "autovacuum worker");
    assert_eq!(event["waiter"]["pid"], migration_pid);
    assert!(
        event["reason"]
            .as_str()
            .unwrap()
            .starts_with("an autovacuum worker: lockjam never signals one"),
        "{event}"
    );
    // Several fast samples later: reported once, and still at work.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.events().await.len(), 1, "{:#?}", env.events().await);
    let still: Option<String> = env
        .admin
        .query_opt(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
            &[&migration_pid],
        )
        .await
        .unwrap()
        .and_then(|r| r.get(0));
    assert_eq!(still.as_deref(), Some("Lock"), "the migration still waits");
    let alive = env
        .admin
        .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&worker_pid])
        .await
        .unwrap();
    assert!(alive.is_some(), "the autovacuum worker was left alone");
    assert_eq!(
        env.scrape().await.value(
            "lockjam_policy_actions_total",
            &[("action", "cancel"), ("outcome", "protected")]
        ),
        Some(1.0)
    );

    // The operator's move, by hand: the migration then goes through.
    env.admin
        .execute("SELECT pg_cancel_backend($1)", &[&worker_pid])
        .await
        .unwrap();
    within("the ALTER", alter).await.unwrap().expect("the ALTER succeeds");
    env.stop().await;
}
