//! No one else's code runs as lockjam: a database owner or a role setting
//! that puts a schema of hostile operators before `pg_catalog` in
//! `search_path` neither runs code as lockjam's role nor hides a lock
//! queue from it.

use std::time::Duration;

use lockjam::cluster::ClusterOptions;
use lockjam::policy::{Policy, Rule};
use lockjam::service::Service;
use tokio_postgres::error::SqlState;

use crate::support::{apply_lockjam_role_sql, config_with, connect, scrape, start_cluster, wait_until, within};

/// Operators `=` on integer, oid and text, in schema `public` of the
/// connected database, that record who called them in `public.pwned`
/// where the caller may write, cancel every session named `canary` where
/// the caller may signal (as lockjam's role may), and then answer as
/// `pg_catalog.=` would (or `false`, with `lie`).
fn hostile_operators(lie: bool) -> String {
    let answer = if lie { "false" } else { "$1 OPERATOR(pg_catalog.=) $2" };
    let mut sql = String::from(
        "CREATE TABLE public.pwned (who text, what text);
         GRANT INSERT ON public.pwned TO PUBLIC;",
    );
    for (name, kind) in [("int4", "integer"), ("oid", "oid"), ("text", "text")] {
        sql.push_str(&format!(
            "CREATE FUNCTION public.hostile_{name}_eq({kind}, {kind}) RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN
                 BEGIN
                     INSERT INTO public.pwned VALUES (current_user, '{name}');
                 EXCEPTION WHEN OTHERS THEN NULL;
                 END;
                 BEGIN
                     PERFORM pg_catalog.pg_cancel_backend(a.pid) FROM pg_catalog.pg_stat_activity AS a
                     WHERE a.application_name OPERATOR(pg_catalog.=) 'canary';
                 EXCEPTION WHEN OTHERS THEN NULL;
                 END;
                 RETURN {answer};
             END $$;
             CREATE OPERATOR public.= (LEFTARG = {kind}, RIGHTARG = {kind}, FUNCTION = public.hostile_{name}_eq);"
        ));
    }
    sql
}

