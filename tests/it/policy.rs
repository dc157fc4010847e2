//! The policy against real sessions: the incidents cleared, the safety
//! rules, the races between decision and signal, least privilege, and
//! leader election between two lockjam instances.

use std::process::Stdio;
use std::time::Duration;

use lockjam::cluster::ClusterOptions;
use lockjam::policy::{Action, Glob, Outcome, Policy, Rule};
use lockjam::service::Service;
use serde_json::Value;
use tokio::task::JoinSet;
use tokio_postgres::error::SqlState;

use crate::scenes::{
    foreign_key_behind_mailer, migration_behind_long_read, staged, DROP_CONSTRAINT, LONG_READ, ORDERS,
};
use crate::support::{
    apply_lockjam_role_sql, backend_pid, config_with, connect, events, pg_dump_for, scrape, start_cluster, wait_until,
    within, TestEnv,
};

fn acting(rule: Rule) -> Policy {
    Policy::acting(vec![rule])
}

fn unblock(min_wait_seconds: u64) -> Rule {
    Rule::unblock_migrations(Duration::from_secs(min_wait_seconds))
}

/// Counter value of `lockjam_policy_actions_total` for these labels.
async fn actions(env: &TestEnv, action: &str, outcome: &str) -> Option<f64> {
    env.scrape().await.value(
        "lockjam_policy_actions_total",
        &[("action", action), ("outcome", outcome)],
    )
}

async fn state_of(env: &TestEnv, pid: i32) -> Option<String> {
    env.admin
        .query_opt("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .await
        .unwrap()
        .map(|row| row.get(0))
}

/// Incident 000 with `min_wait = "2s"`: the long read is cancelled, the
/// ALTER succeeds, every queued SELECT succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_000_cleared_by_cancel_blockers() {
    let env = TestEnv::start_full(ClusterOptions::default(), acting(unblock(2))).await;
    let (reader_pid, read, migration_pid, alter) = migration_behind_long_read(&env).await;
    let mut selects = JoinSet::new();
    for _ in 0..20 {
        let (_, select) = env.spawn_statement("web", "SELECT count(*) FROM orders").await;
        selects.spawn(select);
    }
    within("the ALTER", alter).await.unwrap().expect("the ALTER succeeds");
    let read_error = within("the read", read).await.unwrap().unwrap_err();
    assert_eq!(read_error.code(), Some(&SqlState::QUERY_CANCELED));
    while let Some(select) = within("the SELECTs", selects.join_next()).await {
        select.unwrap().unwrap().expect("every queued SELECT succeeds");
    }

    env.wait_for_event("the signal", |e| e["outcome"] == "success").await;
    let events = env.events().await;
    assert_eq!(events.len(), 1, "{events:#?}");
    let event = &events[0];
    assert_eq!(event["rule"], "unblock-migrations");
    assert_eq!(event["action"], "cancel");
    assert_eq!(event["outcome"], "success");
    assert_eq!(event["blocker"]["pid"], reader_pid);
    assert_eq!(event["blocker"]["application_name"], "analyst");
    assert_eq!(event["blocker"]["usename"], "postgres");
    assert_eq!(event["blocker"]["state"], "active");
    assert_eq!(event["blocker"]["query"], LONG_READ);
    assert!(event["blocker"]["transaction_age_seconds"].as_f64().unwrap() >= 2.0);
    assert_eq!(event["waiter"]["pid"], migration_pid);
    assert_eq!(event["waiter"]["relation"], "public.orders");
    assert_eq!(event["waiter"]["mode"], "AccessExclusiveLock");
    assert_eq!(event["waiter"]["query"], DROP_CONSTRAINT);
    let waited = event["waiter"]["wait_seconds"].as_f64().unwrap();
    assert!(waited >= 2.0, "acted only after min_wait: {waited}s");
    assert_eq!(actions(&env, "cancel", "success").await, Some(1.0));
    assert_eq!(env.scrape().await.value("lockjam_policy_leader", &[]), Some(1.0));
    env.stop().await;
}

