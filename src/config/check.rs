//! What serde cannot check key by key: limits, keys that go together or
//! depend on each other, the files keys name, the targets' connection
//! strings, and `--cancel-blockers-after`. Each error names its key.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use super::files::{read_secret, read_small_file};
use super::{
    listen_address, BasicAuth, Config, ConfigError, FileSecret, HttpAuth, IncidentsConfig, LogConfig, SamplerConfig,
    Secret, ServerConfig, Settings, ShardingConfig, Sources, Target, TargetSettings,
};
use crate::analysis::{is_lock_mode, is_lock_type};
use crate::dsn::{Dsn, DsnError};
use crate::duration::show;
use crate::policy::{Policy, Rule, UNBLOCK_MIGRATIONS};

/// The highest `server.max_connections`: beyond it, the file descriptors
/// alone outgrow any sensible `LimitNOFILE`.
const MAX_HTTP_CONNECTIONS: usize = 60_000;

/// A key at fault and why.
type Fault = (String, String);

/// Checks the settings and reads what they name. `dry_run_set`: the
/// `policy.dry_run` the file or environment set, if any.
pub(super) fn check(
    mut settings: Settings,
    dry_run_set: Option<bool>,
    sources: &Sources,
    origin: &str,
) -> Result<Config, ConfigError> {
    let invalid = |(key, message): Fault| ConfigError::Invalid {
        origin: origin.to_string(),
        key,
        message,
    };
    if let Some(text) = &sources.listen {
        settings.server.listen = listen_address::parse(text).map_err(|m| invalid(fault("server.listen", m)))?;
    }
    if !sources.targets_only {
        check_server(&mut settings.server).map_err(invalid)?;
    }
    check_sampler(&settings.sampler).map_err(invalid)?;
    check_log(&settings.log).map_err(invalid)?;
    check_policy(&settings.policy, settings.sampler.interval).map_err(invalid)?;
    let notes = match &sources.cancel_blockers_after {
        Some(text) => apply_flag(text, &mut settings.policy, dry_run_set).map_err(invalid)?,
        None => Vec::new(),
    };
    if settings.policy.enabled && settings.policy.rules.is_empty() {
        return Err(invalid(fault(
            "policy.rules",
            "the policy is enabled but has no [[policy.rules]]; add one, or use --cancel-blockers-after",
        )));
    }
    check_incidents(&mut settings.incidents, sources).map_err(invalid)?;
    let mut targets = check_targets(&settings.targets, sources).map_err(invalid)?;
    let mut notes = notes;
    // A command that reads targets (tree, preflight) and a single --dsn
    // look at what they are told, whichever replica runs them.
    if !sources.targets_only && sources.dsn.is_none() {
        if let Some(note) = shard_targets(&settings.sharding, &mut targets).map_err(invalid)? {
            notes.push(note);
        }
    }
    Ok(Config {
        server: settings.server,
        sampler: settings.sampler,
        targets,
        log: settings.log,
        policy: settings.policy,
        incidents: settings.incidents,
        sharding: settings.sharding,
        notes,
    })
}

/// Keeps the targets this replica watches, when `[sharding]` spreads them
/// over several; says which, in a note.
fn shard_targets(sharding: &ShardingConfig, targets: &mut Vec<Target>) -> Result<Option<String>, Fault> {
    if sharding.replicas == 0 {
        return Err(fault("sharding.replicas", "must be at least 1"));
    }
    if sharding.copies == 0 {
        return Err(fault(
            "sharding.copies",
            "must be at least 1 (2: a standby for each leader)",
        ));
    }
    if sharding.replicas == 1 {
        return Ok(None);
    }
    let ordinal = crate::shard::parse_ordinal(&sharding.ordinal).map_err(|m| fault("sharding.ordinal", m))?;
    if ordinal >= sharding.replicas {
        return Err(fault(
            "sharding.ordinal",
            format!("{ordinal} is not below sharding.replicas ({})", sharding.replicas),
        ));
    }
    let all = targets.len();
    targets.retain(|t| crate::shard::watches(&t.name, sharding.replicas, sharding.copies, ordinal));
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    Ok(Some(format!(
        "sharding: replica {ordinal} of {} watches {} of {all} targets (each target by {} replicas): {}",
        sharding.replicas,
        targets.len(),
        sharding.copies.min(sharding.replicas),
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )))
}

fn fault(key: &str, message: impl Into<String>) -> Fault {
    (key.to_string(), message.into())
}

