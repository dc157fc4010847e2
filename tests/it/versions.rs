//! Differences between PostgreSQL versions that lockjam handles, one test
//! each. Every test runs on whatever server the fixture starts; the matrix
//! (`scripts/test-matrix.sh`) runs them on 13 to 18.

use std::time::{Duration, SystemTime};

use lockjam::config::Target;
use lockjam::dsn::Dsn;
use lockjam::sampler::Sampler;

use crate::support::{sampler_config, TestEnv};

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

    let target = Target {
        name: "it".into(),
        dsn: Dsn::parse(&env.cluster.dsn("postgres")).unwrap(),
        default_user: None,
    };
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
