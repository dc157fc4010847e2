//! `cargo bench --bench lockjam`: every figure of BENCHMARKS.md, and its
//! plots, from one run on a throwaway cluster.
//!
//! 1. `outage`: incident 000 under load, per strategy; the policy's
//!    reaction time.
//! 2. `cost`: the server-side cost of lockjam's sample and of peers'
//!    queries, by sessions and waiters; pgbench TPS beside each.
//! 3. `exporter`: the `lockjam run` process: startup, detection latency,
//!    memory, CPU, `/metrics` under 200 connections.
//! 4. `versus`: lockjam and the real postgres_exporter side by side on a
//!    cluster of their own: database time by role, memory, `/metrics`.
//! 5. `history`: the incident store at 10,000 incidents, `lockjam
//!    incidents` reading it, and what tracking adds to a sample.
//! 6. `fleet`: one process watching 1 to 200 servers: memory, CPU and
//!    `/metrics` per target.
//!
//! `cargo bench --bench lockjam -- reaction` runs only the reaction times
//! of part 1 and prints them.
//!
//! `cargo bench --bench lockjam` runs all four at full scale (about 50
//! minutes on 2 cores) and rewrites BENCHMARKS.md and
//! docs/benchmarks/*.svg; `cargo bench --bench lockjam -- outage` (or
//! `cost`, `exporter`, `versus`, `history`, `fleet`) runs one part and only prints it. Without `--bench`
//! (under `cargo test --benches`) it runs every part at smoke scale, in
//! about a minute, and writes nothing into the tree.

mod common;
mod cost;
mod exporter;
mod fleet;
mod history;
mod outage;
mod peers;
mod plot;
mod versus;

use std::path::{Path, PathBuf};
use std::time::Instant;

use lockjam::cluster::ClusterOptions;

use common::{connect, start_cluster, Scale, Stats};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scale = if args.iter().any(|a| a == "--bench") {
        Scale::Full
    } else {
        Scale::Smoke
    };
    let parts: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| {
            [
                "outage", "reaction", "cost", "exporter", "versus", "history", "fleet", "all",
            ]
            .contains(a)
        })
        .collect();
    let all = parts.is_empty() || parts.contains(&"all");
    let wanted = |part: &str| all || parts.contains(&part);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(async {
        let started = Instant::now();
        let report = run(scale, &wanted).await;
        eprintln!("bench: done in {:.0} s", started.elapsed().as_secs_f64());
        report
    });
    println!("{}", report.text);
    if scale == Scale::Full && all {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let plots = root.join("docs/benchmarks");
        std::fs::create_dir_all(&plots).unwrap();
        for (name, svg) in &report.plots {
            std::fs::write(plots.join(name), svg).unwrap();
        }
        std::fs::write(root.join("BENCHMARKS.md"), &report.text).unwrap();
        eprintln!("bench: wrote BENCHMARKS.md and docs/benchmarks/");
    } else {
        let dir = std::env::temp_dir().join("lockjam-bench");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, svg) in &report.plots {
            std::fs::write(dir.join(name), svg).unwrap();
        }
    }
}

struct Report {
    text: String,
    plots: Vec<(String, String)>,
}

/// pgbench beside the server binaries, else on PATH.
fn pgbench() -> PathBuf {
    let beside = lockjam::cluster::find_bindir().ok().map(|b| b.join("pgbench"));
    let pgbench = beside.filter(|p| p.is_file()).unwrap_or_else(|| "pgbench".into());
    let runs = std::process::Command::new(&pgbench).arg("--version").output();
    assert!(
        runs.is_ok_and(|o| o.status.success()),
        "cannot run {}: run scripts/install-deps.sh --test-tools",
        pgbench.display()
    );
    pgbench
}

