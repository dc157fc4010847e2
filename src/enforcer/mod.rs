//! The enforcer: the only code that signals backends. Per target it keeps
//! one dedicated session that holds a session-level advisory lock while
//! this instance is the leader, and sends each signal through that session
//! with one statement that re-checks everything the decision assumed.

use std::time::{Duration, SystemTime};

use tokio::time::timeout;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

use crate::config::SessionSettings;
use crate::config::Target;
use crate::connect::{error_chain, ConnectError, Connector};
use crate::policy::{Decision, Outcome, Signal};

const SIGNAL_SQL: &str = include_str!("signal.sql");

/// The advisory lock that elects one leader per target: the bytes of
/// "lockjam" as a bigint, in the database of the target's DSN.
pub const LEADER_LOCK_KEY: i64 = 0x006c_6f63_6b6a_616d;

struct LeaderSession {
    client: Client,
    pid: i32,
    signal: Statement,
    leader: bool,
    /// How long `pg_terminate_backend` waits for the backend to exit
    /// (PostgreSQL 14+); `None` before 14.
    terminate_wait: Option<Duration>,
}

pub struct Enforcer {
    target: String,
    connector: Connector,
    settings: SessionSettings,
    session: Option<LeaderSession>,
}

impl Enforcer {
    pub fn new(target: &Target, settings: SessionSettings) -> Result<Enforcer, ConnectError> {
        Ok(Enforcer {
            target: target.name.clone(),
            connector: Connector::new(target, settings)?,
            settings,
            session: None,
        })
    }

    /// The pid of the leader session, while it is open.
    pub fn pid(&self) -> Option<i32> {
        self.session.as_ref().map(|s| s.pid)
    }

