//! A fleet as users configure it: one target per server. Targets that
//! reach one server are refused (the habit postgres_exporter users bring,
//! one target per database, multiplied every series), and other lockjam
//! instances' sessions are no application's.

use std::collections::BTreeMap;
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

    // Two roles on one server, one that may not read the data directory:
    // still one server.
    crate::support::apply_lockjam_role_sql(&cluster, false);
    postgres.batch_execute("CREATE ROLE plain LOGIN").await.unwrap();
    let as_role = |role: &str| {
        format!(
            "host=127.0.0.1 port={} user={role} dbname=postgres sslmode=disable",
            cluster.port()
        )
    };
    let refused = Service::start(&config_for(vec![
        ("watcher", as_role("lockjam")),
        ("plain", as_role("plain")),
    ]))
    .await
    .err()
    .expect("refused");
    assert!(
        refused
            .to_string()
            .starts_with("targets `watcher`, `plain` are one PostgreSQL server"),
        "{refused}"
    );

    // Two servers, each listed twice: both pairs named in one refusal.
    let other = start_cluster(ClusterOptions::default()).await;
    let refused = Service::start(&config_for(vec![
        ("a1", cluster.dsn("postgres")),
        ("b1", other.dsn("postgres")),
        ("a2", cluster.dsn("tenant00")),
        ("b2", other.dsn("template1")),
    ]))
    .await
    .err()
    .expect("refused");
    let text = refused.to_string();
    let (first, second) = text.split_once("; targets `b1`").unwrap_or_else(|| panic!("{text}"));
    assert!(
        first.starts_with("targets `a1`, `a2` are one PostgreSQL server"),
        "{text}"
    );
    assert!(first.ends_with("keep one of them"), "{text}");
    assert!(second.starts_with(", `b2` are one PostgreSQL server"), "{text}");
    tokio::task::spawn_blocking(move || drop(other)).await.unwrap();

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

/// A multi-tenant server: 300 databases, one idle session each. With
/// `max_databases` at its default (100), the target's database series are
/// 100 named `lockjam_sessions{state="idle"}` and one `_other` holding the
/// other 200: no lock gauge, no histogram for a calm database. A wait in a
/// tenant names it (a database with waits ranks first) and brings its
/// lock series; once calm, they go, and its wait histogram stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_tenant_databases_stay_within_the_budget() {
    const TENANTS: usize = 300;
    let cluster = start_cluster(ClusterOptions {
        max_connections: TENANTS as u32 + 50,
        ..ClusterOptions::default()
    })
    .await;
    let postgres = connect(&cluster.dsn("postgres"), "fixture").await;
    let version: i32 = postgres
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    // Copying the template's files is the quicker way for many small
    // databases from 15 on (the default there writes them through WAL).
    let strategy = if version >= 150_000 { " STRATEGY FILE_COPY" } else { "" };
    let mut sessions = Vec::new();
    for i in 0..TENANTS {
        postgres
            .batch_execute(&format!("CREATE DATABASE tenant{i:03}{strategy}"))
            .await
            .unwrap();
    }
    for i in 0..TENANTS {
        sessions.push(connect(&cluster.dsn(&format!("tenant{i:03}")), "web").await);
    }
    drop(postgres);
    let service = Service::start(&config_for(vec![("multi", cluster.dsn("postgres"))]))
        .await
        .unwrap();
    let addr = service.local_addr();
    let by_datname = |scrape: &crate::support::Scrape| -> Vec<(String, BTreeMap<String, String>, f64)> {
        scrape
            .series
            .iter()
            .filter(|(_, labels, _)| labels.contains_key("datname"))
            .cloned()
            .collect()
    };
    let calm = wait_until_scrape(addr, "every tenant counted", |s| {
        s.value("lockjam_sessions", &[("datname", "_other"), ("state", "idle")]) == Some(200.0)
    })
    .await;
    let series = by_datname(&calm);
    assert_eq!(series.len(), 101, "{series:#?}");
    assert!(series
        .iter()
        .all(|(name, labels, _)| name == "lockjam_sessions" && labels["state"] == "idle"));
    let named: f64 = series
        .iter()
        .filter(|(_, labels, _)| labels["datname"] != "_other")
        .map(|(_, _, value)| value)
        .sum();
    assert_eq!(named, 100.0, "one idle session in each named tenant");
    // The whole scrape of the target: the per-target series (up, last
    // sample, 14 lines of the sample-duration histogram) and the 101.
    let of_target = calm
        .series
        .iter()
        .filter(|(_, labels, _)| labels.get("target").map(String::as_str) == Some("multi"))
        .count();
    assert_eq!(
        of_target,
        16 + 101,
        "README's formula: 16 + states × databases named + _other"
    );

    // A queue in tenant299, which the ranking had left in _other: it is
    // named, with its lock series, while it waits.
    let tenant = &sessions[TENANTS - 1];
    tenant.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let holder = connect(&cluster.dsn("tenant299"), "holder").await;
    holder.batch_execute("BEGIN; SELECT * FROM t").await.unwrap();
    let alter = {
        let dsn = cluster.dsn("tenant299");
        tokio::spawn(async move {
            let migrate = connect(&dsn, "migrate").await;
            migrate.batch_execute("ALTER TABLE t ADD COLUMN x int").await
        })
    };
    let waiting = wait_until_scrape(addr, "tenant299's wait", |s| {
        s.value("lockjam_blocked_sessions", &[("datname", "tenant299")]) == Some(1.0)
    })
    .await;
    assert_eq!(
        waiting.value("lockjam_lock_wait_seconds_count", &[("datname", "tenant299")]),
        Some(0.0),
        "its histogram, declared at 0 while the wait lasts"
    );
    assert_eq!(
        by_datname(&waiting)
            .iter()
            .filter(|(_, labels, _)| labels["datname"] != "tenant299")
            .count(),
        100,
        "the others: 99 named, and _other"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    alter.await.unwrap().unwrap();
    let after = wait_until_scrape(addr, "the wait observed", |s| {
        s.value("lockjam_lock_wait_seconds_count", &[("datname", "tenant299")]) == Some(1.0)
    })
    .await;
    assert!(
        after.matching("lockjam_blocked_sessions", &[]).is_empty(),
        "calm again: no lock gauge"
    );
    service.stop().await;
}

