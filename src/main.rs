//! The `lockjam` command: `run`, `check-config`, `incidents`, `tree`,
//! `preflight`, `demo`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use lockjam::config::{self, Config, LogFormat, Sources};
use lockjam::demo::{self, DemoOptions};
use lockjam::service::Service;

/// Watches PostgreSQL for lock queues and exports them to Prometheus.
#[derive(Parser)]
#[command(name = "lockjam", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: sample every target, serve /metrics and the API.
    Run(ConfigArgs),
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig(ConfigArgs),
    /// Print the incident history `run` kept ([incidents] path), newest first.
    Incidents(IncidentsArgs),
    /// Sample the targets once and print their lock queues as trees (root
    /// blockers first); needs only pg_monitor and no running lockjam.
    Tree(TreeArgs),
    /// Say whether a migration may take its lock now: exit 0 clear, 1 not
    /// clear (what blocks printed), 2 usage or connection error.
    Preflight(PreflightArgs),
    /// Replay incident 000 on a throwaway local cluster, with lockjam watching.
    Demo(DemoArgs),
}

/// Where a command that only reads targets finds them: `run`'s
/// configuration (its `[server]` files unread) or one DSN.
#[derive(Args)]
struct TargetArgs {
    /// TOML configuration file, for its targets, sampler and policy.
    #[arg(long, env = "LOCKJAM_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Connection string of the server (replaces [[targets]]).
    #[arg(long, env = "LOCKJAM_DSN", value_name = "DSN", hide_env_values = true)]
    dsn: Option<String>,
    /// Only this target of the configuration.
    #[arg(long, value_name = "NAME")]
    target: Option<String>,
}

impl TargetArgs {
    /// The configuration, with only `--target` when it is given; exit 2
    /// for a bad one.
    fn load(&self) -> Result<Config, ExitCode> {
        let sources = Sources {
            file: self.config.clone(),
            dsn: self.dsn.clone(),
            listen: None,
            cancel_blockers_after: None,
            env: std::env::vars().collect::<HashMap<_, _>>(),
            targets_only: true,
        };
        let mut config = config::load(&sources).map_err(|e| fail(&e, EXIT_CONFIG))?;
        if let Some(name) = &self.target {
            config.targets.retain(|t| &t.name == name);
            if config.targets.is_empty() {
                eprintln!("lockjam: error: --target {name}: no target of that name in the configuration");
                return Err(ExitCode::from(EXIT_CONFIG));
            }
        }
        Ok(config)
    }
}

#[derive(Args)]
struct PreflightArgs {
    #[command(flatten)]
    targets: TargetArgs,
    /// A relation the migration locks: table, schema.table or
    /// database.schema.table; repeat for several.
    #[arg(long = "relation", value_name = "NAME", required = true)]
    relations: Vec<String>,
    /// The database of relations named without one [default: the DSN's].
    #[arg(long, value_name = "NAME")]
    database: Option<String>,
    /// The lock the migration asks for.
    #[arg(long, default_value = "AccessExclusiveLock", value_name = "MODE")]
    mode: String,
    /// Also not clear while a transaction in the database is older than this.
    #[arg(long, value_name = "DURATION", value_parser = lockjam::duration::parse)]
    max_transaction_age: Option<Duration>,
    /// Ask again every [sampler] interval until clear, for at most this long.
    #[arg(long, value_name = "DURATION", value_parser = lockjam::duration::parse)]
    wait: Option<Duration>,
    /// Print the answer as JSON (as /api/v1/preflight).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TreeArgs {
    #[command(flatten)]
    targets: TargetArgs,
    /// Sample again every [sampler] interval and redraw, until Ctrl-C.
    #[arg(long)]
    watch: bool,
    /// Print the JSON of /api/v1/snapshot instead of the trees.
    #[arg(long, conflicts_with = "watch")]
    json: bool,
}

#[derive(Args)]
struct IncidentsArgs {
    /// TOML configuration file, for its [incidents] path.
    #[arg(long, env = "LOCKJAM_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The store to read, instead of the configuration's [incidents] path.
    #[arg(long, value_name = "FILE")]
    store: Option<PathBuf>,
    /// Only incidents closed this long ago or since (24h, 90m), or since an
    /// RFC 3339 instant.
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// Only this target's incidents.
    #[arg(long, value_name = "NAME")]
    target: Option<String>,
    /// At most this many, the newest.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Print JSON (as /api/v1/incidents) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, env = "LOCKJAM_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Connection string of the one database to watch (replaces [[targets]]).
    #[arg(long, env = "LOCKJAM_DSN", value_name = "DSN", hide_env_values = true)]
    dsn: Option<String>,
    /// Address to serve HTTP on [default: 127.0.0.1:9863].
    #[arg(long, env = "LOCKJAM_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// Enable the policy with one rule: cancel what blocks an ACCESS
    /// EXCLUSIVE waiter that has waited this long (dry_run off unless the
    /// configuration sets it).
    #[arg(long, value_name = "DURATION")]
    cancel_blockers_after: Option<String>,
}

