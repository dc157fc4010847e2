//! The four incident write-ups lockjam was built from (000 an analyst's
//! SELECT, 001 a backup's COPY, 002 a mailer behind ADD FOREIGN KEY, 003 an
//! analytics query behind a constraint rename), replayed with real
//! sessions on a throwaway cluster; lockjam's figures are asserted exactly.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lockjam::cluster::ClusterOptions;
use tokio::task::JoinSet;

use crate::scenes::{constraint_rename_behind_analytics, foreign_key_behind_mailer, migration_behind_long_read};
use crate::support::{backend_pid, http_get, within, TestEnv, INTERVAL};

const APP: (&str, &str) = ("datname", "app");

/// Asserts that every queue-related series of database `app` is gone and its
/// summary gauges read 0.
fn assert_drained(scrape: &crate::support::Scrape) {
    for name in [
        "lockjam_lock_queue_depth",
        "lockjam_lock_queue_head_wait_seconds",
        "lockjam_lock_waiters",
        "lockjam_relation_lock_waiters",
    ] {
        assert!(
            scrape.matching(name, &[APP]).is_empty(),
            "{name} still present:\n{}",
            scrape.text
        );
    }
    // A calm database has no lock gauges (README's cardinality budget).
    for name in [
        "lockjam_blocked_sessions",
        "lockjam_root_blockers",
        "lockjam_blocking_chain_max_depth",
        "lockjam_lock_wait_max_seconds",
        "lockjam_root_blocker_max_age_seconds",
    ] {
        assert!(scrape.matching(name, &[APP]).is_empty(), "{name}:\n{}", scrape.text);
    }
}