/// The database stops (`-m immediate`) while a migration waits, short of
/// `min_wait`, and stays down past it: the last graph is stale, and the
/// policy acts on none. Restarted, a new queue is acted on only once its
/// own waiter has waited `min_wait`, and nothing from before is signalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_action_on_stale_data_across_a_database_restart() {
    let mut env = TestEnv::start_full(ClusterOptions::default(), acting(unblock(3))).await;
    let (old_reader, _read, old_migration, _alter) = migration_behind_long_read(&env).await;
    env.wait_for_metrics("the waiter sampled", |m| {
        m.value("lockjam_lock_waiters", &[("datname", "app")]) == Some(1.0)
    })
    .await;
    tokio::task::block_in_place(|| env.cluster.stop("immediate")).unwrap();
    env.wait_for_metrics("up to drop to 0", |m| m.value("lockjam_up", &[]) == Some(0.0))
        .await;
    // The stale graph's waiter would have waited past min_wait by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(env.events().await, Vec::<Value>::new());

    tokio::task::block_in_place(|| env.cluster.restart()).unwrap();
    env.admin = connect(&env.cluster.dsn("app"), "fixture").await;
    let (reader_pid, read) = env.spawn_statement("analyst", LONG_READ).await;
    env.wait_until_holding(reader_pid, "orders", None).await;
    let (migration_pid, alter) = env.spawn_statement("migrate", DROP_CONSTRAINT).await;
    within("the ALTER after the restart", alter)
        .await
        .unwrap()
        .expect("the ALTER succeeds");
    let read_error = within("the read", read).await.unwrap().unwrap_err();
    assert_eq!(read_error.code(), Some(&SqlState::QUERY_CANCELED));
    env.wait_for_event("the signal", |e| e["outcome"] == "success").await;
    let events = env.events().await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["blocker"]["pid"], reader_pid);
    assert_eq!(events[0]["waiter"]["pid"], migration_pid);
    assert_ne!(reader_pid, old_reader);
    assert_ne!(migration_pid, old_migration);
    let waited = events[0]["waiter"]["wait_seconds"].as_f64().unwrap();
    assert!(waited >= 3.0, "acted after the new waiter's own min_wait: {waited}");
    env.stop().await;
}

/// Incident 001 with a real `pg_dump` whose output is never read: its
/// backend waits on ClientWrite holding ACCESS SHARE, and `DROP TABLE`
/// queues behind it. Returns the running pg_dump and the DROP.
async fn stalled_pg_dump(env: &TestEnv) -> (tokio::process::Child, i32, crate::support::Statement) {
    env.admin
        .batch_execute(
            "CREATE TABLE field_history (id bigint, object_id bigint, field_name text, serialized_data text);
             INSERT INTO field_history SELECT g, g, 'status', repeat('x', 200) FROM generate_series(1, 300000) AS g;",
        )
        .await
        .unwrap();
    let pg_dump = pg_dump_for(&env.cluster);
    let dump = tokio::process::Command::new(&pg_dump)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &env.cluster.port().to_string(),
            "-U",
            "postgres",
        ])
        .args(["-d", "app", "-t", "field_history"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; install the PostgreSQL client (postgresql-client)",
                pg_dump.display()
            )
        });
    let stalled = "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_dump' AND wait_event = 'ClientWrite'";
    wait_until("pg_dump's backend to wait on ClientWrite", || async {
        env.admin.query_opt(stalled, &[]).await.unwrap().is_some()
    })
    .await;
    let dump_pid: i32 = env.admin.query_one(stalled, &[]).await.unwrap().get(0);
    let (release_pid, drop_table) = env.spawn_statement("release", "DROP TABLE field_history").await;
    env.wait_until_waiting(release_pid).await;
    for _ in 0..5 {
        env.spawn_statement("web", "SELECT count(*) FROM field_history").await;
    }
    env.wait_until_waiting_count("web", 5).await;
    (dump, dump_pid, drop_table)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_001_protected_pg_dump_survives_and_the_waiter_is_reported() {
    let rule = Rule {
        protect_applications: vec![Glob("pg_dump".into())],
        terminate_after: Some(Duration::from_secs(2)),
        ..unblock(1)
    };
    let env = TestEnv::start_full(ClusterOptions::default(), acting(rule)).await;
    let (mut dump, dump_pid, drop_table) = stalled_pg_dump(&env).await;
    let event = env
        .wait_for_event("the protected report", |e| e["outcome"] == "protected")
        .await;
    assert_eq!(event["blocker"]["pid"], dump_pid);
    assert_eq!(event["blocker"]["application_name"], "pg_dump");
    assert_eq!(event["blocker"]["state"], "active");
    assert_eq!(event["waiter"]["relation"], "public.field_history");
    assert_eq!(event["waiter"]["query"], "DROP TABLE field_history");
    assert_eq!(event["waiter"]["behind"], 5);
    assert!(event["reason"]
        .as_str()
        .unwrap()
        .contains("application `pg_dump` is protected"));
    // Past min_wait + terminate_after, the backup is still untouched and
    // the report was made once.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(state_of(&env, dump_pid).await.as_deref(), Some("active"));
    assert_eq!(env.events().await.len(), 1);
    assert_eq!(actions(&env, "cancel", "protected").await, Some(1.0));
    assert!(!drop_table.is_finished(), "the DROP still waits");
    dump.kill().await.unwrap();
    within("the DROP once the backup is gone", drop_table)
        .await
        .unwrap()
        .unwrap();
    env.stop().await;
}

