//! Part 3: the `lockjam run` process itself. Startup to first sample;
//! detection latency (a waiter's `pg_locks.waitstart` to the first
//! `/metrics` that shows it); resident memory and CPU per sample after a
//! long run beside 1,000 sessions; `/metrics` latency under 200 concurrent
//! connections (wrk).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;

use crate::common::{connect, spread, table, Scale, Stats};
use crate::cost::Scene;

/// Debian's package of prometheus-community/postgres_exporter.
pub(crate) const POSTGRES_EXPORTER: &str = "prometheus-postgres-exporter";

/// An exporter as its own process, serving `/metrics` on `addr`.
pub(crate) struct Served {
    child: Child,
    pub addr: SocketAddr,
    /// lockjam's state directory (its incident store), removed with it.
    _state: Option<tempfile::TempDir>,
}

impl Served {
    /// The release `lockjam run` binary with its default configuration.
    pub fn lockjam(dsn: &str) -> Served {
        Served::lockjam_with(dsn, &[], &[])
    }

    /// `lockjam run` with these arguments and `LOCKJAM__…` settings
    /// besides.
    pub fn lockjam_with(dsn: &str, args: &[&str], settings: &[(&str, &str)]) -> Served {
        Served::lockjam_binary(std::path::Path::new(env!("CARGO_BIN_EXE_lockjam")), dsn, args, settings)
    }

    /// `lockjam run` from `binary` (another build, for a before-and-after).
    pub fn lockjam_binary(binary: &std::path::Path, dsn: &str, args: &[&str], settings: &[(&str, &str)]) -> Served {
        let mut all = vec!["--dsn", dsn];
        all.extend_from_slice(args);
        Served::run(binary, &all, settings)
    }

    /// The release `lockjam run` binary with the configuration in `file`.
    pub fn lockjam_config(file: &std::path::Path) -> Served {
        let file = file.to_str().expect("a UTF-8 path");
        Served::run(
            std::path::Path::new(env!("CARGO_BIN_EXE_lockjam")),
            &["--config", file],
            &[],
        )
    }

