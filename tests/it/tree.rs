//! `lockjam tree` as a runbook runs it: the binary, a DSN, no running
//! service, on real sessions staging incidents 000 and 002, and on a calm
//! server and a dead one.

use serde_json::Value;

use crate::scenes::migration_behind_long_read;
use crate::support::{apply_lockjam_role_sql, lockjam, wait_until, TestEnv};

/// Runs `lockjam tree` with `args`; returns its exit code and stdout.
fn tree(args: &[&str]) -> (i32, String, String) {
    let output = lockjam().arg("tree").args(args).output().expect("lockjam runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).expect("UTF-8"),
        String::from_utf8(output.stderr).expect("UTF-8"),
    )
}

/// The line of `text` that contains `needle`, by position.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
}

/// The application's queries, alike, queued behind the migration.
const APP_QUERY: &str = "SELECT count(*) FROM orders WHERE customer_id = 1";

#[tokio::test(flavor = "multi_thread")]
async fn tree_shows_incident_000_root_first_and_groups_the_queue() {
    let env = TestEnv::start().await;
    let (reader_pid, _read, migration_pid, _migration) = migration_behind_long_read(&env).await;
    let mut queued = Vec::new();
    for _ in 0..4 {
        queued.push(env.spawn_statement("web", APP_QUERY).await.1);
    }
    let (hostile_pid, _hostile) = env
        .spawn_statement("hostile", "SELECT /* \u{1b}[2J */ count(*) FROM orders")
        .await;
    env.wait_until_waiting_count("web", 4).await;
    env.wait_until_waiting(hostile_pid).await;
    let dsn = env.cluster.dsn("postgres");

    let (code, out, err) = tree(&["--dsn", &dsn]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("target default · PostgreSQL "), "{out}");
    assert!(out.contains(" · policy off\n"), "{out}");
    let root = line_of(
        &out,
        &format!("ROOT pid {reader_pid} postgres@app analyst from 127.0.0.1 · active"),
    );
    let head = line_of(
        &out,
        &format!("└─ pid {migration_pid} postgres@app migrate from 127.0.0.1 · waits "),
    );
    let group = line_of(
        &out,
        &format!("└─ 4 × {APP_QUERY} from web (postgres) · AccessShareLock · waits "),
    );
    let hostile = line_of(
        &out,
        &format!("└─ pid {hostile_pid} postgres@app hostile from 127.0.0.1 · waits "),
    );
    assert!(root < head && head < group && head < hostile, "{out}");
    assert!(
        out.contains("database app · public.orders · AccessExclusiveLock wanted · 6 blocked, chain depth 2"),
        "{out}"
    );
    assert!(
        out.contains(" · holds AccessShareLock on public.orders · transaction "),
        "{out}"
    );
    // The head: how many wait behind it, and its transaction's age.
    let head_line = out.lines().nth(head).unwrap();
    assert!(head_line.contains(" · 5 behind · transaction "), "{head_line}");
    assert!(head_line.ends_with('s'), "{head_line}");
    assert!(out.contains("SELECT /* \\u{1b}[2J */ count(*) FROM orders"), "{out}");
    assert!(
        !out.contains('\u{1b}'),
        "no escape reaches the terminal, nor colours off a TTY:\n{out}"
    );
    // On a terminal (a pty from util-linux's `script`): colours, and still
    // nothing raw of what sessions send; NO_COLOR turns them off.
    let on_a_tty = |env: &str| {
        let program = lockjam().get_program().to_string_lossy().into_owned();
        let output = std::process::Command::new("script")
            .args(["-qec", &format!("{env} '{program}' tree --dsn '{dsn}'"), "/dev/null"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("script (util-linux) runs");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let coloured = on_a_tty("env -u NO_COLOR");
    assert!(coloured.contains("\u{1b}[1;31mROOT\u{1b}[0m pid "), "{coloured:?}");
    assert!(
        coloured.contains("SELECT /* \\u{1b}[2J */ count(*) FROM orders"),
        "{coloured:?}"
    );
    assert!(!coloured.contains("\u{1b}[2J"), "{coloured:?}");
    let plain = on_a_tty("env NO_COLOR=1");
    assert!(plain.contains("ROOT pid ") && !plain.contains('\u{1b}'), "{plain:?}");

    let (code, out, err) = tree(&["--dsn", &dsn, "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: Value = serde_json::from_str(&out).expect("JSON");
    let trees = json["targets"][0]["trees"].as_array().expect("trees");
    assert_eq!(trees.len(), 1, "{json:#}");
    let t = &trees[0];
    assert_eq!(t["relation"], "public.orders");
    assert_eq!(t["mode"], "AccessExclusiveLock");
    assert_eq!(t["blocked"], 6);
    assert_eq!(t["roots"].as_array().unwrap().len(), 1);
    assert_eq!(t["roots"][0]["pid"], reader_pid);
    assert_eq!(t["roots"][0]["holds"], "AccessShareLock");
    assert_eq!(t["waiter"]["pid"], migration_pid);
    let children = t["waiter"]["children"].as_array().unwrap();
    assert_eq!(children.len(), 2, "{children:#?}");
    assert_eq!(children[0]["kind"], "session");
    assert_eq!(children[0]["pid"], hostile_pid);
    assert_eq!(children[1]["kind"], "group");
    assert_eq!(children[1]["count"], 4);
    assert_eq!(children[1]["query"], APP_QUERY);
    assert_eq!(json["targets"][0]["policy"]["mode"], "off");
}

/// Incident 002 as its write-up tells it: the web request's UPDATE of the
/// mailer's row waits first, holding ROW EXCLUSIVE on `users`; the
/// migration then waits behind both. The victim sits between the root and
/// the migration.
#[tokio::test(flavor = "multi_thread")]
async fn tree_puts_a_victim_between_the_root_and_the_migration() {
    let env = TestEnv::start().await;
    env.admin
        .batch_execute(
            "CREATE TABLE users (id bigint PRIMARY KEY, email text, last_login timestamptz);
             INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 100) AS g;
             CREATE TABLE user_messages (id bigint PRIMARY KEY, user_id bigint);",
        )
        .await
        .unwrap();
    let (mailer_pid, _mailer) = env
        .spawn_transaction(
            "mailer",
            &[
                "UPDATE users SET last_login = now() WHERE id = 1",
                "SELECT pg_sleep(600)",
            ],
        )
        .await;
    env.wait_until_holding(mailer_pid, "users", Some("RowExclusiveLock"))
        .await;
    let (victim_pid, _victim) = env
        .spawn_statement("web", "UPDATE users SET email = email WHERE id = 1")
        .await;
    env.wait_until_waiting(victim_pid).await;
    let (migration_pid, _migration) = env
        .spawn_statement(
            "migrate",
            "ALTER TABLE user_messages ADD CONSTRAINT user_messages_user_id_fkey FOREIGN KEY (user_id) REFERENCES users",
        )
        .await;
    env.wait_until_waiting(migration_pid).await;
    for _ in 0..3 {
        env.spawn_statement("writer", "UPDATE users SET email = email WHERE id = 2")
            .await;
    }
    env.wait_until_waiting_count("writer", 3).await;

    // As a runbook runs it: the shipped role, pg_monitor only.
    apply_lockjam_role_sql(&env.cluster, false);
    let dsn = format!(
        "host=127.0.0.1 port={} user=lockjam dbname=postgres sslmode=disable",
        env.cluster.port()
    );
    let (code, out, err) = tree(&["--dsn", &dsn]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("warning:"), "{out}");
    assert!(
        out.contains("         SELECT pg_sleep(600)\n"),
        "the mailer's query, seen through pg_monitor:\n{out}"
    );
    let root = line_of(
        &out,
        &format!("ROOT pid {mailer_pid} postgres@app mailer from 127.0.0.1 · active"),
    );
    let victim = line_of(
        &out,
        &format!("└─ pid {victim_pid} postgres@app web from 127.0.0.1 · waits "),
    );
    let migration = line_of(
        &out,
        &format!("   └─ pid {migration_pid} postgres@app migrate from 127.0.0.1 · waits "),
    );
    let writers = line_of(
        &out,
        "└─ 3 × UPDATE users SET email = email WHERE id = 2 from writer (postgres)",
    );
    assert!(root < victim && victim < migration && migration < writers, "{out}");
    assert!(out.contains("· 5 blocked, chain depth 3"), "{out}");
    assert_eq!(out.matches("ROOT pid").count(), 1, "{out}");
    assert!(
        out.contains(" · holds ExclusiveLock on (transactionid) · "),
        "the row's transaction:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tree_on_a_calm_server_says_so_and_a_dead_one_fails() {
    let env = TestEnv::start().await;
    let dsn = env.cluster.dsn("postgres");
    let (code, out, err) = tree(&["--dsn", &dsn]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("target default · PostgreSQL "), "{out}");
    assert!(lines[1].starts_with("  calm: no session waits for a lock ("), "{out}");
    assert_eq!(lines[2], "");
    let json: Value = serde_json::from_str(&tree(&["--dsn", &dsn, "--json"]).1).expect("JSON");
    assert_eq!(json["targets"][0]["trees"], Value::Array(Vec::new()));
    assert_eq!(json["targets"][0]["up"], true);

    // --watch redraws every interval until Ctrl-C, then exits 0.
    let watch = lockjam()
        .args(["tree", "--dsn", &dsn, "--watch"])
        .env("LOCKJAM__SAMPLER__INTERVAL", "300ms")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    wait_until("three redraws", || async {
        started.elapsed() > std::time::Duration::from_millis(1500)
    })
    .await;
    nix_interrupt(watch.id());
    let output = watch.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    let out = String::from_utf8(output.stdout).unwrap();
    assert!(out.matches("target default · ").count() >= 3, "{out}");
    assert!(!out.contains('\u{1b}'), "no screen clearing off a TTY:\n{out}");

    // With the service's configuration, whose [server] files the operator
    // may not read: tree reads only the targets.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lockjam.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ntls_cert_file = \"/nonexistent/cert.pem\"\ntls_key_file = \"/nonexistent/key.pem\"\n\n\
             [[targets]]\nname = \"main\"\ndsn = \"{dsn}\"\n"
        ),
    )
    .unwrap();
    let (code, out, err) = tree(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("target main · PostgreSQL "), "{out}");

    // A server that is gone: exit 1, saying why, in the output.
    env.stop().await;
    let (code, out, _) = tree(&["--dsn", &dsn]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("  down: "), "{out}");
    // A DSN that cannot be parsed: exit 2.
    let (code, _, err) = tree(&["--dsn", "host=x port=notaport"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("port"), "{err}");
}

fn nix_interrupt(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Ten sessions queue for one advisory lock: PostgreSQL reports each as
/// blocked by everyone ahead of it. `lockjam tree` shows one queue, the
/// first in line with the other nine grouped under it, not a staircase.
#[tokio::test(flavor = "multi_thread")]
async fn one_queue_for_one_lock_is_grouped_not_a_staircase() {
    let env = TestEnv::start().await;
    let holder = env.session("holder").await;
    let holder_pid = crate::support::backend_pid(&holder).await;
    holder.batch_execute("SELECT pg_advisory_lock(42)").await.unwrap();
    let mut waiting = Vec::new();
    for _ in 0..10 {
        waiting.push(env.spawn_statement("worker", "SELECT pg_advisory_lock(42)").await);
        // In line one after the other, as PostgreSQL orders the queue.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    env.wait_until_waiting_count("worker", 10).await;
    let (code, out, err) = tree(&["--dsn", &env.cluster.dsn("postgres")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("ROOT pid").count(), 1, "{out}");
    assert!(
        out.contains(&format!("ROOT pid {holder_pid} postgres@app holder")),
        "{out}"
    );
    let first = waiting[0].0;
    let head = line_of(
        &out,
        &format!("└─ pid {first} postgres@app worker from 127.0.0.1 · waits "),
    );
    let group = line_of(
        &out,
        "   └─ 9 × SELECT pg_advisory_lock(42) from worker (postgres) · ExclusiveLock · waits ",
    );
    assert!(head < group, "{out}");
    assert!(out.contains("· 10 blocked, chain depth "), "{out}");
    assert!(out.lines().all(|l| l.len() < 220), "no staircase:\n{out}");
}
