//! Configuration: a TOML file, `LOCKJAM__SECTION__KEY` environment
//! overrides and command-line flags, parsed into raw types and validated
//! once into [`Config`], the only type the rest of lockjam takes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::analysis::{is_lock_mode, is_lock_type};
use crate::dsn::{Dsn, DsnError};
use crate::http::ConnectionLimits;
use crate::policy::{
    Action, Glob, Policy, Protections, Rule, DEFAULT_WAITER_LOCKTYPES, DEFAULT_WAITER_MODES, UNBLOCK_MIGRATIONS,
};

/// The default listen address: loopback, so that query texts on
/// `/api/v1/snapshot` are not exposed by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9863";

/// The highest `server.max_connections`: beyond it, the file descriptors
/// alone outgrow any sensible `LimitNOFILE`.
const MAX_HTTP_CONNECTIONS: usize = 60_000;

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
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub sampler: SamplerConfig,
    /// Timeouts of every lockjam session, the sampler's and the
    /// enforcer's alike (keys of the `[sampler]` section).
    pub sessions: SessionSettings,
    pub targets: Vec<Target>,
    pub log: LogConfig,
    pub policy: Policy,
    /// What the flags changed in the file's settings, in words, for
    /// `check-config` and the start-up log.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// HTTPS instead of HTTP, with this certificate chain and key.
    pub tls: Option<TlsFiles>,
    /// Credentials `/metrics` and `/api/*` require; none when empty.
    pub auth: HttpAuth,
    /// Bounds on HTTP clients.
    pub limits: ConnectionLimits,
}

