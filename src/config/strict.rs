//! What the config crate would let through: it shows a syntax error with
//! the line (which may hold a password), and it coerces types (`1.5` or
//! `true` into a count, `"false"` or `0` into a switch). The file is read
//! strictly first, and the environment's counts and switches checked.

use std::collections::HashMap;

use serde::Serialize;

use super::{ConfigError, IncidentsConfig, LogConfig, SamplerConfig, ServerConfig, Settings, ShardingConfig};
use crate::policy::Policy;

/// Checks a configuration file's text before the config crate reads it:
/// a syntax error is told by position, and the file as written must
/// deserialize into the typed sections.
pub(super) fn check_file_text(text: &str, origin: &str) -> Result<(), ConfigError> {
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
    if let Some(Err(error)) = strict.map(serde_path_to_error::deserialize::<_, Settings>) {
        return Err(ConfigError::Invalid {
            origin: origin.to_string(),
            key: key_path(error.path()),
            message: without_quoted_text(error.inner().message()),
        });
    }
    Ok(())
}

/// A key as the errors name it: `policy.rules[0].min_wait`.
pub(super) fn key_path(path: &serde_path_to_error::Path) -> String {
    match path.to_string().as_str() {
        "." => "(top level)".to_string(),
        path => path.to_string(),
    }
}

/// The 1-based line and column of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Environment values are strings; the config crate would read `1.5` or
/// `true` as a count and `yes` or `0` as a boolean. A `LOCKJAM__` variable
/// for a count must hold a whole number, one for a switch `true` or
/// `false`, as the file would. Which keys are which is read off the
/// defaults, serialized.
pub(super) fn check_environment_types(env: &HashMap<String, String>, origin: &str) -> Result<(), ConfigError> {
    #[derive(Serialize, Default)]
    struct Sections {
        server: ServerConfig,
        sampler: SamplerConfig,
        log: LogConfig,
        policy: Policy,
        incidents: IncidentsConfig,
        sharding: ShardingConfig,
    }
    let Ok(toml::Value::Table(defaults)) = toml::Value::try_from(Sections::default()) else {
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
pub(super) fn without_quoted_text(message: &str) -> String {
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