/// A database owner with no other privilege puts `public` before
/// `pg_catalog` for everyone who connects to their database and defines
/// operators there. lockjam samples the queue in that database, resolves
/// its relation names there (and, with the target's DSN in it, runs every
/// statement there) and cancels the blocker: the trap, which does fire for
/// an ordinary session, never runs as lockjam, whose role may cancel the
/// `canary`, another role's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_owners_search_path_runs_no_code_as_lockjam() {
    let cluster = start_cluster(ClusterOptions::default()).await;
    apply_lockjam_role_sql(&cluster, true);
    let postgres = connect(&cluster.dsn("postgres"), "fixture").await;
    postgres
        .batch_execute("CREATE ROLE shop LOGIN; CREATE ROLE victim LOGIN")
        .await
        .unwrap();
    postgres.batch_execute("CREATE DATABASE shop OWNER shop").await.unwrap();
    let shop_dsn = |user: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=shop sslmode=disable",
            cluster.port()
        )
    };
    let owner = connect(&shop_dsn("shop"), "owner").await;
    owner
        .batch_execute("ALTER DATABASE shop SET search_path = public, pg_catalog")
        .await
        .unwrap();
    owner.batch_execute(&hostile_operators(false)).await.unwrap();
    owner
        .batch_execute("CREATE TABLE a (id int); CREATE TABLE b (id int)")
        .await
        .unwrap();
    // The trap is armed: an ordinary new session runs it.
    let ordinary = connect(&shop_dsn("shop"), "app").await;
    ordinary.batch_execute("SELECT 1 = 1").await.unwrap();
    let fired: i64 = owner.query_one("SELECT count(*) FROM pwned", &[]).await.unwrap().get(0);
    assert!(fired > 0, "the hostile operator runs for an ordinary session");
    owner.batch_execute("TRUNCATE pwned").await.unwrap();

    let canary = connect(&shop_dsn("victim"), "canary").await;
    let canary = tokio::spawn(async move { canary.simple_query("SELECT pg_catalog.pg_sleep(600)").await });

    for (table, database) in [("a", "postgres"), ("b", "shop")] {
        let dsn = format!(
            "host=127.0.0.1 port={} user=lockjam dbname={database} sslmode=disable",
            cluster.port()
        );
        let policy = Policy::acting(vec![Rule::unblock_migrations(Duration::from_secs(1))]);
        let service = Service::start(&config_with(vec![("shop", dsn)], policy)).await.unwrap();
        let reader = connect(&shop_dsn("shop"), "report").await;
        let read = tokio::spawn(async move {
            reader
                .simple_query(&format!(
                    "SELECT pg_sleep(600), count(*) FROM pg_catalog.pg_class, {table}"
                ))
                .await
        });
        wait_until("the read to hold its lock", || async {
            ordinary
                .query_one(
                    "SELECT count(*) FROM pg_catalog.pg_locks WHERE relation OPERATOR(pg_catalog.=) $1::text::regclass AND granted",
                    &[&table],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                > 0
        })
        .await;
        let migrate = connect(&shop_dsn("shop"), "migrate").await;
        let alter = tokio::spawn(async move {
            migrate
                .simple_query(&format!("ALTER TABLE {table} ADD COLUMN x int"))
                .await
        });
        within("the ALTER, freed by lockjam", alter)
            .await
            .unwrap()
            .expect("lockjam cancelled the read");
        let error = within("the read", read).await.unwrap().unwrap_err();
        assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED));
        service.stop().await;
        let pwned: Vec<String> = owner
            .query("SELECT what FROM pwned WHERE who OPERATOR(pg_catalog.=) 'lockjam'", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(
            pwned,
            Vec::<String>::new(),
            "code ran as lockjam (target in {database})"
        );
        assert!(!canary.is_finished(), "the canary was cancelled (target in {database})");
    }
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

/// `ALTER ROLE lockjam SET search_path = public, pg_catalog` with a
/// `public.=(text, text)` that always answers false would hide every lock
/// queue (lockjam looks for `wait_event_type = 'Lock'`). The queue shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_roles_search_path_cannot_hide_a_lock_queue() {
    let cluster = start_cluster(ClusterOptions::default()).await;
    apply_lockjam_role_sql(&cluster, false);
    let postgres = connect(&cluster.dsn("postgres"), "fixture").await;
    postgres
        .batch_execute("ALTER ROLE lockjam SET search_path = public, pg_catalog")
        .await
        .unwrap();
    postgres.batch_execute(&hostile_operators(true)).await.unwrap();
    postgres.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let dsn = format!(
        "host=127.0.0.1 port={} user=lockjam dbname=postgres sslmode=disable",
        cluster.port()
    );
    let service = Service::start(&config_with(vec![("role", dsn)], Policy::default()))
        .await
        .unwrap();
    let reader = connect(&cluster.dsn("postgres"), "report").await;
    let _read = tokio::spawn(async move { reader.simple_query("SELECT pg_sleep(600), count(*) FROM t").await });
    wait_until("the read to hold its lock", || async {
        postgres
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_locks WHERE relation OPERATOR(pg_catalog.=) 't'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            > 0
    })
    .await;
    let migrate = connect(&cluster.dsn("postgres"), "migrate").await;
    let _alter = tokio::spawn(async move { migrate.simple_query("ALTER TABLE t ADD COLUMN x int").await });
    // The reads must queue behind a waiting ALTER, not run before it.
    wait_until("the ALTER to wait", || async {
        postgres
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_locks WHERE relation OPERATOR(pg_catalog.=) 't'::regclass AND NOT granted",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            > 0
    })
    .await;
    let mut selects = Vec::new();
    for _ in 0..3 {
        let web = connect(&cluster.dsn("postgres"), "web").await;
        selects.push(tokio::spawn(
            async move { web.simple_query("SELECT count(*) FROM t").await },
        ));
    }
    let addr = service.local_addr();
    wait_until("lockjam to see the queue", || async {
        scrape(addr).await.value(
            "lockjam_lock_queue_depth",
            &[("relation", "public.t"), ("datname", "postgres")],
        ) == Some(3.0)
    })
    .await;
    let pwned: i64 = postgres
        .query_one(
            "SELECT count(*) FROM public.pwned WHERE who OPERATOR(pg_catalog.=) 'lockjam'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pwned, 0, "no code ran as lockjam");
    service.stop().await;
    postgres
        .batch_execute("SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE application_name OPERATOR(pg_catalog.=) 'report'")
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

/// A session that calls itself `lockjam` is no lockjam session: it blocks
/// a migration and is cancelled like any other root. lockjam knows its own
/// sessions by pid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_named_lockjam_is_not_protected() {
    let env = crate::support::TestEnv::start_full(
        ClusterOptions::default(),
        Policy::acting(vec![Rule::unblock_migrations(Duration::from_secs(1))]),
    )
    .await;
    env.admin.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let (impostor_pid, impostor) = env
        .spawn_statement("lockjam", "SELECT pg_sleep(600), count(*) FROM t")
        .await;
    env.wait_until_holding(impostor_pid, "t", None).await;
    let (_, alter) = env.spawn_statement("migrate", "ALTER TABLE t ADD COLUMN x int").await;
    within("the ALTER", alter).await.unwrap().expect("the ALTER succeeds");
    let error = within("the impostor", impostor).await.unwrap().unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED));
    let event = env.wait_for_event("the signal", |e| e["outcome"] == "success").await;
    assert_eq!(event["signalled_pid"], impostor_pid);
    assert_eq!(event["blocker"]["application_name"], "lockjam");
    env.stop().await;
}

