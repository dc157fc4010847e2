//! lockjam on a hot standby, with a real primary streaming to it: a
//! recovery conflict (WAL replay of the primary's ACCESS EXCLUSIVE lock,
//! waiting for a standby query that holds the table) is shown for what it
//! is, with the standby query it waits for as the root blocker, and the
//! policy stays off the standby unless a rule says otherwise.

use std::time::Duration;

use lockjam::cluster::{Cluster, ClusterOptions};
use lockjam::policy::{Policy, Rule};
use lockjam::service::Service;
use tokio_postgres::Client;

use crate::support::{backend_pid, config_with, connect, events, scrape, start_cluster, wait_until};

/// A primary with table `held` in database `app`, and a hot standby that
/// replays it and waits for its queries forever
/// (`max_standby_streaming_delay = -1`), so that a conflict lasts.
struct Pair {
    primary: Cluster,
    standby: Cluster,
}

impl Pair {
    async fn start() -> Pair {
        let primary = start_cluster(ClusterOptions::default()).await;
        let postgres = connect(&primary.dsn("postgres"), "fixture").await;
        postgres.batch_execute("CREATE DATABASE app").await.unwrap();
        let app = connect(&primary.dsn("app"), "fixture").await;
        app.batch_execute("CREATE TABLE held (id int); INSERT INTO held VALUES (1)")
            .await
            .unwrap();
        drop((postgres, app));
        let standby = tokio::task::block_in_place(|| primary.start_standby(&[("max_standby_streaming_delay", "-1")]))
            .expect("the standby starts");
        Pair { primary, standby }
    }

    /// A recovery conflict: `report` on the standby holds `held` in an open
    /// transaction, the primary alters the table, replay waits for the
    /// report, and `web` on the standby queues behind replay. Returns the
    /// report's session and pid, and web's pid.
    async fn conflict(&self) -> (Client, i32, i32) {
        let report = connect(&self.standby.dsn("app"), "report").await;
        report.batch_execute("BEGIN; SELECT count(*) FROM held").await.unwrap();
        let report_pid = backend_pid(&report).await;
        let migration = connect(&self.primary.dsn("app"), "migration").await;
        migration
            .batch_execute("ALTER TABLE held ADD COLUMN note text")
            .await
            .unwrap();
        // The ALTER reaches the standby asynchronously: web queues behind
        // replay only once replay waits.
        let observer = connect(&self.standby.dsn("app"), "fixture").await;
        wait_until("replay to wait for the report", || async {
            observer
                .query_one(
                    "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid) \
                     WHERE a.backend_type = 'startup' AND NOT l.granted",
                    &[],
                )
                .await
                .map(|row| row.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        })
        .await;
        let web = connect(&self.standby.dsn("app"), "web").await;
        let web_pid = backend_pid(&web).await;
        tokio::spawn(async move { web.simple_query("SELECT count(*) FROM held").await.map(|_| ()) });
        (report, report_pid, web_pid)
    }
}

async fn snapshot(service: &Service) -> serde_json::Value {
    let (status, body) = crate::support::http_get(service.local_addr(), "/api/v1/snapshot").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["targets"][0].clone()
}

fn session(list: &serde_json::Value, pid: i64) -> Option<&serde_json::Value> {
    list.as_array()?.iter().find(|s| s["pid"] == pid)
}

/// Replay waiting for a standby query is a waiter named for what it is, in
/// the database of the table, blocked (hard) by the report, which is the
/// root blocker; the web query behind replay is its victim. Before, replay
/// showed as a root blocker under datname "" and the report not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recovery_conflict_shows_replay_waiting_for_the_standby_query() {
    let pair = Pair::start().await;
    let service = Service::start(&config_with(
        vec![("standby", pair.standby.dsn("postgres"))],
        Policy::default(),
    ))
    .await
    .unwrap();
    let (_report, report_pid, web_pid) = pair.conflict().await;
    let report_pid = i64::from(report_pid);
    let web_pid = i64::from(web_pid);
    wait_until("the conflict to be sampled", || async {
        session(&snapshot(&service).await["waiters"], web_pid).is_some()
    })
    .await;
    let target = snapshot(&service).await;
    let waiters = target["waiters"].as_array().unwrap();
    let replay = waiters
        .iter()
        .find(|w| w["backend_type"] == "startup")
        .unwrap_or_else(|| panic!("replay is no waiter: {target}"));
    assert_eq!(replay["datname"], "app", "{replay}");
    assert_eq!(replay["mode"], "AccessExclusiveLock", "{replay}");
    assert_eq!(replay["relation"], "public.held", "{replay}");
    assert_eq!(
        replay["blocked_by"],
        serde_json::json!([{"kind": "hard", "pid": report_pid}]),
        "{replay}"
    );
    assert!(
        replay["query"]
            .as_str()
            .unwrap()
            .starts_with("WAL replay: waits to apply a lock the primary took"),
        "{replay}"
    );
    let replay_pid = replay["pid"].as_i64().unwrap();
    let web = session(&target["waiters"], web_pid).unwrap();
    assert_eq!(
        web["blocked_by"],
        serde_json::json!([{"kind": "soft", "pid": replay_pid}]),
        "{web}"
    );
    assert_eq!(web["chain_depth"], 2, "{web}");
    let report = session(&target["blockers"], report_pid).unwrap_or_else(|| panic!("report not shown: {target}"));
    assert_eq!(report["root"], true, "{report}");
    assert_eq!(report["state"], "idle in transaction", "{report}");
    assert_eq!(session(&target["blockers"], replay_pid).unwrap()["root"], false);

