//! `lockjam preflight` and `/api/v1/preflight`: may a migration ask for
//! `mode` on these relations now, without starting a lock queue? One
//! read-only look (`resolve.sql`, `locks.sql`, `old.sql`) on a session of
//! the relations' database, opened as the sampler's are (read-only,
//! `lock_timeout` and `statement_timeout` pinned): the sessions holding a
//! conflicting lock, those already waiting, how many use the relation, and
//! (when asked) transactions open longer than a limit, which may take such
//! a lock at any moment. Only `pg_monitor` is needed.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio_postgres::Client;

use crate::analysis::{is_lock_mode, modes_conflict};
use crate::config::{SessionSettings, Target};
use crate::connect::{error_chain, ConnectError, Connector};
use crate::view::{seconds, SessionView};

const RESOLVE_SQL: &str = include_str!("resolve.sql");
const LOCKS_SQL: &str = include_str!("locks.sql");
const OLD_SQL: &str = include_str!("old.sql");
const DESCENDANTS_SQL: &str = include_str!("descendants.sql");

/// Relations one question may name: each may need a session of its own
/// database, and HTTP callers wait for their turn behind it.
pub const MAX_RELATIONS: usize = 100;

/// What a migration will ask for, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// As written: `orders`, `public.orders`, `"Sales"."Order Lines"`, or
    /// with the database first (`shop.public.orders`).
    pub relations: Vec<String>,
    /// The database to resolve names without one in; the target's own
    /// when `None`.
    pub database: Option<String>,
    /// One of PostgreSQL's eight lock modes (`AccessExclusiveLock`).
    pub mode: String,
    /// Open transactions older than this block too.
    pub max_transaction_age: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// A usage error: exit 2, HTTP 400.
    #[error("{0}")]
    Usage(String),
    /// A relation that does not exist, or is ambiguous: exit 2, HTTP 400.
    #[error("{0}")]
    Relation(String),
    /// The database could not be reached or read: exit 2, HTTP 503.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Query(String),
}

/// The answer: clear, or what stands in the way.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Answer {
    pub clear: bool,
    /// RFC 3339, the server's clock.
    pub checked_at: String,
    pub mode: String,
    pub relations: Vec<RelationAnswer>,
    /// Transactions older than `max_transaction_age` in the relations'
    /// databases, oldest first (at most 50 a database); empty unless asked.
    pub old_transactions: Vec<SessionView>,
    pub max_transaction_age_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RelationAnswer {
    pub database: String,
    /// Schema-qualified, as in metric labels.
    pub relation: String,
    /// Sessions holding a lock that conflicts with `mode`: the migration
    /// would wait for each.
    pub conflicting: Vec<Holder>,
    /// Sessions already waiting for a lock on it that conflicts with
    /// `mode`: the migration would queue behind them.
    pub waiting: Vec<Holder>,
    /// Sessions holding any lock on it now: about how many queries would
    /// queue behind the migration while it waits.
    pub sessions_using: u64,
}

/// A session and its lock on the relation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Holder {
    #[serde(flatten)]
    pub session: SessionView,
    pub mode: String,
    /// How long it has waited, for a waiting session (PostgreSQL 14+).
    pub wait_seconds: Option<f64>,
    /// The partition (or inheritance child) its lock is on, when not the
    /// named relation itself: the migration must lock it too.
    pub via: Option<String>,
    /// For a prepared transaction (pid 0, no session to signal): its
    /// global identifier, for `COMMIT PREPARED` or `ROLLBACK PREPARED`.
    /// Its owner, database and prepare time stand in `usename`, `datname`
    /// and `xact_start`.
    pub prepared_gid: Option<String>,
}

/// A relation named by the user: its database, schema and name, each as
/// stored (quotes removed, unquoted parts folded to lower case).
#[derive(Debug, Clone, PartialEq)]
struct Named {
    written: String,
    database: Option<String>,
    schema: Option<String>,
    name: String,
}