/// A role named with a newline and a forged log record cannot forge a log
/// line: lockjam's warning that the role lacks pg_monitor names it, and
/// the text log writes each record on one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_named_with_a_newline_cannot_forge_a_log_line() {
    let env = crate::support::TestEnv::start().await;
    let forged = "2026-01-01T00:00:00.000000Z ERROR lockjam::service: forged";
    env.admin
        .batch_execute(&format!("CREATE ROLE \"watch\n{forged}\" LOGIN"))
        .await
        .unwrap();
    let dsn = format!(
        "host=127.0.0.1 port={} dbname=postgres sslmode=disable user='watch\n{forged}'",
        env.cluster.port()
    );
    let run = crate::support::LockjamRun::spawn(&["--dsn", &dsn]);
    wait_until("lockjam run to sample", || async {
        run.serving().await && scrape(run.addr).await.value("lockjam_up", &[]) == Some(1.0)
    })
    .await;
    let (_, log) = run.terminate();
    let warning: Vec<&str> = log.lines().filter(|l| l.contains("may not read other roles")).collect();
    assert_eq!(warning.len(), 1, "{log}");
    assert!(
        warning[0].contains("watch\\u{a}2026-01-01T00:00:00.000000Z ERROR"),
        "{}",
        warning[0]
    );
    assert!(
        !log.lines().any(|line| line.starts_with("2026-01-01T00:00:00.000000Z")),
        "a forged line: {log}"
    );
    env.stop().await;
}

