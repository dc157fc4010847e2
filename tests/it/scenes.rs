//! Incident scenes staged with real sessions, shared by the tests that
//! watch them (`incidents`) and those that clear them (`policy`).

use crate::support::{Statement, TestEnv};

/// `orders` with the foreign key incident 000's migration drops.
pub const ORDERS: &str = "CREATE TABLE customers (id bigint PRIMARY KEY);
     CREATE TABLE orders (id bigint PRIMARY KEY,
         customer_id bigint CONSTRAINT orders_customer_id_fkey REFERENCES customers);
     INSERT INTO customers SELECT generate_series(1, 100);
     INSERT INTO orders SELECT g, 1 + g % 100 FROM generate_series(1, 1000) AS g;";
pub const LONG_READ: &str = "SELECT pg_sleep(600), count(*) FROM orders";
pub const DROP_CONSTRAINT: &str = "ALTER TABLE orders DROP CONSTRAINT orders_customer_id_fkey";

/// Incident 000: a long read holds ACCESS SHARE on `orders` and the
/// migration waits behind it. Returns (reader pid, read, migration pid,
/// migration).
pub async fn migration_behind_long_read(env: &TestEnv) -> (i32, Statement, i32, Statement) {
    env.admin.batch_execute(ORDERS).await.unwrap();
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