/// Splits `name` on the dots outside double quotes: `orders`,
/// `public.orders`, `shop.public.orders`, `"a.b"."c"`.
fn parse_name(name: &str) -> Result<Named, PreflightError> {
    let mut parts = vec![String::new()];
    let mut quoted = false;
    let mut chars = name.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                parts.last_mut().expect("one part").push_str("\"\"");
            }
            '"' => {
                quoted = !quoted;
                parts.last_mut().expect("one part").push('"');
            }
            '.' if !quoted => parts.push(String::new()),
            c => parts.last_mut().expect("one part").push(c),
        }
    }
    let bad = || {
        PreflightError::Usage(format!(
            "--relation {name:?}: write a relation as table, schema.table or database.schema.table"
        ))
    };
    if quoted || parts.iter().any(|p| p.is_empty() || p == "\"\"") || parts.len() > 3 {
        return Err(bad());
    }
    // PostgreSQL folds only A-Z in an unquoted name (in a UTF-8
    // database), and truncates names at 63 bytes.
    let unquote = |part: &str| -> String {
        let mut stored = match part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
            Some(inner) => inner.replace("\"\"", "\""),
            None => part.to_ascii_lowercase(),
        };
        while stored.len() > 63 {
            stored.pop();
        }
        stored
    };
    let written = name.to_string();
    Ok(match parts.as_slice() {
        [table] => Named {
            written,
            database: None,
            schema: None,
            name: unquote(table),
        },
        [schema, table] => Named {
            written,
            database: None,
            schema: Some(unquote(schema)),
            name: unquote(table),
        },
        [database, schema, table] => Named {
            written,
            database: Some(unquote(database)),
            schema: Some(unquote(schema)),
            name: unquote(table),
        },
        _ => return Err(bad()),
    })
}

/// The question's relations by the database they are resolved in (their
/// own, else `--database`, else the target's: `None`), in order.
type ByDatabase = Vec<(Option<String>, Vec<Named>)>;

fn by_database(question: &Question) -> Result<ByDatabase, PreflightError> {
    let mut by_database: ByDatabase = Vec::new();
    for relation in &question.relations {
        let named = parse_name(relation)?;
        let database = named.database.clone().or_else(|| question.database.clone());
        match by_database.iter_mut().find(|(d, _)| *d == database) {
            Some((_, names)) => names.push(named),
            None => by_database.push((database, vec![named])),
        }
    }
    Ok(by_database)
}

/// Checks a question's arguments before any session opens.
pub fn check(question: &Question) -> Result<(), PreflightError> {
    if question.relations.is_empty() {
        return Err(PreflightError::Usage(
            "name at least one relation the migration locks (--relation public.orders)".into(),
        ));
    }
    if question.relations.len() > MAX_RELATIONS {
        return Err(PreflightError::Usage(format!(
            "{} relations named; ask about at most {MAX_RELATIONS} at once (a migration's own tables)",
            question.relations.len()
        )));
    }
    if !is_lock_mode(&question.mode) {
        return Err(PreflightError::Usage(format!(
            "--mode {:?} is not a lock mode: one of AccessShareLock, RowShareLock, RowExclusiveLock, \
             ShareUpdateExclusiveLock, ShareLock, ShareRowExclusiveLock, ExclusiveLock, AccessExclusiveLock",
            question.mode
        )));
    }
    for relation in &question.relations {
        parse_name(relation)?;
    }
    Ok(())
}

/// Asks a target: one session per database named, closed afterwards.
pub struct Preflight {
    connector: Connector,
    target: String,
    connect_timeout: Duration,
    statement_timeout: Duration,
    /// One question at a time per target: HTTP callers queue here rather
    /// than open sessions side by side.
    busy: tokio::sync::Mutex<()>,
}

impl Preflight {
    pub fn new(target: &Target, settings: SessionSettings) -> Result<Preflight, ConnectError> {
        Ok(Preflight {
            connector: Connector::new(target, settings)?,
            target: target.name.clone(),
            connect_timeout: settings.connect_timeout,
            statement_timeout: settings.statement_timeout,
            busy: tokio::sync::Mutex::new(()),
        })
    }

    /// Bounds one answer on lockjam's side: per database asked, a connect
    /// and seven statements (the session's setup, version, database,
    /// partitions, locks, clock, old transactions), and one statement per
    /// relation, each bounded by the server's `statement_timeout`.
    fn deadline(&self, databases: usize, relations: usize) -> Duration {
        let count = |n: usize| u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        (self.connect_timeout + self.statement_timeout * 7)
            .saturating_mul(count(databases))
            .saturating_add(self.statement_timeout.saturating_mul(count(relations)))
    }

