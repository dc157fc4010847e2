//! Scale: a thousand client sessions and two hundred lock waiters on one
//! table. A sample completes, every figure is exact, and what lockjam keeps
//! (its sessions on the server, its series) does not grow with sessions.

use futures_util::future::join_all;
use serde_json::Value;

use lockjam::cluster::ClusterOptions;

use crate::scenes::{orders, DROP_CONSTRAINT};
use crate::support::{connect, http_get, Scrape, TestEnv};

/// Client sessions in the big scene, the fixture's own included.
const SESSIONS: usize = 1000;
/// Lock waiters in it: the migration and the reads queued behind it.
const WAITERS: usize = 200;

/// Series in a scrape, histogram buckets left out (their number is fixed).
fn series_count(scrape: &Scrape) -> usize {
    scrape
        .series
        .iter()
        .filter(|(name, _, _)| !name.ends_with("_bucket"))
        .count()
}

/// lockjam's own sessions on the server.
/// lockjam's sessions on the server: each one's database, and whether it
/// is outside a transaction (idle, or active mid-sample: which of the two
/// depends on the instant, so it is not compared).
async fn lockjam_sessions(env: &TestEnv) -> Vec<(String, bool)> {
    env.admin
        .query(
            "SELECT datname::text, state NOT LIKE 'idle in transaction%' FROM pg_stat_activity \
             WHERE application_name = 'lockjam' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn snapshot(env: &TestEnv) -> Value {
    let (status, body) = http_get(env.addr(), "/api/v1/snapshot").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The exact figures of the scene: one holder idle in transaction, the
/// migration waiting behind it, `readers` reads queued behind the
/// migration, and `idle` idle sessions (the fixture's among them).
fn assert_figures(m: &Scrape, readers: usize, idle: usize) {
    let app = [("datname", "app")];
    let expect = [
        ("lockjam_sessions", vec![("state", "idle")], idle),
        ("lockjam_sessions", vec![("state", "idle in transaction")], 1),
        ("lockjam_sessions", vec![("state", "active")], readers + 1),
        ("lockjam_lock_waiters", vec![("mode", "AccessExclusiveLock")], 1),
        ("lockjam_lock_waiters", vec![("mode", "AccessShareLock")], readers),
        ("lockjam_blocked_sessions", vec![], readers + 1),
        ("lockjam_root_blockers", vec![], 1),
        ("lockjam_blocking_chain_max_depth", vec![], 2),
        (
            "lockjam_lock_queue_depth",
            vec![("relation", "public.orders"), ("mode", "AccessExclusiveLock")],
            readers,
        ),
    ];
    for (name, labels, value) in expect {
        let labels: Vec<(&str, &str)> = app.iter().copied().chain(labels).collect();
        assert_eq!(
            m.value(name, &labels),
            Some(value as f64),
            "{name} {labels:?}\n{}",
            m.text
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_sessions_and_two_hundred_waiters_are_counted_exactly() {
    crate::support::raise_open_files_limit(4096);
    let env = TestEnv::start_with(ClusterOptions {
        max_connections: SESSIONS as u32 + 50,
        ..Default::default()
    })
    .await;
    env.admin.batch_execute(&orders()).await.unwrap();
    let holder = env.session("holder").await;
    holder
        .batch_execute("BEGIN; LOCK TABLE orders IN ACCESS SHARE MODE")
        .await
        .unwrap();
    let (migration_pid, _alter) = env.spawn_statement("migrate", DROP_CONSTRAINT).await;
    env.wait_until_waiting(migration_pid).await;
    let mut reads = Vec::new();
    let stage = |count: usize| {
        let env = &env;
        async move { join_all((0..count).map(|_| env.spawn_statement("web", "SELECT count(*) FROM orders"))).await }
    };

    // Small: 3 reads queued, the fixture idle.
    reads.extend(stage(3).await);
    env.wait_until_waiting_count("web", 3).await;
    let small = env
        .wait_for_metrics("the small queue", |m| {
            m.value("lockjam_lock_queue_depth", &[]) == Some(3.0)
                && m.value("lockjam_sessions", &[("datname", "app"), ("state", "active")]) == Some(4.0)
        })
        .await;
    assert_figures(&small, 3, 1);
    let small_sessions = lockjam_sessions(&env).await;

    // Big: 199 reads queued, idle sessions up to 1000 client sessions.
    let readers = WAITERS - 1;
    reads.extend(stage(readers - 3).await);
    let idle_count = SESSIONS - readers - 3; // the holder, the migration, the fixture
    let dsn = env.cluster.dsn("app");
    let mut idle = Vec::new();
    for chunk in 0..idle_count.div_ceil(50) {
        let n = 50.min(idle_count - chunk * 50);
        idle.extend(join_all((0..n).map(|_| connect(&dsn, "idle"))).await);
    }
    env.wait_until_waiting_count("web", readers as i64).await;
    let total: i64 = env
        .admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND application_name <> 'lockjam'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        total, SESSIONS as i64,
        "the scene has exactly {SESSIONS} client sessions"
    );
    let big = env
        .wait_for_metrics("the big queue", |m| {
            m.value("lockjam_lock_queue_depth", &[]) == Some(readers as f64)
                && m.value("lockjam_sessions", &[("datname", "app"), ("state", "idle")])
                    == Some((idle_count + 1) as f64)
        })
        .await;
    assert_figures(&big, readers, idle_count + 1);
    assert_eq!(big.value("lockjam_up", &[]), Some(1.0));

    let snapshot = snapshot(&env).await;
    let target = &snapshot["targets"][0];
    assert_eq!(target["waiters"].as_array().unwrap().len(), WAITERS);
    let blockers = target["blockers"].as_array().unwrap();
    assert_eq!(blockers.len(), 2, "the holder and the migration");
    let migration = blockers.iter().find(|b| b["pid"] == migration_pid).unwrap();
    assert_eq!(migration["blocking"].as_array().unwrap().len(), readers);
    assert_eq!(target["queues"][0]["depth"], readers as u64);

    // What lockjam keeps does not grow with sessions: the same series and
    // the same sessions on the server (one per database it reads) as with
    // four waiters.
    assert_eq!(series_count(&big), series_count(&small), "{}", big.text);
    assert_eq!(lockjam_sessions(&env).await, small_sessions);
    assert_eq!(
        small_sessions,
        vec![("app".to_string(), true), ("postgres".to_string(), true)]
    );

    // Drained: the holder commits, the migration and every read finish.
    holder.batch_execute("COMMIT").await.unwrap();
    for (_, read) in reads {
        crate::support::within("a queued read", read).await.unwrap().unwrap();
    }
    // The waiters' sessions close with their statements; every other is
    // idle, the holder too; each of the 200 waits observed exactly once.
    let calm = env
        .wait_for_metrics("the queue to drain", |m| {
            !m.has("lockjam_lock_waiters")
                && m.value("lockjam_sessions", &[("datname", "app"), ("state", "idle")])
                    == Some((SESSIONS - WAITERS) as f64)
        })
        .await;
    assert_eq!(
        calm.value("lockjam_blocked_sessions", &[("datname", "app")]),
        None,
        "calm: no lock gauges"
    );
    assert_eq!(
        calm.value("lockjam_lock_wait_seconds_count", &[("datname", "app")]),
        Some(WAITERS as f64),
        "{}",
        calm.text
    );
    drop(idle);
    env.stop().await;
}

/// The probe of every tick follows the sessions connected: with few, it
/// reads each backend's status; with many beside a small lock table, the
/// lock table. Both find the same waiting pids, and the sampler sees a
/// queue through either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_probe_follows_the_sessions_and_both_see_the_same_waiters() {
    use lockjam::config::SamplerConfig;
    use lockjam::sampler::{Probe, Sampler};

    // 10 locks per transaction (the least PostgreSQL allows) × 100
    // connections: 1,000 slots, so that 12 sessions tip the choice.
    let env = TestEnv::start_with(ClusterOptions {
        settings: [("max_locks_per_transaction".to_string(), "10".to_string())]
            .into_iter()
            .collect(),
        ..Default::default()
    })
    .await;
    let target = env.target();
    let config = SamplerConfig {
        // Sessions are counted on connecting (and below, on reconnecting),
        // so that every other tick probes.
        activity_interval: std::time::Duration::from_secs(3600),
        ..crate::support::sampler_config()
    };
    let mut sampler = Sampler::new(&target, &config).unwrap();
    let clients: i64 = env
        .admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(clients * 90 < 1000, "the fixture alone has {clients} sessions");
    assert_eq!(sampler.next_probe(), None, "not connected yet");
    sampler.sample().await.unwrap();
    assert_eq!(sampler.next_probe(), Some(Probe::Status));

    // A queue: an ALTER behind a reader, and two reads behind the ALTER.
    let (reader, _, migration_pid, _alter) =
        crate::scenes::read_in_transaction(&env, "ALTER TABLE orders ADD COLUMN note text").await;
    let mut queued = vec![migration_pid];
    let mut reads = Vec::new();
    for _ in 0..2 {
        let (pid, read) = env.spawn_statement("web", "SELECT count(*) FROM orders").await;
        env.wait_until_waiting(pid).await;
        queued.push(pid);
        reads.push(read);
    }
    queued.sort_unstable();
    for probe in [Probe::Status, Probe::Locks] {
        let row = env.admin.query_one(probe.sql(), &[&Vec::<i32>::new()]).await.unwrap();
        assert_eq!(row.get::<_, Vec<i32>>("lock_waiting_pids"), queued, "{probe:?}");
        // lockjam's own pids are left out.
        let row = env.admin.query_one(probe.sql(), &[&vec![queued[1]]]).await.unwrap();
        assert_eq!(
            row.get::<_, Vec<i32>>("lock_waiting_pids"),
            vec![queued[0], queued[2]],
            "{probe:?}"
        );
    }

    // Eight idle sessions more: at least twelve sessions now, so the
    // sessions counted on this tick choose the lock table for the next.
    let dsn = env.cluster.dsn("app");
    let _idle = join_all((0..8).map(|_| connect(&dsn, "idle"))).await;
    sampler.reset();
    sampler.sample().await.unwrap();
    assert_eq!(sampler.next_probe(), Some(Probe::Locks));
    let snapshot = sampler.sample().await.unwrap();
    let mut waiting: Vec<i32> = snapshot
        .sessions
        .iter()
        .filter(|s| s.blocked_by.as_ref().is_some_and(|b| !b.is_empty()))
        .map(|s| s.pid)
        .collect();
    waiting.sort_unstable();
    assert_eq!(waiting, queued);

    // The queue gone, the lock-table probe says so.
    reader.batch_execute("COMMIT").await.unwrap();
    for read in reads {
        read.await.unwrap().unwrap();
    }
    assert_eq!(sampler.next_probe(), Some(Probe::Locks));
    let calm = sampler.sample().await.unwrap();
    assert!(calm.sessions.is_empty(), "{:?}", calm.sessions);
    env.stop().await;
}

/// Calls of lockjam's statements by `role`, from pg_stat_statements:
/// (activity.sql, probe.sql, probe_locks.sql, waiters.sql, locks.sql).
async fn calls_by(env: &TestEnv, role: &str) -> [i64; 5] {
    let row = env
        .admin
        .query_one(
            "SELECT COALESCE(sum(calls) FILTER (WHERE query LIKE '%AS oldest_xact_start%'), 0)::int8,
                    COALESCE(sum(calls) FILTER (WHERE query LIKE '%pg_stat_get_backend_idset%'), 0)::int8,
                    COALESCE(sum(calls) FILTER (WHERE query LIKE '%array_agg(DISTINCT l.pid%'), 0)::int8,
                    COALESCE(sum(calls) FILTER (WHERE query LIKE '%replay_edges%'), 0)::int8,
                    COALESCE(sum(calls) FILTER (WHERE query LIKE '%concat_ws%'), 0)::int8
             FROM pg_stat_statements
             WHERE userid = (SELECT oid FROM pg_roles WHERE rolname = $1)",
            &[&role],
        )
        .await
        .unwrap();
    [0, 1, 2, 3, 4].map(|i| row.get(i))
}

#[tokio::test]
async fn a_sample_scans_the_backends_status_once() {
    use lockjam::config::SamplerConfig;
    use lockjam::sampler::Sampler;

    let env = TestEnv::start_with(ClusterOptions {
        settings: [("shared_preload_libraries".to_string(), "pg_stat_statements".to_string())]
            .into_iter()
            .collect(),
        ..Default::default()
    })
    .await;
    env.admin
        .batch_execute("CREATE EXTENSION pg_stat_statements; CREATE ROLE counted LOGIN IN ROLE pg_monitor")
        .await
        .unwrap();
    let (_reader, _, migration_pid, _alter) =
        crate::scenes::read_in_transaction(&env, "ALTER TABLE orders ADD COLUMN note text").await;
    let mut target = env.target();
    target.dsn =
        lockjam::dsn::Dsn::parse(&env.cluster.dsn("postgres").replace("user=postgres", "user=counted")).unwrap();
    let config = SamplerConfig {
        // No second read of the sessions by state within the test.
        activity_interval: std::time::Duration::from_secs(3600),
        ..crate::support::sampler_config()
    };
    let mut sampler = Sampler::new(&target, &config).unwrap();
    sampler.reuse_waiting_reads(true);
    let waiting = |snapshot: &lockjam::snapshot::Snapshot| {
        snapshot
            .sessions
            .iter()
            .filter(|s| s.blocked_by.as_ref().is_some_and(|b| !b.is_empty()))
            .map(|s| s.pid)
            .collect::<Vec<_>>()
    };

    // The first tick reads the sessions by state, and from the same scan
    // who waits: no probe. Then the waiters and their locks.
    let first = sampler.sample().await.unwrap();
    assert_eq!(waiting(&first), vec![migration_pid]);
    assert_eq!(calls_by(&env, "counted").await, [1, 0, 0, 1, 1]);

    // Later ticks probe; the same waiter, so its read is reused.
    for _ in 0..2 {
        assert_eq!(waiting(&sampler.sample().await.unwrap()), vec![migration_pid]);
    }
    assert_eq!(calls_by(&env, "counted").await, [1, 2, 0, 1, 1]);

    // A policy reads afresh every tick, after the probe.
    sampler.reuse_waiting_reads(false);
    assert_eq!(waiting(&sampler.sample().await.unwrap()), vec![migration_pid]);
    assert_eq!(calls_by(&env, "counted").await, [1, 3, 0, 2, 2]);
    env.stop().await;
}
