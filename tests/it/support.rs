//! Shared fixtures: a throwaway cluster, lockjam running in-process against
//! it, real client sessions, and a scrape of `/metrics` parsed into series.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lockjam::cluster::{Cluster, ClusterOptions};
use lockjam::config::{Config, SamplerConfig, SessionSettings};
use lockjam::policy::Policy;
use lockjam::service::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;

/// A statement running on its own session.
pub type Statement = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// The calm interval of the service under test; the fast one is 100 ms.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// How long a test waits for a state it expects before it fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The calm interval is [`INTERVAL`], the fast one 100 ms, and a dead
/// server is given up on after 2 s.
pub fn sampler_config() -> SamplerConfig {
    SamplerConfig {
        interval: INTERVAL,
        fast_interval: Some(Duration::from_millis(100)),
        connect_timeout: Duration::from_secs(2),
        ..SamplerConfig::default()
    }
}

/// The session settings of [`sampler_config`].
pub fn session_settings() -> SessionSettings {
    sampler_config().sessions()
}

pub fn config_for(targets: Vec<(&str, String)>) -> Config {
    config_with(targets, Policy::default())
}

pub fn config_with(targets: Vec<(&str, String)>, policy: Policy) -> Config {
    let targets: Vec<(&str, &str)> = targets.iter().map(|(name, dsn)| (*name, dsn.as_str())).collect();
    let mut config =
        lockjam::staging::config(&targets, SocketAddr::from(([127, 0, 0, 1], 0)), policy).expect("test DSNs parse");
    config.sampler = sampler_config();
    config
}

/// The major version in a `--version` line such as "pg_dump (PostgreSQL) 18.6".
fn major_version(version_line: &str) -> u32 {
    version_line
        .split_whitespace()
        .find_map(|word| word.split('.').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no version in {version_line:?}"))
}

/// A `pg_dump` able to dump `cluster`'s server: `LOCKJAM_PG_DUMP`, else the
/// one beside the server, else the one on PATH. pg_dump refuses servers
/// newer than itself, so an older one fails the test with what to do.
pub fn pg_dump_for(cluster: &Cluster) -> std::path::PathBuf {
    let beside_server = cluster.bindir().join("pg_dump");
    let pg_dump = match std::env::var_os("LOCKJAM_PG_DUMP") {
        Some(path) => path.into(),
        None if beside_server.is_file() => beside_server,
        None => "pg_dump".into(),
    };
    let output = std::process::Command::new(&pg_dump)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; install postgresql-client or set LOCKJAM_PG_DUMP",
                pg_dump.display()
            )
        });
    let (client, server) = (
        major_version(&String::from_utf8_lossy(&output.stdout)),
        major_version(cluster.version()),
    );
    assert!(
        client >= server,
        "{} is pg_dump {client}, which cannot dump a PostgreSQL {server} server: \
         run scripts/pg-versions.sh and set LOCKJAM_PG_DUMP to the pg_dump it prints",
        pg_dump.display()
    );
    pg_dump
}

