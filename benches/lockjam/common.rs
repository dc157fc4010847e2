//! What every part of the bench shares: clusters, sessions, lockjam
//! configurations, statistics and Markdown tables.

use std::time::Duration;

use lockjam::cluster::{Cluster, ClusterOptions};
use lockjam::config::Config;
use lockjam::policy::Policy;
use tokio_postgres::Client;

/// The scale of a run: `full` for BENCHMARKS.md, `smoke` (seconds) for CI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Full,
    Smoke,
}

impl Scale {
    pub fn pick<T>(self, full: T, smoke: T) -> T {
        match self {
            Scale::Full => full,
            Scale::Smoke => smoke,
        }
    }
}

pub async fn start_cluster(options: ClusterOptions) -> Cluster {
    tokio::task::spawn_blocking(move || Cluster::start(&options))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start a throwaway PostgreSQL cluster: {e}"))
}

pub async fn connect(dsn: &str, application_name: &str) -> Client {
    lockjam::staging::connect(dsn, application_name)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {dsn}: {}", lockjam::connect::error_chain(&e)))
}

pub async fn backend_pid(client: &Client) -> i32 {
    client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0)
}

/// Waits until `count` backends wait for a heavyweight lock.
pub async fn wait_for_waiters(admin: &Client, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "{count} lock waiters never showed up"
        );
        let waiting: i64 = admin
            .query_one("SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted", &[])
            .await
            .unwrap()
            .get(0);
        if waiting as usize >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// lockjam's configuration for one target, with its default cadence.
pub fn lockjam_config(dsn: &str, policy: Policy) -> Config {
    lockjam::staging::config(&[("bench", dsn)], ([127, 0, 0, 1], 0).into(), policy).unwrap()
}

/// Order statistics of a set of measurements.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub n: usize,
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        assert!(!values.is_empty(), "statistics of nothing");
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        Stats {
            n: sorted.len(),
            median: at(0.5),
            p10: at(0.1),
            p90: at(0.9),
            p99: at(0.99),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }
}

/// "median (min–max)" of repeated runs, with `unit` and `digits` decimals.
pub fn spread(values: &[f64], digits: usize, unit: &str) -> String {
    let s = Stats::of(values);
    if values.len() == 1 || (s.min - s.max).abs() < f64::EPSILON {
        format!("{:.digits$}{unit}", s.median)
    } else {
        format!("{:.digits$}{unit} ({:.digits$}–{:.digits$})", s.median, s.min, s.max)
    }
}

/// A Markdown table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut text = format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(header.len()));
    for row in rows {
        text.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    text
}

/// The mean of `values` and the half-width of its 95 % confidence
/// interval (Student's t, n − 1 degrees of freedom).
pub fn mean_ci95(values: &[f64]) -> (f64, f64) {
    // t(0.975, df) for df = 1..=30; beyond, the normal 1.96.
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    let n = values.len();
    assert!(n >= 2, "a confidence interval needs two values");
    let mean = values.iter().sum::<f64>() / n as f64;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = T.get(n - 2).copied().unwrap_or(1.96);
    (mean, t * (variance / n as f64).sqrt())
}
