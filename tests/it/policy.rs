//! The policy against real sessions: the incidents cleared, the safety
//! rules, the races between decision and signal, least privilege, and
//! leader election between two lockjam instances.

use std::process::Stdio;
use std::time::Duration;

use lockjam::cluster::ClusterOptions;
use lockjam::config::SamplerConfig;
use lockjam::policy::{Action, Glob, Outcome, Policy, Rule};
use lockjam::service::Service;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;
use tokio_postgres::error::SqlState;

use crate::scenes::{
    constraint_rename_behind_analytics, migration_behind_long_read, orders, staged, DROP_CONSTRAINT, LONG_READ,
};
use crate::support::{
    apply_lockjam_role_sql, backend_pid, config_with, connect, events, lockjam, pg_dump_for, sampler_config, scrape,
    start_cluster, the_one_incident, wait_until, within, LockjamRun, TestEnv,
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

/// The policy samples when a rule comes due, not at its next tick: with a
/// 10 s interval, no fast cadence and `min_wait = "5s"`, a migration that a
/// calm tick sees 0–3 s into its wait is cleared once it has waited 5 s,
/// not at the tick 10 s later. (The margins are seconds either way: this
/// is the order of samples, not a timing claim; BENCHMARKS.md has the
/// reaction times.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_policy_acts_at_its_deadline_between_calm_ticks() {
    let sampler = SamplerConfig {
        interval: Duration::from_secs(10),
        fast_interval: None,
        ..sampler_config()
    };
    let env = TestEnv::start_sampling(ClusterOptions::default(), acting(unblock(5)), sampler).await;
    env.admin.batch_execute(&orders()).await.unwrap();
    // The first tick: the next is 10 s after it.
    env.wait_for_metrics("the first sample, as leader", |m| {
        m.value("lockjam_policy_leader", &[]) == Some(1.0)
    })
    .await;
    let first_tick = std::time::Instant::now();
    let (reader_pid, read) = env.spawn_statement("analyst", LONG_READ).await;
    env.wait_until_holding(reader_pid, "orders", None).await;
    tokio::time::sleep_until((first_tick + Duration::from_secs(7)).into()).await;
    let (migration_pid, alter) = env.spawn_statement("migrate", DROP_CONSTRAINT).await;
    env.wait_until_waiting(migration_pid).await;
    assert!(
        first_tick.elapsed() < Duration::from_secs(9),
        "the migration waits before the second tick"
    );
    within("the ALTER", alter).await.unwrap().expect("the ALTER succeeds");
    assert!(within("the read", read).await.unwrap().is_err());
    let event = env.wait_for_event("the signal", |e| e["outcome"] == "success").await;
    assert_eq!(event["waiter"]["pid"], migration_pid);
    let waited = event["waiter"]["wait_seconds"].as_f64().unwrap();
    // At the deadline (5 s), never before it; at the tick it would have
    // waited 10 s or more.
    assert!((5.0..8.0).contains(&waited), "acted after a wait of {waited}s");
    env.stop().await;
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

    // The incident remembers it: lockjam cancelled the root.
    let incident = env.the_one_incident().await;
    assert_eq!(incident["outcome"], "blocker_signalled");
    assert_eq!(incident["relation"], "public.orders");
    assert_eq!(incident["waiter"]["pid"], migration_pid);
    assert_eq!(incident["roots"][0]["pid"], reader_pid);
    assert_eq!(incident["roots"].as_array().unwrap().len(), 1);
    assert_eq!(incident["peak_behind"], 20);
    let decisions = incident["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 1, "{incident:#}");
    assert_eq!(decisions[0]["outcome"], "success");
    assert_eq!(decisions[0]["signalled_pid"], reader_pid);
    assert_eq!(decisions[0]["time"], event["time"]);
    env.stop().await;
}

/// Incident 003 with the policy: the analytics report is cancelled after
/// `min_wait` (2 s), before the migration's own `lock_timeout` (10 s)
/// gives up, so the rename goes through; the incident says lockjam
/// signalled the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_003_cleared_before_the_migrations_lock_timeout() {
    let env = TestEnv::start_full(ClusterOptions::default(), acting(unblock(2))).await;
    let (analytics_pid, report, migration_pid, rename) =
        constraint_rename_behind_analytics(&env, Duration::from_secs(10)).await;
    let (_, api) = env
        .spawn_statement("api", "SELECT id FROM payment_events WHERE payment_id = 1")
        .await;
    within("the RENAME", rename)
        .await
        .unwrap()
        .expect("the rename goes through");
    within("the API read", api)
        .await
        .unwrap()
        .expect("the API read succeeds");
    let error = within("the report", report).await.unwrap().unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED));
    let incident = env.the_one_incident().await;
    assert_eq!(incident["outcome"], "blocker_signalled");
    assert_eq!(incident["relation"], "public.payment_events");
    assert_eq!(incident["mode"], "AccessExclusiveLock");
    assert_eq!(incident["waiter"]["pid"], migration_pid);
    assert_eq!(incident["roots"][0]["pid"], analytics_pid);
    assert_eq!(incident["roots"][0]["application_name"], "analytics");
    assert_eq!(incident["decisions"][0]["signalled_pid"], analytics_pid);
    let lasted = incident["duration_seconds"].as_f64().unwrap();
    assert!((2.0..10.0).contains(&lasted), "{lasted}");
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
    // Past [incidents] min_wait (1 s), short of the rule's (3 s): an
    // incident is open when the database goes.
    env.wait_for_metrics("the waiter sampled past 1 s", |m| {
        m.value("lockjam_lock_waiters", &[("datname", "app")]) == Some(1.0)
            && m.value("lockjam_lock_wait_max_seconds", &[("datname", "app")])
                .is_some_and(|wait| wait >= 1.0)
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

    // Two incidents: the first ended when lockjam lost the database, at
    // the last sample that saw it; the second, lockjam's cancel.
    wait_until("the second incident", || async {
        crate::support::incidents(env.addr()).await.len() == 2
    })
    .await;
    let incidents = crate::support::incidents(env.addr()).await;
    let summary: Vec<(&Value, &Value)> = incidents.iter().map(|i| (&i["outcome"], &i["waiter"]["pid"])).collect();
    assert_eq!(
        summary,
        [
            (&Value::from("blocker_signalled"), &Value::from(migration_pid)),
            (&Value::from("target_down"), &Value::from(old_migration))
        ]
    );
    assert_eq!(incidents[1]["waiter_got_lock"], Value::Null);
    assert_eq!(incidents[1]["roots"][0]["pid"], old_reader);
    env.stop().await;
}

/// Incident 001 with a real `pg_dump` whose output is not read: its
/// backend waits on ClientWrite holding ACCESS SHARE, and `DROP TABLE`
/// queues behind it, and five SELECTs behind that.
struct StalledBackup {
    dump: tokio::process::Child,
    dump_pid: i32,
    release_pid: i32,
    drop_table: crate::support::Statement,
    selects: JoinSet<Result<Result<(), tokio_postgres::Error>, tokio::task::JoinError>>,
}

async fn stalled_pg_dump(env: &TestEnv) -> StalledBackup {
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
    let mut selects = JoinSet::new();
    for _ in 0..5 {
        selects.spawn(env.spawn_statement("web", "SELECT count(*) FROM field_history").await.1);
    }
    env.wait_until_waiting_count("web", 5).await;
    StalledBackup {
        dump,
        dump_pid,
        release_pid,
        drop_table,
        selects,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_001_protected_pg_dump_survives_and_the_waiter_is_reported() {
    let rule = Rule {
        protect_applications: vec![Glob("pg_dump".into())],
        terminate_after: Some(Duration::from_secs(2)),
        ..unblock(1)
    };
    let env = TestEnv::start_full(ClusterOptions::default(), acting(rule)).await;
    let StalledBackup {
        mut dump,
        dump_pid,
        drop_table,
        ..
    } = stalled_pg_dump(&env).await;
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
    let StalledBackup {
        mut dump,
        dump_pid,
        drop_table,
        ..
    } = stalled_pg_dump(&env).await;
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
    let incident = env.the_one_incident().await;
    assert_eq!(incident["outcome"], "blocker_signalled");
    assert_eq!(incident["waiter"]["query"], "DROP TABLE field_history");
    assert_eq!(incident["roots"][0]["pid"], dump_pid);
    dump.kill().await.unwrap();
    env.stop().await;
}

/// A migration tool's foreign key, as the tool sends it. Checked once
/// against the real tools on PostgreSQL 15.18: Django 5.2.19 (`migrate` of
/// a new model with `ForeignKey(User)`) and Alembic 1.20.1 with SQLAlchemy
/// 2.1.9 (`op.create_foreign_key`), both through psycopg 3.3.9. Each ran
/// its migration in one transaction with an empty application_name, and
/// waited for ShareRowExclusiveLock on the referenced table.
struct ForeignKeyMigration {
    users: &'static str,
    schema: &'static str,
    migration: &'static [&'static str],
}

const DJANGO_5_2: ForeignKeyMigration = ForeignKeyMigration {
    users: "app_user",
    schema: "CREATE TABLE app_user (id bigint PRIMARY KEY, email text, last_login timestamptz);
             INSERT INTO app_user SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 1000) AS g;",
    // `sqlmigrate app 0002`: the table, the deferred constraint, its index.
    migration: &[
        r#"CREATE TABLE "app_invite" ("id" bigint NOT NULL PRIMARY KEY GENERATED BY DEFAULT AS IDENTITY, "user_id" bigint NOT NULL)"#,
        r#"ALTER TABLE "app_invite" ADD CONSTRAINT "app_invite_user_id_57642b3e_fk_app_user_id" FOREIGN KEY ("user_id") REFERENCES "app_user" ("id") DEFERRABLE INITIALLY DEFERRED"#,
        r#"CREATE INDEX "app_invite_user_id_57642b3e" ON "app_invite" ("user_id")"#,
    ],
};

const ALEMBIC_1_20: ForeignKeyMigration = ForeignKeyMigration {
    users: "users",
    schema: "CREATE TABLE users (id integer PRIMARY KEY, email text, last_login timestamptz);
             INSERT INTO users SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 1000) AS g;
             CREATE TABLE invites (id integer PRIMARY KEY, user_id integer);
             CREATE TABLE alembic_version (version_num varchar(32) NOT NULL CONSTRAINT alembic_version_pkc PRIMARY KEY);
             INSERT INTO alembic_version VALUES ('0001');",
    // `alembic upgrade head`: the version read, the constraint, the
    // version update, in one transaction.
    migration: &[
        "SELECT alembic_version.version_num FROM alembic_version",
        "ALTER TABLE invites ADD CONSTRAINT fk_invites_user_id FOREIGN KEY(user_id) REFERENCES users (id)",
        "UPDATE alembic_version SET version_num='0002' WHERE alembic_version.version_num = '0001'",
    ],
};