/// Creates or updates the role `lockjam` with the shipped
/// `deploy/sql/lockjam-role.sql`, as a user would: through psql, with
/// `-v policy=on` when `policy`.
pub fn apply_lockjam_role_sql(cluster: &Cluster, policy: bool) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sql/lockjam-role.sql");
    let mut psql = std::process::Command::new("psql");
    psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1"]);
    if policy {
        psql.args(["-v", "policy=on"]);
    }
    let output = psql
        .arg("-f")
        .arg(&script)
        .arg(cluster.dsn("postgres"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run psql ({e}): install postgresql-client"));
    assert!(
        output.status.success(),
        "{} failed: {}{}",
        script.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

pub async fn start_cluster(options: ClusterOptions) -> Cluster {
    tokio::task::spawn_blocking(move || Cluster::start(&options))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start a throwaway PostgreSQL cluster: {e}"))
}

/// A cluster with a database `app`, and lockjam watching it as target `it`.
pub struct TestEnv {
    pub cluster: Cluster,
    pub service: Option<Service>,
    pub admin: Client,
}

impl TestEnv {
    pub async fn start() -> TestEnv {
        TestEnv::start_with(ClusterOptions::default()).await
    }

    pub async fn start_with(options: ClusterOptions) -> TestEnv {
        TestEnv::start_full(options, Policy::default()).await
    }

    /// A cluster with `options`, and lockjam with `policy`.
    pub async fn start_full(options: ClusterOptions, policy: Policy) -> TestEnv {
        TestEnv::start_sampling(options, policy, sampler_config()).await
    }

    /// A cluster with `options`, and lockjam with `policy`, sampling as
    /// `sampler` says.
    pub async fn start_sampling(options: ClusterOptions, policy: Policy, sampler: SamplerConfig) -> TestEnv {
        let cluster = start_cluster(options).await;
        let postgres = connect(&cluster.dsn("postgres"), "fixture").await;
        postgres.batch_execute("CREATE DATABASE app").await.unwrap();
        let admin = connect(&cluster.dsn("app"), "fixture").await;
        let mut config = config_with(vec![("it", cluster.dsn("postgres"))], policy);
        config.sampler = sampler;
        let service = Service::start(&config).await.expect("lockjam starts");
        TestEnv {
            cluster,
            service: Some(service),
            admin,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.service.as_ref().expect("service running").local_addr()
    }

    /// This cluster as lockjam's target `it`, through database `postgres`.
    pub fn target(&self) -> lockjam::config::Target {
        lockjam::config::Target {
            name: "it".into(),
            dsn: lockjam::dsn::Dsn::parse(&self.cluster.dsn("postgres")).unwrap(),
            default_user: None,
        }
    }

    /// A new session to database `app` with this application name.
    pub async fn session(&self, application_name: &str) -> Client {
        connect(&self.cluster.dsn("app"), application_name).await
    }

    pub async fn scrape(&self) -> Scrape {
        scrape(self.addr()).await
    }

    /// Scrapes until `check` holds, and returns that scrape.
    pub async fn wait_for_metrics(&self, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let scrape = self.scrape().await;
            if check(&scrape) {
                return scrape;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; last scrape:\n{}", scrape.text);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts `sql` on a new session named `application_name`; returns the
    /// session's pid and the running statement.
    pub async fn spawn_statement(&self, application_name: &str, sql: &str) -> (i32, Statement) {
        let client = self.session(application_name).await;
        let pid = backend_pid(&client).await;
        let sql = sql.to_string();
        (
            pid,
            tokio::spawn(async move { client.simple_query(&sql).await.map(|_| ()) }),
        )
    }

    /// Runs `statements` in one transaction on a new session, as an
    /// application with psycopg 3's `with conn.transaction():` does
    /// (checked against psycopg 3.3.9): BEGIN, each statement, COMMIT; on
    /// an error, ROLLBACK at once, and the error is the result.
    pub async fn spawn_transaction(&self, application_name: &str, statements: &[&str]) -> (i32, Statement) {
        let client = self.session(application_name).await;
        let pid = backend_pid(&client).await;
        let statements: Vec<String> = statements.iter().map(|s| s.to_string()).collect();
        let run = tokio::spawn(async move {
            client.batch_execute("BEGIN").await?;
            for statement in &statements {
                if let Err(error) = client.batch_execute(statement).await {
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Err(error);
                }
            }
            client.batch_execute("COMMIT").await
        });
        (pid, run)
    }

    /// Waits until `pid` holds a granted lock on `relation` (in `mode`, if given).
    pub async fn wait_until_holding(&self, pid: i32, relation: &str, mode: Option<&str>) {
        wait_until(&format!("pid {pid} to hold its lock on {relation}"), || async {
            self.admin
                .query_opt(
                    "SELECT 1 FROM pg_locks WHERE pid = $1 AND relation = $2::text::regclass AND granted
                     AND ($3::text IS NULL OR mode = $3)",
                    &[&pid, &relation, &mode],
                )
                .await
                .unwrap()
                .is_some()
        })
        .await;
    }

    /// The policy's audit events, newest first.
    pub async fn events(&self) -> Vec<serde_json::Value> {
        events(self.addr()).await
    }

    /// Waits for the one incident there must be (see [`the_one_incident`]).
    pub async fn the_one_incident(&self) -> serde_json::Value {
        the_one_incident(self.addr()).await
    }

    /// Waits until some audit event satisfies `check`, and returns it.
    pub async fn wait_for_event(&self, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(event) = self.events().await.into_iter().find(|e| check(e)) {
                return event;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.events().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `pid` waits for a heavyweight lock.
    pub async fn wait_until_waiting(&self, pid: i32) {
        wait_until(&format!("pid {pid} to wait for a lock"), || async {
            let row = self
                .admin
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                    &[&pid],
                )
                .await
                .unwrap();
            row.is_some()
        })
        .await;
    }

    /// Waits until `count` sessions with this application name wait for a lock.
    pub async fn wait_until_waiting_count(&self, application_name: &str, count: i64) {
        wait_until(&format!("{count} `{application_name}` sessions to wait"), || async {
            let row = self
                .admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                    &[&application_name],
                )
                .await
                .unwrap();
            row.get::<_, i64>(0) == count
        })
        .await;
    }

    pub async fn stop(mut self) {
        if let Some(service) = self.service.take() {
            service.stop().await;
        }
        tokio::task::spawn_blocking(move || drop(self.cluster)).await.unwrap();
    }
}

pub async fn wait_until<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits `future`, failing the test after [`PATIENCE`] instead of hanging.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

pub async fn connect(dsn: &str, application_name: &str) -> Client {
    lockjam::staging::connect(dsn, application_name)
        .await
        .unwrap_or_else(|e| panic!("connect {dsn} as {application_name}: {e}"))
}

pub async fn backend_pid(client: &Client) -> i32 {
    client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0)
}

pub async fn events(addr: SocketAddr) -> Vec<serde_json::Value> {
    let (status, body) = http_get(addr, "/api/v1/events").await;
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    value["events"].as_array().unwrap().clone()
}

/// Closed incidents, newest first (`/api/v1/incidents`).
pub async fn incidents(addr: SocketAddr) -> Vec<serde_json::Value> {
    let (status, body) = http_get(addr, "/api/v1/incidents").await;
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    value["incidents"].as_array().unwrap().clone()
}

/// Waits for the first incident to close, then for two more intervals (a
/// second one would have closed by then), and returns the one incident
/// there must be, as `/api/v1/incidents/{id}` serves it too.
pub async fn the_one_incident(addr: SocketAddr) -> serde_json::Value {
    wait_until("an incident to close", || async { !incidents(addr).await.is_empty() }).await;
    tokio::time::sleep(INTERVAL * 2).await;
    let incidents = incidents(addr).await;
    assert_eq!(incidents.len(), 1, "exactly one incident: {incidents:#?}");
    let (status, body) = http_get(addr, &format!("/api/v1/incidents/{}", incidents[0]["id"])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap(), incidents[0]);
    incidents[0].clone()
}

/// A plain HTTP/1.1 GET: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: lockjam\r\nConnection: close\r\n\r\n"),
    )
    .await
}

pub async fn http_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("lockjam listens");
    request_over(stream, request).await
}

/// A GET of `path` over a connection opened earlier.
pub async fn http_over(stream: tokio::net::TcpStream, path: &str) -> (u16, String) {
    request_over(
        stream,
        &format!("GET {path} HTTP/1.1\r\nHost: lockjam\r\nConnection: close\r\n\r\n"),
    )
    .await
}

async fn request_over(mut stream: tokio::net::TcpStream, request: &str) -> (u16, String) {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response).to_string();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// One scrape of `/metrics`, parsed.
pub struct Scrape {
    pub text: String,
    pub series: Vec<(String, BTreeMap<String, String>, f64)>,
}

pub async fn scrape(addr: SocketAddr) -> Scrape {
    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    Scrape::parse(&text)
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let series = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .map(|line| {
                let (name_labels, value) = line.rsplit_once(' ').expect("name and value");
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line:?}"));
                match name_labels.split_once('{') {
                    Some((name, labels)) => (name.to_string(), parse_labels(labels.trim_end_matches('}')), value),
                    None => (name_labels.to_string(), BTreeMap::new(), value),
                }
            })
            .collect();
        Scrape {
            text: text.to_string(),
            series,
        }
    }

    /// Series of `name` whose labels include all of `labels`.
    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&(String, BTreeMap<String, String>, f64)> {
        self.series
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .collect()
    }

    /// The value of the one series of `name` with these labels (`None` when
    /// absent; panics when several match).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found = self.matching(name, labels);
        assert!(found.len() <= 1, "{name} {labels:?} matches {} series", found.len());
        found.first().map(|(_, _, v)| *v)
    }

    pub fn has(&self, name: &str) -> bool {
        self.series.iter().any(|(n, _, _)| n == name)
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() {
            return labels;
        }
        assert_eq!(chars.next(), Some('='));
        assert_eq!(chars.next(), Some('"'));
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_string(), value);
        chars.next_if_eq(&',');
    }
}

