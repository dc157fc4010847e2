//! Connection strings: libpq's URL and `key=value` forms, the libpq
//! environment variables as defaults, TLS modes, and redaction.
//!
//! tokio-postgres does not know `sslmode=verify-ca`/`verify-full` or
//! `sslrootcert`, so lockjam reads the string itself and hands tokio-postgres
//! a typed `Config`.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::config::{SslMode, TargetSessionAttrs};

/// The `application_name` of every session lockjam opens. It names them
/// in `pg_stat_activity` for people; lockjam itself knows its sessions by
/// pid, since any session may take this name.
pub(crate) const APPLICATION_NAME: &str = "lockjam";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DsnError {
    #[error("invalid connection URL: {0}")]
    Url(String),
    /// The text at fault is not shown: it may be a piece of a password.
    #[error(
        "invalid connection string at character {0}: expected key=value; quote a value that holds spaces, \
         as in password='two words'"
    )]
    Syntax(usize),
    #[error("unterminated quoted value for `{0}`")]
    Unterminated(String),
    #[error("unknown connection option `{0}`")]
    UnknownKey(String),
    /// An unquoted password with a space splits into the password and a
    /// word taken for a key: that word is not shown.
    #[error(
        "an unknown connection option follows `password`: if the password holds a space, quote it, as in \
         password='two words'"
    )]
    UnknownKeyAfterPassword,
    #[error("environment variable {variable} has invalid value `{value}`: expected {expected}")]
    BadEnv {
        variable: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("connection option `{key}` has invalid value `{value}`: {expected}")]
    BadValue {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("connection option `{0}` is not supported by lockjam")]
    Unsupported(String),
    #[error("no user given: set user in the DSN or PGUSER")]
    NoUser,
}

/// How to use TLS, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    /// TLS when the server offers it, certificate not verified.
    Prefer,
    /// TLS or fail; the certificate is verified against `sslrootcert` only
    /// when one is given (libpq does the same).
    Require,
    /// TLS, certificate chain verified, host name not checked.
    VerifyCa,
    /// TLS, chain and host name verified.
    VerifyFull,
}

impl TlsMode {
    fn parse(value: &str) -> Option<TlsMode> {
        Some(match value {
            "disable" | "allow" => TlsMode::Disable,
            "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            _ => return None,
        })
    }
}

/// What TLS a connection needs, for the connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: TlsMode,
    pub root_cert: Option<PathBuf>,
}

/// libpq options lockjam understands. `application_name` is accepted and
/// replaced: every lockjam session is called `lockjam`.
const KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "connect_timeout",
    "options",
    "sslmode",
    "sslrootcert",
    "application_name",
    "target_session_attrs",
    "keepalives",
    "keepalives_idle",
];

/// libpq options that need support lockjam lacks; named in the error.
const UNSUPPORTED: &[&str] = &["sslcert", "sslkey", "sslpassword", "passfile", "service", "gssencmode"];

/// The libpq environment variables honoured, and the option each sets.
const ENV_DEFAULTS: &[(&str, &str)] = &[
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGUSER", "user"),
    ("PGPASSWORD", "password"),
    ("PGDATABASE", "dbname"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
];

/// A parsed connection string. Debug and Display never show the password.
#[derive(Clone, PartialEq)]
pub struct Dsn {
    params: Vec<(String, String)>,
}

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dsn({})", self.redacted())
    }
}