/// Without protection the backup is cancelled. A backend blocked writing to
/// a client that does not read may not act on a cancel (while blocked in a
/// write, PostgreSQL handles only terminate); then lockjam escalates to
/// terminate after `terminate_after`. Either way the queue clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_001_unprotected_pg_dump_is_cancelled() {
    let rule = Rule {
        terminate_after: Some(Duration::from_secs(2)),
        ..unblock(1)
    };
    let env = TestEnv::start_full(ClusterOptions::default(), acting(rule)).await;
    let (mut dump, dump_pid, drop_table) = stalled_pg_dump(&env).await;
    within("the DROP", drop_table)
        .await
        .unwrap()
        .expect("the DROP goes through");
    env.wait_for_event("the signal", |e| e["outcome"] == "success").await;
    let events = env.events().await;
    let summary: Vec<(&str, &str, i64)> = events
        .iter()
        .rev()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
                e["blocker"]["pid"].as_i64().unwrap(),
            )
        })
        .collect();
    let cancelled = ("cancel", "success", dump_pid as i64);
    let terminated = ("terminate", "success", dump_pid as i64);
    assert!(
        summary == vec![cancelled] || summary == vec![cancelled, terminated],
        "cancel, and terminate only if the cancel did not free the lock: {summary:?}"
    );
    if summary.len() == 2 {
        assert!(events[0]["reason"].as_str().unwrap().contains("after its cancel"));
    }
    // Its statement was cancelled (the transaction aborted, its locks
    // released) or its backend terminated; pg_dump itself may still be
    // stuck writing to the pipe nobody reads.
    let locks: i64 = env
        .admin
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype = 'relation'",
            &[&dump_pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(locks, 0, "the backup holds no lock any more");
    assert_ne!(state_of(&env, dump_pid).await.as_deref(), Some("active"));
    dump.kill().await.unwrap();
    env.stop().await;
}

/// Incident 002 (PostgreSQL 15: ADD FOREIGN KEY takes SHARE ROW EXCLUSIVE
/// and queues writers): a rule on that mode clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_002_cleared_by_a_share_row_exclusive_rule() {
    let rule = Rule {
        name: "unblock-foreign-keys".into(),
        waiter_modes: vec!["ShareRowExclusiveLock".into()],
        ..unblock(1)
    };
    let env = TestEnv::start_full(ClusterOptions::default(), acting(rule)).await;
    let (mailer_pid, mail, _, add_fk) = foreign_key_behind_mailer(&env).await;
    let mut writers = JoinSet::new();
    for i in 1..=20 {
        let (_, write) = env
            .spawn_statement("web-write", &format!("UPDATE users SET email = email WHERE id = {i}"))
            .await;
        writers.spawn(write);
    }
    within("the ADD FOREIGN KEY", add_fk)
        .await
        .unwrap()
        .expect("the foreign key is added");
    let mail_error = within("the mailer", mail).await.unwrap().unwrap_err();
    assert_eq!(mail_error.code(), Some(&SqlState::QUERY_CANCELED));
    while let Some(write) = within("the writers", writers.join_next()).await {
        write.unwrap().unwrap().expect("every writer succeeds");
    }
    let event = &env.wait_for_event("the signal", |e| e["outcome"] == "success").await;
    assert_eq!(
        (
            &event["rule"],
            &event["outcome"],
            &event["blocker"]["pid"],
            &event["waiter"]["mode"]
        ),
        (
            &Value::from("unblock-foreign-keys"),
            &Value::from("success"),
            &Value::from(mailer_pid),
            &Value::from("ShareRowExclusiveLock")
        )
    );
    env.stop().await;
}