/// The `lockjam` binary, free of the caller's `LOCKJAM_*` environment.
pub fn lockjam() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_lockjam"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LOCKJAM_") && name != "LOCKJAM_PG_BINDIR" {
            command.env_remove(name);
        }
    }
    // The clusters are thrown away, and so is their incident history: in
    // memory, never a file in the working directory. A test of the store
    // sets its own path.
    command.env("LOCKJAM__INCIDENTS__PATH", "");
    command
}

/// `lockjam run` as its own process, on a free port, its log captured.
pub struct LockjamRun {
    pub addr: SocketAddr,
    /// `None` once terminated.
    child: Option<std::process::Child>,
}

impl LockjamRun {
    /// Starts `lockjam run --listen <free port>` with `args`.
    pub fn spawn(args: &[&str]) -> LockjamRun {
        LockjamRun::spawn_with_env(args, &[])
    }

    /// Starts `lockjam run --listen <free port>` with `args` and these
    /// environment variables.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> LockjamRun {
        LockjamRun::spawn_from(lockjam(), args, env)
    }

    /// Starts `lockjam run --listen <free port>` with `args` and at most
    /// `open_files` file descriptors, as systemd's `LimitNOFILE` would.
    pub fn spawn_with_open_files(args: &[&str], open_files: u64) -> LockjamRun {
        use std::os::unix::process::CommandExt;
        let mut command = lockjam();
        // SAFETY: setrlimit is async-signal-safe, and nothing else runs
        // between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: open_files,
                    rlim_max: open_files,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        LockjamRun::spawn_from(command, args, &[])
    }

    fn spawn_from(mut command: std::process::Command, args: &[&str], env: &[(&str, &str)]) -> LockjamRun {
        let port = lockjam::cluster::free_port().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = command
            .args(["run", "--listen", &addr.to_string()])
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the lockjam binary runs");
        LockjamRun {
            addr,
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether the HTTP port accepts connections yet.
    pub async fn serving(&self) -> bool {
        tokio::net::TcpStream::connect(self.addr).await.is_ok()
    }

    fn signal(&self, signal: &str) {
        let sent = std::process::Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal}");
    }

    /// SIGHUP: reload the configuration.
    pub fn hangup(&self) {
        self.signal("-HUP");
    }

    /// SIGTERM, then the exit status and everything it logged.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        self.signal("-TERM");
        let child = self.child.take().expect("running");
        let output = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
        (output.status, String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// A test that fails before `terminate` leaves no `lockjam run` behind.
impl Drop for LockjamRun {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Lets this process open a socket per session: CI machines often start
/// tests with a soft limit of 1024 descriptors.
pub fn raise_open_files_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < wanted {
            assert!(
                limit.rlim_max >= wanted,
                "this test opens {wanted} sockets but the hard limit on open files is {}: raise it (ulimit -Hn)",
                limit.rlim_max
            );
            limit.rlim_cur = wanted;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
}
