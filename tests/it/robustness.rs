//! Faults and hostile input: names that break naive label writers, HTTP
//! abuse, a sample whose backend hangs.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use crate::support::{backend_pid, http_get, http_request, scrape, wait_until, within, LockjamRun, TestEnv};

/// Relation, user and application names are data: quotes, backslashes,
/// newlines and UTF-8 come out escaped in `/metrics` and intact in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_names_are_escaped_in_metrics_and_json() {
    let env = TestEnv::start().await;
    let table = "we\"ird\\ta\nble ü";
    let quoted = format!("\"{}\"", table.replace('"', "\"\""));
    env.admin
        .batch_execute(&format!("CREATE TABLE {quoted} (id int)"))
        .await
        .unwrap();
    // PostgreSQL keeps application_name to printable ASCII (it turns
    // anything else into '?'), so quotes and backslashes are what it can carry.
    let application = "app \"quoted\" \\ 'x'";
    let reader = env.session("reader").await;
    reader
        .batch_execute(&format!("BEGIN; LOCK TABLE {quoted} IN ACCESS SHARE MODE"))
        .await
        .unwrap();
    let migration = crate::support::connect(&env.cluster.dsn("app"), "migrate").await;
    let migration_pid = backend_pid(&migration).await;
    migration
        .batch_execute(&format!("SET application_name = '{}'", application.replace('\'', "''")))
        .await
        .unwrap();
    let alter_sql = format!("ALTER TABLE {quoted} ADD COLUMN x int");
    let _alter = tokio::spawn(async move { migration.simple_query(&alter_sql).await });
    env.wait_until_waiting(migration_pid).await;
    let (_, _queued) = env.spawn_statement("web", &format!("SELECT * FROM {quoted}")).await;
    env.wait_until_waiting_count("web", 1).await;

    let relation = format!("public.{table}");
    let scrape = env
        .wait_for_metrics("the queue on the oddly named table", |m| {
            m.value("lockjam_lock_queue_depth", &[("relation", &relation)]) == Some(1.0)
        })
        .await;
    let escaped = "relation=\"public.we\\\"ird\\\\ta\\nble ü\"";
    assert!(
        scrape.text.contains(escaped),
        "label escaped as the text format requires:\n{}",
        scrape.text
    );
    assert!(
        scrape
            .text
            .lines()
            .all(|l| l.starts_with('#') || l.starts_with("lockjam_") || l.is_empty()),
        "no line broken by a newline in a name:\n{}",
        scrape.text
    );
    let (_, body) = http_get(env.addr(), "/api/v1/snapshot").await;
    let snapshot: serde_json::Value = serde_json::from_str(&body).unwrap();
    let waiter = snapshot["targets"][0]["waiters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["pid"] == migration_pid)
        .unwrap()
        .clone();
    assert_eq!(waiter["relation"], relation);
    assert_eq!(waiter["application_name"], application);
    env.stop().await;
}

/// Unknown paths, wrong methods, an oversized header, idle connections and
/// 200 concurrent scrapes: right status codes, and correct answers after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_under_abuse_keeps_answering_correctly() {
    let env = TestEnv::start().await;
    env.wait_for_metrics("a first sample", |m| m.value("lockjam_up", &[]) == Some(1.0))
        .await;
    let addr = env.addr();
    for (request, status) in [
        ("GET /metrics/extra HTTP/1.1", 404),
        ("GET /api/v1 HTTP/1.1", 404),
        ("DELETE /api/v1/events HTTP/1.1", 405),
        ("PUT /healthz HTTP/1.1", 405),
    ] {
        let (got, _) = http_request(
            addr,
            &format!("{request}\r\nHost: lockjam\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(got, status, "{request}");
    }
    let (status, _) = http_request(
        addr,
        &format!(
            "GET /metrics HTTP/1.1\r\nHost: lockjam\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(1 << 20)
        ),
    )
    .await;
    assert_eq!(status, 431, "an oversized header is refused");

    // Slow clients: connections that send half a request and stall.
    let mut idle = Vec::new();
    for _ in 0..50 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /metr").await.unwrap();
        idle.push(stream);
    }
    let mut scrapes = JoinSet::new();
    for _ in 0..200 {
        scrapes.spawn(async move { scrape(addr).await });
    }
    let mut answered = 0;
    while let Some(result) = within("200 concurrent scrapes", scrapes.join_next()).await {
        let metrics = result.unwrap();
        assert_eq!(metrics.value("lockjam_up", &[]), Some(1.0));
        answered += 1;
    }
    assert_eq!(answered, 200);
    drop(idle);
    assert_eq!(http_get(addr, "/healthz").await, (200, "ok\n".to_string()));
    env.stop().await;
}