/// A password typed in `--dsn` shows in `ps`: lockjam warns once, naming
/// the safer places, and never the password; in LOCKJAM_DSN it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_password_on_the_command_line_is_warned_about_once() {
    let env = crate::support::TestEnv::start().await;
    env.admin
        .batch_execute("CREATE ROLE watcher LOGIN PASSWORD 'Sup3r-Secret' IN ROLE pg_monitor")
        .await
        .unwrap();
    let dsn = format!(
        "host=127.0.0.1 port={} dbname=postgres sslmode=disable user=watcher password=Sup3r-Secret",
        env.cluster.port()
    );
    let warning = "the password in --dsn can be read by every user of this machine";
    for (args, variables, warned) in [
        (vec!["--dsn", dsn.as_str()], vec![], 1),
        (vec![], vec![("LOCKJAM_DSN", dsn.as_str())], 0),
    ] {
        let run = crate::support::LockjamRun::spawn_with_env(&args, &variables);
        wait_until("lockjam run to sample", || async {
            run.serving().await && scrape(run.addr).await.value("lockjam_up", &[]) == Some(1.0)
        })
        .await;
        let (_, log) = run.terminate();
        assert_eq!(log.matches(warning).count(), warned, "{log}");
        assert!(!log.contains("Sup3r-Secret"), "{log}");
    }
    env.stop().await;
}

/// A misspelt `PGSSLMODE` is refused (exit 2, naming the variable, the
/// value and the valid ones), never read as `prefer`: lockjam would have
/// connected in plaintext. Likewise a bad `PGPORT`.
#[test]
fn invalid_libpq_environment_is_refused_never_downgraded() {
    for (variable, value, expected) in [
        (
            "PGSSLMODE",
            "verify_full",
            "one of disable, allow, prefer, require, verify-ca, verify-full",
        ),
        (
            "PGSSLMODE",
            "VERIFY-FULL",
            "one of disable, allow, prefer, require, verify-ca, verify-full",
        ),
        (
            "PGSSLMODE",
            "verify-full ",
            "one of disable, allow, prefer, require, verify-ca, verify-full",
        ),
        ("PGPORT", "five", "a port number"),
    ] {
        for command in ["check-config", "run"] {
            let output = crate::support::lockjam()
                .args([command, "--dsn", "host=db.internal user=u password=Sup3r-Secret"])
                .env(variable, value)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(
                output.status.code(),
                Some(2),
                "{command} {variable}={value:?}: {stderr}"
            );
            assert!(
                stderr.contains(&format!(
                    "environment variable {variable} has invalid value `{value}`: expected {expected}"
                )),
                "{stderr}"
            );
            assert!(!stderr.contains("Sup3r-Secret"), "{stderr}");
        }
    }
}

/// `REVOKE pg_monitor` mid-run blinds lockjam to other roles' lock waits:
/// it notices at the next sample, warns as it does at start (log and the
/// snapshot's warnings), and says so again when the grant comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_pg_monitor_is_noticed_mid_run() {
    let env = crate::support::TestEnv::start().await;
    env.admin
        .batch_execute("CREATE ROLE watcher LOGIN IN ROLE pg_monitor; CREATE TABLE held (id int)")
        .await
        .unwrap();
    let dsn = format!(
        "host=127.0.0.1 port={} dbname=postgres sslmode=disable user=watcher",
        env.cluster.port()
    );
    let run = crate::support::LockjamRun::spawn(&["--dsn", &dsn]);
    let warnings = || async {
        let (status, body) = crate::support::http_get(run.addr, "/api/v1/snapshot").await;
        assert_eq!(status, 200, "{body}");
        let snapshot: serde_json::Value = serde_json::from_str(&body).unwrap();
        let target = &snapshot["targets"][0];
        (
            target["up"] == true,
            target["warnings"].as_array().cloned().unwrap_or_default(),
        )
    };
    wait_until("lockjam run to sample", || async {
        run.serving().await && warnings().await.0
    })
    .await;
    assert!(warnings().await.1.is_empty());
    // The superuser's lock queue is seen while the grant holds...
    let (holder, _) = env
        .spawn_transaction(
            "holder",
            &["LOCK TABLE held IN ACCESS EXCLUSIVE MODE", "SELECT pg_sleep(60)"],
        )
        .await;
    env.wait_until_holding(holder, "held", Some("AccessExclusiveLock"))
        .await;
    let (_waiter, _) = env.spawn_statement("waiter", "SELECT count(*) FROM held").await;
    let waiting = || async {
        let scrape = scrape(run.addr).await;
        scrape
            .matching("lockjam_lock_waiters", &[])
            .iter()
            .map(|(_, _, v)| v)
            .sum::<f64>()
    };
    wait_until("the waiter to be seen", || async { waiting().await == 1.0 }).await;

    env.admin.batch_execute("REVOKE pg_monitor FROM watcher").await.unwrap();
    wait_until("the revoke to be noticed", || async {
        warnings().await.1.iter().any(|w| {
            w.as_str()
                .is_some_and(|w| w.contains("role `watcher` may not read other roles' activity"))
        })
    })
    .await;
    env.admin.batch_execute("GRANT pg_monitor TO watcher").await.unwrap();
    wait_until("the grant to be noticed", || async { warnings().await.1.is_empty() }).await;
    wait_until("the waiter to be seen again", || async { waiting().await == 1.0 }).await;

    let (_, log) = run.terminate();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("may not read other roles' activity"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains("WARN"), "{}", warned[0]);
    assert!(warned[0].contains("GRANT pg_monitor TO"), "{}", warned[0]);
    assert_eq!(
        log.matches("role `watcher` may read other roles' activity again")
            .count(),
        1,
        "{log}"
    );
    env.stop().await;
}

