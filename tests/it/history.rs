//! The incident history as `lockjam run` keeps it: across SIGHUP and
//! restarts, one store per replica, read back by `lockjam incidents`; a
//! damaged store survived.

use std::process::Output;

use serde_json::Value;

use crate::scenes::migration_behind_long_read;
use crate::support::{
    http_get, incidents, lockjam, scrape, the_one_incident, wait_until, within, LockjamRun, Statement, TestEnv,
};

/// `lockjam incidents` with these arguments.
fn lockjam_incidents(args: &[&str]) -> Output {
    lockjam().arg("incidents").args(args).output().unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until `run` has seen a wait in `app` past `[incidents] min_wait`.
async fn wait_past_min_wait(run: &LockjamRun) {
    wait_until("lockjam run to see a wait past min_wait", || async {
        run.serving().await
            && scrape(run.addr)
                .await
                .value("lockjam_lock_wait_max_seconds", &[("datname", "app")])
                .is_some_and(|wait| wait >= 1.0)
    })
    .await;
}

/// Ends incident 000 as its operator did: the read is cancelled, the
/// ALTER goes through.
async fn operator_cancels_the_read(env: &TestEnv, reader_pid: i32, read: Statement, alter: Statement) {
    env.admin
        .query_one("SELECT pg_cancel_backend($1)", &[&reader_pid])
        .await
        .unwrap();
    assert!(within("the read", read).await.unwrap().is_err());
    within("the ALTER", alter).await.unwrap().unwrap();
}

/// Incident 000 while two replicas watch, each with its own store; one is
/// reloaded (SIGHUP) while the incident is open. Each remembers exactly
/// one incident, the same one; a restart keeps it; `lockjam incidents`
/// prints it from the file, as a table or as the API's JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_survives_sighup_and_restarts_one_store_per_replica() {
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("one.sqlite");
    let other_store = dir.path().join("other.sqlite");
    let (store, other_store) = (store.to_str().unwrap(), other_store.to_str().unwrap());
    let dsn = env.cluster.dsn("postgres");
    let run = LockjamRun::spawn_with_env(&["--dsn", &dsn], &[("LOCKJAM__INCIDENTS__PATH", store)]);
    // The other replica logs JSON, as a log pipeline would take it.
    let other = LockjamRun::spawn_with_env(
        &["--dsn", &dsn],
        &[
            ("LOCKJAM__INCIDENTS__PATH", other_store),
            ("LOCKJAM__LOG__FORMAT", "json"),
        ],
    );

    let (reader_pid, read, migration_pid, alter) = migration_behind_long_read(&env).await;
    wait_past_min_wait(&run).await;
    wait_past_min_wait(&other).await;
    run.hangup();
    // The reloaded targets sample again, the incident still open.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    wait_past_min_wait(&run).await;
    operator_cancels_the_read(&env, reader_pid, read, alter).await;

    let incident = the_one_incident(run.addr).await;
    assert_eq!(incident["id"], 1);
    assert_eq!(incident["waits"], 1, "one incident across the reload");
    assert_eq!(incident["outcome"], "blocker_finished");
    assert_eq!(incident["waiter"]["pid"], migration_pid);
    assert_eq!(incident["roots"][0]["pid"], reader_pid);
    let replica = the_one_incident(other.addr).await;
    assert_eq!(replica["id"], 1, "its own store, its own ids");
    let version: i32 = env
        .admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    let mut same = vec!["relation", "mode", "outcome"];
    // Before 14 a wait starts when each lockjam first sees it.
    if version >= 140_000 {
        same.push("opened_at");
    }
    for field in same {
        assert_eq!(replica[field], incident[field], "{field}");
    }
    for field in ["pid", "backend_start", "query"] {
        assert_eq!(replica["waiter"][field], incident["waiter"][field], "{field}");
    }
    let (_, log) = run.terminate();
    assert!(log.contains("configuration reloaded"), "{log}");
    let closed: Vec<&str> = log.lines().filter(|l| l.contains("lockjam::incidents")).collect();
    assert_eq!(closed.len(), 1, "{log}");
    assert!(
        closed[0].contains("incident 1 closed: AccessExclusiveLock on public.orders in app"),
        "{}",
        closed[0]
    );
    assert!(closed[0].contains("blocker_finished"), "{}", closed[0]);
    let (_, json_log) = other.terminate();
    let records: Vec<Value> = json_log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .filter(|record: &Value| record["target"] == "lockjam::incidents")
        .collect();
    assert_eq!(records.len(), 1, "{json_log}");
    let fields = &records[0]["fields"];
    assert_eq!(records[0]["level"], "INFO");
    assert_eq!(fields["incident"], 1);
    assert_eq!(fields["target"], "default");
    assert_eq!(fields["relation"], "public.orders");
    assert_eq!(fields["outcome"], "blocker_finished");
    assert_eq!(fields["waiter_pid"], migration_pid);
    assert_eq!(fields["root_pid"], reader_pid);
    assert_eq!(fields["root_application"], "analyst");
    assert_eq!(fields["duration_seconds"], replica["duration_seconds"]);

    // A restart serves what the file kept.
    let restarted = LockjamRun::spawn_with_env(&["--dsn", &dsn], &[("LOCKJAM__INCIDENTS__PATH", store)]);
    wait_until("lockjam run to serve", || restarted.serving()).await;
    assert_eq!(incidents(restarted.addr).await, std::slice::from_ref(&incident));
    restarted.terminate();

    // `lockjam incidents`: the same JSON as the API, and a table.
    let json: Value = serde_json::from_str(&stdout(&lockjam_incidents(&["--store", store, "--json"]))).unwrap();
    assert_eq!(json, serde_json::json!({ "incidents": [incident] }));
    let table = stdout(&lockjam_incidents(&["--store", store, "--since", "1h"]));
    // README shows it (`-- --nocapture`).
    println!("lockjam incidents:\n{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("ID  CLOSED (UTC)"), "{table}");
    for cell in [
        "1 ",
        " default ",
        " app ",
        " public.orders ",
        " AccessExclusiveLock ",
        &format!(" {migration_pid} migrate "),
        &format!(" {reader_pid} analyst (active) "),
        " blocker_finished",
    ] {
        assert!(lines[1].contains(cell), "`{cell}` in {table}");
    }
    assert_eq!(lines[2], format!("    waiter: {}", crate::scenes::DROP_CONSTRAINT));
    assert!(lines[3].starts_with("    root:   SELECT pg_sleep(3600)"), "{table}");
    // The configuration's path, as `run` reads it.
    let from_env = lockjam()
        .args(["incidents", "--target", "default"])
        .env("LOCKJAM__INCIDENTS__PATH", store)
        .output()
        .unwrap();
    assert_eq!(stdout(&from_env), stdout(&lockjam_incidents(&["--store", store])));
    assert_eq!(
        stdout(&lockjam_incidents(&["--store", store, "--target", "elsewhere"])),
        "no incidents\n"
    );
    let future = stdout(&lockjam_incidents(&[
        "--store",
        store,
        "--since",
        "2100-01-01T00:00:00Z",
    ]));
    assert_eq!(future, "no incidents\n");

    // Bad input: exit 2 naming it, or 1 naming the file.
    let bad_since = lockjam_incidents(&["--store", store, "--since", "yesterday"]);
    assert_eq!(bad_since.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_since.stderr).contains("since `yesterday` is neither a duration"));
    let missing = dir.path().join("missing.sqlite");
    let missing_output = lockjam_incidents(&["--store", missing.to_str().unwrap()]);
    assert_eq!(missing_output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&missing_output.stderr);
    assert!(
        message.contains(&format!("incident store {}: no such file", missing.display())),
        "{message}"
    );
    assert!(!missing.exists(), "reading never creates a store");
    let memory_only = lockjam()
        .args(["incidents"])
        .env("LOCKJAM__INCIDENTS__PATH", "")
        .output()
        .unwrap();
    assert_eq!(memory_only.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&memory_only.stderr).contains("[incidents] path is \"\""));
    env.stop().await;
}