/// A sample whose backend stops (SIGSTOP) cannot be ended by
/// statement_timeout; the client-side deadline abandons it, the next sample
/// runs on a fresh session, and lockjam holds no more sessions than before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_sample_is_abandoned_and_sampling_resumes_on_a_fresh_session() {
    let env = TestEnv::start().await;
    env.wait_for_metrics("a first sample", |m| m.value("lockjam_up", &[]) == Some(1.0))
        .await;
    let lockjam_sessions = || async {
        let rows = env
            .admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'lockjam'",
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<i32>>()
    };
    let before = lockjam_sessions().await;
    assert_eq!(before.len(), 1, "one sampling session: {before:?}");
    let stopped = before[0];
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &stopped.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    // The abandoned sample is the one that took longer than any bucket
    // below its deadline; lockjam is down for one backoff step after it.
    let slow_samples = |m: &crate::support::Scrape| {
        let bucket = |le: &str| {
            m.value("lockjam_sample_duration_seconds_bucket", &[("le", le)])
                .unwrap_or(0.0)
        };
        bucket("+Inf") - bucket("2.5")
    };
    let down = env
        .wait_for_metrics("the hung sample to be abandoned", |m| slow_samples(m) == 1.0)
        .await;
    assert_eq!(down.value("lockjam_up", &[]), Some(0.0), "{}", down.text);
    let (status, readyz) = http_get(env.addr(), "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        readyz.contains("the sample took longer than 12s and was abandoned"),
        "{readyz}"
    );
    env.wait_for_metrics("sampling on a fresh session", |m| {
        m.value("lockjam_up", &[]) == Some(1.0)
    })
    .await;
    let during = lockjam_sessions().await;
    assert_eq!(
        during.len(),
        2,
        "the stopped session and one fresh one, no more: {during:?}"
    );
    assert!(during.contains(&stopped));
    signal("-CONT");
    // The abandoned session's client is gone: resumed, its backend sees the
    // closed socket and exits, leaving the one fresh session.
    wait_until("the stopped session to go", || async {
        let now = lockjam_sessions().await;
        now.len() == 1 && !now.contains(&stopped)
    })
    .await;
    assert_eq!(scrape(env.addr()).await.value("lockjam_up", &[]), Some(1.0));
    env.stop().await;
}

/// Unreachable at start (nothing listens, or the name does not resolve):
/// lockjam serves `lockjam_up 0` and says why; when the database appears on
/// the port, it picks it up at its next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_appearing_after_start_is_picked_up() {
    let port = lockjam::cluster::free_port().unwrap();
    let service = lockjam::service::Service::start(&crate::support::config_for(vec![
        (
            "late",
            format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable"),
        ),
        (
            "nxdomain",
            "host=lockjam-test.invalid user=postgres dbname=postgres sslmode=disable".into(),
        ),
    ]))
    .await
    .unwrap();
    let addr = service.local_addr();
    wait_until("a failed attempt on each target", || async {
        let metrics = scrape(addr).await;
        ["late", "nxdomain"].iter().all(|t| {
            metrics
                .value("lockjam_sample_duration_seconds_count", &[("target", t)])
                .unwrap_or(0.0)
                >= 1.0
        })
    })
    .await;
    let metrics = scrape(addr).await;
    assert_eq!(metrics.value("lockjam_up", &[("target", "late")]), Some(0.0));
    assert_eq!(metrics.value("lockjam_up", &[("target", "nxdomain")]), Some(0.0));
    let (status, readyz) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        readyz.contains("target `late`") && readyz.contains("target `nxdomain`"),
        "{readyz}"
    );
    assert!(
        readyz.contains("lockjam-test.invalid"),
        "the error names the host: {readyz}"
    );

    let cluster = crate::support::start_cluster(lockjam::cluster::ClusterOptions {
        port: Some(port),
        ..Default::default()
    })
    .await;
    wait_until("the late database to be picked up", || async {
        scrape(addr).await.value("lockjam_up", &[("target", "late")]) == Some(1.0)
    })
    .await;
    assert_eq!(
        scrape(addr).await.value("lockjam_up", &[("target", "nxdomain")]),
        Some(0.0)
    );
    service.stop().await;
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