    pub async fn ask(&self, question: &Question) -> Result<Answer, PreflightError> {
        check(question)?;
        let by_database = by_database(question)?;
        let deadline = self.deadline(by_database.len(), question.relations.len());
        // Waiting for the turn counts against the deadline too, so that
        // callers piling up behind a stalled server are answered in time.
        let asked = async {
            let _turn = self.busy.lock().await;
            self.look(question, by_database).await
        };
        match tokio::time::timeout(deadline, asked).await {
            Ok(answer) => answer,
            Err(_) => Err(PreflightError::Query(format!(
                "target `{}`: no answer within {:.1}s",
                self.target,
                deadline.as_secs_f64()
            ))),
        }
    }

    async fn look(&self, question: &Question, by_database: ByDatabase) -> Result<Answer, PreflightError> {
        let mut answer = Answer {
            clear: true,
            checked_at: String::new(),
            mode: question.mode.clone(),
            relations: Vec::new(),
            old_transactions: Vec::new(),
            max_transaction_age_seconds: question.max_transaction_age.map(seconds),
        };
        for (database, names) in by_database {
            let client = self.connector.connect(database.as_deref()).await?;
            self.look_in(&client, &names, question, &mut answer).await?;
        }
        answer.clear = answer
            .relations
            .iter()
            .all(|r| r.conflicting.is_empty() && r.waiting.is_empty())
            && answer.old_transactions.is_empty();
        Ok(answer)
    }

