//! Configuration: a TOML file, `LOCKJAM__SECTION__KEY` environment
//! overrides and command-line flags.
//!
//! The sections are typed structs that serde reads as they are written
//! (durations through [`crate::duration`], lists of globs, enums): each key
//! and its default live in one struct, and `config/lockjam.toml` spells
//! them out. `check` then checks what spans keys and reads the files the
//! keys name, into [`Config`], the only type the rest of lockjam takes.

mod check;
mod files;
mod strict;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dsn::Dsn;
use crate::http::ConnectionLimits;
use crate::policy::Policy;

pub(crate) use files::read_small_file;

/// The default listen address: loopback, so that query texts on
/// `/api/v1/snapshot` are not exposed by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9863";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load configuration from {origin}: {source}")]
    Load {
        origin: String,
        #[source]
        source: config::ConfigError,
    },
    /// The line itself is not shown: it may hold a password.
    #[error("{origin}: TOML syntax error at line {line}, column {column}: {message} (the line is not shown, as it may hold a secret)")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{origin}: {message}")]
    Unreadable { origin: String, message: String },
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// Where the configuration comes from.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub file: Option<PathBuf>,
    /// `--dsn` / `LOCKJAM_DSN`: replaces the file's targets with one target
    /// named `default`.
    pub dsn: Option<String>,
    /// `--listen` / `LOCKJAM_LISTEN`.
    pub listen: Option<String>,
    /// `--cancel-blockers-after`: enables the policy (acting, unless the
    /// configuration sets `dry_run`) with the rule `unblock-migrations` at
    /// this `min_wait`: the file's rule of that name, or the default rule
    /// when the file has no rules.
    pub cancel_blockers_after: Option<String>,
    /// The process environment (passed in so that tests control it).
    pub env: HashMap<String, String>,
    /// For a command that only reads the targets (`tree`, `preflight`):
    /// `[server]`'s files (certificate, key, passwords) are not read, so
    /// that an operator who may not read them can still run it.
    pub targets_only: bool,
}

/// The configuration, checked: the sections as written, the targets with
/// their connection strings read and parsed, and what the flags changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub sampler: SamplerConfig,
    pub targets: Vec<Target>,
    pub log: LogConfig,
    pub policy: Policy,
    pub incidents: IncidentsConfig,
    pub sharding: ShardingConfig,
    /// What the flags changed in the file's settings, in words, for
    /// `check-config` and the start-up log.
    pub notes: Vec<String>,
}

/// The file as written, before `check`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    server: ServerConfig,
    #[serde(default)]
    sampler: SamplerConfig,
    #[serde(default)]
    targets: Vec<TargetSettings>,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    incidents: IncidentsConfig,
    #[serde(default)]
    sharding: ShardingConfig,
}

/// The `[sharding]` section: a fleet spread over replicas (`shard`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardingConfig {
    /// Replicas that share the targets; 1: each replica watches them all.
    pub replicas: u32,
    /// Replicas that watch each target: one leads, the others stand by.
    pub copies: u32,
    /// This replica's number, 0 to `replicas` - 1, or a name ending in it
    /// (a StatefulSet pod's, `lockjam-3`).
    pub ordinal: String,
}

impl Default for ShardingConfig {
    fn default() -> Self {
        ShardingConfig {
            replicas: 1,
            copies: 2,
            ordinal: String::new(),
        }
    }
}

/// The `[server]` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz` and `/api/*`.
    #[serde(with = "listen_address")]
    pub listen: SocketAddr,
    /// HTTPS: PEM files of the certificate chain and its private key, both
    /// or neither (see [`ServerConfig::tls`]).
    #[serde(with = "optional_path")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(with = "optional_path")]
    pub tls_key_file: Option<PathBuf>,
    pub basic_auth_user: String,
    #[serde(with = "optional_path")]
    pub basic_auth_password_file: Option<PathBuf>,
    #[serde(with = "optional_path")]
    pub bearer_token_file: Option<PathBuf>,
    /// How long a client has to send a request head.
    #[serde(with = "crate::duration::positive")]
    pub header_timeout: Duration,
    /// Open HTTP connections at most.
    pub max_connections: usize,
    /// The credentials `/metrics` and `/api/*` require, read by `check`
    /// from the files named above; none when they are blank.
    #[serde(skip)]
    pub auth: HttpAuth,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN.parse().expect("the default address parses"),
            tls_cert_file: None,
            tls_key_file: None,
            basic_auth_user: String::new(),
            basic_auth_password_file: None,
            bearer_token_file: None,
            header_timeout: Duration::from_secs(10),
            max_connections: 512,
            auth: HttpAuth::default(),
        }
    }
}