/// A role without pg_monitor sees no state or query text of other roles'
/// sessions: lockjam says which grant is missing, once, and exports what
/// it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_pg_monitor_is_named_once_and_lockjam_exports_what_it_can() {
    let env = TestEnv::start().await;
    env.admin.batch_execute("CREATE ROLE watcher LOGIN").await.unwrap();
    let dsn = format!(
        "host=127.0.0.1 port={} user=watcher dbname=postgres sslmode=disable",
        env.cluster.port()
    );
    let service = lockjam::service::Service::start(&crate::support::config_for(vec![("limited", dsn)]))
        .await
        .unwrap();
    let addr = service.local_addr();
    // The fixture's own session (user postgres, idle in database app) is
    // another role's: its state is hidden.
    wait_until("a sample", || async {
        scrape(addr)
            .await
            .value("lockjam_sessions", &[("datname", "app"), ("state", "unknown")])
            == Some(1.0)
    })
    .await;
    assert_eq!(scrape(addr).await.value("lockjam_up", &[]), Some(1.0));
    let (_, body) = http_get(addr, "/api/v1/snapshot").await;
    let snapshot: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        snapshot["targets"][0]["warnings"],
        serde_json::json!([
            "role `watcher` may not read other roles' activity: their sessions count as state \"unknown\", show no query, and their lock waits go unseen; GRANT pg_monitor TO \"watcher\""
        ])
    );
    service.stop().await;
    env.stop().await;
}

/// A wrong password: `lockjam run` keeps serving with `lockjam_up 0`, logs
/// one line per backoff step that says to check the password (never
/// showing it), and picks the target up once the password is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn authentication_failure_is_named_once_per_backoff_step_and_recovers() {
    let env = TestEnv::start_with(lockjam::cluster::ClusterOptions {
        settings: vec![("password_encryption".into(), "scram-sha-256".into())],
        hba: vec!["host all watcher 127.0.0.1/32 scram-sha-256".into()],
        ..Default::default()
    })
    .await;
    env.admin
        .batch_execute("CREATE ROLE watcher LOGIN PASSWORD 'right-horse'; GRANT pg_monitor TO watcher")
        .await
        .unwrap();
    let dsn = format!(
        "host=127.0.0.1 port={} user=watcher password=wrong-battery dbname=postgres sslmode=disable",
        env.cluster.port()
    );
    let run = LockjamRun::spawn(&["--dsn", &dsn]);
    let failed = |n: f64| {
        let addr = run.addr;
        move || async move {
            tokio::net::TcpStream::connect(addr).await.is_ok()
                && scrape(addr)
                    .await
                    .value("lockjam_sample_duration_seconds_count", &[])
                    .unwrap_or(0.0)
                    >= n
        }
    };
    wait_until("three failed attempts (1 s and 2 s apart)", failed(3.0)).await;
    assert_eq!(scrape(run.addr).await.value("lockjam_up", &[]), Some(0.0));
    let (status, readyz) = http_get(run.addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        readyz.contains("authentication failed for user `watcher`: check the password"),
        "{readyz}"
    );
    assert!(readyz.contains("password=********"), "{readyz}");
    assert!(!readyz.contains("wrong-battery"), "{readyz}");

    env.admin
        .batch_execute("ALTER ROLE watcher PASSWORD 'wrong-battery'")
        .await
        .unwrap();
    wait_until("lockjam to log in with the password now right", || async {
        scrape(run.addr).await.value("lockjam_up", &[]) == Some(1.0)
    })
    .await;
    let (_, stderr) = run.terminate();
    assert!(!stderr.contains("wrong-battery"), "{stderr}");
    let failures: Vec<&str> = stderr.lines().filter(|l| l.contains("sample failed")).collect();
    assert!(failures.len() >= 3, "{stderr}");
    for (step, line) in failures.iter().enumerate() {
        let retry = lockjam::service::backoff(step as u32 + 1, Duration::from_secs(1));
        assert!(
            line.contains(" WARN ")
                && line.contains(&format!("attempt={} ", step + 1))
                && line.contains(&format!("retry_in={}", humantime::format_duration(retry)))
                && line.contains("authentication failed for user `watcher`: check the password")
                && line.contains("password authentication failed for user \"watcher\""),
            "step {}: {line}",
            step + 1
        );
    }
    // A role or a database that does not exist: what to check, named.
    let port = env.cluster.port();
    let service = lockjam::service::Service::start(&crate::support::config_for(vec![
        (
            "no-role",
            format!("host=127.0.0.1 port={port} user=ghost dbname=postgres sslmode=disable"),
        ),
        (
            "no-db",
            format!("host=127.0.0.1 port={port} user=postgres dbname=ghost sslmode=disable"),
        ),
    ]))
    .await
    .unwrap();
    wait_until("both targets refused", || async {
        let (_, readyz) = http_get(service.local_addr(), "/readyz").await;
        readyz.contains("the server refused user `ghost`: check that the role exists, has LOGIN")
            && readyz.contains("database `ghost` does not exist: check the DSN's `dbname`")
    })
    .await;
    service.stop().await;

    let recovered: Vec<&str> = stderr.lines().filter(|l| l.contains(" sampling")).collect();
    assert_eq!(recovered.len(), 1, "{stderr}");
    assert!(
        recovered[0].contains(&format!("failed_attempts={}", failures.len())),
        "{stderr}"
    );
    env.stop().await;
}

