//! A fleet as users configure it: one target per server. Targets that
//! reach one server are refused (the habit postgres_exporter users bring,
//! one target per database, multiplied every series), and other lockjam
//! instances' sessions are no application's.

use std::time::Duration;

use lockjam::cluster::ClusterOptions;
use lockjam::service::{Service, ServiceError};

use crate::support::{config_for, connect, lockjam, scrape, start_cluster, wait_until, TestEnv};

#[tokio::test(flavor = "multi_thread")]
async fn twenty_targets_on_one_server_are_refused_naming_them() {
    let cluster = start_cluster(ClusterOptions::default()).await;
    let postgres = connect(&cluster.dsn("postgres"), "fixture").await;
    let mut file = String::new();
    let mut names = Vec::new();
    for i in 0..20 {
        postgres
            .batch_execute(&format!("CREATE DATABASE tenant{i:02}"))
            .await
            .unwrap();
        names.push(format!("tenant{i:02}"));
        file.push_str(&format!(
            "[[targets]]\nname = \"tenant{i:02}\"\ndsn = \"{}\"\n\n",
            cluster.dsn(&format!("tenant{i:02}"))
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lockjam.toml");
    std::fs::write(&path, file).unwrap();
    let output = tokio::task::spawn_blocking(move || {
        lockjam()
            .args(["run", "--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let listed: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    assert!(
        stderr.contains(&format!(
            "targets {} are one PostgreSQL server (system identifier ",
            listed.join(", ")
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("one target sees every database of its server"),
        "{stderr}"
    );

    // A reload that would add a second target on the server is refused, and
    // the target in force keeps sampling.
    let mut service = Service::start(&config_for(vec![("main", cluster.dsn("postgres"))]))
        .await
        .unwrap();
    let twice = config_for(vec![
        ("main", cluster.dsn("postgres")),
        ("again", cluster.dsn("tenant00")),
    ]);
    let refused = service.reload(&twice).await.unwrap_err();
    assert!(matches!(refused, ServiceError::SameServer(_)), "{refused}");
    assert!(refused.is_configuration());
    assert!(
        refused
            .to_string()
            .starts_with("targets `main`, `again` are one PostgreSQL server"),
        "{refused}"
    );
    let addr = service.local_addr();
    wait_until("main to be up", || async {
        scrape(addr).await.value("lockjam_up", &[("target", "main")]) == Some(1.0)
    })
    .await;
    assert!(scrape(addr)
        .await
        .matching("lockjam_up", &[("target", "again")])
        .is_empty());
    service.stop().await;
}

/// Sessions of database `postgres`, all states, as `addr` exports them.
async fn sessions_in_postgres(addr: std::net::SocketAddr) -> f64 {
    scrape(addr)
        .await
        .matching("lockjam_sessions", &[("datname", "postgres")])
        .iter()
        .map(|(_, _, value)| value)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn another_lockjams_sessions_are_not_the_applications() {
    let env = TestEnv::start().await;
    let mine = env.addr();
    let app = env.session("web").await;
    app.batch_execute("SELECT 1").await.unwrap();
    // The fixture's own sessions come and go at start: count once they
    // have settled, a read of the sessions later (activity_interval 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let before = sessions_in_postgres(mine).await;

    // A second lockjam on the same server, its policy on (a leader
    // session too), as a failover replica runs.
    let policy =
        lockjam::policy::Policy::acting(vec![lockjam::policy::Rule::unblock_migrations(Duration::from_secs(30))]);
    let other = Service::start(&crate::support::config_with(
        vec![("it", env.cluster.dsn("postgres"))],
        policy,
    ))
    .await
    .unwrap();
    let theirs = other.local_addr();
    wait_until("the other lockjam to sample", || async {
        scrape(theirs).await.value("lockjam_up", &[("target", "it")]) == Some(1.0)
    })
    .await;
    let postgres = connect(&env.cluster.dsn("postgres"), "lockjam-test-probe").await;
    let lockjam_sessions: i64 = postgres
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'lockjam' AND datname = 'postgres'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(lockjam_sessions >= 3, "both lockjams are connected: {lockjam_sessions}");
    drop(postgres);
    // Two reads of the sessions later (activity_interval is 5 s), each
    // lockjam counts what it counted alone.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(sessions_in_postgres(mine).await, before);
    assert_eq!(sessions_in_postgres(theirs).await, before);
    other.stop().await;
}
