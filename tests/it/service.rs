//! The service as a whole: HTTP surface, readiness, a database restart
//! under lockjam, the golden `/metrics` file, and the `lockjam` binary.

use std::path::Path;
use std::time::Duration;

use lockjam::service::Service;

use crate::support::{
    apply_lockjam_role_sql, backend_pid, config_for, connect, http_get, http_request, lockjam, scrape, start_cluster,
    wait_until, LockjamRun, TestEnv,
};

const GOLDEN: &str = "tests/it/golden/metrics.txt";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_routes_status_codes() {
    let env = TestEnv::start().await;
    env.wait_for_metrics("a first sample", |m| m.value("lockjam_up", &[]) == Some(1.0))
        .await;
    let addr = env.addr();
    assert_eq!(http_get(addr, "/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(http_get(addr, "/readyz").await, (200, "ready\n".to_string()));
    let (status, body) = http_get(addr, "/nope").await;
    assert_eq!(status, 404);
    assert!(body.contains("/metrics"), "{body}");
    let (status, _) = http_request(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: lockjam\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    let (status, body) = http_get(addr, "/api/v1/snapshot").await;
    assert_eq!(status, 200);
    let snapshot: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(snapshot["targets"][0]["target"], "it");
    assert_eq!(snapshot["targets"][0]["up"], true);
    assert_eq!(snapshot["targets"][0]["waiters"], serde_json::json!([]));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_database_serves_up_zero_and_not_ready() {
    let port = lockjam::cluster::free_port().unwrap();
    let dsn = format!("host=127.0.0.1 port={port} user=postgres password=hunter2 dbname=postgres sslmode=disable");
    let service = Service::start(&config_for(vec![("dead", dsn)])).await.unwrap();
    let addr = service.local_addr();
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("target `dead`"), "{body}");
    wait_until("a failed sample", || async {
        scrape(addr)
            .await
            .value("lockjam_sample_duration_seconds_count", &[])
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    let metrics = scrape(addr).await;
    assert_eq!(metrics.value("lockjam_up", &[("target", "dead")]), Some(0.0));
    assert!(!metrics.has("lockjam_last_sample_timestamp_seconds"));
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        body.contains("Connection refused") || body.contains("connection refused"),
        "{body}"
    );
    assert!(!body.contains("hunter2"), "the password never shows: {body}");
    let (_, snapshot) = http_get(addr, "/api/v1/snapshot").await;
    assert!(!snapshot.contains("hunter2"), "{snapshot}");
    assert!(snapshot.contains("password=********"), "{snapshot}");
    service.stop().await;
}

/// The database restarts under lockjam: it keeps serving, `lockjam_up`
/// goes 1 → 0 → 1 and readiness follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_restart_under_lockjam() {
    let env = TestEnv::start().await;
    env.wait_for_metrics("up", |m| m.value("lockjam_up", &[]) == Some(1.0))
        .await;
    tokio::task::block_in_place(|| env.cluster.stop("immediate")).unwrap();
    let down = env
        .wait_for_metrics("up to drop to 0", |m| m.value("lockjam_up", &[]) == Some(0.0))
        .await;
    assert!(
        !down.has("lockjam_sessions"),
        "no stale figures while down:\n{}",
        down.text
    );
    wait_until("readyz to fail", || async {
        http_get(env.addr(), "/readyz").await.0 == 503
    })
    .await;
    assert_eq!(http_get(env.addr(), "/healthz").await.0, 200);
    tokio::task::block_in_place(|| env.cluster.restart()).unwrap();
    env.wait_for_metrics("up to return to 1", |m| m.value("lockjam_up", &[]) == Some(1.0))
        .await;
    let _session = env.session("after-restart").await;
    env.wait_for_metrics("the new session", |m| {
        m.value("lockjam_sessions", &[("datname", "app"), ("state", "idle")]) == Some(1.0)
    })
    .await;
    assert_eq!(http_get(env.addr(), "/readyz").await.0, 200);
    env.stop().await;
}

/// Incident 000 with three SELECTs, rendered: names, types, help texts and
/// labels are fixed by `tests/it/golden/metrics.txt`. Time-valued samples
/// are masked. `LOCKJAM_UPDATE_GOLDEN=1` rewrites the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn golden_metrics() {
    let env = TestEnv::start().await;
    env.admin
        .batch_execute("CREATE TABLE orders (id bigint PRIMARY KEY, note text)")
        .await
        .unwrap();
    let (reader_pid, _read) = env
        .spawn_statement("analyst", "SELECT pg_sleep(600), count(*) FROM orders")
        .await;
    env.wait_until_holding(reader_pid, "orders", None).await;
    let (migration_pid, _alter) = env
        .spawn_statement("migrate", "ALTER TABLE orders ADD COLUMN total numeric")
        .await;
    env.wait_until_waiting(migration_pid).await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(env.spawn_statement("web", "SELECT count(*) FROM orders").await);
    }
    env.wait_until_waiting_count("web", 3).await;
    // Sessions by state are read every activity_interval (5 s), the
    // queue every tick; the incident's series appear once it opens (a wait
    // of 1 s).
    let scrape = env
        .wait_for_metrics("the queue and the sessions in it", |m| {
            m.value("lockjam_lock_queue_depth", &[]) == Some(3.0)
                && m.value("lockjam_sessions", &[("datname", "app"), ("state", "active")]) == Some(5.0)
                && m.value("lockjam_incidents_total", &[("outcome", "blocker_finished")]) == Some(0.0)
        })
        .await;
    let rendered = mask(&scrape.text);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
    if std::env::var_os("LOCKJAM_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let golden = std::fs::read_to_string(&path).expect("golden file exists");
    if rendered != golden {
        let diff: Vec<String> = diff_lines(&golden, &rendered);
        panic!("/metrics differs from {GOLDEN} (- golden, + now):\n{}", diff.join("\n"));
    }
    env.admin
        .query_one("SELECT pg_terminate_backend($1)", &[&reader_pid])
        .await
        .unwrap();
    env.stop().await;
}

/// Replaces values that depend on time with `<t>`, keeps every count.
fn mask(text: &str) -> String {
    let timed = [
        "lockjam_sample_duration_seconds",
        "lockjam_last_sample_timestamp_seconds",
        "lockjam_transaction_max_age_seconds",
        "lockjam_lock_wait_max_seconds",
        "lockjam_root_blocker_max_age_seconds",
        "lockjam_lock_queue_head_wait_seconds",
    ];
    text.lines()
        .map(|line| {
            if !line.starts_with('#') && timed.iter().any(|name| line.starts_with(name)) {
                let (series, _) = line.rsplit_once(' ').unwrap();
                format!("{series} <t>")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn diff_lines(expected: &str, actual: &str) -> Vec<String> {
    let expected: Vec<&str> = expected.lines().collect();
    let actual: Vec<&str> = actual.lines().collect();
    let mut diff = Vec::new();
    for line in &expected {
        if !actual.contains(line) {
            diff.push(format!("- {line}"));
        }
    }
    for line in &actual {
        if !expected.contains(line) {
            diff.push(format!("+ {line}"));
        }
    }
    diff
}

/// The documented least-privilege role (`pg_monitor` only) sees other
/// users' queues and query texts, and names relations in their database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_privilege_role_with_pg_monitor() {
    let cluster = start_cluster(Default::default()).await;
    let postgres = connect(&cluster.dsn("postgres"), "fixture").await;
    // The shipped role script, idempotent: with the policy's grant, then
    // again without it, which takes the grant back.
    apply_lockjam_role_sql(&cluster, true);
    apply_lockjam_role_sql(&cluster, false);
    apply_lockjam_role_sql(&cluster, false);
    let role = postgres
        .query_one(
            "SELECT rolsuper, rolcanlogin, pg_has_role('lockjam', 'pg_monitor', 'MEMBER'),
                    pg_has_role('lockjam', 'pg_signal_backend', 'MEMBER')
             FROM pg_roles WHERE rolname = 'lockjam'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            role.get::<_, bool>(0),
            role.get::<_, bool>(1),
            role.get::<_, bool>(2),
            role.get::<_, bool>(3)
        ),
        (false, true, true, false)
    );
    postgres.batch_execute("CREATE ROLE shop LOGIN").await.unwrap();
    postgres.batch_execute("CREATE DATABASE shop OWNER shop").await.unwrap();
    let shop_dsn = format!(
        "host=127.0.0.1 port={} user=shop dbname=shop sslmode=disable",
        cluster.port()
    );
    let owner = connect(&shop_dsn, "owner").await;
    owner.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let holder = connect(&shop_dsn, "report").await;
    let holder_pid = backend_pid(&holder).await;
    holder
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE t IN ACCESS SHARE MODE -- {}",
            "é".repeat(300)
        ))
        .await
        .unwrap();
    let migration = connect(&shop_dsn, "migrate").await;
    let waiting = |application: &'static str| {
        let postgres = &postgres;
        async move {
            let row = postgres
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                    &[&application],
                )
                .await
                .unwrap();
            row.get::<_, i64>(0) == 1
        }
    };
    let _alter = tokio::spawn(async move { migration.simple_query("ALTER TABLE t ADD COLUMN x int").await });
    wait_until("the ALTER to wait", || waiting("migrate")).await;
    let reader = connect(&shop_dsn, "web").await;
    let _read = tokio::spawn(async move { reader.simple_query("SELECT * FROM t").await });
    wait_until("the SELECT to queue", || waiting("web")).await;

    let dsn = format!(
        "host=127.0.0.1 port={} user=lockjam dbname=postgres sslmode=disable",
        cluster.port()
    );
    let service = Service::start(&config_for(vec![("least", dsn)])).await.unwrap();
    let addr = service.local_addr();
    let queue = [
        ("datname", "shop"),
        ("relation", "public.t"),
        ("mode", "AccessExclusiveLock"),
    ];
    wait_until("the queue on public.t", || async {
        scrape(addr).await.value("lockjam_lock_queue_depth", &queue) == Some(1.0)
    })
    .await;
    let metrics = scrape(addr).await;
    assert_eq!(
        metrics.value("lockjam_blocked_sessions", &[("datname", "shop")]),
        Some(2.0)
    );
    assert_eq!(
        metrics.value(
            "lockjam_sessions",
            &[("datname", "shop"), ("state", "idle in transaction")]
        ),
        Some(1.0)
    );
    let (_, body) = http_get(addr, "/api/v1/snapshot").await;
    let snapshot: serde_json::Value = serde_json::from_str(&body).unwrap();
    let root = &snapshot["targets"][0]["blockers"][0];
    assert_eq!(root["pid"], holder_pid);
    assert_eq!(root["usename"], "shop");
    assert_eq!(root["state"], "idle in transaction");
    let query = root["query"].as_str().unwrap();
    assert!(
        query.starts_with("BEGIN; LOCK TABLE t IN ACCESS SHARE MODE -- éé"),
        "pg_monitor reads other users' queries: {query}"
    );
    assert_eq!(query.chars().count(), 200, "query texts are cut to 200 characters");
    service.stop().await;
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

#[test]
fn cli_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[targets]]\nname = \"main\"\ndsn = \"postgres://lockjam:s3cret@db.internal/app?sslmode=require\"\n",
    )
    .unwrap();
    let output = lockjam()
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("listen = \"127.0.0.1:9863\""), "{stdout}");
    assert!(stdout.contains("password=********"), "{stdout}");
    assert!(!stdout.contains("s3cret"), "{stdout}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[sampler]\ninterval = \"soon\"\n").unwrap();
    let output = lockjam().args(["check-config", "--config"]).arg(&bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.toml") && stderr.contains("sampler.interval"),
        "{stderr}"
    );

    let output = lockjam()
        .args(["run", "--dsn", "host=x flavour=mint user=u password=s3cret"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unknown connection option `flavour`"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");

    let output = lockjam()
        .args([
            "check-config",
            "--dsn",
            "host=x user=u",
            "--cancel-blockers-after",
            "5s",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("enabled = true\ndry_run = false"), "{stdout}");
    assert!(
        stdout.contains("name = \"unblock-migrations\"") && stdout.contains("min_wait = \"5s\""),
        "{stdout}"
    );
    let output = lockjam()
        .args([
            "check-config",
            "--dsn",
            "host=x user=u",
            "--cancel-blockers-after",
            "soon",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--cancel-blockers-after: `soon`"));

    let output = lockjam().arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("lockjam {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Every kind of bad file, through the binary: `run` and `check-config`
/// exit 2 with the file and key named, and the password in the file's DSN
/// never shows.
#[test]
fn cli_bad_files_exit_2_naming_file_and_key_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let target = "[[targets]]\nname = \"main\"\ndsn = \"postgres://lockjam:s3cret@db.internal/app\"\n";
    let cases = [
        (
            "bad TOML",
            format!("{target}[sampler\n"),
            "lockjam.toml: TOML syntax error at line 4, column 9",
        ),
        (
            "unknown key",
            format!("{target}[sampler]\nintervall = \"1s\"\n"),
            "sampler.intervall",
        ),
        (
            "wrong type",
            format!("{target}[sampler]\nmax_relations = \"many\"\n"),
            "sampler.max_relations",
        ),
        (
            "bad duration",
            format!("{target}[sampler]\ninterval = \"1 fortnight\"\n"),
            "sampler.interval",
        ),
        (
            "bad DSN",
            "[[targets]]\nname = \"main\"\ndsn = \"host=x colour=red password=s3cret\"\n".into(),
            "targets[0].dsn: unknown connection option `colour`",
        ),
        (
            "an unquoted password with a space",
            "[[targets]]\nname = \"main\"\ndsn = \"host=x password=s3cret colour=red\"\n".into(),
            "targets[0].dsn: an unknown connection option follows `password`",
        ),
        (
            "unreadable dsn_file",
            format!("{target}[[targets]]\nname = \"b\"\ndsn_file = \"/nonexistent/lockjam-dsn\"\n"),
            "targets[1].dsn_file: cannot read /nonexistent/lockjam-dsn",
        ),
        (
            "duplicate targets",
            format!("{target}{target}"),
            "targets[1].name: duplicate target name `main`",
        ),
    ];
    let file = dir.path().join("lockjam.toml");
    for (what, text, expected) in cases {
        std::fs::write(&file, text).unwrap();
        for command in ["check-config", "run"] {
            let output = lockjam().args([command, "--config"]).arg(&file).output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{what}, {command}: {stderr}");
            assert!(
                stderr.contains("lockjam.toml") && stderr.contains(expected),
                "{what}, {command}: {stderr}"
            );
            assert!(!stderr.contains("s3cret"), "{what}, {command}: {stderr}");
            assert!(output.stdout.is_empty(), "{what}, {command}");
        }
    }
}

/// Values the config crate would coerce, and durations no clock or
/// PostgreSQL timeout can take: refused by `run` and `check-config` alike,
/// exit 2, the key named.
#[test]
fn cli_refuses_coerced_types_and_unbounded_durations() {
    let dir = tempfile::tempdir().unwrap();
    let target = "[[targets]]\nname = \"main\"\ndsn = \"host=db.internal dbname=app user=app\"\n";
    let cases = [
        (
            "[sampler]\nmax_relations = 1.5\n",
            "sampler.max_relations: invalid type: floating point `1.5`",
        ),
        (
            "[sampler]\nmax_relations = true\n",
            "sampler.max_relations: invalid type: boolean `true`",
        ),
        (
            "[policy]\ndry_run = \"false\"\n",
            "policy.dry_run: invalid type: a string, expected a boolean",
        ),
        (
            "[policy]\ndry_run = 0\n",
            "policy.dry_run: invalid type: integer `0`, expected a boolean",
        ),
        (
            "[policy]\nenabled = \"yes\"\n",
            "policy.enabled: invalid type: a string, expected a boolean",
        ),
        (
            "[sampler]\nstatement_timeout = \"30days\"\n",
            "sampler.statement_timeout: `30days` is too long",
        ),
        (
            "[sampler]\ninterval = \"300000000000years\"\n",
            "sampler.interval: `300000000000years` is too long",
        ),
        (
            "[sampler]\nlock_timeout = \"500us\"\n",
            "sampler.lock_timeout: `500us` is shorter than 1ms",
        ),
        (
            "[[policy.rules]]\nname = \"r\"\nmin_wait = \"0x\"\n",
            "policy.rules[0].min_wait: `0x` is not a duration",
        ),
        (
            "[server]\nmax_connections = 0\n",
            "server.max_connections: 0 is out of range",
        ),
        (
            "[server]\nheader_timeout = \"0s\"\n",
            "server.header_timeout: `0s` must be longer than zero",
        ),
    ];
    let file = dir.path().join("lockjam.toml");
    for (text, expected) in cases {
        std::fs::write(&file, format!("{target}{text}")).unwrap();
        for command in ["check-config", "run"] {
            let output = lockjam().args([command, "--config"]).arg(&file).output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{text:?}, {command}: {stderr}");
            assert!(stderr.contains(expected), "{text:?}, {command}: {stderr}");
        }
    }
    // The environment's strings are held to the file's types.
    std::fs::write(&file, target).unwrap();
    let environment = [
        ("LOCKJAM__SAMPLER__MAX_RELATIONS", "1.5", "a whole number"),
        ("LOCKJAM__SAMPLER__MAX_RELATIONS", "true", "a whole number"),
        ("LOCKJAM__POLICY__DRY_RUN", "yes", "`true` or `false`"),
        ("LOCKJAM__POLICY__ENABLED", "0", "`true` or `false`"),
        ("LOCKJAM__SAMPLER__CONNECT_TIMEOUT", "30days", "`30days` is too long"),
    ];
    for (name, value, expected) in environment {
        for command in ["check-config", "run"] {
            let output = lockjam()
                .args([command, "--config"])
                .arg(&file)
                .env(name, value)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{name}={value}, {command}: {stderr}");
            assert!(
                stderr.contains(name) || stderr.contains("sampler.connect_timeout"),
                "{stderr}"
            );
            assert!(stderr.contains(expected), "{name}={value}, {command}: {stderr}");
        }
    }
}

/// What `check-config` accepts, `run` accepts: certificates and keys that
/// are no PEM, a missing or non-PEM `sslrootcert`, fail both, exit 2 (the
/// systemd unit does not restart on 2), where `check-config` once said 0
/// and `run` exited 1.
#[test]
fn check_config_refuses_what_run_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not-pem.txt");
    std::fs::write(&not_pem, "this is no certificate\n").unwrap();
    let not_pem = not_pem.display().to_string();
    // A FIFO never hands over its end of file: opened, it hangs the reader.
    let fifo = dir.path().join("fifo.pem");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let fifo = fifo.display().to_string();
    let target = |dsn: &str| format!("[[targets]]\nname = \"main\"\ndsn = \"{dsn}\"\n");
    let plain = target("host=127.0.0.1 port=1 dbname=app user=app");
    let cases = [
        (
            format!("[server]\ntls_cert_file = \"{not_pem}\"\ntls_key_file = \"{not_pem}\"\n{plain}"),
            format!("cannot use {not_pem} for HTTPS: no PEM certificate in it"),
        ),
        (
            target("host=127.0.0.1 port=1 dbname=app user=app sslmode=verify-full sslrootcert=/nonexistent/root.crt"),
            "target `main`: TLS setup failed: sslrootcert: cannot read /nonexistent/root.crt".to_string(),
        ),
        (
            target("host=127.0.0.1 port=1 dbname=app user=app sslmode=require sslrootcert=/nonexistent/root.crt"),
            "target `main`: TLS setup failed: sslrootcert: cannot read /nonexistent/root.crt".to_string(),
        ),
        (
            target(&format!(
                "host=127.0.0.1 port=1 dbname=app user=app sslmode=verify-full sslrootcert={fifo}"
            )),
            format!("target `main`: TLS setup failed: sslrootcert: {fifo} is not a regular file"),
        ),
        (
            format!("[server]\ntls_cert_file = \"{fifo}\"\ntls_key_file = \"{not_pem}\"\n{plain}"),
            format!("server.tls_cert_file: {fifo} is not a regular file"),
        ),
        (
            target(&format!(
                "host=127.0.0.1 port=1 dbname=app user=app sslmode=verify-ca sslrootcert={not_pem}"
            )),
            "target `main`: TLS setup failed:".to_string(),
        ),
    ];
    let file = dir.path().join("lockjam.toml");
    for (text, expected) in cases {
        std::fs::write(&file, &text).unwrap();
        for command in ["check-config", "run"] {
            let output = output_within(
                lockjam().args([command, "--config"]).arg(&file),
                Duration::from_secs(30),
            );
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{text:?}, {command}: {stderr}");
            assert!(stderr.contains(&expected), "{text:?}, {command}: {stderr}");
            assert!(output.stdout.is_empty(), "{text:?}, {command}");
        }
    }
}

/// Runs `command` to its end, killing it and failing the test if it takes
/// longer than `limit` (a hang).
fn output_within(command: &mut std::process::Command, limit: Duration) -> std::process::Output {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "{command:?} hung for {limit:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `lockjam run` serves, then exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_run_stops_on_sigterm() {
    let env = TestEnv::start().await;
    let run = LockjamRun::spawn(&["--dsn", &env.cluster.dsn("postgres")]);
    wait_until("lockjam run to report up", || async {
        run.serving().await && scrape(run.addr).await.value("lockjam_up", &[]) == Some(1.0)
    })
    .await;
    let (status, stderr) = run.terminate();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "no colour codes in a log that is not a terminal: {stderr}"
    );
    env.stop().await;
}

/// `lockjam demo`, the README's first command: it replays incident 000 on
/// a throwaway cluster twice, watched then cured by the policy, and
/// removes the cluster. README shows its output: the lines printed here
/// have the shapes of those there, in the same order (numbers, pids and
/// times aside, and a run of lines of one shape counted as one: how many
/// "sessions queue" lines a run prints depends on its timing).
#[test]
fn demo_replays_incident_000_twice_as_readme_shows() {
    let output = output_within(
        lockjam().args(["demo", "--listen", "127.0.0.1:0", "--queries", "10", "--hold", "3s"]),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for expected in [
        lockjam::staging::LONG_READ,
        lockjam::staging::DROP_CONSTRAINT,
        "ending act 1 by hand: cancelling root blocker pid",
        "lockjam, rule unblock-migrations: cancelled root blocker pid",
        "POLICY rule `unblock-migrations` cancel_blockers (pid ",
        "└─ 10 × SELECT id, total FROM orders WHERE customer_id = $1",
        "blocker_signalled",
        "blocker_finished",
        "10 of 10 queued application queries completed",
        "stopped and removed the throwaway cluster",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    assert_eq!(
        stdout.matches("the migration got its lock and finished after").count(),
        2,
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("canceling statement due to user request").count(),
        2,
        "{stdout}"
    );

    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("\n```\n")
        .find(|block| block.starts_with("lockjam demo: "))
        .expect("README shows the demo's output");
    let shapes = |text: &str| -> Vec<String> {
        let mut shapes: Vec<String> = text.lines().map(shape).collect();
        shapes.dedup();
        shapes
    };
    let (printed, shown) = (shapes(&stdout), shapes(block));
    let set = |shapes: &[String]| -> std::collections::BTreeSet<String> { shapes.iter().cloned().collect() };
    let missing: Vec<String> = set(&printed).difference(&set(&shown)).cloned().collect();
    let stale: Vec<String> = set(&shown).difference(&set(&printed)).cloned().collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "README's demo output is not what the demo prints:\nprinted, not in README: {missing:#?}\nin README, not printed: {stale:#?}"
    );
    assert_eq!(
        printed, shown,
        "README's demo output is in another order than the demo's"
    );
}

/// A line of the demo's output with its numbers as `#`, its runs of
/// spaces as one, and the server's version left out.
fn shape(line: &str) -> String {
    if line.starts_with("  started a throwaway cluster: ") {
        return "  started a throwaway cluster: ".into();
    }
    let mut shape = String::new();
    for c in line.trim_end().chars() {
        let last = shape.chars().last();
        if c.is_ascii_digit() {
            if last != Some('#') {
                shape.push('#');
            }
        } else if c != ' ' || last != Some(' ') {
            shape.push(c);
        }
    }
    shape
}
