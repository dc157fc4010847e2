//! `cargo bench --bench core`: the figures of BENCHMARKS.md.
//!
//! 1. Time of one sample (calm path, and with 20 real lock waiters), over
//!    many samples against a throwaway cluster: median, p90, min, max.
//! 2. Resident memory of the `lockjam run` binary after a minute of
//!    sampling those 20 waiters and being scraped every second.
//! 3. Reaction time of the policy (`cancel_blockers`, `min_wait = 2s`, the
//!    default cadence): from the waiter's `pg_locks.waitstart` to the
//!    moment the blocker's cancel took effect (its `state_change`), both
//!    on the server's clock, over several runs.
//!
//! Without `--bench` (that is, under `cargo test --benches`), it runs a
//! smoke version of the same steps in seconds, so that CI keeps it working.

use std::time::{Duration, Instant, SystemTime};

use lockjam::cluster::{Cluster, ClusterOptions};
use lockjam::config::{Config, LogConfig, LogFormat, SamplerConfig, ServerConfig, Target};
use lockjam::dsn::Dsn;
use lockjam::policy::{Policy, Rule};
use lockjam::sampler::Sampler;
use lockjam::service::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, NoTls};

const WAITERS: usize = 20;

fn main() {
    // `cargo bench` passes --bench; `cargo test` runs benches without it.
    let quick = !std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(quick));
}

async fn connect(dsn: &str, application_name: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(&format!("{dsn} application_name={application_name}"), NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// Median, p90, min and max in milliseconds.
fn summary(mut times: Vec<Duration>) -> String {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    format!(
        "n={} median={:.3} ms p90={:.3} ms min={:.3} ms max={:.3} ms",
        times.len(),
        ms(at(0.5)),
        ms(at(0.9)),
        ms(times[0]),
        ms(times[times.len() - 1])
    )
}

async fn time_samples(sampler: &mut Sampler, count: usize, expected_waiters: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let snapshot = sampler.sample().await.expect("sample");
        times.push(started.elapsed());
        let waiting = snapshot.locks.iter().filter(|l| !l.granted).count();
        assert_eq!(waiting, expected_waiters, "the scenario holds while measuring");
    }
    times
}

async fn run(quick: bool) {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(&ClusterOptions::default()))
        .await
        .unwrap()
        .expect("throwaway cluster");
    println!(
        "machine: {} cores; server: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cluster.version()
    );
    let dsn = cluster.dsn("postgres");
    let admin = connect(&dsn, "bench").await;
    admin
        .batch_execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, total numeric);
             INSERT INTO orders SELECT g, g FROM generate_series(1, 10000) AS g;",
        )
        .await
        .unwrap();
    let target = Target {
        name: "bench".into(),
        dsn: Dsn::parse(&dsn).unwrap(),
        default_user: None,
    };
    let mut sampler = Sampler::new(&target, &SamplerConfig::default()).unwrap();
    let samples = if quick { 20 } else { 1000 };
    sampler.sample().await.unwrap();
    println!(
        "sample, calm (no waiters): {}",
        summary(time_samples(&mut sampler, samples, 0).await)
    );

    // The incident: a long read, an ALTER waiting, 19 SELECTs behind it.
    let reader = connect(&dsn, "analyst").await;
    tokio::spawn(async move { reader.simple_query("SELECT pg_sleep(3600), count(*) FROM orders").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let migration = connect(&dsn, "migrate").await;
    tokio::spawn(async move { migration.simple_query("ALTER TABLE orders ADD COLUMN note text").await });
    let mut sessions = Vec::new();
    for _ in 1..WAITERS {
        let client = connect(&dsn, "web").await;
        sessions.push(tokio::spawn(async move {
            client.simple_query("SELECT count(*) FROM orders").await
        }));
    }
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting as usize == WAITERS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sampler.sample().await.unwrap();
    println!(
        "sample, {WAITERS} waiters: {}",
        summary(time_samples(&mut sampler, samples, WAITERS).await)
    );

    let minute = if quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(60)
    };
    let rss = lockjam_run_rss(&dsn, minute).await;
    println!(
        "lockjam run, resident memory after {}s with {WAITERS} waiters, scraped every second: {rss} kB",
        minute.as_secs()
    );
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'analyst'",
            &[],
        )
        .await
        .unwrap();

    let runs = if quick { 1 } else { 10 };
    let reactions = reaction_times(&dsn, &admin, runs).await;
    println!(
        "policy reaction, waiter's wait start to the blocker's cancel (min_wait 2s, interval 1s, fast_interval 250ms): {}",
        summary(reactions)
    );
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