impl ServerConfig {
    /// Plain HTTP on `listen`, open to all.
    pub fn plain(listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            listen,
            ..ServerConfig::default()
        }
    }

    /// HTTPS, when both files are named (`check` refuses one alone).
    pub fn tls(&self) -> Option<TlsFiles> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert_file), Some(key_file)) => Some(TlsFiles {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
            }),
            _ => None,
        }
    }

    /// Bounds on HTTP clients.
    pub(crate) fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: self.header_timeout,
            max_connections: self.max_connections,
        }
    }
}

/// PEM files of the HTTPS certificate chain and its private key.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A secret read from a file; its `Debug` never shows it.
#[derive(Clone, PartialEq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// What a request to `/metrics` or `/api/*` must carry: HTTP basic auth,
/// a bearer token, or either when both are set.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HttpAuth {
    pub basic: Option<BasicAuth>,
    pub bearer_token: Option<FileSecret>,
}

impl HttpAuth {
    pub(crate) fn is_required(&self) -> bool {
        self.basic.is_some() || self.bearer_token.is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BasicAuth {
    pub user: String,
    pub password: FileSecret,
}

/// A secret and the file it was read from (shown instead of the secret).
#[derive(Debug, Clone, PartialEq)]
pub struct FileSecret {
    pub file: PathBuf,
    pub secret: Secret,
}

/// The `[sampler]` section: the sampler's cadence and limits, and the
/// timeouts of every lockjam session (see [`SamplerConfig::sessions`]).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerConfig {
    /// Time between samples while no session waits for a lock.
    #[serde(with = "crate::duration::positive")]
    pub interval: Duration,
    /// Time between samples while some session waits for a lock; `None`
    /// (written `"0s"`): the calm interval. The policy needs no fast
    /// cadence: it samples at its rules' deadlines.
    #[serde(with = "crate::duration::zero_is_never")]
    pub fast_interval: Option<Duration>,
    #[serde(with = "crate::duration::positive")]
    pub statement_timeout: Duration,
    #[serde(with = "crate::duration::positive")]
    pub lock_timeout: Duration,
    #[serde(with = "crate::duration::positive")]
    pub connect_timeout: Duration,
    /// Time between reads of sessions by database and state (one scan of
    /// every backend's status, which also says who waits, in place of that
    /// tick's probe); the probe for lock waits runs on every other tick.
    #[serde(with = "crate::duration::positive")]
    pub activity_interval: Duration,
    /// Relation series per target, at most.
    pub max_relations: usize,
    /// Databases named in `datname` labels per target, at most; the rest
    /// are summed into `datname="_other"`.
    pub max_databases: usize,
    /// A session to another database (opened to name its relations)
    /// closes after this long unused.
    #[serde(with = "crate::duration::positive")]
    pub database_session_idle: Duration,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            interval: Duration::from_secs(1),
            fast_interval: None,
            statement_timeout: Duration::from_secs(2),
            lock_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(5),
            activity_interval: Duration::from_secs(5),
            max_relations: 20,
            max_databases: 100,
            database_session_idle: Duration::from_secs(60),
        }
    }
}

impl SamplerConfig {
    /// The settings of every lockjam session, the sampler's and the
    /// enforcer's alike.
    pub fn sessions(&self) -> SessionSettings {
        SessionSettings {
            statement_timeout: self.statement_timeout,
            lock_timeout: self.lock_timeout,
            connect_timeout: self.connect_timeout,
        }
    }
}

/// The `[incidents]` section: what opens an incident, and where the
/// history is kept.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IncidentsConfig {
    /// The SQLite file; a relative name is in the state directory
    /// (`$STATE_DIRECTORY`, which systemd's `StateDirectory=` sets), else
    /// in the working directory. `""`: memory only.
    #[serde(with = "optional_path")]
    pub path: Option<PathBuf>,
    /// How long a waiter waits before its queue is an incident.
    #[serde(with = "crate::duration::positive")]
    pub min_wait: Duration,
    /// Lock modes on a relation whose waiters open an incident even with
    /// no one behind them.
    pub modes: Vec<String>,
    /// Incidents closed longer ago than this many days are deleted.
    pub keep_days: u32,
    /// At most this many incidents are kept (0: no limit).
    pub keep_count: u64,
}

/// The default file of `[incidents] path`.
pub const DEFAULT_INCIDENTS_FILE: &str = "lockjam-incidents.sqlite";

impl Default for IncidentsConfig {
    fn default() -> Self {
        IncidentsConfig {
            path: Some(PathBuf::from(DEFAULT_INCIDENTS_FILE)),
            min_wait: Duration::from_secs(1),
            modes: crate::policy::DEFAULT_WAITER_MODES
                .iter()
                .map(|m| m.to_string())
                .collect(),
            keep_days: 30,
            keep_count: 10_000,
        }
    }
}