    async fn look_in(
        &self,
        client: &Client,
        names: &[Named],
        question: &Question,
        answer: &mut Answer,
    ) -> Result<(), PreflightError> {
        let failed = |what: &str, e: tokio_postgres::Error| {
            PreflightError::Query(format!("target `{}`: {what}: {}", self.target, error_chain(&e)))
        };
        let version: i32 = client
            .query_one(
                "SELECT pg_catalog.current_setting('server_version_num')::pg_catalog.int4",
                &[],
            )
            .await
            .map_err(|e| failed("reading the server version", e))?
            .get(0);
        let database: String = client
            .query_one("SELECT pg_catalog.current_database()::pg_catalog.text", &[])
            .await
            .map_err(|e| failed("reading the database", e))?
            .get(0);
        let mut oids = Vec::new();
        for named in names {
            let rows = client
                .query(RESOLVE_SQL, &[&named.schema, &named.name])
                .await
                .map_err(|e| failed("resolving a relation", e))?;
            match rows.as_slice() {
                [row] => {
                    let label = format!("{}.{}", row.get::<_, String>("schema"), row.get::<_, String>("name"));
                    oids.push((row.get::<_, i64>("oid"), label));
                }
                [] => {
                    return Err(PreflightError::Relation(format!(
                        "relation {:?} does not exist in database {database:?} (name its database: \
                         --database NAME or database.schema.table)",
                        named.written
                    )))
                }
                many => {
                    let candidates: Vec<String> = many
                        .iter()
                        .map(|r| format!("{}.{}", r.get::<_, String>("schema"), r.get::<_, String>("name")))
                        .collect();
                    return Err(PreflightError::Relation(format!(
                        "relation {:?} is ambiguous in database {database:?}: {}; qualify it",
                        named.written,
                        candidates.join(", ")
                    )));
                }
            }
        }
        let wait_start = if version >= 140_000 {
            "l.waitstart"
        } else {
            "NULL::pg_catalog.timestamptz"
        };
        let named_ids: Vec<i64> = oids.iter().map(|(oid, _)| *oid).collect();
        // Each named relation and its partitions: relation -> (named, label).
        let below: HashMap<i64, (i64, String)> = client
            .query(DESCENDANTS_SQL, &[&named_ids])
            .await
            .map_err(|e| failed("reading partitions", e))?
            .iter()
            .map(|row| {
                (
                    row.get::<_, i64>("relation"),
                    (row.get::<_, i64>("named"), row.get("label")),
                )
            })
            .collect();
        let ids: Vec<i64> = below.keys().copied().collect();
        let rows = client
            .query(&LOCKS_SQL.replace("WAITSTART", wait_start), &[&ids])
            .await
            .map_err(|e| failed("reading pg_locks", e))?;
        let now: SystemTime = match rows.first() {
            Some(row) => row.get("now"),
            None => client
                .query_one("SELECT pg_catalog.statement_timestamp()", &[])
                .await
                .map_err(|e| failed("reading the server's clock", e))?
                .get(0),
        };
        answer.checked_at = crate::view::rfc3339(now);
        for (oid, label) in oids {
            let mut relation = RelationAnswer {
                database: database.clone(),
                relation: label,
                conflicting: Vec::new(),
                waiting: Vec::new(),
                sessions_using: 0,
            };
            // A session by its pid; a prepared transaction (pid 0 all) by
            // its gid.
            let mut using = std::collections::BTreeSet::new();
            let of_this = |row: &&tokio_postgres::Row| {
                below
                    .get(&row.get::<_, i64>("relation"))
                    .is_some_and(|(named, _)| *named == oid)
            };
            for row in rows.iter().filter(of_this) {
                let pid: i32 = row.get("pid");
                let mode: String = row.get("mode");
                let session = crate::sampler::session_from_row(row);
                let wait_start: Option<SystemTime> = row.get("wait_start");
                let on: i64 = row.get("relation");
                let prepared_gid: Option<String> = row.get("prepared_gid");
                let known = pid != 0 || prepared_gid.is_some();
                let holder = Holder {
                    session: SessionView::of(pid, known.then_some(&session), now),
                    prepared_gid,
                    wait_seconds: wait_start.map(|w| seconds(now.duration_since(w).unwrap_or_default())),
                    mode: mode.clone(),
                    via: (on != oid).then(|| below[&on].1.clone()),
                };
                if !modes_conflict(&mode, &question.mode) {
                    // Neither a holder nor a waiter of a lock that does not
                    // conflict stands in the way: PostgreSQL grants the
                    // request at once.
                    if row.get::<_, bool>("granted") {
                        using.insert((pid, holder.prepared_gid.clone()));
                    }
                    continue;
                }
                if row.get::<_, bool>("granted") {
                    using.insert((pid, holder.prepared_gid.clone()));
                    relation.conflicting.push(holder);
                } else if !relation.waiting.iter().any(|w| w.session.pid == pid) {
                    relation.waiting.push(holder);
                }
            }
            relation.sessions_using = using.len() as u64;
            answer.relations.push(relation);
        }
        if let Some(age) = question.max_transaction_age {
            let rows = client
                .query(OLD_SQL, &[&age.as_secs_f64()])
                .await
                .map_err(|e| failed("reading old transactions", e))?;
            answer.old_transactions.extend(rows.iter().map(|row| {
                let session = crate::sampler::session_from_row(row);
                SessionView::of(session.pid, Some(&session), now)
            }));
        }
        Ok(())
    }
}

impl PreflightError {
    /// The HTTP status of the error: the caller's (400) or the database's
    /// (503).
    pub fn is_usage(&self) -> bool {
        matches!(self, PreflightError::Usage(_) | PreflightError::Relation(_))
    }
}

/// What ends a prepared transaction that holds a lock.
const PREPARED_CURE: &str = "no session to cancel: end it with COMMIT PREPARED or ROLLBACK PREPARED";