/// Four targets in one process (three servers, as a target is a server),
/// one of them dead in the worst way (it accepts the TCP connection and
/// never answers, so each attempt lasts the whole connect timeout): every
/// other target keeps its one-second cadence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_dead_target_of_four_delays_no_other() {
    let env = TestEnv::start().await;
    let tarpit = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tarpit_port = tarpit.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = tarpit.accept().await {
            held.push(socket);
        }
    });
    let others = [
        crate::support::start_cluster(lockjam::cluster::ClusterOptions::default()).await,
        crate::support::start_cluster(lockjam::cluster::ClusterOptions::default()).await,
    ];
    let live: Vec<String> = (1..=3).map(|n| format!("db{n}")).collect();
    let dsns = [
        env.cluster.dsn("app"),
        others[0].dsn("postgres"),
        others[1].dsn("postgres"),
    ];
    let mut targets: Vec<(&str, String)> = live.iter().map(String::as_str).zip(dsns).collect();
    targets.push((
        "dead",
        format!("host=127.0.0.1 port={tarpit_port} user=postgres dbname=postgres sslmode=disable"),
    ));
    let service = lockjam::service::Service::start(&crate::support::config_for(targets))
        .await
        .unwrap();
    let addr = service.local_addr();
    let samples = |metrics: &crate::support::Scrape, target: &str| {
        metrics
            .value("lockjam_sample_duration_seconds_count", &[("target", target)])
            .unwrap_or(0.0)
    };
    wait_until("every live target up", || async {
        let metrics = scrape(addr).await;
        live.iter()
            .all(|t| metrics.value("lockjam_up", &[("target", t)]) == Some(1.0))
    })
    .await;
    let before = scrape(addr).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = scrape(addr).await;
    for target in &live {
        let taken = samples(&after, target) - samples(&before, target);
        assert!(
            taken >= 7.0,
            "target {target} took {taken} samples in 8 s at a 1 s interval:\n{}",
            after.text
        );
        assert_eq!(after.value("lockjam_up", &[("target", target)]), Some(1.0));
    }
    // The dead one: attempts that each last the 2 s connect timeout.
    assert_eq!(after.value("lockjam_up", &[("target", "dead")]), Some(0.0));
    assert!(
        samples(&after, "dead") - samples(&before, "dead") >= 1.0,
        "{}",
        after.text
    );
    let (_, readyz) = http_get(addr, "/readyz").await;
    assert!(
        readyz.contains("target `dead`") && readyz.contains("no answer within 2s"),
        "{readyz}"
    );
    service.stop().await;
    held.abort();
    tokio::task::spawn_blocking(move || drop(others)).await.unwrap();
    env.stop().await;
}