/// Incident 002 as a new user meets it: a mailer's write transaction on
/// the users table runs a long statement; a web request's UPDATE of the
/// row the mailer changed waits for the mailer's transaction, holding ROW
/// EXCLUSIVE on the table; the migration's ADD FOREIGN KEY waits behind
/// both for SHARE ROW EXCLUSIVE; twenty writers queue behind it. `lockjam
/// run --cancel-blockers-after 2s` alone clears it: only the mailer, the
/// root, is cancelled; the web UPDATE, a victim, is not; the migration and
/// every writer succeed.
async fn incident_002_cleared_by_the_flag_alone(tool: &ForeignKeyMigration) {
    let env = TestEnv::start().await;
    env.admin.batch_execute(tool.schema).await.unwrap();
    let lockjam = LockjamRun::spawn(&["--dsn", &env.cluster.dsn("postgres"), "--cancel-blockers-after", "2s"]);
    wait_until("lockjam run to serve", || lockjam.serving()).await;
    let users = tool.users;
    let (mailer_pid, mailer) = env
        .spawn_transaction(
            "mailer",
            &[
                &format!("UPDATE {users} SET last_login = now() WHERE id = 1"),
                &format!("SELECT pg_sleep(600), count(*) FROM {users}"),
            ],
        )
        .await;
    env.wait_until_holding(mailer_pid, users, Some("RowExclusiveLock"))
        .await;
    let (web_pid, web) = env
        .spawn_statement("web", &format!("UPDATE {users} SET email = email WHERE id = 1"))
        .await;
    env.wait_until_waiting(web_pid).await;
    let (migration_pid, migration) = env.spawn_transaction("", tool.migration).await;
    env.wait_until_waiting(migration_pid).await;
    let mut writers = JoinSet::new();
    for id in 2..22 {
        let write = format!("UPDATE {users} SET email = email WHERE id = {id}");
        writers.spawn(env.spawn_statement("writer", &write).await.1);
    }
    env.wait_until_waiting_count("writer", 20).await;

    within("the migration", migration)
        .await
        .unwrap()
        .expect("the foreign key is added");
    within("the web UPDATE", web)
        .await
        .unwrap()
        .expect("the web UPDATE, a victim, succeeds");
    while let Some(write) = within("the writers", writers.join_next()).await {
        write.unwrap().unwrap().expect("every writer succeeds");
    }
    let error = within("the mailer", mailer).await.unwrap().unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED));

    wait_until("the event", || async { !events(lockjam.addr).await.is_empty() }).await;
    let events = events(lockjam.addr).await;
    assert_eq!(events.len(), 1, "one signal, to the mailer: {events:#?}");
    let event = &events[0];
    assert_eq!(
        (&event["rule"], &event["action"], &event["outcome"]),
        (
            &Value::from("unblock-migrations"),
            &Value::from("cancel"),
            &Value::from("success")
        )
    );
    assert_eq!(event["signalled_pid"], mailer_pid);
    assert_eq!(event["blocker"]["pid"], mailer_pid);
    assert_eq!(event["blocker"]["application_name"], "mailer");
    assert_eq!(event["blocker"]["holds"]["mode"], "RowExclusiveLock");
    assert_eq!(event["blocker"]["holds"]["relation"], format!("public.{users}"));
    assert_eq!(event["roots"].as_array().unwrap().len(), 1);
    assert_eq!(event["waiter"]["pid"], migration_pid);
    assert_eq!(event["waiter"]["mode"], "ShareRowExclusiveLock");
    assert_eq!(event["waiter"]["relation"], format!("public.{users}"));
    assert_eq!(event["waiter"]["application_name"], "");
    let counted: f64 = scrape(lockjam.addr)
        .await
        .matching("lockjam_policy_actions_total", &[])
        .iter()
        .map(|(_, _, value)| value)
        .sum();
    assert_eq!(counted, 1.0, "one decision counted, as one event");

    // One incident, whose root is the mailer, not the web UPDATE waiting
    // on the mailer's row in front of the migration (a victim).
    let incident = the_one_incident(lockjam.addr).await;
    assert_eq!(incident["outcome"], "blocker_signalled");
    assert_eq!(incident["relation"], format!("public.{users}"));
    assert_eq!(incident["mode"], "ShareRowExclusiveLock");
    assert_eq!(incident["waiter"]["pid"], migration_pid);
    let roots: Vec<&Value> = incident["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["pid"])
        .collect();
    assert_eq!(roots, [&Value::from(mailer_pid)], "{incident:#}");
    assert_eq!(incident["roots"][0]["application_name"], "mailer");
    assert_eq!(incident["peak_behind"], 20);
    assert_eq!(incident["decisions"].as_array().unwrap().len(), 1);

    let (_, log) = lockjam.terminate();
    assert!(log.contains("policy live, this instance leads"), "{log}");
    assert!(
        log.contains(
            "policy 1. rule `unblock-migrations`: cancel_blockers when a relation wait for \
             ShareRowExclusiveLock/ExclusiveLock/AccessExclusiveLock"
        ),
        "{log}"
    );
    let audit: Vec<&str> = log.lines().filter(|line| line.contains("lockjam::audit")).collect();
    assert_eq!(audit.len(), 1, "one WARN line per signal: {log}");
    assert!(
        audit[0].contains(&format!("cancelled pid {mailer_pid}")),
        "{}",
        audit[0]
    );
    assert!(audit[0].len() < 700, "a concise line: {} characters", audit[0].len());

    // And one line when it closed, in a few words.
    let closed: Vec<&str> = log.lines().filter(|line| line.contains("lockjam::incidents")).collect();
    assert_eq!(closed.len(), 1, "{log}");
    assert!(
        closed[0].contains(&format!("closed: ShareRowExclusiveLock on public.{users} in app")),
        "{}",
        closed[0]
    );
    assert!(
        closed[0].contains(&format!(
            "waiter pid {migration_pid}, root pid {mailer_pid} (postgres/mailer"
        )),
        "{}",
        closed[0]
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_002_django_migration_cleared_by_the_flag_alone() {
    incident_002_cleared_by_the_flag_alone(&DJANGO_5_2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_002_alembic_migration_cleared_by_the_flag_alone() {
    incident_002_cleared_by_the_flag_alone(&ALEMBIC_1_20).await;
}

/// Incident 001's sensible answer: the backup (`pg_dump*`, protected for
/// every rule) finishes, and the migration is cancelled instead by the
/// next rule, so the queue drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_001_protected_backup_finishes_and_the_migration_is_cancelled() {
    let mut policy = Policy::acting(vec![
        Rule {
            terminate_after: Some(Duration::from_secs(2)),
            ..unblock(1)
        },
        Rule {
            name: "migration-lock-timeout".into(),
            action: Action::CancelWaiter,
            ..unblock(1)
        },
    ]);
    policy.protect_applications = vec![Glob("pg_dump*".into())];
    let env = TestEnv::start_full(ClusterOptions::default(), policy).await;
    let StalledBackup {
        mut dump,
        dump_pid,
        release_pid,
        drop_table,
        mut selects,
    } = stalled_pg_dump(&env).await;
    let error = within("the DROP", drop_table).await.unwrap().unwrap_err();
    assert_eq!(
        error.code(),
        Some(&SqlState::QUERY_CANCELED),
        "the migration is cancelled"
    );
    while let Some(select) = within("the SELECTs", selects.join_next()).await {
        select.unwrap().unwrap().expect("the queue drains");
    }
    // The backup, read at last, completes.
    let mut output = Vec::new();
    let mut stdout = dump.stdout.take().unwrap();
    within("pg_dump's output", stdout.read_to_end(&mut output))
        .await
        .unwrap();
    let status = within("pg_dump", dump.wait()).await.unwrap();
    assert!(status.success(), "pg_dump {status}");
    let output = String::from_utf8_lossy(&output);
    assert!(output.contains("COPY public.field_history"), "a whole dump");
    assert!(
        output.contains("-- PostgreSQL database dump complete"),
        "pg_dump ran to its end"
    );

    // The cancel takes effect before lockjam records it.
    env.wait_for_event("the signal", |e| e["outcome"] == "success").await;
    let events = env.events().await;
    let summary: Vec<(&str, &str, i64)> = events
        .iter()
        .rev()
        .map(|e| {
            (
                e["rule"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
                e["signalled_pid"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("unblock-migrations", "protected", dump_pid as i64),
            ("migration-lock-timeout", "success", release_pid as i64)
        ]
    );
    assert_eq!(
        events[1]["reason"],
        "application `pg_dump` is protected; the waiter goes to rule `migration-lock-timeout`"
    );
    let cancel = &events[0];
    assert_eq!(cancel["rule_action"], "cancel_waiter");
    assert_eq!(cancel["waiter"]["query"], "DROP TABLE field_history");
    assert_eq!(cancel["blocker"]["pid"], dump_pid, "who the migration waited on");
    assert_eq!(cancel["blocker"]["wait_event"], "ClientWrite");
    assert_eq!(cancel["blocker"]["holds"]["mode"], "AccessShareLock");
    assert!(cancel["reason"]
        .as_str()
        .unwrap()
        .starts_with("rule `unblock-migrations` could signal none of its targets; "));

    // The incident: the migration was cancelled by lockjam, both
    // decisions about it recorded.
    let incident = env.the_one_incident().await;
    assert_eq!(incident["outcome"], "waiter_signalled");
    assert_eq!(incident["waiter_got_lock"], false);
    assert_eq!(incident["waiter"]["pid"], release_pid);
    assert_eq!(incident["roots"][0]["pid"], dump_pid);
    assert_eq!(incident["roots"][0]["application_name"], "pg_dump");
    let decisions: Vec<(&str, &str)> = incident["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["rule"].as_str().unwrap(), d["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        decisions,
        [
            ("unblock-migrations", "protected"),
            ("migration-lock-timeout", "success")
        ]
    );
    env.stop().await;
}

/// `--cancel-blockers-after` with a configuration file that protects the
/// backup: in a rule of the flag's name, or for every rule under
/// [policy]. Either way the backup is reported once and never signalled,
/// and `check-config` shows the protection in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_flag_with_a_file_protection_never_signals_the_protected_backup() {
    let env = TestEnv::start().await;
    let StalledBackup {
        mut dump,
        dump_pid,
        release_pid,
        drop_table,
        ..
    } = stalled_pg_dump(&env).await;
    let dsn = env.cluster.dsn("postgres");
    for file_text in [
        "[[policy.rules]]\nname = \"unblock-migrations\"\nprotect_applications = [\"pg_dump*\"]\n",
        "[policy]\nprotect_applications = [\"pg_dump*\"]\n",
    ] {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut file, file_text.as_bytes()).unwrap();
        let config = file.path().to_str().unwrap();
        let args = ["--config", config, "--dsn", &dsn, "--cancel-blockers-after", "1s"];
        let shown = lockjam().arg("check-config").args(args).output().unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout);
        assert!(shown.contains("protect_applications = [\"pg_dump*\"]"), "{shown}");
        assert!(shown.contains("# --cancel-blockers-after 1s "), "{shown}");

        let run = LockjamRun::spawn(&args);
        wait_until("the protected report", || async {
            run.serving().await && !events(run.addr).await.is_empty()
        })
        .await;
        // Past min_wait several times over, nothing is signalled.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let events = events(run.addr).await;
        assert_eq!(events.len(), 1, "{file_text}: {events:#?}");
        assert_eq!(events[0]["outcome"], "protected");
        assert_eq!(events[0]["signalled_pid"], dump_pid);
        assert_eq!(events[0]["waiter"]["pid"], release_pid);
        assert_eq!(
            events[0]["reason"],
            "application `pg_dump` is protected; no later rule matches: the waiter stays queued"
        );
        assert_eq!(state_of(&env, dump_pid).await.as_deref(), Some("active"));
        assert!(!drop_table.is_finished(), "the DROP still waits");
        let (status, _) = run.terminate();
        assert!(status.success());
    }
    dump.kill().await.unwrap();
    within("the DROP once the backup is gone", drop_table)
        .await
        .unwrap()
        .unwrap();
    env.stop().await;
}

/// Row-lock waits never match the default rule: a `SELECT ... FOR UPDATE`
/// queued for a row's tuple lock asks for AccessExclusiveLock on locktype
/// `tuple`, and the session holding the tuple lock is itself waiting for
/// the row's owner. Nothing is signalled; the waits show on /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_lock_waits_never_match_the_default_rule() {
    let env = TestEnv::start_full(ClusterOptions::default(), acting(unblock(1))).await;
    env.admin.batch_execute(&orders()).await.unwrap();
    let (owner_pid, owner) = env
        .spawn_transaction(
            "worker",
            &[
                "UPDATE orders SET customer_id = customer_id WHERE id = 1",
                "SELECT pg_sleep(600)",
            ],
        )
        .await;
    env.wait_until_holding(owner_pid, "orders", Some("RowExclusiveLock"))
        .await;
    let (first_pid, first) = env
        .spawn_statement("web-a", "SELECT * FROM orders WHERE id = 1 FOR UPDATE")
        .await;
    env.wait_until_waiting(first_pid).await;
    let (second_pid, second) = env
        .spawn_statement("web-b", "SELECT * FROM orders WHERE id = 1 FOR UPDATE")
        .await;
    env.wait_until_waiting(second_pid).await;
    let metrics = env
        .wait_for_metrics("both row-lock waits", |m| {
            m.value(
                "lockjam_lock_waiters",
                &[("locktype", "tuple"), ("mode", "AccessExclusiveLock")],
            ) == Some(1.0)
                && m.value(
                    "lockjam_lock_waiters",
                    &[("locktype", "transactionid"), ("mode", "ShareLock")],
                ) == Some(1.0)
        })
        .await;
    assert_eq!(
        metrics.value("lockjam_relation_lock_waiters", &[("relation", "public.orders")]),
        Some(1.0),
        "the tuple wait names its table; the transaction id wait names none"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(env.events().await, Vec::<Value>::new());
    assert!(!first.is_finished() && !second.is_finished());
    assert_eq!(state_of(&env, owner_pid).await.as_deref(), Some("active"));
    env.admin
        .query_one("SELECT pg_cancel_backend($1)", &[&owner_pid])
        .await
        .unwrap();
    assert!(within("the row's owner", owner).await.unwrap().is_err());
    within("the first FOR UPDATE", first).await.unwrap().unwrap();
    within("the second FOR UPDATE", second).await.unwrap().unwrap();
    env.stop().await;
}

/// Incident 000 with the read in a transaction left idle (the session
/// that forgot to commit): cancel cannot end it, so the flag's rule
/// (`min_wait = 2s`, `terminate_after = 10s`) terminates it at min_wait,
/// not at min_wait + terminate_after; the ALTER and the queued SELECTs go
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_000_idle_in_transaction_blocker_is_terminated_at_min_wait() {
    let env = TestEnv::start_full(ClusterOptions::default(), acting(unblock(2))).await;
    env.admin.batch_execute(&orders()).await.unwrap();
    let holder = env.session("worker").await;
    let holder_pid = backend_pid(&holder).await;
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM orders")
        .await
        .unwrap();
    let (migration_pid, alter) = env.spawn_statement("migrate", DROP_CONSTRAINT).await;
    env.wait_until_waiting(migration_pid).await;
    let mut selects = JoinSet::new();
    for _ in 0..10 {
        selects.spawn(env.spawn_statement("web", "SELECT count(*) FROM orders").await.1);
    }
    within("the ALTER", alter).await.unwrap().expect("the ALTER succeeds");
    while let Some(select) = within("the SELECTs", selects.join_next()).await {
        select.unwrap().unwrap().expect("every queued SELECT succeeds");
    }
    env.wait_for_event("the signal", |e| e["outcome"] == "success").await;
    let events = env.events().await;
    assert_eq!(events.len(), 1, "no useless cancel first: {events:#?}");
    assert_eq!(events[0]["action"], "terminate");
    assert_eq!(events[0]["outcome"], "success");
    assert_eq!(events[0]["signalled_pid"], holder_pid);
    assert_eq!(events[0]["blocker"]["pid"], holder_pid);
    assert_eq!(events[0]["blocker"]["state"], "idle in transaction");
    assert_eq!(events[0]["blocker"]["holds"]["mode"], "AccessShareLock");
    assert_eq!(events[0]["blocker"]["holds"]["relation"], "public.orders");
    assert!(events[0]["reason"].as_str().unwrap().contains("idle in transaction"));
    let waited = events[0]["waiter"]["wait_seconds"].as_f64().unwrap();
    // The first sample past min_wait acts: the fast cadence is 100 ms, so
    // a second of slack is generous, and far from min_wait +
    // terminate_after (12 s), when it acted before.
    assert!(
        (2.0..3.0).contains(&waited),
        "terminated at the first sample past min_wait: {waited}s"
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
    assert_eq!(events[0]["rule_action"], "cancel_waiter");
    assert_eq!(events[0]["signalled_pid"], migration_pid);
    assert_eq!(events[0]["waiter"]["pid"], migration_pid);
    assert_eq!(events[0]["waiter"]["behind"], 5);
    // Who the waiter waited on: the long read, never the waiter itself.
    assert_eq!(events[0]["blocker"]["pid"], reader_pid);
    assert_eq!(events[0]["blocker"]["query"], LONG_READ);
    assert_eq!(events[0]["roots"].as_array().unwrap().len(), 1);
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
    let outcome = s.enforcer.signal(&s.decision).await.outcome;
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
    let outcome = s.enforcer.signal(&s.decision).await.outcome;
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
    let outcome = s.enforcer.signal(&s.decision).await.outcome;
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

/// The statement, not only the decision, refuses to signal a victim: a
/// decision forged to cancel the web UPDATE of incident 002 (a hard
/// blocker of the migration, but itself waiting for the mailer's row) is
/// `not_blocking`, and the same statement cancels the mailer, the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_signalling_statement_refuses_a_waiting_session() {
    let env = TestEnv::start().await;
    env.admin
        .batch_execute(
            "CREATE TABLE users (id bigint PRIMARY KEY, email text);
             INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 10) AS g;
             CREATE TABLE invites (id bigint PRIMARY KEY, user_id bigint);",
        )
        .await
        .unwrap();
    let (mailer_pid, mailer) = env
        .spawn_transaction(
            "mailer",
            &["UPDATE users SET email = email WHERE id = 1", "SELECT pg_sleep(600)"],
        )
        .await;
    env.wait_until_holding(mailer_pid, "users", Some("RowExclusiveLock"))
        .await;
    let (web_pid, web) = env
        .spawn_statement("web", "UPDATE users SET email = email WHERE id = 1")
        .await;
    env.wait_until_waiting(web_pid).await;
    let (migration_pid, migration) = env
        .spawn_statement(
            "migrate",
            "ALTER TABLE invites ADD FOREIGN KEY (user_id) REFERENCES users",
        )
        .await;
    env.wait_until_waiting(migration_pid).await;

    let target = env.target();
    let mut sampler = lockjam::sampler::Sampler::new(&target, &crate::support::sampler_config()).unwrap();
    let graph = lockjam::analysis::analyze(&sampler.sample().await.unwrap());
    let waiter = graph.waiter(migration_pid).expect("the migration waits").clone();
    let hard: Vec<i32> = waiter.blocked_by.iter().map(|edge| edge.pid).collect();
    assert!(hard.contains(&web_pid) && hard.contains(&mailer_pid), "{hard:?}");
    let mut enforcer = lockjam::enforcer::Enforcer::new(&target, crate::support::session_settings()).unwrap();
    assert!(enforcer.lead().await);
    let forged = |pid: i32| {
        let session = graph.blocker(pid).and_then(|b| b.session.clone()).unwrap();
        lockjam::policy::Decision {
            rule: "forged".into(),
            action: Action::CancelBlockers,
            signal: lockjam::policy::Signal::Cancel,
            signalled: lockjam::policy::Identity::of(&session),
            signalled_session: Some(session),
            waiter: waiter.clone(),
            roots: Vec::new(),
            sampled_at: graph.taken_at,
            in_recovery: graph.in_recovery,
            verdict: lockjam::policy::Verdict::Send,
            reason: "forged".into(),
        }
    };
    let victim = enforcer.signal(&forged(web_pid)).await;
    assert_eq!(victim.outcome, Outcome::NotBlocking, "{victim:?}");
    assert!(!web.is_finished(), "the web UPDATE still waits, uncancelled");
    let root = enforcer.signal(&forged(mailer_pid)).await;
    assert_eq!(root.outcome, Outcome::Success, "{root:?}");
    let error = within("the mailer", mailer).await.unwrap().unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED));
    within("the web UPDATE", web)
        .await
        .unwrap()
        .expect("the victim succeeds");
    within("the migration", migration)
        .await
        .unwrap()
        .expect("the migration succeeds");
    env.stop().await;
}

/// Pid reuse cannot be staged on demand: the statement is run with a stale
/// backend_start against a live pid that still blocks, and signals nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_backend_start_on_a_live_pid_signals_nothing() {
    let mut s = staged(DROP_CONSTRAINT).await;
    let mut stale = s.decision.clone();
    stale.signalled.backend_start = stale.signalled.backend_start.map(|t| t - Duration::from_secs(3600));
    let outcome = s.enforcer.signal(&stale).await.outcome;
    assert_eq!(outcome, Outcome::Gone);
    let mut other_transaction = s.decision.clone();
    other_transaction.signalled.xact_start = other_transaction
        .signalled
        .xact_start
        .map(|t| t - Duration::from_secs(1));
    assert_eq!(s.enforcer.signal(&other_transaction).await.outcome, Outcome::Gone);
    assert!(!s.alter.is_finished(), "the ALTER still waits: nothing was signalled");
    assert_eq!(
        state_of(&s.env, s.reader_pid).await.as_deref(),
        Some("idle in transaction")
    );
    // The decision as made still goes through.
    assert_eq!(s.enforcer.signal(&s.decision).await.outcome, Outcome::Success);
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
            .env("LOCKJAM__INCIDENTS__PATH", "")
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

/// The leader's backend stops (SIGSTOP) while a queue forms: the target
/// keeps sampling, the instance stops calling itself the leader within a
/// few seconds, and no decision is carried out late. Once the backend
/// resumes and the old session is gone, the instance leads again and acts
/// on a fresh sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_leader_session_neither_freezes_sampling_nor_acts_late() {
    let env = TestEnv::start_full(ClusterOptions::default(), acting(unblock(1))).await;
    env.wait_for_metrics("the leader", |m| m.value("lockjam_policy_leader", &[]) == Some(1.0))
        .await;
    let leader_pid: i32 = env
        .admin
        .query_one(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND objid = ($1::int8 & 4294967295)::oid AND classid = ($1::int8 >> 32)::oid",
            &[&lockjam::enforcer::LEADER_LOCK_KEY],
        )
        .await
        .unwrap()
        .get(0);
    let signal = |name: &str| {
        let sent = std::process::Command::new("kill")
            .args([name, &leader_pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {name}");
    };
    signal("-STOP");
    let (reader_pid, read, _, alter) = migration_behind_long_read(&env).await;
    let stalled = env
        .wait_for_metrics("the instance to stop leading", |m| {
            m.value("lockjam_policy_leader", &[]) == Some(0.0)
                && m.value("lockjam_lock_waiters", &[("mode", "AccessExclusiveLock")]) == Some(1.0)
        })
        .await;
    let sampled_at = stalled.value("lockjam_last_sample_timestamp_seconds", &[]).unwrap();
    env.wait_for_metrics("sampling to go on", |m| {
        m.value("lockjam_last_sample_timestamp_seconds", &[]).unwrap() > sampled_at + 2.0
    })
    .await;
    assert_eq!(
        state_of(&env, reader_pid).await.as_deref(),
        Some("active"),
        "nothing signalled yet"
    );
    signal("-CONT");
    within("the ALTER, once an instance leads again", alter)
        .await
        .unwrap()
        .expect("the ALTER succeeds");
    assert!(within("the read", read).await.unwrap().is_err());
    // The cancel takes effect before lockjam records it.
    env.wait_for_event("the signal", |e| e["outcome"] == "success").await;
    let events = env.events().await;
    let signals: Vec<&Value> = events.iter().filter(|e| e["outcome"] == "success").collect();
    assert_eq!(signals.len(), 1, "{events:#?}");
    let age = |e: &Value, field: &str| {
        humantime::parse_rfc3339(e[field].as_str().unwrap())
            .unwrap()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let late = age(signals[0], "time") - age(signals[0], "sampled_at");
    assert!(late < 1.0, "carried out {late:.1}s after its sample");
    env.stop().await;
}