#[derive(Args)]
struct DemoArgs {
    /// Address lockjam serves on during the demo.
    #[arg(long, default_value = config::DEFAULT_LISTEN, value_name = "ADDR")]
    listen: SocketAddr,
    /// Application queries that queue behind the migration.
    #[arg(long, default_value_t = 30)]
    queries: usize,
    /// How long the incident lasts before the long read is cancelled.
    #[arg(long, default_value = "8s", value_parser = lockjam::duration::parse)]
    hold: Duration,
}

/// Exit status for a bad configuration or usage.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    // Whether --dsn was typed on the command line, where every user of the
    // machine can read it (`ps`, /proc), rather than given in LOCKJAM_DSN.
    let dsn_on_command_line = matches
        .subcommand_matches("run")
        .is_some_and(|run| run.value_source("dsn") == Some(clap::parser::ValueSource::CommandLine));
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if matches!(
        cli.command,
        Command::Tree(_) | Command::Incidents(_) | Command::Preflight(_)
    ) {
        quiet_on_closed_pipe();
    }
    match cli.command {
        Command::CheckConfig(args) => match load(&args) {
            Ok(config) => match lockjam::service::preflight(&config) {
                Ok(()) => {
                    print!("{}", config::render_effective(&config));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e, EXIT_CONFIG),
            },
            Err(code) => code,
        },
        Command::Run(args) => {
            let config = match load(&args) {
                Ok(config) => config,
                Err(code) => return code,
            };
            init_logging(&config);
            if dsn_on_command_line && config.targets.iter().any(|t| t.dsn.get("password").is_some()) {
                tracing::warn!(
                    "the password in --dsn can be read by every user of this machine (ps, /proc): give the \
                     DSN in a file (dsn_file in [[targets]]) or in LOCKJAM_DSN, or the password in PGPASSWORD"
                );
            }
            runtime().block_on(async {
                match Service::start(&config).await {
                    Ok(service) => {
                        // SIGHUP reads the same sources again: the file,
                        // the environment as it was at start, and the flags.
                        service
                            .run(|| config::load(&sources(&args)).map_err(|e| e.to_string()))
                            .await;
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e, if e.is_configuration() { EXIT_CONFIG } else { 1 }),
                }
            })
        }
        Command::Incidents(args) => incidents(&args),
        Command::Tree(args) => tree(&args),
        Command::Preflight(args) => preflight(&args),
        Command::Demo(args) => {
            let options = DemoOptions {
                listen: args.listen,
                queries: args.queries,
                hold: args.hold,
            };
            runtime().block_on(async {
                match demo::run(options).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(demo::DemoError::Interrupted) => ExitCode::from(130),
                    Err(e) => fail(&e, 1),
                }
            })
        }
    }
}