/// Scrapes `addr` until `check` holds; the scrape that passed.
async fn wait_until_scrape(
    addr: std::net::SocketAddr,
    what: &str,
    check: impl Fn(&crate::support::Scrape) -> bool,
) -> crate::support::Scrape {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let scraped = scrape(addr).await;
        if check(&scraped) {
            return scraped;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: never seen in\n{}",
            scraped
                .text
                .lines()
                .filter(|l| l.contains("tenant299") || l.contains("_other"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The shipped sharded deployment (`deploy/kubernetes/sharded`): its
/// configuration, loaded by `lockjam check-config` as each of the four
/// pods would (the ordinal from the pod's name), gives every target to
/// exactly two replicas, and the StatefulSet runs as many replicas as the
/// configuration says.
#[test]
fn the_sharded_manifests_give_every_target_to_two_replicas() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/sharded");
    let configmap = std::fs::read_to_string(root.join("configmap.yaml")).unwrap();
    let statefulset = std::fs::read_to_string(root.join("statefulset.yaml")).unwrap();
    let toml: String = configmap
        .split("lockjam.toml: |\n")
        .nth(1)
        .expect("the ConfigMap holds lockjam.toml")
        .lines()
        .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
        .collect();
    let replicas: u32 = toml
        .lines()
        .find_map(|l| l.strip_prefix("replicas = "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        statefulset.contains(&format!("\n  replicas: {replicas}\n")),
        "{statefulset}"
    );
    assert!(statefulset.contains("name: LOCKJAM__SHARDING__ORDINAL"));
    // The Secret's files, where the pods mount them.
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = toml
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .map(|n| n.trim_end_matches('"').to_string())
        .collect();
    for name in &names {
        std::fs::write(
            dir.path().join(name),
            format!("host={name}.db.internal user=lockjam dbname=postgres"),
        )
        .unwrap();
    }
    let file = dir.path().join("lockjam.toml");
    std::fs::write(
        &file,
        toml.replace("/etc/lockjam/secret", &dir.path().display().to_string()),
    )
    .unwrap();
    let mut watched: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for ordinal in 0..replicas {
        let output = lockjam()
            .args(["check-config", "--config"])
            .arg(&file)
            .env("LOCKJAM__SHARDING__ORDINAL", format!("lockjam-{ordinal}"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let note = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# sharding: replica {ordinal} of {replicas} watches ")))
            .unwrap_or_else(|| panic!("{stdout}"));
        let listed = note.split("replicas): ").nth(1).unwrap();
        for name in listed.split(", ").filter(|n| *n != "none") {
            watched.entry(name.to_string()).or_default().push(ordinal);
        }
        // Only the watched targets are in the effective configuration.
        assert_eq!(
            stdout.matches("[[targets]]").count(),
            listed.split(", ").filter(|n| *n != "none").count()
        );
    }
    assert_eq!(watched.len(), names.len(), "{watched:?}");
    assert!(watched.values().all(|replicas| replicas.len() == 2), "{watched:?}");
}
