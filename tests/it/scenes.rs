//! Incident scenes staged with real sessions, shared by the tests that
//! watch them (`incidents`) and those that clear them (`policy`).

use std::time::Duration;

use lockjam::analysis::analyze;
use lockjam::enforcer::Enforcer;
use lockjam::policy::{decide, Decision, Memory, Policy, Rule, Signal};
use lockjam::sampler::Sampler;

use crate::support::{backend_pid, sampler_config, session_settings, Statement, TestEnv};

pub use lockjam::staging::{DROP_CONSTRAINT, LONG_READ};

/// `orders` with the foreign key incident 000's migration drops.
pub fn orders() -> String {
    lockjam::staging::orders_schema(1000)
}

/// Incident 000: a long read holds ACCESS SHARE on `orders` and the
/// migration waits behind it. Returns (reader pid, read, migration pid,
/// migration).
pub async fn migration_behind_long_read(env: &TestEnv) -> (i32, Statement, i32, Statement) {
    env.admin.batch_execute(&orders()).await.unwrap();
    let (reader_pid, read) = env.spawn_statement("analyst", LONG_READ).await;
    env.wait_until_holding(reader_pid, "orders", None).await;
    let (migration_pid, migration) = env.spawn_statement("migrate", DROP_CONSTRAINT).await;
    env.wait_until_waiting(migration_pid).await;
    (reader_pid, read, migration_pid, migration)
}

/// Incident 002: a mailer's long transaction holds ROW EXCLUSIVE on
/// `users`, and `ADD FOREIGN KEY ... REFERENCES users` waits behind it for
/// SHARE ROW EXCLUSIVE. Returns (mailer pid, mailer, migration pid,
/// migration).
pub async fn foreign_key_behind_mailer(env: &TestEnv) -> (i32, Statement, i32, Statement) {
    env.admin
        .batch_execute(
            "CREATE TABLE users (id bigint PRIMARY KEY, email text, last_mailed_at timestamptz);
             INSERT INTO users SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 1000) AS g;
             CREATE TABLE user_messages (id bigint PRIMARY KEY, user_id bigint);",
        )
        .await
        .unwrap();
    // The mailer updates rows the test's writers never touch, so that
    // writers queue only for the table lock.
    let (mailer_pid, mail) = env
        .spawn_statement(
            "mailer",
            "BEGIN; UPDATE users SET last_mailed_at = now() WHERE id > 900; SELECT pg_sleep(600); COMMIT",
        )
        .await;
    env.wait_until_holding(mailer_pid, "users", Some("RowExclusiveLock"))
        .await;
    let (migration_pid, add_fk) = env
        .spawn_statement(
            "migrate",
            "ALTER TABLE user_messages ADD CONSTRAINT user_messages_user_id_fkey FOREIGN KEY (user_id) REFERENCES users",
        )
        .await;
    env.wait_until_waiting(migration_pid).await;
    (mailer_pid, mail, migration_pid, add_fk)
}

/// Incident 003: an analytics report reads `payment_events`; a migration
/// with `lock_timeout` renames a foreign-key constraint of it (ACCESS
/// EXCLUSIVE) and waits. Returns the report's pid and statement, and the
/// migration's.
pub async fn constraint_rename_behind_analytics(
    env: &TestEnv,
    lock_timeout: Duration,
) -> (i32, Statement, i32, Statement) {
    env.admin
        .batch_execute(
            "CREATE TABLE payments (id bigint PRIMARY KEY);
             CREATE TABLE payment_events (id bigint PRIMARY KEY,
                 payment_id bigint CONSTRAINT old_events_payment_id_fkey REFERENCES payments);",
        )
        .await
        .unwrap();
    let (analytics_pid, report) = env
        .spawn_statement(
            "analytics",
            "SELECT pg_sleep(600), count(*) FROM payment_events JOIN payments ON payments.id = payment_id",
        )
        .await;
    env.wait_until_holding(analytics_pid, "payment_events", None).await;
    let rename_sql = format!(
        "SET lock_timeout = '{}ms';
         ALTER TABLE payment_events RENAME CONSTRAINT old_events_payment_id_fkey TO payment_events_payment_id_fkey",
        lock_timeout.as_millis()
    );
    let (migration_pid, rename) = env.spawn_statement("migrate", &rename_sql).await;
    env.wait_until_waiting(migration_pid).await;
    (analytics_pid, report, migration_pid, rename)
}

/// The enforcer on its own, against a decision made on a real sample, so
/// that the world can change between decision and signal.
pub struct Staged {
    pub env: TestEnv,
    pub enforcer: Enforcer,
    pub decision: Decision,
    pub reader: tokio_postgres::Client,
    pub reader_pid: i32,
    pub alter: Statement,
}

/// Incident 000 with the read in an open transaction: `orders` created,
/// the reader's session `analyst` (left in the test's hands) and its pid,
/// then the migration's pid and statement, once it waits.
pub async fn read_in_transaction(env: &TestEnv, migration_sql: &str) -> (tokio_postgres::Client, i32, i32, Statement) {
    env.admin.batch_execute(&orders()).await.unwrap();
    let reader = env.session("analyst").await;
    let reader_pid = backend_pid(&reader).await;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM orders")
        .await
        .unwrap();
    let (migration_pid, migration) = env.spawn_statement("migrate", migration_sql).await;
    env.wait_until_waiting(migration_pid).await;
    (reader, reader_pid, migration_pid, migration)
}

/// Incident 000 staged with the read in an open transaction (the reader's
/// client stays in the test's hands), and one decision to cancel it.
pub async fn staged(migration_sql: &str) -> Staged {
    let env = TestEnv::start().await;
    let (reader, reader_pid, _, alter) = read_in_transaction(&env, migration_sql).await;
    let target = env.target();
    let mut sampler = Sampler::new(&target, &sampler_config()).unwrap();
    let graph = analyze(&sampler.sample().await.unwrap());
    let rule = Rule {
        terminate_after: Some(Duration::ZERO),
        ..Rule::unblock_migrations(Duration::ZERO)
    };
    // The read is idle in transaction: the policy terminates it; the races
    // are the same for a cancel, which leaves the session to look at.
    let mut decisions = decide(&graph, &Policy::acting(vec![rule]), &Memory::default(), graph.taken_at).decisions;
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    let mut decision = decisions.remove(0);
    decision.signal = Signal::Cancel;
    assert_eq!(decision.signalled.pid, reader_pid);
    let mut enforcer = Enforcer::new(&target, session_settings()).unwrap();
    assert!(enforcer.lead().await, "the only instance leads");
    Staged {
        env,
        enforcer,
        decision,
        reader,
        reader_pid,
        alter,
    }
}
