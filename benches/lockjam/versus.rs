//! Part 4: lockjam beside the real postgres_exporter (Debian's
//! `prometheus-postgres-exporter`), both running at once on one cluster,
//! each under a role of its own with `pg_monitor`, so that
//! `pg_stat_statements` counts each one's statements apart: database time
//! per second in three scenes, resident memory, and `/metrics` under wrk.
//! A second lockjam, with its policy on in dry run (it decides but never
//! signals), shows what turning the policy on costs: every tick is read
//! fresh, and rules' deadlines add samples.
//!
//! postgres_exporter reads the database at every scrape, so its cost is
//! per scrape: the table gives it at a 15 s and a 5 s scrape interval.
//! lockjam reads the database on its own cadence whatever the scrapes, so
//! its cost is per second.

use std::time::{Duration, Instant};

use lockjam::cluster::ClusterOptions;
use tokio_postgres::Client;

use futures_util::future::join_all;

use crate::common::{connect, spread, start_cluster, table, wait_for_waiters, Scale, Stats};
use crate::cost::Scene;
use crate::exporter::{metrics, wrk, Served, POSTGRES_EXPORTER};

/// One scene: client sessions, of which this many wait for a lock.
struct SceneSpec {
    label: String,
    sessions: usize,
    waiters: usize,
}

/// A lockjam process beside postgres_exporter: its column in the table,
/// and the role whose statements are its own.
struct Lockjam {
    column: String,
    role: &'static str,
    served: Served,
}

/// What the windows of one scene measured.
#[derive(Default, Clone)]
struct Window {
    /// Each lockjam's (in order) database milliseconds and statements per
    /// second, one value a window.
    lockjam_ms: Vec<Vec<f64>>,
    lockjam_calls: Vec<Vec<f64>>,
    /// postgres_exporter's database milliseconds and statements per scrape.
    exporter_ms: Vec<f64>,
    exporter_calls: Vec<f64>,
}

const LOCKJAM_ROLE: &str = "lockjam_watch";
const POLICY_ROLE: &str = "lockjam_policy";
const BEFORE_ROLE: &str = "lockjam_before";
const EXPORTER_ROLE: &str = "exporter_watch";

/// `LOCKJAM_BENCH_BEFORE=<git revision>`: lockjam as built from that
/// revision runs beside the others with its default configuration, for a
/// before-and-after in one run. Built once into `target/before/` from a
/// `git archive` of the revision, not a worktree.
fn before_binary() -> Option<(String, std::path::PathBuf)> {
    let rev = std::env::var("LOCKJAM_BENCH_BEFORE").ok().filter(|r| !r.is_empty())?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = |command: &mut std::process::Command| {
        let status = command.status().expect("git, tar and cargo run");
        assert!(status.success(), "{command:?} failed");
    };
    // Named by its commit, so that a branch name that moves, or a value
    // that is no revision at all, never reuses or escapes the directory.
    let commit = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "--verify", "--end-of-options"])
        .arg(format!("{rev}^{{commit}}"))
        .output()
        .expect("git runs");
    assert!(
        commit.status.success(),
        "LOCKJAM_BENCH_BEFORE={rev:?} names no commit of this repository"
    );
    let commit = String::from_utf8_lossy(&commit.stdout).trim().to_string();
    let source = std::env::temp_dir().join(format!("lockjam-before-{commit}"));
    if !source.join("Cargo.toml").is_file() {
        std::fs::create_dir_all(&source).unwrap();
        let archive = source.with_extension("tar");
        run(std::process::Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["archive", "--format=tar", "-o"])
            .arg(&archive)
            .arg(&commit));
        run(std::process::Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&source));
    }
    let target = root.join("target/before");
    eprintln!("versus: building lockjam at {rev} (LOCKJAM_BENCH_BEFORE)");
    run(std::process::Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--bin", "lockjam", "--manifest-path"])
        .arg(source.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target));
    Some((rev, target.join("release/lockjam")))
}

