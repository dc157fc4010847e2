//! Part 2: what watching costs the database. For each load (client
//! sessions × lock waiters), the server-side time of lockjam's sample and
//! of each peer's query, from `EXPLAIN (ANALYZE, TIMING OFF)`: planning
//! plus execution, as PostgreSQL reports them. Then pgbench's TPS with no
//! watcher, with `lockjam run`, and with each peer query at lockjam's rate.

use std::path::Path;
use std::time::Duration;

use futures_util::future::join_all;
use lockjam::policy::Policy;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::common::{backend_pid, connect, mean_ci95, spread, table, wait_for_waiters, Scale, Stats};
use crate::peers::PEERS;

/// Sessions and waiters on the server while measuring.
pub struct Scene {
    dsn: String,
    idle: Vec<Client>,
    waiters: Vec<tokio::task::JoinHandle<()>>,
    holder: Option<Client>,
}

impl Scene {
    pub fn new(dsn: &str) -> Scene {
        Scene {
            dsn: dsn.to_string(),
            idle: Vec::new(),
            waiters: Vec::new(),
            holder: None,
        }
    }

    /// `sessions` client sessions in all (`extra` of the caller's among
    /// them), `waiters` of them waiting on `orders` behind one
    /// idle-in-transaction holder: an ALTER, and reads queued behind it.
    pub async fn set(&mut self, admin: &Client, sessions: usize, waiters: usize, extra: usize) {
        self.clear_waiters(admin).await;
        let busy = waiters + usize::from(waiters > 0) + extra;
        let idle = sessions.saturating_sub(busy);
        // Idle sessions go first, and their backends exit, so that the
        // waiters' sessions fit under max_connections.
        if self.idle.len() > idle {
            self.idle.truncate(idle);
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while count_named(admin, "idle").await > idle as i64 {
                assert!(std::time::Instant::now() < deadline, "idle sessions never went away");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if waiters > 0 {
            let holder = connect(&self.dsn, "holder").await;
            holder
                .batch_execute("BEGIN; LOCK TABLE orders IN ACCESS SHARE MODE")
                .await
                .unwrap();
            self.holder = Some(holder);
            for n in 0..waiters {
                let client = connect(&self.dsn, "waiter").await;
                let sql = if n == 0 {
                    "ALTER TABLE orders ADD COLUMN note text"
                } else {
                    "SELECT count(*) FROM orders"
                };
                self.waiters.push(tokio::spawn(async move {
                    let _ = client.simple_query(sql).await;
                }));
                if n == 0 {
                    wait_for_waiters(admin, 1).await;
                }
            }
            wait_for_waiters(admin, waiters).await;
        }
        while self.idle.len() < idle {
            let n = (idle - self.idle.len()).min(50);
            let dsn = self.dsn.clone();
            self.idle.extend(join_all((0..n).map(|_| connect(&dsn, "idle"))).await);
        }
    }

    pub async fn clear_waiters(&mut self, admin: &Client) {
        if self.holder.is_none() {
            return;
        }
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name IN ('holder', 'waiter')",
                &[],
            )
            .await
            .unwrap();
        for waiter in self.waiters.drain(..) {
            let _ = waiter.await;
        }
        self.holder = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while count_named(admin, "holder").await + count_named(admin, "waiter").await > 0 {
            assert!(std::time::Instant::now() < deadline, "the waiters never went away");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Backends with this application name.
async fn count_named(admin: &Client, application_name: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&application_name],
        )
        .await
        .unwrap()
        .get(0)
}

/// Server-side milliseconds of one run of `sql`: planning plus execution,
/// from EXPLAIN ANALYZE without per-node timing.
async fn server_ms(client: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> f64 {
    let rows = client
        .query(&format!("EXPLAIN (ANALYZE, TIMING OFF) {sql}"), params)
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN ANALYZE failed: {e}\n{sql}"));
    rows.iter()
        .filter_map(|row| {
            let line: String = row.get(0);
            let line = line.trim();
            let value = line
                .strip_prefix("Planning Time: ")
                .or_else(|| line.strip_prefix("Execution Time: "))?;
            value.trim_end_matches(" ms").parse::<f64>().ok()
        })
        .sum()
}

/// lockjam's statements for this server, and the pids its locks read takes.
struct Lockjam {
    /// The lock table's slots, for the choice of the probe.
    lock_slots: i64,
    activity: String,
    waiters: String,
    locks: String,
}

impl Lockjam {
    async fn new(client: &Client) -> Lockjam {
        let session = client.query_one(lockjam::sampler::SESSION_SQL, &[]).await.unwrap();
        let version: i32 = session.get("server_version");
        let lock_slots: i64 = session.get("lock_slots");
        let [activity, waiters, locks] = lockjam::sampler::sample_statements(version);
        Lockjam {
            lock_slots,
            activity,
            waiters,
            locks,
        }
    }

    /// One probe (every tick, the one lockjam chooses for these
    /// sessions), one read of sessions by state (every activity_interval),
    /// and (when someone waits) one waiting-path sample: probe, waiters,
    /// and the locks of the pids involved.
    async fn sample(&self, client: &Client, own: &[i32], sessions: usize) -> (f64, f64, Option<f64>) {
        let own = own.to_vec();
        let sessions = i64::try_from(sessions).unwrap();
        let probe = lockjam::sampler::Probe::choose(sessions, self.lock_slots, true).sql();
        let calm = server_ms(client, probe, &[&own]).await;
        let activity = server_ms(client, &self.activity, &[&own]).await;
        let probe = client.query_one(probe, &[&own]).await.unwrap();
        let waiting: Vec<i32> = probe.get("lock_waiting_pids");
        let in_recovery: bool = probe.get("in_recovery");
        if waiting.is_empty() {
            return (calm, activity, None);
        }
        let text_length = lockjam::sampler::QUERY_TEXT_LENGTH;
        let pids: Vec<i32> = client
            .query(&self.waiters, &[&own, &text_length, &in_recovery])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get("pid"))
            .collect();
        let waiters = server_ms(client, &self.waiters, &[&own, &text_length, &in_recovery]).await;
        let locks = server_ms(client, &self.locks, &[&pids]).await;
        (calm, activity, Some(calm + waiters + locks))
    }
}

/// Medians per query at one load: (name, median ms, p10, p90).
pub struct LoadResult {
    pub sessions: usize,
    pub waiters: usize,
    pub rows: Vec<(String, Stats)>,
}

pub const LOCKJAM_CALM: &str = "lockjam, every tick (the cheaper probe for the sessions)";
pub const LOCKJAM_ACTIVITY: &str = "lockjam, every activity_interval (activity.sql)";
pub const LOCKJAM_WAITING: &str = "lockjam, sample while someone waits (probe + waiters + locks)";
/// The candidates for lockjam's probe of every tick: is anyone waiting for
/// a lock? lockjam runs the third (`probe.sql`) or the fourth
/// (`probe_locks.sql`), whichever costs less for the sessions connected.
pub const PROBE_CANDIDATES: [(&str, &str); 4] = [
    (
        "probe candidate: the view",
        "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE wait_event_type = 'Lock'",
    ),
    (
        "probe candidate: pg_stat_get_activity(NULL), no joins",
        "SELECT count(*) FROM pg_catalog.pg_stat_get_activity(NULL) AS a WHERE a.wait_event_type = 'Lock'",
    ),
    (
        "probe candidate: per-backend functions (probe.sql)",
        "SELECT count(*) FROM pg_catalog.pg_stat_get_backend_idset() AS b \
         WHERE pg_catalog.pg_stat_get_backend_wait_event_type(b) = 'Lock'",
    ),
    (
        "probe candidate: pg_locks' ungranted rows (probe_locks.sql)",
        "SELECT count(DISTINCT l.pid) FROM pg_catalog.pg_locks AS l WHERE NOT l.granted",
    ),
];

/// Not a query: lockjam's database time per second at the default cadence.
pub const LOCKJAM_PER_SECOND: &str = "lockjam, database ms per second (a tick a second: one in five reads the sessions by state, and the waiters while the same wait, instead of probing)";

pub async fn sample_costs(dsn: &str, admin: &Client, scale: Scale) -> Vec<LoadResult> {
    let loads = scale.pick(vec![100, 500, 1000], vec![20, 40]);
    let waiter_counts = scale.pick(vec![0, 10, 100], vec![0, 5]);
    let repeats = scale.pick(200, 3);
    let client = connect(dsn, "watcher").await;
    let own = vec![backend_pid(&client).await, backend_pid(admin).await];
    let lockjam = Lockjam::new(&client).await;
    let mut scene = Scene::new(dsn);
    let mut results = Vec::new();
    for &sessions in &loads {
        for &waiters in &waiter_counts {
            // The bench's own two sessions count among the sessions.
            scene.set(admin, sessions, waiters, 2).await;
            let mut times: Vec<(String, Vec<f64>)> = Vec::new();
            let mut record = |name: &str, value: f64| match times.iter_mut().find(|(n, _)| n == name) {
                Some((_, values)) => values.push(value),
                None => times.push((name.to_string(), vec![value])),
            };
            for _ in 0..repeats {
                let (calm, activity, waiting) = lockjam.sample(&client, &own, sessions).await;
                record(LOCKJAM_CALM, calm);
                record(LOCKJAM_ACTIVITY, activity);
                // Of five ticks, four probe and one reads the sessions by
                // state instead; while the same backends wait, the
                // waiters' read is refreshed on that tick.
                let waiters_read = waiting.map_or(0.0, |w| w - calm);
                record(LOCKJAM_PER_SECOND, (4.0 * calm + activity + waiters_read) / 5.0);
                if let Some(waiting) = waiting {
                    record(LOCKJAM_WAITING, waiting);
                }
                for (name, sql) in PROBE_CANDIDATES {
                    record(name, server_ms(&client, sql, &[]).await);
                }
                for peer in &PEERS {
                    record(peer.name, server_ms(&client, peer.sql, &[]).await);
                }
            }
            eprintln!("cost: {sessions} sessions, {waiters} waiters: done");
            results.push(LoadResult {
                sessions,
                waiters,
                rows: times
                    .into_iter()
                    .map(|(name, values)| (name, Stats::of(&values)))
                    .collect(),
            });
        }
    }
    scene.clear_waiters(admin).await;
    results
}

/// One Markdown table per load of sessions: a column per waiter count,
/// each cell the median (p10–p90) and the ratio to lockjam's sample.
pub fn cost_tables(results: &[LoadResult]) -> String {
    let mut text = String::new();
    let mut loads: Vec<usize> = results.iter().map(|r| r.sessions).collect();
    loads.dedup();
    for sessions in loads {
        let at: Vec<&LoadResult> = results.iter().filter(|r| r.sessions == sessions).collect();
        let mut header = vec!["query".to_string()];
        header.extend(at.iter().map(|r| format!("{} waiters", r.waiters)));
        let names: Vec<String> = at[0]
            .rows
            .iter()
            .map(|(n, _)| n.clone())
            .chain(std::iter::once(LOCKJAM_WAITING.to_string()))
            .fold(Vec::new(), |mut names, n| {
                if !names.contains(&n) {
                    names.push(n);
                }
                names
            });
        let rows: Vec<Vec<String>> = names
            .iter()
            .map(|name| {
                let mut row = vec![name.clone()];
                for load in &at {
                    let lockjam = lockjam_sample(load);
                    row.push(match load.rows.iter().find(|(n, _)| n == name) {
                        Some((_, s)) if name.starts_with("lockjam") => {
                            format!("{:.3} ms ({:.3}–{:.3})", s.median, s.p10, s.p90)
                        }
                        Some((_, s)) => format!(
                            "{:.3} ms ({:.3}–{:.3}), {:.1}×",
                            s.median,
                            s.p10,
                            s.p90,
                            s.median / lockjam
                        ),
                        None => "—".into(),
                    });
                }
                row
            })
            .collect();
        text.push_str(&format!("**{sessions} client sessions**\n\n"));
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        text.push_str(&table(&header, &rows));
        text.push('\n');
    }
    text
}

/// lockjam's sample at a load: the waiting path when someone waits.
pub fn lockjam_sample(load: &LoadResult) -> f64 {
    let find = |name: &str| load.rows.iter().find(|(n, _)| n == name).map(|(_, s)| s.median);
    find(LOCKJAM_WAITING)
        .or_else(|| find(LOCKJAM_CALM))
        .expect("lockjam measured")
}

/// What runs beside pgbench.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watcher {
    Nothing,
    Lockjam,
    Peer(usize),
}

impl Watcher {
    fn label(self) -> String {
        match self {
            Watcher::Nothing => "no watcher".into(),
            Watcher::Lockjam => "lockjam (interval 1s, activity_interval 5s)".into(),
            Watcher::Peer(i) => format!("{} every second", PEERS[i].name),
        }
    }
}

/// pgbench TPS (select-only, 4 clients) beside each watcher, with the
/// heaviest load of part 2 on the server; rounds interleave the watchers.
pub async fn pgbench_tps(dsn: &str, port: u16, admin: &Client, scale: Scale, pgbench: &Path) -> String {
    let sessions = scale.pick(1000, 40);
    let waiters = scale.pick(100, 5);
    let seconds = scale.pick(15, 2);
    // lockjam's effect is the figure wanted with a confidence interval:
    // every round measures it against no watcher; the peers, for scale,
    // only the first rounds.
    let rounds = scale.pick(10, 2);
    let peer_rounds = scale.pick(3, 1);
    admin.batch_execute("CREATE DATABASE pgbench").await.unwrap();
    pgbench_run(pgbench, port, &["-i", "-q", "-s", "10"]).await;
    let mut scene = Scene::new(dsn);
    // pgbench's 4 clients, lockjam's session and the bench's own.
    scene.set(admin, sessions, waiters, 4 + 2).await;
    let mut watchers = vec![Watcher::Nothing, Watcher::Lockjam];
    watchers.extend((0..PEERS.len()).map(Watcher::Peer));
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); watchers.len()];
    let select_only = ["-n", "-S", "-c", "4", "-j", "2", "-T", &seconds.to_string()];
    // A first run, not counted, warms the caches for every later one.
    pgbench_run(pgbench, port, &select_only).await;
    for round in 0..rounds {
        for (i, watcher) in watchers.iter().enumerate() {
            if matches!(watcher, Watcher::Peer(_)) && round >= peer_rounds {
                continue;
            }
            let running = start_watcher(*watcher, dsn).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let stdout = pgbench_run(pgbench, port, &select_only).await;
            let value = stdout
                .lines()
                .find_map(|l| l.strip_prefix("tps = "))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no tps in pgbench's output:\n{stdout}"));
            tps[i].push(value);
            running.stop().await;
        }
    }
    scene.clear_waiters(admin).await;
    // Each round's lockjam TPS against the same round's no-watcher TPS,
    // run just before it: drift between rounds cancels.
    let paired: Vec<f64> = tps[1]
        .iter()
        .zip(&tps[0])
        .map(|(with, without)| (with / without - 1.0) * 100.0)
        .collect();
    let (effect, half_width) = mean_ci95(&paired);
    let baseline = Stats::of(&tps[0]).median;
    let rows: Vec<Vec<String>> = watchers
        .iter()
        .zip(&tps)
        .map(|(watcher, values)| {
            vec![
                watcher.label(),
                spread(values, 0, ""),
                format!("{:+.1} %", (Stats::of(values).median / baseline - 1.0) * 100.0),
            ]
        })
        .collect();
    format!(
        "pgbench -S (select-only), 4 clients, 2 threads, {seconds} s, scale 10, beside {sessions} sessions \
         of which {waiters} wait for a lock (lockjam samples every second; each peer's query runs as often); \
         {rounds} rounds with no watcher and lockjam, the peers in the first {peer_rounds}; watchers \
         interleaved, after one uncounted warm-up run; median (min–max), and against the median with no \
         watcher.\n\n{}\n\
         lockjam's effect, each round's TPS against the same round's with no watcher: \
         {effect:+.1} % ± {half_width:.1} % (mean, 95 % confidence interval over {rounds} rounds).\n",
        table(&["watcher", "TPS", "vs no watcher"], &rows)
    )
}