/// An idle-in-transaction blocker cannot be cancelled: it is terminated
/// once the waiter has waited min_wait + terminate_after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_in_transaction_blocker_is_terminated_after_terminate_after() {
    let rule = Rule {
        terminate_after: Some(Duration::from_secs(2)),
        ..unblock(1)
    };
    let env = TestEnv::start_full(ClusterOptions::default(), acting(rule)).await;
    env.admin.batch_execute(ORDERS).await.unwrap();
    let holder = env.session("worker").await;
    let holder_pid = backend_pid(&holder).await;
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM orders")
        .await
        .unwrap();
    let (migration_pid, alter) = env.spawn_statement("migrate", DROP_CONSTRAINT).await;
    env.wait_until_waiting(migration_pid).await;
    within("the ALTER", alter).await.unwrap().expect("the ALTER succeeds");
    env.wait_for_event("the signal", |e| e["outcome"] == "success").await;
    let events = env.events().await;
    assert_eq!(events.len(), 1, "no useless cancel first: {events:#?}");
    assert_eq!(events[0]["action"], "terminate");
    assert_eq!(events[0]["outcome"], "success");
    assert_eq!(events[0]["blocker"]["pid"], holder_pid);
    assert_eq!(events[0]["blocker"]["state"], "idle in transaction");
    assert!(events[0]["reason"].as_str().unwrap().contains("idle in transaction"));
    let waited = events[0]["waiter"]["wait_seconds"].as_f64().unwrap();
    assert!(
        waited >= 3.0,
        "terminated only after min_wait + terminate_after: {waited}s"
    );
    assert!(
        holder.simple_query("SELECT 1").await.is_err(),
        "the session was terminated"
    );
    env.stop().await;
}