/// The answer as `lockjam preflight` prints it.
pub fn render(answer: &Answer) -> String {
    use std::fmt::Write as _;
    let p = crate::tree::printable;
    let mut out = String::new();
    let who = |s: &SessionView| {
        format!(
            "pid {} {}@{} {}{}",
            s.pid,
            p(s.usename.as_deref().unwrap_or("?")),
            p(s.datname.as_deref().unwrap_or("?")),
            p(s.application_name.as_deref().unwrap_or("")),
            match &s.state {
                Some(state) => format!(" · {}", p(state)),
                None => String::new(),
            }
        )
    };
    let holder = |h: &Holder| match &h.prepared_gid {
        Some(gid) => format!(
            "prepared transaction {} by {}@{} · prepared {} ago, {PREPARED_CURE}",
            sql_literal(gid),
            p(h.session.usename.as_deref().unwrap_or("?")),
            p(h.session.datname.as_deref().unwrap_or("?")),
            age(h.session.transaction_age_seconds),
        ),
        None => format!(
            "{} · transaction {}",
            who(&h.session),
            age(h.session.transaction_age_seconds)
        ),
    };
    let query = |s: &SessionView, out: &mut String| {
        if let Some(q) = &s.query {
            let q = p(q.trim());
            let cut: String = q.chars().take(120).collect();
            let more = if cut.len() < q.len() { "…" } else { "" };
            let _ = writeln!(out, "      {cut}{more}");
        }
    };
    for r in &answer.relations {
        let clear = r.conflicting.is_empty() && r.waiting.is_empty();
        let _ = writeln!(
            out,
            "{} {} in database {}: {} ({} session(s) use it now)",
            p(&answer.mode),
            p(&r.relation),
            p(&r.database),
            if clear { "clear" } else { "NOT CLEAR" },
            r.sessions_using
        );
        for h in &r.conflicting {
            let _ = writeln!(out, "  holds {}{}: {}", p(&h.mode), via(h), holder(h));
            query(&h.session, &mut out);
        }
        for h in &r.waiting {
            let _ = writeln!(
                out,
                "  already waits for {}{}: {}{}",
                p(&h.mode),
                via(h),
                who(&h.session),
                h.wait_seconds.map(|w| format!(" · waited {w:.1}s")).unwrap_or_default()
            );
            query(&h.session, &mut out);
        }
    }
    if let Some(limit) = answer.max_transaction_age_seconds {
        if answer.old_transactions.is_empty() {
            let _ = writeln!(out, "no transaction open longer than {limit}s");
        }
        for s in &answer.old_transactions {
            let _ = writeln!(
                out,
                "  transaction open longer than {limit}s: {} · transaction {}",
                who(s),
                age(s.transaction_age_seconds)
            );
            query(s, &mut out);
        }
    }
    let _ = writeln!(out, "{}", if answer.clear { "clear" } else { "not clear" });
    out
}

fn via(holder: &Holder) -> String {
    holder
        .via
        .as_deref()
        .map(|partition| format!(" on partition {}", crate::tree::printable(partition)))
        .unwrap_or_default()
}