/// Runs pgbench with `args` against database `pgbench`; its stdout.
async fn pgbench_run(pgbench: &Path, port: u16, args: &[&str]) -> String {
    let output = tokio::process::Command::new(pgbench)
        .args(args)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "pgbench"])
        .output()
        .await
        .expect("pgbench runs");
    assert!(
        output.status.success(),
        "pgbench {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

enum Running {
    Nothing,
    Lockjam(Box<lockjam::service::Service>),
    Peer(
        tokio::task::JoinHandle<()>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    ),
}

impl Running {
    async fn stop(self) {
        match self {
            Running::Nothing => {}
            Running::Lockjam(service) => service.stop().await,
            Running::Peer(task, stop) => {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let _ = task.await;
            }
        }
    }
}

async fn start_watcher(watcher: Watcher, dsn: &str) -> Running {
    match watcher {
        Watcher::Nothing => Running::Nothing,
        Watcher::Lockjam => {
            let config = crate::common::lockjam_config(dsn, Policy::default());
            Running::Lockjam(Box::new(lockjam::service::Service::start(&config).await.unwrap()))
        }
        Watcher::Peer(i) => {
            let client = connect(dsn, "peer").await;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = stop.clone();
            let task = tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    tick.tick().await;
                    client.simple_query(PEERS[i].sql).await.unwrap();
                }
            });
            Running::Peer(task, stop)
        }
    }
}