    fn run(binary: &std::path::Path, args: &[&str], settings: &[(&str, &str)]) -> Served {
        let port = lockjam::cluster::free_port().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let state = tempfile::Builder::new()
            .prefix("lockjam-bench-state")
            .tempdir()
            .unwrap();
        let child = Command::new(binary)
            .args(["run", "--listen", &addr.to_string()])
            .args(args)
            .env("LOCKJAM__LOG__LEVEL", "warn")
            // The incident store goes where systemd's StateDirectory=
            // would put it, in a directory removed with the process (a
            // build from before the store ignores the variable).
            .env("STATE_DIRECTORY", state.path())
            .envs(settings.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        Served {
            child,
            addr,
            _state: Some(state),
        }
    }

    /// Debian's `prometheus-postgres-exporter` as the package runs it (no
    /// arguments beyond the address, every default collector).
    pub fn postgres_exporter(dsn: &str) -> Served {
        let port = lockjam::cluster::free_port().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(POSTGRES_EXPORTER)
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .env("DATA_SOURCE_NAME", dsn)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {POSTGRES_EXPORTER} ({e}): run scripts/install-deps.sh --test-tools")
            });
        Served {
            child,
            addr,
            _state: None,
        }
    }

    /// Waits until a `/metrics` holds a line starting with `up`.
    pub async fn wait_up(&self, up: &str) {
        let started = Instant::now();
        loop {
            if let Some(text) = metrics(self.addr).await {
                if text.lines().any(|l| l.starts_with(up)) {
                    return;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{up} never showed on {}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// User plus system CPU seconds so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5); fields[0] is 3.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf reads a constant of the running system.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks as f64 / per_second
    }
}

impl Drop for Served {
    /// Never left running, even when the bench panics.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of one `/metrics` answer (asked in HTTP/1.0, so that no
/// server sends it in chunks), without the response's header: its lines
/// are series and comments only.
pub(crate) async fn metrics(addr: SocketAddr) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let ok = head.starts_with("HTTP/1.0 200 ") || head.starts_with("HTTP/1.1 200 ");
    ok.then(|| body.to_string())
}

pub(crate) fn value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

/// Seconds from spawning `lockjam run` to a `/metrics` with `lockjam_up 1`.
async fn startup(dsn: &str) -> f64 {
    let started = Instant::now();
    let run = Served::lockjam(dsn);
    loop {
        if let Some(text) = metrics(run.addr).await {
            if value(&text, "lockjam_up{") == Some(1.0) {
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "lockjam run never came up");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed().as_secs_f64();
    drop(run);
    took
}

/// One waiter on a table of its own, behind an idle-in-transaction holder;
/// seconds from its `waitstart` to the first `/metrics` showing it.
async fn detection(dsn: &str, admin: &Client, addr: SocketAddr, n: usize) -> f64 {
    let table = format!("detect_{n}");
    admin
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .unwrap();
    let holder = connect(dsn, "holder").await;
    holder
        .batch_execute(&format!("BEGIN; LOCK TABLE {table} IN ACCESS SHARE MODE"))
        .await
        .unwrap();
    let waiter = connect(dsn, "migrate").await;
    let alter = format!("ALTER TABLE {table} ADD COLUMN note text");
    let running = tokio::spawn(async move { waiter.simple_query(&alter).await.map(|_| ()) });
    // The server is otherwise calm: the first waiter series is this one.
    let deadline = Instant::now() + Duration::from_secs(30);
    let shown = loop {
        if let Some(text) = metrics(addr).await {
            if text.contains("lockjam_lock_waiters{") {
                break SystemTime::now();
            }
        }
        assert!(Instant::now() < deadline, "lockjam never showed the waiter on {table}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let wait_start: SystemTime = admin
        .query_one(
            &format!("SELECT waitstart FROM pg_locks WHERE relation = '{table}'::regclass AND NOT granted"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    holder.batch_execute("COMMIT").await.unwrap();
    running.await.unwrap().unwrap();
    shown.duration_since(wait_start).unwrap_or_default().as_secs_f64()
}

/// wrk against `/metrics`: (requests per second, p50 ms, p99 ms).
pub(crate) fn wrk(addr: SocketAddr, connections: usize, seconds: u64) -> (f64, f64, f64) {
    let output = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
        ])
        .arg(format!("http://{addr}/metrics"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run wrk ({e}): run scripts/install-deps.sh --test-tools"));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "wrk: {text}");
    let ms = |label: &str| {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} in wrk's output:\n{text}"));
        let v = line.split_whitespace().nth(1).unwrap();
        if let Some(us) = v.strip_suffix("us") {
            us.parse::<f64>().unwrap() / 1000.0
        } else if let Some(ms) = v.strip_suffix("ms") {
            ms.parse().unwrap()
        } else {
            v.trim_end_matches('s').parse::<f64>().unwrap() * 1000.0
        }
    };
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    assert!(errors.is_none(), "wrk saw errors: {text}");
    (rate, ms("50%"), ms("99%"))
}

pub async fn all(dsn: &str, admin: &Client, scale: Scale) -> String {
    let runs = scale.pick(10, 1);
    let mut startups = Vec::new();
    for _ in 0..runs {
        startups.push(startup(dsn).await);
    }

    let sessions = scale.pick(1000, 30);
    let long = scale.pick(Duration::from_secs(600), Duration::from_secs(5));
    let detections_wanted = scale.pick(20, 1);
    let mut scene = Scene::new(dsn);
    scene.set(admin, sessions, 0, 2 + 1).await;
    let run = Served::lockjam(dsn);
    let started = Instant::now();
    let mut detections = Vec::new();
    let mut scrapes = 0u64;
    let gap = long / (detections_wanted as u32 + 1);
    let mut next_detection = started + gap;
    while started.elapsed() < long {
        // Prometheus' part: a scrape a second.
        if metrics(run.addr).await.is_some() {
            scrapes += 1;
        }
        if Instant::now() >= next_detection && detections.len() < detections_wanted {
            // This loop and lockjam's ticks both keep a one-second beat, so
            // a wait started at once would start at the same point of
            // lockjam's interval each time (and measure that point only).
            // A golden-ratio step spreads the starts evenly over it.
            let phase = (detections.len() as f64 * 0.618_034).fract();
            tokio::time::sleep(Duration::from_secs_f64(phase)).await;
            detections.push(detection(dsn, admin, run.addr, detections.len()).await);
            next_detection += gap;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let text = metrics(run.addr).await.unwrap();
    let samples = value(&text, "lockjam_sample_duration_seconds_count{").unwrap();
    let cpu = run.cpu_seconds();
    let rss = run.status("VmRSS:");
    let hwm = run.status("VmHWM:");
    let (connections, seconds) = scale.pick((200, 10), (20, 1));
    let (rate, p50, p99) = wrk(run.addr, connections, seconds);
    let rss_after_wrk = run.status("VmRSS:");
    drop(run);
    drop(scene);

    let startup = Stats::of(&startups);
    let detect = Stats::of(&detections);
    table(
        &["measure", "value"],
        &[
            vec![
                format!("startup to the first sample on `/metrics` ({runs} runs)"),
                format!(
                    "median {:.0} ms (min {:.0}, max {:.0})",
                    startup.median * 1000.0,
                    startup.min * 1000.0,
                    startup.max * 1000.0
                ),
            ],
            vec![
                format!(
                    "detection: `pg_locks.waitstart` to the first `/metrics` showing the waiter ({} runs spread over the 1 s interval)",
                    detections.len()
                ),
                format!(
                    "median {:.0} ms, max {:.0} ms (min {:.0})",
                    detect.median * 1000.0,
                    detect.max * 1000.0,
                    detect.min * 1000.0
                ),
            ],
            vec![
                format!(
                    "resident memory (VmRSS) after {} s beside {sessions} sessions, scraped every second ({scrapes} scrapes)",
                    long.as_secs()
                ),
                format!("{rss} kB (peak VmHWM {hwm} kB)"),
            ],
            vec![
                format!("CPU (user + system) per sample, scrapes included, over {samples} samples"),
                format!("{:.3} ms", cpu * 1000.0 / samples),
            ],
            vec![
                format!("`/metrics` under wrk, {connections} connections, 2 threads, {seconds} s"),
                format!(
                    "p50 {p50:.2} ms, p99 {p99:.2} ms, {rate:.0} requests/s; VmRSS after: {rss_after_wrk} kB"
                ),
            ],
        ],
    ) + &format!("\nStartup runs: {}.\n", spread(&startups.iter().map(|s| s * 1000.0).collect::<Vec<_>>(), 0, " ms"))
}