impl ServerConfig {
    /// Plain HTTP on `listen`, open to all.
    pub fn plain(listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            listen,
            tls: None,
            auth: HttpAuth::default(),
            limits: ConnectionLimits {
                header_timeout: Duration::from_secs(10),
                max_connections: 512,
            },
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
    pub fn is_required(&self) -> bool {
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

#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    pub interval: Duration,
    pub fast_interval: Duration,
    pub max_relations: usize,
    /// A session to another database (opened to name its relations)
    /// closes after this long unused.
    pub database_session_idle: Duration,
}

impl Default for SamplerConfig {
    /// The documented defaults (those of `config/lockjam.toml`).
    fn default() -> Self {
        let raw = RawSampler::default();
        let duration = |text: &str| parse_duration(text).expect("default durations parse");
        SamplerConfig {
            interval: duration(&raw.interval),
            fast_interval: duration(&raw.fast_interval),
            max_relations: raw.max_relations,
            database_session_idle: duration(&raw.database_session_idle),
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
    /// The documented defaults (those of `config/lockjam.toml`).
    fn default() -> Self {
        let raw = RawSampler::default();
        let duration = |text: &str| parse_duration(text).expect("default durations parse");
        SessionSettings {
            statement_timeout: duration(&raw.statement_timeout),
            lock_timeout: duration(&raw.lock_timeout),
            connect_timeout: duration(&raw.connect_timeout),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub dsn: Dsn,
    /// libpq's default user name (the OS user), for DSNs that name none.
    pub default_user: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    sampler: RawSampler,
    #[serde(default)]
    targets: Vec<RawTarget>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    policy: RawPolicy,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    tls_cert_file: String,
    tls_key_file: String,
    basic_auth_user: String,
    basic_auth_password_file: String,
    bearer_token_file: String,
    header_timeout: String,
    max_connections: usize,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: DEFAULT_LISTEN.into(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            basic_auth_user: String::new(),
            basic_auth_password_file: String::new(),
            bearer_token_file: String::new(),
            header_timeout: "10s".into(),
            max_connections: 512,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawSampler {
    interval: String,
    fast_interval: String,
    statement_timeout: String,
    lock_timeout: String,
    connect_timeout: String,
    max_relations: usize,
    database_session_idle: String,
}

impl Default for RawSampler {
    fn default() -> Self {
        RawSampler {
            interval: "1s".into(),
            fast_interval: "250ms".into(),
            statement_timeout: "2s".into(),
            lock_timeout: "500ms".into(),
            connect_timeout: "5s".into(),
            max_relations: 20,
            database_session_idle: "60s".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    #[serde(default)]
    name: String,
    dsn: Option<String>,
    dsn_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: String,
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawPolicy {
    enabled: bool,
    /// `None`: true, or false when `--cancel-blockers-after` asks for action.
    dry_run: Option<bool>,
    max_actions_per_minute: u32,
    protect_users: Vec<String>,
    protect_applications: Vec<String>,
    protect_databases: Vec<String>,
    rules: Vec<RawRule>,
}

impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            enabled: false,
            dry_run: None,
            max_actions_per_minute: 30,
            protect_users: Vec::new(),
            protect_applications: Vec::new(),
            protect_databases: Vec::new(),
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawRule {
    name: String,
    waiter_modes: Vec<String>,
    waiter_locktypes: Vec<String>,
    relations: Vec<String>,
    databases: Vec<String>,
    waiter_applications: Vec<String>,
    min_wait: String,
    min_queue: u64,
    action: String,
    terminate_after: String,
    protect_users: Vec<String>,
    protect_applications: Vec<String>,
    protect_databases: Vec<String>,
    on_standby: bool,
}

impl Default for RawRule {
    fn default() -> Self {
        let everything = || vec!["*".to_string()];
        RawRule {
            name: String::new(),
            waiter_modes: DEFAULT_WAITER_MODES.iter().map(|m| m.to_string()).collect(),
            waiter_locktypes: DEFAULT_WAITER_LOCKTYPES.iter().map(|t| t.to_string()).collect(),
            relations: everything(),
            databases: everything(),
            waiter_applications: everything(),
            min_wait: "5s".into(),
            min_queue: 0,
            action: "cancel_blockers".into(),
            terminate_after: "10s".into(),
            protect_users: Vec::new(),
            protect_applications: Vec::new(),
            protect_databases: Vec::new(),
            on_standby: false,
        }
    }
}

/// Loads and validates the configuration.
pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
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
        check_file_text(&text, &origin)?;
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }
    check_environment_types(&sources.env, &origin)?;
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
    let value: config::Value = merged.try_deserialize().map_err(|source| ConfigError::Load {
        origin: origin.clone(),
        source,
    })?;
    let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|err| ConfigError::Invalid {
        origin: origin.clone(),
        key: match err.path().to_string().as_str() {
            "." => "(top level)".to_string(),
            path => path.to_string(),
        },
        // The config crate appends its own rendering of the key, without
        // the dot after an index (`rules[0]name`): the key is named above.
        message: {
            let message = without_quoted_text(&err.into_inner().to_string());
            match message.find(" for key `") {
                Some(at) => message[..at].to_string(),
                None => message,
            }
        },
    })?;
    validate(raw, sources, &origin)
}

fn validate(raw: RawConfig, sources: &Sources, origin: &str) -> Result<Config, ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        origin: origin.to_string(),
        key: key.to_string(),
        message,
    };
    let listen_text = sources.listen.as_deref().unwrap_or(&raw.server.listen);
    let listen = listen_text.parse().map_err(|_| {
        invalid(
            "server.listen",
            format!("`{listen_text}` is not an address such as 127.0.0.1:9863 or 0.0.0.0:9863"),
        )
    })?;
    let server = validate_server(&raw.server, listen, &invalid)?;
    let (sampler, sessions) = validate_sampler(&raw.sampler, &invalid)?;
    let log = validate_log(raw.log, &invalid)?;
    let (policy, notes) = validate_policy(&raw.policy, sources, sampler.interval, &invalid)?;
    let targets = validate_targets(&raw.targets, sources, &invalid)?;
    Ok(Config {
        server,
        sampler,
        sessions,
        targets,
        log,
        policy,
        notes,
    })
}

/// The `[sampler]` section: the sampler's cadence and limits, and the
/// timeouts of every session.
fn validate_sampler(
    raw: &RawSampler,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(SamplerConfig, SessionSettings), ConfigError> {
    let duration =
        |key: &str, text: &str| parse_duration(text).map_err(|message| invalid(&format!("sampler.{key}"), message));
    let sessions = SessionSettings {
        statement_timeout: duration("statement_timeout", &raw.statement_timeout)?,
        lock_timeout: duration("lock_timeout", &raw.lock_timeout)?,
        connect_timeout: duration("connect_timeout", &raw.connect_timeout)?,
    };
    let sampler = SamplerConfig {
        interval: duration("interval", &raw.interval)?,
        fast_interval: duration("fast_interval", &raw.fast_interval)?,
        max_relations: raw.max_relations,
        database_session_idle: duration("database_session_idle", &raw.database_session_idle)?,
    };
    if sampler.fast_interval > sampler.interval {
        return Err(invalid(
            "sampler.fast_interval",
            format!(
                "{} is longer than sampler.interval ({}); it is the faster cadence used while locks are waited for",
                raw.fast_interval, raw.interval
            ),
        ));
    }
    if sampler.max_relations == 0 {
        return Err(invalid("sampler.max_relations", "must be at least 1".into()));
    }
    Ok((sampler, sessions))
}

fn validate_log(raw: RawLog, invalid: &dyn Fn(&str, String) -> ConfigError) -> Result<LogConfig, ConfigError> {
    let format = match raw.format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => return Err(invalid("log.format", format!("`{other}` is neither text nor json"))),
    };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.level) {
        return Err(invalid(
            "log.level",
            format!("`{}`: {e} (use error, warn, info, debug or trace)", raw.level),
        ));
    }
    Ok(LogConfig {
        format,
        level: raw.level,
    })
}

/// The targets: `--dsn`, else the file's `[[targets]]`, else the libpq
/// environment; each DSN must make a connection configuration.
fn validate_targets(
    raw: &[RawTarget],
    sources: &Sources,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Vec<Target>, ConfigError> {
    let default_user = sources.env.get("USER").cloned();
    let targets = match &sources.dsn {
        Some(text) => vec![target("default", text, &sources.env, &default_user)
            .map_err(|e| invalid("--dsn", e.to_string()))?],
        None if raw.is_empty() => match Dsn::from_env(&sources.env) {
            Ok(Some(dsn)) => vec![Target {
                name: "default".into(),
                dsn,
                default_user: default_user.clone(),
            }],
            Ok(None) => {
                return Err(invalid(
                    "targets",
                    "no database to watch: add a [[targets]] table, pass --dsn or LOCKJAM_DSN, or set DATABASE_URL or PGHOST"
                        .into(),
                ))
            }
            Err(e) => return Err(invalid("environment (DATABASE_URL/PG*)", e.to_string())),
        },
        None => file_targets(raw, sources, &default_user, invalid)?,
    };
    for target in &targets {
        target
            .dsn
            .pg_config(target.default_user.as_deref())
            .map_err(|e| invalid(&format!("targets.{}", target.name), e.to_string()))?;
    }
    Ok(targets)
}

fn validate_server(
    raw: &RawServer,
    listen: SocketAddr,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ServerConfig, ConfigError> {
    let header_timeout =
        parse_duration(&raw.header_timeout).map_err(|message| invalid("server.header_timeout", message))?;
    if !(1..=MAX_HTTP_CONNECTIONS).contains(&raw.max_connections) {
        return Err(invalid(
            "server.max_connections",
            format!(
                "{} is out of range: give 1 to {MAX_HTTP_CONNECTIONS}, and keep it below the open-file limit \
                 (LimitNOFILE)",
                raw.max_connections
            ),
        ));
    }
    Ok(ServerConfig {
        listen,
        tls: validate_tls(raw, invalid)?,
        auth: validate_auth(raw, invalid)?,
        limits: ConnectionLimits {
            header_timeout,
            max_connections: raw.max_connections,
        },
    })
}

/// A path from a key's text; `None` when blank.
fn optional_path(text: &str) -> Option<PathBuf> {
    (!text.trim().is_empty()).then(|| PathBuf::from(text.trim()))
}

/// HTTPS: both files or neither, each a small regular file.
fn validate_tls(
    raw: &RawServer,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<TlsFiles>, ConfigError> {
    let readable = |key: &str, file: &Path| read_small_file(file).map(drop).map_err(|message| invalid(key, message));
    match (optional_path(&raw.tls_cert_file), optional_path(&raw.tls_key_file)) {
        (None, None) => Ok(None),
        (Some(cert_file), Some(key_file)) => {
            readable("server.tls_cert_file", &cert_file)?;
            readable("server.tls_key_file", &key_file)?;
            Ok(Some(TlsFiles { cert_file, key_file }))
        }
        (Some(_), None) => Err(invalid(
            "server.tls_key_file",
            "set it with tls_cert_file: HTTPS needs both".into(),
        )),
        (None, Some(_)) => Err(invalid(
            "server.tls_cert_file",
            "set it with tls_key_file: HTTPS needs both".into(),
        )),
    }
}

/// The credentials `/metrics` and `/api/*` require, read from their files.
fn validate_auth(raw: &RawServer, invalid: &dyn Fn(&str, String) -> ConfigError) -> Result<HttpAuth, ConfigError> {
    let file_secret = |key: &str, file: PathBuf| {
        read_secret(&file)
            .map(|secret| FileSecret {
                file,
                secret: Secret(secret),
            })
            .map_err(|message| invalid(key, message))
    };
    let basic = match (raw.basic_auth_user.trim(), optional_path(&raw.basic_auth_password_file)) {
        ("", None) => None,
        ("", Some(_)) => {
            return Err(invalid(
                "server.basic_auth_user",
                "basic_auth_password_file is set: name the user too".into(),
            ))
        }
        (_, None) => {
            return Err(invalid(
                "server.basic_auth_password_file",
                "basic_auth_user is set: name a file that holds the password".into(),
            ))
        }
        (user, Some(file)) if !user.contains(':') => Some(BasicAuth {
            user: user.to_string(),
            password: file_secret("server.basic_auth_password_file", file)?,
        }),
        (_, Some(_)) => return Err(invalid("server.basic_auth_user", "may not contain `:`".into())),
    };
    let bearer_token = optional_path(&raw.bearer_token_file)
        .map(|file| file_secret("server.bearer_token_file", file))
        .transpose()?;
    Ok(HttpAuth { basic, bearer_token })
}

fn validate_policy(
    raw: &RawPolicy,
    sources: &Sources,
    interval: Duration,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(Policy, Vec<String>), ConfigError> {
    if raw.max_actions_per_minute == 0 {
        return Err(invalid("policy.max_actions_per_minute", "must be at least 1".into()));
    }
    let flag = sources
        .cancel_blockers_after
        .as_deref()
        .map(|text| parse_duration(text).map_err(|message| invalid("--cancel-blockers-after", message)))
        .transpose()?;
    let protect = protections(
        "policy.",
        [&raw.protect_users, &raw.protect_applications, &raw.protect_databases],
        invalid,
    )?;
    let mut names = HashSet::new();
    let mut rules = Vec::new();
    for (index, rule) in raw.rules.iter().enumerate() {
        let rule = validate_rule(&format!("policy.rules[{index}]."), rule, interval, invalid)?;
        if !names.insert(rule.name.clone()) {
            return Err(invalid(
                &format!("policy.rules[{index}].name"),
                format!("duplicate rule name `{}`", rule.name),
            ));
        }
        rules.push(rule);
    }
    let notes = match flag {
        Some(min_wait) => apply_flag(min_wait, &mut rules, raw.dry_run, invalid)?,
        None => Vec::new(),
    };
    let enabled = raw.enabled || flag.is_some();
    if enabled && rules.is_empty() {
        return Err(invalid(
            "policy.rules",
            "the policy is enabled but has no [[policy.rules]]; add one, or use --cancel-blockers-after".into(),
        ));
    }
    let policy = Policy {
        enabled,
        dry_run: raw.dry_run.unwrap_or(flag.is_none()),
        max_actions_per_minute: raw.max_actions_per_minute,
        protect,
        rules,
    };
    Ok((policy, notes))
}

/// Globs from a list of patterns; an empty list is refused unless it may
/// be empty (a protection list), since it would match nothing.
fn globs(
    key: &str,
    patterns: &[String],
    may_be_empty: bool,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Vec<Glob>, ConfigError> {
    if patterns.is_empty() && !may_be_empty {
        return Err(invalid(
            key,
            "an empty list matches nothing; use [\"*\"] for all".into(),
        ));
    }
    Ok(patterns.iter().map(|p| Glob(p.clone())).collect())
}

/// `protect_users`, `protect_applications` and `protect_databases` under
/// `prefix`.
fn protections(
    prefix: &str,
    [users, applications, databases]: [&[String]; 3],
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Protections, ConfigError> {
    Ok(Protections {
        users: globs(&format!("{prefix}protect_users"), users, true, invalid)?,
        applications: globs(&format!("{prefix}protect_applications"), applications, true, invalid)?,
        databases: globs(&format!("{prefix}protect_databases"), databases, true, invalid)?,
    })
}

/// One `[[policy.rules]]` entry, its keys named under `prefix`.
fn validate_rule(
    prefix: &str,
    rule: &RawRule,
    interval: Duration,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Rule, ConfigError> {
    let key = |field: &str| format!("{prefix}{field}");
    check_rule_name(&rule.name).map_err(|message| invalid(&key("name"), message.into()))?;
    let action = Action::parse(&rule.action).ok_or_else(|| {
        invalid(
            &key("action"),
            format!(
                "`{}` is not an action: use cancel_blockers or cancel_waiter",
                rule.action
            ),
        )
    })?;
    check_waiter_kinds(rule).map_err(|(field, message)| invalid(&key(field), message))?;
    let min_wait = parse_duration_or_zero(&rule.min_wait).map_err(|m| invalid(&key("min_wait"), m))?;
    let terminate_after =
        parse_duration_or_zero(&rule.terminate_after).map_err(|m| invalid(&key("terminate_after"), m))?;
    if !terminate_after.is_zero() && terminate_after < interval {
        return Err(invalid(
            &key("terminate_after"),
            format!(
                "{} is shorter than sampler.interval ({}): lockjam could not see whether the cancel worked; use at least the interval, or \"0s\" to never terminate",
                rule.terminate_after,
                humantime::format_duration(interval)
            ),
        ));
    }
    Ok(Rule {
        name: rule.name.clone(),
        waiter_modes: rule.waiter_modes.clone(),
        waiter_locktypes: rule.waiter_locktypes.clone(),
        relations: globs(&key("relations"), &rule.relations, false, invalid)?,
        databases: globs(&key("databases"), &rule.databases, false, invalid)?,
        waiter_applications: globs(&key("waiter_applications"), &rule.waiter_applications, false, invalid)?,
        min_wait,
        min_queue: rule.min_queue,
        action,
        terminate_after: (!terminate_after.is_zero()).then_some(terminate_after),
        protect: protections(
            prefix,
            [&rule.protect_users, &rule.protect_applications, &rule.protect_databases],
            invalid,
        )?,
        on_standby: rule.on_standby,
    })
}

/// A rule's name is the `rule` label: short, printable, trimmed.
fn check_rule_name(name: &str) -> Result<(), &'static str> {
    if name.trim().is_empty() {
        return Err("every rule needs a name (it is the `rule` label)");
    }
    if name != name.trim() || name.chars().any(char::is_control) || name.len() > 64 {
        return Err("at most 64 characters, no control characters, no space at either end (it is the `rule` label)");
    }
    Ok(())
}

/// The waits a rule is about: lock modes and lock types PostgreSQL has.
/// On error, the field at fault and why.
fn check_waiter_kinds(rule: &RawRule) -> Result<(), (&'static str, String)> {
    if rule.waiter_modes.is_empty() {
        return Err(("waiter_modes", "an empty list matches no waiter".into()));
    }
    if let Some(mode) = rule.waiter_modes.iter().find(|m| !is_lock_mode(m)) {
        return Err((
            "waiter_modes",
            format!("`{mode}` is not a PostgreSQL lock mode such as AccessExclusiveLock or ShareRowExclusiveLock"),
        ));
    }
    if rule.waiter_locktypes.is_empty() {
        return Err(("waiter_locktypes", "an empty list matches no waiter".into()));
    }
    if let Some(locktype) = rule.waiter_locktypes.iter().find(|t| !is_lock_type(t)) {
        return Err((
            "waiter_locktypes",
            format!("`{locktype}` is not a pg_locks.locktype such as relation, tuple or transactionid"),
        ));
    }
    Ok(())
}

/// `--cancel-blockers-after`: sets `min_wait` of rule `unblock-migrations`,
/// or adds that rule when there are none. Returns the notes that say what
/// it did.
fn apply_flag(
    min_wait: Duration,
    rules: &mut Vec<Rule>,
    dry_run: Option<bool>,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Vec<String>, ConfigError> {
    let shown = humantime::format_duration(min_wait);
    let has_rules = !rules.is_empty();
    let mut notes = Vec::new();
    match rules.iter_mut().find(|rule| rule.name == UNBLOCK_MIGRATIONS) {
        Some(rule) => {
            rule.min_wait = min_wait;
            notes.push(format!(
                "--cancel-blockers-after {shown} set min_wait of rule `{UNBLOCK_MIGRATIONS}`; its other keys and every other rule are the file's"
            ));
        }
        None if !has_rules => {
            rules.push(Rule::unblock_migrations(min_wait));
            notes.push(format!(
                "--cancel-blockers-after {shown} added rule `{UNBLOCK_MIGRATIONS}` with the default keys; [policy] protections apply to it"
            ));
        }
        None => {
            let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
            return Err(invalid(
                "--cancel-blockers-after",
                format!(
                    "the flag sets min_wait of the rule named `{UNBLOCK_MIGRATIONS}`, and policy.rules has none ({}): \
                     rename the rule the flag should adjust, or drop the flag and set the rules' min_wait and \
                     [policy] enabled = true, dry_run = false",
                    names.join(", ")
                ),
            ));
        }
    }
    notes.push(match dry_run {
        None => "--cancel-blockers-after turned the policy on with dry_run = false".into(),
        Some(true) => "--cancel-blockers-after turned the policy on; dry_run = true, set in the configuration, \
                       keeps it from signalling: set dry_run = false to act"
            .into(),
        Some(false) => "--cancel-blockers-after turned the policy on; dry_run = false".into(),
    });
    Ok(notes)
}

fn file_targets(
    raw: &[RawTarget],
    sources: &Sources,
    default_user: &Option<String>,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Vec<Target>, ConfigError> {
    let mut names = HashSet::new();
    let mut targets = Vec::new();
    for (index, raw) in raw.iter().enumerate() {
        let key = |field: &str| format!("targets[{index}].{field}");
        if raw.name.trim().is_empty() {
            return Err(invalid(
                &key("name"),
                "every target needs a name (it is the `target` label)".into(),
            ));
        }
        if raw.name.chars().any(char::is_control) || raw.name.len() > 64 {
            return Err(invalid(
                &key("name"),
                "at most 64 characters, no control characters".into(),
            ));
        }
        if !names.insert(raw.name.clone()) {
            return Err(invalid(&key("name"), format!("duplicate target name `{}`", raw.name)));
        }
        let text = match (&raw.dsn, &raw.dsn_file) {
            (Some(dsn), None) => dsn.clone(),
            (None, Some(path)) => read_secret(path).map_err(|message| invalid(&key("dsn_file"), message))?,
            _ => return Err(invalid(&key("dsn"), "set exactly one of dsn and dsn_file".into())),
        };
        let field = if raw.dsn.is_some() { "dsn" } else { "dsn_file" };
        targets.push(
            target(&raw.name, &text, &sources.env, default_user).map_err(|e| invalid(&key(field), e.to_string()))?,
        );
    }
    Ok(targets)
}

fn target(
    name: &str,
    text: &str,
    env: &HashMap<String, String>,
    default_user: &Option<String>,
) -> Result<Target, DsnError> {
    Ok(Target {
        name: name.to_string(),
        dsn: Dsn::parse(text)?.with_env_defaults(env)?,
        default_user: default_user.clone(),
    })
}

/// Files lockjam reads (configuration, DSN and credential files) are at
/// most this large.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads a regular file of at most [`MAX_FILE_BYTES`]: a FIFO would hang
/// and a device such as /dev/zero would never end.
pub(crate) fn read_small_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| {
        format!(
            "cannot read {}: {e}; check the path and that lockjam may read it",
            path.display()
        )
    };
    let metadata = std::fs::metadata(path).map_err(cannot)?;
    if !metadata.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("{} is larger than {MAX_FILE_BYTES} bytes", path.display()));
    }
    Ok(text)
}

/// The 1-based line and column of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn read_secret(path: &Path) -> Result<String, String> {
    let text = read_small_file(path)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(text.to_string())
}

/// The longest duration lockjam accepts: PostgreSQL's longest timeout
/// (`statement_timeout` and friends are `int` milliseconds), about 24.8
/// days. Anything longer could not be sent, or would overflow a clock.
pub const MAX_DURATION: Duration = Duration::from_millis(i32::MAX as u64);

/// Like [`parse_duration`], but zero (`0s`, `0ms`, `0 s`) is allowed.
fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration ({e}); write it like 0s, 250ms, 5s or 1m"))?;
    if duration > MAX_DURATION {
        return Err(format!(
            "`{text}` is too long: at most 24d 20h 31m 23s 647ms (PostgreSQL's longest timeout)"
        ));
    }
    if !duration.is_zero() && duration < Duration::from_millis(1) {
        return Err(format!(
            "`{text}` is shorter than 1ms, the finest step PostgreSQL's timeouts take"
        ));
    }
    Ok(duration)
}

/// Parses a human duration such as `250ms`, `5s` or `1m 30s`, from 1ms to
/// [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration_or_zero(text)
        .map_err(|message| message.replace("write it like 0s, 250ms", "write it like 250ms"))?;
    if duration.is_zero() {
        return Err(format!("`{text}` must be longer than zero"));
    }
    Ok(duration)
}

/// Checks a configuration file's text before the config crate reads it:
/// a syntax error is told by position (the parser's own message quotes
/// the line, which may hold a DSN's password), and types are checked
/// strictly on the file as written (the config crate would coerce `1.5`
/// or `true` into a count and `"false"` or `0` into a boolean).
fn check_file_text(text: &str, origin: &str) -> Result<(), ConfigError> {
    if let Err(error) = toml::from_str::<toml::Table>(text) {
        let (line, column) = error.span().map_or((0, 0), |span| line_and_column(text, span.start));
        return Err(ConfigError::Syntax {
            origin: origin.to_string(),
            line,
            column,
            message: error.message().trim().to_string(),
        });
    }
    let strict = toml::Deserializer::parse(text).ok();
    if let Some(Err(error)) = strict.map(serde_path_to_error::deserialize::<_, RawConfig>) {
        return Err(ConfigError::Invalid {
            origin: origin.to_string(),
            key: match error.path().to_string().as_str() {
                "." => "(top level)".to_string(),
                path => path.to_string(),
            },
            message: without_quoted_text(error.inner().message()),
        });
    }
    Ok(())
}

/// Environment values are strings; the config crate would read `1.5` or
/// `true` as a count and `yes` or `0` as a boolean. A `LOCKJAM__` variable
/// for a count must hold a whole number, one for a switch `true` or
/// `false`, as the file would.
fn check_environment_types(env: &HashMap<String, String>, origin: &str) -> Result<(), ConfigError> {
    #[derive(Serialize)]
    struct Sections {
        server: RawServer,
        sampler: RawSampler,
        log: RawLog,
        policy: RawPolicy,
    }
    let Ok(toml::Value::Table(defaults)) = toml::Value::try_from(Sections {
        server: RawServer::default(),
        sampler: RawSampler::default(),
        log: RawLog::default(),
        policy: RawPolicy {
            dry_run: Some(true),
            ..RawPolicy::default()
        },
    }) else {
        return Ok(());
    };
    let mut names: Vec<&String> = env.keys().filter(|name| name.starts_with("LOCKJAM__")).collect();
    names.sort();
    for name in names {
        let value = env[name].trim();
        let mut path = name["LOCKJAM__".len()..].split("__").map(str::to_ascii_lowercase);
        let (Some(section), Some(key), None) = (path.next(), path.next(), path.next()) else {
            continue;
        };
        let refused = match defaults.get(&section).and_then(|s| s.get(&key)) {
            Some(toml::Value::Integer(_)) if value.parse::<u64>().is_err() => "a whole number, 0 or more",
            Some(toml::Value::Boolean(_)) if value != "true" && value != "false" => "`true` or `false`",
            _ => continue,
        };
        return Err(ConfigError::Invalid {
            origin: origin.to_string(),
            key: format!("{section}.{key}"),
            // The value is not shown: whatever was put here by mistake
            // might be a secret.
            message: format!("{name} must be {refused}"),
        });
    }
    Ok(())
}

/// A deserializer's message without the text it quotes: `invalid type:
/// string "…", expected usize` may quote a secret put under the wrong key.
fn without_quoted_text(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find("string \"") {
        out.push_str(&rest[..start]);
        out.push_str("a string");
        let quoted = &rest[start + "string \"".len()..];
        rest = match quoted.find("\", ") {
            Some(end) => &quoted[end + 1..],
            None => match quoted.rfind('"') {
                Some(end) => &quoted[end + 1..],
                None => "",
            },
        };
    }
    out.push_str(rest);
    for unsigned in ["usize", "u64", "u32", "u16", "u8"] {
        out = out.replace(&format!("expected {unsigned}"), "expected a whole number, 0 or more");
    }
    out
}

/// The effective configuration as TOML, secrets redacted, for
/// `lockjam check-config`.
pub fn render_effective(config: &Config) -> String {
    #[derive(Serialize)]
    struct View<'a> {
        server: RawServer,
        sampler: RawSampler,
        log: RawLog,
        policy: RawPolicy,
        targets: Vec<TargetView<'a>>,
    }
    #[derive(Serialize)]
    struct TargetView<'a> {
        name: &'a str,
        dsn: String,
    }
    let human = |d: Duration| humantime::format_duration(d).to_string();
    let view = View {
        server: raw_server(&config.server),
        sampler: RawSampler {
            interval: human(config.sampler.interval),
            fast_interval: human(config.sampler.fast_interval),
            statement_timeout: human(config.sessions.statement_timeout),
            lock_timeout: human(config.sessions.lock_timeout),
            connect_timeout: human(config.sessions.connect_timeout),
            max_relations: config.sampler.max_relations,
            database_session_idle: human(config.sampler.database_session_idle),
        },
        log: RawLog {
            format: config.log.format.as_str().to_string(),
            level: config.log.level.clone(),
        },
        policy: raw_policy(&config.policy),
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

/// The server section back in its configuration form: file names, never
/// the secrets in them.
fn raw_server(server: &ServerConfig) -> RawServer {
    let path = |p: &Path| p.display().to_string();
    RawServer {
        listen: server.listen.to_string(),
        tls_cert_file: server.tls.as_ref().map(|t| path(&t.cert_file)).unwrap_or_default(),
        tls_key_file: server.tls.as_ref().map(|t| path(&t.key_file)).unwrap_or_default(),
        basic_auth_user: server.auth.basic.as_ref().map(|b| b.user.clone()).unwrap_or_default(),
        basic_auth_password_file: server
            .auth
            .basic
            .as_ref()
            .map(|b| path(&b.password.file))
            .unwrap_or_default(),
        bearer_token_file: server
            .auth
            .bearer_token
            .as_ref()
            .map(|t| path(&t.file))
            .unwrap_or_default(),
        header_timeout: humantime::format_duration(server.limits.header_timeout).to_string(),
        max_connections: server.limits.max_connections,
    }
}

/// The policy back in its configuration form, for display.
fn raw_policy(policy: &Policy) -> RawPolicy {
    let human = |d: Duration| humantime::format_duration(d).to_string();
    let patterns = |globs: &[Glob]| globs.iter().map(|g| g.0.clone()).collect();
    RawPolicy {
        enabled: policy.enabled,
        dry_run: Some(policy.dry_run),
        max_actions_per_minute: policy.max_actions_per_minute,
        protect_users: patterns(&policy.protect.users),
        protect_applications: patterns(&policy.protect.applications),
        protect_databases: patterns(&policy.protect.databases),
        rules: policy
            .rules
            .iter()
            .map(|rule| RawRule {
                name: rule.name.clone(),
                waiter_modes: rule.waiter_modes.clone(),
                waiter_locktypes: rule.waiter_locktypes.clone(),
                relations: patterns(&rule.relations),
                databases: patterns(&rule.databases),
                waiter_applications: patterns(&rule.waiter_applications),
                min_wait: if rule.min_wait.is_zero() {
                    "0s".into()
                } else {
                    human(rule.min_wait)
                },
                min_queue: rule.min_queue,
                action: rule.action.as_str().into(),
                terminate_after: rule.terminate_after.map_or("0s".into(), human),
                protect_users: patterns(&rule.protect.users),
                protect_applications: patterns(&rule.protect.applications),
                protect_databases: patterns(&rule.protect.databases),
                on_standby: rule.on_standby,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
    fn shipped_example_loads_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/lockjam.toml");
        let shipped = load(&Sources {
            file: Some(path),
            ..Sources::default()
        })
        .unwrap();
        let defaults = load_text(ONE_TARGET, &[]).unwrap();
        assert_eq!(shipped.server, defaults.server);
        assert_eq!(shipped.sampler, defaults.sampler);
        assert_eq!(shipped.log, defaults.log);
        assert_eq!(shipped.targets.len(), 1);
        assert_eq!(defaults.policy, Policy::default());
        assert_eq!(
            shipped.policy,
            Policy {
                rules: vec![Rule::unblock_migrations(Duration::from_secs(5))],
                ..Policy::default()
            },
            "the shipped example rule spells out every rule default"
        );
        assert_eq!(defaults.sampler, SamplerConfig::default());
        assert_eq!(
            defaults.sampler,
            SamplerConfig {
                interval: Duration::from_secs(1),
                fast_interval: Duration::from_millis(250),
                max_relations: 20,
                database_session_idle: Duration::from_secs(60),
            }
        );
        assert_eq!(defaults.sessions, SessionSettings::default());
        assert_eq!(
            defaults.sessions,
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
                "policy.rules[0].action: `kill` is not an action",
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
        for zero in ["0s", "0ms", "0 s", "00s", " 0s "] {
            assert_eq!(parse_duration_or_zero(zero), Ok(Duration::ZERO), "{zero:?}");
        }
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
        assert_eq!(config.policy.protect.applications, vec![Glob("pg_dump*".into())]);
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
        assert_eq!(rules[0].protect.applications, vec![Glob("pg_dump*".into())]);
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
        assert_eq!(config.policy.protect.users, vec![Glob("backup".into())]);
        assert_eq!(config.policy.protect.databases, vec![Glob("billing".into())]);
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
            if let Err(message) = parse_duration(&text) {
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
