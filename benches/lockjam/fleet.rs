//! Part 6: a fleet. One `lockjam run` process watching 1, 10, 50, 100 and
//! 200 targets, each its own PostgreSQL server (copies of one small
//! cluster, as a fleet cloned from one image is), every server calm with a
//! few idle sessions: resident memory, CPU per second, `/metrics` size
//! (plain and gzipped) and series, and what one more target costs.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lockjam::cluster::{Cluster, ClusterOptions};
use tokio_postgres::Client;

use crate::common::{connect, start_cluster, table, Scale};
use crate::exporter::{metrics, Served};

/// Idle application sessions on each server.
const IDLE_PER_SERVER: usize = 3;

struct Point {
    targets: usize,
    rss_kb: u64,
    cpu_percent: f64,
    metrics_bytes: usize,
    gzip_bytes: usize,
    series: usize,
}

/// Starts `servers` small servers, copies of one.
async fn fleet(servers: usize) -> (Vec<Cluster>, Vec<Client>) {
    let template = start_cluster(ClusterOptions {
        max_connections: 10,
        settings: vec![
            ("shared_buffers".into(), "1MB".into()),
            ("max_wal_senders".into(), "0".into()),
            ("wal_level".into(), "minimal".into()),
            ("max_worker_processes".into(), "1".into()),
        ],
        ..ClusterOptions::default()
    })
    .await;
    let template = tokio::task::spawn_blocking(move || {
        template.stop("fast").unwrap();
        template
    })
    .await
    .unwrap();
    let template = std::sync::Arc::new(template);
    let mut clusters = Vec::new();
    // Two copies at a time: the machine has two cores.
    for chunk in (0..servers).collect::<Vec<_>>().chunks(2) {
        let mut started = Vec::new();
        for _ in chunk {
            let template = template.clone();
            started.push(tokio::task::spawn_blocking(move || template.start_copy().unwrap()));
        }
        for copy in started {
            clusters.push(copy.await.unwrap());
        }
    }
    let mut sessions = Vec::new();
    for cluster in &clusters {
        for _ in 0..IDLE_PER_SERVER {
            sessions.push(connect(&cluster.dsn("postgres"), "web").await);
        }
    }
    (clusters, sessions)
}

/// `/metrics` as Prometheus asks for it (gzip), and its size.
fn gzipped_size(addr: SocketAddr) -> usize {
    let output = Command::new("curl")
        .args(["-s", "-H", "Accept-Encoding: gzip", &format!("http://{addr}/metrics")])
        .stderr(Stdio::null())
        .output()
        .expect("curl runs");
    output.stdout.len()
}

async fn measure(clusters: &[Cluster], targets: usize, settle: Duration, window: Duration) -> Point {
    let dir = tempfile::tempdir().unwrap();
    let mut file = String::from("[log]\nlevel = \"warn\"\n\n");
    for (i, cluster) in clusters.iter().take(targets).enumerate() {
        file.push_str(&format!(
            "[[targets]]\nname = \"db{i:03}\"\ndsn = \"{}\"\n\n",
            cluster.dsn("postgres")
        ));
    }
    let path = dir.path().join("lockjam.toml");
    std::fs::write(&path, file).unwrap();
    let run = Served::lockjam_config(&path);
    let started = Instant::now();
    loop {
        if let Some(text) = metrics(run.addr).await {
            let up = text
                .lines()
                .filter(|l| l.starts_with("lockjam_up{") && l.ends_with(" 1"))
                .count();
            if up == targets {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{targets} targets never all up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(settle).await;
    let cpu_before = run.cpu_seconds();
    let at = Instant::now();
    tokio::time::sleep(window).await;
    let cpu = run.cpu_seconds() - cpu_before;
    let elapsed = at.elapsed().as_secs_f64();
    let text = metrics(run.addr).await.expect("metrics");
    let addr = run.addr;
    Point {
        targets,
        rss_kb: run.status("VmRSS:"),
        cpu_percent: cpu / elapsed * 100.0,
        metrics_bytes: text.len(),
        gzip_bytes: tokio::task::spawn_blocking(move || gzipped_size(addr)).await.unwrap(),
        series: text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count(),
    }
}

pub async fn all(scale: Scale) -> String {
    let counts: Vec<usize> = scale.pick(vec![1, 10, 50, 100, 200], vec![1, 2]);
    let servers = *counts.last().unwrap();
    let created = Instant::now();
    let (clusters, sessions) = fleet(servers).await;
    let created = created.elapsed().as_secs_f64();
    let settle = scale.pick(Duration::from_secs(10), Duration::from_secs(1));
    let window = scale.pick(Duration::from_secs(60), Duration::from_secs(2));
    let mut points = Vec::new();
    for &targets in &counts {
        points.push(measure(&clusters, targets, settle, window).await);
    }
    drop(sessions);
    tokio::task::spawn_blocking(move || drop(clusters)).await.unwrap();

    let first = &points[0];
    let rows: Vec<Vec<String>> = points
        .iter()
        .map(|p| {
            let more = (p.targets - first.targets) as f64;
            let per = |now: f64, base: f64, digits: usize| {
                if more > 0.0 {
                    format!("{:.*}", digits, (now - base) / more)
                } else {
                    "–".into()
                }
            };
            vec![
                p.targets.to_string(),
                format!("{:.1}", p.rss_kb as f64 / 1024.0),
                per(p.rss_kb as f64 / 1024.0, first.rss_kb as f64 / 1024.0, 3),
                format!("{:.2}", p.cpu_percent),
                per(p.cpu_percent, first.cpu_percent, 4),
                format!("{:.1}", p.metrics_bytes as f64 / 1024.0),
                format!("{:.1}", p.gzip_bytes as f64 / 1024.0),
                p.series.to_string(),
                per(p.series as f64, first.series as f64, 1),
            ]
        })
        .collect();
    format!(
        "One `lockjam run` process (release build, default settings: a sample every second) watching\n\
         N targets, each its own PostgreSQL server with {IDLE_PER_SERVER} idle client sessions: {servers}\n\
         servers started for the part, copies of one small cluster (`shared_buffers = 1MB`), in\n\
         {created:.0} s. After every target is up and {settle} s more, CPU is measured over {window} s\n\
         (`/proc/PID/stat`, user + system) and VmRSS at its end. \"per target\" is the change from one\n\
         target, divided by the targets added. Sizes are of one `/metrics`, as text and as\n\
         Prometheus gets it (gzip); series are its sample lines.\n\n{}\n",
        table(
            &[
                "targets",
                "VmRSS MB",
                "MB per target",
                "CPU % of a core",
                "% per target",
                "/metrics KB",
                "gzip KB",
                "series",
                "series per target",
            ],
            &rows,
        ),
        settle = settle.as_secs(),
        window = window.as_secs(),
    )
}