impl fmt::Display for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Dsn {
    /// Parses a `postgres://` URL or a libpq `key=value` string.
    pub fn parse(text: &str) -> Result<Dsn, DsnError> {
        let text = text.trim();
        let params = if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            parse_url(text)?
        } else {
            parse_key_values(text)?
        };
        for (index, (key, value)) in params.iter().enumerate() {
            if UNSUPPORTED.contains(&key.as_str()) {
                return Err(DsnError::Unsupported(key.clone()));
            }
            if !KEYS.contains(&key.as_str()) {
                let after_password = index > 0 && params[index - 1].0 == "password";
                return Err(if after_password {
                    DsnError::UnknownKeyAfterPassword
                } else {
                    DsnError::UnknownKey(key.clone())
                });
            }
            validate_value(key, value)?;
        }
        Ok(Dsn { params })
    }

    /// A DSN from the libpq environment variables alone (`DATABASE_URL`
    /// first, then `PG*`), or `None` when none is set.
    pub(crate) fn from_env(env: &HashMap<String, String>) -> Result<Option<Dsn>, DsnError> {
        if let Some(url) = env.get("DATABASE_URL").filter(|v| !v.is_empty()) {
            return Dsn::parse(url)?.with_env_defaults(env).map(Some);
        }
        let empty = Dsn { params: Vec::new() }.with_env_defaults(env)?;
        Ok((!empty.params.is_empty()).then_some(empty))
    }

    /// Fills options the string does not set from `PGHOST` and friends, as
    /// libpq does. Every variable lockjam honours is checked like the
    /// string, set or not: a misspelt `PGSSLMODE` is an error, never a
    /// silent `prefer`.
    pub(crate) fn with_env_defaults(mut self, env: &HashMap<String, String>) -> Result<Dsn, DsnError> {
        for (variable, key) in ENV_DEFAULTS {
            let Some(value) = env.get(*variable).filter(|v| !v.is_empty()) else {
                continue;
            };
            if let Err(DsnError::BadValue { expected, .. }) = validate_value(key, value) {
                return Err(DsnError::BadEnv {
                    variable,
                    value: value.clone(),
                    expected,
                });
            }
            if self.get(key).is_none() {
                self.params.push((key.to_string(), value.clone()));
            }
        }
        Ok(self)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The same DSN pointed at another database of the same server.
    pub(crate) fn with_dbname(&self, dbname: &str) -> Dsn {
        let mut params: Vec<_> = self.params.iter().filter(|(k, _)| k != "dbname").cloned().collect();
        params.push(("dbname".into(), dbname.into()));
        Dsn { params }
    }

    /// `key=value` form with the password replaced by `********`.
    pub fn redacted(&self) -> String {
        self.params
            .iter()
            .map(|(key, value)| {
                let shown = if key == "password" { "********" } else { value.as_str() };
                format!("{key}={}", quote(shown))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn tls(&self) -> TlsSettings {
        TlsSettings {
            mode: self.get("sslmode").and_then(TlsMode::parse).unwrap_or(TlsMode::Prefer),
            root_cert: self.get("sslrootcert").map(PathBuf::from),
        }
    }

    /// The tokio-postgres configuration, with lockjam's
    /// [`APPLICATION_NAME`].
    /// `default_user` stands in for libpq's default (the OS user name).
    pub(crate) fn pg_config(&self, default_user: Option<&str>) -> Result<tokio_postgres::Config, DsnError> {
        let mut config = tokio_postgres::Config::new();
        config.application_name(APPLICATION_NAME);
        for (key, value) in &self.params {
            match key.as_str() {
                "host" => value.split(',').for_each(|host| {
                    config.host(host);
                }),
                "hostaddr" => {
                    for addr in value.split(',') {
                        config.hostaddr(addr.parse().map_err(|_| bad(key, value, "an IP address"))?);
                    }
                }
                "port" => {
                    for port in value.split(',') {
                        config.port(port.parse().map_err(|_| bad(key, value, "a port number"))?);
                    }
                }
                "user" => {
                    config.user(value);
                }
                "password" => {
                    config.password(value);
                }
                "dbname" => {
                    config.dbname(value);
                }
                "options" => {
                    config.options(value);
                }
                "connect_timeout" => {
                    let seconds: u64 = value.parse().map_err(|_| bad(key, value, "whole seconds"))?;
                    if seconds > 0 {
                        config.connect_timeout(Duration::from_secs(seconds.max(2)));
                    }
                }
                "keepalives" => {
                    config.keepalives(value != "0");
                }
                "keepalives_idle" => {
                    let seconds: u64 = value.parse().map_err(|_| bad(key, value, "whole seconds"))?;
                    config.keepalives_idle(Duration::from_secs(seconds));
                }
                "target_session_attrs" => {
                    config.target_session_attrs(match value.as_str() {
                        "read-write" => TargetSessionAttrs::ReadWrite,
                        _ => TargetSessionAttrs::Any,
                    });
                }
                _ => {}
            }
        }
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            // libpq's default is the local socket directory.
            if std::path::Path::new("/var/run/postgresql").is_dir() {
                config.host("/var/run/postgresql");
            } else {
                config.host("localhost");
            }
        }
        if config.get_user().is_none() {
            config.user(default_user.ok_or(DsnError::NoUser)?);
        }
        config.ssl_mode(match self.tls().mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        });
        Ok(config)
    }
}

fn bad(key: &str, value: &str, expected: &'static str) -> DsnError {
    DsnError::BadValue {
        key: key.into(),
        value: if key == "password" {
            "********".into()
        } else {
            value.into()
        },
        expected,
    }
}

fn validate_value(key: &str, value: &str) -> Result<(), DsnError> {
    match key {
        "sslmode" if TlsMode::parse(value).is_none() => Err(bad(
            key,
            value,
            "one of disable, allow, prefer, require, verify-ca, verify-full",
        )),
        "port" if value.split(',').any(|p| p.parse::<u16>().is_err()) => Err(bad(key, value, "a port number")),
        "connect_timeout" | "keepalives_idle" if value.parse::<u64>().is_err() => Err(bad(key, value, "whole seconds")),
        "target_session_attrs" if !matches!(value, "any" | "read-write") => Err(bad(key, value, "any or read-write")),
        _ => Ok(()),
    }
}

fn quote(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\']) {
        return value.to_string();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn parse_url(text: &str) -> Result<Vec<(String, String)>, DsnError> {
    let url = url::Url::parse(text).map_err(|e| {
        DsnError::Url(format!(
            "{e} (several hosts need the key=value form: host=a,b port=5432,5432)"
        ))
    })?;
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let mut params = Vec::new();
    if let Some(host) = url.host_str().filter(|h| !h.is_empty()) {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        params.push(("host".into(), host.to_string()));
    }
    if let Some(port) = url.port() {
        params.push(("port".into(), port.to_string()));
    }
    if !url.username().is_empty() {
        params.push(("user".into(), decode(url.username())));
    }
    if let Some(password) = url.password() {
        params.push(("password".into(), decode(password)));
    }
    let dbname = url.path().trim_start_matches('/');
    if !dbname.is_empty() {
        params.push(("dbname".into(), decode(dbname)));
    }
    for (key, value) in url.query_pairs() {
        params.push((key.into_owned(), value.into_owned()));
    }
    Ok(params)
}

/// libpq's `key = value` form: values may be single-quoted, backslash
/// escapes `\'` and `\\`.
fn parse_key_values(text: &str) -> Result<Vec<(String, String)>, DsnError> {
    let chars: Vec<char> = text.chars().collect();
    let mut at = 0;
    let skip_spaces = |at: &mut usize| {
        while chars.get(*at).is_some_and(|c| c.is_whitespace()) {
            *at += 1;
        }
    };
    let mut params = Vec::new();
    loop {
        skip_spaces(&mut at);
        if at >= chars.len() {
            return Ok(params);
        }
        let start = at;
        let mut key = String::new();
        while let Some(&c) = chars.get(at).filter(|c| **c != '=' && !c.is_whitespace()) {
            key.push(c);
            at += 1;
        }
        skip_spaces(&mut at);
        if chars.get(at) != Some(&'=') {
            return Err(DsnError::Syntax(start + 1));
        }
        at += 1;
        skip_spaces(&mut at);
        let mut value = String::new();
        if chars.get(at) == Some(&'\'') {
            at += 1;
            loop {
                match chars.get(at) {
                    None => return Err(DsnError::Unterminated(key)),
                    Some('\'') => break,
                    Some('\\') => {
                        at += 1;
                        value.extend(chars.get(at));
                    }
                    Some(c) => value.push(*c),
                }
                at += 1;
            }
            at += 1;
        } else {
            while let Some(&c) = chars.get(at).filter(|c| !c.is_whitespace()) {
                if c == '\\' {
                    at += 1;
                    value.extend(chars.get(at));
                } else {
                    value.push(c);
                }
                at += 1;
            }
        }
        params.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn key_value_form_with_quotes_and_escapes() {
        assert_eq!(Dsn::parse("host=db oops"), Err(DsnError::Syntax(9)));
        assert_eq!(Dsn::parse("host=db\\").unwrap().get("host"), Some("db"));
        let dsn =
            Dsn::parse(r"host=db.internal port = 6432 user=lockjam password='it\'s a secret' dbname=app").unwrap();
        assert_eq!(dsn.get("port"), Some("6432"));
        assert_eq!(dsn.get("password"), Some("it's a secret"));
        assert_eq!(
            dsn.redacted(),
            "host=db.internal port=6432 user=lockjam password=******** dbname=app"
        );
        assert!(!format!("{dsn:?}").contains("secret"));
    }

    #[test]
    fn url_form_decodes_and_keeps_query_options() {
        let dsn =
            Dsn::parse("postgres://lock%40jam:p%2Fw@[::1]:5433/my%20db?sslmode=verify-full&sslrootcert=/etc/rds.pem")
                .unwrap();
        assert_eq!(dsn.get("user"), Some("lock@jam"));
        assert_eq!(dsn.get("password"), Some("p/w"));
        assert_eq!(dsn.get("host"), Some("::1"));
        assert_eq!(dsn.get("dbname"), Some("my db"));
        assert_eq!(
            dsn.tls(),
            TlsSettings {
                mode: TlsMode::VerifyFull,
                root_cert: Some("/etc/rds.pem".into())
            }
        );
        assert!(!dsn.to_string().contains("p/w"));
    }

    #[test]
    fn errors_name_the_option() {
        assert_eq!(
            Dsn::parse("host=x colour=blue"),
            Err(DsnError::UnknownKey("colour".into()))
        );
        assert_eq!(Dsn::parse("sslcert=/x"), Err(DsnError::Unsupported("sslcert".into())));
        assert_eq!(Dsn::parse("host='x"), Err(DsnError::Unterminated("host".into())));
        assert!(matches!(Dsn::parse("port=big"), Err(DsnError::BadValue { .. })));
        let err = Dsn::parse("postgres://u:hunter2@db/app?sslmode=maybe").unwrap_err();
        assert!(err.to_string().contains("sslmode") && !err.to_string().contains("hunter2"));
        assert!(matches!(Dsn::parse("postgres://a:1,b:2/db"), Err(DsnError::Url(_))));
    }

    #[test]
    fn errors_never_show_a_piece_of_a_password() {
        for text in [
            "host=db user=u password=Sup3r Secret",
            "host=db user=u password=Sup3r Secret=x",
            "host=db password=Sup3r Secret user=u",
        ] {
            let message = Dsn::parse(text).unwrap_err().to_string();
            assert!(
                !message.contains("Secret") && !message.contains("Sup3r"),
                "{text}: {message}"
            );
            assert!(message.contains("password='two words'"), "{message}");
        }
    }

    #[test]
    fn the_libpq_environment_is_checked_like_the_string() {
        for value in ["verify_full", "VERIFY-FULL", "verify-full ", "on"] {
            let err = Dsn::parse("host=db user=u")
                .unwrap()
                .with_env_defaults(&env(&[("PGSSLMODE", value)]))
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "environment variable PGSSLMODE has invalid value `{value}`: expected one of disable, allow, \
                     prefer, require, verify-ca, verify-full"
                )
            );
        }
        // Checked even where the string sets the option itself.
        let err = Dsn::parse("host=db user=u port=5432")
            .unwrap()
            .with_env_defaults(&env(&[("PGPORT", "54x32")]))
            .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("environment variable PGPORT has invalid value `54x32`"));
        assert!(Dsn::from_env(&env(&[("PGHOST", "h"), ("PGCONNECT_TIMEOUT", "soon")])).is_err());
        let ok = Dsn::parse("host=db user=u")
            .unwrap()
            .with_env_defaults(&env(&[("PGSSLMODE", "verify-full")]));
        assert_eq!(ok.unwrap().tls().mode, TlsMode::VerifyFull);
    }

    #[test]
    fn libpq_environment_fills_what_the_dsn_leaves_out() {
        let vars = env(&[("PGHOST", "envhost"), ("PGPASSWORD", "pw"), ("PGUSER", "envuser")]);
        let dsn = Dsn::parse("host=db user=app")
            .unwrap()
            .with_env_defaults(&vars)
            .unwrap();
        assert_eq!(
            (dsn.get("host"), dsn.get("user"), dsn.get("password")),
            (Some("db"), Some("app"), Some("pw"))
        );
        let only_env = Dsn::from_env(&vars).unwrap().unwrap();
        assert_eq!(only_env.get("host"), Some("envhost"));
        let url = Dsn::from_env(&env(&[("DATABASE_URL", "postgres://u@h/d"), ("PGPORT", "7")]))
            .unwrap()
            .unwrap();
        assert_eq!((url.get("host"), url.get("port")), (Some("h"), Some("7")));
        assert_eq!(Dsn::from_env(&env(&[("HOME", "/root")])).unwrap(), None);
    }

    proptest::proptest! {
        /// Any text is parsed or refused with an error, never a panic.
        #[test]
        fn any_text_parses_or_errs(text in ".*") {
            let _ = Dsn::parse(&text);
        }

        /// Whatever the password, no rendering of a DSN shows it.
        #[test]
        fn passwords_never_show(password in "[^\\s'\\\\]{6,20}", host in "[a-z]{1,10}") {
            for text in [
                format!("host={host} user=u password={password}"),
                format!("host={host} user=u password='{password}'"),
            ] {
                let dsn = Dsn::parse(&text).unwrap();
                proptest::prop_assert!(!dsn.redacted().contains(&password));
                let debug = format!("{:?}", dsn);
                proptest::prop_assert!(!debug.contains(&password));
            }
        }

        /// Key=value strings made of keys lockjam knows round-trip through
        /// parsing: every value comes back as written.
        #[test]
        fn key_values_round_trip(values in proptest::collection::vec("[ -~&&[^'\\\\]]{0,12}", 3)) {
            let text = format!("host='{}' user='{}' dbname='{}'", values[0], values[1], values[2]);
            let dsn = Dsn::parse(&text).unwrap();
            proptest::prop_assert_eq!(dsn.get("host"), Some(values[0].as_str()));
            proptest::prop_assert_eq!(dsn.get("user"), Some(values[1].as_str()));
            proptest::prop_assert_eq!(dsn.get("dbname"), Some(values[2].as_str()));
        }
    }

    #[test]
    fn pg_config_sets_lockjam_name_and_tls() {
        let dsn = Dsn::parse("host=a,b port=1,2 user=u application_name=psql sslmode=verify-ca").unwrap();
        let config = dsn.pg_config(None).unwrap();
        assert_eq!(config.get_application_name(), Some(APPLICATION_NAME));
        assert_eq!(config.get_ports(), &[1, 2]);
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        assert_eq!(
            Dsn::parse("host=a").unwrap().pg_config(None).unwrap_err(),
            DsnError::NoUser
        );
        assert_eq!(
            Dsn::parse("host=a").unwrap().pg_config(Some("os")).unwrap().get_user(),
            Some("os")
        );
        assert_eq!(dsn.with_dbname("other").get("dbname"), Some("other"));
    }
}