    /// Becomes or stays the leader: true while this instance holds the
    /// leader lock. Another instance's lock, or an unreachable database,
    /// makes it false; it is tried again on the next call.
    pub async fn lead(&mut self) -> bool {
        let deadline = self.deadline();
        if self.session.as_ref().is_some_and(|s| s.client.is_closed()) {
            tracing::warn!(target = %self.target, "lost the leader session; this instance no longer enforces");
            self.session = None;
        }
        // A leader is one whose session answers now: a stopped backend or a
        // silent network leaves the client believing it is connected.
        if let Some(session) = self.session.as_ref().filter(|s| s.leader) {
            if !matches!(timeout(deadline, session.client.simple_query("")).await, Ok(Ok(_))) {
                tracing::warn!(
                    target = %self.target,
                    "the leader session did not answer within {deadline:?}; this instance no longer enforces \
                     until it leads again"
                );
                self.session = None;
                return false;
            }
        }
        if self.session.is_none() {
            match timeout(self.settings.connect_timeout + deadline, self.open()).await {
                Ok(Ok(session)) => self.session = Some(session),
                Ok(Err(e)) => {
                    tracing::debug!(target = %self.target, "cannot open the leader session: {e}");
                    return false;
                }
                Err(_) => {
                    tracing::debug!(target = %self.target, "the leader session did not open in time");
                    return false;
                }
            }
        }
        let session = self.session.as_mut().expect("opened above");
        if !session.leader {
            let attempt = session
                .client
                .query_one("SELECT pg_catalog.pg_try_advisory_lock($1)", &[&LEADER_LOCK_KEY]);
            match timeout(deadline, attempt).await {
                Ok(Ok(row)) => {
                    session.leader = row.get(0);
                    if session.leader {
                        tracing::info!(target = %self.target, "this instance is the policy leader");
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(target = %self.target, "leader lock attempt failed: {}", error_chain(&e));
                    self.session = None;
                    return false;
                }
                Err(_) => {
                    tracing::debug!(target = %self.target, "the leader lock attempt did not answer in time");
                    self.session = None;
                    return false;
                }
            }
        }
        session.leader
    }

    /// How long lockjam waits for one statement on the leader session: the
    /// server's statement_timeout cannot fire in a backend that is stopped.
    fn deadline(&self) -> Duration {
        self.settings.statement_timeout * 2
    }

    async fn open(&self) -> Result<LeaderSession, String> {
        let client = self.connector.connect(None).await.map_err(|e| e.to_string())?;
        let row = client
            .query_one(
                "SELECT pg_catalog.current_setting('server_version_num')::pg_catalog.int4, pg_catalog.pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|e| error_chain(&e))?;
        let (version, pid): (i32, i32) = (row.get(0), row.get(1));
        // Waiting for the exit must fit well inside the statement timeout.
        let terminate_wait =
            (version >= 140_000).then(|| (self.settings.statement_timeout / 2).min(Duration::from_secs(1)));
        let terminate = match terminate_wait {
            Some(wait) => format!("pg_catalog.pg_terminate_backend($1, {})", wait.as_millis().max(1)),
            None => "pg_catalog.pg_terminate_backend($1)".to_string(),
        };
        let signal = client
            .prepare(&SIGNAL_SQL.replace("{terminate}", &terminate).replace(
                "{replay}",
                &crate::sampler::REPLAY_SQL.replace("{in_recovery}", "$8::pg_catalog.bool"),
            ))
            .await
            .map_err(|e| error_chain(&e))?;
        Ok(LeaderSession {
            client,
            pid,
            signal,
            leader: false,
            terminate_wait,
        })
    }

    /// Sends the decision's signal, if everything it assumed still holds,
    /// and says what became of it (with the server's words for errors).
    pub async fn signal(&mut self, decision: &Decision) -> Sent {
        let Some(session) = self.session.as_ref().filter(|s| s.leader) else {
            return Sent::failed(Outcome::Error, "not the leader".into());
        };
        let terminate_wait = session.terminate_wait;
        let signalled = &decision.signalled;
        let waiter = &decision.waiter.session;
        let signal: &str = decision.signal.as_str();
        let backend_start: Option<SystemTime> = signalled.backend_start;
        let deadline = self.deadline();
        let row = timeout(
            deadline,
            session.client.query_one(
                &session.signal,
                &[
                    &signalled.pid,
                    &backend_start,
                    &signalled.xact_start,
                    &waiter.pid,
                    &waiter.backend_start,
                    &signal,
                    &LEADER_LOCK_KEY,
                    &decision.in_recovery,
                ],
            ),
        )
        .await;
        let Ok(row) = row else {
            // Whether the signal went out is unknown; the session cannot be
            // trusted with another.
            self.session = None;
            return Sent::failed(
                Outcome::Error,
                format!("the leader session did not answer within {deadline:?}; it is dropped"),
            );
        };
        match row {
            Ok(row) => {
                let checked = Checked {
                    leader: row.get("leader"),
                    found: row.get("target_found"),
                    blocking: row.get("still_blocking"),
                    signalled: row.get("signalled"),
                };
                let (outcome, detail) = checked.outcome(decision.signal, terminate_wait);
                if !checked.leader {
                    self.session = None;
                }
                Sent {
                    outcome,
                    detail,
                    at: Some(row.get("at")),
                }
            }
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => Sent::failed(
                Outcome::PermissionDenied,
                format!(
                    "{}; grant pg_signal_backend to lockjam's role (superusers' sessions can only be signalled by a superuser)",
                    e.as_db_error().map_or(error_chain(&e), |d| d.message().to_string())
                ),
            ),
            Err(e) => {
                if session.client.is_closed() {
                    self.session = None;
                }
                Sent::failed(Outcome::Error, error_chain(&e))
            }
        }
    }
}

/// What `signal.sql` found before it signalled, and what the signal
/// function returned.
struct Checked {
    leader: bool,
    found: bool,
    blocking: bool,
    signalled: Option<bool>,
}

impl Checked {
    /// The outcome, with the words for an error. `terminate_wait` is how
    /// long a terminate waited for the backend to exit (PostgreSQL 14+).
    fn outcome(&self, signal: Signal, terminate_wait: Option<Duration>) -> (Outcome, Option<String>) {
        match (self.leader, self.found, self.blocking, self.signalled) {
            (false, ..) => (
                Outcome::Error,
                Some("the leader lock was lost; nothing signalled".into()),
            ),
            (_, false, ..) => (Outcome::Gone, None),
            (_, _, false, _) => (Outcome::NotBlocking, None),
            (_, _, _, Some(true)) => (Outcome::Success, None),
            // From PostgreSQL 14, terminate returns false when the backend
            // has not exited within the wait.
            (_, _, _, Some(false)) if signal == Signal::Terminate && terminate_wait.is_some() => (
                Outcome::Error,
                Some(format!(
                    "terminated, but the backend had not exited after {} ms",
                    terminate_wait.unwrap_or_default().as_millis()
                )),
            ),
            // Otherwise false means the process was gone by the time the
            // signal was sent.
            _ => (Outcome::Gone, Some("the server could not signal the process".into())),
        }
    }
}

/// What became of a signal.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub outcome: Outcome,
    /// The server's words, or lockjam's, for outcomes that need them.
    pub detail: Option<String>,
    /// When the signalling statement ran, by the server's clock; `None`
    /// when it did not run.
    pub at: Option<SystemTime>,
}

impl Sent {
    fn failed(outcome: Outcome, detail: String) -> Sent {
        Sent {
            outcome,
            detail: Some(detail),
            at: None,
        }
    }
}