/// A password in a query text never leaves lockjam: `ALTER ROLE ...
/// PASSWORD` statements queue on the role's catalog row behind a
/// transaction that changed it first (idle in transaction, its own
/// password in its query). The snapshot, the incident they make and its
/// log line show `PASSWORD '***'`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passwords_in_queries_are_redacted_everywhere_lockjam_shows_a_query() {
    let env = crate::support::TestEnv::start().await;
    env.admin.batch_execute("CREATE ROLE app_user LOGIN").await.unwrap();
    let first = env.session("rotate").await;
    first
        .batch_execute("BEGIN; ALTER ROLE app_user PASSWORD 'first-Secret-1'")
        .await
        .unwrap();
    let (second_pid, second) = env
        .spawn_statement("rotate", "ALTER ROLE app_user PASSWORD 'second-Secret-2'")
        .await;
    env.wait_until_waiting(second_pid).await;
    let (third_pid, third) = env
        .spawn_statement("rotate", "ALTER ROLE app_user PASSWORD 'third-Secret-3'")
        .await;
    env.wait_until_waiting(third_pid).await;
    let secrets = ["first-Secret-1", "second-Secret-2", "third-Secret-3"];
    let (_, snapshot) = crate::support::http_get(env.addr(), "/api/v1/snapshot").await;
    wait_until("both waiters in the snapshot", || async {
        let (_, body) = crate::support::http_get(env.addr(), "/api/v1/snapshot").await;
        body.contains(&second_pid.to_string()) && body.contains(&third_pid.to_string())
    })
    .await;
    let (_, body) = crate::support::http_get(env.addr(), "/api/v1/snapshot").await;
    for secret in secrets {
        assert!(
            !snapshot.contains(secret) && !body.contains(secret),
            "{secret} in {body}"
        );
    }
    assert!(body.contains("ALTER ROLE app_user PASSWORD '***'"), "{body}");
    // Past [incidents] min_wait, then the first transaction commits: the
    // waiters fail ("tuple concurrently updated") or go through.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    first.batch_execute("COMMIT").await.unwrap();
    let _ = within("the second", second).await;
    let _ = within("the third", third).await;
    let incident = env.the_one_incident().await;
    let text = incident.to_string();
    for secret in secrets {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert_eq!(incident["waiter"]["query"], "ALTER ROLE app_user PASSWORD '***'");
    assert_eq!(
        incident["roots"][0]["query"],
        "BEGIN; ALTER ROLE app_user PASSWORD '***'"
    );
    assert_eq!(incident["roots"][0]["state"], "idle in transaction");
    env.stop().await;
}