/// Asserts what every replayed incident's record says: where, who waited,
/// who was at the root, how deep, and how it ended (counted in
/// `lockjam_incidents_total`).
#[allow(clippy::too_many_arguments)]
async fn assert_incident(
    env: &TestEnv,
    relation: &str,
    mode: &str,
    waiter_pid: i32,
    root: (i32, &str, &str),
    peak_behind: u64,
    outcome: &str,
) -> serde_json::Value {
    let incident = env.the_one_incident().await;
    assert_eq!(incident["target"], "it");
    assert_eq!(incident["datname"], "app");
    assert_eq!(incident["relation"], relation);
    assert_eq!(incident["mode"], mode);
    assert_eq!(incident["waiter"]["pid"], waiter_pid);
    let roots = incident["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 1, "{incident:#}");
    assert_eq!(roots[0]["pid"], root.0);
    assert_eq!(roots[0]["application_name"], root.1);
    assert_eq!(roots[0]["usename"], "postgres");
    assert!(roots[0]["query"].as_str().unwrap().starts_with(root.2), "{incident:#}");
    assert_eq!(incident["peak_behind"], peak_behind, "{incident:#}");
    assert_eq!(incident["outcome"], outcome, "{incident:#}");
    let opened = humantime::parse_rfc3339(incident["opened_at"].as_str().unwrap()).unwrap();
    let closed = humantime::parse_rfc3339(incident["closed_at"].as_str().unwrap()).unwrap();
    let lasted = closed.duration_since(opened).unwrap().as_secs_f64();
    assert!((lasted - incident["duration_seconds"].as_f64().unwrap()).abs() < 0.002);
    let scrape = env.scrape().await;
    assert_eq!(
        scrape.value("lockjam_incidents_total", &[APP, ("outcome", outcome)]),
        Some(1.0),
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.value("lockjam_incident_duration_seconds_count", &[APP]),
        Some(1.0)
    );
    incident
}

/// Waits until a sample has seen a wait in `app` past `[incidents]
/// min_wait` (1 s): from that sample on, the queue is an incident.
async fn wait_past_min_wait(env: &TestEnv) {
    env.wait_for_metrics("a wait past min_wait", |m| {
        m.value("lockjam_lock_wait_max_seconds", &[APP])
            .is_some_and(|wait| wait >= 1.0)
    })
    .await;
}

/// Scrapes once two intervals after `ended` and asserts the queue is gone.
async fn assert_drained_within_two_intervals(env: &TestEnv, ended: Instant) {
    tokio::time::sleep_until((ended + INTERVAL * 2).into()).await;
    assert_drained(&env.scrape().await);
}

/// Incident 000: `ALTER TABLE orders DROP CONSTRAINT` waits behind a long
/// read; 20 SELECTs queue behind the ALTER.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_000_drop_constraint_behind_a_long_read() {
    let env = TestEnv::start().await;
    let (reader_pid, read, migration_pid, alter) = migration_behind_long_read(&env).await;

    let mut selects = JoinSet::new();
    for i in 0..20i64 {
        let client = env.session("web").await;
        selects.spawn(async move {
            client
                .query("SELECT count(*) FROM orders WHERE customer_id = $1", &[&i])
                .await
        });
    }
    env.wait_until_waiting_count("web", 20).await;

    let orders = [APP, ("relation", "public.orders"), ("mode", "AccessExclusiveLock")];
    let scrape = env
        .wait_for_metrics("a queue of 20 on orders", |m| {
            m.value("lockjam_lock_queue_depth", &orders) == Some(20.0)
        })
        .await;
    assert_eq!(scrape.value("lockjam_blocked_sessions", &[APP]), Some(21.0));
    assert_eq!(scrape.value("lockjam_root_blockers", &[APP]), Some(1.0));
    assert_eq!(scrape.value("lockjam_blocking_chain_max_depth", &[APP]), Some(2.0));
    assert_eq!(
        scrape.value(
            "lockjam_lock_waiters",
            &[APP, ("locktype", "relation"), ("mode", "AccessShareLock")]
        ),
        Some(20.0)
    );
    assert_eq!(
        scrape.value(
            "lockjam_lock_waiters",
            &[APP, ("locktype", "relation"), ("mode", "AccessExclusiveLock")]
        ),
        Some(1.0)
    );
    assert_eq!(
        scrape.matching("lockjam_lock_queue_depth", &[]).len(),
        1,
        "{}",
        scrape.text
    );
    let head_wait = scrape.value("lockjam_lock_queue_head_wait_seconds", &orders).unwrap();
    let root_age = scrape.value("lockjam_root_blocker_max_age_seconds", &[APP]).unwrap();
    // Before PostgreSQL 14 a wait first seen in this very sample shows 0 s
    // (see versions::wait_start_is_waitstart_from_14_and_first_seen_before).
    assert!(
        head_wait >= 0.0 && root_age > head_wait,
        "head {head_wait}s, root {root_age}s"
    );

    let (status, body) = http_get(env.addr(), "/api/v1/snapshot").await;
    assert_eq!(status, 200);
    let snapshot: serde_json::Value = serde_json::from_str(&body).unwrap();
    let target = &snapshot["targets"][0];
    let root = target["blockers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["root"] == true)
        .unwrap();
    assert_eq!(root["pid"], reader_pid);
    assert_eq!(root["application_name"], "analyst");
    assert_eq!(root["query"], crate::scenes::LONG_READ);
    assert_eq!(root["blocking"], serde_json::json!([migration_pid]));
    let head = target["waiters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["pid"] == migration_pid)
        .unwrap();
    assert_eq!(head["relation"], "public.orders");
    assert_eq!(head["mode"], "AccessExclusiveLock");
    assert_eq!(
        head["blocked_by"],
        serde_json::json!([{"pid": reader_pid, "kind": "hard"}])
    );
    let web_waiter = target["waiters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["application_name"] == "web")
        .unwrap();
    assert_eq!(
        web_waiter["blocked_by"],
        serde_json::json!([{"pid": migration_pid, "kind": "soft"}])
    );
    assert_eq!(target["queues"][0]["depth"], 20);

    wait_past_min_wait(&env).await;
    env.admin
        .query_one("SELECT pg_cancel_backend($1)", &[&reader_pid])
        .await
        .unwrap();
    let ended = Instant::now();
    let read_error = within("the read", read).await.unwrap().unwrap_err();
    assert_eq!(
        read_error.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    within("the ALTER", alter)
        .await
        .unwrap()
        .expect("the ALTER succeeds once the read is gone");
    while let Some(select) = within("the SELECTs", selects.join_next()).await {
        select.unwrap().expect("every queued SELECT succeeds");
    }
    assert_drained_within_two_intervals(&env, ended).await;
    let incident = assert_incident(
        &env,
        "public.orders",
        "AccessExclusiveLock",
        migration_pid,
        (reader_pid, "analyst", crate::scenes::LONG_READ),
        20,
        "blocker_finished",
    )
    .await;
    assert_eq!(incident["waiter"]["query"], crate::scenes::DROP_CONSTRAINT);
    assert_eq!(incident["roots"][0]["holds"]["mode"], "AccessShareLock");
    assert_eq!(incident["peak_blocked_sessions"], 21);
    assert_eq!(incident["peak_chain_depth"], 2);
    assert_eq!(incident["stuck_relations"], serde_json::json!(["public.orders"]));
    assert_eq!(incident["decisions"], serde_json::json!([]));
    assert_ne!(incident["waiter_got_lock"], false, "{incident:#}");
    // Each of the 21 waits is observed once, when it ended.
    let scrape = env.scrape().await;
    assert_eq!(scrape.value("lockjam_lock_wait_seconds_count", &[APP]), Some(21.0));
    env.stop().await;
}

/// Incident 001: `DROP TABLE` waits behind the nightly backup's `COPY ...
/// TO stdout`, whose client does not read (the backend waits on
/// ClientWrite, holding its lock). The operator finds the blocker's pid and
/// cancels it, as in the write-up, whose backup was slow, not stopped: a
/// backend blocked in a write acts on a cancel only once its client reads
/// again (PostgreSQL checks for a cancel between writes, never inside one),
/// so the backup's client resumes reading after the cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_001_drop_table_behind_a_stalled_backup() {
    let env = TestEnv::start().await;
    env.admin
        .batch_execute(
            "CREATE TABLE field_history (id bigint, object_id bigint, field_name text, serialized_data text);
             INSERT INTO field_history
                 SELECT g, g, 'status', repeat('x', 200) FROM generate_series(1, 200000) AS g;",
        )
        .await
        .unwrap();

    let backup = env.session("Heroku Postgres Backups").await;
    let backup_pid = backend_pid(&backup).await;
    // The COPY stream is never polled: the server fills the socket and
    // waits for the client, as a backup writing to a slow pipe does.
    let copy = backup
        .copy_out("COPY public.field_history (id, object_id, field_name, serialized_data) TO stdout")
        .await
        .unwrap();
    crate::support::wait_until("the backup to wait on ClientWrite", || async {
        env.admin
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'ClientWrite'",
                &[&backup_pid],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;

    let (release_pid, drop_table) = env.spawn_statement("release", "DROP TABLE field_history").await;
    env.wait_until_waiting(release_pid).await;
    let mut reads = JoinSet::new();
    for _ in 0..10 {
        let client = env.session("web").await;
        reads.spawn(async move { client.simple_query("SELECT count(*) FROM field_history").await });
    }
    env.wait_until_waiting_count("web", 10).await;

    let table = [
        APP,
        ("relation", "public.field_history"),
        ("mode", "AccessExclusiveLock"),
    ];
    let scrape = env
        .wait_for_metrics("a queue of 10 behind the DROP", |m| {
            m.value("lockjam_lock_queue_depth", &table) == Some(10.0)
        })
        .await;
    assert_eq!(scrape.value("lockjam_blocked_sessions", &[APP]), Some(11.0));
    assert_eq!(scrape.value("lockjam_root_blockers", &[APP]), Some(1.0));

    // What the operator needed: the blocker's pid, application and query.
    let (_, body) = http_get(env.addr(), "/api/v1/snapshot").await;
    let snapshot: serde_json::Value = serde_json::from_str(&body).unwrap();
    let root = snapshot["targets"][0]["blockers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["root"] == true)
        .cloned()
        .unwrap();
    assert_eq!(root["pid"], backup_pid);
    assert_eq!(root["application_name"], "Heroku Postgres Backups");
    assert_eq!(root["state"], "active");
    assert_eq!(root["wait_event_type"], "Client");
    assert_eq!(root["wait_event"], "ClientWrite");
    assert!(root["query"].as_str().unwrap().starts_with("COPY public.field_history"));

    wait_past_min_wait(&env).await;
    let pid = root["pid"].as_i64().unwrap() as i32;
    env.admin
        .query_one("SELECT pg_cancel_backend($1)", &[&pid])
        .await
        .unwrap();
    let ended = Instant::now();
    let backup_ended = tokio::spawn(async move {
        let mut copy = std::pin::pin!(copy);
        while let Some(data) = copy.next().await {
            if let Err(error) = data {
                return Some(error);
            }
        }
        None
    });
    let error = within("the backup's end", backup_ended)
        .await
        .unwrap()
        .expect("the backup is cancelled, never finishes");
    assert_eq!(error.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED));
    within("the DROP", drop_table)
        .await
        .unwrap()
        .expect("the DROP TABLE goes through once the backup is cancelled");
    while let Some(read) = within("the reads", reads.join_next()).await {
        let error = read
            .unwrap()
            .expect_err("the table is gone by the time the queued reads run");
        assert_eq!(error.code(), Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE));
    }
    assert_drained_within_two_intervals(&env, ended).await;
    let incident = assert_incident(
        &env,
        "public.field_history",
        "AccessExclusiveLock",
        release_pid,
        (backup_pid, "Heroku Postgres Backups", "COPY public.field_history"),
        10,
        "blocker_finished",
    )
    .await;
    assert_eq!(incident["roots"][0]["wait_event"], "ClientWrite");
    env.stop().await;
}

/// Incident 002: `ADD FOREIGN KEY` referencing `users` takes SHARE ROW
/// EXCLUSIVE on `users` (PostgreSQL 15): it waits behind a mailer's
/// long-running write and queues every writer, but not the readers. The
/// write-up's log shows hundreds of queued pids; here 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_002_add_foreign_key_queues_writers_not_readers() {
    const WRITERS: usize = 100;
    let env = TestEnv::start_with(ClusterOptions {
        max_connections: 140,
        ..ClusterOptions::default()
    })
    .await;
    let (mailer_pid, mail, migration_pid, add_fk) = foreign_key_behind_mailer(&env).await;
    let mut writers = JoinSet::new();
    for i in 1..=WRITERS as i64 {
        let client = env.session("web-write").await;
        writers.spawn(async move {
            client
                .execute("UPDATE users SET email = email WHERE id = $1", &[&i])
                .await
        });
    }
    env.wait_until_waiting_count("web-write", WRITERS as i64).await;

    // Readers are not queued: SHARE ROW EXCLUSIVE does not conflict with
    // ACCESS SHARE.
    let reader = env.session("web-read").await;
    let read: i64 = reader
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(read, 1000);

    let users = [APP, ("relation", "public.users"), ("mode", "ShareRowExclusiveLock")];
    let scrape = env
        .wait_for_metrics("a queue of writers on users", |m| {
            m.value("lockjam_lock_queue_depth", &users) == Some(WRITERS as f64)
        })
        .await;
    assert_eq!(
        scrape.value("lockjam_blocked_sessions", &[APP]),
        Some(WRITERS as f64 + 1.0)
    );
    assert_eq!(scrape.value("lockjam_root_blockers", &[APP]), Some(1.0));
    assert_eq!(
        scrape.value("lockjam_lock_waiters", &[APP, ("mode", "RowExclusiveLock")]),
        Some(WRITERS as f64)
    );
    assert_eq!(
        scrape.value("lockjam_lock_waiters", &[APP, ("mode", "ShareRowExclusiveLock")]),
        Some(1.0)
    );
    assert_eq!(
        scrape.value("lockjam_lock_waiters", &[APP, ("mode", "AccessShareLock")]),
        None
    );

    wait_past_min_wait(&env).await;
    // As in the write-up, the migration is aborted by hand.
    env.admin
        .query_one("SELECT pg_cancel_backend($1)", &[&migration_pid])
        .await
        .unwrap();
    let ended = Instant::now();
    let error = within("the ADD FOREIGN KEY", add_fk).await.unwrap().unwrap_err();
    assert_eq!(error.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED));
    while let Some(write) = within("the writers", writers.join_next()).await {
        assert_eq!(write.unwrap().expect("every queued writer succeeds"), 1);
    }
    assert_drained_within_two_intervals(&env, ended).await;
    let incident = assert_incident(
        &env,
        "public.users",
        "ShareRowExclusiveLock",
        migration_pid,
        (mailer_pid, "mailer", "BEGIN; UPDATE users SET last_mailed_at"),
        WRITERS as u64,
        "waiter_gone",
    )
    .await;
    assert_eq!(incident["waiter_got_lock"], false);
    assert_eq!(incident["roots"][0]["holds"]["mode"], "RowExclusiveLock");
    env.admin
        .query_one("SELECT pg_cancel_backend($1)", &[&mailer_pid])
        .await
        .unwrap();
    assert!(within("the mailer", mail).await.unwrap().is_err());
    env.stop().await;
}

/// Incident 003: renaming a foreign-key constraint (ACCESS EXCLUSIVE) of a
/// new, empty table behind a long analytics query queues the API's reads;
/// the lesson is `lock_timeout`: the migration gives up and the queue
/// drains by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_003_rename_constraint_until_lock_timeout() {
    let env = TestEnv::start().await;
    let lock_timeout = Duration::from_secs(4);
    let (analytics_pid, report, migration_pid, rename) = constraint_rename_behind_analytics(&env, lock_timeout).await;
    let mut api = JoinSet::new();
    for i in 0..10i64 {
        let client = env.session("api").await;
        api.spawn(async move {
            client
                .query("SELECT id FROM payment_events WHERE payment_id = $1", &[&i])
                .await
        });
    }
    env.wait_until_waiting_count("api", 10).await;

    let events = [
        APP,
        ("relation", "public.payment_events"),
        ("mode", "AccessExclusiveLock"),
    ];
    let scrape = env
        .wait_for_metrics("a queue of 10 API reads", |m| {
            m.value("lockjam_lock_queue_depth", &events) == Some(10.0)
        })
        .await;
    assert_eq!(scrape.value("lockjam_blocked_sessions", &[APP]), Some(11.0));
    assert_eq!(scrape.value("lockjam_root_blockers", &[APP]), Some(1.0));
    let head_wait = scrape.value("lockjam_lock_queue_head_wait_seconds", &events).unwrap();
    assert!(head_wait < lock_timeout.as_secs_f64(), "head wait {head_wait}");

    let error = within("the RENAME", rename).await.unwrap().unwrap_err();
    let ended = Instant::now();
    assert_eq!(error.code(), Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE));
    while let Some(read) = within("the API reads", api.join_next()).await {
        assert!(read.unwrap().expect("every API read succeeds").is_empty());
    }
    assert_drained_within_two_intervals(&env, ended).await;
    let scrape = env.scrape().await;
    assert_eq!(scrape.value("lockjam_lock_wait_seconds_count", &[APP]), Some(11.0));
    // No wait outlived the migration's lock_timeout of 4 s.
    assert_eq!(
        scrape.value("lockjam_lock_wait_seconds_bucket", &[APP, ("le", "5")]),
        Some(11.0)
    );
    let incident = assert_incident(
        &env,
        "public.payment_events",
        "AccessExclusiveLock",
        migration_pid,
        (
            analytics_pid,
            "analytics",
            "SELECT pg_sleep(600), count(*) FROM payment_events",
        ),
        10,
        "waiter_gone",
    )
    .await;
    assert_eq!(incident["waiter_got_lock"], false);
    env.admin
        .query_one("SELECT pg_cancel_backend($1)", &[&analytics_pid])
        .await
        .unwrap();
    assert!(within("the report", report).await.unwrap().is_err());
    env.stop().await;
}

/// A release's migration altered `orders` (it holds ACCESS EXCLUSIVE there)
/// and now waits to drop `legacy`, which a backup reads. 17 queries on
/// `orders` wait behind the migration's lock; 3 on `legacy` queue behind
/// its request. The one queue is on `legacy`, with all 20 behind its head;
/// `lockjam_relation_lock_waiters` says where the queries are stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queries_stuck_on_a_table_the_queue_head_altered() {
    let env = TestEnv::start().await;
    env.admin
        .batch_execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, total numeric);
             CREATE TABLE legacy (id bigint PRIMARY KEY);",
        )
        .await
        .unwrap();
    let (backup_pid, _backup) = env
        .spawn_statement("pg_dump", "SELECT pg_sleep(600), count(*) FROM legacy")
        .await;
    env.wait_until_holding(backup_pid, "legacy", None).await;
    let (migration_pid, _migration) = env
        .spawn_transaction(
            "release",
            &["ALTER TABLE orders ADD COLUMN note text", "DROP TABLE legacy"],
        )
        .await;
    env.wait_until_waiting(migration_pid).await;
    let mut queries = JoinSet::new();
    for _ in 0..17 {
        queries.spawn(env.spawn_statement("web", "SELECT count(*) FROM orders").await.1);
    }
    for _ in 0..3 {
        queries.spawn(env.spawn_statement("web", "SELECT count(*) FROM legacy").await.1);
    }
    env.wait_until_waiting_count("web", 20).await;
    let metrics = env
        .wait_for_metrics("the queries stuck on both tables", |m| {
            m.value("lockjam_relation_lock_waiters", &[APP, ("relation", "public.orders")]) == Some(17.0)
                && m.value("lockjam_relation_lock_waiters", &[APP, ("relation", "public.legacy")]) == Some(4.0)
        })
        .await;
    let queues: Vec<(String, f64)> = metrics
        .matching("lockjam_lock_queue_depth", &[APP])
        .iter()
        .map(|(_, labels, depth)| (labels["relation"].clone(), *depth))
        .collect();
    assert_eq!(queues, vec![("public.legacy".to_string(), 20.0)]);
    env.admin
        .query_one("SELECT pg_terminate_backend($1)", &[&backup_pid])
        .await
        .unwrap();
    // The queries on orders run once the migration commits; those on
    // legacy fail, as legacy is gone by then.
    let mut succeeded = 0;
    while let Some(query) = within("the queries", queries.join_next()).await {
        if query.unwrap().unwrap().is_ok() {
            succeeded += 1;
        }
    }
    assert_eq!(succeeded, 17);
    env.stop().await;
}