/// `text` as an SQL string literal that names it exactly, to paste after
/// `ROLLBACK PREPARED`, and safe on a terminal: `'...'`, or an escape
/// string (`E'...'`, with `\uXXXX` for each character a terminal must not
/// get raw, all of which are below U+10000) when it holds one.
fn sql_literal(text: &str) -> String {
    use std::fmt::Write as _;
    if !text.chars().any(crate::tree::unprintable) {
        return format!("'{}'", text.replace('\'', "''"));
    }
    let mut out = String::from("E'");
    for c in text.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c if crate::tree::unprintable(c) => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn age(seconds: Option<f64>) -> String {
    seconds.map_or("?".into(), |s| format!("{s:.1}s"))
}

/// What a not-clear answer waits for, in one line: the pids and why.
pub fn waiting_for(answer: &Answer) -> String {
    let mut reasons = Vec::new();
    for r in &answer.relations {
        for h in &r.conflicting {
            let who = match &h.prepared_gid {
                Some(gid) => format!("prepared transaction {}", sql_literal(gid)),
                None => format!("pid {}", h.session.pid),
            };
            reasons.push(format!("{who} holds {} on {}", h.mode, r.relation));
        }
        for h in &r.waiting {
            reasons.push(format!("pid {} waits for {} on {}", h.session.pid, h.mode, r.relation));
        }
    }
    for s in &answer.old_transactions {
        reasons.push(format!(
            "pid {}'s transaction is {}",
            s.pid,
            age(s.transaction_age_seconds)
        ));
    }
    crate::tree::printable(&reasons.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_on_dots_outside_quotes() {
        let parts = |n: Named| (n.database, n.schema, n.name);
        assert_eq!(parts(parse_name("orders").unwrap()), (None, None, "orders".into()));
        assert_eq!(
            parts(parse_name("Public.Orders").unwrap()),
            (None, Some("public".into()), "orders".into())
        );
        assert_eq!(
            parts(parse_name(r#"Shop."Sales"."Order.Lines""#).unwrap()),
            (Some("shop".into()), Some("Sales".into()), "Order.Lines".into())
        );
        assert_eq!(
            parse_name(r#""My ""Quoted"" Table""#).unwrap().name,
            r#"My "Quoted" Table"#
        );
        // Only A-Z fold, as in PostgreSQL; names are cut at 63 bytes.
        assert_eq!(parse_name("Ümlaut").unwrap().name, "Ümlaut");
        assert_eq!(parse_name("ABCÜ").unwrap().name, "abcÜ");
        assert_eq!(parse_name(&"x".repeat(70)).unwrap().name.len(), 63);
        for bad in ["", "a..b", "a.b.c.d", "\"open", "a.", ".a"] {
            assert!(matches!(parse_name(bad), Err(PreflightError::Usage(_))), "{bad:?}");
        }
    }

    #[test]
    fn a_prepared_holder_is_named_by_its_gid_as_a_literal() {
        let session = SessionView {
            pid: 0,
            datname: Some("app".into()),
            usename: Some("payments".into()),
            application_name: None,
            client_addr: None,
            backend_type: Some("prepared transaction".into()),
            state: Some("prepared".into()),
            wait_event_type: None,
            wait_event: None,
            backend_start: None,
            xact_start: None,
            transaction_age_seconds: Some(7200.0),
            query: None,
        };
        let answer = Answer {
            clear: false,
            checked_at: "2026-12-07T00:00:00.000Z".into(),
            mode: "AccessExclusiveLock".into(),
            relations: vec![RelationAnswer {
                database: "app".into(),
                relation: "public.orders".into(),
                conflicting: vec![Holder {
                    session,
                    mode: "RowExclusiveLock".into(),
                    wait_seconds: None,
                    via: None,
                    prepared_gid: Some("pay'42\u{1b}[2J".into()),
                }],
                waiting: Vec::new(),
                sessions_using: 1,
            }],
            old_transactions: Vec::new(),
            max_transaction_age_seconds: None,
        };
        assert_eq!(
            render(&answer),
            "AccessExclusiveLock public.orders in database app: NOT CLEAR (1 session(s) use it now)\n  \
             holds RowExclusiveLock: prepared transaction E'pay''42\\u001B[2J' by payments@app · prepared \
             7200.0s ago, no session to cancel: end it with COMMIT PREPARED or ROLLBACK PREPARED\nnot clear\n"
        );
        assert_eq!(
            waiting_for(&answer),
            "prepared transaction E'pay''42\\u001B[2J' holds RowExclusiveLock on public.orders"
        );
    }

    #[test]
    fn a_gid_is_written_as_the_literal_that_names_it() {
        assert_eq!(sql_literal("pay-42"), "'pay-42'");
        assert_eq!(sql_literal(r"it's C:\x"), r"'it''s C:\x'");
        assert_eq!(sql_literal("a\nb\\c'\u{202e}"), r"E'a\u000Ab\\c''\u202E'");
    }

    #[test]
    fn a_question_needs_a_relation_and_a_lock_mode() {
        let question = |relations: &[&str], mode: &str| Question {
            relations: relations.iter().map(|r| r.to_string()).collect(),
            database: None,
            mode: mode.into(),
            max_transaction_age: None,
        };
        assert!(check(&question(&["public.orders"], "AccessExclusiveLock")).is_ok());
        assert!(check(&question(&[], "AccessExclusiveLock")).is_err());
        let many = vec!["public.orders"; MAX_RELATIONS + 1];
        let bad = check(&question(&many, "AccessExclusiveLock")).unwrap_err();
        assert_eq!(
            bad.to_string(),
            "101 relations named; ask about at most 100 at once (a migration's own tables)"
        );
        assert!(check(&question(&many[1..], "AccessExclusiveLock")).is_ok());
        let bad = check(&question(&["public.orders"], "access exclusive")).unwrap_err();
        assert!(bad.to_string().contains("is not a lock mode"), "{bad}");
    }
}