/// `cancel_waiter` with `min_queue = 5`: nothing while fewer than five
/// wait behind the DDL; then the DDL is cancelled, the read untouched, and
/// the queue drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_waiter_once_the_queue_reaches_min_queue() {
    let rule = Rule {
        name: "migration-lock-timeout".into(),
        action: Action::CancelWaiter,
        min_queue: 5,
        ..unblock(0)
    };
    let env = TestEnv::start_full(ClusterOptions::default(), acting(rule)).await;
    let (reader_pid, _read, migration_pid, alter) = migration_behind_long_read(&env).await;
    let mut selects = JoinSet::new();
    for _ in 0..4 {
        selects.spawn(env.spawn_statement("web", "SELECT count(*) FROM orders").await.1);
    }
    env.wait_until_waiting_count("web", 4).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(env.events().await.is_empty(), "four behind is below min_queue");
    assert!(!alter.is_finished());
    selects.spawn(env.spawn_statement("web", "SELECT count(*) FROM orders").await.1);
    let error = within("the ALTER", alter).await.unwrap().unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED));
    while let Some(select) = within("the SELECTs", selects.join_next()).await {
        select.unwrap().unwrap().expect("the queue drains");
    }
    assert_eq!(
        state_of(&env, reader_pid).await.as_deref(),
        Some("active"),
        "the long read is untouched"
    );
    env.wait_for_event("the signal", |e| e["outcome"] == "success").await;
    let events = env.events().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["blocker"]["pid"], migration_pid);
    assert_eq!(events[0]["waiter"]["pid"], migration_pid);
    assert_eq!(events[0]["waiter"]["behind"], 5);
    env.admin
        .query_one("SELECT pg_terminate_backend($1)", &[&reader_pid])
        .await
        .unwrap();
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dry_run_signals_nothing_and_counts_dry_run() {
    let mut policy = acting(unblock(1));
    policy.dry_run = true;
    let env = TestEnv::start_full(ClusterOptions::default(), policy).await;
    let (reader_pid, _read, _, alter) = migration_behind_long_read(&env).await;
    let event = env
        .wait_for_event("a dry-run decision", |e| e["outcome"] == "dry_run")
        .await;
    assert_eq!(event["blocker"]["pid"], reader_pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        state_of(&env, reader_pid).await.as_deref(),
        Some("active"),
        "nothing signalled"
    );
    assert!(!alter.is_finished(), "the ALTER still waits");
    assert_eq!(env.events().await.len(), 1, "decided once per blocker");
    assert_eq!(actions(&env, "cancel", "dry_run").await, Some(1.0));
    assert_eq!(
        actions(&env, "cancel", "success").await,
        Some(0.0),
        "declared at 0, never counted"
    );
    env.admin
        .query_one("SELECT pg_terminate_backend($1)", &[&reader_pid])
        .await
        .unwrap();
    within("the ALTER", alter).await.unwrap().unwrap();
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_blocker_finishes_before_the_signal_is_gone() {
    let mut s = staged(DROP_CONSTRAINT).await;
    s.reader.batch_execute("ROLLBACK").await.unwrap();
    within("the ALTER", s.alter).await.unwrap().unwrap();
    let (outcome, _) = s.enforcer.signal(&s.decision).await;
    assert_eq!(outcome, Outcome::Gone);
    s.reader
        .simple_query("SELECT 1")
        .await
        .expect("the reader was not signalled");
    s.env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_waiter_gives_up_on_its_lock_timeout_first_is_not_blocking() {
    let mut s = staged(&format!("SET lock_timeout = '3s'; {DROP_CONSTRAINT}")).await;
    let error = within("the ALTER's lock_timeout", s.alter).await.unwrap().unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::LOCK_NOT_AVAILABLE));
    let (outcome, _) = s.enforcer.signal(&s.decision).await;
    assert_eq!(outcome, Outcome::NotBlocking);
    assert_eq!(
        state_of(&s.env, s.reader_pid).await.as_deref(),
        Some("idle in transaction")
    );
    s.reader
        .batch_execute("COMMIT")
        .await
        .expect("the reader's transaction is intact");
    s.env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_blocker_commits_just_before_the_signal() {
    let mut s = staged(DROP_CONSTRAINT).await;
    s.reader.batch_execute("COMMIT").await.unwrap();
    let (outcome, _) = s.enforcer.signal(&s.decision).await;
    // Its transaction is over: the session the decision named is gone,
    // whether or not the ALTER has taken its lock yet.
    assert_eq!(outcome, Outcome::Gone);
    within("the ALTER", s.alter).await.unwrap().unwrap();
    s.reader
        .simple_query("SELECT 1")
        .await
        .expect("the reader was not signalled");
    s.env.stop().await;
}

/// Pid reuse cannot be staged on demand: the statement is run with a stale
/// backend_start against a live pid that still blocks, and signals nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_backend_start_on_a_live_pid_signals_nothing() {
    let mut s = staged(DROP_CONSTRAINT).await;
    let mut stale = s.decision.clone();
    stale.target.backend_start = stale.target.backend_start.map(|t| t - Duration::from_secs(3600));
    let (outcome, _) = s.enforcer.signal(&stale).await;
    assert_eq!(outcome, Outcome::Gone);
    let mut other_transaction = s.decision.clone();
    other_transaction.target.xact_start = other_transaction.target.xact_start.map(|t| t - Duration::from_secs(1));
    assert_eq!(s.enforcer.signal(&other_transaction).await.0, Outcome::Gone);
    assert!(!s.alter.is_finished(), "the ALTER still waits: nothing was signalled");
    assert_eq!(
        state_of(&s.env, s.reader_pid).await.as_deref(),
        Some("idle in transaction")
    );
    // The decision as made still goes through.
    assert_eq!(s.enforcer.signal(&s.decision).await.0, Outcome::Success);
    s.reader.batch_execute("ROLLBACK").await.ok();
    within("the ALTER", s.alter).await.unwrap().unwrap();
    s.env.stop().await;
}