/// Limits, HTTPS files, and the credentials read from their files into
/// `server.auth`.
fn check_server(server: &mut ServerConfig) -> Result<(), Fault> {
    if !(1..=MAX_HTTP_CONNECTIONS).contains(&server.max_connections) {
        return Err(fault(
            "server.max_connections",
            format!(
                "{} is out of range: give 1 to {MAX_HTTP_CONNECTIONS}, and keep it below the open-file limit \
                 (LimitNOFILE)",
                server.max_connections
            ),
        ));
    }
    check_tls(server)?;
    server.auth = read_auth(server)?;
    Ok(())
}

/// HTTPS: both files or neither, each a small regular file.
fn check_tls(server: &ServerConfig) -> Result<(), Fault> {
    let readable = |key: &str, file: &Path| read_small_file(file).map(drop).map_err(|m| fault(key, m));
    match (&server.tls_cert_file, &server.tls_key_file) {
        (None, None) => Ok(()),
        (Some(cert_file), Some(key_file)) => {
            readable("server.tls_cert_file", cert_file)?;
            readable("server.tls_key_file", key_file)
        }
        (Some(_), None) => Err(fault(
            "server.tls_key_file",
            "set it with tls_cert_file: HTTPS needs both",
        )),
        (None, Some(_)) => Err(fault(
            "server.tls_cert_file",
            "set it with tls_key_file: HTTPS needs both",
        )),
    }
}

/// The credentials `/metrics` and `/api/*` require, read from their files.
fn read_auth(server: &ServerConfig) -> Result<HttpAuth, Fault> {
    let file_secret = |key: &str, file: &Path| {
        read_secret(file)
            .map(|secret| FileSecret {
                file: file.to_path_buf(),
                secret: Secret(secret),
            })
            .map_err(|m| fault(key, m))
    };
    let basic = match (server.basic_auth_user.trim(), &server.basic_auth_password_file) {
        ("", None) => None,
        ("", Some(_)) => {
            return Err(fault(
                "server.basic_auth_user",
                "basic_auth_password_file is set: name the user too",
            ))
        }
        (_, None) => {
            return Err(fault(
                "server.basic_auth_password_file",
                "basic_auth_user is set: name a file that holds the password",
            ))
        }
        (user, Some(file)) if !user.contains(':') => Some(BasicAuth {
            user: user.to_string(),
            password: file_secret("server.basic_auth_password_file", file)?,
        }),
        (_, Some(_)) => return Err(fault("server.basic_auth_user", "may not contain `:`")),
    };
    let bearer_token = server
        .bearer_token_file
        .as_deref()
        .map(|file| file_secret("server.bearer_token_file", file))
        .transpose()?;
    Ok(HttpAuth { basic, bearer_token })
}

fn check_sampler(sampler: &SamplerConfig) -> Result<(), Fault> {
    if let Some(fast) = sampler.fast_interval.filter(|fast| *fast > sampler.interval) {
        return Err(fault(
            "sampler.fast_interval",
            format!(
                "{} is longer than sampler.interval ({}); it is the faster cadence used while locks are waited for, \
                 or \"0s\" for none",
                show(fast),
                show(sampler.interval)
            ),
        ));
    }
    if sampler.max_relations == 0 {
        return Err(fault("sampler.max_relations", "must be at least 1"));
    }
    if sampler.max_databases == 0 {
        return Err(fault("sampler.max_databases", "must be at least 1"));
    }
    Ok(())
}

fn check_log(log: &LogConfig) -> Result<(), Fault> {
    tracing_subscriber::EnvFilter::try_new(&log.level)
        .map(drop)
        .map_err(|e| {
            fault(
                "log.level",
                format!("`{}`: {e} (use error, warn, info, debug or trace)", log.level),
            )
        })
}

/// The `[incidents]` section alone, checked.
pub(super) fn incidents(
    mut incidents: IncidentsConfig,
    sources: &Sources,
    origin: &str,
) -> Result<IncidentsConfig, ConfigError> {
    check_incidents(&mut incidents, sources).map_err(|(key, message)| ConfigError::Invalid {
        origin: origin.to_string(),
        key,
        message,
    })?;
    Ok(incidents)
}