/// While lockjam only watches, a tick that finds the same backends waiting
/// reuses the last read of the waiters (the costliest statement of a
/// sample) for up to `activity_interval`; a new waiter is read on the tick
/// it appears, and so is everything after `activity_interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standing_queue_is_read_again_only_when_it_changes() {
    use lockjam::config::SamplerConfig;
    use lockjam::sampler::Sampler;
    use lockjam::snapshot::Snapshot;

    let env = TestEnv::start().await;
    let (reader, reader_pid, _, _alter) =
        crate::scenes::read_in_transaction(&env, "ALTER TABLE orders ADD COLUMN note text").await;
    let target = env.target();
    let refresh = Duration::from_secs(3);
    let config = SamplerConfig {
        activity_interval: refresh,
        ..crate::support::sampler_config()
    };
    let mut sampler = Sampler::new(&target, &config).unwrap();
    sampler.reuse_waiting_reads(true);
    let reader_app = |snapshot: &Snapshot| {
        snapshot
            .sessions
            .iter()
            .find(|s| s.pid == reader_pid)
            .and_then(|s| s.application_name.clone())
            .expect("the reader blocks the migration")
    };
    let first = sampler.sample().await.unwrap();
    let first_read = Instant::now();
    assert_eq!(reader_app(&first), "analyst");

    // The same backend waits: the read is reused, on a new clock.
    reader.batch_execute("SET application_name = 'renamed'").await.unwrap();
    let second = sampler.sample().await.unwrap();
    assert!(
        first_read.elapsed() < refresh,
        "the second sample came too late to test reuse"
    );
    assert_eq!(reader_app(&second), "analyst");
    assert_eq!(second.locks, first.locks);
    assert!(second.taken_at > first.taken_at);

    // A new waiter: read afresh on the tick it appears.
    let (web_pid, _web) = env.spawn_statement("web", "SELECT count(*) FROM orders").await;
    env.wait_until_waiting(web_pid).await;
    let third = sampler.sample().await.unwrap();
    assert_eq!(reader_app(&third), "renamed");
    assert!(third.sessions.iter().any(|s| s.pid == web_pid));

    // The same waiters, after activity_interval: read afresh.
    reader.batch_execute("SET application_name = 'again'").await.unwrap();
    tokio::time::sleep(refresh).await;
    assert_eq!(reader_app(&sampler.sample().await.unwrap()), "again");

    // Without reuse (a policy, or a fast_interval), every tick reads.
    sampler.reuse_waiting_reads(false);
    reader.batch_execute("SET application_name = 'fresh'").await.unwrap();
    assert_eq!(reader_app(&sampler.sample().await.unwrap()), "fresh");
}