pub async fn all(scale: Scale) -> String {
    let before = before_binary();
    let cluster = start_cluster(ClusterOptions {
        max_connections: 1100,
        settings: [
            ("shared_preload_libraries", "pg_stat_statements"),
            ("pg_stat_statements.track", "all"),
            ("pg_stat_statements.track_planning", "on"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..Default::default()
    })
    .await;
    let dsn = cluster.dsn("postgres");
    let postgres = cluster.version().to_string();
    let admin = connect(&dsn, "bench").await;
    admin
        .batch_execute(&format!(
            "CREATE EXTENSION pg_stat_statements; \
             CREATE TABLE orders (id int PRIMARY KEY); \
             CREATE ROLE {LOCKJAM_ROLE} LOGIN IN ROLE pg_monitor; \
             CREATE ROLE {POLICY_ROLE} LOGIN IN ROLE pg_monitor, pg_signal_backend; \
             CREATE ROLE {BEFORE_ROLE} LOGIN IN ROLE pg_monitor; \
             CREATE ROLE {EXPORTER_ROLE} LOGIN IN ROLE pg_monitor;"
        ))
        .await
        .unwrap_or_else(|e| panic!("pg_stat_statements is needed beside the server binaries: {e}"));
    let role_dsn = |role: &str| dsn.replace("user=postgres", &format!("user={role}"));
    let mut lockjams = vec![
        Lockjam {
            column: "lockjam DB ms per second".into(),
            role: LOCKJAM_ROLE,
            served: Served::lockjam(&role_dsn(LOCKJAM_ROLE)),
        },
        // The one-rule policy of the README, kept a dry run.
        Lockjam {
            column: "lockjam, policy on (dry run)".into(),
            role: POLICY_ROLE,
            served: Served::lockjam_with(
                &role_dsn(POLICY_ROLE),
                &["--cancel-blockers-after", "2s"],
                &[("LOCKJAM__POLICY__DRY_RUN", "true")],
            ),
        },
    ];
    if let Some((rev, binary)) = &before {
        lockjams.push(Lockjam {
            column: format!("lockjam at {rev} (before)"),
            role: BEFORE_ROLE,
            served: Served::lockjam_binary(binary, &role_dsn(BEFORE_ROLE), &[], &[]),
        });
    }
    let exporter = Served::postgres_exporter(&role_dsn(EXPORTER_ROLE));
    for lockjam in &lockjams {
        lockjam.served.wait_up("lockjam_up{").await;
    }
    exporter.wait_up("pg_up 1").await;

    let sessions = scale.pick(1000, 30);
    let waiters = scale.pick(100, 5);
    let scenes = [
        SceneSpec {
            label: "no client sessions".into(),
            sessions: 0,
            waiters: 0,
        },
        SceneSpec {
            label: format!("{sessions} idle sessions"),
            sessions,
            waiters: 0,
        },
        SceneSpec {
            label: format!("{sessions} sessions, {waiters} queued behind an ALTER"),
            sessions,
            waiters,
        },
    ];
    let rounds = scale.pick(3, 1);
    let window = scale.pick(Duration::from_secs(45), Duration::from_secs(4));
    let scrape_every = scale.pick(Duration::from_secs(5), Duration::from_secs(1));
    let mut results = vec![Window::default(); scenes.len()];
    let mut scene = Scene::new(&dsn);
    let mut memory = (0, 0);
    for _ in 0..rounds {
        for (spec, result) in scenes.iter().zip(results.iter_mut()) {
            // The bench's session and one of each watcher's.
            scene.set(&admin, spec.sessions, spec.waiters, 4).await;
            measure(&admin, &lockjams, &exporter, window, scrape_every, result).await;
            if spec.waiters > 0 {
                // The queue stood through the window: the dry run signalled
                // no one.
                wait_for_waiters(&admin, spec.waiters).await;
                memory = (lockjams[0].served.status("VmRSS:"), exporter.status("VmRSS:"));
            }
        }
        eprintln!("versus: a round of {} scenes done", scenes.len());
    }
    // Short waits, as Prometheus sees them, then /metrics under load,
    // beside the idle sessions.
    scene.set(&admin, sessions, 0, 4).await;
    let short = ShortWaits {
        count: scale.pick(20, 2),
        each: scale.pick(Duration::from_secs(3), Duration::from_millis(1500)),
        spacing: scale.pick(Duration::from_millis(7300), Duration::from_millis(2300)),
        scrape_every: scale.pick(Duration::from_secs(15), Duration::from_secs(1)),
    };
    let (seen_by_lockjam, seen_by_exporter) = short.run(&dsn, &admin, &lockjams[0].served, &exporter).await;
    let (connections, seconds) = scale.pick((10, 10), (2, 1));
    let lockjam_wrk = wrk(lockjams[0].served.addr, connections, seconds);
    let exporter_wrk = wrk(exporter.addr, connections, seconds);
    scene.clear_waiters(&admin).await;
    drop(scene);
    let columns: Vec<String> = lockjams.iter().map(|l| l.column.clone()).collect();
    drop((lockjams, exporter));
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();

    let rows: Vec<Vec<String>> = scenes
        .iter()
        .zip(&results)
        .map(|(spec, r)| {
            let lockjam = Stats::of(&r.lockjam_ms[0]).median;
            let per_scrape = Stats::of(&r.exporter_ms).median;
            let at = |seconds: f64| per_scrape / seconds;
            let mut row = vec![spec.label.clone()];
            row.extend(
                r.lockjam_ms
                    .iter()
                    .zip(&r.lockjam_calls)
                    .map(|(ms, calls)| format!("{} ({} statements/s)", spread(ms, 2, ""), spread(calls, 1, ""))),
            );
            row.extend([
                format!(
                    "{} ({} statements)",
                    spread(&r.exporter_ms, 2, ""),
                    spread(&r.exporter_calls, 0, "")
                ),
                format!("{:.2}", at(15.0)),
                format!("{:.2}", at(5.0)),
                format!("{:.2}× / {:.2}×", lockjam / at(15.0), lockjam / at(5.0)),
            ]);
            row
        })
        .collect();
    let version = exporter_version();
    let before = before.map_or(String::new(), |(rev, _)| {
        format!(
            " With them, lockjam as it was at {rev}, before its cadence was\n\
             reworked, with that version's defaults (`LOCKJAM_BENCH_BEFORE={rev}`)."
        )
    });
    format!(
        "Both at once on one cluster ({}), each under its own role with `pg_monitor`;\n\
         `pg_stat_statements` (with `track_planning`) counts each role's statements apart. lockjam is\n\
         `lockjam run` with its default configuration (probe every 1 s, sessions by state every\n\
         5 s, the waiters only while someone waits, and while the same wait every 5 s); beside it,\n\
         a second lockjam with its policy on in dry run (it decides but never signals; every tick\n\
         reads afresh).{before} postgres_exporter is {version} with every default\n\
         collector, scraped every {} s during each {} s window. Its database time is per scrape,\n\
         so the table also gives it per second at a 15 s and a 5 s scrape interval. {rounds} rounds,\n\
         scenes interleaved; median (min–max) over rounds.\n\n{}\n\
         **Short waits.** {} lock waits of {} s each (an `ACCESS EXCLUSIVE` request behind a\n\
         reader, one every {} s), both exporters scraped every {} s as Prometheus would: lockjam's\n\
         `lockjam_lock_wait_seconds_count` counted {seen_by_lockjam} of them (it samples every second\n\
         and records each wait when it ends); postgres_exporter's `pg_locks_count{{mode=\"accessexclusivelock\"}}`\n\
         showed {seen_by_exporter} (it shows a lock only if a scrape falls inside the wait).\n\n\
         Resident memory (VmRSS) at the end of the last queue scene: lockjam {} kB, postgres_exporter {} kB.\n\n\
         `/metrics` under wrk ({connections} connections, 2 threads, {seconds} s) beside {sessions} idle sessions:\n\n{}",
        postgres,
        scrape_every.as_secs(),
        window.as_secs(),
        table(
            &std::iter::once("scene")
                .chain(columns.iter().map(String::as_str))
                .chain([
                    "postgres_exporter DB ms per scrape",
                    "… per second, 15 s scrape",
                    "… per second, 5 s scrape",
                    "lockjam ÷ exporter (15 s / 5 s)",
                ])
                .collect::<Vec<_>>(),
            &rows
        ),
        short.count,
        short.each.as_secs_f64(),
        short.spacing.as_secs_f64(),
        short.scrape_every.as_secs(),
        memory.0,
        memory.1,
        table(
            &["exporter", "p50", "p99", "requests/s"],
            &[
                wrk_row("lockjam", lockjam_wrk),
                wrk_row("postgres_exporter", exporter_wrk),
            ]
        ),
    )
}

fn wrk_row(name: &str, (rate, p50, p99): (f64, f64, f64)) -> Vec<String> {
    vec![
        name.to_string(),
        format!("{p50:.2} ms"),
        format!("{p99:.2} ms"),
        format!("{rate:.0}"),
    ]
}

/// One window: counters reset, every watcher scraped every
/// `scrape_every` (Prometheus' part) for `window`, then each role's
/// statements read.
async fn measure(
    admin: &Client,
    lockjams: &[Lockjam],
    exporter: &Served,
    window: Duration,
    scrape_every: Duration,
    result: &mut Window,
) {
    // Let lockjam see the scene, and the exporter run its first scrape on
    // it, before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    metrics(exporter.addr).await.expect("postgres_exporter answers");
    admin.batch_execute("SELECT pg_stat_statements_reset()").await.unwrap();
    let started = Instant::now();
    let mut scrapes = 0u32;
    while started.elapsed() < window {
        let scraped = join_all(
            lockjams
                .iter()
                .map(|l| l.served.addr)
                .chain([exporter.addr])
                .map(metrics),
        )
        .await;
        assert!(scraped.iter().all(Option::is_some), "an exporter stopped answering");
        scrapes += 1;
        let next = scrape_every * scrapes;
        tokio::time::sleep(next.saturating_sub(started.elapsed())).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let rows = admin
        .query(
            "SELECT r.rolname::text, sum(s.total_exec_time + s.total_plan_time)::float8, sum(s.calls)::float8 \
             FROM pg_stat_statements AS s JOIN pg_roles AS r ON r.oid = s.userid GROUP BY 1",
            &[],
        )
        .await
        .unwrap();
    let of = |role: &str| {
        rows.iter()
            .find(|row| row.get::<_, String>(0) == role)
            .map_or((0.0, 0.0), |row| (row.get::<_, f64>(1), row.get::<_, f64>(2)))
    };
    result.lockjam_ms.resize(lockjams.len(), Vec::new());
    result.lockjam_calls.resize(lockjams.len(), Vec::new());
    for (i, lockjam) in lockjams.iter().enumerate() {
        let (ms, calls) = of(lockjam.role);
        result.lockjam_ms[i].push(ms / seconds);
        result.lockjam_calls[i].push(calls / seconds);
    }
    let (ms, calls) = of(EXPORTER_ROLE);
    assert!(calls > 0.0, "postgres_exporter ran no statement in the window");
    result.exporter_ms.push(ms / f64::from(scrapes));
    result.exporter_calls.push(calls / f64::from(scrapes));
}

fn exporter_version() -> String {
    let output = std::process::Command::new(POSTGRES_EXPORTER).arg("--version").output();
    let text = output.map_or(String::new(), |o| {
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    });
    text.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(2))
        .map_or_else(|| "postgres_exporter".into(), |v| format!("postgres_exporter {v}"))
}

/// Lock waits shorter than a scrape interval, while both exporters are
/// scraped at Prometheus' pace: how many each one shows.
struct ShortWaits {
    count: usize,
    each: Duration,
    spacing: Duration,
    scrape_every: Duration,
}

impl ShortWaits {
    /// (waits lockjam counted, waits postgres_exporter showed).
    async fn run(&self, dsn: &str, admin: &Client, lockjam: &Served, exporter: &Served) -> (usize, usize) {
        admin.batch_execute("CREATE TABLE short_wait (id int)").await.unwrap();
        let counted = |text: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with("lockjam_lock_wait_seconds_count{"))
                .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                .sum()
        };
        // The scene's own waits, ended by its change, are counted first.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = counted(&metrics(lockjam.addr).await.unwrap());
        // Prometheus' part: the times at which the exporter showed an
        // ACCESS EXCLUSIVE lock in this database.
        let exporter_addr = exporter.addr;
        let scrape_every = self.scrape_every;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let scraper = tokio::spawn(async move {
            let mut shown = Vec::new();
            let mut tick = tokio::time::interval(scrape_every);
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let at = Instant::now();
                let text = metrics(exporter_addr).await.expect("postgres_exporter answers");
                let locks = text
                    .lines()
                    .find(|l| {
                        l.starts_with("pg_locks_count{")
                            && l.contains("datname=\"postgres\"")
                            && l.contains("mode=\"accessexclusivelock\"")
                    })
                    .and_then(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                    .expect("postgres_exporter shows pg_locks_count");
                if locks > 0.0 {
                    shown.push(at);
                }
            }
            shown
        });
        let started = Instant::now();
        let mut waits = Vec::new();
        for n in 0..self.count {
            tokio::time::sleep((self.spacing * n as u32).saturating_sub(started.elapsed())).await;
            let holder = connect(dsn, "reader").await;
            holder
                .batch_execute("BEGIN; LOCK TABLE short_wait IN ACCESS SHARE MODE")
                .await
                .unwrap();
            let waiter = connect(dsn, "migrate").await;
            let begun = Instant::now();
            let request = tokio::spawn(async move {
                waiter
                    .batch_execute("BEGIN; LOCK TABLE short_wait IN ACCESS EXCLUSIVE MODE; COMMIT")
                    .await
                    .unwrap();
            });
            tokio::time::sleep(self.each).await;
            holder.batch_execute("COMMIT").await.unwrap();
            request.await.unwrap();
            waits.push((begun, Instant::now()));
        }
        // Two more samples and a scrape, so that the last wait's end is in.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let lockjam_counted = counted(&metrics(lockjam.addr).await.unwrap()) - before;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let shown = scraper.await.unwrap();
        let exporter_showed = waits
            .iter()
            .filter(|(begun, ended)| shown.iter().any(|at| at >= begun && at <= ended))
            .count();
        admin.batch_execute("DROP TABLE short_wait").await.unwrap();
        (lockjam_counted as usize, exporter_showed)
    }
}