/// Modes are lock modes; a relative path is in the state directory
/// (systemd's `StateDirectory=` sets `STATE_DIRECTORY`, a colon-separated
/// list whose first entry is taken) if there is one.
fn check_incidents(incidents: &mut IncidentsConfig, sources: &Sources) -> Result<(), Fault> {
    for (index, mode) in incidents.modes.iter().enumerate() {
        if !is_lock_mode(mode) {
            return Err(fault(
                &format!("incidents.modes[{index}]"),
                format!(
                    "`{}` is not a lock mode; use one of AccessShareLock, RowShareLock, RowExclusiveLock, \
                     ShareUpdateExclusiveLock, ShareLock, ShareRowExclusiveLock, ExclusiveLock, AccessExclusiveLock",
                    crate::audit::one_line(mode)
                ),
            ));
        }
    }
    if incidents.keep_days == 0 {
        return Err(fault("incidents.keep_days", "must be at least 1"));
    }
    let state_directory = sources
        .env
        .get("STATE_DIRECTORY")
        .and_then(|list| list.split(':').next())
        .filter(|dir| !dir.is_empty());
    if let (Some(path), Some(dir)) = (incidents.path.as_mut(), state_directory) {
        if path.is_relative() {
            *path = Path::new(dir).join(&*path);
        }
    }
    Ok(())
}

fn check_policy(policy: &Policy, interval: Duration) -> Result<(), Fault> {
    if policy.max_actions_per_minute == 0 {
        return Err(fault("policy.max_actions_per_minute", "must be at least 1"));
    }
    let mut names = HashSet::new();
    for (index, rule) in policy.rules.iter().enumerate() {
        let key = |field: &str| format!("policy.rules[{index}].{field}");
        check_rule(rule, interval).map_err(|(field, message)| (key(field), message))?;
        if !names.insert(&rule.name) {
            return Err((key("name"), format!("duplicate rule name `{}`", rule.name)));
        }
    }
    Ok(())
}

/// One rule; on error, the field at fault and why.
fn check_rule(rule: &Rule, interval: Duration) -> Result<(), (&'static str, String)> {
    let name = &rule.name;
    if name.trim().is_empty() {
        return Err(("name", "every rule needs a name (it is the `rule` label)".into()));
    }
    if name != name.trim() || name.chars().any(char::is_control) || name.len() > 64 {
        return Err((
            "name",
            "at most 64 characters, no control characters, no space at either end (it is the `rule` label)".into(),
        ));
    }
    check_waiter_kinds(rule)?;
    for (field, globs) in [
        ("relations", &rule.relations),
        ("databases", &rule.databases),
        ("waiter_applications", &rule.waiter_applications),
    ] {
        if globs.is_empty() {
            return Err((field, "an empty list matches nothing; use [\"*\"] for all".into()));
        }
    }
    match rule.terminate_after {
        Some(after) if after < interval => Err((
            "terminate_after",
            format!(
                "{} is shorter than sampler.interval ({}): lockjam could not see whether the cancel worked; use at \
                 least the interval, or \"0s\" to never terminate",
                show(after),
                show(interval)
            ),
        )),
        _ => Ok(()),
    }
}

/// One list of the waits a rule is about: its key, its names, which names
/// PostgreSQL knows, and what a known one looks like.
type WaiterKind<'a> = (&'static str, &'a [String], fn(&str) -> bool, &'static str);

/// The waits a rule is about: lock modes and lock types PostgreSQL has.
fn check_waiter_kinds(rule: &Rule) -> Result<(), (&'static str, String)> {
    let kinds: [WaiterKind; 2] = [
        (
            "waiter_modes",
            &rule.waiter_modes,
            is_lock_mode,
            "a PostgreSQL lock mode such as AccessExclusiveLock or ShareRowExclusiveLock",
        ),
        (
            "waiter_locktypes",
            &rule.waiter_locktypes,
            is_lock_type,
            "a pg_locks.locktype such as relation, tuple or transactionid",
        ),
    ];
    for (field, names, known, example) in kinds {
        if names.is_empty() {
            return Err((field, "an empty list matches no waiter".into()));
        }
        if let Some(name) = names.iter().find(|name| !known(name)) {
            return Err((field, format!("`{name}` is not {example}")));
        }
    }
    Ok(())
}