/// A store that is not a SQLite file: one WARN naming it, monitoring goes
/// on, and the incident is served from memory with a negative id. The
/// incident routes name bad parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_store_is_one_warning_and_the_history_stays_in_memory() {
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("damaged.sqlite");
    let garbage = b"not a database, but a file someone put here by mistake, long enough for a header".repeat(4);
    std::fs::write(&store, &garbage).unwrap();
    let run = LockjamRun::spawn_with_env(
        &["--dsn", &env.cluster.dsn("postgres")],
        &[("LOCKJAM__INCIDENTS__PATH", store.to_str().unwrap())],
    );
    let (reader_pid, read, _, alter) = migration_behind_long_read(&env).await;
    wait_past_min_wait(&run).await;
    operator_cancels_the_read(&env, reader_pid, read, alter).await;
    let incident = the_one_incident(run.addr).await;
    assert_eq!(incident["id"], -1);
    assert_eq!(incident["outcome"], "blocker_finished");
    assert_eq!(scrape(run.addr).await.value("lockjam_up", &[]), Some(1.0));

    for (path, status, message) in [
        (
            "/api/v1/incidents?limit=0",
            400,
            "limit must be a whole number from 1 to 1000",
        ),
        (
            "/api/v1/incidents?limit=x",
            400,
            "limit must be a whole number from 1 to 1000",
        ),
        (
            "/api/v1/incidents?since=yesterday",
            400,
            "since `yesterday` is neither a duration",
        ),
        ("/api/v1/incidents/abc", 400, "an incident id is a whole number"),
        ("/api/v1/incidents/7", 404, "no incident 7"),
    ] {
        let (got, body) = http_get(run.addr, path).await;
        assert_eq!((got, body.contains(message)), (status, true), "{path}: {body}");
    }
    let (status, body) = http_get(run.addr, "/api/v1/incidents?target=default&since=1h&limit=1").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        serde_json::json!({ "incidents": [incident] })
    );

    let (_, log) = run.terminate();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot open the incident store"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(warnings[0].contains(&store.display().to_string()), "{}", warnings[0]);
    assert!(warnings[0].contains("kept in memory only"), "{}", warnings[0]);
    assert_eq!(std::fs::read(&store).unwrap(), garbage, "the file is left as it was");
    env.stop().await;
}