/// A wait in another database makes lockjam open a session there to name
/// its relations; once calm and `database_session_idle` has passed, the
/// session closes, so that nothing of lockjam's holds the database. Once
/// dropped, the database's series go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sessions_to_other_databases_close_while_calm() {
    let cluster = crate::support::start_cluster(lockjam::cluster::ClusterOptions::default()).await;
    let postgres = crate::support::connect(&cluster.dsn("postgres"), "fixture").await;
    postgres.batch_execute("CREATE DATABASE tenant").await.unwrap();
    let tenant = crate::support::connect(&cluster.dsn("tenant"), "fixture").await;
    tenant.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let mut config = crate::support::config_for(vec![("it", cluster.dsn("postgres"))]);
    config.sampler.database_session_idle = Duration::from_secs(2);
    let service = lockjam::service::Service::start(&config).await.unwrap();
    let lockjam_in_tenant = || async {
        postgres
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'tenant' AND application_name = 'lockjam'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let reader = crate::support::connect(&cluster.dsn("tenant"), "report").await;
    reader.batch_execute("BEGIN; SELECT count(*) FROM t").await.unwrap();
    let migrate = crate::support::connect(&cluster.dsn("tenant"), "migrate").await;
    let alter = tokio::spawn(async move { migrate.batch_execute("ALTER TABLE t ADD COLUMN x int").await });
    crate::support::wait_until("lockjam to name the relation in tenant", || async {
        crate::support::scrape(service.local_addr()).await.value(
            "lockjam_relation_lock_waiters",
            &[("datname", "tenant"), ("relation", "public.t")],
        ) == Some(1.0)
    })
    .await;
    assert_eq!(lockjam_in_tenant().await, 1);
    reader.batch_execute("COMMIT").await.unwrap();
    alter.await.unwrap().unwrap();
    drop(reader);
    crate::support::wait_until("lockjam's session in tenant to close", || async {
        lockjam_in_tenant().await == 0
    })
    .await;
    // The fixture's idle session is the only one left in tenant: FORCE
    // ends it with the database, which lockjam sees at its next sample.
    postgres
        .batch_execute("DROP DATABASE tenant WITH (FORCE)")
        .await
        .expect("the database drops");
    drop(tenant);
    // Its series go with it: the wait histogram, declared at the first
    // sample that saw a session there, and every gauge.
    crate::support::wait_until("the dropped database's series to go", || async {
        !crate::support::scrape(service.local_addr())
            .await
            .text
            .contains("datname=\"tenant\"")
    })
    .await;
    service.stop().await;
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

/// A table renamed while lockjam watches shows its new name at once: a
/// rule's `relations` glob must match the table as it is now (a cached
/// name once let a rule on `public.orders` cancel the reader of the table
/// renamed from it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renamed_table_shows_its_new_name() {
    let env = crate::support::TestEnv::start().await;
    env.admin
        .batch_execute("CREATE TABLE orders (id int); CREATE TABLE orders_new (id int)")
        .await
        .unwrap();
    let waiters_on = |relation: &'static str| {
        move |m: &crate::support::Scrape| {
            m.value("lockjam_relation_lock_waiters", &[("relation", relation)]) == Some(1.0)
        }
    };
    let watched = &env;
    let stage = |table: &'static str| async move {
        let reader = watched.session("report").await;
        reader
            .batch_execute(&format!("BEGIN; SELECT count(*) FROM {table}"))
            .await
            .unwrap();
        let (pid, alter) = watched
            .spawn_statement(
                "migrate",
                &format!("ALTER TABLE {table} ADD COLUMN x{} int", table.len()),
            )
            .await;
        watched.wait_until_waiting(pid).await;
        (reader, alter)
    };
    let (reader, alter) = stage("orders").await;
    env.wait_for_metrics("the wait on orders", waiters_on("public.orders"))
        .await;
    reader.batch_execute("COMMIT").await.unwrap();
    alter.await.unwrap().unwrap();
    env.admin
        .batch_execute(
            "BEGIN; ALTER TABLE orders RENAME TO orders_old; ALTER TABLE orders_new RENAME TO orders; COMMIT",
        )
        .await
        .unwrap();
    let (reader, alter) = stage("orders_old").await;
    let metrics = env
        .wait_for_metrics("the wait on orders_old", waiters_on("public.orders_old"))
        .await;
    assert_eq!(
        metrics.value("lockjam_relation_lock_waiters", &[("relation", "public.orders")]),
        None
    );
    reader.batch_execute("COMMIT").await.unwrap();
    alter.await.unwrap().unwrap();
    env.stop().await;
}