/// The settings of every lockjam session, sampler's and enforcer's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionSettings {
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SamplerConfig::default().sessions()
    }
}

/// A database server to watch, its connection string parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub dsn: Dsn,
    /// libpq's default user name (the OS user), for DSNs that name none.
    pub default_user: Option<String>,
}

/// One `[[targets]]` table as written: the DSN, or the file that holds it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSettings {
    #[serde(default)]
    name: String,
    dsn: Option<String>,
    dsn_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl TryFrom<String> for LogFormat {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        match text.as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("`{other}` is neither text nor json")),
        }
    }
}

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A level or a tracing filter such as `lockjam=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// `listen`: a socket address, with a message that says what one is.
mod listen_address {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn parse(text: &str) -> Result<SocketAddr, String> {
        text.trim()
            .parse()
            .map_err(|_| format!("`{text}` is not an address such as 127.0.0.1:9863 or 0.0.0.0:9863"))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
        parse(&String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }

    pub(crate) fn serialize<S: Serializer>(address: &SocketAddr, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(address)
    }
}

/// A file name where blank (`""`, the default) means none.
mod optional_path {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<PathBuf>, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok((!text.trim().is_empty()).then(|| PathBuf::from(text.trim())))
    }

    pub(crate) fn serialize<S: Serializer>(path: &Option<PathBuf>, serializer: S) -> Result<S::Ok, S::Error> {
        match path {
            Some(path) => serializer.collect_str(&path.display()),
            None => serializer.serialize_str(""),
        }
    }
}

/// Loads and checks the configuration.
pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
    let (settings, dry_run_set, origin) = read_settings(sources)?;
    check::check(settings, dry_run_set, sources, &origin)
}

/// The `[incidents]` section only, checked, for `lockjam incidents`, which
/// needs no target.
pub fn load_incidents(sources: &Sources) -> Result<IncidentsConfig, ConfigError> {
    let (settings, _, origin) = read_settings(sources)?;
    check::incidents(settings.incidents, sources, &origin)
}

/// The file and the environment merged into the typed sections; whether
/// they set `policy.dry_run`; where they came from, for messages.
fn read_settings(sources: &Sources) -> Result<(Settings, Option<bool>, String), ConfigError> {
    let origin = match &sources.file {
        Some(path) => path.display().to_string(),
        None => "the defaults and environment".to_string(),
    };
    let mut builder = config::Config::builder();
    if let Some(path) = &sources.file {
        let text = read_small_file(path).map_err(|message| ConfigError::Unreadable {
            origin: origin.clone(),
            message,
        })?;
        strict::check_file_text(&text, &origin)?;
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }
    strict::check_environment_types(&sources.env, &origin)?;
    let environment = config::Environment::with_prefix("LOCKJAM")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .source(Some(sources.env.clone().into_iter().collect()));
    let merged = builder
        .add_source(environment)
        .build()
        .map_err(|source| ConfigError::Load {
            origin: origin.clone(),
            source,
        })?;
    // Whether the file or the environment set dry_run: the flag turns it
    // off only when neither did.
    let dry_run_set = merged.get_bool("policy.dry_run").ok();
    let value: config::Value = merged.try_deserialize().map_err(|source| ConfigError::Load {
        origin: origin.clone(),
        source,
    })?;
    let settings: Settings = serde_path_to_error::deserialize(value).map_err(|err| ConfigError::Invalid {
        origin: origin.clone(),
        key: strict::key_path(err.path()),
        // The config crate appends its own rendering of the key, without
        // the dot after an index (`rules[0]name`): the key is named above.
        message: {
            let message = strict::without_quoted_text(&err.into_inner().to_string());
            match message.find(" for key `") {
                Some(at) => message[..at].to_string(),
                None => message,
            }
        },
    })?;
    Ok((settings, dry_run_set, origin))
}