    let scrape = scrape(service.local_addr()).await;
    let waiters = |datname: &str| -> f64 {
        scrape
            .matching("lockjam_lock_waiters", &[("datname", datname)])
            .iter()
            .map(|(_, _, v)| v)
            .sum()
    };
    assert_eq!(waiters("app"), 2.0, "{}", scrape.text);
    assert_eq!(waiters(""), 0.0, "{}", scrape.text);
    assert_eq!(
        scrape.value("lockjam_root_blockers", &[("datname", "app")]),
        Some(1.0),
        "{}",
        scrape.text
    );
    service.stop().await;
}

/// With the policy live, a rule that matches replay's wait does nothing on
/// a standby, where PostgreSQL resolves the conflict itself after
/// max_standby_streaming_delay; a rule with `on_standby = true` ends the
/// report (idle in transaction: terminated) and replay goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_policy_stays_off_a_standby_unless_a_rule_says_so() {
    let pair = Pair::start().await;
    let rule = Rule::unblock_migrations(Duration::from_millis(500));
    let start = |rule: Rule| {
        let config = config_with(
            vec![("standby", pair.standby.dsn("postgres"))],
            Policy::acting(vec![rule]),
        );
        async move { Service::start(&config).await.unwrap() }
    };
    let service = start(rule.clone()).await;
    let (report, report_pid, web_pid) = pair.conflict().await;
    // Sampled long past min_wait: the rule matched, and stood aside.
    wait_until("replay to have waited 3 s", || async {
        let target = snapshot(&service).await;
        target["waiters"].as_array().is_some_and(|w| {
            w.iter()
                .any(|w| w["backend_type"] == "startup" && w["wait_seconds"].as_f64() >= Some(3.0))
        })
    })
    .await;
    assert_eq!(events(service.local_addr()).await, Vec::<serde_json::Value>::new());
    report
        .batch_execute("SELECT 1")
        .await
        .expect("the report is left alone");
    service.stop().await;

    let service = start(Rule {
        on_standby: true,
        ..rule
    })
    .await;
    wait_until("the report to be signalled", || async {
        events(service.local_addr())
            .await
            .iter()
            .any(|e| e["outcome"] == "success" && e["signalled_pid"] == report_pid)
    })
    .await;
    let event = events(service.local_addr()).await.remove(0);
    assert_eq!(event["action"], "terminate", "{event}");
    assert_eq!(event["signalled_pid"], report_pid, "{event}");
    assert!(
        report.batch_execute("SELECT 1").await.is_err(),
        "the report was terminated"
    );
    // Replay applied the ALTER, and web's query went through behind it.
    let standby = connect(&pair.standby.dsn("app"), "check").await;
    wait_until("replay to apply the ALTER", || async {
        standby
            .query_one(
                "SELECT count(*) FROM pg_attribute WHERE attrelid = 'held'::regclass AND attname = 'note'",
                &[],
            )
            .await
            .map(|row| row.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    })
    .await;
    wait_until("web's query to finish", || async {
        standby
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                &[&web_pid],
            )
            .await
            .map(|row| row.get::<_, i64>(0) == 0)
            .unwrap_or(false)
    })
    .await;
    service.stop().await;
}