fn machine() -> String {
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    format!(
        "{} cores ({cpu}), {memory}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

async fn run(scale: Scale, wanted: &dyn Fn(&str) -> bool) -> Report {
    let cluster = start_cluster(ClusterOptions {
        max_connections: 1100,
        ..Default::default()
    })
    .await;
    let dsn = cluster.dsn("postgres");
    let admin = connect(&dsn, "bench").await;
    outage::setup(&admin).await;
    let mut text = format!(
        "# Benchmarks\n\n\
         Every figure and plot here was written by one run of\n\n\
         ```sh\n{}cargo bench --bench lockjam\n```\n\n\
         (`benches/lockjam/`), which starts a throwaway PostgreSQL cluster and rewrites this file.\n\
         `LOCKJAM_BENCH_BEFORE`, a git revision, adds lockjam as built from it to part 4.\n\
         `cargo test --benches` (part of `scripts/test.sh`) runs the same code at smoke scale so that it\n\
         cannot rot; it writes nothing here.\n\n\
         - Machine: {}\n- PostgreSQL: {}\n- Scale: {}\n\n",
        std::env::var("LOCKJAM_BENCH_BEFORE").map_or(String::new(), |rev| format!("LOCKJAM_BENCH_BEFORE={rev} ")),
        machine(),
        cluster.version(),
        match scale {
            Scale::Full => "full",
            Scale::Smoke => "smoke (not figures to quote)",
        }
    );
    let mut plots = Vec::new();

    if wanted("reaction") && !wanted("outage") {
        let (reactions, timeouts) = outage::reaction_times(&dsn, scale.pick(20, 1)).await;
        let (r, t) = (Stats::of(&reactions), Stats::of(&timeouts));
        text.push_str(&format!(
            "Reaction time over {} interleaved runs (`min_wait = 2s` against `lock_timeout = 2s`): \
             lockjam median {:.3} s, max {:.3} s, min {:.3} s; lock_timeout median {:.3} s, max {:.3} s, \
             min {:.3} s.\n",
            r.n, r.median, r.max, r.min, t.median, t.max, t.min
        ));
    }
    if wanted("outage") {
        let (tables, results) = outage::all(&dsn, scale).await;
        let (reactions, timeouts) = outage::reaction_times(&dsn, scale.pick(20, 1)).await;
        let r = Stats::of(&reactions);
        let t = Stats::of(&timeouts);
        text.push_str(&format!(
            "## 1. The outage lockjam prevents\n\n\
             Incident 000 under load: `orders` holds 200,000 rows (with a foreign key to 1,000\n\
             `customers`); client sessions run short queries by primary key on it without pause; a\n\
             read (`SELECT pg_sleep(…), count(*) FROM orders`) takes ACCESS SHARE; one second later\n\
             `ALTER TABLE orders DROP CONSTRAINT orders_customer_id_fkey` asks for ACCESS EXCLUSIVE.\n\
             Each run ends 2 s after the migration returns. \"Longest query\" and \"p99\" are over every\n\
             application query of the run; \"cancelled\" lists the statements a strategy cancelled.\n\n\
             {tables}\n\
             ![Longest application query per strategy](docs/benchmarks/stall.svg)\n\n\
             **Reaction time** of `cancel_blockers` (`min_wait = 2s`, interval 1 s, no fast_interval):\n\
             from the waiter's `pg_locks.waitstart` to the blocker's cancel taking effect (its\n\
             `state_change`), both on the server's clock, {} runs: median {:.3} s, max {:.3} s,\n\
             min {:.3} s. The floor is `min_wait`; the rest is the sample lockjam takes at that\n\
             deadline (mapped from the server's clock onto its own) and one signalling statement.\n\
             On the same runs, interleaved, `lock_timeout = 2s` on the migration: from its\n\
             `waitstart` to its error, median {:.3} s, max {:.3} s, min {:.3} s.\n\n",
            r.n, r.median, r.max, r.min, t.median, t.max, t.min
        ));
        plots.push(("stall.svg".to_string(), plot::stall(&results)));
    }

    if wanted("cost") {
        let results = cost::sample_costs(&dsn, &admin, scale).await;
        let tps = cost::pgbench_tps(&dsn, cluster.port(), &admin, scale, &pgbench()).await;
        let sources: String = peers::PEERS
            .iter()
            .map(|p| format!("- **{}**: {}.\n", p.name, p.source))
            .collect();
        text.push_str(&format!(
            "## 2. What watching costs the database\n\n\
             Server-side time of one run of each query, as `EXPLAIN (ANALYZE, TIMING OFF)` reports it\n\
             (planning plus execution), with the stated number of client sessions connected, of which\n\
             the stated number wait for a lock (one idle-in-transaction holder of `orders`, an `ALTER\n\
             TABLE` waiting, reads queued behind it). Each cell: median (p10–p90) over the runs, and for\n\
             peers the ratio to lockjam's sample at that load (its calm path when no one waits, its\n\
             waiting path otherwise). lockjam runs a probe every tick (1 s): `probe.sql` (each\n\
             backend's status) or `probe_locks.sql` (`pg_locks`' ungranted rows), whichever costs less\n\
             for the sessions connected (the first grows with the sessions, the second with\n\
             `max_connections` × `max_locks_per_transaction`; here `max_connections` is 1,100). The\n\
             \"probe candidate\" rows are run back to back, caches warm; lockjam runs its probe once a\n\
             second, caches cold, where both cost more and the crossover comes later (see `Probe` in\n\
             `src/sampler/mod.rs`). Every `activity_interval` (5 s) `activity.sql` runs in place of\n\
             the probe (its scan also says who waits); only when a waiter is reported does lockjam run\n\
             `waiters.sql` and `locks.sql` (`src/sampler/`), and while the same backends wait, only\n\
             with `activity.sql`. Its database time per second is four fifths of the probe and a\n\
             fifth of the activity read while calm, plus a fifth of the waiters' read while someone\n\
             waits.\n\n\
             The peers' queries are written by us from each project's documented shape:\n\n{sources}\n\
             {}\n\
             ![Server time per sample against sessions](docs/benchmarks/cost.svg)\n\n\
             ### Effect on the application\n\n{tps}\n",
            cost::cost_tables(&results)
        ));
        plots.push(("cost.svg".to_string(), plot::cost(&results)));
    }

    if wanted("exporter") {
        let table = exporter::all(&dsn, &admin, scale).await;
        text.push_str(&format!(
            "## 3. The exporter itself\n\n\
             The release `lockjam run` binary as its own process, default cadence, watching the\n\
             cluster above.\n\n{table}\n"
        ));
    }
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();

    if wanted("versus") {
        let table = versus::all(scale).await;
        text.push_str(&format!("## 4. Beside postgres_exporter\n\n{table}\n"));
    }
    if wanted("history") {
        let text_of_part = tokio::task::spawn_blocking(move || history::all(scale)).await.unwrap();
        text.push_str(&format!("## 5. The incident history\n\n{text_of_part}\n"));
    }
    if wanted("fleet") {
        let part = fleet::all(scale).await;
        text.push_str(&format!("## 6. A fleet\n\n{part}\n"));
    }
    Report { text, plots }
}