/// The effective configuration as TOML, secrets shown as the files that
/// hold them and DSNs redacted, for `lockjam check-config`.
pub fn render_effective(config: &Config) -> String {
    #[derive(Serialize)]
    struct View<'a> {
        server: &'a ServerConfig,
        sampler: &'a SamplerConfig,
        log: &'a LogConfig,
        policy: &'a Policy,
        incidents: &'a IncidentsConfig,
        sharding: &'a ShardingConfig,
        targets: Vec<TargetView<'a>>,
    }
    #[derive(Serialize)]
    struct TargetView<'a> {
        name: &'a str,
        dsn: String,
    }
    let view = View {
        server: &config.server,
        sampler: &config.sampler,
        log: &config.log,
        policy: &config.policy,
        incidents: &config.incidents,
        sharding: &config.sharding,
        targets: config
            .targets
            .iter()
            .map(|t| TargetView {
                name: &t.name,
                dsn: t.dsn.redacted(),
            })
            .collect(),
    };
    let notes: String = config.notes.iter().map(|note| format!("# {note}\n")).collect();
    match toml::to_string_pretty(&view) {
        Ok(text) => format!("{notes}{text}"),
        Err(e) => format!("# cannot render configuration: {e}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, Glob, Rule};
    use std::io::Write;
    use std::path::Path;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    fn load_text(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let file = file(text);
        load(&Sources {
            file: Some(file.path().to_path_buf()),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Sources::default()
        })
    }

    const ONE_TARGET: &str = "[[targets]]\nname = \"main\"\ndsn = \"host=db user=lockjam\"\n";

    #[test]
    fn a_sharded_replica_keeps_its_share_of_the_targets() {
        let targets: String = (0..20)
            .map(|i| format!("[[targets]]\nname = \"db{i}\"\ndsn = \"host=db{i} user=lockjam\"\n"))
            .collect();
        let mut watched = vec![0; 20];
        for ordinal in 0..4 {
            let pod = format!("lockjam-{ordinal}");
            let config = load_text(
                &format!("[sharding]\nreplicas = 4\n{targets}"),
                &[("LOCKJAM__SHARDING__ORDINAL", pod.as_str())],
            )
            .unwrap();
            for target in &config.targets {
                watched[target.name[2..].parse::<usize>().unwrap()] += 1;
            }
            assert!(
                config.notes[0].starts_with(&format!(
                    "sharding: replica {ordinal} of 4 watches {} of 20 targets (each target by 2 replicas): ",
                    config.targets.len()
                )),
                "{:?}",
                config.notes
            );
        }
        assert_eq!(watched, vec![2; 20], "every target by exactly two of the four");
        for (text, key) in [
            ("[sharding]\nreplicas = 4\n", "sharding.ordinal"),
            (
                "[sharding]\nreplicas = 4\nordinal = \"lockjam-4\"\n",
                "sharding.ordinal",
            ),
            ("[sharding]\ncopies = 0\n", "sharding.copies"),
            ("[sharding]\nreplicas = 0\n", "sharding.replicas"),
        ] {
            let error = load_text(&format!("{text}{ONE_TARGET}"), &[]).unwrap_err().to_string();
            assert!(error.contains(key), "{text}: {error}");
        }
    }

    /// Every key of each section, as the defaults serialize.
    fn keys_of(value: &impl Serialize) -> Vec<String> {
        match toml::Value::try_from(value).unwrap() {
            toml::Value::Table(table) => table.keys().cloned().collect(),
            other => panic!("not a table: {other}"),
        }
    }

    #[test]
    fn the_shipped_file_spells_out_every_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/lockjam.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let shipped: Settings = toml::from_str(&text).unwrap();
        assert_eq!(shipped.server, ServerConfig::default());
        assert_eq!(shipped.sampler, SamplerConfig::default());
        assert_eq!(shipped.log, LogConfig::default());
        assert_eq!(shipped.incidents, IncidentsConfig::default());
        assert_eq!(shipped.sharding, ShardingConfig::default());
        assert_eq!(
            shipped.policy,
            Policy {
                rules: vec![Rule::unblock_migrations(Duration::from_secs(5))],
                ..Policy::default()
            },
            "the shipped example rule spells out every rule default"
        );
        assert_eq!(shipped.targets.len(), 1);

        // Every key is written out, so that a new key is documented there.
        let written: toml::Table = toml::from_str(&text).unwrap();
        let section = |name: &str| -> Vec<String> {
            let mut keys: Vec<String> = written[name].as_table().unwrap().keys().cloned().collect();
            keys.retain(|key| key != "rules");
            keys.sort();
            keys
        };
        let sorted = |mut keys: Vec<String>| {
            keys.retain(|key| key != "rules");
            keys.sort();
            keys
        };
        assert_eq!(section("server"), sorted(keys_of(&ServerConfig::default())));
        assert_eq!(section("sampler"), sorted(keys_of(&SamplerConfig::default())));
        assert_eq!(section("log"), sorted(keys_of(&LogConfig::default())));
        assert_eq!(section("policy"), sorted(keys_of(&Policy::default())));
        let mut rule_keys: Vec<String> = written["policy"]["rules"][0]
            .as_table()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        rule_keys.sort();
        assert_eq!(rule_keys, sorted(keys_of(&Rule::default())));

        // A file with only a target loads into the same defaults.
        let defaults = load_text(ONE_TARGET, &[]).unwrap();
        assert_eq!(defaults.server, ServerConfig::default());
        assert_eq!(defaults.sampler, SamplerConfig::default());
        assert_eq!(defaults.log, LogConfig::default());
        assert_eq!(defaults.policy, Policy::default());
        assert_eq!(
            defaults.sampler.sessions(),
            SessionSettings {
                statement_timeout: Duration::from_secs(2),
                lock_timeout: Duration::from_millis(500),
                connect_timeout: Duration::from_secs(5),
            }
        );
        assert_eq!(defaults.server.listen.to_string(), DEFAULT_LISTEN);
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = load_text(
            ONE_TARGET,
            &[
                ("LOCKJAM__SAMPLER__INTERVAL", "500ms"),
                ("LOCKJAM__SAMPLER__MAX_RELATIONS", "7"),
            ],
        )
        .unwrap();
        assert_eq!(config.sampler.interval, Duration::from_millis(500));
        assert_eq!(config.sampler.max_relations, 7);
    }

    fn error_of(text: &str) -> String {
        load_text(text, &[]).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let cases = [
            ("[sampler]\nintervall = \"1s\"\n", "sampler.intervall: unknown field `intervall`"),
            ("[sampler]\ninterval = \"1 fortnight\"\n", "sampler.interval: `1 fortnight` is not a duration"),
            ("[sampler]\ninterval = \"0s\"\n", "sampler.interval: `0s` must be longer than zero"),
            ("[sampler]\nmax_relations = \"many\"\n", "sampler.max_relations"),
            ("[sampler]\nfast_interval = \"2s\"\n", "sampler.fast_interval: 2s is longer than sampler.interval"),
            ("color = 1\n", "unknown field `color`"),
            ("[server]\nlisten = \"localhost\"\n", "server.listen: `localhost` is not an address"),
            ("[log]\nformat = \"xml\"\n", "log.format: `xml` is neither text nor json"),
            ("[policy]\nenabled = true\n", "policy.rules: the policy is enabled but has no [[policy.rules]]"),
            ("[policy]\nmax_actions_per_minute = 0\n", "policy.max_actions_per_minute: must be at least 1"),
            ("[policy]\nenable = true\n", "policy.enable"),
            ("[[policy.rules]]\nname = \"\"\n", "policy.rules[0].name: every rule needs a name"),
            (
                "[[policy.rules]]\nname = \"a\"\n[[policy.rules]]\nname = \"a\"\n",
                "policy.rules[1].name: duplicate rule name `a`",
            ),
            (
                "[[policy.rules]]\nname = \"a\"\naction = \"kill\"\n",
                "policy.rules[0].action: `kill` is not an action: use cancel_blockers or cancel_waiter",
            ),
            (
                "[[policy.rules]]\nname = \"a\"\nwaiter_modes = [\"AccessExclusive\"]\n",
                "policy.rules[0].waiter_modes: `AccessExclusive` is not a PostgreSQL lock mode",
            ),
            (
                "[[policy.rules]]\nname = \"a\"\nterminate_after = \"500ms\"\n",
                "policy.rules[0].terminate_after: 500ms is shorter than sampler.interval (1s)",
            ),
            (
                "[[policy.rules]]\nname = \"a\"\nrelations = []\n",
                "policy.rules[0].relations: an empty list matches nothing",
            ),
            ("[[policy.rules]]\nname = \"a\"\nmin_wait = \"soon\"\n", "policy.rules[0].min_wait: `soon`"),
            ("[[policy.rules]]\nname = \"a\"\nmin_wait = \"0banana\"\n", "policy.rules[0].min_wait: `0banana` is not a duration"),
            ("[[policy.rules]]\nname = \"a \"\n", "policy.rules[0].name: at most 64 characters, no control characters"),
            ("[[policy.rules]]\nname = \"a\"\nwaiter_locktypes = \"relation\"\n", "policy.rules[0].waiter_locktypes: invalid type"),
            ("targets = []\n", "targets: no database to watch"),
            ("[[targets]]\nname = \"\"\ndsn = \"host=x user=u\"\n", "targets[0].name: every target needs a name"),
            (
                "[[targets]]\nname = \"a\"\ndsn = \"host=x user=u\"\n[[targets]]\nname = \"a\"\ndsn = \"host=y user=u\"\n",
                "targets[1].name: duplicate target name `a`",
            ),
            ("[[targets]]\nname = \"a\"\n", "targets[0].dsn: set exactly one of dsn and dsn_file"),
            ("[[targets]]\nname = \"a\"\ndsn = \"host=x colour=red\"\n", "targets[0].dsn: unknown connection option `colour`"),
            (
                "[[targets]]\nname = \"a\"\ndsn_file = \"/nonexistent/lockjam-dsn\"\n",
                "targets[0].dsn_file: cannot read /nonexistent/lockjam-dsn",
            ),
            ("[sampler\n", "TOML syntax error at line 1, column 9: unclosed table, expected `]`"),
            (
                "[server]\ntls_cert_file = \"/etc/hostname\"\n",
                "server.tls_key_file: set it with tls_cert_file",
            ),
            (
                "[server]\ntls_cert_file = \"/nonexistent/cert.pem\"\ntls_key_file = \"/etc/hostname\"\n",
                "server.tls_cert_file: cannot read /nonexistent/cert.pem",
            ),
            (
                "[server]\nbasic_auth_user = \"prometheus\"\n",
                "server.basic_auth_password_file: basic_auth_user is set",
            ),
            (
                "[server]\nbasic_auth_password_file = \"/etc/hostname\"\n",
                "server.basic_auth_user: basic_auth_password_file is set",
            ),
            (
                "[server]\nbearer_token_file = \"/nonexistent/token\"\n",
                "server.bearer_token_file: cannot read /nonexistent/token",
            ),
            ("[server]\nbasic_auth = \"x\"\n", "server.basic_auth: unknown field"),
        ];
        for (text, expected) in cases {
            let message = error_of(text);
            assert!(
                message.contains(expected),
                "{text:?}: got {message:?}, want {expected:?}"
            );
            assert!(message.contains(".toml"), "{text:?}: {message:?} names the file");
        }
    }

    #[test]
    fn cancel_blockers_after_builds_the_one_rule_and_acts() {
        let load_with = |flag: &str, env: &[(&str, &str)]| {
            let file = file(ONE_TARGET);
            load(&Sources {
                file: Some(file.path().to_path_buf()),
                cancel_blockers_after: Some(flag.into()),
                env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Sources::default()
            })
        };
        let policy = load_with("2s", &[]).unwrap().policy;
        assert_eq!(
            policy,
            Policy::acting(vec![Rule::unblock_migrations(Duration::from_secs(2))])
        );
        assert!(
            load_with("2s", &[("LOCKJAM__POLICY__DRY_RUN", "true")])
                .unwrap()
                .policy
                .dry_run
        );
        let err = load_with("later", &[]).unwrap_err().to_string();
        assert!(err.contains("--cancel-blockers-after: `later`"), "{err}");
        let never = load_text(
            &format!("{ONE_TARGET}[[policy.rules]]\nname = \"a\"\nterminate_after = \"0s\"\nmin_wait = \"0s\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(never.policy.rules[0].terminate_after, None);
        assert_eq!(never.policy.rules[0].min_wait, Duration::ZERO);
        assert!(!never.policy.enabled && never.policy.dry_run);
    }

    fn load_flag(text: &str, flag: &str) -> Result<Config, ConfigError> {
        let file = file(&format!("{ONE_TARGET}{text}"));
        load(&Sources {
            file: Some(file.path().to_path_buf()),
            cancel_blockers_after: Some(flag.into()),
            ..Sources::default()
        })
    }

    #[test]
    fn the_flag_keeps_every_protection_of_the_file() {
        // [policy] protections apply to the flag's rule.
        let config = load_flag("[policy]\nprotect_applications = [\"pg_dump*\"]\n", "2s").unwrap();
        assert_eq!(config.policy.protect_applications, vec![Glob("pg_dump*".into())]);
        assert_eq!(
            config.policy.rules,
            vec![Rule::unblock_migrations(Duration::from_secs(2))]
        );
        let shown = render_effective(&config);
        assert!(
            shown.starts_with(
                "# --cancel-blockers-after 2s added rule `unblock-migrations` with the default keys; [policy] protections apply to it\n\
                 # --cancel-blockers-after turned the policy on with dry_run = false\n"
            ),
            "{shown}"
        );
        assert!(shown.contains("protect_applications = [\"pg_dump*\"]"), "{shown}");
        assert!(shown.contains("name = \"unblock-migrations\""), "{shown}");

        // A file rule of that name keeps its protections and other keys;
        // the flag sets its min_wait, and the other rules stay.
        let two_rules = "[[policy.rules]]\nname = \"unblock-migrations\"\nprotect_applications = [\"pg_dump*\"]\n\
                         terminate_after = \"3s\"\n[[policy.rules]]\nname = \"timeout\"\naction = \"cancel_waiter\"\n";
        let config = load_flag(two_rules, "2s").unwrap();
        let rules = &config.policy.rules;
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].min_wait, Duration::from_secs(2));
        assert_eq!(rules[0].terminate_after, Some(Duration::from_secs(3)));
        assert_eq!(rules[0].protect_applications, vec![Glob("pg_dump*".into())]);
        assert_eq!(
            (rules[1].name.as_str(), rules[1].action),
            ("timeout", Action::CancelWaiter)
        );
        assert!(config.policy.enabled && !config.policy.dry_run);
        let shipped = load(&Sources {
            file: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/lockjam.toml")),
            cancel_blockers_after: Some("2s".into()),
            ..Sources::default()
        })
        .unwrap();
        assert!(shipped.policy.dry_run, "the shipped file sets dry_run = true");
        assert!(
            render_effective(&shipped).contains("dry_run = true, set in the configuration, keeps it from signalling"),
            "{}",
            render_effective(&shipped)
        );
        assert!(render_effective(&config).starts_with(
            "# --cancel-blockers-after 2s set min_wait of rule `unblock-migrations`; its other keys and every other rule are the file's\n"
        ));

        // Rules but none the flag could adjust: refused, naming both.
        let err = load_flag(
            "[[policy.rules]]\nname = \"careful\"\nprotect_users = [\"backup\"]\n",
            "2s",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--cancel-blockers-after: the flag sets min_wait of the rule named `unblock-migrations`, and policy.rules has none (careful)"),
            "{err}"
        );
    }

    #[test]
    fn rule_and_policy_keys_are_checked() {
        let config = load_text(
            &format!(
                "{ONE_TARGET}[policy]\nprotect_users = [\"backup\"]\nprotect_databases = [\"billing\"]\n\
                 [[policy.rules]]\nname = \"rows\"\nwaiter_locktypes = [\"relation\", \"tuple\"]\nwaiter_modes = [\"ShareLock\"]\n"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(config.policy.protect_users, vec![Glob("backup".into())]);
        assert_eq!(config.policy.protect_databases, vec![Glob("billing".into())]);
        assert_eq!(config.policy.rules[0].waiter_locktypes, vec!["relation", "tuple"]);
        assert_eq!(config.policy.rules[0].waiter_modes, vec!["ShareLock"]);
        for (text, expected) in [
            (
                "[[policy.rules]]\nname = \"a\"\nwaiter_locktypes = [\"row\"]\n",
                "policy.rules[0].waiter_locktypes: `row` is not a pg_locks.locktype",
            ),
            (
                "[[policy.rules]]\nname = \"a\"\nwaiter_locktypes = []\n",
                "policy.rules[0].waiter_locktypes: an empty list matches no waiter",
            ),
            (
                "[policy]\nprotect_user = [\"x\"]\n",
                "policy.protect_user: unknown field",
            ),
            ("[policy]\nprotect_users = \"x\"\n", "policy.protect_users"),
        ] {
            let message = error_of(text);
            assert!(
                message.contains(expected),
                "{text:?}: got {message:?}, want {expected:?}"
            );
        }
    }

    proptest::proptest! {
        // 64 cases a run; PROPTEST_CASES=5000 for the figures in
        // docs/reliability.md.
        #![proptest_config(proptest::test_runner::Config::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64)
        ))]

        /// Any duration text is parsed or refused with a message, never a panic.
        #[test]
        fn any_duration_parses_or_errs(text in ".*") {
            if let Err(message) = crate::duration::parse(&text) {
                let quoted = format!("`{}`", text);
                proptest::prop_assert!(message.contains(&quoted));
            }
        }

        /// A file holding a DSN with a password, damaged anywhere, loads or
        /// is refused without the password in the message.
        #[test]
        fn no_error_shows_a_password(
            password in "[A-Za-z0-9]{10,16}",
            at in 0usize..200,
            damage in "[\\[\\]\"'=# a-z\\\\\n{}.,]{1,3}",
        ) {
            let text = format!(
                "[sampler]\ninterval = \"1s\"\n[[targets]]\nname = \"main\"\ndsn = \"host=db user=u password={password} dbname=app\"\n[log]\nlevel = \"info\"\n"
            );
            let at = text.char_indices().map(|(i, _)| i).nth(at % text.chars().count()).unwrap();
            let damaged = format!("{}{damage}{}", &text[..at], &text[at..]);
            if let Err(error) = load_text(&damaged, &[]) {
                proptest::prop_assert!(!error.to_string().contains(&password), "{}", error);
            }
            let env = [("PGPASSWORD", password.as_str()), ("PGSSLMODE", "verify_full")];
            if let Err(error) = load_text(&text, &env) {
                proptest::prop_assert!(!error.to_string().contains(&password), "{}", error);
            }
        }

        /// A secret put under a count, a switch or a list, in the file or
        /// the environment, is refused without being shown. (A bad
        /// duration, address or format is quoted, so that the mistake can
        /// be seen.)
        #[test]
        fn a_misplaced_secret_is_never_shown(
            password in "[A-Za-z0-9 .:/@-]{8,24}",
            key in proptest::sample::select(&[
                ("server", "max_connections"), ("sampler", "max_relations"),
                ("policy", "enabled"), ("policy", "dry_run"),
                ("policy", "max_actions_per_minute"), ("policy", "protect_users"),
            ][..]),
        ) {
            let (section, name) = key;
            let text = format!("{ONE_TARGET}[{section}]\n{name} = \"{password}\"\n");
            if let Err(error) = load_text(&text, &[]) {
                proptest::prop_assert!(!error.to_string().contains(password.trim()), "{}", error);
            }
            let variable = format!("LOCKJAM__{}__{}", section.to_uppercase(), name.to_uppercase());
            if let Err(error) = load_text(ONE_TARGET, &[(variable.as_str(), password.as_str())]) {
                proptest::prop_assert!(!error.to_string().contains(password.trim()), "{}", error);
            }
        }

        /// Any file, TOML or not, loads or is refused naming the file.
        #[test]
        fn any_file_loads_or_names_itself(text in "(\\[[a-z]{1,8}\\]\n|[a-z_]{1,12} = (\"[ -~]{0,12}\"|[0-9]{1,4}|true)\n|[ -~]{0,20}\n){0,8}") {
            if let Err(error) = load_text(&text, &[]) {
                proptest::prop_assert!(error.to_string().contains(".toml"), "{}", error);
            }
        }
    }

    #[test]
    fn server_credentials_are_read_from_files_and_never_shown() {
        let password = file("  hunter2-of-the-scrape\n");
        let token = file("t0ken-of-the-bearer\n");
        let text = format!(
            "[server]\nbasic_auth_user = \"prometheus\"\nbasic_auth_password_file = \"{}\"\nbearer_token_file = \"{}\"\n{ONE_TARGET}",
            password.path().display(),
            token.path().display()
        );
        let config = load_text(&text, &[]).unwrap();
        let basic = config.server.auth.basic.as_ref().unwrap();
        assert_eq!(basic.user, "prometheus");
        assert_eq!(basic.password.secret, Secret("hunter2-of-the-scrape".into()));
        assert_eq!(
            config.server.auth.bearer_token.as_ref().unwrap().secret,
            Secret("t0ken-of-the-bearer".into())
        );
        assert!(config.server.auth.is_required());
        let shown = format!("{}\n{config:?}", render_effective(&config));
        assert!(!shown.contains("hunter2") && !shown.contains("t0ken"), "{shown}");
        assert!(shown.contains(&password.path().display().to_string()), "{shown}");
    }

    #[test]
    fn only_small_regular_files_are_read() {
        for (path, expected) in [
            ("/dev/zero", "/dev/zero is not a regular file"),
            ("/tmp", "/tmp is not a regular file"),
        ] {
            let message = error_of(&format!("[[targets]]\nname = \"a\"\ndsn_file = \"{path}\"\n"));
            assert!(message.contains(expected), "{message}");
        }
        let big = file(&"#".repeat(2 << 20));
        let message = load(&Sources {
            file: Some(big.path().to_path_buf()),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert!(message.contains("is larger than 1048576 bytes"), "{message}");
        let message = load(&Sources {
            file: Some("/dev/zero".into()),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert_eq!(message, "/dev/zero: /dev/zero is not a regular file");
    }

    #[test]
    fn syntax_errors_give_the_position_not_the_line() {
        let message = error_of("[[targets]]\nname = \"main\"\ndsn = \"host=db password=Sup3r-Secret user=x\" junk\n");
        assert!(!message.contains("Sup3r-Secret"), "{message}");
        assert!(message.contains("TOML syntax error at line 3, column 46"), "{message}");
        let message = load_text(ONE_TARGET, &[("PGSSLMODE", "VERIFY-FULL")])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("environment variable PGSSLMODE has invalid value `VERIFY-FULL`"),
            "{message}"
        );
    }

    #[test]
    fn dsn_file_is_read_and_never_shown() {
        let secret = file("postgres://lockjam:s3cret@db.internal/app\n");
        let config = load_text(
            &format!(
                "[[targets]]\nname = \"main\"\ndsn_file = \"{}\"\n",
                secret.path().display()
            ),
            &[],
        )
        .unwrap();
        assert_eq!(config.targets[0].dsn.get("password"), Some("s3cret"));
        let shown = render_effective(&config);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("password=********"), "{shown}");
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn flags_and_libpq_environment() {
        let config = load(&Sources {
            dsn: Some("host=flag user=u".into()),
            listen: Some("0.0.0.0:9999".into()),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(
            (config.targets[0].name.as_str(), config.targets[0].dsn.get("host")),
            ("default", Some("flag"))
        );
        assert_eq!(config.server.listen.to_string(), "0.0.0.0:9999");
        let from_env = load(&Sources {
            env: [("PGHOST", "envhost"), ("PGUSER", "u")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(from_env.targets[0].dsn.get("host"), Some("envhost"));
        let err = load(&Sources::default()).unwrap_err().to_string();
        assert!(
            err.contains("the defaults and environment: targets: no database to watch"),
            "{err}"
        );
    }
}