/// A role with only pg_monitor and pg_signal_backend cancels an ordinary
/// blocker and gets permission_denied, once, for a superuser's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_privilege_role_cancels_ordinary_blockers_not_superusers() {
    let cluster = start_cluster(ClusterOptions::default()).await;
    let postgres = connect(&cluster.dsn("postgres"), "fixture").await;
    // The shipped role script, run twice: it is idempotent.
    apply_lockjam_role_sql(&cluster, true);
    apply_lockjam_role_sql(&cluster, true);
    postgres.batch_execute("CREATE ROLE shop LOGIN").await.unwrap();
    postgres.batch_execute("CREATE DATABASE shop OWNER shop").await.unwrap();
    let shop = |user: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=shop sslmode=disable",
            cluster.port()
        )
    };
    let owner = connect(&shop("shop"), "owner").await;
    owner
        .batch_execute("CREATE TABLE a (id int); CREATE TABLE b (id int)")
        .await
        .unwrap();
    let ordinary = connect(&shop("shop"), "report").await;
    let ordinary_pid = backend_pid(&ordinary).await;
    let superuser = connect(&shop("postgres"), "admin-report").await;
    let superuser_pid = backend_pid(&superuser).await;
    let ordinary_read =
        tokio::spawn(async move { ordinary.simple_query("SELECT pg_sleep(600), count(*) FROM a").await });
    let superuser_read =
        tokio::spawn(async move { superuser.simple_query("SELECT pg_sleep(600), count(*) FROM b").await });
    wait_until("both reads to hold their locks", || async {
        let row = owner
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE pid = ANY($1) AND relation IN ('a'::regclass, 'b'::regclass) AND granted",
                &[&vec![ordinary_pid, superuser_pid]],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == 2
    })
    .await;

    let dsn = format!(
        "host=127.0.0.1 port={} user=lockjam dbname=postgres sslmode=disable",
        cluster.port()
    );
    let service = Service::start(&config_with(vec![("least", dsn)], acting(unblock(1))))
        .await
        .unwrap();
    let addr = service.local_addr();
    let migrate_a = connect(&shop("shop"), "migrate").await;
    let migrate_b = connect(&shop("shop"), "migrate").await;
    let alter_a = tokio::spawn(async move { migrate_a.simple_query("ALTER TABLE a ADD COLUMN x int").await });
    let _alter_b = tokio::spawn(async move { migrate_b.simple_query("ALTER TABLE b ADD COLUMN x int").await });

    within("the ALTER on a", alter_a)
        .await
        .unwrap()
        .expect("the ordinary blocker was cancelled");
    let read_error = within("the ordinary read", ordinary_read).await.unwrap().unwrap_err();
    assert_eq!(read_error.code(), Some(&SqlState::QUERY_CANCELED));
    wait_until("permission_denied for the superuser's read", || async {
        events(addr).await.iter().any(|e| e["outcome"] == "permission_denied")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = events(addr).await;
    let denied: Vec<&Value> = events.iter().filter(|e| e["outcome"] == "permission_denied").collect();
    assert_eq!(denied.len(), 1, "reported once, not retried: {events:#?}");
    assert_eq!(denied[0]["blocker"]["pid"], superuser_pid);
    assert!(
        denied[0]["detail"].as_str().unwrap().contains("pg_signal_backend"),
        "{}",
        denied[0]["detail"]
    );
    let metrics = scrape(addr).await;
    assert_eq!(
        metrics.value(
            "lockjam_policy_actions_total",
            &[("action", "cancel"), ("outcome", "permission_denied")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metrics.value(
            "lockjam_policy_actions_total",
            &[("action", "cancel"), ("outcome", "success")]
        ),
        Some(1.0)
    );
    assert!(!superuser_read.is_finished(), "the superuser's read is untouched");
    service.stop().await;
    postgres
        .query_one("SELECT pg_terminate_backend($1)", &[&superuser_pid])
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

/// Two lockjam instances on one database: exactly one leads and acts; when
/// it stops, the other takes over and acts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_only_the_leader_acts_and_the_other_takes_over() {
    let env = TestEnv::start_full(ClusterOptions::default(), acting(unblock(1))).await;
    let second = Service::start(&config_with(
        vec![("it", env.cluster.dsn("postgres"))],
        acting(unblock(1)),
    ))
    .await
    .unwrap();
    let second_addr = second.local_addr();
    let leaders = || async {
        let first = env.scrape().await.value("lockjam_policy_leader", &[]);
        let other = scrape(second_addr).await.value("lockjam_policy_leader", &[]);
        (first, other)
    };
    wait_until("one leader", || async {
        matches!(leaders().await, (Some(a), Some(b)) if a + b == 1.0)
    })
    .await;
    let (_, read, _, alter) = migration_behind_long_read(&env).await;
    within("the ALTER", alter).await.unwrap().unwrap();
    assert!(within("the read", read).await.unwrap().is_err());
    wait_until("the leader's event", || async {
        env.events().await.len() + events(second_addr).await.len() >= 1
    })
    .await;
    let (first_events, second_events) = (env.events().await, events(second_addr).await);
    assert_eq!(
        first_events.len() + second_events.len(),
        1,
        "{first_events:?} {second_events:?}"
    );
    let (first_leads, _) = leaders().await;
    assert_eq!(first_events.len() == 1, first_leads == Some(1.0), "the leader acted");

    // Stop the leader; the survivor takes over and clears the next queue.
    let mut env = env;
    let survivor_addr = if first_leads == Some(1.0) {
        env.service.take().unwrap().stop().await;
        env.service = Some(second);
        second_addr
    } else {
        second.stop().await;
        env.addr()
    };
    wait_until("the survivor to lead", || async {
        scrape(survivor_addr).await.value("lockjam_policy_leader", &[]) == Some(1.0)
    })
    .await;
    let before = events(survivor_addr).await.len();
    let (reader_pid, read) = env
        .spawn_statement("analyst", "SELECT pg_sleep(600), count(*) FROM customers")
        .await;
    env.wait_until_holding(reader_pid, "customers", None).await;
    let (_, alter) = env
        .spawn_statement("migrate", "ALTER TABLE customers ADD COLUMN note text")
        .await;
    within("the second ALTER", alter).await.unwrap().unwrap();
    assert!(within("the second read", read).await.unwrap().is_err());
    wait_until("the survivor's event", || async {
        events(survivor_addr).await.len() == before + 1
    })
    .await;
    env.stop().await;
}

/// Two `lockjam run` processes on one database: exactly one reports
/// `lockjam_policy_leader 1`; when it is killed (SIGKILL, no goodbye), the
/// other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_lockjam_run_processes_fail_over_when_the_leader_is_killed() {
    let env = TestEnv::start().await;
    let spawn = || {
        let port = lockjam::cluster::free_port().unwrap();
        let listen = format!("127.0.0.1:{port}");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockjam"))
            .args(["run", "--listen", &listen, "--cancel-blockers-after", "2s"])
            .args(["--dsn", &env.cluster.dsn("postgres")])
            .env_remove("LOCKJAM_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        (child, listen.parse::<std::net::SocketAddr>().unwrap())
    };
    let (mut first, first_addr) = spawn();
    let (mut second, second_addr) = spawn();
    let leader_of = |addr| async move {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => scrape(addr).await.value("lockjam_policy_leader", &[]),
            Err(_) => None,
        }
    };
    wait_until("exactly one leader", || async {
        matches!((leader_of(first_addr).await, leader_of(second_addr).await), (Some(a), Some(b)) if a + b == 1.0)
    })
    .await;
    let (survivor_addr, leader) = if leader_of(first_addr).await == Some(1.0) {
        (second_addr, &mut first)
    } else {
        (first_addr, &mut second)
    };
    leader.start_kill().unwrap();
    leader.wait().await.unwrap();
    wait_until("the survivor to lead", || async {
        leader_of(survivor_addr).await == Some(1.0)
    })
    .await;
    env.stop().await;
}
