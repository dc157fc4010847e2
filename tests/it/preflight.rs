//! `lockjam preflight` and `/api/v1/preflight` on real sessions: what a
//! deploy pipeline asks before its migration, and the Django migration
//! gated by it (`tests/gate/django-migrate.sh`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::scenes::{orders, LONG_READ};
use crate::support::{apply_lockjam_role_sql, backend_pid, connect, http_get, lockjam, wait_until, within, TestEnv};

/// `lockjam preflight` with `args`: exit code, stdout, stderr.
fn preflight(args: &[&str]) -> (i32, String, String) {
    let output = lockjam().arg("preflight").args(args).output().expect("lockjam runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_says_clear_or_names_what_blocks() {
    let env = TestEnv::start().await;
    env.admin.batch_execute(&orders()).await.unwrap();
    let app = env.cluster.dsn("app");
    let ask = |extra: &[&str]| {
        let mut args = vec!["--dsn", app.as_str()];
        args.extend_from_slice(extra);
        preflight(&args)
    };

    // Nothing on the table: clear.
    let (code, out, err) = ask(&["--relation", "public.orders"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        "AccessExclusiveLock public.orders in database app: clear (0 session(s) use it now)\nclear\n"
    );

    // A long read: not clear, naming it.
    let (reader_pid, read) = env.spawn_statement("analyst", LONG_READ).await;
    env.wait_until_holding(reader_pid, "orders", None).await;
    let (code, out, _) = ask(&["--relation", "orders"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("AccessExclusiveLock public.orders in database app: NOT CLEAR (1 session(s) use it now)\n"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "  holds AccessShareLock: pid {reader_pid} postgres@app analyst · active · transaction "
        )),
        "{out}"
    );
    assert!(out.contains(LONG_READ) && out.ends_with("not clear\n"), "{out}");
    // A holder of another relation only: clear for this one.
    let (code, out, _) = ask(&["--relation", "public.customers"]);
    assert_eq!(code, 0, "{out}");
    // A weaker lock that does not conflict: clear, with the reader counted.
    let (code, out, _) = ask(&["--relation", "public.orders", "--mode", "RowExclusiveLock"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("clear (1 session(s) use it now)"), "{out}");

    // A session already waiting: a read asks for nothing that conflicts
    // with the holder, but would queue behind the waiting ALTER.
    let (alter_pid, alter) = env
        .spawn_statement("migrate", "ALTER TABLE orders ADD COLUMN note text")
        .await;
    env.wait_until_waiting(alter_pid).await;
    let (code, out, _) = ask(&["--relation", "public.orders", "--mode", "AccessShareLock"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "  already waits for AccessExclusiveLock: pid {alter_pid} postgres@app migrate · active"
        )),
        "{out}"
    );
    let owner = connect(&app, "fixture").await;
    owner
        .query_one("SELECT pg_cancel_backend($1)", &[&reader_pid])
        .await
        .unwrap();
    within("the read", read).await.unwrap().unwrap_err();
    within("the ALTER", alter).await.unwrap().unwrap();

    // Idle in transaction, holding the table: not clear.
    let holder = env.session("worker").await;
    let holder_pid = backend_pid(&holder).await;
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM orders")
        .await
        .unwrap();
    let (code, out, _) = ask(&["--relation", "public.orders", "--json"]);
    assert_eq!(code, 1, "{out}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["clear"], false);
    let conflicting = &answer["relations"][0]["conflicting"];
    assert_eq!(conflicting.as_array().unwrap().len(), 1, "{answer:#}");
    assert_eq!(conflicting[0]["pid"], holder_pid);
    assert_eq!(conflicting[0]["state"], "idle in transaction");
    assert_eq!(conflicting[0]["mode"], "AccessShareLock");
    // The shipped least-privilege role (pg_monitor only) sees the same.
    apply_lockjam_role_sql(&env.cluster, false);
    let least = format!(
        "host=127.0.0.1 port={} user=lockjam dbname=app sslmode=disable",
        env.cluster.port()
    );
    let (code, out, err) = preflight(&["--dsn", &least, "--relation", "public.orders", "--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let seen: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(seen["relations"][0]["conflicting"][0]["pid"], holder_pid);
    assert_eq!(
        seen["relations"][0]["conflicting"][0]["query"],
        "BEGIN; SELECT count(*) FROM orders"
    );
    // A table in a schema the role has no USAGE on (a new schema grants
    // none): found all the same, through the catalogs pg_monitor reads.
    env.admin
        .batch_execute("CREATE SCHEMA sales; CREATE TABLE sales.items (id int)")
        .await
        .unwrap();
    let (code, out, err) = preflight(&["--dsn", &least, "--relation", "sales.items"]);
    assert_eq!(
        (code, out.as_str()),
        (
            0,
            "AccessExclusiveLock sales.items in database app: clear (0 session(s) use it now)\nclear\n"
        ),
        "{err}"
    );
    holder.batch_execute("COMMIT").await.unwrap();

    // A lock on a partition blocks an ALTER of its parent, which locks
    // every partition: named, with the partition it is on.
    env.admin
        .batch_execute(
            "CREATE TABLE events (id int, at date) PARTITION BY RANGE (at);
             CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');",
        )
        .await
        .unwrap();
    let partition_reader = env.session("report").await;
    let partition_pid = backend_pid(&partition_reader).await;
    partition_reader
        .batch_execute("BEGIN; SELECT count(*) FROM events_2026")
        .await
        .unwrap();
    let (code, out, _) = ask(&["--relation", "public.events"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "  holds AccessShareLock on partition public.events_2026: pid {partition_pid} postgres@app report"
        )),
        "{out}"
    );
    partition_reader.batch_execute("COMMIT").await.unwrap();

    // A waiter whose request does not conflict stands in no one's way: a
    // writer holds the table, CREATE INDEX waits for SHARE; a ROW SHARE
    // lock (SELECT ... FOR UPDATE) is granted at once.
    let writer = env.session("writer").await;
    writer
        .batch_execute("BEGIN; UPDATE orders SET total = total WHERE id = 1")
        .await
        .unwrap();
    let (index_pid, _index) = env.spawn_statement("migrate", "CREATE INDEX ON orders (total)").await;
    env.wait_until_waiting(index_pid).await;
    let (code, out, _) = ask(&["--relation", "public.orders", "--mode", "RowShareLock"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = ask(&["--relation", "public.orders", "--mode", "RowExclusiveLock"]);
    assert_eq!(
        code, 1,
        "a ROW EXCLUSIVE request queues behind the waiting SHARE:\n{out}"
    );
    assert!(
        out.contains(&format!("  already waits for ShareLock: pid {index_pid} ")),
        "{out}"
    );
    writer.batch_execute("COMMIT").await.unwrap();

    // A name with a capital outside A-Z is stored as written.
    env.admin.batch_execute("CREATE TABLE Ümlaut (id int)").await.unwrap();
    let (code, out, err) = ask(&["--relation", "Ümlaut"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("AccessExclusiveLock public.Ümlaut in database app: clear"),
        "{out}"
    );

    // An old transaction that has not touched the table: clear, unless
    // --max-transaction-age says it is too old.
    let old = env.session("report").await;
    let old_pid = backend_pid(&old).await;
    old.batch_execute("BEGIN; SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (code, out, _) = ask(&["--relation", "public.orders"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = ask(&["--relation", "public.orders", "--max-transaction-age", "1s"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "  transaction open longer than 1s: pid {old_pid} postgres@app report · idle in transaction · transaction "
        )),
        "{out}"
    );
    let (code, out, _) = ask(&["--relation", "public.orders", "--max-transaction-age", "1h"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no transaction open longer than 3600s"), "{out}");
    old.batch_execute("COMMIT").await.unwrap();

    // Unknown, ambiguous and malformed: exit 2 naming the problem.
    let (code, _, err) = ask(&["--relation", "public.nope"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("relation \"public.nope\" does not exist in database \"app\""),
        "{err}"
    );
    env.admin
        .batch_execute("CREATE SCHEMA archive; CREATE TABLE archive.orders (id int)")
        .await
        .unwrap();
    let (code, _, err) = ask(&["--relation", "orders"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("is ambiguous in database \"app\": archive.orders, public.orders"),
        "{err}"
    );
    let (code, _, err) = ask(&["--relation", "public.orders", "--mode", "AccessExclusive"]);
    assert_eq!(code, 2);
    assert!(err.contains("\"AccessExclusive\" is not a lock mode"), "{err}");
    let (code, _, err) = preflight(&["--dsn", "host=127.0.0.1 port=1 dbname=app", "--relation", "orders"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("lockjam: error: "), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_waits_until_clear_or_gives_up() {
    let env = TestEnv::start().await;
    env.admin.batch_execute(&orders()).await.unwrap();
    let app = env.cluster.dsn("app");
    let holder = env.session("worker").await;
    let holder_pid = backend_pid(&holder).await;
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM orders")
        .await
        .unwrap();

    // Gives up after --wait, still not clear.
    let started = Instant::now();
    let (code, out, err) = preflight(&["--dsn", &app, "--relation", "public.orders", "--wait", "2s"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(
        err,
        format!("waiting: pid {holder_pid} holds AccessShareLock on public.orders\n")
    );
    assert!(out.ends_with("not clear\n"), "{out}");

    // Returns 0 once the holder commits.
    let waiting = lockjam()
        .args([
            "preflight",
            "--dsn",
            &app,
            "--relation",
            "public.orders",
            "--wait",
            "60s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    let output = tokio::task::spawn_blocking(move || waiting.wait_with_output().unwrap())
        .await
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert_eq!(output.status.code(), Some(0), "{out}{err}");
    assert!(
        err.contains(&format!("waiting: pid {holder_pid} holds AccessShareLock")),
        "{err}"
    );
    assert!(out.ends_with("\nclear\n"), "{out}");
}

/// The answer from a running lockjam, which watches the server through
/// database `postgres`: the relation named with its database, as a
/// pipeline without database credentials asks, and the CLI's answer to the
/// same question.
#[tokio::test(flavor = "multi_thread")]
async fn the_http_answer_agrees_with_the_command_across_databases() {
    let env = TestEnv::start().await;
    let postgres = connect(&env.cluster.dsn("postgres"), "fixture").await;
    postgres.batch_execute("CREATE DATABASE shop").await.unwrap();
    let shop = connect(&env.cluster.dsn("shop"), "fixture").await;
    shop.batch_execute(&orders()).await.unwrap();
    let watched = env.cluster.dsn("postgres");
    let addr = env.addr();
    let path = "/api/v1/preflight?target=it&relation=shop.public.orders&mode=AccessExclusiveLock";

    let (status, body) = http_get(addr, path).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["clear"], true, "{answer:#}");
    assert_eq!(answer["relations"][0]["database"], "shop");
    assert_eq!(answer["relations"][0]["relation"], "public.orders");
    let (code, _, _) = preflight(&["--dsn", &watched, "--relation", "shop.public.orders"]);
    assert_eq!(code, 0);
    let (code, _, _) = preflight(&["--dsn", &watched, "--database", "shop", "--relation", "orders"]);
    assert_eq!(code, 0);

    let reader = connect(&env.cluster.dsn("shop"), "analyst").await;
    let reader_pid = backend_pid(&reader).await;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM orders")
        .await
        .unwrap();
    let (status, body) = http_get(addr, path).await;
    assert_eq!(status, 200, "{body}");
    let over_http: Value = serde_json::from_str(&body).unwrap();
    let (code, out, _) = preflight(&["--dsn", &watched, "--relation", "shop.public.orders", "--json"]);
    assert_eq!(code, 1);
    let from_cli: Value = serde_json::from_str(&out).unwrap();
    for answer in [&over_http, &from_cli] {
        assert_eq!(answer["clear"], false, "{answer:#}");
        let conflicting = &answer["relations"][0]["conflicting"];
        assert_eq!(conflicting.as_array().unwrap().len(), 1, "{answer:#}");
        assert_eq!(conflicting[0]["pid"], reader_pid);
        assert_eq!(conflicting[0]["mode"], "AccessShareLock");
        assert_eq!(conflicting[0]["application_name"], "analyst");
        assert_eq!(answer["relations"][0]["sessions_using"], 1);
    }
    // Everything but the clock agrees.
    let strip = |mut answer: Value| {
        answer["checked_at"] = Value::Null;
        answer["relations"][0]["conflicting"][0]["transaction_age_seconds"] = Value::Null;
        answer
    };
    assert_eq!(strip(over_http), strip(from_cli));

    // Bad questions: 400 naming the problem; an unknown target: 404.
    for (path, status, message) in [
        (
            "/api/v1/preflight?relation=shop.public.nope",
            400,
            "relation \"shop.public.nope\" does not exist in database \"shop\"",
        ),
        (
            "/api/v1/preflight?relation=orders&mode=Exclusive",
            400,
            "\"Exclusive\" is not a lock mode",
        ),
        ("/api/v1/preflight", 400, "name at least one relation"),
        (
            "/api/v1/preflight?relation=a&colour=red",
            400,
            "unknown parameter \"colour\"",
        ),
        (
            "/api/v1/preflight?relation=a&max_transaction_age=soon",
            400,
            "max_transaction_age: ",
        ),
        (
            "/api/v1/preflight?target=other&relation=a",
            404,
            "no target named \"other\"",
        ),
    ] {
        let (got, body) = http_get(addr, path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(body.contains(message), "{path}: {body}");
    }
    reader.batch_execute("COMMIT").await.unwrap();
    let (status, body) = http_get(addr, path).await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()["clear"].clone()),
        (200, Value::Bool(true))
    );
}

/// The Django migration behind `tests/gate/django-migrate.sh` runs only
/// once preflight says clear; with the table held past `WAIT`, it never
/// runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_django_migration_gated_by_preflight_runs_only_once_clear() {
    let env = TestEnv::start().await;
    env.admin
        .batch_execute(
            "CREATE TABLE app_user (id bigint PRIMARY KEY, email text);
             INSERT INTO app_user SELECT g, 'u' || g FROM generate_series(1, 100) AS g;",
        )
        .await
        .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gate/django-migrate.sh");
    let dsn = env.cluster.dsn("app");
    let gate = move |wait: &str| {
        Command::new(script)
            .env("LOCKJAM", env!("CARGO_BIN_EXE_lockjam"))
            .env("DATABASE_DSN", &dsn)
            .env("WAIT", wait)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let migrated = || async {
        env.admin
            .query_one("SELECT pg_catalog.to_regclass('public.app_invite') IS NOT NULL", &[])
            .await
            .unwrap()
            .get::<_, bool>(0)
    };
    // A web request's write, in a transaction left open: ROW EXCLUSIVE,
    // which the foreign key's SHARE ROW EXCLUSIVE conflicts with.
    let writer = env.session("web").await;
    let writer_pid = backend_pid(&writer).await;
    writer
        .batch_execute("BEGIN; UPDATE app_user SET email = email WHERE id = 1")
        .await
        .unwrap();

    let stopped = gate("2s");
    let output = tokio::task::spawn_blocking(move || stopped.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "the deploy stops");
    assert!(!migrated().await, "the migration never started");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains(&format!(
            "waiting: pid {writer_pid} holds RowExclusiveLock on public.app_user"
        )),
        "{err}"
    );

    let waiting = gate("60s");
    wait_until("the gate to ask once", || async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        true
    })
    .await;
    assert!(!migrated().await, "not before the write commits");
    writer.batch_execute("COMMIT").await.unwrap();
    let output = tokio::task::spawn_blocking(move || waiting.wait_with_output().unwrap())
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(out.ends_with("clear\nmigrated\n"), "{out}");
    assert!(migrated().await);
}

/// A prepared transaction (two-phase commit, as a transaction manager
/// leaves one it lost track of) holds its locks with no session, so
/// PostgreSQL names it pid 0: preflight names it by its gid, written as
/// the literal `ROLLBACK PREPARED` takes (here with a quote and a line
/// break in it), with its owner and age; `lockjam tree` shows it as the
/// root of the migration's queue and what ends it.
#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_transaction_is_named_by_its_gid_and_its_cure() {
    let env = TestEnv::start().await;
    env.admin.batch_execute(&orders()).await.unwrap();
    let payments = env.session("payments").await;
    payments
        .batch_execute("BEGIN; UPDATE orders SET total = total WHERE id = 1")
        .await
        .unwrap();
    payments
        .batch_execute("PREPARE TRANSACTION E'pay''42\\nretry'")
        .await
        .unwrap();
    apply_lockjam_role_sql(&env.cluster, false);
    let least = format!(
        "host=127.0.0.1 port={} user=lockjam dbname=app sslmode=disable",
        env.cluster.port()
    );

    let (code, text, err) = preflight(&["--dsn", &least, "--relation", "public.orders"]);
    assert_eq!(code, 1, "{text}{err}");
    assert!(
        text.contains(
            "  holds RowExclusiveLock: prepared transaction E'pay''42\\u000Aretry' by postgres@app · prepared "
        ),
        "{text}"
    );
    assert!(
        text.contains(" ago, no session to cancel: end it with COMMIT PREPARED or ROLLBACK PREPARED\n"),
        "{text}"
    );
    let (code, out, _) = preflight(&["--dsn", &least, "--relation", "public.orders", "--json"]);
    assert_eq!(code, 1, "{out}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    let holder = &answer["relations"][0]["conflicting"][0];
    assert_eq!(
        answer["relations"][0]["conflicting"].as_array().unwrap().len(),
        1,
        "{answer:#}"
    );
    assert_eq!(
        (
            &holder["pid"],
            &holder["prepared_gid"],
            &holder["usename"],
            &holder["state"],
            &holder["mode"]
        ),
        (
            &Value::from(0),
            &Value::from("pay'42\nretry"),
            &Value::from("postgres"),
            &Value::from("prepared"),
            &Value::from("RowExclusiveLock")
        )
    );
    assert!(holder["transaction_age_seconds"].as_f64().unwrap() >= 0.0, "{holder}");

    // The migration queues behind it: the tree's root is pid 0, said as
    // what it is.
    let (alter_pid, alter) = env
        .spawn_statement("migrate", "ALTER TABLE orders ADD COLUMN note text")
        .await;
    env.wait_until_waiting(alter_pid).await;
    let output = lockjam()
        .args(["tree", "--dsn", &least])
        .output()
        .expect("lockjam runs");
    let tree = String::from_utf8(output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(0), "{tree}");
    assert!(
        tree.contains(&format!("    ROOT {}\n", lockjam::tree::PREPARED_ROOT)),
        "{tree}"
    );
    assert!(
        tree.contains(&format!(
            "    └─ pid {alter_pid} postgres@app migrate from 127.0.0.1 · waits "
        )),
        "{tree}"
    );

    // Ended as the line says, with the literal as printed: the migration
    // runs, and the way is clear.
    let literal = text
        .split("prepared transaction ")
        .nth(1)
        .and_then(|rest| rest.split(" by ").next())
        .unwrap();
    env.admin
        .batch_execute(&format!("ROLLBACK PREPARED {literal}"))
        .await
        .unwrap();
    within("the ALTER", alter).await.unwrap().unwrap();
    let (code, out, _) = preflight(&["--dsn", &least, "--relation", "public.orders"]);
    assert_eq!(code, 0, "{out}");
}
