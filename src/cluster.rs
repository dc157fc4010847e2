//! Throwaway PostgreSQL clusters for `lockjam demo`, the integration tests
//! and the benchmarks: `initdb` into a temporary directory, a free port, the
//! socket in that directory, durability off, removed on drop.
//!
//! PostgreSQL refuses to run as root, so when lockjam runs as root the
//! server runs as `postgres` (or `nobody`) through `runuser`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in LOCKJAM_PG_BINDIR, on PATH, \
         in `pg_config --bindir` or in /usr/lib/postgresql/*/bin: run scripts/install-deps.sh \
         (Debian/Ubuntu: apt-get install postgresql), or set LOCKJAM_PG_BINDIR to the directory that holds them"
    )]
    NoBinaries,
    #[error("LOCKJAM_PG_BINDIR={0} does not hold initdb, pg_ctl and postgres")]
    BadBindir(PathBuf),
    #[error("running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as")]
    NoUnprivilegedUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// TLS files for a cluster started with `ssl = on`.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// A fixed port; `None` picks a free one.
    pub port: Option<u16>,
    pub max_connections: u32,
    pub tls: Option<ServerTls>,
    /// Extra `postgresql.conf` lines as (name, value); values are quoted.
    pub settings: Vec<(String, String)>,
    /// `pg_hba.conf` lines put before initdb's (which trust every local
    /// connection), e.g. to make one role log in with a password.
    pub hba: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            port: None,
            max_connections: 100,
            tls: None,
            settings: Vec::new(),
            hba: Vec::new(),
        }
    }
}

/// The user the server runs as when lockjam runs as root.
#[derive(Debug, Clone)]
struct OsUser {
    name: String,
    uid: u32,
    gid: u32,
}

pub struct Cluster {
    bindir: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    run_as: Option<OsUser>,
    version: String,
}

/// Where the server binaries are: `LOCKJAM_PG_BINDIR`, `PATH`,
/// `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    let complete = |dir: &Path| ["initdb", "pg_ctl", "postgres"].iter().all(|b| dir.join(b).is_file());
    if let Some(dir) = std::env::var_os("LOCKJAM_PG_BINDIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if complete(&dir) {
            Ok(dir)
        } else {
            Err(ClusterError::BadBindir(dir))
        };
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|d| complete(d)) {
            return Ok(dir);
        }
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && complete(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            complete(&bin).then_some((major, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).ok_or(ClusterError::NoBinaries)
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn unprivileged_user() -> Result<OsUser, ClusterError> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    for wanted in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() > 3 && fields[0] == wanted {
                if let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse()) {
                    return Ok(OsUser {
                        name: wanted.to_string(),
                        uid,
                        gid,
                    });
                }
            }
        }
    }
    Err(ClusterError::NoUnprivilegedUser)
}

/// A loopback port free at the moment of asking (another process may take
/// it before it is bound: callers retry or accept the rare failure).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn check(what: &str, output: Output) -> Result<Output, ClusterError> {
    if output.status.success() {
        return Ok(output);
    }
    Err(ClusterError::Command {
        what: what.to_string(),
        detail: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        ),
    })
}

fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

impl Cluster {
    /// initdb and start a new cluster.
    pub fn start(options: &ClusterOptions) -> Result<Cluster, ClusterError> {
        let bindir = find_bindir()?;
        let run_as = if running_as_root() {
            Some(unprivileged_user()?)
        } else {
            None
        };
        let dir = tempfile::Builder::new().prefix("lockjam-pg-").tempdir()?;
        if let Some(user) = &run_as {
            std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid))?;
        }
        let mut cluster = Cluster {
            bindir,
            dir,
            port: 0,
            run_as,
            version: String::new(),
        };
        let version = cluster.run("postgres", &["--version"])?;
        cluster.version = String::from_utf8_lossy(&version.stdout).trim().to_string();
        let data = cluster.data_dir();
        cluster.run_checked(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ],
        )?;
        cluster.write_settings(options)?;
        // Another process may take the port between choosing and binding
        // it: try a few.
        let mut last_error = None;
        let attempts = if options.port.is_some() { 1 } else { 5 };
        for _ in 0..attempts {
            cluster.port = match options.port {
                Some(port) => port,
                None => free_port()?,
            };
            cluster.write_port()?;
            match cluster.start_server() {
                Ok(()) => return Ok(cluster),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("tried at least once"))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres --version` of the binaries in use.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A key=value DSN for the superuser `postgres` over TCP.
    pub fn dsn(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname} sslmode=disable",
            self.port
        )
    }

    /// The end of the server log, for failure messages.
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn command(&self, program: &str) -> Command {
        let binary = self.bindir.join(program);
        match &self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.arg("-u").arg(&user.name).arg("--").arg(binary);
                command
            }
            None => Command::new(binary),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<Output, ClusterError> {
        Ok(self.command(program).args(args).current_dir(self.dir.path()).output()?)
    }

    fn run_checked(&self, program: &str, args: &[&str]) -> Result<Output, ClusterError> {
        check(program, self.run(program, args)?)
    }

    fn write_settings(&self, options: &ClusterOptions) -> Result<(), ClusterError> {
        let data = self.data_dir();
        let mut lines = vec![
            ("listen_addresses".to_string(), "127.0.0.1".to_string()),
            ("unix_socket_directories".into(), path_str(self.dir.path()).to_string()),
            ("fsync".into(), "off".into()),
            ("synchronous_commit".into(), "off".into()),
            ("full_page_writes".into(), "off".into()),
            ("autovacuum".into(), "off".into()),
            ("max_connections".into(), options.max_connections.to_string()),
            ("max_prepared_transactions".into(), "10".into()),
            ("include_if_exists".into(), "port.conf".into()),
        ];
        if let Some(tls) = &options.tls {
            for (name, text) in [("server.crt", &tls.cert_pem), ("server.key", &tls.key_pem)] {
                let path = data.join(name);
                std::fs::write(&path, text)?;
                std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
                if let Some(user) = &self.run_as {
                    std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))?;
                }
            }
            lines.push(("ssl".into(), "on".into()));
        }
        lines.extend(options.settings.iter().cloned());
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf"))?;
        conf.push_str("\n# lockjam throwaway cluster\n");
        for (name, value) in lines {
            conf.push_str(&format!("{name} = {}\n", quote(&value)));
        }
        std::fs::write(data.join("postgresql.conf"), conf)?;
        if !options.hba.is_empty() {
            let hba = std::fs::read_to_string(data.join("pg_hba.conf"))?;
            std::fs::write(data.join("pg_hba.conf"), format!("{}\n{hba}", options.hba.join("\n")))?;
        }
        Ok(())
    }

    fn write_port(&self) -> Result<(), ClusterError> {
        let path = self.data_dir().join("port.conf");
        std::fs::write(&path, format!("port = {}\n", self.port))?;
        if let Some(user) = &self.run_as {
            std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))?;
        }
        Ok(())
    }

    fn start_server(&self) -> Result<(), ClusterError> {
        let data = self.data_dir();
        let log = self.log_file();
        let output = self.run(
            "pg_ctl",
            &["-D", path_str(&data), "-l", path_str(&log), "-w", "-t", "60", "start"],
        )?;
        check("pg_ctl start", output).map_err(|e| ClusterError::Command {
            what: "pg_ctl start".into(),
            detail: format!("{e}\nserver log:\n{}", self.log_tail()),
        })?;
        Ok(())
    }

    /// A hot standby of this cluster, streaming from it, with `settings`
    /// added to its `postgresql.conf`: this server is stopped cleanly, its
    /// data directory copied, and started again (a copy of a cleanly shut
    /// down cluster needs no base backup). Returns once the standby
    /// accepts connections.
    pub fn start_standby(&self, settings: &[(&str, &str)]) -> Result<Cluster, ClusterError> {
        let mut standby = self.copy_data("lockjam-pg-standby-")?;
        let data = standby.data_dir();
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf"))?;
        conf.push_str("\n# lockjam throwaway standby\n");
        let primary = format!(
            "host=127.0.0.1 port={} user=postgres application_name=standby",
            self.port
        );
        let socket_dir = path_str(standby.dir.path()).to_string();
        for (name, value) in [
            ("unix_socket_directories", socket_dir.as_str()),
            ("primary_conninfo", primary.as_str()),
            ("hot_standby", "on"),
        ]
        .into_iter()
        .chain(settings.iter().copied())
        {
            conf.push_str(&format!("{name} = {}\n", quote(value)));
        }
        std::fs::write(data.join("postgresql.conf"), conf)?;
        std::fs::write(data.join("standby.signal"), "")?;
        if let Some(user) = &standby.run_as {
            std::os::unix::fs::chown(data.join("standby.signal"), Some(user.uid), Some(user.gid))?;
        }
        let mut last_error = None;
        for _ in 0..5 {
            standby.port = free_port()?;
            standby.write_port()?;
            match standby.start_server() {
                Ok(()) => return Ok(standby),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("tried at least once"))
    }

    /// A copy of this cluster's data directory, not started: the server is
    /// stopped cleanly first (a copy of a cleanly shut down cluster needs
    /// no base backup) and started again if it was running.
    fn copy_data(&self, prefix: &str) -> Result<Cluster, ClusterError> {
        let running = self.postmaster_pid().is_some();
        if running {
            self.stop("fast")?;
        }
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let copied = Command::new("cp")
            .args(["-a", path_str(&self.data_dir()), path_str(&dir.path().join("data"))])
            .output()?;
        if running {
            self.start_server()?;
        }
        check("cp -a", copied)?;
        if let Some(user) = &self.run_as {
            std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid))?;
        }
        Ok(Cluster {
            bindir: self.bindir.clone(),
            dir,
            port: 0,
            run_as: self.run_as.clone(),
            version: self.version.clone(),
        })
    }

    /// Another server made from a copy of this one's data directory, as a
    /// fleet cloned from one image is (same system identifier, its own
    /// postmaster and data directory), started on a free port. For the
    /// fleet benchmark: far quicker than initdb.
    pub fn start_copy(&self) -> Result<Cluster, ClusterError> {
        let mut copy = self.copy_data("lockjam-pg-")?;
        let data = copy.data_dir();
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf"))?;
        conf.push_str(&format!(
            "\n# lockjam throwaway copy\nunix_socket_directories = {}\n",
            quote(path_str(copy.dir.path()))
        ));
        std::fs::write(data.join("postgresql.conf"), conf)?;
        let mut last_error = None;
        for _ in 0..5 {
            copy.port = free_port()?;
            copy.write_port()?;
            match copy.start_server() {
                Ok(()) => return Ok(copy),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("tried at least once"))
    }

    /// Stops the server: `mode` is pg_ctl's `smart`, `fast` or `immediate`.
    pub fn stop(&self, mode: &str) -> Result<(), ClusterError> {
        let data = self.data_dir();
        self.run_checked("pg_ctl", &["-D", path_str(&data), "-m", mode, "-w", "stop"])?;
        Ok(())
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&self) -> Result<(), ClusterError> {
        self.start_server()
    }

    /// The pid of the postmaster, from `postmaster.pid`.
    pub(crate) fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.postmaster_pid().is_some() {
            let _ = self.stop("immediate");
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}