/// `lockjam incidents`: exit 0 with the table (or JSON), 2 for a bad
/// argument or configuration, 1 when the store cannot be read.
fn incidents(args: &IncidentsArgs) -> ExitCode {
    let path = match &args.store {
        Some(path) => path.clone(),
        None => {
            let sources = Sources {
                file: args.config.clone(),
                dsn: None,
                listen: None,
                cancel_blockers_after: None,
                env: std::env::vars().collect::<HashMap<_, _>>(),
                targets_only: false,
            };
            match config::load_incidents(&sources) {
                Ok(incidents) => match incidents.path {
                    Some(path) => path,
                    None => {
                        eprintln!(
                            "lockjam: error: [incidents] path is \"\": lockjam keeps incidents in memory only; ask a \
                             running lockjam (GET /api/v1/incidents) or give --store FILE"
                        );
                        return ExitCode::from(EXIT_CONFIG);
                    }
                },
                Err(e) => return fail(&e, EXIT_CONFIG),
            }
        }
    };
    let since = match args
        .since
        .as_deref()
        .map(|s| lockjam::http::parse_since(s, std::time::SystemTime::now()))
    {
        None => None,
        Some(Ok(since)) => Some(since),
        Some(Err(message)) => {
            eprintln!("lockjam: error: --{message}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let found = lockjam::incidents::store::read_only(&path)
        .and_then(|store| store.list(args.target.as_deref(), since, args.limit.max(1)));
    match found {
        Ok(found) if args.json => {
            println!("{}", serde_json::json!({ "incidents": found }));
            ExitCode::SUCCESS
        }
        Ok(found) => {
            print!("{}", lockjam::incidents::table(&found));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, 1),
    }
}

/// `lockjam preflight`: exit 0 clear, 1 not clear (or still not clear
/// when `--wait` ran out), 2 for a bad argument, an unknown relation or a
/// database that cannot be asked.
fn preflight(args: &PreflightArgs) -> ExitCode {
    let config = match args.targets.load() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let target = match config.targets.as_slice() {
        [target] => target,
        [] => {
            eprintln!("lockjam: error: the configuration has no target");
            return ExitCode::from(EXIT_CONFIG);
        }
        _ => {
            eprintln!("lockjam: error: the configuration has several targets: name one with --target");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let question = lockjam::preflight::Question {
        relations: args.relations.clone(),
        database: args.database.clone(),
        mode: args.mode.clone(),
        max_transaction_age: args.max_transaction_age,
    };
    if let Err(e) = lockjam::preflight::check(&question) {
        return fail(&e, EXIT_CONFIG);
    }
    let asker = match lockjam::preflight::Preflight::new(target, config.sampler.sessions()) {
        Ok(asker) => asker,
        Err(e) => return fail(&e, EXIT_CONFIG),
    };
    let deadline = args.wait.map(|wait| std::time::Instant::now() + wait);
    runtime().block_on(async {
        // Ctrl-C ends it whenever it comes, mid-question too: exit 1, not
        // known to be clear.
        let interrupted = tokio::signal::ctrl_c();
        tokio::pin!(interrupted);
        let mut said = String::new();
        loop {
            let asked = tokio::select! {
                asked = asker.ask(&question) => asked,
                _ = &mut interrupted => return ExitCode::from(1),
            };
            let time_left = deadline.is_some_and(|d| std::time::Instant::now() < d);
            let reasons = match &asked {
                // A name or a mode will not get better by waiting.
                Err(e) if e.is_usage() => return fail(e, EXIT_CONFIG),
                Err(e) if time_left => format!("cannot ask: {}", lockjam::connect::error_chain(e)),
                Err(e) => return fail(e, EXIT_CONFIG),
                Ok(answer) if !answer.clear && time_left => lockjam::preflight::waiting_for(answer),
                Ok(answer) => {
                    if args.json {
                        println!("{}", serde_json::to_string(answer).unwrap_or_default());
                    } else {
                        print!("{}", lockjam::preflight::render(answer));
                    }
                    return if answer.clear {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    };
                }
            };
            if reasons != said {
                eprintln!("waiting: {reasons}");
                said = reasons;
            }
            tokio::select! {
                _ = tokio::time::sleep(config.sampler.interval) => {}
                _ = &mut interrupted => return ExitCode::from(1),
            }
        }
    })
}

/// `lockjam tree`: exit 0 with every target sampled, 1 when one could not
/// be, 2 for a bad argument or configuration.
fn tree(args: &TreeArgs) -> ExitCode {
    let config = match args.targets.load() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let mut samplers = Vec::new();
    for target in &config.targets {
        match lockjam::sampler::Sampler::new(target, &config.sampler) {
            Ok(sampler) => samplers.push((target.name.clone(), sampler)),
            Err(e) => return fail(&e, EXIT_CONFIG),
        }
    }
    // Colours on a terminal only, and not when NO_COLOR is set (no-color.org).
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let no_colour = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let style = lockjam::tree::Style {
        colour: terminal && !no_colour,
    };
    runtime().block_on(async {
        // Ctrl-C ends it whenever it comes, mid-sample too: the handler is
        // made once, so that no signal falls between two waits for it.
        let interrupted = tokio::signal::ctrl_c();
        tokio::pin!(interrupted);
        loop {
            let looking = async {
                let mut looks = Vec::new();
                for (name, sampler) in samplers.iter_mut() {
                    let look = lockjam::service::sample_once(sampler)
                        .await
                        .map_err(|e| lockjam::state::LastSample {
                            last_error: Some(lockjam::connect::error_chain(&e)),
                            ..Default::default()
                        });
                    looks.push((name.clone(), look.unwrap_or_else(|down| down)));
                }
                looks
            };
            let looks = tokio::select! {
                looks = looking => looks,
                _ = &mut interrupted => return if args.watch { ExitCode::SUCCESS } else { ExitCode::from(130) },
            };
            let failed = looks.iter().any(|(_, look)| look.last_error.is_some());
            if args.json {
                let view = lockjam::http::snapshot_of(
                    looks
                        .iter()
                        .map(|(name, look)| (name.as_str(), look.clone(), &config.policy)),
                );
                println!("{view}");
            } else {
                if args.watch && terminal {
                    // Home and clear, then the new picture.
                    print!("\u{1b}[H\u{1b}[2J");
                }
                for (name, look) in &looks {
                    print!("{}", lockjam::tree::render_target(name, look, &config.policy, style));
                }
            }
            if !args.watch {
                return if failed { ExitCode::from(1) } else { ExitCode::SUCCESS };
            }
            tokio::select! {
                _ = tokio::time::sleep(config.sampler.interval) => {}
                _ = &mut interrupted => return ExitCode::SUCCESS,
            }
        }
    })
}

/// `lockjam tree | head` ends quietly when `head` has read enough, as
/// other commands in a pipe do, rather than panicking on the next print:
/// SIGPIPE back to its default for the commands that only print (not for
/// `run`, whose sockets must not end the process, nor `demo`, which must
/// stop its cluster).
fn quiet_on_closed_pipe() {
    // SAFETY: sets a signal disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("lockjam: error: cannot start the async runtime: {e}");
            std::process::exit(1)
        })
}

fn sources(args: &ConfigArgs) -> Sources {
    Sources {
        file: args.config.clone(),
        dsn: args.dsn.clone(),
        listen: args.listen.clone(),
        cancel_blockers_after: args.cancel_blockers_after.clone(),
        env: std::env::vars().collect::<HashMap<_, _>>(),
        targets_only: false,
    }
}

fn load(args: &ConfigArgs) -> Result<Config, ExitCode> {
    config::load(&sources(args)).map_err(|e| fail(&e, EXIT_CONFIG))
}

/// Prints the error and its causes and returns the exit code.
fn fail(error: &dyn std::error::Error, code: u8) -> ExitCode {
    eprintln!("lockjam: error: {}", lockjam::connect::error_chain(error));
    ExitCode::from(code)
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log.level);
    // Colour codes only for a person at a terminal, never into journald or
    // a container log.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || OneLine {
            inner: std::io::stderr(),
            ansi,
        })
        .with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Writes each log record as one line: the formatter writes a record in
/// one call, ending in a newline, and a newline or other control character
/// inside it can only come from a value (a relation or role name, a
/// server's message) that would otherwise forge a second record. Those are
/// escaped; JSON records have none, as JSON escapes them itself.
struct OneLine<W> {
    inner: W,
    /// Whether the formatter's own colour codes (ESC) are expected.
    ansi: bool,
}

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, record: &[u8]) -> std::io::Result<usize> {
        self.inner.write_all(one_line_record(record, self.ansi).as_bytes())?;
        Ok(record.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// One record on one line: control characters other than the final
/// newline, a tab and (with colours on) ESC are written as `\u{..}`.
fn one_line_record(record: &[u8], ansi: bool) -> String {
    let text = String::from_utf8_lossy(record);
    let (body, end) = match text.strip_suffix('\n') {
        Some(body) => (body, "\n"),
        None => (text.as_ref(), ""),
    };
    let mut line = String::with_capacity(body.len() + 1);
    for c in body.chars() {
        let keep = !c.is_control() || c == '\t' || (ansi && c == '\u{1b}');
        if keep && !matches!(c, '\u{2028}' | '\u{2029}') {
            line.push(c);
        } else {
            line.extend(c.escape_unicode());
        }
    }
    line.push_str(end);
    line
}

#[cfg(test)]
mod tests {
    use super::one_line_record;

    #[test]
    fn a_record_stays_one_line() {
        let forged =
            "2026-11-23T10:00:00Z  WARN lockjam::sampler: role `x\n2026-11-23T10:00:01Z ERROR forged\r` may not\n";
        let line = one_line_record(forged.as_bytes(), false);
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.ends_with("may not\n"));
        assert!(
            line.contains("`x\\u{a}2026-11-23T10:00:01Z ERROR forged\\u{d}`"),
            "{line}"
        );
        assert_eq!(
            one_line_record(b"\x1b[32m INFO\x1b[0m ok\n", true),
            "\u{1b}[32m INFO\u{1b}[0m ok\n"
        );
        assert_eq!(one_line_record(b"\x1b[2J\n", false), "\\u{1b}[2J\n");
        assert_eq!(one_line_record(b"tab\tkept\n", false), "tab\tkept\n");
    }
}