/// Runs lockjam in-process with the one-rule policy and stages `runs`
/// incidents, each on its own table; returns each reaction time.
async fn reaction_times(dsn: &str, admin: &Client, runs: usize) -> Vec<Duration> {
    let config = Config {
        server: ServerConfig {
            listen: ([127, 0, 0, 1], 0).into(),
        },
        sampler: SamplerConfig::default(),
        targets: vec![Target {
            name: "bench".into(),
            dsn: Dsn::parse(dsn).unwrap(),
            default_user: None,
        }],
        log: LogConfig {
            format: LogFormat::Text,
            level: "warn".into(),
        },
        policy: Policy::acting(vec![Rule::unblock_migrations(Duration::from_secs(2))]),
    };
    let service = Service::start(&config).await.unwrap();
    let mut reactions = Vec::new();
    for run in 0..runs {
        let table = format!("reaction_{run}");
        admin
            .batch_execute(&format!(
                "CREATE TABLE {table} (id int); INSERT INTO {table} VALUES (1)"
            ))
            .await
            .unwrap();
        let reader = connect(dsn, "analyst").await;
        let reader_pid: i32 = reader.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        let read_sql = format!("SELECT pg_sleep(600), count(*) FROM {table}");
        // The reader's client is kept, so that its session (and its
        // state_change) outlive the cancelled statement.
        let read = tokio::spawn(async move {
            let result = reader.simple_query(&read_sql).await;
            (reader, result)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let migration = connect(dsn, "migrate").await;
        let migration_pid: i32 = migration
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let alter_sql = format!("ALTER TABLE {table} ADD COLUMN note text");
        let alter = tokio::spawn(async move { migration.simple_query(&alter_sql).await });
        let wait_start: SystemTime = loop {
            let row = admin
                .query_opt(
                    "SELECT waitstart FROM pg_locks WHERE pid = $1 AND NOT granted AND waitstart IS NOT NULL",
                    &[&migration_pid],
                )
                .await
                .unwrap();
            if let Some(row) = row {
                break row.get(0);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        alter.await.unwrap().expect("the policy unblocks the ALTER");
        let (_reader, result) = read.await.unwrap();
        assert!(result.is_err(), "the read was cancelled");
        let cancelled: SystemTime = admin
            .query_one(
                "SELECT state_change FROM pg_stat_activity WHERE pid = $1",
                &[&reader_pid],
            )
            .await
            .unwrap()
            .get(0);
        reactions.push(cancelled.duration_since(wait_start).unwrap());
    }
    service.stop().await;
    reactions
}

/// Starts the `lockjam` binary, scrapes it every second for `duration`, and
/// returns its VmRSS in kB.
async fn lockjam_run_rss(dsn: &str, duration: Duration) -> u64 {
    let port = lockjam::cluster::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lockjam"))
        .args(["run", "--dsn", dsn, "--listen", &listen])
        .env("LOCKJAM__LOG__LEVEL", "warn")
        .spawn()
        .expect("lockjam binary");
    let started = Instant::now();
    let mut scrapes = 0;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(mut stream) = tokio::net::TcpStream::connect(&listen).await {
            let _ = stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                .await;
            let mut body = Vec::new();
            let _ = stream.read_to_end(&mut body).await;
            if String::from_utf8_lossy(&body).contains("lockjam_lock_queue_depth{") {
                scrapes += 1;
            }
        }
    }
    assert!(scrapes > 0, "lockjam run never showed the queue");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    rss
}