/// Database churn for a while (`scripts/churn-run.sh`; LOCKJAM_CHURN_SECONDS,
/// default 600): every few seconds a database is created, a lock wait is
/// staged in it and seen by `lockjam run`, and it is dropped once it is 75 s
/// old (past `database_session_idle`, 60 s). Each minute it prints
/// lockjam's RSS, its series, its `lockjam_lock_wait_seconds` series, the
/// databases on `/metrics` and lockjam's sessions; it fails if a plain
/// `DROP DATABASE` is refused or the series grow past the first minutes'.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long: run by scripts/churn-run.sh"]
async fn churn_many() {
    let seconds: u64 = std::env::var("LOCKJAM_CHURN_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let cluster = crate::support::start_cluster(lockjam::cluster::ClusterOptions::default()).await;
    let postgres = crate::support::connect(&cluster.dsn("postgres"), "fixture").await;
    let run = LockjamRun::spawn(&["--dsn", &cluster.dsn("postgres")]);
    wait_until("lockjam run to sample", || async {
        run.serving().await && scrape(run.addr).await.value("lockjam_up", &[]) == Some(1.0)
    })
    .await;
    let started = std::time::Instant::now();
    let mut live: std::collections::VecDeque<(String, std::time::Instant)> = Default::default();
    let (mut created, mut dropped, mut refused) = (0u32, 0u32, 0u32);
    let mut rows: Vec<(u64, u64, usize, usize, usize, i64, u32)> = Vec::new();
    let mut next_report = started;
    while started.elapsed() < Duration::from_secs(seconds) {
        created += 1;
        let name = format!("churn_{created}");
        postgres
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let dsn = cluster.dsn(&name);
        let holder = crate::support::connect(&dsn, "holder").await;
        holder.batch_execute("CREATE TABLE t (id int)").await.unwrap();
        holder
            .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        let reader = crate::support::connect(&dsn, "reader").await;
        let read = tokio::spawn(async move { reader.batch_execute("SELECT count(*) FROM t").await });
        wait_until("the wait to be sampled", || async {
            scrape(run.addr).await.value(
                "lockjam_relation_lock_waiters",
                &[("datname", &name), ("relation", "public.t")],
            ) == Some(1.0)
        })
        .await;
        holder.batch_execute("COMMIT").await.unwrap();
        read.await.unwrap().unwrap();
        drop(holder);
        live.push_back((name, std::time::Instant::now()));
        while live
            .front()
            .is_some_and(|(_, at)| at.elapsed() > Duration::from_secs(75))
        {
            let (name, _) = live.pop_front().unwrap();
            let mut attempts = 0;
            loop {
                match postgres.batch_execute(&format!("DROP DATABASE {name}")).await {
                    Ok(()) => break,
                    Err(e) if attempts < 30 => {
                        refused += 1;
                        eprintln!("DROP DATABASE {name} refused: {e}");
                        attempts += 1;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => panic!("DROP DATABASE {name} still refused: {e}"),
                }
            }
            dropped += 1;
        }
        if std::time::Instant::now() >= next_report {
            next_report += Duration::from_secs(60);
            let status = std::fs::read_to_string(format!("/proc/{}/status", run.pid())).unwrap();
            let rss: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap();
            let scrape = scrape(run.addr).await;
            let waits = scrape
                .series
                .iter()
                .filter(|(n, _, _)| n.starts_with("lockjam_lock_wait_seconds"))
                .count();
            let datnames: std::collections::BTreeSet<&String> = scrape
                .series
                .iter()
                .filter_map(|(_, labels, _)| labels.get("datname"))
                .collect();
            let sessions: i64 = postgres
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'lockjam'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            rows.push((
                started.elapsed().as_secs(),
                rss,
                scrape.series.len(),
                waits,
                datnames.len(),
                sessions,
                created,
            ));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!("churn: {created} databases created, {dropped} dropped, {refused} DROP DATABASE refused");
    println!("churn: seconds  rss_kib  series  wait_series  datnames  lockjam_sessions  created");
    for (at, rss, series, waits, datnames, sessions, created) in &rows {
        println!("churn: {at:>7}  {rss:>7}  {series:>6}  {waits:>11}  {datnames:>8}  {sessions:>16}  {created:>7}");
    }
    assert_eq!(refused, 0, "lockjam held dropped databases open");
    // From the second minute on (when drops begin), the series stay at
    // what the live databases need.
    let settled: Vec<usize> = rows.iter().skip(2).map(|r| r.2).collect();
    if let (Some(first), Some(last)) = (settled.first(), settled.last()) {
        assert!(*last <= first + first / 5, "series grew: {settled:?}");
    }
    let (exit, log) = run.terminate();
    assert!(exit.success(), "{log}");
}