/// `--cancel-blockers-after`: turns the policy on (acting unless the
/// configuration set `dry_run`), and sets `min_wait` of rule
/// `unblock-migrations`, or adds that rule when there are none. Returns the
/// notes that say what it did.
fn apply_flag(text: &str, policy: &mut Policy, dry_run_set: Option<bool>) -> Result<Vec<String>, Fault> {
    let min_wait = crate::duration::parse(text).map_err(|m| fault("--cancel-blockers-after", m))?;
    let shown = show(min_wait);
    let has_rules = !policy.rules.is_empty();
    let mut notes = Vec::new();
    match policy.rules.iter_mut().find(|rule| rule.name == UNBLOCK_MIGRATIONS) {
        Some(rule) => {
            rule.min_wait = min_wait;
            notes.push(format!(
                "--cancel-blockers-after {shown} set min_wait of rule `{UNBLOCK_MIGRATIONS}`; its other keys and every other rule are the file's"
            ));
        }
        None if !has_rules => {
            policy.rules.push(Rule::unblock_migrations(min_wait));
            notes.push(format!(
                "--cancel-blockers-after {shown} added rule `{UNBLOCK_MIGRATIONS}` with the default keys; [policy] protections apply to it"
            ));
        }
        None => {
            let names: Vec<&str> = policy.rules.iter().map(|r| r.name.as_str()).collect();
            return Err(fault(
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
    policy.enabled = true;
    policy.dry_run = dry_run_set.unwrap_or(false);
    notes.push(match dry_run_set {
        None => "--cancel-blockers-after turned the policy on with dry_run = false".into(),
        Some(true) => "--cancel-blockers-after turned the policy on; dry_run = true, set in the configuration, \
                       keeps it from signalling: set dry_run = false to act"
            .into(),
        Some(false) => "--cancel-blockers-after turned the policy on; dry_run = false".into(),
    });
    Ok(notes)
}

/// The targets: `--dsn`, else the file's `[[targets]]`, else the libpq
/// environment; each DSN must make a connection configuration.
fn check_targets(settings: &[TargetSettings], sources: &Sources) -> Result<Vec<Target>, Fault> {
    let default_user = sources.env.get("USER").cloned();
    let targets = match &sources.dsn {
        Some(text) => vec![target("default", text, &sources.env, &default_user).map_err(|e| fault("--dsn", e.to_string()))?],
        None if settings.is_empty() => match Dsn::from_env(&sources.env) {
            Ok(Some(dsn)) => vec![Target {
                name: "default".into(),
                dsn,
                default_user: default_user.clone(),
            }],
            Ok(None) => {
                return Err(fault(
                    "targets",
                    "no database to watch: add a [[targets]] table, pass --dsn or LOCKJAM_DSN, or set DATABASE_URL or PGHOST",
                ))
            }
            Err(e) => return Err(fault("environment (DATABASE_URL/PG*)", e.to_string())),
        },
        None => file_targets(settings, sources, &default_user)?,
    };
    for target in &targets {
        target
            .dsn
            .pg_config(target.default_user.as_deref())
            .map_err(|e| fault(&format!("targets.{}", target.name), e.to_string()))?;
    }
    Ok(targets)
}

fn file_targets(
    settings: &[TargetSettings],
    sources: &Sources,
    default_user: &Option<String>,
) -> Result<Vec<Target>, Fault> {
    let mut names = HashSet::new();
    let mut targets = Vec::new();
    for (index, raw) in settings.iter().enumerate() {
        let key = |field: &str| format!("targets[{index}].{field}");
        if raw.name.trim().is_empty() {
            return Err((
                key("name"),
                "every target needs a name (it is the `target` label)".into(),
            ));
        }
        if raw.name.chars().any(char::is_control) || raw.name.len() > 64 {
            return Err((key("name"), "at most 64 characters, no control characters".into()));
        }
        if raw.name == "." || raw.name == ".." {
            return Err((
                key("name"),
                format!(
                    "`{}` cannot name a target: a browser reads its page, /targets/{}, as another path",
                    raw.name, raw.name
                ),
            ));
        }
        if !names.insert(raw.name.clone()) {
            return Err((key("name"), format!("duplicate target name `{}`", raw.name)));
        }
        let text = match (&raw.dsn, &raw.dsn_file) {
            (Some(dsn), None) => dsn.clone(),
            (None, Some(path)) => read_secret(path).map_err(|message| (key("dsn_file"), message))?,
            _ => return Err((key("dsn"), "set exactly one of dsn and dsn_file".into())),
        };
        let field = if raw.dsn.is_some() { "dsn" } else { "dsn_file" };
        targets.push(target(&raw.name, &text, &sources.env, default_user).map_err(|e| (key(field), e.to_string()))?);
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
